//! The queues of a running shoal: what the binary builds from a config's `[brokers]`,
//! `[jobs]` and async routes, and plugs into the proxy (the async phase's [`Jobs`] seam), the
//! fleets (worker sets and backlogs), `/metrics` and the admin API.
//!
//! Per async route: one broker connection for its queue, a [`Submitter`], a [`Dispatcher`]
//! consuming into the worker service's [`WorkerSet`], and a backlog sample every second
//! (`shoal_queue_depth`, and the worker fleet's `backlog` autoscaler reads it).

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::Response;
use http_body_util::{BodyExt, Full};
use serde_json::{json, Value};
use shoal_fleet::autoscaler::BacklogSource;
use shoal_fleet::{FleetHooks, Membership};
use shoal_proxy::app::{ApiExtension, Collector};
use shoal_proxy::config::RouteConfig;
use shoal_proxy::jobs::{BoxFuture, JobRequest, JobSink, Jobs};
use shoal_proxy::metrics::Exposition;
use shoal_proxy::{Config, ConfigError};

use crate::amqp::{AmqpBroker, AmqpConfig};
use crate::backlog::BacklogSampler;
use crate::broker::{Broker, BrokerState};
use crate::config::{queue_specs, BrokerKind, QueueSpec, QueuesSpec};
use crate::dispatch::{Dispatcher, DispatcherConfig, WorkerSet};
use crate::kafka::{KafkaBroker, KafkaConfig};
use crate::metrics::{QueueCollector, QueueMetrics};
use crate::store::{RedbStore, RedisStore, Store};
use crate::submit::{SubmitConfig, Submitter};

/// A backlog sample older than this is not trusted (the fleet holds its size).
const STALE_AFTER: Duration = Duration::from_secs(5);
const SAMPLE_EVERY: Duration = Duration::from_secs(1);
/// How often expired job records and idempotency keys are removed from the redb file
/// (Redis expires its own).
const SWEEP_EVERY: Duration = Duration::from_secs(60);

/// One async route's queue, running.
pub struct RunningQueue {
    pub spec: QueueSpec,
    /// The `[brokers.NAME]` kind: `rabbitmq` or `kafka`.
    pub kind: &'static str,
    pub broker: Arc<dyn Broker>,
    pub metrics: Arc<QueueMetrics>,
    pub submitter: Arc<Submitter>,
    pub dispatcher: Arc<Dispatcher>,
    pub workers: Arc<WorkerSet>,
    /// Milliseconds after `Queues::epoch` of the last successful backlog sample (0: none).
    sampled_at: AtomicU64,
    sampler: BacklogSampler,
}

/// Every queue of a shoal process.
pub struct Queues {
    pub queues: Vec<Arc<RunningQueue>>,
    workers: BTreeMap<String, Arc<WorkerSet>>,
    epoch: Instant,
    stop: Arc<tokio::sync::Notify>,
    tasks: Mutex<Vec<tokio::task::JoinHandle<()>>>,
    /// Aborted at shutdown (a sweep is idempotent; nothing waits for it).
    sweeper: Mutex<Option<tokio::task::JoinHandle<()>>>,
}

/// Validates the queue tables (for `shoal check` and reloads).
pub fn validate(config: &Config) -> Result<QueuesSpec, ConfigError> {
    queue_specs(config)
}

async fn into_bytes(r: Response<Full<Bytes>>) -> Response<Bytes> {
    let (parts, body) = r.into_parts();
    let body = match body.collect().await {
        Ok(b) => b.to_bytes(),
        Err(never) => match never {},
    };
    Response::from_parts(parts, body)
}

