//! Where job states and results live: Redis (shared by shoal replicas, TTL by Redis) or an
//! embedded redb file in `data_dir` (survives restarts; expiry checked on read and swept).
//!
//! Lifetimes: a pending record and its idempotency key live until the job ends (bounded by
//! [`PENDING_LIMIT`] only, for jobs lost outside shoal); the result TTL runs from the final
//! record, which also starts the key's TTL, so a queued job never expires into a 404 and a
//! retried submission never runs it twice.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use futures_util::future::BoxFuture;
use redb::{Database, ReadableDatabase, ReadableTable, ReadableTableMetadata, TableDefinition};

use shoal_cache::redis_conn::{ConnectOptions, RedisClient, RedisConn};

use crate::job::{now_ms, JobRecord, FINAL_TAGS};
use crate::QueueError;

/// Milliseconds since the Unix epoch; injected so expiry is tested without waiting.
pub type Clock = Arc<dyn Fn() -> u64 + Send + Sync>;

/// Longest a record may stay pending: a job whose message is gone from the broker (a topic
/// deleted by hand) would otherwise keep its record forever.
pub const PENDING_LIMIT: Duration = Duration::from_secs(30 * 24 * 3600);

/// Every Redis call's limit, connection included: a stalled Redis must fail submissions
/// quickly (503) instead of holding their bodies.
pub const REDIS_TIMEOUT: Duration = Duration::from_secs(1);

/// The result store. Every call is a short I/O operation; errors are reported, never hidden.
pub trait Store: Send + Sync + 'static {
    fn get<'a>(&'a self, id: &'a str) -> BoxFuture<'a, Result<Option<JobRecord>, QueueError>>;
    /// Records an accepted job (before its publish, so a fast worker cannot be overtaken).
    fn put_pending<'a>(
        &'a self,
        id: &'a str,
        submitted_ms: u64,
    ) -> BoxFuture<'a, Result<(), QueueError>>;
    /// Stores a final record unless one is there already. Ok(false): it was (a duplicate).
    /// The result TTL starts now, for the record and for `key` (the idempotency key that
    /// made the job) when that is still bound to `id`.
    fn finish<'a>(
        &'a self,
        id: &'a str,
        rec: &'a JobRecord,
        key: Option<&'a str>,
    ) -> BoxFuture<'a, Result<bool, QueueError>>;
    fn delete<'a>(&'a self, id: &'a str) -> BoxFuture<'a, Result<(), QueueError>>;
    /// Binds an idempotency key to `value` (which starts with the job id) unless it is bound
    /// already: Ok(Some(the existing value)).
    fn claim_key<'a>(
        &'a self,
        key: &'a str,
        value: &'a str,
    ) -> BoxFuture<'a, Result<Option<String>, QueueError>>;
    /// Unbinds `key`, only while it is still bound to `value` (compare and delete): a key
    /// another submission took over meanwhile keeps its new binding.
    fn release_key<'a>(
        &'a self,
        key: &'a str,
        value: &'a str,
    ) -> BoxFuture<'a, Result<(), QueueError>>;
    /// Drops expired entries; returns how many (a no-op where the backend expires by itself).
    fn sweep(&self) -> BoxFuture<'_, Result<u64, QueueError>> {
        Box::pin(async { Ok(0) })
    }
}

const JOBS: TableDefinition<&str, &[u8]> = TableDefinition::new("jobs");
const KEYS: TableDefinition<&str, &[u8]> = TableDefinition::new("idempotency_keys");

/// The embedded store: one redb file; values carry their expiry time (8 bytes, ms) in front.
/// Writes go through one writer thread that commits whatever is waiting in one transaction
/// (group commit): each write is durable (fsynced) before it is answered, and concurrent
/// jobs share the fsync instead of queueing for one each.
#[derive(Clone)]
pub struct RedbStore {
    db: Arc<Database>,
    writer: Arc<Writer>,
    ttl: Duration,
    clock: Clock,
    /// The queue whose jobs this handle reads and writes ("" for none): job ids are looked up
    /// only within it, so a job URL on one listener never answers another queue's job.
    ns: String,
}

