//! Behaviour of every algorithm through the public API only.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap};
use std::sync::Arc;

use shoal_balance::{build, Algorithm, Endpoint, Load, Selector};

const MS: u64 = 1_000_000;

fn endpoints(weights: &[u32]) -> Vec<Endpoint> {
    weights
        .iter()
        .enumerate()
        .map(|(i, &weight)| Endpoint {
            id: format!("10.1.0.{i}:8080"),
            weight,
            load: Arc::new(Load::new()),
        })
        .collect()
}

fn no_skip(_: usize) -> bool {
    false
}

fn counts(sel: &dyn Selector, n: usize, picks: usize, key: Option<&[u8]>) -> Vec<usize> {
    let mut c = vec![0; n];
    for _ in 0..picks {
        c[sel.pick(key, 0, &no_skip).unwrap()] += 1;
    }
    c
}

/// Test-local SplitMix64, so the tests need no crates.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

#[test]
fn round_robin_is_exact() {
    let sel = build(Algorithm::RoundRobin, endpoints(&[1, 5, 2]), 7);
    assert_eq!(counts(&*sel, 3, 300, None), [100, 100, 100]);
    // Consecutive picks rotate.
    let a = sel.pick(None, 0, &no_skip).unwrap();
    assert_eq!(sel.pick(None, 0, &no_skip), Some((a + 1) % 3));
}

#[test]
fn round_robin_is_exact_across_threads() {
    let sel = build(Algorithm::RoundRobin, endpoints(&[1, 1, 1, 1]), 0);
    let per_thread: Vec<Vec<usize>> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..8)
            .map(|_| s.spawn(|| counts(&*sel, 4, 10_000, None)))
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let total: Vec<usize> = (0..4)
        .map(|i| per_thread.iter().map(|c| c[i]).sum())
        .collect();
    assert_eq!(total, [20_000; 4]);
}

#[test]
fn smooth_weighted_round_robin_matches_nginx() {
    let sel = build(Algorithm::WeightedRoundRobin, endpoints(&[5, 1, 1]), 0);
    let seq: String = (0..14)
        .map(|_| ["a", "b", "c"][sel.pick(None, 0, &no_skip).unwrap()])
        .collect();
    assert_eq!(seq, "aabacaaaabacaa");
    assert_eq!(counts(&*sel, 3, 7000, None), [5000, 1000, 1000]);

    let sel = build(Algorithm::WeightedRoundRobin, endpoints(&[3, 0, 2, 1]), 0);
    assert_eq!(counts(&*sel, 4, 600, None), [300, 0, 200, 100]);
}

#[test]
fn least_connections_avoids_busy_endpoints() {
    let eps = endpoints(&[1, 1, 1]);
    let sel = build(Algorithm::LeastConnections, eps.clone(), 0);
    for _ in 0..5 {
        eps[0].load.start();
    }
    eps[1].load.start();
    for _ in 0..100 {
        assert_eq!(sel.pick(None, 0, &no_skip), Some(2));
    }
    // Ties spread evenly instead of piling onto one endpoint.
    eps[2].load.start();
    let c = counts(&*sel, 3, 2_000, None);
    assert_eq!(c[0], 0);
    assert!((900..=1_100).contains(&c[1]), "{c:?}");
    // Skipping the least loaded falls to the next least loaded.
    eps[2].load.start();
    assert_eq!(sel.pick(None, 0, &|i| i == 1), Some(2));

    // Weighted: 4 in flight on weight 4 beats 2 on weight 1.
    let eps = endpoints(&[4, 1]);
    let sel = build(Algorithm::LeastConnections, eps.clone(), 0);
    (0..4).for_each(|_| eps[0].load.start());
    (0..2).for_each(|_| eps[1].load.start());
    assert_eq!(sel.pick(None, 0, &no_skip), Some(0));
}

