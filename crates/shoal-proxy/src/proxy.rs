//! A service and its general request path (hyper: HTTP/1.x hand-overs and h2c).
//!
//! Every request, on either path, goes through the same phases in this order:
//! 1. **admit** — connection and head limits (`server.rs`, [`crate::hygiene::inspect`]);
//! 2. **hygiene** — RFC 9110/9112 checks and the upstream header set ([`crate::hygiene`]);
//! 3. **route** — host/path/method → target service, path rewrite ([`Service::route`]);
//!    job URLs (`{jobs_path}/{id}`) on a listener with an async route are answered before it;
//! 4. **cache** — answer from cache or plan the fetch ([`crate::cache`]);
//! 5. **async** — an async route's request becomes a job: 202 + `Location` once the broker
//!    confirmed it ([`crate::jobs`]);
//! 6. **try** — pick an instance, send, retry within budget ([`crate::tries`]);
//! 7. **respond** — response hygiene ([`crate::hygiene::response_header_kept`]), relay;
//! 8. **log** — metrics recorded by [`Service::end_try`] and the body guards.
//!
//! Errors become responses in one place, [`ProxyError`].

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicU8, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use arc_swap::{ArcSwap, ArcSwapOption};
use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Request, Response, StatusCode, Uri, Version};
use http_body::{Body, Frame, SizeHint};
use http_body_util::{BodyExt, Either, Full};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;

use crate::config::ServiceConfig;
pub use crate::error::ProxyError;
use crate::hygiene::{self, BodyKind, Line, Origin};
use crate::metrics::{CodeCounters, Counter, Histogram};
use crate::pool::{now_nanos, ErrorKind, Pool, PoolSettings};
use crate::route::RouteTable;
pub(crate) use crate::tries::{hash_key, is_idempotent};
pub use crate::tries::{InFlight, RetryBudget};
use crate::upstream;

/// A client request's body: hyper's stream, or bytes the fast path has read whole.
pub(crate) enum ReqBody {
    Incoming(Incoming),
    Read(Bytes),
}

/// Body sent upstream: buffered (replayable, so retriable) or streamed from the client.
pub type UpstreamBody = Either<Full<Bytes>, ClientStream>;
/// Body sent to the client.
pub type ClientBody = Either<Tracked, Full<Bytes>>;

/// Requests with a known body up to this size are buffered so that a retry can resend them.
pub(crate) const REPLAY_LIMIT: u64 = 64 * 1024;
/// How long a gRPC stream without a deadline may go without a frame.
const GRPC_QUIET: Duration = Duration::from_secs(24 * 3600);
/// Largest gRPC-Web request body (gRPC's default largest message).
const WEB_LIMIT: u64 = 4 << 20;

/// Bytes of request bodies buffered right now, across every service, and the cap on it.
static BUFFERED: AtomicU64 = AtomicU64::new(0);
static BUFFER_LIMIT: AtomicU64 = AtomicU64::new(crate::config::DEFAULT_BUFFER_MEMORY);

/// Sets the memory budget for buffered request bodies (`buffer_memory`).
pub fn set_buffer_memory(bytes: u64) {
    BUFFER_LIMIT.store(bytes, Ordering::Relaxed);
}

/// Bytes of request bodies buffered right now.
pub fn buffered_bytes() -> u64 {
    BUFFERED.load(Ordering::Relaxed)
}

/// A share of the body budget, returned on drop. Past the budget a body is streamed instead,
/// so that request gets no retry but memory stays bounded.
pub(crate) struct BufferPermit(u64);

impl BufferPermit {
    pub(crate) fn take(n: u64) -> Option<BufferPermit> {
        if n == 0 {
            return Some(BufferPermit(0));
        }
        let limit = BUFFER_LIMIT.load(Ordering::Relaxed);
        BUFFERED
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |b| {
                (b + n <= limit).then_some(b + n)
            })
            .ok()
            .map(|_| BufferPermit(n))
    }
}

impl Drop for BufferPermit {
    fn drop(&mut self) {
        if self.0 > 0 {
            BUFFERED.fetch_sub(self.0, Ordering::AcqRel);
        }
    }
}

/// Per-service counters that are not per instance.
#[derive(Debug, Default)]
pub struct ServiceMetrics {
    /// Time from request start to response headers, for answers from an instance.
    pub duration: Histogram,
    /// Responses shoal produced itself (no instance involved): 4xx rejects, 502/503/504.
    pub local: CodeCounters,
    pub retries: Counter,
    pub retry_budget_exhausted: Counter,
    pub requests: Counter,
    /// Tries the client broke (malformed or cut-short body, too slow): never an instance's fault.
    pub client_errors: Counter,
    /// gRPC calls by `grpc-status` (0–16; 17: anything else), from instances and shoal.
    pub grpc: Arc<[Counter; 18]>,
}

/// A proxied service: its settings, pool and counters, and (when it listens) its routes.
pub struct Service {
    pub name: String,
    pub pool: Arc<Pool>,
    pub config: ArcSwap<ServiceConfig>,
    pub metrics: ServiceMetrics,
    pub budget: RetryBudget,
    /// The listener's route table; None sends everything to this service.
    pub routes: ArcSwapOption<RouteTable>,
    /// The cache phase for requests this service serves without a route.
    pub cache: ArcSwapOption<shoal_cache::Cache>,
    /// TLS termination on this service's listener (set by `App` from `tls`).
    pub tls: ArcSwapOption<crate::tls::Terminator>,
}

/// `Strict-Transport-Security` for a `max-age`.
pub(crate) fn hsts_value(age: std::time::Duration) -> HeaderValue {
    HeaderValue::from_str(&format!("max-age={}", age.as_secs())).expect("digits")
}

/// Pool settings derived from a service config.
pub fn pool_settings(cfg: &ServiceConfig) -> PoolSettings {
    PoolSettings {
        algorithm: cfg.balance,
        slow_start: cfg.slow_start,
        outlier: cfg.outlier.clone(),
        active_health: cfg.health.as_ref().map(|h| (h.rise, h.fall)),
    }
}

/// Where the route phase sends a request.
pub(crate) struct Routed {
    /// None: the listening service itself.
    pub target: Option<Arc<Service>>,
    /// The rewritten path and query, if the route rewrites.
    pub path: Option<String>,
    /// The prefix the route replaced, for `X-Forwarded-Prefix`.
    pub prefix: Option<String>,
    /// The cache phase that applies (the route's, or the service's own without routes).
    pub cache: Option<Arc<shoal_cache::Cache>>,
    /// The async phase of the route.
    pub jobs: crate::route::AsyncPhase,
}

