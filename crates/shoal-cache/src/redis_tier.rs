//! The Redis tier, shared by several shoal processes. It never fails or holds up a request:
//! every call has a short timeout, a failure switches the tier off for a moment (the memory
//! tier carries on alone), and the connection is rebuilt in the background.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::redis_conn::{ConnectOptions, RedisClient, RedisConn};

use crate::object::{decode, encode, DecodeError, Entry};
use crate::policy::PolicyConfig;

/// Key layout: `shoal:cache:{}URL` for objects, `shoal:cache-tag:{}TAG` for the set of URLs a
/// surrogate key tags. The empty `{}` makes Redis Cluster hash the whole key: a `{…}` in a
/// client's URL would otherwise pick the slot, and a client could pile every object on one node.
const OBJ_PREFIX: &str = "shoal:cache:{}";
const TAG_PREFIX: &str = "shoal:cache-tag:{}";

#[derive(Debug, Clone)]
pub struct RedisConfig {
    pub url: String,
    /// Limit for a lookup or store; past it the request goes on without Redis.
    pub timeout: Duration,
    /// Limit for purge calls (admin).
    pub purge_timeout: Duration,
    /// How long the tier stays off after a failure before it is tried again.
    pub backoff: Duration,
}

impl RedisConfig {
    pub fn new(url: impl Into<String>) -> Self {
        RedisConfig {
            url: url.into(),
            timeout: Duration::from_millis(50),
            purge_timeout: Duration::from_secs(5),
            backoff: Duration::from_secs(1),
        }
    }
}

pub struct RedisTier {
    cfg: RedisConfig,
    client: RedisClient,
    conn: Mutex<Option<RedisConn>>,
    connecting: AtomicBool,
    base: Instant,
    off_until_ms: AtomicU64,
    errors: AtomicU64,
    policy: PolicyConfig,
}

#[derive(Debug, thiserror::Error)]
pub enum RedisTierError {
    #[error("invalid Redis URL {0:?}: {1}")]
    Url(String, String),
    #[error("Redis is unavailable")]
    Unavailable,
    #[error("Redis: {0}")]
    Redis(String),
}

impl RedisTier {
    /// Validates the URL; connecting happens in the background on first use.
    pub fn new(cfg: RedisConfig, policy: PolicyConfig) -> Result<Arc<Self>, RedisTierError> {
        let client = RedisClient::open(cfg.url.as_str())
            .map_err(|e| RedisTierError::Url(cfg.url.clone(), e.to_string()))?;
        Ok(Arc::new(RedisTier {
            cfg,
            client,
            conn: Mutex::new(None),
            connecting: AtomicBool::new(false),
            base: Instant::now(),
            off_until_ms: AtomicU64::new(0),
            errors: AtomicU64::new(0),
            policy,
        }))
    }

    /// Starts connecting now (when called inside a tokio runtime) rather than on first use.
    pub fn warm_up(self: &Arc<Self>) {
        if tokio::runtime::Handle::try_current().is_ok() {
            self.start_connect();
        }
    }

    fn now_ms(&self) -> u64 {
        self.base.elapsed().as_millis() as u64
    }

    /// The connection, if the tier is usable now; starts a reconnect otherwise.
    fn conn(self: &Arc<Self>) -> Option<RedisConn> {
        if self.now_ms() < self.off_until_ms.load(Ordering::Relaxed) {
            return None;
        }
        if let Some(c) = self.conn.lock().unwrap().clone() {
            return Some(c);
        }
        self.start_connect();
        None
    }

    fn start_connect(self: &Arc<Self>) {
        if self.connecting.swap(true, Ordering::AcqRel) {
            return;
        }
        let me = self.clone();
        tokio::spawn(async move {
            let t = me.cfg.timeout.max(Duration::from_millis(200));
            let o = ConnectOptions {
                connect_timeout: t,
                response_timeout: me.cfg.timeout,
                retries: 1,
                max_delay_ms: 1_000,
            };
            let r = tokio::time::timeout(t * 2, me.client.connect(o)).await;
            match r {
                Ok(Ok(c)) => {
                    tracing::info!(url = %me.cfg.url, "cache: connected to Redis");
                    *me.conn.lock().unwrap() = Some(c);
                }
                Ok(Err(e)) => me.failed("connect", &e.to_string()),
                Err(_) => me.failed("connect", "timed out"),
            }
            me.connecting.store(false, Ordering::Release);
        });
    }

