//! The queue tables of a config: `[brokers.NAME]`, `[jobs]` and each route's `async` table,
//! validated with `file:line: field: message` errors like the rest of the config.
//!
//! ```toml
//! [brokers.main]
//! rabbitmq = "amqp://guest:guest@127.0.0.1:5672/%2f"   # or: kafka = "127.0.0.1:9092"
//!
//! [jobs]
//! redis = "redis://127.0.0.1:6379/"   # optional; default: a redb file in data_dir
//!
//! [[services.web.routes]]
//! prefix = "/async"
//! service = "workers"                 # the worker service (a fleet without `listen`)
//! async = { broker = "main", queue = "work", result_ttl = "1h", max_attempts = 5 }
//! ```

use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;
use shoal_proxy::config::{key_offset, parse_size, Dur, Locator};
use shoal_proxy::{Config, ConfigError};

/// Which broker, and how to reach it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BrokerKind {
    /// `amqp://user:pass@host:port/vhost`.
    RabbitMq { url: String },
    /// `host:port[,host:port...]`.
    Kafka { bootstrap: String, partitions: i32 },
}

/// One `[brokers.NAME]` table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BrokerSpec {
    pub name: String,
    pub kind: BrokerKind,
}

impl BrokerSpec {
    /// `rabbitmq` or `kafka` (the `dependency` label of `shoal_dependency_up`).
    pub fn kind_name(&self) -> &'static str {
        match self.kind {
            BrokerKind::RabbitMq { .. } => "rabbitmq",
            BrokerKind::Kafka { .. } => "kafka",
        }
    }
}

/// One async route's queue.
#[derive(Debug, Clone, PartialEq)]
pub struct QueueSpec {
    /// The queue (RabbitMQ) or topic (Kafka) name.
    pub queue: String,
    /// The `[brokers.NAME]` it lives on.
    pub broker: String,
    /// The service whose instances run the jobs.
    pub worker_service: String,
    /// Where the route is: `services.LISTENER.routes[i]`.
    pub route: String,
    pub result_ttl: Duration,
    pub max_attempts: u32,
    pub max_body: usize,
    /// Largest worker answer stored; a larger one ends the job as 502.
    pub max_result_bytes: usize,
    /// Jobs handled at once by this shoal (also the RabbitMQ prefetch).
    pub concurrency: usize,
    pub attempt_timeout: Duration,
    /// The request header whose (hashed) value scopes idempotency keys to a client;
    /// None: every client of the route shares one scope.
    pub identity_header: Option<http::HeaderName>,
}

/// Everything the queue runtime needs.
#[derive(Debug, Clone, PartialEq)]
pub struct QueuesSpec {
    pub brokers: Vec<BrokerSpec>,
    /// `[jobs] redis`; None: the redb file below.
    pub redis: Option<String>,
    pub redb_path: PathBuf,
    pub queues: Vec<QueueSpec>,
}

