//! What a shared cache must never do, through the real binary, on both request paths (the
//! HTTP/1.1 fast path, and the general path that HTTP/1.0 requests take): replay one
//! client's cookie to another, answer one service's URL with another service's body, turn a
//! 304 with a new validator into an error, ignore the query string, let a client's
//! `stale-if-error` loosen `must-revalidate`, or forward headers that rewrite what an origin
//! serves without being in the key.

mod common;

use std::collections::HashMap;
use std::convert::Infallible;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use common::*;
use http_body_util::Full;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;

/// A scripted origin on its own runtime (stopped on drop). It names itself in every body,
/// counts requests per path and keeps the headers of the last request per path.
struct Origin {
    addr: SocketAddr,
    calls: Arc<Mutex<HashMap<String, usize>>>,
    seen: Arc<Mutex<HashMap<String, http::HeaderMap>>>,
    failing: Arc<AtomicBool>,
    _rt: tokio::runtime::Runtime,
}

impl Origin {
    fn calls(&self, path: &str) -> usize {
        self.calls.lock().unwrap().get(path).copied().unwrap_or(0)
    }
}

fn origin(name: &'static str) -> Origin {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let listener = rt
        .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
        .unwrap();
    let addr = listener.local_addr().unwrap();
    let calls = Arc::new(Mutex::new(HashMap::<String, usize>::new()));
    let seen = Arc::new(Mutex::new(HashMap::new()));
    let failing = Arc::new(AtomicBool::new(false));
    let (c, s, f) = (calls.clone(), seen.clone(), failing.clone());
    rt.spawn(async move {
        loop {
            let Ok((sock, _)) = listener.accept().await else {
                continue;
            };
            let (c, s, f) = (c.clone(), s.clone(), f.clone());
            tokio::spawn(async move {
                let svc = service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
                    let path = req.uri().path().to_string();
                    let n = {
                        let mut calls = c.lock().unwrap();
                        let e = calls.entry(path.clone()).or_default();
                        *e += 1;
                        *e - 1
                    };
                    s.lock()
                        .unwrap()
                        .insert(path.clone(), req.headers().clone());
                    let b = hyper::Response::builder();
                    let resp = if f.load(Ordering::SeqCst) {
                        b.status(500).body(format!("{name} failing"))
                    } else {
                        match path.as_str() {
                            "/cookie" => b
                                .header("cache-control", "max-age=60")
                                .header("set-cookie", format!("sid=secret{n}; HttpOnly"))
                                .body(format!("{name} cookie {n}")),
                            // Full answers are "v1"; validations answer 304 with a new tag.
                            "/etag" if req.headers().contains_key("if-none-match") => b
                                .status(304)
                                .header("etag", "\"v2\"")
                                .header("cache-control", "max-age=0")
                                .body(String::new()),
                            "/etag" => b
                                .header("etag", "\"v1\"")
                                .header("cache-control", "max-age=0")
                                .body(format!("{name} v1")),
                            "/mr" => b
                                .header("cache-control", "max-age=0, must-revalidate")
                                .header("etag", "\"mr\"")
                                .body(format!("{name} mr")),
                            "/sie" => b
                                .header("cache-control", "max-age=0, stale-if-error=600")
                                .header("etag", "\"sie\"")
                                .body(format!("{name} sie")),
                            "/cdn" => b
                                .header("cache-control", "no-store")
                                .header("cdn-cache-control", "max-age=60")
                                .body(format!("{name} cdn {n}")),
                            _ => b.header("cache-control", "max-age=60").body(format!(
                                "{name} {} {n}",
                                req.uri().path_and_query().map_or("", |p| p.as_str())
                            )),
                        }
                    }
                    .unwrap()
                    .map(|b| Full::new(Bytes::from(b)));
                    async move { Ok::<_, Infallible>(resp) }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(sock), svc)
                    .await;
            });
        }
    });
    Origin {
        addr,
        calls,
        seen,
        failing,
        _rt: rt,
    }
}

/// One request on a new connection with `version` ("1.1": the fast path, "1.0": the general
/// path); the raw response.
fn raw(port: u16, version: &str, path: &str, headers: &[(&str, &str)]) -> String {
    let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    let mut req = format!("GET {path} HTTP/{version}\r\nConnection: close\r\n");
    if !headers.iter().any(|(k, _)| k.eq_ignore_ascii_case("host")) {
        req.push_str(&format!("Host: 127.0.0.1:{port}\r\n"));
    }
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    req.push_str("\r\n");
    s.write_all(req.as_bytes()).unwrap();
    let mut out = String::new();
    let _ = s.read_to_string(&mut out);
    out
}

fn status(resp: &str) -> u16 {
    resp.get(9..12).and_then(|c| c.parse().ok()).unwrap_or(0)
}

fn body(resp: &str) -> &str {
    resp.split_once("\r\n\r\n").map_or("", |(_, b)| b)
}

