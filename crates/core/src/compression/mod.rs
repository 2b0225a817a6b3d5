//! What crosses the link: the codecs of a run's pushes (gradients) and pulls (weights), part
//! of the run plan so both ends agree. Pure functions over buffers; the network layer calls
//! them. Every decoder checks its input as hostile: lengths, counts and indices.
//!
//! Pushes:
//! - `fp32`: the values as they are (4 bytes each);
//! - `bf16`: the upper half of each float, rounded to nearest even (2 bytes; bf16 keeps
//!   f32's exponent range, so nothing finite overflows to Inf: the largest values are kept
//!   at bf16's largest finite value);
//! - `int8`: stochastic rounding to 8 bits with a scale per block of 256 values (1 byte
//!   plus 4 per block), unbiased: the expected decoded value is the value sent;
//! - `topk:P`: the P per mille of values largest in magnitude, as gaps between their
//!   indices (varints) and int8 values with a scale per 64, about 2 bytes each before the
//!   entropy stage (see `sparse`, `entropy`), with error feedback: what was not sent (and
//!   what the rounding left out) is added to the next gradient, so every coordinate's
//!   updates arrive in the end.
//!
//! Pulls: `fp32` or `bf16` (the weights rounded on the way; the shard's own stay f32), or
//! a delta from what the worker holds (`delta-int8`, `delta-topk:P`, `delta-ternary`: -1, 0 or
//! +1 a value and a scale per block; see `pull_delta`), or `replay`: the shard's updates as
//! their pushes arrived, made again on the worker (the `replay` and `update_log` modules).

mod auto;
mod coded_share;
mod entropy;
#[cfg(test)]
mod hand_written;
mod ladder;
mod names;
mod pull_delta;
mod replaying_peers;
mod sampled_threshold;
mod sparse;
mod values;
mod wire_tag;

use crate::rng::Rng;
pub use auto::AutoCodec;
pub use ladder::{auto_allows_pull, auto_allows_push, Rung, AUTO_LADDER, REPLAY_LADDER};
pub use pull_delta::PullReplica;
pub use replaying_peers::ReplayingPeers;
use sparse::TopK;
use thiserror::Error;
use values::{decode_bf16, decode_f32, decode_int8, encode_bf16, encode_f32, encode_int8};
pub use values::{from_bf16, to_bf16};
pub use wire_tag::CodecPair;

/// Values per int8 block (each block carries its own scale).
pub const INT8_BLOCK: usize = 256;
/// Values per ternary block (`delta-ternary`; each block carries its scale).
pub const TERNARY_BLOCK: usize = 256;
/// The largest top-k fraction, per mille: above it a top-k payload may outgrow fp32's.
pub const TOPK_MAX_PER_MILLE: u16 = 500;

#[derive(Debug, Error, PartialEq, Eq)]
pub enum CodecError {
    #[error("{codec} payload of {got} bytes for {values} values (expected {expected})")]
    Length {
        codec: &'static str,
        values: usize,
        got: usize,
        expected: usize,
    },
    #[error("top-k payload names {count} values, more than the {most} its codec sends")]
    Count { count: u64, most: usize },
    #[error("top-k index {index} is out of range ({values} values)")]
    Index { index: u64, values: usize },
    #[error("top-k index gap at byte {at} of its gaps is cut short or does not fit 32 bits")]
    Varint { at: usize },
    #[error("ternary block {block} has a scale that is not a finite, non-negative number")]
    Scale { block: usize },
    #[error("ternary byte at {at} does not hold base-3 digits for its values")]
    Digits { at: usize },
    #[error("{codec} payload's entropy-coded section refused: {reason}")]
    Section {
        codec: &'static str,
        reason: &'static str,
    },
    #[error("unknown codec `{0}` (pushes: fp32, bf16, int8, topk:PER_MILLE; pulls: fp32, bf16, delta-int8, delta-topk:PER_MILLE, delta-ternary, replay)")]
    Unknown(String),
    #[error("top-k per mille must be 1..={TOPK_MAX_PER_MILLE}, not {0}")]
    PerMille(String),
}

/// How a worker's gradients cross the link.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum PushCodec {
    #[default]
    Fp32,
    Bf16,
    Int8,
    /// The `per_mille` / 1000 largest values, with error feedback on the worker.
    TopK {
        per_mille: u16,
    },
}

