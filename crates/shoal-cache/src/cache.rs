//! The request phase the proxy calls: lookup → (hit | fetch plan | bypass), then the origin
//! response → serve from cache, or forward and store. Ties the policy to the tiers and the
//! coalescer.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use http::header::{self, HeaderName, HeaderValue};
use http::{HeaderMap, Method, StatusCode};

use crate::coalesce::{Coalescer, FlightGuard, Join};
use crate::directives::CacheControl;
use crate::memory::MemoryTier;
use crate::metrics::{CacheCounters, Outcome as Count, StoreStats};
use crate::object::Entry;
use crate::policy::{self, CacheStatus, PolicyConfig, RequestClass, Reuse, StoredResponse};
use crate::redis_tier::{RedisConfig, RedisTier, RedisTierError};

/// The name this cache gives itself in `Cache-Status`.
pub const STATUS_NAME: &str = "shoal";

/// The storage shared by every route of a process: memory tier, optional Redis tier and
/// the coalescer.
pub struct CacheStore {
    memory: MemoryTier,
    redis: Option<Arc<RedisTier>>,
    coalescer: Arc<Coalescer>,
    too_large: AtomicU64,
    /// Bodies being read for storing, process-wide (see [`FillBudget`]).
    fill: Arc<FillBudget>,
    /// The namespaces (owning services and routes) of the caches over this store, so a purge
    /// by URL reaches every copy of it.
    namespaces: std::sync::Mutex<std::collections::BTreeSet<Arc<str>>>,
}

impl CacheStore {
    /// `memory_bytes` bounds the memory tier; `redis` adds the shared tier.
    pub fn new(
        memory_bytes: u64,
        redis: Option<RedisConfig>,
        policy: &PolicyConfig,
    ) -> Result<Arc<Self>, RedisTierError> {
        let redis = match redis {
            Some(r) => {
                let t = RedisTier::new(r, policy.clone())?;
                t.warm_up();
                Some(t)
            }
            None => None,
        };
        Ok(Arc::new(CacheStore {
            memory: MemoryTier::new(memory_bytes),
            redis,
            coalescer: Coalescer::new(),
            too_large: AtomicU64::new(0),
            fill: Arc::new(FillBudget::new(DEFAULT_FILL_BYTES)),
            namespaces: Default::default(),
        }))
    }

    /// Sets how many body bytes may be held at once while responses are read for storing.
    pub fn set_fill_limit(&self, bytes: u64) {
        self.fill.limit.store(bytes, Ordering::Relaxed);
    }

    /// Body bytes held right now for responses being stored.
    pub fn fill_bytes(&self) -> u64 {
        self.fill.used.load(Ordering::Relaxed)
    }

    /// Responses streamed through uncached because the fill budget was spent.
    pub fn fill_exhausted(&self) -> u64 {
        self.fill.exhausted.load(Ordering::Relaxed)
    }

    pub fn stats(&self) -> StoreStats {
        StoreStats {
            memory_bytes: self.memory.bytes(),
            memory_capacity_bytes: self.memory.capacity(),
            memory_objects: self.memory.objects(),
            evictions: self.memory.evictions(),
            redis_configured: self.redis.is_some(),
            redis_connected: self.redis.as_ref().is_some_and(|r| r.connected()),
            redis_errors: self.redis.as_ref().map_or(0, |r| r.errors()),
            too_large: self.too_large.load(Ordering::Relaxed),
            fill_bytes: self.fill_bytes(),
            fill_exhausted: self.fill_exhausted(),
        }
    }

    /// Applies the memory tier's pending bookkeeping (evictions, counts) now.
    pub fn sync(&self) {
        self.memory.sync();
    }

    /// Requests currently fetching a key for others (coalescing leaders).
    pub fn in_flight(&self) -> usize {
        self.coalescer.in_flight()
    }

    pub(crate) fn memory_get(&self, key: &str) -> Option<Arc<crate::memory::MemEntry>> {
        self.memory.get(key)
    }

    /// Requests waiting on another request's fetch.
    pub fn waiting(&self) -> usize {
        self.coalescer.waiting()
    }

    /// Purges one URL (every variant, GET and HEAD) from both tiers. `url` is absolute:
    /// `http://host/path?query`.
    pub async fn purge_url(&self, url: &str) -> Result<u64, RedisTierError> {
        let url = url_key(url);
        let keys: Vec<String> = self
            .namespaces
            .lock()
            .expect("lock")
            .iter()
            .map(|ns| namespaced(url.clone(), ns))
            .collect();
        let mut had = 0;
        for key in &keys {
            had += self.memory.get(key).is_some() as u64;
            self.memory.remove(key);
            self.coalescer.clear_hit_for_pass(key);
        }
        let remote = match &self.redis {
            Some(r) if !keys.is_empty() => r.remove(&keys).await?,
            _ => 0,
        };
        Ok(had.max(remote))
    }

