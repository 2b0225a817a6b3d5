//! Tests of delta pulls: the worker holds exactly the shard's replica, their sizes, how far
//! ternary and top-k differences let Adam-like weights lag, hostile differences refused.

use super::*;
use crate::compression::entropy::max_section_len;
use crate::compression::hand_written::{self, store_section};
use crate::compression::values::{decode_ternary, encode_ternary, ternary_len};

/// Weights that move a little at every version, as training moves them.
fn weights_at(version: u64, n: usize) -> Vec<f32> {
    let mut rng = Rng::new(version);
    (0..n)
        .map(|i| (i as f32 * 0.01).sin() + 1e-3 * version as f32 * rng.uniform(-1.0, 1.0))
        .collect()
}

#[test]
fn names_round_trip_and_bad_ones_are_refused() {
    for c in [
        "delta-int8",
        "delta-topk:20",
        "delta-topk:500",
        "delta-ternary",
    ] {
        assert_eq!(c.parse::<PullCodec>().unwrap().to_string(), c);
    }
    for bad in [
        "delta-topk:0",
        "delta-topk:501",
        "delta",
        "delta-int4",
        "delta-ternary:5",
        "topk:10",
    ] {
        assert!(bad.parse::<PullCodec>().is_err(), "{bad}");
    }
}

#[test]
fn the_worker_holds_exactly_the_replica_and_catches_up_with_the_weights() {
    let n = 1000;
    for codec in [
        PullCodec::DeltaInt8,
        PullCodec::DeltaTopK { per_mille: 50 },
        PullCodec::DeltaTernary,
    ] {
        let mut replica = PullReplica::new(true, 3);
        let mut held = weights_at(0, n);
        assert!(!replica.can_send_delta(codec, 0), "nothing sent whole yet");
        replica.sent_whole(0, &held);
        let (mut wire, mut scratch) = (Vec::new(), Vec::new());
        for version in 1..60u64 {
            // Training moves the weights for 20 versions, then stops.
            let weights = weights_at(version.min(20), n);
            assert!(replica.can_send_delta(codec, version - 1));
            assert!(!replica.can_send_delta(PullCodec::Fp32, version - 1));
            replica.encode_delta(codec, version, &weights, &mut wire);
            assert!(wire.len() <= codec.delta_len(n), "{codec}");
            codec.apply_delta(&wire, &mut held, &mut scratch).unwrap();
            assert_eq!(held, replica.values, "{codec}: bit for bit");
        }
        // Error feedback: what was left out arrived later.
        let weights = weights_at(20, n);
        for (h, w) in held.iter().zip(&weights) {
            assert!((h - w).abs() <= 1e-5, "{codec}: {h} vs {w}");
        }
        assert!(!replica.can_send_delta(codec, 7) && replica.can_send_delta(codec, 59));
        assert!(replica.holds());
        replica.forget();
        assert!(!replica.can_send_delta(codec, 59), "after a bf16 pull");
        assert!(
            !replica.holds() && replica.values.is_empty(),
            "its memory went"
        );
    }
}

#[test]
fn a_delta_is_a_fraction_of_a_whole_pull() {
    let n = 100_000;
    assert_eq!(PullCodec::DeltaInt8.delta_len(n), n + 4 * n.div_ceil(256));
    let top = PullCodec::DeltaTopK { per_mille: 10 };
    // 1,000 values: the count, a gap of at most 5 bytes (usually 1) and a byte each as two
    // sections (at most their bytes stored, behind a length and a mode), and a scale per 64.
    let sections = |gaps: usize| max_section_len(gaps) + max_section_len(1000);
    assert_eq!(max_section_len(1000), 2 + 1 + 1000);
    assert_eq!(top.delta_len(n), 4 + sections(5 * 1000) + 4 * 16);
    assert_eq!(top.typical_delta_len(n), 4 + sections(1000) + 4 * 16);
    assert_eq!(top.encoded_len(n), 4 * n, "whole slices go as fp32");
    assert!(!PullCodec::Bf16.is_delta() && PullCodec::Fp32.delta_len(n) == 0);
    // 390 whole blocks of 256 (a scale and 52 bytes of five digits), then 160 values (a
    // scale and 32 bytes): the scales, then the digits as a section, at most stored.
    let ternary = PullCodec::DeltaTernary;
    assert_eq!(
        ternary.delta_len(n),
        391 * 4 + max_section_len(390 * 52 + 32)
    );
    assert_eq!(ternary.typical_delta_len(n), ternary.delta_len(n));
}

