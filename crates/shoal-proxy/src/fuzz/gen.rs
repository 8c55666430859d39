//! Generators: structured HTTP/1 heads, chunked bodies and config text, and byte mutation.

use proptest::collection::vec;
use proptest::prelude::*;
use proptest::sample::select;

pub(super) const METHODS: &[&str] = &[
    "GET", "HEAD", "POST", "PUT", "DELETE", "OPTIONS", "PATCH", "TRACE", "CONNECT", "PRI", "get",
    "M-SEARCH", "G\tT", "",
];

pub(super) const TARGETS: &[&str] = &[
    "/",
    "/a?b=1",
    "/api",
    "/api/",
    "/api/x?y=1",
    "/apix",
    "/admin",
    "/admin/x",
    "*",
    "http://other.example/p",
    "http://a.example",
    "https://a.example:8443/x",
    "//evil.example/x",
    "/a#frag",
    "/%2e%2e/x",
    "/a b",
    "/caf\u{e9}",
    "/a\0b",
    "/?x=[1]:@!$'()*+,;",
    "",
];

pub(super) const VERSIONS: &[&str] = &[
    "HTTP/1.1",
    "HTTP/1.1",
    "HTTP/1.1",
    "HTTP/1.0",
    "HTTP/2.0",
    "HTTP/1.2",
    "http/1.1",
    "HTTP/1.1 ",
];

/// Request and response header names a proxy treats specially, in odd spellings.
pub(super) const NAMES: &[&str] = &[
    "Host",
    "host",
    "HOST",
    " Host",
    "Host ",
    "Content-Length",
    "content-length",
    "Transfer-Encoding",
    "transfer-encoding",
    "Connection",
    "Keep-Alive",
    "Proxy-Connection",
    "TE",
    "Trailer",
    "Upgrade",
    "HTTP2-Settings",
    "Expect",
    "Proxy-Authorization",
    "Proxy-Authenticate",
    "X-Forwarded-For",
    "X-Forwarded-Proto",
    "X-Forwarded-Host",
    "X-Forwarded-Port",
    "X-Forwarded-Prefix",
    "X-Real-IP",
    "Forwarded",
    "X_Forwarded_For",
    "X-Real_IP",
    "Content_Length",
    "Transfer_Encoding",
    "X-User",
    "X-Custom",
    "x-secret",
    "Cookie",
    "Set-Cookie",
    "Via",
    "traceparent",
    "",
];

/// Header values that probe the rules: authorities, lengths, codings, connection options.
pub(super) const VALUES: &[&[u8]] = &[
    b"",
    b" ",
    b"a.example",
    b"A.Example:80",
    b"x.a.example:8080",
    b"[::1]:8080",
    b"[::1",
    b"a.example, b.example",
    b"a b",
    b"user@a.example",
    b"a.example/x",
    b"a.example:80x",
    b"a.example:123456",
    b"chunked",
    b"Chunked",
    b" chunked ",
    b"gzip, chunked",
    b"chunked, chunked",
    b"chunked, gzip",
    b"identity",
    b"0",
    b"5",
    b"00005",
    b"+5",
    b"-1",
    b"0x5",
    b"5, 5",
    b"5 5",
    b"99999999999999999999",
    b"65536",
    b"65537",
    b"close",
    b"keep-alive",
    b"Upgrade",
    b"upgrade, HTTP2-Settings",
    b"close, Host",
    b"close, keep-alive",
    b"keep-alive, close",
    b"close, X-Custom, x-secret",
    b"Host, Content-Length, Transfer-Encoding",
    b"x-forwarded-for, via",
    b"h2c",
    b"websocket",
    b"WebSocket/13, h2c",
    b"foo",
    b"100-continue",
    b"6.6.6.6",
    b"for=6.6.6.6;proto=https",
    b"https",
    b"/admin",
    b"a\tb",
    b"\t",
    b"a\x01b",
    b"a\x7fb",
    b"caf\xc3\xa9",
    b"\xff\xfe",
    b"a\0b",
    b"x\r\n y",
    b"x\n\tz",
];

