//! Kafka through `rdkafka` (bundled librdkafka): an idempotent producer with `acks=all`, a
//! consumer group with manual commits after the result is stored, and a `{topic}.dlq` topic.
//!
//! librdkafka reconnects by itself (with its own backoff); the connection state comes from
//! its statistics (any broker `UP`) and error callbacks.
//!
//! The backlog is known whether or not the job consumer polls (at zero workers it may not):
//! a [`LagProbe`] computes, as KEDA's Kafka scaler does, per partition the high watermark
//! minus the group's committed offset (the log start when none), from the topic's metadata,
//! the group's committed offsets (OffsetFetch, without joining the group) and the high
//! watermark. The high watermark is the largest of ListOffsets(latest) and the one in Fetch
//! responses, as seen by a watcher consumer that follows the topic's end and by the job
//! consumer: some Kafka-protocol brokers (tansu) answer ListOffsets too low after
//! multi-record batches, while their Fetch high watermark is right.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::future::BoxFuture;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{
    BaseConsumer, CommitMode, Consumer, ConsumerContext, Rebalance, StreamConsumer,
};
use rdkafka::error::KafkaError;
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::types::RDKafkaErrorCode;
use rdkafka::{ClientContext, Message, Offset, TopicPartitionList};

use crate::broker::{Broker, BrokerState, ConnState, Delivery, Settle};
use crate::job::Envelope;
use crate::offsets::OffsetTracker;
use crate::QueueError;

/// Kafka settings.
#[derive(Debug, Clone)]
pub struct KafkaConfig {
    /// `host:port[,host:port...]`.
    pub brokers: String,
    pub topic: String,
    pub group: String,
    /// Partitions of the topic when shoal creates it.
    pub partitions: i32,
    /// A publish not acknowledged by all in-sync replicas within this fails.
    pub confirm_timeout: Duration,
    /// The group session timeout (how fast a dead consumer's partitions move on).
    pub session_timeout: Duration,
}

impl KafkaConfig {
    pub fn new(brokers: &str, topic: &str, group: &str) -> KafkaConfig {
        KafkaConfig {
            brokers: brokers.to_string(),
            topic: topic.to_string(),
            group: group.to_string(),
            partitions: 4,
            confirm_timeout: Duration::from_secs(5),
            session_timeout: Duration::from_secs(6),
        }
    }

    pub fn dlq(&self) -> String {
        format!("{}.dlq", self.topic)
    }
}

/// Partition offsets from the latest statistics: (high watermark, committed, log start).
type Lag = HashMap<i32, (i64, i64, i64)>;

struct Ctx {
    topic: String,
    state: Arc<ConnState>,
    lag: Mutex<Option<Lag>>,
    tracker: Arc<Mutex<OffsetTracker>>,
}

/// Reads the parts of librdkafka's statistics JSON used here, loosely: any broker `UP`, and
/// per partition of `topic` (high watermark, committed, log start). Typed parsing of the whole
/// document is avoided on purpose: brokers that fill some fields differently must not cost
/// the lag figure.
fn parse_stats(raw: &[u8], topic: &str) -> Option<(bool, Option<Lag>)> {
    let v: serde_json::Value = serde_json::from_slice(raw).ok()?;
    let up = v["brokers"]
        .as_object()
        .is_some_and(|b| b.values().any(|b| b["state"] == "UP"));
    let lag = v["topics"][topic]["partitions"].as_object().map(|parts| {
        parts
            .iter()
            .filter_map(|(p, s)| {
                let p: i32 = p.parse().ok().filter(|p| *p >= 0)?;
                let f = |k: &str| s[k].as_i64().unwrap_or(-1001);
                Some((p, (f("hi_offset"), f("committed_offset"), f("lo_offset"))))
            })
            .collect::<Lag>()
    });
    Some((up, lag))
}

