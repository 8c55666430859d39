//! The saturation estimator: whether the ready instances are saturated right now and
//! what the work arriving needs, from cumulative readings taken about twice a second.
//!
//! One implementation for every source: the live autoscaler feeds it the pool's
//! counters, its in-flight requests and the instances' CPU; the simulator feeds it its
//! model fleet's (see [`crate::sim`]); the predictive policy's shadow fleet, which has no
//! probe of its own, reads a measured [`Saturation`] through [`saturates`]. Pure: time
//! arrives in each [`ProbeSample`].
//!
//! A probe is compared with the newest one at least [`PROBE_SPAN_SECS`] older (the last
//! [`HISTORY_SECS`] are kept). Saturated: the CPU of the ready instances at
//! [`AT_QUOTA`] of their allotment or more (or the work arriving beyond it) with requests
//! in flight growing by at least max(2, ready), or p95 latency over a latency target
//! with a queue. The demand is what arrives (requests are counted on arrival) times the
//! CPU a completed request costs, learned over unsaturated spans.

use std::collections::VecDeque;

use crate::Saturation;

/// A probe is compared with the newest probe at least this much older.
pub const PROBE_SPAN_SECS: f64 = 0.9;
/// CPU per ready instance, as a fraction of its allotment, that counts as at quota.
pub const AT_QUOTA: f64 = 0.85;
/// Requests completed over a probe span below this say too little about a request's cost.
pub const COST_MIN_REQUESTS: f64 = 20.0;
/// Weight of a new unsaturated span in the request-cost average.
pub const COST_EWMA: f64 = 0.2;
/// Probes older than this are forgotten.
pub const HISTORY_SECS: f64 = 5.0;

/// Cumulative readings at one probe. `K` names an instance (any id both sides share).
#[derive(Debug, Clone, PartialEq)]
pub struct ProbeSample<K> {
    /// Monotonic seconds (any origin).
    pub t: f64,
    /// Requests arrived (counted when they arrive), cumulative.
    pub requests: f64,
    /// Requests in flight now.
    pub in_flight: f64,
    /// Requests completed, cumulative.
    pub completed: f64,
    /// CPU seconds of each *ready* instance, cumulative: one entry per instance, in any
    /// order (the estimator sorts them by id).
    pub cpu: Vec<(K, f64)>,
    /// Cumulative requests completed within each bound of
    /// [`ProbeContext::latency_bounds`], then all of them (+Inf); empty when latency is
    /// not measured.
    pub latency: Vec<u64>,
}

/// What the estimator needs to know besides the readings (it may change between probes).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ProbeContext<'a> {
    /// CPU (cores) one instance is allotted.
    pub allotment: f64,
    /// The p95 latency target in seconds, if the fleet has one (the lowest, if several).
    pub latency_p95_target: Option<f64>,
    /// Upper bounds (seconds) of the latency buckets of [`ProbeSample::latency`].
    pub latency_bounds: &'a [f64],
}

/// The probe history and the learned cost of a request. See the module docs.
#[derive(Debug, Clone)]
pub struct SaturationEstimator<K> {
    /// The last [`HISTORY_SECS`] of probes, newest last.
    probes: VecDeque<ProbeSample<K>>,
    /// CPU seconds per completed request, averaged over unsaturated probe spans (where
    /// the cost is not inflated by instances competing for their quota).
    request_cost: Option<f64>,
}

impl<K: Ord> Default for SaturationEstimator<K> {
    fn default() -> Self {
        Self::new()
    }
}

impl<K: Ord> SaturationEstimator<K> {
    /// An estimator with no history.
    pub fn new() -> Self {
        Self {
            probes: VecDeque::new(),
            request_cost: None,
        }
    }

    /// CPU seconds per completed request learned so far (over unsaturated spans).
    pub fn request_cost(&self) -> Option<f64> {
        self.request_cost
    }

