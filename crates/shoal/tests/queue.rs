//! Async routes through the real `shoal` binary: jobs through RabbitMQ and Kafka (tansu),
//! worker fleets of demo-service instances, results across restarts, worker kills, backlog
//! scaling from and to zero, and a broker outage.

mod common;

#[path = "../../shoal-queue/tests/common/brokers.rs"]
mod brokers;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use brokers::{Rabbit, Tansu};
use common::*;

/// `[brokers.b]` for RabbitMQ or Kafka.
enum Broker {
    Rabbit(String),
    Kafka(String),
}

impl Broker {
    fn table(&self) -> String {
        match self {
            Broker::Rabbit(url) => format!("[brokers.b]\nrabbitmq = \"{url}\"\n"),
            Broker::Kafka(addr) => format!("[brokers.b]\nkafka = \"{addr}\"\npartitions = 2\n"),
        }
    }
}

/// An async route `POST /async/...` → queue `work` → the `workers` fleet (`fleet` tables).
fn config(listen: u16, admin: u16, broker: &Broker, workers: &str) -> String {
    format!(
        r#"[admin]
listen = "127.0.0.1:{admin}"

{broker}
[services.web]
listen = "127.0.0.1:{listen}"

[[services.web.routes]]
prefix = "/async"
methods = ["POST"]
service = "workers"
strip_prefix = true
async = {{ queue = "work", max_attempts = 4, max_body = "4KiB", concurrency = 16, attempt_timeout = "10s" }}

[services.workers.fleet]
command = "shoal demo-service"
health_path = "/healthz"
startup_timeout = "20s"
stop_grace = "2s"
{workers}

[services.workers.timeouts]
drain = "10s"
"#,
        broker = broker.table()
    )
}

const FIXED: &str = "min = 2\nmax = 2\n";

fn addr(port: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], port))
}

