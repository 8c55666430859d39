//! Listeners: accept loop, connection limits, HTTP/1.1 + h2c serving, idle timeout, and
//! graceful shutdown (stop accepting, let in-flight requests finish).

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use std::sync::Mutex;
use tokio::net::TcpListener;
use tokio::sync::{watch, Notify, OwnedSemaphorePermit, Semaphore};

use crate::pool::now_nanos;
use crate::proxy::Service;

/// Resolves once `rx` reads true or its sender is gone.
pub async fn stopped(rx: &mut watch::Receiver<bool>) {
    while !*rx.borrow_and_update() {
        if rx.changed().await.is_err() {
            return;
        }
    }
}

/// Tracks live connections so shutdown can wait for them.
#[derive(Debug, Default)]
pub struct Connections {
    live: AtomicUsize,
    gone: Notify,
    pub accepted: AtomicU64,
}

impl Connections {
    pub fn live(&self) -> usize {
        self.live.load(Ordering::Acquire)
    }

    /// Waits until no connection is left or `timeout` passes; returns how many are left.
    pub async fn wait_idle(&self, timeout: Duration) -> usize {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let notified = self.gone.notified();
            if self.live() == 0 {
                return 0;
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                return self.live();
            }
        }
    }
}

/// One request in progress on a client connection, for the idle timeout. A guard, so an
/// HTTP/2 stream reset (which drops the handler future) is counted too.
pub(crate) struct Busy(Arc<(AtomicU64, AtomicUsize)>);

impl Busy {
    pub(crate) fn new(a: Arc<(AtomicU64, AtomicUsize)>) -> Self {
        a.1.fetch_add(1, Ordering::Relaxed);
        Busy(a)
    }
}

impl Drop for Busy {
    fn drop(&mut self) {
        self.0 .0.store(now_nanos(), Ordering::Relaxed);
        self.0 .1.fetch_sub(1, Ordering::Relaxed);
    }
}

struct ConnGuard(Arc<Connections>);

/// What a client connection holds: its max_connections permit and its place in the live
/// count. An upgrade moves it into the tunnel task, which outlives the HTTP connection.
pub struct ConnSlot(Mutex<Option<(OwnedSemaphorePermit, ConnGuard)>>);

