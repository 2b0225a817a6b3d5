//! What a run reports: progress samples, evaluations and the final summary, each one JSON
//! object per line in the `--metrics` file.

use crate::run::TrainConfig;
use pstrain_compute::EvalStats;
use pstrain_core::{ShardCounters, WorkerStats, STALENESS_BOUNDS, WORKER_FIELDS};
use pstrain_observe::WorkerNumbers;
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
    pub fn new(start: Instant, stats: &ShardCounters, train_len: usize) -> Self {
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
    /// Seconds the evaluation took (the training went on meanwhile, sharing the cores), so
    /// time-to-accuracy can be told with and without evaluation.
    pub eval_s: f64,
}

impl EvalRecord {
    /// `stats` must be the counters of the evaluated weights.
    pub fn new(start: Instant, stats: &ShardCounters, eval: &EvalStats, train_len: usize) -> Self {
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
            eval_s: 0.0,
        }
    }
}

/// One worker rank as the shards saw it: the rates derived here, then every number of its
/// record (`pstrain_core::WORKER_FIELDS`) under its own name.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct WorkerRecord {
    pub rank: usize,
    /// Gradients (used or not) per second of the run.
    pub steps_per_s: f64,
    pub staleness_mean: f64,
    #[serde(flatten)]
    pub numbers: WorkerNumbers,
}

impl WorkerRecord {
    pub fn new(rank: usize, w: &WorkerStats, wall: Duration) -> Self {
        let secs = wall.as_secs_f64().max(1e-9);
        WorkerRecord {
            rank,
            steps_per_s: (w.applied + w.not_applied) as f64 / secs,
            staleness_mean: w.staleness_mean(),
            numbers: WorkerNumbers(*w),
        }
    }

    pub fn all(workers: &[WorkerStats], wall: Duration) -> Vec<WorkerRecord> {
        workers
            .iter()
            .enumerate()
            .map(|(rank, w)| WorkerRecord::new(rank, w, wall))
            .collect()
    }
}

/// The labels of the staleness histogram's buckets: "0", "1", "2", "3-4", ..., "33+".
pub fn staleness_buckets() -> Vec<String> {
    let mut out = Vec::new();
    let mut low = 0u64;
    for &high in &STALENESS_BOUNDS {
        out.push(match high {
            u64::MAX => format!("{low}+"),
            h if h == low => format!("{h}"),
            h => format!("{low}-{h}"),
        });
        low = high.saturating_add(1);
    }
    out
}

/// Every worker's numbers at one moment (written at each evaluation).
#[derive(Debug, Clone, Serialize)]
pub struct WorkersRecord {
    pub event: &'static str,
    pub time_s: f64,
    pub updates: u64,
    pub workers: Vec<WorkerRecord>,
}

impl WorkersRecord {
    pub fn new(start: Instant, updates: u64, workers: &[WorkerStats]) -> Self {
        let wall = start.elapsed();
        WorkersRecord {
            event: "workers",
            time_s: wall.as_secs_f64(),
            updates,
            workers: WorkerRecord::all(workers, wall),
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
    /// Each worker rank as the shards saw it.
    pub per_worker: Vec<WorkerRecord>,
    pub staleness_buckets: Vec<String>,
    /// Peak resident memory and CPU time of each process of the run (where the system
    /// reports them).
    pub processes: Vec<crate::report::usage::ProcessUsage>,
    /// With `--churn` or `--late-workers`: how many workers left, came back, joined late.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub churn: Option<crate::launch::churn::ChurnCounts>,
}

impl Summary {
    pub fn new(
        cfg: &TrainConfig,
        stats: &ShardCounters,
        eval: &EvalRecord,
        wall: Duration,
        stopped_early: bool,
        not_applied: u64,
        workers: &[WorkerStats],
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
            per_worker: WorkerRecord::all(workers, wall),
            staleness_buckets: staleness_buckets(),
            processes: Vec::new(),
            churn: None,
        }
    }

    /// The human-readable end-of-run report.
    pub fn render(&self) -> String {
        let mut text = self.render_totals();
        if !self.processes.is_empty() {
            let memory: Vec<String> = self
                .processes
                .iter()
                .map(|m| format!("{} {:.0} MB", m.process, m.peak_rss_mb))
                .collect();
            text.push_str(&format!("\npeak memory    {}", memory.join(", ")));
            let cpu: Vec<String> = self.processes.iter().filter_map(|m| m.cpu_text()).collect();
            if !cpu.is_empty() {
                text.push_str(&format!(
                    "\ncpu s          {} (user + system)",
                    cpu.join(", ")
                ));
            }
        }
        if let Some(c) = self.churn {
            text.push_str(&format!(
                "\nchurn          {} workers left, {} came back, {} joined late",
                c.left, c.came_back, c.joined_late
            ));
        }
        if !self.per_worker.is_empty() {
            text.push_str(&self.render_workers());
        }
        text
    }

    /// One line per worker: its rates, then each titled number of its record.
    fn render_workers(&self) -> String {
        let titled: Vec<_> = WORKER_FIELDS.iter().filter(|f| f.title.is_some()).collect();
        let mut text = String::from("\nworker  steps/s  staleness mean");
        for f in &titled {
            text.push_str(&format!("  {}", f.title.unwrap_or_default()));
        }
        for w in &self.per_worker {
            text.push_str(&format!(
                "\n{:>6}  {:>7.2}  {:>14.2}",
                w.rank, w.steps_per_s, w.staleness_mean
            ));
            for f in &titled {
                let width = f.title.map_or(0, str::len);
                text.push_str(&format!("  {:>width$}", (f.get)(&w.numbers).to_string()));
            }
        }
        text
    }

    fn render_totals(&self) -> String {
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

    /// Writes a record already serialized as one line of JSON.
    pub fn write_raw(&mut self, line: &str) -> std::io::Result<()> {
        self.out.write_all(line.as_bytes())?;
        self.out.write_all(b"\n")?;
        self.out.flush()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bucket_labels_match_the_bounds() {
        assert_eq!(
            staleness_buckets(),
            ["0", "1", "2", "3-4", "5-8", "9-16", "17-32", "33+"]
        );
    }
}
