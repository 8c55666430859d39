//! The Kubernetes backend of `cluster.rs`: leader election through a `coordination.k8s.io/v1`
//! Lease, fencing on the Deployment, and the other replicas' load pulled from their admin
//! ports (`[cluster]` without `redis`, every fleet `provider = "kubernetes"`).
//!
//! - Election (client-go's `LeaseLock` semantics): read the Lease; take it when absent
//!   (create), expired, or held by us; replace it with the read `resourceVersion` as
//!   precondition (a 409 means another replica won the race). "Expired" is judged on this
//!   replica's clock: the lease runs from when this replica last *saw the record change*, never
//!   from the `renewTime` another host wrote (clocks differ). Each acquisition raises
//!   `spec.leaseTransitions`; that number is the fencing token.
//! - Fencing: the Deployment carries the token of the last leader that wrote it, in the
//!   annotation `shoal.dev/fence`. A leader raises it to its own token (a merge patch with
//!   the Deployment's `resourceVersion` as precondition) before writing the scale with the
//!   `resourceVersion` that patch produced, so any write by a newer leader in between is a
//!   409, and the re-read shows the higher fence: the old leader steps down.
//! - Shared load: the leader lists the EndpointSlices of the `peers` Service and pulls each
//!   replica's report from `GET /api/cluster/load/SERVICE` on its admin port (pull only: a
//!   host not listed there cannot inject load).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use http::{Method, Request};
use http_body_util::{BodyExt, Empty, Limited};
use hyper_util::rt::TokioIo;
use serde_json::{json, Value};

use crate::cluster::LoadReport;
use crate::kube::{ApiError, KubeClient};

/// The Deployment annotation holding the token of the last leader that wrote it.
pub const FENCE_ANNOTATION: &str = "shoal.dev/fence";

/// A peer's load answer is small; anything bigger is refused.
const PEER_BODY_LIMIT: usize = 64 * 1024;

/// The fields of a Lease's spec the election reads.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Record {
    pub holder: String,
    pub duration_s: u64,
    pub acquire: String,
    pub renew: String,
    pub transitions: u64,
}

impl Record {
    pub fn from_lease(v: &Value) -> Record {
        let s = &v["spec"];
        Record {
            holder: s["holderIdentity"].as_str().unwrap_or("").to_string(),
            duration_s: s["leaseDurationSeconds"].as_u64().unwrap_or(0),
            acquire: s["acquireTime"].as_str().unwrap_or("").to_string(),
            renew: s["renewTime"].as_str().unwrap_or("").to_string(),
            transitions: s["leaseTransitions"].as_u64().unwrap_or(0),
        }
    }

    fn spec(&self) -> Value {
        json!({
            "holderIdentity": self.holder,
            "leaseDurationSeconds": self.duration_s,
            "acquireTime": self.acquire,
            "renewTime": self.renew,
            "leaseTransitions": self.transitions,
        })
    }
}

/// The Lease as this replica last saw it.
#[derive(Debug, Clone, PartialEq)]
pub struct Seen {
    pub record: Record,
    pub rv: String,
    /// When this replica saw the record change last (its own clock).
    pub changed_at: Instant,
}

/// The new observation: the change time moves only when the record changed.
pub fn observe(prev: Option<&Seen>, record: Record, rv: String, now: Instant) -> Seen {
    let changed_at = match prev {
        Some(p) if p.record == record => p.changed_at,
        _ => now,
    };
    Seen {
        record,
        rv,
        changed_at,
    }
}

/// Whether another replica may take the Lease at `now`: no holder, or no change seen for
/// the lease's duration.
pub fn expired(seen: &Seen, now: Instant) -> bool {
    seen.record.holder.is_empty()
        || now.saturating_duration_since(seen.changed_at)
            >= Duration::from_secs(seen.record.duration_s)
}

/// What a leader with `token` does about the Deployment's fence before a scale write.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fence {
    /// A newer leader has written: step down, write nothing.
    Fenced(u64),
    /// Raise the fence to our token first.
    Claim,
    /// Ours already: write.
    Write,
}

pub fn fence_decision(annotation: Option<u64>, token: u64) -> Fence {
    match annotation {
        Some(f) if f > token => Fence::Fenced(f),
        Some(f) if f == token => Fence::Write,
        _ => Fence::Claim,
    }
}

/// The fence annotation of a Deployment (None when absent or unreadable).
pub fn fence_of(deployment: &Value) -> Option<u64> {
    deployment["metadata"]["annotations"][FENCE_ANNOTATION]
        .as_str()
        .and_then(|s| s.parse().ok())
}

