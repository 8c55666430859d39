//! The live dashboard's memory: one point per second for the last 15 minutes, so a fresh page
//! is full at once, pushed to open pages as Server-Sent Events.
//!
//! Points are derived from shoal's own `/metrics` exposition (parsed once a second), so every
//! family any crate adds — fleet, autoscaler, cache, queues — reaches the dashboard without a
//! second metrics path; a panel stays empty until its family exists. Per-instance figures are
//! kept for the newest second only (a table), the history holds per-service aggregates, so
//! the page stays small at hundreds of instances. [`Tracker`] is pure: time is an argument.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::Serialize;
use serde_json::{json, Value};
use tokio::sync::{broadcast, watch};

use crate::app::App;

/// Seconds of history kept.
pub const SPAN_SECS: f64 = 900.0;
/// Latency percentiles are computed over this many seconds of histogram deltas.
const LATENCY_WINDOW_SECS: f64 = 10.0;
/// Decisions shown, newest first.
const DECISIONS: usize = 100;

/// One sample of the text exposition.
#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    pub name: String,
    pub labels: Vec<(String, String)>,
    pub value: f64,
}

impl Sample {
    fn label(&self, k: &str) -> &str {
        self.labels
            .iter()
            .find(|(n, _)| n == k)
            .map_or("", |(_, v)| v.as_str())
    }
}

/// Parses the Prometheus text format (comments skipped, escapes in label values honoured).
/// Lines that do not parse are skipped: the exposition is shoal's own.
pub fn parse_exposition(text: &str) -> Vec<Sample> {
    let mut out = Vec::new();
    for line in text.lines() {
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        if let Some(s) = parse_line(line) {
            out.push(s);
        }
    }
    out
}

fn parse_line(line: &str) -> Option<Sample> {
    let name_end = line.find(['{', ' '])?;
    let name = line[..name_end].to_string();
    let mut labels = Vec::new();
    let mut rest = &line[name_end..];
    if let Some(r) = rest.strip_prefix('{') {
        let mut chars = r.char_indices().peekable();
        let mut key = String::new();
        let end;
        loop {
            let (i, c) = chars.next()?;
            match c {
                '}' => {
                    end = i + 1;
                    break;
                }
                ',' => {}
                '=' => {
                    if chars.next()?.1 != '"' {
                        return None;
                    }
                    let mut val = String::new();
                    loop {
                        match chars.next()?.1 {
                            '\\' => match chars.next()?.1 {
                                'n' => val.push('\n'),
                                c => val.push(c),
                            },
                            '"' => break,
                            c => val.push(c),
                        }
                    }
                    labels.push((std::mem::take(&mut key), val));
                }
                c => key.push(c),
            }
        }
        rest = &r[end..];
    }
    let value = rest.split_whitespace().next()?.parse().ok()?;
    Some(Sample {
        name,
        labels,
        value,
    })
}

/// The `q` quantile of a cumulative histogram (bounds ascending, the last `+Inf`), with
/// linear interpolation inside the bucket as PromQL's `histogram_quantile` does.
pub fn quantile(bounds: &[f64], cumulative: &[f64], q: f64) -> Option<f64> {
    let total = *cumulative.last()?;
    if total <= 0.0 {
        return None;
    }
    let rank = q * total;
    let mut prev_bound = 0.0;
    let mut prev_count = 0.0;
    for (b, c) in bounds.iter().zip(cumulative) {
        if *c >= rank {
            if b.is_infinite() {
                return Some(prev_bound);
            }
            let span = c - prev_count;
            let frac = if span > 0.0 {
                (rank - prev_count) / span
            } else {
                1.0
            };
            return Some(prev_bound + (b - prev_bound) * frac);
        }
        prev_bound = *b;
        prev_count = *c;
    }
    Some(prev_bound)
}

