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
    use std::io::{BufRead, BufReader, Write};
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
    let mut cmd = format!("*{}\r\n", args.len());
    for a in args {
        cmd.push_str(&format!("${}\r\n{}\r\n", a.len(), a));
    }
    s.write_all(cmd.as_bytes()).ok()?;
    let mut line = String::new();
    BufReader::new(s).read_line(&mut line).ok()?;
    Some(line.trim_end().to_string())
}

pub fn exists(port: u16, url: &str) -> bool {
    redis_cmd(port, &["EXISTS", &format!("shoal:cache:{url}")]).as_deref() == Some(":1")
}
