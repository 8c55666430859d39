//! The cache phase: shoal-cache wired into both request paths. Settings come from `cache`
//! tables (per service or per route) over one process-wide store (`[cache]` or the quick-mode
//! flags); storable bodies of known length are read whole and stored, bodies of unknown
//! length are copied as they stream (`Tee`) and stored if they end within the object limit;
//! stale-while-revalidate refreshes run as background fetches.

use std::time::SystemTime;

use bytes::Bytes;
use http::header::{self, HeaderMap};
use http::{Method, Response, Uri};
use http_body_util::{BodyExt, Either, Full};
use serde::Deserialize;
use shoal_cache::{Cache, CacheConfig, Fetch, Outcome, PolicyConfig, Store};
use std::sync::Arc;

use crate::config::{parse_size, Dur};
use crate::error::ProxyError;
use crate::proxy::{ClientBody, Service, Tracked};

/// A `cache` table of a service or route.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct CacheTable {
    /// Largest body stored, e.g. "1MiB"; bigger ones (and bodies of unknown length) stream
    /// through uncached.
    pub max_object_size: String,
    /// Freshness for responses with neither explicit freshness nor `Last-Modified` (0: none).
    pub default_ttl: Dur,
    /// Cap on any freshness lifetime (0: none).
    pub max_ttl: Dur,
    /// Serve a stale object this long when the origin fails and it did not say
    /// (`stale-if-error` by default; never overrides `must-revalidate`).
    pub stale_if_error: Dur,
    /// How long objects that can be revalidated are kept after they go stale.
    pub keep: Dur,
    /// Ignore request `Cache-Control: no-cache` / `Pragma: no-cache` from clients.
    pub ignore_no_cache: bool,
    /// Store responses marked `private` anyway.
    pub ignore_private: bool,
    /// Store a copy without `Set-Cookie` of responses that set cookies (off: such responses
    /// pass through uncached, as Varnish does; the cookie is never replayed to others).
    pub store_set_cookie: bool,
    /// The operator's own targeted cache-control field (RFC 9213), e.g.
    /// "Shoal-Cache-Control": obeyed before `CDN-Cache-Control` and `Surrogate-Control`,
    /// which are obeyed before `Cache-Control`.
    pub targeted_cache_control: String,
    /// Request headers that change what an origin serves without being in the cache key
    /// (`X-Original-URL`, `X-HTTP-Method-Override`, ...) are dropped on cached routes; these
    /// are forwarded anyway.
    pub allow_override_headers: Vec<String>,
    /// How long a request waits for another one fetching the same URL.
    pub coalesce_wait: Dur,
    /// How long a URL found uncacheable is passed straight through (no coalescing).
    pub hit_for_pass: Dur,
}

impl Default for CacheTable {
    fn default() -> Self {
        let c = CacheConfig::default();
        CacheTable {
            max_object_size: "1MiB".into(),
            default_ttl: Dur(c.policy.default_ttl),
            max_ttl: Dur(c.policy.max_ttl),
            stale_if_error: Dur(c.policy.stale_if_error),
            keep: Dur(c.policy.keep),
            ignore_no_cache: c.policy.ignore_request_no_cache,
            ignore_private: c.policy.ignore_private,
            store_set_cookie: c.policy.store_set_cookie,
            targeted_cache_control: String::new(),
            allow_override_headers: Vec::new(),
            coalesce_wait: Dur(c.coalesce_wait),
            hit_for_pass: Dur(c.hit_for_pass),
        }
    }
}