impl ClientContext for Ctx {
    fn stats_raw(&self, raw: &[u8]) {
        let Some((up, lag)) = parse_stats(raw, &self.topic) else {
            tracing::warn!(topic = %self.topic, "unreadable kafka statistics");
            return;
        };
        self.state.set(if up {
            BrokerState::Connected
        } else {
            BrokerState::Disconnected
        });
        if let Ok(mut l) = self.lag.lock() {
            *l = lag;
        }
    }

    fn error(&self, error: KafkaError, reason: &str) {
        self.state.fail();
        if error.rdkafka_error_code() == Some(RDKafkaErrorCode::AllBrokersDown) {
            self.state.set(BrokerState::Disconnected);
        }
        tracing::warn!(topic = %self.topic, error = %error, reason, "kafka client error");
    }
}

impl ConsumerContext for Ctx {
    fn post_rebalance(&self, _c: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        if let Rebalance::Revoke(tpl) = rebalance {
            if let Ok(mut t) = self.tracker.lock() {
                for e in tpl.elements() {
                    t.revoke(e.partition());
                }
            }
        }
    }
}

struct ProducerCtx {
    topic: String,
    state: Arc<ConnState>,
}

impl ClientContext for ProducerCtx {
    fn error(&self, error: KafkaError, reason: &str) {
        self.state.fail();
        if error.rdkafka_error_code() == Some(RDKafkaErrorCode::AllBrokersDown) {
            self.state.set(BrokerState::Disconnected);
        }
        tracing::warn!(topic = %self.topic, error = %error, reason, "kafka producer error");
    }
}

/// The statistics of the watcher: the Fetch high watermark per partition.
struct WatchCtx {
    topic: String,
    fetched: Arc<Mutex<HashMap<i32, i64>>>,
}

impl ClientContext for WatchCtx {
    fn stats_raw(&self, raw: &[u8]) {
        let Some((_, Some(lag))) = parse_stats(raw, &self.topic) else {
            return;
        };
        if let Ok(mut f) = self.fetched.lock() {
            for (p, (hi, _, _)) in lag {
                // Watermarks only grow; a partition not fetched yet reports -1001.
                let e = f.entry(p).or_insert(-1);
                *e = (*e).max(hi);
            }
        }
    }

    fn error(&self, error: KafkaError, reason: &str) {
        tracing::debug!(topic = %self.topic, error = %error, reason, "kafka lag watcher error");
    }
}

impl ConsumerContext for WatchCtx {}

/// Reads the backlog without the job consumer (see the module documentation).
struct LagProbe {
    topic: String,
    /// Same group id as the job consumer, never subscribed: it only reads the group's
    /// committed offsets, the metadata and ListOffsets.
    meta: BaseConsumer,
    /// Assigned (not subscribed) to every partition from its end, polled by its own thread
    /// that drops what it reads: its Fetch responses carry the right high watermark.
    watcher: Arc<BaseConsumer<WatchCtx>>,
    fetched: Arc<Mutex<HashMap<i32, i64>>>,
    watched: Mutex<Vec<i32>>,
    closed: Arc<AtomicBool>,
}

/// One probe call's limit (a sample runs every second; the sampler gives up after 2 s).
const PROBE_TIMEOUT: Duration = Duration::from_millis(1500);

