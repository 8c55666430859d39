//! Upstream responses: the response planner (`plan_response`) and the chunk tracker
//! (`Chunked::feed`).

use std::sync::atomic::{AtomicU64, Ordering};

use proptest::collection::vec;
use proptest::prelude::*;
use proptest::sample::select;
use proptest::test_runner::TestCaseError;

use super::gen;
use super::{is_subsequence, parse_head, run};
use crate::h1::{plan_response, Chunked, Framing, RespParsed};

const RESPONSE_HOP: &[&str] = &[
    "keep-alive",
    "proxy-connection",
    "te",
    "trailer",
    "upgrade",
    "http2-settings",
    "proxy-authenticate",
    "proxy-authorization",
];

fn check_response(
    raw: &[u8],
    head_method: bool,
    close_client: bool,
) -> Result<bool, TestCaseError> {
    let mut out = Vec::new();
    let r = plan_response(raw, head_method, close_client, &mut out);
    let input = parse_head(raw, false);
    let p = match r {
        RespParsed::Partial => {
            prop_assert!(matches!(input, Ok(None)), "partial but httparse disagrees");
            return Ok(false);
        }
        RespParsed::Bad(_) => return Ok(false),
        RespParsed::Interim(n) => {
            let Ok(Some(h)) = input else {
                return Err(TestCaseError::fail("interim, but the head does not parse"));
            };
            prop_assert_eq!(n, h.len);
            let code = h.code.unwrap_or(0);
            prop_assert!(
                (100..200).contains(&code) && code != 101,
                "interim {}",
                code
            );
            return Ok(false);
        }
        RespParsed::Ready(p) => p,
    };
    prop_assert!((200..=599).contains(&p.status), "status {}", p.status);
    let Ok(Some(h)) = input else {
        return Err(TestCaseError::fail("ready, but the head does not parse"));
    };
    prop_assert_eq!(p.head_len, h.len);
    prop_assert_eq!(h.code, Some(p.status));
    let Ok(Some(o)) = parse_head(&out, false) else {
        return Err(TestCaseError::fail("client head does not parse"));
    };
    prop_assert_eq!(o.len, out.len());
    prop_assert_eq!(o.code, Some(p.status));
    for hop in RESPONSE_HOP {
        prop_assert!(!o.has(hop), "hop-by-hop {} relayed", hop);
    }
    let closes = o.all("connection");
    prop_assert!(closes.iter().all(|v| *v == b"close"));
    prop_assert_eq!(
        closes.len(),
        usize::from(close_client || (p.framing == Framing::Close && !p.rechunk))
    );
    // A body until close is chunked on the way when it has no coding of its own.
    prop_assert_eq!(
        p.rechunk,
        p.framing == Framing::Close && !h.has("transfer-encoding")
    );
    if p.rechunk {
        prop_assert_eq!(o.all("transfer-encoding"), vec![&b"chunked"[..]]);
        prop_assert!(!o.has("content-length"));
    }
    let tokens = h.connection_tokens();
    let no_body = head_method || p.status == 204 || p.status == 304;
    prop_assert_eq!(no_body, p.framing == Framing::Empty);
    match p.framing {
        Framing::Chunked => {
            prop_assert!(o.has("transfer-encoding") && !o.has("content-length"));
        }
        Framing::Length(n) => {
            prop_assert!(!h.has("transfer-encoding") && !o.has("transfer-encoding"));
            let cl = o.all("content-length");
            prop_assert!(!cl.is_empty());
            for v in cl {
                let v = std::str::from_utf8(v)
                    .ok()
                    .and_then(|v| v.trim().parse().ok());
                prop_assert_eq!(v, Some(n));
            }
        }
        Framing::Close => prop_assert!(!p.reusable),
        Framing::Empty => prop_assert!(!o.has("transfer-encoding")),
    }
    if p.reusable {
        prop_assert_eq!(h.version, Some(1));
        prop_assert!(!tokens.iter().any(|t| t == "close"));
    }
    // End-to-end headers reach the client in order, unless the response's Connection
    // names them.
    // Framing (and Host, like on requests) is never named away.
    let framing = ["connection", "content-length", "transfer-encoding", "host"];
    let kept: Vec<_> = h
        .headers
        .iter()
        .filter(|(n, _)| {
            !RESPONSE_HOP.contains(&n.as_str())
                && !framing.contains(&n.as_str())
                && !tokens.contains(n)
        })
        .cloned()
        .collect();
    for (n, _) in &o.headers {
        prop_assert!(
            !tokens.contains(n) || framing.contains(&n.as_str()) || n == "via",
            "{} named by Connection but relayed",
            n
        );
    }
    prop_assert!(is_subsequence(&kept, &o.headers), "end-to-end headers lost");
    Ok(true)
}

