//! Request and response hygiene: the rules both request paths apply (RFC 9110/9112).
//!
//! Each rule lives here once. The HTTP/1.1 fast path feeds it the header slices `httparse`
//! found in its read buffer; the general path feeds it hyper's `HeaderMap`. Both get the same
//! verdict ([`inspect`]) and the same upstream header set ([`forward_headers`]), written through
//! a sink: bytes for the fast path, a `HeaderMap` for hyper.

use std::net::IpAddr;

use crate::config::{LimitConfig, ServiceConfig};
use crate::error::ProxyError;

/// Header names the rules treat specially; everything else is end-to-end and copied.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub(crate) enum Name {
    Host,
    ContentLength,
    TransferEncoding,
    Connection,
    /// Hop-by-hop: never forwarded (`Keep-Alive`, `TE`, `Trailer`, `Proxy-*`, `HTTP2-Settings`).
    Hop,
    Upgrade,
    Expect,
    XForwardedFor,
    Forwarded,
    /// `X-Forwarded-Proto/Host/Port/Prefix`, `X-Real-IP`: set by shoal, client copies dropped
    /// unless the peer is a trusted proxy.
    ForwardInfo,
    /// W3C `traceparent`: replaced by shoal's hop (same trace, new parent id).
    TraceParent,
    Other,
}

pub(crate) fn classify(n: &[u8]) -> Name {
    let is = |s: &str| n.eq_ignore_ascii_case(s.as_bytes());
    match n.len() {
        4 if is("host") => Name::Host,
        14 if is("content-length") => Name::ContentLength,
        17 if is("transfer-encoding") => Name::TransferEncoding,
        10 if is("connection") => Name::Connection,
        10 if is("keep-alive") => Name::Hop,
        16 if is("proxy-connection") => Name::Hop,
        2 if is("te") => Name::Hop,
        7 if is("trailer") => Name::Hop,
        7 if is("upgrade") => Name::Upgrade,
        6 if is("expect") => Name::Expect,
        19 if is("proxy-authorization") => Name::Hop,
        18 if is("proxy-authenticate") => Name::Hop,
        14 if is("http2-settings") => Name::Hop,
        15 if is("x-forwarded-for") => Name::XForwardedFor,
        9 if is("forwarded") => Name::Forwarded,
        17 if is("x-forwarded-proto") => Name::ForwardInfo,
        16 if is("x-forwarded-host") => Name::ForwardInfo,
        16 if is("x-forwarded-port") => Name::ForwardInfo,
        18 if is("x-forwarded-prefix") => Name::ForwardInfo,
        9 if is("x-real-ip") => Name::ForwardInfo,
        11 if is("traceparent") => Name::TraceParent,
        _ => Name::Other,
    }
}

/// Whether a header name carries nothing HTTP or shoal gives a meaning to (framing, routing,
/// hop-by-hop, forwarding, credentials, content metadata, conditionals, caching): the only
/// kind shoal may set from configuration, such as a client certificate's identity.
pub(crate) fn plain_header_name(n: &http::HeaderName) -> bool {
    let s = n.as_str();
    classify(s.as_bytes()) == Name::Other
        && !s.starts_with("content-")
        && !s.starts_with("if-")
        && !s.starts_with("accept")
        && !s.starts_with("sec-")
        && !matches!(
            s,
            "authorization"
                | "cookie"
                | "range"
                | "via"
                | "date"
                | "cache-control"
                | "pragma"
                | "user-agent"
                | "referer"
                | "origin"
                | "max-forwards"
                | "x-http-method-override"
                | "x-original-url"
                | "x-rewrite-url"
        )
}

/// Comma-separated tokens of a header value, trimmed.
pub(crate) fn tokens(v: &[u8]) -> impl Iterator<Item = &[u8]> {
    v.split(|&b| b == b',').map(|t| t.trim_ascii())
}

/// A strict decimal Content-Length.
pub(crate) fn parse_len(v: &[u8]) -> Option<u64> {
    let v = v.trim_ascii();
    if v.is_empty() || v.len() > 18 || !v.iter().all(u8::is_ascii_digit) {
        return None;
    }
    Some(v.iter().fold(0u64, |a, &d| a * 10 + u64::from(d - b'0')))
}

