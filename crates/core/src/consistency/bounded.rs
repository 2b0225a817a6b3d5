//! Stale synchronous parallel (SSP, Ho et al. 2013): sync steps, but a worker may run up to
//! `max_lead` steps ahead of the slowest live worker. Each worker has a clock (the step its
//! next gradient is for); step `c`'s update is the combination of every active worker's
//! clock-`c` gradient, applied in step order as in sync. A worker whose clock is more than
//! `max_lead` steps past the shard's version waits at the pull gate; in between it computes
//! on the weights it has (at most `max_lead` updates old). `max_lead = 0` is sync, update for
//! update and bit for bit.

use super::{Consistency, StepSource, StepSum};
use crate::admission::{Checked, Refused};
use crate::config::Aggregate;
use crate::error::PushError;
use crate::shard_state::{PushOutcome, ShardState};
use std::collections::VecDeque;

/// One step not yet applied: its gradients so far.
#[derive(Debug, Clone)]
struct PendingStep {
    sum: StepSum,
    /// Which ranks have been heard from for this step (contributed, dropped or refused).
    heard: Vec<bool>,
    /// Staleness of the gradients summed, for the staleness-aware rate.
    staleness_sum: u64,
    contributions: u64,
}

impl PendingStep {
    fn new(workers: usize, len: usize, aggregate: Aggregate) -> Self {
        PendingStep {
            sum: StepSum::new(len, aggregate),
            heard: vec![false; workers],
            staleness_sum: 0,
            contributions: 0,
        }
    }

    fn clear(&mut self) {
        self.sum.clear();
        self.heard.fill(false);
        self.staleness_sum = 0;
        self.contributions = 0;
    }

    /// Every rank step `step` waits for has been heard from, and some rank is active (a
    /// step that every active rank joined after waits for none of them).
    fn complete(&self, step: u64, active: &[bool], first_step: &[u64]) -> bool {
        let mut any = false;
        for (r, (&h, &a)) in self.heard.iter().zip(active).enumerate() {
            if a && first_step[r] <= step && !h {
                return false;
            }
            any |= a;
        }
        any
    }

    fn waiting_for(&self, step: u64, active: &[bool], first_step: &[u64]) -> usize {
        (0..active.len())
            .filter(|&r| active[r] && first_step[r] <= step && !self.heard[r])
            .count()
    }
}

#[derive(Debug, Clone)]
pub struct BoundedStaleness {
    max_lead: u64,
    staleness_aware: bool,
    /// The run's update budget: steps beyond it are never applied.
    max_updates: Option<u64>,
    aggregate: Aggregate,
    len: usize,
    /// Per rank: the step its next gradient is for.
    clock: Vec<u64>,
    /// Per rank: the first step that waits for it (a rank that joins during a step is in
    /// the quorum from the next one, so devices joining all the time cannot stall the front).
    first_step: Vec<u64>,
    /// Steps `version, version + 1, ...` that have gradients, oldest first.
    window: VecDeque<PendingStep>,
    /// Cleared steps kept for reuse (a step's sum is as large as the shard).
    spare: Vec<PendingStep>,
}

impl BoundedStaleness {
    pub fn new(
        workers: usize,
        max_lead: u64,
        aggregate: Aggregate,
        len: usize,
        staleness_aware: bool,
        max_updates: Option<u64>,
    ) -> Self {
        BoundedStaleness {
            max_lead,
            staleness_aware,
            max_updates,
            aggregate,
            len,
            clock: vec![0; workers],
            first_step: vec![0; workers],
            window: VecDeque::new(),
            spare: Vec::new(),
        }
    }

    /// The rank's next step, never behind the shard (a rank that was away catches up).
    fn clock_of(&self, state: &ShardState, rank: usize) -> u64 {
        self.clock[rank].max(state.version())
    }

