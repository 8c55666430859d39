//! The request path: hygiene checks, instance selection, forwarding with retries, upgrades.
//!
//! Errors become HTTP responses in exactly one place, [`ProxyError::into_response`].

use std::convert::Infallible;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use arc_swap::ArcSwap;
use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Request, Response, StatusCode, Uri, Version};
use http_body::{Body, Frame, SizeHint};
use http_body_util::{BodyExt, Either, Full, Limited};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;

use crate::config::{HashKey, ServiceConfig};
use crate::metrics::{CodeCounters, Counter, Histogram};
use crate::pool::{now_nanos, ErrorKind, Instance, Pool, PoolSettings, Snapshot, State};
use crate::upstream;
use shoal_balance::Algorithm;

/// Body sent upstream: buffered (replayable, so retriable) or streamed.
pub type UpstreamBody = Either<Full<Bytes>, Incoming>;
/// Body sent to the client.
pub type ClientBody = Either<Tracked, Full<Bytes>>;

/// Requests with a known body up to this size are buffered so that a retry can resend them.
pub(crate) const REPLAY_LIMIT: u64 = 64 * 1024;

/// Per-service counters that are not per instance.
#[derive(Debug, Default)]
pub struct ServiceMetrics {
    /// Time from request start to response headers.
    pub duration: Histogram,
    /// Responses shoal produced itself (no instance involved): 4xx rejects, 502/503/504.
    pub local: CodeCounters,
    pub retries: Counter,
    pub retry_budget_exhausted: Counter,
    pub requests: Counter,
}

/// Retry budget (linkerd/Envoy-style): each request deposits `percent`/100 of a token into a
/// bucket that decays over ~10 s (so only recent traffic counts), a floor bucket refills at
/// `min_per_sec` (holding at most one second's worth), and a retry takes one token.
#[derive(Debug)]
pub struct RetryBudget {
    state: Mutex<BudgetState>,
}

#[derive(Debug)]
struct BudgetState {
    ratio: f64,
    floor: f64,
    last: u64,
}

impl RetryBudget {
    pub fn new(now: u64) -> Self {
        RetryBudget {
            state: Mutex::new(BudgetState {
                ratio: 0.0,
                floor: 0.0,
                last: now,
            }),
        }
    }

    fn advance(s: &mut BudgetState, min_per_sec: f64, now: u64) {
        let dt = now.saturating_sub(s.last) as f64 / 1e9;
        // Under load this runs per request; decaying once a millisecond is plenty.
        if dt > 1e-3 {
            s.last = now;
            s.ratio *= (-dt / 10.0).exp();
            s.floor = (s.floor + dt * min_per_sec).min(min_per_sec.max(1.0));
        }
    }

    pub fn deposit(&self, percent: f64, min_per_sec: f64, now: u64) {
        let mut s = self.state.lock().expect("budget lock");
        Self::advance(&mut s, min_per_sec, now);
        s.ratio += percent / 100.0;
    }

    /// Takes one retry token at `now` if there is one.
    pub fn try_withdraw(&self, min_per_sec: f64, now: u64) -> bool {
        let mut s = self.state.lock().expect("budget lock");
        Self::advance(&mut s, min_per_sec, now);
        // The epsilon absorbs float error in sums like 10 × 0.2.
        if s.floor >= 1.0 - 1e-9 {
            s.floor -= 1.0;
        } else if s.ratio >= 1.0 - 1e-9 {
            s.ratio -= 1.0;
        } else {
            return false;
        }
        true
    }
}

