//! Compressed pushes and pulls over a live shard: each push codec moves the weights as its
//! decoded gradient says (and the worker's record counts the bytes its link carried), a bf16 pull arrives within bf16's precision, a peer whose plan names
//! another codec is refused by name, and hostile compressed pushes (out-of-range indices,
//! bad gaps, wrong counts or lengths) are refused before they touch the model. Under `auto`
//! every rung's codecs are taken, per push and per pull, and nothing else.

mod common;

use common::*;
use pstrain_core::{
    ParameterClient, PullCodec, PushCodec, PushEncoder, PushMeta, PushOutcome, RunPlan, AUTO_LADDER,
};
use pstrain_net::message::{kind, Hello, PushHead, Role};
use pstrain_net::{RunToken, ShardConfig, ShardHandle, TcpClient};
use std::io::Write;

fn codec_plan(push: PushCodec, pull: PullCodec) -> RunPlan {
    RunPlan {
        push_codec: push,
        pull_codec: pull,
        ..plan(ASYNC, 1)
    }
}

fn start(plan: RunPlan, token: Option<RunToken>) -> ShardHandle {
    let mut cfg = ShardConfig::new(0, 1, layout(), plan);
    cfg.exit_when_finished = false;
    cfg.token = token;
    ShardHandle::start("127.0.0.1:0", cfg, &vec![0.0; N], 1).unwrap()
}

fn client(server: &ShardHandle, plan: RunPlan) -> Result<TcpClient, pstrain_net::NetError> {
    worker_of(server, plan)
}

fn meta(version: u64) -> PushMeta {
    PushMeta {
        rank: 0,
        base_version: version,
        samples: 1,
        loss: 0.0,
        accumulated: false,
    }
}

/// A token holder joined as worker 0 by hand (its hello answered), ready for raw frames.
fn join_with_token_stream(
    addr: std::net::SocketAddr,
    token: &RunToken,
    plan: &RunPlan,
) -> std::net::TcpStream {
    let hello = Hello::new(Role::Worker, 0, 0, 1, plan, &layout());
    let mut s = join_with_token(addr, token, hello);
    let (k, _) = read_frame(&mut s);
    assert_eq!(k, kind::HELLO_OK);
    s
}

#[test]
fn every_codec_moves_the_weights_by_its_decoded_gradient() {
    // A gradient with one large value per 100 and small ones elsewhere.
    let grad: Vec<f32> = (0..N)
        .map(|i| {
            if i % 100 == 0 {
                2.0
            } else {
                0.01 * (i % 7) as f32
            }
        })
        .collect();
    for push in [
        PushCodec::Fp32,
        PushCodec::Bf16,
        PushCodec::Int8,
        PushCodec::TopK { per_mille: 10 },
    ] {
        let p = codec_plan(push, PullCodec::Bf16);
        let server = start(p.clone(), None);
        let mut c = client(&server, p).unwrap();
        let mut params = vec![0.0; N];
        let v = c.pull(&mut params, None, false).unwrap().version;
        assert!(matches!(
            c.push(meta(v), &grad).unwrap(),
            PushOutcome::Applied { .. }
        ));
        c.pull(&mut params, None, false).unwrap();
        // The worker's link as the shard saw it: the push's bytes as sent, two encoded
        // pulls, and time on the link each way (the first pull's, reported with the push).
        let link = c.stats().unwrap()[0].workers[0];
        let mut wire = Vec::new();
        PushEncoder::new(push, 0).encode(&grad, &mut wire);
        let push_bytes = PushHead::len(1) + wire.len();
        assert_eq!(link.push_bytes.0, push_bytes as u64, "{push}");
        assert_eq!(link.pull_bytes.0, 2 * PullCodec::Bf16.encoded_len(N) as u64);
        assert!(link.push_link_s > 0.0 && link.pull_link_s > 0.0, "{link:?}");
        c.leave().unwrap();
        let report = server.finish().unwrap();
        // SGD lr 0.1: each weight is -0.1 x the decoded gradient; bf16 pulls round it.
        for (i, (w, g)) in report.params.iter().zip(&grad).enumerate() {
            let step = -0.1 * g;
            match push {
                PushCodec::TopK { .. } if i % 100 != 0 => assert_eq!(*w, 0.0, "{push} {i}"),
                PushCodec::Int8 => assert!((w - step).abs() <= 0.1 * 2.0 / 127.0 + 1e-7),
                _ => assert!((w - step).abs() <= step.abs() / 128.0 + 1e-9, "{push} {i}"),
            }
            assert!((params[i] - w).abs() <= w.abs() / 128.0, "bf16 pull of {w}");
        }
    }
}

