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
//! - `topk:P`: the P per mille of values largest in magnitude, as (index, value) pairs (8
//!   bytes each), with error feedback: what was not sent is added to the next gradient, so
//!   every coordinate's updates arrive in the end.
//!
//! Pulls: `fp32` or `bf16` (the weights rounded on the way; the shard's own stay f32).

use crate::rng::Rng;
use std::fmt;
use std::str::FromStr;
use thiserror::Error;

/// Values per int8 block (each block carries its own scale).
pub const INT8_BLOCK: usize = 256;
/// The largest top-k fraction, per mille: above it (index, value) pairs outgrow fp32.
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
    #[error("top-k payload names {count} values, more than the {values} it carries for")]
    Count { count: u64, values: usize },
    #[error("top-k index {index} is out of range or not after the previous one ({values} values)")]
    Index { index: u32, values: usize },
    #[error("unknown codec `{0}` (fp32, bf16, int8, topk:PER_MILLE)")]
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
}

impl fmt::Display for PushCodec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PushCodec::Fp32 => f.write_str("fp32"),
            PushCodec::Bf16 => f.write_str("bf16"),
            PushCodec::Int8 => f.write_str("int8"),
            PushCodec::TopK { per_mille } => write!(f, "topk:{per_mille}"),
        }
    }
}

impl fmt::Display for PullCodec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            PullCodec::Fp32 => "fp32",
            PullCodec::Bf16 => "bf16",
        })
    }
}

impl FromStr for PushCodec {
    type Err = CodecError;
    fn from_str(s: &str) -> Result<Self, CodecError> {
        match s {
            "fp32" => Ok(PushCodec::Fp32),
            "bf16" => Ok(PushCodec::Bf16),
            "int8" => Ok(PushCodec::Int8),
            _ => {
                let Some(p) = s.strip_prefix("topk:") else {
                    return Err(CodecError::Unknown(s.into()));
                };
                let per_mille: u16 = p.parse().map_err(|_| CodecError::PerMille(p.into()))?;
                PushCodec::top_k(per_mille).ok_or_else(|| CodecError::PerMille(p.into()))
            }
        }
    }
}

impl FromStr for PullCodec {
    type Err = CodecError;
    fn from_str(s: &str) -> Result<Self, CodecError> {
        match s {
            "fp32" => Ok(PullCodec::Fp32),
            "bf16" => Ok(PullCodec::Bf16),
            _ => Err(CodecError::Unknown(s.into())),
        }
    }
}

/// What a worker keeps between pushes of one slice: the error-feedback residual (top-k) and
/// the random stream of stochastic rounding (int8).
#[derive(Debug, Clone)]
pub struct PushEncoder {
    codec: PushCodec,
    residual: Vec<f32>,
    rng: Rng,
    scratch: Vec<u32>,
}

impl PushEncoder {
    pub fn new(codec: PushCodec, seed: u64) -> Self {
        PushEncoder {
            codec,
            residual: Vec::new(),
            rng: Rng::new(seed),
            scratch: Vec::new(),
        }
    }

    pub fn codec(&self) -> PushCodec {
        self.codec
    }

    /// What was not sent yet (top-k), for tests and metrics.
    pub fn residual(&self) -> &[f32] {
        &self.residual
    }

    /// Encodes `values` into `out` (cleared first).
    pub fn encode(&mut self, values: &[f32], out: &mut Vec<u8>) {
        out.clear();
        match self.codec {
            PushCodec::Fp32 => encode_f32(values, out),
            PushCodec::Bf16 => encode_bf16(values, out),
            PushCodec::Int8 => encode_int8(values, &mut self.rng, out),
            PushCodec::TopK { per_mille } => self.encode_top_k(values, per_mille, out),
        }
    }

