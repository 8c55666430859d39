//! Request heads: the fast path's planner (`plan_request`) and, on their own, the hygiene
//! rules both paths share (`hygiene::inspect`, `hygiene::forward_headers`).

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use proptest::collection::vec;
use proptest::prelude::*;
use proptest::sample::select;
use proptest::test_runner::TestCaseError;
use shoal_balance::Algorithm;

use super::gen;
use super::TRACE;
use super::{
    is_subsequence, parse_head, peer, plausible_authority, run, FORWARDING, HOP, PEER_IP, PORT,
};
use crate::config::{RouteConfig, ServiceConfig};
use crate::h1::{plan_request, Parsed};
use crate::hygiene::{self, BodyKind, Line, Origin};
use crate::proxy::Service;
use crate::route::{Route, RouteTable};

/// A listening service the planner runs against.
pub(super) struct Variant {
    pub cfg: ServiceConfig,
    pub svc: Arc<Service>,
    pub trusted: bool,
    pub routed: bool,
}

fn quick(name: &str) -> ServiceConfig {
    ServiceConfig::quick(name, "127.0.0.1:0".parse().unwrap(), Algorithm::RoundRobin)
}

/// The configurations every request is tried against: default, trusting the peer,
/// underscores and an extra upgrade allowed, routes, and tight limits.
pub(super) fn variants() -> Vec<Variant> {
    let mut out = Vec::new();
    let plain = |cfg: ServiceConfig, trusted| Variant {
        svc: Service::new(cfg.clone()),
        cfg,
        trusted,
        routed: false,
    };
    out.push(plain(quick("web"), false));
    let mut c = quick("web");
    c.trusted_proxies = vec!["10.0.0.0/8".parse().unwrap()];
    out.push(plain(c, true));
    let mut c = quick("web");
    c.allow_underscore_headers = true;
    c.allowed_upgrades = vec!["foo".into()];
    out.push(plain(c, false));
    let mut c = quick("web");
    c.limits.max_headers = 4;
    c.limits.max_request_line = 8;
    c.limits.max_header_bytes = 64;
    out.push(plain(c, false));

    let route = |host: Option<&str>, prefix: &str, methods: &[&str], to: &str, replace| Route {
        config: RouteConfig {
            host: host.map(str::to_string),
            prefix: prefix.into(),
            methods: methods.iter().map(|m| m.to_string()).collect(),
            service: to.into(),
            replace,
            cache: None,
            extra: BTreeMap::new(),
        },
        target: Service::new(quick(to)),
        cache: None,
        jobs: Default::default(),
    };
    let cfg = quick("web");
    let svc = Service::new(cfg.clone());
    svc.routes.store(Some(Arc::new(RouteTable::new(vec![
        route(Some("a.example"), "/", &[], "web", None),
        route(None, "/api", &[], "api", Some(String::new())),
        route(None, "/api", &["POST"], "write", None),
        route(
            Some("*.a.example"),
            "/admin/",
            &[],
            "admin",
            Some("/internal".into()),
        ),
    ]))));
    out.push(Variant {
        cfg,
        svc,
        trusted: false,
        routed: true,
    });
    out
}

/// Headers shoal itself sets upstream (so they may appear although the client named them).
fn set_by_shoal(n: &str) -> bool {
    FORWARDING.contains(&n) || ["via", "host", "content-length", "traceparent"].contains(&n)
}

/// Headers the rules treat specially; all others are end-to-end and must get through.
fn special(n: &str) -> bool {
    HOP.contains(&n)
        || FORWARDING.contains(&n)
        || ["host", "content-length", "expect", "traceparent"].contains(&n)
}

type Pairs = Vec<(String, Vec<u8>)>;

fn lower_pairs<'a>(it: impl Iterator<Item = (&'a [u8], &'a [u8])>) -> Pairs {
    it.map(|(n, v)| (String::from_utf8_lossy(n).to_ascii_lowercase(), v.to_vec()))
        .collect()
}

fn values<'a>(p: &'a Pairs, name: &str) -> Vec<&'a [u8]> {
    p.iter()
        .filter(|(n, _)| n == name)
        .map(|(_, v)| v.as_slice())
        .collect()
}

fn connection_tokens(p: &Pairs) -> Vec<String> {
    values(p, "connection")
        .iter()
        .flat_map(|v| v.split(|&b| b == b','))
        .map(|t| String::from_utf8_lossy(t.trim_ascii()).to_ascii_lowercase())
        .filter(|t| !t.is_empty())
        .collect()
}

