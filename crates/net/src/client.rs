//! The worker's side over TCP: one connection per shard, every pull and push sent to all
//! shards at once, each shard's slice read straight into its part of the flat buffer.

use crate::connection::Connection;
use crate::error::NetError;
use crate::protocol::{
    code, decode_error, encode_pull, kind, outcome, Hello, HelloOk, PushHead, PushReply, Reader,
    Role, ShardStats, HELLO_LIMIT, NO_STEP, PULL_REPLY_HEAD_LEN,
};
use futures_util::future::try_join_all;
use pstrain_core::{
    shard_ranges, ClientError, Layout, Mode, ParameterClient, PullReply, PushError, PushMeta,
    PushOutcome,
};
use std::ops::Range;
use std::time::{Duration, Instant};
use tokio::net::TcpStream;
use tokio::runtime::Runtime;

#[derive(Debug, Clone)]
pub struct ClientConfig {
    /// One address per shard, in shard order.
    pub servers: Vec<String>,
    pub role: Role,
    pub rank: usize,
    pub workers: usize,
    pub mode: Mode,
    pub layout: Layout,
    /// Deadline for each read or write of a frame.
    pub io_timeout: Duration,
    /// How long a sync pull may wait for the rest of the workers.
    pub wait_timeout: Duration,
    /// Keep retrying the first connection (with backoff) this long, for servers still starting.
    pub connect_timeout: Duration,
}

impl ClientConfig {
    pub fn new(
        servers: Vec<String>,
        role: Role,
        rank: usize,
        workers: usize,
        mode: Mode,
        layout: Layout,
    ) -> Self {
        ClientConfig {
            servers,
            role,
            rank,
            workers,
            mode,
            layout,
            io_timeout: Duration::from_secs(30),
            wait_timeout: Duration::from_secs(600),
            connect_timeout: Duration::from_secs(60),
        }
    }
}

/// What a set of shards serves, in their own words: for clients that bring no model of their
/// own and adopt the servers' (the Python client).
#[derive(Debug, Clone, PartialEq)]
pub struct Served {
    pub layout: Layout,
    pub workers: usize,
    pub sync: bool,
    /// Sync: backup workers (with several shards, shard 0 then coordinates the steps).
    pub backup_workers: usize,
}

impl Served {
    /// The run's mode as far as a client needs it (the staleness bound is the server's).
    pub fn mode(&self) -> Mode {
        if self.sync {
            Mode::Sync {
                backup_workers: self.backup_workers,
            }
        } else {
            Mode::Async {
                max_staleness: None,
            }
        }
    }
}

/// Asks every shard what it serves, and checks that they agree and sit in the given order.
pub fn describe(
    servers: &[String],
    io_timeout: Duration,
    connect_timeout: Duration,
) -> Result<Served, NetError> {
    if servers.is_empty() {
        return Err(NetError::Handshake("no server addresses given".into()));
    }
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let replies = rt.block_on(try_join_all(servers.iter().enumerate().map(
        |(i, addr)| async move {
            let mut conn = dial(i, addr, io_timeout, connect_timeout).await?;
            conn.write_frame(kind::DESCRIBE, &[], &[]).await?;
            let bytes = conn
                .read_reply(
                    kind::DESCRIBE_REPLY,
                    "describe reply",
                    io_timeout,
                    HELLO_LIMIT,
                )
                .await?;
            conn.shutdown().await;
            let me = Hello::decode(&bytes)?;
            if (me.shard as usize, me.shards as usize) != (i, servers.len()) {
                return Err(NetError::Handshake(format!(
                    "{addr} is shard {} of {}, but was given as shard {i} of {}",
                    me.shard,
                    me.shards,
                    servers.len()
                )));
            }
            let layout = me
                .layout()
                .map_err(|e| NetError::Handshake(format!("{addr} serves a bad layout: {e}")))?;
            Ok(Served {
                layout,
                workers: me.workers as usize,
                sync: me.sync,
                backup_workers: me.backup_workers as usize,
            })
        },
    )))?;
    let first = replies[0].clone();
    if let Some((i, _)) = replies.iter().enumerate().find(|(_, r)| **r != first) {
        return Err(NetError::Handshake(format!(
            "shards 0 and {i} serve different runs (layout, worker count or mode)"
        )));
    }
    Ok(first)
}

