//! The async phase's seam: a route with an `async` table hands its requests to a job sink
//! instead of an instance, and `GET {jobs_path}/{id}` on a listener with such a route asks
//! the sinks of that listener's async routes (only theirs) for the job. The proxy defines the traits; the crate that holds the brokers
//! implements them and the binary installs it ([`crate::App::set_jobs`]), so the data path
//! never depends on a broker client.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use bytes::Bytes;
use http::Response;

use crate::config::RouteConfig;

/// A boxed future, for the async methods of object-safe traits.
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// Where job URLs live on a listener with an async route unless its `jobs_path` says.
pub const DEFAULT_JOBS_PATH: &str = "/jobs";

/// A request captured for asynchronous execution, as the route would forward it: the
/// rewritten path, the upstream header set (hop-by-hop removed, `X-Forwarded-*` added).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JobRequest {
    pub method: String,
    /// Path plus `?query` when there is one, as the worker will receive it.
    pub path_and_query: String,
    pub headers: Vec<(String, Bytes)>,
    pub body: Bytes,
}

/// One async route's job queue.
pub trait JobSink: Send + Sync {
    /// Largest request body taken into a job; larger ones are answered 413 unread.
    fn max_body(&self) -> usize;
    /// Publishes the job: 202 + `Location` only once the broker confirmed it, 503 +
    /// `Retry-After` when it could not.
    fn submit(
        &self,
        req: JobRequest,
        idempotency_key: Option<String>,
    ) -> BoxFuture<'_, Response<Bytes>>;
    /// `GET {jobs_path}/{id}` for a job of this sink's queue: 202 while pending, the stored
    /// response, 404 when unknown (or another queue's).
    fn lookup(&self, id: &str) -> BoxFuture<'_, Response<Bytes>>;
}

/// The job system of a process.
pub trait Jobs: Send + Sync {
    /// The sink for a route's `async` table on a listener whose job URLs are under
    /// `jobs_path` (its `Location`s point there); None when the route has none (or it cannot
    /// be served: the implementation logs why, and the route answers 503).
    fn sink(&self, route: &RouteConfig, jobs_path: &str) -> Option<Arc<dyn JobSink>>;
}

/// The job URLs of one listener: `{path}/{id}`, answered by its async routes' sinks.
#[derive(Clone)]
pub struct JobUrls {
    /// The listener's `jobs_path` (no trailing slash).
    pub path: String,
    pub sinks: Vec<Arc<dyn JobSink>>,
}

impl JobUrls {
    /// The job id in `path` when it is one of these job URLs (`{path}/{id}`, no query).
    pub fn job_id<'a>(&self, path: &'a str) -> Option<&'a str> {
        job_id(&self.path, path)
    }

    /// Asks each sink; the first that knows the job answers, else 404.
    pub async fn lookup(&self, id: &str) -> Response<Bytes> {
        for s in &self.sinks {
            let r = s.lookup(id).await;
            if r.status() != http::StatusCode::NOT_FOUND {
                return r;
            }
        }
        let mut r = Response::new(Bytes::from_static(b"{\"error\":\"no such job\"}\n"));
        *r.status_mut() = http::StatusCode::NOT_FOUND;
        r.headers_mut().insert(
            http::header::CONTENT_TYPE,
            http::HeaderValue::from_static("application/json"),
        );
        r
    }
}

/// The job id in `path` when it is a job URL under `prefix` (`{prefix}/{id}`, no query).
pub fn job_id<'a>(prefix: &str, path: &'a str) -> Option<&'a str> {
    let id = path.strip_prefix(prefix)?.strip_prefix('/')?;
    let id = id.split('?').next().unwrap_or(id);
    (!id.is_empty() && !id.contains('/')).then_some(id)
}

/// Why `p` cannot be a `jobs_path`, if it cannot.
pub fn invalid_jobs_path(p: &str) -> Option<&'static str> {
    if !p.starts_with('/') || p.len() < 2 {
        return Some("must start with '/' and name a path, e.g. \"/jobs\"");
    }
    if p.ends_with('/') {
        return Some("must not end with '/'");
    }
    let ok = |c: u8| c.is_ascii_alphanumeric() || b"/-._~".contains(&c);
    if !p.bytes().all(ok) || p.contains("//") || p.split('/').any(|s| s == "." || s == "..") {
        return Some("only letters, digits and -._~ in '/'-separated segments (no '.' or '..')");
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn job_urls() {
        assert_eq!(job_id("/jobs", "/jobs/abc"), Some("abc"));
        assert_eq!(job_id("/jobs", "/jobs/abc?x=1"), Some("abc"));
        assert_eq!(job_id("/jobs", "/jobs/"), None);
        assert_eq!(job_id("/jobs", "/jobs/a/b"), None);
        assert_eq!(job_id("/jobs", "/jobsx/a"), None);
        assert_eq!(job_id("/api/v1/tasks", "/api/v1/tasks/abc"), Some("abc"));
        assert_eq!(job_id("/api/v1/tasks", "/jobs/abc"), None);
    }

    #[test]
    fn jobs_paths() {
        for ok in ["/jobs", "/api/v1/jobs", "/j-1.x~"] {
            assert_eq!(invalid_jobs_path(ok), None, "{ok}");
        }
        for bad in [
            "", "/", "jobs", "/jobs/", "/a//b", "/a/../b", "/a?b", "/a b", "/%2e",
        ] {
            assert!(invalid_jobs_path(bad).is_some(), "{bad}");
        }
    }
}
