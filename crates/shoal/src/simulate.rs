//! `shoal simulate`: replay a demand trace through the scaling policies.
//!
//! The policies are the live autoscaler's own (`shoal_scale::policy_by_name`); this
//! module only reads the trace, runs them on the model fleet and prints or plots.

use std::io::{IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use anyhow::{bail, Context};
use shoal_scale::schedule::ScheduleRule;
use shoal_scale::sim::{simulate, FleetModel, OraclePolicy, SimReport};
use shoal_scale::trace::{parse_csv, synthetic_with, SyntheticSpec, Trace, SHAPES};
use shoal_scale::{policy_by_name, Policy, PolicyParams};

/// Arguments of `shoal simulate`.
#[derive(clap::Args, Debug, Clone)]
pub struct SimulateArgs {
    /// Demand trace, CSV with header `t,rps` (t in seconds from the start).
    #[arg(long, value_name = "CSV", required_unless_present = "synthetic")]
    pub trace: Option<PathBuf>,
    /// Use a synthetic trace (daily and weekly cycles, noise, spikes, level shifts)
    /// generated from this seed instead of `--trace`.
    #[arg(long, value_name = "SEED", conflicts_with = "trace")]
    pub synthetic: Option<u64>,
    /// Days of synthetic trace.
    #[arg(long, value_name = "N", default_value_t = 28)]
    pub days: u32,
    /// Shape of the synthetic trace: default, growth, flash (flash crowds), weekly
    /// (no daily cycle), noise (heavy noise), flat (no seasonality at all), social
    /// (swings within the hour and spikes over a weak daily cycle), steps5 (5-minute
    /// rows, daily peaks ~5× the mean), trend (growth turning), holiday.
    #[arg(
        long,
        value_name = "NAME",
        default_value = "default",
        requires = "synthetic"
    )]
    pub shape: String,
    /// Write the trace (e.g. the synthetic one) as CSV to this file.
    #[arg(long, value_name = "FILE")]
    pub write_trace: Option<PathBuf>,
    /// Policy to run; repeat to compare side by side (`reactive`, `hpa`,
    /// `predictive`, `forecast-only`, `oracle`). Default: reactive (with `--sweep`:
    /// reactive and predictive).
    #[arg(long = "policy", value_name = "NAME")]
    pub policies: Vec<String>,
    /// Requests/s one instance can serve.
    #[arg(long, value_name = "RPS_PER_INSTANCE")]
    pub capacity: Option<f64>,
    /// Seconds from launch to ready.
    #[arg(long, value_name = "SECONDS")]
    pub startup: Option<f64>,
    /// Seconds between policy evaluations.
    #[arg(long, value_name = "SECONDS", default_value_t = 15.0)]
    pub interval: f64,
    /// Target utilization for reactive target tracking.
    #[arg(long, default_value_t = 0.7)]
    pub target_utilization: f64,
    /// Minimum instances.
    #[arg(long, default_value_t = 1)]
    pub min: u32,
    /// Maximum instances.
    #[arg(long, default_value_t = 10_000)]
    pub max: u32,
    /// Scheduled minimum (UTC), e.g. "mon-fri 08:00-18:00 min=4"; repeatable.
    #[arg(long = "schedule", value_name = "RULE")]
    pub schedule: Vec<String>,
    /// Unix epoch seconds (UTC) of the trace's t = 0 (for schedules and weekdays).
    #[arg(long, value_name = "EPOCH_SECS", default_value_t = 0.0)]
    pub start_epoch: f64,
    /// Print JSON (one object, or an array for several policies).
    #[arg(long)]
    pub json: bool,
    /// Write an SVG plot: demand against ready capacity with violations shaded, over the
    /// instances (ready, starting); the whole trace and a window (`--from`/`--to`, else the
    /// day with the most violation). With `--sweep`: the trade-off curves and the oracle.
    #[arg(long, value_name = "FILE.svg")]
    pub plot: Option<PathBuf>,
    /// Start of the plot's window, from the trace's start (e.g. "36h", "2d", "5400").
    #[arg(long, value_name = "DURATION", requires = "plot", value_parser = duration_secs)]
    pub from: Option<f64>,
    /// End of the plot's window (default: a day after `--from`).
    #[arg(long, value_name = "DURATION", requires = "plot", value_parser = duration_secs)]
    pub to: Option<f64>,
    /// Print each policy's trade-off curve (violation time vs instance-hours) as
    /// the target utilization varies.
    #[arg(long)]
    pub sweep: bool,
    /// Print the forecast models' backtest errors at the startup horizon.
    #[arg(long)]
    pub backtest: bool,
}