/// RFC 9110 §7.2 / RFC 3986 §3.2: `host [ ":" port ]`, host a reg-name, IPv4 or `[IPv6]`.
/// Empty values, lists, userinfo, paths and whitespace are refused.
pub(crate) fn valid_authority(v: &[u8]) -> bool {
    if v.is_empty() || v.len() > 255 {
        return false;
    }
    let (host, port) = if v[0] == b'[' {
        let Some(end) = v.iter().position(|&b| b == b']') else {
            return false;
        };
        let inner = &v[1..end];
        if inner.is_empty()
            || !inner
                .iter()
                .all(|b| b.is_ascii_hexdigit() || b":.".contains(b))
        {
            return false;
        }
        (&v[..=end], &v[end + 1..])
    } else {
        match v.iter().rposition(|&b| b == b':') {
            Some(i) => (&v[..i], &v[i..]),
            None => (v, &v[v.len()..]),
        }
    };
    if host.is_empty() {
        return false;
    }
    if host[0] != b'[' {
        let reg = |b: &u8| b.is_ascii_alphanumeric() || b"-._~%!$&'()*+;=".contains(b);
        if !host.iter().all(reg) {
            return false;
        }
    }
    match port {
        [] => true,
        [b':', digits @ ..] => digits.len() <= 5 && digits.iter().all(u8::is_ascii_digit),
        _ => false,
    }
}

/// Header names with an underscore are dropped unless allowed (NGINX's default): a backend
/// behind a CGI-style gateway would read `X_Forwarded_For` as `X-Forwarded-For`.
fn has_underscore(n: &[u8]) -> bool {
    n.contains(&b'_')
}

/// How the request body is delimited.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum BodyKind {
    None,
    Length(u64),
    Chunked,
}

/// What [`inspect`] found out about an acceptable request.
#[derive(Debug)]
pub(crate) struct Facts<'a> {
    /// The authority the request is for: the absolute-form target's, else `Host`'s.
    pub authority: Option<&'a [u8]>,
    pub body: BodyKind,
    /// `Connection: close` (or HTTP/1.0 without keep-alive, decided by the caller).
    pub close: bool,
    /// A protocol upgrade shoal will tunnel (WebSocket or an allowed one), as requested.
    pub upgrade: Option<&'a [u8]>,
    pub expect: bool,
    /// Header names the `Connection` header lists (hop-by-hop for this message).
    pub named: Vec<&'a [u8]>,
    /// Whether the peer is a trusted proxy whose forwarding headers are kept.
    pub trusted: bool,
    /// The client's `traceparent`, if it sent one.
    pub traceparent: Option<&'a [u8]>,
}

impl Facts<'_> {
    fn is_named(&self, n: &[u8]) -> bool {
        !self.named.is_empty() && self.named.iter().any(|x| x.eq_ignore_ascii_case(n))
    }
}

/// The request line as both paths see it.
pub(crate) struct Line<'a> {
    pub method: &'a str,
    /// Length of the request target as sent (for the 414 limit).
    pub target_len: usize,
    /// The authority of an absolute-form target (`GET http://a.example/p`).
    pub target_authority: Option<&'a [u8]>,
    /// HTTP minor version for HTTP/1.x; `None` for HTTP/2.
    pub minor: Option<u8>,
}