/// A proxied service: its settings, pool and counters.
pub struct Service {
    pub name: String,
    pub pool: Arc<Pool>,
    pub config: ArcSwap<ServiceConfig>,
    pub metrics: ServiceMetrics,
    pub budget: RetryBudget,
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
        })
    }

    /// Applies a reloaded config: settings now, static backends diffed (new ones added,
    /// missing ones drained then removed in the background).
    pub fn reconfigure(self: &Arc<Self>, cfg: ServiceConfig) {
        let old = self.config.load_full();
        self.pool.set_settings(pool_settings(&cfg));
        let drain = cfg.timeouts.drain.0;
        for b in &cfg.backends {
            let id = b.addr.to_string();
            match old.backends.iter().find(|o| o.addr == b.addr) {
                None => {
                    self.pool.add(&id, b.addr, b.weight, false);
                }
                // A new weight: a fresh instance takes over (slow start applies) while the old
                // one drains, so nothing in flight is cut.
                Some(o) if o.weight != b.weight => {
                    if let Some(prev) = self.pool.drain(&id) {
                        self.pool.add(&id, b.addr, b.weight, false);
                        let pool = self.pool.clone();
                        tokio::spawn(async move {
                            pool.remove_drained(prev, drain).await;
                        });
                    }
                }
                Some(_) => {}
            }
        }
        for o in &old.backends {
            if !cfg.backends.iter().any(|b| b.addr == o.addr) {
                let pool = self.pool.clone();
                let id = o.addr.to_string();
                tokio::spawn(async move {
                    pool.remove(&id, drain).await;
                });
            }
        }
        self.config.store(Arc::new(cfg));
    }

    /// Handles one client request; never fails (errors are responses).
    /// `peer_ip` is the client address as a header value, formatted once per connection.
    pub async fn handle(
        self: Arc<Self>,
        req: Request<Incoming>,
        peer: SocketAddr,
        peer_ip: HeaderValue,
    ) -> Result<Response<ClientBody>, Infallible> {
        let start = now_nanos();
        self.metrics.requests.inc();
        // Proxied responses record their duration where the clock is read anyway.
        match self.proxy(req, peer, peer_ip, start).await {
            Ok(r) => Ok(r),
            Err(e) => {
                let r = e.into_response();
                self.metrics.local.inc(r.status().as_u16());
                self.metrics
                    .duration
                    .observe_nanos(now_nanos().saturating_sub(start));
                Ok(r)
            }
        }
    }

    async fn proxy(
        self: &Arc<Self>,
        mut req: Request<Incoming>,
        peer: SocketAddr,
        peer_ip: HeaderValue,
        start: u64,
    ) -> Result<Response<ClientBody>, ProxyError> {
        let cfg = self.config.load();
        check_request(&req, &cfg)?;
        let upgrade = is_upgrade(req.headers());
        let on_upgrade = upgrade.then(|| hyper::upgrade::on(&mut req));
        let (parts, body) = req.into_parts();
        let idempotent = is_idempotent(parts.method.as_str());
        let key = hash_key(&cfg, peer, |name| {
            parts.headers.get(name).map(|v| v.as_bytes())
        });
        let content_length = parts
            .headers
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|s| s.trim().parse::<u64>().ok());
        let mut headers =
            forward_headers(parts.headers, &parts.uri, parts.version, peer_ip, upgrade);
        let path = parts
            .uri
            .path_and_query()
            .cloned()
            .unwrap_or_else(|| http::uri::PathAndQuery::from_static("/"));

        // Buffer small bodies so a failed try can be resent; stream the rest (one try).
        let (buffered, mut stream) = match prepare_body(body, content_length).await? {
            Either::Left(b) => (Some(b), None),
            Either::Right(s) => (None, Some(s)),
        };
        let replayable = buffered.is_some();

        let attempts = if replayable { cfg.retries.attempts } else { 1 };
        let connect_timeout = cfg.timeouts.connect.0;
        let target = Uri::from(path);
        let mut tries = self.begin_tries(&cfg, start);
        let mut last_err = None;
        for attempt in 0..attempts {
            let Some(mut t) = self.next_try(&mut tries, attempt, &cfg, key.as_deref())? else {
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

            let sending = upstream::send(&t.inst.idle, t.inst.addr, connect_timeout, up);
            let result = tokio::time::timeout(t.timeout, sending).await;
            let outcome = match &result {
                Ok(Ok((resp, _))) => Ok(resp.status().as_u16()),
                Ok(Err(upstream::SendError::Connect(_))) => Err(ErrorKind::Connect),
                Ok(Err(upstream::SendError::Reset(_))) => Err(ErrorKind::Reset),
                Err(_) => Err(ErrorKind::Timeout),
            };
            self.end_try(&tries, &mut t, now_nanos(), outcome);
            match result {
                Ok(Ok((mut resp, conn))) => {
                    let status = resp.status();
                    if let (Some(down), StatusCode::SWITCHING_PROTOCOLS) = (on_upgrade, status) {
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
                    strip_hop_by_hop(&mut rparts.headers);
                    rparts
                        .headers
                        .append(header::VIA, HeaderValue::from_static("1.1 shoal"));
                    // The instance stays counted as busy (drain, least-connections) until the
                    // body ends; the latency sample is the time to response headers.
                    let body = Tracked {
                        inner: rbody,
                        busy: Some(t.busy),
                        conn: Some(conn),
                    };
                    return Ok(Response::from_parts(rparts, Either::Left(body)));
                }
                Ok(Err(e)) => {
                    tracing::debug!(service = %self.name, instance = %t.inst.id, error = %e, "upstream try failed");
                    let connect = matches!(e, upstream::SendError::Connect(_));
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
                    if !(replayable && idempotent) || tries.past_deadline() {
                        break;
                    }
                }
            }
        }
        Err(last_err.unwrap_or(ProxyError::NoInstance))
    }
}

