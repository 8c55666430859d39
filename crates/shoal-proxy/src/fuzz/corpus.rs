//! Hostile request shapes, each checked on the fast path's planner and through the shared
//! rules as the general path calls them (HTTP/1.0, HTTP/2 or absolute-form request lines).

use super::request::{variants, Variant};
use super::{peer, PEER_IP, PORT};
use crate::h1::{plan_request, Chunked, Parsed};
use crate::hygiene::{self, Line, Origin};

const DEFAULT: usize = 0;
const TRUSTING: usize = 1;
const UNDERSCORES: usize = 2;

/// The fast path's verdict: `ready` and the upstream head, or `handover`, `partial`,
/// `reject NNN`.
fn fast(raw: &[u8], v: &Variant) -> String {
    let mut out = Vec::new();
    match plan_request(
        raw,
        &v.svc,
        &v.cfg,
        peer(),
        PEER_IP.as_bytes(),
        PORT,
        &mut out,
        false,
    ) {
        Parsed::Ready(_) => format!("ready\n{}", String::from_utf8(out).unwrap()),
        Parsed::Partial => "partial".into(),
        Parsed::Handover => "handover".into(),
        Parsed::Reject(e, _) => format!("reject {}", e.status().as_u16()),
        Parsed::Hit { .. } => "hit".into(),
    }
}

/// The shared rules for a request line with `minor` (None: HTTP/2) and `target_authority`:
/// the status of the refusal, or the upstream headers (lowercase names).
fn general(
    minor: Option<u8>,
    target_authority: Option<&str>,
    headers: &[(&str, &str)],
    v: &Variant,
) -> Result<Vec<(String, String)>, u16> {
    let line = Line {
        method: "GET",
        target_len: 1,
        target_authority: target_authority.map(str::as_bytes),
        minor,
    };
    let it = || headers.iter().map(|(n, v)| (n.as_bytes(), v.as_bytes()));
    let facts =
        hygiene::inspect(&line, it(), &v.cfg, peer().ip()).map_err(|e| e.status().as_u16())?;
    let origin = Origin {
        peer_ip: PEER_IP.as_bytes(),
        port: PORT,
        prefix: None,
        via: b"1.1 shoal",
        traceparent: &super::TRACE,
    };
    let mut out = Vec::new();
    hygiene::forward_headers(&facts, it, &v.cfg, &origin, |n, parts| {
        out.push((
            String::from_utf8_lossy(n).to_ascii_lowercase(),
            String::from_utf8_lossy(&parts.concat()).into_owned(),
        ))
    });
    Ok(out)
}

fn names(out: &[(String, String)]) -> Vec<&str> {
    out.iter().map(|(n, _)| n.as_str()).collect()
}

fn get<'a>(out: &'a [(String, String)], name: &str) -> Vec<&'a str> {
    out.iter()
        .filter(|(n, _)| n == name)
        .map(|(_, v)| v.as_str())
        .collect()
}

/// Both paths: the fast path answers `status` itself, and the general path's rules
/// (HTTP/1.0 and HTTP/2 request lines) refuse the same headers with the same status.
fn refused_everywhere(raw: &str, headers: &[(&str, &str)], status: u16) {
    let vs = variants();
    assert_eq!(
        fast(raw.as_bytes(), &vs[DEFAULT]),
        format!("reject {status}"),
        "{raw:?}"
    );
    for minor in [Some(1), Some(0), None] {
        assert_eq!(
            general(minor, None, headers, &vs[DEFAULT]).unwrap_err(),
            status,
            "{headers:?} as {minor:?}"
        );
    }
}

