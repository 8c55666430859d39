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
    /// `shoal_cache_fill_bytes`: body bytes held now for responses being stored.
    pub fill_bytes: u64,
    /// `shoal_cache_fill_exhausted_total`: responses streamed through uncached because the
    /// fill budget was spent.
    pub fill_exhausted: u64,
}

/// One Prometheus sample, for the proxy's exposition to render.
#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    pub name: &'static str,
    pub help: &'static str,
    /// Counter (else gauge).
    pub counter: bool,
    pub labels: Vec<(&'static str, String)>,
    pub value: f64,
}

impl CacheCounters {
    /// `shoal_cache_requests_total{service,result}`, every result present.
    pub fn samples(&self, service: &str) -> Vec<Sample> {
        Outcome::ALL
            .iter()
            .map(|&o| Sample {
                name: "shoal_cache_requests_total",
                help: "Requests that passed a route's cache, by result.",
                counter: true,
                labels: vec![
                    ("service", service.to_string()),
                    ("result", o.as_str().into()),
                ],
                value: self.get(o) as f64,
            })
            .collect()
    }
}

impl StoreStats {
    /// The store's figures as samples (no labels: one store per process).
    pub fn samples(&self) -> Vec<Sample> {
        let s = |name, help, counter, value: u64| Sample {
            name,
            help,
            counter,
            labels: Vec::new(),
            value: value as f64,
        };
        let mut out = vec![
            s(
                "shoal_cache_memory_bytes",
                "Bytes held by the memory tier.",
                false,
                self.memory_bytes,
            ),
            s(
                "shoal_cache_memory_capacity_bytes",
                "The memory tier's size limit.",
                false,
                self.memory_capacity_bytes,
            ),
            s(
                "shoal_cache_objects",
                "URLs held by the memory tier.",
                false,
                self.memory_objects,
            ),
            s(
                "shoal_cache_evictions_total",
                "Objects evicted from the memory tier for space.",
                true,
                self.evictions,
            ),
            s(
                "shoal_cache_too_large_total",
                "Responses too large to store, streamed through.",
                true,
                self.too_large,
            ),
            s(
                "shoal_cache_fill_bytes",
                "Response body bytes held while being read for storing.",
                false,
                self.fill_bytes,
            ),
            s(
                "shoal_cache_fill_exhausted_total",
                "Responses streamed through uncached because the fill budget was spent.",
                true,
                self.fill_exhausted,
            ),
        ];
        if self.redis_configured {
            out.push(s(
                "shoal_cache_redis_up",
                "1 while the Redis tier is connected.",
                false,
                self.redis_connected as u64,
            ));
            out.push(s(
                "shoal_cache_redis_errors_total",
                "Redis tier failures (the memory tier carried on).",
                true,
                self.redis_errors,
            ));
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_result_label_is_exported() {
        let c = CacheCounters::default();
        c.inc(Outcome::Stale);
        let s = c.samples("web");
        let results: Vec<&str> = s.iter().map(|s| s.labels[1].1.as_str()).collect();
        assert_eq!(results, ["hit", "miss", "stale", "revalidated", "bypass"]);
        assert_eq!(s[2].value, 1.0);
        assert!(StoreStats::default()
            .samples()
            .iter()
            .all(|s| !s.name.contains("redis")));
        let with_redis = StoreStats {
            redis_configured: true,
            redis_errors: 3,
            ..Default::default()
        };
        assert!(with_redis
            .samples()
            .iter()
            .any(|s| s.name == "shoal_cache_redis_errors_total" && s.value == 3.0));
    }
}