/// Checks a request head. `Err` is the answer (4xx) and nothing is forwarded; `Ok` says how
/// to forward it. `headers` yields (name, value) pairs in order.
pub(crate) fn inspect<'a, I>(
    line: &Line<'a>,
    headers: I,
    cfg: &ServiceConfig,
    peer: IpAddr,
) -> Result<Facts<'a>, ProxyError>
where
    I: Iterator<Item = (&'a [u8], &'a [u8])>,
{
    let limits: &LimitConfig = &cfg.limits;
    if line.target_len > limits.max_request_line {
        return Err(ProxyError::UriTooLong);
    }
    if line.method == "CONNECT" {
        return Err(ProxyError::MethodNotAllowed);
    }
    let mut count = 0;
    let mut bytes = 0;
    let mut host: Option<&[u8]> = None;
    let mut len: Option<u64> = None;
    let mut te: Option<&[u8]> = None;
    let mut close = line.minor == Some(0);
    let mut asked_close = false;
    let mut upgrade_req: Option<&[u8]> = None;
    let mut upgrade_token = false;
    let mut expect = false;
    let mut named = Vec::new();
    let mut traceparent = None;
    for (n, v) in headers {
        count += 1;
        bytes += n.len() + v.len() + 4;
        match classify(n) {
            Name::Host => {
                if host.is_some() {
                    return Err(ProxyError::BadRequest("duplicate host header"));
                }
                if !valid_authority(v.trim_ascii()) {
                    return Err(ProxyError::BadRequest("invalid host header"));
                }
                host = Some(v.trim_ascii());
            }
            Name::ContentLength => match (len, parse_len(v)) {
                (None, Some(n)) => len = Some(n),
                (Some(a), Some(b)) if a == b => {}
                _ => return Err(ProxyError::BadRequest("invalid content-length")),
            },
            Name::TransferEncoding => {
                // Only one plain `chunked` is forwarded: stacked codings are how smuggling starts.
                if te.is_some() || line.minor == Some(0) {
                    return Err(ProxyError::BadRequest("unsupported transfer-encoding"));
                }
                te = Some(v);
            }
            Name::Connection => {
                for t in tokens(v) {
                    if t.eq_ignore_ascii_case(b"close") {
                        close = true;
                        asked_close = true;
                    } else if t.eq_ignore_ascii_case(b"keep-alive") {
                        // Lifts HTTP/1.0's default only: `close` wins in any order.
                        if line.minor == Some(0) && !asked_close {
                            close = false;
                        }
                    } else if t.eq_ignore_ascii_case(b"upgrade") {
                        upgrade_token = true;
                    } else if !t.is_empty() {
                        named.push(t);
                    }
                }
            }
            Name::Upgrade => upgrade_req = Some(v),
            Name::Expect => expect = true,
            Name::TraceParent => traceparent = Some(v),
            _ => {}
        }
    }
    if count > limits.max_headers || bytes > limits.max_header_bytes {
        return Err(ProxyError::HeadersTooLarge);
    }
    let body = match (te, len) {
        (Some(_), Some(_)) => {
            return Err(ProxyError::BadRequest(
                "both content-length and transfer-encoding",
            ))
        }
        (Some(v), None) if v.trim_ascii().eq_ignore_ascii_case(b"chunked") => BodyKind::Chunked,
        (Some(_), None) => return Err(ProxyError::BadRequest("unsupported transfer-encoding")),
        (None, Some(0)) | (None, None) => BodyKind::None,
        (None, Some(n)) => BodyKind::Length(n),
    };
    if line.minor == Some(1) && host.is_none() {
        return Err(ProxyError::BadRequest("missing host header"));
    }
    if let Some(a) = line.target_authority {
        if !valid_authority(a) {
            return Err(ProxyError::BadRequest("invalid request target"));
        }
    }
    // WebSocket and explicitly allowed protocols only; `h2c` and anything else is dropped, so
    // no client can turn the connection into a tunnel the proxy does not see.
    let upgrade = match (upgrade_token, upgrade_req) {
        (true, Some(v)) if line.minor == Some(1) => tokens(v).find(|p| {
            let name = p.split(|&b| b == b'/').next().unwrap_or(p);
            name.eq_ignore_ascii_case(b"websocket")
                || cfg
                    .allowed_upgrades
                    .iter()
                    .any(|a| a.as_bytes().eq_ignore_ascii_case(name))
        }),
        _ => None,
    };
    Ok(Facts {
        authority: line.target_authority.or(host),
        body,
        close,
        upgrade,
        expect,
        named,
        trusted: cfg.trusted_proxies.iter().any(|c| c.contains(peer)),
        traceparent,
    })
}

/// What shoal adds about the client connection.
pub(crate) struct Origin<'a> {
    pub peer_ip: &'a [u8],
    /// The listener's port, for `X-Forwarded-Port`.
    pub port: u16,
    /// A prefix the route stripped, for `X-Forwarded-Prefix`.
    pub prefix: Option<&'a str>,
    pub via: &'static [u8],
    /// The `traceparent` for this hop ([`trace_context`]).
    pub traceparent: &'a [u8],
}

