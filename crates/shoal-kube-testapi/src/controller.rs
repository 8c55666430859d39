//! The test apiserver's Deployment controller and "kubelet": pods are real `shoal
//! demo-service` processes, each on its own loopback address and the container's port.
//!
//! - A Deployment with fewer live pods than `spec.replicas` gets new pods; one with more has
//!   the surplus marked for deletion, chosen like the ReplicaSet controller does: not-ready
//!   before ready, then the lowest `controller.kubernetes.io/pod-deletion-cost`, then the
//!   newest.
//! - A pod marked for deletion is terminating at once (its endpoint `ready=false`,
//!   `serving` as before, `terminating=true`); after the termination delay (a preStop hook's
//!   sleep) its process gets SIGTERM, SIGKILL 30 s later; the pod object goes when the
//!   process has exited.
//! - A pod is ready once its `/healthz` answers 200.
//! - One EndpointSlice per Deployment (`kubernetes.io/service-name=DEPLOYMENT`), rewritten
//!   only when its content changes; the Deployment's status counts replicas.

use std::collections::HashMap;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::process::Child;

use crate::{find_res, key, now_rfc3339, State};

const DELETION_COST: &str = "controller.kubernetes.io/pod-deletion-cost";

/// A pseudo-random lowercase suffix (names and addresses need no cryptographic quality).
pub fn suffix() -> String {
    let mut x = next_random();
    (0..5)
        .map(|_| {
            let c = b"bcdfghjklmnpqrstvwxz2456789"[(x % 27) as usize] as char;
            x /= 27;
            c
        })
        .collect()
}

fn next_random() -> u64 {
    static STATE: AtomicU64 = AtomicU64::new(0);
    let mut s = STATE.load(Ordering::Relaxed);
    if s == 0 {
        s = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default()
            .as_nanos() as u64
            ^ (u64::from(std::process::id()) << 32)
            | 1;
    }
    // xorshift64*
    s ^= s >> 12;
    s ^= s << 25;
    s ^= s >> 27;
    STATE.store(s, Ordering::Relaxed);
    s.wrapping_mul(0x2545_F491_4F6C_DD1D)
}

struct PodProc {
    child: Child,
    /// Last CPU reading (seconds, including reaped children) and when, for the usage rate.
    cpu: Option<(f64, Instant)>,
    addr: SocketAddr,
    ready: bool,
    /// When the pod was first seen terminating.
    deleting_since: Option<Instant>,
    term_sent: Option<Instant>,
}

fn pods_res() -> &'static crate::Res {
    find_res("", "v1", "pods").expect("pods")
}
fn deploy_res() -> &'static crate::Res {
    find_res("apps", "v1", "deployments").expect("deployments")
}
fn slice_res() -> &'static crate::Res {
    find_res("discovery.k8s.io", "v1", "endpointslices").expect("endpointslices")
}

fn ns_name(o: &Value) -> (String, String) {
    (
        o["metadata"]["namespace"]
            .as_str()
            .unwrap_or("")
            .to_string(),
        o["metadata"]["name"].as_str().unwrap_or("").to_string(),
    )
}

fn terminating(o: &Value) -> bool {
    o["metadata"].get("deletionTimestamp").is_some()
}

fn container_port(template_spec: &Value) -> (u16, String) {
    let p = &template_spec["containers"][0]["ports"][0];
    (
        p["containerPort"].as_u64().unwrap_or(8080) as u16,
        p["name"].as_str().unwrap_or("").to_string(),
    )
}

/// Runs until the server stops, then stops every pod process.
pub async fn run(st: Arc<State>) {
    let mut procs: HashMap<String, PodProc> = HashMap::new();
    let mut stop = st.stop.subscribe();
    let mut measured = Instant::now();
    loop {
        tokio::select! {
            _ = stop.changed() => break,
            _ = st.changed.notified() => {}
            _ = tokio::time::sleep(Duration::from_millis(100)) => {}
        }
        reconcile(&st, &mut procs).await;
        if measured.elapsed() >= METRICS_WINDOW {
            measured = Instant::now();
            measure(&st, &mut procs);
        }
    }
    for p in procs.values_mut() {
        signal(&p.child, nix::sys::signal::Signal::SIGTERM);
    }
    for (_, mut p) in procs.drain() {
        if tokio::time::timeout(Duration::from_secs(5), p.child.wait())
            .await
            .is_err()
        {
            let _ = p.child.kill().await;
        }
    }
}

/// How often pod usage is measured (metrics-server's resolution; 15 s there, short here).
const METRICS_WINDOW: Duration = Duration::from_secs(1);

