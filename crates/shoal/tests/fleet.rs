//! The process fleet and the live autoscaler, with real demo instances.

mod common;

use std::net::SocketAddr;
use std::process::Command;
use std::time::{Duration, Instant};

use common::*;
use serde_json::Value;

fn api(admin: u16) -> Value {
    api_json(admin, "/api/services/demo")
}

/// A load step scales the fleet out from 1; after the load stops it scales back in; no
/// request fails over the whole run, scale-in included.
#[test]
fn load_step_scales_out_and_back_in_without_failures() {
    let dir = tempdir();
    let (listen, admin) = (free_port(), free_port());
    let cfg = fleet_config(
        listen,
        admin,
        r#"[services.demo.fleet]
command = "shoal demo-service"
min = 1
max = 4
[services.demo.autoscale]
interval = "1s"
targets = [{ metric = "in_flight", target = 2 }]
stable_window = "5s"
panic_window = "3s"
burst_hold = "5s"
scale_down_stabilization = "5s""#,
    );
    let (_shoal, _) = run_shoal(dir.path(), &cfg, listen);
    wait_until(20, "first instance", || ready(&api(admin)) == 1);
    let url = format!("http://127.0.0.1:{listen}/work?cpu_ms=2&sleep_ms=100");
    let step = Instant::now();
    let loader = std::thread::spawn(move || load(&url, 60, 12));
    // ~6 requests in flight against a target of 2 per instance → about 3 instances.
    let mut first_new_ready = None;
    wait_until(15, "scale-out", || {
        let n = ready(&api(admin));
        if n >= 2 && first_new_ready.is_none() {
            first_new_ready = Some(step.elapsed());
        }
        n >= 3
    });
    eprintln!(
        "load step → first new instance ready: {:?}",
        first_new_ready.unwrap()
    );
    let report = loader.join().unwrap();
    assert_eq!(report["errors"]["total"], 0, "{report}");
    // Load gone: back to 1 after the stabilization window, draining the others.
    wait_until(40, "scale-in", || {
        let v = api(admin);
        v["desired"] == 1 && v["instances"].as_array().unwrap().len() == 1
    });
    let (_, d) = get(admin, "/api/services/demo/decisions");
    let d: Value = serde_json::from_str(&d).unwrap();
    let dirs: Vec<&str> = d["decisions"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|x| x["direction"].as_str())
        .collect();
    assert!(dirs.contains(&"up") && dirs.contains(&"down"), "{dirs:?}");
    let (_, m) = get(admin, "/metrics");
    assert!(
        m.contains("shoal_scaling_decisions_total{service=\"demo\",direction=\"up\""),
        "{m}"
    );
    assert!(
        m.contains("shoal_desired_instances{service=\"demo\"} 1"),
        "{m}"
    );
    assert!(
        m.contains("shoal_instance_cpu_seconds_total{service=\"demo\",instance=\"demo-1\"}"),
        "{m}"
    );
}

