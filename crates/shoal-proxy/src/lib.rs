//! shoal's data path: the HTTP reverse proxy, upstream pools, health checks, metrics, the
//! admin API and the configuration they are built from.
//!
//! **Architecture Invariant:** the request path never waits on the control loop: it reads an
//! immutable pool snapshot (`ArcSwap`) and updates only atomics.
#![forbid(unsafe_code)]

mod access;
pub mod admin;
pub mod cache;
/// The cache crate, for the binary to configure stores with.
pub use shoal_cache;
pub mod app;
pub mod config;
pub mod error;
pub mod grpc;
mod h1;
pub mod health;
pub mod history;
pub mod hygiene;
pub mod jobs;
pub mod metrics;
pub mod pool;
pub mod proxy;
pub mod route;
pub mod server;
pub mod tickets;
pub mod tls;
mod tries;
pub mod upstream;

pub use app::App;
pub use config::{Config, ConfigError, ServiceConfig};
