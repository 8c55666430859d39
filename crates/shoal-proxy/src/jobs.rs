//! The async phase's seam: a route with an `async` table hands its requests to a job sink
//! instead of an instance, and `GET /jobs/{id}` on a listener with such a route asks the
//! same system for the job. The proxy defines the traits; the crate that holds the brokers
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

/// Where job URLs live on every listener that has an async route.
pub const JOBS_PREFIX: &str = "/jobs/";

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
}

/// The job system of a process.
pub trait Jobs: Send + Sync {
    /// The sink for a route's `async` table; None when the route has none (or it cannot be
    /// served: the implementation logs why, and the route answers 503).
    fn sink(&self, route: &RouteConfig) -> Option<Arc<dyn JobSink>>;
    /// `GET /jobs/{id}`: 202 while pending, the stored response, 404 when unknown.
    fn lookup(&self, id: &str) -> BoxFuture<'_, Response<Bytes>>;
}

/// The job id in `path` when it is a job URL (`/jobs/{id}`, no query).
pub fn job_id(path: &str) -> Option<&str> {
    let id = path.strip_prefix(JOBS_PREFIX)?;
    let id = id.split('?').next().unwrap_or(id);
    (!id.is_empty() && !id.contains('/')).then_some(id)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn job_urls() {
        assert_eq!(job_id("/jobs/abc"), Some("abc"));
        assert_eq!(job_id("/jobs/abc?x=1"), Some("abc"));
        assert_eq!(job_id("/jobs/"), None);
        assert_eq!(job_id("/jobs/a/b"), None);
        assert_eq!(job_id("/jobsx/a"), None);
    }
}
