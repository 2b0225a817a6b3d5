//! `pstrain train` in one process: the embedded server and N worker threads, a monitor that
//! evaluates the server's weights on the test set, and the run's summary.

use crate::inproc::InProcServer;
use crate::metrics::{EvalRecord, ProgressRecord, Summary};
use crate::monitor::{Monitor, ServerView};
use crate::sampler::steps_per_epoch;
use crate::worker::{run_worker, WorkerConfig, WorkerError, WorkerReport};
use pstrain_compute::mnist::Mnist;
use pstrain_compute::{ComputeError, ModelKind, ModelOptions};
use pstrain_core::ServerStats;
use pstrain_core::{
    Aggregate, ConfigError, LrSchedule, Mode, OptimizerConfig, Rng, ServerConfig, ServerCore,
};
use pstrain_core::{CoreState, Layout};
use pstrain_store::{Saver, ShardIdentity};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::time::{Duration, Instant};
use thiserror::Error;

/// How often the monitor samples the server's counters.
const TICK: Duration = Duration::from_millis(200);

/// The learning-rate schedule, resolved against the run's planned number of updates.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Schedule {
    Constant,
    /// Cosine decay to zero over the planned updates.
    #[default]
    Cosine,
}

#[derive(Debug, Clone, PartialEq)]
pub struct TrainConfig {
    pub mode: Mode,
    pub workers: usize,
    pub model: ModelKind,
    /// Passes over the training set (each worker passes over its shard this many times).
    pub epochs: usize,
    /// Stop after this many server updates instead (workers loop over epochs until then).
    pub iterations: Option<u64>,
    pub batch_size: usize,
    pub optimizer: OptimizerConfig,
    pub schedule: Schedule,
    /// How a sync step combines its gradients.
    pub aggregate: Aggregate,
    pub seed: u64,
    /// Evaluate every this many updates; `None` picks about once per epoch; `Some(0)` only at
    /// the end.
    pub eval_every: Option<u64>,
    /// Compute threads per worker (GEMM parallelism).
    pub threads: usize,
    /// Where and how often to checkpoint the server, and whether to resume from there.
    pub checkpoint: Option<CheckpointPolicy>,
}

pub use pstrain_store::CheckpointPolicy;

impl Default for TrainConfig {
    fn default() -> Self {
        TrainConfig {
            mode: Mode::Async {
                max_staleness: Some(32),
            },
            workers: 2,
            model: ModelKind::Cnn,
            epochs: 5,
            iterations: None,
            batch_size: 64,
            optimizer: OptimizerConfig::adam(1e-3),
            schedule: Schedule::Cosine,
            aggregate: Aggregate::Mean,
            seed: 42,
            eval_every: None,
            threads: 1,
            checkpoint: None,
        }
    }
}

impl TrainConfig {
    /// The server's configuration for a training set of `train_len` samples.
    pub fn server_config(&self, train_len: usize) -> ServerConfig {
        let schedule = match self.schedule {
            Schedule::Constant => LrSchedule::Constant,
            Schedule::Cosine => LrSchedule::Cosine {
                total_updates: self.planned_updates(train_len).max(1),
            },
        };
        ServerConfig {
            mode: self.mode,
            workers: self.workers,
            optimizer: self.optimizer,
            schedule,
            aggregate: self.aggregate,
            max_updates: self.iterations,
        }
    }

    pub fn validate(&self) -> Result<(), ConfigError> {
        let bad = |field, requirement, value: usize| {
            Err(ConfigError::OutOfRange {
                field,
                requirement,
                value: value.to_string(),
            })
        };
        if self.batch_size == 0 || self.batch_size > u32::MAX as usize {
            return bad("batch_size", ">= 1", self.batch_size);
        }
        if self.epochs == 0 && self.iterations.is_none() {
            return bad("epochs", ">= 1 (or give iterations)", 0);
        }
        if self.threads == 0 {
            return bad("threads", ">= 1", 0);
        }
        self.server_config(1).validate()
    }

