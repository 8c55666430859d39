//! The dispatcher: consume a job, hand it to a worker instance over plain HTTP, store the
//! answer, then settle the message. At-least-once: the message is acknowledged only after
//! the result is stored, so a crash anywhere before means redelivery; a redelivered job whose
//! result is already stored is acknowledged without running again and counted as duplicated.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use bytes::Bytes;
use futures_util::future::BoxFuture;
use http_body_util::{BodyExt, Full, Limited};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use tokio::sync::{Notify, Semaphore};

use crate::broker::{Broker, Delivery};
use crate::job::{now_ms, Envelope, JobRecord, StoredResponse};
use crate::metrics::{QueueMetrics, Stage};
use crate::store::Store;

/// Where workers come from: the fleet publishes its ready instances here.
pub trait Workers: Send + Sync + 'static {
    /// A ready worker, preferring one other than `avoid`. None: no worker can take a job now.
    fn pick(&self, avoid: Option<SocketAddr>) -> Option<Lease>;
    /// Resolves after membership or health changed (a worker may have become available).
    fn changed(&self) -> BoxFuture<'_, ()>;
    /// The worker behind `lease` failed to connect: skip it for a while.
    fn failed(&self, lease: &Lease);
}

/// One member of a [`WorkerSet`].
#[derive(Debug)]
pub struct Member {
    pub id: String,
    pub addr: SocketAddr,
    ready: AtomicBool,
    draining: AtomicBool,
    in_flight: AtomicU64,
    /// Skipped until this many ms after `WorkerSet::epoch` (connect failures).
    ejected_until: AtomicU64,
}

/// A worker in use by one attempt; the worker's in-flight count drops when it is dropped.
#[derive(Debug)]
pub struct Lease {
    member: Arc<Member>,
    changed: Arc<Notify>,
}

impl Lease {
    pub fn addr(&self) -> SocketAddr {
        self.member.addr
    }
    pub fn id(&self) -> &str {
        &self.member.id
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        if self.member.in_flight.fetch_sub(1, Ordering::AcqRel) == 1
            && self.member.draining.load(Ordering::Acquire)
        {
            self.changed.notify_waiters();
        }
    }
}

/// The membership a fleet feeds: add → ready → remove (after drain), as with a proxy pool.
/// Picks round robin over ready members, skipping draining and recently failed ones.
pub struct WorkerSet {
    members: ArcSwap<Vec<Arc<Member>>>,
    next: AtomicU64,
    changed: Arc<Notify>,
    epoch: Instant,
    eject_for: Duration,
}

impl Default for WorkerSet {
    fn default() -> Self {
        WorkerSet {
            members: ArcSwap::from_pointee(Vec::new()),
            next: AtomicU64::new(0),
            changed: Arc::new(Notify::new()),
            epoch: Instant::now(),
            eject_for: Duration::from_secs(1),
        }
    }
}

impl WorkerSet {
    pub fn new() -> Arc<WorkerSet> {
        Arc::new(WorkerSet::default())
    }

    /// A new instance: known, but gets no jobs until [`WorkerSet::ready`].
    pub fn add(&self, id: &str, addr: SocketAddr) {
        let m = Arc::new(Member {
            id: id.to_string(),
            addr,
            ready: AtomicBool::new(false),
            draining: AtomicBool::new(false),
            in_flight: AtomicU64::new(0),
            ejected_until: AtomicU64::new(0),
        });
        self.members.rcu(|cur| {
            let mut v: Vec<Arc<Member>> = cur.iter().filter(|x| x.id != id).cloned().collect();
            v.push(m.clone());
            v
        });
    }

    /// The instance passed its health check: give it jobs.
    pub fn ready(&self, id: &str) {
        if let Some(m) = self.members.load().iter().find(|m| m.id == id) {
            m.ready.store(true, Ordering::Release);
            m.ejected_until.store(0, Ordering::Relaxed);
        }
        self.changed.notify_waiters();
    }

    /// Stops giving the instance jobs, waits for its running attempts (up to `drain`), then
    /// forgets it. Returns the attempts still running when it gave up waiting.
    pub async fn remove(&self, id: &str, drain: Duration) -> u64 {
        let Some(m) = self.members.load().iter().find(|m| m.id == id).cloned() else {
            return 0;
        };
        m.draining.store(true, Ordering::Release);
        let deadline = tokio::time::Instant::now() + drain;
        loop {
            let changed = self.changed.notified();
            if m.in_flight.load(Ordering::Acquire) == 0 {
                break;
            }
            if tokio::time::timeout_at(deadline, changed).await.is_err() {
                break;
            }
        }
        self.members.rcu(|cur| {
            cur.iter()
                .filter(|x| x.id != id)
                .cloned()
                .collect::<Vec<_>>()
        });
        self.changed.notify_waiters();
        m.in_flight.load(Ordering::Acquire)
    }

