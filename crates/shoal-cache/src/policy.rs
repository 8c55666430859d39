//! The RFC 9111 rules for a shared cache, as pure functions over `http` types and an
//! injected `now`. No I/O, no clock reads, no tokio: the tiers and the proxy call in here.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use http::header::{self, HeaderName, HeaderValue};
use http::{HeaderMap, Method, StatusCode};

use crate::directives::CacheControl;

/// Operator settings for one route's cache.
#[derive(Debug, Clone, PartialEq)]
pub struct PolicyConfig {
    /// Ignore request `no-cache`/`Pragma: no-cache` (clients forcing a refetch), as caches in
    /// front of an origin often must.
    pub ignore_request_no_cache: bool,
    /// Ignore response `private` and store anyway (for origins that mark everything private).
    pub ignore_private: bool,
    /// Freshness for responses without explicit freshness or `Last-Modified` (0: none).
    pub default_ttl: Duration,
    /// Upper bound on any freshness lifetime (0: none).
    pub max_ttl: Duration,
    /// Heuristic freshness as a fraction of the time since `Last-Modified` (§4.2.2).
    pub heuristic_fraction: f64,
    /// Cap on heuristic freshness.
    pub heuristic_max: Duration,
    /// How long a stale object that can be revalidated is kept after its stale windows.
    pub keep: Duration,
    /// How long a stale object may stand in when the origin fails and the response did not
    /// say (`stale-if-error` applied by default, like Varnish's grace; 0: only when told).
    pub stale_if_error: Duration,
    /// Store responses carrying `Set-Cookie` — as a copy without it, so a cookie is only
    /// ever sent to the client whose request made the origin set it. Off (the default), such
    /// responses pass through uncached (hit-for-pass), as Varnish's built-in VCL does.
    pub store_set_cookie: bool,
    /// Targeted cache-control fields (RFC 9213), most specific first: the first one present
    /// and valid replaces `Cache-Control` and `Expires` for this cache.
    pub targeted: Vec<HeaderName>,
}

/// The targeted fields every shoal cache obeys: `CDN-Cache-Control` (RFC 9213) and
/// `Surrogate-Control` (Edge Architecture 1.0); an operator's own field goes before them.
pub fn default_targeted() -> Vec<HeaderName> {
    vec![
        HeaderName::from_static("cdn-cache-control"),
        HeaderName::from_static("surrogate-control"),
    ]
}

/// The response's cache directives for this cache: a targeted field's if one applies, else
/// `Cache-Control`'s. The flag says whether a targeted field applied (then `Expires` does not).
pub fn response_cc(cfg: &PolicyConfig, h: &HeaderMap) -> (CacheControl, bool) {
    match crate::directives::parse_targeted(h, &cfg.targeted) {
        Some(cc) => (cc, true),
        None => (CacheControl::parse(h, false), false),
    }
}

impl Default for PolicyConfig {
    fn default() -> Self {
        PolicyConfig {
            ignore_request_no_cache: false,
            ignore_private: false,
            default_ttl: Duration::ZERO,
            max_ttl: Duration::ZERO,
            heuristic_fraction: 0.1,
            heuristic_max: Duration::from_secs(86_400),
            keep: Duration::from_secs(3_600),
            store_set_cookie: false,
            stale_if_error: Duration::ZERO,
            targeted: default_targeted(),
        }
    }
}

/// Status codes a response may be stored with under heuristic freshness (RFC 9110 §15.1).
pub fn heuristically_cacheable(status: StatusCode) -> bool {
    matches!(
        status.as_u16(),
        200 | 203 | 204 | 300 | 301 | 308 | 404 | 405 | 410 | 414 | 501
    )
}

/// Status codes shoal's semantics are known for (for `must-understand`, §5.2.2.3).
fn understood(status: StatusCode) -> bool {
    matches!(
        status.as_u16(),
        200 | 203 | 204 | 300 | 301 | 302 | 303 | 307 | 308 | 404 | 405 | 410 | 414 | 501
    )
}

/// Headers that describe a connection (or a proxy's authentication), not a resource: never
/// stored (§3.1).
const HOP_BY_HOP: [&str; 10] = [
    "connection",
    "keep-alive",
    "proxy-connection",
    "te",
    "transfer-encoding",
    "upgrade",
    "proxy-authenticate",
    "proxy-authentication-info",
    "proxy-authorization",
    "trailer",
];

/// Request headers some frameworks let override the URL, method or scheme an origin serves.
/// They are not part of the cache key, so on a cached route they would let one client store
/// a different resource under a URL that others then receive: the proxy drops them there.
pub const OVERRIDE_HEADERS: [&str; 12] = [
    "x-original-url",
    "x-rewrite-url",
    "x-original-uri",
    "x-override-url",
    "x-http-method-override",
    "x-http-method",
    "x-method-override",
    "x-forwarded-scheme",
    "x-forwarded-ssl",
    "x-forwarded-server",
    "x-host",
    "x-original-host",
];

/// The response header that tags objects for purging (as Fastly does).
pub const SURROGATE_KEY: &str = "surrogate-key";
/// RFC 9211 field.
pub const CACHE_STATUS: &str = "cache-status";

/// What the request path should do with a request before looking anything up.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RequestClass {
    /// GET or HEAD that may be answered from cache.
    Cacheable,
    /// Not served from or stored in cache (why, for `Cache-Status` `detail`).
    Bypass(&'static str),
    /// An unsafe method: forward, and invalidate on success (§4.4).
    Unsafe,
    /// A GET with `Range` (and perhaps `If-Range`): answered from a stored complete response
    /// when one is fresh, else forwarded as is and not stored.
    Range,
}

