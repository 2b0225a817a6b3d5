//! The values the run flags choose from (`--mode`, `--optimizer`, `--aggregate`,
//! `--lr-schedule`, `--grad-norm-action`), as clap lists them in `--help`.

use clap::ValueEnum;

#[derive(Copy, Clone, Debug, PartialEq, Eq, ValueEnum)]
pub enum ModeArg {
    /// One averaged update per step from every worker
    Sync,
    /// Apply each gradient on arrival
    Async,
    /// Stale synchronous parallel: sync steps, a worker may run --max-lead steps ahead
    Ssp,
}

#[derive(Copy, Clone, Debug, PartialEq, Eq, ValueEnum)]
pub enum OptimizerArg {
    Sgd,
    Momentum,
    Adam,
}

#[derive(Copy, Clone, Debug, PartialEq, Eq, ValueEnum)]
pub enum AggregateArg {
    /// Average over the step's samples (one worker with the combined batch)
    Mean,
    /// Sum of the workers' gradients (the original Ray example's rule)
    Sum,
}

#[derive(Copy, Clone, Debug, PartialEq, Eq, ValueEnum)]
pub enum ScheduleArg {
    /// The same rate throughout
    Constant,
    /// Cosine decay to zero over the planned updates
    Cosine,
}

#[derive(Copy, Clone, Debug, PartialEq, Eq, ValueEnum)]
pub enum NormActionArg {
    /// Scale it down to the bound
    Clip,
    /// Refuse it
    Refuse,
}
