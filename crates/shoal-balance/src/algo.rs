//! The non-hashing selectors, plus the shared rotation cursor and lock-free RNG.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Mutex;

use crate::{mix64, Endpoint, Selector};

/// Lock-free SplitMix64: one atomic add per draw, so concurrent pickers never block each
/// other. Deterministic for a single thread; interleaved threads share one sequence.
#[derive(Debug)]
pub(crate) struct SplitMix(AtomicU64);

impl SplitMix {
    const GAMMA: u64 = 0x9e37_79b9_7f4a_7c15;

    pub(crate) fn new(seed: u64) -> Self {
        SplitMix(AtomicU64::new(seed))
    }

    pub(crate) fn next_u64(&self) -> u64 {
        let s = self.0.fetch_add(Self::GAMMA, Ordering::Relaxed);
        mix64(s.wrapping_add(Self::GAMMA))
    }

    /// Uniform in `0..n` (n > 0) by Lemire's multiply-shift; bias below n / 2^64.
    pub(crate) fn below(&self, n: u64) -> u64 {
        ((u128::from(self.next_u64()) * u128::from(n)) >> 64) as u64
    }
}

/// Indices of nonzero-weight endpoints (weight 0 means "never pick").
fn active(endpoints: &[Endpoint]) -> Box<[usize]> {
    (0..endpoints.len())
        .filter(|&i| endpoints[i].weight > 0)
        .collect()
}

/// Round-robin cursor over the nonzero-weight endpoints, shared by every picker thread.
#[derive(Debug)]
pub(crate) struct Rotation {
    active: Box<[usize]>,
    next: AtomicUsize,
}

impl Rotation {
    /// `seed` picks the starting point so that many proxies rebuilding at once do not all
    /// send their first request to endpoint 0.
    pub(crate) fn new(endpoints: &[Endpoint], seed: u64) -> Self {
        let active = active(endpoints);
        let start = mix64(seed) % (active.len().max(1) as u64);
        Rotation {
            active,
            next: AtomicUsize::new(start as usize),
        }
    }

    pub(crate) fn active(&self) -> &[usize] {
        &self.active
    }

    /// The next endpoint in rotation, walking past skipped ones.
    pub(crate) fn pick(&self, skip: &dyn Fn(usize) -> bool) -> Option<usize> {
        let n = self.active.len();
        if n == 0 {
            return None;
        }
        let start = self.next.fetch_add(1, Ordering::Relaxed) % n;
        self.active[start..]
            .iter()
            .chain(&self.active[..start])
            .copied()
            .find(|&i| !skip(i))
    }
}

/// `round-robin`: plain rotation that ignores weights (except 0).
#[derive(Debug)]
pub(crate) struct RoundRobin(Rotation);

impl RoundRobin {
    pub(crate) fn new(endpoints: &[Endpoint], seed: u64) -> Self {
        RoundRobin(Rotation::new(endpoints, seed))
    }
}

impl Selector for RoundRobin {
    fn pick(&self, _key: Option<&[u8]>, _now: u64, skip: &dyn Fn(usize) -> bool) -> Option<usize> {
        self.0.pick(skip)
    }
}

/// `weighted-round-robin`: nginx's smooth weighted round robin. Every pick adds each
/// candidate's weight to its `current`, takes the largest and subtracts the round's total from
/// it, which interleaves heavy endpoints instead of sending them bursts (5,1,1 gives
/// a a b a c a a). The state is a short critical section under a mutex.
#[derive(Debug)]
pub(crate) struct SmoothWeighted {
    weights: Box<[u32]>,
    current: Mutex<Vec<i64>>,
}

impl SmoothWeighted {
    pub(crate) fn new(endpoints: &[Endpoint]) -> Self {
        SmoothWeighted {
            weights: endpoints.iter().map(|e| e.weight).collect(),
            current: Mutex::new(vec![0; endpoints.len()]),
        }
    }
}

impl Selector for SmoothWeighted {
    fn pick(&self, _key: Option<&[u8]>, _now: u64, skip: &dyn Fn(usize) -> bool) -> Option<usize> {
        // A panic in `skip` poisons the mutex; the counters are still consistent enough.
        let mut current = self.current.lock().unwrap_or_else(|e| e.into_inner());
        let mut total = 0i64;
        let mut best: Option<usize> = None;
        for (i, &w) in self.weights.iter().enumerate() {
            // Like nginx on retry, skipped endpoints sit this round out entirely.
            if w == 0 || skip(i) {
                continue;
            }
            current[i] += i64::from(w);
            total += i64::from(w);
            match best {
                Some(b) if current[i] <= current[b] => {}
                _ => best = Some(i),
            }
        }
        let best = best?;
        current[best] -= total;
        Some(best)
    }
}

/// `least-connections`: lowest `in_flight / weight`, ties broken uniformly at random
/// (reservoir sampling) so an idle pool spreads evenly instead of favouring low indices.
#[derive(Debug)]
pub(crate) struct LeastConnections {
    endpoints: Vec<Endpoint>,
    active: Box<[usize]>,
    rng: SplitMix,
}

impl LeastConnections {
    pub(crate) fn new(endpoints: Vec<Endpoint>, seed: u64) -> Self {
        LeastConnections {
            active: active(&endpoints),
            endpoints,
            rng: SplitMix::new(seed),
        }
    }
}