/// Retry bookkeeping shared by both request paths: instances already tried, the snapshot
/// they were picked from, and the request's time limits.
pub(crate) struct Tries {
    tried: [usize; 10],
    snapshot: Arc<Snapshot>,
    start: u64,
    deadline: u64,
    per_try: Duration,
}

/// One try: its instance (counted in flight on it), when it started and how long it may take.
pub(crate) struct Try {
    pub(crate) inst: Arc<Instance>,
    pub(crate) busy: InFlight,
    pub(crate) started: u64,
    pub(crate) timeout: Duration,
}

impl Tries {
    /// Whether the request's time is up.
    pub(crate) fn past_deadline(&self) -> bool {
        now_nanos() >= self.deadline
    }
}

impl Service {
    /// Starts a request's tries: its deposit into the retry budget.
    pub(crate) fn begin_tries(&self, cfg: &ServiceConfig, start: u64) -> Tries {
        self.budget.deposit(
            cfg.retries.budget_percent,
            cfg.retries.budget_min_per_second,
            start,
        );
        Tries {
            tried: [usize::MAX; 10],
            snapshot: self.pool.snapshot_full(),
            start,
            deadline: start + cfg.timeouts.request.0.as_nanos() as u64,
            per_try: cfg.timeouts.per_try.0,
        }
    }

    /// Try number `attempt`: `Ok(None)` when a retry finds the budget spent or no untried
    /// instance is left, `Err(Timeout)` when the request's time is up.
    pub(crate) fn next_try(
        &self,
        t: &mut Tries,
        attempt: u32,
        cfg: &ServiceConfig,
        key: Option<&[u8]>,
    ) -> Result<Option<Try>, ProxyError> {
        if attempt > 0 {
            if !self
                .budget
                .try_withdraw(cfg.retries.budget_min_per_second, now_nanos())
            {
                self.metrics.retry_budget_exhausted.inc();
                return Ok(None);
            }
            self.metrics.retries.inc();
        }
        let now = if attempt == 0 { t.start } else { now_nanos() };
        let Some((idx, inst, busy)) = self.pick_live(&mut t.snapshot, &mut t.tried, key, now)
        else {
            return Ok(None);
        };
        t.tried[attempt as usize] = idx;
        let remaining = t.deadline.saturating_sub(now);
        if remaining == 0 {
            return Err(ProxyError::Timeout);
        }
        Ok(Some(Try {
            inst,
            busy,
            started: now,
            timeout: t.per_try.min(Duration::from_nanos(remaining)),
        }))
    }

