//! The predictive policy: forecast demand, launch capacity one startup time ahead.
//!
//! Each evaluation feeds total demand into per-minute history buckets keyed by
//! wall-clock time, so the history can be exported ([`PredictivePolicy::history`]),
//! persisted and imported ([`PredictivePolicy::with_history`]) across restarts.
//! Once `min_history_secs` (24 h) of history exist, a [`SeasonalModel`] is fit
//! (MSTL seasonality + SES level, see [`forecast`]) and refit every `refit_secs`.
//! The policy then asks for
//!
//! `need = ceil(max over [now, now + startup + interval] of upper(b) / capacity)`
//!
//! where `upper(b)` is the point forecast plus the `q` quantile of the model's own
//! recent out-of-sample errors at the startup horizon, taken in its
//! variance-stabilized space and by forecast level: headroom comes from measured
//! uncertainty rather than a fixed target. The floor under it is square-root
//! staffing on the point forecast ([`staffing`]): relatively more headroom for
//! small fleets, where one minute's noise is a large share of capacity, and less
//! for large ones, where a fixed target utilization wastes most. Short bursts far
//! above the forecast that come in clusters hold capacity for the highest demand
//! seen ([`Bursts`]). Scale-down follows the forecast, held for
//! `scale_down_delay_secs` (ski rental: relaunching would cost a startup time).
//! The reactive policy runs underneath at full utilization as a safety net, and
//! the larger answer wins, so surprises are still handled.
//!
//! **Budget**: the reactive policy also runs in shadow on a virtual fleet of its
//! own; `q` and the staffing headroom adapt slowly so that this policy spends at
//! most `budget` × the instance-time reactive would (over four weeks, so savings on
//! large fleets pay for headroom on small ones), and puts that capacity where the
//! forecast is least certain. (With a fixed `q`, a trace with little noise would be
//! over-provisioned and a noisy one under-provisioned relative to reactive.)
//!
//! **Guard**: the shadow fleet also scores the objective itself. While this policy
//! has had more violation time (demand over ready capacity) than the shadow reactive
//! fleet over the last week (exponentially weighted), surprises the forecast cannot
//! see are beating it: the safety net then scales up at the reactive policy's own
//! targets (without the forecast floor), and the forecast only adds launches ahead
//! of time and leads scale-down.
//!
//! Falls back to reactive alone before enough history, and whenever the model's
//! error over the last 6 h is worse than `max_error_ratio` × a persistence
//! forecast's (e.g. after an outage). `ForecastOnly` mode reports the forecast but
//! lets reactive act.

use std::collections::VecDeque;

use serde::{Deserialize, Serialize};

use crate::forecast::{self, FitOptions, SeasonalModel, Seasonality, Transform};
use crate::reactive::{apply_bounds, direction, ReactiveConfig, ReactivePolicy};
use crate::{Decision, Error, Observation, Policy, PolicyParams, Reason};

/// Time constant of the violation comparison with the shadow reactive fleet.
const GUARD_WINDOW_SECS: f64 = 7.0 * 86_400.0;

/// The forecast may spend at most this multiple of the instance-time the reactive
/// policy spends in shadow (exponentially weighted over `budget_window_secs`, every
/// evaluation counted); past it, reactive decides until the ratio has been back under it
/// for [`HANDOVER_HOLD_SECS`] (it decays towards 1 meanwhile, so the cap must sit above 1).
const COST_CAP: f64 = 1.01;

/// The cost guard binds once the forecast has been priced against the shadow this
/// long: less says nothing about instance-hours.
const MIN_GUARD_EVIDENCE_SECS: f64 = 3600.0;

/// Hysteresis of the cost guard: once it has handed over to reactive, the forecast takes
/// back only when every evaluation for this long has found it within [`COST_CAP`] (and
/// its extra capacity worth its cost).
///
/// A hold in time rather than a lower threshold on the spend ratio: the ratio is a
/// four-week average, and while reactive decides the own spend is about the shadow's, so
/// it only drifts back towards 1, its excess shrinking by about interval / four weeks
/// per evaluation. A take-back threshold under 1 (0.99) would never be reached, one just
/// under the cap (1.005) only after about three weeks; with none, one evaluation's spend
/// moves the ratio across the cap and the next back, and the decision flips with it
/// (each flip to the forecast a launch the next decision cancels). An hour bounds that to
/// one hand-over an hour and keeps the forecast out for at most an hour after its last
/// breach, while the cap still holds the four-week spend.
const HANDOVER_HOLD_SECS: f64 = 3600.0;

/// The cost guard's hand-over to reactive, held for [`HANDOVER_HOLD_SECS`].
#[derive(Debug, Clone, Copy, Default)]
struct Handover {
    /// Why reactive decides, while it does.
    why: Option<&'static str>,
    /// The last evaluation that found the forecast over its budget.
    last_over: f64,
}

impl Handover {
    /// The hand-over after an evaluation at `now` whose checks found `over`.
    fn update(&mut self, now: f64, over: Option<&'static str>) -> Option<&'static str> {
        if let Some(why) = over {
            *self = Handover {
                why: Some(why),
                last_over: now,
            };
        } else if now - self.last_over >= HANDOVER_HOLD_SECS {
            self.why = None;
        }
        self.why
    }
}

/// Time constant of the forecast-skill averages, seconds.
const SKILL_WINDOW_SECS: f64 = 6.0 * 3600.0;

/// Forecast skill against persistence at one horizon: forecasts made `horizon` buckets
/// ahead are scored when their bucket closes, against the last value known when they
/// were made.
#[derive(Debug, Clone)]
struct Skill {
    horizon: i64,
    /// (bucket, forecast, persistence), oldest first.
    pending: VecDeque<(i64, f64, f64)>,
    /// Exponentially weighted absolute errors: (model, persistence).
    error: (f64, f64),
}

impl Skill {
    /// 1 − model error / persistence error: above 0, the forecast beats persistence.
    fn skill(&self) -> Option<f64> {
        (self.error.1 > 0.0).then(|| 1.0 - self.error.0 / self.error.1)
    }
}

/// Time scale of the budget controller, seconds.
const BUDGET_GAIN_SECS: f64 = 6.0 * 3600.0;

/// Bounds of the budget's multiplier on the staffing headroom.
const STAFFING_RANGE: (f64, f64) = (0.25, 1.5);

/// Demand over this multiple of the forecast's upper bound is a burst.
const BURST_FACTOR: f64 = 1.5;
/// A burst back under the upper bound within this fraction of the hold time is a
/// short one (5 min of an hour's hold)...
const BURST_SHORT: f64 = 1.0 / 12.0;
/// ...and a burst within this fraction of it after a short one starts a hold.
const BURST_CLUSTER: f64 = 0.5;

/// Square-root staffing on the forecast `point` (requests/s): a relative part for
/// the forecast's error, which grows with the level, and a part in √(level) for the
/// request noise, which dominates small fleets (the Halfin–Whitt rule). `headroom` is
/// the reactive target's (1/u − 1), so the two agree at about a hundred instances'
/// worth of demand; below it this buys more headroom than a fixed target, above it
/// less. `k` is the budget's multiplier.
fn staffing(point: f64, capacity_rps: f64, headroom: f64, k: f64) -> f64 {
    let point = point.max(0.0);
    point + k * headroom * (0.58 * point + 2.33 * (point * capacity_rps).sqrt())
}

/// Clusters of short bursts far above the forecast (e.g. crawlers, retries storms,
/// news links): one short burst predicts another soon after, while a long one (a flash
/// crowd) is the reactive safety net's to follow. After a short burst (back under the
/// upper bound within 1/12 of `burst_hold_secs`), a second burst within half of it
/// holds the highest demand seen as a capacity floor for `burst_hold_secs`.
#[derive(Debug, Clone, Default)]
struct Bursts {
    /// The burst under way: (start, highest demand).
    current: Option<(f64, f64)>,
    /// The last short burst: (end, highest demand).
    last_short: Option<(f64, f64)>,
    /// The floor in force: (until, requests/s).
    hold: Option<(f64, f64)>,
}

impl Bursts {
    /// Demand `d` at `now` against the forecast's upper bound `upper`. A burst must also
    /// exceed it by at least one instance's `capacity`: a few requests over a small bound
    /// (noise of a one-second sample at low rates) are no burst.
    fn observe(&mut self, now: f64, d: f64, upper: f64, capacity: f64, hold_secs: f64) {
        if d > BURST_FACTOR * upper && d - upper >= capacity {
            let held = self.floor(now).unwrap_or(0.0);
            let cur = self.current.get_or_insert((now, d));
            cur.1 = cur.1.max(d);
            let clustered = self
                .last_short
                .filter(|&(end, _)| hold_secs > 0.0 && end >= now - BURST_CLUSTER * hold_secs);
            if let Some((_, before)) = clustered {
                self.hold = Some((now + hold_secs, held.max(before).max(cur.1)));
            }
        } else if d <= upper {
            if let Some((start, high)) = self.current.take() {
                if now - start <= BURST_SHORT * hold_secs {
                    self.last_short = Some((now, high));
                }
            }
        }
    }