    /// (ready, total) members.
    pub fn counts(&self) -> (usize, usize) {
        let m = self.members.load();
        let ready = m
            .iter()
            .filter(|m| m.ready.load(Ordering::Relaxed) && !m.draining.load(Ordering::Relaxed))
            .count();
        (ready, m.len())
    }

    fn now(&self) -> u64 {
        self.epoch.elapsed().as_millis() as u64
    }
}

impl Workers for WorkerSet {
    fn pick(&self, avoid: Option<SocketAddr>) -> Option<Lease> {
        let members = self.members.load();
        let now = self.now();
        let usable: Vec<&Arc<Member>> = members
            .iter()
            .filter(|m| {
                m.ready.load(Ordering::Acquire)
                    && !m.draining.load(Ordering::Acquire)
                    && m.ejected_until.load(Ordering::Relaxed) <= now
            })
            .collect();
        if usable.is_empty() {
            return None;
        }
        let start = self.next.fetch_add(1, Ordering::Relaxed) as usize;
        let pick = (0..usable.len())
            .map(|i| usable[(start + i) % usable.len()])
            .find(|m| Some(m.addr) != avoid)
            .unwrap_or(usable[start % usable.len()]);
        pick.in_flight.fetch_add(1, Ordering::AcqRel);
        Some(Lease {
            member: pick.clone(),
            changed: self.changed.clone(),
        })
    }

    fn changed(&self) -> BoxFuture<'_, ()> {
        Box::pin(self.changed.notified())
    }

    fn failed(&self, lease: &Lease) {
        let until = self.now() + self.eject_for.as_millis() as u64;
        lease.member.ejected_until.store(until, Ordering::Relaxed);
    }
}

/// A fleet announces its instances to a worker set exactly as it does to a proxy pool.
impl shoal_fleet::Membership for WorkerSet {
    fn add(&self, id: &str, addr: SocketAddr) {
        WorkerSet::add(self, id, addr);
    }

    fn ready(&self, id: &str) {
        WorkerSet::ready(self, id);
    }

    fn remove(&self, id: &str, drain: Duration) -> shoal_fleet::provider::BoxFuture<'_, u64> {
        let id = id.to_string();
        Box::pin(async move { WorkerSet::remove(self, &id, drain).await })
    }
}

/// Dispatcher settings.
#[derive(Debug, Clone)]
pub struct DispatcherConfig {
    /// Jobs handled at once (also the RabbitMQ prefetch to use).
    pub concurrency: usize,
    /// Attempts that reached a worker before the job is dead-lettered.
    pub max_attempts: u32,
    /// Delay before the second attempt; doubles per attempt up to `retry_backoff_max`.
    pub retry_backoff: Duration,
    pub retry_backoff_max: Duration,
    /// One attempt's limit (request sent to response body read).
    pub attempt_timeout: Duration,
    /// Largest worker response body stored.
    pub max_result_bytes: usize,
}

impl Default for DispatcherConfig {
    fn default() -> Self {
        DispatcherConfig {
            concurrency: 32,
            max_attempts: 5,
            retry_backoff: Duration::from_millis(200),
            retry_backoff_max: Duration::from_secs(10),
            attempt_timeout: Duration::from_secs(30),
            max_result_bytes: 10 << 20,
        }
    }
}

impl DispatcherConfig {
    fn backoff(&self, failed_attempts: u32) -> Duration {
        let shift = failed_attempts.saturating_sub(1).min(16);
        (self.retry_backoff * (1u32 << shift)).min(self.retry_backoff_max)
    }
}

/// Consumes one broker's jobs and runs them on a worker set.
pub struct Dispatcher {
    broker: Arc<dyn Broker>,
    store: Arc<dyn Store>,
    workers: Arc<dyn Workers>,
    metrics: Arc<QueueMetrics>,
    cfg: DispatcherConfig,
    client: Client<HttpConnector, Full<Bytes>>,
    stop: Notify,
    stopped: AtomicBool,
}

