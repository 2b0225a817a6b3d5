//! `auto`: each worker picks its codecs from its own link. It measures the link as it runs
//! (the bytes and seconds of every pull it receives and of every push, as the shard timed its
//! arrival) and its own compute time per step, and before each push takes the rung of
//! `AUTO_LADDER` with the least expected time per useful update:
//!
//! `cost(rung) = updates_cost × (compute + push bytes / up rate + pull bytes / down rate +
//! encoding)`
//!
//! or, for a worker that pushes and pulls while it computes (`--overlap`), `updates_cost ×
//! max(compute, link + encoding)`: there the link is free up to the compute it hides behind.
//!
//! where `updates_cost` is how many updates the rung needs for the accuracy fp32 reaches in
//! one (measured on the cnn, docs/edge-links.md). A fast link keeps fp32 (its link time is
//! small against compute); a slow one moves down the ladder until the link stops dominating.
//! Rates are windowed as bytes over seconds (not a mean of rates), so one transfer timed near
//! zero (already buffered when read) cannot make a link look infinitely fast. A rung's bytes
//! are its codecs' sizes before the entropy stage times what the stage left of this
//! worker's own payloads of that kind (`CodedShare`).
//!
//! Sync runs have a second ladder, `REPLAY_LADDER`: the same pushes, with pulls that replay
//! the shard's updates (exact weights, for the other workers' pushes). A sync worker starts
//! on it (a run's first pull is whole either way, with a fresh optimizer's state) and, once
//! its first pull has measured the link, keeps whichever ladder prices lower for the rest of
//! the connection: leaving replay costs nothing, coming back would cost the optimizer's
//! state, so it never comes back.
//!
//! A sync worker pushes no denser than the sparsest push the peers that replay chose by
//! their own links (`peers_replay`, which their shard tells it): its pushes are their pulls,
//! and a step waits for the slowest of them. A worker so bound replays too (its pushes are
//! bound either way, and its pulls, the peers' sparse pushes, are exact), and a worker whose
//! first measured push priced the two ladders close pushes once more as sparse as replay
//! goes and waits for one replayed pull, which brings its shard's word on its peers, before
//! it chooses.

use super::coded_share::CodedShare;
use super::ladder::{Rung, AUTO_LADDER, REPLAY_LADDER};
use super::{PullCodec, PushCodec};

/// A replayed pull's bytes besides the pushes it carries: a head per update and per push
/// (about `update_log`'s; only the estimate reads it).
const REPLAY_HEAD_BYTES: usize = 24;

/// Transfers smaller than this say more about latency than rate: not counted.
const MIN_SAMPLE_BYTES: u64 = 16 * 1024;
/// How much of the window each new sample replaces.
const WINDOW_WEIGHT: f64 = 0.25;
/// A less-compressed rung must beat the current one by this factor before the worker moves
/// (measurements are noisy; flapping costs the shard's delta replica its whole slice).
const HYSTERESIS: f64 = 0.9;
/// Pushes at a rung before the worker may move to a less-compressed one, one rung at a time.
/// A shaper's token bucket lets a transfer smaller than its burst through at line rate, so a
/// link measured with small payloads looks faster than it is for bigger ones; climbing a
/// rung at a time lets the next rung's own transfers show the rate it really gets (straight
/// to the rung the small ones priced, a 10 Mbit/s link went from 25 KB pushes to 1.2 MB ones
/// of a second each and back, again and again).
const PUSHES_BEFORE_CLIMBING: u32 = 10;

/// Pushes in a row at which differences beat replay (by the hysteresis, its pull priced as
/// the latest replayed pull) before a worker leaves replay for good: the first pulls may
/// bring a fast peer's pushes from before it learned what this worker's link needs.
const DEARER_PULLS_BEFORE_LEAVING: u32 = 3;

/// A rate as a window of bytes over seconds.
#[derive(Debug, Clone, Copy, Default)]
struct Window {
    bytes: f64,
    seconds: f64,
}

