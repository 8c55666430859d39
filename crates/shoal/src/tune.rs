//! `shoal tune` and `shoal history export`: the cheapest autoscaling settings meeting an
//! objective on a user's own traffic (a trace, shoal's recorded history or a Prometheus range
//! query), searched by `shoal_scale::tune` through the simulator.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context};
use shoal_scale::sim::{FleetModel, SimReport};
use shoal_scale::trace::{parse_csv, Trace};
use shoal_scale::tune::{tune, Outcome, Slo, Space, TuneReport};
use shoal_scale::{History, PolicyParams};

/// Arguments of `shoal tune`.
#[derive(clap::Args, Debug, Clone)]
pub struct TuneArgs {
    /// Demand trace, CSV with header `t,rps` (t in seconds from the start).
    #[arg(long, value_name = "CSV", conflicts_with_all = ["history", "prometheus"])]
    pub trace: Option<PathBuf>,
    /// shoal's own recorded demand: the `data_dir` of a run (with `--service`).
    #[arg(
        long,
        value_name = "DATA_DIR",
        requires = "service",
        conflicts_with = "prometheus"
    )]
    pub history: Option<PathBuf>,
    /// The service whose history to read.
    #[arg(long, value_name = "NAME")]
    pub service: Option<String>,
    /// A Prometheus server, `http://HOST:PORT[/PATH]`, to read demand from (with
    /// `--query`, `--from`, `--to`).
    #[arg(long, value_name = "URL", requires_all = ["query", "from", "to"])]
    pub prometheus: Option<String>,
    /// PromQL giving requests/s (summed over series), e.g.
    /// `sum(rate(shoal_requests_total{service="web"}[1m]))`.
    #[arg(long, value_name = "PROMQL")]
    pub query: Option<String>,
    /// Start of the range: Unix seconds, `now`, or `now-DURATION` (e.g. `now-7d`).
    #[arg(long, value_name = "TIME")]
    pub from: Option<String>,
    /// End of the range (same forms).
    #[arg(long, value_name = "TIME")]
    pub to: Option<String>,
    /// Range query resolution, seconds (default: 60, finer for ranges under 11,000 s).
    #[arg(long, value_name = "SECONDS")]
    pub step: Option<f64>,
    /// Requests/s one instance serves at full utilization (with `--history`: estimated
    /// from the recorded CPU when not given).
    #[arg(long, value_name = "RPS")]
    pub capacity: Option<f64>,
    /// Seconds from launch to ready.
    #[arg(long, value_name = "SECONDS")]
    pub startup: f64,
    /// Most time with demand over ready capacity, percent (`0.1` or `0.1%`).
    #[arg(long, value_name = "PCT", value_parser = percent, required_unless_present = "max_unserved")]
    pub max_violation: Option<f64>,
    /// Most requests beyond ready capacity, percent.
    #[arg(long, value_name = "PCT", value_parser = percent)]
    pub max_unserved: Option<f64>,
    /// Seconds between policy evaluations in the replay (default 15, or the history's
    /// bucket when shorter).
    #[arg(long, value_name = "SECONDS")]
    pub interval: Option<f64>,
    /// Minimum instances.
    #[arg(long, default_value_t = 1)]
    pub min: u32,
    /// Maximum instances.
    #[arg(long, default_value_t = 10_000)]
    pub max: u32,
    /// Policies to search (default: reactive and predictive).
    #[arg(long = "policy", value_name = "NAME", value_parser = ["reactive", "predictive"])]
    pub policies: Vec<String>,
    /// Service name in the config snippet (default: `--service`, else `web`).
    #[arg(long, value_name = "NAME")]
    pub name: Option<String>,
    /// Print one JSON object: `settings`, `result`, `baseline`, `slo`, `frontier`.
    #[arg(long)]
    pub json: bool,
    /// Write an SVG of the trade-off (violation time against instance-hours) per family.
    #[arg(long, value_name = "FILE.svg")]
    pub plot: Option<PathBuf>,
    /// Simulations run in parallel (default: the available cores).
    #[arg(long, value_name = "N")]
    pub threads: Option<usize>,
}