const NAME_BYTES: &[u8] = b"aZ09-_.!#$%&'*+^`|~: \t\x00\x7f\xc3";
const VALUE_BYTES: &[u8] = b"aZ09 \t,;:=-_./[]@\"\\\r\n\x00\x01\x7f\x80\xff";

pub(super) fn name() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        8 => select(NAMES).prop_map(|n| n.as_bytes().to_vec()),
        1 => vec(select(NAME_BYTES), 1..12),
    ]
}

pub(super) fn value() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        8 => select(VALUES).prop_map(<[u8]>::to_vec),
        1 => vec(select(VALUE_BYTES), 0..16),
    ]
}

/// One header line as (name, separator, value, line end).
pub(super) type HeaderLine = (Vec<u8>, &'static str, Vec<u8>, &'static str);

pub(super) fn header() -> impl Strategy<Value = HeaderLine> {
    (
        name(),
        select(&[": ", ": ", ": ", ":", ":\t", " : "][..]),
        value(),
        select(&["\r\n", "\r\n", "\r\n", "\r\n", "\r\n", "\n"][..]),
    )
}

/// A structured request head and what follows it.
#[derive(Debug, Clone)]
pub(super) struct Req {
    pub method: &'static str,
    pub target: Vec<u8>,
    pub version: &'static str,
    pub headers: Vec<HeaderLine>,
    pub tail: Vec<u8>,
}

pub(super) fn target() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        4 => select(TARGETS).prop_map(|t| t.as_bytes().to_vec()),
        1 => vec(select(&b"/aA0._~-%?=&#:@[]\"<> \x00\xc3"[..]), 0..20).prop_map(|mut v| {
            v.insert(0, b'/');
            v
        }),
    ]
}

/// Names and values without the ones that stop a head at the parser or the Host check.
fn tame_header() -> impl Strategy<Value = HeaderLine> {
    let names: Vec<&str> = NAMES
        .iter()
        .copied()
        .filter(|n| {
            !n.is_empty()
                && !n.contains(' ')
                && !n.eq_ignore_ascii_case("host")
                && !n.eq_ignore_ascii_case("transfer-encoding")
        })
        .collect();
    let values: Vec<&[u8]> = VALUES
        .iter()
        .copied()
        .filter(|v| v.iter().all(|&b| b == b'\t' || (b >= 0x20 && b != 0x7f)))
        .collect();
    (
        select(names).prop_map(|n| n.as_bytes().to_vec()),
        Just(": "),
        select(values).prop_map(<[u8]>::to_vec),
        Just("\r\n"),
    )
}

/// Heads that mostly get past the parser, so the rules behind it are exercised, and
/// anything-goes heads, half each.
pub(super) fn request() -> impl Strategy<Value = Req> {
    let tame = (
        select(&["GET", "HEAD", "POST", "PUT", "DELETE", "OPTIONS"][..]),
        select(
            &[
                "/",
                "/a?b=1",
                "/api",
                "/api/x?y=1",
                "/admin/x",
                "/?x=[1]:@!$'()*+,;",
            ][..],
        ),
        select(
            &[
                "a.example",
                "A.Example:80",
                "x.a.example:8080",
                "[::1]:8080",
            ][..],
        ),
        vec(tame_header(), 0..8),
    )
        .prop_map(|(method, target, host, mut headers)| {
            let at = headers.len() / 2;
            headers.insert(
                at,
                (b"Host".to_vec(), ": ", host.as_bytes().to_vec(), "\r\n"),
            );
            Req {
                method,
                target: target.as_bytes().to_vec(),
                version: "HTTP/1.1",
                headers,
                tail: Vec::new(),
            }
        });
    prop_oneof![tame, wild_request()]
}

