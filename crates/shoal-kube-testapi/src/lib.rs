//! **A test double of the Kubernetes API server** — for shoal's tests and for trying shoal's
//! Kubernetes provider on one machine. No kube-apiserver can be installed where shoal is
//! built, so this implements the published API semantics shoal and `kubectl` rely on, over
//! plain HTTP, in memory:
//!
//! - discovery: `/api`, `/apis`, `/api/v1`, `/apis/GROUP/VERSION`, `/version`;
//! - one monotonic `resourceVersion` over all objects; list and watch (`watch=true`,
//!   resume from a `resourceVersion`, `allowWatchBookmarks`, a `410 Gone` ERROR event for a
//!   version older than the kept history), label and `metadata.name` field selectors;
//! - create (`dryRun=All` validates and stores nothing), update (`409 Conflict` on a stale
//!   `metadata.resourceVersion`), delete, JSON merge patch and strategic merge patch (lists of
//!   containers, ports, env, volumes merged by key), JSON patch (add/replace/remove);
//! - the Deployment `scale` subresource (`autoscaling/v1` Scale), `status` subresources, the
//!   pods `resize` subresource (in-place resize: only containers' cpu/memory resources may
//!   change, applied at once and reported in the container statuses; off with
//!   `pod_resize = false`);
//! - `metrics.k8s.io/v1beta1` PodMetrics measured from each pod process's `/proc` every
//!   second (off with `metrics_api = false`), so `kubectl top pod` works;
//! - namespaced objects only in an existing Namespace;
//! - Pods, Deployments, EndpointSlices (`discovery.k8s.io/v1`), Leases
//!   (`coordination.k8s.io/v1`), Namespaces, Services, ConfigMaps, ServiceAccounts, RBAC
//!   objects and PodDisruptionBudgets (stored, not enforced);
//! - a Deployment controller ([`controller`]) that runs one `shoal demo-service` process per
//!   pod on its own loopback address (`127.x.y.z`, the container port), honours
//!   `controller.kubernetes.io/pod-deletion-cost` when scaling in, marks a pod terminating
//!   (deletionTimestamp; its endpoint `serving && terminating`) for a grace delay before it
//!   SIGTERMs the process, and publishes one EndpointSlice per Deployment labelled
//!   `kubernetes.io/service-name=DEPLOYMENT` with ready/serving/terminating conditions.
//!
//! Test hooks (not Kubernetes API): `GET /_test/requests` is the log of every API request
//! (method, path and query, content type, user agent, body, status, milliseconds since
//! start, in order);
//! `POST /_test/compact` forgets all event history and ends every open watch, so a client
//! resuming from its last `resourceVersion` gets `410 Gone`.
//!
//! Also: protobuf request bodies for Deployments (`kubectl create deployment` sends nothing
//! else), and OpenAPI v3 documents reduced to each kind's PATCH operation with its
//! `fieldValidation` parameter (what kubectl reads to validate server-side).
//!
//! Not implemented: authentication, admission, server-side apply, schemas, server-side
//! table printing (kubectl prints NAME and AGE), garbage collection beyond a Deployment's own
//! pods, ReplicaSets, rollouts.

pub mod controller;
pub mod patch;
pub mod proto;

use std::collections::{BTreeMap, VecDeque};
use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use http::{Method, Request, Response};
use http_body::{Body, Frame};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use serde_json::{json, Map, Value};
use tokio::net::TcpListener;
use tokio::sync::{broadcast, mpsc, watch, Notify};

/// A served resource type.
#[derive(Debug, Clone, Copy)]
pub struct Res {
    pub group: &'static str,
    pub version: &'static str,
    pub plural: &'static str,
    pub singular: &'static str,
    pub kind: &'static str,
    pub namespaced: bool,
    pub short: &'static [&'static str],
    pub subresources: &'static [&'static str],
}

impl Res {
    pub fn api_version(&self) -> String {
        if self.group.is_empty() {
            self.version.to_string()
        } else {
            format!("{}/{}", self.group, self.version)
        }
    }
}

const fn res(
    group: &'static str,
    version: &'static str,
    plural: &'static str,
    singular: &'static str,
    kind: &'static str,
    namespaced: bool,
    short: &'static [&'static str],
    subresources: &'static [&'static str],
) -> Res {
    Res {
        group,
        version,
        plural,
        singular,
        kind,
        namespaced,
        short,
        subresources,
    }
}

/// Everything served.
pub const RESOURCES: &[Res] = &[
    res(
        "",
        "v1",
        "namespaces",
        "namespace",
        "Namespace",
        false,
        &["ns"],
        &[],
    ),
    res(
        "",
        "v1",
        "pods",
        "pod",
        "Pod",
        true,
        &["po"],
        &["status", "resize"],
    ),
    res(
        "",
        "v1",
        "services",
        "service",
        "Service",
        true,
        &["svc"],
        &[],
    ),
    res(
        "",
        "v1",
        "configmaps",
        "configmap",
        "ConfigMap",
        true,
        &["cm"],
        &[],
    ),
    res(
        "",
        "v1",
        "serviceaccounts",
        "serviceaccount",
        "ServiceAccount",
        true,
        &["sa"],
        &[],
    ),
    res(
        "apps",
        "v1",
        "deployments",
        "deployment",
        "Deployment",
        true,
        &["deploy"],
        &["scale", "status"],
    ),
    res(
        "discovery.k8s.io",
        "v1",
        "endpointslices",
        "endpointslice",
        "EndpointSlice",
        true,
        &[],
        &[],
    ),
    res(
        "coordination.k8s.io",
        "v1",
        "leases",
        "lease",
        "Lease",
        true,
        &[],
        &[],
    ),
    res(
        "rbac.authorization.k8s.io",
        "v1",
        "roles",
        "role",
        "Role",
        true,
        &[],
        &[],
    ),
    res(
        "rbac.authorization.k8s.io",
        "v1",
        "rolebindings",
        "rolebinding",
        "RoleBinding",
        true,
        &[],
        &[],
    ),
    res(
        "rbac.authorization.k8s.io",
        "v1",
        "clusterroles",
        "clusterrole",
        "ClusterRole",
        false,
        &[],
        &[],
    ),
    res(
        "rbac.authorization.k8s.io",
        "v1",
        "clusterrolebindings",
        "clusterrolebinding",
        "ClusterRoleBinding",
        false,
        &[],
        &[],
    ),
    res(
        "policy",
        "v1",
        "poddisruptionbudgets",
        "poddisruptionbudget",
        "PodDisruptionBudget",
        true,
        &["pdb"],
        &["status"],
    ),
];

pub fn find_res(group: &str, version: &str, plural: &str) -> Option<&'static Res> {
    RESOURCES
        .iter()
        .find(|r| r.group == group && r.version == version && r.plural == plural)
}

