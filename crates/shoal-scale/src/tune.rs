//! `shoal tune`: the cheapest policy settings that meet a service-level objective on a
//! demand trace, found by replaying candidates through the simulator ([`crate::sim`]).
//!
//! The search space is the settings a user writes in `[services.NAME.autoscale]`: the
//! policy (reactive or predictive), the target utilization (an `rps` target of capacity ×
//! utilization) and the scale-down stabilization. Violation time falls and instance-hours
//! rise as the target utilization falls, so each (policy, stabilization) family is searched
//! coarse to fine for the highest utilization that meets the objective: a coarse grid
//! first, then the grid points between the best feasible coarse point and the next one.
//! Runs go in parallel on scoped threads.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;

use serde::Serialize;

use crate::predictive::{PredictiveConfig, PredictiveMode, PredictivePolicy};
use crate::reactive::{ReactiveConfig, ReactivePolicy};
use crate::sim::{simulate, FleetModel, SimReport};
use crate::trace::Trace;
use crate::{Error, Policy, PolicyParams};

/// The objective: upper bounds on the fraction of time in violation and of requests
/// unserved (either or both).
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Slo {
    /// Largest fraction of time with demand over ready capacity (0.001 = 0.1%).
    pub max_violation: Option<f64>,
    /// Largest fraction of requests beyond ready capacity.
    pub max_unserved: Option<f64>,
}

impl Slo {
    /// Whether `r` meets the objective.
    pub fn met(&self, r: &SimReport) -> bool {
        self.max_violation
            .is_none_or(|m| r.violation_fraction <= m + 1e-12)
            && self
                .max_unserved
                .is_none_or(|m| r.unserved_fraction <= m + 1e-12)
    }
}

/// One point of the search space.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Candidate {
    /// `reactive` or `predictive`.
    pub policy: &'static str,
    /// Target utilization of an instance's capacity.
    pub target_utilization: f64,
    /// Scale-down stabilization window, seconds.
    pub scale_down_stabilization_secs: f64,
}

impl Candidate {
    /// The baseline every recommendation is compared with: reactive at 0.7 with the
    /// HPA defaults (`policy_by_name("reactive")`).
    pub fn baseline() -> Self {
        Candidate {
            policy: "reactive",
            target_utilization: 0.7,
            scale_down_stabilization_secs: ReactiveConfig::default().scale_down_stabilization_secs,
        }
    }

    /// The policy these settings describe, for a fleet described by `params`.
    pub fn build(&self, params: &PolicyParams) -> Result<Box<dyn Policy>, Error> {
        let params = PolicyParams {
            target_utilization: self.target_utilization,
            ..params.clone()
        };
        let mut reactive = ReactiveConfig::for_rps(&params);
        reactive.scale_down_stabilization_secs = self.scale_down_stabilization_secs;
        if self.policy == "predictive" {
            let mut config =
                PredictiveConfig::for_params(&params, PredictiveMode::ForecastAndScale);
            config.reactive = reactive;
            return Ok(Box::new(PredictivePolicy::new("predictive", config)?));
        }
        Ok(Box::new(ReactivePolicy::new("reactive", reactive)?))
    }

    /// The settings as `[services.NAME.autoscale]` keys.
    pub fn config_keys(&self, params: &PolicyParams) -> serde_json::Value {
        let mut v = serde_json::json!({
            "policy": self.policy,
            "targets": [{
                "metric": "rps",
                "target": round4(params.capacity_rps * self.target_utilization),
            }],
            "scale_down_stabilization": format!("{}s", self.scale_down_stabilization_secs),
            "capacity_rps": params.capacity_rps,
        });
        if self.policy == "predictive" {
            v["startup"] = format!("{}s", params.startup_secs).into();
        }
        v
    }

    /// The settings as a TOML snippet for `[services.NAME.autoscale]`.
    pub fn toml(&self, service: &str, params: &PolicyParams) -> String {
        let mut s = format!(
            "[services.{service}.autoscale]\npolicy = \"{}\"\ntargets = [{{ metric = \"rps\", target = {} }}]\n\
             scale_down_stabilization = \"{}s\"\ncapacity_rps = {}\n",
            self.policy,
            round4(params.capacity_rps * self.target_utilization),
            self.scale_down_stabilization_secs,
            params.capacity_rps
        );
        if self.policy == "predictive" {
            s.push_str(&format!("startup = \"{}s\"\n", params.startup_secs));
        }
        s
    }
}

fn round4(x: f64) -> f64 {
    let p = 10f64.powi(4 - x.abs().log10().ceil().max(-8.0) as i32);
    (x * p).round() / p
}

/// A candidate replayed through the simulator.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Outcome {
    /// The settings.
    pub candidate: Candidate,
    /// Seconds with demand over ready capacity.
    pub violation_seconds: f64,
    /// `violation_seconds` over the trace's duration.
    pub violation_fraction: f64,
    /// Instance-hours, starting and ready.
    pub instance_hours: f64,
    /// Requests beyond ready capacity over all requests.
    pub unserved_fraction: f64,
    /// Whether the objective is met.
    pub meets: bool,
}

