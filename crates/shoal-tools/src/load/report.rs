//! The result of a load run, as text or JSON.

use std::collections::BTreeMap;
use std::fmt::Write;
use std::time::Duration;

use hdrhistogram::Histogram;
use serde::Serialize;

use super::LoadConfig;

/// Everything a load run measured. Serializes to the `--json` output.
#[derive(Debug, Clone, Serialize)]
pub struct LoadReport {
    /// Target URL.
    pub url: String,
    /// Request method.
    pub method: String,
    /// Requested arrival rate (requests per second).
    pub target_rate: f64,
    /// Requested issuing duration, seconds.
    pub duration_secs: f64,
    /// Upper bound on connections.
    pub max_connections: usize,
    /// Connections actually opened (the pool grows on demand).
    pub connections_used: usize,
    /// Requests scheduled (`rate × duration`); each ends as ok or as one error.
    pub requests: u64,
    /// Rate at which requests actually went out (lower than `target_rate` when the generator
    /// or the connection limit could not keep up).
    pub achieved_rate: f64,
    /// Wall time of the whole run, including waiting for the last responses.
    pub elapsed_secs: f64,
    /// Responses with a status below 400.
    pub ok: u64,
    /// Failed requests by kind.
    pub errors: ErrorCounts,
    /// Responses by status code (all codes, including successes).
    pub status_codes: BTreeMap<u16, u64>,
    /// Latency from the intended send time of every request that got a complete response.
    pub latency: LatencySummary,
    /// Latency distribution in logarithmic buckets.
    pub histogram: Vec<HistogramBucket>,
}

/// Failed requests by kind.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct ErrorCounts {
    /// Sum of all kinds below.
    pub total: u64,
    /// TCP connect (or HTTP handshake) failed, e.g. connection refused.
    pub connect: u64,
    /// No complete response within the timeout of the intended send time.
    pub timeout: u64,
    /// The connection failed mid-request (reset, closed early, malformed response).
    pub io: u64,
    /// Responses with a 4xx status.
    pub status_4xx: u64,
    /// Responses with a 5xx status.
    pub status_5xx: u64,
}

/// Latency percentiles in microseconds.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct LatencySummary {
    /// Number of latencies recorded.
    pub count: u64,
    /// Smallest latency.
    pub min_us: u64,
    /// Mean latency.
    pub mean_us: f64,
    /// Median.
    pub p50_us: u64,
    /// 90th percentile.
    pub p90_us: u64,
    /// 99th percentile.
    pub p99_us: u64,
    /// 99.9th percentile.
    pub p999_us: u64,
    /// Largest latency.
    pub max_us: u64,
}

/// Responses whose latency fell in `[from_us, to_us)`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct HistogramBucket {
    /// Lower bound, inclusive, µs.
    pub from_us: u64,
    /// Upper bound, exclusive, µs.
    pub to_us: u64,
    /// Responses in the bucket.
    pub count: u64,
}

/// The raw figures [`LoadReport::build`] turns into a report.
pub(super) struct Inputs<'a> {
    pub cfg: &'a LoadConfig,
    pub requests: u64,
    pub achieved_rate: f64,
    pub elapsed: Duration,
    pub connections_used: usize,
    pub ok: u64,
    /// `connect`, `timeout` and `io` filled in; the rest is derived here.
    pub errors: ErrorCounts,
    pub status_codes: BTreeMap<u16, u64>,
    pub hist: &'a Histogram<u64>,
}

/// At most this many histogram lines.
const MAX_BUCKETS: usize = 12;
/// Width of the longest histogram bar.
const BAR_WIDTH: u64 = 40;

