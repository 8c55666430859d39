//! The `shoal` binary end to end: check, run, reload, shutdown, metrics, admin auth.

mod common;

use std::net::SocketAddr;
use std::process::Command;
use std::time::Duration;

use common::*;

fn config(listen: u16, admin: u16, backends: &[u16]) -> String {
    let list: Vec<String> = backends
        .iter()
        .map(|p| format!("\"127.0.0.1:{p}\""))
        .collect();
    format!(
        "[admin]\nlisten = \"127.0.0.1:{admin}\"\n\n[services.web]\nlisten = \"127.0.0.1:{listen}\"\nbalance = \"round-robin\"\nbackends = [{}]\n[services.web.timeouts]\ndrain = \"5s\"\n",
        list.join(", ")
    )
}

/// `shoal check --config PATH`.
fn check(path: &std::path::Path) -> std::process::Output {
    Command::new(SHOAL)
        .args(["check", "--config"])
        .arg(path)
        .output()
        .unwrap()
}

#[test]
fn check_names_file_line_and_field() {
    let dir = tempdir();
    let path = dir.path().join("bad.toml");
    std::fs::write(
        &path,
        "[services.web]\nlisten = \"127.0.0.1:8080\"\nbalance = \"fastest\"\n",
    )
    .unwrap();
    let out = check(&path);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains(&format!("{}:3: services.web.balance:", path.display())),
        "{err}"
    );
    assert!(err.contains("round-robin"), "lists valid names: {err}");

    std::fs::write(&path, config(8080, 9900, &[9001])).unwrap();
    let out = check(&path);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn example_configs_are_valid() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../examples");
    let mut n = 0;
    for e in std::fs::read_dir(&root).unwrap() {
        let p = e.unwrap().path();
        if p.extension().is_some_and(|x| x == "toml") {
            let out = check(&p);
            assert!(
                out.status.success(),
                "{}: {}",
                p.display(),
                String::from_utf8_lossy(&out.stderr)
            );
            n += 1;
        }
    }
    assert!(n >= 1);
}

#[test]
fn reload_under_load_fails_nothing() {
    let dir = tempdir();
    let (_a, pa) = demo(dir.path(), "a");
    let (_b, pb) = demo(dir.path(), "b");
    let (_c, pc) = demo(dir.path(), "c");
    let (listen, admin) = (free_port(), free_port());
    let (shoal, path) = run_shoal(dir.path(), &config(listen, admin, &[pa, pb]), listen);
    let url = format!("http://127.0.0.1:{listen}/work?cpu_ms=0&sleep_ms=5");
    let loader = std::thread::spawn(move || load(&url, 200, 5));
    std::thread::sleep(Duration::from_millis(1000));
    // Swap b for c via SIGHUP, then an invalid file (refused), then back via the admin API.
    std::fs::write(&path, config(listen, admin, &[pa, pc])).unwrap();
    shoal.signal("HUP");
    std::thread::sleep(Duration::from_millis(1000));
    std::fs::write(&path, "this is not toml").unwrap();
    shoal.signal("HUP");
    std::thread::sleep(Duration::from_millis(500));
    std::fs::write(&path, config(listen, admin, &[pb, pc])).unwrap();
    let admin_addr = SocketAddr::from(([127, 0, 0, 1], admin));
    let (s, body) = http(
        admin_addr,
        "POST",
        "/api/reload",
        &[("Authorization", "Bearer test-token")],
        "",
    );
    assert_eq!(s, 200, "{body}");
    let report = loader.join().unwrap();
    assert_eq!(report["errors"]["total"], 0, "{report}");
    assert!(report["ok"].as_u64().unwrap() >= 900, "{report}");
    let (_, m) = get(admin, "/metrics");
    assert!(m.contains("shoal_config_reloads_total 2"), "{m}");
    assert!(m.contains("shoal_config_reload_failures_total 1"), "{m}");
    let (_, api) = get(admin, "/api/services/web");
    assert!(
        api.contains(&format!("127.0.0.1:{pc}")) && !api.contains(&format!("\"127.0.0.1:{pa}\"")),
        "{api}"
    );
}

#[test]
fn sigterm_drains_in_flight_requests_and_exits_zero() {
    let dir = tempdir();
    let (_a, pa) = demo(dir.path(), "a");
    let (listen, admin) = (free_port(), free_port());
    let (mut shoal, _) = run_shoal(dir.path(), &config(listen, admin, &[pa]), listen);
    let slow = std::thread::spawn(move || get(listen, "/work?cpu_ms=0&sleep_ms=1500"));
    std::thread::sleep(Duration::from_millis(300));
    shoal.signal("TERM");
    // New connections are refused soon after the signal...
    let refused = (0..50).any(|_| {
        std::thread::sleep(Duration::from_millis(20));
        std::net::TcpStream::connect(("127.0.0.1", listen)).is_err()
    });
    assert!(refused, "still accepting after SIGTERM");
    // ...while the request in flight completes.
    let (s, body) = slow.join().unwrap();
    assert_eq!(s, 200, "{body}");
    assert_eq!(shoal.wait_exit(10), Some(0));
}

