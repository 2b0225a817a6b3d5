//! Payloads written by hand, their entropy sections stored as they are (what the encoder
//! writes where coding would not shrink them): for the hostile-input tests.

pub(super) use super::entropy::store_section;
use super::sparse::VALUE_BLOCK;

/// A top-k payload: `count`, the gaps' bytes, then `values` int8 values of `step` each,
/// behind a scale of `scale` per block.
pub(super) fn top_k(count: u32, gaps: &[u8], values: usize, scale: f32, step: u8) -> Vec<u8> {
    let mut b = count.to_le_bytes().to_vec();
    store_section(gaps, &mut b);
    for _ in 0..values.div_ceil(VALUE_BLOCK) {
        b.extend_from_slice(&scale.to_le_bytes());
    }
    store_section(&vec![step; values], &mut b);
    b
}
