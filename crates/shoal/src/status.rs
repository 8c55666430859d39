//! `shoal status`: a terminal view of the admin API.

use std::fmt::Write as _;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

use anyhow::Context as _;
use serde_json::Value;

fn fetch(admin: SocketAddr, path: &str) -> anyhow::Result<Value> {
    let mut s = TcpStream::connect_timeout(&admin, Duration::from_secs(3))
        .with_context(|| format!("cannot reach the admin listener at {admin}"))?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: {admin}\r\nConnection: close\r\n\r\n"
    )?;
    let mut out = String::new();
    s.read_to_string(&mut out)?;
    let (head, body) = out
        .split_once("\r\n\r\n")
        .context("malformed admin response")?;
    anyhow::ensure!(
        head.starts_with("HTTP/1.1 200"),
        "admin answered: {}",
        head.lines().next().unwrap_or("")
    );
    Ok(serde_json::from_str(body)?)
}

fn mib(b: f64) -> String {
    format!("{:.1}MiB", b / 1048576.0)
}

pub fn render(v: &Value) -> String {
    let mut o = String::new();
    for s in v["services"].as_array().into_iter().flatten() {
        let _ = writeln!(
            o,
            "service {}  listen {}  balance {}  requests {}",
            s["name"].as_str().unwrap_or("?"),
            s["listen"].as_str().unwrap_or("-"),
            s["balance"].as_str().unwrap_or("-"),
            s["requests"]
        );
        if let Some(d) = s.get("desired") {
            let _ = writeln!(
                o,
                "  desired {} (min {}, max {})  policy {}  fleet {}",
                d,
                s["min"],
                s["max"],
                s["policy"].as_str().unwrap_or("-"),
                s["fleet"]["state"].as_str().unwrap_or("-")
            );
            if let Some(e) = s["fleet"]["last_error"].as_str() {
                let _ = writeln!(o, "  last error: {e}");
            }
        }
        if let Some(d) = s.get("last_decision").filter(|d| !d.is_null()) {
            let _ = writeln!(
                o,
                "  last decision: {} → {} ({}) {}",
                d["inputs"]["current_desired"],
                d["desired"],
                d["reason"].as_str().unwrap_or(""),
                d["detail"].as_str().unwrap_or("")
            );
        }
        let res = &s["fleet"]["resources"];
        if res.is_object() && (!res["cpu"].is_null() || !res["memory_bytes"].is_null()) {
            let cpu = res["cpu"]
                .as_f64()
                .map_or("unlimited".into(), |c| format!("{c:.2}"));
            let mem = res["memory_bytes"].as_f64().map_or("unlimited".into(), mib);
            let enforced = if res["enforced"] == true {
                format!(
                    "enforced (cgroup {})",
                    res["cgroup"].as_str().unwrap_or("?")
                )
            } else {
                format!("NOT enforced: {}", res["reason"].as_str().unwrap_or("?"))
            };
            let _ = writeln!(
                o,
                "  size per instance: cpu {cpu}, memory {mem}, {enforced}, mode {}",
                res["mode"].as_str().unwrap_or("-")
            );
        }
        if let Some(r) = s.get("recommendation").filter(|r| !r.is_null()) {
            let _ = writeln!(
                o,
                "  recommended size per instance: cpu {:.2}, memory {} ({} samples)",
                r["cpu"].as_f64().unwrap_or(0.0),
                mib(r["memory_bytes"].as_f64().unwrap_or(0.0)),
                r["samples"]
            );
        }
        let procs: Vec<&Value> = s["processes"]
            .as_array()
            .map(|a| a.iter().collect())
            .unwrap_or_default();
        let _ = writeln!(
            o,
            "  {:<16} {:<22} {:<9} {:>8} {:>9} {:>10} {:>10}",
            "INSTANCE", "ADDR", "STATE", "IN-FLT", "REQUESTS", "CPU-S", "RSS"
        );
        for i in s["instances"].as_array().into_iter().flatten() {
            let id = i["id"].as_str().unwrap_or("?");
            let p = procs.iter().find(|p| p["id"].as_str() == Some(id));
            let state = if i["ejected"].as_bool() == Some(true) {
                "ejected"
            } else {
                i["state"].as_str().unwrap_or("?")
            };
            let _ = writeln!(
                o,
                "  {:<16} {:<22} {:<9} {:>8} {:>9} {:>10} {:>10}",
                id,
                i["addr"].as_str().unwrap_or("?"),
                state,
                i["in_flight"],
                i["requests"],
                p.map_or("-".into(), |p| format!(
                    "{:.2}",
                    p["cpu_seconds"].as_f64().unwrap_or(0.0)
                )),
                p.map_or("-".into(), |p| mib(p["memory_bytes"]
                    .as_f64()
                    .unwrap_or(0.0))),
            );
        }
    }
    o
}

/// One line on the cache store, from `/api/cache` (absent when no cache is configured).
pub fn render_cache(c: &Value) -> String {
    let redis = if c["redis_configured"].as_bool() != Some(true) {
        "no redis".to_string()
    } else {
        format!(
            "redis {} ({} errors)",
            if c["redis_connected"].as_bool() == Some(true) {
                "up"
            } else {
                "DOWN: memory only"
            },
            c["redis_errors"]
        )
    };
    format!(
        "cache: {} of {} in memory, {} objects, {} evictions, {redis}\n",
        mib(c["memory_bytes"].as_f64().unwrap_or(0.0)),
        mib(c["memory_capacity_bytes"].as_f64().unwrap_or(0.0)),
        c["objects"],
        c["evictions"],
    )
}

pub fn run(admin: SocketAddr, json: bool) -> anyhow::Result<()> {
    let v = fetch(admin, "/api/services")?;
    // Older servers and cache-less configs answer 404: no cache line then.
    let cache = fetch(admin, "/api/cache").ok();
    if json {
        let mut v = v;
        if let (Some(obj), Some(c)) = (v.as_object_mut(), cache) {
            obj.insert("cache".into(), c);
        }
        println!("{}", serde_json::to_string_pretty(&v)?);
    } else {
        print!("{}", render(&v));
        if let Some(c) = &cache {
            print!("{}", render_cache(c));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    #[test]
    fn cache_line_says_when_redis_is_down() {
        let c = json!({
            "memory_bytes": 1048576, "memory_capacity_bytes": 67108864, "objects": 12,
            "evictions": 0, "redis_configured": true, "redis_connected": false, "redis_errors": 7
        });
        let line = super::render_cache(&c);
        assert_eq!(
            line,
            "cache: 1.0MiB of 64.0MiB in memory, 12 objects, 0 evictions, redis DOWN: memory only (7 errors)\n"
        );
    }
}
