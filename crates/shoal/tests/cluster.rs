//! Several `shoal run` replicas in front of one process fleet, sharing a private
//! `redis-server` (`[cluster]`): one leader decides on everyone's load, followers route to
//! its instances, a dead or paused leader is replaced without restarting the fleet, and a
//! paused one that wakes up is fenced out.

mod common;

#[path = "../../shoal-cache/tests/common/redis.rs"]
mod redis;

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use common::*;
use serde_json::Value;

const LEASE_SECS: f64 = 2.0;

/// The demo instances of one test, found by a marker in their environment: a shared
/// fleet's instances outlive the replicas, so the test stops them itself.
struct Instances(String);

impl Instances {
    fn new() -> Instances {
        Instances(format!(
            "cluster-test-{}-{}",
            std::process::id(),
            free_port()
        ))
    }

    fn pids(&self) -> Vec<i32> {
        let needle = format!("SHOAL_TEST_RUN={}", self.0);
        std::fs::read_dir("/proc")
            .unwrap()
            .flatten()
            .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
            .filter(|pid| {
                std::fs::read(format!("/proc/{pid}/environ"))
                    .is_ok_and(|env| env.split(|b| *b == 0).any(|kv| kv == needle.as_bytes()))
            })
            .collect()
    }
}

impl Drop for Instances {
    fn drop(&mut self) {
        for pid in self.pids() {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
    }
}

struct Replica {
    proc: Proc,
    dir: tempfile::TempDir,
    listen: u16,
    admin: u16,
    id: String,
}

impl Replica {
    fn start(id: &str, redis: &str, marker: &str, min: u32, down: &str) -> Replica {
        let dir = tempdir();
        let (listen, admin) = (free_port(), free_port());
        let cfg = fleet_config(
            listen,
            admin,
            &format!(
                r#"[services.demo.fleet]
command = "shoal demo-service"
min = {min}
max = 8
env = {{ SHOAL_TEST_RUN = "{marker}" }}

[services.demo.autoscale]
interval = "1s"
targets = [{{ metric = "rps", target = 20 }}]
stable_window = "6s"
panic_window = "3s"
scale_down_stabilization = "{down}"
burst_hold = "5s"

[cluster]
redis = "{redis}"
lease = "{LEASE_SECS}s"
id = "{id}"
"#
            ),
        );
        let (proc, _) = run_shoal(dir.path(), &cfg, listen);
        Replica {
            proc,
            dir,
            listen,
            admin,
            id: id.to_string(),
        }
    }

    fn leader(&self) -> Value {
        api_json(self.admin, "/api/leader")
    }

    fn leads(&self) -> bool {
        self.leader()["leader"] == true
    }

    fn service(&self) -> Value {
        api_json(self.admin, "/api/services/demo")
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("shoal.log")).unwrap_or_default()
    }

    fn metric(&self, line_start: &str) -> f64 {
        let (_, m) = get(self.admin, "/metrics");
        m.lines()
            .find_map(|l| l.strip_prefix(line_start)?.trim().parse().ok())
            .unwrap_or(0.0)
    }

    fn accepted_writes(&self) -> f64 {
        self.metric("shoal_fenced_writes_total{service=\"demo\",result=\"accepted\"}")
    }

    /// Ids of the instances this replica routes to.
    fn instance_ids(&self) -> BTreeSet<String> {
        self.service()["instances"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|i| i["state"] != "draining")
            .map(|i| i["id"].as_str().unwrap().to_string())
            .collect()
    }
}

/// Which of `rs` lead now (asked through each one's admin API).
fn leaders(rs: &[&Replica]) -> Vec<String> {
    rs.iter()
        .filter(|r| r.leads())
        .map(|r| r.id.clone())
        .collect()
}

/// Starts three replicas and waits for one leader and a first ready instance everywhere.
fn cluster(redis: &redis::RedisServer, marker: &str, min: u32) -> Vec<Replica> {
    replicas(redis, marker, min, &["r1", "r2", "r3"], "120s")
}

fn replicas(
    redis: &redis::RedisServer,
    marker: &str,
    min: u32,
    ids: &[&str],
    down: &str,
) -> Vec<Replica> {
    let rs: Vec<Replica> = ids
        .iter()
        .map(|id| Replica::start(id, &redis.url(), marker, min, down))
        .collect();
    let refs: Vec<&Replica> = rs.iter().collect();
    wait_until(20, "one leader", || leaders(&refs).len() == 1);
    for r in &rs {
        wait_until(30, "instances routed on every replica", || {
            ready(&r.service()) >= min as usize
        });
    }
    rs
}

