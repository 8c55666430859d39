//! Vertical scaling of a process fleet: per-second usage into the recommender, and in
//! `auto` mode the recommendation applied in place (the live instances' cgroup limits are
//! rewritten: same pids, no restart, no request lost), within bounds, after a cool-down.
//! An OOM kill is counted and raises the memory size before the replacement starts.
//! Every change is logged, kept in the decision log (`resizes`) and counted.

use std::collections::{BTreeMap, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use shoal_proxy::metrics::Exposition;

use crate::config::VerticalMode;
use crate::process::ProcessFleet;
use crate::recommend::{after_oom, decide, Recommendation, Recommender, Resize};

/// Usage window the recommendation rests on.
const WINDOW_SECS: f64 = 3600.0;

#[derive(Debug)]
pub struct VerticalState {
    start: Instant,
    pub(crate) recommender: Recommender,
    pub(crate) last_change: Option<f64>,
    resizes: VecDeque<Resize>,
    counts: BTreeMap<(&'static str, &'static str, &'static str), u64>,
}

impl VerticalState {
    pub fn new() -> VerticalState {
        VerticalState {
            start: Instant::now(),
            recommender: Recommender::new(WINDOW_SECS),
            last_change: None,
            resizes: VecDeque::new(),
            counts: BTreeMap::new(),
        }
    }

    pub(crate) fn now(&self) -> f64 {
        self.start.elapsed().as_secs_f64()
    }

    pub(crate) fn resizes(&self) -> Vec<Resize> {
        self.resizes.iter().cloned().collect()
    }

    /// The recommendation, unless vertical scaling is off.
    pub(crate) fn recommendation(&self, mode: VerticalMode) -> Option<Recommendation> {
        (mode != VerticalMode::Off)
            .then(|| self.recommender.recommendation())
            .flatten()
    }

    /// `shoal_resize_decisions_total`, whichever provider resized.
    pub(crate) fn collect_decisions(&self, svc: &str, e: &mut Exposition) {
        for ((resource, direction, reason), n) in &self.counts {
            e.counter(
                "shoal_resize_decisions_total",
                "In-place per-instance size changes, by resource, direction and reason.",
                &[
                    ("service", svc),
                    ("resource", resource),
                    ("direction", direction),
                    ("reason", reason),
                ],
                *n,
            );
        }
    }

    pub(crate) fn record(&mut self, r: Resize) {
        tracing::info!(
            resource = r.resource,
            direction = r.direction,
            reason = r.reason,
            from = r.from,
            to = r.to,
            detail = %r.detail,
            "resize decision"
        );
        *self
            .counts
            .entry((r.resource, r.direction, r.reason))
            .or_default() += 1;
        self.resizes.push_back(r);
        while self.resizes.len() > 200 {
            self.resizes.pop_front();
        }
    }
}

impl Default for VerticalState {
    fn default() -> Self {
        Self::new()
    }
}

pub(crate) fn epoch() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

pub(crate) fn mib(b: f64) -> String {
    format!("{:.0}MiB", b / (1u64 << 20) as f64)
}

impl ProcessFleet {
    /// Samples every second; in `auto` mode resizes in place. Runs until shutdown.
    pub async fn run_vertical(self: Arc<Self>) {
        if self.spec.resources.mode == VerticalMode::Off {
            return;
        }
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            if self.is_shutting_down() {
                return;
            }
            self.vertical_tick();
        }
    }

    /// One sample and, in `auto` mode, one resize decision.
    pub fn vertical_tick(&self) {
        let usage = self.sample_usage();
        self.watch_ooms();
        let mut v = self.vertical.lock().expect("vertical lock");
        let t = v.now();
        let samples: Vec<(String, f64, u64)> = usage
            .iter()
            .map(|(id, _, u)| (id.clone(), u.cpu_seconds, u.memory_bytes))
            .collect();
        v.recommender.add(t, &samples);
        if self.spec.resources.mode != VerticalMode::Auto || !self.cgroups.enforced() {
            return;
        }
        let Some(rec) = v.recommender.recommendation() else {
            return;
        };
        let current = self.cgroups.size();
        let mut changes = decide(current, &rec, &self.spec.resources, t, v.last_change);
        // A horizontal CPU target and in-place CPU resizing would fight over the same
        // signal (the VPA-with-HPA problem): then only memory is resized.
        if self.spec.cpu_scaled_horizontally() {
            changes.retain(|(resource, _, _)| *resource != "cpu");
        }
        for (resource, from, to) in changes {
            let mut size = self.cgroups.size();
            if resource == "memory" {
                size.memory_bytes = Some(to as u64);
            } else {
                size.cpu = Some(to);
            }
            let applied_to = self.resize_live(size);
            v.last_change = Some(t);
            v.record(recommended(
                (resource, from, to),
                &rec,
                &self.spec.resources,
                applied_to,
            ));
        }
    }

    /// Writes `size` to every live instance's cgroup and makes it the size of new ones.
    /// Returns the instances (id, pid) changed in place.
    fn resize_live(&self, size: crate::cgroup::Size) -> Vec<(String, u32)> {
        self.cgroups.set_size(size);
        let live: Vec<(String, Option<u32>, crate::cgroup::InstanceCgroup)> = {
            let s = self.state.lock().expect("fleet lock");
            s.instances
                .iter()
                .filter_map(|(id, p)| Some((id.clone(), p.pid, p.cgroup.clone()?)))
                .collect()
        };
        let mut done = Vec::new();
        for (id, pid, cg) in live {
            match cg.apply(size) {
                Ok(()) => done.extend(pid.map(|p| (id, p))),
                Err(e) => {
                    self.metrics.resize_failures.inc();
                    tracing::warn!(service = %self.spec.service, instance = %id, error = %e, "in-place resize failed");
                }
            }
        }
        done
    }

    /// Notices OOM kills inside live instances (a worker killed while the main process
    /// lives on) and reacts as to a crash by OOM.
    fn watch_ooms(&self) {
        let live: Vec<(String, crate::cgroup::InstanceCgroup, u64)> = {
            let s = self.state.lock().expect("fleet lock");
            s.instances
                .iter()
                .filter_map(|(id, p)| Some((id.clone(), p.cgroup.clone()?, p.ooms_seen)))
                .collect()
        };
        for (id, cg, seen) in live {
            let Some(kills) = cg.oom_kills().kills else {
                continue;
            };
            if kills > seen {
                if let Some(p) = self
                    .state
                    .lock()
                    .expect("fleet lock")
                    .instances
                    .get_mut(&id)
                {
                    p.ooms_seen = kills;
                }
                self.on_oom(&id, kills - seen);
            }
        }
    }

    /// Called when an instance's main process exited: was it (or its tree) OOM-killed?
    /// Returns a note for the failure message ("" if not).
    pub(crate) fn check_oom(&self, id: &str, status: Option<&std::process::ExitStatus>) -> String {
        use std::os::unix::process::ExitStatusExt;
        let (cg, seen) = {
            let s = self.state.lock().expect("fleet lock");
            match s.instances.get(id) {
                Some(p) => (p.cgroup.clone(), p.ooms_seen),
                None => return String::new(),
            }
        };
        let Some(cg) = cg else {
            return String::new();
        };
        let c = cg.oom_kills();
        let killed = status.and_then(|s| s.signal()) == Some(9);
        let new = match c.kills {
            Some(k) => k.saturating_sub(seen),
            // Older v1 kernels: hitting the limit and dying by SIGKILL.
            None => (killed && c.failcnt.unwrap_or(0) > 0) as u64,
        };
        if new > 0 {
            if let Some(p) = self.state.lock().expect("fleet lock").instances.get_mut(id) {
                p.ooms_seen += new;
            }
            self.on_oom(id, new);
        }
        // The per-second watch may have counted this kill already; the note still belongs
        // to the exit.
        if new > 0 || (killed && c.kills.unwrap_or(0) > 0) {
            " (OOM-killed: memory limit reached)".into()
        } else {
            String::new()
        }
    }

    /// Counts the kill and, in `auto` mode, raises the memory size at once (no cool-down:
    /// the replacement must not die the same way).
    fn on_oom(&self, id: &str, kills: u64) {
        self.metrics.oom_kills.add(kills);
        let limit = self.cgroups.size().memory_bytes;
        tracing::warn!(service = %self.spec.service, instance = %id, kills, limit_bytes = ?limit, "OOM kill");
        let mut v = self.vertical.lock().expect("vertical lock");
        let t = v.now();
        let Some(limit) = limit else { return };
        v.recommender.oom(t, limit);
        if self.spec.resources.mode != VerticalMode::Auto {
            return;
        }
        let rec = v.recommender.recommendation();
        match after_oom(limit, rec.as_ref(), &self.spec.resources) {
            Some(to) => {
                let mut size = self.cgroups.size();
                size.memory_bytes = Some(to);
                let applied_to = self.resize_live(size);
                v.last_change = Some(t);
                v.record(Resize {
                    epoch_secs: epoch(),
                    resource: "memory",
                    direction: "up",
                    reason: "oom_kill",
                    from: limit as f64,
                    to: to as f64,
                    detail: format!(
                        "instance {id} was OOM-killed at {}: ×1.5 (or the recommendation) → {}",
                        mib(limit as f64),
                        mib(to as f64)
                    ),
                    applied_to,
                });
            }
            None => {
                tracing::error!(service = %self.spec.service, max = self.spec.resources.memory_bounds.1, "OOM kill at the max_memory bound: cannot grow")
            }
        }
    }

    pub fn recommendation(&self) -> Option<Recommendation> {
        self.vertical
            .lock()
            .expect("vertical lock")
            .recommendation(self.spec.resources.mode)
    }

    pub fn resizes(&self) -> Vec<Resize> {
        self.vertical.lock().expect("vertical lock").resizes()
    }

    pub(crate) fn collect_vertical(&self, e: &mut Exposition) {
        let svc = self.spec.service.as_str();
        self.vertical
            .lock()
            .expect("vertical lock")
            .collect_decisions(svc, e);
        e.counter(
            "shoal_oom_kills_total",
            "Instances (or processes inside them) killed for reaching their memory limit.",
            &[("service", svc)],
            self.metrics.oom_kills.get(),
        );
        e.counter(
            "shoal_resize_failures_total",
            "Limits that could not be written to an instance's cgroup.",
            &[("service", svc)],
            self.metrics.resize_failures.get(),
        );
        collect_size(svc, self.cgroups.size(), e);
    }
}

/// The per-instance size gauges, whichever provider sizes the instances.
pub(crate) fn collect_size(svc: &str, size: crate::cgroup::Size, e: &mut Exposition) {
    if let Some(c) = size.cpu {
        e.gauge(
            "shoal_instance_cpu_limit_cores",
            "CPU quota of each instance (cores).",
            &[("service", svc)],
            c,
        );
    }
    if let Some(m) = size.memory_bytes {
        e.gauge(
            "shoal_instance_memory_limit_bytes",
            "Memory limit of each instance.",
            &[("service", svc)],
            m as f64,
        );
    }
}

/// The decision-log entry of a resize the recommendation asked for.
pub(crate) fn recommended(
    (resource, from, to): (&'static str, f64, f64),
    rec: &Recommendation,
    cfg: &crate::config::Resources,
    applied_to: Vec<(String, u32)>,
) -> Resize {
    let detail = if resource == "memory" {
        format!(
            "peak working set over the last hour {} (+20%) → {}; bounds {}..{}",
            mib(rec.memory_bytes as f64 / 1.2),
            mib(to),
            mib(cfg.memory_bounds.0 as f64),
            mib(cfg.memory_bounds.1 as f64)
        )
    } else {
        format!(
            "p90 of per-instance CPU (+15%) is {:.2} cores over {} samples → {to:.2}; bounds {}..{}",
            rec.cpu, rec.samples, cfg.cpu_bounds.0, cfg.cpu_bounds.1
        )
    };
    Resize {
        epoch_secs: epoch(),
        resource,
        direction: if to > from { "up" } else { "down" },
        reason: "recommendation",
        from,
        to,
        detail,
        applied_to,
    }
}