    /// The capacity floor (requests/s) at `now`, while a hold lasts.
    fn floor(&self, now: f64) -> Option<f64> {
        self.hold.filter(|&(until, _)| until > now).map(|h| h.1)
    }
}

/// Whether the forecast acts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum PredictiveMode {
    /// Forecast and report (in decisions and metrics); reactive decides.
    ForecastOnly,
    /// Forecast and scale on it (combined with reactive by maximum).
    ForecastAndScale,
}

/// Configuration of the predictive policy.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct PredictiveConfig {
    /// Report only, or act.
    pub mode: PredictiveMode,
    /// Requests/s one instance can serve at full utilization.
    pub capacity_rps: f64,
    /// Seconds from launch to ready: capacity is launched this far ahead.
    pub startup_secs: f64,
    /// Seconds between evaluations (the live autoscaler: 1; the simulator: 15).
    pub interval_secs: f64,
    /// Forecast horizon for reports ([`PredictivePolicy::forecast`]), seconds;
    /// clamped to [2 × startup, 48 h].
    pub horizon_secs: f64,
    /// History needed before the forecast acts, seconds (default 24 h).
    pub min_history_secs: f64,
    /// History bucket length, seconds.
    pub bucket_secs: f64,
    /// History kept (and exported), days.
    pub max_history_days: f64,
    /// Refit the seasonal model this often, seconds.
    pub refit_secs: f64,
    /// Coverage of the upper bound the capacity is sized for (e.g. 0.99: demand
    /// exceeds it in about 1% of minutes); the starting point when `budget` adapts
    /// it.
    pub quantile: f64,
    /// Seasonal periods (detected by default).
    pub seasonality: Seasonality,
    /// Length of the seasonal "day", seconds; `None`: 24 h. A compressed season
    /// (e.g. 600 for a 10-minute "day") must be a whole number of at least 4
    /// buckets; the model fit scales its day-based settings with it
    /// ([`FitOptions::for_season`]), and [`PredictiveConfig::with_season`] scales
    /// the history needed and the refit period too.
    pub season_secs: Option<f64>,
    /// Transform; `None` chooses by backtest at each refit.
    pub transform: Option<Transform>,
    /// Fall back to reactive when the model's error over the last 6 h exceeds this
    /// multiple of a persistence forecast's.
    pub max_error_ratio: f64,
    /// The reactive policy: it decides alone before enough history, when the
    /// forecast is poor and in forecast-only mode; its `min`, `max` and `schedule`
    /// bound every result.
    pub reactive: ReactiveConfig,
    /// While the forecast acts, the reactive policy still runs underneath as a
    /// safety net, with its targets multiplied by this factor (default
    /// 1 / target utilization: it acts when demand exceeds capacity)...
    pub safety_target_scale: f64,
    /// ...and this (short) scale-down stabilization, seconds: the forecast decides
    /// scale-down.
    pub safety_stabilization_secs: f64,
    /// A scale-down on the forecast waits this long (the highest count wanted in
    /// the window is kept), seconds; default: the larger of the startup time and
    /// 300 s.
    pub scale_down_delay_secs: f64,
    /// The forecast capacity is at least the point forecast at this utilization
    /// (target tracking on the forecast); the quantile headroom adds to it where
    /// the forecast is uncertain. `None`: quantile headroom only.
    pub target_utilization: Option<f64>,
    /// Spend at most this fraction of the instance-time the reactive policy would
    /// (it runs in shadow; exponentially weighted over `budget_window_secs`): the
    /// quantile adapts within [0.9, 0.999] to put that budget where the forecast is
    /// least certain. `None`: the fixed `quantile`.
    pub budget: Option<f64>,
    /// Time constant of the budget's spending average, seconds.
    pub budget_window_secs: f64,
    /// After a short burst far above the forecast (see [`Bursts`]), a second one within
    /// half an hour holds capacity for the highest demand seen for this long, seconds;
    /// 0 turns it off. Bursts the seasonality cannot see come in clusters.
    pub burst_hold_secs: f64,
}

impl Default for PredictiveConfig {
    fn default() -> Self {
        Self::for_params(&PolicyParams::default(), PredictiveMode::ForecastAndScale)
    }
}

impl PredictiveConfig {
    /// Defaults for a fleet described by `params`.
    pub fn for_params(params: &PolicyParams, mode: PredictiveMode) -> Self {
        let reactive = ReactiveConfig::for_rps(params);
        Self {
            mode,
            capacity_rps: params.capacity_rps,
            startup_secs: params.startup_secs,
            interval_secs: params.interval_secs,
            horizon_secs: 48.0 * 3600.0,
            min_history_secs: 86_400.0,
            bucket_secs: 60.0,
            max_history_days: 28.0,
            refit_secs: 6.0 * 3600.0,
            quantile: 0.99,
            seasonality: Seasonality::Auto,
            season_secs: None,
            transform: None,
            max_error_ratio: 1.3,
            reactive,
            safety_target_scale: 1.0 / params.target_utilization,
            safety_stabilization_secs: 0.0,
            scale_down_delay_secs: params.startup_secs.max(300.0),
            target_utilization: Some(params.target_utilization),
            budget: Some(0.99),
            burst_hold_secs: 3600.0,
            budget_window_secs: 28.0 * 86_400.0,
        }
    }

    /// A compressed season of `season_secs`: sets [`Self::season_secs`] and scales
    /// what the defaults tie to a day: one season of history before the forecast
    /// acts, and a refit every quarter season (6 h of a day).
    pub fn with_season(mut self, season_secs: f64) -> Self {
        self.season_secs = Some(season_secs);
        self.min_history_secs = season_secs;
        self.refit_secs = season_secs / 4.0;
        self.burst_hold_secs = season_secs / 24.0;
        self
    }

    /// Check ranges; errors name the field.
    pub fn validate(&self) -> Result<(), Error> {
        let check = |ok: bool, field: &'static str, message: &str| {
            if ok {
                Ok(())
            } else {
                Err(Error::Invalid {
                    field,
                    message: message.to_string(),
                })
            }
        };
        check(self.capacity_rps > 0.0, "capacity_rps", "must be > 0")?;
        check(self.startup_secs >= 0.0, "startup_secs", "must be ≥ 0")?;
        check(self.interval_secs > 0.0, "interval_secs", "must be > 0")?;
        check(self.bucket_secs >= 1.0, "bucket_secs", "must be ≥ 1")?;
        check(self.refit_secs > 0.0, "refit_secs", "must be > 0")?;
        if let Some(season) = self.season_secs {
            let buckets = season / self.bucket_secs;
            check(
                season.is_finite() && buckets >= 4.0 - 1e-9,
                "season_secs",
                "must span at least 4 history buckets",
            )?;
            check(
                (buckets - buckets.round()).abs() < 1e-6,
                "season_secs",
                "must be a whole number of history buckets",
            )?;
        }
        check(
            self.quantile > 0.5 && self.quantile < 1.0,
            "quantile",
            "must be in (0.5, 1)",
        )?;
        check(
            self.min_history_secs >= 0.0,
            "min_history_secs",
            "must be ≥ 0",
        )?;
        check(
            self.max_history_days * 86_400.0 >= self.min_history_secs,
            "max_history_days",
            "must hold at least min_history_secs",
        )?;
        check(
            self.safety_target_scale > 0.0,
            "safety_target_scale",
            "must be > 0",
        )?;
        check(
            self.burst_hold_secs >= 0.0 && self.burst_hold_secs.is_finite(),
            "burst_hold_secs",
            "must be ≥ 0",
        )?;
        check(
            self.safety_stabilization_secs >= 0.0,
            "safety_stabilization_secs",
            "must be ≥ 0",
        )?;
        self.reactive.validate()
    }
}

/// Exportable demand history: mean requests/s per wall-clock bucket.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct History {
    /// Bucket length, seconds.
    pub bucket_secs: f64,
    /// Index of the first bucket: its start is `start_bucket × bucket_secs` seconds
    /// since the Unix epoch.
    pub start_bucket: i64,
    /// Mean demand per bucket; `None` where nothing was observed.
    pub values: Vec<Option<f32>>,
    /// Mean CPU of the ready instances per bucket, in instance allotments (1.0 = one
    /// instance's whole allotment), where recorded: what estimates an instance's capacity.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub busy: Vec<Option<f32>>,
}

impl History {
    /// The history as a trace: one row per bucket, `t` from the first bucket; buckets
    /// with nothing observed are left out (the previous row's demand carries on).
    pub fn to_trace(&self, name: &str) -> Result<crate::trace::Trace, String> {
        let mut text = String::from("t,rps\n");
        for (i, v) in self.values.iter().enumerate() {
            if let Some(v) = v {
                text.push_str(&format!("{},{}\n", i as f64 * self.bucket_secs, v));
            }
        }
        crate::trace::parse_csv(&text, name).map_err(|e| e.to_string())
    }

    /// Wall-clock seconds since the Unix epoch of the first bucket.
    pub fn start_epoch_secs(&self) -> f64 {
        self.start_bucket as f64 * self.bucket_secs
    }

    /// Requests/s one instance serves at its whole allotment, from the buckets with both
    /// demand and CPU recorded (total requests over total CPU); `None` without such buckets.
    pub fn capacity_estimate(&self) -> Option<f64> {
        let (mut rps, mut busy) = (0.0, 0.0);
        for (v, b) in self.values.iter().zip(&self.busy) {
            // Idle buckets measure the instances' own background CPU, not requests.
            if let (Some(v), Some(b)) = (v, b) {
                if *b >= 0.05 && *v > 0.0 {
                    rps += f64::from(*v);
                    busy += f64::from(*b);
                }
            }
        }
        (busy > 0.0).then(|| rps / busy)
    }
}