/// Runs a write inside the batch's transaction (or learns it could not begin) and returns
/// what to do once the commit's outcome is known.
type WriteOp =
    Box<dyn FnOnce(Result<&redb::WriteTransaction, QueueError>) -> Committed + Send + 'static>;
type Committed = Box<dyn FnOnce(Result<(), QueueError>) + Send + 'static>;

/// Most writes committed together.
const MAX_BATCH: usize = 256;

/// The writer thread; dropping the last store stops it and waits, so the file is closed
/// when the store is gone (a reopen right after succeeds).
struct Writer {
    tx: Option<std::sync::mpsc::Sender<WriteOp>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Writer {
    fn start(db: Arc<Database>) -> Result<Writer, QueueError> {
        let (tx, rx) = std::sync::mpsc::channel::<WriteOp>();
        let thread = std::thread::Builder::new()
            .name("shoal-redb".into())
            .spawn(move || {
                while let Ok(first) = rx.recv() {
                    let mut ops = vec![first];
                    while ops.len() < MAX_BATCH {
                        match rx.try_recv() {
                            Ok(op) => ops.push(op),
                            Err(_) => break,
                        }
                    }
                    match db.begin_write() {
                        Ok(w) => {
                            let done: Vec<Committed> =
                                ops.into_iter().map(|op| op(Ok(&w))).collect();
                            let r = w.commit().map_err(se);
                            for d in done {
                                d(r.clone());
                            }
                        }
                        Err(e) => {
                            let e = se(e);
                            for op in ops {
                                op(Err(e.clone()))(Err(e.clone()));
                            }
                        }
                    }
                }
            })
            .map_err(|e| QueueError::Store(format!("store writer: {e}")))?;
        Ok(Writer {
            tx: Some(tx),
            thread: Some(thread),
        })
    }
}

impl Drop for Writer {
    fn drop(&mut self) {
        drop(self.tx.take());
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl RedbStore {
    /// Opens (or creates) `path`. `ttl` applies to every job and idempotency key.
    pub fn open(path: &Path, ttl: Duration) -> Result<RedbStore, QueueError> {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)
                .map_err(|e| QueueError::Store(format!("{}: {e}", dir.display())))?;
        }
        let db = Database::create(path)
            .map_err(|e| QueueError::Store(format!("{}: {e}", path.display())))?;
        let w = db.begin_write().map_err(se)?;
        w.open_table(JOBS).map_err(se)?;
        w.open_table(KEYS).map_err(se)?;
        w.commit().map_err(se)?;
        let db = Arc::new(db);
        Ok(RedbStore {
            writer: Arc::new(Writer::start(db.clone())?),
            db,
            ttl,
            clock: Arc::new(now_ms),
            ns: String::new(),
        })
    }

    /// The same file for one queue's jobs, with that queue's TTL.
    pub fn for_queue(&self, queue: &str, ttl: Duration) -> RedbStore {
        RedbStore {
            ttl,
            ns: queue.to_string(),
            ..self.clone()
        }
    }

    /// The table key of a job id.
    fn job_key(&self, id: &str) -> String {
        if self.ns.is_empty() {
            id.to_string()
        } else {
            format!("{}/{id}", self.ns)
        }
    }

    /// The same file with another TTL (one database per file; queues differ in TTL).
    pub fn with_ttl(&self, ttl: Duration) -> RedbStore {
        RedbStore {
            ttl,
            ..self.clone()
        }
    }

    /// The same file read and written against another clock (tests).
    pub fn with_clock(&self, clock: Clock) -> RedbStore {
        RedbStore {
            clock,
            ..self.clone()
        }
    }