/// CPU seconds (utime + stime + reaped children) and resident bytes of a process.
fn proc_usage(pid: u32) -> Option<(f64, u64)> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let f: Vec<&str> = stat[stat.rfind(')')? + 1..].split_whitespace().collect();
    // f[0] is field 3: utime..cstime are fields 14..17, rss is field 24.
    let ticks: u64 = (11..15)
        .map(|i| f.get(i).and_then(|v| v.parse::<u64>().ok()))
        .sum::<Option<u64>>()?;
    let rss: u64 = f.get(21)?.parse().ok()?;
    let tck = nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK)
        .ok()
        .flatten()
        .unwrap_or(100) as f64;
    let page = nix::unistd::sysconf(nix::unistd::SysconfVar::PAGE_SIZE)
        .ok()
        .flatten()
        .unwrap_or(4096) as u64;
    Some((ticks as f64 / tck, rss * page))
}

/// Measures every running pod's CPU rate and memory for `metrics.k8s.io`.
fn measure(st: &Arc<State>, procs: &mut HashMap<String, PodProc>) {
    let mut usage = st.usage.lock().unwrap();
    usage.retain(|k, _| procs.contains_key(k));
    for (k, p) in procs.iter_mut() {
        let Some((cpu, mem)) = p.child.id().and_then(proc_usage) else {
            continue;
        };
        let now = Instant::now();
        if let Some((c0, t0)) = p.cpu {
            let window = now - t0;
            usage.insert(
                k.clone(),
                crate::PodUsage {
                    cores: (cpu - c0).max(0.0) / window.as_secs_f64().max(1e-3),
                    memory_bytes: mem,
                    timestamp: crate::now_rfc3339(),
                    window,
                },
            );
        }
        p.cpu = Some((cpu, now));
    }
}

fn signal(child: &Child, sig: nix::sys::signal::Signal) {
    if let Some(pid) = child.id() {
        let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), sig);
    }
}

async fn reconcile(st: &Arc<State>, procs: &mut HashMap<String, PodProc>) {
    let (deployments, pods) = {
        let s = st.store.lock().unwrap();
        (s.list(deploy_res(), ""), s.list(pods_res(), ""))
    };
    // 1. Deployments: pod counts.
    for d in &deployments {
        let (ns, name) = ns_name(d);
        let uid = d["metadata"]["uid"].clone();
        let replicas = d["spec"]["replicas"].as_u64().unwrap_or(1) as usize;
        let owned: Vec<&Value> = pods
            .iter()
            .filter(|p| p["metadata"]["ownerReferences"][0]["uid"] == uid)
            .collect();
        let live: Vec<&Value> = owned.iter().copied().filter(|p| !terminating(p)).collect();
        if live.len() < replicas {
            for _ in live.len()..replicas {
                create_pod(st, d, &ns, &name);
            }
        } else if live.len() > replicas {
            let mut ranked: Vec<&Value> = live.clone();
            ranked.sort_by_key(|p| {
                let (_, pn) = ns_name(p);
                let ready = procs.get(&format!("{ns}/{pn}")).is_some_and(|x| x.ready);
                let cost: i64 = p["metadata"]["annotations"][DELETION_COST]
                    .as_str()
                    .and_then(|c| c.parse().ok())
                    .unwrap_or(0);
                let created = p["metadata"]["resourceVersion"]
                    .as_str()
                    .and_then(|c| c.parse::<u64>().ok())
                    .unwrap_or(0);
                let born = p["metadata"]["labels"]["shoal-testapi/seq"]
                    .as_str()
                    .and_then(|c| c.parse::<u64>().ok())
                    .unwrap_or(created);
                (ready, cost, std::cmp::Reverse(born))
            });
            for p in ranked.into_iter().take(live.len() - replicas) {
                let (_, pn) = ns_name(p);
                mark_deleting(st, &ns, &pn);
            }
        }
    }
    // 2. Pods: start, probe, stop.
    for p in &pods {
        let (ns, pn) = ns_name(p);
        let k = format!("{ns}/{pn}");
        let owner = p["metadata"]["ownerReferences"][0]["uid"].clone();
        if !owner.is_null()
            && !terminating(p)
            && !deployments.iter().any(|d| d["metadata"]["uid"] == owner)
        {
            // Its Deployment is gone: garbage-collect it.
            mark_deleting(st, &ns, &pn);
            continue;
        }
        if terminating(p) {
            let Some(proc_) = procs.get_mut(&k) else {
                let _ = st.store.lock().unwrap().delete(pods_res(), &ns, &pn);
                continue;
            };
            let since = *proc_.deleting_since.get_or_insert_with(Instant::now);
            if proc_.term_sent.is_none() && since.elapsed() >= st.opts.termination_delay {
                signal(&proc_.child, nix::sys::signal::Signal::SIGTERM);
                proc_.term_sent = Some(Instant::now());
            }
            if let Some(t) = proc_.term_sent {
                if t.elapsed() > Duration::from_secs(30) {
                    let _ = proc_.child.start_kill();
                }
            }
            if matches!(proc_.child.try_wait(), Ok(Some(_))) {
                procs.remove(&k);
                let _ = st.store.lock().unwrap().delete(pods_res(), &ns, &pn);
            }
            continue;
        }
        match procs.get_mut(&k) {
            None => {
                let (port, _) = container_port(&p["spec"]);
                match start_process(st, p, port) {
                    Ok(proc_) => {
                        let ip = proc_.addr.ip().to_string();
                        procs.insert(k, proc_);
                        set_pod_status(st, &ns, &pn, Some(&ip), false);
                    }
                    Err(e) => tracing::error!(pod = %k, error = %e, "cannot start pod process"),
                }
            }
            Some(proc_) => {
                if matches!(proc_.child.try_wait(), Ok(Some(_))) {
                    // Crashed: not ready; restarted on the next pass (restartPolicy Always).
                    tracing::warn!(pod = %k, "pod process exited; restarting");
                    procs.remove(&k);
                    set_pod_status(st, &ns, &pn, None, false);
                } else if !proc_.ready && probe(proc_.addr).await {
                    proc_.ready = true;
                    let ip = proc_.addr.ip().to_string();
                    set_pod_status(st, &ns, &pn, Some(&ip), true);
                }
            }
        }
    }
    // 3. EndpointSlices and Deployment status from the pods as they are now.
    let pods = st.store.lock().unwrap().list(pods_res(), "");
    for d in &deployments {
        publish(st, d, &pods, procs);
    }
}

