//! The Redis result store against a real redis-server started for the test.

mod common;

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

#[tokio::test]
async fn redis_store_semantics() {
    let port = free_port();
    let dir = tempfile::tempdir().unwrap();
    let _redis = Proc::spawn(
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
        match RedisStore::connect(&url, "t:", Duration::from_secs(60)).await {
            Ok(s) => break s,
            Err(e) if std::time::Instant::now() > deadline => panic!("{e}"),
            Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    };
    let id = shoal_queue::job::new_id();
    assert_eq!(s.get(&id).await.unwrap(), None);
    s.put_pending(&id, 1).await.unwrap();
    assert_eq!(
        s.get(&id).await.unwrap(),
        Some(JobRecord::Pending { submitted_ms: 1 })
    );
    assert!(s.finish(&id, &done(200)).await.unwrap());
    assert!(!s.finish(&id, &done(500)).await.unwrap(), "a duplicate");
    assert_eq!(s.get(&id).await.unwrap(), Some(done(200)));
    assert_eq!(s.claim_key("k", &id).await.unwrap(), None);
    assert_eq!(s.claim_key("k", "other").await.unwrap(), Some(id.clone()));
    s.release_key("k").await.unwrap();
    assert_eq!(s.claim_key("k", "other").await.unwrap(), None);
    s.delete(&id).await.unwrap();
    assert_eq!(s.get(&id).await.unwrap(), None);
    // The TTL is Redis's own.
    let mut c = redis::Client::open(url.as_str()).unwrap();
    let ttl: i64 = redis::cmd("TTL").arg("t:key:k").query(&mut c).unwrap();
    assert!((1..=60).contains(&ttl), "ttl {ttl}");
}
