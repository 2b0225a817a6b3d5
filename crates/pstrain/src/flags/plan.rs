//! The run plan as command-line flags: `RunArgs` (shared by `train`, `server` and `worker`)
//! and the one conversion each way, flags -> `RunPlan` (`overlay`) and `RunPlan` -> flags
//! (`plan_argv`). A worker takes the shards' plan and may repeat its flags, never contradict
//! them (`contradictions`).

pub use crate::flags::choices::{
    AggregateArg, CodecArg, ModeArg, NormActionArg, OptimizerArg, ScheduleArg,
};
use clap::Args;
use pstrain_compute::ModelSpec;
use pstrain_core::{
    Aggregate, GradientClip, Mode, OptimizerConfig, PullCodec, PushCodec, RunPlan, ScheduleKind,
};
use thiserror::Error;

#[derive(Debug, Error, PartialEq)]
pub enum FlagError {
    #[error("--backup-workers applies to --mode sync only")]
    BackupsInAsync,
    #[error("{flag} applies to --mode {mode} only")]
    OnlyFor {
        flag: &'static str,
        mode: &'static str,
    },
    #[error("{flag} applies to --optimizer {optimizer} only (this run's optimizer is {used})")]
    OnlyForOptimizer {
        flag: &'static str,
        optimizer: &'static str,
        used: &'static str,
    },
    #[error("--grad-norm-action needs --max-grad-norm (the norm it acts on)")]
    ActionWithoutNorm,
    #[error("auto picks both codecs: give --push-codec auto and --pull-codec auto (or one of them alone)")]
    HalfAuto,
    #[error("invalid run plan: {0}")]
    Plan(#[from] pstrain_core::ConfigError),
}

/// The flags that define a run. `train` and `server` fill what is not given with the defaults
/// shown; a `worker` takes the shards' plan and refuses a flag that contradicts it.
#[derive(Args, Debug, Clone, Default, PartialEq)]
pub struct RunArgs {
    /// sync: one averaged update per step from every worker; async: apply on arrival; ssp:
    /// sync steps, but a worker may run --max-lead steps ahead of the slowest; buffered:
    /// every --buffer arriving gradients make one averaged update [default: async]
    #[arg(long, value_enum)]
    pub mode: Option<ModeArg>,
    /// Worker ranks [default: 2]
    #[arg(long)]
    pub workers: Option<usize>,
    /// cnn or convnet; for a data set other than MNIST's 28x28 images in 10 classes, train
    /// sizes it from the data and shards take it as MODEL:ROWSxCOLS:CLASSES (cnn:32x32:47)
    /// [default: cnn]
    #[arg(long, value_parser = parse_model)]
    pub model: Option<ModelSpec>,
    /// Passes over the training set [default: 5]
    #[arg(long)]
    pub epochs: Option<usize>,
    /// Stop after this many server updates (overrides --epochs)
    #[arg(long)]
    pub iterations: Option<u64>,
    /// Samples per worker per step [default: 64]
    #[arg(long)]
    pub batch_size: Option<usize>,
    /// [default: adam]
    #[arg(long, value_enum)]
    pub optimizer: Option<OptimizerArg>,
    /// Learning rate [default: 0.001 for adam, 0.01 for sgd and momentum]
    #[arg(long)]
    pub lr: Option<f32>,
    /// Learning-rate schedule over the planned updates [default: cosine]
    #[arg(long, value_enum)]
    pub lr_schedule: Option<ScheduleArg>,
    /// Momentum factor for --optimizer momentum [default: 0.9]
    #[arg(long)]
    pub momentum: Option<f32>,
    /// L2 weight decay [default: 0]
    #[arg(long)]
    pub weight_decay: Option<f32>,
    /// Async and buffered: drop gradients computed from weights more than this many updates
    /// old (0: no bound) [default: 32]
    #[arg(long)]
    pub max_staleness: Option<u64>,
    /// Buffered: gradients (from whoever sends them) averaged into each update [default: 10]
    #[arg(long)]
    pub buffer: Option<usize>,
    /// SSP: how many steps a worker may run ahead of the slowest live worker before it waits
    /// (0: sync) [default: 3]
    #[arg(long)]
    pub max_lead: Option<u64>,
    /// Async and SSP: divide a gradient's learning rate by its staleness (at least 1);
    /// buffered: damp each gradient by 1/sqrt(1 + staleness) [default: false]
    #[arg(long, num_args = 0..=1, default_missing_value = "true")]
    pub staleness_aware_lr: Option<bool>,
    /// Sync: give each worker a batch in proportion to its measured speed (a step's total
    /// stays workers x --batch-size) [default: false]
    #[arg(long, num_args = 0..=1, default_missing_value = "true")]
    pub balance_batches: Option<bool>,
    /// Sync: each step aggregates the first workers-b gradients and drops the late ones
    /// [default: 0]
    #[arg(long)]
    pub backup_workers: Option<usize>,
    /// Sync: how a step combines its gradients [default: mean]
    #[arg(long, value_enum)]
    pub aggregate: Option<AggregateArg>,
    /// Initial weights, data shards, shuffles and dropout [default: 42]
    #[arg(long)]
    pub seed: Option<u64>,
    /// Training-set size the run is planned for [default: the data set's; `server`: 60000]
    #[arg(long)]
    pub train_samples: Option<usize>,
    /// Bound each gradient's L2 norm (each shard bounds its own slice's) [default: none]
    #[arg(long)]
    pub max_grad_norm: Option<f32>,
    /// What a shard does with a gradient over --max-grad-norm [default: clip]
    #[arg(long, value_enum)]
    pub grad_norm_action: Option<NormActionArg>,
    /// How gradients cross a TCP link: fp32, bf16, int8 (stochastic, a scale per 256
    /// values), topk:P (the P per mille largest, error feedback on the worker), or auto (each
    /// worker picks both codecs from its measured link); in-process runs move nothing over a
    /// link [default: fp32]
    #[arg(long)]
    pub push_codec: Option<CodecArg<PushCodec>>,
    /// How weights cross a TCP link: fp32, bf16, as differences from what each worker holds,
    /// delta-int8, delta-topk:PER_MILLE or delta-ternary (at most 1.6 bits a weight, entropy-coded;
    /// whole slices then go as fp32), or auto [default: fp32]
    #[arg(long)]
    pub pull_codec: Option<CodecArg<PullCodec>>,
}

const DEFAULT_MOMENTUM: f32 = 0.9;

fn default_lr(optimizer: OptimizerArg) -> f32 {
    match optimizer {
        OptimizerArg::Adam => 1e-3,
        OptimizerArg::Sgd | OptimizerArg::Momentum => 0.01,
    }
}

fn optimizer_arg(o: &OptimizerConfig) -> OptimizerArg {
    match o {
        OptimizerConfig::Sgd { momentum, .. } if *momentum > 0.0 => OptimizerArg::Momentum,
        OptimizerConfig::Sgd { .. } => OptimizerArg::Sgd,
        OptimizerConfig::Adam { .. } => OptimizerArg::Adam,
    }
}

impl RunArgs {
    /// The plan these flags describe on top of `base`: every flag given replaces what `base`
    /// says. Over `RunPlan::default()` this is the plan `train` and `server` run.
    pub fn overlay(&self, base: &RunPlan) -> Result<RunPlan, FlagError> {
        let plan = RunPlan {
            model: self.model.map_or(base.model.clone(), |m| m.to_string()),
            mode: self.mode_over(base.mode)?,
            workers: self.workers.unwrap_or(base.workers),
            batch_size: self.batch_size.unwrap_or(base.batch_size),
            epochs: self.epochs.unwrap_or(base.epochs),
            iterations: self.iterations.or(base.iterations),
            optimizer: self.optimizer_over(&base.optimizer)?,
            schedule: self.lr_schedule.map_or(base.schedule, |s| match s {
                ScheduleArg::Constant => ScheduleKind::Constant,
                ScheduleArg::Cosine => ScheduleKind::Cosine,
            }),
            aggregate: self.aggregate.map_or(base.aggregate, |a| match a {
                AggregateArg::Mean => Aggregate::Mean,
                AggregateArg::Sum => Aggregate::Sum,
            }),
            seed: self.seed.unwrap_or(base.seed),
            train_samples: self.train_samples.unwrap_or(base.train_samples),
            clip: self.clip_over(base.clip)?,
            staleness_aware_lr: self.staleness_aware_lr.unwrap_or(base.staleness_aware_lr),
            balance_batches: self.balance_batches.unwrap_or(base.balance_batches),
            push_codec: base.push_codec,
            pull_codec: base.pull_codec,
            auto_codecs: base.auto_codecs,
        };
        let plan = self.codecs_over(plan)?;
        plan.validate()?;
        Ok(plan)
    }

