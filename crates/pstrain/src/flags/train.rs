//! `pstrain train`'s flags and the run they set up: the plan (flags over the defaults, sized
//! to the data set), this process's own settings, the data and the reporter.

use crate::data::{load_data, DataArgs};
use crate::flags::checkpoint::CheckpointArgs;
use crate::flags::device::DeviceArgs;
use crate::flags::plan::RunArgs;
use crate::flags::run_id;
use crate::flags::token::TokenArgs;
use crate::launch::churn::{Churn, LateJoin};
use crate::run::compute_gate::device_cores;

/// Workers a local run starts as processes of their own unless told: more are light workers,
/// one process per core, so that no more gradients are computed at once than there are cores
/// and the shard is not crowded off them.
const MAX_FULL_PROCESSES: usize = 32;
use crate::report::reporter::Reporter;
use crate::run::TrainConfig;
use anyhow::{Context, Result};
use clap::{Args, ValueEnum};
use pstrain_compute::mnist::Mnist;
use pstrain_core::RunPlan;
use std::path::PathBuf;

#[derive(Copy, Clone, Debug, PartialEq, Eq, ValueEnum)]
pub enum TransportArg {
    /// Server and workers as threads of this process
    Inproc,
    /// Server shards and workers as separate local processes talking TCP on 127.0.0.1
    Tcp,
}

#[derive(Args, Debug, Clone)]
pub struct TrainArgs {
    #[command(flatten)]
    pub run: RunArgs,
    /// inproc: threads in this process; tcp: local processes over TCP
    #[arg(long, value_enum, default_value = "inproc")]
    pub transport: TransportArg,
    /// Server shards (with --transport tcp)
    #[arg(long, default_value_t = 1)]
    pub shards: usize,
    /// With --transport tcp: times a worker process that failed is started again with its
    /// rank (it rejoins and pulls the latest weights) before its failure ends the run
    #[arg(long, default_value_t = crate::launch::cluster::WORKER_RESTARTS)]
    pub worker_restarts: usize,
    /// With --transport tcp: the fraction of the live workers that leaves each minute (killed
    /// without a goodbye, as a device that loses its network) and comes back with its rank
    /// --churn-away seconds later; a seeded trace (--seed) [default: off]
    #[arg(long, value_name = "FRACTION_PER_MINUTE")]
    pub churn: Option<f64>,
    /// With --churn: seconds a worker stays away before it comes back
    #[arg(long, default_value_t = 5.0)]
    pub churn_away: f64,
    /// With --transport tcp: workers per worker process. Above 1 they are light workers
    /// (one load of their shards, their own connections and ranks, taking turns on the
    /// cores), to run a fleet on one machine [default: 1 up to 32 workers, else one
    /// process per core]
    #[arg(long, value_name = "N")]
    pub workers_per_process: Option<usize>,
    /// With --transport tcp: the last N workers join late, --late-after seconds into the run
    /// (a sync step meanwhile completes with those there) [default: none]
    #[arg(long, value_name = "N")]
    pub late_workers: Option<usize>,
    /// With --late-workers: seconds after the start that they join
    #[arg(long, default_value_t = 10.0)]
    pub late_after: f64,
    /// Evaluate on the test set every N server updates [default: once per epoch; 0: at the end]
    #[arg(long)]
    pub eval_every: Option<u64>,
    /// Compute threads per worker
    #[arg(long, default_value_t = 1)]
    pub threads: usize,
    /// Write progress, evaluations and the summary as JSON lines to this file
    #[arg(long)]
    pub metrics: Option<PathBuf>,
    /// Serve Prometheus `/metrics` and a live page at `/` on HOST:PORT (loopback; with
    /// --transport tcp, shard 0 serves it) [default: off]
    #[arg(long, value_name = "HOST:PORT")]
    pub metrics_addr: Option<String>,
    /// Continue from the newest valid checkpoint in this folder (and keep checkpointing there)
    #[arg(long)]
    pub resume: Option<PathBuf>,
    #[command(flatten)]
    pub checkpoints: CheckpointArgs,
    /// With --transport tcp (and on Ray) a fresh token is made for each run unless given.
    #[command(flatten)]
    pub token: TokenArgs,
    #[command(flatten)]
    pub device: DeviceArgs,
    #[command(flatten)]
    pub data: DataArgs,
}

