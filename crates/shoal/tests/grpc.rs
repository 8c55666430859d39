//! gRPC through shoal against real gRPC servers (Python `grpcio`, generic raw-bytes handlers:
//! `tests/grpc/server.py`), with a real grpcio client (`tests/grpc/client.py`): HTTP/2 to the
//! instances (`--upstream-protocol h2c`), per-call balancing over one client connection,
//! headers, trailers and statuses end to end, all four call kinds, retries of trailers-only
//! UNAVAILABLE, no retry after response headers, `grpc-timeout` as the deadline, shoal's own
//! errors as gRPC statuses, and more connections to an instance that allows few streams.

mod common;

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use common::*;
use serde_json::Value;

/// Python with grpcio: `SHOAL_GRPC_PYTHON`, else the venv scripts/test.sh makes.
fn python() -> PathBuf {
    let p = std::env::var_os("SHOAL_GRPC_PYTHON").map_or_else(
        || {
            PathBuf::from(std::env::var_os("HOME").expect("HOME"))
                .join(".cache/shoal/grpc-venv/bin/python")
        },
        PathBuf::from,
    );
    assert!(
        p.exists(),
        "{} missing: scripts/test.sh installs grpcio into it (or set SHOAL_GRPC_PYTHON)",
        p.display()
    );
    p
}

/// grpcurl: `SHOAL_GRPCURL`, else where scripts/test.sh unpacks it.
fn grpcurl() -> PathBuf {
    let p = std::env::var_os("SHOAL_GRPCURL").map_or_else(
        || {
            PathBuf::from(std::env::var_os("HOME").expect("HOME"))
                .join(".cache/shoal/grpcurl/grpcurl")
        },
        PathBuf::from,
    );
    assert!(
        p.exists(),
        "{} missing: scripts/test.sh installs it (or set SHOAL_GRPCURL)",
        p.display()
    );
    p
}

fn script(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/grpc")
        .join(name)
}

/// A gRPC server named `name` on a free port; `max_streams` limits concurrent streams.
fn server(dir: &Path, name: &str, max_streams: Option<u32>, flaky: &Path) -> (Proc, u16) {
    let port = free_port();
    let log = std::fs::File::create(dir.join(format!("grpc-{name}.log"))).unwrap();
    let mut cmd = Command::new(python());
    cmd.arg(script("server.py"))
        .arg(port.to_string())
        .arg(name)
        .env("FLAKY_DIR", flaky)
        .stdout(Stdio::null())
        .stderr(log);
    if let Some(m) = max_streams {
        cmd.arg(m.to_string());
    }
    let p = Proc(cmd.spawn().unwrap());
    wait_port(port, 20);
    (p, port)
}

/// One server per name; the servers and their ports.
fn servers(dir: &Path, names: &[&str], flaky: &Path) -> (Vec<(Proc, u16)>, Vec<u16>) {
    let s: Vec<(Proc, u16)> = names.iter().map(|n| server(dir, n, None, flaky)).collect();
    let ports = s.iter().map(|x| x.1).collect();
    (s, ports)
}

/// Runs one client scenario against `target`; its JSON report.
fn client(target: &str, args: &[&str]) -> Value {
    let out = Command::new(python())
        .arg(script("client.py"))
        .arg(target)
        .args(args)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "client {args:?}: {text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_str(text.trim()).unwrap_or_else(|e| panic!("{e}: {text}"))
}

/// `shoal proxy` to `backends` over h2c.
fn proxy(dir: &Path, backends: &[u16], extra: &[&str]) -> (Proc, u16, u16) {
    let (listen, admin) = (free_port(), free_port());
    let log = std::fs::File::create(dir.join("shoal.log")).unwrap();
    let mut cmd = Command::new(SHOAL);
    cmd.args(["proxy", "--upstream-protocol", "h2c"])
        .args(["--listen", &format!("127.0.0.1:{listen}")])
        .args(["--admin", &format!("127.0.0.1:{admin}")])
        .args(extra)
        .stdout(Stdio::null())
        .stderr(log);
    for b in backends {
        cmd.args(["--backend", &format!("127.0.0.1:{b}")]);
    }
    let p = Proc(cmd.spawn().unwrap());
    wait_port(listen, 10);
    wait_port(admin, 10);
    (p, listen, admin)
}

fn metric(admin: u16, series: &str) -> f64 {
    let (_, m) = get(admin, "/metrics");
    m.lines()
        .find_map(|l| l.strip_prefix(series)?.trim().parse().ok())
        .unwrap_or(0.0)
}

