//! The running proxy: services with their listeners and health loops, built from a
//! [`Config`] and reconfigured in place on reload.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::{json, Value};
use tokio::sync::watch;

use crate::config::{Config, ServiceConfig};
use crate::metrics::{Exposition, Format, Kind};
use crate::pool::{now_nanos, ErrorKind};
use crate::proxy::Service;
use crate::server::{self, Listener};

/// Something that adds samples to `/metrics` (fleet, autoscaler, ...).
pub trait Collector: Send + Sync {
    fn collect(&self, e: &mut Exposition);
}

/// Something that serves extra admin API routes. Returns None for routes it does not own.
pub trait ApiExtension: Send + Sync {
    fn get(&self, path: &str) -> Option<Value>;
    /// A mutating call (already authorized). None: not this extension's route.
    fn post(&self, _path: &str, _body: &Value) -> Option<Result<Value, String>> {
        None
    }
    /// True when this extension manages the instance (the admin API then refuses to drain
    /// or delete it behind the owner's back).
    fn owns_instance(&self, _service: &str, _id: &str) -> bool {
        false
    }
}

/// Checks a config beyond what `Config` validates itself.
pub type Validator = Box<dyn Fn(&Config) -> Result<(), String> + Send + Sync>;
/// Sees each config that was reloaded successfully.
pub type ReloadHook = Box<dyn Fn(&Config) + Send + Sync>;
/// Whether a reload applies the file text it read.
pub type ReloadGate = Box<dyn Fn(&str) -> bool + Send + Sync>;

struct Running {
    service: Arc<Service>,
    /// None for a service reached only through routes.
    listener: Option<Listener>,
    health_stop: watch::Sender<bool>,
}

/// All services of one shoal process.
pub struct App {
    services: Mutex<BTreeMap<String, Running>>,
    /// Reloads run one at a time, start to finish.
    reload_lock: tokio::sync::Mutex<()>,
    /// The file reload re-reads; None in quick mode.
    pub config_path: Option<PathBuf>,
    pub admin_token: Option<String>,
    collectors: Mutex<Vec<Arc<dyn Collector>>>,
    extensions: Mutex<Vec<Arc<dyn ApiExtension>>>,
    pub reloads: crate::metrics::Counter,
    pub reload_failures: crate::metrics::Counter,
    /// Hook the binary installs to see reloaded configs (fleet, autoscaler).
    on_reload: Mutex<Option<ReloadHook>>,
    reload_gate: Mutex<Option<ReloadGate>>,
    /// Extra validation of a reloaded config (tables other crates own).
    validator: Mutex<Option<Validator>>,
    /// The store every cache phase uses (`[cache]`, the quick-mode flags, or a default).
    cache_store: Mutex<Option<Arc<shoal_cache::CacheStore>>>,
    /// Cache phases by owner (`service` or `service\0listener#route`), kept across reloads
    /// while their settings do not change, so their counters carry on.
    caches: Mutex<BTreeMap<String, Arc<shoal_cache::Cache>>>,
    /// The job system async routes hand their requests to (installed by the binary).
    jobs: Mutex<Option<Arc<dyn crate::jobs::Jobs>>>,
}

/// A new terminator for a service whose `tls` table changed (`Some(None)`: TLS turned off).
type TlsChange = Option<Option<Arc<crate::tls::Terminator>>>;

/// Why a config could not be applied (the running one stays).
#[derive(Debug, thiserror::Error)]
pub enum ApplyError {
    #[error(transparent)]
    Bind(#[from] StartError),
}

async fn bind(name: &str, addr: SocketAddr, svc: &Arc<Service>) -> Result<Listener, StartError> {
    server::bind(addr, svc.clone())
        .await
        .map_err(|source| StartError::Bind {
            service: name.to_string(),
            addr,
            source,
        })
}

/// The TLS terminator a service's `tls` table asks for (files loaded and checked).
fn terminator(cfg: &ServiceConfig) -> Result<Option<Arc<crate::tls::Terminator>>, StartError> {
    cfg.tls
        .as_ref()
        .map(|t| crate::tls::Terminator::new(&cfg.name, t))
        .transpose()
        .map_err(|message| StartError::Tls {
            service: cfg.name.clone(),
            message,
        })
}

fn existing_addr(services: &Mutex<BTreeMap<String, Running>>, name: &str) -> Option<SocketAddr> {
    services
        .lock()
        .expect("lock")
        .get(name)
        .and_then(|r| r.listener.as_ref().map(|l| l.addr))
}

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("service {service}: tls: {message}")]
    Tls { service: String, message: String },
    #[error("service {service}: cannot listen on {addr}: {source}")]
    Bind {
        service: String,
        addr: SocketAddr,
        source: std::io::Error,
    },
}