/// Settings of a test apiserver.
#[derive(Debug, Clone)]
pub struct Options {
    pub listen: SocketAddr,
    /// Where to write a kubeconfig pointing at this server (JSON, which YAML readers take).
    pub kubeconfig: Option<PathBuf>,
    /// The shoal binary whose `demo-service` pods run.
    pub shoal: PathBuf,
    /// Time between watch bookmarks.
    pub bookmark_interval: Duration,
    /// How long a deleted pod stays terminating (endpoint `serving && terminating`) before its
    /// process gets SIGTERM, like a preStop hook.
    pub termination_delay: Duration,
    /// Events kept for watches to resume from.
    pub history: usize,
    /// Serve `metrics.k8s.io/v1beta1` PodMetrics (CPU and memory measured from each pod's
    /// process), as a cluster with metrics-server does.
    pub metrics_api: bool,
    /// Serve the pods `resize` subresource (in-place pod vertical scaling, Kubernetes 1.33+).
    pub pod_resize: bool,
}

impl Options {
    pub fn new(listen: SocketAddr, shoal: PathBuf) -> Options {
        Options {
            listen,
            kubeconfig: None,
            shoal,
            bookmark_interval: Duration::from_secs(1),
            termination_delay: Duration::from_millis(1500),
            history: 10_000,
            metrics_api: true,
            pod_resize: true,
        }
    }
}

/// One API request, as the request log keeps it.
#[derive(Debug, Clone)]
pub struct Logged {
    pub ms: u64,
    pub method: String,
    /// Path and query.
    pub uri: String,
    pub content_type: String,
    pub user_agent: String,
    pub body: String,
    pub status: u16,
}

impl Logged {
    fn to_json(&self) -> Value {
        json!({"ms": self.ms, "method": self.method, "uri": self.uri,
               "content_type": self.content_type, "user_agent": self.user_agent,
               "body": self.body, "status": self.status})
    }
}

/// A change of one object, in resourceVersion order.
#[derive(Debug, Clone)]
pub struct Event {
    pub rv: u64,
    /// `group/plural`.
    pub res: String,
    pub namespace: String,
    pub kind: &'static str,
    pub object: Value,
}

/// The object store.
pub struct Store {
    pub rv: u64,
    /// Key: `group/plural/namespace/name`.
    pub objects: BTreeMap<String, Value>,
    pub events: VecDeque<Event>,
    /// Watches may resume from versions >= this; older ones are 410 Gone.
    pub oldest: u64,
    history: usize,
    pub tx: broadcast::Sender<Event>,
    uid: u64,
}

pub fn key(res: &Res, ns: &str, name: &str) -> String {
    format!("{}/{}/{}/{}", res.group, res.plural, ns, name)
}

pub fn now_rfc3339() -> String {
    let secs = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs();
    let (days, rem) = (secs / 86_400, secs % 86_400);
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

impl Store {
    fn new(history: usize) -> Store {
        let (tx, _) = broadcast::channel(4096);
        Store {
            rv: 1,
            objects: BTreeMap::new(),
            events: VecDeque::new(),
            oldest: 1,
            history,
            tx,
            uid: 0,
        }
    }

    fn record(&mut self, res: &Res, ns: &str, kind: &'static str, object: Value) {
        let e = Event {
            rv: self.rv,
            res: format!("{}/{}", res.group, res.plural),
            namespace: ns.to_string(),
            kind,
            object,
        };
        self.events.push_back(e.clone());
        while self.events.len() > self.history {
            if let Some(old) = self.events.pop_front() {
                self.oldest = old.rv;
            }
        }
        let _ = self.tx.send(e);
    }

    /// Stores a new object (metadata filled in); Err(409) if it exists.
    pub fn create(&mut self, res: &Res, ns: &str, mut obj: Value) -> Result<Value, Value> {
        let name = obj["metadata"]["name"].as_str().unwrap_or("").to_string();
        let k = key(res, ns, &name);
        if self.objects.contains_key(&k) {
            return Err(status_err(
                409,
                "AlreadyExists",
                &format!("{} \"{name}\" already exists", res.plural),
            ));
        }
        self.rv += 1;
        self.uid += 1;
        let md = obj["metadata"].as_object_mut().expect("metadata checked");
        md.insert(
            "uid".into(),
            json!(format!("00000000-0000-4000-8000-{:012x}", self.uid)),
        );
        md.insert("creationTimestamp".into(), json!(now_rfc3339()));
        md.insert("resourceVersion".into(), json!(self.rv.to_string()));
        md.insert("generation".into(), json!(1));
        if res.namespaced {
            md.insert("namespace".into(), json!(ns));
        }
        self.objects.insert(k, obj.clone());
        self.record(res, ns, "ADDED", obj.clone());
        Ok(obj)
    }

    /// Replaces an object; `expect_rv` is a precondition (409 when stale).
    pub fn update(
        &mut self,
        res: &Res,
        ns: &str,
        name: &str,
        mut obj: Value,
        expect_rv: Option<&str>,
    ) -> Result<Value, Value> {
        let k = key(res, ns, name);
        let Some(old) = self.objects.get(&k) else {
            return Err(not_found(res, name));
        };
        let cur = old["metadata"]["resourceVersion"].as_str().unwrap_or("");
        if let Some(want) = expect_rv.filter(|v| !v.is_empty()) {
            if want != cur {
                return Err(status_err(
                    409,
                    "Conflict",
                    &format!(
                        "Operation cannot be fulfilled on {}.{} \"{name}\": the object has been modified; please apply your changes to the latest version and try again",
                        res.plural, res.group
                    ),
                ));
            }
        }
        // Identity fields are the server's.
        for f in ["uid", "creationTimestamp", "namespace", "name"] {
            if let Some(v) = old["metadata"].get(f) {
                obj["metadata"][f] = v.clone();
            }
        }
        if obj["metadata"].get("deletionTimestamp").is_none() {
            if let Some(v) = old["metadata"].get("deletionTimestamp") {
                obj["metadata"]["deletionTimestamp"] = v.clone();
            }
        }
        let generation = old["metadata"]["generation"].as_i64().unwrap_or(1);
        let spec_changed = old.get("spec") != obj.get("spec");
        obj["metadata"]["generation"] = json!(generation + i64::from(spec_changed));
        if obj == *old || strip_rv(&obj) == strip_rv(old) {
            return Ok(old.clone());
        }
        self.rv += 1;
        obj["metadata"]["resourceVersion"] = json!(self.rv.to_string());
        self.objects.insert(k, obj.clone());
        self.record(res, ns, "MODIFIED", obj.clone());
        Ok(obj)
    }

    pub fn delete(&mut self, res: &Res, ns: &str, name: &str) -> Result<Value, Value> {
        let k = key(res, ns, name);
        let Some(mut obj) = self.objects.remove(&k) else {
            return Err(not_found(res, name));
        };
        self.rv += 1;
        obj["metadata"]["resourceVersion"] = json!(self.rv.to_string());
        self.record(res, ns, "DELETED", obj.clone());
        Ok(obj)
    }

    pub fn get(&self, res: &Res, ns: &str, name: &str) -> Option<&Value> {
        self.objects.get(&key(res, ns, name))
    }

    /// Objects of one type, in one namespace or all (`ns` empty).
    pub fn list(&self, res: &Res, ns: &str) -> Vec<Value> {
        let prefix = format!("{}/{}/", res.group, res.plural);
        self.objects
            .range(prefix.clone()..)
            .take_while(|(k, _)| k.starts_with(&prefix))
            .filter(|(k, _)| ns.is_empty() || k[prefix.len()..].starts_with(&format!("{ns}/")))
            .map(|(_, v)| v.clone())
            .collect()
    }

    /// Forgets the event history: resuming a watch from any version seen so far is 410.
    /// The version moves on by one (as if other objects changed meanwhile), so even a client
    /// that saw the latest event is too old.
    pub fn compact(&mut self) {
        self.rv += 1;
        self.events.clear();
        self.oldest = self.rv;
    }
}

fn strip_rv(v: &Value) -> Value {
    let mut v = v.clone();
    if let Some(md) = v["metadata"].as_object_mut() {
        md.remove("resourceVersion");
        md.remove("generation");
    }
    v
}

pub fn status_err(code: u16, reason: &str, message: &str) -> Value {
    json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
           "message": message, "reason": reason, "code": code})
}

