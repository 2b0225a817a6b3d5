//! The worker loop: pull weights, compute a gradient on the next batch of its shard, push.

use crate::data::sampler::EpochSampler;
use crate::run::device_speed::{DeviceSpeed, SpeedClock};
pub(super) use crate::run::push_answer::{continues, goes_on};
use pstrain_compute::mnist::Split;
use pstrain_compute::{ComputeError, Model};
use pstrain_core::client::{ClientError, ParameterClient};
use pstrain_core::{PushMeta, Rng};
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
    pub(super) fn samples(&self) -> &Split {
        match self {
            WorkerData::Whole(s) | WorkerData::OwnShard { samples: s, .. } => s,
        }
    }

    pub(super) fn sampler(&self, cfg: &WorkerConfig) -> EpochSampler {
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
    /// Emulates a slower device: after each gradient it waits `factor - 1` times its compute
    /// time (`DeviceSpeed::FULL`: not at all).
    pub speed: DeviceSpeed,
    /// Push the last gradient and pull while the next one is computed (modes whose pulls do
    /// not wait): a slow link's time hides behind compute, and each gradient is one round
    /// older when it arrives.
    pub overlap: bool,
    /// With `overlap`: compute each gradient on the weights extrapolated this many rounds
    /// past the last pull, along the last round's move (0: on the pulled weights).
    pub lookahead: f32,
    /// With `overlap`: from this server version on, rounds are exact (push, then pull, then
    /// compute on what was pulled): no gradient a round older in the run's tail.
    pub exact_from: Option<u64>,
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
    /// This worker's gradients refused as non-finite or too large since the last one applied.
    #[serde(skip)]
    pub refused_in_a_row: u32,
}

impl WorkerReport {
    /// A report of nothing done yet by worker `rank`.
    pub fn of(rank: usize) -> Self {
        WorkerReport {
            rank,
            ..WorkerReport::default()
        }
    }

    /// Adds a later stretch of the same worker's work (it left and joined again).
    pub fn absorb(&mut self, later: &WorkerReport) {
        self.steps += later.steps;
        self.samples += later.samples;
        self.not_applied += later.not_applied;
        if later.steps > 0 {
            self.last_loss = later.last_loss;
        }
    }
}

/// A worker's JSON report: the last line of its output that parses as one.
pub fn parse_report(text: &str) -> Option<WorkerReport> {
    parse_reports(text).pop()
}

/// Every report a worker process printed (one per worker it ran), in order.
pub fn parse_reports(text: &str) -> Vec<WorkerReport> {
    text.lines()
        .filter_map(|l| serde_json::from_str::<WorkerReport>(l).ok())
        .collect()
}

#[derive(Debug, Error)]
pub enum WorkerError {
    #[error("worker {rank}: {source}")]
    Client { rank: usize, source: ClientError },
    #[error("worker {rank}: {source}")]
    Compute { rank: usize, source: ComputeError },
    #[error(
        "worker {rank}: training diverged: its last {in_a_row} gradients were non-finite or too \
         large (last loss {last_loss}) and the shards refused each one: the weights are where \
         the loss is no longer finite. Lower --lr and start again, or resume from a checkpoint \
         taken before"
    )]
    Diverged {
        rank: usize,
        in_a_row: u32,
        last_loss: f32,
    },
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
    let result = train_until(client, model, data, cfg, &|| stop.load(Ordering::Relaxed));
    let left = client.leave();
    let report = result?;
    left.map_err(|source| WorkerError::Client {
        rank: cfg.rank,
        source,
    })?;
    Ok(report)
}

/// The training loop without the goodbye: it returns when the epochs are done, the server
/// says the run is over, or `stop()` says so between steps; the caller leaves the quorum, or
/// (a device vanishing) drops the connection without a word.
pub fn train_until(
    client: &mut dyn ParameterClient,
    model: &mut dyn Model,
    data: WorkerData<'_>,
    cfg: &WorkerConfig,
    stop: &dyn Fn() -> bool,
) -> Result<WorkerReport, WorkerError> {
    let resumed = if cfg.overlap {
        match super::overlapped::train_overlapped(client, model, data, cfg, stop)? {
            Overlapped::Ended(report) => return Ok(report),
            Overlapped::ExactFrom(point) => Some(point),
        }
    } else {
        None
    };
    train_exact(client, model, data, cfg, stop, resumed)
}

/// How an overlapped worker's loop ended: the run (or the worker's part) is over, or it
/// reached `WorkerConfig::exact_from` and its exact rounds go on from this point.
pub(super) enum Overlapped {
    Ended(WorkerReport),
    ExactFrom(Resume),
}

/// Where exact rounds take over from overlapped ones: the report so far, the next step, the
/// last pull (the weights and their version; a delta pull adds to them) and the device's
/// clock (a speed trace goes on from where it was).
pub(super) struct Resume {
    pub report: WorkerReport,
    pub step: u64,
    pub pulled: Vec<f32>,
    pub version: u64,
    pub device: SpeedClock,
}

/// A fresh start for the exact loop: the first pull into `params`, at the step the weights'
/// version gives, with the batch size the shards asked for; `None` if the run is already over.
fn first_pull(
    client: &mut dyn ParameterClient,
    cfg: &WorkerConfig,
    mut params: Vec<f32>,
) -> Result<Option<(Resume, Option<u32>)>, ClientError> {
    let first = client.pull(&mut params, None, false)?;
    let start = Resume {
        report: WorkerReport::of(cfg.rank),
        step: first_step(cfg, first.version),
        pulled: params,
        version: first.version,
        device: SpeedClock::start(cfg.speed.clone()),
    };
    Ok((!first.done).then_some((start, first.batch)))
}