impl LoadReport {
    pub(super) fn build(i: Inputs<'_>) -> Self {
        let mut errors = i.errors;
        for (&code, &n) in &i.status_codes {
            match code {
                400..=499 => errors.status_4xx += n,
                500..=599 => errors.status_5xx += n,
                _ => {}
            }
        }
        errors.total =
            errors.connect + errors.timeout + errors.io + errors.status_4xx + errors.status_5xx;
        Self {
            url: i.cfg.url.to_string(),
            method: i.cfg.method.to_string(),
            target_rate: i.cfg.rate,
            duration_secs: i.cfg.duration.as_secs_f64(),
            max_connections: i.cfg.connections,
            connections_used: i.connections_used,
            requests: i.requests,
            achieved_rate: i.achieved_rate,
            elapsed_secs: i.elapsed.as_secs_f64(),
            ok: i.ok,
            errors,
            status_codes: i.status_codes,
            latency: summarize(i.hist),
            histogram: buckets(i.hist),
        }
    }

    /// The report as one line of JSON (the `--json` output).
    pub fn to_json(&self) -> String {
        serde_json::to_string(self).expect("the report always serializes")
    }

    /// The human-readable report.
    pub fn to_text(&self) -> String {
        let mut s = String::new();
        let e = &self.errors;
        let l = &self.latency;
        // Writing to a String cannot fail.
        let _ = writeln!(
            s,
            "{} {}  {} rps for {}s, up to {} connections",
            self.method, self.url, self.target_rate, self.duration_secs, self.max_connections
        );
        let _ = writeln!(
            s,
            "requests   {} in {:.2}s, achieved {:.1} rps, {} connections used",
            self.requests, self.elapsed_secs, self.achieved_rate, self.connections_used
        );
        let _ = writeln!(s, "ok         {}", self.ok);
        let _ = writeln!(
            s,
            "errors     {}  (connect {}, timeout {}, io {}, 4xx {}, 5xx {})",
            e.total, e.connect, e.timeout, e.io, e.status_4xx, e.status_5xx
        );
        if !self.status_codes.is_empty() {
            let codes: Vec<String> = self
                .status_codes
                .iter()
                .map(|(c, n)| format!("{c}: {n}"))
                .collect();
            let _ = writeln!(s, "status     {}", codes.join(", "));
        }
        if l.count == 0 {
            let _ = writeln!(s, "latency    no responses");
            return s;
        }
        let _ = writeln!(
            s,
            "latency    p50 {}  p90 {}  p99 {}  p99.9 {}  max {}  (min {}, mean {})",
            fmt_us(l.p50_us),
            fmt_us(l.p90_us),
            fmt_us(l.p99_us),
            fmt_us(l.p999_us),
            fmt_us(l.max_us),
            fmt_us(l.min_us),
            fmt_us(l.mean_us.round() as u64),
        );
        let top = self
            .histogram
            .iter()
            .map(|b| b.count)
            .max()
            .unwrap_or(0)
            .max(1);
        for b in &self.histogram {
            let width = (b.count * BAR_WIDTH).div_ceil(top) as usize;
            let _ = writeln!(
                s,
                "  {:>8} .. {:<8} {:<w$} {}",
                fmt_us(b.from_us),
                fmt_us(b.to_us),
                "#".repeat(width),
                b.count,
                w = BAR_WIDTH as usize,
            );
        }
        s
    }
}

fn summarize(h: &Histogram<u64>) -> LatencySummary {
    if h.is_empty() {
        return LatencySummary::default();
    }
    LatencySummary {
        count: h.len(),
        min_us: h.min(),
        mean_us: h.mean(),
        p50_us: h.value_at_quantile(0.5),
        p90_us: h.value_at_quantile(0.9),
        p99_us: h.value_at_quantile(0.99),
        p999_us: h.value_at_quantile(0.999),
        max_us: h.max(),
    }
}