impl Service {
    pub fn new(cfg: ServiceConfig) -> Arc<Service> {
        let pool = Pool::new(&cfg.name, pool_settings(&cfg));
        for b in &cfg.backends {
            pool.add(&b.addr.to_string(), b.addr, b.weight, false);
        }
        Arc::new(Service {
            name: cfg.name.clone(),
            pool,
            config: ArcSwap::from_pointee(cfg),
            metrics: ServiceMetrics::default(),
            budget: RetryBudget::new(now_nanos()),
            routes: ArcSwapOption::empty(),
            cache: ArcSwapOption::empty(),
            tls: ArcSwapOption::empty(),
        })
    }

    /// Applies a reloaded config: settings now, static backends brought to the configured
    /// set. Compared with the pool's live members (not the previous config), so quick
    /// successive reloads converge whatever the timing. A changed weight adds the new
    /// instance before the old one drains, so a one-backend service never goes empty.
    pub fn reconfigure(self: &Arc<Self>, cfg: ServiceConfig) {
        let old = self.config.load_full();
        self.pool.set_settings(pool_settings(&cfg));
        let drain = cfg.timeouts.drain.0;
        let live = |addr: SocketAddr| {
            self.pool.members().into_iter().find(|i| {
                i.addr == addr && i.state() != crate::pool::State::Draining && !i.owner_gated
            })
        };
        for b in &cfg.backends {
            let id = b.addr.to_string();
            match live(b.addr) {
                None => {
                    self.pool.add(&id, b.addr, b.weight, false);
                }
                Some(prev) if prev.weight != b.weight => {
                    self.pool.replace(&prev, b.weight);
                    let pool = self.pool.clone();
                    tokio::spawn(async move {
                        pool.remove_drained(prev, drain).await;
                    });
                }
                Some(_) => {}
            }
        }
        // Static members no longer configured (fleet members are the fleet's business).
        let was_static = |addr: SocketAddr| old.backends.iter().any(|o| o.addr == addr);
        for inst in self.pool.members() {
            if inst.owner_gated || inst.state() == crate::pool::State::Draining {
                continue;
            }
            if was_static(inst.addr) && !cfg.backends.iter().any(|b| b.addr == inst.addr) {
                inst.set_draining();
                let pool = self.pool.clone();
                tokio::spawn(async move {
                    pool.remove_drained(inst, drain).await;
                });
            }
        }
        // Connections made under other upstream TLS settings (plain, unverified, another CA
        // or name) are not reused once they change; any reload that re-reads them counts.
        let same_tls = match (&old.upstream_tls, &cfg.upstream_tls) {
            (None, None) => true,
            (Some(a), Some(b)) => Arc::ptr_eq(a, b),
            _ => false,
        };
        // Nor those of another protocol (h2c → h2 must not keep plaintext connections).
        if !same_tls || old.protocol != cfg.protocol {
            for inst in self.pool.members() {
                inst.idle.clear();
            }
        }
        self.pool.rebuild();
        self.config.store(Arc::new(cfg));
    }

    /// The route phase: where a request for `host` and `path` goes, or `NotFound`.
    pub(crate) fn route(
        &self,
        host: Option<&[u8]>,
        method: &str,
        path: &str,
    ) -> Result<Routed, ProxyError> {
        let table = self.routes.load();
        let Some(table) = table.as_ref() else {
            return Ok(Routed {
                target: None,
                path: None,
                prefix: None,
                cache: self.cache.load_full(),
                jobs: crate::route::AsyncPhase::Off,
            });
        };
        let m = table.find(host, method, path).ok_or(ProxyError::NotFound)?;
        let prefix = m
            .path
            .as_ref()
            .map(|_| m.route.config.prefix.trim_end_matches('/').to_string())
            .filter(|p| !p.is_empty());
        Ok(Routed {
            target: Some(m.route.target.clone()),
            path: m.path,
            prefix,
            cache: m.route.cache.clone(),
            jobs: m.route.jobs.clone(),
        })
    }

    /// The job URLs of this listener and the id in `path`, when `path` is one of them (a
    /// listener with an async route answers them before routing).
    pub(crate) fn jobs_for(
        &self,
        method: &str,
        path: &str,
    ) -> Option<(crate::jobs::JobUrls, String)> {
        if method != "GET" && method != "HEAD" {
            return None;
        }
        let table = self.routes.load();
        let urls = table.as_ref()?.jobs.as_ref()?;
        let id = urls.job_id(path)?.to_string();
        Some((urls.clone(), id))
    }

    /// Handles one client request on this (listening) service; never fails (errors are
    /// responses). `peer_ip` is the client address as a header value.
    pub async fn handle(
        self: Arc<Self>,
        req: Request<Incoming>,
        peer: SocketAddr,
        peer_ip: HeaderValue,
        port: u16,
    ) -> Result<Response<ClientBody>, Infallible> {
        self.handle_any(req.map(ReqBody::Incoming), peer, peer_ip, port)
            .await
    }

    /// [`Service::handle`] for a request whose body the fast path has read already (a cached
    /// route's miss, validation or unsafe method, answered on the fast path's connection).
    pub(crate) async fn handle_read(
        self: Arc<Self>,
        req: Request<Bytes>,
        peer: SocketAddr,
        peer_ip: HeaderValue,
        port: u16,
    ) -> Response<ClientBody> {
        match self
            .handle_any(req.map(ReqBody::Read), peer, peer_ip, port)
            .await
        {
            Ok(r) => r,
            Err(never) => match never {},
        }
    }

    async fn handle_any(
        self: Arc<Self>,
        req: Request<ReqBody>,
        peer: SocketAddr,
        peer_ip: HeaderValue,
        port: u16,
    ) -> Result<Response<ClientBody>, Infallible> {
        let start = now_nanos();
        let log = self.config.load().access_log.then(|| {
            let path = req.uri().path_and_query().map_or("/", |p| p.as_str());
            Box::new((req.method().to_string(), path.to_string()))
        });
        let hsts = self.config.load().tls.as_ref().and_then(|t| t.hsts);
        let web = crate::grpc::web(req.headers());
        let grpc = crate::grpc::is_grpc(req.headers()) || web.is_some();
        // Boxed: the general path's future is large, and hyper moves a request's future
        // into its own task (HTTP/2 streams): a pointer moves instead of kilobytes.
        match Box::pin(self.proxy(req, peer, peer_ip, port, start, log.clone())).await {
            Ok(mut r) => {
                if let Some(age) = hsts {
                    r.headers_mut()
                        .insert(http::header::STRICT_TRANSPORT_SECURITY, hsts_value(age));
                }
                Ok(r)
            }
            Err((svc, e)) => {
                let svc = svc.unwrap_or(self);
                let status = e.status().as_u16();
                svc.metrics.local.inc(status);
                if e.client_fault() {
                    svc.metrics.client_errors.inc();
                }
                if let Some(l) = log {
                    let now = now_nanos();
                    crate::access::Entry {
                        service: &svc.name,
                        instance: "-",
                        client: peer.ip(),
                        method: &l.0,
                        path: &l.1,
                        status,
                        bytes: 0,
                        headers_ms: crate::access::ms(start, now),
                        total_ms: crate::access::ms(start, now),
                        tries: 0,
                        trace: b"-",
                        cache: "-",
                    }
                    .emit();
                }
                if grpc {
                    let code = crate::grpc::status_of(&e);
                    svc.metrics.grpc[code as usize].inc();
                    let mut r = crate::grpc::trailers_only(code, e.message());
                    if let Some(w) = &web {
                        r.headers_mut()
                            .insert(http::header::CONTENT_TYPE, w.client_type());
                    }
                    return Ok(r);
                }
                Ok(e.into_response())
            }
        }
    }

