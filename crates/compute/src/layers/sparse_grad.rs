//! A convolution's weight and input gradients from only the non-zero output gradients.
//!
//! Behind a 2x2 max-pool (and a ReLU) at most a quarter of a convolution's output gradients
//! are non-zero, yet the dense products `dW = dY * cols^T` and `dcols = W^T * dY` multiply
//! all of them. Here each output channel sums the receptive fields of its non-zero positions
//! (its weight gradient), and each position sums the weights of its non-zero channels (its
//! receptive field's input gradient, added into place): a quarter of the products or fewer,
//! the sums held in registers.
//!
//! Plain multiplies and adds (Rust never fuses them), so every instruction set gives the same
//! bits; the order of the sum is fixed (positions in order), so runs repeat exactly.

use multiversion::multiversion;

/// Output values summed per pass over a channel's non-zero positions: four AVX-512 registers.
const BLOCK: usize = 64;

/// A gradient is worth the sparse path when at most this share of it is non-zero (a dense
/// GEMM runs at several times the rate of the sparse sums per product).
pub const MAX_DENSITY: f32 = 0.35;

/// The non-zero values of each row of a `rows x len` matrix, as (column, value) pairs.
#[derive(Default)]
pub struct NonZeros {
    /// `starts[r]..starts[r + 1]` indexes row r's entries.
    starts: Vec<usize>,
    entries: Vec<(u32, f32)>,
}

impl NonZeros {
    /// Collects `m`'s non-zero values (`len` per row); returns their share of all values.
    pub fn collect(&mut self, m: &[f32], len: usize) -> f32 {
        self.starts.clear();
        self.starts.push(0);
        // Every value is written and the end moves past the non-zero ones only: no branch
        // to mispredict on a random pattern of zeros.
        self.entries.resize(m.len(), (0, 0.0));
        let mut end = 0;
        for row in m.chunks_exact(len) {
            for (j, &v) in row.iter().enumerate() {
                self.entries[end] = (j as u32, v);
                end += usize::from(v != 0.0);
            }
            self.starts.push(end);
        }
        self.entries.truncate(end);
        end as f32 / m.len().max(1) as f32
    }

    fn row(&self, r: usize) -> &[(u32, f32)] {
        &self.entries[self.starts[r]..self.starts[r + 1]]
    }

    fn rows(&self) -> usize {
        self.starts.len().saturating_sub(1)
    }
}

/// `dweight[c] (+)= sum over row c's non-zero (p, g) of g * cols_t[p]`, for every channel c;
/// `cols_t` holds one receptive field of `patch` values per output position.
pub fn weight_grad(
    nonzeros: &NonZeros,
    cols_t: &[f32],
    patch: usize,
    dweight: &mut [f32],
    accumulate: bool,
) {
    for (c, dst) in dweight
        .chunks_exact_mut(patch)
        .enumerate()
        .take(nonzeros.rows())
    {
        sum_rows(nonzeros.row(c), cols_t, patch, dst, accumulate);
    }
}

/// The same non-zero values grouped by column (output position) instead of by row (channel),
/// in row order within each column.
#[derive(Default)]
pub struct ByColumn {
    starts: Vec<usize>,
    entries: Vec<(u32, f32)>,
}

impl ByColumn {
    /// Regroups `nonzeros` (of a matrix `columns` wide), a counting sort.
    pub fn regroup(&mut self, nonzeros: &NonZeros, columns: usize) {
        self.starts.clear();
        self.starts.resize(columns + 1, 0);
        for &(p, _) in &nonzeros.entries {
            self.starts[p as usize + 1] += 1;
        }
        for p in 0..columns {
            self.starts[p + 1] += self.starts[p];
        }
        self.entries.clear();
        self.entries.resize(nonzeros.entries.len(), (0, 0.0));
        // `next[p]`: where column p's next entry goes (the starts, shifted by one slot).
        let mut next = self.starts[..columns].to_vec();
        for r in 0..nonzeros.rows() {
            for &(p, g) in nonzeros.row(r) {
                self.entries[next[p as usize]] = (r as u32, g);
                next[p as usize] += 1;
            }
        }
    }

    fn column(&self, p: usize) -> &[(u32, f32)] {
        &self.entries[self.starts[p]..self.starts[p + 1]]
    }
}

/// For every output position p with non-zero gradients (c, g): its receptive field's input
/// gradient `sum of g * weight[c]` (`patch` values, in `field`), handed to `add(p, field)`.
pub fn input_grad(
    by_column: &ByColumn,
    weight: &[f32],
    patch: usize,
    field: &mut [f32],
    mut add: impl FnMut(usize, &[f32]),
) {
    let field = &mut field[..patch];
    for p in 0..by_column.starts.len().saturating_sub(1) {
        let entries = by_column.column(p);
        if entries.is_empty() {
            continue;
        }
        sum_rows(entries, weight, patch, field, false);
        add(p, field);
    }
}

