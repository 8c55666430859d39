//! Health policies: pure state machines the proxy drives with real probes and results.

/// Active health-check thresholds: `rise` consecutive passes make an endpoint healthy, `fall`
/// consecutive failures make it unhealthy (HAProxy's `rise`/`fall`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ActiveHealth {
    rise: u32,
    fall: u32,
    healthy: bool,
    /// Consecutive results disagreeing with `healthy`.
    streak: u32,
}

impl ActiveHealth {
    /// `rise` / `fall` of 0 are treated as 1 (a single result flips the state).
    pub fn new(rise: u32, fall: u32, initially_healthy: bool) -> Self {
        ActiveHealth {
            rise: rise.max(1),
            fall: fall.max(1),
            healthy: initially_healthy,
            streak: 0,
        }
    }

    /// Records one probe result; `Some(new_state)` when this result flips the state.
    pub fn record(&mut self, ok: bool) -> Option<bool> {
        if ok == self.healthy {
            self.streak = 0;
            return None;
        }
        self.streak += 1;
        let threshold = if ok { self.rise } else { self.fall };
        if self.streak < threshold {
            return None;
        }
        self.healthy = ok;
        self.streak = 0;
        Some(ok)
    }

    /// The current state.
    pub fn is_healthy(&self) -> bool {
        self.healthy
    }
}

/// Passive outlier detection thresholds (Envoy's `outlier_detection`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OutlierConfig {
    /// Consecutive errors (connect error or 5xx) that trigger an ejection; 0 disables.
    pub consecutive_errors: u32,
    /// Ejection time for the first ejection; the n-th lasts n × this, and one unit of
    /// `times_ejected` is forgiven per this much time spent not ejected.
    pub base_ejection_nanos: u64,
    /// Cap on a single ejection's duration.
    pub max_ejection_nanos: u64,
}

impl Default for OutlierConfig {
    /// Envoy's defaults: 5 errors, 30 s base, 300 s max.
    fn default() -> Self {
        OutlierConfig {
            consecutive_errors: 5,
            base_ejection_nanos: 30_000_000_000,
            max_ejection_nanos: 300_000_000_000,
        }
    }
}

/// Passive outlier detection (Envoy-style): `consecutive_errors` errors in a row make
/// [`Outlier::record`] return true, and the caller ejects the endpoint with [`Outlier::eject`]
/// if [`allowed_ejections`] permits. Ejection lasts `min(base × times_ejected, max)`, so a
/// flapping endpoint stays out longer each time. A success resets the error streak.
/// `times_ejected` decays by one per `base_ejection_nanos` spent not ejected (Envoy decrements
/// it once per detection interval while the host is not ejected), so an endpoint that
/// recovered for good starts again from the base time.
#[derive(Debug, Clone)]
pub struct Outlier {
    cfg: OutlierConfig,
    errors: u32,
    times_ejected: u32,
    /// Ejected while `now < ejected_until`.
    ejected_until: u64,
    /// Start of the not-ejected time not yet credited to decay.
    decay_from: u64,
}

impl Outlier {
    /// A healthy endpoint that has never been ejected.
    pub fn new(cfg: OutlierConfig) -> Self {
        Outlier {
            cfg,
            errors: 0,
            times_ejected: 0,
            ejected_until: 0,
            decay_from: 0,
        }
    }

    /// Records one request result at `now`. True when this result reached the error threshold
    /// and the endpoint is not ejected yet: the caller should eject it if allowed. If it
    /// could not, every further error returns true again, so it is ejected once room frees.
    pub fn record(&mut self, success: bool, now: u64) -> bool {
        self.decay(now);
        if success {
            self.errors = 0;
            return false;
        }
        self.errors = self.errors.saturating_add(1);
        self.cfg.consecutive_errors > 0
            && self.errors >= self.cfg.consecutive_errors
            && !self.is_ejected(now)
    }