/// The loop in exact rounds: compute on the pulled weights, push, pull; from the first pull,
/// or from where an overlapped loop stopped (`resumed`).
fn train_exact(
    client: &mut dyn ParameterClient,
    model: &mut dyn Model,
    data: WorkerData<'_>,
    cfg: &WorkerConfig,
    stop: &dyn Fn() -> bool,
    resumed: Option<Resume>,
) -> Result<WorkerReport, WorkerError> {
    let mut sampler = data.sampler(cfg);
    let data = data.samples();
    let rank = cfg.rank;
    let client_err = |source| WorkerError::Client { rank, source };
    let max_batch = cfg.max_batch.max(cfg.batch_size);
    let mut buffers = Buffers::new(model, max_batch);
    let dropout_seed = Rng::new(cfg.seed).fork(0xd20f + rank as u64);
    let start = match resumed {
        Some(at) => Some((at, None)),
        None => first_pull(client, cfg, std::mem::take(&mut buffers.params)).map_err(client_err)?,
    };
    let Some((at, asked)) = start else {
        return Ok(WorkerReport::of(rank));
    };
    buffers.params = at.pulled;
    let (mut report, mut version, mut step, device) = (at.report, at.version, at.step, at.device);
    let mut batch = batch_size(asked, cfg.batch_size, max_batch);
    let steps_per_epoch = sampler.steps_per_epoch() as u64;
    let total = cfg
        .epochs
        .map(|e| (e as u64).saturating_mul(steps_per_epoch));
    // Balanced batches vary in size: samples are then taken from a running position.
    let mut position = step.saturating_mul(cfg.batch_size as u64);
    while total.is_none_or(|t| step < t) {
        if stop() {
            return Ok(report);
        }
        if cfg.max_batch > cfg.batch_size {
            sampler.samples_from(position, batch, &mut buffers.picked);
            position += batch as u64;
        } else {
            buffers.pick(sampler.batch_at(step));
        }
        let computed = buffers.compute(model, data, &mut dropout_seed.fork(step), &device);
        let meta = counted(computed, version, cfg, &mut report)?;
        if !goes_on(client.push(meta, &buffers.grads), &mut report)? {
            return Ok(report);
        }
        let reply = client
            .pull(&mut buffers.params, Some(version), cfg.pull_waits)
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

/// Counts a computed gradient in `report` and gives its push's header (computed on weights
/// of `version`).
pub(super) fn counted(
    computed: Result<(usize, f32), ComputeError>,
    version: u64,
    cfg: &WorkerConfig,
    report: &mut WorkerReport,
) -> Result<PushMeta, WorkerError> {
    let rank = cfg.rank;
    let (n, loss) = computed.map_err(|source| WorkerError::Compute { rank, source })?;
    report.steps += 1;
    report.samples += n as u64;
    report.last_loss = loss;
    Ok(PushMeta {
        rank,
        base_version: version,
        samples: n as u32,
        loss,
        accumulated: false,
    })
}

/// The step a worker starts at, having pulled weights of `version`: in lockstep modes every
/// update is one step of every worker, so a worker (re)joining at version v computes exactly
/// what it would have at step v.
pub(super) fn first_step(cfg: &WorkerConfig, version: u64) -> u64 {
    if cfg.lockstep {
        version
    } else {
        version / cfg.workers as u64
    }
}

/// A worker's buffers: the weights it pulls into, the gradient it pushes from, and one batch.
pub(super) struct Buffers {
    pub params: Vec<f32>,
    pub grads: Vec<f32>,
    images: Vec<f32>,
    labels: Vec<u8>,
    /// The batch's sample indices.
    picked: Vec<usize>,
    /// Values per input image.
    per: usize,
}

impl Buffers {
    pub fn new(model: &dyn Model, max_batch: usize) -> Self {
        let (len, per) = (model.layout().len(), model.input_len());
        Buffers {
            params: vec![0.0; len],
            grads: vec![0.0; len],
            images: vec![0.0; max_batch * per],
            labels: vec![0; max_batch],
            picked: Vec::with_capacity(max_batch),
            per,
        }
    }

    /// Takes the batch of these sample indices.
    pub fn pick(&mut self, samples: impl Iterator<Item = usize>) {
        self.picked.clear();
        self.picked.extend(samples);
    }

    /// The gradient of the `picked` batch at the pulled weights, into `grads`: the batch's
    /// size and loss, at the `device`'s speed.
    pub fn compute(
        &mut self,
        model: &mut dyn Model,
        data: &Split,
        rng: &mut Rng,
        device: &SpeedClock,
    ) -> Result<(usize, f32), ComputeError> {
        let started = Instant::now();
        let per = self.per;
        for (j, &i) in self.picked.iter().enumerate() {
            data.copy_image(i, &mut self.images[j * per..(j + 1) * per]);
            self.labels[j] = data.labels[i];
        }
        let n = self.picked.len();
        let stats = model.train_step(
            &self.params,
            &self.images[..n * per],
            &self.labels[..n],
            &mut self.grads,
            rng,
        )?;
        device.pace(started.elapsed());
        Ok((n, stats.loss))
    }
}

/// The batch the shards asked for (balanced sync), within what this worker can hold.
fn batch_size(asked: Option<u32>, plan: usize, max: usize) -> usize {
    asked.map_or(plan, |b| (b as usize).clamp(1, max))
}