impl App {
    pub fn new(config_path: Option<PathBuf>, admin_token: Option<String>) -> Arc<App> {
        // An empty token would match a request without one.
        let admin_token = admin_token.filter(|t| !t.trim().is_empty());
        Arc::new(App {
            services: Mutex::new(BTreeMap::new()),
            reload_lock: tokio::sync::Mutex::new(()),
            config_path,
            admin_token,
            collectors: Mutex::new(Vec::new()),
            extensions: Mutex::new(Vec::new()),
            reloads: Default::default(),
            reload_failures: Default::default(),
            on_reload: Mutex::new(None),
            reload_gate: Mutex::new(None),
            validator: Mutex::new(None),
            cache_store: Mutex::new(None),
            caches: Mutex::new(BTreeMap::new()),
            jobs: Mutex::new(None),
        })
    }

    pub fn add_collector(&self, c: Arc<dyn Collector>) {
        self.collectors.lock().expect("lock").push(c);
    }

    pub fn add_extension(&self, x: Arc<dyn ApiExtension>) {
        self.extensions.lock().expect("lock").push(x);
    }

    /// Sets the cache store (before services start); the quick-mode flags use this.
    pub fn set_cache_store(&self, s: Arc<shoal_cache::CacheStore>) {
        *self.cache_store.lock().expect("lock") = Some(s);
    }

    /// Installs the job system of async routes (before services start; routes pick it up
    /// whenever they are rebuilt).
    pub fn set_jobs(&self, j: Arc<dyn crate::jobs::Jobs>) {
        *self.jobs.lock().expect("lock") = Some(j);
        self.rebuild_routes();
    }

    pub fn cache_store(&self) -> Option<Arc<shoal_cache::CacheStore>> {
        self.cache_store.lock().expect("lock").clone()
    }

    /// The cache phase for `owner` with `cfg`: the running one if its settings are the same.
    /// `namespace` goes into every key of the cache: the service's name, or
    /// `LISTENER/HOST PREFIX [METHODS] [=REPLACE]>UPSTREAM` for a listener's route.
    fn cache_for(
        &self,
        owner: String,
        namespace: &str,
        cfg: &Option<shoal_cache::CacheConfig>,
    ) -> Option<Arc<shoal_cache::Cache>> {
        let cfg = cfg.as_ref()?;
        let mut caches = self.caches.lock().expect("lock");
        if let Some(c) = caches
            .get(&owner)
            .filter(|c| c.config() == cfg && c.namespace() == namespace)
        {
            return Some(c.clone());
        }
        let store = self
            .cache_store
            .lock()
            .expect("lock")
            .get_or_insert_with(|| {
                tracing::info!(
                    bytes = crate::config::DEFAULT_CACHE_MEMORY,
                    "cache: memory tier with the default size"
                );
                shoal_cache::CacheStore::new(crate::config::DEFAULT_CACHE_MEMORY, None, &cfg.policy)
                    .expect("no Redis URL to check")
            })
            .clone();
        let c = shoal_cache::Cache::new(store, cfg.clone(), namespace);
        caches.insert(owner, c.clone());
        Some(c)
    }

