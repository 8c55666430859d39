//! Open-loop load generator (`shoal load`).
//!
//! Request `i` is *intended* at `start + i / rate`, whatever the server does. Its latency is
//! measured from that intended time, so a request that waits for a free connection (because
//! the server stalls) is charged for the wait: no coordinated omission. The per-request
//! timeout also runs from the intended time, which bounds the whole run to
//! `duration + timeout`.
//!
//! One dispatcher task wakes at absolute deadlines and hands every due request (a batch when
//! behind) to an idle worker; each worker owns one HTTP/1.1 keep-alive connection. Workers are
//! spawned on demand up to `connections`; due requests beyond that wait in a backlog.

mod report;

use std::collections::{BTreeMap, VecDeque};
use std::io::{IsTerminal, Write};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use hdrhistogram::Histogram;
use http::{header, HeaderMap, HeaderValue, Method, Request, StatusCode, Uri};
use http_body_util::{BodyExt, Full};
use hyper::client::conn::http1::SendRequest;
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio::time::Instant;

pub use report::{ErrorCounts, HistogramBucket, LatencySummary, LoadReport};

/// Default upper bound on concurrent connections.
pub const DEFAULT_CONNECTIONS: usize = 64;
/// Default per-request timeout, counted from the intended send time.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(10);
/// Largest latency the histogram tracks (larger values saturate): one hour, in µs.
const MAX_LATENCY_US: u64 = 3_600_000_000;

/// What to send, how fast and for how long.
#[derive(Debug, Clone)]
pub struct LoadConfig {
    /// Target; `http://host[:port]/path?query` (no TLS).
    pub url: Uri,
    /// Arrival rate in requests per second.
    pub rate: f64,
    /// How long requests are issued; the run ends at most `timeout` later.
    pub duration: Duration,
    /// Upper bound on keep-alive connections, opened on demand.
    pub connections: usize,
    /// Per-request timeout, counted from the intended send time.
    pub timeout: Duration,
    /// Request method.
    pub method: Method,
    /// Extra request headers (`Host` is set from the URL unless given here).
    pub headers: HeaderMap,
    /// Request body, sent with every request.
    pub body: Bytes,
}

impl LoadConfig {
    /// A GET load with default connections and timeout.
    pub fn new(url: Uri, rate: f64, duration: Duration) -> Self {
        Self {
            url,
            rate,
            duration,
            connections: DEFAULT_CONNECTIONS,
            timeout: DEFAULT_TIMEOUT,
            method: Method::GET,
            headers: HeaderMap::new(),
            body: Bytes::new(),
        }
    }
}

/// Why a load run could not start. Failed requests are not errors: they are counted.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    /// The URL is not `http://` with a host.
    #[error("unsupported URL {0:?}: expected http://HOST[:PORT]/PATH (no TLS)")]
    InvalidUrl(String),
    /// A setting is out of range.
    #[error("invalid {field}: {reason}")]
    InvalidConfig {
        /// The offending setting (`rate`, `duration`, ...).
        field: &'static str,
        /// What is wrong with it.
        reason: String,
    },
    /// The host name did not resolve.
    #[error("cannot resolve {host}: {source}")]
    Resolve {
        /// The host that failed.
        host: String,
        /// The resolver's error.
        source: std::io::Error,
    },
    /// A worker task panicked.
    #[error("load worker failed: {0}")]
    Internal(String),
}

/// Whether the progress line should be shown: stderr is a terminal.
pub fn progress_default() -> bool {
    std::io::stderr().is_terminal()
}