/// `shoal history ...`.
#[derive(clap::Subcommand, Debug, Clone)]
pub enum HistoryCmd {
    /// Write a service's recorded demand as a `t,rps` CSV (t from the first bucket), the
    /// input of `shoal tune --trace` and `shoal simulate --trace`.
    Export {
        /// The `data_dir` of a run.
        #[arg(long, value_name = "DATA_DIR")]
        data_dir: PathBuf,
        /// The service.
        #[arg(long, value_name = "NAME")]
        service: String,
        /// Output file (default: stdout).
        #[arg(long, short, value_name = "CSV")]
        output: Option<PathBuf>,
    },
}

fn percent(s: &str) -> Result<f64, String> {
    let v: f64 = s
        .trim()
        .trim_end_matches('%')
        .parse()
        .map_err(|_| format!("{s:?} is not a percentage"))?;
    if !(0.0..=100.0).contains(&v) {
        return Err(format!("{s:?} is not between 0 and 100"));
    }
    Ok(v / 100.0)
}

/// The recorded demand of `service` in `data_dir`: what every fleet records, else the
/// predictive policy's own history.
fn read_history(data_dir: &Path, service: &str) -> anyhow::Result<History> {
    let recorded = shoal_fleet::autoscaler::demand_history_file(data_dir, service);
    let forecast = data_dir.join("history").join(format!("{service}.json"));
    for file in [&recorded, &forecast] {
        if let Ok(bytes) = std::fs::read(file) {
            let h: History = serde_json::from_slice(&bytes)
                .with_context(|| format!("reading {}", file.display()))?;
            if h.values.iter().any(Option::is_some) {
                return Ok(h);
            }
        }
    }
    bail!(
        "no recorded demand for service {service:?} in {} (looked for {} and {})",
        data_dir.display(),
        recorded.display(),
        forecast.display()
    )
}

/// Run `shoal history`.
pub fn run_history(cmd: HistoryCmd) -> anyhow::Result<()> {
    match cmd {
        HistoryCmd::Export {
            data_dir,
            service,
            output,
        } => {
            let h = read_history(&data_dir, &service)?;
            let csv = h
                .to_trace(&service)
                .map_err(|e| anyhow::anyhow!(e))?
                .to_csv();
            match output {
                Some(path) => std::fs::write(&path, csv)
                    .with_context(|| format!("writing {}", path.display()))?,
                None => print!("{csv}"),
            }
            Ok(())
        }
    }
}

fn now_epoch() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

/// Unix seconds, `now`, or `now-DURATION`.
fn parse_time(s: &str, now: f64) -> anyhow::Result<f64> {
    if s == "now" {
        return Ok(now);
    }
    if let Some(d) = s.strip_prefix("now-") {
        let d =
            shoal_proxy::config::parse_duration(d).map_err(|e| anyhow::anyhow!("{s:?}: {e}"))?;
        return Ok(now - d.as_secs_f64());
    }
    s.parse::<f64>()
        .map_err(|_| anyhow::anyhow!("{s:?}: expected Unix seconds, `now` or `now-DURATION`"))
}

/// The demand to tune on, its start (epoch seconds) and, from history, a capacity estimate.
fn load(args: &TuneArgs) -> anyhow::Result<(Trace, f64, Option<f64>, Option<f64>)> {
    if let Some(path) = &args.trace {
        let text =
            std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        return Ok((
            parse_csv(&text, &path.display().to_string())?,
            0.0,
            None,
            None,
        ));
    }
    if let Some(dir) = &args.history {
        let service = args.service.as_deref().unwrap_or_default();
        let h = read_history(dir, service)?;
        let trace = h.to_trace(service).map_err(|e| anyhow::anyhow!(e))?;
        return Ok((
            trace,
            h.start_epoch_secs(),
            h.capacity_estimate(),
            Some(h.bucket_secs),
        ));
    }
    if let Some(server) = &args.prometheus {
        let now = now_epoch();
        let from = parse_time(args.from.as_deref().unwrap_or_default(), now)?;
        let to = parse_time(args.to.as_deref().unwrap_or_default(), now)?;
        anyhow::ensure!(to > from, "--to must be after --from");
        // Prometheus answers at most 11,000 points per series.
        let step = args
            .step
            .unwrap_or_else(|| ((to - from) / 10_000.0).ceil().clamp(1.0, 60.0));
        let query = args.query.as_deref().unwrap_or_default();
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        let points = rt
            .block_on(shoal_fleet::promsource::query_range(
                server,
                query,
                from,
                to,
                step,
                Duration::from_secs(60),
            ))
            .map_err(|e| anyhow::anyhow!("{server}: {query}: {e}"))?;
        let t0 = points[0].0;
        let mut text = String::from("t,rps\n");
        for (t, v) in &points {
            text.push_str(&format!("{},{}\n", t - t0, v.max(0.0)));
        }
        return Ok((parse_csv(&text, server)?, t0, None, Some(step)));
    }
    bail!("give --trace CSV, --history DATA_DIR --service NAME, or --prometheus URL --query Q --from T --to T")
}