/// Checks a `cache` table; an error names the key.
pub fn cache_settings(v: &toml::Value) -> Result<CacheConfig, (String, String)> {
    let t: CacheTable = v
        .clone()
        .try_into()
        .map_err(|e: toml::de::Error| (String::new(), e.message().trim().to_string()))?;
    let max = parse_size(&t.max_object_size).map_err(|e| ("max_object_size".into(), e))?;
    if max == 0 || max > 1 << 30 {
        return Err((
            "max_object_size".into(),
            "must be between 1 byte and 1GiB".into(),
        ));
    }
    let mut targeted = shoal_cache::policy::default_targeted();
    if !t.targeted_cache_control.is_empty() {
        let name =
            http::HeaderName::from_bytes(t.targeted_cache_control.as_bytes()).map_err(|_| {
                (
                    "targeted_cache_control".to_string(),
                    "not a header name".to_string(),
                )
            })?;
        targeted.retain(|n| *n != name);
        targeted.insert(0, name);
    }
    let mut allow_override_headers = Vec::new();
    for (i, h) in t.allow_override_headers.iter().enumerate() {
        let name = http::HeaderName::from_bytes(h.as_bytes()).map_err(|_| {
            (
                format!("allow_override_headers[{i}]"),
                format!("{h:?} is not a header name"),
            )
        })?;
        allow_override_headers.push(name);
    }
    Ok(CacheConfig {
        allow_override_headers,
        policy: PolicyConfig {
            targeted,
            ignore_request_no_cache: t.ignore_no_cache,
            ignore_private: t.ignore_private,
            default_ttl: t.default_ttl.0,
            max_ttl: t.max_ttl.0,
            keep: t.keep.0,
            store_set_cookie: t.store_set_cookie,
            stale_if_error: t.stale_if_error.0,
            ..PolicyConfig::default()
        },
        max_object_size: max as usize,
        coalesce_wait: t.coalesce_wait.0,
        hit_for_pass: t.hit_for_pass.0,
    })
}

/// The upstream request headers of a cached route: the headers that would change what the
/// origin serves without being part of the cache key are dropped (web cache poisoning
/// through `X-Original-URL` and the like) unless the route allows them, and shoal announces
/// itself as a surrogate (`Surrogate-Capability`), so `Surrogate-Control` can target it.
pub(crate) fn upstream_headers(cache: &Cache, headers: &mut HeaderMap, host: Option<&str>) {
    let allowed = &cache.config().allow_override_headers;
    for name in shoal_cache::policy::OVERRIDE_HEADERS {
        if !allowed.iter().any(|a| a.as_str() == name) {
            headers.remove(name);
        }
    }
    // A trusted proxy's `X-Forwarded-Host` would change absolute links without being in the
    // key: the origin hears the host the key holds. (Its protocol is keyed: `key_scheme`.)
    if let Some(v) = host.and_then(|h| http::HeaderValue::from_str(h).ok()) {
        if !allowed.iter().any(|a| a.as_str() == "x-forwarded-host") {
            headers.insert("x-forwarded-host", v);
        }
    }
    headers.append(
        "surrogate-capability",
        http::HeaderValue::from_static(shoal_cache::directives::SURROGATE_CAPABILITY),
    );
}

/// The scheme a cache key uses: `https` when a trusted proxy in front says so in
/// `X-Forwarded-Proto` (which then reaches the origin, so it must be part of the key: an
/// `http` request's redirect to `https` must never answer `https` requests), else the
/// listener's own scheme (`own`).
pub(crate) fn key_scheme(trusted: bool, headers: &HeaderMap, own: &'static str) -> &'static str {
    let https = trusted
        && headers
            .get("x-forwarded-proto")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.split(',').next())
            .is_some_and(|p| p.trim().eq_ignore_ascii_case("https"));
    if https {
        "https"
    } else {
        own
    }
}

/// A response served from cache, as the general path sends it.
pub(crate) fn full(r: Response<Bytes>) -> Response<ClientBody> {
    r.map(|b| Either::Right(Full::new(b)))
}

/// Runs the origin's response through the cache: served from cache (304 merged, stale on
/// error), stored (a known length within the object limit is read whole first), or streamed.
pub(crate) async fn after_response(
    cache: &Arc<Cache>,
    fetch: Fetch,
    mut parts: http::response::Parts,
    body: Tracked,
) -> Result<Response<ClientBody>, ProxyError> {
    match cache.response(fetch, parts.status, &mut parts.headers, SystemTime::now()) {
        Outcome::Serve(r) => Ok(full(r)),
        Outcome::Forward(None) => Ok(Response::from_parts(parts, Either::Left(body))),
        Outcome::Forward(Some(mut store)) => {
            match read_if_small(&parts.headers, body, &mut store).await {
                Read::Whole(bytes) => {
                    store.finish(bytes.clone());
                    Ok(Response::from_parts(parts, Either::Right(Full::new(bytes))))
                }
                Read::TooLarge(body) => {
                    store.too_large();
                    Ok(Response::from_parts(parts, Either::Left(body)))
                }
                // The fill budget is spent: streamed through, the Store dropped unused.
                Read::NoBudget(body) => {
                    drop(store);
                    Ok(Response::from_parts(parts, Either::Left(body)))
                }
                // Unknown length (chunked, until close): streamed to the client and copied
                // for the cache up to the object limit.
                Read::Unknown(mut body) => {
                    body.tee(Tee::new(store));
                    Ok(Response::from_parts(parts, Either::Left(body)))
                }
                Read::Failed => Err(ProxyError::Upstream("upstream response body failed")),
            }
        }
        Outcome::NotModified(r, store) => {
            // The client gets a 304; the body is only for the cache (read up to the limit).
            if let Some(mut store) = store {
                match read_if_small(&parts.headers, body, &mut store).await {
                    Read::Whole(b) => {
                        store.finish(b);
                    }
                    Read::Unknown(mut body) => {
                        body.tee(Tee::new(store));
                        // Read for the copy only: once it is given up (too large, no budget)
                        // the rest is not worth reading; dropping the body closes it.
                        while body.teeing() {
                            match body.frame().await {
                                Some(Ok(_)) => {}
                                _ => break,
                            }
                        }
                    }
                    Read::TooLarge(_) => store.too_large(),
                    Read::NoBudget(_) | Read::Failed => {}
                }
            }
            Ok(full(r))
        }
    }
}

