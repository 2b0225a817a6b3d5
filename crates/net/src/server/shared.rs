//! What a shard's sessions share: its engine and connection counters behind one lock, the
//! version channel that wakes waiting pulls, the clock, and the "run is over" signal.

use super::{ConnectionEvents, ShardConfig};
use pstrain_core::{CoreState, ShardEngine};
use std::ops::Range;
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, watch, Notify};

pub(super) struct State {
    pub engine: ShardEngine,
    /// Connections open now.
    pub open: usize,
    pub events: ConnectionEvents,
}

pub(super) struct Shared {
    pub cfg: ShardConfig,
    pub range: Range<usize>,
    started: Instant,
    state: Mutex<State>,
    /// (version, done) after every change, for pulls waiting at the consistency gate.
    pub version: watch::Sender<(u64, bool)>,
    pub finished: Notify,
    /// With `--checkpoint-every N`: the writer's queue. The state is snapshotted in the push
    /// that reaches the update count, so a crash loses at most N plus what is being written.
    pub snapshots: Option<mpsc::Sender<CoreState>>,
}

impl Shared {
    pub fn new(
        cfg: ShardConfig,
        range: Range<usize>,
        engine: ShardEngine,
        started: Instant,
        snapshots: Option<mpsc::Sender<CoreState>>,
    ) -> Self {
        let (version, _) = watch::channel((engine.version(), engine.is_done()));
        Shared {
            cfg,
            range,
            started,
            state: Mutex::new(State {
                engine,
                open: 0,
                events: ConnectionEvents::default(),
            }),
            version,
            finished: Notify::new(),
            snapshots,
        }
    }

    pub fn lock(&self) -> MutexGuard<'_, State> {
        // Every change to the engine completes before the lock is released or is refused
        // first, so a panicked holder leaves it consistent.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The engine's clock: time since this shard started.
    pub fn now(&self) -> Duration {
        self.started.elapsed()
    }

    /// Wakes waiting pulls after a change.
    pub fn publish(&self, state: &State) {
        self.version
            .send_replace((state.engine.version(), state.engine.is_done()));
    }

    pub fn log(&self, msg: &str) {
        eprintln!("[shard {}] {msg}", self.cfg.shard);
    }

    /// Signals the run loop once every worker has come and gone and no connection is open.
    pub fn check_finished(&self, state: &State) {
        if self.cfg.exit_when_finished && state.engine.all_departed() && state.open == 0 {
            self.finished.notify_one();
        }
    }

    /// Takes out of the quorum every worker whose heartbeats stopped.
    pub fn evict_silent_workers(&self) {
        let mut state = self.lock();
        let evicted = state.engine.evict_silent(self.now());
        for rank in &evicted {
            state.events.vanished_workers += 1;
            self.log(&format!(
                "worker {rank} sent no heartbeat for {:.1} s; it leaves the quorum",
                self.cfg.heartbeat_timeout.as_secs_f64()
            ));
        }
        if !evicted.is_empty() {
            self.publish(&state);
        }
        self.check_finished(&state);
    }
}
