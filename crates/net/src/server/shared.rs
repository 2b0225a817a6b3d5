//! What a shard's sessions share: its engine and connection counters behind one lock, the
//! version channel that wakes waiting pulls, the clock, and the "run is over" signal.

use super::pull_copies::PullCopies;
use super::refusal_log::RefusalLog;
use super::update_threads::UpdateThreads;
use super::{ConnectionEvents, ShardConfig};
use pstrain_core::{PushCodec, ReplayingPeers, ShardEngine, ShardSnapshot, Splitter};
use pstrain_observe::{Latencies, RunSnapshot, ShardView};
use std::collections::HashMap;
use std::net::IpAddr;
use std::ops::Range;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, watch, Notify, Semaphore, SemaphorePermit};

/// The buffers lent to one push being received, and its share of the receive budget.
pub(super) struct Lease<'a> {
    shared: &'a Shared,
    /// The push's values, decoded.
    pub buf: Vec<f32>,
    /// Its wire bytes, under a compressed push codec.
    pub wire: Vec<u8>,
    /// Held until the buffers are back: what lets the next push past the budget be read.
    _budget: Option<SemaphorePermit<'a>>,
}

impl Drop for Lease<'_> {
    fn drop(&mut self) {
        let mut pool = self
            .shared
            .buffers
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        // The pool holds no more than the pushes the budget lets in at once had.
        pool.push((
            std::mem::take(&mut self.buf),
            std::mem::take(&mut self.wire),
        ));
    }
}

/// The receive budget is counted in units of this many bytes (a push's count fits a `u32`).
const BUDGET_UNIT: usize = 1 << 20;

/// The budget units one push being received takes: what its buffers can hold at most, the
/// slice's values decoded and, if the run allows compressed pushes, the largest one's wire
/// bytes (an fp32 push is read straight into the values).
fn push_units(cfg: &ShardConfig, values: usize) -> usize {
    let wire = if cfg.plan.auto_codecs || cfg.plan.push_codec != PushCodec::Fp32 {
        cfg.plan.largest_push(values)
    } else {
        0
    };
    (4 * values + wire).div_ceil(BUDGET_UNIT).max(1)
}

/// How long a shard whose workers are gone (not all with a goodbye) or that is done with no
/// worker waits, with no connection open, before it ends.
const FINISH_GRACE: Duration = Duration::from_secs(5);

/// How often one address's refusals are logged, and how many addresses are remembered.
const UNAUTHORIZED_LOG_EVERY: Duration = Duration::from_secs(60);
const UNAUTHORIZED_LOG_ADDRESSES: usize = 4096;

pub(super) struct State {
    pub engine: ShardEngine,
    /// Connections open now, in all and by peer address.
    pub open: usize,
    pub open_by_address: HashMap<IpAddr, usize>,
    /// Of those, the connections whose peer has not proven the token yet.
    pub unproven: usize,
    pub unproven_by_address: HashMap<IpAddr, usize>,
    /// Of the proven ones, those that only carry a worker's heartbeats (see `check_finished`
    /// for when they keep a run open).
    pub heartbeat_links: usize,
    /// Refusals (handshakes, protocol errors) logged at a bounded rate.
    pub refusal_log: RefusalLog,
    pub events: ConnectionEvents,
    /// When each address was last logged as unauthorized (the log is rate-limited).
    pub logged_unauthorized: HashMap<IpAddr, Instant>,
    /// The address each worker rank last joined from.
    pub worker_addresses: HashMap<usize, String>,
    /// When the last checkpoint was written, and how long it took.
    pub last_checkpoint: Option<(Instant, Duration)>,
    /// When a proven connection last opened or closed (the shard's end waits for some quiet).
    pub quiet_since: Instant,
    /// Checkpoints that failed, in all and since the last one written, and the last error.
    pub checkpoint_failures: u64,
    pub failures_in_a_row: u32,
    pub checkpoint_error: Option<String>,
    /// The weights as copied for the pulls being sent.
    pub pull_copies: PullCopies,
    /// Which workers pull by replay and what they push (what their peers' pushes bind).
    pub replaying: ReplayingPeers,
}

