//! Instances never outlive shoal: SIGKILL of `shoal run`, leftovers of a previous run, a
//! second stop signal.

mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use common::*;
use serde_json::Value;

/// Pids of every live (non-zombie) process whose process group is `pgid`.
fn group_members(pgid: u32) -> Vec<u32> {
    let mut out = Vec::new();
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(e.path().join("stat")) else {
            continue;
        };
        let rest = &stat[stat.rfind(')').unwrap() + 2..];
        let f: Vec<&str> = rest.split_whitespace().collect();
        if f[0] != "Z" && f[2].parse::<u32>().ok() == Some(pgid) {
            out.push(pid);
        }
    }
    out
}

/// Live processes whose command line mentions `needle` (e.g. the run file of a temp dir).
fn processes_mentioning(needle: &str) -> Vec<u32> {
    let mut out = Vec::new();
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
            continue;
        };
        let cmd = std::fs::read(e.path().join("cmdline")).unwrap_or_default();
        let stat = std::fs::read_to_string(e.path().join("stat")).unwrap_or_default();
        if String::from_utf8_lossy(&cmd).contains(needle) && !stat.contains(") Z ") {
            out.push(pid);
        }
    }
    out
}

fn port_free(port: u16) -> bool {
    std::net::TcpListener::bind(("127.0.0.1", port)).is_ok()
}

/// Two fleets, three instances: `demo` runs `shoal demo-service` twice; `wrapped` runs one
/// through `sh -c` which forks the server as its child (no exec), so the instance is a tree.
fn config(listen: u16, listen2: u16, admin: u16) -> String {
    format!(
        r#"[admin]
listen = "127.0.0.1:{admin}"

[services.demo]
listen = "127.0.0.1:{listen}"
[services.demo.timeouts]
drain = "10s"
[services.demo.fleet]
command = "shoal demo-service"
min = 2
max = 2

[services.wrapped]
listen = "127.0.0.1:{listen2}"
[services.wrapped.fleet]
command = ["sh", "-c", "{SHOAL} demo-service & wait"]
min = 1
max = 1
"#
    )
}

/// (instance id, pid, port) of every instance of both fleets, once all three are ready.
fn instances(admin: u16) -> Vec<(String, u32, u16)> {
    let mut out = Vec::new();
    for svc in ["demo", "wrapped"] {
        let v = api_json(admin, &format!("/api/services/{svc}"));
        for p in v["processes"].as_array().unwrap() {
            out.push((
                p["id"].as_str().unwrap().to_string(),
                p["pid"].as_u64().unwrap() as u32,
                p["port"].as_u64().unwrap() as u16,
            ));
        }
    }
    out
}

fn all_ready(admin: u16) -> bool {
    ready(&api_json(admin, "/api/services/demo")) == 2
        && ready(&api_json(admin, "/api/services/wrapped")) == 1
}

fn start(dir: &Path, listen: u16, listen2: u16, admin: u16) -> Proc {
    let (shoal, _) = run_shoal(dir, &config(listen, listen2, admin), listen);
    // The admin listener opens after the fleets start (and after any leftovers are stopped).
    wait_port(admin, 20);
    wait_until(30, "three ready instances", || all_ready(admin));
    shoal
}

