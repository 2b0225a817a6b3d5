//! Server configuration: `ServerConfig { .., ..Default::default() }` then `validate()`.

use crate::error::ConfigError;
use crate::optimizer::{LrSchedule, OptimizerConfig};

/// How the server turns pushed gradients into updates.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// One update per step from the first `workers - backup_workers` gradients of that step,
    /// averaged by sample count; late gradients of a finished step are dropped.
    Sync { backup_workers: usize },
    /// Every gradient is applied on arrival; one computed from weights more than
    /// `max_staleness` updates old is dropped (the worker then pulls fresh weights).
    Async { max_staleness: Option<u64> },
    /// Stale synchronous parallel: sync steps, but a worker may run up to `max_lead` steps
    /// ahead of the slowest live worker before its pull waits (0 is sync).
    Ssp { max_lead: u64 },
    /// Buffered async (FedBuff): gradients are taken as they arrive, from anyone, and every
    /// `k` make one averaged update; nobody waits. One more than `max_staleness` updates old
    /// is dropped.
    Buffered {
        k: usize,
        max_staleness: Option<u64>,
    },
}

/// The largest buffer of `Mode::Buffered` (it travels in 32 bits).
pub const MAX_BUFFER: usize = 1 << 20;

/// The largest `max_lead`: a shard holds up to `max_lead + 1` pending step sums.
pub const MAX_LEAD_LIMIT: u64 = 64;

/// What a mode is, in one place: every `Mode` predicate reads it, so a new mode is one arm of
/// `Mode::spec` (which the compiler asks for) rather than one arm per predicate.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ModeSpec {
    pub name: &'static str,
    /// Its tag and one parameter, for the wire and for checkpoints (`Mode::from_wire` reads
    /// them back).
    pub wire: (u8, u64),
    /// Every update is one step of every worker: one update consumes every worker's batch.
    pub lockstep: bool,
    /// A worker's step number is the server's version after each pull (a straggler whose
    /// step went on without it follows).
    pub step_is_version: bool,
    /// A worker's pull after a push waits for the shard's consistency gate instead of taking
    /// whatever the shard holds.
    pub pull_waits: bool,
    /// The gate is the rank's own lead over the shard (SSP): a pull may wait there whether or
    /// not its last push arrived (after a reconnect it must), since the rank never waits on
    /// itself. Otherwise the gate is a step the rank's push is in, and a pull waits only
    /// where that push is pending.
    pub lead_gate: bool,
    /// Gradients a step may do without.
    pub backup_workers: usize,
    /// Outside lockstep: gradients per update (async 1, buffered `k`).
    pub gradients_per_update: usize,
}

impl Mode {
    /// The mode's description; every predicate below reads it.
    pub fn spec(&self) -> ModeSpec {
        match *self {
            Mode::Sync { backup_workers } => ModeSpec {
                name: "sync",
                wire: (1, backup_workers as u64),
                lockstep: true,
                step_is_version: true,
                pull_waits: true,
                lead_gate: false,
                backup_workers,
                gradients_per_update: 1,
            },
            Mode::Async { max_staleness } => ModeSpec {
                name: "async",
                wire: (2, max_staleness.unwrap_or(0)),
                lockstep: false,
                step_is_version: false,
                pull_waits: false,
                lead_gate: false,
                backup_workers: 0,
                gradients_per_update: 1,
            },
            Mode::Ssp { max_lead } => ModeSpec {
                name: "ssp",
                wire: (3, max_lead),
                lockstep: true,
                step_is_version: false,
                pull_waits: true,
                lead_gate: true,
                backup_workers: 0,
                gradients_per_update: 1,
            },
            Mode::Buffered { k, max_staleness } => ModeSpec {
                name: "buffered",
                // The buffer in the upper 32 bits, the bound (0: none) in the lower.
                wire: (
                    4,
                    ((k as u64) << 32) | max_staleness.unwrap_or(0).min(u64::from(u32::MAX)),
                ),
                lockstep: false,
                step_is_version: false,
                pull_waits: false,
                lead_gate: false,
                backup_workers: 0,
                gradients_per_update: k.max(1),
            },
        }
    }

    pub fn name(&self) -> &'static str {
        self.spec().name
    }

    /// Every update is one step of every worker (sync and SSP).
    pub fn lockstep(&self) -> bool {
        self.spec().lockstep
    }

    /// A worker's step number is the server's version after each pull (sync).
    pub fn step_is_version(&self) -> bool {
        self.spec().step_is_version
    }

    /// A worker's pull after a push waits for the shard's consistency gate (the step's update
    /// in sync mode, the staleness bound in SSP).
    pub fn pull_waits(&self) -> bool {
        self.spec().pull_waits
    }

    /// Sync: gradients a step may do without.
    pub fn backup_workers(&self) -> usize {
        self.spec().backup_workers
    }

    /// Shard 0 decides each step's members and the other shards apply exactly those (sync
    /// with backup workers over several shards; see `consistency::follower`).
    pub fn coordinated(&self, shards: usize) -> bool {
        shards > 1 && self.backup_workers() > 0
    }

    /// The mode as a tag and one parameter, for the wire and for checkpoints.
    pub fn to_wire(&self) -> (u8, u64) {
        self.spec().wire
    }

    /// The mode `to_wire` wrote (a new mode's tag is added here by hand, and an example of
    /// it to `config_tests.rs`'s round trip).
    pub fn from_wire(tag: u8, param: u64) -> Option<Mode> {
        match tag {
            1 => Some(Mode::Sync {
                backup_workers: usize::try_from(param).ok()?,
            }),
            2 => Some(Mode::Async {
                max_staleness: (param > 0).then_some(param),
            }),
            3 => Some(Mode::Ssp { max_lead: param }),
            4 => {
                let k = usize::try_from(param >> 32).ok()?;
                let bound = param & u64::from(u32::MAX);
                (1..=MAX_BUFFER).contains(&k).then_some(Mode::Buffered {
                    k,
                    max_staleness: (bound > 0).then_some(bound),
                })
            }
            _ => None,
        }
    }
}