/// Writes the headers that go upstream through `put(name, value parts)` (the parts of one
/// value, to be concatenated: no allocation on the fast path): hop-by-hop and
/// `Connection`-named ones dropped, `Host` set to the request's authority, client forwarding
/// headers dropped (kept and appended to when the peer is trusted), shoal's own added.
/// `Transfer-Encoding` is left to the caller, which frames the body.
pub(crate) fn forward_headers<'a, I>(
    facts: &Facts<'a>,
    headers: impl Fn() -> I,
    cfg: &ServiceConfig,
    o: &Origin<'a>,
    mut put: impl FnMut(&[u8], &[&[u8]]),
) where
    I: Iterator<Item = (&'a [u8], &'a [u8])>,
{
    if let Some(a) = facts.authority {
        put(b"host", &[a]);
    }
    let mut have_info = [false; 3];
    for (n, v) in headers() {
        let keep = match classify(n) {
            // Framing and routing headers are never "named" away (`Connection: close, Host`).
            Name::Host | Name::TransferEncoding | Name::Connection | Name::Hop => false,
            Name::Upgrade | Name::Expect | Name::TraceParent => false,
            Name::ContentLength => true,
            Name::XForwardedFor | Name::Forwarded => false,
            Name::ForwardInfo => {
                if facts.trusted {
                    for (i, k) in ["x-forwarded-proto", "x-forwarded-host", "x-forwarded-port"]
                        .iter()
                        .enumerate()
                    {
                        if n.eq_ignore_ascii_case(k.as_bytes()) {
                            have_info[i] = true;
                        }
                    }
                }
                facts.trusted
            }
            Name::Other => {
                !(facts.is_named(n)
                    || (has_underscore(n) && !cfg.allow_underscore_headers)
                    // Only shoal says who a client certificate names.
                    || cfg
                        .tls
                        .as_ref()
                        .is_some_and(|t| n.eq_ignore_ascii_case(t.identity_header.as_ref())))
            }
        };
        if keep {
            put(n, &[v]);
        }
    }
    if let Some(p) = facts.upgrade {
        put(b"upgrade", &[p]);
        put(b"connection", &[b"upgrade"]);
    }
    if facts.expect {
        put(b"expect", &[b"100-continue"]);
    }
    // A trusted peer's chain, in order, then this hop.
    let chain = |class: Name, own: &[&'a [u8]]| -> Vec<&'a [u8]> {
        let mut v: Vec<&[u8]> = Vec::new();
        for (n, val) in headers() {
            if classify(n) == class {
                v.push(val);
                v.push(b", ");
            }
        }
        v.extend_from_slice(own);
        v
    };
    if facts.trusted {
        put(
            b"x-forwarded-for",
            &chain(Name::XForwardedFor, &[])
                .iter()
                .copied()
                .chain([o.peer_ip])
                .collect::<Vec<_>>(),
        );
    } else {
        put(b"x-forwarded-for", &[o.peer_ip]);
    }
    if !have_info[0] {
        put(b"x-forwarded-proto", &[cfg.scheme().as_bytes()]);
    }
    if let (false, Some(a)) = (have_info[1], facts.authority) {
        put(b"x-forwarded-host", &[a]);
    }
    if !have_info[2] {
        let mut digits = [0u8; 5];
        put(b"x-forwarded-port", &[decimal(o.port, &mut digits)]);
    }
    if let Some(p) = o.prefix {
        put(b"x-forwarded-prefix", &[p.as_bytes()]);
    }
    // RFC 7239: IPv6 addresses are quoted and bracketed.
    let ip6 = o.peer_ip.contains(&b':');
    let (pre, post): (&[u8], &[u8]) = if ip6 {
        (b"for=\"[", b"]\"")
    } else {
        (b"for=", b"")
    };
    let (host_pre, host, host_post): (&[u8], &[u8], &[u8]) = match facts.authority {
        Some(a) => (b";host=\"", a, b"\""),
        None => (b"", b"", b""),
    };
    let own = [
        pre,
        o.peer_ip,
        post,
        host_pre,
        host,
        host_post,
        if cfg.tls.is_some() {
            b";proto=https"
        } else {
            b";proto=http"
        },
    ];
    if facts.trusted {
        put(b"forwarded", &chain(Name::Forwarded, &own));
    } else {
        put(b"forwarded", &own);
    }
    put(b"via", &[o.via]);
    put(b"traceparent", &[o.traceparent]);
}

/// A W3C trace context (`traceparent`) for the hop to the instance: the client's trace id
/// and flags with a new parent id, or a new sampled trace when the client sent none or an
/// invalid one.
pub(crate) fn trace_context(incoming: Option<&[u8]>) -> [u8; 55] {
    let mut out = *b"00-00000000000000000000000000000000-0000000000000000-01";
    let hex = |b: &[u8]| {
        b.iter()
            .all(|c| c.is_ascii_digit() || (b'a'..=b'f').contains(c))
    };
    let zero = |b: &[u8]| b.iter().all(|&c| c == b'0');
    let valid = incoming.map(<[u8]>::trim_ascii).filter(|v| {
        v.len() == 55
            && v.starts_with(b"00-")
            && v[35] == b'-'
            && v[52] == b'-'
            && hex(&v[3..35])
            && hex(&v[36..52])
            && hex(&v[53..55])
            && !zero(&v[3..35])
            && !zero(&v[36..52])
    });
    match valid {
        Some(v) => {
            out[3..35].copy_from_slice(&v[3..35]);
            out[53..55].copy_from_slice(&v[53..55]);
        }
        None => {
            put_hex(&mut out[3..19], random_u64());
            put_hex(&mut out[19..35], random_u64());
        }
    }
    put_hex(&mut out[36..52], random_u64());
    out
}

fn put_hex(out: &mut [u8], v: u64) {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    for (i, b) in out.iter_mut().enumerate() {
        *b = DIGITS[((v >> (60 - 4 * i)) & 0xf) as usize];
    }
}

/// A non-zero random id (xorshift64*, per thread, seeded from the clock and the thread):
/// ids only, nothing a policy decides by.
fn random_u64() -> u64 {
    use std::cell::Cell;
    thread_local!(static STATE: Cell<u64> = Cell::new({
        let local = 0u8;
        let seed = crate::pool::now_nanos()
            ^ (std::ptr::addr_of!(local) as u64).rotate_left(32)
            ^ u64::from(std::process::id()) << 17;
        seed | 1
    }));
    STATE.with(|s| {
        let mut x = s.get();
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        s.set(x);
        x.wrapping_mul(0x2545_F491_4F6C_DD1D).max(1)
    })
}

/// `n` in decimal, written into `buf`.
fn decimal(mut n: u16, buf: &mut [u8; 5]) -> &[u8] {
    let mut i = buf.len();
    loop {
        i -= 1;
        buf[i] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            return &buf[i..];
        }
    }
}