/// Why one attempt failed.
enum AttemptError {
    /// The worker could not be reached: the request was never sent.
    Connect(String),
    /// Sent, but no usable answer (reset, 5xx): may have run; retried.
    Failed(String),
    /// The worker took the job and its answer was too big (502) or late (504): running it
    /// again would give the same, so the job ends here.
    Final(u16, String),
}

/// Headers that describe one connection, never forwarded either way.
const HOP_BY_HOP: [&str; 9] = [
    "connection",
    "keep-alive",
    "proxy-connection",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
    "host",
    "content-length",
];

impl Dispatcher {
    pub fn new(
        broker: Arc<dyn Broker>,
        store: Arc<dyn Store>,
        workers: Arc<dyn Workers>,
        metrics: Arc<QueueMetrics>,
        cfg: DispatcherConfig,
    ) -> Arc<Dispatcher> {
        let mut conn = HttpConnector::new();
        conn.set_nodelay(true);
        // Within the attempt's time: a worker that cannot be reached is a connect error (not
        // an attempt), never a "late answer", which would end the job.
        conn.set_connect_timeout(Some(Duration::from_secs(2).min(cfg.attempt_timeout / 2)));
        let client = Client::builder(TokioExecutor::new())
            .pool_idle_timeout(Duration::from_secs(30))
            .build(conn);
        Arc::new(Dispatcher {
            broker,
            store,
            workers,
            metrics,
            cfg,
            client,
            stop: Notify::new(),
            stopped: AtomicBool::new(false),
        })
    }

    /// Runs until [`Dispatcher::stop`]; jobs already taken finish first.
    pub async fn run(self: Arc<Self>) {
        let permits = Arc::new(Semaphore::new(self.cfg.concurrency.max(1)));
        let mut tasks = tokio::task::JoinSet::new();
        loop {
            let permit = tokio::select! {
                p = permits.clone().acquire_owned() => p.expect("semaphore never closed"),
                _ = self.stop.notified() => break,
            };
            let d = tokio::select! {
                d = self.broker.next() => d,
                _ = self.stop.notified() => break,
            };
            let d = match d {
                Ok(d) => d,
                Err(e) => {
                    if !self.stopped.load(Ordering::Relaxed) {
                        tracing::warn!(queue = %self.broker.queue(), error = %e, "dispatcher stops");
                    }
                    break;
                }
            };
            let me = self.clone();
            tasks.spawn(async move {
                me.metrics.in_flight.fetch_add(1, Ordering::Relaxed);
                me.handle(d).await;
                me.metrics.in_flight.fetch_sub(1, Ordering::Relaxed);
                drop(permit);
            });
            while tasks.try_join_next().is_some() {}
        }
        while tasks.join_next().await.is_some() {}
    }

    /// Stops taking jobs (running ones complete).
    pub fn stop(&self) {
        self.stopped.store(true, Ordering::Relaxed);
        self.stop.notify_waiters();
        self.stop.notify_one();
    }

