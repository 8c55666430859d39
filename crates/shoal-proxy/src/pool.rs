//! An upstream pool: the members of one service and the selector built over the eligible ones.
//!
//! Membership, health, ejection and slow start change rarely; each change rebuilds an
//! immutable [`Snapshot`] (selector + instances) published through `ArcSwap`, so the request
//! path reads it without locks. In-flight counts and latency estimates live in each instance's
//! [`Load`] and therefore survive rebuilds.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use serde::Serialize;
use shoal_balance::{
    allowed_ejections, build, slow_start_weight, ActiveHealth, Algorithm, Endpoint, Load, Outlier,
    OutlierConfig as BalanceOutlier, Selector,
};
use tokio::sync::Notify;

use crate::config::OutlierConfig;
use crate::metrics::{CodeCounters, Counter};

/// Nanoseconds on the process's monotonic clock: the `now` every policy is given.
pub fn now_nanos() -> u64 {
    clock_start().elapsed().as_nanos() as u64
}

fn clock_start() -> Instant {
    static START: OnceLock<Instant> = OnceLock::new();
    *START.get_or_init(Instant::now)
}

/// The `Instant` of a [`now_nanos`] reading, for timers (no clock read).
pub fn instant_at(nanos: u64) -> tokio::time::Instant {
    tokio::time::Instant::from_std(clock_start() + std::time::Duration::from_nanos(nanos))
}

/// Lifecycle state of an instance, as exported in `shoal_instances{state}`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum State {
    /// Registered but has not yet passed a health check: gets no traffic.
    Starting,
    Ready,
    /// Marked for removal: gets no new requests, finishes in-flight ones.
    Draining,
}

impl State {
    pub fn as_str(self) -> &'static str {
        match self {
            State::Starting => "starting",
            State::Ready => "ready",
            State::Draining => "draining",
        }
    }
}

/// Why an upstream try failed; exported as `shoal_upstream_errors_total{kind}`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    Connect,
    Timeout,
    Reset,
}

impl ErrorKind {
    pub const ALL: [ErrorKind; 3] = [ErrorKind::Connect, ErrorKind::Timeout, ErrorKind::Reset];
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorKind::Connect => "connect",
            ErrorKind::Timeout => "timeout",
            ErrorKind::Reset => "reset",
        }
    }
}

/// Per-instance counters.
#[derive(Debug, Default)]
pub struct InstanceMetrics {
    pub codes: CodeCounters,
    pub errors: [Counter; 3],
    pub ejections: Counter,
    pub health_failures: Counter,
}

/// One upstream instance.
#[derive(Debug)]
pub struct Instance {
    pub id: String,
    pub addr: SocketAddr,
    /// `host:port` for building upstream URIs without formatting per request.
    pub authority: http::uri::Authority,
    pub weight: u32,
    pub load: Arc<Load>,
    pub metrics: InstanceMetrics,
    /// Idle keep-alive connections to this instance.
    pub idle: crate::upstream::Idle,
    state: AtomicU8,
    healthy: AtomicBool,
    ever_healthy: AtomicBool,
    /// Readiness is its owner's call (`mark_ready`), not the pool's health checks'.
    pub(crate) owner_gated: bool,
    health: Mutex<Option<ActiveHealth>>,
    outlier: Mutex<Outlier>,
    /// Consecutive failed results, mirrored from the outlier detector for a lock-free fast path.
    fail_streak: std::sync::atomic::AtomicU32,
    /// 0 when not ejected, else the `now_nanos` the ejection ends.
    ejected_until: AtomicU64,
    /// When the instance last became eligible (slow start ramps from here).
    ready_since: AtomicU64,
}

impl Instance {
    pub fn state(&self) -> State {
        match self.state.load(Ordering::Acquire) {
            0 => State::Starting,
            1 => State::Ready,
            _ => State::Draining,
        }
    }

    /// Marks it draining (the caller rebuilds the snapshot).
    pub(crate) fn set_draining(&self) {
        self.set_state(State::Draining);
    }

    fn set_state(&self, s: State) {
        let v = match s {
            State::Starting => 0,
            State::Ready => 1,
            State::Draining => 2,
        };
        self.state.store(v, Ordering::Release);
    }

    pub fn is_healthy(&self) -> bool {
        self.healthy.load(Ordering::Acquire)
    }

