//! Replay pulls: a worker that makes the shard's updates itself, from the shard's log of the
//! pushes as they arrived, holds the shard's weights bit for bit in every consistency mode,
//! with any push codec, clipped pushes, refused steps and the staleness-aware rate; a body
//! that is damaged, forged or for another version is refused and leaves it holding nothing.

use pstrain_core::{
    update_log::fingerprint, EngineConfig, GradientClip, LinkUse, Mode, OptimizerConfig, PullCodec,
    PushCodec, PushEncoder, PushMeta, RankRequest, Replayer, Rng, ServerConfig, ShardEngine,
    WireRef,
};
use std::time::Duration;

const LEN: usize = 3000;

fn config(mode: Mode, workers: usize) -> ServerConfig {
    ServerConfig {
        mode,
        workers,
        optimizer: OptimizerConfig::adam(0.01),
        // Small enough that some pushes are clipped.
        clip: Some(GradientClip {
            max_norm: 20.0,
            refuse: false,
        }),
        staleness_aware_lr: !matches!(mode, Mode::Sync { .. }),
        ..Default::default()
    }
}

/// A shard keeping its update log, with `workers` joined and pulling by replay.
fn shard(server: &ServerConfig, budget: usize) -> ShardEngine {
    let mut rng = Rng::new(7);
    let weights = (0..LEN).map(|_| rng.uniform(-0.1, 0.1)).collect();
    let mut engine = ShardEngine::new(
        EngineConfig::single(server.clone()),
        weights,
        Duration::ZERO,
    )
    .expect("a valid config");
    engine.keep_update_log(budget);
    for rank in 0..server.workers {
        assert!(engine
            .join(RankRequest::Exact(rank), Duration::ZERO)
            .is_ok());
        let link = LinkUse {
            pull_codec: Some(PullCodec::Replay),
            ..Default::default()
        };
        engine.link_used(rank, link);
    }
    engine
}

/// One worker's push of a random gradient (every ninth one large, to be clipped) in
/// `codec`: the bytes pushed.
fn push(
    engine: &mut ShardEngine,
    encoder: &mut PushEncoder,
    rng: &mut Rng,
    rank: usize,
    base_version: u64,
) -> Vec<u8> {
    let scale = if rng.below(9) == 0 { 10.0 } else { 0.3 };
    let grad: Vec<f32> = (0..LEN).map(|_| rng.uniform(-scale, scale)).collect();
    let mut wire = Vec::new();
    encoder.encode(&grad, &mut wire);
    let codec = encoder.codec();
    let mut decoded = vec![0.0; LEN];
    codec.decode(&wire, &mut decoded).expect("its own encoding");
    let meta = PushMeta {
        rank,
        base_version,
        samples: 8 + rank as u32,
        loss: 0.0,
        accumulated: codec.accumulates(),
    };
    let logged = WireRef::new(codec, &wire);
    let report = engine.push_decoded(meta, &decoded, Some(logged), None, Duration::ZERO);
    assert!(report.outcome.is_ok(), "{:?}", report.outcome);
    wire
}

/// Brings `replayer` (holding `slice`) to the shard's version: by its updates (less its own
/// last push, `yours`) when it holds a version, else whole; returns the body's length.
fn pull(
    engine: &ShardEngine,
    replayer: &mut Replayer,
    yours: Option<u64>,
    slice: &mut [f32],
) -> usize {
    let mut body = Vec::new();
    let sent = replayer
        .held()
        .is_some_and(|held| engine.core().updates_since(held, yours, &mut body));
    if !sent {
        engine.core().write_whole(&mut body);
    }
    replayer
        .apply(&body, engine.version(), slice)
        .expect("the shard's own body");
    body.len()
}

fn bits(values: &[f32]) -> Vec<u32> {
    values.iter().map(|v| v.to_bits()).collect()
}

