//! Upstream HTTP/1.1 connections: one idle list per instance.
//!
//! A connection goes back to its instance's idle list only once the response body has been
//! read to the end (until then HTTP/1.1 cannot carry another request), so checkout is a pop
//! with no waiting and no per-request task. A request that an idle connection could not take
//! (closed by the instance meanwhile) comes back untouched and goes out on another one; only
//! bytes actually written make a failure a "reset".

use std::net::SocketAddr;
use std::sync::Mutex;
use std::time::Duration;

use http::{Request, Response};
use hyper::body::Incoming;
use hyper::client::conn::http1::{self, SendRequest};
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

use crate::pool::now_nanos;
use crate::proxy::UpstreamBody;

/// Most idle connections kept per instance; more are closed when returned.
const MAX_IDLE: usize = 512;

/// Idle keep-alive connections to one instance: hyper client connections for the general
/// path, plain sockets for the HTTP/1.1 fast path (`crate::h1`). Each remembers when it went
/// idle: past `timeouts.upstream_idle` it is closed rather than reused, because the instance
/// may be closing it at that very moment (its own keep-alive timeout).
#[derive(Debug, Default)]
pub struct Idle {
    conns: Mutex<Vec<(SendRequest<UpstreamBody>, u64)>>,
    raw: Mutex<Vec<(TcpStream, u64)>>,
}

impl Idle {
    /// A socket whose last response was read to the end and that went idle less than
    /// `max_idle` ago, if any. Older ones are closed.
    pub(crate) fn pop_raw(&self, max_idle: Duration) -> Option<TcpStream> {
        let since = now_nanos().saturating_sub(max_idle.as_nanos() as u64);
        let mut v = self.raw.lock().expect("idle lock");
        // The newest is at the end; the oldest expire first.
        let (s, at) = v.pop()?;
        if at < since {
            v.clear();
            return None;
        }
        Some(s)
    }

    pub(crate) fn put_raw(&self, s: TcpStream) {
        let mut v = self.raw.lock().expect("idle lock");
        if v.len() < MAX_IDLE {
            v.push((s, now_nanos()));
        }
    }

    fn pop(&self, max_idle: Duration) -> Option<SendRequest<UpstreamBody>> {
        let since = now_nanos().saturating_sub(max_idle.as_nanos() as u64);
        let mut v = self.conns.lock().expect("idle lock");
        let (c, at) = v.pop()?;
        if at < since {
            v.clear();
            return None;
        }
        Some(c)
    }

    /// Returns a connection whose previous response is complete.
    pub fn put(&self, c: SendRequest<UpstreamBody>) {
        if c.is_closed() {
            return;
        }
        let mut v = self.conns.lock().expect("idle lock");
        if v.len() < MAX_IDLE {
            v.push((c, now_nanos()));
        }
    }

    /// Closes connections idle for longer than `max_idle` (called periodically, so idle
    /// sockets do not linger on either side). Returns how many were closed.
    pub fn expire(&self, max_idle: Duration) -> usize {
        let since = now_nanos().saturating_sub(max_idle.as_nanos() as u64);
        let mut n = 0;
        {
            let mut v = self.raw.lock().expect("idle lock");
            let before = v.len();
            v.retain(|(_, at)| *at >= since);
            n += before - v.len();
        }
        let mut v = self.conns.lock().expect("idle lock");
        let before = v.len();
        v.retain(|(c, at)| *at >= since && !c.is_closed());
        n + before - v.len()
    }

