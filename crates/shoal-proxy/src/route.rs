//! Routes: which service (upstream pool) a request on a listener goes to.
//!
//! A listener's table is rebuilt whenever the config changes and read lock-free. Matching
//! order: an exact host beats a wildcard host (`*.example.com`) beats any host; then the
//! longest prefix; then a route naming the method beats one for any method. A prefix matches
//! on a segment boundary: `/api` matches `/api`, `/api/x` and `/api?q`, not `/apix`.

use std::sync::Arc;

use crate::config::RouteConfig;
use crate::jobs::{JobSink, JobUrls};
use crate::proxy::Service;

/// One route, resolved to its target service.
pub struct Route {
    pub config: RouteConfig,
    pub target: Arc<Service>,
    /// The route's cache phase, if its config has a `cache` table.
    pub cache: Option<Arc<shoal_cache::Cache>>,
    /// The route's async phase, if its config has an `async` table.
    pub jobs: AsyncPhase,
}

/// What the async phase does with a route's requests.
#[derive(Clone, Default)]
pub enum AsyncPhase {
    /// Not an async route: requests go to an instance.
    #[default]
    Off,
    /// Requests become jobs on this sink.
    Sink(Arc<dyn JobSink>),
    /// An async route without a job system to take its jobs: 503, never a synchronous try.
    Unavailable,
}

/// The routes of one listener, in matching order.
#[derive(Default)]
pub struct RouteTable {
    routes: Vec<Route>,
    /// Answers `{jobs_path}/{id}` before routing: set when a route is async, with the
    /// sinks of this listener's async routes (so only their queues' jobs are found).
    pub jobs: Option<JobUrls>,
}

/// A request matched to a route: where it goes and the path it goes with.
pub struct Matched<'a> {
    pub route: &'a Route,
    /// The path (and query) to forward when the route rewrites it.
    pub path: Option<String>,
}

fn host_rank(h: &Option<String>) -> u8 {
    match h {
        Some(h) if h.starts_with("*.") => 1,
        Some(_) => 2,
        None => 0,
    }
}

/// The host part of an authority, without port, lowercased only when needed.
fn bare_host(authority: &[u8]) -> &[u8] {
    if authority.first() == Some(&b'[') {
        let end = authority
            .iter()
            .position(|&b| b == b']')
            .unwrap_or(authority.len() - 1);
        return &authority[..=end];
    }
    match authority.iter().rposition(|&b| b == b':') {
        Some(i) => &authority[..i],
        None => authority,
    }
}

fn host_matches(pattern: &Option<String>, host: Option<&[u8]>) -> bool {
    let Some(p) = pattern else {
        return true;
    };
    let Some(h) = host.map(bare_host) else {
        return false;
    };
    // A fully qualified name may end with a dot.
    let h = h.strip_suffix(b".").unwrap_or(h);
    match p.strip_prefix("*.") {
        Some(suffix) => {
            h.len() > suffix.len() + 1
                && h[h.len() - suffix.len()..].eq_ignore_ascii_case(suffix.as_bytes())
                && h[h.len() - suffix.len() - 1] == b'.'
        }
        None => h.eq_ignore_ascii_case(p.as_bytes()),
    }
}

fn prefix_matches(prefix: &str, path: &str) -> bool {
    if prefix == "/" {
        return true;
    }
    let Some(rest) = path.strip_prefix(prefix) else {
        return false;
    };
    prefix.ends_with('/') || rest.is_empty() || rest.starts_with('/') || rest.starts_with('?')
}

impl RouteTable {
    pub fn new(mut routes: Vec<Route>) -> Self {
        routes.sort_by(|a, b| {
            let (a, b) = (&a.config, &b.config);
            host_rank(&b.host)
                .cmp(&host_rank(&a.host))
                .then(b.prefix.len().cmp(&a.prefix.len()))
                .then(b.methods.is_empty().cmp(&a.methods.is_empty()).reverse())
        });
        RouteTable { routes, jobs: None }
    }

    pub fn routes(&self) -> &[Route] {
        &self.routes
    }

