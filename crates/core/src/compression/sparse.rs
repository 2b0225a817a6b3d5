//! Top-k's selection and wire. Selection is exact and linear: a histogram of the values'
//! magnitude bits finds the bucket holding the k-th largest, only that bucket is ordered,
//! and one more pass takes the indices in ascending order (no sort of the slice, no index
//! array of its length). A large slice is first cut to the values above a threshold guessed
//! from a sample (`sampled_threshold`), taken in the pass that adds a push into its error
//! feedback, and only those go through the histogram: the same indices, fewer passes.
//!
//! The payload is the count, the gaps between ascending indices as LEB128 varints (a byte
//! each while the kept values are denser than 1 in 128), then the values as int8 in blocks of
//! `VALUE_BLOCK` with an f32 scale each (rounded to nearest): about 2 bytes a value where
//! (u32, f32) pairs took 8. The gaps' bytes and the int8 values each go as an entropy-coded
//! section (`entropy`; most gaps are small), the scales ahead of the values. Callers keep
//! what the rounding left out in their error feedback, so it arrives later instead of being
//! lost (which is why the rounding need not be stochastic here).

use super::entropy::{decode_section, encode_section, max_section_len};
use super::sampled_threshold::{self, magnitude_key, Sampler};
use super::values::int8_scale;
use super::CodecError;

/// The count ahead of the gaps.
const COUNT_LEN: usize = 4;
/// The longest varint of a u32.
const MAX_VARINT: usize = 5;
/// Values per scale.
pub(super) const VALUE_BLOCK: usize = 64;
/// Bytes of a block's scale.
const SCALE_LEN: usize = 4;
/// The magnitude bits above this shift name a histogram bucket: 8 exponent bits and 3 of
/// the mantissa (an eighth of an octave per bucket).
const BUCKET_SHIFT: u32 = 20;
const BUCKETS: usize = 1 << (31 - BUCKET_SHIFT);

/// Bytes of `k` values' scales, one per block.
fn scales_len(k: usize) -> usize {
    SCALE_LEN * k.div_ceil(VALUE_BLOCK)
}

/// The largest payload of `k` values (both sections stored as they are, every gap the
/// longest varint).
pub(super) fn max_len(k: usize) -> usize {
    COUNT_LEN + max_section_len(MAX_VARINT * k) + scales_len(k) + max_section_len(k)
}

/// The size of a payload of `k` values spread evenly over `n` before its entropy coding
/// (for pricing a codec before it is used: the coded payload is smaller, by how far its
/// gaps and values are from uniform, which depends on the run).
pub(super) fn typical_len(k: usize, n: usize) -> usize {
    let gap = (n / k.max(1)).min(u32::MAX as usize) as u32;
    COUNT_LEN + max_section_len(varint_len(gap) * k) + scales_len(k) + max_section_len(k)
}

fn varint_len(v: u32) -> usize {
    (32 - v.leading_zeros() as usize).div_ceil(7).max(1)
}

/// The selection's buffers, kept between pushes (or pulls) of one slice.
#[derive(Debug, Clone, Default)]
pub(super) struct TopK {
    /// The indices selected last, ascending.
    pub idx: Vec<u32>,
    /// What arrives of each value encoded last (as the decoder makes it), in `idx`'s order.
    pub sent: Vec<f32>,
    /// The gaps' varints, then the int8 values, before their entropy coding.
    section: Vec<u8>,
    /// The indices of values in buckets above the k-th largest's, ascending.
    above: Vec<u32>,
    /// The indices and magnitudes of the values in the k-th largest's bucket, ascending.
    tied_idx: Vec<u32>,
    tied_keys: Vec<u32>,
    /// `tied_keys`, reordered by the selection of the threshold.
    scratch: Vec<u32>,
    /// A large slice's candidates (`sampled_threshold`): indices, ascending, and values.
    sampler: Sampler,
    candidates: Vec<u32>,
    candidate_values: Vec<f32>,
}

