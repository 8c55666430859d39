//! Fresh hits for the HTTP/1.1 fast path.

mod common;

use common::*;
use http::Method;

fn parse_head(buf: &[u8]) -> (u16, Vec<(String, String)>, usize) {
    let mut hs = [httparse::EMPTY_HEADER; 32];
    let mut r = httparse::Response::new(&mut hs);
    let n = match r.parse(buf).unwrap() {
        httparse::Status::Complete(n) => n,
        httparse::Status::Partial => panic!("incomplete head"),
    };
    let headers = r
        .headers
        .iter()
        .map(|h| {
            (
                h.name.to_string(),
                String::from_utf8(h.value.to_vec()).unwrap(),
            )
        })
        .collect();
    (r.code.unwrap(), headers, n)
}

fn get<'a>(h: &'a [(String, String)], name: &str) -> Option<&'a str> {
    h.iter()
        .find(|(n, _)| n.eq_ignore_ascii_case(name))
        .map(|(_, v)| v.as_str())
}

#[tokio::test]
async fn fresh_hits_are_written_from_a_prerendered_head() {
    let h = Harness::new(Origin::fixed(
        200,
        &[
            ("cache-control", "max-age=60"),
            ("vary", "accept-encoding"),
            ("transfer-encoding", "chunked"),
            ("cache-status", "up; hit"),
        ],
        "hello",
    ));
    h.get("/f", &[("accept-encoding", "gzip")]).await;
    h.clock.advance(7);
    let req = [httparse::Header {
        name: "Accept-Encoding",
        value: b"gzip",
    }];
    let hit = h
        .cache
        .fast_hit(
            &Method::GET,
            "http",
            "example.test",
            "/f",
            &req,
            h.clock.now(),
        )
        .expect("fresh hit");
    let mut out = Vec::new();
    hit.write_head(&mut out, false);
    let (code, headers, n) = parse_head(&out);
    assert_eq!((code, n), (200, out.len()));
    assert_eq!(get(&headers, "content-length"), Some("5"));
    assert_eq!(get(&headers, "transfer-encoding"), None);
    assert_eq!(get(&headers, "age"), Some("7"));
    assert_eq!(
        get(&headers, "cache-status"),
        Some("up; hit, shoal; hit; ttl=53")
    );
    assert_eq!(hit.body, "hello");
    let mut closing = Vec::new();
    hit.write_head(&mut closing, true);
    assert_eq!(get(&parse_head(&closing).1, "connection"), Some("close"));
    // The same head serves the next hit; HEAD gets no body.
    let head = h
        .cache
        .fast_hit(
            &Method::HEAD,
            "http",
            "example.test",
            "/f",
            &req,
            h.clock.now(),
        )
        .unwrap();
    assert!(head.body.is_empty());
    assert_eq!(h.cache.counters().get(shoal_cache::CacheResult::Hit), 2);
}

#[tokio::test]
async fn anything_but_a_plain_fresh_hit_takes_the_general_path() {
    let h = Harness::new(Origin::fixed(
        200,
        &[
            ("cache-control", "max-age=60"),
            ("vary", "accept-encoding"),
            ("etag", "\"1\""),
        ],
        "hello",
    ));
    h.get("/f", &[]).await;
    let now = h.clock.now();
    let fast = |hs: &[httparse::Header<'_>], m: Method, now| {
        h.cache
            .fast_hit(&m, "http", "example.test", "/f", hs, now)
            .is_some()
    };
    assert!(fast(&[], Method::GET, now));
    let other_variant = [httparse::Header {
        name: "accept-encoding",
        value: b"br",
    }];
    assert!(!fast(&other_variant, Method::GET, now));
    for (n, v) in [
        ("cache-control", &b"no-cache"[..]),
        ("if-none-match", b"\"1\""),
        ("range", b"bytes=0-1"),
        ("pragma", b"no-cache"),
    ] {
        assert!(
            !fast(&[httparse::Header { name: n, value: v }], Method::GET, now),
            "{n}"
        );
    }
    assert!(!fast(&[], Method::POST, now));
    h.clock.advance(61);
    assert!(!fast(&[], Method::GET, h.clock.now()), "stale");
}

/// The streaming use a proxy makes of the phase: headers first, body teed into the store.
#[tokio::test]
async fn streaming_phase_stores_after_the_body_and_releases_waiters() {
    use shoal_cache::{Lookup, Outcome, Request};
    let h = Harness::new(Origin::fixed(200, &[], ""));
    let hm = headers(&[("if-none-match", "\"v1\"")]);
    let req = Request {
        method: &Method::GET,
        scheme: "http",
        authority: "example.test",
        path_and_query: "/s",
        headers: &hm,
    };
    let now = h.clock.now();
    let Lookup::Miss(fetch) = h.cache.lookup(&req, now).await else {
        panic!("cold lookup must miss");
    };
    let mut upstream = hm.clone();
    fetch.prepare(&mut upstream);
    assert!(upstream.get("if-none-match").is_none());
    assert_eq!(h.cache.store().in_flight(), 1);
    let mut resp_headers = headers(&[("cache-control", "max-age=60"), ("etag", "\"v1\"")]);
    // The client's validator matches the new response: it gets a 304, the body is stored.
    let Outcome::NotModified(r, Some(store)) =
        h.cache
            .response(fetch, http::StatusCode::OK, &mut resp_headers, now)
    else {
        panic!("expected a 304 for the client and a store");
    };
    assert_eq!(r.status(), 304);
    assert_eq!(h.cache.store().in_flight(), 1, "waiters wait for the body");
    assert!(store.max_body() >= 4);
    assert!(store.finish(bytes::Bytes::from_static(b"body")));
    assert_eq!(h.cache.store().in_flight(), 0);
    let hit = h.get("/s", &[]).await;
    assert_eq!(
        (hit.status().as_u16(), hit.body().as_ref()),
        (200, &b"body"[..])
    );
    assert_eq!(h.origin.calls(), 0);

    // A body that outgrows the limit: counted, and the URL is passed through for a while.
    let req = Request {
        path_and_query: "/big",
        ..req
    };
    let Lookup::Miss(fetch) = h.cache.lookup(&req, now).await else {
        panic!()
    };
    let mut rh = headers(&[("cache-control", "max-age=60")]);
    let Outcome::Forward(Some(store)) = h.cache.response(fetch, http::StatusCode::OK, &mut rh, now)
    else {
        panic!("expected a store");
    };
    store.too_large();
    assert_eq!(h.cache.store().stats().too_large, 1);
    let again = h.get("/big", &[]).await;
    assert!(
        cache_status(&again).contains("hit-for-pass"),
        "{}",
        cache_status(&again)
    );
}
