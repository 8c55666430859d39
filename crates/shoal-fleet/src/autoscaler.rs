//! The live autoscaler: samples the data path and `/proc` once a second into windows, and
//! every evaluation interval hands an [`Observation`] to the same policy code the simulator
//! runs, then applies the decision to the fleet.

use std::collections::{BTreeMap, VecDeque};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use shoal_proxy::metrics::{Exposition, LATENCY_BUCKETS};
use shoal_proxy::proxy::Service;
use shoal_scale::backlog::{BacklogInput, BacklogPolicy};
use shoal_scale::predictive::{
    DemandRecorder, FitResult, History, PredictiveConfig, PredictiveMode, PredictivePolicy,
};
use shoal_scale::reactive::{BurstConfig, RatePolicy, ReactiveConfig, ReactivePolicy};
use shoal_scale::saturation::{
    quantile_from_buckets, ProbeContext, ProbeSample, SaturationEstimator,
};
use shoal_scale::windows::SecondWindow;
use shoal_scale::{
    Decision, MetricKind, MetricSample, Observation, Policy, PolicyParams, Saturation,
};

use crate::config::Autoscale;
use crate::config::FleetSpec;
use crate::process::Phase;
use crate::provider::Provider;

/// The policy in force; concrete so the predictive history can be saved.
enum Live {
    Reactive(Box<ReactivePolicy>),
    Predictive(Box<PredictivePolicy>),
    /// A worker fleet: sized on the backlog of its queues (it serves no requests).
    Backlog(Box<BacklogPolicy>),
}

impl Live {
    fn reacts_to_saturation(&self) -> bool {
        match self {
            Live::Reactive(p) => p.reacts_to_saturation(),
            Live::Predictive(p) => p.reacts_to_saturation(),
            Live::Backlog(_) => false,
        }
    }

    fn evaluate(&mut self, obs: &Observation, backlog: Option<u64>) -> Decision {
        match self {
            Live::Reactive(p) => p.evaluate(obs),
            Live::Predictive(p) => p.evaluate(obs),
            Live::Backlog(p) => p.evaluate(BacklogInput {
                now_secs: obs.now_secs,
                wall_epoch_secs: obs.wall_epoch_secs,
                backlog,
                ready: obs.ready,
                starting: obs.starting,
                current: obs.current_desired,
            }),
        }
    }
}

/// Where a worker fleet's backlog comes from: the queues routed to it. Read at each
/// evaluation, so it must answer at once (a value sampled on its own task).
pub trait BacklogSource: Send + Sync {
    /// Jobs waiting or in progress over every queue of the fleet; None when a broker cannot
    /// say right now (the policy then holds the size).
    fn backlog(&self) -> Option<u64>;
}

const WINDOW_SPAN: usize = 900;

/// How often the saturation probe looks (the process fleet refreshes usage at most this often).
const PROBE_EVERY: Duration = Duration::from_millis(500);

/// Per-second samples of one service.
struct Sampler {
    start: Instant,
    last_t: Option<f64>,
    last_requests: u64,
    last_cpu: BTreeMap<String, f64>,
    last_hist: Vec<u64>,
    /// Total requests/s.
    rps: SecondWindow,
    /// Total requests in flight.
    in_flight: SecondWindow,
    /// Total CPU utilization of ready instances (sum of fractions of their allotment):
    /// a total, so the per-instance value is the window's mean over the ready count
    /// *now*, and instances added since do not compound the next decision.
    cpu: SecondWindow,
    /// Per-second latency histogram deltas, for windowed percentiles.
    latency: VecDeque<(f64, Vec<u64>)>,
    /// (time, request count) at the previous observation: demand is measured from it.
    demand_mark: Option<(f64, u64)>,
    /// The saturation probe's history and learned request cost (pure; shared with the
    /// simulator).
    estimator: SaturationEstimator<String>,
    /// The newest saturation reading and its time.
    saturation: Option<(f64, Saturation)>,
    /// With replicas: when the shared load was last incomplete, and why.
    cluster_gap: Option<(f64, String)>,
}

