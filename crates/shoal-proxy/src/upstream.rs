//! Upstream connections per instance: HTTP/1.1 idle lists and multiplexed HTTP/2.
//!
//! An HTTP/1.1 connection goes back to its instance's idle list only once the response body
//! has been read to the end (until then HTTP/1.1 cannot carry another request), so checkout
//! is a pop with no waiting and no per-request task. A request that an idle connection could
//! not take (closed by the instance meanwhile) comes back untouched and goes out on another
//! one; only bytes actually written make a failure a "reset".
//!
//! HTTP/2 connections (`protocol = "h2c" | "h2" | "auto"`) are shared: a request takes a
//! stream on the first live connection with a stream free under the instance's
//! `SETTINGS_MAX_CONCURRENT_STREAMS`, else a
//! new connection is opened — requests never queue behind a full connection (one connect at
//! a time per instance: a burst shares the first new connection). A connection
//! that got GOAWAY takes no new streams while its streams in flight finish; PINGs find dead
//! ones. The stream is counted until the response body ends (a lease).

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use http::{Request, Response};
use hyper::body::Incoming;
use hyper::client::conn::http1::{self, SendRequest};
use hyper::client::conn::http2;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;

use crate::config::Protocol;

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
    /// HTTP/2 connections, shared by concurrent requests.
    h2: Mutex<Vec<H2Conn>>,
    /// One HTTP/2 connect at a time per instance: a burst finding no connection waits for
    /// the first one and shares it, rather than opening one each.
    h2_connecting: tokio::sync::Mutex<()>,
}

/// One multiplexed HTTP/2 connection to an instance.
#[derive(Debug, Clone)]
struct H2Conn {
    send: http2::SendRequest<UpstreamBody>,
    /// Streams of ours open on it.
    streams: Arc<AtomicUsize>,
    /// When a stream was last taken (`now_nanos`): stream-free connections close once idle
    /// past `upstream_idle`.
    used: Arc<std::sync::atomic::AtomicU64>,
    /// The instance's `SETTINGS_MAX_CONCURRENT_STREAMS` (100 until it says).
    max: Arc<AtomicUsize>,
}

/// The most streams used on one connection when the instance sets no limit.
const H2_MAX_STREAMS: usize = 1000;
/// PING interval on HTTP/2 connections with streams open.
const H2_PING: Duration = Duration::from_secs(300);

/// A stream taken on an HTTP/2 connection, released when the response ends.
#[derive(Debug)]
pub struct H2Lease(Arc<AtomicUsize>);

impl Drop for H2Lease {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

/// What a response holds of its upstream connection until its body ends.
#[derive(Debug)]
pub enum Conn {
    /// Back to the idle list once the body was read whole.
    H1(SendRequest<UpstreamBody>),
    H2(H2Lease),
}

impl Idle {
    /// A socket whose last response was read to the end and that went idle less than
    /// `max_idle` ago, if any, with how long it has been idle. Older ones are closed.
    pub(crate) fn pop_raw(&self, max_idle: Duration) -> Option<(TcpStream, Duration)> {
        let now = now_nanos();
        let since = now.saturating_sub(max_idle.as_nanos() as u64);
        let mut v = self.raw.lock().expect("idle lock");
        // The newest is at the end; the oldest expire first.
        let (s, at) = v.pop()?;
        if at < since {
            v.clear();
            return None;
        }
        Some((s, Duration::from_nanos(now.saturating_sub(at))))
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
        {
            let mut v = self.h2.lock().expect("idle lock");
            let before = v.len();
            v.retain(|c| {
                !c.send.is_closed()
                    && (c.streams.load(Ordering::Acquire) > 0
                        || c.used.load(Ordering::Relaxed) >= since)
            });
            n += before - v.len();
        }
        let mut v = self.conns.lock().expect("idle lock");
        let before = v.len();
        v.retain(|(c, at)| *at >= since && !c.is_closed());
        n + before - v.len()
    }

