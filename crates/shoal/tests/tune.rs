//! `shoal tune` and `shoal history export` end to end: the JSON contract on a trace, and a
//! recommendation from a demo run's own recorded history.

mod common;

use std::process::Command;
use std::time::Duration;

use common::*;
use serde_json::Value;

fn shoal(args: &[&str]) -> (Option<i32>, String, String) {
    let out = Command::new(SHOAL).args(args).output().unwrap();
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// The figures of a `result` object, checked for shape.
fn figures(v: &Value) -> (f64, f64, f64) {
    let f = |k: &str| {
        v[k].as_f64()
            .unwrap_or_else(|| panic!("{k} is not a number: {v}"))
    };
    (
        f("violation_seconds"),
        f("instance_hours"),
        f("unserved_fraction"),
    )
}

/// Two days of demand swinging between 3 and 12 requests/s every 90 minutes, with noise.
fn swings_csv() -> String {
    let mut text = String::from("t,rps\n");
    let mut x: u64 = 7;
    for m in 0..(2 * 24 * 60) {
        x = x
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        let noise = (x >> 33) as f64 / (1u64 << 31) as f64; // 0..1
        let base = if (m / 90) % 2 == 0 { 3.0 } else { 12.0 };
        text.push_str(&format!("{},{:.3}\n", m * 60, base + noise));
    }
    text
}

#[test]
fn tune_json_has_settings_result_and_baseline_and_meets_the_objective() {
    let dir = tempdir();
    let path = dir.path().join("swings.csv");
    std::fs::write(&path, swings_csv()).unwrap();
    let (code, out, err) = shoal(&[
        "tune",
        "--trace",
        path.to_str().unwrap(),
        "--capacity",
        "1",
        "--startup",
        "120",
        "--max-violation",
        "0.5%",
        "--policy",
        "reactive",
        "--json",
    ]);
    assert_eq!(code, Some(0), "{err}");
    let v: Value = serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out}"));
    let s = &v["settings"];
    assert_eq!(s["policy"], "reactive", "{v}");
    assert_eq!(s["targets"][0]["metric"], "rps", "{v}");
    let target = s["targets"][0]["target"].as_f64().unwrap();
    assert!(target > 0.0 && target <= 1.0, "{v}");
    assert!(s["scale_down_stabilization"]
        .as_str()
        .unwrap()
        .ends_with('s'));
    let (violation, hours, unserved) = figures(&v["result"]);
    let duration = 2.0 * 86_400.0;
    assert!(violation <= 0.005 * duration, "{v}");
    assert!((0.0..=1.0).contains(&unserved), "{v}");
    assert_eq!(v["baseline"]["settings"]["targets"][0]["target"], 0.7);
    let (b_violation, b_hours, b_unserved) = figures(&v["baseline"]["result"]);
    // The baseline's figures are also at its top level.
    assert_eq!(
        figures(&v["baseline"]),
        (b_violation, b_hours, b_unserved),
        "{v}"
    );
    // The recommendation is the cheapest meeting the objective: if the baseline meets it
    // too, the recommendation costs no more.
    if b_violation <= 0.005 * duration {
        assert!(hours <= b_hours, "{v}");
    }
    // Every frontier point is sorted by cost and gets less violation as it costs more.
    let frontier = v["frontier"].as_array().unwrap();
    assert!(!frontier.is_empty());
    for w in frontier.windows(2) {
        let (v0, h0, _) = figures(&w[0]);
        let (v1, h1, _) = figures(&w[1]);
        assert!(h0 <= h1 && v0 > v1, "{w:?}");
    }

    // Text mode prints the table and a config snippet that `shoal check` accepts.
    let (code, out, err) = shoal(&[
        "tune",
        "--trace",
        path.to_str().unwrap(),
        "--capacity",
        "1",
        "--startup",
        "120",
        "--max-violation",
        "0.5",
        "--policy",
        "reactive",
        "--name",
        "demo",
    ]);
    assert_eq!(code, Some(0), "{err}");
    assert!(
        out.contains("trade-off") && out.contains("baseline"),
        "{out}"
    );
    let snippet = &out[out.find("[services.demo.autoscale]").expect("snippet")..];
    let (listen, admin) = (free_port(), free_port());
    let cfg = fleet_config(
        listen,
        admin,
        &format!("[services.demo.fleet]\ncommand = \"shoal demo-service\"\n{snippet}"),
    );
    let file = dir.path().join("tuned.toml");
    std::fs::write(&file, cfg).unwrap();
    let (code, _, err) = shoal(&["check", "--config", file.to_str().unwrap()]);
    assert_eq!(code, Some(0), "{err}\n{snippet}");
}