/// The run's configuration, its data set and a reporter sized for its planned samples.
pub fn prepare_train(args: &TrainArgs) -> Result<(TrainConfig, Mnist, Reporter)> {
    // Flags that are wrong whatever the data (only the sample count comes from it) are
    // refused before the data is read, or downloaded.
    args.run
        .overlay(&RunPlan::default())
        .context("invalid training flags")?;
    let data = load_data(&args.data)?;
    let base = RunPlan {
        train_samples: data.train.len(),
        ..RunPlan::default()
    };
    let resume = args.resume.is_some();
    let cfg = TrainConfig {
        plan: args.run.overlay(&base).context("invalid training flags")?,
        eval_every: args.eval_every,
        threads: args.threads,
        checkpoint: args
            .checkpoints
            .policy(args.resume.as_deref(), resume, |dir| {
                run_id::for_train(dir, args.checkpoints.run_id.as_deref(), resume)
            })?,
        metrics_addr: args.metrics_addr.clone(),
        ..TrainConfig::default()
    };
    let mut cfg = args.device.configure(cfg);
    cfg.validate().context("invalid training flags")?;
    cfg.adopt_data_shape(data.shape())
        .context("the data set does not fit --model")?;
    cfg.check_data(data.train.len())
        .context("--train-samples must match the data set")?;
    let total_samples = cfg.plan.planned_updates() * cfg.plan.samples_per_update();
    let reporter = Reporter::new(total_samples, args.metrics.as_deref(), resume)?;
    Ok((cfg, data, reporter))
}

/// The line a run starts with.
pub fn announce(cfg: &TrainConfig) -> Result<()> {
    let p = &cfg.plan;
    pstrain_observe::out_line!(
        "training {} ({} parameters), {} mode, {} workers, batch {}, {}",
        p.model,
        cfg.model()?.build(Default::default()).layout().len(),
        p.mode.name(),
        p.workers,
        p.batch_size,
        p.optimizer
    );
    let smallest_shard = p.train_samples / p.workers.max(1);
    if p.batch_size > smallest_shard {
        pstrain_observe::log_line!(
            "note: a batch of {} is more than a worker's {smallest_shard} training samples: each \
             batch repeats some of them (lower --batch-size or --workers for batches of \
             distinct samples)",
            p.batch_size
        );
    }
    Ok(())
}

impl TrainArgs {
    /// Workers per local worker process for a run of `workers` (`--workers-per-process`).
    pub fn workers_per_process(&self, workers: usize) -> Result<usize> {
        match self.workers_per_process {
            Some(0) => anyhow::bail!("--workers-per-process must be at least 1"),
            Some(_) if self.transport != TransportArg::Tcp => {
                anyhow::bail!("--workers-per-process applies to --transport tcp")
            }
            Some(n) => Ok(n),
            None if workers <= MAX_FULL_PROCESSES => Ok(1),
            None => Ok(workers.div_ceil(device_cores())),
        }
    }

    /// `--late-workers` and `--late-after` for a run of `workers`.
    pub fn late(&self, workers: usize) -> Result<Option<LateJoin>> {
        let Some(n) = self.late_workers else {
            return Ok(None);
        };
        if self.transport != TransportArg::Tcp {
            anyhow::bail!("--late-workers applies to --transport tcp (workers as processes)");
        }
        if n == 0 || n >= workers {
            anyhow::bail!("--late-workers must be from 1 to one less than the {workers} workers");
        }
        Ok(Some(LateJoin {
            workers: n,
            after: crate::flags::seconds("--late-after", self.late_after)?,
        }))
    }

    /// `--churn` and `--churn-away` as the launcher's churn, seeded by the run's seed.
    pub fn churn(&self, seed: u64) -> Result<Option<Churn>> {
        let Some(rate) = self.churn else {
            return Ok(None);
        };
        if !(rate.is_finite() && (0.0..=60.0).contains(&rate)) {
            anyhow::bail!(
                "--churn must be a fraction of the workers per minute in 0..=60, not {rate}"
            );
        }
        if self.transport != TransportArg::Tcp {
            anyhow::bail!("--churn applies to --transport tcp (workers as processes)");
        }
        Ok(Some(Churn {
            leave_per_minute: rate,
            away: crate::flags::seconds("--churn-away", self.churn_away)?,
            seed,
        }))
    }
}
