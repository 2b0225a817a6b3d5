//! The codecs' round trips, unbiasedness, error feedback and hostile input.

use super::*;
use crate::compression::hand_written;

fn gradient(n: usize, seed: u64) -> Vec<f32> {
    let mut rng = Rng::new(seed);
    (0..n).map(|_| rng.uniform(-1.0, 1.0) * 1e-2).collect()
}

fn round_trip(codec: PushCodec, values: &[f32], enc: &mut PushEncoder) -> Vec<f32> {
    let mut bytes = Vec::new();
    enc.encode(values, &mut bytes);
    match codec {
        PushCodec::TopK { .. } => assert!(bytes.len() <= codec.max_len(values.len())),
        _ => assert_eq!(bytes.len(), codec.max_len(values.len()), "{codec}"),
    }
    let mut out = vec![7.0; values.len()];
    codec.decode(&bytes, &mut out).unwrap();
    out
}

#[test]
fn names_round_trip_and_bad_ones_are_refused() {
    for c in ["fp32", "bf16", "int8", "topk:10", "topk:500"] {
        assert_eq!(c.parse::<PushCodec>().unwrap().to_string(), c);
    }
    assert_eq!("bf16".parse::<PullCodec>().unwrap(), PullCodec::Bf16);
    for bad in ["fp16", "topk:0", "topk:501", "topk:x", "int4"] {
        assert!(bad.parse::<PushCodec>().is_err(), "{bad}");
    }
}

#[test]
fn fp32_is_exact_and_bf16_is_within_its_precision() {
    let g = gradient(1000, 1);
    let mut enc = PushEncoder::new(PushCodec::Fp32, 0);
    assert_eq!(round_trip(PushCodec::Fp32, &g, &mut enc), g);
    let mut enc = PushEncoder::new(PushCodec::Bf16, 0);
    let back = round_trip(PushCodec::Bf16, &g, &mut enc);
    for (a, b) in g.iter().zip(&back) {
        assert!((a - b).abs() <= a.abs() / 256.0, "{a} -> {b}");
    }
    // Nothing finite becomes infinite; NaN stays NaN (and is refused by the shard).
    assert_eq!(from_bf16(to_bf16(f32::MAX)), from_bf16(0x7f7f));
    assert_eq!(from_bf16(to_bf16(-f32::MAX)), -from_bf16(0x7f7f));
    assert!(from_bf16(to_bf16(f32::NAN)).is_nan());
    assert_eq!(from_bf16(to_bf16(f32::INFINITY)), f32::INFINITY);
    assert_eq!(from_bf16(to_bf16(1.0)), 1.0);
}

#[test]
fn int8_keeps_zeros_and_handles_a_subnormal_scale() {
    // A block of values so small that its scale is subnormal (its inverse would be
    // infinite): zeros stay zero, the rest stay within a scale step, nothing becomes NaN.
    let tiny = f32::MIN_POSITIVE * 3.0;
    let g: Vec<f32> = (0..INT8_BLOCK)
        .map(|i| match i % 3 {
            0 => 0.0,
            1 => tiny,
            _ => -tiny * 0.5,
        })
        .collect();
    let mut enc = PushEncoder::new(PushCodec::Int8, 4);
    let back = round_trip(PushCodec::Int8, &g, &mut enc);
    let scale = tiny / 127.0;
    for (a, b) in g.iter().zip(&back) {
        assert!(
            b.is_finite() && (a - b).abs() <= scale * 1.0001,
            "{a} -> {b}"
        );
        if *a == 0.0 {
            assert_eq!(*b, 0.0);
        }
    }
}

#[test]
fn int8_is_unbiased_and_bounded_by_its_scale() {
    let g = gradient(INT8_BLOCK * 3 + 17, 2);
    let mut enc = PushEncoder::new(PushCodec::Int8, 9);
    let trials = 2000;
    let mut mean = vec![0.0f64; g.len()];
    for _ in 0..trials {
        let back = round_trip(PushCodec::Int8, &g, &mut enc);
        for (block, (gb, bb)) in g
            .chunks(INT8_BLOCK)
            .zip(back.chunks(INT8_BLOCK))
            .enumerate()
        {
            let scale = gb.iter().fold(0.0f32, |m, v| m.max(v.abs())) / 127.0;
            for (a, b) in gb.iter().zip(bb) {
                assert!((a - b).abs() <= scale * 1.0001, "block {block}: {a} -> {b}");
            }
        }
        for (m, b) in mean.iter_mut().zip(&back) {
            *m += *b as f64 / trials as f64;
        }
    }
    // Unbiased: the mean of many decodes approaches the value (well within the
    // standard error of a rounding of at most one scale step).
    let worst = g
        .iter()
        .zip(&mean)
        .map(|(a, m)| (*a as f64 - m).abs())
        .fold(0.0, f64::max);
    let scale = 1e-2 / 127.0;
    assert!(
        worst < 5.0 * scale / (trials as f64).sqrt(),
        "worst bias {worst}"
    );
    // A block with a NaN decodes to NaN (refused downstream), not to something finite.
    let mut bad = g.clone();
    bad[300] = f32::NAN;
    let back = round_trip(PushCodec::Int8, &bad, &mut enc);
    assert!(back[256..512].iter().all(|v| v.is_nan()));
    assert!(back[..256].iter().all(|v| v.is_finite()));
}

