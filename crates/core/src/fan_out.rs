//! The client's side of the protocol over S shards, with no IO: the order a push goes out in
//! (all shards at once, or shard 0 first in coordinated sync), the version of each slice the
//! client holds and whether its last push there waits on a step, what a pull asks each shard,
//! and how the shards' answers combine into one. `TcpClient` and the engine simulation drive
//! this same type; they only carry the messages.

use crate::client::PullReply;
use crate::config::Mode;
use crate::shard_state::PushOutcome;
use std::collections::VecDeque;

/// How many pulls back a push may name the weights it was computed from (an overlapped
/// worker's gradient is one pull behind; more is kept for slack).
const PULLS_REMEMBERED: usize = 4;

/// What the client knows of one shard's slice.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct Slice {
    /// The version of the shard's slice in the caller's buffer.
    version: u64,
    /// The last push here is buffered for a step that has not completed: a waiting pull
    /// waits only on such shards (never for a step this client has not pushed to).
    pending: bool,
    /// The caller's buffer holds this slice at `version`. Not so after a (re)join, whose
    /// `version` is the shard's, not what the buffer holds (a worker that reconnected keeps
    /// its old weights), nor once the caller asks for every slice: the next pull then takes
    /// the slice whatever its version, so no push claims a base version it did not compute
    /// from.
    held: bool,
}

/// How a push goes out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PushRoute {
    /// To every shard at once.
    Together,
    /// To shard 0, which admits the gradient into a step (or drops it as late) and answers
    /// once the step is complete; then to the others tagged with that step, or to none if
    /// shard 0 did not admit it (coordinated sync: backup workers over several shards).
    ShardZeroFirst,
}

/// What a pull asks one shard.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PullAsk {
    /// Send the slice only if newer than this version (`None`: send it whatever it is).
    pub newer_than: Option<u64>,
    /// Wait at the shard's gate for it.
    pub wait: bool,
}

impl PullAsk {
    /// The slice whatever its version, at once.
    pub const WHOLE: PullAsk = PullAsk {
        newer_than: None,
        wait: false,
    };
}

/// One client's view of the shards it talks to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FanOut {
    slices: Vec<Slice>,
    route: PushRoute,
    /// The mode's gate is the rank's own lead (`ModeSpec::lead_gate`).
    lead_gate: bool,
    /// After each of the last few pulls: the version it answered and each slice's version
    /// then, newest last. A push names the weights it was computed from by that version
    /// (`PushMeta::base_version`), which is not the last pull's when the worker pulls while
    /// it computes.
    pulls: VecDeque<(u64, Vec<u64>)>,
}

impl FanOut {
    /// A client of `versions.len()` shards under `mode`, holding (after its handshake) each
    /// shard's slice of the given version.
    pub fn new(mode: Mode, versions: &[u64]) -> Self {
        let route = if mode.coordinated(versions.len()) {
            PushRoute::ShardZeroFirst
        } else {
            PushRoute::Together
        };
        FanOut {
            slices: versions
                .iter()
                .map(|&version| Slice {
                    version,
                    pending: false,
                    held: false,
                })
                .collect(),
            route,
            lead_gate: mode.spec().lead_gate,
            pulls: VecDeque::new(),
        }
    }

    pub fn shards(&self) -> usize {
        self.slices.len()
    }

    pub fn route(&self) -> PushRoute {
        self.route
    }

    /// The oldest version among the slices held (all equal between failures).
    pub fn version(&self) -> u64 {
        self.slices.iter().map(|s| s.version).min().unwrap_or(0)
    }

    /// The version of shard `shard`'s slice held: the base version a push there carries
    /// (each shard judges staleness against the version its slice came from).
    pub fn base_version(&self, shard: usize) -> u64 {
        self.slices.get(shard).map_or(0, |s| s.version)
    }

    /// The base version a push to shard `shard` carries for a gradient computed from the
    /// weights a pull answered with `computed_from`: that pull's slice version if it is one
    /// of the last few, else the slice held now (as after a reconnect).
    pub fn base_version_of(&self, shard: usize, computed_from: u64) -> u64 {
        self.pulls
            .iter()
            .rev()
            .find(|(answered, _)| *answered == computed_from)
            .and_then(|(_, versions)| versions.get(shard).copied())
            .unwrap_or_else(|| self.base_version(shard))
    }

    /// The shards' answers to one pull are in (`pulled` for each), combined as `answered`:
    /// remembers the slices' versions under that pull's version.
    pub fn remember_pull(&mut self, answered: u64) {
        if self.pulls.len() == PULLS_REMEMBERED {
            self.pulls.pop_front();
        }
        let versions = self.slices.iter().map(|s| s.version).collect();
        self.pulls.push_back((answered, versions));
    }

