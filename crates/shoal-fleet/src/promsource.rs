//! An external Prometheus as a scaling metric source, with KEDA's prometheus scaler semantics:
//! a PromQL query whose single value is the fleet's total load, and a target per instance
//! (HPA `AverageValue`: desired = ceil(value / target)).
//!
//! The query runs on its own task every evaluation interval, so a slow Prometheus never delays
//! the autoscaler; the autoscaler reads the newest value. A failed, slow (over `timeout`),
//! empty, multi-series or non-finite answer clears the value: the policy then sees the metric
//! as missing and holds the current size; it never scales down on missing data. Every failure
//! is logged and counted in `shoal_autoscale_source_errors_total`.

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Empty, Limited};
use hyper_util::rt::TokioIo;
use serde::Deserialize;
use shoal_proxy::metrics::{Counter, Exposition};
use tokio::net::TcpStream;

/// Where and what to ask: `[services.NAME.autoscale] targets = [{ metric = "prometheus",
/// server = "http://127.0.0.1:9090", query = "...", target = 50 }]`.
#[derive(Debug, Clone, PartialEq)]
pub struct PromSpec {
    /// `host:port` of the server.
    pub authority: String,
    /// Path prefix (for a Prometheus served under a sub-path, e.g. `/prometheus`), no trailing `/`.
    pub prefix: String,
    pub query: String,
    /// A query that has not answered by then counts as failed.
    pub timeout: Duration,
}

impl PromSpec {
    /// Parses `http://host:port[/prefix]`. Only plain HTTP: shoal carries no TLS client.
    pub fn parse_server(server: &str) -> Result<(String, String), String> {
        let rest = server.strip_prefix("http://").ok_or_else(|| {
            if server.starts_with("https://") {
                "https is not supported: reach Prometheus over http (e.g. a local sidecar)"
                    .to_string()
            } else {
                format!("{server:?} is not an http:// URL")
            }
        })?;
        let (authority, prefix) = match rest.find('/') {
            Some(i) => (&rest[..i], rest[i..].trim_end_matches('/')),
            None => (rest, ""),
        };
        let port_ok = authority
            .rsplit_once(':')
            .is_some_and(|(h, p)| !h.is_empty() && p.parse::<u16>().is_ok_and(|p| p > 0));
        if !port_ok {
            return Err(format!(
                "{server:?}: expected http://HOST:PORT[/PATH] with an explicit port"
            ));
        }
        if prefix.contains(['?', '#']) {
            return Err(format!("{server:?}: no query or fragment allowed"));
        }
        Ok((authority.to_string(), prefix.to_string()))
    }
}

/// Why a query gave no value.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum QueryError {
    #[error("cannot reach Prometheus: {0}")]
    Connect(String),
    #[error("no answer within {0:?}")]
    Timeout(Duration),
    #[error("HTTP {0}: {1}")]
    Status(u16, String),
    #[error("bad answer: {0}")]
    Invalid(String),
    #[error("query returned no series")]
    Empty,
    #[error("query returned {0} series: aggregate it to one (e.g. sum(...))")]
    Multiple(usize),
    #[error("query returned a non-finite value ({0})")]
    NotFinite(String),
}

impl QueryError {
    /// The `kind` label of the error counter.
    pub fn kind(&self) -> &'static str {
        match self {
            QueryError::Connect(_) => "connect",
            QueryError::Timeout(_) => "timeout",
            QueryError::Status(..) => "status",
            QueryError::Invalid(_) => "invalid",
            QueryError::Empty => "empty",
            QueryError::Multiple(_) => "multiple",
            QueryError::NotFinite(_) => "not_finite",
        }
    }
    /// True when the server itself failed (unreachable, too slow, 5xx), as opposed to an
    /// answer about the query (empty, several series, a 4xx for bad PromQL).
    pub fn server_down(&self) -> bool {
        match self {
            QueryError::Connect(_) | QueryError::Timeout(_) => true,
            QueryError::Status(code, _) => *code >= 500,
            _ => false,
        }
    }

    const KINDS: [&'static str; 7] = [
        "connect",
        "timeout",
        "status",
        "invalid",
        "empty",
        "multiple",
        "not_finite",
    ];
}

#[derive(Deserialize)]
struct Answer {
    status: String,
    #[serde(default)]
    error: Option<String>,
    #[serde(default)]
    data: Option<Data>,
}