#[test]
fn delta_pulls_bring_the_shards_weights_for_a_fraction_of_the_bytes() {
    for pull in [
        PullCodec::DeltaInt8,
        PullCodec::DeltaTopK { per_mille: 100 },
        PullCodec::DeltaTernary,
    ] {
        let p = codec_plan(PushCodec::Fp32, pull);
        let server = start(p.clone(), None);
        let mut c = client(&server, p).unwrap();
        let mut params = vec![0.0; N];
        let mut v = c.pull(&mut params, None, false).unwrap().version;
        // 20 gradients that move every weight, then 20 of zeros: the version moves on, the
        // weights do not, and the differences carry what earlier ones left out.
        for step in 0..40usize {
            let grad: Vec<f32> = (0..N)
                .map(|i| match step {
                    0..20 => ((i * 7 + step) % 13) as f32 * 0.1 - 0.6,
                    _ => 0.0,
                })
                .collect();
            c.push(meta(v), &grad).unwrap();
            let reply = c.pull(&mut params, Some(v), false).unwrap();
            assert!(reply.updated);
            v = reply.version;
            // Nothing newer: the answer carries nothing, and the shard still knows what the
            // worker holds (the next pull is a difference again).
            assert!(!c.pull(&mut params, Some(v), false).unwrap().updated);
        }
        let link = c.stats().unwrap()[0].workers[0];
        // One whole slice (fp32), then 40 differences. A top-k one's size depends on the
        // gaps between what it sends; while the weights move it sends a full 10%, after
        // that only what is still owed (at least its count).
        let at_most = 4 * N + 40 * pull.delta_len(N);
        if matches!(pull, PullCodec::DeltaInt8 | PullCodec::DeltaTernary) {
            assert_eq!(link.pull_bytes.0, at_most as u64);
        } else {
            // 100 values at least take their count, a byte of gap and a byte each, and a
            // scale per 64.
            let at_least = 4 * N + 20 * (4 + 100 + 100 + 2 * 4) + 20 * 4;
            assert!((at_least..=at_most).contains(&(link.pull_bytes.0 as usize)));
        }
        c.leave().unwrap();
        let report = server.finish().unwrap();
        let tolerance = match pull {
            // The last difference is zero: nothing left to round.
            PullCodec::DeltaInt8 => 1e-6,
            // Twenty differences of 10% each brought every coordinate still owed (the
            // rounding of a value sent is owed too, and sent later).
            _ => 1e-5,
        };
        for (i, (w, held)) in report.params.iter().zip(&params).enumerate() {
            assert!((w - held).abs() <= tolerance, "{pull} {i}: {held} vs {w}");
        }
        assert!(
            report.params.iter().any(|w| w.abs() > 0.1),
            "the weights moved"
        );
    }
}

#[test]
fn a_peer_with_another_codec_is_refused_by_name() {
    let server = start(codec_plan(PushCodec::Int8, PullCodec::Fp32), None);
    let err = client(&server, codec_plan(PushCodec::Fp32, PullCodec::Fp32))
        .err()
        .expect("refused");
    assert!(err.to_string().contains("push_codec"), "{err}");
    server.finish().unwrap();
}