fn redis_get(port: u16, key: &str) -> Option<String> {
    use std::io::{BufRead, Read, Write};
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
    s.write_all(format!("*2\r\n$3\r\nGET\r\n${}\r\n{key}\r\n", key.len()).as_bytes())
        .ok()?;
    let mut r = std::io::BufReader::new(s);
    let mut line = String::new();
    r.read_line(&mut line).ok()?;
    let n: i64 = line.trim_end().strip_prefix('$')?.parse().ok()?;
    if n < 0 {
        return None;
    }
    let mut buf = vec![0; n as usize + 2];
    r.read_exact(&mut buf).ok()?;
    buf.truncate(n as usize);
    String::from_utf8(buf).ok()
}

/// The fleet as the leader last published it.
fn published(redis: &redis::RedisServer) -> Value {
    serde_json::from_str(&redis_get(redis.port, "shoal:{demo}:fleet").unwrap()).unwrap()
}

/// (a) Three replicas, load spread over them: exactly one leader; it sizes the fleet on the
/// total (120 rps against 20 per instance: 6, where each replica alone sees 2); only it
/// writes; every replica routes to the same instances; no request fails. Stopped in order,
/// the followers leave the fleet running and the last replica stops it.
#[test]
fn three_replicas_one_leader_deciding_on_the_total_load() {
    let server = redis::RedisServer::start();
    let marker = Instances::new();
    let mut rs = cluster(&server, &marker.0, 1);
    let refs: Vec<&Replica> = rs.iter().collect();
    let leader = rs.iter().find(|r| r.leads()).unwrap();
    for r in &rs {
        let l = r.leader();
        assert_eq!(l["holder"], leader.id.as_str(), "{l}");
        assert_eq!(l["services"][0]["service"], "demo", "{l}");
    }
    let loaders: Vec<_> = rs
        .iter()
        .map(|r| {
            let url = format!("http://127.0.0.1:{}/work?sleep_ms=20", r.listen);
            std::thread::spawn(move || load(&url, 40, 22))
        })
        .collect();
    let mut max_desired = 0;
    let mut settled = None;
    let t0 = Instant::now();
    while t0.elapsed() < Duration::from_secs(20) {
        assert_eq!(
            leaders(&refs),
            vec![leader.id.clone()],
            "exactly one leader"
        );
        let d = leader.service()["desired"].as_u64().unwrap();
        max_desired = max_desired.max(d);
        if (5..=7).contains(&d) && settled.is_none() {
            settled = Some(t0.elapsed());
        }
        std::thread::sleep(Duration::from_millis(500));
    }
    let d = leader.service()["desired"].as_u64().unwrap();
    eprintln!(
        "desired {d} (max {max_desired}), first in 5..=7 after {settled:?}; decisions: {}",
        api_json(leader.admin, "/api/services/demo/decisions")
    );
    assert!((5..=7).contains(&d), "leader's desired {d}, expected 6 ± 1");
    assert!(max_desired <= 7, "overshoot to {max_desired}");
    for l in loaders {
        let report = l.join().unwrap();
        assert_eq!(report["errors"]["total"], 0, "{report}");
    }
    // Every replica routes to the leader's instances.
    let ids = leader.instance_ids();
    for r in &rs {
        wait_until(5, "same instances everywhere", || r.instance_ids() == ids);
    }
    // Only the leader wrote, with its token.
    let token = leader.leader()["token"].as_u64().unwrap();
    assert_eq!(
        redis_get(server.port, "shoal:{demo}:fence"),
        Some(token.to_string())
    );
    assert_eq!(published(&server)["leader"], leader.id.as_str());
    assert!(leader.accepted_writes() > 0.0);
    for r in rs.iter().filter(|r| r.id != leader.id) {
        assert_eq!(r.accepted_writes(), 0.0, "{} wrote", r.id);
        assert_eq!(r.metric("shoal_leader{service=\"demo\"}"), 0.0);
    }
    assert_eq!(leader.metric("shoal_leader{service=\"demo\"}"), 1.0);
    // `shoal status` names the leader.
    let out = std::process::Command::new(SHOAL)
        .args(["status", "--admin", &format!("127.0.0.1:{}", rs[1].admin)])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains(&format!("leader: demo: {}", leader.id))
            || text.contains("leader: demo: this replica"),
        "{text}"
    );
    // Followers stop (SIGTERM): the fleet stays with the leader.
    let leader_id = leader.id.clone();
    let n = marker.pids().len();
    assert!(n >= 5, "{n} instances");
    for r in rs.iter_mut().filter(|r| r.id != leader_id) {
        r.proc.signal("TERM");
        assert_eq!(r.proc.wait_exit(20), Some(0), "{}", r.log());
    }
    let leader = rs.iter_mut().find(|r| r.id == leader_id).unwrap();
    assert_eq!(leader.leader()["leader"], true);
    assert_eq!(marker.pids().len(), n);
    // The last one (once the others' reports are gone) drains and stops the fleet.
    wait_until(5, "followers' load reports gone", || {
        leader.leader()["services"][0]["load"]
            .as_array()
            .is_some_and(|l| l.iter().all(|r| r["replica"] == leader_id.as_str()))
    });
    leader.proc.signal("TERM");
    assert_eq!(leader.proc.wait_exit(30), Some(0), "{}", leader.log());
    assert!(marker.pids().is_empty(), "{:?}", marker.pids());
}

