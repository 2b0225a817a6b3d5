//! The shard server: accepts connections, checks each peer's handshake, and applies its
//! pulls and pushes to this shard's `ServerCore`. A bad peer loses its connection; everyone
//! else keeps training.

use crate::connection::Connection;
use crate::error::NetError;
use crate::protocol::{
    code, decode_pull, encode_error, kind, outcome, push_head_len, Hello, HelloOk, PushHead,
    PushReply, Role, ShardStats, Writer, ANY_RANK, HELLO_LIMIT, NO_STEP, PULL_REPLY_HEAD_LEN,
};
use pstrain_core::{
    shard_ranges, CoreState, Layout, Mode, PushError, PushMeta, PushOutcome, ServerConfig,
    ServerCore, ServerStats, StepFollower,
};
use pstrain_store::{CheckpointPolicy, ResumeError, Saver, ShardIdentity};
use std::future::Future;
use std::net::SocketAddr;
use std::ops::Range;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, watch, Notify};

#[derive(Debug, Clone)]
pub struct ShardConfig {
    pub shard: usize,
    pub shards: usize,
    /// The whole model's layout; this shard owns `shard_ranges(len, shards)[shard]`.
    pub layout: Layout,
    pub server: ServerConfig,
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
    /// The model's name and the run's description, stored in checkpoints.
    pub model: String,
    pub run_description: String,
}

impl ShardConfig {
    /// Shard `shard` of `shards` with the default deadlines, exiting when the run is over,
    /// without checkpoints.
    pub fn new(shard: usize, shards: usize, layout: Layout, server: ServerConfig) -> Self {
        ShardConfig {
            shard,
            shards,
            layout,
            server,
            io_timeout: Duration::from_secs(30),
            idle_timeout: Duration::from_secs(120),
            heartbeat_timeout: Duration::from_secs(10),
            exit_when_finished: true,
            checkpoint: None,
            model: String::new(),
            run_description: String::new(),
        }
    }

    pub fn range(&self) -> Range<usize> {
        shard_ranges(self.layout.len(), self.shards)
            .get(self.shard)
            .cloned()
            .unwrap_or(0..0)
    }
}

/// What happened on the shard's connections, besides the core's own counters.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ConnectionEvents {
    pub accepted: u64,
    pub refused_handshakes: u64,
    /// Connections closed for a malformed, oversized or unexpected frame or a timeout.
    pub protocol_errors: u64,
    /// Workers that went away without a goodbye.
    pub vanished_workers: u64,
}

#[derive(Debug, Clone)]
pub struct ShardReport {
    pub stats: ServerStats,
    pub events: ConnectionEvents,
    pub params: Vec<f32>,
}

struct State {
    core: ServerCore,
    connected: Vec<bool>,
    joined: Vec<bool>,
    /// The rank's worker died or froze (no goodbye) and nobody has taken the rank since: the
    /// first choice for a replacement asking for any rank.
    vanished: Vec<bool>,
    /// Bumped whenever a rank's main connection is replaced or evicted, so that a stale
    /// handler for an old connection cannot touch the rank's quorum membership.
    generation: Vec<u64>,
    /// The last heartbeat per rank, once its heartbeats started.
    last_beat: Vec<Option<Instant>>,
    open: usize,
    events: ConnectionEvents,
    /// The version of the newest snapshot handed to the checkpoint writer.
    last_snapshot: u64,
    /// Shards 1.. in coordinated mode: the steps shard 0 decided, being collected.
    follower: Option<StepFollower>,
}

impl State {
    /// `rank` leaves the quorum (and, on a follower, no open step waits for it).
    fn leave(&mut self, rank: usize) {
        self.core.leave(rank);
        if let Some(f) = self.follower.as_mut() {
            f.leave(&mut self.core, rank);
        }
    }
}

