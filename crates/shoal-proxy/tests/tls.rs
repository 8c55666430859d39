//! TLS termination: SNI, key types, ALPN, reload, resumption, client certificates, and the
//! fast path over TLS. Certificates are made per test with rcgen in a temp dir.

mod common;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use common::*;
use http_body_util::{BodyExt, Full};
use hyper_util::rt::{TokioExecutor, TokioIo};
use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, SignatureScheme};
use shoal_proxy::config::ServiceConfig;
use shoal_proxy::tls::{CertFiles, ClientAuth, TlsConfig};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;

/// A CA that signs the test's server and client certificates.
struct Ca {
    cert: rcgen::Certificate,
    key: KeyPair,
    dir: PathBuf,
}

impl Ca {
    fn new(dir: &Path) -> Ca {
        let key = KeyPair::generate().unwrap();
        let mut p = CertificateParams::new(Vec::<String>::new()).unwrap();
        p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        p.distinguished_name
            .push(DnType::CommonName, "shoal test CA");
        let cert = p.self_signed(&key).unwrap();
        std::fs::write(dir.join("ca.pem"), cert.pem()).unwrap();
        Ca {
            cert,
            key,
            dir: dir.to_path_buf(),
        }
    }

    /// Writes `{file}.pem` and `{file}.key` for `names` (ECDSA P-256 unless `rsa`);
    /// returns the certificate's DER.
    fn issue(&self, file: &str, names: &[&str], cn: &str, rsa: bool) -> Vec<u8> {
        let key = if rsa {
            KeyPair::generate_for(&rcgen::PKCS_RSA_SHA256).unwrap()
        } else {
            KeyPair::generate().unwrap()
        };
        let mut p = CertificateParams::new(names.iter().map(|s| s.to_string()).collect::<Vec<_>>())
            .unwrap();
        p.distinguished_name.push(DnType::CommonName, cn);
        let cert = p.signed_by(&key, &self.cert, &self.key).unwrap();
        let (c, k) = self.paths(file);
        // Written aside and renamed, as a deploy tool would: a reader never sees half a file.
        std::fs::write(c.with_extension("tmp"), cert.pem()).unwrap();
        std::fs::rename(c.with_extension("tmp"), &c).unwrap();
        std::fs::write(k.with_extension("tmp"), key.serialize_pem()).unwrap();
        std::fs::rename(k.with_extension("tmp"), &k).unwrap();
        cert.der().to_vec()
    }

    fn paths(&self, file: &str) -> (PathBuf, PathBuf) {
        (
            self.dir.join(format!("{file}.pem")),
            self.dir.join(format!("{file}.key")),
        )
    }

    fn files(&self, file: &str) -> CertFiles {
        let (cert, key) = self.paths(file);
        CertFiles { cert, key }
    }
}

fn tls_config(certs: Vec<CertFiles>) -> TlsConfig {
    TlsConfig {
        certs,
        client_ca: None,
        client_auth: ClientAuth::Required,
        identity_header: http::HeaderName::from_static("x-client-cert-subject"),
        watch: Duration::ZERO,
        hsts: None,
    }
}

/// Accepts any server certificate (the tests look at which one came), offering `schemes`.
#[derive(Debug)]
struct AnyCert(Vec<SignatureScheme>);

impl ServerCertVerifier for AnyCert {
    fn verify_server_cert(
        &self,
        _: &CertificateDer<'_>,
        _: &[CertificateDer<'_>],
        _: &ServerName<'_>,
        _: &[u8],
        _: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }
    fn verify_tls12_signature(
        &self,
        m: &[u8],
        c: &CertificateDer<'_>,
        d: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        let p = shoal_proxy::tls::provider();
        rustls::crypto::verify_tls12_signature(m, c, d, &p.signature_verification_algorithms)
    }
    fn verify_tls13_signature(
        &self,
        m: &[u8],
        c: &CertificateDer<'_>,
        d: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        let p = shoal_proxy::tls::provider();
        rustls::crypto::verify_tls13_signature(m, c, d, &p.signature_verification_algorithms)
    }
    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.clone()
    }
}

fn all_schemes() -> Vec<SignatureScheme> {
    shoal_proxy::tls::provider()
        .signature_verification_algorithms
        .supported_schemes()
}