#[test]
fn tune_without_a_source_or_objective_is_refused() {
    let (code, _, err) = shoal(&[
        "tune",
        "--capacity",
        "1",
        "--startup",
        "1",
        "--max-violation",
        "1",
    ]);
    assert_ne!(code, Some(0));
    assert!(err.contains("--trace"), "{err}");
    let (code, _, err) = shoal(&[
        "tune",
        "--trace",
        "x.csv",
        "--capacity",
        "1",
        "--startup",
        "1",
    ]);
    assert_ne!(code, Some(0));
    assert!(err.contains("max-violation"), "{err}");
}

/// A demo run records its demand (1 s buckets here) in its data dir; `shoal history export`
/// writes it as a trace and `shoal tune --history` recommends settings from it, with the
/// capacity estimated from the recorded CPU.
#[test]
fn history_of_a_demo_run_exports_and_tunes() {
    let dir = tempdir();
    let data = dir.path().join("data");
    let (listen, admin) = (free_port(), free_port());
    let cfg = format!(
        "data_dir = {:?}\n{}",
        data,
        fleet_config(
            listen,
            admin,
            r#"[services.demo.fleet]
command = "shoal demo-service"
min = 1
max = 3
[services.demo.autoscale]
targets = [{ metric = "cpu", target = 0.6 }]
history_bucket = "1s""#,
        )
    );
    let (mut run, _) = run_shoal(dir.path(), &cfg, listen);
    wait_until(20, "an instance", || {
        ready(&api_json(admin, "/api/services/demo")) == 1
    });
    let url = format!("http://127.0.0.1:{listen}/work?cpu_ms=5");
    let report = load(&url, 40, 12);
    assert_eq!(report["errors"]["total"], 0, "{report}");
    std::thread::sleep(Duration::from_secs(2));
    run.signal("TERM");
    assert!(run.wait_exit(30).is_some(), "shoal did not stop");

    let csv = dir.path().join("demo.csv");
    let (code, _, err) = shoal(&[
        "history",
        "export",
        "--data-dir",
        data.to_str().unwrap(),
        "--service",
        "demo",
        "--output",
        csv.to_str().unwrap(),
    ]);
    assert_eq!(code, Some(0), "{err}");
    let text = std::fs::read_to_string(&csv).unwrap();
    let rows: Vec<(f64, f64)> = text
        .lines()
        .skip(1)
        .map(|l| {
            let (t, r) = l.split_once(',').unwrap();
            (t.parse().unwrap(), r.parse().unwrap())
        })
        .collect();
    assert_eq!(text.lines().next(), Some("t,rps"));
    // The 12 s of load at 40 requests/s show as buckets near 40.
    let busy = rows
        .iter()
        .filter(|(_, r)| (30.0..=50.0).contains(r))
        .count();
    assert!(busy >= 8, "{text}");

    let (code, out, err) = shoal(&[
        "tune",
        "--history",
        data.to_str().unwrap(),
        "--service",
        "demo",
        "--startup",
        "1",
        "--max-violation",
        "5",
        "--policy",
        "reactive",
        "--json",
    ]);
    assert_eq!(code, Some(0), "{err}");
    let v: Value = serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out}"));
    assert_eq!(v["settings"]["policy"], "reactive", "{v}");
    // 5 ms of CPU a request: an instance serves on the order of 200 requests/s.
    let capacity = v["settings"]["capacity_rps"].as_f64().unwrap();
    assert!((50.0..=400.0).contains(&capacity), "{v}");
    figures(&v["result"]);
}
