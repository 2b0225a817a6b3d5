//! Async: every gradient is applied on arrival; one computed from weights more than
//! `max_staleness` updates old is dropped (the worker then pulls fresh weights). With the
//! staleness-aware rate, a gradient `s` updates old is applied at `lr / max(s, 1)`.

use super::{Consistency, StepSource};
use crate::admission::{Checked, Refused};
use crate::error::PushError;
use crate::shard_state::{PushOutcome, ShardState};

/// The staleness of a gradient from weights of `base_version`, or, past `bound`, the
/// outcome of dropping it (counted as stale). Async and buffered share the rule.
pub(super) fn staleness_within(
    state: &mut ShardState,
    base_version: u64,
    bound: Option<u64>,
) -> Result<u64, PushOutcome> {
    let staleness = state.version() - base_version;
    if bound.is_some_and(|b| staleness > b) {
        state.count_stale();
        return Err(PushOutcome::Dropped { staleness });
    }
    Ok(staleness)
}

#[derive(Debug, Clone)]
pub struct AsyncApply {
    max_staleness: Option<u64>,
    staleness_aware: bool,
}

impl AsyncApply {
    pub fn new(max_staleness: Option<u64>, staleness_aware: bool) -> Self {
        AsyncApply {
            max_staleness,
            staleness_aware,
        }
    }
}

impl Consistency for AsyncApply {
    fn step_source(&self) -> StepSource {
        StepSource::Own { quorum: false }
    }

    fn push(
        &mut self,
        state: &mut ShardState,
        _active: &[bool],
        grad: Checked<'_>,
    ) -> Result<PushOutcome, PushError> {
        let staleness = match staleness_within(state, grad.meta.base_version, self.max_staleness) {
            Ok(s) => s,
            Err(dropped) => return Ok(dropped),
        };
        let scale = if self.staleness_aware {
            1.0 / staleness.max(1) as f32
        } else {
            1.0
        };
        if !state.apply_scaled(grad.scaled(1.0), scale) {
            return Err(PushError::NonFiniteResult);
        }
        state.record_applied(grad.meta, staleness);
        Ok(PushOutcome::Applied {
            version: state.version(),
            staleness,
        })
    }

    fn refused(&mut self, _state: &mut ShardState, _active: &[bool], _from: Refused<'_>) -> bool {
        // Nobody waits for anybody: a refused gradient holds nothing up.
        false
    }

    fn leave(&mut self, _state: &mut ShardState, _active: &[bool], _rank: usize) -> bool {
        false
    }
}