    pub fn is_ejected(&self, now: u64) -> bool {
        let u = self.ejected_until.load(Ordering::Acquire);
        u != 0 && u > now
    }

    pub fn in_flight(&self) -> u64 {
        self.load.in_flight()
    }

    pub fn times_ejected(&self) -> u32 {
        self.outlier.lock().expect("outlier lock").times_ejected()
    }
}

/// What the pool's selector is built from; replaced on reload.
#[derive(Debug, Clone)]
pub struct PoolSettings {
    pub algorithm: Algorithm,
    pub slow_start: Duration,
    pub outlier: OutlierConfig,
    /// Active checks gate new instances (`rise`/`fall`); None: instances are ready at once.
    pub active_health: Option<(u32, u32)>,
}

/// The published, immutable view the request path reads.
#[derive(Debug)]
pub struct Snapshot {
    /// Parallel to the selector's endpoint indexes.
    pub instances: Vec<Arc<Instance>>,
    pub selector: Arc<dyn Selector>,
    /// True when no instance was healthy and the pool routes to all of them (Envoy's panic mode).
    pub panic: bool,
}

/// A service's upstream pool.
pub struct Pool {
    pub service: String,
    settings: ArcSwap<PoolSettings>,
    members: Mutex<Vec<Arc<Instance>>>,
    snapshot: ArcSwap<Snapshot>,
    seed: AtomicU64,
    /// Signalled whenever membership changes (health loop and fleet watch it).
    pub changed: Notify,
    rebuild_lock: Mutex<()>,
    /// Scale from zero: how long and how many requests may wait for a first instance.
    cold_start: Mutex<Option<ColdStart>>,
    /// Requests waiting for a first instance now (the fleet reads it as demand).
    waiting: AtomicU64,
    pub cold_start_metrics: ColdStartMetrics,
}

/// Requests wait this long (and at most this many at once) for a first ready instance when
/// the pool has none; then 503 with `Retry-After`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ColdStart {
    pub timeout: Duration,
    pub queue: u64,
}

/// What scale-from-zero waits did.
#[derive(Debug, Default)]
pub struct ColdStartMetrics {
    /// Requests that waited for a first instance.
    pub waits: AtomicU64,
    /// Waits that ended at the timeout.
    pub timeouts: AtomicU64,
    /// Requests refused because the queue was full.
    pub rejected: AtomicU64,
}

/// Counts a waiting request for as long as it waits.
struct Waiting<'a>(&'a AtomicU64);

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

impl std::fmt::Debug for Pool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pool")
            .field("service", &self.service)
            .finish()
    }
}

impl Pool {
    pub fn new(service: &str, settings: PoolSettings) -> Arc<Pool> {
        let algo = settings.algorithm;
        Arc::new(Pool {
            service: service.to_string(),
            settings: ArcSwap::from_pointee(settings),
            members: Mutex::new(Vec::new()),
            snapshot: ArcSwap::from_pointee(Snapshot {
                instances: Vec::new(),
                selector: build(algo, Vec::new(), 1),
                panic: false,
            }),
            seed: AtomicU64::new(0x5eed),
            changed: Notify::new(),
            rebuild_lock: Mutex::new(()),
            cold_start: Mutex::new(None),
            waiting: AtomicU64::new(0),
            cold_start_metrics: ColdStartMetrics::default(),
        })
    }

    /// Lets requests wait for a first instance when none is ready (a fleet that scales
    /// from zero); None: answer 503 at once.
    pub fn set_cold_start(&self, c: Option<ColdStart>) {
        *self.cold_start.lock().expect("pool lock") = c;
    }

    /// Requests waiting for a first instance.
    pub fn waiting(&self) -> u64 {
        self.waiting.load(Ordering::Relaxed)
    }