fn wild_request() -> impl Strategy<Value = Req> {
    // Most heads carry one plausible Host, so the rules past the Host check are reached.
    let host = prop_oneof![
        3 => Just(Some((b"Host".to_vec(), ": ", b"a.example".to_vec(), "\r\n"))),
        1 => Just(None),
    ];
    (
        select(METHODS),
        target(),
        select(VERSIONS),
        host,
        vec(header(), 0..10),
        vec(any::<u8>(), 0..8),
    )
        .prop_map(|(method, target, version, host, mut headers, tail)| {
            if let Some(h) = host {
                let at = headers.len() / 2;
                headers.insert(at, h);
            }
            Req {
                method,
                target,
                version,
                headers,
                tail,
            }
        })
}

impl Req {
    pub fn bytes(&self) -> Vec<u8> {
        let mut b = Vec::new();
        b.extend_from_slice(self.method.as_bytes());
        b.push(b' ');
        b.extend_from_slice(&self.target);
        b.push(b' ');
        b.extend_from_slice(self.version.as_bytes());
        b.extend_from_slice(b"\r\n");
        head_lines(&mut b, &self.headers);
        b.extend_from_slice(&self.tail);
        b
    }
}

fn head_lines(b: &mut Vec<u8>, headers: &[HeaderLine]) {
    for (n, sep, v, end) in headers {
        b.extend_from_slice(n);
        b.extend_from_slice(sep.as_bytes());
        b.extend_from_slice(v);
        b.extend_from_slice(end.as_bytes());
    }
    b.extend_from_slice(b"\r\n");
}

/// A structured response head.
#[derive(Debug, Clone)]
pub(super) struct Resp {
    pub version: &'static str,
    pub status: &'static str,
    pub reason: &'static str,
    pub headers: Vec<HeaderLine>,
    pub tail: Vec<u8>,
}

pub(super) fn response() -> impl Strategy<Value = Resp> {
    let tame = (
        select(&["HTTP/1.1", "HTTP/1.0"][..]),
        select(&["200", "204", "206", "304", "404", "500", "599"][..]),
        vec(tame_header(), 0..8),
    )
        .prop_map(|(version, status, headers)| Resp {
            version,
            status,
            reason: "OK",
            headers,
            tail: Vec::new(),
        });
    prop_oneof![tame, wild_response()]
}

fn wild_response() -> impl Strategy<Value = Resp> {
    let status = select(
        &[
            "200", "200", "204", "206", "304", "404", "500", "599", "000", "099", "100", "101",
            "103", "199", "600", "999", "20", "2000", "abc",
        ][..],
    );
    let reason = select(&["OK", "", "Whatever Reason", "caf\u{e9}", "a\tb"][..]);
    (
        select(VERSIONS),
        status,
        reason,
        vec(header(), 0..10),
        vec(any::<u8>(), 0..8),
    )
        .prop_map(|(version, status, reason, headers, tail)| Resp {
            version,
            status,
            reason,
            headers,
            tail,
        })
}

impl Resp {
    pub fn bytes(&self) -> Vec<u8> {
        let mut b = format!("{} {} {}\r\n", self.version, self.status, self.reason).into_bytes();
        head_lines(&mut b, &self.headers);
        b.extend_from_slice(&self.tail);
        b
    }
}

/// A byte-level edit of generated input.
#[derive(Debug, Clone)]
pub(super) enum Edit {
    Set(usize, u8),
    Insert(usize, u8),
    Delete(usize),
    Truncate(usize),
}

/// Bytes that break framing when they land in the wrong place.
const EDIT_BYTES: &[u8] = b"\r\n\0 \t:,;_-0x9aF\x7f\xff";