/// Classifies a request (§3, §4): only GET/HEAD are looked up; range and precondition
/// requests other than `If-None-Match`/`If-Modified-Since` go straight through.
pub fn classify_request(method: &Method, headers: &HeaderMap) -> RequestClass {
    if *method == Method::GET || *method == Method::HEAD {
        if headers.contains_key(header::IF_MATCH)
            || headers.contains_key(header::IF_UNMODIFIED_SINCE)
        {
            return RequestClass::Bypass("precondition");
        }
        if headers.contains_key(header::UPGRADE) {
            return RequestClass::Bypass("upgrade");
        }
        // Range applies to GET only (RFC 9110 §14.2); If-Range without Range is ignored.
        if *method == Method::GET && headers.contains_key(header::RANGE) {
            return RequestClass::Range;
        }
        return RequestClass::Cacheable;
    }
    if *method == Method::OPTIONS || *method == Method::TRACE || *method == Method::CONNECT {
        return RequestClass::Bypass("method");
    }
    RequestClass::Unsafe
}

/// A primary cache key: the target URI (§4); GET and HEAD share it.
pub fn primary_key(scheme: &str, authority: &str, path_and_query: &str) -> String {
    primary_key_with_room(scheme, authority, path_and_query, 0)
}

/// [`primary_key`] with `extra` bytes of spare capacity (for the store's namespace suffix,
/// so a fast-path hit builds its key in one allocation).
pub fn primary_key_with_room(
    scheme: &str,
    authority: &str,
    path_and_query: &str,
    extra: usize,
) -> String {
    let mut k =
        String::with_capacity(scheme.len() + authority.len() + path_and_query.len() + 4 + extra);
    k.push_str(scheme);
    k.push_str("://");
    k.push_str(&authority.to_ascii_lowercase());
    k.push_str(if path_and_query.is_empty() {
        "/"
    } else {
        path_and_query
    });
    k
}

/// A stored response: headers (hop-by-hop removed), body and the times §4.2.3 needs.
#[derive(Debug, Clone)]
pub struct StoredResponse {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Bytes,
    /// When the request that fetched (or last validated) it was sent.
    pub request_time: SystemTime,
    /// When its response arrived.
    pub response_time: SystemTime,
    /// The `Age` the origin side sent (seconds).
    pub age_value: u64,
    /// The request's values of the fields named by `Vary` (`None`: absent).
    pub vary: Vec<(HeaderName, Option<String>)>,
    /// Purge tags from `Surrogate-Key` (removed from the served headers).
    pub surrogate_keys: Vec<String>,
    pub meta: Meta,
    /// The HTTP/1.1 head for fast-path hits, rendered on first use.
    pub h1: std::sync::OnceLock<crate::fast::H1Head>,
}

/// Everything derived from the stored headers, computed once at store/merge/decode time.
#[derive(Debug, Clone, Default)]
pub struct Meta {
    /// Freshness lifetime (§4.2.1), seconds.
    pub lifetime: u64,
    /// Whether `lifetime` is heuristic (§4.2.2).
    pub heuristic: bool,
    /// `must-revalidate`, `proxy-revalidate` or `s-maxage`: never served stale (§4.2.4).
    pub no_stale: bool,
    /// Unqualified `no-cache`: validate before every reuse (§5.2.2.4).
    pub no_cache: bool,
    pub stale_while_revalidate: u64,
    pub stale_if_error: u64,
    pub etag: Option<HeaderValue>,
    pub last_modified: Option<SystemTime>,
    pub date: Option<SystemTime>,
}

/// Why a response is not stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NotStorable {
    Method,
    Status,
    NoStore,
    Private,
    Authorization,
    VaryStar,
    SetCookie,
    NoFreshness,
}

impl NotStorable {
    pub fn as_str(self) -> &'static str {
        match self {
            NotStorable::Method => "method",
            NotStorable::Status => "status",
            NotStorable::NoStore => "no-store",
            NotStorable::Private => "private",
            NotStorable::Authorization => "authorization",
            NotStorable::VaryStar => "vary-star",
            NotStorable::SetCookie => "set-cookie",
            NotStorable::NoFreshness => "no-freshness",
        }
    }
}

/// Decides whether a response to `method`/`req_headers` may be stored by a shared cache (§3,
/// §3.5) and, if so, builds the stored form. `body` is the complete body.
pub fn to_stored(
    cfg: &PolicyConfig,
    method: &Method,
    req_headers: &HeaderMap,
    status: StatusCode,
    resp_headers: &HeaderMap,
    body: Bytes,
    request_time: SystemTime,
    response_time: SystemTime,
) -> Result<StoredResponse, NotStorable> {
    check_storable(cfg, method, req_headers, status, resp_headers)?;
    let (rcc, _) = response_cc(cfg, resp_headers);
    let mut headers = storable_headers(resp_headers, &rcc, cfg);
    if headers
        .get(header::DATE)
        .and_then(parse_http_date)
        .is_none()
    {
        // A cache with a clock adds Date to a response that lacks one, or replaces an
        // invalid one, with the time of receipt (RFC 9110 §6.6.1).
        headers.insert(header::DATE, http_date(response_time));
    }
    let age_value = age_value(resp_headers);
    let vary = vary_values(resp_headers, req_headers).ok_or(NotStorable::VaryStar)?;
    let surrogate_keys = take_surrogate_keys(&mut headers);
    if status != StatusCode::NO_CONTENT {
        // The stored body is complete: its length frames it, however it arrived.
        headers.insert(header::CONTENT_LENGTH, HeaderValue::from(body.len()));
    }
    let meta = compute_meta(cfg, status, &headers);
    let s = StoredResponse {
        status,
        headers,
        body,
        request_time,
        response_time,
        age_value,
        vary,
        surrogate_keys,
        meta,
        h1: Default::default(),
    };
    // Useless to keep: never fresh, no way to validate, no stale window.
    if s.meta.lifetime == 0
        && s.meta.etag.is_none()
        && s.meta.last_modified.is_none()
        && s.meta.stale_if_error == 0
    {
        return Err(NotStorable::NoFreshness);
    }
    Ok(s)
}

