//! Request coalescing, hit-for-pass, purge and the memory tier's bounds.

mod common;

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use common::*;
use http::{HeaderMap, Method, Response};
use shoal_cache::{Cache, CacheConfig, CacheStore, PolicyConfig, Request};
use tokio::sync::{Barrier, Semaphore};

type Fut = Pin<Box<dyn Future<Output = Result<Response<Bytes>, String>> + Send>>;

/// An origin that holds every request until the test releases it through `gate`, and counts
/// requests in flight at once.
#[derive(Clone)]
struct SlowOrigin {
    gate: Arc<Semaphore>,
    calls: Arc<AtomicUsize>,
    cc: &'static str,
}

impl SlowOrigin {
    fn new(cc: &'static str) -> Self {
        SlowOrigin {
            gate: Arc::new(Semaphore::new(0)),
            calls: Arc::new(AtomicUsize::new(0)),
            cc,
        }
    }
    fn call(&self) -> impl Fn(Method, HeaderMap) -> Fut + Send + Sync + Clone + 'static {
        let me = self.clone();
        move |_, _| {
            let me = me.clone();
            Box::pin(async move {
                me.calls.fetch_add(1, Ordering::SeqCst);
                me.gate.acquire().await.unwrap().forget();
                Ok(resp(200, &[("cache-control", me.cc)], "payload"))
            })
        }
    }
}

fn request_parts(h: &HeaderMap) -> Request<'_> {
    Request {
        method: &Method::GET,
        scheme: "http",
        authority: "example.test",
        path_and_query: "/cold",
        headers: h,
    }
}

