//! Pulls as differences from what a worker holds. For as long as a worker's connection lasts,
//! the shard keeps a replica of the slice that worker holds: the whole slice it was sent
//! first, plus every decoded difference since. A pull sends `weights - replica`, compressed,
//! and adds the decoded difference to the replica exactly as the worker adds it to its buffer,
//! so the two stay bit for bit equal and whatever the compression left out is still in the
//! next difference (the shard's error feedback, one per worker). Memory: one slice per worker
//! connection.
//!
//! Under Adam every weight moves by about the learning rate at every update, so a pull's
//! difference is dense: top-k reaches each weight only every so many pulls, while
//! `delta-ternary` (1.6 bits a weight) moves every weight that is half its block's largest
//! difference behind, so no weight of the worker's lags by more than what moved since.

use super::sparse::{self, TopK};
#[cfg(test)]
use super::values::encode_ternary;
use super::values::{
    add_ternary, check_ternary, decode_int8, encode_int8, encode_ternary_delta, ternary_len,
};
use super::{top_k_count, CodecError, PullCodec};
use crate::rng::Rng;

/// The shard's copy of what one worker holds of its slice.
#[derive(Debug, Clone)]
pub struct PullReplica {
    /// Whether the run sends differences at all (else nothing is kept).
    tracks: bool,
    /// The version the worker holds, once it was sent a whole slice on this connection.
    held: Option<u64>,
    values: Vec<f32>,
    diff: Vec<f32>,
    rng: Rng,
    top: TopK,
}

impl PullReplica {
    /// A replica for a connection of a run that sends differences (`tracks`; else it keeps
    /// nothing and never allows one).
    pub fn new(tracks: bool, seed: u64) -> Self {
        PullReplica {
            tracks,
            held: None,
            values: Vec::new(),
            diff: Vec::new(),
            rng: Rng::new(seed),
            top: TopK::default(),
        }
    }

    /// Whether a worker that says it holds `version` can be sent a difference in `codec`:
    /// the codec sends them, and this connection sent it exactly that version.
    pub fn can_send_delta(&self, codec: PullCodec, version: u64) -> bool {
        codec.is_delta() && self.held == Some(version)
    }

    /// A whole slice of `version` was sent as fp32: the worker now holds exactly `weights`.
    pub fn sent_whole(&mut self, version: u64, weights: &[f32]) {
        if !self.tracks {
            return;
        }
        self.values.clear();
        self.values.extend_from_slice(weights);
        self.held = Some(version);
    }

    /// Encodes into `out` (cleared first) the difference between `weights` (of `version`)
    /// and what the worker holds, and takes its decoded form into the replica. Call only
    /// when `can_send_delta(codec, ..)`.
    pub fn encode_delta(
        &mut self,
        codec: PullCodec,
        version: u64,
        weights: &[f32],
        out: &mut Vec<u8>,
    ) {
        out.clear();
        if codec == PullCodec::DeltaTernary {
            // Only weights that are not finite make a scale the worker refuses; then it
            // fails its pull, reconnects and is sent a whole slice, as this replica, no
            // longer what the worker holds, is forgotten.
            if encode_ternary_delta(weights, &mut self.values, out) {
                self.held = Some(version);
            } else {
                self.forget();
            }
            return;
        }
        let diff = &mut self.diff;
        diff.clear();
        diff.extend(weights.iter().zip(&self.values).map(|(w, r)| w - r));
        match codec {
            PullCodec::DeltaTopK { per_mille } => {
                let k = top_k_count(diff.len(), per_mille);
                self.top.select(diff, k);
                self.top.encode(diff, out);
                // As the worker adds it (`PullCodec::apply_delta`): what arrives of each value
                // sent; what was not sent, or rounded off, stays in the next difference.
                for (&i, arrives) in self.top.idx.iter().zip(&self.top.sent) {
                    self.values[i as usize] += arrives;
                }
            }
            _ => {
                encode_int8(diff, &mut self.rng, out);
                decode_int8(out, diff);
                for (r, d) in self.values.iter_mut().zip(diff.iter()) {
                    *r += d;
                }
            }
        }
        self.held = Some(version);
    }