/// §3 and §3.5 without building anything.
pub fn check_storable(
    cfg: &PolicyConfig,
    method: &Method,
    req_headers: &HeaderMap,
    status: StatusCode,
    resp_headers: &HeaderMap,
) -> Result<(), NotStorable> {
    if *method != Method::GET {
        return Err(NotStorable::Method);
    }
    // Final responses only; no partial content or 304 stored on their own.
    if status.is_informational()
        || status == StatusCode::PARTIAL_CONTENT
        || status == StatusCode::NOT_MODIFIED
    {
        return Err(NotStorable::Status);
    }
    let (rcc, targeted) = response_cc(cfg, resp_headers);
    let qcc = CacheControl::parse(req_headers, true);
    if rcc.must_understand {
        // must-understand overrides no-store for understood status codes (§5.2.2.3).
        if !understood(status) {
            return Err(NotStorable::Status);
        }
    } else if rcc.no_store {
        return Err(NotStorable::NoStore);
    }
    if qcc.no_store {
        return Err(NotStorable::NoStore);
    }
    if rcc.private_all() && !cfg.ignore_private {
        return Err(NotStorable::Private);
    }
    if req_headers.contains_key(header::AUTHORIZATION)
        && !(rcc.must_revalidate || rcc.public || rcc.s_maxage.is_some())
    {
        return Err(NotStorable::Authorization);
    }
    if resp_headers.get_all(header::VARY).iter().any(|v| {
        v.to_str()
            .is_ok_and(|s| s.split(',').any(|f| f.trim() == "*"))
    }) {
        return Err(NotStorable::VaryStar);
    }
    if !cfg.store_set_cookie && resp_headers.contains_key(header::SET_COOKIE) {
        return Err(NotStorable::SetCookie);
    }
    let explicit = rcc.s_maxage.is_some()
        || rcc.max_age.is_some()
        || (!targeted && resp_headers.contains_key(header::EXPIRES));
    if !(explicit || rcc.public || heuristically_cacheable(status)) {
        return Err(NotStorable::Status);
    }
    Ok(())
}

/// Headers to store: hop-by-hop fields, fields named by `Connection`, `Age` (recomputed on
/// every reuse), `Set-Cookie` (one client's, never another's) and fields named by qualified
/// `private`/`no-cache` removed.
pub fn storable_headers(h: &HeaderMap, rcc: &CacheControl, cfg: &PolicyConfig) -> HeaderMap {
    let mut out = owned_headers(h);
    strip_hop_by_hop(&mut out);
    out.remove(header::AGE);
    out.remove(header::SET_COOKIE);
    let mut lists: Vec<&Vec<String>> = rcc.no_cache.iter().collect();
    if !cfg.ignore_private {
        lists.extend(rcc.private.iter());
    }
    for f in lists.into_iter().flatten() {
        if let Ok(n) = HeaderName::from_bytes(f.as_bytes()) {
            out.remove(n);
        }
    }
    out
}

/// A copy of `h` that shares no memory with it. Parsed header values (and unknown names) are
/// slices of the connection's read buffer: a stored object holding them would pin that whole
/// buffer for its lifetime, several times the object's own size under churn.
pub fn owned_headers(h: &HeaderMap) -> HeaderMap {
    let mut out = HeaderMap::with_capacity(h.len());
    for (n, v) in h {
        let name = HeaderName::from_bytes(n.as_str().as_bytes()).unwrap_or_else(|_| n.clone());
        let mut value = HeaderValue::from_bytes(v.as_bytes()).unwrap_or_else(|_| v.clone());
        value.set_sensitive(v.is_sensitive());
        out.append(name, value);
    }
    out
}

/// Removes hop-by-hop fields and the fields `Connection` names.
pub fn strip_hop_by_hop(h: &mut HeaderMap) {
    let named: Vec<HeaderName> = h
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|s| s.split(','))
        .filter_map(|f| HeaderName::from_bytes(f.trim().as_bytes()).ok())
        .collect();
    for n in named {
        h.remove(n);
    }
    for n in HOP_BY_HOP {
        h.remove(n);
    }
}

fn take_surrogate_keys(h: &mut HeaderMap) -> Vec<String> {
    let mut keys: Vec<String> = h
        .get_all(SURROGATE_KEY)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|s| s.split_ascii_whitespace())
        .map(str::to_string)
        .collect();
    keys.sort();
    keys.dedup();
    h.remove(SURROGATE_KEY);
    keys
}

/// The `Age` a response came with (§5.1): the first member of the first field line (a
/// parameter after `;` ignored); anything not delta-seconds counts as absent (0).
pub fn age_value(h: &HeaderMap) -> u64 {
    h.get(header::AGE)
        .and_then(|v| v.to_str().ok())
        .and_then(|s| s.split([',', ';']).next())
        .and_then(crate::directives::parse_delta)
        .unwrap_or(0)
}

/// The request's values for the response's `Vary` fields; `None` for `Vary: *`.
pub fn vary_values(
    resp_headers: &HeaderMap,
    req_headers: &HeaderMap,
) -> Option<Vec<(HeaderName, Option<String>)>> {
    let mut out: Vec<(HeaderName, Option<String>)> = Vec::new();
    for v in resp_headers.get_all(header::VARY) {
        let s = v.to_str().ok()?;
        for f in s.split(',') {
            let f = f.trim();
            if f.is_empty() {
                continue;
            }
            if f == "*" {
                return None;
            }
            let Ok(name) = HeaderName::from_bytes(f.as_bytes()) else {
                return None;
            };
            if out.iter().any(|(n, _)| *n == name) {
                continue;
            }
            let val = normalized_field(req_headers, &name);
            out.push((name, val));
        }
    }
    Some(out)
}

