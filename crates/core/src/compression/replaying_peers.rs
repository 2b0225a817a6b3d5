//! A shard's record of which workers pull by replay and what push each last chose by its
//! own link. A replayed pull carries every other worker's push, so in a sync run a worker
//! on a fast link that pushes large `topk:100` gradients fills the pulls of a peer on a slow
//! link: a step waits for that peer. The shard tells each worker the sparsest push its
//! replaying peers chose, and an `auto` worker pushes no denser than that
//! (`AutoCodec::peers_replay`): what its pushes cost is paid on the slowest link. A push
//! bound so names the worker's own choice too, and only own choices bind: two workers never
//! keep each other sparse.

use super::PushCodec;

/// One worker rank as its shard last saw it.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
struct Peer {
    /// Its last pull asked for replay.
    replays: bool,
    /// The push codec its link chose last (its push's, unless bound by its peers).
    push: Option<PushCodec>,
}

/// Per worker rank: does it replay, and what did it push.
#[derive(Debug, Clone, Default)]
pub struct ReplayingPeers {
    peers: Vec<Peer>,
}

impl ReplayingPeers {
    /// For a run of `workers` ranks (others are ignored: a rank is the membership's).
    pub fn new(workers: usize) -> Self {
        ReplayingPeers {
            peers: vec![Peer::default(); workers],
        }
    }

    /// `rank` asked for a pull, replayed or not.
    pub fn pulled(&mut self, rank: usize, replays: bool) {
        if let Some(p) = self.peers.get_mut(rank) {
            p.replays = replays;
        }
    }

    /// `rank` pushed, choosing `codec` by its own link.
    pub fn pushed(&mut self, rank: usize, codec: PushCodec) {
        if let Some(p) = self.peers.get_mut(rank) {
            p.push = Some(codec);
        }
    }

    /// `rank`'s worker is gone: its replays no longer bind the others.
    pub fn left(&mut self, rank: usize) {
        if let Some(p) = self.peers.get_mut(rank) {
            *p = Peer::default();
        }
    }

    /// The sparsest push (the fewest bytes for a slice of `values`) the workers other than
    /// `rank` that replay and have pushed chose; `None` if none does.
    pub fn sparsest_push(&self, rank: usize, values: usize) -> Option<PushCodec> {
        (self.peers.iter().enumerate())
            .filter(|&(r, p)| r != rank && p.replays)
            .filter_map(|(_, p)| p.push)
            .min_by_key(|c| c.typical_len(values))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const VALUES: usize = 100_000;

    #[test]
    fn the_sparsest_push_of_the_other_replaying_workers() {
        let mut peers = ReplayingPeers::new(4);
        assert_eq!(peers.sparsest_push(0, VALUES), None, "nobody pulled");
        // Rank 1 replays but has not pushed: nothing to go by yet.
        peers.pulled(1, true);
        assert_eq!(peers.sparsest_push(0, VALUES), None);
        peers.pushed(1, PushCodec::TopK { per_mille: 100 });
        peers.pulled(2, true);
        peers.pushed(2, PushCodec::TopK { per_mille: 10 });
        // Rank 3 pushes sparser still, but takes differences: its pushes bind no one.
        peers.pulled(3, false);
        peers.pushed(3, PushCodec::TopK { per_mille: 5 });
        let topk10 = Some(PushCodec::TopK { per_mille: 10 });
        assert_eq!(peers.sparsest_push(0, VALUES), topk10);
        // A worker is not bound by its own pushes.
        assert_eq!(
            peers.sparsest_push(2, VALUES),
            Some(PushCodec::TopK { per_mille: 100 })
        );
        // Rank 2 leaves replay, then rank 1 leaves the run.
        peers.pulled(2, false);
        assert_eq!(
            peers.sparsest_push(0, VALUES),
            Some(PushCodec::TopK { per_mille: 100 })
        );
        peers.left(1);
        assert_eq!(peers.sparsest_push(0, VALUES), None);
    }

    #[test]
    fn ranks_outside_the_run_are_ignored() {
        let mut peers = ReplayingPeers::new(2);
        peers.pulled(7, true);
        peers.pushed(7, PushCodec::TopK { per_mille: 1 });
        peers.left(9);
        assert_eq!(peers.sparsest_push(0, VALUES), None);
    }
}
