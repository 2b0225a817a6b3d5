//! The dense element encodings behind the codecs: f32 and bf16 values, int8 blocks with a
//! scale each (stochastic rounding), and ternary digits with a scale per block. Their callers
//! check a payload's length first.

use super::entropy::{decode_section, encode_section, max_section_len};
use super::{CodecError, INT8_BLOCK, TERNARY_BLOCK};
use crate::gradient_scan::largest_magnitude_bits;
use crate::rng::Rng;

pub(super) fn encode_f32(values: &[f32], out: &mut Vec<u8>) {
    out.reserve(4 * values.len());
    for v in values {
        out.extend_from_slice(&v.to_le_bytes());
    }
}

pub(super) fn decode_f32(bytes: &[u8], out: &mut [f32]) {
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

pub(super) fn encode_bf16(values: &[f32], out: &mut Vec<u8>) {
    out.reserve(2 * values.len());
    for &v in values {
        out.extend_from_slice(&to_bf16(v).to_le_bytes());
    }
}

pub(super) fn decode_bf16(bytes: &[u8], out: &mut [f32]) {
    for (o, b) in out.iter_mut().zip(bytes.chunks_exact(2)) {
        *o = from_bf16(u16::from_le_bytes([b[0], b[1]]));
    }
}

/// The scale of an int8 block: its largest magnitude over 127 (0 for all zeros). A block
/// holding NaN/Inf gets a NaN scale: it decodes to NaN and is refused.
pub(super) fn int8_scale(block: &[f32]) -> f32 {
    magnitude_or_nan(largest_magnitude_bits(block)) / 127.0
}

/// The magnitude a largest `|v|`'s bits (sign cleared) stand for, or NaN where they are past
/// every finite value's (the block holds NaN/Inf): one rule for int8 and ternary scales.
fn magnitude_or_nan(bits: u32) -> f32 {
    if bits < f32::INFINITY.to_bits() {
        f32::from_bits(bits)
    } else {
        f32::NAN
    }
}

pub(super) fn encode_int8(values: &[f32], rng: &mut Rng, out: &mut Vec<u8>) {
    out.reserve(values.len() + 4 * values.len().div_ceil(INT8_BLOCK));
    for block in values.chunks(INT8_BLOCK) {
        let scale = int8_scale(block);
        out.extend_from_slice(&scale.to_le_bytes());
        // Zero (all zeros) or NaN (a bad block): the values carry nothing.
        if scale.is_nan() || scale == 0.0 {
            out.extend(std::iter::repeat_n(0u8, block.len()));
            continue;
        }
        // Two 24-bit uniforms from each draw.
        for pair in block.chunks(2) {
            let r = rng.next_u64();
            let uniforms = [(r >> 40) as f32, ((r >> 16) & 0xff_ffff) as f32];
            for (&v, u) in pair.iter().zip(uniforms) {
                // floor(x + u), u uniform in [0, 1): unbiased, E = x. x + u + 128 lies in
                // [1, 256), where truncating is flooring (no libm floor call per value).
                // (A division, not a product with 1/scale: a subnormal scale's inverse is
                // infinite.)
                let shifted = v / scale + u * UNIFORM_24 + 128.0;
                let q = (shifted as i32 - 128).clamp(-127, 127);
                out.push(q as i8 as u8);
            }
        }
    }
}

/// 2^-24: a 24-bit integer times this is uniform in [0, 1).
const UNIFORM_24: f32 = 1.0 / (1u32 << 24) as f32;

pub(super) fn decode_int8(bytes: &[u8], out: &mut [f32]) {
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

/// Ternary digits packed per byte (3^5 = 243 <= 256).
const TRITS_PER_BYTE: usize = 5;
/// Bytes of a block's scale.
const SCALE_LEN: usize = 4;

/// Bytes of the digits of `n` values, five to a byte within each block.
fn digit_len(n: usize) -> usize {
    let (whole, rest) = (n / TERNARY_BLOCK, n % TERNARY_BLOCK);
    whole * TERNARY_BLOCK.div_ceil(TRITS_PER_BYTE) + rest.div_ceil(TRITS_PER_BYTE)
}

/// The largest size of `n` values as ternary blocks: a 4-byte scale per block of
/// `TERNARY_BLOCK`, then the digits as a section stored as they are (1.6 bits a value).
pub(super) fn ternary_len(n: usize) -> usize {
    SCALE_LEN * n.div_ceil(TERNARY_BLOCK) + max_section_len(digit_len(n))
}

/// Ternary blocks: per block, a scale (its largest magnitude, f32) and per value a digit of
/// -1, 0 or +1 (five to a byte, base 3, the first value lowest). A value decodes to `digit *
/// scale`: the value's sign times the scale where its magnitude is at least half the scale,
/// else 0. So what is left out of every value is at most half its block's largest magnitude:
/// fed back into the next difference, no value lags by more than what moved since. On the
/// wire every block's scale comes first, then all the digit bytes as one entropy-coded
/// section (`entropy`): most digits of a difference are 0, so most bytes are too.
///
/// Leaves in `values` what the decoder will make of them (a sender follows its receiver
/// without decoding) and returns whether the decoder will take them: a block holding NaN/Inf
/// gets a scale that is not finite, which it refuses.
#[cfg(test)]
pub(super) fn encode_ternary(values: &mut [f32], out: &mut Vec<u8>) -> bool {
    out.reserve(ternary_len(values.len()));
    let (mut block_digits, mut digits) = ([0u8; TERNARY_BLOCK], Vec::new());
    let mut decodable = true;
    for block in values.chunks_mut(TERNARY_BLOCK) {
        decodable &= encode_ternary_block(block, &mut block_digits, out, &mut digits);
    }
    encode_section(&digits, out);
    decodable
}

/// `encode_ternary` of `weights - replica`, adding to `replica` what the decoder will make of
/// it, in one pass a block at a time (the block stays in cache from its difference to the
/// replica's update); `digits` is scratch. Where it returns false the replica took what was
/// decodable of the blocks: the caller forgets it.
pub(super) fn encode_ternary_delta(
    weights: &[f32],
    replica: &mut [f32],
    digits: &mut Vec<u8>,
    out: &mut Vec<u8>,
) -> bool {
    out.reserve(ternary_len(weights.len()));
    digits.clear();
    digits.reserve(digit_len(weights.len()));
    let (mut diff, mut block_digits) = ([0.0; TERNARY_BLOCK], [0u8; TERNARY_BLOCK]);
    let mut decodable = true;
    for (w, r) in weights
        .chunks(TERNARY_BLOCK)
        .zip(replica.chunks_mut(TERNARY_BLOCK))
    {
        let diff = &mut diff[..w.len()];
        for ((d, w), r) in diff.iter_mut().zip(w).zip(r.iter()) {
            *d = w - r;
        }
        decodable &= encode_ternary_block(diff, &mut block_digits, out, digits);
        for (r, d) in r.iter_mut().zip(diff.iter()) {
            *r += d;
        }
    }
    encode_section(digits, out);
    decodable
}

/// One block of `encode_ternary` (at most `TERNARY_BLOCK` values): its scale appended to
/// `scales`, its digit bytes to `digit_bytes`.
fn encode_ternary_block(
    block: &mut [f32],
    digits: &mut [u8; TERNARY_BLOCK],
    scales: &mut Vec<u8>,
    digit_bytes: &mut Vec<u8>,
) -> bool {
    let scale = magnitude_or_nan(largest_magnitude_bits(block));
    scales.extend_from_slice(&scale.to_le_bytes());
    let digits = &mut digits[..block.len()];
    if scale == 0.0 {
        digits.fill(0);
        block.fill(0.0);
    } else {
        // Without branches, so that the loop runs on vector lanes: a value at least half
        // the scale is +1, at most minus half -1, and it becomes what the decoder makes of
        // its digit (the same product, bit for bit: a sign times the scale).
        let half = 0.5 * scale;
        for (d, v) in digits.iter_mut().zip(block.iter_mut()) {
            let (up, down) = (*v >= half, *v <= -half);
            *d = u8::from(up) + 2 * u8::from(down);
            *v = (f32::from(u8::from(up)) - f32::from(u8::from(down))) * scale;
        }
    }
    let fold = |group: &[u8]| group.iter().rev().fold(0, |b, d| b * 3 + d);
    digit_bytes.extend(digits.chunks(TRITS_PER_BYTE).map(fold));
    scale.is_finite()
}

/// Each byte's five digits, first lowest, as -1.0, 0.0 or 1.0 (a byte from 243 on holds no
/// five digits).
static DIGITS: [[f32; TRITS_PER_BYTE]; 243] = digit_table();

const fn digit_table() -> [[f32; TRITS_PER_BYTE]; 243] {
    let mut table = [[0.0; TRITS_PER_BYTE]; 243];
    let mut byte = 0;
    while byte < 243 {
        let (mut rest, mut i) = (byte, 0);
        while i < TRITS_PER_BYTE {
            table[byte][i] = match rest % 3 {
                0 => 0.0,
                1 => 1.0,
                _ => -1.0,
            };
            rest /= 3;
            i += 1;
        }
        byte += 1;
    }
    table
}

/// Reads ternary blocks of `n` values as hostile input, their digits decoded into `digits`,
/// and returns the scales' bytes: refuses a payload longer than `ternary_len`, a section that
/// does not decode to exactly the digits of `n` values or ends before the payload does, a
/// scale that is not a finite, non-negative number, and a byte that is not five digits (or,
/// in a block's last byte, as many as it has values).
pub(super) fn read_ternary<'a>(
    bytes: &'a [u8],
    n: usize,
    digits: &mut Vec<u8>,
) -> Result<&'a [u8], CodecError> {
    let scales_len = SCALE_LEN * n.div_ceil(TERNARY_BLOCK);
    if bytes.len() < scales_len || bytes.len() > ternary_len(n) {
        return Err(CodecError::Length {
            codec: "delta-ternary",
            values: n,
            got: bytes.len(),
            expected: ternary_len(n),
        });
    }
    let (scales, section) = bytes.split_at(scales_len);
    let used = decode_section(section, digit_len(n), digits, "delta-ternary")?;
    if used != section.len() || digits.len() != digit_len(n) {
        return Err(CodecError::Section {
            codec: "delta-ternary",
            reason: "its digits are not those of the layout's values",
        });
    }
    let mut at = 0;
    for (index, start) in (0..n).step_by(TERNARY_BLOCK).enumerate() {
        let len = (n - start).min(TERNARY_BLOCK);
        let scale = read_scale(scales, index);
        if !(scale.is_finite() && scale >= 0.0) {
            return Err(CodecError::Scale { block: index });
        }
        let groups = &digits[at..at + len.div_ceil(TRITS_PER_BYTE)];
        let (whole, last) = groups.split_at(len / TRITS_PER_BYTE);
        // Bytes of five digits are below 243; a last byte of fewer, below 3 to the fewer.
        let limit = 3u32.pow((len % TRITS_PER_BYTE) as u32);
        let bad = whole.iter().position(|&b| b >= 243).or_else(|| {
            last.first()
                .filter(|&&b| u32::from(b) >= limit)
                .map(|_| whole.len())
        });
        if let Some(offset) = bad {
            return Err(CodecError::Digits { at: at + offset });
        }
        at += groups.len();
    }
    Ok(scales)
}