pub(super) fn edits() -> impl Strategy<Value = Vec<Edit>> {
    let byte = prop_oneof![select(EDIT_BYTES), any::<u8>()];
    let edit = prop_oneof![
        3 => (any::<usize>(), byte.clone()).prop_map(|(i, b)| Edit::Set(i, b)),
        3 => (any::<usize>(), byte).prop_map(|(i, b)| Edit::Insert(i, b)),
        2 => any::<usize>().prop_map(Edit::Delete),
        1 => any::<usize>().prop_map(Edit::Truncate),
    ];
    // Half of the cases stay unmutated: structured input reaches the deepest rules.
    prop_oneof![1 => Just(Vec::new()), 1 => vec(edit, 1..4)]
}

pub(super) fn apply(mut b: Vec<u8>, edits: &[Edit]) -> Vec<u8> {
    for e in edits {
        let n = b.len();
        match *e {
            Edit::Set(i, x) if n > 0 => b[i % n] = x,
            Edit::Insert(i, x) => b.insert(i % (n + 1), x),
            Edit::Delete(i) if n > 0 => {
                b.remove(i % n);
            }
            Edit::Truncate(i) => b.truncate(i % (n + 1)),
            _ => {}
        }
    }
    b
}

/// A chunked body: chunks as (data, size spelling, extension), trailers, then what follows.
#[derive(Debug, Clone)]
pub(super) struct Body {
    pub chunks: Vec<(Vec<u8>, u8, &'static str)>,
    pub trailers: Vec<(&'static str, &'static str)>,
    pub tail: Vec<u8>,
}

pub(super) fn chunked_body() -> impl Strategy<Value = Body> {
    let ext = select(&["", "", ";a=1", ";x", " ;y", "\t; z=\"q;r\"", ";e=\"\\\"\""][..]);
    let chunk = (vec(any::<u8>(), 1..24), any::<u8>(), ext);
    let trailer = select(
        &[
            ("X-T", "1"),
            ("Expires", "0"),
            ("Content-Length", "5"),
            ("X-Long", "aaaaaaaaaaaaaaaaaaaaaaaa"),
        ][..],
    );
    (
        vec(chunk, 0..4),
        vec(trailer, 0..2),
        vec(any::<u8>(), 0..12),
    )
        .prop_map(|(chunks, trailers, tail)| Body {
            chunks,
            trailers,
            tail,
        })
}

impl Body {
    /// The body's bytes, and where it ends.
    pub fn bytes(&self) -> (Vec<u8>, usize) {
        let mut b = Vec::new();
        for (data, spelling, ext) in &self.chunks {
            let zeros = "0".repeat(usize::from(spelling % 3));
            let size = if spelling & 4 == 0 {
                format!("{zeros}{:x}", data.len())
            } else {
                format!("{zeros}{:X}", data.len())
            };
            b.extend_from_slice(size.as_bytes());
            b.extend_from_slice(ext.as_bytes());
            b.extend_from_slice(b"\r\n");
            b.extend_from_slice(data);
            b.extend_from_slice(b"\r\n");
        }
        b.extend_from_slice(b"0\r\n");
        for (n, v) in &self.trailers {
            b.extend_from_slice(format!("{n}: {v}\r\n").as_bytes());
        }
        b.extend_from_slice(b"\r\n");
        let end = b.len();
        b.extend_from_slice(&self.tail);
        (b, end)
    }
}

/// Chunk-size lines that must never be taken for a size.
pub(super) const HOSTILE_SIZES: &[&str] = &[
    "0x5",
    "-1",
    "+5",
    " 5",
    "5 x",
    "ffffffffffffffffffff",
    "1000000000000000",
    "100000000000001",
    "FFFFFFFFFFFFFFF",
    "5\n",
    "",
    ";x",
    "5;\n",
];

/// Config text: a sequence of lines from the config's vocabulary.
pub(super) fn config_text() -> impl Strategy<Value = String> {
    let header = select(
        &[
            "[services.web]",
            "[services.api]",
            "[services.web.timeouts]",
            "[services.web.limits]",
            "[services.web.retries]",
            "[services.web.health]",
            "[services.web.outlier]",
            "[[services.web.routes]]",
            "[[services.api.routes]]",
            "[services.web.routes]",
            "[admin]",
            "[services]",
            "[services.\"bad name\"]",
            "[services.web.cache]",
            "[[services]]",
        ][..],
    )
    .prop_map(str::to_string);
    let key = select(
        &[
            "listen",
            "backends",
            "balance",
            "hash_key",
            "slow_start",
            "trusted_proxies",
            "allow_underscore_headers",
            "allowed_upgrades",
            "threads",
            "buffer_memory",
            "data_dir",
            "prefix",
            "host",
            "methods",
            "service",
            "strip_prefix",
            "rewrite",
            "attempts",
            "per_try",
            "connect",
            "idle",
            "max_headers",
            "max_connections",
            "rise",
            "fall",
            "path",
            "interval",
            "token",
            "bogus",
            "\"quoted key\"",
        ][..],
    );
    let value = select(
        &[
            "\"127.0.0.1:8080\"",
            "\"127.0.0.1:8081\"",
            "\"127.0.0.1:0\"",
            "\"[::1]:80\"",
            "[\"127.0.0.1:9001\"]",
            "[{ addr = \"127.0.0.1:9002\", weight = 0 }]",
            "[{ addr = \"127.0.0.1:9002\", weight = 3, x = 1 }]",
            "\"round_robin\"",
            "\"consistent_hash\"",
            "\"fastest\"",
            "\"2s\"",
            "\"0s\"",
            "\"3 parsecs\"",
            "\"99999999999h\"",
            "0",
            "1",
            "11",
            "-1",
            "1e20",
            "true",
            "\"/api\"",
            "\"api\"",
            "\"web\"",
            "\"nope\"",
            "\"*.example.com\"",
            "\"a,b\"",
            "[\"GET\"]",
            "[\"G T\"]",
            "\"10.0.0.0/8\"",
            "[\"10.0.0.0/33\"]",
            "[\"10.0.0.0/8\", \"::1\"]",
            "\"64MiB\"",
            "\"lots\"",
            "\"\"",
            "{",
            "[",
            "\"\\u0000\"",
            "\"unterminated",
            "'''multi\nline'''",
            "{ header = \"x-user\" }",
        ][..],
    );
    let line = prop_oneof![
        2 => header,
        6 => (key, select(&[" = ", "=", " =", " : "][..]), value)
            .prop_map(|(k, s, v)| format!("{k}{s}{v}")),
        1 => select(&["", "# comment", "  ", "\t", "=", "]]", "\u{feff}", "\r"][..])
            .prop_map(str::to_string),
        1 => vec(select(&['a', '"', '[', ']', '=', '.', ' ', '\n', '\r', '\0', '\u{e9}', '\\'][..]), 0..8)
            .prop_map(|c| c.into_iter().collect()),
    ];
    let base = "[services.web]\nlisten = \"127.0.0.1:8080\"\n";
    (any::<bool>(), vec(line, 0..12)).prop_map(move |(with_base, lines)| {
        let mut t = if with_base {
            base.to_string()
        } else {
            String::new()
        };
        for l in lines {
            t.push_str(&l);
            t.push('\n');
        }
        t
    })
}

/// Character edits of config text (stays UTF-8).
pub(super) fn apply_chars(text: &str, edits: &[Edit]) -> String {
    let mut c: Vec<char> = text.chars().collect();
    for e in edits {
        let n = c.len();
        match *e {
            Edit::Set(i, x) if n > 0 => c[i % n] = char::from(x),
            Edit::Insert(i, x) => c.insert(i % (n + 1), char::from(x)),
            Edit::Delete(i) if n > 0 => {
                c.remove(i % n);
            }
            Edit::Truncate(i) => c.truncate(i % (n + 1)),
            _ => {}
        }
    }
    c.into_iter().collect()
}
