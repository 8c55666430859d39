//! The predictive policy on a live demo fleet: a recurring load pattern in a compressed
//! season is learned, the fleet is scaled out before the busy phase arrives, and the demand
//! history survives a restart.

mod common;

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use common::*;

/// The compressed "day": a quiet half, then a busy half.
const SEASON: f64 = 40.0;
const BUCKET: f64 = 2.0;
/// Seasons of load; the forecast must pre-scale from season `FIRST_CHECKED` on.
const SEASONS: usize = 4;
const FIRST_CHECKED: usize = 2;
const QUIET_RPS: u32 = 2;
/// 24 rps of 10 rps per instance: 3 at full utilization, 4 at the target of 0.7.
const BUSY_RPS: u32 = 24;

fn config(listen: u16, admin: u16) -> String {
    let extra = format!(
        r#"[services.demo.fleet]
command = "shoal demo-service"
min = 1
max = 4

[services.demo.autoscale]
policy = "predictive"
interval = "1s"
targets = [{{ metric = "rps", target = 7 }}]
capacity_rps = 10
startup = "4s"
season = "{SEASON}s"
history_bucket = "{BUCKET}s"
min_history = "{SEASON}s"
stable_window = "6s"
panic_window = "3s"
burst_hold = "3s"
scale_down_stabilization = "3s"
"#
    );
    fleet_config(listen, admin, &extra)
}

fn epoch() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs_f64()
}

fn sleep_until_epoch(t: f64) {
    let left = t - epoch();
    if left > 0.0 {
        std::thread::sleep(Duration::from_secs_f64(left));
    }
}