#[test]
fn plan_response_properties() {
    let strategy = (gen::response(), gen::edits(), any::<bool>(), any::<bool>());
    let ready = AtomicU64::new(0);
    run(
        "plan_response",
        2500,
        strategy,
        |(resp, edits, head, close)| {
            let raw = gen::apply(resp.bytes(), &edits);
            if check_response(&raw, head, close)? {
                ready.fetch_add(1, Ordering::Relaxed);
            }
            Ok(())
        },
    );
    let ready = ready.into_inner();
    let cases = u64::from(super::cases(2500));
    eprintln!("fuzz plan_response: {ready} of {cases} heads planned");
    assert!(ready * 10 >= cases, "only {ready} heads planned");
}

fn whole(data: &[u8]) -> Result<Option<usize>, ()> {
    Chunked::default().feed(data)
}

/// Feeds `data` in the pieces `cuts` makes (sorted offsets); where the body ends, if it does.
fn pieces(data: &[u8], cuts: impl IntoIterator<Item = usize>) -> Result<Option<usize>, ()> {
    let mut c = Chunked::default();
    let mut start = 0;
    for end in cuts.into_iter().chain([data.len()]) {
        let end = end.clamp(start, data.len());
        if let Some(n) = c.feed(&data[start..end])? {
            return Ok(Some(start + n));
        }
        start = end;
    }
    Ok(None)
}

/// One verdict for every way the same bytes arrive.
fn check_splits(data: &[u8], cuts: &[usize]) -> Result<Option<usize>, TestCaseError> {
    let v = whole(data);
    if let Ok(Some(n)) = v {
        prop_assert!(n <= data.len());
    }
    for s in 0..=data.len() {
        prop_assert_eq!(pieces(data, [s]), v, "split at {}", s);
    }
    prop_assert_eq!(pieces(data, 1..data.len()), v, "byte by byte");
    let mut cuts: Vec<usize> = cuts.iter().map(|c| c % (data.len() + 1)).collect();
    cuts.sort_unstable();
    prop_assert_eq!(pieces(data, cuts), v, "random pieces");
    Ok(v.unwrap_or(None))
}

#[test]
fn chunked_verdict_does_not_depend_on_the_split() {
    let strategy = (gen::chunked_body(), gen::edits(), vec(any::<usize>(), 0..6));
    run("chunked", 1500, strategy, |(body, edits, cuts)| {
        let (raw, end) = body.bytes();
        let mutated = !edits.is_empty();
        let data = gen::apply(raw, &edits);
        let v = check_splits(&data, &cuts)?;
        if !mutated {
            prop_assert_eq!(v, Some(end), "a well-formed body's end");
        }
        Ok(())
    });
}

