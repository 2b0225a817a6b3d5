//! The parameter server's state machine for one shard: parameters, optimizer, version and the
//! consistency rules. The caller owns IO, waiting and clocks; this only decides.

use crate::config::{Aggregate, Mode, ServerConfig};
use crate::error::{ConfigError, PushError, RestoreError};
use crate::optimizer::Optimizer;
use std::collections::VecDeque;

/// What came with a gradient besides its values.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct PushMeta {
    pub rank: usize,
    /// The server version of the weights the gradient was computed from.
    pub base_version: u64,
    /// Samples the gradient averages over (its weight in a sync step).
    pub samples: u32,
    /// The worker's mean training loss on that batch (reported, never used for the update).
    pub loss: f32,
}

/// What the server did with an accepted gradient.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PushOutcome {
    /// An update was applied; the server is now at `version`.
    Applied { version: u64, staleness: u64 },
    /// Sync: stored for the current step, which still waits for `waiting_for` more gradients.
    Buffered { waiting_for: usize },
    /// Not applied, by the rules (not an error): too stale in async mode, or a late gradient
    /// for a sync step that is already complete.
    Dropped { staleness: u64 },
    /// The run reached its update budget; no more gradients are taken.
    Done,
}

/// Counters describing the shard's life so far.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct ServerStats {
    pub version: u64,
    /// Gradients that went into an update.
    pub gradients_applied: u64,
    /// Samples behind those gradients.
    pub samples_applied: u64,
    pub dropped_stale: u64,
    pub rejected_nonfinite: u64,
    pub rejected_other: u64,
    pub staleness_sum: u64,
    pub staleness_max: u64,
    /// Exponential moving average of the workers' reported training loss.
    pub loss_ema: Option<f32>,
}

impl ServerStats {
    pub fn staleness_mean(&self) -> f64 {
        if self.gradients_applied == 0 {
            0.0
        } else {
            self.staleness_sum as f64 / self.gradients_applied as f64
        }
    }
}

/// A shard's complete state, as `ServerCore::state` takes it and `restore` puts it back.
#[derive(Debug, Clone, PartialEq)]
pub struct CoreState {
    pub params: Vec<f32>,
    pub optimizer: Vec<(String, Vec<f32>)>,
    pub optimizer_step: u64,
    pub version: u64,
    pub stats: ServerStats,
}

#[derive(Debug, Clone)]
pub struct ServerCore {
    config: ServerConfig,
    params: Vec<f32>,
    optimizer: Optimizer,
    version: u64,
    /// Sync: this step's gradients, each times its weight (samples for `Mean`, 1 for `Sum`).
    accum: Vec<f32>,
    /// Sync: the weights' total; the update is `accum / accum_weight`.
    accum_weight: f64,
    /// Sync: which ranks have been heard from in this step (applied or skipped).
    heard: Vec<bool>,
    /// Ranks still taking part; a rank that left does not hold up the barrier.
    active: Vec<bool>,
    /// Sync: which ranks' gradients went into this step (heard, and not refused).
    contributed: Vec<bool>,
    /// Sync: the members of the most recent completed steps, oldest first, for a coordinating
    /// shard 0 to tell the other shards which gradients make up each step.
    history: VecDeque<(u64, Vec<bool>)>,
    stats: ServerStats,
}

/// Completed steps whose members a coordinating shard remembers.
const MEMBER_HISTORY: usize = 64;

impl ServerCore {
    /// A shard holding `params` (its slice of the model) under `config`.
    pub fn new(config: ServerConfig, params: Vec<f32>) -> Result<Self, ConfigError> {
        config.validate()?;
        let len = params.len();
        let accum = if config.mode.is_sync() {
            vec![0.0; len]
        } else {
            Vec::new()
        };
        Ok(ServerCore {
            optimizer: Optimizer::with_schedule(config.optimizer, config.schedule, len),
            heard: vec![false; config.workers],
            active: vec![true; config.workers],
            contributed: vec![false; config.workers],
            history: VecDeque::new(),
            config,
            params,
            version: 0,
            accum,
            accum_weight: 0.0,
            stats: ServerStats::default(),
        })
    }

