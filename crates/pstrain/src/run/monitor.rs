//! The run's observer side, whatever the transport: samples the server's counters, evaluates
//! its weights on the test set every so many updates, and reports both.

use crate::report::records::{EvalRecord, ProgressRecord, Summary, WorkersRecord};
use crate::report::Observer;
use crate::run::{TrainConfig, TrainError};
use pstrain_compute::mnist::Split;
use pstrain_compute::{Model, ModelOptions, ModelSpec};
use pstrain_core::{ShardCounters, WorkerStats};
use std::time::{Duration, Instant};

/// Read access to the parameter server, in-process or over the network.
pub trait ServerView {
    fn stats(&mut self) -> Result<ShardCounters, TrainError>;
    /// The counters and the whole weight vector, taken together.
    fn snapshot(&mut self) -> Result<(ShardCounters, Vec<f32>), TrainError>;
    /// What the shards saw of each worker rank.
    fn workers(&mut self) -> Result<Vec<WorkerStats>, TrainError>;
}

/// What the monitor ends a run with.
pub struct Finished {
    pub stats: ShardCounters,
    pub eval: EvalRecord,
    pub params: Vec<f32>,
    pub workers: Vec<WorkerStats>,
}

impl Finished {
    /// The run's outcome: its summary (over `wall` time) and the final weights.
    pub fn into_outcome(
        self,
        cfg: &TrainConfig,
        wall: Duration,
        stopped: bool,
        not_applied: u64,
    ) -> TrainOutcome {
        let summary = Summary::new(
            cfg,
            &self.stats,
            &self.eval,
            wall,
            stopped,
            not_applied,
            &self.workers,
        );
        TrainOutcome {
            summary,
            params: self.params,
        }
    }
}

pub struct Monitor {
    eval_model: Box<dyn Model>,
    train_len: usize,
    start: Instant,
    eval_every: u64,
    next_eval: u64,
    last_eval: Option<EvalRecord>,
}

impl Monitor {
    /// A monitor for `cfg`'s run, whose model is `model`.
    pub fn new(cfg: &TrainConfig, model: ModelSpec, start: Instant) -> Self {
        let train_len = cfg.plan.train_samples;
        let eval_every = cfg
            .eval_every
            .unwrap_or_else(|| cfg.plan.updates_per_epoch());
        Monitor {
            eval_model: model.build(ModelOptions {
                dropout: true,
                threads: cfg.threads,
            }),
            train_len,
            start,
            eval_every,
            next_eval: if eval_every > 0 { eval_every } else { u64::MAX },
            last_eval: None,
        }
    }

    pub fn start(&self) -> Instant {
        self.start
    }

    /// One progress sample, and an evaluation when the next one is due.
    pub fn tick(
        &mut self,
        view: &mut dyn ServerView,
        observer: &mut dyn Observer,
        test: &Split,
    ) -> Result<(), TrainError> {
        let stats = view.stats()?;
        observer.progress(&ProgressRecord::new(self.start, &stats, self.train_len));
        if stats.version >= self.next_eval {
            let record = self.evaluate(view, test)?;
            observer.eval(&record);
            let workers = view.workers()?;
            observer.workers(&WorkersRecord::new(self.start, record.updates, &workers));
            self.last_eval = Some(record);
            while self.next_eval <= stats.version {
                self.next_eval = self.next_eval.saturating_add(self.eval_every);
            }
        }
        Ok(())
    }

    /// The evaluation of the final weights (reusing the last one if nothing changed since).
    pub fn finish(
        mut self,
        view: &mut dyn ServerView,
        observer: &mut dyn Observer,
        test: &Split,
    ) -> Result<Finished, TrainError> {
        let (stats, weights) = view.snapshot()?;
        let workers = view.workers()?;
        let record = match self.last_eval.take() {
            Some(record) if record.updates == stats.version => record,
            _ => {
                let began = Instant::now();
                let eval = test.evaluate(self.eval_model.as_mut(), &weights)?;
                let mut record = EvalRecord::new(self.start, &stats, &eval, self.train_len);
                record.eval_s = began.elapsed().as_secs_f64();
                observer.eval(&record);
                record
            }
        };
        observer.workers(&WorkersRecord::new(self.start, stats.version, &workers));
        Ok(Finished {
            stats,
            eval: record,
            params: weights,
            workers,
        })
    }

    fn evaluate(
        &mut self,
        view: &mut dyn ServerView,
        test: &Split,
    ) -> Result<EvalRecord, TrainError> {
        let (stats, weights) = view.snapshot()?;
        let began = Instant::now();
        let eval = test.evaluate(self.eval_model.as_mut(), &weights)?;
        let mut record = EvalRecord::new(self.start, &stats, &eval, self.train_len);
        record.eval_s = began.elapsed().as_secs_f64();
        Ok(record)
    }
}
/// The run's summary and the server's final weights.
pub struct TrainOutcome {
    pub summary: Summary,
    pub params: Vec<f32>,
}