/// All lines of a field joined by ", " with whitespace around members removed (§4.1 allows
/// such normalisation), or `None` when absent.
fn normalized_field(h: &HeaderMap, name: &HeaderName) -> Option<String> {
    normalize_values(h.get_all(name).iter().map(|v| v.as_bytes()))
}

/// [`normalized_field`] over raw field values (the fast path's parsed headers).
pub(crate) fn normalize_values<'a>(vals: impl Iterator<Item = &'a [u8]>) -> Option<String> {
    let mut it = vals.peekable();
    it.peek()?;
    let mut parts = Vec::new();
    for v in it {
        let s = String::from_utf8_lossy(v);
        for p in s.split(',') {
            let p = p.split_whitespace().collect::<Vec<_>>().join(" ");
            if !p.is_empty() {
                parts.push(p);
            }
        }
    }
    Some(parts.join(", "))
}

/// Whether a stored variant answers this request (§4.1).
pub fn vary_matches(stored: &StoredResponse, req_headers: &HeaderMap) -> bool {
    stored
        .vary
        .iter()
        .all(|(name, val)| normalized_field(req_headers, name) == *val)
}

/// Derives freshness and validator facts from stored headers (§4.2.1, §4.2.2, §5.2.2).
pub fn compute_meta(cfg: &PolicyConfig, status: StatusCode, h: &HeaderMap) -> Meta {
    let (rcc, targeted) = response_cc(cfg, h);
    let date = h.get(header::DATE).and_then(parse_http_date);
    let last_modified = h.get(header::LAST_MODIFIED).and_then(parse_http_date);
    let etag = h.get(header::ETAG).cloned();
    let mut heuristic = false;
    let mut lifetime = if let Some(s) = rcc.s_maxage {
        s
    } else if let Some(m) = rcc.max_age {
        m
    } else if let Some(exp) = h.get(header::EXPIRES).filter(|_| !targeted) {
        // An invalid Expires (e.g. "0") means already expired.
        match (parse_http_date(exp), date) {
            (Some(e), Some(d)) => secs_between(d, e),
            _ => 0,
        }
    } else if rcc.public || heuristically_cacheable(status) {
        match (last_modified, date) {
            (Some(lm), Some(d)) if lm < d => {
                heuristic = true;
                let f = secs_between(lm, d) as f64 * cfg.heuristic_fraction;
                (f as u64).min(cfg.heuristic_max.as_secs())
            }
            _ => cfg.default_ttl.as_secs(),
        }
    } else {
        0
    };
    if !cfg.max_ttl.is_zero() {
        lifetime = lifetime.min(cfg.max_ttl.as_secs());
    }
    Meta {
        lifetime,
        heuristic,
        no_stale: rcc.must_revalidate || rcc.proxy_revalidate || rcc.s_maxage.is_some(),
        no_cache: rcc.no_cache_all(),
        stale_while_revalidate: rcc.stale_while_revalidate.unwrap_or(0),
        stale_if_error: rcc.stale_if_error.unwrap_or(0),
        etag,
        last_modified,
        date,
    }
}

impl StoredResponse {
    /// current_age (§4.2.3), seconds.
    pub fn current_age(&self, now: SystemTime) -> u64 {
        let date = self.meta.date.unwrap_or(self.response_time);
        let apparent_age = secs_between(date, self.response_time);
        let response_delay = secs_between(self.request_time, self.response_time);
        let corrected_age_value = self.age_value.saturating_add(response_delay);
        let corrected_initial_age = apparent_age.max(corrected_age_value);
        let resident_time = secs_between(self.response_time, now);
        corrected_initial_age.saturating_add(resident_time)
    }

    /// Seconds of freshness left (negative: stale by that much).
    pub fn ttl(&self, now: SystemTime) -> i64 {
        self.meta.lifetime as i64 - self.current_age(now) as i64
    }

    /// How long the tiers should keep it from `now`: the rest of its freshness, its stale
    /// windows and, when it can be validated, the configured keep time.
    pub fn keep_for(&self, now: SystemTime, cfg: &PolicyConfig) -> Duration {
        let fresh = self.ttl(now).max(0) as u64;
        let stale = if self.meta.no_stale {
            0
        } else {
            self.meta
                .stale_while_revalidate
                .max(self.meta.stale_if_error)
                .max(cfg.stale_if_error.as_secs())
        };
        let keep = if self.meta.etag.is_some() || self.meta.last_modified.is_some() {
            cfg.keep.as_secs()
        } else {
            0
        };
        Duration::from_secs(fresh + stale.max(keep)).max(Duration::from_secs(1))
    }

    /// Approximate memory held, for weighing.
    pub fn weight(&self) -> usize {
        let h: usize = self
            .headers
            .iter()
            .map(|(n, v)| n.as_str().len() + v.len() + 32)
            .sum();
        self.body.len() + h + 256
    }
}

/// How a stored response may be used for a request (§4.2.4, §5.2.1, RFC 5861).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reuse {
    /// Fresh enough for this request.
    Fresh,
    /// Stale, within `stale-while-revalidate`: serve it and refresh in the background.
    StaleWhileRevalidate,
    /// Stale, but the request's `max-stale` accepts it.
    StaleAllowed,
    /// Must be validated with the origin first (or refetched if it has no validator).
    Validate,
}

