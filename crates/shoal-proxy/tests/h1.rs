//! The HTTP/1.1 fast path against a scripted raw backend: response framings, interim
//! responses, instances closing idle connections, pipelining, and hand-over to the general
//! path in the middle of a keep-alive connection.

mod common;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// What the scripted backend does with one request: the bytes to answer with (written in
/// the given pieces, a little apart) and whether to close the connection afterwards —
/// without saying so, as an instance whose keep-alive timer fired would.
struct Reply {
    pieces: Vec<Vec<u8>>,
    close: bool,
}

type Script = dyn Fn(&str) -> Reply + Send + Sync;

struct RawBackend {
    addr: SocketAddr,
    requests: AtomicUsize,
    conns: AtomicUsize,
    /// Connections the backend has closed.
    closed: AtomicUsize,
    /// Replies written in full.
    replied: AtomicUsize,
}

async fn raw_backend(script: Arc<Script>) -> Arc<RawBackend> {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let b = Arc::new(RawBackend {
        addr: listener.local_addr().unwrap(),
        requests: AtomicUsize::new(0),
        conns: AtomicUsize::new(0),
        closed: AtomicUsize::new(0),
        replied: AtomicUsize::new(0),
    });
    let b2 = b.clone();
    tokio::spawn(async move {
        loop {
            let (mut s, _) = listener.accept().await.unwrap();
            // Each piece leaves at once (no Nagle wait for the proxy's delayed ACK).
            s.set_nodelay(true).unwrap();
            b2.conns.fetch_add(1, Ordering::SeqCst);
            let b = b2.clone();
            let script = script.clone();
            tokio::spawn(async move {
                serve_script(&mut s, &b, &*script).await;
                drop(s);
                b.closed.fetch_add(1, Ordering::SeqCst);
            });
        }
    });
    b
}

async fn serve_script(s: &mut TcpStream, b: &RawBackend, script: &Script) {
    let mut buf = Vec::new();
    loop {
        // One request head (these tests send no bodies upstream but small ones).
        let end = loop {
            if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                break i + 4;
            }
            let mut chunk = [0u8; 4096];
            match s.read(&mut chunk).await {
                Ok(0) | Err(_) => return,
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
            }
        };
        let head = String::from_utf8_lossy(&buf[..end]).into_owned();
        let len: usize = head
            .lines()
            .find_map(|l| {
                l.to_ascii_lowercase()
                    .strip_prefix("content-length:")
                    .map(|v| v.trim().parse().unwrap())
            })
            .unwrap_or(0);
        while buf.len() < end + len {
            let mut chunk = [0u8; 4096];
            match s.read(&mut chunk).await {
                Ok(0) | Err(_) => return,
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
            }
        }
        buf.drain(..end + len);
        b.requests.fetch_add(1, Ordering::SeqCst);
        let reply = script(&head);
        for (i, p) in reply.pieces.iter().enumerate() {
            if p.is_empty() {
                // An empty piece: a long pause (the instance is still working).
                tokio::time::sleep(Duration::from_millis(300)).await;
                continue;
            }
            if i > 0 {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            if s.write_all(p).await.is_err() {
                return;
            }
        }
        b.replied.fetch_add(1, Ordering::SeqCst);
        if reply.close {
            return;
        }
    }
}

fn reply(pieces: &[&[u8]]) -> Reply {
    Reply {
        pieces: pieces.iter().map(|p| p.to_vec()).collect(),
        close: false,
    }
}

fn config(b: &RawBackend) -> shoal_proxy::config::ServiceConfig {
    let mut cfg = shoal_proxy::config::ServiceConfig::quick(
        "test",
        "127.0.0.1:0".parse().unwrap(),
        "round-robin".parse().unwrap(),
    );
    cfg.backends.push(shoal_proxy::config::BackendSpec {
        addr: b.addr,
        weight: 1,
    });
    cfg
}

