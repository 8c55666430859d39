//! The demand forecast behind the predictive policy, and its backtest.
//!
//! Model ("MSTL + SES", the multi-seasonal form of R's `stlf`): the per-bucket
//! demand history is cleaned (long runs of exact zeros are outages, not demand),
//! aggregated to 5 min, variance-stabilized by a transform (none, √ or log: chosen
//! by backtest), and decomposed by MSTL ([`augurs_mstl`]) into daily and weekly
//! seasonal components (detected by autocorrelation, or configured). The seasonal
//! components are continued periodically; the deseasonalized level is tracked per
//! bucket by simple exponential smoothing (α chosen by in-sample h-step error), so
//! the forecast reacts within minutes while the seasonal shape is refit every few
//! hours. `forecast(b) = inv(level + seasonal(b))`; an upper bound adds a quantile of
//! recent forecast errors in the transformed space.
//!
//! The "day" is 24 h by default; [`FitOptions::season_secs`] compresses it (a
//! 10-minute "day" for demos and tests) with the day-based settings scaled along.

use augurs_core::Fit;
use serde::{Deserialize, Serialize};

use crate::trace::Trace;

/// A variance-stabilizing transform applied before decomposition.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Transform {
    /// Additive model on the raw rate.
    None,
    /// Square root: Poisson-like noise (variance ∝ rate) becomes constant.
    Sqrt,
    /// Logarithm (with a small offset): multiplicative noise becomes constant.
    Log,
}

impl Transform {
    /// All candidates, in the order the backtest tries them.
    pub const ALL: [Transform; 3] = [Transform::None, Transform::Sqrt, Transform::Log];

    /// The stable name.
    pub fn as_str(self) -> &'static str {
        match self {
            Transform::None => "none",
            Transform::Sqrt => "sqrt",
            Transform::Log => "log",
        }
    }

    fn fwd(self, y: f64, offset: f64) -> f64 {
        let y = y.max(0.0);
        match self {
            Transform::None => y,
            Transform::Sqrt => y.sqrt(),
            Transform::Log => (y + offset).ln(),
        }
    }

    fn inv(self, z: f64, offset: f64) -> f64 {
        match self {
            Transform::None => z.max(0.0),
            Transform::Sqrt => z.max(0.0).powi(2),
            Transform::Log => (z.exp() - offset).max(0.0),
        }
    }
}

/// Which seasonal periods to model. "Daily" is one [`FitOptions::season_secs`]
/// (24 h unless compressed) and "weekly" seven of them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Seasonality {
    /// Daily and/or weekly, detected by autocorrelation once the history spans two
    /// periods.
    Auto,
    /// Daily only.
    Daily,
    /// Weekly only.
    Weekly,
    /// Daily and weekly.
    DailyWeekly,
    /// No seasonality: level only.
    None,
}

/// How to fit a [`SeasonalModel`].
#[derive(Debug, Clone, PartialEq)]
pub struct FitOptions {
    /// Seconds per history bucket (60).
    pub bucket_secs: f64,
    /// Length of the "day", seconds (86 400): the daily period, the week is 7 of
    /// them, and a fit needs half of one. A shorter one compresses the season (e.g.
    /// 600 for a 10-minute "day" in tests and demos); see [`FitOptions::for_season`].
    pub season_secs: f64,
    /// History buckets per decomposition point (5 → 5 min).
    pub aggregate: usize,
    /// Seasonal periods.
    pub seasonality: Seasonality,
    /// Transform, or `None` to choose by in-sample cost at `quantile`.
    pub transform: Option<Transform>,
    /// Forecast horizon, buckets, that α and the transform are chosen for.
    pub horizon_buckets: usize,
    /// Coverage quantile of the upper bound (e.g. 0.99).
    pub quantile: f64,
    /// Buckets at the end of the fit window used to choose α and the transform.
    pub eval_buckets: usize,
    /// A run of exact zeros at least this long is an outage (missing data).
    pub outage_buckets: usize,
    /// Use at most this many buckets of history.
    pub max_fit_buckets: usize,
}

