//! The run plan: a typed description of one training run that every process of the run
//! shares. The shards own it; workers and observers receive it in the handshake, so a worker
//! needs only the shards' addresses, its rank and its data.

use crate::compression::{auto_allows_pull, auto_allows_push, PullCodec, PushCodec, AUTO_LADDER};
use crate::config::{Aggregate, GradientClip, Mode, ServerConfig};
use crate::error::ConfigError;
use crate::optimizer::{LrSchedule, OptimizerConfig};

/// The learning-rate schedule, resolved against the run's planned number of updates.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ScheduleKind {
    Constant,
    /// Cosine decay to zero over the planned updates.
    #[default]
    Cosine,
}

impl ScheduleKind {
    pub fn name(&self) -> &'static str {
        match self {
            ScheduleKind::Constant => "constant",
            ScheduleKind::Cosine => "cosine",
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct RunPlan {
    /// The model's name (`cnn`, `convnet`, or `custom` for a layout given by the caller).
    pub model: String,
    pub mode: Mode,
    /// Worker ranks 0..workers.
    pub workers: usize,
    /// Samples per worker per step.
    pub batch_size: usize,
    /// Passes over the training set (each worker passes over its shard this many times).
    pub epochs: usize,
    /// Stop after this many server updates instead (workers loop over epochs until then).
    pub iterations: Option<u64>,
    pub optimizer: OptimizerConfig,
    pub schedule: ScheduleKind,
    /// How a sync step combines its gradients.
    pub aggregate: Aggregate,
    /// Initial weights, data shards, shuffles and dropout masks all derive from it.
    pub seed: u64,
    /// The training-set size the run is planned for (epochs, the schedule's length); every
    /// worker's data must have this many samples.
    pub train_samples: usize,
    /// A bound on each gradient's L2 norm (per shard slice), if any.
    pub clip: Option<GradientClip>,
    /// Async and SSP: divide a gradient's learning rate by its staleness.
    pub staleness_aware_lr: bool,
    /// Sync: batch sizes in proportion to each worker's measured speed.
    pub balance_batches: bool,
    /// How gradients cross the link (see `compression`).
    pub push_codec: PushCodec,
    /// How weights cross the link.
    pub pull_codec: PullCodec,
    /// `auto`: each worker picks both codecs from its own measured link (`AUTO_LADDER`, and
    /// in sync runs `REPLAY_LADDER`), per push and per pull; the two fields above are then
    /// fp32 and unused.
    pub auto_codecs: bool,
}

impl Default for RunPlan {
    fn default() -> Self {
        RunPlan {
            model: "cnn".into(),
            mode: Mode::Async {
                max_staleness: Some(32),
            },
            workers: 2,
            batch_size: 64,
            epochs: 5,
            iterations: None,
            optimizer: OptimizerConfig::adam(1e-3),
            schedule: ScheduleKind::Cosine,
            aggregate: Aggregate::Mean,
            seed: 42,
            train_samples: 60_000,
            clip: None,
            staleness_aware_lr: false,
            balance_batches: false,
            push_codec: PushCodec::Fp32,
            pull_codec: PullCodec::Fp32,
            auto_codecs: false,
        }
    }
}

/// Steps each worker runs per epoch when `n` samples are split over `workers`: the largest
/// shard's count, so that every worker runs the same number (a sync barrier never waits for
/// a worker that ran out of data).
pub fn steps_per_epoch(n: usize, workers: usize, batch: usize) -> usize {
    n.div_ceil(workers.max(1)).div_ceil(batch.max(1)).max(1)
}

/// The most workers a plan may name (peers size per-worker tables from it, so the wire
/// bounds it before anyone allocates, and a shard refuses to serve a plan past it).
pub const MAX_WORKERS: usize = 1 << 16;

impl RunPlan {
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.workers > MAX_WORKERS {
            return Err(ConfigError::out_of_range(
                "workers",
                "at most 65536",
                self.workers,
            ));
        }
        if self.batch_size == 0 || self.batch_size > u32::MAX as usize {
            return Err(ConfigError::out_of_range(
                "batch_size",
                "in 1..=4294967295",
                self.batch_size,
            ));
        }
        if self.epochs == 0 && self.iterations.is_none() {
            return Err(ConfigError::out_of_range(
                "epochs",
                ">= 1 (or give iterations)",
                0,
            ));
        }
        if self.train_samples == 0 {
            return Err(ConfigError::out_of_range("train_samples", ">= 1", 0));
        }
        if self.workers > self.train_samples {
            // A worker without a sample would have no batch to compute.
            return Err(ConfigError::out_of_range(
                "workers",
                "at most train_samples (every worker needs a sample of its own)",
                format!("{} for {} samples", self.workers, self.train_samples),
            ));
        }
        if self.auto_codecs
            && (self.push_codec, self.pull_codec) != (PushCodec::Fp32, PullCodec::Fp32)
        {
            return Err(ConfigError::out_of_range(
                "push_codec",
                "fp32 under auto codecs (auto picks both)",
                format!("{} / {}", self.push_codec, self.pull_codec),
            ));
        }
        if self.model.is_empty() {
            return Err(ConfigError::out_of_range("model", "a name", "\"\""));
        }
        self.server_config().validate()
    }

    /// A shard's configuration for this run.
    pub fn server_config(&self) -> ServerConfig {
        let schedule = match self.schedule {
            ScheduleKind::Constant => LrSchedule::Constant,
            ScheduleKind::Cosine => LrSchedule::Cosine {
                total_updates: self.planned_updates().max(1),
            },
        };
        ServerConfig {
            mode: self.mode,
            workers: self.workers,
            optimizer: self.optimizer,
            schedule,
            aggregate: self.aggregate,
            max_updates: self.iterations,
            max_samples: u32::try_from(self.max_batch()).ok(),
            clip: self.clip,
            staleness_aware_lr: self.staleness_aware_lr,
            balance_batches: self.balance_batches,
        }
    }

    /// The largest batch one worker may be given: its share of a step, or with balanced
    /// batches all of it.
    pub fn max_batch(&self) -> usize {
        if self.balance_batches {
            self.batch_size.saturating_mul(self.workers)
        } else {
            self.batch_size
        }
    }

    /// Whether a worker may push with `codec` in this run.
    pub fn allows_push(&self, codec: PushCodec) -> bool {
        if self.auto_codecs {
            auto_allows_push(codec)
        } else {
            codec == self.push_codec
        }
    }

    /// Whether a worker may ask for pulls in `codec` in this run.
    pub fn allows_pull(&self, codec: PullCodec) -> bool {
        if self.auto_codecs {
            auto_allows_pull(codec) || (codec == PullCodec::Replay && self.auto_replays())
        } else {
            codec == self.pull_codec
        }
    }

    /// The largest push of a slice of `values` any allowed codec makes.
    pub fn largest_push(&self, values: usize) -> usize {
        let mut largest = self.push_codec.max_len(values);
        if self.auto_codecs {
            for rung in AUTO_LADDER {
                largest = largest.max(rung.push.max_len(values));
            }
        }
        largest
    }

    /// Whether `auto` may replay pulls (`REPLAY_LADDER`): in sync runs, where every worker
    /// starts from the same weights each step and a pull is the step's other pushes. Not in
    /// async ones: there a replayed pull brings every push since the last and measured
    /// slower than a difference (docs/edge-links.md, twenty-ninth sitting).
    pub fn auto_replays(&self) -> bool {
        self.auto_codecs && matches!(self.mode, Mode::Sync { .. })
    }

    /// Whether a shard may send a worker differences (so keeps a replica of what it holds).
    pub fn sends_deltas(&self) -> bool {
        self.auto_codecs || self.pull_codec.is_delta()
    }

    /// Whether a shard keeps a log of its updates for workers that replay them.
    pub fn keeps_update_log(&self) -> bool {
        self.allows_pull(PullCodec::Replay)
    }

    /// The bytes of pushes a shard's update log keeps for a slice of `values`: sixteen
    /// bytes a value (a step of four fp32 pushes; hundreds of top-k ones).
    pub fn update_log_budget(values: usize) -> usize {
        16 * values
    }

    /// The codecs as a user names them: `auto`, or `push / pull`.
    pub fn codecs_name(&self) -> String {
        if self.auto_codecs {
            "auto".into()
        } else {
            format!("{} / {}", self.push_codec, self.pull_codec)
        }
    }

    /// Steps each worker runs per epoch.
    pub fn steps_per_epoch(&self) -> u64 {
        steps_per_epoch(self.train_samples, self.workers, self.batch_size) as u64
    }

    /// Server updates that make one pass over the training set.
    pub fn updates_per_epoch(&self) -> u64 {
        self.updates_in_epochs(1)
    }

    /// Server updates that `epochs` passes make (buffered: every gradient of them, `k` per
    /// update, so no pass's remainder is lost to rounding).
    fn updates_in_epochs(&self, epochs: u64) -> u64 {
        let steps = self.steps_per_epoch().saturating_mul(epochs);
        if self.mode.lockstep() {
            steps
        } else {
            let gradients = steps.saturating_mul(self.workers as u64);
            (gradients / self.mode.spec().gradients_per_update as u64).max(1)
        }
    }

    /// Updates the run will make: `iterations`, or the epochs' worth.
    pub fn planned_updates(&self) -> u64 {
        self.iterations
            .unwrap_or_else(|| self.updates_in_epochs(self.epochs as u64))
    }

    /// Samples behind one server update.
    pub fn samples_per_update(&self) -> u64 {
        let gradients = if self.mode.lockstep() {
            self.workers
        } else {
            self.mode.spec().gradients_per_update
        };
        (gradients * self.batch_size) as u64
    }
}

#[cfg(test)]
#[path = "plan_tests.rs"]
mod tests;