/// Two workers, 30 updates (steps in sync): after every pull each worker's slice has the
/// shard's bits, and after the first, pulls carry updates, not the slice.
fn replays_exactly(mode: Mode, codec: PushCodec) {
    let server = config(mode, 2);
    let mut engine = shard(&server, 1 << 24);
    let mut rng = Rng::new(11);
    let mut workers: Vec<(PushEncoder, Replayer, Vec<f32>)> = (0..2)
        .map(|rank| {
            let encoder = PushEncoder::new(codec, rank as u64);
            (encoder, Replayer::new(&server, LEN), vec![0.0; LEN])
        })
        .collect();
    // Each worker's last push: its fingerprint for the shard, its size.
    let mut pushed: [Option<(u64, usize)>; 2] = [None, None];
    for round in 0..30 {
        // Both pull, then both push: in async the second push is a version stale.
        for (rank, (_, replayer, slice)) in workers.iter_mut().enumerate() {
            let yours = pushed[rank].map(|(f, _)| f);
            let body = pull(&engine, replayer, yours, slice);
            assert_eq!(
                bits(slice),
                bits(engine.params()),
                "{mode:?} {codec} round {round}"
            );
            let other = pushed[1 - rank].map_or(0, |(_, len)| len);
            if round > 0 && mode == (Mode::Sync { backup_workers: 0 }) {
                // A step's update, less this worker's own push: the other's and the heads.
                assert!(
                    body <= other + 100,
                    "{codec}: {body} bytes, the other's {other}"
                );
            }
        }
        for (rank, (encoder, replayer, _)) in workers.iter_mut().enumerate() {
            let base = replayer.held().expect("it holds what it pulled");
            let wire = push(&mut engine, encoder, &mut rng, rank, base);
            replayer.pushed(codec, &wire);
            pushed[rank] = Some((fingerprint(&wire), wire.len()));
        }
    }
    assert!(engine.version() >= 30, "{mode:?}: {}", engine.version());
    assert!(engine.stats().clipped > 0, "some pushes were clipped");
    for (_, replayer, slice) in &mut workers {
        pull(&engine, replayer, None, slice);
        assert_eq!(bits(slice), bits(engine.params()));
    }
}

#[test]
fn a_replaying_worker_holds_the_shards_weights_in_every_mode_and_codec() {
    let modes = [
        Mode::Sync { backup_workers: 0 },
        Mode::Async {
            max_staleness: None,
        },
        Mode::Buffered {
            k: 2,
            max_staleness: None,
        },
        Mode::Ssp { max_lead: 1 },
    ];
    let codecs = [
        PushCodec::TopK { per_mille: 20 },
        PushCodec::Int8,
        PushCodec::Bf16,
        PushCodec::Fp32,
    ];
    for mode in modes {
        for codec in codecs {
            replays_exactly(mode, codec);
        }
    }
}

/// A step whose every gradient was refused moves the version and not the weights; the
/// replaying worker follows it.
#[test]
fn a_refused_step_is_replayed_as_a_version_that_moved() {
    let server = config(Mode::Sync { backup_workers: 0 }, 1);
    let mut engine = shard(&server, 1 << 24);
    let mut replayer = Replayer::new(&server, LEN);
    let mut slice = vec![0.0; LEN];
    pull(&engine, &mut replayer, None, &mut slice);
    let mut bad = vec![0.0; LEN];
    bad[3] = f32::NAN;
    let meta = PushMeta {
        rank: 0,
        base_version: 0,
        samples: 4,
        loss: 0.0,
        accumulated: false,
    };
    let report = engine.push(meta, &bad, None, Duration::ZERO);
    assert!(report.outcome.is_err());
    assert_eq!(engine.version(), 1);
    let mut body = Vec::new();
    assert!(engine.core().updates_since(0, None, &mut body));
    replayer
        .apply(&body, 1, &mut slice)
        .expect("a skipped step");
    assert_eq!(bits(&slice), bits(engine.params()));
}

/// A log keeps what its budget allows: a worker behind it is sent the whole slice again.
#[test]
fn a_worker_behind_the_log_gets_the_whole_slice() {
    let server = config(Mode::Sync { backup_workers: 0 }, 1);
    let mut engine = shard(&server, 3 * 4 * LEN);
    let mut encoder = PushEncoder::new(PushCodec::Fp32, 1);
    let mut rng = Rng::new(3);
    for version in 0..6 {
        push(&mut engine, &mut encoder, &mut rng, 0, version);
    }
    let mut body = Vec::new();
    assert!(
        !engine.core().updates_since(0, None, &mut body),
        "six fp32 pushes"
    );
    assert!(engine.core().updates_since(4, None, &mut body));
    let mut replayer = Replayer::new(&server, LEN);
    let mut slice = vec![0.0; LEN];
    assert!(pull(&engine, &mut replayer, None, &mut slice) > 4 * LEN);
    assert_eq!(bits(&slice), bits(engine.params()));
}

/// One worker of a sync shard, holding version 0, and the body of the shard's next two
/// steps (its `topk:PER_MILLE` pushes, the last of them `last`).
struct TwoSteps {
    server: ServerConfig,
    engine: ShardEngine,
    replayer: Replayer,
    slice: Vec<f32>,
    body: Vec<u8>,
    last: Vec<u8>,
}

