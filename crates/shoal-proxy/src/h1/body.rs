//! Request bodies the fast path streams rather than reads whole: chunked ones and those over
//! [`crate::proxy::REPLAY_LIMIT`] (or past the body memory budget).
//!
//! The body goes upstream as it arrives, through one bounded buffer, and the client connection
//! carries on with its next request afterwards: framing is decoded here, so the end of the body
//! (and the start of a pipelined request) is known exactly. A chunked body is re-framed — chunk
//! extensions dropped, trailers checked and filtered — so the instance never sees the client's
//! own chunk syntax (one parser decides where the body ends, not two). A streamed body cannot
//! be replayed: after a connect failure (nothing sent) the next instance is tried, after that
//! none, as on the general path.

use std::future::Future;
use std::pin::pin;
use std::task::Poll;
use std::time::Duration;

use bytes::{Buf, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use super::{plan_response, Answer, Bufs, RespParsed, RespPlan, TryError, PIPELINE_LIMIT};
use crate::hygiene::{classify, Name};
use crate::pool::Instance;
use crate::proxy::ProxyError;

/// Client bytes read at once while a body streams.
const BODY_CHUNK: usize = 16 * 1024;
/// Chunk-extension bytes accepted per body (ignored and not forwarded; hyper's bound).
const MAX_CHUNK_EXT: usize = 16 * 1024;
/// Largest chunk size accepted (the response tracker's bound too).
const MAX_CHUNK: u64 = 1 << 56;

/// How a streamed request body is delimited.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Streamed {
    Length(u64),
    Chunked,
}

/// A streamed request body on its way upstream.
pub(super) struct Upload {
    framing: Framing,
    /// Bytes for the instance not yet written: the request head, re-framed chunks.
    buf: Vec<u8>,
    /// The last wait was for the client's body bytes (a try timeout then is the client's).
    pub(super) waiting_client: bool,
}

enum Framing {
    Length(u64),
    Chunked(Box<Decoder>),
}

impl Upload {
    /// `max_trailer_bytes` and `max_trailers`: the listener's header limits, for trailers.
    pub(super) fn new(kind: Streamed, max_trailer_bytes: usize, max_trailers: usize) -> Self {
        Upload {
            framing: match kind {
                Streamed::Length(n) => Framing::Length(n),
                Streamed::Chunked => {
                    Framing::Chunked(Box::new(Decoder::new(max_trailer_bytes, max_trailers)))
                }
            },
            buf: Vec::new(),
            waiting_client: false,
        }
    }

    /// Takes the body bytes at the front of `rbuf`: chunked ones are decoded into `buf`, a
    /// length-delimited body's are left in `rbuf` and counted by [`Upload::direct`].
    fn feed(&mut self, rbuf: &mut BytesMut) -> Result<(), ProxyError> {
        if let Framing::Chunked(d) = &mut self.framing {
            let (used, _) = d
                .decode(rbuf, &mut self.buf)
                .map_err(ProxyError::BodyFault)?;
            rbuf.advance(used);
        }
        Ok(())
    }

    /// How many bytes at the front of `rbuf` are body bytes to write as they are.
    fn direct(&self, rbuf: &BytesMut) -> usize {
        match self.framing {
            Framing::Length(n) => n.min(rbuf.len() as u64) as usize,
            Framing::Chunked(_) => 0,
        }
    }

    fn sent_direct(&mut self, k: usize) {
        if let Framing::Length(n) = &mut self.framing {
            *n -= k as u64;
        }
    }

    /// The body is through to the instance.
    pub(super) fn done(&self) -> bool {
        self.buf.is_empty()
            && match &self.framing {
                Framing::Length(n) => *n == 0,
                Framing::Chunked(d) => d.state == State::Done,
            }
    }
}

/// Why a streamed try failed.
pub(super) enum StreamError {
    /// Nothing was sent: the next instance may be tried.
    Connect(std::io::Error),
    /// The client broke or stalled its body (400/408); nothing blamed on the instance.
    Client(ProxyError),
    /// The client went away.
    Gone,
    /// The instance failed once the request had started.
    Upstream(TryError),
}