impl Outcome {
    fn of(candidate: Candidate, r: &SimReport, slo: &Slo) -> Self {
        Outcome {
            candidate,
            violation_seconds: r.violation_seconds,
            violation_fraction: r.violation_fraction,
            instance_hours: r.instance_hours,
            unserved_fraction: r.unserved_fraction,
            meets: slo.met(r),
        }
    }
}

/// The search space.
#[derive(Debug, Clone, PartialEq)]
pub struct Space {
    /// Policies tried.
    pub policies: Vec<&'static str>,
    /// Target utilizations, ascending: the fine grid.
    pub utilizations: Vec<f64>,
    /// Every `coarse`-th point of the grid is tried first.
    pub coarse: usize,
    /// Scale-down stabilization windows tried for the reactive policy, seconds (the
    /// predictive policy decides its own scale-downs and keeps the default).
    pub stabilizations: Vec<f64>,
}

impl Default for Space {
    fn default() -> Self {
        Space {
            policies: vec!["reactive", "predictive"],
            utilizations: (0..=26).map(|i| 0.3 + 0.025 * f64::from(i)).collect(),
            coarse: 4,
            stabilizations: vec![60.0, 300.0, 900.0],
        }
    }
}

/// What the search found.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct TuneReport {
    /// The cheapest candidate meeting the objective; `None` if none does.
    pub best: Option<Outcome>,
    /// Reactive at 0.7.
    pub baseline: Outcome,
    /// The cheapest reactive settings meeting the objective (reactive retuned): what the
    /// recommendation saves over tuning the target alone.
    pub reactive_best: Option<Outcome>,
    /// Every candidate replayed, cheapest first.
    pub evaluated: Vec<Outcome>,
    /// The candidates no other beats on both violation and instance-hours, cheapest first.
    pub frontier: Vec<Outcome>,
}

/// Replay `candidates` on up to `threads` threads; results in the same order.
fn run_all(
    trace: &Trace,
    params: &PolicyParams,
    model: &FleetModel,
    candidates: &[Candidate],
    threads: usize,
) -> Result<Vec<SimReport>, Error> {
    // Check every candidate builds before spending time on any.
    for c in candidates {
        c.build(params)?;
    }
    let next = AtomicUsize::new(0);
    let out: Mutex<Vec<Option<SimReport>>> = Mutex::new(vec![None; candidates.len()]);
    // Predictive runs are the slow ones: start them first.
    let mut order: Vec<usize> = (0..candidates.len()).collect();
    order.sort_by_key(|&i| candidates[i].policy != "predictive");
    std::thread::scope(|s| {
        for _ in 0..threads.clamp(1, candidates.len().max(1)) {
            s.spawn(|| loop {
                let k = next.fetch_add(1, Ordering::Relaxed);
                let Some(&i) = order.get(k) else { break };
                let Ok(mut policy) = candidates[i].build(params) else {
                    continue;
                };
                let r = simulate(trace, policy.as_mut(), model, |_| {});
                out.lock().expect("results lock")[i] = Some(r);
            });
        }
    });
    Ok(out
        .into_inner()
        .expect("results lock")
        .into_iter()
        .map(|r| r.expect("every candidate ran"))
        .collect())
}

