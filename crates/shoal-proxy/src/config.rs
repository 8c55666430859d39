//! Configuration: raw TOML (serde) → validated [`Config`].
//!
//! Errors name the file, line and field: serde errors carry the TOML span, and the
//! cross-field checks keep the spans of the fields they look at.

use std::collections::BTreeMap;
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use serde::de::{self, Deserializer};
use serde::Deserialize;
use shoal_balance::Algorithm;
use toml::Spanned;

pub use crate::hygiene::Cidr;

/// A configuration error: where it is and what is wrong.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    pub file: String,
    pub line: usize,
    pub field: String,
    pub message: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.line > 0 {
            write!(f, "{}:{}: ", self.file, self.line)?;
        } else {
            write!(f, "{}: ", self.file)?;
        }
        if !self.field.is_empty() {
            write!(f, "{}: ", self.field)?;
        }
        f.write_str(&self.message)
    }
}

impl std::error::Error for ConfigError {}

/// A duration written as `"500ms"`, `"2s"`, `"5m"`, `"1h"` (or a bare number of seconds).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Dur(pub Duration);

impl FromStr for Dur {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        parse_duration(s).map(Dur)
    }
}

/// Splits `"1.5GiB"` into `(1.5, "GiB")`; None if it does not start with a number.
fn number_and_unit(s: &str) -> Option<(f64, &str)> {
    let split = s
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    Some((num.parse().ok()?, unit.trim()))
}

/// Parses `"250ms"`, `"1.5s"`, `"5m"`, `"2h"`, `"10"` (seconds).
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let (n, unit) = number_and_unit(s)
        .ok_or_else(|| format!("invalid duration {s:?} (use e.g. \"500ms\", \"2s\", \"5m\")"))?;
    let secs = match unit {
        "" | "s" => n,
        "ms" => n / 1e3,
        "us" => n / 1e6,
        "m" | "min" => n * 60.0,
        "h" => n * 3600.0,
        "d" => n * 86400.0,
        other => return Err(format!("invalid duration unit {other:?} in {s:?}")),
    };
    // Beyond ~30 years a "timeout" is a typo; it would also overflow nanosecond clocks.
    if !secs.is_finite() || !(0.0..=1e9).contains(&secs) {
        return Err(format!("duration {s:?} out of range"));
    }
    Ok(Duration::from_secs_f64(secs))
}

/// Parses a byte size: `"64MiB"`, `"512KiB"`, `"1GiB"`, `"1000"`, `"10MB"`.
pub fn parse_size(s: &str) -> Result<u64, String> {
    let s = s.trim();
    let (n, unit) =
        number_and_unit(s).ok_or_else(|| format!("invalid size {s:?} (use e.g. \"64MiB\")"))?;
    let mult: f64 = match unit.to_ascii_lowercase().as_str() {
        "" | "b" => 1.0,
        "k" | "kb" => 1e3,
        "kib" | "ki" => 1024.0,
        "m" | "mb" => 1e6,
        "mib" | "mi" => 1024.0 * 1024.0,
        "g" | "gb" => 1e9,
        "gib" | "gi" => 1024.0 * 1024.0 * 1024.0,
        other => return Err(format!("invalid size unit {other:?} in {s:?}")),
    };
    Ok((n * mult) as u64)
}

impl<'de> Deserialize<'de> for Dur {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            N(f64),
            S(String),
        }
        match Raw::deserialize(d)? {
            Raw::N(n) if (0.0..=1e9).contains(&n) => Ok(Dur(Duration::from_secs_f64(n))),
            Raw::N(n) => Err(de::Error::custom(format!("duration {n} out of range"))),
            Raw::S(s) => s.parse().map_err(de::Error::custom),
        }
    }
}

/// A balance algorithm name, checked at parse time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AlgoName(pub Algorithm);

impl<'de> Deserialize<'de> for AlgoName {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map(AlgoName).map_err(de::Error::custom)
    }
}

/// What `consistent-hash` hashes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HashKey {
    ClientIp,
    Header(http::HeaderName),
}

impl<'de> Deserialize<'de> for HashKey {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        if s == "client-ip" {
            return Ok(HashKey::ClientIp);
        }
        match s.strip_prefix("header:") {
            Some(h) => http::HeaderName::from_bytes(h.trim().as_bytes())
                .map(HashKey::Header)
                .map_err(|_| de::Error::custom(format!("invalid header name {h:?}"))),
            None => Err(de::Error::custom(format!(
                "invalid hash key {s:?} (use \"client-ip\" or \"header:NAME\")"
            ))),
        }
    }
}

/// One backend: `"127.0.0.1:9001"` or `{ addr = "127.0.0.1:9001", weight = 2 }`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BackendSpec {
    pub addr: SocketAddr,
    pub weight: u32,
}

impl<'de> Deserialize<'de> for BackendSpec {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(deny_unknown_fields)]
        struct Full {
            addr: SocketAddr,
            #[serde(default = "one")]
            weight: u32,
        }
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            S(String),
            T(Full),
        }
        match Raw::deserialize(d)? {
            Raw::S(s) => s
                .parse()
                .map(|addr| BackendSpec { addr, weight: 1 })
                .map_err(|_| de::Error::custom(format!("invalid backend address {s:?}"))),
            Raw::T(f) => Ok(BackendSpec {
                addr: f.addr,
                weight: f.weight,
            }),
        }
    }
}

fn one() -> u32 {
    1
}

/// Active health checks (HAProxy `check` / Envoy health checking).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct HealthConfig {
    /// Path requested with GET; 2xx/3xx counts as a pass.
    pub path: String,
    /// Time between probes of one instance.
    pub interval: Dur,
    /// A probe without an answer by then fails.
    pub timeout: Dur,
    /// Consecutive passes that make an instance healthy.
    pub rise: u32,
    /// Consecutive failures that make an instance unhealthy.
    pub fall: u32,
    /// `"http"` (GET `path`) or `"grpc"`: `grpc.health.v1.Health/Check` for `grpc_service`
    /// over the cluster's HTTP/2; only SERVING passes.
    pub kind: HealthKind,
    /// The service name asked about (`""`: the server as a whole).
    pub grpc_service: String,
}

/// How an active health check asks.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum HealthKind {
    #[default]
    Http,
    Grpc,
}

