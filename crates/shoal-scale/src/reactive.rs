//! Reactive target tracking with HPA semantics and a Knative-style burst mode.
//!
//! Per metric: `desired = ceil(ready × current / target)` over ready instances only
//! (warming instances are excluded from the average and from the base count), no
//! change within the tolerance (10%), and the largest recommendation over the
//! metrics wins. Scale-up is rate limited (default: the larger of +4 instances or
//! +100% per 15 s); scale-down takes the highest recommendation of the
//! stabilization window (default 300 s). Missing metrics never cause a scale-down.
//!
//! Burst mode: when the panic-window (6 s) recommendation is at least `threshold`
//! (2×) the instances already launched (ready or starting), scale up at once to
//! that recommendation (no rate limit) and never scale down until `duration_secs`
//! (60 s) after the last such reading. A saturation signal (see [`crate::Saturation`])
//! also enters it, at once, sized from the work arriving at the target. Within burst
//! mode the stable window tracks as usual; only a fresh panic entry or a saturation
//! that outlasts the capacity already added ([`SATURATION_PERSIST_SECS`] with every
//! launched instance ready) adds more at once, so one transient reading (a queue
//! drained into a warming instance) never stacks a second burst on the first.
//!
//! **No overshoot**: the metrics must be window averages of the *total* over ready
//! instances divided by the ready count now (demand per instance), never averages
//! of per-instance values taken when fewer instances were ready; then
//! `ready × value / target` is demand over target, which does not grow with the
//! instances that an earlier decision added, and a step needing N settles at N.

use std::collections::VecDeque;

use serde::{Deserialize, Serialize};

use crate::schedule::{scheduled_min, ScheduleRule};
use crate::{
    Decision, Direction, Error, MetricKind, MetricTarget, Observation, Policy, PolicyParams, Reason,
};

/// Within burst mode, a saturation signal adds capacity at once again only after it has
/// lasted this long with every launched instance ready (a new instance warms up behind
/// slow start, and the queue built before it was ready takes a moment to drain).
pub const SATURATION_PERSIST_SECS: f64 = 3.0;

/// A scale-up rate policy: per period, the larger of `+pods` and `+percent`%.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct RatePolicy {
    /// Instances that may be added per period.
    pub pods: u32,
    /// Percent of the count at the start of the period that may be added.
    pub percent: f64,
    /// The period, seconds.
    pub period_secs: f64,
}

impl Default for RatePolicy {
    fn default() -> Self {
        Self {
            pods: 4,
            percent: 100.0,
            period_secs: 15.0,
        }
    }
}

/// Burst ("panic") mode settings.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct BurstConfig {
    /// Enter burst mode when the panic-window recommendation is at least this
    /// multiple of the ready count.
    pub threshold: f64,
    /// Stay in burst mode this long after the last reading over the threshold.
    pub duration_secs: f64,
}

impl Default for BurstConfig {
    fn default() -> Self {
        Self {
            threshold: 2.0,
            duration_secs: 60.0,
        }
    }
}

/// Configuration of the reactive autoscaler.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct ReactiveConfig {
    /// Per-instance targets; the largest recommendation wins.
    pub targets: Vec<MetricTarget>,
    /// No change while every current/target ratio is within 1 ± tolerance.
    pub tolerance: f64,
    /// Lower bound on the count.
    pub min: u32,
    /// Upper bound on the count.
    pub max: u32,
    /// Scale-up rate policy.
    pub scale_up: RatePolicy,
    /// Scale-down stabilization window, seconds: a scale-down goes only as low as
    /// the highest recommendation in the window.
    pub scale_down_stabilization_secs: f64,
    /// Burst mode; `None` disables it.
    pub burst: Option<BurstConfig>,
    /// Scheduled minimum overrides (UTC).
    pub schedule: Vec<ScheduleRule>,
}

impl Default for ReactiveConfig {
    fn default() -> Self {
        Self {
            targets: vec![MetricTarget {
                kind: MetricKind::Cpu,
                target: 0.7,
            }],
            tolerance: 0.1,
            min: 1,
            max: 10_000,
            scale_up: RatePolicy::default(),
            scale_down_stabilization_secs: 300.0,
            burst: Some(BurstConfig::default()),
            schedule: Vec::new(),
        }
    }
}

impl ReactiveConfig {
    /// HPA defaults tracking requests/s per instance at
    /// `capacity_rps × target_utilization`, with `min`/`max` from `params`.
    pub fn for_rps(params: &PolicyParams) -> Self {
        Self {
            targets: vec![MetricTarget {
                kind: MetricKind::Rps,
                target: params.capacity_rps * params.target_utilization,
            }],
            min: params.min,
            max: params.max,
            schedule: params.schedule.clone(),
            ..Self::default()
        }
    }