/// Whether a response header goes to the client: hop-by-hop ones and those the response's
/// `Connection` header names stay behind. Framing headers are decided by the caller.
pub(crate) fn response_header_kept(n: &[u8], named: &[&[u8]]) -> bool {
    match classify(n) {
        Name::Connection | Name::Hop | Name::Upgrade => false,
        Name::Other
        | Name::ForwardInfo
        | Name::XForwardedFor
        | Name::Forwarded
        | Name::Expect
        | Name::TraceParent => !named.iter().any(|x| x.eq_ignore_ascii_case(n)),
        Name::Host | Name::ContentLength | Name::TransferEncoding => true,
    }
}

/// A status code shoal relays: 100..=599 (anything else is an invalid response → 502).
pub(crate) fn valid_status(code: u16) -> bool {
    (100..=599).contains(&code)
}

/// An address block from `trusted_proxies`, e.g. `10.0.0.0/8` or `::1/128`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cidr {
    net: IpAddr,
    bits: u8,
}

impl Cidr {
    pub fn contains(&self, ip: IpAddr) -> bool {
        let ip = match ip {
            IpAddr::V6(v) => v.to_ipv4_mapped().map(IpAddr::V4).unwrap_or(ip),
            v4 => v4,
        };
        match (self.net, ip) {
            (IpAddr::V4(n), IpAddr::V4(a)) => {
                let mask = u32::MAX.checked_shl(32 - u32::from(self.bits)).unwrap_or(0);
                u32::from(n) & mask == u32::from(a) & mask
            }
            (IpAddr::V6(n), IpAddr::V6(a)) => {
                let mask = u128::MAX
                    .checked_shl(128 - u32::from(self.bits))
                    .unwrap_or(0);
                u128::from(n) & mask == u128::from(a) & mask
            }
            _ => false,
        }
    }
}

impl std::str::FromStr for Cidr {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let (ip, bits) = match s.split_once('/') {
            Some((ip, b)) => (ip, Some(b)),
            None => (s, None),
        };
        let net: IpAddr = ip
            .trim()
            .parse()
            .map_err(|_| format!("invalid address {ip:?} in {s:?}"))?;
        let max = if net.is_ipv4() { 32 } else { 128 };
        let bits = match bits {
            Some(b) => b
                .trim()
                .parse::<u8>()
                .ok()
                .filter(|b| *b <= max)
                .ok_or_else(|| format!("invalid prefix length in {s:?}"))?,
            None => max,
        };
        Ok(Cidr { net, bits })
    }
}

