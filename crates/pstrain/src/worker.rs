//! The worker loop: pull weights, compute a gradient on the next batch of its shard, push.

use crate::sampler::EpochSampler;
use pstrain_compute::mnist::Split;
use pstrain_compute::{ComputeError, Model};
use pstrain_core::client::{ClientError, ParameterClient};
use pstrain_core::{PushError, PushMeta, PushOutcome, Rng};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;
use thiserror::Error;

/// The training samples a worker draws its batches from.
#[derive(Debug, Clone, Copy)]
pub enum WorkerData<'a> {
    /// The whole training set (in-process workers share one copy).
    Whole(&'a Split),
    /// Only this worker's shard of a set of `of` samples, in `sampler::shard_indices` order
    /// (a worker process on a small device holds no more).
    OwnShard { samples: &'a Split, of: usize },
}

impl WorkerData<'_> {
    fn samples(&self) -> &Split {
        match self {
            WorkerData::Whole(s) | WorkerData::OwnShard { samples: s, .. } => s,
        }
    }

    fn sampler(&self, cfg: &WorkerConfig) -> EpochSampler {
        let (rank, batch) = (cfg.rank, cfg.batch_size);
        match *self {
            WorkerData::Whole(s) => EpochSampler::new(s.len(), cfg.workers, rank, batch, cfg.seed),
            WorkerData::OwnShard { of, .. } => {
                EpochSampler::over_loaded_shard(of, cfg.workers, rank, batch, cfg.seed)
            }
        }
    }
}

#[derive(Debug, Clone)]
pub struct WorkerConfig {
    pub rank: usize,
    pub workers: usize,
    pub batch_size: usize,
    /// Passes over the shard; `None` runs until the server says the run is done.
    pub epochs: Option<usize>,
    pub seed: u64,
    /// Every update is one step of every worker: a worker joining at version v starts at
    /// step v.
    pub lockstep: bool,
    /// The worker's step follows the server's version after each pull (sync).
    pub step_is_version: bool,
    /// After each push, the next pull waits at the shard's consistency gate.
    pub pull_waits: bool,
    /// Speed-balanced sync: the largest batch the shards may ask for.
    pub max_batch: usize,
    /// Emulates a device this many times slower: after each gradient it waits `slowdown - 1`
    /// times its compute time. 1 is full speed.
    pub slowdown: f64,
}

#[derive(Debug, Clone, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct WorkerReport {
    /// The rank the worker ran as (assigned by the shards for `--rank auto`).
    #[serde(default)]
    pub rank: usize,
    pub steps: u64,
    pub samples: u64,
    /// Gradients the server did not apply (stale, late or non-finite).
    pub not_applied: u64,
    pub last_loss: f32,
}

#[derive(Debug, Error)]
pub enum WorkerError {
    #[error("worker {rank}: {source}")]
    Client { rank: usize, source: ClientError },
    #[error("worker {rank}: {source}")]
    Compute { rank: usize, source: ComputeError },
}

/// Runs until the epochs are done, the server says the run is over, or `stop` is set; then
/// leaves the quorum so that no sync step waits for this worker.
pub fn run_worker(
    client: &mut dyn ParameterClient,
    model: &mut dyn Model,
    data: WorkerData<'_>,
    cfg: &WorkerConfig,
    stop: &AtomicBool,
) -> Result<WorkerReport, WorkerError> {
    let result = train_loop(client, model, data, cfg, stop);
    let left = client.leave();
    let report = result?;
    left.map_err(|source| WorkerError::Client {
        rank: cfg.rank,
        source,
    })?;
    Ok(report)
}