    /// Phases 2–5 for the general path. An error names the service it is counted on.
    async fn proxy(
        self: &Arc<Self>,
        req: Request<ReqBody>,
        peer: SocketAddr,
        peer_ip: HeaderValue,
        port: u16,
        start: u64,
        log: Option<Box<(String, String)>>,
    ) -> Result<Response<ClientBody>, (Option<Arc<Service>>, ProxyError)> {
        let lcfg = self.config.load();
        let (mut parts, body) = req.into_parts();
        let path_and_query = parts.uri.path_and_query().map_or(
            if parts.method == http::Method::OPTIONS {
                "*"
            } else {
                "/"
            },
            |p| p.as_str(),
        );
        let line = Line {
            method: parts.method.as_str(),
            target_len: path_and_query.len(),
            target_authority: parts.uri.authority().map(|a| a.as_str().as_bytes()),
            minor: match parts.version {
                Version::HTTP_10 | Version::HTTP_09 => Some(0),
                Version::HTTP_11 => Some(1),
                _ => None,
            },
        };
        let pairs = || {
            parts
                .headers
                .iter()
                .map(|(k, v)| (k.as_str().as_bytes(), v.as_bytes()))
        };
        let facts = hygiene::inspect(&line, pairs(), &lcfg, peer.ip()).map_err(|e| (None, e))?;
        if let Some(port) = lcfg.https_redirect {
            let to = crate::tls::https_location(facts.authority, port, path_and_query);
            return Err((None, to.map_or_else(|e| e, ProxyError::Redirect)));
        }
        // Job URLs are the listener's own, answered before routing.
        if let Some((jobs, id)) = self.jobs_for(line.method, path_and_query) {
            self.metrics.requests.inc();
            let r = jobs.lookup(&id).await;
            self.metrics.local.inc(r.status().as_u16());
            return Ok(crate::cache::full(r));
        }
        let routed = self
            .route(facts.authority, line.method, path_and_query)
            .map_err(|e| (None, e))?;
        let svc = routed.target.as_ref().unwrap_or(self).clone();
        svc.metrics.requests.inc();
        let fail = |e| (Some(svc.clone()), e);
        let cfg = svc.config.load_full();

        let mut headers = HeaderMap::with_capacity(parts.headers.len() + 8);
        let trace = hygiene::trace_context(facts.traceparent);
        let origin = Origin {
            peer_ip: peer_ip.as_bytes(),
            port,
            prefix: routed.prefix.as_deref(),
            via: if parts.version == Version::HTTP_2 {
                b"2 shoal"
            } else {
                b"1.1 shoal"
            },
            traceparent: &trace,
        };
        hygiene::forward_headers(&facts, pairs, &lcfg, &origin, |n, v| {
            let v = if v.len() == 1 {
                HeaderValue::from_bytes(v[0])
            } else {
                HeaderValue::from_bytes(&v.concat())
            };
            if let (Ok(n), Ok(v)) = (HeaderName::from_bytes(n), v) {
                headers.append(n, v);
            }
        });
        // A verified client certificate's subject, in the header clients cannot set.
        if let Some(s) = parts.extensions.get::<crate::tls::Session>() {
            if let Some(id) = &s.identity {
                headers.insert(s.identity_header.clone(), id.clone());
            }
        }
        let upgrade = facts.upgrade.map(<[u8]>::to_vec);
        let mut body_kind = facts.body;
        // HTTP/2 (and HTTP/3) frame the body themselves: a request without
        // Content-Length may still carry one, of a length known only at its end.
        if body_kind == BodyKind::None
            && matches!(&body, ReqBody::Incoming(b) if !b.is_end_stream())
        {
            body_kind = BodyKind::Chunked;
        }
        let key = hash_key(&cfg, peer, |name| {
            parts.headers.get(name).map(|v| v.as_bytes())
        });
        let target = match routed.path {
            Some(p) => Uri::try_from(p)
                .map_err(|_| fail(ProxyError::BadRequest("invalid request target")))?,
            None => Uri::try_from(path_and_query)
                .map_err(|_| fail(ProxyError::BadRequest("invalid request target")))?,
        };
        // The cache phase: answer from cache, or plan the fetch (validators to add).
        // A client known by its certificate bypasses the shared cache: an origin that keys
        // its answers on the forwarded identity would otherwise have one client's answer
        // served to the next (the identity header is shoal's, so no Vary can tell them apart).
        let identified = parts
            .extensions
            .get::<crate::tls::Session>()
            .is_some_and(|s| s.identity.is_some());
        let cache = routed.cache.clone().filter(|_| !identified);
        let cache_host = crate::cache::host_str(facts.authority).map(str::to_string);
        if let Some(c) = &cache {
            crate::cache::upstream_headers(c, &mut headers, cache_host.as_deref());
        }
        let cache_scheme = crate::cache::key_scheme(facts.trusted, &parts.headers, lcfg.scheme());
        let mut fetch = None;
        let mut passed = None;
        if let (Some(c), Some(host)) = (&cache, &cache_host) {
            let creq = shoal_cache::Request {
                method: &parts.method,
                scheme: cache_scheme,
                authority: host,
                path_and_query,
                headers: &parts.headers,
            };
            match c.lookup(&creq, std::time::SystemTime::now()).await {
                shoal_cache::Lookup::Hit { response, refresh } => {
                    if let Some(f) = refresh {
                        let mut h = headers.clone();
                        if !h.contains_key(header::HOST) {
                            if let Ok(v) = HeaderValue::from_str(host) {
                                h.insert(header::HOST, v);
                            }
                        }
                        crate::cache::spawn_refresh(
                            svc.clone(),
                            c.clone(),
                            f,
                            target.clone(),
                            h,
                            key.clone(),
                        );
                    }
                    svc.metrics.local.inc(response.status().as_u16());
                    return Ok(crate::cache::full(response));
                }
                shoal_cache::Lookup::Miss(f) => {
                    f.prepare(&mut headers);
                    fetch = Some(f);
                }
                shoal_cache::Lookup::Bypass { unsafe_method } => passed = Some(unsafe_method),
            }
        }
        drop(facts);
        // The async phase: the request becomes a job; the client gets the job's URL.
        match &routed.jobs {
            crate::route::AsyncPhase::Off => {}
            crate::route::AsyncPhase::Unavailable => return Err(fail(ProxyError::NoInstance)),
            crate::route::AsyncPhase::Sink(sink) => {
                let limit = sink.max_body() as u64;
                // The job's body is held in memory until the broker confirms: it counts
                // against the process-wide buffer budget like a retriable body.
                let want = match body_kind {
                    BodyKind::Length(n) => n.min(limit),
                    BodyKind::None => 0,
                    BodyKind::Chunked => limit,
                };
                let Some(_permit) = BufferPermit::take(want) else {
                    return Err(fail(ProxyError::NoInstance));
                };
                let body = match (body, body_kind) {
                    (ReqBody::Read(b), _) if b.len() as u64 > limit => {
                        return Err(fail(ProxyError::PayloadTooLarge))
                    }
                    (ReqBody::Read(b), _) => b,
                    (_, BodyKind::None) => Bytes::new(),
                    (_, BodyKind::Length(n)) if n > limit => {
                        return Err(fail(ProxyError::PayloadTooLarge))
                    }
                    (ReqBody::Incoming(body), _) => read_body(
                        body,
                        lcfg.timeouts.body_read.0,
                        limit,
                        ProxyError::PayloadTooLarge,
                    )
                    .await
                    .map_err(fail)?,
                };
                let key = parts
                    .headers
                    .get("idempotency-key")
                    .and_then(|v| v.to_str().ok())
                    .map(str::to_string);
                let job = crate::jobs::JobRequest {
                    method: parts.method.as_str().to_string(),
                    path_and_query: target.to_string(),
                    headers: headers
                        .iter()
                        .map(|(k, v)| {
                            (k.as_str().to_string(), Bytes::copy_from_slice(v.as_bytes()))
                        })
                        .collect(),
                    body,
                };
                let r = sink.submit(job, key).await;
                svc.metrics.local.inc(r.status().as_u16());
                return Ok(crate::cache::full(r));
            }
        }
        let interim = parts.extensions.remove::<InterimSink>();
        let on_upgrade = if upgrade.is_some() {
            parts.extensions.remove::<hyper::upgrade::OnUpgrade>()
        } else {
            None
        };
        let idempotent = is_idempotent(parts.method.as_str());

        // Buffer small bodies (within the memory budget) so a failed try can be resent;
        // stream the rest (one try).
        let fault = Arc::new(AtomicU8::new(0));
        let body_read = lcfg.timeouts.body_read.0;
        // gRPC-Web: unary and server-streaming calls only, so the request is one message,
        // read whole (and base64-decoded in text mode) before it goes out as gRPC.
        // (Only to gRPC instances: an HTTP/1.1 cluster gets the request as it is.)
        let web = crate::grpc::web(&parts.headers).filter(|_| crate::grpc::speaks_h2(&cfg));
        let (buffered, mut stream, _permit) = match (body, body_kind) {
            (body, _) if web.is_some() => {
                let raw = match body {
                    ReqBody::Read(b) => b,
                    ReqBody::Incoming(b) => {
                        read_body(b, body_read, WEB_LIMIT, ProxyError::PayloadTooLarge)
                            .await
                            .map_err(fail)?
                    }
                };
                let decoded = web
                    .as_ref()
                    .and_then(|w| w.decode_request(raw))
                    .ok_or_else(|| fail(ProxyError::BadRequest("malformed grpc-web-text body")))?;
                let Some(permit) = BufferPermit::take(decoded.len() as u64) else {
                    return Err(fail(ProxyError::NoInstance));
                };
                (Some(decoded), None, Some(permit))
            }
            // Read by the fast path (whose permit covers it) within REPLAY_LIMIT.
            (ReqBody::Read(b), _) => (Some(b), None, None),
            (ReqBody::Incoming(_), BodyKind::None) => (Some(Bytes::new()), None, None),
            (ReqBody::Incoming(body), BodyKind::Length(n)) if n <= REPLAY_LIMIT => {
                match BufferPermit::take(n) {
                    Some(p) => {
                        let over = ProxyError::BodyFault("request body longer than declared");
                        let b = read_body(body, body_read, REPLAY_LIMIT, over)
                            .await
                            .map_err(fail)?;
                        (Some(b), None, Some(p))
                    }
                    None => (
                        None,
                        Some(ClientStream::new(body, body_read, fault.clone())),
                        None,
                    ),
                }
            }
            // gRPC: a message that comes whole at once is kept for a retry.
            (ReqBody::Incoming(mut body), BodyKind::Chunked)
                if crate::grpc::is_grpc(&parts.headers) =>
            {
                let (read, ended) =
                    read_ahead(&mut body, REPLAY_LIMIT as usize, Duration::from_millis(10))
                        .await
                        .map_err(fail)?;
                let whole = ended && read.iter().all(Frame::is_data);
                let len: usize = read
                    .iter()
                    .filter_map(|f| f.data_ref())
                    .map(Bytes::len)
                    .sum();
                match BufferPermit::take(len as u64).filter(|_| whole) {
                    Some(p) => {
                        let mut b = bytes::BytesMut::with_capacity(len);
                        for f in read {
                            if let Ok(d) = f.into_data() {
                                b.extend_from_slice(&d);
                            }
                        }
                        (Some(b.freeze()), None, Some(p))
                    }
                    None => {
                        let mut s = ClientStream::new(body, body_read, fault.clone());
                        s.read = read;
                        (None, Some(s), None)
                    }
                }
            }
            (ReqBody::Incoming(body), _) => (
                None,
                Some(ClientStream::new(body, body_read, fault.clone())),
                None,
            ),
        };
        let replayable = buffered.is_some();

        let attempts = if replayable { cfg.retries.attempts } else { 1 };
        let connect_timeout = cfg.timeouts.connect.0;
        let idle_timeout = cfg.timeouts.upstream_idle.0;
        // gRPC: the call's deadline (`grpc-timeout`) bounds every try and goes on shortened.
        let grpc = crate::grpc::is_grpc(&parts.headers) || web.is_some();
        if let Some(w) = &web {
            headers.insert(header::CONTENT_TYPE, w.upstream_type());
            headers.insert(header::TE, HeaderValue::from_static("trailers"));
            headers.remove(header::CONTENT_LENGTH);
        }
        let deadline = grpc
            .then(|| parts.headers.get("grpc-timeout"))
            .flatten()
            .and_then(|v| crate::grpc::parse_timeout(v.as_bytes()))
            .map(|d| start.saturating_add(u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)));
        let h2 = crate::grpc::speaks_h2(&cfg);
        // HTTP/2 instances need `te: trailers` (gRPC servers check it); HTTP/1.1 drops TE.
        if h2
            && parts
                .headers
                .get_all(header::TE)
                .iter()
                .any(|v| hygiene::tokens(v.as_bytes()).any(|t| t.eq_ignore_ascii_case(b"trailers")))
        {
            headers.insert(header::TE, HeaderValue::from_static("trailers"));
        }
        // Scaling from zero: wait (bounded) for a first instance.
        svc.pool.wait_routable().await.map_err(fail)?;
        let mut tries = svc.begin_tries(&cfg, start);
        let mut last_err = None;
        let mut last_grpc: Option<http::response::Parts> = None;
        for attempt in 0..attempts {
            let Some(mut t) = svc
                .next_try(&mut tries, attempt, &cfg, key.as_deref())
                .map_err(fail)?
            else {
                break;
            };
            let mut up = Request::new(match stream.take() {
                Some(s) => Either::Right(s),
                None => Either::Left(Full::new(buffered.clone().unwrap_or_default())),
            });
            *up.method_mut() = parts.method.clone();
            *up.uri_mut() = target.clone();
            let mut hdrs = if attempt + 1 == attempts {
                std::mem::take(&mut headers)
            } else {
                headers.clone()
            };
            // HTTP/1.0 clients may omit Host; upstream HTTP/1.1 requires one.
            if !hdrs.contains_key(header::HOST) {
                if let Ok(v) = HeaderValue::from_str(t.inst.authority.as_str()) {
                    hdrs.insert(header::HOST, v);
                }
            }
            *up.headers_mut() = hdrs;
            if let Some(sink) = &interim {
                sink.attach(&mut up);
            }
            let mut try_timeout = t.timeout;
            // The client's deadline, when shorter, bounds the try instead (a server may send
            // headers only with its first message, so per_try alone would cut slow calls).
            let mut deadline_bound = false;
            if let Some(d) = deadline {
                let left = Duration::from_nanos(d.saturating_sub(now_nanos()));
                if left.is_zero() {
                    last_err = Some(ProxyError::Timeout);
                    svc.end_try(&tries, &mut t, now_nanos(), Err(None));
                    break;
                }
                deadline_bound = left <= try_timeout || grpc;
                try_timeout = left;
                up.headers_mut()
                    .insert("grpc-timeout", crate::grpc::timeout_value(left));
            }
            if h2 {
                upstream::to_h2(&mut up, crate::grpc::https(&cfg), &t.inst.authority);
            }

            let sending = upstream::send(
                upstream::Target {
                    idle: &t.inst.idle,
                    addr: t.inst.addr,
                    connect_timeout,
                    max_idle: idle_timeout,
                    tls: cfg.upstream_tls.as_deref(),
                    protocol: cfg.protocol,
                },
                up,
            );
            let result = tokio::time::timeout(try_timeout, sending).await;
            let client_fault = fault.load(Ordering::Acquire);
            let outcome = match &result {
                _ if client_fault != 0 => Err(None),
                Ok(Ok((resp, _))) if !hygiene::valid_status(resp.status().as_u16()) => {
                    Err(Some(ErrorKind::Reset))
                }
                // A retryable gRPC failure counts against the instance like a 503.
                Ok(Ok((resp, _)))
                    if grpc
                        && crate::grpc::header_status(resp.headers())
                            .is_some_and(|c| cfg.retries.grpc_codes.contains(&c)) =>
                {
                    Ok(503)
                }
                Ok(Ok((resp, _))) => Ok(resp.status().as_u16()),
                Ok(Err(upstream::SendError::Connect(_))) => Err(Some(ErrorKind::Connect)),
                Ok(Err(upstream::SendError::Reset(_))) => Err(Some(ErrorKind::Reset)),
                // The client's own deadline ran out: nobody's fault but the call's.
                Err(_) if deadline_bound => Err(None),
                Err(_) => Err(Some(ErrorKind::Timeout)),
            };
            svc.end_try(&tries, &mut t, now_nanos(), outcome);
            if client_fault != 0 {
                // The client broke its own request: its fault, whatever the instance did.
                return Err(fail(if client_fault == FAULT_TIMEOUT {
                    ProxyError::RequestTimeout
                } else {
                    ProxyError::BodyFault("request body malformed or cut short")
                }));
            }
            match result {
                Ok(Ok((mut resp, conn))) => {
                    let status = resp.status();
                    if !hygiene::valid_status(status.as_u16()) {
                        last_err = Some(ProxyError::Upstream("upstream sent an invalid response"));
                        break;
                    }
                    // A gRPC failure answered trailers-only (nothing sent to the client yet)
                    // with a retryable status goes to another try while any is left.
                    let grpc_status = grpc
                        .then(|| crate::grpc::header_status(resp.headers()))
                        .flatten();
                    if let Some(code) = grpc_status {
                        if attempt + 1 < attempts
                            && cfg.retries.grpc_codes.contains(&code)
                            && resp.body().is_end_stream()
                            && !tries.past_deadline()
                        {
                            tracing::debug!(service = %svc.name, instance = %t.inst.id, code, "gRPC call failed: retrying");
                            // If no other try happens, this answer goes to the client.
                            let (mut p, _) = resp.into_parts();
                            response_hygiene(&mut p.headers);
                            last_grpc = Some(p);
                            last_err = Some(ProxyError::Upstream("upstream gRPC call failed"));
                            drop(conn);
                            tries.revisit = true;
                            continue;
                        }
                    }
                    if status == StatusCode::SWITCHING_PROTOCOLS {
                        // Only the protocol that was asked for, and only if one was.
                        let asked = upgrade_matches(upgrade.as_deref(), resp.headers());
                        let Some(down) = on_upgrade.filter(|_| asked) else {
                            last_err =
                                Some(ProxyError::Upstream("upstream switched protocols unasked"));
                            break;
                        };
                        let up = hyper::upgrade::on(&mut resp);
                        let hold = parts
                            .extensions
                            .get::<Arc<crate::server::ConnSlot>>()
                            .and_then(|s| s.take());
                        tokio::spawn(tunnel(down, up, t.busy, hold));
                        return Ok(Response::from_parts(
                            resp.into_parts().0,
                            Either::Right(Full::new(Bytes::new())),
                        ));
                    }
                    let (mut rparts, rbody) = resp.into_parts();
                    response_hygiene(&mut rparts.headers);
                    // HTTP/1.1 sends only the trailer fields the head announces: a gRPC
                    // call's status goes in them.
                    if let Some(w) = &web {
                        rparts.headers.insert(header::CONTENT_TYPE, w.client_type());
                        rparts.headers.remove(header::CONTENT_LENGTH);
                    } else if grpc && grpc_status.is_none() && parts.version != Version::HTTP_2 {
                        // Trailers need chunked framing.
                        rparts.headers.remove(header::CONTENT_LENGTH);
                        rparts.headers.insert(
                            header::TRAILER,
                            HeaderValue::from_static(
                                "grpc-status, grpc-message, grpc-status-details-bin",
                            ),
                        );
                    }
                    // The instance stays counted as busy (drain, least-connections) until the
                    // body ends; the latency sample is the time to response headers.
                    // Cloned: a cache refetch can take this loop once more.
                    let access = log.clone().map(|l| {
                        Box::new(AccessRecord {
                            service: svc.name.clone(),
                            instance: t.inst.id.clone(),
                            client: peer.ip(),
                            request: *l,
                            status: status.as_u16(),
                            bytes: 0,
                            start,
                            headers_at: now_nanos(),
                            tries: attempt + 1,
                            trace,
                        })
                    });
                    if let Some(code) = grpc_status {
                        svc.metrics.grpc[code.min(17) as usize].inc();
                    }
                    let body = Tracked {
                        inner: rbody,
                        busy: Some(t.busy),
                        conn: Some(conn),
                        // A gRPC stream may stay quiet for long: its deadline bounds it, and
                        // HTTP/2 PINGs find a dead connection.
                        read_timeout: if grpc {
                            deadline.map_or(GRPC_QUIET, |d| {
                                Duration::from_nanos(d.saturating_sub(now_nanos()))
                                    .max(Duration::from_millis(1))
                            })
                        } else {
                            cfg.timeouts.upstream_read.0
                        },
                        timer: None,
                        access,
                        tee: None,
                        grpc: (grpc && grpc_status.is_none()).then(|| svc.metrics.grpc.clone()),
                        web: web
                            .as_ref()
                            .map(|w| Box::new(crate::grpc::WebEncoder::new(w))),
                    };
                    if let (Some(c), Some(f)) = (&cache, fetch.take()) {
                        return crate::cache::after_response(c, f, rparts, body)
                            .await
                            .map_err(fail);
                    }
                    if let (Some(c), Some(unsafe_method), Some(host)) =
                        (&cache, passed, &cache_host)
                    {
                        if unsafe_method {
                            let creq = shoal_cache::Request {
                                method: &parts.method,
                                scheme: cache_scheme,
                                authority: host,
                                path_and_query: parts
                                    .uri
                                    .path_and_query()
                                    .map_or("/", |p| p.as_str()),
                                headers: &parts.headers,
                            };
                            c.invalidate_after(&creq, rparts.status, &rparts.headers);
                        }
                        crate::cache::mark_bypass(&mut rparts);
                    }
                    return Ok(Response::from_parts(rparts, Either::Left(body)));
                }
                Ok(Err(e)) => {
                    tracing::debug!(service = %svc.name, instance = %t.inst.id, error = %e, "upstream try failed");
                    let connect = matches!(e, upstream::SendError::Connect(_));
                    // Nothing reached the instance: it may be tried again.
                    tries.revisit |= connect;
                    last_grpc = None;
                    // A connect failure sent nothing, so any replayable request may go again;
                    // after that only idempotent ones.
                    let retry_ok = replayable && (connect || idempotent);
                    last_err = Some(if connect {
                        ProxyError::Upstream("upstream connect failed")
                    } else {
                        ProxyError::Upstream("upstream closed the connection")
                    });
                    if !retry_ok {
                        break;
                    }
                }
                Err(_) => {
                    last_err = Some(ProxyError::Timeout);
                    last_grpc = None;
                    if !(replayable && idempotent) || tries.past_deadline() || deadline_bound {
                        break;
                    }
                }
            }
        }
        // A gRPC failure retried without another answer: the instance's own status goes back.
        if let Some(p) = last_grpc {
            if let Some(code) = crate::grpc::header_status(&p.headers) {
                svc.metrics.grpc[code.min(17) as usize].inc();
            }
            return Ok(Response::from_parts(
                p,
                Either::Right(Full::new(Bytes::new())),
            ));
        }
        // Origin unreachable: a stale object may stand in (stale-if-error).
        if let (Some(c), Some(f)) = (&cache, fetch) {
            if let Some(r) = c.origin_error(f, std::time::SystemTime::now()) {
                svc.metrics.local.inc(r.status().as_u16());
                return Ok(crate::cache::full(r));
            }
        }
        Err(fail(last_err.unwrap_or(ProxyError::NoInstance)))
    }

    /// One try with a bodyless request, the response read whole up to `limit` bytes:
    /// background cache refreshes.
    pub(crate) async fn fetch_whole(
        self: &Arc<Self>,
        method: http::Method,
        target: Uri,
        headers: HeaderMap,
        key: Option<&[u8]>,
        limit: usize,
    ) -> Result<Response<Bytes>, ProxyError> {
        let cfg = self.config.load_full();
        let mut tries = self.begin_tries(&cfg, now_nanos());
        let Some(mut t) = self.next_try(&mut tries, 0, &cfg, key)? else {
            return Err(ProxyError::NoInstance);
        };
        let mut up = Request::new(Either::Left(Full::new(Bytes::new())));
        *up.method_mut() = method;
        *up.uri_mut() = target;
        *up.headers_mut() = headers;
        if crate::grpc::speaks_h2(&cfg) {
            upstream::to_h2(&mut up, crate::grpc::https(&cfg), &t.inst.authority);
        }
        let sending = upstream::send(
            upstream::Target {
                idle: &t.inst.idle,
                addr: t.inst.addr,
                connect_timeout: cfg.timeouts.connect.0,
                max_idle: cfg.timeouts.upstream_idle.0,
                tls: cfg.upstream_tls.as_deref(),
                protocol: cfg.protocol,
            },
            up,
        );
        let result = tokio::time::timeout(t.timeout, sending).await;
        let outcome = match &result {
            Ok(Ok((resp, _))) if !hygiene::valid_status(resp.status().as_u16()) => {
                Err(Some(ErrorKind::Reset))
            }
            Ok(Ok((resp, _))) => Ok(resp.status().as_u16()),
            Ok(Err(upstream::SendError::Connect(_))) => Err(Some(ErrorKind::Connect)),
            Ok(Err(upstream::SendError::Reset(_))) => Err(Some(ErrorKind::Reset)),
            Err(_) => Err(Some(ErrorKind::Timeout)),
        };
        self.end_try(&tries, &mut t, now_nanos(), outcome);
        let (resp, conn) = match result {
            Ok(Ok(r)) => r,
            Ok(Err(_)) => return Err(ProxyError::Upstream("upstream connect failed")),
            Err(_) => return Err(ProxyError::Timeout),
        };
        if !hygiene::valid_status(resp.status().as_u16()) {
            return Err(ProxyError::Upstream("upstream sent an invalid response"));
        }
        let (mut parts, body) = resp.into_parts();
        response_hygiene(&mut parts.headers);
        let body = Tracked {
            inner: body,
            busy: Some(t.busy),
            conn: Some(conn),
            read_timeout: cfg.timeouts.upstream_read.0,
            timer: None,
            access: None,
            tee: None,
            grpc: None,
            web: None,
        };
        let bytes = http_body_util::Limited::new(body, limit)
            .collect()
            .await
            .map_err(|_| ProxyError::Upstream("upstream response body failed"))?
            .to_bytes();
        Ok(Response::from_parts(parts, bytes))
    }
}

