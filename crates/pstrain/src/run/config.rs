//! `TrainConfig`: a run as one process carries it out (the shared run plan plus this
//! process's own evaluation, threads, checkpoints, slowdowns and metrics address).

use crate::run::device_speed::DeviceSpeed;
use crate::run::error::TrainError;
use crate::run::speed_trace::SpeedTrace;
use crate::run::worker::WorkerConfig;
use pstrain_compute::{DataShape, ModelOptions, ModelSpec};
use pstrain_core::{ConfigError, Rng, RunPlan};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

pub use pstrain_store::CheckpointPolicy;

/// A run as this process carries it out: the run plan every process shares, plus what is
/// this process's own business (evaluation, compute threads, checkpoints).
#[derive(Debug, Clone, PartialEq)]
pub struct TrainConfig {
    pub plan: RunPlan,
    /// Evaluate every this many updates; `None` picks about once per epoch; `Some(0)` only at
    /// the end.
    pub eval_every: Option<u64>,
    /// Compute threads per worker (each takes a part of every batch).
    pub threads: usize,
    /// Where and how often to checkpoint the server, and whether to resume from there.
    pub checkpoint: Option<CheckpointPolicy>,
    /// Workers made slower for experiments: (rank, factor); see `WorkerConfig::slowdown`.
    pub slowdown: Vec<(usize, f64)>,
    /// A fleet of devices of different speeds: every worker not in `slowdown` is slowed by
    /// a factor drawn for its rank, log-uniform from 1 to this (seeded by the plan's seed).
    pub speed_spread: Option<f64>,
    /// With `speed_spread`: each of those workers draws its factor anew every this many
    /// seconds of its run (a device slow for a while, then fast).
    pub speed_period: Option<f64>,
    /// A recorded trace of device speeds every worker not in `slowdown` replays (rank R as
    /// the trace's device R mod its devices), and the file it was read from.
    pub speed_trace: Option<(PathBuf, Arc<SpeedTrace>)>,
    /// Workers push and pull while computing the next gradient (`WorkerConfig::overlap`).
    pub overlap: bool,
    /// With `overlap`: workers compute on the weights extrapolated this many rounds ahead
    /// (`WorkerConfig::lookahead`; unused without overlap).
    pub lookahead: f32,
    /// With `overlap`: the share of the planned updates after which workers stop overlapping
    /// and run exact rounds (`WorkerConfig::exact_from`; 1: overlap to the end).
    pub overlap_until: f64,
    /// Serve `/metrics` and the live page on this address while the run goes on.
    pub metrics_addr: Option<String>,
}

/// How many rounds ahead an overlapped worker computes unless told otherwise: the one round
/// the overlap adds to each gradient's age.
pub const DEFAULT_LOOKAHEAD: f32 = 1.0;

/// The most rounds ahead an overlapped worker may extrapolate its weights: further, one
/// round's noise outweighs the staleness it hides.
pub const MAX_LOOKAHEAD: f32 = 4.0;

/// The share of the planned updates an overlapped worker overlaps unless told otherwise.
pub const DEFAULT_OVERLAP_UNTIL: f64 = 1.0;

impl Default for TrainConfig {
    fn default() -> Self {
        TrainConfig {
            plan: RunPlan::default(),
            eval_every: None,
            threads: 1,
            checkpoint: None,
            slowdown: Vec::new(),
            speed_spread: None,
            speed_period: None,
            speed_trace: None,
            overlap: false,
            lookahead: DEFAULT_LOOKAHEAD,
            overlap_until: DEFAULT_OVERLAP_UNTIL,
            metrics_addr: None,
        }
    }
}

impl TrainConfig {
    /// The built-in model the plan names, sized for its data shape.
    pub fn model(&self) -> Result<ModelSpec, TrainError> {
        self.plan.model.parse().map_err(|e: String| {
            TrainError::Config(ConfigError::OutOfRange {
                field: "model",
                requirement: "cnn or convnet, optionally :ROWSxCOLS:CLASSES",
                value: e,
            })
        })
    }

    /// Sizes the plan's model for a data set of `data`'s shape: a model named without a shape
    /// (`cnn`) takes the data's; one named with a shape must fit the data (its images' size,
    /// at least its classes).
    pub fn adopt_data_shape(&mut self, data: DataShape) -> Result<(), TrainError> {
        let spec = self.model()?;
        let named_with_shape = self.plan.model.contains(':');
        if named_with_shape || spec.data == data {
            return spec.fits(data).map_err(TrainError::Data);
        }
        let sized = ModelSpec::new(spec.kind, data).map_err(TrainError::Data)?;
        self.plan.model = sized.to_string();
        Ok(())
    }