/// The README demo (examples/shoal.toml: CPU target 0.6, max 8) under its step: 60
/// requests/s of 20 ms CPU for a minute (≈ 1.2 cores, 2 instances at 0.6 in a release
/// build). The saturated first instance (CPU at quota, requests queueing) brings more at
/// once, sized from the work arriving, not climbing on the queue it works off: never above
/// 3 (a debug build's request overhead can make the load need 3), and no request fails.
#[test]
fn demo_step_gets_its_second_instance_within_seconds_and_stops_at_two() {
    let dir = tempdir();
    let (listen, admin) = (free_port(), free_port());
    let demo = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../examples/shoal.toml"
    ))
    .unwrap();
    let cfg = demo
        .replace("127.0.0.1:8080", &format!("127.0.0.1:{listen}"))
        .replace("127.0.0.1:9900", &format!("127.0.0.1:{admin}"))
        .replace(
            "data_dir = \".shoal\"",
            &format!("data_dir = {:?}", dir.path().join("data")),
        );
    assert!(
        cfg.contains(&format!(":{listen}\"")) && cfg.contains(&format!(":{admin}\"")),
        "{cfg}"
    );
    assert!(!cfg.contains("\".shoal\""), "{cfg}");
    let (mut shoal, _) = run_shoal(dir.path(), &cfg, listen);
    wait_until(20, "first instance", || ready(&api(admin)) == 1);
    // Let the idle CPU reading settle before the step.
    std::thread::sleep(Duration::from_secs(3));
    let url = format!("http://127.0.0.1:{listen}/work?cpu_ms=20");
    let step = Instant::now();
    let loader = std::thread::spawn(move || load(&url, 60, 60));
    let (mut peak, mut second_ready, mut late) = (0u64, None, Vec::new());
    while !loader.is_finished() {
        let v = api(admin);
        peak = peak.max(v["desired"].as_u64().unwrap());
        if second_ready.is_none() && ready(&v) >= 2 {
            second_ready = Some(step.elapsed());
        }
        if step.elapsed() > Duration::from_secs(40) {
            late.push(v["desired"].as_u64().unwrap());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let report = loader.join().unwrap();
    let (_, decisions) = get(admin, "/api/services/demo/decisions");
    // Stop shoal (and its instances) before judging, so a failure leaves nothing behind.
    shoal.signal("TERM");
    assert!(shoal.wait_exit(30).is_some(), "shoal did not stop");
    eprintln!(
        "demo step: second instance ready after {second_ready:?}, peak desired {peak}, \
         last 20 s {:?}..={:?}, p99 {} ms",
        late.iter().min(),
        late.iter().max(),
        report["latency"]["p99_us"].as_u64().unwrap_or(0) as f64 / 1000.0
    );
    // The scale-ups and their reasons, to judge a run on a loaded machine by.
    let parsed: Value = serde_json::from_str(&decisions).unwrap();
    for d in parsed["decisions"].as_array().unwrap() {
        if d["direction"] == "up" {
            eprintln!(
                "  {:.1}s {} -> {}: {}",
                d["inputs"]["now_secs"].as_f64().unwrap_or(0.0),
                d["inputs"]["current_desired"],
                d["desired"],
                d["detail"].as_str().unwrap_or("")
            );
        }
    }
    let second_ready = second_ready.unwrap_or_else(|| panic!("never 2 ready: {decisions}"));
    // The step is answered within the step's first seconds. How fast (the 2 s target) is a
    // benchmark figure (`bench/step.sh`), not a timed test: on a loaded 2-core machine the
    // saturation signal can miss and the panic window answers instead, a few seconds later.
    assert!(
        second_ready <= Duration::from_secs(15),
        "second instance after {second_ready:?}: {decisions}"
    );
    assert!(peak <= 3, "peak {peak}: {decisions}");
    assert!(
        !late.is_empty() && late.iter().all(|d| (2..=3).contains(d)),
        "settled {late:?}: {decisions}"
    );
    assert_eq!(report["errors"]["total"], 0, "{report}");
}

/// A killed instance is replaced while idempotent GETs see no failure.
#[test]
fn killed_instance_is_replaced_without_failed_gets() {
    let dir = tempdir();
    let (listen, admin) = (free_port(), free_port());
    let cfg = fleet_config(
        listen,
        admin,
        "[services.demo.fleet]\ncommand = \"shoal demo-service\"\nmin = 2\nmax = 2\n",
    );
    let (_shoal, _) = run_shoal(dir.path(), &cfg, listen);
    wait_until(20, "two instances", || ready(&api(admin)) == 2);
    let url = format!("http://127.0.0.1:{listen}/work?cpu_ms=1&sleep_ms=2");
    let loader = std::thread::spawn(move || load(&url, 100, 6));
    std::thread::sleep(Duration::from_millis(1500));
    let v = api(admin);
    let victim = v["processes"][0].clone();
    let pid = victim["pid"].as_u64().unwrap();
    assert!(Command::new("kill")
        .args(["-9", &pid.to_string()])
        .status()
        .unwrap()
        .success());
    let report = loader.join().unwrap();
    assert_eq!(report["errors"]["total"], 0, "{report}");
    wait_until(20, "replacement", || {
        let v = api(admin);
        ready(&v) == 2
            && !v["processes"]
                .as_array()
                .unwrap()
                .iter()
                .any(|p| p["id"] == victim["id"])
    });
    let (_, m) = get(admin, "/metrics");
    assert!(
        m.contains("shoal_fleet_failures_total{service=\"demo\",kind=\"crash\"} 1"),
        "{m}"
    );
}

/// New instances get no request before their first passing health check.
#[test]
fn no_request_before_first_passing_health_check() {
    let dir = tempdir();
    let (listen, admin) = (free_port(), free_port());
    let cfg = fleet_config(
        listen,
        admin,
        "[services.demo.fleet]\ncommand = \"shoal demo-service\"\nmin = 1\nmax = 3\nenv = { DEMO_READY_DELAY_MS = \"1500\" }\n",
    );
    let (_shoal, _) = run_shoal(dir.path(), &cfg, listen);
    wait_until(20, "first instance", || ready(&api(admin)) == 1);
    let url = format!("http://127.0.0.1:{listen}/work?cpu_ms=0&sleep_ms=1");
    let loader = std::thread::spawn(move || load(&url, 100, 5));
    // Scale out by hand while traffic flows: the new ones must wait out their slow start.
    let admin_addr = SocketAddr::from(([127, 0, 0, 1], admin));
    std::thread::sleep(Duration::from_millis(500));
    let v = api(admin);
    assert_eq!(v["desired"], 1);
    let (s, body) = http(
        admin_addr,
        "POST",
        "/api/services/demo/scale",
        &[("Authorization", "Bearer test-token")],
        "{\"desired\": 3}",
    );
    assert_eq!(s, 200, "{body}");
    wait_until(20, "three instances", || ready(&api(admin)) == 3);
    let report = loader.join().unwrap();
    assert_eq!(report["errors"]["total"], 0, "{report}");
    let mut served = 0;
    for p in api(admin)["processes"].as_array().unwrap() {
        let (_, stats) = get(p["port"].as_u64().unwrap() as u16, "/stats");
        let stats: Value = serde_json::from_str(&stats).unwrap();
        assert_eq!(
            stats["before_ready"], 0,
            "{} got requests before it was healthy: {stats}",
            p["id"]
        );
        served += stats["requests"].as_u64().unwrap();
    }
    assert!(served >= 450, "{served}");
}

/// A command that keeps crashing backs off visibly instead of spinning.
#[test]
fn crashing_command_backs_off() {
    let dir = tempdir();
    let (listen, admin) = (free_port(), free_port());
    let cfg = fleet_config(
        listen,
        admin,
        "[services.demo.fleet]\ncommand = [\"sh\", \"-c\", \"exit 3\"]\nmin = 1\nmax = 1\n",
    );
    let (_shoal, _) = run_shoal(dir.path(), &cfg, listen);
    std::thread::sleep(Duration::from_secs(5));
    let v = api(admin);
    assert!(
        matches!(v["fleet"]["state"].as_str(), Some("backoff" | "recovering")),
        "{v}"
    );
    assert!(
        v["fleet"]["last_error"]
            .as_str()
            .unwrap()
            .contains("exited during startup"),
        "{v}"
    );
    // 1 s, 2 s, 4 s backoff: at most 4 starts in 5 s, not hundreds.
    let (_, m) = get(admin, "/metrics");
    let starts: u64 = m
        .lines()
        .find_map(|l| l.strip_prefix("shoal_fleet_starts_total{service=\"demo\"} "))
        .unwrap()
        .parse()
        .unwrap();
    assert!((2..=4).contains(&starts), "starts = {starts}");
    assert_eq!(get(listen, "/").0, 503, "no instance: 503, not a hang");
}

#[test]
fn bad_fleet_configs_are_refused_with_their_line() {
    let dir = tempdir();
    let path = dir.path().join("bad.toml");
    for (extra, field) in [
        ("[services.demo.fleet]\ncommand = \"shoal demo-service\"\nmin = 4\nmax = 2\n", "services.demo.fleet.min"),
        ("[services.demo.fleet]\ncommand = \"/nonexistent/server\"\n", "services.demo.fleet.command"),
        ("[services.demo.fleet]\ncommand = \"shoal demo-service\"\n[services.demo.autoscale]\ntargets = [{ metric = \"mood\", target = 1 }]\n", "services.demo.autoscale.targets"),
    ] {
        std::fs::write(&path, fleet_config(8080, 9900, extra)).unwrap();
        let out = Command::new(SHOAL).args(["check", "--config"]).arg(&path).output().unwrap();
        assert_eq!(out.status.code(), Some(1));
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(&format!("{}:", path.display())) && err.contains(field), "{err}");
    }
}

