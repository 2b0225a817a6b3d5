//! One shard's model state: its slice of the parameters, the optimizer, the version and the
//! counters, with the bookkeeping every consistency rule shares.

use crate::config::ServerConfig;
use crate::error::RestoreError;
use crate::optimizer::{Optimizer, ScaledGrad};
use crate::splitter::Splitter;
use crate::update_log::{Recorded, UpdateLog};
use crate::worker_stats::WorkerStats;
use std::sync::Arc;

/// What came with a gradient besides its values.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct PushMeta {
    pub rank: usize,
    /// The server version of the weights the gradient was computed from.
    pub base_version: u64,
    /// Samples the gradient averages over (its weight in a sync step).
    pub samples: u32,
    /// The worker's mean training loss on that batch (reported, never used for the update).
    pub loss: f32,
    /// The values are a sparse codec's error-fed sums (`PushCodec::accumulates`): a zero was
    /// not sent, a value carries every step since its last sending (Adam counts the gap).
    pub accumulated: bool,
}

/// What the server did with an accepted gradient.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PushOutcome {
    /// An update was applied; the server is now at `version`.
    Applied { version: u64, staleness: u64 },
    /// Sync: stored for the current step, which still waits for `waiting_for` more gradients.
    Buffered { waiting_for: usize },
    /// Not applied, by the rules (not an error): too stale in async mode, or a late gradient
    /// for a sync step that is already complete.
    Dropped { staleness: u64 },
    /// The run reached its update budget; no more gradients are taken.
    Done,
}

/// Counters describing the shard's life so far.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct ShardCounters {
    pub version: u64,
    /// Gradients that went into an update.
    pub gradients_applied: u64,
    /// Samples behind those gradients.
    pub samples_applied: u64,
    pub dropped_stale: u64,
    pub rejected_nonfinite: u64,
    pub rejected_other: u64,
    /// Gradients scaled down to the norm bound.
    pub clipped: u64,
    /// Updates not applied because the weights or optimizer state would not have been finite.
    pub rolled_back: u64,
    pub staleness_sum: u64,
    pub staleness_max: u64,
    /// Exponential moving average of the workers' reported training loss.
    pub loss_ema: Option<f32>,
}

impl ShardCounters {
    pub fn staleness_mean(&self) -> f64 {
        if self.gradients_applied == 0 {
            0.0
        } else {
            self.staleness_sum as f64 / self.gradients_applied as f64
        }
    }
}

/// A shard's complete state, as `ServerCore::state` takes it and `restore` puts it back.
#[derive(Debug, Clone, PartialEq)]
pub struct ShardSnapshot {
    pub params: Vec<f32>,
    pub optimizer: Vec<(String, Vec<f32>)>,
    pub optimizer_step: u64,
    pub version: u64,
    pub stats: ShardCounters,
}

/// Parameters, optimizer, version and counters of one shard.
#[derive(Debug, Clone)]
pub struct ShardState {
    params: Vec<f32>,
    optimizer: Optimizer,
    version: u64,
    stats: ShardCounters,
    /// Per rank (not part of a checkpoint: it describes this process's run).
    workers: Vec<WorkerStats>,
    /// Cuts the loops over this slice into pieces the caller may run at once.
    splitter: Option<Arc<dyn Splitter>>,
    /// The last updates, for workers that replay them (kept only when a run allows it).
    log: Option<UpdateLog>,
}

impl ShardState {
    pub fn new(config: &ServerConfig, params: Vec<f32>) -> Self {
        let optimizer = Optimizer::with_schedule(config.optimizer, config.schedule, params.len());
        ShardState {
            params,
            optimizer,
            version: 0,
            stats: ShardCounters::default(),
            workers: vec![WorkerStats::default(); config.workers],
            splitter: None,
            log: None,
        }
    }

    pub fn params(&self) -> &[f32] {
        &self.params
    }

    pub fn len(&self) -> usize {
        self.params.len()
    }

    pub fn is_empty(&self) -> bool {
        self.params.is_empty()
    }

    pub fn optimizer(&self) -> &Optimizer {
        &self.optimizer
    }

    /// Runs each update's loop in the pieces `splitter` cuts it into (`crate::splitter`).
    pub fn set_splitter(&mut self, splitter: Option<Arc<dyn Splitter>>) {
        self.optimizer.set_splitter(splitter.clone());
        self.splitter = splitter;
    }

    /// What cuts the loops over this slice (the gate's scan, a step's sum) into pieces.
    pub fn splitter(&self) -> Option<&dyn Splitter> {
        self.splitter.as_deref()
    }

    pub fn version(&self) -> u64 {
        self.version
    }

    /// Keeps a log of the updates of the last `budget` bytes of pushes (`update_log`).
    pub fn keep_log(&mut self, budget: usize) {
        self.log = Some(UpdateLog::new(budget));
    }

    pub fn keeps_log(&self) -> bool {
        self.log.is_some()
    }

    /// Writes the whole slice with the optimizer's state into `out` (a replay pull's whole
    /// form).
    pub fn write_whole(&self, out: &mut Vec<u8>) {
        crate::replay::write_whole(&self.params, &self.optimizer, out);
    }

    /// Encodes the updates from version `held` to this one into `out`, if the log holds
    /// them all, without the bytes of the push whose fingerprint is `yours`.
    pub fn updates_since(&self, held: u64, yours: Option<u64>, out: &mut Vec<u8>) -> bool {
        self.log
            .as_ref()
            .is_some_and(|log| log.encode_since(held, self.version, yours, out))
    }