    fn encode_top_k(&mut self, values: &[f32], per_mille: u16, out: &mut Vec<u8>) {
        let n = values.len();
        if self.residual.len() != n {
            self.residual = vec![0.0; n];
        }
        // The gradient with what earlier pushes left out.
        for (r, v) in self.residual.iter_mut().zip(values) {
            *r += v;
        }
        let k = top_k_count(n, per_mille);
        let acc = &self.residual;
        let idx = &mut self.scratch;
        idx.clear();
        idx.extend(0..n as u32);
        // NaN counts as largest, so a bad gradient is sent (and refused) rather than hidden.
        let magnitude = |i: &u32| {
            let v = acc[*i as usize].abs();
            if v.is_nan() {
                f32::INFINITY
            } else {
                v
            }
        };
        if k < n {
            idx.select_nth_unstable_by(k, |a, b| magnitude(b).total_cmp(&magnitude(a)));
            idx.truncate(k);
        }
        idx.sort_unstable();
        out.extend_from_slice(&(k as u32).to_le_bytes());
        for &i in idx.iter() {
            let v = &mut self.residual[i as usize];
            out.extend_from_slice(&i.to_le_bytes());
            out.extend_from_slice(&v.to_le_bytes());
            *v = 0.0;
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

    /// The exact size of a push of `n` values.
    pub fn encoded_len(&self, n: usize) -> usize {
        match self {
            PushCodec::Fp32 => 4 * n,
            PushCodec::Bf16 => 2 * n,
            PushCodec::Int8 => n + 4 * n.div_ceil(INT8_BLOCK),
            PushCodec::TopK { per_mille } => 4 + 8 * top_k_count(n, *per_mille),
        }
    }

    /// Decodes a push of `out.len()` values, checking it as hostile input.
    pub fn decode(&self, bytes: &[u8], out: &mut [f32]) -> Result<(), CodecError> {
        let n = out.len();
        match self {
            PushCodec::TopK { .. } => decode_top_k(bytes, out),
            _ => {
                let expected = self.encoded_len(n);
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
    /// The exact size of a pull of `n` values.
    pub fn encoded_len(&self, n: usize) -> usize {
        match self {
            PullCodec::Fp32 => 4 * n,
            PullCodec::Bf16 => 2 * n,
        }
    }

    pub fn encode(&self, values: &[f32], out: &mut Vec<u8>) {
        out.clear();
        match self {
            PullCodec::Fp32 => encode_f32(values, out),
            PullCodec::Bf16 => encode_bf16(values, out),
        }
    }

    pub fn decode(&self, bytes: &[u8], out: &mut [f32]) -> Result<(), CodecError> {
        let expected = self.encoded_len(out.len());
        if bytes.len() != expected {
            return Err(CodecError::Length {
                codec: if *self == PullCodec::Fp32 {
                    "fp32"
                } else {
                    "bf16"
                },
                values: out.len(),
                got: bytes.len(),
                expected,
            });
        }
        match self {
            PullCodec::Fp32 => decode_f32(bytes, out),
            PullCodec::Bf16 => decode_bf16(bytes, out),
        }
        Ok(())
    }
}

fn encode_f32(values: &[f32], out: &mut Vec<u8>) {
    out.reserve(4 * values.len());
    for v in values {
        out.extend_from_slice(&v.to_le_bytes());
    }
}

fn decode_f32(bytes: &[u8], out: &mut [f32]) {
    for (o, b) in out.iter_mut().zip(bytes.chunks_exact(4)) {
        *o = f32::from_le_bytes([b[0], b[1], b[2], b[3]]);
    }
}

/// `v` as bf16 bits: rounded to nearest even; NaN stays NaN; a finite value never becomes
/// infinite (the largest round down to bf16's largest finite value).
pub fn to_bf16(v: f32) -> u16 {
    let bits = v.to_bits();
    if v.is_nan() {
        return ((bits >> 16) as u16) | 0x0040;
    }
    let rounded = bits.wrapping_add(0x7fff + ((bits >> 16) & 1));
    let half = (rounded >> 16) as u16;
    if v.is_finite() && half & 0x7fff == 0x7f80 {
        // Rounded up to infinity: keep the largest finite value of the same sign.
        return (half & 0x8000) | 0x7f7f;
    }
    half
}

pub fn from_bf16(h: u16) -> f32 {
    f32::from_bits((h as u32) << 16)
}

fn encode_bf16(values: &[f32], out: &mut Vec<u8>) {
    out.reserve(2 * values.len());
    for &v in values {
        out.extend_from_slice(&to_bf16(v).to_le_bytes());
    }
}

fn decode_bf16(bytes: &[u8], out: &mut [f32]) {
    for (o, b) in out.iter_mut().zip(bytes.chunks_exact(2)) {
        *o = from_bf16(u16::from_le_bytes([b[0], b[1]]));
    }
}

fn encode_int8(values: &[f32], rng: &mut Rng, out: &mut Vec<u8>) {
    out.reserve(values.len() + 4 * values.len().div_ceil(INT8_BLOCK));
    for block in values.chunks(INT8_BLOCK) {
        let mut largest = 0.0f32;
        let mut finite = true;
        for v in block {
            finite &= v.is_finite();
            largest = largest.max(v.abs());
        }
        // A block holding NaN/Inf gets a NaN scale: it decodes to NaN and is refused.
        let scale = if !finite {
            f32::NAN
        } else if largest == 0.0 {
            0.0
        } else {
            largest / 127.0
        };
        out.extend_from_slice(&scale.to_le_bytes());
        for &v in block {
            let q = if scale > 0.0 {
                // floor(x + u), u uniform in [0, 1): unbiased, E = x.
                (v / scale + rng.next_f32()).floor().clamp(-127.0, 127.0) as i8
            } else {
                0
            };
            out.push(q as u8);
        }
    }
}

fn decode_int8(bytes: &[u8], out: &mut [f32]) {
    let mut at = 0;
    for block in out.chunks_mut(INT8_BLOCK) {
        let scale = f32::from_le_bytes([bytes[at], bytes[at + 1], bytes[at + 2], bytes[at + 3]]);
        at += 4;
        for o in block.iter_mut() {
            *o = (bytes[at] as i8) as f32 * scale;
            at += 1;
        }
    }
}

fn decode_top_k(bytes: &[u8], out: &mut [f32]) -> Result<(), CodecError> {
    let n = out.len();
    let Some(head) = bytes.get(..4) else {
        return Err(CodecError::Length {
            codec: "top-k",
            values: n,
            got: bytes.len(),
            expected: 4,
        });
    };
    let count = u32::from_le_bytes([head[0], head[1], head[2], head[3]]) as u64;
    if count > n as u64 {
        return Err(CodecError::Count { count, values: n });
    }
    let expected = 4 + 8 * count as usize;
    if bytes.len() != expected {
        return Err(CodecError::Length {
            codec: "top-k",
            values: n,
            got: bytes.len(),
            expected,
        });
    }
    out.fill(0.0);
    let mut next = 0u64;
    for pair in bytes[4..].chunks_exact(8) {
        let index = u32::from_le_bytes([pair[0], pair[1], pair[2], pair[3]]);
        if (index as u64) < next || index as usize >= n {
            return Err(CodecError::Index { index, values: n });
        }
        next = index as u64 + 1;
        out[index as usize] = f32::from_le_bytes([pair[4], pair[5], pair[6], pair[7]]);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn gradient(n: usize, seed: u64) -> Vec<f32> {
        let mut rng = Rng::new(seed);
        (0..n).map(|_| rng.uniform(-1.0, 1.0) * 1e-2).collect()
    }

    fn round_trip(codec: PushCodec, values: &[f32], enc: &mut PushEncoder) -> Vec<f32> {
        let mut bytes = Vec::new();
        enc.encode(values, &mut bytes);
        assert_eq!(bytes.len(), codec.encoded_len(values.len()), "{codec}");
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
        assert!(smallest_sent >= largest_kept);
        // Sent plus residual is exactly the gradient (error feedback loses nothing).
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
        let codec = PushCodec::TopK { per_mille: 100 };
        let pair = |i: u32, v: f32| [i.to_le_bytes(), v.to_le_bytes()].concat();
        let with = |count: u32, pairs: &[Vec<u8>]| {
            let mut b = count.to_le_bytes().to_vec();
            for p in pairs {
                b.extend_from_slice(p);
            }
            b
        };
        assert!(codec
            .decode(&with(2, &[pair(1, 1.0), pair(3, 2.0)]), &mut out)
            .is_ok());
        assert_eq!(out[3], 2.0);
        let repeated = with(2, &[pair(3, 1.0), pair(3, 2.0)]);
        assert!(matches!(
            codec.decode(&repeated, &mut out),
            Err(CodecError::Index { .. })
        ));
        let unordered = with(2, &[pair(4, 1.0), pair(3, 2.0)]);
        assert!(codec.decode(&unordered, &mut out).is_err());
        let beyond = with(1, &[pair(10, 1.0)]);
        assert!(codec.decode(&beyond, &mut out).is_err());
        let too_many = with(11, &[]);
        assert!(matches!(
            codec.decode(&too_many, &mut out),
            Err(CodecError::Count { .. })
        ));
        let short = with(2, &[pair(1, 1.0)]);
        assert!(matches!(
            codec.decode(&short, &mut out),
            Err(CodecError::Length { .. })
        ));
        assert!(codec.decode(&[1, 0], &mut out).is_err());
        for c in [PushCodec::Fp32, PushCodec::Bf16, PushCodec::Int8] {
            let bytes = vec![0u8; c.encoded_len(10) + 1];
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
}
