//! When a shard's state is due to be checkpointed: every N updates (decided inside the update
//! that reaches N, so a crash loses at most N plus what is being written) and/or every T.
//! Pure: time comes in as `now`, a `Duration` since a start the caller chose.

use std::time::Duration;

#[derive(Debug, Clone, PartialEq)]
pub struct CheckpointSchedule {
    every_updates: Option<u64>,
    every: Option<Duration>,
    /// The version and time of the newest snapshot taken.
    last_version: u64,
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
            last_time: now,
        }
    }

    /// Called after an update that left the shard at `version`: a snapshot is due now if it
    /// reached the next multiple of the update interval. Marks it taken.
    pub fn due_after_update(&mut self, version: u64, now: Duration) -> bool {
        let due = self
            .every_updates
            .is_some_and(|n| version >= self.last_version.saturating_add(n));
        if due {
            self.mark(version, now);
        }
        due
    }

    /// Called from a timer: a snapshot is due if the time interval passed and something
    /// changed. Marks it taken.
    pub fn due_by_time(&mut self, version: u64, now: Duration) -> bool {
        let due = version > self.last_version
            && self
                .every
                .is_some_and(|d| now.saturating_sub(self.last_time) >= d);
        if due {
            self.mark(version, now);
        }
        due
    }

    /// The time-based interval, for the caller's timer.
    pub fn every(&self) -> Option<Duration> {
        self.every
    }

    pub fn mark(&mut self, version: u64, now: Duration) {
        self.last_version = version;
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
    fn every_t_fires_only_when_something_changed() {
        let mut s = CheckpointSchedule::new(None, Some(2 * S), 5, Duration::ZERO);
        assert!(!s.due_by_time(5, 10 * S), "nothing new since version 5");
        assert!(!s.due_by_time(6, S));
        assert!(s.due_by_time(6, 2 * S));
        assert!(!s.due_by_time(7, 3 * S));
        assert!(!s.due_after_update(100, 3 * S), "no update interval set");
    }
}