/// Power-of-two (or coarser) buckets from the smallest to the largest latency.
fn buckets(h: &Histogram<u64>) -> Vec<HistogramBucket> {
    if h.is_empty() {
        return Vec::new();
    }
    let lo = prev_power_of_two(h.min());
    let hi = h.max();
    // Widen the factor between bounds until the range fits in MAX_BUCKETS lines.
    let mut shift = 1u32;
    let count_for = |shift: u32| {
        let mut n = 0;
        let mut b = lo;
        while b <= hi {
            n += 1;
            b = b.saturating_mul(1 << shift);
            if b == u64::MAX {
                break;
            }
        }
        n
    };
    while count_for(shift) > MAX_BUCKETS {
        shift += 1;
    }
    let mut out = Vec::new();
    let mut from = lo;
    while from <= hi {
        let to = from.saturating_mul(1 << shift);
        out.push(HistogramBucket {
            from_us: from,
            to_us: to,
            count: 0,
        });
        if to == u64::MAX {
            break;
        }
        from = to;
    }
    for v in h.iter_recorded() {
        let value = h.lowest_equivalent(v.value_iterated_to());
        let idx = out
            .iter()
            .position(|b| value < b.to_us)
            .unwrap_or(out.len() - 1);
        out[idx].count += v.count_at_value();
    }
    out
}

fn prev_power_of_two(v: u64) -> u64 {
    if v <= 1 {
        1
    } else {
        1 << (63 - v.leading_zeros())
    }
}

/// Formats microseconds as µs, ms or s.
fn fmt_us(us: u64) -> String {
    if us < 1_000 {
        format!("{us}µs")
    } else if us < 1_000_000 {
        format!("{:.2}ms", us as f64 / 1e3)
    } else {
        format!("{:.2}s", us as f64 / 1e6)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hist(values: &[u64]) -> Histogram<u64> {
        let mut h = Histogram::new_with_bounds(1, 3_600_000_000, 3).unwrap();
        for &v in values {
            h.record(v).unwrap();
        }
        h
    }

    #[test]
    fn buckets_cover_all_values_once() {
        let h = hist(&[1, 3, 900, 1_000, 1_100, 250_000, 9_000_000]);
        let b = buckets(&h);
        assert!(b.len() <= MAX_BUCKETS);
        assert_eq!(b.iter().map(|b| b.count).sum::<u64>(), 7);
        assert_eq!(b[0].from_us, 1);
        assert!(b.last().unwrap().to_us > 9_000_000);
        assert!(b.windows(2).all(|w| w[0].to_us == w[1].from_us));
    }

    #[test]
    fn text_and_json_reports() {
        let cfg = LoadConfig::new(
            "http://127.0.0.1:8080/work".parse().unwrap(),
            100.0,
            Duration::from_secs(2),
        );
        let h = hist(&[500, 700, 1_500, 40_000]);
        let mut codes = BTreeMap::new();
        codes.insert(200, 3);
        codes.insert(503, 1);
        let r = LoadReport::build(Inputs {
            cfg: &cfg,
            requests: 6,
            achieved_rate: 99.5,
            elapsed: Duration::from_millis(2_100),
            connections_used: 2,
            ok: 3,
            errors: ErrorCounts {
                connect: 1,
                timeout: 1,
                ..Default::default()
            },
            status_codes: codes,
            hist: &h,
        });
        assert_eq!(r.errors.status_5xx, 1);
        assert_eq!(r.errors.total, 3);
        assert_eq!(r.latency.count, 4);
        let text = r.to_text();
        assert!(text.contains("p99.9"), "{text}");
        assert!(text.contains("5xx 1"), "{text}");
        assert!(text.contains('#'), "{text}");
        let v: serde_json::Value = serde_json::from_str(&r.to_json()).unwrap();
        assert_eq!(v["errors"]["timeout"], 1);
        assert_eq!(v["status_codes"]["503"], 1);
        assert!(v["latency"]["p50_us"].as_u64().unwrap() >= 500);
    }

    #[test]
    fn formats_durations() {
        assert_eq!(fmt_us(999), "999µs");
        assert_eq!(fmt_us(1_500), "1.50ms");
        assert_eq!(fmt_us(2_000_000), "2.00s");
    }
}