#[derive(Deserialize)]
#[serde(tag = "resultType", content = "result", rename_all = "lowercase")]
enum Data {
    Vector(Vec<VecSample>),
    Scalar((f64, String)),
    Matrix(serde::de::IgnoredAny),
    String(serde::de::IgnoredAny),
}

#[derive(Deserialize)]
struct VecSample {
    value: (f64, String),
}

/// The single value of an instant query's JSON answer (`/api/v1/query`).
pub fn parse_answer(body: &[u8]) -> Result<f64, QueryError> {
    let a: Answer = serde_json::from_slice(body).map_err(|e| QueryError::Invalid(e.to_string()))?;
    if a.status != "success" {
        return Err(QueryError::Invalid(
            a.error.unwrap_or_else(|| format!("status {}", a.status)),
        ));
    }
    let raw = match a.data {
        Some(Data::Vector(v)) => match v.len() {
            0 => return Err(QueryError::Empty),
            1 => v.into_iter().next().map(|s| s.value.1).unwrap_or_default(),
            n => return Err(QueryError::Multiple(n)),
        },
        Some(Data::Scalar((_, v))) => v,
        Some(Data::Matrix(_)) => {
            return Err(QueryError::Invalid(
                "a range vector: use an instant query".into(),
            ))
        }
        Some(Data::String(_)) | None => {
            return Err(QueryError::Invalid("not a number".into()));
        }
    };
    // Prometheus writes NaN and ±Inf as strings; Rust's parser takes them too.
    let v: f64 = raw
        .parse()
        .map_err(|_| QueryError::Invalid(format!("value {raw:?}")))?;
    if v.is_finite() {
        Ok(v)
    } else {
        Err(QueryError::NotFinite(raw))
    }
}

/// Percent-encodes a query parameter value (RFC 3986 unreserved characters kept).
fn encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len() * 3);
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// One instant query over a fresh HTTP/1.1 connection, bounded by `spec.timeout`.
pub async fn query(spec: &PromSpec) -> Result<f64, QueryError> {
    let uri = format!("{}/api/v1/query?query={}", spec.prefix, encode(&spec.query));
    let body = get(&spec.authority, &uri, spec.timeout, 1 << 20).await?;
    parse_answer(&body)
}

/// A range query (`/api/v1/query_range`) summed over its series: `(epoch seconds, value)`
/// per step, oldest first. `server` is `http://HOST:PORT[/PATH]`.
pub async fn query_range(
    server: &str,
    query: &str,
    start: f64,
    end: f64,
    step: f64,
    timeout: Duration,
) -> Result<Vec<(f64, f64)>, QueryError> {
    let (authority, prefix) = PromSpec::parse_server(server).map_err(QueryError::Invalid)?;
    let uri = format!(
        "{prefix}/api/v1/query_range?query={}&start={start:.3}&end={end:.3}&step={step}",
        encode(query)
    );
    let body = get(&authority, &uri, timeout, 256 << 20).await?;
    parse_range(&body)
}

#[derive(Deserialize)]
struct RangeAnswer {
    status: String,
    #[serde(default)]
    error: Option<String>,
    #[serde(default)]
    data: Option<RangeData>,
}

#[derive(Deserialize)]
struct RangeData {
    result: Vec<RangeSeries>,
}

#[derive(Deserialize)]
struct RangeSeries {
    values: Vec<(f64, String)>,
}

/// The points of a range query's JSON answer, summed over series per timestamp; steps
/// where every series is missing or not finite are left out.
pub fn parse_range(body: &[u8]) -> Result<Vec<(f64, f64)>, QueryError> {
    let a: RangeAnswer =
        serde_json::from_slice(body).map_err(|e| QueryError::Invalid(e.to_string()))?;
    if a.status != "success" {
        return Err(QueryError::Invalid(
            a.error.unwrap_or_else(|| format!("status {}", a.status)),
        ));
    }
    let mut sums: BTreeMap<i64, f64> = BTreeMap::new();
    for series in a.data.map(|d| d.result).unwrap_or_default() {
        for (t, v) in series.values {
            if let Ok(v) = v.parse::<f64>() {
                if v.is_finite() {
                    *sums.entry((t * 1000.0).round() as i64).or_default() += v;
                }
            }
        }
    }
    if sums.is_empty() {
        return Err(QueryError::Empty);
    }
    Ok(sums
        .into_iter()
        .map(|(ms, v)| (ms as f64 / 1000.0, v))
        .collect())
}

