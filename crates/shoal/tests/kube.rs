//! The `kubernetes` provider through the binary, against the test apiserver
//! (`shoal-kube-testapi`, a test double: no kube-apiserver can be installed here) whose pods
//! are real `shoal demo-service` processes; and the real `kubectl` against that apiserver.

mod common;

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use serde_json::Value;
use shoal_kube_testapi::{Options, TestApi};

/// kubectl 1.32: `KUBECTL` (scripts/test.sh installs one if the machine has none), else PATH.
fn kubectl_bin() -> String {
    std::env::var("KUBECTL").unwrap_or_else(|_| "kubectl".into())
}

struct Api {
    rt: tokio::runtime::Runtime,
    api: Option<TestApi>,
    kubeconfig: std::path::PathBuf,
}

impl Api {
    fn start(dir: &Path) -> Api {
        Api::start_with(dir, |_| {})
    }

    fn start_with(dir: &Path, tweak: impl FnOnce(&mut Options)) -> Api {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        let kubeconfig = dir.join("kubeconfig");
        let mut opts = Options::new("127.0.0.1:0".parse().unwrap(), SHOAL.into());
        opts.kubeconfig = Some(kubeconfig.clone());
        opts.bookmark_interval = Duration::from_millis(300);
        opts.termination_delay = Duration::from_millis(500);
        tweak(&mut opts);
        let api = rt.block_on(TestApi::start(opts)).unwrap();
        Api {
            rt,
            api: Some(api),
            kubeconfig,
        }
    }

    fn api(&self) -> &TestApi {
        self.api.as_ref().unwrap()
    }