impl Default for FitOptions {
    fn default() -> Self {
        Self {
            bucket_secs: 60.0,
            season_secs: 86_400.0,
            aggregate: 5,
            seasonality: Seasonality::Auto,
            transform: None,
            horizon_buckets: 3,
            quantile: 0.99,
            eval_buckets: 3 * 1440,
            outage_buckets: 60,
            max_fit_buckets: 21 * 1440,
        }
    }
}

impl FitOptions {
    /// Defaults for `bucket_secs` buckets and a "day" of `season_secs` (a whole
    /// number of buckets), with every day-based setting scaled to the season: about
    /// 288 decomposition points per season (aggregation: the divisor of the
    /// season's bucket count closest to that, so the period is exact), α and the
    /// transform chosen over the last 3 seasons, at most 21 seasons fit. An outage
    /// stays an hour of exact zeros, whatever the season. `for_season(60.0,
    /// 86_400.0)` is [`FitOptions::default`].
    pub fn for_season(bucket_secs: f64, season_secs: f64) -> Self {
        let season = ((season_secs / bucket_secs).round() as usize).max(1);
        let want = season as f64 / 288.0;
        let aggregate = (1..=season)
            .filter(|a| season.is_multiple_of(*a))
            .min_by(|a, b| {
                (*a as f64 - want)
                    .abs()
                    .total_cmp(&(*b as f64 - want).abs())
            })
            .unwrap_or(1);
        Self {
            bucket_secs,
            season_secs,
            aggregate,
            eval_buckets: 3 * season,
            outage_buckets: ((3600.0 / bucket_secs).round() as usize).max(1),
            max_fit_buckets: 21 * season,
            ..Self::default()
        }
    }

    /// Buckets per season ("day").
    fn day_buckets(&self) -> usize {
        (self.season_secs / self.bucket_secs).round() as usize
    }
}

/// What a fit chose, for logs and the backtest.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FitSummary {
    /// The transform used.
    pub transform: Transform,
    /// Seasonal periods found, hours.
    pub periods_hours: Vec<f64>,
    /// The SES smoothing factor.
    pub alpha: f64,
    /// In-sample h-step mean absolute error, requests/s.
    pub mae: f64,
    /// In-sample mean of the upper bound at the quantile, requests/s (the
    /// capacity the forecast would buy): the transform with the least wins.
    pub mean_upper: f64,
}

/// A fitted forecast: seasonal components plus an online level.
#[derive(Debug, Clone)]
pub struct SeasonalModel {
    transform: Transform,
    offset: f64,
    agg: usize,
    /// Bucket index of the first aggregated point's first bucket.
    origin: i64,
    n_agg: usize,
    periods: Vec<usize>,
    comps: Vec<Vec<f32>>,
    alpha: f64,
    level: f64,
    /// In-sample quantile of transformed h-step residuals.
    in_sample_q: f64,
    /// In-sample (point forecast, transformed residual) pairs at the horizon.
    in_sample: Vec<(f64, f64)>,
    summary: FitSummary,
}

/// Mark runs of exact zeros of at least `min_run` buckets as missing.
pub fn mark_outages(values: &mut [Option<f64>], min_run: usize) {
    let mut i = 0;
    while i < values.len() {
        if values[i] == Some(0.0) {
            let start = i;
            while i < values.len() && values[i] == Some(0.0) {
                i += 1;
            }
            if i - start >= min_run {
                values[start..i].iter_mut().for_each(|v| *v = None);
            }
        } else {
            i += 1;
        }
    }
}

/// The `q` quantile (nearest rank) of `v`, reordering it; 0 when empty.
pub fn quantile(v: &mut [f64], q: f64) -> f64 {
    if v.is_empty() {
        return 0.0;
    }
    let k = ((q.clamp(0.0, 1.0) * v.len() as f64).ceil() as usize).clamp(1, v.len()) - 1;
    *v.select_nth_unstable_by(k, |a, b| a.total_cmp(b)).1
}

