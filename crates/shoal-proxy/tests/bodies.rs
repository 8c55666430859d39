//! Request bodies streamed on the HTTP/1.1 fast path (chunked, and longer than the replay
//! limit): keep-alive and pipelining after them, trailers, deadlines, instances that fail or
//! answer mid-body, and HTTP/1.0, which keeps its own semantics.

mod common;

use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::*;
use shoal_proxy::config::Dur;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// Reads one response from `s` (`buf` keeps what came after it); `None` once the connection
/// is closed. Chunked bodies are decoded.
async fn response<R: AsyncReadExt + Unpin>(
    s: &mut R,
    buf: &mut Vec<u8>,
) -> Option<(String, Vec<u8>)> {
    async fn fill<R: AsyncReadExt + Unpin>(s: &mut R, buf: &mut Vec<u8>) -> bool {
        let mut chunk = [0u8; 8192];
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
        if !fill(s, buf).await {
            return None;
        }
    };
    let head = String::from_utf8_lossy(&buf[..end]).into_owned();
    buf.drain(..end);
    let lower = head.to_ascii_lowercase();
    let mut body = Vec::new();
    if head.starts_with("HTTP/1.1 1") {
        // Interim: no body.
    } else if lower.contains("transfer-encoding: chunked") {
        loop {
            let line = loop {
                if let Some(i) = buf.windows(2).position(|w| w == b"\r\n") {
                    break i;
                }
                assert!(fill(s, buf).await, "chunked response cut short");
            };
            let size =
                usize::from_str_radix(std::str::from_utf8(&buf[..line]).unwrap(), 16).unwrap();
            while buf.len() < line + 2 + size + 2 {
                assert!(fill(s, buf).await, "chunk cut short");
            }
            body.extend_from_slice(&buf[line + 2..line + 2 + size]);
            buf.drain(..line + 2 + size + 2);
            if size == 0 {
                break;
            }
        }
    } else if let Some(len) = lower.lines().find_map(|l| {
        l.strip_prefix("content-length:")
            .map(|v| v.trim().parse::<usize>().unwrap())
    }) {
        while buf.len() < len {
            assert!(fill(s, buf).await, "body cut short");
        }
        body = buf.drain(..len).collect();
    } else {
        while fill(s, buf).await {}
        body = std::mem::take(buf);
    }
    Some((head, body))
}

/// Whether the peer closes `s` within 3 s (bytes before the close are returned).
async fn closes(s: &mut TcpStream) -> bool {
    let mut rest = Vec::new();
    matches!(
        tokio::time::timeout(Duration::from_secs(3), s.read_to_end(&mut rest)).await,
        Ok(Ok(_))
    )
}