    /// The initial weights every server (or shard) starts from, from the seed.
    pub fn initial_params(&self) -> Vec<f32> {
        let model = self.model.build(ModelOptions::default());
        let mut params = vec![0.0; model.layout().len()];
        model.init_params(&mut params, &mut Rng::new(self.seed));
        params
    }

    /// What worker `rank` of this run does.
    pub fn worker_config(&self, rank: usize) -> WorkerConfig {
        WorkerConfig {
            rank,
            workers: self.workers,
            batch_size: self.batch_size,
            epochs: self.iterations.is_none().then_some(self.epochs),
            seed: self.seed,
            sync: self.mode.is_sync(),
        }
    }

    /// The run's configuration in words, stored in checkpoints.
    pub fn describe(&self) -> String {
        format!(
            "{:?}",
            TrainConfig {
                checkpoint: None,
                ..self.clone()
            }
        )
    }

    /// Updates the run will make: `iterations`, or the epochs' worth.
    pub fn planned_updates(&self, train_len: usize) -> u64 {
        self.iterations
            .unwrap_or_else(|| self.updates_per_epoch(train_len) * self.epochs as u64)
    }

    /// Server updates that make one pass over `train_len` samples.
    pub fn updates_per_epoch(&self, train_len: usize) -> u64 {
        let steps = steps_per_epoch(train_len, self.workers, self.batch_size) as u64;
        if self.mode.is_sync() {
            steps
        } else {
            steps * self.workers as u64
        }
    }
}

