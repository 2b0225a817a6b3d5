//! Error types of the core; every variant says what was wrong with which value.

use thiserror::Error;

/// A layout that cannot describe a flat parameter buffer.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum LayoutError {
    #[error("tensor name is empty")]
    EmptyName,
    #[error("tensor `{0}` appears twice in the layout")]
    DuplicateName(String),
    #[error("tensor `{name}` has shape {shape:?} with a zero dimension")]
    ZeroDimension { name: String, shape: Vec<usize> },
    #[error("tensor `{name}` is too large to address")]
    TooLarge { name: String },
}

/// A configuration value out of its valid range.
#[derive(Debug, Error, PartialEq)]
pub enum ConfigError {
    #[error("{field} must be {requirement}, got {value}")]
    OutOfRange {
        field: &'static str,
        requirement: &'static str,
        value: String,
    },
}

impl ConfigError {
    pub(crate) fn out_of_range(
        field: &'static str,
        requirement: &'static str,
        value: impl ToString,
    ) -> Self {
        ConfigError::OutOfRange {
            field,
            requirement,
            value: value.to_string(),
        }
    }
}

/// Why the server refused a gradient. The server's state is unchanged by a refused push.
#[derive(Debug, Clone, Error, PartialEq)]
pub enum PushError {
    #[error("gradient has {got} values, the server expects {expected}")]
    WrongLength { expected: usize, got: usize },
    #[error("gradient contains {count} non-finite values (NaN or Inf); not applied")]
    NonFinite { count: usize },
    #[error("gradient holds a value of {largest:e}, beyond the 1e15 a shard takes; not applied")]
    TooLarge { largest: f32 },
    #[error("the update would have made the weights or optimizer state non-finite; rolled back")]
    NonFiniteResult,
    #[error("gradient norm {norm} is over the bound {max}; not applied")]
    NormTooLarge { norm: f32, max: f32 },
    #[error("step {step} is too far ahead of this shard's version {version}")]
    StepTooFar { step: u64, version: u64 },
    #[error("worker rank {rank} is out of range for {workers} workers")]
    UnknownWorker { rank: usize, workers: usize },
    #[error("worker {rank} already pushed a gradient for step {version}")]
    DuplicatePush { rank: usize, version: u64 },
    #[error("worker {rank} has left the quorum")]
    NotInQuorum { rank: usize },
    #[error("gradient computed from version {base} but the server is only at version {current}")]
    FromTheFuture { base: u64, current: u64 },
    #[error("batch of 0 samples")]
    EmptyBatch,
    #[error("worker {rank} is not a member of step {} (as shard 0 decided it)", step.map_or("(none given)".to_string(), |s| s.to_string()))]
    NotAMember { rank: usize, step: Option<u64> },
    #[error("a coordinated step was given to a shard that decides its own steps")]
    UnexpectedStep,
    #[error("step members are given for {got} workers, the server has {expected}")]
    WrongMembers { expected: usize, got: usize },
}

/// A saved state that does not fit the server it is restored into.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum RestoreError {
    #[error("{what}: saved {got} values, this server needs {expected}")]
    Length {
        what: String,
        expected: usize,
        got: usize,
    },
    #[error("optimizer state `{0}` is missing from the saved state")]
    Missing(String),
    #[error("saved optimizer state `{0}` is not used by this optimizer")]
    Unexpected(String),
    #[error("saved {0} hold NaN or infinite values")]
    NonFinite(String),
}