    /// With scale from zero on and no instance routable: waits until one is (Ok), or
    /// refuses when the queue is full or the timeout passes (`ProxyError::ColdStart`).
    /// Returns at once otherwise.
    pub async fn wait_routable(&self) -> Result<(), crate::error::ProxyError> {
        if !self.snapshot().instances.is_empty() {
            return Ok(());
        }
        let Some(cs) = *self.cold_start.lock().expect("pool lock") else {
            return Ok(());
        };
        let m = &self.cold_start_metrics;
        if self.waiting.fetch_add(1, Ordering::Relaxed) >= cs.queue {
            self.waiting.fetch_sub(1, Ordering::Relaxed);
            m.rejected.fetch_add(1, Ordering::Relaxed);
            return Err(crate::error::ProxyError::ColdStart);
        }
        let _w = Waiting(&self.waiting);
        m.waits.fetch_add(1, Ordering::Relaxed);
        let deadline = tokio::time::Instant::now() + cs.timeout;
        loop {
            let changed = self.changed.notified();
            if !self.snapshot().instances.is_empty() {
                return Ok(());
            }
            tokio::select! {
                _ = changed => {}
                // Also look now and then, in case a change is published without a signal.
                _ = tokio::time::sleep(Duration::from_millis(100)) => {}
                _ = tokio::time::sleep_until(deadline) => {
                    m.timeouts.fetch_add(1, Ordering::Relaxed);
                    return Err(crate::error::ProxyError::ColdStart);
                }
            }
        }
    }

    /// The current view as an owned `Arc` (for views held across awaits).
    pub fn snapshot_full(&self) -> Arc<Snapshot> {
        self.snapshot.load_full()
    }

    /// The current view for one request.
    #[inline]
    pub fn snapshot(&self) -> arc_swap::Guard<Arc<Snapshot>> {
        self.snapshot.load()
    }

    pub fn settings(&self) -> Arc<PoolSettings> {
        self.settings.load_full()
    }

    pub fn set_settings(&self, s: PoolSettings) {
        let health_changed = self.settings().active_health != s.active_health;
        let active = s.active_health;
        self.settings.store(Arc::new(s));
        if health_changed {
            // Existing instances follow the new checks: fresh thresholds that keep today's
            // verdict, or, with checks removed, everyone waiting on them becomes ready.
            for i in self.members() {
                *i.health.lock().expect("health lock") =
                    active.map(|(rise, fall)| ActiveHealth::new(rise, fall, i.is_healthy()));
                if active.is_none() && i.state() == State::Starting && !i.owner_gated {
                    i.healthy.store(true, Ordering::Release);
                    i.ever_healthy.store(true, Ordering::Release);
                    i.ready_since.store(now_nanos(), Ordering::Release);
                    i.set_state(State::Ready);
                }
            }
        }
        self.rebuild();
    }

    /// All members, draining and unhealthy ones included.
    pub fn members(&self) -> Vec<Arc<Instance>> {
        self.members.lock().expect("members lock").clone()
    }

    /// The instance with this id, preferring a live one over a draining namesake.
    pub fn get(&self, id: &str) -> Option<Arc<Instance>> {
        let m = self.members();
        m.iter()
            .find(|i| i.id == id && i.state() != State::Draining)
            .or_else(|| m.iter().find(|i| i.id == id))
            .cloned()
    }

    /// Adds an instance. With active health checks configured and `gate` true it starts in
    /// `Starting` and gets traffic only after passing `rise` checks; otherwise it is ready now.
    /// Returns None when the id is taken.
    pub fn add(
        &self,
        id: &str,
        addr: SocketAddr,
        weight: u32,
        gate: bool,
    ) -> Option<Arc<Instance>> {
        self.add_instance(
            id,
            addr,
            weight,
            gate && self.settings().active_health.is_some(),
            false,
            None,
        )
    }

    /// Adds an instance in `Starting` (no traffic) until [`Pool::mark_ready`] or, with active
    /// checks, `rise` passing probes.
    pub fn add_starting(&self, id: &str, addr: SocketAddr, weight: u32) -> Option<Arc<Instance>> {
        self.add_instance(id, addr, weight, true, true, None)
    }

    /// Replaces `prev` by a new instance at `addr` with `weight` (a reload changed it): the
    /// new one is published before `prev` starts draining, so there is no moment without
    /// an instance. Returns the new one; the caller waits for `prev` with `remove_drained`.
    pub fn replace(&self, prev: &Arc<Instance>, weight: u32) -> Option<Arc<Instance>> {
        let new = self.add_instance(&prev.id, prev.addr, weight, false, false, Some(prev))?;
        if prev.state() != State::Draining {
            prev.set_state(State::Draining);
            tracing::info!(service = %self.service, instance = %prev.id, "draining (replaced)");
            self.rebuild();
        }
        Some(new)
    }

