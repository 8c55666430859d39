//! The cache phase end to end: a scripted origin behind a real proxy, both request paths.

mod common;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use common::*;
use http_body_util::{Either, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use serde_json::json;
use shoal_proxy::shoal_cache::{CacheConfig, CacheStore, PolicyConfig};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// An origin whose answers depend on the path: `/fresh` (max-age=60, ETag), `/slow` (the
/// same after 300 ms), `/private` (no-store), `/tagged` (Surrogate-Key), `/chunked` (30
/// bytes in 3 chunks after 200 ms) and `/chunked-big` (1.5 MiB in 3 chunks), both without a
/// length. Counts requests.
struct Origin {
    addr: SocketAddr,
    calls: AtomicUsize,
}

/// A body of known frames and no declared length: hyper sends it chunked.
struct Chunks(std::collections::VecDeque<Bytes>);

impl hyper::body::Body for Chunks {
    type Data = Bytes;
    type Error = Infallible;
    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<hyper::body::Frame<Bytes>, Infallible>>> {
        std::task::Poll::Ready(self.0.pop_front().map(|b| Ok(hyper::body::Frame::data(b))))
    }
}

async fn origin() -> Arc<Origin> {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let o = Arc::new(Origin {
        addr: l.local_addr().unwrap(),
        calls: AtomicUsize::new(0),
    });
    let o2 = o.clone();
    tokio::spawn(async move {
        loop {
            let (s, _) = l.accept().await.unwrap();
            let o = o2.clone();
            tokio::spawn(async move {
                let svc = service_fn(move |req: Request<Incoming>| {
                    let o = o.clone();
                    async move {
                        let n = o.calls.fetch_add(1, Ordering::SeqCst);
                        let path = req.uri().path().to_string();
                        let mut r = Response::builder();
                        let chunks = |n: usize, size: usize| {
                            let parts = (0..n).map(|i| Bytes::from(vec![b'a' + i as u8; size]));
                            Either::Right(Chunks(parts.collect()))
                        };
                        let body = match path.as_str() {
                            "/chunked" => {
                                tokio::time::sleep(Duration::from_millis(200)).await;
                                let r = r.header("cache-control", "max-age=60");
                                return Ok(r.body(chunks(3, 10)).unwrap());
                            }
                            "/chunked-big" => {
                                let r = r.header("cache-control", "max-age=60");
                                return Ok(r.body(chunks(3, 512 << 10)).unwrap());
                            }
                            "/slow" => {
                                tokio::time::sleep(Duration::from_millis(300)).await;
                                r = r.header("cache-control", "max-age=60");
                                format!("slow {n}")
                            }
                            "/private" => {
                                tokio::time::sleep(Duration::from_millis(50)).await;
                                r = r.header("cache-control", "no-store");
                                format!("private {n}")
                            }
                            "/tagged" => {
                                r = r
                                    .header("cache-control", "max-age=60")
                                    .header("surrogate-key", "t1");
                                format!("tagged {n}")
                            }
                            _ => {
                                r = r
                                    .header("cache-control", "max-age=60")
                                    .header("etag", "\"e1\"");
                                format!("fresh {n}")
                            }
                        };
                        Ok::<_, Infallible>(
                            r.body(Either::Left(Full::new(Bytes::from(body)))).unwrap(),
                        )
                    }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(s), svc)
                    .await;
            });
        }
    });
    o
}

async fn cached_proxy(o: &Origin) -> Proxy {
    let mut cfg = shoal_proxy::config::ServiceConfig::quick(
        "test",
        "127.0.0.1:0".parse().unwrap(),
        "round-robin".parse().unwrap(),
    );
    cfg.backends.push(shoal_proxy::config::BackendSpec {
        addr: o.addr,
        weight: 1,
    });
    cfg.cache = Some(CacheConfig::default());
    let app = shoal_proxy::App::new(None, Some("secret".into()));
    app.set_cache_store(CacheStore::new(16 << 20, None, &PolicyConfig::default()).unwrap());
    let service = app.start_service(cfg).await.unwrap();
    let addr = app.listen_addr("test").unwrap();
    Proxy { app, service, addr }
}

/// One request on a fresh connection; the whole response as text.
async fn exchange(addr: SocketAddr, req: &str) -> String {
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(req.as_bytes()).await.unwrap();
    let mut out = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(3), s.read_to_end(&mut out)).await;
    String::from_utf8_lossy(&out).into_owned()
}

fn header<'a>(resp: &'a str, name: &str) -> Option<&'a str> {
    resp.lines()
        .take_while(|l| !l.is_empty())
        .find_map(|l| {
            l.split_once(':')
                .filter(|(n, _)| n.eq_ignore_ascii_case(name))
        })
        .map(|(_, v)| v.trim())
}