struct Shard {
    conn: Connection,
    range: Range<usize>,
    /// The version of this shard's slice in the caller's buffer.
    version: u64,
    /// The last push here is buffered for a sync step that has not completed: a waiting pull
    /// waits only on such shards (never for a step this client has not pushed to).
    pending: bool,
}

/// `ClientConfig::rank` of a worker that takes any free rank (a replacement for one that
/// died): shard 0 assigns one, preferring the rank of a worker that died.
pub const ANY_RANK: usize = usize::MAX;

pub struct TcpClient {
    rt: Runtime,
    cfg: ClientConfig,
    shards: Vec<Shard>,
    left: bool,
    reconnects: u64,
}

impl TcpClient {
    /// Connects to every shard (retrying until `connect_timeout`) and shakes hands.
    pub fn connect(cfg: &ClientConfig) -> Result<Self, NetError> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        if cfg.servers.is_empty() {
            return Err(NetError::Handshake("no server addresses given".into()));
        }
        let mut cfg = cfg.clone();
        let shards = rt.block_on(connect_all(&mut cfg))?;
        Ok(TcpClient {
            rt,
            cfg,
            shards,
            left: false,
            reconnects: 0,
        })
    }

    /// The configuration in use, with the rank the shards assigned if `ANY_RANK` was asked.
    pub fn config(&self) -> &ClientConfig {
        &self.cfg
    }

    pub fn rank(&self) -> usize {
        self.cfg.rank
    }

    /// The oldest version among the slices this client holds (all equal between failures).
    pub fn version(&self) -> u64 {
        self.shards.iter().map(|s| s.version).min().unwrap_or(0)
    }

    /// How many times the connections were re-established after a failure.
    pub fn reconnects(&self) -> u64 {
        self.reconnects
    }

    /// Drops every connection and connects again (retrying while a restarted shard comes
    /// back). Healthy shards see this worker leave and rejoin.
    fn reconnect(&mut self) -> Result<(), NetError> {
        self.shards.clear();
        self.reconnects += 1;
        self.shards = self.rt.block_on(connect_all(&mut self.cfg))?;
        Ok(())
    }

    /// Each shard's counters (shard order), reconnecting once if a connection failed.
    pub fn stats(&mut self) -> Result<Vec<ShardStats>, NetError> {
        match self.try_stats() {
            Err(e) if e.is_transport() => {
                self.reconnect()?;
                self.try_stats()
            }
            r => r,
        }
    }

    fn try_stats(&mut self) -> Result<Vec<ShardStats>, NetError> {
        let io = self
            .shards
            .first()
            .map_or(Duration::from_secs(30), |s| s.conn.io_timeout());
        self.rt
            .block_on(try_join_all(self.shards.iter_mut().map(|s| async move {
                s.conn.write_frame(kind::STATS, &[], &[]).await?;
                let bytes = s
                    .conn
                    .read_reply(kind::STATS_REPLY, "stats reply", io, 1 << 16)
                    .await?;
                ShardStats::decode(&bytes)
            })))
    }

    /// Pulls every shard. With `newer_than`, a shard sends its slice only if it is newer than
    /// the one this client holds; without, every slice is sent. `wait` waits on the shards
    /// where this client's last push is pending. If a connection failed, reconnects and pulls
    /// everything afresh (without waiting), so the caller continues from whatever the shards
    /// hold now.
    pub fn pull_all(
        &mut self,
        params: &mut [f32],
        newer_than: Option<u64>,
        wait: bool,
    ) -> Result<PullReply, NetError> {
        match self.try_pull_all(params, newer_than, wait) {
            Err(e) if e.is_transport() => {
                self.reconnect()?;
                self.try_pull_all(params, None, false)
            }
            r => r,
        }
    }

    fn try_pull_all(
        &mut self,
        params: &mut [f32],
        newer_than: Option<u64>,
        wait: bool,
    ) -> Result<PullReply, NetError> {
        self.check_len(params.len())?;
        let wait_timeout = self.cfg.wait_timeout;
        let slices = split_by_ranges(params, self.shards.iter().map(|s| s.range.len()));
        let replies = self
            .rt
            .block_on(try_join_all(self.shards.iter_mut().zip(slices).map(
                |(shard, slice)| async move {
                    // With several shards each keeps its own version; "newer than" means newer
                    // than what this client last got from that shard. A waiting pull waits only
                    // where this client's push is pending (then for the step after the slice
                    // it holds).
                    let wait = wait && std::mem::take(&mut shard.pending);
                    let newer = (newer_than.is_some() || wait).then_some(shard.version);
                    let reply = pull_one(shard, slice, newer, wait, wait_timeout).await?;
                    if newer_than.is_none() && !reply.updated {
                        // The run ended during the wait: without `newer_than` every slice is
                        // sent, as it is now.
                        return pull_one(shard, slice, None, false, wait_timeout).await;
                    }
                    Ok(reply)
                },
            )))?;
        Ok(PullReply {
            version: replies.iter().map(|r| r.version).min().unwrap_or(0),
            updated: replies.iter().any(|r| r.updated),
            done: replies.iter().any(|r| r.done),
        })
    }

    fn check_len(&self, got: usize) -> Result<(), NetError> {
        let expected: usize = self.shards.iter().map(|s| s.range.len()).sum();
        if got == expected {
            Ok(())
        } else {
            Err(NetError::Shape { expected, got })
        }
    }

    /// Pushes to every shard. If a connection failed the gradient is given up (a shard may
    /// or may not have applied it) and the connections are re-established: `Dropped`.
    pub fn push_all(&mut self, meta: PushMeta, grad: &[f32]) -> Result<PushOutcome, NetError> {
        match self.try_push_all(meta, grad) {
            Err(e) if e.is_transport() => {
                self.reconnect()?;
                Ok(PushOutcome::Dropped { staleness: 0 })
            }
            r => r,
        }
    }

    fn try_push_all(&mut self, meta: PushMeta, grad: &[f32]) -> Result<PushOutcome, NetError> {
        self.check_len(grad.len())?;
        let workers = self.cfg.workers;
        let none = vec![false; workers];
        let coordinated = self.shards.len() > 1
            && matches!(self.cfg.mode, Mode::Sync { backup_workers } if backup_workers > 0);
        if !coordinated {
            let slices: Vec<&[f32]> = self.shards.iter().map(|s| &grad[s.range.clone()]).collect();
            let outcomes =
                self.rt
                    .block_on(try_join_all(self.shards.iter_mut().zip(slices).map(
                        |(shard, slice)| {
                            let io = shard.conn.io_timeout();
                            push_one(shard, meta, slice, NO_STEP, &none, io)
                        },
                    )))?;
            return Ok(most_conservative(outcomes.into_iter().map(|(o, _)| o)));
        }
        // Coordinated: shard 0 admits the gradient into a step (or drops it as late) and
        // answers once that step is complete, with its members; the other shards then get
        // the slices tagged with that step, so every shard applies the same gradients.
        let (first, rest) = self.shards.split_at_mut(1);
        let wait = self.cfg.wait_timeout;
        let slice0 = &grad[first[0].range.clone()];
        let (outcome, reply) =
            self.rt
                .block_on(push_one(&mut first[0], meta, slice0, NO_STEP, &none, wait))?;
        if reply.code != outcome::APPLIED || reply.step == NO_STEP {
            return Ok(outcome);
        }
        let outcomes = self.rt.block_on(try_join_all(rest.iter_mut().map(|shard| {
            let slice = &grad[shard.range.clone()];
            let io = shard.conn.io_timeout();
            push_one(shard, meta, slice, reply.step, &reply.members, io)
        })))?;
        Ok(most_conservative(
            std::iter::once(outcome).chain(outcomes.into_iter().map(|(o, _)| o)),
        ))
    }

    /// Says goodbye to every shard (once). A shard that cannot be reached counts as told: it
    /// takes a vanished connection out of the quorum the same way.
    pub fn goodbye(&mut self) -> Result<(), NetError> {
        match self.try_goodbye() {
            Err(e) if e.is_transport() => Ok(()),
            r => r,
        }
    }

    fn try_goodbye(&mut self) -> Result<(), NetError> {
        if std::mem::replace(&mut self.left, true) {
            return Ok(());
        }
        self.rt
            .block_on(try_join_all(self.shards.iter_mut().map(|s| async move {
                s.conn.write_frame(kind::GOODBYE, &[], &[]).await?;
                let io = s.conn.io_timeout();
                s.conn
                    .read_reply(kind::GOODBYE_OK, "goodbye reply", io, 1 << 16)
                    .await?;
                s.conn.shutdown().await;
                Ok::<_, NetError>(())
            })))?;
        Ok(())
    }
}

