//! The Redis tier against a real `redis-server` started per test on a free port in a temp dir.

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use common::redis::*;
use common::*;
use http::{HeaderMap, Method};
use shoal_cache::{Cache, CacheConfig, CacheStore, PolicyConfig, RedisConfig, Request};

async fn until(what: &str, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

fn shoal(redis: &RedisServer) -> Arc<Cache> {
    let store = CacheStore::new(
        16 << 20,
        Some(RedisConfig::new(redis.url())),
        &PolicyConfig::default(),
    )
    .unwrap();
    Cache::new(store, CacheConfig::default(), "web")
}

async fn get(
    cache: &Arc<Cache>,
    clock: &Clock,
    origin: &Origin,
    path: &str,
) -> http::Response<bytes::Bytes> {
    let h = HeaderMap::new();
    let req = Request {
        method: &Method::GET,
        scheme: "http",
        authority: "example.test",
        path_and_query: path,
        headers: &h,
    };
    cache
        .handle(&req, clock.fun(), origin.call())
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_stores_share_objects_through_redis() {
    let redis = RedisServer::start();
    let (a, b) = (shoal(&redis), shoal(&redis));
    until("connected", || {
        a.store().stats().redis_connected && b.store().stats().redis_connected
    })
    .await;
    let origin = Origin::fixed(
        200,
        &[("cache-control", "max-age=60"), ("etag", "\"1\"")],
        "shared",
    );
    let clock = Clock::new();
    assert_eq!(get(&a, &clock, &origin, "/s").await.body(), "shared");
    until("stored in Redis", || {
        exists(redis.port, "http://example.test/s web")
    })
    .await;
    clock.advance(5);
    let r = get(&b, &clock, &origin, "/s").await;
    assert_eq!(r.body(), "shared");
    assert_eq!(origin.calls(), 1, "the second process answered from Redis");
    assert_eq!(cache_status(&r), "shoal; hit; ttl=55");
    assert_eq!(hdr(&r, "age"), Some("5"));
    // The Redis key expires with the object (freshness + keep time for a validatable one).
    let ttl: i64 = redis_cmd(
        redis.port,
        &["PTTL", "shoal:cache:{}http://example.test/s web"],
    )
    .unwrap()
    .trim_start_matches(':')
    .parse()
    .unwrap();
    assert!(ttl > 60_000 && ttl <= (60 + 3600) * 1000, "pttl {ttl}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_killed_mid_load_fails_no_request_and_is_used_again_once_back() {
    let mut redis = RedisServer::start();
    let cache = shoal(&redis);
    until("connected", || cache.store().stats().redis_connected).await;
    let origin = Origin::fixed(200, &[("cache-control", "max-age=600")], "ok");
    let clock = Clock::new();
    let mut slowest = Duration::ZERO;
    for i in 0..600 {
        if i == 200 {
            redis.kill();
        }
        let t = Instant::now();
        let r = get(&cache, &clock, &origin, &format!("/k/{}", i % 300)).await;
        slowest = slowest.max(t.elapsed());
        assert_eq!(r.status(), 200, "request {i}");
        assert_eq!(r.body(), "ok");
    }
    let s = cache.store().stats();
    assert!(s.redis_errors > 0, "{s:?}");
    assert!(!s.redis_connected, "{s:?}");
    // No request waited on the dead Redis for more than a few timeouts.
    assert!(slowest < Duration::from_millis(500), "slowest {slowest:?}");
    // Redis comes back on the same address: the tier reconnects without a restart.
    redis.spawn();
    let deadline = Instant::now() + Duration::from_secs(10);
    for n in 0.. {
        let path = format!("/after/{n}");
        assert_eq!(get(&cache, &clock, &origin, &path).await.status(), 200);
        tokio::time::sleep(Duration::from_millis(50)).await;
        if exists(redis.port, &format!("http://example.test{path} web")) {
            break;
        }
        assert!(Instant::now() < deadline, "the tier was not used again");
    }
    assert!(cache.store().stats().redis_connected);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn purges_reach_the_shared_tier() {
    let redis = RedisServer::start();
    let (a, b) = (shoal(&redis), shoal(&redis));
    until("connected", || a.store().stats().redis_connected).await;
    let origin = Origin::new(|_, _, _| {
        Ok(resp(
            200,
            &[("cache-control", "max-age=600"), ("surrogate-key", "grp")],
            "v",
        ))
    });
    let clock = Clock::new();
    for p in ["/u/1", "/u/2", "/v/1", "/w/1"] {
        get(&a, &clock, &origin, p).await;
        until("stored", || {
            exists(redis.port, &format!("http://example.test{p} web"))
        })
        .await;
    }
    assert_eq!(
        a.store()
            .purge_url("http://example.test/w/1")
            .await
            .unwrap(),
        1
    );
    assert!(!exists(redis.port, "http://example.test/w/1 web"));
    assert_eq!(
        a.store()
            .purge_prefix("http://example.test/u/")
            .await
            .unwrap(),
        2
    );
    assert!(!exists(redis.port, "http://example.test/u/1 web"));
    assert!(!exists(redis.port, "http://example.test/u/2 web"));
    assert!(exists(redis.port, "http://example.test/v/1 web"));
    // Purging by tag through the other process clears Redis for everyone.
    assert_eq!(b.store().purge_surrogate_key("grp").await.unwrap(), 1);
    assert!(!exists(redis.port, "http://example.test/v/1 web"));
    let before = origin.calls();
    get(&b, &clock, &origin, "/v/1").await;
    assert_eq!(origin.calls(), before + 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unreadable_or_foreign_objects_are_misses() {
    let redis = RedisServer::start();
    let cache = shoal(&redis);
    until("connected", || cache.store().stats().redis_connected).await;
    redis_cmd(
        redis.port,
        &["SET", "shoal:cache:{}http://example.test/j web", "junk"],
    )
    .unwrap();
    let origin = Origin::fixed(200, &[("cache-control", "max-age=60")], "fresh");
    let clock = Clock::new();
    assert_eq!(get(&cache, &clock, &origin, "/j").await.body(), "fresh");
    assert_eq!(origin.calls(), 1);
    assert!(cache.store().stats().redis_errors >= 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_down_from_the_start_degrades_to_memory() {
    let port = free_port();
    let store = CacheStore::new(
        16 << 20,
        Some(RedisConfig::new(format!("redis://127.0.0.1:{port}/"))),
        &PolicyConfig::default(),
    )
    .unwrap();
    let cache = Cache::new(store, CacheConfig::default(), "web");
    let origin = Origin::fixed(200, &[("cache-control", "max-age=60")], "m");
    let clock = Clock::new();
    for _ in 0..3 {
        assert_eq!(get(&cache, &clock, &origin, "/m").await.body(), "m");
    }
    assert_eq!(origin.calls(), 1);
    until("error counted", || cache.store().stats().redis_errors > 0).await;
    assert!(CacheStore::new(
        1,
        Some(RedisConfig::new("nonsense://")),
        &PolicyConfig::default()
    )
    .is_err());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hung_redis_costs_requests_at_most_its_timeout() {
    let redis = RedisServer::start();
    let cache = shoal(&redis);
    until("connected", || cache.store().stats().redis_connected).await;
    let origin = Origin::fixed(200, &[("cache-control", "max-age=600")], "ok");
    let clock = Clock::new();
    redis.pause(true);
    let mut slowest = Duration::ZERO;
    let started = Instant::now();
    let mut n = 0;
    while started.elapsed() < Duration::from_millis(2500) {
        let t = Instant::now();
        let r = get(&cache, &clock, &origin, &format!("/h/{}", n % 50)).await;
        slowest = slowest.max(t.elapsed());
        assert_eq!(r.status(), 200);
        n += 1;
    }
    // Lookups give up after 50 ms; after a failure the tier is skipped for a second.
    assert!(slowest < Duration::from_millis(300), "slowest {slowest:?}");
    assert!(n > 100, "only {n} requests in 2.5 s");
    assert!(cache.store().stats().redis_errors > 0);
    redis.pause(false);
    let deadline = Instant::now() + Duration::from_secs(10);
    for i in 0.. {
        let path = format!("/resumed/{i}");
        get(&cache, &clock, &origin, &path).await;
        tokio::time::sleep(Duration::from_millis(50)).await;
        if exists(redis.port, &format!("http://example.test{path} web")) {
            break;
        }
        assert!(Instant::now() < deadline, "the tier was not used again");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalidations_during_an_outage_make_no_connection_per_request() {
    let port = free_port();
    let store = CacheStore::new(
        16 << 20,
        Some(RedisConfig::new(format!("redis://127.0.0.1:{port}/"))),
        &PolicyConfig::default(),
    )
    .unwrap();
    let cache = Cache::new(store, CacheConfig::default(), "web");
    // Let the first connection attempt fail and switch the tier off.
    until("first failure", || cache.store().stats().redis_errors >= 1).await;
    let h = HeaderMap::new();
    let started = Instant::now();
    for i in 0..200 {
        let path = format!("/p/{i}");
        let req = Request {
            method: &Method::POST,
            scheme: "http",
            authority: "example.test",
            path_and_query: &path,
            headers: &h,
        };
        cache.invalidate_after(&req, http::StatusCode::OK, &HeaderMap::new());
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let secs = started.elapsed().as_secs() + 1;
    let errors = cache.store().stats().redis_errors;
    // One attempt per backoff period (1 s) at most, not one per invalidation.
    assert!(
        errors <= 1 + secs,
        "{errors} Redis errors for 200 invalidations"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn caches_of_different_owners_never_share_an_object_in_redis() {
    let redis = RedisServer::start();
    let store = CacheStore::new(
        16 << 20,
        Some(RedisConfig::new(redis.url())),
        &PolicyConfig::default(),
    )
    .unwrap();
    let a = Cache::new(store.clone(), CacheConfig::default(), "a");
    let b = Cache::new(store.clone(), CacheConfig::default(), "b");
    until("connected", || store.stats().redis_connected).await;
    let clock = Clock::new();
    let from_a = Origin::fixed(200, &[("cache-control", "max-age=60")], "A");
    let from_b = Origin::fixed(200, &[("cache-control", "max-age=60")], "B");
    assert_eq!(get(&b, &clock, &from_b, "/p").await.body(), "B");
    until("stored", || exists(redis.port, "http://example.test/p b")).await;
    // Same URL, same Host, other owner: a miss, answered by its own origin.
    assert_eq!(get(&a, &clock, &from_a, "/p").await.body(), "A");
    assert_eq!(from_a.calls(), 1);
    assert_eq!(get(&a, &clock, &from_a, "/p").await.body(), "A");
    assert_eq!(get(&b, &clock, &from_b, "/p").await.body(), "B");
    // A purge by URL reaches every owner's copy.
    until("stored", || exists(redis.port, "http://example.test/p a")).await;
    store.purge_url("http://example.test/p").await.unwrap();
    assert!(!exists(redis.port, "http://example.test/p a"));
    assert!(!exists(redis.port, "http://example.test/p b"));
}

fn shoal_at(url: String) -> Arc<Cache> {
    let store = CacheStore::new(
        16 << 20,
        Some(RedisConfig::new(url)),
        &PolicyConfig::default(),
    )
    .unwrap();
    Cache::new(store, CacheConfig::default(), "web")
}

fn obj(path: &str) -> String {
    format!("shoal:cache:{{}}http://example.test{path} web")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redis_cluster_shares_objects_purges_every_master_and_survives_a_failover() {
    let mut cluster = RedisCluster::start();
    let (a, b) = (shoal_at(cluster.url()), shoal_at(cluster.url()));
    until("connected", || {
        a.store().stats().redis_connected && b.store().stats().redis_connected
    })
    .await;
    let origin = Origin::new(|_, _, _| {
        Ok(resp(
            200,
            &[("cache-control", "max-age=600"), ("surrogate-key", "grp")],
            "v",
        ))
    });
    let clock = Clock::new();
    let paths: Vec<String> = (0..30).map(|i| format!("/p/{i}")).collect();
    for p in &paths {
        get(&a, &clock, &origin, p).await;
    }
    for p in &paths {
        until("stored in the cluster", || cluster.exists(&obj(p))).await;
    }
    let masters: std::collections::HashSet<u16> =
        paths.iter().map(|p| cluster.master_of(&obj(p))).collect();
    assert_eq!(masters.len(), 3, "the objects are spread over every master");
    // The other process answers every one from the cluster.
    let before = origin.calls();
    for p in &paths {
        assert_eq!(get(&b, &clock, &origin, p).await.body(), "v");
    }
    assert_eq!(origin.calls(), before, "all hits from the shared tier");

    // A prefix purge visits every master; a tag purge deletes across slots.
    b.store()
        .purge_prefix("http://example.test/p/1")
        .await
        .unwrap();
    for p in &paths {
        let gone = p.starts_with("/p/1");
        assert_eq!(!cluster.exists(&obj(p)), gone, "{p}");
    }
    b.store().purge_surrogate_key("grp").await.unwrap();
    assert!(paths.iter().all(|p| !cluster.exists(&obj(p))));

    // A master dies under load: no request fails, none waits long, and once a replica has
    // taken over, the tier stores in every slot again.
    let victim = cluster.master_of(&obj("/p/0"));
    let mut slowest = Duration::ZERO;
    for i in 0..300 {
        if i == 50 {
            cluster.kill(victim);
        }
        let t = Instant::now();
        let r = get(&a, &clock, &origin, &format!("/q/{}", i % 100)).await;
        slowest = slowest.max(t.elapsed());
        assert_eq!(r.status(), 200, "request {i}");
    }
    assert!(slowest < Duration::from_millis(500), "slowest {slowest:?}");
    cluster.wait_ok(Duration::from_secs(30));
    let deadline = Instant::now() + Duration::from_secs(30);
    for n in 0.. {
        let batch: Vec<String> = (0..30).map(|i| format!("/after/{n}/{i}")).collect();
        for p in &batch {
            assert_eq!(get(&a, &clock, &origin, p).await.status(), 200);
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
        if batch.iter().all(|p| cluster.exists(&obj(p))) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the tier was not used again in every slot: {:?}; missing {:?}",
            a.store().stats(),
            batch
                .iter()
                .filter(|p| !cluster.exists(&obj(p)))
                .collect::<Vec<_>>()
        );
    }
}
