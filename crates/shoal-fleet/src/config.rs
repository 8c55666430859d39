//! The `fleet`, `resources` and `autoscale` tables of a service, parsed from the service's
//! extra TOML tables and validated with file:line:field errors.

use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;
use shoal_proxy::config::{parse_size, Dur, Locator};
use shoal_proxy::{Config, ConfigError, ServiceConfig};
use shoal_scale::schedule::ScheduleRule;
use shoal_scale::{MetricKind, MetricTarget};

/// `[services.NAME.fleet]`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FleetConfig {
    /// `process` (default) or `static`.
    #[serde(default = "default_provider")]
    pub provider: String,
    /// The instance command (process provider); `PORT` and `SHOAL_INSTANCE` are set for it.
    /// A first word of `shoal` means this shoal binary.
    #[serde(default)]
    pub command: Command,
    /// Extra environment for instances.
    #[serde(default)]
    pub env: std::collections::BTreeMap<String, String>,
    /// Fewest instances.
    #[serde(default = "one")]
    pub min: u32,
    /// Most instances.
    #[serde(default = "one")]
    pub max: u32,
    /// Path probed to decide a new instance is ready.
    #[serde(default = "default_health")]
    pub health_path: String,
    /// A new instance that is not healthy by then is killed and counted as a failed start.
    #[serde(default = "default_startup_timeout")]
    pub startup_timeout: Dur,
    /// Time between SIGTERM and SIGKILL when an instance is stopped.
    #[serde(default = "default_grace")]
    pub stop_grace: Dur,
    /// Kubernetes: the Deployment's namespace.
    #[serde(default = "default_namespace")]
    pub namespace: String,
    /// Kubernetes: the Deployment shoal sizes (through its `scale` subresource).
    #[serde(default)]
    pub deployment: String,
    /// Kubernetes: the EndpointSlices' `kubernetes.io/service-name` (default: the
    /// Deployment's name).
    #[serde(default)]
    pub service: Option<String>,
    /// Kubernetes: a label selector for the EndpointSlices instead of the service name.
    #[serde(default)]
    pub selector: Option<String>,
    /// Kubernetes: the EndpointSlice port to route to, by name or number (default: the first).
    #[serde(default)]
    pub port: Option<PortRef>,
    /// Kubernetes: what a replica count changed outside shoal (`kubectl scale`) does:
    /// `respect` adopts it as the desired count, `reconcile` writes shoal's back.
    #[serde(default = "default_external_scale")]
    pub external_scale: String,
    /// Kubernetes: the container whose CPU/memory requests are the per-pod size that vertical
    /// scaling resizes in place (default: the pod template's first container).
    #[serde(default)]
    pub container: Option<String>,
    /// Kubernetes with `min = 0`: how long a request waits for the first pod, then 503.
    #[serde(default = "default_cold_start_timeout")]
    pub cold_start_timeout: Dur,
    /// Kubernetes with `min = 0`: most requests waiting at once; more get 503 at once.
    #[serde(default = "default_cold_start_queue")]
    pub cold_start_queue: u64,
}

fn default_cold_start_timeout() -> Dur {
    Dur(Duration::from_secs(30))
}
fn default_cold_start_queue() -> u64 {
    1000
}

/// A port by name or number.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(untagged)]
pub enum PortRef {
    Number(u16),
    Name(String),
}

fn default_namespace() -> String {
    "default".into()
}
fn default_external_scale() -> String {
    "respect".into()
}

/// A command as a string (split on whitespace) or an array of words.
#[derive(Debug, Clone, PartialEq, Default, Deserialize)]
#[serde(untagged)]
pub enum Command {
    #[default]
    None,
    Line(String),
    Words(Vec<String>),
}

impl Command {
    pub fn words(&self) -> Vec<String> {
        match self {
            Command::None => Vec::new(),
            Command::Line(s) => s.split_whitespace().map(String::from).collect(),
            Command::Words(w) => w.clone(),
        }
    }
}

fn default_provider() -> String {
    "process".into()
}
fn one() -> u32 {
    1
}
fn default_health() -> String {
    "/healthz".into()
}
fn default_startup_timeout() -> Dur {
    Dur(Duration::from_secs(30))
}
fn default_grace() -> Dur {
    Dur(Duration::from_secs(10))
}

/// `[services.NAME.resources]`: per-instance limits (cgroup v2 or v1 where writable) and
/// vertical scaling.
#[derive(Debug, Clone, PartialEq, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ResourcesRaw {
    /// CPU cores, e.g. 0.5.
    pub cpu: Option<f64>,
    /// Memory, e.g. "256MiB".
    pub memory: Option<String>,
    /// `off`, `recommend` (default) or `auto`.
    pub mode: Option<String>,
    pub min_cpu: Option<f64>,
    pub max_cpu: Option<f64>,
    pub min_memory: Option<String>,
    pub max_memory: Option<String>,
    /// Least time between two in-place resizes (an OOM kill does not wait for it).
    pub cooldown: Option<Dur>,
}

