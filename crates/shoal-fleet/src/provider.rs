//! The seams between fleets, the balancer and the autoscaler.
//!
//! A [`Provider`] runs instances somewhere (local processes here; a Kubernetes provider
//! would drive a Deployment's scale subresource) and reports them. It announces membership
//! as a stream of changes into a [`Membership`] sink — add (starting, no traffic), ready,
//! remove (drain first) — which the balancer's pool implements. The autoscaler sees only
//! `Provider`.

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use serde::Serialize;
use serde_json::Value;
use shoal_proxy::metrics::Exposition;
use shoal_proxy::pool::{Pool, State};

use crate::usage::Usage;

/// Where an instance is in its life, whichever provider runs it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Phase {
    Starting,
    Ready,
    Stopping,
}

/// A boxed future, for the async methods of object-safe traits.
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// Where membership changes go (the balancer's pool).
pub trait Membership: Send + Sync {
    /// A new instance: known, but gets no traffic until `ready`.
    fn add(&self, id: &str, addr: SocketAddr);
    /// The instance passed its first health check: route to it (with slow start).
    fn ready(&self, id: &str);
    /// Stop routing new requests, wait for in-flight ones (up to `drain`), forget it.
    /// Resolves to the requests still in flight when it was removed.
    fn remove(&self, id: &str, drain: Duration) -> BoxFuture<'_, u64>;
    /// Requests in flight on an instance, where the sink routes them (scale-in picks the
    /// least busy).
    fn in_flight(&self, _id: &str) -> Option<u64> {
        None
    }
    /// Requests waiting for a first instance (scale from zero): demand with nothing ready.
    fn waiting(&self) -> u64 {
        0
    }
}

impl Membership for Pool {
    fn add(&self, id: &str, addr: SocketAddr) {
        self.add_starting(id, addr, 1);
    }

    fn ready(&self, id: &str) {
        self.mark_ready(id);
    }

    fn remove(&self, id: &str, drain: Duration) -> BoxFuture<'_, u64> {
        let id = id.to_string();
        Box::pin(async move { Pool::remove(self, &id, drain).await.unwrap_or(0) })
    }

    fn in_flight(&self, id: &str) -> Option<u64> {
        self.get(id).map(|i| i.in_flight())
    }

    fn waiting(&self) -> u64 {
        Pool::waiting(self)
    }
}

/// One member as a provider reports it.
#[derive(Debug, Clone, Serialize)]
pub struct Member {
    pub id: String,
    pub addr: SocketAddr,
    pub phase: Phase,
}

/// A fleet of instances that can be sized.
pub trait Provider: Send + Sync {
    /// `process`, `static`, ...
    fn kind(&self) -> &'static str;
    fn service(&self) -> &str;
    /// Sets the desired count, clamped to the provider's bounds; returns the count set.
    fn scale(&self, n: u32) -> u32;
    fn desired(&self) -> u32;
    /// (min, max) the provider accepts.
    fn bounds(&self) -> (u32, u32);
    /// New bounds (config reload); the desired count is clamped into them at once.
    fn set_bounds(&self, _min: u32, _max: u32) {}
    /// Instances by phase: (starting, ready, stopping).
    fn counts(&self) -> (u32, u32, u32);
    fn members(&self) -> Vec<Member>;
    /// Fresh usage samples of live members; empty where the provider cannot see usage.
    fn sample_usage(&self) -> Vec<(String, Phase, Usage)>;
    /// Provider health and per-member details for the API.
    fn status(&self) -> Value;
    fn collect(&self, e: &mut Exposition);
    /// CPU cores each instance is allotted now (the denominator of CPU utilization).
    fn cpu_allotment(&self) -> Option<f64> {
        None
    }
    /// The per-instance size recommendation, where the provider sees usage.
    fn recommendation(&self) -> Option<crate::recommend::Recommendation> {
        None
    }
    /// In-place size changes made so far, oldest first.
    fn resizes(&self) -> Vec<crate::recommend::Resize> {
        Vec::new()
    }
    /// Drains and stops every member it runs.
    fn shutdown(&self, deadline: Duration) -> BoxFuture<'_, ()>;
}

/// The `static` provider: the service's configured backends, never scaled.
pub struct StaticFleet {
    service: String,
    pool: Arc<Pool>,
}

impl StaticFleet {
    pub fn new(service: &str, pool: Arc<Pool>) -> Arc<StaticFleet> {
        Arc::new(StaticFleet {
            service: service.to_string(),
            pool,
        })
    }

    fn phase(s: State) -> Phase {
        match s {
            State::Starting => Phase::Starting,
            State::Ready => Phase::Ready,
            State::Draining => Phase::Stopping,
        }
    }
}

/// The static provider's entry in the registry: the service's `backends` are the fleet,
/// reported, never scaled.
pub static STATIC_KIND: crate::registry::ProviderKind = crate::registry::ProviderKind {
    name: "static",
    scales: false,
    local_processes: false,
    sized_by_platform: false,
    lease_election: false,
    check: check_static,
    start: start_static,
};

fn check_static(
    _fleet: &crate::config::FleetConfig,
    autoscale: bool,
) -> Result<(), crate::registry::FieldError> {
    if autoscale {
        return Err((
            "provider",
            "a static fleet is not scaled: remove [autoscale] or use the process provider".into(),
        ));
    }
    Ok(())
}

fn start_static(s: crate::registry::Start<'_>) -> Result<Arc<dyn Provider>, String> {
    Ok(StaticFleet::new(&s.spec.service, s.service.pool.clone()))
}

impl Provider for StaticFleet {
    fn kind(&self) -> &'static str {
        "static"
    }
    fn service(&self) -> &str {
        &self.service
    }
    fn scale(&self, _n: u32) -> u32 {
        self.desired()
    }
    fn desired(&self) -> u32 {
        self.members().len() as u32
    }
    fn bounds(&self) -> (u32, u32) {
        let n = self.desired();
        (n, n)
    }
    fn counts(&self) -> (u32, u32, u32) {
        let c = self.pool.counts();
        (c[0].1 as u32, c[1].1 as u32, c[2].1 as u32)
    }
    fn members(&self) -> Vec<Member> {
        self.pool
            .members()
            .iter()
            .map(|i| Member {
                id: i.id.clone(),
                addr: i.addr,
                phase: Self::phase(i.state()),
            })
            .collect()
    }
    fn sample_usage(&self) -> Vec<(String, Phase, Usage)> {
        Vec::new()
    }
    fn status(&self) -> Value {
        serde_json::json!({ "state": "ok", "provider": "static" })
    }
    fn collect(&self, _e: &mut Exposition) {}
    fn shutdown(&self, _deadline: Duration) -> BoxFuture<'_, ()> {
        Box::pin(async {})
    }
}
