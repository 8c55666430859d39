//! Hostile clients against a recording origin, on both request paths.
//!
//! Every case is sent twice: as a plain HTTP/1.1 request with a Content-Length body (read
//! whole) and with a chunked body (streamed and re-framed). Each asserts what the client got
//! and what the instance received.

mod common;

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use common::*;
use shoal_proxy::config::Dur;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

#[derive(Clone, Copy, Debug)]
enum Path {
    Fast,
    Chunked,
}

const PATHS: [Path; 2] = [Path::Fast, Path::Chunked];

/// A request with `head` lines (no Host unless given), `Connection: close`, and a 3-byte
/// body framed for `path`.
fn request(path: Path, line: &str, head: &[&str]) -> Vec<u8> {
    let mut r = format!("{line}\r\n");
    for h in head {
        r.push_str(h);
        r.push_str("\r\n");
    }
    r.push_str("Connection: close\r\n");
    match path {
        Path::Fast => r.push_str("Content-Length: 3\r\n\r\nabc"),
        Path::Chunked => r.push_str("Transfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n"),
    }
    r.into_bytes()
}

fn status(resp: &str) -> u16 {
    resp.get(9..12).and_then(|s| s.parse().ok()).unwrap_or(0)
}

fn last(b: &Backend) -> String {
    b.last.lock().unwrap().to_ascii_lowercase()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn h2c_upgrade_is_never_tunneled() {
    let a = Backend::start("a").await;
    let p = start_proxy(service_config(&[&a], "round-robin")).await;
    let h2c = [
        "Host: x",
        "Connection: Upgrade, HTTP2-Settings",
        "Upgrade: h2c",
        "HTTP2-Settings: AAMAAABkAAQAoAAAAAIAAAAA",
    ];
    for path in PATHS {
        // A lenient origin that upgrades unasked: shoal refuses to relay the 101.
        let resp = raw(p.addr, &request(path, "POST /ws HTTP/1.1", &h2c)).await;
        assert_eq!(status(&resp), 502, "{path:?}: {resp}");
        assert!(!resp.contains("101"), "{path:?}: {resp}");
        let got = last(&a);
        assert!(!got.contains("upgrade"), "{path:?}: origin saw {got}");
        assert!(
            !got.contains("http2-settings"),
            "{path:?}: origin saw {got}"
        );
        // Elsewhere the request is an ordinary one, without the upgrade.
        let resp = raw(p.addr, &request(path, "POST /x HTTP/1.1", &h2c)).await;
        assert_eq!(status(&resp), 200, "{path:?}: {resp}");
        assert!(!last(&a).contains("h2c"));
    }
    // The origin did upgrade (unasked) both times: shoal refused to relay it.
    assert_eq!(a.upgrades.load(Ordering::SeqCst), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_bodies_blame_the_client_not_the_instance() {
    let (a, b) = (Backend::start("a").await, Backend::start("b").await);
    let mut cfg = service_config(&[&a, &b], "round-robin");
    cfg.outlier.consecutive_errors = 3;
    cfg.timeouts.body_read = Dur(Duration::from_millis(300));
    let p = start_proxy(cfg).await;
    for i in 0..100 {
        let bytes: Vec<u8> = match i % 4 {
            // A chunk size that is not hex.
            0 => b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n0x5\r\nhello\r\n0\r\n\r\n".to_vec(),
            // Chunk data longer than its size line says.
            1 => b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nhello\r\n0\r\n\r\n".to_vec(),
            // Cut short: the client goes away mid-upload (chunked, then length-delimited).
            2 => b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n100\r\nonly a little".to_vec(),
            _ => b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\nonly a little".to_vec(),
        };
        let mut s = TcpStream::connect(p.addr).await.unwrap();
        s.write_all(&bytes).await.unwrap();
        if i % 4 >= 2 {
            s.shutdown().await.unwrap();
            drop(s);
            continue;
        }
        let mut out = Vec::new();
        let _ = tokio::time::timeout(Duration::from_secs(3), s.read_to_end(&mut out)).await;
        let resp = String::from_utf8_lossy(&out);
        assert_eq!(status(&resp), 400, "case {}: {resp}", i % 4);
    }
    // Let cut-short requests run out.
    tokio::time::sleep(Duration::from_millis(500)).await;
    for inst in p.service.pool.members() {
        assert_eq!(inst.metrics.ejections.get(), 0, "{} ejected", inst.id);
        assert!(inst.is_healthy(), "{} unhealthy", inst.id);
        assert!(!inst.is_ejected(shoal_proxy::pool::now_nanos()));
        let errors: u64 = inst.metrics.errors.iter().map(|c| c.get()).sum();
        assert_eq!(
            errors, 0,
            "{}: upstream errors counted for client faults",
            inst.id
        );
    }
    assert!(p.service.metrics.client_errors.get() >= 50);
    // And both still serve.
    let cl = client();
    for _ in 0..4 {
        assert_eq!(get(&cl, p.addr, "/").await.0, 200);
    }
    assert!(a.count() >= 2 && b.count() >= 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn framing_and_host_rules_hold_on_both_paths() {
    let a = Backend::start("a").await;
    let p = start_proxy(service_config(&[&a], "round-robin")).await;
    // Content-Length with Transfer-Encoding: 400 (the fast path sees every head raw).
    let resp = raw(
        p.addr,
        b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n",
    )
    .await;
    assert_eq!(status(&resp), 400, "{resp}");
    for path in PATHS {
        for host in [
            "",
            "a.example, b.example",
            "a b",
            "user@a.example",
            "a.example/x",
            "a:99999x",
        ] {
            let h = format!("Host: {host}");
            let resp = raw(p.addr, &request(path, "POST / HTTP/1.1", &[&h])).await;
            assert_eq!(status(&resp), 400, "{path:?} host {host:?}: {resp}");
        }
        let resp = raw(p.addr, &request(path, "POST / HTTP/1.1", &[])).await;
        assert_eq!(status(&resp), 400, "{path:?} missing host: {resp}");
        let resp = raw(
            p.addr,
            &request(path, "POST / HTTP/1.1", &["Host: a", "Host: b"]),
        )
        .await;
        assert_eq!(status(&resp), 400, "{path:?} two hosts: {resp}");
    }
    assert_eq!(a.count(), 0, "a refused request reached the instance");
    for path in PATHS {
        // The authority of an absolute-form target wins over Host (RFC 9112 §3.2.2).
        let resp = raw(
            p.addr,
            &request(
                path,
                "POST http://other.example/p?q=1 HTTP/1.1",
                &["Host: client.example"],
            ),
        )
        .await;
        assert_eq!(status(&resp), 200, "{path:?}: {resp}");
        let got = last(&a);
        assert!(got.starts_with("post /p?q=1\n"), "{path:?}: {got}");
        assert!(
            got.contains("\"host\": \"other.example\""),
            "{path:?}: {got}"
        );
        assert!(!got.contains("client.example"), "{path:?}: {got}");
        // `Connection` cannot name Host (or framing headers) away.
        let resp = raw(
            p.addr,
            &request(
                path,
                "POST /c HTTP/1.1",
                &[
                    "Host: keep.example",
                    "Connection: Host, x-secret",
                    "X-Secret: 1",
                ],
            ),
        )
        .await;
        assert_eq!(status(&resp), 200, "{path:?}: {resp}");
        let got = last(&a);
        assert!(
            got.contains("\"host\": \"keep.example\""),
            "{path:?}: {got}"
        );
        assert!(!got.contains("x-secret"), "{path:?}: {got}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forwarding_headers_cannot_be_spoofed() {
    let a = Backend::start("a").await;
    let mut cfg = service_config(&[&a], "round-robin");
    let p = start_proxy(cfg.clone()).await;
    let spoof = [
        "Host: shop.example",
        "X-Forwarded-For: 6.6.6.6",
        "X-Forwarded-Proto: https",
        "X-Forwarded-Host: evil.example",
        "X-Forwarded-Port: 443",
        "X-Forwarded-Prefix: /admin",
        "X-Real-IP: 6.6.6.6",
        "Forwarded: for=6.6.6.6;proto=https",
        "X_Forwarded_For: 6.6.6.6",
        "X_Custom: 1",
    ];
    let port = p.addr.port().to_string();
    for path in PATHS {
        let resp = raw(p.addr, &request(path, "POST / HTTP/1.1", &spoof)).await;
        assert_eq!(status(&resp), 200, "{path:?}: {resp}");
        let got = last(&a);
        assert!(!got.contains("6.6.6.6"), "{path:?}: {got}");
        assert!(!got.contains("https"), "{path:?}: {got}");
        assert!(!got.contains("evil.example"), "{path:?}: {got}");
        assert!(!got.contains("/admin"), "{path:?}: {got}");
        assert!(!got.contains("x_"), "{path:?}: {got}");
        assert!(
            got.contains("\"x-forwarded-for\": \"127.0.0.1\""),
            "{path:?}: {got}"
        );
        assert!(
            got.contains("\"x-forwarded-proto\": \"http\""),
            "{path:?}: {got}"
        );
        assert!(
            got.contains("\"x-forwarded-host\": \"shop.example\""),
            "{path:?}: {got}"
        );
        assert!(
            got.contains(&format!("\"x-forwarded-port\": \"{port}\"")),
            "{path:?}: {got}"
        );
        assert!(
            got.contains("\"forwarded\": \"for=127.0.0.1;host=\\\"shop.example\\\";proto=http\""),
            "{path:?}: {got}"
        );
    }
    // A trusted proxy's chain is kept and appended to.
    drop(p);
    cfg.trusted_proxies = vec!["127.0.0.0/8".parse().unwrap()];
    cfg.allow_underscore_headers = true;
    let p = start_proxy(cfg).await;
    for path in PATHS {
        let resp = raw(p.addr, &request(path, "POST / HTTP/1.1", &spoof)).await;
        assert_eq!(status(&resp), 200, "{path:?}: {resp}");
        let got = last(&a);
        assert!(
            got.contains("\"x-forwarded-for\": \"6.6.6.6, 127.0.0.1\""),
            "{path:?}: {got}"
        );
        assert!(
            got.contains("\"x-forwarded-proto\": \"https\""),
            "{path:?}: {got}"
        );
        assert!(got.contains("x_custom"), "{path:?}: {got}");
    }
}

/// A raw origin: reads one request head per connection and runs `serve` on the socket.
async fn raw_origin<F, Fut>(serve: F) -> std::net::SocketAddr
where
    F: Fn(TcpStream) -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let serve = Arc::new(serve);
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            let serve = serve.clone();
            tokio::spawn(async move {
                let mut head = Vec::new();
                let mut b = [0u8; 4096];
                while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                    match s.read(&mut b).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => head.extend_from_slice(&b[..n]),
                    }
                }
                serve(s).await;
            });
        }
    });
    addr
}

fn static_config(addr: std::net::SocketAddr) -> shoal_proxy::ServiceConfig {
    let mut cfg = shoal_proxy::ServiceConfig::quick(
        "test",
        "127.0.0.1:0".parse().unwrap(),
        shoal_balance::Algorithm::RoundRobin,
    );
    cfg.backends
        .push(shoal_proxy::config::BackendSpec { addr, weight: 1 });
    cfg
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deadlines_hold_after_the_head() {
    // A client trickling its body gets 408 after body_read, on both paths.
    let a = Backend::start("a").await;
    let mut cfg = service_config(&[&a], "round-robin");
    cfg.timeouts.body_read = Dur(Duration::from_millis(300));
    let p = start_proxy(cfg).await;
    for (path, bytes) in [
        (
            Path::Fast,
            &b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 10\r\n\r\nabc"[..],
        ),
        (
            Path::Chunked,
            b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\na\r\nabc",
        ),
    ] {
        let mut s = TcpStream::connect(p.addr).await.unwrap();
        s.write_all(bytes).await.unwrap();
        let start = std::time::Instant::now();
        let mut out = Vec::new();
        let r = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut out)).await;
        assert!(r.is_ok(), "{path:?}: connection held open");
        let resp = String::from_utf8_lossy(&out);
        assert_eq!(status(&resp), 408, "{path:?}: {resp}");
        assert!(start.elapsed() < Duration::from_secs(3), "{path:?}");
    }
    for inst in p.service.pool.members() {
        assert_eq!(inst.in_flight(), 0);
        let errors: u64 = inst.metrics.errors.iter().map(|c| c.get()).sum();
        assert_eq!(errors, 0);
    }

    // An instance that stalls mid-body: the response ends after upstream_read.
    let stall = raw_origin(|mut s| async move {
        let _ = s
            .write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\npartial")
            .await;
        tokio::time::sleep(Duration::from_secs(30)).await;
    })
    .await;
    let mut cfg = static_config(stall);
    cfg.timeouts.upstream_read = Dur(Duration::from_millis(300));
    let p = start_proxy(cfg).await;
    for path in PATHS {
        let start = std::time::Instant::now();
        let resp = raw(p.addr, &request(path, "POST / HTTP/1.1", &["Host: x"])).await;
        assert!(resp.ends_with("partial"), "{path:?}: {resp}");
        assert!(
            start.elapsed() < Duration::from_millis(1900),
            "{path:?}: held {:?}",
            start.elapsed()
        );
    }
    let inst = &p.service.pool.members()[0];
    eventually(3, || inst.in_flight() == 0).await;

    // A client that stops reading a large response is let go after client_write, and the
    // instance's in-flight slot with it.
    let flood = raw_origin(|mut s| async move {
        let _ = s
            .write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 1000000000\r\n\r\n")
            .await;
        let chunk = vec![b'x'; 64 * 1024];
        while s.write_all(&chunk).await.is_ok() {}
    })
    .await;
    let mut cfg = static_config(flood);
    cfg.timeouts.client_write = Dur(Duration::from_millis(300));
    let p = start_proxy(cfg).await;
    let inst = p.service.pool.members()[0].clone();
    for path in PATHS {
        let mut s = TcpStream::connect(p.addr).await.unwrap();
        s.write_all(&request(path, "POST / HTTP/1.1", &["Host: x"]))
            .await
            .unwrap();
        eventually(3, || inst.in_flight() == 1).await;
        // Never read: the proxy must give up on its own.
        eventually(5, || inst.in_flight() == 0).await;
        drop(s);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_upstream_connections_expire() {
    let a = Backend::start("a").await;
    let mut cfg = service_config(&[&a], "round-robin");
    cfg.timeouts.upstream_idle = Dur(Duration::from_millis(300));
    let p = start_proxy(cfg).await;
    let cl = client();
    assert_eq!(get(&cl, p.addr, "/").await.0, 200);
    let inst = p.service.pool.members()[0].clone();
    assert!(!inst.idle.is_empty(), "connection kept for reuse");
    eventually(3, || inst.idle.is_empty()).await;
    let conns = a.conns.load(Ordering::SeqCst);
    assert_eq!(get(&cl, p.addr, "/").await.0, 200);
    assert_eq!(
        a.conns.load(Ordering::SeqCst),
        conns + 1,
        "a new connection after expiry"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn trace_context_is_propagated_or_started() {
    let a = Backend::start("a").await;
    let p = start_proxy(service_config(&[&a], "round-robin")).await;
    let incoming = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01";
    let header = format!("traceparent: {incoming}");
    for path in PATHS {
        let resp = raw(
            p.addr,
            &request(path, "POST / HTTP/1.1", &["Host: x", &header]),
        )
        .await;
        assert_eq!(status(&resp), 200, "{path:?}: {resp}");
        let got = last(&a);
        // Same trace, shoal's own parent id: exactly one traceparent reaches the instance.
        assert_eq!(got.matches("traceparent").count(), 1, "{path:?}: {got}");
        assert!(
            got.contains("00-0af7651916cd43dd8448eb211c80319c-"),
            "{path:?}: {got}"
        );
        assert!(!got.contains("b7ad6b7169203331"), "{path:?}: {got}");
        // None sent: one is created.
        let resp = raw(p.addr, &request(path, "POST / HTTP/1.1", &["Host: x"])).await;
        assert_eq!(status(&resp), 200, "{path:?}: {resp}");
        let got = last(&a);
        let at = got.find("\"traceparent\": \"").expect("a traceparent") + 16;
        let tp = &got[at..at + 55];
        assert!(
            tp.starts_with("00-") && tp.ends_with("-01"),
            "{path:?}: {tp}"
        );
    }
}