/// A copy of a response body of unknown length on its way to the client, for the cache:
/// stored when the body ends within the object limit; past the limit the copy stops (the
/// client's stream goes on) and the URL is passed through for a while.
pub(crate) struct Tee {
    store: Option<Store>,
    parts: Vec<Bytes>,
    len: usize,
}

impl Tee {
    pub(crate) fn new(store: Store) -> Self {
        Tee {
            store: Some(store),
            parts: Vec::new(),
            len: 0,
        }
    }

    /// Copies one data frame; false once the copy is given up (too large).
    pub(crate) fn push(&mut self, data: &Bytes) -> bool {
        let Some(store) = &mut self.store else {
            return false;
        };
        self.len += data.len();
        if self.len > store.max_body() {
            self.parts = Vec::new();
            if let Some(s) = self.store.take() {
                s.too_large();
            }
            return false;
        }
        if !store.reserve(self.len) {
            // The process-wide fill budget is spent: give the copy up (not the URL's fault).
            self.parts = Vec::new();
            self.store = None;
            return false;
        }
        // `Bytes` clones share the frame's buffer: nothing is copied until `finish`.
        self.parts.push(data.clone());
        true
    }

    /// The body ended whole: store it.
    pub(crate) fn finish(mut self) {
        if let Some(s) = self.store.take() {
            let body = match self.parts.len() {
                1 => self.parts.pop().unwrap_or_default(),
                _ => Bytes::from(self.parts.concat()),
            };
            s.finish(body);
        }
    }
}

enum Read {
    Whole(Bytes),
    TooLarge(Tracked),
    NoBudget(Tracked),
    Unknown(Tracked),
    Failed,
}

async fn read_if_small(h: &HeaderMap, body: Tracked, store: &mut Store) -> Read {
    let len = h
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|s| s.parse::<u64>().ok());
    let max = store.max_body();
    match len {
        Some(n) if n <= max as u64 && !store.reserve(n as usize) => Read::NoBudget(body),
        Some(n) if n <= max as u64 => match body.collect().await {
            // Tracked enforces the upstream read timeout per frame.
            Ok(c) => Read::Whole(c.to_bytes()),
            Err(_) => Read::Failed,
        },
        Some(_) => Read::TooLarge(body),
        None => Read::Unknown(body),
    }
}

/// Refreshes a stale-while-revalidate object in the background: one try on the service,
/// the answer stored (or merged) and nothing sent anywhere.
pub(crate) fn spawn_refresh(
    svc: Arc<Service>,
    cache: Arc<Cache>,
    fetch: Fetch,
    target: Uri,
    headers: HeaderMap,
    key: Option<Vec<u8>>,
) {
    let limit = cache.config().max_object_size;
    tokio::spawn(async move {
        let origin = |m: Method, h: HeaderMap| {
            let (svc, target, key) = (svc.clone(), target.clone(), key.clone());
            async move { svc.fetch_whole(m, target, h, key.as_deref(), limit).await }
        };
        if let Err(e) = cache
            .fetch_with(fetch, &headers, SystemTime::now, origin)
            .await
        {
            tracing::debug!(service = %svc.name, error = ?e, "cache: background refresh failed");
        }
    });
}