fn autocorrelation(x: &[f64], lag: usize) -> f64 {
    if x.len() <= lag + 1 {
        return 0.0;
    }
    let mean = x.iter().sum::<f64>() / x.len() as f64;
    let var: f64 = x.iter().map(|v| (v - mean).powi(2)).sum();
    if var <= 0.0 {
        return 0.0;
    }
    let cov: f64 = x[lag..]
        .iter()
        .zip(x)
        .map(|(a, b)| (a - mean) * (b - mean))
        .sum();
    cov / var
}

/// Fill missing points: same point a week earlier, else a day earlier, else the
/// previous value (or the first known one at the start).
fn fill(values: &mut [Option<f64>], day: usize) {
    let week = day * 7;
    for i in 0..values.len() {
        if values[i].is_none() {
            values[i] = (i >= week)
                .then(|| values[i - week])
                .flatten()
                .or_else(|| (i >= day).then(|| values[i - day]).flatten())
                .or_else(|| i.checked_sub(1).and_then(|j| values[j]));
        }
    }
    let first = values.iter().flatten().next().copied().unwrap_or(0.0);
    for v in values.iter_mut() {
        if v.is_none() {
            *v = Some(first);
        }
    }
}

impl SeasonalModel {
    /// The seasonal component (transformed space) at history bucket `bucket`.
    fn seasonal_agg(&self, k: i64) -> f64 {
        let n = self.n_agg as i64;
        let k = k.max(0);
        let mut s = 0.0;
        for (p, comp) in self.periods.iter().zip(&self.comps) {
            let p = *p as i64;
            let idx = if k < n { k } else { n - p + (k - n) % p };
            s += f64::from(comp[idx as usize]);
        }
        s
    }

    fn seasonal(&self, bucket: i64) -> f64 {
        if self.comps.is_empty() {
            return 0.0;
        }
        let a = self.agg as f64;
        let pos = ((bucket - self.origin) as f64 - (a - 1.0) / 2.0) / a;
        let k0 = pos.floor();
        let frac = pos - k0;
        let k0 = k0 as i64;
        self.seasonal_agg(k0) * (1.0 - frac) + self.seasonal_agg(k0 + 1) * frac
    }

    /// Feed the completed bucket `bucket` (missing: no update).
    pub fn update(&mut self, bucket: i64, y: Option<f64>) {
        if let Some(y) = y {
            let d = self.transform.fwd(y, self.offset) - self.seasonal(bucket);
            self.level += self.alpha * (d - self.level);
        }
    }

    /// Point forecast for `bucket`, requests/s.
    pub fn point(&self, bucket: i64) -> f64 {
        self.transform
            .inv(self.level + self.seasonal(bucket), self.offset)
    }

    /// Upper bound for `bucket` given a residual quantile in the transformed space.
    pub fn upper(&self, bucket: i64, resid_q: f64) -> f64 {
        self.transform.inv(
            self.level + self.seasonal(bucket) + resid_q.max(0.0),
            self.offset,
        )
    }

    /// The residual of `actual` against `forecast` in the transformed space.
    pub fn residual(&self, forecast: f64, actual: f64) -> f64 {
        self.transform.fwd(actual, self.offset) - self.transform.fwd(forecast, self.offset)
    }

    /// The in-sample residual quantile (used until live errors accumulate).
    pub fn in_sample_quantile(&self) -> f64 {
        self.in_sample_q
    }

    /// The in-sample (point forecast, transformed residual) pairs at the horizon.
    pub fn in_sample_residuals(&self) -> &[(f64, f64)] {
        &self.in_sample
    }

    /// What the fit chose.
    pub fn summary(&self) -> &FitSummary {
        &self.summary
    }
}