impl<'de> serde::Deserialize<'de> for Cidr {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {

    #[test]
    fn only_plain_names_may_carry_configured_values() {
        let plain =
            |n: &str| plain_header_name(&http::HeaderName::from_bytes(n.as_bytes()).unwrap());
        assert!(plain("x-client-cert-subject"));
        assert!(plain("ssl-client-subject-dn"));
        for n in [
            "content-length",
            "transfer-encoding",
            "host",
            "connection",
            "te",
            "x-forwarded-for",
            "forwarded",
            "x-real-ip",
            "authorization",
            "cookie",
            "content-type",
            "if-none-match",
            "upgrade",
            "expect",
        ] {
            assert!(!plain(n), "{n}");
        }
    }

    use super::*;
    use shoal_balance::Algorithm;

    fn cfg() -> ServiceConfig {
        ServiceConfig::quick("t", "127.0.0.1:0".parse().unwrap(), Algorithm::RoundRobin)
    }

    fn check(
        hs: &[(&'static str, &'static str)],
        minor: Option<u8>,
    ) -> Result<Facts<'static>, ProxyError> {
        let hs: &'static [(&'static str, &'static str)] = Box::leak(hs.to_vec().into_boxed_slice());
        let line = Line {
            method: "GET",
            target_len: 1,
            target_authority: None,
            minor,
        };
        let it = hs.iter().map(|(n, v)| (n.as_bytes(), v.as_bytes()));
        inspect(&line, it, &cfg(), "10.0.0.1".parse().unwrap())
    }

    fn forwarded(hs: &[(&str, &str)], c: &ServiceConfig) -> Vec<(String, String)> {
        let line = Line {
            method: "GET",
            target_len: 1,
            target_authority: None,
            minor: Some(1),
        };
        let it = hs.iter().map(|(n, v)| (n.as_bytes(), v.as_bytes()));
        let facts = inspect(&line, it.clone(), c, "10.0.0.1".parse().unwrap()).unwrap();
        let it = || it.clone();
        let mut out = Vec::new();
        let o = Origin {
            peer_ip: b"10.0.0.1",
            port: 8080,
            prefix: None,
            via: b"1.1 shoal",
            traceparent: b"00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
        };
        forward_headers(&facts, it, c, &o, |n, v| {
            out.push((
                String::from_utf8_lossy(n).into_owned(),
                String::from_utf8_lossy(&v.concat()).into_owned(),
            ))
        });
        out
    }

    #[test]
    fn host_must_be_one_valid_authority() {
        assert!(check(&[("host", "a.example:80")], Some(1)).is_ok());
        assert!(check(&[("host", "[::1]:8080")], Some(1)).is_ok());
        for bad in [
            "",
            "a.example, b.example",
            "a b",
            "user@a",
            "a/b",
            "a:80x",
            "[::1",
        ] {
            assert!(check(&[("host", bad)], Some(1)).is_err(), "{bad:?}");
        }
        assert!(check(&[], Some(1)).is_err());
        assert!(check(&[], Some(0)).is_ok());
        assert!(check(&[("host", "a"), ("Host", "a")], Some(1)).is_err());
    }

    #[test]
    fn framing_rules() {
        let e = check(
            &[
                ("host", "a"),
                ("content-length", "5"),
                ("transfer-encoding", "chunked"),
            ],
            Some(1),
        )
        .unwrap_err();
        assert_eq!(e.status(), 400);
        assert!(check(
            &[("host", "a"), ("transfer-encoding", "gzip, chunked")],
            Some(1)
        )
        .is_err());
        assert!(check(
            &[
                ("host", "a"),
                ("content-length", "5"),
                ("content-length", "6")
            ],
            Some(1)
        )
        .is_err());
        assert_eq!(
            check(&[("host", "a"), ("content-length", "5")], Some(1))
                .unwrap()
                .body,
            BodyKind::Length(5)
        );
        assert!(check(&[("transfer-encoding", "chunked")], Some(0)).is_err());
    }

