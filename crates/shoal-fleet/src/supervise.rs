//! Instances never outlive shoal.
//!
//! Design: a watchdog process rather than `PR_SET_PDEATHSIG`. Death signals reach only the
//! direct child (not what an `sh -c` wrapper or a pre-forking server starts), fire when the
//! spawning *thread* exits (a tokio blocking thread idles out after 10 s), and need `unsafe`
//! in a `pre_exec` hook. Instead:
//!
//! - every instance runs in its own process group (and, where enforced, its own cgroup,
//!   which it joins before its command runs: `shoal _exec` writes itself into the cgroup
//!   and then execs the command, keeping the pid);
//! - shoal records its live instances (pid = process group id, start time, cgroup) in
//!   `DATA_DIR/run/instances.json` on every start and stop;
//! - a watchdog (`shoal _watchdog FILE`) in its own process group holds one end of a
//!   socket pair whose other end only shoal has; shoal sends it the record on every change
//!   (so it does not depend on the file surviving). When shoal exits for any reason,
//!   SIGKILL included, the kernel closes the socket; the watchdog reads EOF, kills every
//!   recorded process group and cgroup, removes the run's cgroups and exits;
//! - at start, shoal does the same for whatever a previous run left in the file (a run
//!   whose watchdog was killed too).
//!
//! A pid is only signalled if its start time still matches the record, so a reused pid is
//! never hit.

use std::io::Read;
use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use nix::sys::signal::{killpg, Signal};
use nix::unistd::Pid;
use serde::{Deserialize, Serialize};

use crate::cgroup::InstanceCgroup;
use crate::usage::start_ticks;

/// One live instance as recorded for cleanup.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Record {
    pub service: String,
    pub id: String,
    /// The instance's pid, which is also its process group id.
    pub pid: u32,
    /// Its start time in clock ticks since boot.
    pub start: u64,
    pub cgroup: Option<InstanceCgroup>,
}

/// The run file.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct RunFile {
    pub shoal_pid: u32,
    pub shoal_start: u64,
    /// The run's cgroup directories (removed once empty).
    #[serde(default)]
    pub cgroup_roots: Vec<PathBuf>,
    pub instances: Vec<Record>,
}

static SELF_EXE: OnceLock<PathBuf> = OnceLock::new();

/// Called by the `shoal` binary: instances may be launched through `shoal _exec` and a
/// watchdog through `shoal _watchdog`. Without it (an embedding program), instances join
/// their cgroup just after they start and no watchdog runs.
pub fn enable_helpers() {
    if let Ok(exe) = std::env::current_exe() {
        let _ = SELF_EXE.set(exe);
    }
}

pub(crate) fn self_exe() -> Option<&'static PathBuf> {
    SELF_EXE.get()
}

/// The record of this run's instances, shared by every fleet of one shoal process.
#[derive(Debug)]
pub struct Registry {
    file: PathBuf,
    state: Mutex<RunFile>,
    /// Our end of a socket pair whose other end is the watchdog's stdin. Only shoal holds it
    /// (close-on-exec, so no instance inherits it): shoal's exit is the watchdog's EOF.
    lifeline: Mutex<Option<std::os::unix::net::UnixStream>>,
    watchdog: Mutex<Option<std::process::Child>>,
}

impl Registry {
    /// Stops what a previous run left, then starts this run's record and watchdog.
    pub fn open(data_dir: &Path) -> std::io::Result<Registry> {
        let dir = data_dir.join("run");
        std::fs::create_dir_all(&dir)?;
        let file = dir.join("instances.json");
        if let Some(old) = read_run_file(&file) {
            let me = std::process::id();
            let alive = old.shoal_pid != me
                && start_ticks(old.shoal_pid).is_some_and(|s| s == old.shoal_start);
            if alive {
                return Err(std::io::Error::other(format!(
                    "another shoal (pid {}) runs with this data_dir ({}); stop it first",
                    old.shoal_pid,
                    data_dir.display()
                )));
            }
            let n = stop_all(&old);
            if n > 0 {
                tracing::warn!(stopped = n, file = %file.display(), "stopped instances a previous run left behind");
            }
        }
        let me = std::process::id();
        let state = RunFile {
            shoal_pid: me,
            shoal_start: start_ticks(me).unwrap_or(0),
            cgroup_roots: Vec::new(),
            instances: Vec::new(),
        };
        let reg = Registry {
            file,
            state: Mutex::new(state),
            lifeline: Mutex::new(None),
            watchdog: Mutex::new(None),
        };
        reg.save();
        let Some(exe) = self_exe() else {
            return Ok(reg);
        };
        let (ours, theirs) = std::os::unix::net::UnixStream::pair()?;
        let child = std::process::Command::new(exe)
            .arg("_watchdog")
            .arg(&reg.file)
            .stdin(Stdio::from(std::os::fd::OwnedFd::from(theirs)))
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            // Its own group: a terminal's Ctrl-C (which shoal handles by draining) must not
            // take the watchdog down with it.
            .process_group(0)
            .spawn()?;
        tracing::debug!(pid = child.id(), "watchdog started");
        // A stopped (SIGSTOP) watchdog must not stall the fleet.
        ours.set_write_timeout(Some(Duration::from_secs(1)))?;
        let reg = Registry {
            lifeline: Mutex::new(Some(ours)),
            watchdog: Mutex::new(Some(child)),
            ..reg
        };
        reg.save();
        Ok(reg)
    }