    /// The pending step `step` (which must be within the window), created if new.
    fn step_mut(&mut self, state: &ShardState, step: u64) -> &mut PendingStep {
        let index = (step - state.version()) as usize;
        while self.window.len() <= index {
            let workers = self.clock.len();
            let fresh = self
                .spare
                .pop()
                .unwrap_or_else(|| PendingStep::new(workers, self.len, self.aggregate));
            self.window.push_back(fresh);
        }
        &mut self.window[index]
    }

    /// Applies every complete step at the front of the window, in order; returns whether
    /// any was applied.
    fn apply_complete(&mut self, state: &mut ShardState, active: &[bool]) -> bool {
        let mut any = false;
        while self
            .window
            .front()
            .is_some_and(|s| s.complete(state.version(), active, &self.first_step))
            && self.max_updates.is_none_or(|max| state.version() < max)
        {
            let Some(mut step) = self.window.pop_front() else {
                break;
            };
            let scale = if self.staleness_aware && step.contributions > 0 {
                let mean = step.staleness_sum as f64 / step.contributions as f64;
                (1.0 / mean.max(1.0)) as f32
            } else {
                1.0
            };
            // A step whose every gradient was refused, or whose update was rolled back, still
            // ends, so no worker waits forever.
            let applied = step
                .sum
                .combined()
                .is_some_and(|update| state.apply_scaled(update, scale));
            if !applied {
                state.skip_step();
            }
            step.clear();
            self.spare.push(step);
            any = true;
        }
        any
    }
}

impl BoundedStaleness {
    /// Moves `rank`'s clock past the step its gradient is for and returns where the gradient
    /// falls; refuses a step more than `max_lead` past the shard's version (only a worker that
    /// skipped the pull gate gets there).
    fn claim(
        &mut self,
        state: &mut ShardState,
        rank: usize,
        base_version: u64,
    ) -> Result<Claim, PushError> {
        let version = state.version();
        let step = self.clock_of(state, rank);
        if step - version > self.max_lead {
            return Err(PushError::StepTooFar { step, version });
        }
        self.clock[rank] = step + 1;
        state.record_lead(rank, step - version);
        // The gate checked base <= version <= step.
        let staleness = step - base_version;
        let index = (step - version) as usize;
        if self.window.get(index).is_some_and(|s| s.heard[rank]) {
            return Ok(Claim::Had { staleness });
        }
        Ok(Claim::Step { step, staleness })
    }
}

/// Where a rank's gradient falls.
enum Claim {
    /// Step `step` has not heard from the rank yet.
    Step { step: u64, staleness: u64 },
    /// The rank's step already holds a gradient of its: it reconnected after pushing ahead
    /// (see `rejoin`), and its earlier gradient stands.
    Had { staleness: u64 },
}