    async fn handle(&self, d: Delivery) {
        let q = self.broker.queue().to_string();
        let env = match Envelope::decode(&d.payload) {
            Ok(e) => e,
            Err(e) => {
                self.metrics.errors.inc();
                tracing::warn!(queue = %q, error = %e, "undecodable job dead-lettered");
                let payload = d.payload;
                self.settle_dead(d.settle, payload, e.to_string()).await;
                return;
            }
        };
        self.metrics.stages[Stage::Queued as usize]
            .observe_nanos(now_ms().saturating_sub(env.submitted_ms) * 1_000_000);
        let t = Instant::now();
        let seen = self.store.get(&env.id).await;
        self.metrics.stage(Stage::Lookup, t);
        match seen {
            Ok(Some(rec)) if rec.is_final() => {
                self.metrics.duplicated.inc();
                tracing::info!(queue = %q, job = %env.id, "duplicate delivery of a finished job");
                // A failed job redelivered (its dead-lettering was cut short) still goes
                // to the dead-letter queue: acking it would drop it from there.
                if let JobRecord::Failed { error, .. } = rec {
                    self.settle_dead(d.settle, d.payload, error).await;
                    return;
                }
                if let Err(e) = d.settle.ack().await {
                    self.metrics.errors.inc();
                    tracing::warn!(queue = %q, job = %env.id, error = %e, "ack failed");
                }
                return;
            }
            Ok(_) => {}
            Err(e) => {
                // Run it anyway: storing the result will tell whether it was a duplicate.
                self.metrics.errors.inc();
                tracing::warn!(queue = %q, job = %env.id, error = %e, "store lookup failed");
            }
        }

        let mut attempts = 0u32;
        let mut avoid = None;
        let mut last_error = String::new();
        let mut failed_status = 502;
        let result = loop {
            let lease = self.wait_for_worker(avoid).await;
            avoid = Some(lease.addr());
            let t = Instant::now();
            let tried = self.attempt(&lease, &env, attempts + 1).await;
            self.metrics.stage(Stage::Worker, t);
            match tried {
                Ok(resp) => {
                    attempts += 1;
                    break Some(resp);
                }
                Err(AttemptError::Connect(e)) => {
                    // Not an attempt: the job waits for a reachable worker.
                    self.workers.failed(&lease);
                    tracing::debug!(queue = %q, worker = %lease.addr(), error = %e, "worker unreachable");
                    continue;
                }
                Err(AttemptError::Failed(e)) => {
                    attempts += 1;
                    self.metrics.failed_attempts.inc();
                    tracing::info!(queue = %q, job = %env.id, attempt = attempts, error = %e, "attempt failed");
                    last_error = e;
                    if attempts >= self.cfg.max_attempts {
                        break None;
                    }
                    drop(lease);
                    tokio::time::sleep(self.cfg.backoff(attempts)).await;
                }
                Err(AttemptError::Final(status, e)) => {
                    attempts += 1;
                    self.metrics.failed_attempts.inc();
                    if status == 504 {
                        // A worker that does not answer in time gets no new jobs for a while:
                        // a wedged instance must not turn every job it is handed into a 504.
                        self.workers.failed(&lease);
                    }
                    last_error = e;
                    failed_status = status;
                    break None;
                }
            }
        };

        let finished_ms = now_ms();
        let rec = match result {
            Some(response) => JobRecord::Done {
                submitted_ms: env.submitted_ms,
                finished_ms,
                attempts,
                response,
            },
            None => JobRecord::Failed {
                submitted_ms: env.submitted_ms,
                finished_ms,
                attempts,
                status: failed_status,
                error: last_error.clone(),
            },
        };
        let t = Instant::now();
        let fresh = self.store_final(&env.id, &rec, env.key.as_deref()).await;
        self.metrics.stage(Stage::ResultStore, t);
        if !fresh {
            self.metrics.duplicated.inc();
        }
        if rec_is_done(&rec) {
            if fresh {
                self.metrics.done.inc();
                let ms = finished_ms.saturating_sub(env.submitted_ms);
                self.metrics.latency.observe_nanos(ms * 1_000_000);
            }
            let t = Instant::now();
            let acked = d.settle.ack().await;
            self.metrics.stage(Stage::Ack, t);
            if let Err(e) = acked {
                self.metrics.errors.inc();
                tracing::warn!(queue = %q, job = %env.id, error = %e, "ack failed (job will be redelivered)");
            }
        } else {
            if fresh {
                self.metrics.dead_lettered.inc();
            }
            tracing::warn!(queue = %q, job = %env.id, attempts, error = %last_error, "job dead-lettered");
            self.settle_dead(d.settle, d.payload, last_error).await;
        }
    }

    async fn settle_dead(&self, settle: Box<dyn crate::broker::Settle>, job: Vec<u8>, err: String) {
        if let Err(e) = settle.dead_letter(job, err).await {
            self.metrics.errors.inc();
            tracing::warn!(queue = %self.broker.queue(), error = %e, "dead-lettering failed (job will be redelivered)");
        }
    }

    /// Stores the final record, retrying while the store is down (the message stays unacked
    /// meanwhile). Returns false when another delivery had stored it first.
    async fn store_final(&self, id: &str, rec: &JobRecord, key: Option<&str>) -> bool {
        let mut delay = Duration::from_millis(100);
        loop {
            match self.store.finish(id, rec, key).await {
                Ok(fresh) => return fresh,
                Err(e) => {
                    self.metrics.errors.inc();
                    tracing::warn!(queue = %self.broker.queue(), job = id, error = %e, "storing the result failed; retrying");
                    tokio::time::sleep(delay).await;
                    delay = (delay * 2).min(Duration::from_secs(5));
                }
            }
        }
    }

