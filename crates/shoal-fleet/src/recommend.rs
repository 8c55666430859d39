//! VPA-style size recommendations from observed usage, and the in-place resize policy
//! (pure: time is an argument).

use std::collections::{BTreeMap, VecDeque};

use serde::Serialize;

use crate::cgroup::Size;
use crate::config::Resources;

/// A recommended per-instance size.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Recommendation {
    /// CPU cores: the 90th percentile of per-second usage plus 15%, rounded up to 0.05.
    pub cpu: f64,
    /// Memory: the peak working set plus 20%, rounded up to a MiB (never under the size an
    /// OOM kill forced within the window).
    pub memory_bytes: u64,
    /// Samples the recommendation rests on.
    pub samples: usize,
}

const MIB: u64 = 1 << 20;

/// Recommends a size from per-second CPU usage samples (cores, any instance) and the peak
/// memory seen. None until there are at least 10 samples.
pub fn recommend(cpu_samples: &[f64], peak_memory: u64) -> Option<Recommendation> {
    if cpu_samples.len() < 10 {
        return None;
    }
    let mut v: Vec<f64> = cpu_samples
        .iter()
        .copied()
        .filter(|x| x.is_finite() && *x >= 0.0)
        .collect();
    v.sort_by(f64::total_cmp);
    let p90 = v[((v.len() - 1) as f64 * 0.9).round() as usize];
    let cpu = ((p90 * 1.15) / 0.05).ceil().max(1.0) * 0.05;
    let memory_bytes = ((peak_memory as f64 * 1.2) as u64).div_ceil(MIB).max(1) * MIB;
    Some(Recommendation {
        cpu,
        memory_bytes,
        samples: v.len(),
    })
}

/// Usage history of one fleet over a sliding window.
#[derive(Debug, Default)]
pub struct Recommender {
    window_secs: f64,
    last_cpu: BTreeMap<String, (f64, f64)>,
    /// (time, cores) per instance per sample.
    cpu: VecDeque<(f64, f64)>,
    /// (time, largest instance memory) per sample.
    memory: VecDeque<(f64, u64)>,
    /// (time, bytes): an OOM kill's floor.
    oom_floor: Option<(f64, u64)>,
}

impl Recommender {
    pub fn new(window_secs: f64) -> Recommender {
        Recommender {
            window_secs,
            ..Recommender::default()
        }
    }

    /// One sample at `t` seconds: (instance, cumulative CPU seconds, memory bytes).
    pub fn add(&mut self, t: f64, samples: &[(String, f64, u64)]) {
        let mut peak = None;
        let mut seen = BTreeMap::new();
        for (id, cpu, mem) in samples {
            if let Some(&(t0, c0)) = self.last_cpu.get(id) {
                if t > t0 {
                    self.cpu.push_back((t, ((cpu - c0) / (t - t0)).max(0.0)));
                }
            }
            seen.insert(id.clone(), (t, *cpu));
            peak = Some(peak.unwrap_or(0).max(*mem));
        }
        self.last_cpu = seen;
        if let Some(p) = peak {
            self.memory.push_back((t, p));
        }
        let old = t - self.window_secs;
        while self.cpu.front().is_some_and(|(ts, _)| *ts < old) {
            self.cpu.pop_front();
        }
        while self.memory.front().is_some_and(|(ts, _)| *ts < old) {
            self.memory.pop_front();
        }
        if self.oom_floor.is_some_and(|(ts, _)| ts < old) {
            self.oom_floor = None;
        }
    }

    /// An OOM kill at `limit`: recommendations stay above it for a window.
    pub fn oom(&mut self, t: f64, limit: u64) {
        let floor = ((limit as f64 * 1.2) as u64).div_ceil(MIB) * MIB;
        self.oom_floor = Some((t, floor));
    }

    pub fn recommendation(&self) -> Option<Recommendation> {
        let cpu: Vec<f64> = self.cpu.iter().map(|(_, c)| *c).collect();
        let peak = self.memory.iter().map(|(_, m)| *m).max().unwrap_or(0);
        let mut r = recommend(&cpu, peak)?;
        if let Some((_, f)) = self.oom_floor {
            r.memory_bytes = r.memory_bytes.max(f);
        }
        Some(r)
    }
}

/// One in-place size change, as the decision log shows it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Resize {
    pub epoch_secs: f64,
    /// `cpu` or `memory`.
    pub resource: &'static str,
    /// `up` or `down`.
    pub direction: &'static str,
    /// `recommendation` or `oom_kill`.
    pub reason: &'static str,
    pub from: f64,
    pub to: f64,
    pub detail: String,
    /// Instances (pid) the new limit was written to in place.
    #[serde(default)]
    pub applied_to: Vec<(String, u32)>,
}

/// The in-place changes `auto` mode makes now, if any: a resource moves when the
/// recommendation (clamped to its bounds) is over 5% (memory) / 10% (CPU) above the limit
/// or under 70% of it, and no change happened within the cool-down.
pub fn decide(
    current: Size,
    rec: &Recommendation,
    cfg: &Resources,
    now_secs: f64,
    last_change_secs: Option<f64>,
) -> Vec<(&'static str, f64, f64)> {
    if last_change_secs.is_some_and(|l| now_secs - l < cfg.cooldown.as_secs_f64()) {
        return Vec::new();
    }
    let mut out = Vec::new();
    if let Some(m) = current.memory_bytes {
        let to = rec
            .memory_bytes
            .clamp(cfg.memory_bounds.0, cfg.memory_bounds.1);
        let (m, t) = (m as f64, to as f64);
        if t > m * 1.05 || t < m * 0.7 {
            out.push(("memory", m, t));
        }
    }
    if let Some(c) = current.cpu {
        let to = rec.cpu.clamp(cfg.cpu_bounds.0, cfg.cpu_bounds.1);
        if to > c * 1.1 || to < c * 0.7 {
            out.push(("cpu", c, to));
        }
    }
    out
}

