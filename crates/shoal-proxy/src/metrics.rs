//! Lock-free metric primitives, and `/metrics` through `prometheus-client`.
//!
//! Hot-path updates are single relaxed atomic adds on handles owned by the component
//! (service, instance); nothing on the request path touches the client library. At scrape
//! time the components add their current values to an [`Exposition`], which groups samples by
//! family (so several components, in several crates, can feed one family) and is encoded by
//! `prometheus-client` as a custom `Collector`: OpenMetrics text for clients that ask for it
//! (Prometheus does), the Prometheus text format 0.0.4 otherwise.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{prometheus_text, text, DescriptorEncoder, NoLabelSet};
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::Registry;

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
    fn metric_type(self) -> MetricType {
        match self {
            Kind::Counter => MetricType::Counter,
            Kind::Gauge => MetricType::Gauge,
            Kind::Histogram => MetricType::Histogram,
        }
    }
}

/// The text format of a scrape.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// The Prometheus text format, version 0.0.4 (curl, promtool, older scrapers).
    Prometheus,
    /// OpenMetrics 1.0 text, ending in `# EOF`.
    OpenMetrics,
}

impl Format {
    pub fn content_type(self) -> &'static str {
        match self {
            Format::Prometheus => prometheus_text::CONTENT_TYPE,
            Format::OpenMetrics => "application/openmetrics-text; version=1.0.0; charset=utf-8",
        }
    }

    /// The format an `Accept` header prefers: OpenMetrics when it is acceptable and weighs at
    /// least as much as `text/plain` (Prometheus asks for it first), else 0.0.4.
    pub fn negotiate(accept: Option<&str>) -> Format {
        let Some(accept) = accept else {
            return Format::Prometheus;
        };
        let (mut om, mut text) = (0.0f32, 0.0f32);
        for item in accept.split(',') {
            let mut parts = item.split(';').map(str::trim);
            let media = parts.next().unwrap_or("").to_ascii_lowercase();
            let q = parts
                .filter_map(|p| p.strip_prefix("q="))
                .find_map(|q| q.parse::<f32>().ok())
                .unwrap_or(1.0);
            match media.as_str() {
                "application/openmetrics-text" => om = om.max(q),
                "text/plain" | "text/*" | "*/*" => text = text.max(q),
                _ => {}
            }
        }
        if om > 0.0 && om >= text {
            Format::OpenMetrics
        } else {
            Format::Prometheus
        }
    }
}

/// `shoal_dependency_up{dependency}`: 1 while shoal reaches an external dependency (the cache's
/// Redis tier, a scaling source's Prometheus, a queue's broker), 0 while it does not.
pub const DEPENDENCY_UP: &str = "shoal_dependency_up";
const DEPENDENCY_UP_HELP: &str =
    "1 while shoal reaches the external dependency (redis, prometheus, the broker), else 0.";

#[derive(Debug, Clone)]
enum Point {
    Scalar(f64),
    Histogram {
        /// Per-bucket (not cumulative) counts, one per [`LATENCY_BUCKETS`] bound.
        buckets: [u64; LATENCY_BUCKETS.len()],
        count: u64,
        sum: f64,
    },
}

type Labels = Vec<(String, String)>;

#[derive(Debug)]
struct Family {
    help: &'static str,
    kind: Kind,
    samples: Vec<(Labels, Point)>,
}

/// Samples from many components, grouped by family; encoded by `prometheus-client`.
#[derive(Debug, Default)]
pub struct Exposition {
    families: BTreeMap<&'static str, Family>,
}