/// (b) The leader SIGKILLed under load: another replica leads within the lease, adopts the
/// running instances (same ids, the fleet size never jumps), and no request through the
/// surviving replicas fails.
#[test]
fn a_killed_leader_is_replaced_within_the_lease_without_restarting_the_fleet() {
    let server = redis::RedisServer::start();
    let marker = Instances::new();
    let mut rs = cluster(&server, &marker.0, 2);
    let li = rs.iter().position(|r| r.leads()).unwrap();
    let ids = rs[li].instance_ids();
    assert_eq!(ids.len(), 2, "{ids:?}");
    let others: Vec<usize> = (0..3).filter(|i| *i != li).collect();
    // Light load (20 rps in all, 2 instances hold it) through the two that survive.
    let loaders: Vec<_> = others
        .iter()
        .map(|i| {
            let url = format!("http://127.0.0.1:{}/work?sleep_ms=20", rs[*i].listen);
            std::thread::spawn(move || load(&url, 10, 12))
        })
        .collect();
    std::thread::sleep(Duration::from_secs(2));
    rs[li].proc.signal("KILL");
    let t0 = Instant::now();
    let _ = rs[li].proc.wait_exit(5);
    let survivors: Vec<&Replica> = others.iter().map(|i| &rs[*i]).collect();
    let new = loop {
        let l = leaders(&survivors);
        assert!(l.len() <= 1, "two leaders: {l:?}");
        if let Some(id) = l.first() {
            break survivors.iter().find(|r| &r.id == id).copied().unwrap();
        }
        assert!(
            t0.elapsed() < Duration::from_secs_f64(LEASE_SECS + 1.5),
            "no new leader within the lease"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    let took = t0.elapsed();
    eprintln!("new leader {} after {took:?}", new.id);
    // Within the lease (the killed leader's last renewal was ≤ a retry period before the
    // kill), plus one retry period for the follower to try.
    assert!(took.as_secs_f64() < LEASE_SECS + 0.6, "{took:?}");
    // Same instances, adopted; the size never jumps.
    let until = Instant::now() + Duration::from_secs(6);
    while Instant::now() < until {
        let v = new.service();
        assert!(v["desired"].as_u64().unwrap() <= 2, "{v}");
        assert!(v["instances"].as_array().unwrap().len() <= 2, "{v}");
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(new.instance_ids(), ids);
    assert!(new.log().contains("adopted the published fleet"));
    for l in loaders {
        let report = l.join().unwrap();
        assert_eq!(report["errors"]["total"], 0, "{report}");
    }
    assert_eq!(published(&server)["leader"], new.id.as_str());
}

/// (c) The leader SIGSTOPped past its lease: another leads (adopting the fleet); woken
/// with SIGCONT, the old one writes nothing (its token is older; its renew deadline
/// passed), logs its step-down, and there are never two leaders.
#[test]
fn a_paused_leader_wakes_up_fenced_out_and_steps_down() {
    let server = redis::RedisServer::start();
    let marker = Instances::new();
    let rs = cluster(&server, &marker.0, 2);
    let li = rs.iter().position(|r| r.leads()).unwrap();
    let old = &rs[li];
    let old_token = old.leader()["token"].as_u64().unwrap();
    let ids = old.instance_ids();
    let survivors: Vec<&Replica> = rs.iter().filter(|r| r.id != old.id).collect();
    let urls: Vec<String> = survivors
        .iter()
        .map(|r| format!("http://127.0.0.1:{}/work?sleep_ms=20", r.listen))
        .collect();
    let loaders: Vec<_> = urls
        .into_iter()
        .map(|url| std::thread::spawn(move || load(&url, 10, 14)))
        .collect();
    let written_before = old.accepted_writes();
    old.proc.signal("STOP");
    let t0 = Instant::now();
    let new = loop {
        let l = leaders(&survivors);
        assert!(l.len() <= 1, "two leaders: {l:?}");
        if let Some(id) = l.first() {
            break survivors.iter().find(|r| &r.id == id).copied().unwrap();
        }
        assert!(t0.elapsed() < Duration::from_secs(6), "no new leader");
        std::thread::sleep(Duration::from_millis(50));
    };
    eprintln!("new leader {} after {:?}", new.id, t0.elapsed());
    let new_token = new.leader()["token"].as_u64().unwrap();
    assert!(new_token > old_token);
    assert_eq!(
        new.instance_ids(),
        ids,
        "the fleet was adopted, not restarted"
    );
    // Paused well past its lease, then woken.
    while t0.elapsed() < Duration::from_secs_f64(LEASE_SECS * 2.0) {
        std::thread::sleep(Duration::from_millis(50));
    }
    old.proc.signal("CONT");
    let refs: Vec<&Replica> = rs.iter().collect();
    let t1 = Instant::now();
    while t1.elapsed() < Duration::from_secs(4) {
        assert_eq!(leaders(&refs), vec![new.id.clone()], "never two leaders");
        std::thread::sleep(Duration::from_millis(100));
    }
    wait_until(5, "the old leader logs its step-down", || {
        old.log().contains("stepping down")
    });
    let l = old.leader();
    assert_eq!(l["leader"], false, "{l}");
    assert_eq!(l["holder"], new.id.as_str(), "{l}");
    assert!(
        l["services"][0]["last_step_down"]["reason"].is_string(),
        "{l}"
    );
    // It wrote nothing after waking; the store holds the new leader's writes only.
    assert_eq!(old.accepted_writes(), written_before);
    assert_eq!(
        redis_get(server.port, "shoal:{demo}:fence"),
        Some(new_token.to_string())
    );
    assert_eq!(published(&server)["leader"], new.id.as_str());
    // The old leader follows and routes to the same instances.
    let until = Instant::now() + Duration::from_secs(5);
    while old.instance_ids() != ids {
        assert!(
            Instant::now() < until,
            "old leader routes to {:?}, not {ids:?}\n{}",
            old.service(),
            old.log()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    for l in loaders {
        let report = l.join().unwrap();
        assert_eq!(report["errors"]["total"], 0, "{report}");
    }
}

/// A replica that stops reporting (SIGSTOP, its clients stuck) is missing data, not zero
/// load: the leader holds its decision until the report ages out.
#[test]
fn a_silent_replica_holds_the_decision_instead_of_counting_as_zero() {
    let server = redis::RedisServer::start();
    let marker = Instances::new();
    let rs = replicas(&server, &marker.0, 1, &["r1", "r2"], "120s");
    let leader = rs.iter().find(|r| r.leads()).unwrap();
    let follower = rs.iter().find(|r| r.id != leader.id).unwrap();
    // All the load through the follower: 60 rps against 20 per instance → 3.
    let url = format!("http://127.0.0.1:{}/work?sleep_ms=20", follower.listen);
    let _loader = std::thread::spawn(move || {
        let _ = std::process::Command::new(SHOAL)
            .args(["load", &url, "--rate", "60", "--duration", "25", "--json"])
            .output();
    });
    wait_until(20, "the leader sizes on the follower's load", || {
        leader.service()["desired"].as_u64() >= Some(3)
    });
    wait_until(5, "the leader has decided on the load", || {
        leader.service()["last_decision"]["inputs"]["metrics"][0]["stable"].as_f64() > Some(0.0)
    });
    let desired = leader.service()["desired"].as_u64().unwrap();
    follower.proc.signal("STOP");
    let t0 = Instant::now();
    let until = Instant::now() + Duration::from_secs(8);
    loop {
        let d = leader.service()["last_decision"].clone();
        // The rate is missing (not zero) in the decision's inputs; the policy holds (its
        // reason may be a burst hold that is already in force).
        if d["inputs"]["metrics"][0]["stable"].is_null()
            && d["inputs"]["now_secs"].as_f64() > Some(0.0)
        {
            break;
        }
        assert!(Instant::now() < until, "no hold: {d}\n{}", leader.leader());
        std::thread::sleep(Duration::from_millis(100));
    }
    eprintln!("holding {:?} after the follower went silent", t0.elapsed());
    // Held while the report is stale (until it ages out at 10 s); never scaled down.
    while t0.elapsed() < Duration::from_secs(9) {
        let v = leader.service();
        assert_eq!(
            v["desired"].as_u64(),
            Some(desired),
            "{}",
            v["last_decision"]
        );
        std::thread::sleep(Duration::from_millis(250));
    }
    follower.proc.signal("CONT");
}

/// `shoal check` names the file, line and field of a `[cluster]` error.
#[test]
fn check_names_the_line_and_field_of_cluster_errors() {
    let dir = tempdir();
    let path = dir.path().join("shoal.toml");
    let base = "[services.web]\nlisten = \"127.0.0.1:8080\"\nbackends = [\"127.0.0.1:9000\"]\n\n[cluster]\n";
    for (extra, want) in [
        (
            "redis = \"redis://127.0.0.1:6379/\"\nlease = \"1s\"\nretry = \"900ms\"\n",
            "shoal.toml:8: cluster.retry: retry must be shorter than renew_deadline",
        ),
        (
            "redis = \"http://x\"\n",
            "shoal.toml:6: cluster.redis: expected a redis:// URL",
        ),
        ("lease = \"2s\"\n", "cluster: missing field `redis`"),
    ] {
        std::fs::write(&path, format!("{base}{extra}")).unwrap();
        let out = std::process::Command::new(SHOAL)
            .args(["check", "--config"])
            .arg(&path)
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success() && err.contains(want), "{want}: {err}");
    }
    std::fs::write(
        &path,
        format!("{base}redis = \"redis://a:1,redis://b:2\"\n"),
    )
    .unwrap();
    let out = std::process::Command::new(SHOAL)
        .args(["check", "--config"])
        .arg(&path)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A shared fleet's instances are watched by pid: one killed is noticed, reaped and
/// replaced, and the replacement is published.
#[test]
fn a_killed_instance_of_a_shared_fleet_is_replaced() {
    let server = redis::RedisServer::start();
    let marker = Instances::new();
    let rs = replicas(&server, &marker.0, 2, &["solo"], "120s");
    let r = &rs[0];
    assert!(r.leads());
    let procs = r.service()["fleet"]["processes"].clone();
    let victim = procs[0]["pid"].as_i64().unwrap() as i32;
    let victim_id = procs[0]["id"].as_str().unwrap().to_string();
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(victim),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    wait_until(15, "a replacement", || {
        let ids = r.instance_ids();
        ready(&r.service()) == 2 && !ids.contains(&victim_id)
    });
    // Reaped, not left a zombie.
    wait_until(5, "the killed instance reaped", || {
        !std::path::Path::new(&format!("/proc/{victim}")).exists()
    });
    wait_until(5, "the replacement published", || {
        let p = published(&server);
        p["members"].as_array().unwrap().len() == 2
            && p["members"]
                .as_array()
                .unwrap()
                .iter()
                .all(|m| m["id"] != victim_id.as_str())
    });
}

/// Scale-in of a shared fleet loses nothing on the followers: the leader publishes the stop
/// first, followers drain the instance, and only then is it signalled.
#[test]
fn scale_in_loses_no_request_routed_by_a_follower() {
    let server = redis::RedisServer::start();
    let marker = Instances::new();
    let rs = replicas(&server, &marker.0, 1, &["r1", "r2"], "3s");
    let leader = rs.iter().find(|r| r.leads()).unwrap();
    let follower = rs.iter().find(|r| r.id != leader.id).unwrap();
    // A burst through the follower scales out; a slow trickle (300 ms requests) keeps
    // running through it while the burst ends and the fleet scales back in.
    let burst = format!("http://127.0.0.1:{}/work?sleep_ms=20", follower.listen);
    let burst = std::thread::spawn(move || load(&burst, 60, 8));
    let slow = format!("http://127.0.0.1:{}/work?sleep_ms=300", follower.listen);
    let slow = std::thread::spawn(move || load(&slow, 6, 30));
    wait_until(20, "scale-out", || {
        leader.service()["desired"].as_u64() >= Some(3)
    });
    let report = burst.join().unwrap();
    assert_eq!(report["errors"]["total"], 0, "{report}");
    wait_until(25, "scale-in", || {
        leader.service()["desired"].as_u64() == Some(1) && follower.instance_ids().len() == 1
    });
    let report = slow.join().unwrap();
    assert_eq!(report["errors"]["total"], 0, "{report}");
    assert!(leader.log().contains("instance stopped"));
}

/// A leader stopped with SIGTERM while a peer runs hands over at once: it releases the lock
/// (no lease to wait out) and leaves the instances, which the peer adopts.
#[test]
fn a_stopping_leader_hands_over_at_once() {
    let server = redis::RedisServer::start();
    let marker = Instances::new();
    let mut rs = replicas(&server, &marker.0, 2, &["r1", "r2"], "120s");
    let li = rs.iter().position(|r| r.leads()).unwrap();
    let ids = rs[li].instance_ids();
    let pids = marker.pids();
    assert_eq!(pids.len(), 2);
    wait_until(5, "the leader sees its peer", || {
        rs[li].leader()["services"][0]["load"]
            .as_array()
            .is_some_and(|l| l.len() == 2)
    });
    rs[li].proc.signal("TERM");
    let t0 = Instant::now();
    let other = &rs[1 - li];
    wait_until(5, "the peer leads", || other.leads());
    let took = t0.elapsed();
    eprintln!("handed over in {took:?}");
    assert_eq!(rs[li].proc.wait_exit(20), Some(0), "{}", rs[li].log());
    assert!(
        took < Duration::from_secs_f64(LEASE_SECS),
        "{took:?}\n{}",
        rs[li].log()
    );
    let other = &rs[1 - li];
    assert_eq!(
        other.instance_ids(),
        ids,
        "{}\n---\n{}",
        rs[li].log(),
        other.log()
    );
    assert_eq!(marker.pids(), pids, "instances kept, not restarted");
    assert!(rs[li].log().contains("leadership released"));
}

/// The last replica killed: its instances keep running, and the next replica that starts
/// adopts them instead of starting a new fleet.
#[test]
fn a_new_replica_adopts_what_a_killed_last_replica_left() {
    let server = redis::RedisServer::start();
    let marker = Instances::new();
    let mut rs = replicas(&server, &marker.0, 2, &["old"], "120s");
    let ids = rs[0].instance_ids();
    let pids = marker.pids();
    rs[0].proc.signal("KILL");
    let _ = rs[0].proc.wait_exit(5);
    let new = Replica::start("new", &server.url(), &marker.0, 2, "120s");
    wait_until(10, "the new replica leads", || new.leads());
    wait_until(5, "the fleet adopted", || new.instance_ids() == ids);
    assert_eq!(marker.pids(), pids);
    wait_until(5, "the adoption logged", || new.log().contains("adopted=2"));
    assert_eq!(new.instance_ids(), ids);
}

/// Which demo origin answers `/work` on `listen` (its `SHOAL_INSTANCE`).
fn origin(listen: u16) -> String {
    let (s, body) = get(listen, "/work");
    if s != 200 {
        return format!("status {s}");
    }
    serde_json::from_str::<Value>(&body).unwrap()["instance"]
        .as_str()
        .unwrap_or("")
        .to_string()
}

/// `shoal run` on `text` written to `dir/shoal.toml` with the given modification time
/// (seconds ago), so a restart can bring an old file.
fn run_with_old_file(dir: &std::path::Path, text: &str, listen: u16, secs_ago: u64) -> Proc {
    let path = dir.join("shoal.toml");
    std::fs::write(&path, text).unwrap();
    let ok = std::process::Command::new("touch")
        .arg("-d")
        .arg(format!("{secs_ago} seconds ago"))
        .arg(&path)
        .status()
        .unwrap();
    assert!(ok.success());
    let log = std::fs::OpenOptions::new()
        .append(true)
        .create(true)
        .open(dir.join("shoal.log"))
        .unwrap();
    let child = std::process::Command::new(SHOAL)
        .args(["run", "--config"])
        .arg(&path)
        .env("RUST_LOG", "info")
        .env("SHOAL_ADMIN_TOKEN", "test-token")
        .stdout(std::process::Stdio::null())
        .stderr(log)
        .spawn()
        .unwrap();
    wait_port(listen, 20);
    Proc(child)
}

/// Config from one source: an edit reloaded on one replica reaches the others, each keeping
/// its own listen and admin addresses and identity; a SIGHUP on a replica whose file did not
/// change does not put that file back over the shared config; a replica restarted with its
/// old file adopts the shared version instead of publishing the old one.
#[test]
fn a_reload_on_one_replica_reaches_the_others() {
    let redis = redis::RedisServer::start();
    let dir = tempdir();
    let (_a, a) = demo(dir.path(), "origin-a");
    let (_b, b) = demo(dir.path(), "origin-b");
    let text = |listen: u16, admin: u16, id: &str, backend: u16| {
        format!(
            "[admin]\nlisten = \"127.0.0.1:{admin}\"\n\n[services.web]\nlisten = \"127.0.0.1:{listen}\"\n\
             backends = [\"127.0.0.1:{backend}\"]\n\n[cluster]\nredis = \"{}\"\nlease = \"{LEASE_SECS}s\"\nid = \"{id}\"\nshare_config = true\n",
            redis.url()
        )
    };
    let mut rs = Vec::new();
    for id in ["r1", "r2", "r3"] {
        let d = tempdir();
        let (listen, admin) = (free_port(), free_port());
        let (p, _) = run_shoal(d.path(), &text(listen, admin, id, a), listen);
        rs.push((p, d, listen, admin, id));
    }
    for r in &rs {
        wait_until(10, "origin a everywhere", || origin(r.2) == "origin-a");
    }
    let version = |admin: u16| api_json(admin, "/api/cluster/config")["version"].as_u64();
    for r in &rs {
        wait_until(10, "a shared version everywhere", || {
            version(r.3).is_some_and(|v| v > 0)
        });
    }

    // An edit on r1, reloaded there, reaches r2 and r3.
    let (l1, a1) = (rs[0].2, rs[0].3);
    std::fs::write(rs[0].1.path().join("shoal.toml"), text(l1, a1, "r1", b)).unwrap();
    rs[0].0.signal("HUP");
    for r in &rs {
        wait_until(10, "origin b everywhere", || origin(r.2) == "origin-b");
    }
    let v = version(a1).unwrap();
    for r in &rs {
        wait_until(5, "one version", || version(r.3) == Some(v));
    }

    // r2's file still names origin a: a SIGHUP there (e.g. for certificates) keeps the
    // shared config.
    rs[1].0.signal("HUP");
    let until = Instant::now() + Duration::from_millis(1500);
    while Instant::now() < until {
        for r in &rs {
            assert_eq!(origin(r.2), "origin-b");
        }
    }
    assert_eq!(
        version(rs[1].3),
        Some(v),
        "the unchanged file was not published"
    );
    let log2 = std::fs::read_to_string(rs[1].1.path().join("shoal.log")).unwrap();
    assert!(log2.contains("shared config stays in force"), "{log2}");

    // r3 restarted with its old file (written before the edit) adopts the shared version.
    let (listen3, admin3) = (rs[2].2, rs[2].3);
    let dir3 = rs[2].1.path().to_path_buf();
    // What r3 read of its file is kept for its next start.
    let seen = std::fs::read_to_string(dir3.join(".shoal/cluster-config.seen")).unwrap();
    assert!(seen.contains(&format!("127.0.0.1:{a}")), "{seen}");
    let _ = rs[2].0 .0.kill();
    let _ = rs[2].0 .0.wait();
    rs[2].0 = run_with_old_file(&dir3, &text(listen3, admin3, "r3", a), listen3, 3600);
    wait_until(10, "r3 adopts the shared config", || {
        version(admin3) == Some(v) && origin(listen3) == "origin-b"
    });
    for r in &rs {
        assert_eq!(origin(r.2), "origin-b");
        assert_eq!(version(r.3), Some(v));
    }
    let m = get(admin3, "/metrics").1;
    assert!(
        m.contains("shoal_cluster_config_events_total{event=\"applied\"} 1"),
        "{m}"
    );
}
