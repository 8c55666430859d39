//! The HTTP/1.1 fast path.
//!
//! Plain keep-alive requests are parsed, checked and forwarded on the client connection's own
//! task over raw pooled upstream sockets: no header maps, no body channels, no second task
//! per upstream connection. Every head goes through the same phases as on the general path —
//! [`hygiene::inspect`] (a verdict, e.g. 400, is answered here with the same bytes),
//! [`Service::route`], [`hygiene::forward_headers`] — fed the header slices `httparse` found.
//! Bodies up to [`REPLAY_LIMIT`] (within the body memory budget) are read whole, so a failed
//! try can resend them; chunked and longer ones stream ([`body`]) and the connection goes on
//! with the next request (`Expect: 100-continue` is answered here). What it does not forward
//! itself — the HTTP/2 preface, HTTP/1.0, `Upgrade`, a streamed body on a cached or async
//! route, absolute-form or unusual targets, a head that does not parse or is over the read
//! buffer — hands the connection, with the bytes read so far, to the hyper path
//! ([`crate::server`]).

mod body;

use std::mem::MaybeUninit;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::{Buf, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::TcpStream;
use tokio::sync::watch;

use crate::config::ServiceConfig;
use crate::hygiene::{self, classify, parse_len, tokens, BodyKind, Line, Name, Origin};
use crate::pool::{instant_at, now_nanos, ErrorKind, Instance};
use crate::proxy::{
    hash_key, is_idempotent, BufferPermit, InFlight, ProxyError, Service, REPLAY_LIMIT,
};

/// Header slots parsed at once; a request with more goes to the general path.
const MAX_PARSE_HEADERS: usize = 128;
/// Largest upstream response head accepted (→ 502).
const MAX_RESPONSE_HEAD: usize = 64 * 1024;
const READ_CHUNK: usize = 8 * 1024;
/// Pipelined request bytes buffered while a request is in progress.
const PIPELINE_LIMIT: usize = 64 * 1024;

/// A client connection's byte stream: plain TCP or TLS over TCP.
pub(crate) trait ClientIo: AsyncRead + AsyncWrite + Unpin + Send + 'static {
    /// Reads and writes go straight to [`ClientIo::tcp`]: while a try is in progress,
    /// interim responses are written and pipelined bytes read through a shared borrow.
    const PLAIN: bool;
    /// The TCP socket underneath.
    fn tcp(&self) -> &TcpStream;
}

impl ClientIo for TcpStream {
    const PLAIN: bool = true;
    fn tcp(&self) -> &TcpStream {
        self
    }
}

/// How a fast-path connection ended.
pub(crate) enum End {
    /// Closed (client gone, shutdown, idle, error).
    Closed,
    /// The general path takes over; these bytes were read but not handled.
    Handover(BytesMut),
}

/// What the request head says, once checked and routed.
struct Plan {
    head_len: usize,
    body_len: usize,
    /// A body streamed rather than read whole (`body_len` is then 0).
    stream: Option<body::Streamed>,
    /// The client waits for `100 Continue` before it sends the body.
    expect: bool,
    head_method: bool,
    idempotent: bool,
    close: bool,
    key: Option<Vec<u8>>,
    /// The route's service; None: the listening service.
    target: Option<Arc<Service>>,
    /// The body's share of the buffer budget, held until the exchange ends.
    _permit: Option<BufferPermit>,
    /// The `traceparent` sent upstream.
    trace: [u8; 55],
    /// Method and target, kept only for the access log.
    log: Option<Box<(String, String)>>,
    /// A cached route's request the fast path does not answer itself (miss, validation,
    /// coalescing, unsafe method): run through the general path's phases, answered here.
    general: bool,
}

enum Parsed {
    Ready(Plan),
    Partial,
    Handover,
    /// Refused by a hygiene rule or no route: answered with this (method and target kept
    /// for the access log).
    Reject(ProxyError, Option<Box<(String, String)>>),
    /// A fresh cache hit: answered from memory, the head this long.
    Hit {
        head_len: usize,
        hit: shoal_cache::FastHit,
        close: bool,
        target: Option<Arc<Service>>,
    },
}

/// RFC 3986 path and query characters. Anything else (fragments, `<>"{}|\^\``, non-ASCII)
/// goes to the general path, whose URI parser decides: rejected, or cut at `#`.
fn plain_target_byte(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"-._~!$&'()*+,;=:@/?%[]".contains(&b)
}

/// Appends `data` as one chunk (nothing if empty: an empty chunk would end the body).
fn put_chunk(out: &mut Vec<u8>, data: &[u8]) {
    if !data.is_empty() {
        out.extend_from_slice(format!("{:x}\r\n", data.len()).as_bytes());
        out.extend_from_slice(data);
        out.extend_from_slice(b"\r\n");
    }
}

fn put(out: &mut Vec<u8>, name: &[u8], value: &[u8]) {
    out.extend_from_slice(name);
    out.extend_from_slice(b": ");
    out.extend_from_slice(value);
    out.extend_from_slice(b"\r\n");
}

/// Parses, checks and routes a request head in `buf`; when it can be forwarded here, writes
/// the upstream head to `out`. `svc` is the listening service.
fn plan_request(
    buf: &[u8],
    svc: &Service,
    cfg: &ServiceConfig,
    peer: SocketAddr,
    peer_ip: &[u8],
    port: u16,
    out: &mut Vec<u8>,
    identified: bool,
) -> Parsed {
    let mut slots = [const { MaybeUninit::<httparse::Header>::uninit() }; MAX_PARSE_HEADERS];
    let mut req = httparse::Request::new(&mut []);
    let head_len = match req.parse_with_uninit_headers(buf, &mut slots) {
        Ok(httparse::Status::Complete(n)) => n,
        // Past any head the limits allow: the general path answers 414/431.
        Ok(httparse::Status::Partial) if buf.len() > cfg.limits.max_head_bytes() => {
            return Parsed::Handover
        }
        Ok(httparse::Status::Partial) => return Parsed::Partial,
        Err(_) => return Parsed::Handover,
    };
    let (Some(method), Some(path), Some(1)) = (req.method, req.path, req.version) else {
        return Parsed::Handover;
    };
    if !path.starts_with('/')
        || !path.bytes().all(plain_target_byte)
        || head_len > cfg.limits.max_head_bytes()
    {
        return Parsed::Handover;
    }
    let pairs = || req.headers.iter().map(|h| (h.name.as_bytes(), h.value));
    let line = Line {
        method,
        target_len: path.len(),
        target_authority: None,
        minor: Some(1),
    };
    let log = || {
        cfg.access_log
            .then(|| Box::new((method.to_string(), path.to_string())))
    };
    let facts = match hygiene::inspect(&line, pairs(), cfg, peer.ip()) {
        Ok(f) => f,
        Err(e) => return Parsed::Reject(e, log()),
    };
    let (mut body_len, mut stream) = match facts.body {
        BodyKind::None => (0, None),
        BodyKind::Length(n) if n <= REPLAY_LIMIT => (n, None),
        BodyKind::Length(n) => (0, Some(body::Streamed::Length(n))),
        BodyKind::Chunked => (0, Some(body::Streamed::Chunked)),
    };
    if facts.upgrade.is_some() {
        return Parsed::Handover;
    }
    // `Expect: 100-continue` is met here (the body is read or streamed at once, as NGINX
    // does), so it does not go upstream.
    let expect = facts.expect && facts.body != BodyKind::None;
    let permit = match BufferPermit::take(body_len) {
        Some(p) => p,
        // Past the memory budget: streamed (so not retried), as on the general path.
        None => {
            stream = Some(body::Streamed::Length(body_len));
            body_len = 0;
            BufferPermit::take(0).expect("an empty share is always granted")
        }
    };
    if let Some(port) = cfg.https_redirect {
        let e = crate::tls::https_location(facts.authority, port, path)
            .map_or_else(|e| e, ProxyError::Redirect);
        return Parsed::Reject(e, log());
    }
    // Job URLs and async routes are the general path's (their phase runs there).
    if svc.jobs_for(method, path).is_some() {
        return Parsed::Handover;
    }
    let routed = match svc.route(facts.authority, method, path) {
        Ok(r) => r,
        Err(e) => return Parsed::Reject(e, log()),
    };
    if !matches!(routed.jobs, crate::route::AsyncPhase::Off) {
        return Parsed::Handover;
    }
    // A cached route's phases here take a body read whole.
    if routed.cache.is_some() && stream.is_some() {
        return Parsed::Handover;
    }
    // A client known by its certificate is not served from the shared cache (see
    // `Service::proxy`'s cache phase).
    if let Some(cache) = routed.cache.as_ref().filter(|_| !identified) {
        let m = match method {
            "GET" => Some(&http::Method::GET),
            "HEAD" => Some(&http::Method::HEAD),
            _ => None,
        };
        // A trusted proxy's X-Forwarded-Proto is part of the key: those lookups take the
        // general path's phases.
        let forwarded_proto = facts.trusted
            && req
                .headers
                .iter()
                .any(|h| h.name.eq_ignore_ascii_case("x-forwarded-proto"));
        let host = crate::cache::host_str(facts.authority).filter(|_| !forwarded_proto);
        if let (Some(m), Some(host), 0) = (m, host, body_len) {
            let now = std::time::SystemTime::now();
            if let Some(hit) = cache.fast_hit(m, cfg.scheme(), host, path, req.headers, now) {
                return Parsed::Hit {
                    head_len,
                    hit,
                    close: facts.close,
                    target: routed.target,
                };
            }
        }
        // Misses, validation, coalescing and unsafe methods take the general path's phases,
        // on this connection (kept alive).
        return Parsed::Ready(Plan {
            head_len,
            body_len: body_len as usize,
            stream: None,
            expect,
            head_method: method == "HEAD",
            idempotent: is_idempotent(method),
            close: facts.close,
            key: None,
            target: routed.target,
            _permit: Some(permit),
            trace: [b'-'; 55],
            log: None,
            general: true,
        });
    }
    let trace = hygiene::trace_context(facts.traceparent);
    out.clear();
    out.extend_from_slice(method.as_bytes());
    out.push(b' ');
    out.extend_from_slice(routed.path.as_deref().unwrap_or(path).as_bytes());
    out.extend_from_slice(b" HTTP/1.1\r\n");
    let origin = Origin {
        peer_ip,
        port,
        prefix: routed.prefix.as_deref(),
        via: b"1.1 shoal",
        traceparent: &trace,
    };
    hygiene::forward_headers(&facts, pairs, cfg, &origin, |n, v| {
        // The expectation is met here, not forwarded (shoal's own `expect` line).
        if facts.expect && n == b"expect" {
            return;
        }
        out.extend_from_slice(n);
        out.extend_from_slice(b": ");
        for p in v {
            out.extend_from_slice(p);
        }
        out.extend_from_slice(b"\r\n");
    });
    if stream == Some(body::Streamed::Chunked) {
        // Re-framed as it passes (`body::Decoder`).
        out.extend_from_slice(b"transfer-encoding: chunked\r\n");
    }
    out.extend_from_slice(b"\r\n");
    let target_cfg;
    let tcfg = match &routed.target {
        Some(t) => {
            target_cfg = t.config.load();
            &**target_cfg
        }
        None => cfg,
    };
    if crate::grpc::speaks_h2(tcfg) {
        // HTTP/2 to the instances: the general path (hyper's HTTP/2 client).
        return Parsed::Handover;
    }
    if tcfg.upstream_tls.is_some() {
        // TLS to the instances: the general path's phases and connections (hyper over
        // rustls), on this connection for a body read whole; a streamed one hands over.
        if stream.is_some() {
            return Parsed::Handover;
        }
        return Parsed::Ready(Plan {
            head_len,
            body_len: body_len as usize,
            stream: None,
            expect,
            head_method: method == "HEAD",
            idempotent: is_idempotent(method),
            close: facts.close,
            key: None,
            target: routed.target,
            _permit: Some(permit),
            trace: [b'-'; 55],
            log: None,
            general: true,
        });
    }
    let key = hash_key(tcfg, peer, |name| {
        req.headers
            .iter()
            .find(|h| h.name.eq_ignore_ascii_case(name))
            .map(|h| h.value)
    });
    Parsed::Ready(Plan {
        head_len,
        body_len: body_len as usize,
        stream,
        expect,
        head_method: method == "HEAD",
        idempotent: is_idempotent(method),
        close: facts.close,
        key,
        target: routed.target,
        _permit: Some(permit),
        trace,
        log: log(),
        general: false,
    })
}