/// Records demand (and CPU) per wall-clock bucket for a fleet whose policy keeps no
/// history of its own, so every fleet's traffic can be exported and tuned on.
#[derive(Debug, Clone)]
pub struct DemandRecorder {
    history: History,
    max_buckets: usize,
    /// The open bucket: (index, demand sum, demand samples, busy sum, busy samples).
    open: Option<(i64, f64, u32, f64, u32)>,
}

impl DemandRecorder {
    /// A recorder of `bucket_secs` buckets keeping `max_days`, continuing `saved` when
    /// its bucket length matches.
    pub fn new(bucket_secs: f64, max_days: f64, saved: Option<History>) -> Self {
        let history = saved
            .filter(|h| (h.bucket_secs - bucket_secs).abs() < 1e-9)
            .unwrap_or(History {
                bucket_secs,
                start_bucket: 0,
                values: Vec::new(),
                busy: Vec::new(),
            });
        DemandRecorder {
            history,
            max_buckets: ((max_days * 86_400.0 / bucket_secs) as usize).max(1),
            open: None,
        }
    }

    /// One observation at `wall_epoch_secs`: demand requests/s and, if known, the CPU of
    /// the ready instances in allotments.
    pub fn record(&mut self, wall_epoch_secs: f64, demand_rps: f64, busy: Option<f64>) {
        let b = (wall_epoch_secs / self.history.bucket_secs).floor() as i64;
        match &mut self.open {
            Some(o) if o.0 == b => {
                o.1 += demand_rps;
                o.2 += 1;
                if let Some(x) = busy {
                    o.3 += x;
                    o.4 += 1;
                }
            }
            Some(o) if o.0 > b => {} // the clock went back: drop the sample
            _ => {
                self.close();
                let (bs, bn) = busy.map_or((0.0, 0), |x| (x, 1));
                self.open = Some((b, demand_rps, 1, bs, bn));
            }
        }
    }

    fn close(&mut self) {
        let Some((b, sum, n, bsum, bn)) = self.open.take() else {
            return;
        };
        let h = &mut self.history;
        if h.values.is_empty() {
            h.start_bucket = b;
        }
        let end = h.start_bucket + h.values.len() as i64;
        if b < end {
            return;
        }
        // Buckets skipped (shoal not running) stay unobserved.
        for _ in end..b {
            h.values.push(None);
            h.busy.push(None);
        }
        h.values.push(Some((sum / f64::from(n)) as f32));
        h.busy.push((bn > 0).then(|| (bsum / f64::from(bn)) as f32));
        h.busy.resize(h.values.len(), None);
        let over = h.values.len().saturating_sub(self.max_buckets);
        if over > 0 {
            h.values.drain(..over);
            h.busy.drain(..over.min(h.busy.len()));
            h.start_bucket += over as i64;
        }
    }

    /// The closed buckets (the open one is included once `now_epoch_secs` has left it).
    pub fn history(&mut self, now_epoch_secs: f64) -> History {
        let b = (now_epoch_secs / self.history.bucket_secs).floor() as i64;
        if self.open.is_some_and(|o| o.0 < b) {
            self.close();
        }
        self.history.clone()
    }

    /// Everything recorded, the open bucket included (at exit).
    pub fn finish(&mut self) -> History {
        self.close();
        self.history.clone()
    }
}

/// One point of [`PredictivePolicy::forecast`].
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct ForecastPoint {
    /// Bucket start, seconds since the Unix epoch.
    pub epoch_secs: f64,
    /// Point forecast, requests/s.
    pub rps: f64,
    /// Upper bound at the configured quantile, requests/s.
    pub upper_rps: f64,
}

/// The predictive policy: see the module docs.
#[derive(Debug, Clone)]
pub struct PredictivePolicy {
    name: String,
    config: PredictiveConfig,
    reactive: ReactivePolicy,
    safety: ReactivePolicy,
    /// The reactive policy on a virtual fleet of its own, to price the budget.
    shadow: ReactivePolicy,
    shadow_fleet: VirtualFleet,
    start_bucket: i64,
    values: VecDeque<Option<f64>>,
    /// The bucket being filled: (index, sum, count).
    open: Option<(i64, f64, u32)>,
    model: Option<SeasonalModel>,
    last_fit_bucket: i64,
    /// Forecasts awaiting their bucket: (bucket, point forecast).
    pending: VecDeque<(i64, f64)>,
    /// Skill against persistence one bucket, the startup horizon and twice it ahead.
    skills: Vec<Skill>,
    /// Out-of-sample (forecast, actual, persistence) at the horizon, most recent last.
    errors: VecDeque<(f64, f64, f64)>,
    /// Headroom by forecast level: (level rps, residual quantile), by level.
    headroom: Headroom,
    /// The quantile in force (adapted to the budget when one is set).
    quantile: f64,
    /// Exponentially weighted instance-seconds: (own, reactive's), while the
    /// forecast acts.
    spend: (f64, f64),
    /// Exponentially weighted violation seconds (demand over ready capacity):
    /// (own, the shadow reactive fleet's), while the forecast acts.
    violation: (f64, f64),
    /// Ready capacity (own, shadow's) at the previous evaluation: the demand of the
    /// next observation is measured against it.
    last_capacity: Option<(f64, f64)>,
    /// Exponentially weighted instance-seconds (own, shadow's) over `budget_window_secs`,
    /// every evaluation counted (burst holds and hand-overs too): the cost guard.
    cost: (f64, f64),
    /// Over the last day (exponentially weighted): (own instance-seconds, shadow's,
    /// own violation seconds, shadow's): what the forecast's extra capacity bought.
    benefit: [f64; 4],
    /// Whether the last evaluation handed over to reactive, and why.
    handover: Handover,
    /// Seconds the forecast has acted or been handed over (priced against the shadow).
    priced_secs: f64,
    /// The safety net at the reactive policy's own targets, in force while the
    /// forecast has cost more violation time than reactive would have had.
    guard: ReactivePolicy,
    last_now: Option<f64>,
    /// (time, combined recommendation) within `scale_down_delay_secs`.
    recent: VecDeque<(f64, u32)>,
    poor: bool,
    last_wall: Option<f64>,
    /// Fits run elsewhere (see [`PredictivePolicy::take_fit_job`]) rather than inline.
    deferred_fits: bool,
    fit_job: Option<FitJob>,
    /// Clusters of short bursts the forecast did not see.
    bursts: Bursts,
    /// Multiplier of the square-root staffing headroom, adapted to the budget.
    staffing: f64,
}

/// A model fit to run off the decision path (the live autoscaler runs it on a blocking
/// thread); [`PredictivePolicy::install_fit`] takes its result.
#[derive(Debug, Clone)]
pub struct FitJob {
    values: Vec<Option<f64>>,
    start_bucket: i64,
    opts: FitOptions,
}

/// The outcome of a [`FitJob`].
#[derive(Debug, Clone)]
pub struct FitResult(Option<SeasonalModel>);

impl FitJob {
    /// The fit itself (MSTL over up to the whole history: CPU-heavy).
    pub fn run(self) -> FitResult {
        FitResult(forecast::fit(&self.values, self.start_bucket, &self.opts))
    }
}

impl PredictivePolicy {
    /// A policy with empty history.
    pub fn new(name: &str, config: PredictiveConfig) -> Result<Self, Error> {
        config.validate()?;
        let reactive = ReactivePolicy::new(name, config.reactive.clone())?;
        let mut safety_config = config.reactive.clone();
        for t in &mut safety_config.targets {
            t.target *= config.safety_target_scale;
        }
        safety_config.scale_down_stabilization_secs = config.safety_stabilization_secs;
        let safety = ReactivePolicy::new(name, safety_config)?;
        let mut guard_config = config.reactive.clone();
        guard_config.scale_down_stabilization_secs = config.safety_stabilization_secs;
        let guard = ReactivePolicy::new(name, guard_config)?;
        let quantile = config.quantile;
        let shadow = ReactivePolicy::new(name, config.reactive.clone())?;
        Ok(Self {
            shadow,
            shadow_fleet: VirtualFleet::default(),
            safety,
            name: name.to_string(),
            config,
            reactive,
            start_bucket: 0,
            values: VecDeque::new(),
            open: None,
            model: None,
            last_fit_bucket: i64::MIN,
            pending: VecDeque::new(),
            skills: Vec::new(),
            errors: VecDeque::new(),
            headroom: Headroom::default(),
            quantile,
            spend: (0.0, 0.0),
            violation: (0.0, 0.0),
            cost: (0.0, 0.0),
            benefit: [0.0; 4],
            handover: Handover::default(),
            priced_secs: 0.0,
            last_capacity: None,
            guard,
            last_now: None,
            recent: VecDeque::new(),
            poor: false,
            last_wall: None,
            deferred_fits: false,
            fit_job: None,
            bursts: Bursts::default(),
            staffing: 1.0,
        })
    }