    /// Purges every URL starting with `prefix` (absolute, e.g. `http://host/static/`).
    pub async fn purge_prefix(&self, prefix: &str) -> Result<u64, RedisTierError> {
        let prefix = url_key(prefix);
        let local = self.memory.purge_prefix(&prefix);
        let remote = match &self.redis {
            Some(r) => r.purge_prefix(&prefix).await?,
            None => 0,
        };
        Ok(local.max(remote))
    }

    /// Purges every object whose response carried `tag` in `Surrogate-Key`.
    pub async fn purge_surrogate_key(&self, tag: &str) -> Result<u64, RedisTierError> {
        let local = self.memory.purge_surrogate(tag);
        let remote = match &self.redis {
            Some(r) => r.purge_surrogate(tag).await?,
            None => 0,
        };
        Ok(local.max(remote))
    }

    /// Memory first, then Redis (filling memory from it).
    async fn get(&self, key: &str, cfg: &PolicyConfig, now: SystemTime) -> Option<Entry> {
        if let Some(m) = self.memory.get(key) {
            return Some(m.entry.clone());
        }
        let r = self.redis.as_ref()?;
        let e = r.get(key).await?;
        self.memory.insert(key, e.clone(), e.keep_for(now, cfg));
        Some(e)
    }

    fn put(&self, key: &str, e: Entry, cfg: &PolicyConfig, now: SystemTime) {
        let keep = e.keep_for(now, cfg);
        if let Some(r) = &self.redis {
            r.put(key, &e, keep);
        }
        self.memory.insert(key, e, keep);
    }

    fn remove_local_and_remote(&self, key: &str) {
        self.memory.remove(key);
        if let Some(r) = &self.redis {
            // Bounded by the tier's timeout and skipped during its outage backoff.
            r.forget(key);
        }
    }
}

/// The cookies an origin answer set go to the one client whose request it answered, even
/// when that client is answered from the stored object (which never holds them).
fn relay_set_cookie(origin: &HeaderMap, served: &mut HeaderMap) {
    for v in origin.get_all(header::SET_COOKIE) {
        served.append(header::SET_COOKIE, v.clone());
    }
}

/// Default for [`CacheStore::set_fill_limit`].
pub const DEFAULT_FILL_BYTES: u64 = 64 << 20;

/// The bytes of response bodies held while they are read for storing, bounded process-wide:
/// without it, many concurrent misses of large objects could hold `max_object_size` each.
/// Past the limit a response streams through uncached.
struct FillBudget {
    used: AtomicU64,
    limit: AtomicU64,
    exhausted: AtomicU64,
}

impl FillBudget {
    fn new(limit: u64) -> Self {
        FillBudget {
            used: AtomicU64::new(0),
            limit: AtomicU64::new(limit),
            exhausted: AtomicU64::new(0),
        }
    }

    fn take(&self, n: u64) -> bool {
        let limit = self.limit.load(Ordering::Relaxed);
        let ok = self
            .used
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |u| {
                u.checked_add(n).filter(|t| *t <= limit)
            })
            .is_ok();
        if !ok {
            self.exhausted.fetch_add(1, Ordering::Relaxed);
        }
        ok
    }

    fn give(&self, n: u64) {
        self.used.fetch_sub(n, Ordering::AcqRel);
    }
}

/// A store key: the primary key (the URL), a space (never part of a request target) and the
/// namespace of the service or route that owns the object, so two services or routes never
/// share an entry, whatever `Host` a client sends.
fn namespaced(mut url: String, namespace: &str) -> String {
    url.push(' ');
    url.push_str(namespace);
    url
}

/// Normalises an absolute URL the way `policy::primary_key` builds keys.
fn url_key(url: &str) -> String {
    match url.split_once("://") {
        Some((scheme, rest)) => {
            let (auth, pq) = match rest.find('/') {
                Some(i) => (&rest[..i], &rest[i..]),
                None => (rest, ""),
            };
            if pq.is_empty() {
                // A bare origin as a prefix means "everything on it".
                format!(
                    "{}://{}",
                    scheme.to_ascii_lowercase(),
                    auth.to_ascii_lowercase()
                )
            } else {
                policy::primary_key(&scheme.to_ascii_lowercase(), auth, pq)
            }
        }
        None => url.to_string(),
    }
}