    /// Purges from the cache: `{"url": ...}`, `{"prefix": ...}` or `{"surrogate_key": ...}`.
    pub async fn cache_purge(&self, body: &Value) -> Result<Value, (u16, String)> {
        let store = self
            .cache_store()
            .ok_or((404, "no cache is configured".to_string()))?;
        let arg = |k: &str| body.get(k).and_then(Value::as_str).map(str::to_string);
        let r = if let Some(u) = arg("url") {
            store.purge_url(&u).await
        } else if let Some(p) = arg("prefix") {
            store.purge_prefix(&p).await
        } else if let Some(t) = arg("surrogate_key") {
            store.purge_surrogate_key(&t).await
        } else {
            return Err((400, "give one of url, prefix, surrogate_key".into()));
        };
        r.map(|n| json!({ "purged": n }))
            .map_err(|e| (502, format!("purged from memory only: {e}")))
    }

    /// The cache's figures for `/api/cache` and `shoal status`.
    pub fn cache_status(&self) -> Option<Value> {
        let store = self.cache_store()?;
        let s = store.stats();
        let mut results = BTreeMap::<String, BTreeMap<&str, u64>>::new();
        for (owner, c) in self.caches.lock().expect("lock").iter() {
            let svc = owner.split('\0').next().unwrap_or(owner).to_string();
            for r in shoal_cache::CacheResult::ALL {
                *results
                    .entry(svc.clone())
                    .or_default()
                    .entry(r.as_str())
                    .or_default() += c.counters().get(r);
            }
        }
        Some(json!({
            "memory_bytes": s.memory_bytes,
            "memory_capacity_bytes": s.memory_capacity_bytes,
            "objects": s.memory_objects,
            "evictions": s.evictions,
            "redis_configured": s.redis_configured,
            "redis_connected": s.redis_connected,
            "redis_errors": s.redis_errors,
            "requests": results,
        }))
    }

    pub fn set_validator(&self, f: Validator) {
        *self.validator.lock().expect("lock") = Some(f);
    }

    pub fn set_on_reload(&self, f: ReloadHook) {
        *self.on_reload.lock().expect("lock") = Some(f);
    }

    /// Decides, from the file's text, whether a reload applies it (see [`App::reload`]).
    pub fn set_reload_gate(&self, f: ReloadGate) {
        *self.reload_gate.lock().expect("lock") = Some(f);
    }

    /// Starts one service: binds its listener (if it has one) and its health loop.
    pub async fn start_service(&self, cfg: ServiceConfig) -> Result<Arc<Service>, StartError> {
        let name = cfg.name.clone();
        let listen = cfg.listen;
        let tls = terminator(&cfg)?;
        let service = Service::new(cfg);
        service.tls.store(tls);
        let listener = match listen {
            Some(addr) => Some(bind(&name, addr, &service).await?),
            None => None,
        };
        self.register(service.clone(), listener);
        self.rebuild_routes();
        Ok(service)
    }

    fn register(&self, service: Arc<Service>, listener: Option<Listener>) {
        let (health_stop, rx) = watch::channel(false);
        tokio::spawn(crate::health::run(service.clone(), rx));
        match &listener {
            Some(l) => {
                tracing::info!(service = %service.name, listen = %l.addr, "service listening")
            }
            None => {
                tracing::info!(service = %service.name, "service started (reached through routes)")
            }
        }
        self.services.lock().expect("lock").insert(
            service.name.clone(),
            Running {
                service,
                listener,
                health_stop,
            },
        );
    }

