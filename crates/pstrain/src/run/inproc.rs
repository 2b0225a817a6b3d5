//! The embedded parameter server: one `ShardEngine` behind a mutex, with a condition variable
//! for the consistency gate, shared by worker threads in one process. Every decision is the
//! engine's; this only waits and wakes.

use pstrain_core::client::{ClientError, ParameterClient, PullReply};
use pstrain_core::{
    Departure, FanOut, JoinError, PullAsk, PullDecision, PushMeta, PushOutcome, RankRequest, Seat,
    ShardCounters, ShardEngine, ShardSnapshot, WorkerStats,
};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

pub struct InProcServer {
    state: Mutex<State>,
    changed: Condvar,
    started: Instant,
}

struct State {
    engine: ShardEngine,
    closed: bool,
    /// A snapshot taken inside the update that reached the checkpoint interval, waiting for
    /// the trainer's loop to write it.
    snapshot: Option<ShardSnapshot>,
}

impl InProcServer {
    pub fn new(engine: ShardEngine) -> Arc<Self> {
        Arc::new(InProcServer {
            state: Mutex::new(State {
                engine,
                closed: false,
                snapshot: None,
            }),
            changed: Condvar::new(),
            started: Instant::now(),
        })
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // A worker thread that panicked while holding the lock leaves the engine consistent
        // (every mutation completes before unlock or is refused first), so carry on.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn now(&self) -> Duration {
        self.started.elapsed()
    }

    /// A worker's connection as rank `rank` (it takes the rank in the engine's membership).
    pub fn client(self: &Arc<Self>, rank: usize) -> Result<InProcClient, JoinError> {
        let now = self.now();
        let mut state = self.lock();
        let seat = state.engine.join(RankRequest::Exact(rank), now)?;
        let fan = FanOut::new(state.engine.mode(), &[state.engine.version()]);
        drop(state);
        Ok(InProcClient {
            server: Arc::clone(self),
            seat,
            fan,
        })
    }

    pub fn stats(&self) -> ShardCounters {
        self.lock().engine.stats()
    }

    /// What a watcher shows of the engine now.
    pub fn observe(&self) -> pstrain_observe::ShardView {
        let now = self.now();
        let state = self.lock();
        let e = &state.engine;
        pstrain_observe::ShardView::new(0, &e.stats(), &e.worker_stats(), &e.presence(now), now)
    }

    /// What the engine saw of each worker rank.
    pub fn workers(&self) -> Vec<WorkerStats> {
        self.lock().engine.worker_stats()
    }

    /// The counters and a copy of the weights, taken together (for evaluation, checkpoints).
    pub fn snapshot(&self) -> (ShardCounters, Vec<f32>) {
        let state = self.lock();
        (state.engine.stats(), state.engine.params().to_vec())
    }

    /// The engine's complete state, for checkpoints.
    pub fn state(&self) -> ShardSnapshot {
        self.lock().engine.state()
    }

    /// A checkpoint due now: one the interval of updates produced, or the time-based one.
    pub fn take_snapshot(&self) -> Option<ShardSnapshot> {
        let now = self.now();
        let mut state = self.lock();
        state
            .snapshot
            .take()
            .or_else(|| state.engine.checkpoint_due(now))
    }

    /// Ends the run: waiting pulls return `done`, pushes are no longer applied.
    pub fn close(&self) {
        self.lock().closed = true;
        self.changed.notify_all();
    }
}

pub struct InProcClient {
    server: Arc<InProcServer>,
    seat: Seat,
    /// The client's side of the protocol over the one shard, as `TcpClient` keeps it over
    /// many: the version held, whether its last push is pending, what a pull asks.
    fan: FanOut,
}

impl ParameterClient for InProcClient {
    fn pull(
        &mut self,
        params: &mut [f32],
        newer_than: Option<u64>,
        wait: bool,
    ) -> Result<PullReply, ClientError> {
        let mut state = self.server.lock();
        let expected = state.engine.params().len();
        if params.len() != expected {
            return Err(ClientError::Shape {
                expected,
                got: params.len(),
            });
        }
        let arrived = self.server.now();
        let mut ask = self.fan.pull_ask(0, newer_than, wait);
        let whole = self.fan.needs_whole(0);
        let reply = loop {
            if state.closed {
                // A stopped run answers at once.
                ask.wait = false;
            }
            let now = self.server.now();
            match state.engine.pull(Some(self.seat.rank), ask, arrived, now) {
                PullDecision::Wait => {
                    state = self
                        .server
                        .changed
                        .wait(state)
                        .unwrap_or_else(|e| e.into_inner());
                }
                PullDecision::Answer(reply) if FanOut::ask_again(whole, &reply) => {
                    ask = PullAsk::WHOLE;
                }
                PullDecision::Answer(reply) => break reply,
            }
        };
        if reply.updated {
            params.copy_from_slice(state.engine.params());
        }
        self.fan.pulled(0, &reply);
        Ok(PullReply {
            done: state.closed || reply.done,
            ..reply
        })
    }

