//! The broker side of backlog scaling: [`BacklogSampler`] reads a queue's backlog (RabbitMQ
//! ready + unacked, Kafka consumer lag) and publishes `shoal_queue_depth`. The policy itself
//! is [`shoal_scale::backlog`], run by the fleet's autoscaler like every other policy.

use std::sync::atomic::Ordering;
use std::sync::Arc;

pub use shoal_scale::backlog::{BacklogInput, BacklogParams, BacklogPolicy, POLICY_NAME};

use crate::broker::Broker;
use crate::metrics::QueueMetrics;

/// Reads a broker's backlog for the scaler and the `shoal_queue_depth` gauge.
pub struct BacklogSampler {
    pub broker: Arc<dyn Broker>,
    pub metrics: Arc<QueueMetrics>,
}

impl BacklogSampler {
    /// The backlog now, or None (logged) when the broker cannot say.
    pub async fn sample(&self) -> Option<u64> {
        match self.broker.backlog().await {
            Ok(n) => {
                self.metrics.depth.store(n as i64, Ordering::Relaxed);
                Some(n)
            }
            Err(e) => {
                tracing::debug!(queue = %self.broker.queue(), error = %e, "backlog unavailable");
                None
            }
        }
    }
}