    /// Idle connections kept right now (both kinds).
    pub fn len(&self) -> usize {
        self.raw.lock().expect("idle lock").len() + self.conns.lock().expect("idle lock").len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Closes every idle connection (instance removed).
    pub fn clear(&self) {
        self.conns.lock().expect("idle lock").clear();
        self.raw.lock().expect("idle lock").clear();
    }
}

/// Whether an idle upstream socket is still open with nothing pending: a real `MSG_PEEK`
/// (not cached readiness), so a FIN the runtime has not polled yet is seen too.
pub(crate) fn alive(s: &TcpStream) -> bool {
    let mut b = [std::mem::MaybeUninit::<u8>::uninit(); 1];
    matches!(socket2::SockRef::from(s).peek(&mut b), Err(e) if e.kind() == std::io::ErrorKind::WouldBlock)
}

/// Why a try failed.
#[derive(Debug)]
pub enum SendError {
    /// Nothing was sent: connecting failed or timed out.
    Connect(std::io::Error),
    /// The request may have been (partly) sent; the instance did not answer.
    Reset(hyper::Error),
}

impl std::fmt::Display for SendError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            SendError::Connect(e) => write!(f, "connect: {e}"),
            SendError::Reset(e) => write!(f, "{e}"),
        }
    }
}

/// A new TCP connection to `addr`, with Nagle off.
pub(crate) async fn connect_tcp(addr: SocketAddr, timeout: Duration) -> std::io::Result<TcpStream> {
    let stream = match tokio::time::timeout(timeout, TcpStream::connect(addr)).await {
        Ok(r) => r?,
        Err(_) => {
            return Err(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                "connect timed out",
            ))
        }
    };
    let _ = stream.set_nodelay(true);
    Ok(stream)
}

async fn connect(
    addr: SocketAddr,
    timeout: Duration,
    tls: Option<&crate::tls::UpstreamTls>,
) -> Result<SendRequest<UpstreamBody>, SendError> {
    let stream = connect_tcp(addr, timeout)
        .await
        .map_err(SendError::Connect)?;
    let Some(tls) = tls else {
        return handshake(stream).await;
    };
    // The TLS handshake counts as connecting (its own timeout, and nothing was sent yet).
    match tokio::time::timeout(timeout, tls.connect(addr, stream)).await {
        Ok(Ok(s)) => handshake(s).await,
        Ok(Err(e)) => Err(SendError::Connect(e)),
        Err(_) => Err(SendError::Connect(std::io::Error::new(
            std::io::ErrorKind::TimedOut,
            "tls handshake timed out",
        ))),
    }
}

/// An HTTP/1.1 client connection over `io`, driven by its own task.
async fn handshake<IO>(io: IO) -> Result<SendRequest<UpstreamBody>, SendError>
where
    IO: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let (send, conn) = http1::Builder::new()
        .handshake(TokioIo::new(io))
        .await
        .map_err(|e| SendError::Connect(std::io::Error::other(e)))?;
    tokio::spawn(async move {
        if let Err(e) = conn.with_upgrades().await {
            tracing::debug!(error = %e, "upstream connection ended with an error");
        }
    });
    Ok(send)
}

/// Sends `req` on an idle connection to `addr` or a new one. On success the connection is
/// handed back with the response; put it in `idle` once the body has been read.
pub async fn send(
    idle: &Idle,
    addr: SocketAddr,
    connect_timeout: Duration,
    max_idle: Duration,
    tls: Option<&crate::tls::UpstreamTls>,
    mut req: Request<UpstreamBody>,
) -> Result<(Response<Incoming>, SendRequest<UpstreamBody>), SendError> {
    while let Some(mut c) = idle.pop(max_idle) {
        // Only a connection that can take a request right now: one still finishing an
        // earlier exchange (e.g. an early response while the request body was uploading)
        // could stall this request for its whole timeout. It is closed instead.
        let ready = std::future::poll_fn(|cx| std::task::Poll::Ready(c.poll_ready(cx))).await;
        if !matches!(ready, std::task::Poll::Ready(Ok(()))) {
            continue;
        }
        match c.try_send_request(req).await {
            Ok(resp) => return Ok((resp, c)),
            Err(mut e) => match e.take_message() {
                // Not written: the connection was gone; try the next one.
                Some(r) => req = r,
                None => return Err(SendError::Reset(e.into_error())),
            },
        }
    }
    let mut c = connect(addr, connect_timeout, tls).await?;
    match c.send_request(req).await {
        Ok(resp) => Ok((resp, c)),
        Err(e) => Err(SendError::Reset(e)),
    }
}
