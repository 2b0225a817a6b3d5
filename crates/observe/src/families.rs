//! The Prometheus families a watcher exposes, declared as tables: a new shard number is one row
//! here, a new per-worker number one row of `pstrain_core::WORKER_FIELDS` (`exposition.rs`
//! encodes every row alike).

use crate::snapshot::{ShardView, WorkerView};
use prometheus_client::metrics::MetricType;

/// A family with one sample per shard (none for a shard where `value` is `None`).
pub(crate) struct ShardFamily {
    pub(crate) name: &'static str,
    pub(crate) help: &'static str,
    pub(crate) kind: MetricType,
    pub(crate) value: fn(&ShardView) -> Option<f64>,
}

/// A family with one sample per worker rank of each shard.
pub(crate) struct WorkerFamily {
    pub(crate) name: &'static str,
    pub(crate) help: &'static str,
    pub(crate) kind: MetricType,
    pub(crate) value: fn(&WorkerView) -> Option<f64>,
}

/// The per-shard families, in exposition order: a new shard counter is one row here.
pub(crate) const SHARD_FAMILIES: &[ShardFamily] = &[
    ShardFamily {
        name: "pstrain_model_version",
        help: "Updates applied to the model",
        kind: MetricType::Gauge,
        value: |s| Some(s.version as f64),
    },
    ShardFamily {
        name: "pstrain_gradients_applied",
        help: "Gradients that went into an update",
        kind: MetricType::Counter,
        value: |s| Some(s.gradients_applied as f64),
    },
    ShardFamily {
        name: "pstrain_samples_applied",
        help: "Training samples behind the applied gradients",
        kind: MetricType::Counter,
        value: |s| Some(s.samples_applied as f64),
    },
];

/// Per-shard families after the refusal reasons.
pub(crate) const SHARD_FAMILIES_LATE: &[ShardFamily] = &[
    ShardFamily {
        name: "pstrain_gradients_clipped",
        help: "Gradients scaled down to --max-grad-norm",
        kind: MetricType::Counter,
        value: |s| Some(s.clipped as f64),
    },
    ShardFamily {
        name: "pstrain_training_loss",
        help: "Moving average of the workers' training loss",
        kind: MetricType::Gauge,
        value: |s| s.loss.map(f64::from),
    },
    ShardFamily {
        name: "pstrain_connections",
        help: "Open connections to the shard",
        kind: MetricType::Gauge,
        value: |s| s.connections.map(|c| c as f64),
    },
    ShardFamily {
        name: "pstrain_checkpoint_age_seconds",
        help: "Seconds since the shard's last checkpoint was written",
        kind: MetricType::Gauge,
        value: |s| s.checkpoint_age_s,
    },
    ShardFamily {
        name: "pstrain_checkpoint_write_seconds",
        help: "How long writing the last checkpoint took",
        kind: MetricType::Gauge,
        value: |s| s.checkpoint_write_s,
    },
    ShardFamily {
        name: "pstrain_checkpoint_failures",
        help: "Checkpoints the shard could not write (it backs off and says why in its log)",
        kind: MetricType::Counter,
        value: |s| Some(s.checkpoint_failures as f64),
    },
];

/// Why a shard did not apply a gradient: the `reason` label of
/// `pstrain_gradients_not_applied`.
/// A shard counter, read from its view.
pub(crate) type ShardCount = fn(&ShardView) -> u64;

pub(crate) const NOT_APPLIED_REASONS: [(&str, ShardCount); 4] = [
    ("stale", |s| s.dropped_stale),
    ("nonfinite", |s| s.rejected_nonfinite),
    ("refused", |s| s.rejected_other),
    ("rolled_back", |s| s.rolled_back),
];

/// The per-worker families not in the worker record (`pstrain_core::WORKER_FIELDS` declares
/// the others): numbers the watcher derives from the record or from the rank's presence.
pub(crate) const WORKER_FAMILIES: &[WorkerFamily] = &[
    WorkerFamily {
        name: "pstrain_worker_steps_per_second",
        help: "A worker's gradients per second over the run",
        kind: MetricType::Gauge,
        value: |w| Some(w.steps_per_s),
    },
    WorkerFamily {
        name: "pstrain_worker_last_seen_age_seconds",
        help: "Seconds since the worker's last heartbeat",
        kind: MetricType::Gauge,
        value: |w| w.last_seen_s,
    },
];
