//! The shard server: a listener that accepts connections and spawns a `session` per peer;
//! the sessions' `handlers` apply requests to this shard's `ShardEngine` (in `shared`); timers
//! evict silent workers and take time-based checkpoints (`checkpoints`). `handle` runs a shard
//! on a runtime of its own for the CLI, the Python module, the benchmark and the tests.

mod checkpoints;
mod handle;
mod handlers;
mod handshake;
mod lanes;
mod pull;
mod pull_copies;
mod refusal_log;
mod session;
mod shared;
mod update_threads;

pub use handle::ShardHandle;

use crate::auth::RunToken;
use crate::error::NetError;
use crate::tls::TlsServer;
use pstrain_core::{
    shard_ranges, EngineConfig, Layout, RunPlan, ShardCounters, ShardEngine, ShardSnapshot,
    WorkerStats,
};
use pstrain_observe::Watcher;
use pstrain_store::{CheckpointPolicy, Saver};
use shared::Shared;
use std::future::Future;
use std::net::SocketAddr;
use std::ops::Range;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::net::TcpListener;
use tokio::sync::mpsc;

#[derive(Debug, Clone)]
pub struct ShardConfig {
    pub shard: usize,
    pub shards: usize,
    /// The whole model's layout; this shard owns `shard_ranges(len, shards)[shard]`.
    pub layout: Layout,
    /// The run this shard serves; workers and observers adopt it in the handshake.
    pub plan: RunPlan,
    /// Deadline for each read or write once a frame is under way.
    pub io_timeout: Duration,
    /// A peer silent this long between frames is dropped.
    pub idle_timeout: Duration,
    /// A worker whose heartbeats (once started) stop for this long leaves the quorum.
    pub heartbeat_timeout: Duration,
    /// Stop once every worker rank has joined and left and no connection is open.
    pub exit_when_finished: bool,
    /// Checkpoint this shard (and restore its newest valid checkpoint at start).
    pub checkpoint: Option<CheckpointPolicy>,
    /// Start from the initial weights even if the checkpoint folder holds files this shard
    /// cannot use (without it such a folder is an error).
    pub fresh: bool,
    /// Seal checkpoints with the token's key (and restore only sealed ones). Off for a token
    /// made for one launch (`pstrain train --transport tcp` without `--token-file`): the
    /// checkpoints must outlive it for `--resume`, as an in-process run's do.
    pub seal_checkpoints: bool,
    /// The run's secret: every peer must prove it holds it before anything else. Without
    /// one the shard serves loopback only (protected mode).
    pub token: Option<RunToken>,
    /// Serve over TLS with this certificate.
    pub tls: Option<TlsServer>,
    /// The whole handshake (challenge, hello) must be over within this.
    pub handshake_timeout: Duration,
    /// Connections open at once, in all and from one address; more are closed on accept.
    pub max_connections: usize,
    pub max_connections_per_address: usize,
    /// Of those, connections whose peer has not proven the token yet, in all and from one
    /// address: strangers on a few addresses cannot take the slots of the run's peers.
    pub max_unproven: usize,
    pub max_unproven_per_address: usize,
    /// Serve `/metrics` (Prometheus) and the live page on this address.
    pub metrics_addr: Option<String>,
    /// Bytes the pushes being received at once may hold (their wire bytes and decoded
    /// values): a push past it waits, unread, until earlier ones are applied, so a fleet
    /// pushing at once cannot take a buffer each. Never less than one largest push. In async
    /// and buffered modes the weight copies pulls are sent from take as much again, at least
    /// two (past it a pull gets the newest copy still being sent).
    pub receive_budget: usize,
    /// Bytes of shared memory this shard may give to lanes (`crate::lane`) for workers on
    /// its host, all lanes together; 0 turns lanes off (every worker stays on TCP). A lane
    /// holds two copies of the shard's slice.
    pub lane_budget: u64,
}

/// `ShardConfig::lane_budget` by default.
pub const DEFAULT_LANE_BUDGET: u64 = 1 << 30;

/// `ShardConfig::receive_budget` by default: room for dozens of the cnn's fp32 pushes.
pub const DEFAULT_RECEIVE_BUDGET: usize = 256 << 20;

