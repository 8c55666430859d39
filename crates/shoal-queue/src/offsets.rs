//! Which Kafka offset is safe to commit when jobs finish out of order.
//!
//! A committed offset means "everything below is done". With several jobs of one partition in
//! flight, finishing offset 12 while 10 still runs must not commit 13, or a crash would lose
//! 10. Per partition: commit the lowest offset still in flight, or one past the highest seen
//! when none is.

use std::collections::{BTreeSet, HashMap};

#[derive(Debug, Default)]
struct Partition {
    in_flight: BTreeSet<i64>,
    highest: Option<i64>,
    committed: Option<i64>,
}

/// In-flight offsets per partition.
#[derive(Debug, Default)]
pub struct OffsetTracker {
    parts: HashMap<i32, Partition>,
}

impl OffsetTracker {
    /// A message was handed out.
    pub fn received(&mut self, partition: i32, offset: i64) {
        let p = self.parts.entry(partition).or_default();
        // Where this consumer started: committing it again would say nothing new.
        p.committed.get_or_insert(offset);
        p.in_flight.insert(offset);
        p.highest = Some(p.highest.map_or(offset, |h| h.max(offset)));
    }

    /// A message is settled. Returns the offset to commit when the commit point advanced.
    pub fn done(&mut self, partition: i32, offset: i64) -> Option<i64> {
        let p = self.parts.get_mut(&partition)?;
        if !p.in_flight.remove(&offset) {
            return None;
        }
        let point = match p.in_flight.first() {
            Some(&lowest) => lowest,
            None => p.highest? + 1,
        };
        if p.committed.is_some_and(|c| c >= point) {
            return None;
        }
        p.committed = Some(point);
        Some(point)
    }

    /// The partition went to another consumer: forget it (its uncommitted messages will be
    /// delivered there).
    pub fn revoke(&mut self, partition: i32) {
        self.parts.remove(&partition);
    }

    /// Messages handed out and not settled.
    pub fn in_flight(&self) -> usize {
        self.parts.values().map(|p| p.in_flight.len()).sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn commits_only_below_the_lowest_unfinished() {
        let mut t = OffsetTracker::default();
        for o in 10..14 {
            t.received(0, o);
        }
        assert_eq!(t.done(0, 12), None, "10 still runs");
        assert_eq!(t.done(0, 11), None);
        assert_eq!(t.done(0, 10), Some(13), "13 is the lowest unfinished");
        assert_eq!(t.done(0, 13), Some(14));
        assert_eq!(t.done(0, 13), None, "settled twice");
        assert_eq!(t.in_flight(), 0);
    }

    #[test]
    fn partitions_are_independent_and_revocable() {
        let mut t = OffsetTracker::default();
        t.received(0, 5);
        t.received(1, 7);
        assert_eq!(t.done(1, 7), Some(8));
        t.revoke(0);
        assert_eq!(t.done(0, 5), None);
        assert_eq!(t.in_flight(), 0);
    }

    /// Random finishing orders never commit past an unfinished offset.
    #[test]
    fn random_orders_never_commit_past_unfinished() {
        let mut seed = 0x9e3779b97f4a7c15u64;
        let mut rnd = move || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        for _ in 0..200 {
            let mut t = OffsetTracker::default();
            let n = 1 + (rnd() % 40) as i64;
            let mut open: Vec<i64> = (0..n).collect();
            for &o in &open {
                t.received(3, o);
            }
            let mut last = 0;
            while !open.is_empty() {
                let i = (rnd() as usize) % open.len();
                let o = open.swap_remove(i);
                if let Some(c) = t.done(3, o) {
                    assert!(
                        open.iter().all(|&u| u >= c),
                        "committed {c} with {open:?} open"
                    );
                    assert!(c > last);
                    last = c;
                }
            }
            assert_eq!(last, n);
        }
    }
}