#[test]
fn hostile_compressed_pushes_are_refused_before_the_model() {
    let token = RunToken::generate().unwrap();
    let p = codec_plan(PushCodec::TopK { per_mille: 10 }, PullCodec::Fp32);
    let server = start(p.clone(), Some(token.clone()));
    // Top-k's payload: the count, varint gaps between ascending indices, a scale per 64
    // values, the values as int8 (here fewer than 64, each one step of `scale`); the gaps and
    // the values each a section: its length (a varint, here below 128), mode 0 (stored), the
    // bytes as they are.
    let stored = |bytes: &[u8], out: &mut Vec<u8>| {
        out.extend_from_slice(&[bytes.len() as u8, 0]);
        out.extend_from_slice(bytes);
    };
    let with_scale = |count: u32, gaps: &[u8], scale: f32| {
        let mut b = count.to_le_bytes().to_vec();
        stored(gaps, &mut b);
        b.extend_from_slice(&scale.to_le_bytes());
        stored(&vec![1u8; count as usize], &mut b);
        b
    };
    let body = |count: u32, gaps: &[u8]| with_scale(count, gaps, 1.0);
    let n_as_varint = [0xe8, 0x07]; // N = 1000
    let head = PushHead {
        base_version: 0,
        samples: 1,
        loss: 0.0,
        pull_s: 0.0,
        codec: PushCodec::TopK { per_mille: 10 },
        lane: false,
        own: None,
        step: None,
    }
    .encode(1);
    let cases: Vec<(&str, Vec<u8>)> = vec![
        ("index out of range", body(1, &n_as_varint)),
        (
            "index out of range after one in range",
            body(2, &[5, n_as_varint[0], n_as_varint[1]]),
        ),
        (
            "count beyond the slice",
            (N as u32 + 1).to_le_bytes().to_vec(),
        ),
        ("more values than the codec sends", body(11, &[0; 11])),
        ("count and length disagree", body(2, &[1])),
        ("gap cut short", body(1, &[0x80])),
        ("bytes left over", body(1, &[1, 1])),
        ("bytes after the values", [body(1, &[1]), vec![0]].concat()),
        ("a section's mode unknown", {
            let mut b = body(1, &[1]);
            b[5] = 7;
            b
        }),
    ];
    for (what, b) in cases {
        let mut s = join_with_token_stream(server.address(), &token, &p);
        let mut payload = head.clone();
        payload.extend_from_slice(&b);
        s.write_all(&frame(kind::PUSH, &payload)).unwrap();
        let (k, reply) = read_frame(&mut s);
        assert_eq!(k, kind::ERROR, "{what}");
        assert!(
            String::from_utf8_lossy(&reply).contains("top-k"),
            "{what}: {}",
            String::from_utf8_lossy(&reply)
        );
    }
    // A NaN inside a well-formed top-k push is refused like any NaN gradient.
    let mut s = join_with_token_stream(server.address(), &token, &p);
    let mut payload = head.clone();
    payload.extend_from_slice(&with_scale(1, &[3], f32::NAN));
    s.write_all(&frame(kind::PUSH, &payload)).unwrap();
    let (k, reply) = read_frame(&mut s);
    assert_eq!(k, kind::ERROR);
    assert!(String::from_utf8_lossy(&reply).contains("NaN"));
    let report = server.finish().unwrap();
    assert_eq!(report.stats.gradients_applied, 0);
    assert!(report.params.iter().all(|&w| w == 0.0));
}

/// A push of `grad` in `codec` as raw frame bytes, from a worker holding version 0.
fn raw_push(codec: PushCodec, grad: &[f32]) -> Vec<u8> {
    let mut payload = PushHead {
        base_version: 0,
        samples: 1,
        loss: 0.0,
        pull_s: 0.0,
        codec,
        lane: false,
        own: None,
        step: None,
    }
    .encode(1);
    let mut body = Vec::new();
    PushEncoder::new(codec, 1).encode(grad, &mut body);
    payload.extend_from_slice(&body);
    frame(kind::PUSH, &payload)
}