/// Whether a 101's `Upgrade` names the protocol the request asked for (after hygiene).
fn upgrade_matches(asked: Option<&[u8]>, resp: &HeaderMap) -> bool {
    let (Some(asked), Some(got)) = (asked, resp.get(header::UPGRADE)) else {
        return false;
    };
    let name = |p: &[u8]| {
        p.split(|&b| b == b'/')
            .next()
            .unwrap_or(p)
            .to_ascii_lowercase()
    };
    hygiene::tokens(got.as_bytes()).any(|g| name(asked) == name(g))
}

/// Response hygiene for the general path: the same rule the fast path applies per header.
fn response_hygiene(h: &mut HeaderMap) {
    let named: Vec<Vec<u8>> = h
        .get_all(header::CONNECTION)
        .iter()
        .flat_map(|v| hygiene::tokens(v.as_bytes()).map(<[u8]>::to_vec))
        .filter(|t| !t.is_empty())
        .collect();
    let named_refs: Vec<&[u8]> = named.iter().map(Vec::as_slice).collect();
    let drop: Vec<HeaderName> = h
        .keys()
        .filter(|k| {
            !hygiene::response_header_kept(k.as_str().as_bytes(), &named_refs)
                || *k == header::TRANSFER_ENCODING
        })
        .cloned()
        .collect();
    for k in drop {
        h.remove(k);
    }
    h.append(header::VIA, HeaderValue::from_static("1.1 shoal"));
}