    /// A policy that starts from an exported [`History`] (e.g. after a restart).
    pub fn with_history(
        name: &str,
        config: PredictiveConfig,
        history: &History,
    ) -> Result<Self, Error> {
        if (history.bucket_secs - config.bucket_secs).abs() > 1e-9 {
            return Err(Error::Invalid {
                field: "history",
                message: format!(
                    "bucket of {} s, the config uses {} s",
                    history.bucket_secs, config.bucket_secs
                ),
            });
        }
        let mut p = Self::new(name, config)?;
        p.start_bucket = history.start_bucket;
        p.values = history.values.iter().map(|v| v.map(f64::from)).collect();
        p.trim();
        Ok(p)
    }

    /// The demand history, for persistence (the open bucket is not included).
    pub fn history(&self) -> History {
        History {
            bucket_secs: self.config.bucket_secs,
            start_bucket: self.start_bucket,
            values: self.values.iter().map(|v| v.map(|x| x as f32)).collect(),
            busy: Vec::new(),
        }
    }

    /// The configuration in force.
    pub fn config(&self) -> &PredictiveConfig {
        &self.config
    }

    /// What the current model chose, if one is fit.
    pub fn model_summary(&self) -> Option<&forecast::FitSummary> {
        self.model.as_ref().map(|m| m.summary())
    }

    /// Own instance-time over the reactive policy's (shadow), exponentially
    /// weighted; `None` before the forecast acts or without a budget.
    pub fn spend_ratio(&self) -> Option<f64> {
        (self.spend.1 > 0.0).then(|| self.spend.0 / self.spend.1)
    }

    /// Why reactive decides now instead of the forecast, if it does: the forecast has
    /// spent more than [`COST_CAP`] × the shadow reactive fleet's instance-time, or over
    /// the last day its extra instance-time bought no less violation time, at an
    /// evaluation within the last [`HANDOVER_HOLD_SECS`].
    pub fn handed_over(&self) -> Option<&'static str> {
        self.handover.why
    }

    /// The time constant of the trailing comparison of what the forecast bought (extra
    /// instance-time against the shadow that did not lower violation time): a season (a
    /// day, unless compressed), at least [`MIN_GUARD_EVIDENCE_SECS`].
    fn guard_evidence_secs(&self) -> f64 {
        self.config
            .season_secs
            .unwrap_or(86_400.0)
            .max(MIN_GUARD_EVIDENCE_SECS)
    }

    fn cost_check(&self) -> Option<&'static str> {
        let [own, shadow, own_v, shadow_v] = self.benefit;
        if self.priced_secs < MIN_GUARD_EVIDENCE_SECS {
            return None;
        }
        if self.cost.1 > 0.0 && self.cost.0 > COST_CAP * self.cost.1 {
            Some("over its instance-time budget")
        } else if shadow > 0.0 && own > COST_CAP * shadow && shadow_v > 0.0 && own_v >= shadow_v {
            // (Without a violation on either side the day says nothing of what the extra
            // capacity insures against: the cost cap alone judges it.)
            Some("its extra capacity bought no fewer violations")
        } else {
            None
        }
    }

    /// Forecast skill against persistence by horizon (seconds ahead, 1 − model error /
    /// persistence error over the last 6 h, exponentially weighted): one bucket, the
    /// startup horizon and twice it. `None` where nothing is scored yet.
    pub fn skill_by_horizon(&self) -> Vec<(f64, Option<f64>)> {
        self.skills
            .iter()
            .map(|s| (s.horizon as f64 * self.config.bucket_secs, s.skill()))
            .collect()
    }

    /// "; skill vs persistence 60s 0.12, 180s 0.31, ..." for a decision's detail.
    fn skill_note(&self) -> String {
        let parts: Vec<String> = self
            .skill_by_horizon()
            .into_iter()
            .filter_map(|(h, s)| s.map(|s| format!("{h:.0}s {s:.2}")))
            .collect();
        if parts.is_empty() {
            String::new()
        } else {
            format!("; skill vs persistence {}", parts.join(", "))
        }
    }

    /// Own instance-time over the shadow reactive fleet's, every evaluation counted.
    pub fn cost_ratio(&self) -> Option<f64> {
        (self.cost.1 > 0.0).then(|| self.cost.0 / self.cost.1)
    }

    /// Whether the guard is in force: this policy has had more violation time than
    /// the reactive policy in shadow over the last week.
    pub fn guarded(&self) -> bool {
        self.violation.0 > self.violation.1
    }

    /// The quantile the capacity is sized for now (equal to the configured one
    /// unless a budget adapts it).
    pub fn quantile(&self) -> f64 {
        self.quantile
    }

    /// Seconds of history held.
    pub fn history_secs(&self) -> f64 {
        self.values.len() as f64 * self.config.bucket_secs
    }

    fn bucket_of(&self, wall: f64) -> i64 {
        (wall / self.config.bucket_secs).floor() as i64
    }

    fn horizon_buckets(&self) -> i64 {
        ((self.config.startup_secs + self.config.interval_secs) / self.config.bucket_secs).ceil()
            as i64
    }

    fn trim(&mut self) {
        let keep = (self.config.max_history_days * 86_400.0 / self.config.bucket_secs) as usize;
        while self.values.len() > keep.max(1) {
            self.values.pop_front();
            self.start_bucket += 1;
        }
    }

    fn end_bucket(&self) -> i64 {
        self.start_bucket + self.values.len() as i64
    }

    /// Close bucket `b` with value `v` (and any skipped buckets as missing).
    fn close_bucket(&mut self, b: i64, v: Option<f64>) {
        if self.values.is_empty() {
            self.start_bucket = b;
        }
        let h = self.horizon_buckets();
        while self.end_bucket() < b {
            let gap = self.end_bucket();
            self.values.push_back(None);
            if let Some(m) = self.model.as_mut() {
                m.update(gap, None);
            }
        }
        if self.end_bucket() > b {
            return; // clock went backwards: ignore
        }
        self.values.push_back(v);
        // Score the forecast made h buckets ago for this bucket.
        while self.pending.front().is_some_and(|&(t, _)| t < b) {
            self.pending.pop_front();
        }
        if let (Some(&(t, f)), Some(actual)) = (self.pending.front(), v) {
            if t == b {
                let persist = self
                    .values
                    .get((b - h - self.start_bucket).max(0) as usize)
                    .copied()
                    .flatten()
                    .unwrap_or(actual);
                self.errors.push_back((f, actual, persist));
                let keep = (7.0 * 86_400.0 / self.config.bucket_secs) as usize;
                while self.errors.len() > keep {
                    self.errors.pop_front();
                }
            }
        }
        if self.skills.is_empty() {
            let mut hs = vec![1, h.max(1), 2 * h.max(1)];
            hs.dedup();
            self.skills = hs
                .into_iter()
                .map(|horizon| Skill {
                    horizon,
                    pending: VecDeque::new(),
                    error: (0.0, 0.0),
                })
                .collect();
        }
        let decay = (-self.config.bucket_secs / SKILL_WINDOW_SECS).exp();
        for sk in &mut self.skills {
            while sk.pending.front().is_some_and(|p| p.0 < b) {
                sk.pending.pop_front();
            }
            if let (Some(&(t, f, p)), Some(actual)) = (sk.pending.front(), v) {
                if t == b {
                    sk.error.0 = sk.error.0 * decay + (actual - f).abs();
                    sk.error.1 = sk.error.1 * decay + (actual - p).abs();
                }
            }
        }
        if let Some(m) = self.model.as_mut() {
            m.update(b, v);
            self.pending.push_back((b + h, m.point(b + h)));
            if let Some(now) = v {
                for sk in &mut self.skills {
                    sk.pending
                        .push_back((b + sk.horizon, m.point(b + sk.horizon), now));
                }
            }
        }
        self.trim();
        self.check_quality();
    }

    /// Compare the model with persistence over the last 6 h of scored forecasts.
    fn check_quality(&mut self) {
        let window = (6.0 * 3600.0 / self.config.bucket_secs) as usize;
        let recent = self.errors.iter().rev().take(window);
        let (mut model, mut naive, mut n) = (0.0, 0.0, 0usize);
        for &(f, a, p) in recent {
            model += (a - f).abs();
            naive += (a - p).abs();
            n += 1;
        }
        self.poor = n >= window / 4 && model > self.config.max_error_ratio * naive;
    }

    /// From now on `evaluate` does not fit inline: a due fit waits in
    /// [`take_fit_job`](Self::take_fit_job) and the current model stays in force until
    /// [`install_fit`](Self::install_fit) swaps the new one in.
    pub fn set_deferred_fits(&mut self, on: bool) {
        self.deferred_fits = on;
    }

    /// The fit that became due at the last evaluation, if any.
    pub fn take_fit_job(&mut self) -> Option<FitJob> {
        self.fit_job.take()
    }

    fn refit(&mut self, now_bucket: i64) {
        let job = self.make_fit_job(now_bucket);
        if self.deferred_fits {
            self.fit_job = Some(job);
        } else {
            self.install_fit(job.run());
        }
    }

    fn make_fit_job(&mut self, now_bucket: i64) -> FitJob {
        let values: Vec<Option<f64>> = self.values.iter().copied().collect();
        let base = match self.config.season_secs {
            Some(season) => FitOptions::for_season(self.config.bucket_secs, season),
            None => FitOptions {
                bucket_secs: self.config.bucket_secs,
                ..FitOptions::default()
            },
        };
        let opts = FitOptions {
            seasonality: self.config.seasonality,
            transform: self.config.transform,
            horizon_buckets: self.horizon_buckets() as usize,
            quantile: self.config.quantile,
            ..base
        };
        self.last_fit_bucket = now_bucket;
        FitJob {
            values,
            start_bucket: self.start_bucket,
            opts,
        }
    }

    /// Swaps in a finished fit (a failed one keeps the current model).
    pub fn install_fit(&mut self, result: FitResult) {
        let Some(model) = result.0 else {
            return;
        };
        // Headroom: quantiles of live out-of-sample errors once a day of them
        // exists (in-sample before), by forecast level.
        let day = (86_400.0 / self.config.bucket_secs) as usize;
        let pairs: Vec<(f64, f64)> = if self.errors.len() >= day {
            self.errors
                .iter()
                .map(|&(f, a, _)| (f, model.residual(f, a)))
                .collect()
        } else {
            model.in_sample_residuals().to_vec()
        };
        self.headroom = Headroom::new(pairs);
        self.model = Some(model);
    }

    /// Add the observation's demand (which covers the time since the previous
    /// evaluation) to its bucket; close a bucket as soon as its end is observed.
    fn ingest(&mut self, obs: &Observation) -> i64 {
        let wall = obs.wall_epoch_secs;
        let since = self
            .last_wall
            .filter(|&w| w < wall && wall - w <= 4.0 * self.config.interval_secs)
            .unwrap_or(wall - self.config.interval_secs);
        self.last_wall = Some(wall);
        let b = self.bucket_of((since + wall) / 2.0);
        if let Some((ob, sum, count)) = self.open {
            if ob != b {
                self.open = None;
                self.close_bucket(ob, (count > 0).then(|| sum / f64::from(count)));
            }
        }
        let open = self.open.get_or_insert((b, 0.0, 0));
        if let Some(d) = obs.demand_rps.filter(|d| d.is_finite() && *d >= 0.0) {
            open.1 += d;
            open.2 += 1;
        }
        if wall >= (b + 1) as f64 * self.config.bucket_secs - 1e-6 {
            if let Some((ob, sum, count)) = self.open.take() {
                self.close_bucket(ob, (count > 0).then(|| sum / f64::from(count)));
            }
        }
        self.bucket_of(wall)
    }

    /// Adapt the quantile so that the own spend tracks `budget` × the reactive
    /// policy's (in shadow): overspending lowers the quantile, underspending raises it.
    fn track_budget(&mut self, obs: &Observation, dt: f64, own: u32) {
        let Some(budget) = self.config.budget else {
            return;
        };
        let reactive = self
            .shadow_fleet
            .step(obs, &mut self.shadow, self.config.startup_secs);
        // Score both fleets on the objective itself: did the demand since the
        // previous evaluation exceed the capacity each had ready then?
        let cap = self.config.capacity_rps;
        let (mut own_v, mut shadow_v) = (0.0, 0.0);
        if let (Some((own_cap, shadow_cap)), Some(d)) = (self.last_capacity, obs.demand_rps) {
            own_v = if d > own_cap { dt } else { 0.0 };
            shadow_v = if d > shadow_cap { dt } else { 0.0 };
            let decay = (-dt / GUARD_WINDOW_SECS).exp();
            self.violation.0 = self.violation.0 * decay + own_v;
            self.violation.1 = self.violation.1 * decay + shadow_v;
        }
        self.priced_secs += dt;
        let day = (-dt / self.guard_evidence_secs()).exp();
        let added = [
            f64::from(own) * dt,
            f64::from(reactive) * dt,
            own_v,
            shadow_v,
        ];
        for (x, add) in self.benefit.iter_mut().zip(added) {
            *x = *x * day + add;
        }
        let decay = (-dt / self.config.budget_window_secs).exp();
        self.cost.0 = self.cost.0 * decay + f64::from(own) * dt;
        self.cost.1 = self.cost.1 * decay + f64::from(reactive) * dt;
        self.last_capacity = Some((
            f64::from(obs.ready) * cap,
            f64::from(self.shadow_fleet.ready) * cap,
        ));
        // A burst hold is insurance bought on evidence, not drift of the forecast's
        // headroom: it is not charged to the budget, which would otherwise starve the
        // headroom for a day after it.
        if self.bursts.floor(obs.now_secs).is_some() {
            return;
        }
        let decay = (-dt / self.config.budget_window_secs).exp();
        self.spend.0 = self.spend.0 * decay + f64::from(own) * dt;
        self.spend.1 = self.spend.1 * decay + f64::from(reactive) * dt;
        if self.spend.1 <= 0.0 {
            return;
        }
        let ratio = self.spend.0 / self.spend.1;
        // The tail (1 − q) moves by e^(dt/6 h) per unit of relative error: slow
        // enough that q stays steady over a day.
        let tail = (1.0 - self.quantile) * ((ratio - budget) * dt / BUDGET_GAIN_SECS).exp();
        self.quantile = 1.0 - tail.clamp(0.001, 0.1);
        // The staffing headroom follows the same controller (it is most of the spend
        // wherever the forecast is good), but not under the guard, where the spend is
        // reactive's own.
        if self.guarded() {
            return;
        }
        self.staffing = (self.staffing * ((budget - ratio) * dt / BUDGET_GAIN_SECS).exp())
            .clamp(STAFFING_RANGE.0, STAFFING_RANGE.1);
    }

    /// The forecast from now (`wall_epoch_secs`) for the configured horizon, one
    /// point per bucket; empty before a model is fit.
    pub fn forecast(&self, wall_epoch_secs: f64) -> Vec<ForecastPoint> {
        let Some(m) = &self.model else {
            return Vec::new();
        };
        let horizon = self
            .config
            .horizon_secs
            .clamp(2.0 * self.config.startup_secs, 48.0 * 3600.0);
        let b0 = self.bucket_of(wall_epoch_secs);
        let n = (horizon / self.config.bucket_secs).ceil() as i64;
        (b0..=b0 + n)
            .map(|b| ForecastPoint {
                epoch_secs: b as f64 * self.config.bucket_secs,
                rps: m.point(b),
                upper_rps: m.upper(b, self.headroom.at(m.point(b), self.quantile)),
            })
            .collect()
    }
}

