//! Demand traces: `t,rps` CSV (t in seconds from the start, strictly increasing;
//! each rate holds until the next row) and a seeded synthetic generator with daily
//! and weekly cycles, noise, spikes and level shifts.

use std::fmt::Write as _;

/// A demand trace: a step function of requests/s over time.
#[derive(Debug, Clone, PartialEq)]
pub struct Trace {
    /// Start of each step, seconds from the start (strictly increasing, first ≥ 0).
    pub t: Vec<f64>,
    /// Demand during each step, requests/s (≥ 0).
    pub rps: Vec<f64>,
}

/// A trace that does not parse; names the file and line.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum TraceError {
    /// A problem on one line (1-based).
    #[error("{file}:{line}: {message}")]
    Line {
        /// The file name as given.
        file: String,
        /// The line number, 1-based.
        line: usize,
        /// What is wrong.
        message: String,
    },
    /// No data rows.
    #[error("{file}: no data rows after the `t,rps` header")]
    Empty {
        /// The file name as given.
        file: String,
    },
}

impl Trace {
    /// The length of the last step: the previous step's length, or 60 s for a
    /// single-row trace.
    fn last_step(&self) -> f64 {
        match self.t.len() {
            0 | 1 => 60.0,
            n => self.t[n - 1] - self.t[n - 2],
        }
    }

    /// Where the trace ends: the last row's start plus one step.
    pub fn end_secs(&self) -> f64 {
        self.t.last().map_or(0.0, |t| t + self.last_step())
    }

    /// Seconds covered, from the first row to [`Trace::end_secs`].
    pub fn duration_secs(&self) -> f64 {
        self.end_secs() - self.t.first().copied().unwrap_or(0.0)
    }

    /// Demand at time `t` (0 before the first row and after the end).
    pub fn rps_at(&self, t: f64) -> f64 {
        if t < self.t.first().copied().unwrap_or(0.0) || t >= self.end_secs() {
            return 0.0;
        }
        let i = self.t.partition_point(|&x| x <= t);
        self.rps[i.saturating_sub(1)]
    }

    /// Mean demand over the whole trace, requests/s.
    pub fn mean_rps(&self) -> f64 {
        let d = self.duration_secs();
        if d <= 0.0 {
            return 0.0;
        }
        let mut total = 0.0;
        for i in 0..self.t.len() {
            let end = self
                .t
                .get(i + 1)
                .copied()
                .unwrap_or_else(|| self.end_secs());
            total += self.rps[i] * (end - self.t[i]);
        }
        total / d
    }

    /// The trace as `t,rps` CSV.
    pub fn to_csv(&self) -> String {
        let mut out = String::with_capacity(self.t.len() * 14 + 6);
        out.push_str("t,rps\n");
        for (t, r) in self.t.iter().zip(&self.rps) {
            let _ = writeln!(out, "{t},{r:.3}");
        }
        out
    }
}

/// Parse a `t,rps` CSV. `file_name` is only used in error messages.
///
/// Rules: the first non-blank line is the header `t,rps`; each row has two numbers;
/// `t` is ≥ 0 and strictly increasing; `rps` is finite and ≥ 0. Blank lines and
/// lines starting with `#` are skipped.
pub fn parse_csv(text: &str, file_name: &str) -> Result<Trace, TraceError> {
    let err = |line: usize, message: String| TraceError::Line {
        file: file_name.to_string(),
        line,
        message,
    };
    let mut trace = Trace {
        t: Vec::new(),
        rps: Vec::new(),
    };
    let mut header_seen = false;
    for (idx, raw) in text.lines().enumerate() {
        let line_no = idx + 1;
        let line = raw.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        if !header_seen {
            let cols: Vec<String> = line
                .split(',')
                .map(|c| c.trim().to_ascii_lowercase())
                .collect();
            if cols != ["t", "rps"] {
                return Err(err(
                    line_no,
                    format!("expected the header `t,rps`, found `{line}`"),
                ));
            }
            header_seen = true;
            continue;
        }
        let mut fields = line.split(',');
        let (Some(t_str), Some(r_str), None) = (fields.next(), fields.next(), fields.next()) else {
            return Err(err(
                line_no,
                format!("expected two fields `t,rps`, found `{line}`"),
            ));
        };
        let t: f64 = t_str
            .trim()
            .parse()
            .map_err(|_| err(line_no, format!("t is not a number: `{}`", t_str.trim())))?;
        let rps: f64 = r_str
            .trim()
            .parse()
            .map_err(|_| err(line_no, format!("rps is not a number: `{}`", r_str.trim())))?;
        if !t.is_finite() || t < 0.0 {
            return Err(err(line_no, format!("t must be ≥ 0, got {t}")));
        }
        if !rps.is_finite() || rps < 0.0 {
            return Err(err(line_no, format!("rps must be ≥ 0, got {rps}")));
        }
        if let Some(&prev) = trace.t.last() {
            if t <= prev {
                return Err(err(line_no, format!("t must increase: {t} after {prev}")));
            }
        }
        trace.t.push(t);
        trace.rps.push(rps);
    }
    if !header_seen {
        return Err(err(1, "missing the header `t,rps`".to_string()));
    }
    if trace.t.is_empty() {
        return Err(TraceError::Empty {
            file: file_name.to_string(),
        });
    }
    Ok(trace)
}