    /// Rebuilds every listener's route table from the running services' configs.
    fn rebuild_routes(&self) {
        let services = self.services.lock().expect("lock");
        let jobs = self.jobs.lock().expect("lock").clone();
        for r in services.values() {
            let cfg = r.service.config.load();
            r.service.cache.store(self.cache_for(
                r.service.name.clone(),
                &r.service.name,
                &cfg.cache,
            ));
            if cfg.routes.is_empty() {
                r.service.routes.store(None);
                continue;
            }
            let routes: Vec<_> = cfg
                .routes
                .iter()
                .enumerate()
                .filter_map(|(i, rc)| {
                    let target = services.get(&rc.service)?.service.clone();
                    let owner = format!("{}\0{}#{i}", rc.service, r.service.name);
                    // The route's identity, not its position: inserting a route on reload
                    // never hands one route's objects to another.
                    let namespace = format!(
                        "{}/{}{}{}{}>{}",
                        r.service.name,
                        rc.host.as_deref().unwrap_or("*"),
                        rc.prefix,
                        rc.methods
                            .iter()
                            .map(|m| format!(" {m}"))
                            .collect::<String>(),
                        rc.replace
                            .as_deref()
                            .map(|r| format!(" ={r}"))
                            .unwrap_or_default(),
                        rc.service
                    );
                    let async_phase = match (rc.extra.contains_key("async"), &jobs) {
                        (false, _) => crate::route::AsyncPhase::Off,
                        (true, Some(j)) => j
                            .sink(rc, &cfg.jobs_path)
                            .map_or(crate::route::AsyncPhase::Unavailable, |s| {
                                crate::route::AsyncPhase::Sink(s)
                            }),
                        (true, None) => crate::route::AsyncPhase::Unavailable,
                    };
                    Some(crate::route::Route {
                        config: rc.clone(),
                        target,
                        cache: self.cache_for(owner, &namespace, &rc.cache),
                        jobs: async_phase,
                    })
                })
                .collect();
            let mut table = crate::route::RouteTable::new(routes);
            // A listener with an async route answers its job URLs, for its own queues only.
            if table
                .routes()
                .iter()
                .any(|r| !matches!(r.jobs, crate::route::AsyncPhase::Off))
            {
                let sinks = table
                    .routes()
                    .iter()
                    .filter_map(|r| match &r.jobs {
                        crate::route::AsyncPhase::Sink(s) => Some(s.clone()),
                        _ => None,
                    })
                    .collect();
                table.jobs = Some(crate::jobs::JobUrls {
                    path: cfg.jobs_path.clone(),
                    sinks,
                });
            }
            r.service.routes.store(Some(Arc::new(table)));
        }
    }

    pub fn service(&self, name: &str) -> Option<Arc<Service>> {
        self.services
            .lock()
            .expect("lock")
            .get(name)
            .map(|r| r.service.clone())
    }

    pub fn services(&self) -> Vec<Arc<Service>> {
        self.services
            .lock()
            .expect("lock")
            .values()
            .map(|r| r.service.clone())
            .collect()
    }

    /// The bound address of a service's listener (useful when configured with port 0).
    pub fn listen_addr(&self, name: &str) -> Option<SocketAddr> {
        self.services
            .lock()
            .expect("lock")
            .get(name)
            .and_then(|r| r.listener.as_ref().map(|l| l.addr))
    }

    /// Starts every service of `config`; if any listener cannot bind, none is left running.
    pub async fn start(&self, config: &Config) -> Result<(), StartError> {
        self.apply(config).await.map_err(|e| match e {
            ApplyError::Bind(b) => b,
        })
    }

    /// Re-reads the config file and applies it; an invalid file is refused and the running
    /// config keeps serving. With a reload gate (replicas sharing one config), a file that
    /// did not change since it was last read is not applied over the shared config.
    pub async fn reload(&self) -> Result<(), String> {
        let Some(path) = &self.config_path else {
            return Err("no config file to reload (quick mode)".into());
        };
        let _one = self.reload_lock.lock().await;
        let text = match std::fs::read_to_string(path) {
            Ok(t) => t,
            Err(e) => {
                self.reload_failures.inc();
                let e = format!("{}: cannot read: {e}", path.display());
                tracing::error!(error = %e, "reload refused; keeping the running config");
                return Err(e);
            }
        };
        if let Some(gate) = self.reload_gate.lock().expect("lock").as_ref() {
            if !gate(&text) {
                tracing::info!(path = %path.display(), "config file unchanged; the shared config stays in force");
                return Ok(());
            }
        }
        let parsed = Config::parse(path, &text).map_err(|e| e.to_string());
        self.reload_locked(parsed, &path.display().to_string())
            .await
    }

    /// Applies `config` (validated first) like a reload of the file, if `still_wanted`
    /// says so once no other reload runs: replicas sharing one config apply the shared
    /// version through this. Ok(false): not wanted any more, nothing changed.
    pub async fn reload_with(
        &self,
        config: Config,
        origin: &str,
        still_wanted: impl Fn() -> bool,
    ) -> Result<bool, String> {
        let _one = self.reload_lock.lock().await;
        if !still_wanted() {
            return Ok(false);
        }
        self.reload_locked(Ok(config), origin).await.map(|()| true)
    }

