//! A guess, from a sample of a large slice, of a magnitude that at least `k` of its values
//! reach and not many more: top-k then takes the values that reach it in the one pass that
//! makes them (adding a push into its error feedback) and orders only those, instead of a
//! histogram pass and a selection pass over the whole slice. The guess can miss (fewer than
//! `k` reach it); the caller then selects over the whole slice, so what is selected never
//! depends on the sample.

use multiversion::multiversion;

/// A value's magnitude as bits ordered as the magnitudes are (the sign bit cleared, a
/// non-negative float's bits order as its value); NaN's bits lie above infinity's, so a bad
/// value counts as largest and is sent (and refused) rather than hidden.
#[inline(always)]
pub(super) fn magnitude_key(v: f32) -> u32 {
    v.to_bits() & 0x7fff_ffff
}

/// Values sampled per guess.
const SAMPLES: usize = 4096;
/// Slices shorter than this are selected whole: a sample's cost would be a large share.
pub(super) const MIN_LEN: usize = 1 << 18;

/// The sampler's state: the positions it draws (a fixed sequence) and the sampled keys.
#[derive(Debug, Clone)]
pub(super) struct Sampler {
    state: u64,
    keys: Vec<u32>,
}

impl Default for Sampler {
    fn default() -> Self {
        Sampler {
            state: 0x9e37_79b9_7f4a_7c15,
            keys: Vec::new(),
        }
    }
}

impl Sampler {
    /// A key that about `k + 4·√(expected) + 4` sampled positions' worth of the `n` values
    /// reach (`key_at(i)`: the magnitude key of value `i`), so that fewer than `k` reach it
    /// about once in 100,000 guesses (the binomial tail, for `k` from 0.5% to 10% of the
    /// slice; rarer above); `None` where guessing does not pay (a short slice, `k` near half
    /// of it or more) or the guess is zero (every value would reach it).
    pub fn threshold(&mut self, n: usize, k: usize, key_at: impl Fn(usize) -> u32) -> Option<u32> {
        if n < MIN_LEN || k == 0 || k >= n {
            return None;
        }
        let expected = SAMPLES as f64 * k as f64 / n as f64;
        let rank = (expected + 4.0 * expected.sqrt() + 4.0).ceil() as usize;
        if rank >= SAMPLES / 2 {
            return None;
        }
        self.keys.clear();
        for _ in 0..SAMPLES {
            let at = self.next_below(n);
            self.keys.push(key_at(at));
        }
        let (_, guess, _) = self.keys.select_nth_unstable_by(rank - 1, |a, b| b.cmp(a));
        Some(*guess).filter(|&key| key > 0)
    }

    /// A position in `0..n` (xorshift64*, scaled without division).
    fn next_below(&mut self, n: usize) -> usize {
        let mut x = self.state;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.state = x;
        let r = x.wrapping_mul(0x2545_f491_4f6c_dd1d);
        ((r as u128 * n as u128) >> 64) as usize
    }
}

/// Values per block whose keys are compared at once before any is taken.
const BLOCK: usize = 16;

/// Adds `add` into `sum` and appends to `taken` (cleared first) the indices, ascending, of the
/// sums whose magnitude key is at least `threshold`.
#[multiversion(targets("x86_64+avx512f+avx512vl", "x86_64+avx2+fma", "aarch64+neon"))]
pub(super) fn add_and_take(sum: &mut [f32], add: &[f32], threshold: u32, taken: &mut Vec<u32>) {
    taken.clear();
    let (blocks, rest) = sum.as_chunks_mut::<BLOCK>();
    let (adds, add_rest) = add.as_chunks::<BLOCK>();
    for (b, (s, a)) in blocks.iter_mut().zip(adds).enumerate() {
        let mut hit = false;
        for (s, a) in s.iter_mut().zip(a) {
            *s += a;
            hit |= magnitude_key(*s) >= threshold;
        }
        if hit {
            take_block(s, b * BLOCK, threshold, taken);
        }
    }
    for (s, a) in rest.iter_mut().zip(add_rest) {
        *s += a;
    }
    take_block(rest, blocks.len() * BLOCK, threshold, taken);
}

/// Appends to `taken` (cleared first) the indices, ascending, of `values` whose magnitude key
/// is at least `threshold`.
#[multiversion(targets("x86_64+avx512f+avx512vl", "x86_64+avx2+fma", "aarch64+neon"))]
pub(super) fn take(values: &[f32], threshold: u32, taken: &mut Vec<u32>) {
    taken.clear();
    let (blocks, rest) = values.as_chunks::<BLOCK>();
    for (b, v) in blocks.iter().enumerate() {
        if v.iter()
            .fold(false, |hit, &v| hit | (magnitude_key(v) >= threshold))
        {
            take_block(v, b * BLOCK, threshold, taken);
        }
    }
    take_block(rest, blocks.len() * BLOCK, threshold, taken);
}

/// Appends the indices (from `first`) of `values` whose key reaches `threshold`, without a
/// branch per value: each index is written and kept only if its value reaches.
#[inline(always)]
fn take_block(values: &[f32], first: usize, threshold: u32, taken: &mut Vec<u32>) {
    let count = taken.len();
    taken.resize(count + values.len(), 0);
    let (slots, mut kept) = (&mut taken[count..], 0usize);
    for (i, &v) in values.iter().enumerate() {
        slots[kept] = (first + i) as u32;
        kept += (magnitude_key(v) >= threshold) as usize;
    }
    taken.truncate(count + kept);
}