/// What the upstream header set must look like, whichever path wrote it.
pub(super) struct Expect<'a> {
    pub authority: Option<&'a [u8]>,
    pub trusted: bool,
    pub allow_underscore: bool,
    pub routed: bool,
    pub upgrade: Option<&'a [u8]>,
    pub expect: bool,
}

/// The properties of a forwarded header set `out` for the client headers `input`.
pub(super) fn check_forwarded(
    input: &Pairs,
    out: &Pairs,
    x: &Expect<'_>,
) -> Result<(), TestCaseError> {
    let hosts = values(out, "host");
    match x.authority {
        Some(a) => prop_assert_eq!(hosts, vec![a], "exactly one Host, the authority"),
        None => prop_assert!(hosts.is_empty()),
    }
    for h in HOP {
        let found = values(out, h);
        match (*h, x.upgrade) {
            ("upgrade", Some(p)) => prop_assert_eq!(found, vec![p]),
            ("connection", Some(_)) => prop_assert_eq!(found, vec![&b"upgrade"[..]]),
            _ => prop_assert!(found.is_empty(), "hop-by-hop {} forwarded", h),
        }
    }
    // The client's trace context is replaced by this hop's.
    prop_assert_eq!(values(out, "traceparent").len(), 1);
    let expect = values(out, "expect");
    prop_assert_eq!(expect.len(), usize::from(x.expect));
    let named: Vec<String> = connection_tokens(input)
        .into_iter()
        .filter(|t| !["close", "keep-alive", "upgrade"].contains(&t.as_str()))
        .collect();
    for (n, _) in out {
        prop_assert!(
            !named.contains(n) || set_by_shoal(n),
            "{} named by Connection but forwarded",
            n
        );
        prop_assert!(
            x.allow_underscore || !n.contains('_'),
            "{} has an underscore",
            n
        );
    }
    // Framing: the same Content-Length values, in order.
    prop_assert_eq!(
        values(input, "content-length"),
        values(out, "content-length")
    );
    let xff = values(out, "x-forwarded-for");
    let fwd = values(out, "forwarded");
    prop_assert_eq!(xff.len(), 1);
    prop_assert_eq!(fwd.len(), 1);
    prop_assert!(xff[0].ends_with(PEER_IP.as_bytes()));
    prop_assert!(fwd[0].ends_with(b";proto=http"));
    if !x.trusted {
        let host = x.authority.unwrap_or_default();
        let own = |n: &str| {
            values(out, n)
                .iter()
                .map(|v| v.to_vec())
                .collect::<Vec<_>>()
        };
        prop_assert_eq!(own("x-forwarded-for"), vec![PEER_IP.as_bytes().to_vec()]);
        prop_assert_eq!(own("x-forwarded-proto"), vec![b"http".to_vec()]);
        prop_assert_eq!(own("x-forwarded-port"), vec![PORT.to_string().into_bytes()]);
        prop_assert_eq!(
            own("x-forwarded-host"),
            x.authority
                .map(<[u8]>::to_vec)
                .into_iter()
                .collect::<Vec<_>>()
        );
        prop_assert!(own("x-real-ip").is_empty());
        prop_assert!(own("x-forwarded-prefix").len() <= usize::from(x.routed));
        let mut want = format!("for={PEER_IP}").into_bytes();
        if x.authority.is_some() {
            want.extend_from_slice(b";host=\"");
            want.extend_from_slice(host);
            want.push(b'"');
        }
        want.extend_from_slice(b";proto=http");
        prop_assert_eq!(fwd[0], &want[..]);
    }
    // Everything end-to-end gets through, in order and unchanged.
    let kept: Pairs = input
        .iter()
        .filter(|(n, _)| {
            !special(n) && !named.contains(n) && (x.allow_underscore || !n.contains('_'))
        })
        .cloned()
        .collect();
    prop_assert!(is_subsequence(&kept, out), "end-to-end headers lost");
    Ok(())
}

