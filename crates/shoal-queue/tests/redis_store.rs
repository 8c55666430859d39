//! The Redis result store against a real redis-server started for the test.

mod common;
#[path = "../../shoal-cache/tests/common/redis.rs"]
mod redis_harness;

use std::process::{Command, Stdio};
use std::time::Duration;

use bytes::Bytes;
use common::{free_port, Proc};
use shoal_queue::job::{JobRecord, StoredResponse};
use shoal_queue::{RedisStore, Store};

fn done(status: u16) -> JobRecord {
    JobRecord::Done {
        submitted_ms: 1,
        finished_ms: 2,
        attempts: 1,
        response: StoredResponse {
            status,
            headers: vec![("x".into(), Bytes::from_static(b"y"))],
            body: Bytes::from_static(b"result"),
        },
    }
}

/// A private redis-server on a free port, and a store connected to it.
async fn redis(ttl: Duration) -> (Proc, tempfile::TempDir, String, RedisStore) {
    let port = free_port();
    let dir = tempfile::tempdir().unwrap();
    let redis = Proc::spawn(
        "redis-server",
        Command::new("redis-server")
            .args([
                "--port",
                &port.to_string(),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
            ])
            .current_dir(dir.path())
            .stdout(Stdio::null()),
    );
    let url = format!("redis://127.0.0.1:{port}/");
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let s = loop {
        match RedisStore::connect(&url, "t:", ttl).await {
            Ok(s) => break s,
            Err(e) if std::time::Instant::now() > deadline => panic!("{e}"),
            Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    };
    (redis, dir, url, s)
}

#[tokio::test]
async fn redis_store_semantics() {
    let (_redis, _dir, url, s) = redis(Duration::from_secs(60)).await;
    let id = shoal_queue::job::new_id();
    assert_eq!(s.get(&id).await.unwrap(), None);
    s.put_pending(&id, 1).await.unwrap();
    assert_eq!(
        s.get(&id).await.unwrap(),
        Some(JobRecord::Pending { submitted_ms: 1 })
    );
    assert!(s.finish(&id, &done(200), None).await.unwrap());
    assert!(
        !s.finish(&id, &done(500), None).await.unwrap(),
        "a duplicate"
    );
    assert_eq!(s.get(&id).await.unwrap(), Some(done(200)));
    assert_eq!(s.claim_key("k", &id).await.unwrap(), None);
    assert_eq!(s.claim_key("k", "other").await.unwrap(), Some(id.clone()));
    // Compare and delete: a release naming another binding leaves the key bound.
    s.release_key("k", "other").await.unwrap();
    assert_eq!(s.claim_key("k", "x").await.unwrap(), Some(id.clone()));
    s.release_key("k", &id).await.unwrap();
    assert_eq!(s.claim_key("k", "other").await.unwrap(), None);
    s.delete(&id).await.unwrap();
    assert_eq!(s.get(&id).await.unwrap(), None);
    // The TTL is Redis's own.
    let mut c = redis::Client::open(url.as_str()).unwrap();
    let ttl: i64 = redis::cmd("TTL").arg("t:key:{}k").query(&mut c).unwrap();
    assert!(ttl > 0, "Redis expires it: ttl {ttl}");
}

fn ttl_of(url: &str, key: &str) -> i64 {
    let mut c = redis::Client::open(url).unwrap();
    redis::cmd("TTL").arg(key).query(&mut c).unwrap()
}

/// In Redis too, a pending job and its idempotency key live until the job ends (only the
/// pending limit bounds them), and the result TTL is set on both when it ends.
#[tokio::test]
async fn redis_pending_lives_until_the_end_and_the_ttl_runs_from_completion() {
    let (_redis, _dir, url, s) = redis(Duration::from_secs(60)).await;
    let id = shoal_queue::job::new_id();
    s.put_pending(&id, 1).await.unwrap();
    let value = format!("{id} fp");
    assert_eq!(s.claim_key("k", &value).await.unwrap(), None);
    let limit = shoal_queue::store::PENDING_LIMIT.as_secs() as i64;
    for key in [format!("t:job:{id}"), "t:key:{}k".to_string()] {
        let ttl = ttl_of(&url, &key);
        assert!(ttl > 60 && ttl <= limit, "{key} pending ttl {ttl}");
    }
    assert!(s.finish(&id, &done(200), Some("k")).await.unwrap());
    for key in [format!("t:job:{id}"), "t:key:{}k".to_string()] {
        let ttl = ttl_of(&url, &key);
        assert!((1..=60).contains(&ttl), "{key} ttl after the end {ttl}");
    }
    // A key another job took over keeps that job's lifetime.
    let other = shoal_queue::job::new_id();
    assert_eq!(
        s.claim_key("k2", &format!("{other} fp")).await.unwrap(),
        None
    );
    let third = shoal_queue::job::new_id();
    assert!(s.finish(&third, &done(200), Some("k2")).await.unwrap());
    assert!(ttl_of(&url, "t:key:{}k2") > 60);
}

/// A broker that confirms every publish at once.
struct Confirming(shoal_queue::broker::ConnState);

impl shoal_queue::Broker for Confirming {
    fn kind(&self) -> &'static str {
        "test"
    }
    fn queue(&self) -> &str {
        "q"
    }
    fn publish<'a>(
        &'a self,
        _job: &'a shoal_queue::Envelope,
    ) -> futures_util::future::BoxFuture<'a, Result<(), shoal_queue::QueueError>> {
        Box::pin(async { Ok(()) })
    }
    fn next(
        &self,
    ) -> futures_util::future::BoxFuture<'_, Result<shoal_queue::Delivery, shoal_queue::QueueError>>
    {
        Box::pin(std::future::pending())
    }
    fn backlog(&self) -> futures_util::future::BoxFuture<'_, Result<u64, shoal_queue::QueueError>> {
        Box::pin(async { Ok(0) })
    }
    fn state(&self) -> &shoal_queue::broker::ConnState {
        &self.0
    }
    fn shutdown(&self) -> futures_util::future::BoxFuture<'_, ()> {
        Box::pin(async {})
    }
}

