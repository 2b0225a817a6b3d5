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
    /// Buffered async (FedBuff): every --buffer arriving gradients make one averaged update
    Buffered,
}

#[derive(Copy, Clone, Debug, PartialEq, Eq, ValueEnum)]
pub enum OptimizerArg {
    Sgd,
    Momentum,
    Adam,
}

impl OptimizerArg {
    /// As `--optimizer` spells it.
    pub fn name(self) -> &'static str {
        match self {
            OptimizerArg::Sgd => "sgd",
            OptimizerArg::Momentum => "momentum",
            OptimizerArg::Adam => "adam",
        }
    }
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

/// A codec flag's value: `auto` (each worker picks from its measured link) or one codec.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub enum CodecArg<C> {
    Auto,
    Fixed(C),
}

impl<C: std::str::FromStr> std::str::FromStr for CodecArg<C> {
    type Err = C::Err;
    fn from_str(s: &str) -> Result<Self, C::Err> {
        if s == "auto" {
            Ok(CodecArg::Auto)
        } else {
            s.parse().map(CodecArg::Fixed)
        }
    }
}
