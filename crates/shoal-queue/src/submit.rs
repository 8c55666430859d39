//! Submission and lookup: the asynchronous request-reply pattern.
//!
//! `submit` answers `202 Accepted` + `Location: /jobs/{id}` only after the broker confirmed
//! the publish; when it cannot confirm, the client gets `503` + `Retry-After` and no job was
//! promised. `Idempotency-Key` binds a key to the first job it created, so a retried
//! submission gets the same job back (draft-ietf-httpapi-idempotency-key-header): the key is
//! scoped by queue and client identity (a hash of a request header, `Authorization` by
//! default, so credentials are never stored) and stored with a fingerprint of method, target
//! and body; the same key with another fingerprint is refused with 422.

use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use http::{header, HeaderValue, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full, Limited};

use crate::broker::Broker;
use crate::job::{new_id, now_ms, valid_id, Envelope, JobRecord, JobRequest};
use crate::metrics::{QueueMetrics, Stage};
use crate::store::Store;
use crate::QueueError;

/// Submission settings.
#[derive(Debug, Clone)]
pub struct SubmitConfig {
    /// Largest request body accepted into a job (413 above).
    pub max_body: usize,
    /// `Retry-After` seconds on a 503.
    pub retry_after_secs: u32,
    /// Path prefix of job URLs (`/jobs/` → `Location: /jobs/{id}`).
    pub jobs_path: String,
    /// The request header naming the client for idempotency keys (None: one scope for all
    /// clients of the route).
    pub identity_header: Option<http::HeaderName>,
}

impl Default for SubmitConfig {
    fn default() -> Self {
        SubmitConfig {
            max_body: 1 << 20,
            retry_after_secs: 1,
            jobs_path: "/jobs/".into(),
            identity_header: Some(header::AUTHORIZATION),
        }
    }
}

/// Why a submission was not accepted.
#[derive(Debug, Clone, thiserror::Error)]
pub enum SubmitError {
    /// The broker or store could not take the job now: 503, retry later.
    #[error("queue unavailable: {0}")]
    Unavailable(QueueError),
    #[error("request body over {0} bytes")]
    TooLarge(usize),
    #[error("bad request: {0}")]
    BadRequest(String),
    /// The idempotency key was used for another request (method, target or body): 422.
    #[error("the idempotency key was used for a different request")]
    KeyReused,
}

/// An accepted job.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Accepted {
    pub id: String,
    /// An earlier submission with the same idempotency key created it.
    pub existing: bool,
}

/// Turns requests into jobs on one broker and answers job lookups.
pub struct Submitter {
    broker: Arc<dyn Broker>,
    store: Arc<dyn Store>,
    metrics: Arc<QueueMetrics>,
    cfg: SubmitConfig,
    /// Jobs whose publish this process has not seen confirmed yet: a retry with the same
    /// idempotency key must not be told 202 for a job that may still be refused.
    unconfirmed: std::sync::Mutex<std::collections::HashSet<String>>,
}

/// Keeps a submission's id in the unconfirmed set until the submission ends, whether it
/// returns or its future is dropped.
struct Unconfirmed<'a>(&'a Submitter, String);

impl Drop for Unconfirmed<'_> {
    fn drop(&mut self) {
        self.0.set_unconfirmed(&self.1, false);
    }
}

/// Request headers that are about the connection, not the job (never part of it).
pub(crate) const DROP: [&str; 9] = [
    "connection",
    "keep-alive",
    "proxy-connection",
    "proxy-authorization",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
    "content-length",
];

impl Submitter {
    pub fn new(
        broker: Arc<dyn Broker>,
        store: Arc<dyn Store>,
        metrics: Arc<QueueMetrics>,
        cfg: SubmitConfig,
    ) -> Submitter {
        Submitter {
            broker,
            store,
            metrics,
            cfg,
            unconfirmed: Default::default(),
        }
    }

    fn unavailable(&self, e: QueueError) -> SubmitError {
        self.metrics.rejected.inc();
        SubmitError::Unavailable(e)
    }

