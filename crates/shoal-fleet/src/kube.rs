//! The `kubernetes` provider: sizes a Deployment through its `scale` subresource and routes
//! to its pods as their EndpointSlices list them.
//!
//! - **Membership** comes from a list + watch of the EndpointSlices labelled
//!   `kubernetes.io/service-name=SERVICE` (or a configured selector): the watch resumes from
//!   the last `resourceVersion` (bookmarks keep it fresh) and re-lists after `410 Gone`.
//!   `ready` → routable; `terminating` (serving or not) → drained (no new requests); gone →
//!   removed. The pod name is the instance id.
//! - **Desired count**: the scale subresource is read every second; a write carries the
//!   read `resourceVersion` as its precondition, and a `409 Conflict` is re-read, never
//!   overwritten. A count changed outside shoal is logged and counted, then adopted
//!   (`external_scale = "respect"`) or written back (`"reconcile"`).
//! - **Scale-in without failures**: shoal picks the pods (least in flight, newest first),
//!   stops routing to them and waits for their in-flight requests (up to the drain timeout),
//!   sets their `controller.kubernetes.io/pod-deletion-cost` to the lowest value, and only
//!   then lowers the replica count, so the ReplicaSet controller deletes exactly those pods.
//!
//! - **Usage** from `metrics.k8s.io` when the cluster serves it (metrics-server): each pod's
//!   CPU rate and memory, integrated into the cumulative CPU the autoscaler and the vertical
//!   recommender read, with the pod's CPU request as the allotment (as the HPA does). Without
//!   it, request-based targets only (said in `shoal status`).
//! - **Vertical** `mode = "auto"` resizes pods in place through the `pods/resize` subresource
//!   where the cluster serves it (InPlacePodVerticalScaling), pods joining later included;
//!   else the recommendation only.
//!
//! The API is spoken directly (hyper + serde_json, k8s JSON as `serde_json::Value`): shoal
//! makes a handful of calls, and the `kube` + `k8s-openapi` crates would add their tree
//! (kube 2.0 with k8s-openapi 0.26 took 1 min 16 s of a clean debug build here) and
//! generated types for every API kind. TLS is rustls with the aws-lc-rs provider,
//! the binary's one crypto provider; the server is verified against the cluster's CA from the
//! kubeconfig or the service account; credentials are a bearer token (fixed, a rotating
//! token file, or an `exec` plugin's) or a client certificate.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use http::{Method, Request};
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use serde_json::{json, Value};
use shoal_proxy::metrics::Exposition;
use tokio::sync::{watch, Notify};

use crate::cgroup::Size;
use crate::config::{FleetSpec, PortRef, VerticalMode};
use crate::provider::{BoxFuture, Member, Membership, Phase, Provider};
use crate::usage::Usage;

/// The lowest pod-deletion-cost (an int32): the ReplicaSet controller deletes these first.
pub const LOWEST_DELETION_COST: &str = "-2147483648";
pub const DELETION_COST: &str = "controller.kubernetes.io/pod-deletion-cost";

/// Where the API server is and how to authenticate.
#[derive(Clone, PartialEq, Default)]
pub struct Endpoint {
    /// `https://host:port` or `http://host:port`, no trailing slash.
    pub server: String,
    pub token: Option<String>,
    /// Where the token comes from, re-read on every call: service-account tokens rotate
    /// (bound tokens expire within hours), and a token read once would stop working.
    pub token_file: Option<PathBuf>,
    /// The context's namespace, if it names one.
    pub namespace: Option<String>,
    /// PEM of the CA that signed the API server's certificate (https).
    pub ca_pem: Option<Vec<u8>>,
    /// PEM client certificate and key (kubeconfigs of kind, minikube, kubeadm).
    pub client_cert: Option<(Vec<u8>, Vec<u8>)>,
    /// A credential plugin that prints the bearer token (EKS, GKE, AKS kubeconfigs).
    pub exec: Option<ExecPlugin>,
}

/// A kubeconfig `exec` credential plugin (`client.authentication.k8s.io`): the command
/// prints an `ExecCredential` whose `status.token` is used until its `expirationTimestamp`
/// (or until the API server answers 401).
#[derive(Clone, PartialEq, Default)]
pub struct ExecPlugin {
    pub api_version: String,
    pub command: String,
    pub args: Vec<String>,
    pub env: Vec<(String, String)>,
}

impl std::fmt::Debug for ExecPlugin {
    // Plugin environments carry secrets (profiles, keys): names only.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ExecPlugin")
            .field("api_version", &self.api_version)
            .field("command", &self.command)
            .field("args", &self.args)
            .field(
                "env",
                &self.env.iter().map(|(k, _)| k.as_str()).collect::<Vec<_>>(),
            )
            .finish()
    }
}

/// A credential plugin's token and when it expires.
type ExecToken = (String, Option<SystemTime>);

/// After a failed plugin run, calls fail with its error this long before it runs again.
const EXEC_BACKOFF: Duration = Duration::from_secs(5);

/// How long a credential plugin may take.
const EXEC_TIMEOUT: Duration = Duration::from_secs(30);

/// Runs `plugin`; the token and when it expires.
async fn run_exec(plugin: &ExecPlugin) -> Result<(String, Option<SystemTime>), String> {
    let info = json!({"apiVersion": plugin.api_version, "kind": "ExecCredential",
                      "spec": {"interactive": false}});
    let mut cmd = tokio::process::Command::new(&plugin.command);
    cmd.args(&plugin.args)
        .envs(plugin.env.iter().map(|(k, v)| (k, v)))
        .env("KUBERNETES_EXEC_INFO", info.to_string())
        .stdin(std::process::Stdio::null())
        .kill_on_drop(true);
    let out = tokio::time::timeout(EXEC_TIMEOUT, cmd.output())
        .await
        .map_err(|_| {
            format!(
                "credential plugin {}: no answer within {EXEC_TIMEOUT:?}",
                plugin.command
            )
        })?
        .map_err(|e| format!("credential plugin {}: {e}", plugin.command))?;
    if !out.status.success() {
        let err = String::from_utf8_lossy(&out.stderr);
        return Err(format!(
            "credential plugin {} failed ({}): {}",
            plugin.command,
            out.status,
            err.trim().chars().take(300).collect::<String>()
        ));
    }
    parse_exec_credential(&out.stdout)
        .map_err(|e| format!("credential plugin {}: {e}", plugin.command))
}

/// The token and expiry of an `ExecCredential`.
pub fn parse_exec_credential(out: &[u8]) -> Result<(String, Option<SystemTime>), String> {
    let v: Value =
        serde_json::from_slice(out).map_err(|e| format!("not an ExecCredential: {e}"))?;
    if v["kind"] != "ExecCredential" {
        return Err("not an ExecCredential".into());
    }
    let status = &v["status"];
    let token = status["token"]
        .as_str()
        .filter(|t| !t.is_empty())
        .ok_or("the ExecCredential has no status.token (client certificates from plugins are not supported)")?;
    // An unreadable expiry is taken as none (the token is used until a 401), not as a
    // reason to throw a valid token away.
    let expiry = status["expirationTimestamp"]
        .as_str()
        .and_then(parse_rfc3339);
    Ok((token.to_string(), expiry))
}

/// `2026-12-07T20:16:20Z` (fractions and numeric offsets too) as a time.
pub fn parse_rfc3339(t: &str) -> Option<SystemTime> {
    let b = t.as_bytes();
    if b.len() < 20
        || b[4] != b'-'
        || b[7] != b'-'
        || !matches!(b[10], b'T' | b't' | b' ')
        || b[13] != b':'
        || b[16] != b':'
    {
        return None;
    }
    let num = |r: std::ops::Range<usize>| {
        let f = t.get(r)?;
        f.bytes()
            .all(|c| c.is_ascii_digit())
            .then(|| f.parse::<i64>().ok())?
    };
    let (y, mo, d) = (num(0..4)?, num(5..7)?, num(8..10)?);
    let (h, mi, se) = (num(11..13)?, num(14..16)?, num(17..19)?);
    if !(1..=12).contains(&mo) || !(1..=31).contains(&d) || h > 23 || mi > 59 || se > 60 {
        return None;
    }
    let mut rest = &t[19..];
    if let Some(frac) = rest.strip_prefix('.') {
        let n = frac.bytes().take_while(u8::is_ascii_digit).count();
        if n == 0 {
            return None;
        }
        rest = &frac[n..];
    }
    let offset = match rest {
        "Z" | "z" => 0,
        _ => {
            let sign = match rest.as_bytes().first()? {
                b'+' => 1,
                b'-' => -1,
                _ => return None,
            };
            if rest.len() != 6 || rest.as_bytes()[3] != b':' {
                return None;
            }
            sign * (rest[1..3].parse::<i64>().ok()? * 3600 + rest[4..6].parse::<i64>().ok()? * 60)
        }
    };
    // Days from the civil date (Howard Hinnant's algorithm).
    let y = if mo <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (mo + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    let secs = days * 86_400 + h * 3600 + mi * 60 + se - offset;
    u64::try_from(secs)
        .ok()
        .map(|s| UNIX_EPOCH + Duration::from_secs(s))
}

impl std::fmt::Debug for Endpoint {
    // Credentials never reach a log line.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Endpoint")
            .field("server", &self.server)
            .field("token", &self.token.as_ref().map(|_| "<redacted>"))
            .field("token_file", &self.token_file)
            .field("namespace", &self.namespace)
            .field(
                "client_cert",
                &self.client_cert.as_ref().map(|_| "<redacted>"),
            )
            .field("exec", &self.exec)
            .finish()
    }
}

impl Endpoint {
    /// The bearer token as of now: the token file's current content, else the fixed token.
    fn current_token(&self) -> Option<String> {
        self.token_file
            .as_ref()
            .and_then(|f| std::fs::read_to_string(f).ok())
            .map(|t| t.trim().to_string())
            .filter(|t| !t.is_empty())
            .or_else(|| self.token.clone())
    }
}

/// Longest silence on an open watch before it is taken for a dead connection.
const WATCH_IDLE: Duration = Duration::from_secs(320);

/// `KUBECONFIG` (its first file) when set, else in-cluster config (the service account),
/// else `~/.kube/config`. An explicit kubeconfig wins over in-cluster (as with kubectl), so a
/// pod can be pointed at another cluster or a `kubectl proxy`.
pub fn endpoint_from_env() -> Result<Endpoint, String> {
    let explicit = std::env::var_os("KUBECONFIG").filter(|v| !v.is_empty());
    if explicit.is_none() {
        if let (Ok(host), Ok(port)) = (
            std::env::var("KUBERNETES_SERVICE_HOST"),
            std::env::var("KUBERNETES_SERVICE_PORT"),
        ) {
            let dir = "/var/run/secrets/kubernetes.io/serviceaccount";
            if let Ok(token) = std::fs::read_to_string(format!("{dir}/token")) {
                let ca = std::fs::read(format!("{dir}/ca.crt"))
                    .map_err(|e| format!("{dir}/ca.crt: {e}"))?;
                let host = if host.contains(':') {
                    format!("[{host}]")
                } else {
                    host
                };
                return Ok(Endpoint {
                    server: format!("https://{host}:{port}"),
                    token: Some(token.trim().to_string()),
                    token_file: Some(PathBuf::from(format!("{dir}/token"))),
                    ca_pem: Some(ca),
                    ..Endpoint::default()
                });
            }
        }
    }
    let path = match explicit {
        Some(v) => std::env::split_paths(&v)
            .next()
            .ok_or("KUBECONFIG is empty")?,
        None => {
            PathBuf::from(std::env::var_os("HOME").ok_or("HOME is not set")?).join(".kube/config")
        }
    };
    let text = std::fs::read_to_string(&path)
        .map_err(|e| format!("kubeconfig {}: {e}", path.display()))?;
    parse_kubeconfig(&text).map_err(|e| format!("kubeconfig {}: {e}", path.display()))
}

