//! The demo service: the instances of the fleet the demo autoscales.
//!
//! Endpoints:
//! - `GET /work?cpu_ms=N&sleep_ms=M`: burn N ms of CPU time, then wait M ms; 200 with JSON
//!   (any method is accepted, so queue workers may POST).
//! - `GET /healthz`: 200 `ok` (503 during the first `DEMO_READY_DELAY_MS` ms, to model a
//!   slow start).
//! - `GET /stats`: `{requests, before_ready}`: requests served, and how many of them arrived
//!   before the instance reported healthy (a correct balancer keeps that at 0).
//! - `GET /alloc?mb=N`: allocate and touch N MiB more and hold it; `GET /free` lets go.
//! - `/echo`: 200 with JSON describing the request (method, URI, headers, body).
//! - `/slow?ms=N`: wait N ms, then 200.
//! - `/status/{code}`: answer with that status (200–599).
//! - `/bytes?n=N`: stream N bytes.
//!
//! Anything else is 404; a malformed or out-of-range query value is 400.
//!
//! CPU burns run on tokio's blocking pool behind a semaphore (one slot by default), so an
//! instance has a bounded capacity of about one core: scaling out really adds capacity.

use std::convert::Infallible;
use std::future::Future;
use std::io;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{header, Request, Response, StatusCode};
use http_body::{Body, Frame, SizeHint};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{watch, Semaphore};
use tokio::task::JoinSet;

/// Largest accepted `cpu_ms`.
pub const MAX_CPU_MS: u64 = 60_000;
/// Largest accepted `sleep_ms` / `ms`.
pub const MAX_SLEEP_MS: u64 = 3_600_000;
/// Largest accepted `/bytes?n=`.
pub const MAX_BYTES: u64 = 1 << 32;
/// Largest accepted `/alloc?mb=` per request.
pub const MAX_ALLOC_MB: u64 = 4096;
/// Largest request body `/echo` reads.
const MAX_ECHO_BODY: usize = 16 << 20;

type DemoBody = BoxBody<Bytes, Box<dyn std::error::Error + Send + Sync>>;

/// Settings of one demo instance.
#[derive(Debug, Clone)]
pub struct DemoConfig {
    /// Instance id reported by `/work` (env `SHOAL_INSTANCE`).
    pub instance: String,
    /// How many `/work` CPU burns may run at once; 1 bounds an instance to about one core.
    pub cpu_slots: usize,
    /// `/healthz` fails for this long after start (env `DEMO_READY_DELAY_MS`).
    pub ready_delay: Duration,
}

impl Default for DemoConfig {
    fn default() -> Self {
        Self {
            instance: "demo".to_owned(),
            cpu_slots: 1,
            ready_delay: Duration::ZERO,
        }
    }
}

impl DemoConfig {
    /// Defaults, with the instance id taken from `SHOAL_INSTANCE` when set.
    pub fn from_env() -> Self {
        let mut cfg = Self::default();
        if let Ok(id) = std::env::var("SHOAL_INSTANCE") {
            if !id.is_empty() {
                cfg.instance = id;
            }
        }
        if let Some(ms) = std::env::var("DEMO_READY_DELAY_MS")
            .ok()
            .and_then(|v| v.parse().ok())
        {
            cfg.ready_delay = Duration::from_millis(ms);
        }
        cfg
    }
}

/// The address a demo instance should listen on: `HOST` (default `127.0.0.1`) and `PORT`
/// (default 8080), as a fleet provider passes them.
pub fn listen_addr_from_env() -> io::Result<SocketAddr> {
    let host = match std::env::var("HOST") {
        Ok(h) if !h.is_empty() => h
            .parse::<IpAddr>()
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, format!("HOST={h:?}: {e}")))?,
        _ => IpAddr::V4(Ipv4Addr::LOCALHOST),
    };
    let port = match std::env::var("PORT") {
        Ok(p) if !p.is_empty() => p
            .parse::<u16>()
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, format!("PORT={p:?}: {e}")))?,
        _ => 8080,
    };
    Ok(SocketAddr::new(host, port))
}

/// Binds the listener [`listen_addr_from_env`] names.
pub async fn bind_from_env() -> io::Result<TcpListener> {
    TcpListener::bind(listen_addr_from_env()?).await
}

/// Serves the demo endpoints until SIGTERM or Ctrl-C, then shuts down gracefully.
pub async fn run_demo(listener: TcpListener, cfg: DemoConfig) -> io::Result<()> {
    let signal = shutdown_signal()?;
    run_demo_until(listener, cfg, signal).await
}