    /// One probe: its readings against the newest probe at least [`PROBE_SPAN_SECS`]
    /// older. `None` without such a probe or without an instance ready at both.
    /// Instances not ready at both probes (started or stopped in between) are left out.
    pub fn observe(&mut self, mut p: ProbeSample<K>, ctx: &ProbeContext<'_>) -> Option<Saturation> {
        if !p.cpu.is_sorted_by(|a, b| a.0 < b.0) {
            // Stable: of two entries for one id, the last stays last, and wins.
            p.cpu.sort_by(|a, b| a.0.cmp(&b.0));
            p.cpu.reverse();
            p.cpu.dedup_by(|a, b| a.0 == b.0);
            p.cpu.reverse();
        }
        let t = p.t;
        while self.probes.front().is_some_and(|o| t - o.t > HISTORY_SECS) {
            self.probes.pop_front();
        }
        let base = self
            .probes
            .iter()
            .rev()
            .find(|o| t - o.t >= PROBE_SPAN_SECS);
        let sat = base.and_then(|o| -> Option<(Saturation, Option<f64>)> {
            let dt = t - o.t;
            // The CPU the instances ready at both probes used in between, and how many.
            let (mut ready, mut count) = (0.0, 0usize);
            cpu_since(&p.cpu, &o.cpu, |c| {
                ready += c;
                count += 1;
            });
            if count == 0 {
                return None;
            }
            let allotment = ctx.allotment;
            let used = ready / dt / allotment;
            let arrival = (p.requests - o.requests).max(0.0) / dt;
            let growth = p.in_flight - o.in_flight;
            let served = arrival - growth / dt;
            let n = count as f64;
            let queue_building = growth >= n.max(2.0);
            let at_quota = used / n >= AT_QUOTA;
            let slow = ctx.latency_p95_target.is_some_and(|target| {
                p.in_flight >= 2.0 * n && growth > 0.0 && {
                    let counts: Vec<u64> = p
                        .latency
                        .iter()
                        .enumerate()
                        .map(|(i, c)| c.saturating_sub(o.latency.get(i).copied().unwrap_or(0)))
                        .collect();
                    // Cumulative → per bucket (the last entry is the +Inf total).
                    let per: Vec<u64> = counts
                        .iter()
                        .enumerate()
                        .map(|(i, c)| c.saturating_sub(if i == 0 { 0 } else { counts[i - 1] }))
                        .collect();
                    quantile_from_buckets(ctx.latency_bounds, &per, 0.95)
                        .is_some_and(|q| q > target)
                }
            });
            // The work arriving: requests arriving (served + queued) × a request's cost.
            // The cost is CPU per completed request from unsaturated spans when known,
            // else over the whole probe history (≤ 5 s): never from one short span, whose
            // few completions (and a queue drained into a warming instance) make it noisy.
            // (Not what the instances serve: on a busy host an instance gets less than its
            // allotment, and sizing on its throughput would add instances for other
            // tenants' load.)
            let windowed = self.probes.front().and_then(|f| {
                let done = (p.completed - f.completed).max(0.0);
                let mut cpu = 0.0;
                cpu_since(&p.cpu, &f.cpu, |c| cpu += c);
                (done >= COST_MIN_REQUESTS).then(|| cpu / done)
            });
            let span_done = (p.completed - o.completed).max(0.0);
            let unsaturated_cost =
                (!at_quota && span_done >= COST_MIN_REQUESTS).then(|| ready / span_done);
            let cost = self.request_cost.or(windowed);
            let demand = match cost {
                Some(c) => arrival.max(0.0) * c / allotment,
                None if served >= 1.0 => used * arrival.max(0.0) / served,
                None => used,
            };
            // A queue building while the instances are at quota, or while the work
            // arriving is more than they give at quota (they get less than their allotment
            // on a busy host, but the load alone would saturate them too).
            let over = at_quota || demand / n >= AT_QUOTA;
            Some((
                Saturation {
                    saturated: (over && queue_building) || slow,
                    demand_instances: demand,
                    arrival_rps: arrival.max(0.0),
                },
                unsaturated_cost,
            ))
        });
        if let Some((_, Some(c))) = sat {
            self.request_cost = Some(self.request_cost.map_or(c, |a| a + COST_EWMA * (c - a)));
        }
        self.probes.push_back(p);
        sat.map(|(x, _)| x)
    }
}