impl LagProbe {
    fn new(cfg: &KafkaConfig) -> Result<LagProbe, KafkaError> {
        let meta: BaseConsumer = ClientConfig::new()
            .set("bootstrap.servers", &cfg.brokers)
            .set("group.id", &cfg.group)
            .set("enable.auto.commit", "false")
            .set("reconnect.backoff.max.ms", "5000")
            .create()?;
        let fetched = Arc::new(Mutex::new(HashMap::new()));
        let watcher: BaseConsumer<WatchCtx> = ClientConfig::new()
            .set("bootstrap.servers", &cfg.brokers)
            .set("group.id", format!("{}.lag-watch", cfg.group))
            .set("enable.auto.commit", "false")
            .set("enable.auto.offset.store", "false")
            .set("statistics.interval.ms", "500")
            .set("fetch.wait.max.ms", "500")
            // It reads only to see watermarks: keep what it buffers small.
            .set("queued.max.messages.kbytes", "1024")
            .set("reconnect.backoff.max.ms", "5000")
            .create_with_context(WatchCtx {
                topic: cfg.topic.clone(),
                fetched: fetched.clone(),
            })?;
        let watcher = Arc::new(watcher);
        let closed = Arc::new(AtomicBool::new(false));
        {
            let (w, closed) = (watcher.clone(), closed.clone());
            std::thread::Builder::new()
                .name("shoal-kafka-lag".into())
                .spawn(move || {
                    while !closed.load(Ordering::Relaxed) {
                        // Messages are dropped; polling serves the statistics callback.
                        let _ = w.poll(Duration::from_millis(200));
                    }
                })
                .map_err(|e| KafkaError::ClientCreation(e.to_string()))?;
        }
        Ok(LagProbe {
            topic: cfg.topic.clone(),
            meta,
            watcher,
            fetched,
            watched: Mutex::new(Vec::new()),
            closed,
        })
    }

    /// The partitions of the topic (metadata), and the watcher following all of them.
    fn partitions(&self) -> Result<Vec<i32>, QueueError> {
        let md = self
            .meta
            .fetch_metadata(Some(&self.topic), PROBE_TIMEOUT)
            .map_err(|e| QueueError::Broker(format!("kafka metadata: {e}")))?;
        let mut parts: Vec<i32> = md
            .topics()
            .iter()
            .filter(|t| t.name() == self.topic && t.error().is_none())
            .flat_map(|t| t.partitions().iter().map(|p| p.id()))
            .collect();
        parts.sort_unstable();
        if parts.is_empty() {
            return Err(QueueError::Broker(format!(
                "kafka: topic {} has no partitions yet",
                self.topic
            )));
        }
        let mut watched = self.watched.lock().unwrap_or_else(|e| e.into_inner());
        if *watched != parts {
            let mut tpl = TopicPartitionList::new();
            for p in &parts {
                tpl.add_partition_offset(&self.topic, *p, Offset::End)
                    .map_err(|e| QueueError::Broker(e.to_string()))?;
            }
            self.watcher
                .assign(&tpl)
                .map_err(|e| QueueError::Broker(format!("kafka lag watcher: {e}")))?;
            *watched = parts.clone();
        }
        Ok(parts)
    }

    /// The group's lag over every partition. `seen` adds high watermarks the job consumer
    /// saw in its own fetches.
    fn lag(&self, seen: &HashMap<i32, i64>) -> Result<u64, QueueError> {
        let ke = |what: &str, e: KafkaError| QueueError::Broker(format!("kafka {what}: {e}"));
        // Serves the client's queued events (errors, logs): it is polled nowhere else.
        let _ = self.meta.poll(Duration::ZERO);
        let parts = self.partitions()?;
        let mut tpl = TopicPartitionList::new();
        for p in &parts {
            tpl.add_partition(&self.topic, *p);
        }
        let committed = self
            .meta
            .committed_offsets(tpl, PROBE_TIMEOUT)
            .map_err(|e| ke("committed offsets", e))?;
        let fetched = self.fetched.lock().map(|f| f.clone()).unwrap_or_default();
        let mut total = 0;
        for p in parts {
            let (lo, listed) = self
                .meta
                .fetch_watermarks(&self.topic, p, PROBE_TIMEOUT)
                .map_err(|e| ke("watermarks", e))?;
            let hi = [
                Some(listed),
                fetched.get(&p).copied(),
                seen.get(&p).copied(),
            ]
            .into_iter()
            .flatten()
            .max()
            .unwrap_or(-1);
            let c = match committed.find_partition(&self.topic, p).map(|e| e.offset()) {
                Some(Offset::Offset(n)) => n,
                _ => -1,
            };
            total += partition_lag(hi, c, lo);
        }
        Ok(total)
    }
}