    /// Runs `f` in the writer's next transaction; answers once it is committed.
    async fn write<T: Send + 'static>(
        &self,
        f: impl FnOnce(&redb::WriteTransaction) -> Result<T, QueueError> + Send + 'static,
    ) -> Result<T, QueueError> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        let op: WriteOp = Box::new(move |w| {
            let r = w.and_then(f);
            Box::new(move |commit: Result<(), QueueError>| {
                let _ = tx.send(commit.and(r));
            })
        });
        let stopped = || QueueError::Store("store writer stopped".into());
        self.writer
            .tx
            .as_ref()
            .ok_or_else(stopped)?
            .send(op)
            .map_err(|_| stopped())?;
        rx.await.map_err(|_| stopped())?
    }

    fn now(&self) -> u64 {
        (self.clock)()
    }

    /// When a final record (and its key) expires.
    fn expiry(&self) -> u64 {
        self.now().saturating_add(self.ttl.as_millis() as u64)
    }

    /// When a pending record (and its key) expires if its job never ends.
    fn pending_expiry(&self) -> u64 {
        self.now().saturating_add(PENDING_LIMIT.as_millis() as u64)
    }

    async fn blocking<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Database) -> Result<T, QueueError> + Send + 'static,
    ) -> Result<T, QueueError> {
        let db = self.db.clone();
        tokio::task::spawn_blocking(move || f(&db))
            .await
            .map_err(|e| QueueError::Store(format!("store task: {e}")))?
    }
}

fn se(e: impl std::fmt::Display) -> QueueError {
    QueueError::Store(e.to_string())
}

fn with_expiry(expires: u64, v: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(8 + v.len());
    out.extend_from_slice(&expires.to_be_bytes());
    out.extend_from_slice(v);
    out
}

/// The live payload of a stored value, or None when it expired (or is too short to be ours).
fn live(v: &[u8], now: u64) -> Option<&[u8]> {
    let (exp, rest) = v.split_at_checked(8)?;
    let exp = u64::from_be_bytes(exp.try_into().ok()?);
    (exp > now).then_some(rest)
}

impl Store for RedbStore {
    fn get<'a>(&'a self, id: &'a str) -> BoxFuture<'a, Result<Option<JobRecord>, QueueError>> {
        let id = self.job_key(id);
        let now = self.now();
        Box::pin(self.blocking(move |db| {
            let r = db.begin_read().map_err(se)?;
            let t = r.open_table(JOBS).map_err(se)?;
            let Some(v) = t.get(id.as_str()).map_err(se)? else {
                return Ok(None);
            };
            match live(v.value(), now) {
                Some(b) => Ok(Some(JobRecord::decode(b).map_err(se)?)),
                None => Ok(None),
            }
        }))
    }