/// How the response body is delimited.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Framing {
    Empty,
    Length(u64),
    Chunked,
    /// Until the instance closes; the client connection closes after it too.
    Close,
}

#[derive(Debug)]
struct RespPlan {
    head_len: usize,
    status: u16,
    framing: Framing,
    /// The upstream connection can carry another request afterwards.
    reusable: bool,
    /// A body delimited by the instance's close goes to the client chunked, so the client
    /// connection outlives it.
    rechunk: bool,
}

#[derive(Debug)]
enum RespParsed {
    Ready(RespPlan),
    Partial,
    /// A 1xx other than 101, this long: dropped, the real response follows.
    Interim(usize),
    Bad(&'static str),
}

/// Appends `HTTP/1.1 NNN reason\r\n` (httparse guarantees a three-digit status).
fn status_line(out: &mut Vec<u8>, status: u16, reason: Option<&str>) {
    out.extend_from_slice(b"HTTP/1.1 ");
    out.extend_from_slice(&[
        b'0' + (status / 100) as u8,
        b'0' + (status / 10 % 10) as u8,
        b'0' + (status % 10) as u8,
    ]);
    out.push(b' ');
    out.extend_from_slice(reason.unwrap_or("").as_bytes());
    out.extend_from_slice(b"\r\n");
}

/// Parses an upstream response head; writes the client's head to `out`.
fn plan_response(
    buf: &[u8],
    head_method: bool,
    close_client: bool,
    out: &mut Vec<u8>,
) -> RespParsed {
    let mut slots = [const { MaybeUninit::<httparse::Header>::uninit() }; MAX_PARSE_HEADERS];
    let mut resp = httparse::Response::new(&mut []);
    let parsed = httparse::ParserConfig::default()
        .parse_response_with_uninit_headers(&mut resp, buf, &mut slots);
    let head_len = match parsed {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) if buf.len() <= MAX_RESPONSE_HEAD => {
            return RespParsed::Partial
        }
        _ => return RespParsed::Bad("upstream sent an invalid response"),
    };
    let (Some(version), Some(status)) = (resp.version, resp.code) else {
        return RespParsed::Bad("upstream sent an invalid response");
    };
    if !hygiene::valid_status(status) {
        return RespParsed::Bad("upstream sent an invalid response");
    }
    if (100..200).contains(&status) {
        if status == 101 {
            return RespParsed::Bad("upstream switched protocols unasked");
        }
        // 102, 103 (Early Hints) and unknown 1xx go to the client ahead of the final
        // response, hop-by-hop fields removed; an unasked 100 Continue does not (the fast
        // path never forwards `Expect`).
        out.clear();
        if status != 100 {
            status_line(out, status, resp.reason);
            let named: Vec<&[u8]> = resp
                .headers
                .iter()
                .filter(|h| classify(h.name.as_bytes()) == Name::Connection)
                .flat_map(|h| tokens(h.value))
                .collect();
            for h in resp.headers.iter() {
                let name = h.name.as_bytes();
                let keep = match classify(name) {
                    Name::TransferEncoding | Name::ContentLength => false,
                    _ => hygiene::response_header_kept(name, &named),
                };
                if keep {
                    put(out, name, h.value);
                }
            }
            out.extend_from_slice(b"\r\n");
        }
        return RespParsed::Interim(head_len);
    }
    let mut len = None;
    let mut chunked = false;
    let mut has_te = false;
    let mut reusable = version == 1;
    let mut other_options = false;
    for h in resp.headers.iter() {
        match classify(h.name.as_bytes()) {
            Name::ContentLength => match (len, parse_len(h.value)) {
                (None, Some(n)) => len = Some(n),
                (Some(a), Some(b)) if a == b => {}
                _ => return RespParsed::Bad("upstream sent an invalid content-length"),
            },
            Name::TransferEncoding => {
                if version == 0 {
                    return RespParsed::Bad("upstream sent transfer-encoding in HTTP/1.0");
                }
                has_te = true;
                chunked = tokens(h.value)
                    .last()
                    .is_some_and(|t| t.eq_ignore_ascii_case(b"chunked"))
            }
            Name::Connection => {
                for t in tokens(h.value) {
                    if t.eq_ignore_ascii_case(b"close") {
                        reusable = false;
                    } else if !(t.is_empty() || t.eq_ignore_ascii_case(b"keep-alive")) {
                        other_options = true;
                    }
                }
            }
            _ => {}
        }
    }
    let no_body = head_method || status == 204 || status == 304;
    let framing = if no_body {
        Framing::Empty
    } else if chunked {
        Framing::Chunked
    } else if has_te {
        // A coding that does not end in chunked: the body runs until the instance closes.
        reusable = false;
        Framing::Close
    } else if let Some(n) = len {
        Framing::Length(n)
    } else {
        reusable = false;
        Framing::Close
    };
    // Without a coding the body can be chunked on the way; with one it would need its
    // `Transfer-Encoding` rewritten, and goes as it came, until close.
    let rechunk = framing == Framing::Close && !has_te;
    let mut named: Vec<&[u8]> = Vec::new();
    if other_options {
        named.extend(
            resp.headers
                .iter()
                .filter(|h| classify(h.name.as_bytes()) == Name::Connection)
                .flat_map(|h| tokens(h.value)),
        );
    }
    out.clear();
    status_line(out, status, resp.reason);
    for h in resp.headers.iter() {
        let name = h.name.as_bytes();
        let keep = match classify(name) {
            // The body goes out with the framing it came with.
            Name::TransferEncoding => framing != Framing::Empty,
            Name::ContentLength => !has_te,
            _ => hygiene::response_header_kept(name, &named),
        };
        if keep {
            put(out, name, h.value);
        }
    }
    out.extend_from_slice(b"via: 1.1 shoal\r\n");
    if rechunk {
        out.extend_from_slice(b"transfer-encoding: chunked\r\n");
    }
    if close_client || (framing == Framing::Close && !rechunk) {
        out.extend_from_slice(b"connection: close\r\n");
    }
    out.extend_from_slice(b"\r\n");
    RespParsed::Ready(RespPlan {
        head_len,
        status,
        framing,
        reusable,
        rechunk,
    })
}

/// Finds where a chunked body ends, fed the bytes as they pass through.
#[derive(Debug, Default)]
struct Chunked {
    state: ChunkState,
    size: u64,
}

#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
enum ChunkState {
    /// Start of a size line: a hex digit must come.
    #[default]
    SizeStart,
    Size,
    /// Whitespace after the size: only more of it, `;` or CR may follow.
    SizeWs,
    Ext,
    SizeLf,
    Data,
    DataCr,
    DataLf,
    /// Start of a trailer line, or of the final empty line.
    LineStart,
    Trailer,
    TrailerLf,
    EndLf,
    Done,
}

