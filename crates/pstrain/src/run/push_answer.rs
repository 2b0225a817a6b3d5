//! What a worker does with the shards' answer to its push: go on, end (the run is over, or a
//! failure), or give up because its training diverged.

use crate::run::worker::{WorkerError, WorkerReport};
use pstrain_core::client::ClientError;
use pstrain_core::{PushError, PushOutcome};

/// A worker whose gradients are refused as non-finite this many times in a row, none applied
/// in between, gives up: one such gradient (an overflow on one batch) the worker steps past on
/// fresh weights, but a run whose weights are past where the loss is finite would go on
/// computing refused gradients until its budget ran out, and end as if it had trained.
pub const DIVERGED_AFTER: u32 = 20;

/// Whether the worker goes on after the shards' answer to its push (false: the run is
/// over), counting a gradient that was not applied.
pub(crate) fn goes_on(
    answer: Result<PushOutcome, ClientError>,
    report: &mut WorkerReport,
) -> Result<bool, WorkerError> {
    let rank = report.rank;
    if !continues(&answer) {
        return answer
            .map(|_| false)
            .map_err(|source| WorkerError::Client { rank, source });
    }
    match answer {
        Ok(PushOutcome::Applied { .. } | PushOutcome::Buffered { .. }) => {
            report.refused_in_a_row = 0;
        }
        Err(_) => {
            report.not_applied += 1;
            report.refused_in_a_row += 1;
            if report.refused_in_a_row >= DIVERGED_AFTER {
                return Err(WorkerError::Diverged {
                    rank,
                    in_a_row: report.refused_in_a_row,
                    last_loss: report.last_loss,
                });
            }
        }
        Ok(_) => report.not_applied += 1,
    }
    Ok(true)
}

/// Whether a push's answer lets the worker go on: anything but the run's end or a failure;
/// a gradient the shards did not take (stale, late, or our own overflow, which they
/// skipped) just leaves the worker to carry on from fresh weights.
pub(crate) fn continues(answer: &Result<PushOutcome, ClientError>) -> bool {
    match answer {
        Ok(PushOutcome::Done) => false,
        Ok(_) => true,
        Err(ClientError::Refused(PushError::NonFinite { .. } | PushError::TooLarge { .. })) => true,
        Err(_) => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn refused() -> Result<PushOutcome, ClientError> {
        Err(ClientError::Refused(PushError::NonFinite { count: 3 }))
    }

    fn applied() -> Result<PushOutcome, ClientError> {
        Ok(PushOutcome::Applied {
            version: 1,
            staleness: 0,
        })
    }

    #[test]
    fn refused_gradients_in_a_row_end_the_worker_and_one_applied_starts_the_count_again() {
        let mut report = WorkerReport::of(1);
        report.last_loss = f32::NAN;
        for _ in 0..DIVERGED_AFTER - 1 {
            assert!(goes_on(refused(), &mut report).unwrap());
        }
        assert!(goes_on(applied(), &mut report).unwrap());
        for _ in 0..DIVERGED_AFTER - 1 {
            assert!(goes_on(refused(), &mut report).unwrap());
        }
        let err = goes_on(refused(), &mut report).unwrap_err();
        assert!(matches!(
            err,
            WorkerError::Diverged {
                rank: 1,
                in_a_row: DIVERGED_AFTER,
                ..
            }
        ));
        assert!(err.to_string().contains("training diverged"), "{err}");
        assert_eq!(report.not_applied, 2 * u64::from(DIVERGED_AFTER) - 1);
    }
}
