//! TLS termination (rustls, aws-lc-rs): a listener's certificates chosen by SNI (exact name,
//! then `*.` wildcard, then the first pair as the default; an ECDSA and an RSA key for one
//! name are both kept and picked by the client's signature schemes), TLS 1.2 and 1.3 only,
//! ALPN `h2` and `http/1.1`, optional client certificates, and hot reload from the files.
//!
//! A reload (file watch, SIGHUP, `POST /api/tls/reload`) loads and checks every file first
//! and swaps the whole set only if all of it is good; otherwise the last good set keeps
//! serving. The session-ticket key and the session cache are process-wide and outlive
//! reloads, so sessions resume across them.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock, Weak};
use std::time::{Duration, SystemTime};

use arc_swap::ArcSwap;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::{ClientHello, ResolvesServerCert, WebPkiClientVerifier};
use rustls::sign::CertifiedKey;
use rustls::ServerConfig;
use serde::Deserialize;

use crate::config::Dur;

/// The one crypto provider of the process (aws-lc-rs), installed as the default.
pub fn provider() -> Arc<CryptoProvider> {
    static P: OnceLock<Arc<CryptoProvider>> = OnceLock::new();
    P.get_or_init(|| {
        let p = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
        // Someone (a test harness) may have installed one already: that one stays.
        let _ = CryptoProvider::install_default(p.as_ref().clone());
        p
    })
    .clone()
}

/// When a listener asks for client certificates.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ClientAuth {
    /// A handshake without a valid client certificate fails.
    Required,
    /// A client may present one; without it the request goes on with no identity.
    Optional,
}

/// One certificate chain and its key (PEM files).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CertFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// A listener's `tls` table, validated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsConfig {
    /// The first pair is the default certificate; the others are chosen by the names in
    /// their certificates (subject alternative names).
    pub certs: Vec<CertFiles>,
    /// CA bundle client certificates must chain to; set: client certificates are asked for.
    pub client_ca: Option<PathBuf>,
    pub client_auth: ClientAuth,
    /// The header that carries a verified client certificate's subject upstream; always
    /// removed from client requests on this listener.
    pub identity_header: http::HeaderName,
    /// How often the files' modification times are checked (0: never; SIGHUP and the admin
    /// API still reload).
    pub watch: Duration,
    /// `Strict-Transport-Security: max-age=...` on every response of this listener.
    pub hsts: Option<Duration>,
}

/// The `tls` table as written.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawTls {
    #[serde(default)]
    pub cert: Option<PathBuf>,
    #[serde(default)]
    pub key: Option<PathBuf>,
    /// More pairs (SNI); `cert`/`key`, if given, come first (the default).
    #[serde(default)]
    pub certs: Vec<CertFiles>,
    #[serde(default)]
    pub client_ca: Option<PathBuf>,
    #[serde(default)]
    pub client_auth: Option<ClientAuth>,
    #[serde(default)]
    pub identity_header: Option<String>,
    #[serde(default)]
    pub watch: Option<Dur>,
    #[serde(default)]
    pub hsts: Option<Dur>,
}

/// Default [`TlsConfig::identity_header`].
pub const DEFAULT_IDENTITY_HEADER: &str = "x-client-cert-subject";
/// Default [`TlsConfig::watch`].
pub const DEFAULT_WATCH: Duration = Duration::from_secs(2);