/// Run `shoal simulate`.
pub fn run(args: SimulateArgs) -> anyhow::Result<()> {
    let trace = Arc::new(load_trace(&args)?);
    if let Some(path) = &args.write_trace {
        std::fs::write(path, trace.to_csv())
            .with_context(|| format!("writing {}", path.display()))?;
        if args.capacity.is_none() {
            eprintln!("wrote {} rows to {}", trace.t.len(), path.display());
            return Ok(());
        }
    }
    let (Some(capacity), Some(startup)) = (args.capacity, args.startup) else {
        bail!("--capacity and --startup are required to simulate");
    };
    let schedule = args
        .schedule
        .iter()
        .map(|s| s.parse::<ScheduleRule>())
        .collect::<Result<Vec<_>, _>>()?;
    let params = PolicyParams {
        capacity_rps: capacity,
        startup_secs: startup,
        interval_secs: args.interval,
        target_utilization: args.target_utilization,
        min: args.min,
        max: args.max,
        schedule,
    };
    let mut model = FleetModel::new(capacity, startup);
    model.interval_secs = args.interval;
    model.start_epoch_secs = args.start_epoch;
    if args.plot.is_some() && !args.sweep {
        // A point per evaluation: the plot reduces them per pixel keeping the extremes.
        let duration =
            trace.t.last().copied().unwrap_or(0.0) - trace.t.first().copied().unwrap_or(0.0);
        model.series_points = (duration / args.interval.max(1e-3)).clamp(1.0, 2e6) as usize;
    }
    let policies: Vec<String> = match (args.policies.is_empty(), args.sweep) {
        (false, _) => args.policies.clone(),
        (true, false) => vec!["reactive".into()],
        (true, true) => vec!["reactive".into(), "predictive".into()],
    };
    // Reject unknown names before any long run.
    for name in &policies {
        build(name, &params, &trace)?;
    }

    if args.backtest {
        print_backtest(&trace, startup, args.interval);
    }
    if args.sweep {
        return sweep(
            &trace,
            &policies,
            &params,
            &model,
            args.json,
            args.plot.as_deref(),
        );
    }

    let mut reports = Vec::new();
    for name in &policies {
        let mut policy = build(name, &params, &trace)?;
        let started = Instant::now();
        let report = run_one(&trace, policy.as_mut(), &model, name);
        if !args.json {
            eprintln!(
                "{name}: simulated in {:.2} s",
                started.elapsed().as_secs_f64()
            );
        }
        reports.push(report);
    }
    if let Some(path) = &args.plot {
        let window = match (args.from, args.to) {
            (None, None) => None,
            (from, to) => {
                let from = from.unwrap_or(0.0);
                let to = to.unwrap_or(from + 86400.0);
                anyhow::ensure!(to > from, "--to must be after --from");
                Some(from..to)
            }
        };
        crate::plot::timeline(path, &reports, capacity, window)
            .with_context(|| format!("writing {}", path.display()))?;
    }
    if args.json {
        let out = if reports.len() == 1 {
            serde_json::to_string_pretty(&reports[0])?
        } else {
            serde_json::to_string_pretty(&reports)?
        };
        println!("{out}");
    } else {
        print_table(&reports, &trace);
    }
    Ok(())
}

fn load_trace(args: &SimulateArgs) -> anyhow::Result<Trace> {
    if let Some(seed) = args.synthetic {
        let Some(spec) = SyntheticSpec::shape(&args.shape, args.days) else {
            bail!(
                "unknown --shape `{}` (known: {})",
                args.shape,
                SHAPES.join(", ")
            );
        };
        return Ok(synthetic_with(seed, &spec));
    }
    let Some(path) = &args.trace else {
        bail!("give --trace CSV or --synthetic SEED");
    };
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    Ok(parse_csv(&text, &path.display().to_string())?)
}

fn build(name: &str, params: &PolicyParams, trace: &Arc<Trace>) -> anyhow::Result<Box<dyn Policy>> {
    if name == "oracle" {
        return Ok(Box::new(OraclePolicy::new(
            trace.clone(),
            params.capacity_rps,
            params.target_utilization,
            params.startup_secs,
            params.interval_secs,
        )));
    }
    policy_by_name(name, params).map_err(|e| anyhow::anyhow!("{e}; or `oracle` (simulator only)"))
}

/// Run one policy, with a progress bar on stderr when it is a terminal.
fn run_one(trace: &Trace, policy: &mut dyn Policy, model: &FleetModel, label: &str) -> SimReport {
    let tty = std::io::stderr().is_terminal();
    let mut shown = -1i64;
    let report = simulate(trace, policy, model, |fraction| {
        if !tty {
            return;
        }
        let pct = (fraction * 100.0).floor() as i64;
        if pct != shown {
            shown = pct;
            let filled = (fraction * 30.0).round() as usize;
            let bar: String = "#".repeat(filled) + &".".repeat(30 - filled.min(30));
            let mut err = std::io::stderr().lock();
            let _ = write!(err, "\r{label:>14} [{bar}] {pct:3}%");
            let _ = err.flush();
        }
    });
    if tty {
        eprint!("\r{}\r", " ".repeat(60));
    }
    report
}

fn print_table(reports: &[SimReport], trace: &Trace) {
    println!(
        "trace: {:.1} days, mean {:.3} rps",
        trace.duration_secs() / 86_400.0,
        trace.mean_rps()
    );
    println!(
        "{:<14} {:>17} {:>8} {:>10} {:>15} {:>12}",
        "policy", "violation_seconds", "% time", "unserved", "instance_hours", "scale_events"
    );
    for r in reports {
        println!(
            "{:<14} {:>17.0} {:>7.3}% {:>10.5} {:>15.1} {:>12}",
            r.policy,
            r.violation_seconds,
            100.0 * r.violation_fraction,
            r.unserved_fraction,
            r.instance_hours,
            r.scale_events
        );
    }
}