/// One service at one second. Rates are per second over the last sample interval.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct ServicePoint {
    pub rps: f64,
    /// Answers per second by status class ("2xx", "3xx", "4xx", "5xx").
    pub codes: BTreeMap<&'static str, f64>,
    /// Latency percentiles in seconds over the last 10 s; None without requests.
    pub p50: Option<f64>,
    pub p95: Option<f64>,
    pub p99: Option<f64>,
    pub starting: f64,
    pub ready: f64,
    pub draining: f64,
    pub desired: Option<f64>,
    pub max: Option<f64>,
    pub demand: Option<f64>,
    pub forecast: Option<f64>,
    /// CPU cores per instance: mean and max over instances; limit per instance.
    pub cpu_mean: Option<f64>,
    pub cpu_max: Option<f64>,
    pub cpu_limit: Option<f64>,
    /// Resident memory per instance: max over instances; limit per instance.
    pub mem_max: Option<f64>,
    pub mem_limit: Option<f64>,
    /// Cache answers per second and the share served from cache (hit, stale, revalidated).
    pub cache_rps: Option<f64>,
    pub cache_hit_ratio: Option<f64>,
}

/// Every service (and queue) at one second.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Point {
    /// Unix seconds.
    pub t: f64,
    pub services: BTreeMap<String, ServicePoint>,
    /// Depth per queue.
    pub queues: BTreeMap<String, f64>,
    /// Jobs per second per queue and result (accepted, done, dead_lettered, ...).
    pub queue_jobs: BTreeMap<String, BTreeMap<String, f64>>,
}

/// An instance now, for the per-instance table.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct InstanceNow {
    pub id: String,
    pub state: String,
    pub healthy: bool,
    pub in_flight: f64,
    pub rps: f64,
    pub cpu: Option<f64>,
    pub mem: Option<f64>,
}

#[derive(Default)]
struct Prev {
    counters: HashMap<String, f64>,
    /// Per service: (time, cumulative bucket counts) over the latency window.
    latency: HashMap<String, VecDeque<(f64, Vec<f64>)>>,
}

type ByInstance<T> = BTreeMap<(String, String), T>;

/// Turns successive expositions into points. Pure: time and input are arguments.
#[derive(Default)]
pub struct Tracker {
    last_t: Option<f64>,
    prev: Prev,
    pub points: VecDeque<Point>,
    pub instances: BTreeMap<String, Vec<InstanceNow>>,
}

fn class(code: &str) -> &'static str {
    match code.as_bytes().first() {
        Some(b'1') => "1xx",
        Some(b'2') => "2xx",
        Some(b'3') => "3xx",
        Some(b'4') => "4xx",
        _ => "5xx",
    }
}

impl Tracker {
    /// A counter's rate since the previous call for the same key (a reset counts from 0).
    fn rate(&mut self, key: String, value: f64, dt: Option<f64>) -> Option<f64> {
        let prev = self.prev.counters.insert(key, value);
        let (prev, dt) = (prev?, dt?);
        let d = if value >= prev { value - prev } else { value };
        Some(d / dt)
    }

