//! `ShardEngine`: everything a parameter-server shard decides, for every transport. It holds
//! the shard's `ServerCore` (state + consistency rule), the workers' `Membership` and the
//! `CheckpointSchedule`; the in-process engine and the TCP server only move bytes, wait and
//! keep the clock, then ask it. Time comes in as `now`, a `Duration` since the shard started.

use crate::balance::BatchBalancer;
use crate::checkpoint_schedule::CheckpointSchedule;
use crate::client::PullReply;
use crate::config::ServerConfig;
use crate::error::{ConfigError, PushError, RestoreError};
use crate::fan_out::PullAsk;
use crate::membership::{Departure, JoinError, Membership, Presence, RankRequest, Seat};
use crate::server::{PushMeta, PushOutcome, ServerCore, ShardCounters, ShardSnapshot};
use crate::update_log::WireRef;
use crate::worker_stats::{LinkUse, WorkerStats};
use std::time::Duration;

#[derive(Debug, Clone, PartialEq)]
pub struct EngineConfig {
    pub shard: usize,
    pub shards: usize,
    pub server: ServerConfig,
    /// A worker whose heartbeats (once started) stop for this long leaves the quorum.
    pub heartbeat_timeout: Duration,
    /// Snapshot the state inside the update that reaches every N updates.
    pub checkpoint_every_updates: Option<u64>,
    /// Snapshot the state when this long has passed (and something changed).
    pub checkpoint_every: Option<Duration>,
}

impl EngineConfig {
    /// A single shard (the whole model) with no checkpoints and a 10 s heartbeat deadline.
    pub fn single(server: ServerConfig) -> Self {
        EngineConfig {
            shard: 0,
            shards: 1,
            server,
            heartbeat_timeout: Duration::from_secs(10),
            checkpoint_every_updates: None,
            checkpoint_every: None,
        }
    }
}

/// What a push did, and what the caller must do about it.
#[derive(Debug)]
pub struct PushReport {
    pub outcome: Result<PushOutcome, PushError>,
    /// The version moved or the run ended: wake waiting pulls.
    pub changed: bool,
    /// This update reached the checkpoint interval: hand this state to the writer.
    pub snapshot: Option<ShardSnapshot>,
    /// Shard 0 in coordinated mode: the step the gradient was admitted into; once it is
    /// complete, `step_members` says who made it up (the other shards need that).
    pub admitted_step: Option<u64>,
}

/// What the engine decides for a pull (its `Ready`, in raft-rs's words): the transport only
/// carries it out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PullDecision {
    /// Held at the consistency gate: ask again when the shard changes.
    Wait,
    /// Answer now (with the shard's weights when `updated`).
    Answer(PullReply),
}

#[derive(Debug)]
pub struct ShardEngine {
    core: ServerCore,
    members: Membership,
    checkpoints: CheckpointSchedule,
    heartbeat_timeout: Duration,
    coordinator: bool,
    /// Per rank: when the shard last served it weights (its compute starts then).
    served_at: Vec<Option<Duration>>,
    /// Per rank: a pull of it is waiting at the consistency gate.
    waiting: Vec<bool>,
    /// Speed-balanced sync batches, when the plan asks for them.
    balancer: Option<BatchBalancer>,
}

impl ShardEngine {
    /// Shard `cfg.shard` holding `params` (its slice), starting at `now`.
    pub fn new(cfg: EngineConfig, params: Vec<f32>, now: Duration) -> Result<Self, ConfigError> {
        let workers = cfg.server.workers;
        let coordinator = cfg.server.mode.coordinated(cfg.shards) && cfg.shard == 0;
        let balancer = cfg.server.balance_batches.then(|| {
            let batch = cfg.server.max_samples.unwrap_or(1) as usize / workers.max(1);
            BatchBalancer::new(workers, batch)
        });
        let core = ServerCore::for_shard(cfg.server, params, cfg.shard, cfg.shards)?;
        Ok(ShardEngine {
            served_at: vec![None; workers],
            waiting: vec![false; workers],
            balancer,
            checkpoints: CheckpointSchedule::new(
                cfg.checkpoint_every_updates,
                cfg.checkpoint_every,
                core.version(),
                now,
            ),
            members: Membership::new(workers),
            heartbeat_timeout: cfg.heartbeat_timeout,
            coordinator,
            core,
        })
    }

    pub fn core(&self) -> &ServerCore {
        &self.core
    }

    /// See `ServerCore::set_splitter`.
    pub fn set_splitter(&mut self, splitter: Option<std::sync::Arc<dyn crate::Splitter>>) {
        self.core.set_splitter(splitter);
    }