/// Reads a small body whole, each read within `timeout`: the client's fault (400/408) if it
/// ends early or stalls.
/// Reads a whole request body of at most `limit` bytes (`over` past it).
async fn read_body(
    mut body: Incoming,
    timeout: Duration,
    limit: u64,
    over: ProxyError,
) -> Result<Bytes, ProxyError> {
    let mut buf = bytes::BytesMut::new();
    loop {
        match tokio::time::timeout(timeout, body.frame()).await {
            Err(_) => return Err(ProxyError::RequestTimeout),
            Ok(None) => return Ok(buf.freeze()),
            Ok(Some(Err(_))) => return Err(ProxyError::BodyFault("request body ended early")),
            Ok(Some(Ok(f))) => {
                if let Ok(d) = f.into_data() {
                    if (buf.len() + d.len()) as u64 > limit {
                        return Err(over);
                    }
                    buf.extend_from_slice(&d);
                }
            }
        }
    }
}

/// Whether a stream that just returned `Pending` has now waited `timeout` without progress:
/// the timer is armed at the first wait and dropped (by the caller) at the next progress.
pub(crate) fn stalled(
    timer: &mut Option<Pin<Box<tokio::time::Sleep>>>,
    timeout: Duration,
    cx: &mut Context<'_>,
) -> bool {
    let t = timer.get_or_insert_with(|| Box::pin(tokio::time::sleep(timeout)));
    t.as_mut().poll(cx).is_ready()
}

