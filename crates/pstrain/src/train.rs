//! `pstrain train` in one process: the embedded server and N worker threads, a monitor that
//! evaluates the server's weights on the test set, and the run's summary.

use crate::inproc::InProcServer;
use crate::metrics::{EvalRecord, ProgressRecord, Summary, WorkersRecord};
use crate::monitor::{Monitor, ServerView};
use crate::worker::{run_worker, WorkerConfig, WorkerData, WorkerError, WorkerReport};
use pstrain_compute::mnist::Mnist;
use pstrain_compute::{ComputeError, ModelKind, ModelOptions};
use pstrain_core::{
    ConfigError, CoreState, EngineConfig, Layout, Rng, RunPlan, ServerStats, ShardEngine,
    WorkerStats,
};
use pstrain_observe::{plan_fields, EvalPoint, RunSnapshot, Watcher};
use pstrain_store::{Saver, ShardIdentity};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant};
use thiserror::Error;

/// How often the monitor samples the server's counters.
const TICK: Duration = Duration::from_millis(200);

/// A run as this process carries it out: the run plan every process shares, plus what is
/// this process's own business (evaluation, compute threads, checkpoints).
#[derive(Debug, Clone, PartialEq)]
pub struct TrainConfig {
    pub plan: RunPlan,
    /// Evaluate every this many updates; `None` picks about once per epoch; `Some(0)` only at
    /// the end.
    pub eval_every: Option<u64>,
    /// Compute threads per worker (each takes a part of every batch).
    pub threads: usize,
    /// Where and how often to checkpoint the server, and whether to resume from there.
    pub checkpoint: Option<CheckpointPolicy>,
    /// Workers made slower for experiments: (rank, factor); see `WorkerConfig::slowdown`.
    pub slowdown: Vec<(usize, f64)>,
    /// Serve `/metrics` and the live page on this address while the run goes on.
    pub metrics_addr: Option<String>,
}

pub use pstrain_store::CheckpointPolicy;

impl Default for TrainConfig {
    fn default() -> Self {
        TrainConfig {
            plan: RunPlan::default(),
            eval_every: None,
            threads: 1,
            checkpoint: None,
            slowdown: Vec::new(),
            metrics_addr: None,
        }
    }
}

impl TrainConfig {
    /// The built-in model the plan names.
    pub fn model(&self) -> Result<ModelKind, TrainError> {
        self.plan.model.parse().map_err(|e: String| {
            TrainError::Config(ConfigError::OutOfRange {
                field: "model",
                requirement: "cnn or convnet",
                value: e,
            })
        })
    }

    pub fn validate(&self) -> Result<(), TrainError> {
        if self.threads == 0 {
            return Err(TrainError::Config(ConfigError::OutOfRange {
                field: "threads",
                requirement: ">= 1",
                value: "0".into(),
            }));
        }
        self.model()?;
        if let Some(&(rank, factor)) = self
            .slowdown
            .iter()
            .find(|(r, f)| *r >= self.plan.workers || !(f.is_finite() && *f >= 1.0 && *f <= 1000.0))
        {
            return Err(TrainError::Config(ConfigError::OutOfRange {
                field: "slowdown",
                requirement: "RANK=FACTOR with a rank of the run and 1 <= FACTOR <= 1000",
                value: format!("{rank}={factor}"),
            }));
        }
        Ok(self.plan.validate()?)
    }

    /// The initial weights every server (or shard) starts from, from the seed.
    pub fn initial_params(&self) -> Result<Vec<f32>, TrainError> {
        let model = self.model()?.build(ModelOptions::default());
        let mut params = vec![0.0; model.layout().len()];
        model.init_params(&mut params, &mut Rng::new(self.plan.seed));
        Ok(params)
    }