impl QueuesSpec {
    pub fn broker(&self, name: &str) -> Option<&BrokerSpec> {
        self.brokers.iter().find(|b| b.name == name)
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawBroker {
    rabbitmq: Option<String>,
    kafka: Option<String>,
    /// Kafka: partitions of a topic shoal creates (default 4).
    partitions: Option<i32>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawJobs {
    redis: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawAsync {
    queue: Option<String>,
    broker: Option<String>,
    result_ttl: Option<Dur>,
    max_attempts: Option<u32>,
    max_body: Option<String>,
    max_result_bytes: Option<String>,
    concurrency: Option<usize>,
    attempt_timeout: Option<Dur>,
    /// Header naming the client for idempotency keys; "" for none. Default `authorization`.
    identity_header: Option<String>,
}

/// The offset of `key` inside a table (an inline `{ ... }` or the lines under its header),
/// or of the table itself.
fn offset_in(text: &str, start: usize, key: &str) -> usize {
    let mut pos = start;
    for (i, line) in text[start..].split_inclusive('\n').enumerate() {
        let t = line.trim_start();
        if i > 0 && t.starts_with('[') && !t.trim_end().ends_with(".async]") {
            break;
        }
        if t.starts_with(key) || (t.starts_with("async") && line.contains(&format!("{key} ="))) {
            return pos;
        }
        pos += line.len();
    }
    start
}

/// A string key of one of the service's tables (`fleet`, `autoscale`).
fn table_str<'a>(
    svc: &'a shoal_proxy::config::ServiceConfig,
    table: &str,
    key: &str,
) -> Option<&'a str> {
    svc.extra.get(table)?.get(key)?.as_str()
}

/// Whether shoal starts the service's instances (a `[fleet]` with the process provider,
/// the default) rather than calling fixed backends.
pub(crate) fn process_fleet(svc: &shoal_proxy::config::ServiceConfig) -> bool {
    svc.extra.contains_key("fleet")
        && table_str(svc, "fleet", "provider").is_none_or(|p| p == "process")
}

/// Whether the service's fleet scales on the backlog (so it starts from zero on work).
fn backlog_scaled(svc: &shoal_proxy::config::ServiceConfig) -> bool {
    table_str(svc, "autoscale", "policy") == Some("backlog")
}

/// The fleet's `min` (1 when not given, as shoal-fleet's default).
fn fleet_min(svc: &shoal_proxy::config::ServiceConfig) -> i64 {
    svc.extra
        .get("fleet")
        .and_then(|f| f.get("min"))
        .and_then(|m| m.as_integer())
        .unwrap_or(1)
}

/// The dotted path of `key` in the table at `base` (`base` itself for an empty key).
fn field(base: &str, key: &str) -> String {
    if key.is_empty() {
        base.to_string()
    } else {
        format!("{base}.{key}")
    }
}

fn queue_name_ok(q: &str) -> bool {
    !q.is_empty()
        && q.len() <= 200
        && q.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
}

/// Validates the queue tables of `config` (used by `shoal check` and at start).
pub fn queue_specs(config: &Config) -> Result<QueuesSpec, ConfigError> {
    let loc: Locator<'_> = config.locator();
    let text = config.text.as_str();
    let mut brokers = Vec::new();
    for (name, v) in &config.brokers {
        let header = format!("[brokers.{name}]");
        let err = |key: &str, msg: String| {
            let off = if key.is_empty() {
                text.find(&header).unwrap_or(0)
            } else {
                key_offset(text, &header, key)
            };
            loc.error(off..off, &field(&format!("brokers.{name}"), key), msg)
        };
        let raw: RawBroker = v
            .clone()
            .try_into()
            .map_err(|e: toml::de::Error| err("", e.message().trim().to_string()))?;
        let kind = match (raw.rabbitmq, raw.kafka) {
            (Some(url), None) => {
                if !url.starts_with("amqp://") {
                    return Err(err(
                        "rabbitmq",
                        "expected an amqp://user:pass@host:port/vhost URL (no TLS)".into(),
                    ));
                }
                if raw.partitions.is_some() {
                    return Err(err("partitions", "partitions belong to kafka".into()));
                }
                BrokerKind::RabbitMq { url }
            }
            (None, Some(bootstrap)) => {
                let bad = bootstrap.split(',').any(|hp| {
                    hp.trim()
                        .rsplit_once(':')
                        .is_none_or(|(h, p)| h.is_empty() || p.parse::<u16>().is_err())
                });
                if bad {
                    return Err(err("kafka", "expected host:port[,host:port...]".into()));
                }
                let partitions = raw.partitions.unwrap_or(4);
                if !(1..=1024).contains(&partitions) {
                    return Err(err("partitions", "must be between 1 and 1024".into()));
                }
                BrokerKind::Kafka {
                    bootstrap,
                    partitions,
                }
            }
            _ => {
                return Err(err(
                    "",
                    "set exactly one of rabbitmq = \"amqp://...\" or kafka = \"host:port\"".into(),
                ))
            }
        };
        brokers.push(BrokerSpec {
            name: name.clone(),
            kind,
        });
    }
    let redis = match &config.jobs {
        None => None,
        Some(v) => {
            let err = |key: &str, msg: String| {
                let off = if key.is_empty() {
                    text.find("[jobs]").unwrap_or(0)
                } else {
                    key_offset(text, "[jobs]", key)
                };
                loc.error(off..off, &format!("jobs.{key}"), msg)
            };
            let raw: RawJobs = v
                .clone()
                .try_into()
                .map_err(|e: toml::de::Error| err("", e.message().trim().to_string()))?;
            match raw.redis {
                Some(u) => match shoal_cache::redis_conn::RedisClient::open(&u) {
                    Ok(_) => Some(u),
                    Err(e) => return Err(err("redis", shoal_cache::redis_conn::url_error(&e))),
                },
                None => None,
            }
        }
    };

    let mut queues: Vec<QueueSpec> = Vec::new();
    for svc in &config.services {
        let header = format!("[[services.{}.routes]]", svc.name);
        for (i, r) in svc.routes.iter().enumerate() {
            let Some(v) = r.extra.get("async") else {
                continue;
            };
            let route = format!("services.{}.routes[{i}]", svc.name);
            let at = text.match_indices(&header).nth(i).map_or(0, |(o, _)| o);
            let err = |key: &str, msg: String| {
                let off = offset_in(text, at, if key.is_empty() { "async" } else { key });
                loc.error(off..off, &field(&format!("{route}.async"), key), msg)
            };
            let raw: RawAsync = v
                .clone()
                .try_into()
                .map_err(|e: toml::de::Error| err("", e.message().trim().to_string()))?;
            let broker = match raw.broker {
                Some(b) if brokers.iter().any(|x| x.name == b) => b,
                Some(b) => return Err(err("broker", format!("no [brokers.{b}] table"))),
                None if brokers.len() == 1 => brokers[0].name.clone(),
                None if brokers.is_empty() => {
                    return Err(err(
                        "",
                        "an async route needs a [brokers.NAME] table (rabbitmq or kafka)".into(),
                    ))
                }
                None => return Err(err("broker", "several brokers: name one".into())),
            };
            let queue = raw.queue.unwrap_or_else(|| r.service.clone());
            if !queue_name_ok(&queue) {
                return Err(err(
                    "queue",
                    format!("invalid queue name {queue:?} (use [A-Za-z0-9._-], at most 200)"),
                ));
            }
            // Unique across brokers too: metrics and idempotency keys are per queue name.
            if let Some(other) = queues.iter().find(|q| q.queue == queue) {
                return Err(err(
                    "queue",
                    format!("queue {queue:?} is already used by {}", other.route),
                ));
            }
            let worker = config
                .services
                .iter()
                .find(|s| s.name == r.service)
                .expect("route targets are validated");
            if worker.listen.is_some() {
                return Err(err(
                    "",
                    format!(
                        "the worker service {:?} must not listen: jobs reach it only through the queue",
                        r.service
                    ),
                ));
            }
            if r.cache.is_some() {
                return Err(err(
                    "",
                    "a route is cached or async, not both: an answer is the job's URL".into(),
                ));
            }
            if process_fleet(worker) && !backlog_scaled(worker) && fleet_min(worker) == 0 {
                return Err(err(
                    "",
                    format!(
                        "the worker service {:?} would never start an instance: give its \
                         [autoscale] policy = \"backlog\" or its [fleet] min >= 1",
                        r.service
                    ),
                ));
            }
            if !process_fleet(worker) && worker.backends.is_empty() {
                return Err(err(
                    "",
                    format!(
                        "the worker service {:?} needs a process [fleet] or backends",
                        r.service
                    ),
                ));
            }
            let result_ttl = raw.result_ttl.map_or(Duration::from_secs(3600), |d| d.0);
            if result_ttl < Duration::from_secs(1) {
                return Err(err("result_ttl", "must be at least 1s".into()));
            }
            let max_attempts = raw.max_attempts.unwrap_or(5);
            if !(1..=100).contains(&max_attempts) {
                return Err(err("max_attempts", "must be between 1 and 100".into()));
            }
            let max_body = match &raw.max_body {
                None => 1 << 20,
                Some(s) => match parse_size(s) {
                    Ok(n) if (1..=64 << 20).contains(&n) => n as usize,
                    Ok(_) => return Err(err("max_body", "must be between 1B and 64MiB".into())),
                    Err(e) => return Err(err("max_body", e)),
                },
            };
            let max_result_bytes = match &raw.max_result_bytes {
                None => 10 << 20,
                Some(s) => match parse_size(s) {
                    Ok(n) if (1..=1 << 30).contains(&n) => n as usize,
                    Ok(_) => {
                        return Err(err(
                            "max_result_bytes",
                            "must be between 1B and 1GiB".into(),
                        ))
                    }
                    Err(e) => return Err(err("max_result_bytes", e)),
                },
            };
            let concurrency = raw.concurrency.unwrap_or(32);
            if !(1..=10_000).contains(&concurrency) {
                return Err(err("concurrency", "must be between 1 and 10000".into()));
            }
            let attempt_timeout = raw.attempt_timeout.map_or(Duration::from_secs(30), |d| d.0);
            if attempt_timeout.is_zero() {
                return Err(err("attempt_timeout", "must be greater than 0".into()));
            }
            let identity_header = match raw.identity_header.as_deref() {
                None => Some(http::header::AUTHORIZATION),
                Some("") => None,
                Some(h) => match http::HeaderName::from_bytes(h.as_bytes()) {
                    // Hop-by-hop and proxy credentials never reach the job: every client
                    // would share one scope.
                    Ok(n) if crate::submit::DROP.contains(&n.as_str()) => {
                        return Err(err(
                            "identity_header",
                            format!("{h:?} is removed before a job is made; name a header the request keeps"),
                        ))
                    }
                    Ok(n) => Some(n),
                    Err(_) => {
                        return Err(err(
                            "identity_header",
                            format!("{h:?} is not a header name (\"\" for none)"),
                        ))
                    }
                },
            };
            queues.push(QueueSpec {
                queue,
                broker,
                worker_service: r.service.clone(),
                route,
                result_ttl,
                max_attempts,
                max_body,
                max_result_bytes,
                concurrency,
                attempt_timeout,
                identity_header,
            });
        }
    }
    // A backlog autoscaler needs a backlog: some async route must feed the service.
    for svc in &config.services {
        let policy = svc
            .extra
            .get("autoscale")
            .and_then(|a| a.get("policy"))
            .and_then(|p| p.as_str());
        if policy == Some(shoal_scale::backlog::POLICY_NAME)
            && !queues.iter().any(|q| q.worker_service == svc.name)
        {
            let off = key_offset(
                text,
                &format!("[services.{}.autoscale]", svc.name),
                "policy",
            );
            return Err(loc.error(
                off..off,
                &format!("services.{}.autoscale.policy", svc.name),
                "policy \"backlog\" needs an async route to this service",
            ));
        }
    }
    Ok(QueuesSpec {
        brokers,
        redis,
        redb_path: config.data_dir.join("jobs.redb"),
        queues,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    const WORKERS: &str = "[services.workers]\nbackends = [\"127.0.0.1:9001\"]\n";

    fn specs(text: &str) -> Result<QueuesSpec, ConfigError> {
        let c = Config::parse(Path::new("q.toml"), text)?;
        queue_specs(&c)
    }

    fn route(async_table: &str) -> String {
        format!("[services.web]\nlisten = \"127.0.0.1:8080\"\n[[services.web.routes]]\nprefix = \"/async\"\nservice = \"workers\"\n{async_table}\n")
    }

    #[test]
    fn a_full_async_route() {
        let s = specs(&format!(
            "[brokers.main]\nrabbitmq = \"amqp://guest:guest@127.0.0.1:5672/%2f\"\n[jobs]\nredis = \"redis://127.0.0.1:6379/\"\n{}{WORKERS}",
            route("async = { queue = \"work\", result_ttl = \"10m\", max_attempts = 3, max_body = \"64KiB\" }")
        ))
        .unwrap();
        let q = &s.queues[0];
        assert_eq!((q.queue.as_str(), q.broker.as_str()), ("work", "main"));
        assert_eq!(q.worker_service, "workers");
        assert_eq!(q.result_ttl, Duration::from_secs(600));
        assert_eq!((q.max_attempts, q.max_body), (3, 64 << 10));
        assert_eq!(q.max_result_bytes, 10 << 20, "the default");
        assert_eq!(s.redis.as_deref(), Some("redis://127.0.0.1:6379/"));
        assert_eq!(q.identity_header, Some(http::header::AUTHORIZATION));
        let named = |v: &str| {
            specs(&format!(
                "[brokers.main]\nkafka = \"127.0.0.1:9092\"\n{}{WORKERS}",
                route(&format!("async = {{ identity_header = \"{v}\" }}"))
            ))
            .unwrap()
            .queues[0]
                .identity_header
                .clone()
        };
        assert_eq!(named("X-Api-Key").unwrap().as_str(), "x-api-key");
        assert_eq!(named(""), None);
    }

    #[test]
    fn errors_name_line_and_field() {
        let kafka = "[brokers.k]\nkafka = \"127.0.0.1:9092\"\n";
        for (text, line, field) in [
            // No broker at all.
            (format!("{}{WORKERS}", route("async = { queue = \"w\" }")), 6, "services.web.routes[0].async"),
            (format!("{kafka}{}{WORKERS}", route("async = { broker = \"nope\" }")), 8, "services.web.routes[0].async.broker"),
            (format!("{kafka}{}{WORKERS}", route("[services.web.routes.async]\nmax_attempts = 0")), 9, "services.web.routes[0].async.max_attempts"),
            (format!("{kafka}{}{WORKERS}", route("async = { queue = \"a b\" }")), 8, "services.web.routes[0].async.queue"),
            (format!("{kafka}{}{WORKERS}", route("[services.web.routes.async]\nmax_result_bytes = \"0B\"")), 9, "services.web.routes[0].async.max_result_bytes"),
            (format!("{kafka}{}{WORKERS}", route("[services.web.routes.async]\nqueue = \"w\"\nidentity_header = \"x y\"")), 10, "services.web.routes[0].async.identity_header"),
            ("[brokers.k]\nkafka = \"nohost\"\n[services.w]\nlisten = \"127.0.0.1:1\"\n".to_string(), 2, "brokers.k.kafka"),
            ("[brokers.k]\nrabbitmq = \"amqp://h\"\nkafka = \"h:1\"\n[services.w]\nlisten = \"127.0.0.1:1\"\n".to_string(), 1, "brokers.k"),
            (format!("{kafka}{}[services.workers]\nlisten = \"127.0.0.1:9\"\n", route("async = {}")), 8, "services.web.routes[0].async"),
        ] {
            let e = specs(&text).unwrap_err();
            assert_eq!((e.line, e.field.as_str()), (line, field), "{e}\n{text}");
        }
    }

    #[test]
    fn refuses_what_would_strand_or_mix_jobs() {
        let kafka = "[brokers.k]\nkafka = \"127.0.0.1:9092\"\n";
        let rabbit = "[brokers.r]\nrabbitmq = \"amqp://127.0.0.1/%2f\"\n";
        // A process fleet that never starts an instance (min 0, no backlog policy).
        let idle = "[services.workers]\n[services.workers.fleet]\ncommand = \"shoal demo-service\"\nmin = 0\nmax = 2\n";
        let e = specs(&format!("{kafka}{}{idle}", route("async = {}"))).unwrap_err();
        assert!(e.to_string().contains("never start"), "{e}");
        // The same fleet on the backlog policy starts from zero when work arrives.
        let scaled = format!("{idle}[services.workers.autoscale]\npolicy = \"backlog\"\n");
        specs(&format!("{kafka}{}{scaled}", route("async = {}"))).unwrap();
        // A static fleet's backends are the workers.
        let fixed = "[services.workers]\nbackends = [\"127.0.0.1:9001\"]\n[services.workers.fleet]\nprovider = \"static\"\n";
        specs(&format!("{kafka}{}{fixed}", route("async = {}"))).unwrap();
        // Cached and async at once.
        let e = specs(&format!(
            "{kafka}{}{WORKERS}",
            route("async = {}\ncache = {}")
        ))
        .unwrap_err();
        assert!(e.to_string().contains("not both"), "{e}");
        // One queue name on two brokers.
        let two = format!(
            "{kafka}{rabbit}[services.web]\nlisten = \"127.0.0.1:8080\"\n\
             [[services.web.routes]]\nprefix = \"/a\"\nservice = \"workers\"\nasync = {{ broker = \"k\", queue = \"q\" }}\n\
             [[services.web.routes]]\nprefix = \"/b\"\nservice = \"workers\"\nasync = {{ broker = \"r\", queue = \"q\" }}\n{WORKERS}"
        );
        let e = specs(&two).unwrap_err();
        assert!(e.to_string().contains("already used"), "{e}");
    }

    #[test]
    fn backlog_policy_needs_an_async_route() {
        let e = specs("[services.w]\nbackends = [\"127.0.0.1:1\"]\n[services.w.autoscale]\npolicy = \"backlog\"\n[services.web]\nlisten = \"127.0.0.1:8080\"\n").unwrap_err();
        assert_eq!(
            (e.line, e.field.as_str()),
            (4, "services.w.autoscale.policy"),
            "{e}"
        );
    }
}
