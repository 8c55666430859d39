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

use crate::proxy::UpstreamBody;

/// Most idle connections kept per instance; more are closed when returned.
const MAX_IDLE: usize = 512;

/// Idle keep-alive connections to one instance: hyper client connections for the general
/// path, plain sockets for the HTTP/1.1 fast path (`crate::h1`).
#[derive(Debug, Default)]
pub struct Idle {
    conns: Mutex<Vec<SendRequest<UpstreamBody>>>,
    raw: Mutex<Vec<TcpStream>>,
}

impl Idle {
    /// A socket whose last response was read to the end, if any.
    pub(crate) fn pop_raw(&self) -> Option<TcpStream> {
        self.raw.lock().expect("idle lock").pop()
    }

    pub(crate) fn put_raw(&self, s: TcpStream) {
        let mut v = self.raw.lock().expect("idle lock");
        if v.len() < MAX_IDLE {
            v.push(s);
        }
    }

    fn pop(&self) -> Option<SendRequest<UpstreamBody>> {
        self.conns.lock().expect("idle lock").pop()
    }

    /// Returns a connection whose previous response is complete.
    pub fn put(&self, c: SendRequest<UpstreamBody>) {
        if c.is_closed() {
            return;
        }
        let mut v = self.conns.lock().expect("idle lock");
        if v.len() < MAX_IDLE {
            v.push(c);
        }
    }

    /// Closes every idle connection (instance removed).
    pub fn clear(&self) {
        self.conns.lock().expect("idle lock").clear();
        self.raw.lock().expect("idle lock").clear();
    }
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
) -> Result<SendRequest<UpstreamBody>, SendError> {
    let stream = connect_tcp(addr, timeout)
        .await
        .map_err(SendError::Connect)?;
    let (send, conn) = http1::Builder::new()
        .handshake(TokioIo::new(stream))
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
    mut req: Request<UpstreamBody>,
) -> Result<(Response<Incoming>, SendRequest<UpstreamBody>), SendError> {
    while let Some(mut c) = idle.pop() {
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
    let mut c = connect(addr, connect_timeout).await?;
    match c.send_request(req).await {
        Ok(resp) => Ok((resp, c)),
        Err(e) => Err(SendError::Reset(e)),
    }
}
