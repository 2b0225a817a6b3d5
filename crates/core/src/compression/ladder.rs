//! `auto`'s ladders: the pairs of codecs a worker may pick from, each with the updates it
//! needs against fp32's and what its encoding costs (`auto.rs` prices and picks them).

use super::{PullCodec, PushCodec};

/// One choice of `auto`: a push codec, a pull codec, and the updates it needs relative to
/// fp32 for the same accuracy.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Rung {
    pub push: PushCodec,
    pub pull: PullCodec,
    pub updates_cost: f64,
    /// Nanoseconds per value its encoding and decoding cost the shard and the worker
    /// together, per push and pull (the sum of `pstrain bench-net`'s codec rows on this
    /// project's 2-core machines; an estimate elsewhere, which only matters on fast links).
    pub codec_ns_per_value: f64,
}

/// From least to most compressed. The costs: int8 pushes are unbiased and delta pulls carry
/// their error to the next pull, so the first rungs train as fp32 does (measured: the same
/// updates to 98.5% within noise); top-k needs more updates the sparser it is (Adam
/// normalises each coordinate's step, and a delta pull leaves the worker's copy of the
/// coordinates it did not send behind): the means of the sittings in docs/edge-links.md
/// (updates for 98.5% held, against fp32's in the same sitting). Rung 6's is an estimate.
/// Rung 3's pull, ternary differences, leaves no weight behind by more than what moved since
/// the last pull, and measured as few updates as fp32's (docs/edge-links.md, thirteenth
/// sitting); 1.05 prices it like the int8 rungs.
/// The codec costs are the sums of `pstrain bench-net`'s codec rows for the cnn (the medians
/// of three runs, thirty-fourth sitting, with the entropy stage after top-k's and ternary's
/// encodings).
pub const AUTO_LADDER: [Rung; 8] = [
    Rung {
        push: PushCodec::Fp32,
        pull: PullCodec::Fp32,
        codec_ns_per_value: 0.0,
        updates_cost: 1.0,
    },
    Rung {
        push: PushCodec::Int8,
        pull: PullCodec::DeltaInt8,
        codec_ns_per_value: 5.8,
        updates_cost: 1.02,
    },
    Rung {
        push: PushCodec::Int8,
        pull: PullCodec::DeltaTopK { per_mille: 20 },
        codec_ns_per_value: 4.3,
        updates_cost: 1.05,
    },
    Rung {
        push: PushCodec::TopK { per_mille: 100 },
        pull: PullCodec::DeltaTernary,
        codec_ns_per_value: 5.7,
        updates_cost: 1.05,
    },
    Rung {
        push: PushCodec::TopK { per_mille: 100 },
        pull: PullCodec::DeltaTopK { per_mille: 50 },
        codec_ns_per_value: 5.7,
        updates_cost: 1.25,
    },
    Rung {
        push: PushCodec::TopK { per_mille: 50 },
        pull: PullCodec::DeltaTopK { per_mille: 20 },
        codec_ns_per_value: 4.1,
        updates_cost: 1.4,
    },
    Rung {
        push: PushCodec::TopK { per_mille: 20 },
        pull: PullCodec::DeltaTopK { per_mille: 5 },
        codec_ns_per_value: 2.6,
        updates_cost: 1.5,
    },
    Rung {
        push: PushCodec::TopK { per_mille: 10 },
        pull: PullCodec::DeltaTopK { per_mille: 5 },
        codec_ns_per_value: 2.2,
        updates_cost: 2.0,
    },
];

/// Sync runs' ladder of replayed pulls (`PullCodec::Replay`): a pull is the other workers'
/// pushes, so its bytes follow the push codec and the number of workers. The updates: with
/// exact pulls, sync on the cnn held 98.5% from update 450 (`topk:100`), 600 (`topk:20`) and
/// 500 (`topk:10`) against fp32's 500 (one deterministic run each, checkpoints every 50,
/// docs/edge-links.md, twenty-ninth sitting); one run each is coarse (50 updates a step of
/// it), so `topk:20` and `topk:10` are smoothed to 1.1 and 1.15 (the run said 1.2 and 1.0),
/// sparser never cheaper in updates, and `topk:50` between. The codec costs add replay's optimizer pass on the worker (about 4 ns a value,
/// `pstrain bench-net`) to the push's encoding and decoding.
pub const REPLAY_LADDER: [Rung; 6] = [
    Rung {
        push: PushCodec::Fp32,
        pull: PullCodec::Replay,
        codec_ns_per_value: 4.0,
        updates_cost: 1.0,
    },
    Rung {
        push: PushCodec::Int8,
        pull: PullCodec::Replay,
        codec_ns_per_value: 9.0,
        updates_cost: 1.02,
    },
    Rung {
        push: PushCodec::TopK { per_mille: 100 },
        pull: PullCodec::Replay,
        codec_ns_per_value: 8.5,
        updates_cost: 1.0,
    },
    Rung {
        push: PushCodec::TopK { per_mille: 50 },
        pull: PullCodec::Replay,
        codec_ns_per_value: 8.0,
        updates_cost: 1.05,
    },
    Rung {
        push: PushCodec::TopK { per_mille: 20 },
        pull: PullCodec::Replay,
        codec_ns_per_value: 7.5,
        updates_cost: 1.1,
    },
    Rung {
        push: PushCodec::TopK { per_mille: 10 },
        pull: PullCodec::Replay,
        codec_ns_per_value: 7.5,
        updates_cost: 1.15,
    },
];

/// Whether `auto` may push with `codec` (a shard refuses any other).
pub fn auto_allows_push(codec: PushCodec) -> bool {
    AUTO_LADDER.iter().any(|r| r.push == codec)
}

/// Whether `auto` may ask for pulls in `codec`.
pub fn auto_allows_pull(codec: PullCodec) -> bool {
    AUTO_LADDER.iter().any(|r| r.pull == codec)
}