    /// Counts and logs a failure, drops the connection and switches the tier off for the
    /// backoff period.
    fn failed(&self, op: &str, err: &str) {
        let n = self.errors.fetch_add(1, Ordering::Relaxed) + 1;
        // Log the first failure of an outage and then every 100th, not every request.
        if self.conn.lock().unwrap().take().is_some() || n % 100 == 1 {
            tracing::warn!(
                op,
                error = err,
                errors = n,
                "cache: Redis failed; memory tier only"
            );
        }
        let until = self.now_ms() + self.cfg.backoff.as_millis() as u64;
        self.off_until_ms.store(until, Ordering::Relaxed);
    }

    pub fn errors(&self) -> u64 {
        self.errors.load(Ordering::Relaxed)
    }

    pub fn connected(&self) -> bool {
        self.conn.lock().unwrap().is_some()
            && self.now_ms() >= self.off_until_ms.load(Ordering::Relaxed)
    }

    /// Looks `key` up; `None` on a miss, an unreadable object, or any Redis trouble.
    pub async fn get(self: &Arc<Self>, key: &str) -> Option<Entry> {
        let mut c = self.conn()?;
        let cmd = redis::cmd("GET").arg(obj_key(key)).clone();
        let r = tokio::time::timeout(self.cfg.timeout, cmd.query_async::<Option<Vec<u8>>>(&mut c))
            .await;
        let bytes = match r {
            Ok(Ok(b)) => b?,
            Ok(Err(e)) => {
                self.failed("get", &e.to_string());
                return None;
            }
            Err(_) => {
                self.failed("get", "timed out");
                return None;
            }
        };
        match decode(&bytes, &self.policy) {
            Ok(e) => Some(e),
            // Written by another shoal version: a miss, overwritten by the next store.
            Err(DecodeError::Version(_)) => None,
            Err(e) => {
                tracing::warn!(key, error = %e, "cache: unreadable object in Redis");
                self.errors.fetch_add(1, Ordering::Relaxed);
                None
            }
        }
    }

    /// Stores `entry` for `keep` in the background; never waits.
    pub fn put(self: &Arc<Self>, key: &str, entry: &Entry, keep: Duration) {
        let Some(mut c) = self.conn() else { return };
        let value = encode(entry);
        let ms = keep.as_millis().max(1) as u64;
        let mut pipe = redis::pipe();
        let k = obj_key(key);
        pipe.cmd("SET")
            .arg(&k)
            .arg(value)
            .arg("PX")
            .arg(ms)
            .ignore();
        for tag in entry.surrogate_keys() {
            let t = format!("{TAG_PREFIX}{tag}");
            pipe.cmd("SADD").arg(&t).arg(key).ignore();
            // The tag set lives as long as its longest-lived member.
            pipe.cmd("PEXPIRE").arg(&t).arg(ms).arg("GT").ignore();
            pipe.cmd("PEXPIRE").arg(&t).arg(ms).arg("NX").ignore();
        }
        let me = self.clone();
        tokio::spawn(async move {
            let r = tokio::time::timeout(me.cfg.timeout * 4, c.run_pipeline(&pipe)).await;
            match r {
                Ok(Ok(())) => {}
                Ok(Err(e)) => me.failed("set", &e.to_string()),
                Err(_) => me.failed("set", "timed out"),
            }
        });
    }

    /// Deletes objects (a purge: reaches Redis even during a backoff).
    pub async fn remove(self: &Arc<Self>, keys: &[String]) -> Result<u64, RedisTierError> {
        let ks: Vec<String> = keys.iter().map(|k| obj_key(k)).collect();
        self.admin(move |mut c| async move {
            redis::cmd("DEL").arg(ks).query_async::<u64>(&mut c).await
        })
        .await
    }