#[test]
fn least_connections_balances_a_simulated_pool() {
    let eps = endpoints(&[1, 1, 1, 1]);
    let sel = build(Algorithm::LeastConnections, eps.clone(), 3);
    // Picks and finishes interleaved at random: every pick goes to a least-loaded endpoint.
    let mut rng = Rng(11);
    let mut open: Vec<usize> = Vec::new();
    let mut picks = [0usize; 4];
    for _ in 0..10_000 {
        if !open.is_empty() && rng.below(2) == 0 {
            let i = open.swap_remove(rng.below(open.len() as u64) as usize);
            eps[i].load.finish(MS, 0);
        } else {
            let min = eps.iter().map(|e| e.load.in_flight()).min().unwrap();
            let i = sel.pick(None, 0, &no_skip).unwrap();
            assert_eq!(eps[i].load.in_flight(), min);
            eps[i].load.start();
            open.push(i);
            picks[i] += 1;
        }
    }
    for n in picks {
        assert!(n > 1_000, "{picks:?}");
    }
}

fn ip(k: u32) -> [u8; 4] {
    k.to_be_bytes()
}

#[test]
fn ip_hash_is_stable_per_key_and_spread() {
    let sel = build(Algorithm::IpHash, endpoints(&[1, 1, 1, 1]), 1);
    let again = build(Algorithm::IpHash, endpoints(&[1, 1, 1, 1]), 99);
    let mut c = [0usize; 4];
    for k in 0..10_000u32 {
        let key = ip(0x0a00_0000 + k);
        let first = sel.pick(Some(&key), 0, &no_skip).unwrap();
        assert_eq!(sel.pick(Some(&key), 0, &no_skip), Some(first));
        // Independent of the seed and of the selector instance.
        assert_eq!(again.pick(Some(&key), 0, &no_skip), Some(first));
        c[first] += 1;
    }
    for n in c {
        assert!((2_300..=2_700).contains(&n), "{c:?}");
    }
    // Without a key: round robin.
    assert_eq!(counts(&*sel, 4, 400, None), [100; 4]);
}

/// Fraction of keys whose endpoint id differs between the two selectors.
fn remapped(a: (&dyn Selector, &[Endpoint]), b: (&dyn Selector, &[Endpoint]), keys: u32) -> f64 {
    let moved = (0..keys)
        .filter(|k| {
            let key = format!("session-{k}");
            let pa = a.0.pick(Some(key.as_bytes()), 0, &no_skip).unwrap();
            let pb = b.0.pick(Some(key.as_bytes()), 0, &no_skip).unwrap();
            a.1[pa].id != b.1[pb].id
        })
        .count();
    moved as f64 / f64::from(keys)
}

#[test]
fn consistent_hash_remaps_about_one_nth() {
    for n in 3..=10usize {
        let before = endpoints(&vec![1; n]);
        let sel_before = build(Algorithm::ConsistentHash, before.clone(), 0);

        let added = endpoints(&vec![1; n + 1]);
        let sel_added = build(Algorithm::ConsistentHash, added.clone(), 0);
        let f = remapped((&*sel_before, &before), (&*sel_added, &added), 10_000);
        let ideal = 1.0 / (n + 1) as f64;
        assert!(f <= ideal + 0.05, "add to {n}: {f} vs {ideal}");
        assert!(
            f >= ideal - 0.05,
            "add to {n}: the new endpoint gets its share: {f}"
        );

        let mut removed = before.clone();
        removed.remove(n / 2);
        let sel_removed = build(Algorithm::ConsistentHash, removed.clone(), 0);
        let f = remapped((&*sel_before, &before), (&*sel_removed, &removed), 10_000);
        let ideal = 1.0 / n as f64;
        assert!(f <= ideal + 0.05, "remove from {n}: {f} vs {ideal}");
    }
}

#[test]
fn hash_retry_walks_to_another_endpoint_consistently() {
    for algo in [Algorithm::IpHash, Algorithm::ConsistentHash] {
        let sel = build(algo, endpoints(&[1, 1, 1, 1, 1]), 0);
        let mut c = [0usize; 5];
        for k in 0..5_000u32 {
            let key = ip(k);
            let first = sel.pick(Some(&key), 0, &no_skip).unwrap();
            let skip = |i: usize| i == first;
            let second = sel.pick(Some(&key), 0, &skip).unwrap();
            assert_ne!(second, first);
            assert_eq!(sel.pick(Some(&key), 0, &skip), Some(second));
            c[second] += 1;
        }
        // Retries of one endpoint's keys spread over the others, not onto one neighbour.
        for n in c {
            assert!((800..=1_200).contains(&n), "{c:?}");
        }
    }
}