pub(super) struct Shared {
    pub cfg: ShardConfig,
    pub range: Range<usize>,
    started: Instant,
    state: Mutex<State>,
    /// (version, done) after every change, for pulls waiting at the consistency gate.
    pub version: watch::Sender<(u64, bool)>,
    pub finished: Notify,
    /// Permits to read an unproven hello larger than `handshake::SMALL_HELLO`.
    pub large_hellos: Semaphore,
    /// The largest hello read (`message::hello_limit` of this shard's layout).
    pub hello_limit: u64,
    /// Buffers lent to pushes being received (a connection holds none between requests),
    /// kept for reuse, so the steady state allocates nothing: as many as the receive budget
    /// let in at once.
    buffers: Mutex<Vec<(Vec<f32>, Vec<u8>)>>,
    /// `ShardConfig::receive_budget` in `BUDGET_UNIT`s (at least one push's), taken by each
    /// push being received.
    receiving: Semaphore,
    /// The units a push takes: what its lease's buffers can hold.
    per_push: usize,
    /// With `--checkpoint-every N`: the writer's queue. The state is snapshotted in the push
    /// that reaches the update count, so a crash loses at most N plus what is being written.
    pub snapshots: Option<mpsc::Sender<ShardSnapshot>>,
    /// Request latencies and bytes for `/metrics` (when it is served).
    pub latencies: Option<Latencies>,
    /// Shared-memory bytes the connections' lanes hold now (at most `cfg.lane_budget`).
    pub lane_bytes: std::sync::atomic::AtomicU64,
    /// The host's cores lent to loops over the slice (the engine's, and the lanes' copies).
    pub threads: Option<Arc<dyn Splitter>>,
}

impl Shared {
    pub fn new(
        cfg: ShardConfig,
        range: Range<usize>,
        mut engine: ShardEngine,
        started: Instant,
        snapshots: Option<mpsc::Sender<ShardSnapshot>>,
    ) -> Self {
        let threads = UpdateThreads::for_host().map(|t| Arc::new(t) as Arc<dyn Splitter>);
        engine.set_splitter(threads.clone());
        let (version, _) = watch::channel((engine.version(), engine.is_done()));
        let per_push = push_units(&cfg, range.len());
        let pull_copies = PullCopies::new(
            cfg.receive_budget / (4 * range.len()).max(1),
            !cfg.plan.mode.pull_waits(),
        );
        let replaying = ReplayingPeers::new(cfg.plan.workers);
        let budget_units = cfg.receive_budget.div_ceil(BUDGET_UNIT).max(per_push);
        let latencies = cfg
            .metrics_addr
            .is_some()
            .then(|| Latencies::new(cfg.shard));
        let hello_limit =
            crate::message::hello_limit(cfg.shard, cfg.shards, &cfg.plan, &cfg.layout);
        Shared {
            hello_limit,
            threads,
            latencies,
            lane_bytes: std::sync::atomic::AtomicU64::new(0),
            cfg,
            range,
            started,
            state: Mutex::new(State {
                engine,
                open: 0,
                open_by_address: HashMap::new(),
                unproven: 0,
                unproven_by_address: HashMap::new(),
                heartbeat_links: 0,
                refusal_log: RefusalLog::default(),
                events: ConnectionEvents::default(),
                logged_unauthorized: HashMap::new(),
                worker_addresses: HashMap::new(),
                last_checkpoint: None,
                quiet_since: Instant::now(),
                checkpoint_failures: 0,
                failures_in_a_row: 0,
                checkpoint_error: None,
                pull_copies,
                replaying,
            }),
            version,
            finished: Notify::new(),
            large_hellos: Semaphore::new(super::handshake::LARGE_HELLOS),
            snapshots,
            buffers: Mutex::new(Vec::new()),
            receiving: Semaphore::new(budget_units),
            per_push,
        }
    }

