//! gRPC over the general path: calls are recognised by `content-type: application/grpc*`;
//! shoal's own errors become trailers-only answers (HTTP 200 with `grpc-status` and
//! `grpc-message`, never an HTML or text page a gRPC client cannot read), `grpc-timeout` is
//! the call's deadline, and statuses are counted. Pure helpers; the proxy applies them.

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderValue};
use http::Response;
use http_body_util::{Either, Full};
use std::time::Duration;

use crate::config::{Protocol, ServiceConfig};
use crate::error::ProxyError;
use crate::proxy::ClientBody;

pub const OK: u32 = 0;
pub const INTERNAL: u32 = 13;
pub const UNAVAILABLE: u32 = 14;
pub const DEADLINE_EXCEEDED: u32 = 4;
pub const UNIMPLEMENTED: u32 = 12;
pub const RESOURCE_EXHAUSTED: u32 = 8;

/// The canonical status names, by code.
pub const NAMES: [&str; 17] = [
    "OK",
    "CANCELLED",
    "UNKNOWN",
    "INVALID_ARGUMENT",
    "DEADLINE_EXCEEDED",
    "NOT_FOUND",
    "ALREADY_EXISTS",
    "PERMISSION_DENIED",
    "RESOURCE_EXHAUSTED",
    "FAILED_PRECONDITION",
    "ABORTED",
    "OUT_OF_RANGE",
    "UNIMPLEMENTED",
    "INTERNAL",
    "UNAVAILABLE",
    "DATA_LOSS",
    "UNAUTHENTICATED",
];

/// A gRPC call (not gRPC-Web, whose framing differs).
pub fn is_grpc(h: &HeaderMap) -> bool {
    h.get(header::CONTENT_TYPE).is_some_and(|v| {
        let v = v.as_bytes();
        v.len() >= 16
            && v[..16].eq_ignore_ascii_case(b"application/grpc")
            && !v[16..].starts_with(b"-web")
    })
}

/// A gRPC-Web call (`application/grpc-web[+proto]`, or `-text` for base64 bodies): shoal
/// translates it to gRPC for the instance and the answer back, trailers as the final frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Web {
    pub text: bool,
    /// The content type's suffix (`+proto`, `+json`), kept on both sides.
    pub suffix: String,
}

/// The gRPC-Web mode of a request, if it is one.
pub fn web(h: &HeaderMap) -> Option<Web> {
    let v = h.get(header::CONTENT_TYPE)?.to_str().ok()?;
    let lower = v.to_ascii_lowercase();
    let rest = lower.strip_prefix("application/grpc-web")?;
    let (text, suffix) = match rest.strip_prefix("-text") {
        Some(r) => (true, r),
        None => (false, rest),
    };
    if !(suffix.is_empty() || suffix.starts_with('+')) {
        return None;
    }
    Some(Web {
        text,
        suffix: suffix.to_string(),
    })
}

impl Web {
    /// The content type of the gRPC request to the instance.
    pub fn upstream_type(&self) -> HeaderValue {
        HeaderValue::from_str(&format!("application/grpc{}", self.suffix))
            .unwrap_or(HeaderValue::from_static("application/grpc"))
    }

    /// The content type of the answer to the client.
    pub fn client_type(&self) -> HeaderValue {
        let t = if self.text { "-text" } else { "" };
        HeaderValue::from_str(&format!("application/grpc-web{t}{}", self.suffix))
            .unwrap_or(HeaderValue::from_static("application/grpc-web"))
    }

