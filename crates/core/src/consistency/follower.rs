//! A follower shard's steps when shard 0 coordinates them: in sync mode with backup workers
//! over several shards, shard 0 decides which gradients make up step k (the first N-b to
//! arrive) and every other shard applies exactly those, so the shards never drift apart.
//!
//! Workers push to shard 0 first; once its step k is complete they push their slices to the
//! followers tagged with k and k's members. A follower collects each open step's gradients and
//! applies steps in order as they complete. A member that can no longer send (it left, or it
//! already pushed a later step) is no longer waited for.
//!
//! A member that departed owes no slice until it pushes one again: its connection is gone, so
//! a step shard 0 admitted it into before it left is never sent here by it, even if the step
//! opens here only later (another member's slice still on its way) and even if the rank has
//! rejoined meanwhile (a reconnected or replaced worker pushes only steps it is admitted to
//! afresh). Such a step is applied without that member's slice; waiting for it would stall
//! every worker at this shard's gate. The price: the first step of a rejoined rank can be
//! applied here before its slice arrives, which is then dropped as late.
//!
//! A step past the follower's version (a jump: after a restart from an older checkpoint, or
//! when every member of a step vanished) is applied only once two ranks (or every active
//! one, if fewer) have pushed steps that far: the step number and members come from the
//! pushing worker, so no single push of a token holder moves a follower more than one step
//! or ends the run.

use super::{Consistency, StepSource, StepSum, StepTag};
use crate::admission::{Checked, Refused};
use crate::config::Aggregate;
use crate::error::PushError;
use crate::shard_state::{PushOutcome, ShardState};
use std::collections::BTreeMap;

/// How far ahead of its version a follower takes a step (and so how many updates a
/// restarted follower may have lost and still catch up).
pub const STEP_WINDOW: u64 = 1 << 16;

#[derive(Debug, Clone)]
struct OpenStep {
    sum: StepSum,
    /// Members (as shard 0 decided) this shard still expects a gradient from.
    expected: Vec<bool>,
    heard: Vec<bool>,
}

impl OpenStep {
    fn missing(&self) -> usize {
        self.expected
            .iter()
            .zip(&self.heard)
            .filter(|(&e, &h)| e && !h)
            .count()
    }
}

#[derive(Debug, Clone)]
pub struct CoordinatedFollower {
    workers: usize,
    aggregate: Aggregate,
    len: usize,
    open: BTreeMap<u64, OpenStep>,
    /// Per rank, the furthest step it has pushed (the evidence a jump needs).
    furthest: Vec<Option<u64>>,
    /// Ranks that departed and have not pushed here since: steps opened now do not wait
    /// for them.
    gone: Vec<bool>,
}

impl CoordinatedFollower {
    pub fn new(workers: usize, aggregate: Aggregate, len: usize) -> Self {
        CoordinatedFollower {
            workers,
            aggregate,
            len,
            open: BTreeMap::new(),
            furthest: vec![None; workers],
            gone: vec![false; workers],
        }
    }

    /// Applies complete steps in order, stopping at the first incomplete one, or at a jump
    /// that too few ranks vouch for.
    fn apply_complete(&mut self, state: &mut ShardState, active: &[bool]) {
        let vouchers_needed = active.iter().filter(|&&a| a).count().clamp(1, 2);
        while let Some(entry) = self.open.first_entry() {
            let step = *entry.key();
            if entry.get().missing() > 0 {
                break;
            }
            // Counted only for a jump: in-order steps, the common case, need no voucher.
            if step > state.version() && vouchers(&self.furthest, step, active) < vouchers_needed {
                break;
            }
            let (step, mut s) = entry.remove_entry();
            if step >= state.version() {
                state.apply_step(step, s.sum.combined());
            }
        }
    }
}

/// Active ranks whose furthest pushed step is `step` or later.
fn vouchers(furthest: &[Option<u64>], step: u64, active: &[bool]) -> usize {
    furthest
        .iter()
        .zip(active)
        .filter(|(f, &a)| a && f.is_some_and(|f| f >= step))
        .count()
}

/// Where a tagged gradient falls.
enum Claim {
    /// Its step is open and this rank had not been heard from in it: now it has.
    Open { step: u64 },
    /// Its step was already applied, or lost to a restart from an older checkpoint.
    Past { staleness: u64 },
}