/// How many values of each magnitude bucket.
type Histogram = [u32; BUCKETS];

fn bucket_of(v: f32) -> usize {
    (magnitude_key(v) >> BUCKET_SHIFT) as usize
}

impl TopK {
    /// Selects the indices of the `k` values of `values` largest in magnitude (ties at the
    /// threshold taken lowest index first), ascending, into `self.idx`; zeros never (fewer
    /// than `k` nonzero values: all of them).
    pub fn select(&mut self, values: &[f32], k: usize) {
        match self
            .sampler
            .threshold(values.len(), k, |i| magnitude_key(values[i]))
        {
            Some(threshold) => {
                sampled_threshold::take(values, threshold, &mut self.candidates);
                self.select_from_candidates(values, k);
            }
            None => self.select_whole(values, k),
        }
    }

    /// `select` by a histogram of the whole slice.
    fn select_whole(&mut self, values: &[f32], k: usize) {
        if self.trivial(values, k) {
            return;
        }
        let mut histogram = [0u32; BUCKETS];
        for &v in values {
            histogram[bucket_of(v)] += 1;
        }
        self.select_by(values, k, &histogram);
    }

    /// Adds `add` into `sum` and selects as `select(sum, k)` does, in one pass over the
    /// slice where the sum and the histogram are made (error feedback's accumulation).
    pub fn add_and_select(&mut self, sum: &mut [f32], add: &[f32], k: usize) {
        // The sample adds as the pass will (the same f32 addition, the same bits).
        let (s, a) = (&*sum, add);
        let guess = if s.len() == a.len() {
            self.sampler
                .threshold(s.len(), k, |i| magnitude_key(s[i] + a[i]))
        } else {
            None
        };
        if let Some(threshold) = guess {
            sampled_threshold::add_and_take(sum, add, threshold, &mut self.candidates);
            return self.select_from_candidates(sum, k);
        }
        let mut histogram = [0u32; BUCKETS];
        for (s, a) in sum.iter_mut().zip(add) {
            *s += a;
            histogram[bucket_of(*s)] += 1;
        }
        if !self.trivial(sum, k) {
            self.select_by(sum, k, &histogram);
        }
    }

    /// The selection from `self.candidates`, every index of `values` whose magnitude reaches
    /// a sampled threshold. If at least `k` reach it the `k` largest of all are among them,
    /// so the selection over their values, mapped back to their indices, is the whole slice's
    /// (ties still lowest index first: the candidates are ascending); if the guess missed,
    /// the selection runs over the whole slice.
    fn select_from_candidates(&mut self, values: &[f32], k: usize) {
        if self.candidates.len() < k {
            return self.select_whole(values, k);
        }
        let mut gathered = std::mem::take(&mut self.candidate_values);
        gathered.clear();
        gathered.extend(self.candidates.iter().map(|&i| values[i as usize]));
        self.select_whole(&gathered, k);
        for at in &mut self.idx {
            *at = self.candidates[*at as usize];
        }
        self.candidate_values = gathered;
    }

    /// Selects where no threshold is needed (`k` is 0, or at least every value); whether it
    /// did.
    fn trivial(&mut self, values: &[f32], k: usize) -> bool {
        self.idx.clear();
        let n = values.len();
        if k >= n {
            self.idx
                .extend((0..n as u32).filter(|&i| magnitude_key(values[i as usize]) != 0));
        }
        k == 0 || k >= n
    }

