//! Asynchronous requests: a submitted request becomes a job on RabbitMQ or Kafka, a
//! dispatcher hands it to a worker instance over HTTP, and the worker's answer is stored for
//! `GET {jobs_path}/{id}` (`/jobs/{id}` by default). Worker fleets scale on the backlog (KEDA
//! semantics, down to zero).
//!
//! Layers, each usable alone:
//! - [`job`]: the wire and store encodings;
//! - [`store`]: results in Redis or an embedded redb file;
//! - [`broker`]: the [`Broker`] seam with RabbitMQ ([`amqp`]) and Kafka ([`kafka`]);
//! - [`submit`]: submission (202 only after the broker confirmed) and job lookup, as plain
//!   functions and as HTTP handlers;
//! - [`dispatch`]: consume → call a worker → store → ack, with retries and dead-lettering;
//! - [`backlog`]: the pure scaling policy and the backlog sampler.
//!
//! Wiring ([`runtime::Queues`], from [`config`]'s `[brokers]`, `[jobs]` and route `async`
//! tables): one broker connection and [`Submitter`] per async route, answering the proxy's
//! async phase (`shoal_proxy::jobs::Jobs`) and its listener's job URLs; a [`WorkerSet`] per
//! worker service, fed by its fleet (`shoal_fleet::FleetHooks`); a [`Dispatcher`] per queue; the
//! backlog sampled every second for `shoal_queue_depth` and the fleet's `backlog` policy
//! (`shoal_scale::backlog`, run by the fleet's autoscaler); [`metrics::QueueCollector`] on
//! the admin `/metrics`.
#![forbid(unsafe_code)]

pub mod amqp;
pub mod backlog;
pub mod broker;
pub mod config;
pub mod dispatch;
pub mod job;
pub mod kafka;
pub mod metrics;
pub mod offsets;
pub mod runtime;
pub mod store;
pub mod submit;

pub use broker::{Broker, BrokerState, Delivery};
pub use dispatch::{Dispatcher, DispatcherConfig, WorkerSet, Workers};
pub use job::{Envelope, JobRecord, JobRequest, StoredResponse};
pub use metrics::QueueMetrics;
pub use runtime::Queues;
pub use store::{RedbStore, RedisStore, Store};
pub use submit::{SubmitConfig, SubmitError, Submitter};

/// What went wrong, by side: the broker, the store, or the job's own data.
#[derive(Debug, Clone, thiserror::Error)]
pub enum QueueError {
    /// The broker is unreachable or refused the operation; retrying later is safe.
    #[error("broker: {0}")]
    Broker(String),
    /// The broker did not confirm a publish: the job may or may not be queued.
    #[error("broker did not confirm: {0}")]
    Unconfirmed(String),
    #[error("store: {0}")]
    Store(String),
    #[error("{0}")]
    Decode(#[from] job::DecodeError),
}