    pub fn config(&self) -> &ServerConfig {
        &self.config
    }

    pub fn params(&self) -> &[f32] {
        &self.params
    }

    pub fn optimizer(&self) -> &Optimizer {
        &self.optimizer
    }

    pub fn version(&self) -> u64 {
        self.version
    }

    pub fn stats(&self) -> ServerStats {
        ServerStats {
            version: self.version,
            ..self.stats
        }
    }

    pub fn is_done(&self) -> bool {
        self.config
            .max_updates
            .is_some_and(|max| self.version >= max)
    }

    /// Ranks still in the quorum.
    pub fn active_workers(&self) -> usize {
        self.active.iter().filter(|&&a| a).count()
    }

    /// Everything needed to continue this shard elsewhere: weights, optimizer state, version
    /// and counters. Taken between steps it is complete (a sync step's partial sum is not kept).
    pub fn state(&self) -> CoreState {
        CoreState {
            params: self.params.clone(),
            optimizer: self
                .optimizer
                .state()
                .into_iter()
                .map(|(n, v)| (n.to_string(), v.to_vec()))
                .collect(),
            optimizer_step: self.optimizer.step(),
            version: self.version,
            stats: self.stats(),
        }
    }

    /// Continues from `state`; any partial sync step in progress is discarded.
    pub fn restore(&mut self, state: &CoreState) -> Result<(), RestoreError> {
        if state.params.len() != self.params.len() {
            return Err(RestoreError::Length {
                what: "parameters".into(),
                expected: self.params.len(),
                got: state.params.len(),
            });
        }
        self.optimizer
            .restore(&state.optimizer, state.optimizer_step)?;
        self.params.copy_from_slice(&state.params);
        self.version = state.version;
        self.stats = state.stats;
        self.accum.fill(0.0);
        self.accum_weight = 0.0;
        self.heard.fill(false);
        self.contributed.fill(false);
        self.history.clear();
        Ok(())
    }

    /// Which ranks' gradients made up completed sync step `step` (the update from version
    /// `step` to `step + 1`), while it is among the most recent ones.
    pub fn members_of(&self, step: u64) -> Option<&[bool]> {
        self.history
            .iter()
            .rev()
            .find(|(s, _)| *s == step)
            .map(|(_, m)| &m[..])
    }

    /// Applies one step that was combined elsewhere (a follower shard's step `step`, as shard
    /// 0 decided it): `accum` holds the weighted sum of its gradients, `weight` their total
    /// weight. The version becomes `step + 1`, which keeps a follower numbered as shard 0 is
    /// even after it lost updates to a restart.
    pub fn apply_step(&mut self, step: u64, accum: &mut [f32], weight: f64) {
        if weight > 0.0 {
            let scale = match self.config.aggregate {
                Aggregate::Mean => (1.0 / weight) as f32,
                Aggregate::Sum => 1.0,
            };
            if scale != 1.0 {
                for a in accum.iter_mut() {
                    *a *= scale;
                }
            }
            self.optimizer.apply(&mut self.params, accum);
        }
        self.version = self.version.max(step + 1);
    }