/// Adds `Cache-Status: shoal; fwd=bypass; fwd-status=N` to a response the cache let through
/// untouched ([`Lookup::Bypass`]), so every response of a cached route says what the cache did.
pub fn mark_bypass(status: StatusCode, headers: &mut HeaderMap) {
    let mut cs = CacheStatus::fwd("bypass");
    cs.fwd_status = Some(status.as_u16());
    cs.append_to(STATUS_NAME, headers);
}

/// Per-route settings.
#[derive(Debug, Clone, PartialEq)]
pub struct CacheConfig {
    pub policy: PolicyConfig,
    /// Largest body stored; bigger or unknown-length bodies stream through.
    pub max_object_size: usize,
    /// How long a request waits for another one fetching the same URL before it goes to
    /// the origin itself.
    pub coalesce_wait: Duration,
    /// How long a URL whose response was not storable skips coalescing.
    pub hit_for_pass: Duration,
    /// Override headers ([`policy::OVERRIDE_HEADERS`]) forwarded anyway on this route.
    pub allow_override_headers: Vec<HeaderName>,
}

impl Default for CacheConfig {
    fn default() -> Self {
        CacheConfig {
            policy: PolicyConfig::default(),
            max_object_size: 1 << 20,
            coalesce_wait: Duration::from_secs(5),
            hit_for_pass: Duration::from_secs(120),
            allow_override_headers: Vec::new(),
        }
    }
}

/// One route's cache: its settings and counters over the shared store.
pub struct Cache {
    store: Arc<CacheStore>,
    cfg: CacheConfig,
    counters: CacheCounters,
    namespace: Arc<str>,
}

/// The parts of a request the cache looks at.
#[derive(Debug, Clone, Copy)]
pub struct Request<'a> {
    pub method: &'a Method,
    /// `http` or `https`.
    pub scheme: &'a str,
    /// Host (and port) the request is for.
    pub authority: &'a str,
    pub path_and_query: &'a str,
    pub headers: &'a HeaderMap,
}

/// The result of [`Cache::lookup`].
pub enum Lookup {
    /// Answer from cache (fresh, allowed stale, a 304 for the client's validators, or the
    /// `only-if-cached` 504). With `refresh`, also refresh the object in the background.
    Hit {
        response: http::Response<Bytes>,
        refresh: Option<Fetch>,
    },
    /// Go to the origin as [`Fetch::prepare`] says, then call [`Cache::response`].
    Miss(Fetch),
    /// Not a cache matter: forward as is. For unsafe methods call
    /// [`Cache::invalidate_after`] with the response.
    Bypass { unsafe_method: bool },
}

/// A plan for one origin fetch, carried from lookup to the response.
pub struct Fetch {
    key: Arc<str>,
    method: Method,
    req_headers: HeaderMap,
    qcc: CacheControl,
    request_time: SystemTime,
    stale: Option<Arc<StoredResponse>>,
    validators: Vec<(HeaderName, HeaderValue)>,
    strip_client_conditionals: bool,
    client_conditional: bool,
    guard: Option<FlightGuard>,
    fwd: &'static str,
    detail: Option<&'static str>,
    store_allowed: bool,
    background: bool,
    /// What the request counts as unless the cache serves it after all (304, stale).
    result: Count,
}

impl Fetch {
    /// Rewrites the upstream request's headers: the client's own validators are removed on a
    /// cacheable miss (the cache needs the full response; it answers them itself) and the
    /// stored object's validators are added when revalidating.
    pub fn prepare(&self, headers: &mut HeaderMap) {
        // Validating a stored object: only its validators may go, or a client's own
        // `If-None-Match: *` could win a 304 that freshens a stale object for everyone.
        if self.strip_client_conditionals || !self.validators.is_empty() {
            headers.remove(header::IF_NONE_MATCH);
            headers.remove(header::IF_MODIFIED_SINCE);
        }
        for (n, v) in &self.validators {
            headers.insert(n.clone(), v.clone());
        }
    }

    /// Whether this is a background refresh (its result is stored, not served).
    pub fn is_background(&self) -> bool {
        self.background
    }

    /// The request method to send upstream.
    pub fn method(&self) -> &Method {
        &self.method
    }
}

