//! Scaling policies and the fleet simulator for shoal.
//!
//! Everything here is plain Rust with no I/O: time arrives in each [`Observation`]
//! (`now_secs` for intervals, `wall_epoch_secs` for time of day), so the same policy
//! code runs in the live autoscaler (real clock, evaluated every second) and in
//! [`sim::simulate`] (synthetic clock, evaluated every 15 s by default).
//!
//! * [`reactive::ReactivePolicy`]: HPA-style target tracking with tolerance, rate
//!   policies, scale-down stabilization, Knative-style burst ("panic") mode and
//!   scheduled minimums ([`schedule`]).
//! * [`predictive::PredictivePolicy`]: learns total demand, forecasts it with an
//!   MSTL seasonal decomposition plus a level ([`forecast`]), and launches capacity
//!   one startup time ahead, sized from the quantiles of its own forecast errors; the
//!   reactive policy runs underneath and the larger answer wins.
//! * [`saturation::SaturationEstimator`]: the step response's saturation signal from
//!   cumulative probe readings, fed by the live autoscaler and the simulator alike.
//! * [`trace`]: demand traces (`t,rps` CSV, synthetic generator), [`windows`]: the
//!   1 s bucket rings that feed the metric averages.
//!
//! **Invariant**: a missing metric never causes a scale-down.
#![forbid(unsafe_code)]

use serde::{Deserialize, Serialize};

pub mod backlog;
pub mod forecast;
pub mod predictive;
pub mod reactive;
pub mod saturation;
pub mod schedule;
pub mod sim;
pub mod trace;
pub mod tune;
pub mod windows;

pub use predictive::{DemandRecorder, History, PredictiveConfig, PredictiveMode, PredictivePolicy};
pub use reactive::{ReactiveConfig, ReactivePolicy};

/// The errors of this crate (configuration only: evaluating a policy cannot fail).
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A policy name that [`policy_by_name`] does not know.
    #[error("unknown policy `{0}` (known: {known})", known = POLICY_NAMES.join(", "))]
    UnknownPolicy(String),
    /// A parameter out of range; names the field.
    #[error("invalid `{field}`: {message}")]
    Invalid {
        /// The configuration field at fault.
        field: &'static str,
        /// What is wrong with it.
        message: String,
    },
    /// A scheduled-capacity rule that does not parse.
    #[error("schedule: {0}")]
    Schedule(String),
}

/// What a metric target measures. All values are per ready instance.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum MetricKind {
    /// CPU utilization as a fraction of the instance's allotment (0.7 = 70%).
    Cpu,
    /// Requests per second.
    Rps,
    /// Requests in flight.
    InFlight,
    /// 95th percentile latency in seconds.
    LatencyP95,
    /// An external Prometheus query's value (the fleet's total) divided among ready instances.
    Prometheus,
}

impl MetricKind {
    /// The stable snake_case name.
    pub fn as_str(self) -> &'static str {
        match self {
            MetricKind::Cpu => "cpu",
            MetricKind::Rps => "rps",
            MetricKind::InFlight => "in_flight",
            MetricKind::LatencyP95 => "latency_p95",
            MetricKind::Prometheus => "prometheus",
        }
    }
}

/// A per-instance target for one metric (CPU as a utilization fraction).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct MetricTarget {
    /// The metric.
    pub kind: MetricKind,
    /// The value per ready instance the autoscaler steers to.
    pub target: f64,
}

/// One metric as observed, averaged per ready instance.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct MetricSample {
    /// The metric.
    pub kind: MetricKind,
    /// Average over the stable window (HPA's view); `None` when unavailable.
    pub stable: Option<f64>,
    /// Average over the 6 s panic window (burst detection); `None` when unavailable.
    pub panic: Option<f64>,
}