/// SplitMix64: a small, seeded, reproducible generator.
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    /// A generator from `seed`.
    pub fn new(seed: u64) -> Self {
        Self(seed ^ 0x9E37_79B9_7F4A_7C15)
    }
    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    /// Uniform in [0, 1).
    pub fn uniform(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }
    /// Uniform in [lo, hi).
    pub fn range(&mut self, lo: f64, hi: f64) -> f64 {
        lo + (hi - lo) * self.uniform()
    }
    /// Standard normal (Box–Muller).
    pub fn normal(&mut self) -> f64 {
        let u1 = self.uniform().max(1e-12);
        let u2 = self.uniform();
        (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()
    }
}

/// Shape of a synthetic trace. Rates are per `step_secs` bucket.
#[derive(Debug, Clone, PartialEq)]
pub struct SyntheticSpec {
    /// Days to generate.
    pub days: u32,
    /// Seconds per row.
    pub step_secs: u32,
    /// Mean weekday level before shifts, requests/s.
    pub base_rps: f64,
    /// Daily swing: the peak is about (1 + a) and the trough (1 − a) times the level.
    pub daily_amplitude: f64,
    /// Weekend days run at this fraction of weekdays (days 5 and 6 of each week).
    pub weekend_factor: f64,
    /// Noise: standard deviation of a row's rate is `noise × sqrt(rate)` (a Poisson
    /// count over one minute has about 0.13).
    pub noise: f64,
    /// Mean number of spikes per day (each × `spike_factor` for 5–40 min).
    pub spikes_per_day: f64,
    /// Range of a spike's peak factor (default ×1.5–3).
    pub spike_factor: (f64, f64),
    /// Mean number of persistent level shifts (×0.7–1.4) per week.
    pub shifts_per_week: f64,
    /// Steady growth of the level, fraction per day (0.05: +5% a day, compounded).
    pub growth_per_day: f64,
    /// Swings within the hour: the standard deviation of a log-level that wanders
    /// with a ten-minute memory (0.4: often ×1.5 either way within the hour).
    pub swing: f64,
    /// Mean number of trend changes per week: the growth rate is redrawn in ±15% a day.
    pub trend_changes_per_week: f64,
    /// Mean number of holidays per week: a weekday at the weekend level.
    pub holidays_per_week: f64,
}

impl Default for SyntheticSpec {
    fn default() -> Self {
        Self {
            days: 14,
            step_secs: 60,
            base_rps: 1.0,
            daily_amplitude: 0.6,
            weekend_factor: 0.6,
            noise: 0.25,
            spikes_per_day: 1.0,
            spike_factor: (1.5, 3.0),
            shifts_per_week: 1.0,
            growth_per_day: 0.0,
            swing: 0.0,
            trend_changes_per_week: 0.0,
            holidays_per_week: 0.0,
        }
    }
}