/// The slot's contents, held by whoever owns the connection's bytes now.
pub struct ConnHold(#[allow(dead_code)] (OwnedSemaphorePermit, ConnGuard));

impl ConnSlot {
    pub fn take(&self) -> Option<ConnHold> {
        self.0.lock().expect("slot lock").take().map(ConnHold)
    }
}

impl Drop for ConnGuard {
    fn drop(&mut self) {
        self.0.live.fetch_sub(1, Ordering::AcqRel);
        self.0.gone.notify_waiters();
    }
}

/// A running listener for one service. Dropping the `stop` sender (or sending true) stops it.
pub struct Listener {
    pub addr: SocketAddr,
    pub stop: watch::Sender<bool>,
    pub conns: Arc<Connections>,
}

/// Binds `addr` and serves `service` until `stop` flips to true; then closes idle keep-alive
/// connections and lets busy ones finish their current request.
pub async fn bind(addr: SocketAddr, service: Arc<Service>) -> std::io::Result<Listener> {
    let listener = TcpListener::bind(addr).await?;
    let addr = listener.local_addr()?;
    let (stop, stop_rx) = watch::channel(false);
    let conns = Arc::new(Connections::default());
    tokio::spawn(accept_loop(
        listener,
        addr.port(),
        service,
        stop_rx,
        conns.clone(),
    ));
    Ok(Listener { addr, stop, conns })
}

async fn accept_loop(
    listener: TcpListener,
    port: u16,
    service: Arc<Service>,
    mut stop: watch::Receiver<bool>,
    conns: Arc<Connections>,
) {
    let limit = service.config.load().limits.max_connections;
    let permits = Arc::new(Semaphore::new(limit));
    loop {
        // Past max_connections, stop accepting: the kernel backlog queues new clients (as HAProxy's maxconn does).
        let permit = tokio::select! {
            p = permits.clone().acquire_owned() => p.expect("semaphore never closed"),
            _ = crate::server::stopped(&mut stop) => break,
        };
        let (stream, peer) = tokio::select! {
            r = listener.accept() => match r {
                Ok(x) => x,
                Err(e) => {
                    // EMFILE and friends: back off instead of spinning.
                    tracing::warn!(service = %service.name, error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = crate::server::stopped(&mut stop) => break,
        };
        let _ = stream.set_nodelay(true);
        conns.live.fetch_add(1, Ordering::AcqRel);
        conns.accepted.fetch_add(1, Ordering::Relaxed);
        let guard = ConnGuard(conns.clone());
        let svc = service.clone();
        let stop = stop.clone();
        tokio::spawn(async move {
            // An upgraded connection outlives this task (its tunnel takes the slot): it keeps
            // counting against max_connections and shutdown still waits for it.
            let slot = Arc::new(ConnSlot(Mutex::new(Some((permit, guard)))));
            let Some(tls) = svc.tls.load_full() else {
                serve_conn(stream, peer, port, svc, stop, slot, None).await;
                return;
            };
            // Boxed: a plain connection's task is then not the size of a TLS one.
            Box::pin(async move {
                // The handshake has the header-read timeout (a client that stalls in it is
                // a slowloris too).
                let timeout = svc.config.load().timeouts.header_read.0;
                let Some((stream, session)) = tls.accept(stream, timeout).await else {
                    return;
                };
                drop(tls);
                serve_conn(stream, peer, port, svc, stop, slot, Some(session)).await;
            })
            .await;
        });
    }
    tracing::info!(service = %service.name, "listener stopped");
}

/// Serves one client connection over any byte stream (TCP, or TLS over TCP).
async fn serve_conn<S: crate::h1::ClientIo>(
    mut stream: S,
    peer: SocketAddr,
    port: u16,
    svc: Arc<Service>,
    mut stop: watch::Receiver<bool>,
    slot: Arc<ConnSlot>,
    tls: Option<crate::tls::Session>,
) {
    let peer_ip = crate::proxy::peer_header(peer);
    // Plain HTTP/1.1 keep-alive traffic stays on the fast path; the first request it cannot
    // take moves the connection, with the bytes read so far, to hyper for good. HTTP/2
    // chosen by ALPN goes to hyper at once.
    let h2 = tls.as_ref().is_some_and(|s| s.h2);
    let pre = if h2 {
        bytes::BytesMut::new()
    } else {
        let conn = crate::h1::Conn::new(&mut stream, &svc, peer, peer_ip.as_bytes(), port)
            .with_tls(tls.as_ref());
        match conn.serve(&mut stop).await {
            crate::h1::End::Closed => return,
            crate::h1::End::Handover(pre) => pre,
        }
    };
    // Boxed: hyper's connection state is allocated only for connections handed over, not
    // carried (unused) by every fast-path connection's task.
    Box::pin(serve_hyper(
        stream, pre, h2, peer, peer_ip, port, svc, stop, slot, tls,
    ))
    .await;
}

/// The general path for one connection: hyper, from the bytes the fast path read.
#[allow(clippy::too_many_arguments)]
async fn serve_hyper<S: crate::h1::ClientIo>(
    stream: S,
    pre: bytes::BytesMut,
    h2: bool,
    peer: SocketAddr,
    peer_ip: http::HeaderValue,
    port: u16,
    svc: Arc<Service>,
    stop: watch::Receiver<bool>,
    slot: Arc<ConnSlot>,
    tls: Option<crate::tls::Session>,
) {
    let cfg = svc.config.load_full();
    let stream = crate::h1::Rewind::new(pre, stream, cfg.timeouts.client_write.0);
    let mut builder = auto::Builder::new(TokioExecutor::new());
    if h2 {
        // ALPN said h2: HTTP/1.x bytes on this connection would skip the fast path's raw
        // reading of every head (where all of hygiene sees it), so they are refused.
        builder = builder.http2_only();
    }
    // One HTTP/1.x request per handed-over connection: every request head on a connection
    // is then read raw by the fast path first, where all of hygiene sees it (hyper drops a
    // Content-Length that comes with Transfer-Encoding before anyone can refuse it).
    builder
        .http1()
        .timer(TokioTimer::new())
        .keep_alive(false)
        .header_read_timeout(cfg.timeouts.header_read.0)
        .max_headers(cfg.limits.max_headers)
        .max_buf_size(cfg.limits.max_head_bytes());
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_concurrent_streams(cfg.limits.max_h2_streams)
        .max_header_list_size(cfg.limits.max_header_bytes as u32);
    let idle = cfg.timeouts.idle.0;
    // Last activity and requests in flight on this connection, for the idle timeout.
    let activity = Arc::new((AtomicU64::new(now_nanos()), AtomicUsize::new(0)));
    let act = activity.clone();
    let service = service_fn(move |mut req: hyper::Request<hyper::body::Incoming>| {
        let svc = svc.clone();
        let busy = Busy::new(act.clone());
        if req.headers().contains_key(hyper::header::UPGRADE) {
            req.extensions_mut().insert(slot.clone());
        }
        if let Some(s) = &tls {
            req.extensions_mut().insert(s.clone());
        }
        let peer_ip = peer_ip.clone();
        async move {
            let r = svc.handle(req, peer, peer_ip, port).await;
            drop(busy);
            r
        }
    });
    let conn = builder.serve_connection_with_upgrades(TokioIo::new(stream), service);
    drive(conn, |c| c.graceful_shutdown(), stop, activity, idle, peer).await;
}

/// Runs an HTTP connection to its end: shut down gracefully when `stop` flips, or once no
/// request has been in flight for `idle` (`activity`: last request start or end, and the
/// requests in flight).
pub(crate) async fn drive<C, E>(
    conn: C,
    shutdown: impl Fn(std::pin::Pin<&mut C>),
    mut stop: watch::Receiver<bool>,
    activity: Arc<(AtomicU64, AtomicUsize)>,
    idle: Duration,
    peer: SocketAddr,
) where
    C: std::future::Future<Output = Result<(), E>>,
    E: std::fmt::Display,
{
    tokio::pin!(conn);
    let mut shutting_down = false;
    loop {
        let idle_check = tokio::time::sleep(
            idle.min(Duration::from_secs(5))
                .max(Duration::from_millis(100)),
        );
        tokio::select! {
            biased;
            r = conn.as_mut() => {
                if let Err(e) = r {
                    tracing::debug!(%peer, error = %e, "connection ended with error");
                }
                return;
            }
            _ = crate::server::stopped(&mut stop), if !shutting_down => {
                shutting_down = true;
                shutdown(conn.as_mut());
            }
            _ = idle_check, if !shutting_down => {
                let last = activity.0.load(Ordering::Relaxed);
                let busy = activity.1.load(Ordering::Relaxed) > 0;
                if !busy && now_nanos().saturating_sub(last) >= idle.as_nanos() as u64 {
                    shutting_down = true;
                    shutdown(conn.as_mut());
                }
            }
        }
    }
}