const FAULT_BODY: u8 = 1;
const FAULT_TIMEOUT: u8 = 2;

/// A streamed request body. A framing error, an early end or a pause longer than the
/// body-read timeout is recorded as the client's fault, so the failed try that follows is
/// not blamed on the instance.
pub struct ClientStream {
    inner: Incoming,
    /// Frames read ahead (a gRPC body looked at for replay), sent first.
    read: std::collections::VecDeque<Frame<Bytes>>,
    timeout: Duration,
    timer: Option<Pin<Box<tokio::time::Sleep>>>,
    fault: Arc<AtomicU8>,
}

impl ClientStream {
    fn new(inner: Incoming, timeout: Duration, fault: Arc<AtomicU8>) -> Self {
        ClientStream {
            inner,
            read: Default::default(),
            timeout,
            timer: None,
            fault,
        }
    }
}

/// Reads the frames of a body of unknown length that arrive without a pause of `wait`, up
/// to `limit` bytes: a gRPC unary call's one message comes with its end at once, so it can
/// be kept for a retry, while a stream's first frames are passed on unchanged. True if the
/// body ended.
async fn read_ahead(
    body: &mut Incoming,
    limit: usize,
    wait: Duration,
) -> Result<(std::collections::VecDeque<Frame<Bytes>>, bool), ProxyError> {
    let mut frames = std::collections::VecDeque::new();
    let mut len = 0;
    while len <= limit {
        match tokio::time::timeout(wait, body.frame()).await {
            Err(_) => return Ok((frames, false)),
            Ok(None) => return Ok((frames, true)),
            Ok(Some(Err(_))) => return Err(ProxyError::BodyFault("request body ended early")),
            Ok(Some(Ok(f))) => {
                len += f.data_ref().map_or(0, Bytes::len);
                let trailers = f.is_trailers();
                frames.push_back(f);
                if trailers {
                    return Ok((frames, false));
                }
            }
        }
    }
    Ok((frames, false))
}

