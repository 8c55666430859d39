//! Per-instance CPU quota and memory limit through cgroups, v2 (`cpu.max`, `memory.max`) or
//! v1 (`cpu.cfs_quota_us`, `memory.limit_in_bytes`), where the tree is writable; elsewhere a
//! warning at start and a visible "not enforced" state.
//!
//! Layout: v2 `/sys/fs/cgroup/shoal/RUN/SERVICE/ID` (controllers enabled from the root down,
//! since a non-root cgroup holding processes cannot delegate them); v1, per controller,
//! `MOUNT/OWN/shoal/RUN/SERVICE/ID` where OWN is shoal's own cgroup of that controller, so
//! instances stay inside whatever limits shoal itself runs under. RUN is unique per shoal
//! process, so a run never reuses the cgroups (and their OOM counters) of another.

use std::path::{Path, PathBuf};
use std::sync::Mutex;

/// Per-instance size in force.
#[derive(Debug, Clone, Copy, PartialEq, Default, serde::Serialize)]
pub struct Size {
    pub cpu: Option<f64>,
    pub memory_bytes: Option<u64>,
}

const CPU_PERIOD_US: u64 = 100_000;

#[derive(Debug, Clone)]
enum Layout {
    V2(PathBuf),
    V1 { cpu: PathBuf, memory: PathBuf },
}

/// The cgroup parent of one service's instances, or why limits are not enforced.
#[derive(Debug)]
pub struct Cgroups {
    base: Result<Layout, String>,
    size: Mutex<Size>,
}

/// One instance's cgroup directories (one on v2, one per controller on v1).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct InstanceCgroup {
    pub v2: bool,
    pub dirs: Vec<PathBuf>,
}

/// This process's cgroup path for a v1 controller (or the v2 one with `ctl` = "").
fn own_cgroup(ctl: &str) -> Option<String> {
    let text = std::fs::read_to_string("/proc/self/cgroup").ok()?;
    text.lines().find_map(|l| {
        let mut parts = l.splitn(3, ':');
        let (_, ctls, path) = (parts.next()?, parts.next()?, parts.next()?);
        let hit = if ctl.is_empty() {
            ctls.is_empty()
        } else {
            ctls.split(',').any(|c| c == ctl)
        };
        hit.then(|| path.to_string())
    })
}

/// Where a v1 controller is mounted, from /proc/self/mounts.
fn v1_mount(ctl: &str) -> Option<PathBuf> {
    let text = std::fs::read_to_string("/proc/self/mounts").ok()?;
    text.lines().find_map(|l| {
        let f: Vec<&str> = l.split_whitespace().collect();
        (f.len() >= 4 && f[2] == "cgroup" && f[3].split(',').any(|o| o == ctl))
            .then(|| PathBuf::from(f[1]))
    })
}

/// A unique token for this shoal process: pid and start time (pids are reused, the pair is not).
pub fn run_token() -> String {
    let pid = std::process::id();
    let start = crate::usage::start_ticks(pid).unwrap_or(0);
    format!("{pid}-{start}")
}

fn write(path: &Path, value: &str) -> Result<(), String> {
    std::fs::write(path, value)
        .map_err(|e| format!("cannot write {value:?} to {}: {e}", path.display()))
}

impl Cgroups {
    /// Prepares the service's parent cgroup with the cpu and memory controllers, applying
    /// `size` to instances started from now on.
    pub fn setup(service: &str, size: Size) -> Cgroups {
        if size.cpu.is_none() && size.memory_bytes.is_none() {
            return Cgroups {
                base: Err("no limits configured".into()),
                size: Mutex::new(size),
            };
        }
        let base = Self::prepare(service);
        match &base {
            Err(e) => tracing::warn!(service, reason = %e, "resource limits NOT enforced"),
            Ok(l) => {
                tracing::info!(service, layout = ?l, "resource limits enforced through cgroups")
            }
        }
        Cgroups {
            base,
            size: Mutex::new(size),
        }
    }

