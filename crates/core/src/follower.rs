//! A follower shard's steps when shard 0 coordinates them: in sync mode with backup workers
//! over several shards, shard 0 decides which gradients make up step k (the first N-b to
//! arrive) and every other shard applies exactly those, so the shards never drift apart.
//!
//! Workers push to shard 0 first; once its step k is complete they push their slices to the
//! followers tagged with k and k's members. A follower collects each open step's gradients and
//! applies steps in order as they complete. A member that can no longer send (it left, or it
//! already pushed a later step) is no longer waited for.

use crate::config::Aggregate;
use crate::error::PushError;
use crate::server::{PushMeta, PushOutcome, ServerCore};
use std::collections::BTreeMap;

struct OpenStep {
    accum: Vec<f32>,
    weight: f64,
    /// Members (as shard 0 decided) this shard still expects a gradient from.
    expected: Vec<bool>,
    heard: Vec<bool>,
}

impl OpenStep {
    fn complete(&self) -> bool {
        self.expected
            .iter()
            .zip(&self.heard)
            .all(|(&e, &h)| !e || h)
    }

    fn missing(&self) -> usize {
        self.expected
            .iter()
            .zip(&self.heard)
            .filter(|(&e, &h)| e && !h)
            .count()
    }
}

/// The open steps of a follower shard; drives its `ServerCore` through `apply_step`.
#[derive(Default)]
pub struct StepFollower {
    open: BTreeMap<u64, OpenStep>,
}

impl StepFollower {
    pub fn new() -> Self {
        StepFollower::default()
    }

    /// Steps still waiting for gradients.
    pub fn open_steps(&self) -> usize {
        self.open.len()
    }

    /// Offers `meta.rank`'s gradient for shard 0's step `step`, whose members are `members`
    /// (one flag per worker). On `Err` nothing is accumulated, but the rank no longer holds
    /// the step up.
    pub fn push(
        &mut self,
        core: &mut ServerCore,
        meta: PushMeta,
        grad: &[f32],
        step: u64,
        members: &[bool],
    ) -> Result<PushOutcome, PushError> {
        let workers = core.config().workers;
        let rank = meta.rank;
        if rank >= workers {
            return Err(PushError::UnknownWorker { rank, workers });
        }
        if members.len() != workers {
            return Err(PushError::WrongMembers {
                expected: workers,
                got: members.len(),
            });
        }
        if !members[rank] {
            return Err(PushError::NotAMember { rank, step });
        }
        if grad.len() != core.params().len() {
            return Err(PushError::WrongLength {
                expected: core.params().len(),
                got: grad.len(),
            });
        }
        if core.is_done() {
            return Ok(PushOutcome::Done);
        }
        let version = core.version();
        if step < version {
            // Already applied, or lost to a restart from an older checkpoint.
            return Ok(PushOutcome::Dropped {
                staleness: version - step,
            });
        }
        // A rank that pushes step k will never send an earlier one.
        for (_, s) in self.open.range_mut(..step) {
            s.expected[rank] = false;
        }
        let len = core.params().len();
        let open = self.open.entry(step).or_insert_with(|| OpenStep {
            accum: vec![0.0; len],
            weight: 0.0,
            expected: members.to_vec(),
            heard: vec![false; workers],
        });
        if open.heard[rank] {
            return Err(PushError::DuplicatePush {
                rank,
                version: step,
            });
        }
        open.heard[rank] = true;
        let checked = core.check_gradient(meta, grad);
        if checked.is_ok() {
            let weight = match core.config().aggregate {
                Aggregate::Mean => meta.samples as f32,
                Aggregate::Sum => 1.0,
            };
            for (a, &g) in open.accum.iter_mut().zip(grad) {
                *a += weight * g;
            }
            open.weight += f64::from(weight);
            core.record_applied(meta, version.saturating_sub(meta.base_version));
        }
        let waiting_for = open.missing();
        self.apply_complete(core);
        checked?;
        Ok(if core.version() > step {
            PushOutcome::Applied {
                version: core.version(),
                staleness: version.saturating_sub(meta.base_version),
            }
        } else {
            PushOutcome::Buffered { waiting_for }
        })
    }

    /// `rank` left: no open step waits for it any more. Returns the new version if steps
    /// were applied.
    pub fn leave(&mut self, core: &mut ServerCore, rank: usize) -> Option<u64> {
        for s in self.open.values_mut() {
            if let Some(e) = s.expected.get_mut(rank) {
                *e = false;
            }
        }
        let before = core.version();
        self.apply_complete(core);
        (core.version() != before).then_some(core.version())
    }