#[test]
fn metrics_pass_promtool_and_mutations_need_the_token() {
    let dir = tempdir();
    let (_a, pa) = demo(dir.path(), "a");
    let (listen, admin) = (free_port(), free_port());
    let (_shoal, _) = run_shoal(dir.path(), &config(listen, admin, &[pa]), listen);
    for _ in 0..5 {
        assert_eq!(get(listen, "/work?cpu_ms=1").0, 200);
    }
    let (s, metrics) = get(admin, "/metrics");
    assert_eq!(s, 200);
    for name in [
        "shoal_requests_total{service=\"web\",instance=",
        "shoal_request_duration_seconds_bucket{service=\"web\",le=",
        "shoal_in_flight_requests{service=\"web\"",
        "shoal_instances{service=\"web\",state=\"ready\"} 1",
        "shoal_upstream_errors_total",
        "shoal_retries_total",
        "shoal_ejections_total",
    ] {
        assert!(metrics.contains(name), "missing {name} in\n{metrics}");
    }
    let mut child = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("promtool (Debian package prometheus) is required");
    use std::io::Write;
    child
        .stdin
        .take()
        .unwrap()
        .write_all(metrics.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "promtool: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );

    let admin_addr = SocketAddr::from(([127, 0, 0, 1], admin));
    // Prometheus asks for OpenMetrics first and gets it: counters typed by family name, the
    // samples keep their `_total` names.
    let accept = "application/openmetrics-text;version=1.0.0,text/plain;version=0.0.4;q=0.5";
    let (s, om) = http(admin_addr, "GET", "/metrics", &[("Accept", accept)], "");
    assert_eq!(s, 200);
    assert!(om.ends_with("# EOF\n"), "{om}");
    assert!(om.contains("# TYPE shoal_requests counter\n"), "{om}");
    assert!(
        om.contains("shoal_requests_total{service=\"web\",instance="),
        "{om}"
    );
    assert!(!metrics.contains("# EOF"), "{metrics}");

    let (s, _) = http(
        admin_addr,
        "POST",
        "/api/services/web/instances/x/drain",
        &[],
        "",
    );
    assert_eq!(s, 401);
    let (s, _) = http(
        admin_addr,
        "POST",
        "/api/services/web/instances/x/drain",
        &[("Authorization", "Bearer wrong")],
        "",
    );
    assert_eq!(s, 401);
    let id = format!("127.0.0.1:{pa}");
    let (s, body) = http(
        admin_addr,
        "POST",
        &format!("/api/services/web/instances/{id}/drain"),
        &[("Authorization", "Bearer test-token")],
        "",
    );
    assert_eq!(s, 200, "{body}");
    assert_eq!(get(listen, "/").0, 503, "the only instance is draining");
    let (s, _) = get(admin, "/");
    assert_eq!(s, 200, "dashboard");
}

/// Every stderr line parsed as one JSON object.
fn json_lines(text: &str) -> Vec<serde_json::Value> {
    text.lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
        .collect()
}

#[test]
fn text_logs_to_a_file_carry_no_ansi_escapes() {
    let dir = tempdir();
    let (_a, pa) = demo(dir.path(), "a");
    let (listen, admin) = (free_port(), free_port());
    let cfg = config(listen, admin, &[pa]).replace("balance =", "access_log = true\nbalance =");
    let (mut shoal, _) = run_shoal(dir.path(), &cfg, listen);
    assert_eq!(get(listen, "/work?cpu_ms=1").0, 200);
    shoal.signal("TERM");
    assert_eq!(shoal.wait_exit(10), Some(0));
    let log = std::fs::read_to_string(dir.path().join("shoal.log")).unwrap();
    assert!(log.contains("service listening"), "{log}");
    assert!(
        !log.contains('\u{1b}'),
        "escape codes in a log file:\n{log}"
    );
}

#[test]
fn log_format_json_writes_every_line_as_json_with_the_access_log() {
    let dir = tempdir();
    let (_a, pa) = demo(dir.path(), "a");
    let (listen, admin) = (free_port(), free_port());
    let cfg = format!(
        "log_format = \"json\"\n{}",
        config(listen, admin, &[pa]).replace("balance =", "access_log = true\nbalance =")
    );
    let (mut shoal, _) = run_shoal(dir.path(), &cfg, listen);
    assert_eq!(get(listen, "/work?cpu_ms=1").0, 200);
    let trace = "4bf92f3577b34da6a3ce929d0e0e4736";
    let parent = format!("00-{trace}-00f067aa0ba902b7-01");
    let addr = SocketAddr::from(([127, 0, 0, 1], listen));
    let (s, _) = http(addr, "GET", "/missing", &[("traceparent", &parent)], "");
    assert_eq!(s, 404);
    shoal.signal("TERM");
    assert_eq!(shoal.wait_exit(10), Some(0));
    let log = std::fs::read_to_string(dir.path().join("shoal.log")).unwrap();
    let lines = json_lines(&log);
    assert!(
        lines
            .iter()
            .any(|l| l["message"] == "service listening" && l["service"] == "web"),
        "{log}"
    );
    let access: Vec<_> = lines
        .iter()
        .filter(|l| l["target"] == "shoal::access")
        .collect();
    assert_eq!(access.len(), 2, "{log}");
    let ok = access[0];
    assert_eq!(ok["status"], 200, "{log}");
    assert_eq!(ok["service"], "web");
    assert_eq!(ok["instance"], format!("127.0.0.1:{pa}"));
    assert_eq!(ok["path"], "/work?cpu_ms=1");
    assert_eq!(ok["tries"], 1);
    assert!(ok["total_ms"].as_f64().unwrap() >= ok["headers_ms"].as_f64().unwrap());
    // The client's trace continues with shoal's own span id.
    let traced = access[1];
    assert_eq!(traced["status"], 404);
    let tp = traced["traceparent"].as_str().unwrap();
    assert!(
        tp.starts_with(&format!("00-{trace}-")) && tp != parent,
        "{tp}"
    );

    // A failure to start is a JSON line too; an unknown format is refused.
    let out = Command::new(SHOAL)
        .args(["--log-format", "json", "run", "--config"])
        .arg(dir.path().join("missing.toml"))
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = json_lines(&String::from_utf8_lossy(&out.stderr));
    assert_eq!(err.len(), 1);
    assert_eq!(err[0]["level"], "ERROR");
    assert!(
        err[0]["error"].as_str().unwrap().contains("missing.toml"),
        "{err:?}"
    );
    let out = Command::new(SHOAL)
        .args(["--log-format", "xml", "status"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("json"));
}

#[test]
fn check_validates_async_routes() {
    let dir = tempdir();
    let path = dir.path().join("async.toml");
    std::fs::write(
        &path,
        "[brokers.main]\nrabbitmq = \"amqp://guest:guest@127.0.0.1:5672/%2f\"\n[services.web]\nlisten = \"127.0.0.1:8080\"\n[[services.web.routes]]\nservice = \"workers\"\nasync = { broker = \"other\" }\n[services.workers]\nbackends = [\"127.0.0.1:9001\"]\n",
    )
    .unwrap();
    let out = check(&path);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains(&format!(
            "{}:7: services.web.routes[0].async.broker:",
            path.display()
        )),
        "{err}"
    );
}

#[test]
fn check_validates_jobs_path_and_identity_header() {
    let dir = tempdir();
    let path = dir.path().join("jobs.toml");
    let base = "[brokers.main]\nrabbitmq = \"amqp://guest:guest@127.0.0.1:5672/%2f\"\n[services.web]\nlisten = \"127.0.0.1:8080\"\n";
    let route = "[[services.web.routes]]\nservice = \"workers\"\n[services.web.routes.async]\nqueue = \"w\"\n";
    let workers = "[services.workers]\nbackends = [\"127.0.0.1:9001\"]\n";
    for (text, want) in [
        (
            format!("{base}jobs_path = \"/jobs/\"\n{route}{workers}"),
            "5: services.web.jobs_path:",
        ),
        (
            format!("{base}{route}identity_header = \"bad header\"\n{workers}"),
            "9: services.web.routes[0].async.identity_header:",
        ),
        (
            format!("{base}{route}identity_header = \"Proxy-Authorization\"\n{workers}"),
            "9: services.web.routes[0].async.identity_header:",
        ),
    ] {
        std::fs::write(&path, &text).unwrap();
        let out = check(&path);
        assert_eq!(out.status.code(), Some(1), "{text}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(&format!("{}:{want}", path.display())), "{err}");
    }
    std::fs::write(
        &path,
        format!(
            "{base}jobs_path = \"/api/tasks\"\n{route}identity_header = \"x-api-key\"\n{workers}"
        ),
    )
    .unwrap();
    let out = check(&path);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}