    fn clip_over(&self, base: Option<GradientClip>) -> Result<Option<GradientClip>, FlagError> {
        let Some(max_norm) = self.max_grad_norm.or(base.map(|c| c.max_norm)) else {
            // Said, and nothing to act on: refused rather than ignored.
            return match self.grad_norm_action {
                Some(_) => Err(FlagError::ActionWithoutNorm),
                None => Ok(None),
            };
        };
        let refuse = match self.grad_norm_action {
            Some(a) => a == NormActionArg::Refuse,
            None => base.is_some_and(|c| c.refuse),
        };
        Ok(Some(GradientClip { max_norm, refuse }))
    }

    fn optimizer_over(&self, base: &OptimizerConfig) -> Result<OptimizerConfig, FlagError> {
        let base_kind = optimizer_arg(base);
        let kind = self.optimizer.unwrap_or(base_kind);
        if self.momentum.is_some() && kind != OptimizerArg::Momentum {
            // A momentum given to Adam or plain SGD would be dropped without a word.
            return Err(FlagError::OnlyForOptimizer {
                flag: "--momentum",
                optimizer: "momentum",
                used: kind.name(),
            });
        }
        let same = kind == base_kind;
        let lr = self
            .lr
            .unwrap_or(if same { base.lr() } else { default_lr(kind) });
        let (base_momentum, base_decay) = match *base {
            OptimizerConfig::Sgd {
                momentum,
                weight_decay,
                ..
            } => (momentum, weight_decay),
            OptimizerConfig::Adam { weight_decay, .. } => (0.0, weight_decay),
        };
        let weight_decay = self.weight_decay.unwrap_or(base_decay);
        let optimizer = match kind {
            OptimizerArg::Sgd => OptimizerConfig::sgd(lr),
            OptimizerArg::Momentum => {
                let fallback = if same {
                    base_momentum
                } else {
                    DEFAULT_MOMENTUM
                };
                OptimizerConfig::momentum(lr, self.momentum.unwrap_or(fallback))
            }
            // Adam's betas and epsilon have no flags: the base's are kept.
            OptimizerArg::Adam if same => base.with_lr(lr),
            OptimizerArg::Adam => OptimizerConfig::adam(lr),
        };
        Ok(optimizer.with_weight_decay(weight_decay))
    }

