//! The load generator against real servers on port 0.

mod common;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::start_demo;
use http::{Response, Uri};
use http_body_util::Full;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use shoal_tools::{run_load, LoadConfig};
use tokio::net::TcpListener;

fn cfg(addr: SocketAddr, path: &str, rate: f64, secs: f64) -> LoadConfig {
    let url: Uri = format!("http://{addr}{path}").parse().unwrap();
    LoadConfig::new(url, rate, Duration::from_secs_f64(secs))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn constant_rate_against_demo() {
    let d = start_demo("load").await;
    let r = run_load(cfg(d.addr, "/work?cpu_ms=0", 200.0, 2.0), false)
        .await
        .unwrap();
    assert_eq!(r.requests, 400);
    assert!((380..=420).contains(&r.ok), "{}", r.to_text());
    assert_eq!(r.errors.total, 0, "{}", r.to_text());
    assert!(
        (190.0..=210.0).contains(&r.achieved_rate),
        "{}",
        r.to_text()
    );
    assert!(r.elapsed_secs < 3.0, "{}", r.to_text());
    assert_eq!(r.latency.count, r.ok);
    assert!(r.connections_used >= 1 && r.connections_used <= 64);
}

/// A server that answers at once, except that the `stall_at`-th request freezes every
/// request (like a GC pause) for `pause`.
async fn stalling_server(stall_at: u64, pause: Duration) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let seen = Arc::new(AtomicU64::new(0));
    let until: Arc<Mutex<Option<Instant>>> = Arc::default();
    tokio::spawn(async move {
        loop {
            let (stream, _) = listener.accept().await.unwrap();
            let (seen, until) = (seen.clone(), until.clone());
            let svc = service_fn(move |_req| {
                let (seen, until) = (seen.clone(), until.clone());
                async move {
                    let wait = {
                        let mut u = until.lock().unwrap();
                        if seen.fetch_add(1, Ordering::SeqCst) + 1 == stall_at {
                            *u = Some(Instant::now() + pause);
                        }
                        u.map(|t| t.saturating_duration_since(Instant::now()))
                    };
                    if let Some(w) = wait {
                        tokio::time::sleep(w).await;
                    }
                    Ok::<_, Infallible>(Response::new(Full::new(Bytes::from_static(b"ok"))))
                }
            });
            tokio::spawn(http1::Builder::new().serve_connection(TokioIo::new(stream), svc));
        }
    });
    addr
}

async fn check_stall_is_charged(connections: usize) {
    let addr = stalling_server(40, Duration::from_millis(500)).await;
    let mut c = cfg(addr, "/", 100.0, 2.0);
    c.connections = connections;
    let r = run_load(c, false).await.unwrap();
    let text = r.to_text();
    assert_eq!(r.errors.total, 0, "{text}");
    // ~50 requests were due during the pause, waiting up to 500 ms; a closed-loop tool
    // would report one slow request and a p99 of about a millisecond.
    assert!(r.latency.max_us >= 450_000, "{text}");
    assert!(r.latency.p99_us >= 400_000, "{text}");
    assert!(r.latency.p50_us < 100_000, "{text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stall_latency_counts_from_intended_time_with_pool() {
    check_stall_is_charged(64).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stall_latency_counts_from_intended_time_with_one_connection() {
    check_stall_is_charged(1).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn timeouts_are_counted_and_the_run_ends_on_time() {
    let d = start_demo("slow").await;
    for connections in [64, 1] {
        let mut c = cfg(d.addr, "/slow?ms=2000", 20.0, 1.0);
        c.timeout = Duration::from_millis(300);
        c.connections = connections;
        let t = Instant::now();
        let r = run_load(c, false).await.unwrap();
        assert!(
            t.elapsed() < Duration::from_millis(1_800),
            "{:?}",
            t.elapsed()
        );
        assert_eq!(r.requests, 20);
        assert_eq!(r.errors.timeout, 20, "{}", r.to_text());
        assert_eq!(r.errors.total, 20);
        assert_eq!(r.ok, 0);
    }
}

#[tokio::test]
async fn closed_port_counts_connect_errors() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    drop(listener);
    let r = run_load(cfg(addr, "/", 50.0, 0.5), false).await.unwrap();
    assert_eq!(r.requests, 25);
    assert_eq!(r.errors.connect, 25, "{}", r.to_text());
    assert_eq!(r.ok, 0);
    assert!(r.to_text().contains("no responses"));
}

#[tokio::test]
async fn error_statuses_are_counted_by_code() {
    let d = start_demo("status").await;
    let r = run_load(cfg(d.addr, "/status/503", 50.0, 0.4), false)
        .await
        .unwrap();
    assert_eq!(r.errors.status_5xx, 20, "{}", r.to_text());
    assert_eq!(r.status_codes.get(&503), Some(&20));
    let r = run_load(cfg(d.addr, "/nope", 50.0, 0.2), false)
        .await
        .unwrap();
    assert_eq!(r.errors.status_4xx, 10);
    let v: serde_json::Value = serde_json::from_str(&r.to_json()).unwrap();
    assert_eq!(v["status_codes"]["404"], 10);
}

#[tokio::test]
async fn posts_a_body() {
    let d = start_demo("post").await;
    let mut c = cfg(d.addr, "/echo", 20.0, 0.2);
    c.method = http::Method::POST;
    c.body = Bytes::from_static(b"payload");
    let r = run_load(c, false).await.unwrap();
    assert_eq!(r.ok, 4, "{}", r.to_text());
}