/// What a policy sees at one evaluation. Time is injected: policies never read a clock.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Observation {
    /// Monotonic seconds (any origin): windows and rate policies use this.
    pub now_secs: f64,
    /// Wall-clock seconds since the Unix epoch (UTC): schedules and seasonality use this.
    pub wall_epoch_secs: f64,
    /// Instances ready and serving.
    pub ready: u32,
    /// Instances launched but not ready yet (warming: excluded from averages).
    pub starting: u32,
    /// The desired count currently in force (normally `ready + starting`).
    pub current_desired: u32,
    /// The metrics, per ready instance.
    pub metrics: Vec<MetricSample>,
    /// Total demand in requests/s averaged since the previous evaluation (live: over
    /// the evaluation interval, e.g. the last second), for the predictive history:
    /// consecutive observations should tile time without overlap.
    pub demand_rps: Option<f64>,
    /// The short-window (about 1 s) saturation signal, where the source can measure it.
    #[serde(default)]
    pub saturation: Option<Saturation>,
}

/// Whether the ready instances are saturated right now, and what the work arriving needs
/// (computed by [`saturation::SaturationEstimator`], live and in the simulator).
///
/// A saturated instance's CPU is capped at its quota and its request rate at what it can
/// serve, so neither says how far demand is over; the work arriving does: requests served
/// plus the queue's growth, times the cost of a request (CPU per served request).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Saturation {
    /// CPU at quota (or the work arriving beyond it) with requests in flight growing, or
    /// latency over its target with a queue.
    pub saturated: bool,
    /// The work arriving in instance allotments (1.0 = one instance's whole allotment):
    /// (served + queue growth) requests/s × CPU per served request ÷ allotment.
    pub demand_instances: f64,
    /// Requests/s arriving (served + queue growth), the whole fleet.
    pub arrival_rps: f64,
}

impl Observation {
    /// The sample for `kind`, if the observation carries it.
    pub fn metric(&self, kind: MetricKind) -> Option<&MetricSample> {
        self.metrics.iter().find(|m| m.kind == kind)
    }
}

/// Which way a decision moves the desired count.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Direction {
    /// More instances.
    Up,
    /// Fewer instances.
    Down,
    /// No change.
    None,
}

impl Direction {
    /// The stable snake_case name (the `direction` label).
    pub fn as_str(self) -> &'static str {
        match self {
            Direction::Up => "up",
            Direction::Down => "down",
            Direction::None => "none",
        }
    }
}

/// Why a decision came out the way it did: short stable codes for the
/// `reason` label of `shoal_scaling_decisions_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Reason {
    /// Target tracking moved the count.
    TargetTracking,
    /// Burst (panic) mode scaled up at once, or held a scale-down while bursting.
    Burst,
    /// A scale-down was held by the stabilization window.
    Stabilized,
    /// The scale-up was limited by the rate policy.
    RateLimited,
    /// The count wanted is above `max`.
    AtMax,
    /// The count wanted is below `min`.
    AtMin,
    /// Metrics were missing: the count is held (never scaled down).
    MissingMetrics,
    /// A scheduled minimum raised the count.
    Scheduled,
    /// The demand forecast moved (or held) the count.
    Predictive,
    /// Every metric within tolerance of its target, or nothing to change.
    Steady,
}

impl Reason {
    /// The stable snake_case code.
    pub fn as_str(self) -> &'static str {
        match self {
            Reason::TargetTracking => "target_tracking",
            Reason::Burst => "burst",
            Reason::Stabilized => "stabilized",
            Reason::RateLimited => "rate_limited",
            Reason::AtMax => "at_max",
            Reason::AtMin => "at_min",
            Reason::MissingMetrics => "missing_metrics",
            Reason::Scheduled => "scheduled",
            Reason::Predictive => "predictive",
            Reason::Steady => "steady",
        }
    }
}

/// The outcome of one evaluation, with its inputs and reason.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Decision {
    /// The policy that decided.
    pub policy: String,
    /// The desired instance count (starting + ready).
    pub desired: u32,
    /// `desired` against `inputs.current_desired`.
    pub direction: Direction,
    /// Why.
    pub reason: Reason,
    /// A human-readable account of the computation.
    pub detail: String,
    /// What the policy saw.
    pub inputs: Observation,
    /// The latest demand forecast (requests/s) for one startup time ahead, if a
    /// forecasting policy has one (also in forecast-only mode).
    pub forecast_rps: Option<f64>,
}

impl Decision {
    /// True when the decision changes the count or reports a refusal worth
    /// logging (stabilization hold, bound reached, missing metrics, rate limit).
    /// Steady no-ops are not notable.
    pub fn is_notable(&self) -> bool {
        self.direction != Direction::None || self.reason != Reason::Steady
    }
}