impl Queues {
    /// Connects the brokers and the store and starts consuming. Broker connections are
    /// made in the background (a broker down at start means 503s until it is up); the
    /// store must open (a redb file in `data_dir`, or Redis).
    pub async fn start(config: &Config) -> Result<Arc<Queues>, String> {
        let spec = queue_specs(config).map_err(|e| e.to_string())?;
        let epoch = Instant::now();
        if spec.queues.is_empty() {
            return Ok(Arc::new(Queues {
                queues: Vec::new(),
                workers: BTreeMap::new(),
                epoch,
                stop: Arc::default(),
                tasks: Mutex::default(),
                sweeper: Mutex::default(),
            }));
        }
        enum Base {
            Redb(RedbStore),
            Redis(RedisStore),
        }
        let base = match &spec.redis {
            Some(url) => Base::Redis(
                RedisStore::connect(url, "shoal:", Duration::from_secs(3600))
                    .await
                    .map_err(|e| format!("[jobs] redis {url}: {e}"))?,
            ),
            None => Base::Redb(
                RedbStore::open(&spec.redb_path, Duration::from_secs(3600))
                    .map_err(|e| format!("job store: {e}"))?,
            ),
        };
        let swept: Arc<dyn Store> = match &base {
            Base::Redb(s) => Arc::new(s.clone()),
            Base::Redis(s) => Arc::new(s.clone()),
        };
        let mut workers: BTreeMap<String, Arc<WorkerSet>> = BTreeMap::new();
        let mut queues = Vec::new();
        for q in &spec.queues {
            let b = spec.broker(&q.broker).expect("validated broker");
            let broker: Arc<dyn Broker> = match &b.kind {
                BrokerKind::RabbitMq { url } => {
                    let mut c = AmqpConfig::new(url, &q.queue);
                    c.prefetch = q.concurrency.min(u16::MAX as usize) as u16;
                    let b = AmqpBroker::start(c);
                    // Serving starts connected when the broker is up; when it is not, async
                    // routes answer 503 until the background reconnect succeeds.
                    if !b.wait_connected(Duration::from_secs(5)).await {
                        tracing::warn!(queue = %q.queue, broker = %q.broker, "rabbitmq not reachable yet: submissions get 503 until it is");
                    }
                    Arc::new(b)
                }
                BrokerKind::Kafka {
                    bootstrap,
                    partitions,
                } => {
                    let mut c =
                        KafkaConfig::new(bootstrap, &q.queue, &format!("shoal-{}", q.queue));
                    c.partitions = *partitions;
                    Arc::new(
                        KafkaBroker::start(c)
                            .await
                            .map_err(|e| format!("{}: {e}", q.route))?,
                    )
                }
            };
            // One namespace per queue: a job URL finds only its own queue's jobs.
            let store: Arc<dyn Store> = match &base {
                Base::Redb(s) => Arc::new(s.for_queue(&q.queue, q.result_ttl)),
                Base::Redis(s) => Arc::new(s.for_queue(&q.queue, q.result_ttl)),
            };
            let ws = workers
                .entry(q.worker_service.clone())
                .or_insert_with(|| {
                    let ws = WorkerSet::new();
                    // A worker service without a process fleet: its static backends are
                    // the workers.
                    if let Some(svc) = config.services.iter().find(|s| s.name == q.worker_service) {
                        if !crate::config::process_fleet(svc) {
                            for bk in &svc.backends {
                                let id = bk.addr.to_string();
                                ws.add(&id, bk.addr);
                                ws.ready(&id);
                            }
                        }
                    }
                    ws
                })
                .clone();
            let metrics = QueueMetrics::new();
            let submitter = Arc::new(Submitter::new(
                broker.clone(),
                store.clone(),
                metrics.clone(),
                SubmitConfig {
                    max_body: q.max_body,
                    identity_header: q.identity_header.clone(),
                    ..Default::default()
                },
            ));
            let dispatcher = Dispatcher::new(
                broker.clone(),
                store,
                ws.clone(),
                metrics.clone(),
                DispatcherConfig {
                    concurrency: q.concurrency,
                    max_attempts: q.max_attempts,
                    attempt_timeout: q.attempt_timeout,
                    max_result_bytes: q.max_result_bytes,
                    ..Default::default()
                },
            );
            queues.push(Arc::new(RunningQueue {
                spec: q.clone(),
                kind: b.kind_name(),
                sampler: BacklogSampler {
                    broker: broker.clone(),
                    metrics: metrics.clone(),
                },
                broker,
                metrics,
                submitter,
                dispatcher,
                workers: ws,
                sampled_at: AtomicU64::new(0),
            }));
        }
        let q = Arc::new(Queues {
            queues,
            workers,
            epoch,
            stop: Arc::default(),
            tasks: Mutex::default(),
            sweeper: Mutex::default(),
        });
        let mut tasks = Vec::new();
        for rq in &q.queues {
            tracing::info!(queue = %rq.spec.queue, broker = %rq.spec.broker, kind = rq.kind, workers = %rq.spec.worker_service, "async queue started");
            tasks.push(tokio::spawn(rq.dispatcher.clone().run()));
        }
        tasks.push(tokio::spawn(q.clone().sample_loop()));
        let metrics = q.queues.iter().map(|r| r.metrics.clone()).collect();
        *q.sweeper.lock().expect("lock") =
            Some(tokio::spawn(sweep_loop(swept, SWEEP_EVERY, metrics)));
        *q.tasks.lock().expect("lock") = tasks;
        Ok(q)
    }