fn check_plan(raw: &[u8], v: &Variant) -> Result<bool, TestCaseError> {
    let mut out = Vec::new();
    let parsed = plan_request(
        raw,
        &v.svc,
        &v.cfg,
        peer(),
        PEER_IP.as_bytes(),
        PORT,
        &mut out,
        false,
    );
    let input = parse_head(raw, true);
    let plan = match parsed {
        Parsed::Partial => {
            prop_assert!(matches!(input, Ok(None)), "partial but httparse disagrees");
            return Ok(false);
        }
        Parsed::Handover => return Ok(false),
        Parsed::Reject(e, _) => {
            let s = e.status().as_u16();
            prop_assert!((400..500).contains(&s), "reject with {}", s);
            return Ok(false);
        }
        Parsed::Ready(plan) => plan,
        // No route in these variants caches.
        Parsed::Hit { .. } => return Err(TestCaseError::fail("a cache hit without a cache")),
    };
    let Ok(Some(inp)) = input else {
        return Err(TestCaseError::fail("ready, but the head does not parse"));
    };
    prop_assert_eq!(plan.head_len, inp.len);
    prop_assert_eq!(inp.version, Some(1));
    let method = inp.method.clone().unwrap_or_default();
    prop_assert!(method != "CONNECT");
    let path = inp.path.clone().unwrap_or_default();
    prop_assert!(path.starts_with('/'));
    let hosts = inp.all("host");
    prop_assert_eq!(hosts.len(), 1, "ready needs exactly one Host");
    let host = hosts[0].trim_ascii();
    prop_assert!(plausible_authority(host), "host {:?}", host);
    // A request TE on the fast path is one plain `chunked`, re-framed by shoal.
    let te = inp.all("transfer-encoding");
    prop_assert!(
        te.is_empty() || (te.len() == 1 && te[0].trim_ascii().eq_ignore_ascii_case(b"chunked")),
        "a request TE on the fast path: {:?}",
        te
    );
    prop_assert_eq!(
        plan.stream == Some(super::super::body::Streamed::Chunked),
        !te.is_empty()
    );
    let Ok(Some(mut o)) = parse_head(&out, true) else {
        return Err(TestCaseError::fail("upstream head does not parse"));
    };
    prop_assert_eq!(o.len, out.len(), "upstream head has trailing bytes");
    prop_assert_eq!(o.version, Some(1));
    prop_assert_eq!(o.method.as_deref(), Some(method.as_str()));
    let opath = o.path.clone().unwrap_or_default();
    if v.routed {
        prop_assert!(opath.starts_with('/'));
    } else {
        prop_assert_eq!(&opath, &path);
    }
    let lens: Vec<u64> = inp
        .all("content-length")
        .iter()
        .filter_map(|v| std::str::from_utf8(v).ok()?.trim().parse().ok())
        .collect();
    prop_assert_eq!(lens.len(), inp.all("content-length").len());
    prop_assert!(lens.windows(2).all(|w| w[0] == w[1]));
    // Read whole up to the replay limit (within the memory budget), else streamed.
    let len = lens.first().copied().unwrap_or(0);
    match plan.stream {
        Some(super::super::body::Streamed::Chunked) => prop_assert!(lens.is_empty()),
        Some(super::super::body::Streamed::Length(n)) => {
            prop_assert_eq!((plan.body_len as u64, n), (0, len))
        }
        None => {
            prop_assert!(len <= crate::proxy::REPLAY_LIMIT);
            prop_assert_eq!(plan.body_len as u64, len)
        }
    }
    let out_te = o.all("transfer-encoding");
    if te.is_empty() {
        prop_assert!(out_te.is_empty());
    } else {
        prop_assert_eq!(out_te, vec![&b"chunked"[..]]);
        o.headers.retain(|(n, _)| n != "transfer-encoding");
    }
    let tokens = inp.connection_tokens();
    prop_assert_eq!(plan.close, tokens.iter().any(|t| t == "close"));
    check_forwarded(
        &inp.headers,
        &o.headers,
        &Expect {
            authority: Some(host),
            trusted: v.trusted,
            allow_underscore: v.cfg.allow_underscore_headers,
            routed: v.routed,
            upgrade: None,
            expect: false,
        },
    )?;
    Ok(true)
}

#[test]
fn plan_request_properties() {
    let vs = variants();
    let strategy = (gen::request(), gen::edits(), 0..vs.len());
    let ready = AtomicU64::new(0);
    run("plan_request", 2500, strategy, |(req, edits, i)| {
        let raw = gen::apply(req.bytes(), &edits);
        if check_plan(&raw, &vs[i])? {
            ready.fetch_add(1, Ordering::Relaxed);
        }
        Ok(())
    });
    // The generators must keep reaching the rewrite, not only the parser's refusals.
    let ready = ready.into_inner();
    let cases = u64::from(super::cases(2500));
    eprintln!("fuzz plan_request: {ready} of {cases} heads planned");
    assert!(ready * 10 >= cases, "only {ready} heads planned");
}