#[test]
fn top_k_sends_the_largest_and_carries_the_rest_in_its_residual() {
    let codec = PushCodec::TopK { per_mille: 100 };
    let g = gradient(1000, 3);
    let mut enc = PushEncoder::new(codec, 0);
    let back = round_trip(codec, &g, &mut enc);
    assert_eq!(back.iter().filter(|v| **v != 0.0).count(), 100);
    let smallest_sent = back
        .iter()
        .filter(|v| **v != 0.0)
        .fold(f32::MAX, |m, v| m.min(v.abs()));
    let largest_kept = enc.residual().iter().fold(0.0f32, |m, v| m.max(v.abs()));
    // (Sent as int8 steps of its block's largest / 127: the smallest may round below a
    // value kept back, by half a step.)
    let half_step = g.iter().fold(0.0f32, |m, v| m.max(v.abs())) / 254.0;
    assert!(smallest_sent >= largest_kept - half_step);
    // Sent plus residual is the gradient (error feedback loses nothing, the rounding
    // included).
    for ((s, r), v) in back.iter().zip(enc.residual()).zip(&g) {
        assert_eq!(s + r, *v);
    }
    // Over pushes of the same gradient, the sum of what arrived approaches the sum of
    // what was pushed: every coordinate gets through.
    let rounds = 60;
    let mut arrived = back.clone();
    for _ in 1..rounds {
        for (a, b) in arrived.iter_mut().zip(round_trip(codec, &g, &mut enc)) {
            *a += b;
        }
    }
    for ((a, r), v) in arrived.iter().zip(enc.residual()).zip(&g) {
        let want = v * rounds as f32;
        assert!(
            (a + r - want).abs() <= want.abs() * 1e-4 + 1e-6,
            "{a} + {r} vs {want}"
        );
    }
    // Small coordinates wait until their residual grows: most arrived within 60 rounds.
    let arrived_count = arrived.iter().filter(|a| **a != 0.0).count();
    assert!(
        arrived_count >= 850,
        "only {arrived_count} of 1000 coordinates arrived"
    );
}

#[test]
fn hostile_payloads_are_refused() {
    let mut out = vec![0.0; 10];
    // At most 5 of 10 values. Top-k's payload: the count, the varint gaps between indices,
    // then int8 values behind a scale per 64 (here 2.0: a scale of 1.0 and 2 steps each).
    let codec = PushCodec::TopK { per_mille: 500 };
    let with = |count: u32, gaps: &[u8]| hand_written::top_k(count, gaps, count as usize, 1.0, 2);
    assert!(codec.decode(&with(2, &[1, 1]), &mut out).is_ok());
    assert_eq!(out[3], 2.0);
    let beyond = with(2, &[1, 8]);
    assert!(matches!(
        codec.decode(&beyond, &mut out),
        Err(CodecError::Index { index: 10, .. })
    ));
    let too_many = with(6, &[0; 6]);
    assert!(matches!(
        codec.decode(&too_many, &mut out),
        Err(CodecError::Count { .. })
    ));
    let short = with(2, &[1]);
    assert!(matches!(
        codec.decode(&short, &mut out),
        Err(CodecError::Varint { .. })
    ));
    assert!(codec.decode(&[1, 0], &mut out).is_err());
    for c in [PushCodec::Fp32, PushCodec::Bf16, PushCodec::Int8] {
        let bytes = vec![0u8; c.max_len(10) + 1];
        assert!(c.decode(&bytes, &mut out).is_err(), "{c}");
        assert!(
            c.decode(&bytes[..bytes.len() - 2], &mut out).is_err(),
            "{c}"
        );
    }
    assert!(PullCodec::Bf16.decode(&[0; 19], &mut out).is_err());
}

#[test]
fn decoders_survive_arbitrary_bytes() {
    let mut rng = Rng::new(5);
    for round in 0..2000 {
        let n = rng.below(40);
        let len = rng.below(400);
        let bytes: Vec<u8> = (0..len).map(|_| rng.next_u64() as u8).collect();
        let mut out = vec![0.0; n];
        for c in [
            PushCodec::Fp32,
            PushCodec::Bf16,
            PushCodec::Int8,
            PushCodec::TopK { per_mille: 50 },
        ] {
            let _ = c.decode(&bytes, &mut out);
        }
        let _ = PullCodec::Bf16.decode(&bytes, &mut out);
        let _ = round;
    }
}

#[test]
fn moving_off_top_k_sends_what_it_held_back_with_the_next_push() {
    let g: Vec<f32> = (0..1000).map(|i| (i as f32 * 0.37).sin()).collect();
    let mut enc = PushEncoder::new(PushCodec::TopK { per_mille: 10 }, 1);
    let mut wire = Vec::new();
    enc.encode(&g, &mut wire);
    let mut sent = vec![0.0; 1000];
    PushCodec::TopK { per_mille: 10 }
        .decode(&wire, &mut sent)
        .unwrap();
    assert!(!enc.residual().is_empty() && !enc.passes_through());
    // `auto` moves this link to fp32: the next push is the gradient plus the residual.
    enc.set_codec(PushCodec::Fp32);
    assert!(!enc.passes_through(), "the residual must be encoded in");
    enc.encode(&g, &mut wire);
    let mut next = vec![0.0; 1000];
    PushCodec::Fp32.decode(&wire, &mut next).unwrap();
    for i in 0..1000 {
        // Both pushes together carry both gradients, exactly.
        assert!((sent[i] + next[i] - 2.0 * g[i]).abs() <= 1e-6, "{i}");
    }
    assert!(enc.residual().is_empty() && enc.passes_through());
}