    /// The store key of a client's idempotency key: queue, a hash of the client's identity
    /// and a hash of the key (clients choose keys: hashing bounds their length).
    fn scoped_key(&self, req: &JobRequest, key: &str) -> Result<String, SubmitError> {
        let who = match self.cfg.identity_header.as_ref().map(|h| h.as_str()) {
            // Configured off (`identity_header = ""`): one scope for every client.
            None | Some("") => "-".to_string(),
            Some(h) => {
                // Every value, in order: a second credential line cannot be ignored.
                let values: Vec<&[u8]> = req
                    .headers
                    .iter()
                    .filter(|(k, _)| k.eq_ignore_ascii_case(h))
                    .map(|(_, v)| v.as_ref())
                    .filter(|v| !v.is_empty())
                    .collect();
                if values.is_empty() {
                    // Without an identity the key would be shared with every anonymous
                    // client: one could read another's result, or stop its job from running.
                    return Err(SubmitError::BadRequest(format!(
                        "Idempotency-Key needs the {h} header"
                    )));
                }
                let mut parts: Vec<&[u8]> = vec![b"identity\0"];
                for v in values {
                    parts.push(v);
                    parts.push(b"\0");
                }
                sha256_hex(&parts)
            }
        };
        Ok(format!(
            "{}:{who}:{}",
            self.broker.queue(),
            sha256_hex(&[key.as_bytes()])
        ))
    }

    /// Publishes `req` as a job (or finds the job `idempotency_key` already made).
    pub async fn submit(
        &self,
        req: JobRequest,
        idempotency_key: Option<&str>,
    ) -> Result<Accepted, SubmitError> {
        if req.body.len() > self.cfg.max_body {
            return Err(SubmitError::TooLarge(self.cfg.max_body));
        }
        let key = idempotency_key
            .map(|k| self.scoped_key(&req, k))
            .transpose()?;
        let id = new_id();
        let submitted_ms = now_ms();
        // Unconfirmed before the key can name it (a concurrent retry must not see a bound,
        // unconfirmed job as a confirmed one), until this submission ends however it ends.
        self.set_unconfirmed(&id, true);
        let _unconfirmed = Unconfirmed(self, id.clone());
        // Pending first: a claimed key then always points at a job the store knows.
        let t = Instant::now();
        self.store
            .put_pending(&id, submitted_ms)
            .await
            .map_err(|e| self.unavailable(e))?;
        self.metrics.stage(Stage::SubmitStore, t);
        let fp = fingerprint(&req);
        let binding = format!("{id} {fp}");
        if let Some(key) = &key {
            match self.claim(key, &binding, &fp).await {
                Ok(None) => {}
                Ok(Some(Err(KeyReused))) => {
                    self.forget(&id, None).await;
                    return Err(SubmitError::KeyReused);
                }
                Ok(Some(Ok(existing))) => {
                    self.forget(&id, None).await;
                    if self.is_unconfirmed(&existing) {
                        return Err(self.unavailable(QueueError::Unconfirmed(
                            "the first submission with this key is not confirmed yet".into(),
                        )));
                    }
                    return Ok(Accepted {
                        id: existing,
                        existing: true,
                    });
                }
                Err(e) => {
                    self.forget(&id, None).await;
                    return Err(self.unavailable(e));
                }
            }
        }
        let env = Envelope {
            id: id.clone(),
            submitted_ms,
            key: key.clone(),
            request: req,
        };
        let t = Instant::now();
        let published = self.broker.publish(&env).await;
        self.metrics.stage(Stage::Confirm, t);
        if let Err(e) = published {
            tracing::warn!(queue = %self.broker.queue(), error = %e, "job not accepted");
            self.forget(&id, key.as_deref().map(|k| (k, binding.as_str())))
                .await;
            return Err(self.unavailable(e));
        }
        self.metrics.accepted.inc();
        Ok(Accepted {
            id,
            existing: false,
        })
    }