/// How the weights cross the link to a worker.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum PullCodec {
    #[default]
    Fp32,
    Bf16,
    /// The difference from what the worker holds, int8 with a scale per block; a whole
    /// slice (the first, or after a reconnect) goes as fp32.
    DeltaInt8,
    /// The `per_mille` / 1000 largest values of that difference.
    DeltaTopK {
        per_mille: u16,
    },
    /// That difference as -1, 0 or +1 times a scale per block (its largest magnitude), 1.6
    /// bits a value: no weight of the worker's lags the shard's by more than what moved since
    /// the last pull.
    DeltaTernary,
    /// The shard's updates since the version the worker holds, made again by the worker
    /// (exact weights); a whole slice goes with the optimizer's state.
    Replay,
}

/// What a worker keeps between pushes of one slice: the error-feedback residual (top-k) and
/// the random stream of stochastic rounding (int8).
#[derive(Debug, Clone)]
pub struct PushEncoder {
    codec: PushCodec,
    residual: Vec<f32>,
    rng: Rng,
    top: TopK,
}

impl PushEncoder {
    pub fn new(codec: PushCodec, seed: u64) -> Self {
        PushEncoder {
            codec,
            residual: Vec::new(),
            rng: Rng::new(seed),
            top: TopK::default(),
        }
    }

    pub fn codec(&self) -> PushCodec {
        self.codec
    }

    /// What was not sent yet (top-k), for tests and metrics.
    pub fn residual(&self) -> &[f32] {
        &self.residual
    }

    /// Pushes from now on with `codec` (`auto`'s choice). What top-k left out is kept and
    /// goes with the next push, whatever its codec.
    pub fn set_codec(&mut self, codec: PushCodec) {
        self.codec = codec;
    }

    /// Whether a push is its values as they are (fp32 with nothing held back), so the
    /// caller may send them without encoding.
    pub fn passes_through(&self) -> bool {
        self.codec == PushCodec::Fp32 && self.residual.is_empty()
    }

    /// Encodes `values` into `out` (cleared first).
    pub fn encode(&mut self, values: &[f32], out: &mut Vec<u8>) {
        out.clear();
        if let PushCodec::TopK { per_mille } = self.codec {
            return self.encode_top_k(values, per_mille, out);
        }
        if self.residual.len() == values.len() {
            // Moved off top-k: what it held back goes now.
            let mut merged = std::mem::take(&mut self.residual);
            for (m, v) in merged.iter_mut().zip(values) {
                *m += v;
            }
            self.encode_dense(&merged, out);
        } else {
            self.residual.clear();
            self.encode_dense(values, out);
        }
    }

    fn encode_dense(&mut self, values: &[f32], out: &mut Vec<u8>) {
        match self.codec {
            PushCodec::Bf16 => encode_bf16(values, out),
            PushCodec::Int8 => encode_int8(values, &mut self.rng, out),
            _ => encode_f32(values, out),
        }
    }

    fn encode_top_k(&mut self, values: &[f32], per_mille: u16, out: &mut Vec<u8>) {
        let n = values.len();
        if self.residual.len() != n {
            self.residual = vec![0.0; n];
        }
        // The gradient with what earlier pushes left out.
        let k = top_k_count(n, per_mille);
        self.top.add_and_select(&mut self.residual, values, k);
        self.top.encode(&self.residual, out);
        for (&i, arrives) in self.top.idx.iter().zip(&self.top.sent) {
            let r = &mut self.residual[i as usize];
            // What its rounding left out waits for the next push. A NaN or infinite value
            // is sent (the shard refuses the push) and not kept.
            *r = if r.is_finite() { *r - arrives } else { 0.0 };
        }
    }
}

/// How many values a top-k push of `n` values sends.
pub fn top_k_count(n: usize, per_mille: u16) -> usize {
    if n == 0 {
        return 0;
    }
    (n * per_mille as usize).div_ceil(1000).clamp(1, n)
}

impl PushCodec {
    /// A top-k codec, if `per_mille` is in range.
    pub fn top_k(per_mille: u16) -> Option<PushCodec> {
        (1..=TOPK_MAX_PER_MILLE)
            .contains(&per_mille)
            .then_some(PushCodec::TopK { per_mille })
    }

    /// Whether a push carries error-fed sums (top-k): a value sent holds every step's
    /// gradient since it was last sent, a zero was not sent.
    pub fn accumulates(&self) -> bool {
        matches!(self, PushCodec::TopK { .. })
    }