impl CoordinatedFollower {
    /// Finds (or opens) the tagged step and marks `rank` heard in it. The gate checked that
    /// the members have one flag per worker and name `rank`.
    fn claim(
        &mut self,
        state: &ShardState,
        rank: usize,
        tag: StepTag<'_>,
    ) -> Result<Claim, PushError> {
        let (step, version) = (tag.step, state.version());
        if step > version.saturating_add(STEP_WINDOW) {
            // Far-future steps are never shard 0's (it is at most a checkpoint interval
            // ahead after a restart): one push must not end the run by jumping the version.
            return Err(PushError::StepTooFar { step, version });
        }
        if step < version {
            return Ok(Claim::Past {
                staleness: version - step,
            });
        }
        // A live connection pushes every step it is admitted to from now on.
        self.gone[rank] = false;
        let furthest = &mut self.furthest[rank];
        *furthest = Some(furthest.map_or(step, |f| f.max(step)));
        // A rank that pushes step k will never send an earlier one.
        for (_, s) in self.open.range_mut(..step) {
            s.expected[rank] = false;
        }
        let (workers, aggregate, len) = (self.workers, self.aggregate, self.len);
        let (gone, furthest) = (&self.gone, &self.furthest);
        let open = self.open.entry(step).or_insert_with(|| OpenStep {
            sum: StepSum::new(len, aggregate),
            // Nor is a member waited for that is gone, or that already pushed a later step.
            expected: (0..workers)
                .map(|r| tag.members[r] && !gone[r] && furthest[r].is_none_or(|f| f < step))
                .collect(),
            heard: vec![false; workers],
        });
        if open.heard[rank] {
            return Err(PushError::DuplicatePush {
                rank,
                version: step,
            });
        }
        open.heard[rank] = true;
        Ok(Claim::Open { step })
    }
}

impl Consistency for CoordinatedFollower {
    fn step_source(&self) -> StepSource {
        StepSource::ShardZero
    }

    fn push(
        &mut self,
        state: &mut ShardState,
        active: &[bool],
        grad: Checked<'_>,
    ) -> Result<PushOutcome, PushError> {
        let (meta, rank) = (grad.meta, grad.meta.rank);
        let Some(tag) = grad.tag else {
            // The gate lets no untagged gradient through to a follower.
            state.count_refusal();
            return Err(PushError::NotAMember { rank, step: None });
        };
        let step = match self.claim(state, rank, tag) {
            Ok(Claim::Open { step }) => step,
            Ok(Claim::Past { staleness }) => return Ok(PushOutcome::Dropped { staleness }),
            Err(e) => {
                state.count_refusal();
                return Err(e);
            }
        };
        let staleness = state.version().saturating_sub(meta.base_version);
        let waiting_for = match self.open.get_mut(&step) {
            Some(open) => {
                open.sum
                    .add(meta.samples, grad.scaled(1.0), state.splitter());
                open.missing()
            }
            None => 0,
        };
        state.record_applied(meta, staleness);
        self.apply_complete(state, active);
        Ok(if state.version() > step {
            PushOutcome::Applied {
                version: state.version(),
                staleness,
            }
        } else {
            PushOutcome::Buffered { waiting_for }
        })
    }

    fn refused(&mut self, state: &mut ShardState, active: &[bool], from: Refused<'_>) -> bool {
        let Some(tag) = from.tag else {
            return false;
        };
        let before = state.version();
        if let Ok(Claim::Open { .. }) = self.claim(state, from.meta.rank, tag) {
            self.apply_complete(state, active);
        }
        state.version() != before
    }

    fn leave(&mut self, state: &mut ShardState, active: &[bool], rank: usize) -> bool {
        if let Some(g) = self.gone.get_mut(rank) {
            *g = true;
        }
        for s in self.open.values_mut() {
            if let Some(e) = s.expected.get_mut(rank) {
                *e = false;
            }
        }
        let before = state.version();
        self.apply_complete(state, active);
        state.version() != before
    }

    fn reset(&mut self) {
        self.open.clear();
        self.furthest.fill(None);
        self.gone.fill(false);
    }
}

#[cfg(test)]
mod tests {
    use crate::config::{Mode, ServerConfig};
    use crate::error::PushError;
    use crate::optimizer::OptimizerConfig;
    use crate::server::ServerCore;
    use crate::shard_state::{PushMeta, PushOutcome};

    /// Shard 1 of 2 in sync mode with a backup worker: a follower.
    fn follower_core(workers: usize) -> ServerCore {
        let cfg = ServerConfig {
            mode: Mode::Sync { backup_workers: 1 },
            workers,
            optimizer: OptimizerConfig::sgd(1.0),
            ..Default::default()
        };
        ServerCore::for_shard(cfg, vec![0.0; 2], 1, 2).unwrap()
    }

    fn meta(rank: usize, base_version: u64) -> PushMeta {
        PushMeta {
            rank,
            base_version,
            samples: 1,
            loss: 0.5,
            accumulated: false,
        }
    }

    const M01: [bool; 3] = [true, true, false];