fn not_found(res: &Res, name: &str) -> Value {
    status_err(
        404,
        "NotFound",
        &format!("{}.{} \"{name}\" not found", res.plural, res.group).replace(". \"", " \""),
    )
}

/// Shared state of a running test apiserver.
pub struct State {
    pub store: Mutex<Store>,
    pub log: Mutex<Vec<Logged>>,
    pub started: Instant,
    pub opts: Options,
    /// Wakes the controller after a write.
    pub changed: Notify,
    /// Ends open watches (`/_test/compact`).
    pub cut_watches: watch::Sender<u64>,
    pub stop: watch::Sender<bool>,
    /// Measured usage per pod (`namespace/name`), what `metrics.k8s.io` serves.
    pub usage: Mutex<BTreeMap<String, PodUsage>>,
}

/// One pod's usage over the last measurement window.
#[derive(Debug, Clone)]
pub struct PodUsage {
    pub cores: f64,
    pub memory_bytes: u64,
    /// RFC 3339 time of the measurement's end.
    pub timestamp: String,
    pub window: Duration,
}

/// A running test apiserver; [`TestApi::shutdown`] stops its pods.
pub struct TestApi {
    pub addr: SocketAddr,
    pub state: Arc<State>,
    controller: tokio::task::JoinHandle<()>,
}

impl TestApi {
    pub async fn start(opts: Options) -> std::io::Result<TestApi> {
        let listener = TcpListener::bind(opts.listen).await?;
        let addr = listener.local_addr()?;
        if let Some(path) = &opts.kubeconfig {
            std::fs::write(path, kubeconfig(addr))?;
        }
        let mut store = Store::new(opts.history);
        for ns in ["default", "kube-system"] {
            let _ = store.create(
                &RESOURCES[0],
                "",
                json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": ns},
                       "status": {"phase": "Active"}}),
            );
        }
        let (cut_watches, _) = watch::channel(0);
        let (stop, _) = watch::channel(false);
        let state = Arc::new(State {
            store: Mutex::new(store),
            log: Mutex::new(Vec::new()),
            started: Instant::now(),
            opts,
            changed: Notify::new(),
            cut_watches,
            stop,
            usage: Mutex::new(BTreeMap::new()),
        });
        let controller = tokio::spawn(controller::run(state.clone()));
        let st = state.clone();
        let mut stop_rx = state.stop.subscribe();
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    _ = stop_rx.changed() => return,
                    acc = listener.accept() => {
                        let Ok((sock, _)) = acc else { continue };
                        let st = st.clone();
                        tokio::spawn(async move {
                            let svc = hyper::service::service_fn(move |req| {
                                let st = st.clone();
                                async move { Ok::<_, Infallible>(handle(st, req).await) }
                            });
                            let _ = hyper::server::conn::http1::Builder::new()
                                .serve_connection(hyper_util::rt::TokioIo::new(sock), svc)
                                .await;
                        });
                    }
                }
            }
        });
        Ok(TestApi {
            addr,
            state,
            controller,
        })
    }

    /// The request log so far.
    pub fn requests(&self) -> Vec<Logged> {
        self.state.log.lock().unwrap().clone()
    }

    /// Stops serving and stops every pod process (SIGTERM, then SIGKILL after 5 s).
    pub async fn shutdown(self) {
        let _ = self.state.stop.send(true);
        let _ = self.controller.await;
    }
}

/// A kubeconfig for a server at `addr` (JSON is YAML; kubectl and shoal read it).
pub fn kubeconfig(addr: SocketAddr) -> String {
    serde_json::to_string_pretty(&json!({
        "apiVersion": "v1", "kind": "Config",
        "clusters": [{"name": "shoal-testapi", "cluster": {"server": format!("http://{addr}")}}],
        "users": [{"name": "shoal-testapi", "user": {}}],
        "contexts": [{"name": "shoal-testapi",
                      "context": {"cluster": "shoal-testapi", "user": "shoal-testapi", "namespace": "default"}}],
        "current-context": "shoal-testapi",
    }))
    .expect("json")
}

type Body_ = BoxBody<Bytes, Infallible>;

fn respond(code: u16, v: &Value) -> Response<Body_> {
    Response::builder()
        .status(code)
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(v.to_string())).boxed())
        .expect("response")
}

/// A chunked watch stream fed by a channel.
struct ChannelBody(mpsc::Receiver<Bytes>);

impl Body for ChannelBody {
    type Data = Bytes;
    type Error = Infallible;
    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        self.0.poll_recv(cx).map(|o| o.map(|b| Ok(Frame::data(b))))
    }
}

fn query(uri: &http::Uri) -> BTreeMap<String, String> {
    uri.query()
        .unwrap_or("")
        .split('&')
        .filter(|s| !s.is_empty())
        .map(|kv| {
            let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
            (k.to_string(), percent_decode(v))
        })
        .collect()
}

fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'%' if i + 2 < b.len() => {
                if let Ok(v) = u8::from_str_radix(&s[i + 1..i + 3], 16) {
                    out.push(v);
                    i += 3;
                    continue;
                }
                out.push(b'%');
            }
            b'+' => out.push(b' '),
            c => out.push(c),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

async fn handle(st: Arc<State>, req: Request<Incoming>) -> Response<Body_> {
    let method = req.method().clone();
    let uri = req.uri().clone();
    let ct = req
        .headers()
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_string();
    let user_agent = req
        .headers()
        .get("user-agent")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_string();
    let body = req
        .into_body()
        .collect()
        .await
        .map(|b| b.to_bytes())
        .unwrap_or_default();
    let path = uri.path().to_string();
    if path.starts_with("/_test/") {
        return test_hook(&st, &method, &path);
    }
    let resp = route(&st, &method, &uri, &ct, &body);
    let status = resp.status().as_u16();
    let mut text = String::from_utf8_lossy(&body).into_owned();
    if text.len() > 4096 {
        text.truncate(4096);
    }
    st.log.lock().unwrap().push(Logged {
        ms: st.started.elapsed().as_millis() as u64,
        method: method.to_string(),
        uri: uri
            .path_and_query()
            .map(|p| p.to_string())
            .unwrap_or_default(),
        content_type: ct,
        user_agent,
        body: text,
        status,
    });
    resp
}