/// A head that is split anywhere and completed later gets one verdict: no prefix of a head
/// is ever planned as a complete request of its own.
#[test]
fn plan_request_prefixes_are_partial_or_same() {
    let vs = variants();
    run(
        "plan_request_prefix",
        500,
        (gen::request(), any::<usize>()),
        |(req, cut)| {
            let raw = req.bytes();
            let Ok(Some(head)) = parse_head(&raw, true) else {
                return Ok(());
            };
            let cut = cut % head.len;
            let mut out = Vec::new();
            let p = plan_request(
                &raw[..cut],
                &vs[0].svc,
                &vs[0].cfg,
                peer(),
                PEER_IP.as_bytes(),
                PORT,
                &mut out,
                false,
            );
            prop_assert!(!matches!(p, Parsed::Ready(_)), "prefix {} planned", cut);
            Ok(())
        },
    );
}

/// The general path's view: any request line (HTTP/1.0, HTTP/2, absolute-form) and any
/// header pairs, straight into the shared rules.
#[test]
fn inspect_and_forward_headers_properties() {
    let vs = variants();
    let pair = (gen::name(), gen::value());
    let authority = prop_oneof![
        2 => Just(None),
        1 => select(gen::VALUES).prop_map(|v| Some(v.to_vec())),
    ];
    let strategy = (
        select(gen::METHODS),
        authority,
        select(&[Some(0u8), Some(1), Some(1), None][..]),
        vec(pair, 0..10),
        0..vs.len(),
    );
    run(
        "inspect",
        2500,
        strategy,
        |(method, authority, minor, headers, i)| {
            let v = &vs[i];
            let line = Line {
                method,
                target_len: 1,
                target_authority: authority.as_deref(),
                minor,
            };
            let it = || headers.iter().map(|(n, v)| (n.as_slice(), v.as_slice()));
            let input = lower_pairs(it());
            let facts = match hygiene::inspect(&line, it(), &v.cfg, peer().ip()) {
                Ok(f) => f,
                Err(e) => {
                    let s = e.status().as_u16();
                    prop_assert!((400..500).contains(&s), "{}", s);
                    return Ok(());
                }
            };
            let hosts = values(&input, "host");
            let has_cl = !values(&input, "content-length").is_empty();
            let te = values(&input, "transfer-encoding");
            prop_assert!(hosts.len() <= 1, "two Host headers accepted");
            prop_assert!(!has_cl || te.is_empty(), "CL+TE accepted");
            prop_assert!(minor != Some(1) || hosts.len() == 1);
            prop_assert!(minor != Some(0) || te.is_empty());
            prop_assert_eq!(
                facts.authority,
                authority
                    .as_deref()
                    .or(hosts.first().map(|h| h.trim_ascii()))
            );
            prop_assert!(facts.authority.is_none_or(plausible_authority));
            match facts.body {
                BodyKind::Chunked => {
                    prop_assert_eq!(te.len(), 1);
                    prop_assert!(te[0].trim_ascii().eq_ignore_ascii_case(b"chunked"));
                }
                BodyKind::Length(n) => {
                    prop_assert!(n > 0 && te.is_empty());
                    for l in values(&input, "content-length") {
                        let l = std::str::from_utf8(l)
                            .ok()
                            .and_then(|l| l.trim().parse().ok());
                        prop_assert_eq!(l, Some(n));
                    }
                }
                BodyKind::None => prop_assert!(te.is_empty()),
            }
            let tokens = connection_tokens(&input);
            if tokens.iter().any(|t| t == "close") {
                prop_assert!(facts.close, "Connection: close not honoured");
            }
            if let Some(p) = facts.upgrade {
                prop_assert_eq!(minor, Some(1));
                let name = p.split(|&b| b == b'/').next().unwrap_or(p);
                prop_assert!(
                    name.eq_ignore_ascii_case(b"websocket")
                        || (v
                            .cfg
                            .allowed_upgrades
                            .iter()
                            .any(|a| a.as_bytes().eq_ignore_ascii_case(name))),
                    "upgrade to {:?}",
                    String::from_utf8_lossy(p)
                );
            }
            let origin = Origin {
                peer_ip: PEER_IP.as_bytes(),
                port: PORT,
                prefix: None,
                via: b"1.1 shoal",
                traceparent: &TRACE,
            };
            let mut out: Pairs = Vec::new();
            hygiene::forward_headers(&facts, it, &v.cfg, &origin, |n, parts| {
                out.push((
                    String::from_utf8_lossy(n).to_ascii_lowercase(),
                    parts.concat(),
                ))
            });
            check_forwarded(
                &input,
                &out,
                &Expect {
                    authority: facts.authority,
                    trusted: v.trusted,
                    allow_underscore: v.cfg.allow_underscore_headers,
                    routed: false,
                    upgrade: facts.upgrade,
                    expect: facts.expect,
                },
            )
        },
    );
}
