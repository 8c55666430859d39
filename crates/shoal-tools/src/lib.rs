//! shoal's tools: an open-loop HTTP load generator ([`load`], `shoal load`) and the demo
//! service whose instances the demo fleet autoscales ([`demo`]).
//!
//! Both are plain async functions on the caller's tokio runtime; the `shoal` binary parses
//! the command line and calls them.
#![forbid(unsafe_code)]

pub mod demo;
pub mod load;

pub use demo::{bind_from_env, listen_addr_from_env, run_demo, run_demo_until, DemoConfig};
pub use load::{run_load, LoadConfig, LoadError, LoadReport};