#[test]
fn p2c_ewma_avoids_the_slow_endpoint() {
    let eps = endpoints(&[1, 1, 1, 1]);
    let latency = [10 * MS, 10 * MS, 10 * MS, 110 * MS];
    let sel = build(Algorithm::P2cEwma, eps.clone(), 42);
    let mut in_flight: BinaryHeap<Reverse<(u64, usize)>> = BinaryHeap::new();
    let mut picks = [0usize; 4];
    let mut now = 0;
    // One request per ms for 20 s of injected time.
    for _ in 0..20_000 {
        now += MS;
        while let Some(&Reverse((done, i))) = in_flight.peek() {
            if done > now {
                break;
            }
            in_flight.pop();
            eps[i].load.finish(latency[i], done);
        }
        let i = sel.pick(None, now, &no_skip).unwrap();
        eps[i].load.start();
        in_flight.push(Reverse((now + latency[i], i)));
        picks[i] += 1;
    }
    let slow_share = picks[3] as f64 / 20_000.0;
    assert!(slow_share < 0.10, "{picks:?}");
    for &fast in &picks[..3] {
        assert!(fast > 5_000, "{picks:?}");
    }
}

#[test]
fn p2c_ewma_tries_new_and_idle_endpoints() {
    let eps = endpoints(&[1, 1]);
    let sel = build(Algorithm::P2cEwma, eps.clone(), 1);
    // Endpoint 0 is known-fast; the newcomer has no samples but its default RTT is modest.
    eps[0].load.finish(40 * MS, 0);
    assert_eq!(sel.pick(None, 0, &no_skip), Some(1));
    // Endpoint 1 spiked; after a minute idle its estimate has decayed below endpoint 0's.
    eps[1].load.finish(500 * MS, 0);
    eps[0].load.finish(40 * MS, 60_000 * MS);
    assert_eq!(sel.pick(None, 60_000 * MS, &no_skip), Some(1));
}

/// Pearson's chi-square of observed counts against weights.
fn chi_square(observed: &[usize], weights: &[u32]) -> f64 {
    let n: usize = observed.iter().sum();
    let total: u32 = weights.iter().sum();
    observed
        .iter()
        .zip(weights)
        .filter(|(_, &w)| w > 0)
        .map(|(&o, &w)| {
            let e = n as f64 * f64::from(w) / f64::from(total);
            (o as f64 - e).powi(2) / e
        })
        .sum()
}

#[test]
fn random_follows_weights() {
    let weights = [1, 2, 3, 4, 0];
    let sel = build(Algorithm::Random, endpoints(&weights), 2024);
    let c = counts(&*sel, 5, 100_000, None);
    assert_eq!(c[4], 0);
    // 3 degrees of freedom: p = 0.001 at 16.27.
    assert!(chi_square(&c, &weights) < 16.27, "{c:?}");

    // With endpoint 3 skipped the rest keep their relative weights.
    let mut c = [0usize; 5];
    for _ in 0..60_000 {
        c[sel.pick(None, 0, &|i| i == 3).unwrap()] += 1;
    }
    assert_eq!(c[3], 0);
    assert!(chi_square(&c, &[1, 2, 3, 0, 0]) < 13.82, "{c:?}");
}

#[test]
fn skip_works_for_every_algorithm() {
    for algo in Algorithm::ALL {
        let sel = build(algo, endpoints(&[1, 1, 1, 1]), 5);
        for key in [None, Some(&b"203.0.113.9"[..])] {
            for skipped in 0..4 {
                for _ in 0..50 {
                    let i = sel.pick(key, 0, &|i| i == skipped).unwrap();
                    assert_ne!(i, skipped, "{algo}");
                }
            }
            assert_eq!(sel.pick(key, 0, &|i| i != 2), Some(2), "{algo}");
            assert_eq!(sel.pick(key, 0, &|_| true), None, "{algo}");
        }
    }
}

