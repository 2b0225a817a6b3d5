//! The worker's side over TCP: one link per shard (`link`) carrying what `FanOut` (core's
//! client protocol) decides: pulls and pushes to all shards at once (shard 0 first in
//! coordinated sync), each shard's slice read straight into its part of the flat buffer;
//! connecting and describing in `dial`, heartbeats in `heartbeat`.

mod dial;
mod heartbeat;
mod link;

pub use dial::{describe, Served};
pub use heartbeat::Heartbeat;

use crate::auth::RunToken;
use crate::error::NetError;
use crate::lane::Lane;
use crate::message::{ErrorCode, Failure, Role, StatsReply};
use crate::tls::TlsClient;
use futures_util::future::try_join_all;
use link::ShardLink;
use pstrain_core::{
    ClientError, FanOut, Layout, ParameterClient, PullReply, PushError, PushMeta, PushOutcome,
    PushRoute, RunPlan,
};
use std::sync::Arc;
use std::time::Duration;
use tokio::runtime::Runtime;

#[derive(Debug, Clone)]
pub struct ClientConfig {
    /// One address per shard, in shard order.
    pub servers: Vec<String>,
    pub role: Role,
    pub rank: usize,
    /// The run this client takes part in (the shards refuse a different one).
    pub plan: RunPlan,
    pub layout: Layout,
    /// Deadline for each read or write of a frame.
    pub io_timeout: Duration,
    /// How long a waiting pull may wait for the rest of the workers.
    pub wait_timeout: Duration,
    /// Keep retrying the first connection (with backoff) this long, for servers still starting.
    pub connect_timeout: Duration,
    /// The run's secret, proven to every shard (and every shard must prove it back).
    pub token: Option<RunToken>,
    /// Talk TLS, trusting shards' certificates signed by this CA.
    pub tls: Option<TlsClient>,
    /// A worker asks a shard on its own host for a shared-memory lane (`crate::lane`) and
    /// moves fp32 tensors through it; `false` keeps every tensor on TCP.
    pub lanes: bool,
}

impl ClientConfig {
    pub fn new(
        servers: Vec<String>,
        role: Role,
        rank: usize,
        plan: RunPlan,
        layout: Layout,
    ) -> Self {
        ClientConfig {
            servers,
            role,
            rank,
            plan,
            layout,
            io_timeout: Duration::from_secs(30),
            wait_timeout: Duration::from_secs(600),
            connect_timeout: Duration::from_secs(60),
            token: None,
            tls: None,
            lanes: true,
        }
    }
}

/// `ClientConfig::rank` of a worker that takes any free rank (a replacement for one that
/// died): shard 0 assigns one, preferring the rank of a worker that died.
pub const ANY_RANK: usize = usize::MAX;

pub struct TcpClient {
    rt: Runtime,
    cfg: ClientConfig,
    shards: Vec<ShardLink>,
    /// The client's side of the protocol: each slice's version, pending steps, push order.
    fan: FanOut,
    left: bool,
    reconnects: u64,
    /// When the latest pull ended: the time to the next push is the step's compute.
    pulled_at: Option<std::time::Instant>,
    /// The worker computes while this client pushes and pulls, and says for how long
    /// (`ParameterClient::computed_beside`): the gap from a pull to a push is not compute.
    overlapped: bool,
}

