//! Picking an instance and trying it: the retry budget, per-request try bookkeeping (instances
//! tried, deadlines), the in-flight guard, and what a finished try records (latency sample,
//! status and error counts, passive health, the duration metric). Both request paths use it.

use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::config::{HashKey, ServiceConfig};
use crate::error::ProxyError;
use crate::pool::{now_nanos, ErrorKind, Instance, Snapshot, State};
use crate::proxy::Service;
use shoal_balance::Algorithm;

/// Retry budget (linkerd/Envoy-style): each request deposits `percent`/100 of a token into a
/// bucket that decays over ~10 s (so only recent traffic counts), a floor bucket refills at
/// `min_per_sec` (holding at most one second's worth), and a retry takes one token.
#[derive(Debug)]
pub struct RetryBudget {
    state: Mutex<BudgetState>,
}

#[derive(Debug)]
struct BudgetState {
    ratio: f64,
    floor: f64,
    last: u64,
    /// The floor starts with a second's worth banked, so a process that just started (or a
    /// service just added) can retry at once.
    primed: bool,
}

impl RetryBudget {
    pub fn new(now: u64) -> Self {
        RetryBudget {
            state: Mutex::new(BudgetState {
                ratio: 0.0,
                floor: 0.0,
                last: now,
                primed: false,
            }),
        }
    }

    fn advance(s: &mut BudgetState, min_per_sec: f64, now: u64) {
        if !s.primed {
            s.primed = true;
            s.floor = min_per_sec;
        }
        let dt = now.saturating_sub(s.last) as f64 / 1e9;
        // Under load this runs per request; decaying once a millisecond is plenty.
        if dt > 1e-3 {
            s.last = now;
            s.ratio *= (-dt / 10.0).exp();
            s.floor = (s.floor + dt * min_per_sec).min(min_per_sec.max(1.0));
        }
    }

    pub fn deposit(&self, percent: f64, min_per_sec: f64, now: u64) {
        let mut s = self.state.lock().expect("budget lock");
        Self::advance(&mut s, min_per_sec, now);
        s.ratio += percent / 100.0;
    }

    /// Takes one retry token at `now` if there is one.
    pub fn try_withdraw(&self, min_per_sec: f64, now: u64) -> bool {
        let mut s = self.state.lock().expect("budget lock");
        Self::advance(&mut s, min_per_sec, now);
        // The epsilon absorbs float error in sums like 10 × 0.2.
        if s.floor >= 1.0 - 1e-9 {
            s.floor -= 1.0;
        } else if s.ratio >= 1.0 - 1e-9 {
            s.ratio -= 1.0;
        } else {
            return false;
        }
        true
    }
}

/// Retry bookkeeping shared by both request paths: instances already tried, the snapshot
/// they were picked from, and the request's time limits.
pub(crate) struct Tries {
    /// A retry may go back to an instance already tried once every one was (set after a
    /// connect failure or a retryable gRPC status: nothing was processed there).
    pub(crate) revisit: bool,
    tried: [usize; 10],
    snapshot: Arc<Snapshot>,
    start: u64,
    deadline: u64,
    per_try: Duration,
}

/// One try: its instance (counted in flight on it), when it started and how long it may take.
pub(crate) struct Try {
    pub(crate) inst: Arc<Instance>,
    pub(crate) busy: InFlight,
    pub(crate) started: u64,
    pub(crate) timeout: Duration,
}

impl Tries {
    /// Whether the request's time is up.
    pub(crate) fn past_deadline(&self) -> bool {
        now_nanos() >= self.deadline
    }
}

impl Service {
    /// Starts a request's tries: its deposit into the retry budget.
    pub(crate) fn begin_tries(&self, cfg: &ServiceConfig, start: u64) -> Tries {
        self.budget.deposit(
            cfg.retries.budget_percent,
            cfg.retries.budget_min_per_second,
            start,
        );
        Tries {
            revisit: false,
            tried: [usize::MAX; 10],
            snapshot: self.pool.snapshot_full(),
            start,
            deadline: start + cfg.timeouts.request.0.as_nanos() as u64,
            per_try: cfg.timeouts.per_try.0,
        }
    }