impl RawTls {
    /// Validates the table (relative paths are taken from `base`, the config file's folder)
    /// and loads every file once, so `shoal check` catches a bad certificate. Errors are
    /// `(field, message)`.
    pub fn validate(self, base: &Path) -> Result<TlsConfig, (&'static str, String)> {
        let abs = |p: PathBuf| if p.is_relative() { base.join(p) } else { p };
        let mut certs = Vec::new();
        match (self.cert, self.key) {
            (Some(cert), Some(key)) => certs.push(CertFiles {
                cert: abs(cert),
                key: abs(key),
            }),
            (None, None) => {}
            (Some(_), None) => return Err(("key", "`cert` needs a `key`".into())),
            (None, Some(_)) => return Err(("cert", "`key` needs a `cert`".into())),
        }
        certs.extend(self.certs.into_iter().map(|c| CertFiles {
            cert: abs(c.cert),
            key: abs(c.key),
        }));
        if certs.is_empty() {
            return Err((
                "cert",
                "a tls table needs at least one `cert` and `key`".into(),
            ));
        }
        let identity_header = self
            .identity_header
            .as_deref()
            .unwrap_or(DEFAULT_IDENTITY_HEADER);
        let identity_header =
            http::HeaderName::from_bytes(identity_header.as_bytes()).map_err(|_| {
                (
                    "identity_header",
                    format!("invalid header name {identity_header:?}"),
                )
            })?;
        // Only a name with no meaning to HTTP itself: framing, routing, hop-by-hop and
        // forwarding headers would let the identity rewrite the request.
        if !crate::hygiene::plain_header_name(&identity_header) {
            return Err((
                "identity_header",
                format!("{identity_header} has a meaning of its own in HTTP; pick an x- name"),
            ));
        }
        if self.client_auth.is_some() && self.client_ca.is_none() {
            return Err(("client_auth", "needs `client_ca`".into()));
        }
        let cfg = TlsConfig {
            certs,
            client_ca: self.client_ca.map(abs),
            client_auth: self.client_auth.unwrap_or(ClientAuth::Required),
            identity_header,
            watch: self.watch.map_or(DEFAULT_WATCH, |d| d.0),
            hsts: self.hsts.map(|d| d.0),
        };
        Material::load(&cfg).map_err(|e| ("cert", e))?;
        Ok(cfg)
    }
}

/// One loaded certificate: its key for signing, names and expiry.
struct Loaded {
    key: Arc<CertifiedKey>,
    names: Vec<String>,
    not_after: i64,
    file: String,
}

/// Everything a listener's files hold, loaded and checked.
pub(crate) struct Material {
    certs: Vec<Loaded>,
    client_roots: Option<Arc<rustls::RootCertStore>>,
}

fn read(path: &Path) -> Result<Vec<u8>, String> {
    std::fs::read(path).map_err(|e| format!("{}: {e}", path.display()))
}

impl Material {
    pub(crate) fn load(cfg: &TlsConfig) -> Result<Material, String> {
        let provider = provider();
        let mut certs = Vec::new();
        for pair in &cfg.certs {
            let file = pair.cert.display().to_string();
            let pem = read(&pair.cert)?;
            let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(&pem)
                .collect::<Result<_, _>>()
                .map_err(|e| format!("{file}: {e}"))?;
            if chain.is_empty() {
                return Err(format!("{file}: no certificate in the file"));
            }
            let kpem = read(&pair.key)?;
            let key = PrivateKeyDer::from_pem_slice(&kpem)
                .map_err(|e| format!("{}: {e}", pair.key.display()))?;
            let (names, not_after) =
                names_and_expiry(&chain[0]).map_err(|e| format!("{file}: {e}"))?;
            let ck = CertifiedKey::from_der(chain, key, &provider)
                .map_err(|e| format!("{} and {}: {e}", pair.cert.display(), pair.key.display()))?;
            certs.push(Loaded {
                key: Arc::new(ck),
                names,
                not_after,
                file,
            });
        }
        let client_roots = match &cfg.client_ca {
            None => None,
            Some(p) => {
                let pem = read(p)?;
                let mut roots = rustls::RootCertStore::empty();
                for c in CertificateDer::pem_slice_iter(&pem) {
                    let c = c.map_err(|e| format!("{}: {e}", p.display()))?;
                    roots.add(c).map_err(|e| format!("{}: {e}", p.display()))?;
                }
                if roots.is_empty() {
                    return Err(format!("{}: no CA certificate in the file", p.display()));
                }
                Some(Arc::new(roots))
            }
        };
        Ok(Material {
            certs,
            client_roots,
        })
    }
}