/// Decodes a chunked request body and writes it re-framed, fed the bytes as they arrive.
/// As strict as the response tracker: CRLF only, a hex size on every size line.
pub(super) struct Decoder {
    state: State,
    size: u64,
    ext: usize,
    /// The trailer section as received, up to the listener's header limits.
    trailers: Vec<u8>,
    trailer_lines: usize,
    max_trailer_bytes: usize,
    max_trailers: usize,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    SizeStart,
    Size,
    SizeWs,
    Ext,
    SizeLf,
    Data,
    DataCr,
    DataLf,
    LineStart,
    Trailer,
    TrailerLf,
    EndLf,
    Done,
}

impl Decoder {
    pub(super) fn new(max_trailer_bytes: usize, max_trailers: usize) -> Self {
        Decoder {
            state: State::SizeStart,
            size: 0,
            ext: 0,
            trailers: Vec::new(),
            trailer_lines: 0,
            max_trailer_bytes,
            max_trailers,
        }
    }

    /// Consumes body bytes from `data`, appending them chunked to `out`: `(used, done)`.
    /// Bytes after the body's end are left alone (a pipelined request).
    pub(super) fn decode(
        &mut self,
        data: &[u8],
        out: &mut Vec<u8>,
    ) -> Result<(usize, bool), &'static str> {
        use State::*;
        const BAD: &str = "malformed chunked request body";
        let mut i = 0;
        while i < data.len() {
            let b = data[i];
            self.state = match (self.state, b) {
                (Done, _) => return Ok((i, true)),
                (SizeStart | Size, b'0'..=b'9' | b'a'..=b'f' | b'A'..=b'F') => {
                    let d = (b as char).to_digit(16).unwrap_or(0) as u64;
                    self.size = self.size.checked_mul(16).ok_or(BAD)? + d;
                    if self.size > MAX_CHUNK {
                        return Err("request chunk size too large");
                    }
                    Size
                }
                (Size | SizeWs, b' ' | b'\t') => SizeWs,
                (Size | SizeWs, b';') => Ext,
                (Size | SizeWs | Ext, b'\r') => SizeLf,
                (Ext, b'\n') => return Err(BAD),
                (Ext, _) => {
                    self.ext += 1;
                    if self.ext > MAX_CHUNK_EXT {
                        return Err("request chunk extensions too long");
                    }
                    Ext
                }
                (SizeLf, b'\n') if self.size == 0 => LineStart,
                (SizeLf, b'\n') => {
                    out.extend_from_slice(format!("{:x}\r\n", self.size).as_bytes());
                    Data
                }
                (Data, _) => {
                    let take = self.size.min((data.len() - i) as u64) as usize;
                    out.extend_from_slice(&data[i..i + take]);
                    self.size -= take as u64;
                    i += take;
                    if self.size == 0 {
                        self.state = DataCr;
                    }
                    continue;
                }
                (DataCr, b'\r') => DataLf,
                (DataLf, b'\n') => {
                    out.extend_from_slice(b"\r\n");
                    SizeStart
                }
                (LineStart, b'\r') => EndLf,
                (LineStart | Trailer, b'\n') => return Err(BAD),
                (LineStart | Trailer, _) if b != b'\r' => {
                    self.trailers.push(b);
                    if self.trailers.len() > self.max_trailer_bytes {
                        return Err("request trailers too large");
                    }
                    Trailer
                }
                (Trailer, b'\r') => TrailerLf,
                (TrailerLf, b'\n') => {
                    self.trailers.extend_from_slice(b"\r\n");
                    self.trailer_lines += 1;
                    if self.trailer_lines > self.max_trailers {
                        return Err("request trailers too large");
                    }
                    LineStart
                }
                (EndLf, b'\n') => {
                    self.finish(out)?;
                    self.state = Done;
                    return Ok((i + 1, true));
                }
                _ => return Err(BAD),
            };
            i += 1;
        }
        Ok((i, self.state == Done))
    }

    /// The last chunk and the trailer fields that may go on (RFC 9110 §6.5.1).
    fn finish(&mut self, out: &mut Vec<u8>) -> Result<(), &'static str> {
        out.extend_from_slice(b"0\r\n");
        if self.trailer_lines > 0 {
            self.trailers.extend_from_slice(b"\r\n");
            let mut slots = vec![httparse::EMPTY_HEADER; self.trailer_lines];
            match httparse::parse_headers(&self.trailers, &mut slots) {
                Ok(httparse::Status::Complete(_)) => {}
                _ => return Err("malformed request trailers"),
            }
            for h in slots.iter().filter(|h| !h.name.is_empty()) {
                if trailer_allowed(h.name.as_bytes()) {
                    super::put(out, h.name.as_bytes(), h.value);
                }
            }
        }
        out.extend_from_slice(b"\r\n");
        Ok(())
    }
}