    fn put_pending<'a>(
        &'a self,
        id: &'a str,
        submitted_ms: u64,
    ) -> BoxFuture<'a, Result<(), QueueError>> {
        let id = self.job_key(id);
        let v = with_expiry(
            self.pending_expiry(),
            &JobRecord::Pending { submitted_ms }.encode(),
        );
        Box::pin(self.write(move |w| {
            w.open_table(JOBS)
                .map_err(se)?
                .insert(id.as_str(), v.as_slice())
                .map_err(se)?;
            Ok(())
        }))
    }

    fn finish<'a>(
        &'a self,
        id: &'a str,
        rec: &'a JobRecord,
        key: Option<&'a str>,
    ) -> BoxFuture<'a, Result<bool, QueueError>> {
        let raw_id = id.to_string();
        let id = self.job_key(id);
        let key = key.map(str::to_string);
        let now = self.now();
        let expires = self.expiry();
        let v = with_expiry(expires, &rec.encode());
        Box::pin(self.write(move |w| {
            // Writes run one after another in the writer: check-and-set is atomic.
            let fresh = {
                let mut t = w.open_table(JOBS).map_err(se)?;
                let done = match t.get(id.as_str()).map_err(se)? {
                    Some(old) => live(old.value(), now)
                        .and_then(|b| b.first())
                        .is_some_and(|tag| FINAL_TAGS.contains(tag)),
                    None => false,
                };
                if !done {
                    t.insert(id.as_str(), v.as_slice()).map_err(se)?;
                }
                !done
            };
            if let (true, Some(key)) = (fresh, key) {
                let mut t = w.open_table(KEYS).map_err(se)?;
                let bound = match t.get(key.as_str()).map_err(se)? {
                    Some(old) => live(old.value(), now)
                        .filter(|b| b.starts_with(raw_id.as_bytes()))
                        .map(<[u8]>::to_vec),
                    None => None,
                };
                if let Some(b) = bound {
                    t.insert(key.as_str(), with_expiry(expires, &b).as_slice())
                        .map_err(se)?;
                }
            }
            Ok(fresh)
        }))
    }

    fn delete<'a>(&'a self, id: &'a str) -> BoxFuture<'a, Result<(), QueueError>> {
        let id = self.job_key(id);
        Box::pin(self.write(move |w| {
            w.open_table(JOBS)
                .map_err(se)?
                .remove(id.as_str())
                .map_err(se)?;
            Ok(())
        }))
    }

    fn claim_key<'a>(
        &'a self,
        key: &'a str,
        value: &'a str,
    ) -> BoxFuture<'a, Result<Option<String>, QueueError>> {
        let key = key.to_string();
        let now = self.now();
        let v = with_expiry(self.pending_expiry(), value.as_bytes());
        Box::pin(self.write(move |w| {
            let existing = {
                let mut t = w.open_table(KEYS).map_err(se)?;
                let existing = match t.get(key.as_str()).map_err(se)? {
                    Some(old) => {
                        live(old.value(), now).map(|b| String::from_utf8_lossy(b).into_owned())
                    }
                    None => None,
                };
                if existing.is_none() {
                    t.insert(key.as_str(), v.as_slice()).map_err(se)?;
                }
                existing
            };
            Ok(existing)
        }))
    }

    fn release_key<'a>(
        &'a self,
        key: &'a str,
        value: &'a str,
    ) -> BoxFuture<'a, Result<(), QueueError>> {
        let key = key.to_string();
        let value = value.to_string();
        Box::pin(self.write(move |w| {
            let mut t = w.open_table(KEYS).map_err(se)?;
            // Expiry prefix, then the binding: compared on the binding only.
            let bound = t
                .get(key.as_str())
                .map_err(se)?
                .is_some_and(|v| v.value().get(8..) == Some(value.as_bytes()));
            if bound {
                t.remove(key.as_str()).map_err(se)?;
            }
            Ok(())
        }))
    }

    fn sweep(&self) -> BoxFuture<'_, Result<u64, QueueError>> {
        let now = self.now();
        Box::pin(self.write(move |w| {
            let mut n = 0;
            for def in [JOBS, KEYS] {
                let mut t = w.open_table(def).map_err(se)?;
                let before = t.len().map_err(se)?;
                t.retain(|_, v| live(v, now).is_some()).map_err(se)?;
                n += before - t.len().map_err(se)?;
            }
            Ok(n)
        }))
    }
}

/// The Redis store (one node or a Redis Cluster): `{prefix}job:[{queue}:]{id}` and
/// `{prefix}key:{}{key}` (the empty `{}` makes a cluster hash the whole key, so a `{…}` in a
/// client's key cannot choose the slot); Redis expires them (the pending limit while the job
/// runs, `EX ttl` from its end). Every call is bounded by [`REDIS_TIMEOUT`].
#[derive(Clone)]
pub struct RedisStore {
    conn: RedisConn,
    prefix: String,
    /// `{queue}:` when the handle is for one queue's jobs (see [`RedbStore`]'s `ns`).
    ns: String,
    ttl_secs: u64,
}

/// Sets the final record unless a final one is there (the first byte is the record tag, one
/// of ARGV[4..]), and starts the TTL of the idempotency key (KEYS[2]) still bound to the job
/// (its value starts with the id, ARGV[3]).
const FINISH_LUA: &str = r"local v = redis.call('GET', KEYS[1])
if v then
  local tag = string.byte(v, 1)
  for i = 4, #ARGV do
    if tag == tonumber(ARGV[i]) then return 0 end
  end