/// `MicroTime`: RFC 3339 in UTC with microseconds, as Leases carry.
pub fn micro_time(t: SystemTime) -> String {
    let d = t.duration_since(UNIX_EPOCH).unwrap_or_default();
    let secs = d.as_secs() as i64;
    let (days, rem) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    // Civil date from days (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{:06}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60,
        d.subsec_micros()
    )
}

/// A peer's report as the leader keeps it.
#[derive(Debug, Clone)]
struct Peer {
    report: LoadReport,
    /// Last successful pull.
    at: Instant,
}

/// One service's Lease and peer list.
pub struct LeaseStore {
    client: KubeClient,
    namespace: String,
    name: String,
    /// The Lease's `holderIdentity` while we hold it (id plus a per-process nonce).
    owner: String,
    lease_secs: u64,
    /// Every call is bounded by this (an answer later than the retry period is useless).
    bound: Duration,
    seen: Mutex<Option<Seen>>,
    /// The highest fence seen on the Deployment: a Lease created afresh (deleted by hand)
    /// starts above it, so its leader is not fenced forever.
    floor: AtomicU64,
    pub peers: Option<String>,
    pulled: Mutex<HashMap<String, Peer>>,
}

impl LeaseStore {
    pub fn new(
        client: KubeClient,
        namespace: &str,
        name: &str,
        owner: &str,
        lease: Duration,
        retry: Duration,
        peers: Option<String>,
    ) -> LeaseStore {
        LeaseStore {
            client,
            namespace: namespace.to_string(),
            name: name.to_string(),
            owner: owner.to_string(),
            // Whole seconds, rounded up: the Lease cannot say less.
            lease_secs: lease.as_secs() + u64::from(lease.subsec_nanos() > 0),
            bound: retry.max(Duration::from_millis(200)),
            seen: Mutex::new(None),
            floor: AtomicU64::new(0),
            peers,
            pulled: Mutex::new(HashMap::new()),
        }
    }