#[test]
fn a_ternary_value_is_its_sign_times_the_block_scale_or_nothing() {
    // Two blocks: 256 values of magnitude 1..=4, then 44 of -0.5..0.5 (ending in a zero).
    let diff: Vec<f32> = (0..300)
        .map(|i| match i {
            0..256 => (1 + i % 4) as f32 * if i % 3 == 0 { -1.0 } else { 1.0 },
            _ => (299 - i) as f32 / 86.0 * if i % 2 == 0 { -1.0 } else { 1.0 },
        })
        .collect();
    let (mut wire, mut sent) = (Vec::new(), diff.clone());
    assert!(encode_ternary(&mut sent, &mut wire));
    assert!(wire.len() <= ternary_len(300));
    let mut decoded = vec![0.0; 300];
    decode_ternary(&wire, &mut decoded).unwrap();
    assert_eq!(decoded, sent, "the sender knows what arrives, bit for bit");
    for (i, (d, x)) in decoded.iter().zip(&diff).enumerate() {
        let scale = if i < 256 { 4.0 } else { 43.0 / 86.0 };
        let expected = if x.abs() >= 0.5 * scale {
            x.signum() * scale
        } else {
            0.0
        };
        assert_eq!(*d, expected, "{i}: {x}");
        assert!(
            (d - x).abs() <= 0.5 * scale,
            "{i}: at most half the scale left out"
        );
    }
    let mut zeros = Vec::new();
    assert!(encode_ternary(&mut [0.0; 7], &mut zeros));
    assert!(!encode_ternary(&mut [1.0, f32::NAN], &mut Vec::new()));
    decode_ternary(&zeros, &mut decoded[..7]).unwrap();
    assert_eq!(decoded[..7], [0.0; 7]);
}

#[test]
fn weights_that_are_not_finite_make_the_replica_forget_and_the_next_pull_whole() {
    let codec = PullCodec::DeltaTernary;
    let mut replica = PullReplica::new(true, 3);
    replica.sent_whole(0, &[0.0; 300]);
    let mut weights = [0.5f32; 300];
    weights[299] = f32::NAN;
    assert!(replica.can_send_delta(codec, 0));
    let mut wire = Vec::new();
    replica.encode_delta(codec, 1, &weights, &mut wire);
    let refused = codec.apply_delta(&wire, &mut [0.0; 300], &mut Vec::new());
    assert!(refused.is_err(), "the worker refuses the block");
    assert!(!replica.holds());
    assert!(!replica.can_send_delta(codec, 1) && !replica.can_send_delta(codec, 0));
}

#[test]
fn a_weight_that_moves_fast_among_slow_ones_stays_within_a_step() {
    // One weight of a block moves by 1 at every version, the rest by 0.01 either way:
    // whatever a pull leaves out is at most half the block's largest difference, so the
    // fast one never falls more than one of its steps behind.
    let n = 256;
    let mut rng = Rng::new(5);
    let mut weights = vec![0.0f32; n];
    let mut held = weights.clone();
    let mut replica = PullReplica::new(true, 3);
    replica.sent_whole(0, &held);
    let (mut wire, mut scratch) = (Vec::new(), Vec::new());
    let codec = PullCodec::DeltaTernary;
    for version in 1..=200u64 {
        weights[0] += 1.0;
        for w in &mut weights[1..] {
            *w += 0.01 * rng.uniform(-1.0, 1.0).signum();
        }
        replica.encode_delta(codec, version, &weights, &mut wire);
        codec.apply_delta(&wire, &mut held, &mut scratch).unwrap();
        let worst = held
            .iter()
            .zip(&weights)
            .map(|(h, w)| (h - w).abs())
            .fold(0.0f32, f32::max);
        assert!(worst <= 1.0 + 1e-3, "version {version}: {worst} behind");
    }
}

#[test]
fn ternary_deltas_follow_adam_like_weights_closer_than_top_k() {
    // Adam moves every coordinate by about lr at every step, each in a direction of its
    // own that drifts: top-k reaches a coordinate every so many pulls, a ternary digit
    // whenever it is half a block's largest difference behind.
    let (n, lr) = (10_000, 1e-3f32);
    let mut rng = Rng::new(11);
    let first_direction: Vec<f32> = (0..n).map(|_| rng.uniform(-1.0, 1.0)).collect();
    let start: Vec<f32> = (0..n).map(|_| rng.uniform(-0.1, 0.1)).collect();
    let mut lag = Vec::new();
    for codec in [
        PullCodec::DeltaTernary,
        PullCodec::DeltaTopK { per_mille: 50 },
    ] {
        assert!(codec.typical_delta_len(n) <= 2 * PullCodec::DeltaTernary.delta_len(n));
        let mut step_rng = Rng::new(12);
        let mut direction = first_direction.clone();
        let mut weights = start.clone();
        let mut held = start.clone();
        let mut replica = PullReplica::new(true, 3);
        replica.sent_whole(0, &held);
        let (mut wire, mut scratch) = (Vec::new(), Vec::new());
        for version in 1..=300u64 {
            for (w, d) in weights.iter_mut().zip(direction.iter_mut()) {
                *d += 0.2 * step_rng.uniform(-1.0, 1.0);
                *w -= lr * d.signum();
            }
            replica.encode_delta(codec, version, &weights, &mut wire);
            codec.apply_delta(&wire, &mut held, &mut scratch).unwrap();
        }
        let rms = (held
            .iter()
            .zip(&weights)
            .map(|(h, w)| f64::from(h - w).powi(2))
            .sum::<f64>()
            / n as f64)
            .sqrt();
        lag.push(rms / f64::from(lr));
    }
    // In steps of lr: the ternary pull stays within one, top-k several behind.
    assert!(lag[0] < 1.0, "delta-ternary lags {:.2} steps", lag[0]);
    assert!(
        lag[1] > 4.0 * lag[0],
        "delta-topk:50 lags {:.2} steps",
        lag[1]
    );
}