#[test]
fn grpc_calls_balance_per_call_and_keep_headers_trailers_and_statuses() {
    let dir = tempdir();
    let (_servers, ports) = servers(dir.path(), &["a", "b", "c"], dir.path());
    let (_shoal, listen, admin) = proxy(dir.path(), &ports, &[]);
    let target = format!("127.0.0.1:{listen}");

    // 300 unary calls on one client connection: every instance within ±10% of a third.
    let r = client(&target, &["unary", "300"]);
    assert_eq!(r["errors"], serde_json::json!([]), "{r}");
    for n in ["a", "b", "c"] {
        let got = r["seen"][n].as_u64().unwrap_or(0);
        assert!((90..=110).contains(&got), "{n}: {got} of 300: {r}");
    }
    assert_eq!(r["trailers"]["x-trailer"], "t", "trailers relayed: {r}");

    let r = client(&target, &["streams"]);
    assert_eq!(r["server"].as_array().unwrap().len(), 5, "{r}");
    assert_eq!(r["client"], "abc", "{r}");
    let bidi: Vec<&str> = r["bidi"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap().split(':').nth(1).unwrap())
        .collect();
    assert_eq!(bidi, ["x", "y", "z"], "{r}");

    let r = client(&target, &["fail", "INVALID_ARGUMENT:bad input"]);
    assert_eq!(
        (r["code"].as_str(), r["details"].as_str()),
        (Some("INVALID_ARGUMENT"), Some("bad input")),
        "{r}"
    );
    assert!(
        metric(
            admin,
            "shoal_grpc_responses_total{service=\"default\",code=\"OK\"}"
        ) >= 300.0
    );
    assert_eq!(
        metric(
            admin,
            "shoal_grpc_responses_total{service=\"default\",code=\"INVALID_ARGUMENT\"}"
        ),
        1.0
    );

    // An HTTP/1.1 client reaches the HTTP/2 instances too, trailers included (TE: trailers).
    let mut s = std::net::TcpStream::connect(("127.0.0.1", listen)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let msg = b"\x00\x00\x00\x00\x02hi";
    write!(
        s,
        "POST /shoal.test.Echo/Unary HTTP/1.1\r\nhost: x\r\ncontent-type: application/grpc\r\nte: trailers\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
        msg.len()
    )
    .unwrap();
    s.write_all(msg).unwrap();
    let mut resp = Vec::new();
    let _ = s.read_to_end(&mut resp);
    let resp = String::from_utf8_lossy(&resp).to_lowercase();
    assert!(resp.starts_with("http/1.1 200"), "{resp}");
    assert!(resp.contains(":hi"), "{resp}");
    assert!(
        resp.contains("grpc-status: 0"),
        "trailers over HTTP/1.1: {resp}"
    );
}

#[test]
fn grpc_retries_deadlines_and_shoals_own_errors() {
    let dir = tempdir();
    let flaky = dir.path().join("flaky");
    std::fs::create_dir(&flaky).unwrap();
    let (mut servers, ports) = servers(dir.path(), &["a", "b", "c"], &flaky);
    let (_shoal, listen, admin) = proxy(dir.path(), &ports, &[]);
    let target = format!("127.0.0.1:{listen}");
    let retries = || metric(admin, "shoal_retries_total{service=\"default\"}");

    // UNAVAILABLE twice (trailers-only), then success: two retries, the call succeeds.
    let r = client(&target, &["flaky", "k1"]);
    assert_eq!(r["code"], "OK", "{r}");
    assert_eq!(retries(), 2.0);

    // A failure after response headers (two messages sent) is not retried.
    let r = client(&target, &["broken"]);
    assert_eq!(r["code"], "UNAVAILABLE", "{r}");
    assert_eq!(r["got"].as_array().unwrap().len(), 2, "{r}");
    assert_eq!(retries(), 2.0);

    // grpc-timeout 200 ms on a 1 s handler: DEADLINE_EXCEEDED in about 200 ms.
    let r = client(&target, &["deadline", "200", "1000"]);
    assert_eq!(r["code"], "DEADLINE_EXCEEDED", "{r}");
    let ms = r["ms"].as_f64().unwrap();
    assert!((150.0..800.0).contains(&ms), "{ms} ms");

    // No instance left: shoal's own error is a gRPC status, not an error page.
    for (p, _) in &mut servers {
        p.signal("KILL");
        p.wait_exit(5);
    }
    let r = client(&target, &["fail", "OK:x"]);
    assert_eq!(r["code"], "UNAVAILABLE", "{r}");
    assert!(
        metric(
            admin,
            "shoal_grpc_responses_total{service=\"default\",code=\"UNAVAILABLE\"}"
        ) >= 2.0
    );
}

/// Established TCP connections to `port` on 127.0.0.1 (from any local process).
fn connections_to(port: u16) -> usize {
    let text = std::fs::read_to_string("/proc/net/tcp").unwrap();
    text.lines()
        .skip(1)
        .filter(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            f.len() > 3
                && f[3] == "01"
                && f[2]
                    .rsplit(':')
                    .next()
                    .and_then(|p| u16::from_str_radix(p, 16).ok())
                    == Some(port)
        })
        .count()
}

