//! The live dashboard against a running shoal under load: the event stream in Rust, and the
//! page in a real headless Chromium (Debian `chromium`) whose DOM must show filled charts.

mod common;

use std::io::{BufRead, BufReader, Write};
use std::net::TcpStream;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::*;

fn start(dir: &Path) -> (Proc, u16, u16) {
    let (listen, admin) = (free_port(), free_port());
    let cfg = fleet_config(
        listen,
        admin,
        "[services.demo.fleet]\ncommand = \"shoal demo-service\"\nmin = 2\nmax = 3\n\
         [services.demo.resources]\ncpu = 1.0\nmemory = \"256MiB\"\n\
         [services.demo.autoscale]\ntargets = [{ metric = \"rps\", target = 1000 }]\n",
    );
    let (shoal, _) = run_shoal(dir, &cfg, listen);
    wait_until(20, "two instances", || {
        ready(&api_json(admin, "/api/services/demo")) == 2
    });
    (shoal, listen, admin)
}

/// Reads events from `GET /api/dashboard/stream` until `n` `point` events came.
fn read_events(admin: u16, n: usize) -> (serde_json::Value, Vec<serde_json::Value>) {
    let mut s = TcpStream::connect(("127.0.0.1", admin)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    write!(
        s,
        "GET /api/dashboard/stream HTTP/1.1\r\nHost: x\r\nAccept: text/event-stream\r\n\r\n"
    )
    .unwrap();
    let mut r = BufReader::new(s);
    let (mut init, mut points, mut event) = (None, Vec::new(), String::new());
    let mut line = String::new();
    let mut head = String::new();
    while points.len() < n {
        line.clear();
        assert!(r.read_line(&mut line).unwrap() > 0, "stream ended");
        let l = line.trim_end();
        if head.is_empty() || !head.ends_with("\n\n") && init.is_none() && event.is_empty() {
            head.push_str(&line.replace('\r', ""));
        }
        if let Some(e) = l.strip_prefix("event: ") {
            event = e.to_string();
        } else if let Some(d) = l.strip_prefix("data: ") {
            let v: serde_json::Value = serde_json::from_str(d).unwrap();
            match event.as_str() {
                "init" => init = Some(v),
                "point" => points.push(v),
                other => panic!("unknown event {other}"),
            }
        }
    }
    assert!(head.contains("text/event-stream"), "{head}");
    (init.expect("no init event"), points)
}

#[test]
fn the_event_stream_sends_history_then_a_point_a_second() {
    let dir = tempdir();
    let (_shoal, listen, admin) = start(dir.path());
    let url = format!("http://127.0.0.1:{listen}/work?cpu_ms=1&sleep_ms=2");
    let loader = std::thread::spawn(move || load(&url, 80, 6));
    std::thread::sleep(Duration::from_secs(3));
    let t0 = Instant::now();
    let (init, points) = read_events(admin, 3);
    // Three one-second points after the init: about two seconds (not a burst, not a stall).
    let took = t0.elapsed();
    assert!(
        took > Duration::from_millis(1500) && took < Duration::from_secs(6),
        "{took:?}"
    );
    let history = init["points"].as_array().unwrap();
    assert!(history.len() >= 3, "{init}");
    let busy = points
        .iter()
        .filter(|p| {
            p["point"]["services"]["demo"]["rps"]
                .as_f64()
                .unwrap_or(0.0)
                > 10.0
        })
        .count();
    assert!(busy >= 2, "{points:?}");
    let last = &points[2];
    assert_eq!(last["point"]["services"]["demo"]["ready"], 2.0, "{last}");
    assert_eq!(last["point"]["services"]["demo"]["max"], 3.0, "{last}");
    assert_eq!(
        last["point"]["services"]["demo"]["mem_limit"],
        (256u64 << 20) as f64,
        "{last}"
    );
    assert!(
        last["point"]["services"]["demo"]["p99"].as_f64().unwrap() > 0.0,
        "{last}"
    );
    assert_eq!(
        last["instances"]["demo"].as_array().unwrap().len(),
        2,
        "{last}"
    );
    loader.join().unwrap();
    // The page and its script are served, without a token.
    let (s, page) = get(admin, "/");
    assert_eq!(s, 200);
    assert!(page.contains("/dashboard.js"), "{page}");
    let (s, js) = get(admin, "/dashboard.js");
    assert_eq!(s, 200);
    assert!(js.contains("EventSource"), "{js}");
}

/// Runs headless Chromium in its own process group (it starts helpers) and kills the group
/// afterwards, so nothing it started outlives the test.
fn chromium(dir: &Path, args: &[String]) -> String {
    let profile = dir.join(format!("chromium-{}", free_port()));
    let out = dir.join(format!("dom-{}.html", free_port()));
    let mut child = Command::new("chromium")
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--disable-dev-shm-usage",
        ])
        .arg(format!("--user-data-dir={}", profile.display()))
        .args(args)
        .stdout(std::fs::File::create(&out).unwrap())
        .stderr(Stdio::null())
        .process_group(0)
        .spawn()
        .expect("chromium (Debian package chromium) is required");
    let pgid = child.id();
    let deadline = Instant::now() + Duration::from_secs(90);
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break Some(s);
        }
        if Instant::now() > deadline {
            break None;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    let _ = Command::new("kill")
        .args(["-KILL", "--", &format!("-{pgid}")])
        .stderr(Stdio::null())
        .status();
    let _ = child.wait();
    assert!(status.is_some(), "chromium did not finish in 90 s");
    std::fs::read_to_string(out).unwrap()
}