impl Chunked {
    /// Consumes `data`; `Ok(Some(n))` once the body ends after `data[..n]`. Strict about
    /// line structure (CRLF only, a size on every size line), as a framing error here would
    /// desynchronise the reused upstream connection.
    fn feed(&mut self, data: &[u8]) -> Result<Option<usize>, ()> {
        use ChunkState::*;
        let mut i = 0;
        while i < data.len() {
            let b = data[i];
            self.state = match (self.state, b) {
                (SizeStart | Size, b'0'..=b'9' | b'a'..=b'f' | b'A'..=b'F') => {
                    let d = (b as char).to_digit(16).unwrap_or(0) as u64;
                    self.size = self.size.checked_mul(16).ok_or(())? + d;
                    if self.size > 1 << 56 {
                        return Err(());
                    }
                    Size
                }
                (Size | SizeWs, b' ' | b'\t') => SizeWs,
                (Size | SizeWs, b';') => Ext,
                (Size | SizeWs | Ext, b'\r') => SizeLf,
                (Ext, b'\n') => return Err(()),
                (Ext, _) => Ext,
                (SizeLf, b'\n') if self.size == 0 => LineStart,
                (SizeLf, b'\n') => Data,
                (Data, _) => {
                    let take = (self.size as usize).min(data.len() - i);
                    self.size -= take as u64;
                    i += take;
                    if self.size == 0 {
                        self.state = DataCr;
                    }
                    continue;
                }
                (DataCr, b'\r') => DataLf,
                (DataLf, b'\n') => SizeStart,
                (LineStart, b'\r') => EndLf,
                (LineStart | Trailer, b'\n') => return Err(()),
                (LineStart | Trailer, _) if b != b'\r' => Trailer,
                (Trailer, b'\r') => TrailerLf,
                (TrailerLf, b'\n') => LineStart,
                (EndLf, b'\n') => {
                    self.state = Done;
                    return Ok(Some(i + 1));
                }
                (Done, _) => return Ok(Some(i)),
                _ => return Err(()),
            };
            i += 1;
        }
        Ok((self.state == Done).then_some(data.len()))
    }
}

/// Tracks how much of a response body is still to come.
enum BodyLeft {
    Length(u64),
    Chunked(Chunked),
    Close,
}

impl BodyLeft {
    /// Takes bytes from `data`: how many belong to the body, and whether it is complete.
    fn take(&mut self, data: &[u8]) -> Result<(usize, bool), ()> {
        match self {
            BodyLeft::Length(n) => {
                let k = (*n).min(data.len() as u64) as usize;
                *n -= k as u64;
                Ok((k, *n == 0))
            }
            BodyLeft::Chunked(c) => Ok(match c.feed(data)? {
                Some(k) => (k, true),
                None => (data.len(), false),
            }),
            BodyLeft::Close => Ok((data.len(), false)),
        }
    }
}

/// Why one try failed.
enum TryError {
    Connect(std::io::Error),
    /// Written (maybe partly); no usable response. `reused_silent`: not a byte of response
    /// came back, so on a reused connection the instance may have closed it while idle.
    Reset {
        reused_silent: bool,
    },
    Bad(&'static str),
}

/// A response whose head has been read.
struct Answer {
    up: TcpStream,
    plan: RespPlan,
}

/// One client connection on the fast path.
pub(crate) struct Conn<'a, S: ClientIo> {
    stream: &'a mut S,
    /// The listening service (routes, client-side limits and timeouts).
    svc: &'a Arc<Service>,
    peer: SocketAddr,
    peer_ip: &'a [u8],
    /// The listener's port, for `X-Forwarded-Port`.
    port: u16,
    /// What the TLS handshake established (None: plain TCP).
    tls: Option<&'a crate::tls::Session>,
    rbuf: BytesMut,
    /// The request as it goes upstream.
    req: Vec<u8>,
    bufs: Bufs,
    try_timer: Pin<Box<tokio::time::Sleep>>,
    /// When the connection last did something (the idle timeout counts from here).
    last_active: u64,
    /// Tries the last request took, and response body bytes relayed (access log).
    tries_made: u32,
    body_bytes: u64,
    /// The last request's streamed body was not read to its end: the connection closes.
    body_open: bool,
}

/// Buffers for the upstream side of one exchange.
struct Bufs {
    /// What the instance sent.
    ubuf: BytesMut,
    /// What goes to the client next.
    out: Vec<u8>,
    /// Interim responses (1xx) the client socket could not take at once: sent before the
    /// final answer, so a slow client never holds up a try (nor is counted against it).
    interim: Vec<u8>,
}

impl<'a, S: ClientIo> Conn<'a, S> {
    pub(crate) fn new(
        stream: &'a mut S,
        svc: &'a Arc<Service>,
        peer: SocketAddr,
        peer_ip: &'a [u8],
        port: u16,
    ) -> Self {
        Conn {
            stream,
            svc,
            peer,
            peer_ip,
            port,
            tls: None,
            rbuf: BytesMut::new(),
            req: Vec::new(),
            bufs: Bufs {
                ubuf: BytesMut::new(),
                out: Vec::new(),
                interim: Vec::new(),
            },
            try_timer: Box::pin(tokio::time::sleep(Duration::ZERO)),
            last_active: now_nanos(),
            tries_made: 0,
            body_bytes: 0,
            body_open: false,
        }
    }

    /// The connection's TLS session (its verified client identity goes upstream).
    pub(crate) fn with_tls(mut self, tls: Option<&'a crate::tls::Session>) -> Self {
        self.tls = tls;
        self
    }

    /// Serves requests until the connection closes or needs the general path.
    pub(crate) async fn serve(mut self, stop: &mut watch::Receiver<bool>) -> End {
        let mut idle_timer = Box::pin(tokio::time::sleep(Duration::ZERO));
        // Registered once per connection, not once per wait. Shutdown closes the connection
        // at its next wait for a request, so the request in progress (and any already
        // pipelined behind it) completes.
        let stop_signal = crate::server::stopped(stop);
        tokio::pin!(stop_signal);
        loop {
            let cfg = self.svc.config.load_full();
            let idle = cfg.timeouts.idle.0.as_nanos() as u64;
            // Wait for a complete head: the idle timeout until its first byte, then the
            // header-read timeout (slowloris).
            let mut head_deadline = None;
            let plan = loop {
                if !self.rbuf.is_empty() {
                    let parsed = plan_request(
                        &self.rbuf,
                        self.svc,
                        &cfg,
                        self.peer,
                        self.peer_ip,
                        self.port,
                        &mut self.req,
                        self.tls.is_some_and(|t| t.identity.is_some()),
                    );
                    match parsed {
                        Parsed::Ready(p) => break p,
                        Parsed::Hit {
                            head_len,
                            hit,
                            close,
                            target,
                        } => {
                            self.rbuf.advance(head_len);
                            let svc = target.as_ref().unwrap_or(self.svc);
                            svc.metrics.requests.inc();
                            svc.metrics.local.inc(hit.status);
                            self.bufs.out.clear();
                            hit.write_head(&mut self.bufs.out, close);
                            self.bufs.out.extend_from_slice(&hit.body);
                            let limit = cfg.timeouts.client_write.0;
                            let written = write_client(self.stream, &self.bufs.out, limit).await;
                            self.last_active = now_nanos();
                            if !written || close {
                                return End::Closed;
                            }
                            head_deadline = None;
                            continue;
                        }
                        Parsed::Handover => return End::Handover(self.rbuf),
                        Parsed::Partial => {}
                        Parsed::Reject(e, log) => {
                            // The head is not understood well enough to find the next one.
                            if let Some(l) = log {
                                let now = now_nanos();
                                let status = e.status().as_u16();
                                let times = (now, now, now);
                                self.log(&l, &self.svc.name, "-", status, 0, times, 0, b"-");
                            }
                            self.answer(&e, true, &cfg).await;
                            return End::Closed;
                        }
                    }
                }
                if self.rbuf.capacity() == 0 {
                    self.rbuf = spare::bytes();
                }
                self.rbuf.reserve(READ_CHUNK);
                let read = if self.rbuf.is_empty() {
                    // On plain TCP, a connection with nothing to read parks without its
                    // buffers (they go to this thread's spares): an idle keep-alive
                    // connection holds no buffer. The try costs no syscall while tokio
                    // knows the socket is not readable.
                    let first = if S::PLAIN {
                        // Shutdown closes a connection between requests, even one whose
                        // next request is already waiting.
                        tokio::select! {
                            biased;
                            _ = &mut stop_signal => return End::Closed,
                            _ = std::future::ready(()) => {}
                        }
                        match read_now(&mut *self.stream, &mut self.rbuf) {
                            None => {
                                self.shed();
                                None
                            }
                            r => r,
                        }
                    } else {
                        None
                    };
                    match first {
                        Some(r) => r,
                        None => loop {
                            // Re-armed only when it fires: one timer update per idle period.
                            if idle_timer.is_elapsed() {
                                idle_timer
                                    .as_mut()
                                    .reset(instant_at(self.last_active + idle));
                            }
                            tokio::select! {
                                biased;
                                _ = &mut stop_signal => return End::Closed,
                                r = idle_read(&mut *self.stream, &mut self.rbuf) => match r {
                                    Some(r) => break r,
                                    None => continue,
                                },
                                _ = idle_timer.as_mut() => {
                                    if now_nanos().saturating_sub(self.last_active) >= idle {
                                        return End::Closed;
                                    }
                                }
                            }
                        },
                    }
                } else {
                    let deadline = *head_deadline.get_or_insert_with(|| {
                        tokio::time::Instant::now() + cfg.timeouts.header_read.0
                    });
                    match tokio::time::timeout_at(deadline, self.stream.read_buf(&mut self.rbuf))
                        .await
                    {
                        Ok(r) => r,
                        Err(_) => return End::Closed,
                    }
                };
                match read {
                    Ok(0) | Err(_) => return End::Closed,
                    Ok(_) => self.restore(),
                }
            };
            let start = now_nanos();
            if plan.expect && self.rbuf.len() == plan.head_len {
                let limit = cfg.timeouts.client_write.0;
                if !write_client(self.stream, b"HTTP/1.1 100 Continue\r\n\r\n", limit).await {
                    return End::Closed;
                }
            }
            // A small body is read whole, so a failed try can resend it.
            let total = plan.head_len + plan.body_len;
            while self.rbuf.len() < total {
                self.rbuf.reserve(total - self.rbuf.len());
                let read = self.stream.read_buf(&mut self.rbuf);
                match tokio::time::timeout(cfg.timeouts.body_read.0, read).await {
                    Ok(Ok(n)) if n > 0 => {}
                    // A client that stalls mid-body is told so (as NGINX's client_body_timeout).
                    Err(_) => {
                        self.answer(&ProxyError::RequestTimeout, true, &cfg).await;
                        return End::Closed;
                    }
                    // Gone mid-body: nobody to answer, but the same client error as on the
                    // general path.
                    _ => {
                        self.svc.metrics.client_errors.inc();
                        return End::Closed;
                    }
                }
            }
            if plan.general {
                let Some(req) = general_request(&self.rbuf[..total], plan.head_len) else {
                    return End::Handover(self.rbuf);
                };
                self.rbuf.advance(total);
                if !self.general(req, &plan, &cfg).await || plan.close {
                    return End::Closed;
                }
                continue;
            }
            if let Some(id) = self.tls.and_then(|s| s.identity.as_ref().map(|v| (s, v))) {
                // Before the head's closing blank line (the client's copy was dropped).
                let at = self.req.len() - 2;
                let line = [
                    id.0.identity_header.as_str().as_bytes(),
                    b": ",
                    id.1.as_bytes(),
                    b"\r\n",
                ];
                self.req.splice(at..at, line.concat());
            }
            self.req.extend_from_slice(&self.rbuf[plan.head_len..total]);
            self.rbuf.advance(total);
            let keep = self.exchange(&plan, &cfg, start).await;
            if !keep || plan.close {
                return End::Closed;
            }
        }
    }