/// Where a service's recorded demand lives in `data_dir` (`shoal history export` reads it).
pub fn demand_history_file(data_dir: &std::path::Path, service: &str) -> PathBuf {
    data_dir
        .join("history")
        .join(format!("{service}.demand.json"))
}

fn write_atomic(file: &std::path::Path, h: &History) -> std::io::Result<()> {
    if let Some(dir) = file.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let tmp = file.with_extension("json.tmp");
    std::fs::write(&tmp, serde_json::to_vec(h)?)?;
    std::fs::rename(&tmp, file)
}

/// The autoscaler of one service.
pub struct Autoscaler {
    service: Arc<Service>,
    fleet: Arc<dyn Provider>,
    pub cfg: Autoscale,
    policy: Mutex<Live>,
    sampler: Mutex<Sampler>,
    decisions: Mutex<VecDeque<Decision>>,
    last: Mutex<Option<Decision>>,
    counts: Mutex<BTreeMap<(&'static str, &'static str), u64>>,
    history_file: PathBuf,
    /// Demand and CPU per bucket for every request-serving fleet (`shoal history export`,
    /// `shoal tune --history`), saved beside the forecast's history.
    recorder: Option<Mutex<DemandRecorder>>,
    recorder_file: PathBuf,
    cpu_allotment: f64,
    /// The `prometheus` target's source, polled on its own task.
    prometheus: Option<Arc<crate::promsource::PromSource>>,
    /// A forecast fit finished on a blocking thread, waiting to be swapped in.
    fitted: Arc<Mutex<Option<FitResult>>>,
    fitting: Arc<std::sync::atomic::AtomicBool>,
    pub fits: shoal_proxy::metrics::Counter,
    /// The backlog of a worker fleet (`policy = "backlog"`).
    backlog: Option<Arc<dyn BacklogSource>>,
    /// With replicas: the election (only the leader decides) and the shared load.
    cluster: std::sync::OnceLock<Arc<crate::cluster::Leadership>>,
}