fn print_backtest(trace: &Trace, startup: f64, interval: f64) {
    let h = ((startup + interval) / 60.0).ceil().max(1.0) as usize;
    let rows = shoal_scale::forecast::backtest(trace, h, 7, 360, 0.99);
    println!("backtest: {h} min ahead, after 7 days of history, refit every 6 h");
    println!(
        "{:<22} {:>10} {:>8} {:>14} {:>12}",
        "model", "mae_rps", "mase", "mean_q99_rps", "exceed_q99"
    );
    for r in rows {
        println!(
            "{:<22} {:>10.4} {:>8.3} {:>14.4} {:>11.2}%",
            r.model,
            r.mae,
            r.mase,
            r.mean_upper,
            100.0 * r.exceed
        );
    }
}

const SWEEP: [f64; 9] = [0.5, 0.55, 0.6, 0.65, 0.7, 0.75, 0.8, 0.85, 0.9];

fn sweep(
    trace: &Arc<Trace>,
    policies: &[String],
    params: &PolicyParams,
    model: &FleetModel,
    json: bool,
    plot: Option<&Path>,
) -> anyhow::Result<()> {
    let mut curves: Vec<(String, Vec<(f64, SimReport)>)> = Vec::new();
    for name in policies {
        let mut curve = Vec::new();
        for u in SWEEP {
            let p = PolicyParams {
                target_utilization: u,
                ..params.clone()
            };
            let mut policy = build(name, &p, trace)?;
            let report = run_one(trace, policy.as_mut(), model, &format!("{name}@{u}"));
            curve.push((u, report));
        }
        curves.push((name.clone(), curve));
    }
    if let Some(path) = plot {
        let mut oracle = build("oracle", params, trace)?;
        let o = run_one(trace, oracle.as_mut(), model, "oracle");
        crate::plot::tradeoff(path, &curves, Some(&o))
            .with_context(|| format!("writing {}", path.display()))?;
    }
    if json {
        let out: Vec<_> = curves
            .iter()
            .map(|(name, c)| {
                serde_json::json!({
                    "policy": name,
                    "points": c.iter().map(|(u, r)| serde_json::json!({
                        "target_utilization": u,
                        "violation_seconds": r.violation_seconds,
                        "unserved_fraction": r.unserved_fraction,
                        "instance_hours": r.instance_hours,
                        "scale_events": r.scale_events,
                    })).collect::<Vec<_>>(),
                })
            })
            .collect();
        println!("{}", serde_json::to_string_pretty(&out)?);
        return Ok(());
    }
    println!(
        "{:<14} {:>6} {:>17} {:>8} {:>15}",
        "policy", "target", "violation_seconds", "% time", "instance_hours"
    );
    for (name, curve) in &curves {
        for (u, r) in curve {
            println!(
                "{:<14} {:>6.2} {:>17.0} {:>7.3}% {:>15.1}",
                name,
                u,
                r.violation_seconds,
                100.0 * r.violation_fraction,
                r.instance_hours
            );
        }
    }
    // Compare each curve with the first one: at equal instance-hours (linear
    // interpolation on the first curve), is the violation time lower?
    if let Some((base_name, base)) = curves.first() {
        let mut base_pts: Vec<(f64, f64)> = base
            .iter()
            .map(|(_, r)| (r.instance_hours, r.violation_seconds))
            .collect();
        base_pts.sort_by(|a, b| a.0.total_cmp(&b.0));
        for (name, curve) in curves.iter().skip(1) {
            let (mut below, mut compared) = (0, 0);
            for (_, r) in curve {
                if let Some(v) = interpolate(&base_pts, r.instance_hours) {
                    compared += 1;
                    below += usize::from(r.violation_seconds < v);
                }
            }
            println!(
                "{name} below {base_name}: {below} of {compared} points inside {base_name}'s \
                 instance-hour range{}",
                if below == compared && compared > 0 {
                    " (everywhere)"
                } else {
                    ""
                }
            );
        }
    }
    Ok(())
}

/// The curve's value at `x` by linear interpolation; `None` outside its range.
fn interpolate(pts: &[(f64, f64)], x: f64) -> Option<f64> {
    let first = pts.first()?;
    let last = pts.last()?;
    if x < first.0 || x > last.0 {
        return None;
    }
    for w in pts.windows(2) {
        let ((x0, y0), (x1, y1)) = (w[0], w[1]);
        if x >= x0 && x <= x1 {
            return Some(if x1 > x0 {
                y0 + (y1 - y0) * (x - x0) / (x1 - x0)
            } else {
                y0.min(y1)
            });
        }
    }
    Some(last.1)
}

/// A duration from the trace's start, in seconds ("36h", "2d", "90m", "5400").
fn duration_secs(s: &str) -> Result<f64, String> {
    shoal_proxy::config::parse_duration(s).map(|d| d.as_secs_f64())
}