fn status(head: &str) -> u16 {
    head.get(9..12).and_then(|s| s.parse().ok()).unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_pipelined_after_a_chunked_body_are_answered_on_the_same_connection() {
    let a = Backend::start("a").await;
    let p = start_proxy(service_config(&[&a], "round-robin")).await;
    let mut s = TcpStream::connect(p.addr).await.unwrap();
    let mut buf = Vec::new();
    // Body, its end and the next request in one write.
    s.write_all(
        b"POST /up HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n\
          5\r\nhello\r\n6;ext=1\r\n world\r\n0\r\n\r\n\
          GET /next HTTP/1.1\r\nHost: x\r\n\r\n",
    )
    .await
    .unwrap();
    for _ in 0..2 {
        let (head, body) = response(&mut s, &mut buf).await.expect("an answer");
        assert_eq!(status(&head), 200, "{head}");
        assert!(
            !head.to_ascii_lowercase().contains("connection: close"),
            "{head}"
        );
        assert_eq!(body, b"a");
    }
    assert_eq!(a.body_bytes.load(Ordering::SeqCst), 11);
    // A chunked upload sent piece by piece, then a keep-alive request: no reconnect on
    // either side (the upstream connection went back to the pool after the streamed body).
    s.write_all(b"PUT /up HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n")
        .await
        .unwrap();
    for piece in [
        &b"400\r\n"[..],
        &[b'x'; 1024],
        b"\r\n",
        b"3\r\nabc\r\n",
        b"0\r\n",
        b"\r\n",
    ] {
        tokio::time::sleep(Duration::from_millis(20)).await;
        s.write_all(piece).await.unwrap();
    }
    let (head, _) = response(&mut s, &mut buf).await.expect("an answer");
    assert_eq!(status(&head), 200, "{head}");
    s.write_all(b"GET /again HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let (head, _) = response(&mut s, &mut buf).await.expect("an answer");
    assert_eq!(status(&head), 200, "{head}");
    assert_eq!(a.body_bytes.load(Ordering::SeqCst), 11 + 1027);
    assert_eq!(a.count(), 4);
    assert_eq!(a.conns.load(Ordering::SeqCst), 1, "one upstream connection");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_pipelined_after_a_1_mib_body_is_answered() {
    let a = Backend::start("a").await;
    let p = start_proxy(service_config(&[&a], "round-robin")).await;
    let s = TcpStream::connect(p.addr).await.unwrap();
    let (mut rd, mut wr) = s.into_split();
    let mut all = b"POST /big HTTP/1.1\r\nHost: x\r\nContent-Length: 1048576\r\n\r\n".to_vec();
    all.extend(std::iter::repeat_n(b'z', 1 << 20));
    all.extend_from_slice(b"GET /next HTTP/1.1\r\nHost: x\r\n\r\n");
    let writer = tokio::spawn(async move {
        wr.write_all(&all).await.unwrap();
        wr
    });
    let mut buf = Vec::new();
    for _ in 0..2 {
        let (head, body) = response(&mut rd, &mut buf).await.expect("an answer");
        assert_eq!(status(&head), 200, "{head}");
        assert_eq!(body, b"a");
    }
    let _wr = writer.await.unwrap();
    assert_eq!(a.body_bytes.load(Ordering::SeqCst), 1 << 20);
    assert_eq!(a.count(), 2);
    assert_eq!(a.conns.load(Ordering::SeqCst), 1, "one upstream connection");
}

/// An origin that records each request's raw bytes (head and chunked body, up to the end of
/// the trailer section) and answers `ok`.
async fn recording_origin() -> (SocketAddr, Arc<Mutex<Vec<Vec<u8>>>>) {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let seen = Arc::new(Mutex::new(Vec::new()));
    let seen2 = seen.clone();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            let seen = seen2.clone();
            tokio::spawn(async move {
                let mut buf = Vec::new();
                loop {
                    // The head's end, then the body's (`0\r\n`, trailers, empty line).
                    let done = |b: &[u8]| {
                        let h = b.windows(4).position(|w| w == b"\r\n\r\n")?;
                        // From the head's last CRLF, so an empty body's `0` is found too.
                        let body = &b[h + 2..];
                        let z = body.windows(5).position(|w| w == b"\r\n0\r\n")? + 2;
                        let e = body[z..].windows(4).position(|w| w == b"\r\n\r\n")?;
                        Some(h + 2 + z + e + 4)
                    };
                    let end = loop {
                        if let Some(e) = done(&buf) {
                            break e;
                        }
                        let mut chunk = [0u8; 4096];
                        match s.read(&mut chunk).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => buf.extend_from_slice(&chunk[..n]),
                        }
                    };
                    seen.lock().unwrap().push(buf.drain(..end).collect());
                    if s.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
                        .await
                        .is_err()
                    {
                        return;
                    }
                }
            });
        }
    });
    (addr, seen)
}