    pub fn add(&self, r: Record) {
        self.state.lock().expect("registry lock").instances.push(r);
        self.save();
    }

    pub fn add_cgroup_root(&self, dir: PathBuf) {
        let mut s = self.state.lock().expect("registry lock");
        if !s.cgroup_roots.contains(&dir) {
            s.cgroup_roots.push(dir);
        }
        drop(s);
        self.save();
    }

    pub fn remove(&self, service: &str, id: &str) {
        self.state
            .lock()
            .expect("registry lock")
            .instances
            .retain(|r| !(r.service == service && r.id == id));
        self.save();
    }

    /// Highest instance number a previous run of `service` used, from its log files, so
    /// ids (and their logs and cgroups) are never reused.
    pub fn last_id(logs: &Path, service: &str) -> u64 {
        let prefix = format!("{service}-");
        std::fs::read_dir(logs)
            .into_iter()
            .flatten()
            .flatten()
            .filter_map(|e| {
                let name = e.file_name().to_string_lossy().into_owned();
                name.strip_prefix(&prefix)?
                    .strip_suffix(".log")?
                    .parse::<u64>()
                    .ok()
            })
            .max()
            .unwrap_or(0)
    }

    /// Writes the record to the run file and sends it to the watchdog (one JSON line).
    fn save(&self) {
        let s = self.state.lock().expect("registry lock");
        let Ok(mut json) = serde_json::to_vec(&*s) else {
            return;
        };
        let r = (|| -> std::io::Result<()> {
            let tmp = self.file.with_extension("json.tmp");
            std::fs::write(&tmp, &json)?;
            std::fs::rename(&tmp, &self.file)
        })();
        if let Err(e) = r {
            tracing::error!(file = %self.file.display(), error = %e, "cannot record instances; a restart may not find what a crash left");
        }
        json.push(b'\n');
        let mut lifeline = self.lifeline.lock().expect("lifeline lock");
        if let Some(sock) = lifeline.as_mut() {
            use std::io::Write;
            if let Err(e) = sock.write_all(&json) {
                tracing::error!(error = %e, "watchdog unreachable; instances may outlive a crash of shoal");
                *lifeline = None;
            }
        }
    }

    /// Kills every recorded instance now and forgets them.
    pub fn kill_all(&self) {
        let run = self.state.lock().expect("registry lock").clone();
        let n = stop_all(&run);
        tracing::warn!(stopped = n, "instances killed");
        self.state.lock().expect("registry lock").instances.clear();
        self.save();
    }