    fn now_ms(&self) -> u64 {
        self.epoch.elapsed().as_millis() as u64
    }

    /// Samples every queue's backlog once a second (`shoal_queue_depth`, the scalers).
    async fn sample_loop(self: Arc<Self>) {
        loop {
            // All at once: one hung broker must not make every other queue's sample stale.
            let this = &self;
            let samples = self.queues.iter().map(|q| async move {
                // A failure is logged by the sampler; the stale sample makes the scaler hold.
                let sample = tokio::time::timeout(Duration::from_secs(2), q.sampler.sample());
                if let Ok(Some(_)) = sample.await {
                    q.sampled_at.store(this.now_ms().max(1), Ordering::Relaxed);
                }
            });
            tokio::select! {
                _ = futures_util::future::join_all(samples) => {}
                _ = self.stop.notified() => return,
            }
            tokio::select! {
                _ = tokio::time::sleep(SAMPLE_EVERY) => {}
                _ = self.stop.notified() => return,
            }
        }
    }

    /// What the fleets attach: each worker service's worker set and backlog.
    pub fn fleet_hooks(self: &Arc<Self>) -> FleetHooks {
        let mut h = FleetHooks::default();
        for (svc, ws) in &self.workers {
            h.members
                .insert(svc.clone(), ws.clone() as Arc<dyn Membership>);
            h.backlog.insert(
                svc.clone(),
                Arc::new(ServiceBacklog {
                    queues: self.clone(),
                    service: svc.clone(),
                }),
            );
        }
        h
    }

    /// The backlog over the queues of `service`; None when a sample is missing or stale.
    pub fn backlog_of(&self, service: &str) -> Option<u64> {
        let now = self.now_ms();
        let mut total = 0u64;
        for q in self
            .queues
            .iter()
            .filter(|q| q.spec.worker_service == service)
        {
            let at = q.sampled_at.load(Ordering::Relaxed);
            if at == 0 || now.saturating_sub(at) > STALE_AFTER.as_millis() as u64 {
                return None;
            }
            total += q.metrics.depth.load(Ordering::Relaxed).max(0) as u64;
        }
        Some(total)
    }

    /// Stops taking jobs; running ones finish (up to `deadline`); closes broker connections.
    pub async fn shutdown(&self, deadline: Duration) {
        // A stored permit: the sample loop sees it even if it was not waiting just now.
        self.stop.notify_one();
        if let Some(s) = self.sweeper.lock().expect("lock").take() {
            s.abort();
        }
        for q in &self.queues {
            q.dispatcher.stop();
        }
        let tasks = std::mem::take(&mut *self.tasks.lock().expect("lock"));
        let _ = tokio::time::timeout(deadline, futures_util::future::join_all(tasks)).await;
        for q in &self.queues {
            q.broker.shutdown().await;
        }
    }

    fn queue_json(&self, q: &RunningQueue) -> Value {
        let m = &q.metrics;
        let (ready, total) = q.workers.counts();
        let depth = m.depth.load(Ordering::Relaxed);
        json!({
            "queue": q.spec.queue,
            "broker": q.spec.broker,
            "kind": q.kind,
            "state": q.broker.state().get().as_str(),
            "connects": q.broker.state().connects(),
            "depth": (depth >= 0).then_some(depth),
            "worker_service": q.spec.worker_service,
            "workers": { "ready": ready, "total": total },
            "in_flight": m.in_flight.load(Ordering::Relaxed),
            "jobs": {
                "accepted": m.accepted.get(),
                "rejected": m.rejected.get(),
                "done": m.done.get(),
                "dead_lettered": m.dead_lettered.get(),
                "duplicated": m.duplicated.get(),
                "failed_attempts": m.failed_attempts.get(),
            },
            "route": q.spec.route,
        })
    }
}

/// Removes expired job records and idempotency keys from `store` every `every` (without it
/// the redb file only grows, until every submission fails); a failure is logged and counted
/// as an error of every queue (they share the store).
async fn sweep_loop(store: Arc<dyn Store>, every: Duration, metrics: Vec<Arc<QueueMetrics>>) {
    loop {
        tokio::time::sleep(every).await;
        match store.sweep().await {
            Ok(0) => {}
            Ok(n) => tracing::debug!(removed = n, "job store swept"),
            Err(e) => {
                for m in &metrics {
                    m.errors.inc();
                }
                tracing::warn!(error = %e, "sweeping the job store failed");
            }
        }
    }
}