    /// Gives this idle connection's empty buffers to the thread's spares.
    fn shed(&mut self) {
        if self.rbuf.is_empty() {
            spare::give_bytes(std::mem::take(&mut self.rbuf));
        }
        // Between requests the instance's buffer holds only the last answer, already relayed.
        spare::give_bytes(std::mem::take(&mut self.bufs.ubuf));
        spare::give_vec(std::mem::take(&mut self.bufs.out));
        spare::give_vec(std::mem::take(&mut self.req));
        if self.bufs.interim.is_empty() {
            self.bufs.interim = Vec::new();
        }
    }

    /// Takes spare buffers for what `shed` gave away, before a request is handled.
    fn restore(&mut self) {
        if self.bufs.ubuf.capacity() == 0 {
            self.bufs.ubuf = spare::bytes();
        }
        if self.bufs.out.capacity() == 0 {
            self.bufs.out = spare::vec();
        }
        if self.req.capacity() == 0 {
            self.req = spare::vec();
        }
    }

    /// Runs a request through the general path's phases ([`Service::handle_read`]: the
    /// cache phase and tries over hyper) and writes the response on this connection.
    async fn general(
        &mut self,
        mut req: http::Request<bytes::Bytes>,
        plan: &Plan,
        lcfg: &ServiceConfig,
    ) -> bool {
        let peer_ip = http::HeaderValue::from_bytes(self.peer_ip)
            .unwrap_or_else(|_| http::HeaderValue::from_static("unknown"));
        let limit = lcfg.timeouts.client_write.0;
        // Interim responses of the tries (103 Early Hints) come back through this channel and
        // go to the client while the final answer is still being made.
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        req.extensions_mut().insert(crate::proxy::InterimSink(tx));
        if let Some(s) = self.tls {
            req.extensions_mut().insert(s.clone());
        }
        // Boxed: the general path's future is large, and inline it would grow every
        // connection's state, idle ones included, by its size.
        let mut answer = Box::pin(
            self.svc
                .clone()
                .handle_read(req, self.peer, peer_ip, self.port),
        );
        let resp = loop {
            tokio::select! {
                biased;
                r = &mut answer => break r,
                Some(head) = rx.recv() => {
                    if !write_client(self.stream, &head, limit).await {
                        return false;
                    }
                }
            }
        };
        // Hints that raced the answer still go first.
        while let Ok(head) = rx.try_recv() {
            if !write_client(self.stream, &head, limit).await {
                return false;
            }
        }
        let keep = write_response(
            self.stream,
            resp,
            plan.head_method,
            plan.close,
            limit,
            &mut self.bufs.out,
        )
        .await;
        self.last_active = now_nanos();
        keep
    }

    /// Answers with shoal's own error, counted on the listening service.
    async fn answer(&mut self, e: &ProxyError, close: bool, lcfg: &ServiceConfig) -> bool {
        self.svc.metrics.local.inc(e.status().as_u16());
        if e.client_fault() {
            self.svc.metrics.client_errors.inc();
        }
        e.write(&mut self.bufs.out, close);
        write_client(self.stream, &self.bufs.out, lcfg.timeouts.client_write.0).await
            && !(close || e.closes())
    }

    /// Forwards one request (its upstream bytes in `self.req`) and relays the response.
    /// Returns whether the client connection can take another request. `lcfg` is the
    /// listening service's config; the route's service runs the tries.
    async fn exchange(&mut self, plan: &Plan, lcfg: &ServiceConfig, start: u64) -> bool {
        let svc = plan.target.as_ref().unwrap_or(self.svc).clone();
        let cfg = svc.config.load_full();
        svc.metrics.requests.inc();
        let request = std::mem::take(&mut self.req);
        self.body_open = false;
        let result = match plan.stream {
            None => self.forward(&svc, &request, plan, &cfg, start).await,
            // Boxed: inline, the streamed path's state would grow every exchange.
            Some(kind) => {
                Box::pin(self.forward_streamed(&svc, &request, kind, plan, &cfg, lcfg, start)).await
            }
        };
        self.req = request;
        let close = plan.close || self.body_open;
        let write_limit = lcfg.timeouts.client_write.0;
        // Interim responses the client's socket did not take during the tries go first.
        if !self.bufs.interim.is_empty() {
            let sent = write_client(self.stream, &self.bufs.interim, write_limit).await;
            self.bufs.interim.clear();
            if !sent {
                return false;
            }
        }
        let keep = match result {
            Ok((answer, busy)) => {
                let status = answer.plan.status;
                let headers_at = self.last_active;
                let inst = plan.log.as_ref().map(|_| busy.inst().id.clone());
                self.body_bytes = 0;
                let read_limit = cfg.timeouts.upstream_read.0;
                let keep = self
                    .relay(answer, busy, close, read_limit, write_limit)
                    .await;
                if let (Some(l), Some(inst)) = (&plan.log, inst) {
                    let times = (start, headers_at, now_nanos());
                    let (tries, bytes) = (self.tries_made, self.body_bytes);
                    self.log(
                        l,
                        &svc.name,
                        &inst,
                        status,
                        bytes,
                        times,
                        tries,
                        &plan.trace,
                    );
                }
                keep
            }
            Err(None) => false,
            Err(Some(e)) => {
                svc.metrics.local.inc(e.status().as_u16());
                if e.client_fault() {
                    svc.metrics.client_errors.inc();
                }
                self.last_active = now_nanos();
                if let Some(l) = &plan.log {
                    let times = (start, self.last_active, self.last_active);
                    let status = e.status().as_u16();
                    self.log(
                        l,
                        &svc.name,
                        "-",
                        status,
                        0,
                        times,
                        self.tries_made,
                        &plan.trace,
                    );
                }
                e.write(&mut self.bufs.out, close);
                write_client(self.stream, &self.bufs.out, write_limit).await
                    && !e.closes()
                    && !close
            }
        };
        if self.body_open {
            Box::pin(body::linger(&mut *self.stream)).await;
            return false;
        }
        keep
    }

    /// Writes one access-log line (only called when the listener logs). `times`: request
    /// start, response headers, end.
    #[allow(clippy::too_many_arguments)]
    fn log(
        &self,
        l: &(String, String),
        service: &str,
        instance: &str,
        status: u16,
        bytes: u64,
        times: (u64, u64, u64),
        tries: u32,
        trace: &[u8],
    ) {
        crate::access::Entry {
            service,
            instance,
            client: self.peer.ip(),
            method: &l.0,
            path: &l.1,
            status,
            bytes,
            headers_ms: crate::access::ms(times.0, times.1),
            total_ms: crate::access::ms(times.0, times.2),
            tries,
            trace,
            cache: "-",
        }
        .emit();
    }