    /// The first job after scale-to-zero waits here for the first instance.
    async fn wait_for_worker(&self, avoid: Option<SocketAddr>) -> Lease {
        loop {
            let changed = self.workers.changed();
            if let Some(l) = self.workers.pick(avoid) {
                return l;
            }
            // Re-check periodically too: ejections expire without a notification.
            let _ = tokio::time::timeout(Duration::from_millis(250), changed).await;
        }
    }

    async fn attempt(
        &self,
        lease: &Lease,
        env: &Envelope,
        attempt: u32,
    ) -> Result<StoredResponse, AttemptError> {
        let r = &env.request;
        let uri = format!("http://{}{}", lease.addr(), r.path_and_query);
        let mut b = http::Request::builder().method(r.method.as_str()).uri(uri);
        for (k, v) in &r.headers {
            if !HOP_BY_HOP.contains(&k.as_str()) {
                b = b.header(k.as_str(), v.as_ref());
            }
        }
        let req = b
            .header("x-shoal-job-id", env.id.as_str())
            .header("x-shoal-attempt", attempt.to_string())
            .body(Full::new(r.body.clone()))
            .map_err(|e| AttemptError::Failed(format!("bad request: {e}")))?;
        let call = async {
            let resp = self.client.request(req).await.map_err(|e| {
                if e.is_connect() {
                    AttemptError::Connect(e.to_string())
                } else {
                    AttemptError::Failed(format!("worker {}: {e}", lease.addr()))
                }
            })?;
            let (parts, body) = resp.into_parts();
            let body = Limited::new(body, self.cfg.max_result_bytes)
                .collect()
                .await
                .map_err(|e| {
                    if e.is::<http_body_util::LengthLimitError>() {
                        AttemptError::Final(
                            502,
                            format!(
                                "worker {} answered more than max_result_bytes ({})",
                                lease.addr(),
                                self.cfg.max_result_bytes
                            ),
                        )
                    } else {
                        AttemptError::Failed(format!("worker {} body: {e}", lease.addr()))
                    }
                })?
                .to_bytes();
            Ok((parts, body))
        };
        // Late is final: the worker took the job and is (or was) running it.
        let (parts, body) = tokio::time::timeout(self.cfg.attempt_timeout, call)
            .await
            .map_err(|_| {
                AttemptError::Final(
                    504,
                    format!(
                        "worker {} did not answer within attempt_timeout ({:?})",
                        lease.addr(),
                        self.cfg.attempt_timeout
                    ),
                )
            })??;
        if parts.status.is_server_error() {
            return Err(AttemptError::Failed(format!(
                "worker {} answered {}",
                lease.addr(),
                parts.status.as_u16()
            )));
        }
        let headers = parts
            .headers
            .iter()
            .filter(|(k, _)| !HOP_BY_HOP.contains(&k.as_str()))
            .map(|(k, v)| (k.as_str().to_string(), Bytes::copy_from_slice(v.as_bytes())))
            .collect();
        Ok(StoredResponse {
            status: parts.status.as_u16(),
            headers,
            body,
        })
    }
}