/// What vertical scaling does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum VerticalMode {
    /// No recommendation, no change.
    Off,
    /// Recommend a size (API, `shoal status`); limits stay as configured.
    #[default]
    Recommend,
    /// Apply the recommendation in place, within the bounds, after the cool-down.
    Auto,
}

/// Validated resources.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct Resources {
    pub cpu: Option<f64>,
    pub memory_bytes: Option<u64>,
    pub mode: VerticalMode,
    /// Bounds of automatic sizing: CPU cores and memory bytes.
    pub cpu_bounds: (f64, f64),
    pub memory_bounds: (u64, u64),
    pub cooldown: Duration,
}

/// One metric target as written: `{ metric = "cpu", target = 0.7 }`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTarget {
    metric: String,
    target: f64,
    /// `metric = "prometheus"`: the PromQL query (one value: the fleet's total).
    #[serde(default)]
    query: Option<String>,
    /// `metric = "prometheus"`: `http://HOST:PORT[/PATH]` of the server.
    #[serde(default)]
    server: Option<String>,
    /// `metric = "prometheus"`: a query unanswered by then counts as failed (default 2 s).
    #[serde(default)]
    timeout: Option<Dur>,
}

/// `[services.NAME.autoscale]`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawAutoscale {
    #[serde(default = "default_policy")]
    policy: String,
    #[serde(default = "default_interval")]
    interval: Dur,
    #[serde(default)]
    targets: Vec<RawTarget>,
    #[serde(default = "default_tolerance")]
    tolerance: f64,
    #[serde(default = "default_stabilization")]
    scale_down_stabilization: Dur,
    #[serde(default = "default_up_pods")]
    scale_up_instances: u32,
    #[serde(default = "default_up_percent")]
    scale_up_percent: f64,
    #[serde(default = "default_up_period")]
    scale_up_period: Dur,
    #[serde(default = "default_true")]
    burst: bool,
    /// How long burst mode holds scale-downs after the last burst reading (Knative: 60 s).
    #[serde(default = "default_burst_hold")]
    burst_hold: Dur,
    #[serde(default = "default_stable_window")]
    stable_window: Dur,
    #[serde(default = "default_panic_window")]
    panic_window: Dur,
    #[serde(default)]
    schedule: Vec<ScheduleRule>,
    /// Requests/s one instance serves at full utilization (predictive sizing).
    #[serde(default)]
    capacity_rps: Option<f64>,
    /// Startup time the predictive policy plans ahead by.
    #[serde(default = "default_startup")]
    startup: Dur,
    /// History needed before the forecast acts.
    #[serde(default)]
    min_history: Option<Dur>,
    /// History bucket (the season is detected in buckets).
    #[serde(default)]
    history_bucket: Option<Dur>,
    /// Length of the seasonal "day" (default 24 h); a compressed one, e.g. "10m",
    /// for demos and tests. A whole number of at least 4 history buckets.
    #[serde(default)]
    season: Option<Dur>,
    /// `policy = "backlog"`: the fleet is active above this backlog (KEDA activation).
    #[serde(default)]
    activation: Option<f64>,
    /// `policy = "backlog"`: idle this long before scaling to zero (KEDA `cooldownPeriod`).
    #[serde(default)]
    cooldown: Option<Dur>,
}

fn default_policy() -> String {
    "reactive".into()
}
fn default_interval() -> Dur {
    Dur(Duration::from_secs(1))
}
fn default_tolerance() -> f64 {
    0.1
}
fn default_stabilization() -> Dur {
    Dur(Duration::from_secs(300))
}
fn default_up_pods() -> u32 {
    4
}
fn default_up_percent() -> f64 {
    100.0
}
fn default_up_period() -> Dur {
    Dur(Duration::from_secs(15))
}
fn default_true() -> bool {
    true
}
fn default_burst_hold() -> Dur {
    Dur(Duration::from_secs(60))
}
fn default_stable_window() -> Dur {
    Dur(Duration::from_secs(30))
}
fn default_panic_window() -> Dur {
    Dur(Duration::from_secs(6))
}
fn default_startup() -> Dur {
    Dur(Duration::from_secs(5))
}