    /// Records how a try ended at `answered`: the latency sample, the status or error count,
    /// passive health, and for an answer the request's time to response headers.
    pub(crate) fn end_try(
        &self,
        tries: &Tries,
        t: &mut Try,
        answered: u64,
        outcome: Result<u16, ErrorKind>,
    ) {
        // A failed try is a slow one as far as latency-aware balancing is concerned: a
        // refused connect must not make an instance look fast.
        let penalty = (t.timeout.as_nanos() as u64).min(5_000_000_000);
        t.busy.headers_received(match outcome {
            Ok(_) => answered,
            Err(_) => answered.max(t.started + penalty),
        });
        match outcome {
            Ok(status) => {
                t.inst.metrics.codes.inc(status);
                self.pool.record_result(&t.inst, status < 500, answered);
                self.metrics
                    .duration
                    .observe_nanos(answered.saturating_sub(tries.start));
            }
            Err(kind) => {
                t.inst.metrics.errors[kind as usize].inc();
                self.pool.record_result(&t.inst, false, answered);
            }
        }
    }

    /// Picks an instance not yet tried and counts the request in flight on it. A pick from a
    /// snapshot that predates the instance's drain is retried on the current snapshot, so a
    /// draining instance never gets a new request after `Pool::remove` saw it idle.
    fn pick_live(
        &self,
        snapshot: &mut Arc<Snapshot>,
        tried: &mut [usize; 10],
        key: Option<&[u8]>,
        now: u64,
    ) -> Option<(usize, Arc<Instance>, InFlight)> {
        for _ in 0..3 {
            let t = *tried;
            let idx = snapshot.selector.pick(key, now, &|i| t.contains(&i))?;
            let inst = snapshot.instances[idx].clone();
            let busy = InFlight::start(inst.clone(), now);
            // Pairs with the fence in `Pool::remove`.
            std::sync::atomic::fence(std::sync::atomic::Ordering::SeqCst);
            if inst.state() != State::Draining {
                return Some((idx, inst, busy));
            }
            drop(busy);
            *snapshot = self.pool.snapshot_full();
            // Indexes of the old snapshot mean nothing in the new one.
            *tried = [usize::MAX; 10];
        }
        None
    }
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

/// Errors shoal answers itself.
#[derive(Debug)]
pub enum ProxyError {
    BadRequest(&'static str),
    UriTooLong,
    HeadersTooLarge,
    PayloadTooLarge,
    NoInstance,
    Upstream(&'static str),
    Timeout,
}

impl ProxyError {
    pub fn status(&self) -> StatusCode {
        match self {
            ProxyError::BadRequest(_) => StatusCode::BAD_REQUEST,
            ProxyError::UriTooLong => StatusCode::URI_TOO_LONG,
            ProxyError::HeadersTooLarge => StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
            ProxyError::PayloadTooLarge => StatusCode::PAYLOAD_TOO_LARGE,
            ProxyError::NoInstance => StatusCode::SERVICE_UNAVAILABLE,
            ProxyError::Upstream(_) => StatusCode::BAD_GATEWAY,
            ProxyError::Timeout => StatusCode::GATEWAY_TIMEOUT,
        }
    }

    /// The short plain-text body of the error response.
    pub fn message(&self) -> &'static str {
        match self {
            ProxyError::BadRequest(m) => m,
            ProxyError::UriTooLong => "request target too long",
            ProxyError::HeadersTooLarge => "request header fields too large",
            ProxyError::PayloadTooLarge => "payload too large",
            ProxyError::NoInstance => "no instance available",
            ProxyError::Upstream(m) => m,
            ProxyError::Timeout => "upstream timed out",
        }
    }

    /// The one place errors become responses (the fast path writes the same bytes in
    /// `h1::write_error`).
    pub fn into_response(self) -> Response<ClientBody> {
        let msg = self.message();
        let status = self.status();
        let mut r = Response::new(Either::Right(Full::new(Bytes::from(format!("{msg}\n")))));
        *r.status_mut() = status;
        let h = r.headers_mut();
        h.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("text/plain; charset=utf-8"),
        );
        if status == StatusCode::BAD_REQUEST {
            // After a framing error the connection's byte stream cannot be trusted.
            h.insert(header::CONNECTION, HeaderValue::from_static("close"));
        }
        r
    }
}

/// Request-smuggling and limit checks; nothing that fails them reaches an instance.
fn check_request<B>(req: &Request<B>, cfg: &ServiceConfig) -> Result<(), ProxyError> {
    let target_len = req.uri().path_and_query().map_or(0, |p| p.as_str().len());
    if target_len > cfg.limits.max_request_line {
        return Err(ProxyError::UriTooLong);
    }
    let h = req.headers();
    // The read buffer bounds the head only roughly (it also holds the request line), so the
    // header block limit is checked exactly here.
    let head_bytes: usize = h.iter().map(|(k, v)| k.as_str().len() + v.len() + 4).sum();
    if h.len() > cfg.limits.max_headers || head_bytes > cfg.limits.max_header_bytes {
        return Err(ProxyError::HeadersTooLarge);
    }
    let mut te = h.get_all(header::TRANSFER_ENCODING).iter();
    if let Some(v) = te.next() {
        // Only a single, plain `chunked` is forwarded: stacked codings are how smuggling starts.
        if te.next().is_some() || !v.as_bytes().trim_ascii().eq_ignore_ascii_case(b"chunked") {
            return Err(ProxyError::BadRequest("unsupported transfer-encoding"));
        }
        if h.contains_key(header::CONTENT_LENGTH) {
            return Err(ProxyError::BadRequest(
                "both content-length and transfer-encoding",
            ));
        }
    }
    let mut cl = h.get_all(header::CONTENT_LENGTH).iter();
    if let Some(first) = cl.next() {
        if cl.any(|v| v != first)
            || first
                .to_str()
                .ok()
                .and_then(|s| s.trim().parse::<u64>().ok())
                .is_none()
        {
            return Err(ProxyError::BadRequest("invalid content-length"));
        }
    }
    if req.version() == Version::HTTP_11 && !h.contains_key(header::HOST) {
        return Err(ProxyError::BadRequest("missing host header"));
    }
    if h.get_all(header::HOST).iter().nth(1).is_some() {
        return Err(ProxyError::BadRequest("duplicate host header"));
    }
    Ok(())
}

/// Small bodies of known length come back buffered (left), others as the stream (right).
async fn prepare_body(
    body: Incoming,
    len: Option<u64>,
) -> Result<Either<Bytes, Incoming>, ProxyError> {
    if body.is_end_stream() {
        return Ok(Either::Left(Bytes::new()));
    }
    match len {
        Some(n) if n <= REPLAY_LIMIT => {
            let collected = Limited::new(body, REPLAY_LIMIT as usize)
                .collect()
                .await
                .map_err(|_| ProxyError::BadRequest("request body ended early"))?;
            Ok(Either::Left(collected.to_bytes()))
        }
        _ => Ok(Either::Right(body)),
    }
}

/// Methods a retry may resend after the request went out.
pub(crate) fn is_idempotent(m: &str) -> bool {
    matches!(m, "GET" | "HEAD" | "OPTIONS" | "PUT" | "DELETE" | "TRACE")
}

fn is_upgrade(h: &HeaderMap) -> bool {
    h.contains_key(header::UPGRADE)
        && h.get_all(header::CONNECTION).iter().any(|v| {
            v.to_str().is_ok_and(|s| {
                s.split(',')
                    .any(|t| t.trim().eq_ignore_ascii_case("upgrade"))
            })
        })
}

const HOP_BY_HOP: [HeaderName; 8] = [
    header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    HeaderName::from_static("proxy-connection"),
    header::TE,
    header::TRAILER,
    header::TRANSFER_ENCODING,
    header::UPGRADE,
    header::PROXY_AUTHORIZATION,
];

/// Removes hop-by-hop headers, including those the `Connection` header names.
fn strip_hop_by_hop(h: &mut HeaderMap) {
    // Most messages carry none: one pass over the names beats ten hash lookups.
    if !h
        .keys()
        .any(|k| HOP_BY_HOP.contains(k) || k == header::PROXY_AUTHENTICATE)
    {
        return;
    }
    let named: Vec<HeaderName> = h
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|s| s.split(','))
        .filter_map(|t| HeaderName::from_bytes(t.trim().as_bytes()).ok())
        .collect();
    for n in named {
        h.remove(n);
    }
    for n in &HOP_BY_HOP {
        h.remove(n);
    }
    h.remove(header::PROXY_AUTHENTICATE);
}

