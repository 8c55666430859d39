//! The cache through the real binary: two `shoal proxy` processes sharing one private
//! `redis-server` in front of one scripted origin, and Redis SIGKILLed under load.

mod common;

#[path = "../../shoal-cache/tests/common/redis.rs"]
mod redis;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::*;
use http_body_util::Full;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use redis::{exists, RedisCluster, RedisServer};

/// An origin on its own runtime (stopped on drop): every answer is cacheable for 10 minutes
/// and names the path and the origin's request count.
struct Origin {
    addr: SocketAddr,
    calls: Arc<AtomicUsize>,
    _rt: tokio::runtime::Runtime,
}

fn origin() -> Origin {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let calls = Arc::new(AtomicUsize::new(0));
    let listener = rt
        .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
        .unwrap();
    let addr = listener.local_addr().unwrap();
    let c = calls.clone();
    rt.spawn(async move {
        loop {
            let Ok((s, _)) = listener.accept().await else {
                continue;
            };
            let c = c.clone();
            tokio::spawn(async move {
                let svc = service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
                    let n = c.fetch_add(1, Ordering::SeqCst);
                    let body = format!("{} #{n}", req.uri().path());
                    let resp = hyper::Response::builder()
                        .header("cache-control", "max-age=600")
                        .header("etag", format!("\"{n}\""))
                        .body(Full::new(Bytes::from(body)))
                        .unwrap();
                    async move { Ok::<_, Infallible>(resp) }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(s), svc)
                    .await;
            });
        }
    });
    Origin {
        addr,
        calls,
        _rt: rt,
    }
}

/// `shoal proxy` with a memory tier and the shared Redis tier; returns it, its listener and
/// admin ports, once it reports Redis connected.
fn shoal_proxy(
    dir: &std::path::Path,
    name: &str,
    origin: SocketAddr,
    redis: &str,
) -> (Proc, u16, u16) {
    let (listen, admin) = (free_port(), free_port());
    let log = std::fs::File::create(dir.join(format!("{name}.log"))).unwrap();
    let child = Command::new(SHOAL)
        .args(["proxy", "--threads", "1", "--listen"])
        .arg(format!("127.0.0.1:{listen}"))
        .arg("--backend")
        .arg(origin.to_string())
        .arg("--admin")
        .arg(format!("127.0.0.1:{admin}"))
        .args(["--cache-memory", "16MiB", "--cache-redis", redis])
        .env("RUST_LOG", "info")
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .unwrap();
    let proc = Proc(child);
    wait_port(listen, 20);
    wait_port(admin, 20);
    wait_until(10, "redis connected", || {
        api_json(admin, "/api/cache")["redis_connected"] == true
    });
    (proc, listen, admin)
}

/// `GET path` with the shared host name (the cache key is the URL, so both processes must
/// see the same authority); the raw response.
fn get_site(port: u16, path: &str) -> String {
    http_raw(
        SocketAddr::from(([127, 0, 0, 1], port)),
        "GET",
        path,
        &[("Host", "site.test")],
        "",
    )
}

fn body(resp: &str) -> &str {
    resp.split_once("\r\n\r\n").map_or("", |(_, b)| b)
}

/// Four client threads, each asking a new URL of `a` and then of `b` until `stop` is set;
/// each returns how many answers were 200 and the other answers.
#[allow(clippy::type_complexity)]
fn clients(
    a: u16,
    b: u16,
) -> (
    Arc<AtomicBool>,
    Vec<std::thread::JoinHandle<(usize, Vec<String>)>>,
) {
    let stop = Arc::new(AtomicBool::new(false));
    let clients = (0..4)
        .map(|c| {
            let stop = stop.clone();
            std::thread::spawn(move || {
                let (mut ok, mut failed) = (0, Vec::new());
                let mut n = c;
                while !stop.load(Ordering::Relaxed) {
                    for port in [a, b] {
                        let r = get_site(port, &format!("/k/{n}"));
                        if r.starts_with("HTTP/1.1 200") {
                            ok += 1;
                        } else {
                            failed.push(r);
                        }
                    }
                    n += 4;
                }
                (ok, failed)
            })
        })
        .collect();
    (stop, clients)
}

#[test]
fn two_shoal_processes_share_one_redis() {
    let dir = tempdir();
    let redis = RedisServer::start();
    let o = origin();
    let (_a, a, _) = shoal_proxy(dir.path(), "a", o.addr, &redis.url());
    let (_b, b, b_admin) = shoal_proxy(dir.path(), "b", o.addr, &redis.url());

    let first = get_site(a, "/obj");
    assert!(first.starts_with("HTTP/1.1 200"), "{first}");
    assert_eq!(body(&first), "/obj #0");
    assert!(header(&first, "cache-status")
        .unwrap()
        .contains("fwd=uri-miss"));
    assert_eq!(o.calls.load(Ordering::SeqCst), 1);
    wait_until(10, "stored in Redis", || {
        exists(redis.port, "http://site.test/obj default")
    });

    // The other process never saw /obj: it answers from Redis, not from the origin.
    let second = get_site(b, "/obj");
    assert!(second.starts_with("HTTP/1.1 200"), "{second}");
    assert_eq!(body(&second), "/obj #0");
    assert!(
        header(&second, "cache-status")
            .unwrap()
            .starts_with("shoal; hit"),
        "{second}"
    );
    // Now in b's memory tier too: the fast path answers it.
    let third = get_site(b, "/obj");
    assert_eq!(body(&third), "/obj #0");
    assert_eq!(
        o.calls.load(Ordering::SeqCst),
        1,
        "the origin saw one request"
    );
    let hits = api_json(b_admin, "/api/cache")["requests"]["default"]["hit"].clone();
    assert_eq!(hits, 2, "b counted two hits");
}

