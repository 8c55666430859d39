//! `ip-hash` and `consistent-hash`: a weighted Maglev lookup table (Eisenbud et al., NSDI '16,
//! with Envoy's weighting). Lookup is one hash and one array read; adding or removing one of
//! n endpoints moves about 1/n of the keys.

use std::fmt;

use crate::algo::Rotation;
use crate::{hash64, mix64, Endpoint, Selector};

/// Table slot not yet filled during the build.
const EMPTY: u32 = u32::MAX;

/// Probes of a key's own sequence before the deterministic scan takes over (only reached
/// when most endpoints are skipped).
const MAX_PROBES: usize = 64;

/// Default table size: prime, and ≥ 100 × n (the paper's bound for ≤ 1% imbalance) up to
/// n = 655. Larger pools use the smallest prime ≥ 100 × n.
const SMALL_TABLE: u64 = 65_537;

pub(crate) struct Maglev {
    /// Endpoint index per slot; empty when no endpoint has a nonzero weight.
    table: Box<[u32]>,
    /// Without a key the hashing algorithms degrade to round robin.
    fallback: Rotation,
}

impl fmt::Debug for Maglev {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // The table itself is tens of thousands of entries: too much for a log line.
        f.debug_struct("Maglev")
            .field("table_size", &self.table.len())
            .field("endpoints", &self.fallback.active())
            .finish()
    }
}

/// One endpoint's permutation cursor during the build.
struct Entry {
    index: u32,
    weight: u64,
    /// Next slot of this endpoint's permutation `offset + j × skip (mod M)`.
    slot: u64,
    skip: u64,
    /// Envoy's weighting: the endpoint takes a turn in round `r` only if `r × weight ≥
    /// target`, and each turn raises `target` by the largest weight.
    target: u64,
}

impl Maglev {
    pub(crate) fn new(endpoints: &[Endpoint], seed: u64) -> Self {
        let fallback = Rotation::new(endpoints, seed);
        let active = fallback.active();
        if active.is_empty() {
            return Maglev {
                table: Box::new([]),
                fallback,
            };
        }
        let m = table_size(active.len());
        // Permutations depend only on the id (never on the index or seed), so every proxy
        // replica and every rebuild agrees on where a key goes.
        let mut entries: Vec<Entry> = active
            .iter()
            .map(|&i| {
                let h = hash64(endpoints[i].id.as_bytes());
                Entry {
                    index: i as u32,
                    weight: u64::from(endpoints[i].weight),
                    slot: h % m,
                    skip: mix64(h ^ 0x5851_f42d_4c95_7f2d) % (m - 1) + 1,
                    target: 0,
                }
            })
            .collect();
        let max_weight = entries.iter().map(|e| e.weight).max().unwrap_or(1);

        let mut table = vec![EMPTY; m as usize].into_boxed_slice();
        let mut filled = 0u64;
        // The heaviest endpoint takes a turn every round, so at most M rounds; in round 1
        // every endpoint takes one, so each gets at least one slot (M > n).
        'rounds: for round in 1u64.. {
            for e in &mut entries {
                if round * e.weight < e.target {
                    continue;
                }
                e.target += max_weight;
                // m is prime and 0 < skip < m, so the permutation visits every slot.
                while table[e.slot as usize] != EMPTY {
                    e.slot = (e.slot + e.skip) % m;
                }
                table[e.slot as usize] = e.index;
                e.slot = (e.slot + e.skip) % m;
                filled += 1;
                if filled == m {
                    break 'rounds;
                }
            }
        }
        Maglev { table, fallback }
    }

    /// Table size M for the builder; exposed for tests.
    #[cfg(test)]
    pub(crate) fn table_len(&self) -> usize {
        self.table.len()
    }
}

impl Selector for Maglev {
    fn pick(&self, key: Option<&[u8]>, _now: u64, skip: &dyn Fn(usize) -> bool) -> Option<usize> {
        let Some(key) = key else {
            return self.fallback.pick(skip);
        };
        if self.table.is_empty() {
            return None;
        }
        let m = self.table.len() as u64;
        let h = hash64(key);
        let mut slot = h % m;
        // On retry, follow a key-specific probe sequence through the table: the fallback is
        // still consistent per key and spread in proportion to the table shares.
        let stride = mix64(h) % (m - 1) + 1;
        for _ in 0..MAX_PROBES {
            let i = self.table[slot as usize] as usize;
            if !skip(i) {
                return Some(i);
            }
            slot = (slot + stride) % m;
        }
        let active = self.fallback.active();
        let start = (h % active.len() as u64) as usize;
        active[start..]
            .iter()
            .chain(&active[..start])
            .copied()
            .find(|&i| !skip(i))
    }
}

/// The smallest prime ≥ max(65 537, 100 × n).
fn table_size(n: usize) -> u64 {
    let mut m = SMALL_TABLE.max(100 * n as u64);
    while !is_prime(m) {
        m += 1;
    }
    m
}

fn is_prime(n: u64) -> bool {
    if n < 4 {
        return n >= 2;
    }
    if n % 2 == 0 {
        return false;
    }
    (3..)
        .step_by(2)
        .take_while(|d| d * d <= n)
        .all(|d| n % d != 0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Load;
    use std::sync::Arc;

    fn endpoints(weights: &[u32]) -> Vec<Endpoint> {
        weights
            .iter()
            .enumerate()
            .map(|(i, &weight)| Endpoint {
                id: format!("10.0.0.{i}:8080"),
                weight,
                load: Arc::new(Load::new()),
            })
            .collect()
    }

    #[test]
    fn table_sizes_are_prime_and_large_enough() {
        assert_eq!(table_size(1), 65_537);
        assert_eq!(table_size(655), 65_537);
        assert_eq!(table_size(1000), 100_003);
        assert!(is_prime(table_size(5000)) && table_size(5000) >= 500_000);
        assert!(!is_prime(1) && is_prime(2) && is_prime(3) && !is_prime(9));
    }

    #[test]
    fn shares_follow_weights() {
        let m = Maglev::new(&endpoints(&[1, 2, 0, 1]), 0);
        let mut counts = [0usize; 4];
        for &i in m.table.iter() {
            counts[i as usize] += 1;
        }
        let len = m.table_len() as f64;
        assert_eq!(counts[2], 0);
        for (i, want) in [(0, 0.25), (1, 0.5), (3, 0.25)] {
            let share = counts[i] as f64 / len;
            assert!((share - want).abs() < 0.01, "endpoint {i}: {share}");
        }
    }

    #[test]
    fn tiny_weight_still_gets_a_slot() {
        let m = Maglev::new(&endpoints(&[1, u32::MAX]), 0);
        assert!(m.table.contains(&0));
        assert!(m.table.iter().all(|&i| i != EMPTY));
    }
}
