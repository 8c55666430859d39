//! Per-instance CPU and memory from `/proc`, summed over the instance's process tree (an
//! `sh -c` wrapper, gunicorn or node-cluster workers all count).

use std::sync::OnceLock;

/// Cumulative CPU time and current resident memory of one process.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Usage {
    pub cpu_seconds: f64,
    pub memory_bytes: u64,
}

fn ticks_per_sec() -> f64 {
    static T: OnceLock<f64> = OnceLock::new();
    *T.get_or_init(|| {
        nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK)
            .ok()
            .flatten()
            .map_or(100.0, |t| t as f64)
    })
}

fn page_size() -> u64 {
    static P: OnceLock<u64> = OnceLock::new();
    *P.get_or_init(|| {
        nix::unistd::sysconf(nix::unistd::SysconfVar::PAGE_SIZE)
            .ok()
            .flatten()
            .map_or(4096, |p| p as u64)
    })
}

/// Reads the usage of `pid` alone (not its children); None if it is gone.
pub fn read_usage(pid: u32) -> Option<Usage> {
    let st = parse_stat(&std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?)?;
    Some(Usage {
        cpu_seconds: st.ticks as f64 / ticks_per_sec(),
        memory_bytes: st.rss_pages * page_size(),
    })
}

/// One line of `/proc/PID/stat`, the fields shoal uses.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Stat {
    pub ppid: u32,
    pub pgid: u32,
    /// utime + stime + cutime + cstime, clock ticks: its own CPU and that of the children it
    /// reaped, so a tree's total does not drop when a worker exits.
    pub ticks: u64,
    /// Start time, clock ticks since boot (with the pid, identifies a process).
    pub start: u64,
    pub rss_pages: u64,
}

/// Parses `/proc/PID/stat`.
pub fn parse_stat(stat: &str) -> Option<Stat> {
    // The command name (field 2) may contain spaces and parentheses: split after the last ')'.
    let rest = &stat[stat.rfind(')')? + 1..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    // f[0] is field 3 (state): field N is f[N - 3].
    let n = |i: usize| -> Option<u64> { f.get(i - 3)?.parse().ok() };
    let ticks = n(14)? + n(15)? + n(16).unwrap_or(0) + n(17).unwrap_or(0);
    Some(Stat {
        ppid: n(4)? as u32,
        pgid: n(5)? as u32,
        ticks,
        start: n(22)?,
        rss_pages: n(24)?,
    })
}

/// Start time of `pid` in clock ticks since boot.
pub fn start_ticks(pid: u32) -> Option<u64> {
    parse_stat(&std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?).map(|s| s.start)
}

/// Every process on the machine (one pass over `/proc`).
#[derive(Debug, Default)]
pub struct ProcTable {
    pub procs: std::collections::HashMap<u32, Stat>,
}

impl ProcTable {
    pub fn scan() -> ProcTable {
        let mut procs = std::collections::HashMap::new();
        if let Ok(rd) = std::fs::read_dir("/proc") {
            for e in rd.flatten() {
                let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
                    continue;
                };
                if let Some(st) = std::fs::read_to_string(e.path().join("stat"))
                    .ok()
                    .and_then(|s| parse_stat(&s))
                {
                    procs.insert(pid, st);
                }
            }
        }
        ProcTable { procs }
    }

    /// `root` and all its descendants.
    pub fn tree(&self, root: u32) -> Vec<u32> {
        let mut children: std::collections::HashMap<u32, Vec<u32>> = Default::default();
        for (&pid, st) in &self.procs {
            children.entry(st.ppid).or_default().push(pid);
        }
        let mut out = Vec::new();
        let mut stack = vec![root];
        while let Some(p) = stack.pop() {
            if !self.procs.contains_key(&p) || out.contains(&p) {
                continue;
            }
            out.push(p);
            if let Some(c) = children.get(&p) {
                stack.extend(c);
            }
        }
        out
    }

    /// Members of process group `pgid`.
    pub fn group(&self, pgid: u32) -> Vec<u32> {
        self.procs
            .iter()
            .filter(|(_, s)| s.pgid == pgid)
            .map(|(&p, _)| p)
            .collect()
    }

    /// CPU and resident memory summed over the process tree under `root` and its process
    /// group (a daemonizing child that was re-parented still counts while in the group).
    pub fn usage(&self, root: u32) -> Option<Usage> {
        let root_stat = self.procs.get(&root)?;
        let mut pids = self.tree(root);
        for p in self.group(root_stat.pgid) {
            if root_stat.pgid == root && !pids.contains(&p) {
                pids.push(p);
            }
        }
        let (mut ticks, mut pages) = (0u64, 0u64);
        for p in pids {
            if let Some(s) = self.procs.get(&p) {
                ticks += s.ticks;
                pages += s.rss_pages;
            }
        }
        Some(Usage {
            cpu_seconds: ticks as f64 / ticks_per_sec(),
            memory_bytes: pages * page_size(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_stat_with_odd_command_names() {
        let stat = "1234 (my (odd) cmd) S 1 1234 1234 0 -1 4194560 100 0 0 0 250 50 7 3 20 0 1 0 100 1000 300 18446744073709551615";
        let s = parse_stat(stat).unwrap();
        assert_eq!(
            (s.ppid, s.pgid, s.ticks, s.start, s.rss_pages),
            (1, 1234, 310, 100, 300)
        );
    }

    #[test]
    fn reads_this_process() {
        let u = read_usage(std::process::id()).unwrap();
        assert!(u.memory_bytes > 0);
    }

    /// A shell that starts a CPU-burning child: the tree's usage includes the child's.
    #[test]
    fn tree_usage_counts_children() {
        let mut sh = std::process::Command::new("sh")
            .args([
                "-c",
                "sh -c 'i=0; while [ $i -lt 300000 ]; do i=$((i+1)); done; sleep 30' & wait",
            ])
            .spawn()
            .unwrap();
        let root = sh.id();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
        let mut seen = (0.0, 0.0, 0);
        while std::time::Instant::now() < deadline {
            let t = ProcTable::scan();
            let own = read_usage(root).unwrap().cpu_seconds;
            let tree = t.usage(root).unwrap();
            seen = (own, tree.cpu_seconds, t.tree(root).len());
            if seen.2 >= 2 && tree.cpu_seconds > own + 0.05 {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
        for p in ProcTable::scan().tree(root) {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(p as i32),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
        let _ = sh.wait();
        assert!(
            seen.2 >= 2 && seen.1 > seen.0 + 0.05,
            "own, tree cpu, tree size: {seen:?}"
        );
    }
}
