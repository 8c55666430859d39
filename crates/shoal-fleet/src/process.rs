//! The `process` provider: runs instances as local child processes.
//!
//! A reconciler converges the number of live instances on the desired count. Each instance
//! has a supervisor task that owns its child: it probes the new instance until its first
//! passing health check (only then does the pool route to it), watches for crashes, and
//! stops it without losing requests: drain (no new requests) → in-flight reaches 0 or the
//! drain timeout → SIGTERM → grace → SIGKILL, each signal to the instance's whole process
//! group (and its cgroup), so what an `sh -c` wrapper or a pre-forking server started goes
//! too. Failed starts and crashes back off exponentially (1 s doubling to 60 s), so a
//! command that keeps crashing is a visible state, not a busy loop. Instances are recorded
//! in the run file (see `supervise`) so none outlives shoal.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use nix::sys::signal::{killpg, Signal};
use nix::unistd::Pid;
use serde::Serialize;
use shoal_proxy::metrics::{Counter, Exposition};
use tokio::process::{Child, Command};
use tokio::sync::{watch, Notify};

use crate::cgroup::{Cgroups, InstanceCgroup, Size};
use crate::cluster::{FleetView, Leadership, SharedMember};
use crate::config::FleetSpec;
use crate::provider::{BoxFuture, Member, Membership, Provider};
use crate::supervise::{Record, Registry};
use crate::usage::{start_ticks, ProcTable, Usage};

pub use crate::provider::Phase;

/// The local-process provider's entry in the registry.
pub static KIND: crate::registry::ProviderKind = crate::registry::ProviderKind {
    name: "process",
    scales: true,
    local_processes: true,
    sized_by_platform: false,
    lease_election: false,
    check: check_fleet,
    start: start_fleet,
};

fn check_fleet(
    fleet: &crate::config::FleetConfig,
    _autoscale: bool,
) -> Result<(), crate::registry::FieldError> {
    let words = fleet.command.words();
    let Some(program) = words.first() else {
        return Err(("command", "the process provider needs a command".into()));
    };
    if program != "shoal" && crate::config::find_program(program).is_none() {
        return Err((
            "command",
            format!("cannot start {program:?}: not found or not executable"),
        ));
    }
    Ok(())
}

fn start_fleet(s: crate::registry::Start<'_>) -> Result<Arc<dyn Provider>, String> {
    let registry = s.processes.ok_or("no process supervisor")?;
    let fleet = ProcessFleet::new(s.spec.clone(), s.members, registry, s.leadership)
        .map_err(|e| e.to_string())?;
    tokio::spawn(fleet.clone().run());
    tokio::spawn(fleet.clone().run_vertical());
    Ok(fleet)
}

#[derive(Debug)]
pub(crate) struct Proc {
    port: u16,
    pub(crate) pid: Option<u32>,
    phase: Phase,
    started: Instant,
    ready_at: Option<Instant>,
    stop: watch::Sender<bool>,
    usage: Usage,
    pub(crate) cgroup: Option<InstanceCgroup>,
    /// OOM kills seen in its cgroup so far.
    pub(crate) ooms_seen: u64,
}

#[derive(Debug, Default)]
pub(crate) struct State {
    desired: u32,
    /// Bounds in force (the config's, updated on reload).
    min: u32,
    max: u32,
    pub(crate) instances: BTreeMap<String, Proc>,
    next_id: u64,
    failures: u32,
    backoff_until: Option<Instant>,
    last_failure: Option<Instant>,
    last_error: Option<String>,
    shutting_down: bool,
    /// The last usage sample: (when, samples), shared by the autoscaler and the vertical loop.
    last_sample: Option<(Instant, Vec<Sample>)>,
}

/// One instance's usage sample: (id, phase, usage).
pub type Sample = (String, Phase, Usage);

/// Counters of fleet events.
#[derive(Debug, Default)]
pub struct FleetMetrics {
    pub starts: Counter,
    pub crashes: Counter,
    pub failed_starts: Counter,
    pub stops: Counter,
    pub forced_kills: Counter,
    pub oom_kills: Counter,
    pub resize_failures: Counter,
}

/// A snapshot of one instance for the API and the autoscaler.
#[derive(Debug, Clone, Serialize)]
pub struct InstanceView {
    pub id: String,
    pub port: u16,
    pub pid: Option<u32>,
    pub phase: Phase,
    pub uptime_secs: f64,
    pub cpu_seconds: f64,
    pub memory_bytes: u64,
    /// CPU cores and memory bytes the kernel enforces now (None: unlimited/not enforced).
    pub cpu_limit: Option<f64>,
    pub memory_limit_bytes: Option<u64>,
}

/// The process provider of one service.
pub struct ProcessFleet {
    pub spec: FleetSpec,
    pool: Arc<dyn Membership>,
    program: PathBuf,
    args: Vec<String>,
    pub(crate) state: Mutex<State>,
    wake: Notify,
    pub metrics: FleetMetrics,
    pub cgroups: Cgroups,
    logs: PathBuf,
    registry: Arc<Registry>,
    pub(crate) vertical: Mutex<crate::vertical::VerticalState>,
    /// With replicas (`[cluster]`): the election. Only the leader runs instances; its
    /// instances outlive it (no watchdog, no kill on drop) so the next leader adopts them.
    cluster: Option<Arc<Leadership>>,
    /// Bumped when a leader hands its instances over: their supervisors end quietly.
    epoch: watch::Sender<u64>,
    /// A follower's view: the members it routes to (announced to the pool) and the
    /// leader's published fleet.
    mirrored: Mutex<BTreeMap<String, (SocketAddr, Phase)>>,
    view: Mutex<Option<FleetView>>,
}

