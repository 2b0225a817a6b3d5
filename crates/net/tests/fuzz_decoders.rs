//! Property tests of every decoder a stranger's bytes reach (frame header, requests, replies,
//! hello, description, push head): random bytes and mutations of valid messages must give
//! `Ok` or `Err`, never a panic, and no single allocation beyond a bound proportional to the
//! input (a counting allocator watches every decode). Run for a fixed number of cases.

use proptest::prelude::*;
use pstrain_core::{Layout, Mode, RunPlan, WorkerStats};
use pstrain_net::frame::{Header, HEADER_LEN};
use pstrain_net::message::{
    kind, Description, Failure, Hello, HelloOk, Pulled, PushHead, PushReply, Reply, Request, Role,
    StatsReply, StepMembers,
};
#[path = "../../../test-support/peak_alloc.rs"]
mod peak_alloc;

use peak_alloc::{mutate, Peak};

#[global_allocator]
static ALLOCATOR: Peak = Peak;

fn bounded<T>(what: &str, input: &[u8], decode: impl FnOnce(&[u8]) -> T) -> T {
    peak_alloc::bounded(what, input, 4096, 16, decode)
}

const WORKERS: usize = 5;

fn valid_messages() -> Vec<(u16, Vec<u8>)> {
    let layout = Layout::new([
        ("conv.weight", &[8usize, 1, 3, 3][..]),
        ("fc.bias", &[10][..]),
    ])
    .unwrap();
    let plan = RunPlan {
        mode: Mode::Ssp { max_lead: 3 },
        workers: WORKERS,
        ..RunPlan::default()
    };
    let hello = Hello::new(Role::Worker, 2, 0, 2, &plan, &layout);
    let members = StepMembers {
        step: 9,
        members: vec![true, false, true, true, false],
    };
    let head = PushHead {
        base_version: 7,
        samples: 32,
        loss: 0.5,
        pull_s: 0.0,
        codec: pstrain_core::PushCodec::TopK { per_mille: 10 },
        lane: false,
        own: Some(pstrain_core::PushCodec::TopK { per_mille: 100 }),
        step: Some(members.clone()),
    };
    let stats = StatsReply {
        stats: Default::default(),
        active_workers: 3,
        done: false,
        workers: vec![WorkerStats::default(); WORKERS],
    };
    vec![
        (kind::HELLO, hello.encode()),
        (
            kind::DESCRIBE_REPLY,
            Description::new(1, 2, &plan, &layout).encode(),
        ),
        (kind::PUSH, head.encode(WORKERS)),
        (
            kind::PULL,
            Request::Pull {
                newer_than: Some(3),
                wait: true,
                codec: pstrain_core::PullCodec::Fp32,
                lane: false,
            }
            .encode(WORKERS),
        ),
        (kind::STATS_REPLY, Reply::Stats(stats).encode(WORKERS)),
        (
            kind::PULL_REPLY,
            Reply::Pulled(Pulled {
                version: 3,
                updated: true,
                done: false,
                delta: false,
                in_lane: false,
                batch: 21,
                peers_push: Some(pstrain_core::PushCodec::TopK { per_mille: 20 }),
            })
            .encode(0),
        ),
        (
            kind::PUSH_REPLY,
            Reply::Pushed(PushReply {
                outcome: pstrain_core::PushOutcome::Applied {
                    version: 10,
                    staleness: 1,
                },
                step: Some(members),
                arrive_s: 0.25,
            })
            .encode(WORKERS),
        ),
        (
            kind::ERROR,
            Reply::Error(Failure::new(pstrain_net::message::ErrorCode::Refused, "no")).encode(0),
        ),
        (
            kind::HELLO_OK,
            Reply::HelloOk(HelloOk {
                start: 0,
                end: 100,
                version: 4,
                rank: 2,
            })
            .encode(0),
        ),
    ]
}

/// Every decoder on one input (with each message kind for the typed ones).
fn decode_everything(input: &[u8]) {
    let kinds = [
        kind::HELLO,
        kind::PULL,
        kind::PUSH,
        kind::STATS,
        kind::GOODBYE,
        kind::HEARTBEAT,
        kind::DESCRIBE,
        kind::AUTH,
        kind::HELLO_OK,
        kind::PULL_REPLY,
        kind::PUSH_REPLY,
        kind::STATS_REPLY,
        kind::GOODBYE_OK,
        kind::DESCRIBE_REPLY,
        kind::CHALLENGE,
        kind::ERROR,
        0x7777,
    ];
    for k in kinds {
        for workers in [0, 1, WORKERS, 1 << 16] {
            let _ = bounded("request", input, |b| Request::decode(k, b, workers));
            let _ = bounded("reply", input, |b| Reply::decode(k, b, workers));
        }
    }
    let _ = bounded("hello", input, Hello::decode);
    let _ = bounded("description", input, Description::decode);
    let _ = bounded("hello ok", input, HelloOk::decode);
    for workers in [0, WORKERS, 1 << 16] {
        let _ = bounded("push head", input, |b| PushHead::decode(b, workers));
        let _ = bounded("push reply", input, |b| PushReply::decode(b, workers));
    }
    if input.len() >= HEADER_LEN {
        let mut h = [0u8; HEADER_LEN];
        h.copy_from_slice(&input[..HEADER_LEN]);
        let _ = bounded("header", &h, |b| {
            Header::decode(b.try_into().unwrap(), 1 << 20)
        });
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 20_000, failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn random_bytes_never_panic(input in proptest::collection::vec(any::<u8>(), 0..600)) {
        decode_everything(&input);
    }

    #[test]
    fn mutated_messages_never_panic(
        which in 0usize..9,
        edits in proptest::collection::vec((any::<usize>(), any::<u8>()), 0..8),
        cut in proptest::option::of(any::<usize>()),
        tail in proptest::collection::vec(any::<u8>(), 0..16),
    ) {
        let messages = valid_messages();
        let (_, base) = &messages[which % messages.len()];
        decode_everything(&mutate(base, &edits, cut, &tail));
    }
}

#[test]
fn valid_messages_still_decode() {
    // The mutations start from messages the decoders accept.
    for (k, bytes) in valid_messages() {
        let ok = match k {
            kind::HELLO => Hello::decode(&bytes).is_ok(),
            kind::DESCRIBE_REPLY => Description::decode(&bytes).is_ok(),
            kind::PUSH => PushHead::decode(&bytes, WORKERS).is_ok(),
            kind::PULL => Request::decode(k, &bytes, WORKERS).is_ok(),
            _ => Reply::decode(k, &bytes, WORKERS).is_ok(),
        };
        assert!(ok, "kind {k:#x}");
    }
}

#[test]
#[should_panic(expected = "one allocation of")]
fn the_allocation_bound_is_enforced() {
    // The watch is live: a decoder that allocated a megabyte for ten bytes would fail.
    bounded("oversized", &[0u8; 10], |_| vec![0u8; 1 << 20]);
}
