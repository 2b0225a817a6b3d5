//! `ServerCore`: one shard's state (`ShardState`) under its consistency rule (`Consistency`).
//! It checks what every rule needs checked, keeps the quorum, and lets the rule decide. The
//! caller owns IO, waiting and clocks; this only decides.

use crate::admission::{Gate, Gradient, StepTag, Verdict};
use crate::config::ServerConfig;
use crate::consistency::{self, Consistency};
use crate::error::{ConfigError, PushError, RestoreError};
use crate::optimizer::Optimizer;
use crate::shard_state::ShardState;
pub use crate::shard_state::{PushMeta, PushOutcome, ShardCounters, ShardSnapshot};
use crate::splitter::Splitter;
use crate::update_log::WireRef;
use crate::worker_stats::WorkerStats;
use std::sync::Arc;

#[derive(Debug)]
pub struct ServerCore {
    config: ServerConfig,
    state: ShardState,
    rule: Box<dyn Consistency>,
    /// Ranks still taking part; a rank that left does not hold up a barrier.
    active: Vec<bool>,
    /// Every check a gradient passes before the rule sees it.
    gate: Gate,
}

impl ServerCore {
    /// A single shard holding `params` (the whole model) under `config`.
    pub fn new(config: ServerConfig, params: Vec<f32>) -> Result<Self, ConfigError> {
        Self::for_shard(config, params, 0, 1)
    }

    /// Shard `shard` of `shards`, holding `params` (its slice of the model).
    pub fn for_shard(
        config: ServerConfig,
        params: Vec<f32>,
        shard: usize,
        shards: usize,
    ) -> Result<Self, ConfigError> {
        config.validate()?;
        let rule = consistency::for_mode(&config, params.len(), shard, shards);
        Ok(ServerCore {
            state: ShardState::new(&config, params),
            active: vec![true; config.workers],
            gate: Gate::default(),
            rule,
            config,
        })
    }

    pub fn config(&self) -> &ServerConfig {
        &self.config
    }

    pub fn params(&self) -> &[f32] {
        self.state.params()
    }

    pub fn optimizer(&self) -> &Optimizer {
        self.state.optimizer()
    }

    /// Runs each update's loop in the pieces `splitter` cuts it into, perhaps at once (the
    /// caller's threads: the core starts none); same bits as whole.
    pub fn set_splitter(&mut self, splitter: Option<Arc<dyn Splitter>>) {
        self.state.set_splitter(splitter);
    }

    pub fn version(&self) -> u64 {
        self.state.version()
    }

    pub fn stats(&self) -> ShardCounters {
        self.state.stats()
    }

    /// What this shard saw of each worker rank.
    pub fn worker_stats(&self) -> &[WorkerStats] {
        self.state.worker_stats()
    }

    pub(crate) fn worker_mut(&mut self, rank: usize) -> Option<&mut WorkerStats> {
        self.state.worker_mut(rank)
    }

    pub fn is_done(&self) -> bool {
        self.config
            .max_updates
            .is_some_and(|max| self.version() >= max)
    }

    /// Per rank: whether it is in the quorum.
    pub fn active(&self) -> &[bool] {
        &self.active
    }

    /// Ranks still in the quorum.
    pub fn active_workers(&self) -> usize {
        self.active.iter().filter(|&&a| a).count()
    }

    /// Everything needed to continue this shard elsewhere: weights, optimizer state, version
    /// and counters. Taken between steps it is complete (a partial step is not kept).
    pub fn state(&self) -> ShardSnapshot {
        self.state.snapshot()
    }

    /// Continues from `state`; any partial step in progress is discarded.
    pub fn restore(&mut self, state: &ShardSnapshot) -> Result<(), RestoreError> {
        self.state.restore(state)?;
        self.rule.reset();
        Ok(())
    }

    /// Which ranks' gradients made up completed step `step` (the update from version `step`
    /// to `step + 1`), on a shard that decides steps, while it is among the recent ones.
    pub fn members_of(&self, step: u64) -> Option<&[bool]> {
        self.rule.members_of(step)
    }