fn static_config(addr: SocketAddr) -> shoal_proxy::ServiceConfig {
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
async fn chunked_bodies_are_reframed_and_trailers_filtered() {
    let (origin, seen) = recording_origin().await;
    let p = start_proxy(static_config(origin)).await;
    let mut s = TcpStream::connect(p.addr).await.unwrap();
    s.write_all(
        b"POST /t HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nTrailer: Checksum\r\n\r\n\
          5;name=\"v\"\r\nhello\r\n0\r\nChecksum: abc\r\nHost: evil\r\nContent-Length: 9\r\n\
          Transfer-Encoding: chunked\r\nAuthorization: x\r\n\r\n\
          GET /after HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
    )
    .await
    .unwrap();
    let mut buf = Vec::new();
    for _ in 0..2 {
        let (head, body) = response(&mut s, &mut buf).await.expect("an answer");
        assert_eq!(status(&head), 200, "{head}");
        assert_eq!(body, b"ok");
    }
    let seen = seen.lock().unwrap().clone();
    assert_eq!(seen.len(), 2);
    let first = String::from_utf8_lossy(&seen[0]).into_owned();
    let (head, body) = first.split_once("\r\n\r\n").unwrap();
    let head = head.to_ascii_lowercase();
    assert_eq!(
        head.matches("transfer-encoding: chunked").count(),
        1,
        "{head}"
    );
    assert!(
        !head.contains("trailer:") && !head.contains("content-length"),
        "{head}"
    );
    // Extensions dropped; only the harmless trailer field goes on.
    assert_eq!(body, "5\r\nhello\r\n0\r\nChecksum: abc\r\n\r\n");
    let second = String::from_utf8_lossy(&seen[1]).into_owned();
    assert!(second.starts_with("GET /after HTTP/1.1\r\n"), "{second}");
    assert!(second.ends_with("\r\n\r\n0\r\n\r\n"), "{second}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_chunked_body_gets_408_and_harms_no_one_else() {
    let a = Backend::start("a").await;
    let mut cfg = service_config(&[&a], "round-robin");
    cfg.timeouts.body_read = Dur(Duration::from_millis(400));
    let p = start_proxy(cfg).await;
    let mut slow = TcpStream::connect(p.addr).await.unwrap();
    slow.write_all(b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhel")
        .await
        .unwrap();
    let start = std::time::Instant::now();
    // Meanwhile other clients are served.
    let cl = client();
    for _ in 0..5 {
        assert_eq!(get(&cl, p.addr, "/").await.0, 200);
    }
    let mut buf = Vec::new();
    let (head, _) = response(&mut slow, &mut buf).await.expect("an answer");
    assert_eq!(status(&head), 408, "{head}");
    assert!(
        head.to_ascii_lowercase().contains("connection: close"),
        "{head}"
    );
    assert!(start.elapsed() < Duration::from_secs(3));
    assert!(closes(&mut slow).await, "connection left open");
    let inst = &p.service.pool.members()[0];
    eventually(3, || inst.in_flight() == 0).await;
    let errors: u64 = inst.metrics.errors.iter().map(|c| c.get()).sum();
    assert_eq!(errors, 0, "the client's pause counted against the instance");
    assert!(p.service.metrics.client_errors.get() >= 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broken_chunked_bodies_are_400_and_never_complete_upstream() {
    let (origin, seen) = recording_origin().await;
    let p = start_proxy(static_config(origin)).await;
    for body in [
        &b"0x5\r\nhello\r\n0\r\n\r\n"[..],
        b"+5\r\nhello\r\n0\r\n\r\n",
        b"5\r\nhelloo\r\n0\r\n\r\n",
        b"5\nhello\r\n0\r\n\r\n",
        b"5\r\nhello\r\n0\r\n\n",
        b"fffffffffffffffffff\r\n",
        b"5\r\nhello\r\n0\r\nBad Field\r\n\r\n",
    ] {
        let mut s = TcpStream::connect(p.addr).await.unwrap();
        let mut req = b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n".to_vec();
        req.extend_from_slice(body);
        req.extend_from_slice(b"GET /smuggled HTTP/1.1\r\nHost: x\r\n\r\n");
        s.write_all(&req).await.unwrap();
        let mut buf = Vec::new();
        let (head, _) = response(&mut s, &mut buf).await.expect("an answer");
        assert_eq!(
            status(&head),
            400,
            "{}: {head}",
            String::from_utf8_lossy(body)
        );
        assert!(closes(&mut s).await);
        assert!(
            buf.is_empty(),
            "a second answer: {}",
            String::from_utf8_lossy(&buf)
        );
    }
    // Framing in the head that could be read two ways is refused before any body.
    for head in [
        "Transfer-Encoding: chunked\r\nContent-Length: 5",
        "Content-Length: 5\r\nTransfer-Encoding: chunked",
        "Transfer-Encoding: chunked, identity",
        "Transfer-Encoding: identity, chunked",
        "Transfer-Encoding: chunked\r\nTransfer-Encoding: chunked",
        "Transfer-Encoding: xchunked",
        "Transfer-Encoding: chunked\x0b",
        "Transfer-Encoding : chunked",
        " Transfer-Encoding: chunked",
    ] {
        let mut s = TcpStream::connect(p.addr).await.unwrap();
        let req = format!(
            "POST / HTTP/1.1\r\nHost: x\r\n{head}\r\n\r\n5\r\nhello\r\n0\r\n\r\n\
             GET /smuggled HTTP/1.1\r\nHost: x\r\n\r\n"
        );
        s.write_all(req.as_bytes()).await.unwrap();
        let mut buf = Vec::new();
        let (h, _) = response(&mut s, &mut buf).await.expect("an answer");
        assert_eq!(status(&h), 400, "{head:?}: {h}");
        assert!(closes(&mut s).await, "{head:?}");
        assert!(
            buf.is_empty(),
            "{head:?}: {}",
            String::from_utf8_lossy(&buf)
        );
    }
    assert!(
        seen.lock().unwrap().is_empty(),
        "a complete request reached the origin"
    );
    let inst = &p.service.pool.members()[0];
    let errors: u64 = inst.metrics.errors.iter().map(|c| c.get()).sum();
    assert_eq!(errors, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_1_0_bodies_keep_http_1_0_semantics() {
    let a = Backend::start("a").await;
    let p = start_proxy(service_config(&[&a], "round-robin")).await;
    // Answered, then closed (no keep-alive asked for).
    let mut s = TcpStream::connect(p.addr).await.unwrap();
    s.write_all(b"POST / HTTP/1.0\r\nContent-Length: 5\r\n\r\nhello")
        .await
        .unwrap();
    let mut buf = Vec::new();
    let (head, body) = response(&mut s, &mut buf).await.expect("an answer");
    assert!(
        head.starts_with("HTTP/1.0 200") || head.starts_with("HTTP/1.1 200"),
        "{head}"
    );
    assert_eq!(body, b"a");
    assert!(closes(&mut s).await, "HTTP/1.0 connection kept open");
    assert_eq!(a.body_bytes.load(Ordering::SeqCst), 5);
    // HTTP/1.0 has no chunked coding.
    let mut s = TcpStream::connect(p.addr).await.unwrap();
    s.write_all(b"POST / HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n")
        .await
        .unwrap();
    let (head, _) = response(&mut s, &mut Vec::new()).await.expect("an answer");
    assert_eq!(status(&head), 400, "{head}");
    assert_eq!(a.count(), 1);
}

/// An origin that reads a request head and then does `then` with the socket.
async fn origin<F, Fut>(then: F) -> SocketAddr
where
    F: Fn(TcpStream) -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let then = Arc::new(then);
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            let then = then.clone();
            tokio::spawn(async move {
                let mut head = Vec::new();
                let mut b = [0u8; 1];
                while !head.ends_with(b"\r\n\r\n") {
                    match s.read(&mut b).await {
                        Ok(0) | Err(_) => return,
                        Ok(_) => head.push(b[0]),
                    }
                }
                then(s).await;
            });
        }
    });
    addr
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_instance_failing_mid_body_is_502_and_the_connection_closes() {
    // The instance takes a little of the body and goes away.
    let up = origin(|mut s| async move {
        let mut b = [0u8; 16];
        let _ = s.read(&mut b).await;
    })
    .await;
    let p = start_proxy(static_config(up)).await;
    for head in [
        &b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n400\r\n"[..],
        b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 1000000\r\n\r\n",
    ] {
        let mut s = TcpStream::connect(p.addr).await.unwrap();
        s.write_all(head).await.unwrap();
        s.write_all(&[b'x'; 512]).await.unwrap();
        // The rest of the body never comes: the answer must not wait for it.
        let mut buf = Vec::new();
        let (h, _) = response(&mut s, &mut buf).await.expect("an answer");
        assert_eq!(status(&h), 502, "{h}");
        assert!(h.to_ascii_lowercase().contains("connection: close"), "{h}");
        assert!(closes(&mut s).await, "connection left open");
    }
    let inst = &p.service.pool.members()[0];
    eventually(3, || inst.in_flight() == 0).await;
    let errors: u64 = inst.metrics.errors.iter().map(|c| c.get()).sum();
    assert_eq!(errors, 2, "the instance's failures are counted");
    assert!(inst.idle.is_empty(), "a broken connection pooled");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_answer_before_the_body_ends_is_relayed_and_both_sides_close() {
    // The instance refuses at once, without reading the body.
    let up = origin(|mut s| async move {
        let _ = s
            .write_all(b"HTTP/1.1 413 Payload Too Large\r\nContent-Length: 4\r\n\r\nbig!")
            .await;
        tokio::time::sleep(Duration::from_secs(10)).await;
    })
    .await;
    let p = start_proxy(static_config(up)).await;
    let s = TcpStream::connect(p.addr).await.unwrap();
    let (mut rd, mut wr) = s.into_split();
    let mut all = b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 4194304\r\n\r\n".to_vec();
    all.extend(std::iter::repeat_n(b'z', 4 << 20));
    tokio::spawn(async move {
        let _ = wr.write_all(&all).await;
        wr
    });
    let mut buf = Vec::new();
    let (h, body) = response(&mut rd, &mut buf).await.expect("an answer");
    assert_eq!(status(&h), 413, "{h}");
    assert!(h.to_ascii_lowercase().contains("connection: close"), "{h}");
    assert_eq!(body, b"big!");
    let mut rest = Vec::new();
    let closed = tokio::time::timeout(Duration::from_secs(3), rd.read_to_end(&mut rest)).await;
    assert!(closed.is_ok(), "connection left open");
    let inst = &p.service.pool.members()[0];
    eventually(3, || inst.in_flight() == 0).await;
    assert!(
        inst.idle.is_empty(),
        "a connection with half a request pooled"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expect_100_continue_is_met_and_the_connection_kept() {
    let a = Backend::start("a").await;
    let p = start_proxy(service_config(&[&a], "round-robin")).await;
    let mut s = TcpStream::connect(p.addr).await.unwrap();
    let mut buf = Vec::new();
    // As curl sends an upload: the head, then the body only after `100 Continue`.
    for (head, body) in [
        (
            &b"PUT /h HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\nContent-Length: 200000\r\n\r\n"[..],
            vec![b'y'; 200_000],
        ),
        (
            b"POST /h HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\nContent-Length: 5\r\n\r\n",
            b"hello".to_vec(),
        ),
        (
            b"POST /h HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\nTransfer-Encoding: chunked\r\n\r\n",
            b"5\r\nhello\r\n0\r\n\r\n".to_vec(),
        ),
    ] {
        s.write_all(head).await.unwrap();
        let (h, _) = response(&mut s, &mut buf).await.expect("an answer");
        assert!(h.starts_with("HTTP/1.1 100 Continue\r\n"), "{h}");
        s.write_all(&body).await.unwrap();
        let (h, b) = response(&mut s, &mut buf).await.expect("an answer");
        assert_eq!(status(&h), 200, "{h}");
        assert_eq!(b, b"a");
        // Met by shoal: the instance is not asked again.
        let seen = a.last.lock().unwrap().to_ascii_lowercase();
        assert!(seen.starts_with("put /h") || seen.starts_with("post /h"), "{seen}");
        assert!(!seen.contains("expect"), "{seen}");
    }
    s.write_all(b"GET /headers HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let (h, _) = response(&mut s, &mut buf).await.expect("an answer");
    assert_eq!(status(&h), 200, "{h}");
    assert_eq!(a.body_bytes.load(Ordering::SeqCst), 200_010);
    assert_eq!(a.conns.load(Ordering::SeqCst), 1);
}

/// A job sink that takes bodies up to 1 KiB and records what it was given.
struct Sink(Mutex<Vec<bytes::Bytes>>);

impl shoal_proxy::jobs::JobSink for Sink {
    fn max_body(&self) -> usize {
        1024
    }
    fn submit(
        &self,
        req: shoal_proxy::jobs::JobRequest,
        _key: Option<String>,
    ) -> shoal_proxy::jobs::BoxFuture<'_, http::Response<bytes::Bytes>> {
        self.0.lock().unwrap().push(req.body);
        Box::pin(async {
            let mut r = http::Response::new(bytes::Bytes::new());
            *r.status_mut() = http::StatusCode::ACCEPTED;
            r
        })
    }
    fn lookup(&self, _id: &str) -> shoal_proxy::jobs::BoxFuture<'_, http::Response<bytes::Bytes>> {
        Box::pin(async { http::Response::new(bytes::Bytes::new()) })
    }
}

struct Jobs(Arc<Sink>);

impl shoal_proxy::jobs::Jobs for Jobs {
    fn sink(
        &self,
        _route: &shoal_proxy::config::RouteConfig,
        _jobs_path: &str,
    ) -> Option<Arc<dyn shoal_proxy::jobs::JobSink>> {
        Some(self.0.clone())
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversize_bodies_on_an_async_route_are_413_and_never_submitted() {
    let a = Backend::start("a").await;
    let sink = Arc::new(Sink(Mutex::new(Vec::new())));
    let app = shoal_proxy::App::new(None, None);
    app.set_jobs(Arc::new(Jobs(sink.clone())));
    let text = format!(
        "[services.web]\nlisten = \"127.0.0.1:0\"\nbackends = [\"{}\"]\n\n\
         [[services.web.routes]]\nprefix = \"/async\"\n\n[services.web.routes.async]\n\n\
         [[services.web.routes]]\nprefix = \"/\"\n",
        a.addr
    );
    let cfg = shoal_proxy::Config::parse(std::path::Path::new("t.toml"), &text).unwrap();
    app.start(&cfg).await.unwrap();
    let addr = app.listen_addr("web").unwrap();
    let big = "x".repeat(2000);
    for (req, want) in [
        (
            format!(
                "POST /async HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n7d0\r\n{big}\r\n0\r\n\r\n"
            ),
            413,
        ),
        (
            format!("POST /async HTTP/1.1\r\nHost: x\r\nContent-Length: 2000\r\n\r\n{big}"),
            413,
        ),
        (
            "POST /async HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n"
                .to_string(),
            202,
        ),
    ] {
        let mut s = TcpStream::connect(addr).await.unwrap();
        s.write_all(req.as_bytes()).await.unwrap();
        let (h, _) = response(&mut s, &mut Vec::new()).await.expect("an answer");
        assert_eq!(status(&h), want, "{req:.60}: {h}");
    }
    assert_eq!(
        *sink.0.lock().unwrap(),
        vec![bytes::Bytes::from_static(b"hello")]
    );
    assert_eq!(a.count(), 0, "an async route's request reached an instance");
}