/// The client address as a header value (built once per connection).
pub fn peer_header(peer: SocketAddr) -> HeaderValue {
    HeaderValue::from_str(&peer.ip().to_string())
        .unwrap_or_else(|_| HeaderValue::from_static("unknown"))
}

const X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
const X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
const X_FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");

/// The headers sent upstream: hop-by-hop removed, then `X-Forwarded-*` and `Via` added.
fn forward_headers(
    mut h: HeaderMap,
    uri: &Uri,
    version: Version,
    peer_ip: HeaderValue,
    upgrade: bool,
) -> HeaderMap {
    let up_proto = upgrade.then(|| h.get(header::UPGRADE).cloned()).flatten();
    strip_hop_by_hop(&mut h);
    if let Some(p) = up_proto {
        h.insert(header::UPGRADE, p);
        h.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    }
    // Earlier hops in order (several header lines are one list), then the peer.
    let xff = if h.contains_key(X_FORWARDED_FOR) {
        let mut v = Vec::new();
        for prev in h.get_all(X_FORWARDED_FOR) {
            v.extend_from_slice(prev.as_bytes());
            v.extend_from_slice(b", ");
        }
        v.extend_from_slice(peer_ip.as_bytes());
        HeaderValue::from_bytes(&v).unwrap_or(peer_ip)
    } else {
        peer_ip
    };
    h.insert(X_FORWARDED_FOR, xff);
    h.insert(X_FORWARDED_PROTO, HeaderValue::from_static("http"));
    // HTTP/2 carries the host in :authority; HTTP/1.1 instances need it as Host.
    match h.get(header::HOST).cloned() {
        Some(host) => {
            h.insert(X_FORWARDED_HOST, host);
        }
        None => {
            if let Some(host) = uri
                .authority()
                .and_then(|a| HeaderValue::from_str(a.as_str()).ok())
            {
                h.insert(X_FORWARDED_HOST, host.clone());
                h.insert(header::HOST, host);
            }
        }
    }
    let via = if version == Version::HTTP_2 {
        "2 shoal"
    } else {
        "1.1 shoal"
    };
    h.append(header::VIA, HeaderValue::from_static(via));
    h
}