/// `Cache-Status` for a request that passed a cached route untouched.
pub(crate) fn mark_bypass(parts: &mut http::response::Parts) {
    shoal_cache::mark_bypass(parts.status, &mut parts.headers);
}

/// The authority a cache key uses (Host or absolute-form), as text.
pub(crate) fn host_str(authority: Option<&[u8]>) -> Option<&str> {
    authority.and_then(|a| std::str::from_utf8(a).ok())
}

#[cfg(test)]
mod tests {
    use crate::config::Config;
    use std::path::Path;
    use std::time::Duration;

    fn parse(t: &str) -> Result<Config, crate::config::ConfigError> {
        Config::parse(Path::new("shoal.toml"), t)
    }

    #[test]
    fn cache_tables_per_service_and_route_with_a_store() {
        let c = parse(
            "[cache]\nmemory = \"32MiB\"\nredis = \"redis://127.0.0.1:6379/\"\n\
             [services.web]\nlisten = \"127.0.0.1:8080\"\nbackends = [\"127.0.0.1:9001\"]\n\
             [services.web.cache]\nmax_object_size = \"64KiB\"\ndefault_ttl = \"30s\"\n\
             [[services.web.routes]]\nprefix = \"/static\"\n\
             [services.web.routes.cache]\nignore_no_cache = true\nstale_if_error = \"5m\"\n\
             [[services.web.routes]]\nprefix = \"/api\"\n",
        )
        .unwrap();
        let store = c.cache.as_ref().unwrap();
        assert_eq!(store.memory, 32 << 20);
        assert_eq!(store.redis.as_deref(), Some("redis://127.0.0.1:6379/"));
        let web = &c.services[0];
        let own = web.cache.as_ref().unwrap();
        assert_eq!(own.max_object_size, 64 << 10);
        assert_eq!(own.policy.default_ttl, Duration::from_secs(30));
        let r = web.routes[0].cache.as_ref().unwrap();
        assert!(r.policy.ignore_request_no_cache);
        assert_eq!(r.policy.stale_if_error, Duration::from_secs(300));
        assert!(web.routes[1].cache.is_none());
    }

    #[test]
    fn cache_errors_name_file_line_and_field() {
        let e = parse(
            "[services.web]\nlisten = \"127.0.0.1:8080\"\n[services.web.cache]\nttl = \"1s\"\n",
        )
        .unwrap_err();
        assert_eq!(e.field, "services.web.cache", "{e}");
        assert!(e.message.contains("ttl"), "{e}");
        let e = parse(
            "[services.web]\nlisten = \"127.0.0.1:8080\"\n[services.web.cache]\ndefault_ttl = \"1s\"\nmax_object_size = \"lots\"\n",
        )
        .unwrap_err();
        assert_eq!(
            (e.line, e.field.as_str()),
            (5, "services.web.cache.max_object_size"),
            "{e}"
        );
        let e = parse(
            "[services.web]\nlisten = \"127.0.0.1:8080\"\n[services.web.cache]\ntargeted_cache_control = \"bad header\"\n",
        )
        .unwrap_err();
        assert_eq!(e.field, "services.web.cache.targeted_cache_control", "{e}");
        let e = parse(
            "[services.web]\nlisten = \"127.0.0.1:8080\"\n[services.web.cache]\nallow_override_headers = [\"X-Ok\", \"no good\"]\n",
        )
        .unwrap_err();
        assert_eq!(
            e.field, "services.web.cache.allow_override_headers[1]",
            "{e}"
        );
        let c = parse(
            "[cache]\nfill_memory = \"8MiB\"\n[services.web]\nlisten = \"127.0.0.1:8080\"\n[services.web.cache]\ntargeted_cache_control = \"Shoal-Cache-Control\"\nallow_override_headers = [\"X-HTTP-Method-Override\"]\n",
        )
        .unwrap();
        assert_eq!(c.cache.as_ref().unwrap().fill_memory, 8 << 20);
        let own = c.services[0].cache.as_ref().unwrap();
        assert_eq!(own.policy.targeted[0], "shoal-cache-control");
        assert_eq!(own.allow_override_headers[0], "x-http-method-override");
        let e =
            parse("[cache]\nredis = \"localhost\"\n[services.web]\nlisten = \"127.0.0.1:8080\"\n")
                .unwrap_err();
        assert_eq!((e.line, e.field.as_str()), (2, "cache.redis"), "{e}");
    }
}