    /// `owner_gated`: the caller (a fleet) decides readiness with `mark_ready`. `replacing`:
    /// an instance with the same id that this one takes over from.
    fn add_instance(
        &self,
        id: &str,
        addr: SocketAddr,
        weight: u32,
        gated: bool,
        owner_gated: bool,
        replacing: Option<&Arc<Instance>>,
    ) -> Option<Arc<Instance>> {
        let settings = self.settings();
        let now = now_nanos();
        let oc = &settings.outlier;
        let inst = Arc::new(Instance {
            id: id.to_string(),
            addr,
            authority: addr.to_string().parse().ok()?,
            weight: weight.max(1),
            load: Arc::new(Load::new()),
            metrics: InstanceMetrics::default(),
            idle: crate::upstream::Idle::default(),
            state: AtomicU8::new(if gated { 0 } else { 1 }),
            healthy: AtomicBool::new(!gated),
            ever_healthy: AtomicBool::new(!gated),
            owner_gated,
            health: Mutex::new(
                settings
                    .active_health
                    .map(|(rise, fall)| ActiveHealth::new(rise, fall, !gated)),
            ),
            outlier: Mutex::new(Outlier::new(BalanceOutlier {
                consecutive_errors: oc.consecutive_errors,
                base_ejection_nanos: oc.base_ejection.0.as_nanos() as u64,
                max_ejection_nanos: oc.max_ejection.0.as_nanos() as u64,
            })),
            fail_streak: std::sync::atomic::AtomicU32::new(0),
            ejected_until: AtomicU64::new(0),
            ready_since: AtomicU64::new(now),
        });
        {
            let mut m = self.members.lock().expect("members lock");
            // A draining instance may still hold the id (re-added on reload): the new one
            // lives beside it until the old one is gone.
            if m.iter().any(|i| {
                i.id == id
                    && i.state() != State::Draining
                    && !replacing.is_some_and(|r| Arc::ptr_eq(r, i))
            }) {
                return None;
            }
            m.push(inst.clone());
        }
        tracing::info!(service = %self.service, instance = id, %addr, gated, "instance added");
        self.rebuild();
        Some(inst)
    }

    /// Marks an instance draining: no new requests from now on.
    pub fn drain(&self, id: &str) -> Option<Arc<Instance>> {
        let inst = self.get(id)?;
        if inst.state() != State::Draining {
            inst.set_state(State::Draining);
            tracing::info!(service = %self.service, instance = id, in_flight = inst.in_flight(), "draining");
            self.rebuild();
        }
        Some(inst)
    }

    /// Drains an instance, waits until its in-flight requests finish (or `timeout`), then
    /// removes it. Returns the in-flight count left at removal (0 unless the timeout hit).
    pub async fn remove(&self, id: &str, timeout: Duration) -> Option<u64> {
        let inst = self.drain(id)?;
        Some(self.remove_drained(inst, timeout).await)
    }

    /// Second half of [`Pool::remove`] for an instance already drained (e.g. replaced by a
    /// namesake with another weight): wait for its in-flight requests, then forget it.
    pub async fn remove_drained(&self, inst: Arc<Instance>, timeout: Duration) -> u64 {
        let id = inst.id.as_str();
        // Pairs with the fence after `Load::start` in the request path: a request either sees
        // the instance draining and picks again, or is seen in flight here.
        std::sync::atomic::fence(Ordering::SeqCst);
        let deadline = tokio::time::Instant::now() + timeout;
        while inst.in_flight() > 0 && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let left = inst.in_flight();
        if left > 0 {
            tracing::warn!(service = %self.service, instance = id, left, "drain timeout: removing with requests in flight");
        }
        // Remove this very instance: a newer one may have been added under the same id.
        self.members
            .lock()
            .expect("members lock")
            .retain(|i| !Arc::ptr_eq(i, &inst));
        inst.idle.clear();
        self.rebuild();
        left
    }

    /// Marks a `Starting` instance ready (its owner saw it pass a startup probe): it joins the
    /// selector now, ramping up through slow start.
    pub fn mark_ready(&self, id: &str) -> bool {
        let Some(inst) = self.get(id) else {
            return false;
        };
        if inst.state() != State::Starting {
            return false;
        }
        if let Some((rise, fall)) = self.settings().active_health {
            *inst.health.lock().expect("health lock") = Some(ActiveHealth::new(rise, fall, true));
        }
        inst.healthy.store(true, Ordering::Release);
        inst.ever_healthy.store(true, Ordering::Release);
        inst.ready_since.store(now_nanos(), Ordering::Release);
        inst.set_state(State::Ready);
        tracing::info!(service = %self.service, instance = id, "instance ready");
        self.rebuild();
        true
    }