    /// Buffers for a push, once the receive budget has room for one (they go back, and the
    /// room with them, when the lease drops).
    pub async fn lease_for_push(&self) -> Lease<'_> {
        // The semaphore is never closed; were it, the push would go on unbudgeted.
        let budget = self.receiving.acquire_many(self.per_push as u32).await.ok();
        let (buf, wire) = self
            .buffers
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .pop()
            .unwrap_or_default();
        Lease {
            shared: self,
            buf,
            wire,
            _budget: budget,
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

    /// What a watcher shows of this shard now.
    pub fn observe(&self) -> RunSnapshot {
        let now = self.now();
        let state = self.lock();
        let engine = &state.engine;
        let mut view = ShardView::new(
            self.cfg.shard,
            &engine.stats(),
            &engine.worker_stats(),
            &engine.presence(now),
            now,
        );
        view.connections = Some(state.open as u64);
        if let Some((at, took)) = state.last_checkpoint {
            view.checkpoint_age_s = Some(at.elapsed().as_secs_f64());
            view.checkpoint_write_s = Some(took.as_secs_f64());
        }
        view.checkpoint_failures = state.checkpoint_failures;
        view.checkpoint_error = state.checkpoint_error.clone();
        for w in &mut view.workers {
            w.address = state.worker_addresses.get(&w.rank).cloned();
        }
        let plan = &self.cfg.plan;
        RunSnapshot {
            title: format!(
                "{}, {}, {} workers, shard {} of {}",
                plan.model, plan.mode, plan.workers, self.cfg.shard, self.cfg.shards
            ),
            plan: pstrain_observe::plan_fields(plan),
            uptime_s: now.as_secs_f64(),
            shards: vec![view],
            evals: Vec::new(),
            history: Vec::new(),
            ..Default::default()
        }
    }

    /// Wakes waiting pulls after a change.
    pub fn publish(&self, state: &State) {
        self.version
            .send_replace((state.engine.version(), state.engine.is_done()));
    }

    pub fn log(&self, msg: &str) {
        pstrain_observe::log_line!("[shard {}] {msg}", self.cfg.shard);
    }

    /// Signals the run loop when the run is over for this shard and no proven peer is still
    /// connected: at once when every worker has come and left with a goodbye; after
    /// `FINISH_GRACE` of quiet when every worker has gone (some vanished: they may come back,
    /// as a restarted worker does) or the shard is done and no worker is there (a shard
    /// restarted at the budget after the workers had finished). Connections that never proved
    /// the token neither keep a run alive nor count as activity: a stranger reconnecting
    /// all the time cannot hold a finished shard (and its final checkpoint) open. Heartbeat
    /// connections keep it open only while a vanished worker may come back: once every
    /// worker said goodbye, or the shard is done, they are a client left in scope, not a
    /// worker on its way.
    pub fn check_finished(&self, state: &State) {
        let engine = &state.engine;
        if !self.cfg.exit_when_finished || engine.workers_present() > 0 {
            return;
        }
        let proven_open = state.open - state.unproven;
        let beyond_heartbeats = proven_open - state.heartbeat_links;
        let quiet = state.quiet_since.elapsed() >= FINISH_GRACE;
        let over = (beyond_heartbeats == 0
            && (engine.all_said_goodbye() || (quiet && engine.is_done())))
            || (proven_open == 0 && quiet && engine.all_departed());
        if over {
            self.finished.notify_one();
        }
    }

    /// Counts a new connection from `ip` in (as unproven), unless a cap is reached: the
    /// connections in all and from one address, and those not yet proven, in all and from one
    /// address (so that a few addresses of strangers cannot hold every slot).
    pub fn admit(&self, ip: IpAddr) -> bool {
        let cfg = &self.cfg;
        let mut state = self.lock();
        state.events.accepted += 1;
        let from_ip = state.open_by_address.get(&ip).copied().unwrap_or(0);
        let unproven_ip = state.unproven_by_address.get(&ip).copied().unwrap_or(0);
        if state.open >= cfg.max_connections
            || from_ip >= cfg.max_connections_per_address
            || state.unproven >= cfg.max_unproven
            || unproven_ip >= cfg.max_unproven_per_address
        {
            state.events.over_capacity += 1;
            return false;
        }
        state.open += 1;
        *state.open_by_address.entry(ip).or_insert(0) += 1;
        state.unproven += 1;
        *state.unproven_by_address.entry(ip).or_insert(0) += 1;
        true
    }

    /// The connection from `ip` got through the handshake: it no longer counts as unproven.
    pub fn proven(&self, state: &mut State, ip: IpAddr) {
        state.unproven -= 1;
        decrement(&mut state.unproven_by_address, ip);
        state.quiet_since = Instant::now();
    }

    /// A connection from `ip` closed (`proven`: after its handshake).
    pub fn release(&self, state: &mut State, ip: IpAddr, proven: bool) {
        state.open -= 1;
        decrement(&mut state.open_by_address, ip);
        if proven {
            state.quiet_since = Instant::now();
        } else {
            state.unproven -= 1;
            decrement(&mut state.unproven_by_address, ip);
        }
    }

    /// Logs a refusal at a bounded rate, its text escaped and cut.
    pub fn log_refusal(&self, state: &mut State, text: &str) {
        if let Some(line) = state.refusal_log.line(text, Instant::now()) {
            self.log(&line);
        }
    }

    /// Logs an unauthorized peer once per address per minute (strangers may knock often).
    pub fn log_unauthorized(&self, state: &mut State, ip: IpAddr, why: &str) {
        state.events.unauthorized += 1;
        let now = Instant::now();
        let quiet = state
            .logged_unauthorized
            .get(&ip)
            .is_some_and(|t| now.duration_since(*t) < UNAUTHORIZED_LOG_EVERY);
        if quiet {
            return;
        }
        if state.logged_unauthorized.len() >= UNAUTHORIZED_LOG_ADDRESSES {
            state.logged_unauthorized.clear();
        }
        state.logged_unauthorized.insert(ip, now);
        self.log(&format!(
            "refused {ip}: {} (logged once a minute per address)",
            super::refusal_log::escape(why)
        ));
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

/// One fewer for `ip`; the entry goes when it reaches zero.
fn decrement(counts: &mut HashMap<IpAddr, usize>, ip: IpAddr) {
    if let Some(n) = counts.get_mut(&ip) {
        *n -= 1;
        if *n == 0 {
            counts.remove(&ip);
        }
    }
}