impl Default for HealthConfig {
    fn default() -> Self {
        HealthConfig {
            path: "/healthz".into(),
            interval: Dur(Duration::from_secs(2)),
            timeout: Dur(Duration::from_secs(1)),
            rise: 2,
            fall: 3,
            kind: HealthKind::Http,
            grpc_service: String::new(),
        }
    }
}

/// Passive outlier ejection (Envoy outlier detection).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct OutlierConfig {
    /// Consecutive connect errors or 5xx answers that eject an instance (0 disables).
    pub consecutive_errors: u32,
    /// First ejection time; the n-th ejection lasts n times as long.
    pub base_ejection: Dur,
    /// Cap on one ejection.
    pub max_ejection: Dur,
    /// At most this share of a pool is ejected at once.
    pub max_ejected_percent: u32,
}

impl Default for OutlierConfig {
    fn default() -> Self {
        OutlierConfig {
            consecutive_errors: 5,
            base_ejection: Dur(Duration::from_secs(10)),
            max_ejection: Dur(Duration::from_secs(300)),
            max_ejected_percent: 50,
        }
    }
}

/// Timeouts of one service.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TimeoutConfig {
    /// Upstream TCP connect.
    pub connect: Dur,
    /// One try, up to the upstream's response headers.
    pub per_try: Dur,
    /// The whole request up to response headers, retries included (→ 504).
    pub request: Dur,
    /// Client must send a complete request head within this (slowloris).
    pub header_read: Dur,
    /// A client connection with no request in flight is closed after this.
    pub idle: Dur,
    /// Longest wait for a draining instance's in-flight requests.
    pub drain: Dur,
    /// Longest pause between two reads of a client's request body (→ 408).
    pub body_read: Dur,
    /// Longest pause between two reads of an instance's response body (→ connection closed).
    pub upstream_read: Dur,
    /// A client that takes no response bytes for this long is disconnected.
    pub client_write: Dur,
    /// Idle upstream keep-alive connections are closed after this (shorter than common
    /// backend keep-alive timeouts, so shoal never reuses one the instance is closing).
    pub upstream_idle: Dur,
}

impl Default for TimeoutConfig {
    fn default() -> Self {
        TimeoutConfig {
            connect: Dur(Duration::from_secs(2)),
            per_try: Dur(Duration::from_secs(15)),
            request: Dur(Duration::from_secs(30)),
            header_read: Dur(Duration::from_secs(10)),
            idle: Dur(Duration::from_secs(60)),
            drain: Dur(Duration::from_secs(30)),
            body_read: Dur(Duration::from_secs(30)),
            upstream_read: Dur(Duration::from_secs(60)),
            client_write: Dur(Duration::from_secs(30)),
            upstream_idle: Dur(Duration::from_secs(4)),
        }
    }
}

/// Retry policy.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RetryConfig {
    /// Tries in total, the first included (1 disables retries).
    pub attempts: u32,
    /// Retries may add at most this percentage of extra requests...
    pub budget_percent: f64,
    /// ...plus this many retries per second.
    pub budget_min_per_second: f64,
    /// gRPC calls answered trailers-only with one of these statuses are retried (numbers
    /// or names; default `UNAVAILABLE`).
    #[serde(deserialize_with = "crate::grpc::de_codes")]
    pub grpc_codes: Vec<u32>,
}

impl Default for RetryConfig {
    fn default() -> Self {
        RetryConfig {
            attempts: 3,
            budget_percent: 20.0,
            budget_min_per_second: 10.0,
            grpc_codes: vec![crate::grpc::UNAVAILABLE],
        }
    }
}

/// Connection and request limits.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LimitConfig {
    /// Client connections open at once; further ones wait in the accept queue.
    pub max_connections: usize,
    /// Longest request target (→ 414).
    pub max_request_line: usize,
    /// Most request headers (→ 431).
    pub max_headers: usize,
    /// Largest request head in bytes (→ 431).
    pub max_header_bytes: usize,
    /// Concurrent streams per HTTP/2 client connection.
    pub max_h2_streams: u32,
}

impl LimitConfig {
    /// The read buffer a request head must fit in (request line and headers, roughly): past
    /// it the general path answers 431, and the fast path hands over.
    pub fn max_head_bytes(&self) -> usize {
        self.max_header_bytes.max(8192) + self.max_request_line
    }
}

impl Default for LimitConfig {
    fn default() -> Self {
        LimitConfig {
            max_connections: 10_000,
            max_request_line: 8 * 1024,
            max_headers: 100,
            max_header_bytes: 64 * 1024,
            max_h2_streams: 100,
        }
    }
}

/// One service as written in the file.
#[derive(Debug, Clone, Deserialize)]
pub struct RawService {
    /// Client-facing listen address; a service without one is reached through routes.
    #[serde(default)]
    pub listen: Option<SocketAddr>,
    /// Routes by host, path prefix and method; absent: everything goes to this service.
    #[serde(default)]
    pub routes: Option<Spanned<Vec<RawRoute>>>,
    /// Peers whose `X-Forwarded-*` / `Forwarded` headers are kept and appended to (CIDRs).
    #[serde(default)]
    pub trusted_proxies: Vec<Cidr>,
    /// Forward request headers whose names contain `_` (dropped by default, as NGINX does).
    #[serde(default)]
    pub allow_underscore_headers: bool,
    /// Upgrade protocols tunneled besides WebSocket (`h2c` is never tunneled).
    #[serde(default)]
    pub allowed_upgrades: Vec<String>,
    /// One log line per request on this listener (target `shoal::access`).
    #[serde(default)]
    pub access_log: bool,
    /// Balance algorithm (see `shoal proxy --help`).
    #[serde(default = "default_algo")]
    pub balance: AlgoName,
    /// What `consistent-hash` hashes: `"client-ip"` (default) or `"header:NAME"`.
    #[serde(default = "default_hash_key")]
    pub hash_key: HashKey,
    /// Static backends.
    #[serde(default)]
    pub backends: Option<Spanned<Vec<BackendSpec>>>,
    /// Ramp a new or recovered instance's weight over this window (0 disables).
    #[serde(default = "default_slow_start")]
    pub slow_start: Dur,
    /// Active health checks; absent means passive checks only.
    #[serde(default)]
    pub health: Option<HealthConfig>,
    #[serde(default)]
    pub outlier: OutlierConfig,
    #[serde(default)]
    pub timeouts: TimeoutConfig,
    #[serde(default)]
    pub retries: Option<Spanned<RetryConfig>>,
    #[serde(default)]
    pub limits: LimitConfig,
    /// Where this listener answers job URLs (`{jobs_path}/{id}`) when it has async routes.
    #[serde(default)]
    pub jobs_path: Option<Spanned<String>>,
    /// TLS termination on this listener.
    #[serde(default)]
    pub tls: Option<Spanned<crate::tls::RawTls>>,
    /// A plain listener answering every request with a 308 to `https` on this port.
    #[serde(default)]
    pub https_redirect: Option<Spanned<u16>>,
    /// TLS to this service's instances.
    #[serde(default)]
    pub upstream_tls: Option<Spanned<crate::tls::RawUpstreamTls>>,
    /// The protocol spoken to the instances.
    #[serde(default)]
    pub protocol: Option<Spanned<Protocol>>,
    /// Extra, section-specific tables (fleet, autoscale, ...) are parsed by their owners.
    #[serde(flatten)]
    pub extra: BTreeMap<String, toml::Value>,
}