/// Full response of one request: (status, headers lowercased, body).
fn request(port: u16, method: &str, path: &str, body: &str) -> (u16, String, String) {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr(port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    let req = format!(
        "{method} {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    s.write_all(req.as_bytes()).unwrap();
    let mut out = String::new();
    let _ = s.read_to_string(&mut out);
    let status = out.get(9..12).and_then(|c| c.parse().ok()).unwrap_or(0);
    let (head, body) = out.split_once("\r\n\r\n").unwrap_or((&out, ""));
    (status, head.to_ascii_lowercase(), body.to_string())
}

/// Submits a job; Some(id) on a 202.
fn submit(port: u16, query: &str) -> (u16, Option<String>) {
    let (status, head, body) = request(port, "POST", &format!("/async/work?{query}"), "payload");
    let id = head
        .lines()
        .find_map(|l| l.strip_prefix("location: /jobs/"))
        .map(|s| s.trim().to_string());
    assert_eq!(status == 202, id.is_some(), "{status} {head} {body}");
    (status, id)
}

/// Polls a job until it is no longer pending; returns (status, body).
fn fetch(port: u16, id: &str, secs: u64) -> (u16, String) {
    let deadline = Instant::now() + Duration::from_secs(secs);
    loop {
        let (status, _, body) = request(port, "GET", &format!("/jobs/{id}"), "");
        if status != 202 {
            return (status, body);
        }
        assert!(Instant::now() < deadline, "job {id} still pending");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// One `shoal_queue_jobs_total{queue="work",result=...}` value.
fn jobs_metric(admin: u16, result: &str) -> u64 {
    metric(
        admin,
        &format!("shoal_queue_jobs_total{{queue=\"work\",result=\"{result}\"}}"),
    )
}

/// The value of the series `series` (name and labels as rendered) on `/metrics`, or 0.
fn metric(admin: u16, series: &str) -> u64 {
    let (_, text) = get(admin, "/metrics");
    let want = format!("{series} ");
    text.lines()
        .find_map(|l| l.strip_prefix(&want))
        .map_or(0, |v| v.trim().parse::<f64>().unwrap() as u64)
}

fn start(dir: &Path, cfg: &str, listen: u16) -> Proc {
    run_shoal(dir, cfg, listen).0
}

fn stop(mut p: Proc) {
    p.signal("TERM");
    assert_eq!(p.wait_exit(60), Some(0), "shoal did not stop cleanly");
}

/// One job end to end, then a second submitted right before a restart: both results are
/// there after it (redb in data_dir), the second one run before or after the restart.
fn end_to_end_across_restart(broker: Broker) {
    let dir = tempdir();
    let (listen, admin) = (free_port(), free_port());
    let cfg = config(listen, admin, &broker, "min = 1\nmax = 1\n");
    let shoal = start(dir.path(), &cfg, listen);
    let (s, id) = submit(listen, "cpu_ms=1");
    assert_eq!(s, 202);
    let id = id.unwrap();
    let (s, body) = fetch(listen, &id, 60);
    assert_eq!(s, 200, "{body}");
    assert!(body.contains("cpu_ms"), "the demo worker's answer: {body}");
    assert_eq!(
        request(listen, "GET", "/jobs/0123456789abcdef0123456789abcdef", "").0,
        404
    );
    let big = "x".repeat(5000);
    assert_eq!(request(listen, "POST", "/async/work", &big).0, 413);
    let (_, second) = submit(listen, "sleep_ms=300");
    stop(shoal);

    let shoal = start(dir.path(), &cfg, listen);
    assert_eq!(
        fetch(listen, &id, 10).0,
        200,
        "a result survives the restart"
    );
    let (s, body) = fetch(listen, &second.unwrap(), 60);
    assert_eq!(s, 200, "submitted before the restart: {body}");
    stop(shoal);
}

#[test]
fn rabbitmq_job_end_to_end_across_restart() {
    let r = Rabbit::start();
    end_to_end_across_restart(Broker::Rabbit(r.url()));
}

#[test]
fn kafka_job_end_to_end_across_restart() {
    let t = Tansu::start();
    end_to_end_across_restart(Broker::Kafka(t.addr()));
}

/// 1,000 jobs while two worker processes are SIGKILLed: every job gets its result.
fn thousand_jobs_with_kills(broker: Broker, name: &str) {
    let dir = tempdir();
    let (listen, admin) = (free_port(), free_port());
    let shoal = start(dir.path(), &config(listen, admin, &broker, FIXED), listen);
    wait_until(60, "two workers", || {
        ready(&api_json(admin, "/api/services/workers")) == 2
    });
    let t0 = Instant::now();
    let ids = Arc::new(Mutex::new(Vec::new()));
    let sent = Arc::new(AtomicUsize::new(0));
    let senders: Vec<_> = (0..4)
        .map(|_| {
            let (ids, sent) = (ids.clone(), sent.clone());
            std::thread::spawn(move || {
                while sent.fetch_add(1, Ordering::SeqCst) < 1000 {
                    let (s, id) = submit(listen, "sleep_ms=20");
                    assert_eq!(s, 202);
                    ids.lock().unwrap().push(id.unwrap());
                }
            })
        })
        .collect();
    let mut killed = 0;
    // Kill while jobs run (by finished count: Kafka takes jobs in later than it accepts them).
    for at in [300, 600] {
        wait_until(120, "progress", || jobs_metric(admin, "done") >= at);
        let v = api_json(admin, "/api/services/workers");
        let pid = v["processes"]
            .as_array()
            .unwrap()
            .iter()
            .find_map(|p| p["pid"].as_u64())
            .expect("a worker pid");
        let _ = std::process::Command::new("kill")
            .args(["-9", &pid.to_string()])
            .status();
        killed += 1;
    }
    for s in senders {
        s.join().unwrap();
    }
    let ids = ids.lock().unwrap().clone();
    assert_eq!(ids.len(), 1000);
    let mut lost = 0;
    for id in &ids {
        if fetch(listen, id, 180).0 != 200 {
            lost += 1;
        }
    }
    let elapsed = t0.elapsed();
    let (done, dups) = (jobs_metric(admin, "done"), jobs_metric(admin, "duplicated"));
    let retried = metric(admin, "shoal_queue_failed_attempts_total{queue=\"work\"}");
    eprintln!(
        "{name}: 1000 jobs, {killed} workers SIGKILLed: {lost} lost, {done} done, {retried} attempts cut by the kills and retried, {dups} duplicate deliveries, {:.1}s",
        elapsed.as_secs_f64()
    );
    assert_eq!(lost, 0);
    assert_eq!(done, 1000, "each job finished once");
    // Each worker runs several jobs at any moment: a kill cuts some short.
    assert!(retried >= 1, "the kills hit running jobs");
    stop(shoal);
}

#[test]
fn rabbitmq_thousand_jobs_with_worker_kills() {
    let r = Rabbit::start();
    thousand_jobs_with_kills(Broker::Rabbit(r.url()), "rabbitmq");
}

#[test]
fn kafka_thousand_jobs_with_worker_kills() {
    let t = Tansu::start();
    thousand_jobs_with_kills(Broker::Kafka(t.addr()), "kafka");
}

/// The worker fleet starts at zero, grows with the backlog, and returns to zero once idle;
/// the decisions are in the fleet's log with their reasons.
#[test]
fn worker_fleet_scales_zero_to_n_to_zero() {
    let r = Rabbit::start();
    let dir = tempdir();
    let (listen, admin) = (free_port(), free_port());
    let workers = "min = 0\nmax = 3\n[services.workers.autoscale]\npolicy = \"backlog\"\ntargets = [{ metric = \"backlog\", target = 5 }]\ncooldown = \"3s\"\nscale_down_stabilization = \"2s\"\n";
    let shoal = start(
        dir.path(),
        &config(listen, admin, &Broker::Rabbit(r.url()), workers),
        listen,
    );
    let svc = || api_json(admin, "/api/services/workers");
    wait_until(10, "a first decision", || !svc()["last_decision"].is_null());
    assert_eq!(svc()["desired"], 0, "idle at zero");
    let ids: Vec<String> = (0..40)
        .map(|_| submit(listen, "sleep_ms=250").1.unwrap())
        .collect();
    let mut peak = 0;
    wait_until(60, "scale-out to 3", || {
        peak = peak.max(svc()["desired"].as_u64().unwrap());
        peak == 3
    });
    for id in &ids {
        assert_eq!(
            fetch(listen, id, 120).0,
            200,
            "the first jobs waited for a worker"
        );
    }
    wait_until(60, "back to zero", || {
        let v = svc();
        v["desired"] == 0 && v["instances"].as_array().is_some_and(|a| a.is_empty())
    });
    let log = api_json(admin, "/api/services/workers/decisions");
    let d = log["decisions"].as_array().unwrap();
    let dirs: Vec<(&str, &str)> = d
        .iter()
        .map(|d| {
            (
                d["direction"].as_str().unwrap(),
                d["reason"].as_str().unwrap(),
            )
        })
        .collect();
    assert!(dirs.iter().any(|(dir, _)| *dir == "up"), "{dirs:?}");
    assert_eq!(dirs.last().map(|d| d.0), Some("down"), "{dirs:?}");
    assert!(d.iter().all(|d| d["policy"] == "backlog"), "{log}");
    stop(shoal);
}

/// RabbitMQ stopped: submissions get 503 + Retry-After, nothing accepted is lost; RabbitMQ
/// back: submissions succeed again without restarting shoal.
#[test]
fn rabbitmq_outage_refuses_then_resumes() {
    let mut r = Rabbit::start();
    let dir = tempdir();
    let (listen, admin) = (free_port(), free_port());
    let shoal = start(
        dir.path(),
        &config(
            listen,
            admin,
            &Broker::Rabbit(r.url()),
            "min = 1\nmax = 1\n",
        ),
        listen,
    );
    let mut accepted = vec![submit(listen, "cpu_ms=1").1.expect("connected at start")];
    r.stop_node();
    let mut refused = 0;
    wait_until(60, "a 503", || {
        let (status, head, _) = request(listen, "POST", "/async/work", "x");
        match status {
            202 => accepted.push(
                head.lines()
                    .find_map(|l| l.strip_prefix("location: /jobs/"))
                    .unwrap()
                    .trim()
                    .to_string(),
            ),
            503 => {
                assert!(head.contains("retry-after:"), "{head}");
                refused += 1;
            }
            s => panic!("unexpected {s}"),
        }
        refused >= 3
    });
    let deps = get(admin, "/metrics").1;
    assert!(
        deps.contains("shoal_dependency_up{dependency=\"rabbitmq\"} 0"),
        "broker down shows"
    );
    r.boot();
    wait_until(60, "submissions accepted again", || {
        match submit(listen, "cpu_ms=1") {
            (202, Some(id)) => {
                accepted.push(id);
                true
            }
            _ => false,
        }
    });
    let mut states = BTreeMap::new();
    for id in &accepted {
        *states.entry(fetch(listen, id, 120).0).or_insert(0) += 1;
    }
    eprintln!(
        "outage: {} accepted, {refused} refused, results {states:?}",
        accepted.len()
    );
    assert_eq!(
        states.get(&200),
        Some(&accepted.len()),
        "0 accepted-but-lost"
    );
    stop(shoal);
}

/// Jobs end to end through shoal (HTTP submit → broker → demo worker → result store), for
/// `bench/queue.sh`: prints jobs/s and job latency (accepted → result stored) p50/p99.
fn bench(broker: Broker, name: &str) {
    let env = |k: &str, d: usize| {
        std::env::var(k)
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(d)
    };
    let (jobs, workers, clients) = (env("JOBS", 2000), env("WORKERS", 2), env("SUBMITTERS", 16));
    let dir = tempdir();
    let (listen, admin) = (free_port(), free_port());
    let fleet = format!("min = {workers}\nmax = {workers}\n");
    let shoal = start(dir.path(), &config(listen, admin, &broker, &fleet), listen);
    wait_until(60, "workers", || {
        ready(&api_json(admin, "/api/services/workers")) == workers
    });
    // RATE=N: open loop, job i is submitted at t0 + i/N whatever the earlier ones did
    // (clients enough to keep the schedule); else each client submits as fast as it can.
    let rate = env("RATE", 0);
    let clients = if rate > 0 { clients.max(32) } else { clients };
    let next = Arc::new(AtomicUsize::new(0));
    let t0 = Instant::now();
    let ids: Vec<String> = (0..clients)
        .map(|_| {
            let next = next.clone();
            std::thread::spawn(move || {
                let mut ids = vec![];
                loop {
                    let i = next.fetch_add(1, Ordering::SeqCst);
                    if i >= jobs {
                        break;
                    }
                    if rate > 0 {
                        let due = t0 + Duration::from_secs_f64(i as f64 / rate as f64);
                        std::thread::sleep(due.saturating_duration_since(Instant::now()));
                    }
                    ids.push(submit(listen, "cpu_ms=1").1.expect("accepted"));
                }
                ids
            })
        })
        .collect::<Vec<_>>()
        .into_iter()
        .flat_map(|t| t.join().unwrap())
        .collect();
    let submitted = t0.elapsed();
    wait_until(600, "every job done", || {
        jobs_metric(admin, "done") >= jobs as u64
    });
    let all_done = t0.elapsed();
    // CPU the shoal process used (utime + stime, clock ticks of 10 ms), per job.
    let stat = std::fs::read_to_string(format!("/proc/{}/stat", shoal.0.id())).unwrap();
    let f: Vec<&str> = stat.rsplit_once(") ").unwrap().1.split(' ').collect();
    let ticks: u64 = f[11].parse::<u64>().unwrap() + f[12].parse::<u64>().unwrap();
    let cpu_us_per_job = ticks * 10_000 / jobs as u64;
    // Where a job's time goes: mean per stage from `shoal_queue_stage_seconds`.
    let (_, text) = get(admin, "/metrics");
    let series = |stage: &str, part: &str| -> f64 {
        let want = format!("shoal_queue_stage_seconds_{part}{{queue=\"work\",stage=\"{stage}\"}} ");
        text.lines()
            .find_map(|l| l.strip_prefix(&want))
            .map_or(0.0, |v| v.trim().parse().unwrap())
    };
    let stages: Vec<String> = [
        "submit_store",
        "confirm",
        "queued",
        "lookup",
        "worker",
        "result_store",
        "ack",
    ]
    .iter()
    .map(|s| {
        let n = series(s, "count").max(1.0);
        format!("{s} {:.2}", series(s, "sum") * 1e3 / n)
    })
    .collect();
    let mut lat: Vec<u64> = ids
        .iter()
        .map(|id| {
            let (s, head, _) = request(listen, "GET", &format!("/jobs/{id}"), "");
            assert_eq!(s, 200);
            head.lines()
                .find_map(|l| l.strip_prefix("x-shoal-job-latency-ms:"))
                .unwrap()
                .trim()
                .parse()
                .unwrap()
        })
        .collect();
    lat.sort_unstable();
    let pct = |q: f64| lat[((lat.len() as f64 * q).ceil() as usize).clamp(1, lat.len()) - 1];
    let mode = if rate > 0 {
        format!("open loop at {rate} jobs/s")
    } else {
        format!("{clients} clients")
    };
    println!(
        "shoal {name}: {jobs} jobs, {workers} workers, {mode}: submitted {:.0} jobs/s, end to end {:.0} jobs/s, latency p50 {} ms p99 {} ms; shoal CPU {cpu_us_per_job} us/job; stage means (ms): {}",
        jobs as f64 / submitted.as_secs_f64(),
        jobs as f64 / all_done.as_secs_f64(),
        pct(0.5),
        pct(0.99),
        stages.join(", "),
    );
    stop(shoal);
}

#[test]
#[ignore = "a measurement: run by bench/queue.sh"]
fn bench_rabbitmq_through_shoal() {
    let r = Rabbit::start();
    bench(Broker::Rabbit(r.url()), "rabbitmq");
}

#[test]
#[ignore = "a measurement: run by bench/queue.sh"]
fn bench_kafka_through_shoal() {
    let t = Tansu::start();
    bench(Broker::Kafka(t.addr()), "kafka");
}

/// Polls a job URL until it is no longer pending; returns (status, body).
fn fetch_url(port: u16, url: &str, secs: u64) -> (u16, String) {
    let deadline = Instant::now() + Duration::from_secs(secs);
    loop {
        let (status, _, body) = request(port, "GET", url, "");
        if status != 202 {
            return (status, body);
        }
        assert!(Instant::now() < deadline, "{url} still pending");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// POST with headers: (status, Location).
fn post_with(port: u16, path: &str, headers: &[(&str, &str)], body: &str) -> (u16, Option<String>) {
    let raw = http_raw(addr(port), "POST", path, headers, body);
    let status = raw.get(9..12).and_then(|c| c.parse().ok()).unwrap_or(0);
    (status, header(&raw, "location").map(str::to_string))
}

/// Two listeners with async routes to two queues on one Kafka broker; `api` answers its job
/// URLs under `/api/tasks`.
fn two_listeners(web: u16, api: u16, admin: u16, kafka: &str) -> String {
    format!(
        r#"[admin]
listen = "127.0.0.1:{admin}"

[brokers.b]
kafka = "{kafka}"
partitions = 2

[services.web]
listen = "127.0.0.1:{web}"

[[services.web.routes]]
prefix = "/async"
methods = ["POST"]
service = "workers"
strip_prefix = true
async = {{ queue = "work" }}

[services.api]
listen = "127.0.0.1:{api}"
jobs_path = "/api/tasks"

[[services.api.routes]]
prefix = "/async"
methods = ["POST"]
service = "workers"
strip_prefix = true
async = {{ queue = "other" }}

[services.workers.fleet]
command = "shoal demo-service"
health_path = "/healthz"
startup_timeout = "20s"
stop_grace = "2s"
min = 1
max = 1
"#
    )
}

/// Through the binary (the case of the issue, on Kafka): the same key, body and credentials
/// give the same job; the same key with another body is refused with 422; the same key and
/// body with other credentials make that client's own job; both jobs run.
#[test]
fn idempotency_keys_are_scoped_by_credentials_through_the_binary() {
    let t = Tansu::start();
    let dir = tempdir();
    let (web, api, admin) = (free_port(), free_port(), free_port());
    let shoal = start(dir.path(), &two_listeners(web, api, admin, &t.addr()), web);
    let alice = [("Idempotency-Key", "K"), ("Authorization", "Bearer alice")];
    let mallory = [
        ("Idempotency-Key", "K"),
        ("Authorization", "Bearer mallory"),
    ];
    let path = "/async/work?cpu_ms=1";
    let (s, first) = post_with(web, path, &alice, "A");
    assert_eq!(s, 202);
    let first = first.expect("a Location");
    let (s, again) = post_with(web, path, &alice, "A");
    assert_eq!(
        (s, again.as_deref()),
        (202, Some(first.as_str())),
        "same job"
    );
    assert_eq!(post_with(web, path, &alice, "B").0, 422, "another body");
    assert_eq!(
        post_with(web, "/async/work?cpu_ms=2", &alice, "A").0,
        422,
        "another target"
    );
    let (s, theirs) = post_with(web, path, &mallory, "A");
    assert_eq!(s, 202);
    let theirs = theirs.expect("a Location");
    assert_ne!(theirs, first, "another client's own job");
    // No credentials: a key would be shared by every anonymous client, so it is refused.
    assert_eq!(
        post_with(web, path, &[("Idempotency-Key", "K")], "A").0,
        400,
        "a key without the identity header"
    );
    assert_eq!(fetch_url(web, &first, 60).0, 200);
    assert_eq!(fetch_url(web, &theirs, 60).0, 200);
    stop(shoal);
}

/// Job URLs belong to their listener: each answers under its own `jobs_path` and only
/// the jobs of its own async routes' queues (another listener's job id is 404 there).
#[test]
fn jobs_path_per_listener_answers_only_its_own_queues() {
    let t = Tansu::start();
    let dir = tempdir();
    let (web, api, admin) = (free_port(), free_port(), free_port());
    let shoal = start(dir.path(), &two_listeners(web, api, admin, &t.addr()), web);
    wait_port(api, 10);
    let (s, on_web) = post_with(web, "/async/work?cpu_ms=1", &[], "w");
    assert_eq!(s, 202);
    let on_web = on_web.unwrap();
    let (s, on_api) = post_with(api, "/async/work?cpu_ms=1", &[], "a");
    assert_eq!(s, 202);
    let on_api = on_api.unwrap();
    let web_id = on_web.strip_prefix("/jobs/").expect("web: /jobs/{id}");
    let api_id = on_api
        .strip_prefix("/api/tasks/")
        .expect("api: /api/tasks/{id}");
    assert_eq!(fetch_url(web, &on_web, 60).0, 200);
    assert_eq!(fetch_url(api, &on_api, 60).0, 200);
    // Each listener knows only its own queues' jobs.
    assert_eq!(
        request(api, "GET", &format!("/api/tasks/{web_id}"), "").0,
        404
    );
    assert_eq!(request(web, "GET", &format!("/jobs/{api_id}"), "").0, 404);
    // /jobs is not taken over on a listener whose jobs_path is elsewhere.
    assert_eq!(request(api, "GET", &format!("/jobs/{api_id}"), "").0, 404);
    stop(shoal);
}

/// `examples/async-kafka.toml` as shipped (workers from zero on the backlog policy), on free
/// ports against a private Kafka-protocol broker: 200 jobs complete while two worker
/// processes are SIGKILLed mid-run.
#[test]
fn kafka_example_as_shipped_completes_200_jobs_through_two_worker_kills() {
    let t = Tansu::start();
    let dir = tempdir();
    let (listen, admin) = (free_port(), free_port());
    let example = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../examples/async-kafka.toml"
    ))
    .unwrap();
    let cfg = example
        .replace("127.0.0.1:8080", &format!("127.0.0.1:{listen}"))
        .replace("127.0.0.1:9900", &format!("127.0.0.1:{admin}"))
        .replace("127.0.0.1:9092", &t.addr())
        .replace(
            "data_dir = \".shoal\"",
            &format!("data_dir = {:?}", dir.path().join("data")),
        );
    for want in [format!(":{listen}\""), format!(":{admin}\""), t.addr()] {
        assert!(cfg.contains(&want), "{want} not in\n{cfg}");
    }
    assert!(cfg.contains("min = 0"), "the example starts from zero");
    let shoal = start(dir.path(), &cfg, listen);
    let ids: Vec<String> = (0..200)
        .map(|i| {
            let (s, id) = submit(listen, &format!("sleep_ms=1000&i={i}"));
            assert_eq!(s, 202);
            id.unwrap()
        })
        .collect();
    let mut killed = 0;
    for at in [40, 120] {
        wait_until(180, "progress", || jobs_metric(admin, "done") >= at);
        let v = api_json(admin, "/api/services/workers");
        let pid = v["processes"]
            .as_array()
            .unwrap()
            .iter()
            .find_map(|p| p["pid"].as_u64())
            .expect("a worker pid");
        let _ = std::process::Command::new("kill")
            .args(["-9", &pid.to_string()])
            .status();
        killed += 1;
    }
    let lost = ids
        .iter()
        .filter(|id| fetch(listen, id, 180).0 != 200)
        .count();
    let retried = metric(admin, "shoal_queue_failed_attempts_total{queue=\"work\"}");
    eprintln!(
        "async-kafka.toml: 200 jobs, {killed} workers SIGKILLed: {lost} lost, {retried} attempts cut and retried"
    );
    assert_eq!(lost, 0);
    assert_eq!(jobs_metric(admin, "done"), 200, "each job finished once");
    stop(shoal);
}