    /// Ingests the exposition at `t`; `states` holds each service's instances as
    /// (id, state, healthy). Returns the new point (also appended to the history).
    pub fn ingest(
        &mut self,
        t: f64,
        samples: &[Sample],
        states: &BTreeMap<String, Vec<(String, String, bool)>>,
    ) -> &Point {
        let dt = self.last_t.map(|l| (t - l).max(1e-3));
        self.last_t = Some(t);
        let mut point = Point {
            t,
            ..Point::default()
        };
        for s in states.keys() {
            point.services.entry(s.clone()).or_default();
        }
        // Sums per key before rates: several samples feed one counter (codes, instances).
        let mut sums: BTreeMap<(String, &str, String), f64> = BTreeMap::new();
        let mut buckets: BTreeMap<String, Vec<(f64, f64)>> = BTreeMap::new();
        // (memory, in flight) and (req/s, CPU cores) per (service, instance).
        let mut inst_gauges: ByInstance<(Option<f64>, f64)> = BTreeMap::new();
        for s in samples {
            let svc = s.label("service").to_string();
            match s.name.as_str() {
                "shoal_requests_total" => {
                    // A rate per series, then summed: a removed instance's series must not
                    // read as a counter reset of the service's total.
                    let inst = s.label("instance");
                    *sums
                        .entry((
                            svc.clone(),
                            "req",
                            format!("{}\u{0}{inst}", s.label("code")),
                        ))
                        .or_default() += s.value;
                    if !inst.is_empty() {
                        *sums.entry((svc, "inst_req", inst.to_string())).or_default() += s.value;
                    }
                }
                "shoal_request_duration_seconds_bucket" => {
                    let le = s.label("le");
                    let b = if le == "+Inf" {
                        f64::INFINITY
                    } else {
                        le.parse().unwrap_or(f64::INFINITY)
                    };
                    buckets.entry(svc).or_default().push((b, s.value));
                }
                "shoal_instances" => {
                    let p = point.services.entry(svc).or_default();
                    match s.label("state") {
                        "starting" => p.starting += s.value,
                        "ready" => p.ready += s.value,
                        "draining" => p.draining += s.value,
                        _ => {}
                    }
                }
                "shoal_desired_instances" => {
                    point.services.entry(svc).or_default().desired = Some(s.value)
                }
                "shoal_max_instances" => point.services.entry(svc).or_default().max = Some(s.value),
                "shoal_demand_rps" => point.services.entry(svc).or_default().demand = Some(s.value),
                "shoal_forecast_rps" => {
                    point.services.entry(svc).or_default().forecast = Some(s.value)
                }
                "shoal_instance_cpu_limit_cores" => {
                    point.services.entry(svc).or_default().cpu_limit = Some(s.value)
                }
                "shoal_instance_memory_limit_bytes" => {
                    point.services.entry(svc).or_default().mem_limit = Some(s.value)
                }
                "shoal_instance_cpu_seconds_total" => {
                    *sums
                        .entry((svc, "cpu", s.label("instance").to_string()))
                        .or_default() += s.value;
                }
                "shoal_instance_memory_bytes" => {
                    inst_gauges
                        .entry((svc, s.label("instance").to_string()))
                        .or_default()
                        .0 = Some(s.value);
                }
                "shoal_in_flight_requests" => {
                    inst_gauges
                        .entry((svc, s.label("instance").to_string()))
                        .or_default()
                        .1 = s.value;
                }
                "shoal_cache_requests_total" => {
                    let hit = matches!(s.label("result"), "hit" | "stale" | "revalidated");
                    *sums
                        .entry((svc.clone(), "cache_all", String::new()))
                        .or_default() += s.value;
                    if hit {
                        *sums.entry((svc, "cache_hit", String::new())).or_default() += s.value;
                    } else {
                        sums.entry((svc, "cache_hit", String::new())).or_default();
                    }
                }
                "shoal_queue_jobs_total" => {
                    let q = s.label("queue").to_string();
                    *sums
                        .entry((q, "queue_jobs", s.label("result").to_string()))
                        .or_default() += s.value;
                }
                "shoal_queue_depth" => {
                    *point
                        .queues
                        .entry(s.label("queue").to_string())
                        .or_default() += s.value;
                }
                _ => {}
            }
        }
        let mut inst_rates: ByInstance<(Option<f64>, Option<f64>)> = BTreeMap::new();
        let mut cache: BTreeMap<String, (f64, f64)> = BTreeMap::new();
        let mut seen = std::collections::HashSet::new();
        for ((svc, what, key), v) in sums {
            let k = format!("{svc}\u{0}{what}\u{0}{key}");
            seen.insert(k.clone());
            let r = self.rate(k, v, dt);
            match what {
                "req" => {
                    let p = point.services.entry(svc).or_default();
                    let r = r.unwrap_or(0.0);
                    p.rps += r;
                    *p.codes.entry(class(&key)).or_default() += r;
                }
                "inst_req" => inst_rates.entry((svc, key)).or_default().0 = r,
                "cpu" => inst_rates.entry((svc, key)).or_default().1 = r,
                "cache_all" => cache.entry(svc).or_default().0 = r.unwrap_or(0.0),
                "cache_hit" => cache.entry(svc).or_default().1 = r.unwrap_or(0.0),
                // `svc` holds the queue here.
                "queue_jobs" => {
                    if let Some(r) = r {
                        point.queue_jobs.entry(svc).or_default().insert(key, r);
                    }
                }
                _ => {}
            }
        }
        for (svc, (all, hit)) in cache {
            let p = point.services.entry(svc).or_default();
            p.cache_rps = Some(all);
            p.cache_hit_ratio = (all > 0.0).then(|| hit / all);
        }
        for (svc, mut b) in buckets {
            b.sort_by(|x, y| x.0.total_cmp(&y.0));
            let (bounds, counts): (Vec<f64>, Vec<f64>) = b.into_iter().unzip();
            let win = self.prev.latency.entry(svc.clone()).or_default();
            win.push_back((t, counts.clone()));
            while win
                .front()
                .is_some_and(|(ft, _)| t - ft > LATENCY_WINDOW_SECS + 0.5)
            {
                win.pop_front();
            }
            // Percentiles need two samples: the window's delta.
            let first = match win.front() {
                Some((_, f)) if win.len() > 1 => f,
                _ => continue,
            };
            let delta: Vec<f64> = counts
                .iter()
                .zip(first)
                .map(|(c, f)| (c - f).max(0.0))
                .collect();
            let p = point.services.entry(svc).or_default();
            p.p50 = quantile(&bounds, &delta, 0.5);
            p.p95 = quantile(&bounds, &delta, 0.95);
            p.p99 = quantile(&bounds, &delta, 0.99);
        }
        // The per-instance table and the per-service CPU/memory aggregates.
        self.instances.clear();
        for (svc, list) in states {
            let mut rows = Vec::with_capacity(list.len());
            for (id, state, healthy) in list {
                let k = (svc.clone(), id.clone());
                let (mem, in_flight) = inst_gauges.get(&k).copied().unwrap_or_default();
                let (rps, cpu) = inst_rates.get(&k).copied().unwrap_or_default();
                rows.push(InstanceNow {
                    id: id.clone(),
                    state: state.clone(),
                    healthy: *healthy,
                    in_flight,
                    rps: rps.unwrap_or(0.0),
                    cpu,
                    mem,
                });
            }
            let p = point.services.entry(svc.clone()).or_default();
            let live = rows.iter().filter(|r| r.state != "draining");
            let cpus: Vec<f64> = live.clone().filter_map(|r| r.cpu).collect();
            if !cpus.is_empty() {
                p.cpu_mean = Some(cpus.iter().sum::<f64>() / cpus.len() as f64);
                p.cpu_max = cpus.iter().copied().reduce(f64::max);
            }
            p.mem_max = live.filter_map(|r| r.mem).reduce(f64::max);
            self.instances.insert(svc.clone(), rows);
        }
        // Forget series that are gone (instances come and go).
        self.prev.counters.retain(|k, _| seen.contains(k));
        self.points.push_back(point);
        while self.points.front().is_some_and(|p| t - p.t > SPAN_SECS) {
            self.points.pop_front();
        }
        self.points.back().expect("just pushed")
    }
}