/// The DNS names (SAN, else CN) and `notAfter` (Unix seconds) of a certificate.
fn names_and_expiry(der: &CertificateDer<'_>) -> Result<(Vec<String>, i64), String> {
    let (_, cert) = x509_parser::parse_x509_certificate(der).map_err(|e| e.to_string())?;
    let mut names = Vec::new();
    if let Ok(Some(san)) = cert.subject_alternative_name() {
        for n in &san.value.general_names {
            if let x509_parser::extensions::GeneralName::DNSName(d) = n {
                names.push(d.to_ascii_lowercase());
            }
        }
    }
    if names.is_empty() {
        for cn in cert.subject().iter_common_name() {
            if let Ok(s) = cn.as_str() {
                names.push(s.to_ascii_lowercase());
            }
        }
    }
    Ok((names, cert.validity().not_after.timestamp()))
}

/// The subject of a verified client certificate, as forwarded upstream: RFC 4514 form
/// (`CN=alice,O=Example`), every special or non-printable character escaped, so a name
/// cannot read as another (a CN of `x,O=Admins` is `CN=x\,O\=Admins`). `None` when the
/// name cannot be read.
fn subject(der: &CertificateDer<'_>) -> Option<String> {
    let (_, cert) = x509_parser::parse_x509_certificate(der).ok()?;
    let registry = x509_parser::objects::oid_registry();
    let mut out = String::new();
    for (i, rdn) in cert.subject().iter_rdn().enumerate() {
        if i > 0 {
            out.push(',');
        }
        for (j, atv) in rdn.iter().enumerate() {
            if j > 0 {
                out.push('+');
            }
            let oid = atv.attr_type();
            match x509_parser::objects::oid2abbrev(oid, registry) {
                Ok(a) => out.push_str(a),
                Err(_) => out.push_str(&oid.to_id_string()),
            }
            out.push('=');
            escape_rdn_value(atv.as_str().ok()?, &mut out);
        }
    }
    Some(out)
}

/// RFC 4514 section 2.4 escaping, plus every control or non-ASCII byte as `\XX` (a header
/// value carries visible ASCII only).
fn escape_rdn_value(v: &str, out: &mut String) {
    let last = v.len().saturating_sub(1);
    for (i, b) in v.bytes().enumerate() {
        let special = matches!(b, b',' | b'+' | b'"' | b'\\' | b'<' | b'>' | b';' | b'=')
            || (i == 0 && (b == b' ' || b == b'#'))
            || (i == last && b == b' ');
        if special {
            out.push('\\');
            out.push(b as char);
        } else if (0x21..0x7f).contains(&b) || b == b' ' {
            out.push(b as char);
        } else {
            out.push_str(&format!("\\{b:02X}"));
        }
    }
}

/// Keys by name: exact, wildcard suffix (`*.example.com` under `.example.com`), default.
#[derive(Default)]
struct Names {
    exact: HashMap<String, Vec<Arc<CertifiedKey>>>,
    wildcard: HashMap<String, Vec<Arc<CertifiedKey>>>,
    default: Vec<Arc<CertifiedKey>>,
}

impl Names {
    fn build(m: &Material) -> Names {
        let mut n = Names::default();
        let first_names = &m.certs[0].names;
        for (i, c) in m.certs.iter().enumerate() {
            // The default name's other keys (an RSA twin of an ECDSA default) are defaults too.
            if i == 0 || c.names.iter().any(|x| first_names.contains(x)) {
                n.default.push(c.key.clone());
            }
            for name in &c.names {
                let (map, k) = match name.strip_prefix('*') {
                    Some(suffix) => (&mut n.wildcard, suffix.to_string()),
                    None => (&mut n.exact, name.clone()),
                };
                map.entry(k).or_default().push(c.key.clone());
            }
        }
        n
    }

