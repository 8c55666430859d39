//! Harness for tests that run the real `shoal` binary and demo instances as child processes
//! on free ports in temp dirs.
#![allow(dead_code)]

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub const SHOAL: &str = env!("CARGO_BIN_EXE_shoal");

include!("../../../shoal-queue/tests/common/free_port.rs");

/// A child process killed when dropped.
pub struct Proc(pub Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

impl Proc {
    pub fn signal(&self, sig: &str) {
        let ok = Command::new("kill")
            .args([&format!("-{sig}"), &self.0.id().to_string()])
            .status()
            .unwrap();
        assert!(ok.success());
    }

    /// Waits for exit up to `secs`; returns the exit code.
    pub fn wait_exit(&mut self, secs: u64) -> Option<i32> {
        let deadline = Instant::now() + Duration::from_secs(secs);
        while Instant::now() < deadline {
            if let Some(s) = self.0.try_wait().unwrap() {
                return s.code();
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        None
    }
}

pub fn wait_port(port: u16, secs: u64) {
    let deadline = Instant::now() + Duration::from_secs(secs);
    while TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(Instant::now() < deadline, "port {port} never opened");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A demo-service instance on a free port.
pub fn demo(dir: &Path, name: &str) -> (Proc, u16) {
    let port = free_port();
    let log = std::fs::File::create(dir.join(format!("{name}.log"))).unwrap();
    let child = Command::new(SHOAL)
        .arg("demo-service")
        .env("PORT", port.to_string())
        .env("SHOAL_INSTANCE", name)
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .unwrap();
    wait_port(port, 10);
    (Proc(child), port)
}

/// `shoal run --config` on a config file in `dir`.
pub fn run_shoal(dir: &Path, config: &str, wait_for: u16) -> (Proc, PathBuf) {
    let path = dir.join("shoal.toml");
    std::fs::write(&path, config).unwrap();
    let log = std::fs::File::create(dir.join("shoal.log")).unwrap();
    let child = Command::new(SHOAL)
        .args(["run", "--config"])
        .arg(&path)
        .env("RUST_LOG", "info")
        .env("SHOAL_ADMIN_TOKEN", "test-token")
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .unwrap();
    let mut proc = Proc(child);
    wait_port(wait_for, 20);
    // The admin listener binds after the services: wait for it too (its port is in the
    // config), and if shoal exited (e.g. a free port was taken meanwhile), fail with its log
    // rather than a bare refusal.
    let admin_port = config.split("[admin]").nth(1).and_then(|t| {
        t.lines().take_while(|l| !l.starts_with('[')).find_map(|l| {
            let v = l
                .trim()
                .strip_prefix("listen")?
                .trim_start()
                .strip_prefix('=')?;
            v.trim()
                .trim_matches('"')
                .rsplit(':')
                .next()?
                .parse::<u16>()
                .ok()
        })
    });
    let deadline = Instant::now() + Duration::from_secs(20);
    while let Some(p) = admin_port {
        if TcpStream::connect(("127.0.0.1", p)).is_ok() || proc.0.try_wait().unwrap().is_some() {
            break;
        }
        assert!(Instant::now() < deadline, "admin port {p} never opened");
        std::thread::sleep(Duration::from_millis(20));
    }
    std::thread::sleep(Duration::from_millis(100));
    if let Some(code) = proc.0.try_wait().unwrap() {
        let log = std::fs::read_to_string(dir.join("shoal.log")).unwrap_or_default();
        panic!("shoal exited at start ({code}):\n{log}");
    }
    (proc, path)
}

/// One HTTP/1.1 request on a fresh connection; returns (status, body).
pub fn http(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &str,
) -> (u16, String) {
    let out = http_raw(addr, method, path, headers, body);
    let status = out.get(9..12).and_then(|c| c.parse().ok()).unwrap_or(0);
    let body = out
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    (status, body)
}

/// A header of a raw response (`http_raw`), case-insensitive.
pub fn header<'a>(resp: &'a str, name: &str) -> Option<&'a str> {
    resp.lines()
        .take_while(|l| !l.is_empty())
        .find_map(|l| {
            l.split_once(':')
                .filter(|(n, _)| n.eq_ignore_ascii_case(name))
        })
        .map(|(_, v)| v.trim())
}

/// One HTTP/1.1 request on a fresh connection; the whole response as text ("" when the
/// connection failed).
pub fn http_raw(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &str,
) -> String {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    let mut req = format!(
        "{method} {path} HTTP/1.1\r\nConnection: close\r\nContent-Length: {}\r\n",
        body.len()
    );
    if !headers.iter().any(|(k, _)| k.eq_ignore_ascii_case("host")) {
        req.push_str(&format!("Host: {addr}\r\n"));
    }
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    req.push_str("\r\n");
    req.push_str(body);
    s.write_all(req.as_bytes()).unwrap();
    let mut out = String::new();
    let _ = s.read_to_string(&mut out);
    out
}

pub fn get(port: u16, path: &str) -> (u16, String) {
    http(
        SocketAddr::from(([127, 0, 0, 1], port)),
        "GET",
        path,
        &[],
        "",
    )
}

/// Runs `shoal load` and returns its JSON report.
pub fn load(url: &str, rate: u32, secs: u32) -> serde_json::Value {
    let out = Command::new(SHOAL)
        .args([
            "load",
            url,
            "--rate",
            &rate.to_string(),
            "--duration",
            &secs.to_string(),
            "--json",
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "shoal load failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

pub fn tempdir() -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix("shoal-test-")
        .tempdir()
        .unwrap()
}

/// A config with one service `demo` on `listen`, the admin API on `admin`, a 10 s drain
/// timeout, and `extra` (fleet, autoscale tables) appended.
pub fn fleet_config(listen: u16, admin: u16, extra: &str) -> String {
    format!(
        r#"[admin]
listen = "127.0.0.1:{admin}"

[services.demo]
listen = "127.0.0.1:{listen}"
balance = "least-connections"

[services.demo.timeouts]
drain = "10s"

{extra}
"#
    )
}

/// `GET path` on the admin listener, as JSON (asserts a 200).
pub fn api_json(admin: u16, path: &str) -> serde_json::Value {
    let (s, body) = get(admin, path);
    assert_eq!(s, 200, "{path}: {body}");
    serde_json::from_str(&body).unwrap()
}

/// Instances in state `ready` in a `/api/services/NAME` answer.
pub fn ready(v: &serde_json::Value) -> usize {
    v["instances"]
        .as_array()
        .map_or(0, |a| a.iter().filter(|i| i["state"] == "ready").count())
}

/// Polls `f` every 100 ms; panics naming `what` after `secs`.
pub fn wait_until(secs: u64, what: &str, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(secs);
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// A self-signed ECDSA certificate for `name` in `dir/{file}.pem` and `.key` (replaced by
/// rename, as a deploy tool would).
pub fn cert(dir: &Path, file: &str, name: &str) {
    let (c, k) = (
        dir.join(format!("{file}.pem")),
        dir.join(format!("{file}.key")),
    );
    let (ct, kt) = (c.with_extension("pem.tmp"), k.with_extension("key.tmp"));
    let ok = Command::new("openssl")
        .args([
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
        ])
        .args(["-nodes", "-days", "2", "-subj", &format!("/CN={name}")])
        .args(["-addext", &format!("subjectAltName=DNS:{name}")])
        .arg("-keyout")
        .arg(&kt)
        .arg("-out")
        .arg(&ct)
        .stderr(Stdio::null())
        .status()
        .expect("openssl CLI (Debian: openssl)");
    assert!(ok.success());
    std::fs::rename(kt, k).unwrap();
    std::fs::rename(ct, c).unwrap();
}