    /// Idle connections kept right now (HTTP/1.1 of both kinds, and HTTP/2 ones with no
    /// stream open).
    pub fn len(&self) -> usize {
        self.raw.lock().expect("idle lock").len()
            + self.conns.lock().expect("idle lock").len()
            + self
                .h2
                .lock()
                .expect("idle lock")
                .iter()
                .filter(|c| c.streams.load(Ordering::Acquire) == 0)
                .count()
    }

    /// Open HTTP/2 connections to the instance.
    pub fn h2_connections(&self) -> usize {
        let mut v = self.h2.lock().expect("idle lock");
        v.retain(|c| !c.send.is_closed());
        v.len()
    }

    /// A stream on a live HTTP/2 connection with one free, if any.
    fn h2_checkout(&self) -> Option<(http2::SendRequest<UpstreamBody>, H2Lease)> {
        let mut v = self.h2.lock().expect("idle lock");
        v.retain(|c| !c.send.is_closed());
        for c in v.iter() {
            if !c.send.is_ready() {
                continue;
            }
            let max = c.max.load(Ordering::Acquire);
            let taken = c
                .streams
                .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                    (n < max).then_some(n + 1)
                })
                .is_ok();
            if taken {
                c.used.store(now_nanos(), Ordering::Relaxed);
                return Some((c.send.clone(), H2Lease(c.streams.clone())));
            }
        }
        None
    }

    fn h2_add(&self, c: H2Conn) -> (http2::SendRequest<UpstreamBody>, H2Lease) {
        c.streams.fetch_add(1, Ordering::AcqRel);
        let lease = (c.send.clone(), H2Lease(c.streams.clone()));
        self.h2.lock().expect("idle lock").push(c);
        lease
    }

    /// Takes a connection that refused a stream out of the pool (GOAWAY, closing): its
    /// streams in flight go on, new ones go elsewhere.
    fn h2_forget(&self, lease: &H2Lease) {
        let mut v = self.h2.lock().expect("idle lock");
        v.retain(|c| !Arc::ptr_eq(&c.streams, &lease.0));
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Closes every idle connection (instance removed). HTTP/2 connections close once
    /// their streams in flight end (their last handle goes with the last response).
    pub fn clear(&self) {
        self.conns.lock().expect("idle lock").clear();
        self.raw.lock().expect("idle lock").clear();
        self.h2.lock().expect("idle lock").clear();
    }
}

/// Whether an idle upstream socket is still open with nothing pending: a real `MSG_PEEK`
/// (not cached readiness), so a FIN the runtime has not polled yet is seen too.
pub(crate) fn alive(s: &TcpStream) -> bool {
    let mut b = [std::mem::MaybeUninit::<u8>::uninit(); 1];
    matches!(socket2::SockRef::from(s).peek(&mut b), Err(e) if e.kind() == std::io::ErrorKind::WouldBlock)
}

/// Idle for less than this, a pooled socket may be judged by the runtime's readiness alone.
/// Instances close idle keep-alive connections after seconds (gunicorn 2 s, Node and
/// Apache 5 s), not within one; a FIN that came before the event loop last polled shows
/// as readiness, so only one that lands within the current turn goes unseen. (With
/// `upstream_idle` at a second or less, no pooled socket gets the real peek.)
const TRUST_READINESS: Duration = Duration::from_secs(1);

/// [`alive`] for a socket idle for `idle`: for an idempotent request (retried once on a
/// fresh connection if a reused one turns out closed) a recently pooled socket costs no
/// syscall unless the runtime saw it become readable (closed, or stray bytes); any other
/// request gets the real peek, as it could not be sent again.
pub(crate) fn reusable(s: &TcpStream, idle: Duration, idempotent: bool) -> bool {
    if idle >= TRUST_READINESS || !idempotent {
        return alive(s);
    }
    // None: no readiness, or a peek that found nothing (readiness cleared).
    crate::h1::peek_now(s).is_none()
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

/// Where and how to reach one instance.
pub struct Target<'a> {
    pub idle: &'a Idle,
    pub addr: SocketAddr,
    pub connect_timeout: Duration,
    pub max_idle: Duration,
    pub tls: Option<&'a crate::tls::UpstreamTls>,
    pub protocol: Protocol,
}