    /// Check ranges; errors name the field.
    pub fn validate(&self) -> Result<(), Error> {
        let invalid = |field, message: String| Err(Error::Invalid { field, message });
        if self.targets.is_empty() {
            return invalid("targets", "at least one metric target is needed".into());
        }
        for t in &self.targets {
            if !(t.target.is_finite() && t.target > 0.0) {
                return invalid(
                    "targets",
                    format!("target for {} must be > 0", t.kind.as_str()),
                );
            }
        }
        if !(0.0..1.0).contains(&self.tolerance) {
            return invalid(
                "tolerance",
                format!("must be in [0, 1), got {}", self.tolerance),
            );
        }
        if self.min > self.max {
            return invalid("min", format!("min {} exceeds max {}", self.min, self.max));
        }
        if !(self.scale_up.period_secs > 0.0 && self.scale_up.percent >= 0.0) {
            return invalid("scale_up", "period must be > 0 and percent ≥ 0".into());
        }
        if self.scale_down_stabilization_secs.is_nan() || self.scale_down_stabilization_secs < 0.0 {
            return invalid("scale_down_stabilization_secs", "must be ≥ 0".to_string());
        }
        if let Some(b) = self.burst {
            if !(b.threshold > 1.0 && b.duration_secs >= 0.0) {
                return invalid("burst", "threshold must be > 1, duration ≥ 0".into());
            }
        }
        Ok(())
    }
}

/// The reactive policy: see the module docs.
#[derive(Debug, Clone)]
pub struct ReactivePolicy {
    name: String,
    config: ReactiveConfig,
    /// (time, raw recommendation) within the stabilization window.
    recommendations: VecDeque<(f64, u32)>,
    /// (time, current_desired) within the rate-policy period.
    counts: VecDeque<(f64, u32)>,
    /// Burst mode lasts until this time.
    burst_until: f64,
    /// Start of the current run of saturated readings with every launched instance ready.
    saturated_since: Option<f64>,
}

/// A recommendation before bounds, with its reason.
struct Raw {
    desired: u32,
    reason: Reason,
    detail: String,
}

fn ceil_count(x: f64) -> u32 {
    if x.is_finite() && x > 0.0 {
        (x - 1e-9).ceil().min(u32::MAX as f64) as u32
    } else {
        0
    }
}

impl ReactivePolicy {
    /// A reactive policy named `name`.
    pub fn new(name: &str, config: ReactiveConfig) -> Result<Self, Error> {
        config.validate()?;
        Ok(Self {
            name: name.to_string(),
            config,
            recommendations: VecDeque::new(),
            counts: VecDeque::new(),
            burst_until: f64::NEG_INFINITY,
            saturated_since: None,
        })
    }

    /// The configuration in force.
    pub fn config(&self) -> &ReactiveConfig {
        &self.config
    }

    /// Whether burst mode is on at `now_secs`.
    pub fn bursting(&self, now_secs: f64) -> bool {
        now_secs < self.burst_until
    }

    /// The count the work arriving needs over the CPU and requests/s targets, on a
    /// saturated reading only (an unsaturated fleet's own metrics say what it needs):
    /// the smallest at which target tracking would be content (within tolerance above
    /// the target), so a burst lands where tracking settles. `None` otherwise.
    fn demand_count(&self, obs: &Observation) -> Option<u32> {
        let s = obs.saturation.filter(|s| s.saturated)?;
        let headroom = 1.0 + self.config.tolerance;
        self.config
            .targets
            .iter()
            .filter_map(|t| match t.kind {
                // Never fewer than the work fills at full quota: with a target near 1 the
                // tolerance alone would settle on a fleet that is still saturated.
                MetricKind::Cpu => Some(
                    ceil_count(s.demand_instances / t.target / headroom)
                        .max(ceil_count(s.demand_instances)),
                ),
                MetricKind::Rps => Some(ceil_count(s.arrival_rps / t.target / headroom)),
                _ => None,
            })
            .max()
    }