impl Policy for PredictivePolicy {
    fn name(&self) -> &str {
        &self.name
    }

    fn reacts_to_saturation(&self) -> bool {
        self.reactive.reacts_to_saturation()
    }

    fn evaluate(&mut self, obs: &Observation) -> Decision {
        let dt = self.last_now.map_or(0.0, |t| {
            (obs.now_secs - t).clamp(0.0, 4.0 * self.config.interval_secs)
        });
        self.last_now = Some(obs.now_secs);
        let now_bucket = self.ingest(obs);
        let refit_buckets = (self.config.refit_secs / self.config.bucket_secs).ceil() as i64;
        if self.history_secs() >= self.config.min_history_secs
            && now_bucket.saturating_sub(self.last_fit_bucket) >= refit_buckets
        {
            self.refit(now_bucket);
        }
        let mut reactive = self.reactive.evaluate(obs);
        reactive.policy = self.name.clone();
        let safety = self.safety.evaluate(obs);
        let guard = self.guard.evaluate(obs);
        // While the forecast has cost more violation time than the reactive policy
        // would have had (measured on the shadow fleet), surprises are beating it:
        // the safety net scales up at the reactive targets, and the forecast only
        // adds pre-launches and leads scale-downs.
        let guarded = self.guarded();
        let safety = if guarded { guard } else { safety };
        let Some(model) = &self.model else {
            reactive.detail = if self.config.season_secs.is_some() {
                format!(
                    "{}; forecast learning ({:.0} s of {:.0} s history)",
                    reactive.detail,
                    self.history_secs(),
                    self.config.min_history_secs
                )
            } else {
                format!(
                    "{}; forecast learning ({:.1} h of {:.1} h history)",
                    reactive.detail,
                    self.history_secs() / 3600.0,
                    self.config.min_history_secs / 3600.0
                )
            };
            return reactive;
        };
        let cfg = &self.config;
        let ahead = self.bucket_of(obs.wall_epoch_secs + cfg.startup_secs);
        reactive.forecast_rps = Some(model.point(ahead));
        let last = self.bucket_of(obs.wall_epoch_secs + cfg.startup_secs + cfg.interval_secs);
        let (mut peak, mut peak_b) = (0.0f64, now_bucket);
        for b in now_bucket..=last {
            let point = model.point(b);
            let fl = match cfg.target_utilization {
                Some(u) if !guarded => {
                    staffing(point, cfg.capacity_rps, 1.0 / u - 1.0, self.staffing)
                }
                _ => 0.0,
            };
            let u = model
                .upper(b, self.headroom.at(point, self.quantile))
                .max(fl);
            if u > peak {
                (peak, peak_b) = (u, b);
            }
        }
        if let Some(d) = obs.demand_rps {
            let up = model.upper(
                now_bucket,
                self.headroom.at(model.point(now_bucket), self.quantile),
            );
            self.bursts
                .observe(obs.now_secs, d, up, cfg.capacity_rps, cfg.burst_hold_secs);
        }
        if let Some(held) = self.bursts.floor(obs.now_secs) {
            if held > peak {
                (peak, peak_b) = (held, now_bucket);
            }
        }
        let need = (peak / cfg.capacity_rps - 1e-9).ceil().max(0.0) as u32;
        // The cost guard: reactive decides (and the shadow keeps pricing the forecast)
        // while the forecast is over its instance-time budget or its extra capacity
        // bought nothing, and for an hour after.
        let now = obs.now_secs;
        let handed = if cfg.mode == PredictiveMode::ForecastAndScale && !self.poor {
            self.handover.update(now, self.cost_check())
        } else {
            self.handover = Handover::default();
            None
        };
        if let Some(why) = handed {
            let until = self.handover.last_over + HANDOVER_HOLD_SECS;
            let held = if until > now && self.handover.last_over < now {
                format!(", held until {until:.0}s")
            } else {
                String::new()
            };
            reactive.detail = format!(
                "{}; cost guard, reactive decides: forecast {why}{held} (forecast needs {need})",
                reactive.detail
            );
            let desired = reactive.desired;
            self.track_budget(obs, dt, desired);
            return reactive;
        }
        if cfg.mode == PredictiveMode::ForecastOnly || self.poor {
            let why = if self.poor {
                "forecast poor, reactive decides"
            } else {
                "forecast only"
            };
            reactive.detail = format!(
                "{}; {why}: forecast {:.3} rps in {:.0}s would need {need}",
                reactive.detail,
                model.point(ahead),
                cfg.startup_secs
            );
            return reactive;
        }
        let current = obs.current_desired;
        let forecast_rps = reactive.forecast_rps;
        let reactive = safety;
        let (desired, reason, detail) = if need >= reactive.desired {
            let secs = (peak_b - now_bucket) as f64 * cfg.bucket_secs;
            let when = if cfg.season_secs.is_some() {
                format!("{secs:.0} s")
            } else {
                format!("{:.0} min", secs / 60.0)
            };
            (
                need,
                if need == current {
                    Reason::Steady
                } else {
                    Reason::Predictive
                },
                format!(
                    "forecast upper {peak:.3} rps (q{:.3}) in {when} -> {need}; reactive{} {}{}",
                    self.quantile,
                    if guarded { " (guard)" } else { "" },
                    reactive.desired,
                    self.skill_note()
                ),
            )
        } else {
            (
                reactive.desired,
                reactive.reason,
                format!("{}; forecast needs {need}", reactive.detail),
            )
        };
        // Ski rental: a surplus instance is kept for `scale_down_delay_secs` (a
        // startup time by default) before it goes, since relaunching it would cost
        // as much and take as long.
        let now = obs.now_secs;
        let delay = self.config.scale_down_delay_secs;
        while self.recent.front().is_some_and(|&(t, _)| t <= now - delay) {
            self.recent.pop_front();
        }
        self.recent.push_back((now, desired));
        let held = self
            .recent
            .iter()
            .map(|r| r.1)
            .max()
            .unwrap_or(desired)
            .min(current);
        let (desired, reason, detail) = if held > desired {
            (
                held,
                Reason::Stabilized,
                format!("{detail}; holding {held} for {delay:.0}s"),
            )
        } else {
            (desired, reason, detail)
        };
        let (desired, reason, detail) = apply_bounds(
            desired,
            reason,
            detail,
            self.reactive.bounds_at(obs.wall_epoch_secs),
        );
        self.track_budget(obs, dt, desired);
        Decision {
            policy: self.name.clone(),
            desired,
            direction: direction(desired, current),
            reason,
            detail,
            inputs: obs.clone(),
            forecast_rps,
        }
    }
}

