//! Byte-for-byte checks of every message's encoding, and round trips.

use super::*;
use pstrain_core::{
    Layout, Mode, OptimizerConfig, PushCodec, PushOutcome, RunPlan, ScheduleKind, ShardCounters,
};

fn plan() -> RunPlan {
    RunPlan {
        model: "m".into(),
        mode: Mode::Sync { backup_workers: 1 },
        workers: 9,
        batch_size: 16,
        epochs: 2,
        iterations: Some(300),
        optimizer: OptimizerConfig::momentum(0.5, 0.25),
        schedule: ScheduleKind::Constant,
        aggregate: pstrain_core::Aggregate::Sum,
        seed: 7,
        train_samples: 1000,
        clip: Some(pstrain_core::GradientClip {
            max_norm: 2.5,
            refuse: true,
        }),
        staleness_aware_lr: false,
        balance_batches: true,
        push_codec: pstrain_core::PushCodec::TopK { per_mille: 20 },
        pull_codec: pstrain_core::PullCodec::DeltaTopK { per_mille: 20 },
        auto_codecs: false,
    }
}

#[test]
fn small_requests_have_exact_bytes() {
    let pull = Request::Pull {
        newer_than: Some(7),
        wait: true,
        codec: pstrain_core::PullCodec::DeltaTopK { per_mille: 20 },
        lane: false,
    };
    assert_eq!(pull.kind(), kind::PULL);
    assert_eq!(pull.encode(0), [7, 0, 0, 0, 0, 0, 0, 0, 1, 4, 20, 0, 0]);
    assert_eq!(
        Request::decode(kind::PULL, &pull.encode(0), 0).unwrap(),
        pull
    );
    let none = Request::Pull {
        newer_than: None,
        wait: false,
        codec: pstrain_core::PullCodec::Fp32,
        lane: false,
    };
    assert_eq!(
        none.encode(0),
        [255, 255, 255, 255, 255, 255, 255, 255, 0, 1, 0, 0, 0]
    );
    let through_lane = Request::Pull {
        newer_than: None,
        wait: false,
        codec: pstrain_core::PullCodec::Fp32,
        lane: true,
    };
    assert_eq!(through_lane.encode(0)[12], 1);
    assert_eq!(
        Request::decode(kind::PULL, &through_lane.encode(0), 0).unwrap(),
        through_lane
    );
    let confirm = Request::LaneConfirm { nonce: [7; 16] };
    assert_eq!(confirm.encode(0), [7; 16]);
    assert_eq!(
        Request::decode(kind::LANE_CONFIRM, &confirm.encode(0), 0).unwrap(),
        confirm
    );
    assert!(Request::decode(kind::LANE_CONFIRM, &[7; 15], 0).is_err());
    assert!(Request::decode(kind::LANE, &[1], 0).is_err());
    // A codec that does not exist, or a top-k of nothing, is malformed.
    for bad in [[9u8, 0, 0], [4, 0, 0]] {
        let mut bytes = none.encode(0);
        bytes[9..12].copy_from_slice(&bad);
        assert!(Request::decode(kind::PULL, &bytes, 0).is_err(), "{bad:?}");
    }
    let describe = Request::Describe { proof: [7; 32] };
    assert_eq!(describe.encode(0), [7; 32]);
    let auth = Request::Auth { nonce: [9; 32] };
    assert_eq!(auth.encode(0), [9; 32]);
    assert!(Request::decode(kind::AUTH, &[9; 31], 0).is_err());
    for r in [
        pull,
        none,
        Request::Stats,
        Request::Goodbye,
        Request::Heartbeat,
        describe,
        auth,
    ] {
        assert_eq!(Request::decode(r.kind(), &r.encode(0), 0).unwrap(), r);
    }
    assert!(
        Request::decode(kind::STATS, &[0], 0).is_err(),
        "trailing bytes"
    );
    assert!(
        Request::decode(kind::PULL, &[0; 8], 0).is_err(),
        "truncated"
    );
    assert!(Request::decode(kind::PULL, &[0, 0, 0, 0, 0, 0, 0, 0, 2], 0).is_err());
    assert!(Request::decode(0x42, &[], 0).is_err(), "unknown kind");
}

