//! Per-queue counters, exported through the proxy's exposition so there is one metrics system.

use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Arc;

use shoal_proxy::app::Collector;
use shoal_proxy::metrics::{Counter, Exposition, Histogram, Kind};

use crate::broker::Broker;

/// The figures of one job queue.
#[derive(Default)]
pub struct QueueMetrics {
    pub accepted: Counter,
    /// Submissions refused because the broker did not confirm (answered 503).
    pub rejected: Counter,
    pub done: Counter,
    /// Attempts that failed (each retry counts).
    pub failed_attempts: Counter,
    pub dead_lettered: Counter,
    /// Deliveries of a job whose result was already stored.
    pub duplicated: Counter,
    /// Store, ack or decode failures in the dispatcher (each also logged).
    pub errors: Counter,
    /// Jobs currently being handled by this dispatcher.
    pub in_flight: AtomicI64,
    /// Submission (accepted) to result stored.
    pub latency: Histogram,
    /// Last backlog sampled; -1 until the first sample.
    pub depth: AtomicI64,
    /// Time spent in each stage of a job's path, by [`Stage`].
    pub stages: [Histogram; Stage::ALL.len()],
}

/// The stages of a job's path timed in `shoal_queue_stage_seconds` (bench/README.md sums
/// them up).
#[derive(Debug, Clone, Copy)]
pub enum Stage {
    /// Submit: the pending record written (and fsynced).
    SubmitStore,
    /// Submit: publish until the broker's confirm.
    Confirm,
    /// Submission start until the dispatcher took the delivery (submit_store and confirm
    /// included; the rest is waiting in the broker and in the dispatcher's consumer).
    Queued,
    /// Dispatch: the duplicate check (a store read).
    Lookup,
    /// Dispatch: the worker call (request sent to response body read).
    Worker,
    /// Dispatch: the final record written (and fsynced).
    ResultStore,
    /// Dispatch: the acknowledgement (RabbitMQ ack, Kafka offset commit).
    Ack,
}

impl Stage {
    pub const ALL: [Stage; 7] = [
        Stage::SubmitStore,
        Stage::Confirm,
        Stage::Queued,
        Stage::Lookup,
        Stage::Worker,
        Stage::ResultStore,
        Stage::Ack,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Stage::SubmitStore => "submit_store",
            Stage::Confirm => "confirm",
            Stage::Queued => "queued",
            Stage::Lookup => "lookup",
            Stage::Worker => "worker",
            Stage::ResultStore => "result_store",
            Stage::Ack => "ack",
        }
    }
}

impl QueueMetrics {
    pub fn new() -> Arc<QueueMetrics> {
        Arc::new(QueueMetrics {
            depth: AtomicI64::new(-1),
            ..Default::default()
        })
    }

    /// Records that `stage` took since `since`.
    pub fn stage(&self, stage: Stage, since: std::time::Instant) {
        self.stages[stage as usize].observe_nanos(since.elapsed().as_nanos() as u64);
    }
}

/// Renders one queue's metrics; register it with the admin listener.
pub struct QueueCollector {
    pub broker: Arc<dyn Broker>,
    pub metrics: Arc<QueueMetrics>,
}

impl Collector for QueueCollector {
    fn collect(&self, e: &mut Exposition) {
        let q = self.broker.queue();
        let m = &self.metrics;
        let depth = m.depth.load(Ordering::Relaxed);
        if depth >= 0 {
            e.gauge(
                "shoal_queue_depth",
                "Jobs waiting or in progress (RabbitMQ ready + unacked, Kafka consumer lag).",
                &[("queue", q)],
                depth as f64,
            );
        } else {
            e.declare(
                "shoal_queue_depth",
                "Jobs waiting or in progress (RabbitMQ ready + unacked, Kafka consumer lag).",
                Kind::Gauge,
            );
        }
        let help = "Jobs by outcome.";
        for (result, c) in [
            ("accepted", &m.accepted),
            ("rejected", &m.rejected),
            ("done", &m.done),
            ("dead_lettered", &m.dead_lettered),
            ("duplicated", &m.duplicated),
        ] {
            e.counter(
                "shoal_queue_jobs_total",
                help,
                &[("queue", q), ("result", result)],
                c.get(),
            );
        }
        e.counter(
            "shoal_queue_failed_attempts_total",
            "Worker attempts that failed (retried or dead-lettered).",
            &[("queue", q)],
            m.failed_attempts.get(),
        );
        e.counter(
            "shoal_queue_errors_total",
            "Store, acknowledgement and decode failures in the dispatcher.",
            &[("queue", q)],
            m.errors.get(),
        );
        e.gauge(
            "shoal_queue_in_flight_jobs",
            "Jobs being handled by this shoal.",
            &[("queue", q)],
            m.in_flight.load(Ordering::Relaxed) as f64,
        );
        e.histogram(
            "shoal_queue_job_duration_seconds",
            "End-to-end job latency: accepted to result stored.",
            &[("queue", q)],
            &m.latency,
        );
        for s in Stage::ALL {
            e.histogram(
                "shoal_queue_stage_seconds",
                "Time a job spends in each stage of its path (submit_store, confirm, queued, lookup, worker, result_store, ack).",
                &[("queue", q), ("stage", s.as_str())],
                &m.stages[s as usize],
            );
        }
        let st = self.broker.state();
        for s in ["connecting", "connected", "disconnected"] {
            e.gauge(
                "shoal_queue_broker_state",
                "Broker connection state (1 for the current one).",
                &[("queue", q), ("broker", self.broker.kind()), ("state", s)],
                f64::from(u8::from(st.get().as_str() == s)),
            );
        }
        e.counter(
            "shoal_queue_broker_connects_total",
            "Broker connections established (reconnects included).",
            &[("queue", q)],
            st.connects(),
        );
        e.counter(
            "shoal_queue_broker_failures_total",
            "Failed broker connection attempts and operations.",
            &[("queue", q)],
            st.failures(),
        );
    }
}