    fn raw(&mut self, obs: &Observation) -> Raw {
        let current = obs.current_desired;
        let now = obs.now_secs;
        let tol = self.config.tolerance;
        let ready = obs.ready;

        // Per-metric target tracking over ready instances.
        let mut missing = Vec::new();
        let mut best: Option<(u32, MetricKind, f64)> = None;
        let mut panic_best: u32 = 0;
        let demand = self.demand_count(obs);
        for t in &self.config.targets {
            let sample = obs.metric(t.kind);
            // On a saturated reading, CPU and requests/s burst on the work arriving: the
            // panic window of a saturated instance is capped, and afterwards, of one working
            // off its queue, inflated.
            let sized_by_demand =
                demand.is_some() && matches!(t.kind, MetricKind::Cpu | MetricKind::Rps);
            if let Some(p) = sample.and_then(|s| s.panic).filter(|_| !sized_by_demand) {
                panic_best = panic_best.max(ceil_count(f64::from(ready) * p / t.target));
            }
            let Some(value) = sample.and_then(|s| s.stable) else {
                missing.push(t.kind.as_str());
                continue;
            };
            let ratio = value / t.target;
            let rec = if (ratio - 1.0).abs() <= tol {
                current
            } else {
                ceil_count(f64::from(ready) * ratio)
            };
            if best.is_none_or(|(b, _, _)| rec > b) {
                best = Some((rec, t.kind, ratio));
            }
        }

        if ready == 0 {
            // No per-instance averages without ready instances: wait for the
            // starting ones, or wake a fleet scaled to zero when demand shows up.
            if current == 0 && obs.demand_rps.is_some_and(|d| d > 0.0) {
                return Raw {
                    desired: 1,
                    reason: Reason::TargetTracking,
                    detail: "demand with no instances: activating".into(),
                };
            }
            return Raw {
                desired: current,
                reason: Reason::Steady,
                detail: format!("no ready instances ({} starting): holding", obs.starting),
            };
        }

        // Burst mode. Instances already launched (starting, or ready since the
        // window filled) count as capacity: the panic recommendation is a total
        // (demand over target), so comparing it with `current` rather than `ready`
        // keeps successive evaluations from compounding on the same overload.
        if let Some(burst) = self.config.burst {
            let launched = current.max(ready);
            // Saturation persists only while everything launched is ready: until then the
            // queue is the wait for capacity already on its way.
            if demand.is_some() && obs.starting == 0 && ready >= current {
                self.saturated_since.get_or_insert(now);
            } else {
                self.saturated_since = None;
            }
            let panic_enter = f64::from(panic_best) >= burst.threshold * f64::from(launched);
            // Saturated and the work arriving needs more than is launched: burst at once to
            // what it needs; within burst mode only once the saturation has outlasted the
            // capacity the last burst added.
            let persisted = self
                .saturated_since
                .is_some_and(|t0| now - t0 >= SATURATION_PERSIST_SECS);
            let saturated_enter =
                demand.filter(|&d| d > launched && (!self.bursting(now) || persisted));
            if panic_enter || saturated_enter.is_some() {
                self.burst_until = now + burst.duration_secs;
            }
            if self.bursting(now) {
                let stable = best.map_or(0, |b| b.0);
                let jump =
                    saturated_enter
                        .unwrap_or(0)
                        .max(if panic_enter { panic_best } else { 0 });
                let desired = stable.max(jump).max(current);
                if desired > current {
                    self.saturated_since = None;
                }
                self.recommendations.push_back((now, desired));
                return Raw {
                    desired,
                    reason: Reason::Burst,
                    detail: format!(
                        "burst mode: {}, stable {stable}, {ready} ready; no scale-down \
                         until {:.0}s",
                        match (obs.saturation, demand) {
                            (Some(s), Some(d)) => format!(
                                "saturated, demand of {:.2} instances ({:.1} req/s) wants {d}{}",
                                s.demand_instances,
                                s.arrival_rps,
                                if saturated_enter.is_some() {
                                    ""
                                } else {
                                    " (waiting for the capacity added)"
                                }
                            ),
                            _ if panic_enter => format!("panic-window wants {panic_best}"),
                            _ => "holding".to_string(),
                        },
                        self.burst_until
                    ),
                };
            }
        }

        let Some((rec, kind, ratio)) = best else {
            return Raw {
                desired: current,
                reason: Reason::MissingMetrics,
                detail: format!("no metrics ({}): holding {current}", missing.join(", ")),
            };
        };
        if !missing.is_empty() && rec < current {
            return Raw {
                desired: current,
                reason: Reason::MissingMetrics,
                detail: format!(
                    "{} missing: holding {current} instead of scaling down to {rec}",
                    missing.join(", ")
                ),
            };
        }
        let why = format!(
            "{}: {:.3}× target over {ready} ready -> {rec}",
            kind.as_str(),
            ratio
        );
        self.recommendations.push_back((now, rec));
        let window = self.config.scale_down_stabilization_secs;
        while self
            .recommendations
            .front()
            .is_some_and(|&(t, _)| t <= now - window)
        {
            self.recommendations.pop_front();
        }

        if rec < current {
            let highest = self
                .recommendations
                .iter()
                .map(|&(_, r)| r)
                .max()
                .unwrap_or(rec)
                .min(current);
            if highest > rec {
                return Raw {
                    desired: highest,
                    reason: Reason::Stabilized,
                    detail: format!("{why}; stabilization ({window:.0}s) holds {highest}"),
                };
            }
            return Raw {
                desired: rec,
                reason: Reason::TargetTracking,
                detail: why,
            };
        }
        if rec > current {
            let start = self
                .counts
                .iter()
                .map(|&(_, c)| c)
                .min()
                .unwrap_or(current)
                .min(current);
            let up = self.config.scale_up;
            let by_pods = start.saturating_add(up.pods);
            let by_percent = ceil_count(f64::from(start) * (1.0 + up.percent / 100.0));
            let limit = by_pods.max(by_percent);
            if rec > limit {
                return Raw {
                    desired: limit.max(current),
                    reason: Reason::RateLimited,
                    detail: format!(
                        "{why}; rate policy allows {limit} ({start} at the start of the {:.0}s period)",
                        up.period_secs
                    ),
                };
            }
            return Raw {
                desired: rec,
                reason: Reason::TargetTracking,
                detail: why,
            };
        }
        Raw {
            desired: current,
            reason: Reason::Steady,
            detail: why,
        }
    }