struct ServiceBacklog {
    queues: Arc<Queues>,
    service: String,
}

impl BacklogSource for ServiceBacklog {
    fn backlog(&self) -> Option<u64> {
        self.queues.backlog_of(&self.service)
    }
}

/// One async route's sink, on a listener whose job URLs are under `jobs_path`.
struct RouteSink {
    queue: Arc<RunningQueue>,
    /// `{jobs_path}/`: the prefix of the `Location`s it gives.
    jobs_prefix: String,
}

impl JobSink for RouteSink {
    fn max_body(&self) -> usize {
        self.queue.spec.max_body
    }

    fn submit(
        &self,
        req: JobRequest,
        idempotency_key: Option<String>,
    ) -> BoxFuture<'_, Response<Bytes>> {
        Box::pin(async move {
            into_bytes(
                self.queue
                    .submitter
                    .respond_at(req, idempotency_key.as_deref(), &self.jobs_prefix)
                    .await,
            )
            .await
        })
    }

    fn lookup(&self, id: &str) -> BoxFuture<'_, Response<Bytes>> {
        let id = id.to_string();
        Box::pin(async move { into_bytes(self.queue.submitter.handle_job(&id).await).await })
    }
}

impl Jobs for Queues {
    fn sink(&self, route: &RouteConfig, jobs_path: &str) -> Option<Arc<dyn JobSink>> {
        let table = route.extra.get("async")?;
        let queue = table
            .get("queue")
            .and_then(|v| v.as_str())
            .unwrap_or(&route.service);
        let broker = table.get("broker").and_then(|v| v.as_str());
        let found = self.queues.iter().find(|q| {
            q.spec.queue == queue
                && broker.is_none_or(|b| b == q.spec.broker)
                && q.spec.worker_service == route.service
        });
        match found {
            Some(q) => Some(Arc::new(RouteSink {
                queue: q.clone(),
                jobs_prefix: format!("{jobs_path}/"),
            })),
            None => {
                tracing::warn!(queue, "async route without a running queue (a new queue starts on the next restart): answering 503");
                None
            }
        }
    }
}

impl Collector for Queues {
    fn collect(&self, e: &mut Exposition) {
        let mut up: BTreeMap<&'static str, bool> = BTreeMap::new();
        for q in &self.queues {
            QueueCollector {
                broker: q.broker.clone(),
                metrics: q.metrics.clone(),
            }
            .collect(e);
            let connected = q.broker.state().get() == BrokerState::Connected;
            *up.entry(q.kind).or_insert(true) &= connected;
        }
        for (dep, ok) in up {
            e.dependency_up(dep, ok);
        }
    }
}

impl ApiExtension for Queues {
    fn get(&self, path: &str) -> Option<Value> {
        match path {
            "/api/queues" => Some(json!({
                "queues": self.queues.iter().map(|q| self.queue_json(q)).collect::<Vec<_>>(),
            })),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::job::{JobRecord, StoredResponse};

    /// The runtime's sweep removes what expired without anyone reading it: after one period
    /// the expired result is gone from the file (a second sweep finds nothing).
    #[tokio::test(start_paused = true)]
    async fn the_periodic_sweep_removes_expired_records() {
        use std::sync::atomic::AtomicU64;
        let dir = tempfile::tempdir().unwrap();
        let t = Arc::new(AtomicU64::new(1_000_000));
        let clock = t.clone();
        let store = RedbStore::open(&dir.path().join("j.redb"), Duration::from_secs(60))
            .unwrap()
            .with_clock(Arc::new(move || clock.load(Ordering::Relaxed)));
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
        assert!(store.finish("a", &done, None).await.unwrap());
        t.fetch_add(61_000, Ordering::Relaxed);
        let store: Arc<dyn Store> = Arc::new(store);
        let sweeper = tokio::spawn(sweep_loop(
            store.clone(),
            SWEEP_EVERY,
            vec![QueueMetrics::new()],
        ));
        tokio::time::sleep(SWEEP_EVERY + Duration::from_secs(1)).await;
        assert_eq!(store.sweep().await.unwrap(), 0, "already swept");
        sweeper.abort();
    }
}