/// Whether a request trailer field may be forwarded: not framing, routing, hop-by-hop or
/// forwarding information, authentication, request modifiers or content metadata — fields an
/// instance could act on as if they had been in the head (RFC 9110 §6.5.1).
fn trailer_allowed(name: &[u8]) -> bool {
    const DENY: &[&str] = &[
        "authorization",
        "cookie",
        "set-cookie",
        "cache-control",
        "pragma",
        "max-forwards",
        "range",
        "if-match",
        "if-none-match",
        "if-modified-since",
        "if-unmodified-since",
        "if-range",
        "content-type",
        "content-encoding",
        "content-range",
        "content-location",
        "content-language",
        "via",
        "date",
        "age",
        "expires",
        "location",
        "vary",
        "www-authenticate",
    ];
    classify(name) == Name::Other
        && !name.contains(&b'_')
        && !DENY.iter().any(|d| name.eq_ignore_ascii_case(d.as_bytes()))
}

/// How long, and for how many bytes, a closing connection still reads an unfinished body.
const LINGER: Duration = Duration::from_secs(2);
const LINGER_BYTES: usize = 4 << 20;

/// Closes a client connection whose request body was not read to its end: the answer is
/// flushed and the write side shut first, then what the client still sends is read and
/// dropped for a moment (NGINX's lingering close). Closing with unread bytes would make the
/// kernel reset the connection, which can destroy the answer before the client reads it.
pub(super) async fn linger<C: AsyncRead + AsyncWrite + Unpin>(client: &mut C) {
    if client.shutdown().await.is_err() {
        return;
    }
    let deadline = tokio::time::Instant::now() + LINGER;
    let mut sink = vec![0u8; BODY_CHUNK];
    let mut left = LINGER_BYTES;
    while left > 0 {
        match tokio::time::timeout_at(deadline, client.read(&mut sink)).await {
            Ok(Ok(n)) if n > 0 => left = left.saturating_sub(n),
            _ => return,
        }
    }
}

/// Timeouts of a streamed try.
pub(super) struct Limits {
    pub connect: Duration,
    pub max_idle: Duration,
    /// Longest pause between two reads of the client's body (→ 408).
    pub body_read: Duration,
}