/// The dashboard's state shared by the sampler and the admin handlers.
pub struct Dashboard {
    tracker: Mutex<Tracker>,
    decisions: Mutex<BTreeMap<String, Value>>,
    pub events: broadcast::Sender<Arc<str>>,
    /// Open event streams (bounded: the admin listener is read-only but not unlimited).
    pub streams: std::sync::atomic::AtomicUsize,
}

/// Most event streams served at once.
pub const MAX_STREAMS: usize = 64;

impl Default for Dashboard {
    fn default() -> Self {
        Dashboard {
            tracker: Mutex::new(Tracker::default()),
            decisions: Mutex::new(BTreeMap::new()),
            events: broadcast::channel(8).0,
            streams: Default::default(),
        }
    }
}

fn sse(event: &str, v: &Value) -> Arc<str> {
    format!("event: {event}\ndata: {v}\n\n").into()
}

impl Dashboard {
    fn history(&self) -> Value {
        let t = self.tracker.lock().expect("dashboard lock");
        let d = self.decisions.lock().expect("dashboard lock");
        json!({
            "span_secs": SPAN_SECS,
            "points": t.points,
            "instances": t.instances,
            "decisions": *d,
        })
    }

    /// The whole history, the instance table and the decision logs, as JSON.
    pub fn history_json(&self) -> String {
        self.history().to_string()
    }