struct Shared {
    cfg: ShardConfig,
    range: Range<usize>,
    state: Mutex<State>,
    /// (version, done) after every change, for sync pulls waiting on the next step.
    version: watch::Sender<(u64, bool)>,
    finished: Notify,
    /// With `--checkpoint-every N`: the writer's queue (one snapshot deep) and N. The state
    /// is snapshotted in the push that reaches the update count, not by polling, so the
    /// updates a crash can lose are N plus those made while that snapshot is being written.
    snapshots: Option<(mpsc::Sender<CoreState>, u64)>,
    /// This is shard 0 of a sync run with backup workers over several shards: it decides
    /// each step's members and tells them in the push replies (the others hold a
    /// `StepFollower`).
    coordinator: bool,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn publish(&self, state: &State) {
        self.version
            .send_replace((state.core.version(), state.core.is_done()));
    }

    fn log(&self, msg: &str) {
        eprintln!("[shard {}] {msg}", self.cfg.shard);
    }

    fn check_finished(&self, state: &State) {
        let all_left = state.joined.iter().all(|&j| j) && !state.connected.iter().any(|&c| c);
        if self.cfg.exit_when_finished && all_left && state.open == 0 {
            self.finished.notify_one();
        }
    }
}

pub struct ShardServer {
    listener: TcpListener,
    shared: Arc<Shared>,
    saver: Option<Saver>,
    snapshot_rx: Option<mpsc::Receiver<CoreState>>,
}

/// How often the server looks at its checkpoint schedule.
const CHECKPOINT_TICK: Duration = Duration::from_millis(100);
/// How often the server looks for workers whose heartbeats stopped.
const HEARTBEAT_CHECK: Duration = Duration::from_millis(250);

/// Takes out of the quorum every connected worker whose heartbeats stopped.
fn evict_silent_workers(shared: &Shared) {
    let limit = shared.cfg.heartbeat_timeout;
    let mut state = shared.lock();
    for rank in 0..state.connected.len() {
        let silent = state.last_beat[rank].is_some_and(|t| t.elapsed() > limit);
        if state.connected[rank] && silent {
            state.connected[rank] = false;
            state.generation[rank] += 1;
            state.last_beat[rank] = None;
            state.events.vanished_workers += 1;
            state.vanished[rank] = true;
            state.leave(rank);
            shared.publish(&state);
            shared.log(&format!(
                "worker {rank} sent no heartbeat for {:.1} s; it leaves the quorum",
                limit.as_secs_f64()
            ));
        }
    }
    shared.check_finished(&state);
}