/// Decides reuse of `stored` for a request with directives `qcc` (§4, §4.2.4, §5.2.1).
pub fn reuse(
    cfg: &PolicyConfig,
    stored: &StoredResponse,
    qcc: &CacheControl,
    now: SystemTime,
) -> Reuse {
    let age = stored.current_age(now);
    let lifetime = stored.meta.lifetime;
    if stored.meta.no_cache {
        return Reuse::Validate;
    }
    if qcc.no_cache.is_some() && !cfg.ignore_request_no_cache {
        return Reuse::Validate;
    }
    if let Some(max_age) = qcc.max_age {
        if age > max_age {
            return Reuse::Validate;
        }
    }
    let fresh = lifetime > age;
    if fresh {
        let left = lifetime - age;
        if qcc.min_fresh.is_some_and(|m| left < m) {
            return Reuse::Validate;
        }
        return Reuse::Fresh;
    }
    if stored.meta.no_stale {
        return Reuse::Validate;
    }
    let staleness = age - lifetime;
    let max_stale_ok = match qcc.max_stale {
        Some(None) => true,
        Some(Some(n)) => staleness <= n,
        None => false,
    };
    if max_stale_ok && qcc.min_fresh.is_none() {
        return Reuse::StaleAllowed;
    }
    if staleness < stored.meta.stale_while_revalidate && qcc.max_age.is_none() {
        return Reuse::StaleWhileRevalidate;
    }
    Reuse::Validate
}

/// Whether `stale-if-error` (request or response directive, RFC 5861 §4) or the operator's
/// default window lets `stored` stand in for an origin error now. The operator's window never
/// overrides `must-revalidate`, `proxy-revalidate`, `s-maxage` or `no-cache` (§4.2.4).
pub fn stale_if_error_ok(
    cfg: &PolicyConfig,
    stored: &StoredResponse,
    qcc: &CacheControl,
    now: SystemTime,
) -> bool {
    // must-revalidate, proxy-revalidate, s-maxage and no-cache forbid serving stale (§4.2.4);
    // nothing a client sends can loosen that.
    if stored.meta.no_stale || stored.meta.no_cache {
        return false;
    }
    let staleness = (-stored.ttl(now)).max(0) as u64;
    let explicit = qcc
        .stale_if_error
        .or((stored.meta.stale_if_error > 0).then_some(stored.meta.stale_if_error));
    let window = explicit.unwrap_or(cfg.stale_if_error.as_secs());
    window > 0 && staleness <= window
}

/// An origin outcome that `stale-if-error` covers: 500, 502, 503, 504.
pub fn is_error_status(status: StatusCode) -> bool {
    matches!(status.as_u16(), 500 | 502 | 503 | 504)
}

/// The conditional headers to send to the origin to validate `stored` (§4.3.1).
pub fn validation_headers(stored: &StoredResponse) -> Vec<(HeaderName, HeaderValue)> {
    let mut out = Vec::new();
    if let Some(e) = &stored.meta.etag {
        out.push((header::IF_NONE_MATCH, e.clone()));
    }
    if let Some(lm) = stored.headers.get(header::LAST_MODIFIED) {
        if stored.meta.last_modified.is_some() {
            out.push((header::IF_MODIFIED_SINCE, lm.clone()));
        }
    }
    out
}

/// Fields a 304 (or HEAD) answer never changes in the stored response: they describe the
/// stored body and the representation that was validated (§3.2: a 304 to a validation the
/// cache sent refers to that stored response, whatever tag it carries).
const KEPT_ON_UPDATE: [HeaderName; 5] = [
    header::CONTENT_LENGTH,
    header::CONTENT_ENCODING,
    header::CONTENT_RANGE,
    HeaderName::from_static("content-md5"),
    header::ETAG,
];

/// Updates a stored response from a 304 (or HEAD) response (§3.2, §4.3.4): every field of
/// the new response replaces the stored one, except hop-by-hop fields and those that
/// describe the stored body ([`KEPT_ON_UPDATE`]).
pub fn merge_not_modified(
    cfg: &PolicyConfig,
    stored: &StoredResponse,
    resp_headers: &HeaderMap,
    request_time: SystemTime,
    response_time: SystemTime,
) -> StoredResponse {
    let (rcc, _) = response_cc(cfg, resp_headers);
    let mut incoming = storable_headers(resp_headers, &rcc, cfg);
    for n in &KEPT_ON_UPDATE {
        incoming.remove(n);
    }
    let mut new_keys = take_surrogate_keys(&mut incoming);
    let mut headers = stored.headers.clone();
    let mut last: Option<HeaderName> = None;
    for (name, value) in incoming.into_iter() {
        match name {
            Some(n) => {
                headers.insert(n.clone(), value);
                last = Some(n);
            }
            None => {
                if let Some(n) = &last {
                    headers.append(n.clone(), value);
                }
            }
        }
    }
    if !resp_headers.contains_key(header::DATE) {
        headers.insert(header::DATE, http_date(response_time));
    }
    let mut keys = stored.surrogate_keys.clone();
    if !new_keys.is_empty() {
        keys = std::mem::take(&mut new_keys);
    }
    let age_value = age_value(resp_headers);
    let meta = compute_meta(cfg, stored.status, &headers);
    StoredResponse {
        status: stored.status,
        headers,
        body: stored.body.clone(),
        request_time,
        response_time,
        age_value,
        vary: stored.vary.clone(),
        surrogate_keys: keys,
        meta,
        h1: Default::default(),
    }
}

/// Whether a `200` answer to `HEAD` describes `stored` (§4.3.5): the same `Content-Length`
/// where both have one, and a matching strong `ETag`, else `Last-Modified`, else no
/// validators on either side.
pub fn head_matches(stored: &StoredResponse, resp_headers: &HeaderMap) -> bool {
    let cl = |h: &HeaderMap| h.get(header::CONTENT_LENGTH).cloned();
    if let (Some(a), Some(b)) = (cl(&stored.headers), cl(resp_headers)) {
        if a != b {
            return false;
        }
    }
    match (&stored.meta.etag, resp_headers.get(header::ETAG)) {
        (Some(old), Some(new)) => {
            return !old.as_bytes().starts_with(b"W/") && old == new;
        }
        (None, None) => {}
        _ => return false,
    }
    let new_lm = resp_headers
        .get(header::LAST_MODIFIED)
        .and_then(parse_http_date);
    stored.meta.last_modified == new_lm
}

