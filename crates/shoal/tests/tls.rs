//! `shoal proxy --tls-cert/--tls-key` as a child process, checked with real TLS clients:
//! `openssl s_client` (SNI, resumption across a SIGHUP reload) and curl (HTTP/2 and
//! HTTP/1.1 over TLS).

mod common;

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