fn train_loop(
    client: &mut dyn ParameterClient,
    model: &mut dyn Model,
    data: WorkerData<'_>,
    cfg: &WorkerConfig,
    stop: &AtomicBool,
) -> Result<WorkerReport, WorkerError> {
    let mut sampler = data.sampler(cfg);
    let data = data.samples();
    let rank = cfg.rank;
    let client_err = |source| WorkerError::Client { rank, source };
    let len = model.layout().len();
    let per = model.input_len();
    let mut params = vec![0.0f32; len];
    let mut grads = vec![0.0f32; len];
    let max_batch = cfg.max_batch.max(cfg.batch_size);
    let mut images = vec![0.0f32; max_batch * per];
    let mut labels = vec![0u8; max_batch];
    let mut picked = Vec::with_capacity(max_batch);
    let dropout_seed = Rng::new(cfg.seed).fork(0xd20f + rank as u64);
    let mut report = WorkerReport {
        rank: cfg.rank,
        ..WorkerReport::default()
    };

    let first = client.pull(&mut params, None, false).map_err(client_err)?;
    let mut version = first.version;
    if first.done {
        return Ok(report);
    }
    // Where the run is: in sync mode every update is one step of every worker, so a worker
    // (re)joining at version v computes exactly what it would have at step v.
    let steps_per_epoch = sampler.steps_per_epoch() as u64;
    let total = cfg
        .epochs
        .map(|e| (e as u64).saturating_mul(steps_per_epoch));
    let mut step = if cfg.lockstep {
        version
    } else {
        version / cfg.workers as u64
    };
    // Balanced batches vary in size: samples are then taken from a running position.
    let mut batch = batch_size(first.batch, cfg.batch_size, max_batch);
    let mut position = step.saturating_mul(cfg.batch_size as u64);
    while total.is_none_or(|t| step < t) {
        if stop.load(Ordering::Relaxed) {
            return Ok(report);
        }
        if cfg.max_batch > cfg.batch_size {
            sampler.samples_from(position, batch, &mut picked);
            position += batch as u64;
        } else {
            picked.clear();
            picked.extend(sampler.batch_at(step));
        }
        for (j, &i) in picked.iter().enumerate() {
            data.copy_image(i, &mut images[j * per..(j + 1) * per]);
            labels[j] = data.labels[i];
        }
        let n = picked.len();
        let mut rng = dropout_seed.fork(step);
        let started = Instant::now();
        let stats = model
            .train_step(
                &params,
                &images[..n * per],
                &labels[..n],
                &mut grads,
                &mut rng,
            )
            .map_err(|source| WorkerError::Compute { rank, source })?;
        if cfg.slowdown > 1.0 {
            std::thread::sleep(started.elapsed().mul_f64(cfg.slowdown - 1.0));
        }
        report.steps += 1;
        report.samples += n as u64;
        report.last_loss = stats.loss;
        let meta = PushMeta {
            rank,
            base_version: version,
            samples: n as u32,
            loss: stats.loss,
        };
        match client.push(meta, &grads) {
            Ok(PushOutcome::Done) => return Ok(report),
            Ok(PushOutcome::Applied { .. } | PushOutcome::Buffered { .. }) => {}
            Ok(PushOutcome::Dropped { .. }) => report.not_applied += 1,
            // Our own gradient overflowed: the server skipped it; carry on from fresh weights.
            Err(ClientError::Refused(PushError::NonFinite { .. } | PushError::TooLarge { .. })) => {
                report.not_applied += 1
            }
            Err(e) => return Err(client_err(e)),
        }
        let reply = client
            .pull(&mut params, Some(version), cfg.pull_waits)
            .map_err(client_err)?;
        version = reply.version;
        if reply.done {
            return Ok(report);
        }
        batch = batch_size(reply.batch, cfg.batch_size, max_batch);
        // A sync worker follows the server's step (it may have been skipped as a straggler).
        step = if cfg.step_is_version {
            version
        } else {
            step + 1
        };
    }
    Ok(report)
}

/// The batch the shards asked for (balanced sync), within what this worker can hold.
fn batch_size(asked: Option<u32>, plan: usize, max: usize) -> usize {
    asked.map_or(plan, |b| (b as usize).clamp(1, max))
}