    /// The request body as gRPC: base64 decoded in text mode.
    pub fn decode_request(&self, body: Bytes) -> Option<Bytes> {
        if !self.text {
            return Some(body);
        }
        use base64::Engine;
        // Concatenated padded segments are allowed: decode quad by quad groups.
        let clean: Vec<u8> = body
            .iter()
            .copied()
            .filter(|b| !b.is_ascii_whitespace())
            .collect();
        let mut out = Vec::with_capacity(clean.len() * 3 / 4);
        for seg in clean.split_inclusive(|b| *b == b'=') {
            if seg.iter().all(|b| *b == b'=') {
                continue;
            }
            let seg: Vec<u8> = seg.to_vec();
            let padded = {
                let mut s = seg.clone();
                while s.len() % 4 != 0 && s.last() == Some(&b'=') {
                    s.push(b'=');
                }
                s
            };
            out.extend(
                base64::engine::general_purpose::STANDARD
                    .decode(&padded)
                    .ok()?,
            );
        }
        Some(Bytes::from(out))
    }
}

/// Encodes an answer's frames for a gRPC-Web client: data as it comes (base64 in text mode,
/// in multiples of 3 bytes so no padding lands mid-stream), trailers as a frame flagged
/// 0x80 holding `name:value\r\n` lines.
#[derive(Debug)]
pub struct WebEncoder {
    text: bool,
    pending: Vec<u8>,
}

impl WebEncoder {
    pub fn new(web: &Web) -> WebEncoder {
        WebEncoder {
            text: web.text,
            pending: Vec::new(),
        }
    }

    pub fn data(&mut self, d: &[u8]) -> Bytes {
        if !self.text {
            return Bytes::copy_from_slice(d);
        }
        use base64::Engine;
        self.pending.extend_from_slice(d);
        let whole = self.pending.len() / 3 * 3;
        let out = base64::engine::general_purpose::STANDARD.encode(&self.pending[..whole]);
        self.pending.drain(..whole);
        Bytes::from(out)
    }

    pub fn trailers(&mut self, t: &HeaderMap) -> Bytes {
        let mut block = Vec::new();
        for (n, v) in t {
            block.extend_from_slice(n.as_str().as_bytes());
            block.push(b':');
            block.extend_from_slice(v.as_bytes());
            block.extend_from_slice(b"\r\n");
        }
        let mut f = Vec::with_capacity(5 + block.len());
        f.push(0x80);
        f.extend_from_slice(&(block.len() as u32).to_be_bytes());
        f.extend_from_slice(&block);
        let mut out = self.data(&f).to_vec();
        out.extend_from_slice(&self.finish());
        Bytes::from(out)
    }

    /// What is left (text mode: the last bytes, padded).
    pub fn finish(&mut self) -> Bytes {
        use base64::Engine;
        if !self.text || self.pending.is_empty() {
            return Bytes::new();
        }
        let out = base64::engine::general_purpose::STANDARD.encode(&self.pending);
        self.pending.clear();
        Bytes::from(out)
    }
}

/// Whether requests to this cluster go out as HTTP/2 (and so are prepared for it).
pub fn speaks_h2(cfg: &ServiceConfig) -> bool {
    cfg.protocol.speaks_h2(cfg.upstream_tls.is_some())
}

/// Whether HTTP/2 requests to this cluster go over TLS (`:scheme https`).
pub fn https(cfg: &ServiceConfig) -> bool {
    cfg.upstream_tls.is_some() && cfg.protocol != Protocol::H2c
}

/// The status of an error shoal answers itself (the HTTP-to-gRPC mapping of the gRPC
/// spec, with shoal's own timeouts as DEADLINE_EXCEEDED).
pub fn status_of(e: &ProxyError) -> u32 {
    match e {
        ProxyError::Timeout | ProxyError::RequestTimeout => DEADLINE_EXCEEDED,
        ProxyError::PayloadTooLarge | ProxyError::HeadersTooLarge | ProxyError::UriTooLong => {
            RESOURCE_EXHAUSTED
        }
        ProxyError::NotFound | ProxyError::MethodNotAllowed => UNIMPLEMENTED,
        ProxyError::BadRequest(_) | ProxyError::BodyFault(_) => INTERNAL,
        ProxyError::NoInstance
        | ProxyError::ColdStart
        | ProxyError::Upstream(_)
        | ProxyError::Redirect(_) => UNAVAILABLE,
    }
}