fn test_hook(st: &Arc<State>, method: &Method, path: &str) -> Response<Body_> {
    match (method, path) {
        (&Method::GET, "/_test/requests") => {
            let log: Vec<Value> = st.log.lock().unwrap().iter().map(Logged::to_json).collect();
            respond(200, &json!({ "requests": log }))
        }
        (&Method::POST, "/_test/compact") => {
            let rv = {
                let mut s = st.store.lock().unwrap();
                s.compact();
                s.rv
            };
            st.cut_watches.send_modify(|n| *n += 1);
            respond(200, &json!({ "compactedTo": rv }))
        }
        _ => respond(404, &status_err(404, "NotFound", "no such test hook")),
    }
}

/// The `metrics.k8s.io` group version, served when [`Options::metrics_api`] is on.
const METRICS_GV: &str = "metrics.k8s.io/v1beta1";

fn discovery_resources(opts: &Options, group: &str, version: &str) -> Option<Value> {
    if opts.metrics_api && format!("{group}/{version}") == METRICS_GV {
        let r = |name: &str, kind: &str, namespaced: bool| {
            json!({"name": name, "singularName": "", "namespaced": namespaced, "kind": kind,
                   "verbs": ["get", "list"]})
        };
        return Some(json!({"kind": "APIResourceList", "apiVersion": "v1",
                           "groupVersion": METRICS_GV,
                           "resources": [r("pods", "PodMetrics", true), r("nodes", "NodeMetrics", false)]}));
    }
    let mut list = Vec::new();
    for r in RESOURCES
        .iter()
        .filter(|r| r.group == group && r.version == version)
    {
        let mut verbs = vec![
            "create",
            "delete",
            "deletecollection",
            "get",
            "list",
            "patch",
            "update",
            "watch",
        ];
        if r.plural == "namespaces" {
            verbs.retain(|v| *v != "deletecollection");
        }
        let mut e = json!({"name": r.plural, "singularName": r.singular, "namespaced": r.namespaced,
                           "kind": r.kind, "verbs": verbs});
        if !r.short.is_empty() {
            e["shortNames"] = json!(r.short);
        }
        if matches!(r.plural, "pods" | "deployments" | "services") {
            e["categories"] = json!(["all"]);
        }
        list.push(e);
        for sub in r.subresources {
            if *sub == "resize" && !opts.pod_resize {
                continue;
            }
            let mut s = json!({"name": format!("{}/{sub}", r.plural), "singularName": "",
                               "namespaced": r.namespaced, "kind": r.kind, "verbs": ["get", "patch", "update"]});
            if *sub == "scale" {
                s["group"] = json!("autoscaling");
                s["version"] = json!("v1");
                s["kind"] = json!("Scale");
            }
            list.push(s);
        }
    }
    if list.is_empty() {
        return None;
    }
    let gv = if group.is_empty() {
        version.to_string()
    } else {
        format!("{group}/{version}")
    };
    Some(
        json!({"kind": "APIResourceList", "apiVersion": "v1", "groupVersion": gv, "resources": list}),
    )
}

fn groups(opts: &Options) -> Value {
    let mut seen: Vec<(&str, &str)> = Vec::new();
    for r in RESOURCES.iter().filter(|r| !r.group.is_empty()) {
        if !seen.contains(&(r.group, r.version)) {
            seen.push((r.group, r.version));
        }
    }
    if opts.metrics_api {
        seen.push(("metrics.k8s.io", "v1beta1"));
    }
    let groups: Vec<Value> = seen
        .iter()
        .map(|(g, v)| {
            let gv = json!({"groupVersion": format!("{g}/{v}"), "version": v});
            json!({"name": g, "versions": [gv.clone()], "preferredVersion": gv})
        })
        .collect();
    json!({"kind": "APIGroupList", "apiVersion": "v1", "groups": groups})
}

/// The OpenAPI v3 index: one document per group/version.
fn openapi_root() -> Value {
    let mut paths = Map::new();
    for r in RESOURCES {
        let gv = if r.group.is_empty() {
            format!("api/{}", r.version)
        } else {
            format!("apis/{}/{}", r.group, r.version)
        };
        paths.insert(
            gv.clone(),
            json!({"serverRelativeURL": format!("/openapi/v3/{gv}?hash=1")}),
        );
    }
    json!({ "paths": paths })
}

/// A group/version's OpenAPI v3 document, reduced to what kubectl reads from it: each
/// object path's PATCH operation with its kind and the `fieldValidation` parameter, which
/// tells kubectl the server validates fields (so it needs no schemas of its own).
fn openapi_gv(gv: &str) -> Option<Value> {
    let mut paths = Map::new();
    for r in RESOURCES {
        let (prefix, this) = if r.group.is_empty() {
            (format!("/api/{}", r.version), format!("api/{}", r.version))
        } else {
            (
                format!("/apis/{}/{}", r.group, r.version),
                format!("apis/{}/{}", r.group, r.version),
            )
        };
        if this != gv {
            continue;
        }
        let path = if r.namespaced {
            format!("{prefix}/namespaces/{{namespace}}/{}/{{name}}", r.plural)
        } else {
            format!("{prefix}/{}/{{name}}", r.plural)
        };
        let param = |name: &str| json!({"name": name, "in": "query", "schema": {"type": "string", "uniqueItems": true}});
        paths.insert(
            path,
            json!({
                "patch": {
                    "operationId": format!("patch{}", r.kind),
                    "parameters": [param("dryRun"), param("fieldManager"), param("fieldValidation")],
                    "x-kubernetes-action": "patch",
                    "x-kubernetes-group-version-kind": {"group": r.group, "version": r.version, "kind": r.kind},
                    "responses": {"200": {"description": "OK"}},
                },
            }),
        );
    }
    if paths.is_empty() {
        return None;
    }
    Some(
        json!({"openapi": "3.0.0", "info": {"title": "Kubernetes (shoal test apiserver)", "version": "v1.32.0"},
                "paths": paths, "components": {"schemas": {}}}),
    )
}

/// Where a request points.
struct Target {
    res: &'static Res,
    ns: String,
    name: Option<String>,
    sub: Option<String>,
}

fn parse_target(path: &str) -> Result<Option<Target>, Value> {
    let segs: Vec<&str> = path.trim_matches('/').split('/').collect();
    let (group, version, rest) = match segs.as_slice() {
        ["api", v, rest @ ..] => ("", *v, rest),
        ["apis", g, v, rest @ ..] => (*g, *v, rest),
        _ => return Ok(None),
    };
    if rest.is_empty() {
        return Ok(None);
    }
    let (ns, rest) = if rest[0] == "namespaces" && rest.len() >= 3 {
        (rest[1].to_string(), &rest[2..])
    } else {
        (String::new(), rest)
    };
    let Some(res) = find_res(group, version, rest[0]) else {
        return Err(status_err(
            404,
            "NotFound",
            &format!("the server could not find the requested resource {path}"),
        ));
    };
    let (ns, name) = if res.plural == "namespaces" {
        (String::new(), rest.get(1).map(|s| s.to_string()))
    } else {
        (ns, rest.get(1).map(|s| s.to_string()))
    };
    Ok(Some(Target {
        res,
        ns,
        name,
        sub: rest.get(2).map(|s| s.to_string()),
    }))
}