/// Fit on `values` (one per bucket; `None` = missing), whose first element is
/// bucket `start_bucket`. `None` when there is not enough usable data (a day).
pub fn fit(values: &[Option<f64>], start_bucket: i64, opts: &FitOptions) -> Option<SeasonalModel> {
    let day_buckets = opts.day_buckets();
    let skip = values.len().saturating_sub(opts.max_fit_buckets);
    let mut clean: Vec<Option<f64>> = values[skip..].to_vec();
    let origin_bucket = start_bucket + skip as i64;
    mark_outages(&mut clean, opts.outage_buckets);
    if clean.iter().flatten().count() < day_buckets / 2 {
        return None;
    }
    // Aggregate, aligned so that the last aggregated point ends at the last bucket.
    let agg = opts.aggregate.max(1);
    let drop = clean.len() % agg;
    let origin = origin_bucket + drop as i64;
    let body = &clean[drop..];
    let mut agg_vals: Vec<Option<f64>> = body
        .chunks(agg)
        .map(|c| {
            let known: Vec<f64> = c.iter().flatten().copied().collect();
            (!known.is_empty()).then(|| known.iter().sum::<f64>() / known.len() as f64)
        })
        .collect();
    let agg_day = (day_buckets / agg).max(2);
    fill(&mut agg_vals, agg_day);
    let raw_agg: Vec<f64> = agg_vals.iter().map(|v| v.unwrap_or(0.0)).collect();
    let mean = raw_agg.iter().sum::<f64>() / raw_agg.len().max(1) as f64;
    let offset = (0.05 * mean).max(1e-6);

    let transforms: Vec<Transform> = match opts.transform {
        Some(t) => vec![t],
        None => Transform::ALL.to_vec(),
    };
    let mut best: Option<SeasonalModel> = None;
    for transform in transforms {
        let Some(model) = fit_one(
            &clean,
            origin_bucket,
            origin,
            &raw_agg,
            transform,
            offset,
            opts,
        ) else {
            continue;
        };
        if best
            .as_ref()
            .is_none_or(|b| model.summary.mean_upper < b.summary.mean_upper)
        {
            best = Some(model);
        }
    }
    best
}