    #[test]
    fn h2c_upgrade_is_not_tunneled() {
        let f = check(
            &[
                ("host", "a"),
                ("connection", "Upgrade, HTTP2-Settings"),
                ("upgrade", "h2c"),
                ("http2-settings", "AAMAAABkAAQAoAAAAAIAAAAA"),
            ],
            Some(1),
        )
        .unwrap();
        assert!(f.upgrade.is_none());
        let f = check(
            &[
                ("host", "a"),
                ("connection", "upgrade"),
                ("upgrade", "websocket"),
            ],
            Some(1),
        )
        .unwrap();
        assert_eq!(f.upgrade, Some(&b"websocket"[..]));
    }

    #[test]
    fn forwarding_headers_are_shoals_own_unless_trusted() {
        let hs = [
            ("Host", "a.example"),
            ("X-Forwarded-For", "6.6.6.6"),
            ("X-Forwarded-Proto", "https"),
            ("Forwarded", "for=6.6.6.6;proto=https"),
            ("X-Real-IP", "6.6.6.6"),
            ("X_Forwarded_For", "6.6.6.6"),
            ("X-Forwarded-Prefix", "/admin"),
            ("Connection", "close, Host, x-secret"),
            ("x-secret", "1"),
            ("x-kept", "1"),
        ];
        let out = forwarded(&hs, &cfg());
        let get = |k: &str| -> Vec<&str> {
            out.iter()
                .filter(|(n, _)| n.eq_ignore_ascii_case(k))
                .map(|(_, v)| v.as_str())
                .collect()
        };
        assert_eq!(get("host"), ["a.example"]);
        assert_eq!(get("x-forwarded-for"), ["10.0.0.1"]);
        assert_eq!(get("x-forwarded-proto"), ["http"]);
        assert_eq!(get("x-forwarded-port"), ["8080"]);
        assert_eq!(
            get("forwarded"),
            ["for=10.0.0.1;host=\"a.example\";proto=http"]
        );
        assert!(get("x-real-ip").is_empty());
        assert!(get("x_forwarded_for").is_empty());
        assert!(get("x-forwarded-prefix").is_empty());
        assert!(get("x-secret").is_empty());
        assert_eq!(get("x-kept"), ["1"]);

        let mut trusting = cfg();
        trusting.trusted_proxies = vec!["10.0.0.0/8".parse().unwrap()];
        let out = forwarded(&hs, &trusting);
        let get = |k: &str| -> Vec<&str> {
            out.iter()
                .filter(|(n, _)| n.eq_ignore_ascii_case(k))
                .map(|(_, v)| v.as_str())
                .collect()
        };
        assert_eq!(get("x-forwarded-for"), ["6.6.6.6, 10.0.0.1"]);
        assert_eq!(get("x-forwarded-proto"), ["https"]);
        assert_eq!(
            get("forwarded"),
            ["for=6.6.6.6;proto=https, for=10.0.0.1;host=\"a.example\";proto=http"]
        );
    }

    #[test]
    fn trace_context_continues_or_starts_a_trace() {
        let inc = b"00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01";
        let t = trace_context(Some(inc));
        assert_eq!(&t[..36], &inc[..36], "same trace id");
        assert_ne!(&t[36..52], &inc[36..52], "a new parent id");
        assert_eq!(&t[52..], b"-01");
        for bad in [
            &b"00-00000000000000000000000000000000-b7ad6b7169203331-01"[..],
            b"00-0AF7651916CD43DD8448EB211C80319C-b7ad6b7169203331-01",
            b"01-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
            b"garbage",
        ] {
            let t = trace_context(Some(bad));
            assert_ne!(&t[3..35], bad.get(3..35).unwrap_or(b""));
            assert!(trace_context(None)[3..35].iter().any(|&c| c != b'0'));
        }
        let (a, b) = (trace_context(None), trace_context(None));
        assert_ne!(a, b);
    }

    #[test]
    fn cidrs() {
        let c: Cidr = "10.0.0.0/8".parse().unwrap();
        assert!(c.contains("10.9.8.7".parse().unwrap()));
        assert!(c.contains("::ffff:10.1.1.1".parse().unwrap()));
        assert!(!c.contains("11.0.0.1".parse().unwrap()));
        let all: Cidr = "0.0.0.0/0".parse().unwrap();
        assert!(all.contains("1.2.3.4".parse().unwrap()));
        assert!("10.0.0.0/33".parse::<Cidr>().is_err());
        assert!("::1"
            .parse::<Cidr>()
            .unwrap()
            .contains("::1".parse().unwrap()));
    }
}
