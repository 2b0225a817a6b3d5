//! `pstrain train` in one process: the embedded server and N worker threads, a monitor that
//! evaluates the server's weights on the test set, and the run's summary.

use crate::report::observer::WatchedObserver;
use crate::report::Observer;
use crate::run::inproc::InProcServer;
use crate::run::monitor::{Monitor, ServerView};
use crate::run::worker::{run_worker, WorkerData, WorkerReport};
use crate::run::{CheckpointPolicy, TrainConfig, TrainError, TrainOutcome};
use pstrain_compute::mnist::{Mnist, Split};
use pstrain_compute::{ModelOptions, ModelSpec};
use pstrain_core::{EngineConfig, Layout, ShardCounters, ShardEngine, ShardSnapshot, WorkerStats};
use pstrain_observe::{plan_fields, EvalPoint, RunSnapshot, Watcher};
use pstrain_store::{ResumeError, Saver, ShardIdentity};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant};

/// How often the monitor samples the server's counters.
const TICK: Duration = Duration::from_millis(200);

/// Trains `cfg.model` on `data` with an embedded server and `cfg.workers` worker threads.
/// `stop` ends the run early (Ctrl-C); the summary then describes the weights reached.
pub fn train(
    cfg: &TrainConfig,
    data: &Mnist,
    observer: &mut dyn Observer,
    stop: &AtomicBool,
) -> Result<TrainOutcome, TrainError> {
    cfg.validate()?;
    cfg.check_data(data.train.len())?;
    // Both splits, so that a model of other images is never handed these (`pstrain train`
    // sizes it from the data first: `TrainConfig::adopt_data_shape`).
    cfg.check_data_shape(data.train.shape)?;
    cfg.check_data_shape(data.test.shape)?;
    cfg.check_memory(cfg.plan.workers)?;
    let model = cfg.model()?;
    let (engine, mut saver) = start_engine(cfg, model, observer)?;
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
    let mut monitor = Monitor::new(cfg, model, Instant::now());
    let run = Threads {
        cfg,
        model,
        data,
        server: &server,
        stop,
    };
    let reports = run.carry_out(&mut monitor, &mut saver, observer);
    let wall = monitor.start().elapsed();
    let reports = reports?;
    let not_applied = reports.iter().map(|r| r.not_applied).sum();
    if let Some(s) = &mut saver {
        // Also on Ctrl-C: the run can be resumed from exactly here.
        save(s, &server.state(), observer)?;
    }
    let mut view = &*server;
    let end = monitor.finish(&mut view, observer, &data.test)?;
    let mut outcome = end.into_outcome(cfg, wall, stop.load(Ordering::Relaxed), not_applied);
    outcome.summary.processes =
        crate::report::usage::this_process("server and workers (one process)")
            .into_iter()
            .collect();
    Ok(outcome)
}

/// The run's engine (resumed from its checkpoints if asked) and its checkpoint saver.
fn start_engine(
    cfg: &TrainConfig,
    model: ModelSpec,
    observer: &mut dyn Observer,
) -> Result<(ShardEngine, Option<Saver>), TrainError> {
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
            .map_err(|e| {
                // One process is one shard: the way back to a run of several is over TCP.
                let hint = match &e {
                    ResumeError::OtherShardCount { found, .. } => found.first(),
                    _ => None,
                };
                let hint = hint.map(|n| format!(" (--transport tcp --shards {n})"));
                let why = e.explained_for(&cfg.plan);
                TrainError::Resume(why + &hint.unwrap_or_default())
            })?;
        for p in &restored.skipped {
            observer.note(&format!("skipping checkpoint: {p}"));
        }
        observer.note(&format!(
            "resumed from {} (version {})",
            restored.path.display(),
            restored.version
        ));
        if let Some(changes) = cfg.plan.changes_since(&restored.config) {
            observer.note(&format!("changed from the checkpoint's run: {changes}"));
        }
    }
    // After the restore, whose refusals leave nothing behind (not even an empty folder).
    if let Some(saver) = &saver {
        saver.check_folder()?;
    }
    Ok((engine, saver))
}