fn fit_one(
    clean: &[Option<f64>],
    origin_bucket: i64,
    origin: i64,
    raw_agg: &[f64],
    transform: Transform,
    offset: f64,
    opts: &FitOptions,
) -> Option<SeasonalModel> {
    let day_buckets = opts.day_buckets();
    let agg = opts.aggregate.max(1);
    let y: Vec<f64> = raw_agg.iter().map(|&v| transform.fwd(v, offset)).collect();
    let n = y.len();
    let day = day_buckets / agg;
    let week = day * 7;
    let mut periods = Vec::new();
    let wants = |p: usize| n >= 2 * p && p >= 2;
    match opts.seasonality {
        Seasonality::None => {}
        Seasonality::Daily => periods.extend([day].into_iter().filter(|&p| wants(p))),
        Seasonality::Weekly => periods.extend([week].into_iter().filter(|&p| wants(p))),
        Seasonality::DailyWeekly => periods.extend([day, week].into_iter().filter(|&p| wants(p))),
        Seasonality::Auto => {
            let acf_day = autocorrelation(&y, day);
            if wants(day) && acf_day > 0.2 {
                periods.push(day);
            }
            if wants(week) && autocorrelation(&y, week) > acf_day.max(0.2) + 0.05 {
                periods.push(week);
            }
        }
    }
    let mut comps: Vec<Vec<f32>> = Vec::new();
    if !periods.is_empty() {
        let fitted = augurs_mstl::MSTLModel::naive(periods.clone())
            .fit(&y)
            .ok()?;
        comps = fitted.fit().seasonal().to_vec();
    } else if !matches!(opts.seasonality, Seasonality::None) && n >= day && day >= 2 {
        // Between one and two days: the last day's shape, smoothed, as the profile.
        let last = &y[n - day..];
        let m = last.iter().sum::<f64>() / day as f64;
        let mut comp = vec![0f32; n];
        for i in 0..day {
            let lo = i.saturating_sub(2);
            let hi = (i + 3).min(day);
            let s = last[lo..hi].iter().sum::<f64>() / (hi - lo) as f64;
            comp[n - day + i] = (s - m) as f32;
        }
        periods.push(day);
        comps.push(comp);
    }

    let mut model = SeasonalModel {
        transform,
        offset,
        agg,
        origin,
        n_agg: n,
        periods: periods.clone(),
        comps,
        alpha: 0.3,
        level: 0.0,
        in_sample_q: 0.0,
        in_sample: Vec::new(),
        summary: FitSummary {
            transform,
            periods_hours: periods
                .iter()
                .map(|p| (*p * agg) as f64 * opts.bucket_secs / 3600.0)
                .collect(),
            alpha: 0.3,
            mae: 0.0,
            mean_upper: 0.0,
        },
    };

    // Choose α by the h-step error over the evaluation window.
    let eval_len = opts.eval_buckets.min(clean.len());
    let eval_start = clean.len() - eval_len;
    let h = opts.horizon_buckets.max(1);
    let z: Vec<Option<f64>> = clean[eval_start..]
        .iter()
        .enumerate()
        .map(|(i, v)| {
            let b = origin_bucket + (eval_start + i) as i64;
            v.map(|y| transform.fwd(y, offset) - model.seasonal(b))
        })
        .collect();
    let init = z.iter().flatten().next().copied().unwrap_or(0.0);
    let run = |alpha: f64, mut each: Box<dyn FnMut(usize, f64) + '_>| {
        let mut level = init;
        for (i, zi) in z.iter().enumerate() {
            // Level after bucket i forecasts bucket i + h.
            if let Some(v) = zi {
                level += alpha * (v - level);
            }
            each(i, level);
        }
        level
    };
    let mut best = (f64::INFINITY, 0.3);
    for alpha in [0.05, 0.1, 0.2, 0.3, 0.5, 0.7, 1.0] {
        let mut err = 0.0;
        let mut count = 0usize;
        run(
            alpha,
            Box::new(|i, level| {
                if let Some(Some(target)) = z.get(i + h) {
                    err += (target - level).abs();
                    count += 1;
                }
            }),
        );
        let mae = err / count.max(1) as f64;
        if mae < best.0 {
            best = (mae, alpha);
        }
    }
    let alpha = best.1;
    let mut resid = Vec::with_capacity(z.len());
    let mut points = Vec::with_capacity(z.len());
    let level = run(
        alpha,
        Box::new(|i, level| {
            if let Some(Some(target)) = z.get(i + h) {
                resid.push(target - level);
                points.push((level, i + h));
            }
        }),
    );
    model.alpha = alpha;
    model.level = level;
    let mut r = resid.clone();
    model.in_sample_q = quantile(&mut r, opts.quantile);
    let (mut abs_err, mut upper_sum) = (0.0, 0.0);
    for (&(lvl, j), res) in points.iter().zip(&resid) {
        let b = origin_bucket + (eval_start + j) as i64;
        let s = model.seasonal(b);
        let f = transform.inv(lvl + s, offset);
        let actual = transform.inv(lvl + s + res, offset);
        abs_err += (actual - f).abs();
        model.in_sample.push((f, *res));
        upper_sum += transform.inv(lvl + s + model.in_sample_q, offset);
    }
    let k = points.len().max(1) as f64;
    model.summary.alpha = alpha;
    model.summary.mae = abs_err / k;
    model.summary.mean_upper = upper_sum / k;
    Some(model)
}

/// The trace as per-bucket mean rates (buckets of `bucket_secs` from t = 0).
pub fn bucketize(trace: &Trace, bucket_secs: f64) -> Vec<f64> {
    let n = (trace.end_secs() / bucket_secs).ceil() as usize;
    let mut out = vec![0.0; n];
    for (b, v) in out.iter_mut().enumerate() {
        let (lo, hi) = (b as f64 * bucket_secs, (b + 1) as f64 * bucket_secs);
        let i0 = trace.t.partition_point(|&x| x <= lo).saturating_sub(1);
        let mut sum = 0.0;
        let mut i = i0;
        while i < trace.t.len() && trace.t[i] < hi {
            let start = trace.t[i].max(lo);
            let end = trace
                .t
                .get(i + 1)
                .copied()
                .unwrap_or(trace.end_secs())
                .min(hi);
            if end > start {
                sum += trace.rps[i] * (end - start);
            }
            i += 1;
        }
        *v = sum / bucket_secs;
    }
    out
}