    /// Applies one active probe result.
    pub fn record_probe(&self, inst: &Instance, ok: bool) {
        if !ok {
            inst.metrics.health_failures.inc();
        }
        let flip = {
            let mut h = inst.health.lock().expect("health lock");
            h.as_mut().and_then(|h| h.record(ok))
        };
        if let Some(healthy) = flip {
            inst.healthy.store(healthy, Ordering::Release);
            if healthy {
                inst.ready_since.store(now_nanos(), Ordering::Release);
                if !inst.ever_healthy.swap(true, Ordering::AcqRel)
                    && inst.state() == State::Starting
                {
                    inst.set_state(State::Ready);
                }
            }
            tracing::info!(service = %self.service, instance = %inst.id, healthy, "health changed");
            self.rebuild();
        }
    }

    /// Applies a passive result (response < 500 = success; connect error / 5xx = failure),
    /// ejecting the instance when it crosses the threshold and the pool allows another ejection.
    pub fn record_result(&self, inst: &Instance, success: bool, now: u64) {
        // Fast path: a success after a success changes nothing; skip the lock.
        if success {
            if inst.fail_streak.swap(0, Ordering::Relaxed) == 0 {
                return;
            }
        } else {
            inst.fail_streak.fetch_add(1, Ordering::Relaxed);
        }
        let cross = {
            let mut o = inst.outlier.lock().expect("outlier lock");
            o.record(success, now)
        };
        if !cross || inst.is_ejected(now) {
            return;
        }
        let members = self.members();
        let routable: Vec<_> = members
            .iter()
            .filter(|i| i.state() == State::Ready)
            .collect();
        let ejected = routable.iter().filter(|i| i.is_ejected(now)).count();
        let max_pct = self.settings().outlier.max_ejected_percent;
        if ejected >= allowed_ejections(routable.len(), max_pct) {
            tracing::debug!(service = %self.service, instance = %inst.id, "ejection refused: max ejected share reached");
            return;
        }
        let until = {
            let mut o = inst.outlier.lock().expect("outlier lock");
            o.eject(now);
            // Mirrored into an atomic so the request path reads it without the lock.
            o.ejected_until().unwrap_or(now)
        };
        inst.ejected_until.store(until, Ordering::Release);
        inst.metrics.ejections.inc();
        tracing::warn!(service = %self.service, instance = %inst.id, for_ms = (until - now) / 1_000_000, "instance ejected");
        self.rebuild();
    }

    /// Time-driven upkeep: ends expired ejections and advances slow start. Returns true when
    /// it rebuilt the selector.
    pub fn tick(&self) -> bool {
        let now = now_nanos();
        let settings = self.settings();
        let window = settings.slow_start.as_nanos() as u64;
        let mut dirty = false;
        for i in self.members() {
            let u = i.ejected_until.load(Ordering::Acquire);
            if u != 0 && u <= now {
                i.ejected_until.store(0, Ordering::Release);
                i.ready_since.store(now, Ordering::Release);
                tracing::info!(service = %self.service, instance = %i.id, "ejection ended");
                dirty = true;
            }
            if window > 0 && i.state() == State::Ready {
                let since = now.saturating_sub(i.ready_since.load(Ordering::Acquire));
                // Rebuild while ramping, plus once after the window to reach full weight.
                if since < window + 1_000_000_000 {
                    dirty = true;
                }
            }
        }
        if dirty {
            self.rebuild();
        }
        dirty
    }