/// Prepares a request for an HTTP/2 instance: absolute URI (`:scheme`, `:authority` from
/// `Host`, else the instance's address), no `Host`, version 2.
pub fn to_h2(req: &mut Request<UpstreamBody>, https: bool, fallback: &http::uri::Authority) {
    let host = req.headers_mut().remove(http::header::HOST);
    let authority = host
        .and_then(|h| h.to_str().ok()?.parse::<http::uri::Authority>().ok())
        .unwrap_or_else(|| fallback.clone());
    let pq = req
        .uri()
        .path_and_query()
        .cloned()
        .unwrap_or_else(|| http::uri::PathAndQuery::from_static("/"));
    if let Ok(uri) = http::Uri::builder()
        .scheme(if https { "https" } else { "http" })
        .authority(authority)
        .path_and_query(pq)
        .build()
    {
        *req.uri_mut() = uri;
    }
    *req.version_mut() = http::Version::HTTP_2;
}

/// The reverse of [`to_h2`], for an `auto` cluster whose instance chose HTTP/1.1.
fn to_h1(req: &mut Request<UpstreamBody>) {
    if req.version() != http::Version::HTTP_2 {
        return;
    }
    if let Some(a) = req.uri().authority().cloned() {
        if let Ok(v) = http::HeaderValue::from_str(a.as_str()) {
            req.headers_mut().insert(http::header::HOST, v);
        }
    }
    if let Some(pq) = req.uri().path_and_query().cloned() {
        *req.uri_mut() = http::Uri::from(pq);
    }
    req.headers_mut().remove(http::header::TE);
    *req.version_mut() = http::Version::HTTP_11;
}

/// Sends `req` to the instance in the protocol of its cluster. On success the response
/// comes with its hold on the connection ([`Conn`]), kept until its body ends.
pub async fn send(
    t: Target<'_>,
    req: Request<UpstreamBody>,
) -> Result<(Response<Incoming>, Conn), SendError> {
    match (t.protocol, t.tls) {
        (Protocol::Http1, _) | (Protocol::Auto, None) => {
            send_h1(t.idle, t.addr, t.connect_timeout, t.max_idle, t.tls, req)
                .await
                .map(|(r, c)| (r, Conn::H1(c)))
        }
        // `auto` over TLS: a connection of whichever protocol the instance chose before.
        (Protocol::Auto, Some(_))
            if t.idle.h2_connections() == 0
                && !t.idle.conns.lock().expect("idle lock").is_empty() =>
        {
            let mut req = req;
            to_h1(&mut req);
            send_h1(t.idle, t.addr, t.connect_timeout, t.max_idle, t.tls, req)
                .await
                .map(|(r, c)| (r, Conn::H1(c)))
        }
        _ => send_h2(t, req).await,
    }
}

