//! Property tests (fuzzing on the stable toolchain) for the parts of the data path that read
//! untrusted bytes: the request-head planner and the hygiene rules under it, the response
//! planner, the chunk tracker, the route matcher and config parsing; plus a corpus of hostile
//! request shapes as plain unit tests ([`corpus`]).
//!
//! Generators build *structured* input (method, target, header names from a list of tricky
//! ones, values with tricky bytes) and then mutate the bytes, so most cases get past the
//! parser and reach the rules. Each target checks properties, not just "no panic"; a panic is
//! caught by the runner and reported as a failure with a shrunk input.
//!
//! Cases per target: `SHOAL_FUZZ_CASES` (default: a short pass for CI). Each target prints
//! `fuzz <target>: <n> inputs, <p> panics` on stderr (panics: inputs, shrinking
//! included, on which the code under test panicked), which `bench/fuzz.sh` adds up.
//!
//! The module sits under `h1` because the planners and the chunk tracker are private to it.

mod corpus;
mod gen;
mod request;
mod response;
mod routes_config;

use std::fmt::Debug;
use std::mem::MaybeUninit;
use std::net::SocketAddr;
use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicU64, Ordering};

use proptest::strategy::Strategy;
use proptest::test_runner::{Config as RunnerConfig, TestCaseError, TestRunner};

/// Cases per target: `SHOAL_FUZZ_CASES`, else `default`.
fn cases(default: u32) -> u32 {
    std::env::var("SHOAL_FUZZ_CASES")
        .ok()
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(default)
}

/// Runs `test` on `cases` inputs from `strategy`; panics (failing the test) with the shrunk
/// input when a property fails or the code under test panics.
fn run<S>(
    name: &str,
    default: u32,
    strategy: S,
    test: impl Fn(S::Value) -> Result<(), TestCaseError>,
) where
    S: Strategy,
    S::Value: Debug,
{
    let config = RunnerConfig {
        cases: cases(default),
        failure_persistence: None,
        max_shrink_iters: 4096,
        ..RunnerConfig::default()
    };
    let mut runner = TestRunner::new(config);
    let count = AtomicU64::new(0);
    let panics = AtomicU64::new(0);
    let result = runner.run(&strategy, |v| {
        count.fetch_add(1, Ordering::Relaxed);
        // Panics are told apart from failed properties (the runner's hook keeps them quiet).
        std::panic::catch_unwind(AssertUnwindSafe(|| test(v))).unwrap_or_else(|p| {
            panics.fetch_add(1, Ordering::Relaxed);
            let msg = p
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| p.downcast_ref::<String>().cloned())
                .unwrap_or_default();
            Err(TestCaseError::fail(format!("panicked: {msg}")))
        })
    });
    eprintln!(
        "fuzz {name}: {} inputs, {} panics",
        count.load(Ordering::Relaxed),
        panics.load(Ordering::Relaxed)
    );
    if let Err(e) = result {
        panic!("fuzz {name}: {e}");
    }
}

/// The client every planned request comes from.
fn peer() -> SocketAddr {
    "10.1.2.3:5555".parse().unwrap()
}
const PEER_IP: &str = "10.1.2.3";
const PORT: u16 = 8080;
/// The trace context the shared rules are given for the hop.
const TRACE: [u8; 55] = *b"00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01";

/// A parsed HTTP/1 message head: (name, value) pairs, and the head's length.
struct Head {
    method: Option<String>,
    path: Option<String>,
    version: Option<u8>,
    code: Option<u16>,
    headers: Vec<(String, Vec<u8>)>,
    len: usize,
}

/// Parses a request (`request`) or response head the way the fast path does.
fn parse_head(buf: &[u8], request: bool) -> Result<Option<Head>, httparse::Error> {
    let mut slots = [const { MaybeUninit::<httparse::Header>::uninit() }; 512];
    let pairs = |hs: &[httparse::Header]| {
        hs.iter()
            .map(|h| (h.name.to_ascii_lowercase(), h.value.to_vec()))
            .collect()
    };
    if request {
        let mut r = httparse::Request::new(&mut []);
        Ok(match r.parse_with_uninit_headers(buf, &mut slots)? {
            httparse::Status::Complete(len) => Some(Head {
                method: r.method.map(str::to_string),
                path: r.path.map(str::to_string),
                version: r.version,
                code: None,
                headers: pairs(r.headers),
                len,
            }),
            httparse::Status::Partial => None,
        })
    } else {
        let mut r = httparse::Response::new(&mut []);
        let parsed = httparse::ParserConfig::default()
            .parse_response_with_uninit_headers(&mut r, buf, &mut slots)?;
        Ok(match parsed {
            httparse::Status::Complete(len) => Some(Head {
                method: None,
                path: None,
                version: r.version,
                code: r.code,
                headers: pairs(r.headers),
                len,
            }),
            httparse::Status::Partial => None,
        })
    }
}

impl Head {
    fn all(&self, name: &str) -> Vec<&[u8]> {
        self.headers
            .iter()
            .filter(|(n, _)| n == name)
            .map(|(_, v)| v.as_slice())
            .collect()
    }

    fn has(&self, name: &str) -> bool {
        self.headers.iter().any(|(n, _)| n == name)
    }

    /// Tokens of every `Connection` header, lowercased.
    fn connection_tokens(&self) -> Vec<String> {
        self.all("connection")
            .iter()
            .flat_map(|v| v.split(|&b| b == b','))
            .map(|t| String::from_utf8_lossy(t.trim_ascii()).to_ascii_lowercase())
            .filter(|t| !t.is_empty())
            .collect()
    }
}

/// Hop-by-hop headers: never forwarded by a proxy (RFC 9110 §7.6.1), plus the request's
/// framing and expectation, which shoal re-creates itself.
const HOP: &[&str] = &[
    "connection",
    "keep-alive",
    "proxy-connection",
    "te",
    "trailer",
    "upgrade",
    "http2-settings",
    "proxy-authorization",
    "proxy-authenticate",
    "transfer-encoding",
];

/// Client forwarding headers that shoal drops unless the peer is a trusted proxy.
const FORWARDING: &[&str] = &[
    "x-forwarded-for",
    "x-forwarded-proto",
    "x-forwarded-host",
    "x-forwarded-port",
    "x-forwarded-prefix",
    "x-real-ip",
    "forwarded",
];

/// An authority an origin can trust: non-empty, one value, no whitespace, userinfo or path.
fn plausible_authority(v: &[u8]) -> bool {
    !v.is_empty()
        && v.len() <= 255
        && !v
            .iter()
            .any(|b| b.is_ascii_whitespace() || b",@/\\?#\"<>".contains(b) || !b.is_ascii_graphic())
}

/// `needle` appears in `hay` in order (not necessarily adjacent).
fn is_subsequence<T: PartialEq>(needle: &[T], hay: &[T]) -> bool {
    let mut it = hay.iter();
    needle.iter().all(|n| it.any(|h| h == n))
}