    /// The configured bounds at `wall_epoch_secs`: (min incl. schedule, max, scheduled?).
    fn bounds(&self, wall: f64) -> (u32, u32, bool) {
        let sched = scheduled_min(&self.config.schedule, wall).unwrap_or(0);
        let max = self.config.max;
        if sched > self.config.min {
            (sched.min(max), max, true)
        } else {
            (self.config.min, max, false)
        }
    }
}

/// Clamp `desired` to `[min, max]` and set the reason when a bound bites.
pub(crate) fn apply_bounds(
    desired: u32,
    reason: Reason,
    detail: String,
    bounds: (u32, u32, bool),
) -> (u32, Reason, String) {
    let (min, max, scheduled) = bounds;
    if desired > max {
        (max, Reason::AtMax, format!("{detail}; capped at max {max}"))
    } else if desired < min {
        let reason = if scheduled {
            Reason::Scheduled
        } else {
            Reason::AtMin
        };
        let what = if scheduled { "scheduled min" } else { "min" };
        (min, reason, format!("{detail}; raised to {what} {min}"))
    } else {
        (desired, reason, detail)
    }
}

pub(crate) fn direction(desired: u32, current: u32) -> Direction {
    match desired.cmp(&current) {
        std::cmp::Ordering::Greater => Direction::Up,
        std::cmp::Ordering::Less => Direction::Down,
        std::cmp::Ordering::Equal => Direction::None,
    }
}

impl ReactivePolicy {
    /// The bounds in force at `wall_epoch_secs` (scheduled minimum included).
    pub(crate) fn bounds_at(&self, wall_epoch_secs: f64) -> (u32, u32, bool) {
        self.bounds(wall_epoch_secs)
    }
}

impl Policy for ReactivePolicy {
    fn name(&self) -> &str {
        &self.name
    }

    fn reacts_to_saturation(&self) -> bool {
        self.config.burst.is_some()
    }