    /// Shard `shard` answered a push with `outcome`.
    pub fn pushed(&mut self, shard: usize, outcome: &PushOutcome) {
        if let Some(s) = self.slices.get_mut(shard) {
            s.pending = matches!(outcome, PushOutcome::Buffered { .. });
        }
    }

    /// What a pull asks shard `shard`: with `newer_than` (or a wait) only a slice newer than
    /// the one held, or the slice whatever it is when none is held; a wait where this
    /// client's last push is pending (which the ask consumes), or always under a lead gate.
    pub fn pull_ask(&mut self, shard: usize, newer_than: Option<u64>, wait: bool) -> PullAsk {
        let Some(s) = self.slices.get_mut(shard) else {
            return PullAsk {
                newer_than,
                wait: false,
            };
        };
        if newer_than.is_none() {
            s.held = false;
        }
        let wait = wait && (std::mem::take(&mut s.pending) || self.lead_gate);
        // A step gate needs the version the push was based on (it opens past it); a lead
        // gate is the rank's own, so a slice not held is asked for whole even when waiting.
        let step_gate = wait && !self.lead_gate;
        PullAsk {
            newer_than: (s.held || step_gate).then_some(s.version),
            wait,
        }
    }

    /// Whether shard `shard`'s slice must come with the next answer whatever its version (the
    /// buffer does not hold it); pass to `ask_again` with the answer.
    pub fn needs_whole(&self, shard: usize) -> bool {
        self.slices.get(shard).is_some_and(|s| !s.held)
    }

    /// Whether an answer to an ask for a slice that `needs_whole` needs asking again without
    /// conditions: the run ended during a wait, and the slice was not sent.
    pub fn ask_again(needs_whole: bool, reply: &PullReply) -> bool {
        needs_whole && !reply.updated
    }

    /// Shard `shard` answered a pull.
    pub fn pulled(&mut self, shard: usize, reply: &PullReply) {
        if let Some(s) = self.slices.get_mut(shard) {
            if reply.updated {
                s.version = reply.version;
                s.held = true;
            }
        }
    }

    /// The shards' answers to one pull as one: the oldest version; updated if any slice
    /// was; done only when every shard is (a shard that lost updates to a restart reaches
    /// the budget later than the others); shard 0's batch size.
    pub fn combine_pulls(replies: &[PullReply]) -> PullReply {
        PullReply {
            version: replies.iter().map(|r| r.version).min().unwrap_or(0),
            updated: replies.iter().any(|r| r.updated),
            done: replies.iter().all(|r| r.done),
            batch: replies.first().and_then(|r| r.batch),
        }
    }