impl Selector for LeastConnections {
    fn pick(&self, _key: Option<&[u8]>, _now: u64, skip: &dyn Fn(usize) -> bool) -> Option<usize> {
        // One shared atomic draw per pick; tie draws come from a thread-local stream.
        let mut local = self.rng.next_u64();
        let mut best: Option<(usize, u128, u128)> = None;
        let mut ties = 0u64;
        for &i in self.active.iter() {
            if skip(i) {
                continue;
            }
            let ep = &self.endpoints[i];
            let (load, weight) = (u128::from(ep.load.in_flight()), u128::from(ep.weight));
            // Compare load/weight with best_load/best_weight, cross-multiplied in integers.
            let order = best.map(|(_, bl, bw)| (load * bw).cmp(&(bl * weight)));
            match order {
                Some(std::cmp::Ordering::Greater) => {}
                Some(std::cmp::Ordering::Equal) => {
                    // Keep each of the k tied candidates with probability 1/k.
                    ties += 1;
                    local = local.wrapping_add(SplitMix::GAMMA);
                    if (u128::from(mix64(local)) * u128::from(ties)) >> 64 == 0 {
                        best = Some((i, load, weight));
                    }
                }
                _ => {
                    best = Some((i, load, weight));
                    ties = 1;
                }
            }
        }
        best.map(|(i, _, _)| i)
    }
}

/// `random`: weighted random over prefix sums of the nonzero weights.
#[derive(Debug)]
pub(crate) struct WeightedRandom {
    active: Box<[usize]>,
    /// `cumulative[k]` = sum of the weights of `active[..=k]`.
    cumulative: Box<[u64]>,
    rng: SplitMix,
}

impl WeightedRandom {
    /// Draws before falling back to the exact scan over non-skipped endpoints.
    const REJECTION_TRIES: usize = 3;

    pub(crate) fn new(endpoints: &[Endpoint], seed: u64) -> Self {
        let active = active(endpoints);
        let cumulative = active
            .iter()
            .scan(0u64, |sum, &i| {
                *sum += u64::from(endpoints[i].weight);
                Some(*sum)
            })
            .collect();
        WeightedRandom {
            active,
            cumulative,
            rng: SplitMix::new(seed),
        }
    }

    fn weight_at(&self, k: usize) -> u64 {
        self.cumulative[k] - if k == 0 { 0 } else { self.cumulative[k - 1] }
    }
}

impl Selector for WeightedRandom {
    fn pick(&self, _key: Option<&[u8]>, _now: u64, skip: &dyn Fn(usize) -> bool) -> Option<usize> {
        let total = *self.cumulative.last()?;
        // Rejection sampling is exact (conditioned on acceptance) and O(log n) when few
        // endpoints are skipped; the O(n) scan below is exact too, so the mix stays weighted.
        for _ in 0..Self::REJECTION_TRIES {
            let r = self.rng.below(total);
            let i = self.active[self.cumulative.partition_point(|&c| c <= r)];
            if !skip(i) {
                return Some(i);
            }
        }
        let eligible = |k: &usize| !skip(self.active[*k]);
        let rest: u64 = (0..self.active.len())
            .filter(eligible)
            .map(|k| self.weight_at(k))
            .sum();
        if rest == 0 {
            return None;
        }
        let mut r = self.rng.below(rest);
        for k in (0..self.active.len()).filter(eligible) {
            let w = self.weight_at(k);
            if r < w {
                return Some(self.active[k]);
            }
            r -= w;
        }
        // Only reachable if `skip` changed its answers between the two scans.
        None
    }
}

/// `p2c-ewma`: two distinct uniformly random candidates, keep the lower [`crate::Load::cost`].
/// Weights are ignored except that weight 0 is never picked.
#[derive(Debug)]
pub(crate) struct P2cEwma {
    endpoints: Vec<Endpoint>,
    active: Box<[usize]>,
    rng: SplitMix,
}

impl P2cEwma {
    pub(crate) fn new(endpoints: Vec<Endpoint>, seed: u64) -> Self {
        P2cEwma {
            active: active(&endpoints),
            endpoints,
            rng: SplitMix::new(seed),
        }
    }

    /// First position at or after `from` (cyclically) that is not `except` and not skipped.
    fn walk(
        &self,
        from: usize,
        except: Option<usize>,
        skip: &dyn Fn(usize) -> bool,
    ) -> Option<usize> {
        let n = self.active.len();
        (from..n)
            .chain(0..from)
            .find(|&k| Some(k) != except && !skip(self.active[k]))
    }
}

impl Selector for P2cEwma {
    fn pick(&self, _key: Option<&[u8]>, now: u64, skip: &dyn Fn(usize) -> bool) -> Option<usize> {
        let n = self.active.len() as u64;
        if n == 0 {
            return None;
        }
        let a = self.walk(self.rng.below(n) as usize, None, skip)?;
        if n == 1 {
            return Some(self.active[a]);
        }
        // A second draw from the n-1 other positions keeps the pair distinct.
        let mut b = self.rng.below(n - 1) as usize;
        if b >= a {
            b += 1;
        }
        let (a, b) = match self.walk(b, Some(a), skip) {
            Some(b) => (self.active[a], self.active[b]),
            None => return Some(self.active[a]),
        };
        let cost = |i: usize| self.endpoints[i].load.cost(now);
        Some(if cost(b) < cost(a) { b } else { a })
    }
}
