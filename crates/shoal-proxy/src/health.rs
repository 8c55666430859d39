//! Active health checks and the pool's time-driven upkeep (ejection expiry, slow start).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Request, StatusCode};
use http_body_util::Empty;
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;
use tokio::sync::watch;

use crate::pool::State;
use crate::proxy::Service;

/// One HTTP/1.1 GET on a fresh connection; true on a 2xx/3xx answer within `timeout`.
pub async fn probe(addr: SocketAddr, path: &str, timeout: Duration) -> bool {
    probe_with(addr, path, timeout, None).await
}

/// [`probe`] over TLS when the service speaks TLS to its instances.
pub async fn probe_with(
    addr: SocketAddr,
    path: &str,
    timeout: Duration,
    tls: Option<&crate::tls::UpstreamTls>,
) -> bool {
    let fut = async {
        let stream = TcpStream::connect(addr).await.ok()?;
        let _ = stream.set_nodelay(true);
        let mut send = match tls {
            None => client(stream).await?,
            Some(t) => client(t.connect(addr, stream).await.ok()?).await?,
        };
        let req = Request::get(path)
            .header(http::header::HOST, addr.to_string())
            .header(http::header::USER_AGENT, "shoal-health")
            .header(http::header::CONNECTION, "close")
            .body(Empty::new())
            .ok()?;
        let resp = send.send_request(req).await.ok()?;
        Some(resp.status())
    };
    matches!(tokio::time::timeout(timeout, fut).await, Ok(Some(s)) if passes(s))
}

/// An HTTP probe's answer that counts as healthy: 2xx, 3xx (304 included).
fn passes(s: StatusCode) -> bool {
    s.is_success() || s.is_redirection()
}

/// `grpc.health.v1.Health/Check` for `service` on a fresh HTTP/2 connection (TLS when the
/// cluster speaks h2 or auto over TLS); true only for SERVING with `grpc-status` 0 within
/// `timeout`.
pub async fn grpc_probe(
    addr: SocketAddr,
    service: &str,
    timeout: Duration,
    tls: Option<&crate::tls::UpstreamTls>,
    protocol: crate::config::Protocol,
) -> bool {
    use http_body_util::BodyExt;
    let fut = async {
        let (mut send, scheme) = connect_h2(addr, tls, protocol).await?;
        let req = Request::post(format!("{scheme}://{addr}/grpc.health.v1.Health/Check"))
            .version(http::Version::HTTP_2)
            .header(http::header::CONTENT_TYPE, "application/grpc")
            .header(http::header::TE, "trailers")
            .header(http::header::USER_AGENT, "shoal-health")
            .body(http_body_util::Full::new(crate::grpc::health_request(
                service,
            )))
            .ok()?;
        let resp = send.send_request(req).await.ok()?;
        if resp.status() != StatusCode::OK {
            return None;
        }
        let header_status = crate::grpc::header_status(resp.headers());
        let body = resp.into_body().collect().await.ok()?;
        let status = header_status.or_else(|| crate::grpc::header_status(body.trailers()?))?;
        (status == crate::grpc::OK).then(|| crate::grpc::health_status(&body.to_bytes()))?
    };
    matches!(tokio::time::timeout(timeout, fut).await, Ok(Some(1)))
}

/// A GET of `path` over HTTP/2 (the cluster's h2c or h2): true on a 2xx/3xx within
/// `timeout`. HTTP/2-only instances do not answer an HTTP/1.1 probe.
pub async fn http2_probe(
    addr: SocketAddr,
    path: &str,
    timeout: Duration,
    tls: Option<&crate::tls::UpstreamTls>,
    protocol: crate::config::Protocol,
) -> bool {
    let fut = async {
        let (mut send, scheme) = connect_h2(addr, tls, protocol).await?;
        let req = Request::get(format!("{scheme}://{addr}{path}"))
            .version(http::Version::HTTP_2)
            .header(http::header::USER_AGENT, "shoal-health")
            .body(http_body_util::Full::new(Bytes::new()))
            .ok()?;
        Some(send.send_request(req).await.ok()?.status())
    };
    matches!(tokio::time::timeout(timeout, fut).await, Ok(Some(s)) if passes(s))
}