/// The current context's server, token and namespace from a kubeconfig (YAML or JSON).
pub fn parse_kubeconfig(text: &str) -> Result<Endpoint, String> {
    let v: Value = serde_yaml_ng::from_str(text).map_err(|e| e.to_string())?;
    let current = v["current-context"].as_str().ok_or("no current-context")?;
    let named = |list: &str, name: &str| -> Option<Value> {
        v[list]
            .as_array()?
            .iter()
            .find(|x| x["name"] == name)
            .cloned()
    };
    let ctx = named("contexts", current).ok_or(format!("no context {current:?}"))?;
    let ctx = &ctx["context"];
    let cluster_name = ctx["cluster"].as_str().ok_or("context without cluster")?;
    let cluster = named("clusters", cluster_name).ok_or(format!("no cluster {cluster_name:?}"))?;
    let server = cluster["cluster"]["server"]
        .as_str()
        .ok_or("cluster without server")?
        .trim_end_matches('/')
        .to_string();
    let user = ctx["user"]
        .as_str()
        .and_then(|u| named("users", u))
        .map(|u| u["user"].clone())
        .unwrap_or(Value::Null);
    if user.get("auth-provider").is_some() {
        return Err("auth-provider plugins were removed from Kubernetes: use an exec plugin, a token, tokenFile or client certificate".into());
    }
    let exec = match user.get("exec").filter(|e| !e.is_null()) {
        None => None,
        Some(e) => {
            if e["interactiveMode"] == "Always" {
                return Err("an exec plugin with interactiveMode: Always needs a terminal".into());
            }
            let strings = |v: &Value| -> Vec<String> {
                v.as_array()
                    .into_iter()
                    .flatten()
                    .filter_map(|x| x.as_str().map(String::from))
                    .collect()
            };
            Some(ExecPlugin {
                api_version: e["apiVersion"]
                    .as_str()
                    .unwrap_or("client.authentication.k8s.io/v1")
                    .to_string(),
                command: e["command"]
                    .as_str()
                    .filter(|c| !c.is_empty())
                    .ok_or("exec plugin without a command")?
                    .to_string(),
                args: strings(&e["args"]),
                env: e["env"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .filter_map(|x| {
                        Some((
                            x["name"].as_str()?.to_string(),
                            x["value"].as_str()?.to_string(),
                        ))
                    })
                    .collect(),
            })
        }
    };
    if cluster["cluster"]["insecure-skip-tls-verify"] == true {
        return Err(
            "insecure-skip-tls-verify is not supported: give the cluster's certificate-authority"
                .into(),
        );
    }
    let token_file = match user["token"].as_str() {
        Some(_) => None,
        None => user["tokenFile"].as_str().map(PathBuf::from),
    };
    let token = match (user["token"].as_str(), user["tokenFile"].as_str()) {
        (Some(t), _) => Some(t.to_string()),
        (None, Some(f)) => Some(
            std::fs::read_to_string(f)
                .map_err(|e| format!("tokenFile {f}: {e}"))?
                .trim()
                .to_string(),
        ),
        _ => None,
    };
    let ca_pem = data_or_file(&cluster["cluster"], "certificate-authority")?;
    let client_cert = match (
        data_or_file(&user, "client-certificate")?,
        data_or_file(&user, "client-key")?,
    ) {
        (Some(c), Some(k)) => Some((c, k)),
        (None, None) => None,
        _ => return Err("client-certificate and client-key come together".into()),
    };
    Ok(Endpoint {
        server,
        token,
        token_file,
        namespace: ctx["namespace"].as_str().map(String::from),
        ca_pem,
        client_cert,
        exec,
    })
}

/// `FIELD-data` (base64) or `FIELD` (a file path) of a kubeconfig entry.
fn data_or_file(v: &Value, field: &str) -> Result<Option<Vec<u8>>, String> {
    use base64::Engine;
    if let Some(d) = v[format!("{field}-data")].as_str() {
        return base64::engine::general_purpose::STANDARD
            .decode(d.trim())
            .map(Some)
            .map_err(|e| format!("{field}-data: {e}"));
    }
    match v[field].as_str() {
        Some(path) => std::fs::read(path)
            .map(Some)
            .map_err(|e| format!("{field} {path}: {e}")),
        None => Ok(None),
    }
}

/// The TLS settings for an https API server: its CA only (no system roots: a cluster's
/// certificate is signed by its own CA), the client certificate if any; aws-lc-rs.
fn tls_config(ep: &Endpoint) -> Result<Arc<rustls::ClientConfig>, String> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let ca = ep.ca_pem.as_ref().ok_or(
        "an https API server needs the cluster's certificate-authority (or -data) in the kubeconfig",
    )?;
    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_slice_iter(ca) {
        let c = c.map_err(|e| format!("certificate-authority: {e}"))?;
        roots
            .add(c)
            .map_err(|e| format!("certificate-authority: {e}"))?;
    }
    if roots.is_empty() {
        return Err("certificate-authority holds no certificate".into());
    }
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_root_certificates(roots);
    let cfg = match &ep.client_cert {
        None => builder.with_no_client_auth(),
        Some((cert, key)) => {
            let certs = CertificateDer::pem_slice_iter(cert)
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| format!("client-certificate: {e}"))?;
            let key = PrivateKeyDer::from_pem_slice(key).map_err(|e| format!("client-key: {e}"))?;
            builder
                .with_client_auth_cert(certs, key)
                .map_err(|e| format!("client certificate: {e}"))?
        }
    };
    Ok(Arc::new(cfg))
}

/// A minimal JSON client for the Kubernetes API: one HTTP/1.1 connection per call (a call
/// a second and one long watch need no pool), over TLS for https servers.
#[derive(Clone)]
pub struct KubeClient {
    ep: Endpoint,
    /// `host:port` to connect to.
    addr: String,
    /// The `Host` header.
    authority: String,
    tls: Option<(
        tokio_rustls::TlsConnector,
        rustls::pki_types::ServerName<'static>,
    )>,
    /// The exec plugin's last token and its expiry.
    exec_token: Arc<tokio::sync::Mutex<Option<ExecToken>>>,
    /// The plugin's last failure and when: calls within a few seconds fail with it rather
    /// than run the plugin again.
    exec_failed: Arc<Mutex<Option<(String, Instant)>>>,
}

/// A non-2xx answer or a transport failure.
#[derive(Debug, Clone)]
pub struct ApiError {
    /// HTTP status, 0 for a transport failure.
    pub code: u16,
    pub message: String,
}

impl std::fmt::Display for ApiError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.code == 0 {
            write!(f, "{}", self.message)
        } else {
            write!(f, "HTTP {}: {}", self.code, self.message)
        }
    }
}

const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

static USER_AGENT: std::sync::OnceLock<String> = std::sync::OnceLock::new();

/// With replicas: requests say `shoal/ID` (visible ASCII only), so the API server's audit
/// log tells the replicas apart.
pub fn set_user_agent(id: &str) {
    let id: String = id
        .chars()
        .filter(|c| c.is_ascii_graphic())
        .take(100)
        .collect();
    let _ = USER_AGENT.set(format!("shoal/{id}"));
}

impl KubeClient {
    pub fn new(ep: Endpoint) -> Result<KubeClient, String> {
        let uri: http::Uri = ep
            .server
            .parse()
            .map_err(|e| format!("server {}: {e}", ep.server))?;
        let https = match uri.scheme_str() {
            Some("https") => true,
            Some("http") => false,
            _ => return Err(format!("server {}: not an http(s) URL", ep.server)),
        };
        let host = uri.host().ok_or(format!("server {}: no host", ep.server))?;
        let port = uri.port_u16().unwrap_or(if https { 443 } else { 80 });
        let authority = uri.authority().map(|a| a.to_string()).unwrap_or_default();
        let tls = if https {
            let name = rustls::pki_types::ServerName::try_from(
                host.trim_start_matches('[')
                    .trim_end_matches(']')
                    .to_string(),
            )
            .map_err(|e| format!("server {}: {e}", ep.server))?;
            Some((tokio_rustls::TlsConnector::from(tls_config(&ep)?), name))
        } else {
            None
        };
        Ok(KubeClient {
            addr: format!("{host}:{port}"),
            authority,
            tls,
            ep,
            exec_token: Arc::default(),
            exec_failed: Arc::default(),
        })
    }

    /// Sends one request on a new connection.
    async fn send(
        &self,
        req: Request<Full<Bytes>>,
    ) -> Result<http::Response<hyper::body::Incoming>, String> {
        let tcp = tokio::net::TcpStream::connect(&self.addr)
            .await
            .map_err(|e| format!("connect {}: {e}", self.addr))?;
        let _ = tcp.set_nodelay(true);
        match &self.tls {
            None => send_on(tcp, req).await,
            Some((connector, name)) => {
                let tls = connector
                    .connect(name.clone(), tcp)
                    .await
                    .map_err(|e| format!("TLS to {}: {e}", self.addr))?;
                send_on(tls, req).await
            }
        }
    }

    /// The bearer token for the next call: the exec plugin's (run again once expired, with a
    /// minute to spare, or after a 401), else the token file's or the fixed one.
    pub async fn token(&self) -> Result<Option<String>, ApiError> {
        let Some(plugin) = &self.ep.exec else {
            return Ok(self.ep.current_token());
        };
        let mut cached = self.exec_token.lock().await;
        if let Some((t, expiry)) = cached.as_ref() {
            let fresh = expiry.is_none_or(|e| {
                e.duration_since(SystemTime::now())
                    .is_ok_and(|left| left > Duration::from_secs(60))
            });
            if fresh {
                return Ok(Some(t.clone()));
            }
        }
        if let Some((message, at)) = self.exec_failed.lock().expect("exec").clone() {
            if at.elapsed() < EXEC_BACKOFF {
                return Err(ApiError { code: 0, message });
            }
        }
        let (token, expiry) = match run_exec(plugin).await {
            Ok(t) => t,
            Err(message) => {
                *self.exec_failed.lock().expect("exec") = Some((message.clone(), Instant::now()));
                return Err(ApiError { code: 0, message });
            }
        };
        *self.exec_failed.lock().expect("exec") = None;
        *cached = Some((token.clone(), expiry));
        Ok(Some(token))
    }

    /// After a 401 for `used`: that token is not taken again (a newer one stays).
    async fn unauthorized(&self, used: Option<&str>) {
        let mut cached = self.exec_token.lock().await;
        if cached.as_ref().map(|(t, _)| t.as_str()) == used {
            *cached = None;
        }
    }

    fn request(
        &self,
        method: Method,
        path: &str,
        ct: &str,
        body: Bytes,
        token: Option<String>,
    ) -> Request<Full<Bytes>> {
        let mut b = Request::builder()
            .method(method)
            .uri(path)
            .header("host", &self.authority)
            .header("accept", "application/json")
            .header(
                "user-agent",
                USER_AGENT.get().map_or("shoal", |s| s.as_str()),
            );
        if !ct.is_empty() {
            b = b.header("content-type", ct);
        }
        if let Some(t) = token {
            b = b.header("authorization", format!("Bearer {t}"));
        }
        b.body(Full::new(body)).expect("request")
    }

    /// One call; the JSON answer of a 2xx, else the status and message.
    pub async fn call(
        &self,
        method: Method,
        path: &str,
        ct: &str,
        body: Option<&Value>,
    ) -> Result<Value, ApiError> {
        let body = body.map(|b| Bytes::from(b.to_string())).unwrap_or_default();
        let token = self.token().await?;
        let req = self.request(method, path, ct, body, token.clone());
        let fut = async {
            let resp = self.send(req).await.map_err(|e| ApiError {
                code: 0,
                message: format!("{path}: {e}"),
            })?;
            let code = resp.status().as_u16();
            let bytes = resp
                .into_body()
                .collect()
                .await
                .map_err(|e| ApiError {
                    code: 0,
                    message: format!("{path}: {e}"),
                })?
                .to_bytes();
            let v: Value = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
            if code == 401 {
                self.unauthorized(token.as_deref()).await;
            }
            if (200..300).contains(&code) {
                Ok(v)
            } else {
                Err(ApiError {
                    code,
                    message: v["message"]
                        .as_str()
                        .map(String::from)
                        .unwrap_or_else(|| String::from_utf8_lossy(&bytes).into_owned()),
                })
            }
        };
        tokio::time::timeout(REQUEST_TIMEOUT, fut)
            .await
            .unwrap_or_else(|_| {
                Err(ApiError {
                    code: 0,
                    message: format!("{path}: no answer within {REQUEST_TIMEOUT:?}"),
                })
            })
    }

    /// Opens a watch; the body streams one JSON event per line.
    pub async fn watch(&self, path: &str) -> Result<hyper::body::Incoming, ApiError> {
        let token = self.token().await?;
        let req = self.request(Method::GET, path, "", Bytes::new(), token.clone());
        let resp = tokio::time::timeout(REQUEST_TIMEOUT, self.send(req))
            .await
            .map_err(|_| ApiError {
                code: 0,
                message: format!("{path}: no answer"),
            })?
            .map_err(|e| ApiError {
                code: 0,
                message: format!("{path}: {e}"),
            })?;
        let code = resp.status().as_u16();
        if code == 401 {
            self.unauthorized(token.as_deref()).await;
        }
        if code != 200 {
            return Err(ApiError {
                code,
                message: format!("watch {path}"),
            });
        }
        Ok(resp.into_body())
    }
}

async fn send_on<T>(
    io: T,
    req: Request<Full<Bytes>>,
) -> Result<http::Response<hyper::body::Incoming>, String>
where
    T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(io))
        .await
        .map_err(|e| e.to_string())?;
    // The connection lives as long as the response body is read (a watch: minutes).
    tokio::spawn(async move {
        let _ = conn.await;
    });
    sender.send_request(req).await.map_err(|e| e.to_string())
}

/// One endpoint of an EndpointSlice.
#[derive(Debug, Clone, PartialEq)]
pub struct Ep {
    pub pod: String,
    pub addr: SocketAddr,
    pub ready: bool,
    pub serving: bool,
    pub terminating: bool,
}

/// The endpoints of one EndpointSlice, at the configured port.
pub fn slice_endpoints(slice: &Value, port: Option<&PortRef>) -> Vec<Ep> {
    let ports = slice["ports"].as_array().cloned().unwrap_or_default();
    let chosen = match port {
        None => ports.first(),
        Some(PortRef::Number(n)) => ports.iter().find(|p| p["port"] == *n),
        Some(PortRef::Name(n)) => ports.iter().find(|p| p["name"] == n.as_str()),
    };
    let Some(port) = chosen.and_then(|p| p["port"].as_u64()) else {
        return Vec::new();
    };
    let mut out = Vec::new();
    for e in slice["endpoints"].as_array().into_iter().flatten() {
        let Some(ip) = e["addresses"][0].as_str().and_then(|a| a.parse().ok()) else {
            continue;
        };
        let c = &e["conditions"];
        // Absent conditions mean ready/serving (the API's documented default).
        let ready = c["ready"].as_bool().unwrap_or(true);
        let terminating = c["terminating"].as_bool().unwrap_or(false);
        out.push(Ep {
            pod: e["targetRef"]["name"]
                .as_str()
                .map(String::from)
                .unwrap_or_else(|| format!("{ip}")),
            addr: SocketAddr::new(ip, port as u16),
            ready,
            serving: c["serving"].as_bool().unwrap_or(ready),
            terminating,
        });
    }
    out
}

/// What membership has been told about a pod.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Known {
    Starting,
    Ready,
}

#[derive(Debug)]
struct Tracked {
    addr: SocketAddr,
    known: Known,
    first_seen: Instant,
}

#[derive(Default)]
struct Counters {
    api_failures: AtomicU64,
    watch_failures: AtomicU64,
    relists: AtomicU64,
    conflicts: AtomicU64,
    external_scales: AtomicU64,
    scale_writes: AtomicU64,
    deletion_cost_patches: AtomicU64,
    activations: AtomicU64,
}

struct KState {
    min: u32,
    max: u32,
    desired: u32,
    /// The Deployment's `spec.replicas` as last read.
    replicas: Option<u32>,
    /// The count shoal last wrote.
    written: Option<u32>,
    /// EndpointSlice name → its endpoints.
    slices: BTreeMap<String, Vec<Ep>>,
    /// Pods membership routes to (or will, once ready).
    members: BTreeMap<String, Tracked>,
    /// Pods shoal drained (scale-in or terminating), with when.
    draining: BTreeMap<String, (SocketAddr, Instant)>,
    /// Those of `draining` whose in-flight requests are done (out of the pool).
    drained: std::collections::BTreeSet<String>,
    /// Scale-in victims: the replica count their cut started from (the cut took effect
    /// once the count is below it).
    cut_from: BTreeMap<String, u32>,
    /// Pods taken out because they turned unready (not terminating): back once ready.
    unready: std::collections::BTreeSet<String>,
    last_error: Option<String>,
    watch_rv: String,
}