/// What to do with an origin response, from [`Cache::response`].
pub enum Outcome {
    /// Send this response from cache (a validated object, or stale on error) and discard the
    /// origin's body.
    Serve(http::Response<Bytes>),
    /// Forward the origin response (its headers have been amended with `Cache-Status`);
    /// with a `Store`, copy its body into it as it streams and call [`Store::finish`].
    Forward(Option<Store>),
    /// Send this 304 (the client's validators match the new response) and read the origin
    /// body into the `Store`, if any.
    NotModified(http::Response<Bytes>, Option<Store>),
}

/// A storable response whose body is on its way. Call [`Store::finish`] with the whole body,
/// or [`Store::too_large`] once it passes [`Store::max_body`]; dropping it (upstream failed
/// mid-body) stores nothing and lets the waiters go to the origin.
pub struct Store {
    cache: Arc<Cache>,
    fetch: Option<Fetch>,
    status: StatusCode,
    headers: HeaderMap,
    response_time: SystemTime,
    /// Bytes of the process-wide fill budget this body holds.
    reserved: u64,
}

impl Drop for Store {
    fn drop(&mut self) {
        self.cache.store.fill.give(self.reserved);
    }
}

impl Store {
    /// Makes room in the process-wide fill budget for `total` body bytes (what has been read
    /// so far, or the announced length). False: the budget is spent — drop the `Store` and
    /// stream the body through uncached (not a property of the URL: no hit-for-pass).
    pub fn reserve(&mut self, total: usize) -> bool {
        let total = total as u64;
        if total <= self.reserved {
            return true;
        }
        if !self.cache.store.fill.take(total - self.reserved) {
            return false;
        }
        self.reserved = total;
        true
    }

    /// The most body bytes that may be buffered; past it, drop the `Store`.
    pub fn max_body(&self) -> usize {
        self.cache.cfg.max_object_size
    }

    /// The body outgrew [`Store::max_body`]: counted, and the URL is passed through (not
    /// coalesced) for a while, like any other uncacheable one.
    pub fn too_large(mut self) {
        if let Some(f) = self.fetch.take() {
            self.cache.store.too_large.fetch_add(1, Ordering::Relaxed);
            self.cache.pass_for_a_while(&f, self.response_time);
        }
    }

    /// Stores the complete body. Returns false if it was not stored (too large).
    pub fn finish(mut self, body: Bytes) -> bool {
        let Some(fetch) = self.fetch.take() else {
            return false;
        };
        let c = &self.cache;
        if body.len() > c.cfg.max_object_size {
            c.store.too_large.fetch_add(1, Ordering::Relaxed);
            c.pass_for_a_while(&fetch, self.response_time);
            return false;
        }
        // A body that arrived as one frame is a slice of the connection's read buffer: kept
        // as it is, it would pin that whole buffer for the object's lifetime (3x the memory
        // tier's size under churn). The stored copy is exactly its own size.
        let body = Bytes::copy_from_slice(&body);
        let stored = policy::to_stored(
            &c.cfg.policy,
            &Method::GET,
            &fetch.req_headers,
            self.status,
            &self.headers,
            body,
            fetch.request_time,
            self.response_time,
        );
        match stored {
            Ok(s) => {
                c.insert_variant(&fetch.key, s, self.response_time);
                c.store.coalescer.clear_hit_for_pass(&fetch.key);
                true
            }
            Err(_) => false,
        }
        // `fetch` (and its flight guard) drops here, after the object is visible.
    }
}

impl Cache {
    /// `namespace` names the owner (a service, or a listener's route): it is part of every
    /// key, so caches of different owners over one store never answer for each other.
    pub fn new(store: Arc<CacheStore>, cfg: CacheConfig, namespace: &str) -> Arc<Self> {
        let namespace: Arc<str> = Arc::from(namespace);
        store
            .namespaces
            .lock()
            .expect("lock")
            .insert(namespace.clone());
        Arc::new(Cache {
            store,
            cfg,
            counters: CacheCounters::default(),
            namespace,
        })
    }

    /// The store key for a request's primary key (see [`namespaced`]).
    pub(crate) fn key(&self, scheme: &str, authority: &str, path_and_query: &str) -> String {
        namespaced(
            policy::primary_key_with_room(
                scheme,
                authority,
                path_and_query,
                self.namespace.len() + 1,
            ),
            &self.namespace,
        )
    }

    pub fn namespace(&self) -> &str {
        &self.namespace
    }

    pub fn counters(&self) -> &CacheCounters {
        &self.counters
    }

    pub fn store(&self) -> &Arc<CacheStore> {
        &self.store
    }

    pub fn config(&self) -> &CacheConfig {
        &self.cfg
    }

