//! Several shoal replicas in front of one fleet, through Redis (`[cluster] redis = URL`) or,
//! on Kubernetes without it, through a Lease (the backend in `lease.rs`).
//!
//! Per service, one replica leads: it holds a lock (`SET key id NX PX lease`, renewed and
//! released by scripts that act only while the value is still its id) and a fencing token
//! (a counter `INCR`ed on each acquisition). Only the leader makes scaling decisions and
//! fleet writes; each write carries its token and a script refuses it when a newer token
//! was issued, so a leader that woke up late cannot overwrite its successor. The election
//! itself is the pure state machine in `leader.rs`; this module only talks to Redis.
//!
//! Shared state per service (all keys share the hash tag `{service}`, so each script's keys
//! live in one Redis Cluster slot):
//! - `shoal:{S}:lock` — the holder's id, with the lease as TTL;
//! - `shoal:{S}:token` — the last token issued; `shoal:{S}:fence` — the token of the last
//!   accepted write;
//! - `shoal:{S}:fleet` — the leader's view of the fleet (desired count and members), which
//!   followers route to and a new leader adopts;
//! - `shoal:{S}:load` — a hash: each replica's per-second load (request rate, in-flight),
//!   stamped with Redis' clock, so the leader decides on what every replica saw.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use shoal_cache::redis_conn::{ConnectOptions, RedisClient, RedisConn};
use shoal_proxy::config::{key_offset, Dur};
use shoal_proxy::metrics::Exposition;
use shoal_proxy::{Config, ConfigError};

use crate::leader::{Election, Role, Step, Timing};
use crate::provider::Phase;

/// The validated `[cluster]` table.
#[derive(Debug, Clone, PartialEq)]
pub struct ClusterSpec {
    /// The Redis backend; None: a Kubernetes Lease per fleet.
    pub redis: Option<String>,
    /// Lease backend: the Lease's name (default `shoal-SERVICE`) and namespace (default:
    /// the fleet's), and the Service whose EndpointSlices list the replicas (their load is
    /// pulled from their admin ports; None: the leader decides on its own load).
    pub lease_name: Option<String>,
    pub namespace: Option<String>,
    pub peers: Option<String>,
    pub timing: Timing,
    /// This replica's identity (default: host name, pid and start time).
    pub id: String,
    /// A replica's load report older than this makes the leader hold its decisions.
    pub load_stale: Duration,
    /// A report older than this is forgotten: the replica is gone (its clients moved on).
    pub load_age_out: Duration,
    /// Replicas share one config through Redis (`config_share.rs`).
    pub share_config: bool,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawCluster {
    redis: Option<String>,
    lease_name: Option<String>,
    namespace: Option<String>,
    peers: Option<String>,
    lease: Option<Dur>,
    renew_deadline: Option<Dur>,
    retry: Option<Dur>,
    id: Option<String>,
    share_config: Option<bool>,
}

/// Validates `[cluster]` (None without one); errors name file, line and field.
pub fn cluster_spec(config: &Config) -> Result<Option<ClusterSpec>, ConfigError> {
    let Some(v) = &config.cluster else {
        return Ok(None);
    };
    let loc = config.locator();
    let text = config.text.as_str();
    let err = |key: &str, msg: String| {
        let off = if key.is_empty() {
            text.find("[cluster]").unwrap_or(0)
        } else {
            key_offset(text, "[cluster]", key)
        };
        let field = if key.is_empty() {
            "cluster".to_string()
        } else {
            format!("cluster.{key}")
        };
        loc.error(off..off, &field, msg)
    };
    let raw: RawCluster = v
        .clone()
        .try_into()
        .map_err(|e: toml::de::Error| err("", e.message().trim().to_string()))?;
    match &raw.redis {
        Some(redis) => {
            if let Err(e) = RedisClient::open(redis) {
                return Err(err("redis", shoal_cache::redis_conn::url_error(&e)));
            }
            for (key, v) in [
                ("lease_name", &raw.lease_name),
                ("namespace", &raw.namespace),
                ("peers", &raw.peers),
            ] {
                if v.is_some() {
                    return Err(err(
                        key,
                        "applies only without `redis` (the Kubernetes Lease)".into(),
                    ));
                }
            }
        }
        None => {
            // A Lease needs the Kubernetes API: every fleet that elects must be on it.
            let specs = crate::config::fleet_specs(config).unwrap_or_default();
            if raw.lease_name.is_some() && specs.len() > 1 {
                return Err(err(
                    "lease_name",
                    "names one Lease, and every fleet needs its own: leave it out with several fleets (each gets shoal-SERVICE)".into(),
                ));
            }
            let why = match specs.iter().find(|s| {
                !crate::registry::find(&s.fleet.provider).is_some_and(|k| k.lease_election)
            }) {
                Some(s) => Some(format!("service {} is \"{}\"", s.service, s.fleet.provider)),
                None if specs.is_empty() => Some("there is no fleet".to_string()),
                None => None,
            };
            if let Some(why) = why {
                return Err(err(
                    "",
                    format!(
                        "missing field `redis` (a redis:// URL): without it the leader is elected through a Kubernetes Lease, which needs every fleet to be provider = \"kubernetes\" ({why})"
                    ),
                ));
            }
        }
    }
    for (key, v) in [
        ("lease_name", &raw.lease_name),
        ("namespace", &raw.namespace),
        ("peers", &raw.peers),
    ] {
        if let Some(v) = v.as_deref().filter(|v| !k8s_name(v)) {
            return Err(err(
                key,
                format!("{v:?} is not a Kubernetes name (lowercase letters, digits, '-' and '.', at most 253)"),
            ));
        }
    }
    let lease = raw.lease.map_or(Duration::from_secs(15), |d| d.0);
    let dflt = Timing::for_lease(lease);
    let timing = Timing {
        lease,
        renew_deadline: raw.renew_deadline.map_or(dflt.renew_deadline, |d| d.0),
        retry: raw.retry.map_or(dflt.retry, |d| d.0),
    };
    if let Err(e) = timing.check() {
        let key = if e.starts_with("renew_deadline") {
            "renew_deadline"
        } else if e.starts_with("retry") {
            "retry"
        } else {
            "lease"
        };
        // Point at the key the user wrote; a default that clashes points at `lease`.
        let key = match key {
            "renew_deadline" if raw.renew_deadline.is_none() => "lease",
            "retry" if raw.retry.is_none() => "lease",
            k => k,
        };
        return Err(err(key, e));
    }
    let id = match raw.id {
        Some(id) if id.trim().is_empty() || id.len() > 200 => {
            return Err(err("id", "must be 1 to 200 characters".into()))
        }
        Some(id) => id,
        None => default_id(),
    };
    Ok(Some(ClusterSpec {
        redis: raw.redis,
        lease_name: raw.lease_name,
        namespace: raw.namespace,
        peers: raw.peers,
        timing,
        id,
        load_stale: Duration::from_secs(3).max(timing.retry * 3),
        load_age_out: Duration::from_secs(10).max(timing.lease * 2),
        share_config: raw.share_config.unwrap_or(false),
    }))
}

/// A DNS-1123 subdomain, what Lease, namespace and Service names must be.
fn k8s_name(v: &str) -> bool {
    !v.is_empty()
        && v.len() <= 253
        && v.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.')
        && v.starts_with(|c: char| c.is_ascii_alphanumeric())
        && v.ends_with(|c: char| c.is_ascii_alphanumeric())
}

fn default_id() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_string())
        .unwrap_or_else(|_| "host".into());
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos());
    format!("{host}-{}-{nanos:08x}", std::process::id())
}