fn route(
    st: &Arc<State>,
    method: &Method,
    uri: &http::Uri,
    ct: &str,
    body: &Bytes,
) -> Response<Body_> {
    let path = uri.path();
    match path.trim_end_matches('/') {
        "/api" => {
            return respond(
                200,
                &json!({"kind": "APIVersions", "versions": ["v1"],
                        "serverAddressByClientCIDRs": [{"clientCIDR": "0.0.0.0/0", "serverAddress": uri.authority().map(|a| a.to_string()).unwrap_or_default()}]}),
            )
        }
        "/apis" => return respond(200, &groups(&st.opts)),
        "/version" => {
            return respond(
                200,
                &json!({"major": "1", "minor": "32", "gitVersion": "v1.32.0-shoal-testapi",
                        "platform": "linux/amd64"}),
            )
        }
        "/healthz" | "/readyz" | "/livez" => {
            return Response::new(Full::new(Bytes::from_static(b"ok")).boxed())
        }
        _ => {}
    }
    let segs: Vec<&str> = path.trim_matches('/').split('/').collect();
    match segs.as_slice() {
        ["openapi", "v3"] => return respond(200, &openapi_root()),
        ["openapi", "v3", gv @ ..] => {
            if let Some(doc) = openapi_gv(&gv.join("/")) {
                return respond(200, &doc);
            }
        }
        ["api", v] => {
            if let Some(d) = discovery_resources(&st.opts, "", v) {
                return respond(200, &d);
            }
        }
        ["apis", g, v] => {
            if let Some(d) = discovery_resources(&st.opts, g, v) {
                return respond(200, &d);
            }
        }
        ["apis", g] => {
            if let Some(grp) = groups(&st.opts)["groups"]
                .as_array()
                .and_then(|a| a.iter().find(|x| x["name"] == *g))
            {
                let mut grp = grp.clone();
                grp["kind"] = json!("APIGroup");
                grp["apiVersion"] = json!("v1");
                return respond(200, &grp);
            }
        }
        ["apis", "metrics.k8s.io", "v1beta1", "namespaces", ns, "pods", rest @ ..]
            if st.opts.metrics_api && rest.len() <= 1 && *method == Method::GET =>
        {
            return match pod_metrics(st, ns, rest.first().copied(), &query(uri)) {
                Ok(v) => respond(200, &v),
                Err(e) => respond(e["code"].as_u64().unwrap_or(500) as u16, &e),
            };
        }
        _ => {}
    }
    let t = match parse_target(path) {
        Ok(Some(t)) => t,
        Ok(None) => {
            return respond(
                404,
                &status_err(
                    404,
                    "NotFound",
                    "the server could not find the requested resource",
                ),
            )
        }
        Err(e) => return respond(404, &e),
    };
    let q = query(uri);
    let base_ct = ct.split(';').next().unwrap_or("").trim();
    // kubectl's typed clients (`kubectl create deployment`) send protobuf.
    let decoded;
    let body = if base_ct == "application/vnd.kubernetes.protobuf" && !body.is_empty() {
        match proto::decode(body) {
            Ok(v) => {
                decoded = Bytes::from(v.to_string());
                &decoded
            }
            Err(e) => return respond(415, &status_err(415, "UnsupportedMediaType", &e)),
        }
    } else {
        body
    };
    if !body.is_empty()
        && base_ct != "application/json"
        && base_ct != "application/vnd.kubernetes.protobuf"
        && patch::Kind::from_content_type(ct).is_none()
    {
        return respond(
            415,
            &status_err(415, "UnsupportedMediaType", &format!("the body of the request was in an unknown format - accepted media types include: application/json, application/json-patch+json, application/merge-patch+json, application/strategic-merge-patch+json (got {ct:?})")),
        );
    }
    let r = match (method, &t.name, t.sub.as_deref()) {
        (&Method::GET, None, _) if is_true(q.get("watch")) => return watch_response(st, &t, &q),
        (&Method::GET, None, _) => list(st, &t, &q),
        (&Method::GET, Some(name), None) => st
            .store
            .lock()
            .unwrap()
            .get(t.res, &t.ns, name)
            .cloned()
            .ok_or_else(|| not_found(t.res, name)),
        (&Method::GET, Some(name), Some("scale")) if t.res.plural == "deployments" => st
            .store
            .lock()
            .unwrap()
            .get(t.res, &t.ns, name)
            .map(scale_of)
            .ok_or_else(|| not_found(t.res, name)),
        (&Method::GET, Some(name), Some("status")) => st
            .store
            .lock()
            .unwrap()
            .get(t.res, &t.ns, name)
            .cloned()
            .ok_or_else(|| not_found(t.res, name)),
        (&Method::POST, None, None) => create(st, &t, &q, body),
        (&Method::PUT, Some(name), sub) => {
            parse_json(body).and_then(|obj| write(st, &t, name, sub, &q, Write::Put(obj)))
        }
        (&Method::PATCH, Some(name), sub) => match patch::Kind::from_content_type(ct) {
            Some(kind) => parse_json(body)
                .and_then(|p| write(st, &t, name, sub, &q, Write::Patch(kind, p))),
            None => Err(status_err(
                415,
                "UnsupportedMediaType",
                &format!("the body of the request was in an unknown format - accepted media types include: application/json-patch+json, application/merge-patch+json, application/strategic-merge-patch+json (got {ct:?})"),
            )),
        },
        (&Method::DELETE, Some(name), None) => delete(st, &t, name, &q),
        _ => Err(status_err(405, "MethodNotAllowed", "method not allowed")),
    };
    match r {
        Ok(v) => {
            let code = if *method == Method::POST { 201 } else { 200 };
            respond(code, &v)
        }
        Err(e) => respond(e["code"].as_u64().unwrap_or(500) as u16, &e),
    }
}

