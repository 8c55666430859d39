//! Request coalescing: one origin fetch per key at a time, plus "hit-for-pass" memory.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use tokio::sync::watch;

/// Tracks fetches in flight and keys recently found uncacheable.
pub struct Coalescer {
    flights: Mutex<HashMap<Arc<str>, watch::Receiver<()>>>,
    // Values are the injected-clock time until which the key is passed straight through.
    hit_for_pass: moka::sync::Cache<Arc<str>, SystemTime>,
    waiting: AtomicUsize,
}

/// The outcome of joining a key's flight.
pub enum Join {
    /// Nobody is fetching this key: the caller fetches and holds the guard until stored or
    /// found uncacheable (dropping it wakes the waiters).
    Leader(FlightGuard),
    /// Someone else is fetching: wait on this.
    Follower(watch::Receiver<()>),
}

/// Held by the one request fetching a key; dropping it releases the waiters.
pub struct FlightGuard {
    owner: Arc<Coalescer>,
    key: Arc<str>,
    _tx: watch::Sender<()>,
}

impl Drop for FlightGuard {
    fn drop(&mut self) {
        self.owner.flights.lock().unwrap().remove(&self.key);
        // Dropping `_tx` closes the channel, which wakes every receiver.
    }
}

impl Coalescer {
    pub fn new() -> Arc<Self> {
        Arc::new(Coalescer {
            flights: Mutex::new(HashMap::new()),
            hit_for_pass: moka::sync::Cache::builder()
                .max_capacity(100_000)
                .time_to_live(Duration::from_secs(3_600))
                .build(),
            waiting: AtomicUsize::new(0),
        })
    }

    pub fn join(self: &Arc<Self>, key: &Arc<str>) -> Join {
        let mut flights = self.flights.lock().unwrap();
        if let Some(rx) = flights.get(key) {
            return Join::Follower(rx.clone());
        }
        let (tx, rx) = watch::channel(());
        flights.insert(key.clone(), rx);
        Join::Leader(FlightGuard {
            owner: self.clone(),
            key: key.clone(),
            _tx: tx,
        })
    }

    /// Leader only if nobody is fetching (for background refreshes, which never wait).
    pub fn try_lead(self: &Arc<Self>, key: &Arc<str>) -> Option<FlightGuard> {
        match self.join(key) {
            Join::Leader(g) => Some(g),
            Join::Follower(_) => None,
        }
    }

    /// Waits for the leader to finish, at most `limit`; false on timeout.
    pub async fn wait(&self, mut rx: watch::Receiver<()>, limit: Duration) -> bool {
        self.waiting.fetch_add(1, Ordering::Relaxed);
        // `changed` errs once the sender is gone: that is the leader finishing.
        let done = tokio::time::timeout(limit, async { while rx.changed().await.is_ok() {} })
            .await
            .is_ok();
        self.waiting.fetch_sub(1, Ordering::Relaxed);
        done
    }

    /// Requests waiting for another one's fetch right now.
    pub fn waiting(&self) -> usize {
        self.waiting.load(Ordering::Relaxed)
    }

    pub fn in_flight(&self) -> usize {
        self.flights.lock().unwrap().len()
    }

    pub fn is_hit_for_pass(&self, key: &str, now: SystemTime) -> bool {
        self.hit_for_pass.get(key).is_some_and(|until| now < until)
    }

    pub fn set_hit_for_pass(&self, key: &Arc<str>, until: SystemTime) {
        self.hit_for_pass.insert(key.clone(), until);
    }

    pub fn clear_hit_for_pass(&self, key: &str) {
        self.hit_for_pass.invalidate(key);
    }
}