/// The memory size after an OOM kill at `limit`: half as much again (or the recommendation
/// if larger), up to the bound; None when already at the bound.
pub fn after_oom(limit: u64, rec: Option<&Recommendation>, cfg: &Resources) -> Option<u64> {
    let grown = (limit + limit / 2).div_ceil(MIB) * MIB;
    let to = grown
        .max(rec.map_or(0, |r| r.memory_bytes))
        .min(cfg.memory_bounds.1);
    (to > limit).then_some(to)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::VerticalMode;
    use std::time::Duration;

    fn cfg() -> Resources {
        Resources {
            cpu: Some(1.0),
            memory_bytes: Some(64 * MIB),
            mode: VerticalMode::Auto,
            cpu_bounds: (0.25, 2.0),
            memory_bounds: (32 * MIB, 256 * MIB),
            cooldown: Duration::from_secs(60),
        }
    }

    #[test]
    fn p90_plus_margin() {
        let samples: Vec<f64> = (0..100).map(|i| i as f64 / 100.0).collect();
        let r = recommend(&samples, 100 << 20).unwrap();
        // p90 = 0.89 (nearest rank) → ×1.15 = 1.0235 → 1.05
        assert!((r.cpu - 1.05).abs() < 1e-9, "{r:?}");
        assert_eq!(r.memory_bytes, 120 << 20);
        assert!(recommend(&samples[..5], 1).is_none());
    }

    #[test]
    fn idle_service_gets_the_floor() {
        let r = recommend(&[0.0; 20], 0).unwrap();
        assert!((r.cpu - 0.05).abs() < 1e-9);
        assert_eq!(r.memory_bytes, 1 << 20);
    }

    #[test]
    fn recommender_windows_and_oom_floor() {
        let mut r = Recommender::new(100.0);
        for i in 0..20 {
            let t = i as f64;
            // Two instances: one at half a core, one idle; memory peaks at 50 MiB early.
            let mem = if i == 2 { 50 * MIB } else { 10 * MIB };
            r.add(t, &[("a".into(), t * 0.5, mem), ("b".into(), 0.0, MIB)]);
        }
        let rec = r.recommendation().unwrap();
        assert_eq!(rec.memory_bytes, 60 * MIB);
        assert!((rec.cpu - 0.6).abs() < 1e-9, "{rec:?}");
        // The 50 MiB peak leaves the window.
        for i in 20..130 {
            let t = i as f64;
            r.add(t, &[("a".into(), t * 0.5, 10 * MIB)]);
        }
        assert_eq!(r.recommendation().unwrap().memory_bytes, 12 * MIB);
        r.oom(130.0, 64 * MIB);
        assert!(r.recommendation().unwrap().memory_bytes >= 76 * MIB);
    }

    #[test]
    fn decide_moves_past_the_bands_within_bounds_after_the_cooldown() {
        let cur = Size {
            cpu: Some(1.0),
            memory_bytes: Some(64 * MIB),
        };
        let rec = |cpu, mem| Recommendation {
            cpu,
            memory_bytes: mem,
            samples: 10,
        };
        // Within the bands: nothing.
        assert!(decide(cur, &rec(1.05, 66 * MIB), &cfg(), 0.0, None).is_empty());
        // Memory near the limit: up; CPU far under: down.
        let d = decide(cur, &rec(0.3, 80 * MIB), &cfg(), 0.0, None);
        assert_eq!(
            d,
            vec![
                ("memory", 64.0 * MIB as f64, 80.0 * MIB as f64),
                ("cpu", 1.0, 0.3)
            ]
        );
        // Bounds clamp.
        let d = decide(cur, &rec(8.0, 900 * MIB), &cfg(), 0.0, None);
        assert_eq!(
            d,
            vec![
                ("memory", 64.0 * MIB as f64, 256.0 * MIB as f64),
                ("cpu", 1.0, 2.0)
            ]
        );
        // Cool-down.
        assert!(decide(cur, &rec(8.0, 900 * MIB), &cfg(), 30.0, Some(0.0)).is_empty());
        assert!(!decide(cur, &rec(8.0, 900 * MIB), &cfg(), 61.0, Some(0.0)).is_empty());
    }

    #[test]
    fn oom_grows_by_half_up_to_the_bound() {
        assert_eq!(after_oom(64 * MIB, None, &cfg()), Some(96 * MIB));
        let big = Recommendation {
            cpu: 1.0,
            memory_bytes: 120 * MIB,
            samples: 10,
        };
        assert_eq!(after_oom(64 * MIB, Some(&big), &cfg()), Some(120 * MIB));
        assert_eq!(after_oom(200 * MIB, None, &cfg()), Some(256 * MIB));
        assert_eq!(after_oom(256 * MIB, None, &cfg()), None);
    }
}