    /// Whether a waiting pull by `rank` for weights newer than `newer_than` may return: the
    /// rule's gate, or the run is over.
    pub fn mode(&self) -> crate::config::Mode {
        self.config.mode
    }

    pub fn pull_ready(&self, rank: Option<usize>, newer_than: Option<u64>) -> bool {
        self.is_done() || self.rule.pull_ready(&self.state, rank, newer_than)
    }

    /// Offers one gradient. On `Err` the weights did not change; counters did, and where a
    /// step waits on ranks a gradient refused for its values counts its rank as heard from
    /// (so a bad gradient cannot stall the barrier).
    pub fn push(&mut self, meta: PushMeta, grad: &[f32]) -> Result<PushOutcome, PushError> {
        self.push_with(meta, grad, None, None)
    }

    /// Offers a follower shard `meta.rank`'s gradient for shard 0's step `step`, whose members
    /// are `members` (one flag per worker).
    pub fn push_step(
        &mut self,
        meta: PushMeta,
        grad: &[f32],
        step: u64,
        members: &[bool],
    ) -> Result<PushOutcome, PushError> {
        self.push_with(meta, grad, None, Some((step, members)))
    }

    /// `push` or, with `tag`, `push_step`; with the bytes `grad` was decoded from (`wire`),
    /// which the shard's update log keeps if it keeps one.
    pub fn push_with(
        &mut self,
        meta: PushMeta,
        grad: &[f32],
        wire: Option<WireRef<'_>>,
        tag: Option<(u64, &[bool])>,
    ) -> Result<PushOutcome, PushError> {
        self.offer(Gradient {
            meta,
            values: grad,
            wire: wire.filter(|_| self.state.keeps_log()),
            tag: tag.map(|(step, members)| StepTag { step, members }),
        })
    }

    /// Whether it keeps a log of its updates (`keep_update_log`).
    pub fn keeps_update_log(&self) -> bool {
        self.state.keeps_log()
    }

    /// Keeps a log of the updates of the last `budget` bytes of pushes, for replay pulls.
    pub fn keep_update_log(&mut self, budget: usize) {
        self.state.keep_log(budget);
    }

    /// Writes the whole slice with the optimizer's state into `out` (a replay pull's whole
    /// form).
    pub fn write_whole(&self, out: &mut Vec<u8>) {
        self.state.write_whole(out);
    }

    /// Encodes the updates from version `held` to now into `out`, if the log holds them,
    /// without the bytes of the puller's last push (its fingerprint `yours`).
    pub fn updates_since(&self, held: u64, yours: Option<u64>, out: &mut Vec<u8>) -> bool {
        self.state.updates_since(held, yours, out)
    }

    /// The one path of every gradient: the gate's checks, then the rule.
    fn offer(&mut self, grad: Gradient<'_>) -> Result<PushOutcome, PushError> {
        let source = self.rule.step_source();
        let state = &mut self.state;
        match self
            .gate
            .admit(&self.config, state, &self.active, source, grad)
        {
            Verdict::Admitted(checked) => self.rule.push(state, &self.active, checked),
            Verdict::RunOver => Ok(PushOutcome::Done),
            Verdict::Misaddressed(e) => Err(e),
            Verdict::BadValues(e, from) => {
                self.rule.refused(state, &self.active, from);
                Err(e)
            }
        }
    }

    /// Takes `rank` out of the quorum (it finished, or was declared dead). This may complete
    /// a step; returns the new version if it did.
    pub fn leave(&mut self, rank: usize) -> Option<u64> {
        if !self.active.get(rank).copied().unwrap_or(false) {
            return None;
        }
        self.active[rank] = false;
        self.rule
            .leave(&mut self.state, &self.active, rank)
            .then(|| self.version())
    }

    /// Puts `rank` back into the quorum (from the next step on, in sync mode).
    pub fn rejoin(&mut self, rank: usize) {
        if let Some(a) = self.active.get_mut(rank) {
            *a = true;
            self.rule.rejoin(&self.state, rank);
        }
    }
}

#[cfg(test)]
#[path = "server_tests.rs"]
mod tests;

#[cfg(test)]
#[path = "server_guard_tests.rs"]
mod guard_tests;