/// `GET uri` over a fresh HTTP/1.1 connection to `authority`, bounded by `timeout`; the
/// body of a 2xx answer (at most `limit` bytes).
async fn get(
    authority: &str,
    uri: &str,
    timeout: Duration,
    limit: usize,
) -> Result<Bytes, QueryError> {
    let fut = async {
        let stream = TcpStream::connect(authority)
            .await
            .map_err(|e| QueryError::Connect(e.to_string()))?;
        let _ = stream.set_nodelay(true);
        let (mut send, conn) =
            hyper::client::conn::http1::handshake::<_, Empty<Bytes>>(TokioIo::new(stream))
                .await
                .map_err(|e| QueryError::Connect(e.to_string()))?;
        tokio::spawn(async move {
            let _ = conn.await;
        });
        let req = http::Request::get(uri)
            .header(http::header::HOST, authority)
            .header(http::header::USER_AGENT, "shoal-autoscaler")
            .header(http::header::ACCEPT, "application/json")
            .header(http::header::CONNECTION, "close")
            .body(Empty::new())
            .map_err(|e| QueryError::Invalid(e.to_string()))?;
        let resp = send
            .send_request(req)
            .await
            .map_err(|e| QueryError::Connect(e.to_string()))?;
        let status = resp.status();
        let body = Limited::new(resp.into_body(), limit)
            .collect()
            .await
            .map_err(|e| QueryError::Invalid(format!("reading the answer: {e}")))?
            .to_bytes();
        // Prometheus answers 400/422 with a JSON error worth showing.
        if !status.is_success() {
            let msg = serde_json::from_slice::<Answer>(&body)
                .ok()
                .and_then(|a| a.error)
                .unwrap_or_else(|| String::from_utf8_lossy(&body).chars().take(200).collect());
            return Err(QueryError::Status(status.as_u16(), msg));
        }
        Ok(body)
    };
    match tokio::time::timeout(timeout, fut).await {
        Ok(r) => r,
        Err(_) => Err(QueryError::Timeout(timeout)),
    }
}

/// The newest reading and the error counters; shared by the polling task and the autoscaler.
pub struct PromSource {
    pub spec: PromSpec,
    service: String,
    interval: Duration,
    last: Mutex<Reading>,
    errors: [Counter; QueryError::KINDS.len()],
}

#[derive(Default)]
struct Reading {
    value: Option<(f64, Instant)>,
    error: Option<QueryError>,
    /// Whether the newest query reached a working server; None before the first.
    up: Option<bool>,
}

impl PromSource {
    /// A source polled every `interval` (the autoscaler's evaluation interval, at least 1 s).
    pub fn new(service: &str, spec: PromSpec, interval: Duration) -> PromSource {
        PromSource {
            spec,
            service: service.to_string(),
            interval: interval.max(Duration::from_secs(1)),
            last: Mutex::new(Reading::default()),
            errors: Default::default(),
        }
    }

    /// The value if the newest query succeeded and is recent (two polls plus the timeout):
    /// a stuck poller must not leave an old value steering the fleet.
    pub fn value(&self, now: Instant) -> Option<f64> {
        let max_age = self.interval * 2 + self.spec.timeout;
        let r = self.last.lock().expect("prometheus reading lock");
        r.value
            .filter(|(_, at)| now.saturating_duration_since(*at) <= max_age)
            .map(|(v, _)| v)
    }

    /// Records one query's outcome.
    pub fn record(&self, at: Instant, result: Result<f64, QueryError>) {
        let mut r = self.last.lock().expect("prometheus reading lock");
        match result {
            Ok(v) => {
                if r.error.is_some() {
                    tracing::info!(service = %self.service, value = v, "prometheus scaling metric back");
                }
                *r = Reading {
                    value: Some((v, at)),
                    error: None,
                    up: Some(true),
                };
            }
            Err(e) => {
                let i = QueryError::KINDS
                    .iter()
                    .position(|k| *k == e.kind())
                    .unwrap_or(0);
                self.errors[i].inc();
                // Log a change of condition, not every poll of a long outage.
                if r.error.as_ref() != Some(&e) {
                    tracing::warn!(service = %self.service, query = %self.spec.query, error = %e,
                        "prometheus scaling metric unavailable: holding the fleet's size");
                }
                *r = Reading {
                    value: None,
                    up: Some(!e.server_down()),
                    error: Some(e),
                };
            }
        }
    }