/// The worker threads of a run and what they share.
struct Threads<'a> {
    cfg: &'a TrainConfig,
    model: ModelSpec,
    data: &'a Mnist,
    server: &'a Arc<InProcServer>,
    stop: &'a AtomicBool,
}

impl Threads<'_> {
    /// Runs every worker to its end while this thread monitors (and checkpoints) the server;
    /// the workers' reports, or the first failure.
    fn carry_out(
        &self,
        monitor: &mut Monitor,
        saver: &mut Option<Saver>,
        observer: &mut dyn Observer,
    ) -> Result<Vec<WorkerReport>, TrainError> {
        let (done_tx, done_rx) = mpsc::channel::<()>();
        // Workers see a stop only after the server is closed: one that left first would
        // complete a sync step with the others' gradients alone, and the final checkpoint
        // would hold a step the resumed run computes differently.
        let workers_stop = AtomicBool::new(false);
        let stop_workers = || {
            if self.stop.load(Ordering::Relaxed) && !workers_stop.load(Ordering::Relaxed) {
                self.server.close();
                workers_stop.store(true, Ordering::Relaxed);
            }
        };
        let (reports, monitor_failed) = std::thread::scope(|scope| {
            let handles: Vec<_> = (0..self.cfg.plan.workers)
                .map(|rank| {
                    let done_tx = done_tx.clone();
                    let workers_stop = &workers_stop;
                    scope.spawn(move || {
                        let result = self.worker(rank, workers_stop);
                        let _ = done_tx.send(());
                        result
                    })
                })
                .collect();
            drop(done_tx);
            let mut finished = 0;
            let mut monitor_failed = None;
            while finished < self.cfg.plan.workers {
                stop_workers();
                match done_rx.recv_timeout(TICK) {
                    Ok(()) => finished += 1,
                    Err(mpsc::RecvTimeoutError::Timeout) => {}
                    Err(mpsc::RecvTimeoutError::Disconnected) => break,
                }
                stop_workers();
                if monitor_failed.is_none() {
                    if let Err(e) = self.tick(monitor, saver, observer) {
                        monitor_failed = Some(e);
                        self.server.close();
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
        if let Some(e) = monitor_failed {
            return Err(e);
        }
        reports.into_iter().collect()
    }

    /// Worker `rank`'s whole run on its own thread.
    fn worker(&self, rank: usize, workers_stop: &AtomicBool) -> Result<WorkerReport, TrainError> {
        let options = ModelOptions {
            dropout: true,
            threads: self.cfg.threads,
        };
        let result = self
            .server
            .client(rank)
            .map_err(TrainError::from)
            .and_then(|mut client| {
                let mut model = self.model.build(options);
                run_worker(
                    &mut client,
                    model.as_mut(),
                    WorkerData::Whole(&self.data.train),
                    &self.cfg.worker_config(rank),
                    workers_stop,
                )
                .map_err(TrainError::from)
            });
        if result.is_err() {
            // Nobody may wait on a worker that is gone for good.
            self.server.close();
        }
        result
    }

    /// One look at the server: progress, an evaluation when due, a checkpoint when due.
    fn tick(
        &self,
        monitor: &mut Monitor,
        saver: &mut Option<Saver>,
        observer: &mut dyn Observer,
    ) -> Result<(), TrainError> {
        let mut view = &**self.server;
        let test: &Split = &self.data.test;
        monitor.tick(&mut view, observer, test)?;
        let Some(saver) = saver else { return Ok(()) };
        match self.server.take_snapshot() {
            Some(state) => save(saver, &state, observer),
            None => Ok(()),
        }
    }
}

impl ServerView for &InProcServer {
    fn stats(&mut self) -> Result<ShardCounters, TrainError> {
        Ok(InProcServer::stats(self))
    }

    fn snapshot(&mut self) -> Result<(ShardCounters, Vec<f32>), TrainError> {
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
        ..Default::default()
    };
    // The in-process run has no token: its watcher serves loopback only.
    Watcher::start(addr, None, Arc::new(source), None)
        .map_err(|e| TrainError::Metrics(e.to_string()))
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
        cfg.plan.record(),
        layout.shapes(),
    )
}

fn save(
    saver: &mut Saver,
    state: &ShardSnapshot,
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