    fn evaluate(&mut self, obs: &Observation) -> Decision {
        let now = obs.now_secs;
        let period = self.config.scale_up.period_secs;
        while self.counts.front().is_some_and(|&(t, _)| t <= now - period) {
            self.counts.pop_front();
        }
        self.counts.push_back((now, obs.current_desired));
        let raw = self.raw(obs);
        let (desired, reason, detail) = apply_bounds(
            raw.desired,
            raw.reason,
            raw.detail,
            self.bounds(obs.wall_epoch_secs),
        );
        Decision {
            policy: self.name.clone(),
            desired,
            direction: direction(desired, obs.current_desired),
            reason,
            detail,
            inputs: obs.clone(),
            forecast_rps: None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::MetricSample;

    fn cpu_policy() -> ReactivePolicy {
        let config = ReactiveConfig {
            burst: None,
            ..ReactiveConfig::default()
        };
        ReactivePolicy::new("reactive", config).unwrap()
    }

    fn obs(now: f64, ready: u32, starting: u32, cpu: Option<f64>) -> Observation {
        Observation {
            now_secs: now,
            wall_epoch_secs: now,
            ready,
            starting,
            current_desired: ready + starting,
            metrics: vec![MetricSample {
                kind: MetricKind::Cpu,
                stable: cpu,
                panic: cpu,
            }],
            demand_rps: None,
            saturation: None,
        }
    }

    #[test]
    fn tolerance_holds_within_ten_percent() {
        let mut p = cpu_policy();
        let d = p.evaluate(&obs(0.0, 10, 0, Some(0.76)));
        assert_eq!(
            (d.desired, d.direction, d.reason),
            (10, Direction::None, Reason::Steady)
        );
        assert!(!d.is_notable());
        let d = p.evaluate(&obs(1.0, 10, 0, Some(0.78)));
        assert_eq!((d.desired, d.reason), (12, Reason::TargetTracking));
        assert_eq!(d.direction, Direction::Up);
    }

    #[test]
    fn max_over_metrics() {
        let config = ReactiveConfig {
            targets: vec![
                MetricTarget {
                    kind: MetricKind::Cpu,
                    target: 0.5,
                },
                MetricTarget {
                    kind: MetricKind::InFlight,
                    target: 10.0,
                },
            ],
            burst: None,
            ..ReactiveConfig::default()
        };
        let mut p = ReactivePolicy::new("r", config).unwrap();
        let mut o = obs(0.0, 4, 0, Some(0.5));
        o.metrics.push(MetricSample {
            kind: MetricKind::InFlight,
            stable: Some(20.0),
            panic: None,
        });
        let d = p.evaluate(&o);
        assert_eq!(d.desired, 8, "{}", d.detail);
        assert!(d.detail.contains("in_flight"), "{}", d.detail);
    }

    #[test]
    fn scale_down_is_stabilized_for_300s() {
        let mut p = cpu_policy();
        assert_eq!(p.evaluate(&obs(0.0, 10, 0, Some(0.7))).desired, 10);
        let d = p.evaluate(&obs(15.0, 10, 0, Some(0.35)));
        assert_eq!((d.desired, d.reason), (10, Reason::Stabilized));
        assert!(d.is_notable());
        let d = p.evaluate(&obs(299.0, 10, 0, Some(0.35)));
        assert_eq!(d.desired, 10);
        // The t=0 recommendation (10) leaves the window after 300 s.
        let d = p.evaluate(&obs(300.0, 10, 0, Some(0.35)));
        assert_eq!((d.desired, d.reason), (5, Reason::TargetTracking));
        assert_eq!(d.direction, Direction::Down);
    }

    #[test]
    fn stabilization_uses_highest_recent_recommendation() {
        let mut p = cpu_policy();
        p.evaluate(&obs(0.0, 10, 0, Some(0.7)));
        p.evaluate(&obs(100.0, 10, 0, Some(0.56))); // recommends 8
        let d = p.evaluate(&obs(350.0, 10, 0, Some(0.14))); // wants 2
        assert_eq!(d.desired, 8, "{}", d.detail);
        let d = p.evaluate(&obs(401.0, 8, 0, Some(0.175)));
        assert_eq!(d.desired, 2, "{}", d.detail);
    }

    #[test]
    fn scale_up_rate_policy_max_of_4_and_100_percent() {
        let mut p = cpu_policy();
        // From 2: +4 beats +100%.
        let d = p.evaluate(&obs(0.0, 2, 0, Some(7.0)));
        assert_eq!((d.desired, d.reason), (6, Reason::RateLimited));
        // Within the same 15 s period the start count is still 2.
        let d = p.evaluate(&obs(5.0, 2, 4, Some(7.0)));
        assert_eq!(d.desired, 6);
        // Next period from 6: +100% = 12.
        let d = p.evaluate(&obs(15.0, 6, 0, Some(7.0)));
        assert_eq!((d.desired, d.reason), (12, Reason::RateLimited));
        let d = p.evaluate(&obs(30.0, 12, 0, Some(1.4)));
        assert_eq!((d.desired, d.reason), (24, Reason::TargetTracking));
    }

    #[test]
    fn warming_instances_are_excluded() {
        let mut p = cpu_policy();
        // 4 ready at 1.4 (2x target) with 4 starting: wants 8, already 8.
        let d = p.evaluate(&obs(0.0, 4, 4, Some(1.4)));
        assert_eq!((d.desired, d.direction), (8, Direction::None));
        // No ready instances at all: hold while they start.
        let d = p.evaluate(&obs(1.0, 0, 3, None));
        assert_eq!((d.desired, d.direction), (3, Direction::None));
    }

    #[test]
    fn missing_metrics_never_scale_down() {
        let mut p = cpu_policy();
        let d = p.evaluate(&obs(0.0, 10, 0, None));
        assert_eq!((d.desired, d.reason), (10, Reason::MissingMetrics));
        assert!(d.is_notable());
        // One of two metrics missing: scale-up still allowed, scale-down held.
        let config = ReactiveConfig {
            targets: vec![
                MetricTarget {
                    kind: MetricKind::Cpu,
                    target: 0.5,
                },
                MetricTarget {
                    kind: MetricKind::LatencyP95,
                    target: 0.2,
                },
            ],
            scale_down_stabilization_secs: 0.0,
            burst: None,
            ..ReactiveConfig::default()
        };
        let mut p = ReactivePolicy::new("r", config).unwrap();
        let d = p.evaluate(&obs(0.0, 10, 0, Some(0.1)));
        assert_eq!((d.desired, d.reason), (10, Reason::MissingMetrics));
        let d = p.evaluate(&obs(1.0, 10, 0, Some(0.6)));
        assert_eq!((d.desired, d.reason), (12, Reason::TargetTracking));
    }

    #[test]
    fn min_and_max_bounds() {
        let config = ReactiveConfig {
            min: 2,
            max: 5,
            burst: None,
            scale_down_stabilization_secs: 0.0,
            ..ReactiveConfig::default()
        };
        let mut p = ReactivePolicy::new("r", config).unwrap();
        let d = p.evaluate(&obs(0.0, 4, 0, Some(1.4)));
        assert_eq!((d.desired, d.reason), (5, Reason::AtMax));
        assert!(d.is_notable());
        let d = p.evaluate(&obs(1.0, 4, 0, Some(0.1)));
        assert_eq!(
            (d.desired, d.reason, d.direction),
            (2, Reason::AtMin, Direction::Down)
        );
    }

    #[test]
    fn scheduled_minimum_raises_the_floor() {
        let config = ReactiveConfig {
            schedule: vec!["* 08:00-18:00 min=6".parse().unwrap()],
            burst: None,
            scale_down_stabilization_secs: 0.0,
            ..ReactiveConfig::default()
        };
        let mut p = ReactivePolicy::new("r", config).unwrap();
        let nine_am = 9.0 * 3600.0;
        let d = p.evaluate(&obs(nine_am, 2, 0, Some(0.7)));
        assert_eq!(
            (d.desired, d.reason, d.direction),
            (6, Reason::Scheduled, Direction::Up)
        );
        let d = p.evaluate(&obs(nine_am + 9.0 * 3600.0, 6, 0, Some(0.1)));
        assert_eq!((d.desired, d.reason), (1, Reason::TargetTracking));
    }

    #[test]
    fn burst_mode_scales_at_once_and_holds() {
        let config = ReactiveConfig::default(); // burst on
        let mut p = ReactivePolicy::new("r", config).unwrap();
        p.evaluate(&obs(0.0, 4, 0, Some(0.7)));
        // Panic window shows 4x: 16 at once (the rate policy would allow 8).
        let mut o = obs(1.0, 4, 0, Some(0.9));
        o.metrics[0].panic = Some(2.8);
        let d = p.evaluate(&o);
        assert_eq!((d.desired, d.reason), (16, Reason::Burst), "{}", d.detail);
        // Load vanishes: no scale-down during the 60 s after the last panic reading.
        let d = p.evaluate(&obs(40.0, 16, 0, Some(0.1)));
        assert_eq!((d.desired, d.reason), (16, Reason::Burst));
        assert!(p.bursting(60.9));
        let d = p.evaluate(&obs(61.0, 16, 0, Some(0.1)));
        assert_eq!(d.reason, Reason::Stabilized, "{}", d.detail);
    }

    /// A fleet of one-core instances ready 50 ms after launch, evaluated every
    /// second on an injected clock; the observation is built as the live autoscaler
    /// builds it: the window mean of the total CPU of ready instances (each saturates
    /// at one core) over the ready count now. Returns every desired count.
    fn step_run(burst: bool, demand_cores: f64, secs: u32) -> Vec<u32> {
        let config = ReactiveConfig {
            targets: vec![MetricTarget {
                kind: MetricKind::Cpu,
                target: 0.6,
            }],
            max: 8,
            scale_down_stabilization_secs: 60.0,
            burst: burst.then(BurstConfig::default),
            ..ReactiveConfig::default()
        };
        let mut p = ReactivePolicy::new("r", config).unwrap();
        let mut cpu = crate::windows::SecondWindow::new(60);
        let (mut ready, mut desired) = (1u32, 1u32);
        let mut seen = Vec::new();
        for s in 0..secs {
            let t = f64::from(s);
            // Idle for 30 s, then the step.
            let demand = if s < 30 { 0.05 } else { demand_cores };
            cpu.add(t, demand.min(f64::from(ready)));
            let per = |v: Option<f64>| v.map(|x| x / f64::from(ready));
            let o = Observation {
                now_secs: t + 0.5,
                wall_epoch_secs: t + 0.5,
                ready,
                starting: desired - ready,
                current_desired: desired,
                metrics: vec![MetricSample {
                    kind: MetricKind::Cpu,
                    stable: per(cpu.mean(t, 20)),
                    panic: per(cpu.mean(t, 6)),
                }],
                demand_rps: None,
                saturation: None,
            };
            desired = p.evaluate(&o).desired;
            // Launched instances are ready before the next evaluation.
            ready = desired;
            seen.push(desired);
        }
        seen
    }

    #[test]
    fn a_step_settles_at_what_it_needs_in_stable_and_burst_mode() {
        // 1.2 cores at a 0.6 target need 2; 2.7 cores need 5.
        for (demand, need) in [(1.2, 2u32), (2.7, 5)] {
            for burst in [false, true] {
                let seen = step_run(burst, demand, 150);
                let peak = *seen.iter().max().unwrap();
                let settled = &seen[110..];
                assert!(
                    peak <= need + 1,
                    "burst {burst}, {demand} cores: peak {peak}, need {need}: {seen:?}"
                );
                assert!(
                    settled.iter().all(|&d| d.abs_diff(need) <= 1)
                        && *settled.last().unwrap() == need,
                    "burst {burst}, {demand} cores: settled {settled:?}, need {need}"
                );
            }
        }
    }

    #[test]
    fn burst_mode_reacts_within_seconds_and_sizes_from_demand() {
        let seen = step_run(true, 2.7, 40);
        // The step starts at 30 s: burst mode launches within 5 evaluations, at once
        // to a count sized from demand, never to max.
        let first = seen[30..].iter().position(|&d| d > 1).expect("scaled up");
        assert!(first <= 5, "{seen:?}");
        assert!(seen.iter().all(|&d| d <= 6), "{seen:?}");
    }

    /// One-core instances behind a queue, ready 50 ms after launch, evaluated every
    /// second with the saturation signal built as the live probe builds it: CPU capped
    /// at the ready count, requests counted on arrival, the queue's growth, and demand =
    /// CPU used × arrived / served. Returns every desired count.
    fn saturation_run(demand_cores: f64, secs: u32) -> Vec<u32> {
        let config = ReactiveConfig {
            targets: vec![MetricTarget {
                kind: MetricKind::Cpu,
                target: 0.6,
            }],
            max: 8,
            scale_down_stabilization_secs: 60.0,
            ..ReactiveConfig::default()
        };
        let mut p = ReactivePolicy::new("r", config).unwrap();
        assert!(p.reacts_to_saturation());
        let cost = 0.02; // CPU seconds per request
        let mut cpu = crate::windows::SecondWindow::new(60);
        let (mut ready, mut desired, mut backlog) = (1u32, 1u32, 0.0f64);
        let mut seen = Vec::new();
        for s in 0..secs {
            let t = f64::from(s);
            let demand = if s < 30 { 0.05 } else { demand_cores };
            // Work arrives, the instances burn what they can, the rest queues.
            let used = (demand + backlog).min(f64::from(ready));
            backlog = (backlog + demand - used).max(0.0);
            cpu.add(t, used);
            let (arrived, served) = (demand / cost, used / cost);
            let growth = arrived - served;
            let per = |v: Option<f64>| v.map(|x| x / f64::from(ready));
            let o = Observation {
                now_secs: t + 0.5,
                wall_epoch_secs: t + 0.5,
                ready,
                starting: desired - ready,
                current_desired: desired,
                metrics: vec![MetricSample {
                    kind: MetricKind::Cpu,
                    stable: per(cpu.mean(t, 20)),
                    panic: per(cpu.mean(t, 6)),
                }],
                demand_rps: None,
                saturation: Some(crate::Saturation {
                    saturated: used / f64::from(ready) >= 0.85
                        && growth >= f64::from(ready).max(2.0),
                    demand_instances: used * arrived / served,
                    arrival_rps: arrived,
                }),
            };
            desired = p.evaluate(&o).desired;
            ready = desired;
            seen.push(desired);
        }
        seen
    }

    #[test]
    fn saturation_bursts_at_once_to_what_demand_needs() {
        // 1.2 cores at 0.6 need 2; 2.7 cores need 5 (4.5, and 4 would be over tolerance).
        for (demand, need) in [(1.2, 2u32), (2.7, 5)] {
            let seen = saturation_run(demand, 150);
            assert!(seen[..30].iter().all(|&d| d == 1), "{seen:?}");
            // The first evaluation after the step sees the queue and asks for all of it.
            assert_eq!(seen[30], need, "{demand} cores: {seen:?}");
            // Working off the queue (CPU above what the load needs) asks for no more.
            assert!(seen[30..].iter().all(|&d| d == need), "{demand}: {seen:?}");
        }
    }

    fn saturated_obs(now: f64, ready: u32, starting: u32, demand: f64, sat: bool) -> Observation {
        let mut o = obs(now, ready, starting, Some(0.5));
        o.metrics[0].kind = MetricKind::Cpu;
        o.saturation = Some(crate::Saturation {
            saturated: sat,
            demand_instances: demand,
            arrival_rps: demand * 50.0,
        });
        o
    }

    fn demo_policy() -> ReactivePolicy {
        let config = ReactiveConfig {
            targets: vec![MetricTarget {
                kind: MetricKind::Cpu,
                target: 0.6,
            }],
            max: 8,
            scale_down_stabilization_secs: 60.0,
            ..ReactiveConfig::default()
        };
        ReactivePolicy::new("r", config).unwrap()
    }

    #[test]
    fn one_transient_reading_after_a_burst_adds_nothing() {
        let mut p = demo_policy();
        // The step: saturated, 1.2 instances of work → 2 at once.
        let d = p.evaluate(&saturated_obs(0.0, 1, 0, 1.2, true));
        assert_eq!((d.desired, d.reason), (2, Reason::Burst), "{}", d.detail);
        // The new instance warming (starting), then ready behind slow start: the queue
        // built meanwhile drains into it and one reading spikes. Neither adds.
        let d = p.evaluate(&saturated_obs(0.5, 1, 1, 2.1, true));
        assert_eq!(d.desired, 2, "{}", d.detail);
        let d = p.evaluate(&saturated_obs(1.0, 2, 0, 2.1, true));
        assert_eq!(d.desired, 2, "{}", d.detail);
        // An unsaturated reading however high (a burst of arrivals) is no saturation.
        let d = p.evaluate(&saturated_obs(2.0, 2, 0, 2.5, false));
        assert_eq!(d.desired, 2, "{}", d.detail);
        // A saturation that lasts with everything ready is real: it adds at once.
        for t in [3.0, 4.0, 5.0] {
            assert_eq!(p.evaluate(&saturated_obs(t, 2, 0, 2.1, true)).desired, 2);
        }
        let d = p.evaluate(&saturated_obs(6.0, 2, 0, 2.1, true));
        assert_eq!((d.desired, d.reason), (4, Reason::Burst), "{}", d.detail);
    }

    #[test]
    fn a_burst_never_lands_on_a_fleet_still_over_its_quota() {
        // A CPU target of 1.0 (the predictive policy's safety net): 2.1 instances of work
        // need 3, whatever the tolerance says.
        let config = ReactiveConfig {
            targets: vec![MetricTarget {
                kind: MetricKind::Cpu,
                target: 1.0,
            }],
            max: 8,
            ..ReactiveConfig::default()
        };
        let mut p = ReactivePolicy::new("r", config).unwrap();
        let d = p.evaluate(&saturated_obs(0.0, 1, 0, 2.1, true));
        assert_eq!((d.desired, d.reason), (3, Reason::Burst), "{}", d.detail);
    }

    #[test]
    fn unsaturated_demand_readings_never_burst() {
        let mut p = demo_policy();
        for t in 0..10 {
            let d = p.evaluate(&saturated_obs(f64::from(t), 1, 0, 1.4, false));
            assert_eq!(d.desired, 1, "{}", d.detail);
        }
    }

    #[test]
    fn saturation_signal_leaves_scale_down_stabilization_unchanged() {
        let mut p = ReactivePolicy::new("r", ReactiveConfig::default()).unwrap();
        let mut o = obs(0.0, 4, 0, Some(0.7));
        o.saturation = Some(crate::Saturation {
            saturated: false,
            demand_instances: 0.4,
            arrival_rps: 20.0,
        });
        p.evaluate(&o);
        let mut o = obs(15.0, 4, 0, Some(0.1));
        o.saturation = Some(crate::Saturation {
            saturated: false,
            demand_instances: 0.4,
            arrival_rps: 20.0,
        });
        let d = p.evaluate(&o);
        assert_eq!(
            (d.desired, d.reason),
            (4, Reason::Stabilized),
            "{}",
            d.detail
        );
    }

    #[test]
    fn invalid_config_names_the_field() {
        let config = ReactiveConfig {
            tolerance: 1.5,
            ..ReactiveConfig::default()
        };
        let err = ReactivePolicy::new("r", config).unwrap_err();
        assert!(err.to_string().contains("tolerance"), "{err}");
    }

    #[test]
    fn decision_serializes_with_stable_codes() {
        let mut p = cpu_policy();
        let d = p.evaluate(&obs(0.0, 10, 0, None));
        let json = serde_json::to_string(&d).unwrap();
        assert!(json.contains("\"reason\":\"missing_metrics\""), "{json}");
        assert!(json.contains("\"direction\":\"none\""), "{json}");
    }
}