    /// The worker was sent something this replica does not follow (bf16 or fp32 weights
    /// outside a delta codec): it no longer holds a known slice, and the memory goes.
    pub fn forget(&mut self) {
        if self.held.take().is_some() {
            self.values = Vec::new();
            self.diff = Vec::new();
        }
    }

    /// Whether it holds a slice (a worker's memory on the shard: one slice while it does).
    pub fn holds(&self) -> bool {
        self.held.is_some()
    }
}

impl PullCodec {
    /// Decodes a difference (checked as hostile input: its length, top-k's count and
    /// indices) and adds it to `held`, the slice the worker holds; `scratch` is reused.
    pub fn apply_delta(
        &self,
        bytes: &[u8],
        held: &mut [f32],
        scratch: &mut Vec<f32>,
    ) -> Result<(), CodecError> {
        if *self == PullCodec::DeltaTernary {
            // Checked whole first, so a refused difference leaves `held` as it was; then
            // added in place, without a decoded copy.
            exact_len("delta-ternary", bytes, held.len(), ternary_len(held.len()))?;
            check_ternary(bytes, held.len())?;
            add_ternary(bytes, held);
            return Ok(());
        }
        scratch.clear();
        scratch.resize(held.len(), 0.0);
        match self {
            PullCodec::DeltaTopK { per_mille } => {
                sparse::decode(bytes, top_k_count(held.len(), *per_mille), scratch)?
            }
            _ => {
                exact_len("delta-int8", bytes, held.len(), self.delta_len(held.len()))?;
                decode_int8(bytes, scratch);
            }
        }
        for (h, d) in held.iter_mut().zip(scratch.iter()) {
            *h += d;
        }
        Ok(())
    }
}

/// Refuses a dense difference of `values` values that is not `expected` bytes long.
fn exact_len(
    codec: &'static str,
    bytes: &[u8],
    values: usize,
    expected: usize,
) -> Result<(), CodecError> {
    if bytes.len() == expected {
        return Ok(());
    }
    Err(CodecError::Length {
        codec,
        values,
        got: bytes.len(),
        expected,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::compression::values::decode_ternary;

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
        // 1,000 values: the count, a gap of at most 5 bytes (usually 1) and a byte each, and
        // a scale per 64.
        assert_eq!(top.delta_len(n), 4 + 5 * 1000 + 1000 + 4 * 16);
        assert_eq!(top.typical_delta_len(n), 4 + 1000 + 1000 + 4 * 16);
        assert_eq!(top.encoded_len(n), 4 * n, "whole slices go as fp32");
        assert!(!PullCodec::Bf16.is_delta() && PullCodec::Fp32.delta_len(n) == 0);
        // 390 whole blocks of 256 (a scale and 52 bytes of five digits), then 160 values (a
        // scale and 32 bytes).
        let ternary = PullCodec::DeltaTernary;
        assert_eq!(ternary.delta_len(n), 390 * 56 + 36);
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
        assert_eq!(wire.len(), ternary_len(300));
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
        let payload = |count: u32, gaps: &[u8]| {
            let mut b = count.to_le_bytes().to_vec();
            b.extend_from_slice(gaps);
            b.extend_from_slice(&0.5f32.to_le_bytes());
            b.extend((0..count).map(|_| 2u8));
            b
        };
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
        let mut bad = vec![
            good[..good.len() - 1].to_vec(),
            [good.clone(), vec![0]].concat(),
        ];
        for scale in [f32::NAN, f32::INFINITY, -1.0] {
            let mut b = good.clone();
            // The second block's scale (after the first block's 4 + 52 bytes).
            b[56..60].copy_from_slice(&scale.to_le_bytes());
            bad.push(b);
        }
        // A byte of more than five digits; the last byte (4 values) with a fifth digit.
        let (mut six_digits, mut last) = (good.clone(), good.clone());
        six_digits[10] = 243;
        *last.last_mut().unwrap() = 81;
        bad.extend([six_digits, last]);
        for b in bad {
            assert!(ternary.apply_delta(&b, &mut held, &mut scratch).is_err());
        }
        assert_eq!(held, vec![1.0; 300], "nothing applied");
        ternary.apply_delta(&good, &mut held, &mut scratch).unwrap();
        assert_eq!(held, vec![1.25; 300]);
    }
}