    /// Keeps a log of the updates for workers that replay them (`RunPlan::keeps_update_log`).
    pub fn keep_update_log(&mut self, budget: usize) {
        self.core.keep_update_log(budget);
    }

    /// Continues from a checkpoint's state.
    pub fn restore(&mut self, state: &ShardSnapshot, now: Duration) -> Result<(), RestoreError> {
        self.core.restore(state)?;
        self.checkpoints.mark(state.version, now);
        Ok(())
    }

    pub fn version(&self) -> u64 {
        self.core.version()
    }

    pub fn is_done(&self) -> bool {
        self.core.is_done()
    }

    pub fn stats(&self) -> ShardCounters {
        self.core.stats()
    }

    pub fn params(&self) -> &[f32] {
        self.core.params()
    }

    /// What this shard saw of each worker rank, with the batch each was last given.
    pub fn worker_stats(&self) -> Vec<WorkerStats> {
        self.core.worker_stats().to_vec()
    }

    /// `rank`'s pull waits at the consistency gate (until `pull_served`).
    fn pull_waiting(&mut self, rank: usize) {
        if let Some(w) = self.waiting.get_mut(rank) {
            *w = true;
        }
    }

    /// Where each rank stands at `now`, and whether a pull of it is waiting at the gate.
    pub fn presence(&self, now: Duration) -> Vec<(Presence, bool)> {
        (0..self.waiting.len())
            .map(|r| (self.members.presence(r, now), self.waiting[r]))
            .collect()
    }

    /// Decides a pull of `rank` (`None`: a peer that is not a worker) asking `ask`, which
    /// arrived at `arrived`: `Wait` while the consistency gate holds it (the rank shows as
    /// waiting; ask again when the shard changes), else the answer to send, with `params()`
    /// when it says `updated`. Every transport serves pulls through this one decision.
    pub fn pull(
        &mut self,
        rank: Option<usize>,
        ask: PullAsk,
        arrived: Duration,
        now: Duration,
    ) -> PullDecision {
        if ask.wait && !self.core.pull_ready(rank, ask.newer_than) {
            if let Some(rank) = rank {
                self.pull_waiting(rank);
            }
            return PullDecision::Wait;
        }
        let batch = rank.and_then(|rank| self.pull_served(rank, arrived, now));
        let version = self.version();
        PullDecision::Answer(PullReply {
            version,
            updated: ask.newer_than.is_none_or(|n| version > n),
            done: self.is_done(),
            batch,
        })
    }

    /// `rank`'s pull, which arrived at `arrived`, is answered at `now`: its wait is counted,
    /// its compute time starts, and it is told its next batch size when batches are
    /// balanced.
    fn pull_served(&mut self, rank: usize, arrived: Duration, now: Duration) -> Option<u32> {
        let slot = self.served_at.get_mut(rank)?;
        *slot = Some(now);
        self.waiting[rank] = false;
        let batch = self
            .balancer
            .as_ref()
            .and_then(|b| b.sizes(self.core.active()).get(rank).copied());
        if let Some(w) = self.core.worker_mut(rank) {
            w.wait_s += now.saturating_sub(arrived).as_secs_f64();
        }
        batch
    }

    pub fn workers(&self) -> usize {
        self.members.workers()
    }

    /// Ranks in the quorum.
    pub fn active_workers(&self) -> usize {
        self.core.active_workers()
    }

    /// Every worker rank has joined and gone: the run's work is over.
    pub fn all_departed(&self) -> bool {
        self.members.all_departed()
    }

    /// Every worker joined and left with a goodbye.
    pub fn all_said_goodbye(&self) -> bool {
        self.members.all_said_goodbye()
    }

    /// Ranks held by a worker now.
    pub fn workers_present(&self) -> usize {
        self.members.held()
    }

    /// A worker takes a rank at `now` (its heartbeat deadline starts then); one that held it
    /// before comes back into the quorum.
    pub fn join(&mut self, request: RankRequest, now: Duration) -> Result<Seat, JoinError> {
        let seat = self.members.join(request, now)?;
        if seat.rejoined {
            self.core.rejoin(seat.rank);
        }
        Ok(seat)
    }

    /// Whether `seat` still holds its rank (it was not evicted or replaced).
    pub fn holds(&self, seat: Seat) -> bool {
        self.members.holds(seat)
    }

    /// `seat` lets go of its rank and leaves the quorum. Returns whether waiting pulls must
    /// be woken (a step completed). A seat that no longer holds its rank changes nothing.
    pub fn leave(&mut self, seat: Seat, how: Departure) -> bool {
        self.members.leave(seat, how) && self.core.leave(seat.rank).is_some()
    }