    async fn reload_locked(
        &self,
        parsed: Result<Config, String>,
        origin: &str,
    ) -> Result<(), String> {
        let checked = parsed.and_then(|c| match self.validator.lock().expect("lock").as_ref() {
            Some(v) => v(&c).map(|()| c),
            None => Ok(c),
        });
        let config = match checked {
            Ok(c) => c,
            Err(e) => {
                self.reload_failures.inc();
                tracing::error!(error = %e, origin, "reload refused: invalid config; keeping the running one");
                return Err(e);
            }
        };
        if let Err(e) = self.apply_locked(&config).await {
            self.reload_failures.inc();
            tracing::error!(error = %e, origin, "reload refused; keeping the running config");
            return Err(e.to_string());
        }
        self.reloads.inc();
        if let Some(f) = self.on_reload.lock().expect("lock").as_ref() {
            f(&config);
        }
        tracing::info!(origin, "config reloaded");
        Ok(())
    }

    /// Applies a validated config as one transaction: every listener the new config needs
    /// is bound first; if one cannot be, nothing changes. Then changed services are
    /// reconfigured in place, new ones started, removed ones stopped gracefully, and the
    /// route tables rebuilt.
    pub async fn apply(&self, config: &Config) -> Result<(), ApplyError> {
        let _one = self.reload_lock.lock().await;
        self.apply_locked(config).await
    }

    async fn apply_locked(&self, config: &Config) -> Result<(), ApplyError> {
        crate::proxy::set_buffer_memory(config.buffer_memory);
        if let Some(c) = &config.cache {
            let mut store = self.cache_store.lock().expect("lock");
            if let Some(s) = store.as_ref() {
                s.set_fill_limit(c.fill_memory);
            }
            if store.is_none() {
                let redis = c.redis.clone().map(shoal_cache::RedisConfig::new);
                match shoal_cache::CacheStore::new(c.memory, redis, &Default::default()) {
                    Ok(s) => {
                        s.set_fill_limit(c.fill_memory);
                        *store = Some(s)
                    }
                    Err(e) => tracing::error!(error = %e, "cache: store not created"),
                }
            }
        }
        // Phase 1: bind (nothing running is touched yet).
        let mut fresh: Vec<(ServiceConfig, Arc<Service>, bool, TlsChange)> = Vec::new();
        let mut bound: Vec<(String, Listener)> = Vec::new();
        let mut fail = None;
        for s in &config.services {
            let existing = self
                .services
                .lock()
                .expect("lock")
                .get(&s.name)
                .map(|r| (r.service.clone(), r.listener.as_ref().map(|l| l.addr)));
            let (svc, is_new) = match existing {
                Some((svc, _)) => (svc, false),
                None => (Service::new(s.clone()), true),
            };
            // A changed `tls` table gets a new terminator; an unchanged one keeps its own.
            let tls = if is_new || svc.config.load().tls != s.tls {
                match terminator(s) {
                    Ok(t) => Some(t),
                    Err(e) => {
                        fail = Some(e);
                        break;
                    }
                }
            } else {
                None
            };
            let current_addr = existing_addr(&self.services, &s.name);
            let old_listen = if is_new {
                None
            } else {
                svc.config.load().listen
            };
            let needs_bind = match (s.listen, current_addr) {
                (None, _) => false,
                (Some(_), None) => true,
                // Same configured address (port 0 included): the bound listener stays.
                (Some(a), Some(cur)) => Some(a) != old_listen && a != cur,
            };
            if needs_bind {
                let addr = s.listen.expect("checked above");
                match bind(&s.name, addr, &svc).await {
                    Ok(l) => bound.push((s.name.clone(), l)),
                    Err(e) => {
                        fail = Some(e);
                        break;
                    }
                }
            }
            fresh.push((s.clone(), svc, is_new, tls));
        }
        if let Some(e) = fail {
            for (_, l) in bound {
                let _ = l.stop.send(true);
            }
            return Err(ApplyError::Bind(e));
        }
        // Phase 2: commit.
        for (cfg, svc, is_new, tls) in fresh {
            if let Some(t) = tls {
                svc.tls.store(t);
            }
            let listener = bound
                .iter()
                .position(|(n, _)| *n == cfg.name)
                .map(|i| bound.swap_remove(i).1);
            if is_new {
                self.register(svc, listener);
                continue;
            }
            let unlisten = cfg.listen.is_none();
            svc.reconfigure(cfg);
            let mut services = self.services.lock().expect("lock");
            if let Some(r) = services.get_mut(&svc.name) {
                if listener.is_some() || unlisten {
                    if let Some(old) = std::mem::replace(&mut r.listener, listener) {
                        let _ = old.stop.send(true);
                    }
                }
            }
        }
        let removed: Vec<Running> = {
            let mut services = self.services.lock().expect("lock");
            let gone: Vec<String> = services
                .keys()
                .filter(|n| !config.services.iter().any(|s| &s.name == *n))
                .cloned()
                .collect();
            gone.iter().filter_map(|n| services.remove(n)).collect()
        };
        self.rebuild_routes();
        for r in removed {
            if let Some(l) = &r.listener {
                let _ = l.stop.send(true);
            }
            let _ = r.health_stop.send(true);
            tracing::info!(service = %r.service.name, "service removed");
        }
        Ok(())
    }