    /// The fast path's check: a response served straight from memory when a fresh object
    /// answers the request, with no waiting and no origin involvement; `None` otherwise (then
    /// call [`Cache::lookup`]).
    pub fn fresh_hit(&self, req: &Request<'_>, now: SystemTime) -> Option<http::Response<Bytes>> {
        if policy::classify_request(req.method, req.headers) != RequestClass::Cacheable {
            return None;
        }
        let key = self.key(req.scheme, req.authority, req.path_and_query);
        let m = self.store.memory.get(&key)?;
        let v = m.entry.find(req.headers)?;
        let qcc = CacheControl::parse(req.headers, true);
        if policy::reuse(&self.cfg.policy, v, &qcc, now) != Reuse::Fresh {
            return None;
        }
        self.counters.inc(Count::Hit);
        let cs = CacheStatus::hit(v.ttl(now));
        Some(policy::serve(
            v,
            req.method,
            req.headers,
            now,
            STATUS_NAME,
            &cs,
        ))
    }

    /// The cache phase of a request.
    pub async fn lookup(self: &Arc<Self>, req: &Request<'_>, now: SystemTime) -> Lookup {
        match policy::classify_request(req.method, req.headers) {
            RequestClass::Cacheable => {}
            RequestClass::Range => return self.range(req, now).await,
            RequestClass::Bypass(_) => {
                self.counters.inc(Count::Bypass);
                return Lookup::Bypass {
                    unsafe_method: false,
                };
            }
            RequestClass::Unsafe => {
                self.counters.inc(Count::Bypass);
                return Lookup::Bypass {
                    unsafe_method: true,
                };
            }
        }
        let key: Arc<str> = Arc::from(self.key(req.scheme, req.authority, req.path_and_query));
        let qcc = CacheControl::parse(req.headers, true);
        let mut waited = false;
        loop {
            let entry = self.store.get(&key, &self.cfg.policy, now).await;
            let variant = entry.as_ref().and_then(|e| e.find(req.headers)).cloned();
            let mut fwd = match (&entry, &variant) {
                (None, _) => "uri-miss",
                (Some(_), None) => "vary-miss",
                (Some(_), Some(_)) => "stale",
            };
            if let Some(v) = &variant {
                match policy::reuse(&self.cfg.policy, v, &qcc, now) {
                    Reuse::Fresh => {
                        self.counters.inc(Count::Hit);
                        let cs = CacheStatus::hit(v.ttl(now));
                        return self.hit(v, req, now, cs, None);
                    }
                    Reuse::StaleAllowed => {
                        self.counters.inc(Count::Stale);
                        let cs = CacheStatus::hit(v.ttl(now)).with_detail("max-stale");
                        return self.hit(v, req, now, cs, None);
                    }
                    Reuse::StaleWhileRevalidate => {
                        self.counters.inc(Count::Stale);
                        // One background refresh per URL; later requests just serve stale.
                        let refresh = self.store.coalescer.try_lead(&key).map(|g| {
                            let mut f = self.fetch(&key, req, &qcc, now, Some(v.clone()), "stale");
                            f.guard = Some(g);
                            f.background = true;
                            f
                        });
                        let cs = CacheStatus::hit(v.ttl(now)).with_detail("stale-while-revalidate");
                        return self.hit(v, req, now, cs, refresh);
                    }
                    Reuse::Validate => {
                        if qcc.no_cache.is_some() && !self.cfg.policy.ignore_request_no_cache {
                            fwd = "request";
                        }
                    }
                }
            }
            if qcc.only_if_cached {
                self.counters.inc(Count::Miss);
                let cs = CacheStatus {
                    ttl: variant.as_ref().map(|v| v.ttl(now)),
                    ..CacheStatus::fwd(fwd)
                }
                .with_detail("only-if-cached");
                // Nothing went forward: the member carries no `fwd`.
                let cs = CacheStatus { fwd: None, ..cs };
                return Lookup::Hit {
                    response: policy::gateway_timeout(STATUS_NAME, &cs),
                    refresh: None,
                };
            }
            let mut fetch = self.fetch(&key, req, &qcc, now, variant, fwd);
            if *req.method == Method::HEAD {
                // A HEAD response cannot fill the cache; never make GETs wait on it.
                fetch.store_allowed = false;
                return Lookup::Miss(fetch);
            }
            if self.store.coalescer.is_hit_for_pass(&key, now) {
                fetch.detail = Some("hit-for-pass");
                fetch.fwd = "bypass";
                // Nothing will be stored for the client's validators to be answered from:
                // let the origin answer them.
                fetch.strip_client_conditionals = false;
                fetch.client_conditional = false;
                fetch.result = Count::Bypass;
                return Lookup::Miss(fetch);
            }
            if waited {
                // Woken, yet nothing usable: go to the origin without waiting again.
                return Lookup::Miss(fetch);
            }
            match self.store.coalescer.join(&key) {
                Join::Leader(g) => {
                    fetch.guard = Some(g);
                    return Lookup::Miss(fetch);
                }
                Join::Follower(rx) => {
                    waited = true;
                    if !self.store.coalescer.wait(rx, self.cfg.coalesce_wait).await {
                        fetch.detail = Some("coalesce-timeout");
                        return Lookup::Miss(fetch);
                    }
                }
            }
        }
    }