fn rec_is_done(r: &JobRecord) -> bool {
    matches!(r, JobRecord::Done { .. })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addr(p: u16) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], p))
    }

    #[test]
    fn only_ready_members_get_jobs_round_robin_avoiding_the_last() {
        let w = WorkerSet::default();
        w.add("a", addr(1));
        w.add("b", addr(2));
        assert!(w.pick(None).is_none(), "nobody ready");
        w.ready("a");
        assert_eq!(
            w.pick(Some(addr(1))).unwrap().addr(),
            addr(1),
            "only choice"
        );
        w.ready("b");
        for _ in 0..4 {
            assert_eq!(w.pick(Some(addr(1))).unwrap().addr(), addr(2));
        }
        let seen: std::collections::HashSet<_> =
            (0..4).map(|_| w.pick(None).unwrap().addr()).collect();
        assert_eq!(seen.len(), 2);
        let l = w.pick(Some(addr(2))).unwrap();
        w.failed(&l);
        assert_eq!(w.pick(None).unwrap().addr(), addr(2), "a is ejected");
        assert_eq!(w.counts(), (2, 2));
    }

    #[tokio::test(start_paused = true)]
    async fn remove_waits_for_running_attempts() {
        let w = Arc::new(WorkerSet::default());
        w.add("a", addr(1));
        w.ready("a");
        let lease = w.pick(None).unwrap();
        let w2 = w.clone();
        let rm = tokio::spawn(async move { w2.remove("a", Duration::from_secs(30)).await });
        tokio::time::sleep(Duration::from_secs(1)).await;
        assert!(!rm.is_finished(), "still draining");
        assert!(w.pick(None).is_none(), "draining gets no jobs");
        drop(lease);
        assert_eq!(rm.await.unwrap(), 0);
        assert_eq!(w.counts(), (0, 0));
    }

    #[tokio::test(start_paused = true)]
    async fn remove_gives_up_after_the_drain_timeout() {
        let w = Arc::new(WorkerSet::default());
        w.add("a", addr(1));
        w.ready("a");
        let _lease = w.pick(None).unwrap();
        assert_eq!(w.remove("a", Duration::from_secs(5)).await, 1);
    }

    /// A broker fed by the test; settlements are recorded.
    struct FakeBroker {
        rx: tokio::sync::Mutex<tokio::sync::mpsc::UnboundedReceiver<Delivery>>,
        state: crate::broker::ConnState,
    }

    struct FakeSettle(Arc<std::sync::Mutex<Vec<&'static str>>>);

    impl crate::broker::Settle for FakeSettle {
        fn ack(self: Box<Self>) -> BoxFuture<'static, Result<(), crate::QueueError>> {
            self.0.lock().unwrap().push("ack");
            Box::pin(async { Ok(()) })
        }
        fn dead_letter(
            self: Box<Self>,
            _job: Vec<u8>,
            _error: String,
        ) -> BoxFuture<'static, Result<(), crate::QueueError>> {
            self.0.lock().unwrap().push("dead_letter");
            Box::pin(async { Ok(()) })
        }
    }

    impl Broker for FakeBroker {
        fn kind(&self) -> &'static str {
            "fake"
        }
        fn queue(&self) -> &str {
            "q"
        }
        fn publish<'a>(
            &'a self,
            _job: &'a Envelope,
        ) -> BoxFuture<'a, Result<(), crate::QueueError>> {
            Box::pin(async { Ok(()) })
        }
        fn next(&self) -> BoxFuture<'_, Result<Delivery, crate::QueueError>> {
            Box::pin(async {
                self.rx
                    .lock()
                    .await
                    .recv()
                    .await
                    .ok_or_else(|| crate::QueueError::Broker("closed".into()))
            })
        }
        fn backlog(&self) -> BoxFuture<'_, Result<u64, crate::QueueError>> {
            Box::pin(async { Ok(0) })
        }
        fn state(&self) -> &crate::broker::ConnState {
            &self.state
        }
        fn shutdown(&self) -> BoxFuture<'_, ()> {
            Box::pin(async {})
        }
    }

    /// A redelivered job whose result is stored is acknowledged without running again and
    /// counted; an undecodable message is dead-lettered, not retried forever.
    #[tokio::test]
    async fn redelivery_of_a_finished_job_is_a_counted_duplicate() {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(
            crate::store::RedbStore::open(&dir.path().join("j.redb"), Duration::from_secs(60))
                .unwrap(),
        );
        let env = Envelope {
            id: crate::job::new_id(),
            submitted_ms: 1,
            key: None,
            request: crate::job::JobRequest {
                method: "POST".into(),
                path_and_query: "/w".into(),
                headers: vec![],
                body: Bytes::new(),
            },
        };
        let done = JobRecord::Done {
            submitted_ms: 1,
            finished_ms: 2,
            attempts: 1,
            response: StoredResponse {
                status: 200,
                headers: vec![],
                body: Bytes::from_static(b"r"),
            },
        };
        assert!(store.finish(&env.id, &done, None).await.unwrap());
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        let settled = Arc::new(std::sync::Mutex::new(vec![]));
        for payload in [env.encode(), b"garbage".to_vec()] {
            tx.send(Delivery {
                payload,
                redelivered: true,
                settle: Box::new(FakeSettle(settled.clone())),
            })
            .unwrap();
        }
        drop(tx);
        let metrics = QueueMetrics::new();
        // No workers at all: running the job would wait forever.
        let d = Dispatcher::new(
            Arc::new(FakeBroker {
                rx: tokio::sync::Mutex::new(rx),
                state: Default::default(),
            }),
            store,
            WorkerSet::new(),
            metrics.clone(),
            DispatcherConfig::default(),
        );
        tokio::time::timeout(Duration::from_secs(10), d.run())
            .await
            .expect("dispatcher ends when the broker closes");
        let mut s = settled.lock().unwrap().clone();
        s.sort();
        assert_eq!(s, ["ack", "dead_letter"]);
        assert_eq!(metrics.duplicated.get(), 1);
        assert_eq!(metrics.done.get(), 0);
        assert_eq!(metrics.errors.get(), 1, "the undecodable message");
    }

    /// A worker on a raw socket that counts requests and answers 4 KiB, at once or after
    /// `delay`.
    async fn counting_worker(
        delay: Duration,
    ) -> (SocketAddr, Arc<AtomicU64>, tokio::task::JoinHandle<()>) {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let calls = Arc::new(AtomicU64::new(0));
        let c = calls.clone();
        let server = tokio::spawn(async move {
            while let Ok((mut sock, _)) = listener.accept().await {
                let c = c.clone();
                tokio::spawn(async move {
                    let mut got = Vec::new();
                    let mut buf = [0u8; 4096];
                    while !got.windows(4).any(|w| w == b"\r\n\r\n") {
                        match sock.read(&mut buf).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => got.extend_from_slice(&buf[..n]),
                        }
                    }
                    c.fetch_add(1, Ordering::SeqCst);
                    tokio::time::sleep(delay).await;
                    let body = [b'x'; 4096];
                    let head = format!("HTTP/1.1 200 OK\r\ncontent-length: {}\r\n\r\n", body.len());
                    let _ = sock.write_all(head.as_bytes()).await;
                    let _ = sock.write_all(&body).await;
                });
            }
        });
        (addr, calls, server)
    }

    /// A worker that took the job and answered too big (over `max_result_bytes`) or too
    /// late (past `attempt_timeout`) ends the job with a final 502 / 504 record after one
    /// attempt (dead-lettered), instead of running it `max_attempts` times.
    #[tokio::test]
    async fn a_too_big_or_late_answer_is_a_final_record_not_a_rerun() {
        for (delay, max_result_bytes, status) in [
            (Duration::ZERO, 1024, 502u16),
            (Duration::from_secs(30), 1 << 20, 504),
        ] {
            let (addr, calls, server) = counting_worker(delay).await;
            let dir = tempfile::tempdir().unwrap();
            let store = Arc::new(
                crate::store::RedbStore::open(&dir.path().join("j.redb"), Duration::from_secs(60))
                    .unwrap(),
            );
            let workers = WorkerSet::new();
            workers.add("w", addr);
            workers.ready("w");
            let env = Envelope {
                id: crate::job::new_id(),
                submitted_ms: 1,
                key: None,
                request: crate::job::JobRequest {
                    method: "POST".into(),
                    path_and_query: "/w".into(),
                    headers: vec![],
                    body: Bytes::new(),
                },
            };
            let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
            let settled = Arc::new(std::sync::Mutex::new(vec![]));
            tx.send(Delivery {
                payload: env.encode(),
                redelivered: false,
                settle: Box::new(FakeSettle(settled.clone())),
            })
            .unwrap();
            drop(tx);
            let d = Dispatcher::new(
                Arc::new(FakeBroker {
                    rx: tokio::sync::Mutex::new(rx),
                    state: Default::default(),
                }),
                store.clone(),
                workers,
                QueueMetrics::new(),
                DispatcherConfig {
                    max_attempts: 3,
                    retry_backoff: Duration::from_millis(1),
                    attempt_timeout: Duration::from_millis(300),
                    max_result_bytes,
                    ..Default::default()
                },
            );
            tokio::time::timeout(Duration::from_secs(10), d.run())
                .await
                .expect("the dispatcher ends when the broker closes");
            server.abort();
            assert_eq!(calls.load(Ordering::SeqCst), 1, "status {status}: run once");
            assert_eq!(*settled.lock().unwrap(), ["dead_letter"]);
            match store.get(&env.id).await.unwrap() {
                Some(JobRecord::Failed {
                    status: s,
                    attempts: 1,
                    ..
                }) => assert_eq!(s, status),
                other => panic!("status {status}: {other:?}"),
            }
        }
    }

    #[test]
    fn retry_backoff_doubles_to_the_cap() {
        let c = DispatcherConfig {
            retry_backoff: Duration::from_millis(100),
            retry_backoff_max: Duration::from_millis(500),
            ..Default::default()
        };
        let d: Vec<u128> = (1..=5).map(|a| c.backoff(a).as_millis()).collect();
        assert_eq!(d, [100, 200, 400, 500, 500]);
    }
}