#[test]
fn redis_sigkilled_under_load_fails_no_request_and_is_used_again_once_back() {
    let dir = tempdir();
    let mut redis = RedisServer::start();
    let o = origin();
    let (_a, a, a_admin) = shoal_proxy(dir.path(), "a", o.addr, &redis.url());
    let (_b, b, b_admin) = shoal_proxy(dir.path(), "b", o.addr, &redis.url());

    // Four clients, each URL new (a memory miss: a Redis lookup, an origin fetch, a Redis
    // store) asked of a first and then of b (a Redis hit while Redis lives), while Redis is
    // killed a second in.
    let (stop, clients) = clients(a, b);
    std::thread::sleep(Duration::from_secs(1));
    redis.kill(); // SIGKILL
    std::thread::sleep(Duration::from_secs(2));
    stop.store(true, Ordering::Relaxed);
    let mut total = 0;
    for c in clients {
        let (ok, failed) = c.join().unwrap();
        assert!(
            failed.is_empty(),
            "{} failed: {:?}",
            failed.len(),
            &failed[..1]
        );
        total += ok;
    }
    assert!(total > 200, "only {total} requests in 3 s");
    // Before the kill b answered a's URLs from Redis.
    let b_hits = api_json(b_admin, "/api/cache")["requests"]["default"]["hit"].clone();
    assert!(b_hits.as_u64().unwrap() > 0, "b never hit: {b_hits}");
    for admin in [a_admin, b_admin] {
        let c = api_json(admin, "/api/cache");
        assert_eq!(c["redis_connected"], false, "{c}");
        assert!(c["redis_errors"].as_u64().unwrap() > 0, "{c}");
    }

    // Redis back on the same port (empty): both processes use it again without a restart.
    redis.spawn();
    let started = Instant::now();
    let mut n = 0;
    let path = loop {
        let path = format!("/after/{n}");
        assert!(get_site(a, &path).starts_with("HTTP/1.1 200"));
        std::thread::sleep(Duration::from_millis(50));
        if exists(redis.port, &format!("http://site.test{path} default")) {
            break path;
        }
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "a never wrote to Redis again"
        );
        n += 1;
    };
    // b reconnects on its next use of the tier (any request that misses memory).
    wait_until(10, "b reconnected", || {
        get_site(b, "/warm");
        api_json(b_admin, "/api/cache")["redis_connected"] == true
    });
    let before = o.calls.load(Ordering::SeqCst);
    let r = get_site(b, &path);
    assert!(
        header(&r, "cache-status")
            .unwrap()
            .starts_with("shoal; hit"),
        "{r}"
    );
    assert_eq!(
        o.calls.load(Ordering::SeqCst),
        before,
        "b read a's object from Redis"
    );
}

/// Two shoal processes on a three-master Redis Cluster (seed list on the command line): hits
/// shared; a master SIGKILLed under load fails no request, and once its replica has taken
/// over, objects are stored in every slot again.
#[test]
fn two_shoal_processes_share_a_redis_cluster_and_ride_out_a_failover() {
    let dir = tempdir();
    let mut cluster = RedisCluster::start();
    let o = origin();
    let (_a, a, _) = shoal_proxy(dir.path(), "a", o.addr, &cluster.url());
    let (_b, b, b_admin) = shoal_proxy(dir.path(), "b", o.addr, &cluster.url());
    let key = |path: &str| format!("shoal:cache:{{}}http://site.test{path} default");

    let paths: Vec<String> = (0..20).map(|i| format!("/c/{i}")).collect();
    for p in &paths {
        assert!(get_site(a, p).starts_with("HTTP/1.1 200"));
    }
    for p in &paths {
        wait_until(10, "stored in the cluster", || cluster.exists(&key(p)));
    }
    for p in &paths {
        let r = get_site(b, p);
        assert!(
            header(&r, "cache-status")
                .unwrap()
                .starts_with("shoal; hit"),
            "{r}"
        );
    }
    assert_eq!(o.calls.load(Ordering::SeqCst), paths.len());
    assert_eq!(
        api_json(b_admin, "/api/cache")["requests"]["default"]["hit"],
        paths.len()
    );

    let (stop, clients) = clients(a, b);
    std::thread::sleep(Duration::from_secs(1));
    let victim = cluster.master_of(&key("/c/0"));
    cluster.kill(victim);
    std::thread::sleep(Duration::from_secs(3));
    stop.store(true, Ordering::Relaxed);
    for c in clients {
        let (ok, failed) = c.join().unwrap();
        assert!(
            failed.is_empty(),
            "{} failed: {:?}",
            failed.len(),
            &failed[..1]
        );
        assert!(ok > 0);
    }

    // After the failover both processes store in every slot again, without a restart.
    cluster.wait_ok(Duration::from_secs(30));
    let started = Instant::now();
    for n in 0.. {
        let batch: Vec<String> = (0..20).map(|i| format!("/after/{n}/{i}")).collect();
        for p in &batch {
            assert!(get_site(a, p).starts_with("HTTP/1.1 200"));
        }
        std::thread::sleep(Duration::from_millis(200));
        if batch.iter().all(|p| cluster.exists(&key(p))) {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "the cluster tier was not used again in every slot"
        );
    }
}
