//! Lock-free metric primitives and the Prometheus text exposition.
//!
//! Hot-path updates are single relaxed atomic adds on handles owned by the component
//! (service, instance); rendering walks the components at scrape time. Families are grouped
//! by [`Exposition`] so that several components can contribute samples to one family.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};

/// A monotonically increasing counter.
#[derive(Debug, Default)]
pub struct Counter(AtomicU64);

impl Counter {
    #[inline]
    pub fn inc(&self) {
        self.0.fetch_add(1, Ordering::Relaxed);
    }
    #[inline]
    pub fn add(&self, n: u64) {
        self.0.fetch_add(n, Ordering::Relaxed);
    }
    pub fn get(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
}

/// Request counts by HTTP status code (100..=599), one atomic per code.
#[derive(Debug)]
pub struct CodeCounters(Box<[AtomicU64]>);

impl Default for CodeCounters {
    fn default() -> Self {
        CodeCounters((0..500).map(|_| AtomicU64::new(0)).collect())
    }
}

impl CodeCounters {
    #[inline]
    pub fn inc(&self, code: u16) {
        let i = code.clamp(100, 599) as usize - 100;
        self.0[i].fetch_add(1, Ordering::Relaxed);
    }
    /// Non-zero (code, count) pairs.
    pub fn iter(&self) -> impl Iterator<Item = (u16, u64)> + '_ {
        self.0.iter().enumerate().filter_map(|(i, c)| {
            let v = c.load(Ordering::Relaxed);
            (v > 0).then_some((i as u16 + 100, v))
        })
    }
    pub fn total(&self) -> u64 {
        self.iter().map(|(_, v)| v).sum()
    }
}

/// Latency bucket bounds in seconds (Prometheus defaults, extended down to 0.5 ms).
pub const LATENCY_BUCKETS: [f64; 14] = [
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

/// A fixed-bucket histogram of durations.
#[derive(Debug, Default)]
pub struct Histogram {
    buckets: [AtomicU64; LATENCY_BUCKETS.len()],
    count: AtomicU64,
    sum_nanos: AtomicU64,
}

impl Histogram {
    #[inline]
    pub fn observe_nanos(&self, nanos: u64) {
        let secs = nanos as f64 / 1e9;
        if let Some(i) = LATENCY_BUCKETS.iter().position(|&b| secs <= b) {
            self.buckets[i].fetch_add(1, Ordering::Relaxed);
        }
        self.count.fetch_add(1, Ordering::Relaxed);
        self.sum_nanos.fetch_add(nanos, Ordering::Relaxed);
    }

    pub fn count(&self) -> u64 {
        self.count.load(Ordering::Relaxed)
    }

    /// Cumulative bucket counts, for exposition and quantile estimates.
    pub fn cumulative(&self) -> [u64; LATENCY_BUCKETS.len()] {
        let mut out = [0; LATENCY_BUCKETS.len()];
        let mut acc = 0;
        for (i, b) in self.buckets.iter().enumerate() {
            acc += b.load(Ordering::Relaxed);
            out[i] = acc;
        }
        out
    }

    pub fn sum_secs(&self) -> f64 {
        self.sum_nanos.load(Ordering::Relaxed) as f64 / 1e9
    }
}

/// Kind of a metric family.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Counter,
    Gauge,
    Histogram,
}

impl Kind {
    fn as_str(self) -> &'static str {
        match self {
            Kind::Counter => "counter",
            Kind::Gauge => "gauge",
            Kind::Histogram => "histogram",
        }
    }
}

#[derive(Default)]
struct Family {
    help: &'static str,
    kind: Option<Kind>,
    lines: String,
}

/// Collects samples from many components, grouped by family, and renders the text format.
#[derive(Default)]
pub struct Exposition {
    families: BTreeMap<&'static str, Family>,
}

/// Escapes a label value per the exposition format.
fn escape(v: &str, out: &mut String) {
    for c in v.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '"' => out.push_str("\\\""),
            '\n' => out.push_str("\\n"),
            c => out.push(c),
        }
    }
}

fn labels(out: &mut String, labels: &[(&str, &str)]) {
    if labels.is_empty() {
        return;
    }
    out.push('{');
    for (i, (k, v)) in labels.iter().enumerate() {
        if i > 0 {
            out.push(',');
        }
        out.push_str(k);
        out.push_str("=\"");
        escape(v, out);
        out.push('"');
    }
    out.push('}');
}

