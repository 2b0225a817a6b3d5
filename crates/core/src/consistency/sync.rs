//! Sync: one update per step from the first `quorum - backup_workers` gradients of that step,
//! combined by `StepSum`; late gradients of a finished step are dropped when there are backup
//! workers. A shard 0 that coordinates other shards remembers each step's members.
//!
//! Where this shard alone decides the steps (one shard, or shard 0 coordinating the others),
//! a worker that joins (or rejoins) during a step is in the quorum from the next step: its
//! gradient for the current one counts (toward the quorum too) if it comes in time, but the
//! step does not wait for it, or with devices joining all the time no step would complete.
//! Shards that each decide their own steps (several, without backup workers) wait for every
//! active rank, so that every rank's gradients fall in the same step on each of them.

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
    /// Ranks that joined during this step, when the step does not wait for them.
    joined_late: Vec<bool>,
    /// Whether a rank that joins during a step is waited for only from the next.
    joiners_wait_next: bool,
    /// The members of the most recent completed steps, oldest first.
    history: VecDeque<(u64, Vec<bool>)>,
}

impl SyncSteps {
    pub fn new(
        workers: usize,
        backup_workers: usize,
        aggregate: Aggregate,
        len: usize,
        joiners_wait_next: bool,
    ) -> Self {
        SyncSteps {
            backup_workers,
            sum: StepSum::new(len, aggregate),
            heard: vec![false; workers],
            contributed: vec![false; workers],
            joined_late: vec![false; workers],
            joiners_wait_next,
            history: VecDeque::new(),
        }
    }

    /// The step's members (active ranks in the quorum since it began, and any that joined
    /// later but pushed to it) and how many of them were heard from.
    fn members_heard(&self, active: &[bool]) -> (usize, usize) {
        let mut counts = (0, 0);
        for (r, _) in active.iter().enumerate().filter(|(_, &a)| a) {
            if self.heard[r] {
                counts = (counts.0 + 1, counts.1 + 1);
            } else if !self.joined_late[r] {
                counts.0 += 1;
            }
        }
        counts
    }

    /// How many gradients complete a step: every member, less the backups.
    fn quorum(&self, members: usize) -> usize {
        members.saturating_sub(self.backup_workers).max(1)
    }

    /// Applies the step if enough ranks were heard from: the new version if it did, else how
    /// many gradients the step still waits for.
    fn try_complete(&mut self, state: &mut ShardState, active: &[bool]) -> Result<u64, usize> {
        let (members, heard) = self.members_heard(active);
        let quorum = self.quorum(members);
        if heard == 0 || heard < quorum {
            return Err(quorum.saturating_sub(heard));
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
        self.joined_late.fill(false);
        if self.history.len() == MEMBER_HISTORY {
            self.history.pop_front();
        }
        let members = std::mem::replace(&mut self.contributed, vec![false; self.heard.len()]);
        self.history.push_back((state.version() - 1, members));
        Ok(state.version())
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
            self.sum
                .add(meta.samples, grad.scaled(1.0), state.splitter());
            self.contributed[rank] = true;
            state.record_applied(meta, staleness);
        }
        let staleness = staleness.unwrap_or(0);
        Ok(match self.try_complete(state, active) {
            Ok(version) => PushOutcome::Applied { version, staleness },
            Err(waiting_for) => PushOutcome::Buffered { waiting_for },
        })
    }

    fn refused(&mut self, state: &mut ShardState, active: &[bool], from: Refused<'_>) -> bool {
        let rank = from.meta.rank;
        match self.claim(state, rank, from.meta.base_version) {
            Claim::Late { .. } | Claim::Duplicate => false,
            Claim::Had | Claim::Current { .. } => {
                self.heard[rank] = true;
                self.try_complete(state, active).is_ok()
            }
        }
    }

    fn leave(&mut self, state: &mut ShardState, active: &[bool], rank: usize) -> bool {
        !self.heard.get(rank).copied().unwrap_or(true) && self.try_complete(state, active).is_ok()
    }

    fn rejoin(&mut self, _state: &ShardState, rank: usize) {
        // A rejoining worker pulls first and pushes for the current step, so it is waited for
        // again (if its gradient is already in the step, that one stands: `Claim::Had`).
        if let Some(h) = self.heard.get_mut(rank) {
            *h = false;
        }
        if let Some(late) = self.joined_late.get_mut(rank) {
            *late = self.joiners_wait_next;
        }
    }

    fn pull_ready(&self, state: &ShardState, rank: Option<usize>, newer_than: Option<u64>) -> bool {
        // Where joiners are waited for only from the next step, a joiner's gradient from an
        // older version counts toward the step still open; its rank then waits for that
        // step, or its next gradient would land in the same one.
        let in_open_step = self.joiners_wait_next
            && rank.is_some_and(|r| self.heard.get(r).copied().unwrap_or(false));
        !in_open_step && newer_than.is_none_or(|v| state.version() > v)
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
        self.joined_late.fill(false);
        self.history.clear();
    }
}