/// Pulls one shard's slice into `slice` (when the shard sends it: see `encode_pull`).
async fn pull_one(
    shard: &mut Shard,
    slice: &mut [f32],
    newer: Option<u64>,
    wait: bool,
    wait_timeout: Duration,
) -> Result<PullReply, NetError> {
    shard
        .conn
        .write_frame(kind::PULL, &encode_pull(newer, wait), &[])
        .await?;
    let idle = if wait {
        wait_timeout
    } else {
        shard.conn.io_timeout()
    };
    let limit = (PULL_REPLY_HEAD_LEN + 4 * slice.len()) as u64;
    let header = shard
        .conn
        .read_header(idle, limit.max(1 << 16))
        .await?
        .ok_or(NetError::Closed("before replying to a pull"))?;
    if header.kind == kind::ERROR {
        return Err(decode_error(
            &shard.conn.read_bytes(header.len as usize).await?,
        ));
    }
    if header.kind != kind::PULL_REPLY {
        return Err(NetError::Unexpected {
            got: header.kind,
            expected: "pull reply",
        });
    }
    let head = shard.conn.read_bytes(PULL_REPLY_HEAD_LEN).await?;
    let mut r = Reader::new(&head, "pull reply");
    let (version, flags) = (r.u64()?, r.u8()?);
    let updated = flags & 1 != 0;
    let body = header.len - PULL_REPLY_HEAD_LEN as u64;
    let expected = if updated { 4 * slice.len() as u64 } else { 0 };
    if body != expected {
        return Err(NetError::Malformed {
            what: "pull reply",
            why: format!("{body} tensor bytes, expected {expected}"),
        });
    }
    if updated {
        shard.conn.read_f32s(slice).await?;
        shard.version = version;
    }
    Ok(PullReply {
        version,
        updated,
        done: flags & 2 != 0,
    })
}