    pub fn namespace(&self) -> &str {
        &self.namespace
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    fn path(&self) -> String {
        format!(
            "/apis/coordination.k8s.io/v1/namespaces/{}/leases/{}",
            self.namespace, self.name
        )
    }

    async fn call(
        &self,
        method: Method,
        path: &str,
        body: Option<&Value>,
    ) -> Result<Value, ApiError> {
        let ct = if body.is_some() {
            "application/json"
        } else {
            ""
        };
        tokio::time::timeout(self.bound, self.client.call(method, path, ct, body))
            .await
            .unwrap_or_else(|_| {
                Err(ApiError {
                    code: 0,
                    message: format!("{path}: no answer within the retry period"),
                })
            })
    }

    /// Raises the floor for the next fresh Lease's token.
    pub fn observe_fence(&self, fence: u64) {
        self.floor.fetch_max(fence, Ordering::Relaxed);
    }

    fn lease_body(&self, record: &Record, rv: Option<&str>) -> Value {
        let mut md = json!({"name": self.name, "namespace": self.namespace});
        if let Some(rv) = rv {
            md["resourceVersion"] = json!(rv);
        }
        json!({"apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
               "metadata": md, "spec": record.spec()})
    }

    /// Reads the Lease and records what was seen; None when it does not exist.
    async fn read(&self) -> Result<Option<Seen>, String> {
        match self.call(Method::GET, &self.path(), None).await {
            Ok(v) => {
                let rv = v["metadata"]["resourceVersion"]
                    .as_str()
                    .unwrap_or("")
                    .to_string();
                let mut s = self.seen.lock().expect("lease seen");
                let seen = observe(s.as_ref(), Record::from_lease(&v), rv, Instant::now());
                *s = Some(seen.clone());
                Ok(Some(seen))
            }
            Err(e) if e.code == 404 => {
                *self.seen.lock().expect("lease seen") = None;
                Ok(None)
            }
            Err(e) => Err(e.to_string()),
        }
    }

    /// Stores what our own successful write made the Lease.
    fn wrote(&self, v: &Value) {
        let rv = v["metadata"]["resourceVersion"]
            .as_str()
            .unwrap_or("")
            .to_string();
        *self.seen.lock().expect("lease seen") = Some(Seen {
            record: Record::from_lease(v),
            rv,
            changed_at: Instant::now(),
        });
    }

    /// Tries to take the Lease: `Some(token)` when it is ours now.
    pub async fn acquire(&self) -> Result<Option<u64>, String> {
        let now_s = micro_time(SystemTime::now());
        let floor = self.floor.load(Ordering::Relaxed);
        let Some(seen) = self.read().await? else {
            let record = Record {
                holder: self.owner.clone(),
                duration_s: self.lease_secs,
                acquire: now_s.clone(),
                renew: now_s,
                transitions: floor + 1,
            };
            let path = format!(
                "/apis/coordination.k8s.io/v1/namespaces/{}/leases",
                self.namespace
            );
            let body = self.lease_body(&record, None);
            return match self.call(Method::POST, &path, Some(&body)).await {
                Ok(v) => {
                    self.wrote(&v);
                    Ok(Some(record.transitions))
                }
                Err(e) if e.code == 409 => Ok(None),
                Err(e) => Err(e.to_string()),
            };
        };
        let mine = seen.record.holder == self.owner;
        if !mine && !expired(&seen, Instant::now()) {
            return Ok(None);
        }
        // Every acquisition takes a new token, even of a Lease still ours (we stepped down
        // meanwhile, and may have been fenced under the old one).
        let record = Record {
            holder: self.owner.clone(),
            duration_s: self.lease_secs,
            acquire: now_s.clone(),
            renew: now_s,
            transitions: seen.record.transitions.max(floor) + 1,
        };
        let body = self.lease_body(&record, Some(&seen.rv));
        match self.call(Method::PUT, &self.path(), Some(&body)).await {
            Ok(v) => {
                self.wrote(&v);
                Ok(Some(record.transitions))
            }
            Err(e) if e.code == 409 => Ok(None),
            Err(e) => Err(e.to_string()),
        }
    }

    /// Extends our hold: Ok(false) when the Lease is someone else's (or another term's).
    pub async fn renew(&self, token: u64) -> Result<bool, String> {
        let Some(seen) = self.read().await? else {
            return Ok(false);
        };
        if seen.record.holder != self.owner || seen.record.transitions != token {
            return Ok(false);
        }
        let record = Record {
            renew: micro_time(SystemTime::now()),
            duration_s: self.lease_secs,
            ..seen.record
        };
        let body = self.lease_body(&record, Some(&seen.rv));
        match self.call(Method::PUT, &self.path(), Some(&body)).await {
            Ok(v) => {
                self.wrote(&v);
                Ok(true)
            }
            // Written meanwhile: the next renewal reads again and sees by whom.
            Err(e) => Err(e.to_string()),
        }
    }

    /// Hands the Lease over at once (client-go's `ReleaseOnCancel`): no holder, a second left.
    pub async fn release(&self) {
        let Ok(Some(seen)) = self.read().await else {
            return;
        };
        if seen.record.holder != self.owner {
            return;
        }
        let now_s = micro_time(SystemTime::now());
        let record = Record {
            holder: String::new(),
            duration_s: 1,
            acquire: now_s.clone(),
            renew: now_s,
            ..seen.record
        };
        let body = self.lease_body(&record, Some(&seen.rv));
        if let Ok(v) = self.call(Method::PUT, &self.path(), Some(&body)).await {
            self.wrote(&v);
        }
    }

    /// Who holds the Lease as last seen: (holder, token, ms left by our clock).
    pub fn holder(&self) -> Option<(Option<String>, u64, i64)> {
        let s = self.seen.lock().expect("lease seen");
        let seen = s.as_ref()?;
        let left = Duration::from_secs(seen.record.duration_s)
            .saturating_sub(seen.changed_at.elapsed())
            .as_millis() as i64;
        let holder = (!seen.record.holder.is_empty()).then(|| {
            let h = &seen.record.holder;
            h.rsplit_once('#')
                .map_or(h.clone(), |(id, _)| id.to_string())
        });
        Some((holder, seen.record.transitions, left))
    }

    /// The admin addresses of the replicas listed in the `peers` Service's EndpointSlices.
    async fn peer_addrs(&self, peers: &str) -> Result<Vec<SocketAddr>, String> {
        let sel = format!("kubernetes.io/service-name={peers}");
        let path = format!(
            "/apis/discovery.k8s.io/v1/namespaces/{}/endpointslices?labelSelector={}",
            self.namespace,
            crate::kube::encode(&sel)
        );
        let list = self
            .call(Method::GET, &path, None)
            .await
            .map_err(|e| e.to_string())?;
        let mut out = Vec::new();
        for slice in list["items"].as_array().into_iter().flatten() {
            out.extend(peer_addrs_of(slice));
        }
        out.sort();
        out.dedup();
        Ok(out)
    }

    /// Pulls every peer's report for `service`; None when the peers cannot be listed now.
    /// Reports are aged by the last successful pull; a peer no longer listed is forgotten
    /// (it left: its clients went elsewhere), one listed but silent ages and then holds.
    pub async fn pull_load(
        &self,
        service: &str,
        me: &str,
        forget: Duration,
    ) -> Option<Vec<LoadReport>> {
        let peers = self.peers.as_deref()?;
        let addrs = match self.peer_addrs(peers).await {
            Ok(a) => a,
            Err(e) => {
                tracing::debug!(service, error = %e, "peer list failed");
                return None;
            }
        };
        let path = format!("/api/cluster/load/{service}");
        let t = self.bound.min(Duration::from_secs(1));
        let fetched = futures_join(addrs.iter().map(|a| fetch_report(*a, path.clone(), t))).await;
        let now = Instant::now();
        let mut pulled = self.pulled.lock().expect("pulled");
        let mut listed = std::collections::HashSet::new();
        for (addr, r) in addrs.iter().zip(fetched) {
            let key = addr.to_string();
            listed.insert(key.clone());
            match r {
                Ok(report) if report.replica != me => {
                    pulled.insert(key, Peer { report, at: now });
                }
                Ok(_) => {
                    pulled.remove(&key);
                }
                Err(e) => tracing::debug!(service, peer = %addr, error = %e, "peer load not read"),
            }
        }
        pulled.retain(|k, p| listed.contains(k) && p.at.elapsed() <= forget);
        // One report per replica: a pod listed under two addresses (a dual-stack Service
        // has a slice per address family) is counted once, at its freshest.
        let mut by_replica: std::collections::HashMap<&str, &Peer> = Default::default();
        for p in pulled.values() {
            let e = by_replica.entry(p.report.replica.as_str()).or_insert(p);
            if p.at > e.at {
                *e = p;
            }
        }
        Some(
            by_replica
                .values()
                .map(|p| LoadReport {
                    age_ms: p.at.elapsed().as_millis() as u64,
                    ..p.report.clone()
                })
                .collect(),
        )
    }
}

/// Runs the futures concurrently, results in order.
async fn futures_join<F>(futs: impl Iterator<Item = F>) -> Vec<F::Output>
where
    F: std::future::Future + Send + 'static,
    F::Output: Send + 'static,
{
    let handles: Vec<_> = futs.map(tokio::spawn).collect();
    let mut out = Vec::with_capacity(handles.len());
    for h in handles {
        out.push(h.await.expect("peer fetch task"));
    }
    out
}

/// The endpoints of one slice of the peers Service, at the port named `admin` (else the only
/// port).
pub fn peer_addrs_of(slice: &Value) -> Vec<SocketAddr> {
    let ports = slice["ports"].as_array().cloned().unwrap_or_default();
    let port = ports
        .iter()
        .find(|p| p["name"] == "admin")
        .or(if ports.len() == 1 {
            ports.first()
        } else {
            None
        })
        .and_then(|p| p["port"].as_u64())
        .and_then(|p| u16::try_from(p).ok());
    let Some(port) = port else {
        return Vec::new();
    };
    slice["endpoints"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|e| e["addresses"][0].as_str()?.parse().ok())
        .map(|ip| SocketAddr::new(ip, port))
        .collect()
}

/// One peer's report: bounded in time and size, and checked (finite, non-negative).
async fn fetch_report(
    addr: SocketAddr,
    path: String,
    limit: Duration,
) -> Result<LoadReport, String> {
    let fut = async move {
        let tcp = tokio::net::TcpStream::connect(addr)
            .await
            .map_err(|e| e.to_string())?;
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp))
            .await
            .map_err(|e| e.to_string())?;
        tokio::spawn(async move {
            let _ = conn.await;
        });
        let req = Request::get(&path)
            .header("host", addr.to_string())
            .header("user-agent", "shoal")
            .body(Empty::<Bytes>::new())
            .map_err(|e| e.to_string())?;
        let resp = sender.send_request(req).await.map_err(|e| e.to_string())?;
        if resp.status() != 200 {
            return Err(format!("HTTP {}", resp.status()));
        }
        let body = Limited::new(resp.into_body(), PEER_BODY_LIMIT)
            .collect()
            .await
            .map_err(|e| e.to_string())?
            .to_bytes();
        parse_report(&body)
    };
    tokio::time::timeout(limit, fut)
        .await
        .unwrap_or_else(|_| Err("no answer in time".into()))
}

