//! Sync: one update per step from the first `quorum - backup_workers` gradients of that step,
//! combined by `StepSum`; late gradients of a finished step are dropped when there are backup
//! workers. A shard 0 that coordinates other shards remembers each step's members.

use super::{Consistency, StepSource, StepSum};
use crate::admission::{Checked, Refused};
use crate::config::Aggregate;
use crate::error::PushError;
use crate::shard_state::{PushOutcome, ShardState};
use std::collections::VecDeque;

/// Completed steps whose members a coordinating shard remembers.
const MEMBER_HISTORY: usize = 64;

#[derive(Debug, Clone)]
pub struct SyncSteps {
    backup_workers: usize,
    sum: StepSum,
    /// Which ranks have been heard from in this step (applied or refused).
    heard: Vec<bool>,
    /// Which ranks' gradients went into this step (heard, and not refused).
    contributed: Vec<bool>,
    /// The members of the most recent completed steps, oldest first.
    history: VecDeque<(u64, Vec<bool>)>,
}

impl SyncSteps {
    pub fn new(workers: usize, backup_workers: usize, aggregate: Aggregate, len: usize) -> Self {
        SyncSteps {
            backup_workers,
            sum: StepSum::new(len, aggregate),
            heard: vec![false; workers],
            contributed: vec![false; workers],
            history: VecDeque::new(),
        }
    }

    /// How many gradients complete a step: all active workers, less the backups.
    fn quorum(&self, active: &[bool]) -> usize {
        let active = active.iter().filter(|&&a| a).count();
        active.saturating_sub(self.backup_workers).max(1)
    }

    fn heard_count(&self, active: &[bool]) -> usize {
        self.heard
            .iter()
            .zip(active)
            .filter(|(&h, &a)| h && a)
            .count()
    }

    /// Applies the step if enough ranks were heard from; returns the new version if it did.
    fn try_complete(&mut self, state: &mut ShardState, active: &[bool]) -> Option<u64> {
        let heard = self.heard_count(active);
        if heard == 0 || heard < self.quorum(active) {
            return None;
        }
        // A step whose every gradient was refused, or whose update was rolled back, still
        // ends, so no worker waits forever.
        let applied = self
            .sum
            .combined()
            .is_some_and(|update| state.apply(update));
        if !applied {
            state.skip_step();
        }
        self.sum.clear();
        self.heard.fill(false);
        if self.history.len() == MEMBER_HISTORY {
            self.history.pop_front();
        }
        let members = std::mem::replace(&mut self.contributed, vec![false; self.heard.len()]);
        self.history.push_back((state.version() - 1, members));
        Some(state.version())
    }
}

/// Where a gradient from a rank falls in the current step.
enum Claim {
    /// The rank's gradient is already in this step: it was pushed before the rank's
    /// connection failed, and the rank came back and pushed again. The first one stands.
    Had,
    /// A straggler's gradient for a step that completed without it: backup workers exist
    /// precisely so that it can be dropped.
    Late { staleness: u64 },
    /// The rank was already heard from in this step.
    Duplicate,
    /// Counts toward the current step.
    Current { staleness: u64 },
}

impl SyncSteps {
    fn claim(&self, state: &ShardState, rank: usize, base_version: u64) -> Claim {
        let staleness = state.version() - base_version;
        if staleness > 0 && self.backup_workers > 0 {
            Claim::Late { staleness }
        } else if self.contributed[rank] && !self.heard[rank] {
            Claim::Had
        } else if self.heard[rank] {
            Claim::Duplicate
        } else {
            // Without backups a gradient from behind (a worker that rejoined after a failure)
            // counts toward the current step: every active worker contributes once per step
            // to every shard, so no two shards can wait on each other.
            Claim::Current { staleness }
        }
    }
}

impl Consistency for SyncSteps {
    fn step_source(&self) -> StepSource {
        StepSource::Own { quorum: true }
    }

    fn push(
        &mut self,
        state: &mut ShardState,
        active: &[bool],
        grad: Checked<'_>,
    ) -> Result<PushOutcome, PushError> {
        let (meta, rank) = (grad.meta, grad.meta.rank);
        let staleness = match self.claim(state, rank, meta.base_version) {
            Claim::Late { staleness } => {
                state.count_stale();
                return Ok(PushOutcome::Dropped { staleness });
            }
            Claim::Duplicate => {
                state.count_refusal();
                return Err(PushError::DuplicatePush {
                    rank,
                    version: state.version(),
                });
            }
            Claim::Had => None,
            Claim::Current { staleness } => Some(staleness),
        };
        self.heard[rank] = true;
        if let Some(staleness) = staleness {
            self.sum.add(meta.samples, grad.values);
            self.contributed[rank] = true;
            state.record_applied(meta, staleness);
        }
        let staleness = staleness.unwrap_or(0);
        Ok(match self.try_complete(state, active) {
            Some(version) => PushOutcome::Applied { version, staleness },
            None => PushOutcome::Buffered {
                waiting_for: self.quorum(active).saturating_sub(self.heard_count(active)),
            },
        })
    }

    fn refused(&mut self, state: &mut ShardState, active: &[bool], from: Refused<'_>) -> bool {
        let rank = from.meta.rank;
        match self.claim(state, rank, from.meta.base_version) {
            Claim::Late { .. } | Claim::Duplicate => false,
            Claim::Had | Claim::Current { .. } => {
                self.heard[rank] = true;
                self.try_complete(state, active).is_some()
            }
        }
    }

    fn leave(&mut self, state: &mut ShardState, active: &[bool], rank: usize) -> bool {
        !self.heard.get(rank).copied().unwrap_or(true) && self.try_complete(state, active).is_some()
    }

    fn rejoin(&mut self, _state: &ShardState, rank: usize) {
        // A rejoining worker pulls first and pushes for the current step, so it is waited for
        // again (if its gradient is already in the step, that one stands: `Claim::Had`).
        if let Some(h) = self.heard.get_mut(rank) {
            *h = false;
        }
    }

    fn members_of(&self, step: u64) -> Option<&[bool]> {
        self.history
            .iter()
            .rev()
            .find(|(s, _)| *s == step)
            .map(|(_, m)| &m[..])
    }

    fn reset(&mut self) {
        self.sum.clear();
        self.heard.fill(false);
        self.contributed.fill(false);
        self.history.clear();
    }
}