/// A scaling policy. One implementation serves both the live autoscaler and the
/// simulator: it sees only [`Observation`]s and keeps its own state between them.
pub trait Policy: Send {
    /// The policy's name (as given to [`policy_by_name`]).
    fn name(&self) -> &str;
    /// Decide the desired count for this observation.
    fn evaluate(&mut self, obs: &Observation) -> Decision;
    /// Whether a saturation signal should be evaluated at once rather than at the next
    /// interval (the live autoscaler and the simulator both ask).
    fn reacts_to_saturation(&self) -> bool {
        false
    }
}

/// Parameters shared by the named policies.
#[derive(Debug, Clone, PartialEq)]
pub struct PolicyParams {
    /// What one instance can serve, requests/s.
    pub capacity_rps: f64,
    /// Seconds from launch to ready.
    pub startup_secs: f64,
    /// Seconds between evaluations.
    pub interval_secs: f64,
    /// Target utilization for reactive target tracking (rps target = capacity × this).
    pub target_utilization: f64,
    /// Lower bound on the instance count.
    pub min: u32,
    /// Upper bound on the instance count.
    pub max: u32,
    /// Scheduled minimum overrides (UTC).
    pub schedule: Vec<schedule::ScheduleRule>,
}

impl Default for PolicyParams {
    fn default() -> Self {
        Self {
            capacity_rps: 1.0,
            startup_secs: 60.0,
            interval_secs: 15.0,
            target_utilization: 0.7,
            min: 1,
            max: 10_000,
            schedule: Vec::new(),
        }
    }
}

/// The names [`policy_by_name`] accepts.
pub const POLICY_NAMES: &[&str] = &["reactive", "hpa", "predictive", "forecast-only"];

/// Build a named policy.
///
/// * `reactive`: HPA defaults on requests/s per instance (target = capacity ×
///   target utilization, 10% tolerance, +max(4, 100%) per 15 s, 300 s scale-down
///   stabilization) plus Knative-style burst mode.
/// * `hpa`: the same without burst mode (plain HPA).
/// * `predictive`: forecast-and-scale predictive policy over `reactive`.
/// * `forecast-only`: forecasts and reports, but `reactive` decides.
pub fn policy_by_name(name: &str, params: &PolicyParams) -> Result<Box<dyn Policy>, Error> {
    validate_params(params)?;
    let reactive = ReactiveConfig::for_rps(params);
    match name {
        "reactive" => Ok(Box::new(ReactivePolicy::new("reactive", reactive)?)),
        "hpa" => {
            let mut config = reactive;
            config.burst = None;
            Ok(Box::new(ReactivePolicy::new("hpa", config)?))
        }
        "predictive" | "forecast-only" => {
            let mode = if name == "predictive" {
                PredictiveMode::ForecastAndScale
            } else {
                PredictiveMode::ForecastOnly
            };
            let config = PredictiveConfig::for_params(params, mode);
            Ok(Box::new(PredictivePolicy::new(name, config)?))
        }
        other => Err(Error::UnknownPolicy(other.to_string())),
    }
}

fn validate_params(p: &PolicyParams) -> Result<(), Error> {
    let positive = |field: &'static str, v: f64| {
        if v.is_finite() && v > 0.0 {
            Ok(())
        } else {
            Err(Error::Invalid {
                field,
                message: format!("must be a positive number, got {v}"),
            })
        }
    };
    positive("capacity_rps", p.capacity_rps)?;
    positive("interval_secs", p.interval_secs)?;
    if !(p.startup_secs.is_finite() && p.startup_secs >= 0.0) {
        return Err(Error::Invalid {
            field: "startup_secs",
            message: format!("must be ≥ 0, got {}", p.startup_secs),
        });
    }
    if !(p.target_utilization > 0.0 && p.target_utilization <= 1.0) {
        return Err(Error::Invalid {
            field: "target_utilization",
            message: format!("must be in (0, 1], got {}", p.target_utilization),
        });
    }
    if p.min > p.max {
        return Err(Error::Invalid {
            field: "min",
            message: format!("min {} exceeds max {}", p.min, p.max),
        });
    }
    Ok(())
}