impl Autoscaler {
    /// An autoscaler sizing `fleet`, which serves `service`; `spec` carries the bounds, the
    /// data directory and the CPU allotment per instance.
    pub fn new(
        service: Arc<Service>,
        fleet: Arc<dyn Provider>,
        spec: &FleetSpec,
        cfg: Autoscale,
        backlog: Option<Arc<dyn BacklogSource>>,
    ) -> Result<Arc<Autoscaler>, String> {
        let reactive = ReactiveConfig {
            targets: cfg.targets.clone(),
            tolerance: cfg.tolerance,
            min: spec.fleet.min,
            max: spec.fleet.max,
            scale_up: RatePolicy {
                pods: cfg.scale_up_instances,
                percent: cfg.scale_up_percent,
                period_secs: cfg.scale_up_period.as_secs_f64(),
            },
            scale_down_stabilization_secs: cfg.scale_down_stabilization.as_secs_f64(),
            burst: cfg.burst.then(|| BurstConfig {
                duration_secs: cfg.burst_hold.as_secs_f64(),
                ..BurstConfig::default()
            }),
            schedule: cfg.schedule.clone(),
        };
        let history_file = spec
            .data_dir
            .join("history")
            .join(format!("{}.json", spec.service));
        let recorder_file = demand_history_file(&spec.data_dir, &spec.service);
        let recorder = (cfg.policy != crate::config::BACKLOG_POLICY).then(|| {
            let saved = std::fs::read(&recorder_file)
                .ok()
                .and_then(|b| serde_json::from_slice::<History>(&b).ok());
            let bucket = cfg.history_bucket.map_or(60.0, |b| b.as_secs_f64());
            Mutex::new(DemandRecorder::new(bucket, 28.0, saved))
        });
        let policy = match cfg.policy.as_str() {
            crate::config::BACKLOG_POLICY => {
                let params = cfg
                    .backlog
                    .clone()
                    .ok_or("backlog policy without parameters")?;
                if backlog.is_none() {
                    return Err(format!(
                        "service {}: policy \"backlog\" needs an async route to this service",
                        spec.service
                    ));
                }
                Live::Backlog(Box::new(BacklogPolicy::new(params)))
            }
            "reactive" | "hpa" => Live::Reactive(Box::new(
                ReactivePolicy::new(&cfg.policy, reactive).map_err(|e| e.to_string())?,
            )),
            name => {
                let params = PolicyParams {
                    capacity_rps: cfg.capacity_rps.unwrap_or(1.0),
                    startup_secs: cfg.startup.as_secs_f64(),
                    interval_secs: cfg.interval.as_secs_f64(),
                    // An rps target sets the forecast's utilization too (as `shoal tune`
                    // recommends it: capacity × utilization).
                    target_utilization: cfg
                        .targets
                        .iter()
                        .find(|t| t.kind == MetricKind::Rps)
                        .zip(cfg.capacity_rps)
                        .map_or(0.7, |(t, c)| (t.target / c).clamp(0.05, 1.0)),
                    min: spec.fleet.min,
                    max: spec.fleet.max,
                    schedule: cfg.schedule.clone(),
                };
                let mode = if name == "forecast-only" {
                    PredictiveMode::ForecastOnly
                } else {
                    PredictiveMode::ForecastAndScale
                };
                let mut pc = PredictiveConfig::for_params(&params, mode);
                if let Some(season) = cfg.season {
                    pc = pc.with_season(season.as_secs_f64());
                }
                let stabilization = pc.reactive.scale_down_stabilization_secs;
                pc.reactive = reactive;
                pc.reactive.scale_down_stabilization_secs =
                    stabilization.min(cfg.scale_down_stabilization.as_secs_f64());
                // The forecast's scale-down hold is a startup time at least; a shorter
                // configured stabilization (as for a compressed season) shortens it too.
                pc.scale_down_delay_secs = pc.scale_down_delay_secs.min(
                    cfg.scale_down_stabilization
                        .as_secs_f64()
                        .max(pc.startup_secs),
                );
                if let Some(h) = cfg.min_history {
                    pc.min_history_secs = h.as_secs_f64();
                }
                if let Some(b) = cfg.history_bucket {
                    pc.bucket_secs = b.as_secs_f64();
                    pc.refit_secs = pc.refit_secs.min(b.as_secs_f64() * 10.0);
                }
                let saved = std::fs::read(&history_file)
                    .ok()
                    .and_then(|b| serde_json::from_slice::<History>(&b).ok());
                let p = match saved {
                    Some(h) => match PredictivePolicy::with_history(name, pc.clone(), &h) {
                        Ok(p) => {
                            tracing::info!(service = %spec.service, buckets = h.values.len(), "demand history restored");
                            p
                        }
                        Err(e) => {
                            tracing::warn!(service = %spec.service, error = %e, "saved history unusable; starting empty");
                            PredictivePolicy::new(name, pc).map_err(|e| e.to_string())?
                        }
                    },
                    None => PredictivePolicy::new(name, pc).map_err(|e| e.to_string())?,
                };
                let mut p = p;
                // Refits run on a blocking thread; decisions never wait for one.
                p.set_deferred_fits(true);
                Live::Predictive(Box::new(p))
            }
        };
        Ok(Arc::new(Autoscaler {
            prometheus: cfg.prometheus.clone().map(|p| {
                Arc::new(crate::promsource::PromSource::new(
                    &spec.service,
                    p,
                    cfg.interval,
                ))
            }),
            cpu_allotment: spec.resources.cpu.unwrap_or(1.0),
            service,
            fleet,
            cfg,
            policy: Mutex::new(policy),
            sampler: Mutex::new(Sampler {
                start: Instant::now(),
                last_t: None,
                last_requests: 0,
                last_cpu: BTreeMap::new(),
                last_hist: Vec::new(),
                rps: SecondWindow::new(WINDOW_SPAN),
                in_flight: SecondWindow::new(WINDOW_SPAN),
                cpu: SecondWindow::new(WINDOW_SPAN),
                latency: VecDeque::new(),
                demand_mark: None,
                estimator: SaturationEstimator::new(),
                saturation: None,
                cluster_gap: None,
            }),
            decisions: Mutex::new(VecDeque::new()),
            last: Mutex::new(None),
            counts: Mutex::new(BTreeMap::new()),
            history_file,
            recorder,
            recorder_file,
            fitted: Arc::new(Mutex::new(None)),
            fitting: Arc::new(std::sync::atomic::AtomicBool::new(false)),
            fits: Default::default(),
            backlog,
            cluster: std::sync::OnceLock::new(),
        }))
    }