/// SIGKILL `shoal run` with three instances (one a `sh -c` tree): within 5 s no instance
/// process is left and their ports are free; a restarted shoal serves at once with new
/// instance ids.
#[test]
fn sigkill_of_shoal_leaves_no_instance_and_a_restart_serves_at_once() {
    let dir = tempdir();
    let (listen, listen2, admin) = (free_port(), free_port(), free_port());
    let mut shoal = start(dir.path(), listen, listen2, admin);
    let before = instances(admin);
    assert_eq!(before.len(), 3, "{before:?}");
    // The wrapped instance really is a tree: sh plus the server it forked.
    let wrapped = before.iter().find(|i| i.0.starts_with("wrapped")).unwrap();
    wait_until(5, "the sh -c child", || group_members(wrapped.1).len() >= 2);
    let members: Vec<u32> = before.iter().flat_map(|i| group_members(i.1)).collect();
    assert!(members.len() >= 4, "{members:?}");
    // Its CPU is the tree's: the forked server burns it, not the sh the pid belongs to.
    let (status, _) = get(listen2, "/work?cpu_ms=300");
    assert_eq!(status, 200);
    wait_until(5, "the wrapped instance's CPU", || {
        let v = api_json(admin, "/api/services/wrapped");
        v["processes"][0]["cpu_seconds"].as_f64().unwrap() >= 0.25
    });

    // The watchdog holds its own copy of the record: losing the file (a deleted data_dir)
    // must not matter.
    let run_file = dir.path().join(".shoal/run/instances.json");
    std::fs::remove_file(&run_file).unwrap();
    shoal.signal("KILL");
    shoal.wait_exit(5);
    let killed = Instant::now();
    wait_until(5, "no instance process left", || {
        before.iter().all(|i| group_members(i.1).is_empty())
    });
    eprintln!("instances gone {:?} after SIGKILL", killed.elapsed());
    for (id, _, port) in &before {
        wait_until(2, &format!("port of {id} free"), || port_free(*port));
    }
    // The watchdog went with them.
    wait_until(5, "watchdog exit", || {
        processes_mentioning(run_file.to_str().unwrap()).is_empty()
    });

    // A restart serves at once, with ids no earlier run used.
    let t = Instant::now();
    let _shoal = start(dir.path(), listen, listen2, admin);
    let (status, _) = get(listen, "/work?cpu_ms=1");
    assert_eq!(status, 200);
    eprintln!("restarted and serving in {:?}", t.elapsed());
    assert!(t.elapsed() < Duration::from_secs(10));
    let after = instances(admin);
    for (id, _, _) in &after {
        assert!(
            !before.iter().any(|b| &b.0 == id),
            "id {id} reused: {after:?}"
        );
    }
}

/// With its watchdog gone too (both SIGKILLed), a run's instances survive it; the next
/// `shoal run` on the same data_dir finds them in the run file and stops them first.
#[test]
fn a_restart_stops_what_a_previous_run_left() {
    let dir = tempdir();
    let (listen, listen2, admin) = (free_port(), free_port(), free_port());
    let mut shoal = start(dir.path(), listen, listen2, admin);
    let before = instances(admin);
    let run_file = dir.path().join(".shoal/run/instances.json");
    let watchdogs = processes_mentioning(run_file.to_str().unwrap());
    assert_eq!(watchdogs.len(), 1, "one watchdog: {watchdogs:?}");
    for w in &watchdogs {
        std::process::Command::new("kill")
            .args(["-9", &w.to_string()])
            .status()
            .unwrap();
    }
    shoal.signal("KILL");
    shoal.wait_exit(5);
    std::thread::sleep(Duration::from_millis(500));
    let orphans: Vec<u32> = before.iter().flat_map(|i| group_members(i.1)).collect();
    assert!(
        !orphans.is_empty(),
        "without the watchdog the instances outlive shoal (the case this test covers)"
    );
    let recorded: Value = serde_json::from_slice(&std::fs::read(&run_file).unwrap()).unwrap();
    assert_eq!(
        recorded["instances"].as_array().unwrap().len(),
        3,
        "{recorded}"
    );

    let _shoal = start(dir.path(), listen, listen2, admin);
    for i in &before {
        assert!(
            group_members(i.1).is_empty(),
            "{} survived the restart",
            i.0
        );
    }
    let log = std::fs::read_to_string(dir.path().join("shoal.log")).unwrap();
    assert!(
        log.contains("stopped instances a previous run left behind"),
        "{log}"
    );
}

/// SIGTERM drains; a second SIGTERM during the drain stops shoal and its instances at once.
#[test]
fn a_second_signal_stops_at_once() {
    let dir = tempdir();
    let (listen, listen2, admin) = (free_port(), free_port(), free_port());
    let mut shoal = start(dir.path(), listen, listen2, admin);
    let before = instances(admin);
    // A request that keeps the 10 s drain busy.
    let slow = std::thread::spawn(move || {
        let _ = get(listen, "/slow?ms=8000");
    });
    std::thread::sleep(Duration::from_millis(300));
    shoal.signal("TERM");
    std::thread::sleep(Duration::from_millis(500));
    assert!(
        shoal.0.try_wait().unwrap().is_none(),
        "first SIGTERM drains"
    );
    let t = Instant::now();
    shoal.signal("TERM");
    assert!(shoal.wait_exit(3).is_some(), "second SIGTERM stops at once");
    wait_until(3, "instances gone", || {
        before.iter().all(|i| group_members(i.1).is_empty())
    });
    eprintln!("stopped {:?} after the second signal", t.elapsed());
    let _ = slow.join();
}