/// Each season: `QUIET_RPS` for half of it, then `BUSY_RPS`. Once the policy has seen a
/// season or two, the desired count rises (on the forecast) before each busy phase, having
/// come down in the quiet one; no request fails. After SIGTERM and a start on the same data
/// directory, the history is back at once.
#[test]
fn forecast_prescales_before_a_recurring_busy_phase_and_history_survives_restart() {
    let dir = tempdir();
    let (listen, admin) = (free_port(), free_port());
    let cfg = config(listen, admin);
    let (mut shoal, _) = run_shoal(dir.path(), &cfg, listen);
    wait_until(20, "first instance", || {
        ready(&api_json(admin, "/api/services/demo")) == 1
    });

    // Seasons start on a bucket boundary so that phases fill whole buckets.
    let t0 = ((epoch() + 1.0) / BUCKET).ceil() * BUCKET;
    let half = SEASON / 2.0;
    let url = format!("http://127.0.0.1:{listen}/work?cpu_ms=1&sleep_ms=20");
    let driver = std::thread::spawn(move || {
        let mut runs = Vec::new();
        for k in 0..SEASONS {
            for (offset, rate) in [(0.0, QUIET_RPS), (half, BUSY_RPS)] {
                sleep_until_epoch(t0 + k as f64 * SEASON + offset);
                let url = url.clone();
                runs.push(std::thread::spawn(move || load(&url, rate, half as u32)));
            }
        }
        runs.into_iter()
            .map(|r| r.join().unwrap())
            .collect::<Vec<_>>()
    });

    // Watch the desired count until the last busy phase has begun.
    let mut seen: Vec<(f64, u64, u64)> = Vec::new();
    let end = t0 + (SEASONS - 1) as f64 * SEASON + half + 3.0;
    while epoch() < end {
        let v = api_json(admin, "/api/services/demo");
        seen.push((epoch(), v["desired"].as_u64().unwrap(), ready(&v) as u64));
        std::thread::sleep(Duration::from_millis(200));
    }
    let decisions = api_json(admin, "/api/services/demo/decisions");
    let decisions = decisions["decisions"].as_array().unwrap();

    let mut failures = Vec::new();
    for k in 1..SEASONS {
        let busy = t0 + k as f64 * SEASON + half;
        // The first scale-up to 3 or more since the quiet phase began.
        let up = decisions.iter().find(|d| {
            let t = d["inputs"]["wall_epoch_secs"].as_f64().unwrap();
            t > busy - half + 2.0
                && t < busy + 10.0
                && d["direction"] == "up"
                && d["desired"].as_u64().unwrap() >= 3
        });
        let (lead, reason, detail) = match up {
            Some(d) => (
                busy - d["inputs"]["wall_epoch_secs"].as_f64().unwrap(),
                d["reason"].as_str().unwrap().to_string(),
                d["detail"].as_str().unwrap().to_string(),
            ),
            None => (f64::NEG_INFINITY, String::new(), String::new()),
        };
        let quiet_low = seen
            .iter()
            .filter(|s| s.0 > busy - half + 4.0 && s.0 < busy - 7.0)
            .map(|s| s.1)
            .min();
        // The last look at the fleet before the busy phase (polled every 200 ms).
        let at_busy = seen
            .iter()
            .rfind(|s| s.0 <= busy)
            .filter(|s| s.0 > busy - 2.0)
            .map(|s| (s.1, s.2));
        eprintln!(
            "season {k}: desired rose to >= 3 {lead:.1} s before the busy phase ({reason}: \
             {detail}); lowest desired in the quiet phase {quiet_low:?}; (desired, ready) \
             at its start {at_busy:?}"
        );
        if k >= FIRST_CHECKED {
            let on_forecast = reason == "predictive"
                || (reason == "at_max" && detail.starts_with("forecast upper"));
            if !(lead >= 1.0 && on_forecast) {
                failures.push(format!(
                    "season {k}: up {lead:.1} s before the busy phase, {reason}: {detail}"
                ));
            }
            if quiet_low.is_none_or(|d| d > 2) {
                failures.push(format!("season {k}: no scale-in in the quiet phase"));
            }
            if at_busy.is_none_or(|(d, _)| d < 3) {
                failures.push(format!(
                    "season {k}: desired {at_busy:?} just before the busy phase"
                ));
            }
        }
    }
    let reports = driver.join().unwrap();
    for r in &reports {
        assert_eq!(r["errors"]["total"], 0, "{r}");
    }
    // Desired count per second from the first season on, for the failure message.
    let timeline: String = (0..(end - t0) as usize)
        .map(|i| {
            seen.iter()
                .rfind(|s| s.0 <= t0 + i as f64 + 1.0)
                .map_or('?', |s| char::from_digit(s.1 as u32, 10).unwrap_or('+'))
        })
        .collect();
    assert!(
        failures.is_empty(),
        "{failures:#?}\ndesired per second, {SEASON} s seasons: {timeline}"
    );

    // Restart on the same data directory: the history is restored, and the model with it.
    let before = api_json(admin, "/api/services/demo/forecast")["history_secs"]
        .as_f64()
        .unwrap();
    shoal.signal("TERM");
    assert_eq!(
        shoal.wait_exit(40),
        Some(0),
        "shoal did not stop on SIGTERM"
    );
    let history = dir.path().join(".shoal/history/demo.json");
    assert!(
        history.exists(),
        "no history saved at {}",
        history.display()
    );
    std::fs::rename(dir.path().join("shoal.log"), dir.path().join("shoal-1.log")).unwrap();
    let (_shoal, _) = run_shoal(dir.path(), &cfg, listen);
    wait_port(admin, 20);
    let f = api_json(admin, "/api/services/demo/forecast");
    let restored = f["history_secs"].as_f64().unwrap();
    eprintln!("history: {before:.0} s before the restart, {restored:.0} s right after");
    assert!(
        restored >= before - 2.0 * BUCKET && restored >= SEASON,
        "restored {restored} s of {before} s"
    );
    wait_until(10, "a model fit on the restored history", || {
        !api_json(admin, "/api/services/demo/forecast")["model"].is_null()
    });
    let log = std::fs::read_to_string(dir.path().join("shoal.log")).unwrap();
    assert!(log.contains("demand history restored"), "{log}");
}
