//! shoal's fleet: starts, health-gates, registers, drains, stops and replaces instances, and
//! sizes the fleet with the live autoscaler.
//!
//! **Architecture Invariant:** scaling decisions come from `shoal-scale` policies, the same
//! code the simulator runs; this crate only observes (windows over the data path and
//! `/proc`) and acts (the provider).
#![forbid(unsafe_code)]

pub mod autoscaler;
pub mod cgroup;
pub mod cluster;
pub mod config;
pub mod config_share;
pub mod kube;
pub mod leader;
pub mod lease;
pub mod process;
pub mod promsource;
pub mod provider;
pub mod recommend;
pub mod redis_call;
pub mod registry;
pub mod supervise;
pub mod ticket_share;
pub mod usage;
pub mod vertical;

use std::sync::Arc;
use std::time::Duration;

use serde_json::{json, Value};
use shoal_proxy::app::{ApiExtension, Collector};
use shoal_proxy::metrics::Exposition;
use shoal_proxy::{App, Config};
use tokio::sync::watch;

pub use autoscaler::Autoscaler;
pub use config::{fleet_specs, FleetSpec};
pub use process::ProcessFleet;
pub use provider::{Membership, Provider, StaticFleet};

/// One managed service: its provider and, if configured, its autoscaler.
pub struct Managed {
    pub provider: Arc<dyn Provider>,
    /// With replicas: this service's election.
    pub leadership: Option<Arc<cluster::Leadership>>,
    pub autoscaler: Option<Arc<Autoscaler>>,
    /// Per-instance limits, as configured.
    pub resources: config::Resources,
}

/// Every fleet of a shoal process; plugs into the admin API and `/metrics`.
pub struct Fleets {
    pub managed: Vec<Managed>,
    stop: watch::Sender<bool>,
    registry: Option<Arc<supervise::Registry>>,
}

/// What other parts of shoal attach to fleets: worker fleets of async routes get their
/// instances announced to a worker set too, and their backlog for the `backlog` policy.
#[derive(Default, Clone)]
pub struct FleetHooks {
    /// Per service: a membership fed besides the service's pool.
    pub members: std::collections::BTreeMap<String, Arc<dyn Membership>>,
    /// Per service: the backlog its `backlog` autoscaler reads.
    pub backlog: std::collections::BTreeMap<String, Arc<dyn autoscaler::BacklogSource>>,
}

/// Announces every membership change to the pool and to one more sink; a removal waits for
/// both drains.
struct Tee(Arc<dyn Membership>, Arc<dyn Membership>);

impl Membership for Tee {
    fn add(&self, id: &str, addr: std::net::SocketAddr) {
        self.0.add(id, addr);
        self.1.add(id, addr);
    }
    fn ready(&self, id: &str) {
        self.0.ready(id);
        self.1.ready(id);
    }
    fn remove(&self, id: &str, drain: Duration) -> provider::BoxFuture<'_, u64> {
        let (a, b) = (self.0.remove(id, drain), self.1.remove(id, drain));
        Box::pin(async move {
            let (a, b) = tokio::join!(a, b);
            a + b
        })
    }
    fn in_flight(&self, id: &str) -> Option<u64> {
        self.0.in_flight(id).or_else(|| self.1.in_flight(id))
    }
    fn waiting(&self) -> u64 {
        self.0.waiting() + self.1.waiting()
    }
}

impl Fleets {
    /// Starts the fleets the config describes, on services `app` already runs.
    pub fn start(app: &Arc<App>, config: &Config) -> Result<Arc<Fleets>, String> {
        Fleets::start_with(app, config, &FleetHooks::default())
    }

