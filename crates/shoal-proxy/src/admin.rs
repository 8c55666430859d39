//! The admin listener: `/metrics`, the JSON API under `/api/`, and the dashboard at `/`.
//! Mutating endpoints require `Authorization: Bearer TOKEN`.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize};
use std::sync::Arc;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use http::{header, Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Either, Full, Limited};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use serde::Deserialize;
use serde_json::{json, Value};
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::app::App;
use crate::history::{Dashboard, MAX_STREAMS};
use crate::pool::now_nanos;

const DASHBOARD: &str = include_str!("dashboard.html");
const DASHBOARD_JS: &str = include_str!("dashboard.js");

/// A response body: a whole one, or the dashboard's event stream.
type AdminBody = Either<Full<Bytes>, EventStream>;

/// Server-Sent Events from the dashboard's broadcast, one per open page.
pub struct EventStream {
    rx: tokio::sync::mpsc::Receiver<Bytes>,
    _slot: StreamSlot,
}

/// Releases a stream slot when the page goes away.
struct StreamSlot(Arc<Dashboard>);

impl Drop for StreamSlot {
    fn drop(&mut self) {
        self.0
            .streams
            .fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
    }
}

impl http_body::Body for EventStream {
    type Data = Bytes;
    type Error = Infallible;
    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<Bytes>, Infallible>>> {
        self.rx
            .poll_recv(cx)
            .map(|o| o.map(|b| Ok(http_body::Frame::data(b))))
    }
}

/// `GET /api/dashboard/stream`: the history at once (`init`), then a `point` every second.
/// A page that falls behind gets a fresh `init` instead of a gap.
fn event_stream(dash: &Arc<Dashboard>) -> Response<AdminBody> {
    use std::sync::atomic::Ordering;
    if dash.streams.fetch_add(1, Ordering::Relaxed) >= MAX_STREAMS {
        dash.streams.fetch_sub(1, Ordering::Relaxed);
        return whole(error(
            StatusCode::SERVICE_UNAVAILABLE,
            "too many dashboard streams open",
        ));
    }
    let slot = StreamSlot(dash.clone());
    let (tx, rx) = tokio::sync::mpsc::channel::<Bytes>(4);
    let mut events = dash.events.subscribe();
    let d = dash.clone();
    tokio::spawn(async move {
        // Tells the browser how soon to reconnect after a drop.
        let first = format!("retry: 2000\n{}", d.init_event());
        if tx.send(Bytes::from(first)).await.is_err() {
            return;
        }
        loop {
            let msg = match events.recv().await {
                Ok(m) => m,
                Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => d.init_event(),
                Err(tokio::sync::broadcast::error::RecvError::Closed) => return,
            };
            if tx.send(Bytes::from(msg.to_string())).await.is_err() {
                return; // the page went away
            }
        }
    });
    let mut r = Response::new(Either::Right(EventStream { rx, _slot: slot }));
    let h = r.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("text/event-stream"),
    );
    h.insert(
        header::CACHE_CONTROL,
        header::HeaderValue::from_static("no-store"),
    );
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        header::HeaderValue::from_static("nosniff"),
    );
    r
}

fn whole(r: Response<Full<Bytes>>) -> Response<AdminBody> {
    r.map(Either::Left)
}

/// What the admin listener allows a client: it is reachable by anything on the host (or
/// further, if bound so), so a client that connects and sends nothing, stays idle, or stops
/// reading must not pin a task or a dashboard slot for ever.
#[derive(Debug, Clone, Copy)]
pub struct AdminLimits {
    /// Connections at once; past it, accepting waits (the kernel backlog queues).
    pub max_connections: usize,
    /// Time to send a request head.
    pub header_read: Duration,
    /// A connection with no request in flight and no bytes moved this long is closed.
    pub idle: Duration,
    /// A client that takes no response bytes this long (a stalled dashboard stream, a
    /// `/metrics` reader that stopped) is disconnected.
    pub write_stall: Duration,
}

impl Default for AdminLimits {
    fn default() -> Self {
        AdminLimits {
            max_connections: 256,
            header_read: Duration::from_secs(10),
            idle: Duration::from_secs(15),
            write_stall: Duration::from_secs(10),
        }
    }
}

