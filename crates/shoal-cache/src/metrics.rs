//! Counters the proxy exports: `shoal_cache_requests_total{service,result}` and tier figures.

use std::sync::atomic::{AtomicU64, Ordering};

/// Per-route request outcomes.
#[derive(Debug, Default)]
pub struct CacheCounters {
    pub hit: AtomicU64,
    pub miss: AtomicU64,
    pub stale: AtomicU64,
    pub revalidated: AtomicU64,
    pub bypass: AtomicU64,
}

/// The `result` label values.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Hit,
    Miss,
    Stale,
    Revalidated,
    Bypass,
}

impl Outcome {
    pub const ALL: [Outcome; 5] = [
        Outcome::Hit,
        Outcome::Miss,
        Outcome::Stale,
        Outcome::Revalidated,
        Outcome::Bypass,
    ];
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Hit => "hit",
            Outcome::Miss => "miss",
            Outcome::Stale => "stale",
            Outcome::Revalidated => "revalidated",
            Outcome::Bypass => "bypass",
        }
    }
}

impl CacheCounters {
    fn slot(&self, o: Outcome) -> &AtomicU64 {
        match o {
            Outcome::Hit => &self.hit,
            Outcome::Miss => &self.miss,
            Outcome::Stale => &self.stale,
            Outcome::Revalidated => &self.revalidated,
            Outcome::Bypass => &self.bypass,
        }
    }
    #[inline]
    pub fn inc(&self, o: Outcome) {
        self.slot(o).fetch_add(1, Ordering::Relaxed);
    }
    pub fn get(&self, o: Outcome) -> u64 {
        self.slot(o).load(Ordering::Relaxed)
    }
}

/// Figures of the shared store (both tiers), for `/metrics` and `shoal status`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct StoreStats {
    /// `shoal_cache_memory_bytes`
    pub memory_bytes: u64,
    pub memory_capacity_bytes: u64,
    /// `shoal_cache_objects`
    pub memory_objects: u64,
    /// `shoal_cache_evictions_total`
    pub evictions: u64,
    /// Whether a Redis tier is configured, and whether it is connected now.
    pub redis_configured: bool,
    pub redis_connected: bool,
    /// `shoal_cache_redis_errors_total`
    pub redis_errors: u64,
    /// Responses too large (or of unknown length) to store, streamed through.
    pub too_large: u64,
}