    #[test]
    fn applies_exactly_the_members_of_each_step_in_order() {
        let mut core = follower_core(3);
        assert_eq!(
            core.push_step(meta(0, 0), &[2.0, 0.0], 0, &M01),
            Ok(PushOutcome::Buffered { waiting_for: 1 })
        );
        // Worker 2 was not a member of step 0: refused, nothing changes.
        assert_eq!(
            core.push_step(meta(2, 0), &[9.0, 9.0], 0, &M01),
            Err(PushError::NotAMember {
                rank: 2,
                step: Some(0)
            })
        );
        // Step 1 arrives before step 0 is complete: kept, not applied out of order.
        let m12 = [false, true, true];
        assert_eq!(
            core.push_step(meta(2, 0), &[0.0, 4.0], 1, &m12),
            Ok(PushOutcome::Buffered { waiting_for: 1 })
        );
        assert_eq!(core.version(), 0);
        assert_eq!(
            core.push_step(meta(1, 0), &[0.0, 2.0], 0, &M01),
            Ok(PushOutcome::Applied {
                version: 1,
                staleness: 0
            })
        );
        // mean of [2,0] and [0,2], lr 1.
        assert_eq!(core.params(), &[-1.0, -1.0]);
        assert_eq!(
            core.push_step(meta(1, 1), &[0.0, 0.0], 1, &m12),
            Ok(PushOutcome::Applied {
                version: 2,
                staleness: 0
            })
        );
        assert_eq!(core.params(), &[-1.0, -3.0]);
        // A late copy of a step already applied is dropped.
        assert_eq!(
            core.push_step(meta(0, 0), &[1.0, 1.0], 0, &M01),
            Ok(PushOutcome::Dropped { staleness: 2 })
        );
        // A push without a step is refused by a follower.
        assert_eq!(
            core.push(meta(0, 2), &[1.0, 1.0]),
            Err(PushError::NotAMember {
                rank: 0,
                step: None
            })
        );
    }

    #[test]
    fn a_member_that_leaves_or_moves_on_is_not_waited_for() {
        let mut core = follower_core(3);
        core.push_step(meta(0, 0), &[2.0, 2.0], 0, &M01).unwrap();
        assert_eq!(core.leave(1), Some(1));
        assert_eq!(core.params(), &[-2.0, -2.0]);
        // Rank 0 pushes step 2 while step 1 waits for it and rank 1: it will never send
        // step 1, so only rank 1 is waited for there.
        core.rejoin(1);
        core.push_step(meta(1, 1), &[1.0, 1.0], 1, &[true, true, false])
            .unwrap();
        assert_eq!(core.version(), 1);
        core.push_step(meta(0, 1), &[1.0, 1.0], 2, &[true, false, true])
            .unwrap();
        assert_eq!(core.version(), 2, "step 1 applied with rank 1 alone");
    }

    #[test]
    fn a_member_that_left_before_its_step_opened_here_is_not_waited_for() {
        let mut core = follower_core(3);
        // Shard 0 made step 0 of ranks 0 and 1; rank 1 vanished before sending its slice
        // here and came back: its new connection will not send step 0.
        assert_eq!(core.leave(1), None);
        core.rejoin(1);
        assert_eq!(
            core.push_step(meta(0, 0), &[2.0, 0.0], 0, &M01),
            Ok(PushOutcome::Applied {
                version: 1,
                staleness: 0
            })
        );
        assert_eq!(core.params(), &[-2.0, 0.0]);
        // Once it pushes again it is waited for as before.
        let m12 = [false, true, true];
        assert_eq!(
            core.push_step(meta(1, 1), &[0.0, 2.0], 1, &m12),
            Ok(PushOutcome::Buffered { waiting_for: 1 })
        );
        assert_eq!(
            core.push_step(meta(2, 1), &[0.0, 4.0], 1, &m12),
            Ok(PushOutcome::Applied {
                version: 2,
                staleness: 0
            })
        );
        assert_eq!(core.params(), &[-2.0, -3.0]);
    }

    #[test]
    fn after_a_restart_the_follower_takes_up_shard_0s_numbering() {
        let mut core = follower_core(2);
        // Restored at version 3, shard 0 is at step 7: the follower jumps to 8.
        let mut state = core.state();
        state.version = 3;
        core.restore(&state).unwrap();
        let both = [true, true];
        core.push_step(meta(0, 3), &[1.0, 0.0], 7, &both).unwrap();
        core.push_step(meta(1, 3), &[1.0, 0.0], 7, &both).unwrap();
        assert_eq!(core.version(), 8);
    }

    #[test]
    fn a_far_future_step_is_refused() {
        let mut core = follower_core(3);
        assert_eq!(
            core.push_step(meta(0, 0), &[1.0, 1.0], u64::MAX - 1, &M01),
            Err(PushError::StepTooFar {
                step: u64::MAX - 1,
                version: 0
            })
        );
        assert_eq!(core.version(), 0);
    }

    #[test]
    fn bad_gradients_are_refused_without_stalling_the_step() {
        let mut core = follower_core(3);
        assert!(matches!(
            core.push_step(meta(0, 0), &[f32::NAN, 0.0], 0, &M01),
            Err(PushError::NonFinite { .. })
        ));
        core.push_step(meta(1, 0), &[0.0, 3.0], 0, &M01).unwrap();
        assert_eq!(core.version(), 1);
        assert_eq!(core.params(), &[0.0, -3.0]);
        assert_eq!(
            core.push_step(meta(0, 1), &[1.0], 1, &M01),
            Err(PushError::WrongLength {
                expected: 2,
                got: 1
            })
        );
        assert_eq!(
            core.push_step(meta(0, 1), &[1.0, 1.0], 1, &[true]),
            Err(PushError::WrongMembers {
                expected: 3,
                got: 1
            })
        );
    }
}
