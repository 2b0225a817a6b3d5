//! Pulls as differences from what a worker holds. For as long as a worker's connection lasts,
//! the shard keeps a replica of the slice that worker holds: the whole slice it was sent
//! first, plus every decoded difference since. A pull sends `weights - replica`, compressed,
//! and adds the decoded difference to the replica exactly as the worker adds it to its buffer,
//! so the two stay bit for bit equal and whatever the compression left out is still in the
//! next difference (the shard's error feedback, one per worker). Memory: one slice per worker
//! connection.

use super::sparse::{self, TopK};
use super::values::{decode_int8, encode_int8};
use super::{top_k_count, CodecError, PullCodec, PushCodec};
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
        scratch.clear();
        scratch.resize(held.len(), 0.0);
        match self {
            PullCodec::DeltaTopK { per_mille } => {
                sparse::decode(bytes, top_k_count(held.len(), *per_mille), scratch)?
            }
            _ => {
                let expected = PushCodec::Int8.max_len(held.len());
                if bytes.len() != expected {
                    return Err(CodecError::Length {
                        codec: "delta-int8",
                        values: held.len(),
                        got: bytes.len(),
                        expected,
                    });
                }
                decode_int8(bytes, scratch);
            }
        }
        for (h, d) in held.iter_mut().zip(scratch.iter()) {
            *h += d;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Weights that move a little at every version, as training moves them.
    fn weights_at(version: u64, n: usize) -> Vec<f32> {
        let mut rng = Rng::new(version);
        (0..n)
            .map(|i| (i as f32 * 0.01).sin() + 1e-3 * version as f32 * rng.uniform(-1.0, 1.0))
            .collect()
    }

    #[test]
    fn names_round_trip_and_bad_ones_are_refused() {
        for c in ["delta-int8", "delta-topk:20", "delta-topk:500"] {
            assert_eq!(c.parse::<PullCodec>().unwrap().to_string(), c);
        }
        for bad in [
            "delta-topk:0",
            "delta-topk:501",
            "delta",
            "delta-int4",
            "topk:10",
        ] {
            assert!(bad.parse::<PullCodec>().is_err(), "{bad}");
        }
    }

    #[test]
    fn the_worker_holds_exactly_the_replica_and_catches_up_with_the_weights() {
        let n = 1000;
        for codec in [PullCodec::DeltaInt8, PullCodec::DeltaTopK { per_mille: 50 }] {
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
        assert_eq!(held, vec![1.0; 300], "nothing applied");
    }
}
