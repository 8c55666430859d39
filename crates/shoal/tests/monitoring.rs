//! The monitoring files under `deploy/` against the real tools: promtool checks and rule unit
//! tests, and a real Prometheus (Debian `prometheus`, free port, temp dir) scraping a running
//! shoal, answering every query of the Grafana dashboard.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use common::*;

fn deploy() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../deploy")
}

fn promtool(args: &[&str], dir: &Path) -> String {
    let out = Command::new("promtool")
        .args(args)
        .current_dir(dir)
        .output()
        .expect("promtool (Debian package prometheus) is required");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "promtool {args:?}:\n{text}");
    text
}

#[test]
fn alert_rules_and_scrape_config_pass_promtool() {
    let dir = deploy().join("prometheus");
    let out = promtool(&["check", "rules", "alerts.yml"], &dir);
    assert!(out.contains("SUCCESS"), "{out}");
    promtool(&["test", "rules", "alerts_test.yml"], &dir);
    promtool(&["check", "config", "prometheus.yml"], &dir);
}

/// Percent-encodes a query parameter.
fn enc(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// A private Prometheus scraping `target` every second.
struct Prometheus {
    _proc: Proc,
    port: u16,
}

impl Prometheus {
    fn start(dir: &Path, target: u16, rules: Option<&Path>) -> Prometheus {
        let port = free_port();
        let mut cfg = String::from("global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n");
        if let Some(r) = rules {
            cfg.push_str(&format!("rule_files:\n  - {}\n", r.display()));
        }
        cfg.push_str(&format!(
            "scrape_configs:\n  - job_name: shoal\n    static_configs:\n      - targets: [\"127.0.0.1:{target}\"]\n"
        ));
        let file = dir.join("prometheus.yml");
        std::fs::write(&file, cfg).unwrap();
        let log = std::fs::File::create(dir.join("prometheus.log")).unwrap();
        let child = Command::new("prometheus")
            .arg(format!("--config.file={}", file.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.join("tsdb").display()
            ))
            .arg(format!("--web.listen-address=127.0.0.1:{port}"))
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("prometheus (Debian package prometheus) is required");
        let p = Prometheus {
            _proc: Proc(child),
            port,
        };
        wait_port(port, 30);
        wait_until(30, "prometheus ready", || get(port, "/-/ready").0 == 200);
        p
    }

    /// An instant query; panics unless Prometheus answers `success`.
    fn query(&self, q: &str) -> Vec<serde_json::Value> {
        let (status, body) = get(self.port, &format!("/api/v1/query?query={}", enc(q)));
        let v: serde_json::Value = serde_json::from_str(&body)
            .unwrap_or_else(|e| panic!("query {q}: {status} {e}: {body}"));
        assert_eq!(v["status"], "success", "query {q}: {body}");
        v["data"]["result"].as_array().cloned().unwrap_or_default()
    }

    fn value(&self, q: &str) -> Option<f64> {
        self.query(q)
            .first()
            .and_then(|r| r["value"][1].as_str().and_then(|s| s.parse().ok()))
    }
}

#[test]
fn prometheus_scrapes_shoal_and_answers_every_dashboard_query() {
    let dir = tempdir();
    let (listen, admin) = (free_port(), free_port());
    let cfg = fleet_config(
        listen,
        admin,
        "[services.demo.fleet]\ncommand = \"shoal demo-service\"\nmin = 1\nmax = 3\n[services.demo.autoscale]\ntargets = [{ metric = \"rps\", target = 1000 }]\n",
    );
    let (_shoal, _) = run_shoal(dir.path(), &cfg, listen);
    wait_until(20, "an instance", || {
        ready(&api_json(admin, "/api/services/demo")) == 1
    });
    // The repo's rules load and evaluate against live data.
    let rules = deploy().join("prometheus/alerts.yml");
    let prom = Prometheus::start(dir.path(), admin, Some(&rules));
    let url = format!("http://127.0.0.1:{listen}/work?cpu_ms=1&sleep_ms=1");
    // Load long enough for several scrapes to see the counters grow, even on a busy machine.
    let loader = std::thread::spawn(move || load(&url, 50, 15));
    wait_until(40, "requests scraped", || {
        prom.value(r#"sum(shoal_requests_total{service="demo",code="200"})"#)
            .is_some_and(|v| v > 50.0)
    });
    assert_eq!(prom.value(r#"up{job="shoal"}"#), Some(1.0));
    assert_eq!(
        prom.value(r#"shoal_max_instances{service="demo"}"#),
        Some(3.0)
    );
    // A rate needs two scrapes that saw traffic.
    wait_until(40, "a request rate", || {
        prom.value(r#"sum(rate(shoal_requests_total{service="demo"}[1m]))"#)
            .is_some_and(|v| v > 1.0)
    });
    loader.join().unwrap();
    let rule_groups = get(prom.port, "/api/v1/rules").1;
    assert!(
        rule_groups.contains("ShoalLatencySLOFastBurn"),
        "{rule_groups}"
    );
    assert!(!rule_groups.contains("\"health\":\"err"), "{rule_groups}");

    // Every query of the Grafana dashboard parses and runs; those over traffic, latency and
    // the fleet return data.
    let dash: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(deploy().join("grafana/shoal-dashboard.json")).unwrap(),
    )
    .unwrap();
    let vars = dash["templating"]["list"].as_array().unwrap();
    assert!(
        vars.iter().any(|v| v["name"] == "service"),
        "no $service variable"
    );
    let mut with_data = Vec::new();
    let mut n = 0;
    for p in dash["panels"].as_array().unwrap() {
        for t in p["targets"].as_array().into_iter().flatten() {
            let expr = t["expr"].as_str().unwrap();
            n += 1;
            let q = expr
                .replace("$service", "demo")
                .replace("$__rate_interval", "1m");
            if !prom.query(&q).is_empty() {
                with_data.push(p["title"].as_str().unwrap().to_string());
            }
        }
    }
    assert!(n >= 20, "only {n} queries");
    for title in [
        "Requests/s by service",
        "Requests/s by instance",
        "Latency p50 / p95 / p99",
        "Instances by state vs desired",
        "CPU per instance (cores)",
        "Memory per instance",
    ] {
        assert!(
            with_data.iter().any(|t| t == title),
            "{title}: no data; had {with_data:?}"
        );
    }
}

/// A scrape target whose exposition the test sets (the load a real exporter would report).
struct Exporter {
    port: u16,
    body: std::sync::Arc<std::sync::Mutex<String>>,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Exporter {
    fn start() -> Exporter {
        use std::io::{Read, Write};
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.set_nonblocking(true).unwrap();
        let port = l.local_addr().unwrap().port();
        let body = std::sync::Arc::new(std::sync::Mutex::new(String::new()));
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let (b, st) = (body.clone(), stop.clone());
        let thread = std::thread::spawn(move || {
            while !st.load(std::sync::atomic::Ordering::Relaxed) {
                let Ok((mut s, _)) = l.accept() else {
                    std::thread::sleep(std::time::Duration::from_millis(10));
                    continue;
                };
                let _ = s.set_nonblocking(false);
                let _ = s.set_read_timeout(Some(std::time::Duration::from_secs(2)));
                let mut buf = [0u8; 4096];
                let _ = s.read(&mut buf);
                let text = b.lock().unwrap().clone();
                let _ = write!(
                    s,
                    "HTTP/1.1 200 OK\r\nContent-Type: text/plain; version=0.0.4\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{text}",
                    text.len()
                );
            }
        });
        Exporter {
            port,
            body,
            stop,
            thread: Some(thread),
        }
    }

    fn set(&self, queue_length: Option<u32>) {
        *self.body.lock().unwrap() = match queue_length {
            Some(n) => {
                format!("# TYPE work_queue_length gauge\nwork_queue_length{{queue=\"jobs\"}} {n}\n")
            }
            None => String::new(),
        };
    }
}

impl Drop for Exporter {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn desired(admin: u16) -> u64 {
    api_json(admin, "/api/services/demo")["desired"]
        .as_u64()
        .unwrap()
}

/// KEDA's prometheus scaler semantics against a real Prometheus: desired = ceil(value /
/// target); an empty answer or an unreachable server holds the size (no scale-down).
#[test]
fn a_prometheus_query_scales_the_fleet_and_missing_data_holds_it() {
    let dir = tempdir();
    let exporter = Exporter::start();
    exporter.set(Some(25));
    let prom = Prometheus::start(dir.path(), exporter.port, None);
    wait_until(20, "the queue length in prometheus", || {
        prom.value("sum(work_queue_length)") == Some(25.0)
    });
    let (listen, admin) = (free_port(), free_port());
    let cfg = fleet_config(
        listen,
        admin,
        &format!(
            r#"[services.demo.fleet]
command = "shoal demo-service"
min = 1
max = 5
[services.demo.autoscale]
interval = "1s"
targets = [{{ metric = "prometheus", server = "http://127.0.0.1:{}", query = "sum(work_queue_length)", target = 10, timeout = "1s" }}]
scale_down_stabilization = "1s"
"#,
            prom.port
        ),
    );
    let (_shoal, _) = run_shoal(dir.path(), &cfg, listen);
    // 25 queued at 10 per instance: 3 instances.
    wait_until(30, "three instances for 25 queued", || desired(admin) == 3);
    wait_until(30, "three ready", || {
        ready(&api_json(admin, "/api/services/demo")) == 3
    });
    let up = r#"shoal_dependency_up{dependency="prometheus"} 1"#;
    assert!(get(admin, "/metrics").1.contains(up), "{up}");

    // The series disappears: the empty answer holds the size rather than reading as zero.
    exporter.set(None);
    wait_until(30, "the empty answer seen", || {
        api_json(admin, "/api/services/demo")["prometheus"]["error"]
            .as_str()
            .is_some_and(|e| e.contains("no series"))
    });
    for _ in 0..4 {
        std::thread::sleep(std::time::Duration::from_secs(1));
        assert_eq!(desired(admin), 3, "scaled on an empty query answer");
    }

    // Data again, lower: scales in to ceil(5 / 10) = 1.
    exporter.set(Some(5));
    wait_until(30, "scale-in to one", || desired(admin) == 1);
    exporter.set(Some(38));
    wait_until(30, "scale-out to four", || desired(admin) == 4);

    // Prometheus goes away: the size holds, the failures are counted.
    drop(prom);
    wait_until(30, "the failure seen", || {
        api_json(admin, "/api/services/demo")["prometheus"]["error"]
            .as_str()
            .is_some_and(|e| e.contains("cannot reach"))
    });
    exporter.set(Some(0));
    for _ in 0..4 {
        std::thread::sleep(std::time::Duration::from_secs(1));
        assert_eq!(desired(admin), 4, "scaled while Prometheus was down");
    }
    let metrics = get(admin, "/metrics").1;
    let connect_errors: f64 = metrics
        .lines()
        .find(|l| {
            l.starts_with("shoal_autoscale_source_errors_total") && l.contains("kind=\"connect\"")
        })
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0);
    assert!(connect_errors >= 1.0, "{metrics}");
    assert!(
        metrics.contains(r#"shoal_dependency_up{dependency="prometheus"} 0"#),
        "{metrics}"
    );
    let decisions = get(admin, "/api/services/demo/decisions").1;
    assert!(decisions.contains("missing_metrics"), "{decisions}");
}

/// A private `redis-server` (Debian `redis-server`) on a free port in `dir`; killed on drop.
fn redis_server(dir: &Path, port: u16) -> Proc {
    let child = Command::new("redis-server")
        .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
        .args(["--save", "", "--appendonly", "no", "--daemonize", "no"])
        .arg("--dir")
        .arg(dir)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("redis-server (Debian package redis-server) is required");
    wait_port(port, 10);
    Proc(child)
}

fn dependency_up(admin: u16, dependency: &str) -> Option<f64> {
    let want = format!("shoal_dependency_up{{dependency=\"{dependency}\"}} ");
    get(admin, "/metrics")
        .1
        .lines()
        .find_map(|l| l.strip_prefix(&want).and_then(|v| v.parse().ok()))
}

/// `shoal_dependency_up{dependency="redis"}` follows the cache's Redis tier through an outage,
/// while every request is still answered (from the origin: memory tier only).
#[test]
fn dependency_up_follows_the_cache_redis_through_an_outage() {
    let dir = tempdir();
    let redis_port = free_port();
    let mut redis = Some(redis_server(dir.path(), redis_port));
    let (_backend, backend) = demo(dir.path(), "a");
    let (listen, admin) = (free_port(), free_port());
    let mut shoal = Proc(
        Command::new(SHOAL)
            .args(["proxy", "--threads", "1", "--cache-memory", "1MiB"])
            .arg(format!("--cache-redis=redis://127.0.0.1:{redis_port}/"))
            .arg(format!("--listen=127.0.0.1:{listen}"))
            .arg(format!("--backend=127.0.0.1:{backend}"))
            .arg(format!("--admin=127.0.0.1:{admin}"))
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(dir.path().join("shoal.log")).unwrap())
            .spawn()
            .unwrap(),
    );
    wait_port(admin, 20);
    let mut n = 0;
    let mut request = || {
        n += 1;
        // Distinct URLs: each is a memory miss that asks Redis.
        assert_eq!(get(listen, &format!("/work?cpu_ms=0&n={n}")).0, 200);
    };
    wait_until(20, "redis up", || {
        request();
        dependency_up(admin, "redis") == Some(1.0)
    });
    drop(redis.take());
    wait_until(20, "redis down", || {
        request();
        dependency_up(admin, "redis") == Some(0.0)
    });
    redis = Some(redis_server(dir.path(), redis_port));
    wait_until(30, "redis up again", || {
        request();
        dependency_up(admin, "redis") == Some(1.0)
    });
    assert!(shoal.0.try_wait().unwrap().is_none(), "shoal exited");
    drop(redis);
}

/// `shoal tune --prometheus` reads a range of a running shoal's request rate from a real
/// Prometheus that scraped it and recommends settings.
#[test]
fn tune_reads_demand_from_prometheus_and_recommends() {
    let dir = tempdir();
    let (listen, admin) = (free_port(), free_port());
    let cfg = fleet_config(
        listen,
        admin,
        "[services.demo.fleet]\ncommand = \"shoal demo-service\"\nmin = 1\nmax = 2\n",
    );
    let (_shoal, _) = run_shoal(dir.path(), &cfg, listen);
    wait_until(20, "an instance", || {
        ready(&api_json(admin, "/api/services/demo")) == 1
    });
    let prom = Prometheus::start(dir.path(), admin, None);
    let url = format!("http://127.0.0.1:{listen}/work?cpu_ms=1");
    let report = load(&url, 30, 15);
    assert_eq!(report["errors"]["total"], 0, "{report}");
    let query = r#"sum(rate(shoal_requests_total{service="demo"}[5s]))"#;
    wait_until(20, "a rate scraped", || {
        prom.value(query).is_some_and(|v| v > 5.0)
    });
    let server = format!("http://127.0.0.1:{}", prom.port);
    let out = Command::new(SHOAL)
        .args([
            "tune",
            "--prometheus",
            &server,
            "--query",
            query,
            "--from",
            "now-40s",
            "--to",
            "now",
            "--step",
            "1",
            "--capacity",
            "20",
            "--startup",
            "2",
            // Loose: the scraped window may hold only ~10 s, whose first seconds (one
            // instance, 30 req/s on 20 of capacity) are a violation under any setting.
            "--max-violation",
            "40",
            "--policy",
            "reactive",
            "--json",
        ])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["settings"]["policy"], "reactive", "{v}");
    assert!(v["result"]["instance_hours"].as_f64().unwrap() > 0.0, "{v}");
    // The replay saw the load: about 30 requests/s at its peak.
    let peak = v["trace"]["peak_rps"].as_f64().unwrap();
    assert!((15.0..=45.0).contains(&peak), "{v}");
    assert!(v["trace"]["duration_secs"].as_f64().unwrap() >= 5.0, "{v}");

    // A query Prometheus refuses is reported, not turned into a recommendation.
    let out = Command::new(SHOAL)
        .args([
            "tune",
            "--prometheus",
            &server,
            "--query",
            "sum(",
            "--from",
            "now-40s",
            "--to",
            "now",
            "--capacity",
            "20",
            "--startup",
            "2",
            "--max-violation",
            "10",
        ])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("sum("));
}