#[test]
fn h2c_upgrade_is_stripped_not_tunneled() {
    let vs = variants();
    let raw = "GET / HTTP/1.1\r\nHost: a.example\r\nConnection: Upgrade, HTTP2-Settings\r\n\
               Upgrade: h2c\r\nHTTP2-Settings: AAMAAABkAAQAoAAAAAIAAAAA\r\n\r\n";
    let out = fast(raw.as_bytes(), &vs[DEFAULT]);
    assert!(out.starts_with("ready\n"), "{out}");
    let lower = out.to_ascii_lowercase();
    for gone in ["upgrade", "http2-settings", "connection"] {
        assert!(!lower.contains(gone), "{gone} forwarded: {out}");
    }
    let hs = [
        ("Host", "a.example"),
        ("Connection", "Upgrade, HTTP2-Settings"),
        ("Upgrade", "h2c"),
        ("HTTP2-Settings", "AAMAAABkAAQAoAAAAAIAAAAA"),
    ];
    let out = general(Some(1), None, &hs, &vs[DEFAULT]).unwrap();
    for gone in ["upgrade", "http2-settings", "connection"] {
        assert!(!names(&out).contains(&gone), "{gone} forwarded: {out:?}");
    }
    // A list that hides h2c behind WebSocket tunnels only WebSocket.
    let hs = [
        ("Host", "a.example"),
        ("Connection", "upgrade"),
        ("Upgrade", "h2c, websocket"),
    ];
    let out = general(Some(1), None, &hs, &vs[DEFAULT]).unwrap();
    assert_eq!(get(&out, "upgrade"), ["websocket"]);
    // HTTP/1.0 cannot upgrade; an unlisted protocol is not tunneled.
    let hs = [
        ("Host", "a"),
        ("Connection", "upgrade"),
        ("Upgrade", "websocket"),
    ];
    assert!(get(
        &general(Some(0), None, &hs, &vs[DEFAULT]).unwrap(),
        "upgrade"
    )
    .is_empty());
    let hs = [("Host", "a"), ("Connection", "upgrade"), ("Upgrade", "foo")];
    assert!(get(
        &general(Some(1), None, &hs, &vs[DEFAULT]).unwrap(),
        "upgrade"
    )
    .is_empty());
    assert_eq!(
        get(
            &general(Some(1), None, &hs, &vs[UNDERSCORES]).unwrap(),
            "upgrade"
        ),
        ["foo"]
    );
}

#[test]
fn content_length_with_transfer_encoding_is_400() {
    for te in ["chunked", "Chunked", "gzip, chunked", "identity"] {
        let raw = format!(
            "POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\nTransfer-Encoding: {te}\r\n\r\nhello"
        );
        refused_everywhere(
            &raw,
            &[
                ("Host", "a"),
                ("Content-Length", "5"),
                ("Transfer-Encoding", te),
            ],
            400,
        );
    }
    // Either order, and with the length repeated.
    refused_everywhere(
        "POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\nContent-Length: 5\r\nContent-Length: 5\r\n\r\n",
        &[
            ("Host", "a"),
            ("Transfer-Encoding", "chunked"),
            ("Content-Length", "5"),
            ("Content-Length", "5"),
        ],
        400,
    );
}

#[test]
fn bad_content_lengths_are_400() {
    for cl in [
        "+5",
        "-1",
        "0x5",
        "5, 5",
        "5 5",
        "",
        "99999999999999999999",
        "1e3",
    ] {
        let raw = format!("POST / HTTP/1.1\r\nHost: a\r\nContent-Length: {cl}\r\n\r\n");
        refused_everywhere(&raw, &[("Host", "a"), ("Content-Length", cl)], 400);
    }
    refused_everywhere(
        "POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\n",
        &[
            ("Host", "a"),
            ("Content-Length", "5"),
            ("Content-Length", "6"),
        ],
        400,
    );
}

#[test]
fn stacked_or_odd_transfer_codings_are_refused() {
    let vs = variants();
    for te in [
        "gzip, chunked",
        "chunked, chunked",
        "chunked, gzip",
        "identity",
        "x",
    ] {
        let hs = [("Host", "a"), ("Transfer-Encoding", te)];
        assert_eq!(
            general(Some(1), None, &hs, &vs[DEFAULT]).unwrap_err(),
            400,
            "{te}"
        );
    }
    let hs = [
        ("Host", "a"),
        ("Transfer-Encoding", "chunked"),
        ("Transfer-Encoding", "chunked"),
    ];
    assert_eq!(general(Some(1), None, &hs, &vs[DEFAULT]).unwrap_err(), 400);
    // HTTP/1.0 has no chunked coding.
    let hs = [("Host", "a"), ("Transfer-Encoding", "chunked")];
    assert_eq!(general(Some(0), None, &hs, &vs[DEFAULT]).unwrap_err(), 400);
    // A TE header with a space before the colon, which httparse refuses, goes to the general
    // path, never upstream as is (a chunked body on the fast path is re-framed by shoal).
    let raw = "POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding : chunked\r\n\r\n";
    assert_eq!(fast(raw.as_bytes(), &vs[DEFAULT]), "handover", "{raw:?}");
}