impl Body for ClientStream {
    type Data = Bytes;
    type Error = Box<dyn std::error::Error + Send + Sync>;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        if let Some(f) = self.read.pop_front() {
            return Poll::Ready(Some(Ok(f)));
        }
        match Pin::new(&mut self.inner).poll_frame(cx) {
            Poll::Ready(Some(Err(e))) => {
                self.fault.store(FAULT_BODY, Ordering::Release);
                Poll::Ready(Some(Err(e.into())))
            }
            Poll::Ready(r) => {
                self.timer = None;
                Poll::Ready(r.map(|f| f.map_err(Into::into)))
            }
            Poll::Pending => {
                let timeout = self.timeout;
                if !stalled(&mut self.timer, timeout, cx) {
                    return Poll::Pending;
                }
                self.fault.store(FAULT_TIMEOUT, Ordering::Release);
                Poll::Ready(Some(Err("request body read timed out".into())))
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.read.is_empty() && self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        if self.read.is_empty() {
            self.inner.size_hint()
        } else {
            SizeHint::default()
        }
    }
}

/// Where a request's interim responses (1xx other than 100 and 101) go, rendered as
/// HTTP/1.1 heads: set by the fast path when it runs the general path's phases on its own
/// connection (hyper's server cannot send 1xx, so elsewhere they are dropped).
#[derive(Clone)]
pub(crate) struct InterimSink(pub(crate) tokio::sync::mpsc::UnboundedSender<Bytes>);

impl InterimSink {
    /// Asks hyper's client to hand `up`'s interim responses to this sink.
    fn attach<B>(&self, up: &mut Request<B>) {
        let tx = self.0.clone();
        hyper::ext::on_informational(up, move |res| {
            let status = res.status();
            if status == StatusCode::CONTINUE {
                return;
            }
            let named: Vec<Vec<u8>> = res
                .headers()
                .get_all(header::CONNECTION)
                .iter()
                .flat_map(|v| hygiene::tokens(v.as_bytes()).map(<[u8]>::to_vec))
                .collect();
            let named: Vec<&[u8]> = named.iter().map(Vec::as_slice).collect();
            let mut head = format!(
                "HTTP/1.1 {} {}\r\n",
                status.as_str(),
                status.canonical_reason().unwrap_or("")
            )
            .into_bytes();
            for (n, v) in res.headers() {
                let kept = hygiene::response_header_kept(n.as_str().as_bytes(), &named)
                    && *n != header::CONTENT_LENGTH
                    && *n != header::TRANSFER_ENCODING;
                if kept {
                    head.extend_from_slice(n.as_str().as_bytes());
                    head.extend_from_slice(b": ");
                    head.extend_from_slice(v.as_bytes());
                    head.extend_from_slice(b"\r\n");
                }
            }
            head.extend_from_slice(b"\r\n");
            let _ = tx.send(Bytes::from(head));
        });
    }
}

/// A response body that keeps its instance counted as in flight until the body ends or is
/// dropped (drain waits for it; least-connections sees it). An instance that pauses longer
/// than the upstream-read timeout mid-body ends the response.
pub struct Tracked {
    inner: Incoming,
    busy: Option<InFlight>,
    /// The upstream connection (HTTP/1.1: returned to its instance's idle list once the body
    /// is read; HTTP/2: its stream released).
    conn: Option<upstream::Conn>,
    read_timeout: Duration,
    timer: Option<Pin<Box<tokio::time::Sleep>>>,
    /// The access-log line, written when the body ends (only when the listener logs).
    access: Option<Box<AccessRecord>>,
    /// A copy of the body for the cache, stored once the body ends whole.
    tee: Option<Box<crate::cache::Tee>>,
    /// A gRPC call: its trailers' `grpc-status` is counted here.
    grpc: Option<Arc<[Counter; 18]>>,
    /// A gRPC-Web call: frames re-encoded, trailers sent as the last frame.
    web: Option<Box<crate::grpc::WebEncoder>>,
}

/// An access-log line in the making, for a response still streaming.
struct AccessRecord {
    service: String,
    instance: String,
    client: std::net::IpAddr,
    /// Method and target.
    request: (String, String),
    status: u16,
    bytes: u64,
    start: u64,
    headers_at: u64,
    tries: u32,
    trace: [u8; 55],
}

impl Tracked {
    /// Copies the body into `tee` as it streams (see [`crate::cache::Tee`]).
    pub(crate) fn tee(&mut self, tee: crate::cache::Tee) {
        self.tee = Some(Box::new(tee));
    }