    /// Ejects at `now`: `times_ejected += 1`, ejected until `now + min(base × times, max)`.
    /// The error streak restarts so the endpoint gets a full allowance once it is back.
    pub fn eject(&mut self, now: u64) {
        self.decay(now);
        self.times_ejected = self.times_ejected.saturating_add(1);
        let duration = self
            .cfg
            .base_ejection_nanos
            .saturating_mul(u64::from(self.times_ejected))
            .min(self.cfg.max_ejection_nanos);
        self.ejected_until = now.saturating_add(duration);
        self.decay_from = self.ejected_until;
        self.errors = 0;
    }

    /// Whether the endpoint is out of rotation at `now`.
    pub fn is_ejected(&self, now: u64) -> bool {
        now < self.ejected_until
    }

    /// When the current (or last) ejection ends; None if never ejected.
    pub fn ejected_until(&self) -> Option<u64> {
        (self.times_ejected > 0 || self.ejected_until > 0).then_some(self.ejected_until)
    }

    /// Ejections not yet forgiven by the decay; the next ejection lasts one base longer.
    pub fn times_ejected(&self) -> u32 {
        self.times_ejected
    }

    /// Forgives one ejection per whole `base_ejection_nanos` of not-ejected time.
    fn decay(&mut self, now: u64) {
        let period = self.cfg.base_ejection_nanos;
        if self.times_ejected == 0 || period == 0 || now <= self.decay_from {
            return;
        }
        let periods = (now - self.decay_from) / period;
        let forgiven = periods.min(u64::from(self.times_ejected)) as u32;
        self.times_ejected -= forgiven;
        self.decay_from += periods * period;
    }
}

/// How many endpoints of `total` may be ejected at once under `max_percent`.
///
/// Envoy ejects while the ejected share is *below* the limit, which amounts to
/// `ceil(total × max_percent / 100)`: 10% of 3 endpoints still allows one ejection, so small
/// pools get outlier detection at all. Unlike Envoy (which relies on its panic threshold) the
/// result is capped at `total − 1`: the last endpoint is never ejected, because routing to a
/// suspect endpoint beats answering every request with 503. `max_percent` above 100 counts
/// as 100.
pub fn allowed_ejections(total: usize, max_percent: u32) -> usize {
    let pct = u64::from(max_percent.min(100));
    let by_percent = (total as u64 * pct).div_ceil(100) as usize;
    by_percent.min(total.saturating_sub(1))
}