    /// Try number `attempt`: `Ok(None)` when a retry finds the budget spent or no untried
    /// instance is left, `Err(Timeout)` when the request's time is up.
    pub(crate) fn next_try(
        &self,
        t: &mut Tries,
        attempt: u32,
        cfg: &ServiceConfig,
        key: Option<&[u8]>,
    ) -> Result<Option<Try>, ProxyError> {
        if attempt > 0 {
            if !self
                .budget
                .try_withdraw(cfg.retries.budget_min_per_second, now_nanos())
            {
                self.metrics.retry_budget_exhausted.inc();
                return Ok(None);
            }
            self.metrics.retries.inc();
        }
        let now = if attempt == 0 { t.start } else { now_nanos() };
        let Some((idx, inst, busy)) =
            self.pick_live(&mut t.snapshot, &mut t.tried, key, now, t.revisit)
        else {
            return Ok(None);
        };
        t.tried[attempt as usize] = idx;
        let remaining = t.deadline.saturating_sub(now);
        if remaining == 0 {
            return Err(ProxyError::Timeout);
        }
        Ok(Some(Try {
            inst,
            busy,
            started: now,
            timeout: t.per_try.min(Duration::from_nanos(remaining)),
        }))
    }

    /// Records how a try ended at `answered`: the latency sample, the status or error count,
    /// passive health, and for an answer the request's time to response headers. A try the
    /// client broke (`Err(None)`: malformed or cut-short body, too slow) is nobody's latency
    /// and no mark against the instance.
    pub(crate) fn end_try(
        &self,
        tries: &Tries,
        t: &mut Try,
        answered: u64,
        outcome: Result<u16, Option<ErrorKind>>,
    ) {
        let outcome = match outcome {
            Err(None) => {
                // Counted as a client error where the answer is made.
                t.busy.headers_received(answered);
                return;
            }
            Ok(s) => Ok(s),
            Err(Some(k)) => Err(k),
        };
        // A failed try is a slow one as far as latency-aware balancing is concerned: a
        // refused connect must not make an instance look fast.
        let penalty = (t.timeout.as_nanos() as u64).min(5_000_000_000);
        t.busy.headers_received(match outcome {
            Ok(_) => answered,
            Err(_) => answered.max(t.started + penalty),
        });
        match outcome {
            Ok(status) => {
                t.inst.metrics.codes.inc(status);
                self.pool.record_result(&t.inst, status < 500, answered);
                self.metrics
                    .duration
                    .observe_nanos(answered.saturating_sub(tries.start));
            }
            Err(kind) => {
                t.inst.metrics.errors[kind as usize].inc();
                self.pool.record_result(&t.inst, false, answered);
            }
        }
    }

    /// Picks an instance not yet tried and counts the request in flight on it. A pick from a
    /// snapshot that predates the instance's drain is retried on the current snapshot, so a
    /// draining instance never gets a new request after `Pool::remove` saw it idle.
    fn pick_live(
        &self,
        snapshot: &mut Arc<Snapshot>,
        tried: &mut [usize; 10],
        key: Option<&[u8]>,
        now: u64,
        revisit: bool,
    ) -> Option<(usize, Arc<Instance>, InFlight)> {
        for _ in 0..3 {
            let t = *tried;
            // Another instance than those tried, else (every one tried, and `revisit`) any.
            let idx = snapshot
                .selector
                .pick(key, now, &|i| t.contains(&i))
                .or_else(|| {
                    revisit
                        .then(|| snapshot.selector.pick(key, now, &|_| false))
                        .flatten()
                })?;
            let inst = snapshot.instances[idx].clone();
            let busy = InFlight::start(inst.clone(), now);
            // Pairs with the fence in `Pool::remove`.
            std::sync::atomic::fence(std::sync::atomic::Ordering::SeqCst);
            if inst.state() != State::Draining {
                return Some((idx, inst, busy));
            }
            drop(busy);
            *snapshot = self.pool.snapshot_full();
            // Indexes of the old snapshot mean nothing in the new one.
            *tried = [usize::MAX; 10];
        }
        None
    }
}