    fn prepare(service: &str) -> Result<Layout, String> {
        let run = run_token();
        let root = PathBuf::from("/sys/fs/cgroup");
        if let Ok(controllers) = std::fs::read_to_string(root.join("cgroup.controllers")) {
            for c in ["cpu", "memory"] {
                if !controllers.split_whitespace().any(|x| x == c) {
                    return Err(format!("the cgroup v2 {c} controller is not available"));
                }
            }
            let shoal = root.join("shoal");
            let run_dir = shoal.join(&run);
            let svc = run_dir.join(service);
            std::fs::create_dir_all(&svc)
                .map_err(|e| format!("cannot create {}: {e}", svc.display()))?;
            for dir in [&root, &shoal, &run_dir, &svc] {
                write(&dir.join("cgroup.subtree_control"), "+cpu +memory")?;
            }
            return Ok(Layout::V2(svc));
        }
        let mut dirs = Vec::new();
        for ctl in ["cpu", "memory"] {
            let mount = v1_mount(ctl)
                .ok_or_else(|| format!("neither cgroup v2 nor a v1 {ctl} controller is mounted"))?;
            let own = own_cgroup(ctl).unwrap_or_else(|| "/".into());
            let dir = mount
                .join(own.trim_start_matches('/'))
                .join("shoal")
                .join(&run)
                .join(service);
            std::fs::create_dir_all(&dir)
                .map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
            // Probe that limits can be written here (a read-only or foreign tree fails now,
            // visibly, rather than at each start).
            let probe = if ctl == "cpu" {
                "cpu.cfs_quota_us"
            } else {
                "memory.limit_in_bytes"
            };
            let current = std::fs::read_to_string(dir.join(probe))
                .map_err(|e| format!("cannot read {}: {e}", dir.join(probe).display()))?;
            write(&dir.join(probe), current.trim())?;
            dirs.push(dir);
        }
        let memory = dirs.pop().expect("two dirs");
        let cpu = dirs.pop().expect("two dirs");
        Ok(Layout::V1 { cpu, memory })
    }

    pub fn enforced(&self) -> bool {
        self.base.is_ok()
    }

    /// The size new instances get (and live ones have, once a resize is applied).
    pub fn size(&self) -> Size {
        *self.size.lock().expect("size lock")
    }

    /// `{ cpu, memory_bytes, enforced, reason, cgroup }` for the API.
    pub fn describe(&self) -> serde_json::Value {
        let size = self.size();
        serde_json::json!({
            "cpu": size.cpu,
            "memory_bytes": size.memory_bytes,
            "enforced": self.enforced(),
            "reason": self.base.as_ref().err(),
            "cgroup": match &self.base {
                Ok(Layout::V2(_)) => Some("v2"),
                Ok(Layout::V1 { .. }) => Some("v1"),
                Err(_) => None,
            },
        })
    }

    /// Creates the instance's cgroup with the current size; the instance joins it before
    /// it runs its command (see `supervise::exec_in_cgroups`). None where not enforced.
    pub fn create(&self, id: &str) -> Option<Result<InstanceCgroup, String>> {
        let base = self.base.as_ref().ok()?;
        let cg = match base {
            Layout::V2(svc) => InstanceCgroup {
                v2: true,
                dirs: vec![svc.join(id)],
            },
            Layout::V1 { cpu, memory } => InstanceCgroup {
                v2: false,
                dirs: vec![cpu.join(id), memory.join(id)],
            },
        };
        let r = (|| {
            for d in &cg.dirs {
                std::fs::create_dir_all(d)
                    .map_err(|e| format!("cannot create {}: {e}", d.display()))?;
            }
            cg.apply(self.size())
        })();
        Some(r.map(|_| cg))
    }

    /// The run-level directories (parents of the service's), removed when the run ends.
    pub fn run_dirs(&self) -> Vec<PathBuf> {
        let svc = match &self.base {
            Ok(Layout::V2(svc)) => vec![svc.clone()],
            Ok(Layout::V1 { cpu, memory }) => vec![cpu.clone(), memory.clone()],
            Err(_) => Vec::new(),
        };
        svc.iter()
            .filter_map(|d| d.parent().map(Path::to_path_buf))
            .collect()
    }