    /// The selection from the histogram of `values`' buckets (0 < k < n): one pass takes
    /// every value above the k-th largest's bucket and every value in it, without branches;
    /// only that bucket is ordered; the two ascending lists merge.
    fn select_by(&mut self, values: &[f32], k: usize, histogram: &Histogram) {
        // From the largest bucket down, to the one holding the k-th largest.
        let (mut bucket, mut above) = (BUCKETS - 1, 0usize);
        while above + (histogram[bucket] as usize) < k {
            above += histogram[bucket] as usize;
            bucket -= 1;
        }
        let tied = histogram[bucket] as usize;
        // One spare slot each: a value that is not taken is written there and overwritten.
        let (above_idx, tied_idx, tied_keys) =
            (&mut self.above, &mut self.tied_idx, &mut self.tied_keys);
        above_idx.clear();
        above_idx.resize(above + 1, 0);
        tied_idx.clear();
        tied_idx.resize(tied + 1, 0);
        tied_keys.clear();
        tied_keys.resize(tied + 1, 0);
        {
            // As slices: the stores cannot alias the vectors' own fields, which would
            // otherwise be reloaded at every value.
            let (above_at, tied_at, keys_at) =
                (&mut above_idx[..], &mut tied_idx[..], &mut tied_keys[..]);
            let (mut a, mut t) = (0usize, 0usize);
            for (i, &v) in values.iter().enumerate() {
                let key = magnitude_key(v);
                let b = (key >> BUCKET_SHIFT) as usize;
                above_at[a] = i as u32;
                a += (b > bucket) as usize;
                tied_at[t] = i as u32;
                keys_at[t] = key;
                t += (b == bucket) as usize;
            }
        }
        above_idx.truncate(above);
        tied_idx.truncate(tied);
        tied_keys.truncate(tied);
        let wanted = k - above;
        let scratch = &mut self.scratch;
        scratch.clear();
        scratch.extend_from_slice(tied_keys);
        let (_, threshold, _) = scratch.select_nth_unstable_by(wanted - 1, |a, b| b.cmp(a));
        let threshold = *threshold;
        let larger = tied_keys.iter().filter(|&&key| key > threshold).count();
        // Zeros are not worth their bytes: fewer than k values are sent then.
        let mut ties = if threshold == 0 { 0 } else { wanted - larger };
        let taken = tied_idx
            .iter()
            .zip(tied_keys.iter())
            .filter_map(|(&i, &key)| {
                let take = key > threshold || (key == threshold && ties > 0);
                if take && key == threshold {
                    ties -= 1;
                }
                take.then_some(i)
            });
        merge_ascending(above_idx, taken, &mut self.idx);
    }

    /// Writes the payload of `values` at the selected indices into `out` (appended), and
    /// what arrives of each into `self.sent`.
    pub fn encode(&mut self, values: &[f32], out: &mut Vec<u8>) {
        let k = self.idx.len();
        out.reserve(max_len(k));
        out.extend_from_slice(&(k as u32).to_le_bytes());
        let section = &mut self.section;
        section.clear();
        let mut next = 0u32;
        for &i in &self.idx {
            write_varint(i - next, section);
            next = i + 1;
        }
        encode_section(section, out);
        // Gathered first, so each block's scale and rounding run over contiguous values.
        let sent = &mut self.sent;
        sent.clear();
        sent.extend(self.idx.iter().map(|&i| values[i as usize]));
        section.clear();
        section.resize(k, 0);
        for (block, qs) in sent
            .chunks_mut(VALUE_BLOCK)
            .zip(section.chunks_mut(VALUE_BLOCK))
        {
            let scale = int8_scale(block);
            out.extend_from_slice(&scale.to_le_bytes());
            for (v, q) in block.iter_mut().zip(qs) {
                let rounded = quantize(*v, scale);
                *q = rounded as u8;
                *v = dequantize(rounded, scale);
            }
        }
        encode_section(section, out);
    }
}

/// `a` and `b`, each ascending, into `out` (cleared first), ascending.
fn merge_ascending(a: &[u32], b: impl Iterator<Item = u32>, out: &mut Vec<u32>) {
    out.clear();
    let mut a = a.iter().copied().peekable();
    for j in b {
        while let Some(i) = a.next_if(|&i| i < j) {
            out.push(i);
        }
        out.push(j);
    }
    out.extend(a);
}