/// One request in flight to an instance: `Load::start` now, `Load::finish` on drop with the
/// time to response headers (or the time until the drop, if headers never came).
pub struct InFlight {
    inst: Arc<Instance>,
    sent: u64,
    rtt: Option<u64>,
}

impl InFlight {
    pub(crate) fn start(inst: Arc<Instance>, now: u64) -> Self {
        inst.load.start();
        InFlight {
            inst,
            sent: now,
            rtt: None,
        }
    }

    pub(crate) fn inst(&self) -> &Arc<Instance> {
        &self.inst
    }

    /// Records the latency sample at `now`.
    pub(crate) fn headers_received(&mut self, now: u64) {
        self.rtt = Some(now.saturating_sub(self.sent));
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        // The sample is the time to response headers; the clock is read again only for
        // tries that never got headers.
        let (rtt, at) = match self.rtt {
            Some(rtt) => (rtt, self.sent + rtt),
            None => {
                let now = now_nanos();
                (now.saturating_sub(self.sent), now)
            }
        };
        self.inst.load.finish(rtt, at);
    }
}

/// The balancing key for ip-hash / consistent-hash (none for other algorithms): the
/// configured header's first value, looked up by `header`, else the client IP.
pub(crate) fn hash_key<'a>(
    cfg: &ServiceConfig,
    peer: SocketAddr,
    header: impl FnOnce(&str) -> Option<&'a [u8]>,
) -> Option<Vec<u8>> {
    if !matches!(cfg.balance, Algorithm::IpHash | Algorithm::ConsistentHash) {
        return None;
    }
    let from_header = match &cfg.hash_key {
        HashKey::ClientIp => None,
        HashKey::Header(name) => header(name.as_str()),
    };
    Some(match (from_header, peer.ip()) {
        (Some(v), _) => v.to_vec(),
        (None, IpAddr::V4(v)) => v.octets().to_vec(),
        (None, IpAddr::V6(v)) => v.octets().to_vec(),
    })
}

/// Methods a retry may resend after the request went out.
pub(crate) fn is_idempotent(m: &str) -> bool {
    matches!(m, "GET" | "HEAD" | "OPTIONS" | "PUT" | "DELETE" | "TRACE")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_new_budget_has_a_second_of_the_floor() {
        let t0 = 1_000_000_000;
        let b = RetryBudget::new(t0);
        assert_eq!((0..20).filter(|_| b.try_withdraw(10.0, t0)).count(), 10);
    }

    #[test]
    fn retry_budget_limits_retries() {
        let t0 = 1_000_000_000;
        let b = RetryBudget::new(t0);
        // No deposits and no time passed: the floor rate has not refilled anything yet.
        assert!(!b.try_withdraw(0.0, t0));
        for _ in 0..10 {
            b.deposit(20.0, 0.0, t0);
        }
        // 10 requests at 20% → 2 retries.
        assert!(b.try_withdraw(0.0, t0));
        assert!(b.try_withdraw(0.0, t0));
        assert!(!b.try_withdraw(0.0, t0));
        // The floor: 10 per second, at most one second banked.
        let t1 = t0 + 500_000_000;
        for _ in 0..5 {
            assert!(b.try_withdraw(10.0, t1));
        }
        assert!(!b.try_withdraw(10.0, t1));
        let t2 = t1 + 60_000_000_000;
        assert_eq!((0..20).filter(|_| b.try_withdraw(10.0, t2)).count(), 10);
    }
}