    /// Tries instances until one answers with a response head (retries as in
    /// `Service::proxy`: budgeted, idempotent or unsent requests only).
    async fn forward(
        &mut self,
        svc: &Arc<Service>,
        request: &[u8],
        plan: &Plan,
        cfg: &ServiceConfig,
        start: u64,
    ) -> Result<(Answer, InFlight), Option<ProxyError>> {
        // Scaling from zero: wait (bounded) for a first instance.
        svc.pool.wait_routable().await.map_err(Some)?;
        let mut tries = svc.begin_tries(cfg, start);
        let mut last_err = None;
        self.tries_made = 0;
        for attempt in 0..cfg.retries.attempts {
            let Some(mut t) = svc
                .next_try(&mut tries, attempt, cfg, plan.key.as_deref())
                .map_err(Some)?
            else {
                break;
            };
            // One reusable timer, re-armed only when it fires or would fire too late: it
            // costs a timer-wheel update once per try-timeout period, not once per request.
            let try_deadline = t.started + t.timeout.as_nanos() as u64;
            let at = instant_at(try_deadline);
            if self.try_timer.is_elapsed() || self.try_timer.deadline() > at {
                self.try_timer.as_mut().reset(at);
            }
            // A block of its own: the try borrows `t`, which `end_try` then updates.
            let result = {
                let mut watch = true;
                let attempt_fut = try_instance(
                    &mut self.bufs,
                    &t.inst,
                    request,
                    plan,
                    cfg.timeouts.connect.0,
                    cfg.timeouts.upstream_idle.0,
                    S::PLAIN.then(|| self.stream.tcp()),
                );
                tokio::pin!(attempt_fut);
                loop {
                    tokio::select! {
                        biased;
                        r = &mut attempt_fut => break Ok(r),
                        _ = self.try_timer.as_mut() => {
                            if now_nanos() >= try_deadline {
                                break Err(());
                            }
                            self.try_timer.as_mut().reset(at);
                        }
                        // A client that hangs up stops its request (a pipelined next request is
                        // only buffered, up to a bound).
                        _ = self.stream.tcp().readable(), if watch && self.rbuf.len() < PIPELINE_LIMIT => {
                            if S::PLAIN {
                                self.rbuf.reserve(READ_CHUNK);
                                match self.stream.tcp().try_read_buf(&mut self.rbuf) {
                                    Ok(0) => return Err(None),
                                    Err(e) if e.kind() != std::io::ErrorKind::WouldBlock => {
                                        return Err(None)
                                    }
                                    _ => {}
                                }
                            } else {
                                // TLS records need the session to read: peek for a hang-up,
                                // and stop watching once records are waiting.
                                match peek_now(self.stream.tcp()) {
                                    Some(0) => return Err(None),
                                    Some(_) => watch = false,
                                    None => {}
                                }
                            }
                        }
                    }
                }
            };
            let answered = now_nanos();
            self.last_active = answered;
            self.tries_made = attempt + 1;
            let (outcome, err) = match result {
                Ok(Ok(answer)) => {
                    svc.end_try(&tries, &mut t, answered, Ok(answer.plan.status));
                    return Ok((answer, t.busy));
                }
                Ok(Err(TryError::Connect(e))) => {
                    tracing::debug!(service = %svc.name, instance = %t.inst.id, error = %e, "upstream connect failed");
                    (
                        ErrorKind::Connect,
                        ProxyError::Upstream("upstream connect failed"),
                    )
                }
                Ok(Err(TryError::Reset { .. })) => (
                    ErrorKind::Reset,
                    ProxyError::Upstream("upstream closed the connection"),
                ),
                Ok(Err(TryError::Bad(m))) => (ErrorKind::Reset, ProxyError::Upstream(m)),
                Err(()) => (ErrorKind::Timeout, ProxyError::Timeout),
            };
            svc.end_try(&tries, &mut t, answered, Err(Some(outcome)));
            last_err = Some(err);
            // Nothing was sent after a connect failure; otherwise only idempotent requests
            // go again.
            if !(outcome == ErrorKind::Connect || plan.idempotent) || tries.past_deadline() {
                break;
            }
        }
        Err(Some(last_err.unwrap_or(ProxyError::NoInstance)))
    }

    /// [`Conn::forward`] for a streamed body (`request`: the upstream head): another instance
    /// is tried only while nothing was sent (connect failures), as on the general path. A
    /// client that breaks, stalls or leaves its body is its own fault, never the instance's.
    #[allow(clippy::too_many_arguments)]
    async fn forward_streamed(
        &mut self,
        svc: &Arc<Service>,
        request: &[u8],
        kind: body::Streamed,
        plan: &Plan,
        cfg: &ServiceConfig,
        lcfg: &ServiceConfig,
        start: u64,
    ) -> Result<(Answer, InFlight), Option<ProxyError>> {
        let mut tries = svc.begin_tries(cfg, start);
        let mut last_err = None;
        self.tries_made = 0;
        self.body_open = true;
        let mut upload =
            body::Upload::new(kind, lcfg.limits.max_header_bytes, lcfg.limits.max_headers);
        let limits = body::Limits {
            connect: cfg.timeouts.connect.0,
            max_idle: cfg.timeouts.upstream_idle.0,
            body_read: lcfg.timeouts.body_read.0,
        };
        for attempt in 0..cfg.retries.attempts {
            let Some(mut t) = svc
                .next_try(&mut tries, attempt, cfg, plan.key.as_deref())
                .map_err(Some)?
            else {
                break;
            };
            let try_deadline = t.started + t.timeout.as_nanos() as u64;
            let at = instant_at(try_deadline);
            if self.try_timer.is_elapsed() || self.try_timer.deadline() > at {
                self.try_timer.as_mut().reset(at);
            }
            let result = {
                let attempt_fut = body::try_streamed(
                    &mut self.bufs,
                    &t.inst,
                    request,
                    plan.head_method,
                    plan.close,
                    &mut upload,
                    &mut *self.stream,
                    &mut self.rbuf,
                    &limits,
                );
                tokio::pin!(attempt_fut);
                loop {
                    tokio::select! {
                        biased;
                        r = &mut attempt_fut => break Ok(r),
                        _ = self.try_timer.as_mut() => {
                            if now_nanos() >= try_deadline {
                                break Err(());
                            }
                            self.try_timer.as_mut().reset(at);
                        }
                    }
                }
            };
            let answered = now_nanos();
            self.last_active = answered;
            self.tries_made = attempt + 1;
            self.body_open = !upload.done();
            let (outcome, err) = match result {
                Ok(Ok(answer)) => {
                    svc.end_try(&tries, &mut t, answered, Ok(answer.plan.status));
                    return Ok((answer, t.busy));
                }
                Ok(Err(body::StreamError::Connect(e))) => {
                    tracing::debug!(service = %svc.name, instance = %t.inst.id, error = %e, "upstream connect failed");
                    (
                        ErrorKind::Connect,
                        ProxyError::Upstream("upstream connect failed"),
                    )
                }
                Ok(Err(body::StreamError::Client(e))) => {
                    svc.end_try(&tries, &mut t, answered, Err(None));
                    return Err(Some(e));
                }
                // Waiting for the client's next body bytes when the try ran out: its pause.
                Err(()) if upload.waiting_client => {
                    svc.end_try(&tries, &mut t, answered, Err(None));
                    return Err(Some(ProxyError::RequestTimeout));
                }
                Ok(Err(body::StreamError::Gone)) => {
                    svc.end_try(&tries, &mut t, answered, Err(None));
                    svc.metrics.client_errors.inc();
                    return Err(None);
                }
                Ok(Err(body::StreamError::Upstream(TryError::Bad(m)))) => {
                    (ErrorKind::Reset, ProxyError::Upstream(m))
                }
                Ok(Err(body::StreamError::Upstream(_))) => (
                    ErrorKind::Reset,
                    ProxyError::Upstream("upstream closed the connection"),
                ),
                Err(()) => (ErrorKind::Timeout, ProxyError::Timeout),
            };
            svc.end_try(&tries, &mut t, answered, Err(Some(outcome)));
            last_err = Some(err);
            // Once anything was sent, the body is gone: no other instance can have it.
            if outcome != ErrorKind::Connect || tries.past_deadline() {
                break;
            }
        }
        Err(Some(last_err.unwrap_or(ProxyError::NoInstance)))
    }

    /// Sends the response head (in `self.bufs.out`) and body to the client. The instance stays
    /// counted in flight until the body is through; the upstream connection goes back to the
    /// pool only after a complete, well-delimited body.
    async fn relay(
        &mut self,
        answer: Answer,
        busy: InFlight,
        close: bool,
        read_limit: Duration,
        write_limit: Duration,
    ) -> bool {
        let Answer { mut up, plan } = answer;
        let mut left = match plan.framing {
            Framing::Empty => BodyLeft::Length(0),
            Framing::Length(n) => BodyLeft::Length(n),
            Framing::Chunked => BodyLeft::Chunked(Chunked::default()),
            Framing::Close => BodyLeft::Close,
        };
        self.bufs.ubuf.advance(plan.head_len);
        let hsts = self
            .tls
            .and_then(|_| self.svc.config.load().tls.as_ref().and_then(|t| t.hsts));
        if let Some(age) = hsts {
            // Before the head's closing blank line.
            let at = self.bufs.out.len() - 2;
            let line = format!("strict-transport-security: max-age={}\r\n", age.as_secs());
            self.bufs.out.splice(at..at, line.into_bytes());
        }
        let (mut n, mut done) = match left.take(&self.bufs.ubuf) {
            Ok(x) => x,
            Err(()) => return false,
        };
        // Bytes past the end of the response: the instance broke framing.
        let mut clean = n == self.bufs.ubuf.len();
        if plan.rechunk {
            put_chunk(&mut self.bufs.out, &self.bufs.ubuf[..n]);
        } else {
            self.bufs.out.extend_from_slice(&self.bufs.ubuf[..n]);
        }
        if !write_client(self.stream, &self.bufs.out, write_limit).await {
            return false;
        }
        self.body_bytes += n as u64;
        let streamed = !done;
        while !done {
            self.bufs.ubuf.clear();
            self.bufs.ubuf.reserve(READ_CHUNK);
            match tokio::time::timeout(read_limit, up.read_buf(&mut self.bufs.ubuf)).await {
                Ok(Ok(0)) if matches!(left, BodyLeft::Close) => {
                    if plan.rechunk && !write_client(self.stream, b"0\r\n\r\n", write_limit).await {
                        return false;
                    }
                    break;
                }
                Ok(Ok(k)) if k > 0 => {}
                // The instance failed mid-body: the client cannot be told but by a close.
                _ => return false,
            }
            (n, done) = match left.take(&self.bufs.ubuf) {
                Ok(x) => x,
                Err(()) => return false,
            };
            clean = n == self.bufs.ubuf.len();
            let data = if plan.rechunk {
                self.bufs.out.clear();
                put_chunk(&mut self.bufs.out, &self.bufs.ubuf[..n]);
                &self.bufs.out
            } else {
                &self.bufs.ubuf[..n]
            };
            if !write_client(self.stream, data, write_limit).await {
                return false;
            }
            self.body_bytes += n as u64;
        }
        if streamed {
            self.last_active = now_nanos();
        }
        if plan.reusable && clean {
            busy.inst().idle.put_raw(up);
        }
        drop(busy);
        !close && (plan.framing != Framing::Close || plan.rechunk)
    }
}

