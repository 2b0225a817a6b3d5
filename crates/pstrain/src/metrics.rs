//! What a run reports: progress samples, evaluations and the final summary, each one JSON
//! object per line in the `--metrics` file.

use crate::train::TrainConfig;
use pstrain_compute::EvalStats;
use pstrain_core::ServerStats;
use serde::Serialize;
use std::io::Write;
use std::time::{Duration, Instant};

#[derive(Debug, Clone, Serialize)]
pub struct ProgressRecord {
    pub event: &'static str,
    pub time_s: f64,
    pub updates: u64,
    pub samples: u64,
    /// Samples applied divided by the training-set size.
    pub epoch: f64,
    pub loss: Option<f32>,
    pub staleness_mean: f64,
    pub staleness_max: u64,
}

impl ProgressRecord {
    pub fn new(start: Instant, stats: &ServerStats, train_len: usize) -> Self {
        ProgressRecord {
            event: "progress",
            time_s: start.elapsed().as_secs_f64(),
            updates: stats.version,
            samples: stats.samples_applied,
            epoch: stats.samples_applied as f64 / train_len.max(1) as f64,
            loss: stats.loss_ema,
            staleness_mean: stats.staleness_mean(),
            staleness_max: stats.staleness_max,
        }
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct EvalRecord {
    pub event: &'static str,
    pub time_s: f64,
    /// Server version of the evaluated weights.
    pub updates: u64,
    pub samples: u64,
    pub epoch: f64,
    pub loss: Option<f32>,
    pub test_loss: f64,
    pub test_accuracy: f64,
    pub test_samples: usize,
    pub staleness_mean: f64,
    pub staleness_max: u64,
}

impl EvalRecord {
    /// `stats` must be the counters of the evaluated weights.
    pub fn new(start: Instant, stats: &ServerStats, eval: &EvalStats, train_len: usize) -> Self {
        let p = ProgressRecord::new(start, stats, train_len);
        EvalRecord {
            event: "eval",
            time_s: p.time_s,
            updates: stats.version,
            samples: p.samples,
            epoch: p.epoch,
            loss: p.loss,
            test_loss: eval.loss,
            test_accuracy: eval.accuracy(),
            test_samples: eval.samples,
            staleness_mean: p.staleness_mean,
            staleness_max: p.staleness_max,
        }
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct Summary {
    pub event: &'static str,
    pub model: String,
    pub mode: &'static str,
    pub workers: usize,
    pub test_accuracy: f64,
    pub test_loss: f64,
    pub test_samples: usize,
    pub wall_time_s: f64,
    pub updates: u64,
    pub samples: u64,
    pub samples_per_s: f64,
    pub updates_per_s: f64,
    pub staleness_mean: f64,
    pub staleness_max: u64,
    pub dropped_stale: u64,
    pub rejected_nonfinite: u64,
    /// Worker-side count of gradients the server did not apply.
    pub not_applied: u64,
    /// True when the run was interrupted before its end.
    pub stopped_early: bool,
}

impl Summary {
    pub fn new(
        cfg: &TrainConfig,
        stats: &ServerStats,
        eval: &EvalRecord,
        wall: Duration,
        stopped_early: bool,
        not_applied: u64,
    ) -> Self {
        let secs = wall.as_secs_f64().max(1e-9);
        Summary {
            event: "summary",
            model: cfg.plan.model.clone(),
            mode: cfg.plan.mode.name(),
            workers: cfg.plan.workers,
            test_accuracy: eval.test_accuracy,
            test_loss: eval.test_loss,
            test_samples: eval.test_samples,
            wall_time_s: wall.as_secs_f64(),
            updates: stats.version,
            samples: stats.samples_applied,
            samples_per_s: stats.samples_applied as f64 / secs,
            updates_per_s: stats.version as f64 / secs,
            staleness_mean: stats.staleness_mean(),
            staleness_max: stats.staleness_max,
            dropped_stale: stats.dropped_stale,
            rejected_nonfinite: stats.rejected_nonfinite,
            not_applied,
            stopped_early,
        }
    }

    /// The human-readable end-of-run report.
    pub fn render(&self) -> String {
        format!(
            "{model} {mode}, {workers} worker(s){stopped}\n\
             test accuracy  {acc:.2}% on {n} test images (loss {loss:.4})\n\
             wall time      {wall:.1} s\n\
             updates        {updates} ({ups:.1}/s)\n\
             samples        {samples} ({sps:.0}/s)\n\
             staleness      mean {smean:.2}, max {smax}\n\
             not applied    {stale} stale/late, {nonfinite} non-finite",
            model = self.model,
            mode = self.mode,
            workers = self.workers,
            stopped = if self.stopped_early {
                " (stopped early)"
            } else {
                ""
            },
            acc = self.test_accuracy * 100.0,
            n = self.test_samples,
            loss = self.test_loss,
            wall = self.wall_time_s,
            updates = self.updates,
            ups = self.updates_per_s,
            samples = self.samples,
            sps = self.samples_per_s,
            smean = self.staleness_mean,
            smax = self.staleness_max,
            stale = self.dropped_stale,
            nonfinite = self.rejected_nonfinite,
        )
    }
}

/// Appends records as JSON lines.
pub struct MetricsWriter<W: Write> {
    out: W,
}

impl<W: Write> MetricsWriter<W> {
    pub fn new(out: W) -> Self {
        MetricsWriter { out }
    }

    pub fn write<T: Serialize>(&mut self, record: &T) -> std::io::Result<()> {
        serde_json::to_writer(&mut self.out, record)?;
        self.out.write_all(b"\n")?;
        self.out.flush()
    }
}