/// One route as written in the file.
#[derive(Debug, Clone, Deserialize)]
pub struct RawRoute {
    /// Host to match: `api.example.com`, `*.example.com`, or absent for any.
    #[serde(default)]
    pub host: Option<String>,
    /// Path prefix to match, on a segment boundary (`/api` matches `/api/x`, not `/apix`).
    #[serde(default = "root")]
    pub prefix: String,
    /// Methods to match; absent or empty for any.
    #[serde(default)]
    pub methods: Vec<String>,
    /// The service (upstream pool) to send to; absent: the listening service itself.
    #[serde(default)]
    pub service: Option<String>,
    /// Remove the prefix before forwarding (`/api/users` → `/users`).
    #[serde(default)]
    pub strip_prefix: bool,
    /// Replace the prefix with this before forwarding (`/api/users` → `/v2/users`).
    #[serde(default)]
    pub rewrite: Option<String>,
    /// Per-route tables owned by other parts of shoal (`cache`, `async`).
    #[serde(flatten)]
    pub extra: BTreeMap<String, toml::Value>,
}

fn root() -> String {
    "/".into()
}

/// Per-route tables owned by other parts of shoal.
pub const ROUTE_EXTRA_TABLES: &[&str] = &["cache", "async"];

/// A validated route.
#[derive(Debug, Clone, PartialEq)]
pub struct RouteConfig {
    /// Lowercase host, `*.suffix` for a wildcard, None for any.
    pub host: Option<String>,
    pub prefix: String,
    /// Uppercase method names; empty for any.
    pub methods: Vec<String>,
    /// Target service name.
    pub service: String,
    /// What replaces the matched prefix (None keeps the path as it is).
    pub replace: Option<String>,
    /// The route's cache settings (its `cache` table), if it caches.
    pub cache: Option<shoal_cache::CacheConfig>,
    pub extra: BTreeMap<String, toml::Value>,
}

/// Per-service tables owned by other parts of shoal (fleet, autoscaler).
pub const EXTRA_TABLES: &[&str] = &["fleet", "autoscale", "resources", "cache"];

fn default_algo() -> AlgoName {
    AlgoName(Algorithm::RoundRobin)
}
fn default_hash_key() -> HashKey {
    HashKey::ClientIp
}
fn default_slow_start() -> Dur {
    Dur(Duration::ZERO)
}

/// The admin listener.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AdminConfig {
    /// Loopback by default: the admin API is not for the public.
    pub listen: SocketAddr,
    /// Bearer token for mutating endpoints; `SHOAL_ADMIN_TOKEN` overrides. Unset: they are refused.
    pub token: Option<String>,
}