/// One try on one instance: a pooled connection (or, if that one turns out closed, a new
/// one), the request written, the response head read.
async fn try_instance(
    bufs: &mut Bufs,
    inst: &Instance,
    request: &[u8],
    plan: &Plan,
    connect_timeout: Duration,
    max_idle: Duration,
    client: Option<&TcpStream>,
) -> Result<Answer, TryError> {
    let mut pooled_ok = true;
    loop {
        // An idle connection that went readable has been closed by the instance or holds
        // stray bytes: it is dropped, never written to (`upstream::reusable`).
        let reused = if pooled_ok {
            inst.idle.pop_raw(max_idle)
        } else {
            None
        };
        let was_reused = reused.is_some();
        let mut up = match reused {
            Some((s, idle)) if !crate::upstream::reusable(&s, idle, plan.idempotent) => continue,
            Some((s, _)) => s,
            None => crate::upstream::connect_tcp(inst.addr, connect_timeout)
                .await
                .map_err(TryError::Connect)?,
        };
        match send_and_read_head(bufs, &mut up, request, plan, client).await {
            Ok(resp) => return Ok(Answer { up, plan: resp }),
            // The instance closed an idle connection just as it was reused: go again once,
            // on a fresh connection.
            Err(TryError::Reset {
                reused_silent: true,
            }) if was_reused && plan.idempotent => pooled_ok = false,
            Err(e) => return Err(e),
        }
    }
}

async fn send_and_read_head(
    bufs: &mut Bufs,
    up: &mut TcpStream,
    request: &[u8],
    plan: &Plan,
    client: Option<&TcpStream>,
) -> Result<RespPlan, TryError> {
    let silent = TryError::Reset {
        reused_silent: true,
    };
    if up.write_all(request).await.is_err() {
        return Err(silent);
    }
    bufs.ubuf.clear();
    loop {
        bufs.ubuf.reserve(READ_CHUNK);
        match up.read_buf(&mut bufs.ubuf).await {
            Ok(0) | Err(_) if bufs.ubuf.is_empty() => return Err(silent),
            Ok(0) | Err(_) => {
                return Err(TryError::Reset {
                    reused_silent: false,
                })
            }
            Ok(_) => {}
        }
        loop {
            match plan_response(&bufs.ubuf, plan.head_method, plan.close, &mut bufs.out) {
                RespParsed::Ready(p) => return Ok(p),
                RespParsed::Partial => break,
                RespParsed::Interim(n) => {
                    // Sent at once (an early hint is worth something only before the answer)
                    // as far as the client's socket takes it without waiting; the rest goes
                    // ahead of the final answer, so the head is never cut.
                    if !bufs.out.is_empty() {
                        // Over TLS they wait for the final answer (the session is busy).
                        let sent = match client {
                            Some(c) if bufs.interim.is_empty() => {
                                c.try_write(&bufs.out).unwrap_or(0)
                            }
                            _ => 0,
                        };
                        bufs.interim.extend_from_slice(&bufs.out[sent..]);
                        bufs.out.clear();
                    }
                    bufs.ubuf.advance(n);
                    if bufs.ubuf.is_empty() {
                        break;
                    }
                }
                RespParsed::Bad(m) => return Err(TryError::Bad(m)),
            }
        }
    }
}

/// The request in `buf` (head of `head_len` bytes, then the whole body) as the general path
/// takes it; `None` if a header does not fit `http`'s types (the general path's own parser
/// then decides).
fn general_request(buf: &[u8], head_len: usize) -> Option<http::Request<bytes::Bytes>> {
    let mut slots = [const { MaybeUninit::<httparse::Header>::uninit() }; MAX_PARSE_HEADERS];
    let mut req = httparse::Request::new(&mut []);
    req.parse_with_uninit_headers(&buf[..head_len], &mut slots)
        .ok()?;
    let mut b = http::Request::builder()
        .method(req.method?)
        .uri(req.path?)
        .version(http::Version::HTTP_11);
    let headers = b.headers_mut()?;
    for h in req.headers.iter() {
        headers.append(
            http::HeaderName::from_bytes(h.name.as_bytes()).ok()?,
            http::HeaderValue::from_bytes(h.value).ok()?,
        );
    }
    b.body(bytes::Bytes::copy_from_slice(&buf[head_len..])).ok()
}

/// Writes a general-path response with HTTP/1.1 framing: its length when known, else
/// chunked; each body frame as it comes (the head goes with the first). Returns whether the
/// connection can take another request.
async fn write_response<S: ClientIo>(
    stream: &mut S,
    resp: http::Response<crate::proxy::ClientBody>,
    head_method: bool,
    close: bool,
    limit: Duration,
    out: &mut Vec<u8>,
) -> bool {
    use http::header::{CONNECTION, CONTENT_LENGTH, TRANSFER_ENCODING};
    use http_body::Body;
    use http_body_util::BodyExt;
    let (parts, mut body) = resp.into_parts();
    let status = parts.status;
    let close = close
        || parts
            .headers
            .get_all(CONNECTION)
            .iter()
            .any(|v| tokens(v.as_bytes()).any(|t| t.eq_ignore_ascii_case(b"close")));
    let no_body = head_method || status.is_informational() || status == 204 || status == 304;
    let len = body.size_hint().exact();
    crate::error::status_line(out, status);
    for (n, v) in &parts.headers {
        // Framing is this connection's (a HEAD or 304 keeps the representation's length).
        if n == CONNECTION || n == TRANSFER_ENCODING || (n == CONTENT_LENGTH && !no_body) {
            continue;
        }
        put(out, n.as_str().as_bytes(), v.as_bytes());
    }
    let chunked = !no_body && len.is_none();
    if chunked {
        put(out, b"transfer-encoding", b"chunked");
    } else if let (false, Some(n)) = (no_body, len) {
        put(out, b"content-length", n.to_string().as_bytes());
    }
    if close {
        put(out, b"connection", b"close");
    }
    out.extend_from_slice(b"\r\n");
    if !no_body {
        while let Some(frame) = body.frame().await {
            let Ok(frame) = frame else {
                // The instance failed mid-body: only a close tells the client.
                return false;
            };
            let Ok(data) = frame.into_data() else {
                continue; // trailers are not relayed
            };
            if data.is_empty() {
                continue;
            }
            if chunked {
                out.extend_from_slice(format!("{:x}\r\n", data.len()).as_bytes());
            }
            out.extend_from_slice(&data);
            if chunked {
                out.extend_from_slice(b"\r\n");
            }
            if !write_client(stream, out, limit).await {
                return false;
            }
            out.clear();
        }
        if chunked {
            out.extend_from_slice(b"0\r\n\r\n");
        }
    }
    drop(body);
    (out.is_empty() || write_client(stream, out, limit).await) && !close
}

/// An idle connection's read: waits for the socket to be readable (plain TCP, holding no
/// buffer meanwhile), then reads into a spare buffer. None: woken without data (spurious).
async fn idle_read<S: ClientIo>(
    stream: &mut S,
    rbuf: &mut BytesMut,
) -> Option<std::io::Result<usize>> {
    if !S::PLAIN {
        return Some(stream.read_buf(rbuf).await);
    }
    if let Err(e) = stream.tcp().readable().await {
        return Some(Err(e));
    }
    if rbuf.capacity() == 0 {
        *rbuf = spare::bytes();
    }
    rbuf.reserve(READ_CHUNK);
    let read = read_now(stream, rbuf);
    // Readiness was stale: park without the buffer again.
    if read.is_none() && rbuf.is_empty() {
        spare::give_bytes(std::mem::take(rbuf));
    }
    read
}

/// Reads what a plain socket has waiting, without waiting (None: nothing yet). Through
/// `poll_read`, which, unlike `try_read`, forgets the socket's readiness after a short read:
/// a drained socket then costs no further syscall (the client watch during a try) until the
/// runtime sees new bytes.
fn read_now<S: ClientIo>(stream: &mut S, rbuf: &mut BytesMut) -> Option<std::io::Result<usize>> {
    let mut cx = Context::from_waker(std::task::Waker::noop());
    match std::future::Future::poll(std::pin::pin!(stream.read_buf(rbuf)), &mut cx) {
        Poll::Ready(r) => Some(r),
        Poll::Pending => None,
    }
}

/// Per-thread spare buffers: idle connections give theirs back and busy ones take them, so
/// memory follows the requests in progress, not the connections open.
mod spare {
    use std::cell::RefCell;

    use bytes::BytesMut;

    /// Spares kept per thread (of each kind); more are freed.
    const KEEP: usize = 64;
    /// Larger buffers are freed rather than kept (a large body grew them).
    const MAX_KEPT: usize = 64 * 1024;

    thread_local! {
        static BYTES: RefCell<Vec<BytesMut>> = const { RefCell::new(Vec::new()) };
        static VECS: RefCell<Vec<Vec<u8>>> = const { RefCell::new(Vec::new()) };
    }

    pub(super) fn bytes() -> BytesMut {
        BYTES.with(|p| p.borrow_mut().pop()).unwrap_or_default()
    }

    pub(super) fn give_bytes(mut b: BytesMut) {
        if (1..=MAX_KEPT).contains(&b.capacity()) {
            b.clear();
            keep(&BYTES, b);
        }
    }

    pub(super) fn vec() -> Vec<u8> {
        VECS.with(|p| p.borrow_mut().pop()).unwrap_or_default()
    }

    pub(super) fn give_vec(mut v: Vec<u8>) {
        if (1..=MAX_KEPT).contains(&v.capacity()) {
            v.clear();
            keep(&VECS, v);
        }
    }

    fn keep<T: 'static>(pool: &'static std::thread::LocalKey<RefCell<Vec<T>>>, item: T) {
        pool.with(|p| {
            let mut p = p.borrow_mut();
            if p.len() < KEEP {
                p.push(item);
            }
        });
    }
}