#[test]
fn an_instance_allowing_four_streams_gets_more_connections_not_a_queue() {
    let dir = tempdir();
    let (_server, port) = server(dir.path(), "d", Some(4), dir.path());
    let (_shoal, listen, _admin) = proxy(dir.path(), &[port], &[]);
    let target = format!("127.0.0.1:{listen}");
    let t = std::thread::spawn(move || client(&target, &["concurrent", "10", "1500"]));
    let mut most = 0;
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while !t.is_finished() && std::time::Instant::now() < deadline {
        most = most.max(connections_to(port));
        std::thread::sleep(Duration::from_millis(50));
    }
    let r = t.join().unwrap();
    assert_eq!(r["ok"], 10, "{r}");
    assert!(
        most >= 3,
        "{most} connections to an instance allowing 4 streams for 10 streams"
    );
}

#[test]
fn grpc_over_tls_in_front() {
    let dir = tempdir();
    cert(dir.path(), "grpc", "grpc.test");
    let (c, k) = (dir.path().join("grpc.pem"), dir.path().join("grpc.key"));
    let (_servers, ports) = servers(dir.path(), &["a", "b"], dir.path());
    let (_shoal, listen, _admin) = proxy(
        dir.path(),
        &ports,
        &[
            "--tls-cert",
            c.to_str().unwrap(),
            "--tls-key",
            k.to_str().unwrap(),
        ],
    );
    let target = format!("127.0.0.1:{listen}");
    let tls = ["--tls", c.to_str().unwrap(), "grpc.test"];
    let r = client(&target, &[&["unary", "40"][..], &tls].concat());
    assert_eq!(r["errors"], serde_json::json!([]), "{r}");
    assert_eq!(
        (r["seen"]["a"].as_u64(), r["seen"]["b"].as_u64()),
        (Some(20), Some(20)),
        "{r}"
    );
    assert_eq!(r["trailers"]["x-trailer"], "t", "{r}");
    let r = client(&target, &[&["streams"][..], &tls].concat());
    assert_eq!(r["client"], "abc", "{r}");
    assert_eq!(r["bidi"].as_array().unwrap().len(), 3, "{r}");
}

/// The instances of service `g` as the admin API lists them.
fn instances(admin: u16) -> Vec<Value> {
    api_json(admin, "/api/services/g")["instances"]
        .as_array()
        .unwrap()
        .clone()
}

fn grpc_config(listen: u16, admin: u16, backends: &[u16], health: &str) -> String {
    let list: Vec<String> = backends
        .iter()
        .map(|p| format!("\"127.0.0.1:{p}\""))
        .collect();
    format!(
        "[admin]\nlisten = \"127.0.0.1:{admin}\"\n\n[services.g]\nlisten = \"127.0.0.1:{listen}\"\nprotocol = \"h2c\"\nbackends = [{}]\n{health}",
        list.join(", ")
    )
}

/// Active `grpc.health.v1` checks: an instance answering NOT_SERVING gets no calls until it
/// answers SERVING again.
#[test]
fn grpc_health_checks_take_a_not_serving_instance_out_and_back() {
    let dir = tempdir();
    let (servers, ports) = servers(dir.path(), &["a", "b"], dir.path());
    let (listen, admin) = (free_port(), free_port());
    let health = "[services.g.health]\nkind = \"grpc\"\ngrpc_service = \"shoal.test.Echo\"\ninterval = \"200ms\"\ntimeout = \"500ms\"\nrise = 1\nfall = 1\n";
    let (_shoal, _) = run_shoal(
        dir.path(),
        &grpc_config(listen, admin, &ports, health),
        listen,
    );
    let target = format!("127.0.0.1:{listen}");
    let seen = |n: &str| {
        client(&target, &["unary", "20"])["seen"][n]
            .as_u64()
            .unwrap_or(0)
    };
    wait_until(10, "both healthy", || {
        instances(admin).iter().all(|i| i["healthy"] == true)
    });
    assert!(seen("a") > 0);

    servers[0].0.signal("USR1");
    wait_until(10, "a taken out", || {
        instances(admin).iter().any(|i| i["healthy"] == false)
    });
    assert_eq!(seen("a"), 0, "calls reached a NOT_SERVING instance");

    servers[0].0.signal("USR2");
    wait_until(10, "a back", || {
        instances(admin).iter().all(|i| i["healthy"] == true)
    });
    assert!(seen("a") > 0);
}