    /// The `init` event: [`Dashboard::history_json`] as the stream's first event.
    pub fn init_event(&self) -> Arc<str> {
        sse("init", &self.history())
    }

    /// One sample of `app`: appends a point and pushes it to open pages.
    pub fn sample(&self, app: &App) {
        let t = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0.0, |d| d.as_secs_f64());
        let samples = parse_exposition(&app.render_metrics());
        let mut states = BTreeMap::new();
        let mut changed = BTreeMap::new();
        for svc in app.services() {
            let list: Vec<(String, String, bool)> = svc
                .pool
                .members()
                .iter()
                .map(|i| (i.id.clone(), i.state().as_str().to_string(), i.is_healthy()))
                .collect();
            states.insert(svc.name.clone(), list);
            let log = app
                .extension_get(&format!("/api/services/{}/decisions", svc.name))
                .and_then(|v| v.get("decisions").and_then(|d| d.as_array()).cloned())
                .unwrap_or_default();
            let newest: Vec<Value> = log.into_iter().rev().take(DECISIONS).collect();
            let newest = Value::Array(newest);
            let mut d = self.decisions.lock().expect("dashboard lock");
            if d.get(&svc.name) != Some(&newest) {
                d.insert(svc.name.clone(), newest.clone());
                changed.insert(svc.name.clone(), newest);
            }
        }
        let event = {
            let mut tr = self.tracker.lock().expect("dashboard lock");
            let point = tr.ingest(t, &samples, &states).clone();
            sse(
                "point",
                &json!({ "point": point, "instances": tr.instances, "decisions": changed }),
            )
        };
        // No receiver is not an error: nobody has the page open.
        let _ = self.events.send(event);
    }

    /// Samples `app` every second until `stop` flips.
    pub async fn run(self: Arc<Self>, app: Arc<App>, mut stop: watch::Receiver<bool>) {
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                _ = crate::server::stopped(&mut stop) => return,
            }
            self.sample(&app);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_text_format() {
        let s = parse_exposition(
            "# HELP x X.\n# TYPE x counter\nx{a=\"1\",b=\"q\\\"\\\\\\n,}\"} 3\ny 1.5\nz{} NaN\n",
        );
        assert_eq!(s.len(), 3);
        assert_eq!(s[0].name, "x");
        assert_eq!(s[0].label("b"), "q\"\\\n,}");
        assert_eq!(s[0].value, 3.0);
        assert_eq!(s[1].value, 1.5);
        assert!(s[2].value.is_nan());
    }

    #[test]
    fn quantiles_interpolate_like_promql() {
        let b = [0.1, 0.2, f64::INFINITY];
        assert_eq!(quantile(&b, &[0.0, 0.0, 0.0], 0.5), None);
        // 100 in (0, 0.1], 100 in (0.1, 0.2]: the median is the first bucket's top.
        let q = quantile(&b, &[100.0, 200.0, 200.0], 0.5).unwrap();
        assert!((q - 0.1).abs() < 1e-9, "{q}");
        let q = quantile(&b, &[100.0, 200.0, 200.0], 0.75).unwrap();
        assert!((q - 0.15).abs() < 1e-9, "{q}");
        // Beyond the last finite bound: that bound.
        assert_eq!(quantile(&b, &[0.0, 0.0, 10.0], 0.99), Some(0.2));
    }

    fn expo(req_ok: u64, req_err: u64, fast: u64, slow: u64, cpu: f64) -> Vec<Sample> {
        let text = format!(
            "shoal_requests_total{{service=\"web\",instance=\"w1\",code=\"200\"}} {req_ok}\n\
             shoal_requests_total{{service=\"web\",instance=\"\",code=\"503\"}} {req_err}\n\
             shoal_request_duration_seconds_bucket{{service=\"web\",le=\"0.01\"}} {fast}\n\
             shoal_request_duration_seconds_bucket{{service=\"web\",le=\"1\"}} {}\n\
             shoal_request_duration_seconds_bucket{{service=\"web\",le=\"+Inf\"}} {}\n\
             shoal_instances{{service=\"web\",state=\"ready\"}} 1\n\
             shoal_desired_instances{{service=\"web\"}} 2\n\
             shoal_instance_cpu_seconds_total{{service=\"web\",instance=\"w1\"}} {cpu}\n\
             shoal_instance_memory_bytes{{service=\"web\",instance=\"w1\"}} 1000\n\
             shoal_queue_depth{{queue=\"jobs\"}} 7\n",
            fast + slow,
            fast + slow
        );
        parse_exposition(&text)
    }

    #[test]
    fn points_carry_rates_percentiles_and_the_instance_table() {
        let mut tr = Tracker::default();
        let states = BTreeMap::from([(
            "web".to_string(),
            vec![("w1".to_string(), "ready".to_string(), true)],
        )]);
        let p = tr.ingest(100.0, &expo(0, 0, 0, 0, 1.0), &states).clone();
        // No rate from a single sample.
        assert_eq!(p.services["web"].rps, 0.0);
        assert_eq!(p.services["web"].p99, None);
        // Two seconds later: 180 OK + 20 errors, 190 fast and 10 slow, 1 CPU second.
        let p = tr
            .ingest(102.0, &expo(180, 20, 190, 10, 2.0), &states)
            .clone();
        let w = &p.services["web"];
        assert!((w.rps - 100.0).abs() < 1e-9, "{w:?}");
        assert!((w.codes["5xx"] - 10.0).abs() < 1e-9, "{w:?}");
        assert!((w.codes["2xx"] - 90.0).abs() < 1e-9, "{w:?}");
        assert!(w.p50.unwrap() <= 0.01 && w.p99.unwrap() > 0.01, "{w:?}");
        assert_eq!((w.ready, w.desired), (1.0, Some(2.0)));
        assert_eq!(w.cpu_mean, Some(0.5));
        assert_eq!(w.mem_max, Some(1000.0));
        assert_eq!(w.cache_hit_ratio, None);
        assert_eq!(p.queues["jobs"], 7.0);
        let i = &tr.instances["web"][0];
        assert_eq!((i.id.as_str(), i.rps), ("w1", 90.0));
        // A counter reset (restart) counts from zero, not negative.
        let p = tr.ingest(103.0, &expo(10, 0, 10, 0, 0.1), &states).clone();
        assert!(p.services["web"].rps >= 0.0);
    }

    #[test]
    fn a_removed_instance_is_not_a_counter_reset() {
        let mut tr = Tracker::default();
        let states = BTreeMap::new();
        let two = parse_exposition(
            "shoal_requests_total{service=\"web\",instance=\"a\",code=\"200\"} 1000\n\
             shoal_requests_total{service=\"web\",instance=\"b\",code=\"200\"} 5000\n",
        );
        let one = parse_exposition(
            "shoal_requests_total{service=\"web\",instance=\"a\",code=\"200\"} 1010\n",
        );
        tr.ingest(0.0, &two, &states);
        let p = tr.ingest(1.0, &one, &states).clone();
        assert_eq!(p.services["web"].rps, 10.0);
    }

    #[test]
    fn two_hundred_instances_keep_the_page_small() {
        // 200 instances for 15 minutes: the history holds aggregates, the table only now.
        let ids: Vec<String> = (0..200).map(|i| format!("web-{i}")).collect();
        let states = BTreeMap::from([(
            "web".to_string(),
            ids.iter()
                .map(|i| (i.clone(), "ready".to_string(), true))
                .collect::<Vec<_>>(),
        )]);
        let mut tr = Tracker::default();
        for t in 0..920 {
            let mut text = String::new();
            for (n, id) in ids.iter().enumerate() {
                text.push_str(&format!(
                    "shoal_requests_total{{service=\"web\",instance=\"{id}\",code=\"200\"}} {}\n\
                     shoal_instance_cpu_seconds_total{{service=\"web\",instance=\"{id}\"}} {}\n\
                     shoal_instance_memory_bytes{{service=\"web\",instance=\"{id}\"}} 1e8\n",
                    t * (n + 1),
                    t as f64 * 0.5
                ));
            }
            tr.ingest(t as f64, &parse_exposition(&text), &states);
        }
        let last = tr.points.back().unwrap();
        assert_eq!(last.services["web"].rps, (1..=200).sum::<usize>() as f64);
        assert_eq!(last.services["web"].cpu_max, Some(0.5));
        assert_eq!(tr.instances["web"].len(), 200);
        let history = serde_json::to_string(&tr.points).unwrap();
        let table = serde_json::to_string(&tr.instances).unwrap();
        assert!(history.len() < 600_000, "history {} bytes", history.len());
        assert!(table.len() < 40_000, "table {} bytes", table.len());
        // Counters of live series only: by code, per instance, CPU.
        assert_eq!(tr.prev.counters.len(), 600);
    }

    #[test]
    fn queue_job_rates_per_result() {
        let mut tr = Tracker::default();
        let states = BTreeMap::new();
        let at = |accepted: u64, done: u64| {
            parse_exposition(&format!(
                "shoal_queue_depth{{queue=\"jobs\"}} 7\n\
                 shoal_queue_jobs_total{{queue=\"jobs\",result=\"accepted\"}} {accepted}\n\
                 shoal_queue_jobs_total{{queue=\"jobs\",result=\"done\"}} {done}\n"
            ))
        };
        let first = tr.ingest(0.0, &at(100, 90), &states).clone();
        assert!(first.queue_jobs.is_empty(), "no rate from one sample");
        let p = tr.ingest(2.0, &at(140, 100), &states).clone();
        assert_eq!(p.queues["jobs"], 7.0);
        assert_eq!(p.queue_jobs["jobs"]["accepted"], 20.0);
        assert_eq!(p.queue_jobs["jobs"]["done"], 5.0);
    }

    #[test]
    fn history_keeps_fifteen_minutes() {
        let mut tr = Tracker::default();
        let states = BTreeMap::new();
        for s in 0..2000 {
            tr.ingest(s as f64, &[], &states);
        }
        assert_eq!(tr.points.len(), 901);
        assert_eq!(tr.points.front().unwrap().t, 1099.0);
    }

    #[test]
    fn cache_hit_ratio_counts_hits_stale_and_revalidated() {
        let mut tr = Tracker::default();
        let states = BTreeMap::new();
        let at = |hit: u64, miss: u64, stale: u64| {
            parse_exposition(&format!(
                "shoal_cache_requests_total{{service=\"web\",result=\"hit\"}} {hit}\n\
                 shoal_cache_requests_total{{service=\"web\",result=\"miss\"}} {miss}\n\
                 shoal_cache_requests_total{{service=\"web\",result=\"stale\"}} {stale}\n"
            ))
        };
        tr.ingest(0.0, &at(0, 0, 0), &states);
        let p = tr.ingest(1.0, &at(60, 20, 20), &states).clone();
        assert_eq!(p.services["web"].cache_hit_ratio, Some(0.8));
        assert_eq!(p.services["web"].cache_rps, Some(100.0));
    }
}