impl Window {
    fn add(&mut self, bytes: u64, seconds: f64) {
        if bytes < MIN_SAMPLE_BYTES || !seconds.is_finite() || seconds < 0.0 {
            return;
        }
        if self.bytes == 0.0 {
            (self.bytes, self.seconds) = (bytes as f64, seconds);
        } else {
            self.bytes += WINDOW_WEIGHT * (bytes as f64 - self.bytes);
            self.seconds += WINDOW_WEIGHT * (seconds - self.seconds);
        }
    }

    /// Bytes per second, if measured (a window of zero seconds: no link to speak of).
    fn rate(&self) -> Option<f64> {
        (self.bytes > 0.0).then(|| self.bytes / self.seconds.max(1e-9))
    }
}

/// Which ladder a worker's `auto` climbs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
enum Ladder {
    /// `AUTO_LADDER`: pulls as differences.
    #[default]
    Deltas,
    /// A sync run's worker before its link is measured (on `REPLAY_LADDER`'s first rung),
    /// or putting off its choice by a push (on its sparsest), to choose between the ladders.
    /// `others` are the workers whose pushes a pull brings.
    Undecided { others: usize },
    /// `REPLAY_LADDER`, for the rest of the connection.
    Replay { others: usize },
}

/// One worker's view of one shard link, and its choice.
#[derive(Debug, Clone, Default)]
pub struct AutoCodec {
    up: Window,
    down: Window,
    /// Seconds per step computing (a moving mean).
    compute_s: Option<f64>,
    /// The worker computes while this link carries its last push and the next pull.
    overlapped: bool,
    /// The latest replayed pull of updates: its bytes. It is the other workers' pushes in
    /// whatever codecs those chose, which a worker can only estimate before it has seen one.
    replay_pull: Option<f64>,
    /// Pushes in a row at which differences priced below replay.
    replay_dearer: u32,
    /// The sparsest push the peers that replay chose (their shard's word): this worker
    /// pushes no denser.
    peers_push: Option<PushCodec>,
    /// The push this worker's own link chose, when the last choice was bound sparser.
    own_push: Option<PushCodec>,
    /// A sync worker put off choosing its ladder by a push (it does so once).
    deferred: bool,
    /// While it puts off: the push its link chose, which the sparse one it sends is not.
    deferring_own: Option<PushCodec>,
    ladder: Ladder,
    /// The rung in use, of `ladder`'s rungs.
    rung: usize,
    /// Pushes since the rung last changed.
    at_rung: u32,
    /// What the entropy stage left of its payloads' bytes.
    coded: CodedShare,
}

impl AutoCodec {
    /// On `AUTO_LADDER` (pulls as differences).
    pub fn new() -> Self {
        AutoCodec::default()
    }

    /// A sync run's worker among `workers`: replays its pulls until its first measured push
    /// chooses between the ladders.
    pub fn replaying(workers: usize) -> Self {
        AutoCodec {
            ladder: Ladder::Undecided {
                others: workers.saturating_sub(1),
            },
            ..AutoCodec::default()
        }
    }