fn owned(l: &[(&str, &str)]) -> Labels {
    l.iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

impl Exposition {
    fn family(&mut self, name: &'static str, help: &'static str, kind: Kind) -> &mut Family {
        debug_assert!(
            kind != Kind::Counter || name.ends_with("_total"),
            "counter {name} must end in _total"
        );
        let f = self.families.entry(name).or_insert_with(|| Family {
            help,
            kind,
            samples: Vec::new(),
        });
        f.help = help;
        f
    }

    /// Declares a family with no samples yet (so it is present in every scrape).
    pub fn declare(&mut self, name: &'static str, help: &'static str, kind: Kind) {
        self.family(name, help, kind);
    }

    /// A counter (names end in `_total`) or gauge sample.
    pub fn sample(
        &mut self,
        name: &'static str,
        help: &'static str,
        kind: Kind,
        l: &[(&str, &str)],
        value: f64,
    ) {
        self.family(name, help, kind)
            .samples
            .push((owned(l), Point::Scalar(value)));
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
        let buckets = std::array::from_fn(|i| h.buckets[i].load(Ordering::Relaxed));
        let point = Point::Histogram {
            buckets,
            // At least the buckets' sum: an observation racing the scrape must not leave
            // +Inf below a finite bucket.
            count: h.count().max(buckets.iter().sum()),
            sum: h.sum_secs(),
        };
        self.family(name, help, Kind::Histogram)
            .samples
            .push((owned(l), point));
    }

    /// Reports whether `dependency` is reachable ([`DEPENDENCY_UP`]). Any crate may report
    /// any dependency; when several parts of shoal report the same one (two services on one
    /// Prometheus), it is up only if all of them reach it.
    pub fn dependency_up(&mut self, dependency: &str, up: bool) {
        let f = self.family(DEPENDENCY_UP, DEPENDENCY_UP_HELP, Kind::Gauge);
        let value = if up { 1.0 } else { 0.0 };
        match f
            .samples
            .iter_mut()
            .find(|(l, _)| l.first().is_some_and(|(_, d)| d == dependency))
        {
            Some((_, Point::Scalar(v))) => *v = v.min(value),
            _ => f.samples.push((
                vec![("dependency".into(), dependency.into())],
                Point::Scalar(value),
            )),
        }
    }

    /// Encodes every family in `format`.
    pub fn render_as(self, format: Format) -> String {
        let mut registry = Registry::default();
        registry.register_collector(Box::new(self));
        let mut out = String::with_capacity(16 * 1024);
        let done = match format {
            Format::Prometheus => prometheus_text::encode(&mut out, &registry),
            Format::OpenMetrics => text::encode(&mut out, &registry),
        };
        // Writing to a String fails only if a metric refuses its value; those are ours.
        debug_assert!(done.is_ok(), "encoding metrics: {out}");
        out
    }

    /// The Prometheus text format (version 0.0.4).
    pub fn render(self) -> String {
        self.render_as(Format::Prometheus)
    }
}

/// Integers print without a fraction in both formats (`1`, not `1.0`).
fn whole(v: f64) -> Option<i64> {
    (v.fract() == 0.0 && v.abs() < 9.0e15).then_some(v as i64)
}

impl Collector for Exposition {
    fn encode(&self, mut encoder: DescriptorEncoder<'_>) -> Result<(), std::fmt::Error> {
        for (name, f) in &self.families {
            // prometheus-client appends `_total` to counters itself.
            let base = match f.kind {
                Kind::Counter => name.strip_suffix("_total").unwrap_or(name),
                _ => name,
            };
            let mut family = encoder.encode_descriptor(base, f.help, None, f.kind.metric_type())?;
            for (labels, point) in &f.samples {
                let mut m = family.encode_family(labels)?;
                match (f.kind, point) {
                    (Kind::Counter, Point::Scalar(v)) => match whole(*v) {
                        Some(n) if n >= 0 => {
                            m.encode_counter::<NoLabelSet, u64, u64>(&(n as u64), None)?
                        }
                        _ => m.encode_counter::<NoLabelSet, f64, f64>(v, None)?,
                    },
                    (Kind::Gauge, Point::Scalar(v)) => match whole(*v) {
                        Some(n) => m.encode_gauge(&n)?,
                        None => m.encode_gauge(v)?,
                    },
                    (
                        Kind::Histogram,
                        Point::Histogram {
                            buckets,
                            count,
                            sum,
                        },
                    ) => {
                        // Per-bucket counts, the last one +Inf (beyond every bound).
                        let finite: u64 = buckets.iter().sum();
                        let b: [(f64, u64); LATENCY_BUCKETS.len() + 1] =
                            std::array::from_fn(|i| match LATENCY_BUCKETS.get(i) {
                                Some(&bound) => (bound, buckets[i]),
                                None => (f64::INFINITY, count - finite),
                            });
                        m.encode_histogram::<NoLabelSet>(*sum, *count, &b, None)?
                    }
                    // A sample of another kind than its family's first: not encodable there.
                    _ => {}
                }
            }
        }
        Ok(())
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
    fn openmetrics_names_counters_by_family_and_ends_in_eof() {
        let mut e = Exposition::default();
        e.counter("a_total", "A.", &[("x", "1")], 3);
        e.gauge("b", "B.", &[("y", "z")], 2.0);
        e.declare("c_total", "Nothing yet.", Kind::Counter);
        let h = Histogram::default();
        h.observe_nanos(2_000_000);
        h.observe_nanos(20_000_000_000); // beyond the last bound: only in +Inf
        e.histogram("h_seconds", "H.", &[], &h);
        let t = e.render_as(Format::OpenMetrics);
        assert!(t.contains("# TYPE a counter\na_total{x=\"1\"} 3\n"), "{t}");
        assert!(t.contains("b{y=\"z\"} 2\n"), "{t}");
        assert!(
            t.contains("# HELP c Nothing yet.\n# TYPE c counter\n"),
            "{t}"
        );
        assert!(t.contains("h_seconds_bucket{le=\"10.0\"} 1\n"), "{t}");
        assert!(t.contains("h_seconds_bucket{le=\"+Inf\"} 2\n"), "{t}");
        assert!(t.contains("h_seconds_count 2\n"), "{t}");
        assert!(t.ends_with("# EOF\n"), "{t}");
    }

    #[test]
    fn a_dependency_reported_twice_is_up_only_if_both_reach_it() {
        let mut e = Exposition::default();
        e.dependency_up("prometheus", true);
        e.dependency_up("redis", true);
        e.dependency_up("prometheus", false);
        e.dependency_up("prometheus", true);
        let t = e.render();
        assert!(
            t.contains("shoal_dependency_up{dependency=\"prometheus\"} 0\n"),
            "{t}"
        );
        assert!(
            t.contains("shoal_dependency_up{dependency=\"redis\"} 1\n"),
            "{t}"
        );
        assert_eq!(t.matches("dependency=\"prometheus\"").count(), 1, "{t}");
    }

    #[test]
    fn accept_headers_choose_the_format() {
        // What Prometheus 2.x sends.
        let prom = "application/openmetrics-text;version=1.0.0,application/openmetrics-text;version=0.0.1;q=0.75,text/plain;version=0.0.4;q=0.5,*/*;q=0.1";
        assert_eq!(Format::negotiate(Some(prom)), Format::OpenMetrics);
        assert_eq!(Format::negotiate(None), Format::Prometheus);
        assert_eq!(Format::negotiate(Some("*/*")), Format::Prometheus);
        assert_eq!(
            Format::negotiate(Some("text/plain;version=0.0.4")),
            Format::Prometheus
        );
        assert_eq!(
            Format::negotiate(Some("text/plain;q=0.9, application/openmetrics-text;q=0.5")),
            Format::Prometheus
        );
        assert_eq!(
            Format::negotiate(Some("application/openmetrics-text;q=0")),
            Format::Prometheus
        );
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