/// `PodMetrics` of one pod, or a `PodMetricsList` of a namespace's pods (label selector
/// honoured): what metrics-server serves, from the usage the controller measured.
fn pod_metrics(
    st: &Arc<State>,
    ns: &str,
    name: Option<&str>,
    q: &BTreeMap<String, String>,
) -> Result<Value, Value> {
    let pods = st
        .store
        .lock()
        .unwrap()
        .list(find_res("", "v1", "pods").expect("pods"), ns);
    let usage = st.usage.lock().unwrap();
    let item = |p: &Value| -> Option<Value> {
        let pn = p["metadata"]["name"].as_str()?;
        let u = usage.get(&format!("{ns}/{pn}"))?;
        let container = p["spec"]["containers"][0]["name"]
            .as_str()
            .unwrap_or("main");
        Some(json!({
            "kind": "PodMetrics", "apiVersion": METRICS_GV,
            "metadata": {"name": pn, "namespace": ns, "labels": p["metadata"]["labels"],
                         "creationTimestamp": now_rfc3339()},
            "timestamp": u.timestamp,
            "window": format!("{}s", u.window.as_secs_f64()),
            "containers": [{"name": container, "usage": {
                "cpu": format!("{}n", (u.cores * 1e9).round() as u64),
                "memory": format!("{}Ki", u.memory_bytes / 1024)}}],
        }))
    };
    match name {
        Some(n) => pods
            .iter()
            .find(|p| p["metadata"]["name"] == n)
            .and_then(item)
            .ok_or_else(|| {
                status_err(
                    404,
                    "NotFound",
                    &format!("podmetrics.metrics.k8s.io \"{n}\" not found"),
                )
            }),
        None => {
            let items: Vec<Value> = pods
                .iter()
                .filter(|p| selected(q, p))
                .filter_map(item)
                .collect();
            Ok(json!({"kind": "PodMetricsList", "apiVersion": METRICS_GV,
                      "metadata": {}, "items": items}))
        }
    }
}

fn is_true(v: Option<&String>) -> bool {
    matches!(v.map(|s| s.as_str()), Some("true" | "1"))
}

fn parse_json(body: &Bytes) -> Result<Value, Value> {
    serde_json::from_slice(body)
        .map_err(|e| status_err(400, "BadRequest", &format!("invalid JSON body: {e}")))
}

/// The `autoscaling/v1` Scale view of a Deployment.
pub fn scale_of(d: &Value) -> Value {
    let md = &d["metadata"];
    let labels = d["spec"]["selector"]["matchLabels"]
        .as_object()
        .map(|m| {
            m.iter()
                .map(|(k, v)| format!("{k}={}", v.as_str().unwrap_or("")))
                .collect::<Vec<_>>()
                .join(",")
        })
        .unwrap_or_default();
    json!({"kind": "Scale", "apiVersion": "autoscaling/v1",
           "metadata": {"name": md["name"], "namespace": md["namespace"], "uid": md["uid"],
                        "resourceVersion": md["resourceVersion"], "creationTimestamp": md["creationTimestamp"]},
           "spec": {"replicas": d["spec"]["replicas"].as_i64().unwrap_or(1)},
           "status": {"replicas": d["status"]["replicas"].as_i64().unwrap_or(0), "selector": labels}})
}

/// Label selector: `k=v`, `k==v`, `k!=v`, `k`, `!k`, comma-separated (all must hold).
pub fn labels_match(sel: &str, labels: &Value) -> bool {
    sel.split(',').filter(|s| !s.is_empty()).all(|term| {
        let term = term.trim();
        if let Some((k, v)) = term.split_once("!=") {
            labels[k.trim()].as_str() != Some(v.trim())
        } else if let Some((k, v)) = term.split_once("==").or_else(|| term.split_once('=')) {
            labels[k.trim()].as_str() == Some(v.trim())
        } else if let Some(k) = term.strip_prefix('!') {
            labels.get(k).is_none()
        } else {
            labels.get(term).is_some()
        }
    })
}

fn fields_match(sel: &str, obj: &Value) -> bool {
    sel.split(',').filter(|s| !s.is_empty()).all(|term| {
        let (k, v, eq) = match term.split_once("!=") {
            Some((k, v)) => (k, v, false),
            None => match term.split_once("==").or_else(|| term.split_once('=')) {
                Some((k, v)) => (k, v, true),
                None => return true,
            },
        };
        let actual = match k {
            "metadata.name" => obj["metadata"]["name"].as_str(),
            "metadata.namespace" => obj["metadata"]["namespace"].as_str(),
            _ => return true,
        };
        (actual == Some(v)) == eq
    })
}

fn selected(q: &BTreeMap<String, String>, obj: &Value) -> bool {
    q.get("labelSelector")
        .is_none_or(|s| labels_match(s, &obj["metadata"]["labels"]))
        && q.get("fieldSelector").is_none_or(|s| fields_match(s, obj))
}

fn list(st: &Arc<State>, t: &Target, q: &BTreeMap<String, String>) -> Result<Value, Value> {
    let s = st.store.lock().unwrap();
    // A list "not older than" a version the server has compacted is still served (it is the
    // latest state); only an exact `resourceVersionMatch=Exact` of a compacted one is 410.
    if q.get("resourceVersionMatch").map(|s| s.as_str()) == Some("Exact") {
        let rv: u64 = q
            .get("resourceVersion")
            .and_then(|v| v.parse().ok())
            .unwrap_or(0);
        if rv < s.oldest {
            return Err(status_err(410, "Expired", "too old resource version"));
        }
    }
    let items: Vec<Value> = s
        .list(t.res, &t.ns)
        .into_iter()
        .filter(|o| selected(q, o))
        .collect();
    Ok(
        json!({"kind": format!("{}List", t.res.kind), "apiVersion": t.res.api_version(),
              "metadata": {"resourceVersion": s.rv.to_string()}, "items": items}),
    )
}

fn watch_response(st: &Arc<State>, t: &Target, q: &BTreeMap<String, String>) -> Response<Body_> {
    let (tx, rx) = mpsc::channel::<Bytes>(1024);
    let line = |kind: &str, obj: &Value| {
        Bytes::from(format!("{}\n", json!({"type": kind, "object": obj})))
    };
    let res_key = format!("{}/{}", t.res.group, t.res.plural);
    let ns = t.ns.clone();
    let q = q.clone();
    let filter = {
        let (res_key, ns, q) = (res_key.clone(), ns.clone(), q.clone());
        move |e: &Event| {
            e.res == res_key && (ns.is_empty() || e.namespace == ns) && selected(&q, &e.object)
        }
    };
    let mut initial = Vec::new();
    let rx_events;
    let mut last_rv;
    {
        let s = st.store.lock().unwrap();
        rx_events = s.tx.subscribe();
        last_rv = s.rv;
        let from: u64 = q
            .get("resourceVersion")
            .and_then(|v| v.parse().ok())
            .unwrap_or(0);
        if from == 0 {
            // No version (or "0"): the current state as ADDED events, then changes.
            for o in s.list(t.res, &t.ns).into_iter().filter(|o| selected(&q, o)) {
                initial.push(line("ADDED", &o));
            }
        } else if from < s.oldest {
            let gone = status_err(
                410,
                "Expired",
                &format!("too old resource version: {from} ({})", s.oldest),
            );
            initial.push(line("ERROR", &gone));
            let _ = tx.try_send(initial.remove(0));
            return Response::builder()
                .status(200)
                .header("content-type", "application/json")
                .body(ChannelBody(rx).boxed())
                .expect("response");
        } else {
            for e in s.events.iter().filter(|e| e.rv > from && filter(e)) {
                initial.push(line(e.kind, &e.object));
            }
        }
    }
    let bookmarks = is_true(q.get("allowWatchBookmarks"));
    let timeout = q
        .get("timeoutSeconds")
        .and_then(|v| v.parse::<u64>().ok())
        .map(Duration::from_secs)
        .unwrap_or(Duration::from_secs(1800));
    let interval = st.opts.bookmark_interval;
    let mut cut = st.cut_watches.subscribe();
    let mut stop = st.stop.subscribe();
    let kind = t.res.kind;
    let api_version = t.res.api_version();
    tokio::spawn(async move {
        let mut rx_events = rx_events;
        for l in initial {
            if tx.send(l).await.is_err() {
                return;
            }
        }
        let deadline = tokio::time::sleep(timeout);
        tokio::pin!(deadline);
        let mut tick = tokio::time::interval(interval);
        tick.tick().await;
        loop {
            tokio::select! {
                _ = &mut deadline => return,
                _ = cut.changed() => return,
                _ = stop.changed() => return,
                _ = tick.tick(), if bookmarks => {
                    let b = json!({"kind": kind, "apiVersion": api_version,
                                   "metadata": {"resourceVersion": last_rv.to_string(),
                                                "annotations": {"k8s.io/initial-events-end": "true"}}});
                    if tx.send(line("BOOKMARK", &b)).await.is_err() { return; }
                }
                e = rx_events.recv() => match e {
                    Ok(e) => {
                        last_rv = e.rv;
                        if filter(&e) && tx.send(line(e.kind, &e.object)).await.is_err() { return; }
                    }
                    // Fell behind: end the watch; the client resumes or re-lists.
                    Err(_) => return,
                }
            }
        }
    });
    Response::builder()
        .status(200)
        .header("content-type", "application/json")
        .header("transfer-encoding", "chunked")
        .body(ChannelBody(rx).boxed())
        .expect("response")
}