    fn candidates(&self, sni: Option<&str>) -> &[Arc<CertifiedKey>] {
        if let Some(name) = sni {
            let name = name.to_ascii_lowercase();
            if let Some(v) = self.exact.get(&name) {
                return v;
            }
            // One label only: `*.example.com` matches `a.example.com`, not `a.b.example.com`.
            if let Some(dot) = name.find('.') {
                if let Some(v) = self.wildcard.get(&name[dot..]) {
                    return v;
                }
            }
        }
        &self.default
    }
}

#[derive(Debug)]
struct Resolver(ArcSwap<Names>);

impl std::fmt::Debug for Names {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Names")
            .field("exact", &self.exact.keys().collect::<Vec<_>>())
            .field("wildcard", &self.wildcard.keys().collect::<Vec<_>>())
            .finish()
    }
}

impl ResolvesServerCert for Resolver {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        let names = self.0.load();
        let keys = names.candidates(hello.server_name());
        let schemes = hello.signature_schemes();
        // The first key the client can verify a signature of (ECDSA listed first wins).
        keys.iter()
            .find(|k| k.key.choose_scheme(schemes).is_some())
            .or(keys.first())
            .cloned()
    }
}

/// Process-wide ticket key rotation and session cache for listeners without client
/// certificates: shared by them and across reloads, so a session resumes on a listener whose
/// certificates were reloaded.
fn resumption() -> (
    Arc<dyn rustls::server::ProducesTickets>,
    Arc<dyn rustls::server::StoresServerSessions>,
) {
    type R = (
        Arc<dyn rustls::server::ProducesTickets>,
        Arc<dyn rustls::server::StoresServerSessions>,
    );
    static S: OnceLock<R> = OnceLock::new();
    S.get_or_init(|| {
        // Shared by replicas once `[cluster]` installs keys (`tickets.rs`).
        let ticketer: Arc<dyn rustls::server::ProducesTickets> = crate::tickets::shared();
        (
            ticketer,
            rustls::server::ServerSessionMemoryCache::new(4096),
        )
    })
    .clone()
}

fn server_config(
    cfg: &TlsConfig,
    m: &Material,
    resolver: Arc<Resolver>,
) -> Result<ServerConfig, String> {
    let builder = ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .map_err(|e| e.to_string())?;
    let builder = match &m.client_roots {
        None => builder.with_no_client_auth(),
        Some(roots) => {
            let v = WebPkiClientVerifier::builder_with_provider(roots.clone(), provider());
            let v = match cfg.client_auth {
                ClientAuth::Required => v,
                ClientAuth::Optional => v.allow_unauthenticated(),
            };
            builder.with_client_cert_verifier(v.build().map_err(|e| e.to_string())?)
        }
    };
    let mut sc = builder.with_cert_resolver(resolver);
    sc.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    // The server's suite order (AES-GCM, then ChaCha20), as scanners expect of an edge.
    sc.ignore_client_order = true;
    if m.client_roots.is_none() {
        let (ticketer, cache) = resumption();
        sc.ticketer = ticketer;
        sc.session_storage = cache;
    } else {
        // A resumed session keeps the client certificate it started with, unchecked: tickets
        // shared with another listener (or kept across a change of `client_ca`) would let a
        // client skip this listener's verification. Own keys per config, dropped on reload.
        sc.ticketer = rustls::crypto::aws_lc_rs::Ticketer::new().map_err(|e| e.to_string())?;
        sc.session_storage = rustls::server::ServerSessionMemoryCache::new(1024);
    }
    Ok(sc)
}

/// Handshake outcomes counted per listener.
pub const HANDSHAKE_RESULTS: [&str; 8] = [
    "full",
    "resumed",
    "protocol",
    "no_client_cert",
    "bad_client_cert",
    "alert",
    "timeout",
    "io",
];

/// A listener's TLS: the current server config (swapped whole on reload) and its figures.
pub struct Terminator {
    service: String,
    cfg: TlsConfig,
    resolver: Arc<Resolver>,
    server: ArcSwap<ServerConfig>,
    /// (file, notAfter) of the serving set.
    expiry: Mutex<Vec<(String, i64)>>,
    /// Modification times the serving set was loaded from.
    mtimes: Mutex<Vec<Option<SystemTime>>>,
    handshakes: [AtomicU64; HANDSHAKE_RESULTS.len()],
    pub reloads: AtomicU64,
    pub reload_failures: AtomicU64,
}