    /// Shares this autoscaler with other replicas: it samples everywhere (and publishes its
    /// load), but decides only while leading, on the load every replica reports.
    pub fn set_cluster(&self, l: Arc<crate::cluster::Leadership>) {
        let _ = self.cluster.set(l);
    }

    /// Samples every second, evaluates every interval, saves history every minute.
    pub async fn run(self: Arc<Self>, mut stop: tokio::sync::watch::Receiver<bool>) {
        let mut tick = tokio::time::interval(Duration::from_millis(100));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        // Deadlines advance by whole periods so the cadence does not drift with the tick.
        let mut next_sample = Instant::now();
        let mut next_eval = Instant::now() + self.cfg.interval;
        let mut next_probe = Instant::now();
        let mut last_eval = Instant::now();
        let mut last_save = Instant::now();
        let reacts = self
            .policy
            .lock()
            .expect("policy lock")
            .reacts_to_saturation();
        if let Some(p) = &self.prometheus {
            tokio::spawn(p.clone().run(stop.clone()));
        }
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                _ = shoal_proxy::server::stopped(&mut stop) => break,
            }
            let now = Instant::now();
            // The probe first: the per-second sample then reuses its usage reading.
            let mut saturated = false;
            if now >= next_probe {
                next_probe = (next_probe + PROBE_EVERY).max(now);
                saturated = self.probe().is_some_and(|s| s.saturated);
            }
            if now >= next_sample {
                next_sample = (next_sample + Duration::from_secs(1)).max(now);
                self.sample();
            }
            // Saturation is decided on at once, not at the next interval.
            let early = reacts && saturated && now >= last_eval + PROBE_EVERY;
            if now >= next_eval || early {
                next_eval = (next_eval + self.cfg.interval).max(now);
                last_eval = now;
                self.evaluate();
            }
            if last_save.elapsed() >= Duration::from_secs(60) {
                last_save = Instant::now();
                self.save_history();
            }
        }
        self.save_history();
        self.save_demand(true);
    }

    /// Saves the recorded demand; `last` closes the open bucket (at exit).
    fn save_demand(&self, last: bool) {
        let Some(r) = &self.recorder else { return };
        let h = {
            let mut r = r.lock().expect("recorder lock");
            if last {
                r.finish()
            } else {
                r.history(
                    SystemTime::now()
                        .duration_since(UNIX_EPOCH)
                        .map_or(0.0, |d| d.as_secs_f64()),
                )
            }
        };
        if let Err(e) = write_atomic(&self.recorder_file, &h) {
            tracing::warn!(file = %self.recorder_file.display(), error = %e, "cannot save demand history");
        }
    }

    /// One per-second sample of the data path and the instances.
    pub fn sample(&self) {
        let mut s = self.sampler.lock().expect("sampler lock");
        let t = s.start.elapsed().as_secs_f64();
        let requests = self.service.metrics.requests.get();
        // Cumulative counts per bucket plus the total as the +Inf bucket: requests slower
        // than the last bound must still weigh on the quantiles.
        let duration = &self.service.metrics.duration;
        let mut hist = duration.cumulative().to_vec();
        let total = duration.count().max(hist.last().copied().unwrap_or(0));
        hist.push(total);
        let usage = self.fleet.sample_usage();
        let members = self.service.pool.members();
        let in_flight: u64 = members.iter().map(|i| i.in_flight()).sum();
        if let Some(last_t) = s.last_t {
            let dt = (t - last_t).max(1e-3);
            let rps = requests.saturating_sub(s.last_requests) as f64 / dt;
            // Per-bucket deltas (cumulative → counts) for this second.
            let mut prev = 0;
            let mut deltas = Vec::with_capacity(hist.len());
            for (i, c) in hist.iter().enumerate() {
                let last = s.last_hist.get(i).copied().unwrap_or(0);
                let d = c.saturating_sub(last);
                deltas.push(d.saturating_sub(prev));
                prev = d;
            }
            match self.cluster.get() {
                None => {
                    s.rps.add(t, rps);
                    s.in_flight.add(t, in_flight as f64);
                }
                Some(c) => {
                    // The windows hold what all replicas saw; a replica whose report is
                    // stale leaves a gap (missing data holds), never a zero.
                    c.set_local(rps, in_flight as f64, &deltas);
                    match c.others() {
                        Ok((r, f)) => {
                            s.rps.add(t, rps + r);
                            s.in_flight.add(t, in_flight as f64 + f);
                        }
                        Err(why) => {
                            s.cluster_gap = Some((t, why));
                        }
                    }
                    // Latency: the others' requests since their last report join this
                    // second's histogram (each report is counted once).
                    for (d, o) in deltas.iter_mut().zip(c.take_others_latency()) {
                        *d += o;
                    }
                }
            }
            s.latency.push_back((t, deltas));
            while s
                .latency
                .front()
                .is_some_and(|(lt, _)| t - lt > WINDOW_SPAN as f64)
            {
                s.latency.pop_front();
            }
            let allotment = self.fleet.cpu_allotment().unwrap_or(self.cpu_allotment);
            let mut utils = Vec::new();
            for (id, phase, u) in &usage {
                if let Some(prev) = s.last_cpu.get(id) {
                    let cores = (u.cpu_seconds - prev).max(0.0) / dt;
                    if *phase == Phase::Ready {
                        utils.push(cores / allotment);
                    }
                }
            }
            if !utils.is_empty() {
                s.cpu.add(t, utils.iter().sum::<f64>());
            }
        }
        s.last_cpu = usage
            .into_iter()
            .map(|(id, _, u)| (id, u.cpu_seconds))
            .collect();
        s.last_t = Some(t);
        s.last_requests = requests;
        s.last_hist = hist;
    }

    /// One saturation probe: cumulative requests, in-flight, CPU of ready instances and
    /// latency, read here and judged by the [`SaturationEstimator`] (the simulator's too).
    pub fn probe(&self) -> Option<Saturation> {
        let usage = self.fleet.sample_usage();
        let mut s = self.sampler.lock().expect("sampler lock");
        let t = s.start.elapsed().as_secs_f64();
        let duration = &self.service.metrics.duration;
        let mut hist = duration.cumulative().to_vec();
        hist.push(duration.count().max(hist.last().copied().unwrap_or(0)));
        let p = ProbeSample {
            t,
            requests: self.service.metrics.requests.get() as f64,
            in_flight: self
                .service
                .pool
                .members()
                .iter()
                .map(|i| i.in_flight())
                .sum::<u64>() as f64,
            completed: hist.last().copied().unwrap_or(0) as f64,
            cpu: usage
                .into_iter()
                .filter(|(_, phase, _)| *phase == Phase::Ready)
                .map(|(id, _, u)| (id, u.cpu_seconds))
                .collect(),
            latency: hist,
        };
        let ctx = ProbeContext {
            allotment: self.fleet.cpu_allotment().unwrap_or(self.cpu_allotment),
            latency_p95_target: self
                .cfg
                .targets
                .iter()
                .filter(|tg| tg.kind == MetricKind::LatencyP95)
                .map(|tg| tg.target)
                .reduce(f64::min),
            latency_bounds: &LATENCY_BUCKETS,
        };
        let sat = s.estimator.observe(p, &ctx);
        s.saturation = sat.map(|x| (t, x));
        sat
    }

    /// Builds the observation for now. Its demand is the request rate since the previous
    /// observation (so consecutive ones tile time, as the predictive history wants).
    pub fn observe(&self) -> Observation {
        let mut s = self.sampler.lock().expect("sampler lock");
        let t = s.start.elapsed().as_secs_f64();
        let requests = self.service.metrics.requests.get();
        let demand_rps = match s.demand_mark {
            Some((t0, r0)) if t - t0 >= 0.1 => {
                s.demand_mark = Some((t, requests));
                Some(requests.saturating_sub(r0) as f64 / (t - t0))
            }
            // Too soon after the previous one: measure over a longer span next time.
            Some(_) => None,
            None => {
                s.demand_mark = Some((t, requests));
                None
            }
        };
        // With replicas, demand is everyone's: the shared rate window over the interval.
        let clustered = self.cluster.get().is_some();
        let demand_rps = if clustered {
            let secs = self.cfg.interval.as_secs_f64().ceil().max(1.0) as usize;
            demand_rps.and(s.rps.mean(t, secs))
        } else {
            demand_rps
        };
        // A recent gap in the shared load (a replica stopped reporting): request metrics
        // are missing, so the policy holds rather than read the gap as less load.
        let gap = s
            .cluster_gap
            .as_ref()
            .filter(|(at, _)| t - at < self.cfg.interval.as_secs_f64().max(2.0))
            .is_some();
        let (starting, ready, _) = self.fleet.counts();
        let stable = self.cfg.stable_window.as_secs() as usize;
        let panic = self.cfg.panic_window.as_secs().max(1) as usize;
        let per_instance = |v: Option<f64>| v.filter(|_| ready > 0).map(|x| x / ready as f64);
        let latency_p95 = |secs: usize| {
            let n = LATENCY_BUCKETS.len() + 1;
            let mut counts = vec![0u64; n];
            for (lt, d) in s.latency.iter().rev() {
                if t - lt > secs as f64 {
                    break;
                }
                for (i, c) in d.iter().enumerate() {
                    counts[i.min(n - 1)] += c;
                }
            }
            quantile_from_buckets(&LATENCY_BUCKETS, &counts, 0.95)
        };
        let metrics = self
            .cfg
            .targets
            .iter()
            .map(|tg| {
                let (st, pa) = match tg.kind {
                    MetricKind::Rps => (
                        per_instance(s.rps.mean(t, stable)),
                        per_instance(s.rps.mean(t, panic)),
                    ),
                    MetricKind::InFlight => (
                        per_instance(s.in_flight.mean(t, stable)),
                        per_instance(s.in_flight.mean(t, panic)),
                    ),
                    MetricKind::Cpu => (
                        per_instance(s.cpu.mean(t, stable)),
                        per_instance(s.cpu.mean(t, panic)),
                    ),
                    MetricKind::LatencyP95 => (latency_p95(stable), latency_p95(panic)),
                    // The query's own range sets its window; no burst reading from it.
                    MetricKind::Prometheus => (
                        per_instance(
                            self.prometheus
                                .as_ref()
                                .and_then(|p| p.value(Instant::now())),
                        ),
                        None,
                    ),
                };
                let shared = matches!(tg.kind, MetricKind::Rps | MetricKind::InFlight);
                let (st, pa) = if gap && shared {
                    (None, None)
                } else {
                    (st, pa)
                };
                MetricSample {
                    kind: tg.kind,
                    stable: st,
                    panic: pa,
                }
            })
            .collect();
        Observation {
            now_secs: t,
            wall_epoch_secs: SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(0.0, |d| d.as_secs_f64()),
            ready,
            starting,
            current_desired: self.fleet.desired(),
            metrics,
            // Counted exactly rather than read from the per-second samples: those come
            // at 1 to 1.25 s spacing, so a one-interval window over them now and then
            // holds none (a lost sample) or two, which matters in short history buckets.
            demand_rps,
            saturation: s.saturation.filter(|(at, _)| t - at < 2.0).map(|(_, x)| x),
        }
    }

    /// Changes are always recorded; a refusal (hold, bound, missing metrics) when its reason
    /// differs from the last recorded one or a minute after it, so a long burst hold is one
    /// entry, not one per evaluation.
    fn worth_recording(&self, d: &Decision) -> bool {
        if d.desired != d.inputs.current_desired {
            return true;
        }
        let log = self.decisions.lock().expect("decisions lock");
        match log.back() {
            Some(last) => {
                last.reason != d.reason || d.inputs.now_secs - last.inputs.now_secs >= 60.0
            }
            None => true,
        }
    }

    /// One evaluation: observe, decide, apply, record. A replica that does not lead
    /// decides in the shadow, on the fleet the leader published, and applies and records
    /// nothing: its windows and the policy's state (stabilization, burst, forecast) stay
    /// current, so a new leader does not act on an empty history (e.g. scale down at once).
    pub fn evaluate(&self) -> Option<Decision> {
        let leading = self.cluster.get().is_none_or(|c| c.is_leader());
        let d = self.evaluate_now(leading);
        leading.then_some(d)
    }

    fn evaluate_now(&self, apply: bool) -> Decision {
        let obs = self.observe();
        if let (Some(r), Some(d)) = (&self.recorder, obs.demand_rps) {
            let busy = {
                let s = self.sampler.lock().expect("sampler lock");
                let secs = self.cfg.interval.as_secs_f64().ceil().max(1.0) as usize;
                s.cpu.mean(s.start.elapsed().as_secs_f64(), secs)
            };
            r.lock()
                .expect("recorder lock")
                .record(obs.wall_epoch_secs, d, busy);
        }
        let (d, job) = {
            let mut policy = self.policy.lock().expect("policy lock");
            if let Live::Predictive(p) = &mut *policy {
                if let Some(r) = self.fitted.lock().expect("fit lock").take() {
                    p.install_fit(r);
                }
            }
            let backlog = self.backlog.as_ref().and_then(|b| b.backlog());
            let d = policy.evaluate(&obs, backlog);
            let job = match &mut *policy {
                Live::Predictive(p) => p.take_fit_job(),
                Live::Reactive(_) | Live::Backlog(_) => None,
            };
            (d, job)
        };
        // One fit at a time, off the runtime; the model in force decides meanwhile.
        if let Some(job) = job {
            use std::sync::atomic::Ordering;
            if !self.fitting.swap(true, Ordering::AcqRel) {
                let (slot, busy) = (self.fitted.clone(), self.fitting.clone());
                self.fits.inc();
                let spawned = tokio::runtime::Handle::try_current().map(|h| {
                    h.spawn_blocking(move || {
                        match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| job.run())) {
                            Ok(r) => *slot.lock().expect("fit lock") = Some(r),
                            Err(_) => {
                                tracing::error!("forecast fit panicked; keeping the current model")
                            }
                        }
                        busy.store(false, Ordering::Release);
                    })
                });
                if spawned.is_err() {
                    tracing::warn!("no runtime for the forecast fit; skipped");
                    self.fitting.store(false, Ordering::Release);
                }
            }
        }
        if !apply {
            return d;
        }
        if d.desired != obs.current_desired {
            // Checked again just before the write: leadership may have lapsed meanwhile.
            if self.cluster.get().is_none_or(|c| c.is_leader()) {
                self.fleet.scale(d.desired);
            }
        }
        if d.is_notable() && self.worth_recording(&d) {
            tracing::info!(
                service = %self.fleet.service(),
                from = obs.current_desired,
                to = d.desired,
                reason = d.reason.as_str(),
                detail = %d.detail,
                "scaling decision"
            );
            *self
                .counts
                .lock()
                .expect("counts lock")
                .entry((d.direction.as_str(), d.reason.as_str()))
                .or_default() += 1;
            let mut log = self.decisions.lock().expect("decisions lock");
            log.push_back(d.clone());
            while log.len() > 500 {
                log.pop_front();
            }
        }
        *self.last.lock().expect("last lock") = Some(d.clone());
        d
    }

    fn save_history(&self) {
        self.save_demand(false);
        let h = match &*self.policy.lock().expect("policy lock") {
            Live::Predictive(p) => p.history(),
            Live::Reactive(_) | Live::Backlog(_) => return,
        };
        let r = (|| -> std::io::Result<()> {
            if let Some(dir) = self.history_file.parent() {
                std::fs::create_dir_all(dir)?;
            }
            let tmp = self.history_file.with_extension("json.tmp");
            std::fs::write(&tmp, serde_json::to_vec(&h)?)?;
            std::fs::rename(&tmp, &self.history_file)
        })();
        if let Err(e) = r {
            tracing::warn!(file = %self.history_file.display(), error = %e, "cannot save demand history");
        }
    }

    /// The newest notable decisions, oldest first.
    pub fn decisions(&self) -> Vec<Decision> {
        self.decisions
            .lock()
            .expect("decisions lock")
            .iter()
            .cloned()
            .collect()
    }

    /// The external Prometheus source, if a target uses one.
    pub fn prometheus(&self) -> Option<&crate::promsource::PromSource> {
        self.prometheus.as_deref()
    }

    pub fn last_decision(&self) -> Option<Decision> {
        self.last.lock().expect("last lock").clone()
    }

    pub fn forecast(&self) -> serde_json::Value {
        match &*self.policy.lock().expect("policy lock") {
            Live::Predictive(p) => {
                let now = SystemTime::now()
                    .duration_since(UNIX_EPOCH)
                    .map_or(0.0, |d| d.as_secs_f64());
                serde_json::json!({
                    "history_secs": p.history_secs(),
                    "model": p.model_summary(),
                    "forecast": p.forecast(now).into_iter().take(240).collect::<Vec<_>>(),
                })
            }
            Live::Reactive(_) | Live::Backlog(_) => {
                serde_json::json!({ "forecast": null, "reason": format!("policy is {}", self.cfg.policy) })
            }
        }
    }

    pub fn collect(&self, e: &mut Exposition) {
        let svc = self.fleet.service();
        if let Some(p) = &self.prometheus {
            p.collect(e);
        }
        for ((dir, reason), n) in self.counts.lock().expect("counts lock").iter() {
            e.counter(
                "shoal_scaling_decisions_total",
                "Scaling decisions that changed the count or were refused.",
                &[("service", svc), ("direction", dir), ("reason", reason)],
                *n,
            );
        }
        if let Some(f) = self.last_decision().and_then(|d| d.forecast_rps) {
            e.gauge(
                "shoal_forecast_rps",
                "Forecast demand one startup time ahead.",
                &[("service", svc)],
                f,
            );
        }
        if let Some(d) = self.last_decision().and_then(|d| d.inputs.demand_rps) {
            e.gauge(
                "shoal_demand_rps",
                "Observed demand over the stable window.",
                &[("service", svc)],
                d,
            );
        }
    }
}
