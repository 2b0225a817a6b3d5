//! `TrainError`: what can end a run, whatever carries it out.

use crate::run::worker::WorkerError;
use pstrain_compute::ComputeError;
use pstrain_core::ConfigError;
use thiserror::Error;

#[derive(Debug, Error)]
pub enum TrainError {
    #[error("invalid configuration: {0}")]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Worker(#[from] WorkerError),
    #[error("evaluation failed: {0}")]
    Eval(#[from] ComputeError),
    #[error("a worker thread panicked: {0}")]
    Panicked(String),
    #[error("network: {0}")]
    Net(#[from] pstrain_net::NetError),
    /// Starting, reaching or supervising the run's processes failed.
    #[error("{0}")]
    Launch(String),
    /// The data set is not the one the run was planned for.
    #[error("{0}")]
    Data(String),
    /// The machine's memory cannot hold the run's workers.
    #[error("not enough memory: {0}")]
    Memory(String),
    /// The metrics address could not be served.
    #[error("metrics: {0}")]
    Metrics(String),
    #[error("checkpoint: {0}")]
    Checkpoint(#[from] pstrain_store::StoreError),
    #[error("cannot resume: {0}")]
    Resume(String),
    #[error("{0}")]
    Join(#[from] pstrain_core::JoinError),
}

/// The exit status of a process whose failure starting it again cannot mend (its training
/// diverged): a supervisor ends the run instead of restarting it.
pub const EXIT_NOT_RESTARTABLE: u8 = 3;

/// The process's exit status for `error`: `EXIT_NOT_RESTARTABLE` when the run itself went
/// wrong (the weights diverged), else 1.
pub fn exit_status(error: &anyhow::Error) -> u8 {
    let diverged = error.chain().any(|cause| {
        matches!(
            cause.downcast_ref::<TrainError>(),
            Some(TrainError::Worker(WorkerError::Diverged { .. }))
        ) || matches!(
            cause.downcast_ref::<WorkerError>(),
            Some(WorkerError::Diverged { .. })
        )
    });
    match diverged {
        true => EXIT_NOT_RESTARTABLE,
        false => 1,
    }
}