    /// Deletes one object in the background (invalidation after an unsafe request): like a
    /// store, it uses the live connection within the tier's timeout and is skipped while the
    /// tier is off, so an outage never costs a connection attempt per request.
    pub fn forget(self: &Arc<Self>, key: &str) {
        let Some(mut c) = self.conn() else { return };
        let cmd = redis::cmd("DEL").arg(obj_key(key)).clone();
        let me = self.clone();
        tokio::spawn(async move {
            match tokio::time::timeout(me.cfg.timeout * 4, cmd.query_async::<u64>(&mut c)).await {
                Ok(Ok(_)) => {}
                Ok(Err(e)) => me.failed("del", &e.to_string()),
                Err(_) => me.failed("del", "timed out"),
            }
        });
    }

    /// Deletes every object whose URL starts with `prefix` (SCAN, so Redis is not blocked).
    pub async fn purge_prefix(self: &Arc<Self>, prefix: &str) -> Result<u64, RedisTierError> {
        let pattern = format!("{}{}*", glob_escape(OBJ_PREFIX), glob_escape(prefix));
        self.admin(move |mut c| async move {
            c.scan_each(&pattern, |c, keys| {
                Box::pin(async move { redis::cmd("DEL").arg(keys).query_async::<u64>(c).await })
            })
            .await
        })
        .await
    }

    /// Deletes every object tagged `tag` and the tag's set.
    pub async fn purge_surrogate(self: &Arc<Self>, tag: &str) -> Result<u64, RedisTierError> {
        let t = format!("{TAG_PREFIX}{tag}");
        self.admin(move |mut c| async move {
            let urls: Vec<String> = redis::cmd("SMEMBERS").arg(&t).query_async(&mut c).await?;
            let mut n = 0;
            for chunk in urls.chunks(500) {
                let keys: Vec<String> = chunk.iter().map(|u| obj_key(u)).collect();
                n += redis::cmd("DEL")
                    .arg(&keys)
                    .query_async::<u64>(&mut c)
                    .await?;
            }
            redis::cmd("DEL").arg(&t).query_async::<u64>(&mut c).await?;
            Ok(n)
        })
        .await
    }

    async fn admin<F, Fut>(self: &Arc<Self>, f: F) -> Result<u64, RedisTierError>
    where
        F: FnOnce(RedisConn) -> Fut,
        Fut: std::future::Future<Output = redis::RedisResult<u64>>,
    {
        // Purges must reach Redis even during a backoff: try to connect once, directly.
        let existing = self.conn.lock().unwrap().clone();
        let c = match existing {
            Some(c) => c,
            None => {
                let o = ConnectOptions {
                    connect_timeout: self.cfg.purge_timeout,
                    response_timeout: self.cfg.purge_timeout,
                    retries: 1,
                    max_delay_ms: 1_000,
                };
                match tokio::time::timeout(self.cfg.purge_timeout, self.client.connect(o)).await {
                    Ok(Ok(c)) => c,
                    _ => {
                        self.failed("purge", "unavailable");
                        return Err(RedisTierError::Unavailable);
                    }
                }
            }
        };
        match tokio::time::timeout(self.cfg.purge_timeout, f(c)).await {
            Ok(Ok(n)) => Ok(n),
            Ok(Err(e)) => {
                self.failed("purge", &e.to_string());
                Err(RedisTierError::Redis(e.to_string()))
            }
            Err(_) => {
                self.failed("purge", "timed out");
                Err(RedisTierError::Unavailable)
            }
        }
    }
}

fn obj_key(url: &str) -> String {
    format!("{OBJ_PREFIX}{url}")
}

/// Escapes Redis glob metacharacters so a prefix matches literally.
fn glob_escape(s: &str) -> String {
    let mut o = String::with_capacity(s.len());
    for c in s.chars() {
        if matches!(c, '*' | '?' | '[' | ']' | '\\') {
            o.push('\\');
        }
        o.push(c);
    }
    o
}

#[cfg(test)]
mod tests {
    #[test]
    fn glob_escape_makes_prefixes_literal() {
        assert_eq!(
            super::glob_escape("http://a/x?[1]*"),
            "http://a/x\\?\\[1\\]\\*"
        );
    }
}