/// One model's backtest errors at the policy's horizon.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct BacktestRow {
    /// The candidate.
    pub model: String,
    /// Mean absolute error, requests/s.
    pub mae: f64,
    /// Mean absolute error relative to the persistence forecast's.
    pub mase: f64,
    /// Mean upper bound at the quantile (rolling out-of-sample calibration on the
    /// previous week's errors, √ space for the baselines): the capacity it buys.
    pub mean_upper: f64,
    /// Fraction of buckets whose demand exceeded the upper bound.
    pub exceed: f64,
}

/// Rolling-origin backtest at `horizon_buckets` ahead on per-minute buckets:
/// persistence, seasonal naive (day, week), SES, and MSTL+SES per transform. The
/// first `warmup_days` are history only; models refit every `refit_buckets`.
pub fn backtest(
    trace: &Trace,
    horizon_buckets: usize,
    warmup_days: usize,
    refit_buckets: usize,
    q: f64,
) -> Vec<BacktestRow> {
    let y = bucketize(trace, 60.0);
    let mut clean: Vec<Option<f64>> = y.iter().map(|&v| Some(v)).collect();
    mark_outages(&mut clean, 60);
    let h = horizon_buckets.max(1);
    let start = warmup_days * 1440;
    if y.len() <= start + h {
        return Vec::new();
    }
    // forecasts[model][b] for b in start..len
    let mut names: Vec<String> = vec![
        "persistence".into(),
        "seasonal_naive_day".into(),
        "seasonal_naive_week".into(),
        "ses".into(),
    ];
    let n = y.len();
    let mut preds: Vec<Vec<Option<f64>>> = vec![vec![None; n]; 4];
    let mut ses = y[0];
    for b in 0..n {
        ses += 0.3 * (y[b] - ses);
        let target = b + h;
        if target < n && target >= start {
            preds[0][target] = Some(y[b]);
            preds[1][target] = target.checked_sub(1440).map(|i| y[i]);
            preds[2][target] = target.checked_sub(10_080).map(|i| y[i]);
            preds[3][target] = Some(ses);
        }
    }
    for transform in Transform::ALL {
        names.push(format!("mstl_ses_{}", transform.as_str()));
        let mut p = vec![None; n];
        let opts = FitOptions {
            transform: Some(transform),
            horizon_buckets: h,
            quantile: q,
            ..FitOptions::default()
        };
        let mut b = start - h;
        while b + h < n {
            let Some(mut model) = fit(&clean[..b], 0, &opts) else {
                b += refit_buckets;
                continue;
            };
            let end = (b + refit_buckets).min(n - h);
            for i in b..end {
                // Level updated through bucket i - 1... then forecast i + h.
                model.update(i as i64, clean[i]);
                p[i + h] = Some(model.point((i + h) as i64));
            }
            b = end;
        }
        preds.push(p);
    }
    let persistence_mae = mae_of(&preds[0], &clean, start);
    names
        .into_iter()
        .zip(&preds)
        .map(|(model, p)| {
            let mae = mae_of(p, &clean, start);
            let (mean_upper, exceed) = interval_cost(p, &clean, start, q, model.ends_with("none"));
            BacktestRow {
                mase: mae / persistence_mae.max(1e-12),
                model,
                mae,
                mean_upper,
                exceed,
            }
        })
        .collect()
}

fn mae_of(p: &[Option<f64>], y: &[Option<f64>], start: usize) -> f64 {
    let (mut s, mut k) = (0.0, 0usize);
    for b in start..y.len() {
        if let (Some(f), Some(a)) = (p[b], y[b]) {
            s += (a - f).abs();
            k += 1;
        }
    }
    s / k.max(1) as f64
}