    /// The largest push of `n` values (its exact size for the dense codecs).
    pub fn max_len(&self, n: usize) -> usize {
        match self {
            PushCodec::TopK { per_mille } => sparse::max_len(top_k_count(n, *per_mille)),
            _ => self.typical_len(n),
        }
    }

    /// The size of a usual push of `n` values, for pricing a codec (exact for the dense
    /// codecs; for top-k, with its kept values spread over the slice).
    pub fn typical_len(&self, n: usize) -> usize {
        match self {
            PushCodec::Fp32 => 4 * n,
            PushCodec::Bf16 => 2 * n,
            PushCodec::Int8 => n + 4 * n.div_ceil(INT8_BLOCK),
            PushCodec::TopK { per_mille } => sparse::typical_len(top_k_count(n, *per_mille), n),
        }
    }

    /// Decodes a push of `out.len()` values, checking it as hostile input.
    pub fn decode(&self, bytes: &[u8], out: &mut [f32]) -> Result<(), CodecError> {
        let n = out.len();
        match self {
            PushCodec::TopK { per_mille } => sparse::decode(bytes, top_k_count(n, *per_mille), out),
            _ => {
                let expected = self.max_len(n);
                if bytes.len() != expected {
                    return Err(CodecError::Length {
                        codec: self.name(),
                        values: n,
                        got: bytes.len(),
                        expected,
                    });
                }
                match self {
                    PushCodec::Fp32 => decode_f32(bytes, out),
                    PushCodec::Bf16 => decode_bf16(bytes, out),
                    _ => decode_int8(bytes, out),
                }
                Ok(())
            }
        }
    }

    fn name(&self) -> &'static str {
        match self {
            PushCodec::Fp32 => "fp32",
            PushCodec::Bf16 => "bf16",
            PushCodec::Int8 => "int8",
            PushCodec::TopK { .. } => "top-k",
        }
    }
}

impl PullCodec {
    /// A delta top-k codec, if `per_mille` is in range.
    pub fn delta_top_k(per_mille: u16) -> Option<PullCodec> {
        (1..=TOPK_MAX_PER_MILLE)
            .contains(&per_mille)
            .then_some(PullCodec::DeltaTopK { per_mille })
    }

    /// Whether the shard sends differences from what each worker holds.
    pub fn is_delta(&self) -> bool {
        matches!(
            self,
            PullCodec::DeltaInt8 | PullCodec::DeltaTopK { .. } | PullCodec::DeltaTernary
        )
    }

    /// The exact size of a whole pull of `n` values (fp32 under a delta codec).
    pub fn encoded_len(&self, n: usize) -> usize {
        match self {
            PullCodec::Bf16 => 2 * n,
            _ => 4 * n,
        }
    }

    /// The largest size of a delta of `n` values (0 for a codec without deltas).
    pub fn delta_len(&self, n: usize) -> usize {
        match self {
            PullCodec::DeltaInt8 => PushCodec::Int8.max_len(n),
            PullCodec::DeltaTopK { per_mille } => sparse::max_len(top_k_count(n, *per_mille)),
            PullCodec::DeltaTernary => values::ternary_len(n),
            _ => 0,
        }
    }

    /// The size of a usual delta of `n` values, for pricing a codec.
    pub fn typical_delta_len(&self, n: usize) -> usize {
        match self {
            PullCodec::DeltaTopK { per_mille } => {
                sparse::typical_len(top_k_count(n, *per_mille), n)
            }
            _ => self.delta_len(n),
        }
    }

    /// Encodes a whole slice (a delta codec's as fp32).
    pub fn encode(&self, values: &[f32], out: &mut Vec<u8>) {
        out.clear();
        match self {
            PullCodec::Bf16 => encode_bf16(values, out),
            _ => encode_f32(values, out),
        }
    }

    /// Decodes a whole slice, checking its length.
    pub fn decode(&self, bytes: &[u8], out: &mut [f32]) -> Result<(), CodecError> {
        let expected = self.encoded_len(out.len());
        if bytes.len() != expected {
            return Err(CodecError::Length {
                codec: if *self == PullCodec::Bf16 {
                    "bf16"
                } else {
                    "fp32"
                },
                values: out.len(),
                got: bytes.len(),
                expected,
            });
        }
        match self {
            PullCodec::Bf16 => decode_bf16(bytes, out),
            _ => decode_f32(bytes, out),
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests;