/// How long a shared fleet's leader waits, after draining an instance, before signalling
/// it: followers stop routing to it within a mirror period (250 ms) of the publication.
const FOLLOWER_SYNC: Duration = Duration::from_secs(1);

fn free_port() -> std::io::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

fn backoff(failures: u32) -> Duration {
    Duration::from_secs(1u64 << failures.saturating_sub(1).min(6)).min(Duration::from_secs(60))
}

impl ProcessFleet {
    /// Builds the fleet; `run` starts it.
    pub fn new(
        spec: FleetSpec,
        pool: Arc<dyn Membership>,
        registry: Arc<Registry>,
        cluster: Option<Arc<Leadership>>,
    ) -> std::io::Result<Arc<ProcessFleet>> {
        let words = spec.fleet.command.words();
        let (program, args) = match words.split_first() {
            Some((p, a)) if p == "shoal" => (std::env::current_exe()?, a.to_vec()),
            Some((p, a)) => (
                crate::config::find_program(p).ok_or_else(|| {
                    std::io::Error::new(std::io::ErrorKind::NotFound, format!("{p}: not found"))
                })?,
                a.to_vec(),
            ),
            None => {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::InvalidInput,
                    "empty command",
                ))
            }
        };
        let logs = spec.data_dir.join("logs").join(&spec.service);
        std::fs::create_dir_all(&logs)?;
        // Shared fleets run without cgroups: a run's cgroups go with the replica that made
        // them, and instances must outlive it.
        let size = if cluster.is_some() {
            if spec.resources.cpu.is_some() || spec.resources.memory_bytes.is_some() {
                tracing::warn!(service = %spec.service, "[cluster]: per-instance limits are not enforced on a shared process fleet");
            }
            Size {
                cpu: None,
                memory_bytes: None,
            }
        } else {
            Size {
                cpu: spec.resources.cpu,
                memory_bytes: spec.resources.memory_bytes,
            }
        };
        let cgroups = Cgroups::setup(&spec.service, size);
        for root in cgroups.run_dirs() {
            registry.add_cgroup_root(root);
        }
        // Ids continue after the last one any previous run used: no run reuses another's
        // log file or cgroup.
        let next_id = Registry::last_id(&logs, &spec.service);
        let desired = spec.fleet.min;
        Ok(Arc::new(ProcessFleet {
            pool,
            program,
            args,
            state: Mutex::new(State {
                desired,
                min: spec.fleet.min,
                max: spec.fleet.max,
                next_id,
                ..State::default()
            }),
            wake: Notify::new(),
            metrics: FleetMetrics::default(),
            cgroups,
            logs,
            registry,
            vertical: Mutex::new(crate::vertical::VerticalState::new()),
            spec,
            cluster,
            epoch: watch::channel(0).0,
            mirrored: Mutex::new(BTreeMap::new()),
            view: Mutex::new(None),
        }))
    }

    /// Sets the desired count (clamped to min..=max) and wakes the reconciler.
    pub fn scale(&self, n: u32) -> u32 {
        let mut s = self.state.lock().expect("fleet lock");
        let n = n.clamp(s.min, s.max);
        if s.desired != n {
            tracing::info!(service = %self.spec.service, from = s.desired, to = n, "scaling");
            s.desired = n;
        }
        drop(s);
        self.wake.notify_one();
        n
    }

    pub fn desired(&self) -> u32 {
        self.state.lock().expect("fleet lock").desired
    }

    /// Instances by phase: (starting, ready, stopping).
    pub fn counts(&self) -> (u32, u32, u32) {
        let s = self.state.lock().expect("fleet lock");
        let c = |p| s.instances.values().filter(|i| i.phase == p).count() as u32;
        (c(Phase::Starting), c(Phase::Ready), c(Phase::Stopping))
    }

    pub fn instances(&self) -> Vec<InstanceView> {
        let s = self.state.lock().expect("fleet lock");
        s.instances
            .iter()
            .map(|(id, p)| InstanceView {
                id: id.clone(),
                port: p.port,
                pid: p.pid,
                phase: p.phase,
                uptime_secs: p.started.elapsed().as_secs_f64(),
                cpu_seconds: p.usage.cpu_seconds,
                memory_bytes: p.usage.memory_bytes,
                cpu_limit: p.cgroup.as_ref().and_then(|c| c.limits().0),
                memory_limit_bytes: p.cgroup.as_ref().and_then(|c| c.limits().1),
            })
            .collect()
    }

    /// The fleet's health as shown in the API: `ok`, or `backoff` with the last error.
    pub fn status(&self) -> serde_json::Value {
        let s = self.state.lock().expect("fleet lock");
        let backoff = s
            .backoff_until
            .map(|u| u.saturating_duration_since(Instant::now()).as_secs_f64())
            .filter(|d| *d > 0.0);
        let mut resources = self.cgroups.describe();
        resources["mode"] = serde_json::to_value(self.spec.resources.mode).unwrap_or_default();
        serde_json::json!({
            "state": if backoff.is_some() { "backoff" } else if s.failures > 0 { "recovering" } else { "ok" },
            "consecutive_failures": s.failures,
            "backoff_secs": backoff,
            "last_error": s.last_error,
            "resources": resources,
        })
    }

    /// Re-reads CPU and memory of every live instance: CPU summed over its process tree,
    /// memory as its cgroup's working set where it has one, else the tree's resident size.
    /// Samples younger than 50 ms are shared (the autoscaler's sampler and saturation probe
    /// and the vertical loop ask at once). Callers turn CPU seconds into a rate over their
    /// own interval, so an older shared sample would skew it by its age (±50 % at 500 ms).
    pub fn sample_usage(&self) -> Vec<(String, Phase, Usage)> {
        {
            let s = self.state.lock().expect("fleet lock");
            if let Some((at, v)) = &s.last_sample {
                if at.elapsed() < Duration::from_millis(50) {
                    return v.clone();
                }
            }
        }
        let pids: Vec<(String, u32, Option<InstanceCgroup>)> = {
            let s = self.state.lock().expect("fleet lock");
            s.instances
                .iter()
                .filter_map(|(id, p)| Some((id.clone(), p.pid?, p.cgroup.clone())))
                .collect()
        };
        // The scan reads /proc without the fleet lock held.
        let table = ProcTable::scan();
        let mut fresh = Vec::new();
        for (id, pid, cg) in pids {
            if let Some(mut u) = table.usage(pid) {
                if let Some(ws) = cg.as_ref().and_then(|c| c.memory_working_set()) {
                    u.memory_bytes = ws;
                }
                fresh.push((id, u));
            }
        }
        let mut s = self.state.lock().expect("fleet lock");
        let mut out = Vec::new();
        for (id, u) in fresh {
            if let Some(p) = s.instances.get_mut(&id) {
                p.usage = u;
                out.push((id, p.phase, u));
            }
        }
        s.last_sample = Some((Instant::now(), out.clone()));
        out
    }

    /// Runs the reconciler until `shutdown` is called. With replicas it acts only while
    /// this replica leads, and publishes every change (fenced) before acting on it; a
    /// follower routes to the members the leader published.
    pub async fn run(self: Arc<Self>) {
        let mut leading = false;
        loop {
            if let Some(c) = self.cluster.clone() {
                let now = c.is_leader();
                if now && !leading {
                    self.adopt(&c).await;
                } else if !now && leading && !c.resigned() {
                    self.release();
                }
                if c.resigned() {
                    // Shutting down: `shutdown` decides whether to stop or hand over.
                    if self.state.lock().expect("fleet lock").instances.is_empty() {
                        return;
                    }
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
                leading = now;
                if self.is_shutting_down()
                    && (!leading || self.state.lock().expect("fleet lock").instances.is_empty())
                {
                    return;
                }
                if !leading {
                    self.mirror(&c).await;
                    tokio::select! {
                        _ = self.wake.notified() => {}
                        _ = tokio::time::sleep(Duration::from_millis(250)) => {}
                    }
                    continue;
                }
            }
            let (to_start, to_stop, wait) = self.plan();
            if let Some(c) = &self.cluster {
                // The intent goes out first, fenced: a deposed leader learns it here
                // (refused) and acts on nothing.
                if (to_start > 0 || !to_stop.is_empty()) && !self.publish(c).await {
                    for (id, _) in &to_stop {
                        if let Some(p) =
                            self.state.lock().expect("fleet lock").instances.get_mut(id)
                        {
                            p.phase = Phase::Ready;
                        }
                    }
                    // Redis down or slow: try again shortly (the renew deadline ends this).
                    tokio::time::sleep(Duration::from_millis(250)).await;
                    continue;
                }
            }
            for _ in 0..to_start {
                // After a failed spawn, wait out the backoff instead of failing the whole batch.
                if !self.clone().start_one() {
                    break;
                }
            }
            for (id, stop) in to_stop {
                tracing::info!(service = %self.spec.service, instance = %id, "stopping instance (scale-in)");
                let _ = stop.send(true);
            }
            if self.state.lock().expect("fleet lock").shutting_down
                && self.state.lock().expect("fleet lock").instances.is_empty()
            {
                return;
            }
            if let Some(c) = &self.cluster {
                self.publish(c).await;
            }
            tokio::select! {
                _ = self.wake.notified() => {}
                _ = tokio::time::sleep(wait) => {}
            }
        }
    }

    /// Decides what to start and stop now; returns how long to wait before looking again.
    fn plan(&self) -> (u32, Vec<(String, watch::Sender<bool>)>, Duration) {
        let mut s = self.state.lock().expect("fleet lock");
        let now = Instant::now();
        // An instance that became ready after the last failure and stayed up a while proves
        // the command works: forgive past failures. (Older healthy instances prove nothing
        // about the new ones that keep failing.)
        let last_failure = s.last_failure;
        if s.failures > 0
            && s.instances.values().any(|p| {
                p.ready_at.is_some_and(|r| {
                    last_failure.is_none_or(|f| r > f)
                        && now.duration_since(r) > Duration::from_secs(10)
                })
            })
        {
            s.failures = 0;
            s.backoff_until = None;
        }
        let desired = if s.shutting_down { 0 } else { s.desired };
        let live: Vec<(&String, &Proc)> = s
            .instances
            .iter()
            .filter(|(_, p)| p.phase != Phase::Stopping)
            .collect();
        let n = live.len() as u32;
        let mut wait = Duration::from_millis(500);
        if n < desired {
            match s.backoff_until {
                Some(u) if u > now => {
                    wait = u - now;
                    return (0, Vec::new(), wait);
                }
                _ => return (desired - n, Vec::new(), wait),
            }
        }
        let mut stop = Vec::new();
        if n > desired {
            // Stop instances that serve nothing yet first, then the newest ready ones.
            let mut victims: Vec<(&String, &Proc)> = live;
            victims.sort_by_key(|(_, p)| (p.phase == Phase::Ready, std::cmp::Reverse(p.started)));
            let ids: Vec<String> = victims
                .iter()
                .take((n - desired) as usize)
                .map(|(id, _)| (*id).clone())
                .collect();
            for id in ids {
                if let Some(p) = s.instances.get_mut(&id) {
                    p.phase = Phase::Stopping;
                    stop.push((id, p.stop.clone()));
                }
            }
        }
        (0, stop, wait)
    }

    fn fail(&self, msg: String, crash: bool) {
        let mut s = self.state.lock().expect("fleet lock");
        s.failures += 1;
        s.last_failure = Some(Instant::now());
        let b = backoff(s.failures);
        s.backoff_until = Some(Instant::now() + b);
        tracing::warn!(service = %self.spec.service, failures = s.failures, backoff_s = b.as_secs(), error = %msg, "instance failed");
        s.last_error = Some(msg);
        if crash {
            self.metrics.crashes.inc();
        } else {
            self.metrics.failed_starts.inc();
        }
    }

    /// Launches one instance; false if it could not be spawned.
    fn start_one(self: Arc<Self>) -> bool {
        let (id, port) = {
            let mut s = self.state.lock().expect("fleet lock");
            s.next_id += 1;
            let id = format!("{}-{}", self.spec.service, s.next_id);
            match free_port() {
                Ok(p) => (id, p),
                Err(e) => {
                    drop(s);
                    self.fail(format!("no free port: {e}"), false);
                    return false;
                }
            }
        };
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.logs.join(format!("{id}.log")));
        let (out, err) = match log.and_then(|f| Ok((f.try_clone()?, f))) {
            Ok((a, b)) => (Stdio::from(a), Stdio::from(b)),
            Err(e) => {
                tracing::warn!(error = %e, "cannot open instance log; discarding its output");
                (Stdio::null(), Stdio::null())
            }
        };
        let cgroup = match self.cgroups.create(&id) {
            Some(Ok(cg)) => Some(cg),
            Some(Err(e)) => {
                // Limits that cannot be applied are visible and counted, not fatal.
                tracing::warn!(service = %self.spec.service, instance = %id, error = %e, "cannot apply resource limits");
                self.metrics.resize_failures.inc();
                None
            }
            None => None,
        };
        let helper = crate::supervise::self_exe();
        let mut cmd = match (&cgroup, helper) {
            // Join the cgroup before the command runs, so all it forks is inside.
            (Some(cg), Some(exe)) => {
                let mut c = Command::new(exe);
                c.arg("_exec");
                for f in cg.procs_files() {
                    c.arg("--join").arg(f);
                }
                c.arg("--").arg(&self.program).args(&self.args);
                c
            }
            _ => {
                let mut c = Command::new(&self.program);
                c.args(&self.args);
                c
            }
        };
        cmd.envs(&self.spec.fleet.env)
            .env("PORT", port.to_string())
            .env("SHOAL_INSTANCE", &id)
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            // Its own process group: stopped as a group, and a terminal's Ctrl-C reaches
            // shoal (which drains) rather than the instances directly.
            .process_group(0)
            // A shared fleet's instances outlive this replica: the next leader adopts them.
            .kill_on_drop(self.cluster.is_none());
        let child = match cmd.spawn() {
            Ok(c) => c,
            Err(e) => {
                if let Some(cg) = &cgroup {
                    cg.remove();
                }
                self.fail(
                    format!("cannot start {}: {e}", self.program.display()),
                    false,
                );
                return false;
            }
        };
        let pid = child.id();
        let start = pid.and_then(start_ticks);
        if let Some(pid) = pid.filter(|_| self.cluster.is_none()) {
            if let (Some(cg), None) = (&cgroup, helper) {
                for f in cg.procs_files() {
                    if let Err(e) = std::fs::write(&f, pid.to_string()) {
                        tracing::warn!(instance = %id, error = %e, "cannot join cgroup");
                    }
                }
            }
            self.registry.add(Record {
                service: self.spec.service.clone(),
                id: id.clone(),
                pid,
                start: start_ticks(pid).unwrap_or(0),
                cgroup: cgroup.clone(),
            });
        }
        let (stop, stop_rx) = watch::channel(false);
        self.state.lock().expect("fleet lock").instances.insert(
            id.clone(),
            Proc {
                port,
                pid,
                phase: Phase::Starting,
                started: Instant::now(),
                ready_at: None,
                stop,
                usage: Usage::default(),
                cgroup,
                ooms_seen: 0,
            },
        );
        self.metrics.starts.inc();
        let addr = SocketAddr::from(([127, 0, 0, 1], port));
        self.pool.add(&id, addr);
        tracing::info!(service = %self.spec.service, instance = %id, %addr, ?pid, "instance started");
        match (&self.cluster, pid, start) {
            // Watched by pid, not through the child handle: a next leader watches it the
            // same way. Tokio reaps the dropped child when it exits.
            (Some(_), Some(pid), Some(start)) => {
                drop(child);
                let epoch = self.epoch.subscribe();
                tokio::spawn(self.supervise_pid(id, addr, pid, start, stop_rx, false, epoch));
            }
            _ => {
                tokio::spawn(self.supervise(id, addr, child, stop_rx));
            }
        }
        true
    }

    async fn supervise(
        self: Arc<Self>,
        id: String,
        addr: SocketAddr,
        mut child: Child,
        mut stop: watch::Receiver<bool>,
    ) {
        let startup_deadline = tokio::time::Instant::now() + self.spec.fleet.startup_timeout.0;
        let path = self.spec.fleet.health_path.clone();
        // Startup: probe fast until the first pass; nothing is routed here before it.
        let ready = loop {
            tokio::select! {
                status = child.wait() => {
                    let oom = self.check_oom(&id, status.as_ref().ok());
                    self.fail(format!("instance {id} exited during startup: {}{oom}", status.map_or_else(|e| e.to_string(), |s| s.to_string())), false);
                    self.forget(&id).await;
                    return;
                }
                _ = shoal_proxy::server::stopped(&mut stop) => break false,
                _ = tokio::time::sleep(Duration::from_millis(50)) => {
                    if self.spec.probe.probe(addr, &path, Duration::from_millis(500)).await {
                        break true;
                    }
                    if tokio::time::Instant::now() > startup_deadline {
                        self.fail(format!("instance {id} not healthy within {:?}", self.spec.fleet.startup_timeout.0), false);
                        self.signal_group(&id, child.id(), Signal::SIGKILL);
                        let _ = child.start_kill();
                        let _ = child.wait().await;
                        self.forget(&id).await;
                        return;
                    }
                }
            }
        };
        if ready {
            if let Some(p) = self
                .state
                .lock()
                .expect("fleet lock")
                .instances
                .get_mut(&id)
            {
                if p.phase == Phase::Starting {
                    p.phase = Phase::Ready;
                }
                p.ready_at = Some(Instant::now());
            }
            self.pool.ready(&id);
            tracing::info!(service = %self.spec.service, instance = %id, "instance passed its first health check");
            tokio::select! {
                status = child.wait() => {
                    let oom = self.check_oom(&id, status.as_ref().ok());
                    self.fail(format!("instance {id} crashed: {}{oom}", status.map_or_else(|e| e.to_string(), |s| s.to_string())), true);
                    self.forget(&id).await;
                    self.wake.notify_one();
                    return;
                }
                _ = shoal_proxy::server::stopped(&mut stop) => {}
            }
        }
        // Stop without losing requests: drain first, then signal.
        let left = self.pool.remove(&id, self.spec.drain_timeout).await;
        self.signal_group(&id, child.id(), Signal::SIGTERM);
        if tokio::time::timeout(self.spec.fleet.stop_grace.0, child.wait())
            .await
            .is_err()
        {
            tracing::warn!(service = %self.spec.service, instance = %id, "no exit after SIGTERM: SIGKILL");
            self.metrics.forced_kills.inc();
            self.signal_group(&id, child.id(), Signal::SIGKILL);
            let _ = child.start_kill();
            let _ = child.wait().await;
        }
        self.metrics.stops.inc();
        tracing::info!(service = %self.spec.service, instance = %id, drained_with_in_flight = left, "instance stopped");
        self.forget(&id).await;
    }

    /// Publishes this leader's fleet (fenced); false if refused or not leading any more.
    async fn publish(&self, c: &Leadership) -> bool {
        let (desired, members) = {
            let s = self.state.lock().expect("fleet lock");
            let members = s
                .instances
                .iter()
                .map(|(id, p)| SharedMember {
                    id: id.clone(),
                    addr: SocketAddr::from(([127, 0, 0, 1], p.port)),
                    phase: p.phase,
                    pid: p.pid,
                    start: p.pid.and_then(start_ticks),
                })
                .collect();
            (s.desired, members)
        };
        c.publish_fleet(desired, members).await
    }

    /// Becoming the leader: takes over the published fleet. Members still running (same
    /// pid and start time) and answering their health check are kept as they are, so the
    /// fleet neither restarts nor changes size; the published desired count carries over.
    async fn adopt(self: &Arc<Self>, c: &Leadership) {
        let view = c.read_fleet().await;
        *self.view.lock().expect("view lock") = None;
        let mirrored = std::mem::take(&mut *self.mirrored.lock().expect("mirror lock"));
        let Some(view) = view else {
            tracing::info!(service = %self.spec.service, "leading: no published fleet, starting from min");
            for (id, _) in mirrored {
                self.pool.remove(&id, Duration::ZERO).await;
            }
            return;
        };
        let mut kept = 0;
        let mut max_n = 0;
        for m in &view.members {
            if let Some(n) = m.id.rsplit('-').next().and_then(|n| n.parse::<u64>().ok()) {
                max_n = max_n.max(n);
            }
            let (Some(pid), Some(start)) = (m.pid, m.start) else {
                continue;
            };
            if !alive(pid, start) || m.phase == Phase::Stopping {
                continue;
            }
            let healthy = self
                .spec
                .probe
                .probe(
                    m.addr,
                    &self.spec.fleet.health_path,
                    Duration::from_millis(500),
                )
                .await;
            if !healthy && m.phase == Phase::Ready {
                // Not answering: stopped, and replaced by the reconciler if still needed.
                tracing::warn!(service = %self.spec.service, instance = %m.id, "published instance does not answer: stopping it");
                let _ = killpg(Pid::from_raw(pid as i32), Signal::SIGKILL);
                continue;
            }
            let (stop, stop_rx) = watch::channel(false);
            self.state.lock().expect("fleet lock").instances.insert(
                m.id.clone(),
                Proc {
                    port: m.addr.port(),
                    pid: Some(pid),
                    phase: if healthy {
                        Phase::Ready
                    } else {
                        Phase::Starting
                    },
                    started: Instant::now(),
                    ready_at: healthy.then(Instant::now),
                    stop,
                    usage: Usage::default(),
                    cgroup: None,
                    ooms_seen: 0,
                },
            );
            if !mirrored.contains_key(&m.id) {
                self.pool.add(&m.id, m.addr);
            }
            if healthy {
                self.pool.ready(&m.id);
            }
            kept += 1;
            let epoch = self.epoch.subscribe();
            tokio::spawn(self.clone().supervise_pid(
                m.id.clone(),
                m.addr,
                pid,
                start,
                stop_rx,
                healthy,
                epoch,
            ));
        }
        // Whatever the follower routed to and was not adopted goes from the pool.
        for id in mirrored.keys() {
            if !self
                .state
                .lock()
                .expect("fleet lock")
                .instances
                .contains_key(id)
            {
                self.pool.remove(id, Duration::ZERO).await;
            }
        }
        {
            let mut s = self.state.lock().expect("fleet lock");
            s.next_id = s.next_id.max(max_n);
            s.desired = view.desired.clamp(s.min, s.max);
        }
        tracing::info!(service = %self.spec.service, adopted = kept, published = view.members.len(), desired = view.desired, previous_leader = %view.leader, "leading: adopted the published fleet");
        self.publish(c).await;
    }

    /// Stepping down: hands the instances over untouched (the new leader adopts them) and
    /// keeps routing to them as a follower.
    fn release(&self) {
        self.epoch.send_modify(|e| *e += 1);
        let mut s = self.state.lock().expect("fleet lock");
        let mut m = self.mirrored.lock().expect("mirror lock");
        for (id, p) in std::mem::take(&mut s.instances) {
            m.insert(id, (SocketAddr::from(([127, 0, 0, 1], p.port)), p.phase));
        }
        tracing::info!(service = %self.spec.service, instances = m.len(), "follower: instances left running for the leader");
    }

    /// A follower routes to what the leader published: new members join the pool (routed
    /// once ready), removed or stopping ones are drained.
    async fn mirror(self: &Arc<Self>, c: &Leadership) {
        let Some(view) = c.read_fleet().await else {
            return;
        };
        let mut gone = Vec::new();
        {
            let mut m = self.mirrored.lock().expect("mirror lock");
            for mem in &view.members {
                if mem.phase == Phase::Stopping {
                    continue;
                }
                match m.get(&mem.id) {
                    None => {
                        self.pool.add(&mem.id, mem.addr);
                        if mem.phase == Phase::Ready {
                            self.pool.ready(&mem.id);
                        }
                        m.insert(mem.id.clone(), (mem.addr, mem.phase));
                    }
                    Some((_, Phase::Starting)) if mem.phase == Phase::Ready => {
                        self.pool.ready(&mem.id);
                        m.insert(mem.id.clone(), (mem.addr, mem.phase));
                    }
                    Some(_) => {}
                }
            }
            m.retain(|id, _| {
                let keep = view
                    .members
                    .iter()
                    .any(|x| &x.id == id && x.phase != Phase::Stopping);
                if !keep {
                    gone.push(id.clone());
                }
                keep
            });
        }
        for id in gone {
            let me = self.clone();
            let drain = self.spec.drain_timeout;
            tokio::spawn(async move {
                me.pool.remove(&id, drain).await;
            });
        }
        *self.view.lock().expect("view lock") = Some(view);
    }

    /// Watches an instance by pid (shared fleets): startup probe unless already ready,
    /// crash = the process gone, stop = drain → SIGTERM → grace → SIGKILL to its group. Ends
    /// quietly when the fleet is handed over (`epoch` moves).
    async fn supervise_pid(
        self: Arc<Self>,
        id: String,
        addr: SocketAddr,
        pid: u32,
        start: u64,
        mut stop: watch::Receiver<bool>,
        ready: bool,
        mut epoch: watch::Receiver<u64>,
    ) {
        let mine = *epoch.borrow_and_update();
        let startup_deadline = tokio::time::Instant::now() + self.spec.fleet.startup_timeout.0;
        let path = self.spec.fleet.health_path.clone();
        let mut ready = ready;
        loop {
            tokio::select! {
                _ = epoch.changed() => {
                    if *epoch.borrow() != mine {
                        return;
                    }
                }
                _ = shoal_proxy::server::stopped(&mut stop) => break,
                _ = tokio::time::sleep(Duration::from_millis(if ready { 250 } else { 50 })) => {
                    if !alive(pid, start) {
                        if *epoch.borrow() != mine {
                            return;
                        }
                        let msg = if ready { format!("instance {id} crashed") } else { format!("instance {id} exited during startup") };
                        self.fail(msg, ready);
                        self.forget(&id).await;
                        return;
                    }
                    if !ready {
                        if self.spec.probe.probe(addr, &path, Duration::from_millis(500)).await {
                            ready = true;
                            if let Some(p) = self.state.lock().expect("fleet lock").instances.get_mut(&id) {
                                if p.phase == Phase::Starting {
                                    p.phase = Phase::Ready;
                                }
                                p.ready_at = Some(Instant::now());
                            }
                            self.pool.ready(&id);
                            tracing::info!(service = %self.spec.service, instance = %id, "instance passed its first health check");
                            self.wake.notify_one();
                        } else if tokio::time::Instant::now() > startup_deadline {
                            self.fail(format!("instance {id} not healthy within {:?}", self.spec.fleet.startup_timeout.0), false);
                            let _ = killpg(Pid::from_raw(pid as i32), Signal::SIGKILL);
                            self.forget(&id).await;
                            return;
                        }
                    }
                }
            }
        }
        // Handed over (the stop channel closes with it) or no longer leading: the instance
        // is the next leader's, never stopped from here. (The last replica stopping, which
        // resigned first, stops its fleet.)
        let may_stop =
            |c: &Arc<Leadership>| c.is_leader() || (c.resigned() && self.is_shutting_down());
        if *epoch.borrow() != mine || self.cluster.as_ref().is_some_and(|c| !may_stop(c)) {
            return;
        }
        let left = self.pool.remove(&id, self.spec.drain_timeout).await;
        // Followers route to it until they read the published view (every 250 ms; the
        // stop was published before it began): give them that, and their short requests,
        // before the signal.
        tokio::time::sleep(FOLLOWER_SYNC).await;
        let _ = killpg(Pid::from_raw(pid as i32), Signal::SIGTERM);
        let until = Instant::now() + self.spec.fleet.stop_grace.0;
        while alive(pid, start) && Instant::now() < until {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        if alive(pid, start) {
            tracing::warn!(service = %self.spec.service, instance = %id, "no exit after SIGTERM: SIGKILL");
            self.metrics.forced_kills.inc();
            let _ = killpg(Pid::from_raw(pid as i32), Signal::SIGKILL);
        }
        self.metrics.stops.inc();
        tracing::info!(service = %self.spec.service, instance = %id, drained_with_in_flight = left, "instance stopped");
        self.forget(&id).await;
    }

    /// With replicas: whether this replica runs the fleet now (else it mirrors the leader's).
    fn follows(&self) -> bool {
        self.cluster.as_ref().is_some_and(|c| {
            self.state.lock().expect("fleet lock").instances.is_empty() && !c.is_leader()
        })
    }

    /// Signals the instance's process group (its pid is the group id) and, for SIGKILL,
    /// everything in its cgroup.
    fn signal_group(&self, id: &str, pid: Option<u32>, sig: Signal) {
        if let Some(pid) = pid {
            let _ = killpg(Pid::from_raw(pid as i32), sig);
        }
        if sig == Signal::SIGKILL {
            if let Some(cg) = self.cgroup_of(id) {
                cg.kill_all();
            }
        }
    }

    fn cgroup_of(&self, id: &str) -> Option<InstanceCgroup> {
        let s = self.state.lock().expect("fleet lock");
        s.instances.get(id).and_then(|p| p.cgroup.clone())
    }

    /// After the instance's main process exited: nothing it started may stay behind (a
    /// straggler would hold its port or memory); then its cgroup goes.
    async fn forget(&self, id: &str) {
        self.pool.remove(id, Duration::ZERO).await;
        let (pid, cg) = {
            let s = self.state.lock().expect("fleet lock");
            s.instances
                .get(id)
                .map_or((None, None), |p| (p.pid, p.cgroup.clone()))
        };
        if let Some(pid) = pid {
            let _ = killpg(Pid::from_raw(pid as i32), Signal::SIGKILL);
        }
        if let Some(cg) = cg {
            cg.kill_all();
            let until = Instant::now() + Duration::from_secs(2);
            while !cg.pids().is_empty() && Instant::now() < until {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            cg.remove();
        }
        self.registry.remove(&self.spec.service, id);
        self.state.lock().expect("fleet lock").instances.remove(id);
        self.wake.notify_one();
    }

    /// Stops every instance (draining each) and waits until all are gone or `deadline`.
    /// A shared fleet's leader with live peers leaves its instances to the next leader.
    pub async fn shutdown(&self, deadline: Duration) {
        if let Some(c) = &self.cluster {
            // (Not "while leading": the election may have resigned already on shutdown.)
            let owns = !self.state.lock().expect("fleet lock").instances.is_empty();
            if !owns || c.live_peers() > 0 {
                self.release();
                self.state.lock().expect("fleet lock").shutting_down = true;
                self.wake.notify_one();
                return;
            }
        }
        {
            let mut s = self.state.lock().expect("fleet lock");
            s.shutting_down = true;
            for p in s.instances.values_mut() {
                p.phase = Phase::Stopping;
                let _ = p.stop.send(true);
            }
        }
        self.wake.notify_one();
        let until = Instant::now() + deadline;
        while !self.state.lock().expect("fleet lock").instances.is_empty() && Instant::now() < until
        {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    pub(crate) fn is_shutting_down(&self) -> bool {
        self.state.lock().expect("fleet lock").shutting_down
    }

    /// Adds this fleet's samples to `/metrics`.
    pub fn collect(&self, e: &mut Exposition) {
        self.collect_vertical(e);
        let svc = self.spec.service.as_str();
        for v in self.instances() {
            let l = [("service", svc), ("instance", v.id.as_str())];
            e.sample(
                "shoal_instance_cpu_seconds_total",
                "CPU time used by an instance.",
                shoal_proxy::metrics::Kind::Counter,
                &l,
                v.cpu_seconds,
            );
            e.gauge(
                "shoal_instance_memory_bytes",
                "Resident memory of an instance.",
                &l,
                v.memory_bytes as f64,
            );
        }
        let m = &self.metrics;
        for (kind, c) in [("crash", &m.crashes), ("start_failed", &m.failed_starts)] {
            e.counter(
                "shoal_fleet_failures_total",
                "Instances that crashed or failed to start.",
                &[("service", svc), ("kind", kind)],
                c.get(),
            );
        }
        e.counter(
            "shoal_fleet_starts_total",
            "Instances launched.",
            &[("service", svc)],
            m.starts.get(),
        );
        e.counter(
            "shoal_fleet_stops_total",
            "Instances stopped after draining.",
            &[("service", svc)],
            m.stops.get(),
        );
        e.counter(
            "shoal_fleet_forced_kills_total",
            "Instances that ignored SIGTERM for the stop grace and were killed.",
            &[("service", svc)],
            m.forced_kills.get(),
        );
        let backoff = self
            .state
            .lock()
            .expect("fleet lock")
            .backoff_until
            .map_or(0.0, |u| {
                u.saturating_duration_since(Instant::now()).as_secs_f64()
            });
        e.gauge(
            "shoal_fleet_backoff_seconds",
            "Time left before the next start after failures.",
            &[("service", svc)],
            backoff,
        );
        e.gauge(
            "shoal_resources_enforced",
            "1 when CPU/memory limits are enforced through cgroups (v2 or v1).",
            &[("service", svc)],
            self.cgroups.enforced() as u8 as f64,
        );
    }
}

impl Provider for ProcessFleet {
    fn kind(&self) -> &'static str {
        "process"
    }
    fn service(&self) -> &str {
        &self.spec.service
    }
    fn scale(&self, n: u32) -> u32 {
        ProcessFleet::scale(self, n)
    }
    fn desired(&self) -> u32 {
        if self.follows() {
            if let Some(v) = &*self.view.lock().expect("view lock") {
                return v.desired;
            }
        }
        ProcessFleet::desired(self)
    }
    fn bounds(&self) -> (u32, u32) {
        let s = self.state.lock().expect("fleet lock");
        (s.min, s.max)
    }
    fn set_bounds(&self, min: u32, max: u32) {
        {
            let mut s = self.state.lock().expect("fleet lock");
            (s.min, s.max) = (min, max);
        }
        let desired = self.desired();
        ProcessFleet::scale(self, desired);
    }
    fn counts(&self) -> (u32, u32, u32) {
        if self.follows() {
            if let Some(v) = &*self.view.lock().expect("view lock") {
                let c = |p| v.members.iter().filter(|m| m.phase == p).count() as u32;
                return (c(Phase::Starting), c(Phase::Ready), c(Phase::Stopping));
            }
        }
        ProcessFleet::counts(self)
    }
    fn members(&self) -> Vec<Member> {
        if self.follows() {
            if let Some(v) = &*self.view.lock().expect("view lock") {
                return v
                    .members
                    .iter()
                    .map(|m| Member {
                        id: m.id.clone(),
                        addr: m.addr,
                        phase: m.phase,
                    })
                    .collect();
            }
        }
        let s = self.state.lock().expect("fleet lock");
        s.instances
            .iter()
            .map(|(id, p)| Member {
                id: id.clone(),
                addr: SocketAddr::from(([127, 0, 0, 1], p.port)),
                phase: p.phase,
            })
            .collect()
    }
    fn sample_usage(&self) -> Vec<(String, Phase, Usage)> {
        ProcessFleet::sample_usage(self)
    }
    fn status(&self) -> serde_json::Value {
        let mut v = ProcessFleet::status(self);
        v["provider"] = "process".into();
        if self.cluster.is_some() {
            v["role"] = if self.follows() { "follower" } else { "leader" }.into();
        }
        v["processes"] = serde_json::to_value(self.instances()).unwrap_or_default();
        v
    }
    fn collect(&self, e: &mut Exposition) {
        ProcessFleet::collect(self, e)
    }
    fn cpu_allotment(&self) -> Option<f64> {
        self.cgroups.size().cpu
    }
    fn recommendation(&self) -> Option<crate::recommend::Recommendation> {
        ProcessFleet::recommendation(self)
    }
    fn resizes(&self) -> Vec<crate::recommend::Resize> {
        ProcessFleet::resizes(self)
    }
    fn shutdown(&self, deadline: Duration) -> BoxFuture<'_, ()> {
        Box::pin(ProcessFleet::shutdown(self, deadline))
    }
}

/// The process `pid` started at `start` still runs (not reused, not a zombie).
fn alive(pid: u32, start: u64) -> bool {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return false;
    };
    let zombie = stat
        .rsplit_once(") ")
        .is_some_and(|(_, rest)| rest.starts_with('Z') || rest.starts_with('X'));
    !zombie && crate::usage::parse_stat(&stat).is_some_and(|s| s.start == start)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_to_a_minute() {
        assert_eq!(backoff(1), Duration::from_secs(1));
        assert_eq!(backoff(2), Duration::from_secs(2));
        assert_eq!(backoff(4), Duration::from_secs(8));
        assert_eq!(backoff(7), Duration::from_secs(60));
        assert_eq!(backoff(50), Duration::from_secs(60));
    }
}