/// Pushes one shard's slice and reads its answer (waiting up to `reply_timeout`).
async fn push_one(
    shard: &mut Shard,
    meta: PushMeta,
    slice: &[f32],
    step: u64,
    members: &[bool],
    reply_timeout: Duration,
) -> Result<(PushOutcome, PushReply), NetError> {
    // Each shard judges staleness against the version its slice came from.
    let head = PushHead::encode_parts(shard.version, meta.samples, meta.loss, step, members);
    shard.conn.write_frame(kind::PUSH, &head, slice).await?;
    let bytes = shard
        .conn
        .read_reply(kind::PUSH_REPLY, "push reply", reply_timeout, 1 << 16)
        .await?;
    let reply = PushReply::decode(&bytes, members.len())?;
    shard.pending = reply.code == outcome::BUFFERED;
    let outcome = match reply.code {
        outcome::APPLIED => PushOutcome::Applied {
            version: reply.version,
            staleness: reply.staleness,
        },
        outcome::BUFFERED => PushOutcome::Buffered {
            waiting_for: reply.waiting as usize,
        },
        outcome::DROPPED => PushOutcome::Dropped {
            staleness: reply.staleness,
        },
        outcome::DONE => PushOutcome::Done,
        other => {
            return Err(NetError::Malformed {
                what: "push reply",
                why: format!("unknown outcome {other}"),
            })
        }
    };
    Ok((outcome, reply))
}

/// The most conservative of the shards' outcomes: done, then dropped, buffered, applied.
fn most_conservative(outcomes: impl Iterator<Item = PushOutcome>) -> PushOutcome {
    let rank = |o: &PushOutcome| match o {
        PushOutcome::Done => 0,
        PushOutcome::Dropped { .. } => 1,
        PushOutcome::Buffered { .. } => 2,
        PushOutcome::Applied { .. } => 3,
    };
    outcomes.min_by_key(rank).unwrap_or(PushOutcome::Done)
}