/// Binds the admin listener; serves until `stop` flips. Returns the bound address.
pub async fn serve(
    addr: SocketAddr,
    app: Arc<App>,
    stop: watch::Receiver<bool>,
) -> std::io::Result<SocketAddr> {
    serve_with(addr, app, stop, AdminLimits::default()).await
}

/// [`serve`] with explicit limits.
pub async fn serve_with(
    addr: SocketAddr,
    app: Arc<App>,
    mut stop: watch::Receiver<bool>,
    limits: AdminLimits,
) -> std::io::Result<SocketAddr> {
    let listener = TcpListener::bind(addr).await?;
    let local = listener.local_addr()?;
    let dash = Arc::new(Dashboard::default());
    tokio::spawn(dash.clone().run(app.clone(), stop.clone()));
    let slots = Arc::new(tokio::sync::Semaphore::new(limits.max_connections.max(1)));
    tokio::spawn(async move {
        loop {
            let permit = tokio::select! {
                p = slots.clone().acquire_owned() => match p {
                    Ok(p) => p,
                    Err(_) => return,
                },
                _ = crate::server::stopped(&mut stop) => return,
            };
            let (stream, peer) = tokio::select! {
                r = listener.accept() => match r {
                    Ok(x) => x,
                    Err(e) => {
                        tracing::warn!(error = %e, "admin accept failed");
                        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                        continue;
                    }
                },
                _ = crate::server::stopped(&mut stop) => return,
            };
            let (app, dash, stop) = (app.clone(), dash.clone(), stop.clone());
            tokio::spawn(async move {
                let _permit = permit;
                // Last request start or end, and requests in flight, for the idle timeout.
                let activity = Arc::new((AtomicU64::new(now_nanos()), AtomicUsize::new(0)));
                let act = activity.clone();
                let svc = service_fn(move |req| {
                    let (app, dash) = (app.clone(), dash.clone());
                    let busy = crate::server::Busy::new(act.clone());
                    async move {
                        let _busy = busy;
                        let r = match (req.method(), req.uri().path()) {
                            (&Method::GET, "/api/dashboard/stream") => event_stream(&dash),
                            (&Method::GET, "/api/dashboard/history") => whole(respond(
                                StatusCode::OK,
                                "application/json",
                                dash.history_json(),
                            )),
                            // The history rides in the page: the first paint has charts.
                            (&Method::GET, "/") => whole(respond(
                                StatusCode::OK,
                                "text/html; charset=utf-8",
                                DASHBOARD.replace(
                                    "__SHOAL_HISTORY__",
                                    &dash.history_json().replace("</", "<\\/"),
                                ),
                            )),
                            (&Method::GET, "/dashboard.js") => whole(respond(
                                StatusCode::OK,
                                "text/javascript; charset=utf-8",
                                DASHBOARD_JS,
                            )),
                            _ => whole(handle(app, req).await?),
                        };
                        Ok::<_, Infallible>(r)
                    }
                });
                let stream = crate::h1::Rewind::new(BytesMut::new(), stream, limits.write_stall);
                let mut builder = auto::Builder::new(TokioExecutor::new());
                builder
                    .http1()
                    .timer(TokioTimer::new())
                    .header_read_timeout(limits.header_read);
                builder.http2().timer(TokioTimer::new());
                let conn = builder.serve_connection(TokioIo::new(stream), svc);
                crate::server::drive(
                    conn,
                    |c| c.graceful_shutdown(),
                    stop,
                    activity,
                    limits.idle,
                    peer,
                )
                .await;
            });
        }
    });
    Ok(local)
}

fn respond(
    status: StatusCode,
    ctype: &'static str,
    body: impl Into<Bytes>,
) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(body.into()));
    *r.status_mut() = status;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static(ctype),
    );
    r.headers_mut().insert(
        header::CACHE_CONTROL,
        header::HeaderValue::from_static("no-store"),
    );
    r
}

fn json_resp(status: StatusCode, v: &Value) -> Response<Full<Bytes>> {
    respond(
        status,
        "application/json",
        serde_json::to_vec_pretty(v).unwrap_or_default(),
    )
}