/// `dst (+)= sum over (r, g) of g * m[r]`, where m has rows of `width` values and `dst` is
/// one row wide: in stripes of `BLOCK` values, then of `LANES`, then one by one.
fn sum_rows(entries: &[(u32, f32)], m: &[f32], width: usize, dst: &mut [f32], accumulate: bool) {
    let mut start = 0;
    while start + BLOCK <= width {
        wide_stripe(entries, m, width, start, &mut dst[start..], accumulate);
        start += BLOCK;
    }
    while start + LANES <= width {
        narrow_stripe(entries, m, width, start, &mut dst[start..], accumulate);
        start += LANES;
    }
    if start < width {
        let dst = &mut dst[start..width];
        if !accumulate {
            dst.fill(0.0);
        }
        for &(r, g) in entries {
            let row = &m[r as usize * width + start..][..dst.len()];
            for (a, &x) in dst.iter_mut().zip(row) {
                *a += g * x;
            }
        }
    }
}

/// One register's width of f32 on AVX-512.
const LANES: usize = 16;

#[multiversion(targets("x86_64+avx512f+avx512vl", "x86_64+avx2+fma", "aarch64+neon"))]
fn wide_stripe(
    entries: &[(u32, f32)],
    m: &[f32],
    width: usize,
    start: usize,
    dst: &mut [f32],
    accumulate: bool,
) {
    stripe::<BLOCK>(entries, m, width, start, dst, accumulate);
}

#[multiversion(targets("x86_64+avx512f+avx512vl", "x86_64+avx2+fma", "aarch64+neon"))]
fn narrow_stripe(
    entries: &[(u32, f32)],
    m: &[f32],
    width: usize,
    start: usize,
    dst: &mut [f32],
    accumulate: bool,
) {
    stripe::<LANES>(entries, m, width, start, dst, accumulate);
}

/// `N` values of the sum from column `start` on, the accumulators in registers. Inlined into
/// each instruction set's version of its callers.
#[inline(always)]
fn stripe<const N: usize>(
    entries: &[(u32, f32)],
    m: &[f32],
    width: usize,
    start: usize,
    dst: &mut [f32],
    accumulate: bool,
) {
    let mut acc = [0.0f32; N];
    if accumulate {
        acc.copy_from_slice(&dst[..N]);
    }
    for &(r, g) in entries {
        let row = &m[r as usize * width + start..][..N];
        for (a, &x) in acc.iter_mut().zip(row) {
            *a += g * x;
        }
    }
    dst[..N].copy_from_slice(&acc);
}

#[cfg(test)]
mod tests {
    use super::*;
    use pstrain_core::Rng;

    /// `dW = dY * cols^T` by the definition.
    fn dense(dy: &[f32], cols_t: &[f32], plane: usize, patch: usize) -> Vec<f32> {
        let channels = dy.len() / plane;
        let mut out = vec![0.0; channels * patch];
        for c in 0..channels {
            for p in 0..plane {
                for j in 0..patch {
                    out[c * patch + j] += dy[c * plane + p] * cols_t[p * patch + j];
                }
            }
        }
        out
    }

    #[test]
    fn equals_the_dense_product_for_blocks_and_tails() {
        let mut rng = Rng::new(3);
        // Patches narrower than, equal to and wider than a block, with a tail.
        for &(channels, plane, patch) in &[(3, 10, 9), (2, 7, 64), (4, 13, 150), (1, 1, 1)] {
            let dy: Vec<f32> = (0..channels * plane)
                .map(|i| {
                    if i % 3 == 0 {
                        rng.uniform(-1.0, 1.0)
                    } else {
                        0.0
                    }
                })
                .collect();
            let cols_t: Vec<f32> = (0..plane * patch).map(|_| rng.uniform(-1.0, 1.0)).collect();
            let mut nz = NonZeros::default();
            let density = nz.collect(&dy, plane);
            let expected = dy.iter().filter(|&&v| v != 0.0).count() as f32 / dy.len() as f32;
            assert_eq!(density, expected);
            let want = dense(&dy, &cols_t, plane, patch);
            let mut got = vec![f32::NAN; channels * patch];
            weight_grad(&nz, &cols_t, patch, &mut got, false);
            for (g, w) in got.iter().zip(&want) {
                assert!((g - w).abs() < 1e-5, "{g} vs {w}");
            }
            // Accumulating adds the same again.
            weight_grad(&nz, &cols_t, patch, &mut got, true);
            for (g, w) in got.iter().zip(&want) {
                assert!((g - 2.0 * w).abs() < 1e-5, "{g} vs {}", 2.0 * w);
            }
        }
    }

    #[test]
    fn an_all_zero_gradient_gives_zero_or_leaves_the_sum() {
        let mut nz = NonZeros::default();
        assert_eq!(nz.collect(&[0.0; 12], 4), 0.0);
        let cols_t = vec![1.0; 4 * 70];
        let mut got = vec![f32::NAN; 3 * 70];
        weight_grad(&nz, &cols_t, 70, &mut got, false);
        assert!(got.iter().all(|&v| v == 0.0));
        let mut kept = vec![2.5; 3 * 70];
        weight_grad(&nz, &cols_t, 70, &mut kept, true);
        assert!(kept.iter().all(|&v| v == 2.5));
    }
}