#[test]
fn auto_takes_every_rung_per_push_and_per_pull_and_nothing_else() {
    let token = RunToken::generate().unwrap();
    let p = RunPlan {
        auto_codecs: true,
        ..plan(ASYNC, 1)
    };
    let server = start(p.clone(), Some(token.clone()));
    let grad = vec![0.01; N];
    let mut s = join_with_token_stream(server.address(), &token, &p);
    for rung in AUTO_LADDER {
        s.write_all(&raw_push(rung.push, &grad)).unwrap();
        let (k, reply) = read_frame(&mut s);
        assert_eq!(k, kind::PUSH_REPLY, "{}", String::from_utf8_lossy(&reply));
        // The record shows what the link used last.
        let pull = pstrain_net::message::Request::Pull {
            newer_than: None,
            wait: false,
            codec: rung.pull,
            lane: false,
        };
        s.write_all(&frame(pull.kind(), &pull.encode(1))).unwrap();
        let (k, _) = read_frame(&mut s);
        assert_eq!(k, kind::PULL_REPLY, "{}", rung.pull);
    }
    // Rank 0 free again for the next connections.
    let bye = pstrain_net::message::Request::Goodbye;
    s.write_all(&frame(bye.kind(), &bye.encode(1))).unwrap();
    assert_eq!(read_frame(&mut s).0, kind::GOODBYE_OK);
    // Not on the ladder: refused by name, before the model.
    for (codec, what) in [
        (PushCodec::Bf16, "bf16"),
        (PushCodec::TopK { per_mille: 7 }, "topk:7"),
    ] {
        let mut s = join_with_token_stream(server.address(), &token, &p);
        s.write_all(&raw_push(codec, &grad)).unwrap();
        let (k, reply) = read_frame(&mut s);
        assert_eq!(k, kind::ERROR);
        let text = String::from_utf8_lossy(&reply);
        assert!(text.contains(what) && text.contains("auto"), "{text}");
    }
    let mut s = join_with_token_stream(server.address(), &token, &p);
    let pull = pstrain_net::message::Request::Pull {
        newer_than: None,
        wait: false,
        codec: PullCodec::Bf16,
        lane: false,
    };
    s.write_all(&frame(pull.kind(), &pull.encode(1))).unwrap();
    let (k, reply) = read_frame(&mut s);
    assert_eq!(k, kind::ERROR, "{}", String::from_utf8_lossy(&reply));
    let report = server.finish().unwrap();
    assert_eq!(report.stats.gradients_applied, AUTO_LADDER.len() as u64);
}

#[test]
fn a_fixed_run_refuses_a_push_in_another_codec_by_name() {
    let token = RunToken::generate().unwrap();
    let p = codec_plan(PushCodec::Int8, PullCodec::Fp32);
    let server = start(p.clone(), Some(token.clone()));
    let mut s = join_with_token_stream(server.address(), &token, &p);
    s.write_all(&raw_push(PushCodec::TopK { per_mille: 50 }, &vec![1.0; N]))
        .unwrap();
    let (k, reply) = read_frame(&mut s);
    assert_eq!(k, kind::ERROR);
    let text = String::from_utf8_lossy(&reply);
    assert!(
        text.contains("topk:50") && text.contains("int8 / fp32"),
        "{text}"
    );
    let report = server.finish().unwrap();
    assert_eq!(report.stats.gradients_applied, 0);
}

#[test]
fn an_auto_worker_on_a_fast_link_records_its_choice() {
    let p = RunPlan {
        auto_codecs: true,
        ..plan(ASYNC, 1)
    };
    let server = start(p.clone(), None);
    let mut c = client(&server, p).unwrap();
    let mut params = vec![0.0; N];
    let mut v = c.pull(&mut params, None, false).unwrap().version;
    for _ in 0..3 {
        c.push(meta(v), &vec![0.01; N]).unwrap();
        v = c.pull(&mut params, Some(v), false).unwrap().version;
    }
    let link = c.stats().unwrap()[0].workers[0];
    // Too small a slice to measure a link by: fp32 both ways, as the record shows.
    assert_eq!(link.codecs.to_string(), "fp32 / fp32");
    c.leave().unwrap();
    server.finish().unwrap();
}