    /// What worker `rank` of this run does.
    pub fn worker_config(&self, rank: usize) -> WorkerConfig {
        let p = &self.plan;
        WorkerConfig {
            rank,
            workers: p.workers,
            batch_size: p.batch_size,
            epochs: p.iterations.is_none().then_some(p.epochs),
            seed: p.seed,
            lockstep: p.mode.lockstep(),
            step_is_version: p.mode.step_is_version(),
            pull_waits: p.mode.pull_waits(),
            max_batch: p.max_batch(),
            slowdown: self.slowdown_of(rank),
        }
    }

    /// How many times slower worker `rank` is made to run (1: not at all).
    pub fn slowdown_of(&self, rank: usize) -> f64 {
        self.slowdown
            .iter()
            .rev()
            .find(|(r, _)| *r == rank)
            .map_or(1.0, |&(_, f)| f)
    }

    /// Checks that `data` is what the plan was made for.
    pub fn check_data(&self, train_len: usize) -> Result<(), TrainError> {
        if train_len != self.plan.train_samples {
            return Err(TrainError::Cluster(format!(
                "the run is planned for {} training samples, the data set has {train_len}",
                self.plan.train_samples
            )));
        }
        Ok(())
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
    #[error("{0}")]
    Join(#[from] pstrain_core::JoinError),
}

/// Receives what the run reports as it goes (progress bar, metrics file, tests).
pub trait Observer {
    fn progress(&mut self, _record: &ProgressRecord) {}
    fn eval(&mut self, _record: &EvalRecord) {}
    /// Every worker's numbers (at each evaluation and at the end).
    fn workers(&mut self, _record: &WorkersRecord) {}
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
    cfg.check_data(train_len)?;
    let model = cfg.model()?;
    let policy = cfg.checkpoint.as_ref();
    let engine_cfg = EngineConfig {
        checkpoint_every_updates: policy.and_then(|p| p.every_updates),
        checkpoint_every: policy.and_then(|p| p.every),
        ..EngineConfig::single(cfg.plan.server_config())
    };
    let mut engine = ShardEngine::new(engine_cfg, cfg.initial_params()?, Duration::ZERO)?;
    let layout = model.build(ModelOptions::default()).layout().clone();
    let mut saver = policy.map(|p| saver_for(p, cfg, &layout));
    if let Some(saver) = saver.as_mut().filter(|s| s.policy().resume) {
        let restored = saver
            .restore_into(false, |state| engine.restore(state, Duration::ZERO))
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
    let server = InProcServer::new(engine);
    let evals = Arc::new(Mutex::new(Vec::new()));
    let _watcher = match &cfg.metrics_addr {
        Some(addr) => {
            let w = watch_inproc(addr, cfg, &server, &evals)?;
            observer.note(&format!("metrics and live page at {}", w.url()));
            Some(w)
        }
        None => None,
    };
    let mut watched = WatchedObserver {
        inner: observer,
        evals: &evals,
    };
    let observer: &mut dyn Observer = &mut watched;
    let options = ModelOptions {
        dropout: true,
        threads: cfg.threads,
    };
    let mut monitor = Monitor::new(cfg, model, Instant::now());
    let (done_tx, done_rx) = mpsc::channel::<()>();
    let mut view = &*server;
    // Workers see a stop only after the server is closed: one that left first would complete
    // a sync step with the others' gradients alone, and the final checkpoint would hold a
    // step the resumed run computes differently.
    let workers_stop = AtomicBool::new(false);
    let stop_workers = || {
        if stop.load(Ordering::Relaxed) && !workers_stop.load(Ordering::Relaxed) {
            server.close();
            workers_stop.store(true, Ordering::Relaxed);
        }
    };

    let (reports, monitor_failed) = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..cfg.plan.workers)
            .map(|rank| {
                let client = server.client(rank).map_err(TrainError::from);
                let done_tx = done_tx.clone();
                let wcfg = cfg.worker_config(rank);
                let server = &server;
                let workers_stop = &workers_stop;
                scope.spawn(move || {
                    let result = client.and_then(|mut client| {
                        let mut model = model.build(options);
                        run_worker(
                            &mut client,
                            model.as_mut(),
                            WorkerData::Whole(&data.train),
                            &wcfg,
                            workers_stop,
                        )
                        .map_err(TrainError::from)
                    });
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
        while finished < cfg.plan.workers {
            stop_workers();
            match done_rx.recv_timeout(TICK) {
                Ok(()) => finished += 1,
                Err(mpsc::RecvTimeoutError::Timeout) => {}
                Err(mpsc::RecvTimeoutError::Disconnected) => break,
            }
            stop_workers();
            if monitor_failed.is_none() {
                let result = monitor
                    .tick(&mut view, observer, &data.test)
                    .and_then(|()| match &mut saver {
                        Some(s) => match server.take_snapshot() {
                            Some(state) => save(s, &state, observer),
                            None => Ok(()),
                        },
                        None => Ok(()),
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
                Ok(r) => r,
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
    let end = monitor.finish(&mut view, observer, &data.test)?;
    let mut outcome = end.into_outcome(cfg, wall, stop.load(Ordering::Relaxed), not_applied);
    outcome.summary.processes = crate::usage::this_process("server and workers (one process)")
        .into_iter()
        .collect();
    Ok(outcome)
}

impl ServerView for &InProcServer {
    fn stats(&mut self) -> Result<ServerStats, TrainError> {
        Ok(InProcServer::stats(self))
    }

    fn snapshot(&mut self) -> Result<(ServerStats, Vec<f32>), TrainError> {
        Ok(InProcServer::snapshot(self))
    }

    fn workers(&mut self) -> Result<Vec<WorkerStats>, TrainError> {
        Ok(InProcServer::workers(self))
    }
}

/// Serves the in-process run's `/metrics` and live page on `addr`.
fn watch_inproc(
    addr: &str,
    cfg: &TrainConfig,
    server: &Arc<InProcServer>,
    evals: &Arc<Mutex<Vec<EvalPoint>>>,
) -> Result<Watcher, TrainError> {
    let (server, evals) = (Arc::clone(server), Arc::clone(evals));
    let title = format!(
        "{}, {}, {} workers",
        cfg.plan.model, cfg.plan.mode, cfg.plan.workers
    );
    let plan = plan_fields(&cfg.plan);
    let started = Instant::now();
    let source = move || RunSnapshot {
        title: title.clone(),
        plan: plan.clone(),
        uptime_s: started.elapsed().as_secs_f64(),
        shards: vec![server.observe()],
        evals: evals.lock().map(|e| e.clone()).unwrap_or_default(),
        history: Vec::new(),
    };
    // The in-process run has no token: its watcher serves loopback only.
    Watcher::start(addr, None, Arc::new(source), None)
        .map_err(|e| TrainError::Cluster(e.to_string()))
}

/// Passes everything on, keeping the evaluations for the live page.
pub(crate) struct WatchedObserver<'a> {
    pub inner: &'a mut dyn Observer,
    pub evals: &'a Mutex<Vec<EvalPoint>>,
}

impl Observer for WatchedObserver<'_> {
    fn progress(&mut self, r: &ProgressRecord) {
        self.inner.progress(r)
    }
    fn eval(&mut self, r: &EvalRecord) {
        if let Ok(mut e) = self.evals.lock() {
            e.push(EvalPoint {
                time_s: r.time_s,
                samples: r.samples,
                accuracy: r.test_accuracy,
                loss: r.test_loss,
            });
        }
        self.inner.eval(r)
    }
    fn workers(&mut self, r: &WorkersRecord) {
        self.inner.workers(r)
    }
    fn note(&mut self, message: &str) {
        self.inner.note(message)
    }
}

/// The in-process server's checkpoint saver (one shard holding everything).
fn saver_for(policy: &CheckpointPolicy, cfg: &TrainConfig, layout: &Layout) -> Saver {
    let identity = ShardIdentity {
        run_id: policy.run_id.clone(),
        shard: 0,
        shards: 1,
        range: 0..layout.len(),
        fingerprint: layout.fingerprint(),
    };
    Saver::new(
        policy,
        identity,
        &cfg.plan.model,
        format!("{:?}", cfg.plan),
        layout.shapes(),
    )
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
