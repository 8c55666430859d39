//! Per-instance CPU and memory from `/proc`.

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

/// Parses `/proc/PID/stat` (utime + stime) and `/proc/PID/statm` (resident pages).
pub fn parse(stat: &str, statm: &str) -> Option<Usage> {
    // The command name (field 2) may contain spaces and parentheses: split after the last ')'.
    let rest = &stat[stat.rfind(')')? + 1..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // rest starts at field 3 (state); utime and stime are fields 14 and 15.
    let utime: f64 = fields.get(11)?.parse().ok()?;
    let stime: f64 = fields.get(12)?.parse().ok()?;
    let resident: u64 = statm.split_whitespace().nth(1)?.parse().ok()?;
    Some(Usage {
        cpu_seconds: (utime + stime) / ticks_per_sec(),
        memory_bytes: resident * page_size(),
    })
}

/// Reads the usage of `pid`; None if it is gone.
pub fn read_usage(pid: u32) -> Option<Usage> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let statm = std::fs::read_to_string(format!("/proc/{pid}/statm")).ok()?;
    parse(&stat, &statm)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_stat_with_odd_command_names() {
        let stat = "1234 (my (odd) cmd) S 1 1234 1234 0 -1 4194560 100 0 0 0 250 50 0 0 20 0 1 0 100 1000 10 18446744073709551615";
        let u = parse(stat, "5000 300 100 1 0 200 0").unwrap();
        assert!((u.cpu_seconds - 300.0 / ticks_per_sec()).abs() < 1e-9);
        assert_eq!(u.memory_bytes, 300 * page_size());
    }

    #[test]
    fn reads_this_process() {
        let u = read_usage(std::process::id()).unwrap();
        assert!(u.memory_bytes > 0);
    }
}