impl Drop for LagProbe {
    fn drop(&mut self) {
        self.closed.store(true, Ordering::Relaxed);
    }
}

struct Shared {
    cfg: KafkaConfig,
    producer: FutureProducer<ProducerCtx>,
    consumer: StreamConsumer<Ctx>,
    probe: Arc<LagProbe>,
    tracker: Arc<Mutex<OffsetTracker>>,
    state: Arc<ConnState>,
    subscribed: AtomicBool,
    closed: AtomicBool,
}

/// A Kafka job topic consumed by one consumer group.
pub struct KafkaBroker {
    shared: Arc<Shared>,
}

impl KafkaBroker {
    /// Creates the clients and (best effort) the topics; consumption starts on the first
    /// [`Broker::next`].
    pub async fn start(cfg: KafkaConfig) -> Result<KafkaBroker, QueueError> {
        let ke = |e: KafkaError| QueueError::Broker(format!("kafka: {e}"));
        let state = Arc::new(ConnState::default());
        let tracker = Arc::new(Mutex::new(OffsetTracker::default()));
        let producer: FutureProducer<ProducerCtx> = ClientConfig::new()
            .set("bootstrap.servers", &cfg.brokers)
            .set("enable.idempotence", "true")
            .set("acks", "all")
            .set("message.timeout.ms", ms(cfg.confirm_timeout))
            .set("reconnect.backoff.max.ms", "5000")
            .create_with_context(ProducerCtx {
                topic: cfg.topic.clone(),
                state: state.clone(),
            })
            .map_err(ke)?;
        let consumer: StreamConsumer<Ctx> = ClientConfig::new()
            .set("bootstrap.servers", &cfg.brokers)
            .set("group.id", &cfg.group)
            .set("enable.auto.commit", "false")
            .set("enable.auto.offset.store", "false")
            .set("auto.offset.reset", "earliest")
            // A fetch with nothing to return waits at most this long: a job published into
            // an idle topic is seen within it (librdkafka's 500 ms default was most of a
            // job's latency at moderate rates).
            .set("fetch.wait.max.ms", "20")
            .set("session.timeout.ms", ms(cfg.session_timeout))
            .set("heartbeat.interval.ms", ms(cfg.session_timeout / 3))
            .set("statistics.interval.ms", "500")
            .set("reconnect.backoff.max.ms", "5000")
            .create_with_context(Ctx {
                topic: cfg.topic.clone(),
                state: state.clone(),
                lag: Mutex::new(None),
                tracker: tracker.clone(),
            })
            .map_err(ke)?;
        let probe = Arc::new(LagProbe::new(&cfg).map_err(ke)?);
        let b = KafkaBroker {
            shared: Arc::new(Shared {
                cfg,
                producer,
                consumer,
                probe,
                tracker,
                state,
                subscribed: AtomicBool::new(false),
                closed: AtomicBool::new(false),
            }),
        };
        if let Err(e) = b.create_topics().await {
            // The broker may be down right now or auto-create topics; consumption and
            // publishing report their own errors.
            tracing::warn!(error = %e, "kafka topic creation failed");
        }
        Ok(b)
    }

    async fn create_topics(&self) -> Result<(), QueueError> {
        let cfg = &self.shared.cfg;
        let admin: AdminClient<DefaultClientContext> = ClientConfig::new()
            .set("bootstrap.servers", &cfg.brokers)
            .create()
            .map_err(|e| QueueError::Broker(e.to_string()))?;
        let dlq = cfg.dlq();
        let topics = [
            NewTopic::new(&cfg.topic, cfg.partitions, TopicReplication::Fixed(1)),
            NewTopic::new(&dlq, 1, TopicReplication::Fixed(1)),
        ];
        let opts = AdminOptions::new().operation_timeout(Some(Duration::from_secs(5)));
        let res = admin
            .create_topics(&topics, &opts)
            .await
            .map_err(|e| QueueError::Broker(e.to_string()))?;
        for r in res {
            match r {
                Ok(_) | Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
                Err((t, code)) => {
                    return Err(QueueError::Broker(format!("create topic {t}: {code}")));
                }
            }
        }
        Ok(())
    }
}