    pub fn heartbeat(&mut self, rank: usize, now: Duration) {
        self.members.beat(rank, now);
    }

    /// Whether `rank`'s pulls (its last, or none yet: the first is whole) move every weight
    /// of its copy. Adam counts the gaps of a worker's sparse sums only then: the larger
    /// steps it gives rarely sent values reach a copy pulled as top-k differences late, and
    /// gradients from that lagging copy cost more than the gaps gain (docs/edge-links.md,
    /// twenty-eighth sitting).
    fn pulls_move_every_weight(&mut self, rank: usize) -> bool {
        let pull = self.core.worker_mut(rank).and_then(|w| w.codecs.pull);
        pull.is_none_or(|codec| codec.moves_every_weight())
    }

    /// Evicts workers whose heartbeats stopped; returns their ranks.
    pub fn evict_silent(&mut self, now: Duration) -> Vec<usize> {
        let evicted = self.members.evict_silent(now, self.heartbeat_timeout);
        for &rank in &evicted {
            self.core.leave(rank);
        }
        evicted
    }

    /// Offers a gradient from `meta.rank` (tagged with shard 0's step and members on a
    /// follower shard in coordinated mode).
    pub fn push(
        &mut self,
        meta: PushMeta,
        grad: &[f32],
        tag: Option<(u64, &[bool])>,
        now: Duration,
    ) -> PushReport {
        self.push_decoded(meta, grad, None, tag, now)
    }

    /// `push` of values decoded from `wire`, which the update log keeps (if kept).
    pub fn push_decoded(
        &mut self,
        mut meta: PushMeta,
        grad: &[f32],
        wire: Option<WireRef<'_>>,
        tag: Option<(u64, &[bool])>,
        now: Duration,
    ) -> PushReport {
        let before = self.core.version();
        let rank = meta.rank;
        meta.accumulated &= self.pulls_move_every_weight(rank);
        let served = self.served_at.get_mut(rank).and_then(Option::take);
        let seconds = served.map(|t| now.saturating_sub(t).as_secs_f64());
        if let Some(w) = self.core.worker_mut(rank) {
            w.compute_s += seconds.unwrap_or(0.0);
            w.batch = meta.samples;
        }
        if let (Some(b), Some(seconds)) = (&mut self.balancer, seconds) {
            b.observe(rank, meta.samples, seconds);
        }
        let outcome = self.core.push_with(meta, grad, wire, tag);
        if matches!(outcome, Err(_) | Ok(PushOutcome::Dropped { .. })) {
            if let Some(w) = self.core.worker_mut(rank) {
                w.not_applied += 1;
            }
        }
        let version = self.core.version();
        let changed = version != before || self.core.is_done();
        let snapshot = (version != before && self.checkpoints.due_after_update(version, now))
            .then(|| self.core.state());
        let admitted_step = match outcome {
            Ok(PushOutcome::Buffered { .. }) if self.coordinator => Some(version),
            Ok(PushOutcome::Applied { version, .. }) if self.coordinator => Some(version - 1),
            _ => None,
        };
        PushReport {
            outcome,
            changed,
            snapshot,
            admitted_step,
        }
    }

    /// Adds what `rank`'s link carried (bytes each way, seconds sending and receiving) to its
    /// record.
    pub fn link_used(&mut self, rank: usize, link: LinkUse) {
        if let Some(w) = self.core.worker_mut(rank) {
            w.add_link(link);
        }
    }

    /// The members of completed step `step` (shard 0 in coordinated mode).
    pub fn step_members(&self, step: u64) -> Option<&[bool]> {
        self.core.members_of(step)
    }

    /// The consistency mode this shard serves.
    pub fn mode(&self) -> crate::config::Mode {
        self.core.mode()
    }

    /// The state to write if the time-based checkpoint interval has passed.
    pub fn checkpoint_due(&mut self, now: Duration) -> Option<ShardSnapshot> {
        self.checkpoints
            .due_by_time(self.core.version(), now)
            .then(|| self.core.state())
    }

    /// Takes no checkpoint snapshot before `until` (the writer failed and backs off).
    pub fn hold_checkpoints(&mut self, until: Duration) {
        self.checkpoints.hold_until(until);
    }

    /// The time-based checkpoint interval, for the caller's timer.
    pub fn checkpoint_every(&self) -> Option<Duration> {
        self.checkpoints.every()
    }

    /// The complete state now (final checkpoints, snapshots).
    pub fn state(&self) -> ShardSnapshot {
        self.core.state()
    }
}