#[test]
fn malformed_chunk_sizes_fail_the_body() {
    for body in [
        &b"0x5\r\nhello\r\n0\r\n\r\n"[..],
        b"-5\r\nhello\r\n0\r\n\r\n",
        b"+5\r\nhello\r\n0\r\n\r\n",
        b" 5\r\nhello\r\n0\r\n\r\n",
        b"5\nhello\r\n0\r\n\r\n",
        b"5\r\nhello\n0\r\n\r\n",
        b"5\r\nhelloo\r\n0\r\n\r\n",
        b"ffffffffffffffffffff\r\n",
        b"100000000000001\r\n",
        b"5;ext\nhello\r\n",
        b"0\r\n\n",
        b"0\r\nX: 1\n\r\n",
        b"\0\r\n",
    ] {
        assert!(
            Chunked::default().feed(body).is_err(),
            "{:?}",
            String::from_utf8_lossy(body)
        );
        // The request side (a chunked upload on the fast path) refuses the same shapes.
        let mut d = super::super::body::Decoder::new(8192, 100);
        assert!(
            d.decode(body, &mut Vec::new()).is_err(),
            "request {:?}",
            String::from_utf8_lossy(body)
        );
    }
    // The largest size accepted still waits for its data; it never wraps around.
    let mut c = Chunked::default();
    assert_eq!(c.feed(b"100000000000000\r\nabc").unwrap(), None);
    let mut d = super::super::body::Decoder::new(8192, 100);
    assert_eq!(
        d.decode(b"100000000000000\r\nabc", &mut Vec::new()),
        Ok((20, false))
    );
}

#[test]
fn absolute_form_target_authority_wins() {
    let vs = variants();
    let raw = b"GET http://other.example/p HTTP/1.1\r\nHost: a.example\r\n\r\n";
    assert_eq!(fast(raw, &vs[DEFAULT]), "handover");
    let hs = [("Host", "a.example")];
    let out = general(Some(1), Some("other.example"), &hs, &vs[DEFAULT]).unwrap();
    assert_eq!(get(&out, "host"), ["other.example"]);
    assert_eq!(get(&out, "x-forwarded-host"), ["other.example"]);
    // Without a Host header too (HTTP/1.0), and an invalid target authority is refused.
    let out = general(Some(0), Some("other.example:8080"), &[], &vs[DEFAULT]).unwrap();
    assert_eq!(get(&out, "host"), ["other.example:8080"]);
    for bad in ["", "user@other.example", "a b", "a,b", "[::1", "a:99999999"] {
        assert_eq!(
            general(Some(1), Some(bad), &hs, &vs[DEFAULT]).unwrap_err(),
            400,
            "{bad:?}"
        );
    }
}

#[test]
fn invalid_list_empty_and_duplicate_host_are_400() {
    for host in [
        "",
        " ",
        "a.example, b.example",
        "a b",
        "user@a.example",
        "a.example/x",
        "a.example:80x",
        "a.example:123456",
        "[::1",
        "a\tb",
    ] {
        let raw = format!("GET / HTTP/1.1\r\nHost: {host}\r\n\r\n");
        let vs = variants();
        let f = fast(raw.as_bytes(), &vs[DEFAULT]);
        assert!(f == "reject 400" || f == "handover", "{host:?}: {f}");
        for minor in [Some(1), Some(0), None] {
            assert_eq!(
                general(minor, None, &[("Host", host)], &vs[DEFAULT]).unwrap_err(),
                400,
                "{host:?}"
            );
        }
    }
    refused_everywhere(
        "GET / HTTP/1.1\r\nHost: a\r\nhost: b\r\n\r\n",
        &[("Host", "a"), ("host", "b")],
        400,
    );
    refused_everywhere(
        "GET / HTTP/1.1\r\nHost: a\r\nHOST: a\r\n\r\n",
        &[("Host", "a"), ("HOST", "a")],
        400,
    );
    let vs = variants();
    assert_eq!(fast(b"GET / HTTP/1.1\r\n\r\n", &vs[DEFAULT]), "reject 400");
    assert_eq!(general(Some(1), None, &[], &vs[DEFAULT]).unwrap_err(), 400);
}