    /// Runs kubectl; returns (success, stdout + stderr).
    fn kubectl(&self, args: &[&str]) -> (bool, String) {
        let out = Command::new(kubectl_bin())
            .args(args)
            .env("KUBECONFIG", &self.kubeconfig)
            .output()
            .expect("kubectl runs");
        (
            out.status.success(),
            format!(
                "{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            ),
        )
    }

    fn kubectl_ok(&self, args: &[&str]) -> String {
        let (ok, out) = self.kubectl(args);
        assert!(ok, "kubectl {args:?}: {out}");
        out
    }

    fn object(&self, group: &str, plural: &str, name: &str) -> Option<Value> {
        let res = shoal_kube_testapi::find_res(group, "v1", plural).unwrap();
        self.api()
            .state
            .store
            .lock()
            .unwrap()
            .get(res, "default", name)
            .cloned()
    }

    fn replicas(&self) -> u64 {
        self.object("apps", "deployments", "demo").unwrap()["spec"]["replicas"]
            .as_u64()
            .unwrap()
    }

    fn pods(&self) -> Vec<Value> {
        let res = shoal_kube_testapi::find_res("", "v1", "pods").unwrap();
        self.api().state.store.lock().unwrap().list(res, "default")
    }

    /// Endpoints of the demo slice: (pod, ready, serving, terminating).
    fn endpoints(&self) -> Vec<(String, bool, bool, bool)> {
        let Some(s) = self.object("discovery.k8s.io", "endpointslices", "demo-testapi") else {
            return Vec::new();
        };
        s["endpoints"]
            .as_array()
            .unwrap()
            .iter()
            .map(|e| {
                let c = &e["conditions"];
                (
                    e["targetRef"]["name"].as_str().unwrap().to_string(),
                    c["ready"] == true,
                    c["serving"] == true,
                    c["terminating"] == true,
                )
            })
            .collect()
    }

    fn ready_pods(&self) -> usize {
        self.endpoints().iter().filter(|e| e.1).count()
    }
}

impl Drop for Api {
    fn drop(&mut self) {
        if let Some(api) = self.api.take() {
            self.rt.block_on(api.shutdown());
        }
    }
}

/// kubectl 1.32 drives the test apiserver: create (protobuf), get, scale, patch (strategic,
/// merge, JSON), watch, a 409 on a stale replace, delete; pods run and leave terminating.
#[test]
fn kubectl_drives_the_test_apiserver() {
    let dir = tempdir();
    let k = Api::start(dir.path());
    create_deployment(&k, "demo", 1);
    assert_eq!(
        k.kubectl_ok(&[
            "get",
            "deployment",
            "demo",
            "-o",
            "jsonpath={.spec.replicas}"
        ]),
        "1"
    );
    wait_until(20, "first pod ready", || k.ready_pods() == 1);
    // The pod is a real demo-service on its own loopback address and the container port.
    let ip = k.kubectl_ok(&["get", "pods", "-o", "jsonpath={.items[0].status.podIP}"]);
    let (s, body) = http(
        format!("{ip}:8080").parse().unwrap(),
        "GET",
        "/healthz",
        &[],
        "",
    );
    assert_eq!((s, body.as_str()), (200, "ok"));

    // A watch sees what scale does.
    let mut watch = Command::new(kubectl_bin())
        .args(["get", "pods", "--watch", "-o", "name"])
        .env("KUBECONFIG", &k.kubeconfig)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let out = k.kubectl_ok(&["scale", "deployment/demo", "--replicas=3"]);
    assert!(out.contains("scaled"), "{out}");
    wait_until(20, "three pods ready", || k.ready_pods() == 3);
    let get = k.kubectl_ok(&["get", "pods"]);
    assert_eq!(get.lines().count(), 4, "{get}");

    // Strategic merge patch merges containers by name; merge and JSON patches too.
    k.kubectl_ok(&[
        "patch",
        "deployment",
        "demo",
        "-p",
        r#"{"spec":{"template":{"spec":{"containers":[{"name":"anything","env":[{"name":"DEMO_READY_DELAY_MS","value":"100"}]}]}}}}"#,
    ]);
    let d = k.object("apps", "deployments", "demo").unwrap();
    let c = &d["spec"]["template"]["spec"]["containers"];
    assert_eq!(c.as_array().unwrap().len(), 1, "{c}");
    assert_eq!(c[0]["image"], "anything");
    assert_eq!(c[0]["env"][0]["value"], "100");
    k.kubectl_ok(&[
        "patch",
        "deployment",
        "demo",
        "--type=merge",
        "-p",
        r#"{"metadata":{"labels":{"team":"web"}}}"#,
    ]);
    k.kubectl_ok(&[
        "patch",
        "deployment",
        "demo",
        "--type=json",
        "-p",
        r#"[{"op":"replace","path":"/spec/replicas","value":2}]"#,
    ]);
    assert_eq!(k.replicas(), 2);
    wait_until(20, "one pod gone", || k.pods().len() == 2);

    // A replace carrying a stale resourceVersion is a 409.
    let mut stale = k.object("apps", "deployments", "demo").unwrap();
    k.kubectl_ok(&["label", "deployment", "demo", "x=y"]);
    stale["spec"]["replicas"] = 5.into();
    let file = dir.path().join("stale.json");
    std::fs::write(&file, stale.to_string()).unwrap();
    let (ok, out) = k.kubectl(&["replace", "-f", file.to_str().unwrap()]);
    assert!(!ok && out.contains("the object has been modified"), "{out}");
    assert_eq!(k.replicas(), 2);

    // Deleting a pod: terminating first (still serving), then gone and replaced.
    let victim = k.pods()[0]["metadata"]["name"]
        .as_str()
        .unwrap()
        .to_string();
    k.kubectl_ok(&["delete", "pod", &victim, "--wait=false"]);
    // The controller publishes the change on its next pass: wait for it, within the
    // termination delay the pod keeps serving.
    wait_until(10, "deleted pod serving && terminating", || {
        k.endpoints()
            .iter()
            .any(|e| e.0 == victim && !e.1 && e.2 && e.3)
    });
    wait_until(20, "pod replaced", || {
        let e = k.endpoints();
        !e.iter().any(|e| e.0 == victim) && e.iter().filter(|e| e.1).count() == 2
    });

    let _ = watch.kill();
    let out = watch.wait_with_output().unwrap();
    let seen = String::from_utf8_lossy(&out.stdout);
    assert!(seen.contains(&format!("pod/{victim}")), "{seen}");
    assert!(seen.lines().count() >= 4, "{seen}");
    let log = k.api().requests();
    assert!(
        log.iter()
            .any(|r| r.method == "PATCH" && r.uri.contains("/deployments/demo/scale")),
        "kubectl scale uses the scale subresource"
    );
}

fn kube_config(listen: u16, admin: u16, mode: &str) -> String {
    fleet_config(
        listen,
        admin,
        &format!(
            r#"[services.demo.fleet]
provider = "kubernetes"
namespace = "default"
deployment = "demo"
min = 1
max = 4
external_scale = "{mode}"
[services.demo.autoscale]
interval = "1s"
targets = [{{ metric = "in_flight", target = 2 }}]
stable_window = "5s"
panic_window = "3s"
burst_hold = "5s"
scale_down_stabilization = "5s""#
        ),
    )
}

fn start_shoal(dir: &Path, k: &Api, config: &str, listen: u16, admin: u16) -> Proc {
    let path = dir.join("shoal.toml");
    std::fs::write(&path, config).unwrap();
    let log = std::fs::File::create(dir.join("shoal.log")).unwrap();
    let child = Command::new(SHOAL)
        .args(["run", "--config"])
        .arg(&path)
        .env("RUST_LOG", "info")
        .env("KUBECONFIG", &k.kubeconfig)
        .env("SHOAL_ADMIN_TOKEN", "test-token")
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .unwrap();
    let mut proc = Proc(child);
    let deadline = Instant::now() + Duration::from_secs(20);
    while std::net::TcpStream::connect(("127.0.0.1", admin)).is_err() {
        if let Some(code) = proc.0.try_wait().unwrap() {
            let log = std::fs::read_to_string(dir.join("shoal.log")).unwrap_or_default();
            panic!("shoal exited at start ({code}):\n{log}");
        }
        assert!(Instant::now() < deadline, "shoal's admin port never opened");
        std::thread::sleep(Duration::from_millis(50));
    }
    wait_port(listen, 5);
    proc
}

/// The README demo's load step against a Deployment: shoal scales it out through the scale
/// subresource, routes to new pods once their EndpointSlice says ready, and scales in
/// without a failed request: the chosen pods are drained, their deletion cost set, and only
/// then the replica count lowered (order read from the apiserver's request log). A replica
/// count set with `kubectl scale` is seen within an interval; a watch ended by 410 Gone
/// re-lists and misses no membership change.
#[test]
fn shoal_scales_a_deployment_and_scales_in_without_failures() {
    let dir = tempdir();
    let k = Api::start(dir.path());
    create_deployment(&k, "demo", 1);
    let (listen, admin) = (free_port(), free_port());
    let _shoal = start_shoal(
        dir.path(),
        &k,
        &kube_config(listen, admin, "respect"),
        listen,
        admin,
    );
    let api = || api_json(admin, "/api/services/demo");
    wait_until(20, "the first pod routed", || ready(&api()) == 1);
    let first = api()["instances"][0]["id"].as_str().unwrap().to_string();
    assert!(
        first.starts_with("demo-"),
        "instance id is the pod name: {first}"
    );

    // Load step: about 6 in flight against a target of 2 → 3 pods.
    let url = format!("http://127.0.0.1:{listen}/work?cpu_ms=2&sleep_ms=100");
    let u = url.clone();
    let loader = std::thread::spawn(move || load(&u, 60, 12));
    wait_until(20, "scale-out", || k.replicas() >= 3 && ready(&api()) >= 3);
    let report = loader.join().unwrap();
    assert_eq!(report["errors"]["total"], 0, "{report}");

    // Light load through the scale-in: nothing fails while pods go away.
    let u = url.clone();
    let light = std::thread::spawn(move || load(&u, 10, 20));
    wait_until(40, "scale-in", || {
        k.replicas() == 1 && k.endpoints().len() == 1 && ready(&api()) == 1
    });
    let report = light.join().unwrap();
    assert_eq!(report["errors"]["total"], 0, "{report}");

    // From the request log: each lowering of replicas came after the chosen pods' deletion
    // cost was set, and exactly those pods went.
    let log = k.api().requests();
    let mut patched: Vec<String> = Vec::new();
    let mut last = 1u64;
    let mut lowered = 0;
    for r in &log {
        if r.method == "PATCH"
            && r.uri.contains("/pods/")
            && !r.uri.contains("/resize")
            && !r.body.contains("pod-deletion-cost\":null")
        {
            assert!(
                r.body
                    .contains("controller.kubernetes.io/pod-deletion-cost")
                    && r.body.contains("-2147483648"),
                "{r:?}"
            );
            let pod = r.uri.rsplit('/').next().unwrap().split('?').next().unwrap();
            patched.push(pod.to_string());
        }
        if r.method == "PUT" && r.uri.ends_with("/deployments/demo/scale") {
            let body: Value = serde_json::from_str(&r.body).unwrap();
            assert!(
                body["metadata"]["resourceVersion"]
                    .as_str()
                    .is_some_and(|v| !v.is_empty()),
                "scale write without a resourceVersion precondition: {}",
                r.body
            );
            let n = body["spec"]["replicas"].as_u64().unwrap();
            if n < last && r.status == 200 {
                lowered += 1;
                let removed = (last - n) as usize;
                assert!(
                    patched.len() >= removed,
                    "replicas lowered {last}→{n} before {removed} deletion-cost patches: {log:#?}"
                );
                patched.clear();
            }
            if r.status == 200 {
                last = n;
            }
        }
    }
    assert!(lowered >= 1, "no scale-in in the request log");
    let survivor = k.endpoints()[0].0.clone();
    let costly = k.pods().iter().any(|p| {
        p["metadata"]["annotations"]["controller.kubernetes.io/pod-deletion-cost"].is_string()
    });
    assert!(!costly, "a pod marked for removal survived ({survivor})");

    // kubectl scale is seen within an interval and adopted (respect mode).
    k.kubectl_ok(&["scale", "deployment/demo", "--replicas=3"]);
    let t = Instant::now();
    wait_until(3, "external scale seen", || api()["desired"] == 3);
    eprintln!("kubectl scale seen after {:?}", t.elapsed());
    let (_, m) = get(admin, "/metrics");
    assert!(
        counter(&m, "shoal_kube_external_scales_total{service=\"demo\"}") >= 1.0,
        "{m}"
    );
    wait_until(20, "three pods routed", || ready(&api()) == 3);

    // 410 Gone: history forgotten and watches cut; a change made right then still arrives.
    let (s, _) = http(k.api().addr, "POST", "/_test/compact", &[], "");
    assert_eq!(s, 200);
    let victim = k.endpoints()[0].0.clone();
    k.kubectl_ok(&["delete", "pod", &victim, "--wait=false"]);
    wait_until(20, "deleted pod left shoal's pool", || {
        !api()["instances"]
            .as_array()
            .unwrap()
            .iter()
            .any(|i| i["id"] == victim.as_str())
    });
    let (_, m) = get(admin, "/metrics");
    assert!(
        counter(&m, "shoal_kube_relists_total{service=\"demo\"}") >= 1.0,
        "{m}"
    );

    // shoal status names the Deployment and what it cannot do there.
    let status = shoal_status(admin);
    assert!(
        status.contains("kubernetes default/demo")
            && status.contains("metrics: metrics.k8s.io: CPU and memory per pod")
            && status.contains("vertical: recommend only"),
        "{status}"
    );

    // The shipped Role grants exactly what shoal used, the in-place resize that only
    // vertical `auto` uses (checked by `vertical_auto_resizes_pods_in_place_from_pod_metrics`)
    // and what only replicas on a Lease use (checked by
    // `replicas_elect_through_a_lease_and_fence_the_deployment`).
    let used = used_permissions(&k.api().requests());
    let role = role_permissions();
    let unused: std::collections::BTreeSet<Perm> = role.difference(&used).cloned().collect();
    let mut expected: std::collections::BTreeSet<Perm> = lease_permissions().into_iter().collect();
    expected.insert(resize_permission());
    assert_eq!(
        unused, expected,
        "requests shoal made vs deploy/kubernetes/rbac.yaml"
    );
    assert!(
        used.is_subset(&role),
        "requests shoal made vs deploy/kubernetes/rbac.yaml: {:?}",
        used.difference(&role).collect::<Vec<_>>()
    );
}

fn resize_permission() -> Perm {
    ("".into(), "pods/resize".into(), "patch".into())
}

type Perm = (String, String, String);

/// (apiGroup, resource, verb) of every request shoal (user agent `shoal`, or `shoal/ID` for
/// a replica of a cluster) made.
fn used_permissions(log: &[shoal_kube_testapi::Logged]) -> std::collections::BTreeSet<Perm> {
    let mut out = std::collections::BTreeSet::new();
    for r in log
        .iter()
        .filter(|r| r.user_agent == "shoal" || r.user_agent.starts_with("shoal/"))
    {
        let (path, query) = r.uri.split_once('?').unwrap_or((&r.uri, ""));
        let segs: Vec<&str> = path.trim_matches('/').split('/').collect();
        let (group, rest) = match segs.as_slice() {
            ["api", _, rest @ ..] => ("", rest),
            ["apis", g, _, rest @ ..] => (*g, rest),
            _ => panic!("unexpected request {r:?}"),
        };
        let rest = match rest {
            // Discovery documents: readable by every authenticated user (system:discovery).
            [] => continue,
            ["namespaces", _, rest @ ..] => rest,
            rest => rest,
        };
        let (resource, named) = match rest {
            [res] => (res.to_string(), false),
            [res, _] => (res.to_string(), true),
            [res, _, sub] => (format!("{res}/{sub}"), true),
            _ => panic!("unexpected request {r:?}"),
        };
        let verb = match (r.method.as_str(), named) {
            ("GET", false) if query.contains("watch=true") => "watch",
            ("GET", false) => "list",
            ("GET", true) => "get",
            ("PUT", _) => "update",
            ("PATCH", _) => "patch",
            ("POST", _) => "create",
            ("DELETE", _) => "delete",
            _ => panic!("unexpected request {r:?}"),
        };
        out.insert((group.to_string(), resource, verb.to_string()));
    }
    out
}

fn deploy_dir() -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../deploy/kubernetes")
}