/// The connection cap for a run of `workers`: two per worker and room for observers and
/// reconnects, at least 512.
fn connections_for(workers: usize) -> usize {
    workers.saturating_mul(2).saturating_add(64).max(512)
}

impl ShardConfig {
    /// Shard `shard` of `shards` with the default deadlines, exiting when the run is over,
    /// without checkpoints.
    pub fn new(shard: usize, shards: usize, layout: Layout, plan: RunPlan) -> Self {
        let connections = connections_for(plan.workers);
        ShardConfig {
            shard,
            shards,
            layout,
            plan,
            io_timeout: Duration::from_secs(30),
            idle_timeout: Duration::from_secs(120),
            heartbeat_timeout: Duration::from_secs(10),
            exit_when_finished: true,
            checkpoint: None,
            fresh: false,
            seal_checkpoints: true,
            token: None,
            tls: None,
            handshake_timeout: Duration::from_secs(10),
            // Each worker holds two connections (its own and its heartbeat's), and a fleet
            // may sit behind one address (a NAT, or a test host).
            max_connections: connections,
            max_connections_per_address: connections,
            max_unproven: 128,
            max_unproven_per_address: 16,
            metrics_addr: None,
            receive_budget: DEFAULT_RECEIVE_BUDGET,
            lane_budget: DEFAULT_LANE_BUDGET,
        }
    }

    pub fn range(&self) -> Range<usize> {
        shard_ranges(self.layout.len(), self.shards)
            .get(self.shard)
            .cloned()
            .unwrap_or(0..0)
    }

    fn engine_config(&self) -> EngineConfig {
        let policy = self.checkpoint.as_ref();
        EngineConfig {
            shard: self.shard,
            shards: self.shards,
            server: self.plan.server_config(),
            heartbeat_timeout: self.heartbeat_timeout,
            checkpoint_every_updates: policy.and_then(|p| p.every_updates),
            checkpoint_every: policy.and_then(|p| p.every),
        }
    }
}

/// What happened on the shard's connections, besides the engine's own counters.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ConnectionEvents {
    pub accepted: u64,
    pub refused_handshakes: u64,
    /// Connections closed for a malformed, oversized or unexpected frame or a timeout.
    pub protocol_errors: u64,
    /// Workers that went away without a goodbye (or whose heartbeats stopped).
    pub vanished_workers: u64,
    /// Peers that did not prove they hold the run token.
    pub unauthorized: u64,
    /// Connections closed on accept because the caps were reached.
    pub over_capacity: u64,
}

#[derive(Debug, Clone)]
pub struct ShardReport {
    pub stats: ShardCounters,
    pub events: ConnectionEvents,
    pub params: Vec<f32>,
    /// Each worker rank as this shard saw it (its gradients, link and codecs).
    pub workers: Vec<WorkerStats>,
    /// Why the final checkpoint could not be written, if it could not.
    pub final_checkpoint_error: Option<String>,
}

pub struct ShardServer {
    listener: TcpListener,
    shared: Arc<Shared>,
    saver: Option<Saver>,
    queue: Option<mpsc::Receiver<ShardSnapshot>>,
    /// `/metrics` and the live page, while the shard serves.
    watcher: Option<Watcher>,
    /// This shard's beacon for its peers' restarts (multi-shard runs with checkpoints).
    beaconing: Option<checkpoints::Beaconing>,
}

/// How often the server looks for workers whose heartbeats stopped.
const HEARTBEAT_CHECK: Duration = Duration::from_millis(250);
/// How often the server looks at its time-based checkpoint schedule.
const CHECKPOINT_TICK: Duration = Duration::from_millis(100);