/// Connects to every shard. A worker asking for `ANY_RANK` gets its rank from shard 0 first
/// and then joins the others with it; `cfg.rank` is updated to the rank in use.
async fn connect_all(cfg: &mut ClientConfig) -> Result<Vec<Shard>, NetError> {
    let mut ranges = shard_ranges(cfg.layout.len(), cfg.servers.len()).into_iter();
    let mut shards = Vec::with_capacity(cfg.servers.len());
    if cfg.role == Role::Worker && cfg.rank == ANY_RANK {
        let (addr, range) = (&cfg.servers[0], ranges.next().unwrap_or_default());
        let (first, rank) = connect_shard(cfg, 0, addr, range).await?;
        cfg.rank = rank;
        shards.push(first);
    }
    let skip = shards.len();
    let cfg = &*cfg;
    let rest = try_join_all(
        cfg.servers
            .iter()
            .enumerate()
            .skip(skip)
            .zip(ranges)
            .map(|((i, addr), range)| connect_shard(cfg, i, addr, range)),
    )
    .await?;
    shards.extend(rest.into_iter().map(|(shard, _)| shard));
    Ok(shards)
}

/// Connects and shakes hands, retrying with backoff while the shard is not up yet or still
/// holds this rank's previous connection. Returns the shard and the rank it took the worker as.
async fn connect_shard(
    cfg: &ClientConfig,
    shard: usize,
    addr: &str,
    range: Range<usize>,
) -> Result<(Shard, usize), NetError> {
    let started = Instant::now();
    let mut backoff = Duration::from_millis(50);
    loop {
        match try_connect_shard(cfg, shard, addr, range.clone()).await {
            // The rank's old connection is not gone yet, or the shard died or restarted in
            // the middle of the handshake: both pass.
            Err(e)
                if (e.is_transport()
                    || matches!(
                        e,
                        NetError::Remote {
                            code: code::RANK_BUSY,
                            ..
                        }
                    ))
                    && started.elapsed() + backoff < cfg.connect_timeout =>
            {
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(1));
            }
            other => return other,
        }
    }
}

/// Opens a TCP connection to a shard, retrying with backoff until `connect_timeout`.
async fn dial(
    shard: usize,
    addr: &str,
    io_timeout: Duration,
    connect_timeout: Duration,
) -> Result<Connection, NetError> {
    let started = Instant::now();
    let mut backoff = Duration::from_millis(50);
    loop {
        match tokio::time::timeout(io_timeout, TcpStream::connect(addr)).await {
            Ok(Ok(s)) => return Ok(Connection::new(s, io_timeout)),
            result => {
                if started.elapsed() + backoff > connect_timeout {
                    let why = match result {
                        Ok(Err(e)) => e.to_string(),
                        _ => "connect timed out".into(),
                    };
                    return Err(NetError::Handshake(format!(
                        "cannot reach shard {shard} at {addr} after {:.0} s: {why}",
                        started.elapsed().as_secs_f64()
                    )));
                }
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(2));
            }
        }
    }
}

async fn try_connect_shard(
    cfg: &ClientConfig,
    shard: usize,
    addr: &str,
    range: Range<usize>,
) -> Result<(Shard, usize), NetError> {
    let mut conn = dial(shard, addr, cfg.io_timeout, cfg.connect_timeout).await?;
    let n = cfg.servers.len();
    let hello = Hello::new(
        cfg.role,
        cfg.rank,
        cfg.workers,
        &cfg.mode,
        shard,
        n,
        &cfg.layout,
    );
    conn.write_frame(kind::HELLO, &hello.encode(), &[]).await?;
    let reply = conn
        .read_reply(kind::HELLO_OK, "hello reply", cfg.io_timeout, 1 << 16)
        .await
        .map_err(|e| match e {
            NetError::Remote {
                code: code::HANDSHAKE,
                message,
            } => NetError::Handshake(format!("shard {shard} at {addr}: {message}")),
            other => other,
        })?;
    let ok = HelloOk::decode(&reply)?;
    if (ok.start as usize, ok.end as usize) != (range.start, range.end) {
        return Err(NetError::Handshake(format!(
            "shard {shard} at {addr} owns {}..{}, expected {range:?}",
            ok.start, ok.end
        )));
    }
    if cfg.role == Role::Worker && cfg.rank != ANY_RANK && ok.rank as usize != cfg.rank {
        return Err(NetError::Handshake(format!(
            "shard {shard} at {addr} took this worker as rank {}, not {}",
            ok.rank, cfg.rank
        )));
    }
    let shard = Shard {
        conn,
        range,
        version: ok.version,
        pending: false,
    };
    Ok((shard, ok.rank as usize))
}