fn manifests(file: &str) -> Vec<Value> {
    let text = std::fs::read_to_string(deploy_dir().join(file)).unwrap();
    text.split("\n---\n")
        .map(|doc| serde_yaml_ng::from_str::<Value>(doc).unwrap())
        .collect()
}

/// (apiGroup, resource, verb) the shipped Role grants.
fn role_permissions() -> std::collections::BTreeSet<Perm> {
    let role = manifests("rbac.yaml")
        .into_iter()
        .find(|d| d["kind"] == "Role")
        .unwrap();
    let mut out = std::collections::BTreeSet::new();
    for rule in role["rules"].as_array().unwrap() {
        for g in rule["apiGroups"].as_array().unwrap() {
            for res in rule["resources"].as_array().unwrap() {
                for v in rule["verbs"].as_array().unwrap() {
                    out.insert((
                        g.as_str().unwrap().to_string(),
                        res.as_str().unwrap().to_string(),
                        v.as_str().unwrap().to_string(),
                    ));
                }
            }
        }
    }
    out
}

/// `kubectl apply --dry-run=server -f deploy/kubernetes/` is accepted and stores nothing;
/// the shoal config inside the ConfigMap passes `shoal check`.
#[test]
fn deploy_manifests_apply_with_server_dry_run() {
    let dir = tempdir();
    let k = Api::start(dir.path());
    let path = deploy_dir();
    // As the README walks it: the namespace first (objects need theirs to exist, as on a
    // real server), then a server-side dry run of everything.
    let (ok, out) = k.kubectl(&["apply", "--dry-run=server", "-f", path.to_str().unwrap()]);
    assert!(
        !ok && out.contains("namespaces \"shoal-demo\" not found"),
        "objects accepted in a missing namespace: {out}"
    );
    k.kubectl_ok(&[
        "apply",
        "-f",
        path.join("00-namespace.yaml").to_str().unwrap(),
    ]);
    let out = k.kubectl_ok(&["apply", "--dry-run=server", "-f", path.to_str().unwrap()]);
    for what in [
        "namespace/shoal-demo unchanged (server dry run)",
        "deployment.apps/demo created (server dry run)",
        "service/demo created (server dry run)",
        "poddisruptionbudget.policy/demo created (server dry run)",
        "serviceaccount/shoal created (server dry run)",
        "role.rbac.authorization.k8s.io/shoal created (server dry run)",
        "rolebinding.rbac.authorization.k8s.io/shoal created (server dry run)",
        "configmap/shoal created (server dry run)",
        "deployment.apps/shoal created (server dry run)",
        "service/shoal created (server dry run)",
    ] {
        assert!(out.contains(what), "{what}: {out}");
    }
    assert!(
        k.object("apps", "deployments", "demo").is_none(),
        "dry run stored an object"
    );
    let cm = manifests("shoal.yaml")
        .into_iter()
        .find(|d| d["kind"] == "ConfigMap")
        .unwrap();
    let cfg = dir.path().join("shoal.toml");
    std::fs::write(&cfg, cm["data"]["shoal.toml"].as_str().unwrap()).unwrap();
    let out = Command::new(SHOAL)
        .args(["check", "--config"])
        .arg(&cfg)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Scale from zero: a Deployment at 0 replicas gets a pod when the first request arrives;
/// the request waits and succeeds once the pod is ready. Where no pod becomes ready in
/// `cold_start_timeout`, the request gets 503 with `Retry-After`.
#[test]
fn scale_from_zero_first_request_waits_for_a_pod() {
    let dir = tempdir();
    let k = Api::start(dir.path());
    for name in ["demo", "slow"] {
        create_deployment(&k, name, 0);
    }
    // `slow` pods take a minute to report ready.
    k.kubectl_ok(&[
        "patch",
        "deployment",
        "slow",
        "-p",
        r#"{"spec":{"template":{"spec":{"containers":[{"name":"anything","env":[{"name":"DEMO_READY_DELAY_MS","value":"60000"}]}]}}}}"#,
    ]);
    let (listen, slow_port, admin) = (free_port(), free_port(), free_port());
    let cfg = format!(
        r#"[admin]
listen = "127.0.0.1:{admin}"

[services.demo]
listen = "127.0.0.1:{listen}"
[services.demo.fleet]
provider = "kubernetes"
deployment = "demo"
min = 0
max = 2
cold_start_timeout = "20s"

[services.slow]
listen = "127.0.0.1:{slow_port}"
[services.slow.fleet]
provider = "kubernetes"
deployment = "slow"
min = 0
max = 2
cold_start_timeout = "1s"
"#
    );
    let _shoal = start_shoal(dir.path(), &k, &cfg, listen, admin);
    assert_eq!(k.replicas(), 0);

    let t = Instant::now();
    let (s, body) = http(
        format!("127.0.0.1:{listen}").parse().unwrap(),
        "GET",
        "/work?cpu_ms=1",
        &[],
        "",
    );
    eprintln!(
        "first request at zero replicas answered after {:?}",
        t.elapsed()
    );
    assert_eq!(s, 200, "{body}");
    assert_eq!(k.replicas(), 1);
    let (_, m) = get(admin, "/metrics");
    assert!(
        m.contains("shoal_cold_start_waits_total{service=\"demo\"} 1"),
        "{m}"
    );
    assert!(
        m.contains("shoal_kube_activations_total{service=\"demo\"} 1"),
        "{m}"
    );

    let t = Instant::now();
    let raw = http_raw(
        format!("127.0.0.1:{slow_port}").parse().unwrap(),
        "GET",
        "/work",
        &[],
        "",
    );
    assert!(raw.starts_with("HTTP/1.1 503"), "{raw}");
    assert_eq!(header(&raw, "retry-after"), Some("1"), "{raw}");
    assert!(
        t.elapsed() >= Duration::from_millis(900),
        "{:?}",
        t.elapsed()
    );
    let (_, m) = get(admin, "/metrics");
    assert!(
        m.contains("shoal_cold_start_failures_total{service=\"slow\",reason=\"timeout\"} 1"),
        "{m}"
    );
}

/// A Deployment whose container requests 100m CPU and 32Mi: shoal reads each pod's usage
/// from `metrics.k8s.io` (the test apiserver measures the pod processes), recommends a size,
/// and in `auto` mode resizes the pods in place through `pods/resize` (no restart: the same
/// pods serve throughout), including a pod that joins later; `kubectl top pod` reads the
/// same metrics.
#[test]
fn vertical_auto_resizes_pods_in_place_from_pod_metrics() {
    let dir = tempdir();
    let k = Api::start(dir.path());
    create_deployment(&k, "demo", 2);
    k.kubectl_ok(&[
        "patch",
        "deployment",
        "demo",
        "-p",
        r#"{"spec":{"template":{"spec":{"containers":[{"name":"anything","resources":{"requests":{"cpu":"100m","memory":"32Mi"},"limits":{"cpu":"200m","memory":"64Mi"}}}]}}}}"#,
    ]);
    let (listen, admin) = (free_port(), free_port());
    let cfg = fleet_config(
        listen,
        admin,
        r#"[services.demo.fleet]
provider = "kubernetes"
deployment = "demo"
min = 2
max = 3
[services.demo.resources]
mode = "auto"
cooldown = "1s"
min_cpu = 0.05
max_cpu = 2
min_memory = "16MiB"
max_memory = "256MiB""#,
    );
    let _shoal = start_shoal(dir.path(), &k, &cfg, listen, admin);
    let api = || api_json(admin, "/api/services/demo");
    wait_until(30, "two pods routed", || ready(&api()) == 2);
    let before: Vec<String> = live_pods(&k).into_iter().map(|p| p.0).collect();

    // About 0.8 cores of work over the two pods.
    let url = format!("http://127.0.0.1:{listen}/work?cpu_ms=20");
    let loader = std::thread::spawn(move || load(&url, 40, 25));
    wait_until(40, "pods resized in place", || {
        let pods = live_pods(&k);
        pods.len() == 2 && pods.iter().all(|p| p.1 != "100m" && p.1 == p.2)
    });
    let report = loader.join().unwrap();
    assert_eq!(report["errors"]["total"], 0, "{report}");
    let after = live_pods(&k);
    assert_eq!(
        after.iter().map(|p| p.0.clone()).collect::<Vec<_>>(),
        before,
        "resized in place, not replaced"
    );
    let cpu = shoal_kube_testapi::parse_quantity(&after[0].1).unwrap();
    assert!(cpu > 0.11, "the CPU request grew: {after:?}");

    let v = api_json(admin, "/api/services/demo/decisions");
    let resizes = v["resizes"].as_array().unwrap();
    eprintln!("pods after: {after:?}\nresizes: {resizes:#?}");
    assert!(
        resizes
            .iter()
            .any(|r| r["resource"] == "cpu" && r["direction"] == "up"),
        "{v}"
    );
    let v = api();
    assert!(v["recommendation"]["cpu"].as_f64().unwrap() > 0.1, "{v}");
    let limit = after[0].3.as_str();
    assert_eq!(
        shoal_kube_testapi::parse_quantity(limit).unwrap(),
        2.0 * cpu,
        "the limit keeps its 2× ratio"
    );

    // A pod that joins later starts at the template's size and is resized to the current one.
    k.kubectl_ok(&["scale", "deployment/demo", "--replicas=3"]);
    wait_until(30, "the new pod resized", || {
        let pods = live_pods(&k);
        pods.len() == 3 && pods.iter().all(|p| p.1 == after[0].1)
    });

    let status = shoal_status(admin);
    assert!(
        status.contains("metrics: metrics.k8s.io: CPU and memory per pod")
            && status.contains("vertical: auto: pods resized in place"),
        "{status}"
    );
    let top = k.kubectl_ok(&["top", "pod"]);
    assert!(top.contains(&before[0]) && top.contains("CPU"), "{top}");

    let used = used_permissions(&k.api().requests());
    assert!(used.contains(&resize_permission()), "{used:?}");
    assert!(
        used.is_subset(&role_permissions()),
        "requests shoal made vs deploy/kubernetes/rbac.yaml: {used:?}"
    );
}

/// A cluster without metrics-server and without in-place resize: shoal says so, keeps to
/// request-based targets and recommends only (no resize request is ever made).
#[test]
fn without_metrics_api_or_pod_resize_shoal_says_so_and_only_recommends() {
    let dir = tempdir();
    let k = Api::start_with(dir.path(), |o| {
        o.metrics_api = false;
        o.pod_resize = false;
    });
    create_deployment(&k, "demo", 1);
    let (listen, admin) = (free_port(), free_port());
    let cfg = fleet_config(
        listen,
        admin,
        r#"[services.demo.fleet]
provider = "kubernetes"
deployment = "demo"
min = 1
max = 1
[services.demo.resources]
mode = "auto"
cooldown = "1s""#,
    );
    let _shoal = start_shoal(dir.path(), &k, &cfg, listen, admin);
    let api = || api_json(admin, "/api/services/demo");
    wait_until(30, "the pod routed", || ready(&api()) == 1);
    wait_until(10, "discovery read", || {
        api()["fleet"]["metrics"]
            .as_str()
            .is_some_and(|m| m.starts_with("request-based"))
    });
    let f = api()["fleet"].clone();
    assert_eq!(
        f["vertical"], "recommend only: the cluster has no in-place pod resize (pods/resize)",
        "{f}"
    );
    let (ok, out) = k.kubectl(&["top", "pod"]);
    assert!(!ok, "kubectl top without metrics.k8s.io: {out}");
    let log = k.api().requests();
    assert!(
        !log.iter()
            .any(|r| r.uri.contains("/resize") || r.uri.contains("metrics.k8s.io/v1beta1/")),
        "{log:#?}"
    );
}

/// Live pods of the demo Deployment: (name, cpu request, container status cpu request,
/// cpu limit), by name.
fn live_pods(k: &Api) -> Vec<(String, String, String, String)> {
    let mut out: Vec<_> = k
        .pods()
        .iter()
        .filter(|p| p["metadata"]["deletionTimestamp"].is_null())
        .map(|p| {
            let s = |v: &Value| v.as_str().unwrap_or("").to_string();
            let c = &p["spec"]["containers"][0]["resources"];
            (
                s(&p["metadata"]["name"]),
                s(&c["requests"]["cpu"]),
                s(&p["status"]["containerStatuses"][0]["resources"]["requests"]["cpu"]),
                s(&c["limits"]["cpu"]),
            )
        })
        .collect();
    out.sort();
    out
}

/// `kubectl create deployment NAME --port=8080`: `shoal demo-service` pods on the test
/// apiserver.
fn create_deployment(k: &Api, name: &str, replicas: u32) {
    k.kubectl_ok(&[
        "create",
        "deployment",
        name,
        "--image=anything",
        "--port=8080",
        &format!("--replicas={replicas}"),
    ]);
}

/// `shoal status` against the admin port.
fn shoal_status(admin: u16) -> String {
    let out = Command::new(SHOAL)
        .args(["status", "--admin", &format!("127.0.0.1:{admin}")])
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A sample's value in a Prometheus text exposition (0 when absent).
fn counter(metrics: &str, series: &str) -> f64 {
    metrics
        .lines()
        .find_map(|l| l.strip_prefix(series)?.trim().parse().ok())
        .unwrap_or(0.0)
}

const LEASE_SECS: f64 = 3.0;

/// One `shoal run` replica of the Lease test.
struct Replica {
    proc: Proc,
    dir: tempfile::TempDir,
    listen: u16,
    admin: u16,
    id: String,
}

impl Replica {
    fn start(k: &Api, id: &str, listen: u16, admin: u16) -> Replica {
        let dir = tempdir();
        let cfg = fleet_config(
            listen,
            admin,
            &format!(
                r#"[services.demo.fleet]
provider = "kubernetes"
deployment = "demo"
min = 1
max = 6
[services.demo.autoscale]
interval = "1s"
targets = [{{ metric = "rps", target = 20 }}]
stable_window = "6s"
panic_window = "3s"
burst_hold = "5s"
scale_down_stabilization = "120s"

[cluster]
lease = "{LEASE_SECS}s"
id = "{id}"
peers = "shoal-peers""#
            ),
        );
        let proc = start_shoal(dir.path(), k, &cfg, listen, admin);
        Replica {
            proc,
            dir,
            listen,
            admin,
            id: id.to_string(),
        }
    }

    fn leader(&self) -> Value {
        api_json(self.admin, "/api/leader")
    }

    fn leads(&self) -> bool {
        self.leader()["leader"] == true
    }

    fn desired(&self) -> u64 {
        api_json(self.admin, "/api/services/demo")["desired"]
            .as_u64()
            .unwrap()
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("shoal.log")).unwrap_or_default()
    }

    fn agent(&self) -> String {
        format!("shoal/{}", self.id)
    }
}

/// Which of `rs` lead now (each one's `/api/leader`).
fn lease_leaders(rs: &[&Replica]) -> Vec<String> {
    rs.iter()
        .filter(|r| r.leads())
        .map(|r| r.id.clone())
        .collect()
}

/// Waits (up to `secs`) for exactly one leader among `rs`, never seeing two.
fn one_leader<'a>(rs: &[&'a Replica], secs: f64) -> (&'a Replica, Duration) {
    let t0 = Instant::now();
    loop {
        let l = lease_leaders(rs);
        assert!(l.len() <= 1, "two leaders: {l:?}");
        if let Some(id) = l.first() {
            return (rs.iter().find(|r| &r.id == id).unwrap(), t0.elapsed());
        }
        assert!(
            t0.elapsed() < Duration::from_secs_f64(secs),
            "no leader within {secs} s"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// `[cluster]` without `redis` on Kubernetes: three replicas elect through a Lease
/// (`coordination.k8s.io/v1`), the leader pulls the others' load from their admin ports
/// (listed in the `shoal-peers` EndpointSlices) and sizes the Deployment on the total. A
/// leader SIGKILLed under load is replaced within the lease, no request fails and the
/// replica count does not move (the dead one's report is missing data: a hold); one
/// SIGSTOPped past its lease is replaced and, woken, steps
/// down without writing; a fence raised by hand on the Deployment makes the leader step down
/// (and take the Lease again above it). From the apiserver's request log: no scale write by
/// a replaced leader after its successor's first write.
#[test]
fn replicas_elect_through_a_lease_and_fence_the_deployment() {
    let dir = tempdir();
    let k = Api::start(dir.path());
    create_deployment(&k, "demo", 1);
    let ports: Vec<(u16, u16)> = (0..3).map(|_| (free_port(), free_port())).collect();
    // One slice per replica (their admin ports differ), as a headless Service would list them.
    let slices = shoal_kube_testapi::find_res("discovery.k8s.io", "v1", "endpointslices").unwrap();
    for (i, (_, admin)) in ports.iter().enumerate() {
        k.api()
            .state
            .store
            .lock()
            .unwrap()
            .create(
                slices,
                "default",
                serde_json::json!({
                    "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
                    "metadata": {"name": format!("shoal-peers-{i}"), "namespace": "default",
                                 "labels": {"kubernetes.io/service-name": "shoal-peers"}},
                    "addressType": "IPv4",
                    "ports": [{"name": "admin", "port": admin, "protocol": "TCP"}],
                    "endpoints": [{"addresses": ["127.0.0.1"], "conditions": {"ready": true}}],
                }),
            )
            .unwrap();
    }
    let mut rs: Vec<Replica> = ports
        .iter()
        .enumerate()
        .map(|(i, (l, a))| Replica::start(&k, &format!("r{}", i + 1), *l, *a))
        .collect();
    let refs: Vec<&Replica> = rs.iter().collect();
    let (leader, _) = one_leader(&refs, 15.0);
    let first = leader.id.clone();
    for r in &rs {
        let l = r.leader();
        assert_eq!(l["holder"], first.as_str(), "{l}");
        assert_eq!(l["services"][0]["backend"]["kind"], "lease", "{l}");
    }
    let lease = k
        .object("coordination.k8s.io", "leases", "shoal-demo")
        .unwrap();
    assert!(
        lease["spec"]["holderIdentity"]
            .as_str()
            .unwrap()
            .starts_with(&format!("{first}#")),
        "{lease}"
    );
    assert_eq!(lease["spec"]["leaseDurationSeconds"], 3, "{lease}");

    // (a) 30 rps on each replica against 20 per pod: the leader sizes on the total (90: 5),
    // where each alone sees 30 (2).
    let loaders: Vec<_> = rs
        .iter()
        .map(|r| {
            let url = format!("http://127.0.0.1:{}/work?sleep_ms=20", r.listen);
            std::thread::spawn(move || load(&url, 30, 20))
        })
        .collect();
    let t0 = Instant::now();
    wait_until(25, "the leader sizes on the total load", || {
        assert_eq!(lease_leaders(&refs), vec![first.clone()], "one leader");
        leader.desired() >= 4 && k.replicas() >= 4
    });
    eprintln!(
        "leader desired {} after {:?}; load it sees: {}",
        leader.desired(),
        t0.elapsed(),
        leader.leader()["services"][0]["load"]
    );
    for l in loaders {
        let report = l.join().unwrap();
        assert_eq!(report["errors"]["total"], 0, "{report}");
    }
    assert!(k.replicas() <= 6);

    // (b) SIGKILL the leader under load (through the two others).
    let li = rs.iter().position(|r| r.id == first).unwrap();
    let others: Vec<usize> = (0..3).filter(|i| *i != li).collect();
    let loaders: Vec<_> = others
        .iter()
        .map(|i| {
            let url = format!("http://127.0.0.1:{}/work?sleep_ms=20", rs[*i].listen);
            std::thread::spawn(move || load(&url, 30, 12))
        })
        .collect();
    std::thread::sleep(Duration::from_secs(2));
    let before = k.replicas();
    rs[li].proc.signal("KILL");
    let t0 = Instant::now();
    let _ = rs[li].proc.wait_exit(5);
    let survivors: Vec<&Replica> = others.iter().map(|i| &rs[*i]).collect();
    let (second, took) = one_leader(&survivors, LEASE_SECS + 2.0);
    eprintln!("new leader {} after {took:?}", second.id);
    // Within the lease (the dead leader's last renewal was up to a retry period before the
    // kill), plus a retry period for the follower to look again.
    assert!(took.as_secs_f64() < LEASE_SECS + 1.0, "{took:?}");
    // The dead leader is still listed as a peer: its report goes stale and the new leader
    // holds (missing data, not zero load) rather than scale in.
    let (mut stale, mut held) = (false, false);
    while t0.elapsed() < Duration::from_secs(8) {
        assert_eq!(
            k.replicas(),
            before,
            "the replica count moved with the change"
        );
        assert!(lease_leaders(&survivors).len() <= 1);
        let l = second.leader();
        stale |= l["services"][0]["load"]
            .as_array()
            .into_iter()
            .flatten()
            .any(|r| r["replica"] == first.as_str() && r["age_ms"].as_u64() > Some(3000));
        let d = api_json(second.admin, "/api/services/demo")["last_decision"].clone();
        held |= d["inputs"]["metrics"][0]["stable"].is_null()
            && d["inputs"]["now_secs"].as_f64() > Some(0.0);
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(stale, "the dead leader's report never went stale");
    assert!(held, "the new leader did not hold on the missing report");
    for l in loaders {
        let report = l.join().unwrap();
        assert_eq!(report["errors"]["total"], 0, "{report}");
    }

    // (c) SIGSTOP the new leader past its lease: the third leads, and writes.
    let second_id = second.id.clone();
    let third_i = *others.iter().find(|i| rs[**i].id != second_id).unwrap();
    let second_i = *others.iter().find(|i| rs[**i].id == second_id).unwrap();
    rs[second_i].proc.signal("STOP");
    let third = &rs[third_i];
    let (_, took) = one_leader(&[third], LEASE_SECS + 2.0);
    eprintln!("third leader {} after {took:?}", third.id);
    let (s, body) = http(
        format!("127.0.0.1:{}", third.admin).parse().unwrap(),
        "POST",
        "/api/services/demo/scale",
        &[
            ("authorization", "Bearer test-token"),
            ("content-type", "application/json"),
        ],
        &format!("{{\"desired\": {}}}", before + 1),
    );
    assert_eq!(s, 200, "{body}");
    // (The autoscaler may lower it again: the request log shows the write.)
    let third_agent = third.agent();
    wait_until(5, "the third leader's write", || {
        k.api().requests().iter().any(|r| {
            r.method == "PUT"
                && r.uri.ends_with("/deployments/demo/scale")
                && r.status == 200
                && r.user_agent == third_agent
        })
    });
    // Paused well past its lease (it was already a lease and a write), then woken.
    std::thread::sleep(Duration::from_secs_f64(LEASE_SECS));
    rs[second_i].proc.signal("CONT");
    let alive: Vec<&Replica> = [second_i, third_i].iter().map(|i| &rs[*i]).collect();
    let t1 = Instant::now();
    while t1.elapsed() < Duration::from_secs(4) {
        assert_eq!(
            lease_leaders(&alive),
            vec![rs[third_i].id.clone()],
            "never two leaders"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    wait_until(5, "the paused leader logs its step-down", || {
        rs[second_i].log().contains("stepping down")
    });
    let paused_log = rs[second_i].log();
    eprintln!(
        "paused leader: {}",
        paused_log
            .lines()
            .filter(|l| l.contains("stepping down"))
            .collect::<Vec<_>>()
            .join("\n")
    );
    let l = rs[second_i].leader();
    assert_eq!(l["leader"], false, "{l}");
    assert_eq!(l["holder"], rs[third_i].id.as_str(), "{l}");

    // From the request log: after a successor's first write, the replaced leaders' writes
    // to the Deployment (scale or fence) never land.
    let log = k.api().requests();
    let is_write = |r: &&shoal_kube_testapi::Logged| {
        (r.method == "PUT" && r.uri.ends_with("/deployments/demo/scale"))
            || (r.method == "PATCH" && r.uri.ends_with("/deployments/demo"))
    };
    for (old, new) in [(li, second_i), (second_i, third_i)] {
        let Some(first_new) = log
            .iter()
            .filter(is_write)
            .find(|r| r.user_agent == rs[new].agent() && r.status == 200)
        else {
            continue;
        };
        let late: Vec<_> = log
            .iter()
            .filter(is_write)
            .filter(|r| r.user_agent == rs[old].agent() && r.status == 200)
            .filter(|r| r.ms > first_new.ms)
            .collect();
        assert!(
            late.is_empty(),
            "{} wrote after {}: {late:#?}",
            rs[old].id,
            rs[new].id
        );
    }
    let d = k.object("apps", "deployments", "demo").unwrap();
    let fence: u64 = d["metadata"]["annotations"]["shoal.dev/fence"]
        .as_str()
        .unwrap()
        .parse()
        .unwrap();
    assert_eq!(
        Some(fence),
        rs[third_i].leader()["token"].as_u64(),
        "the fence is the current leader's token"
    );

    // (d) A newer fence on the Deployment (as a newer leader would leave): the leader's next
    // write is refused, it steps down, and takes the Lease again above that fence.
    let third = &rs[third_i];
    let mark = k.api().requests().len();
    k.kubectl_ok(&[
        "annotate",
        "--overwrite",
        "deployment",
        "demo",
        "shoal.dev/fence=1000",
    ]);
    let (s, body) = http(
        format!("127.0.0.1:{}", third.admin).parse().unwrap(),
        "POST",
        "/api/services/demo/scale",
        &[
            ("authorization", "Bearer test-token"),
            ("content-type", "application/json"),
        ],
        &format!("{{\"desired\": {}}}", before + 2),
    );
    assert_eq!(s, 200, "{body}");
    wait_until(5, "the fenced write refused", || {
        third.log().contains("write refused by the fencing token")
    });
    let (_, m) = get(third.admin, "/metrics");
    assert!(
        counter(
            &m,
            "shoal_fenced_writes_total{service=\"demo\",result=\"refused\"}"
        ) >= 1.0,
        "{m}"
    );
    // The first write by any replica after the hand-raised fence claims a fence above it.
    let log = k.api().requests();
    let w = log[mark..]
        .iter()
        .filter(is_write)
        .find(|r| r.status == 200 && r.user_agent.starts_with("shoal/"));
    if let Some(w) = w {
        let body: Value = serde_json::from_str(&w.body).unwrap();
        let f = body["metadata"]["annotations"]["shoal.dev/fence"]
            .as_str()
            .and_then(|f| f.parse::<u64>().ok());
        assert!(
            w.method == "PATCH" && f.is_some_and(|f| f > 1000),
            "a write under the old token landed: {w:?}"
        );
    }
    let alive: Vec<&Replica> = [second_i, third_i].iter().map(|i| &rs[*i]).collect();
    wait_until(10, "a leader above the fence", || {
        let l = lease_leaders(&alive);
        l.len() == 1
            && alive
                .iter()
                .find(|r| r.id == l[0])
                .is_some_and(|r| r.leader()["token"].as_u64().unwrap_or(0) > 1000)
    });

    // The shipped Role covers what the replicas did (Lease, fence patch, peers' slices).
    let used = used_permissions(&k.api().requests());
    assert!(
        used.is_subset(&role_permissions()),
        "requests shoal made vs deploy/kubernetes/rbac.yaml: {:?}",
        used.difference(&role_permissions()).collect::<Vec<_>>()
    );
    for p in lease_permissions() {
        assert!(used.contains(&p), "{p:?} not used: {used:?}");
    }
}

/// What only `[cluster]` on a Lease uses.
fn lease_permissions() -> Vec<Perm> {
    let p = |g: &str, r: &str, v: &str| (g.to_string(), r.to_string(), v.to_string());
    vec![
        p("coordination.k8s.io", "leases", "get"),
        p("coordination.k8s.io", "leases", "create"),
        p("coordination.k8s.io", "leases", "update"),
        p("apps", "deployments", "patch"),
    ]
}