fn check_object(t: &Target, obj: &Value, name_from_path: Option<&str>) -> Result<(), Value> {
    let Some(md) = obj["metadata"].as_object() else {
        return Err(status_err(422, "Invalid", "metadata is required"));
    };
    let name = md.get("name").and_then(|v| v.as_str()).unwrap_or("");
    if name.is_empty() {
        return Err(status_err(
            422,
            "Invalid",
            "metadata.name: Required value: name or generateName is required",
        ));
    }
    if let Some(p) = name_from_path {
        if p != name {
            return Err(status_err(
                400,
                "BadRequest",
                "the name of the object does not match the name on the URL",
            ));
        }
    }
    if obj["kind"].as_str() != Some(t.res.kind) && t.sub.is_none() {
        return Err(status_err(
            400,
            "BadRequest",
            &format!("kind {:?} does not match {}", obj["kind"], t.res.kind),
        ));
    }
    if t.res.plural == "deployments" {
        let sel = &obj["spec"]["selector"];
        let labels = &obj["spec"]["template"]["metadata"]["labels"];
        let ok = sel["matchLabels"]
            .as_object()
            .is_some_and(|m| !m.is_empty() && m.iter().all(|(k, v)| labels[k] == *v));
        if !ok {
            return Err(status_err(422, "Invalid", "Deployment.apps is invalid: spec.selector: selector does not match template labels"));
        }
    }
    Ok(())
}

fn create(
    st: &Arc<State>,
    t: &Target,
    q: &BTreeMap<String, String>,
    body: &Bytes,
) -> Result<Value, Value> {
    let mut obj = parse_json(body)?;
    if obj["metadata"]["name"].as_str().unwrap_or("").is_empty() {
        if let Some(g) = obj["metadata"]["generateName"].as_str() {
            let n = format!("{g}{}", controller::suffix());
            obj["metadata"]["name"] = json!(n);
        }
    }
    check_object(t, &obj, None)?;
    let ns = if t.res.namespaced {
        obj["metadata"]["namespace"]
            .as_str()
            .filter(|s| !s.is_empty())
            .map(String::from)
            .unwrap_or_else(|| t.ns.clone())
    } else {
        String::new()
    };
    if t.res.namespaced && ns != t.ns {
        return Err(status_err(
            400,
            "BadRequest",
            "the namespace of the object does not match the namespace on the request",
        ));
    }
    if t.res.plural == "deployments" && obj["spec"]["replicas"].is_null() {
        obj["spec"]["replicas"] = json!(1);
    }
    let mut s = st.store.lock().unwrap();
    if t.res.namespaced && s.get(&RESOURCES[0], "", &ns).is_none() {
        return Err(status_err(
            404,
            "NotFound",
            &format!("namespaces \"{ns}\" not found"),
        ));
    }
    if q.get("dryRun").is_some() {
        if s.get(t.res, &ns, obj["metadata"]["name"].as_str().unwrap_or(""))
            .is_some()
        {
            return Err(status_err(409, "AlreadyExists", "already exists"));
        }
        obj["metadata"]["namespace"] = json!(ns);
        obj["metadata"]["creationTimestamp"] = json!(now_rfc3339());
        return Ok(obj);
    }
    let r = s.create(t.res, &ns, obj);
    drop(s);
    st.changed.notify_one();
    r
}

enum Write {
    Put(Value),
    Patch(patch::Kind, Value),
}

fn write(
    st: &Arc<State>,
    t: &Target,
    name: &str,
    sub: Option<&str>,
    q: &BTreeMap<String, String>,
    w: Write,
) -> Result<Value, Value> {
    let mut s = st.store.lock().unwrap();
    let Some(cur) = s.get(t.res, &t.ns, name).cloned() else {
        return Err(not_found(t.res, name));
    };
    let is_scale = sub == Some("scale");
    if is_scale && t.res.plural != "deployments" {
        return Err(status_err(404, "NotFound", "no scale subresource"));
    }
    if sub == Some("resize") && (t.res.plural != "pods" || !st.opts.pod_resize) {
        return Err(status_err(
            404,
            "NotFound",
            "the server could not find the requested resource",
        ));
    }
    // The view the write applies to: the object, or its Scale.
    let view = if is_scale {
        scale_of(&cur)
    } else {
        cur.clone()
    };
    let (new_view, expect_rv) = match w {
        Write::Put(obj) => {
            let rv = obj["metadata"]["resourceVersion"]
                .as_str()
                .map(String::from);
            (obj, rv)
        }
        Write::Patch(kind, p) => {
            // A resourceVersion inside a patch is a precondition too.
            let rv = p["metadata"]["resourceVersion"].as_str().map(String::from);
            let mut v = patch::apply(kind, &view, &p)?;
            if rv.is_none() {
                v["metadata"]["resourceVersion"] = view["metadata"]["resourceVersion"].clone();
            }
            (v, rv)
        }
    };
    let mut next = if is_scale {
        let Some(n) = new_view["spec"]["replicas"].as_i64().filter(|n| *n >= 0) else {
            return Err(status_err(
                422,
                "Invalid",
                "spec.replicas: must be a non-negative integer",
            ));
        };
        let mut d = cur.clone();
        d["spec"]["replicas"] = json!(n);
        d
    } else if sub == Some("status") {
        let mut d = cur.clone();
        d["status"] = new_view["status"].clone();
        d
    } else if sub == Some("resize") {
        resized(&cur, &new_view)?
    } else {
        let mut d = new_view.clone();
        check_object(t, &d, Some(name))?;
        // The main resource does not change status.
        if t.res.subresources.contains(&"status") {
            match cur.get("status") {
                Some(s) => d["status"] = s.clone(),
                None => {
                    if let Some(m) = d.as_object_mut() {
                        m.remove("status");
                    }
                }
            }
        }
        d
    };
    if q.get("dryRun").is_some() {
        return Ok(if is_scale { scale_of(&next) } else { next });
    }
    if let Some(m) = next["metadata"].as_object_mut() {
        m.remove("resourceVersion");
    }
    let r = s.update(t.res, &t.ns, name, next.take(), expect_rv.as_deref());
    drop(s);
    st.changed.notify_one();
    let v = r?;
    Ok(if is_scale { scale_of(&v) } else { v })
}

