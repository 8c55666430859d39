//! Leader election as a pure state machine (client-go's leaderelection semantics), driven by
//! a monotonic clock the caller passes in; the Redis calls live in `cluster.rs`.
//!
//! - `lease`: how long a holder's lock lives in the store without a renewal (the TTL).
//! - `renew_deadline`: a leader that has not renewed successfully within this much time of
//!   its last successful renewal's *send* time stops writing and steps down. It is shorter
//!   than `lease`, so a leader that cannot reach the store (or was paused) stops before the
//!   lock can expire and another replica take it.
//! - `retry`: the pause between attempts (acquire as a follower, renew as the leader).
//!
//! Times are measured from when a request was sent, never from when its answer came: the
//! store set the TTL somewhere in between, so the send time is the conservative start.

use std::time::Duration;

/// Durations of the election; `renew_deadline < lease`, `retry < renew_deadline`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Timing {
    pub lease: Duration,
    pub renew_deadline: Duration,
    pub retry: Duration,
}

impl Timing {
    /// client-go's proportions (15 s / 10 s / 2 s) scaled to `lease`.
    pub fn for_lease(lease: Duration) -> Timing {
        Timing {
            lease,
            renew_deadline: lease.mul_f64(2.0 / 3.0),
            retry: lease.mul_f64(2.0 / 15.0),
        }
    }

    /// Why these durations cannot work, if they cannot.
    pub fn check(&self) -> Result<(), String> {
        if self.lease.is_zero() || self.retry.is_zero() {
            return Err("durations must be above zero".into());
        }
        if self.renew_deadline >= self.lease {
            return Err("renew_deadline must be shorter than lease".into());
        }
        if self.retry >= self.renew_deadline {
            return Err("retry must be shorter than renew_deadline".into());
        }
        Ok(())
    }
}

/// This replica's role.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    Follower,
    Leader {
        /// The fencing token taken on acquisition.
        token: u64,
        /// When it became leader.
        since: Duration,
        /// Send time of the last acquire or renew the store accepted.
        renewed: Duration,
    },
}

/// What the driver should do now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    /// Try `SET NX PX lease` (+ take a token).
    Acquire,
    /// Extend our lock if it is still ours.
    Renew,
    /// Nothing until this time.
    Wait(Duration),
}

/// Why a leader stopped leading.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StepDown {
    /// No successful renewal within `renew_deadline` (store unreachable, or the process was
    /// paused past it).
    DeadlinePassed,
    /// The store says the lock is someone else's.
    LockLost,
    /// A fenced write was refused: a newer leader exists.
    Fenced,
    /// This replica is shutting down and released the lock.
    Resigned,
}

impl StepDown {
    pub fn as_str(self) -> &'static str {
        match self {
            StepDown::DeadlinePassed => "renew deadline passed",
            StepDown::LockLost => "lock held by another replica",
            StepDown::Fenced => "write refused by the fencing token",
            StepDown::Resigned => "shutting down: lock released",
        }
    }
}

/// The election state of one replica for one lock.
#[derive(Debug, Clone)]
pub struct Election {
    pub timing: Timing,
    role: Role,
    next_attempt: Duration,
    /// Role changes so far (gained or lost).
    pub changes: u64,
    /// The last step-down and when it happened.
    pub last_step_down: Option<(Duration, StepDown)>,
}

impl Election {
    pub fn new(timing: Timing) -> Election {
        Election {
            timing,
            role: Role::Follower,
            next_attempt: Duration::ZERO,
            changes: 0,
            last_step_down: None,
        }
    }

    pub fn role(&self) -> Role {
        self.role
    }

    /// The fencing token to write with, if this replica may write at `now`: it leads and
    /// its last successful renewal is within the renew deadline. Checked before every
    /// write, so a replica paused past its deadline does not write on waking up even
    /// before its election loop runs again.
    pub fn may_write(&self, now: Duration) -> Option<u64> {
        match self.role {
            Role::Leader { token, renewed, .. }
                if now.saturating_sub(renewed) < self.timing.renew_deadline =>
            {
                Some(token)
            }
            _ => None,
        }
    }