fn two_steps(per_mille: u16, seed: u64) -> TwoSteps {
    let server = config(Mode::Sync { backup_workers: 0 }, 1);
    let mut engine = shard(&server, 1 << 24);
    let mut encoder = PushEncoder::new(PushCodec::TopK { per_mille }, 1);
    let mut rng = Rng::new(seed);
    let mut replayer = Replayer::new(&server, LEN);
    let mut slice = vec![0.0; LEN];
    pull(&engine, &mut replayer, None, &mut slice);
    push(&mut engine, &mut encoder, &mut rng, 0, 0);
    let last = push(&mut engine, &mut encoder, &mut rng, 0, 1);
    let mut body = Vec::new();
    assert!(engine.core().updates_since(0, None, &mut body));
    TwoSteps {
        server,
        engine,
        replayer,
        slice,
        body,
        last,
    }
}

/// Damaged bodies: every truncation, a forged checksum, bytes after the updates, updates
/// from a version the worker does not hold. Each is refused, the slice stays as it was,
/// and the worker holds nothing (its next pull asks for the whole).
#[test]
fn damaged_or_foreign_bodies_are_refused() {
    let TwoSteps {
        server,
        engine,
        replayer,
        slice: held,
        body,
        last,
    } = two_steps(50, 5);
    let mut attempts: Vec<Vec<u8>> = (0..body.len()).map(|n| body[..n].to_vec()).collect();
    let mut forged = body.clone();
    // The first update's checksum: form (1), count (4), from (8), flags (1), rate (4).
    forged[1 + 4 + 8 + 1 + 4] ^= 1;
    attempts.push(forged);
    let mut longer = body.clone();
    longer.push(0);
    attempts.push(longer);
    let mut unknown_form = body.clone();
    unknown_form[0] = 9;
    attempts.push(unknown_form);
    for bad in attempts {
        let mut r = replayer.clone();
        let mut s = held.clone();
        assert!(r.apply(&bad, 2, &mut s).is_err(), "{} bytes", bad.len());
        assert_eq!(bits(&s), bits(&held));
        assert_eq!(r.held(), None);
    }
    // Its own last push left out, for a worker that does not keep it (or keeps another).
    let mut mine = Vec::new();
    assert!(engine
        .core()
        .updates_since(0, Some(fingerprint(&last)), &mut mine));
    assert!(mine.len() < body.len());
    let mut r = replayer.clone();
    let mut s = held.clone();
    assert!(r.apply(&mine, 2, &mut s).is_err(), "no push kept");
    r = replayer.clone();
    r.pushed(PushCodec::TopK { per_mille: 50 }, &last[1..]);
    assert!(r.apply(&mine, 2, &mut s).is_err(), "another push kept");
    assert_eq!(bits(&s), bits(&held));
    r = replayer.clone();
    r.pushed(PushCodec::TopK { per_mille: 50 }, &last);
    assert!(r.apply(&mine, 2, &mut s).is_ok(), "its push kept");
    // The same updates for a worker that holds another version.
    let mut ahead = replayer.clone();
    let mut s = held.clone();
    assert!(ahead.apply(&body, 2, &mut s).is_ok());
    assert!(ahead.apply(&body, 2, &mut s).is_err());
    // And a whole slice that claims another length.
    let mut whole = Vec::new();
    engine.core().write_whole(&mut whole);
    let mut short = Replayer::new(&server, LEN - 1);
    let mut s = vec![0.0; LEN - 1];
    assert!(short.apply(&whole, 2, &mut s).is_err());
}

/// Every byte of a two-step body flipped in turn, and random bytes after a valid head: no
/// panic, and a refused body leaves the slice as it was (a flip the checksum cannot see,
/// none here, would have to leave it as the shard's).
#[test]
fn mutated_bodies_never_panic_and_refusals_change_nothing() {
    let TwoSteps {
        engine,
        replayer,
        slice,
        body,
        ..
    } = two_steps(10, 9);
    let mut rng = Rng::new(9);
    let mut bodies: Vec<Vec<u8>> = (0..body.len())
        .map(|at| {
            let mut b = body.clone();
            b[at] ^= 0xA5;
            b
        })
        .collect();
    for len in [1, 5, 30, 100] {
        let mut b = body[..len.min(body.len())].to_vec();
        b.extend((0..200).map(|_| rng.below(256) as u8));
        bodies.push(b);
    }
    for bad in bodies {
        let mut r = replayer.clone();
        let mut s = slice.clone();
        if r.apply(&bad, 2, &mut s).is_err() {
            assert_eq!(bits(&s), bits(&slice));
        } else {
            assert_eq!(bits(&s), bits(engine.params()));
        }
    }
}