/// An instance removed while its server streams run (a config reload dropping it) keeps
/// them to the end: the drain waits for streams, not only for requests.
#[test]
fn an_instance_removed_mid_stream_finishes_its_streams() {
    let dir = tempdir();
    let (_servers, ports) = servers(dir.path(), &["a", "b"], dir.path());
    let (listen, admin) = (free_port(), free_port());
    let drain = "[services.g.timeouts]\ndrain = \"30s\"\n";
    let (shoal, path) = run_shoal(
        dir.path(),
        &grpc_config(listen, admin, &ports, drain),
        listen,
    );
    let target = format!("127.0.0.1:{listen}");
    let t = std::thread::spawn(move || client(&target, &["concurrent", "10", "3000"]));
    wait_until(20, "10 streams open", || {
        instances(admin)
            .iter()
            .map(|i| i["in_flight"].as_u64().unwrap_or(0))
            .sum::<u64>()
            == 10
    });
    std::fs::write(&path, grpc_config(listen, admin, &ports[1..], drain)).unwrap();
    shoal.signal("HUP");
    let r = t.join().unwrap();
    assert_eq!(r["ok"], 10, "streams cut by the scale-in: {r}");
    let firsts: Vec<String> = r["results"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x[0].as_str().unwrap().to_string())
        .collect();
    assert!(
        firsts.iter().any(|f| f.starts_with("a:")),
        "no stream on the removed instance: {r}"
    );
    wait_until(10, "a removed", || instances(admin).len() == 1);
}