/// A size line that is not a plain hex size fails the body, wherever it comes.
#[test]
fn chunked_hostile_sizes_fail() {
    let strategy = (
        gen::chunked_body(),
        select(gen::HOSTILE_SIZES),
        any::<usize>(),
        vec(any::<usize>(), 0..6),
    );
    run(
        "chunked_hostile",
        1000,
        strategy,
        |(body, size, at, cuts)| {
            let (raw, end) = body.bytes();
            // After a whole chunk (or at the start): where a size line begins.
            let starts: Vec<usize> = std::iter::once(0)
                .chain(body.chunks.iter().scan(0, |off, (d, s, e)| {
                    let zeros = usize::from(s % 3);
                    *off += zeros + format!("{:x}", d.len()).len() + e.len() + 2 + d.len() + 2;
                    Some(*off)
                }))
                .collect();
            let at = starts[at % starts.len()];
            let mut data = raw[..at].to_vec();
            data.extend_from_slice(size.as_bytes());
            data.extend_from_slice(b"\r\n");
            data.extend_from_slice(&raw[at..end]);
            let v = check_splits(&data, &cuts)?;
            // The huge sizes that are hex are refused before any data is awaited.
            prop_assert!(v.is_none(), "{:?} accepted", size);
            prop_assert!(whole(&data).is_err(), "{:?} not refused", size);
            Ok(())
        },
    );
}

/// The request side: a chunked upload the fast path streams is decoded by
/// `body::Decoder`, which must find the same end as the tracker (or refuse), whatever the
/// pieces, and re-frame it into a body the tracker reads whole, with the same data.
#[test]
fn request_chunks_are_reframed_faithfully() {
    use crate::h1::body::Decoder;
    /// The data of a chunked body the tracker accepted whole.
    fn data_of(mut b: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        loop {
            let line = b.windows(2).position(|w| w == b"\r\n").unwrap();
            let digits: Vec<u8> = b[..line]
                .iter()
                .take_while(|c| c.is_ascii_hexdigit())
                .copied()
                .collect();
            let n = usize::from_str_radix(std::str::from_utf8(&digits).unwrap(), 16).unwrap();
            if n == 0 {
                return out;
            }
            out.extend_from_slice(&b[line + 2..line + 2 + n]);
            b = &b[line + 4 + n..];
        }
    }
    /// Decodes `data` in the pieces `cuts` makes: the end (if any) and the output.
    fn decode(data: &[u8], cuts: &[usize]) -> Result<(Option<usize>, Vec<u8>), &'static str> {
        let mut d = Decoder::new(8192, 100);
        let mut out = Vec::new();
        let mut start = 0;
        for &end in cuts.iter().chain([&data.len()]) {
            let end = end.clamp(start, data.len());
            let (used, done) = d.decode(&data[start..end], &mut out)?;
            if done {
                return Ok((Some(start + used), out));
            }
            assert_eq!(used, end - start, "an unfinished body takes every byte");
            start = end;
        }
        Ok((None, out))
    }
    let strategy = (gen::chunked_body(), gen::edits(), vec(any::<usize>(), 0..6));
    run("request_chunks", 1500, strategy, |(body, edits, cuts)| {
        let (raw, end) = body.bytes();
        let mutated = !edits.is_empty();
        let data = gen::apply(raw, &edits);
        let v = decode(&data, &[]);
        let mut sorted: Vec<usize> = cuts.iter().map(|c| c % (data.len() + 1)).collect();
        sorted.sort_unstable();
        prop_assert_eq!(&decode(&data, &sorted), &v, "random pieces");
        let bytes: Vec<usize> = (1..data.len()).collect();
        prop_assert_eq!(&decode(&data, &bytes), &v, "byte by byte");
        if !mutated {
            prop_assert_eq!(v.as_ref().map(|(e, _)| *e), Ok(Some(end)));
        }
        let tracked = whole(&data);
        match &v {
            // Refused by the tracker: refused here too.
            _ if tracked.is_err() => prop_assert!(v.is_err(), "the tracker refuses it"),
            Ok((Some(e), out)) => {
                prop_assert_eq!(tracked, Ok(Some(*e)));
                prop_assert_eq!(whole(out), Ok(Some(out.len())), "re-framed body");
                prop_assert_eq!(data_of(out), data_of(&data[..*e]));
            }
            Ok((None, _)) => prop_assert_eq!(tracked, Ok(None)),
            // Stricter about trailers than the tracker (parsed, bounded): fine.
            Err(_) => {}
        }
        Ok(())
    });
}