/// Two cached services on one shoal (one `[cache]` store), each in front of its own origin.
struct Two {
    a: u16,
    b: u16,
    oa: Origin,
    ob: Origin,
    _shoal: Proc,
    _dir: tempfile::TempDir,
}

fn two_services() -> Two {
    let dir = tempdir();
    let (oa, ob) = (origin("A"), origin("B"));
    let (a, b, admin) = (free_port(), free_port(), free_port());
    let config = format!(
        r#"[admin]
listen = "127.0.0.1:{admin}"

[cache]
memory = "16MiB"

[services.a]
listen = "127.0.0.1:{a}"
backends = ["{oa}"]
[services.a.cache]

[services.b]
listen = "127.0.0.1:{b}"
backends = ["{ob}"]
trusted_proxies = ["127.0.0.1/32"]
[services.b.cache]
"#,
        oa = oa.addr,
        ob = ob.addr
    );
    let (shoal, _) = run_shoal(dir.path(), &config, a);
    wait_port(b, 20);
    Two {
        a,
        b,
        oa,
        ob,
        _shoal: shoal,
        _dir: dir,
    }
}

const PATHS: [&str; 2] = ["1.1", "1.0"];

#[test]
fn a_cookie_set_for_one_client_is_never_sent_to_another() {
    let t = two_services();
    for v in PATHS {
        let path = format!("/cookie?v={v}");
        let first = raw(t.a, v, &path, &[]);
        assert_eq!(status(&first), 200, "{first}");
        let cookie = header(&first, "set-cookie").unwrap().to_string();
        let second = raw(t.a, v, &path, &[]);
        assert_eq!(status(&second), 200, "{second}");
        assert_ne!(
            header(&second, "set-cookie"),
            Some(cookie.as_str()),
            "{v}: {second}"
        );
        assert!(
            !header(&second, "cache-status")
                .unwrap_or("")
                .contains("; hit"),
            "{v}: a response that set a cookie was served from cache: {second}"
        );
    }
    assert_eq!(t.oa.calls("/cookie"), 4, "every request went to the origin");
}

#[test]
fn a_request_to_one_service_with_another_services_host_never_poisons_it() {
    let t = two_services();
    for v in PATHS {
        let path = format!("/p?v={v}");
        let host = format!("127.0.0.1:{}", t.a);
        // Sent to b, naming a's host: b's origin answers, stored under b's key only.
        let via_b = raw(t.b, v, &path, &[("Host", &host)]);
        assert!(body(&via_b).starts_with("B "), "{via_b}");
        let via_a = raw(t.a, v, &path, &[]);
        assert!(body(&via_a).starts_with("A "), "{v}: a got {via_a}");
        // And each is then a hit of its own.
        let again = raw(t.a, v, &path, &[]);
        assert!(body(&again).starts_with("A "), "{again}");
        assert!(
            header(&again, "cache-status").unwrap().contains("; hit"),
            "{again}"
        );
    }
    assert_eq!(t.ob.calls("/p"), 2);
    assert_eq!(t.oa.calls("/p"), 2);
}

#[test]
fn a_304_with_a_new_etag_serves_the_stored_response_not_an_error() {
    let t = two_services();
    for v in PATHS {
        let path = format!("/etag?v={v}");
        let first = raw(t.a, v, &path, &[]);
        assert_eq!(body(&first), "A v1", "{first}");
        // Stale at once (max-age=0): validated with "v1", the origin says 304 with "v2". The
        // 304 answers shoal's validation of the stored response: that is what is served.
        for _ in 0..2 {
            let r = raw(t.a, v, &path, &[]);
            assert_eq!((status(&r), body(&r)), (200, "A v1"), "{v}: {r}");
            assert_eq!(header(&r, "etag"), Some("\"v1\""), "{r}");
            assert!(
                header(&r, "cache-status")
                    .unwrap()
                    .contains("fwd-status=304"),
                "{r}"
            );
        }
    }
}

#[test]
fn the_query_string_is_part_of_the_key() {
    let t = two_services();
    for v in PATHS {
        let x1 = raw(t.a, v, &format!("/q?x=1&v={v}"), &[]);
        let x2 = raw(t.a, v, &format!("/q?x=2&v={v}"), &[]);
        assert!(body(&x1).contains("x=1"), "{x1}");
        assert!(body(&x2).contains("x=2"), "{x2}");
        let again = raw(t.a, v, &format!("/q?x=1&v={v}"), &[]);
        assert_eq!(body(&again), body(&x1));
        assert!(
            header(&again, "cache-status").unwrap().contains("; hit"),
            "{again}"
        );
    }
    assert_eq!(t.oa.calls("/q"), 4);
}