/// The `kubernetes` provider.
pub struct KubeFleet {
    spec: FleetSpec,
    service_label: String,
    members: Arc<dyn Membership>,
    client: KubeClient,
    namespace: String,
    state: Mutex<KState>,
    wake: Notify,
    stop: watch::Sender<bool>,
    counters: Counters,
    /// How often the scale subresource is read.
    poll: Duration,
    /// A scale-in (drain, deletion cost, lower) runs beside the scale loop, so a scale-up
    /// asked for meanwhile is written at once.
    scaling_in: std::sync::atomic::AtomicBool,
    usage: Mutex<KubeUsage>,
    vertical: Mutex<crate::vertical::VerticalState>,
    /// With replicas: only the leader writes the Deployment; followers adopt its count.
    cluster: std::sync::OnceLock<Arc<crate::cluster::Leadership>>,
}

/// One pod's CPU from `metrics.k8s.io`: a rate, integrated into cumulative seconds so the
/// autoscaler and the recommender read it like `/proc` (at the last reported rate between
/// reports).
#[derive(Debug, Clone, Copy)]
struct PodCpu {
    /// CPU seconds up to `at`.
    base: f64,
    at: Instant,
    cores: f64,
    memory: u64,
}

impl PodCpu {
    fn new(now: Instant, cores: f64, memory: u64) -> PodCpu {
        PodCpu {
            base: 0.0,
            at: now,
            cores,
            memory,
        }
    }

    /// A new reading: the time since the last one is charged at the last rate.
    fn advance(&mut self, now: Instant, cores: f64, memory: u64) {
        self.base = self.cumulative(now);
        self.at = now.max(self.at);
        self.cores = cores;
        self.memory = memory;
    }

    fn cumulative(&self, now: Instant) -> f64 {
        self.base + self.cores * now.saturating_duration_since(self.at).as_secs_f64()
    }
}

/// Usage and sizing state of a Kubernetes fleet.
#[derive(Debug, Default)]
struct KubeUsage {
    /// `metrics.k8s.io` serves pods (None: not checked yet).
    metrics: Option<bool>,
    /// The API serves `pods/resize` (in-place resize).
    resize: Option<bool>,
    checked: Option<Instant>,
    /// The pods' label selector, from the scale subresource.
    selector: Option<String>,
    pods: BTreeMap<String, PodCpu>,
    /// The resized container and its template size (requests, else limits).
    container: Option<String>,
    template: Size,
    /// Limit ÷ request per resource in the template (kept on resize, as the VPA does).
    limit_ratio: (Option<f64>, Option<f64>),
    /// CPU requested by the pod's other containers (part of the allotment).
    others_cpu: f64,
    /// The size pods should have: the template's until shoal resizes.
    current: Size,
    /// Pods shoal resized, and to what.
    sized: BTreeMap<String, Size>,
    /// Pods whose resize to a size failed, and when: not asked again for that size within
    /// a minute (a refused resize, 403/422, not until the size changes).
    resize_failed: BTreeMap<String, (Size, Instant, bool)>,
    resize_failures: u64,
    metrics_failures: u64,
}

/// Re-reads discovery and the Deployment this often.
const DISCOVERY_INTERVAL: Duration = Duration::from_secs(30);

/// A Kubernetes quantity (`250m`, `2`, `0.5`, `128Mi`, `1G`, `1e3`, `100n`) as a number.
pub fn parse_quantity(q: &str) -> Option<f64> {
    let q = q.trim();
    let split = q
        .find(|c: char| c.is_ascii_alphabetic() && c != 'e' && c != 'E')
        .unwrap_or(q.len());
    let (num, suffix) = q.split_at(split);
    let n: f64 = num
        .parse()
        .ok()
        .filter(|n: &f64| n.is_finite() && *n >= 0.0)?;
    let mult = match suffix {
        "" => 1.0,
        "n" => 1e-9,
        "u" => 1e-6,
        "m" => 1e-3,
        "k" => 1e3,
        "M" => 1e6,
        "G" => 1e9,
        "T" => 1e12,
        "Ki" => 1024.0,
        "Mi" => 1024.0 * 1024.0,
        "Gi" => 1024.0 * 1024.0 * 1024.0,
        "Ti" => 1024.0f64.powi(4),
        _ => return None,
    };
    Some(n * mult)
}

/// Pod name → (cores, memory bytes) summed over containers, from a `PodMetricsList`.
pub fn pod_metrics(list: &Value) -> BTreeMap<String, (f64, u64)> {
    let mut out = BTreeMap::new();
    for item in list["items"].as_array().into_iter().flatten() {
        let Some(name) = item["metadata"]["name"].as_str() else {
            continue;
        };
        let (mut cpu, mut mem) = (0.0, 0.0);
        for c in item["containers"].as_array().into_iter().flatten() {
            cpu += c["usage"]["cpu"]
                .as_str()
                .and_then(parse_quantity)
                .unwrap_or(0.0);
            mem += c["usage"]["memory"]
                .as_str()
                .and_then(parse_quantity)
                .unwrap_or(0.0);
        }
        out.insert(name.to_string(), (cpu, mem as u64));
    }
    out
}

/// The sizing facts of a Deployment's pod template.
#[derive(Debug, Clone, Default, PartialEq)]
struct Template {
    /// The resized container (the configured one, else the first).
    container: Option<String>,
    /// Its size: requests, else limits.
    size: Size,
    /// Limit ÷ request per resource (cpu, memory).
    ratio: (Option<f64>, Option<f64>),
    /// CPU the other containers request.
    others_cpu: f64,
}