/// One instance as the leader publishes it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SharedMember {
    pub id: String,
    pub addr: SocketAddr,
    pub phase: Phase,
    /// Process fleets: its pid (= process group) and start time, so a new leader on the
    /// same host can adopt and later stop it.
    pub pid: Option<u32>,
    pub start: Option<u64>,
}

/// The leader's view of a fleet.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FleetView {
    pub leader: String,
    pub token: u64,
    pub desired: u32,
    pub members: Vec<SharedMember>,
}

/// One replica's load report as read back.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LoadReport {
    pub replica: String,
    pub rps: f64,
    pub in_flight: f64,
    /// Age when read, by Redis' clock.
    pub age_ms: u64,
    /// Requests per latency bucket (the +Inf bucket last), cumulative since the replica
    /// started: a reader that misses a report loses nothing.
    #[serde(default)]
    pub latency: Vec<u64>,
}

#[derive(Serialize, Deserialize)]
struct LoadValue {
    rps: f64,
    in_flight: f64,
    #[serde(default)]
    latency: Vec<u64>,
}

/// Sums the other replicas' fresh reports; `Err` (hold) while one is stale but not yet aged
/// out: a replica that stops reporting is missing data, not zero load.
pub fn others_load(
    reports: &[LoadReport],
    me: &str,
    stale: Duration,
    age_out: Duration,
) -> Result<(f64, f64), String> {
    let (mut rps, mut in_flight) = (0.0, 0.0);
    for r in reports.iter().filter(|r| r.replica != me) {
        let age = Duration::from_millis(r.age_ms);
        if age > age_out {
            continue;
        }
        if age > stale {
            return Err(format!(
                "replica {} last reported {:.1} s ago",
                r.replica,
                age.as_secs_f64()
            ));
        }
        rps += r.rps;
        in_flight += r.in_flight;
    }
    Ok((rps, in_flight))
}

/// `SET NX PX`, then a new token; 0 when someone else holds the lock.
const ACQUIRE: &str = r"
if redis.call('SET', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2]) then
  return redis.call('INCR', KEYS[2])
end
return 0";
/// Extends the lock only while it is ours.
const RENEW: &str = r"
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return 0";
/// Deletes the lock only while it is ours.
const RELEASE: &str = r"
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0";
/// A fenced write: refused when a newer token was issued or written.
const FENCED_SET: &str = r"
local t = tonumber(ARGV[1])
local issued = tonumber(redis.call('GET', KEYS[1]) or '0')
local seen = tonumber(redis.call('GET', KEYS[2]) or '0')
if t < issued or t < seen then
  return 0