/// grpcurl (a Go gRPC client) through shoal: a health check answers SERVING, an unknown
/// service NotFound, and `-v` shows the trailers' status.
#[test]
fn grpcurl_through_shoal() {
    let dir = tempdir();
    let (_servers, ports) = servers(dir.path(), &["a"], dir.path());
    let (_shoal, listen, _admin) = proxy(dir.path(), &ports, &[]);
    let run = |service: &str| {
        let out = Command::new(grpcurl())
            .args(["-plaintext", "-v", "-import-path"])
            .arg(script(""))
            .args(["-proto", "health.proto", "-d"])
            .arg(format!("{{\"service\":\"{service}\"}}"))
            .arg(format!("127.0.0.1:{listen}"))
            .arg("grpc.health.v1.Health/Check")
            .output()
            .unwrap();
        (
            out.status.success(),
            format!(
                "{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            ),
        )
    };
    let (ok, out) = run("shoal.test.Echo");
    assert!(ok && out.contains("\"status\": \"SERVING\""), "{out}");
    assert!(
        out.contains("via: 1.1 shoal"),
        "answered through shoal: {out}"
    );
    let (ok, out) = run("no.such.Service");
    assert!(!ok && out.contains("Code: NotFound"), "{out}");
}

/// One HTTP/1.1 request with `connection: close`; the raw answer (head and body).
fn raw_post(port: u16, path: &str, ctype: &str, body: &[u8]) -> (String, Vec<u8>) {
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    write!(
        s,
        "POST {path} HTTP/1.1\r\nhost: x\r\ncontent-type: {ctype}\r\nx-grpc-web: 1\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
        body.len()
    )
    .unwrap();
    s.write_all(body).unwrap();
    let mut resp = Vec::new();
    let _ = s.read_to_end(&mut resp);
    let split = resp.windows(4).position(|w| w == b"\r\n\r\n").unwrap() + 4;
    let head = String::from_utf8_lossy(&resp[..split]).to_lowercase();
    // De-chunk the body.
    let mut rest = &resp[split..];
    let mut body = Vec::new();
    if head.contains("transfer-encoding: chunked") {
        loop {
            let eol = rest.windows(2).position(|w| w == b"\r\n").unwrap();
            let n = usize::from_str_radix(std::str::from_utf8(&rest[..eol]).unwrap().trim(), 16)
                .unwrap();
            if n == 0 {
                break;
            }
            body.extend_from_slice(&rest[eol + 2..eol + 2 + n]);
            rest = &rest[eol + 2 + n + 2..];
        }
    } else {
        body = rest.to_vec();
    }
    (head, body)
}

/// gRPC-Web frames: (flag, payload) each.
fn web_frames(mut b: &[u8]) -> Vec<(u8, Vec<u8>)> {
    let mut out = Vec::new();
    while b.len() >= 5 {
        let n = u32::from_be_bytes([b[1], b[2], b[3], b[4]]) as usize;
        out.push((b[0], b[5..5 + n].to_vec()));
        b = &b[5 + n..];
    }
    assert!(b.is_empty(), "trailing bytes");
    out
}

/// gRPC-Web (binary and text) from an HTTP/1.1 client becomes gRPC to the instance and
/// back: messages as frames, the status in a final trailers frame.
#[test]
fn grpc_web_binary_and_text_are_translated() {
    use base64::Engine;
    let b64 = base64::engine::general_purpose::STANDARD;
    let dir = tempdir();
    let (_servers, ports) = servers(dir.path(), &["a"], dir.path());
    let (_shoal, listen, _admin) = proxy(dir.path(), &ports, &[]);
    let msg = b"\x00\x00\x00\x00\x02hi";

    let (head, body) = raw_post(
        listen,
        "/shoal.test.Echo/Unary",
        "application/grpc-web+proto",
        msg,
    );
    assert!(head.starts_with("http/1.1 200"), "{head}");
    assert!(
        head.contains("content-type: application/grpc-web+proto"),
        "{head}"
    );
    let frames = web_frames(&body);
    assert_eq!(frames[0], (0, b"a:hi".to_vec()), "{frames:?}");
    let trailers = String::from_utf8_lossy(&frames.last().unwrap().1).to_string();
    assert_eq!(frames.last().unwrap().0, 0x80, "{frames:?}");
    assert!(
        trailers.contains("grpc-status:0") && trailers.contains("x-trailer:t"),
        "{trailers}"
    );

    // Text: base64 both ways; a server stream's messages, then the trailers.
    let count = b64.encode(b"\x00\x00\x00\x00\x013");
    let (head, body) = raw_post(
        listen,
        "/shoal.test.Echo/Count",
        "application/grpc-web-text",
        count.as_bytes(),
    );
    assert!(
        head.contains("content-type: application/grpc-web-text"),
        "{head}"
    );
    let frames = web_frames(&b64.decode(&body).unwrap());
    let msgs: Vec<&[u8]> = frames
        .iter()
        .filter(|f| f.0 == 0)
        .map(|f| &f.1[..])
        .collect();
    assert_eq!(msgs, [&b"a:0"[..], b"a:1", b"a:2"], "{frames:?}");
    assert!(String::from_utf8_lossy(&frames.last().unwrap().1).contains("grpc-status:0"));

    // A failing call: its status reaches the web client.
    let fail = b"\x00\x00\x00\x00\x0bNOT_FOUND:x";
    let (head, body) = raw_post(
        listen,
        "/shoal.test.Echo/Fail",
        "application/grpc-web",
        fail,
    );
    let all = format!("{head}{}", String::from_utf8_lossy(&body));
    assert!(
        all.contains("grpc-status: 5") || all.contains("grpc-status:5"),
        "{all}"
    );
}

/// A process fleet of gRPC servers: a new instance is routed to once it answers gRPC health
/// SERVING (an HTTP/1.1 probe would never pass on them), and calls then reach every one.
#[test]
fn a_process_fleet_of_grpc_servers_starts_on_grpc_health() {
    let dir = tempdir();
    let (listen, admin) = (free_port(), free_port());
    let cfg = format!(
        "[admin]\nlisten = \"127.0.0.1:{admin}\"\n\n[services.g]\nlisten = \"127.0.0.1:{listen}\"\nprotocol = \"h2c\"\n[services.g.fleet]\nprovider = \"process\"\ncommand = \"{} {} - fleet\"\nmin = 2\nmax = 2\nstartup_timeout = \"30s\"\n[services.g.health]\nkind = \"grpc\"\ninterval = \"500ms\"\n",
        python().display(),
        script("server.py").display()
    );
    let (mut shoal, _) = run_shoal(dir.path(), &cfg, listen);
    wait_until(40, "two instances ready", || {
        ready(&api_json(admin, "/api/services/g")) == 2
    });
    let r = client(&format!("127.0.0.1:{listen}"), &["unary", "20"]);
    // Stopped before judging: shoal stops its instances on the way out.
    shoal.signal("TERM");
    assert!(shoal.wait_exit(30).is_some(), "shoal did not stop");
    assert_eq!(r["errors"], serde_json::json!([]), "{r}");
    assert_eq!(r["seen"]["fleet"], 20, "{r}");
}