    /// Whether a copy for the cache is still being taken.
    pub(crate) fn teeing(&self) -> bool {
        self.tee.is_some()
    }

    fn finish(&mut self, complete: bool) {
        // Stored only if the whole body came; dropped, it releases the coalesced waiters.
        if let Some(t) = self.tee.take() {
            if complete {
                t.finish();
            }
        }
        if let Some(a) = self.access.take() {
            crate::access::Entry {
                service: &a.service,
                instance: &a.instance,
                client: a.client,
                method: &a.request.0,
                path: &a.request.1,
                status: a.status,
                bytes: a.bytes,
                headers_ms: crate::access::ms(a.start, a.headers_at),
                total_ms: crate::access::ms(a.start, now_nanos()),
                tries: a.tries,
                trace: &a.trace,
                cache: "-",
            }
            .emit();
        }
        if let Some(busy) = self.busy.take() {
            if let (true, Some(upstream::Conn::H1(c))) = (complete, self.conn.take()) {
                busy.inst().idle.put(c);
            }
        }
        // An unfinished body leaves the connection mid-response: dropping it closes it.
        self.conn = None;
    }
}

impl Drop for Tracked {
    fn drop(&mut self) {
        // A body the server never polled (empty, HEAD) is complete as well.
        let complete = self.inner.is_end_stream();
        self.finish(complete);
    }
}

impl Body for Tracked {
    type Data = Bytes;
    type Error = Box<dyn std::error::Error + Send + Sync>;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let r = Pin::new(&mut self.inner).poll_frame(cx);
        match r {
            Poll::Ready(None) => {
                // gRPC-Web text: the last bytes, padded.
                if let Some(rest) = self.web.as_mut().map(|w| w.finish()) {
                    if !rest.is_empty() {
                        return Poll::Ready(Some(Ok(Frame::data(rest))));
                    }
                }
                self.finish(true);
                Poll::Ready(None)
            }
            Poll::Ready(Some(Err(e))) => {
                self.finish(false);
                Poll::Ready(Some(Err(e.into())))
            }
            Poll::Ready(Some(Ok(f))) => {
                self.timer = None;
                if let Some(t) = f.trailers_ref() {
                    if let Some(g) = self.grpc.take() {
                        let code = crate::grpc::header_status(t).unwrap_or(17).min(17);
                        g[code as usize].inc();
                    }
                }
                let f = match self.web.as_mut() {
                    None => f,
                    Some(w) => match f.into_data() {
                        Ok(d) => Frame::data(w.data(&d)),
                        Err(f) => match f.into_trailers() {
                            Ok(t) => Frame::data(w.trailers(&t)),
                            Err(f) => f,
                        },
                    },
                };
                if let (Some(a), Some(d)) = (self.access.as_mut(), f.data_ref()) {
                    a.bytes += d.len() as u64;
                }
                if let (Some(t), Some(d)) = (self.tee.as_mut(), f.data_ref()) {
                    if !t.push(d) {
                        self.tee = None;
                    }
                }
                Poll::Ready(Some(Ok(f)))
            }
            Poll::Pending => {
                let timeout = self.read_timeout;
                if !stalled(&mut self.timer, timeout, cx) {
                    return Poll::Pending;
                }
                self.finish(false);
                Poll::Ready(Some(Err("upstream response body timed out".into())))
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.web.is_none() && self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        if self.web.is_some() {
            return SizeHint::default();
        }
        self.inner.size_hint()
    }
}

/// The client address as a header value (built once per connection).
pub fn peer_header(peer: SocketAddr) -> HeaderValue {
    HeaderValue::from_str(&peer.ip().to_string())
        .unwrap_or_else(|_| HeaderValue::from_static("unknown"))
}

/// Copies bytes both ways once client and instance both switched protocols.
async fn tunnel(
    down: hyper::upgrade::OnUpgrade,
    up: hyper::upgrade::OnUpgrade,
    _busy: InFlight,
    _conn: Option<crate::server::ConnHold>,
) {
    match tokio::try_join!(down, up) {
        Ok((d, u)) => {
            let mut d = TokioIo::new(d);
            let mut u = TokioIo::new(u);
            if let Err(e) = tokio::io::copy_bidirectional(&mut d, &mut u).await {
                tracing::debug!(error = %e, "tunnel closed with error");
            }
        }
        Err(e) => tracing::warn!(error = %e, "upgrade failed"),
    }
}
