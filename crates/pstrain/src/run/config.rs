//! `TrainConfig`: a run as one process carries it out (the shared run plan plus this
//! process's own evaluation, threads, checkpoints, slowdowns and metrics address).

use crate::run::error::TrainError;
use crate::run::worker::WorkerConfig;
use pstrain_compute::{ModelKind, ModelOptions};
use pstrain_core::{ConfigError, Rng, RunPlan};

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
    /// Serve `/metrics` and the live page on this address while the run goes on.
    pub metrics_addr: Option<String>,
}

impl Default for TrainConfig {
    fn default() -> Self {
        TrainConfig {
            plan: RunPlan::default(),
            eval_every: None,
            threads: 1,
            checkpoint: None,
            slowdown: Vec::new(),
            speed_spread: None,
            metrics_addr: None,
        }
    }
}

impl TrainConfig {
    /// The built-in model the plan names.
    pub fn model(&self) -> Result<ModelKind, TrainError> {
        self.plan.model.parse().map_err(|e: String| {
            TrainError::Config(ConfigError::OutOfRange {
                field: "model",
                requirement: "cnn or convnet",
                value: e,
            })
        })
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
            slowdown: self.slowdown_of(rank),
        }
    }

    /// How many times slower worker `rank` is made to run (1: not at all).
    pub fn slowdown_of(&self, rank: usize) -> f64 {
        let drawn = || match self.speed_spread {
            // Log-uniform: as many devices 1-2x slow as 2-4x, 4-8x...
            Some(spread) => {
                let u = f64::from(
                    Rng::new(self.plan.seed)
                        .fork(0x5bee_d000 + rank as u64)
                        .next_f32(),
                );
                spread.powf(u)
            }
            None => 1.0,
        };
        self.slowdown
            .iter()
            .rev()
            .find(|(r, _)| *r == rank)
            .map_or_else(drawn, |&(_, f)| f)
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
