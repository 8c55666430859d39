//! Scaling worker fleets on the backlog, with KEDA's semantics:
//! - the metric is the queue's backlog (RabbitMQ ready + unacked, Kafka consumer lag);
//! - HPA `AverageValue` tracking above zero: `desired = ceil(backlog / target)`, 10%
//!   tolerance, scale-ups at once, scale-downs through a stabilization window;
//! - activation: from zero, the fleet starts when the backlog exceeds the activation
//!   threshold; at or below it the fleet is idle and, after `cooldown` without activity,
//!   goes back to zero (when `min` is 0).
//!
//! [`BacklogPolicy`] is pure (time is an argument) and returns the same [`Decision`] as the
//! HTTP policies, so the live autoscaler records its decisions in the same log, with the
//! same reasons and metric.

use std::collections::VecDeque;

use crate::{Decision, Direction, Observation, Reason};

/// The scaling parameters of one worker fleet.
#[derive(Debug, Clone, PartialEq)]
pub struct BacklogParams {
    /// Backlog one instance is expected to carry (KEDA `queueLength` / `lagThreshold`).
    pub target_per_instance: f64,
    /// The fleet is active above this backlog (KEDA `activationQueueLength`/`activationLagThreshold`).
    pub activation: f64,
    /// 0 allows scale to zero.
    pub min: u32,
    pub max: u32,
    /// Seconds inactive before scaling to zero (KEDA `cooldownPeriod`, default 300).
    pub cooldown_secs: f64,
    /// Scale-down stabilization window (HPA default 300 s).
    pub scale_down_window_secs: f64,
    /// Relative change ignored (HPA default 0.1).
    pub tolerance: f64,
}

impl Default for BacklogParams {
    fn default() -> Self {
        BacklogParams {
            target_per_instance: 5.0,
            activation: 0.0,
            min: 0,
            max: 10,
            cooldown_secs: 300.0,
            scale_down_window_secs: 300.0,
            tolerance: 0.1,
        }
    }
}

/// The policy's state: when the queue was last active and recent recommendations.
#[derive(Debug, Clone)]
pub struct BacklogPolicy {
    p: BacklogParams,
    last_active: Option<f64>,
    recs: VecDeque<(f64, u32)>,
}

/// What the policy is told at one evaluation.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct BacklogInput {
    /// Monotonic seconds.
    pub now_secs: f64,
    /// Wall-clock seconds (for the decision log).
    pub wall_epoch_secs: f64,
    /// None when the backlog could not be read (broker down): the size is held.
    pub backlog: Option<u64>,
    pub ready: u32,
    pub starting: u32,
    /// The desired count in force.
    pub current: u32,
}

pub const POLICY_NAME: &str = "backlog";

impl BacklogPolicy {
    pub fn new(p: BacklogParams) -> BacklogPolicy {
        BacklogPolicy {
            p,
            last_active: None,
            recs: VecDeque::new(),
        }
    }

    pub fn params(&self) -> &BacklogParams {
        &self.p
    }