/// Run `shoal tune`.
pub fn run(args: TuneArgs) -> anyhow::Result<()> {
    let (trace, start_epoch, estimated, resolution) = load(&args)?;
    let trace = Arc::new(trace);
    let capacity = match (args.capacity, estimated) {
        (Some(c), _) => c,
        (None, Some(c)) => {
            if !args.json {
                eprintln!(
                    "capacity estimated from the recorded CPU: {c:.3} requests/s per instance"
                );
            }
            c
        }
        (None, None) => {
            bail!("--capacity is required (estimated only from --history with CPU recorded)")
        }
    };
    let interval = args
        .interval
        .unwrap_or_else(|| resolution.map_or(15.0, |r| r.min(15.0)));
    // A replay steps by the interval: zero, negative or tiny values would never end.
    if !(interval.is_finite() && interval >= 0.1) {
        bail!("--interval must be at least 0.1 seconds (got {interval})");
    }
    if !(capacity.is_finite() && capacity > 0.0) {
        bail!("--capacity must be above 0 requests/s per instance (got {capacity})");
    }
    if !(args.startup.is_finite() && args.startup >= 0.0) {
        bail!("--startup must be 0 or more seconds (got {})", args.startup);
    }
    let params = PolicyParams {
        capacity_rps: capacity,
        startup_secs: args.startup,
        interval_secs: interval,
        target_utilization: 0.7,
        min: args.min,
        max: args.max,
        schedule: Vec::new(),
    };
    let mut model = FleetModel::new(capacity, args.startup);
    model.interval_secs = interval;
    model.start_epoch_secs = start_epoch;
    let slo = Slo {
        max_violation: args.max_violation,
        max_unserved: args.max_unserved,
    };
    let mut space = Space::default();
    if !args.policies.is_empty() {
        space.policies = space
            .policies
            .iter()
            .copied()
            .filter(|p| args.policies.iter().any(|q| q == p))
            .collect();
    }
    let threads = args
        .threads
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()));
    let started = std::time::Instant::now();
    let report = tune(&trace, &params, &model, &slo, &space, threads)?;
    if let Some(path) = &args.plot {
        plot(path, &report, trace.duration_secs())
            .with_context(|| format!("writing {}", path.display()))?;
    }
    let name = args
        .name
        .clone()
        .or(args.service.clone())
        .unwrap_or_else(|| "web".into());
    if args.json {
        println!(
            "{}",
            serde_json::to_string_pretty(&json(&report, &params, &slo, &trace))?
        );
    } else {
        print_text(&report, &params, &slo, &name, &trace, started.elapsed());
    }
    Ok(())
}

fn figures(o: &Outcome) -> serde_json::Value {
    serde_json::json!({
        "violation_seconds": o.violation_seconds,
        "violation_fraction": o.violation_fraction,
        "instance_hours": o.instance_hours,
        "unserved_fraction": o.unserved_fraction,
        "meets_slo": o.meets,
    })
}

fn json(r: &TuneReport, params: &PolicyParams, slo: &Slo, trace: &Trace) -> serde_json::Value {
    // The baseline's figures at its top level too, beside its `settings` and `result`.
    let mut baseline = figures(&r.baseline);
    baseline["settings"] = r.baseline.candidate.config_keys(params);
    baseline["result"] = figures(&r.baseline);
    serde_json::json!({
        "trace": {
            "duration_secs": trace.duration_secs(),
            "mean_rps": trace.mean_rps(),
            "peak_rps": trace.rps.iter().copied().fold(0.0, f64::max),
        },
        "settings": r.best.as_ref().map(|b| b.candidate.config_keys(params)),
        "result": r.best.as_ref().map(figures),
        "baseline": baseline,
        "reactive_meeting_slo": r.reactive_best.as_ref().map(|o| {
            let mut v = figures(o);
            v["settings"] = o.candidate.config_keys(params);
            v
        }),
        "slo": slo,
        "evaluated": r.evaluated.len(),
        "frontier": r.frontier.iter().map(|o| {
            let mut v = figures(o);
            v["settings"] = o.candidate.config_keys(params);
            v
        }).collect::<Vec<_>>(),
    })
}