impl std::fmt::Display for Mode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Mode::Sync { backup_workers: 0 } => write!(f, "sync"),
            Mode::Sync { backup_workers } => write!(f, "sync ({backup_workers} backup workers)"),
            Mode::Async {
                max_staleness: None,
            } => write!(f, "async (no staleness bound)"),
            Mode::Async {
                max_staleness: Some(s),
            } => write!(f, "async (max staleness {s})"),
            Mode::Ssp { max_lead } => write!(f, "ssp (max lead {max_lead})"),
            Mode::Buffered {
                k,
                max_staleness: None,
            } => write!(f, "buffered (k {k}, no staleness bound)"),
            Mode::Buffered {
                k,
                max_staleness: Some(s),
            } => write!(f, "buffered (k {k}, max staleness {s})"),
        }
    }
}

/// How a sync step combines its gradients.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Aggregate {
    /// The mean over all samples of the step (each worker weighted by its batch size): the
    /// same update as one worker with the combined batch.
    #[default]
    Mean,
    /// The sum of the workers' (per-batch mean) gradients, as the original Ray example did;
    /// equivalent to `Mean` with the learning rate multiplied by the number of workers.
    Sum,
}

/// A bound on a gradient's L2 norm (each shard bounds the norm of its own slice).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct GradientClip {
    pub max_norm: f32,
    /// Refuse a gradient over the bound instead of scaling it down to it.
    pub refuse: bool,
}

#[derive(Debug, Clone, PartialEq)]
pub struct ServerConfig {
    pub mode: Mode,
    /// Number of worker ranks (0..workers) that may push.
    pub workers: usize,
    pub optimizer: OptimizerConfig,
    pub schedule: LrSchedule,
    /// Sync mode only.
    pub aggregate: Aggregate,
    /// Stop accepting gradients after this many updates.
    pub max_updates: Option<u64>,
    /// The most samples one gradient may claim (the plan's batch size): a push claiming more
    /// counts as this many, so no worker outweighs the others in a sync step.
    pub max_samples: Option<u32>,
    /// Gradients over this L2 norm are scaled down to it, or refused; counted either way.
    pub clip: Option<GradientClip>,
    /// Async and SSP: a gradient's learning rate divided by its staleness (an SSP step's by
    /// its gradients' mean staleness), at least 1 (Zhang et al. 2016).
    pub staleness_aware_lr: bool,
    /// Sync: each worker's batch is set in proportion to its measured speed (the step's
    /// total stays `workers * batch`), so a step's gradients arrive together.
    pub balance_batches: bool,
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            mode: Mode::Async {
                max_staleness: Some(32),
            },
            workers: 2,
            optimizer: OptimizerConfig::adam(1e-3),
            schedule: LrSchedule::Constant,
            aggregate: Aggregate::Mean,
            max_updates: None,
            max_samples: None,
            clip: None,
            staleness_aware_lr: false,
            balance_batches: false,
        }
    }
}

impl ServerConfig {
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.workers == 0 {
            return Err(ConfigError::out_of_range("workers", ">= 1", self.workers));
        }
        if let Mode::Sync { backup_workers } = self.mode {
            if backup_workers >= self.workers {
                return Err(ConfigError::out_of_range(
                    "backup_workers",
                    "smaller than the number of workers",
                    backup_workers,
                ));
            }
        }
        if let Mode::Ssp { max_lead } = self.mode {
            if max_lead > MAX_LEAD_LIMIT {
                return Err(ConfigError::out_of_range(
                    "max_lead",
                    "at most 64",
                    max_lead,
                ));
            }
        }
        if let Mode::Buffered { k, max_staleness } = self.mode {
            if !(1..=MAX_BUFFER).contains(&k) {
                return Err(ConfigError::out_of_range("buffer", "in 1..=1048576", k));
            }
            if max_staleness.is_some_and(|s| s > u64::from(u32::MAX)) {
                return Err(ConfigError::out_of_range(
                    "max_staleness",
                    "at most 4294967295 in buffered mode",
                    max_staleness.unwrap_or(0),
                ));
            }
        }
        if self.staleness_aware_lr && matches!(self.mode, Mode::Sync { .. }) {
            return Err(ConfigError::out_of_range(
                "staleness_aware_lr",
                "off in sync mode (async, buffered and ssp only)",
                true,
            ));
        }
        if self.balance_batches && !matches!(self.mode, Mode::Sync { .. }) {
            return Err(ConfigError::out_of_range(
                "balance_batches",
                "off outside sync mode",
                true,
            ));
        }
        if let Some(c) = self.clip {
            if !(c.max_norm.is_finite() && c.max_norm > 0.0) {
                return Err(ConfigError::out_of_range(
                    "max_grad_norm",
                    "finite and > 0",
                    c.max_norm,
                ));
            }
        }
        if self.max_updates == Some(0) {
            return Err(ConfigError::out_of_range("max_updates", ">= 1", 0));
        }
        self.schedule.validate()?;
        self.optimizer.validate()
    }
}

#[cfg(test)]
#[path = "config_tests.rs"]
mod tests;
