//! Vertical limits through cgroup v2 (`cpu.max`, `memory.max`) where the tree is writable;
//! elsewhere a warning at start and a visible "not enforced" state.

use std::path::PathBuf;

use crate::config::Resources;

/// The cgroup parent of one service's instances, or why limits are not enforced.
#[derive(Debug)]
pub struct Cgroups {
    resources: Resources,
    base: Result<PathBuf, String>,
}

const ROOT: &str = "/sys/fs/cgroup";

impl Cgroups {
    /// Prepares `/sys/fs/cgroup/shoal/SERVICE` with the cpu and memory controllers enabled.
    pub fn setup(service: &str, resources: Resources) -> Cgroups {
        if resources.cpu.is_none() && resources.memory_bytes.is_none() {
            return Cgroups {
                resources,
                base: Err("no limits configured".into()),
            };
        }
        let base = Self::prepare(service);
        if let Err(e) = &base {
            tracing::warn!(service, reason = %e, "resource limits NOT enforced");
        }
        Cgroups { resources, base }
    }

    fn prepare(service: &str) -> Result<PathBuf, String> {
        let root = PathBuf::from(ROOT);
        let controllers = std::fs::read_to_string(root.join("cgroup.controllers"))
            .map_err(|_| format!("cgroup v2 is not mounted at {ROOT}"))?;
        for c in ["cpu", "memory"] {
            if !controllers.split_whitespace().any(|x| x == c) {
                return Err(format!("the {c} controller is not available"));
            }
        }
        let shoal = root.join("shoal");
        let svc = shoal.join(service);
        std::fs::create_dir_all(&svc)
            .map_err(|e| format!("cannot create {}: {e}", svc.display()))?;
        for dir in [&root, &shoal, &svc] {
            std::fs::write(dir.join("cgroup.subtree_control"), "+cpu +memory")
                .map_err(|e| format!("cannot enable controllers in {}: {e}", dir.display()))?;
        }
        Ok(svc)
    }

    pub fn enforced(&self) -> bool {
        self.base.is_ok()
    }

    /// `{ cpu, memory_bytes, enforced, reason }` for the API.
    pub fn describe(&self) -> serde_json::Value {
        serde_json::json!({
            "cpu": self.resources.cpu,
            "memory_bytes": self.resources.memory_bytes,
            "enforced": self.enforced(),
            "reason": self.base.as_ref().err(),
        })
    }

    /// Moves `pid` into its own limited cgroup. Failures are logged, never fatal.
    pub fn attach(&self, id: &str, pid: u32) {
        let Ok(base) = &self.base else { return };
        let dir = base.join(id);
        let r = (|| -> std::io::Result<()> {
            std::fs::create_dir_all(&dir)?;
            if let Some(cpu) = self.resources.cpu {
                let period = 100_000u64;
                std::fs::write(
                    dir.join("cpu.max"),
                    format!("{} {period}", (cpu * period as f64).round() as u64),
                )?;
            }
            if let Some(m) = self.resources.memory_bytes {
                std::fs::write(dir.join("memory.max"), m.to_string())?;
            }
            std::fs::write(dir.join("cgroup.procs"), pid.to_string())
        })();
        if let Err(e) = r {
            tracing::warn!(instance = id, error = %e, "cannot apply resource limits");
        }
    }

    pub fn release(&self, id: &str) {
        if let Ok(base) = &self.base {
            let _ = std::fs::remove_dir(base.join(id));
        }
    }
}