    /// Binds `key` to `id` and the request's fingerprint, or returns the live job it is
    /// bound to (Err when that job was made by another request). A key whose job is gone
    /// (expired, or its submission failed between claim and release) is taken over.
    async fn claim(
        &self,
        key: &str,
        value: &str,
        fp: &str,
    ) -> Result<Option<Result<String, KeyReused>>, QueueError> {
        for _ in 0..2 {
            match self.store.claim_key(key, value).await? {
                None => return Ok(None),
                Some(existing) => {
                    // A value without a fingerprint was stored by an older version.
                    let (job, their_fp) = match existing.split_once(' ') {
                        Some((j, f)) => (j.to_string(), Some(f)),
                        None => (existing.clone(), None),
                    };
                    if self.store.get(&job).await?.is_some() {
                        if their_fp.is_some_and(|f| f != fp) {
                            return Ok(Some(Err(KeyReused)));
                        }
                        return Ok(Some(Ok(job)));
                    }
                    // Only the stale binding: a concurrent takeover keeps its own.
                    self.store.release_key(key, &existing).await?;
                }
            }
        }
        Err(QueueError::Store("idempotency key contended".into()))
    }

    fn set_unconfirmed(&self, id: &str, on: bool) {
        let mut set = self.unconfirmed.lock().unwrap_or_else(|e| e.into_inner());
        if on {
            set.insert(id.to_string());
        } else {
            set.remove(id);
        }
    }

    fn is_unconfirmed(&self, id: &str) -> bool {
        let set = self.unconfirmed.lock().unwrap_or_else(|e| e.into_inner());
        set.contains(id)
    }

    /// Best-effort cleanup of a submission that was not accepted.
    async fn forget(&self, id: &str, key: Option<(&str, &str)>) {
        if let Err(e) = self.store.delete(id).await {
            tracing::warn!(job = id, error = %e, "could not delete the record of a refused job");
        }
        if let Some((k, binding)) = key {
            if let Err(e) = self.store.release_key(k, binding).await {
                tracing::warn!(error = %e, "could not release an idempotency key");
            }
        }
    }

    /// The job's state. Ok(None): unknown (or expired) id.
    pub async fn lookup(&self, id: &str) -> Result<Option<JobRecord>, QueueError> {
        if !valid_id(id) {
            return Ok(None);
        }
        self.store.get(id).await
    }