fn label(o: &Outcome) -> String {
    let c = &o.candidate;
    format!(
        "{}@{:.3} down {:.0}s",
        c.policy, c.target_utilization, c.scale_down_stabilization_secs
    )
}

fn print_text(
    r: &TuneReport,
    params: &PolicyParams,
    slo: &Slo,
    name: &str,
    trace: &Trace,
    took: Duration,
) {
    let mut goal = Vec::new();
    if let Some(v) = slo.max_violation {
        goal.push(format!("violation ≤ {}%", v * 100.0));
    }
    if let Some(u) = slo.max_unserved {
        goal.push(format!("unserved ≤ {}%", u * 100.0));
    }
    println!(
        "trace: {:.1} days, mean {:.3} rps; capacity {} rps/instance, startup {} s; objective: {}",
        trace.duration_secs() / 86_400.0,
        trace.mean_rps(),
        params.capacity_rps,
        params.startup_secs,
        goal.join(", ")
    );
    println!(
        "{} settings replayed in {:.1} s\n",
        r.evaluated.len() + 1,
        took.as_secs_f64()
    );
    println!(
        "{:<30} {:>12} {:>9} {:>10} {:>14}  meets",
        "settings", "violation_s", "% time", "unserved", "instance_hours"
    );
    let row = |o: &Outcome, mark: &str| {
        println!(
            "{:<30} {:>12.0} {:>8.3}% {:>10.5} {:>14.1}  {}{}",
            label(o),
            o.violation_seconds,
            100.0 * o.violation_fraction,
            o.unserved_fraction,
            o.instance_hours,
            if o.meets { "yes" } else { "no" },
            mark
        );
    };
    println!("trade-off (no setting is better on both axes):");
    for o in &r.frontier {
        let best = r.best.as_ref().is_some_and(|b| b.candidate == o.candidate);
        row(o, if best { "  <- recommended" } else { "" });
    }
    println!("baseline:");
    row(&r.baseline, "");
    if let Some(o) = &r.reactive_best {
        println!("cheapest reactive meeting the objective:");
        row(o, "");
    }
    println!();
    match &r.best {
        Some(b) => {
            let retuned = r.reactive_best.as_ref().map_or(String::new(), |o| {
                format!(
                    ", {:+.1}% against the cheapest reactive meeting it",
                    100.0 * (b.instance_hours / o.instance_hours - 1.0)
                )
            });
            println!(
                "recommended: {} ({:+.1}% instance-hours against reactive@0.7{retuned})\n",
                label(b),
                100.0 * (b.instance_hours / r.baseline.instance_hours - 1.0)
            );
            print!("{}", b.candidate.toml(name, params));
        }
        None => println!("no setting searched meets the objective; the frontier shows the closest"),
    }
}

/// The evaluated settings per family (policy, stabilization) as trade-off curves.
fn plot(path: &Path, r: &TuneReport, duration: f64) -> anyhow::Result<()> {
    let mut curves: Vec<(String, Vec<(f64, SimReport)>)> = Vec::new();
    let mut all: Vec<&Outcome> = r.evaluated.iter().collect();
    all.sort_by(|a, b| {
        a.candidate
            .target_utilization
            .total_cmp(&b.candidate.target_utilization)
    });
    for o in all {
        let c = &o.candidate;
        let family = format!("{} down {:.0}s", c.policy, c.scale_down_stabilization_secs);
        let report = SimReport {
            policy: family.clone(),
            violation_seconds: o.violation_seconds,
            violation_fraction: o.violation_fraction,
            unserved_fraction: o.unserved_fraction,
            instance_hours: o.instance_hours,
            scale_events: 0,
            duration_secs: duration,
            reasons: Default::default(),
            series: Vec::new(),
        };
        match curves.iter_mut().find(|(n, _)| *n == family) {
            Some((_, pts)) => pts.push((c.target_utilization, report)),
            None => curves.push((family, vec![(c.target_utilization, report)])),
        }
    }
    crate::plot::tradeoff(path, &curves, None)
}
