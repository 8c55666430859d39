//! Where job states and results live: Redis (shared by shoal replicas, TTL by Redis) or an
//! embedded redb file in `data_dir` (survives restarts; expiry checked on read and swept).

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use futures_util::future::BoxFuture;
use redb::{Database, ReadableDatabase, ReadableTable, ReadableTableMetadata, TableDefinition};

use crate::job::{now_ms, JobRecord, FINAL_TAGS};
use crate::QueueError;

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
    fn finish<'a>(
        &'a self,
        id: &'a str,
        rec: &'a JobRecord,
    ) -> BoxFuture<'a, Result<bool, QueueError>>;
    fn delete<'a>(&'a self, id: &'a str) -> BoxFuture<'a, Result<(), QueueError>>;
    /// Binds an idempotency key to `id` unless it is bound already: Ok(Some(existing id)).
    fn claim_key<'a>(
        &'a self,
        key: &'a str,
        id: &'a str,
    ) -> BoxFuture<'a, Result<Option<String>, QueueError>>;
    fn release_key<'a>(&'a self, key: &'a str) -> BoxFuture<'a, Result<(), QueueError>>;
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
        })
    }

    /// The same file with another TTL (one database per file; queues differ in TTL).
    pub fn with_ttl(&self, ttl: Duration) -> RedbStore {
        RedbStore {
            db: self.db.clone(),
            writer: self.writer.clone(),
            ttl,
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

    fn expiry(&self) -> u64 {
        now_ms().saturating_add(self.ttl.as_millis() as u64)
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
        let id = id.to_string();
        Box::pin(self.blocking(move |db| {
            let r = db.begin_read().map_err(se)?;
            let t = r.open_table(JOBS).map_err(se)?;
            let Some(v) = t.get(id.as_str()).map_err(se)? else {
                return Ok(None);
            };
            match live(v.value(), now_ms()) {
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
        let id = id.to_string();
        let v = with_expiry(self.expiry(), &JobRecord::Pending { submitted_ms }.encode());
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
    ) -> BoxFuture<'a, Result<bool, QueueError>> {
        let id = id.to_string();
        let v = with_expiry(self.expiry(), &rec.encode());
        Box::pin(self.write(move |w| {
            // Writes run one after another in the writer: check-and-set is atomic.
            let fresh = {
                let mut t = w.open_table(JOBS).map_err(se)?;
                let done = match t.get(id.as_str()).map_err(se)? {
                    Some(old) => live(old.value(), now_ms())
                        .and_then(|b| b.first())
                        .is_some_and(|tag| FINAL_TAGS.contains(tag)),
                    None => false,
                };
                if !done {
                    t.insert(id.as_str(), v.as_slice()).map_err(se)?;
                }
                !done
            };
            Ok(fresh)
        }))
    }

    fn delete<'a>(&'a self, id: &'a str) -> BoxFuture<'a, Result<(), QueueError>> {
        let id = id.to_string();
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
        id: &'a str,
    ) -> BoxFuture<'a, Result<Option<String>, QueueError>> {
        let key = key.to_string();
        let v = with_expiry(self.expiry(), id.as_bytes());
        Box::pin(self.write(move |w| {
            let existing = {
                let mut t = w.open_table(KEYS).map_err(se)?;
                let existing = match t.get(key.as_str()).map_err(se)? {
                    Some(old) => {
                        live(old.value(), now_ms()).map(|b| String::from_utf8_lossy(b).into_owned())
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

    fn release_key<'a>(&'a self, key: &'a str) -> BoxFuture<'a, Result<(), QueueError>> {
        let key = key.to_string();
        Box::pin(self.write(move |w| {
            w.open_table(KEYS)
                .map_err(se)?
                .remove(key.as_str())
                .map_err(se)?;
            Ok(())
        }))
    }

    fn sweep(&self) -> BoxFuture<'_, Result<u64, QueueError>> {
        Box::pin(self.write(|w| {
            let now = now_ms();
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

/// The Redis store: `{prefix}job:{id}` and `{prefix}key:{key}`, both with `EX ttl`.
#[derive(Clone)]
pub struct RedisStore {
    conn: redis::aio::ConnectionManager,
    prefix: String,
    ttl_secs: u64,
}

/// Sets the final record unless a final one is there (the first byte is the record tag).
const FINISH_LUA: &str = r"local v = redis.call('GET', KEYS[1])
if v and (string.byte(v, 1) == tonumber(ARGV[3]) or string.byte(v, 1) == tonumber(ARGV[4])) then
  return 0
end
redis.call('SET', KEYS[1], ARGV[1], 'EX', ARGV[2])
return 1";

impl RedisStore {
    pub async fn connect(url: &str, prefix: &str, ttl: Duration) -> Result<RedisStore, QueueError> {
        let client = redis::Client::open(url).map_err(|e| QueueError::Store(e.to_string()))?;
        let conn = redis::aio::ConnectionManager::new(client)
            .await
            .map_err(|e| QueueError::Store(e.to_string()))?;
        Ok(RedisStore {
            conn,
            prefix: prefix.to_string(),
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

    fn job_key(&self, id: &str) -> String {
        format!("{}job:{id}", self.prefix)
    }
}

fn re(e: redis::RedisError) -> QueueError {
    QueueError::Store(format!("redis: {e}"))
}

impl Store for RedisStore {
    fn get<'a>(&'a self, id: &'a str) -> BoxFuture<'a, Result<Option<JobRecord>, QueueError>> {
        Box::pin(async move {
            let mut c = self.conn.clone();
            let v: Option<Vec<u8>> = redis::cmd("GET")
                .arg(self.job_key(id))
                .query_async(&mut c)
                .await
                .map_err(re)?;
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
            redis::cmd("SET")
                .arg(self.job_key(id))
                .arg(JobRecord::Pending { submitted_ms }.encode())
                .arg("EX")
                .arg(self.ttl_secs)
                .query_async::<()>(&mut c)
                .await
                .map_err(re)
        })
    }

    fn finish<'a>(
        &'a self,
        id: &'a str,
        rec: &'a JobRecord,
    ) -> BoxFuture<'a, Result<bool, QueueError>> {
        Box::pin(async move {
            let mut c = self.conn.clone();
            let n: i64 = redis::cmd("EVAL")
                .arg(FINISH_LUA)
                .arg(1)
                .arg(self.job_key(id))
                .arg(rec.encode())
                .arg(self.ttl_secs)
                .arg(FINAL_TAGS[0])
                .arg(FINAL_TAGS[1])
                .query_async(&mut c)
                .await
                .map_err(re)?;
            Ok(n == 1)
        })
    }

    fn delete<'a>(&'a self, id: &'a str) -> BoxFuture<'a, Result<(), QueueError>> {
        Box::pin(async move {
            let mut c = self.conn.clone();
            redis::cmd("DEL")
                .arg(self.job_key(id))
                .query_async::<()>(&mut c)
                .await
                .map_err(re)
        })
    }

    fn claim_key<'a>(
        &'a self,
        key: &'a str,
        id: &'a str,
    ) -> BoxFuture<'a, Result<Option<String>, QueueError>> {
        Box::pin(async move {
            let mut c = self.conn.clone();
            // SET NX GET: returns the old value and sets only when there was none.
            let old: Option<String> = redis::cmd("SET")
                .arg(format!("{}key:{key}", self.prefix))
                .arg(id)
                .arg("NX")
                .arg("GET")
                .arg("EX")
                .arg(self.ttl_secs)
                .query_async(&mut c)
                .await
                .map_err(re)?;
            Ok(old)
        })
    }

    fn release_key<'a>(&'a self, key: &'a str) -> BoxFuture<'a, Result<(), QueueError>> {
        Box::pin(async move {
            let mut c = self.conn.clone();
            redis::cmd("DEL")
                .arg(format!("{}key:{key}", self.prefix))
                .query_async::<()>(&mut c)
                .await
                .map_err(re)
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
            assert!(s.finish(&id, &done(200)).await.unwrap());
            assert!(!s.finish(&id, &done(500)).await.unwrap(), "second finish");
            assert_eq!(s.claim_key("k", &id).await.unwrap(), None);
            assert_eq!(s.claim_key("k", "other").await.unwrap(), Some(id.clone()));
        }
        let s = RedbStore::open(&path, Duration::from_secs(60)).unwrap();
        assert_eq!(s.get(&id).await.unwrap(), Some(done(200)));
        assert_eq!(s.claim_key("k", "x").await.unwrap(), Some(id.clone()));
        s.release_key("k").await.unwrap();
        assert_eq!(s.claim_key("k", "x").await.unwrap(), None);
        s.delete(&id).await.unwrap();
        assert_eq!(s.get(&id).await.unwrap(), None);
    }

    #[tokio::test]
    async fn redb_entries_expire() {
        let dir = tempfile::tempdir().unwrap();
        let s = RedbStore::open(&dir.path().join("j.redb"), Duration::ZERO).unwrap();
        s.put_pending("a", 1).await.unwrap();
        assert_eq!(s.get("a").await.unwrap(), None);
        // An expired final record does not make a new one a duplicate.
        assert!(s.finish("a", &done(200)).await.unwrap());
        assert!(s.finish("a", &done(200)).await.unwrap());
        assert_eq!(s.sweep().await.unwrap(), 1);
    }
}