/// One try with a streamed body: a connection (an idle one that is still open, else a new
/// one), the head and the body written as the client sends it, the response head read. An
/// instance that answers before the body is through is relayed at once (the rest of the body
/// is not sent; the client connection closes after the answer). `close`: the client asked to
/// close.
#[allow(clippy::too_many_arguments)]
pub(super) async fn try_streamed<C: AsyncRead + Unpin>(
    bufs: &mut Bufs,
    inst: &Instance,
    head: &[u8],
    head_method: bool,
    close: bool,
    body: &mut Upload,
    client: &mut C,
    rbuf: &mut BytesMut,
    limits: &Limits,
) -> Result<Answer, StreamError> {
    let mut up = loop {
        match inst.idle.pop_raw(limits.max_idle) {
            // A real peek: a streamed body cannot be sent again.
            Some((s, _)) if !crate::upstream::alive(&s) => continue,
            Some((s, _)) => break s,
            None => {
                break crate::upstream::connect_tcp(inst.addr, limits.connect)
                    .await
                    .map_err(StreamError::Connect)?
            }
        }
    };
    let reset = || {
        StreamError::Upstream(TryError::Reset {
            reused_silent: false,
        })
    };
    // The head goes out with whatever of the body came with it: one write for small bodies.
    body.buf.clear();
    body.buf.extend_from_slice(head);
    body.feed(rbuf).map_err(StreamError::Client)?;
    let k = body.direct(rbuf);
    body.buf.extend_from_slice(&rbuf[..k]);
    rbuf.advance(k);
    body.sent_direct(k);
    bufs.ubuf.clear();
    // The instance said something before the body was through (even a head still partial):
    // whatever it answers, its connection is not reused, as it may not have read the body.
    let mut spoke_early = false;
    let early = loop {
        // Send what is queued, then body bytes straight from the read buffer; anything the
        // instance says meanwhile is read (an early answer, an interim response, a close).
        let (n, spoke) = if !body.buf.is_empty() {
            let r = write_watching(&mut up, &body.buf, &mut bufs.ubuf).await;
            let (n, spoke) = r.map_err(|_| reset())?;
            body.buf.drain(..n);
            (n, spoke)
        } else {
            let k = body.direct(rbuf);
            let r = write_watching(&mut up, &rbuf[..k], &mut bufs.ubuf).await;
            let (n, spoke) = r.map_err(|_| reset())?;
            rbuf.advance(n);
            body.sent_direct(n);
            (n, spoke)
        };
        spoke_early |= spoke && !body.done();
        if spoke && !body.done() {
            // An answer before the body is through: the client connection cannot go on.
            if let Some(p) = take_heads(bufs, head_method, true)? {
                break Some(p);
            }
            continue;
        }
        if n > 0 && (!body.buf.is_empty() || body.direct(rbuf) > 0) {
            continue;
        }
        if body.done() {
            break None;
        }
        rbuf.reserve(BODY_CHUNK);
        bufs.ubuf.reserve(super::READ_CHUNK);
        body.waiting_client = true;
        let read = tokio::select! {
            biased;
            r = up.read_buf(&mut bufs.ubuf) => {
                body.waiting_client = false;
                match r {
                    Ok(n) if n > 0 => {
                        spoke_early = true;
                        if let Some(p) = take_heads(bufs, head_method, true)? {
                            break Some(p);
                        }
                        continue;
                    }
                    _ => return Err(reset()),
                }
            }
            r = tokio::time::timeout(limits.body_read, client.read_buf(rbuf)) => r,
        };
        body.waiting_client = false;
        match read {
            Err(_) => return Err(StreamError::Client(ProxyError::RequestTimeout)),
            Ok(Ok(n)) if n > 0 => body.feed(rbuf).map_err(StreamError::Client)?,
            _ => return Err(StreamError::Gone),
        }
    };
    if let Some(mut p) = early {
        // The request is unfinished on this connection: neither side can go on with it.
        p.reusable = false;
        return Ok(Answer { up, plan: p });
    }
    loop {
        if let Some(mut p) = take_heads(bufs, head_method, close)? {
            p.reusable &= !spoke_early;
            return Ok(Answer { up, plan: p });
        }
        bufs.ubuf.reserve(super::READ_CHUNK);
        tokio::select! {
            biased;
            r = up.read_buf(&mut bufs.ubuf) => match r {
                Ok(n) if n > 0 => {}
                _ => return Err(reset()),
            },
            // A client that hangs up stops its request (a pipelined next request is only
            // buffered, up to a bound).
            r = client.read_buf(rbuf), if rbuf.len() < PIPELINE_LIMIT => match r {
                Ok(n) if n > 0 => {}
                _ => return Err(StreamError::Gone),
            },
        }
    }
}

/// The final response head at the front of `bufs.ubuf`, if it is all there; interim
/// responses before it are set aside for the client (sent ahead of the final answer).
fn take_heads(
    bufs: &mut Bufs,
    head_method: bool,
    close: bool,
) -> Result<Option<RespPlan>, StreamError> {
    while !bufs.ubuf.is_empty() {
        match plan_response(&bufs.ubuf, head_method, close, &mut bufs.out) {
            RespParsed::Ready(p) => return Ok(Some(p)),
            RespParsed::Partial => break,
            RespParsed::Interim(n) => {
                bufs.interim.extend_from_slice(&bufs.out);
                bufs.out.clear();
                bufs.ubuf.advance(n);
            }
            RespParsed::Bad(m) => return Err(StreamError::Upstream(TryError::Bad(m))),
        }
    }
    Ok(None)
}