    /// What to do at `now`; a leader past its renew deadline steps down here (returned
    /// first, so the driver logs it and releases the lock).
    pub fn poll(&mut self, now: Duration) -> Result<Step, StepDown> {
        if let Role::Leader { renewed, .. } = self.role {
            if now.saturating_sub(renewed) >= self.timing.renew_deadline {
                self.step_down(now, StepDown::DeadlinePassed);
                return Err(StepDown::DeadlinePassed);
            }
        }
        if now < self.next_attempt {
            return Ok(Step::Wait(self.next_attempt));
        }
        self.next_attempt = now + self.timing.retry;
        Ok(match self.role {
            Role::Follower => Step::Acquire,
            Role::Leader { .. } => Step::Renew,
        })
    }

    /// An acquire sent at `sent` came back: `Some(token)` if the lock is ours now.
    pub fn acquired(&mut self, sent: Duration, now: Duration, token: Option<u64>) {
        if let (Role::Follower, Some(token)) = (self.role, token) {
            self.role = Role::Leader {
                token,
                since: now,
                renewed: sent,
            };
            self.changes += 1;
            // Renew one retry period after the acquisition.
            self.next_attempt = now + self.timing.retry;
        }
    }

    /// A renewal sent at `sent` came back: `Ok(true)` extended, `Ok(false)` the lock is
    /// not ours any more, `Err(())` the store did not answer (retry until the deadline).
    pub fn renewed(&mut self, sent: Duration, now: Duration, result: Result<bool, ()>) {
        let Role::Leader {
            token,
            since,
            renewed,
        } = self.role
        else {
            return;
        };
        match result {
            Ok(true) => {
                self.role = Role::Leader {
                    token,
                    since,
                    renewed: renewed.max(sent),
                }
            }
            Ok(false) => self.step_down(now, StepDown::LockLost),
            Err(()) => {}
        }
    }

    /// A fenced write was refused: someone with a newer token leads.
    pub fn fenced(&mut self, now: Duration) {
        if matches!(self.role, Role::Leader { .. }) {
            self.step_down(now, StepDown::Fenced);
        }
    }

    /// Shutting down: the lock was released, nothing more is written.
    pub fn resign(&mut self, now: Duration) {
        if matches!(self.role, Role::Leader { .. }) {
            self.step_down(now, StepDown::Resigned);
        }
    }