fn read_scale(scales: &[u8], block: usize) -> f32 {
    let at = SCALE_LEN * block;
    f32::from_le_bytes([scales[at], scales[at + 1], scales[at + 2], scales[at + 3]])
}

/// Adds ternary blocks read by `read_ternary` to `out`, each value its digit times its
/// block's scale: the worker's weights take a difference without a decoded copy of it.
pub(super) fn add_ternary(scales: &[u8], digits: &[u8], out: &mut [f32]) {
    let mut at = 0;
    for (index, block) in out.chunks_mut(TERNARY_BLOCK).enumerate() {
        let scale = read_scale(scales, index);
        for group in block.chunks_mut(TRITS_PER_BYTE) {
            // A checked byte is below 243; `min` only keeps the index in the table's range.
            let digits = &DIGITS[usize::from(digits[at]).min(242)];
            at += 1;
            for (o, digit) in group.iter_mut().zip(digits) {
                *o += digit * scale;
            }
        }
    }
}

/// Decodes ternary blocks, refusing what `read_ternary` refuses (what a worker adds, as a
/// copy: for tests).
#[cfg(test)]
pub(super) fn decode_ternary(bytes: &[u8], out: &mut [f32]) -> Result<(), CodecError> {
    let mut digits = Vec::new();
    let scales = read_ternary(bytes, out.len(), &mut digits)?;
    out.fill(0.0);
    add_ternary(scales, &digits, out);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::{
        decode_ternary, encode_ternary, encode_ternary_delta, ternary_len, DIGITS, TRITS_PER_BYTE,
    };
    use crate::compression::entropy::encode_section;
    use crate::compression::TERNARY_BLOCK;
    use crate::rng::Rng;

    /// The ternary encoder written plainly, a value and a branch at a time.
    fn plain_ternary(values: &mut [f32], out: &mut Vec<u8>) {
        let mut digit_bytes = Vec::new();
        for block in values.chunks_mut(TERNARY_BLOCK) {
            let scale = block.iter().fold(0.0f32, |m, v| m.max(v.abs()));
            out.extend_from_slice(&scale.to_le_bytes());
            for group in block.chunks_mut(TRITS_PER_BYTE) {
                let mut byte = 0u8;
                for v in group.iter_mut().rev() {
                    let digit = if scale == 0.0 || v.abs() < 0.5 * scale {
                        0
                    } else if *v > 0.0 {
                        1
                    } else {
                        2
                    };
                    byte = byte * 3 + digit;
                    *v = DIGITS[usize::from(digit)][0] * scale;
                }
                digit_bytes.push(byte);
            }
        }
        encode_section(&digit_bytes, out);
    }

    #[test]
    fn ternary_encoding_matches_the_plain_one_bit_for_bit() {
        let mut rng = Rng::new(7);
        // Whole blocks and a short last one; a block of zeros (some negative), values exactly
        // at plus and minus half the scale, and ordinary noise.
        let n = 3 * TERNARY_BLOCK + 37;
        let mut values: Vec<f32> = (0..n).map(|_| rng.uniform(-1.0, 1.0)).collect();
        for (i, v) in values[..TERNARY_BLOCK].iter_mut().enumerate() {
            *v = if i % 2 == 0 { 0.0 } else { -0.0 };
        }
        let second = &mut values[TERNARY_BLOCK..2 * TERNARY_BLOCK];
        second[0] = 2.0;
        second[1] = 1.0;
        second[2] = -1.0;
        second[3] = 0.999_999_9;
        let (mut fast, mut plain) = (values.clone(), values);
        let (mut fast_out, mut plain_out) = (Vec::new(), Vec::new());
        assert!(encode_ternary(&mut fast, &mut fast_out));
        plain_ternary(&mut plain, &mut plain_out);
        assert_eq!(fast_out, plain_out);
        assert!(fast_out.len() <= ternary_len(n));
        let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
        assert_eq!(bits(&fast), bits(&plain));
        let mut decoded = vec![1.0; n];
        decode_ternary(&fast_out, &mut decoded).unwrap();
        assert_eq!(
            bits(&decoded),
            bits(&fast),
            "the sender holds what the receiver decodes"
        );
        assert_eq!(
            &fast[TERNARY_BLOCK..TERNARY_BLOCK + 4],
            [2.0, 2.0, -2.0, 0.0]
        );
    }

    #[test]
    fn a_ternary_delta_is_the_plain_encoding_of_the_difference_added_to_the_replica() {
        let mut rng = Rng::new(11);
        let n = 2 * TERNARY_BLOCK + 100;
        let weights: Vec<f32> = (0..n).map(|_| rng.uniform(-1.0, 1.0)).collect();
        let replica: Vec<f32> = weights
            .iter()
            .map(|w| w - rng.uniform(-0.01, 0.01))
            .collect();
        let (mut fast, mut fast_out) = (replica.clone(), Vec::new());
        assert!(encode_ternary_delta(
            &weights,
            &mut fast,
            &mut Vec::new(),
            &mut fast_out
        ));
        let mut diff: Vec<f32> = weights.iter().zip(&replica).map(|(w, r)| w - r).collect();
        let mut plain_out = Vec::new();
        plain_ternary(&mut diff, &mut plain_out);
        assert_eq!(fast_out, plain_out);
        let plain: Vec<u32> = (replica.iter().zip(&diff))
            .map(|(r, d)| (r + d).to_bits())
            .collect();
        assert_eq!(fast.iter().map(|x| x.to_bits()).collect::<Vec<_>>(), plain);
        // A weight that is not finite makes a block the decoder refuses.
        let mut broken = weights.clone();
        broken[n - 1] = f32::INFINITY;
        assert!(!encode_ternary_delta(
            &broken,
            &mut replica.clone(),
            &mut Vec::new(),
            &mut Vec::new()
        ));
    }
}