impl std::fmt::Debug for Terminator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Terminator")
            .field("service", &self.service)
            .finish()
    }
}

/// What the connection's handshake established, for the request phases.
#[derive(Debug, Clone)]
pub struct Session {
    /// A verified client certificate's subject.
    pub identity: Option<http::HeaderValue>,
    /// The header it goes upstream in.
    pub identity_header: http::HeaderName,
    /// ALPN chose HTTP/2.
    pub h2: bool,
}

impl Terminator {
    /// Loads the files and starts the watch (a task that ends with the terminator).
    pub fn new(service: &str, cfg: &TlsConfig) -> Result<Arc<Terminator>, String> {
        let m = Material::load(cfg)?;
        let resolver = Arc::new(Resolver(ArcSwap::from_pointee(Names::build(&m))));
        let server = server_config(cfg, &m, resolver.clone())?;
        let t = Arc::new(Terminator {
            service: service.to_string(),
            cfg: cfg.clone(),
            resolver,
            server: ArcSwap::from_pointee(server),
            expiry: Mutex::new(
                m.certs
                    .iter()
                    .map(|c| (c.file.clone(), c.not_after))
                    .collect(),
            ),
            mtimes: Mutex::new(mtimes(cfg)),
            handshakes: Default::default(),
            reloads: AtomicU64::new(0),
            reload_failures: AtomicU64::new(0),
        });
        if !cfg.watch.is_zero() && tokio::runtime::Handle::try_current().is_ok() {
            tokio::spawn(watch(Arc::downgrade(&t), cfg.watch));
        }
        Ok(t)
    }

    pub fn config(&self) -> &TlsConfig {
        &self.cfg
    }

    /// Re-reads the files; swaps to them only if every one is good.
    pub fn reload(&self) -> Result<(), String> {
        let stamps = mtimes(&self.cfg);
        let r = Material::load(&self.cfg).and_then(|m| {
            let names = Names::build(&m);
            // The client CA may have changed too: a new server config, same resolver.
            let sc = server_config(&self.cfg, &m, self.resolver.clone())?;
            Ok((m, names, sc))
        });
        *self.mtimes.lock().expect("lock") = stamps;
        match r {
            Ok((m, names, sc)) => {
                self.resolver.0.store(Arc::new(names));
                self.server.store(Arc::new(sc));
                *self.expiry.lock().expect("lock") = m
                    .certs
                    .iter()
                    .map(|c| (c.file.clone(), c.not_after))
                    .collect();
                self.reloads.fetch_add(1, Ordering::Relaxed);
                tracing::info!(service = %self.service, "tls certificates reloaded");
                Ok(())
            }
            Err(e) => {
                self.reload_failures.fetch_add(1, Ordering::Relaxed);
                tracing::error!(service = %self.service, error = %e, "tls reload refused; the last good certificates keep serving");
                Err(e)
            }
        }
    }