/// The named shapes of [`SyntheticSpec::shape`].
pub const SHAPES: &[&str] = &[
    "default", "growth", "flash", "weekly", "noise", "flat", "social", "steps5", "trend", "holiday",
];

impl SyntheticSpec {
    /// A named shape over `days` days: `default` (daily and weekly cycles, noise,
    /// a spike a day, level shifts), `growth` (the default growing 5% a day),
    /// `flash` (flash crowds: four ×2–6 spikes a day over a weak daily cycle),
    /// `weekly` (weekday/weekend only, no daily cycle), `noise` (the default with
    /// four times the noise), `flat` (no seasonality at all: level, noise, spikes
    /// and shifts only), `social` (a weak daily cycle under large swings within the
    /// hour and spikes to ~5×), `steps5` (a small service in 5-minute rows with daily
    /// peaks ~5× the mean), `trend` (the default whose growth turns up and down twice a
    /// week), `holiday` (the default with a weekday at the weekend level about weekly).
    pub fn shape(name: &str, days: u32) -> Option<Self> {
        let base = Self {
            days,
            ..Self::default()
        };
        Some(match name {
            "default" => base,
            "growth" => Self {
                growth_per_day: 0.05,
                ..base
            },
            "flash" => Self {
                daily_amplitude: 0.3,
                spikes_per_day: 4.0,
                spike_factor: (2.0, 6.0),
                ..base
            },
            "weekly" => Self {
                daily_amplitude: 0.0,
                weekend_factor: 0.5,
                ..base
            },
            "noise" => Self { noise: 1.0, ..base },
            "flat" => Self {
                daily_amplitude: 0.0,
                weekend_factor: 1.0,
                ..base
            },
            "social" => Self {
                daily_amplitude: 0.15,
                weekend_factor: 0.9,
                swing: 0.45,
                spikes_per_day: 3.0,
                spike_factor: (3.0, 5.0),
                shifts_per_week: 0.5,
                ..base
            },
            "steps5" => Self {
                step_secs: 300,
                base_rps: 0.3,
                daily_amplitude: 1.0,
                noise: 0.6,
                spikes_per_day: 0.5,
                ..base
            },
            "trend" => Self {
                trend_changes_per_week: 2.0,
                ..base
            },
            "holiday" => Self {
                holidays_per_week: 1.0,
                ..base
            },
            _ => return None,
        })
    }
}

/// A synthetic trace with the default shape over `days` days.
pub fn synthetic(seed: u64, days: u32) -> Trace {
    synthetic_with(
        seed,
        &SyntheticSpec {
            days,
            ..SyntheticSpec::default()
        },
    )
}