/// Slow start: the effective weight `since_ready_nanos` after an endpoint became ready,
/// ramping linearly from 10% of `weight` (at least 1) to `weight` over `window_nanos`, so a
/// cold instance (empty caches, JIT) is not flooded the moment it passes health checks.
/// A zero window or an elapsed one gives the full weight; weight 0 stays 0.
pub fn slow_start_weight(weight: u32, since_ready_nanos: u64, window_nanos: u64) -> u32 {
    if weight == 0 || since_ready_nanos >= window_nanos {
        return weight;
    }
    // Envoy's default min_weight_percent: starting at 0 would never send the first request.
    let since = u128::from(since_ready_nanos.max(window_nanos / 10));
    let ramped = u128::from(weight) * since / u128::from(window_nanos);
    (ramped as u32).max(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn active_health_rise_and_fall() {
        let mut h = ActiveHealth::new(2, 3, false);
        assert!(!h.is_healthy());
        assert_eq!(h.record(true), None);
        assert_eq!(h.record(false), None); // a failure breaks the rise streak
        assert_eq!(h.record(true), None);
        assert_eq!(h.record(true), Some(true));
        assert!(h.is_healthy());
        assert_eq!(h.record(true), None);
        assert_eq!(h.record(false), None);
        assert_eq!(h.record(false), None);
        assert_eq!(h.record(true), None); // a pass breaks the fall streak
        assert_eq!(h.record(false), None);
        assert_eq!(h.record(false), None);
        assert_eq!(h.record(false), Some(false));
        assert!(!h.is_healthy());
        assert_eq!(h.record(false), None);

        let mut h = ActiveHealth::new(0, 0, true);
        assert_eq!(h.record(false), Some(false));
        assert_eq!(h.record(true), Some(true));
    }

    const S: u64 = 1_000_000_000;

    fn cfg() -> OutlierConfig {
        OutlierConfig {
            consecutive_errors: 3,
            base_ejection_nanos: 30 * S,
            max_ejection_nanos: 100 * S,
        }
    }

    #[test]
    fn outlier_threshold_and_reset_on_success() {
        let mut o = Outlier::new(cfg());
        assert!(!o.record(false, 0));
        assert!(!o.record(false, 0));
        assert!(!o.record(true, 0)); // resets the streak
        assert!(!o.record(false, 0));
        assert!(!o.record(false, 0));
        assert!(o.record(false, 0));
        // Ejection refused by the caller: the next error asks again.
        assert!(o.record(false, 0));
        assert_eq!(o.ejected_until(), None);
        o.eject(0);
        assert!(o.is_ejected(0) && o.is_ejected(30 * S - 1) && !o.is_ejected(30 * S));
        // While ejected, late results of in-flight requests do not re-trigger.
        for _ in 0..5 {
            assert!(!o.record(false, S));
        }
    }

    #[test]
    fn outlier_ejection_grows_and_caps() {
        let mut o = Outlier::new(cfg());
        let mut now = 0;
        for (times, secs) in [(1, 30), (2, 60), (3, 90), (4, 100), (5, 100)] {
            for _ in 0..2 {
                assert!(!o.record(false, now));
            }
            assert!(o.record(false, now));
            o.eject(now);
            assert_eq!(o.times_ejected(), times);
            assert_eq!(o.ejected_until(), Some(now + secs * S));
            assert!(o.is_ejected(now + secs * S - 1));
            // Back right at the end of the ejection: no time to decay.
            now += secs * S;
            assert!(!o.is_ejected(now));
        }
    }

    #[test]
    fn outlier_times_ejected_decays_while_healthy() {
        let mut o = Outlier::new(cfg());
        o.eject(0);
        o.eject(30 * S);
        assert_eq!(o.times_ejected(), 2);
        let back = 30 * S + 60 * S;
        assert!(!o.record(true, back + 29 * S));
        assert_eq!(o.times_ejected(), 2);
        assert!(!o.record(true, back + 30 * S));
        assert_eq!(o.times_ejected(), 1);
        assert!(!o.record(false, back + 1000 * S));
        assert_eq!(o.times_ejected(), 0);
        o.eject(back + 1000 * S);
        assert_eq!(o.ejected_until(), Some(back + 1030 * S));
    }

    #[test]
    fn outlier_disabled_with_zero_threshold() {
        let mut o = Outlier::new(OutlierConfig {
            consecutive_errors: 0,
            ..OutlierConfig::default()
        });
        assert!((0..100).all(|t| !o.record(false, t)));
    }

    #[test]
    fn allowed_ejections_rounding() {
        assert_eq!(allowed_ejections(0, 10), 0);
        assert_eq!(allowed_ejections(1, 100), 0);
        assert_eq!(allowed_ejections(2, 10), 1);
        assert_eq!(allowed_ejections(3, 10), 1);
        assert_eq!(allowed_ejections(10, 10), 1);
        assert_eq!(allowed_ejections(11, 10), 2);
        assert_eq!(allowed_ejections(10, 50), 5);
        assert_eq!(allowed_ejections(10, 0), 0);
        assert_eq!(allowed_ejections(4, 100), 3);
        assert_eq!(allowed_ejections(4, 1000), 3);
    }

    #[test]
    fn slow_start_ramp() {
        let w = |since| slow_start_weight(100, since, 1000);
        assert_eq!(w(0), 10);
        assert_eq!(w(100), 10);
        assert_eq!(w(500), 50);
        assert_eq!(w(999), 99);
        assert_eq!(w(1000), 100);
        assert_eq!(w(5000), 100);
        let mut last = 0;
        for since in (0..=1000).step_by(7) {
            assert!(w(since) >= last);
            last = w(since);
        }
        assert_eq!(slow_start_weight(100, 0, 0), 100);
        assert_eq!(slow_start_weight(3, 0, 1000), 1);
        assert_eq!(slow_start_weight(0, 0, 1000), 0);
        assert_eq!(slow_start_weight(u32::MAX, 500, 1000), u32::MAX / 2);
    }
}