#[test]
fn push_head_and_reply_have_exact_bytes() {
    let head = PushHead {
        base_version: 3,
        samples: 16,
        loss: 0.5,
        pull_s: 2.0,
        codec: pstrain_core::PushCodec::Int8,
        lane: false,
        own: None,
        step: Some(StepMembers {
            step: 7,
            members: vec![true, false, false, true, false, false, false, false, true],
        }),
    };
    let bytes = head.encode(9);
    assert_eq!(bytes.len(), PushHead::len(9));
    assert_eq!(
        bytes,
        [
            3, 0, 0, 0, 0, 0, 0, 0, // base version
            16, 0, 0, 0, // samples
            0, 0, 0, 0x3f, // 0.5f32
            0, 0, 0, 0x40, // pull seconds, 2.0f32
            3, 0, 0, // int8
            0, // not through a lane
            0, 1, 0, 0, // no push of its own beside the codec's (fp32's tag, unread)
            7, 0, 0, 0, 0, 0, 0, 0, // step
            0b1001, 0b1 // members 0, 3 and 8
        ]
    );
    assert_eq!(PushHead::decode(&bytes, 9).unwrap(), head);
    assert!(PushHead::decode(&bytes[..bytes.len() - 1], 9).is_err());
    let plain = PushHead {
        step: None,
        ..head.clone()
    };
    assert_eq!(
        &plain.encode(2)[23..],
        &[0, 0, 1, 0, 0, 255, 255, 255, 255, 255, 255, 255, 255, 0]
    );
    let through_lane = PushHead {
        lane: true,
        ..plain.clone()
    };
    assert_eq!(through_lane.encode(2)[23], 1);
    // Bound by replaying peers to `topk:10`, its own link chose `topk:100`.
    let bound = PushHead {
        codec: pstrain_core::PushCodec::TopK { per_mille: 10 },
        own: Some(pstrain_core::PushCodec::TopK { per_mille: 100 }),
        ..plain.clone()
    };
    assert_eq!(&bound.encode(2)[24..28], &[1, 4, 100, 0]);
    assert_eq!(PushHead::decode(&bound.encode(2), 2).unwrap(), bound);
    let mut unnamed = bound.encode(2);
    unnamed[25] = 9;
    assert!(
        PushHead::decode(&unnamed, 2).is_err(),
        "an own codec that names none"
    );
    assert_eq!(
        PushHead::decode(&through_lane.encode(2), 2).unwrap(),
        through_lane
    );

    let reply = PushReply {
        outcome: PushOutcome::Applied {
            version: 8,
            staleness: 1,
        },
        step: head.step.clone(),
        arrive_s: 0.5,
    };
    let bytes = Reply::Pushed(reply.clone()).encode(9);
    assert_eq!(&bytes[bytes.len() - 4..], &0.5f32.to_le_bytes());
    assert_eq!(
        &bytes[..17],
        &[0, 8, 0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0]
    );
    assert_eq!(
        Reply::decode(kind::PUSH_REPLY, &bytes, 9).unwrap(),
        Reply::Pushed(reply)
    );
    for outcome in [
        PushOutcome::Buffered { waiting_for: 2 },
        PushOutcome::Dropped { staleness: 5 },
        PushOutcome::Done,
    ] {
        let r = Reply::Pushed(PushReply::plain(outcome));
        assert_eq!(Reply::decode(kind::PUSH_REPLY, &r.encode(3), 3).unwrap(), r);
    }
    let mut bad = Reply::Pushed(PushReply::plain(PushOutcome::Done)).encode(3);
    bad[0] = 9;
    assert!(Reply::decode(kind::PUSH_REPLY, &bad, 3).is_err());
}