/// The pod after an in-place resize: only containers' `resources` may change (422
/// otherwise); the kubelet here applies a resize at once, so the container statuses report
/// the new resources too.
fn resized(cur: &Value, new: &Value) -> Result<Value, Value> {
    let invalid = |m: &str| status_err(422, "Invalid", &format!("Pod is invalid: {m}"));
    let (Some(old_c), Some(new_c)) = (
        cur["spec"]["containers"].as_array(),
        new["spec"]["containers"].as_array(),
    ) else {
        return Err(invalid("spec.containers: Required value"));
    };
    let without = |c: &Value| {
        let mut c = c.clone();
        if let Some(m) = c.as_object_mut() {
            m.remove("resources");
        }
        c
    };
    let mut strip_spec = new["spec"].clone();
    strip_spec["containers"] = cur["spec"]["containers"].clone();
    if old_c.len() != new_c.len()
        || old_c
            .iter()
            .zip(new_c)
            .any(|(o, n)| without(o) != without(n))
        || strip_spec != cur["spec"]
    {
        return Err(invalid(
            "spec: Forbidden: only cpu and memory resources are mutable",
        ));
    }
    let mut d = cur.clone();
    for (i, n) in new_c.iter().enumerate() {
        let r = &n["resources"];
        for kind in ["requests", "limits"] {
            if let Some(m) = r[kind].as_object() {
                for (res, q) in m {
                    if !matches!(res.as_str(), "cpu" | "memory") {
                        return Err(invalid(&format!(
                            "spec.containers[{i}].resources.{kind}[{res}]: Forbidden: only cpu and memory resources are mutable"
                        )));
                    }
                    if q.as_str().and_then(parse_quantity).is_none() {
                        return Err(invalid(&format!(
                            "spec.containers[{i}].resources.{kind}[{res}]: Invalid value: {q}"
                        )));
                    }
                }
            }
        }
        for res in ["cpu", "memory"] {
            let q = |kind: &str| r[kind][res].as_str().and_then(parse_quantity);
            if let (Some(req), Some(lim)) = (q("requests"), q("limits")) {
                if req > lim {
                    return Err(invalid(&format!(
                        "spec.containers[{i}].resources.requests: Invalid value: must be less than or equal to {res} limit"
                    )));
                }
            }
        }
        d["spec"]["containers"][i]["resources"] = r.clone();
        if d["status"]["containerStatuses"][i].is_object() {
            d["status"]["containerStatuses"][i]["resources"] = r.clone();
        }
    }
    Ok(d)
}

/// A Kubernetes quantity (`500m`, `2`, `0.5`, `128Mi`, `1G`, `1e3`) as a number. The
/// double keeps its own parser rather than shoal's: a bug shared by client and server would
/// pass both sides of a test.
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

fn delete(
    st: &Arc<State>,
    t: &Target,
    name: &str,
    q: &BTreeMap<String, String>,
) -> Result<Value, Value> {
    let mut s = st.store.lock().unwrap();
    if q.get("dryRun").is_some() {
        return s
            .get(t.res, &t.ns, name)
            .cloned()
            .ok_or_else(|| not_found(t.res, name));
    }
    if t.res.plural == "pods" {
        // Graceful: the controller marks it terminating, stops the process, then deletes it.
        let Some(mut pod) = s.get(t.res, &t.ns, name).cloned() else {
            return Err(not_found(t.res, name));
        };
        if pod["metadata"].get("deletionTimestamp").is_none() {
            pod["metadata"]["deletionTimestamp"] = json!(now_rfc3339());
            pod["metadata"]["deletionGracePeriodSeconds"] = json!(30);
            let r = s.update(t.res, &t.ns, name, pod, None);
            drop(s);
            st.changed.notify_one();
            return r;
        }
        return Ok(pod);
    }
    let r = s.delete(t.res, &t.ns, name);
    drop(s);
    st.changed.notify_one();
    r.map(|_| {
        json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Success",
                     "details": {"name": name, "kind": t.res.plural}})
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pod() -> Value {
        json!({"metadata": {"name": "p"},
               "spec": {"containers": [{"name": "app", "image": "x",
                                        "resources": {"requests": {"cpu": "100m"}, "limits": {"cpu": "200m"}}}]},
               "status": {"containerStatuses": [{"name": "app", "resources": {"requests": {"cpu": "100m"}}}]}})
    }

    #[test]
    fn resize_changes_only_cpu_and_memory_resources() {
        let mut p = pod();
        p["spec"]["containers"][0]["resources"] =
            json!({"requests": {"cpu": "300m", "memory": "64Mi"}, "limits": {"cpu": "600m"}});
        let r = resized(&pod(), &p).unwrap();
        assert_eq!(
            r["spec"]["containers"][0]["resources"]["requests"]["cpu"],
            "300m"
        );
        assert_eq!(
            r["status"]["containerStatuses"][0]["resources"]["limits"]["cpu"],
            "600m"
        );
        let reject = |f: &dyn Fn(&mut Value)| {
            let mut p = pod();
            f(&mut p);
            resized(&pod(), &p).unwrap_err()["code"].clone()
        };
        assert_eq!(
            reject(&|p| p["spec"]["containers"][0]["image"] = json!("y")),
            422
        );
        assert_eq!(reject(&|p| p["spec"]["nodeName"] = json!("n")), 422);
        assert_eq!(
            reject(&|p| p["spec"]["containers"][0]["resources"]["requests"]["cpu"] = json!("1")),
            422,
            "a request over its limit"
        );
        assert_eq!(
            reject(&|p| p["spec"]["containers"][0]["resources"]["requests"]["gpu"] = json!("1")),
            422
        );
        assert_eq!(
            reject(&|p| p["spec"]["containers"][0]["resources"]["requests"]["cpu"] = json!("lots")),
            422
        );
    }

    #[test]
    fn quantities() {
        assert_eq!(parse_quantity("250m"), Some(0.25));
        assert_eq!(parse_quantity("64Mi"), Some(67_108_864.0));
        assert_eq!(parse_quantity("1e3"), Some(1000.0));
        assert_eq!(parse_quantity("-1"), None);
        assert_eq!(parse_quantity("1Q"), None);
    }
}