    /// Offers one gradient. On `Err` nothing changed except counters, and in sync mode the
    /// worker counts as heard from for this step (so a bad gradient cannot stall the barrier).
    pub fn push(&mut self, meta: PushMeta, grad: &[f32]) -> Result<PushOutcome, PushError> {
        let workers = self.config.workers;
        if meta.rank >= workers {
            self.stats.rejected_other += 1;
            return Err(PushError::UnknownWorker {
                rank: meta.rank,
                workers,
            });
        }
        if grad.len() != self.params.len() {
            self.stats.rejected_other += 1;
            return Err(PushError::WrongLength {
                expected: self.params.len(),
                got: grad.len(),
            });
        }
        if meta.base_version > self.version {
            self.stats.rejected_other += 1;
            return Err(PushError::FromTheFuture {
                base: meta.base_version,
                current: self.version,
            });
        }
        if self.is_done() {
            return Ok(PushOutcome::Done);
        }
        let staleness = self.version - meta.base_version;
        match self.config.mode {
            Mode::Async { max_staleness } => {
                if max_staleness.is_some_and(|bound| staleness > bound) {
                    self.stats.dropped_stale += 1;
                    return Ok(PushOutcome::Dropped { staleness });
                }
                self.check_gradient(meta, grad)?;
                self.optimizer.apply(&mut self.params, grad);
                self.version += 1;
                self.record_applied(meta, staleness);
                Ok(PushOutcome::Applied {
                    version: self.version,
                    staleness,
                })
            }
            Mode::Sync { .. } => {
                if !self.active[meta.rank] {
                    self.stats.rejected_other += 1;
                    return Err(PushError::NotInQuorum { rank: meta.rank });
                }
                let backups =
                    matches!(self.config.mode, Mode::Sync { backup_workers } if backup_workers > 0);
                if staleness > 0 && backups {
                    // A straggler's gradient for a step that completed without it: backup
                    // workers exist precisely so that it can be dropped.
                    self.stats.dropped_stale += 1;
                    return Ok(PushOutcome::Dropped { staleness });
                }
                // Without backups a gradient from behind (a worker that rejoined after a
                // failure) counts toward the current step: every active worker contributes
                // once per step to every shard, so no two shards can wait on each other.
                if self.heard[meta.rank] {
                    self.stats.rejected_other += 1;
                    return Err(PushError::DuplicatePush {
                        rank: meta.rank,
                        version: self.version,
                    });
                }
                self.heard[meta.rank] = true;
                if let Err(e) = self.check_gradient(meta, grad) {
                    self.try_complete_step();
                    return Err(e);
                }
                let weight = match self.config.aggregate {
                    Aggregate::Mean => meta.samples as f32,
                    Aggregate::Sum => 1.0,
                };
                for (a, &g) in self.accum.iter_mut().zip(grad) {
                    *a += weight * g;
                }
                self.accum_weight += f64::from(weight);
                self.contributed[meta.rank] = true;
                self.record_applied(meta, staleness);
                match self.try_complete_step() {
                    Some(version) => Ok(PushOutcome::Applied { version, staleness }),
                    None => Ok(PushOutcome::Buffered {
                        waiting_for: self.quorum().saturating_sub(self.heard_count()),
                    }),
                }
            }
        }
    }

    /// Takes `rank` out of the quorum (it finished, or was declared dead). In sync mode this may
    /// complete the current step; returns the new version if it did.
    pub fn leave(&mut self, rank: usize) -> Option<u64> {
        if rank >= self.active.len() || !self.active[rank] {
            return None;
        }
        self.active[rank] = false;
        if self.config.mode.is_sync() && !self.heard[rank] {
            return self.try_complete_step();
        }
        None
    }

    /// Puts `rank` back into the quorum (from the next step on, in sync mode).
    pub fn rejoin(&mut self, rank: usize) {
        if let Some(a) = self.active.get_mut(rank) {
            *a = true;
        }
        if let Some(h) = self.heard.get_mut(rank) {
            // It has not pushed for this step; marking it heard keeps the step's quorum honest
            // only if it did. A rejoining worker pulls first and pushes for the current step.
            *h = false;
        }
    }

    pub(crate) fn check_gradient(&mut self, meta: PushMeta, grad: &[f32]) -> Result<(), PushError> {
        if meta.samples == 0 {
            self.stats.rejected_other += 1;
            return Err(PushError::EmptyBatch);
        }
        let bad = grad.iter().filter(|g| !g.is_finite()).count();
        if bad > 0 {
            self.stats.rejected_nonfinite += 1;
            return Err(PushError::NonFinite { count: bad });
        }
        Ok(())
    }

    pub(crate) fn record_applied(&mut self, meta: PushMeta, staleness: u64) {
        let s = &mut self.stats;
        s.gradients_applied += 1;
        s.samples_applied += u64::from(meta.samples);
        s.staleness_sum += staleness;
        s.staleness_max = s.staleness_max.max(staleness);
        if meta.loss.is_finite() {
            s.loss_ema = Some(match s.loss_ema {
                None => meta.loss,
                Some(avg) => 0.95 * avg + 0.05 * meta.loss,
            });
        }
    }