/// Forecast-error quantiles by forecast level: the (level, residual) pairs are
/// split into equal-count bins by level and each bin keeps its sorted residuals,
/// so the bound follows the noise wherever it is level-dependent and any quantile
/// can be read at once.
#[derive(Debug, Clone, Default)]
struct Headroom {
    /// (median level, residuals sorted ascending), by level.
    bins: Vec<(f64, Vec<f64>)>,
}

impl Headroom {
    fn new(mut pairs: Vec<(f64, f64)>) -> Self {
        const PER_BIN: usize = 1500;
        const MAX_BINS: usize = 6;
        if pairs.is_empty() {
            return Self::default();
        }
        pairs.sort_by(|a, b| a.0.total_cmp(&b.0));
        let bins = (pairs.len() / PER_BIN).clamp(1, MAX_BINS);
        let size = pairs.len().div_ceil(bins);
        let bins = pairs
            .chunks(size)
            .map(|chunk| {
                let level = chunk[chunk.len() / 2].0;
                let mut r: Vec<f64> = chunk.iter().map(|p| p.1).collect();
                r.sort_by(f64::total_cmp);
                (level, r)
            })
            .collect();
        Self { bins }
    }

    fn bin_quantile(sorted: &[f64], q: f64) -> f64 {
        if sorted.is_empty() {
            return 0.0;
        }
        let k = ((q * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len()) - 1;
        sorted[k]
    }

    /// The `q` quantile of the residuals at forecast level `f` (linear between
    /// bin levels, flat outside).
    fn at(&self, f: f64, q: f64) -> f64 {
        let bins = &self.bins;
        match bins.len() {
            0 => 0.0,
            1 => Self::bin_quantile(&bins[0].1, q),
            n => {
                let i = bins.partition_point(|(level, _)| *level <= f);
                if i == 0 {
                    return Self::bin_quantile(&bins[0].1, q);
                }
                if i == n {
                    return Self::bin_quantile(&bins[n - 1].1, q);
                }
                let (x0, y0) = (bins[i - 1].0, Self::bin_quantile(&bins[i - 1].1, q));
                let (x1, y1) = (bins[i].0, Self::bin_quantile(&bins[i].1, q));
                if x1 > x0 {
                    y0 + (y1 - y0) * (f - x0) / (x1 - x0)
                } else {
                    y0.max(y1)
                }
            }
        }
    }
}

/// A model fleet run by the shadow reactive policy: what reactive alone would
/// have running, from the same demand (per-instance metrics rescaled to it).
#[derive(Debug, Clone, Default)]
struct VirtualFleet {
    ready: u32,
    /// (ready at, count), in launch order.
    starting: VecDeque<(f64, u32)>,
    started: bool,
}

impl VirtualFleet {
    /// Evaluate `policy` on this fleet for `obs`'s demand; returns the instances
    /// (starting + ready) it holds afterwards.
    fn step(&mut self, obs: &Observation, policy: &mut ReactivePolicy, startup: f64) -> u32 {
        let now = obs.now_secs;
        if !self.started {
            self.started = true;
            self.ready = obs.ready;
            if obs.starting > 0 {
                self.starting.push_back((now + startup, obs.starting));
            }
        }
        while self.starting.front().is_some_and(|&(at, _)| at <= now) {
            self.ready += self.starting.pop_front().map_or(0, |s| s.1);
        }
        let n_starting: u32 = self.starting.iter().map(|s| s.1).sum();
        let scale =
            (self.ready > 0 && obs.ready > 0).then(|| f64::from(obs.ready) / f64::from(self.ready));
        let mut view = obs.clone();
        view.ready = self.ready;
        view.starting = n_starting;
        view.current_desired = self.ready + n_starting;
        for m in &mut view.metrics {
            if m.kind != crate::MetricKind::LatencyP95 {
                m.stable = m.stable.and_then(|v| scale.map(|k| v * k));
                m.panic = m.panic.and_then(|v| scale.map(|k| v * k));
            }
        }
        // The work arriving is the same; whether it saturates depends on this fleet,
        // read as the estimator would read it.
        if let Some(s) = &mut view.saturation {
            s.saturated = crate::saturation::saturates(s, self.ready);
        }
        let desired = policy.evaluate(&view).desired;
        let current = self.ready + n_starting;
        if desired > current {
            self.starting.push_back((now + startup, desired - current));
        } else {
            let mut remove = current - desired;
            while remove > 0 {
                let Some(back) = self.starting.back_mut() else {
                    break;
                };
                let take = back.1.min(remove);
                back.1 -= take;
                remove -= take;
                if back.1 == 0 {
                    self.starting.pop_back();
                }
            }
            self.ready -= remove.min(self.ready);
        }
        desired
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Feeds one demand value per minute against a flat upper bound of 10.
    fn bursts_over(demand: &[f64]) -> Vec<Option<f64>> {
        let mut b = Bursts::default();
        demand
            .iter()
            .enumerate()
            .map(|(i, &d)| {
                let now = i as f64 * 60.0;
                b.observe(now, d, 10.0, 10.0, 3600.0);
                b.floor(now)
            })
            .collect()
    }

    #[test]
    fn a_second_short_burst_holds_the_highest_demand_for_the_hold_time() {
        // Short burst at minute 2 (2 min), back to normal, another at minute 10.
        let mut d = vec![8.0; 90];
        d[2] = 30.0;
        d[3] = 40.0;
        d[10] = 25.0;
        let f = bursts_over(&d);
        assert_eq!(f[9], None, "one burst alone holds nothing");
        assert_eq!(f[10], Some(40.0));
        assert_eq!(f[69], Some(40.0), "held an hour after the second burst");
        assert_eq!(f[70], None);
    }

    #[test]
    fn a_long_burst_is_no_cluster() {
        // A flash crowd of 20 minutes, then another burst soon after: the first was
        // not short, so nothing is held.
        let mut d = vec![8.0; 60];
        for x in &mut d[2..22] {
            *x = 30.0;
        }
        d[30] = 30.0;
        assert!(bursts_over(&d).iter().all(Option::is_none));
    }

    #[test]
    fn staffing_gives_small_fleets_more_headroom_and_large_ones_less() {
        let h = 1.0 / 0.7 - 1.0;
        // One instance's worth of demand: more than the 0.7 target's 1.43 instances.
        assert!(staffing(10.0, 10.0, h, 1.0) / 10.0 > 2.0);
        // A thousand instances' worth: less than the target's 1,429.
        let big = staffing(10_000.0, 10.0, h, 1.0) / 10.0;
        assert!(big > 1_000.0 && big < 1_300.0, "{big}");
        assert_eq!(staffing(0.0, 10.0, h, 1.0), 0.0);
    }
    use crate::sim::{simulate, FleetModel};
    use crate::trace::synthetic;
    use crate::{policy_by_name, MetricKind, MetricSample};

    fn params() -> PolicyParams {
        PolicyParams {
            capacity_rps: 0.1,
            startup_secs: 120.0,
            ..PolicyParams::default()
        }
    }

    fn obs(now: f64, ready: u32, demand: f64) -> Observation {
        let per = demand / f64::from(ready.max(1));
        Observation {
            now_secs: now,
            wall_epoch_secs: now,
            ready,
            starting: 0,
            current_desired: ready,
            metrics: vec![MetricSample {
                kind: MetricKind::Rps,
                stable: Some(per),
                panic: Some(per),
            }],
            demand_rps: Some(demand),
            saturation: None,
        }
    }

    #[test]
    fn reactive_decides_while_learning() {
        let config = PredictiveConfig::for_params(&params(), PredictiveMode::ForecastAndScale);
        let mut p = PredictivePolicy::new("predictive", config).unwrap();
        let d = p.evaluate(&obs(0.0, 10, 1.2));
        assert_eq!(
            (d.desired, d.reason),
            (18, Reason::TargetTracking),
            "{}",
            d.detail
        );
        assert!(d.detail.contains("learning"), "{}", d.detail);
        assert_eq!(d.forecast_rps, None);
    }

    #[test]
    fn history_exports_and_imports_and_the_model_fits_from_it() {
        let trace = synthetic(11, 2);
        let model = FleetModel::new(0.1, 120.0);
        let config = PredictiveConfig::for_params(&params(), PredictiveMode::ForecastAndScale);
        let mut p = PredictivePolicy::new("predictive", config.clone()).unwrap();
        simulate(&trace, &mut p, &model, |_| {});
        assert!(p.model_summary().is_some());
        let history = p.history();
        assert!(
            history.values.len() >= 2 * 1440 - 2,
            "{}",
            history.values.len()
        );
        let json = serde_json::to_string(&history).unwrap();
        let back: History = serde_json::from_str(&json).unwrap();
        assert_eq!(back, history);

        // A restarted policy acts on the imported history at once.
        let mut q = PredictivePolicy::with_history("predictive", config, &back).unwrap();
        let t = trace.end_secs() + 60.0;
        let d = q.evaluate(&obs(t, 10, 0.7));
        let forecast = d.forecast_rps.expect("forecast after import");
        assert!(forecast > 0.0 && forecast < 5.0, "{forecast}");
        let points = q.forecast(t);
        assert!(points.len() >= 48 * 60, "{}", points.len());
        assert!(points.iter().all(|f| f.upper_rps >= f.rps));
    }

    /// Deferred fits: `evaluate` never fits; the job runs elsewhere and is swapped in.
    #[test]
    fn deferred_fits_run_outside_evaluate() {
        let trace = synthetic(11, 2);
        let model = FleetModel::new(0.1, 120.0);
        let config = PredictiveConfig::for_params(&params(), PredictiveMode::ForecastAndScale);
        let mut p = PredictivePolicy::new("predictive", config).unwrap();
        p.set_deferred_fits(true);
        let mut jobs = Vec::new();
        simulate(&trace, &mut p, &model, |_| {});
        // Nothing was fitted inline; the due fit waits.
        assert!(p.model_summary().is_none());
        jobs.extend(p.take_fit_job());
        assert_eq!(jobs.len(), 1, "one fit due at the end");
        assert!(p.take_fit_job().is_none());
        let result = jobs.pop().unwrap().run();
        p.install_fit(result);
        assert!(p.model_summary().is_some());
    }

    #[test]
    fn forecast_only_reports_but_reactive_acts() {
        let trace = synthetic(12, 3);
        let model = FleetModel::new(0.1, 120.0);
        let mut reactive = policy_by_name("reactive", &params()).unwrap();
        let mut only = policy_by_name("forecast-only", &params()).unwrap();
        let a = simulate(&trace, reactive.as_mut(), &model, |_| {});
        let b = simulate(&trace, only.as_mut(), &model, |_| {});
        assert_eq!(a.violation_seconds, b.violation_seconds);
        assert_eq!(a.instance_hours, b.instance_hours);
    }

    #[test]
    fn missing_metrics_do_not_scale_down_even_with_a_forecast() {
        let trace = synthetic(13, 2);
        let model = FleetModel::new(0.1, 120.0);
        let config = PredictiveConfig::for_params(&params(), PredictiveMode::ForecastAndScale);
        let mut p = PredictivePolicy::new("predictive", config).unwrap();
        simulate(&trace, &mut p, &model, |_| {});
        let mut o = obs(trace.end_secs(), 200, 0.5);
        o.metrics[0].stable = None;
        o.metrics[0].panic = None;
        o.demand_rps = None;
        let d = p.evaluate(&o);
        assert!(d.desired >= 200, "{} {}", d.desired, d.detail);
    }

    #[test]
    fn recorder_buckets_demand_and_estimates_capacity() {
        let mut r = DemandRecorder::new(60.0, 1.0, None);
        // Two minutes at 10 and 20 rps with 0.5 and 1.0 allotments busy (20 rps each),
        // a minute missing, then 4 rps.
        for s in 0..60 {
            r.record(6000.0 + f64::from(s), 10.0, Some(0.5));
            r.record(6060.0 + f64::from(s), 20.0, Some(1.0));
        }
        r.record(6180.0, 4.0, None);
        let h = r.history(6200.0);
        assert_eq!(h.start_bucket, 100);
        assert_eq!(h.values, vec![Some(10.0), Some(20.0)]);
        let h = r.finish();
        assert_eq!(h.values, vec![Some(10.0), Some(20.0), None, Some(4.0)]);
        assert_eq!(h.capacity_estimate(), Some(20.0));
        let trace = h.to_trace("h").unwrap();
        assert_eq!(trace.t, vec![0.0, 60.0, 180.0]);
        // A restart continues the saved history.
        let mut again = DemandRecorder::new(60.0, 1.0, Some(h));
        again.record(6240.0, 8.0, None);
        assert_eq!(again.finish().values.len(), 5);
    }

    #[test]
    fn invalid_history_bucket_is_rejected() {
        let config = PredictiveConfig::for_params(&params(), PredictiveMode::ForecastAndScale);
        let history = History {
            bucket_secs: 30.0,
            start_bucket: 0,
            values: vec![Some(1.0)],
            busy: Vec::new(),
        };
        let err = PredictivePolicy::with_history("p", config, &history).unwrap_err();
        assert!(err.to_string().contains("history"), "{err}");
    }

    /// A compressed 60 s "day" in 2 s buckets: quiet (2 rps) then busy (24 rps: 3
    /// instances of 10 rps, 4 at the target utilization) each season. After two seasons the forecast launches
    /// capacity a startup time before the busy phase and lets it go in the quiet one.
    #[test]
    fn compressed_season_prescales_before_the_busy_phase() {
        let params = PolicyParams {
            capacity_rps: 10.0,
            startup_secs: 4.0,
            interval_secs: 1.0,
            min: 1,
            max: 4,
            ..PolicyParams::default()
        };
        let mut config = PredictiveConfig::for_params(&params, PredictiveMode::ForecastAndScale)
            .with_season(60.0);
        config.bucket_secs = 2.0;
        config.min_history_secs = 120.0;
        config.scale_down_delay_secs = 4.0;
        config.reactive.scale_down_stabilization_secs = 5.0;
        let mut p = PredictivePolicy::new("predictive", config).unwrap();
        // Quiet during [0, 30) of each season, busy during [30, 60).
        let demand = |t: f64| if t.rem_euclid(60.0) < 30.0 { 2.0 } else { 24.0 };
        let t0 = 1_700_000_040.0; // a whole number of seasons since the epoch
        let (mut ready, mut launches) = (1u32, VecDeque::<(f64, u32)>::new());
        let mut desired = 1u32;
        let mut at = Vec::new();
        for s in 0..300 {
            let t = f64::from(s);
            while launches.front().is_some_and(|&(r, _)| r <= t) {
                launches.pop_front();
            }
            let starting = desired.saturating_sub(ready);
            let mut o = obs(t0 + t, ready.max(1), demand(t - 0.5));
            o.starting = starting;
            o.current_desired = desired;
            let d = p.evaluate(&o);
            if d.desired > desired {
                launches.push_back((t + 4.0, d.desired - desired));
            }
            desired = d.desired;
            ready = desired - launches.iter().map(|l| l.1).sum::<u32>().min(desired);
            at.push((t, desired, d.reason, d.detail));
        }
        let desired_at = |t: f64| at[t as usize].1;
        let brief = |r: &[(f64, u32, Reason, String)]| -> Vec<(f64, u32)> {
            r.iter().map(|a| (a.0, a.1)).collect()
        };
        assert!(p.model_summary().is_some());
        for season in [3.0, 4.0] {
            let busy = season * 60.0 + 30.0;
            assert!(
                desired_at(busy - 2.0) >= 3,
                "season {season}: {} two seconds before the busy phase: {:?}",
                desired_at(busy - 2.0),
                brief(&at[(busy - 10.0) as usize..busy as usize])
            );
            assert_eq!(desired_at(busy - 15.0), 1, "season {season}: quiet");
            assert!(desired_at(busy + 15.0) >= 3, "season {season}: busy");
        }
        let first_up = at[190..210]
            .iter()
            .find(|a| a.1 >= 3)
            .expect("scaled up before the busy phase");
        // The forecast's call (bounded by max = 4 when it asks for more).
        assert!(
            matches!(first_up.2, Reason::Predictive | Reason::AtMax)
                && first_up.3.contains("forecast upper"),
            "{first_up:?}"
        );
    }

    /// Wraps the policy and checks, at every evaluation where the forecast is
    /// judged poor, that the decision is exactly the reactive policy's.
    struct Checked {
        p: PredictivePolicy,
        poor_steps: u32,
        mismatches: u32,
    }

    impl Policy for Checked {
        fn name(&self) -> &str {
            "checked"
        }
        fn evaluate(&mut self, obs: &Observation) -> Decision {
            let expected = self.p.reactive.clone().evaluate(obs);
            let d = self.p.evaluate(obs);
            if self.p.poor && self.p.model.is_some() {
                self.poor_steps += 1;
                if (d.desired, d.reason) != (expected.desired, expected.reason) {
                    self.mismatches += 1;
                }
            }
            d
        }
    }

    /// Three days of daily cycles, then a day of flat demand: the seasonal forecast
    /// is then worse than persistence, and the policy decides exactly as reactive.
    #[test]
    fn a_forecast_worse_than_persistence_hands_over_to_reactive() {
        let mut trace = synthetic(21, 3);
        let end = trace.end_secs();
        for i in 0..1440 {
            trace.t.push(end + f64::from(i) * 60.0);
            trace.rps.push(1.0);
        }
        let model = FleetModel::new(0.1, 120.0);
        let config = PredictiveConfig::for_params(&params(), PredictiveMode::ForecastAndScale);
        let mut c = Checked {
            p: PredictivePolicy::new("predictive", config).unwrap(),
            poor_steps: 0,
            mismatches: 0,
        };
        simulate(&trace, &mut c, &model, |_| {});
        assert!(c.poor_steps > 1000, "poor for {} steps", c.poor_steps);
        assert_eq!(c.mismatches, 0);
    }

    /// On the synthetic shapes it was tuned with (growth, flash crowds, weekly only,
    /// heavy noise, no seasonality) the predictive policy has no more violation time than
    /// reactive at the same target, within 1.02× its instance-hours (the cost guard's
    /// cap: a little over 1 on noise, where the forecast cuts violation by a third).
    #[test]
    fn no_worse_than_reactive_on_any_synthetic_shape() {
        use crate::trace::{synthetic_with, SyntheticSpec};
        let model = FleetModel::new(0.1, 120.0);
        for shape in ["default", "growth", "flash", "weekly", "noise", "flat"] {
            let trace = synthetic_with(5, &SyntheticSpec::shape(shape, 10).unwrap());
            let mut reactive = policy_by_name("reactive", &params()).unwrap();
            let mut predictive = policy_by_name("predictive", &params()).unwrap();
            let r = simulate(&trace, reactive.as_mut(), &model, |_| {});
            let p = simulate(&trace, predictive.as_mut(), &model, |_| {});
            eprintln!(
                "{shape}: violation {} vs {}, instance-hours {:.1} vs {:.1}",
                p.violation_seconds, r.violation_seconds, p.instance_hours, r.instance_hours
            );
            assert!(
                p.violation_seconds <= r.violation_seconds,
                "{shape}: violation {} vs reactive {}",
                p.violation_seconds,
                r.violation_seconds
            );
            assert!(
                p.instance_hours <= r.instance_hours * 1.02,
                "{shape}: instance-hours {} vs reactive {}",
                p.instance_hours,
                r.instance_hours
            );
        }
    }

    /// On the shapes nobody tuned on (minute-scale swings and spikes over a weak daily
    /// cycle, 5-minute rows, trend changes, holidays) the cost guard keeps the forecast
    /// within 1.02× reactive's instance-hours and never worse on both axes.
    #[test]
    fn the_cost_guard_holds_on_untuned_shapes() {
        use crate::trace::{synthetic_with, SyntheticSpec};
        let model = FleetModel::new(0.1, 120.0);
        for shape in ["social", "steps5", "trend", "holiday"] {
            let trace = synthetic_with(7, &SyntheticSpec::shape(shape, 10).unwrap());
            let mut reactive = policy_by_name("reactive", &params()).unwrap();
            let mut predictive = policy_by_name("predictive", &params()).unwrap();
            let r = simulate(&trace, reactive.as_mut(), &model, |_| {});
            let p = simulate(&trace, predictive.as_mut(), &model, |_| {});
            let why = format!(
                "{shape}: violation {} vs {}, instance-hours {:.1} vs {:.1}",
                p.violation_seconds, r.violation_seconds, p.instance_hours, r.instance_hours
            );
            eprintln!("{why}");
            assert!(p.instance_hours <= 1.02 * r.instance_hours, "{why}");
            assert!(
                p.violation_seconds <= r.violation_seconds || p.instance_hours <= r.instance_hours,
                "{why}"
            );
        }
    }

    /// The spend ratio on the cap, over it at one evaluation and under at the next: the
    /// checks alone flip at every evaluation; the guard hands over once and gives the
    /// forecast back an hour after the last breach.
    #[test]
    fn the_cost_guard_does_not_flap_at_its_cap() {
        let config = PredictiveConfig::for_params(&params(), PredictiveMode::ForecastAndScale);
        let mut p = PredictivePolicy::new("predictive", config).unwrap();
        p.priced_secs = 2.0 * MIN_GUARD_EVIDENCE_SECS;
        // Six hours of 15 s evaluations with the ratio either side of the cap in turn,
        // then two within it.
        let (mut checks, mut switches, mut handed) = (Vec::new(), Vec::new(), None);
        for i in 0..8 * 240 {
            let now = f64::from(i) * 15.0;
            let ratio = if i < 6 * 240 && i % 2 == 0 {
                1.0101
            } else {
                1.0099
            };
            p.cost = (ratio * 1000.0, 1000.0);
            let over = p.cost_check();
            checks.push(over.is_some());
            let h = p.handover.update(now, over);
            if h.is_some() != handed.is_some() {
                switches.push(now);
            }
            handed = h;
        }
        assert!(
            checks[..6 * 240].windows(2).all(|w| w[0] != w[1]),
            "the checks flip"
        );
        // Handed over at once; back an hour after the last breach (at 21,570 s).
        assert_eq!(switches, vec![0.0, 21_570.0 + HANDOVER_HOLD_SECS]);
        assert_eq!(p.handed_over(), None);
    }

    #[test]
    fn forecast_skill_is_scored_against_persistence_per_horizon() {
        let trace = synthetic(3, 4);
        let config = PredictiveConfig::for_params(&params(), PredictiveMode::ForecastAndScale);
        let mut p = PredictivePolicy::new("predictive", config).unwrap();
        simulate(&trace, &mut p, &FleetModel::new(0.1, 120.0), |_| {});
        let skills = p.skill_by_horizon();
        let horizons: Vec<f64> = skills.iter().map(|s| s.0).collect();
        // One bucket, the startup time plus an interval (rounded up to buckets), twice it.
        assert_eq!(horizons, vec![60.0, 180.0, 360.0], "{skills:?}");
        // A daily cycle: the seasonal model beats persistence further ahead.
        let far = skills[2].1.expect("scored");
        assert!(far > 0.0, "{skills:?}");
    }

    /// The acceptance check on a seeded synthetic trace (daily and weekly
    /// cycles, noise, spikes, level shifts): at most half the violation time of
    /// reactive, with no more instance-hours.
    #[test]
    fn predictive_beats_reactive_on_a_seeded_synthetic_trace() {
        let trace = synthetic(2, 14);
        let model = FleetModel::new(0.1, 120.0);
        let mut reactive = policy_by_name("reactive", &params()).unwrap();
        let mut predictive = policy_by_name("predictive", &params()).unwrap();
        let r = simulate(&trace, reactive.as_mut(), &model, |_| {});
        let p = simulate(&trace, predictive.as_mut(), &model, |_| {});
        assert!(
            p.violation_seconds <= 0.5 * r.violation_seconds,
            "violation {} vs reactive {}",
            p.violation_seconds,
            r.violation_seconds
        );
        assert!(
            p.instance_hours <= r.instance_hours,
            "instance-hours {} vs reactive {}",
            p.instance_hours,
            r.instance_hours
        );
    }
}