end
redis.call('SET', KEYS[1], ARGV[1], 'EX', ARGV[2])
if KEYS[2] then
  local k = redis.call('GET', KEYS[2])
  if k and string.sub(k, 1, #ARGV[3]) == ARGV[3] then
    redis.call('EXPIRE', KEYS[2], ARGV[2])
  end
end
return 1";

/// Starts the TTL (ARGV[2]) of an idempotency key still bound to the job (ARGV[1]): on a
/// cluster, [`FINISH_LUA`]'s second half, since the two keys live in different slots.
const KEY_TTL_LUA: &str = r"local k = redis.call('GET', KEYS[1])
if k and string.sub(k, 1, #ARGV[1]) == ARGV[1] then
  redis.call('EXPIRE', KEYS[1], ARGV[2])
end
return 1";

impl RedisStore {
    pub async fn connect(url: &str, prefix: &str, ttl: Duration) -> Result<RedisStore, QueueError> {
        let client = RedisClient::open(url).map_err(|e| QueueError::Store(e.to_string()))?;
        let o = ConnectOptions {
            connect_timeout: REDIS_TIMEOUT,
            response_timeout: REDIS_TIMEOUT,
            retries: 2,
            max_delay_ms: 1000,
        };
        let conn = bounded(client.connect(o))
            .await
            .map_err(|e| QueueError::Store(format!("redis: {e}")))?;
        Ok(RedisStore {
            conn,
            prefix: prefix.to_string(),
            ns: String::new(),
            ttl_secs: ttl.as_secs().max(1),
        })
    }

    /// The same connection with another TTL.
    pub fn with_ttl(&self, ttl: Duration) -> RedisStore {
        RedisStore {
            ttl_secs: ttl.as_secs().max(1),
            ..self.clone()
        }
    }

    /// The same connection for one queue's jobs (`{prefix}job:{queue}:{id}`), with its TTL.
    pub fn for_queue(&self, queue: &str, ttl: Duration) -> RedisStore {
        RedisStore {
            ttl_secs: ttl.as_secs().max(1),
            ns: format!("{queue}:"),
            ..self.clone()
        }
    }

    fn job_key(&self, id: &str) -> String {
        format!("{}job:{}{id}", self.prefix, self.ns)
    }

    fn key_key(&self, key: &str) -> String {
        format!("{}key:{{}}{key}", self.prefix)
    }
}

fn re(e: redis::RedisError) -> QueueError {
    QueueError::Store(format!("redis: {e}"))
}

/// Runs one Redis call within [`REDIS_TIMEOUT`] (plus a margin for the manager's own
/// timeout to answer first), whatever state the connection is in.
async fn bounded<T>(
    f: impl std::future::Future<Output = Result<T, redis::RedisError>>,
) -> Result<T, QueueError> {
    match tokio::time::timeout(REDIS_TIMEOUT + Duration::from_millis(250), f).await {
        Ok(r) => r.map_err(re),
        Err(_) => Err(QueueError::Store("redis: timed out".into())),
    }
}

impl Store for RedisStore {
    fn get<'a>(&'a self, id: &'a str) -> BoxFuture<'a, Result<Option<JobRecord>, QueueError>> {
        Box::pin(async move {
            let mut c = self.conn.clone();
            let v: Option<Vec<u8>> =
                bounded(redis::cmd("GET").arg(self.job_key(id)).query_async(&mut c)).await?;
            v.map(|b| JobRecord::decode(&b).map_err(se)).transpose()
        })
    }

    fn put_pending<'a>(
        &'a self,
        id: &'a str,
        submitted_ms: u64,
    ) -> BoxFuture<'a, Result<(), QueueError>> {
        Box::pin(async move {
            let mut c = self.conn.clone();
            bounded(
                redis::cmd("SET")
                    .arg(self.job_key(id))
                    .arg(JobRecord::Pending { submitted_ms }.encode())
                    .arg("EX")
                    .arg(PENDING_LIMIT.as_secs())
                    .query_async::<()>(&mut c),
            )
            .await
        })
    }

    fn finish<'a>(
        &'a self,
        id: &'a str,
        rec: &'a JobRecord,
        key: Option<&'a str>,
    ) -> BoxFuture<'a, Result<bool, QueueError>> {
        Box::pin(async move {
            let mut c = self.conn.clone();
            // One script on one node; two on a cluster (a script may touch one slot only).
            let split = c.is_cluster();
            let mut cmd = redis::cmd("EVAL");
            cmd.arg(FINISH_LUA);
            match key {
                Some(k) if !split => cmd.arg(2).arg(self.job_key(id)).arg(self.key_key(k)),
                _ => cmd.arg(1).arg(self.job_key(id)),
            };
            cmd.arg(rec.encode()).arg(self.ttl_secs).arg(id);
            for tag in FINAL_TAGS {
                cmd.arg(tag);
            }
            let n: i64 = bounded(cmd.query_async(&mut c)).await?;
            if let (true, 1, Some(k)) = (split, n, key) {
                bounded(
                    redis::cmd("EVAL")
                        .arg(KEY_TTL_LUA)
                        .arg(1)
                        .arg(self.key_key(k))
                        .arg(id)
                        .arg(self.ttl_secs)
                        .query_async::<i64>(&mut c),
                )
                .await?;
            }
            Ok(n == 1)
        })
    }

    fn delete<'a>(&'a self, id: &'a str) -> BoxFuture<'a, Result<(), QueueError>> {
        Box::pin(async move {
            let mut c = self.conn.clone();
            bounded(
                redis::cmd("DEL")
                    .arg(self.job_key(id))
                    .query_async::<()>(&mut c),
            )
            .await
        })
    }

    fn claim_key<'a>(
        &'a self,
        key: &'a str,
        value: &'a str,
    ) -> BoxFuture<'a, Result<Option<String>, QueueError>> {
        Box::pin(async move {
            let mut c = self.conn.clone();
            // SET NX GET: returns the old value and sets only when there was none.
            bounded(
                redis::cmd("SET")
                    .arg(self.key_key(key))
                    .arg(value)
                    .arg("NX")
                    .arg("GET")
                    .arg("EX")
                    .arg(PENDING_LIMIT.as_secs())
                    .query_async(&mut c),
            )
            .await
        })
    }

    fn release_key<'a>(
        &'a self,
        key: &'a str,
        value: &'a str,
    ) -> BoxFuture<'a, Result<(), QueueError>> {
        Box::pin(async move {
            let mut c = self.conn.clone();
            bounded(
                redis::cmd("EVAL")
                    .arg(
                        "if redis.call('GET', KEYS[1]) == ARGV[1] then \
                         return redis.call('DEL', KEYS[1]) else return 0 end",
                    )
                    .arg(1)
                    .arg(self.key_key(key))
                    .arg(value)
                    .query_async::<i64>(&mut c),
            )
            .await
            .map(|_| ())
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::job::StoredResponse;
    use bytes::Bytes;

    fn done(status: u16) -> JobRecord {
        JobRecord::Done {
            submitted_ms: 1,
            finished_ms: 2,
            attempts: 1,
            response: StoredResponse {
                status,
                headers: vec![],
                body: Bytes::from_static(b"ok"),
            },
        }
    }

    #[tokio::test]
    async fn redb_keeps_results_across_reopen_and_detects_duplicates() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("jobs.redb");
        let id = crate::job::new_id();
        {
            let s = RedbStore::open(&path, Duration::from_secs(60)).unwrap();
            s.put_pending(&id, 1).await.unwrap();
            assert_eq!(
                s.get(&id).await.unwrap(),
                Some(JobRecord::Pending { submitted_ms: 1 })
            );
            assert!(s.finish(&id, &done(200), None).await.unwrap());
            assert!(
                !s.finish(&id, &done(500), None).await.unwrap(),
                "second finish"
            );
            assert_eq!(s.claim_key("k", &id).await.unwrap(), None);
            assert_eq!(s.claim_key("k", "other").await.unwrap(), Some(id.clone()));
        }
        let s = RedbStore::open(&path, Duration::from_secs(60)).unwrap();
        assert_eq!(s.get(&id).await.unwrap(), Some(done(200)));
        assert_eq!(s.claim_key("k", "x").await.unwrap(), Some(id.clone()));
        // Compare and delete: a release naming another binding leaves the key bound.
        s.release_key("k", "not-the-binding").await.unwrap();
        assert_eq!(s.claim_key("k", "x").await.unwrap(), Some(id.clone()));
        s.release_key("k", &id).await.unwrap();
        assert_eq!(s.claim_key("k", "x").await.unwrap(), None);
        s.delete(&id).await.unwrap();
        assert_eq!(s.get(&id).await.unwrap(), None);
    }

    #[tokio::test]
    async fn redb_entries_expire() {
        let dir = tempfile::tempdir().unwrap();
        let s = RedbStore::open(&dir.path().join("j.redb"), Duration::ZERO).unwrap();
        assert!(s.finish("a", &done(200), None).await.unwrap());
        assert_eq!(s.get("a").await.unwrap(), None);
        // An expired final record does not make a new one a duplicate.
        assert!(s.finish("a", &done(200), None).await.unwrap());
        assert_eq!(s.sweep().await.unwrap(), 1);
    }

    /// A clock the test moves.
    fn manual_clock() -> (Arc<std::sync::atomic::AtomicU64>, Clock) {
        let t = Arc::new(std::sync::atomic::AtomicU64::new(1_000_000));
        let c = t.clone();
        (
            t,
            Arc::new(move || c.load(std::sync::atomic::Ordering::Relaxed)),
        )
    }

    /// A queued job's record and idempotency key outlive the result TTL for as long as the
    /// job runs; the TTL counts from the final record, then the sweep removes both.
    #[tokio::test]
    async fn redb_pending_lives_until_the_end_and_the_ttl_runs_from_completion() {
        use std::sync::atomic::Ordering::Relaxed;
        let dir = tempfile::tempdir().unwrap();
        let (t, clock) = manual_clock();
        let s = RedbStore::open(&dir.path().join("j.redb"), Duration::from_secs(60))
            .unwrap()
            .with_clock(clock);
        let id = crate::job::new_id();
        let value = format!("{id} fp");
        s.put_pending(&id, 1).await.unwrap();
        assert_eq!(s.claim_key("k", &value).await.unwrap(), None);
        // Queued for a day: ttl is 60 s, yet the job and its key are still there.
        t.fetch_add(24 * 3600 * 1000, Relaxed);
        assert_eq!(s.sweep().await.unwrap(), 0);
        assert!(s.get(&id).await.unwrap().is_some());
        assert_eq!(
            s.claim_key("k", "other").await.unwrap(),
            Some(value.clone())
        );
        assert!(s.finish(&id, &done(200), Some("k")).await.unwrap());
        t.fetch_add(59_000, Relaxed);
        assert_eq!(s.sweep().await.unwrap(), 0);
        assert_eq!(s.get(&id).await.unwrap(), Some(done(200)));
        assert_eq!(s.claim_key("k", "other").await.unwrap(), Some(value));
        t.fetch_add(2_000, Relaxed);
        assert_eq!(s.get(&id).await.unwrap(), None, "expired on read");
        assert_eq!(s.sweep().await.unwrap(), 2, "the record and its key");
        assert_eq!(s.sweep().await.unwrap(), 0);
        // A job lost outside shoal does not keep its record forever.
        s.put_pending("lost", 1).await.unwrap();
        t.fetch_add(PENDING_LIMIT.as_millis() as u64 + 1, Relaxed);
        assert_eq!(s.sweep().await.unwrap(), 1);
    }

    /// Finishing a job leaves a key that another job took over (after a refused publish)
    /// with that job's lifetime.
    #[tokio::test]
    async fn redb_finish_starts_the_ttl_only_of_a_key_still_bound_to_the_job() {
        use std::sync::atomic::Ordering::Relaxed;
        let dir = tempfile::tempdir().unwrap();
        let (t, clock) = manual_clock();
        let s = RedbStore::open(&dir.path().join("j.redb"), Duration::from_secs(60))
            .unwrap()
            .with_clock(clock);
        assert_eq!(s.claim_key("k", "bbbb fp").await.unwrap(), None);
        assert!(s.finish("aaaa", &done(200), Some("k")).await.unwrap());
        t.fetch_add(61_000, Relaxed);
        assert_eq!(s.sweep().await.unwrap(), 1, "only aaaa's record");
        assert_eq!(
            s.claim_key("k", "x").await.unwrap().as_deref(),
            Some("bbbb fp")
        );
    }
}