pub fn parse_report(body: &[u8]) -> Result<LoadReport, String> {
    let v: Value = serde_json::from_slice(body).map_err(|e| e.to_string())?;
    // Finite, non-negative and plausible: a peer cannot pin the fleet at its maximum with
    // an absurd rate.
    let num = |k: &str| {
        v[k].as_f64()
            .filter(|x| x.is_finite() && (0.0..=1e7).contains(x))
            .ok_or(format!("bad {k}"))
    };
    let replica = v["replica"]
        .as_str()
        .filter(|s| !s.is_empty() && s.len() <= 200)
        .ok_or("bad replica")?
        .to_string();
    let latency: Vec<u64> = v["latency"]
        .as_array()
        .map(|a| a.iter().filter_map(Value::as_u64).collect())
        .unwrap_or_default();
    if latency.len() > 64 {
        return Err("too many latency buckets".into());
    }
    Ok(LoadReport {
        replica,
        rps: num("rps")?,
        in_flight: num("in_flight")?,
        age_ms: 0,
        latency,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(holder: &str, renew: &str) -> Record {
        Record {
            holder: holder.into(),
            duration_s: 3,
            acquire: "a".into(),
            renew: renew.into(),
            transitions: 1,
        }
    }

    #[test]
    fn expiry_runs_from_when_this_replica_saw_the_record_change() {
        let t0 = Instant::now();
        let s = observe(None, rec("a", "r1"), "1".into(), t0);
        assert!(!expired(&s, t0 + Duration::from_millis(2900)));
        // The same record read again later: the lease still runs from t0.
        let s = observe(
            Some(&s),
            rec("a", "r1"),
            "1".into(),
            t0 + Duration::from_secs(2),
        );
        assert!(expired(&s, t0 + Duration::from_secs(3)));
        // A renewal (whatever time it claims) restarts it from when it was seen.
        let s = observe(
            Some(&s),
            rec("a", "r2"),
            "2".into(),
            t0 + Duration::from_secs(4),
        );
        assert!(!expired(&s, t0 + Duration::from_secs(6)));
        assert!(expired(&s, t0 + Duration::from_secs(7)));
        // Released: free at once.
        let s = observe(
            Some(&s),
            rec("", "r3"),
            "3".into(),
            t0 + Duration::from_secs(5),
        );
        assert!(expired(&s, t0 + Duration::from_secs(5)));
    }

    #[test]
    fn fence_decisions() {
        assert_eq!(fence_decision(None, 1), Fence::Claim);
        assert_eq!(fence_decision(Some(1), 2), Fence::Claim);
        assert_eq!(fence_decision(Some(2), 2), Fence::Write);
        assert_eq!(fence_decision(Some(3), 2), Fence::Fenced(3));
        let d = json!({"metadata": {"annotations": {FENCE_ANNOTATION: "7"}}});
        assert_eq!(fence_of(&d), Some(7));
        assert_eq!(fence_of(&json!({})), None);
    }

    #[test]
    fn micro_time_is_utc_with_microseconds() {
        let t = UNIX_EPOCH + Duration::from_micros(1_796_685_380_123_456);
        assert_eq!(micro_time(t), "2026-12-07T23:16:20.123456Z");
        assert_eq!(
            crate::kube::parse_rfc3339(&micro_time(t)),
            Some(UNIX_EPOCH + Duration::from_secs(1_796_685_380))
        );
    }

    #[test]
    fn peer_ports_and_reports_are_checked() {
        let s = json!({"ports": [{"name": "http", "port": 80}, {"name": "admin", "port": 9901}],
                       "endpoints": [{"addresses": ["10.0.0.1"]}, {"addresses": ["bad"]}]});
        assert_eq!(peer_addrs_of(&s), vec!["10.0.0.1:9901".parse().unwrap()]);
        let s = json!({"ports": [{"port": 9000}], "endpoints": [{"addresses": ["10.0.0.2"]}]});
        assert_eq!(peer_addrs_of(&s), vec!["10.0.0.2:9000".parse().unwrap()]);
        let s = json!({"ports": [{"port": 1}, {"port": 2}], "endpoints": [{"addresses": ["10.0.0.2"]}]});
        assert!(peer_addrs_of(&s).is_empty());
        let r =
            parse_report(br#"{"replica":"b","rps":3.5,"in_flight":1,"latency":[1,2]}"#).unwrap();
        assert_eq!((r.replica.as_str(), r.rps, r.latency.len()), ("b", 3.5, 2));
        assert!(parse_report(br#"{"replica":"b","rps":-1,"in_flight":1}"#).is_err());
        assert!(parse_report(br#"{"rps":1,"in_flight":1}"#).is_err());
    }
}
