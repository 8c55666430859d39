//! The memory tier: a byte-weighted moka cache of [`Entry`]s keyed by primary key.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use moka::notification::RemovalCause;
use moka::sync::Cache;
use moka::Expiry;

use crate::object::Entry;

/// A stored entry and how long the tier keeps it from insertion.
#[derive(Debug, Clone)]
pub struct MemEntry {
    pub entry: Entry,
    pub keep: Duration,
    weight: u32,
}

struct KeepExpiry;

impl Expiry<Arc<str>, Arc<MemEntry>> for KeepExpiry {
    fn expire_after_create(
        &self,
        _k: &Arc<str>,
        v: &Arc<MemEntry>,
        _at: Instant,
    ) -> Option<Duration> {
        Some(v.keep)
    }
    fn expire_after_update(
        &self,
        _k: &Arc<str>,
        v: &Arc<MemEntry>,
        _at: Instant,
        _left: Option<Duration>,
    ) -> Option<Duration> {
        Some(v.keep)
    }
}

/// Byte-bounded memory tier.
pub struct MemoryTier {
    cache: Cache<Arc<str>, Arc<MemEntry>>,
    evictions: Arc<AtomicU64>,
    capacity: u64,
}

impl MemoryTier {
    /// `capacity` is in bytes (bodies plus an estimate of header and bookkeeping overhead).
    pub fn new(capacity: u64) -> Self {
        let evictions = Arc::new(AtomicU64::new(0));
        let ev = evictions.clone();
        let cache = Cache::builder()
            .max_capacity(capacity)
            .weigher(|_k: &Arc<str>, v: &Arc<MemEntry>| v.weight)
            .expire_after(KeepExpiry)
            .eviction_listener(move |_k, _v, cause| {
                if cause == RemovalCause::Size {
                    ev.fetch_add(1, Ordering::Relaxed);
                }
            })
            .build();
        MemoryTier {
            cache,
            evictions,
            capacity,
        }
    }

    pub fn get(&self, key: &str) -> Option<Arc<MemEntry>> {
        self.cache.get(key)
    }

    pub fn insert(&self, key: &str, entry: Entry, keep: Duration) {
        let weight = (entry.weight() + key.len()).min(u32::MAX as usize) as u32;
        self.cache.insert(
            Arc::from(key),
            Arc::new(MemEntry {
                entry,
                keep,
                weight,
            }),
        );
    }

    pub fn remove(&self, key: &str) {
        self.cache.invalidate(key);
    }

    /// Removes every entry whose key starts with `prefix`; returns how many.
    pub fn purge_prefix(&self, prefix: &str) -> u64 {
        self.purge_where(|k, _| k.starts_with(prefix))
    }

    /// Removes every entry tagged with surrogate key `tag`; returns how many.
    pub fn purge_surrogate(&self, tag: &str) -> u64 {
        self.purge_where(|_, e| e.entry.has_surrogate_key(tag))
    }

    // Purges are admin calls: a scan is fine and keeps the hot path free of secondary indexes.
    fn purge_where(&self, f: impl Fn(&str, &MemEntry) -> bool) -> u64 {
        let keys: Vec<Arc<str>> = self
            .cache
            .iter()
            .filter(|(k, v)| f(k, v))
            .map(|(k, _)| Arc::clone(&*k))
            .collect();
        for k in &keys {
            self.cache.invalidate(k.as_ref());
        }
        keys.len() as u64
    }

    pub fn objects(&self) -> u64 {
        self.cache.entry_count()
    }

    pub fn bytes(&self) -> u64 {
        self.cache.weighted_size()
    }

    pub fn capacity(&self) -> u64 {
        self.capacity
    }

    pub fn evictions(&self) -> u64 {
        self.evictions.load(Ordering::Relaxed)
    }

    /// Applies pending evictions now (moka batches them); for tests and status snapshots.
    pub fn sync(&self) {
        self.cache.run_pending_tasks();
    }
}