#[test]
fn round_robin_retry_takes_the_next_in_rotation() {
    let sel = build(Algorithm::RoundRobin, endpoints(&[1, 1, 1]), 0);
    let first = sel.pick(None, 0, &no_skip).unwrap();
    let skip_next = |i: usize| i == (first + 1) % 3;
    assert_eq!(sel.pick(None, 0, &skip_next), Some((first + 2) % 3));
}

#[test]
fn weight_zero_is_never_picked() {
    for algo in Algorithm::ALL {
        let sel = build(algo, endpoints(&[0, 3, 0, 1]), 9);
        for k in 0..2_000u32 {
            let key = ip(k);
            for key in [None, Some(&key[..])] {
                let i = sel.pick(key, k.into(), &no_skip).unwrap();
                assert!(i == 1 || i == 3, "{algo} picked {i}");
            }
        }
        let none = build(algo, endpoints(&[0, 0]), 9);
        assert_eq!(none.pick(Some(b"k"), 0, &no_skip), None, "{algo}");
        assert_eq!(none.pick(None, 0, &no_skip), None, "{algo}");
        let empty = build(algo, Vec::new(), 9);
        assert_eq!(empty.pick(Some(b"k"), 0, &no_skip), None, "{algo}");
        assert_eq!(empty.pick(None, 0, &no_skip), None, "{algo}");
    }
}

/// Randomized pools, weights, loads, keys and skip sets (seeded; ~105k picks): a pick is
/// always a valid, non-skipped, nonzero-weight index, and None exactly when none exists.
#[test]
fn property_pick_is_always_eligible() {
    let mut rng = Rng(0x5eed);
    let mut picks = 0usize;
    let mut by_algo: HashMap<Algorithm, usize> = HashMap::new();
    for _pool in 0..50 {
        let n = rng.below(13) as usize;
        let weights: Vec<u32> = (0..n)
            .map(|_| match rng.below(4) {
                0 => 0,
                _ => 1 + rng.below(10) as u32,
            })
            .collect();
        let eps = endpoints(&weights);
        for algo in Algorithm::ALL {
            let sel = build(algo, eps.clone(), rng.next());
            for _ in 0..300 {
                // Skip each endpoint with probability 1/2, 1/4 or 0 depending on the round.
                let mask = match rng.below(3) {
                    0 => 0,
                    1 => rng.next() & rng.next(),
                    _ => rng.next(),
                };
                let skip = |i: usize| mask >> i & 1 == 1;
                let key = rng.next().to_le_bytes();
                let key = (rng.below(2) == 0).then_some(&key[..]);
                let now = rng.below(60_000) * MS;
                if n > 0 && rng.below(4) == 0 {
                    let i = rng.below(n as u64) as usize;
                    match rng.below(2) {
                        0 => eps[i].load.start(),
                        _ => eps[i].load.finish(rng.below(200) * MS, now),
                    }
                }
                let eligible = (0..n).any(|i| weights[i] > 0 && !skip(i));
                match sel.pick(key, now, &skip) {
                    Some(i) => {
                        assert!(i < n, "{algo}: {i} out of {n}");
                        assert!(weights[i] > 0, "{algo}: weight 0 picked");
                        assert!(!skip(i), "{algo}: skipped endpoint picked");
                    }
                    None => assert!(!eligible, "{algo}: None with {weights:?} mask {mask:b}"),
                }
                picks += 1;
                *by_algo.entry(algo).or_default() += 1;
            }
        }
    }
    assert_eq!(picks, 105_000);
    assert_eq!(by_algo.len(), Algorithm::ALL.len());
}

#[test]
fn selectors_are_shareable_across_threads() {
    fn assert_send_sync<T: Send + Sync>(_: &T) {}
    for algo in Algorithm::ALL {
        let sel = build(algo, endpoints(&[2, 1, 1]), 3);
        assert_send_sync(&sel);
        std::thread::scope(|s| {
            for t in 0..4u32 {
                let sel = &sel;
                s.spawn(move || {
                    for k in 0..2_000u32 {
                        let key = (k * 4 + t).to_le_bytes();
                        assert!(sel.pick(Some(&key), 0, &no_skip).unwrap() < 3);
                    }
                });
            }
        });
        assert!(!format!("{sel:?}").is_empty());
    }
}