    /// Recomputes the eligible set and weights and publishes a new snapshot.
    pub fn rebuild(&self) {
        // Serialized so a rebuild computed from older state never overwrites a newer one.
        let _one_at_a_time = self.rebuild_lock.lock().expect("rebuild lock");
        let now = now_nanos();
        let settings = self.settings();
        let members = self.members();
        let routable: Vec<&Arc<Instance>> = members
            .iter()
            .filter(|i| i.state() == State::Ready)
            .collect();
        let healthy: Vec<&Arc<Instance>> = routable
            .iter()
            .copied()
            .filter(|i| i.is_healthy())
            .collect();
        let mut eligible: Vec<&Arc<Instance>> = healthy
            .iter()
            .copied()
            .filter(|i| !i.is_ejected(now))
            .collect();
        let mut panic = false;
        // Ejection must never leave a service with nothing: route to the healthy ones anyway,
        // and if none is healthy, to every routable one (Envoy's panic threshold at 0).
        if eligible.is_empty() {
            eligible = healthy;
        }
        if eligible.is_empty() && !routable.is_empty() {
            eligible = routable;
            panic = true;
        }
        let window = settings.slow_start.as_nanos() as u64;
        let endpoints: Vec<Endpoint> = eligible
            .iter()
            .map(|i| Endpoint {
                id: i.id.clone(),
                weight: slow_start_weight(
                    i.weight,
                    now.saturating_sub(i.ready_since.load(Ordering::Acquire)),
                    window,
                ),
                load: i.load.clone(),
            })
            .collect();
        let seed = self.seed.fetch_add(1, Ordering::Relaxed);
        let selector = build(settings.algorithm, endpoints, seed);
        self.snapshot.store(Arc::new(Snapshot {
            instances: eligible.into_iter().cloned().collect(),
            selector,
            panic,
        }));
        self.changed.notify_waiters();
    }

    /// Instance counts by state.
    pub fn counts(&self) -> [(State, usize); 3] {
        let m = self.members();
        [State::Starting, State::Ready, State::Draining]
            .map(|s| (s, m.iter().filter(|i| i.state() == s).count()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings(algo: Algorithm) -> PoolSettings {
        PoolSettings {
            algorithm: algo,
            slow_start: Duration::ZERO,
            outlier: OutlierConfig {
                consecutive_errors: 3,
                ..OutlierConfig::default()
            },
            active_health: None,
        }
    }

    fn addr(p: u16) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], p))
    }

    #[test]
    fn draining_instance_leaves_the_selector() {
        let p = Pool::new("s", settings(Algorithm::RoundRobin));
        p.add("a", addr(1), 1, false).unwrap();
        p.add("b", addr(2), 1, false).unwrap();
        assert!(
            p.add("a", addr(3), 1, false).is_none(),
            "duplicate id refused"
        );
        assert_eq!(p.snapshot().instances.len(), 2);
        p.drain("a");
        let s = p.snapshot();
        assert_eq!(s.instances.len(), 1);
        assert_eq!(s.instances[0].id, "b");
        assert_eq!(p.counts()[2], (State::Draining, 1));
    }

    #[test]
    fn outlier_ejection_respects_max_share() {
        let p = Pool::new("s", settings(Algorithm::RoundRobin));
        let a = p.add("a", addr(1), 1, false).unwrap();
        let b = p.add("b", addr(2), 1, false).unwrap();
        for _ in 0..3 {
            p.record_result(&a, false, now_nanos());
        }
        assert!(a.is_ejected(now_nanos()));
        assert_eq!(p.snapshot().instances.len(), 1);
        // 50% of 2 = 1 ejection allowed: b stays in even when failing.
        for _ in 0..3 {
            p.record_result(&b, false, now_nanos());
        }
        assert!(!b.is_ejected(now_nanos()));
        assert_eq!(p.snapshot().instances.len(), 1);
    }

    #[test]
    fn removing_health_checks_releases_gated_instances() {
        let mut s = settings(Algorithm::RoundRobin);
        s.active_health = Some((2, 2));
        let p = Pool::new("s", s.clone());
        let a = p.add("a", addr(1), 1, true).unwrap();
        assert_eq!(a.state(), State::Starting);
        s.active_health = None;
        p.set_settings(s);
        assert_eq!(a.state(), State::Ready);
        assert_eq!(p.snapshot().instances.len(), 1);
    }

    #[test]
    fn gated_instance_waits_for_health() {
        let mut s = settings(Algorithm::RoundRobin);
        s.active_health = Some((2, 2));
        let p = Pool::new("s", s);
        let a = p.add("a", addr(1), 1, true).unwrap();
        assert_eq!(a.state(), State::Starting);
        assert!(p.snapshot().instances.is_empty());
        p.record_probe(&a, true);
        assert!(p.snapshot().instances.is_empty());
        p.record_probe(&a, true);
        assert_eq!(a.state(), State::Ready);
        assert_eq!(p.snapshot().instances.len(), 1);
        p.record_probe(&a, false);
        p.record_probe(&a, false);
        // Unhealthy and alone: still routed (panic mode) rather than failing every request.
        let snap = p.snapshot();
        assert!(snap.panic);
        assert_eq!(snap.instances.len(), 1);
    }
}