fn error(status: StatusCode, msg: &str) -> Response<Full<Bytes>> {
    json_resp(status, &json!({ "error": msg }))
}

/// Constant-time comparison so the token cannot be guessed byte by byte from timings.
fn token_matches(given: &[u8], want: &[u8]) -> bool {
    given.len() == want.len()
        && given
            .iter()
            .zip(want)
            .fold(0u8, |acc, (a, b)| acc | (a ^ b))
            == 0
}

fn authorized(app: &App, req: &Request<Incoming>) -> Result<(), Response<Full<Bytes>>> {
    let Some(want) = &app.admin_token else {
        return Err(error(
            StatusCode::FORBIDDEN,
            "mutating endpoints are disabled: set admin.token or SHOAL_ADMIN_TOKEN",
        ));
    };
    let given = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|s| s.strip_prefix("Bearer "))
        .unwrap_or("");
    if token_matches(given.as_bytes(), want.as_bytes()) {
        Ok(())
    } else {
        let mut r = error(StatusCode::UNAUTHORIZED, "missing or wrong bearer token");
        r.headers_mut().insert(
            header::WWW_AUTHENTICATE,
            header::HeaderValue::from_static("Bearer"),
        );
        Err(r)
    }
}

#[derive(Deserialize)]
struct AddInstance {
    addr: SocketAddr,
    #[serde(default)]
    id: Option<String>,
    #[serde(default = "one")]
    weight: u32,
}

fn one() -> u32 {
    1
}