/// A trailers-only response: HTTP 200, the status in the headers, no body.
pub fn trailers_only(code: u32, message: &str) -> Response<ClientBody> {
    let mut r = Response::new(Either::Right(Full::new(Bytes::new())));
    let h = r.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/grpc"),
    );
    h.insert("grpc-status", HeaderValue::from(code));
    if let Ok(v) = HeaderValue::from_str(&percent_encode(message)) {
        h.insert("grpc-message", v);
    }
    r
}

/// `grpc-message` is percent-encoded (the gRPC HTTP/2 spec): bytes outside printable ASCII
/// and `%` itself.
fn percent_encode(m: &str) -> String {
    let mut out = String::with_capacity(m.len());
    for b in m.bytes() {
        if (0x20..0x7f).contains(&b) && b != b'%' {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// `grpc-status` in a header block (a trailers-only response, or trailers).
pub fn header_status(h: &HeaderMap) -> Option<u32> {
    std::str::from_utf8(h.get("grpc-status")?.as_bytes())
        .ok()?
        .trim()
        .parse()
        .ok()
}

/// `grpc-timeout`: at most 8 digits and a unit (H, M, S, m, u, n).
pub fn parse_timeout(v: &[u8]) -> Option<Duration> {
    let (digits, unit) = v.split_at(v.len().checked_sub(1)?);
    if digits.is_empty() || digits.len() > 8 || !digits.iter().all(u8::is_ascii_digit) {
        return None;
    }
    let n: u64 = std::str::from_utf8(digits).ok()?.parse().ok()?;
    Some(match unit {
        b"H" => Duration::from_secs(n * 3600),
        b"M" => Duration::from_secs(n * 60),
        b"S" => Duration::from_secs(n),
        b"m" => Duration::from_millis(n),
        b"u" => Duration::from_micros(n),
        b"n" => Duration::from_nanos(n),
        _ => return None,
    })
}

/// The time left as a `grpc-timeout` value (microseconds while they fit in 8 digits).
pub fn timeout_value(left: Duration) -> HeaderValue {
    let us = left.as_micros().max(1);
    let v = if us < 100_000_000 {
        format!("{us}u")
    } else {
        format!("{}m", left.as_millis().min(99_999_999))
    };
    HeaderValue::from_str(&v).expect("digits and a unit")
}

/// A status code by number or canonical name (`14`, `"UNAVAILABLE"`, `"unavailable"`).
pub fn code(v: &str) -> Option<u32> {
    if let Ok(n) = v.parse::<u32>() {
        return (n <= 16).then_some(n);
    }
    NAMES
        .iter()
        .position(|n| n.eq_ignore_ascii_case(v))
        .map(|i| i as u32)
}

/// `retries.grpc_codes`: numbers or names.
pub fn de_codes<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Vec<u32>, D::Error> {
    #[derive(serde::Deserialize)]
    #[serde(untagged)]
    enum C {
        N(u32),
        S(String),
    }
    let list: Vec<C> = serde::Deserialize::deserialize(d)?;
    list.into_iter()
        .map(|c| {
            let s = match c {
                C::N(n) => n.to_string(),
                C::S(s) => s,
            };
            code(&s).ok_or_else(|| {
                serde::de::Error::custom(format!(
                    "unknown gRPC status {s:?} (a number 0-16 or a name such as \"UNAVAILABLE\")"
                ))
            })
        })
        .collect()
}

/// A length-prefixed gRPC message (uncompressed).
pub fn frame(msg: &[u8]) -> Bytes {
    let mut b = Vec::with_capacity(5 + msg.len());
    b.push(0);
    b.extend_from_slice(&(msg.len() as u32).to_be_bytes());
    b.extend_from_slice(msg);
    Bytes::from(b)
}

/// `grpc.health.v1.HealthCheckRequest { service }`, framed (protobuf field 1, a string).
pub fn health_request(service: &str) -> Bytes {
    let mut m = Vec::new();
    if !service.is_empty() {
        m.push(0x0a);
        let mut n = service.len();
        while n >= 0x80 {
            m.push((n as u8 & 0x7f) | 0x80);
            n >>= 7;
        }
        m.push(n as u8);
        m.extend_from_slice(service.as_bytes());
    }
    frame(&m)
}

/// `HealthCheckResponse.status` from a framed response (field 1, a varint; absent: 0,
/// UNKNOWN). SERVING is 1.
pub fn health_status(body: &[u8]) -> Option<u64> {
    if body.len() < 5 || body[0] != 0 {
        return None;
    }
    let len = u32::from_be_bytes([body[1], body[2], body[3], body[4]]) as usize;
    let mut m = body.get(5..5 + len)?;
    let mut status = 0;
    while !m.is_empty() {
        let (key, rest) = varint(m)?;
        let (v, rest) = varint(rest)?;
        match (key >> 3, key & 7) {
            (1, 0) => {
                status = v;
                m = rest;
            }
            (_, 0) => m = rest,
            // Length-delimited fields of a newer schema are skipped.
            (_, 2) => m = rest.get(v as usize..)?,
            _ => return None,
        }
    }
    Some(status)
}

fn varint(b: &[u8]) -> Option<(u64, &[u8])> {
    let mut v = 0u64;
    for (i, &byte) in b.iter().enumerate().take(10) {
        v |= u64::from(byte & 0x7f) << (7 * i);
        if byte & 0x80 == 0 {
            return Some((v, &b[i + 1..]));
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grpc_web_modes_and_frames() {
        let h = |v: &str| {
            let mut m = HeaderMap::new();
            m.insert(header::CONTENT_TYPE, HeaderValue::from_str(v).unwrap());
            m
        };
        let bin = web(&h("application/grpc-web+proto")).unwrap();
        assert_eq!((bin.text, bin.suffix.as_str()), (false, "+proto"));
        assert_eq!(bin.upstream_type(), "application/grpc+proto");
        assert_eq!(bin.client_type(), "application/grpc-web+proto");
        let text = web(&h("application/grpc-web-text")).unwrap();
        assert!(text.text);
        assert_eq!(text.client_type(), "application/grpc-web-text");
        assert!(web(&h("application/grpc")).is_none());
        assert!(web(&h("application/grpc-webfoo")).is_none());
        assert!(!is_grpc(&h("application/grpc-web")));

        // Text: padded segments back to back decode whole.
        let b = text
            .decode_request(Bytes::from_static(b"AAAAAAJoaQ=="))
            .unwrap();
        assert_eq!(&b[..], b"\0\0\0\0\x02hi");
        let b = text
            .decode_request(Bytes::from_static(b"aGk=aGk="))
            .unwrap();
        assert_eq!(&b[..], b"hihi");
        assert!(text.decode_request(Bytes::from_static(b"!!!!")).is_none());

        let mut t = HeaderMap::new();
        t.insert("grpc-status", HeaderValue::from_static("0"));
        let mut e = WebEncoder::new(&bin);
        assert_eq!(&e.data(b"\0\0\0\0\x01x")[..], b"\0\0\0\0\x01x");
        assert_eq!(&e.trailers(&t)[..], b"\x80\0\0\0\x0fgrpc-status:0\r\n");

        // Text: chunks concatenated decode to the binary stream.
        use base64::Engine;
        let mut e = WebEncoder::new(&text);
        let mut all = String::new();
        for chunk in [&b"\0\0\0\0"[..], b"\x01", b"x"] {
            all.push_str(std::str::from_utf8(&e.data(chunk)).unwrap());
        }
        all.push_str(std::str::from_utf8(&e.trailers(&t)).unwrap());
        let raw = base64::engine::general_purpose::STANDARD
            .decode(all)
            .unwrap();
        assert_eq!(&raw[..], b"\0\0\0\0\x01x\x80\0\0\0\x0fgrpc-status:0\r\n");
    }

    #[test]
    fn health_messages() {
        assert_eq!(&health_request("")[..], b"\0\0\0\0\0");
        assert_eq!(&health_request("ab")[..], b"\0\0\0\0\x04\x0a\x02ab");
        let long = "s".repeat(200);
        let r = health_request(&long);
        assert_eq!(&r[5..8], &[0x0a, 0xc8, 0x01]);
        assert_eq!(health_status(b"\0\0\0\0\x02\x08\x01"), Some(1));
        assert_eq!(health_status(b"\0\0\0\0\x02\x08\x02"), Some(2));
        assert_eq!(health_status(b"\0\0\0\0\0"), Some(0));
        // An unknown string field before the status is skipped.
        assert_eq!(health_status(b"\0\0\0\0\x05\x12\x01z\x08\x01"), Some(1));
        assert_eq!(health_status(b"\0\0\0\0\x09\x08\x01"), None, "cut short");
        assert_eq!(health_status(b"\x01\0\0\0\x02\x08\x01"), None, "compressed");
        assert_eq!(health_status(b"\0\0"), None);
    }

    #[test]
    fn recognises_grpc_but_not_grpc_web() {
        let h = |v: &str| {
            let mut m = HeaderMap::new();
            m.insert(header::CONTENT_TYPE, HeaderValue::from_str(v).unwrap());
            m
        };
        assert!(is_grpc(&h("application/grpc")));
        assert!(is_grpc(&h("application/grpc+proto")));
        assert!(is_grpc(&h("Application/GRPC")));
        assert!(!is_grpc(&h("application/grpc-web")));
        assert!(!is_grpc(&h("application/grpc-web-text")));
        assert!(!is_grpc(&h("application/json")));
        assert!(!is_grpc(&HeaderMap::new()));
    }

    #[test]
    fn timeouts_parse_and_print() {
        assert_eq!(parse_timeout(b"200m"), Some(Duration::from_millis(200)));
        assert_eq!(parse_timeout(b"1S"), Some(Duration::from_secs(1)));
        assert_eq!(parse_timeout(b"2H"), Some(Duration::from_secs(7200)));
        assert_eq!(parse_timeout(b"5n"), Some(Duration::from_nanos(5)));
        for bad in [
            &b""[..],
            b"m",
            b"123456789m",
            b"1x",
            b"-1S",
            b"1.5S",
            b" 1S",
        ] {
            assert_eq!(parse_timeout(bad), None, "{bad:?}");
        }
        assert_eq!(timeout_value(Duration::from_millis(150)), "150000u");
        assert_eq!(timeout_value(Duration::from_secs(3600)), "3600000m");
        let v = timeout_value(Duration::from_millis(1234));
        assert_eq!(
            parse_timeout(v.as_bytes()),
            Some(Duration::from_millis(1234))
        );
    }

    #[test]
    fn errors_map_to_statuses_in_trailers_only_answers() {
        assert_eq!(status_of(&ProxyError::Timeout), DEADLINE_EXCEEDED);
        assert_eq!(status_of(&ProxyError::NoInstance), UNAVAILABLE);
        assert_eq!(status_of(&ProxyError::PayloadTooLarge), RESOURCE_EXHAUSTED);
        assert_eq!(status_of(&ProxyError::NotFound), UNIMPLEMENTED);
        let r = trailers_only(UNAVAILABLE, "no instance: 100%\n");
        assert_eq!(r.status(), 200);
        assert_eq!(r.headers()["grpc-status"], "14");
        assert_eq!(r.headers()["grpc-message"], "no instance: 100%25%0A");
        assert_eq!(r.headers()["content-type"], "application/grpc");
        assert_eq!(header_status(r.headers()), Some(14));
    }

    #[test]
    fn codes_by_number_or_name() {
        assert_eq!(code("14"), Some(14));
        assert_eq!(code("unavailable"), Some(UNAVAILABLE));
        assert_eq!(code("DEADLINE_EXCEEDED"), Some(4));
        assert_eq!(code("17"), None);
        assert_eq!(code("nope"), None);
    }
}