/// A stalled Redis (SIGSTOPped: connections open, nothing answers) fails submissions with
/// 503 + Retry-After within the store's timeout instead of holding them (and their bodies);
/// once it runs again, submissions are accepted again.
#[tokio::test]
async fn a_stalled_redis_answers_submissions_503_promptly() {
    use nix::sys::signal::{kill, Signal};
    use nix::unistd::Pid;
    let (redis, _dir, _url, s) = redis(Duration::from_secs(60)).await;
    let submitter = shoal_queue::Submitter::new(
        std::sync::Arc::new(Confirming(Default::default())),
        std::sync::Arc::new(s),
        shoal_queue::QueueMetrics::new(),
        Default::default(),
    );
    let job = || shoal_queue::JobRequest {
        method: "POST".into(),
        path_and_query: "/w".into(),
        headers: vec![("authorization".into(), Bytes::from_static(b"Bearer a"))],
        body: Bytes::from_static(b"body"),
    };
    assert_eq!(submitter.respond(job(), None).await.status(), 202);
    let pid = Pid::from_raw(redis.pid() as i32);
    kill(pid, Signal::SIGSTOP).unwrap();
    let bound = shoal_queue::store::REDIS_TIMEOUT + Duration::from_secs(1);
    for key in [None, Some("k")] {
        let t = std::time::Instant::now();
        let r = submitter.respond(job(), key).await;
        let took = t.elapsed();
        assert_eq!(r.status(), 503, "key {key:?}");
        assert!(r.headers().contains_key("retry-after"));
        assert!(took <= bound, "took {took:?}");
    }
    kill(pid, Signal::SIGCONT).unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let st = submitter.respond(job(), None).await.status();
        if st == 202 {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "still {st} after SIGCONT"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The same semantics on a Redis Cluster, where a job and its idempotency key live in different
/// slots (so finishing is two scripts) and a `{…}` in a client's key must not choose the slot.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_cluster_store_semantics() {
    let cluster = redis_harness::RedisCluster::start();
    let s = RedisStore::connect(&cluster.url(), "t:", Duration::from_secs(60))
        .await
        .unwrap();
    let mut slots = std::collections::HashSet::new();
    for n in 0..12 {
        let id = shoal_queue::job::new_id();
        let key = format!("{{tag}}k{n}");
        s.put_pending(&id, 1).await.unwrap();
        let value = format!("{id} fp");
        assert_eq!(s.claim_key(&key, &value).await.unwrap(), None);
        assert_eq!(
            s.claim_key(&key, "other").await.unwrap(),
            Some(value.clone())
        );
        assert!(s.finish(&id, &done(200), Some(&key)).await.unwrap());
        assert!(!s.finish(&id, &done(500), Some(&key)).await.unwrap());
        assert_eq!(s.get(&id).await.unwrap(), Some(done(200)));
        let kk = format!("t:key:{{}}{key}");
        slots.insert(cluster.master_of(&kk));
        // The key's TTL now runs from the job's end, as on one node.
        let ttl = cluster_ttl(&cluster, &kk);
        assert!((1..=60).contains(&ttl), "{kk} ttl {ttl}");
        s.release_key(&key, &value).await.unwrap();
        assert_eq!(s.claim_key(&key, "x").await.unwrap(), None);
        s.delete(&id).await.unwrap();
        assert_eq!(s.get(&id).await.unwrap(), None);
    }
    assert!(
        slots.len() > 1,
        "keys sharing a client-chosen {{tag}} still spread over the masters"
    );
}

fn cluster_ttl(c: &redis_harness::RedisCluster, key: &str) -> i64 {
    let port = c.master_of(key);
    let reply = redis_harness::redis_cmd(port, &["TTL", key]).unwrap();
    reply.trim_start_matches(':').parse().unwrap()
}
