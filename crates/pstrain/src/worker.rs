//! The worker loop: pull weights, compute a gradient on the next batch of its shard, push.

use crate::sampler::EpochSampler;
use pstrain_compute::mnist::Split;
use pstrain_compute::{ComputeError, Model};
use pstrain_core::client::{ClientError, ParameterClient};
use pstrain_core::{PushError, PushMeta, PushOutcome, Rng};
use std::sync::atomic::{AtomicBool, Ordering};
use thiserror::Error;

#[derive(Debug, Clone)]
pub struct WorkerConfig {
    pub rank: usize,
    pub workers: usize,
    pub batch_size: usize,
    /// Passes over the shard; `None` runs until the server says the run is done.
    pub epochs: Option<usize>,
    pub seed: u64,
    /// Every update is one step of every worker: the worker's step number is the version.
    pub lockstep: bool,
    /// After each push, the next pull waits at the shard's consistency gate.
    pub pull_waits: bool,
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
    data: &Split,
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
    data: &Split,
    cfg: &WorkerConfig,
    stop: &AtomicBool,
) -> Result<WorkerReport, WorkerError> {
    let rank = cfg.rank;
    let client_err = |source| WorkerError::Client { rank, source };
    let len = model.layout().len();
    let per = model.input_len();
    let mut params = vec![0.0f32; len];
    let mut grads = vec![0.0f32; len];
    let mut images = vec![0.0f32; cfg.batch_size * per];
    let mut labels = vec![0u8; cfg.batch_size];
    let mut sampler = EpochSampler::new(data.len(), cfg.workers, rank, cfg.batch_size, cfg.seed);
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
    while total.is_none_or(|t| step < t) {
        if stop.load(Ordering::Relaxed) {
            return Ok(report);
        }
        for (j, i) in sampler.batch_at(step).enumerate() {
            images[j * per..(j + 1) * per].copy_from_slice(&data.images[i * per..(i + 1) * per]);
            labels[j] = data.labels[i];
        }
        let mut rng = dropout_seed.fork(step);
        let stats = model
            .train_step(&params, &images, &labels, &mut grads, &mut rng)
            .map_err(|source| WorkerError::Compute { rank, source })?;
        report.steps += 1;
        report.samples += cfg.batch_size as u64;
        report.last_loss = stats.loss;
        let meta = PushMeta {
            rank,
            base_version: version,
            samples: cfg.batch_size as u32,
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
        // A sync worker follows the server's step (it may have been skipped as a straggler).
        step = if cfg.lockstep { version } else { step + 1 };
    }
    Ok(report)
}