#[tokio::test]
async fn fresh_hits_are_served_from_cache_on_both_paths() {
    let o = origin().await;
    let p = cached_proxy(&o).await;
    let get = "GET /fresh HTTP/1.1\r\nHost: site.test\r\nConnection: close\r\n\r\n";
    let miss = exchange(p.addr, get).await;
    assert!(miss.starts_with("HTTP/1.1 200"), "{miss}");
    assert!(
        header(&miss, "cache-status")
            .unwrap()
            .contains("fwd=uri-miss"),
        "{miss}"
    );
    // Fast path (plain HTTP/1.1 GET).
    let hit = exchange(p.addr, get).await;
    assert!(hit.ends_with("fresh 0"), "{hit}");
    assert!(
        header(&hit, "cache-status")
            .unwrap()
            .starts_with("shoal; hit"),
        "{hit}"
    );
    assert_eq!(header(&hit, "content-length"), Some("7"));
    assert!(header(&hit, "age").is_some());
    // General path (HTTP/1.0 is handed over) answers from the same object.
    let hit10 = exchange(p.addr, "GET /fresh HTTP/1.0\r\nHost: site.test\r\n\r\n").await;
    assert!(hit10.ends_with("fresh 0"), "{hit10}");
    // A client validator gets a 304 from cache.
    let nm = exchange(
        p.addr,
        "GET /fresh HTTP/1.1\r\nHost: site.test\r\nIf-None-Match: \"e1\"\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert!(nm.starts_with("HTTP/1.1 304"), "{nm}");
    assert_eq!(o.calls.load(Ordering::SeqCst), 1);
    let m = p.app.render_metrics();
    assert!(
        m.contains("shoal_cache_requests_total{service=\"test\",result=\"hit\"} 3"),
        "{m}"
    );
    assert!(
        m.contains("shoal_cache_requests_total{service=\"test\",result=\"miss\"} 1"),
        "{m}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_cold_requests_make_one_origin_request_and_uncacheable_ones_do_not_wait() {
    let o = origin().await;
    let p = cached_proxy(&o).await;
    let c = client();
    let run = |path: &'static str, n: usize| {
        let c = c.clone();
        let addr = p.addr;
        async move {
            let tasks: Vec<_> = (0..n)
                .map(|_| {
                    let c = c.clone();
                    tokio::spawn(async move { get(&c, addr, path).await })
                })
                .collect();
            let mut out = Vec::new();
            for t in tasks {
                out.push(t.await.unwrap());
            }
            out
        }
    };
    let answers = run("/slow", 100).await;
    assert!(
        answers.iter().all(|(s, b)| *s == 200 && b == "slow 0"),
        "{answers:?}"
    );
    assert_eq!(o.calls.load(Ordering::SeqCst), 1);
    // Uncacheable: the first answer releases everyone; all 100 reach the origin.
    let before = o.calls.load(Ordering::SeqCst);
    let started = std::time::Instant::now();
    let answers = run("/private", 100).await;
    assert!(answers.iter().all(|(s, _)| *s == 200));
    assert_eq!(o.calls.load(Ordering::SeqCst) - before, 100);
    // Serialised, 100 × 50 ms would take 5 s.
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "{:?}",
        started.elapsed()
    );
}

#[tokio::test]
async fn purge_by_url_and_surrogate_key_through_the_app() {
    let o = origin().await;
    let p = cached_proxy(&o).await;
    let c = client();
    for path in ["/fresh", "/tagged", "/fresh", "/tagged"] {
        let (s, _) = get_with(&c, p.addr, path, &[("host", "site.test")]).await;
        assert_eq!(s, 200);
    }
    assert_eq!(o.calls.load(Ordering::SeqCst), 2);
    let r = p
        .app
        .cache_purge(&json!({ "url": "http://site.test/fresh" }))
        .await
        .unwrap();
    assert_eq!(r["purged"], 1);
    let r = p
        .app
        .cache_purge(&json!({ "surrogate_key": "t1" }))
        .await
        .unwrap();
    assert_eq!(r["purged"], 1);
    for path in ["/fresh", "/tagged"] {
        get_with(&c, p.addr, path, &[("host", "site.test")]).await;
    }
    assert_eq!(o.calls.load(Ordering::SeqCst), 4);
    assert_eq!(p.app.cache_purge(&json!({})).await.unwrap_err().0, 400);
    let status = p.app.cache_status().unwrap();
    assert_eq!(status["requests"]["test"]["hit"], 2);
    let _ = p.service;
}

