//! The consistency rules behind one interface: when a gradient is admitted, when a step is
//! complete, how it is combined, and when a waiting pull may return. A shard holds one
//! `Consistency`, chosen from its `Mode` by `for_mode`; adding a mode is one more module here
//! plus its arm in `for_mode` (and the mode's flag).

mod asynchronous;
mod bounded;
mod buffered;
mod follower;
mod step_sum;
mod sync;

pub use asynchronous::AsyncApply;
pub use bounded::BoundedStaleness;
pub use buffered::BufferedAsync;
pub use follower::CoordinatedFollower;
pub use step_sum::StepSum;
pub use sync::SyncSteps;

use crate::admission::{Checked, Refused};
pub use crate::admission::{StepSource, StepTag};
use crate::config::{Mode, ServerConfig};
use crate::error::PushError;
use crate::shard_state::{PushOutcome, ShardState};

/// A consistency rule. The admission gate (`crate::admission`) has already checked
/// everything about a gradient but what the rule's own bookkeeping decides (staleness,
/// duplicates, how far ahead a step may be).
pub trait Consistency: Send + std::fmt::Debug {
    /// What the gate checks a gradient's step and rank against.
    fn step_source(&self) -> StepSource;

    /// Admits, buffers or drops a checked gradient; applies the updates it completes. On
    /// `Err` (the rule's own refusal) the weights are unchanged.
    fn push(
        &mut self,
        state: &mut ShardState,
        active: &[bool],
        grad: Checked<'_>,
    ) -> Result<PushOutcome, PushError>;

    /// The gate refused a gradient for its values. A rule whose steps wait on ranks counts
    /// the rank as heard from for the step the gradient was for (so that a bad gradient
    /// cannot stall a barrier); returns whether that completed an update.
    fn refused(&mut self, state: &mut ShardState, active: &[bool], from: Refused<'_>) -> bool;

    /// `rank` has left the quorum (`active` already says so); returns whether that completed
    /// an update.
    fn leave(&mut self, state: &mut ShardState, active: &[bool], rank: usize) -> bool;

    /// `rank` is back in the quorum.
    fn rejoin(&mut self, _state: &ShardState, _rank: usize) {}

    /// Whether a waiting pull by `rank` for weights newer than `newer_than` may return now
    /// (the caller also releases it when the run is over).
    fn pull_ready(
        &self,
        state: &ShardState,
        _rank: Option<usize>,
        newer_than: Option<u64>,
    ) -> bool {
        newer_than.is_none_or(|v| state.version() > v)
    }

    /// The members of completed step `step`, for a shard that decides steps for the others.
    fn members_of(&self, _step: u64) -> Option<&[bool]> {
        None
    }

    /// Forgets any partial step (after the state was restored from a checkpoint).
    fn reset(&mut self) {}
}

/// The rule for shard `shard` of `shards` under `mode`.
pub fn for_mode(
    config: &ServerConfig,
    len: usize,
    shard: usize,
    shards: usize,
) -> Box<dyn Consistency> {
    let (mode, workers, aggregate) = (config.mode, config.workers, config.aggregate);
    let staleness_aware = config.staleness_aware_lr;
    match mode {
        Mode::Async { max_staleness } => Box::new(AsyncApply::new(max_staleness, staleness_aware)),
        Mode::Buffered { k, max_staleness } => Box::new(BufferedAsync::new(
            k,
            max_staleness,
            staleness_aware,
            aggregate,
            len,
        )),
        Mode::Ssp { max_lead } => Box::new(BoundedStaleness::new(
            workers,
            max_lead,
            aggregate,
            len,
            staleness_aware,
            config.max_updates,
        )),
        Mode::Sync { .. } if mode.coordinated(shards) && shard > 0 => {
            Box::new(CoordinatedFollower::new(workers, aggregate, len))
        }
        Mode::Sync { backup_workers } => {
            // This shard alone decides the steps: it may leave joiners to the next one.
            let alone = shards == 1 || mode.coordinated(shards);
            Box::new(SyncSteps::new(
                workers,
                backup_workers,
                aggregate,
                len,
                alone,
            ))
        }
    }
}