async fn handle(
    app: Arc<App>,
    req: Request<Incoming>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    let path = req.uri().path().trim_end_matches('/').to_string();
    let segs: Vec<&str> = path.split('/').filter(|s| !s.is_empty()).collect();
    let method = req.method().clone();
    let resp = match (&method, segs.as_slice()) {
        (&Method::GET, ["metrics"]) => {
            let accept = req
                .headers()
                .get(header::ACCEPT)
                .and_then(|v| v.to_str().ok());
            let format = crate::metrics::Format::negotiate(accept);
            respond(
                StatusCode::OK,
                format.content_type(),
                app.render_metrics_as(format),
            )
        }
        (&Method::GET, ["healthz"]) => respond(StatusCode::OK, "text/plain", "ok\n"),
        (&Method::GET, ["api", "services"]) => {
            let list: Vec<Value> = app
                .services()
                .iter()
                .map(|s| {
                    let mut v = app.service_json(s);
                    if let Some(x) = app.extension_get(&format!("/api/services/{}", s.name)) {
                        merge(&mut v, x);
                    }
                    v
                })
                .collect();
            json_resp(StatusCode::OK, &json!({ "services": list }))
        }
        (&Method::GET, ["api", "services", name]) => match app.service(name) {
            Some(s) => {
                let mut v = app.service_json(&s);
                if let Some(x) = app.extension_get(&path) {
                    merge(&mut v, x);
                }
                json_resp(StatusCode::OK, &v)
            }
            None => error(StatusCode::NOT_FOUND, "no such service"),
        },
        (&Method::POST, ["api", "services", name, "instances"]) => match authorized(&app, &req) {
            Err(r) => r,
            Ok(()) => {
                let name = name.to_string();
                match read_json::<AddInstance>(req).await {
                    Err(r) => r,
                    Ok(body) => match app.service(&name) {
                        None => error(StatusCode::NOT_FOUND, "no such service"),
                        Some(s) => {
                            let id = body.id.unwrap_or_else(|| body.addr.to_string());
                            match s.pool.add(&id, body.addr, body.weight, true) {
                                Some(_) => json_resp(StatusCode::CREATED, &json!({ "id": id })),
                                None => {
                                    error(StatusCode::CONFLICT, "an instance with that id exists")
                                }
                            }
                        }
                    },
                }
            }
        },
        (&Method::POST, ["api", "services", name, "instances", id, "drain"]) => {
            match authorized(&app, &req) {
                Err(r) => r,
                Ok(()) if app.instance_owned(name, id) => fleet_owned(),
                Ok(()) => match app.service(name).and_then(|s| s.pool.drain(id)) {
                    Some(i) => json_resp(
                        StatusCode::OK,
                        &json!({ "id": i.id, "state": i.state(), "in_flight": i.in_flight() }),
                    ),
                    None => error(StatusCode::NOT_FOUND, "no such service or instance"),
                },
            }
        }
        (&Method::DELETE, ["api", "services", name, "instances", id]) => {
            match authorized(&app, &req) {
                Err(r) => r,
                Ok(()) if app.instance_owned(name, id) => fleet_owned(),
                Ok(()) => match app.service(name) {
                    Some(s) if s.pool.get(id).is_some() => {
                        // Drain in the background; the answer says it has begun.
                        let timeout = s.config.load().timeouts.drain.0;
                        let (pool, id) = (s.pool.clone(), id.to_string());
                        pool.drain(&id);
                        tokio::spawn(async move {
                            pool.remove(&id, timeout).await;
                        });
                        json_resp(StatusCode::ACCEPTED, &json!({ "draining": true }))
                    }
                    _ => error(StatusCode::NOT_FOUND, "no such service or instance"),
                },
            }
        }
        (&Method::POST, ["api", "reload"]) => match authorized(&app, &req) {
            Err(r) => r,
            Ok(()) => match app.reload().await {
                Ok(()) => json_resp(StatusCode::OK, &json!({ "reloaded": true })),
                Err(e) => error(StatusCode::UNPROCESSABLE_ENTITY, &e),
            },
        },
        (&Method::POST, ["api", "tls", "reload"]) => match authorized(&app, &req) {
            Err(r) => r,
            Ok(()) => match app.reload_tls() {
                Ok(n) => json_resp(StatusCode::OK, &json!({ "reloaded": n })),
                Err(e) => error(StatusCode::UNPROCESSABLE_ENTITY, &e),
            },
        },
        (&Method::POST, ["api", "cache", "purge"]) => match authorized(&app, &req) {
            Err(r) => r,
            Ok(()) => match read_json::<Value>(req).await {
                Err(r) => r,
                Ok(body) => match app.cache_purge(&body).await {
                    Ok(v) => json_resp(StatusCode::OK, &v),
                    Err((code, e)) => error(
                        StatusCode::from_u16(code).unwrap_or(StatusCode::BAD_REQUEST),
                        &e,
                    ),
                },
            },
        },
        (&Method::GET, ["api", "cache"]) => match app.cache_status() {
            Some(v) => json_resp(StatusCode::OK, &v),
            None => error(StatusCode::NOT_FOUND, "no cache is configured"),
        },
        (&Method::POST, ["api", ..]) => match authorized(&app, &req) {
            Err(r) => r,
            Ok(()) => match read_json::<Value>(req).await {
                Err(r) => r,
                Ok(body) => match app.extension_post(&path, &body) {
                    Some(Ok(v)) => json_resp(StatusCode::OK, &v),
                    Some(Err(e)) => error(StatusCode::BAD_REQUEST, &e),
                    None => error(StatusCode::NOT_FOUND, "not found"),
                },
            },
        },
        (&Method::GET, ["api", ..]) => match app.extension_get(&path) {
            Some(v) => json_resp(StatusCode::OK, &v),
            None => error(StatusCode::NOT_FOUND, "not found"),
        },
        _ => error(StatusCode::NOT_FOUND, "not found"),
    };
    Ok(resp)
}

fn fleet_owned() -> Response<Full<Bytes>> {
    error(
        StatusCode::CONFLICT,
        "the instance belongs to a fleet: scale the fleet with POST /api/services/NAME/scale",
    )
}

fn merge(into: &mut Value, from: Value) {
    if let (Some(a), Value::Object(b)) = (into.as_object_mut(), from) {
        a.extend(b);
    }
}

async fn read_json<T: serde::de::DeserializeOwned>(
    req: Request<Incoming>,
) -> Result<T, Response<Full<Bytes>>> {
    let body = Limited::new(req.into_body(), 64 * 1024)
        .collect()
        .await
        .map_err(|_| {
            error(
                StatusCode::PAYLOAD_TOO_LARGE,
                "body too large or unreadable",
            )
        })?
        .to_bytes();
    serde_json::from_slice(&body)
        .map_err(|e| error(StatusCode::BAD_REQUEST, &format!("invalid JSON: {e}")))
}