const SITE: &[(&str, &str)] = &[("host", "site.test")];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rfc9112_7_1_chunked_responses_are_stored_within_the_object_limit() {
    let o = origin().await;
    let p = cached_proxy(&o).await;
    let c = client();
    let want = format!("{}{}{}", "a".repeat(10), "b".repeat(10), "c".repeat(10));
    // Concurrent misses wait for the one chunked fetch and get the stored object.
    let tasks: Vec<_> = (0..20)
        .map(|_| {
            let c = c.clone();
            let addr = p.addr;
            tokio::spawn(async move { get_with(&c, addr, "/chunked", SITE).await })
        })
        .collect();
    for t in tasks {
        assert_eq!(t.await.unwrap(), (200, want.clone()));
    }
    assert_eq!(o.calls.load(Ordering::SeqCst), 1);
    // Stored with a length: the fast path answers it.
    let hit = exchange(
        p.addr,
        "GET /chunked HTTP/1.1\r\nHost: site.test\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert!(hit.ends_with(&want), "{hit}");
    assert_eq!(header(&hit, "content-length"), Some("30"), "{hit}");
    assert!(header(&hit, "transfer-encoding").is_none(), "{hit}");
    assert_eq!(o.calls.load(Ordering::SeqCst), 1);

    // Past max_object_size (1 MiB): streamed whole to the client, copy given up, not stored.
    for round in 1..=2 {
        let (s, body) = get_with(&c, p.addr, "/chunked-big", SITE).await;
        assert_eq!((s, body.len()), (200, 3 * (512 << 10)));
        assert!(body.ends_with('c'));
        assert_eq!(o.calls.load(Ordering::SeqCst), 1 + round);
    }
    assert!(p.app.cache_store().unwrap().stats().too_large >= 1);
}

/// Reads from `s` until `rest` holds `want` bytes.
async fn fill(s: &mut TcpStream, rest: &mut Vec<u8>, want: usize) {
    while rest.len() < want {
        let mut chunk = [0u8; 65536];
        let n = s.read(&mut chunk).await.unwrap();
        assert!(n > 0, "closed mid-body");
        rest.extend_from_slice(&chunk[..n]);
    }
}

/// Reads one response off a kept-alive connection: (head, decoded body). Handles
/// Content-Length and chunked bodies, and HEAD (no body).
async fn read_response(s: &mut TcpStream, head_request: bool) -> (String, Vec<u8>) {
    let mut buf = Vec::new();
    let head_end = loop {
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
        let mut chunk = [0u8; 4096];
        let n = s.read(&mut chunk).await.unwrap();
        assert!(
            n > 0,
            "closed before a head: {:?}",
            String::from_utf8_lossy(&buf)
        );
        buf.extend_from_slice(&chunk[..n]);
    };
    let head = String::from_utf8_lossy(&buf[..head_end]).into_owned();
    let mut rest = buf[head_end..].to_vec();
    let status: u16 = head[9..12].parse().unwrap();
    if head_request || status == 304 || status == 204 {
        return (head, rest);
    }
    if let Some(n) = header(&head, "content-length") {
        let n: usize = n.parse().unwrap();
        fill(s, &mut rest, n).await;
        assert_eq!(rest.len(), n, "bytes past the body");
        return (head, rest);
    }
    assert_eq!(
        header(&head, "transfer-encoding"),
        Some("chunked"),
        "{head}"
    );
    let mut body = Vec::new();
    loop {
        let line_end = loop {
            if let Some(i) = rest.windows(2).position(|w| w == b"\r\n") {
                break i;
            }
            let want = rest.len() + 1;
            fill(s, &mut rest, want).await;
        };
        let size =
            usize::from_str_radix(std::str::from_utf8(&rest[..line_end]).unwrap(), 16).unwrap();
        fill(s, &mut rest, line_end + 2 + size + 2).await;
        body.extend_from_slice(&rest[line_end + 2..line_end + 2 + size]);
        rest.drain(..line_end + 2 + size + 2);
        if size == 0 {
            assert!(rest.is_empty(), "bytes past the body");
            return (head, body);
        }
    }
}

#[tokio::test]
async fn misses_validation_and_unsafe_methods_keep_the_client_connection() {
    let o = origin().await;
    let p = cached_proxy(&o).await;
    let mut s = TcpStream::connect(p.addr).await.unwrap();
    let mut send = async |req: &str, head: bool| {
        s.write_all(req.as_bytes()).await.unwrap();
        read_response(&mut s, head).await
    };
    let get = |path: &str| format!("GET {path} HTTP/1.1\r\nHost: site.test\r\n\r\n");
    // Miss (general phases), then a fast hit, on one connection.
    let (h, b) = send(&get("/fresh"), false).await;
    assert!(
        header(&h, "cache-status").unwrap().contains("fwd=uri-miss"),
        "{h}"
    );
    assert_eq!(b, b"fresh 0");
    assert!(header(&h, "connection").is_none(), "{h}");
    let (h, b) = send(&get("/fresh"), false).await;
    assert!(
        header(&h, "cache-status")
            .unwrap()
            .starts_with("shoal; hit"),
        "{h}"
    );
    assert_eq!(b, b"fresh 0");
    // A client-forced validation, an uncacheable pass, a HEAD and a chunked miss past the
    // object limit (relayed chunked) all keep the connection too.
    let (h, _) = send(
        "GET /fresh HTTP/1.1\r\nHost: site.test\r\nCache-Control: no-cache\r\n\r\n",
        false,
    )
    .await;
    assert!(h.starts_with("HTTP/1.1 200"), "{h}");
    let (h, b) = send(&get("/private"), false).await;
    assert!(h.starts_with("HTTP/1.1 200"), "{h}");
    assert!(b.starts_with(b"private"));
    let (h, b) = send("HEAD /tagged HTTP/1.1\r\nHost: site.test\r\n\r\n", true).await;
    assert!(h.starts_with("HTTP/1.1 200") && b.is_empty(), "{h}");
    let (h, b) = send(&get("/chunked-big"), false).await;
    assert!(h.starts_with("HTTP/1.1 200"), "{h}");
    assert_eq!(b.len(), 3 * (512 << 10));
    // An unsafe method invalidates the URL; the next GET goes to the origin.
    let before = o.calls.load(Ordering::SeqCst);
    let (h, _) = send(
        "POST /fresh HTTP/1.1\r\nHost: site.test\r\nContent-Length: 3\r\n\r\nabc",
        false,
    )
    .await;
    assert!(h.starts_with("HTTP/1.1 200"), "{h}");
    let (h, _) = send(&get("/fresh"), false).await;
    assert!(
        header(&h, "cache-status").unwrap().contains("fwd=uri-miss"),
        "{h}"
    );
    assert_eq!(o.calls.load(Ordering::SeqCst), before + 2);
    // Connection: close from the client is honoured.
    let (h, _) = send(
        "GET /private HTTP/1.1\r\nHost: site.test\r\nConnection: close\r\n\r\n",
        false,
    )
    .await;
    assert_eq!(header(&h, "connection"), Some("close"), "{h}");
    let mut rest = Vec::new();
    s.read_to_end(&mut rest).await.unwrap();
    assert!(rest.is_empty());
}

#[tokio::test]
async fn past_the_fill_budget_responses_stream_through_uncached_on_both_paths() {
    let o = origin().await;
    let p = cached_proxy(&o).await;
    let store = p.app.cache_store().unwrap();
    // Less than one response body: nothing can be read for storing.
    store.set_fill_limit(4);
    for (i, version) in ["1.1", "1.0", "1.1"].iter().enumerate() {
        for path in ["/fresh", "/chunked"] {
            let r = exchange(
                p.addr,
                &format!(
                    "GET {path}?{i} HTTP/{version}\r\nHost: site.test\r\nConnection: close\r\n\r\n"
                ),
            )
            .await;
            assert!(r.starts_with(&format!("HTTP/{version} 200")), "{r}");
        }
    }
    assert_eq!(store.fill_bytes(), 0, "every reservation was given back");
    assert!(store.fill_exhausted() >= 6, "{}", store.fill_exhausted());
    let calls = o.calls.load(Ordering::SeqCst);
    let again = exchange(
        p.addr,
        "GET /fresh?0 HTTP/1.1\r\nHost: site.test\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert!(
        again.ends_with(&format!("fresh {calls}")),
        "not stored: {again}"
    );
    // The budget is not a property of the URL: with room again, the same URL is stored.
    store.set_fill_limit(1 << 20);
    let stored = exchange(
        p.addr,
        "GET /fresh?0 HTTP/1.1\r\nHost: site.test\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert!(stored.starts_with("HTTP/1.1 200"), "{stored}");
    let hit = exchange(
        p.addr,
        "GET /fresh?0 HTTP/1.1\r\nHost: site.test\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert!(
        header(&hit, "cache-status").unwrap().contains("; hit"),
        "{hit}"
    );
    assert_eq!(store.fill_bytes(), 0);
}