/// An HTTP/2 request on a shared connection: a stream on a live one with room, else a new
/// connection. A stream refused before anything was sent (the connection got GOAWAY or
/// closed) goes to another connection.
async fn send_h2(
    t: Target<'_>,
    req: Request<UpstreamBody>,
) -> Result<(Response<Incoming>, Conn), SendError> {
    let mut req = req;
    for _ in 0..3 {
        let (mut send, lease) = match t.idle.h2_checkout() {
            Some(c) => c,
            None => {
                let _one = t.idle.h2_connecting.lock().await;
                // Another request may have connected while this one waited.
                match t.idle.h2_checkout() {
                    Some(c) => c,
                    None => match connect_h2(&t).await? {
                        Connected::H2(c) => t.idle.h2_add(c),
                        // `auto`: the instance chose HTTP/1.1.
                        Connected::H1(mut c) => {
                            drop(_one);
                            to_h1(&mut req);
                            return match c.send_request(req).await {
                                Ok(resp) => Ok((resp, Conn::H1(c))),
                                Err(e) => Err(SendError::Reset(e)),
                            };
                        }
                    },
                }
            }
        };
        match send.try_send_request(req).await {
            Ok(resp) => return Ok((resp, Conn::H2(lease))),
            Err(mut e) => match e.take_message() {
                // Not sent: the connection takes no new streams (GOAWAY, closing); another.
                Some(r) => {
                    t.idle.h2_forget(&lease);
                    req = r;
                }
                // One stream failed; the connection may be fine (it leaves the pool when
                // it closes).
                None => return Err(SendError::Reset(e.into_error())),
            },
        }
    }
    Err(SendError::Connect(std::io::Error::other(
        "HTTP/2 connections to the instance refuse new streams",
    )))
}

enum Connected {
    H2(H2Conn),
    H1(SendRequest<UpstreamBody>),
}

/// A new connection for an HTTP/2 cluster (h2c, or TLS with ALPN).
async fn connect_h2(t: &Target<'_>) -> Result<Connected, SendError> {
    let tcp = connect_tcp(t.addr, t.connect_timeout)
        .await
        .map_err(SendError::Connect)?;
    let Some(tls) = t.tls.filter(|_| t.protocol != Protocol::H2c) else {
        return handshake_h2(tcp).await.map(Connected::H2);
    };
    let s = match tokio::time::timeout(t.connect_timeout, tls.connect_for(t.addr, tcp, t.protocol))
        .await
    {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => return Err(SendError::Connect(e)),
        Err(_) => {
            return Err(SendError::Connect(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                "tls handshake timed out",
            )))
        }
    };
    let h2 = s.get_ref().1.alpn_protocol() == Some(b"h2");
    match (h2, t.protocol) {
        (true, _) => handshake_h2(s).await.map(Connected::H2),
        (false, Protocol::Auto) => handshake(s).await.map(Connected::H1),
        (false, _) => Err(SendError::Connect(std::io::Error::other(
            "the instance did not accept h2 by ALPN",
        ))),
    }
}

/// An HTTP/2 client connection over `io`, driven by its own task, with PING keepalive.
async fn handshake_h2<IO>(io: IO) -> Result<H2Conn, SendError>
where
    IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    // The instance's first frame is its SETTINGS (RFC 9113 §3.4): streams are handed out
    // only once it has come, so none goes beyond its MAX_CONCURRENT_STREAMS.
    let (settled_tx, mut settled) = tokio::sync::watch::channel(false);
    let max = Arc::new(AtomicUsize::new(100));
    let io = SettingsSniff {
        io,
        head: Vec::new(),
        done: false,
        settled: settled_tx,
        max: max.clone(),
    };
    let (send, conn) = http2::Builder::new(TokioExecutor::new())
        .timer(TokioTimer::new())
        // Only while streams are open, and no more often than gRPC servers accept by
        // default (grpc-go: 5 min, else GOAWAY "too_many_pings").
        .keep_alive_interval(H2_PING)
        .keep_alive_timeout(Duration::from_secs(20))
        .keep_alive_while_idle(false)
        .handshake(TokioIo::new(io))
        .await
        .map_err(|e| SendError::Connect(std::io::Error::other(e)))?;
    tokio::spawn(async move {
        if let Err(e) = conn.await {
            tracing::debug!(error = %e, "upstream HTTP/2 connection ended with an error");
        }
    });
    // Bounded: an instance that never sends SETTINGS fails its streams on its own.
    let _ = tokio::time::timeout(SETTINGS_WAIT, settled.wait_for(|s| *s)).await;
    Ok(H2Conn {
        send,
        streams: Arc::new(AtomicUsize::new(0)),
        used: Arc::new(std::sync::atomic::AtomicU64::new(now_nanos())),
        max,
    })
}