    /// Applies complete steps in order, stopping at the first incomplete one.
    fn apply_complete(&mut self, core: &mut ServerCore) {
        while let Some(entry) = self.open.first_entry() {
            if !entry.get().complete() {
                break;
            }
            let (step, mut s) = entry.remove_entry();
            if step >= core.version() && !core.is_done() {
                core.apply_step(step, &mut s.accum, s.weight);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{Mode, ServerConfig};
    use crate::optimizer::OptimizerConfig;

    fn follower_core(workers: usize) -> ServerCore {
        let cfg = ServerConfig {
            mode: Mode::Sync { backup_workers: 1 },
            workers,
            optimizer: OptimizerConfig::sgd(1.0),
            ..Default::default()
        };
        ServerCore::new(cfg, vec![0.0; 2]).unwrap()
    }

    fn meta(rank: usize, base_version: u64) -> PushMeta {
        PushMeta {
            rank,
            base_version,
            samples: 1,
            loss: 0.5,
        }
    }

    const M01: [bool; 3] = [true, true, false];

    #[test]
    fn applies_exactly_the_members_of_each_step_in_order() {
        let mut core = follower_core(3);
        let mut f = StepFollower::new();
        assert_eq!(
            f.push(&mut core, meta(0, 0), &[2.0, 0.0], 0, &M01),
            Ok(PushOutcome::Buffered { waiting_for: 1 })
        );
        // Worker 2 was not a member of step 0: refused, nothing changes.
        assert_eq!(
            f.push(&mut core, meta(2, 0), &[9.0, 9.0], 0, &M01),
            Err(PushError::NotAMember { rank: 2, step: 0 })
        );
        // Step 1 arrives before step 0 is complete: kept, not applied out of order.
        let m12 = [false, true, true];
        assert_eq!(
            f.push(&mut core, meta(2, 0), &[0.0, 4.0], 1, &m12),
            Ok(PushOutcome::Buffered { waiting_for: 1 })
        );
        assert_eq!(core.version(), 0);
        assert_eq!(
            f.push(&mut core, meta(1, 0), &[0.0, 2.0], 0, &M01),
            Ok(PushOutcome::Applied {
                version: 1,
                staleness: 0
            })
        );
        // mean of [2,0] and [0,2], lr 1.
        assert_eq!(core.params(), &[-1.0, -1.0]);
        assert_eq!(
            f.push(&mut core, meta(1, 1), &[0.0, 0.0], 1, &m12),
            Ok(PushOutcome::Applied {
                version: 2,
                staleness: 0
            })
        );
        assert_eq!(core.params(), &[-1.0, -3.0]);
        assert_eq!(f.open_steps(), 0);
        // A late copy of a step already applied is dropped.
        assert_eq!(
            f.push(&mut core, meta(0, 0), &[1.0, 1.0], 0, &M01),
            Ok(PushOutcome::Dropped { staleness: 2 })
        );
    }

    #[test]
    fn a_member_that_leaves_or_moves_on_is_not_waited_for() {
        let mut core = follower_core(3);
        let mut f = StepFollower::new();
        f.push(&mut core, meta(0, 0), &[2.0, 2.0], 0, &M01).unwrap();
        assert_eq!(f.leave(&mut core, 1), Some(1));
        assert_eq!(core.params(), &[-2.0, -2.0]);
        // Rank 0 pushes step 2 while step 1 waits for it and rank 1: it will never send
        // step 1, so only rank 1 is waited for there.
        f.push(&mut core, meta(1, 1), &[1.0, 1.0], 1, &[true, true, false])
            .unwrap();
        assert_eq!(core.version(), 1);
        f.push(&mut core, meta(0, 1), &[1.0, 1.0], 2, &[true, false, true])
            .unwrap();
        assert_eq!(core.version(), 2, "step 1 applied with rank 1 alone");
    }

    #[test]
    fn after_a_restart_the_follower_takes_up_shard_0s_numbering() {
        let mut core = follower_core(2);
        let mut f = StepFollower::new();
        // Restored at version 3, shard 0 is at step 7: the follower jumps to 8.
        let mut state = core.state();
        state.version = 3;
        core.restore(&state).unwrap();
        let both = [true, true];
        f.push(&mut core, meta(0, 3), &[1.0, 0.0], 7, &both)
            .unwrap();
        f.push(&mut core, meta(1, 3), &[1.0, 0.0], 7, &both)
            .unwrap();
        assert_eq!(core.version(), 8);
    }

    #[test]
    fn bad_gradients_are_refused_without_stalling_the_step() {
        let mut core = follower_core(3);
        let mut f = StepFollower::new();
        assert!(matches!(
            f.push(&mut core, meta(0, 0), &[f32::NAN, 0.0], 0, &M01),
            Err(PushError::NonFinite { .. })
        ));
        f.push(&mut core, meta(1, 0), &[0.0, 3.0], 0, &M01).unwrap();
        assert_eq!(core.version(), 1);
        assert_eq!(core.params(), &[0.0, -3.0]);
        assert_eq!(
            f.push(&mut core, meta(0, 1), &[1.0], 1, &M01),
            Err(PushError::WrongLength {
                expected: 2,
                got: 1
            })
        );
        assert_eq!(
            f.push(&mut core, meta(0, 1), &[1.0, 1.0], 1, &[true]),
            Err(PushError::WrongMembers {
                expected: 3,
                got: 1
            })
        );
    }
}