    /// Sets the size for new instances.
    pub fn set_size(&self, size: Size) {
        *self.size.lock().expect("size lock") = size;
    }
}

impl InstanceCgroup {
    fn cpu_dir(&self) -> &Path {
        &self.dirs[0]
    }
    fn memory_dir(&self) -> &Path {
        self.dirs.last().expect("a dir")
    }

    /// Writes the limits of `size` (None: unlimited) on the live cgroup.
    pub fn apply(&self, size: Size) -> Result<(), String> {
        self.set_cpu(size.cpu)?;
        self.set_memory(size.memory_bytes)
    }

    pub fn set_cpu(&self, cores: Option<f64>) -> Result<(), String> {
        let quota = cores.map(|c| ((c * CPU_PERIOD_US as f64).round() as u64).max(1000));
        if self.v2 {
            let q = quota.map_or("max".to_string(), |q| q.to_string());
            write(
                &self.cpu_dir().join("cpu.max"),
                &format!("{q} {CPU_PERIOD_US}"),
            )
        } else {
            write(
                &self.cpu_dir().join("cpu.cfs_period_us"),
                &CPU_PERIOD_US.to_string(),
            )?;
            let q = quota.map_or("-1".to_string(), |q| q.to_string());
            write(&self.cpu_dir().join("cpu.cfs_quota_us"), &q)
        }
    }

    pub fn set_memory(&self, bytes: Option<u64>) -> Result<(), String> {
        let (file, unlimited) = if self.v2 {
            ("memory.max", "max")
        } else {
            ("memory.limit_in_bytes", "-1")
        };
        let v = bytes.map_or(unlimited.to_string(), |b| b.to_string());
        // v1 with swap accounting: memory+swap must be limited too, or the instance swaps
        // past its limit; it may never be below the memory limit, so the order depends on
        // the direction (the failing order is simply retried the other way).
        let memsw = self.memory_dir().join("memory.memsw.limit_in_bytes");
        if !self.v2 && memsw.exists() {
            if write(&memsw, &v).is_ok() {
                return write(&self.memory_dir().join(file), &v);
            }
            write(&self.memory_dir().join(file), &v)?;
            return write(&memsw, &v);
        }
        write(&self.memory_dir().join(file), &v)?;
        if self.v2 {
            // No swap: a limit the instance can swap past is not a limit (best effort; the
            // file is absent without swap accounting).
            let _ = std::fs::write(self.memory_dir().join("memory.swap.max"), "0");
        }
        Ok(())
    }

    /// The limits the kernel holds now: (CPU cores, memory bytes); None = unlimited.
    pub fn limits(&self) -> (Option<f64>, Option<u64>) {
        let read = |p: PathBuf| std::fs::read_to_string(p).ok();
        if self.v2 {
            let cpu = read(self.cpu_dir().join("cpu.max")).and_then(|s| {
                let mut w = s.split_whitespace();
                let q: f64 = w.next()?.parse().ok()?;
                let p: f64 = w.next()?.parse().ok()?;
                Some(q / p)
            });
            let mem =
                read(self.memory_dir().join("memory.max")).and_then(|s| s.trim().parse().ok());
            (cpu, mem)
        } else {
            let q: Option<i64> =
                read(self.cpu_dir().join("cpu.cfs_quota_us")).and_then(|s| s.trim().parse().ok());
            let p: Option<i64> =
                read(self.cpu_dir().join("cpu.cfs_period_us")).and_then(|s| s.trim().parse().ok());
            let cpu = match (q, p) {
                (Some(q), Some(p)) if q > 0 && p > 0 => Some(q as f64 / p as f64),
                _ => None,
            };
            // v1 reports "unlimited" as a huge page-rounded number.
            let mem = read(self.memory_dir().join("memory.limit_in_bytes"))
                .and_then(|s| s.trim().parse::<u64>().ok())
                .filter(|&m| m < (1 << 62));
            (cpu, mem)
        }
    }