impl Default for AdminConfig {
    fn default() -> Self {
        AdminConfig {
            listen: "127.0.0.1:9900".parse().expect("static addr"),
            token: None,
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    /// Data-path worker threads (default: all cores).
    #[serde(default)]
    threads: Option<Spanned<usize>>,
    /// Where shoal keeps state (history, logs).
    #[serde(default)]
    data_dir: Option<PathBuf>,
    /// `text` (default) or `json`; `--log-format` overrides it.
    #[serde(default)]
    log_format: Option<Spanned<String>>,
    #[serde(default)]
    admin: AdminConfig,
    /// Memory all buffered (retriable) request bodies may use together, e.g. "64MiB".
    #[serde(default)]
    buffer_memory: Option<Spanned<String>>,
    /// The cache store every `cache` table uses: `memory = "256MiB"`, `redis = "redis://..."`.
    #[serde(default)]
    cache: Option<RawCacheStore>,
    /// Message brokers of async routes (`[brokers.NAME]`), validated by their owner.
    #[serde(default)]
    brokers: BTreeMap<String, toml::Value>,
    /// Where job results live (`[jobs]`), validated by its owner.
    #[serde(default)]
    jobs: Option<toml::Value>,
    /// Several replicas in front of one fleet (`[cluster]`), validated by its owner.
    #[serde(default)]
    cluster: Option<toml::Value>,
    #[serde(default)]
    services: BTreeMap<String, RawService>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawCacheStore {
    #[serde(default)]
    memory: Option<Spanned<String>>,
    #[serde(default)]
    fill_memory: Option<Spanned<String>>,
    #[serde(default)]
    redis: Option<Spanned<String>>,
}

/// The process-wide cache store (`[cache]`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CacheStoreConfig {
    /// Bytes the memory tier may hold.
    pub memory: u64,
    /// Response body bytes that may be held at once while they are read for storing.
    pub fill_memory: u64,
    /// The shared Redis tier, if any.
    pub redis: Option<String>,
}

/// Memory tier size when `[cache]` does not say.
pub const DEFAULT_CACHE_MEMORY: u64 = 64 << 20;

/// A validated service.
#[derive(Debug, Clone)]
pub struct ServiceConfig {
    pub name: String,
    pub listen: Option<SocketAddr>,
    /// Empty: every request to this service's listener goes to the service itself.
    pub routes: Vec<RouteConfig>,
    pub trusted_proxies: Vec<Cidr>,
    pub allow_underscore_headers: bool,
    pub allowed_upgrades: Vec<String>,
    pub access_log: bool,
    pub balance: Algorithm,
    pub hash_key: HashKey,
    pub backends: Vec<BackendSpec>,
    pub slow_start: Duration,
    pub health: Option<HealthConfig>,
    pub outlier: OutlierConfig,
    pub timeouts: TimeoutConfig,
    pub retries: RetryConfig,
    pub limits: LimitConfig,
    /// The service's own cache settings (its `cache` table), for requests it serves itself.
    pub cache: Option<shoal_cache::CacheConfig>,
    /// Where the listener answers job URLs of its async routes (default `/jobs`).
    pub jobs_path: String,
    /// TLS termination: the listener speaks HTTPS.
    pub tls: Option<crate::tls::TlsConfig>,
    /// Every request is answered 308 to `https://HOST:PORT/...` (a plain listener).
    pub https_redirect: Option<u16>,
    /// TLS to the instances (files loaded with the config).
    pub upstream_tls: Option<Arc<crate::tls::UpstreamTls>>,
    /// The protocol spoken to the instances.
    pub protocol: Protocol,
    /// Tables this crate does not own (`fleet`, `autoscale`, ...), with their source.
    pub extra: BTreeMap<String, toml::Value>,
}

impl ServiceConfig {
    /// The scheme clients use on this listener (`X-Forwarded-Proto`, `Forwarded`, cache keys).
    pub fn scheme(&self) -> &'static str {
        if self.tls.is_some() {
            "https"
        } else {
            "http"
        }
    }

    /// A service with defaults, as `shoal proxy` builds it.
    pub fn quick(name: &str, listen: SocketAddr, balance: Algorithm) -> Self {
        ServiceConfig {
            name: name.to_string(),
            listen: Some(listen),
            routes: Vec::new(),
            trusted_proxies: Vec::new(),
            allow_underscore_headers: false,
            allowed_upgrades: Vec::new(),
            access_log: false,
            balance,
            hash_key: HashKey::ClientIp,
            backends: Vec::new(),
            slow_start: Duration::ZERO,
            health: None,
            outlier: OutlierConfig::default(),
            timeouts: TimeoutConfig::default(),
            retries: RetryConfig::default(),
            limits: LimitConfig::default(),
            cache: None,
            jobs_path: crate::jobs::DEFAULT_JOBS_PATH.to_string(),
            tls: None,
            https_redirect: None,
            upstream_tls: None,
            protocol: Protocol::Http1,
            extra: BTreeMap::new(),
        }
    }
}

/// The protocol shoal speaks to a cluster's instances.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    /// HTTP/1.1 (with `upstream_tls`, over TLS).
    #[default]
    Http1,
    /// HTTP/2 over cleartext TCP (prior knowledge), as gRPC servers speak it.
    H2c,
    /// HTTP/2 over TLS (ALPN `h2`); needs `upstream_tls`.
    H2,
    /// Over TLS, what the instance picks by ALPN (`h2`, else HTTP/1.1); without TLS, HTTP/1.1.
    Auto,
}

impl Protocol {
    /// Whether requests go out as HTTP/2 (`auto` is HTTP/1.1 without TLS).
    pub fn speaks_h2(self, tls: bool) -> bool {
        match self {
            Protocol::Http1 => false,
            Protocol::H2c | Protocol::H2 => true,
            Protocol::Auto => tls,
        }
    }

    pub fn parse(s: &str) -> Result<Protocol, String> {
        match s {
            "http1" => Ok(Protocol::Http1),
            "h2c" => Ok(Protocol::H2c),
            "h2" => Ok(Protocol::H2),
            "auto" => Ok(Protocol::Auto),
            _ => Err(format!(
                "unknown protocol {s:?} (use \"http1\", \"h2c\", \"h2\" or \"auto\")"
            )),
        }
    }
}

/// How shoal writes its logs (stderr): human-readable lines or one JSON object per line.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum LogFormat {
    #[default]
    Text,
    Json,
}

impl std::str::FromStr for LogFormat {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "text" => Ok(LogFormat::Text),
            "json" => Ok(LogFormat::Json),
            _ => Err(format!(
                "unknown log format {s:?}: expected \"text\" or \"json\""
            )),
        }
    }
}

/// A validated configuration.
#[derive(Debug, Clone)]
pub struct Config {
    pub source: PathBuf,
    pub text: String,
    pub threads: Option<usize>,
    /// `log_format`, if the file sets it (read once at start: logging is set up before).
    pub log_format: Option<LogFormat>,
    pub data_dir: PathBuf,
    pub admin: AdminConfig,
    /// Budget for buffered request bodies, shared by every service.
    pub buffer_memory: u64,
    /// `[cache]`, if present.
    pub cache: Option<CacheStoreConfig>,
    /// `[brokers.NAME]` tables (async routes), as written.
    pub brokers: BTreeMap<String, toml::Value>,
    /// The `[jobs]` table (the job result store), as written.
    pub jobs: Option<toml::Value>,
    /// The `[cluster]` table (replicas: leader election, shared load), as written.
    pub cluster: Option<toml::Value>,
    pub services: Vec<ServiceConfig>,
}

/// Default [`Config::buffer_memory`].
pub const DEFAULT_BUFFER_MEMORY: u64 = 64 << 20;

/// Offset of the line starting with `key` inside the table whose header is `header`
/// (or of the header itself), for errors found after parsing.
pub fn key_offset(text: &str, header: &str, key: &str) -> usize {
    let Some(start) = text.find(header) else {
        return 0;
    };
    let mut pos = start;
    for (i, line) in text[start..].split_inclusive('\n').enumerate() {
        if i > 0 {
            let t = line.trim_start();
            if t.starts_with('[') {
                break;
            }
            if t.starts_with(key) {
                return pos;
            }
        }
        pos += line.len();
    }
    start
}

/// Maps byte offsets of the source to 1-based lines.
pub struct Locator<'a> {
    file: String,
    text: &'a str,
}

impl<'a> Locator<'a> {
    pub fn new(file: &Path, text: &'a str) -> Self {
        Locator {
            file: file.display().to_string(),
            text,
        }
    }

