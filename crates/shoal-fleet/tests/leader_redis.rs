//! The election and fencing against a real, private `redis-server`.

#[path = "../../shoal-cache/tests/common/redis.rs"]
mod redis;

use std::time::{Duration, Instant};

use shoal_fleet::cluster::{ClusterSpec, Leadership, SharedMember};
use shoal_fleet::leader::Timing;
use shoal_fleet::provider::Phase;

fn spec(url: &str, id: &str) -> ClusterSpec {
    ClusterSpec {
        redis: Some(url.to_string()),
        lease_name: None,
        namespace: None,
        peers: None,
        timing: Timing::for_lease(Duration::from_millis(1500)),
        id: id.to_string(),
        load_stale: Duration::from_secs(3),
        load_age_out: Duration::from_secs(10),
        share_config: false,
    }
}

async fn wait(what: &str, f: impl Fn() -> bool) {
    let until = Instant::now() + Duration::from_secs(10);
    while !f() {
        assert!(Instant::now() < until, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn member() -> Vec<SharedMember> {
    vec![SharedMember {
        id: "demo-1".into(),
        addr: "127.0.0.1:1".parse().unwrap(),
        phase: Phase::Ready,
        pid: None,
        start: None,
    }]
}

/// One leader at a time; the follower takes over once the lock is gone; a write with the
/// older token is refused and its writer steps down.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_leader_and_stale_tokens_are_fenced_out() {
    let server = redis::RedisServer::start();
    let a = Leadership::new("demo", &spec(&server.url(), "a"), None).unwrap();
    let b = Leadership::new("demo", &spec(&server.url(), "b"), None).unwrap();
    let (stop, rx) = tokio::sync::watch::channel(false);
    tokio::spawn(a.clone().run(rx.clone()));
    wait("a leads", || a.is_leader()).await;
    tokio::spawn(b.clone().run(rx.clone()));
    assert!(a.publish_fleet(1, member()).await);
    // b stays a follower while a renews (several leases long).
    let until = Instant::now() + Duration::from_secs(3);
    while Instant::now() < until {
        assert!(a.is_leader() && !b.is_leader());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(
        !b.publish_fleet(5, vec![]).await,
        "a follower may not write"
    );
    let view = b.read_fleet().await.unwrap();
    assert_eq!((view.leader.as_str(), view.desired), ("a", 1));
    // A newer token is issued while a still holds the lock (as when its lease ran out
    // during a pause and another replica acquired): a's next write is refused by the
    // script, and a steps down at once.
    let ta = a.api()["token"].as_u64().unwrap();
    assert_eq!(
        redis::redis_cmd(server.port, &["INCR", "shoal:{demo}:token"]),
        Some(format!(":{}", ta + 1))
    );
    assert!(a.is_leader());
    assert!(!a.publish_fleet(9, vec![]).await);
    assert!(!a.is_leader());
    assert_eq!(a.refused.get(), 1);
    assert_eq!(
        a.api()["last_step_down"]["reason"],
        "write refused by the fencing token"
    );
    // a's lock runs out (a no longer renews it); then one of them leads with a newer token.
    let t0 = Instant::now();
    wait("a new leader", || a.is_leader() || b.is_leader()).await;
    eprintln!("new leader {:?} after the step-down", t0.elapsed());
    let (new, old) = if b.is_leader() { (&b, &a) } else { (&a, &b) };
    assert!(!old.is_leader());
    let tn = new.api()["token"].as_u64().unwrap();
    assert!(tn > ta + 1, "{ta} {tn}");
    assert!(new.publish_fleet(2, member()).await);
    let view = old.read_fleet().await.unwrap();
    assert_eq!((view.desired, view.token), (2, tn));
    assert_eq!(view.leader, new.api()["id"].as_str().unwrap());
    let _ = stop.send(true);
    // The leader releases on stop: the lock is gone at once, not after its lease.
    let until = Instant::now() + Duration::from_secs(2);
    while redis::redis_cmd(server.port, &["EXISTS", "shoal:{demo}:lock"]).as_deref() != Some(":0") {
        assert!(Instant::now() < until, "lock not released");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Every replica's load is read back with its age; a stale one holds, an aged-out one is
/// forgotten.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicas_share_their_load() {
    let server = redis::RedisServer::start();
    let a = Leadership::new("demo", &spec(&server.url(), "a"), None).unwrap();
    let b = Leadership::new("demo", &spec(&server.url(), "b"), None).unwrap();
    let (stop, rx) = tokio::sync::watch::channel(false);
    a.set_local(10.0, 1.0, &[1, 2, 3]);
    b.set_local(30.0, 3.0, &[4, 5, 6]);
    b.set_local(30.0, 3.0, &[1, 0, 0]);
    tokio::spawn(a.clone().run(rx.clone()));
    tokio::spawn(b.clone().run(rx.clone()));
    wait("a sees b", || a.others() == Ok((30.0, 3.0))).await;
    wait("b sees a", || b.others() == Ok((10.0, 1.0))).await;
    assert_eq!(a.live_peers(), 1);
    // b's latency counts: cumulative in its reports; a takes what is new since it last
    // looked (the first sight is the baseline), each count once.
    assert_eq!(a.take_others_latency(), Vec::<u64>::new());
    b.set_local(30.0, 3.0, &[0, 7, 0]);
    b.set_local(30.0, 3.0, &[2, 0, 0]);
    let mut got = vec![0; 3];
    let until = Instant::now() + Duration::from_secs(5);
    while got != vec![2, 7, 0] {
        assert!(Instant::now() < until, "{got:?}");
        for (g, n) in got.iter_mut().zip(a.take_others_latency()) {
            *g += n;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let _ = stop.send(true);
}

/// The same on a Redis Cluster (comma-separated seeds): each script's keys share a slot.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn election_fencing_and_load_on_a_redis_cluster() {
    let cluster = redis::RedisCluster::start();
    let url = cluster.url();
    assert!(url.contains(','), "{url}");
    let a = Leadership::new("demo", &spec(&url, "a"), None).unwrap();
    let b = Leadership::new("demo", &spec(&url, "b"), None).unwrap();
    a.set_local(10.0, 1.0, &[]);
    b.set_local(30.0, 3.0, &[]);
    let (stop, rx) = tokio::sync::watch::channel(false);
    tokio::spawn(a.clone().run(rx.clone()));
    wait("a leads", || a.is_leader()).await;
    tokio::spawn(b.clone().run(rx.clone()));
    assert!(a.publish_fleet(1, member()).await);
    assert!(!b.publish_fleet(5, vec![]).await);
    assert_eq!(b.read_fleet().await.unwrap().leader, "a");
    wait("b sees who leads", || b.api()["holder"] == "a").await;
    wait("a sees b's load", || a.others() == Ok((30.0, 3.0))).await;
    // A newer token: a's write is refused and a steps down.
    let port = cluster.master_of("shoal:{demo}:token");
    let ta = a.api()["token"].as_u64().unwrap();
    assert_eq!(
        redis::redis_cmd(port, &["INCR", "shoal:{demo}:token"]),
        Some(format!(":{}", ta + 1))
    );
    assert!(!a.publish_fleet(9, vec![]).await);
    assert!(!a.is_leader());
    let _ = stop.send(true);
}
