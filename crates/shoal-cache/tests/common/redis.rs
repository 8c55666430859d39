//! A private `redis-server` for tests: started on a free port in a temp dir (`--save ""
//! --appendonly no`), killed (SIGKILL) and removed on drop. Shared by the cache crate's tests
//! and the binary's (`#[path]`-included there).
#![allow(dead_code)]

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub struct RedisServer {
    child: Option<Child>,
    pub port: u16,
    dir: PathBuf,
}

include!("../../../shoal-queue/tests/common/free_port.rs");

impl RedisServer {
    pub fn start() -> Self {
        let dir = std::env::temp_dir().join(format!(
            "shoal-cache-redis-{}-{}",
            std::process::id(),
            free_port()
        ));
        std::fs::create_dir_all(&dir).unwrap();
        let mut s = RedisServer {
            child: None,
            port: free_port(),
            dir,
        };
        s.spawn();
        s
    }

    pub fn spawn(&mut self) {
        let child = Command::new("redis-server")
            .args(["--port", &self.port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no", "--daemonize", "no"])
            .arg("--dir")
            .arg(&self.dir)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server not found: scripts/test.sh installs it (apt-get install redis-server)");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(10);
        while redis_cmd(self.port, &["PING"]).as_deref() != Some("+PONG") {
            assert!(Instant::now() < deadline, "redis-server did not start");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill(); // SIGKILL
            let _ = c.wait();
        }
    }

    /// SIGSTOP / SIGCONT: a Redis that accepts connections but does not answer.
    pub fn pause(&self, stop: bool) {
        let pid = self.child.as_ref().unwrap().id().to_string();
        let sig = if stop { "-STOP" } else { "-CONT" };
        assert!(Command::new("kill")
            .args([sig, &pid])
            .status()
            .unwrap()
            .success());
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/", self.port)
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.kill();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// One inline command over a plain socket; the first reply line (test-side checks only).
pub fn redis_cmd(port: u16, args: &[&str]) -> Option<String> {
    use std::io::BufRead;
    let mut line = String::new();
    send(port, args)?.read_line(&mut line).ok()?;
    Some(line.trim_end().to_string())
}

fn send(port: u16, args: &[&str]) -> Option<std::io::BufReader<std::net::TcpStream>> {
    use std::io::Write;
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
    let mut cmd = format!("*{}\r\n", args.len());
    for a in args {
        cmd.push_str(&format!("${}\r\n{}\r\n", a.len(), a));
    }
    s.write_all(cmd.as_bytes()).ok()?;
    Some(std::io::BufReader::new(s))
}

pub fn exists(port: u16, url: &str) -> bool {
    redis_cmd(port, &["EXISTS", &format!("shoal:cache:{{}}{url}")]).as_deref() == Some(":1")
}

/// A private Redis Cluster: three masters with a replica each (`--cluster-node-timeout 1000`,
/// so a killed master fails over in a few seconds), every node on free loopback ports whose
/// bus port (+10000) is free too, in one temp dir; all killed on drop.
pub struct RedisCluster {
    pub ports: Vec<u16>,
    nodes: Vec<Option<Child>>,
    dir: PathBuf,
}

impl RedisCluster {
    pub fn start() -> Self {
        let mut ports = Vec::new();
        while ports.len() < 6 {
            let p = free_port();
            // The bus port must be free and below the ephemeral range as well.
            if p < 22000 && std::net::TcpListener::bind(("127.0.0.1", p + 10000)).is_ok() {
                ports.push(p);
            }
        }
        let dir = std::env::temp_dir().join(format!(
            "shoal-redis-cluster-{}-{}",
            std::process::id(),
            ports[0]
        ));
        let mut c = RedisCluster {
            ports: ports.clone(),
            nodes: Vec::new(),
            dir,
        };
        for &p in &ports {
            let d = c.dir.join(p.to_string());
            std::fs::create_dir_all(&d).unwrap();
            let child = Command::new("redis-server")
                .args(["--port", &p.to_string(), "--bind", "127.0.0.1"])
                .args(["--save", "", "--appendonly", "no", "--daemonize", "no"])
                .args(["--cluster-enabled", "yes", "--cluster-node-timeout", "1000"])
                .args(["--cluster-config-file", "nodes.conf"])
                // A replica syncs at once (not after the default 5 s wait for others) and may
                // take over however old its data, so a failover never stalls in a test.
                .args(["--repl-diskless-sync-delay", "0"])
                .args(["--cluster-replica-validity-factor", "0"])
                .arg("--dir")
                .arg(&d)
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .expect("redis-server not found: scripts/test.sh installs it");
            c.nodes.push(Some(child));
        }
        for &p in &ports {
            let deadline = Instant::now() + Duration::from_secs(10);
            while redis_cmd(p, &["PING"]).as_deref() != Some("+PONG") {
                assert!(Instant::now() < deadline, "redis-server {p} did not start");
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        let addrs: Vec<String> = ports.iter().map(|p| format!("127.0.0.1:{p}")).collect();
        let out = Command::new("redis-cli")
            .args(["--cluster", "create"])
            .args(&addrs)
            .args(["--cluster-replicas", "1", "--cluster-yes"])
            .output()
            .expect("redis-cli not found");
        assert!(
            out.status.success(),
            "redis-cli --cluster create: {}",
            String::from_utf8_lossy(&out.stdout)
        );
        c.wait_ok(Duration::from_secs(30));
        c
    }

    /// Seed URLs, comma-separated (what shoal takes as "a cluster").
    pub fn url(&self) -> String {
        self.ports[..3]
            .iter()
            .map(|p| format!("redis://127.0.0.1:{p}/"))
            .collect::<Vec<_>>()
            .join(",")
    }

    /// Waits until every live node reports `cluster_state:ok` and sees three masters, and
    /// every live replica's link to its master is up.
    pub fn wait_ok(&self, limit: Duration) {
        let deadline = Instant::now() + limit;
        loop {
            let ok = self.live_ports().iter().all(|&p| {
                let info = redis_bulk(p, &["CLUSTER", "INFO"]).unwrap_or_default();
                let repl = redis_bulk(p, &["INFO", "replication"]).unwrap_or_default();
                info.contains("cluster_state:ok")
                    && info.contains("cluster_size:3")
                    && (repl.contains("role:master") || repl.contains("master_link_status:up"))
            });
            if ok {
                return;
            }
            assert!(Instant::now() < deadline, "the cluster did not settle");
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    fn live_ports(&self) -> Vec<u16> {
        self.ports
            .iter()
            .zip(&self.nodes)
            .filter(|(_, n)| n.is_some())
            .map(|(p, _)| *p)
            .collect()
    }

    /// The port of the master that serves `key` now.
    pub fn master_of(&self, key: &str) -> u16 {
        let p = self.live_ports()[0];
        let reply = redis_cmd(p, &["GET", key]).unwrap();
        match reply.strip_prefix("-MOVED ") {
            Some(rest) => rest.rsplit(':').next().unwrap().parse().unwrap(),
            None => p,
        }
    }

    /// SIGKILLs the node on `port`.
    pub fn kill(&mut self, port: u16) {
        let i = self.ports.iter().position(|&p| p == port).unwrap();
        if let Some(mut c) = self.nodes[i].take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// `EXISTS key`, following a `MOVED` redirection.
    pub fn exists(&self, key: &str) -> bool {
        for p in self.live_ports() {
            match redis_cmd(p, &["EXISTS", key]).as_deref() {
                Some(":1") => return true,
                Some(":0") => return false,
                _ => continue,
            }
        }
        false
    }
}

impl Drop for RedisCluster {
    fn drop(&mut self) {
        for n in self.nodes.iter_mut() {
            if let Some(mut c) = n.take() {
                let _ = c.kill();
                let _ = c.wait();
            }
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// One command whose reply is a bulk string (e.g. `CLUSTER INFO`), read whole.
pub fn redis_bulk(port: u16, args: &[&str]) -> Option<String> {
    use std::io::{BufRead, Read};
    let mut r = send(port, args)?;
    let mut line = String::new();
    r.read_line(&mut line).ok()?;
    let n: usize = line.trim_end().strip_prefix('$')?.parse().ok()?;
    let mut body = vec![0; n];
    r.read_exact(&mut body).ok()?;
    String::from_utf8(body).ok()
}