/// `v` in steps of `scale`, rounded to nearest; 0 for a zero or NaN scale.
fn quantize(v: f32, scale: f32) -> i8 {
    if scale.is_nan() || scale == 0.0 {
        return 0;
    }
    // v / scale lies in [-127, 127]; shifted by 128.5, truncating rounds (no libm call).
    ((v / scale + 128.5) as i32 - 128).clamp(-127, 127) as i8
}

/// What a quantized value decodes to, the same on every machine.
fn dequantize(q: i8, scale: f32) -> f32 {
    q as f32 * scale
}

fn write_varint(mut v: u32, out: &mut Vec<u8>) {
    if v < 0x80 {
        // Most gaps: one byte.
        out.push(v as u8);
        return;
    }
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

/// The varint at the start of `bytes` and its length; `None` if it is cut short or does
/// not fit a u32.
fn read_varint(bytes: &[u8]) -> Option<(u32, usize)> {
    let mut v = 0u64;
    for (at, &b) in bytes.iter().take(MAX_VARINT).enumerate() {
        v |= ((b & 0x7f) as u64) << (7 * at);
        if b & 0x80 == 0 {
            return u32::try_from(v).ok().map(|v| (v, at + 1));
        }
    }
    None
}

/// Decodes a payload of at most `k` values into `out` (zeros where nothing was sent),
/// checking it as hostile: the count against `k`, both sections (bounded by the count, the
/// values' exactly the count), every gap's varint, every index in range, nothing left over.
pub(super) fn decode(bytes: &[u8], k: usize, out: &mut [f32]) -> Result<(), CodecError> {
    let n = out.len();
    let short = |expected: usize| CodecError::Length {
        codec: "top-k",
        values: n,
        got: bytes.len(),
        expected,
    };
    let head = bytes.get(..COUNT_LEN).ok_or(short(COUNT_LEN))?;
    let count = u32::from_le_bytes([head[0], head[1], head[2], head[3]]) as u64;
    if count > k.min(n) as u64 {
        return Err(CodecError::Count {
            count,
            most: k.min(n),
        });
    }
    let count = count as usize;
    if bytes.len() > max_len(count) {
        return Err(short(max_len(count)));
    }
    let mut at = COUNT_LEN;
    let mut gaps = Vec::new();
    at += decode_section(&bytes[at..], MAX_VARINT * count, &mut gaps, "top-k")?;
    let scales = bytes
        .get(at..at + scales_len(count))
        .ok_or(short(at + scales_len(count)))?;
    at += scales.len();
    let mut qs = Vec::new();
    at += decode_section(&bytes[at..], count, &mut qs, "top-k")?;
    if qs.len() != count || at != bytes.len() {
        return Err(CodecError::Section {
            codec: "top-k",
            reason: "its values are not as many as its count, or bytes follow them",
        });
    }
    out.fill(0.0);
    let (mut gap_at, mut next) = (0usize, 0u64);
    for (scale, qs) in scales.chunks(SCALE_LEN).zip(qs.chunks(VALUE_BLOCK)) {
        let scale = f32::from_le_bytes([scale[0], scale[1], scale[2], scale[3]]);
        for &q in qs {
            let (gap, used) =
                read_varint(&gaps[gap_at..]).ok_or(CodecError::Varint { at: gap_at })?;
            gap_at += used;
            let index = next + gap as u64;
            if index >= n as u64 {
                return Err(CodecError::Index { index, values: n });
            }
            out[index as usize] = dequantize(q as i8, scale);
            next = index + 1;
        }
    }
    if gap_at != gaps.len() {
        return Err(CodecError::Section {
            codec: "top-k",
            reason: "its gaps outnumber its values",
        });
    }
    Ok(())
}

#[cfg(test)]
#[path = "sparse_tests.rs"]
mod tests;