/// Serves the demo endpoints until `shutdown` completes; then stops accepting, lets in-flight
/// requests finish, closes idle connections and returns.
pub async fn run_demo_until<F>(
    listener: TcpListener,
    cfg: DemoConfig,
    shutdown: F,
) -> io::Result<()>
where
    F: Future<Output = ()>,
{
    let state = Arc::new(State {
        instance: cfg.instance,
        cpu: Arc::new(Semaphore::new(cfg.cpu_slots.max(1))),
        ready_at: Instant::now() + cfg.ready_delay,
        healthy_seen: AtomicBool::new(false),
        requests: AtomicU64::new(0),
        before_ready: AtomicU64::new(0),
        held: std::sync::Mutex::new(Vec::new()),
    });
    let (stop_tx, stop_rx) = watch::channel(false);
    let mut conns = JoinSet::new();
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            () = &mut shutdown => break,
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => {
                    conns.spawn(serve_conn(stream, state.clone(), stop_rx.clone()));
                }
                Err(e) => {
                    // Usually EMFILE: back off instead of spinning, keep serving.
                    tracing::warn!(error = %e, "demo: accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            },
            Some(_) = conns.join_next(), if !conns.is_empty() => {}
        }
    }
    drop(listener);
    // Receivers treat a send and a dropped sender alike; ignore "no receivers".
    let _ = stop_tx.send(true);
    while conns.join_next().await.is_some() {}
    Ok(())
}

#[cfg(unix)]
fn shutdown_signal() -> io::Result<impl Future<Output = ()>> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    Ok(async move {
        tokio::select! {
            _ = term.recv() => {}
            _ = int.recv() => {}
        }
    })
}

#[cfg(not(unix))]
fn shutdown_signal() -> io::Result<impl Future<Output = ()>> {
    Ok(async {
        let _ = tokio::signal::ctrl_c().await;
    })
}

struct State {
    instance: String,
    cpu: Arc<Semaphore>,
    ready_at: Instant,
    /// Set once `/healthz` has answered 200.
    healthy_seen: AtomicBool,
    requests: AtomicU64,
    before_ready: AtomicU64,
    /// Memory held by `/alloc` until `/free`.
    held: std::sync::Mutex<Vec<Vec<u8>>>,
}

async fn serve_conn(stream: TcpStream, state: Arc<State>, mut stop: watch::Receiver<bool>) {
    // Best effort: a failure only costs latency.
    let _ = stream.set_nodelay(true);
    let svc = service_fn(move |req| handle(state.clone(), req));
    let conn = http1::Builder::new()
        .timer(TokioTimer::new())
        .serve_connection(TokioIo::new(stream), svc);
    tokio::pin!(conn);
    tokio::select! {
        res = conn.as_mut() => {
            if let Err(e) = res {
                tracing::debug!(error = %e, "demo: connection ended with an error");
            }
            return;
        }
        _ = stop.changed() => {}
    }
    conn.as_mut().graceful_shutdown();
    if let Err(e) = conn.await {
        tracing::debug!(error = %e, "demo: connection ended with an error while draining");
    }
}

async fn handle(
    state: Arc<State>,
    req: Request<Incoming>,
) -> Result<Response<DemoBody>, Infallible> {
    let query = req.uri().query().map(str::to_owned);
    let query = query.as_deref();
    let path = req.uri().path();
    if path != "/healthz" && path != "/stats" {
        state.requests.fetch_add(1, Ordering::Relaxed);
        if !state.healthy_seen.load(Ordering::Relaxed) {
            state.before_ready.fetch_add(1, Ordering::Relaxed);
        }
    }
    let resp = match path {
        "/healthz" if Instant::now() < state.ready_at => {
            text(StatusCode::SERVICE_UNAVAILABLE, "starting\n")
        }
        "/healthz" => {
            state.healthy_seen.store(true, Ordering::Relaxed);
            text(StatusCode::OK, "ok")
        }
        "/stats" => json(
            StatusCode::OK,
            &serde_json::json!({
                "requests": state.requests.load(Ordering::Relaxed),
                "before_ready": state.before_ready.load(Ordering::Relaxed),
            }),
        ),
        "/work" => work(&state, query).await,
        "/echo" => echo(req).await,
        // Grows the instance's memory by N MiB (pages touched, so resident) and holds it:
        // for vertical scaling and OOM handling.
        "/alloc" => match query_u64(query, "mb", MAX_ALLOC_MB) {
            Ok(mb) => {
                let mut held = state.held.lock().expect("held lock");
                held.push(vec![1u8; (mb as usize) << 20]);
                let total: usize = held.iter().map(Vec::len).sum();
                json(
                    StatusCode::OK,
                    &serde_json::json!({ "held_mb": total >> 20 }),
                )
            }
            Err(e) => text(StatusCode::BAD_REQUEST, e),
        },
        "/free" => {
            state.held.lock().expect("held lock").clear();
            json(StatusCode::OK, &serde_json::json!({ "held_mb": 0 }))
        }
        "/slow" => match query_u64(query, "ms", MAX_SLEEP_MS) {
            Ok(ms) => {
                tokio::time::sleep(Duration::from_millis(ms)).await;
                json(StatusCode::OK, &serde_json::json!({ "slept_ms": ms }))
            }
            Err(e) => text(StatusCode::BAD_REQUEST, e),
        },
        "/bytes" => match query_u64(query, "n", MAX_BYTES) {
            Ok(n) => Response::builder()
                .header(header::CONTENT_TYPE, "application/octet-stream")
                .body(RepeatBody { remaining: n }.boxed())
                .expect("static response parts are valid"),
            Err(e) => text(StatusCode::BAD_REQUEST, e),
        },
        p => match p.strip_prefix("/status/") {
            Some(code) => status(code),
            None => text(StatusCode::NOT_FOUND, "not found\n"),
        },
    };
    Ok(resp)
}