#[test]
fn connection_cannot_strip_host_or_framing() {
    let vs = variants();
    let raw = "POST / HTTP/1.1\r\nHost: a.example\r\nConnection: close, Host, Content-Length, x-secret\r\n\
               Content-Length: 2\r\nX-Secret: 1\r\nX-Kept: 1\r\n\r\nhi";
    let out = fast(raw.as_bytes(), &vs[DEFAULT]);
    assert!(out.contains("\r\nhost: a.example\r\n"), "{out}");
    assert!(out.contains("\r\nContent-Length: 2\r\n"), "{out}");
    assert!(out.contains("\r\nX-Kept: 1\r\n"), "{out}");
    assert!(!out.to_ascii_lowercase().contains("x-secret"), "{out}");
    let hs = [
        ("Host", "a.example"),
        ("Connection", "close, Host, Content-Length, x-secret"),
        ("Content-Length", "2"),
        ("X-Secret", "1"),
    ];
    let out = general(Some(1), None, &hs, &vs[DEFAULT]).unwrap();
    assert_eq!(get(&out, "host"), ["a.example"]);
    assert_eq!(get(&out, "content-length"), ["2"]);
    assert!(get(&out, "x-secret").is_empty());
}

#[test]
fn client_forwarding_headers_are_replaced_unless_trusted() {
    let vs = variants();
    let spoof =
        "X-Forwarded-For: 6.6.6.6\r\nX-Forwarded-Proto: https\r\nX-Forwarded-Host: evil\r\n\
                 X-Forwarded-Port: 443\r\nX-Forwarded-Prefix: /admin\r\nX-Real-IP: 6.6.6.6\r\n\
                 Forwarded: for=6.6.6.6;proto=https\r\nX_Forwarded_For: 6.6.6.6\r\n\
                 X-Real_IP: 6.6.6.6\r\n";
    let raw = format!("GET / HTTP/1.1\r\nHost: a.example\r\n{spoof}\r\n");
    let out = fast(raw.as_bytes(), &vs[DEFAULT]);
    assert!(
        !out.contains("6.6.6.6") && !out.contains("evil") && !out.contains("https"),
        "{out}"
    );
    // The port as a header value (a random traceparent id may hold the digits "443").
    assert!(
        !out.contains("/admin") && !out.contains(": 443\r\n"),
        "{out}"
    );
    assert!(out.contains("x-forwarded-for: 10.1.2.3\r\n"), "{out}");
    assert!(
        out.contains("forwarded: for=10.1.2.3;host=\"a.example\";proto=http\r\n"),
        "{out}"
    );
    // A trusted peer's chain is kept and appended to; underscore twins still go.
    let out = fast(raw.as_bytes(), &vs[TRUSTING]);
    assert!(
        out.contains("x-forwarded-for: 6.6.6.6, 10.1.2.3\r\n"),
        "{out}"
    );
    assert!(out.contains("X-Forwarded-Proto: https\r\n"), "{out}");
    assert!(
        out.contains(
            "forwarded: for=6.6.6.6;proto=https, for=10.1.2.3;host=\"a.example\";proto=http\r\n"
        ),
        "{out}"
    );
    assert!(
        !out.contains("X_Forwarded_For") && !out.contains("X-Real_IP"),
        "{out}"
    );
}

#[test]
fn underscore_twins_are_dropped_unless_allowed() {
    let vs = variants();
    let raw = b"GET / HTTP/1.1\r\nHost: a\r\nX_Forwarded_For: 6.6.6.6\r\nContent_Length: 5\r\n\
                Transfer_Encoding: chunked\r\nX_User: bob\r\n\r\n";
    let out = fast(raw, &vs[DEFAULT]);
    assert!(out.starts_with("ready\n") && !out.contains('_'), "{out}");
    let out = fast(raw, &vs[UNDERSCORES]);
    assert!(out.contains("X_User: bob\r\n"), "{out}");
    assert!(out.contains("Content_Length: 5\r\n"), "{out}");
    // Never mistaken for the framing header they resemble.
    assert!(
        !out.to_ascii_lowercase().contains("content-length"),
        "{out}"
    );
}