/// Writes all of `data` to `up` unless `up` has something to say first (bytes appended to
/// `ubuf`): `(written, spoke)`. A close or an error from `up` is an error.
async fn write_watching<U: AsyncRead + AsyncWrite + Unpin>(
    up: &mut U,
    data: &[u8],
    ubuf: &mut BytesMut,
) -> std::io::Result<(usize, bool)> {
    let mut off = 0;
    std::future::poll_fn(|cx| loop {
        ubuf.reserve(super::READ_CHUNK);
        match pin!(up.read_buf(&mut *ubuf)).poll(cx) {
            Poll::Ready(Ok(0)) => {
                return Poll::Ready(Err(std::io::ErrorKind::UnexpectedEof.into()))
            }
            Poll::Ready(Ok(_)) => return Poll::Ready(Ok((off, true))),
            Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
            Poll::Pending => {}
        }
        if off == data.len() {
            return Poll::Ready(Ok((off, false)));
        }
        match pin!(up.write(&data[off..])).poll(cx) {
            Poll::Ready(Ok(0)) => return Poll::Ready(Err(std::io::ErrorKind::WriteZero.into())),
            Poll::Ready(Ok(n)) => off += n,
            Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
            Poll::Pending => return Poll::Pending,
        }
    })
    .await
}

#[cfg(test)]
mod tests {
    use super::*;

    fn decode_all(input: &[u8]) -> Result<(Vec<u8>, usize), &'static str> {
        let mut d = Decoder::new(1024, 4);
        let mut out = Vec::new();
        match d.decode(input, &mut out)? {
            (n, true) => Ok((out, n)),
            (_, false) => Err("unfinished"),
        }
    }

    #[test]
    fn chunks_are_reframed_however_the_bytes_are_split() {
        let body = b"5;name=\"v\"\r\nhello\r\n1A \t;x\r\nabcdefghijklmnopqrstuvwxyz\r\n\
            0\r\nX-Sum: 1\r\nContent-Length: 3\r\nHost: evil\r\nAuthorization: x\r\n\r\n";
        let want = b"5\r\nhello\r\n1a\r\nabcdefghijklmnopqrstuvwxyz\r\n0\r\nX-Sum: 1\r\n\r\n";
        let mut with_next = body.to_vec();
        with_next.extend_from_slice(b"GET / HTTP/1.1\r\n");
        for split in 0..with_next.len() {
            let mut d = Decoder::new(1024, 8);
            let mut out = Vec::new();
            let (a, b) = with_next.split_at(split);
            let (n, done) = d.decode(a, &mut out).unwrap();
            let end = if done {
                n
            } else {
                assert_eq!(n, a.len(), "split at {split}: all taken");
                let (m, done) = d.decode(b, &mut out).unwrap();
                assert!(done, "split at {split}");
                split + m
            };
            assert_eq!(end, body.len(), "split at {split}");
            assert_eq!(
                String::from_utf8_lossy(&out),
                String::from_utf8_lossy(want),
                "split at {split}"
            );
        }
    }

    #[test]
    fn extensions_and_trailers_are_bounded() {
        assert!(decode_all(b"0\r\n\r\n").is_ok());
        let mut long_ext = b"1;".to_vec();
        long_ext.extend(std::iter::repeat_n(b'a', MAX_CHUNK_EXT + 1));
        assert!(decode_all(&long_ext).is_err());
        // Four trailer lines pass, five do not; nor 1 KiB of trailers.
        assert!(decode_all(b"0\r\nA: 1\r\nB: 2\r\nC: 3\r\nD: 4\r\n\r\n").is_ok());
        assert!(decode_all(b"0\r\nA: 1\r\nB: 2\r\nC: 3\r\nD: 4\r\nE: 5\r\n\r\n").is_err());
        let mut big = b"0\r\nA: ".to_vec();
        big.extend(std::iter::repeat_n(b'a', 1100));
        big.extend_from_slice(b"\r\n\r\n");
        assert!(decode_all(&big).is_err());
        // A trailer line that is not a field.
        assert!(decode_all(b"0\r\nnot a field\r\n\r\n").is_err());
        assert!(decode_all(b"0\r\nA : 1\r\n\r\n").is_err());
        // Forbidden trailer fields are dropped, others kept.
        let mut d = Decoder::new(1024, 8);
        let mut out = Vec::new();
        let r = d.decode(
            b"0\r\nTransfer-Encoding: chunked\r\nTrailer: x\r\nX_Under: 1\r\nCookie: a\r\n\
              X-Forwarded-For: 1.2.3.4\r\nChecksum: abc\r\n\r\n",
            &mut out,
        );
        assert!(r.unwrap().1);
        assert_eq!(out, b"0\r\nChecksum: abc\r\n\r\n");
    }
}