async fn work(state: &State, query: Option<&str>) -> Response<DemoBody> {
    let (cpu_ms, sleep_ms) = match (
        query_u64(query, "cpu_ms", MAX_CPU_MS),
        query_u64(query, "sleep_ms", MAX_SLEEP_MS),
    ) {
        (Ok(c), Ok(s)) => (c, s),
        (Err(e), _) | (_, Err(e)) => return text(StatusCode::BAD_REQUEST, e),
    };
    let started = Instant::now();
    if cpu_ms > 0 {
        let permit = state
            .cpu
            .clone()
            .acquire_owned()
            .await
            .expect("semaphore is never closed");
        let burn = tokio::task::spawn_blocking(move || {
            burn_cpu(Duration::from_millis(cpu_ms));
            drop(permit);
        });
        if burn.await.is_err() {
            return text(StatusCode::INTERNAL_SERVER_ERROR, "cpu worker failed\n");
        }
    }
    if sleep_ms > 0 {
        tokio::time::sleep(Duration::from_millis(sleep_ms)).await;
    }
    json(
        StatusCode::OK,
        &serde_json::json!({
            "instance": state.instance,
            "cpu_ms": cpu_ms,
            "sleep_ms": sleep_ms,
            "elapsed_ms": started.elapsed().as_millis() as u64,
        }),
    )
}

async fn echo(req: Request<Incoming>) -> Response<DemoBody> {
    let (parts, body) = req.into_parts();
    let body = match Limited::new(body, MAX_ECHO_BODY).collect().await {
        Ok(b) => b.to_bytes(),
        Err(e) => {
            let code = if e.is::<http_body_util::LengthLimitError>() {
                StatusCode::PAYLOAD_TOO_LARGE
            } else {
                StatusCode::BAD_REQUEST
            };
            return text(code, format!("{e}\n"));
        }
    };
    // Repeated headers are combined with ", " as RFC 9110 allows.
    let mut headers = serde_json::Map::new();
    for name in parts.headers.keys() {
        let joined = parts
            .headers
            .get_all(name)
            .iter()
            .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned())
            .collect::<Vec<_>>()
            .join(", ");
        headers.insert(name.as_str().to_owned(), joined.into());
    }
    json(
        StatusCode::OK,
        &serde_json::json!({
            "method": parts.method.as_str(),
            "uri": parts.uri.to_string(),
            "version": format!("{:?}", parts.version),
            "headers": headers,
            "body": String::from_utf8_lossy(&body),
            "body_len": body.len(),
        }),
    )
}

fn status(code: &str) -> Response<DemoBody> {
    match code
        .parse::<u16>()
        .ok()
        .and_then(|c| StatusCode::from_u16(c).ok())
    {
        Some(s) if (200..=599).contains(&s.as_u16()) => {
            if s == StatusCode::NO_CONTENT || s == StatusCode::NOT_MODIFIED {
                empty(s)
            } else {
                text(s, format!("{}\n", s.as_u16()))
            }
        }
        _ => text(
            StatusCode::BAD_REQUEST,
            format!("bad status code {code:?}\n"),
        ),
    }
}

/// Reads `key` from a query string as an integer in `0..=max`; absent means 0.
fn query_u64(query: Option<&str>, key: &str, max: u64) -> Result<u64, String> {
    let Some(value) = query
        .unwrap_or("")
        .split('&')
        .filter_map(|kv| kv.split_once('=').or(Some((kv, ""))))
        .find_map(|(k, v)| (k == key).then_some(v))
    else {
        return Ok(0);
    };
    match value.parse::<u64>() {
        Ok(n) if n <= max => Ok(n),
        Ok(_) => Err(format!("{key} must be at most {max}\n")),
        Err(_) => Err(format!(
            "{key} must be a non-negative integer, got {value:?}\n"
        )),
    }
}