    /// [`Fleets::start`] with the worker sets and backlogs of async routes attached.
    pub fn start_with(
        app: &Arc<App>,
        config: &Config,
        hooks: &FleetHooks,
    ) -> Result<Arc<Fleets>, String> {
        let specs = fleet_specs(config).map_err(|e| e.to_string())?;
        let cluster_spec = cluster::cluster_spec(config).map_err(|e| e.to_string())?;
        let (stop, stop_rx) = watch::channel(false);
        // One election per fleet: the leader decides and writes, the others follow.
        let elect = |spec: &FleetSpec| -> Result<Option<Arc<cluster::Leadership>>, String> {
            let Some(c) = &cluster_spec else {
                return Ok(None);
            };
            let l = cluster::Leadership::new(&spec.service, c, Some(&spec.fleet.namespace))
                .map_err(|e| format!("cluster: {e}"))?;
            tokio::spawn(l.clone().run(stop_rx.clone()));
            Ok(Some(l))
        };
        if let Some(c) = &cluster_spec {
            // Requests to the API server name the replica (audit logs tell replicas apart).
            kube::set_user_agent(&c.id);
            if c.redis.is_some() {
                tracing::info!(replica = %c.id, lease_s = c.timing.lease.as_secs_f64(), "cluster: electing a leader per fleet through Redis");
            } else {
                tracing::info!(replica = %c.id, lease_s = c.timing.lease.as_secs_f64(), "cluster: electing a leader per fleet through a Kubernetes Lease");
                match &c.peers {
                    Some(p) => {
                        tracing::info!(peers = %p, "cluster: the leader pulls every replica's load from the EndpointSlices of this Service")
                    }
                    None => tracing::warn!(
                        "cluster: no `peers` Service: the leader decides on its own load only"
                    ),
                }
            }
        }
        let mut managed = Vec::new();
        // Before any instance starts: stop what a previous run left, start the watchdog.
        let kind_of = |spec: &FleetSpec| {
            registry::find(&spec.fleet.provider)
                .ok_or_else(|| format!("service {}: unknown provider", spec.service))
        };
        let registry = if specs
            .iter()
            .any(|s| kind_of(s).is_ok_and(|k| k.local_processes))
        {
            Some(Arc::new(
                supervise::Registry::open(&config.data_dir)
                    .map_err(|e| format!("data_dir {}: {e}", config.data_dir.display()))?,
            ))
        } else {
            None
        };
        for spec in specs {
            let service = app
                .service(&spec.service)
                .ok_or_else(|| format!("no service {}", spec.service))?;
            let kind = kind_of(&spec)?;
            let autoscale = spec.autoscale.clone().filter(|_| kind.scales);
            let leadership = elect(&spec)?;
            let members: Arc<dyn Membership> = match hooks.members.get(&spec.service) {
                Some(extra) => Arc::new(Tee(service.pool.clone(), extra.clone())),
                None => service.pool.clone(),
            };
            let provider = (kind.start)(registry::Start {
                spec: &spec,
                service: &service,
                members,
                leadership: leadership.clone(),
                processes: registry.clone(),
            })
            .map_err(|e| format!("service {}: {e}", spec.service))?;
            let autoscaler = match autoscale {
                Some(cfg) => {
                    let backlog = hooks.backlog.get(&spec.service).cloned();
                    let a = Autoscaler::new(service, provider.clone(), &spec, cfg, backlog)?;
                    if let Some(l) = &leadership {
                        a.set_cluster(l.clone());
                    }
                    tokio::spawn(a.clone().run(stop_rx.clone()));
                    Some(a)
                }
                None => None,
            };
            managed.push(Managed {
                provider,
                leadership,
                autoscaler,
                resources: spec.resources,
            });
        }
        let fleets = Arc::new(Fleets {
            managed,
            stop,
            registry,
        });
        app.add_collector(fleets.clone());
        app.add_extension(fleets.clone());
        Ok(fleets)
    }

    pub fn get(&self, service: &str) -> Option<&Managed> {
        self.managed
            .iter()
            .find(|m| m.provider.service() == service)
    }

    /// Applies what a reloaded config can change without a restart: fleet bounds. Other fleet
    /// changes (command, provider, autoscale settings, new fleets) need a restart; they are
    /// logged, not silently ignored.
    pub fn reload(&self, config: &Config) {
        let specs = match fleet_specs(config) {
            Ok(s) => s,
            Err(e) => {
                tracing::error!(error = %e, "fleet settings not reloaded");
                return;
            }
        };
        // A service gone from the config takes its fleet with it: drained, then stopped (a
        // Kubernetes fleet stops being watched and scaled; its pods stay the cluster's).
        for m in &self.managed {
            let service = m.provider.service().to_string();
            if registry::scales(m.provider.kind())
                && !config.services.iter().any(|s| s.name == service)
            {
                tracing::info!(service = %service, "service removed: draining and stopping its fleet");
                let provider = m.provider.clone();
                tokio::spawn(async move { provider.shutdown(Duration::from_secs(60)).await });
            }
        }
        for spec in specs {
            match self.get(&spec.service) {
                Some(m) => {
                    let (min, max) = (spec.fleet.min, spec.fleet.max);
                    if m.provider.bounds() != (min, max) && registry::scales(m.provider.kind()) {
                        tracing::info!(service = %spec.service, min, max, "fleet bounds reloaded");
                        m.provider.set_bounds(min, max);
                    }
                }
                None => {
                    tracing::warn!(service = %spec.service, "new fleet in reloaded config: starts on the next restart")
                }
            }
        }
    }

    /// Stops autoscaling, then drains and stops every instance.
    pub async fn shutdown(&self, deadline: Duration) {
        let _ = self.stop.send(true);
        // With replicas: the lock released first, so a peer takes over at once rather
        // than after the lease (the runtime would end the election task mid-release).
        for m in &self.managed {
            if let Some(l) = &m.leadership {
                l.stopped(Duration::from_secs(2)).await;
            }
        }
        for m in &self.managed {
            m.provider.shutdown(deadline).await;
        }
        if let Some(r) = &self.registry {
            r.close();
        }
    }
}

impl Fleets {
    /// Stops every instance at once (SIGKILL to each process group and cgroup), no drain:
    /// the answer to a second SIGTERM/SIGINT.
    pub fn kill_now(&self) {
        let _ = self.stop.send(true);
        if let Some(r) = &self.registry {
            r.kill_all();
            r.close();
        }
    }
}