    pub fn line_of(&self, offset: usize) -> usize {
        let end = offset.min(self.text.len());
        self.text[..end].bytes().filter(|&b| b == b'\n').count() + 1
    }

    pub fn error(
        &self,
        span: std::ops::Range<usize>,
        field: &str,
        msg: impl Into<String>,
    ) -> ConfigError {
        ConfigError {
            file: self.file.clone(),
            line: self.line_of(span.start),
            field: field.to_string(),
            message: msg.into(),
        }
    }

    /// The dotted key path at `offset`: the nearest `[table]` header above plus the key on that line.
    pub fn field_at(&self, offset: usize) -> String {
        let end = offset.min(self.text.len());
        let before = &self.text[..end];
        let line_start = before.rfind('\n').map_or(0, |i| i + 1);
        let line = self.text[line_start..].lines().next().unwrap_or("");
        let mut table = String::new();
        for l in before[..line_start].lines() {
            let t = l.trim();
            if t.starts_with('[') {
                table = t.trim_matches(|c| c == '[' || c == ']').trim().to_string();
            }
        }
        let t = line.trim();
        if t.starts_with('[') {
            let header = t.trim_matches(|c| c == '[' || c == ']').trim();
            if !header.is_empty() {
                return header.to_string();
            }
        }
        // A comment or a line that is not `key = value` names no key.
        let key = t.split(['=', '#']).next().unwrap_or("").trim();
        let key_char = |c: char| c.is_alphanumeric() || "_-.\"' ".contains(c);
        let key = if key.chars().all(key_char) { key } else { "" };
        match (table.is_empty(), key.is_empty()) {
            (true, true) => "(top level)".to_string(),
            (true, false) => key.to_string(),
            (false, true) => table,
            (false, false) => format!("{table}.{key}"),
        }
    }

    fn toml_error(&self, e: toml::de::Error) -> ConfigError {
        let span = e.span().unwrap_or(0..0);
        ConfigError {
            file: self.file.clone(),
            line: if e.span().is_some() {
                self.line_of(span.start)
            } else {
                0
            },
            field: if e.span().is_some() {
                self.field_at(span.start)
            } else {
                String::new()
            },
            message: match e.message().trim() {
                // Some syntax errors (e.g. a control character in a comment) carry no text.
                "" => "invalid TOML syntax".to_string(),
                m => m.to_string(),
            },
        }
    }
}

