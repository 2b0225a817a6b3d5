//! The embedded parameter server: one `ServerCore` behind a mutex, with a condition variable
//! for the sync barrier, shared by worker threads in one process.

use pstrain_core::client::{ClientError, ParameterClient, PullReply};
use pstrain_core::{CoreState, PushMeta, PushOutcome, ServerCore, ServerStats};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};

pub struct InProcServer {
    state: Mutex<State>,
    changed: Condvar,
}

struct State {
    core: ServerCore,
    closed: bool,
}

impl InProcServer {
    pub fn new(core: ServerCore) -> Arc<Self> {
        Arc::new(InProcServer {
            state: Mutex::new(State {
                core,
                closed: false,
            }),
            changed: Condvar::new(),
        })
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // A worker thread that panicked while holding the lock leaves the core consistent
        // (every mutation completes before unlock or is refused first), so carry on.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn client(self: &Arc<Self>, rank: usize) -> InProcClient {
        InProcClient {
            server: Arc::clone(self),
            rank,
        }
    }

    pub fn stats(&self) -> ServerStats {
        self.lock().core.stats()
    }

    /// The counters and a copy of the weights, taken together (for evaluation, checkpoints).
    pub fn snapshot(&self) -> (ServerStats, Vec<f32>) {
        let state = self.lock();
        (state.core.stats(), state.core.params().to_vec())
    }

    /// The core's complete state, for checkpoints.
    pub fn state(&self) -> CoreState {
        self.lock().core.state()
    }

    /// Ends the run: waiting pulls return `done`, pushes are no longer applied.
    pub fn close(&self) {
        self.lock().closed = true;
        self.changed.notify_all();
    }

    fn leave(&self, rank: usize) {
        let mut state = self.lock();
        if state.core.leave(rank).is_some() {
            self.changed.notify_all();
        }
    }
}

pub struct InProcClient {
    server: Arc<InProcServer>,
    rank: usize,
}

impl ParameterClient for InProcClient {
    fn pull(
        &mut self,
        params: &mut [f32],
        newer_than: Option<u64>,
        wait: bool,
    ) -> Result<PullReply, ClientError> {
        let mut state = self.server.lock();
        let expected = state.core.params().len();
        if params.len() != expected {
            return Err(ClientError::Shape {
                expected,
                got: params.len(),
            });
        }
        let newer = |s: &State| newer_than.is_none_or(|v| s.core.version() > v);
        let finished = |s: &State| s.closed || s.core.is_done();
        if wait {
            while !newer(&state) && !finished(&state) {
                state = self
                    .server
                    .changed
                    .wait(state)
                    .unwrap_or_else(|e| e.into_inner());
            }
        }
        let updated = newer(&state);
        if updated {
            params.copy_from_slice(state.core.params());
        }
        Ok(PullReply {
            version: state.core.version(),
            updated,
            done: finished(&state),
        })
    }

    fn push(&mut self, meta: PushMeta, grad: &[f32]) -> Result<PushOutcome, ClientError> {
        let meta = PushMeta {
            rank: self.rank,
            ..meta
        };
        let mut state = self.server.lock();
        if state.closed {
            return Ok(PushOutcome::Done);
        }
        let before = state.core.version();
        let result = state.core.push(meta, grad);
        if state.core.version() != before || state.core.is_done() {
            self.server.changed.notify_all();
        }
        Ok(result?)
    }

    fn leave(&mut self) -> Result<(), ClientError> {
        self.server.leave(self.rank);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use pstrain_core::{Mode, OptimizerConfig, ServerConfig};
    use std::thread;

    fn meta(v: u64) -> PushMeta {
        PushMeta {
            rank: 0,
            base_version: v,
            samples: 1,
            loss: 0.0,
        }
    }

    #[test]
    fn sync_pull_waits_for_the_step_and_leave_releases_it() {
        let core = ServerCore::new(
            ServerConfig {
                mode: Mode::Sync { backup_workers: 0 },
                workers: 2,
                optimizer: OptimizerConfig::sgd(1.0),
                ..Default::default()
            },
            vec![0.0; 3],
        )
        .unwrap();
        let server = InProcServer::new(core);
        let mut c0 = server.client(0);
        let mut c1 = server.client(1);
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
                done: false
            }
        );
        assert_eq!(p, vec![-1.0; 3]);
    }

    #[test]
    fn pull_newer_than_leaves_buffer_alone_and_close_ends_waits() {
        let core = ServerCore::new(ServerConfig::default(), vec![1.0; 2]).unwrap();
        let server = InProcServer::new(core);
        let mut c = server.client(0);
        let mut p = vec![5.0; 2];
        let r = c.pull(&mut p, Some(0), false).unwrap();
        assert!(!r.updated && !r.done);
        assert_eq!(p, vec![5.0; 2]);
        assert!(c.pull(&mut [0.0; 3], None, false).is_err());
        let s2 = Arc::clone(&server);
        let waiter = thread::spawn(move || c.pull(&mut p, Some(0), true).unwrap());
        s2.close();
        assert!(waiter.join().unwrap().done);
    }
}