#[test]
fn failures_carry_typed_codes() {
    let f = Reply::Error(Failure::new(ErrorCode::NonFinite { count: 3 }, "nope"));
    let bytes = f.encode(0);
    assert_eq!(
        bytes,
        [5, 0, 3, 0, 0, 0, 0, 0, 0, 0, 4, 0, 0, 0, b'n', b'o', b'p', b'e']
    );
    assert_eq!(Reply::decode(kind::ERROR, &bytes, 0).unwrap(), f);
    let challenge = Reply::Challenge {
        nonce: [1; 32],
        proof: [2; 32],
    };
    let bytes = challenge.encode(0);
    assert_eq!(bytes, [[1u8; 32], [2u8; 32]].concat());
    assert_eq!(
        Reply::decode(kind::CHALLENGE, &bytes, 0).unwrap(),
        challenge
    );
    assert!(Reply::decode(kind::CHALLENGE, &bytes[1..], 0).is_err());
    for code in [
        ErrorCode::BadFrame,
        ErrorCode::Handshake,
        ErrorCode::Refused,
        ErrorCode::RankBusy,
        ErrorCode::Unauthorized,
        ErrorCode::TooLarge { largest: 1e30 },
        ErrorCode::RolledBack,
        ErrorCode::Evicted,
    ] {
        let r = Reply::Error(Failure::new(code, "x"));
        assert_eq!(Reply::decode(kind::ERROR, &r.encode(0), 0).unwrap(), r);
    }
    assert!(Reply::decode(kind::ERROR, &[9, 0], 0).is_err());
}

#[test]
fn pulled_and_stats_round_trip() {
    let p = Reply::Pulled(Pulled {
        version: 4,
        updated: true,
        done: true,
        delta: true,
        in_lane: false,
        batch: 21,
        peers_push: None,
    });
    let bytes = p.encode(0);
    assert_eq!(bytes, [4, 0, 0, 0, 0, 0, 0, 0, 7, 21, 0, 0, 0, 1, 0, 0]);
    assert_eq!(bytes.len(), PULLED_LEN);
    assert_eq!(Reply::decode(kind::PULL_REPLY, &bytes, 0).unwrap(), p);
    // Replaying peers' sparsest push: flag 16, then its tag and parameter.
    let peers = Reply::Pulled(Pulled {
        version: 4,
        updated: false,
        done: false,
        delta: false,
        in_lane: false,
        batch: 0,
        peers_push: Some(PushCodec::TopK { per_mille: 10 }),
    });
    let bytes = peers.encode(0);
    assert_eq!(bytes, [4, 0, 0, 0, 0, 0, 0, 0, 16, 0, 0, 0, 0, 4, 10, 0]);
    assert_eq!(Reply::decode(kind::PULL_REPLY, &bytes, 0).unwrap(), peers);
    let bad_flags = [0, 0, 0, 0, 0, 0, 0, 0, 32, 0, 0, 0, 0, 1, 0, 0];
    assert!(Reply::decode(kind::PULL_REPLY, &bad_flags, 0).is_err());
    let bad_codec = [0, 0, 0, 0, 0, 0, 0, 0, 16, 0, 0, 0, 0, 4, 0, 0];
    assert!(Reply::decode(kind::PULL_REPLY, &bad_codec, 0).is_err());
    let in_lane = [0, 0, 0, 0, 0, 0, 0, 0, 9, 0, 0, 0, 0, 1, 0, 0];
    let Ok(Reply::Pulled(p)) = Reply::decode(kind::PULL_REPLY, &in_lane, 0) else {
        panic!("a pull answered through a lane decodes");
    };
    assert!(p.in_lane && p.updated);
    let offer = Reply::LaneOffer {
        path: "/proc/1/fd/9".into(),
    };
    assert_eq!(
        Reply::decode(kind::LANE_OFFER, &offer.encode(0), 0).unwrap(),
        offer
    );
    let mut worker = pstrain_core::WorkerStats {
        applied: 5,
        max_lead: 2,
        compute_s: 1.25,
        wait_s: 0.5,
        batch: 21,
        ..Default::default()
    };
    worker.staleness_hist[3] = 4;
    let st = Reply::Stats(StatsReply {
        stats: ShardCounters {
            version: 3,
            loss_ema: Some(0.5),
            ..Default::default()
        },
        active_workers: 2,
        done: true,
        workers: vec![worker, Default::default()],
    });
    let bytes = st.encode(0);
    assert_eq!(Reply::decode(kind::STATS_REPLY, &bytes, 0).unwrap(), st);
    // A count of workers the frame does not hold is refused, not allocated.
    // After the count, each record's shape: numbers, then histogram buckets.
    let shape_at = bytes.len() - 2 * WORKER_STATS_LEN - 4;
    let mut lying = bytes[..shape_at + 4].to_vec();
    lying[shape_at - 4..shape_at].copy_from_slice(&u32::MAX.to_le_bytes());
    assert!(Reply::decode(kind::STATS_REPLY, &lying, 0).is_err());
    // Empty records would let a count of billions cost no bytes: refused.
    let mut empty = bytes[..shape_at + 4].to_vec();
    empty[shape_at..].copy_from_slice(&[0, 0, 0, 0]);
    assert!(Reply::decode(kind::STATS_REPLY, &empty, 0).is_err());
    // A sender with one number more than this build knows: skipped, the rest read in place.
    let numbers = u16::from_le_bytes([bytes[shape_at], bytes[shape_at + 1]]);
    let mut newer = bytes[..shape_at].to_vec();
    newer.extend_from_slice(&(numbers + 1).to_le_bytes());
    newer.extend_from_slice(&bytes[shape_at + 2..shape_at + 4]);
    for record in bytes[shape_at + 4..].chunks(WORKER_STATS_LEN) {
        let (head, hist) = record.split_at(8 * usize::from(numbers));
        newer.extend_from_slice(head);
        newer.extend_from_slice(&99u64.to_le_bytes());
        newer.extend_from_slice(hist);
    }
    assert_eq!(Reply::decode(kind::STATS_REPLY, &newer, 0).unwrap(), st);
    assert_eq!(
        Reply::decode(kind::GOODBYE_OK, &Reply::GoodbyeOk.encode(0), 0).unwrap(),
        Reply::GoodbyeOk
    );
}