fn etag_strip_weak(b: &[u8]) -> &[u8] {
    b.strip_prefix(b"W/").unwrap_or(b)
}

/// Evaluates the client's own `If-None-Match` / `If-Modified-Since` against a stored
/// response (§4.3.2, RFC 9110 §13.1): true when a 304 answers it.
pub fn client_not_modified(stored: &StoredResponse, req_headers: &HeaderMap) -> bool {
    if stored.status != StatusCode::OK {
        return false;
    }
    let inm: Vec<&HeaderValue> = req_headers.get_all(header::IF_NONE_MATCH).iter().collect();
    if !inm.is_empty() {
        let Some(etag) = &stored.meta.etag else {
            return false;
        };
        let mine = etag_strip_weak(etag.as_bytes());
        return inm.iter().any(|v| {
            v.as_bytes().split(|&b| b == b',').any(|t| {
                let t = t.trim_ascii();
                t == b"*" || etag_strip_weak(t) == mine
            })
        });
    }
    if let Some(ims) = req_headers
        .get(header::IF_MODIFIED_SINCE)
        .and_then(parse_http_date)
    {
        let reference = stored
            .meta
            .last_modified
            .or(stored.meta.date)
            .unwrap_or(stored.response_time);
        return reference <= ims;
    }
    false
}

/// Headers a 304 generated from a stored response leaves out (RFC 9110 §15.4.5).
const NOT_IN_304: [HeaderName; 5] = [
    header::CONTENT_LENGTH,
    header::CONTENT_TYPE,
    header::CONTENT_ENCODING,
    header::CONTENT_RANGE,
    header::CONTENT_LANGUAGE,
];

/// What the cache reports in `Cache-Status` (RFC 9211) for one response.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CacheStatus {
    pub hit: bool,
    /// `fwd` parameter: `bypass`, `uri-miss`, `vary-miss`, `miss`, `request`, `stale`.
    pub fwd: Option<&'static str>,
    pub fwd_status: Option<u16>,
    pub stored: bool,
    pub ttl: Option<i64>,
    pub detail: Option<&'static str>,
}

impl CacheStatus {
    pub fn hit(ttl: i64) -> Self {
        CacheStatus {
            hit: true,
            fwd: None,
            fwd_status: None,
            stored: false,
            ttl: Some(ttl),
            detail: None,
        }
    }
    pub fn fwd(fwd: &'static str) -> Self {
        CacheStatus {
            hit: false,
            fwd: Some(fwd),
            fwd_status: None,
            stored: false,
            ttl: None,
            detail: None,
        }
    }
    pub fn with_detail(mut self, d: &'static str) -> Self {
        self.detail = Some(d);
        self
    }

    /// The list member, e.g. `shoal; fwd=uri-miss; fwd-status=200; stored; ttl=60`.
    pub fn render(&self, name: &str) -> String {
        let mut s = String::from(name);
        if self.hit {
            s.push_str("; hit");
        }
        if let Some(f) = self.fwd {
            s.push_str("; fwd=");
            s.push_str(f);
        }
        if let Some(c) = self.fwd_status {
            s.push_str(&format!("; fwd-status={c}"));
        }
        if self.stored {
            s.push_str("; stored");
        }
        if let Some(t) = self.ttl {
            s.push_str(&format!("; ttl={t}"));
        }
        if let Some(d) = self.detail {
            s.push_str("; detail=");
            s.push_str(d);
        }
        s
    }

    /// Adds this cache's member to the end of the `Cache-Status` list (RFC 9211 §2).
    pub fn append_to(&self, name: &str, h: &mut HeaderMap) {
        let member = self.render(name);
        let value = match h.get(CACHE_STATUS).and_then(|v| v.to_str().ok()) {
            Some(prev) if !prev.trim().is_empty() => format!("{prev}, {member}"),
            _ => member,
        };
        if let Ok(v) = HeaderValue::from_str(&value) {
            h.insert(CACHE_STATUS, v);
        }
    }
}

/// Builds the response a stored object serves: `Age` set, a 304 if the client's validators
/// match, no body for HEAD (§4, §4.3.2).
pub fn serve(
    stored: &StoredResponse,
    method: &Method,
    req_headers: &HeaderMap,
    now: SystemTime,
    status_name: &str,
    cache_status: &CacheStatus,
) -> http::Response<Bytes> {
    let not_modified = client_not_modified(stored, req_headers);
    let mut headers = stored.headers.clone();
    let age = stored.current_age(now);
    headers.insert(header::AGE, HeaderValue::from(age));
    cache_status.append_to(status_name, &mut headers);
    let (status, body) = if not_modified {
        for n in &NOT_IN_304 {
            headers.remove(n);
        }
        (StatusCode::NOT_MODIFIED, Bytes::new())
    } else if *method == Method::HEAD {
        (stored.status, Bytes::new())
    } else {
        (stored.status, stored.body.clone())
    };
    let mut resp = http::Response::new(body);
    *resp.status_mut() = status;
    *resp.headers_mut() = headers;
    resp
}

/// One satisfiable byte range of a body of `len` bytes (RFC 9110 §14.1.2), as `start..end`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ByteRange {
    Satisfiable(u64, u64),
    /// No range of the set overlaps the body: 416.
    Unsatisfiable,
    /// Several ranges, another unit or a malformed field: the whole body answers (a server
    /// may ignore Range).
    Whole,
}

