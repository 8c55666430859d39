//! The route matcher (`RouteTable::find`) against a reference model, and config parsing.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;

use proptest::collection::vec;
use proptest::prelude::*;
use proptest::sample::select;
use shoal_balance::Algorithm;

use super::gen;
use super::run;
use crate::config::{Config, RouteConfig, ServiceConfig};
use crate::proxy::Service;
use crate::route::{Route, RouteTable};

type RouteSpec = (
    Option<&'static str>,
    &'static str,
    Vec<&'static str>,
    Option<&'static str>,
);

fn route_spec() -> impl Strategy<Value = RouteSpec> {
    (
        select(
            &[
                None,
                Some("a.example"),
                Some("*.example"),
                Some("*.a.example"),
                Some("b.example"),
            ][..],
        ),
        select(&["/", "/api", "/api/", "/api/admin", "/a", "/static/", "/é"][..]),
        prop_oneof![
            2 => Just(vec![]),
            1 => vec(select(&["GET", "POST"][..]), 1..3),
        ],
        select(
            &[
                None,
                None,
                Some(""),
                Some("/internal"),
                Some("/v2/"),
                Some("/"),
            ][..],
        ),
    )
}

/// The host part of an authority, lowercased, without port or trailing dot.
fn model_host(a: &str) -> String {
    let a = a.to_ascii_lowercase();
    let h = if a.starts_with('[') {
        match a.find(']') {
            Some(i) => a[..=i].to_string(),
            None => a,
        }
    } else {
        match a.rfind(':') {
            Some(i) => a[..i].to_string(),
            None => a,
        }
    };
    h.strip_suffix('.').map(str::to_string).unwrap_or(h)
}

fn model_matches(c: &RouteConfig, host: Option<&str>, method: &str, path: &str) -> bool {
    let host_ok = match (&c.host, host) {
        (None, _) => true,
        (Some(_), None) => false,
        (Some(p), Some(h)) => {
            let h = model_host(h);
            match p.strip_prefix("*.") {
                Some(s) => h.ends_with(&format!(".{s}")) && h.len() > s.len() + 1,
                None => h == *p,
            }
        }
    };
    // On a segment boundary: the prefix is the path, or the path goes on with '/' or '?'.
    let base = c.prefix.trim_end_matches('/');
    let prefix_ok = c.prefix == "/"
        || path == c.prefix
        || (path.starts_with(base)
            && (path.len() == base.len()
                || path[base.len()..].starts_with('/')
                || path[base.len()..].starts_with('?'))
            && (!c.prefix.ends_with('/') || path.starts_with(&c.prefix)));
    let method_ok = c.methods.is_empty() || c.methods.iter().any(|m| m == method);
    host_ok && prefix_ok && method_ok
}

fn rank(c: &RouteConfig) -> (u8, usize, bool) {
    let host = match &c.host {
        Some(h) if h.starts_with("*.") => 1,
        Some(_) => 2,
        None => 0,
    };
    (host, c.prefix.len(), !c.methods.is_empty())
}

/// The path a route forwards: the replacement, then what follows the prefix.
fn model_rewrite(with: &str, prefix: &str, path: &str) -> String {
    let rest = &path[prefix.trim_end_matches('/').len()..];
    let mut p = with.trim_end_matches('/').to_string();
    if rest.is_empty() || rest.starts_with('?') {
        p.push('/');
    }
    p.push_str(rest);
    if !p.starts_with('/') {
        p.insert(0, '/');
    }
    p
}

#[test]
fn route_find_matches_the_model() {
    let req_host = select(
        &[
            None,
            Some("a.example"),
            Some("A.EXAMPLE:8080"),
            Some("x.a.example"),
            Some("x.y.example"),
            Some("example"),
            Some("a.example."),
            Some("[::1]:80"),
            Some("b.example"),
            Some(".example"),
        ][..],
    );
    let path = prop_oneof![
        3 => select(
            &[
                "/", "/api", "/api/", "/api/x", "/apix", "/api?x=1", "/api/admin",
                "/api/admin/y?z", "/a", "/a/", "/ab", "/static", "/static/x", "/é", "/é/x",
                "//api", "/API",
            ][..]
        )
        .prop_map(str::to_string),
        1 => vec(select(&["/", "api", "admin", "a", "static", "?", "x", "é", "."][..]), 0..6)
            .prop_map(|p| format!("/{}", p.concat())),
    ];
    let strategy = (
        vec(route_spec(), 0..6),
        req_host,
        select(&["GET", "POST", "PUT"][..]),
        path,
    );
    let target = Service::new(ServiceConfig::quick(
        "t",
        "127.0.0.1:0".parse().unwrap(),
        Algorithm::RoundRobin,
    ));
    run(
        "route_find",
        2500,
        strategy,
        |(specs, host, method, path)| {
            let routes: Vec<Route> = specs
                .iter()
                .enumerate()
                .map(|(i, (h, prefix, methods, replace))| Route {
                    config: RouteConfig {
                        host: h.map(str::to_string),
                        prefix: prefix.to_string(),
                        methods: methods.iter().map(|m| m.to_string()).collect(),
                        service: format!("s{i}"),
                        replace: replace.map(str::to_string),
                        cache: None,
                        extra: BTreeMap::new(),
                    },
                    target: Arc::clone(&target),
                    cache: None,
                    jobs: Default::default(),
                })
                .collect();
            let configs: Vec<RouteConfig> = routes.iter().map(|r| r.config.clone()).collect();
            let table = RouteTable::new(routes);
            let found = table.find(host.map(str::as_bytes), method, &path);
            let matching: Vec<&RouteConfig> = configs
                .iter()
                .filter(|c| model_matches(c, host, method, &path))
                .collect();
            match found {
                None => prop_assert!(matching.is_empty(), "no route, but {:?} match", matching),
                Some(m) => {
                    let c = &m.route.config;
                    prop_assert!(
                        model_matches(c, host, method, &path),
                        "{:?} does not match",
                        c
                    );
                    let best = matching.iter().map(|c| rank(c)).max();
                    prop_assert_eq!(Some(rank(c)), best, "not the most specific route");
                    match &c.replace {
                        None => prop_assert!(m.path.is_none()),
                        Some(with) => {
                            let want = model_rewrite(with, &c.prefix, &path);
                            prop_assert_eq!(m.path.as_deref(), Some(want.as_str()))
                        }
                    }
                }
            }
            Ok(())
        },
    );
}

/// Config text never panics the parser; every error names the file, a line of the text and
/// a field.
#[test]
fn config_parse_errors_name_a_line_and_field() {
    run(
        "config_parse",
        1500,
        (gen::config_text(), gen::edits()),
        |(text, edits)| {
            let text = gen::apply_chars(&text, &edits);
            let lines = text.split('\n').count();
            if let Err(e) = Config::parse(Path::new("fuzz.toml"), &text) {
                prop_assert_eq!(&e.file, "fuzz.toml");
                prop_assert!(
                    (1..=lines).contains(&e.line),
                    "line {} of {}: {}",
                    e.line,
                    lines,
                    e
                );
                prop_assert!(!e.field.is_empty(), "no field: {}", e);
                prop_assert!(!e.message.is_empty(), "no message: {}", e);
            }
            Ok(())
        },
    );
}
