//! Test harness: real backends and a real proxy on port-0 sockets, in process.
#![allow(dead_code)]

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU16, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo};
use shoal_proxy::config::ServiceConfig;
use shoal_proxy::proxy::Service;
use shoal_proxy::App;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

/// A backend: answers with its name, counts requests, can be slowed, made to fail, or killed.
pub struct Backend {
    pub name: String,
    pub addr: SocketAddr,
    pub requests: AtomicUsize,
    pub in_flight: AtomicUsize,
    /// Status to answer with (200 by default).
    pub status: AtomicU16,
    /// Added latency per request.
    pub delay_ms: AtomicU64,
    pub body_bytes: AtomicU64,
    /// Connections accepted.
    pub conns: AtomicUsize,
    /// 101 answers given.
    pub upgrades: AtomicUsize,
    /// Method, target and headers of the last request, as received.
    pub last: std::sync::Mutex<String>,
    kill: watch::Sender<bool>,
}

impl Backend {
    pub async fn start(name: &str) -> Arc<Backend> {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let (kill, kill_rx) = watch::channel(false);
        let b = Arc::new(Backend {
            name: name.to_string(),
            addr: listener.local_addr().unwrap(),
            requests: AtomicUsize::new(0),
            in_flight: AtomicUsize::new(0),
            status: AtomicU16::new(200),
            delay_ms: AtomicU64::new(0),
            body_bytes: AtomicU64::new(0),
            upgrades: AtomicUsize::new(0),
            last: std::sync::Mutex::new(String::new()),
            conns: AtomicUsize::new(0),
            kill,
        });
        let b2 = b.clone();
        tokio::spawn(async move {
            let mut kill_rx2 = kill_rx.clone();
            loop {
                let (stream, _) = tokio::select! {
                    r = listener.accept() => r.unwrap(),
                    _ = kill_rx2.changed() => return, // listener dropped: connects now fail
                };
                let b = b2.clone();
                b.conns.fetch_add(1, Ordering::SeqCst);
                let mut k = kill_rx.clone();
                tokio::spawn(async move {
                    let svc = service_fn(move |req| {
                        let b = b.clone();
                        async move { b.serve(req).await }
                    });
                    let conn = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), svc)
                        .with_upgrades();
                    tokio::select! {
                        _ = conn => {}
                        _ = k.changed() => {} // killed: connection dropped mid-flight
                    }
                });
            }
        });
        b
    }

    pub fn kill(&self) {
        let _ = self.kill.send(true);
    }

    pub fn count(&self) -> usize {
        self.requests.load(Ordering::SeqCst)
    }

    async fn serve(
        self: Arc<Self>,
        mut req: Request<Incoming>,
    ) -> Result<Response<Full<Bytes>>, Infallible> {
        self.requests.fetch_add(1, Ordering::SeqCst);
        self.in_flight.fetch_add(1, Ordering::SeqCst);
        let path = req.uri().path().to_string();
        let query = req.uri().query().unwrap_or("").to_string();
        let mut delay = self.delay_ms.load(Ordering::SeqCst);
        if path == "/slow" {
            delay += query
                .strip_prefix("ms=")
                .and_then(|v| v.parse().ok())
                .unwrap_or(1000);
        }
        if path == "/ws" {
            // Echo upgrade: answer 101 (to whatever was asked, or nothing) and echo bytes on
            // the upgraded stream. A lenient backend: it upgrades even unasked.
            let asked = req
                .headers()
                .get("upgrade")
                .cloned()
                .unwrap_or(http::HeaderValue::from_static("echo"));
            self.upgrades.fetch_add(1, Ordering::SeqCst);
            let on = hyper::upgrade::on(&mut req);
            tokio::spawn(async move {
                if let Ok(up) = on.await {
                    let mut io = TokioIo::new(up);
                    let mut buf = [0u8; 1024];
                    while let Ok(n) = io.read(&mut buf).await {
                        if n == 0 || io.write_all(&buf[..n]).await.is_err() {
                            break;
                        }
                    }
                }
            });
            self.in_flight.fetch_sub(1, Ordering::SeqCst);
            let r = Response::builder()
                .status(101)
                .header("upgrade", asked)
                .header("connection", "upgrade")
                .body(Full::new(Bytes::new()))
                .unwrap();
            return Ok(r);
        }
        let headers = format!("{:?}", req.headers());
        *self.last.lock().unwrap() = format!("{} {}\n{headers}", req.method(), req.uri());
        // Consume the body chunk by chunk (counting, never buffering it whole).
        let mut body = req.into_body();
        let mut n = 0u64;
        while let Some(f) = body.frame().await {
            match f {
                Ok(f) => n += f.data_ref().map_or(0, |d| d.len() as u64),
                Err(_) => break,
            }
        }
        self.body_bytes.fetch_add(n, Ordering::SeqCst);
        if delay > 0 {
            tokio::time::sleep(Duration::from_millis(delay)).await;
        }
        self.in_flight.fetch_sub(1, Ordering::SeqCst);
        let status = StatusCode::from_u16(self.status.load(Ordering::SeqCst)).unwrap();
        let body = if path == "/headers" {
            headers
        } else {
            self.name.clone()
        };
        Ok(Response::builder()
            .status(status)
            .body(Full::new(Bytes::from(body)))
            .unwrap())
    }
}