    fn step_down(&mut self, now: Duration, why: StepDown) {
        self.role = Role::Follower;
        self.changes += 1;
        self.last_step_down = Some((now, why));
        // Give the store a retry period before trying again.
        self.next_attempt = now + self.timing.retry;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(x: f64) -> Duration {
        Duration::from_secs_f64(x)
    }

    fn timing() -> Timing {
        Timing {
            lease: s(2.0),
            renew_deadline: s(1.4),
            retry: s(0.3),
        }
    }

    #[test]
    fn timing_is_checked_and_scaled_like_client_go() {
        assert!(timing().check().is_ok());
        let t = Timing::for_lease(s(15.0));
        assert_eq!((t.renew_deadline, t.retry), (s(10.0), s(2.0)));
        assert!(t.check().is_ok());
        let bad = Timing {
            renew_deadline: s(2.0),
            ..timing()
        };
        assert!(bad.check().unwrap_err().contains("renew_deadline"));
        let bad = Timing {
            retry: s(1.5),
            ..timing()
        };
        assert!(bad.check().unwrap_err().contains("retry"));
    }

    #[test]
    fn follower_acquires_then_renews_every_retry_period() {
        let mut e = Election::new(timing());
        assert_eq!(e.poll(s(0.0)), Ok(Step::Acquire));
        // Not again before the retry period.
        assert_eq!(e.poll(s(0.1)), Ok(Step::Wait(s(0.3))));
        assert_eq!(e.may_write(s(0.1)), None);
        e.acquired(s(0.0), s(0.01), Some(7));
        assert_eq!(e.may_write(s(0.02)), Some(7));
        assert!(matches!(e.role(), Role::Leader { token: 7, .. }));
        assert_eq!(e.changes, 1);
        assert_eq!(e.poll(s(0.2)), Ok(Step::Wait(s(0.31))));
        assert_eq!(e.poll(s(0.31)), Ok(Step::Renew));
        e.renewed(s(0.31), s(0.32), Ok(true));
        // The deadline counts from the renewal's send time.
        assert_eq!(e.may_write(s(1.70)), Some(7));
        assert_eq!(e.may_write(s(1.71)), None);
    }

    #[test]
    fn a_failed_acquire_stays_follower_and_retries() {
        let mut e = Election::new(timing());
        assert_eq!(e.poll(s(0.0)), Ok(Step::Acquire));
        e.acquired(s(0.0), s(0.01), None);
        assert_eq!(e.role(), Role::Follower);
        assert_eq!(e.poll(s(0.3)), Ok(Step::Acquire));
        assert_eq!(e.changes, 0);
    }

    #[test]
    fn unanswered_renewals_step_down_before_the_lease_can_expire() {
        let mut e = Election::new(timing());
        e.poll(s(0.0)).unwrap();
        e.acquired(s(0.0), s(0.0), Some(1));
        let mut t = 0.3;
        // The store stops answering: every renewal errs.
        while e.poll(s(t)).is_ok() {
            e.renewed(s(t), s(t + 0.05), Err(()));
            t += 0.3;
        }
        assert_eq!(e.role(), Role::Follower);
        assert_eq!(e.last_step_down.unwrap().1, StepDown::DeadlinePassed);
        // Stepped down no later than the renew deadline, which is before the lease ends
        // (the earliest another replica could acquire).
        assert!(
            s(t) >= e.timing.renew_deadline && s(t) < e.timing.lease,
            "{t}"
        );
        assert_eq!(e.may_write(s(t)), None);
        assert_eq!(e.changes, 2);
    }

    #[test]
    fn a_paused_leader_does_not_write_on_waking_and_steps_down() {
        let mut e = Election::new(timing());
        e.poll(s(0.0)).unwrap();
        e.acquired(s(0.0), s(0.0), Some(3));
        e.poll(s(0.3)).unwrap();
        e.renewed(s(0.3), s(0.3), Ok(true));
        // SIGSTOP for 5 s: the monotonic clock moved on. Before the loop polls, a write
        // asks first and is refused.
        assert_eq!(e.may_write(s(5.3)), None);
        assert_eq!(e.poll(s(5.3)), Err(StepDown::DeadlinePassed));
        assert_eq!(e.role(), Role::Follower);
        // A late answer to a renewal sent before the pause changes nothing.
        e.renewed(s(0.3), s(5.4), Ok(true));
        assert_eq!(e.role(), Role::Follower);
    }

    #[test]
    fn lost_lock_and_fenced_writes_step_down_at_once() {
        let mut e = Election::new(timing());
        e.poll(s(0.0)).unwrap();
        e.acquired(s(0.0), s(0.0), Some(1));
        e.renewed(s(0.3), s(0.3), Ok(false));
        assert_eq!(e.role(), Role::Follower);
        assert_eq!(e.last_step_down.unwrap().1, StepDown::LockLost);
        // Retries after a retry period, gets a newer token.
        assert_eq!(e.poll(s(0.4)), Ok(Step::Wait(s(0.6))));
        assert_eq!(e.poll(s(0.6)), Ok(Step::Acquire));
        e.acquired(s(0.6), s(0.6), Some(2));
        assert_eq!(e.may_write(s(0.7)), Some(2));
        e.fenced(s(0.8));
        assert_eq!(e.may_write(s(0.8)), None);
        assert_eq!(e.last_step_down.unwrap().1, StepDown::Fenced);
        assert_eq!(e.changes, 4);
    }

    #[test]
    fn a_late_acquire_answer_leaves_no_write_window() {
        let mut e = Election::new(timing());
        e.poll(s(0.0)).unwrap();
        // The answer arrives after the renew deadline (the process was paused meanwhile):
        // it is leader on paper but may not write, and the next poll steps down.
        e.acquired(s(0.0), s(1.5), Some(9));
        assert_eq!(e.may_write(s(1.5)), None);
        assert_eq!(e.poll(s(1.5)), Err(StepDown::DeadlinePassed));
    }
}
