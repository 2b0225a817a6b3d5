//! What a watcher sees of a run at one moment: the plan, each shard's counters and workers,
//! the evaluations so far and the loss over time. Plain data, serialised for the live page.

use crate::worker_numbers::{WorkerColumns, WorkerNumbers};
use pstrain_core::{Departure, Presence, ShardCounters, WorkerStats};
use serde::Serialize;
use std::time::Duration;

#[derive(Debug, Clone, Default, Serialize)]
pub struct RunSnapshot {
    /// One line naming the run, e.g. "cnn, sync, 3 workers".
    pub title: String,
    /// The run plan's fields, in order, for the page.
    pub plan: Vec<(String, String)>,
    pub uptime_s: f64,
    pub shards: Vec<ShardView>,
    /// Test-set evaluations so far (where the run evaluates: `pstrain train`).
    pub evals: Vec<EvalPoint>,
    /// Version, samples and training loss over time, sampled by the watcher once a second.
    pub history: Vec<HistoryPoint>,
    /// The workers table's columns (`[name, title]`), from the per-worker record.
    pub worker_columns: WorkerColumns,
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct ShardView {
    pub shard: usize,
    pub version: u64,
    pub gradients_applied: u64,
    pub samples_applied: u64,
    pub dropped_stale: u64,
    pub rejected_nonfinite: u64,
    pub rejected_other: u64,
    pub clipped: u64,
    pub rolled_back: u64,
    /// Moving average of the workers' training loss.
    pub loss: Option<f32>,
    /// Open connections (TCP shards).
    pub connections: Option<u64>,
    /// Seconds since the last checkpoint was written, and how long writing it took.
    pub checkpoint_age_s: Option<f64>,
    pub checkpoint_write_s: Option<f64>,
    /// Checkpoints that could not be written, and the last such error while it lasts.
    pub checkpoint_failures: u64,
    pub checkpoint_error: Option<String>,
    pub workers: Vec<WorkerView>,
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct WorkerView {
    pub rank: usize,
    /// training, waiting (at a barrier or the staleness bound), evicted, gone, finished or
    /// not joined.
    pub state: &'static str,
    /// Seconds since its last heartbeat (or its join).
    pub last_seen_s: Option<f64>,
    pub address: Option<String>,
    /// Gradients (used or not) per second of the run.
    pub steps_per_s: f64,
    pub staleness_mean: f64,
    /// Every number of the shard's record of the rank, each under its own name.
    #[serde(flatten)]
    pub numbers: WorkerNumbers,
}

#[derive(Debug, Clone, Copy, Serialize)]
pub struct EvalPoint {
    pub time_s: f64,
    pub samples: u64,
    pub accuracy: f64,
    pub loss: f64,
}

#[derive(Debug, Clone, Copy, Serialize)]
pub struct HistoryPoint {
    pub time_s: f64,
    pub version: u64,
    pub samples: u64,
    pub loss: Option<f32>,
}

/// The page's name for where a worker stands.
pub fn state_name(presence: Presence, waiting: bool) -> &'static str {
    match presence {
        Presence::Held { .. } if waiting => "waiting",
        Presence::Held { .. } => "training",
        Presence::Left(Departure::Evicted) => "evicted",
        Presence::Left(Departure::Vanished) => "gone",
        Presence::Left(Departure::Goodbye) => "finished",
        Presence::NotJoined => "not joined",
    }
}

impl ShardView {
    /// Shard `shard`'s counters and workers; `presence` per rank as the engine reports it
    /// (`ShardEngine::presence`), `uptime` for the step rates.
    pub fn new(
        shard: usize,
        stats: &ShardCounters,
        workers: &[WorkerStats],
        presence: &[(Presence, bool)],
        uptime: Duration,
    ) -> Self {
        let secs = uptime.as_secs_f64().max(1e-9);
        let workers = workers
            .iter()
            .enumerate()
            .map(|(rank, w)| {
                let (p, waiting) = presence
                    .get(rank)
                    .copied()
                    .unwrap_or((Presence::NotJoined, false));
                WorkerView {
                    rank,
                    state: state_name(p, waiting),
                    last_seen_s: match p {
                        Presence::Held { since_beat } => since_beat.map(|d| d.as_secs_f64()),
                        _ => None,
                    },
                    address: None,
                    steps_per_s: (w.applied + w.not_applied) as f64 / secs,
                    staleness_mean: w.staleness_mean(),
                    numbers: WorkerNumbers(*w),
                }
            })
            .collect();
        ShardView {
            shard,
            version: stats.version,
            gradients_applied: stats.gradients_applied,
            samples_applied: stats.samples_applied,
            dropped_stale: stats.dropped_stale,
            rejected_nonfinite: stats.rejected_nonfinite,
            rejected_other: stats.rejected_other,
            clipped: stats.clipped,
            rolled_back: stats.rolled_back,
            loss: stats.loss_ema,
            connections: None,
            checkpoint_age_s: None,
            checkpoint_write_s: None,
            checkpoint_failures: 0,
            checkpoint_error: None,
            workers,
        }
    }
}

/// The plan's fields for the live page.
pub fn plan_fields(plan: &pstrain_core::RunPlan) -> Vec<(String, String)> {
    plan.fields()
        .into_iter()
        .map(|(field, value)| (field.replace('_', " "), value))
        .collect()
}