fn ms(d: Duration) -> String {
    d.as_millis().max(1).to_string()
}

impl Shared {
    async fn produce(
        &self,
        topic: &str,
        key: &str,
        payload: &[u8],
        headers: Option<OwnedHeaders>,
    ) -> Result<(), QueueError> {
        // librdkafka would queue the message while every broker is down; a caller waiting for
        // a confirmation is better told at once.
        if self.state.get() == BrokerState::Disconnected {
            return Err(QueueError::Broker("kafka disconnected".into()));
        }
        let mut rec = FutureRecord::to(topic).key(key).payload(payload);
        if let Some(h) = headers {
            rec = rec.headers(h);
        }
        match self.producer.send(rec, self.cfg.confirm_timeout).await {
            Ok(_) => Ok(()),
            Err((e, _)) => {
                self.state.fail();
                Err(QueueError::Unconfirmed(format!("kafka: {e}")))
            }
        }
    }

    fn commit(&self, partition: i32, offset: i64) -> Result<(), QueueError> {
        let next = self
            .tracker
            .lock()
            .map_err(|_| QueueError::Broker("offset tracker poisoned".into()))?
            .done(partition, offset);
        let Some(next) = next else {
            return Ok(());
        };
        let mut tpl = TopicPartitionList::new();
        tpl.add_partition_offset(&self.cfg.topic, partition, Offset::Offset(next))
            .map_err(|e| QueueError::Broker(e.to_string()))?;
        self.consumer.commit(&tpl, CommitMode::Async).map_err(|e| {
            self.state.fail();
            QueueError::Broker(format!("kafka commit: {e}"))
        })
    }
}

impl Broker for KafkaBroker {
    fn kind(&self) -> &'static str {
        "kafka"
    }

    fn queue(&self) -> &str {
        &self.shared.cfg.topic
    }

    fn publish<'a>(&'a self, job: &'a Envelope) -> BoxFuture<'a, Result<(), QueueError>> {
        Box::pin(async move {
            self.shared
                .produce(&self.shared.cfg.topic, &job.id, &job.encode(), None)
                .await
        })
    }

    fn next(&self) -> BoxFuture<'_, Result<Delivery, QueueError>> {
        Box::pin(async move {
            let s = &self.shared;
            if !s.subscribed.swap(true, Ordering::Relaxed) {
                s.consumer
                    .subscribe(&[&s.cfg.topic])
                    .map_err(|e| QueueError::Broker(e.to_string()))?;
            }
            loop {
                if s.closed.load(Ordering::Relaxed) {
                    return Err(QueueError::Broker("shut down".into()));
                }
                let m = match tokio::time::timeout(Duration::from_millis(500), s.consumer.recv())
                    .await
                {
                    Err(_) => continue,
                    Ok(Ok(m)) => m,
                    Ok(Err(e)) => {
                        s.state.fail();
                        tracing::warn!(error = %e, "kafka receive failed");
                        tokio::time::sleep(Duration::from_millis(200)).await;
                        continue;
                    }
                };
                let (partition, offset) = (m.partition(), m.offset());
                if let Ok(mut t) = s.tracker.lock() {
                    t.received(partition, offset);
                }
                return Ok(Delivery {
                    payload: m.payload().unwrap_or_default().to_vec(),
                    redelivered: false,
                    settle: Box::new(KafkaSettle {
                        shared: s.clone(),
                        partition,
                        offset,
                    }),
                });
            }
        })
    }

    fn backlog(&self) -> BoxFuture<'_, Result<u64, QueueError>> {
        Box::pin(async move {
            // The job consumer's own fetches (when it polls) are one more high watermark.
            let seen: HashMap<i32, i64> = self
                .shared
                .consumer
                .context()
                .lag
                .lock()
                .ok()
                .and_then(|l| l.clone())
                .map(|l| l.into_iter().map(|(p, (hi, _, _))| (p, hi)).collect())
                .unwrap_or_default();
            let probe = self.shared.probe.clone();
            tokio::task::spawn_blocking(move || probe.lag(&seen))
                .await
                .map_err(|e| QueueError::Broker(format!("kafka lag task: {e}")))?
        })
    }

    fn state(&self) -> &ConnState {
        &self.shared.state
    }

    fn shutdown(&self) -> BoxFuture<'_, ()> {
        Box::pin(async move {
            self.shared.closed.store(true, Ordering::Relaxed);
            self.shared.probe.closed.store(true, Ordering::Relaxed);
            self.shared.consumer.unsubscribe();
        })
    }
}