#[test]
fn obs_fold_bare_lf_and_nul_never_reach_upstream_as_sent() {
    let vs = variants();
    // Obsolete line folding and NUL bytes: not parsed here; the general path refuses them.
    for raw in [
        &b"GET / HTTP/1.1\r\nHost: a\r\nX-A: 1\r\n 2\r\n\r\n"[..],
        b"GET / HTTP/1.1\r\nHost: a\r\n\tb\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: a\r\nX-A: 1\0\r\n\r\n",
        b"GET /\0 HTTP/1.1\r\nHost: a\r\n\r\n",
        b"GET / HTTP/1.1\r\nHo\0st: a\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: a\rX-B: 1\r\n\r\n",
    ] {
        let out = fast(raw, &vs[DEFAULT]);
        assert!(
            out == "handover" || out.starts_with("reject 4"),
            "{:?}: {out}",
            String::from_utf8_lossy(raw)
        );
    }
    // Bare LF line ends are read as line ends (RFC 9112 §2.2) and forwarded as CRLF.
    let out = fast(b"GET / HTTP/1.1\nHost: a\nX-A: 1\n\n", &vs[DEFAULT]);
    assert!(out.starts_with("ready\n"), "{out}");
    let head = &out["ready\n".len()..];
    assert!(head.contains("X-A: 1\r\n"), "{head}");
    assert_eq!(
        head.matches('\n').count(),
        head.matches("\r\n").count(),
        "{head}"
    );
}

#[test]
fn connect_and_oversized_heads_are_refused() {
    connect_is_405();
    let vs = variants();
    let small = &vs[3];
    assert_eq!(
        fast(b"GET /abcdefghi HTTP/1.1\r\nHost: a\r\n\r\n", small),
        "reject 414"
    );
    assert_eq!(
        fast(
            b"GET / HTTP/1.1\r\nHost: a\r\nA: 1\r\nB: 1\r\nC: 1\r\nD: 1\r\n\r\n",
            small
        ),
        "reject 431"
    );
}

fn connect_is_405() {
    let vs = variants();
    assert_eq!(
        fast(b"CONNECT a:443 HTTP/1.1\r\nHost: a\r\n\r\n", &vs[DEFAULT]),
        "handover"
    );
    assert_eq!(
        fast(b"CONNECT /x HTTP/1.1\r\nHost: a\r\n\r\n", &vs[DEFAULT]),
        "reject 405"
    );
    let line = Line {
        method: "CONNECT",
        target_len: 1,
        target_authority: Some(b"a:443"),
        minor: Some(1),
    };
    let e = hygiene::inspect(&line, std::iter::empty(), &vs[DEFAULT].cfg, peer().ip()).unwrap_err();
    assert_eq!(e.status().as_u16(), 405);
}

#[test]
fn config_syntax_errors_name_line_and_field() {
    for (text, line, field) in [
        ("#\0 comment\n", 1, "(top level)"),
        ("[\n[services.web]\n", 1, "(top level)"),
        (
            "[services.web]\nlisten = \"127.0.0.1:1\"\n# a\0\n",
            3,
            "services.web",
        ),
    ] {
        let e = crate::config::Config::parse(std::path::Path::new("c.toml"), text).unwrap_err();
        assert!(!e.message.is_empty(), "{e:?}");
        assert_eq!((e.line, e.field.as_str()), (line, field), "{e:?}");
    }
}

#[test]
fn connection_close_wins_over_keep_alive_in_any_order() {
    let vs = variants();
    for (minor, hs) in [
        (Some(0), [("Connection", "close, keep-alive"), ("X", "1")]),
        (
            Some(0),
            [("Connection", "close"), ("Connection", "keep-alive")],
        ),
        (
            Some(1),
            [("Connection", "keep-alive, close"), ("Host", "a")],
        ),
    ] {
        let line = Line {
            method: "GET",
            target_len: 1,
            target_authority: Some(b"a"),
            minor,
        };
        let it = hs.iter().map(|(n, v)| (n.as_bytes(), v.as_bytes()));
        let f = hygiene::inspect(&line, it, &vs[DEFAULT].cfg, peer().ip()).unwrap();
        assert!(f.close, "{hs:?}");
    }
}