#[test]
fn hello_and_description_carry_the_plan_and_reject_garbage() {
    let layout = Layout::new([("w", &[3usize, 2][..]), ("b", &[3][..])]).unwrap();
    let auto = RunPlan {
        auto_codecs: true,
        ..RunPlan::default()
    };
    for p in [plan(), RunPlan::default(), auto] {
        let hello = Hello::new(Role::Worker, 1, 0, 2, &p, &layout);
        let bytes = hello.encode();
        let back = Hello::decode(&bytes).unwrap();
        assert_eq!(back, hello);
        assert_eq!(back.run.plan, p);
        assert_eq!(back.layout().unwrap(), layout);
        for cut in [0, 5, bytes.len() - 1] {
            assert!(Hello::decode(&bytes[..cut]).is_err());
        }
        let mut long = bytes.clone();
        long.push(0);
        assert!(Hello::decode(&long).is_err());
        let d = Description::new(1, 2, &p, &layout);
        assert_eq!(Description::decode(&d.encode()).unwrap(), d);
        let any = Hello::new(Role::Worker, usize::MAX, 0, 1, &p, &layout);
        assert_eq!(any.rank, WIRE_ANY_RANK);
        let proven = Hello {
            proof: [5; 32],
            ..hello.clone()
        };
        assert_eq!(Hello::decode(&proven.encode()).unwrap().proof, [5; 32]);
        assert_ne!(hello.signed_body(), any.signed_body());
        let wire = proven.encode();
        let (body, proof) = Hello::split_proof(&wire).unwrap();
        assert_eq!((body, proof), (&hello.signed_body()[..], [5; 32]));
        assert!(Hello::split_proof(&[0; 31]).is_err());
    }
    // A tensor count larger than the bytes could hold is refused before allocating.
    let hello = Hello::new(Role::Observer, 0, 0, 1, &plan(), &layout);
    let mut bytes = hello.encode();
    let mut w = crate::codec::Writer::default();
    encode_plan(&mut w, &plan());
    // role, rank, shard, shards, the plan, the fingerprint, then the count.
    let count_at = 1 + 4 + 4 + 4 + w.0.len() + 8;
    bytes[count_at..count_at + 4].copy_from_slice(&u32::MAX.to_le_bytes());
    assert!(Hello::decode(&bytes).is_err());
    // A plan naming absurdly many workers is refused.
    let huge = RunPlan {
        workers: MAX_WORKERS + 1,
        ..plan()
    };
    let mut w = crate::codec::Writer::default();
    encode_plan(&mut w, &huge);
    assert!(decode_plan(&mut crate::codec::Reader::new(&w.0, "plan")).is_err());
}

#[test]
fn peer_names_are_cut_short_in_errors() {
    let long = "x".repeat(100_000);
    let tensors: WireTensors = vec![(long.clone(), vec![1]), (long, vec![1])];
    let err = layout_of(&tensors).unwrap_err();
    assert!(err.len() < 200, "{} characters", err.len());
    assert_eq!(cut("abc", 5), "abc");
    assert_eq!(cut("abcdef", 3), "abc...");
}
