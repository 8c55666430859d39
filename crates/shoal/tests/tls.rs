//! `shoal proxy --tls-cert/--tls-key` as a child process, checked with real TLS clients:
//! `openssl s_client` (SNI, resumption across a SIGHUP reload) and curl (HTTP/2 and
//! HTTP/1.1 over TLS).

mod common;

#[path = "../../shoal-cache/tests/common/redis.rs"]
mod redis;

use std::io::Write;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::*;

/// `openssl s_client` with SNI `name`, sending one request; returns its output.
fn s_client(port: u16, name: &str, extra: &[&str]) -> String {
    let mut child = Command::new("openssl")
        .args(["s_client", "-connect", &format!("127.0.0.1:{port}")])
        .args(["-servername", name])
        .args(extra)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    // A request, so the session ticket (sent after the handshake) is read before the end.
    // stdin stays open until the server has answered and closed: s_client quits at the end
    // of its input, and would race the answer (and the ticket) otherwise.
    let req = format!("GET / HTTP/1.1\r\nhost: {name}\r\nconnection: close\r\n\r\n");
    let mut stdin = child.stdin.take().unwrap();
    stdin.write_all(req.as_bytes()).unwrap();
    let mut out = String::new();
    std::io::Read::read_to_string(&mut child.stdout.take().unwrap(), &mut out).unwrap();
    drop(stdin);
    child.wait().unwrap();
    out
}

/// The CN of the certificate the server showed.
fn subject(out: &str) -> String {
    out.lines()
        .find_map(|l| l.strip_prefix("subject=CN = "))
        .unwrap_or("")
        .to_string()
}

fn curl(port: u16, version: &str) -> String {
    let out = Command::new("curl")
        .args([
            "-sk",
            version,
            "-o",
            "/dev/null",
            "-w",
            "%{http_code} %{http_version}",
        ])
        .args(["--resolve", &format!("a.test:{port}:127.0.0.1")])
        .arg(format!("https://a.test:{port}/work?cpu_ms=0"))
        .output()
        .expect("curl");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn quick_mode_serves_tls_by_sni_over_h2_and_h1_and_reloads_on_sighup() {
    let dir = tempdir();
    let d = dir.path();
    cert(d, "default", "default.test");
    cert(d, "a", "a.test");
    cert(d, "wild", "*.wild.test");
    let (_demo, backend) = demo(d, "i1");
    let (listen, admin) = (free_port(), free_port());
    let log = std::fs::File::create(d.join("shoal.log")).unwrap();
    let mut cmd = Command::new(SHOAL);
    cmd.args(["proxy", "--listen", &format!("127.0.0.1:{listen}")])
        .args(["--backend", &format!("127.0.0.1:{backend}")])
        .args(["--admin", &format!("127.0.0.1:{admin}")])
        // Only SIGHUP reloads here.
        .args(["--tls-watch", "0"]);
    for f in ["default", "a", "wild"] {
        cmd.arg("--tls-cert")
            .arg(d.join(format!("{f}.pem")))
            .arg("--tls-key")
            .arg(d.join(format!("{f}.key")));
    }
    let proc = Proc(cmd.stdout(Stdio::null()).stderr(log).spawn().unwrap());
    wait_port(listen, 20);

    assert_eq!(subject(&s_client(listen, "a.test", &[])), "a.test");
    assert_eq!(
        subject(&s_client(listen, "x.wild.test", &[])),
        "*.wild.test"
    );
    assert_eq!(
        subject(&s_client(listen, "other.test", &[])),
        "default.test"
    );

    assert_eq!(curl(listen, "--http2"), "200 2");
    assert_eq!(curl(listen, "--http1.1"), "200 1.1");

    // A session from before the reload resumes after it; new handshakes show the new cert.
    let sess = d.join("session");
    let sess = sess.to_str().unwrap();
    let first = s_client(listen, "other.test", &["-sess_out", sess]);
    assert!(first.contains("New, TLS"), "{first}");
    cert(d, "default", "renewed.test");
    proc.signal("HUP");
    let deadline = Instant::now() + Duration::from_secs(10);
    while subject(&s_client(listen, "other.test", &[])) != "renewed.test" {
        assert!(Instant::now() < deadline, "certificate not reloaded");
        std::thread::sleep(Duration::from_millis(50));
    }
    let again = s_client(listen, "other.test", &["-sess_in", sess]);
    assert!(again.contains("Reused, TLS"), "{again}");

    let (code, metrics) = http(
        format!("127.0.0.1:{admin}").parse().unwrap(),
        "GET",
        "/metrics",
        &[],
        "",
    );
    assert_eq!(code, 200);
    assert!(
        metrics.contains("shoal_tls_handshakes_total{service=\"default\",result=\"resumed\"}"),
        "{metrics}"
    );
}

/// Replicas sharing a Redis (`[cluster]`) share their session-ticket keys: a session begun
/// on one replica resumes on another.
#[test]
fn a_session_begun_on_one_replica_resumes_on_another() {
    let redis = redis::RedisServer::start();
    let dir = tempdir();
    let d = dir.path();
    cert(d, "site", "site.test");
    let (_demo, backend) = demo(d, "i1");
    let start = |id: &str| {
        let sub = d.join(id);
        std::fs::create_dir(&sub).unwrap();
        let (listen, admin) = (free_port(), free_port());
        let cfg = format!(
            "[admin]\nlisten = \"127.0.0.1:{admin}\"\n\n[services.web]\nlisten = \"127.0.0.1:{listen}\"\n\
             backends = [\"127.0.0.1:{backend}\"]\n\n[services.web.tls]\ncert = \"{}\"\nkey = \"{}\"\n\n\
             [cluster]\nredis = \"{}\"\nid = \"{id}\"\n",
            d.join("site.pem").display(),
            d.join("site.key").display(),
            redis.url()
        );
        let (p, _) = run_shoal(&sub, &cfg, listen);
        (p, listen, admin)
    };
    let (_a, la, aa) = start("a");
    let (_b, lb, ab) = start("b");
    let shared_keys = |admin: u16| {
        get(admin, "/metrics")
            .1
            .lines()
            .find_map(|l| {
                l.strip_prefix("shoal_tls_shared_ticket_keys ")?
                    .parse::<f64>()
                    .ok()
            })
            .unwrap_or(0.0)
    };
    wait_until(10, "shared ticket keys on both", || {
        shared_keys(aa) >= 1.0 && shared_keys(ab) >= 1.0
    });
    let sess = d.join("session");
    let sess = sess.to_str().unwrap();
    let first = s_client(la, "site.test", &["-sess_out", sess]);
    assert!(first.contains("New, TLS"), "{first}");
    let again = s_client(lb, "site.test", &["-sess_in", sess]);
    assert!(again.contains("Reused, TLS"), "{again}");
    // TLS 1.2 tickets too.
    let first = s_client(lb, "site.test", &["-tls1_2", "-sess_out", sess]);
    assert!(first.contains("New, TLSv1.2"), "{first}");
    let again = s_client(la, "site.test", &["-tls1_2", "-sess_in", sess]);
    assert!(again.contains("Reused, TLSv1.2"), "{again}");
}
