//! `shoal status`: a terminal view of the admin API; `--watch` redraws it every interval.
//!
//! Tables size their columns to their contents and then to the terminal: when too wide, the
//! widest text column is cut (with `…`), then columns are dropped from the right, so rows
//! stay aligned at any width.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

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

/// Display width of a cell (one column per char: the API's text is ASCII plus `→`, `…`).
fn width(s: &str) -> usize {
    s.chars().count()
}

/// `s` cut to `w` columns, with `…` where it was cut.
fn fit(s: &str, w: usize) -> String {
    if width(s) <= w {
        return s.to_string();
    }
    if w == 0 {
        return String::new();
    }
    let mut out: String = s.chars().take(w - 1).collect();
    out.push('…');
    out
}

/// A column: its header, whether numbers (right-aligned, never cut), and the narrowest a
/// text column may be cut to.
pub struct Col {
    pub name: &'static str,
    pub numeric: bool,
    pub min: usize,
}

const fn text(name: &'static str, min: usize) -> Col {
    Col {
        name,
        numeric: false,
        min,
    }
}

const fn num(name: &'static str) -> Col {
    Col {
        name,
        numeric: true,
        min: 0,
    }
}

/// Renders rows under `cols`, indented by `indent`, in at most `max` columns of text.
pub fn table(cols: &[Col], rows: &[Vec<String>], indent: usize, max: Option<usize>) -> String {
    let mut w: Vec<usize> = cols
        .iter()
        .enumerate()
        .map(|(i, c)| {
            rows.iter()
                .map(|r| r.get(i).map_or(0, |s| width(s)))
                .max()
                .unwrap_or(0)
                .max(width(c.name))
        })
        .collect();
    let mut shown = cols.len();
    if let Some(max) = max {
        let total = |w: &[usize], n: usize| indent + w[..n].iter().sum::<usize>() + 2 * (n - 1);
        // Cut the widest text column first, one column at a time, down to its minimum.
        while total(&w, shown) > max {
            let cut = (0..shown)
                .filter(|&i| !cols[i].numeric && w[i] > cols[i].min.max(width(cols[i].name)))
                .max_by_key(|&i| w[i]);
            match cut {
                Some(i) => {
                    let floor = cols[i].min.max(width(cols[i].name));
                    w[i] = w[i].saturating_sub(total(&w, shown) - max).max(floor);
                }
                None if shown > 1 => shown -= 1,
                None => break,
            }
        }
    }
    let mut out = String::new();
    let line = |cells: Vec<String>, out: &mut String| {
        let mut l = " ".repeat(indent);
        for (i, c) in cells.iter().enumerate().take(shown) {
            if i > 0 {
                l.push_str("  ");
            }
            let s = fit(c, w[i]);
            let pad = " ".repeat(w[i] - width(&s));
            if cols[i].numeric {
                l.push_str(&pad);
                l.push_str(&s);
            } else {
                l.push_str(&s);
                if i + 1 < shown {
                    l.push_str(&pad);
                }
            }
        }
        out.push_str(l.trim_end());
        out.push('\n');
    };
    line(cols.iter().map(|c| c.name.to_string()).collect(), &mut out);
    for r in rows {
        line(r.clone(), &mut out);
    }
    out
}

/// Requests counted per instance at the previous frame, for `--watch` rates.
pub type Counts = HashMap<(String, String), (f64, Instant)>;