/// Parses a `Range` field for a body of `len` bytes; only single ranges are served as 206.
pub fn byte_range(v: &HeaderValue, len: u64) -> ByteRange {
    let Ok(s) = v.to_str() else {
        return ByteRange::Whole;
    };
    let s = s.trim();
    let Some(set) = s
        .get(..6)
        .filter(|u| u.eq_ignore_ascii_case("bytes="))
        .map(|_| &s[6..])
    else {
        return ByteRange::Whole;
    };
    if set.contains(',') {
        return ByteRange::Whole;
    }
    let Some((a, b)) = set.trim().split_once('-') else {
        return ByteRange::Whole;
    };
    let num = |x: &str| -> Option<Option<u64>> {
        let x = x.trim();
        if x.is_empty() {
            return Some(None);
        }
        if !x.bytes().all(|c| c.is_ascii_digit()) {
            return None;
        }
        Some(Some(x.parse::<u64>().unwrap_or(u64::MAX)))
    };
    let (Some(first), Some(last)) = (num(a), num(b)) else {
        return ByteRange::Whole;
    };
    match (first, last) {
        // An invalid range is ignored (the whole response), before satisfiability.
        (Some(f), Some(l)) if l < f => ByteRange::Whole,
        (Some(f), _) if f >= len => ByteRange::Unsatisfiable,
        (Some(f), Some(l)) => ByteRange::Satisfiable(f, l.min(len - 1) + 1),
        (Some(f), None) => ByteRange::Satisfiable(f, len),
        (None, Some(0)) => ByteRange::Unsatisfiable,
        (None, Some(_)) if len == 0 => ByteRange::Unsatisfiable,
        (None, Some(n)) => ByteRange::Satisfiable(len - n.min(len), len),
        (None, None) => ByteRange::Whole,
    }
}

/// Whether `If-Range` lets the range apply to `stored` (RFC 9110 §13.1.5): a strong entity
/// tag equal to the stored one, or the stored `Last-Modified` exactly, when it is strong
/// (at least a second before `Date`). Absent: it applies.
pub fn if_range_matches(stored: &StoredResponse, req_headers: &HeaderMap) -> bool {
    let Some(v) = req_headers.get(header::IF_RANGE) else {
        return true;
    };
    let b = v.as_bytes();
    if b.starts_with(b"\"") {
        return stored
            .meta
            .etag
            .as_ref()
            .is_some_and(|e| !e.as_bytes().starts_with(b"W/") && e.as_bytes() == b);
    }
    if b.starts_with(b"W/") {
        return false;
    }
    match (
        parse_http_date(v),
        stored.meta.last_modified,
        stored.meta.date,
    ) {
        (Some(t), Some(lm), Some(date)) => t == lm && secs_between(lm, date) >= 1,
        _ => false,
    }
}

/// A range request answered from a complete stored 200 (RFC 9110 §14, §15.3.7): 206 with
/// `Content-Range` for one satisfiable range, 416 for none, the whole response when the
/// range does not apply (several ranges, failed `If-Range`). The client's own validators
/// come first (a 304).
pub fn serve_range(
    stored: &StoredResponse,
    req_headers: &HeaderMap,
    now: SystemTime,
    status_name: &str,
    cache_status: &CacheStatus,
) -> http::Response<Bytes> {
    let range = req_headers
        .get(header::RANGE)
        .filter(|_| stored.status == StatusCode::OK && if_range_matches(stored, req_headers))
        .map(|v| byte_range(v, stored.body.len() as u64));
    let whole = serve(
        stored,
        &Method::GET,
        req_headers,
        now,
        status_name,
        cache_status,
    );
    if whole.status() == StatusCode::NOT_MODIFIED {
        return whole;
    }
    let len = stored.body.len() as u64;
    let (mut parts, body) = whole.into_parts();
    match range {
        Some(ByteRange::Satisfiable(a, b)) => {
            parts.status = StatusCode::PARTIAL_CONTENT;
            let cr = format!("bytes {a}-{}/{len}", b - 1);
            parts.headers.insert(
                header::CONTENT_RANGE,
                HeaderValue::from_str(&cr).expect("ASCII"),
            );
            parts
                .headers
                .insert(header::CONTENT_LENGTH, HeaderValue::from(b - a));
            http::Response::from_parts(parts, body.slice(a as usize..b as usize))
        }
        Some(ByteRange::Unsatisfiable) => {
            parts.status = StatusCode::RANGE_NOT_SATISFIABLE;
            let cr = format!("bytes */{len}");
            parts.headers.insert(
                header::CONTENT_RANGE,
                HeaderValue::from_str(&cr).expect("ASCII"),
            );
            parts
                .headers
                .insert(header::CONTENT_LENGTH, HeaderValue::from(0u32));
            http::Response::from_parts(parts, Bytes::new())
        }
        _ => http::Response::from_parts(parts, body),
    }
}

/// The 504 answering `only-if-cached` when nothing usable is stored (§5.2.1.7).
pub fn gateway_timeout(status_name: &str, cache_status: &CacheStatus) -> http::Response<Bytes> {
    let mut resp = http::Response::new(Bytes::from_static(b"not cached\n"));
    *resp.status_mut() = StatusCode::GATEWAY_TIMEOUT;
    resp.headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain"));
    resp.headers_mut()
        .insert(header::CONTENT_LENGTH, HeaderValue::from(11u32));
    cache_status.append_to(status_name, resp.headers_mut());
    resp
}