    /// HTTP front for [`Submitter::submit`]: reads the body (up to the limit) and answers
    /// 202 with `Location`, 413, or 503 with `Retry-After`.
    pub async fn handle_submit<B>(&self, req: Request<B>) -> Response<Full<Bytes>>
    where
        B: hyper::body::Body<Data = Bytes>,
        B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    {
        let (parts, body) = req.into_parts();
        let declared = parts
            .headers
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok());
        if declared.is_some_and(|n| n > self.cfg.max_body as u64) {
            return self.error_response(SubmitError::TooLarge(self.cfg.max_body));
        }
        let body = match Limited::new(body, self.cfg.max_body).collect().await {
            Ok(b) => b.to_bytes(),
            Err(e) => {
                let err = if e.is::<http_body_util::LengthLimitError>() {
                    SubmitError::TooLarge(self.cfg.max_body)
                } else {
                    SubmitError::BadRequest(format!("reading the body: {e}"))
                };
                return self.error_response(err);
            }
        };
        let key = parts
            .headers
            .get("idempotency-key")
            .and_then(|v| v.to_str().ok())
            .map(str::to_string);
        let headers: Vec<_> = parts
            .headers
            .iter()
            .filter(|(k, _)| !DROP.contains(&k.as_str()))
            .map(|(k, v)| (k.as_str().to_string(), Bytes::copy_from_slice(v.as_bytes())))
            .collect();
        let path_and_query = parts
            .uri
            .path_and_query()
            .map(|p| p.as_str().to_string())
            .unwrap_or_else(|| "/".into());
        let job = JobRequest {
            method: parts.method.as_str().to_string(),
            path_and_query,
            headers,
            body,
        };
        self.respond(job, key.as_deref()).await
    }

    /// Submits a captured request and answers 202 with `Location`, 413, 422 or 503.
    pub async fn respond(&self, job: JobRequest, key: Option<&str>) -> Response<Full<Bytes>> {
        self.respond_at(job, key, &self.cfg.jobs_path).await
    }

    /// [`Submitter::respond`] with job URLs under `jobs_prefix` (`/jobs/`), the listener's.
    pub async fn respond_at(
        &self,
        job: JobRequest,
        key: Option<&str>,
        jobs_prefix: &str,
    ) -> Response<Full<Bytes>> {
        match self.submit(job, key).await {
            Ok(a) => {
                let loc = format!("{jobs_prefix}{}", a.id);
                let body = format!(
                    "{{\"id\":\"{}\",\"state\":\"pending\",\"href\":\"{loc}\"}}\n",
                    a.id
                );
                let mut r = json(StatusCode::ACCEPTED, body);
                r.headers_mut().insert(
                    header::LOCATION,
                    HeaderValue::from_str(&loc).expect("hex id is a valid header"),
                );
                r
            }
            Err(e) => self.error_response(e),
        }
    }

    /// HTTP front for [`Submitter::lookup`]: 202 while pending, the stored response when
    /// done, 502 with the last error when dead-lettered, 404 when unknown.
    pub async fn handle_job(&self, id: &str) -> Response<Full<Bytes>> {
        match self.lookup(id).await {
            Ok(None) => json(
                StatusCode::NOT_FOUND,
                "{\"error\":\"no such job\"}\n".to_string(),
            ),
            Ok(Some(JobRecord::Pending { .. })) => {
                let mut r = json(
                    StatusCode::ACCEPTED,
                    format!("{{\"id\":\"{id}\",\"state\":\"pending\"}}\n"),
                );
                r.headers_mut()
                    .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
                r
            }
            Ok(Some(JobRecord::Done {
                response,
                attempts,
                submitted_ms,
                finished_ms,
            })) => {
                let mut r = Response::new(Full::new(response.body));
                *r.status_mut() =
                    StatusCode::from_u16(response.status).unwrap_or(StatusCode::BAD_GATEWAY);
                let h = r.headers_mut();
                for (k, v) in &response.headers {
                    if let (Ok(k), Ok(v)) = (
                        header::HeaderName::from_bytes(k.as_bytes()),
                        HeaderValue::from_bytes(v),
                    ) {
                        h.append(k, v);
                    }
                }
                h.insert("x-shoal-job-attempts", HeaderValue::from(attempts));
                // Accepted → result stored, for clients (and bench/queue.sh).
                h.insert(
                    "x-shoal-job-latency-ms",
                    HeaderValue::from(finished_ms.saturating_sub(submitted_ms)),
                );
                r
            }
            Ok(Some(JobRecord::Failed {
                attempts,
                status,
                error,
                ..
            })) => json(
                StatusCode::from_u16(status).unwrap_or(StatusCode::BAD_GATEWAY),
                serde_json::json!({"id": id, "state": "failed", "attempts": attempts, "error": error})
                    .to_string()
                    + "\n",
            ),
            Err(e) => self.error_response(SubmitError::Unavailable(e)),
        }
    }

    fn error_response(&self, e: SubmitError) -> Response<Full<Bytes>> {
        let (status, msg) = match &e {
            SubmitError::Unavailable(_) => (StatusCode::SERVICE_UNAVAILABLE, "queue unavailable"),
            SubmitError::TooLarge(_) => (StatusCode::PAYLOAD_TOO_LARGE, "request body too large"),
            SubmitError::BadRequest(_) => (StatusCode::BAD_REQUEST, "bad request"),
            SubmitError::KeyReused => (
                StatusCode::UNPROCESSABLE_ENTITY,
                "idempotency key reused for a different request",
            ),
        };
        let mut r = json(
            status,
            serde_json::json!({"error": msg, "detail": e.to_string()}).to_string() + "\n",
        );
        if status == StatusCode::SERVICE_UNAVAILABLE {
            r.headers_mut().insert(
                header::RETRY_AFTER,
                HeaderValue::from(self.cfg.retry_after_secs),
            );
        }
        r
    }
}

/// The idempotency key belongs to another request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct KeyReused;

