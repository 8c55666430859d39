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
}

impl QueueMetrics {
    pub fn new() -> Arc<QueueMetrics> {
        Arc::new(QueueMetrics {
            depth: AtomicI64::new(-1),
            ..Default::default()
        })
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
