//! The broker seam: publish with confirmation, consume with explicit settlement, and the
//! backlog figure the scaler reads. Implementations reconnect by themselves with backoff and
//! report their connection state.

use std::sync::atomic::{AtomicU64, AtomicU8, Ordering};
use std::time::Duration;

use futures_util::future::BoxFuture;

use crate::job::Envelope;
use crate::QueueError;

/// A message broker holding one job queue (a RabbitMQ queue or a Kafka topic).
pub trait Broker: Send + Sync + 'static {
    /// `rabbitmq` or `kafka`.
    fn kind(&self) -> &'static str;
    /// The queue or topic name (the `queue` label of the metrics).
    fn queue(&self) -> &str;
    /// Publishes and resolves only once the broker confirmed the message durable
    /// (RabbitMQ publisher confirm; Kafka ack from all in-sync replicas).
    fn publish<'a>(&'a self, job: &'a Envelope) -> BoxFuture<'a, Result<(), QueueError>>;
    /// The next delivery. Waits (reconnecting as needed) until there is one; errors only when
    /// the broker was shut down.
    fn next(&self) -> BoxFuture<'_, Result<Delivery, QueueError>>;
    /// Jobs not yet settled: RabbitMQ ready + unacknowledged, Kafka consumer-group lag.
    fn backlog(&self) -> BoxFuture<'_, Result<u64, QueueError>>;
    fn state(&self) -> &ConnState;
    /// Closes connections; pending `next` calls end with an error.
    fn shutdown(&self) -> BoxFuture<'_, ()>;
}

/// How a delivery is settled, per broker.
pub trait Settle: Send + Sync {
    /// The job's result is stored: remove it from the queue (ack / commit).
    fn ack(self: Box<Self>) -> BoxFuture<'static, Result<(), QueueError>>;
    /// Give up on the job: move it to the dead-letter queue with `error`, then remove it.
    fn dead_letter(
        self: Box<Self>,
        job: Vec<u8>,
        error: String,
    ) -> BoxFuture<'static, Result<(), QueueError>>;
}

/// One received message.
pub struct Delivery {
    /// The raw message (decoded by the dispatcher, which dead-letters what does not decode).
    pub payload: Vec<u8>,
    /// The broker says this may have been delivered before.
    pub redelivered: bool,
    pub settle: Box<dyn Settle>,
}

/// Connection state, readable lock-free by metrics and status.
#[derive(Debug, Default)]
pub struct ConnState {
    state: AtomicU8,
    reconnects: AtomicU64,
    failures: AtomicU64,
}

/// What a broker connection is doing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BrokerState {
    Connecting,
    Connected,
    Disconnected,
}

impl BrokerState {
    pub fn as_str(self) -> &'static str {
        match self {
            BrokerState::Connecting => "connecting",
            BrokerState::Connected => "connected",
            BrokerState::Disconnected => "disconnected",
        }
    }
}

impl ConnState {
    pub fn get(&self) -> BrokerState {
        match self.state.load(Ordering::Relaxed) {
            1 => BrokerState::Connected,
            2 => BrokerState::Disconnected,
            _ => BrokerState::Connecting,
        }
    }
    pub fn set(&self, s: BrokerState) {
        let v = match s {
            BrokerState::Connecting => 0,
            BrokerState::Connected => 1,
            BrokerState::Disconnected => 2,
        };
        let old = self.state.swap(v, Ordering::Relaxed);
        if v == 1 && old != 1 {
            self.reconnects.fetch_add(1, Ordering::Relaxed);
        }
    }
    /// Connections established (the first one included).
    pub fn connects(&self) -> u64 {
        self.reconnects.load(Ordering::Relaxed)
    }
    pub fn fail(&self) {
        self.failures.fetch_add(1, Ordering::Relaxed);
    }
    /// Connection attempts and operations that failed.
    pub fn failures(&self) -> u64 {
        self.failures.load(Ordering::Relaxed)
    }
}

/// Reconnect delays: 100 ms doubling to `max`.
#[derive(Debug, Clone)]
pub struct Backoff {
    next: Duration,
    max: Duration,
}

impl Backoff {
    pub fn new(max: Duration) -> Backoff {
        Backoff {
            next: Duration::from_millis(100).min(max),
            max,
        }
    }
    pub fn next_delay(&mut self) -> Duration {
        let d = self.next;
        self.next = (self.next * 2).min(self.max);
        d
    }
    pub fn reset(&mut self) {
        self.next = Duration::from_millis(100).min(self.max);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_to_max_and_resets() {
        let mut b = Backoff::new(Duration::from_millis(500));
        let d: Vec<u64> = (0..5).map(|_| b.next_delay().as_millis() as u64).collect();
        assert_eq!(d, [100, 200, 400, 500, 500]);
        b.reset();
        assert_eq!(b.next_delay(), Duration::from_millis(100));
    }

    #[test]
    fn state_counts_connects() {
        let s = ConnState::default();
        assert_eq!(s.get(), BrokerState::Connecting);
        s.set(BrokerState::Connected);
        s.set(BrokerState::Connected);
        s.set(BrokerState::Disconnected);
        s.set(BrokerState::Connected);
        assert_eq!(s.connects(), 2);
    }
}