    /// How many gradients complete a sync step: all active workers, less the backups.
    fn quorum(&self) -> usize {
        let backups = match self.config.mode {
            Mode::Sync { backup_workers } => backup_workers,
            Mode::Async { .. } => 0,
        };
        self.active_workers().saturating_sub(backups).max(1)
    }

    fn heard_count(&self) -> usize {
        self.heard
            .iter()
            .zip(&self.active)
            .filter(|(&h, &a)| h && a)
            .count()
    }

    fn try_complete_step(&mut self) -> Option<u64> {
        let heard = self.heard_count();
        if heard == 0 || heard < self.quorum() {
            return None;
        }
        if self.accum_weight > 0.0 {
            let scale = match self.config.aggregate {
                Aggregate::Mean => (1.0 / self.accum_weight) as f32,
                Aggregate::Sum => 1.0,
            };
            if scale != 1.0 {
                for a in &mut self.accum {
                    *a *= scale;
                }
            }
            self.optimizer.apply(&mut self.params, &self.accum);
        }
        // A step whose every gradient was rejected still ends, so no worker waits forever.
        self.accum.fill(0.0);
        self.accum_weight = 0.0;
        self.heard.fill(false);
        if self.history.len() == MEMBER_HISTORY {
            self.history.pop_front();
        }
        self.history.push_back((
            self.version,
            std::mem::replace(&mut self.contributed, vec![false; self.config.workers]),
        ));
        self.version += 1;
        Some(self.version)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::optimizer::OptimizerConfig;

    fn meta(rank: usize, base_version: u64) -> PushMeta {
        PushMeta {
            rank,
            base_version,
            samples: 1,
            loss: 1.0,
        }
    }

    fn server(mode: Mode, workers: usize) -> ServerCore {
        let cfg = ServerConfig {
            mode,
            workers,
            optimizer: OptimizerConfig::sgd(1.0),
            ..Default::default()
        };
        ServerCore::new(cfg, vec![0.0; 2]).unwrap()
    }

    const SYNC: Mode = Mode::Sync { backup_workers: 0 };

    #[test]
    fn a_completed_step_remembers_its_members() {
        let mut s = server(Mode::Sync { backup_workers: 1 }, 3);
        s.push(meta(2, 0), &[1.0, 1.0]).unwrap();
        assert_eq!(s.members_of(0), None, "step 0 is still open");
        s.push(meta(0, 0), &[1.0, 1.0]).unwrap();
        assert_eq!(s.members_of(0), Some(&[true, false, true][..]));
        // The straggler's gradient is dropped, and step 1 starts empty.
        assert!(matches!(
            s.push(meta(1, 0), &[1.0, 1.0]),
            Ok(PushOutcome::Dropped { .. })
        ));
        s.push(meta(1, 1), &[1.0, 1.0]).unwrap();
        s.push(meta(0, 1), &[1.0, 1.0]).unwrap();
        assert_eq!(s.members_of(1), Some(&[true, true, false][..]));
        assert_eq!(s.members_of(0), Some(&[true, false, true][..]));
    }

    #[test]
    fn sync_waits_for_every_worker_then_applies_the_sample_weighted_mean() {
        let mut s = server(SYNC, 2);
        let m0 = PushMeta {
            samples: 1,
            ..meta(0, 0)
        };
        let m1 = PushMeta {
            samples: 3,
            ..meta(1, 0)
        };
        assert_eq!(
            s.push(m0, &[4.0, 0.0]),
            Ok(PushOutcome::Buffered { waiting_for: 1 })
        );
        assert_eq!(s.version(), 0);
        assert_eq!(s.params(), &[0.0, 0.0]);
        assert_eq!(
            s.push(m1, &[0.0, 4.0]),
            Ok(PushOutcome::Applied {
                version: 1,
                staleness: 0
            })
        );
        // mean = (1*[4,0] + 3*[0,4]) / 4 = [1, 3]; lr 1.
        assert_eq!(s.params(), &[-1.0, -3.0]);
    }

    #[test]
    fn sync_sum_adds_the_workers_gradients() {
        let cfg = ServerConfig {
            mode: SYNC,
            workers: 2,
            optimizer: OptimizerConfig::sgd(1.0),
            aggregate: Aggregate::Sum,
            ..Default::default()
        };
        let mut s = ServerCore::new(cfg, vec![0.0; 2]).unwrap();
        let m1 = PushMeta {
            samples: 3,
            ..meta(1, 0)
        };
        s.push(meta(0, 0), &[4.0, 0.0]).unwrap();
        s.push(m1, &[0.0, 4.0]).unwrap();
        assert_eq!(s.params(), &[-4.0, -4.0]);
    }

    #[test]
    fn sync_refuses_duplicates_and_counts_late_gradients_toward_the_current_step() {
        let mut s = server(SYNC, 2);
        s.push(meta(0, 0), &[1.0, 1.0]).unwrap();
        assert_eq!(
            s.push(meta(0, 0), &[1.0, 1.0]),
            Err(PushError::DuplicatePush {
                rank: 0,
                version: 0
            })
        );
        s.push(meta(1, 0), &[1.0, 1.0]).unwrap();
        // Rank 1 pushes again from version 0 (say it rejoined and pulled before the step ended):
        // without backup workers it is part of step 1, not dropped.
        assert_eq!(
            s.push(meta(1, 0), &[3.0, 3.0]),
            Ok(PushOutcome::Buffered { waiting_for: 1 })
        );
        assert!(matches!(
            s.push(meta(0, 1), &[1.0, 1.0]),
            Ok(PushOutcome::Applied { version: 2, .. })
        ));
        assert_eq!(s.params(), &[-3.0, -3.0]);
        assert_eq!(s.stats().dropped_stale, 0);
        assert_eq!(s.stats().staleness_max, 1);
    }

    #[test]
    fn sync_backup_workers_complete_a_step_without_the_slowest() {
        let mut s = server(Mode::Sync { backup_workers: 1 }, 3);
        s.push(meta(2, 0), &[1.0, 1.0]).unwrap();
        assert!(matches!(
            s.push(meta(0, 0), &[1.0, 1.0]),
            Ok(PushOutcome::Applied { version: 1, .. })
        ));
        assert_eq!(
            s.push(meta(1, 0), &[9.0, 9.0]),
            Ok(PushOutcome::Dropped { staleness: 1 })
        );
        assert_eq!(s.params(), &[-1.0, -1.0]);
    }

    #[test]
    fn a_leaving_worker_releases_the_barrier() {
        let mut s = server(SYNC, 2);
        s.push(meta(0, 0), &[2.0, 2.0]).unwrap();
        assert_eq!(s.leave(1), Some(1));
        assert_eq!(s.params(), &[-2.0, -2.0]);
        // The remaining worker now steps alone.
        assert!(matches!(
            s.push(meta(0, 1), &[1.0, 1.0]),
            Ok(PushOutcome::Applied { version: 2, .. })
        ));
        assert_eq!(
            s.push(meta(1, 2), &[1.0, 1.0]),
            Err(PushError::NotInQuorum { rank: 1 })
        );
        s.rejoin(1);
        assert!(matches!(
            s.push(meta(1, 2), &[1.0, 1.0]),
            Ok(PushOutcome::Buffered { .. })
        ));
    }

    #[test]
    fn nonfinite_gradients_are_counted_never_applied_and_do_not_stall_sync() {
        let mut s = server(SYNC, 2);
        assert_eq!(
            s.push(meta(0, 0), &[f32::NAN, f32::INFINITY]),
            Err(PushError::NonFinite { count: 2 })
        );
        assert!(matches!(
            s.push(meta(1, 0), &[1.0, 1.0]),
            Ok(PushOutcome::Applied { version: 1, .. })
        ));
        assert_eq!(s.params(), &[-1.0, -1.0]);
        assert_eq!(s.stats().rejected_nonfinite, 1);

        let mut a = server(
            Mode::Async {
                max_staleness: None,
            },
            1,
        );
        assert!(a.push(meta(0, 0), &[1.0, f32::NEG_INFINITY]).is_err());
        assert_eq!(a.params(), &[0.0, 0.0]);
        assert_eq!(a.version(), 0);
    }

    #[test]
    fn async_applies_on_arrival_and_records_staleness() {
        let mut s = server(
            Mode::Async {
                max_staleness: Some(1),
            },
            2,
        );
        assert_eq!(
            s.push(meta(0, 0), &[1.0, 0.0]),
            Ok(PushOutcome::Applied {
                version: 1,
                staleness: 0
            })
        );
        assert_eq!(
            s.push(meta(1, 0), &[1.0, 0.0]),
            Ok(PushOutcome::Applied {
                version: 2,
                staleness: 1
            })
        );
        assert_eq!(
            s.push(meta(1, 0), &[1.0, 0.0]),
            Ok(PushOutcome::Dropped { staleness: 2 })
        );
        let st = s.stats();
        assert_eq!((st.gradients_applied, st.staleness_max), (2, 1));
        assert_eq!(st.staleness_mean(), 0.5);
        assert_eq!(s.params(), &[-2.0, 0.0]);
    }

    #[test]
    fn bad_pushes_are_refused_without_changing_state() {
        let mut s = server(
            Mode::Async {
                max_staleness: None,
            },
            2,
        );
        assert_eq!(
            s.push(meta(5, 0), &[1.0, 1.0]),
            Err(PushError::UnknownWorker {
                rank: 5,
                workers: 2
            })
        );
        assert_eq!(
            s.push(meta(0, 0), &[1.0]),
            Err(PushError::WrongLength {
                expected: 2,
                got: 1
            })
        );
        assert_eq!(
            s.push(meta(0, 3), &[1.0, 1.0]),
            Err(PushError::FromTheFuture {
                base: 3,
                current: 0
            })
        );
        let empty = PushMeta {
            samples: 0,
            ..meta(0, 0)
        };
        assert_eq!(s.push(empty, &[1.0, 1.0]), Err(PushError::EmptyBatch));
        assert_eq!((s.version(), s.params()), (0, &[0.0f32, 0.0][..]));
        assert_eq!(s.stats().rejected_other, 4);
    }

    #[test]
    fn stops_at_the_update_budget() {
        let cfg = ServerConfig {
            mode: Mode::Async {
                max_staleness: None,
            },
            workers: 1,
            optimizer: OptimizerConfig::sgd(1.0),
            max_updates: Some(2),
            ..Default::default()
        };
        let mut s = ServerCore::new(cfg, vec![0.0]).unwrap();
        s.push(meta(0, 0), &[1.0]).unwrap();
        s.push(meta(0, 1), &[1.0]).unwrap();
        assert!(s.is_done());
        assert_eq!(s.push(meta(0, 2), &[1.0]), Ok(PushOutcome::Done));
        assert_eq!(s.params(), &[-2.0]);
    }

    #[test]
    fn state_round_trips_into_a_fresh_core() {
        let cfg = ServerConfig {
            mode: Mode::Async {
                max_staleness: None,
            },
            workers: 1,
            optimizer: OptimizerConfig::adam(0.1),
            ..Default::default()
        };
        let mut a = ServerCore::new(cfg.clone(), vec![0.0; 2]).unwrap();
        a.push(meta(0, 0), &[1.0, -1.0]).unwrap();
        let saved = a.state();
        let mut b = ServerCore::new(cfg.clone(), vec![9.0; 2]).unwrap();
        b.restore(&saved).unwrap();
        assert_eq!(b.state(), saved);
        a.push(meta(0, 1), &[0.5, 0.5]).unwrap();
        b.push(meta(0, 1), &[0.5, 0.5]).unwrap();
        assert_eq!(a.params(), b.params());
        let mut small = ServerCore::new(cfg, vec![0.0; 3]).unwrap();
        assert!(small.restore(&saved).is_err());
    }

    #[test]
    fn config_validation() {
        let bad = ServerConfig {
            mode: Mode::Sync { backup_workers: 2 },
            workers: 2,
            ..Default::default()
        };
        assert!(bad.validate().is_err());
        assert!(ServerConfig {
            workers: 0,
            ..Default::default()
        }
        .validate()
        .is_err());
        assert!(ServerConfig::default().validate().is_ok());
    }
}