    /// Runs the handshake on `tcp` within `timeout`, counting the outcome.
    pub(crate) async fn accept(
        &self,
        tcp: tokio::net::TcpStream,
        timeout: Duration,
    ) -> Option<(
        tokio_rustls::server::TlsStream<tokio::net::TcpStream>,
        Session,
    )> {
        let acceptor = tokio_rustls::TlsAcceptor::from(self.server.load_full());
        let result = match tokio::time::timeout(timeout, acceptor.accept(tcp)).await {
            Ok(Ok(s)) => Ok(s),
            Ok(Err(e)) => Err(failure(&e)),
            Err(_) => Err("timeout"),
        };
        let stream = match result {
            Ok(s) => s,
            Err(reason) => {
                self.count(reason);
                tracing::debug!(service = %self.service, reason, "tls handshake failed");
                return None;
            }
        };
        let conn = stream.get_ref().1;
        let resumed = matches!(conn.handshake_kind(), Some(rustls::HandshakeKind::Resumed));
        self.count(if resumed { "resumed" } else { "full" });
        let identity = match conn.peer_certificates().and_then(|c| c.first()) {
            None => None,
            Some(der) => match subject(der).and_then(|s| http::HeaderValue::from_str(&s).ok()) {
                Some(v) => Some(v),
                None => {
                    // A verified certificate whose identity cannot be forwarded: refuse the
                    // connection rather than let it through as anonymous.
                    self.count("bad_client_cert");
                    tracing::debug!(service = %self.service, "client certificate subject unreadable");
                    return None;
                }
            },
        };
        let session = Session {
            h2: conn.alpn_protocol() == Some(b"h2"),
            identity,
            identity_header: self.cfg.identity_header.clone(),
        };
        Some((stream, session))
    }

    fn count(&self, reason: &str) {
        if let Some(i) = HANDSHAKE_RESULTS.iter().position(|r| *r == reason) {
            self.handshakes[i].fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Handshakes by outcome.
    pub fn handshakes(&self) -> impl Iterator<Item = (&'static str, u64)> + '_ {
        HANDSHAKE_RESULTS
            .iter()
            .zip(&self.handshakes)
            .map(|(r, n)| (*r, n.load(Ordering::Relaxed)))
    }

    /// (certificate file, notAfter in Unix seconds) of the serving set.
    pub fn expiry(&self) -> Vec<(String, i64)> {
        self.expiry.lock().expect("lock").clone()
    }
}

/// Why a handshake failed, as a counter label.
fn failure(e: &std::io::Error) -> &'static str {
    use rustls::Error as E;
    match e.get_ref().and_then(|i| i.downcast_ref::<E>()) {
        Some(E::PeerIncompatible(_)) => "protocol",
        Some(E::NoCertificatesPresented) => "no_client_cert",
        Some(E::InvalidCertificate(_)) => "bad_client_cert",
        Some(E::AlertReceived(_)) => "alert",
        Some(_) => "protocol",
        None => "io",
    }
}

/// `https://HOST[:port]TARGET` for a plain listener's `https_redirect` (the request's host
/// without its port; 443 is left out).
pub(crate) fn https_location(
    authority: Option<&[u8]>,
    port: u16,
    target: &str,
) -> Result<String, crate::error::ProxyError> {
    let a = authority.and_then(|a| std::str::from_utf8(a).ok()).ok_or(
        crate::error::ProxyError::BadRequest("no host to redirect to"),
    )?;
    let host = match a.strip_prefix('[') {
        Some(v6) => &a[..v6.find(']').map_or(a.len(), |i| i + 2)],
        None => a.split(':').next().unwrap_or(a),
    };
    Ok(if port == 443 {
        format!("https://{host}{target}")
    } else {
        format!("https://{host}:{port}{target}")
    })
}

fn mtimes(cfg: &TlsConfig) -> Vec<Option<SystemTime>> {
    let stamp = |p: &Path| std::fs::metadata(p).and_then(|m| m.modified()).ok();
    cfg.certs
        .iter()
        .flat_map(|c| [stamp(&c.cert), stamp(&c.key)])
        .chain(cfg.client_ca.as_deref().map(stamp))
        .collect()
}

/// Reloads when a file's modification time changes. A half-written pair fails the check
/// and is tried again at the next change (or tick after it).
async fn watch(t: Weak<Terminator>, every: Duration) {
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tick.tick().await;
    loop {
        tick.tick().await;
        let Some(t) = t.upgrade() else { return };
        let now = mtimes(&t.cfg);
        let changed = *t.mtimes.lock().expect("lock") != now;
        if changed {
            let _ = t.reload();
        }
    }
}

impl crate::h1::ClientIo for tokio_rustls::server::TlsStream<tokio::net::TcpStream> {
    const PLAIN: bool = false;
    fn tcp(&self) -> &tokio::net::TcpStream {
        self.get_ref().0
    }
}

/// A cluster's `upstream_tls` table as written: TLS to its instances.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawUpstreamTls {
    /// The name sent as SNI and verified; default: the instance's IP address.
    #[serde(default)]
    pub sni: Option<String>,
    /// CA bundle (PEM) instances' certificates must chain to; default: the system's.
    #[serde(default)]
    pub ca: Option<PathBuf>,
    /// Verify instances' certificates (default true; false only for tests and labs).
    #[serde(default)]
    pub verify: Option<bool>,
    /// A client certificate (PEM) and key shoal presents to instances.
    #[serde(default)]
    pub cert: Option<PathBuf>,
    #[serde(default)]
    pub key: Option<PathBuf>,
}

/// Where Debian (and most distributions) keep the system CA bundle.
pub const SYSTEM_CA_BUNDLE: &str = "/etc/ssl/certs/ca-certificates.crt";

/// TLS to a cluster's instances: the client config built from its table (files loaded
/// when the config is).
#[derive(Clone)]
pub struct UpstreamTls {
    raw: RawUpstreamTls,
    pub(crate) client: Arc<rustls::ClientConfig>,
    /// The same, offering `h2` only, and `h2` then `http/1.1` (protocol `auto`).
    client_h2: Arc<rustls::ClientConfig>,
    client_auto: Arc<rustls::ClientConfig>,
    sni: Option<rustls::pki_types::ServerName<'static>>,
}

impl PartialEq for UpstreamTls {
    fn eq(&self, o: &Self) -> bool {
        self.raw == o.raw
    }
}

impl std::fmt::Debug for UpstreamTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.raw.fmt(f)
    }
}