    pub fn validate(&self) -> Result<(), TrainError> {
        if self.threads == 0 {
            return Err(TrainError::Config(ConfigError::OutOfRange {
                field: "threads",
                requirement: ">= 1",
                value: "0".into(),
            }));
        }
        self.model()?;
        if let Some(&(rank, factor)) = self
            .slowdown
            .iter()
            .find(|(r, f)| *r >= self.plan.workers || !(f.is_finite() && *f >= 1.0 && *f <= 1000.0))
        {
            return Err(TrainError::Config(ConfigError::OutOfRange {
                field: "slowdown",
                requirement: "RANK=FACTOR with a rank of the run and 1 <= FACTOR <= 1000",
                value: format!("{rank}={factor}"),
            }));
        }
        if let Some(spread) = self
            .speed_spread
            .filter(|f| !(f.is_finite() && *f >= 1.0 && *f <= 1000.0))
        {
            return Err(TrainError::Config(ConfigError::OutOfRange {
                field: "speed_spread",
                requirement: "1 <= FACTOR <= 1000",
                value: spread.to_string(),
            }));
        }
        if let Some(period) = self.speed_period {
            if self.speed_spread.is_none() || !(period.is_finite() && period >= 0.01) {
                return Err(TrainError::Config(ConfigError::OutOfRange {
                    field: "speed_period",
                    requirement: "at least 0.01 seconds, with a speed spread",
                    value: period.to_string(),
                }));
            }
        }
        if self.speed_trace.is_some() && self.speed_spread.is_some() {
            return Err(TrainError::Config(ConfigError::OutOfRange {
                field: "speed_trace",
                requirement: "either a speed trace or a speed spread, not both",
                value: "both".into(),
            }));
        }
        let mode = &self.plan.mode;
        if self.overlap && (mode.lockstep() || mode.pull_waits() || mode.step_is_version()) {
            return Err(TrainError::Config(ConfigError::OutOfRange {
                field: "overlap",
                requirement: "async or buffered mode (sync and SSP workers wait at each step)",
                value: mode.name().to_string(),
            }));
        }
        if !(self.lookahead.is_finite() && (0.0..=MAX_LOOKAHEAD).contains(&self.lookahead)) {
            return Err(TrainError::Config(ConfigError::OutOfRange {
                field: "lookahead",
                requirement: "0 to 4 rounds",
                value: self.lookahead.to_string(),
            }));
        }
        if !(self.overlap_until > 0.0 && self.overlap_until <= 1.0) {
            return Err(TrainError::Config(ConfigError::OutOfRange {
                field: "overlap_until",
                requirement: "a share of the planned updates, above 0 and at most 1",
                value: self.overlap_until.to_string(),
            }));
        }
        Ok(self.plan.validate()?)
    }

    /// The initial weights every server (or shard) starts from, from the seed.
    pub fn initial_params(&self) -> Result<Vec<f32>, TrainError> {
        let model = self.model()?.build(ModelOptions::default());
        let mut params = vec![0.0; model.layout().len()];
        model.init_params(&mut params, &mut Rng::new(self.plan.seed));
        Ok(params)
    }

    /// What worker `rank` of this run does.
    pub fn worker_config(&self, rank: usize) -> WorkerConfig {
        let p = &self.plan;
        WorkerConfig {
            rank,
            workers: p.workers,
            batch_size: p.batch_size,
            epochs: p.iterations.is_none().then_some(p.epochs),
            seed: p.seed,
            lockstep: p.mode.lockstep(),
            step_is_version: p.mode.step_is_version(),
            pull_waits: p.mode.pull_waits(),
            max_batch: p.max_batch(),
            speed: self.speed_of(rank),
            overlap: self.overlap,
            lookahead: self.lookahead,
            exact_from: self.exact_from(),
        }
    }

    /// The version from which overlapped workers run exact rounds (`overlap_until` of the
    /// planned updates), if they stop overlapping before the end.
    fn exact_from(&self) -> Option<u64> {
        let share = self.overlap_until;
        (self.overlap && share < 1.0)
            .then(|| (share * self.plan.planned_updates() as f64).ceil() as u64)
    }

    /// How worker `rank`'s device runs: as `--slowdown` says for it, else as the speed
    /// trace's device for it, else drawn from the speed spread (anew every `speed_period` if
    /// set), else at full speed.
    pub fn speed_of(&self, rank: usize) -> DeviceSpeed {
        let given = self.slowdown.iter().any(|(r, _)| *r == rank);
        if let (Some((_, trace)), false) = (&self.speed_trace, given) {
            return DeviceSpeed::Traced {
                trace: trace.clone(),
                rank,
            };
        }
        match (self.speed_spread, self.speed_period) {
            (Some(spread), Some(period)) if !given => DeviceSpeed::Varying {
                spread,
                period: Duration::from_secs_f64(period),
                seed: self.plan.seed,
                rank,
            },
            _ => DeviceSpeed::Fixed(self.slowdown_of(rank)),
        }
    }

    /// Worker `rank`'s fixed factor: its `--slowdown`, else drawn from the speed spread, else
    /// 1 (full speed).
    pub fn slowdown_of(&self, rank: usize) -> f64 {
        let drawn = || match self.speed_spread {
            Some(spread) => {
                DeviceSpeed::draw(spread, &mut DeviceSpeed::rank_rng(self.plan.seed, rank))
            }
            None => 1.0,
        };
        self.slowdown
            .iter()
            .rev()
            .find(|(r, _)| *r == rank)
            .map_or_else(drawn, |&(_, f)| f)
    }

    /// Checks that a worker's data, of `data`'s shape, trains the plan's model.
    pub fn check_data_shape(&self, data: DataShape) -> Result<(), TrainError> {
        self.model()?.fits(data).map_err(TrainError::Data)
    }

    /// Checks that `workers` of this run's workers fit in this machine's memory
    /// (`memory_fit`) at the plan's batch size (speed-balanced batches vary around it, and
    /// add up to it on average).
    pub fn check_memory(&self, workers: usize) -> Result<(), TrainError> {
        let model = self
            .model()?
            .build(pstrain_compute::ModelOptions::default());
        let batch = self.plan.batch_size;
        crate::run::memory_fit::check_workers_fit(model.as_ref(), workers, batch)
    }

    /// Checks that `data` is what the plan was made for.
    pub fn check_data(&self, train_len: usize) -> Result<(), TrainError> {
        if train_len != self.plan.train_samples {
            return Err(TrainError::Data(format!(
                "the run is planned for {} training samples, the data set has {train_len}",
                self.plan.train_samples
            )));
        }
        Ok(())
    }
}