/// Validated autoscaler settings.
#[derive(Debug, Clone, PartialEq)]
pub struct Autoscale {
    pub policy: String,
    pub interval: Duration,
    pub targets: Vec<MetricTarget>,
    pub tolerance: f64,
    pub scale_down_stabilization: Duration,
    pub scale_up_instances: u32,
    pub scale_up_percent: f64,
    pub scale_up_period: Duration,
    pub burst: bool,
    pub burst_hold: Duration,
    pub stable_window: Duration,
    pub panic_window: Duration,
    pub schedule: Vec<ScheduleRule>,
    pub capacity_rps: Option<f64>,
    pub startup: Duration,
    pub min_history: Option<Duration>,
    pub history_bucket: Option<Duration>,
    /// The predictive policy's seasonal "day"; `None`: 24 h.
    pub season: Option<Duration>,
    /// The `prometheus` target's query, if there is one.
    pub prometheus: Option<crate::promsource::PromSpec>,
    /// `policy = "backlog"`: the queue-backlog policy's parameters (bounds from the fleet).
    pub backlog: Option<shoal_scale::backlog::BacklogParams>,
}

/// The worker-fleet policy: scales on the backlog of the queues routed to the service.
pub const BACKLOG_POLICY: &str = shoal_scale::backlog::POLICY_NAME;

/// Everything the fleet needs for one service.
#[derive(Debug, Clone)]
pub struct FleetSpec {
    pub service: String,
    pub fleet: FleetConfig,
    pub resources: Resources,
    pub autoscale: Option<Autoscale>,
    /// Instance logs and history live here.
    pub data_dir: PathBuf,
    /// Drain timeout from the service's timeouts.
    pub drain_timeout: Duration,
    /// How a new instance's readiness is probed: the service's health kind (gRPC health
    /// for gRPC services) in its cluster's protocol, at `fleet.health_path` for HTTP.
    pub probe: shoal_proxy::health::ProbeSpec,
}

impl FleetSpec {
    /// A horizontal CPU target: then in-place CPU resizing would fight it over one signal
    /// (the VPA-with-HPA problem), so only memory is resized.
    pub fn cpu_scaled_horizontally(&self) -> bool {
        self.autoscale.as_ref().is_some_and(|a| {
            a.targets
                .iter()
                .any(|t| t.kind == shoal_scale::MetricKind::Cpu)
        })
    }
}

fn table_error(
    loc: &Locator<'_>,
    text: &str,
    service: &str,
    table: &str,
    e: toml::de::Error,
) -> ConfigError {
    // The extra table was re-deserialized from a Value, so spans are gone: point at the
    // table header and name the offending key from the message.
    let header = format!("[services.{service}.{table}]");
    let off = text
        .find(&header)
        .or_else(|| text.find(&format!("{table} =")))
        .unwrap_or(0);
    loc.error(
        off..off,
        &format!("services.{service}.{table}"),
        e.message().trim(),
    )
}

fn field_error(
    loc: &Locator<'_>,
    text: &str,
    service: &str,
    table: &str,
    key: &str,
    msg: String,
) -> ConfigError {
    let header = format!("[services.{service}.{table}]");
    let start = text.find(&header).unwrap_or(0);
    let off = text[start..]
        .lines()
        .scan(start, |pos, l| {
            let here = *pos;
            *pos += l.len() + 1;
            Some((here, l))
        })
        .find(|(_, l)| l.trim_start().starts_with(key))
        .map_or(start, |(p, _)| p);
    loc.error(off..off, &format!("services.{service}.{table}.{key}"), msg)
}

/// Bounds default to a quarter and four times the configured size (VPA has none; unbounded
/// in-place growth on a shared host is a foot-gun), the cool-down to 5 minutes.
fn resources_defaults(
    cpu: Option<f64>,
    memory_bytes: Option<u64>,
    mode: VerticalMode,
    cooldown: Option<Duration>,
) -> Resources {
    let c = cpu.unwrap_or(1.0);
    let m = memory_bytes.unwrap_or(256 << 20);
    Resources {
        cpu,
        memory_bytes,
        mode,
        cpu_bounds: ((c / 4.0).max(0.01), c * 4.0),
        memory_bounds: ((m / 4).max(4 << 20), m.saturating_mul(4)),
        cooldown: cooldown.unwrap_or(Duration::from_secs(300)),
    }
}

