//! Real brokers and worker processes for the integration tests: each started on free
//! loopback ports in a temp dir as its own process group, and stopped (group included) when
//! dropped.
#![allow(dead_code)]

mod brokers;
pub use brokers::*;

use std::net::SocketAddr;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::Full;
use shoal_queue::dispatch::{Dispatcher, DispatcherConfig, WorkerSet};
use shoal_queue::job::JobRecord;
use shoal_queue::{Broker, QueueMetrics, RedbStore, Store, Submitter};

/// An HTTP worker process (python3): answers any request with JSON naming the job and
/// echoing the body, after `sleep_ms`; `fail=1` answers 500. Every execution is appended to
/// `log` (job id per line) as it starts, so duplicate executions can be counted.
pub struct Worker {
    pub id: String,
    pub addr: SocketAddr,
    pub proc: Proc,
}

const WORKER_PY: &str = r#"
import sys, json, time, os
from http.server import ThreadingHTTPServer, BaseHTTPRequestHandler
from urllib.parse import urlparse, parse_qs
port, log = int(sys.argv[1]), sys.argv[2]
class H(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    def log_message(self, *a): pass
    def handle_any(self):
        n = int(self.headers.get("content-length") or 0)
        body = self.rfile.read(n) if n else b""
        u = urlparse(self.path)
        q = parse_qs(u.query)
        if u.path == "/health":
            out, code = b"ok", 200
        else:
            job = self.headers.get("x-shoal-job-id", "")
            with open(log, "a") as f:
                f.write(job + "\n")
            time.sleep(int(q.get("sleep_ms", ["0"])[0]) / 1000.0)
            code = 500 if q.get("fail") else 200
            out = json.dumps({"job": job, "attempt": self.headers.get("x-shoal-attempt"),
                "method": self.command, "path": self.path, "pid": os.getpid(),
                "body": body.decode("utf-8", "replace")}).encode()
        self.send_response(code)
        self.send_header("content-type", "application/json")
        self.send_header("x-worker", str(os.getpid()))
        self.send_header("content-length", str(len(out)))
        self.end_headers()
        self.wfile.write(out)
    do_GET = do_POST = do_PUT = do_DELETE = handle_any
ThreadingHTTPServer.daemon_threads = True
ThreadingHTTPServer(("127.0.0.1", port), H).serve_forever()
"#;

impl Worker {
    pub fn start(id: &str, log: &Path) -> Worker {
        let port = free_port();
        let proc = Proc::spawn(
            "worker",
            Command::new("python3")
                .args(["-c", WORKER_PY, &port.to_string()])
                .arg(log)
                .stdout(Stdio::null()),
        );
        assert!(
            wait_tcp(port, Duration::from_secs(10)),
            "worker did not start"
        );
        Worker {
            id: id.to_string(),
            addr: SocketAddr::from(([127, 0, 0, 1], port)),
            proc,
        }
    }
}

/// Executions per job id in a worker log.
pub fn executions(log: &Path) -> std::collections::HashMap<String, usize> {
    let mut m = std::collections::HashMap::new();
    for l in std::fs::read_to_string(log).unwrap_or_default().lines() {
        if !l.is_empty() {
            *m.entry(l.to_string()).or_insert(0) += 1;
        }
    }
    m
}

/// One shoal-side stack: store, submitter, dispatcher over a broker.
pub struct Stack {
    pub broker: Arc<dyn Broker>,
    pub store: Arc<dyn Store>,
    pub metrics: Arc<QueueMetrics>,
    pub submitter: Arc<Submitter>,
    pub dispatcher: Arc<Dispatcher>,
    pub workers: Arc<WorkerSet>,
    pub run: Option<tokio::task::JoinHandle<()>>,
}

impl Stack {
    pub fn new(
        broker: Arc<dyn Broker>,
        store_path: &Path,
        workers: Arc<WorkerSet>,
        cfg: DispatcherConfig,
    ) -> Stack {
        // RUST_LOG=shoal_queue=debug shows what the stack does.
        let _ = tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
            .with_test_writer()
            .try_init();
        let store: Arc<dyn Store> =
            Arc::new(RedbStore::open(store_path, Duration::from_secs(3600)).unwrap());
        let metrics = QueueMetrics::new();
        let submitter = Arc::new(Submitter::new(
            broker.clone(),
            store.clone(),
            metrics.clone(),
            Default::default(),
        ));
        let dispatcher = Dispatcher::new(
            broker.clone(),
            store.clone(),
            workers.clone(),
            metrics.clone(),
            cfg,
        );
        Stack {
            broker,
            store,
            metrics,
            submitter,
            dispatcher,
            workers,
            run: None,
        }
    }

    pub fn start_dispatcher(&mut self) {
        self.run = Some(tokio::spawn(self.dispatcher.clone().run()));
    }

    /// Stops consuming (running jobs finish) and closes the broker connection.
    pub async fn shutdown(mut self) {
        self.dispatcher.stop();
        if let Some(r) = self.run.take() {
            let _ = tokio::time::timeout(Duration::from_secs(30), r).await;
        }
        self.broker.shutdown().await;
    }

    /// POSTs through the HTTP handler; returns (status, job id from Location).
    pub async fn post(&self, path: &str, body: &str, key: Option<&str>) -> (u16, Option<String>) {
        let mut b = http::Request::builder().method("POST").uri(path);
        if let Some(k) = key {
            // A key is scoped by the client's credentials, which it then needs.
            b = b
                .header("idempotency-key", k)
                .header("authorization", "Bearer test-client");
        }
        let req = b
            .header("content-type", "text/plain")
            .body(Full::new(Bytes::from(body.to_string())))
            .unwrap();
        let resp = self.submitter.handle_submit(req).await;
        let id = resp
            .headers()
            .get("location")
            .map(|l| l.to_str().unwrap().trim_start_matches("/jobs/").to_string());
        (resp.status().as_u16(), id)
    }

    /// Waits for a final record.
    pub async fn wait_final(&self, id: &str, timeout: Duration) -> JobRecord {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(r) = self.store.get(id).await.unwrap() {
                if r.is_final() {
                    return r;
                }
            }
            assert!(Instant::now() < deadline, "job {id} not finished in time");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

pub fn dispatcher_config() -> DispatcherConfig {
    DispatcherConfig {
        concurrency: 16,
        max_attempts: 4,
        retry_backoff: Duration::from_millis(50),
        retry_backoff_max: Duration::from_millis(400),
        attempt_timeout: Duration::from_secs(10),
        ..Default::default()
    }
}
pub mod scenarios;