/// Writes to the client; one that stops reading for the idle timeout is given up on, so it
/// cannot hold an upstream connection and an in-flight slot forever. The timer is only set
/// when the socket buffer is full.
async fn write_client<S: ClientIo>(stream: &mut S, buf: &[u8], limit: Duration) -> bool {
    let rest = if S::PLAIN {
        match stream.tcp().try_write(buf) {
            Ok(n) if n == buf.len() => return true,
            Ok(n) => &buf[n..],
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => buf,
            Err(_) => return false,
        }
    } else {
        buf
    };
    // Flushed: a TLS session may keep records back otherwise. Polled once before the timer
    // is set.
    let mut write = std::pin::pin!(async {
        stream.write_all(rest).await?;
        stream.flush().await
    });
    let first =
        std::future::poll_fn(|cx| Poll::Ready(std::future::Future::poll(write.as_mut(), cx))).await;
    match first {
        Poll::Ready(r) => r.is_ok(),
        Poll::Pending => matches!(tokio::time::timeout(limit, write).await, Ok(Ok(()))),
    }
}

/// Bytes waiting on `s` without waiting for them: `Some(0)` when the peer closed.
pub(crate) fn peek_now(s: &TcpStream) -> Option<usize> {
    let mut b = [MaybeUninit::uninit(); 1];
    let mut buf = ReadBuf::uninit(&mut b);
    let mut cx = Context::from_waker(std::task::Waker::noop());
    match s.poll_peek(&mut cx, &mut buf) {
        Poll::Ready(Ok(n)) => Some(n),
        Poll::Ready(Err(_)) => Some(0),
        Poll::Pending => None,
    }
}

/// A client stream with bytes already read put back in front, for the general path. A
/// client that takes no bytes for `write_limit` while a write waits is disconnected, so a
/// reader that stops cannot hold an instance's response (and its in-flight slot) forever.
pub(crate) struct Rewind<S> {
    pre: BytesMut,
    inner: S,
    write_limit: Duration,
    stalled: Option<Pin<Box<tokio::time::Sleep>>>,
}

impl<S: AsyncRead + AsyncWrite + Unpin> Rewind<S> {
    pub(crate) fn new(pre: BytesMut, inner: S, write_limit: Duration) -> Self {
        Rewind {
            pre,
            inner,
            write_limit,
            stalled: None,
        }
    }