/// Runs the load described by `cfg` on the current tokio runtime and returns its report.
/// With `progress`, writes a status line to stderr once a second.
pub async fn run_load(cfg: LoadConfig, progress: bool) -> Result<LoadReport, LoadError> {
    let target = Arc::new(Target::resolve(&cfg).await?);
    let total = (cfg.rate * cfg.duration.as_secs_f64()).round() as u64;
    let live = Arc::new(Live::default());
    let start = Instant::now();
    let progress_task = progress.then(|| tokio::spawn(progress_loop(live.clone(), start)));

    let mut d = Dispatcher {
        target,
        live: live.clone(),
        timeout: cfg.timeout,
        max_workers: cfg.connections,
        workers: Vec::new(),
        handles: Vec::new(),
        idle: Vec::new(),
        tally: Tally::new(),
    };
    let (idle_tx, mut idle_rx) = mpsc::unbounded_channel();
    let intended = |i: u64| start + Duration::from_secs_f64(i as f64 / cfg.rate);
    let mut next = 0u64;
    let mut backlog: VecDeque<Instant> = VecDeque::new();
    let mut last_dispatch = start;
    loop {
        while let Ok(id) = idle_rx.try_recv() {
            d.idle.push(id);
        }
        let now = Instant::now();
        while next < total && intended(next) <= now {
            backlog.push_back(intended(next));
            next += 1;
        }
        // Requests still waiting for a connection when their timeout expires are timeouts.
        while let Some(&t) = backlog.front() {
            if t + cfg.timeout > now {
                break;
            }
            backlog.pop_front();
            d.tally.record(Outcome::Timeout, now - t);
            d.live.finish(false);
        }
        while let Some(&t) = backlog.front() {
            let Some(sent) = d.dispatch(t, &idle_tx) else {
                break;
            };
            if sent {
                backlog.pop_front();
                last_dispatch = now;
            }
        }
        let next_due = (next < total).then(|| intended(next));
        let next_expiry = backlog.front().map(|&t| t + cfg.timeout);
        let wake = match (next_due, next_expiry) {
            (Some(a), Some(b)) => a.min(b),
            (Some(a), None) | (None, Some(a)) => a,
            (None, None) => break,
        };
        tokio::select! {
            () = tokio::time::sleep_until(wake) => {}
            Some(id) = idle_rx.recv(), if !backlog.is_empty() => d.idle.push(id),
        }
    }

    // Closing the job channels lets each worker finish its last request and exit.
    d.workers.clear();
    let connections_used = d.handles.len();
    let mut tally = d.tally;
    for h in d.handles {
        match h.await {
            Ok(t) => tally.merge(&t),
            Err(e) => return Err(LoadError::Internal(e.to_string())),
        }
    }
    let elapsed = start.elapsed();
    if let Some(p) = progress_task {
        p.abort();
        eprintln!();
    }
    let span = (last_dispatch - start).as_secs_f64() + 1.0 / cfg.rate;
    let sent = live.sent.load(Ordering::Relaxed);
    Ok(LoadReport::build(report::Inputs {
        cfg: &cfg,
        requests: total,
        achieved_rate: if total == 0 { 0.0 } else { sent as f64 / span },
        elapsed,
        connections_used,
        ok: tally.ok,
        errors: ErrorCounts {
            total: 0,
            connect: tally.connect,
            timeout: tally.timeout,
            io: tally.io,
            status_4xx: 0,
            status_5xx: 0,
        },
        status_codes: tally.statuses,
        hist: &tally.hist,
    }))
}

fn validate(cfg: &LoadConfig) -> Result<(), LoadError> {
    let bad = |field, reason: &str| {
        Err(LoadError::InvalidConfig {
            field,
            reason: reason.to_owned(),
        })
    };
    if !(cfg.rate.is_finite() && cfg.rate > 0.0) {
        return bad("rate", "must be a positive number of requests per second");
    }
    if cfg.duration.is_zero() {
        return bad("duration", "must be positive");
    }
    if cfg.connections == 0 {
        return bad("connections", "must be at least 1");
    }
    if cfg.timeout.is_zero() {
        return bad("timeout", "must be positive");
    }
    Ok(())
}

/// The resolved target and the request template.
struct Target {
    addrs: Vec<SocketAddr>,
    host: HeaderValue,
    path: Uri,
    method: Method,
    headers: HeaderMap,
    body: Bytes,
}

impl Target {
    async fn resolve(cfg: &LoadConfig) -> Result<Self, LoadError> {
        validate(cfg)?;
        let invalid = || LoadError::InvalidUrl(cfg.url.to_string());
        if cfg.url.scheme_str().is_some_and(|s| s != "http") {
            return Err(invalid());
        }
        let auth = cfg.url.authority().ok_or_else(invalid)?;
        let host = auth.host().trim_start_matches('[').trim_end_matches(']');
        let port = auth.port_u16().unwrap_or(80);
        let addrs: Vec<SocketAddr> = tokio::net::lookup_host((host, port))
            .await
            .map_err(|source| LoadError::Resolve {
                host: host.to_owned(),
                source,
            })?
            .collect();
        if addrs.is_empty() {
            let source = std::io::Error::new(std::io::ErrorKind::NotFound, "no addresses");
            return Err(LoadError::Resolve {
                host: host.to_owned(),
                source,
            });
        }
        let path = cfg.url.path_and_query().map_or("/", |p| p.as_str());
        Ok(Self {
            addrs,
            // From host and port only: the authority may carry userinfo.
            host: HeaderValue::from_str(&match auth.port() {
                Some(p) => format!("{}:{p}", auth.host()),
                None => auth.host().to_owned(),
            })
            .map_err(|_| invalid())?,
            path: path.parse().map_err(|_| invalid())?,
            method: cfg.method.clone(),
            headers: cfg.headers.clone(),
            body: cfg.body.clone(),
        })
    }