    /// The route for a request, or None (→ 404). `path` is the origin-form target.
    pub fn find(&self, host: Option<&[u8]>, method: &str, path: &str) -> Option<Matched<'_>> {
        let route = self.routes.iter().find(|r| {
            let c = &r.config;
            host_matches(&c.host, host)
                && prefix_matches(&c.prefix, path)
                && (c.methods.is_empty() || c.methods.iter().any(|m| m == method))
        })?;
        let path = route.config.replace.as_ref().map(|with| {
            let rest = &path[route.config.prefix.len().min(path.len())..];
            let rest = if route.config.prefix.ends_with('/') && !rest.is_empty() {
                // `/api/` stripped from `/api/x` leaves `x`: keep the slash.
                &path[route.config.prefix.len() - 1..]
            } else {
                rest
            };
            let mut p = with.trim_end_matches('/').to_string();
            if rest.is_empty() || rest.starts_with('?') {
                p.push('/');
            }
            p.push_str(rest);
            if !p.starts_with('/') {
                p.insert(0, '/');
            }
            p
        });
        Some(Matched { route, path })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::ServiceConfig;
    use shoal_balance::Algorithm;
    use std::collections::BTreeMap;

    fn route(
        host: Option<&str>,
        prefix: &str,
        methods: &[&str],
        to: &str,
        replace: Option<&str>,
    ) -> Route {
        Route {
            config: RouteConfig {
                host: host.map(str::to_string),
                prefix: prefix.into(),
                methods: methods.iter().map(|m| m.to_string()).collect(),
                service: to.into(),
                replace: replace.map(str::to_string),
                cache: None,
                extra: BTreeMap::new(),
            },
            target: Service::new(ServiceConfig::quick(
                to,
                "127.0.0.1:0".parse().unwrap(),
                Algorithm::RoundRobin,
            )),
            cache: None,
            jobs: Default::default(),
        }
    }

    fn to<'a>(
        t: &'a RouteTable,
        host: &str,
        method: &str,
        path: &str,
    ) -> Option<(&'a str, Option<String>)> {
        let h = (!host.is_empty()).then_some(host.as_bytes());
        t.find(h, method, path)
            .map(|m| (m.route.config.service.as_str(), m.path))
    }

    #[test]
    fn host_then_longest_prefix_then_method() {
        let t = RouteTable::new(vec![
            route(None, "/", &[], "default", None),
            route(None, "/api", &[], "api", Some("")),
            route(None, "/api/admin", &[], "admin", Some("/internal")),
            route(Some("shop.example"), "/", &[], "shop", None),
            route(Some("*.example"), "/", &[], "wild", None),
            route(None, "/api", &["POST"], "api-write", None),
        ]);
        assert_eq!(to(&t, "x.test", "GET", "/"), Some(("default", None)));
        assert_eq!(to(&t, "x.test", "GET", "/apix"), Some(("default", None)));
        assert_eq!(
            to(&t, "x.test", "GET", "/api"),
            Some(("api", Some("/".into())))
        );
        assert_eq!(
            to(&t, "x.test", "GET", "/api/users?id=1"),
            Some(("api", Some("/users?id=1".into())))
        );
        assert_eq!(
            to(&t, "x.test", "GET", "/api?id=1"),
            Some(("api", Some("/?id=1".into())))
        );
        assert_eq!(
            to(&t, "x.test", "POST", "/api/users"),
            Some(("api-write", None))
        );
        assert_eq!(
            to(&t, "x.test", "GET", "/api/admin/x"),
            Some(("admin", Some("/internal/x".into())))
        );
        assert_eq!(
            to(&t, "SHOP.example:8080", "GET", "/api"),
            Some(("shop", None))
        );
        assert_eq!(to(&t, "a.example", "GET", "/"), Some(("wild", None)));
        assert_eq!(to(&t, "example", "GET", "/"), Some(("default", None)));
        assert_eq!(to(&t, "", "GET", "/"), Some(("default", None)));
    }

    #[test]
    fn no_match_is_none() {
        let t = RouteTable::new(vec![route(Some("a.example"), "/", &[], "a", None)]);
        assert!(to(&t, "b.example", "GET", "/").is_none());
        assert!(to(&t, "", "GET", "/").is_none());
        assert!(RouteTable::default().find(None, "GET", "/").is_none());
    }
}