impl Config {
    /// Reads and validates a config file.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|e| ConfigError {
            file: path.display().to_string(),
            line: 0,
            field: String::new(),
            message: format!("cannot read: {e}"),
        })?;
        Config::parse(path, &text)
    }

    /// Validates config text; `path` is used for messages and for resolving relative paths.
    pub fn parse(path: &Path, text: &str) -> Result<Config, ConfigError> {
        let loc = Locator::new(path, text);
        let raw: RawConfig = toml::from_str(text).map_err(|e| loc.toml_error(e))?;
        if let Some(t) = &raw.threads {
            if *t.get_ref() == 0 || *t.get_ref() > 1024 {
                return Err(loc.error(t.span(), "threads", "must be between 1 and 1024"));
            }
        }
        let services_at = text.find("[services").unwrap_or(0);
        let services_span = services_at..services_at;
        let services_map = raw.services;
        if services_map.is_empty() {
            return Err(loc.error(
                services_span,
                "services",
                "at least one [services.NAME] table is required",
            ));
        }
        let mut listens: Vec<(SocketAddr, String)> = vec![(raw.admin.listen, "admin".into())];
        let mut services = Vec::new();
        let known: Vec<String> = services_map.keys().cloned().collect();
        for (name, s) in services_map {
            let field = |f: &str| format!("services.{name}.{f}");
            if !name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
            {
                return Err(loc.error(
                    services_span.clone(),
                    &format!("services.{name}"),
                    "service names use [A-Za-z0-9_-] only",
                ));
            }
            if let Some(listen) = s.listen {
                if let Some((_, other)) = listens
                    .iter()
                    .find(|(a, _)| *a == listen && listen.port() != 0)
                {
                    let off = text.find(&listen.to_string()).unwrap_or(0);
                    return Err(loc.error(
                        off..off,
                        &field("listen"),
                        format!("address {listen} is already used by {other}"),
                    ));
                }
                listens.push((listen, format!("services.{name}")));
            }
            let routes_span = s.routes.as_ref().map_or(0..0, |r| r.span());
            let mut routes = Vec::new();
            for (i, r) in s
                .routes
                .map(|r| r.into_inner())
                .unwrap_or_default()
                .into_iter()
                .enumerate()
            {
                let rfield = |f: &str| format!("services.{name}.routes[{i}].{f}");
                // The i-th `[[services.NAME.routes]]` header, for errors inside it.
                let header = format!("[[services.{name}.routes]]");
                let at = text
                    .match_indices(&header)
                    .nth(i)
                    .map_or(routes_span.start, |(o, _)| o);
                let key_at = |k: &str| {
                    let o = key_offset(&text[at..], &header, k) + at;
                    o..o
                };
                if s.listen.is_none() {
                    return Err(loc.error(
                        at..at,
                        &format!("services.{name}.routes"),
                        "routes belong to a service with `listen`",
                    ));
                }
                if !r.prefix.starts_with('/') {
                    return Err(loc.error(
                        key_at("prefix"),
                        &rfield("prefix"),
                        "must start with '/'",
                    ));
                }
                if let Some(w) = &r.rewrite {
                    if !w.starts_with('/') {
                        return Err(loc.error(
                            key_at("rewrite"),
                            &rfield("rewrite"),
                            "must start with '/'",
                        ));
                    }
                    if r.strip_prefix {
                        return Err(loc.error(
                            key_at("rewrite"),
                            &rfield("rewrite"),
                            "use either strip_prefix or rewrite",
                        ));
                    }
                }
                if let Some(h) = &r.host {
                    let bare = h.strip_prefix("*.").unwrap_or(h);
                    if bare.is_empty()
                        || bare.contains('*')
                        || !crate::hygiene::valid_authority(bare.as_bytes())
                    {
                        return Err(loc.error(
                            key_at("host"),
                            &rfield("host"),
                            format!("invalid host {h:?} (use e.g. \"api.example.com\" or \"*.example.com\")"),
                        ));
                    }
                }
                for m in &r.methods {
                    if m.is_empty() || !m.bytes().all(|b| b.is_ascii_alphabetic()) {
                        return Err(loc.error(
                            key_at("methods"),
                            &rfield("methods"),
                            format!("invalid method {m:?}"),
                        ));
                    }
                }
                if let Some(k) = r
                    .extra
                    .keys()
                    .find(|k| !ROUTE_EXTRA_TABLES.contains(&k.as_str()))
                {
                    return Err(loc.error(key_at(k), &rfield(k), format!("unknown field `{k}`")));
                }
                let cache = match r.extra.get("cache") {
                    Some(v) => Some(crate::cache::cache_settings(v).map_err(|(k, m)| {
                        let f = if k.is_empty() {
                            "cache".to_string()
                        } else {
                            format!("cache.{k}")
                        };
                        loc.error(key_at("cache"), &rfield(&f), m)
                    })?),
                    None => None,
                };
                let target = r.service.clone().unwrap_or_else(|| name.clone());
                if !known.contains(&target) {
                    return Err(loc.error(
                        key_at("service"),
                        &rfield("service"),
                        format!("no service named {target:?}"),
                    ));
                }
                routes.push(RouteConfig {
                    host: r.host.map(|h| h.to_ascii_lowercase()),
                    prefix: r.prefix,
                    methods: r.methods.iter().map(|m| m.to_ascii_uppercase()).collect(),
                    service: target,
                    replace: if r.strip_prefix {
                        Some(String::new())
                    } else {
                        r.rewrite
                    },
                    cache,
                    extra: r.extra,
                });
            }
            if let Some(k) = s.extra.keys().find(|k| !EXTRA_TABLES.contains(&k.as_str())) {
                let off = text
                    .find(&format!("{k} "))
                    .or_else(|| text.find(k.as_str()))
                    .unwrap_or(0);
                return Err(loc.error(off..off, &field(k), format!("unknown field `{k}`")));
            }
            let cache = match s.extra.get("cache") {
                Some(v) => Some(crate::cache::cache_settings(v).map_err(|(k, m)| {
                    let header = format!("[services.{name}.cache]");
                    let off = if k.is_empty() {
                        text.find(&header).unwrap_or(0)
                    } else {
                        key_offset(text, &header, &k)
                    };
                    let f = if k.is_empty() {
                        "cache".to_string()
                    } else {
                        format!("cache.{k}")
                    };
                    loc.error(off..off, &field(&f), m)
                })?),
                None => None,
            };
            let backends_span = s.backends.as_ref().map_or(0..0, |b| b.span());
            let backends = s.backends.map(|b| b.into_inner()).unwrap_or_default();
            for b in &backends {
                if b.weight == 0 || b.weight > 10_000 {
                    return Err(loc.error(
                        backends_span.clone(),
                        &field("backends"),
                        format!("weight of {} must be 1..=10000", b.addr),
                    ));
                }
            }
            if let Some(h) = &s.health {
                if h.rise == 0 || h.fall == 0 {
                    let off = text.find("rise").unwrap_or(0);
                    return Err(loc.error(
                        off..off,
                        &field("health"),
                        "rise and fall must be at least 1",
                    ));
                }
                if !h.path.starts_with('/') {
                    let off = text.find(&h.path).unwrap_or(0);
                    return Err(loc.error(off..off, &field("health.path"), "must start with '/'"));
                }
            }
            let t = &s.timeouts;
            for (key, d) in [
                ("per_try", t.per_try),
                ("request", t.request),
                ("header_read", t.header_read),
                ("idle", t.idle),
                ("connect", t.connect),
                ("body_read", t.body_read),
                ("upstream_read", t.upstream_read),
                ("client_write", t.client_write),
                ("upstream_idle", t.upstream_idle),
            ] {
                if d.0.is_zero() {
                    let off = key_offset(text, &format!("[services.{name}.timeouts]"), key);
                    return Err(loc.error(
                        off..off,
                        &field(&format!("timeouts.{key}")),
                        "must be greater than 0",
                    ));
                }
            }
            if s.limits.max_connections == 0 || s.limits.max_headers == 0 {
                let off = key_offset(text, &format!("[services.{name}.limits]"), "max_");
                return Err(loc.error(
                    off..off,
                    &field("limits"),
                    "max_connections and max_headers must be at least 1",
                ));
            }
            let jobs_path = match s.jobs_path {
                None => crate::jobs::DEFAULT_JOBS_PATH.to_string(),
                Some(p) => {
                    let span = p.span();
                    let p = p.into_inner();
                    if let Some(why) = crate::jobs::invalid_jobs_path(&p) {
                        return Err(loc.error(span, &field("jobs_path"), why));
                    }
                    p
                }
            };
            let tls = match s.tls {
                None => None,
                Some(t) => {
                    let span = t.span();
                    if s.listen.is_none() {
                        return Err(loc.error(span, &field("tls"), "needs `listen`"));
                    }
                    let base = path.parent().unwrap_or(Path::new("."));
                    match t.into_inner().validate(base) {
                        Ok(c) => Some(c),
                        Err((f, why)) => {
                            let off = key_offset(text, &format!("[services.{name}.tls]"), f);
                            let off = if off == 0 { span.start } else { off };
                            return Err(loc.error(off..off, &field(&format!("tls.{f}")), why));
                        }
                    }
                }
            };
            let https_redirect = match s.https_redirect {
                Some(p) if tls.is_some() || s.listen.is_none() || *p.get_ref() == 0 => {
                    return Err(loc.error(
                        p.span(),
                        &field("https_redirect"),
                        "a port, on a plain listener (one with `listen` and no `tls`)",
                    ));
                }
                p => p.map(|p| p.into_inner()),
            };
            let upstream_tls = match s.upstream_tls {
                None => None,
                Some(t) => {
                    let span = t.span();
                    let base = path.parent().unwrap_or(Path::new("."));
                    match t.into_inner().build(base) {
                        Ok(c) => Some(Arc::new(c)),
                        Err((f, why)) => {
                            let header = format!("[services.{name}.upstream_tls]");
                            let off = key_offset(text, &header, f);
                            let off = if off == 0 { span.start } else { off };
                            let f = format!("upstream_tls.{f}");
                            return Err(loc.error(off..off, &field(&f), why));
                        }
                    }
                }
            };
            let protocol = match s.protocol {
                None => Protocol::Http1,
                Some(p) => {
                    let span = p.span();
                    let p = p.into_inner();
                    if p == Protocol::H2c && upstream_tls.is_some() {
                        return Err(loc.error(
                            span,
                            &field("protocol"),
                            "h2c is HTTP/2 without TLS, but the service has an [upstream_tls] table: use \"h2\" (or \"auto\")",
                        ));
                    }
                    if p == Protocol::H2 && upstream_tls.is_none() {
                        return Err(loc.error(
                            span,
                            &field("protocol"),
                            "h2 is HTTP/2 over TLS: add an [upstream_tls] table, or use \"h2c\"",
                        ));
                    }
                    p
                }
            };
            if s.health
                .as_ref()
                .is_some_and(|h| h.kind == HealthKind::Grpc)
                && !protocol.speaks_h2(upstream_tls.is_some())
            {
                let off = key_offset(text, &format!("[services.{name}.health]"), "kind");
                return Err(loc.error(
                    off..off,
                    &field("health.kind"),
                    "gRPC health checks speak HTTP/2: set `protocol = \"h2c\"` (or \"h2\") on the service",
                ));
            }
            let retries_span = s.retries.as_ref().map_or(0..0, |r| r.span());
            let retries = s.retries.map(|r| r.into_inner()).unwrap_or_default();
            if retries.attempts == 0 || retries.attempts > 10 {
                return Err(loc.error(
                    retries_span,
                    &field("retries.attempts"),
                    "must be between 1 and 10",
                ));
            }
            services.push(ServiceConfig {
                name,
                listen: s.listen,
                routes,
                trusted_proxies: s.trusted_proxies,
                allow_underscore_headers: s.allow_underscore_headers,
                allowed_upgrades: s.allowed_upgrades,
                access_log: s.access_log,
                balance: s.balance.0,
                hash_key: s.hash_key,
                backends,
                slow_start: s.slow_start.0,
                health: s.health,
                outlier: s.outlier,
                timeouts: s.timeouts,
                retries,
                limits: s.limits,
                cache,
                jobs_path,
                tls,
                https_redirect,
                upstream_tls,
                protocol,
                extra: s.extra,
            });
        }
        let log_format = match &raw.log_format {
            Some(f) => Some(
                f.get_ref()
                    .parse::<LogFormat>()
                    .map_err(|e| loc.error(f.span(), "log_format", e))?,
            ),
            None => None,
        };
        let buffer_memory = match &raw.buffer_memory {
            Some(b) => {
                parse_size(b.get_ref()).map_err(|e| loc.error(b.span(), "buffer_memory", e))?
            }
            None => DEFAULT_BUFFER_MEMORY,
        };
        let cache = match &raw.cache {
            None => None,
            Some(c) => Some(CacheStoreConfig {
                memory: match &c.memory {
                    Some(m) => parse_size(m.get_ref())
                        .map_err(|e| loc.error(m.span(), "cache.memory", e))?,
                    None => DEFAULT_CACHE_MEMORY,
                },
                fill_memory: match &c.fill_memory {
                    Some(m) => parse_size(m.get_ref())
                        .map_err(|e| loc.error(m.span(), "cache.fill_memory", e))?,
                    None => shoal_cache::cache::DEFAULT_FILL_BYTES,
                },
                redis: match &c.redis {
                    Some(u) => match shoal_cache::redis_conn::RedisClient::open(u.get_ref()) {
                        Ok(_) => Some(u.get_ref().clone()),
                        Err(e) => {
                            let msg = shoal_cache::redis_conn::url_error(&e);
                            return Err(loc.error(u.span(), "cache.redis", msg));
                        }
                    },
                    None => None,
                },
            }),
        };
        let base = path.parent().unwrap_or(Path::new("."));
        let data_dir = raw
            .data_dir
            .map(|d| if d.is_absolute() { d } else { base.join(d) })
            .unwrap_or_else(|| base.join(".shoal"));
        Ok(Config {
            source: path.to_path_buf(),
            text: text.to_string(),
            threads: raw.threads.map(|t| t.into_inner()),
            log_format,
            data_dir,
            admin: raw.admin,
            buffer_memory,
            cache,
            brokers: raw.brokers,
            jobs: raw.jobs,
            cluster: raw.cluster,
            services,
        })
    }

    /// Locator over this config's text, for owners of `extra` tables reporting errors.
    pub fn locator(&self) -> Locator<'_> {
        Locator::new(&self.source, &self.text)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(t: &str) -> Result<Config, ConfigError> {
        Config::parse(Path::new("test.toml"), t)
    }

    #[test]
    fn minimal_config() {
        let c = parse(
            "[services.web]\nlisten = \"127.0.0.1:8080\"\nbackends = [\"127.0.0.1:9001\", { addr = \"127.0.0.1:9002\", weight = 3 }]\n",
        )
        .unwrap();
        assert_eq!(c.services.len(), 1);
        assert_eq!(c.services[0].backends[1].weight, 3);
        assert_eq!(c.services[0].balance, Algorithm::RoundRobin);
        assert_eq!(c.admin.listen.to_string(), "127.0.0.1:9900");
    }

    #[test]
    fn unknown_algorithm_names_line_and_field() {
        let e = parse("[services.web]\nlisten = \"127.0.0.1:8080\"\nbalance = \"fastest\"\n")
            .unwrap_err();
        assert_eq!(e.line, 3, "{e}");
        assert_eq!(e.field, "services.web.balance", "{e}");
        assert!(
            e.to_string()
                .starts_with("test.toml:3: services.web.balance:"),
            "{e}"
        );
    }

    #[test]
    fn jobs_path_defaults_and_is_checked_with_line_and_field() {
        let svc = "[services.web]\nlisten = \"127.0.0.1:8080\"\n";
        assert_eq!(parse(svc).unwrap().services[0].jobs_path, "/jobs");
        let c = parse(&format!("{svc}jobs_path = \"/api/tasks\"\n")).unwrap();
        assert_eq!(c.services[0].jobs_path, "/api/tasks");
        let e = parse(&format!("{svc}jobs_path = \"/tasks/\"\n")).unwrap_err();
        assert_eq!(
            (e.line, e.field.as_str()),
            (3, "services.web.jobs_path"),
            "{e}"
        );
        assert!(e.to_string().starts_with("test.toml:3: "), "{e}");
    }

    #[test]
    fn log_format_is_text_or_json() {
        let svc = "[services.web]\nlisten = \"127.0.0.1:8080\"\n";
        assert_eq!(parse(svc).unwrap().log_format, None);
        let c = parse(&format!("log_format = \"json\"\n{svc}")).unwrap();
        assert_eq!(c.log_format, Some(LogFormat::Json));
        let e = parse(&format!("threads = 2\nlog_format = \"xml\"\n{svc}")).unwrap_err();
        assert_eq!((e.line, e.field.as_str()), (2, "log_format"), "{e}");
        assert!(e.message.contains("\"json\""), "{e}");
    }

    #[test]
    fn cache_redis_is_one_url_or_a_cluster_seed_list() {
        let svc = "[services.web]\nlisten = \"127.0.0.1:8080\"\n";
        let one = parse(&format!(
            "{svc}[cache]\nredis = \"redis://127.0.0.1:6379\"\n"
        ))
        .unwrap();
        assert!(one.cache.unwrap().redis.is_some());
        let seeds = "redis://127.0.0.1:7000,redis://127.0.0.1:7001";
        let c = parse(&format!("{svc}[cache]\nredis = \"{seeds}\"\n")).unwrap();
        assert_eq!(c.cache.unwrap().redis.as_deref(), Some(seeds));
        for bad in ["http://127.0.0.1:6379", "redis://127.0.0.1:7000,http://x"] {
            let e = parse(&format!(
                "{svc}[cache]\nmemory = \"8MiB\"\nredis = \"{bad}\"\n"
            ))
            .unwrap_err();
            assert_eq!((e.line, e.field.as_str()), (5, "cache.redis"), "{e}");
            assert!(e.message.contains("Redis Cluster seed URLs"), "{e}");
        }
    }

    #[test]
    fn upstream_protocols_and_grpc_settings() {
        let svc = "[services.g]\nlisten = \"127.0.0.1:8080\"\n";
        let c = parse(&format!("{svc}protocol = \"h2c\"\n[services.g.retries]\ngrpc_codes = [\"unavailable\", 4]\n[services.g.health]\nkind = \"grpc\"\n")).unwrap();
        let g = &c.services[0];
        assert_eq!(g.protocol, Protocol::H2c);
        assert_eq!(g.retries.grpc_codes, [14, 4]);
        assert_eq!(g.health.as_ref().unwrap().kind, HealthKind::Grpc);
        let e = parse(&format!("{svc}protocol = \"h2\"\n")).unwrap_err();
        assert_eq!(
            (e.line, e.field.as_str()),
            (3, "services.g.protocol"),
            "{e}"
        );
        let e = parse(&format!("{svc}protocol = \"h3\"\n")).unwrap_err();
        assert_eq!(e.line, 3, "{e}");
        let e = parse(&format!("{svc}[services.g.health]\nkind = \"grpc\"\n")).unwrap_err();
        assert_eq!(
            (e.line, e.field.as_str()),
            (4, "services.g.health.kind"),
            "{e}"
        );
        let e = parse(&format!(
            "{svc}protocol = \"auto\"\n[services.g.health]\nkind = \"grpc\"\n"
        ))
        .unwrap_err();
        assert_eq!(e.field, "services.g.health.kind", "{e}");
        let e = parse(&format!(
            "{svc}[services.g.retries]\ngrpc_codes = [\"SOMETIMES\"]\n"
        ))
        .unwrap_err();
        assert!(e.message.contains("SOMETIMES"), "{e}");
    }

    #[test]
    fn unknown_field_is_an_error() {
        let e = parse("[services.web]\nlisten = \"127.0.0.1:8080\"\n[services.web.timeouts]\nconect = \"1s\"\n").unwrap_err();
        assert_eq!(e.line, 4, "{e}");
        assert!(e.message.contains("conect"), "{e}");
    }

    #[test]
    fn bad_duration_and_retries() {
        let e = parse("[services.web]\nlisten = \"127.0.0.1:8080\"\nslow_start = \"3 parsecs\"\n")
            .unwrap_err();
        assert_eq!(e.line, 3, "{e}");
        let e = parse(
            "[services.web]\nlisten = \"127.0.0.1:8080\"\n[services.web.retries]\nattempts = 0\n",
        )
        .unwrap_err();
        assert_eq!(e.field, "services.web.retries.attempts", "{e}");
        assert!(e.line >= 3, "{e}");
    }

    #[test]
    fn no_services_and_duplicate_listen() {
        assert!(parse("threads = 1\n").is_err());
        let e = parse("[services.a]\nlisten = \"127.0.0.1:8080\"\n[services.b]\nlisten = \"127.0.0.1:8080\"\n").unwrap_err();
        assert!(e.message.contains("already used"), "{e}");
    }

    #[test]
    fn zero_and_huge_timeouts_are_refused() {
        let e = parse("[services.web]\nlisten = \"127.0.0.1:8080\"\n[services.web.timeouts]\nconnect = \"1s\"\nper_try = \"0s\"\n").unwrap_err();
        assert_eq!(
            (e.line, e.field.as_str()),
            (5, "services.web.timeouts.per_try"),
            "{e}"
        );
        let e = parse(
            "[services.web]\nlisten = \"127.0.0.1:8080\"\n[services.web.timeouts]\ndrain = 1e20\n",
        )
        .unwrap_err();
        assert_eq!(e.line, 4, "{e}");
        assert!(parse_duration("99999999999h").is_err());
    }

    #[test]
    fn durations_and_sizes() {
        assert_eq!(parse_duration("250ms").unwrap(), Duration::from_millis(250));
        assert_eq!(parse_duration("2m").unwrap(), Duration::from_secs(120));
        assert_eq!(parse_duration("1.5").unwrap(), Duration::from_millis(1500));
        assert!(parse_duration("fast").is_err());
        assert_eq!(parse_size("64MiB").unwrap(), 64 << 20);
        assert_eq!(parse_size("1k").unwrap(), 1000);
        assert!(parse_size("lots").is_err());
    }
}
