//! A pull and a push in one round (`ParameterClient::pull_beside_push`, what `--duplex`
//! workers do): the pull is answered before the shard reads the push, so the answer never
//! holds it and the next one does; every codec's round leaves the worker holding the shard's
//! weights; a refused push leaves the pull's answer standing and the shard serving; and
//! tensors far larger than the sockets' buffers cross both ways at once without stalling
//! (a client that wrote its whole push before reading would wait on a shard blocked
//! writing to it).

mod common;

use common::*;
use pstrain_core::{
    ClientError, Layout, ParameterClient, PullCodec, PushCodec, PushError, PushMeta, PushOutcome,
    RunPlan,
};
use pstrain_net::{ClientConfig, ShardConfig, ShardHandle, TcpClient};
use std::time::Duration;

fn start(layout: Layout, plan: RunPlan) -> ShardHandle {
    let n = layout.len();
    let mut cfg = ShardConfig::new(0, 1, layout, plan);
    cfg.exit_when_finished = false;
    ShardHandle::start("127.0.0.1:0", cfg, &vec![0.0; n], 1).unwrap()
}

/// Worker 0 over TCP alone (no shared-memory lane, which pushes before it pulls), with
/// `io` as the deadline of every read and write.
fn connect(server: &ShardHandle, plan: RunPlan, layout: Layout, io: Duration) -> TcpClient {
    let address = vec![server.address().to_string()];
    let role = pstrain_net::message::Role::Worker;
    let mut cfg = ClientConfig::new(address, role, 0, plan, layout);
    cfg.connect_timeout = Duration::from_secs(2);
    cfg.io_timeout = io;
    cfg.lanes = false;
    TcpClient::connect(&cfg).unwrap()
}

fn meta(base_version: u64) -> PushMeta {
    PushMeta {
        rank: 0,
        base_version,
        samples: 1,
        loss: 0.0,
        accumulated: false,
    }
}

fn gradient(n: usize, round: usize) -> Vec<f32> {
    (0..n)
        .map(|i| ((i * 7 + round * 3) % 13) as f32 * 0.1 - 0.6)
        .collect()
}

#[test]
fn each_pull_comes_before_the_push_beside_it_and_the_next_brings_it() {
    let codecs = [
        (PushCodec::Fp32, PullCodec::Fp32),
        (PushCodec::TopK { per_mille: 100 }, PullCodec::DeltaTernary),
        (PushCodec::Int8, PullCodec::DeltaInt8),
        (PushCodec::Bf16, PullCodec::Bf16),
    ];
    for (push, pull) in codecs {
        let p = RunPlan {
            push_codec: push,
            pull_codec: pull,
            ..plan(ASYNC, 1)
        };
        let server = start(layout(), p.clone());
        let mut c = connect(&server, p, layout(), Duration::from_secs(10));
        let mut params = vec![0.0; N];
        let mut held = c.pull(&mut params, None, false).unwrap().version;
        // Twelve gradients that move every weight, then twenty of zeros: the version moves
        // on, the weights do not, and differences carry what earlier ones left out.
        for round in 0..32u64 {
            let grad = match round {
                0..12 => gradient(N, round as usize),
                _ => vec![0.0; N],
            };
            let (answer, pushed) = c
                .pull_beside_push(&mut params, Some(held), meta(held), &grad)
                .unwrap();
            // The shard answered before reading this push: it holds every earlier one.
            assert_eq!(answer.version, round, "{push}/{pull}");
            assert_eq!(answer.updated, round > 0, "{push}/{pull} round {round}");
            assert!(
                matches!(pushed, Ok(PushOutcome::Applied { .. })),
                "{push}/{pull}: {pushed:?}"
            );
            held = answer.version;
        }
        let last = c.pull(&mut params, Some(held), false).unwrap();
        assert_eq!(last.version, 32, "{push}/{pull}");
        c.leave().unwrap();
        let report = server.finish().unwrap();
        // fp32 exact; bf16 within its rounding; differences, after twenty rounds with
        // nothing new, owe nothing.
        let tolerance = |w: f32| match pull {
            PullCodec::Fp32 => 0.0,
            PullCodec::Bf16 => w.abs() / 128.0,
            _ => 1e-5,
        };
        for (i, (w, h)) in report.params.iter().zip(&params).enumerate() {
            assert!(
                (w - h).abs() <= tolerance(*w),
                "{push}/{pull} {i}: {h} vs {w}"
            );
        }
        assert!(
            report.params.iter().any(|w| w.abs() > 0.01),
            "the weights moved"
        );
    }
}

#[test]
fn a_refused_push_beside_a_pull_leaves_the_answer_and_the_shard_serving() {
    let p = plan(ASYNC, 1);
    let server = start(layout(), p.clone());
    let mut c = connect(&server, p, layout(), Duration::from_secs(10));
    let mut params = vec![0.0; N];
    let v = c.pull(&mut params, None, false).unwrap().version;
    let good = gradient(N, 0);
    c.push(meta(v), &good).unwrap();
    let mut bad = gradient(N, 1);
    bad[17] = f32::NAN;
    let (answer, pushed) = c
        .pull_beside_push(&mut params, Some(v), meta(v), &bad)
        .unwrap();
    assert!(answer.updated && answer.version == 1, "{answer:?}");
    assert!(
        matches!(
            pushed,
            Err(ClientError::Refused(PushError::NonFinite { count: 1 }))
        ),
        "{pushed:?}"
    );
    // The same connection goes on: the next round's push lands.
    let (answer, pushed) = c
        .pull_beside_push(&mut params, Some(1), meta(1), &good)
        .unwrap();
    assert!(!answer.updated && answer.version == 1, "{answer:?}");
    assert!(
        matches!(pushed, Ok(PushOutcome::Applied { .. })),
        "{pushed:?}"
    );
    c.leave().unwrap();
    let report = server.finish().unwrap();
    for (i, (w, g)) in report.params.iter().zip(&good).enumerate() {
        // SGD lr 0.1, the good gradient twice, the refused one not at all.
        assert!((w + 0.2 * g).abs() <= 1e-6, "{i}: {w}");
    }
}

#[test]
fn tensors_larger_than_the_sockets_buffers_cross_both_ways_at_once() {
    // 32 MB each way per round: far beyond what the kernel buffers of a loopback connection
    // hold, so the shard writing its answer and the client writing its push must drain each
    // other; a deadline of 20 s turns a stall into a failure.
    let n = 8 << 20;
    let layout = Layout::new([("w", &[n][..])]).unwrap();
    let p = plan(ASYNC, 1);
    let server = start(layout.clone(), p.clone());
    let mut c = connect(&server, p, layout, Duration::from_secs(20));
    let mut params = vec![0.0; n];
    let mut held = c.pull(&mut params, None, false).unwrap().version;
    let grad = vec![1.0f32; n];
    for round in 0..3u64 {
        let (answer, pushed) = c
            .pull_beside_push(&mut params, Some(held), meta(held), &grad)
            .unwrap();
        assert!(
            matches!(pushed, Ok(PushOutcome::Applied { .. })),
            "{pushed:?}"
        );
        assert_eq!(answer.version, round);
        held = answer.version;
    }
    c.pull(&mut params, Some(held), false).unwrap();
    c.leave().unwrap();
    let report = server.finish().unwrap();
    assert!(report.params.iter().all(|&w| (w + 0.3).abs() < 1e-6));
    assert!(params.iter().all(|&w| (w + 0.3).abs() < 1e-6));
}