fn template_size(d: &Value, want: Option<&str>) -> Template {
    let containers = d["spec"]["template"]["spec"]["containers"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    let idx = match want {
        Some(w) => containers.iter().position(|c| c["name"] == w),
        None => (!containers.is_empty()).then_some(0),
    };
    let Some(i) = idx else {
        return Template::default();
    };
    let q = |c: &Value, kind: &str, res: &str| {
        c["resources"][kind][res].as_str().and_then(parse_quantity)
    };
    let c = &containers[i];
    let size_of = |res: &str| q(c, "requests", res).or_else(|| q(c, "limits", res));
    let ratio = |res: &str| match (q(c, "requests", res), q(c, "limits", res)) {
        (Some(r), Some(l)) if r > 0.0 => Some(l / r),
        (None, Some(_)) => Some(1.0),
        _ => None,
    };
    let others = containers
        .iter()
        .enumerate()
        .filter(|(j, _)| *j != i)
        .filter_map(|(_, o)| q(o, "requests", "cpu").or_else(|| q(o, "limits", "cpu")))
        .sum();
    Template {
        container: c["name"].as_str().map(String::from),
        size: Size {
            cpu: size_of("cpu"),
            memory_bytes: size_of("memory").map(|m| m as u64),
        },
        ratio: (ratio("cpu"), ratio("memory")),
        others_cpu: others,
    }
}

/// The strategic-merge patch of the `resize` subresource giving `container` the size `to`.
/// Requests become the size; a limit keeps its ratio to the request; a memory decrease
/// lowers the request only (Kubernetes refuses in-place memory limit decreases).
pub fn resize_patch(
    container: &str,
    to: Size,
    from: Size,
    ratio: (Option<f64>, Option<f64>),
) -> Value {
    let mut requests = serde_json::Map::new();
    let mut limits = serde_json::Map::new();
    if let Some(c) = to.cpu {
        let milli = (c * 1000.0).round().max(1.0) as u64;
        requests.insert("cpu".into(), json!(format!("{milli}m")));
        if let Some(r) = ratio.0 {
            limits.insert(
                "cpu".into(),
                json!(format!("{}m", ((milli as f64) * r).round() as u64)),
            );
        }
    }
    if let Some(m) = to.memory_bytes {
        let mib = m.div_ceil(1 << 20).max(1);
        requests.insert("memory".into(), json!(format!("{mib}Mi")));
        let shrinking = from.memory_bytes.is_some_and(|f| m < f);
        if let (Some(r), false) = (ratio.1, shrinking) {
            limits.insert(
                "memory".into(),
                json!(format!("{}Mi", ((mib as f64) * r).ceil() as u64)),
            );
        }
    }
    let mut resources = json!({ "requests": requests });
    if !limits.is_empty() {
        resources["limits"] = Value::Object(limits);
    }
    json!({"spec": {"containers": [{"name": container, "resources": resources}]}})
}

impl KubeFleet {
    pub fn new(
        spec: FleetSpec,
        members: Arc<dyn Membership>,
        ep: Endpoint,
    ) -> Result<Arc<KubeFleet>, String> {
        let f = &spec.fleet;
        let service_label = f.service.clone().unwrap_or_else(|| f.deployment.clone());
        Ok(Arc::new(KubeFleet {
            client: KubeClient::new(ep)?,
            namespace: f.namespace.clone(),
            service_label,
            members,
            state: Mutex::new(KState {
                min: f.min,
                max: f.max,
                desired: f.min,
                replicas: None,
                written: None,
                slices: BTreeMap::new(),
                members: BTreeMap::new(),
                draining: BTreeMap::new(),
                drained: Default::default(),
                cut_from: BTreeMap::new(),
                unready: Default::default(),
                last_error: None,
                watch_rv: String::new(),
            }),
            wake: Notify::new(),
            stop: watch::channel(false).0,
            counters: Counters::default(),
            poll: Duration::from_secs(1),
            scaling_in: Default::default(),
            usage: Mutex::new(KubeUsage::default()),
            vertical: Mutex::new(crate::vertical::VerticalState::new()),
            spec,
            cluster: std::sync::OnceLock::new(),
        }))
    }

    /// Shares the Deployment with other replicas: only the leader writes it.
    pub fn set_cluster(&self, l: Arc<crate::cluster::Leadership>) {
        let _ = self.cluster.set(l);
    }

    /// Starts the watch, the scale loop and (with `min = 0`) the activator.
    pub fn start(self: &Arc<Self>) {
        tokio::spawn(self.clone().run_watch());
        tokio::spawn(self.clone().run_scale());
        tokio::spawn(self.clone().run_usage());
        if self.spec.fleet.min == 0 {
            tokio::spawn(self.clone().run_activator());
        }
    }

    /// Scale from zero: a request waiting with nothing ready asks for one pod at once,
    /// without waiting for the autoscaler's next evaluation.
    async fn run_activator(self: Arc<Self>) {
        let mut stop = self.stop.subscribe();
        loop {
            tokio::select! {
                _ = stop.changed() => return,
                _ = tokio::time::sleep(Duration::from_millis(50)) => {}
            }
            if self.members.waiting() == 0 {
                continue;
            }
            let mut s = self.state.lock().expect("kube state");
            if s.desired == 0 && s.max > 0 {
                s.desired = 1;
                self.counters.activations.fetch_add(1, Ordering::Relaxed);
                tracing::info!(service = %self.spec.service, "request waiting at zero replicas: scaling to 1");
                self.wake.notify_one();
            }
        }
    }

    fn scale_path(&self) -> String {
        format!(
            "/apis/apps/v1/namespaces/{}/deployments/{}/scale",
            self.namespace, self.spec.fleet.deployment
        )
    }

    fn slices_path(&self) -> String {
        let sel = match &self.spec.fleet.selector {
            Some(s) => s.clone(),
            None => format!("kubernetes.io/service-name={}", self.service_label),
        };
        format!(
            "/apis/discovery.k8s.io/v1/namespaces/{}/endpointslices?labelSelector={}",
            self.namespace,
            encode(&sel)
        )
    }

    fn fail(&self, counter: &AtomicU64, what: &str, e: &dyn std::fmt::Display) {
        counter.fetch_add(1, Ordering::Relaxed);
        let msg = format!("{what}: {e}");
        tracing::warn!(service = %self.spec.service, error = %msg, "kubernetes provider");
        self.state.lock().expect("kube state").last_error = Some(msg);
    }

    fn stopped(&self) -> bool {
        *self.stop.borrow()
    }

    // ---- membership ----

    async fn run_watch(self: Arc<Self>) {
        let mut stop = self.stop.subscribe();
        let mut backoff = Duration::from_millis(200);
        'relist: loop {
            if self.stopped() {
                return;
            }
            let list = match self
                .client
                .call(Method::GET, &self.slices_path(), "", None)
                .await
            {
                Ok(v) => v,
                Err(e) => {
                    self.fail(&self.counters.watch_failures, "list endpointslices", &e);
                    tokio::select! { _ = tokio::time::sleep(backoff) => {}, _ = stop.changed() => return }
                    backoff = (backoff * 2).min(Duration::from_secs(10));
                    continue;
                }
            };
            {
                let mut s = self.state.lock().expect("kube state");
                s.slices.clear();
                for sl in list["items"].as_array().into_iter().flatten() {
                    let name = sl["metadata"]["name"].as_str().unwrap_or("").to_string();
                    s.slices
                        .insert(name, slice_endpoints(sl, self.spec.fleet.port.as_ref()));
                }
                s.watch_rv = list["metadata"]["resourceVersion"]
                    .as_str()
                    .unwrap_or("")
                    .to_string();
            }
            self.sync();
            loop {
                let rv = self.state.lock().expect("kube state").watch_rv.clone();
                let path = format!(
                    "{}&watch=true&allowWatchBookmarks=true&resourceVersion={rv}&timeoutSeconds=290",
                    self.slices_path()
                );
                let body = tokio::select! {
                    b = self.client.watch(&path) => b,
                    _ = stop.changed() => return,
                };
                let body = match body {
                    Ok(b) => b,
                    Err(e) if e.code == 410 => {
                        self.gone().await;
                        continue 'relist;
                    }
                    Err(e) => {
                        self.fail(&self.counters.watch_failures, "watch endpointslices", &e);
                        tokio::select! { _ = tokio::time::sleep(backoff) => {}, _ = stop.changed() => return }
                        backoff = (backoff * 2).min(Duration::from_secs(10));
                        continue;
                    }
                };
                let opened = Instant::now();
                match self.read_watch(body, &mut stop).await {
                    WatchEnd::Gone => {
                        self.gone().await;
                        continue 'relist;
                    }
                    WatchEnd::Stopped => return,
                    WatchEnd::Ended => {}
                    WatchEnd::Failed(e) => {
                        self.fail(&self.counters.watch_failures, "watch endpointslices", &e);
                    }
                }
                // A watch that closes as soon as it opens is not reopened in a hot loop.
                if opened.elapsed() < Duration::from_secs(1) {
                    tokio::select! { _ = tokio::time::sleep(backoff) => {}, _ = stop.changed() => return }
                    backoff = (backoff * 2).min(Duration::from_secs(10));
                } else {
                    backoff = Duration::from_millis(200);
                }
            }
        }
    }

    async fn gone(&self) {
        self.counters.relists.fetch_add(1, Ordering::Relaxed);
        tracing::info!(service = %self.spec.service, "endpointslice watch expired (410 Gone): listing again");
        // A server that keeps answering 410 is not hammered.
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    async fn read_watch(
        &self,
        mut body: hyper::body::Incoming,
        stop: &mut watch::Receiver<bool>,
    ) -> WatchEnd {
        let mut buf: Vec<u8> = Vec::new();
        loop {
            // The server ends a watch after `timeoutSeconds` (290) and sends bookmarks
            // meanwhile: silence well past that is a half-open connection, not a quiet one.
            let frame = tokio::select! {
                f = tokio::time::timeout(WATCH_IDLE, body.frame()) => match f {
                    Ok(f) => f,
                    Err(_) => return WatchEnd::Failed("watch silent past its timeout".into()),
                },
                _ = stop.changed() => return WatchEnd::Stopped,
            };
            let data = match frame {
                None => return WatchEnd::Ended,
                Some(Err(e)) => return WatchEnd::Failed(e.to_string()),
                Some(Ok(f)) => match f.into_data() {
                    Ok(d) => d,
                    Err(_) => continue,
                },
            };
            buf.extend_from_slice(&data);
            while let Some(nl) = buf.iter().position(|b| *b == b'\n') {
                let line: Vec<u8> = buf.drain(..=nl).collect();
                let Ok(ev) = serde_json::from_slice::<Value>(&line) else {
                    continue;
                };
                match self.apply_event(&ev) {
                    Ok(()) => {}
                    Err(end) => return end,
                }
            }
        }
    }

    fn apply_event(&self, ev: &Value) -> Result<(), WatchEnd> {
        let obj = &ev["object"];
        let rv = obj["metadata"]["resourceVersion"].as_str().unwrap_or("");
        match ev["type"].as_str().unwrap_or("") {
            "ERROR" => {
                return Err(if obj["code"] == 410 {
                    WatchEnd::Gone
                } else {
                    WatchEnd::Failed(obj["message"].as_str().unwrap_or("watch error").into())
                })
            }
            "BOOKMARK" => {}
            kind @ ("ADDED" | "MODIFIED" | "DELETED") => {
                let name = obj["metadata"]["name"].as_str().unwrap_or("").to_string();
                let mut s = self.state.lock().expect("kube state");
                if kind == "DELETED" {
                    s.slices.remove(&name);
                } else {
                    s.slices
                        .insert(name, slice_endpoints(obj, self.spec.fleet.port.as_ref()));
                }
            }
            _ => return Ok(()),
        }
        if !rv.is_empty() {
            self.state.lock().expect("kube state").watch_rv = rv.to_string();
        }
        self.sync();
        Ok(())
    }

    /// Brings membership in line with the EndpointSlices.
    fn sync(&self) {
        let mut removals = Vec::new();
        {
            let mut s = self.state.lock().expect("kube state");
            let mut eps: BTreeMap<String, Ep> = BTreeMap::new();
            for list in s.slices.values() {
                for e in list {
                    eps.entry(e.pod.clone()).or_insert_with(|| e.clone());
                }
            }
            // Gone, terminating, drained by shoal, or a ready pod turned unready: no new
            // requests.
            let leaving: Vec<(String, bool)> = s
                .members
                .iter()
                .filter_map(|(p, t)| match eps.get(p) {
                    None => Some((p.clone(), false)),
                    Some(e) if e.terminating || s.draining.contains_key(p) => {
                        Some((p.clone(), false))
                    }
                    Some(e) if t.known == Known::Ready && !e.ready => Some((p.clone(), true)),
                    Some(_) => None,
                })
                .collect();
            for (p, unready) in leaving {
                s.members.remove(&p);
                if unready {
                    tracing::info!(service = %self.spec.service, pod = %p, "pod turned unready: no new requests until it is ready again");
                    s.unready.insert(p.clone());
                }
                removals.push(p);
            }
            for (pod, e) in &eps {
                if e.terminating || s.draining.contains_key(pod) {
                    continue;
                }
                // Taken out while unready: back only once ready again (not as a new
                // starting member beside the one still draining).
                if s.unready.contains(pod) {
                    if !e.ready {
                        continue;
                    }
                    s.unready.remove(pod);
                }
                match s.members.get_mut(pod) {
                    None => {
                        self.members.add(pod, e.addr);
                        let known = if e.ready {
                            self.members.ready(pod);
                            Known::Ready
                        } else {
                            Known::Starting
                        };
                        s.members.insert(
                            pod.clone(),
                            Tracked {
                                addr: e.addr,
                                known,
                                first_seen: Instant::now(),
                            },
                        );
                        tracing::info!(service = %self.spec.service, pod = %pod, addr = %e.addr, ready = e.ready, "pod joined");
                    }
                    Some(t) if t.known == Known::Starting && e.ready => {
                        self.members.ready(pod);
                        t.known = Known::Ready;
                        tracing::info!(service = %self.spec.service, pod = %pod, "pod ready");
                    }
                    Some(_) => {}
                }
            }
            // Forget drained and unready pods once their endpoint is gone.
            s.draining.retain(|p, _| eps.contains_key(p));
            let KState {
                draining,
                drained,
                cut_from,
                ..
            } = &mut *s;
            drained.retain(|p| draining.contains_key(p));
            cut_from.retain(|p, _| draining.contains_key(p));
            s.unready.retain(|p| eps.contains_key(p));
        }
        let drain = self.spec.drain_timeout;
        for pod in removals {
            tracing::info!(service = %self.spec.service, pod = %pod, "pod leaving: draining");
            let m = self.members.clone();
            tokio::spawn(async move {
                m.remove(&pod, drain).await;
            });
        }
    }

    // ---- desired count ----

    async fn run_scale(self: Arc<Self>) {
        let mut stop = self.stop.subscribe();
        loop {
            if let Err(e) = self.reconcile().await {
                self.fail(&self.counters.api_failures, "scale", &e);
            }
            tokio::select! {
                _ = stop.changed() => return,
                _ = self.wake.notified() => {}
                _ = tokio::time::sleep(self.poll) => {}
            }
        }
    }

    async fn read_scale(&self) -> Result<(u32, String), ApiError> {
        let v = self
            .client
            .call(Method::GET, &self.scale_path(), "", None)
            .await?;
        if let Some(sel) = v["status"]["selector"].as_str().filter(|s| !s.is_empty()) {
            let mut u = self.usage.lock().expect("kube usage");
            if u.selector.as_deref() != Some(sel) {
                u.selector = Some(sel.to_string());
            }
        }
        Ok((
            v["spec"]["replicas"].as_u64().unwrap_or(0) as u32,
            v["metadata"]["resourceVersion"]
                .as_str()
                .unwrap_or("")
                .to_string(),
        ))
    }

    fn deployment_path(&self) -> String {
        format!(
            "/apis/apps/v1/namespaces/{}/deployments/{}",
            self.namespace, self.spec.fleet.deployment
        )
    }

    /// With a Lease: makes the Deployment's fence this leader's token before a scale write.
    /// Returns the `resourceVersion` to write the scale with, None when this replica must
    /// not write now: fenced by a newer leader (it steps down), no longer leading, or the
    /// count changed since it was read (`read`, re-read next round). A newer leader's write
    /// after this changes the `resourceVersion`, so ours is then a 409.
    async fn fence(&self, read: u32, rv: &str) -> Result<Option<String>, ApiError> {
        let Some(c) = self.cluster.get().filter(|c| c.fences_deployment()) else {
            return Ok(Some(rv.to_string()));
        };
        let Some(token) = c.may_write() else {
            return Ok(None);
        };
        let d = self
            .client
            .call(Method::GET, &self.deployment_path(), "", None)
            .await?;
        let fence = crate::lease::fence_of(&d);
        if let Some(f) = fence {
            c.observe_fence(f);
        }
        let cur_rv = d["metadata"]["resourceVersion"].as_str().unwrap_or("");
        if d["spec"]["replicas"].as_u64() != Some(u64::from(read)) {
            self.counters.conflicts.fetch_add(1, Ordering::Relaxed);
            return Ok(None);
        }
        match crate::lease::fence_decision(fence, token) {
            crate::lease::Fence::Fenced(f) => {
                c.fenced_by(f, token);
                Ok(None)
            }
            crate::lease::Fence::Write => Ok(Some(cur_rv.to_string())),
            crate::lease::Fence::Claim => {
                let patch = json!({"metadata": {"resourceVersion": cur_rv,
                    "annotations": {crate::lease::FENCE_ANNOTATION: token.to_string()}}});
                match self
                    .client
                    .call(
                        Method::PATCH,
                        &self.deployment_path(),
                        "application/merge-patch+json",
                        Some(&patch),
                    )
                    .await
                {
                    Ok(v) => {
                        tracing::info!(service = %self.spec.service, token, "deployment fence raised to this leader's token");
                        Ok(v["metadata"]["resourceVersion"].as_str().map(String::from))
                    }
                    Err(e) if e.code == 409 => {
                        self.counters.conflicts.fetch_add(1, Ordering::Relaxed);
                        Ok(None)
                    }
                    Err(e) => Err(e),
                }
            }
        }
    }

    /// Writes the replica count (`read` was read at `rv`) with `rv` as precondition, fenced
    /// with a Lease; Ok(false) on a conflict or when this replica must not write.
    async fn write_scale(&self, n: u32, read: u32, rv: &str) -> Result<bool, ApiError> {
        let Some(rv) = self.fence(read, rv).await? else {
            return Ok(false);
        };
        // The fence's calls took time: a leader whose renew deadline passed meanwhile
        // writes nothing.
        if self.cluster.get().is_some_and(|c| c.may_write().is_none()) {
            return Ok(false);
        }
        let body = json!({
            "apiVersion": "autoscaling/v1", "kind": "Scale",
            "metadata": {"name": self.spec.fleet.deployment, "namespace": self.namespace,
                         "resourceVersion": rv},
            "spec": {"replicas": n},
        });
        match self
            .client
            .call(
                Method::PUT,
                &self.scale_path(),
                "application/json",
                Some(&body),
            )
            .await
        {
            Ok(_) => {
                self.counters.scale_writes.fetch_add(1, Ordering::Relaxed);
                if let Some(c) = self.cluster.get().filter(|c| c.fences_deployment()) {
                    c.write_accepted();
                }
                let mut s = self.state.lock().expect("kube state");
                s.written = Some(n);
                s.replicas = Some(n);
                s.last_error = None;
                tracing::info!(service = %self.spec.service, replicas = n, "deployment scaled");
                Ok(true)
            }
            Err(e) if e.code == 409 => {
                self.counters.conflicts.fetch_add(1, Ordering::Relaxed);
                tracing::info!(service = %self.spec.service, "scale conflict: the deployment changed since it was read; reading again");
                Ok(false)
            }
            Err(e) => Err(e),
        }
    }

    async fn reconcile(self: &Arc<Self>) -> Result<(), ApiError> {
        let (replicas, rv) = self.read_scale().await?;
        let mut restored = Vec::new();
        if self.cluster.get().is_some_and(|c| !c.is_leader()) {
            // A follower follows the Deployment's count (the leader's writes) and writes
            // nothing, so a new leader starts from the count in force.
            let mut s = self.state.lock().expect("kube state");
            s.desired = replicas.clamp(s.min, s.max);
            s.replicas = Some(replicas);
            s.written = Some(replicas);
            drop(s);
            self.sync();
            return Ok(());
        }
        let desired = {
            let mut s = self.state.lock().expect("kube state");
            match s.replicas {
                None => {
                    // First read: start from the Deployment's count, within bounds.
                    s.desired = replicas.clamp(s.min, s.max);
                }
                Some(last) if last != replicas && s.written != Some(replicas) => {
                    self.counters
                        .external_scales
                        .fetch_add(1, Ordering::Relaxed);
                    if self.spec.fleet.external_scale == "respect" {
                        s.desired = replicas.clamp(s.min, s.max);
                        tracing::info!(service = %self.spec.service, from = last, to = replicas, desired = s.desired, "replica count changed outside shoal: adopted");
                    } else {
                        tracing::info!(service = %self.spec.service, from = last, to = replicas, desired = s.desired, "replica count changed outside shoal: restoring shoal's count");
                    }
                }
                _ => {}
            }
            s.replicas = Some(replicas);
            // Pods drained for a scale-in that did not happen (or removed other pods) get
            // traffic again, and their deletion cost back.
            // Only for a cut that did not take effect (the count is not below the one it
            // started from), with no scale-in running, and once out of the pool: a pod
            // re-added while its old entry drains would be two instances under one id.
            if s.desired >= replicas && !self.scaling_in.load(Ordering::Acquire) {
                restored = s
                    .draining
                    .iter()
                    .filter(|(p, (_, at))| {
                        at.elapsed() > Duration::from_secs(10)
                            && s.drained.contains(*p)
                            && s.cut_from.get(*p).is_some_and(|from| replicas >= *from)
                    })
                    .map(|(p, _)| p.clone())
                    .collect();
            }
            s.desired
        };
        for pod in restored {
            // The cost first: the pod is routed to again only once it no longer invites
            // the controller (a failure leaves it drained, tried again next round).
            self.set_deletion_cost(&pod, None).await?;
            tracing::info!(service = %self.spec.service, pod = %pod, "scale-in did not happen: pod routed to again, deletion cost cleared");
            let mut s = self.state.lock().expect("kube state");
            s.draining.remove(&pod);
            s.drained.remove(&pod);
            s.cut_from.remove(&pod);
        }
        if desired > replicas {
            if !self.write_scale(desired, replicas, &rv).await? {
                self.wake.notify_one();
            }
        } else if desired < replicas && !self.scaling_in.swap(true, Ordering::AcqRel) {
            let me = self.clone();
            tokio::spawn(async move {
                if let Err(e) = me.scale_in(replicas, desired).await {
                    me.fail(&me.counters.api_failures, "scale-in", &e);
                }
                me.scaling_in.store(false, Ordering::Release);
                me.wake.notify_one();
            });
        }
        self.sync();
        Ok(())
    }

    /// Pods to remove: ones already drained first, then least in flight, newest first.
    fn choose_victims(&self, k: usize) -> Vec<String> {
        let s = self.state.lock().expect("kube state");
        // Pods shoal drained earlier that are still live (not terminating: those are already
        // outside the replica count) go first.
        let live = |p: &String| {
            s.slices
                .values()
                .flatten()
                .any(|e| e.pod == *p && !e.terminating)
        };
        let mut out: Vec<String> = s
            .draining
            .keys()
            .filter(|p| live(p))
            .take(k)
            .cloned()
            .collect();
        // Ready pods only: not-ready ones are the controller's first victims anyway (and
        // already counted by `doomed_first`).
        let mut candidates: Vec<(&String, &Tracked)> = s
            .members
            .iter()
            .filter(|(_, t)| t.known == Known::Ready)
            .collect();
        candidates.sort_by_key(|(p, t)| {
            (
                self.members.in_flight(p).unwrap_or(0),
                std::cmp::Reverse(t.first_seen),
            )
        });
        for (p, _) in candidates {
            if out.len() >= k {
                break;
            }
            out.push(p.clone());
        }
        out
    }

    /// A replica that is not the leader (with several replicas) writes nothing.
    fn follower(&self) -> bool {
        self.cluster.get().is_some_and(|c| !c.is_leader())
    }

    /// Sets (or with None clears) a pod's `pod-deletion-cost`; a pod already gone is fine.
    async fn set_deletion_cost(&self, pod: &str, cost: Option<&str>) -> Result<(), ApiError> {
        let patch = json!({"metadata": {"annotations": {DELETION_COST: cost}}});
        let path = format!("/api/v1/namespaces/{}/pods/{pod}", self.namespace);
        match self
            .client
            .call(
                Method::PATCH,
                &path,
                "application/merge-patch+json",
                Some(&patch),
            )
            .await
        {
            Ok(_) => {
                self.counters
                    .deletion_cost_patches
                    .fetch_add(1, Ordering::Relaxed);
                Ok(())
            }
            Err(e) if e.code == 404 => Ok(()),
            Err(e) => Err(e),
        }
    }

    /// Pods the ReplicaSet controller removes before any ready one whatever their deletion
    /// cost: live pods not ready, and pods with no endpoint yet (pending).
    fn doomed_first(&self, replicas: u32) -> usize {
        let s = self.state.lock().expect("kube state");
        let mut live = std::collections::BTreeSet::new();
        let mut not_ready = std::collections::BTreeSet::new();
        for e in s.slices.values().flatten().filter(|e| !e.terminating) {
            live.insert(e.pod.clone());
            if !e.ready && !s.draining.contains_key(&e.pod) {
                not_ready.insert(e.pod.clone());
            }
        }
        let pending = (replicas as usize).saturating_sub(live.len());
        not_ready.len() + pending
    }

    async fn scale_in(&self, replicas: u32, desired: u32) -> Result<(), ApiError> {
        // Not-ready and pending pods go first (the controller's ranking): drain only the
        // ready pods the rest of the cut takes.
        let cut = (replicas - desired) as usize;
        let victims = self.choose_victims(cut.saturating_sub(self.doomed_first(replicas)));
        // 1. No new requests; wait for in-flight ones (or the drain timeout).
        let mut drains = tokio::task::JoinSet::new();
        {
            let mut s = self.state.lock().expect("kube state");
            for v in &victims {
                if let Some(t) = s.members.remove(v) {
                    s.draining.insert(v.clone(), (t.addr, Instant::now()));
                    s.cut_from.insert(v.clone(), replicas);
                    let (m, id, d) = (self.members.clone(), v.clone(), self.spec.drain_timeout);
                    drains.spawn(async move { m.remove(&id, d).await });
                }
            }
        }
        if !victims.is_empty() {
            tracing::info!(service = %self.spec.service, pods = ?victims, "scale-in: draining chosen pods");
        }
        while drains.join_next().await.is_some() {}
        {
            let mut s = self.state.lock().expect("kube state");
            for v in &victims {
                if s.draining.contains_key(v) {
                    s.drained.insert(v.clone());
                }
            }
        }
        // A leader demoted meanwhile writes nothing more.
        if self.follower() {
            return Ok(());
        }
        // 2. Make them the ones the ReplicaSet controller deletes.
        for v in &victims {
            self.set_deletion_cost(v, Some(LOWEST_DELETION_COST))
                .await?;
        }
        // 3. Lower the count, re-reading on conflict; give up (next round) if the count was
        //    changed meanwhile.
        for _ in 0..5 {
            let (now, rv) = self.read_scale().await?;
            if now != replicas {
                self.wake.notify_one();
                return Ok(());
            }
            // Never below the count this cut was drained for (a lower desired count is
            // the next round's, with its own drain).
            let want = self.state.lock().expect("kube state").desired.max(desired);
            if want >= now || self.follower() {
                return Ok(());
            }
            if self.write_scale(want, now, &rv).await? {
                return Ok(());
            }
        }
        self.wake.notify_one();
        Ok(())
    }

    // ---- usage and in-place resize ----

    async fn run_usage(self: Arc<Self>) {
        let mut stop = self.stop.subscribe();
        loop {
            self.usage_tick().await;
            tokio::select! {
                _ = stop.changed() => return,
                _ = tokio::time::sleep(self.poll) => {}
            }
        }
    }

    async fn usage_tick(&self) {
        let due = {
            let u = self.usage.lock().expect("kube usage");
            u.checked.is_none_or(|t| t.elapsed() >= DISCOVERY_INTERVAL)
        };
        if due {
            self.discover().await;
        }
        let (metrics, selector) = {
            let u = self.usage.lock().expect("kube usage");
            (u.metrics == Some(true), u.selector.clone())
        };
        if let (true, Some(sel)) = (metrics, selector) {
            self.poll_metrics(&sel).await;
        }
        self.vertical_tick().await;
    }

    /// What the cluster serves (`metrics.k8s.io`, `pods/resize`) and the pod template's size.
    async fn discover(&self) {
        let metrics = match self
            .client
            .call(Method::GET, "/apis/metrics.k8s.io/v1beta1", "", None)
            .await
        {
            Ok(v) => Some(
                v["resources"]
                    .as_array()
                    .is_some_and(|r| r.iter().any(|x| x["name"] == "pods")),
            ),
            // Not registered, or the aggregated API is down.
            Err(e) if matches!(e.code, 404 | 503) => Some(false),
            Err(e) => {
                self.fail(&self.counters.api_failures, "discovery", &e);
                None
            }
        };
        let resize = match self.client.call(Method::GET, "/api/v1", "", None).await {
            Ok(v) => Some(
                v["resources"]
                    .as_array()
                    .is_some_and(|r| r.iter().any(|x| x["name"] == "pods/resize")),
            ),
            Err(e) => {
                self.fail(&self.counters.api_failures, "discovery", &e);
                None
            }
        };
        let path = format!(
            "/apis/apps/v1/namespaces/{}/deployments/{}",
            self.namespace, self.spec.fleet.deployment
        );
        let template = match self.client.call(Method::GET, &path, "", None).await {
            Ok(d) => Some(template_size(&d, self.spec.fleet.container.as_deref())),
            Err(e) => {
                self.fail(&self.counters.api_failures, "deployment", &e);
                None
            }
        };
        let mut u = self.usage.lock().expect("kube usage");
        if let Some(m) = metrics {
            if u.metrics != Some(m) {
                if m {
                    tracing::info!(service = %self.spec.service, "metrics.k8s.io served: CPU and memory per pod");
                } else {
                    tracing::info!(service = %self.spec.service, "metrics.k8s.io not served: request-based targets only");
                }
            }
            u.metrics = Some(m);
        }
        if let Some(r) = resize {
            if u.resize != Some(r) && self.spec.resources.mode == VerticalMode::Auto {
                if r {
                    tracing::info!(service = %self.spec.service, "pods/resize served: vertical auto resizes pods in place");
                } else {
                    tracing::info!(service = %self.spec.service, "pods/resize not served (no in-place pod resize): vertical recommends only");
                }
            }
            u.resize = Some(r);
        }
        if let Some(Template {
            container,
            size,
            ratio,
            others_cpu: others,
        }) = template
        {
            let configured = Size {
                cpu: self.spec.resources.cpu,
                memory_bytes: self.spec.resources.memory_bytes,
            };
            let size = Size {
                cpu: size.cpu.or(configured.cpu),
                memory_bytes: size.memory_bytes.or(configured.memory_bytes),
            };
            // A template change (a rollout) restarts the sizing from it.
            if u.template != size || u.current == Size::default() {
                u.current = size;
                u.sized.clear();
            }
            u.template = size;
            u.container = container;
            u.limit_ratio = ratio;
            u.others_cpu = others;
        }
        u.checked = Some(Instant::now());
    }

    async fn poll_metrics(&self, selector: &str) {
        let path = format!(
            "/apis/metrics.k8s.io/v1beta1/namespaces/{}/pods?labelSelector={}",
            self.namespace,
            encode(selector)
        );
        match self.client.call(Method::GET, &path, "", None).await {
            Ok(list) => {
                let now = Instant::now();
                let live: std::collections::BTreeSet<String> = {
                    let s = self.state.lock().expect("kube state");
                    s.members.keys().chain(s.draining.keys()).cloned().collect()
                };
                let mut u = self.usage.lock().expect("kube usage");
                let listed = pod_metrics(&list);
                // A pod missing from this list (not scraped) is not integrated at a stale
                // rate; it comes back from zero.
                u.pods.retain(|p, _| listed.contains_key(p));
                for (pod, (cores, mem)) in listed {
                    match u.pods.get_mut(&pod) {
                        Some(p) => p.advance(now, cores, mem),
                        None => {
                            u.pods.insert(pod, PodCpu::new(now, cores, mem));
                        }
                    }
                }
                u.pods.retain(|p, _| live.contains(p));
                u.sized.retain(|p, _| live.contains(p));
            }
            Err(e) => {
                self.usage.lock().expect("kube usage").metrics_failures += 1;
                if e.code == 404 {
                    // metrics-server went away: back to request-based targets.
                    self.usage.lock().expect("kube usage").metrics = Some(false);
                }
                self.fail(&self.counters.api_failures, "metrics.k8s.io", &e);
            }
        }
    }

    /// The size pods should have after this evaluation, and the changes decided.
    fn decide_size(
        &self,
        v: &mut crate::vertical::VerticalState,
        t: f64,
        current: Size,
    ) -> (Size, Vec<(&'static str, f64, f64)>) {
        let mut target = current;
        let mut changes = Vec::new();
        if let Some(rec) = v.recommender.recommendation() {
            changes =
                crate::recommend::decide(current, &rec, &self.spec.resources, t, v.last_change);
            if self.spec.cpu_scaled_horizontally() {
                changes.retain(|(resource, _, _)| *resource != "cpu");
            }
            // A memory limit cannot shrink in place, and lowering only the request of a pod
            // whose request equals its limit changes its QoS class, which is refused.
            let guaranteed = self.usage.lock().expect("kube usage").limit_ratio.1 == Some(1.0);
            if guaranteed {
                changes.retain(|(resource, from, to)| !(*resource == "memory" && to < from));
            }
            for (resource, _, to) in &changes {
                if *resource == "cpu" {
                    target.cpu = Some(*to);
                } else {
                    target.memory_bytes = Some(*to as u64);
                }
            }
            if !changes.is_empty() {
                v.last_change = Some(t);
            }
        }
        (target, changes)
    }

    /// One recommender sample; in `auto` mode where pods can be resized in place, one resize
    /// decision, and pods not at the current size (new ones) resized.
    async fn vertical_tick(&self) {
        let mode = self.spec.resources.mode;
        if mode == VerticalMode::Off {
            return;
        }
        let ready: Vec<String> = {
            let s = self.state.lock().expect("kube state");
            s.members
                .iter()
                .filter(|(_, t)| t.known == Known::Ready)
                .map(|(p, _)| p.clone())
                .collect()
        };
        let now = Instant::now();
        let (samples, resize, current, container, ratio) = {
            let u = self.usage.lock().expect("kube usage");
            let samples: Vec<(String, f64, u64)> = ready
                .iter()
                .filter_map(|p| {
                    u.pods
                        .get(p)
                        .map(|c| (p.clone(), c.cumulative(now), c.memory))
                })
                .collect();
            (
                samples,
                u.resize == Some(true),
                u.current,
                u.container.clone(),
                u.limit_ratio,
            )
        };
        let Some((container, target, changes)) = ({
            let mut v = self.vertical.lock().expect("vertical lock");
            let t = v.now();
            if !samples.is_empty() {
                v.recommender.add(t, &samples);
            }
            // With replicas, only the leader resizes (followers still learn the usage).
            let follower = self.cluster.get().is_some_and(|c| !c.is_leader());
            container
                .filter(|_| mode == VerticalMode::Auto && resize && !follower)
                .map(|c| {
                    let (target, changes) = self.decide_size(&mut v, t, current);
                    (c, target, changes)
                })
        }) else {
            return;
        };
        let pending: Vec<String> = {
            let mut u = self.usage.lock().expect("kube usage");
            u.current = target;
            u.resize_failed.retain(|p, _| ready.contains(p));
            ready
                .iter()
                .filter(|p| {
                    u.sized
                        .get(*p)
                        .map_or(target != u.template, |s| *s != target)
                })
                .filter(|p| {
                    !u.resize_failed.get(*p).is_some_and(|(size, at, refused)| {
                        *size == target && (*refused || at.elapsed() < Duration::from_secs(60))
                    })
                })
                .cloned()
                .collect()
        };
        let mut applied = Vec::new();
        for pod in pending {
            let from = {
                let u = self.usage.lock().expect("kube usage");
                u.sized.get(&pod).copied().unwrap_or(u.template)
            };
            let patch = resize_patch(&container, target, from, ratio);
            let path = format!("/api/v1/namespaces/{}/pods/{pod}/resize", self.namespace);
            match self
                .client
                .call(
                    Method::PATCH,
                    &path,
                    "application/strategic-merge-patch+json",
                    Some(&patch),
                )
                .await
            {
                Ok(_) => {
                    let mut u = self.usage.lock().expect("kube usage");
                    u.sized.insert(pod.clone(), target);
                    u.resize_failed.remove(&pod);
                    drop(u);
                    applied.push((pod, 0));
                }
                Err(e) if e.code == 404 => {}
                Err(e) => {
                    let mut u = self.usage.lock().expect("kube usage");
                    u.resize_failures += 1;
                    let refused = matches!(e.code, 403 | 422);
                    u.resize_failed
                        .insert(pod.clone(), (target, Instant::now(), refused));
                    drop(u);
                    self.fail(&self.counters.api_failures, "pod resize", &e);
                }
            }
        }
        if changes.is_empty() {
            if !applied.is_empty() {
                tracing::info!(service = %self.spec.service, pods = ?applied.iter().map(|(p, _)| p).collect::<Vec<_>>(), "pods resized in place to the current size");
            }
            return;
        }
        let mut v = self.vertical.lock().expect("vertical lock");
        // Changes come only from a recommendation.
        let Some(rec) = v.recommender.recommendation() else {
            return;
        };
        for change in changes {
            let r =
                crate::vertical::recommended(change, &rec, &self.spec.resources, applied.clone());
            v.record(r);
        }
    }
}

enum WatchEnd {
    Gone,
    Ended,
    Stopped,
    Failed(String),
}

pub(crate) fn encode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'a'..=b'z' | b'A'..=b'Z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' | b'/' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// The Kubernetes provider's entry in the registry.
pub static KIND: crate::registry::ProviderKind = crate::registry::ProviderKind {
    name: "kubernetes",
    scales: true,
    local_processes: false,
    sized_by_platform: true,
    lease_election: true,
    check: check_fleet,
    start: start_fleet,
};

fn check_fleet(
    fleet: &crate::config::FleetConfig,
    _autoscale: bool,
) -> Result<(), crate::registry::FieldError> {
    if fleet.deployment.is_empty() {
        return Err((
            "deployment",
            "the kubernetes provider needs the Deployment's name".into(),
        ));
    }
    if !matches!(fleet.external_scale.as_str(), "respect" | "reconcile") {
        return Err((
            "external_scale",
            format!(
                "unknown mode {:?} (use \"respect\" or \"reconcile\")",
                fleet.external_scale
            ),
        ));
    }
    Ok(())
}

fn start_fleet(
    s: crate::registry::Start<'_>,
) -> Result<Arc<dyn crate::provider::Provider>, String> {
    let ep = endpoint_from_env().map_err(|e| format!("kubernetes: {e}"))?;
    if s.spec.fleet.min == 0 {
        // Scale from zero: requests wait for the first pod (the fleet sees them).
        s.service
            .pool
            .set_cold_start(Some(shoal_proxy::pool::ColdStart {
                timeout: s.spec.fleet.cold_start_timeout.0,
                queue: s.spec.fleet.cold_start_queue,
            }));
    }
    let fleet =
        KubeFleet::new(s.spec.clone(), s.members, ep).map_err(|e| format!("kubernetes: {e}"))?;
    if let Some(l) = &s.leadership {
        fleet.set_cluster(l.clone());
    }
    fleet.start();
    Ok(fleet)
}

impl Provider for KubeFleet {
    fn kind(&self) -> &'static str {
        "kubernetes"
    }
    fn service(&self) -> &str {
        &self.spec.service
    }
    fn scale(&self, n: u32) -> u32 {
        let mut s = self.state.lock().expect("kube state");
        let mut n = n.clamp(s.min, s.max);
        // Not to zero while requests wait for a pod.
        if n == 0 && self.members.waiting() > 0 {
            n = 1.min(s.max);
        }
        if n != s.desired {
            s.desired = n;
            self.wake.notify_one();
        }
        n
    }
    fn desired(&self) -> u32 {
        self.state.lock().expect("kube state").desired
    }
    fn bounds(&self) -> (u32, u32) {
        let s = self.state.lock().expect("kube state");
        (s.min, s.max)
    }
    fn set_bounds(&self, min: u32, max: u32) {
        let mut s = self.state.lock().expect("kube state");
        s.min = min;
        s.max = max;
        s.desired = s.desired.clamp(min, max);
        self.wake.notify_one();
    }
    fn counts(&self) -> (u32, u32, u32) {
        let s = self.state.lock().expect("kube state");
        let starting = s
            .members
            .values()
            .filter(|t| t.known == Known::Starting)
            .count();
        let ready = s.members.len() - starting;
        (starting as u32, ready as u32, s.draining.len() as u32)
    }
    fn members(&self) -> Vec<Member> {
        let s = self.state.lock().expect("kube state");
        let mut out: Vec<Member> = s
            .members
            .iter()
            .map(|(id, t)| Member {
                id: id.clone(),
                addr: t.addr,
                phase: match t.known {
                    Known::Starting => Phase::Starting,
                    Known::Ready => Phase::Ready,
                },
            })
            .collect();
        out.extend(s.draining.iter().map(|(id, (addr, _))| Member {
            id: id.clone(),
            addr: *addr,
            phase: Phase::Stopping,
        }));
        out
    }
    fn sample_usage(&self) -> Vec<(String, Phase, Usage)> {
        let phases: Vec<(String, Phase)> = {
            let s = self.state.lock().expect("kube state");
            s.members
                .iter()
                .map(|(p, t)| {
                    let phase = match t.known {
                        Known::Starting => Phase::Starting,
                        Known::Ready => Phase::Ready,
                    };
                    (p.clone(), phase)
                })
                .collect()
        };
        let u = self.usage.lock().expect("kube usage");
        if u.metrics != Some(true) {
            return Vec::new();
        }
        let now = Instant::now();
        phases
            .into_iter()
            .filter_map(|(p, phase)| {
                let c = u.pods.get(&p)?;
                Some((
                    p,
                    phase,
                    Usage {
                        cpu_seconds: c.cumulative(now),
                        memory_bytes: c.memory,
                    },
                ))
            })
            .collect()
    }
    fn cpu_allotment(&self) -> Option<f64> {
        // The pod's CPU request, as the HPA's utilization is measured against.
        let u = self.usage.lock().expect("kube usage");
        u.current.cpu.map(|c| c + u.others_cpu).filter(|c| *c > 0.0)
    }
    fn recommendation(&self) -> Option<crate::recommend::Recommendation> {
        self.vertical
            .lock()
            .expect("vertical lock")
            .recommendation(self.spec.resources.mode)
    }
    fn resizes(&self) -> Vec<crate::recommend::Resize> {
        self.vertical.lock().expect("vertical lock").resizes()
    }
    fn status(&self) -> Value {
        let (metrics, vertical, size) = {
            let u = self.usage.lock().expect("kube usage");
            let metrics = match u.metrics {
                Some(true) => "metrics.k8s.io: CPU and memory per pod",
                Some(false) => "request-based targets only (metrics.k8s.io is not served)",
                None => "not known yet (metrics.k8s.io not checked)",
            };
            let vertical = match (self.spec.resources.mode, u.resize) {
                (VerticalMode::Off, _) => "off",
                (VerticalMode::Recommend, _) => "recommend only (mode = \"recommend\")",
                (VerticalMode::Auto, Some(true)) => "auto: pods resized in place (pods/resize)",
                (VerticalMode::Auto, Some(false)) => {
                    "recommend only: the cluster has no in-place pod resize (pods/resize)"
                }
                (VerticalMode::Auto, None) => "auto: not known yet whether pods can be resized",
            };
            (
                metrics,
                vertical,
                json!({"container": u.container, "cpu": u.current.cpu,
                       "memory_bytes": u.current.memory_bytes}),
            )
        };
        let s = self.state.lock().expect("kube state");
        json!({
            "provider": "kubernetes",
            "state": if s.last_error.is_some() { "degraded" } else { "ok" },
            "namespace": self.namespace,
            "deployment": self.spec.fleet.deployment,
            "service": self.service_label,
            "replicas": s.replicas,
            "desired": s.desired,
            "external_scale": self.spec.fleet.external_scale,
            "last_error": s.last_error,
            "metrics": metrics,
            "scale_from_zero": self.spec.fleet.min == 0,
            "vertical": vertical,
            "size": size,
        })
    }
    fn collect(&self, e: &mut Exposition) {
        let svc = self.spec.service.as_str();
        let c = &self.counters;
        for (kind, v) in [("api", &c.api_failures), ("watch", &c.watch_failures)] {
            e.counter(
                "shoal_fleet_failures_total",
                "Instances that crashed or failed to start.",
                &[("service", svc), ("kind", kind)],
                v.load(Ordering::Relaxed),
            );
        }
        for (name, help, v) in [
            (
                "shoal_kube_relists_total",
                "EndpointSlice watches that expired (410 Gone) and were listed again.",
                &c.relists,
            ),
            (
                "shoal_kube_scale_conflicts_total",
                "Scale writes refused because the Deployment changed since it was read.",
                &c.conflicts,
            ),
            (
                "shoal_kube_external_scales_total",
                "Replica counts changed outside shoal.",
                &c.external_scales,
            ),
            (
                "shoal_kube_scale_writes_total",
                "Replica counts written to the scale subresource.",
                &c.scale_writes,
            ),
            (
                "shoal_kube_deletion_cost_patches_total",
                "Pods marked for removal with the lowest pod-deletion-cost.",
                &c.deletion_cost_patches,
            ),
            (
                "shoal_kube_activations_total",
                "Scale-ups from zero replicas because a request was waiting.",
                &c.activations,
            ),
        ] {
            e.counter(name, help, &[("service", svc)], v.load(Ordering::Relaxed));
        }
        self.vertical
            .lock()
            .expect("vertical lock")
            .collect_decisions(svc, e);
        let u = self.usage.lock().expect("kube usage");
        e.counter(
            "shoal_resize_failures_total",
            "Limits that could not be written to an instance's cgroup.",
            &[("service", svc)],
            u.resize_failures,
        );
        e.counter(
            "shoal_kube_metrics_failures_total",
            "Failed reads of pod usage from metrics.k8s.io.",
            &[("service", svc)],
            u.metrics_failures,
        );
        crate::vertical::collect_size(svc, u.current, e);
    }
    fn shutdown(&self, _deadline: Duration) -> BoxFuture<'_, ()> {
        // The pods belong to the cluster: shoal stops watching and scaling, nothing more.
        let _ = self.stop.send(true);
        Box::pin(async {})
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::convert::Infallible;

    /// A scripted API server: the scale subresource (a conflict on demand), one
    /// EndpointSlice, pod patches; every request logged as (method, path, body).
    #[derive(Default)]
    struct Mock {
        replicas: u32,
        rv: u64,
        conflicts: u32,
        slice: Value,
        log: Vec<(String, String, String)>,
    }

    async fn serve_mock(mock: Arc<Mutex<Mock>>) -> SocketAddr {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        tokio::spawn(async move {
            loop {
                let (sock, _) = l.accept().await.unwrap();
                let mock = mock.clone();
                tokio::spawn(async move {
                    let svc = hyper::service::service_fn(
                        move |req: Request<hyper::body::Incoming>| {
                            let mock = mock.clone();
                            async move {
                                let (method, uri) =
                                    (req.method().to_string(), req.uri().to_string());
                                let body = req.into_body().collect().await.unwrap().to_bytes();
                                let body = String::from_utf8_lossy(&body).into_owned();
                                if uri.contains("watch=true") {
                                    // Nothing changes: hold the watch open.
                                    tokio::time::sleep(Duration::from_secs(60)).await;
                                }
                                let (code, answer) = {
                                    let mut m = mock.lock().unwrap();
                                    m.log.push((method.clone(), uri.clone(), body.clone()));
                                    let scale = |m: &Mock| {
                                        json!({"metadata": {"resourceVersion": m.rv.to_string()},
                                                             "spec": {"replicas": m.replicas}})
                                    };
                                    match method.as_str() {
                                        "GET" if uri.contains("/scale") => (200, scale(&m)),
                                        "GET" => (
                                            200,
                                            json!({"metadata": {"resourceVersion": "1"}, "items": [m.slice.clone()]}),
                                        ),
                                        "PUT" => {
                                            let b: Value = serde_json::from_str(&body).unwrap();
                                            if m.conflicts > 0
                                                || b["metadata"]["resourceVersion"]
                                                    != m.rv.to_string().as_str()
                                            {
                                                m.conflicts = m.conflicts.saturating_sub(1);
                                                m.rv += 1;
                                                (
                                                    409,
                                                    json!({"kind": "Status", "code": 409, "message": "conflict"}),
                                                )
                                            } else {
                                                m.replicas =
                                                    b["spec"]["replicas"].as_u64().unwrap() as u32;
                                                m.rv += 1;
                                                (200, scale(&m))
                                            }
                                        }
                                        _ => (200, json!({})),
                                    }
                                };
                                Ok::<_, Infallible>(
                                    http::Response::builder()
                                        .status(code)
                                        .body(Full::new(Bytes::from(answer.to_string())))
                                        .unwrap(),
                                )
                            }
                        },
                    );
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(hyper_util::rt::TokioIo::new(sock), svc)
                        .await;
                });
            }
        });
        addr
    }

    /// Records membership calls.
    #[derive(Default)]
    struct Members(Mutex<Vec<String>>);

    impl Membership for Members {
        fn add(&self, id: &str, _addr: SocketAddr) {
            self.0.lock().unwrap().push(format!("add {id}"));
        }
        fn ready(&self, id: &str) {
            self.0.lock().unwrap().push(format!("ready {id}"));
        }
        fn remove(&self, id: &str, _drain: Duration) -> BoxFuture<'_, u64> {
            self.0.lock().unwrap().push(format!("remove {id}"));
            Box::pin(async { 0 })
        }
        fn in_flight(&self, id: &str) -> Option<u64> {
            // pod-a is busy: it must not be chosen.
            Some(u64::from(id == "pod-a") * 5)
        }
    }

    /// A mock with three ready pods at 3 replicas, resourceVersion 10.
    async fn three_pods() -> (Arc<Mutex<Mock>>, SocketAddr) {
        let ep = |ip: &str, pod: &str| json!({"addresses": [ip], "conditions": {"ready": true}, "targetRef": {"name": pod}});
        let mock = Arc::new(Mutex::new(Mock {
            replicas: 3,
            rv: 10,
            slice: json!({"metadata": {"name": "web-1"}, "ports": [{"port": 80}],
                          "endpoints": [ep("10.0.0.1", "pod-a"), ep("10.0.0.2", "pod-b"), ep("10.0.0.3", "pod-c")]}),
            ..Mock::default()
        }));
        let addr = serve_mock(mock.clone()).await;
        (mock, addr)
    }

    /// Members whose drains take a while.
    struct SlowDrain(Members, Duration);

    impl Membership for SlowDrain {
        fn add(&self, id: &str, addr: SocketAddr) {
            self.0.add(id, addr);
        }
        fn ready(&self, id: &str) {
            self.0.ready(id);
        }
        fn remove(&self, id: &str, drain: Duration) -> BoxFuture<'_, u64> {
            drop(self.0.remove(id, drain));
            let d = self.1;
            Box::pin(async move {
                tokio::time::sleep(d).await;
                0
            })
        }
        fn in_flight(&self, _id: &str) -> Option<u64> {
            Some(0)
        }
    }

    /// A scale-up asked for while a scale-in drains is written at once, and the scale-in
    /// then lowers nothing.
    #[tokio::test]
    async fn a_scale_up_during_a_drain_is_not_held_back() {
        let (mock, addr) = three_pods().await;
        let drain = Duration::from_secs(3);
        let fleet = KubeFleet::new(
            spec(),
            Arc::new(SlowDrain(Members::default(), drain)),
            Endpoint {
                server: format!("http://{addr}"),
                ..Endpoint::default()
            },
        )
        .unwrap();
        fleet.start();
        wait_for("three pods", || fleet.counts() == (0, 3, 0)).await;
        fleet.scale(1);
        wait_for("two pods draining", || fleet.counts().2 == 2).await;
        let t = Instant::now();
        fleet.scale(4);
        wait_for("scaled to 4", || mock.lock().unwrap().replicas == 4).await;
        assert!(t.elapsed() < drain, "the scale-up waited for the drain");
        wait_for("the scale-in task ended", || {
            !fleet.scaling_in.load(Ordering::Acquire)
        })
        .await;
        assert_eq!(mock.lock().unwrap().replicas, 4);
        let lowered = scale_requests(&mock).iter().any(|(m, b)| {
            m.starts_with("PUT")
                && serde_json::from_str::<Value>(b).unwrap()["spec"]["replicas"] == 1
        });
        assert!(!lowered, "the aborted scale-in lowered replicas");
        let _ = fleet.shutdown(Duration::ZERO).await;
    }

    fn spec() -> FleetSpec {
        FleetSpec {
            service: "web".into(),
            fleet: toml::from_str(
                "provider = \"kubernetes\"\ndeployment = \"web\"\nmin = 1\nmax = 5",
            )
            .unwrap(),
            resources: Default::default(),
            autoscale: None,
            data_dir: std::env::temp_dir(),
            drain_timeout: Duration::from_secs(1),
            probe: Default::default(),
        }
    }

    async fn wait_for(what: &str, mut f: impl FnMut() -> bool) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while !f() {
            assert!(Instant::now() < deadline, "timed out waiting for {what}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    fn scale_requests(mock: &Mutex<Mock>) -> Vec<(String, String)> {
        mock.lock()
            .unwrap()
            .log
            .iter()
            .filter(|(_, u, _)| u.contains("/scale") || u.contains("/pods/"))
            .map(|(m, u, b)| (format!("{m} {}", u.rsplit('/').next().unwrap()), b.clone()))
            .collect()
    }

    /// A 409 on a scale write is read again and written with the new resourceVersion; a
    /// scale-in drains the chosen pods (not the busy one), patches their deletion cost, and
    /// only then writes the lower count.
    #[tokio::test]
    async fn conflict_is_reread_and_scale_in_patches_cost_first() {
        let (mock, addr) = three_pods().await;
        let members = Arc::new(Members::default());
        let fleet = KubeFleet::new(
            spec(),
            members.clone(),
            Endpoint {
                server: format!("http://{addr}"),
                ..Endpoint::default()
            },
        )
        .unwrap();
        fleet.start();
        wait_for("first read and three pods", || {
            fleet.desired() == 3 && fleet.counts() == (0, 3, 0)
        })
        .await;

        mock.lock().unwrap().conflicts = 1;
        fleet.scale(4);
        wait_for("scaled to 4", || mock.lock().unwrap().replicas == 4).await;
        let puts: Vec<(String, String)> = scale_requests(&mock)
            .into_iter()
            .filter(|(m, _)| m.starts_with("PUT"))
            .collect();
        assert_eq!(puts.len(), 2, "{puts:?}");
        let rv = |b: &str| {
            serde_json::from_str::<Value>(b).unwrap()["metadata"]["resourceVersion"].clone()
        };
        assert_eq!(rv(&puts[0].1), "10");
        assert_eq!(
            rv(&puts[1].1),
            "11",
            "the retry carries the re-read version"
        );
        assert_eq!(fleet.counters.conflicts.load(Ordering::Relaxed), 1);

        // 4 replicas, 3 endpoints: the 4th pod is pending, and the ReplicaSet controller
        // deletes it before any ready pod, so 4 → 1 drains two ready pods, not three.
        mock.lock().unwrap().log.clear();
        fleet.scale(1);
        wait_for("scaled to 1", || mock.lock().unwrap().replicas == 1).await;
        let reqs = scale_requests(&mock);
        let order: Vec<&str> = reqs.iter().map(|(m, _)| m.as_str()).collect();
        let put = order.iter().position(|m| m.starts_with("PUT")).unwrap();
        let mut patched: Vec<&str> = order[..put]
            .iter()
            .filter(|m| m.starts_with("PATCH"))
            .copied()
            .collect();
        patched.sort();
        assert_eq!(patched, ["PATCH pod-b", "PATCH pod-c"], "{order:?}");
        for (m, b) in &reqs {
            if m.starts_with("PATCH") {
                assert_eq!(
                    serde_json::from_str::<Value>(b).unwrap()["metadata"]["annotations"]
                        [DELETION_COST],
                    LOWEST_DELETION_COST
                );
            }
        }
        let calls = members.0.lock().unwrap().clone();
        assert!(
            calls.contains(&"remove pod-b".to_string())
                && calls.contains(&"remove pod-c".to_string()),
            "{calls:?}"
        );
        assert!(
            !calls.contains(&"remove pod-a".to_string()),
            "the busy pod was chosen: {calls:?}"
        );
        let _ = fleet.shutdown(Duration::ZERO).await;
    }

    #[test]
    fn quantities_and_pod_metrics() {
        for (q, v) in [
            ("250m", 0.25),
            ("2", 2.0),
            ("0.5", 0.5),
            ("1500000n", 0.0015),
            ("128Mi", 134_217_728.0),
            ("1G", 1e9),
            ("1e3", 1000.0),
            ("12Ki", 12_288.0),
        ] {
            assert!((parse_quantity(q).unwrap() - v).abs() < 1e-9, "{q}");
        }
        for bad in ["", "m", "-1", "1x", "1Qi", "NaN"] {
            assert!(parse_quantity(bad).is_none(), "{bad}");
        }
        let list = json!({"items": [
            {"metadata": {"name": "a"}, "containers": [
                {"name": "app", "usage": {"cpu": "250000000n", "memory": "1024Ki"}},
                {"name": "side", "usage": {"cpu": "50m", "memory": "1Mi"}}]},
            {"metadata": {"name": "b"}, "containers": [{"name": "app", "usage": {"cpu": "bogus"}}]},
            {"metadata": {}, "containers": []}]});
        let m = pod_metrics(&list);
        assert_eq!(m.len(), 2);
        assert!((m["a"].0 - 0.3).abs() < 1e-9);
        assert_eq!(m["a"].1, 2 << 20);
        assert_eq!(m["b"], (0.0, 0));
    }

    #[test]
    fn pod_cpu_integrates_rates_between_reports() {
        let t0 = Instant::now();
        let mut p = PodCpu::new(t0, 0.5, 10);
        assert!((p.cumulative(t0 + Duration::from_secs(2)) - 1.0).abs() < 1e-9);
        // A report after 4 s at a new rate: the 4 s are charged at the old one.
        p.advance(t0 + Duration::from_secs(4), 1.0, 20);
        assert!((p.cumulative(t0 + Duration::from_secs(4)) - 2.0).abs() < 1e-9);
        assert!((p.cumulative(t0 + Duration::from_secs(6)) - 4.0).abs() < 1e-9);
        assert_eq!(p.memory, 20);
        // A report continues the curve (no jump), then it runs at the new rate.
        let t6 = t0 + Duration::from_secs(6);
        let before = p.cumulative(t6);
        p.advance(t6, 0.0, 20);
        assert!((p.cumulative(t6) - before).abs() < 1e-9);
        assert!((p.cumulative(t0 + Duration::from_secs(9)) - before).abs() < 1e-9);
    }

    #[test]
    fn template_size_and_resize_patches() {
        let d = json!({"spec": {"template": {"spec": {"containers": [
            {"name": "proxy", "resources": {"requests": {"cpu": "100m"}}},
            {"name": "app", "resources": {"requests": {"cpu": "500m", "memory": "128Mi"},
                                          "limits": {"cpu": "1", "memory": "256Mi"}}}]}}}});
        let Template {
            container: c,
            size,
            ratio,
            others_cpu: others,
        } = template_size(&d, Some("app"));
        assert_eq!(c.as_deref(), Some("app"));
        assert_eq!(size.cpu, Some(0.5));
        assert_eq!(size.memory_bytes, Some(128 << 20));
        assert_eq!(ratio, (Some(2.0), Some(2.0)));
        assert!((others - 0.1).abs() < 1e-9);
        let t = template_size(&d, None);
        assert_eq!(
            (t.container.as_deref(), t.size.cpu),
            (Some("proxy"), Some(0.1))
        );
        assert_eq!(template_size(&d, Some("nope")), Template::default());

        // Up: requests to the size, limits keep their ratio.
        let to = Size {
            cpu: Some(0.75),
            memory_bytes: Some(200 << 20),
        };
        let p = resize_patch("app", to, size_of(0.5, 128), (Some(2.0), Some(2.0)));
        let r = &p["spec"]["containers"][0];
        assert_eq!(r["name"], "app");
        assert_eq!(r["resources"]["requests"]["cpu"], "750m");
        assert_eq!(r["resources"]["limits"]["cpu"], "1500m");
        assert_eq!(r["resources"]["requests"]["memory"], "200Mi");
        assert_eq!(r["resources"]["limits"]["memory"], "400Mi");
        // Memory down: the request only (no in-place limit decrease).
        let p = resize_patch(
            "app",
            size_of(0.5, 64),
            size_of(0.5, 128),
            (None, Some(2.0)),
        );
        let r = &p["spec"]["containers"][0]["resources"];
        assert_eq!(r["requests"]["memory"], "64Mi");
        assert!(r.get("limits").is_none(), "{r}");
    }

    fn size_of(cpu: f64, mib: u64) -> Size {
        Size {
            cpu: Some(cpu),
            memory_bytes: Some(mib << 20),
        }
    }

    #[test]
    fn a_rotated_token_file_is_used_from_the_next_call() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("token");
        std::fs::write(&f, "first\n").unwrap();
        let ep = Endpoint {
            token: Some("first".into()),
            token_file: Some(f.clone()),
            ..Endpoint::default()
        };
        assert_eq!(ep.current_token().as_deref(), Some("first"));
        std::fs::write(&f, "second\n").unwrap();
        assert_eq!(ep.current_token().as_deref(), Some("second"));
    }

    #[test]
    fn kubeconfig_yaml_current_context() {
        let text = r#"
apiVersion: v1
kind: Config
current-context: b
clusters:
- name: one
  cluster: {server: "http://10.0.0.1:8080/"}
contexts:
- name: a
  context: {cluster: none, user: u}
- name: b
  context: {cluster: one, user: u, namespace: web}
users:
- name: u
  user: {token: abc}
"#;
        let ep = parse_kubeconfig(text).unwrap();
        assert_eq!(ep.server, "http://10.0.0.1:8080");
        assert_eq!(ep.token.as_deref(), Some("abc"));
        assert!(
            !format!("{ep:?}").contains("abc"),
            "the token is not in Debug output"
        );
        assert_eq!(ep.namespace.as_deref(), Some("web"));
        let https = text.replace("http://10.0.0.1:8080/", "https://k");
        let ep = parse_kubeconfig(&https).unwrap();
        let err = KubeClient::new(ep).err().unwrap();
        assert!(err.contains("certificate-authority"), "{err}");
        let exec = text.replace(
            "user: {token: abc}",
            "user: {exec: {apiVersion: client.authentication.k8s.io/v1beta1, command: aws, args: [eks, get-token], env: [{name: AWS_PROFILE, value: secret-profile}]}}",
        );
        let ep = parse_kubeconfig(&exec).unwrap();
        let plugin = ep.exec.as_ref().unwrap();
        assert_eq!(
            (plugin.command.as_str(), plugin.args.clone()),
            ("aws", vec!["eks".to_string(), "get-token".to_string()])
        );
        assert_eq!(plugin.api_version, "client.authentication.k8s.io/v1beta1");
        assert!(!format!("{ep:?}").contains("secret-profile"));
        let interactive = exec.replace("command: aws", "command: aws, interactiveMode: Always");
        assert!(parse_kubeconfig(&interactive).is_err());
        let provider = text.replace("user: {token: abc}", "user: {auth-provider: {name: gcp}}");
        assert!(parse_kubeconfig(&provider).unwrap_err().contains("exec"));
        assert!(parse_kubeconfig("current-context: x").is_err());
    }

    #[test]
    fn exec_credentials_and_timestamps() {
        let t = parse_rfc3339("2026-12-07T20:16:20Z").unwrap();
        assert_eq!(
            t.duration_since(UNIX_EPOCH).unwrap().as_secs(),
            1_796_674_580
        );
        assert_eq!(parse_rfc3339("2026-12-07T21:16:20.123+01:00"), Some(t));
        assert_eq!(parse_rfc3339("1970-01-01T00:00:00Z"), Some(UNIX_EPOCH));
        for bad in [
            "",
            "2026-12-07",
            "2026-13-07T20:16:20Z",
            "2026-12-07T20:16:20",
            "2026-12-07T20:16:20.Z",
        ] {
            assert!(parse_rfc3339(bad).is_none(), "{bad}");
        }
        let (tok, exp) = parse_exec_credential(
            br#"{"apiVersion":"client.authentication.k8s.io/v1","kind":"ExecCredential","status":{"token":"k8s-aws-v1.x","expirationTimestamp":"2026-12-07T20:16:20Z"}}"#,
        )
        .unwrap();
        assert_eq!((tok.as_str(), exp), ("k8s-aws-v1.x", Some(t)));
        assert!(parse_exec_credential(
            br#"{"kind":"ExecCredential","status":{"clientCertificateData":"x"}}"#
        )
        .is_err());
        assert!(parse_exec_credential(b"token").is_err());
    }

    /// The plugin runs once while its token is fresh, again once it expires or after a 401.
    #[tokio::test]
    async fn exec_plugin_tokens_are_cached_until_expiry() {
        let dir = tempfile::tempdir().unwrap();
        let count = dir.path().join("runs");
        let script = dir.path().join("plugin.sh");
        // Each run appends a line; the token names the run; the expiry comes from $EXPIRY.
        std::fs::write(
            &script,
            format!(
                "#!/bin/sh\necho run >> {c}\nn=$(wc -l < {c})\necho \"$KUBERNETES_EXEC_INFO\" | grep -q ExecCredential || exit 3\nprintf '{{\"kind\":\"ExecCredential\",\"status\":{{\"token\":\"t%s\",\"expirationTimestamp\":\"%s\"}}}}' \"$n\" \"$EXPIRY\"\n",
                c = count.display()
            ),
        )
        .unwrap();
        let client = |expiry: &str| {
            KubeClient::new(Endpoint {
                server: "http://127.0.0.1:1".into(),
                exec: Some(ExecPlugin {
                    api_version: "client.authentication.k8s.io/v1".into(),
                    command: "sh".into(),
                    args: vec![script.display().to_string()],
                    env: vec![("EXPIRY".into(), expiry.into())],
                }),
                ..Endpoint::default()
            })
            .unwrap()
        };
        let runs = || std::fs::read_to_string(&count).unwrap().lines().count();
        let fresh = client("2999-01-01T00:00:00Z");
        assert_eq!(fresh.token().await.unwrap().as_deref(), Some("t1"));
        assert_eq!(fresh.token().await.unwrap().as_deref(), Some("t1"));
        assert_eq!(runs(), 1);
        fresh.unauthorized(Some("t1")).await;
        assert_eq!(fresh.token().await.unwrap().as_deref(), Some("t2"));
        let expired = client("2000-01-01T00:00:00Z");
        assert_eq!(expired.token().await.unwrap().as_deref(), Some("t3"));
        assert_eq!(expired.token().await.unwrap().as_deref(), Some("t4"));
        // A failing plugin is an error of the call, not a request without credentials.
        let failing = KubeClient::new(Endpoint {
            server: "http://127.0.0.1:1".into(),
            exec: Some(ExecPlugin {
                command: "false".into(),
                ..ExecPlugin::default()
            }),
            ..Endpoint::default()
        })
        .unwrap();
        let e = failing
            .call(Method::GET, "/api", "", None)
            .await
            .unwrap_err();
        assert!(e.message.contains("credential plugin false failed"), "{e}");
    }

    /// https: the kubeconfig's CA (base64 `certificate-authority-data`) verifies the server;
    /// another CA is refused; the token and Host go over TLS.
    #[tokio::test]
    async fn https_api_server_with_the_kubeconfigs_ca() {
        use base64::Engine;
        use rustls::pki_types::pem::PemObject;
        let fixtures = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/");
        let read = |f: &str| std::fs::read(format!("{fixtures}{f}")).unwrap();
        let certs = rustls::pki_types::CertificateDer::pem_slice_iter(&read("apiserver.pem"))
            .collect::<Result<Vec<_>, _>>()
            .unwrap();
        let key = rustls::pki_types::PrivateKeyDer::from_pem_slice(&read("apiserver.key")).unwrap();
        let server = rustls::ServerConfig::builder_with_provider(Arc::new(
            rustls::crypto::aws_lc_rs::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .unwrap();
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(server));
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        tokio::spawn(async move {
            loop {
                let (sock, _) = l.accept().await.unwrap();
                let acceptor = acceptor.clone();
                tokio::spawn(async move {
                    let Ok(tls) = acceptor.accept(sock).await else {
                        return;
                    };
                    let svc = hyper::service::service_fn(
                        |req: Request<hyper::body::Incoming>| async move {
                            let seen = json!({
                                "path": req.uri().to_string(),
                                "host": req.headers()["host"].to_str().unwrap(),
                                "auth": req.headers()["authorization"].to_str().unwrap(),
                            });
                            Ok::<_, Infallible>(http::Response::new(Full::new(Bytes::from(
                                seen.to_string(),
                            ))))
                        },
                    );
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(tls), svc)
                        .await;
                });
            }
        });
        let kubeconfig = |ca: &str| {
            let b64 = base64::engine::general_purpose::STANDARD.encode(read(ca));
            format!(
                "current-context: c\nclusters: [{{name: k, cluster: {{server: \"https://{addr}\", certificate-authority-data: {b64}}}}}]\ncontexts: [{{name: c, context: {{cluster: k, user: u}}}}]\nusers: [{{name: u, user: {{token: sekret}}}}]\n"
            )
        };
        let client = KubeClient::new(parse_kubeconfig(&kubeconfig("ca.pem")).unwrap()).unwrap();
        let v = client
            .call(Method::GET, "/version", "", None)
            .await
            .unwrap();
        assert_eq!(v["path"], "/version");
        assert_eq!(v["host"], addr.to_string());
        assert_eq!(v["auth"], "Bearer sekret");
        let wrong =
            KubeClient::new(parse_kubeconfig(&kubeconfig("other-ca.pem")).unwrap()).unwrap();
        let e = wrong
            .call(Method::GET, "/version", "", None)
            .await
            .unwrap_err();
        assert!(e.message.contains("TLS"), "{e}");
    }

    /// Membership follows the slices: a ready pod that turns unready stops getting requests
    /// and is back once ready; terminating → removed; a deleted slice removes its pods.
    #[tokio::test]
    async fn membership_follows_endpoint_conditions() {
        let members = Arc::new(Members::default());
        let fleet = KubeFleet::new(
            spec(),
            members.clone(),
            Endpoint {
                server: "http://127.0.0.1:1".into(),
                ..Endpoint::default()
            },
        )
        .unwrap();
        let slice = |a: (bool, bool), b: (bool, bool)| {
            let ep = |ip: &str, pod: &str, (ready, terminating): (bool, bool)| {
                json!({"addresses": [ip], "targetRef": {"name": pod},
                       "conditions": {"ready": ready, "serving": ready || terminating, "terminating": terminating}})
            };
            json!({"type": "MODIFIED", "object": {"metadata": {"name": "s", "resourceVersion": "7"},
                   "ports": [{"port": 80}],
                   "endpoints": [ep("10.0.0.1", "a", a), ep("10.0.0.2", "b", b)]}})
        };
        // Removals run on spawned tasks: let them run, then take what was called.
        let calls = || async {
            for _ in 0..10 {
                tokio::task::yield_now().await;
            }
            std::mem::take(&mut *members.0.lock().unwrap())
        };
        fleet
            .apply_event(&slice((true, false), (false, false)))
            .ok();
        assert_eq!(calls().await, ["add a", "ready a", "add b"]);
        assert_eq!(fleet.counts(), (1, 1, 0));
        fleet
            .apply_event(&slice((false, false), (true, false)))
            .ok();
        assert_eq!(calls().await, ["ready b", "remove a"]);
        fleet
            .apply_event(&slice((false, false), (true, false)))
            .ok();
        assert!(calls().await.is_empty(), "nothing changed");
        fleet.apply_event(&slice((true, false), (false, true))).ok();
        assert_eq!(calls().await, ["add a", "ready a", "remove b"]);
        assert_eq!(fleet.state.lock().unwrap().watch_rv, "7");
        let deleted = json!({"type": "DELETED", "object": {"metadata": {"name": "s", "resourceVersion": "9"}}});
        fleet.apply_event(&deleted).ok();
        assert_eq!(calls().await, ["remove a"]);
        assert_eq!(fleet.counts(), (0, 0, 0));
        let gone = json!({"type": "ERROR", "object": {"kind": "Status", "code": 410}});
        assert!(matches!(fleet.apply_event(&gone), Err(WatchEnd::Gone)));
        let bookmark =
            json!({"type": "BOOKMARK", "object": {"metadata": {"resourceVersion": "12"}}});
        fleet.apply_event(&bookmark).ok();
        assert_eq!(fleet.state.lock().unwrap().watch_rv, "12");
    }

    /// A replica count changed outside shoal: adopted in `respect` mode, written back in
    /// `reconcile` mode; counted either way.
    #[tokio::test]
    async fn external_scale_respected_or_reconciled() {
        for mode in ["respect", "reconcile"] {
            let mock = Arc::new(Mutex::new(Mock {
                replicas: 2,
                rv: 10,
                slice: json!({"metadata": {"name": "s"}, "ports": [{"port": 80}], "endpoints": []}),
                ..Mock::default()
            }));
            let addr = serve_mock(mock.clone()).await;
            let mut sp = spec();
            sp.fleet.external_scale = mode.into();
            let fleet = KubeFleet::new(
                sp,
                Arc::new(Members::default()),
                Endpoint {
                    server: format!("http://{addr}"),
                    ..Endpoint::default()
                },
            )
            .unwrap();
            fleet.start();
            wait_for("first read", || fleet.desired() == 2).await;
            {
                let mut m = mock.lock().unwrap();
                m.replicas = 4;
                m.rv += 1;
            }
            wait_for("external change seen", || {
                fleet.counters.external_scales.load(Ordering::Relaxed) == 1
            })
            .await;
            if mode == "respect" {
                assert_eq!(fleet.desired(), 4);
                // Two more reads of the count, and still nothing written.
                let reads = || {
                    let m = mock.lock().unwrap();
                    let gets = m
                        .log
                        .iter()
                        .filter(|(v, u, _)| v == "GET" && u.ends_with("/scale"));
                    (gets.count(), m.log.iter().any(|(v, _, _)| v == "PUT"))
                };
                let seen = reads().0;
                wait_for("two more reads", || reads().0 >= seen + 2).await;
                assert!(!reads().1, "respect mode wrote the count");
                assert_eq!(mock.lock().unwrap().replicas, 4);
            } else {
                assert_eq!(fleet.desired(), 2);
                wait_for("count written back", || mock.lock().unwrap().replicas == 2).await;
            }
            let _ = fleet.shutdown(Duration::ZERO).await;
        }
    }

    /// Scale-in victims: a pod shoal drained that is still live comes first; one already
    /// terminating is outside the replica count and never chosen again; then the idlest.
    #[tokio::test]
    async fn victims_skip_pods_already_terminating() {
        let members = Arc::new(Members::default());
        let fleet = KubeFleet::new(
            spec(),
            members,
            Endpoint {
                server: "http://127.0.0.1:1".into(),
                ..Endpoint::default()
            },
        )
        .unwrap();
        let ep = |ip: &str, pod: &str, terminating: bool| {
            json!({"addresses": [ip], "targetRef": {"name": pod},
                   "conditions": {"ready": !terminating, "terminating": terminating}})
        };
        let ev = json!({"type": "ADDED", "object": {"metadata": {"name": "s"}, "ports": [{"port": 80}],
            "endpoints": [ep("10.0.0.1", "pod-a", false), ep("10.0.0.2", "pod-b", false),
                          ep("10.0.0.3", "gone", true), ep("10.0.0.4", "kept", false)]}});
        fleet.apply_event(&ev).ok();
        {
            let mut s = fleet.state.lock().unwrap();
            let addr: SocketAddr = "10.0.0.3:80".parse().unwrap();
            s.draining.insert("gone".into(), (addr, Instant::now()));
            s.members.remove("kept");
            s.draining.insert("kept".into(), (addr, Instant::now()));
        }
        // pod-a is busy (Members::in_flight), so pod-b follows the drained live pod.
        assert_eq!(fleet.choose_victims(2), ["kept", "pod-b"]);
    }

    #[test]
    fn endpoint_conditions_and_port_choice() {
        let slice = json!({
            "ports": [{"name": "metrics", "port": 9090}, {"name": "http", "port": 8080}],
            "endpoints": [
                {"addresses": ["10.0.0.1"], "conditions": {"ready": true}, "targetRef": {"name": "a"}},
                {"addresses": ["10.0.0.2"], "conditions": {"ready": false, "serving": true, "terminating": true}, "targetRef": {"name": "b"}},
                {"addresses": ["10.0.0.3"], "targetRef": {"name": "c"}},
                {"addresses": [], "targetRef": {"name": "d"}},
            ]
        });
        let eps = slice_endpoints(&slice, Some(&PortRef::Name("http".into())));
        assert_eq!(eps.len(), 3);
        assert_eq!(eps[0].addr, "10.0.0.1:8080".parse().unwrap());
        assert!(eps[0].ready && !eps[0].terminating);
        assert!(!eps[1].ready && eps[1].serving && eps[1].terminating);
        assert!(eps[2].ready, "absent conditions mean ready");
        assert_eq!(slice_endpoints(&slice, None)[0].addr.port(), 9090);
        assert_eq!(
            slice_endpoints(&slice, Some(&PortRef::Number(8080)))[0]
                .addr
                .port(),
            8080
        );
        assert!(slice_endpoints(&slice, Some(&PortRef::Number(1))).is_empty());
    }

    #[test]
    fn selector_is_query_encoded() {
        assert_eq!(
            encode("kubernetes.io/service-name=demo,x!=y"),
            "kubernetes.io/service-name%3Ddemo%2Cx%21%3Dy"
        );
    }
}