    /// Whether this app was started from a config file (not quick mode).
    pub fn has_config_file(&self) -> bool {
        self.config_path.is_some()
    }

    /// Re-reads every TLS listener's certificate files (SIGHUP, `POST /api/tls/reload`). A
    /// listener whose files do not load keeps its last good set; the errors are returned.
    pub fn reload_tls(&self) -> Result<usize, String> {
        let mut n = 0;
        let mut errors = Vec::new();
        for svc in self.services() {
            if let Some(t) = svc.tls.load_full() {
                match t.reload() {
                    Ok(()) => n += 1,
                    Err(e) => errors.push(format!("{}: {e}", svc.name)),
                }
            }
        }
        if errors.is_empty() {
            Ok(n)
        } else {
            Err(errors.join("; "))
        }
    }

    /// Graceful stop: stop accepting everywhere, then wait for in-flight requests up to
    /// `deadline`. Returns the number of connections still open at the deadline.
    pub async fn shutdown(&self, deadline: Duration) -> usize {
        let running: Vec<(Arc<crate::server::Connections>, String)> = {
            let s = self.services.lock().expect("lock");
            for r in s.values() {
                if let Some(l) = &r.listener {
                    let _ = l.stop.send(true);
                }
                let _ = r.health_stop.send(true);
            }
            s.values()
                .filter_map(|r| {
                    r.listener
                        .as_ref()
                        .map(|l| (l.conns.clone(), r.service.name.clone()))
                })
                .collect()
        };
        let mut left = 0;
        let until = tokio::time::Instant::now() + deadline;
        for (c, name) in running {
            let n = c
                .wait_idle(until.saturating_duration_since(tokio::time::Instant::now()))
                .await;
            if n > 0 {
                tracing::warn!(service = %name, connections = n, "shutdown deadline reached with connections open");
            }
            left += n;
        }
        left
    }

    /// `/metrics` in the Prometheus text format (0.0.4).
    pub fn render_metrics(&self) -> String {
        self.collect_metrics().render()
    }

    /// `/metrics` in `format`.
    pub fn render_metrics_as(&self, format: Format) -> String {
        self.collect_metrics().render_as(format)
    }