    pub fn evaluate(&mut self, i: BacklogInput) -> Decision {
        let p = &self.p;
        let obs = Observation {
            now_secs: i.now_secs,
            wall_epoch_secs: i.wall_epoch_secs,
            ready: i.ready,
            starting: i.starting,
            current_desired: i.current,
            metrics: Vec::new(),
            demand_rps: None,
            saturation: None,
        };
        let cur = i.current;
        let decide = |desired: u32, reason: Reason, detail: String| Decision {
            policy: POLICY_NAME.into(),
            desired,
            direction: match desired.cmp(&cur) {
                std::cmp::Ordering::Greater => Direction::Up,
                std::cmp::Ordering::Less => Direction::Down,
                std::cmp::Ordering::Equal => Direction::None,
            },
            reason,
            detail,
            inputs: obs.clone(),
            forecast_rps: None,
        };
        let Some(backlog) = i.backlog else {
            return decide(
                cur,
                Reason::MissingMetrics,
                "backlog unknown: holding".into(),
            );
        };
        let b = backlog as f64;
        let active = b > p.activation;
        if active {
            self.last_active = Some(i.now_secs);
        }
        let floor = p.min.max(1);
        // Raw HPA recommendation (AverageValue: the total over the per-instance target).
        let wanted = (b / p.target_per_instance).ceil() as u32;
        let mut rec = wanted;
        if cur > 0 {
            let ratio = b / (p.target_per_instance * cur as f64);
            if (ratio - 1.0).abs() <= p.tolerance {
                rec = cur;
            }
        }
        let clamped = rec.clamp(floor, p.max.max(floor));

        if cur == 0 {
            if !active {
                self.recs.clear();
                return decide(
                    0,
                    Reason::Steady,
                    format!(
                        "idle at zero: backlog {backlog} <= activation {}",
                        p.activation
                    ),
                );
            }
            self.recs.clear();
            self.recs.push_back((i.now_secs, clamped));
            let reason = if wanted > p.max {
                Reason::AtMax
            } else {
                Reason::TargetTracking
            };
            return decide(
                clamped,
                reason,
                format!(
                    "activation: backlog {backlog} > {} → ceil({backlog}/{}) = {wanted}, start {clamped}",
                    p.activation, p.target_per_instance
                ),
            );
        }

        if !active && p.min == 0 {
            let idle_for = self.last_active.map_or(f64::INFINITY, |t| i.now_secs - t);
            if idle_for >= p.cooldown_secs {
                self.recs.clear();
                return decide(
                    0,
                    Reason::TargetTracking,
                    format!(
                        "inactive for {idle_for:.0}s >= cooldown {}s: scale to zero",
                        p.cooldown_secs
                    ),
                );
            }
        }

        // Stabilization: scale down only to the highest recommendation of the window.
        self.recs.push_back((i.now_secs, clamped));
        while self
            .recs
            .front()
            .is_some_and(|(t, _)| i.now_secs - t > p.scale_down_window_secs)
        {
            self.recs.pop_front();
        }
        let stable = self.recs.iter().map(|(_, r)| *r).max().unwrap_or(clamped);
        let desired = if clamped >= cur {
            clamped
        } else {
            stable.min(cur)
        };
        let detail = format!(
            "backlog {backlog}, target {}/instance → ceil = {wanted}, recommend {clamped}",
            p.target_per_instance
        );
        let reason = if desired != clamped && desired > clamped {
            Reason::Stabilized
        } else if wanted > p.max && desired == p.max.max(floor) {
            Reason::AtMax
        } else if wanted < floor && desired == floor && p.min > 0 {
            Reason::AtMin
        } else if desired == cur {
            Reason::Steady
        } else {
            Reason::TargetTracking
        };
        decide(desired, reason, detail)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn input(t: f64, backlog: Option<u64>, current: u32) -> BacklogInput {
        BacklogInput {
            now_secs: t,
            wall_epoch_secs: 1.7e9 + t,
            backlog,
            ready: current,
            starting: 0,
            current,
        }
    }

    fn params() -> BacklogParams {
        BacklogParams {
            target_per_instance: 10.0,
            activation: 0.0,
            min: 0,
            max: 4,
            cooldown_secs: 30.0,
            scale_down_window_secs: 20.0,
            tolerance: 0.1,
        }
    }

    #[test]
    fn zero_to_n_and_back_to_zero() {
        let mut p = BacklogPolicy::new(params());
        let mut cur = 0;
        let mut trace = vec![];
        // Backlog grows, peaks, drains, stays empty.
        let backlog = [0, 0, 3, 25, 60, 80, 40, 10, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0];
        for (k, b) in backlog.iter().enumerate() {
            let d = p.evaluate(input(k as f64 * 5.0, Some(*b), cur));
            cur = d.desired;
            trace.push(cur);
        }
        assert_eq!(trace[..2], [0, 0], "idle at zero");
        assert_eq!(trace[2], 1, "activation on the first job");
        assert_eq!(trace[3], 3);
        assert_eq!(trace[5], 4, "capped at max");
        assert!(trace[6..9].iter().all(|&n| n == 4), "stabilized: {trace:?}");
        assert_eq!(*trace.last().unwrap(), 0, "back to zero: {trace:?}");
        let first_zero = trace.iter().skip(3).position(|&n| n == 0).unwrap() + 3;
        // Last active at t=35 (index 7); cooldown 30 s → zero from t=65 (index 13).
        assert_eq!(first_zero, 13, "{trace:?}");
    }

    #[test]
    fn activation_threshold_keeps_small_backlogs_at_zero() {
        let mut p = BacklogPolicy::new(BacklogParams {
            activation: 5.0,
            ..params()
        });
        assert_eq!(p.evaluate(input(0.0, Some(5), 0)).desired, 0);
        let d = p.evaluate(input(1.0, Some(6), 0));
        assert_eq!((d.desired, d.direction), (1, Direction::Up));
    }

    #[test]
    fn missing_backlog_holds_even_at_zero_activity() {
        let mut p = BacklogPolicy::new(params());
        let d = p.evaluate(input(1000.0, None, 3));
        assert_eq!((d.desired, d.reason), (3, Reason::MissingMetrics));
    }

    #[test]
    fn tolerance_and_min() {
        let mut p = BacklogPolicy::new(BacklogParams { min: 2, ..params() });
        let d = p.evaluate(input(0.0, Some(31), 3));
        assert_eq!((d.desired, d.reason), (3, Reason::Steady), "within 10%");
        let mut p = BacklogPolicy::new(BacklogParams {
            min: 2,
            scale_down_window_secs: 0.0,
            ..params()
        });
        let d = p.evaluate(input(0.0, Some(0), 3));
        assert_eq!(
            (d.desired, d.reason),
            (2, Reason::AtMin),
            "min > 0 never goes to zero"
        );
    }
}
