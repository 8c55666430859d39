//! A scripted origin and an injected clock for the cache's conformance tests.
#![allow(dead_code)]

pub mod redis;

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use http::{HeaderMap, HeaderValue, Method, Response, StatusCode};
use shoal_cache::{Cache, CacheConfig, CacheStore, PolicyConfig, Request};

/// Seconds since the epoch of the test clock's start.
pub const T0: u64 = 1_800_000_000;

#[derive(Clone)]
pub struct Clock(Arc<AtomicU64>);

impl Clock {
    pub fn new() -> Self {
        Clock(Arc::new(AtomicU64::new(T0 * 1000)))
    }
    pub fn now(&self) -> SystemTime {
        UNIX_EPOCH + Duration::from_millis(self.0.load(Ordering::SeqCst))
    }
    pub fn advance(&self, secs: u64) {
        self.0.fetch_add(secs * 1000, Ordering::SeqCst);
    }
    pub fn fun(&self) -> impl Fn() -> SystemTime + Send + Sync + Clone + 'static {
        let c = self.clone();
        move || c.now()
    }
}

pub fn date(secs_from_t0: i64) -> String {
    httpdate::fmt_http_date(UNIX_EPOCH + Duration::from_secs((T0 as i64 + secs_from_t0) as u64))
}

type Script = dyn Fn(&Method, &HeaderMap, usize) -> Result<Response<Bytes>, String> + Send + Sync;

/// An origin whose answers come from a closure; it records every request it gets.
#[derive(Clone)]
pub struct Origin {
    script: Arc<Mutex<Arc<Script>>>,
    calls: Arc<AtomicUsize>,
    seen: Arc<Mutex<Vec<(Method, HeaderMap)>>>,
}

impl Origin {
    pub fn new(
        f: impl Fn(&Method, &HeaderMap, usize) -> Result<Response<Bytes>, String>
            + Send
            + Sync
            + 'static,
    ) -> Self {
        Origin {
            script: Arc::new(Mutex::new(Arc::new(f))),
            calls: Arc::new(AtomicUsize::new(0)),
            seen: Arc::new(Mutex::new(Vec::new())),
        }
    }
    /// Always the same response (headers as "name: value" pairs), body `body`.
    pub fn fixed(status: u16, headers: &[(&str, &str)], body: &'static str) -> Self {
        let h = resp(status, headers, body);
        Origin::new(move |_, _, _| Ok(clone_resp(&h)))
    }
    pub fn set(
        &self,
        f: impl Fn(&Method, &HeaderMap, usize) -> Result<Response<Bytes>, String>
            + Send
            + Sync
            + 'static,
    ) {
        *self.script.lock().unwrap() = Arc::new(f);
    }
    pub fn calls(&self) -> usize {
        self.calls.load(Ordering::SeqCst)
    }
    pub fn last_request(&self) -> (Method, HeaderMap) {
        self.seen
            .lock()
            .unwrap()
            .last()
            .cloned()
            .expect("origin was called")
    }
    pub fn call(
        &self,
    ) -> impl Fn(Method, HeaderMap) -> std::future::Ready<Result<Response<Bytes>, String>>
           + Send
           + Sync
           + Clone
           + 'static {
        let me = self.clone();
        move |m, h| {
            let n = me.calls.fetch_add(1, Ordering::SeqCst);
            me.seen.lock().unwrap().push((m.clone(), h.clone()));
            let f = me.script.lock().unwrap().clone();
            std::future::ready(f(&m, &h, n))
        }
    }
}

pub fn resp(status: u16, headers: &[(&str, &str)], body: &'static str) -> Response<Bytes> {
    let mut r = Response::new(Bytes::from_static(body.as_bytes()));
    *r.status_mut() = StatusCode::from_u16(status).unwrap();
    for (n, v) in headers {
        r.headers_mut().append(
            http::HeaderName::from_bytes(n.as_bytes()).unwrap(),
            HeaderValue::from_str(v).unwrap(),
        );
    }
    r
}

pub fn clone_resp(r: &Response<Bytes>) -> Response<Bytes> {
    let mut c = Response::new(r.body().clone());
    *c.status_mut() = r.status();
    *c.headers_mut() = r.headers().clone();
    c
}

pub fn headers(list: &[(&str, &str)]) -> HeaderMap {
    let mut h = HeaderMap::new();
    for (n, v) in list {
        h.append(
            http::HeaderName::from_bytes(n.as_bytes()).unwrap(),
            HeaderValue::from_str(v).unwrap(),
        );
    }
    h
}

pub struct Harness {
    pub cache: Arc<Cache>,
    pub clock: Clock,
    pub origin: Origin,
}

impl Harness {
    pub fn new(origin: Origin) -> Self {
        Self::with(origin, CacheConfig::default())
    }
    pub fn with(origin: Origin, cfg: CacheConfig) -> Self {
        let store = CacheStore::new(64 << 20, None, &PolicyConfig::default()).unwrap();
        Harness {
            cache: Cache::new(store, cfg, "web"),
            clock: Clock::new(),
            origin,
        }
    }
    pub async fn send(&self, method: Method, path: &str, h: &[(&str, &str)]) -> Response<Bytes> {
        let hm = headers(h);
        let req = Request {
            method: &method,
            scheme: "http",
            authority: "example.test",
            path_and_query: path,
            headers: &hm,
        };
        match self
            .cache
            .handle(&req, self.clock.fun(), self.origin.call())
            .await
        {
            Ok(r) => r,
            Err(e) => resp(502, &[], "").map(|_| Bytes::from(e)),
        }
    }
    pub async fn get(&self, path: &str, h: &[(&str, &str)]) -> Response<Bytes> {
        self.send(Method::GET, path, h).await
    }
}

pub fn hdr<'a>(r: &'a Response<Bytes>, name: &str) -> Option<&'a str> {
    r.headers().get(name).and_then(|v| v.to_str().ok())
}

pub fn cache_status(r: &Response<Bytes>) -> String {
    hdr(r, "cache-status").unwrap_or("").to_string()
}