    /// Every component's current figures: the services' atomics, then each collector's.
    pub fn collect_metrics(&self) -> Exposition {
        let mut e = Exposition::default();
        let now = now_nanos();
        e.declare(
            "shoal_requests_total",
            "Requests answered, by instance and status code.",
            Kind::Counter,
        );
        for svc in self.services() {
            let s = svc.name.as_str();
            for (code, n) in svc.metrics.local.iter() {
                e.counter(
                    "shoal_requests_total",
                    "Requests answered, by instance and status code.",
                    &[
                        ("service", s),
                        ("instance", ""),
                        ("code", &code.to_string()),
                    ],
                    n,
                );
            }
            e.histogram(
                "shoal_request_duration_seconds",
                "Time from request start to response headers.",
                &[("service", s)],
                &svc.metrics.duration,
            );
            for (code, n) in svc.metrics.grpc.iter().enumerate() {
                let n = n.get();
                if n > 0 {
                    e.counter(
                        "shoal_grpc_responses_total",
                        "gRPC calls by grpc-status (from the instance's trailers, or shoal's own trailers-only answers).",
                        &[
                            ("service", s),
                            ("code", crate::grpc::NAMES.get(code).copied().unwrap_or("OTHER")),
                        ],
                        n,
                    );
                }
            }
            e.counter(
                "shoal_client_errors_total",
                "Requests the client broke (malformed or cut-short body, too slow); never counted against an instance.",
                &[("service", s)],
                svc.metrics.client_errors.get(),
            );
            e.counter(
                "shoal_retries_total",
                "Upstream retries.",
                &[("service", s)],
                svc.metrics.retries.get(),
            );
            e.counter(
                "shoal_retry_budget_exhausted_total",
                "Retries refused by the retry budget.",
                &[("service", s)],
                svc.metrics.retry_budget_exhausted.get(),
            );
            for (state, n) in svc.pool.counts() {
                e.gauge(
                    "shoal_instances",
                    "Instances by lifecycle state.",
                    &[("service", s), ("state", state.as_str())],
                    n as f64,
                );
            }
            if let Some(t) = svc.tls.load_full() {
                for (result, n) in t.handshakes() {
                    e.counter(
                        "shoal_tls_handshakes_total",
                        "TLS handshakes on a listener: full, resumed, or the reason one failed.",
                        &[("service", s), ("result", result)],
                        n,
                    );
                }
                for (cert, not_after) in t.expiry() {
                    e.gauge(
                        "shoal_tls_certificate_expiry_seconds",
                        "When a serving certificate expires (notAfter, Unix seconds).",
                        &[("service", s), ("cert", &cert)],
                        not_after as f64,
                    );
                }
                e.counter(
                    "shoal_tls_reload_failures_total",
                    "TLS certificate reloads refused (the last good set kept serving).",
                    &[("service", s)],
                    t.reload_failures.load(std::sync::atomic::Ordering::Relaxed),
                );
            }
            let cs = &svc.pool.cold_start_metrics;
            e.counter(
                "shoal_cold_start_waits_total",
                "Requests that waited for a first instance (scale from zero).",
                &[("service", s)],
                cs.waits.load(std::sync::atomic::Ordering::Relaxed),
            );
            for (reason, c) in [("timeout", &cs.timeouts), ("queue_full", &cs.rejected)] {
                e.counter(
                    "shoal_cold_start_failures_total",
                    "Requests answered 503 while scaling from zero.",
                    &[("service", s), ("reason", reason)],
                    c.load(std::sync::atomic::Ordering::Relaxed),
                );
            }
            e.gauge(
                "shoal_pool_panic",
                "1 when no instance is healthy and all are routed to.",
                &[("service", s)],
                svc.pool.snapshot().panic as u8 as f64,
            );
            for inst in svc.pool.members() {
                let i = inst.id.as_str();
                for (code, n) in inst.metrics.codes.iter() {
                    e.counter(
                        "shoal_requests_total",
                        "Requests answered, by instance and status code.",
                        &[("service", s), ("instance", i), ("code", &code.to_string())],
                        n,
                    );
                }
                e.gauge(
                    "shoal_in_flight_requests",
                    "Requests in flight to an instance.",
                    &[("service", s), ("instance", i)],
                    inst.in_flight() as f64,
                );
                e.gauge(
                    "shoal_instance_healthy",
                    "1 when the instance passes health checks.",
                    &[("service", s), ("instance", i)],
                    inst.is_healthy() as u8 as f64,
                );
                e.gauge(
                    "shoal_instance_ejected",
                    "1 while the instance is ejected as an outlier.",
                    &[("service", s), ("instance", i)],
                    inst.is_ejected(now) as u8 as f64,
                );
                e.counter(
                    "shoal_ejections_total",
                    "Outlier ejections.",
                    &[("service", s), ("instance", i)],
                    inst.metrics.ejections.get(),
                );
                e.counter(
                    "shoal_health_check_failures_total",
                    "Failed active health probes.",
                    &[("service", s), ("instance", i)],
                    inst.metrics.health_failures.get(),
                );
                for k in ErrorKind::ALL {
                    e.counter(
                        "shoal_upstream_errors_total",
                        "Failed upstream tries by kind.",
                        &[("service", s), ("instance", i), ("kind", k.as_str())],
                        inst.metrics.errors[k as usize].get(),
                    );
                }
            }
        }
        e.gauge(
            "shoal_buffered_request_bytes",
            "Request bodies held in memory for retries, across services.",
            &[],
            crate::proxy::buffered_bytes() as f64,
        );
        e.counter(
            "shoal_config_reloads_total",
            "Successful config reloads.",
            &[],
            self.reloads.get(),
        );
        e.counter(
            "shoal_config_reload_failures_total",
            "Refused config reloads.",
            &[],
            self.reload_failures.get(),
        );
        if let Some(store) = self.cache_store() {
            e.declare(
                "shoal_cache_requests_total",
                "Requests that passed a cache, by result.",
                Kind::Counter,
            );
            let mut by = BTreeMap::<(String, &str), u64>::new();
            for (owner, c) in self.caches.lock().expect("lock").iter() {
                let svc = owner.split('\0').next().unwrap_or(owner).to_string();
                for r in shoal_cache::CacheResult::ALL {
                    *by.entry((svc.clone(), r.as_str())).or_default() += c.counters().get(r);
                }
            }
            for ((svc, result), n) in by {
                e.counter(
                    "shoal_cache_requests_total",
                    "Requests that passed a cache, by result.",
                    &[("service", &svc), ("result", result)],
                    n,
                );
            }
            let stats = store.stats();
            if stats.redis_configured {
                e.dependency_up("redis", stats.redis_connected);
            }
            for s in stats.samples() {
                if s.counter {
                    e.counter(s.name, s.help, &[], s.value as u64);
                } else {
                    e.gauge(s.name, s.help, &[], s.value);
                }
            }
        }
        for c in self.collectors.lock().expect("lock").iter() {
            c.collect(&mut e);
        }
        e
    }