    /// Working-set memory (usage minus inactive file cache, as the kubelet counts it).
    pub fn memory_working_set(&self) -> Option<u64> {
        let dir = self.memory_dir();
        let (usage_file, inactive_key) = if self.v2 {
            ("memory.current", "inactive_file")
        } else {
            ("memory.usage_in_bytes", "total_inactive_file")
        };
        let usage: u64 = std::fs::read_to_string(dir.join(usage_file))
            .ok()?
            .trim()
            .parse()
            .ok()?;
        let inactive = std::fs::read_to_string(dir.join("memory.stat"))
            .ok()
            .and_then(|s| stat_value(&s, inactive_key))
            .unwrap_or(0);
        Some(usage.saturating_sub(inactive))
    }

    /// OOM kills inside this cgroup so far (v2 `memory.events`, v1 `memory.oom_control`;
    /// on v1 kernels without the `oom_kill` field, a non-zero `memory.failcnt` with the
    /// caller's SIGKILL exit stands in, see `process.rs`).
    pub fn oom_kills(&self) -> OomCounters {
        let dir = self.memory_dir();
        let file = if self.v2 {
            "memory.events"
        } else {
            "memory.oom_control"
        };
        let kills = std::fs::read_to_string(dir.join(file))
            .ok()
            .and_then(|s| stat_value(&s, "oom_kill"));
        let failcnt = if self.v2 {
            None
        } else {
            std::fs::read_to_string(dir.join("memory.failcnt"))
                .ok()
                .and_then(|s| s.trim().parse().ok())
        };
        OomCounters { kills, failcnt }
    }

    /// Processes in the cgroup now.
    pub fn pids(&self) -> Vec<u32> {
        let mut out: Vec<u32> = Vec::new();
        for d in &self.dirs {
            if let Ok(s) = std::fs::read_to_string(d.join("cgroup.procs")) {
                out.extend(s.lines().filter_map(|l| l.trim().parse::<u32>().ok()));
            }
        }
        out.sort_unstable();
        out.dedup();
        out
    }

    /// SIGKILLs everything in the cgroup (`cgroup.kill` on v2 where present).
    pub fn kill_all(&self) {
        if self.v2 && std::fs::write(self.dirs[0].join("cgroup.kill"), "1").is_ok() {
            return;
        }
        for pid in self.pids() {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid as i32),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
    }

    /// Removes the cgroup directories (only empty cgroups can go; failures are ignored as
    /// a leftover is removed by the next run's sweep).
    pub fn remove(&self) {
        for d in &self.dirs {
            let _ = std::fs::remove_dir(d);
        }
    }

    /// The `cgroup.procs` files a new instance writes itself into.
    pub fn procs_files(&self) -> Vec<PathBuf> {
        self.dirs.iter().map(|d| d.join("cgroup.procs")).collect()
    }
}

/// OOM evidence read from a memory cgroup.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct OomCounters {
    pub kills: Option<u64>,
    pub failcnt: Option<u64>,
}

fn stat_value(text: &str, key: &str) -> Option<u64> {
    text.lines().find_map(|l| {
        let (k, v) = l.split_once(' ')?;
        (k == key).then(|| v.trim().parse().ok()).flatten()
    })
}

/// Removes a run's emptied cgroup tree bottom-up (instances first, then service and run).
pub fn remove_tree(dir: &Path) {
    if let Ok(rd) = std::fs::read_dir(dir) {
        for e in rd.flatten() {
            if e.file_type().is_ok_and(|t| t.is_dir()) {
                remove_tree(&e.path());
            }
        }
    }
    let _ = std::fs::remove_dir(dir);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_values() {
        let events = "low 0\nhigh 0\nmax 12\noom 3\noom_kill 2\n";
        assert_eq!(stat_value(events, "oom_kill"), Some(2));
        assert_eq!(stat_value(events, "oom"), Some(3));
        assert_eq!(
            stat_value("oom_kill_disable 0\nunder_oom 0\n", "oom_kill"),
            None
        );
    }

    #[test]
    fn run_token_is_this_process() {
        let t = run_token();
        assert!(t.starts_with(&format!("{}-", std::process::id())), "{t}");
    }
}