/// A synthetic trace of the given shape. The same seed gives the same trace.
pub fn synthetic_with(seed: u64, spec: &SyntheticSpec) -> Trace {
    let mut rng = Rng::new(seed);
    let step = f64::from(spec.step_secs.max(1));
    let total = f64::from(spec.days) * 86_400.0;
    let n = (total / step) as usize;

    // Per-day jitter of the daily cycle: phase (hours) and amplitude.
    let days = spec.days as usize + 1;
    let phase: Vec<f64> = (0..days).map(|_| rng.range(-0.75, 0.75)).collect();
    let amp: Vec<f64> = (0..days).map(|_| rng.range(0.85, 1.15)).collect();
    // Level shifts: (time, factor).
    let mut shifts = Vec::new();
    let mut t = 0.0;
    if spec.shifts_per_week > 0.0 {
        loop {
            t += -rng.uniform().max(1e-12).ln() * 7.0 * 86_400.0 / spec.shifts_per_week;
            if t >= total {
                break;
            }
            shifts.push((t, rng.range(0.7, 1.4)));
        }
    }
    // Spikes: (start, duration, peak factor).
    let mut spikes = Vec::new();
    let mut t = 0.0;
    if spec.spikes_per_day > 0.0 {
        loop {
            t += -rng.uniform().max(1e-12).ln() * 86_400.0 / spec.spikes_per_day;
            if t >= total {
                break;
            }
            let (lo, hi) = spec.spike_factor;
            spikes.push((t, rng.range(300.0, 2400.0), rng.range(lo, hi)));
        }
    }

    // Trend changes: (time, new growth per day).
    let mut trends = Vec::new();
    let mut t = 0.0;
    if spec.trend_changes_per_week > 0.0 {
        loop {
            t += -rng.uniform().max(1e-12).ln() * 7.0 * 86_400.0 / spec.trend_changes_per_week;
            if t >= total {
                break;
            }
            trends.push((t, rng.range(-0.15, 0.15)));
        }
    }
    let holiday: Vec<bool> = (0..days)
        .map(|_| spec.holidays_per_week > 0.0 && rng.uniform() < spec.holidays_per_week / 5.0)
        .collect();

    let mut trace = Trace {
        t: Vec::with_capacity(n),
        rps: Vec::with_capacity(n),
    };
    let (mut level, mut next_shift) = (1.0, 0);
    let (mut trend_level, mut trend_rate, mut next_trend) = (0.0f64, 0.0, 0);
    // AR(1) log-level with a ten-minute memory and stationary deviation `swing`.
    let keep = (-step / 600.0).exp();
    let mut wander = 0.0f64;
    for i in 0..n {
        let t = i as f64 * step;
        while next_trend < trends.len() && trends[next_trend].0 <= t {
            trend_rate = trends[next_trend].1;
            next_trend += 1;
        }
        trend_level += trend_rate * step / 86_400.0;
        // Keep a turned trend from running away over weeks.
        trend_level = trend_level.clamp(-1.0, 1.0);
        // Drawn only for shapes that swing, so the other shapes stay as they were.
        if spec.swing > 0.0 {
            wander = keep * wander + spec.swing * (1.0 - keep * keep).sqrt() * rng.normal();
        }
        while next_shift < shifts.len() && shifts[next_shift].0 <= t {
            level *= shifts[next_shift].1;
            next_shift += 1;
        }
        let day = (t / 86_400.0) as usize;
        let hour = (t % 86_400.0) / 3600.0 - phase[day];
        // Peak mid-afternoon, trough before dawn, a shoulder in the morning.
        let x = std::f64::consts::TAU * (hour - 8.0) / 24.0;
        let shape = (x.sin() + 0.25 * (2.0 * x).sin() * 0.5) / 1.0;
        let daily = 1.0 + spec.daily_amplitude * amp[day] * shape.clamp(-1.2, 1.2);
        let weekday = day % 7;
        let weekly = if weekday >= 5 || holiday[day] {
            spec.weekend_factor
        } else {
            1.0
        };
        let mut spike = 1.0;
        for &(s, d, f) in spikes.iter().filter(|(s, _, _)| *s <= t && t < s + 2400.0) {
            if t < s + d {
                // Fast rise over 2 minutes, linear decay.
                let rise = ((t - s) / 120.0).min(1.0);
                let decay = 1.0 - (t - s) / d;
                spike *= 1.0 + (f - 1.0) * rise * decay;
            }
        }
        let growth = (spec.growth_per_day * t / 86_400.0 + trend_level).exp()
            * (wander - spec.swing * spec.swing / 2.0).exp();
        let rate = (spec.base_rps * level * growth * daily.max(0.05) * weekly * spike).max(0.0);
        let noisy = (rate + spec.noise * rate.sqrt() * rng.normal()).max(0.0);
        trace.t.push(t);
        trace.rps.push((noisy * 1000.0).round() / 1000.0);
    }
    trace
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_steps() {
        let t = parse_csv("t,rps\n0,1.5\n60,2\n\n120,0\n", "x.csv").unwrap();
        assert_eq!(t.t, vec![0.0, 60.0, 120.0]);
        assert_eq!(t.rps_at(59.9), 1.5);
        assert_eq!(t.rps_at(60.0), 2.0);
        assert_eq!(t.end_secs(), 180.0);
        assert_eq!(t.rps_at(180.0), 0.0);
        assert!((t.mean_rps() - 3.5 / 3.0).abs() < 1e-12);
        assert_eq!(parse_csv(&t.to_csv(), "y").unwrap(), t);
    }

    fn line_of(text: &str) -> (usize, String) {
        match parse_csv(text, "trace.csv").unwrap_err() {
            TraceError::Line {
                line,
                message,
                file,
            } => {
                assert_eq!(file, "trace.csv");
                (line, message)
            }
            other => panic!("{other}"),
        }
    }

    #[test]
    fn malformed_traces_name_the_line() {
        assert_eq!(line_of("0,1\n60,2\n").0, 1); // missing header
        let (line, msg) = line_of("t,rps\n0,1\n60,-2\n");
        assert_eq!(line, 3);
        assert!(msg.contains("rps must be"), "{msg}");
        let (line, msg) = line_of("t,rps\n0,1\n60,2\n60,3\n");
        assert_eq!(line, 4);
        assert!(msg.contains("increase"), "{msg}");
        let (line, msg) = line_of("t,rps\n0,1\n\n60,abc\n");
        assert_eq!(line, 4);
        assert!(msg.contains("abc"), "{msg}");
        assert_eq!(line_of("t,rps\n0,1,2\n").0, 2);
        assert_eq!(line_of("t,rps\nx,1\n").0, 2);
        let err = parse_csv("t,rps\n", "e.csv").unwrap_err();
        assert!(matches!(err, TraceError::Empty { .. }));
        let shown = parse_csv("t,rps\n0,1\n60,-1\n", "a.csv")
            .unwrap_err()
            .to_string();
        assert!(shown.starts_with("a.csv:3:"), "{shown}");
    }

    #[test]
    fn new_shapes_have_their_features() {
        let mean = |t: &Trace| t.rps.iter().sum::<f64>() / t.rps.len() as f64;
        // social: large swings within the hour, a weak daily cycle.
        let s = synthetic_with(3, &SyntheticSpec::shape("social", 14).unwrap());
        let f = synthetic_with(3, &SyntheticSpec::shape("flat", 14).unwrap());
        let hourly_range = |t: &Trace| {
            let hours = t.rps.chunks(60);
            let n = hours.len() as f64;
            hours
                .map(|h| {
                    let (lo, hi) = h
                        .iter()
                        .fold((f64::MAX, 0.0f64), |(a, b), &x| (a.min(x), b.max(x)));
                    (hi - lo) / (h.iter().sum::<f64>() / h.len() as f64).max(1e-9)
                })
                .sum::<f64>()
                / n
        };
        assert!(
            hourly_range(&s) > 1.5 * hourly_range(&f),
            "{} {}",
            hourly_range(&s),
            hourly_range(&f)
        );
        assert!(s.rps.iter().cloned().fold(0.0, f64::max) > 3.0 * mean(&s));
        // steps5: 5-minute rows, daily peaks well above the mean.
        let p = synthetic_with(3, &SyntheticSpec::shape("steps5", 14).unwrap());
        assert_eq!(p.t[1] - p.t[0], 300.0);
        assert!(p.rps.iter().cloned().fold(0.0, f64::max) > 3.0 * mean(&p));
        // holiday: some weekday runs at the weekend level.
        let h = synthetic_with(5, &SyntheticSpec::shape("holiday", 28).unwrap());
        let d = synthetic_with(5, &SyntheticSpec::shape("default", 28).unwrap());
        assert_ne!(h, d);
        // trend: the level drifts away from the default's.
        let tr = synthetic_with(5, &SyntheticSpec::shape("trend", 28).unwrap());
        assert_ne!(tr, d);
    }

    #[test]
    fn synthetic_is_seeded_and_seasonal() {
        let a = synthetic(7, 14);
        assert_eq!(a, synthetic(7, 14));
        assert_ne!(a, synthetic(8, 14));
        assert_eq!(a.t.len(), 14 * 1440);
        assert!(a.rps.iter().all(|&r| r >= 0.0));
        // Afternoons are busier than nights on weekdays.
        let at = |day: usize, hour: usize| {
            let i = day * 1440 + hour * 60;
            a.rps[i..i + 60].iter().sum::<f64>()
        };
        let (afternoon, night): (f64, f64) = (0..5)
            .map(|d| (at(d, 14), at(d, 3)))
            .fold((0.0, 0.0), |(x, y), (a, b)| (x + a, y + b));
        assert!(afternoon > 2.0 * night, "{afternoon} vs {night}");
    }
}