impl ShardServer {
    /// Binds `addr` and sets up the shard with its slice of `initial` (the whole model).
    pub async fn bind(addr: &str, cfg: ShardConfig, initial: &[f32]) -> Result<Self, NetError> {
        if initial.len() != cfg.layout.len() || cfg.shard >= cfg.shards {
            return Err(NetError::Handshake(format!(
                "shard {} of {} over {} initial values for a layout of {}",
                cfg.shard,
                cfg.shards,
                initial.len(),
                cfg.layout.len()
            )));
        }
        let range = cfg.range();
        let mut core = ServerCore::new(cfg.server.clone(), initial[range.clone()].to_vec())
            .map_err(|e| NetError::Handshake(e.to_string()))?;
        let log = |msg: String| eprintln!("[shard {}] {msg}", cfg.shard);
        let saver = cfg.checkpoint.as_ref().map(|policy| {
            let identity = ShardIdentity {
                shard: cfg.shard,
                shards: cfg.shards,
                range: range.clone(),
                fingerprint: cfg.layout.fingerprint(),
            };
            let mut saver = Saver::new(policy, identity, &cfg.model, cfg.run_description.clone());
            match saver.restore_into(&mut core) {
                Ok(r) => {
                    for s in &r.skipped {
                        log(format!("skipping checkpoint: {s}"));
                    }
                    log(format!(
                        "restored {} (version {})",
                        r.path.display(),
                        r.version
                    ));
                }
                Err(ResumeError::NothingValid { skipped, .. }) if skipped.is_empty() => {
                    log("no checkpoint yet; starting from the initial weights".into());
                }
                Err(e) => log(format!(
                    "cannot restore ({e}); starting from the initial weights"
                )),
            }
            saver
        });
        let listener = TcpListener::bind(addr).await?;
        let workers = cfg.server.workers;
        let (version, _) = watch::channel((core.version(), core.is_done()));
        let every_updates = saver.as_ref().and_then(|s| s.policy().every_updates);
        let (snapshots, snapshot_rx) = match every_updates {
            Some(n) if n > 0 => {
                let (tx, rx) = mpsc::channel(1);
                (Some((tx, n)), Some(rx))
            }
            _ => (None, None),
        };
        let last_snapshot = core.version();
        let coordinated = cfg.shards > 1
            && matches!(cfg.server.mode, Mode::Sync { backup_workers } if backup_workers > 0);
        let follower = (coordinated && cfg.shard > 0).then(StepFollower::new);
        let coordinator = coordinated && cfg.shard == 0;
        Ok(ShardServer {
            listener,
            shared: Arc::new(Shared {
                cfg,
                range,
                state: Mutex::new(State {
                    core,
                    connected: vec![false; workers],
                    joined: vec![false; workers],
                    vanished: vec![false; workers],
                    generation: vec![0; workers],
                    last_beat: vec![None; workers],
                    open: 0,
                    events: ConnectionEvents::default(),
                    last_snapshot,
                    follower,
                }),
                version,
                finished: Notify::new(),
                snapshots,
                coordinator,
            }),
            saver,
            snapshot_rx,
        })
    }

    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    /// Serves until `shutdown` completes or, with `exit_when_finished`, the run is over.
    pub async fn run(self, shutdown: impl Future<Output = ()>) -> ShardReport {
        tokio::pin!(shutdown);
        let shared = self.shared;
        let mut saver = self.saver;
        let mut snapshot_rx = self.snapshot_rx;
        let mut ticker = tokio::time::interval(CHECKPOINT_TICK);
        let mut beat_check = tokio::time::interval(HEARTBEAT_CHECK);
        loop {
            tokio::select! {
                _ = beat_check.tick() => evict_silent_workers(&shared),
                Some(state) = next_snapshot(&mut snapshot_rx), if saver.is_some() => {
                    saver = save_off_reactor(&shared, saver, state).await;
                }
                _ = ticker.tick(), if saver.is_some() => {
                    // The time-based schedule (`--checkpoint-secs`).
                    let due = saver.as_ref().is_some_and(|s| s.due(shared.lock().core.version()));
                    if due {
                        let state = {
                            let mut st = shared.lock();
                            st.last_snapshot = st.core.version();
                            st.core.state()
                        };
                        saver = save_off_reactor(&shared, saver, state).await;
                    }
                }
                accepted = self.listener.accept() => match accepted {
                    Ok((stream, _)) => {
                        let shared = Arc::clone(&shared);
                        shared.lock().events.accepted += 1;
                        tokio::spawn(handle(shared, stream));
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
        shared.version.send_replace((state.core.version(), true));
        if let Some(mut s) = saver {
            match s.save(&state.core.state()) {
                Ok(Some(path)) => shared.log(&format!("checkpoint {}", path.display())),
                Ok(None) => {}
                Err(e) => shared.log(&format!("final checkpoint failed: {e}")),
            }
        }
        ShardReport {
            stats: state.core.stats(),
            events: state.events,
            params: state.core.params().to_vec(),
        }
    }
}

async fn next_snapshot(rx: &mut Option<mpsc::Receiver<CoreState>>) -> Option<CoreState> {
    match rx {
        Some(rx) => rx.recv().await,
        None => std::future::pending().await,
    }
}

/// Writes `state` with file IO off the reactor; the saver comes back with the result.
async fn save_off_reactor(
    shared: &Shared,
    saver: Option<Saver>,
    state: CoreState,
) -> Option<Saver> {
    let mut s = saver?;
    let joined = tokio::task::spawn_blocking(move || {
        let result = s.save(&state);
        (s, result)
    })
    .await;
    match joined {
        Ok((s, result)) => {
            if let Err(e) = result {
                shared.log(&format!("checkpoint failed: {e}"));
            }
            Some(s)
        }
        Err(e) => {
            shared.log(&format!("checkpoint task failed: {e}"));
            None
        }
    }
}

/// Who is on the other end, once the handshake is done.
#[derive(Clone, Copy)]
struct Session {
    role: Role,
    rank: usize,
    said_goodbye: bool,
    /// The rank's generation when this connection was accepted.
    generation: u64,
}

async fn handle(shared: Arc<Shared>, stream: TcpStream) {
    shared.lock().open += 1;
    let mut conn = Connection::new(stream, shared.cfg.io_timeout);
    let mut session = None;
    let result = serve(&shared, &mut conn, &mut session).await;
    if let Err(e) = &result {
        shared.log(&format!("closing connection from {}: {e}", conn.peer()));
        let (code, counted) = match e {
            NetError::Handshake(_) => (code::HANDSHAKE, false),
            NetError::RankBusy(_) | NetError::NoFreeRank(_) => (code::RANK_BUSY, false),
            _ => (code::BAD_FRAME, true),
        };
        // Best effort: tell the peer why, unless the socket itself is what failed.
        if !matches!(
            e,
            NetError::Io(_) | NetError::Closed(_) | NetError::Timeout(_)
        ) {
            let _ = conn
                .write_frame(kind::ERROR, &encode_error(code, &e.to_string()), &[])
                .await;
        }
        let mut state = shared.lock();
        if counted {
            state.events.protocol_errors += 1;
        } else {
            state.events.refused_handshakes += 1;
        }
    }
    conn.shutdown().await;
    let mut state = shared.lock();
    state.open -= 1;
    // A worker connection that was evicted or replaced no longer speaks for its rank.
    if let Some(s) =
        session.filter(|s| s.role == Role::Worker && state.generation[s.rank] == s.generation)
    {
        state.connected[s.rank] = false;
        if !s.said_goodbye {
            state.events.vanished_workers += 1;
            state.vanished[s.rank] = true;
            drop(state);
            shared.log(&format!(
                "worker {} disconnected without a goodbye; it leaves the quorum",
                s.rank
            ));
            state = shared.lock();
            state.leave(s.rank);
            shared.publish(&state);
        }
    }
    shared.check_finished(&state);
}

async fn serve(
    shared: &Shared,
    conn: &mut Connection,
    session: &mut Option<Session>,
) -> Result<(), NetError> {
    let cfg = &shared.cfg;
    let mut header = match conn.read_header(cfg.io_timeout, HELLO_LIMIT).await? {
        Some(h) => h,
        None => return Ok(()),
    };
    if header.kind == kind::DESCRIBE {
        // A client that adopts the server's layout asks first, then says hello (or leaves).
        conn.read_bytes(header.len as usize).await?;
        let me = Hello::new(
            Role::Observer,
            0,
            cfg.server.workers,
            &cfg.server.mode,
            cfg.shard,
            cfg.shards,
            &cfg.layout,
        );
        conn.write_frame(kind::DESCRIBE_REPLY, &me.encode(), &[])
            .await?;
        header = match conn.read_header(cfg.io_timeout, HELLO_LIMIT).await? {
            Some(h) => h,
            None => return Ok(()),
        };
    }
    if header.kind != kind::HELLO {
        return Err(NetError::Unexpected {
            got: header.kind,
            expected: "hello",
        });
    }
    let hello = Hello::decode(&conn.read_bytes(header.len as usize).await?)?;
    let accepted = accept_hello(shared, &hello)?;
    *session = Some(accepted);
    let reply = {
        let state = shared.lock();
        HelloOk {
            start: shared.range.start as u64,
            end: shared.range.end as u64,
            version: state.core.version(),
            rank: accepted.rank as u32,
        }
    };
    conn.write_frame(kind::HELLO_OK, &reply.encode(), &[])
        .await?;

    let shard_len = shared.range.len();
    // The largest legitimate frame is a push of this shard's gradient.
    let limit = (push_head_len(cfg.server.workers) + 4 * shard_len).max(64) as u64;
    let mut buf: Vec<f32> = vec![0.0; shard_len];
    loop {
        let header = match conn.read_header(cfg.idle_timeout, limit).await? {
            Some(h) => h,
            None => return Ok(()),
        };
        match header.kind {
            _ if accepted.role == Role::Worker
                && shared.lock().generation[accepted.rank] != accepted.generation =>
            {
                return Err(NetError::Handshake(format!(
                    "worker {} was evicted (missed heartbeats); reconnect to rejoin",
                    accepted.rank
                )));
            }
            kind::PULL => {
                let (newer_than, wait) = decode_pull(&conn.read_bytes(header.len as usize).await?)?;
                pull(shared, conn, &mut buf, newer_than, wait).await?;
            }
            kind::PUSH if accepted.role == Role::Worker => {
                push(shared, conn, &mut buf, header.len, accepted.rank).await?;
            }
            kind::STATS => {
                conn.read_bytes(header.len as usize).await?;
                let stats = {
                    let state = shared.lock();
                    ShardStats {
                        stats: state.core.stats(),
                        active_workers: state.core.active_workers() as u32,
                        done: state.core.is_done(),
                    }
                };
                conn.write_frame(kind::STATS_REPLY, &stats.encode(), &[])
                    .await?;
            }
            kind::HEARTBEAT if accepted.role == Role::Heartbeat => {
                conn.read_bytes(header.len as usize).await?;
                shared.lock().last_beat[accepted.rank] = Some(Instant::now());
            }
            kind::GOODBYE => {
                conn.read_bytes(header.len as usize).await?;
                if accepted.role == Role::Worker {
                    let mut state = shared.lock();
                    state.leave(accepted.rank);
                    // The rank is free from now on (for a replacement asking for any rank).
                    if state.generation[accepted.rank] == accepted.generation {
                        state.connected[accepted.rank] = false;
                    }
                    shared.publish(&state);
                }
                if let Some(s) = session.as_mut() {
                    s.said_goodbye = true;
                }
                conn.write_frame(kind::GOODBYE_OK, &[], &[]).await?;
                return Ok(());
            }
            other => {
                return Err(NetError::Unexpected {
                    got: other,
                    expected: "pull, push, stats or goodbye",
                })
            }
        }
    }
}

fn accept_hello(shared: &Shared, hello: &Hello) -> Result<Session, NetError> {
    let cfg = &shared.cfg;
    let refuse = |why: String| Err(NetError::Handshake(why));
    if (hello.shard as usize, hello.shards as usize) != (cfg.shard, cfg.shards) {
        return refuse(format!(
            "peer expects shard {} of {}, this is shard {} of {}",
            hello.shard, hello.shards, cfg.shard, cfg.shards
        ));
    }
    let theirs = hello
        .layout()
        .map_err(|e| NetError::Handshake(format!("peer layout: {e}")))?;
    if hello.fingerprint != cfg.layout.fingerprint() || theirs != cfg.layout {
        return refuse(format!(
            "model layout mismatch: peer has {} tensors / {} values (hash {:016x}), \
             server has {} tensors / {} values (hash {:016x})",
            theirs.tensors().len(),
            theirs.len(),
            hello.fingerprint,
            cfg.layout.tensors().len(),
            cfg.layout.len(),
            cfg.layout.fingerprint()
        ));
    }
    if hello.sync != cfg.server.mode.is_sync() {
        return refuse(format!(
            "mode mismatch: peer runs {}, server runs {}",
            if hello.sync { "sync" } else { "async" },
            cfg.server.mode.name()
        ));
    }
    let backups = match cfg.server.mode {
        Mode::Sync { backup_workers } => backup_workers,
        Mode::Async { .. } => 0,
    };
    if hello.role != Role::Observer && hello.backup_workers as usize != backups {
        return refuse(format!(
            "peer expects {} backup workers, server is set up for {backups}",
            hello.backup_workers
        ));
    }
    let rank = hello.rank as usize;
    if hello.role == Role::Worker {
        if hello.workers as usize != cfg.server.workers {
            return refuse(format!(
                "peer expects {} workers, server is set up for {}",
                hello.workers, cfg.server.workers
            ));
        }
        let mut state = shared.lock();
        let rank = if hello.rank == ANY_RANK {
            // A replacement worker: the rank of a worker that died, else one that has not
            // joined yet, else one whose worker finished; picked and taken under one lock.
            let free = |r: &usize| !state.connected[*r];
            let mut ranks = 0..cfg.server.workers;
            ranks
                .clone()
                .filter(free)
                .find(|&r| state.vanished[r])
                .or_else(|| ranks.clone().filter(free).find(|&r| !state.joined[r]))
                .or_else(|| ranks.find(free))
                .ok_or(NetError::NoFreeRank(cfg.server.workers))?
        } else if rank >= cfg.server.workers {
            return refuse(format!(
                "rank {rank} is out of range for {} workers",
                cfg.server.workers
            ));
        } else if state.connected[rank] {
            return Err(NetError::RankBusy(rank));
        } else {
            rank
        };
        if state.joined[rank] {
            state.core.rejoin(rank);
        }
        state.connected[rank] = true;
        state.joined[rank] = true;
        state.vanished[rank] = false;
        state.generation[rank] += 1;
        return Ok(Session {
            role: hello.role,
            rank,
            said_goodbye: false,
            generation: state.generation[rank],
        });
    }
    if hello.role == Role::Heartbeat && rank >= cfg.server.workers {
        return refuse(format!(
            "rank {rank} is out of range for {} workers",
            cfg.server.workers
        ));
    }
    Ok(Session {
        role: hello.role,
        rank,
        said_goodbye: false,
        generation: 0,
    })
}

async fn pull(
    shared: &Shared,
    conn: &mut Connection,
    buf: &mut [f32],
    newer_than: Option<u64>,
    wait: bool,
) -> Result<(), NetError> {
    let newer = |v: u64| newer_than.is_none_or(|n| v > n);
    if wait {
        let mut rx = shared.version.subscribe();
        loop {
            let (version, done) = *rx.borrow_and_update();
            if newer(version) || done {
                break;
            }
            // No deadline here: this worker is healthy and waiting for the others; a peer
            // that stalls is dropped by its own idle deadline, which moves the step on.
            if rx.changed().await.is_err() {
                break;
            }
        }
    }
    let (version, done, updated) = {
        let state = shared.lock();
        let version = state.core.version();
        let updated = newer(version);
        if updated {
            buf.copy_from_slice(state.core.params());
        }
        (version, state.core.is_done(), updated)
    };
    let mut head = Writer::default();
    head.u64(version)
        .u8(u8::from(updated) | (u8::from(done) << 1));
    debug_assert_eq!(head.0.len(), PULL_REPLY_HEAD_LEN);
    let tensor: &[f32] = if updated { buf } else { &[] };
    conn.write_frame(kind::PULL_REPLY, &head.0, tensor).await
}

async fn push(
    shared: &Shared,
    conn: &mut Connection,
    buf: &mut Vec<f32>,
    len: u64,
    rank: usize,
) -> Result<(), NetError> {
    let workers = shared.cfg.server.workers;
    let head_len = push_head_len(workers);
    let body = len
        .checked_sub(head_len as u64)
        .filter(|b| b % 4 == 0)
        .ok_or_else(|| NetError::Malformed {
            what: "push",
            why: format!("payload of {len} bytes is not a push header plus f32 values"),
        })?;
    let head = PushHead::decode(&conn.read_bytes(head_len).await?, workers)?;
    // The frame limit already bounds `body` by this shard's size.
    let n = (body / 4) as usize;
    buf.resize(n.max(shared.range.len()), 0.0);
    conn.read_f32s(&mut buf[..n]).await?;
    let meta = PushMeta {
        rank,
        base_version: head.base_version,
        samples: head.samples,
        loss: head.loss,
    };
    let (result, snapshot, step) = {
        let mut state = shared.lock();
        let state = &mut *state;
        let before = state.core.version();
        let result = match state.follower.as_mut() {
            Some(_) if head.step == NO_STEP => Err(PushError::NotAMember {
                rank,
                step: NO_STEP,
            }),
            Some(f) => f.push(&mut state.core, meta, &buf[..n], head.step, &head.members),
            None => state.core.push(meta, &buf[..n]),
        };
        let version = state.core.version();
        if version != before || state.core.is_done() {
            shared.publish(state);
        }
        let snapshot = match &shared.snapshots {
            Some((_, every)) if version >= state.last_snapshot + every => {
                state.last_snapshot = version;
                Some(state.core.state())
            }
            _ => None,
        };
        // Shard 0 in coordinated mode: the step this gradient was admitted into.
        let step = match result {
            Ok(PushOutcome::Buffered { .. }) if shared.coordinator => Some(version),
            Ok(PushOutcome::Applied { version, .. }) if shared.coordinator => Some(version - 1),
            _ => None,
        };
        (result, snapshot, step)
    };
    if let (Some(state), Some((tx, _))) = (snapshot, &shared.snapshots) {
        // Waits while the writer is still busy with the previous snapshot and one more is
        // queued: checkpoints cannot fall further behind than that.
        let _ = tx.send(state).await;
    }
    buf.truncate(shared.range.len());
    let mut reply = PushReply {
        code: outcome::DONE,
        version: 0,
        staleness: 0,
        waiting: 0,
        step: NO_STEP,
        members: vec![false; workers],
    };
    match (result, step) {
        (Ok(_), Some(step)) => {
            // The other shards need the step's members, known once it is complete: answer
            // then (the worker would wait for the step before its next pull anyway).
            let mut rx = shared.version.subscribe();
            loop {
                let (version, done) = *rx.borrow_and_update();
                if version > step || done || rx.changed().await.is_err() {
                    break;
                }
            }
            {
                let state = shared.lock();
                if let Some(members) = state.core.members_of(step) {
                    reply.code = outcome::APPLIED;
                    reply.version = step + 1;
                    reply.step = step;
                    reply.members = members.to_vec();
                } else if !state.core.is_done() {
                    reply.code = outcome::DROPPED;
                }
            }
            conn.write_frame(kind::PUSH_REPLY, &reply.encode(), &[])
                .await
        }
        (Ok(outcome), None) => {
            match outcome {
                PushOutcome::Applied { version, staleness } => {
                    reply.code = outcome::APPLIED;
                    reply.version = version;
                    reply.staleness = staleness;
                }
                PushOutcome::Buffered { waiting_for } => {
                    reply.code = outcome::BUFFERED;
                    reply.waiting = waiting_for as u32;
                }
                PushOutcome::Dropped { staleness } => {
                    reply.code = outcome::DROPPED;
                    reply.staleness = staleness;
                }
                PushOutcome::Done => {}
            }
            conn.write_frame(kind::PUSH_REPLY, &reply.encode(), &[])
                .await
        }
        (Err(e), _) => {
            let code = match e {
                PushError::NonFinite { .. } => code::PUSH_NONFINITE,
                _ => code::PUSH_REFUSED,
            };
            conn.write_frame(kind::ERROR, &encode_error(code, &e.to_string()), &[])
                .await
        }
    }
}