impl Consistency for BoundedStaleness {
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
        let (step, staleness) = match self.claim(state, rank, meta.base_version) {
            Ok(Claim::Step { step, staleness }) => (step, staleness),
            Ok(Claim::Had { staleness }) => {
                state.count_stale();
                return Ok(PushOutcome::Dropped { staleness });
            }
            Err(e) => {
                state.count_refusal();
                return Err(e);
            }
        };
        // A gradient computed from weights older than the bound allows (a worker that did not
        // pull) is dropped; either way the rank counts as heard for its step, so the step is
        // not held up.
        let summed = staleness <= self.max_lead;
        let pending = self.step_mut(state, step);
        pending.heard[rank] = true;
        if summed {
            pending
                .sum
                .add(meta.samples, grad.scaled(1.0), state.splitter());
            pending.staleness_sum += staleness;
            pending.contributions += 1;
            state.record_applied(meta, staleness);
        } else {
            state.count_stale();
        }
        let applied = self.apply_complete(state, active);
        Ok(match summed {
            false => PushOutcome::Dropped { staleness },
            true if applied => PushOutcome::Applied {
                version: state.version(),
                staleness,
            },
            true => PushOutcome::Buffered {
                waiting_for: self.window.front().map_or(0, |s| {
                    s.waiting_for(state.version(), active, &self.first_step)
                }),
            },
        })
    }

    fn refused(&mut self, state: &mut ShardState, active: &[bool], from: Refused<'_>) -> bool {
        let rank = from.meta.rank;
        let Ok(Claim::Step { step, .. }) = self.claim(state, rank, from.meta.base_version) else {
            return false;
        };
        self.step_mut(state, step).heard[rank] = true;
        self.apply_complete(state, active)
    }

    fn leave(&mut self, state: &mut ShardState, active: &[bool], _rank: usize) -> bool {
        self.apply_complete(state, active)
    }

    fn rejoin(&mut self, state: &ShardState, rank: usize) {
        // A rank that comes back starts at the step after the current one, whatever lead it
        // had: over several shards a lost push leaves its clocks apart (ahead where the push
        // arrived), and a lead kept at one shard while it is the slowest at another can hold
        // every worker at the gates for good. The current step does not wait for it (nor, with
        // devices joining all the time, could it ever complete). Steps it already pushed to
        // keep that gradient; its next pushes there are dropped (`Claim::Had`).
        if rank < self.clock.len() {
            let next = state.version() + 1;
            self.clock[rank] = next;
            self.first_step[rank] = next;
        }
    }

    fn pull_ready(&self, state: &ShardState, rank: Option<usize>, newer_than: Option<u64>) -> bool {
        match rank {
            // The worker may compute its next step once the slowest is within the bound.
            Some(r) if r < self.clock.len() => {
                state.version().saturating_add(self.max_lead) >= self.clock_of(state, r)
            }
            _ => newer_than.is_none_or(|v| state.version() > v),
        }
    }

    fn reset(&mut self) {
        while let Some(mut step) = self.window.pop_front() {
            step.clear();
            self.spare.push(step);
        }
        self.clock.fill(0);
        self.first_step.fill(0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{Mode, ServerConfig};
    use crate::optimizer::OptimizerConfig;
    use crate::server::{PushMeta, ServerCore};

    fn core(mode: Mode, workers: usize, len: usize) -> ServerCore {
        let cfg = ServerConfig {
            mode,
            workers,
            optimizer: OptimizerConfig::adam(1e-2),
            ..Default::default()
        };
        ServerCore::new(cfg, vec![0.5; len]).unwrap()
    }

    fn meta(rank: usize, base_version: u64) -> PushMeta {
        PushMeta {
            rank,
            base_version,
            samples: 8 + rank as u32,
            loss: 1.0,
            accumulated: false,
        }
    }

    fn grad(rank: usize, step: u64, len: usize) -> Vec<f32> {
        (0..len)
            .map(|i| ((i as f32 + 1.0) * (rank as f32 + 0.5) * (step as f32 + 0.25)).sin())
            .collect()
    }

    #[test]
    fn lead_zero_is_sync_bit_for_bit() {
        let (workers, len) = (3, 17);
        let mut sync = core(Mode::Sync { backup_workers: 0 }, workers, len);
        let mut ssp = core(Mode::Ssp { max_lead: 0 }, workers, len);
        for step in 0..20u64 {
            // Arrival order varies from step to step, the same for both.
            for k in 0..workers {
                let rank = (k + step as usize) % workers;
                let g = grad(rank, step, len);
                let a = sync.push(meta(rank, step), &g).unwrap();
                let b = ssp.push(meta(rank, step), &g).unwrap();
                assert_eq!(a, b, "step {step} rank {rank}");
            }
        }
        assert_eq!(sync.version(), 20);
        let bits = |c: &ServerCore| c.params().iter().map(|p| p.to_bits()).collect::<Vec<_>>();
        assert_eq!(bits(&sync), bits(&ssp));
    }

    #[test]
    fn a_worker_runs_at_most_max_lead_steps_ahead() {
        let mut ssp = core(Mode::Ssp { max_lead: 2 }, 2, 4);
        // Rank 0 computes on the weights of version 0 for steps 0, 1, 2; the gate then shuts.
        for step in 0..3 {
            assert!(ssp.pull_ready(Some(0), Some(0)), "step {step}");
            assert!(matches!(
                ssp.push(meta(0, 0), &[0.1; 4]),
                Ok(PushOutcome::Buffered { .. })
            ));
        }
        assert!(!ssp.pull_ready(Some(0), Some(0)));
        assert!(matches!(
            ssp.push(meta(0, 0), &[0.1; 4]),
            Err(PushError::StepTooFar {
                step: 3,
                version: 0
            })
        ));
        // The slow rank's first gradient completes step 0 and opens the gate for one more.
        assert!(matches!(
            ssp.push(meta(1, 0), &[0.1; 4]),
            Ok(PushOutcome::Applied { version: 1, .. })
        ));
        assert!(ssp.pull_ready(Some(0), Some(0)));
        let leads: Vec<u64> = ssp.worker_stats().iter().map(|w| w.max_lead).collect();
        assert_eq!(leads, vec![2, 0]);
        assert_eq!(ssp.stats().staleness_max, 2);
    }

    #[test]
    fn a_departed_worker_does_not_hold_up_the_others() {
        let mut ssp = core(Mode::Ssp { max_lead: 1 }, 2, 4);
        for _ in 0..2 {
            ssp.push(meta(0, 0), &[0.1; 4]).unwrap();
        }
        assert!(!ssp.pull_ready(Some(0), Some(0)));
        assert_eq!(ssp.leave(1), Some(2), "both waiting steps complete");
        assert!(ssp.pull_ready(Some(0), Some(0)));
        assert!(matches!(
            ssp.push(meta(0, 2), &[0.1; 4]),
            Ok(PushOutcome::Applied { version: 3, .. })
        ));
        // A new holder of rank 1 is waited for from the next step on: step 3 completes with
        // rank 0 alone, step 4 waits for both.
        ssp.rejoin(1);
        assert!(matches!(
            ssp.push(meta(0, 3), &[0.1; 4]),
            Ok(PushOutcome::Applied { version: 4, .. })
        ));
        assert_eq!(
            ssp.push(meta(1, 4), &[0.1; 4]),
            Ok(PushOutcome::Buffered { waiting_for: 1 })
        );
        assert!(matches!(
            ssp.push(meta(0, 4), &[0.1; 4]),
            Ok(PushOutcome::Applied { version: 5, .. })
        ));
    }

    #[test]
    fn a_gradient_older_than_the_bound_is_dropped_but_counts_for_its_step() {
        let mut ssp = core(Mode::Ssp { max_lead: 1 }, 2, 4);
        for step in 0..3u64 {
            ssp.push(meta(0, step), &[0.1; 4]).unwrap();
            ssp.push(meta(1, step), &[0.1; 4]).unwrap();
        }
        assert_eq!(ssp.version(), 3);
        assert_eq!(
            ssp.push(meta(0, 1), &[0.1; 4]),
            Ok(PushOutcome::Dropped { staleness: 2 })
        );
        assert!(matches!(
            ssp.push(meta(1, 3), &[0.1; 4]),
            Ok(PushOutcome::Applied { version: 4, .. })
        ));
        assert_eq!(ssp.stats().dropped_stale, 1);
    }

    #[test]
    fn steps_pending_at_the_budget_are_not_applied() {
        let cfg = ServerConfig {
            mode: Mode::Ssp { max_lead: 3 },
            workers: 2,
            max_updates: Some(2),
            ..Default::default()
        };
        let mut ssp = ServerCore::new(cfg, vec![0.5; 4]).unwrap();
        for _ in 0..4 {
            ssp.push(meta(0, 0), &[0.1; 4]).unwrap();
        }
        ssp.leave(1);
        assert_eq!(ssp.version(), 2);
        assert!(ssp.is_done());
    }
}