/// Mean upper bound and exceedance when the bound is the forecast plus the `q`
/// quantile of the previous week's residuals (√ space; raw space for `raw`).
fn interval_cost(
    p: &[Option<f64>],
    y: &[Option<f64>],
    start: usize,
    q: f64,
    raw: bool,
) -> (f64, f64) {
    let t = if raw {
        Transform::None
    } else {
        Transform::Sqrt
    };
    let mut resid: Vec<f64> = Vec::new();
    let mut hist: std::collections::VecDeque<f64> = std::collections::VecDeque::new();
    let (mut upper_sum, mut exceed, mut k) = (0.0, 0usize, 0usize);
    let mut qv = f64::NAN;
    for b in start..y.len() {
        if (b - start).is_multiple_of(360) && hist.len() >= 1440 {
            resid.clear();
            resid.extend(hist.iter());
            qv = quantile(&mut resid, q);
        }
        if let (Some(f), Some(a)) = (p[b], y[b]) {
            if qv.is_finite() {
                let upper = t.inv(t.fwd(f, 0.0) + qv.max(0.0), 0.0);
                upper_sum += upper;
                exceed += usize::from(a > upper);
                k += 1;
            }
            hist.push_back(t.fwd(a, 0.0) - t.fwd(f, 0.0));
            if hist.len() > 7 * 1440 {
                hist.pop_front();
            }
        }
    }
    (upper_sum / k.max(1) as f64, exceed as f64 / k.max(1) as f64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantile_nearest_rank() {
        let mut v: Vec<f64> = (1..=100).map(f64::from).collect();
        assert_eq!(quantile(&mut v, 0.99), 99.0);
        assert_eq!(quantile(&mut v, 0.5), 50.0);
        assert_eq!(quantile(&mut [], 0.5), 0.0);
    }

    #[test]
    fn outages_are_long_zero_runs_only() {
        let mut v: Vec<Option<f64>> = vec![Some(1.0), Some(0.0), Some(1.0)];
        v.extend(std::iter::repeat_n(Some(0.0), 60));
        v.push(Some(2.0));
        mark_outages(&mut v, 60);
        assert_eq!(v[1], Some(0.0));
        assert!(v[3..63].iter().all(Option::is_none));
        assert_eq!(v[63], Some(2.0));
    }

    #[test]
    fn season_options_scale_the_day() {
        assert_eq!(
            FitOptions::for_season(60.0, 86_400.0),
            FitOptions::default()
        );
        let o = FitOptions::for_season(2.0, 60.0);
        assert_eq!(
            (o.aggregate, o.eval_buckets, o.max_fit_buckets),
            (1, 90, 630)
        );
        assert_eq!(o.outage_buckets, 1800);
        // 600 s of 1 s buckets: 600 / 288 ≈ 2.1, and 2 divides 600.
        assert_eq!(FitOptions::for_season(1.0, 600.0).aggregate, 2);
    }

    #[test]
    fn learns_a_compressed_season() {
        // A 2-minute "day" in 2 s buckets: a sine over 3 seasons.
        let opts = FitOptions::for_season(2.0, 120.0);
        let day = 60;
        let f = |b: usize| 2.0 + (b as f64 / day as f64 * std::f64::consts::TAU).sin();
        let values: Vec<Option<f64>> = (0..3 * day).map(|b| Some(f(b))).collect();
        let mut model = fit(&values, 0, &opts).expect("fits");
        assert_eq!(model.summary().periods_hours, vec![120.0 / 3600.0]);
        for b in 3 * day..3 * day + 5 {
            model.update(b as i64, Some(f(b)));
        }
        for ahead in [2usize, 15, 40] {
            let b = 3 * day + 5 + ahead;
            let err = (model.point(b as i64) - f(b)).abs();
            assert!(
                err < 0.15,
                "{ahead} ahead: {} vs {}",
                model.point(b as i64),
                f(b)
            );
        }
    }

    #[test]
    fn learns_a_daily_cycle() {
        // A clean daily sine over 3 days, per minute.
        let day = 1440;
        let f = |b: usize| 2.0 + (b as f64 / day as f64 * std::f64::consts::TAU).sin();
        let values: Vec<Option<f64>> = (0..3 * day).map(|b| Some(f(b))).collect();
        let mut model = fit(&values, 0, &FitOptions::default()).expect("fits");
        assert_eq!(model.summary().periods_hours, vec![24.0]);
        for b in 3 * day..3 * day + 30 {
            model.update(b as i64, Some(f(b)));
        }
        for ahead in [3usize, 60, 360] {
            let b = 3 * day + 30 + ahead;
            let err = (model.point(b as i64) - f(b)).abs();
            assert!(
                err < 0.1,
                "{ahead} ahead: {} vs {}",
                model.point(b as i64),
                f(b)
            );
        }
    }
}