    fn rungs(&self) -> &'static [Rung] {
        match self.ladder {
            Ladder::Deltas => &AUTO_LADDER,
            Ladder::Undecided { .. } | Ladder::Replay { .. } => &REPLAY_LADDER,
        }
    }

    /// A push of `bytes` took `seconds` to arrive (as its shard timed it).
    pub fn sent(&mut self, bytes: u64, seconds: f64) {
        self.up.add(bytes, seconds);
    }

    /// A pull of `bytes` took `seconds` to arrive, first byte to last.
    pub fn received(&mut self, bytes: u64, seconds: f64) {
        self.down.add(bytes, seconds);
    }

    /// A push of `values` values in `codec` took `bytes` (after the entropy stage).
    pub fn pushed(&mut self, codec: PushCodec, bytes: u64, values: usize) {
        self.coded.pushed(codec, bytes, values);
    }

    /// A difference of `values` values in `codec` took `bytes` (after the entropy stage).
    pub fn pulled(&mut self, codec: PullCodec, bytes: u64, values: usize) {
        self.coded.pulled(codec, bytes, values);
    }

    /// A replayed pull of updates (not a whole slice) of `bytes` arrived.
    pub fn replayed(&mut self, bytes: u64) {
        self.replay_pull = Some(bytes as f64);
    }

    /// The shard's word on the sparsest push of the peers that replay (`None`: none does).
    pub fn peers_replay(&mut self, push: Option<PushCodec>) {
        self.peers_push = push;
    }

    /// A step computed in `seconds`.
    pub fn computed(&mut self, seconds: f64) {
        if !seconds.is_finite() || seconds < 0.0 {
            return;
        }
        self.compute_s = Some(match self.compute_s {
            None => seconds,
            Some(c) => c + WINDOW_WEIGHT * (seconds - c),
        });
    }

    /// A step computed in `seconds` while the link carried the last push and a pull.
    pub fn computed_beside(&mut self, seconds: f64) {
        self.overlapped = true;
        self.computed(seconds);
    }

    /// The rung in use.
    pub fn rung(&self) -> Rung {
        self.rungs()[self.rung]
    }

    /// The expected seconds per useful update at `rung` for a slice of `values`, once both
    /// directions are measured (an unmeasured uplink is taken to match the downlink).
    pub fn cost(&self, rung: &Rung, values: usize) -> Option<f64> {
        let down = self.down.rate()?;
        let up = self.up.rate().unwrap_or(down);
        // A delta pull's steady size (the first pull of a connection is whole); a replayed
        // one's, the other workers' pushes.
        let pull = if rung.pull == PullCodec::Replay {
            let others = match self.ladder {
                Ladder::Undecided { others } | Ladder::Replay { others } => others,
                Ladder::Deltas => return None,
            };
            // What the other workers' pushes measured, once some arrived (they do not
            // depend on this worker's push codec), else as many pushes as its own.
            let push = self.coded.push_len(rung.push, values);
            self.replay_pull.map_or(
                (REPLAY_HEAD_BYTES + others * REPLAY_HEAD_BYTES) as f64 + others as f64 * push,
                |bytes| bytes,
            )
        } else if rung.pull.is_delta() {
            self.coded.delta_len(rung.pull, values)
        } else {
            rung.pull.encoded_len(values) as f64
        };
        let link = self.coded.push_len(rung.push, values) / up + pull / down;
        let codec = rung.codec_ns_per_value * 1e-9 * values as f64;
        let compute = self.compute_s.unwrap_or(0.0);
        let round = if self.overlapped {
            compute.max(link + codec)
        } else {
            compute + link + codec
        };
        Some(rung.updates_cost * round)
    }

    /// Picks the rung for the next push of a slice of `values` and returns it. Until the
    /// link is measured (the first pull), fp32 pushes (and a sync run's worker replays). Its
    /// push is no denser than its replaying peers' (`own_push` then says what it chose).
    pub fn choose(&mut self, values: usize) -> Rung {
        let rung = self.choose_rung(values);
        let push = self.bound_push(rung.push, values);
        let own = self.deferring_own.take().unwrap_or(rung.push);
        self.own_push = (push != own).then_some(own);
        Rung { push, ..rung }
    }

    /// The push this worker's own link chose for the last choice, if it sends another (its
    /// replaying peers bound it sparser, or it is putting off its choice of ladder): what
    /// binds its peers in turn, never the push sent, so no two workers keep each other
    /// sparse.
    pub fn own_push(&self) -> Option<PushCodec> {
        self.own_push
    }

    /// `push`, or sparser if the replaying peers push sparser.
    fn bound_push(&self, push: PushCodec, values: usize) -> PushCodec {
        self.peers_push
            .map_or(push, |peers| no_denser_than(push, peers, values))
    }

    /// `choose` by this worker's own link.
    fn choose_rung(&mut self, values: usize) -> Rung {
        if let Ladder::Undecided { others } = self.ladder {
            return self.choose_ladder(values, others);
        }
        if let Some(left) = self.leave_replay(values) {
            return left;
        }
        let Some(current) = self.cost(&self.rung(), values) else {
            return self.rung();
        };
        let (best, best_cost) = self
            .cheapest(self.rungs(), values)
            .unwrap_or((self.rung, current));
        let next = if best > self.rung {
            // More compressed at once: a link too slow costs every push.
            best
        } else if best < self.rung
            && best_cost < HYSTERESIS * current
            && self.at_rung >= PUSHES_BEFORE_CLIMBING
        {
            self.rung - 1
        } else {
            self.rung
        };
        if next == self.rung {
            self.at_rung = self.at_rung.saturating_add(1);
        } else {
            (self.rung, self.at_rung) = (next, 0);
        }
        self.rung()
    }

    /// A sync run's worker, once its link is measured: the cheaper ladder's cheapest rung,
    /// replay only if it beats every difference (leaving it is for good), or if the
    /// worker's pushes are bound sparser than the difference ladder would push. Before any
    /// replayed pull (and the shard's word on its peers) came, a worker that priced replay
    /// within the hysteresis of differences replays one more push, on replay's sparsest rung
    /// (its push may be a slow peer's pull), once (a replayed pull may come whole).
    fn choose_ladder(&mut self, values: usize, others: usize) -> Rung {
        let deltas = self.cheapest(&AUTO_LADDER, values);
        let replay = self.cheapest(&REPLAY_LADDER, values);
        let (Some(deltas), Some(replay)) = (deltas, replay) else {
            return self.rung();
        };
        let bound = self.is_bound(AUTO_LADDER[deltas.0].push, values);
        (self.ladder, self.rung) = if bound || replay.1 < deltas.1 {
            (Ladder::Replay { others }, replay.0)
        } else if !self.deferred && HYSTERESIS * replay.1 < deltas.1 {
            self.deferred = true;
            self.deferring_own = Some(REPLAY_LADDER[replay.0].push);
            (Ladder::Undecided { others }, REPLAY_LADDER.len() - 1)
        } else {
            (Ladder::Deltas, deltas.0)
        };
        self.at_rung = 0;
        self.rung()
    }

    /// Its replaying peers push sparser than `push`.
    fn is_bound(&self, push: PushCodec, values: usize) -> bool {
        self.bound_push(push, values) != push
    }

    /// On the replayed ladder, once pulls showed what the other workers push: the
    /// difference ladder's cheapest rung if it beat the current one by the hysteresis at
    /// `DEARER_PULLS_BEFORE_LEAVING` pushes in a row (a worker behind a slow link whose
    /// pulls keep bringing a fast worker's large pushes leaves).
    fn leave_replay(&mut self, values: usize) -> Option<Rung> {
        if !matches!(self.ladder, Ladder::Replay { .. }) || self.replay_pull.is_none() {
            return None;
        }
        if self.is_bound(self.rung().push, values) {
            // Its pushes are its peers' either way, and its pulls those peers' sparse ones.
            self.replay_dearer = 0;
            return None;
        }
        let current = self.cost(&self.rung(), values)?;
        let (best, cost) = self.cheapest(&AUTO_LADDER, values)?;
        if cost >= HYSTERESIS * current {
            self.replay_dearer = 0;
            return None;
        }
        self.replay_dearer += 1;
        if self.replay_dearer < DEARER_PULLS_BEFORE_LEAVING {
            return None;
        }
        (self.ladder, self.rung, self.at_rung) = (Ladder::Deltas, best, 0);
        Some(self.rung())
    }

    /// The position and cost of `ladder`'s cheapest priced rung (the first of equals).
    fn cheapest(&self, ladder: &[Rung], values: usize) -> Option<(usize, f64)> {
        (ladder.iter().enumerate())
            .filter_map(|(i, r)| self.cost(r, values).map(|c| (i, c)))
            .fold(None, |acc, (i, c)| match acc {
                Some((_, best)) if best <= c => acc,
                _ => Some((i, c)),
            })
    }
}

/// `own`, or the push of the replaying ladder nearest `peers` from below if that is sparser
/// (a peer's word picks among `auto`'s own pushes: however sparse a peer pushes, a worker
/// goes no further than the ladder's sparsest).
fn no_denser_than(own: PushCodec, peers: PushCodec, values: usize) -> PushCodec {
    let sparsest = REPLAY_LADDER[REPLAY_LADDER.len() - 1].push;
    let bound = (REPLAY_LADDER.iter().map(|r| r.push))
        .find(|p| p.typical_len(values) <= peers.typical_len(values))
        .unwrap_or(sparsest);
    if bound.typical_len(values) < own.typical_len(values) {
        bound
    } else {
        own
    }
}

#[cfg(test)]
#[path = "auto_tests.rs"]
mod tests;
