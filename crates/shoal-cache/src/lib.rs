//! shoal's shared HTTP cache (RFC 9111, with RFC 5861 stale extensions and RFC 9211
//! `Cache-Status`).
//!
//! - [`policy`] and [`directives`]: the rules, pure functions over `http` types with an
//!   injected `now` — storability, freshness, `Age`, `Vary`, validation and 304 merging,
//!   conditional requests answered from cache, request directives, invalidation.
//! - [`memory`] (moka, byte-weighted) and [`redis_tier`] (shared, optional, never blocking a
//!   request): the tiers, behind [`CacheStore`].
//! - [`coalesce`]: one origin fetch per URL at a time; hit-for-pass for uncacheable URLs.
//! - [`fast`]: fresh hits for the HTTP/1.1 fast path, from memory, with a pre-rendered head.
//! - [`Cache`]: one route's request phase — [`Cache::lookup`] → [`Lookup`], then
//!   [`Cache::response`] → [`Outcome`] for the origin's answer.
//!
//! # Calling it from a proxy
//!
//! One [`CacheStore`] per process (memory size, optional Redis), one [`Cache`] per route
//! (its [`CacheConfig`]). Per request, with `now` from the caller's clock:
//!
//! 1. HTTP/1.1 fast path: [`Cache::fast_hit`] → write [`FastHit::write_head`] and the body;
//!    `None` → go on as usual.
//! 2. [`Cache::lookup`] → [`Lookup::Hit`] (send it; spawn the `refresh` fetch if present),
//!    [`Lookup::Bypass`] (forward; [`mark_bypass`] the response; for unsafe methods call
//!    [`Cache::invalidate_after`]), or [`Lookup::Miss`]: apply [`Fetch::prepare`] to the
//!    upstream request headers and send it.
//! 3. Origin unreachable → [`Cache::origin_error`] (a stale stand-in, or the proxy's error).
//!    Response head in → [`Cache::response`] → [`Outcome`]: serve from cache, forward (teeing
//!    the body into the [`Store`]), send a 304, or refetch.
//!
//! [`Cache::handle`] does all of this for a buffered origin:
//!
//! ```
//! # use std::time::SystemTime;
//! # use bytes::Bytes;
//! # use http::{HeaderMap, Method, Response};
//! use shoal_cache::{Cache, CacheConfig, CacheStore, PolicyConfig, Request};
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() {
//! let store = CacheStore::new(64 << 20, None, &PolicyConfig::default()).unwrap();
//! let cache = Cache::new(store, CacheConfig::default(), "web");
//! let headers = HeaderMap::new();
//! let req = Request {
//!     method: &Method::GET,
//!     scheme: "http",
//!     authority: "example.test",
//!     path_and_query: "/",
//!     headers: &headers,
//! };
//! let origin = |_m: Method, _h: HeaderMap| async {
//!     let mut r = Response::new(Bytes::from_static(b"hi"));
//!     r.headers_mut().insert("cache-control", "max-age=60".parse().unwrap());
//!     Ok::<_, std::io::Error>(r)
//! };
//! let first = cache.handle(&req, SystemTime::now, origin).await.unwrap();
//! let second = cache.handle(&req, SystemTime::now, origin).await.unwrap();
//! assert_eq!(second.headers()["cache-status"], "shoal; hit; ttl=60");
//! # let _ = first;
//! # }
//! ```
//!
//! Why not the `http-cache-semantics` crate: it models one stored response per policy object
//! and answers "is it fresh / what headers to send", but leaves out what a shared cache in
//! front of many clients needs here — `Vary` variants under one key, `stale-while-revalidate`
//! and `stale-if-error` as serving decisions, `only-if-cached`, answering the client's own
//! conditionals, must-understand, §4.4 invalidation, surrogate keys and `Cache-Status` — and
//! it reads the wall clock through `SystemTime` arguments but keeps its own serialised state
//! that would have to be stored beside ours in Redis. Writing the rules directly keeps one
//! stored form, one place per RFC section, and tests named after those sections.
#![forbid(unsafe_code)]

pub mod cache;
pub mod coalesce;
pub mod directives;
pub mod fast;
pub mod memory;
pub mod metrics;
pub mod object;
pub mod policy;
pub mod redis_conn;
pub mod redis_tier;

pub use cache::{
    mark_bypass, Cache, CacheConfig, CacheStore, Fetch, Lookup, Outcome, Request, Store,
    STATUS_NAME,
};
pub use fast::FastHit;
pub use metrics::{CacheCounters, Outcome as CacheResult, Sample, StoreStats};
pub use policy::PolicyConfig;
pub use redis_tier::{RedisConfig, RedisTierError};