fn create_pod(st: &Arc<State>, d: &Value, ns: &str, dname: &str) {
    static SEQ: AtomicU64 = AtomicU64::new(1);
    let tmpl = &d["spec"]["template"];
    let mut labels = tmpl["metadata"]["labels"].clone();
    let seq = SEQ.fetch_add(1, Ordering::Relaxed);
    labels["pod-template-hash"] = json!("testapi");
    labels["shoal-testapi/seq"] = json!(seq.to_string());
    let mut md = json!({
        "name": format!("{dname}-{}", suffix()),
        "namespace": ns,
        "labels": labels,
        "ownerReferences": [{"apiVersion": "apps/v1", "kind": "Deployment", "name": dname,
                             "uid": d["metadata"]["uid"], "controller": true}],
    });
    if let Some(a) = tmpl["metadata"].get("annotations") {
        md["annotations"] = a.clone();
    }
    let pod = json!({"apiVersion": "v1", "kind": "Pod", "metadata": md, "spec": tmpl["spec"],
                     "status": {"phase": "Pending"}});
    let mut s = st.store.lock().unwrap();
    if let Err(e) = s.create(pods_res(), ns, pod) {
        tracing::error!(error = %e, "cannot create pod");
    }
}

fn mark_deleting(st: &Arc<State>, ns: &str, name: &str) {
    let mut s = st.store.lock().unwrap();
    if let Some(mut p) = s.get(pods_res(), ns, name).cloned() {
        if terminating(&p) {
            return;
        }
        p["metadata"]["deletionTimestamp"] = json!(now_rfc3339());
        p["metadata"]["deletionGracePeriodSeconds"] = json!(30);
        let _ = s.update(pods_res(), ns, name, p, None);
    }
}

fn set_pod_status(st: &Arc<State>, ns: &str, name: &str, ip: Option<&str>, ready: bool) {
    let mut s = st.store.lock().unwrap();
    let Some(mut p) = s.get(pods_res(), ns, name).cloned() else {
        return;
    };
    let r = if ready { "True" } else { "False" };
    p["status"] = json!({
        "phase": if ip.is_some() { "Running" } else { "Pending" },
        "podIP": ip, "hostIP": "127.0.0.1",
        "conditions": [{"type": "Ready", "status": r}, {"type": "ContainersReady", "status": r}],
        "containerStatuses": [{"name": p["spec"]["containers"][0]["name"], "ready": ready,
                               "restartCount": 0, "image": p["spec"]["containers"][0]["image"],
                               "resources": p["spec"]["containers"][0]["resources"]}],
    });
    if ip.is_none() {
        p["status"].as_object_mut().map(|m| m.remove("podIP"));
    }
    let _ = s.update(pods_res(), ns, name, p, None);
}