async fn until(mut f: impl FnMut() -> bool) {
    for _ in 0..10_000 {
        if f() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    panic!("condition not reached in 10 s");
}

fn spawn_gets(
    cache: &Arc<Cache>,
    clock: &Clock,
    origin: impl Fn(Method, HeaderMap) -> Fut + Send + Sync + Clone + 'static,
    n: usize,
) -> Vec<tokio::task::JoinHandle<Response<Bytes>>> {
    (0..n)
        .map(|_| {
            let (cache, clock, origin) = (cache.clone(), clock.clone(), origin.clone());
            tokio::spawn(async move {
                let h = HeaderMap::new();
                cache
                    .handle(&request_parts(&h), clock.fun(), origin)
                    .await
                    .unwrap()
            })
        })
        .collect()
}

fn new_cache(cfg: CacheConfig) -> Arc<Cache> {
    Cache::new(
        CacheStore::new(64 << 20, None, &PolicyConfig::default()).unwrap(),
        cfg,
        "web",
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hundred_concurrent_misses_make_one_origin_request() {
    let cache = new_cache(CacheConfig::default());
    let origin = SlowOrigin::new("max-age=60");
    let clock = Clock::new();
    let tasks = spawn_gets(&cache, &clock, origin.call(), 100);
    let store = cache.store().clone();
    until(|| store.waiting() == 99).await;
    assert_eq!(origin.calls.load(Ordering::SeqCst), 1);
    origin.gate.add_permits(1000);
    for t in tasks {
        assert_eq!(t.await.unwrap().body(), "payload");
    }
    assert_eq!(origin.calls.load(Ordering::SeqCst), 1);
    assert_eq!(cache.counters().get(shoal_cache::CacheResult::Hit), 99);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn uncacheable_answer_releases_waiters_at_once_and_later_requests_never_wait() {
    let cache = new_cache(CacheConfig::default());
    let clock = Clock::new();
    // Each request holds at the barrier until all of its round are at the origin together:
    // if any of them waited on another, the round could never complete.
    let calls = Arc::new(AtomicUsize::new(0));
    let first = Arc::new(Semaphore::new(0));
    let round1 = Arc::new(Barrier::new(99));
    let round2 = Arc::new(Barrier::new(100));
    let origin = {
        let (calls, first, round1, round2) =
            (calls.clone(), first.clone(), round1.clone(), round2.clone());
        move |_: Method, _: HeaderMap| -> Fut {
            let (calls, first, round1, round2) =
                (calls.clone(), first.clone(), round1.clone(), round2.clone());
            Box::pin(async move {
                let n = calls.fetch_add(1, Ordering::SeqCst);
                let wait = async {
                    match n {
                        0 => drop(first.acquire().await.unwrap()),
                        1..=99 => {
                            round1.wait().await;
                        }
                        _ => {
                            round2.wait().await;
                        }
                    }
                };
                tokio::time::timeout(Duration::from_secs(10), wait)
                    .await
                    .map_err(|_| "requests were serialised".to_string())?;
                Ok(resp(200, &[("cache-control", "no-store")], "private"))
            })
        }
    };
    let tasks = spawn_gets(&cache, &clock, origin.clone(), 100);
    let store = cache.store().clone();
    until(|| store.waiting() == 99).await;
    first.add_permits(1);
    for t in tasks {
        assert_eq!(t.await.unwrap().body(), "private");
    }
    assert_eq!(calls.load(Ordering::SeqCst), 100);
    // Now known as hit-for-pass: 100 more go to the origin side by side.
    let tasks = spawn_gets(&cache, &clock, origin, 100);
    for t in tasks {
        let r = t.await.unwrap();
        assert!(
            cache_status(&r).contains("hit-for-pass"),
            "{}",
            cache_status(&r)
        );
    }
    assert_eq!(calls.load(Ordering::SeqCst), 200);
}

#[tokio::test]
async fn hit_for_pass_ends_and_a_storable_answer_ends_it_early() {
    let h = Harness::new(Origin::fixed(200, &[("cache-control", "no-store")], "x"));
    h.get("/a", &[]).await;
    assert!(cache_status(&h.get("/a", &[]).await).contains("hit-for-pass"));
    h.clock.advance(121);
    let c = h.get("/a", &[]).await;
    assert!(
        !cache_status(&c).contains("hit-for-pass"),
        "{}",
        cache_status(&c)
    );
    // The URL becomes cacheable: the pass is forgotten at once.
    h.origin
        .set(|_, _, _| Ok(resp(200, &[("cache-control", "max-age=60")], "y")));
    h.get("/a", &[]).await;
    let e = h.get("/a", &[]).await;
    assert_eq!(e.body(), "y");
    assert!(cache_status(&e).contains("hit"), "{}", cache_status(&e));
}

#[tokio::test(start_paused = true)]
async fn waiting_on_a_stuck_fetch_is_bounded() {
    let cfg = CacheConfig {
        coalesce_wait: Duration::from_secs(2),
        ..Default::default()
    };
    let cache = new_cache(cfg);
    let clock = Clock::new();
    let calls = Arc::new(AtomicUsize::new(0));
    let origin = {
        let calls = calls.clone();
        move |_: Method, _: HeaderMap| -> Fut {
            let n = calls.fetch_add(1, Ordering::SeqCst);
            Box::pin(async move {
                if n == 0 {
                    std::future::pending::<()>().await;
                }
                Ok(resp(200, &[("cache-control", "max-age=60")], "late"))
            })
        }
    };
    let mut tasks = spawn_gets(&cache, &clock, origin, 5);
    let stuck = tasks.remove(0);
    let started = tokio::time::Instant::now();
    for t in tasks {
        let r = t.await.unwrap();
        assert!(
            cache_status(&r).contains("coalesce-timeout"),
            "{}",
            cache_status(&r)
        );
    }
    assert!(started.elapsed() >= Duration::from_secs(2));
    assert!(started.elapsed() < Duration::from_secs(3));
    assert_eq!(calls.load(Ordering::SeqCst), 5);
    stuck.abort();
}

#[tokio::test]
async fn purge_by_url_prefix_and_surrogate_key() {
    let h = Harness::new(Origin::new(|_, req, _| {
        let lang = req
            .get("accept-language")
            .map(|v| v.to_str().unwrap().to_string());
        Ok(resp(
            200,
            &[
                ("cache-control", "max-age=600"),
                ("vary", "accept-language"),
                ("surrogate-key", "all lang"),
            ],
            if lang.is_some() { "l" } else { "x" },
        ))
    }));
    let paths = ["/p/1", "/p/2", "/q/1"];
    for p in paths {
        h.get(p, &[]).await;
    }
    h.get("/p/1", &[("accept-language", "de")]).await;
    assert_eq!(h.origin.calls(), 4);
    let store = h.cache.store().clone();
    // One URL, all its variants.
    assert_eq!(store.purge_url("http://EXAMPLE.test/p/1").await.unwrap(), 1);
    h.get("/p/1", &[]).await;
    h.get("/p/1", &[("accept-language", "de")]).await;
    h.get("/p/2", &[]).await;
    assert_eq!(h.origin.calls(), 6);
    // Prefix.
    assert_eq!(
        store.purge_prefix("http://example.test/p/").await.unwrap(),
        2
    );
    h.get("/q/1", &[]).await;
    assert_eq!(h.origin.calls(), 6);
    h.get("/p/2", &[]).await;
    assert_eq!(h.origin.calls(), 7);
    // Surrogate key: everything tagged.
    assert_eq!(store.purge_surrogate_key("lang").await.unwrap(), 2);
    for p in paths {
        h.get(p, &[]).await;
    }
    assert_eq!(h.origin.calls(), 10);
    // The tag header is not sent to clients.
    assert_eq!(hdr(&h.get("/q/1", &[]).await, "surrogate-key"), None);
}

#[tokio::test]
async fn memory_tier_is_bounded_by_bytes_and_counts_evictions() {
    let store = CacheStore::new(64 * 1024, None, &PolicyConfig::default()).unwrap();
    let cache = Cache::new(store.clone(), CacheConfig::default(), "web");
    let clock = Clock::new();
    let body: &'static str = Box::leak("x".repeat(4096).into_boxed_str());
    let origin = Origin::fixed(200, &[("cache-control", "max-age=600")], body);
    for i in 0..100 {
        let h = HeaderMap::new();
        let path = format!("/o/{i}");
        let req = Request {
            method: &Method::GET,
            scheme: "http",
            authority: "example.test",
            path_and_query: &path,
            headers: &h,
        };
        cache
            .handle(&req, clock.fun(), origin.call())
            .await
            .unwrap();
    }
    store.sync();
    let s = store.stats();
    assert!(s.memory_bytes <= 64 * 1024, "{s:?}");
    assert!(s.memory_objects < 100 && s.memory_objects > 0, "{s:?}");
    assert!(s.evictions > 0, "{s:?}");
}