    /// The newest error, for the API.
    pub fn last_error(&self) -> Option<String> {
        let r = self.last.lock().expect("prometheus reading lock");
        r.error.as_ref().map(|e| e.to_string())
    }

    /// Polls until `stop` flips.
    pub async fn run(self: std::sync::Arc<Self>, mut stop: tokio::sync::watch::Receiver<bool>) {
        let mut tick = tokio::time::interval(self.interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                _ = shoal_proxy::server::stopped(&mut stop) => return,
            }
            let r = tokio::select! {
                r = query(&self.spec) => r,
                _ = shoal_proxy::server::stopped(&mut stop) => return,
            };
            self.record(Instant::now(), r);
        }
    }

    pub fn collect(&self, e: &mut Exposition) {
        let svc = self.service.as_str();
        for (k, c) in QueryError::KINDS.iter().zip(&self.errors) {
            e.counter(
                "shoal_autoscale_source_errors_total",
                "Failed queries of an external scaling metric source, by kind.",
                &[("service", svc), ("source", "prometheus"), ("kind", k)],
                c.get(),
            );
        }
        let up = self.last.lock().expect("prometheus reading lock").up;
        if let Some(up) = up {
            e.dependency_up("prometheus", up);
        }
        if let Some(v) = self.value(Instant::now()) {
            e.gauge(
                "shoal_autoscale_source_value",
                "The newest value of an external scaling metric (the fleet's total).",
                &[("service", svc), ("source", "prometheus")],
                v,
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn answers_parse_to_one_value_or_a_reason() {
        let v = br#"{"status":"success","data":{"resultType":"vector","result":[{"metric":{},"value":[1700000000.1,"42.5"]}]}}"#;
        assert_eq!(parse_answer(v), Ok(42.5));
        let s = br#"{"status":"success","data":{"resultType":"scalar","result":[1700000000,"7"]}}"#;
        assert_eq!(parse_answer(s), Ok(7.0));
        let empty = br#"{"status":"success","data":{"resultType":"vector","result":[]}}"#;
        assert_eq!(parse_answer(empty), Err(QueryError::Empty));
        let two = br#"{"status":"success","data":{"resultType":"vector","result":[{"metric":{"a":"1"},"value":[1,"1"]},{"metric":{"a":"2"},"value":[1,"2"]}]}}"#;
        assert_eq!(parse_answer(two), Err(QueryError::Multiple(2)));
        let nan = br#"{"status":"success","data":{"resultType":"vector","result":[{"metric":{},"value":[1,"NaN"]}]}}"#;
        assert_eq!(parse_answer(nan), Err(QueryError::NotFinite("NaN".into())));
        let inf = br#"{"status":"success","data":{"resultType":"scalar","result":[1,"+Inf"]}}"#;
        assert!(matches!(parse_answer(inf), Err(QueryError::NotFinite(_))));
        let err = br#"{"status":"error","errorType":"bad_data","error":"parse error at char 4"}"#;
        assert_eq!(
            parse_answer(err),
            Err(QueryError::Invalid("parse error at char 4".into()))
        );
        assert!(matches!(
            parse_answer(b"<html>"),
            Err(QueryError::Invalid(_))
        ));
        let m = br#"{"status":"success","data":{"resultType":"matrix","result":[]}}"#;
        assert!(matches!(parse_answer(m), Err(QueryError::Invalid(_))));
    }

    #[test]
    fn range_answers_sum_their_series_per_step() {
        let m = br#"{"status":"success","data":{"resultType":"matrix","result":[
            {"metric":{"i":"1"},"values":[[100,"1.5"],[115,"2"],[130,"NaN"]]},
            {"metric":{"i":"2"},"values":[[115,"3"],[130,"4"]]}]}}"#;
        assert_eq!(
            parse_range(m),
            Ok(vec![(100.0, 1.5), (115.0, 5.0), (130.0, 4.0)])
        );
        let empty = br#"{"status":"success","data":{"resultType":"matrix","result":[]}}"#;
        assert_eq!(parse_range(empty), Err(QueryError::Empty));
        let err = br#"{"status":"error","error":"bad step"}"#;
        assert_eq!(
            parse_range(err),
            Err(QueryError::Invalid("bad step".into()))
        );
    }

    #[test]
    fn server_urls() {
        assert_eq!(
            PromSpec::parse_server("http://127.0.0.1:9090"),
            Ok(("127.0.0.1:9090".into(), String::new()))
        );
        assert_eq!(
            PromSpec::parse_server("http://prom.internal:80/prometheus/"),
            Ok(("prom.internal:80".into(), "/prometheus".into()))
        );
        assert!(PromSpec::parse_server("https://p:9090")
            .unwrap_err()
            .contains("https"));
        assert!(PromSpec::parse_server("http://p").is_err());
        assert!(PromSpec::parse_server("p:9090").is_err());
        assert!(PromSpec::parse_server("http://:9090").is_err());
    }

    fn source() -> PromSource {
        let spec = PromSpec {
            authority: "127.0.0.1:1".into(),
            prefix: String::new(),
            query: "up".into(),
            timeout: Duration::from_secs(2),
        };
        PromSource::new("web", spec, Duration::from_secs(1))
    }

    #[test]
    fn a_failure_clears_the_value_and_old_values_expire() {
        let s = source();
        let t0 = Instant::now();
        assert_eq!(s.value(t0), None);
        // Not asked yet: neither up nor down.
        let mut e = Exposition::default();
        s.collect(&mut e);
        assert!(!e.render().contains("shoal_dependency_up{"));
        s.record(t0, Ok(12.0));
        assert_eq!(s.value(t0 + Duration::from_secs(3)), Some(12.0));
        // Two polls plus the timeout without a new reading: stale.
        assert_eq!(s.value(t0 + Duration::from_secs(5)), None);
        s.record(t0, Ok(12.0));
        s.record(t0, Err(QueryError::Empty));
        assert_eq!(s.value(t0), None);
        assert_eq!(s.last_error().as_deref(), Some("query returned no series"));
        let mut e = Exposition::default();
        s.collect(&mut e);
        let text = e.render();
        assert!(
            text.contains(r#"shoal_autoscale_source_errors_total{service="web",source="prometheus",kind="empty"} 1"#),
            "{text}"
        );
        // An empty answer is about the query: the server is up.
        assert!(
            text.contains(r#"shoal_dependency_up{dependency="prometheus"} 1"#),
            "{text}"
        );
        s.record(t0, Ok(3.0));
        assert_eq!(s.value(t0), Some(3.0));
        assert_eq!(s.last_error(), None);
        for (err, up) in [
            (QueryError::Connect("refused".into()), 0),
            (QueryError::Timeout(Duration::from_secs(2)), 0),
            (QueryError::Status(503, "overloaded".into()), 0),
            (QueryError::Status(400, "bad_data".into()), 1),
            (QueryError::Multiple(2), 1),
        ] {
            s.record(t0, Err(err.clone()));
            let mut e = Exposition::default();
            s.collect(&mut e);
            let want = format!("shoal_dependency_up{{dependency=\"prometheus\"}} {up}\n");
            assert!(e.render().contains(&want), "{err:?}: want {want}");
        }
    }

    #[tokio::test]
    async fn a_slow_server_times_out_and_a_closed_port_fails() {
        // Accepts but never answers.
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let hold = tokio::spawn(async move {
            let mut kept = Vec::new();
            while let Ok((s, _)) = l.accept().await {
                kept.push(s);
            }
        });
        let spec = PromSpec {
            authority: addr.to_string(),
            prefix: String::new(),
            query: "sum(x)".into(),
            timeout: Duration::from_millis(200),
        };
        assert_eq!(
            query(&spec).await,
            Err(QueryError::Timeout(Duration::from_millis(200)))
        );
        hold.abort();
        let closed = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = closed.local_addr().unwrap().port();
        drop(closed);
        let spec = PromSpec {
            authority: format!("127.0.0.1:{port}"),
            ..spec
        };
        assert!(matches!(query(&spec).await, Err(QueryError::Connect(_))));
    }

    #[test]
    fn queries_are_percent_encoded() {
        assert_eq!(
            encode(r#"sum(rate(x{a="b"}[1m]))"#),
            "sum%28rate%28x%7Ba%3D%22b%22%7D%5B1m%5D%29%29"
        );
    }
}