/// CPU used since `then` by each instance in both `now` and `then` (both sorted by id),
/// in id order.
fn cpu_since<K: Ord>(now: &[(K, f64)], then: &[(K, f64)], mut each: impl FnMut(f64)) {
    let mut old = then.iter().peekable();
    for (id, c) in now {
        while old.next_if(|(o, _)| o < id).is_some() {}
        if let Some((_, c0)) = old.next_if(|(o, _)| o == id) {
            each((c - c0).max(0.0));
        }
    }
}

/// Whether the work `s` measured would saturate a fleet of `ready` instances that had
/// no queue, read as [`SaturationEstimator`] reads a fleet over a one-second span: the
/// work over the instances' whole allotment queues up, and saturates once the queue
/// grows by max(2, ready) requests in the span (the CPU is then at quota). For a model
/// fleet with no probe of its own (the predictive policy's shadow).
pub fn saturates(s: &Saturation, ready: u32) -> bool {
    let n = f64::from(ready);
    if ready == 0 || s.demand_instances <= n {
        return false;
    }
    // Requests/s one instance serves at its whole allotment.
    let per_instance = s.arrival_rps / s.demand_instances;
    let growth = s.arrival_rps - n * per_instance;
    growth >= n.max(2.0)
}

/// Upper-bound estimate of the `q` quantile from per-bucket counts (the bucket's bound;
/// counts past the last bound, the +Inf bucket, read as twice the last bound).
pub fn quantile_from_buckets(bounds: &[f64], counts: &[u64], q: f64) -> Option<f64> {
    let total: u64 = counts.iter().sum();
    if total == 0 {
        return None;
    }
    let want = (total as f64 * q).ceil() as u64;
    let mut acc = 0;
    for (i, c) in counts.iter().enumerate() {
        acc += c;
        if acc >= want {
            return Some(
                bounds
                    .get(i)
                    .copied()
                    .unwrap_or_else(|| bounds.last().map_or(f64::INFINITY, |b| b * 2.0)),
            );
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;

    const BOUNDS: [f64; 4] = [0.01, 0.1, 0.5, 1.0];

    /// A model fleet on an injected clock: instances of one allotment (one core), a
    /// request costing `cost` CPU seconds; what arrives beyond what the instances serve
    /// at their allotment queues; `latency` (seconds) is every completion's.
    struct Fleet {
        t: f64,
        cost: f64,
        ready: BTreeMap<u64, f64>,
        requests: f64,
        completed: f64,
        queue: f64,
        /// Requests in flight waiting on something other than CPU (a downstream call).
        waiting: f64,
        latency: Vec<u64>,
    }

    impl Fleet {
        fn new(instances: u64, cost: f64) -> Self {
            Self {
                t: 100.0,
                cost,
                ready: (0..instances).map(|i| (i, 0.0)).collect(),
                requests: 0.0,
                completed: 0.0,
                queue: 0.0,
                waiting: 0.0,
                latency: vec![0; BOUNDS.len() + 1],
            }
        }

        /// `dt` seconds of `rps` arriving, every completion taking `latency`.
        fn run(&mut self, dt: f64, rps: f64, latency: f64) {
            let capacity = self.ready.len() as f64 / self.cost;
            let served = (self.queue + rps * dt).min(capacity * dt);
            self.queue += rps * dt - served;
            self.requests += rps * dt;
            self.completed += served;
            let per = served * self.cost / self.ready.len() as f64;
            for c in self.ready.values_mut() {
                *c += per;
            }
            let i = BOUNDS
                .iter()
                .position(|&b| latency <= b)
                .unwrap_or(BOUNDS.len());
            for c in &mut self.latency[i..] {
                *c += served.round() as u64;
            }
            self.t += dt;
        }

        fn sample(&self) -> ProbeSample<u64> {
            ProbeSample {
                t: self.t,
                requests: self.requests,
                in_flight: self.queue + self.waiting,
                completed: self.completed,
                cpu: self.ready.iter().map(|(&id, &c)| (id, c)).collect(),
                latency: self.latency.clone(),
            }
        }
    }

    fn ctx(target: Option<f64>) -> ProbeContext<'static> {
        ProbeContext {
            allotment: 1.0,
            latency_p95_target: target,
            latency_bounds: &BOUNDS,
        }
    }

    /// Probes every 500 ms for `secs` seconds at `rps`; the readings.
    fn probe(
        e: &mut SaturationEstimator<u64>,
        f: &mut Fleet,
        secs: u32,
        rps: f64,
        latency: f64,
        target: Option<f64>,
    ) -> Vec<Option<Saturation>> {
        (0..secs * 2)
            .map(|_| {
                f.run(0.5, rps, latency);
                e.observe(f.sample(), &ctx(target))
            })
            .collect()
    }

    #[test]
    fn a_steady_unsaturated_fleet_is_not_saturated() {
        // Four instances at 50%: 100 requests/s of 20 ms each.
        let (mut e, mut f) = (SaturationEstimator::new(), Fleet::new(4, 0.02));
        let seen = probe(&mut e, &mut f, 10, 100.0, 0.005, None);
        // The first probe has nothing to compare with.
        assert_eq!(seen[0], None);
        for s in &seen[2..] {
            let s = s.expect("a reading");
            assert!(!s.saturated, "{s:?}");
            assert!((s.demand_instances - 2.0).abs() < 1e-6, "{s:?}");
            assert!((s.arrival_rps - 100.0).abs() < 1e-6, "{s:?}");
        }
        // Learned from the unsaturated spans.
        assert!((e.request_cost().unwrap() - 0.02).abs() < 1e-9);
    }

    #[test]
    fn cpu_at_quota_with_a_queue_building_is_saturated_and_sized_from_arrivals() {
        // One instance serving 50 requests/s (20 ms each): half load teaches the cost.
        let (mut e, mut f) = (SaturationEstimator::new(), Fleet::new(1, 0.02));
        probe(&mut e, &mut f, 5, 25.0, 0.005, None);
        // Then twice what it serves arrives: CPU at quota, the queue grows by 50/s.
        let seen = probe(&mut e, &mut f, 3, 100.0, 0.005, None);
        let last = seen.last().unwrap().expect("a reading");
        assert!(last.saturated, "{last:?}");
        assert!((last.demand_instances - 2.0).abs() < 1e-6, "{last:?}");
        assert!((last.arrival_rps - 100.0).abs() < 1e-6, "{last:?}");
        // The saturated spans taught nothing: the cost is still a request's own.
        assert!((e.request_cost().unwrap() - 0.02).abs() < 1e-9);
    }

    #[test]
    fn a_saturated_start_sizes_demand_from_the_probe_history() {
        // Saturated from the first probe: no unsaturated span teaches the cost, the
        // history's completions give it.
        let (mut e, mut f) = (SaturationEstimator::new(), Fleet::new(1, 0.02));
        let seen = probe(&mut e, &mut f, 3, 100.0, 0.005, None);
        assert_eq!(e.request_cost(), None);
        let last = seen.last().unwrap().expect("a reading");
        assert!(last.saturated, "{last:?}");
        assert!((last.demand_instances - 2.0).abs() < 1e-6, "{last:?}");
    }

    #[test]
    fn a_queue_too_slow_to_count_is_not_saturated() {
        // Ten instances at quota with the queue growing by 4 requests/s: under
        // max(2, ready) per span.
        let (mut e, mut f) = (SaturationEstimator::new(), Fleet::new(10, 1.0));
        let seen = probe(&mut e, &mut f, 5, 14.0, 0.005, None);
        assert!(seen.iter().flatten().all(|s| !s.saturated), "{seen:?}");
        let last = seen.last().unwrap().expect("a reading");
        assert!((last.demand_instances - 14.0).abs() < 1e-6, "{last:?}");
    }

    #[test]
    fn latency_over_its_target_with_a_queue_is_saturated() {
        // Two instances at 60% (CPU not at quota) but slow: 300 ms each against a
        // 250 ms target, with requests piling up on something other than CPU (a
        // downstream wait). The same fleet with a 500 ms target, or none, is not.
        let (mut f, mut e) = (Fleet::new(2, 0.02), Vec::new());
        let targets = [Some(0.25), Some(0.5), None];
        for _ in targets {
            e.push(SaturationEstimator::new());
        }
        let mut last = Vec::new();
        for step in 0..10 {
            if step >= 4 {
                f.waiting += 3.0;
            }
            f.run(0.5, 60.0, 0.3);
            last = e
                .iter_mut()
                .zip(targets)
                .map(|(e, target)| e.observe(f.sample(), &ctx(target)))
                .collect();
            if step < 4 {
                assert!(last.iter().flatten().all(|s| !s.saturated), "{last:?}");
            }
        }
        let saturated: Vec<bool> = last.iter().map(|s| s.unwrap().saturated).collect();
        assert_eq!(saturated, vec![true, false, false], "{last:?}");
        // Sized from the arrivals all the same: 60 requests/s of 20 ms.
        assert!((last[0].unwrap().demand_instances - 1.2).abs() < 1e-6);
    }

    #[test]
    fn too_few_completions_teach_no_cost() {
        // 10 requests/s: 5 per span, 50 over the 5 s history but never 20 in one span.
        let (mut e, mut f) = (SaturationEstimator::new(), Fleet::new(1, 0.02));
        let seen = probe(&mut e, &mut f, 10, 10.0, 0.005, None);
        assert_eq!(e.request_cost(), None);
        // The readings still size the demand (from the history's completions).
        let last = seen.last().unwrap().expect("a reading");
        assert!((last.demand_instances - 0.2).abs() < 1e-6, "{last:?}");
    }

    #[test]
    fn an_instance_leaving_between_probes_is_ignored() {
        let (mut e, mut f) = (SaturationEstimator::new(), Fleet::new(3, 0.02));
        probe(&mut e, &mut f, 3, 75.0, 0.005, None);
        // Instance 2 stops; instance 7 starts (ready, no CPU history yet).
        f.ready.remove(&2);
        f.ready.insert(7, 0.0);
        f.run(0.5, 75.0, 0.005);
        let s = e.observe(f.sample(), &ctx(None)).expect("a reading");
        // Only instances 0 and 1 are compared (each at 50%): neither the one gone nor
        // the new one reads as a drop or a jump; the demand is the arrivals' (1.5).
        assert!(!s.saturated, "{s:?}");
        assert!((s.demand_instances - 1.5).abs() < 1e-6, "{s:?}");
        // With none of the base's instances left there is no reading.
        f.ready = [(8, 0.0)].into_iter().collect();
        f.run(0.5, 75.0, 0.005);
        assert_eq!(e.observe(f.sample(), &ctx(None)), None);
    }

    #[test]
    fn a_shadow_fleet_reads_saturation_as_the_estimator_does() {
        let s = Saturation {
            saturated: false,
            demand_instances: 2.0,
            arrival_rps: 100.0,
        };
        // One instance gets 100 requests/s, serves 50: the queue grows 50/s.
        assert!(saturates(&s, 1));
        assert!(!saturates(&s, 2));
        assert!(!saturates(&s, 0));
        // 14 requests/s on ten instances serving 1/s each grows 4/s: under ten.
        let slow = Saturation {
            saturated: false,
            demand_instances: 14.0,
            arrival_rps: 14.0,
        };
        assert!(!saturates(&slow, 10));
        assert!(saturates(&slow, 4));
    }

    #[test]
    fn bucket_quantiles() {
        let bounds = [0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1];
        let mut c = vec![0u64; bounds.len() + 1];
        assert_eq!(quantile_from_buckets(&bounds, &c, 0.95), None);
        c[2] = 90; // ≤ 2.5 ms
        c[7] = 10; // ≤ 100 ms
        assert_eq!(quantile_from_buckets(&bounds, &c, 0.5), Some(0.0025));
        assert_eq!(quantile_from_buckets(&bounds, &c, 0.95), Some(0.1));
        // Requests over the last bound (+Inf) count: a pile-up of slow requests raises p95.
        c[bounds.len()] = 50;
        assert_eq!(quantile_from_buckets(&bounds, &c, 0.95), Some(0.2));
    }
}