#[test]
fn hostile_deltas_are_refused() {
    let mut held = vec![1.0; 300];
    let mut scratch = Vec::new();
    let int8 = PullCodec::DeltaInt8;
    let short = vec![0u8; int8.delta_len(300) - 1];
    assert!(int8.apply_delta(&short, &mut held, &mut scratch).is_err());
    let top = PullCodec::DeltaTopK { per_mille: 10 };
    // Values of 1.0: a scale of 0.5 and 2 steps each (fewer than 64: one block).
    let payload =
        |count: u32, gaps: &[u8]| hand_written::top_k(count, gaps, count as usize, 0.5, 2);
    // Index 300 (a gap of 300 as a varint), index 5 then 306, 301 values, a spare byte.
    let outside = payload(1, &[0xac, 0x02]);
    let then_outside = payload(2, &[5, 0xac, 0x02]);
    let too_many = 301u32.to_le_bytes().to_vec();
    let leftover = payload(1, &[5, 0]);
    for bad in [outside, then_outside, too_many, leftover] {
        assert!(top.apply_delta(&bad, &mut held, &mut scratch).is_err());
    }
    top.apply_delta(&payload(1, &[5]), &mut vec![0.0; 300], &mut scratch)
        .unwrap();
    let ternary = PullCodec::DeltaTernary;
    let mut good = Vec::new();
    encode_ternary(&mut [0.25; 300], &mut good);
    // The same by hand, its digits stored: two scales of 0.25, every digit +1 (five to a byte:
    // 121; the first block's last byte holds one: 1, the second's four: 40).
    let by_hand = |scales: [f32; 2], digits: &[u8]| {
        let mut b: Vec<u8> = scales.iter().flat_map(|s| s.to_le_bytes()).collect();
        store_section(digits, &mut b);
        b
    };
    let digits = [&[121u8; 51][..], &[1], &[121; 8], &[40]].concat();
    let stored = by_hand([0.25; 2], &digits);
    let mut bad = vec![
        good[..good.len() - 1].to_vec(),
        [good.clone(), vec![0]].concat(),
        stored[..stored.len() - 1].to_vec(),
        by_hand([0.25; 2], &digits[1..]),
    ];
    for scale in [f32::NAN, f32::INFINITY, -1.0] {
        bad.push(by_hand([0.25, scale], &digits));
    }
    // A byte of more than five digits; the last byte (4 values) with a fifth digit.
    let (mut six_digits, mut last) = (digits.clone(), digits.clone());
    six_digits[10] = 243;
    *last.last_mut().unwrap() = 81;
    bad.extend([by_hand([0.25; 2], &six_digits), by_hand([0.25; 2], &last)]);
    for b in bad {
        assert!(ternary.apply_delta(&b, &mut held, &mut scratch).is_err());
    }
    assert_eq!(held, vec![1.0; 300], "nothing applied");
    ternary.apply_delta(&good, &mut held, &mut scratch).unwrap();
    assert_eq!(held, vec![1.25; 300]);
    ternary
        .apply_delta(&stored, &mut held, &mut scratch)
        .unwrap();
    assert_eq!(
        held,
        vec![1.5; 300],
        "a stored section reads as a coded one"
    );
}

/// Under `auto` a connection's pull codec changes: a difference is never taken from a
/// version the worker made by replay (the replica holds no values then), and a replay
/// never starts from a version a difference brought (the worker's optimizer is not the
/// shard's): each is sent whole first.
#[test]
fn a_change_between_replayed_and_difference_pulls_starts_whole() {
    let codec = PullCodec::DeltaInt8;
    let mut replica = PullReplica::new(true, 5);
    replica.sent_replay(4);
    assert_eq!(replica.replayed(), Some(4));
    assert!(!replica.can_send_delta(codec, 4), "no values to difference");
    replica.sent_whole(5, &[0.25; 64]);
    assert!(replica.can_send_delta(codec, 5));
    assert_eq!(replica.replayed(), None, "a whole slice is not a replay");
    let mut wire = Vec::new();
    replica.encode_delta(codec, 6, &[0.5; 64], &mut wire);
    assert_eq!(replica.replayed(), None, "nor is a difference");
    replica.sent_replay(7);
    assert_eq!(replica.replayed(), Some(7));
    replica.forget();
    assert_eq!(replica.replayed(), None);
}