#[test]
fn a_client_stale_if_error_never_loosens_must_revalidate() {
    let t = two_services();
    for v in PATHS {
        t.oa.failing.store(false, Ordering::SeqCst);
        let fresh = raw(t.a, v, &format!("/mr?v={v}"), &[]);
        assert_eq!(status(&fresh), 200, "{fresh}");
        let sie = raw(t.a, v, &format!("/sie?v={v}"), &[]);
        assert_eq!(status(&sie), 200, "{sie}");
        t.oa.failing.store(true, Ordering::SeqCst);
        for cc in ["stale-if-error=3600", "max-stale=3600"] {
            let r = raw(t.a, v, &format!("/mr?v={v}"), &[("Cache-Control", cc)]);
            assert_eq!(
                status(&r),
                500,
                "{v} {cc}: stale served past must-revalidate: {r}"
            );
        }
        // Without must-revalidate, the response's own stale-if-error stands in.
        let r = raw(t.a, v, &format!("/sie?v={v}"), &[]);
        assert_eq!((status(&r), body(&r)), (200, "A sie"), "{v}: {r}");
    }
}

#[test]
fn stale_if_error_stands_in_when_the_origin_cannot_be_reached() {
    let t = two_services();
    for v in PATHS {
        let r = raw(t.b, v, &format!("/sie?v={v}"), &[]);
        assert_eq!(status(&r), 200, "{r}");
    }
    // The origin goes away entirely: connections are refused.
    let Two { b, ob, .. } = t;
    drop(ob);
    for v in PATHS {
        let r = raw(b, v, &format!("/sie?v={v}"), &[]);
        assert_eq!((status(&r), body(&r)), (200, "B sie"), "{v}: {r}");
        assert!(
            header(&r, "cache-status")
                .unwrap()
                .contains("stale-if-error"),
            "{r}"
        );
    }
}

#[test]
fn override_headers_are_not_forwarded_on_cached_routes() {
    let t = two_services();
    let sent = AtomicUsize::new(0);
    for v in PATHS {
        let path = format!("/o?v={v}");
        let r = raw(
            t.a,
            v,
            &path,
            &[
                ("X-Original-URL", "/admin"),
                ("X-Rewrite-URL", "/admin"),
                ("X-HTTP-Method-Override", "DELETE"),
                ("X-Forwarded-Scheme", "javascript"),
            ],
        );
        assert_eq!(status(&r), 200, "{r}");
        sent.fetch_add(1, Ordering::Relaxed);
        let seen = t.oa.seen.lock().unwrap().get("/o").cloned().unwrap();
        for h in [
            "x-original-url",
            "x-rewrite-url",
            "x-http-method-override",
            "x-forwarded-scheme",
        ] {
            assert!(!seen.contains_key(h), "{v}: {h} reached the origin");
        }
    }
    assert_eq!(t.oa.calls("/o"), sent.load(Ordering::Relaxed));
}

#[test]
fn ranges_are_answered_from_a_stored_response_and_targeted_fields_win() {
    let t = two_services();
    for v in PATHS {
        let path = format!("/r?v={v}");
        let whole = raw(t.a, v, &path, &[]);
        let full = body(&whole).to_string();
        assert!(full.len() > 6, "{whole}");
        let r = raw(t.a, v, &path, &[("Range", "bytes=2-5")]);
        assert_eq!(status(&r), 206, "{v}: {r}");
        assert_eq!(body(&r), &full[2..6]);
        assert_eq!(
            header(&r, "content-range"),
            Some(format!("bytes 2-5/{}", full.len()).as_str())
        );
        // CDN-Cache-Control makes a `no-store` response cacheable for shoal.
        let cdn = format!("/cdn?v={v}");
        let first = raw(t.a, v, &cdn, &[]);
        let second = raw(t.a, v, &cdn, &[]);
        assert_eq!(body(&first), body(&second), "{v}: {second}");
        assert_eq!(header(&second, "cache-control"), Some("no-store"));
    }
    assert_eq!(t.oa.calls("/r"), 2, "ranges came from cache");
    assert_eq!(t.oa.calls("/cdn"), 2);
}

#[test]
fn a_trusted_proxys_forwarded_proto_is_part_of_the_key() {
    let t = two_services();
    for v in PATHS {
        let path = format!("/proto?v={v}");
        let https = raw(t.b, v, &path, &[("X-Forwarded-Proto", "https")]);
        let http = raw(t.b, v, &path, &[("X-Forwarded-Proto", "http")]);
        assert_ne!(
            body(&https),
            body(&http),
            "{v}: one object for both schemes"
        );
        let again = raw(t.b, v, &path, &[("X-Forwarded-Proto", "https")]);
        assert_eq!(body(&again), body(&https), "{again}");
        assert!(
            header(&again, "cache-status").unwrap().contains("; hit"),
            "{again}"
        );
        // The origin hears the host the key holds, whatever the proxy in front said.
        raw(
            t.b,
            v,
            &format!("/xfh?v={v}"),
            &[("X-Forwarded-Host", "evil.test")],
        );
        let seen = t.ob.seen.lock().unwrap().get("/xfh").cloned().unwrap();
        assert_eq!(
            seen.get("x-forwarded-host").unwrap(),
            format!("127.0.0.1:{}", t.b).as_str()
        );
    }
}