    fn request(&self) -> Request<Full<Bytes>> {
        let mut req = Request::new(Full::new(self.body.clone()));
        *req.method_mut() = self.method.clone();
        *req.uri_mut() = self.path.clone();
        let h = req.headers_mut();
        for (name, value) in &self.headers {
            h.append(name, value.clone());
        }
        if !h.contains_key(header::HOST) {
            h.insert(header::HOST, self.host.clone());
        }
        req
    }
}

/// Counters the progress line reads while the run is going.
#[derive(Default)]
struct Live {
    sent: AtomicU64,
    ok: AtomicU64,
    errors: AtomicU64,
}

impl Live {
    fn finish(&self, ok: bool) {
        let c = if ok { &self.ok } else { &self.errors };
        c.fetch_add(1, Ordering::Relaxed);
    }
}

async fn progress_loop(live: Arc<Live>, start: Instant) {
    let second = Duration::from_secs(1);
    let mut tick = tokio::time::interval_at(start + second, second);
    let mut last_done = 0;
    loop {
        tick.tick().await;
        let ok = live.ok.load(Ordering::Relaxed);
        let errors = live.errors.load(Ordering::Relaxed);
        let done = ok + errors;
        let line = format!(
            "\r\x1b[2K{:>6.1}s  sent {}  ok {}  errors {}  rps {}",
            start.elapsed().as_secs_f64(),
            live.sent.load(Ordering::Relaxed),
            ok,
            errors,
            done - last_done,
        );
        last_done = done;
        let mut err = std::io::stderr().lock();
        // Progress is cosmetic; a closed stderr must not stop the run.
        let _ = err.write_all(line.as_bytes()).and_then(|()| err.flush());
    }
}

struct Dispatcher {
    target: Arc<Target>,
    live: Arc<Live>,
    timeout: Duration,
    max_workers: usize,
    workers: Vec<mpsc::UnboundedSender<Instant>>,
    handles: Vec<JoinHandle<Tally>>,
    /// Idle worker ids; LIFO so the warmest connections are reused and the pool stays small.
    idle: Vec<usize>,
    /// Requests that timed out before a connection was free.
    tally: Tally,
}

impl Dispatcher {
    /// Hands the request intended at `t` to a worker, spawning one if allowed. `None`: every
    /// worker is busy; `Some(false)`: the chosen worker is gone, try again.
    fn dispatch(&mut self, t: Instant, idle_tx: &mpsc::UnboundedSender<usize>) -> Option<bool> {
        let id = match self.idle.pop() {
            Some(id) => id,
            None if self.workers.len() < self.max_workers => self.spawn(idle_tx),
            None => return None,
        };
        Some(self.workers[id].send(t).is_ok())
    }

    fn spawn(&mut self, idle_tx: &mpsc::UnboundedSender<usize>) -> usize {
        let id = self.workers.len();
        let (tx, rx) = mpsc::unbounded_channel();
        let w = Worker {
            id,
            target: self.target.clone(),
            live: self.live.clone(),
            timeout: self.timeout,
            idle: idle_tx.clone(),
        };
        self.handles.push(tokio::spawn(w.run(rx)));
        self.workers.push(tx);
        id
    }
}

struct Worker {
    id: usize,
    target: Arc<Target>,
    live: Arc<Live>,
    timeout: Duration,
    idle: mpsc::UnboundedSender<usize>,
}

impl Worker {
    async fn run(self, mut jobs: mpsc::UnboundedReceiver<Instant>) -> Tally {
        let mut tally = Tally::new();
        let mut conn: Option<Conn> = None;
        while let Some(intended) = jobs.recv().await {
            self.live.sent.fetch_add(1, Ordering::Relaxed);
            let deadline = intended + self.timeout;
            let outcome =
                match tokio::time::timeout_at(deadline, attempt(&mut conn, &self.target)).await {
                    Ok(o) => o,
                    Err(_) => {
                        // The connection still carries the abandoned request: drop it.
                        conn = None;
                        Outcome::Timeout
                    }
                };
            let ok = tally.record(outcome, intended.elapsed());
            self.live.finish(ok);
            if self.idle.send(self.id).is_err() {
                break;
            }
        }
        tally
    }
}

/// One keep-alive connection; dropping it closes the socket.
struct Conn {
    tx: SendRequest<Full<Bytes>>,
    task: JoinHandle<()>,
}

impl Drop for Conn {
    fn drop(&mut self) {
        self.task.abort();
    }
}

enum Outcome {
    Response(StatusCode),
    Connect,
    Timeout,
    Io,
}