    /// The flags given here that contradict `plan`: (flags, what they say, what the plan says).
    pub fn contradictions(
        &self,
        plan: &RunPlan,
    ) -> Result<Vec<(String, String, String)>, FlagError> {
        let mine = self.overlay(plan)?;
        Ok(plan
            .differences(&mine)
            .into_iter()
            .map(|(field, theirs, ours)| (flags_of(field).to_string(), ours, theirs))
            .collect())
    }
}

/// The flags behind a plan field, for messages.
fn flags_of(field: &str) -> &'static str {
    match field {
        "model" => "--model",
        "mode" => "--mode/--max-staleness/--max-lead/--backup-workers/--buffer",
        "workers" => "--workers",
        "batch_size" => "--batch-size",
        "epochs" => "--epochs",
        "iterations" => "--iterations",
        "optimizer" => "--optimizer/--lr/--momentum/--weight-decay",
        "lr_schedule" => "--lr-schedule",
        "aggregate" => "--aggregate",
        "seed" => "--seed",
        "train_samples" => "--train-samples",
        "max_grad_norm" => "--max-grad-norm/--grad-norm-action",
        "staleness_aware_lr" => "--staleness-aware-lr",
        "balance_batches" => "--balance-batches",
        "push_codec" => "--push-codec",
        "pull_codec" => "--pull-codec",
        "auto_codecs" => "--push-codec/--pull-codec auto",
        _ => "a run flag",
    }
}

