//! Load-balancing algorithms and endpoint health policies for shoal.
//!
//! **Architecture Invariant:** this crate does no I/O and knows nothing about hyper or tokio.
//! Time is passed in as `now` (nanoseconds on a caller-chosen monotonic clock) and randomness
//! comes from a seed, so every behaviour is testable without sockets or sleeps.
//!
//! The proxy keeps one [`Load`] per endpoint id, builds a [`Selector`] with [`build`] whenever
//! membership or effective weights change (e.g. [`slow_start_weight`] steps, ejections), swaps
//! it in, and calls [`Selector::pick`] from every worker thread.
#![forbid(unsafe_code)]

mod algo;
mod health;
mod load;
mod maglev;

use std::fmt;
use std::sync::Arc;

pub use health::{allowed_ejections, slow_start_weight, ActiveHealth, Outlier, OutlierConfig};
pub use load::{Load, DECAY_NANOS, DEFAULT_RTT_NANOS};

/// The seven selection algorithms; names as accepted on the command line.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Algorithm {
    /// Plain rotation; weights other than 0 are ignored.
    RoundRobin,
    /// Smooth weighted round robin (nginx).
    WeightedRoundRobin,
    /// Fewest in-flight requests per unit of weight.
    LeastConnections,
    /// Consistent hash (Maglev) of the client IP bytes.
    IpHash,
    /// Consistent hash (Maglev) of a caller-chosen key (header value or client IP).
    ConsistentHash,
    /// Weighted random.
    Random,
    /// Power of two random choices, comparing peak-EWMA latency × (in-flight + 1).
    P2cEwma,
}

impl Algorithm {
    /// Every algorithm, in documentation order.
    pub const ALL: [Algorithm; 7] = [
        Algorithm::RoundRobin,
        Algorithm::WeightedRoundRobin,
        Algorithm::LeastConnections,
        Algorithm::IpHash,
        Algorithm::ConsistentHash,
        Algorithm::Random,
        Algorithm::P2cEwma,
    ];

    /// The CLI / config name: `round-robin`, `weighted-round-robin`, `least-connections`,
    /// `ip-hash`, `consistent-hash`, `random`, `p2c-ewma`.
    pub fn name(self) -> &'static str {
        match self {
            Algorithm::RoundRobin => "round-robin",
            Algorithm::WeightedRoundRobin => "weighted-round-robin",
            Algorithm::LeastConnections => "least-connections",
            Algorithm::IpHash => "ip-hash",
            Algorithm::ConsistentHash => "consistent-hash",
            Algorithm::Random => "random",
            Algorithm::P2cEwma => "p2c-ewma",
        }
    }
}

impl fmt::Display for Algorithm {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl std::str::FromStr for Algorithm {
    /// A message naming the rejected input and listing the valid names.
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Algorithm::ALL
            .into_iter()
            .find(|a| a.name() == s)
            .ok_or_else(|| {
                let names: Vec<&str> = Algorithm::ALL.iter().map(|a| a.name()).collect();
                format!(
                    "unknown balancing algorithm `{s}`; expected one of: {}",
                    names.join(", ")
                )
            })
    }
}

/// One candidate endpoint as the selector sees it.
#[derive(Debug, Clone)]
pub struct Endpoint {
    /// Stable identity (e.g. "127.0.0.1:9001" or an instance id); consistent hashing hashes it.
    pub id: String,
    /// Effective weight (after slow start); 0 means "never pick".
    pub weight: u32,
    /// Live load shared with every other selector built over this endpoint.
    pub load: Arc<Load>,
}

/// Immutable-membership selector: rebuilt when membership or weights change, read concurrently.
pub trait Selector: Send + Sync + fmt::Debug {
    /// Picks an index into the endpoint list given at build time.
    /// `key`: the hash key for ip-hash / consistent-hash (client IP bytes or a header value);
    /// other algorithms ignore it, and the hashing ones fall back to round robin without it.
    /// `skip(i)` true means endpoint i must not be chosen (already tried by this request); the
    /// selector then picks the next best one. None if every endpoint is skipped or has weight 0.
    fn pick(&self, key: Option<&[u8]>, now: u64, skip: &dyn Fn(usize) -> bool) -> Option<usize>;
}

/// Builds the selector for `algo` over `endpoints`. `seed` seeds random / p2c choices
/// (deterministic for a single caller thread) and the round-robin starting point.
pub fn build(algo: Algorithm, endpoints: Vec<Endpoint>, seed: u64) -> Arc<dyn Selector> {
    match algo {
        Algorithm::RoundRobin => Arc::new(algo::RoundRobin::new(&endpoints, seed)),
        Algorithm::WeightedRoundRobin => Arc::new(algo::SmoothWeighted::new(&endpoints)),
        Algorithm::LeastConnections => Arc::new(algo::LeastConnections::new(endpoints, seed)),
        Algorithm::IpHash | Algorithm::ConsistentHash => {
            Arc::new(maglev::Maglev::new(&endpoints, seed))
        }
        Algorithm::Random => Arc::new(algo::WeightedRandom::new(&endpoints, seed)),
        Algorithm::P2cEwma => Arc::new(algo::P2cEwma::new(endpoints, seed)),
    }
}

/// 64-bit hash used for ip-hash / consistent-hash: FNV-1a 64 followed by the SplitMix64
/// finalizer. FNV alone barely mixes the last byte into the high bits (keys such as IPs that
/// differ in the last octet would cluster), the finalizer fixes that. Stable across runs,
/// platforms and releases (golden-tested): changing it remaps every client.
pub fn hash64(bytes: &[u8]) -> u64 {
    const FNV_OFFSET: u64 = 0xcbf2_9ce4_8422_2325;
    const FNV_PRIME: u64 = 0x0000_0100_0000_01b3;
    let fnv = bytes.iter().fold(FNV_OFFSET, |h, &b| {
        (h ^ u64::from(b)).wrapping_mul(FNV_PRIME)
    });
    mix64(fnv)
}

/// SplitMix64 finalizer: a bijective avalanche mix of 64 bits.
pub(crate) fn mix64(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip() {
        for a in Algorithm::ALL {
            assert_eq!(a.name().parse::<Algorithm>(), Ok(a));
            assert_eq!(a.to_string(), a.name());
        }
        let err = "fastest".parse::<Algorithm>().unwrap_err();
        assert!(err.contains("`fastest`"), "{err}");
        for a in Algorithm::ALL {
            assert!(err.contains(a.name()), "{err}");
        }
    }

    /// Pinned values: if this test fails, every ip-hash / consistent-hash client would move.
    #[test]
    fn hash64_golden() {
        assert_eq!(hash64(b""), GOLDEN[0]);
        assert_eq!(hash64(b"a"), GOLDEN[1]);
        assert_eq!(hash64(b"127.0.0.1:9001"), GOLDEN[2]);
        assert_eq!(hash64(&[10, 0, 0, 1]), GOLDEN[3]);
        assert_eq!(hash64(b"user-42"), GOLDEN[4]);
    }

    /// Computed independently (Python) from the FNV-1a 64 and SplitMix64 definitions.
    const GOLDEN: [u64; 5] = [
        0xf52a_15e9_a9b5_e89b,
        0x02c0_bdbf_4814_20f8,
        0x1282_9112_94b0_f0de,
        0xe7a7_7091_5e3a_6bb4,
        0x7a15_96f0_e94b_5793,
    ];
}