/// The balancing key for ip-hash / consistent-hash (none for other algorithms): the
/// configured header's first value, looked up by `header`, else the client IP.
pub(crate) fn hash_key<'a>(
    cfg: &ServiceConfig,
    peer: SocketAddr,
    header: impl FnOnce(&str) -> Option<&'a [u8]>,
) -> Option<Vec<u8>> {
    if !matches!(cfg.balance, Algorithm::IpHash | Algorithm::ConsistentHash) {
        return None;
    }
    let from_header = match &cfg.hash_key {
        HashKey::ClientIp => None,
        HashKey::Header(name) => header(name.as_str()),
    };
    Some(match (from_header, peer.ip()) {
        (Some(v), _) => v.to_vec(),
        (None, IpAddr::V4(v)) => v.octets().to_vec(),
        (None, IpAddr::V6(v)) => v.octets().to_vec(),
    })
}

/// A response body that keeps its instance counted as in flight until the body ends or is
/// dropped (drain waits for it; least-connections sees it).
pub struct Tracked {
    inner: Incoming,
    busy: Option<InFlight>,
    /// The upstream connection, returned to its instance's idle list once the body is read.
    conn: Option<hyper::client::conn::http1::SendRequest<UpstreamBody>>,
}

impl Tracked {
    fn finish(&mut self, complete: bool) {
        if let Some(busy) = self.busy.take() {
            if let (true, Some(c)) = (complete, self.conn.take()) {
                busy.inst.idle.put(c);
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

/// One request in flight to an instance: `Load::start` now, `Load::finish` on drop with the
/// time to response headers (or the time until the drop, if headers never came).
pub struct InFlight {
    inst: Arc<Instance>,
    sent: u64,
    rtt: Option<u64>,
}

impl InFlight {
    pub(crate) fn start(inst: Arc<Instance>, now: u64) -> Self {
        inst.load.start();
        InFlight {
            inst,
            sent: now,
            rtt: None,
        }
    }

    pub(crate) fn inst(&self) -> &Arc<Instance> {
        &self.inst
    }

    /// Records the latency sample at `now`.
    pub(crate) fn headers_received(&mut self, now: u64) {
        self.rtt = Some(now.saturating_sub(self.sent));
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        // The sample is the time to response headers; the clock is read again only for
        // tries that never got headers.
        let (rtt, at) = match self.rtt {
            Some(rtt) => (rtt, self.sent + rtt),
            None => {
                let now = now_nanos();
                (now.saturating_sub(self.sent), now)
            }
        };
        self.inst.load.finish(rtt, at);
    }
}

impl Body for Tracked {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let r = Pin::new(&mut self.inner).poll_frame(cx);
        match &r {
            Poll::Ready(None) => self.finish(true),
            Poll::Ready(Some(Err(_))) => self.finish(false),
            _ => {}
        }
        r
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn strips_connection_named_headers() {
        let mut h = HeaderMap::new();
        h.insert(
            header::CONNECTION,
            HeaderValue::from_static("close, x-secret"),
        );
        h.insert("x-secret", HeaderValue::from_static("1"));
        h.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        h.insert("x-kept", HeaderValue::from_static("1"));
        let peer: SocketAddr = "10.1.2.3:5555".parse().unwrap();
        h.insert("x-forwarded-for", HeaderValue::from_static("1.1.1.1"));
        h.append("x-forwarded-for", HeaderValue::from_static("2.2.2.2"));
        h.insert(header::HOST, HeaderValue::from_static("example.com"));
        let out = forward_headers(
            h,
            &Uri::from_static("/"),
            Version::HTTP_11,
            peer_header(peer),
            false,
        );
        assert!(out.get("x-secret").is_none());
        assert!(out.get("keep-alive").is_none());
        assert!(out.get(header::CONNECTION).is_none());
        assert_eq!(out["x-kept"], "1");
        assert_eq!(out["x-forwarded-for"], "1.1.1.1, 2.2.2.2, 10.1.2.3");
        assert_eq!(out["x-forwarded-host"], "example.com");
        assert_eq!(out[header::VIA], "1.1 shoal");
    }

    #[test]
    fn retry_budget_limits_retries() {
        let t0 = 1_000_000_000;
        let b = RetryBudget::new(t0);
        // No deposits and no time passed: the floor rate has not refilled anything yet.
        assert!(!b.try_withdraw(0.0, t0));
        for _ in 0..10 {
            b.deposit(20.0, 0.0, t0);
        }
        // 10 requests at 20% → 2 retries.
        assert!(b.try_withdraw(0.0, t0));
        assert!(b.try_withdraw(0.0, t0));
        assert!(!b.try_withdraw(0.0, t0));
        // The floor: 10 per second, at most one second banked.
        let t1 = t0 + 500_000_000;
        for _ in 0..5 {
            assert!(b.try_withdraw(10.0, t1));
        }
        assert!(!b.try_withdraw(10.0, t1));
        let t2 = t1 + 60_000_000_000;
        assert_eq!((0..20).filter(|_| b.try_withdraw(10.0, t2)).count(), 10);
    }
}