/// SHA-256 over the parts, each length-prefixed (so no two part lists hash alike), in hex.
fn sha256_hex(parts: &[&[u8]]) -> String {
    let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
    for p in parts {
        ctx.update(&(p.len() as u64).to_be_bytes());
        ctx.update(p);
    }
    ctx.finish()
        .as_ref()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// What makes two submissions "the same request" for an idempotency key: method, target
/// (path and query) and body.
fn fingerprint(req: &JobRequest) -> String {
    sha256_hex(&[
        req.method.as_bytes(),
        req.path_and_query.as_bytes(),
        &req.body,
    ])
}

fn json(status: StatusCode, body: String) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from(body)));
    *r.status_mut() = status;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    r
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures_util::future::BoxFuture;
    use std::time::Duration;

    /// A broker whose publishes wait for the test to answer them.
    struct Gated {
        answers: tokio::sync::Mutex<tokio::sync::mpsc::UnboundedReceiver<bool>>,
        state: crate::broker::ConnState,
        /// Publishes begun (waiting for their answer or answered).
        publishing: Arc<std::sync::atomic::AtomicUsize>,
    }

    impl Broker for Gated {
        fn kind(&self) -> &'static str {
            "gated"
        }
        fn queue(&self) -> &str {
            "q"
        }
        fn publish<'a>(&'a self, _job: &'a Envelope) -> BoxFuture<'a, Result<(), QueueError>> {
            Box::pin(async {
                self.publishing
                    .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                match self.answers.lock().await.recv().await {
                    Some(true) => Ok(()),
                    _ => Err(QueueError::Unconfirmed("nack".into())),
                }
            })
        }
        fn next(&self) -> BoxFuture<'_, Result<crate::broker::Delivery, QueueError>> {
            Box::pin(std::future::pending())
        }
        fn backlog(&self) -> BoxFuture<'_, Result<u64, QueueError>> {
            Box::pin(async { Ok(0) })
        }
        fn state(&self) -> &crate::broker::ConnState {
            &self.state
        }
        fn shutdown(&self) -> BoxFuture<'_, ()> {
            Box::pin(async {})
        }
    }

    fn job() -> JobRequest {
        JobRequest {
            method: "POST".into(),
            path_and_query: "/work".into(),
            headers: vec![],
            body: Bytes::from_static(b"x"),
        }
    }

    /// A retry with the key of a submission still waiting for its confirm is refused
    /// (503), not told 202 for a job the broker may yet refuse; once that one is refused,
    /// the key makes a new job.
    #[tokio::test]
    async fn a_retry_never_gets_202_for_an_unconfirmed_job() {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(
            crate::store::RedbStore::open(&dir.path().join("j.redb"), Duration::from_secs(60))
                .unwrap(),
        );
        let (answer, answers) = tokio::sync::mpsc::unbounded_channel();
        let publishing = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let s = Arc::new(Submitter::new(
            Arc::new(Gated {
                answers: tokio::sync::Mutex::new(answers),
                state: Default::default(),
                publishing: publishing.clone(),
            }),
            store,
            QueueMetrics::new(),
            SubmitConfig::default(),
        ));
        let job = || with_auth(job(), "Bearer a");
        let first = tokio::spawn({
            let s = s.clone();
            async move { s.submit(job(), Some("k")).await }
        });
        // Wait until the first submission is waiting on its publish (its key bound).
        while publishing.load(std::sync::atomic::Ordering::SeqCst) == 0 {
            tokio::task::yield_now().await;
        }
        let retry = s.submit(job(), Some("k")).await;
        assert!(
            matches!(retry, Err(SubmitError::Unavailable(_))),
            "{retry:?}"
        );
        answer.send(false).unwrap();
        assert!(matches!(
            first.await.unwrap(),
            Err(SubmitError::Unavailable(_))
        ));
        answer.send(true).unwrap();
        let again = s.submit(job(), Some("k")).await.unwrap();
        assert!(!again.existing);
        answer.send(true).unwrap();
        let same = s.submit(job(), Some("k")).await.unwrap();
        assert_eq!((same.id, same.existing), (again.id, true));
    }

    fn with_auth(mut j: JobRequest, auth: &str) -> JobRequest {
        j.headers.push((
            "authorization".into(),
            Bytes::copy_from_slice(auth.as_bytes()),
        ));
        j
    }

    /// A submitter on a redb file whose broker confirms every publish.
    fn confirming(dir: &std::path::Path, cfg: SubmitConfig) -> Submitter {
        let store = Arc::new(
            crate::store::RedbStore::open(&dir.join("j.redb"), Duration::from_secs(60)).unwrap(),
        );
        let (answer, answers) = tokio::sync::mpsc::unbounded_channel();
        for _ in 0..64 {
            answer.send(true).unwrap();
        }
        Submitter::new(
            Arc::new(Gated {
                answers: tokio::sync::Mutex::new(answers),
                state: Default::default(),
                publishing: Default::default(),
            }),
            store,
            QueueMetrics::new(),
            cfg,
        )
    }

    /// Same key + request + credentials → the same job; the same key for another body,
    /// method or target → 422; other credentials → their own job; credentials are stored
    /// only as hashes.
    #[tokio::test]
    async fn idempotency_keys_are_scoped_by_identity_and_bound_to_the_request() {
        let dir = tempfile::tempdir().unwrap();
        let s = confirming(dir.path(), SubmitConfig::default());
        let alice = |j| with_auth(j, "Bearer alice-secret");
        let first = s.submit(alice(job()), Some("K")).await.unwrap();
        assert!(!first.existing);
        let again = s.submit(alice(job()), Some("K")).await.unwrap();
        assert_eq!((&again.id, again.existing), (&first.id, true));
        let mut other_body = job();
        other_body.body = Bytes::from_static(b"y");
        let mut other_target = job();
        other_target.path_and_query = "/work?x=1".into();
        let mut other_method = job();
        other_method.method = "PUT".into();
        for other in [other_body, other_target, other_method] {
            let r = s.submit(alice(other), Some("K")).await;
            assert!(matches!(r, Err(SubmitError::KeyReused)), "{r:?}");
        }
        let mut reused = job();
        reused.body = Bytes::from_static(b"z");
        let resp = s.respond(alice(reused), Some("K")).await;
        assert_eq!(resp.status(), StatusCode::UNPROCESSABLE_ENTITY);
        let mallory = s
            .submit(with_auth(job(), "Bearer mallory"), Some("K"))
            .await
            .unwrap();
        assert!(!mallory.existing);
        assert_ne!(mallory.id, first.id);
        // Without the identity header a key would be shared by every anonymous client:
        // refused (400), and the same request without a key is still a job.
        let anonymous = s.submit(job(), Some("K")).await;
        assert!(
            matches!(anonymous, Err(SubmitError::BadRequest(_))),
            "{anonymous:?}"
        );
        let resp = s.respond(job(), Some("K")).await;
        assert_eq!(resp.status(), StatusCode::BAD_REQUEST);
        let mut empty = with_auth(job(), "");
        empty.body = Bytes::from_static(b"x");
        assert!(matches!(
            s.submit(empty, Some("K")).await,
            Err(SubmitError::BadRequest(_))
        ));
        assert!(s.submit(job(), None).await.is_ok());
        // Every value of the identity header counts: a second line makes another client.
        let two_lines = with_auth(alice(job()), "Bearer mallory");
        let both = s.submit(two_lines, Some("K")).await.unwrap();
        assert!(!both.existing);
        assert_ne!(both.id, first.id);
        // Configured off, one scope for everyone (the operator's choice).
        let dir2 = tempfile::tempdir().unwrap();
        let shared = confirming(
            dir2.path(),
            SubmitConfig {
                identity_header: None,
                ..SubmitConfig::default()
            },
        );
        let a = shared.submit(job(), Some("K")).await.unwrap();
        let b = shared.submit(job(), Some("K")).await.unwrap();
        assert_eq!((b.id, b.existing), (a.id, true));
        drop(s);
        let file = std::fs::read(dir.path().join("j.redb")).unwrap();
        let has = |needle: &[u8]| file.windows(needle.len()).any(|w| w == needle);
        assert!(!has(b"alice-secret"), "a raw credential in the store");
        assert!(has(first.id.as_bytes()), "the store holds the job");
    }
}