    /// The shards' answers to one push as one: `Done` once every shard is done (a shard that
    /// is behind still takes gradients until it reaches the budget too); otherwise the most
    /// conservative of the others: dropped, then buffered, then applied.
    pub fn combine_pushes(outcomes: impl IntoIterator<Item = PushOutcome>) -> PushOutcome {
        let rank = |o: &PushOutcome| match o {
            PushOutcome::Done => 3,
            PushOutcome::Dropped { .. } => 0,
            PushOutcome::Buffered { .. } => 1,
            PushOutcome::Applied { .. } => 2,
        };
        outcomes
            .into_iter()
            .min_by_key(rank)
            .unwrap_or(PushOutcome::Done)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SYNC: Mode = Mode::Sync { backup_workers: 0 };

    fn pulled(version: u64, updated: bool, done: bool) -> PullReply {
        PullReply {
            version,
            updated,
            done,
            batch: None,
        }
    }

    #[test]
    fn pushes_go_together_except_in_coordinated_sync() {
        assert_eq!(FanOut::new(SYNC, &[0, 0]).route(), PushRoute::Together);
        let backups = Mode::Sync { backup_workers: 1 };
        assert_eq!(FanOut::new(backups, &[0]).route(), PushRoute::Together);
        assert_eq!(
            FanOut::new(backups, &[0, 0]).route(),
            PushRoute::ShardZeroFirst
        );
    }

    /// A client that pulled both slices at version `v`.
    fn holding(v: u64) -> FanOut {
        let mut f = FanOut::new(SYNC, &[v, v]);
        for s in 0..2 {
            f.pulled(s, &pulled(v, true, false));
        }
        f
    }

    #[test]
    fn a_waiting_pull_waits_only_where_the_push_is_pending_and_once() {
        let mut f = holding(4);
        f.pushed(0, &PushOutcome::Buffered { waiting_for: 1 });
        f.pushed(
            1,
            &PushOutcome::Applied {
                version: 5,
                staleness: 0,
            },
        );
        let ask0 = f.pull_ask(0, Some(4), true);
        let ask1 = f.pull_ask(1, Some(4), true);
        assert_eq!(
            ask0,
            PullAsk {
                newer_than: Some(4),
                wait: true
            }
        );
        assert_eq!(
            ask1,
            PullAsk {
                newer_than: Some(4),
                wait: false
            }
        );
        // The pending flag is consumed: the next ask does not wait.
        assert!(!f.pull_ask(0, Some(4), true).wait);
        // Without `newer_than` and without a wait, every slice is asked for.
        assert_eq!(f.pull_ask(1, None, false).newer_than, None);
    }

    #[test]
    fn a_push_names_the_pull_it_was_computed_from() {
        let mut f = FanOut::new(
            Mode::Async {
                max_staleness: None,
            },
            &[0, 0],
        );
        for (s, v) in [(0, 3), (1, 4)] {
            f.pulled(s, &pulled(v, true, false));
        }
        f.remember_pull(3);
        // A second pull while the gradient on version 3's weights is computed.
        for (s, v) in [(0, 6), (1, 8)] {
            f.pulled(s, &pulled(v, true, false));
        }
        f.remember_pull(6);
        assert_eq!((f.base_version_of(0, 3), f.base_version_of(1, 3)), (3, 4));
        assert_eq!((f.base_version_of(0, 6), f.base_version_of(1, 6)), (6, 8));
        // A version no remembered pull answered (a reconnect since): the slices held now.
        assert_eq!(f.base_version_of(1, 5), 8);
        // Only the last few pulls are remembered.
        for v in 10..10 + PULLS_REMEMBERED as u64 {
            f.remember_pull(v);
        }
        assert_eq!(f.base_version_of(0, 3), 6);
    }

    #[test]
    fn versions_follow_the_slices_actually_received() {
        let mut f = FanOut::new(SYNC, &[2, 5]);
        assert_eq!((f.version(), f.base_version(1)), (2, 5));
        f.pulled(0, &pulled(7, true, false));
        f.pulled(1, &pulled(9, false, false));
        assert_eq!((f.base_version(0), f.base_version(1)), (7, 5));
        assert_eq!(f.version(), 5);
        assert!(!f.needs_whole(0) && f.needs_whole(1));
        assert!(FanOut::ask_again(true, &pulled(9, false, true)));
        assert!(!FanOut::ask_again(false, &pulled(9, false, true)));
        assert!(!FanOut::ask_again(true, &pulled(9, true, true)));
    }

    #[test]
    fn after_a_join_the_next_pull_takes_every_slice_whatever_its_version() {
        // Joined (or reconnected) at shard versions 6 and 6: the buffer holds older weights,
        // so asking "newer than 6" could leave them there under version 6's name.
        let mut f = FanOut::new(SYNC, &[6, 6]);
        assert_eq!(
            f.pull_ask(0, Some(3), true),
            PullAsk {
                newer_than: None,
                wait: false
            }
        );
        // A push after the join is pending: the wait needs its base version at the gate,
        // and the slice is still taken whole.
        f.pushed(1, &PushOutcome::Buffered { waiting_for: 1 });
        let ask = f.pull_ask(1, Some(3), true);
        assert_eq!((ask.newer_than, ask.wait), (Some(6), true));
        assert!(f.needs_whole(1));
        f.pulled(1, &pulled(7, true, false));
        assert!(!f.needs_whole(1));
        assert_eq!(f.pull_ask(1, Some(7), false).newer_than, Some(7));
        // Asking for every slice forgets what is held.
        assert_eq!(f.pull_ask(1, None, false).newer_than, None);
        assert!(f.needs_whole(1));
    }

    #[test]
    fn answers_combine_conservatively_and_done_needs_every_shard() {
        let pull = FanOut::combine_pulls(&[pulled(8, true, true), pulled(6, false, false)]);
        assert_eq!((pull.version, pull.updated, pull.done), (6, true, false));
        let both_done = FanOut::combine_pulls(&[pulled(8, false, true), pulled(8, false, true)]);
        assert!(both_done.done);
        use PushOutcome::*;
        let applied = Applied {
            version: 8,
            staleness: 0,
        };
        let buffered = Buffered { waiting_for: 1 };
        let dropped = Dropped { staleness: 2 };
        assert_eq!(FanOut::combine_pushes([applied, buffered]), buffered);
        assert_eq!(FanOut::combine_pushes([Done, applied]), applied);
        assert_eq!(FanOut::combine_pushes([buffered, dropped, Done]), dropped);
        assert_eq!(FanOut::combine_pushes([Done, Done]), Done);
    }
}