/// Extracts and validates the fleet of `svc`, if it has one.
pub fn fleet_spec(config: &Config, svc: &ServiceConfig) -> Result<Option<FleetSpec>, ConfigError> {
    let loc = config.locator();
    let text = config.text.as_str();
    let name = svc.name.as_str();
    let Some(raw) = svc.extra.get("fleet") else {
        if svc.extra.contains_key("autoscale") {
            let off = text
                .find(&format!("[services.{name}.autoscale]"))
                .unwrap_or(0);
            return Err(loc.error(
                off..off,
                &format!("services.{name}.autoscale"),
                "autoscale needs a [fleet] table",
            ));
        }
        return Ok(None);
    };
    let fleet: FleetConfig = raw
        .clone()
        .try_into()
        .map_err(|e| table_error(&loc, text, name, "fleet", e))?;
    if fleet.min > fleet.max {
        return Err(field_error(
            &loc,
            text,
            name,
            "fleet",
            "min",
            format!("min ({}) is greater than max ({})", fleet.min, fleet.max),
        ));
    }
    if fleet.max > 1000 {
        return Err(field_error(
            &loc,
            text,
            name,
            "fleet",
            "max",
            "at most 1000 instances per service".into(),
        ));
    }
    let Some(kind) = crate::registry::find(&fleet.provider) else {
        return Err(field_error(
            &loc,
            text,
            name,
            "fleet",
            "provider",
            format!(
                "unknown provider {:?} (use {})",
                fleet.provider,
                crate::registry::names()
            ),
        ));
    };
    if let Err((field, msg)) = (kind.check)(&fleet, svc.extra.contains_key("autoscale")) {
        return Err(field_error(&loc, text, name, "fleet", field, msg));
    }
    let resources = match svc.extra.get("resources") {
        None => resources_defaults(None, None, VerticalMode::Recommend, None),
        Some(v) => {
            let r: ResourcesRaw = v
                .clone()
                .try_into()
                .map_err(|e| table_error(&loc, text, name, "resources", e))?;
            let ferr =
                |key: &str, msg: String| field_error(&loc, text, name, "resources", key, msg);
            let cores = |key: &str, v: Option<f64>| -> Result<Option<f64>, ConfigError> {
                match v {
                    Some(c) if !(c > 0.0 && c <= 1024.0) => {
                        Err(ferr(key, "must be a positive number of cores".into()))
                    }
                    v => Ok(v),
                }
            };
            let bytes = |key: &str, v: &Option<String>| -> Result<Option<u64>, ConfigError> {
                match v {
                    Some(m) => match parse_size(m) {
                        Ok(b) if b < 4 << 20 => Err(ferr(key, "must be at least 4MiB".into())),
                        Ok(b) => Ok(Some(b)),
                        Err(e) => Err(ferr(key, e)),
                    },
                    None => Ok(None),
                }
            };
            let cpu = cores("cpu", r.cpu)?;
            let memory_bytes = bytes("memory", &r.memory)?;
            let mode = match r.mode.as_deref() {
                None | Some("recommend") => VerticalMode::Recommend,
                Some("off") => VerticalMode::Off,
                Some("auto") => VerticalMode::Auto,
                Some(other) => {
                    return Err(ferr(
                        "mode",
                        format!("unknown mode {other:?} (use \"off\", \"recommend\" or \"auto\")"),
                    ))
                }
            };
            let mut res = resources_defaults(cpu, memory_bytes, mode, r.cooldown.map(|d| d.0));
            if let Some(c) = cores("min_cpu", r.min_cpu)? {
                res.cpu_bounds.0 = c;
            }
            if let Some(c) = cores("max_cpu", r.max_cpu)? {
                res.cpu_bounds.1 = c;
            }
            if let Some(m) = bytes("min_memory", &r.min_memory)? {
                res.memory_bounds.0 = m;
            }
            if let Some(m) = bytes("max_memory", &r.max_memory)? {
                res.memory_bounds.1 = m;
            }
            if res.cpu_bounds.0 > res.cpu_bounds.1 {
                return Err(ferr("min_cpu", "min_cpu is greater than max_cpu".into()));
            }
            if res.memory_bounds.0 > res.memory_bounds.1 {
                return Err(ferr(
                    "min_memory",
                    "min_memory is greater than max_memory".into(),
                ));
            }
            // On Kubernetes the starting size is the pod template's requests.
            if mode == VerticalMode::Auto
                && cpu.is_none()
                && memory_bytes.is_none()
                && !crate::registry::find(&fleet.provider).is_some_and(|k| k.sized_by_platform)
            {
                return Err(ferr(
                    "mode",
                    "auto needs a starting size: set cpu and/or memory".into(),
                ));
            }
            res
        }
    };
    let autoscale = match svc.extra.get("autoscale") {
        None => None,
        Some(v) => {
            let a: RawAutoscale = v
                .clone()
                .try_into()
                .map_err(|e| table_error(&loc, text, name, "autoscale", e))?;
            let backlog_policy = a.policy == BACKLOG_POLICY;
            if !backlog_policy && !shoal_scale::POLICY_NAMES.contains(&a.policy.as_str()) {
                return Err(field_error(
                    &loc,
                    text,
                    name,
                    "autoscale",
                    "policy",
                    format!(
                        "unknown policy {:?} (valid: {}, {BACKLOG_POLICY})",
                        a.policy,
                        shoal_scale::POLICY_NAMES.join(", ")
                    ),
                ));
            }
            let mut targets = Vec::new();
            let mut prometheus = None;
            for t in &a.targets {
                let kind = match t.metric.as_str() {
                    "cpu" => MetricKind::Cpu,
                    "rps" => MetricKind::Rps,
                    "in_flight" | "in-flight" => MetricKind::InFlight,
                    "latency_p95" | "latency-p95" => MetricKind::LatencyP95,
                    "prometheus" => MetricKind::Prometheus,
                    // The backlog policy's one metric: jobs per instance.
                    "backlog" => MetricKind::InFlight,
                    other => {
                        return Err(field_error(&loc, text, name, "autoscale", "targets", format!("unknown metric {other:?} (valid: cpu, rps, in_flight, latency_p95, prometheus, backlog)")));
                    }
                };
                let bad = |msg: String| field_error(&loc, text, name, "autoscale", "targets", msg);
                if (t.metric == "backlog") != backlog_policy {
                    return Err(bad(
                        "metric \"backlog\" goes with policy = \"backlog\", and only it".into(),
                    ));
                }
                if kind == MetricKind::Prometheus {
                    prometheus = Some(prom_spec(t).map_err(bad)?);
                } else if t.query.is_some() || t.server.is_some() || t.timeout.is_some() {
                    return Err(bad(format!(
                        "query, server and timeout belong to metric = \"prometheus\", not {:?}",
                        t.metric
                    )));
                }
                if targets.iter().any(|x: &MetricTarget| x.kind == kind) {
                    return Err(bad(format!("metric {:?} is listed twice", t.metric)));
                }
                if !(t.target > 0.0 && t.target.is_finite()) {
                    return Err(field_error(
                        &loc,
                        text,
                        name,
                        "autoscale",
                        "targets",
                        format!("target of {} must be positive", t.metric),
                    ));
                }
                targets.push(MetricTarget {
                    kind,
                    target: t.target,
                });
            }
            let backlog = if backlog_policy {
                let target = targets.first().map_or(5.0, |t| t.target);
                let activation = a.activation.unwrap_or(0.0);
                if !(activation >= 0.0 && activation.is_finite()) {
                    return Err(field_error(
                        &loc,
                        text,
                        name,
                        "autoscale",
                        "activation",
                        "must be a number >= 0".into(),
                    ));
                }
                Some(shoal_scale::backlog::BacklogParams {
                    target_per_instance: target,
                    activation,
                    min: fleet.min,
                    max: fleet.max,
                    cooldown_secs: a.cooldown.map_or(300.0, |d| d.0.as_secs_f64()),
                    scale_down_window_secs: a.scale_down_stabilization.0.as_secs_f64(),
                    tolerance: a.tolerance,
                })
            } else {
                for (key, set) in [
                    ("activation", a.activation.is_some()),
                    ("cooldown", a.cooldown.is_some()),
                ] {
                    if set {
                        return Err(field_error(
                            &loc,
                            text,
                            name,
                            "autoscale",
                            key,
                            format!("{key} belongs to policy = \"{BACKLOG_POLICY}\""),
                        ));
                    }
                }
                None
            };
            if targets.is_empty() {
                targets.push(MetricTarget {
                    kind: MetricKind::Cpu,
                    target: 0.7,
                });
            }
            if !backlog_policy
                && a.policy != "reactive"
                && a.policy != "hpa"
                && a.capacity_rps.is_none()
            {
                return Err(field_error(
                    &loc,
                    text,
                    name,
                    "autoscale",
                    "policy",
                    "predictive policies need capacity_rps".into(),
                ));
            }
            if !(0.0..1.0).contains(&a.tolerance) {
                return Err(field_error(
                    &loc,
                    text,
                    name,
                    "autoscale",
                    "tolerance",
                    "must be in [0, 1)".into(),
                ));
            }
            if a.interval.0 < Duration::from_millis(100) {
                return Err(field_error(
                    &loc,
                    text,
                    name,
                    "autoscale",
                    "interval",
                    "must be at least 100ms".into(),
                ));
            }
            if let Some(season) = a.season {
                // The predictive policy's default bucket is a minute.
                let bucket = a.history_bucket.map_or(60.0, |b| b.0.as_secs_f64());
                let buckets = season.0.as_secs_f64() / bucket.max(1e-3);
                let problem = if buckets < 4.0 - 1e-9 {
                    Some("must span at least 4 history buckets")
                } else if (buckets - buckets.round()).abs() > 1e-6 {
                    Some("must be a whole number of history buckets")
                } else {
                    None
                };
                if let Some(p) = problem {
                    return Err(field_error(
                        &loc,
                        text,
                        name,
                        "autoscale",
                        "season",
                        format!("{p} (history_bucket = {bucket}s)"),
                    ));
                }
            }
            Some(Autoscale {
                policy: a.policy,
                interval: a.interval.0,
                targets,
                tolerance: a.tolerance,
                scale_down_stabilization: a.scale_down_stabilization.0,
                scale_up_instances: a.scale_up_instances,
                scale_up_percent: a.scale_up_percent,
                scale_up_period: a.scale_up_period.0,
                burst: a.burst,
                burst_hold: a.burst_hold.0,
                stable_window: a.stable_window.0,
                panic_window: a.panic_window.0,
                schedule: a.schedule,
                capacity_rps: a.capacity_rps,
                startup: a.startup.0,
                min_history: a.min_history.map(|d| d.0),
                history_bucket: a.history_bucket.map(|d| d.0),
                season: a.season.map(|d| d.0),
                prometheus,
                backlog,
            })
        }
    };
    Ok(Some(FleetSpec {
        service: name.to_string(),
        fleet,
        resources,
        autoscale,
        data_dir: config.data_dir.clone(),
        drain_timeout: svc.timeouts.drain.0,
        probe: shoal_proxy::health::ProbeSpec::of(svc),
    }))
}