struct ClientOpts<'a> {
    alpn: &'a [&'a str],
    schemes: Vec<SignatureScheme>,
    client_cert: Option<(&'a Ca, &'a str)>,
}

fn client_config(o: ClientOpts<'_>) -> Arc<rustls::ClientConfig> {
    let b = rustls::ClientConfig::builder_with_provider(shoal_proxy::tls::provider())
        .with_safe_default_protocol_versions()
        .unwrap()
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(AnyCert(o.schemes)));
    let mut c = match o.client_cert {
        None => b.with_no_client_auth(),
        Some((ca, file)) => {
            let (cert, key) = ca.paths(file);
            let chain = vec![CertificateDer::from_pem_file(cert).unwrap()];
            let key = PrivateKeyDer::from_pem_file(key).unwrap();
            b.with_client_auth_cert(chain, key).unwrap()
        }
    };
    c.alpn_protocols = o.alpn.iter().map(|p| p.as_bytes().to_vec()).collect();
    Arc::new(c)
}

use rustls::pki_types::pem::PemObject;

fn opts() -> ClientOpts<'static> {
    ClientOpts {
        alpn: &["http/1.1"],
        schemes: all_schemes(),
        client_cert: None,
    }
}

async fn connect(
    addr: SocketAddr,
    sni: &str,
    cfg: Arc<rustls::ClientConfig>,
) -> std::io::Result<TlsStream<TcpStream>> {
    let tcp = TcpStream::connect(addr).await?;
    let name = ServerName::try_from(sni.to_string()).unwrap();
    tokio_rustls::TlsConnector::from(cfg)
        .connect(name, tcp)
        .await
}

/// The end-entity certificate the server presented for `sni`.
async fn presented(addr: SocketAddr, sni: &str, o: ClientOpts<'_>) -> Vec<u8> {
    let s = connect(addr, sni, client_config(o)).await.unwrap();
    s.get_ref().1.peer_certificates().unwrap()[0].to_vec()
}