impl ShardServer {
    /// Binds `addr` and sets up the shard with its slice of `initial` (the whole model),
    /// restoring its newest checkpoint if it keeps them.
    pub async fn bind(addr: &str, cfg: ShardConfig, initial: &[f32]) -> Result<Self, NetError> {
        if initial.len() != cfg.layout.len() || cfg.shard >= cfg.shards {
            return Err(NetError::Config(format!(
                "shard {} of {} over {} initial values for a layout of {}",
                cfg.shard,
                cfg.shards,
                initial.len(),
                cfg.layout.len()
            )));
        }
        let started = Instant::now();
        let range = cfg.range();
        let mut engine = ShardEngine::new(
            cfg.engine_config(),
            initial[range.clone()].to_vec(),
            Duration::ZERO,
        )
        .map_err(|e| NetError::Config(e.to_string()))?;
        if cfg.plan.keeps_update_log() {
            engine.keep_update_log(pstrain_core::RunPlan::update_log_budget(range.len()));
        }
        let from_point = checkpoints::restore_from_point(&cfg).await;
        let (saver, restored_point) = checkpoints::restore(&cfg, &range, &mut engine, from_point)?;
        let beaconing = checkpoints::Beaconing::new(&cfg, restored_point);
        let listener = TcpListener::bind(addr).await?;
        let bound = listener.local_addr()?;
        if cfg.token.is_none() && !bound.ip().is_loopback() {
            return Err(NetError::Unprotected(bound.to_string()));
        }
        let (snapshots, queue) = match saver {
            Some(_) => {
                // One snapshot deep: checkpoints cannot fall further behind than that.
                let (tx, rx) = mpsc::channel(1);
                (Some(tx), Some(rx))
            }
            None => (None, None),
        };
        let metrics_addr = cfg.metrics_addr.clone();
        let shared = Arc::new(Shared::new(cfg, range, engine, started, snapshots));
        let watcher = match metrics_addr {
            Some(addr) => {
                let source = Arc::clone(&shared);
                let token = shared.cfg.token.as_ref().map(RunToken::to_hex);
                let latencies = shared.latencies.clone();
                let w = Watcher::start(&addr, token, Arc::new(move || source.observe()), latencies)
                    .map_err(|e| NetError::Metrics(e.to_string()))?;
                shared.log(&format!("metrics and live page at {}", w.url()));
                Some(w)
            }
            None => None,
        };
        Ok(ShardServer {
            listener,
            shared,
            saver,
            queue,
            watcher,
            beaconing,
        })
    }

    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    /// Where `/metrics` and the live page are served, if they are.
    pub fn metrics_addr(&self) -> Option<SocketAddr> {
        self.watcher.as_ref().map(Watcher::addr)
    }

    /// Serves until `shutdown` completes or, with `exit_when_finished`, the run is over.
    pub async fn run(self, shutdown: impl Future<Output = ()>) -> ShardReport {
        tokio::pin!(shutdown);
        let _watcher = self.watcher;
        let shared = self.shared;
        let (mut saver, mut queue) = (self.saver, self.queue);
        let mut beaconing = self.beaconing;
        let mut beat_check = tokio::time::interval(HEARTBEAT_CHECK);
        let mut checkpoint_tick = tokio::time::interval(CHECKPOINT_TICK);
        loop {
            tokio::select! {
                _ = beat_check.tick() => shared.evict_silent_workers(),
                Some(state) = checkpoints::next(&mut queue) => {
                    checkpoints::write(&shared, &mut saver, state).await;
                }
                _ = checkpoint_tick.tick(), if saver.is_some() => {
                    if let Some(b) = beaconing.as_mut() {
                        b.tick(shared.lock().engine.version());
                    }
                    let due = shared.lock().engine.checkpoint_due(shared.now());
                    if let Some(state) = due {
                        checkpoints::write(&shared, &mut saver, state).await;
                    }
                }
                accepted = self.listener.accept() => match accepted {
                    Ok((stream, peer)) => {
                        // Over the caps the socket is dropped at once: no task, no buffers.
                        if shared.admit(peer.ip()) {
                            tokio::spawn(session::handle(Arc::clone(&shared), stream, peer.ip()));
                        }
                    }
                    Err(e) => {
                        // Out of descriptors and the like: back off instead of spinning.
                        shared.log(&format!("accept failed: {e}"));
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                },
                _ = &mut shutdown => break,
                _ = shared.finished.notified() => break,
            }
        }
        // Waiting pulls see `done` and return; later requests find the listener gone.
        let state = shared.lock();
        shared.version.send_replace((state.engine.version(), true));
        let final_checkpoint_error = checkpoints::final_save(&shared, saver, &state.engine);
        if let Some(b) = beaconing {
            b.remove();
        }
        ShardReport {
            stats: state.engine.stats(),
            events: state.events,
            params: state.engine.params().to_vec(),
            workers: state.engine.worker_stats(),
            final_checkpoint_error,
        }
    }
}