impl Collector for Fleets {
    fn collect(&self, e: &mut Exposition) {
        for m in &self.managed {
            e.gauge(
                "shoal_desired_instances",
                "Instances the fleet is converging on.",
                &[("service", m.provider.service())],
                m.provider.desired() as f64,
            );
            // A static fleet has no bounds to reach (its size is its backend list).
            if registry::scales(m.provider.kind()) {
                let (min, max) = m.provider.bounds();
                let l = [("service", m.provider.service())];
                e.gauge(
                    "shoal_min_instances",
                    "The fleet's configured minimum.",
                    &l,
                    min as f64,
                );
                e.gauge(
                    "shoal_max_instances",
                    "The fleet's configured maximum.",
                    &l,
                    max as f64,
                );
                if let Some(cpu) = m.resources.cpu {
                    e.gauge(
                        "shoal_instance_cpu_limit_cores",
                        "CPU cores each instance may use.",
                        &l,
                        cpu,
                    );
                }
                if let Some(mem) = m.resources.memory_bytes {
                    e.gauge(
                        "shoal_instance_memory_limit_bytes",
                        "Memory each instance may use.",
                        &l,
                        mem as f64,
                    );
                }
            }
            m.provider.collect(e);
            if let Some(a) = &m.autoscaler {
                a.collect(e);
            }
            if let Some(l) = &m.leadership {
                l.collect(e);
            }
        }
    }
}

impl Fleets {
    /// `GET /api/leader`: per fleet, whether this replica leads it and who does. The
    /// top-level `leader` is true when this replica leads every fleet (with one fleet: that
    /// fleet); `holder`, `token`, `since` are the first fleet's.
    pub fn leader_api(&self) -> Option<Value> {
        let per: Vec<Value> = self
            .managed
            .iter()
            .filter_map(|m| m.leadership.as_ref().map(|l| l.api()))
            .collect();
        let first = per.first()?.clone();
        Some(json!({
            "leader": per.iter().all(|v| v["leader"] == true),
            "id": first["id"],
            "holder": first["holder"],
            "token": first["token"],
            "since": first["since"],
            "services": per,
        }))
    }
}

impl ApiExtension for Fleets {
    fn get(&self, path: &str) -> Option<Value> {
        if path == "/api/leader" {
            return self.leader_api();
        }
        if let Some(name) = path.strip_prefix("/api/cluster/load/") {
            return Fleets::get(self, name)?
                .leadership
                .as_ref()
                .map(|l| l.load_report());
        }
        let rest = path.strip_prefix("/api/services/")?;
        let (name, sub) = rest.split_once('/').unwrap_or((rest, ""));
        let m = Fleets::get(self, name)?;
        let a = m.autoscaler.as_ref();
        match sub {
            "" => Some(json!({
                "desired": m.provider.desired(),
                "min": m.provider.bounds().0,
                "max": m.provider.bounds().1,
                "fleet": m.provider.status(),
                "processes": m.provider.status().get("processes").cloned().unwrap_or_default(),
                "policy": a.map(|a| a.cfg.policy.clone()),
                "last_decision": a.and_then(|a| a.last_decision()),
                "recommendation": m.provider.recommendation(),
                "prometheus": a.and_then(|a| a.prometheus()).map(|p| json!({
                    "query": p.spec.query,
                    "value": p.value(std::time::Instant::now()),
                    "error": p.last_error(),
                })),
            })),
            "decisions" => Some(json!({
                "decisions": a.map(|a| a.decisions()).unwrap_or_default(),
                "resizes": m.provider.resizes(),
            })),
            "forecast" => a.map(|a| a.forecast()),
            _ => None,
        }
    }

    fn owns_instance(&self, service: &str, id: &str) -> bool {
        Fleets::get(self, service).is_some_and(|m| {
            registry::scales(m.provider.kind()) && m.provider.members().iter().any(|i| i.id == id)
        })
    }

    /// `POST /api/services/NAME/scale {"desired": N}`: manual scaling (an autoscaler, if
    /// configured, will keep deciding from its next evaluation on).
    fn post(&self, path: &str, body: &Value) -> Option<Result<Value, String>> {
        let name = path
            .strip_prefix("/api/services/")?
            .strip_suffix("/scale")?;
        let m = Fleets::get(self, name)?;
        // With replicas only the leader writes the fleet.
        if let Some(l) = m.leadership.as_ref().filter(|l| !l.is_leader()) {
            let holder = l.api()["holder"].as_str().unwrap_or("unknown").to_string();
            return Some(Err(format!(
                "this replica does not lead service {name}; the leader is {holder}"
            )));
        }
        Some(match body["desired"].as_u64() {
            Some(n) => {
                let set = m.provider.scale(n.min(u32::MAX as u64) as u32);
                Ok(json!({ "desired": set }))
            }
            None => Err("body must be {\"desired\": N}".into()),
        })
    }
}