impl RawUpstreamTls {
    /// Loads the files (relative to `base`); errors are `(field, message)`.
    pub fn build(self, base: &Path) -> Result<UpstreamTls, (&'static str, String)> {
        let abs = |p: &PathBuf| {
            if p.is_relative() {
                base.join(p)
            } else {
                p.clone()
            }
        };
        let sni = match &self.sni {
            None => None,
            Some(n) => Some(
                rustls::pki_types::ServerName::try_from(n.clone())
                    .map_err(|_| ("sni", format!("invalid server name {n:?}")))?,
            ),
        };
        let builder = rustls::ClientConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
            .map_err(|e| ("ca", e.to_string()))?;
        let builder = if self.verify == Some(false) {
            builder
                .dangerous()
                .with_custom_certificate_verifier(Arc::new(NoVerify))
        } else {
            let ca = self
                .ca
                .as_ref()
                .map_or_else(|| PathBuf::from(SYSTEM_CA_BUNDLE), abs);
            let pem = read(&ca).map_err(|e| ("ca", e))?;
            let mut roots = rustls::RootCertStore::empty();
            for c in CertificateDer::pem_slice_iter(&pem) {
                let c = c.map_err(|e| ("ca", format!("{}: {e}", ca.display())))?;
                roots
                    .add(c)
                    .map_err(|e| ("ca", format!("{}: {e}", ca.display())))?;
            }
            if roots.is_empty() {
                return Err(("ca", format!("{}: no CA certificate", ca.display())));
            }
            builder.with_root_certificates(roots)
        };
        let mut client = match (&self.cert, &self.key) {
            (None, None) => builder.with_no_client_auth(),
            (Some(c), Some(k)) => {
                let (c, k) = (abs(c), abs(k));
                let pem = read(&c).map_err(|e| ("cert", e))?;
                let chain = CertificateDer::pem_slice_iter(&pem)
                    .collect::<Result<Vec<_>, _>>()
                    .map_err(|e| ("cert", format!("{}: {e}", c.display())))?;
                let kpem = read(&k).map_err(|e| ("key", e))?;
                let key = PrivateKeyDer::from_pem_slice(&kpem)
                    .map_err(|e| ("key", format!("{}: {e}", k.display())))?;
                builder
                    .with_client_auth_cert(chain, key)
                    .map_err(|e| ("cert", e.to_string()))?
            }
            (Some(_), None) => return Err(("key", "`cert` needs a `key`".into())),
            (None, Some(_)) => return Err(("cert", "`key` needs a `cert`".into())),
        };
        // ALPN per cluster protocol: HTTP/1.1, h2, or the instance's pick.
        let mut client_h2 = client.clone();
        client_h2.alpn_protocols = vec![b"h2".to_vec()];
        let mut client_auto = client.clone();
        client_auto.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        client.alpn_protocols = vec![b"http/1.1".to_vec()];
        Ok(UpstreamTls {
            raw: self,
            client: Arc::new(client),
            client_h2: Arc::new(client_h2),
            client_auto: Arc::new(client_auto),
            sni,
        })
    }
}