    fn push(&mut self, meta: PushMeta, grad: &[f32]) -> Result<PushOutcome, ClientError> {
        let meta = PushMeta {
            rank: self.seat.rank,
            ..meta
        };
        let now = self.server.now();
        let mut state = self.server.lock();
        if state.closed {
            return Ok(PushOutcome::Done);
        }
        // A push is a sign of life (in-process workers send no heartbeats).
        state.engine.heartbeat(self.seat.rank, now);
        let report = state.engine.push(meta, grad, None, now);
        if let Some(snapshot) = report.snapshot {
            state.snapshot = Some(snapshot);
        }
        if report.changed {
            self.server.changed.notify_all();
        }
        let outcome = report.outcome?;
        self.fan.pushed(0, &outcome);
        Ok(outcome)
    }

    fn leave(&mut self) -> Result<(), ClientError> {
        let mut state = self.server.lock();
        // A closed run changes no more: leaving must not complete a partial sync step.
        if !state.closed && state.engine.leave(self.seat, Departure::Goodbye) {
            self.server.changed.notify_all();
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use pstrain_core::{EngineConfig, Mode, OptimizerConfig, ServerConfig};
    use std::thread;

    fn meta(v: u64) -> PushMeta {
        PushMeta {
            rank: 0,
            base_version: v,
            samples: 1,
            loss: 0.0,
            accumulated: false,
        }
    }

    /// A sync run of 2 workers over 3 zeros, plain SGD with learning rate 1.
    fn sync_server_of_two() -> Arc<InProcServer> {
        let engine = ShardEngine::new(
            EngineConfig::single(ServerConfig {
                mode: Mode::Sync { backup_workers: 0 },
                workers: 2,
                optimizer: OptimizerConfig::sgd(1.0),
                ..Default::default()
            }),
            vec![0.0; 3],
            Duration::ZERO,
        )
        .unwrap();
        InProcServer::new(engine)
    }

    #[test]
    fn sync_pull_waits_for_the_step_and_leave_releases_it() {
        let server = sync_server_of_two();
        let mut c0 = server.client(0).unwrap();
        let mut c1 = server.client(1).unwrap();
        c0.push(meta(0), &[1.0; 3]).unwrap();
        let waiter = thread::spawn(move || {
            let mut p = vec![9.0; 3];
            let reply = c0.pull(&mut p, Some(0), true).unwrap();
            (reply, p)
        });
        c1.leave().unwrap();
        let (reply, p) = waiter.join().unwrap();
        assert_eq!(
            reply,
            PullReply {
                version: 1,
                updated: true,
                done: false,
                batch: None
            }
        );
        assert_eq!(p, vec![-1.0; 3]);
    }

    #[test]
    fn leaving_a_closed_run_completes_no_partial_step() {
        let server = sync_server_of_two();
        let mut c0 = server.client(0).unwrap();
        let mut c1 = server.client(1).unwrap();
        c1.push(meta(0), &[1.0; 3]).unwrap();
        server.close();
        c0.leave().unwrap();
        c1.leave().unwrap();
        let state = server.state();
        assert_eq!(state.version, 0, "a stopped run's last step stays undone");
        assert_eq!(state.params, vec![0.0; 3]);
    }

    #[test]
    fn pull_newer_than_leaves_buffer_alone_and_close_ends_waits() {
        let engine = ShardEngine::new(
            EngineConfig::single(ServerConfig::default()),
            vec![1.0; 2],
            Duration::ZERO,
        )
        .unwrap();
        let server = InProcServer::new(engine);
        let mut c = server.client(0).unwrap();
        assert!(server.client(0).is_err(), "a rank is held once");
        // A new client's first pull takes the weights whatever their version; after that
        // `newer_than` leaves the buffer alone when nothing is newer.
        let mut p = vec![5.0; 2];
        assert!(c.pull(&mut p, Some(0), false).unwrap().updated);
        assert_eq!(p, vec![1.0; 2]);
        p.fill(5.0);
        let r = c.pull(&mut p, Some(0), false).unwrap();
        assert!(!r.updated && !r.done);
        assert_eq!(p, vec![5.0; 2]);
        assert!(c.pull(&mut [0.0; 3], None, false).is_err());
        // A pull waiting at a sync barrier (its push is pending) ends when the run closes.
        let sync = sync_server_of_two();
        let mut c0 = sync.client(0).unwrap();
        assert!(matches!(
            c0.push(meta(0), &[1.0; 3]).unwrap(),
            PushOutcome::Buffered { .. }
        ));
        let waiter = thread::spawn(move || c0.pull(&mut [0.0; 3], Some(0), true).unwrap());
        thread::sleep(Duration::from_millis(50));
        assert!(!waiter.is_finished(), "the pull waits for the step");
        sync.close();
        assert!(waiter.join().unwrap().done);
    }
}