/// Search `space` for the cheapest settings meeting `slo` on `trace`.
pub fn tune(
    trace: &Trace,
    params: &PolicyParams,
    model: &FleetModel,
    slo: &Slo,
    space: &Space,
    threads: usize,
) -> Result<TuneReport, Error> {
    let mut families: Vec<(&'static str, f64)> = Vec::new();
    for &p in &space.policies {
        if p == "predictive" {
            families.push((p, Candidate::baseline().scale_down_stabilization_secs));
        } else {
            families.extend(space.stabilizations.iter().map(|&s| (p, s)));
        }
    }
    let grid = &space.utilizations;
    let step = space.coarse.max(1);
    let mut coarse_idx: Vec<usize> = (0..grid.len()).step_by(step).collect();
    if coarse_idx.last() != Some(&(grid.len() - 1)) {
        coarse_idx.push(grid.len() - 1);
    }
    let cand = |(policy, s): (&'static str, f64), i: usize| Candidate {
        policy,
        target_utilization: grid[i],
        scale_down_stabilization_secs: s,
    };

    // Coarse pass, with the baseline.
    let mut batch = vec![Candidate::baseline()];
    for &f in &families {
        batch.extend(coarse_idx.iter().map(|&i| cand(f, i)));
    }
    let reports = run_all(trace, params, model, &batch, threads)?;
    let baseline = Outcome::of(batch[0], &reports[0], slo);
    let mut evaluated: Vec<Outcome> = batch[1..]
        .iter()
        .zip(&reports[1..])
        .map(|(c, r)| Outcome::of(*c, r, slo))
        .collect();

    // Fine pass: between each family's highest feasible coarse point and the next one
    // up (or below the lowest, when none is feasible).
    let mut fine = Vec::new();
    for (k, &f) in families.iter().enumerate() {
        let outs = &evaluated[k * coarse_idx.len()..(k + 1) * coarse_idx.len()];
        let best = outs.iter().rposition(|o| o.meets);
        let (lo, hi) = match best {
            Some(j) if j + 1 < coarse_idx.len() => (coarse_idx[j] + 1, coarse_idx[j + 1]),
            Some(_) => continue,
            None => (0, coarse_idx[0]),
        };
        fine.extend((lo..hi).map(|i| cand(f, i)));
    }
    let reports = run_all(trace, params, model, &fine, threads)?;
    evaluated.extend(
        fine.iter()
            .zip(&reports)
            .map(|(c, r)| Outcome::of(*c, r, slo)),
    );

    evaluated.sort_by(|a, b| a.instance_hours.total_cmp(&b.instance_hours));
    let best = evaluated.iter().find(|o| o.meets).cloned();
    let reactive_best = evaluated
        .iter()
        .find(|o| o.meets && o.candidate.policy == "reactive")
        .cloned();
    let mut frontier: Vec<Outcome> = Vec::new();
    for o in &evaluated {
        // Cheapest first: on the frontier if it has less violation than every cheaper one.
        if frontier
            .last()
            .is_none_or(|f| o.violation_seconds < f.violation_seconds)
        {
            frontier.push(o.clone());
        }
    }
    Ok(TuneReport {
        best,
        baseline,
        reactive_best,
        evaluated,
        frontier,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::trace::parse_csv;

    /// A day of demand swinging between 2 and 9 requests/s every two hours.
    fn swings() -> Trace {
        let mut text = String::from("t,rps\n");
        for m in 0..(24 * 60) {
            let rps = if (m / 120) % 2 == 0 { 2.0 } else { 9.0 };
            text.push_str(&format!("{},{}\n", m * 60, rps));
        }
        parse_csv(&text, "swings").unwrap()
    }

    fn params() -> PolicyParams {
        PolicyParams {
            capacity_rps: 1.0,
            startup_secs: 120.0,
            ..PolicyParams::default()
        }
    }

    fn reactive_only() -> Space {
        Space {
            policies: vec!["reactive"],
            ..Space::default()
        }
    }

    #[test]
    fn the_recommendation_meets_the_objective_and_is_the_cheapest_that_does() {
        let trace = swings();
        let model = FleetModel::new(1.0, 120.0);
        let slo = Slo {
            max_violation: Some(0.01),
            max_unserved: None,
        };
        let r = tune(&trace, &params(), &model, &slo, &reactive_only(), 2).unwrap();
        let best = r.best.clone().expect("a recommendation");
        assert!(best.violation_fraction <= 0.01, "{best:?}");
        // Replaying the recommendation gives the figures reported.
        let mut p = best.candidate.build(&params()).unwrap();
        let again = simulate(&trace, p.as_mut(), &model, |_| {});
        assert_eq!(again.instance_hours, best.instance_hours);
        assert_eq!(again.violation_seconds, best.violation_seconds);
        // No evaluated candidate meeting it is cheaper; the frontier is sorted both ways.
        assert!(r
            .evaluated
            .iter()
            .filter(|o| o.meets)
            .all(|o| o.instance_hours >= best.instance_hours));
        for w in r.frontier.windows(2) {
            assert!(w[0].instance_hours <= w[1].instance_hours);
            assert!(w[0].violation_seconds > w[1].violation_seconds);
        }
        // The baseline is reactive at 0.7 with the defaults.
        let mut b = crate::policy_by_name("reactive", &params()).unwrap();
        let base = simulate(&trace, b.as_mut(), &model, |_| {});
        assert_eq!(r.baseline.instance_hours, base.instance_hours);
    }

    #[test]
    fn an_objective_nothing_meets_gives_no_recommendation() {
        // Zero unserved requests on a step with a 120 s startup: nothing reactive meets it.
        let text = "t,rps\n0,1\n3600,50\n7200,50\n";
        let trace = parse_csv(text, "step").unwrap();
        let slo = Slo {
            max_violation: None,
            max_unserved: Some(0.0),
        };
        let r = tune(
            &trace,
            &params(),
            &FleetModel::new(1.0, 120.0),
            &slo,
            &reactive_only(),
            2,
        )
        .unwrap();
        assert!(r.best.is_none(), "{:?}", r.best);
        assert!(!r.evaluated.is_empty());
    }

    #[test]
    fn settings_are_config_keys() {
        let c = Candidate {
            policy: "predictive",
            target_utilization: 0.65,
            scale_down_stabilization_secs: 300.0,
        };
        let v = c.config_keys(&PolicyParams {
            capacity_rps: 10.0,
            startup_secs: 120.0,
            ..PolicyParams::default()
        });
        assert_eq!(v["policy"], "predictive");
        assert_eq!(v["targets"][0]["metric"], "rps");
        assert_eq!(v["targets"][0]["target"], 6.5);
        assert_eq!(v["scale_down_stabilization"], "300s");
        assert_eq!(v["startup"], "120s");
    }
}