    /// A range request: answered from a fresh stored response, else forwarded as it is (a
    /// partial answer is never stored, and the full object is not fetched for one range).
    async fn range(self: &Arc<Self>, req: &Request<'_>, now: SystemTime) -> Lookup {
        let key = self.key(req.scheme, req.authority, req.path_and_query);
        let qcc = CacheControl::parse(req.headers, true);
        let entry = self.store.get(&key, &self.cfg.policy, now).await;
        if let Some(v) = entry.as_ref().and_then(|e| e.find(req.headers)) {
            if policy::reuse(&self.cfg.policy, v, &qcc, now) == Reuse::Fresh {
                self.counters.inc(Count::Hit);
                let cs = CacheStatus::hit(v.ttl(now));
                return Lookup::Hit {
                    response: policy::serve_range(v, req.headers, now, STATUS_NAME, &cs),
                    refresh: None,
                };
            }
        }
        if qcc.only_if_cached {
            self.counters.inc(Count::Miss);
            let cs = CacheStatus::fwd("uri-miss").with_detail("only-if-cached");
            let cs = CacheStatus { fwd: None, ..cs };
            return Lookup::Hit {
                response: policy::gateway_timeout(STATUS_NAME, &cs),
                refresh: None,
            };
        }
        self.counters.inc(Count::Bypass);
        Lookup::Bypass {
            unsafe_method: false,
        }
    }

    fn hit(
        &self,
        v: &StoredResponse,
        req: &Request<'_>,
        now: SystemTime,
        cs: CacheStatus,
        refresh: Option<Fetch>,
    ) -> Lookup {
        Lookup::Hit {
            response: policy::serve(v, req.method, req.headers, now, STATUS_NAME, &cs),
            refresh,
        }
    }

    fn fetch(
        &self,
        key: &Arc<str>,
        req: &Request<'_>,
        qcc: &CacheControl,
        now: SystemTime,
        stale: Option<Arc<StoredResponse>>,
        fwd: &'static str,
    ) -> Fetch {
        let validators = stale
            .as_deref()
            .map(policy::validation_headers)
            .unwrap_or_default();
        let client_conditional = req.headers.contains_key(header::IF_NONE_MATCH)
            || req.headers.contains_key(header::IF_MODIFIED_SINCE);
        Fetch {
            key: key.clone(),
            method: req.method.clone(),
            req_headers: req.headers.clone(),
            qcc: qcc.clone(),
            request_time: now,
            stale,
            validators,
            strip_client_conditionals: *req.method == Method::GET,
            client_conditional,
            guard: None,
            fwd,
            detail: None,
            store_allowed: *req.method == Method::GET,
            background: false,
            result: Count::Miss,
        }
    }