/// Spins until this thread has used `cpu` of CPU time (wall time where that is unknown), so
/// a crowded machine makes requests slower instead of cheaper.
fn burn_cpu(cpu: Duration) {
    let start = thread_cpu_time();
    let mut remaining = cpu;
    let mut x = 0x2545_f491_4f6c_dd1d_u64;
    loop {
        // CPU time never runs ahead of wall time, so spin for the remainder, then re-check.
        let until = Instant::now() + remaining;
        while Instant::now() < until {
            for _ in 0..1000 {
                x = std::hint::black_box(x.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1));
            }
        }
        let (Some(a), Some(b)) = (start, thread_cpu_time()) else {
            break;
        };
        let used = b.saturating_sub(a);
        if used + Duration::from_micros(200) >= cpu {
            break;
        }
        remaining = cpu - used;
    }
    std::hint::black_box(x);
}

/// This thread's CPU time (`CLOCK_THREAD_CPUTIME_ID`). `/proc/thread-self/schedstat` is
/// only brought up to date at scheduler ticks, so a running thread reads up to a tick
/// (4 ms at HZ=250) behind and a `cpu_ms=20` request burned ~23.5 ms.
fn thread_cpu_time() -> Option<Duration> {
    nix::time::clock_gettime(nix::time::ClockId::CLOCK_THREAD_CPUTIME_ID)
        .ok()
        .map(Duration::from)
}

fn text(code: StatusCode, body: impl Into<Bytes>) -> Response<DemoBody> {
    build(code, "text/plain; charset=utf-8", body.into())
}

fn json(code: StatusCode, value: &serde_json::Value) -> Response<DemoBody> {
    let mut body = serde_json::to_vec(value).expect("JSON values always serialize");
    body.push(b'\n');
    build(code, "application/json", body.into())
}

fn empty(code: StatusCode) -> Response<DemoBody> {
    let mut resp = Response::new(Full::new(Bytes::new()).map_err(|e| match e {}).boxed());
    *resp.status_mut() = code;
    resp
}

fn build(code: StatusCode, content_type: &'static str, body: Bytes) -> Response<DemoBody> {
    let mut resp = Response::new(Full::new(body).map_err(|e| match e {}).boxed());
    *resp.status_mut() = code;
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        http::HeaderValue::from_static(content_type),
    );
    resp
}

/// A body of `remaining` bytes of `x`, streamed in chunks without allocating per chunk.
struct RepeatBody {
    remaining: u64,
}

const CHUNK: usize = 16 << 10;
static CHUNK_BYTES: [u8; CHUNK] = [b'x'; CHUNK];

impl Body for RepeatBody {
    type Data = Bytes;
    type Error = Box<dyn std::error::Error + Send + Sync>;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        if self.remaining == 0 {
            return Poll::Ready(None);
        }
        let n = self.remaining.min(CHUNK as u64) as usize;
        self.remaining -= n as u64;
        Poll::Ready(Some(Ok(Frame::data(Bytes::from_static(&CHUNK_BYTES[..n])))))
    }

    fn is_end_stream(&self) -> bool {
        self.remaining == 0
    }

    fn size_hint(&self) -> SizeHint {
        SizeHint::with_exact(self.remaining)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `cpu_ms` is what a request costs: the burn stops at the asked CPU time, not a
    /// scheduler tick later (the autoscaler's demo figures depend on it).
    #[test]
    fn the_burn_spends_the_cpu_time_asked_for() {
        for _ in 0..3 {
            let a = thread_cpu_time().unwrap();
            burn_cpu(Duration::from_millis(20));
            let used = thread_cpu_time().unwrap() - a;
            assert!(
                used >= Duration::from_micros(19_500) && used <= Duration::from_micros(20_800),
                "{used:?}"
            );
        }
    }

    #[test]
    fn query_parsing() {
        assert_eq!(query_u64(None, "ms", 10), Ok(0));
        assert_eq!(query_u64(Some("a=1&ms=7"), "ms", 10), Ok(7));
        assert_eq!(query_u64(Some("msx=3"), "ms", 10), Ok(0));
        assert!(query_u64(Some("ms=11"), "ms", 10).is_err());
        assert!(query_u64(Some("ms=-1"), "ms", 10).is_err());
        assert!(query_u64(Some("ms="), "ms", 10).is_err());
        assert!(query_u64(Some("ms"), "ms", 10).is_err());
    }

    #[test]
    fn burn_uses_at_least_the_requested_cpu() {
        let Some(before) = thread_cpu_time() else {
            return;
        };
        burn_cpu(Duration::from_millis(50));
        let used = thread_cpu_time().unwrap() - before;
        assert!(used >= Duration::from_millis(49), "used {used:?}");
    }
}