fn start_process(st: &Arc<State>, pod: &Value, port: u16) -> std::io::Result<PodProc> {
    // A free loopback address for the container port (all of 127/8 routes to lo on Linux).
    let mut addr = None;
    for _ in 0..50 {
        let r = next_random();
        let ip = Ipv4Addr::new(
            127,
            16 + (r % 200) as u8,
            (r >> 8) as u8,
            2 + ((r >> 16) % 250) as u8,
        );
        let a = SocketAddr::from((ip, port));
        if std::net::TcpListener::bind(a).is_ok() {
            addr = Some(a);
            break;
        }
    }
    let addr = addr.ok_or_else(|| std::io::Error::other("no free loopback address"))?;
    let mut cmd = tokio::process::Command::new(&st.opts.shoal);
    cmd.arg("demo-service")
        .arg("--listen")
        .arg(addr.to_string())
        .env("PORT", port.to_string())
        .env(
            "SHOAL_INSTANCE",
            pod["metadata"]["name"].as_str().unwrap_or(""),
        )
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true);
    if let Some(env) = pod["spec"]["containers"][0]["env"].as_array() {
        for e in env {
            if let (Some(n), Some(v)) = (e["name"].as_str(), e["value"].as_str()) {
                cmd.env(n, v);
            }
        }
    }
    let child = cmd.spawn()?;
    Ok(PodProc {
        child,
        cpu: None,
        addr,
        ready: false,
        deleting_since: None,
        term_sent: None,
    })
}

/// `GET /healthz` answers 200 within 300 ms.
async fn probe(addr: SocketAddr) -> bool {
    let attempt = async {
        let mut s = tokio::net::TcpStream::connect(addr).await.ok()?;
        s.write_all(b"GET /healthz HTTP/1.1\r\nHost: pod\r\nConnection: close\r\n\r\n")
            .await
            .ok()?;
        let mut buf = [0u8; 16];
        let n = s.read(&mut buf).await.ok()?;
        Some(buf[..n].starts_with(b"HTTP/1.1 200"))
    };
    matches!(
        tokio::time::timeout(Duration::from_millis(300), attempt).await,
        Ok(Some(true))
    )
}

fn publish(st: &Arc<State>, d: &Value, pods: &[Value], procs: &HashMap<String, PodProc>) {
    let (ns, name) = ns_name(d);
    let uid = &d["metadata"]["uid"];
    let mut owned: Vec<&Value> = pods
        .iter()
        .filter(|p| p["metadata"]["ownerReferences"][0]["uid"] == *uid)
        .collect();
    owned.sort_by_key(|p| p["metadata"]["name"].as_str().unwrap_or("").to_string());
    let (port, port_name) = container_port(&d["spec"]["template"]["spec"]);
    let mut endpoints = Vec::new();
    let (mut ready_n, mut live_n) = (0, 0);
    for p in &owned {
        let (_, pn) = ns_name(p);
        let Some(proc_) = procs.get(&format!("{ns}/{pn}")) else {
            continue;
        };
        let term = terminating(p);
        // Serving until the process has been told to stop.
        let serving = proc_.ready && proc_.term_sent.is_none();
        if !term {
            live_n += 1;
            ready_n += usize::from(proc_.ready);
        }
        endpoints.push(json!({
            "addresses": [proc_.addr.ip().to_string()],
            "conditions": {"ready": proc_.ready && !term, "serving": serving, "terminating": term},
            "targetRef": {"kind": "Pod", "namespace": ns, "name": pn, "uid": p["metadata"]["uid"]},
            "nodeName": "loopback",
        }));
    }
    let slice_name = format!("{name}-testapi");
    let slice = json!({
        "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
        "metadata": {"name": slice_name, "namespace": ns,
                     "labels": {"kubernetes.io/service-name": name,
                                "endpointslice.kubernetes.io/managed-by": "shoal-kube-testapi"},
                     "ownerReferences": [{"apiVersion": "apps/v1", "kind": "Deployment",
                                          "name": name, "uid": uid, "controller": true}]},
        "addressType": "IPv4",
        "endpoints": endpoints,
        "ports": [{"name": port_name, "port": port, "protocol": "TCP"}],
    });
    let mut s = st.store.lock().unwrap();
    let sr = slice_res();
    match s.get(sr, &ns, &slice_name).cloned() {
        None => {
            let _ = s.create(sr, &ns, slice);
        }
        Some(cur) => {
            if cur["endpoints"] != slice["endpoints"] || cur["ports"] != slice["ports"] {
                let mut next = cur.clone();
                next["endpoints"] = slice["endpoints"].clone();
                next["ports"] = slice["ports"].clone();
                let _ = s.update(sr, &ns, &slice_name, next, None);
            }
        }
    }
    let dr = deploy_res();
    if let Some(mut cur) = s.objects.get(&key(dr, &ns, &name)).cloned() {
        let want = d["spec"]["replicas"].as_u64().unwrap_or(1);
        let status = json!({
            "observedGeneration": cur["metadata"]["generation"],
            "replicas": live_n, "updatedReplicas": live_n, "readyReplicas": ready_n,
            "availableReplicas": ready_n,
            "conditions": [{"type": "Available",
                            "status": if ready_n as u64 >= want { "True" } else { "False" }}],
        });
        if cur["status"] != status {
            cur["status"] = status;
            let _ = s.update(dr, &ns, &name, cur, None);
        }
    }
}
