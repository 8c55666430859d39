//! The demo service's endpoints, CPU burn and graceful shutdown, over real sockets.

mod common;

use std::time::{Duration, Instant};

use common::{get, request, start_demo};
use http::StatusCode;

fn json(b: &[u8]) -> serde_json::Value {
    serde_json::from_slice(b).unwrap()
}

#[tokio::test]
async fn endpoints_answer_as_specified() {
    let d = start_demo("t1").await;
    let a = d.addr;

    assert_eq!(get(a, "/healthz").await, (StatusCode::OK, "ok".into()));
    assert_eq!(get(a, "/nope").await.0, StatusCode::NOT_FOUND);

    let t = Instant::now();
    let (s, b) = get(a, "/work?cpu_ms=20&sleep_ms=30").await;
    assert_eq!(s, StatusCode::OK);
    assert!(t.elapsed() >= Duration::from_millis(50));
    let v = json(&b);
    assert_eq!(
        (
            v["instance"].as_str(),
            v["cpu_ms"].as_u64(),
            v["sleep_ms"].as_u64()
        ),
        (Some("t1"), Some(20), Some(30))
    );
    assert_eq!(get(a, "/work").await.0, StatusCode::OK);
    for bad in [
        "/work?cpu_ms=abc",
        "/work?sleep_ms=-1",
        "/work?cpu_ms=99999999",
        "/slow?ms=x",
        "/bytes?n=1.5",
    ] {
        assert_eq!(get(a, bad).await.0, StatusCode::BAD_REQUEST, "{bad}");
    }

    let (s, _, b) = request(
        a,
        "POST",
        "/echo?q=1",
        &[("x-test", "yes"), ("x-test", "again")],
        "hello",
    )
    .await;
    assert_eq!(s, StatusCode::OK);
    let v = json(&b);
    assert_eq!(v["method"], "POST");
    assert_eq!(v["uri"], "/echo?q=1");
    assert_eq!(v["headers"]["x-test"], "yes, again");
    assert_eq!(v["body"], "hello");

    let t = Instant::now();
    let (s, b) = get(a, "/slow?ms=100").await;
    assert_eq!(s, StatusCode::OK);
    assert!(t.elapsed() >= Duration::from_millis(100));
    assert_eq!(json(&b)["slept_ms"], 100);

    assert_eq!(
        get(a, "/status/503").await.0,
        StatusCode::SERVICE_UNAVAILABLE
    );
    assert_eq!(
        get(a, "/status/204").await,
        (StatusCode::NO_CONTENT, "".into())
    );
    assert_eq!(get(a, "/status/42").await.0, StatusCode::BAD_REQUEST);
    assert_eq!(get(a, "/status/abc").await.0, StatusCode::BAD_REQUEST);

    let (s, h, b) = request(a, "GET", "/bytes?n=100000", &[], "").await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(b.len(), 100_000);
    assert_eq!(h["content-length"], "100000");
    assert_eq!(get(a, "/bytes?n=0").await, (StatusCode::OK, "".into()));
}

/// utime + stime of this process, from `/proc/self/stat` (USER_HZ is 100 on Linux).
fn process_cpu() -> Option<Duration> {
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    // Fields after the parenthesised command name; utime and stime are fields 14 and 15.
    let rest = &stat[stat.rfind(')')? + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks: u64 = f[11].parse::<u64>().ok()? + f[12].parse::<u64>().ok()?;
    Some(Duration::from_millis(ticks * 10))
}

#[tokio::test]
async fn cpu_ms_consumes_cpu_time() {
    let d = start_demo("cpu").await;
    let before = process_cpu();
    let t = Instant::now();
    assert_eq!(get(d.addr, "/work?cpu_ms=300").await.0, StatusCode::OK);
    assert!(t.elapsed() >= Duration::from_millis(300));
    if let (Some(a), Some(b)) = (before, process_cpu()) {
        // Tick granularity is 10 ms; allow a few ticks.
        assert!(b - a >= Duration::from_millis(250), "used {:?}", b - a);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_instance_burns_one_request_at_a_time() {
    let d = start_demo("cap").await;
    let t = Instant::now();
    let (a, b) = tokio::join!(
        get(d.addr, "/work?cpu_ms=150"),
        get(d.addr, "/work?cpu_ms=150")
    );
    assert_eq!((a.0, b.0), (StatusCode::OK, StatusCode::OK));
    assert!(
        t.elapsed() >= Duration::from_millis(300),
        "{:?}",
        t.elapsed()
    );
}

#[tokio::test]
async fn graceful_shutdown_finishes_in_flight_requests() {
    let d = start_demo("drain").await;
    let addr = d.addr;
    let slow = tokio::spawn(async move { get(addr, "/slow?ms=300").await });
    tokio::time::sleep(Duration::from_millis(100)).await;
    d.stop.send(()).unwrap();
    let (s, _) = slow.await.unwrap();
    assert_eq!(s, StatusCode::OK);
    tokio::time::timeout(Duration::from_secs(5), d.task)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert!(tokio::net::TcpStream::connect(addr).await.is_err());
}
