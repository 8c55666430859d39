//! VPA-style size recommendations from observed usage (pure).

use serde::Serialize;

/// A recommended per-instance size.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Recommendation {
    /// CPU cores: the 90th percentile of per-second usage plus 15%, rounded up to 0.05.
    pub cpu: f64,
    /// Memory: the peak resident size plus 20%, rounded up to a MiB.
    pub memory_bytes: u64,
    /// Samples the recommendation rests on.
    pub samples: usize,
}

/// Recommends a size from per-second CPU usage samples (cores, any instance) and the peak
/// resident memory seen. None until there are at least 10 samples.
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
    let mib = 1u64 << 20;
    let memory_bytes = ((peak_memory as f64 * 1.2) as u64).div_ceil(mib).max(1) * mib;
    Some(Recommendation {
        cpu,
        memory_bytes,
        samples: v.len(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

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
}