/// A fresh HTTP/2 connection for a probe (TLS unless the cluster is h2c), and the scheme.
async fn connect_h2(
    addr: SocketAddr,
    tls: Option<&crate::tls::UpstreamTls>,
    protocol: crate::config::Protocol,
) -> Option<(
    hyper::client::conn::http2::SendRequest<http_body_util::Full<Bytes>>,
    &'static str,
)> {
    let stream = TcpStream::connect(addr).await.ok()?;
    let _ = stream.set_nodelay(true);
    match tls.filter(|_| protocol != crate::config::Protocol::H2c) {
        None => Some((client_h2(stream).await?, "http")),
        Some(t) => {
            let s = t
                .connect_for(addr, stream, crate::config::Protocol::H2)
                .await
                .ok()?;
            Some((client_h2(s).await?, "https"))
        }
    }
}

/// An HTTP/2 client connection for one probe, driven by its own task.
async fn client_h2<IO>(
    io: IO,
) -> Option<hyper::client::conn::http2::SendRequest<http_body_util::Full<Bytes>>>
where
    IO: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let (send, conn) = hyper::client::conn::http2::handshake(
        hyper_util::rt::TokioExecutor::new(),
        TokioIo::new(io),
    )
    .await
    .ok()?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    Some(send)
}

/// How an instance of a service is asked whether it is up: its health `kind` (HTTP path, or
/// gRPC health for a service name) in the protocol its cluster speaks.
#[derive(Debug, Clone, Default)]
pub struct ProbeSpec {
    /// `Some(service)`: `grpc.health.v1.Health/Check` for that service name.
    pub grpc: Option<String>,
    pub protocol: crate::config::Protocol,
    pub tls: Option<Arc<crate::tls::UpstreamTls>>,
}

impl ProbeSpec {
    /// From a service's config (its `health` table, protocol and upstream TLS).
    pub fn of(cfg: &crate::config::ServiceConfig) -> ProbeSpec {
        ProbeSpec {
            grpc: cfg
                .health
                .as_ref()
                .filter(|h| h.kind == crate::config::HealthKind::Grpc)
                .map(|h| h.grpc_service.clone()),
            protocol: cfg.protocol,
            tls: cfg.upstream_tls.clone(),
        }
    }

    /// One probe of `addr`: gRPC health, or GET `path` over HTTP/2 or HTTP/1.1.
    pub async fn probe(&self, addr: SocketAddr, path: &str, timeout: Duration) -> bool {
        let h2 = self.protocol.speaks_h2(self.tls.is_some());
        match &self.grpc {
            Some(service) => {
                grpc_probe(addr, service, timeout, self.tls.as_deref(), self.protocol).await
            }
            None if h2 => {
                http2_probe(addr, path, timeout, self.tls.as_deref(), self.protocol).await
            }
            None => probe_with(addr, path, timeout, self.tls.as_deref()).await,
        }
    }
}

/// An HTTP/1.1 client connection for one probe, driven by its own task.
async fn client<IO>(io: IO) -> Option<hyper::client::conn::http1::SendRequest<Empty<Bytes>>>
where
    IO: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let (send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(io))
        .await
        .ok()?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    Some(send)
}

/// Runs until `stop` flips: probes every instance each `interval` (when health checks are
/// configured) and ticks the pool so ejections expire and slow-start weights ramp.
pub async fn run(service: Arc<Service>, mut stop: watch::Receiver<bool>) {
    let mut last_probe = tokio::time::Instant::now() - Duration::from_secs(3600);
    loop {
        let cfg = service.config.load_full();
        let tick = tokio::time::sleep(Duration::from_millis(200));
        tokio::select! {
            _ = tick => {}
            _ = crate::server::stopped(&mut stop) => return,
        }
        service.pool.tick();
        for inst in service.pool.members() {
            inst.idle.expire(cfg.timeouts.upstream_idle.0);
        }
        let Some(h) = cfg.health.clone() else {
            continue;
        };
        if last_probe.elapsed() < h.interval.0 {
            continue;
        }
        last_probe = tokio::time::Instant::now();
        for inst in service.pool.members() {
            if inst.state() == State::Draining {
                continue;
            }
            let pool = service.pool.clone();
            let path = h.path.clone();
            let timeout = h.timeout.0;
            let spec = ProbeSpec::of(&cfg);
            tokio::spawn(async move {
                let ok = spec.probe(inst.addr, &path, timeout).await;
                pool.record_probe(&inst, ok);
            });
        }
    }
}