    /// Maps a write's poll result through the stall timer.
    fn watch<T>(
        &mut self,
        r: Poll<std::io::Result<T>>,
        cx: &mut Context<'_>,
    ) -> Poll<std::io::Result<T>> {
        match r {
            Poll::Pending => {
                let limit = self.write_limit;
                if !crate::proxy::stalled(&mut self.stalled, limit, cx) {
                    return Poll::Pending;
                }
                Poll::Ready(Err(std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    "client stopped reading",
                )))
            }
            ready => {
                self.stalled = None;
                ready
            }
        }
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncRead for Rewind<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        if !self.pre.is_empty() {
            let n = self.pre.len().min(buf.remaining());
            buf.put_slice(&self.pre[..n]);
            self.pre.advance(n);
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncWrite for Rewind<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let r = Pin::new(&mut self.inner).poll_write(cx, buf);
        self.watch(r, cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        let r = Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        self.watch(r, cx)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        let r = Pin::new(&mut self.inner).poll_flush(cx);
        self.watch(r, cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// Property tests of the planners and the chunk tracker (they are private to this module).
#[cfg(test)]
#[path = "fuzz/mod.rs"]
mod fuzz;

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::HashKey;
    use shoal_balance::Algorithm;

    /// A wake-up whose try-read finds nothing (readiness left over from bytes another read
    /// took) parks without the read buffer, and the read that drains a socket forgets its
    /// readiness, so waiting again costs no syscall.
    #[tokio::test]
    async fn a_stale_wake_up_parks_without_its_buffer() {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let mut client = TcpStream::connect(l.local_addr().unwrap()).await.unwrap();
        let (mut server, _) = l.accept().await.unwrap();
        use tokio::io::AsyncWriteExt;
        client.write_all(b"GET / HTTP/1.1\r\n\r\n").await.unwrap();
        server.readable().await.unwrap();
        // A short try_read leaves the readiness set.
        let mut b = [0u8; 64];
        assert_eq!(server.try_read(&mut b).unwrap(), 18);
        let mut rbuf = BytesMut::new();
        assert!(idle_read(&mut server, &mut rbuf).await.is_none());
        assert_eq!(rbuf.capacity(), 0, "parked with a buffer");
        // Drained by read_now: no readiness is left behind.
        client.write_all(b"x").await.unwrap();
        server.readable().await.unwrap();
        let mut rbuf = BytesMut::with_capacity(64);
        assert_eq!(read_now(&mut server, &mut rbuf).unwrap().unwrap(), 1);
        let mut cx = Context::from_waker(std::task::Waker::noop());
        assert!(
            server.poll_read_ready(&mut cx).is_pending(),
            "readiness kept"
        );
    }

    fn cfg() -> ServiceConfig {
        ServiceConfig::quick("t", "127.0.0.1:0".parse().unwrap(), Algorithm::RoundRobin)
    }

    fn peer() -> SocketAddr {
        "10.1.2.3:5555".parse().unwrap()
    }

    fn plan(raw: &[u8], cfg: &ServiceConfig) -> (Option<Plan>, String) {
        let mut out = Vec::new();
        let svc = Service::new(cfg.clone());
        match plan_request(raw, &svc, cfg, peer(), b"10.1.2.3", 8080, &mut out, false) {
            Parsed::Ready(p) => (Some(p), String::from_utf8(out).unwrap()),
            Parsed::Partial => (None, "partial".into()),
            Parsed::Handover => (None, "handover".into()),
            Parsed::Reject(e, _) => (None, format!("reject {}", e.status().as_u16())),
            Parsed::Hit { .. } => (None, "hit".into()),
        }
    }

    #[test]
    fn request_head_is_rewritten_for_upstream() {
        let raw = b"GET /a?b HTTP/1.1\r\nHost: example.com\r\nConnection: keep-alive\r\n\
            Keep-Alive: timeout=5\r\nTE: trailers\r\nProxy-Authorization: x\r\n\
            X-Forwarded-For: 1.1.1.1\r\nX-Forwarded-For: 2.2.2.2\r\nX-Forwarded-Proto: https\r\n\
            X-Kept: 1\r\n\r\nrest";
        let (p, out) = plan(raw, &cfg());
        let p = p.unwrap();
        assert_eq!(p.head_len, raw.len() - 4);
        assert!(p.idempotent && !p.close && !p.head_method);
        // Client forwarding headers are dropped (the peer is not a trusted proxy).
        assert_eq!(
            out,
            format!(
                "GET /a?b HTTP/1.1\r\nhost: example.com\r\nX-Kept: 1\r\n\
             x-forwarded-for: 10.1.2.3\r\nx-forwarded-proto: http\r\n\
             x-forwarded-host: example.com\r\nx-forwarded-port: 8080\r\n\
             forwarded: for=10.1.2.3;host=\"example.com\";proto=http\r\nvia: 1.1 shoal\r\n\
             traceparent: {}\r\n\r\n",
                String::from_utf8_lossy(&p.trace)
            )
        );
        let mut trusting = cfg();
        trusting.trusted_proxies = vec!["10.0.0.0/8".parse().unwrap()];
        let (_, out) = plan(raw, &trusting);
        assert!(
            out.contains("x-forwarded-for: 1.1.1.1, 2.2.2.2, 10.1.2.3\r\n"),
            "{out}"
        );
        assert!(out.contains("X-Forwarded-Proto: https\r\n"), "{out}");
    }

    #[test]
    fn unusual_requests_go_to_the_general_path() {
        let c = cfg();
        for raw in [
            &b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"[..],
            b"GET / HTTP/1.0\r\nHost: x\r\n\r\n",
            b"GET http://x/ HTTP/1.1\r\nHost: x\r\n\r\n",
            b"GET / HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: upgrade\r\n\r\n",
            b"POST / HTTP/1.0\r\nHost: x\r\nContent-Length: 65537\r\n\r\n",
            b"GET / HTTP/1.1\r\nHost: x\r\nX-Bad: a\x01b\r\n\r\n",
            b"GET / HTTP/1.1\r\nHost: x\r\nX-Bad : 1\r\n\r\n",
            b"GET /a<b> HTTP/1.1\r\nHost: x\r\n\r\n",
            b"GET /a?q=\"x\" HTTP/1.1\r\nHost: x\r\n\r\n",
            b"GET /a#frag HTTP/1.1\r\nHost: x\r\n\r\n",
            b"GET /caf\xc3\xa9 HTTP/1.1\r\nHost: x\r\n\r\n",
        ] {
            assert_eq!(
                plan(raw, &c).1,
                "handover",
                "{}",
                String::from_utf8_lossy(raw)
            );
        }
        // The hygiene verdicts both paths share are answered here.
        for (raw, status) in [
            (&b"GET / HTTP/1.1\r\n\r\n"[..], 400),
            (b"GET / HTTP/1.1\r\nHost: x\r\nHost: y\r\n\r\n", 400),
            (b"GET / HTTP/1.1\r\nHost: a, b\r\n\r\n", 400),
            (b"GET / HTTP/1.1\r\nHost: \r\n\r\n", 400),
            (b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n", 400),
            (b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: +1\r\n\r\n", 400),
            (b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n", 400),
            (b"CONNECT /x HTTP/1.1\r\nHost: x\r\n\r\n", 405),
        ] {
            assert_eq!(
                plan(raw, &c).1,
                format!("reject {status}"),
                "{}",
                String::from_utf8_lossy(raw)
            );
        }
        // `Connection` options naming other headers are stripped here too; never Host.
        let (p, out) = plan(
            b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close, x-secret, Host\r\nX-Secret: 1\r\n\r\n",
            &c,
        );
        assert!(p.unwrap().close);
        assert!(!out.to_ascii_lowercase().contains("x-secret"), "{out}");
        assert!(out.contains("host: x\r\n"), "{out}");
        let mut small = cfg();
        small.limits.max_headers = 2;
        let (_, out) = plan(b"GET / HTTP/1.1\r\nHost: x\r\nA: 1\r\nB: 2\r\n\r\n", &small);
        assert_eq!(out, "reject 431");
        small.limits.max_request_line = 4;
        assert_eq!(
            plan(b"GET /abcd HTTP/1.1\r\nHost: x\r\n\r\n", &small).1,
            "reject 414"
        );
        // An endless head is handed over once past the limits, for 414/431 there.
        let mut endless = b"GET / HTTP/1.1\r\nHost: x\r\n".to_vec();
        assert_eq!(plan(&endless, &c).1, "partial");
        endless.extend(std::iter::repeat_n(b'a', 80 * 1024));
        assert_eq!(plan(&endless, &c).1, "handover");
    }

    #[test]
    fn expect_continue_is_met_here() {
        let (p, out) = plan(
            b"POST / HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\nContent-Length: 1\r\n\r\n",
            &cfg(),
        );
        assert!(p.unwrap().expect);
        assert!(!out.to_ascii_lowercase().contains("expect"), "{out}");
        // Nothing to wait for without a body.
        let (p, _) = plan(
            b"GET / HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\n\r\n",
            &cfg(),
        );
        assert!(!p.unwrap().expect);
    }

    #[test]
    fn long_and_chunked_bodies_stream() {
        let (p, out) = plan(
            b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello",
            &cfg(),
        );
        let p = p.unwrap();
        assert_eq!((p.body_len, p.stream), (0, Some(body::Streamed::Chunked)));
        // Framed by shoal: one chunked coding, no client Content-Length.
        assert_eq!(
            out.matches("transfer-encoding: chunked\r\n").count(),
            1,
            "{out}"
        );
        assert!(
            !out.to_ascii_lowercase().contains("content-length"),
            "{out}"
        );
        let (p, out) = plan(
            b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 65537\r\n\r\n",
            &cfg(),
        );
        let p = p.unwrap();
        assert_eq!(
            (p.body_len, p.stream),
            (0, Some(body::Streamed::Length(65537)))
        );
        assert!(out.contains("Content-Length: 65537\r\n"), "{out}");
        assert!(!out.contains("transfer-encoding"), "{out}");
        let (p, _) = plan(
            b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 65536\r\n\r\n",
            &cfg(),
        );
        assert_eq!(p.unwrap().stream, None);
    }

    #[test]
    fn request_flags_and_hash_keys() {
        let (p, _) = plan(
            b"POST /x HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nConnection: close\r\n\r\nhello",
            &cfg(),
        );
        let p = p.unwrap();
        assert_eq!(p.body_len, 5);
        assert!(p.close && !p.idempotent);
        assert!(p.key.is_none());
        let mut c = cfg();
        c.balance = Algorithm::ConsistentHash;
        let (p, _) = plan(b"HEAD / HTTP/1.1\r\nHost: x\r\n\r\n", &c);
        let p = p.unwrap();
        assert!(p.head_method);
        assert_eq!(p.key.as_deref(), Some(&[10, 1, 2, 3][..]));
        c.hash_key = HashKey::Header(http::HeaderName::from_static("x-user"));
        let (p, _) = plan(
            b"GET / HTTP/1.1\r\nHost: x\r\nX-User: ann\r\nX-User: bob\r\n\r\n",
            &c,
        );
        assert_eq!(p.unwrap().key.as_deref(), Some(&b"ann"[..]));
        // Any header may be the key, also one the fast path rewrites.
        c.hash_key = HashKey::Header(http::HeaderName::from_static("host"));
        let (p, _) = plan(b"GET / HTTP/1.1\r\nHost: shop\r\n\r\n", &c);
        assert_eq!(p.unwrap().key.as_deref(), Some(&b"shop"[..]));
        // Allowed target characters stay on the fast path.
        let (p, out) = plan(
            b"GET /a-b_c.d~e/%20?x=1&y=[2]:@!$'()*+,; HTTP/1.1\r\nHost: x\r\n\r\n",
            &cfg(),
        );
        assert!(p.is_some(), "{out}");
    }

    fn resp(raw: &[u8], head: bool) -> (RespParsed, String) {
        let mut out = Vec::new();
        let r = plan_response(raw, head, false, &mut out);
        (r, String::from_utf8(out).unwrap())
    }

    #[test]
    fn response_framing() {
        let (r, out) = resp(
            b"HTTP/1.1 200 OK\r\nContent-Length: 6\r\nX-A: 1\r\n\r\nhello\n",
            false,
        );
        let RespParsed::Ready(p) = r else {
            panic!("{r:?}")
        };
        assert_eq!(
            (p.status, p.framing, p.reusable),
            (200, Framing::Length(6), true)
        );
        assert_eq!(
            out,
            "HTTP/1.1 200 OK\r\nContent-Length: 6\r\nX-A: 1\r\nvia: 1.1 shoal\r\n\r\n"
        );
        // Chunked wins over a length; hop-by-hop and Connection-named headers go.
        let (r, out) = resp(
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nContent-Length: 3\r\n\
              Connection: close, x-hop\r\nX-Hop: 1\r\nKeep-Alive: 5\r\n\r\n",
            false,
        );
        let RespParsed::Ready(p) = r else {
            panic!("{r:?}")
        };
        assert_eq!((p.framing, p.reusable), (Framing::Chunked, false));
        assert_eq!(
            out,
            "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nvia: 1.1 shoal\r\n\r\n"
        );
        // A coding that does not end in chunked: delimited by close, length ignored.
        let (r, out) = resp(
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\nContent-Length: 3\r\n\r\n",
            false,
        );
        let RespParsed::Ready(p) = r else {
            panic!("{r:?}")
        };
        assert_eq!((p.framing, p.reusable), (Framing::Close, false));
        assert!(out.contains("Transfer-Encoding: gzip") && !out.contains("Content-Length"));
        assert!(matches!(
            resp(
                b"HTTP/1.0 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n",
                false
            )
            .0,
            RespParsed::Bad(_)
        ));
        // Until close: chunked to the client, whose connection outlives it.
        let (r, out) = resp(b"HTTP/1.1 200 OK\r\nX-A: 1\r\n\r\n", false);
        let RespParsed::Ready(p) = r else {
            panic!("{r:?}")
        };
        assert_eq!(
            (p.framing, p.reusable, p.rechunk),
            (Framing::Close, false, true)
        );
        assert!(out.contains("transfer-encoding: chunked\r\n"), "{out}");
        assert!(!out.contains("connection: close\r\n"), "{out}");
        for (raw, head) in [
            (&b"HTTP/1.1 200 OK\r\nContent-Length: 6\r\n\r\n"[..], true),
            (b"HTTP/1.1 204 No Content\r\n\r\n", false),
            (
                b"HTTP/1.1 304 Not Modified\r\nContent-Length: 9\r\n\r\n",
                false,
            ),
        ] {
            let RespParsed::Ready(p) = resp(raw, head).0 else {
                panic!()
            };
            assert_eq!((p.framing, p.reusable), (Framing::Empty, true));
        }
        let RespParsed::Ready(p) = resp(b"HTTP/1.0 200 OK\r\nContent-Length: 1\r\n\r\n", false).0
        else {
            panic!()
        };
        assert!(!p.reusable);
        assert!(matches!(
            resp(
                b"HTTP/1.1 103 Early Hints\r\nLink: x\r\n\r\nHTTP/1.1 200",
                false
            )
            .0,
            RespParsed::Interim(37)
        ));
        assert!(matches!(
            resp(b"HTTP/1.1 200 OK\r\n", false).0,
            RespParsed::Partial
        ));
        for bad in [
            &b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n"[..],
            b"HTTP/1.1 200 OK\r\nContent-Length: x\r\n\r\n",
            b"HTTP/1.1 101 Switching Protocols\r\n\r\n",
            b"nonsense\r\n\r\n",
        ] {
            assert!(matches!(resp(bad, false).0, RespParsed::Bad(_)));
        }
    }

    #[test]
    fn chunked_end_is_found_however_the_bytes_are_split() {
        let body = b"5;ext=1\r\nhello\r\n1A\r\nabcdefghijklmnopqrstuvwxyz\r\n0\r\nX-T: 1\r\n\r\n";
        let mut with_extra = body.to_vec();
        with_extra.extend_from_slice(b"HTTP/1.1 200");
        for split in 0..with_extra.len() {
            let mut c = Chunked::default();
            let (a, b) = with_extra.split_at(split);
            let end = match c.feed(a).unwrap() {
                Some(n) => n,
                None => split + c.feed(b).unwrap().expect("end found"),
            };
            assert_eq!(end, body.len(), "split at {split}");
        }
        for bad in [
            &b"x\r\n"[..],
            b"5\r\nhelloXY",
            b"5\n",
            b"0\r\n\r\r",
            b"\r\n",
            b" 5\r\n",
            b";x\r\n",
            b"0\r\n\n",
            b"0\r\nX-T: 1\n\r\n",
            b"5 x\r\n",
        ] {
            assert!(Chunked::default().feed(bad).is_err(), "{bad:?}");
        }
        let mut c = Chunked::default();
        assert_eq!(c.feed(b"0\r\n\r\n").unwrap(), Some(5));
    }

    #[test]
    fn error_responses_match_the_general_path() {
        let mut out = Vec::new();
        ProxyError::NoInstance.write(&mut out, false);
        assert_eq!(
            String::from_utf8(out.clone()).unwrap(),
            "HTTP/1.1 503 Service Unavailable\r\ncontent-type: text/plain; charset=utf-8\r\n\
             content-length: 22\r\n\r\nno instance available\n"
        );
        ProxyError::Timeout.write(&mut out, true);
        assert!(String::from_utf8(out)
            .unwrap()
            .contains("connection: close\r\n"));
    }
}