end
redis.call('SET', KEYS[2], ARGV[1])
redis.call('SET', KEYS[3], ARGV[2])
return 1";
/// Stamps a replica's report with Redis' clock (one clock for every replica).
const REPORT: &str = r"
local t = redis.call('TIME')
local ms = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('HSET', KEYS[1], ARGV[1], ms .. ' ' .. ARGV[2])
return ms";
/// Every report with Redis' time now; forgets reports older than ARGV[1] ms.
const READ_LOAD: &str = r"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local all = redis.call('HGETALL', KEYS[1])
local out = {}
for i = 1, #all, 2 do
  local sp = string.find(all[i + 1], ' ')
  local at = tonumber(string.sub(all[i + 1], 1, sp - 1))
  if now - at > tonumber(ARGV[1]) then
    redis.call('HDEL', KEYS[1], all[i])
  else
    table.insert(out, all[i])
    table.insert(out, tostring(now - at))
    table.insert(out, string.sub(all[i + 1], sp + 1))
  end
end
return out";

/// The keys of one service.
#[derive(Debug, Clone)]
struct Keys {
    lock: String,
    token: String,
    fence: String,
    fleet: String,
    load: String,
}

impl Keys {
    fn new(service: &str) -> Keys {
        let k = |s: &str| format!("shoal:{{{service}}}:{s}");
        Keys {
            lock: k("lock"),
            token: k("token"),
            fence: k("fence"),
            fleet: k("fleet"),
            load: k("load"),
        }
    }
}

/// Who holds the lock, as Redis says.
#[derive(Debug, Clone, Serialize)]
struct Holder {
    id: Option<String>,
    token: u64,
    ttl_ms: i64,
}

/// Where the election and the shared load live.
// One per fleet, inside an `Arc`: the variants' sizes do not matter.
#[allow(clippy::large_enum_variant)]
enum Backend {
    Redis {
        client: RedisClient,
        conn: tokio::sync::Mutex<Option<RedisConn>>,
    },
    Lease(crate::lease::LeaseStore),
}

/// One service's election and shared state, for one replica.
pub struct Leadership {
    pub service: String,
    pub spec: ClusterSpec,
    /// The lock's value: the id plus a per-process nonce, so two replicas configured with
    /// the same `id` by mistake still cannot both renew one lock.
    owner: String,
    backend: Backend,
    keys: Keys,
    clock: Instant,
    election: Mutex<Election>,
    /// Wall-clock time this replica became leader (for the API).
    since_wall: Mutex<Option<std::time::SystemTime>>,
    holder: Mutex<Option<Holder>>,
    /// This replica's newest per-second load, published by the load loop, and its
    /// cumulative latency counts.
    local: Mutex<Option<(f64, f64)>>,
    latency_total: Mutex<Vec<u64>>,
    /// Per other replica: its cumulative latency counts as last taken.
    consumed: Mutex<std::collections::HashMap<String, Vec<u64>>>,
    /// The newest reports read and when.
    reports: Mutex<Option<(Instant, Vec<LoadReport>)>>,
    pub writes: shoal_proxy::metrics::Counter,
    pub refused: shoal_proxy::metrics::Counter,
    /// Set once `run` has released the lock and returned.
    exited: tokio::sync::watch::Sender<bool>,
}