#[derive(Debug, Error)]
pub enum TrainError {
    #[error("invalid configuration: {0}")]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Worker(#[from] WorkerError),
    #[error("evaluation failed: {0}")]
    Eval(#[from] ComputeError),
    #[error("a worker thread panicked: {0}")]
    Panicked(String),
    #[error("network: {0}")]
    Net(#[from] pstrain_net::NetError),
    #[error("{0}")]
    Cluster(String),
    #[error("checkpoint: {0}")]
    Checkpoint(#[from] pstrain_store::StoreError),
    #[error("cannot resume: {0}")]
    Resume(String),
}

/// Receives what the run reports as it goes (progress bar, metrics file, tests).
pub trait Observer {
    fn progress(&mut self, _record: &ProgressRecord) {}
    fn eval(&mut self, _record: &EvalRecord) {}
    /// Something worth a line in the log (checkpoints written, files skipped).
    fn note(&mut self, _message: &str) {}
}

/// An observer that ignores everything.
pub struct Quiet;
impl Observer for Quiet {}

/// The run's summary and the server's final weights.
pub struct TrainOutcome {
    pub summary: Summary,
    pub params: Vec<f32>,
}

/// Trains `cfg.model` on `data` with an embedded server and `cfg.workers` worker threads.
/// `stop` ends the run early (Ctrl-C); the summary then describes the weights reached.
pub fn train(
    cfg: &TrainConfig,
    data: &Mnist,
    observer: &mut dyn Observer,
    stop: &AtomicBool,
) -> Result<TrainOutcome, TrainError> {
    cfg.validate()?;
    let train_len = data.train.len();
    let mut core = ServerCore::new(cfg.server_config(train_len), cfg.initial_params())?;
    let layout = cfg.model.build(ModelOptions::default()).layout().clone();
    let mut saver = cfg.checkpoint.as_ref().map(|p| saver_for(p, cfg, &layout));
    if let Some(saver) = saver.as_mut().filter(|s| s.policy().resume) {
        let restored = saver
            .restore_into(&mut core)
            .map_err(|e| TrainError::Resume(e.to_string()))?;
        for p in &restored.skipped {
            observer.note(&format!("skipping checkpoint: {p}"));
        }
        observer.note(&format!(
            "resumed from {} (version {})",
            restored.path.display(),
            restored.version
        ));
    }
    let server = InProcServer::new(core);
    let options = ModelOptions {
        dropout: true,
        threads: cfg.threads,
    };
    let mut monitor = Monitor::new(cfg, train_len, Instant::now());
    let (done_tx, done_rx) = mpsc::channel::<()>();
    let mut view = &*server;

    let (reports, monitor_failed) = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..cfg.workers)
            .map(|rank| {
                let mut client = server.client(rank);
                let done_tx = done_tx.clone();
                let wcfg = cfg.worker_config(rank);
                let server = &server;
                scope.spawn(move || {
                    let mut model = cfg.model.build(options);
                    let result = run_worker(&mut client, model.as_mut(), &data.train, &wcfg, stop);
                    if result.is_err() {
                        // Nobody may wait on a worker that is gone for good.
                        server.close();
                    }
                    let _ = done_tx.send(());
                    result
                })
            })
            .collect();
        drop(done_tx);

        let mut finished = 0;
        let mut monitor_failed = None;
        while finished < cfg.workers {
            match done_rx.recv_timeout(TICK) {
                Ok(()) => finished += 1,
                Err(mpsc::RecvTimeoutError::Timeout) => {}
                Err(mpsc::RecvTimeoutError::Disconnected) => break,
            }
            if monitor_failed.is_none() {
                let result = monitor
                    .tick(&mut view, observer, &data.test)
                    .and_then(|()| match &mut saver {
                        Some(s) if s.due(server.stats().version) => {
                            save(s, &server.state(), observer)
                        }
                        _ => Ok(()),
                    });
                if let Err(e) = result {
                    monitor_failed = Some(e);
                    server.close();
                }
            }
        }
        let reports: Vec<Result<WorkerReport, TrainError>> = handles
            .into_iter()
            .map(|h| match h.join() {
                Ok(r) => r.map_err(TrainError::from),
                Err(panic) => Err(TrainError::Panicked(panic_message(&panic))),
            })
            .collect();
        (reports, monitor_failed)
    });
    let wall = monitor.start().elapsed();
    if let Some(e) = monitor_failed {
        return Err(e);
    }
    let reports: Vec<WorkerReport> = reports.into_iter().collect::<Result<_, _>>()?;
    let not_applied = reports.iter().map(|r| r.not_applied).sum();
    if let Some(s) = &mut saver {
        // Also on Ctrl-C: the run can be resumed from exactly here.
        save(s, &server.state(), observer)?;
    }
    let (stats, record, params) = monitor.finish(&mut view, observer, &data.test)?;
    let stopped = stop.load(Ordering::Relaxed);
    Ok(TrainOutcome {
        summary: Summary::new(cfg, &stats, &record, wall, stopped, not_applied),
        params,
    })
}

impl ServerView for &InProcServer {
    fn stats(&mut self) -> Result<ServerStats, TrainError> {
        Ok(InProcServer::stats(self))
    }

    fn snapshot(&mut self) -> Result<(ServerStats, Vec<f32>), TrainError> {
        Ok(InProcServer::snapshot(self))
    }
}

/// The in-process server's checkpoint saver (one shard holding everything).
fn saver_for(policy: &CheckpointPolicy, cfg: &TrainConfig, layout: &Layout) -> Saver {
    let identity = ShardIdentity {
        shard: 0,
        shards: 1,
        range: 0..layout.len(),
        fingerprint: layout.fingerprint(),
    };
    Saver::new(policy, identity, cfg.model.name(), cfg.describe())
}

fn save(
    saver: &mut Saver,
    state: &CoreState,
    observer: &mut dyn Observer,
) -> Result<(), TrainError> {
    if let Some(path) = saver.save(state)? {
        observer.note(&format!("checkpoint {}", path.display()));
    }
    Ok(())
}

pub(crate) fn panic_message(panic: &Box<dyn std::any::Any + Send>) -> String {
    panic
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "unknown panic".into())
}