    pub fn stats(&self) -> ShardCounters {
        ShardCounters {
            version: self.version,
            ..self.stats
        }
    }

    /// Applies one update (a combined or single gradient) and the version moves on by one,
    /// unless the weights or optimizer state would stop being finite: then nothing changes,
    /// the update is counted as rolled back, and it returns false.
    pub fn apply(&mut self, update: ScaledGrad<'_>) -> bool {
        self.apply_scaled(update, 1.0)
    }

    /// `apply` with the learning rate multiplied by `lr_scale` (the staleness-aware rate).
    pub fn apply_scaled(&mut self, update: ScaledGrad<'_>, lr_scale: f32) -> bool {
        let ok = self.checked(update, lr_scale);
        if ok {
            if let Some(log) = &mut self.log {
                log.record(self.version, recorded(update, lr_scale), &self.params);
            }
            self.version += 1;
        }
        ok
    }

    fn checked(&mut self, update: ScaledGrad<'_>, lr_scale: f32) -> bool {
        let ok = self
            .optimizer
            .apply_scaled(&mut self.params, update, lr_scale);
        if !ok {
            self.stats.rolled_back += 1;
        }
        ok
    }

    /// Applies the update of step `step` as another shard numbered it (a follower's step):
    /// the version becomes `step + 1`, even after updates were lost to a restart. An empty
    /// step (every gradient refused), or one rolled back, moves the version without touching
    /// the weights.
    pub fn apply_step(&mut self, step: u64, update: Option<ScaledGrad<'_>>) {
        let from = self.version;
        let made = update.filter(|u| self.checked(*u, 1.0));
        self.version = self.version.max(step + 1);
        let Some(log) = &mut self.log else {
            return;
        };
        match made {
            // Only a step that moved the version by one continues the log.
            _ if self.version != from + 1 => log.clear(),
            Some(update) => log.record(from, recorded(update, 1.0), &self.params),
            None => log.record_skip(from, &self.params),
        }
    }

    /// Ends a step whose every gradient was refused: the version moves on so nobody waits.
    pub fn skip_step(&mut self) {
        if let Some(log) = &mut self.log {
            log.record_skip(self.version, &self.params);
        }
        self.version += 1;
    }

    pub fn count_refusal(&mut self) {
        self.stats.rejected_other += 1;
    }

    /// A gradient refused for non-finite or too large values.
    pub fn count_nonfinite(&mut self) {
        self.stats.rejected_nonfinite += 1;
    }

    pub fn count_clipped(&mut self) {
        self.stats.clipped += 1;
    }

    pub fn count_stale(&mut self) {
        self.stats.dropped_stale += 1;
    }

    /// Per-rank counters and times, in rank order.
    pub fn worker_stats(&self) -> &[WorkerStats] {
        &self.workers
    }

    pub fn worker_mut(&mut self, rank: usize) -> Option<&mut WorkerStats> {
        self.workers.get_mut(rank)
    }

    /// SSP: `rank`'s gradient was for a step `lead` steps past the shard's version.
    pub fn record_lead(&mut self, rank: usize, lead: u64) {
        if let Some(w) = self.workers.get_mut(rank) {
            w.max_lead = w.max_lead.max(lead);
        }
    }

    pub fn record_applied(&mut self, meta: PushMeta, staleness: u64) {
        if let Some(w) = self.workers.get_mut(meta.rank) {
            w.record_applied(meta.samples, staleness);
        }
        let s = &mut self.stats;
        s.gradients_applied += 1;
        s.samples_applied += u64::from(meta.samples);
        s.staleness_sum += staleness;
        s.staleness_max = s.staleness_max.max(staleness);
        if meta.loss.is_finite() {
            s.loss_ema = Some(match s.loss_ema {
                None => meta.loss,
                Some(avg) => 0.95 * avg + 0.05 * meta.loss,
            });
        }
    }

    /// Everything needed to continue this shard elsewhere.
    pub fn snapshot(&self) -> ShardSnapshot {
        ShardSnapshot {
            params: self.params.clone(),
            optimizer: self
                .optimizer
                .state()
                .into_iter()
                .map(|(n, v)| (n.to_string(), v.to_vec()))
                .collect(),
            optimizer_step: self.optimizer.step(),
            version: self.version,
            stats: self.stats(),
        }
    }

    pub fn restore(&mut self, state: &ShardSnapshot) -> Result<(), RestoreError> {
        let finite = |v: &[f32]| v.iter().all(|x| x.is_finite());
        if !finite(&state.params) {
            return Err(RestoreError::NonFinite("parameters".into()));
        }
        if let Some((name, _)) = state.optimizer.iter().find(|(_, v)| !finite(v)) {
            return Err(RestoreError::NonFinite(format!("optimizer state `{name}`")));
        }
        if state.params.len() != self.params.len() {
            return Err(RestoreError::Length {
                what: "parameters".into(),
                expected: self.params.len(),
                got: state.params.len(),
            });
        }
        self.optimizer
            .restore(&state.optimizer, state.optimizer_step)?;
        self.params.copy_from_slice(&state.params);
        self.version = state.version;
        if let Some(log) = &mut self.log {
            log.clear();
        }
        self.stats = state.stats;
        Ok(())
    }
}

/// An update as the log records it.
fn recorded<'a>(update: ScaledGrad<'a>, lr_scale: f32) -> Recorded<'a> {
    Recorded {
        source: update.source,
        scale: update.scale,
        accumulated: update.accumulated,
        lr_scale,
    }
}