pub fn service_config(backends: &[&Arc<Backend>], algo: &str) -> ServiceConfig {
    let mut cfg = ServiceConfig::quick(
        "test",
        "127.0.0.1:0".parse().unwrap(),
        algo.parse().unwrap(),
    );
    for b in backends {
        cfg.backends.push(shoal_proxy::config::BackendSpec {
            addr: b.addr,
            weight: 1,
        });
    }
    cfg
}

pub struct Proxy {
    pub app: Arc<App>,
    pub service: Arc<Service>,
    pub addr: SocketAddr,
}

pub async fn start_proxy(cfg: ServiceConfig) -> Proxy {
    let app = App::new(None, Some("secret".into()));
    let service = app.start_service(cfg).await.unwrap();
    let addr = app.listen_addr("test").unwrap();
    Proxy { app, service, addr }
}

pub type HttpClient = Client<hyper_util::client::legacy::connect::HttpConnector, Full<Bytes>>;

pub fn client() -> HttpClient {
    Client::builder(TokioExecutor::new()).build_http()
}

/// GET `path` through the proxy; returns (status, body).
pub async fn get(c: &HttpClient, addr: SocketAddr, path: &str) -> (u16, String) {
    get_with(c, addr, path, &[]).await
}

pub async fn get_with(
    c: &HttpClient,
    addr: SocketAddr,
    path: &str,
    headers: &[(&str, &str)],
) -> (u16, String) {
    let mut b = Request::get(format!("http://{addr}{path}"));
    for (k, v) in headers {
        b = b.header(*k, *v);
    }
    match c.request(b.body(Full::new(Bytes::new())).unwrap()).await {
        Ok(r) => {
            let s = r.status().as_u16();
            let body = r
                .into_body()
                .collect()
                .await
                .map(|b| b.to_bytes())
                .unwrap_or_default();
            (s, String::from_utf8_lossy(&body).into_owned())
        }
        Err(e) => (0, format!("client error: {e}")),
    }
}

/// Sends raw bytes on a fresh connection and returns everything read until close or 2 s.
pub async fn raw(addr: SocketAddr, bytes: &[u8]) -> String {
    let mut s = TcpStream::connect(addr).await.unwrap();
    let _ = s.write_all(bytes).await;
    let mut out = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(2), s.read_to_end(&mut out)).await;
    String::from_utf8_lossy(&out).into_owned()
}

/// Waits until `f` holds, polling; panics after `secs`.
pub async fn eventually(secs: u64, mut f: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(secs);
    while !f() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "condition not reached in {secs}s"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}