/// A reload applies new fleet bounds: the desired count is clamped into them at once.
#[test]
fn reload_applies_fleet_bounds() {
    let dir = tempdir();
    let (listen, admin) = (free_port(), free_port());
    let cfg = fleet_config(
        listen,
        admin,
        "[services.demo.fleet]\ncommand = \"shoal demo-service\"\nmin = 1\nmax = 3\n",
    );
    let (_shoal, path) = run_shoal(dir.path(), &cfg, listen);
    let admin_addr = SocketAddr::from(([127, 0, 0, 1], admin));
    let auth = [("Authorization", "Bearer test-token")];
    let (s, body) = http(
        admin_addr,
        "POST",
        "/api/services/demo/scale",
        &auth,
        "{\"desired\": 3}",
    );
    assert_eq!(s, 200, "{body}");
    wait_until(20, "three instances", || ready(&api(admin)) == 3);
    std::fs::write(&path, cfg.replace("max = 3", "max = 2")).unwrap();
    let (s, body) = http(admin_addr, "POST", "/api/reload", &auth, "");
    assert_eq!(s, 200, "{body}");
    wait_until(20, "scale-in to the new max", || {
        let v = api(admin);
        v["desired"] == 2 && v["max"] == 2 && v["instances"].as_array().unwrap().len() == 2
    });
    // An invalid fleet table is refused like any other config error.
    std::fs::write(&path, cfg.replace("max = 3", "max = 0")).unwrap();
    let (s, body) = http(admin_addr, "POST", "/api/reload", &auth, "");
    assert_eq!(s, 422, "{body}");
    assert!(body.contains("services.demo.fleet.min"), "{body}");
}