/// Keys to invalidate after an unsafe request (§4.4): the target URI and, when on the same
/// host, the `Location` and `Content-Location` of a non-error response.
pub fn invalidation_targets(
    scheme: &str,
    authority: &str,
    path_and_query: &str,
    status: StatusCode,
    resp_headers: &HeaderMap,
) -> Vec<String> {
    if !(status.is_success() || status.is_redirection()) {
        return Vec::new();
    }
    let mut out = vec![primary_key(scheme, authority, path_and_query)];
    for name in [header::LOCATION, header::CONTENT_LOCATION] {
        let Some(v) = resp_headers.get(&name).and_then(|v| v.to_str().ok()) else {
            continue;
        };
        if let Some(rest) = v.strip_prefix('/') {
            if !rest.starts_with('/') {
                out.push(primary_key(scheme, authority, v));
            }
        } else if !v.contains(':') {
            // A relative path: resolved against the request's (RFC 3986 §5.2).
            out.push(primary_key(scheme, authority, &resolve(path_and_query, v)));
        } else if let Ok(uri) = v.parse::<http::Uri>() {
            // Absolute: same origin only (a different host could be abused to purge others).
            if let (Some(s), Some(a)) = (uri.scheme_str(), uri.authority()) {
                if s.eq_ignore_ascii_case(scheme) && a.as_str().eq_ignore_ascii_case(authority) {
                    let pq = uri.path_and_query().map(|p| p.as_str()).unwrap_or("/");
                    out.push(primary_key(scheme, authority, pq));
                }
            }
        }
    }
    out.dedup();
    out
}

/// A relative-path reference resolved against `base` (a path and query): merged with the
/// base's directory, dot segments removed (RFC 3986 §5.2.2–5.2.4).
fn resolve(base: &str, rel: &str) -> String {
    let base_path = base.split(['?', '#']).next().unwrap_or("/");
    let dir = &base_path[..base_path.rfind('/').map_or(0, |i| i + 1)];
    let (rel_path, query) = match rel.find(['?', '#']) {
        Some(i) => (&rel[..i], &rel[i..]),
        None => (rel, ""),
    };
    let merged = format!("{dir}{rel_path}");
    let mut out: Vec<&str> = Vec::new();
    let segments: Vec<&str> = merged.split('/').collect();
    for (i, seg) in segments.iter().enumerate() {
        let last = i + 1 == segments.len();
        match *seg {
            ".." => {
                if out.len() > 1 {
                    out.pop();
                }
                if last {
                    out.push("");
                }
            }
            "." => {
                if last {
                    out.push("");
                }
            }
            s => out.push(s),
        }
    }
    let mut path = out.join("/");
    if !path.starts_with('/') {
        path.insert(0, '/');
    }
    let query = query.split('#').next().unwrap_or("");
    format!("{path}{query}")
}

/// Whole seconds from `a` to `b`, 0 if `b` is earlier.
pub fn secs_between(a: SystemTime, b: SystemTime) -> u64 {
    b.duration_since(a).map(|d| d.as_secs()).unwrap_or(0)
}

/// An HTTP-date in any of the three formats (RFC 9110 §5.6.7). Case and a weekday that does
/// not match the date are forgiven (as most caches do); anything else (other zones, missing
/// comma, extra spaces, one-digit hours, two-digit years outside RFC 850) is invalid.
pub fn parse_http_date(v: &HeaderValue) -> Option<SystemTime> {
    let s = v.to_str().ok()?.trim();
    if let Ok(t) = httpdate::parse_http_date(s) {
        return Some(t);
    }
    // Title-case the names (`GMT` upper), then try each weekday in place of the given one.
    let mut fixed = String::with_capacity(s.len());
    let mut word = String::new();
    let flush = |word: &mut String, out: &mut String| {
        if word.eq_ignore_ascii_case("gmt") {
            out.push_str("GMT");
        } else {
            let mut cs = word.chars();
            if let Some(c) = cs.next() {
                out.push(c.to_ascii_uppercase());
                out.extend(cs.map(|c| c.to_ascii_lowercase()));
            }
        }
        word.clear();
    };
    for c in s.chars() {
        if c.is_ascii_alphabetic() {
            word.push(c);
        } else {
            flush(&mut word, &mut fixed);
            fixed.push(c);
        }
    }
    flush(&mut word, &mut fixed);
    let day_len = fixed.find([',', ' '])?;
    const DAYS: [&str; 7] = ["Mon", "Tue", "Wed", "Thu", "Fri", "Sat", "Sun"];
    const LONG: [&str; 7] = [
        "Monday",
        "Tuesday",
        "Wednesday",
        "Thursday",
        "Friday",
        "Saturday",
        "Sunday",
    ];
    let long = LONG.iter().any(|d| *d == &fixed[..day_len]);
    if !long && !DAYS.iter().any(|d| *d == &fixed[..day_len]) {
        return None;
    }
    let rest = &fixed[day_len..];
    let names = if long { LONG } else { DAYS };
    names
        .iter()
        .find_map(|d| httpdate::parse_http_date(&format!("{d}{rest}")).ok())
}

pub fn http_date(t: SystemTime) -> HeaderValue {
    let t = t.max(UNIX_EPOCH);
    HeaderValue::from_str(&httpdate::fmt_http_date(t)).expect("http dates are ASCII")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stored_headers_share_no_memory_with_the_read_buffer() {
        // A parsed head: every value a slice of one large read buffer.
        let buf = bytes::Bytes::from(vec![b'a'; 64 << 10]);
        let range = buf.as_ptr() as usize..buf.as_ptr() as usize + buf.len();
        let mut h = HeaderMap::new();
        h.insert(
            header::ETAG,
            HeaderValue::from_maybe_shared(buf.slice(0..8)).unwrap(),
        );
        let custom = HeaderName::from_bytes(b"x-custom").unwrap();
        let mut secret = HeaderValue::from_maybe_shared(buf.slice(8..16)).unwrap();
        secret.set_sensitive(true);
        h.append(custom.clone(), secret);
        h.append(
            custom.clone(),
            HeaderValue::from_maybe_shared(buf.slice(16..24)).unwrap(),
        );
        let rcc = CacheControl::default();
        let out = storable_headers(&h, &rcc, &PolicyConfig::default());
        assert_eq!(out, h);
        assert_eq!(out.get_all(&custom).iter().count(), 2);
        assert!(out.get(&custom).unwrap().is_sensitive());
        for v in out.values() {
            assert!(
                !range.contains(&(v.as_bytes().as_ptr() as usize)),
                "a stored value still points into the read buffer"
            );
        }
    }
}