impl UpstreamTls {
    /// The TLS handshake with an instance at `addr` over `tcp`.
    pub(crate) async fn connect(
        &self,
        addr: std::net::SocketAddr,
        tcp: tokio::net::TcpStream,
    ) -> std::io::Result<tokio_rustls::client::TlsStream<tokio::net::TcpStream>> {
        self.connect_for(addr, tcp, crate::config::Protocol::Http1)
            .await
    }

    /// The handshake offering the ALPN protocols of `protocol`.
    pub(crate) async fn connect_for(
        &self,
        addr: std::net::SocketAddr,
        tcp: tokio::net::TcpStream,
        protocol: crate::config::Protocol,
    ) -> std::io::Result<tokio_rustls::client::TlsStream<tokio::net::TcpStream>> {
        use crate::config::Protocol;
        let name = self
            .sni
            .clone()
            .unwrap_or_else(|| rustls::pki_types::ServerName::IpAddress(addr.ip().into()));
        let client = match protocol {
            Protocol::Http1 | Protocol::H2c => &self.client,
            Protocol::H2 => &self.client_h2,
            Protocol::Auto => &self.client_auto,
        };
        tokio_rustls::TlsConnector::from(client.clone())
            .connect(name, tcp)
            .await
    }
}

/// Accepts any instance certificate (`verify = false`); signatures are still checked.
#[derive(Debug)]
struct NoVerify;

impl rustls::client::danger::ServerCertVerifier for NoVerify {
    fn verify_server_cert(
        &self,
        _: &CertificateDer<'_>,
        _: &[CertificateDer<'_>],
        _: &rustls::pki_types::ServerName<'_>,
        _: &[u8],
        _: rustls::pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        Ok(rustls::client::danger::ServerCertVerified::assertion())
    }
    fn verify_tls12_signature(
        &self,
        m: &[u8],
        c: &CertificateDer<'_>,
        d: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            m,
            c,
            d,
            &provider().signature_verification_algorithms,
        )
    }
    fn verify_tls13_signature(
        &self,
        m: &[u8],
        c: &CertificateDer<'_>,
        d: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            m,
            c,
            d,
            &provider().signature_verification_algorithms,
        )
    }
    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        provider()
            .signature_verification_algorithms
            .supported_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn subject_values_cannot_read_as_other_attributes() {
        let esc = |v: &str| {
            let mut s = String::new();
            escape_rdn_value(v, &mut s);
            s
        };
        assert_eq!(esc("alice"), "alice");
        assert_eq!(esc("mallory,O=Admins"), "mallory\\,O\\=Admins");
        assert_eq!(esc("a+b;c\"d\\e<f>"), "a\\+b\\;c\\\"d\\\\e\\<f\\>");
        assert_eq!(esc(" #x "), "\\ #x\\ ");
        assert_eq!(esc("line\r\nX-Admin: 1"), "line\\0D\\0AX-Admin: 1");
        assert_eq!(esc("é"), "\\C3\\A9");
        // Always a valid header value.
        for v in ["a\u{0}b", "\u{7f}", "tab\there"] {
            assert!(http::HeaderValue::from_str(&esc(v)).is_ok(), "{v:?}");
        }
    }
}