impl Leadership {
    /// `fleet_namespace`: the fleet's Kubernetes namespace, the Lease's by default.
    pub fn new(
        service: &str,
        spec: &ClusterSpec,
        fleet_namespace: Option<&str>,
    ) -> Result<Arc<Leadership>, String> {
        let nonce = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.subsec_nanos())
            ^ std::process::id().rotate_left(16);
        let owner = format!("{}#{nonce:08x}", spec.id);
        let backend = match &spec.redis {
            Some(url) => Backend::Redis {
                client: RedisClient::open(url).map_err(|e| e.to_string())?,
                conn: tokio::sync::Mutex::new(None),
            },
            None => {
                let client = crate::kube::KubeClient::new(crate::kube::endpoint_from_env()?)?;
                let ns = spec
                    .namespace
                    .as_deref()
                    .or(fleet_namespace)
                    .unwrap_or("default");
                let name = spec
                    .lease_name
                    .clone()
                    .unwrap_or_else(|| format!("shoal-{service}"));
                Backend::Lease(crate::lease::LeaseStore::new(
                    client,
                    ns,
                    &name,
                    &owner,
                    spec.timing.lease,
                    spec.timing.retry,
                    spec.peers.clone(),
                ))
            }
        };
        Ok(Arc::new(Leadership {
            service: service.to_string(),
            spec: spec.clone(),
            owner,
            backend,
            keys: Keys::new(service),
            clock: Instant::now(),
            election: Mutex::new(Election::new(spec.timing)),
            since_wall: Mutex::new(None),
            holder: Mutex::new(None),
            // Reported from the start (it has served nothing yet): peers count this replica
            // as live at once, so a stopping leader hands its fleet over to it.
            local: Mutex::new(Some((0.0, 0.0))),
            latency_total: Mutex::new(Vec::new()),
            consumed: Mutex::new(Default::default()),
            reports: Mutex::new(None),
            writes: Default::default(),
            refused: Default::default(),
            exited: tokio::sync::watch::channel(false).0,
        }))
    }

    /// The monotonic clock the election runs on.
    pub fn now(&self) -> Duration {
        self.clock.elapsed()
    }

    /// The token to write with, if this replica may write now (see `Election::may_write`).
    pub fn may_write(&self) -> Option<u64> {
        self.election
            .lock()
            .expect("election lock")
            .may_write(self.now())
    }

    pub fn is_leader(&self) -> bool {
        self.may_write().is_some()
    }

    /// This replica resigned (it is shutting down).
    pub fn resigned(&self) -> bool {
        self.election
            .lock()
            .expect("election lock")
            .last_step_down
            .is_some_and(|(_, w)| w == crate::leader::StepDown::Resigned)
    }

    /// A connection, made on first use and after a failure.
    async fn conn(&self) -> redis::RedisResult<RedisConn> {
        let Backend::Redis { client, conn } = &self.backend else {
            return Err(redis::RedisError::from((
                redis::ErrorKind::ClientError,
                "no Redis: the election runs on a Kubernetes Lease",
            )));
        };
        let mut c = conn.lock().await;
        if let Some(c) = &*c {
            return Ok(c.clone());
        }
        let t = self.spec.timing.retry.min(Duration::from_secs(1));
        let conn = client
            .connect(ConnectOptions {
                connect_timeout: t,
                response_timeout: t,
                retries: 1,
                max_delay_ms: 100,
            })
            .await?;
        *c = Some(conn.clone());
        Ok(conn)
    }

    /// Runs a script, bounded by the retry period (an answer later than that is useless to
    /// the election); a failure drops the connection so the next call reconnects.
    async fn script<T: redis::FromRedisValue>(
        &self,
        src: &str,
        keys: &[&str],
        args: &[String],
    ) -> Result<T, String> {
        let bound = self.spec.timing.retry.max(Duration::from_millis(200));
        let r = tokio::time::timeout(bound, async {
            let mut c = self.conn().await?;
            // Plain EVAL: the scripts are short, and EVALSHA's NOSCRIPT retry would need
            // the `script` feature for little gain.
            let mut cmd = redis::cmd("EVAL");
            cmd.arg(src).arg(keys.len());
            for k in keys {
                cmd.arg(*k);
            }
            for a in args {
                cmd.arg(a);
            }
            cmd.query_async::<T>(&mut c).await
        })
        .await;
        match r {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(e)) => {
                if let Backend::Redis { conn, .. } = &self.backend {
                    *conn.lock().await = None;
                }
                Err(e.to_string())
            }
            Err(_) => Err("Redis did not answer in time".into()),
        }
    }

    /// The election loop and the load exchange, until `stop`.
    pub async fn run(self: Arc<Self>, mut stop: tokio::sync::watch::Receiver<bool>) {
        let me = self.clone();
        let load_stop = stop.clone();
        tokio::spawn(async move { me.load_loop(load_stop).await });
        let mut last_holder = Instant::now() - Duration::from_secs(60);
        loop {
            let now = self.now();
            let step = self.election.lock().expect("election lock").poll(now);
            let wait = match step {
                Err(why) => {
                    tracing::warn!(service = %self.service, replica = %self.spec.id, reason = why.as_str(), "stepping down: no longer the leader, fleet writes stop");
                    *self.since_wall.lock().expect("since lock") = None;
                    self.release().await;
                    Duration::ZERO
                }
                Ok(Step::Acquire) => {
                    let sent = self.now();
                    let r = self.acquire().await;
                    let token = match &r {
                        Ok(t) => *t,
                        Err(e) => {
                            tracing::debug!(service = %self.service, error = %e, "lock acquire failed");
                            None
                        }
                    };
                    let mut e = self.election.lock().expect("election lock");
                    e.acquired(sent, self.now(), token);
                    if let (Some(t), Role::Leader { .. }) = (token, e.role()) {
                        drop(e);
                        *self.since_wall.lock().expect("since lock") =
                            Some(std::time::SystemTime::now());
                        tracing::info!(service = %self.service, replica = %self.spec.id, token = t, "became the leader");
                        last_holder = Instant::now() - Duration::from_secs(60);
                    }
                    Duration::ZERO
                }
                Ok(Step::Renew) => {
                    let sent = self.now();
                    let token = match self.election.lock().expect("election lock").role() {
                        Role::Leader { token, .. } => token,
                        Role::Follower => 0,
                    };
                    let r = self.renew(token).await;
                    if let Err(e) = &r {
                        tracing::warn!(service = %self.service, error = %e, "lock renewal failed");
                    }
                    let mut e = self.election.lock().expect("election lock");
                    e.renewed(sent, self.now(), r.map_err(|_| ()));
                    if !matches!(e.role(), Role::Leader { .. }) {
                        drop(e);
                        *self.since_wall.lock().expect("since lock") = None;
                        tracing::warn!(service = %self.service, replica = %self.spec.id, reason = "lock held by another replica", "stepping down: no longer the leader, fleet writes stop");
                    }
                    Duration::ZERO
                }
                Ok(Step::Wait(until)) => until.saturating_sub(now),
            };
            // Who holds the lock, for followers' API (once a retry period is enough).
            if last_holder.elapsed() >= self.spec.timing.retry {
                last_holder = Instant::now();
                self.read_holder().await;
            }
            if wait.is_zero() {
                continue;
            }
            tokio::select! {
                _ = tokio::time::sleep(wait.min(Duration::from_millis(100))) => {}
                _ = shoal_proxy::server::stopped(&mut stop) => break,
            }
        }
        // A replica that stops takes its load report along: its clients went elsewhere,
        // so the leader need not hold for it.
        let _ = async {
            if !matches!(self.backend, Backend::Redis { .. }) {
                return None;
            }
            let mut c = self.conn().await.ok()?;
            redis::cmd("HDEL")
                .arg(&self.keys.load)
                .arg(&self.spec.id)
                .query_async::<i64>(&mut c)
                .await
                .ok()
        }
        .await;
        // A leader that stops hands over at once instead of leaving its lease to expire.
        if self.is_leader() {
            self.release().await;
            self.election
                .lock()
                .expect("election lock")
                .resign(self.now());
            tracing::info!(service = %self.service, "leadership released");
        }
        self.exited.send_replace(true);
    }

    /// Waits (up to `limit`) for `run` to finish after its stop: the lock released and the
    /// load report removed, before the process exits.
    pub async fn stopped(&self, limit: Duration) {
        let mut rx = self.exited.subscribe();
        let _ = tokio::time::timeout(limit, rx.wait_for(|done| *done)).await;
    }

    /// Tries to take the lock: `Some(token)` when it is ours now.
    async fn acquire(&self) -> Result<Option<u64>, String> {
        match &self.backend {
            Backend::Lease(l) => l.acquire().await,
            Backend::Redis { .. } => self
                .script::<u64>(
                    ACQUIRE,
                    &[&self.keys.lock, &self.keys.token],
                    &[
                        self.owner.clone(),
                        self.spec.timing.lease.as_millis().to_string(),
                    ],
                )
                .await
                .map(|t| (t != 0).then_some(t)),
        }
    }

    /// Extends our lock: Ok(false) when it is not ours any more.
    async fn renew(&self, token: u64) -> Result<bool, String> {
        match &self.backend {
            Backend::Lease(l) => l.renew(token).await,
            Backend::Redis { .. } => self
                .script::<i64>(
                    RENEW,
                    &[&self.keys.lock],
                    &[
                        self.owner.clone(),
                        self.spec.timing.lease.as_millis().to_string(),
                    ],
                )
                .await
                .map(|v| v == 1),
        }
    }

    /// Gives the lock up if it is still ours.
    async fn release(&self) {
        match &self.backend {
            Backend::Lease(l) => l.release().await,
            Backend::Redis { .. } => {
                let _ = self
                    .script::<i64>(
                        RELEASE,
                        &[&self.keys.lock],
                        std::slice::from_ref(&self.owner),
                    )
                    .await;
            }
        }
    }

    async fn read_holder(&self) {
        if let Backend::Lease(l) = &self.backend {
            // The election loop reads the Lease every retry period: no call of its own.
            *self.holder.lock().expect("holder lock") = l
                .holder()
                .map(|(id, token, ttl_ms)| Holder { id, token, ttl_ms });
            return;
        }
        let r = async {
            let mut c = self.conn().await.map_err(|e| e.to_string())?;
            let (id, ttl, token): (Option<String>, i64, Option<u64>) = redis::pipe()
                .get(&self.keys.lock)
                .pttl(&self.keys.lock)
                .get(&self.keys.token)
                .query_async(&mut c)
                .await
                .map_err(|e| e.to_string())?;
            Ok::<_, String>(Holder {
                // The replica's id, without the lock's nonce.
                id: id.map(|v| {
                    v.rsplit_once('#')
                        .map_or(v.clone(), |(id, _)| id.to_string())
                }),
                token: token.unwrap_or(0),
                ttl_ms: ttl,
            })
        };
        // The keys share a slot, so the pipeline works on a cluster too.
        match tokio::time::timeout(Duration::from_secs(1), r).await {
            Ok(Ok(h)) => *self.holder.lock().expect("holder lock") = Some(h),
            _ => *self.holder.lock().expect("holder lock") = None,
        }
    }

    /// Publishes this replica's load and reads everyone's, every second.
    async fn load_loop(&self, mut stop: tokio::sync::watch::Receiver<bool>) {
        if let Backend::Lease(l) = &self.backend {
            return self.pull_loop(l, stop).await;
        }
        loop {
            let local = *self.local.lock().expect("local lock");
            if let Some((rps, in_flight)) = local {
                let latency = self.latency_total.lock().expect("latency lock").clone();
                let v = serde_json::to_string(&LoadValue {
                    rps,
                    in_flight,
                    latency,
                })
                .unwrap_or_default();
                if let Err(e) = self
                    .script::<u64>(REPORT, &[&self.keys.load], &[self.spec.id.clone(), v])
                    .await
                {
                    tracing::debug!(service = %self.service, error = %e, "load report failed");
                }
            }
            let forget = self.spec.load_age_out.as_millis() as u64 * 3;
            match self
                .script::<Vec<String>>(READ_LOAD, &[&self.keys.load], &[forget.to_string()])
                .await
            {
                Ok(flat) => {
                    let reports = flat
                        .chunks(3)
                        .filter_map(|c| {
                            let v: LoadValue = serde_json::from_str(c.get(2)?).ok()?;
                            Some(LoadReport {
                                replica: c[0].clone(),
                                age_ms: c[1].parse().ok()?,
                                rps: v.rps,
                                in_flight: v.in_flight,
                                latency: v.latency,
                            })
                        })
                        .collect();
                    *self.reports.lock().expect("reports lock") = Some((Instant::now(), reports));
                }
                Err(e) => tracing::debug!(service = %self.service, error = %e, "load read failed"),
            }
            tokio::select! {
                _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                _ = shoal_proxy::server::stopped(&mut stop) => break,
            }
        }
    }

    /// Lease backend: pulls the peers' reports every second. Without `peers` there are none:
    /// the leader decides on its own load.
    async fn pull_loop(
        &self,
        l: &crate::lease::LeaseStore,
        mut stop: tokio::sync::watch::Receiver<bool>,
    ) {
        let forget = self.spec.load_age_out * 3;
        let mut tick: u64 = 0;
        loop {
            tick += 1;
            // The leader pulls every second; a follower every 5 s, enough to start warm
            // if it takes over, without every replica asking every other each second.
            if !self.is_leader() && tick % 5 != 1 {
                tokio::select! {
                    _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                    _ = shoal_proxy::server::stopped(&mut stop) => break,
                }
                continue;
            }
            match l.pull_load(&self.service, &self.spec.id, forget).await {
                Some(r) => *self.reports.lock().expect("reports lock") = Some((Instant::now(), r)),
                None if l.peers.is_none() => {
                    *self.reports.lock().expect("reports lock") = Some((Instant::now(), Vec::new()))
                }
                // The peers cannot be listed: the reports age, and the leader holds.
                None => {}
            }
            tokio::select! {
                _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                _ = shoal_proxy::server::stopped(&mut stop) => break,
            }
        }
    }

    /// `GET /api/cluster/load/SERVICE`: this replica's report, pulled by the leader (the
    /// same fields a Redis report carries).
    pub fn load_report(&self) -> Value {
        let (rps, in_flight) = self.local.lock().expect("local lock").unwrap_or_default();
        json!({
            "replica": self.spec.id,
            "rps": rps,
            "in_flight": in_flight,
            "latency": *self.latency_total.lock().expect("latency lock"),
        })
    }

    /// Fleet writes are fenced on the Kubernetes object itself (Lease backend).
    pub fn fences_deployment(&self) -> bool {
        matches!(self.backend, Backend::Lease(_))
    }

    /// A fence seen on the Deployment: a Lease created afresh starts above it.
    pub fn observe_fence(&self, fence: u64) {
        if let Backend::Lease(l) = &self.backend {
            l.observe_fence(fence);
        }
    }

    /// A fleet write with `token` was accepted.
    pub fn write_accepted(&self) {
        self.writes.inc();
    }

    /// A newer leader (`fence`) has written: step down, count and log it.
    pub fn fenced_by(&self, fence: u64, token: u64) {
        self.refused.inc();
        self.election
            .lock()
            .expect("election lock")
            .fenced(self.now());
        *self.since_wall.lock().expect("since lock") = None;
        tracing::warn!(service = %self.service, replica = %self.spec.id, token, fence, reason = "write refused by the fencing token", "stepping down: no longer the leader, fleet writes stop");
    }

    /// Records this replica's newest per-second load and adds this second's latency counts
    /// to the cumulative ones its reports carry.
    pub fn set_local(&self, rps: f64, in_flight: f64, latency: &[u64]) {
        *self.local.lock().expect("local lock") = Some((rps, in_flight));
        let mut p = self.latency_total.lock().expect("latency lock");
        if p.len() < latency.len() {
            p.resize(latency.len(), 0);
        }
        for (a, b) in p.iter_mut().zip(latency) {
            *a += b;
        }
    }

    /// The other replicas' latency counts since they were last taken, summed per bucket. A
    /// replica seen for the first time (or restarted: its counts went down) sets a baseline.
    pub fn take_others_latency(&self) -> Vec<u64> {
        let r = self.reports.lock().expect("reports lock");
        let mut consumed = self.consumed.lock().expect("consumed lock");
        let mut sum: Vec<u64> = Vec::new();
        for rep in r.iter().flat_map(|(_, v)| v) {
            if rep.replica == self.spec.id
                || Duration::from_millis(rep.age_ms) > self.spec.load_stale
            {
                continue;
            }
            let Some(last) = consumed.get(&rep.replica) else {
                consumed.insert(rep.replica.clone(), rep.latency.clone());
                continue;
            };
            let went_down = rep
                .latency
                .iter()
                .zip(last)
                .any(|(now, before)| now < before);
            if !went_down {
                if sum.len() < rep.latency.len() {
                    sum.resize(rep.latency.len(), 0);
                }
                for (i, (a, b)) in sum.iter_mut().zip(&rep.latency).enumerate() {
                    // Saturating: a report is data from elsewhere, never a reason to panic.
                    *a = a.saturating_add(b.saturating_sub(last.get(i).copied().unwrap_or(0)));
                }
            }
            consumed.insert(rep.replica.clone(), rep.latency.clone());
        }
        sum
    }

    /// The other replicas' load, summed; `Err` when it cannot be known now (a replica's
    /// report is stale, or Redis was not read lately): the caller holds.
    pub fn others(&self) -> Result<(f64, f64), String> {
        let r = self.reports.lock().expect("reports lock");
        match &*r {
            Some((at, reports)) if at.elapsed() <= self.spec.load_stale => others_load(
                reports,
                &self.spec.id,
                self.spec.load_stale,
                self.spec.load_age_out,
            ),
            Some(_) => Err(match self.backend {
                Backend::Redis { .. } => "shared load not read lately (Redis unreachable?)".into(),
                Backend::Lease(_) => "shared load not read lately (peers not listed?)".into(),
            }),
            None => Err("shared load not read yet".into()),
        }
    }

    /// Other replicas with a fresh report (they are serving clients).
    pub fn live_peers(&self) -> usize {
        let r = self.reports.lock().expect("reports lock");
        r.as_ref().map_or(0, |(_, v)| {
            v.iter()
                .filter(|r| {
                    r.replica != self.spec.id
                        && Duration::from_millis(r.age_ms) <= self.spec.load_stale
                })
                .count()
        })
    }

    /// Writes the fleet view with our token; false (and a step-down) when refused because
    /// a newer leader exists, or when we may not write any more.
    pub async fn publish_fleet(&self, desired: u32, members: Vec<SharedMember>) -> bool {
        let Some(token) = self.may_write() else {
            return false;
        };
        let view = FleetView {
            leader: self.spec.id.clone(),
            token,
            desired,
            members,
        };
        let v = serde_json::to_string(&view).unwrap_or_default();
        match self
            .script::<i64>(
                FENCED_SET,
                &[&self.keys.token, &self.keys.fence, &self.keys.fleet],
                &[token.to_string(), v],
            )
            .await
        {
            Ok(1) => {
                self.writes.inc();
                true
            }
            Ok(_) => {
                self.refused.inc();
                self.election
                    .lock()
                    .expect("election lock")
                    .fenced(self.now());
                *self.since_wall.lock().expect("since lock") = None;
                tracing::warn!(service = %self.service, replica = %self.spec.id, token, reason = "write refused by the fencing token", "stepping down: no longer the leader, fleet writes stop");
                false
            }
            Err(e) => {
                tracing::warn!(service = %self.service, error = %e, "fleet view not published");
                false
            }
        }
    }

    /// The fleet view the leader published last.
    pub async fn read_fleet(&self) -> Option<FleetView> {
        let r = async {
            let mut c = self.conn().await.ok()?;
            let v: Option<String> = redis::cmd("GET")
                .arg(&self.keys.fleet)
                .query_async(&mut c)
                .await
                .ok()?;
            serde_json::from_str(&v?).ok()
        };
        tokio::time::timeout(Duration::from_secs(1), r)
            .await
            .ok()
            .flatten()
    }

    /// `GET /api/leader`'s entry for this service.
    pub fn api(&self) -> Value {
        let e = self.election.lock().expect("election lock");
        let now = self.now();
        let token = e.may_write(now);
        let holder = self.holder.lock().expect("holder lock").clone();
        let since = self
            .since_wall
            .lock()
            .expect("since lock")
            .filter(|_| token.is_some())
            .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
            .map(|d| d.as_secs_f64());
        let backend = match &self.backend {
            Backend::Redis { .. } => json!({"kind": "redis"}),
            Backend::Lease(l) => {
                json!({"kind": "lease", "namespace": l.namespace(), "name": l.name(),
                                        "peers": l.peers})
            }
        };
        json!({
            "service": self.service,
            "backend": backend,
            "leader": token.is_some(),
            "id": self.spec.id,
            "holder": if token.is_some() { Some(self.spec.id.clone()) } else { holder.as_ref().and_then(|h| h.id.clone()) },
            "token": token.or(holder.as_ref().map(|h| h.token)),
            "since": since,
            "lease_ms": self.spec.timing.lease.as_millis() as u64,
            "lease_left_ms": holder.as_ref().map(|h| h.ttl_ms),
            "changes": e.changes,
            "last_step_down": e.last_step_down.map(|(at, why)| json!({
                "secs_ago": now.saturating_sub(at).as_secs_f64(),
                "reason": why.as_str(),
            })),
            "load": self.reports.lock().expect("reports lock").as_ref().map(|(_, r)| r.clone()),
        })
    }

    pub fn collect(&self, e: &mut Exposition) {
        let l = [("service", self.service.as_str())];
        e.gauge(
            "shoal_leader",
            "1 while this replica leads the service's fleet (makes its scaling decisions and writes).",
            &l,
            self.is_leader() as u8 as f64,
        );
        e.counter(
            "shoal_leader_changes_total",
            "Times this replica became or stopped being the leader.",
            &l,
            self.election.lock().expect("election lock").changes,
        );
        for (result, c) in [("accepted", &self.writes), ("refused", &self.refused)] {
            e.counter(
                "shoal_fenced_writes_total",
                "Fleet writes by this replica, by what the fencing token check said.",
                &[("service", self.service.as_str()), ("result", result)],
                c.get(),
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn r(replica: &str, age_ms: u64, rps: f64) -> LoadReport {
        LoadReport {
            replica: replica.into(),
            rps,
            in_flight: rps / 10.0,
            age_ms,
            latency: Vec::new(),
        }
    }

    #[test]
    fn others_load_sums_fresh_holds_on_stale_and_forgets_aged_out() {
        let (st, out) = (Duration::from_secs(3), Duration::from_secs(10));
        let v = [r("me", 0, 100.0), r("a", 500, 40.0), r("b", 1500, 60.0)];
        assert_eq!(others_load(&v, "me", st, out), Ok((100.0, 10.0)));
        let v = [r("a", 500, 40.0), r("b", 4000, 60.0)];
        assert!(others_load(&v, "me", st, out).unwrap_err().contains("b"));
        let v = [r("a", 500, 40.0), r("b", 11_000, 60.0)];
        assert_eq!(others_load(&v, "me", st, out), Ok((40.0, 4.0)));
    }
}

#[cfg(test)]
mod config_tests {
    use super::*;

    fn spec(extra: &str) -> Result<Option<ClusterSpec>, ConfigError> {
        let text = format!(
            "[services.web]\nlisten = \"127.0.0.1:8080\"\nbackends = [\"127.0.0.1:9000\"]\n\n[cluster]\n{extra}"
        );
        let c = Config::parse(std::path::Path::new("shoal.toml"), &text).unwrap();
        cluster_spec(&c)
    }

    #[test]
    fn cluster_table_defaults_and_errors_name_line_and_field() {
        let s = spec("redis = \"redis://127.0.0.1:6379/\"\nid = \"r1\"\n")
            .unwrap()
            .unwrap();
        assert_eq!(s.id, "r1");
        assert_eq!(s.timing, Timing::for_lease(Duration::from_secs(15)));
        let s = spec("redis = \"redis://a:1,redis://b:2\"\nlease = \"2s\"\n")
            .unwrap()
            .unwrap();
        assert_eq!(s.timing.lease, Duration::from_secs(2));
        assert!(s.timing.renew_deadline < s.timing.lease);
        let e = spec("redis = \"nope\"\n").unwrap_err();
        assert_eq!((e.line, e.field.as_str()), (6, "cluster.redis"), "{e}");
        let e =
            spec("redis = \"redis://h:1\"\nlease = \"2s\"\nrenew_deadline = \"3s\"\n").unwrap_err();
        assert_eq!(
            (e.line, e.field.as_str()),
            (8, "cluster.renew_deadline"),
            "{e}"
        );
        assert!(e.to_string().contains("shorter than lease"), "{e}");
        let e = spec("redis = \"redis://h:1\"\nleases = \"2s\"\n").unwrap_err();
        assert_eq!(e.field, "cluster", "{e}");
        assert!(e.to_string().contains("leases"), "{e}");
        let e = spec("lease = \"2s\"\n").unwrap_err();
        assert!(e.to_string().contains("redis"), "{e}");
        assert_eq!(e.file, "shoal.toml");
    }

    fn kube_spec(fleet: &str, cluster: &str) -> Result<Option<ClusterSpec>, ConfigError> {
        let text = format!(
            "[services.web]\nlisten = \"127.0.0.1:8080\"\n[services.web.fleet]\n{fleet}\n\n[cluster]\n{cluster}"
        );
        let c = Config::parse(std::path::Path::new("shoal.toml"), &text).unwrap();
        cluster_spec(&c)
    }

    #[test]
    fn without_redis_a_lease_for_kubernetes_fleets_only() {
        let k = "provider = \"kubernetes\"\ndeployment = \"web\"";
        let s = kube_spec(
            k,
            "lease = \"3s\"\npeers = \"shoal\"\nlease_name = \"web-lock\"\n",
        )
        .unwrap()
        .unwrap();
        assert_eq!(s.redis, None);
        assert_eq!(
            (s.peers.as_deref(), s.lease_name.as_deref()),
            (Some("shoal"), Some("web-lock"))
        );
        let e = kube_spec(k, "peers = \"Shoal_peers\"\n").unwrap_err();
        assert_eq!((e.line, e.field.as_str()), (8, "cluster.peers"), "{e}");
        assert_eq!(e.file, "shoal.toml");
        let e = kube_spec(k, "redis = \"redis://h:1\"\nnamespace = \"web\"\n").unwrap_err();
        assert_eq!((e.line, e.field.as_str()), (9, "cluster.namespace"), "{e}");
        let e = kube_spec("command = \"sleep 100\"", "lease = \"3s\"\n").unwrap_err();
        assert_eq!(e.field, "cluster", "{e}");
        assert!(
            e.to_string().contains("redis") && e.to_string().contains("service web"),
            "{e}"
        );
    }
}
