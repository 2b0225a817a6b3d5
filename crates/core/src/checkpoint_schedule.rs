//! When a shard's state is due to be checkpointed: at every multiple of N updates (decided
//! inside the update that reaches it, so a crash loses at most N plus what is being written)
//! and/or every T. Multiples, not "N since the last save": every shard of a run then saves at
//! the same versions whatever else it saved, which is what makes a run-wide point (a
//! manifest) out of their files. Pure: time comes in as `now`, a `Duration` since a start the
//! caller chose.

use std::time::Duration;

#[derive(Debug, Clone, PartialEq)]
pub struct CheckpointSchedule {
    every_updates: Option<u64>,
    every: Option<Duration>,
    /// The version and time of the newest snapshot taken.
    last_version: u64,
    /// The version of the newest snapshot taken by the update count (or restored).
    last_counted: u64,
    /// No snapshot before this time: the writer failed and backs off (no state is copied
    /// for a save that would fail again). The first update after it takes the missed one.
    hold_until: Duration,
    last_time: Duration,
}

impl CheckpointSchedule {
    /// A schedule starting at `version` (0, or a restored checkpoint's) at `now`.
    pub fn new(
        every_updates: Option<u64>,
        every: Option<Duration>,
        version: u64,
        now: Duration,
    ) -> Self {
        CheckpointSchedule {
            every_updates: every_updates.filter(|&n| n > 0),
            every: every.filter(|d| !d.is_zero()),
            last_version: version,
            last_counted: version,
            last_time: now,
            hold_until: Duration::ZERO,
        }
    }

    /// Called after an update that left the shard at `version`: a snapshot is due now if it
    /// reached the next multiple of the update interval. Marks it taken.
    pub fn due_after_update(&mut self, version: u64, now: Duration) -> bool {
        let due = now >= self.hold_until
            && self
                .every_updates
                .is_some_and(|n| version / n > self.last_counted / n);
        if due {
            self.mark(version, now);
        }
        due
    }

    /// Called from a timer: a snapshot is due if the time interval passed and something
    /// changed. Marks it taken.
    pub fn due_by_time(&mut self, version: u64, now: Duration) -> bool {
        let due = version > self.last_version
            && now >= self.hold_until
            && self
                .every
                .is_some_and(|d| now.saturating_sub(self.last_time) >= d);
        if due {
            self.mark(version, now);
        }
        due
    }

    /// Takes no snapshot before `until` (a failed save backing off).
    pub fn hold_until(&mut self, until: Duration) {
        self.hold_until = until;
    }

    /// The time-based interval, for the caller's timer.
    pub fn every(&self) -> Option<Duration> {
        self.every
    }

    pub fn mark(&mut self, version: u64, now: Duration) {
        self.last_version = version;
        self.last_counted = self.last_counted.max(version);
        self.last_time = now;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: Duration = Duration::from_secs(1);

    #[test]
    fn every_n_updates_fires_once_per_interval() {
        let mut s = CheckpointSchedule::new(Some(3), None, 0, Duration::ZERO);
        let fired: Vec<u64> = (1..=10).filter(|&v| s.due_after_update(v, S)).collect();
        assert_eq!(fired, vec![3, 6, 9]);
        assert!(!s.due_by_time(10, 100 * S), "no time interval set");
    }

    #[test]
    fn update_count_snapshots_stay_on_multiples_whatever_else_was_saved() {
        let mut s = CheckpointSchedule::new(Some(10), Some(2 * S), 0, Duration::ZERO);
        assert!(s.due_by_time(4, 2 * S), "a time-based snapshot at 4");
        let fired: Vec<u64> = (5..=30).filter(|&v| s.due_after_update(v, 3 * S)).collect();
        assert_eq!(fired, vec![10, 20, 30], "not 14, 24");
        // A shard restored at 23 next saves at 30, like the shards that never stopped.
        let mut r = CheckpointSchedule::new(Some(10), None, 23, Duration::ZERO);
        let fired: Vec<u64> = (24..=40).filter(|&v| r.due_after_update(v, S)).collect();
        assert_eq!(fired, vec![30, 40]);
    }

    #[test]
    fn a_hold_defers_snapshots_and_the_first_update_after_it_takes_the_missed_one() {
        let mut s = CheckpointSchedule::new(Some(10), Some(2 * S), 0, Duration::ZERO);
        s.hold_until(10 * S);
        assert!(!s.due_after_update(10, 5 * S), "held");
        assert!(!s.due_by_time(11, 5 * S), "held");
        assert!(
            s.due_after_update(12, 10 * S),
            "the missed snapshot, at once"
        );
        assert!(!s.due_after_update(13, 10 * S));
        assert!(s.due_after_update(20, 11 * S), "back on the multiples");
    }

    #[test]
    fn every_t_fires_only_when_something_changed() {
        let mut s = CheckpointSchedule::new(None, Some(2 * S), 5, Duration::ZERO);
        assert!(!s.due_by_time(5, 10 * S), "nothing new since version 5");
        assert!(!s.due_by_time(6, S));
        assert!(s.due_by_time(6, 2 * S));
        assert!(!s.due_by_time(7, 3 * S));
        assert!(!s.due_after_update(100, 3 * S), "no update interval set");
    }
}