fn split_by_ranges(mut buf: &mut [f32], lens: impl Iterator<Item = usize>) -> Vec<&mut [f32]> {
    let mut out = Vec::new();
    for len in lens {
        let (head, rest) = std::mem::take(&mut buf).split_at_mut(len);
        out.push(head);
        buf = rest;
    }
    out
}

fn to_client_error(e: NetError) -> ClientError {
    match e {
        NetError::Remote {
            code: code::PUSH_NONFINITE,
            message,
        } => {
            let count = message
                .split_whitespace()
                .find_map(|w| w.parse().ok())
                .unwrap_or(0);
            ClientError::Refused(PushError::NonFinite { count })
        }
        NetError::Remote { message, .. } => ClientError::Protocol(message),
        NetError::Shape { expected, got } => ClientError::Shape { expected, got },
        NetError::Malformed { .. } | NetError::Unexpected { .. } | NetError::Frame(_) => {
            ClientError::Protocol(e.to_string())
        }
        other => ClientError::Unavailable(other.to_string()),
    }
}

impl ParameterClient for TcpClient {
    fn pull(
        &mut self,
        params: &mut [f32],
        newer_than: Option<u64>,
        wait: bool,
    ) -> Result<PullReply, ClientError> {
        self.pull_all(params, newer_than, wait)
            .map_err(to_client_error)
    }

    fn push(&mut self, meta: PushMeta, grad: &[f32]) -> Result<PushOutcome, ClientError> {
        self.push_all(meta, grad).map_err(to_client_error)
    }

    fn leave(&mut self) -> Result<(), ClientError> {
        self.goodbye().map_err(to_client_error)
    }
}

/// Heartbeats for one worker rank, sent to every shard from a thread of its own every
/// `every`, until this guard is dropped. They tell a shard that the worker process is alive
/// even while its compute thread is busy; a frozen or stopped process falls silent.
pub struct Heartbeat {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Heartbeat {
    pub fn start(cfg: &ClientConfig, every: Duration) -> Result<Self, NetError> {
        use std::sync::atomic::{AtomicBool, Ordering};
        let stop = std::sync::Arc::new(AtomicBool::new(false));
        let flag = std::sync::Arc::clone(&stop);
        let cfg = ClientConfig {
            role: Role::Heartbeat,
            ..cfg.clone()
        };
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        let thread = std::thread::spawn(move || {
            let ranges = shard_ranges(cfg.layout.len(), cfg.servers.len());
            // One loop per shard, so a shard that is down does not silence the others.
            let loops = cfg
                .servers
                .iter()
                .zip(ranges)
                .enumerate()
                .map(|(i, (addr, range))| {
                    let (cfg, flag) = (&cfg, &flag);
                    async move {
                        let mut conn: Option<Shard> = None;
                        while !flag.load(Ordering::Relaxed) {
                            if conn.is_none() {
                                conn = try_connect_shard(cfg, i, addr, range.clone())
                                    .await
                                    .ok()
                                    .map(|(shard, _)| shard);
                            }
                            if let Some(s) = conn.as_mut() {
                                if s.conn.write_frame(kind::HEARTBEAT, &[], &[]).await.is_err() {
                                    conn = None;
                                }
                            }
                            tokio::time::sleep(every).await;
                        }
                    }
                });
            rt.block_on(futures_util::future::join_all(loops));
        });
        Ok(Heartbeat {
            stop,
            thread: Some(thread),
        })
    }
}

impl Drop for Heartbeat {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}
