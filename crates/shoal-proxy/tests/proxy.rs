//! End-to-end proxy behaviour over real sockets.

mod common;

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use common::*;
use tokio::net::TcpSocket;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn round_robin_is_exact() {
    let (a, b, c) = (
        Backend::start("a").await,
        Backend::start("b").await,
        Backend::start("c").await,
    );
    let p = start_proxy(service_config(&[&a, &b, &c], "round-robin")).await;
    let cl = client();
    for _ in 0..300 {
        assert_eq!(get(&cl, p.addr, "/").await.0, 200);
    }
    assert_eq!((a.count(), b.count(), c.count()), (100, 100, 100));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn least_connections_avoids_busy_instance() {
    let a = Backend::start("a").await;
    let p = start_proxy(service_config(&[&a], "least-connections")).await;
    let cl = client();
    // Three long requests pin instance a...
    let holds: Vec<_> = (0..3)
        .map(|_| {
            let cl = cl.clone();
            let addr = p.addr;
            tokio::spawn(async move { get(&cl, addr, "/slow?ms=1500").await })
        })
        .collect();
    eventually(5, || a.in_flight.load(Ordering::SeqCst) == 3).await;
    // ...then two idle instances join and quick requests avoid a.
    let (b, c) = (Backend::start("b").await, Backend::start("c").await);
    p.service.pool.add("b", b.addr, 1, false);
    p.service.pool.add("c", c.addr, 1, false);
    for _ in 0..60 {
        assert_eq!(get(&cl, p.addr, "/").await.0, 200);
    }
    assert_eq!(a.count(), 3, "no quick request went to the busy instance");
    assert_eq!(b.count() + c.count(), 60);
    assert!(
        b.count() > 10 && c.count() > 10,
        "b={} c={}",
        b.count(),
        c.count()
    );
    for h in holds {
        assert_eq!(h.await.unwrap().0, 200);
    }
}

/// Sends a GET from a chosen loopback source address (127.0.0.x) and returns the body.
async fn get_from(
    proxy: std::net::SocketAddr,
    src: [u8; 4],
    header: Option<(&str, &str)>,
) -> String {
    let sock = TcpSocket::new_v4().unwrap();
    sock.bind((std::net::Ipv4Addr::from(src), 0).into())
        .unwrap();
    let stream = sock.connect(proxy).await.unwrap();
    let (mut send, conn) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
            .await
            .unwrap();
    tokio::spawn(conn);
    let mut req = http::Request::get("/").header("host", "test");
    if let Some((k, v)) = header {
        req = req.header(k, v);
    }
    let resp = send
        .send_request(
            req.body(http_body_util::Empty::<bytes::Bytes>::new())
                .unwrap(),
        )
        .await
        .unwrap();
    use http_body_util::BodyExt;
    String::from_utf8(
        resp.into_body()
            .collect()
            .await
            .unwrap()
            .to_bytes()
            .to_vec(),
    )
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ip_hash_is_stable_per_client() {
    let (a, b, c) = (
        Backend::start("a").await,
        Backend::start("b").await,
        Backend::start("c").await,
    );
    let p = start_proxy(service_config(&[&a, &b, &c], "ip-hash")).await;
    let mut used = std::collections::HashSet::new();
    for client in 2..22u8 {
        let first = get_from(p.addr, [127, 0, 0, client], None).await;
        for _ in 0..5 {
            assert_eq!(
                get_from(p.addr, [127, 0, 0, client], None).await,
                first,
                "client 127.0.0.{client} moved"
            );
        }
        used.insert(first);
    }
    assert!(
        used.len() >= 2,
        "20 clients all hashed to one instance: {used:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn consistent_hash_remaps_about_one_nth() {
    let backends: Vec<_> = futures_join(4).await;
    let refs: Vec<&Arc<Backend>> = backends.iter().take(3).collect();
    let mut cfg = service_config(&refs, "consistent-hash");
    cfg.hash_key = shoal_proxy::config::HashKey::Header(http::HeaderName::from_static("x-user"));
    let p = start_proxy(cfg).await;
    let cl = client();
    let keys: Vec<String> = (0..600).map(|i| format!("user-{i}")).collect();
    let snapshot = |cl: HttpClient| {
        let keys = keys.clone();
        async move {
            let mut m = HashMap::new();
            for k in &keys {
                let (s, body) = get_with(&cl, p.addr, "/", &[("x-user", k)]).await;
                assert_eq!(s, 200);
                m.insert(k.clone(), body);
            }
            m
        }
    };
    let before = snapshot(cl.clone()).await;
    p.service.pool.add("d", backends[3].addr, 1, false);
    let after_add = snapshot(cl.clone()).await;
    let moved =
        keys.iter().filter(|k| before[*k] != after_add[*k]).count() as f64 / keys.len() as f64;
    assert!(moved <= 0.25 + 0.05, "add remapped {moved}");
    let to_new = keys
        .iter()
        .filter(|k| before[*k] != after_add[*k] && after_add[*k] == "d")
        .count() as f64;
    assert!(
        to_new >= 0.8 * moved * keys.len() as f64,
        "moved keys mostly go to the new instance"
    );
    p.service
        .pool
        .remove(&backends[0].addr.to_string(), Duration::from_secs(1))
        .await;
    let after_remove = snapshot(cl).await;
    let moved = keys
        .iter()
        .filter(|k| after_add[*k] != after_remove[*k])
        .count() as f64
        / keys.len() as f64;
    assert!(moved <= 0.25 + 0.05, "remove remapped {moved}");
}

async fn futures_join(n: usize) -> Vec<Arc<Backend>> {
    let mut v = Vec::new();
    for i in 0..n {
        v.push(Backend::start(&((b'a' + i as u8) as char).to_string()).await);
    }
    v
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn p2c_ewma_avoids_slow_instance() {
    let bs = futures_join(3).await;
    bs[2].delay_ms.store(100, Ordering::SeqCst);
    let refs: Vec<&Arc<Backend>> = bs.iter().collect();
    let p = start_proxy(service_config(&refs, "p2c-ewma")).await;
    let cl = client();
    let mut tasks = Vec::new();
    for _ in 0..8 {
        let cl = cl.clone();
        let addr = p.addr;
        tasks.push(tokio::spawn(async move {
            for _ in 0..60 {
                assert_eq!(get(&cl, addr, "/").await.0, 200);
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let slow = bs[2].count() as f64 / 480.0;
    assert!(slow < 0.10, "slow instance got {:.1}%", slow * 100.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_backend_loses_no_request() {
    let bs = futures_join(3).await;
    let refs: Vec<&Arc<Backend>> = bs.iter().collect();
    let p = start_proxy(service_config(&refs, "round-robin")).await;
    let cl = client();
    let failures = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let done = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let mut tasks = Vec::new();
    for _ in 0..10 {
        let (cl, addr, failures, done) = (cl.clone(), p.addr, failures.clone(), done.clone());
        tasks.push(tokio::spawn(async move {
            for _ in 0..200 {
                let (s, body) = get(&cl, addr, "/slow?ms=2").await;
                if s != 200 {
                    failures.fetch_add(1, Ordering::SeqCst);
                    eprintln!("failed: {s} {body}");
                }
                done.fetch_add(1, Ordering::SeqCst);
            }
        }));
    }
    eventually(30, || done.load(Ordering::SeqCst) >= 500).await;
    bs[1].kill();
    for t in tasks {
        t.await.unwrap();
    }
    assert_eq!(done.load(Ordering::SeqCst), 2000);
    assert_eq!(failures.load(Ordering::SeqCst), 0);
    assert!(bs[0].count() + bs[2].count() > 1400);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failing_instance_is_ejected_until_it_recovers() {
    let (a, b) = (Backend::start("a").await, Backend::start("b").await);
    let mut cfg = service_config(&[&a, &b], "round-robin");
    cfg.outlier.consecutive_errors = 3;
    cfg.outlier.base_ejection = shoal_proxy::config::Dur(Duration::from_millis(800));
    let p = start_proxy(cfg).await;
    b.status.store(503, Ordering::SeqCst);
    let cl = client();
    for _ in 0..40 {
        get(&cl, p.addr, "/").await;
    }
    assert_eq!(b.count(), 3, "ejected after exactly 3 consecutive 503s");
    let inst = p.service.pool.get(&b.addr.to_string()).unwrap();
    assert_eq!(inst.metrics.ejections.get(), 1);
    // Recovered and the ejection expired: traffic comes back.
    b.status.store(200, Ordering::SeqCst);
    eventually(5, || {
        !inst.is_ejected(shoal_proxy::pool::now_nanos())
            && p.service.pool.snapshot().instances.len() == 2
    })
    .await;
    for _ in 0..20 {
        assert_eq!(get(&cl, p.addr, "/").await.0, 200);
    }
    assert!(b.count() >= 3 + 8, "b back in rotation: {}", b.count());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn smuggling_and_limits_never_reach_a_backend() {
    let a = Backend::start("a").await;
    let p = start_proxy(service_config(&[&a], "round-robin")).await;
    let cases: Vec<(&str, Vec<u8>, &str)> = vec![
        ("differing content-length", b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\nhello!".to_vec(), "400"),
        ("te not chunked", b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: identity\r\n\r\nhello".to_vec(), "400"),
        ("te gzip then chunked", b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: gzip, chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n".to_vec(), "400"),
        ("te chunked then gzip", b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked, gzip\r\n\r\n5\r\nhello\r\n0\r\n\r\n".to_vec(), "400"),
        ("invalid header byte", b"GET / HTTP/1.1\r\nHost: x\r\nX-Bad: a\x01b\r\n\r\n".to_vec(), "400"),
        ("space before colon", b"GET / HTTP/1.1\r\nHost: x\r\nX-Bad : 1\r\n\r\n".to_vec(), "400"),
        ("missing host", b"GET / HTTP/1.1\r\n\r\n".to_vec(), "400"),
        ("request line over 8 KiB", format!("GET /{} HTTP/1.1\r\nHost: x\r\n\r\n", "a".repeat(9000)).into_bytes(), "414"),
        ("header block over 64 KiB", format!("GET / HTTP/1.1\r\nHost: x\r\nX-Big: {}\r\n\r\n", "b".repeat(70_000)).into_bytes(), "431"),
        ("over 100 headers", format!("GET / HTTP/1.1\r\nHost: x\r\n{}\r\n", (0..120).map(|i| format!("X-H{i}: v\r\n")).collect::<String>()).into_bytes(), "431"),
    ];
    for (name, bytes, want) in cases {
        let resp = raw(p.addr, &bytes).await;
        assert!(
            resp.starts_with(&format!("HTTP/1.1 {want}")),
            "{name}: got {:?}",
            resp.lines().next()
        );
    }
    assert_eq!(a.count(), 0, "a rejected request reached the backend");

    // Content-Length with Transfer-Encoding: refused (as NGINX does), on every path.
    let resp = raw(
        p.addr,
        b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\nGET /smuggled HTTP/1.1\r\nHost: x\r\n\r\n",
    )
    .await;
    assert!(resp.starts_with("HTTP/1.1 400"), "{resp}");
    assert_eq!(
        resp.matches("HTTP/1.1").count(),
        1,
        "no second response: {resp}"
    );
    assert_eq!(a.count(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn draining_instance_finishes_in_flight_and_gets_nothing_new() {
    let a = Backend::start("a").await;
    let p = start_proxy(service_config(&[&a], "round-robin")).await;
    let cl = client();
    let slow: Vec<_> = (0..3)
        .map(|_| {
            let (cl, addr) = (cl.clone(), p.addr);
            tokio::spawn(async move { get(&cl, addr, "/slow?ms=2000").await })
        })
        .collect();
    eventually(5, || a.in_flight.load(Ordering::SeqCst) == 3).await;
    let b = Backend::start("b").await;
    p.service.pool.add("b", b.addr, 1, false);
    let id = a.addr.to_string();
    let pool = p.service.pool.clone();
    let removal = tokio::spawn(async move { pool.remove(&id, Duration::from_secs(10)).await });
    for _ in 0..50 {
        let (s, body) = get(&cl, p.addr, "/").await;
        assert_eq!((s, body.as_str()), (200, "b"));
    }
    assert_eq!(a.count(), 3);
    for s in slow {
        assert_eq!(s.await.unwrap(), (200, "a".to_string()));
    }
    assert_eq!(
        removal.await.unwrap(),
        Some(0),
        "removed with nothing in flight"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn errors_are_short_plain_responses() {
    let a = Backend::start("a").await;
    let mut cfg = service_config(&[&a], "round-robin");
    cfg.timeouts.request = shoal_proxy::config::Dur(Duration::from_millis(300));
    cfg.timeouts.per_try = shoal_proxy::config::Dur(Duration::from_millis(300));
    let p = start_proxy(cfg).await;
    let cl = client();
    let (s, body) = get(&cl, p.addr, "/slow?ms=2000").await;
    assert_eq!((s, body.as_str()), (504, "upstream timed out\n"));
    a.kill();
    tokio::time::sleep(Duration::from_millis(50)).await;
    let (s, body) = get(&cl, p.addr, "/").await;
    assert_eq!(s, 502, "{body}");
    p.service
        .pool
        .remove(&a.addr.to_string(), Duration::ZERO)
        .await;
    let (s, body) = get(&cl, p.addr, "/").await;
    assert_eq!((s, body.as_str()), (503, "no instance available\n"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn websocket_upgrade_passes_through() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let a = Backend::start("a").await;
    let p = start_proxy(service_config(&[&a], "round-robin")).await;
    let mut s = tokio::net::TcpStream::connect(p.addr).await.unwrap();
    s.write_all(
        b"GET /ws HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n",
    )
    .await
    .unwrap();
    let mut buf = vec![0u8; 1024];
    let n = s.read(&mut buf).await.unwrap();
    let head = String::from_utf8_lossy(&buf[..n]).to_string();
    assert!(head.starts_with("HTTP/1.1 101"), "{head}");
    assert!(
        head.to_ascii_lowercase().contains("upgrade: websocket"),
        "{head}"
    );
    s.write_all(b"ping over the tunnel").await.unwrap();
    let mut got = vec![0u8; 20];
    tokio::time::timeout(Duration::from_secs(2), s.read_exact(&mut got))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(&got, b"ping over the tunnel");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn h2c_prior_knowledge_and_forwarded_headers() {
    let a = Backend::start("a").await;
    let p = start_proxy(service_config(&[&a], "round-robin")).await;
    let h2: hyper_util::client::legacy::Client<_, http_body_util::Full<bytes::Bytes>> =
        hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
            .http2_only(true)
            .build_http();
    let (s, headers) = get(&h2, p.addr, "/headers").await;
    assert_eq!(s, 200);
    assert!(
        headers.contains("\"x-forwarded-for\": \"127.0.0.1\""),
        "{headers}"
    );
    assert!(headers.contains("\"via\": \"2 shoal\""), "{headers}");
    assert!(headers.contains("\"host\""), "{headers}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn h2_body_without_content_length_reaches_the_instance() {
    // HTTP/2 frames the body itself: no Content-Length does not mean no body.
    let a = Backend::start("a").await;
    let p = start_proxy(service_config(&[&a], "round-robin")).await;
    let h2: hyper_util::client::legacy::Client<_, Chunks> =
        hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
            .http2_only(true)
            .build_http();
    let req = http::Request::post(format!("http://{}/", p.addr))
        .body(Chunks {
            left: 3,
            chunk: bytes::Bytes::from(vec![1u8; 1000]),
        })
        .unwrap();
    assert!(req.headers().get("content-length").is_none());
    let resp = h2.request(req).await.unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(a.body_bytes.load(Ordering::SeqCst), 3000);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slowloris_is_cut_off() {
    let a = Backend::start("a").await;
    let mut cfg = service_config(&[&a], "round-robin");
    cfg.timeouts.header_read = shoal_proxy::config::Dur(Duration::from_millis(500));
    let p = start_proxy(cfg).await;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(p.addr).await.unwrap();
    s.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n").await.unwrap();
    let start = std::time::Instant::now();
    let mut out = Vec::new();
    let r = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut out)).await;
    assert!(r.is_ok(), "connection not closed");
    assert!(start.elapsed() < Duration::from_secs(3));
    assert_eq!(a.count(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_upload_streams_with_bounded_memory() {
    let a = Backend::start("a").await;
    let p = start_proxy(service_config(&[&a], "round-robin")).await;
    const TOTAL: u64 = 1 << 30;
    let chunk = bytes::Bytes::from(vec![7u8; 1 << 20]);
    let body = Chunks {
        left: (TOTAL >> 20) as usize,
        chunk,
    };
    let c: hyper_util::client::legacy::Client<_, Chunks> =
        hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
            .build_http();
    let before = vm_hwm_kib();
    let req = http::Request::post(format!("http://{}/", p.addr))
        .header("content-length", TOTAL.to_string())
        .body(body)
        .unwrap();
    let resp = c.request(req).await.unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(a.body_bytes.load(Ordering::SeqCst), TOTAL);
    let grew_mib = (vm_hwm_kib().saturating_sub(before)) / 1024;
    assert!(
        grew_mib < 128,
        "peak RSS grew {grew_mib} MiB for a 1 GiB upload"
    );
}

/// A request body of `n` frames of `chunk`, produced as they are read.
struct Chunks {
    left: usize,
    chunk: bytes::Bytes,
}

impl http_body::Body for Chunks {
    type Data = bytes::Bytes;
    type Error = std::io::Error;
    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<bytes::Bytes>, std::io::Error>>> {
        if self.left == 0 {
            return std::task::Poll::Ready(None);
        }
        self.left -= 1;
        std::task::Poll::Ready(Some(Ok(http_body::Frame::data(self.chunk.clone()))))
    }
}

fn vm_hwm_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_going_away_releases_in_flight() {
    let a = Backend::start("a").await;
    let p = start_proxy(service_config(&[&a], "least-connections")).await;
    let cl = client();
    let r = tokio::time::timeout(
        Duration::from_millis(200),
        get(&cl, p.addr, "/slow?ms=1500"),
    )
    .await;
    assert!(r.is_err(), "the client gave up first");
    drop(cl); // closes the client connection: the proxy drops the request
    let inst = p.service.pool.get(&a.addr.to_string()).unwrap();
    // Released on the hang-up, not when the instance answers at 1.5 s.
    let gone = std::time::Instant::now();
    eventually(5, || inst.in_flight() == 0).await;
    assert!(
        gone.elapsed() < Duration::from_millis(900),
        "{:?}",
        gone.elapsed()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_connections_are_reused() {
    let a = Backend::start("a").await;
    let p = start_proxy(service_config(&[&a], "round-robin")).await;
    let cl = client();
    for _ in 0..100 {
        assert_eq!(get(&cl, p.addr, "/").await.0, 200);
    }
    // Sequential requests: one keep-alive connection serves them all.
    assert_eq!(a.count(), 100);
    assert!(
        a.conns.load(Ordering::SeqCst) <= 2,
        "{} connections for 100 requests",
        a.conns.load(Ordering::SeqCst)
    );
    // HEAD and 204 responses have no body to read; their connections are reused too.
    let before = a.conns.load(Ordering::SeqCst);
    a.status.store(204, Ordering::SeqCst);
    for _ in 0..20 {
        assert_eq!(get(&cl, p.addr, "/").await.0, 204);
    }
    assert!(a.conns.load(Ordering::SeqCst) <= before + 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_client_connections_are_closed() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let a = Backend::start("a").await;
    let mut cfg = service_config(&[&a], "round-robin");
    cfg.timeouts.idle = shoal_proxy::config::Dur(Duration::from_millis(300));
    let p = start_proxy(cfg).await;
    let mut s = tokio::net::TcpStream::connect(p.addr).await.unwrap();
    s.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let mut buf = vec![0u8; 4096];
    let n = s.read(&mut buf).await.unwrap();
    assert!(String::from_utf8_lossy(&buf[..n]).starts_with("HTTP/1.1 200"));
    // Nothing more is sent: the proxy closes the idle keep-alive connection.
    let r = tokio::time::timeout(Duration::from_secs(3), s.read(&mut buf)).await;
    assert!(matches!(r, Ok(Ok(0))), "connection still open: {r:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_connections_holds_further_clients_back() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let a = Backend::start("a").await;
    let mut cfg = service_config(&[&a], "round-robin");
    cfg.limits.max_connections = 2;
    let p = start_proxy(cfg).await;
    let req = b"GET / HTTP/1.1\r\nHost: x\r\n\r\n";
    let mut held = Vec::new();
    for _ in 0..2 {
        let mut s = tokio::net::TcpStream::connect(p.addr).await.unwrap();
        s.write_all(req).await.unwrap();
        let mut buf = vec![0u8; 4096];
        assert!(s.read(&mut buf).await.unwrap() > 0);
        held.push(s);
    }
    // A third client waits in the accept queue while two connections are open...
    let mut third = tokio::net::TcpStream::connect(p.addr).await.unwrap();
    third.write_all(req).await.unwrap();
    let mut buf = vec![0u8; 4096];
    assert!(
        tokio::time::timeout(Duration::from_millis(500), third.read(&mut buf))
            .await
            .is_err(),
        "served over the limit"
    );
    // ...and is served as soon as one closes.
    drop(held.pop());
    let n = tokio::time::timeout(Duration::from_secs(3), third.read(&mut buf))
        .await
        .unwrap()
        .unwrap();
    assert!(String::from_utf8_lossy(&buf[..n]).starts_with("HTTP/1.1 200"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reload_applies_new_weights_without_dropping_requests() {
    let (a, b) = (Backend::start("a").await, Backend::start("b").await);
    let cfg = service_config(&[&a, &b], "weighted-round-robin");
    let p = start_proxy(cfg.clone()).await;
    let cl = client();
    for _ in 0..40 {
        assert_eq!(get(&cl, p.addr, "/").await.0, 200);
    }
    assert_eq!((a.count(), b.count()), (20, 20));
    let mut heavier = cfg;
    heavier.backends[1].weight = 3;
    p.service.reconfigure(heavier);
    for _ in 0..40 {
        assert_eq!(get(&cl, p.addr, "/").await.0, 200);
    }
    assert_eq!((a.count() - 20, b.count() - 20), (10, 30));
    // The replaced instance left after draining; one live instance per backend remains.
    eventually(5, || p.service.pool.members().len() == 2).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tunnels_count_against_max_connections() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let a = Backend::start("a").await;
    let mut cfg = service_config(&[&a], "round-robin");
    cfg.limits.max_connections = 1;
    let p = start_proxy(cfg).await;
    let mut ws = tokio::net::TcpStream::connect(p.addr).await.unwrap();
    ws.write_all(
        b"GET /ws HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n",
    )
    .await
    .unwrap();
    let mut buf = vec![0u8; 1024];
    let n = ws.read(&mut buf).await.unwrap();
    assert!(String::from_utf8_lossy(&buf[..n]).starts_with("HTTP/1.1 101"));
    // The tunnel is the one allowed connection: another client waits...
    let mut other = tokio::net::TcpStream::connect(p.addr).await.unwrap();
    other
        .write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    assert!(
        tokio::time::timeout(Duration::from_millis(500), other.read(&mut buf))
            .await
            .is_err()
    );
    assert_eq!(p.app.services()[0].name, "test");
    // ...until the tunnel closes.
    drop(ws);
    let n = tokio::time::timeout(Duration::from_secs(3), other.read(&mut buf))
        .await
        .unwrap()
        .unwrap();
    assert!(String::from_utf8_lossy(&buf[..n]).starts_with("HTTP/1.1 200"));
}