    /// The origin answered `status`/`headers` (body not read yet) at `now`. Amends `headers`
    /// with `Cache-Status` when the response is forwarded.
    pub fn response(
        self: &Arc<Self>,
        fetch: Fetch,
        status: StatusCode,
        headers: &mut HeaderMap,
        now: SystemTime,
    ) -> Outcome {
        let cfg = &self.cfg.policy;
        let req = |f: &Fetch| (f.method.clone(), f.req_headers.clone());
        if status == StatusCode::NOT_MODIFIED && !fetch.validators.is_empty() {
            let stale = fetch
                .stale
                .clone()
                .expect("validators come from a stored object");
            let merged = policy::merge_not_modified(cfg, &stale, headers, fetch.request_time, now);
            self.insert_variant(&fetch.key, merged.clone(), now);
            self.count(&fetch, Count::Revalidated);
            let mut cs = CacheStatus::fwd(fetch.fwd);
            cs.fwd_status = Some(304);
            cs.stored = true;
            cs.ttl = Some(merged.ttl(now));
            let (m, h) = req(&fetch);
            let mut served = policy::serve(&merged, &m, &h, now, STATUS_NAME, &cs);
            relay_set_cookie(headers, served.headers_mut());
            return Outcome::Serve(served);
        }
        if let Some(stale) = &fetch.stale {
            if policy::is_error_status(status)
                && policy::stale_if_error_ok(&self.cfg.policy, stale, &fetch.qcc, now)
            {
                self.count(&fetch, Count::Stale);
                let mut cs = CacheStatus::hit(stale.ttl(now)).with_detail("stale-if-error");
                cs.fwd = Some("stale");
                cs.fwd_status = Some(status.as_u16());
                let (m, h) = req(&fetch);
                return Outcome::Serve(policy::serve(stale, &m, &h, now, STATUS_NAME, &cs));
            }
        }
        self.count(&fetch, fetch.result);
        let mut cs = CacheStatus::fwd(fetch.fwd);
        cs.fwd_status = Some(status.as_u16());
        cs.detail = fetch.detail;
        if fetch.method == Method::HEAD && status == StatusCode::OK {
            // A HEAD answer freshens the stored GET it describes (§4.3.5).
            if let Some(stale) = fetch
                .stale
                .as_ref()
                .filter(|s| policy::head_matches(s, headers))
            {
                let merged =
                    policy::merge_not_modified(cfg, stale, headers, fetch.request_time, now);
                self.insert_variant(&fetch.key, merged, now);
                cs.stored = true;
            }
        }
        if !fetch.store_allowed {
            cs.append_to(STATUS_NAME, headers);
            return Outcome::Forward(None);
        }
        if let Err(why) =
            policy::check_storable(cfg, &Method::GET, &fetch.req_headers, status, headers)
        {
            // Only the response's own properties make a URL hit-for-pass; a request
            // directive (no-store, Authorization) says nothing about the next request.
            let request_side = matches!(why, policy::NotStorable::Authorization)
                || CacheControl::parse(&fetch.req_headers, true).no_store;
            if !request_side {
                self.pass_for_a_while(&fetch, now);
            }
            cs.detail = cs.detail.or(Some(why.as_str()));
            cs.append_to(STATUS_NAME, headers);
            return Outcome::Forward(None);
        }
        let too_large = headers
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|s| s.parse::<u64>().ok())
            .is_some_and(|n| n > self.cfg.max_object_size as u64);
        if too_large {
            self.store.too_large.fetch_add(1, Ordering::Relaxed);
            self.pass_for_a_while(&fetch, now);
            cs.detail = cs.detail.or(Some("too-large"));
            cs.append_to(STATUS_NAME, headers);
            return Outcome::Forward(None);
        }
        cs.stored = true;
        // The client's own validators (removed upstream) are answered against the new response.
        let not_modified = fetch.client_conditional.then(|| {
            let probe = StoredResponse {
                status,
                headers: policy::storable_headers(
                    headers,
                    &policy::response_cc(cfg, headers).0,
                    cfg,
                ),
                body: Bytes::new(),
                request_time: now,
                response_time: now,
                age_value: 0,
                vary: Vec::new(),
                surrogate_keys: Vec::new(),
                meta: policy::compute_meta(cfg, status, headers),
                h1: Default::default(),
            };
            policy::client_not_modified(&probe, &fetch.req_headers).then(|| {
                policy::serve(
                    &probe,
                    &fetch.method,
                    &fetch.req_headers,
                    now,
                    STATUS_NAME,
                    &cs,
                )
            })
        });
        let store = Store {
            cache: self.clone(),
            fetch: Some(fetch),
            status,
            headers: headers.clone(),
            response_time: now,
            reserved: 0,
        };
        if let Some(Some(mut resp)) = not_modified {
            relay_set_cookie(headers, resp.headers_mut());
            return Outcome::NotModified(resp, Some(store));
        }
        cs.append_to(STATUS_NAME, headers);
        Outcome::Forward(Some(store))
    }

    /// The origin could not be reached (connect error, timeout): a stale object may stand in
    /// under `stale-if-error`. `None`: answer with the proxy's own error.
    pub fn origin_error(&self, fetch: Fetch, now: SystemTime) -> Option<http::Response<Bytes>> {
        let Some(stale) = fetch
            .stale
            .as_ref()
            .filter(|s| policy::stale_if_error_ok(&self.cfg.policy, s, &fetch.qcc, now))
        else {
            self.count(&fetch, fetch.result);
            return None;
        };
        self.count(&fetch, Count::Stale);
        let mut cs = CacheStatus::hit(stale.ttl(now)).with_detail("stale-if-error");
        cs.fwd = Some("stale");
        Some(policy::serve(
            stale,
            &fetch.method,
            &fetch.req_headers,
            now,
            STATUS_NAME,
            &cs,
        ))
        // The flight guard drops with `fetch`: waiters go upstream themselves.
    }

    /// After an unsafe request: invalidates the target URI and same-origin `Location` /
    /// `Content-Location` when the response is not an error (§4.4).
    pub fn invalidate_after(&self, req: &Request<'_>, status: StatusCode, headers: &HeaderMap) {
        for key in policy::invalidation_targets(
            req.scheme,
            req.authority,
            req.path_and_query,
            status,
            headers,
        ) {
            self.store
                .remove_local_and_remote(&namespaced(key, &self.namespace));
        }
    }

    /// Counts a fetched request once; background refreshes are not client requests.
    fn count(&self, fetch: &Fetch, result: Count) {
        if !fetch.background {
            self.counters.inc(result);
        }
    }

    fn insert_variant(&self, key: &str, v: StoredResponse, now: SystemTime) {
        let entry = match self.store.memory.get(key) {
            Some(m) => m.entry.with_variant(v),
            None => Entry::single(v),
        };
        self.store.put(key, entry, &self.cfg.policy, now);
    }

    fn pass_for_a_while(&self, fetch: &Fetch, now: SystemTime) {
        self.store
            .coalescer
            .set_hit_for_pass(&fetch.key, now + self.cfg.hit_for_pass);
    }

    /// Runs a whole request through the cache with a buffered origin: lookup, fetch (with
    /// one refetch if a 304 does not match), store. `origin` gets the method and the
    /// upstream request headers; `Err` means the origin could not be reached. Background
    /// refreshes for `stale-while-revalidate` are spawned on the current runtime.
    pub async fn handle<F, Fut, E>(
        self: &Arc<Self>,
        req: &Request<'_>,
        now: impl Fn() -> SystemTime + Send + Sync + Clone + 'static,
        origin: F,
    ) -> Result<http::Response<Bytes>, E>
    where
        F: Fn(Method, HeaderMap) -> Fut + Send + Sync + Clone + 'static,
        Fut: std::future::Future<Output = Result<http::Response<Bytes>, E>> + Send,
        E: Send + 'static,
    {
        match self.lookup(req, now()).await {
            Lookup::Hit { response, refresh } => {
                if let Some(f) = refresh {
                    let me = self.clone();
                    let headers = req.headers.clone();
                    tokio::spawn(async move {
                        // Failures only leave the stale object in place until it expires.
                        let _ = me.fetch_with(f, &headers, now, origin).await;
                    });
                }
                Ok(response)
            }
            Lookup::Miss(f) => self.fetch_with(f, req.headers, now, origin).await,
            Lookup::Bypass { unsafe_method } => {
                let mut resp = origin(req.method.clone(), req.headers.clone()).await?;
                if unsafe_method {
                    self.invalidate_after(req, resp.status(), resp.headers());
                }
                mark_bypass(resp.status(), resp.headers_mut());
                Ok(resp)
            }
        }
    }

    /// Carries out a fetch plan against a buffered origin (see [`Cache::handle`]).
    pub async fn fetch_with<F, Fut, E>(
        self: &Arc<Self>,
        fetch: Fetch,
        client_headers: &HeaderMap,
        now: impl Fn() -> SystemTime,
        origin: F,
    ) -> Result<http::Response<Bytes>, E>
    where
        F: Fn(Method, HeaderMap) -> Fut,
        Fut: std::future::Future<Output = Result<http::Response<Bytes>, E>>,
    {
        let mut headers = client_headers.clone();
        fetch.prepare(&mut headers);
        let method = fetch.method.clone();
        let resp = match origin(method, headers).await {
            Ok(r) => r,
            Err(e) => return self.origin_error(fetch, now()).ok_or(e),
        };
        let (mut parts, body) = resp.into_parts();
        match self.response(fetch, parts.status, &mut parts.headers, now()) {
            Outcome::Serve(r) => Ok(r),
            Outcome::Forward(store) => {
                if let Some(s) = store {
                    s.finish(body.clone());
                }
                Ok(http::Response::from_parts(parts, body))
            }
            Outcome::NotModified(r, store) => {
                if let Some(s) = store {
                    s.finish(body);
                }
                Ok(r)
            }
        }
    }
}
