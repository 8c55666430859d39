//! Per-endpoint live load: in-flight count and a peak-EWMA latency estimate.

use std::sync::atomic::{AtomicU64, Ordering};

/// RTT assumed for an endpoint with no samples yet (linkerd's default): low enough that new
/// endpoints get tried, high enough that they do not swallow a burst before the first reply.
pub const DEFAULT_RTT_NANOS: f64 = 30_000_000.0;

/// Time constant τ of the EWMA, in nanoseconds (linkerd and tower use 10 s). A sample `Δ` after
/// the previous one has weight `1 − e^(−Δ/τ)`; an idle estimate loses 63% of its value per τ.
pub const DECAY_NANOS: f64 = 10_000_000_000.0;

/// `rtt_bits` before the first sample. u64::MAX is a NaN pattern no arithmetic produces.
const UNSET: u64 = u64::MAX;

/// Live load of one endpoint. Owned by the caller (keyed by endpoint id) and shared by every
/// selector built over that endpoint, so in-flight counts and latency estimates survive
/// membership changes and selector rebuilds. All methods are lock-free.
///
/// The latency estimate follows tower's `peak_ewma.rs`: a sample above the current estimate
/// replaces it at once (react to slowness immediately), a lower one is blended in with weight
/// `1 − e^(−Δ/τ)`, and between samples the estimate decays toward zero like tower's `load()`
/// does, so an endpoint penalised for a latency spike is retried after a few τ instead of
/// being starved forever. Unlike tower, reading ([`Load::cost`]) never writes.
#[derive(Debug)]
pub struct Load {
    in_flight: AtomicU64,
    /// f64 estimate in nanoseconds as of `updated_at`, or `UNSET`.
    rtt_bits: AtomicU64,
    /// `now` of the last sample.
    updated_at: AtomicU64,
}

impl Default for Load {
    fn default() -> Self {
        Self::new()
    }
}

impl Load {
    /// No requests in flight and no latency samples.
    pub fn new() -> Self {
        Load {
            in_flight: AtomicU64::new(0),
            rtt_bits: AtomicU64::new(UNSET),
            updated_at: AtomicU64::new(0),
        }
    }

    /// A request was sent to this endpoint.
    pub fn start(&self) {
        self.in_flight.fetch_add(1, Ordering::Relaxed);
    }

    /// A request finished after `rtt_nanos`; `now` is the finish time. Updates peak-EWMA.
    pub fn finish(&self, rtt_nanos: u64, now: u64) {
        self.cancel();
        self.observe(rtt_nanos as f64, now);
    }

    /// A request ended without a meaningful latency (e.g. the client went away): only the
    /// in-flight count drops.
    pub fn cancel(&self) {
        // Saturating, so an unbalanced finish cannot wrap the count to 2^64.
        let _ = self
            .in_flight
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| n.checked_sub(1));
    }

    /// Requests started and not yet finished or cancelled.
    pub fn in_flight(&self) -> u64 {
        self.in_flight.load(Ordering::Relaxed)
    }

    /// The latency estimate at `now` in nanoseconds ([`DEFAULT_RTT_NANOS`] before any sample).
    pub fn rtt_estimate(&self, now: u64) -> f64 {
        let bits = self.rtt_bits.load(Ordering::Acquire);
        if bits == UNSET {
            return DEFAULT_RTT_NANOS;
        }
        let at = self.updated_at.load(Ordering::Acquire);
        f64::from_bits(bits) * decay(now.saturating_sub(at))
    }

    /// Peak-EWMA cost at `now`: latency estimate (decayed toward the newest sample, jumping up
    /// at once on a slower sample) × (in_flight + 1). An endpoint with no samples yet uses a
    /// default RTT so that new endpoints get tried.
    pub fn cost(&self, now: u64) -> f64 {
        self.rtt_estimate(now) * (self.in_flight() + 1) as f64
    }

    fn observe(&self, rtt: f64, now: u64) {
        // Estimate and timestamp are two atomics: a concurrent finish may pair a new estimate
        // with the previous timestamp for a moment, which only misweights one sample slightly.
        let mut bits = self.rtt_bits.load(Ordering::Acquire);
        loop {
            let next = if bits == UNSET {
                rtt
            } else {
                let elapsed = now.saturating_sub(self.updated_at.load(Ordering::Acquire));
                let d = decay(elapsed);
                let current = f64::from_bits(bits) * d;
                if rtt > current {
                    rtt
                } else {
                    current * d + rtt * (1.0 - d)
                }
            };
            match self.rtt_bits.compare_exchange_weak(
                bits,
                next.to_bits(),
                Ordering::AcqRel,
                Ordering::Acquire,
            ) {
                Ok(_) => break,
                Err(actual) => bits = actual,
            }
        }
        self.updated_at.fetch_max(now, Ordering::AcqRel);
    }
}

/// `e^(−elapsed/τ)`.
fn decay(elapsed_nanos: u64) -> f64 {
    (-(elapsed_nanos as f64) / DECAY_NANOS).exp()
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: u64 = 1_000_000;

    #[test]
    fn in_flight_counts_and_saturates() {
        let l = Load::default();
        l.start();
        l.start();
        assert_eq!(l.in_flight(), 2);
        l.finish(MS, 10 * MS);
        l.cancel();
        l.cancel();
        assert_eq!(l.in_flight(), 0);
    }

    #[test]
    fn default_rtt_before_samples() {
        let l = Load::new();
        assert_eq!(l.cost(123), DEFAULT_RTT_NANOS);
        l.start();
        assert_eq!(l.cost(123), 2.0 * DEFAULT_RTT_NANOS);
    }

    #[test]
    fn peak_jumps_up_and_decays_down() {
        let l = Load::new();
        let t0 = 1_000 * MS;
        l.start();
        l.finish(10 * MS, t0);
        assert_eq!(l.rtt_estimate(t0), 10.0 * MS as f64);
        l.start();
        l.finish(100 * MS, t0 + MS);
        // A slower sample replaces the estimate at once.
        assert_eq!(l.rtt_estimate(t0 + MS), 100.0 * MS as f64);
        // A faster one 1 ms later barely moves it.
        l.start();
        l.finish(10 * MS, t0 + 2 * MS);
        let e = l.rtt_estimate(t0 + 2 * MS);
        assert!(e > 99.0 * MS as f64 && e < 100.0 * MS as f64, "{e}");
        // One τ of idleness: ~37% left.
        let idle = l.rtt_estimate(t0 + 2 * MS + DECAY_NANOS as u64);
        assert!((idle / e - (-1.0f64).exp()).abs() < 1e-9);
        // A fast sample after a long gap dominates.
        l.start();
        l.finish(10 * MS, t0 + 100_000 * MS);
        let e = l.rtt_estimate(t0 + 100_000 * MS);
        assert!((e - 10.0 * MS as f64).abs() < 0.01 * MS as f64, "{e}");
    }

    #[test]
    fn clock_going_backwards_is_harmless() {
        let l = Load::new();
        l.finish(5 * MS, 100 * MS);
        l.finish(5 * MS, 50 * MS);
        assert!(l.cost(0).is_finite());
        assert_eq!(l.rtt_estimate(0), 5.0 * MS as f64);
    }
}