/// Sends `req` (HTTP/1.1 bytes) and reads until `n` responses' worth of `marker` arrived.
async fn exchange(s: &mut TlsStream<TcpStream>, req: &[u8], until: &str) -> String {
    s.write_all(req).await.unwrap();
    s.flush().await.unwrap();
    let mut out = Vec::new();
    let mut buf = [0u8; 8192];
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while !String::from_utf8_lossy(&out).contains(until) {
        match tokio::time::timeout_at(deadline, s.read(&mut buf)).await {
            Ok(Ok(n)) if n > 0 => out.extend_from_slice(&buf[..n]),
            _ => break,
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

async fn tls_proxy(tls: TlsConfig) -> (Proxy, Arc<Backend>) {
    let b = Backend::start("b1").await;
    let mut cfg = service_config(&[&b], "round-robin");
    cfg.tls = Some(tls);
    (start_proxy(cfg).await, b)
}

#[tokio::test]
async fn sni_picks_exact_wildcard_and_default_certificates() {
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new(dir.path());
    let default = ca.issue("default", &["default.test"], "default", false);
    let exact = ca.issue("exact", &["a.test"], "a", false);
    let wild = ca.issue("wild", &["*.wild.test"], "wild", false);
    let (p, _b) = tls_proxy(tls_config(vec![
        ca.files("default"),
        ca.files("exact"),
        ca.files("wild"),
    ]))
    .await;
    assert_eq!(presented(p.addr, "a.test", opts()).await, exact);
    assert_eq!(presented(p.addr, "A.Test", opts()).await, exact);
    assert_eq!(presented(p.addr, "x.wild.test", opts()).await, wild);
    // A wildcard covers one label only.
    assert_eq!(presented(p.addr, "y.x.wild.test", opts()).await, default);
    assert_eq!(presented(p.addr, "unknown.test", opts()).await, default);
    assert_eq!(presented(p.addr, "default.test", opts()).await, default);
}

#[tokio::test]
async fn ecdsa_and_rsa_for_one_name_are_picked_by_the_clients_schemes() {
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new(dir.path());
    let ecdsa = ca.issue("ec", &["a.test"], "a", false);
    let rsa = ca.issue("rsa", &["a.test"], "a", true);
    let (p, _b) = tls_proxy(tls_config(vec![ca.files("ec"), ca.files("rsa")])).await;
    assert_eq!(presented(p.addr, "a.test", opts()).await, ecdsa);
    let rsa_only = ClientOpts {
        schemes: vec![
            SignatureScheme::RSA_PSS_SHA256,
            SignatureScheme::RSA_PKCS1_SHA256,
        ],
        ..opts()
    };
    assert_eq!(presented(p.addr, "a.test", rsa_only).await, rsa);
}

#[tokio::test]
async fn http11_and_h2_by_alpn_say_https_upstream() {
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new(dir.path());
    ca.issue("default", &["a.test"], "a", false);
    let mut tls = tls_config(vec![ca.files("default")]);
    tls.hsts = Some(Duration::from_secs(600));
    let (p, _b) = tls_proxy(tls).await;

    // HTTP/1.1 on the fast path.
    let mut s = connect(p.addr, "a.test", client_config(opts()))
        .await
        .unwrap();
    assert_eq!(s.get_ref().1.alpn_protocol(), Some(&b"http/1.1"[..]));
    let r = exchange(
        &mut s,
        b"GET /headers HTTP/1.1\r\nhost: a.test\r\nx-forwarded-proto: http\r\n\r\n",
        "}",
    )
    .await;
    assert!(r.starts_with("HTTP/1.1 200"), "{r}");
    assert!(r.contains(r#""x-forwarded-proto": "https""#), "{r}");
    assert!(!r.contains(r#""x-forwarded-proto": "http""#), "{r}");
    assert!(r.contains("proto=https"), "{r}");
    assert!(r.contains("strict-transport-security: max-age=600"), "{r}");

    // HTTP/2 through hyper's server.
    let o = ClientOpts {
        alpn: &["h2", "http/1.1"],
        ..opts()
    };
    let s = connect(p.addr, "a.test", client_config(o)).await.unwrap();
    assert_eq!(s.get_ref().1.alpn_protocol(), Some(&b"h2"[..]));
    let (mut send, conn) = hyper::client::conn::http2::handshake::<_, _, Full<Bytes>>(
        TokioExecutor::new(),
        TokioIo::new(s),
    )
    .await
    .unwrap();
    tokio::spawn(conn);
    let req = http::Request::get("https://a.test/headers")
        .body(Full::new(Bytes::new()))
        .unwrap();
    let resp = send.send_request(req).await.unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["strict-transport-security"], "max-age=600");
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    let body = String::from_utf8_lossy(&body);
    assert!(body.contains(r#""x-forwarded-proto": "https""#), "{body}");
    assert!(body.contains(r#""via": "2 shoal""#), "{body}");
}

#[tokio::test]
async fn pipelined_requests_over_tls_are_answered_on_one_connection() {
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new(dir.path());
    ca.issue("default", &["a.test"], "a", false);
    let (p, b) = tls_proxy(tls_config(vec![ca.files("default")])).await;
    let mut s = connect(p.addr, "a.test", client_config(opts()))
        .await
        .unwrap();
    let one = "GET /x HTTP/1.1\r\nhost: a.test\r\n\r\n";
    let small_body = "POST /y HTTP/1.1\r\nhost: a.test\r\ncontent-length: 5\r\n\r\nhello";
    let req = format!("{one}{small_body}{one}");
    let r = exchange(&mut s, req.as_bytes(), "").await;
    let mut r = r;
    // Read until three answers came (they may arrive in several records).
    while r.matches("HTTP/1.1 200").count() < 3 {
        let more = exchange(&mut s, b"", "HTTP/1.1").await;
        assert!(!more.is_empty(), "connection ended after: {r}");
        r.push_str(&more);
    }
    assert_eq!(r.matches("HTTP/1.1 200").count(), 3, "{r}");
    assert_eq!(b.count(), 3);
    // And the connection stays open for more.
    let r = exchange(&mut s, one.as_bytes(), "b1").await;
    assert!(r.starts_with("HTTP/1.1 200"), "{r}");
}

#[tokio::test]
async fn reload_swaps_certificates_keeps_the_last_good_set_and_sessions_resume() {
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new(dir.path());
    let first = ca.issue("default", &["a.test"], "a", false);
    let (p, _b) = tls_proxy(tls_config(vec![ca.files("default")])).await;
    // A session from before the reload (the ticket comes after the handshake: read once).
    let client = client_config(opts());
    let mut s = connect(p.addr, "a.test", client.clone()).await.unwrap();
    let r = exchange(&mut s, b"GET / HTTP/1.1\r\nhost: a.test\r\n\r\n", "b1").await;
    assert!(r.starts_with("HTTP/1.1 200"), "{r}");
    drop(s);

    let second = ca.issue("default", &["a.test"], "a", false);
    assert_ne!(first, second);
    assert_eq!(p.app.reload_tls().unwrap(), 1);
    assert_eq!(presented(p.addr, "a.test", opts()).await, second);

    let s = connect(p.addr, "a.test", client).await.unwrap();
    assert_eq!(
        s.get_ref().1.handshake_kind(),
        Some(rustls::HandshakeKind::Resumed),
        "a session from before the reload resumes"
    );

    // A broken file: refused, the last good set keeps serving.
    std::fs::write(ca.paths("default").0, "not a certificate").unwrap();
    let e = p.app.reload_tls().unwrap_err();
    assert!(e.contains("default.pem"), "{e}");
    assert_eq!(presented(p.addr, "a.test", opts()).await, second);
    // A key that does not match the certificate: refused too.
    let other = KeyPair::generate().unwrap();
    ca.issue("default", &["a.test"], "a", false);
    std::fs::write(ca.paths("default").1, other.serialize_pem()).unwrap();
    assert!(p.app.reload_tls().is_err());
    assert_eq!(presented(p.addr, "a.test", opts()).await, second);

    let m = p.app.render_metrics();
    assert!(
        m.contains("shoal_tls_reload_failures_total{service=\"test\"} 2"),
        "{m}"
    );
    assert!(m.contains("shoal_tls_certificate_expiry_seconds{service=\"test\",cert="));
    assert!(m.contains("shoal_tls_handshakes_total{service=\"test\",result=\"resumed\"} 1"));
}

#[tokio::test]
async fn changed_files_are_picked_up_by_the_watch() {
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new(dir.path());
    ca.issue("default", &["a.test"], "a", false);
    let mut tls = tls_config(vec![ca.files("default")]);
    tls.watch = Duration::from_millis(50);
    let (p, _b) = tls_proxy(tls).await;
    let second = ca.issue("default", &["a.test"], "a", false);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while presented(p.addr, "a.test", opts()).await != second {
        assert!(tokio::time::Instant::now() < deadline, "not reloaded");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn client_certificates_are_required_and_their_subject_forwarded() {
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new(dir.path());
    ca.issue("default", &["a.test"], "a", false);
    ca.issue("client", &[], "client-one", false);
    let mut tls = tls_config(vec![ca.files("default")]);
    tls.client_ca = Some(dir.path().join("ca.pem"));
    let (p, b) = tls_proxy(tls).await;

    // Without a certificate: no request gets through.
    let refused = match connect(p.addr, "a.test", client_config(opts())).await {
        Err(_) => true,
        // TLS 1.3: the client learns at its first read.
        Ok(mut s) => {
            let r = exchange(&mut s, b"GET / HTTP/1.1\r\nhost: a.test\r\n\r\n", "b1").await;
            !r.contains("200")
        }
    };
    assert!(refused);
    assert_eq!(b.count(), 0);

    // With one: its subject goes upstream; a client's own copy of the header does not.
    let o = ClientOpts {
        client_cert: Some((&ca, "client")),
        ..opts()
    };
    let mut s = connect(p.addr, "a.test", client_config(o)).await.unwrap();
    let r = exchange(
        &mut s,
        b"GET /headers HTTP/1.1\r\nhost: a.test\r\nx-client-cert-subject: CN=admin\r\n\r\n",
        "}",
    )
    .await;
    assert!(r.starts_with("HTTP/1.1 200"), "{r}");
    assert_eq!(r.matches("x-client-cert-subject").count(), 1, "{r}");
    assert!(
        r.contains(r#""x-client-cert-subject": "CN=client-one""#),
        "{r}"
    );
    let m = p.app.render_metrics();
    assert!(
        m.contains("shoal_tls_handshakes_total{service=\"test\",result=\"no_client_cert\"} 1"),
        "{m}"
    );

    // A session from a listener without client certificates (same name, same certificate)
    // does not resume here: it would skip the certificate check.
    let (open, _ob) = tls_proxy(tls_config(vec![ca.files("default")])).await;
    let client = client_config(opts());
    let mut s = connect(open.addr, "a.test", client.clone()).await.unwrap();
    let r = exchange(&mut s, b"GET / HTTP/1.1\r\nhost: a.test\r\n\r\n", "b1").await;
    assert!(r.starts_with("HTTP/1.1 200"), "{r}");
    drop(s);
    let before = b.count();
    let resumed = match connect(p.addr, "a.test", client).await {
        Err(_) => false,
        Ok(mut s) => {
            let kind = s.get_ref().1.handshake_kind();
            let r = exchange(&mut s, b"GET / HTTP/1.1\r\nhost: a.test\r\n\r\n", "b1").await;
            kind == Some(rustls::HandshakeKind::Resumed) || r.contains("200")
        }
    };
    assert!(
        !resumed,
        "a ticket from another listener got past client authentication"
    );
    assert_eq!(b.count(), before);
}

#[tokio::test]
async fn tls_table_errors_name_file_line_and_field() {
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new(dir.path());
    ca.issue("default", &["a.test"], "a", false);
    let path = dir.path().join("shoal.toml");
    let base = "[services.web]\nlisten = \"127.0.0.1:0\"\nbackends = [\"127.0.0.1:1\"]\n\n[services.web.tls]\n";
    // Relative paths are the config file's.
    let ok = format!("{base}cert = \"default.pem\"\nkey = \"default.key\"\n");
    let c = shoal_proxy::Config::parse(&path, &ok).unwrap();
    assert_eq!(c.services[0].scheme(), "https");
    let missing = format!("{base}cert = \"nope.pem\"\nkey = \"default.key\"\n");
    let e = shoal_proxy::Config::parse(&path, &missing).unwrap_err();
    assert_eq!(
        (e.line, e.field.as_str()),
        (6, "services.web.tls.cert"),
        "{e}"
    );
    assert!(e.message.contains("nope.pem"), "{e}");
    let nokey = format!("{base}cert = \"default.pem\"\n");
    let e = shoal_proxy::Config::parse(&path, &nokey).unwrap_err();
    assert_eq!(e.field, "services.web.tls.key", "{e}");
    // The identity header may not be one HTTP gives a meaning to.
    let framing = format!("{ok}identity_header = \"content-length\"\n");
    let e = shoal_proxy::Config::parse(&path, &framing).unwrap_err();
    assert_eq!(e.field, "services.web.tls.identity_header", "{e}");
    let badauth = format!("{ok}client_auth = \"optional\"\n");
    let e = shoal_proxy::Config::parse(&path, &badauth).unwrap_err();
    assert_eq!(
        (e.line, e.field.as_str()),
        (8, "services.web.tls.client_auth"),
        "{e}"
    );
}

#[tokio::test]
async fn tls_below_1_2_is_refused() {
    if std::process::Command::new("openssl")
        .arg("version")
        .output()
        .is_err()
    {
        panic!("openssl CLI is needed (Debian: openssl)");
    }
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new(dir.path());
    ca.issue("default", &["a.test"], "a", false);
    let (p, _b) = tls_proxy(tls_config(vec![ca.files("default")])).await;
    let addr = p.addr.to_string();
    let out = tokio::process::Command::new("openssl")
        .args(["s_client", "-connect", &addr, "-servername", "a.test"])
        .args(["-tls1_1", "-cipher", "DEFAULT:@SECLEVEL=0"])
        .stdin(std::process::Stdio::null())
        .output()
        .await
        .unwrap();
    assert!(!out.status.success());
    // The server saw the hello and refused it (not a client that never sent one).
    let m = p.app.render_metrics();
    assert!(
        m.contains("shoal_tls_handshakes_total{service=\"test\",result=\"protocol\"} 1"),
        "{m}\n{}",
        String::from_utf8_lossy(&out.stdout)
    );
}

#[tokio::test]
async fn a_plain_listener_can_redirect_everything_to_https() {
    let b = Backend::start("b1").await;
    let mut cfg = service_config(&[&b], "round-robin");
    cfg.https_redirect = Some(8443);
    let p = start_proxy(cfg).await;
    // The fast path.
    let r = raw(
        p.addr,
        b"GET /a?b=1 HTTP/1.1\r\nhost: example.com:8080\r\nconnection: close\r\n\r\n",
    )
    .await;
    assert!(r.starts_with("HTTP/1.1 308"), "{r}");
    assert!(
        r.contains("location: https://example.com:8443/a?b=1\r\n"),
        "{r}"
    );
    // The general path (HTTP/1.0 is handed over) gives the same answer.
    let r = raw(p.addr, b"GET /a HTTP/1.0\r\nhost: [::1]:8080\r\n\r\n").await;
    assert!(
        r.starts_with("HTTP/1.0 308") || r.starts_with("HTTP/1.1 308"),
        "{r}"
    );
    assert!(
        r.to_ascii_lowercase()
            .contains("location: https://[::1]:8443/a\r\n"),
        "{r}"
    );
    // Malformed requests are still refused, never redirected.
    let r = raw(p.addr, b"GET / HTTP/1.1\r\n\r\n").await;
    assert!(r.starts_with("HTTP/1.1 400"), "{r}");
    assert_eq!(b.count(), 0);
}

/// An HTTPS instance with the certificate `file` of `ca`; answers with the subject of the
/// client certificate it got ("none" without one).
async fn tls_backend(ca: &Ca, file: &str, client_ca: bool) -> SocketAddr {
    let (cert, key) = ca.paths(file);
    let chain = vec![CertificateDer::from_pem_file(cert).unwrap()];
    let key = PrivateKeyDer::from_pem_file(key).unwrap();
    let b = rustls::ServerConfig::builder_with_provider(shoal_proxy::tls::provider())
        .with_safe_default_protocol_versions()
        .unwrap();
    let b = if client_ca {
        let mut roots = rustls::RootCertStore::empty();
        roots
            .add(CertificateDer::from_pem_file(ca.dir.join("ca.pem")).unwrap())
            .unwrap();
        let v = rustls::server::WebPkiClientVerifier::builder_with_provider(
            Arc::new(roots),
            shoal_proxy::tls::provider(),
        )
        .allow_unauthenticated()
        .build()
        .unwrap();
        b.with_client_cert_verifier(v)
    } else {
        b.with_no_client_auth()
    };
    let cfg = Arc::new(b.with_single_cert(chain, key).unwrap());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let (tcp, _) = listener.accept().await.unwrap();
            let acceptor = tokio_rustls::TlsAcceptor::from(cfg.clone());
            tokio::spawn(async move {
                let Ok(s) = acceptor.accept(tcp).await else {
                    return;
                };
                let who = s
                    .get_ref()
                    .1
                    .peer_certificates()
                    .map_or("none".to_string(), |c| format!("{} bytes", c[0].len()));
                let svc = hyper::service::service_fn(move |_req| {
                    let who = who.clone();
                    async move {
                        Ok::<_, std::convert::Infallible>(http::Response::new(Full::new(
                            Bytes::from(format!("tls-backend client-cert={who}")),
                        )))
                    }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(s), svc)
                    .await;
            });
        }
    });
    addr
}

fn upstream(raw: &str, dir: &Path) -> Arc<shoal_proxy::tls::UpstreamTls> {
    let raw: shoal_proxy::tls::RawUpstreamTls = toml::from_str(raw).unwrap();
    Arc::new(raw.build(dir).unwrap())
}

#[tokio::test]
async fn https_instances_are_verified_by_default() {
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new(dir.path());
    ca.issue("backend", &["backend.test"], "backend", false);
    ca.issue("client", &[], "shoal", false);
    let addr = tls_backend(&ca, "backend", true).await;
    let start = |tls: Arc<shoal_proxy::tls::UpstreamTls>| async move {
        let mut cfg = ServiceConfig::quick(
            "test",
            "127.0.0.1:0".parse().unwrap(),
            shoal_balance::Algorithm::RoundRobin,
        );
        cfg.backends
            .push(shoal_proxy::config::BackendSpec { addr, weight: 1 });
        cfg.upstream_tls = Some(tls);
        start_proxy(cfg).await
    };
    let c = client();
    // Verified against the CA, with the configured name; the fast path hands it on.
    let p = start(upstream(
        "sni = \"backend.test\"\nca = \"ca.pem\"",
        dir.path(),
    ))
    .await;
    let (s, body) = get(&c, p.addr, "/").await;
    assert_eq!((s, body.as_str()), (200, "tls-backend client-cert=none"));
    // With a client certificate.
    let p = start(upstream(
        "sni = \"backend.test\"\nca = \"ca.pem\"\ncert = \"client.pem\"\nkey = \"client.key\"",
        dir.path(),
    ))
    .await;
    let (s, body) = get(&c, p.addr, "/").await;
    assert_eq!(s, 200);
    assert!(
        body.starts_with("tls-backend client-cert=") && !body.ends_with("none"),
        "{body}"
    );
    // The wrong name fails verification: 502, nothing sent.
    let p = start(upstream(
        "sni = \"other.test\"\nca = \"ca.pem\"",
        dir.path(),
    ))
    .await;
    assert_eq!(get(&c, p.addr, "/").await.0, 502);
    // An untrusted CA too, unless verification is turned off.
    let other = tempfile::tempdir().unwrap();
    Ca::new(other.path());
    let ca2 = other.path().join("ca.pem");
    let p = start(upstream(
        &format!("sni = \"backend.test\"\nca = {ca2:?}"),
        dir.path(),
    ))
    .await;
    assert_eq!(get(&c, p.addr, "/").await.0, 502);
    let p = start(upstream("verify = false", dir.path())).await;
    assert_eq!(get(&c, p.addr, "/").await.0, 200);
}

#[tokio::test]
async fn pipelined_requests_after_chunked_and_large_bodies_over_tls_share_one_connection() {
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new(dir.path());
    ca.issue("default", &["a.test"], "a", false);
    let (p, b) = tls_proxy(tls_config(vec![ca.files("default")])).await;
    let mut s = connect(p.addr, "a.test", client_config(opts()))
        .await
        .unwrap();
    let big = vec![b'x'; 1 << 20];
    let mut req = Vec::new();
    req.extend_from_slice(
        b"POST /up HTTP/1.1\r\nhost: a.test\r\ntransfer-encoding: chunked\r\n\r\n",
    );
    req.extend_from_slice(b"5\r\nhello\r\n0\r\n\r\n");
    req.extend_from_slice(b"GET /after-chunked HTTP/1.1\r\nhost: a.test\r\n\r\n");
    req.extend_from_slice(
        format!(
            "POST /big HTTP/1.1\r\nhost: a.test\r\ncontent-length: {}\r\n\r\n",
            big.len()
        )
        .as_bytes(),
    );
    req.extend_from_slice(&big);
    req.extend_from_slice(b"GET /after-big HTTP/1.1\r\nhost: a.test\r\n\r\n");
    let (mut rd, mut wr) = tokio::io::split(s);
    let writer = tokio::spawn(async move {
        wr.write_all(&req).await.unwrap();
        wr.flush().await.unwrap();
        wr
    });
    let mut out = Vec::new();
    let mut buf = [0u8; 8192];
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while String::from_utf8_lossy(&out)
        .matches("HTTP/1.1 200")
        .count()
        < 4
    {
        match tokio::time::timeout_at(deadline, rd.read(&mut buf)).await {
            Ok(Ok(n)) if n > 0 => out.extend_from_slice(&buf[..n]),
            _ => break,
        }
    }
    let r = String::from_utf8_lossy(&out);
    assert_eq!(r.matches("HTTP/1.1 200").count(), 4, "{r}");
    assert_eq!(b.count(), 4);
    assert_eq!(
        b.body_bytes.load(std::sync::atomic::Ordering::SeqCst),
        5 + (1 << 20)
    );
    s = rd.unsplit(writer.await.unwrap());
    let r = exchange(&mut s, b"GET /again HTTP/1.1\r\nhost: a.test\r\n\r\n", "b1").await;
    assert!(r.starts_with("HTTP/1.1 200"), "{r}");
}