/// A built-in model by name, optionally for another data shape (`cnn:32x32:47`).
fn parse_model(s: &str) -> Result<ModelSpec, String> {
    s.parse()
}

/// The flags that reproduce `plan` exactly in another process (every field).
pub fn plan_argv(plan: &RunPlan) -> Vec<String> {
    let mut a: Vec<String> = Vec::new();
    let mut flag = |name: &str, value: String| {
        a.push(format!("--{name}"));
        a.push(value);
    };
    flag("model", plan.model.clone());
    match plan.mode {
        Mode::Sync { backup_workers } => {
            flag("mode", "sync".into());
            flag("backup-workers", backup_workers.to_string());
        }
        Mode::Async { max_staleness } => {
            flag("mode", "async".into());
            flag("max-staleness", max_staleness.unwrap_or(0).to_string());
        }
        Mode::Ssp { max_lead } => {
            flag("mode", "ssp".into());
            flag("max-lead", max_lead.to_string());
        }
        Mode::Buffered { k, max_staleness } => {
            flag("mode", "buffered".into());
            flag("buffer", k.to_string());
            flag("max-staleness", max_staleness.unwrap_or(0).to_string());
        }
    }
    flag("workers", plan.workers.to_string());
    flag("batch-size", plan.batch_size.to_string());
    flag("epochs", plan.epochs.to_string());
    if let Some(n) = plan.iterations {
        flag("iterations", n.to_string());
    }
    let (name, weight_decay) = match plan.optimizer {
        OptimizerConfig::Sgd { weight_decay, .. } | OptimizerConfig::Adam { weight_decay, .. } => {
            (optimizer_arg(&plan.optimizer), weight_decay)
        }
    };
    flag("optimizer", name.name().into());
    flag("lr", plan.optimizer.lr().to_string());
    if let OptimizerConfig::Sgd { momentum, .. } = plan.optimizer {
        if momentum > 0.0 {
            flag("momentum", momentum.to_string());
        }
    }
    flag("weight-decay", weight_decay.to_string());
    flag("lr-schedule", plan.schedule.name().into());
    let aggregate = match plan.aggregate {
        Aggregate::Mean => "mean",
        Aggregate::Sum => "sum",
    };
    flag("aggregate", aggregate.into());
    flag("seed", plan.seed.to_string());
    flag("train-samples", plan.train_samples.to_string());
    if let Some(c) = plan.clip {
        flag("max-grad-norm", c.max_norm.to_string());
        flag(
            "grad-norm-action",
            if c.refuse { "refuse" } else { "clip" }.into(),
        );
    }
    flag("staleness-aware-lr", plan.staleness_aware_lr.to_string());
    flag("balance-batches", plan.balance_batches.to_string());
    if plan.auto_codecs {
        flag("push-codec", "auto".into());
        flag("pull-codec", "auto".into());
    } else {
        flag("push-codec", plan.push_codec.to_string());
        flag("pull-codec", plan.pull_codec.to_string());
    }
    a
}

#[cfg(test)]
#[path = "plan_tests.rs"]
mod tests;