    /// After a clean shutdown: removes the run's cgroups and lets the watchdog go.
    pub fn close(&self) {
        let roots = self
            .state
            .lock()
            .expect("registry lock")
            .cgroup_roots
            .clone();
        for r in roots {
            crate::cgroup::remove_tree(&r);
        }
        if let Some(mut c) = self.watchdog.lock().expect("watchdog lock").take() {
            // It exits on EOF when shoal exits; reap it now so it is no zombie meanwhile.
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

fn read_run_file(file: &Path) -> Option<RunFile> {
    let bytes = std::fs::read(file).ok()?;
    match serde_json::from_slice(&bytes) {
        Ok(r) => Some(r),
        Err(e) => {
            tracing::warn!(file = %file.display(), error = %e, "unreadable run file; ignoring it");
            None
        }
    }
}

/// True if `r`'s process is still the one recorded.
fn same_process(r: &Record) -> bool {
    start_ticks(r.pid).is_some_and(|s| s == r.start)
}

/// Kills every recorded instance (process group and cgroup), waits briefly for them to go,
/// and removes their cgroups. Returns how many were still running.
pub fn stop_all(run: &RunFile) -> usize {
    let mut n = 0;
    for r in &run.instances {
        let mut hit = false;
        if same_process(r) {
            let _ = killpg(Pid::from_raw(r.pid as i32), Signal::SIGKILL);
            hit = true;
        } else if start_ticks(r.pid).is_none() {
            // Leader gone: members of its group may remain (the group id cannot be reused
            // while any exist).
            let t = crate::usage::ProcTable::scan();
            let members = t.group(r.pid);
            if !members.is_empty() {
                let _ = killpg(Pid::from_raw(r.pid as i32), Signal::SIGKILL);
                hit = true;
            }
        }
        if let Some(cg) = &r.cgroup {
            if !cg.pids().is_empty() {
                cg.kill_all();
                hit = true;
            }
        }
        n += hit as usize;
    }
    // Wait for the cgroups to empty so they can be removed.
    let until = Instant::now() + Duration::from_secs(2);
    for r in &run.instances {
        if let Some(cg) = &r.cgroup {
            while !cg.pids().is_empty() && Instant::now() < until {
                std::thread::sleep(Duration::from_millis(10));
            }
            cg.remove();
        }
    }
    for root in &run.cgroup_roots {
        crate::cgroup::remove_tree(root);
    }
    n
}

/// `shoal _watchdog FILE`: waits for shoal to exit (EOF on stdin), then stops what FILE
/// still records.
pub fn watchdog_main(file: &Path) -> std::io::Result<()> {
    // Signals meant for shoal's terminal or group are not for the watchdog.
    for s in [
        Signal::SIGINT,
        Signal::SIGHUP,
        Signal::SIGTERM,
        Signal::SIGPIPE,
    ] {
        let _ = ignore(s);
    }
    // Each line is the whole record; the last complete one is what shoal left running.
    let mut last: Option<RunFile> = None;
    let mut stdin = std::io::stdin().lock();
    let mut pending = Vec::new();
    let mut buf = [0u8; 8192];
    loop {
        match stdin.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => {
                pending.extend_from_slice(&buf[..n]);
                while let Some(i) = pending.iter().position(|&b| b == b'\n') {
                    let line: Vec<u8> = pending.drain(..=i).collect();
                    if let Ok(r) = serde_json::from_slice::<RunFile>(&line) {
                        last = Some(r);
                    }
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(_) => break,
        }
    }
    // The file too (it may hold a start whose message was cut off by the kill).
    let mut n = 0;
    let from_file = read_run_file(file);
    let pid = last
        .as_ref()
        .or(from_file.as_ref())
        .map_or(0, |r| r.shoal_pid);
    for run in [last.as_ref(), from_file.as_ref()].into_iter().flatten() {
        n += stop_all(run);
    }
    if n > 0 {
        eprintln!("shoal watchdog: shoal (pid {pid}) is gone; stopped {n} instance(s)");
    }
    // Nothing left to stop: the next start need not look again.
    if let Some(run) = from_file {
        let empty = RunFile {
            instances: Vec::new(),
            cgroup_roots: Vec::new(),
            ..run
        };
        if let Ok(b) = serde_json::to_vec(&empty) {
            let _ = std::fs::write(file, b);
        }
    }
    Ok(())
}

fn ignore(sig: Signal) -> nix::Result<()> {
    let mut set = nix::sys::signal::SigSet::empty();
    set.add(sig);
    set.thread_block()
}

/// `shoal _exec FILE... -- PROGRAM ARGS`: joins the cgroups whose `cgroup.procs` files are
/// given, then becomes PROGRAM (same pid, same process group).
pub fn exec_main(join: &[PathBuf], program: &str, args: &[String]) -> std::io::Error {
    use std::os::unix::process::CommandExt;
    let me = std::process::id().to_string();
    for f in join {
        if let Err(e) = std::fs::write(f, &me) {
            return std::io::Error::other(format!("cannot join cgroup {}: {e}", f.display()));
        }
    }
    std::process::Command::new(program).args(args).exec()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_continue_after_the_highest_logged() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(Registry::last_id(dir.path(), "web"), 0);
        for f in [
            "web-3.log",
            "web-12.log",
            "web-x.log",
            "api-40.log",
            "web-7.txt",
        ] {
            std::fs::write(dir.path().join(f), "").unwrap();
        }
        assert_eq!(Registry::last_id(dir.path(), "web"), 12);
        assert_eq!(Registry::last_id(dir.path(), "api"), 40);
    }

    /// A record whose process is gone, or whose pid now belongs to another process, is
    /// never signalled.
    #[test]
    fn stale_records_hit_nothing() {
        let mut child = std::process::Command::new("sleep")
            .arg("30")
            .process_group(0)
            .spawn()
            .unwrap();
        let pid = child.id();
        let start = start_ticks(pid).unwrap();
        let record = |start| Record {
            service: "web".into(),
            id: "web-1".into(),
            pid,
            start,
            cgroup: None,
        };
        let run = |r| RunFile {
            instances: vec![r],
            ..RunFile::default()
        };
        // Same pid, other start time: a reused pid. Left alone.
        assert_eq!(stop_all(&run(record(start + 1))), 0);
        assert!(child.try_wait().unwrap().is_none());
        // The recorded process: killed with its group.
        assert_eq!(stop_all(&run(record(start))), 1);
        let status = child.wait().unwrap();
        assert!(!status.success());
    }
}
