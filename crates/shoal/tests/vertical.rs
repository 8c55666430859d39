//! Per-instance limits through cgroups (v2 or v1) and in-place vertical scaling.
//!
//! These need a writable cgroup tree (root on a cgroup v2 or v1 host, as CI is). Where the
//! tree is not writable they skip with a loud message instead of failing.

mod common;

use common::*;
use serde_json::Value;

const MIB: u64 = 1 << 20;

fn api(admin: u16) -> Value {
    api_json(admin, "/api/services/demo")
}

/// Starts shoal with one demo instance and `resources`; None (after saying why) where
/// limits cannot be enforced here.
fn start(resources: &str) -> Option<(tempfile::TempDir, Proc, u16, u16)> {
    let dir = tempdir();
    let (listen, admin) = (free_port(), free_port());
    let cfg = fleet_config(
        listen,
        admin,
        &format!(
            "[services.demo.fleet]\ncommand = \"shoal demo-service\"\nmin = 1\nmax = 1\n\
             [services.demo.resources]\n{resources}\n"
        ),
    );
    let (shoal, _) = run_shoal(dir.path(), &cfg, listen);
    wait_port(admin, 20);
    wait_until(20, "one ready instance", || ready(&api(admin)) == 1);
    let res = &api(admin)["fleet"]["resources"];
    if res["enforced"] != true {
        eprintln!(
            "\n!!!!! SKIPPED: cgroup limits are not enforceable here: {} !!!!!\n",
            res["reason"]
        );
        return None;
    }
    Some((dir, shoal, listen, admin))
}

fn process(admin: u16) -> Value {
    api(admin)["processes"][0].clone()
}

/// The demo as shipped (examples/shoal.toml, on free ports): its instance runs with a
/// 1-core CPU quota and a 256 MiB memory limit, enforced.
#[test]
fn the_demo_size_is_enforced() {
    let example =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../examples/shoal.toml");
    let dir = tempdir();
    let (listen, admin) = (free_port(), free_port());
    let cfg = std::fs::read_to_string(example)
        .unwrap()
        .replace("127.0.0.1:8080", &format!("127.0.0.1:{listen}"))
        .replace("127.0.0.1:9900", &format!("127.0.0.1:{admin}"));
    let (_shoal, _) = run_shoal(dir.path(), &cfg, listen);
    wait_port(admin, 20);
    wait_until(20, "one ready instance", || ready(&api(admin)) == 1);
    let res = api(admin)["fleet"]["resources"].clone();
    if res["enforced"] != true {
        eprintln!(
            "\n!!!!! SKIPPED: cgroup limits are not enforceable here: {} !!!!!\n",
            res["reason"]
        );
        return;
    }
    assert_eq!(res["memory_bytes"], 256 * MIB, "{res}");
    assert_eq!(res["cpu"], 1.0, "{res}");
    let p = process(admin);
    assert_eq!(p["memory_limit_bytes"], 256 * MIB, "{p}");
    assert_eq!(p["cpu_limit"], 1.0, "{p}");
    let (_, m) = get(admin, "/metrics");
    assert!(
        m.contains("shoal_resources_enforced{service=\"demo\"} 1"),
        "{m}"
    );
    let out = std::process::Command::new(SHOAL)
        .args(["status", "--admin", &format!("127.0.0.1:{admin}")])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("memory 256.0MiB, enforced (cgroup"), "{text}");
}

/// `auto` raises the memory limit of a live instance that keeps growing towards it: same
/// pid, never OOM-killed, ending well past the size it started with.
#[test]
fn auto_raises_memory_in_place_before_an_oom_kill() {
    let Some((_dir, _shoal, listen, admin)) = start(
        "cpu = 1.0\nmemory = \"64MiB\"\nmode = \"auto\"\nmax_memory = \"512MiB\"\ncooldown = \"1s\"",
    ) else {
        return;
    };
    let pid = process(admin)["pid"].clone();
    // The recommendation needs 10 s of samples; stay under the starting limit meanwhile.
    let (s, _) = get(listen, "/alloc?mb=40");
    assert_eq!(s, 200);
    let mut held = 40;
    while held < 120 {
        // Grow by 8 MiB once the limit leaves room for it: the limit has to keep ahead.
        wait_until(40, "room under the limit", || {
            let p = process(admin);
            let limit = p["memory_limit_bytes"].as_u64().unwrap_or(0);
            let used = p["memory_bytes"].as_u64().unwrap_or(u64::MAX);
            limit > used + 12 * MIB
        });
        let used = process(admin)["memory_bytes"].as_u64().unwrap();
        let (s, b) = get(listen, "/alloc?mb=8");
        assert_eq!(s, 200, "{b}");
        held += 8;
        // A sample must see the new usage before the room is judged again.
        wait_until(10, "a sample with the new usage", || {
            process(admin)["memory_bytes"].as_u64().unwrap() >= used + 6 * MIB
        });
    }
    let p = process(admin);
    assert_eq!(p["pid"], pid, "resized in place, not restarted: {p}");
    assert!(p["memory_limit_bytes"].as_u64().unwrap() > 130 * MIB, "{p}");
    let (_, m) = get(admin, "/metrics");
    assert!(
        m.contains("shoal_oom_kills_total{service=\"demo\"} 0"),
        "{m}"
    );
    assert!(
        m.contains("shoal_resize_decisions_total{service=\"demo\",resource=\"memory\",direction=\"up\",reason=\"recommendation\"}"),
        "{m}"
    );
    let d = api_json(admin, "/api/services/demo/decisions");
    let r = &d["resizes"][0];
    assert_eq!(r["reason"], "recommendation", "{d}");
    assert_eq!(r["applied_to"][0][1], pid, "{d}");
}

/// An OOM kill is detected and counted, and the replacement starts with a larger limit.
#[test]
fn an_oom_kill_raises_the_next_size() {
    let Some((_dir, _shoal, listen, admin)) =
        start("cpu = 1.0\nmemory = \"64MiB\"\nmode = \"auto\"\nmax_memory = \"512MiB\"")
    else {
        return;
    };
    let first = process(admin);
    // Over the limit at once: the kernel kills it.
    let _ = get(listen, "/alloc?mb=100");
    wait_until(30, "a replacement", || {
        let p = process(admin);
        p["pid"] != first["pid"] && p["phase"] == "ready"
    });
    let p = process(admin);
    assert_eq!(p["memory_limit_bytes"], 96 * MIB, "64 MiB × 1.5: {p}");
    let (_, m) = get(admin, "/metrics");
    assert!(
        m.contains("shoal_oom_kills_total{service=\"demo\"} 1"),
        "{m}"
    );
    let d = api_json(admin, "/api/services/demo/decisions");
    assert_eq!(d["resizes"][0]["reason"], "oom_kill", "{d}");
    let status = api(admin)["fleet"]["last_error"].clone();
    assert!(status.as_str().unwrap_or("").contains("OOM"), "{status}");
}
