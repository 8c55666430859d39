//! A ring of 1 s buckets with sums over the last N seconds.
//!
//! The live autoscaler adds one unit per request (or one sample per scrape) and asks
//! for the rate or mean over the stable window (e.g. 60 s) and the panic window
//! (6 s); the simulator feeds the same structure with its synthetic demand.

/// Sums and counts in 1 s buckets over a fixed span of recent seconds.
#[derive(Debug, Clone)]
pub struct SecondWindow {
    sums: Vec<f64>,
    counts: Vec<u32>,
    /// The whole second of the newest bucket; `None` until the first add.
    head: Option<i64>,
}

impl SecondWindow {
    /// A window remembering the last `span_secs` seconds (at least 1).
    pub fn new(span_secs: usize) -> Self {
        let span = span_secs.max(1);
        Self {
            sums: vec![0.0; span],
            counts: vec![0; span],
            head: None,
        }
    }

    /// How many seconds the ring remembers.
    pub fn span_secs(&self) -> usize {
        self.sums.len()
    }

    fn advance(&mut self, sec: i64) {
        let span = self.sums.len() as i64;
        match self.head {
            None => self.head = Some(sec),
            Some(head) if sec > head => {
                let clear = (sec - head).min(span);
                for s in (sec - clear + 1)..=sec {
                    let i = s.rem_euclid(span) as usize;
                    self.sums[i] = 0.0;
                    self.counts[i] = 0;
                }
                self.head = Some(sec);
            }
            Some(_) => {}
        }
    }

    /// Add `value` to the bucket of second `now_secs` (late values older than the
    /// span are dropped; values for an earlier second still inside it are kept).
    pub fn add(&mut self, now_secs: f64, value: f64) {
        let sec = now_secs.floor() as i64;
        self.advance(sec);
        let head = self.head.unwrap_or(sec);
        let span = self.sums.len() as i64;
        if head - sec >= span {
            return;
        }
        let i = sec.rem_euclid(span) as usize;
        self.sums[i] += value;
        self.counts[i] += 1;
    }

    /// Move time forward to `now_secs` without adding anything (empty seconds count).
    pub fn tick(&mut self, now_secs: f64) {
        self.advance(now_secs.floor() as i64);
    }

    fn fold(&self, now_secs: f64, secs: usize) -> (f64, u64) {
        let Some(head) = self.head else {
            return (0.0, 0);
        };
        let now = now_secs.floor() as i64;
        let span = self.sums.len() as i64;
        let secs = (secs as i64).clamp(1, span);
        let (mut sum, mut count) = (0.0, 0u64);
        // Seconds now-secs+1 ..= now, of which only those ≤ head hold data.
        for s in (now - secs + 1)..=now.min(head) {
            if head - s >= span {
                continue;
            }
            let i = s.rem_euclid(span) as usize;
            sum += self.sums[i];
            count += u64::from(self.counts[i]);
        }
        (sum, count)
    }

    /// Sum of the values added in the last `secs` seconds (including `now_secs`'s).
    pub fn sum(&self, now_secs: f64, secs: usize) -> f64 {
        self.fold(now_secs, secs).0
    }

    /// Per-second rate over the last `secs` seconds: sum / secs.
    pub fn rate(&self, now_secs: f64, secs: usize) -> f64 {
        let secs = secs.clamp(1, self.sums.len());
        self.sum(now_secs, secs) / secs as f64
    }

    /// Mean of the samples added in the last `secs` seconds; `None` without samples.
    pub fn mean(&self, now_secs: f64, secs: usize) -> Option<f64> {
        let (sum, count) = self.fold(now_secs, secs);
        (count > 0).then(|| sum / count as f64)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rate_and_mean_over_recent_seconds() {
        let mut w = SecondWindow::new(60);
        for s in 0..10 {
            w.add(s as f64 + 0.5, 2.0);
        }
        assert_eq!(w.rate(9.9, 10), 2.0);
        assert_eq!(w.rate(9.9, 5), 2.0);
        assert_eq!(w.mean(9.9, 6), Some(2.0));
        // Time passes without data: the rate decays, the mean is over samples only.
        w.tick(14.0);
        assert_eq!(w.rate(14.0, 10), 1.0);
        assert_eq!(w.mean(14.0, 10), Some(2.0));
        assert_eq!(w.mean(14.0, 4), None);
    }

    #[test]
    fn old_buckets_are_cleared_after_a_gap() {
        let mut w = SecondWindow::new(5);
        w.add(0.0, 7.0);
        w.add(100.0, 1.0);
        assert_eq!(w.sum(100.0, 5), 1.0);
        // A late value older than the span is dropped.
        w.add(50.0, 9.0);
        assert_eq!(w.sum(100.0, 5), 1.0);
        // A late value within the span counts.
        w.add(98.0, 3.0);
        assert_eq!(w.sum(100.0, 5), 4.0);
    }
}