/// The points drawn by the canvas of panel `id` (its `data-points`), from a DOM dump.
fn drawn(dom: &str, id: &str) -> usize {
    let Some(at) = dom.find(&format!("data-panel=\"{id}\"")) else {
        return 0;
    };
    let rest = &dom[at..];
    let end = rest[1..].find("data-panel=").map_or(rest.len(), |e| e + 1);
    rest[..end]
        .split("data-points=\"")
        .nth(1)
        .and_then(|s| s.split('"').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or(0)
}

#[test]
fn chromium_shows_the_dashboard_with_filled_charts() {
    let dir = tempdir();
    let (_shoal, listen, admin) = start(dir.path());
    let url = format!("http://127.0.0.1:{listen}/work?cpu_ms=2&sleep_ms=3");
    let loader = std::thread::spawn(move || load(&url, 100, 8));
    std::thread::sleep(Duration::from_secs(6));
    let page = format!("http://127.0.0.1:{admin}/");
    let dom = chromium(
        dir.path(),
        &[
            "--window-size=1400,1500".into(),
            "--timeout=4000".into(),
            "--dump-dom".into(),
            page.clone(),
        ],
    );
    for panel in ["req", "lat", "inst", "cpu", "mem"] {
        assert!(drawn(&dom, panel) >= 3, "panel {panel} empty:\n{dom}");
    }
    // No cache or queue metrics on this shoal: those panels say so instead of drawing.
    assert_eq!(drawn(&dom, "cache"), 0);
    assert!(dom.contains("no cache on this service"), "{dom}");
    assert!(dom.contains("demo-1") && dom.contains("demo-2"), "{dom}");
    assert!(dom.contains("Scaling decisions"), "{dom}");
    // A screenshot for people (set SHOAL_DASHBOARD_SCREENSHOT to keep it, e.g. for the docs).
    let shot = std::env::var("SHOAL_DASHBOARD_SCREENSHOT")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|_| dir.path().join("dashboard.png"));
    chromium(
        dir.path(),
        &[
            "--window-size=1400,1500".into(),
            "--timeout=4000".into(),
            "--hide-scrollbars".into(),
            format!("--screenshot={}", shot.display()),
            page,
        ],
    );
    let png = std::fs::read(&shot).unwrap();
    assert!(
        png.starts_with(b"\x89PNG") && png.len() > 20_000,
        "{}",
        png.len()
    );
    loader.join().unwrap();
}