/// Reads one response from `s`, delimited as HTTP/1.1 says; returns (head, body).
async fn read_response(
    s: &mut TcpStream,
    buf: &mut Vec<u8>,
    head_request: bool,
) -> (String, Vec<u8>) {
    async fn fill(s: &mut TcpStream, buf: &mut Vec<u8>) -> bool {
        let mut chunk = [0u8; 4096];
        match tokio::time::timeout(Duration::from_secs(5), s.read(&mut chunk)).await {
            Ok(Ok(n)) if n > 0 => {
                buf.extend_from_slice(&chunk[..n]);
                true
            }
            _ => false,
        }
    }
    let end = loop {
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
        assert!(
            fill(s, buf).await,
            "connection closed before a response head: {:?}",
            String::from_utf8_lossy(buf)
        );
    };
    let head = String::from_utf8_lossy(&buf[..end]).into_owned();
    buf.drain(..end);
    let lower = head.to_ascii_lowercase();
    let no_body = head_request
        || head.starts_with("HTTP/1.1 1")
        || head.starts_with("HTTP/1.1 204")
        || head.starts_with("HTTP/1.1 304");
    let body = if no_body {
        Vec::new()
    } else if lower.contains("transfer-encoding: chunked") {
        // Good enough for these tests: chunks end with the terminating "0\r\n\r\n".
        loop {
            if let Some(i) = buf.windows(5).position(|w| w == b"0\r\n\r\n") {
                let b = buf[..i + 5].to_vec();
                buf.drain(..i + 5);
                break b;
            }
            assert!(fill(s, buf).await, "chunked body cut short");
        }
    } else if let Some(len) = lower.lines().find_map(|l| {
        l.strip_prefix("content-length:")
            .map(|v| v.trim().parse::<usize>().unwrap())
    }) {
        while buf.len() < len {
            if !fill(s, buf).await {
                break;
            }
        }
        let n = len.min(buf.len());
        buf.drain(..n).collect()
    } else {
        while fill(s, buf).await {}
        std::mem::take(buf)
    };
    (head, body)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn response_framings_pass_through_on_one_keep_alive_connection() {
    let b = raw_backend(Arc::new(|head: &str| {
        let path = head.split(' ').nth(1).unwrap_or("");
        match path {
            "/chunked" => reply(&[
                b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhel",
                b"lo\r\n",
                b"6\r\n world\r\n0\r\n",
                b"\r\n",
            ]),
            "/early" => reply(&[
                b"HTTP/1.1 100 Continue\r\n\r\n",
                b"HTTP/1.1 103 Early Hints\r\nLink: </s.css>\r\nConnection: x\r\nX: 1\r\n\r\n",
                b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nearly",
            ]),
            "/empty" => reply(&[b"HTTP/1.1 204 No Content\r\n\r\n"]),
            "/head" => reply(&[b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n"]),
            "/big" => {
                let mut r = b"HTTP/1.1 200 OK\r\nContent-Length: 300000\r\n\r\n".to_vec();
                r.extend(std::iter::repeat_n(b'x', 300_000));
                Reply { pieces: vec![r], close: false }
            }
            _ => reply(&[b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: keep-alive\r\nKeep-Alive: timeout=5\r\n\r\nok"]),
        }
    }))
    .await;
    let p = start_proxy(config(&b)).await;
    let mut s = TcpStream::connect(p.addr).await.unwrap();
    let mut buf = Vec::new();
    let cases: [(&str, &str, &[u8]); 6] = [
        ("GET", "/chunked", b"5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n"),
        ("GET", "/early", b"early"),
        ("GET", "/empty", b""),
        ("HEAD", "/head", b""),
        ("GET", "/plain", b"ok"),
        ("GET", "/big", &[b'x'; 300_000]),
    ];
    for round in 0..2 {
        for (method, path, want) in cases {
            s.write_all(format!("{method} {path} HTTP/1.1\r\nHost: x\r\n\r\n").as_bytes())
                .await
                .unwrap();
            if path == "/early" {
                // The 103 is relayed ahead of the answer (the unasked 100 is not), without
                // the fields its Connection header names.
                let (hint, _) = read_response(&mut s, &mut buf, false).await;
                assert!(hint.starts_with("HTTP/1.1 103 Early Hints\r\n"), "{hint}");
                assert!(
                    hint.to_ascii_lowercase().contains("link: </s.css>"),
                    "{hint}"
                );
                assert!(!hint.to_ascii_lowercase().contains("x: 1"), "{hint}");
            }
            let (head, body) = read_response(&mut s, &mut buf, method == "HEAD").await;
            assert!(head.starts_with("HTTP/1.1 2"), "{path}: {head}");
            assert!(head.contains("via: 1.1 shoal"), "{head}");
            let lower = head.to_ascii_lowercase();
            assert!(
                !lower.contains("keep-alive:") && !lower.contains("connection:"),
                "{head}"
            );
            assert_eq!(body, want, "round {round} {path}");
        }
    }
    assert_eq!(b.requests.load(Ordering::SeqCst), 12);
    // Every exchange ended cleanly, so one upstream connection carried them all.
    assert_eq!(b.conns.load(Ordering::SeqCst), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn early_hints_reach_the_client_before_the_answer_is_ready() {
    let b = raw_backend(Arc::new(|_: &str| Reply {
        pieces: vec![
            b"HTTP/1.1 103 Early Hints\r\nLink: </s.css>; rel=preload\r\n\r\n".to_vec(),
            Vec::new(),
            b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok".to_vec(),
        ],
        close: false,
    }))
    .await;
    let p = start_proxy(config(&b)).await;
    let mut s = TcpStream::connect(p.addr).await.unwrap();
    s.write_all(b"GET /slow-answer HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let mut first = [0u8; 4096];
    let n = s.read(&mut first).await.unwrap();
    let got = String::from_utf8_lossy(&first[..n]).into_owned();
    assert!(got.starts_with("HTTP/1.1 103"), "{got}");
    assert!(
        !got.contains("HTTP/1.1 200"),
        "the hint waited for the answer: {got}"
    );
    let mut buf = first[n..n].to_vec();
    let (head, body) = read_response(&mut s, &mut buf, false).await;
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    assert_eq!(body, b"ok");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn early_hints_reach_the_client_on_a_cached_route_too() {
    let b = raw_backend(Arc::new(|_: &str| Reply {
        pieces: vec![
            b"HTTP/1.1 103 Early Hints\r\nLink: </s.css>; rel=preload\r\nConnection: x\r\nX: 1\r\n\r\n"
                .to_vec(),
            Vec::new(),
            b"HTTP/1.1 200 OK\r\nCache-Control: max-age=60\r\nContent-Length: 2\r\n\r\nok"
                .to_vec(),
        ],
        close: false,
    }))
    .await;
    let mut cfg = config(&b);
    cfg.cache = Some(shoal_cache::CacheConfig::default());
    let p = start_proxy(cfg).await;
    let mut s = TcpStream::connect(p.addr).await.unwrap();
    s.write_all(b"GET /cached HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let mut first = [0u8; 4096];
    let n = s.read(&mut first).await.unwrap();
    let got = String::from_utf8_lossy(&first[..n]).into_owned();
    assert!(got.starts_with("HTTP/1.1 103"), "{got}");
    assert!(
        !got.contains("HTTP/1.1 200"),
        "the hint waited for the answer: {got}"
    );
    assert!(!got.to_ascii_lowercase().contains("x: 1"), "{got}");
    let mut buf = Vec::new();
    let (head, body) = read_response(&mut s, &mut buf, false).await;
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    assert_eq!(body, b"ok");
    // The stored answer is served without the hint (1xx are never stored).
    s.write_all(b"GET /cached HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let (head, body) = read_response(&mut s, &mut buf, false).await;
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    assert!(head.contains("hit"), "{head}");
    assert_eq!(body, b"ok");
}

/// The data of a whole chunked body (sizes and terminator checked).
fn dechunk(mut b: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    loop {
        let line = b.windows(2).position(|w| w == b"\r\n").expect("size line");
        let n = usize::from_str_radix(std::str::from_utf8(&b[..line]).unwrap(), 16).unwrap();
        assert_eq!(&b[line + 2 + n..line + 4 + n], b"\r\n");
        out.extend_from_slice(&b[line + 2..line + 2 + n]);
        b = &b[line + 4 + n..];
        if n == 0 {
            assert!(b.is_empty());
            return out;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn close_delimited_response_is_chunked_and_the_client_connection_kept() {
    let b = raw_backend(Arc::new(|head: &str| {
        if head.starts_with("GET /coded") {
            // A coding of its own: relayed as it is, until close.
            return Reply {
                pieces: vec![
                    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\n\r\nzz".to_vec(),
                    b"zz".to_vec(),
                ],
                close: true,
            };
        }
        Reply {
            pieces: vec![b"HTTP/1.1 200 OK\r\n\r\nuntil ".to_vec(), b"close".to_vec()],
            close: true,
        }
    }))
    .await;
    let p = start_proxy(config(&b)).await;
    let mut s = TcpStream::connect(p.addr).await.unwrap();
    s.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\nGET /2 HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let mut buf = Vec::new();
    for _ in 0..2 {
        let (head, body) = read_response(&mut s, &mut buf, false).await;
        assert!(head.starts_with("HTTP/1.1 200"), "{head}");
        assert!(!head.contains("connection: close"), "{head}");
        assert!(head.contains("transfer-encoding: chunked\r\n"), "{head}");
        assert_eq!(dechunk(&body), b"until close");
    }
    // The same connection goes on.
    s.write_all(b"GET /coded HTTP/1.1\r\nHost: x\r\n\r\nGET /never HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let mut rest = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(3), s.read_to_end(&mut rest)).await;
    buf.extend_from_slice(&rest);
    let resp = String::from_utf8_lossy(&buf);
    assert!(resp.starts_with("HTTP/1.1 200"), "{resp}");
    assert!(resp.contains("connection: close\r\n"), "{resp}");
    assert!(resp.ends_with("\r\n\r\nzzzz"), "{resp}");
    assert_eq!(b.requests.load(Ordering::SeqCst), 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn instance_closing_idle_connections_fails_no_request() {
    // Each upstream connection serves one exchange and is then closed by the instance
    // without notice — shoal's pooled copy is stale by the next request.
    let b = raw_backend(Arc::new(|_: &str| Reply {
        pieces: vec![b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok".to_vec()],
        close: true,
    }))
    .await;
    let mut cfg = config(&b);
    // No retries: a stale connection must be recognised, not retried into success.
    cfg.retries.attempts = 1;
    let p = start_proxy(cfg).await;
    let mut s = TcpStream::connect(p.addr).await.unwrap();
    let mut buf = Vec::new();
    for i in 0..20 {
        let req = if i % 2 == 0 {
            "GET / HTTP/1.1\r\nHost: x\r\n\r\n".to_string()
        } else {
            "POST /form HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\n\r\na=1".to_string()
        };
        s.write_all(req.as_bytes()).await.unwrap();
        let (head, body) = read_response(&mut s, &mut buf, false).await;
        assert!(head.starts_with("HTTP/1.1 200"), "request {i}: {head}");
        assert_eq!(body, b"ok");
        // The instance has closed its end before the next request goes out.
        eventually(5, || b.closed.load(Ordering::SeqCst) > i).await;
    }
    // A POST never went out on a stale connection: each request reached the instance once.
    assert_eq!(b.requests.load(Ordering::SeqCst), 20);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pipelined_requests_are_answered_in_order() {
    let b = raw_backend(Arc::new(|head: &str| {
        let path = head.split(' ').nth(1).unwrap_or("").to_string();
        Reply {
            pieces: vec![format!(
                "HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n{path}",
                path.len()
            )
            .into_bytes()],
            close: false,
        }
    }))
    .await;
    let p = start_proxy(config(&b)).await;
    let mut s = TcpStream::connect(p.addr).await.unwrap();
    let all: String = (0..10)
        .map(|i| format!("GET /r{i} HTTP/1.1\r\nHost: x\r\n\r\n"))
        .collect();
    s.write_all(all.as_bytes()).await.unwrap();
    let mut buf = Vec::new();
    for i in 0..10 {
        let (_, body) = read_response(&mut s, &mut buf, false).await;
        assert_eq!(body, format!("/r{i}").as_bytes());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keep_alive_connection_moves_to_the_general_path_for_unusual_requests() {
    let a = Backend::start("a").await;
    let p = start_proxy(service_config(&[&a], "round-robin")).await;
    let mut s = TcpStream::connect(p.addr).await.unwrap();
    let mut buf = Vec::new();
    s.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let (head, body) = read_response(&mut s, &mut buf, false).await;
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    assert_eq!(body, b"a");
    // A chunked upload stays on the fast path, and so does the connection.
    s.write_all(
        b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
    )
    .await
    .unwrap();
    let (head, body) = read_response(&mut s, &mut buf, false).await;
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    assert_eq!(body, b"a");
    assert_eq!(a.body_bytes.load(Ordering::SeqCst), 5);
    assert!(
        !head.to_ascii_lowercase().contains("connection: close"),
        "{head}"
    );
    // An absolute-form target is the general path's: answered on the same connection, which
    // then closes, so every request head on a connection is read raw by the fast path first.
    s.write_all(b"POST http://x/ HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\nhello")
        .await
        .unwrap();
    let (head, body) = read_response(&mut s, &mut buf, false).await;
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    assert_eq!(body, b"a");
    assert_eq!(a.body_bytes.load(Ordering::SeqCst), 10);
    assert!(
        head.to_ascii_lowercase().contains("connection: close"),
        "{head}"
    );
    // And a smuggling shape is refused, never reaching the backend.
    let mut s = TcpStream::connect(p.addr).await.unwrap();
    let resp = {
        s.write_all(
            b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\nab",
        )
        .await
        .unwrap();
        let mut out = std::mem::take(&mut buf);
        let _ = tokio::time::timeout(Duration::from_secs(2), s.read_to_end(&mut out)).await;
        String::from_utf8_lossy(&out).into_owned()
    };
    assert!(resp.starts_with("HTTP/1.1 400"), "{resp}");
    assert_eq!(a.count(), 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn response_cut_short_closes_the_client_connection() {
    let b = raw_backend(Arc::new(|head: &str| {
        if head.starts_with("GET /short") {
            Reply {
                pieces: vec![b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nonly ten..".to_vec()],
                close: true,
            }
        } else {
            reply(&[b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"])
        }
    }))
    .await;
    let p = start_proxy(config(&b)).await;
    let resp = raw(p.addr, b"GET /short HTTP/1.1\r\nHost: x\r\n\r\n").await;
    assert!(resp.starts_with("HTTP/1.1 200"), "{resp}");
    assert!(
        resp.ends_with("only ten.."),
        "closed after the bytes there were: {resp}"
    );
    let cl = client();
    assert_eq!(get(&cl, p.addr, "/").await, (200, "ok".to_string()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn try_timeout_holds_after_fast_requests_on_the_same_connection() {
    let a = Backend::start("a").await;
    let mut cfg = service_config(&[&a], "round-robin");
    cfg.timeouts.per_try = shoal_proxy::config::Dur(Duration::from_millis(300));
    cfg.retries.attempts = 1;
    let p = start_proxy(cfg).await;
    let mut s = TcpStream::connect(p.addr).await.unwrap();
    let mut buf = Vec::new();
    for path in ["/", "/", "/slow?ms=3000", "/"] {
        s.write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").as_bytes())
            .await
            .unwrap();
        let started = std::time::Instant::now();
        let (head, body) = read_response(&mut s, &mut buf, false).await;
        if path == "/" {
            assert!(head.starts_with("HTTP/1.1 200"), "{head}");
            assert_eq!(body, b"a");
        } else {
            assert!(head.starts_with("HTTP/1.1 504"), "{head}");
            assert_eq!(body, b"upstream timed out\n");
            assert!(
                started.elapsed() < Duration::from_secs(2),
                "{:?}",
                started.elapsed()
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stray_bytes_after_a_response_keep_the_connection_out_of_the_pool() {
    // A 204 followed, a moment later, by bytes that belong to no response.
    let b = raw_backend(Arc::new(|head: &str| {
        if head.starts_with("GET /stray") {
            reply(&[
                b"HTTP/1.1 204 No Content\r\n\r\n",
                b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nstale",
            ])
        } else {
            reply(&[b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nfresh"])
        }
    }))
    .await;
    let p = start_proxy(config(&b)).await;
    let mut s = TcpStream::connect(p.addr).await.unwrap();
    let mut buf = Vec::new();
    for i in 0..3 {
        s.write_all(b"GET /stray HTTP/1.1\r\nHost: x\r\n\r\n")
            .await
            .unwrap();
        let (head, _) = read_response(&mut s, &mut buf, false).await;
        assert!(head.starts_with("HTTP/1.1 204"), "{head}");
        // The stray bytes have been sent before the next request goes out.
        eventually(5, || b.replied.load(Ordering::SeqCst) > 2 * i).await;
        s.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            .await
            .unwrap();
        let (head, body) = read_response(&mut s, &mut buf, false).await;
        assert!(head.starts_with("HTTP/1.1 200"), "{head}");
        assert_eq!(body, b"fresh", "a stale response was served");
    }
}