impl TcpClient {
    /// Connects to every shard (retrying until `connect_timeout`) and shakes hands.
    pub fn connect(cfg: &ClientConfig) -> Result<Self, NetError> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        if cfg.servers.is_empty() {
            return Err(NetError::Config("no server addresses given".into()));
        }
        let mut cfg = cfg.clone();
        let shards = rt.block_on(dial::connect_all(&mut cfg))?;
        let fan = fan_out(&cfg, &shards);
        Ok(TcpClient {
            rt,
            cfg,
            shards,
            fan,
            left: false,
            reconnects: 0,
            pulled_at: None,
            overlapped: false,
        })
    }

    /// The configuration in use, with the rank the shards assigned if `ANY_RANK` was asked.
    pub fn config(&self) -> &ClientConfig {
        &self.cfg
    }

    pub fn rank(&self) -> usize {
        self.cfg.rank
    }

    /// How many of the shards this client reaches through a shared-memory lane.
    pub fn lanes_in_use(&self) -> usize {
        self.shards.iter().filter(|s| s.lane.is_some()).count()
    }

    /// The lane of a run with one shard, when this worker reaches it through one: a worker
    /// whose flat weights and gradient are the lane's pull and push areas (`Lane::area_ptr`)
    /// pulls and pushes with no copy of its own. Holding it keeps the memory mapped after a
    /// reconnection replaced the lane (pulls and pushes then copy, as for any buffer).
    pub fn lane(&self) -> Option<Arc<Lane>> {
        match &self.shards[..] {
            [only] => only.lane.clone(),
            _ => None,
        }
    }

    /// The oldest version among the slices this client holds (all equal between failures).
    pub fn version(&self) -> u64 {
        self.fan.version()
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
        self.shards = self.rt.block_on(dial::connect_all(&mut self.cfg))?;
        self.fan = fan_out(&self.cfg, &self.shards);
        Ok(())
    }

    /// Runs `call` and, if a connection failed, reconnects and runs `retry`.
    fn with_reconnect<T>(
        &mut self,
        call: impl FnOnce(&mut Self) -> Result<T, NetError>,
        retry: impl FnOnce(&mut Self) -> Result<T, NetError>,
    ) -> Result<T, NetError> {
        match call(self) {
            Err(e) if e.rejoins() => {
                self.reconnect()?;
                retry(self)
            }
            r => r,
        }
    }

    /// Each shard's counters (shard order), reconnecting once if a connection failed.
    pub fn stats(&mut self) -> Result<Vec<StatsReply>, NetError> {
        self.with_reconnect(Self::try_stats, Self::try_stats)
    }

    fn try_stats(&mut self) -> Result<Vec<StatsReply>, NetError> {
        let workers = self.cfg.plan.workers;
        self.rt.block_on(try_join_all(
            self.shards.iter_mut().map(|s| s.stats(workers)),
        ))
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
            Err(e) if e.rejoins() => {
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
        let fan = &mut self.fan;
        let pulls = self
            .shards
            .iter_mut()
            .zip(slices)
            .enumerate()
            .map(|(s, (shard, slice))| {
                let ask = fan.pull_ask(s, newer_than, wait);
                let whole = fan.needs_whole(s);
                async move {
                    let reply = shard
                        .pull(slice, ask.newer_than, ask.wait, wait_timeout)
                        .await?;
                    if FanOut::ask_again(whole, &reply) {
                        return shard.pull(slice, None, false, wait_timeout).await;
                    }
                    Ok(reply)
                }
            });
        let replies = self.rt.block_on(try_join_all(pulls))?;
        for (s, reply) in replies.iter().enumerate() {
            self.fan.pulled(s, reply);
        }
        self.pulled_at = Some(std::time::Instant::now());
        let answer = FanOut::combine_pulls(&replies);
        self.fan.remember_pull(answer.version);
        Ok(answer)
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
        self.with_reconnect(
            |c| c.try_push_all(meta, grad),
            |_| Ok(PushOutcome::Dropped { staleness: 0 }),
        )
    }

    fn try_push_all(&mut self, meta: PushMeta, grad: &[f32]) -> Result<PushOutcome, NetError> {
        self.check_len(grad.len())?;
        let overlapped = self.overlapped;
        if let Some(pulled) = self.pulled_at.take().filter(|_| !overlapped) {
            let computed = pulled.elapsed().as_secs_f64();
            for shard in &mut self.shards {
                shard.computed(computed);
            }
        }
        let workers = self.cfg.plan.workers;
        let (first, rest) = match self.fan.route() {
            PushRoute::Together => (&mut [][..], &mut self.shards[..]),
            PushRoute::ShardZeroFirst => self.shards.split_at_mut(1),
        };
        let (mut zero_outcome, mut step) = (None, None);
        if let Some(zero) = first.first_mut() {
            // Coordinated: shard 0 admits the gradient into a step (or drops it as late) and
            // answers once that step is complete, with its members; the other shards then get
            // the slices tagged with that step, so every shard applies the same gradients.
            let wait = self.cfg.wait_timeout;
            let slice0 = &grad[zero.range.clone()];
            let base = self.fan.base_version_of(0, meta.base_version);
            let reply = self
                .rt
                .block_on(zero.push(meta, base, slice0, None, workers, wait))?;
            self.fan.pushed(0, &reply.outcome);
            let Some(s) = reply.step else {
                return Ok(reply.outcome);
            };
            (zero_outcome, step) = (Some(reply.outcome), Some(s));
        }
        let offset = first.len();
        let fan = &self.fan;
        let pushes = rest.iter_mut().enumerate().map(|(i, shard)| {
            let (slice, io) = (&grad[shard.range.clone()], shard.conn.io_timeout());
            let base = fan.base_version_of(offset + i, meta.base_version);
            shard.push(meta, base, slice, step.clone(), workers, io)
        });
        let replies = self.rt.block_on(try_join_all(pushes))?;
        for (i, reply) in replies.iter().enumerate() {
            self.fan.pushed(offset + i, &reply.outcome);
        }
        let outcomes = replies.into_iter().map(|r| r.outcome);
        Ok(FanOut::combine_pushes(
            zero_outcome.into_iter().chain(outcomes),
        ))
    }

    /// Says goodbye to every shard (once). A shard that cannot be reached counts as told: it
    /// takes a vanished connection out of the quorum the same way.
    pub fn goodbye(&mut self) -> Result<(), NetError> {
        if std::mem::replace(&mut self.left, true) {
            return Ok(());
        }
        let result = self
            .rt
            .block_on(try_join_all(self.shards.iter_mut().map(|s| s.goodbye())));
        match result {
            Err(e) if e.is_transport() => Ok(()),
            r => r.map(|_| ()),
        }
    }
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

/// The protocol state of a client whose links were just made.
fn fan_out(cfg: &ClientConfig, shards: &[ShardLink]) -> FanOut {
    let versions: Vec<u64> = shards.iter().map(|s| s.joined_version).collect();
    FanOut::new(cfg.plan.mode, &versions)
}

/// The worker loop's view of a transport error: refusals stay typed (a non-finite gradient
/// carries its count as the shard sent it).
fn to_client_error(e: NetError) -> ClientError {
    match e {
        NetError::Remote(Failure {
            code: ErrorCode::NonFinite { count },
            ..
        }) => ClientError::Refused(PushError::NonFinite {
            count: usize::try_from(count).unwrap_or(usize::MAX),
        }),
        NetError::Remote(Failure {
            code: ErrorCode::TooLarge { largest },
            ..
        }) => ClientError::Refused(PushError::TooLarge { largest }),
        NetError::Remote(Failure {
            code: ErrorCode::RolledBack,
            ..
        }) => ClientError::Refused(PushError::NonFiniteResult),
        NetError::Remote(f) => ClientError::Protocol(f.message),
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

    fn computed_beside(&mut self, seconds: f64) {
        self.overlapped = true;
        for shard in &mut self.shards {
            shard.computed_beside(seconds);
        }
    }
}