/// Longest wait for a new connection's SETTINGS before streams go on it.
const SETTINGS_WAIT: Duration = Duration::from_secs(2);

/// Watches the bytes an instance sends for the end of its first frame (its SETTINGS).
struct SettingsSniff<IO> {
    io: IO,
    head: Vec<u8>,
    done: bool,
    settled: tokio::sync::watch::Sender<bool>,
    /// The instance's SETTINGS_MAX_CONCURRENT_STREAMS (its first SETTINGS; later changes
    /// are not followed).
    max: Arc<AtomicUsize>,
}

/// The first frame of `b`, once whole: None while incomplete; Some(None) when it sets no
/// stream limit (or is no SETTINGS frame); Some(Some(n)) for a limit of n.
pub(crate) fn first_settings(b: &[u8]) -> Option<Option<usize>> {
    if b.len() < 9 {
        return None;
    }
    let len = (usize::from(b[0]) << 16) | (usize::from(b[1]) << 8) | usize::from(b[2]);
    let body = b.get(9..9 + len)?;
    if b[3] != 0x4 {
        return Some(None);
    }
    Some(
        body.chunks_exact(6)
            .filter(|e| u16::from_be_bytes([e[0], e[1]]) == 0x3)
            .map(|e| u32::from_be_bytes([e[2], e[3], e[4], e[5]]) as usize)
            .next_back(),
    )
}

impl<IO: AsyncRead + Unpin> AsyncRead for SettingsSniff<IO> {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let r = std::pin::Pin::new(&mut self.io).poll_read(cx, buf);
        if !self.done && buf.filled().len() > before {
            let fresh = buf.filled()[before..].to_vec();
            self.head.extend_from_slice(&fresh);
            let first = first_settings(&self.head);
            if first.is_some() || self.head.len() > 9 + 16_384 {
                // No limit stated: unlimited (RFC 9113), capped by shoal's own.
                let n = first.flatten().unwrap_or(H2_MAX_STREAMS);
                self.max
                    .store(n.clamp(1, H2_MAX_STREAMS), Ordering::Release);
                self.done = true;
                self.head = Vec::new();
                let _ = self.settled.send(true);
            }
        }
        r
    }
}

impl<IO: AsyncWrite + Unpin> AsyncWrite for SettingsSniff<IO> {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        std::pin::Pin::new(&mut self.io).poll_write(cx, buf)
    }
    fn poll_write_vectored(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> std::task::Poll<std::io::Result<usize>> {
        std::pin::Pin::new(&mut self.io).poll_write_vectored(cx, bufs)
    }
    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }
    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.io).poll_flush(cx)
    }
    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

/// Sends `req` on an idle HTTP/1.1 connection to `addr` or a new one. On success the
/// connection is handed back with the response; put it in `idle` once the body has been read.
async fn send_h1(
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

#[cfg(test)]
mod tests {
    use super::first_settings;

    #[test]
    fn the_first_settings_frame_gives_the_stream_limit() {
        // SETTINGS with INITIAL_WINDOW_SIZE (4) and MAX_CONCURRENT_STREAMS (3) = 4.
        let f = [
            0, 0, 12, 4, 0, 0, 0, 0, 0, 0, 4, 0, 1, 0, 0, 0, 3, 0, 0, 0, 4,
        ];
        assert_eq!(first_settings(&f[..5]), None);
        assert_eq!(first_settings(&f[..15]), None);
        assert_eq!(first_settings(&f), Some(Some(4)));
        // No limit stated, and a first frame that is not SETTINGS.
        assert_eq!(first_settings(&[0, 0, 0, 4, 0, 0, 0, 0, 0]), Some(None));
        assert_eq!(first_settings(&[0, 0, 0, 6, 0, 0, 0, 0, 0]), Some(None));
    }
}