/// The query of a `metric = "prometheus"` target.
fn prom_spec(t: &RawTarget) -> Result<crate::promsource::PromSpec, String> {
    let query = t
        .query
        .as_deref()
        .map(str::trim)
        .filter(|q| !q.is_empty())
        .ok_or("metric \"prometheus\" needs a query")?;
    let server = t
        .server
        .as_deref()
        .ok_or("metric \"prometheus\" needs a server (http://HOST:PORT)")?;
    let (authority, prefix) = crate::promsource::PromSpec::parse_server(server)?;
    let timeout = t.timeout.map_or(Duration::from_secs(2), |d| d.0);
    if timeout.is_zero() || timeout > Duration::from_secs(60) {
        return Err("timeout must be between 1ms and 60s".into());
    }
    Ok(crate::promsource::PromSpec {
        authority,
        prefix,
        query: query.to_string(),
        timeout,
    })
}

/// Validates every fleet of a config (used by `shoal check` and at start).
pub fn fleet_specs(config: &Config) -> Result<Vec<FleetSpec>, ConfigError> {
    let mut out = Vec::new();
    for s in &config.services {
        if let Some(f) = fleet_spec(config, s)? {
            out.push(f);
        }
    }
    Ok(out)
}

/// Resolves a program like a shell would: a path as is, else a search of `PATH`.
pub fn find_program(program: &str) -> Option<PathBuf> {
    use std::os::unix::fs::PermissionsExt;
    let executable = |p: &std::path::Path| {
        p.metadata()
            .is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
    };
    if program.contains('/') {
        let p = PathBuf::from(program);
        return executable(&p).then_some(p);
    }
    std::env::var_os("PATH")
        .into_iter()
        .flat_map(|paths| std::env::split_paths(&paths).collect::<Vec<_>>())
        .map(|d| d.join(program))
        .find(|p| executable(p))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    fn spec(text: &str) -> Result<Option<FleetSpec>, ConfigError> {
        let c = Config::parse(Path::new("f.toml"), text)?;
        fleet_spec(&c, &c.services[0])
    }

    const BASE: &str = "[services.web]\nlisten = \"127.0.0.1:8080\"\n";

    #[test]
    fn parses_a_full_fleet() {
        let s = spec(&format!(
            "{BASE}[services.web.fleet]\ncommand = \"shoal demo-service\"\nmin = 1\nmax = 8\n[services.web.resources]\ncpu = 0.5\nmemory = \"256MiB\"\n[services.web.autoscale]\ntargets = [{{ metric = \"cpu\", target = 0.6 }}, {{ metric = \"rps\", target = 50 }}]\nschedule = [{{ days = \"mon-fri\", from = \"08:00\", to = \"18:00\", min = 4 }}]\n"
        ))
        .unwrap()
        .unwrap();
        assert_eq!(s.fleet.max, 8);
        assert_eq!(s.resources.memory_bytes, Some(256 << 20));
        assert_eq!(s.resources.mode, VerticalMode::Recommend);
        assert_eq!(s.resources.memory_bounds, (64 << 20, 1 << 30));
        let a = s.autoscale.unwrap();
        assert_eq!(a.targets.len(), 2);
        assert_eq!(a.schedule.len(), 1);
    }

    #[test]
    fn vertical_settings_are_checked() {
        let fleet = "[services.web.fleet]\ncommand = \"shoal demo-service\"\n";
        let s = spec(&format!("{BASE}{fleet}[services.web.resources]\nmemory = \"64MiB\"\nmode = \"auto\"\nmax_memory = \"1GiB\"\ncooldown = \"10s\"\n"))
            .unwrap()
            .unwrap();
        assert_eq!(s.resources.mode, VerticalMode::Auto);
        assert_eq!(s.resources.memory_bounds, (16 << 20, 1 << 30));
        assert_eq!(s.resources.cooldown, Duration::from_secs(10));
        let e = spec(&format!(
            "{BASE}{fleet}[services.web.resources]\ncpu = 1\nmode = \"sometimes\"\n"
        ))
        .unwrap_err();
        assert_eq!(e.field, "services.web.resources.mode", "{e}");
        assert_eq!(e.line, 7, "{e}");
        let e = spec(&format!(
            "{BASE}{fleet}[services.web.resources]\nmode = \"auto\"\n"
        ))
        .unwrap_err();
        assert!(e.message.contains("starting size"), "{e}");
        let e = spec(&format!(
            "{BASE}{fleet}[services.web.resources]\ncpu = 1\nmin_cpu = 2\nmax_cpu = 1.5\n"
        ))
        .unwrap_err();
        assert_eq!(e.field, "services.web.resources.min_cpu", "{e}");
    }

    #[test]
    fn static_fleets_are_not_autoscaled() {
        let e = spec(&format!(
            "{BASE}[services.web.fleet]\nprovider = \"static\"\n[services.web.autoscale]\n"
        ))
        .unwrap_err();
        assert_eq!(e.field, "services.web.fleet.provider", "{e}");
        assert_eq!(e.line, 4, "{e}");
    }

    #[test]
    fn backlog_policy_parses_and_stays_apart() {
        let fleet = "[services.w]\n[services.w.fleet]\ncommand = \"shoal demo-service\"\nmin = 0\nmax = 4\n[services.w.autoscale]\n";
        let c = Config::parse(Path::new("f.toml"), &format!("{fleet}policy = \"backlog\"\ntargets = [{{ metric = \"backlog\", target = 10 }}]\nactivation = 2\ncooldown = \"30s\"\n")).unwrap();
        let a = fleet_spec(&c, &c.services[0])
            .unwrap()
            .unwrap()
            .autoscale
            .unwrap();
        let b = a.backlog.unwrap();
        assert_eq!(
            (b.target_per_instance, b.activation, b.min, b.max),
            (10.0, 2.0, 0, 4)
        );
        assert_eq!(b.cooldown_secs, 30.0);
        for (extra, field, line) in [
            (
                "policy = \"reactive\"\ntargets = [{ metric = \"backlog\", target = 1 }]\n",
                "targets",
                8,
            ),
            (
                "policy = \"backlog\"\ntargets = [{ metric = \"cpu\", target = 1 }]\n",
                "targets",
                8,
            ),
            ("cooldown = \"10s\"\n", "cooldown", 7),
        ] {
            let c = Config::parse(Path::new("f.toml"), &format!("{fleet}{extra}")).unwrap();
            let e = fleet_spec(&c, &c.services[0]).unwrap_err();
            assert_eq!(e.field, format!("services.w.autoscale.{field}"), "{e}");
            assert_eq!(e.line, line, "{e}");
        }
    }

    #[test]
    fn kubernetes_fleet_fields() {
        let s = spec(&format!(
            "{BASE}[services.web.fleet]\nprovider = \"kubernetes\"\nnamespace = \"shop\"\ndeployment = \"web\"\nport = \"http\"\nmin = 0\nmax = 4\nexternal_scale = \"reconcile\"\ncold_start_timeout = \"5s\"\n"
        ))
        .unwrap()
        .unwrap();
        let f = &s.fleet;
        assert_eq!(
            (f.namespace.as_str(), f.deployment.as_str()),
            ("shop", "web")
        );
        assert_eq!(f.port, Some(PortRef::Name("http".into())));
        assert_eq!(f.external_scale, "reconcile");
        assert_eq!(f.cold_start_timeout.0, Duration::from_secs(5));
        assert_eq!(f.cold_start_queue, 1000);
        let e = spec(&format!(
            "{BASE}[services.web.fleet]\nprovider = \"kubernetes\"\nmax = 4\n"
        ))
        .unwrap_err();
        assert_eq!(e.field, "services.web.fleet.deployment", "{e}");
        let e = spec(&format!(
            "{BASE}[services.web.fleet]\nprovider = \"kubernetes\"\ndeployment = \"web\"\nexternal_scale = \"ignore\"\n"
        ))
        .unwrap_err();
        assert_eq!(e.field, "services.web.fleet.external_scale", "{e}");
        assert_eq!(e.line, 6, "{e}");
    }

    #[test]
    fn min_over_max_names_the_line() {
        let e = spec(&format!(
            "{BASE}[services.web.fleet]\ncommand = \"shoal demo-service\"\nmin = 5\nmax = 2\n"
        ))
        .unwrap_err();
        assert_eq!(e.line, 5, "{e}");
        assert_eq!(e.field, "services.web.fleet.min");
    }

    #[test]
    fn season_parses_and_is_checked_against_the_bucket() {
        let fleet = "[services.web.fleet]\ncommand = \"shoal demo-service\"\nmax = 4\n";
        let s = spec(&format!("{BASE}{fleet}[services.web.autoscale]\npolicy = \"predictive\"\ncapacity_rps = 10\nhistory_bucket = \"2s\"\nseason = \"40s\"\n"))
            .unwrap()
            .unwrap();
        let a = s.autoscale.unwrap();
        assert_eq!(a.season, Some(Duration::from_secs(40)));
        assert_eq!(a.history_bucket, Some(Duration::from_secs(2)));
        // Default bucket is a minute: a 2-minute season is only 2 of them.
        let e = spec(&format!("{BASE}{fleet}[services.web.autoscale]\npolicy = \"predictive\"\ncapacity_rps = 10\nseason = \"120s\"\n")).unwrap_err();
        assert_eq!(e.field, "services.web.autoscale.season", "{e}");
        assert_eq!(e.line, 9, "{e}");
        assert!(e.message.contains("at least 4 history buckets"), "{e}");
        let e = spec(&format!("{BASE}{fleet}[services.web.autoscale]\npolicy = \"predictive\"\ncapacity_rps = 10\nhistory_bucket = \"5s\"\nseason = \"42s\"\n")).unwrap_err();
        assert_eq!(e.field, "services.web.autoscale.season", "{e}");
        assert_eq!(e.line, 10, "{e}");
        assert!(e.message.contains("whole number"), "{e}");
        let e = spec(&format!(
            "{BASE}{fleet}[services.web.autoscale]\nseason = \"soon\"\n"
        ))
        .unwrap_err();
        assert!(e.field.starts_with("services.web.autoscale"), "{e}");
    }

    #[test]
    fn unknown_metric_and_missing_command() {
        let e = spec(&format!("{BASE}[services.web.fleet]\ncommand = \"shoal demo-service\"\nmax = 2\n[services.web.autoscale]\ntargets = [{{ metric = \"vibes\", target = 1 }}]\n")).unwrap_err();
        assert!(e.message.contains("vibes"), "{e}");
        assert_eq!(e.line, 7, "{e}");
        let e = spec(&format!(
            "{BASE}[services.web.fleet]\ncommand = \"/no/such/binary --flag\"\n"
        ))
        .unwrap_err();
        assert!(e.message.contains("cannot start"), "{e}");
        assert_eq!(e.line, 4, "{e}");
    }

    #[test]
    fn prometheus_targets_need_a_query_and_an_http_server() {
        let fleet = "[services.web.fleet]\ncommand = \"shoal demo-service\"\nmax = 4\n[services.web.autoscale]\n";
        let s = spec(&format!("{BASE}{fleet}targets = [{{ metric = \"prometheus\", server = \"http://127.0.0.1:9090/prom\", query = \"sum(queue_length)\", target = 20, timeout = \"500ms\" }}]\n"))
            .unwrap()
            .unwrap();
        let a = s.autoscale.unwrap();
        assert_eq!(a.targets[0].kind, MetricKind::Prometheus);
        let p = a.prometheus.unwrap();
        assert_eq!(p.authority, "127.0.0.1:9090");
        assert_eq!(p.prefix, "/prom");
        assert_eq!(p.query, "sum(queue_length)");
        assert_eq!(p.timeout, Duration::from_millis(500));
        for (target, why) in [
            ("{ metric = \"prometheus\", server = \"http://p:9090\", target = 1 }", "needs a query"),
            ("{ metric = \"prometheus\", query = \"up\", target = 1 }", "needs a server"),
            ("{ metric = \"prometheus\", server = \"https://p:9090\", query = \"up\", target = 1 }", "https"),
            ("{ metric = \"cpu\", query = \"up\", target = 1 }", "belong to metric"),
            ("{ metric = \"rps\", target = 1 }, { metric = \"rps\", target = 2 }", "twice"),
        ] {
            let e = spec(&format!("{BASE}{fleet}targets = [{target}]\n")).unwrap_err();
            assert_eq!(e.field, "services.web.autoscale.targets", "{e}");
            assert_eq!(e.line, 7, "{e}");
            assert!(e.message.contains(why), "{why}: {e}");
        }
    }
}
