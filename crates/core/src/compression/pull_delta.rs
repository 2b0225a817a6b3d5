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
//! `delta-ternary` (1.6 bits a weight, less once entropy-coded) moves every weight that is
//! half its block's largest difference behind, so no weight of the worker's lags by more
//! than what moved since.

use super::sparse::{self, TopK};
use super::values::{add_ternary, decode_int8, encode_int8, encode_ternary_delta, read_ternary};
use super::{top_k_count, CodecError, PullCodec};
use crate::rng::Rng;

/// How a worker came by the version it holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Held {
    /// Sent whole or as differences: `PullReplica::values` are its weights.
    Values(u64),
    /// Made by replay pulls: no values kept, so no difference can be taken from them (a
    /// codec changed under `auto` starts whole).
    Replayed(u64),
}

/// The shard's copy of what one worker holds of its slice.
#[derive(Debug, Clone)]
pub struct PullReplica {
    /// Whether the run sends differences at all (else nothing is kept).
    tracks: bool,
    /// The version the worker holds, once it was sent a whole slice (or replays) on this
    /// connection, and how it came by it.
    held: Option<Held>,
    values: Vec<f32>,
    diff: Vec<f32>,
    /// A ternary difference's digit bytes before their entropy coding.
    digits: Vec<u8>,
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
            digits: Vec::new(),
            rng: Rng::new(seed),
            top: TopK::default(),
        }
    }

    /// Whether a worker that says it holds `version` can be sent a difference in `codec`:
    /// the codec sends them, and this connection sent it exactly that version.
    pub fn can_send_delta(&self, codec: PullCodec, version: u64) -> bool {
        codec.is_delta() && self.held == Some(Held::Values(version))
    }

    /// A whole slice of `version` was sent as fp32: the worker now holds exactly `weights`.
    pub fn sent_whole(&mut self, version: u64, weights: &[f32]) {
        if !self.tracks {
            return;
        }
        self.values.clear();
        self.values.extend_from_slice(weights);
        self.held = Some(Held::Values(version));
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
            if encode_ternary_delta(weights, &mut self.values, &mut self.digits, out) {
                self.held = Some(Held::Values(version));
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
        self.held = Some(Held::Values(version));
    }

    /// The worker was sent something this replica does not follow (bf16 or fp32 weights
    /// outside a delta codec): it no longer holds a known slice, and the memory goes.
    pub fn forget(&mut self) {
        if self.held.take().is_some() {
            self.values = Vec::new();
            self.diff = Vec::new();
            self.digits = Vec::new();
        }
    }

    /// The version this connection's replay pulls brought its worker to, if its last pull
    /// was one (after any other, the worker's copy of the optimizer is not the shard's).
    pub fn replayed(&self) -> Option<u64> {
        match self.held {
            Some(Held::Replayed(version)) => Some(version),
            _ => None,
        }
    }

    /// A replay pull brought the worker to `version` (no slice is kept: the worker makes
    /// the shard's updates itself).
    pub fn sent_replay(&mut self, version: u64) {
        self.forget();
        self.held = Some(Held::Replayed(version));
    }

    /// Whether it knows what its worker holds (a worker's memory on the shard: one slice
    /// while it does, under a delta codec).
    pub fn holds(&self) -> bool {
        self.held.is_some()
    }
}

impl PullCodec {
    /// Whether every pull moves every weight of the worker's copy towards the shard's (all
    /// but top-k differences, which move only the largest and leave the rest behind).
    pub fn moves_every_weight(&self) -> bool {
        !matches!(self, PullCodec::DeltaTopK { .. })
    }

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
            let mut digits = Vec::new();
            let scales = read_ternary(bytes, held.len(), &mut digits)?;
            add_ternary(scales, &digits, held);
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
#[path = "pull_delta_tests.rs"]
mod tests;