impl Exposition {
    fn family(&mut self, name: &'static str, help: &'static str, kind: Kind) -> &mut Family {
        let f = self.families.entry(name).or_default();
        f.help = help;
        f.kind = Some(kind);
        f
    }

    /// Declares a family with no samples yet (so it is present in every scrape).
    pub fn declare(&mut self, name: &'static str, help: &'static str, kind: Kind) {
        self.family(name, help, kind);
    }

    pub fn sample(
        &mut self,
        name: &'static str,
        help: &'static str,
        kind: Kind,
        l: &[(&str, &str)],
        value: f64,
    ) {
        let f = self.family(name, help, kind);
        f.lines.push_str(name);
        labels(&mut f.lines, l);
        let _ = writeln!(f.lines, " {}", fmt_value(value));
    }

    pub fn counter(
        &mut self,
        name: &'static str,
        help: &'static str,
        l: &[(&str, &str)],
        value: u64,
    ) {
        self.sample(name, help, Kind::Counter, l, value as f64);
    }

    pub fn gauge(
        &mut self,
        name: &'static str,
        help: &'static str,
        l: &[(&str, &str)],
        value: f64,
    ) {
        self.sample(name, help, Kind::Gauge, l, value);
    }

    pub fn histogram(
        &mut self,
        name: &'static str,
        help: &'static str,
        l: &[(&str, &str)],
        h: &Histogram,
    ) {
        let f = self.family(name, help, Kind::Histogram);
        let cum = h.cumulative();
        let count = h.count();
        let les: Vec<String> = LATENCY_BUCKETS
            .iter()
            .map(|b| fmt_value(*b))
            .chain(["+Inf".to_string()])
            .collect();
        for (i, le) in les.iter().enumerate() {
            let mut with_le: Vec<(&str, &str)> = l.to_vec();
            with_le.push(("le", le));
            f.lines.push_str(name);
            f.lines.push_str("_bucket");
            labels(&mut f.lines, &with_le);
            let _ = writeln!(f.lines, " {}", cum.get(i).copied().unwrap_or(count));
        }
        f.lines.push_str(name);
        f.lines.push_str("_sum");
        labels(&mut f.lines, l);
        let _ = writeln!(f.lines, " {}", fmt_value(h.sum_secs()));
        f.lines.push_str(name);
        f.lines.push_str("_count");
        labels(&mut f.lines, l);
        let _ = writeln!(f.lines, " {count}");
    }

    /// The text format (version 0.0.4).
    pub fn render(&self) -> String {
        let mut out = String::with_capacity(4096);
        for (name, f) in &self.families {
            let _ = writeln!(out, "# HELP {name} {}", f.help);
            let _ = writeln!(
                out,
                "# TYPE {name} {}",
                f.kind.unwrap_or(Kind::Gauge).as_str()
            );
            out.push_str(&f.lines);
        }
        out
    }
}

fn fmt_value(v: f64) -> String {
    if v.is_finite() && v.fract() == 0.0 && v.abs() < 1e15 {
        format!("{}", v as i64)
    } else {
        format!("{v}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_grouped_families() {
        let mut e = Exposition::default();
        e.counter("a_total", "A.", &[("x", "1")], 3);
        e.gauge("b", "B.", &[], 1.5);
        e.counter("a_total", "A.", &[("x", "2\"q")], 4);
        let h = Histogram::default();
        h.observe_nanos(2_000_000);
        e.histogram("h_seconds", "H.", &[("service", "s")], &h);
        let t = e.render();
        assert!(
            t.contains("# TYPE a_total counter\na_total{x=\"1\"} 3\na_total{x=\"2\\\"q\"} 4\n"),
            "{t}"
        );
        assert!(
            t.contains("h_seconds_bucket{service=\"s\",le=\"0.001\"} 0"),
            "{t}"
        );
        assert!(
            t.contains("h_seconds_bucket{service=\"s\",le=\"0.0025\"} 1"),
            "{t}"
        );
        assert!(t.contains("h_seconds_count{service=\"s\"} 1"), "{t}");
    }

    #[test]
    fn code_counters_clamp() {
        let c = CodeCounters::default();
        c.inc(200);
        c.inc(200);
        c.inc(999);
        assert_eq!(c.iter().collect::<Vec<_>>(), vec![(200, 2), (599, 1)]);
    }
}