async fn attempt(conn: &mut Option<Conn>, target: &Target) -> Outcome {
    // A connection the server closed while idle is replaced silently: that is not a failure
    // of any request.
    let stale = match conn.as_mut() {
        Some(c) => c.tx.is_closed() || c.tx.ready().await.is_err(),
        None => true,
    };
    if stale {
        *conn = None;
        match connect(target).await {
            Some(c) => *conn = Some(c),
            None => return Outcome::Connect,
        }
    }
    let c = conn.as_mut().expect("connected above");
    let resp = match c.tx.send_request(target.request()).await {
        Ok(r) => r,
        Err(_) => {
            *conn = None;
            return Outcome::Io;
        }
    };
    let status = resp.status();
    // Read the body to the end (latency includes it) without buffering it.
    let mut body = resp.into_body();
    while let Some(frame) = body.frame().await {
        if frame.is_err() {
            *conn = None;
            return Outcome::Io;
        }
    }
    Outcome::Response(status)
}

async fn connect(target: &Target) -> Option<Conn> {
    let mut stream = None;
    for addr in &target.addrs {
        if let Ok(s) = TcpStream::connect(addr).await {
            stream = Some(s);
            break;
        }
    }
    let stream = stream?;
    // Best effort: without it small requests only get slower.
    let _ = stream.set_nodelay(true);
    let (tx, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .ok()?;
    let task = tokio::spawn(async move {
        // Errors surface on the request that was in flight; nothing to add here.
        let _ = conn.await;
    });
    Some(Conn { tx, task })
}

/// Results of the requests one worker (or the dispatcher) finished.
struct Tally {
    /// Latency in µs of every request that got a complete response.
    hist: Histogram<u64>,
    ok: u64,
    connect: u64,
    timeout: u64,
    io: u64,
    statuses: BTreeMap<u16, u64>,
}

impl Tally {
    fn new() -> Self {
        Self {
            hist: Histogram::new_with_bounds(1, MAX_LATENCY_US, 3).expect("valid static bounds"),
            ok: 0,
            connect: 0,
            timeout: 0,
            io: 0,
            statuses: BTreeMap::new(),
        }
    }

    /// Records one request; returns whether it succeeded (a response below 400).
    fn record(&mut self, outcome: Outcome, latency: Duration) -> bool {
        match outcome {
            Outcome::Response(s) => {
                let us = u64::try_from(latency.as_micros()).unwrap_or(u64::MAX);
                self.hist.saturating_record(us.max(1));
                *self.statuses.entry(s.as_u16()).or_default() += 1;
                let ok = s.as_u16() < 400;
                self.ok += u64::from(ok);
                return ok;
            }
            Outcome::Connect => self.connect += 1,
            Outcome::Timeout => self.timeout += 1,
            Outcome::Io => self.io += 1,
        }
        false
    }

    fn merge(&mut self, other: &Tally) {
        self.hist.add(&other.hist).expect("histograms share bounds");
        self.ok += other.ok;
        self.connect += other.connect;
        self.timeout += other.timeout;
        self.io += other.io;
        for (code, n) in &other.statuses {
            *self.statuses.entry(*code).or_default() += n;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn rejects_bad_config() {
        let url: Uri = "http://127.0.0.1:1/".parse().unwrap();
        let mut cfg = LoadConfig::new(url, 0.0, Duration::from_secs(1));
        assert!(matches!(
            run_load(cfg.clone(), false).await,
            Err(LoadError::InvalidConfig { field: "rate", .. })
        ));
        cfg.rate = 10.0;
        cfg.url = "https://example.com/".parse().unwrap();
        assert!(matches!(
            run_load(cfg.clone(), false).await,
            Err(LoadError::InvalidUrl(_))
        ));
        cfg.url = "/relative".parse().unwrap();
        assert!(matches!(
            run_load(cfg, false).await,
            Err(LoadError::InvalidUrl(_))
        ));
    }

    #[test]
    fn tally_counts_by_kind() {
        let mut t = Tally::new();
        assert!(t.record(Outcome::Response(StatusCode::OK), Duration::from_millis(2)));
        assert!(!t.record(
            Outcome::Response(StatusCode::SERVICE_UNAVAILABLE),
            Duration::from_millis(3)
        ));
        assert!(!t.record(Outcome::Timeout, Duration::from_secs(10)));
        let mut u = Tally::new();
        u.record(Outcome::Connect, Duration::ZERO);
        u.record(Outcome::Io, Duration::ZERO);
        t.merge(&u);
        assert_eq!((t.ok, t.connect, t.timeout, t.io), (1, 1, 1, 1));
        assert_eq!(t.statuses.get(&503), Some(&1));
        assert_eq!(t.hist.len(), 2);
    }
}