    /// JSON view of one service, for `/api/services`.
    pub fn service_json(&self, svc: &Service) -> Value {
        let now = now_nanos();
        let cfg = svc.config.load();
        let instances: Vec<Value> = svc
            .pool
            .members()
            .iter()
            .map(|i| {
                json!({
                    "id": i.id,
                    "addr": i.addr.to_string(),
                    "state": i.state(),
                    "weight": i.weight,
                    "healthy": i.is_healthy(),
                    "ejected": i.is_ejected(now),
                    "in_flight": i.in_flight(),
                    "requests": i.metrics.codes.total(),
                })
            })
            .collect();
        json!({
            "name": svc.name,
            "listen": self.listen_addr(&svc.name).map(|a| a.to_string()),
            "balance": cfg.balance.name(),
            "requests": svc.metrics.requests.get(),
            "instances": instances,
        })
    }

    /// Whether an extension (a fleet) manages this instance.
    pub fn instance_owned(&self, service: &str, id: &str) -> bool {
        self.extensions
            .lock()
            .expect("lock")
            .iter()
            .any(|x| x.owns_instance(service, id))
    }

    /// Mutating routes owned by extensions.
    pub fn extension_post(&self, path: &str, body: &Value) -> Option<Result<Value, String>> {
        self.extensions
            .lock()
            .expect("lock")
            .iter()
            .find_map(|x| x.post(path, body))
    }

    /// Routes owned by extensions (fleet, autoscaler).
    pub fn extension_get(&self, path: &str) -> Option<Value> {
        self.extensions
            .lock()
            .expect("lock")
            .iter()
            .find_map(|x| x.get(path))
    }
}

impl std::fmt::Debug for App {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("App")
            .field("config_path", &self.config_path)
            .finish()
    }
}