/// One view of `/api/services` in at most `max` columns. With `prev`, a REQ/S column shows
/// each instance's rate since the previous frame.
pub fn render(v: &Value, max: Option<usize>, prev: Option<&mut Counts>) -> String {
    let now = Instant::now();
    let mut rates = prev;
    let mut o = String::new();
    let say = |o: &mut String, s: String| {
        let _ = writeln!(o, "{}", max.map_or(s.clone(), |m| fit(&s, m)));
    };
    for s in v["services"].as_array().into_iter().flatten() {
        let name = s["name"].as_str().unwrap_or("?");
        say(
            &mut o,
            format!(
                "service {}  listen {}  balance {}  requests {}",
                name,
                s["listen"].as_str().unwrap_or("-"),
                s["balance"].as_str().unwrap_or("-"),
                s["requests"]
            ),
        );
        if let Some(d) = s.get("desired") {
            say(
                &mut o,
                format!(
                    "  desired {} (min {}, max {})  policy {}  fleet {}",
                    d,
                    s["min"],
                    s["max"],
                    s["policy"].as_str().unwrap_or("-"),
                    s["fleet"]["state"].as_str().unwrap_or("-")
                ),
            );
            if let Some(e) = s["fleet"]["last_error"].as_str() {
                say(&mut o, format!("  last error: {e}"));
            }
            let f = &s["fleet"];
            if f["provider"] == "kubernetes" {
                say(
                    &mut o,
                    format!(
                        "  kubernetes {}/{}  replicas {}  external scale: {}{}",
                        f["namespace"].as_str().unwrap_or("-"),
                        f["deployment"].as_str().unwrap_or("-"),
                        f["replicas"],
                        f["external_scale"].as_str().unwrap_or("-"),
                        if f["scale_from_zero"] == true {
                            "  scale from zero"
                        } else {
                            ""
                        }
                    ),
                );
                for k in ["metrics", "vertical"] {
                    if let Some(v) = f[k].as_str() {
                        say(&mut o, format!("  {k}: {v}"));
                    }
                }
            }
        }
        if let Some(p) = s.get("prometheus").filter(|p| !p.is_null()) {
            say(
                &mut o,
                format!(
                    "  prometheus {}  value {}{}",
                    p["query"].as_str().unwrap_or(""),
                    p["value"]
                        .as_f64()
                        .map_or("-".to_string(), |v| format!("{v}")),
                    p["error"]
                        .as_str()
                        .map_or(String::new(), |e| format!("  error: {e}")),
                ),
            );
        }
        if let Some(d) = s.get("last_decision").filter(|d| !d.is_null()) {
            say(
                &mut o,
                format!(
                    "  last decision: {} → {} ({}) {}",
                    d["inputs"]["current_desired"],
                    d["desired"],
                    d["reason"].as_str().unwrap_or(""),
                    d["detail"].as_str().unwrap_or("")
                ),
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
            say(
                &mut o,
                format!(
                    "  size per instance: cpu {cpu}, memory {mem}, {enforced}, mode {}",
                    res["mode"].as_str().unwrap_or("-")
                ),
            );
        }
        if let Some(r) = s.get("recommendation").filter(|r| !r.is_null()) {
            say(
                &mut o,
                format!(
                    "  recommended size per instance: cpu {:.2}, memory {} ({} samples)",
                    r["cpu"].as_f64().unwrap_or(0.0),
                    mib(r["memory_bytes"].as_f64().unwrap_or(0.0)),
                    r["samples"]
                ),
            );
        }
        let procs: Vec<&Value> = s["processes"]
            .as_array()
            .map(|a| a.iter().collect())
            .unwrap_or_default();
        let mut cols = vec![text("INSTANCE", 8), text("ADDR", 9), text("STATE", 5)];
        if rates.is_some() {
            cols.push(num("REQ/S"));
        }
        cols.extend([num("IN-FLT"), num("REQUESTS"), num("CPU-S"), num("RSS")]);
        let mut rows = Vec::new();
        for i in s["instances"].as_array().into_iter().flatten() {
            let id = i["id"].as_str().unwrap_or("?");
            let p = procs.iter().find(|p| p["id"].as_str() == Some(id));
            let state = if i["ejected"].as_bool() == Some(true) {
                "ejected"
            } else {
                i["state"].as_str().unwrap_or("?")
            };
            let requests = i["requests"].as_f64().unwrap_or(0.0);
            let mut row = vec![
                id.to_string(),
                i["addr"].as_str().unwrap_or("?").to_string(),
                state.to_string(),
            ];
            if let Some(prev) = rates.as_deref_mut() {
                let key = (name.to_string(), id.to_string());
                let rate = prev.get(&key).and_then(|(n, t)| {
                    let dt = now.duration_since(*t).as_secs_f64();
                    (dt > 0.05 && requests >= *n).then(|| (requests - n) / dt)
                });
                prev.insert(key, (requests, now));
                row.push(rate.map_or("-".into(), |r| format!("{r:.1}")));
            }
            row.extend([
                i["in_flight"].to_string(),
                i["requests"].to_string(),
                p.map_or("-".into(), |p| {
                    format!("{:.2}", p["cpu_seconds"].as_f64().unwrap_or(0.0))
                }),
                p.map_or("-".into(), |p| {
                    mib(p["memory_bytes"].as_f64().unwrap_or(0.0))
                }),
            ]);
            rows.push(row);
        }
        o.push_str(&table(&cols, &rows, 2, max));
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

/// One line per fleet on who leads it, from `/api/leader` (absent without `[cluster]`).
pub fn render_leader(v: &Value) -> String {
    let mut out = String::new();
    for s in v["services"].as_array().into_iter().flatten() {
        let token = s["token"].as_u64().map_or("-".into(), |t| t.to_string());
        if s["leader"] == true {
            let _ = writeln!(
                out,
                "leader: {}: this replica ({}), token {token}",
                s["service"].as_str().unwrap_or("?"),
                s["id"].as_str().unwrap_or("?"),
            );
        } else {
            let _ = writeln!(
                out,
                "leader: {}: {} (this replica {} follows), token {token}",
                s["service"].as_str().unwrap_or("?"),
                s["holder"].as_str().unwrap_or("none"),
                s["id"].as_str().unwrap_or("?"),
            );
        }
    }
    out
}

/// The async queues, from `/api/queues`: depth, broker state, workers, job outcomes. Empty
/// when there are none.
pub fn render_queues(v: &Value, max: Option<usize>) -> String {
    let Some(qs) = v["queues"].as_array().filter(|q| !q.is_empty()) else {
        return String::new();
    };
    let cols = [
        text("QUEUE", 6),
        text("BROKER", 6),
        text("STATE", 6),
        num("DEPTH"),
        text("WORKERS", 7),
        num("DONE"),
        num("DUPS"),
        num("DEAD"),
        num("REFUSED"),
    ];
    let n = |x: &Value| x.as_u64().map_or("-".to_string(), |n| n.to_string());
    let rows: Vec<Vec<String>> = qs
        .iter()
        .map(|q| {
            vec![
                q["queue"].as_str().unwrap_or("?").to_string(),
                format!(
                    "{} ({})",
                    q["broker"].as_str().unwrap_or("?"),
                    q["kind"].as_str().unwrap_or("?")
                ),
                q["state"].as_str().unwrap_or("?").to_string(),
                n(&q["depth"]),
                format!(
                    "{}: {}/{}",
                    q["worker_service"].as_str().unwrap_or("?"),
                    q["workers"]["ready"],
                    q["workers"]["total"]
                ),
                n(&q["jobs"]["done"]),
                n(&q["jobs"]["duplicated"]),
                n(&q["jobs"]["dead_lettered"]),
                n(&q["jobs"]["rejected"]),
            ]
        })
        .collect();
    format!("queues:\n{}", table(&cols, &rows, 2, max))
}

/// The terminal's width: `COLUMNS`, else `stty size` on the controlling terminal; None when
/// there is no terminal (output to a pipe is not cut).
fn terminal_width() -> Option<usize> {
    if let Some(c) = std::env::var("COLUMNS").ok().and_then(|c| c.parse().ok()) {
        return Some(c);
    }
    let tty = std::fs::File::open("/dev/tty").ok()?;
    let out = std::process::Command::new("stty")
        .arg("size")
        .stdin(tty)
        .stderr(std::process::Stdio::null())
        .output()
        .ok()?;
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
        .filter(|w| *w > 0)
}

pub fn run(admin: SocketAddr, json: bool, watch: Option<f64>) -> anyhow::Result<()> {
    let Some(every) = watch else {
        let v = fetch(admin, "/api/services")?;
        // Cache-less configs (and older servers) answer 404: no cache line then.
        let cache = fetch(admin, "/api/cache").ok();
        // Without `[cluster]` this answers 404: no leader lines then.
        let leader = fetch(admin, "/api/leader").ok();
        if json {
            let mut v = v;
            if let (Some(obj), Some(c)) = (v.as_object_mut(), cache) {
                obj.insert("cache".into(), c);
            }
            if let (Some(obj), Some(l)) = (v.as_object_mut(), leader) {
                obj.insert("leader".into(), l);
            }
            println!("{}", serde_json::to_string_pretty(&v)?);
        } else {
            let tty = std::io::IsTerminal::is_terminal(&std::io::stdout());
            print!("{}", render(&v, terminal_width().filter(|_| tty), None));
            if let Some(c) = &cache {
                print!("{}", render_cache(c));
            }
            if let Some(l) = &leader {
                print!("{}", render_leader(l));
            }
            if let Ok(q) = fetch(admin, "/api/queues") {
                print!("{}", render_queues(&q, terminal_width().filter(|_| tty)));
            }
        }
        return Ok(());
    };
    anyhow::ensure!(
        every >= 0.1 && every.is_finite(),
        "--watch interval must be at least 0.1 s"
    );
    let mut counts = Counts::new();
    let mut out = std::io::stdout();
    loop {
        // A whole frame in one write: cursor home, the frame, clear the rest.
        let mut frame = String::from("\x1b[H");
        let width = terminal_width();
        let stamp = format!("shoal status  {admin}  every {every}s  (Ctrl-C to quit)");
        let _ = writeln!(
            frame,
            "{}\x1b[K",
            width.map_or(stamp.clone(), |w| fit(&stamp, w))
        );
        match fetch(admin, "/api/services") {
            Ok(v) => {
                for l in render(&v, width, Some(&mut counts)).lines() {
                    let _ = writeln!(frame, "{l}\x1b[K");
                }
            }
            // Keep watching: shoal may be restarting.
            Err(e) => {
                let _ = writeln!(frame, "{e:#}\x1b[K");
            }
        }
        if let Ok(l) = fetch(admin, "/api/leader") {
            for l in render_leader(&l).lines() {
                let _ = writeln!(frame, "{l}\x1b[K");
            }
        }
        if let Ok(q) = fetch(admin, "/api/queues") {
            for l in render_queues(&q, width).lines() {
                let _ = writeln!(frame, "{l}\x1b[K");
            }
        }
        frame.push_str("\x1b[J");
        out.write_all(frame.as_bytes())?;
        out.flush()?;
        std::thread::sleep(Duration::from_secs_f64(every));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cols() -> Vec<Col> {
        vec![text("INSTANCE", 8), text("ADDR", 9), num("REQUESTS")]
    }

    fn rows() -> Vec<Vec<String>> {
        vec![
            vec!["demo-1".into(), "127.0.0.1:40001".into(), "7".into()],
            vec![
                "a-very-long-instance-name-from-kubernetes-7d9f8".into(),
                "10.0.0.1:8080".into(),
                "123456".into(),
            ],
        ]
    }

    /// Every line has the header's column gaps (two spaces before each header column), and
    /// lines whose last column is a number end where the header ends.
    fn assert_aligned(t: &str) {
        let lines: Vec<Vec<char>> = t.lines().map(|l| l.chars().collect()).collect();
        let head = &lines[0];
        let starts: Vec<usize> = (2..head.len())
            .filter(|&i| head[i] != ' ' && head[i - 1] == ' ' && head[i - 2] == ' ')
            .collect();
        for l in &lines[1..] {
            for &p in &starts {
                if p < l.len() {
                    assert!(l[p - 1] == ' ' && l[p - 2] == ' ', "gap at {p}:\n{t}");
                }
            }
            if head.last().is_some_and(|c| *c == 'S') {
                assert_eq!(l.len(), head.len(), "{t}");
            }
        }
    }

    #[test]
    fn columns_fit_the_widest_cell() {
        let t = table(&cols(), &rows(), 2, None);
        assert!(
            t.contains("a-very-long-instance-name-from-kubernetes-7d9f8"),
            "{t}"
        );
        assert_aligned(&t);
    }

    #[test]
    fn narrow_terminals_cut_text_then_drop_columns() {
        for max in [80, 60, 40, 31] {
            let t = table(&cols(), &rows(), 2, Some(max));
            assert!(t.lines().all(|l| width(l) <= max), "{max}:\n{t}");
            assert_aligned(&t);
            assert!(t.contains("123456"), "{max}: numbers are never cut\n{t}");
        }
        let t = table(&cols(), &rows(), 2, Some(40));
        assert!(t.contains('…'), "{t}");
        // Too narrow for every column: the rightmost go, the rest stay aligned.
        let t = table(&cols(), &rows(), 2, Some(22));
        assert!(!t.contains("REQUESTS"), "{t}");
        assert!(t.lines().all(|l| width(l) <= 22), "{t}");
    }

    #[test]
    fn watch_rates_come_from_the_previous_frame() {
        let v = |n: u64| {
            serde_json::json!({"services": [{"name": "web", "listen": "x", "balance": "rr",
                "requests": n, "instances": [{"id": "w1", "addr": "a", "state": "ready",
                "in_flight": 0, "requests": n}]}]})
        };
        let mut c = Counts::new();
        let first = render(&v(10), Some(100), Some(&mut c));
        assert!(first.contains("REQ/S"), "{first}");
        // Pretend the previous frame was a second ago.
        for (_, (_, t)) in c.iter_mut() {
            *t -= Duration::from_secs(1);
        }
        let second = render(&v(60), Some(100), Some(&mut c));
        let row = second.lines().find(|l| l.contains("w1")).unwrap();
        assert!(row.contains("50.0"), "{second}");
    }

    #[test]
    fn queues_show_depth_broker_state_and_workers() {
        let v = serde_json::json!({"queues": [{
            "queue": "work", "broker": "rabbit", "kind": "rabbitmq", "state": "disconnected",
            "depth": null, "worker_service": "workers", "workers": {"ready": 2, "total": 3},
            "jobs": {"done": 10, "duplicated": 1, "dead_lettered": 0, "rejected": 4}
        }]});
        let t = super::render_queues(&v, None);
        let row = t.lines().find(|l| l.contains("work ")).unwrap();
        for cell in [
            "rabbit (rabbitmq)",
            "disconnected",
            "workers: 2/3",
            " 10",
            " 4",
        ] {
            assert!(row.contains(cell), "{cell}: {t}");
        }
        assert_eq!(
            super::render_queues(&serde_json::json!({"queues": []}), None),
            ""
        );
    }

    #[test]
    fn leader_lines_name_the_holder() {
        let v = serde_json::json!({"leader": false, "services": [
            {"service": "demo", "leader": false, "id": "b", "holder": "a", "token": 4},
            {"service": "api", "leader": true, "id": "b", "holder": "b", "token": 2},
        ]});
        assert_eq!(
            render_leader(&v),
            "leader: demo: a (this replica b follows), token 4\nleader: api: this replica (b), token 2\n"
        );
    }

    #[test]
    fn cache_line_says_when_redis_is_down() {
        let c = serde_json::json!({
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