/// One partition's lag. A partition without a high watermark counts 0; nothing committed
/// yet, or a commit older than the log start (retention deleted those messages), means the
/// group reads from the log start (`auto.offset.reset=earliest`).
fn partition_lag(hi: i64, committed: i64, lo: i64) -> u64 {
    if hi < 0 {
        return 0;
    }
    let from = committed.max(lo).max(0);
    (hi - from).max(0) as u64
}

struct KafkaSettle {
    shared: Arc<Shared>,
    partition: i32,
    offset: i64,
}

impl Settle for KafkaSettle {
    fn ack(self: Box<Self>) -> BoxFuture<'static, Result<(), QueueError>> {
        Box::pin(async move { self.shared.commit(self.partition, self.offset) })
    }

    fn dead_letter(
        self: Box<Self>,
        job: Vec<u8>,
        error: String,
    ) -> BoxFuture<'static, Result<(), QueueError>> {
        Box::pin(async move {
            let headers = OwnedHeaders::new().insert(Header {
                key: "x-shoal-error",
                value: Some(error.as_str()),
            });
            let key = Envelope::decode(&job).map(|e| e.id).unwrap_or_default();
            let dlq = self.shared.cfg.dlq();
            // Retried until the broker takes it: the offset stays uncommitted meanwhile,
            // so neither the job nor the commit point behind it is given up.
            let mut delay = std::time::Duration::from_millis(200);
            while let Err(e) = self
                .shared
                .produce(&dlq, &key, &job, Some(headers.clone()))
                .await
            {
                tracing::warn!(topic = %dlq, error = %e, "dead-letter publish failed; retrying");
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(std::time::Duration::from_secs(5));
            }
            self.shared.commit(self.partition, self.offset)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lag_inputs_from_statistics_json() {
        let raw = br#"{"brokers": {"127.0.0.1:9092/1": {"state": "UP"}},
            "topics": {"jobs": {"partitions": {
                "0": {"hi_offset": 10, "committed_offset": 4, "lo_offset": 0},
                "1": {"hi_offset": 3, "committed_offset": -1001, "lo_offset": 0},
                "-1": {"hi_offset": -1001}}}}}"#;
        let (up, lag) = parse_stats(raw, "jobs").unwrap();
        assert!(up);
        let lag = lag.unwrap();
        assert_eq!(lag.len(), 2);
        assert_eq!(lag[&0], (10, 4, 0));
        assert_eq!(lag[&1], (3, -1001, 0));
        let total: u64 = lag.values().map(|&(h, c, l)| partition_lag(h, c, l)).sum();
        assert_eq!(total, 6 + 3);
        assert_eq!(partition_lag(-1001, -1001, -1), 0);
        assert_eq!(partition_lag(100, 10, 40), 60, "commit below the log start");
        assert_eq!(partition_lag(100, -1001, 40), 60, "nothing committed");
        assert_eq!(partition_lag(100, 70, -1), 30, "log start unknown");
        let (up, lag) = parse_stats(br#"{"brokers": {"b": {"state": "DOWN"}}}"#, "jobs").unwrap();
        assert!(!up && lag.is_none());
    }
}
