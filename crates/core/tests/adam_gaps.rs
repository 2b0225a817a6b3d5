//! A shard's Adam counts the gaps of a worker's sparse sums (top-k pushes) only while that
//! worker's pulls move every weight of its copy; under top-k pulls, and for dense pushes, it
//! is plain Adam.

use pstrain_core::{
    EngineConfig, LinkUse, Mode, OptimizerConfig, PullCodec, PushCodec, PushMeta, RankRequest,
    ServerConfig, ShardEngine,
};
use std::time::Duration;

/// The weights after 40 async updates of one worker whose codecs are `push` and (if it has
/// pulled) `pull`: the first value's gradient is a constant 1 sent every fifth update as
/// the sum of five, the second's a constant 1 sent every update (each update has one of
/// them: Adam's steps with a zero gradient still move a weight by its first moment).
fn weights_after(push: PushCodec, pull: Option<PullCodec>) -> Vec<f32> {
    let server = ServerConfig {
        mode: Mode::Async {
            max_staleness: None,
        },
        workers: 1,
        optimizer: OptimizerConfig::adam(0.01),
        ..Default::default()
    };
    let mut engine = ShardEngine::new(EngineConfig::single(server), vec![0.0; 2], Duration::ZERO)
        .expect("a valid config");
    let seat = engine.join(RankRequest::Exact(0), Duration::ZERO);
    assert!(seat.is_ok());
    if let Some(codec) = pull {
        let link = LinkUse {
            pull_codec: Some(codec),
            ..Default::default()
        };
        engine.link_used(0, link);
    }
    for update in 1..=40 {
        let grad = [if update % 5 == 0 { 5.0 } else { 0.0 }, 1.0];
        let meta = PushMeta {
            rank: 0,
            base_version: engine.version(),
            samples: 1,
            loss: 0.0,
            accumulated: push.accumulates(),
        };
        let report = engine.push(meta, &grad, None, Duration::ZERO);
        assert!(report.outcome.is_ok());
    }
    assert_eq!(engine.version(), 40);
    engine.params().to_vec()
}

#[test]
fn gaps_count_only_for_sparse_pushes_from_a_worker_whose_pulls_move_every_weight() {
    let top_k = PushCodec::TopK { per_mille: 20 };
    let dense = weights_after(PushCodec::Fp32, Some(PullCodec::DeltaTernary));
    // Dense pulls, ternary differences, or no pull yet: the sum of five counts its gap and
    // its weight moves further than plain Adam's.
    for pull in [None, Some(PullCodec::Fp32), Some(PullCodec::DeltaTernary)] {
        let counted = weights_after(top_k, pull);
        assert!(
            counted[0] < dense[0] - 0.01,
            "{pull:?}: {counted:?} vs {dense:?}"
        );
        // The value sent every update arrives with a gap of one: plain Adam's bits.
        assert_eq!(counted[1], dense[1], "{pull:?}");
    }
    // Top-k differences leave most of the worker's copy behind: plain Adam.
    let lagging = weights_after(top_k, Some(PullCodec::DeltaTopK { per_mille: 5 }));
    assert_eq!(lagging, dense);
}
