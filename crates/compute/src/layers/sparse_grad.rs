//! A convolution's gradients from only the non-zero output gradients.
//!
//! Behind a 2x2 max-pool (and a ReLU) at most a quarter of a convolution's output gradients
//! are non-zero, yet the dense products `dW = dY * cols^T` and `dcols = W^T * dY` multiply
//! all of them. Here every gradient is a sum of slices scaled by the non-zero values: a
//! channel's weight gradient sums the receptive fields of its non-zero positions, a
//! position's input gradient sums the weights of its non-zero channels. A quarter of the
//! products or fewer, the sums held in registers.
//!
//! Plain multiplies and adds (Rust never fuses them), so every instruction set gives the same
//! bits; each sum runs in a fixed order, so runs repeat exactly.

use multiversion::multiversion;

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

    pub fn row(&self, r: usize) -> &[(u32, f32)] {
        &self.entries[self.starts[r]..self.starts[r + 1]]
    }

    pub fn rows(&self) -> usize {
        self.starts.len().saturating_sub(1)
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

    pub fn column(&self, p: usize) -> &[(u32, f32)] {
        &self.entries[self.starts[p]..self.starts[p + 1]]
    }
}

/// Rows of a source scaled and summed: `entries` are (row, scale) pairs, row r's values start
/// at `src[starts[r] + shift]`.
#[derive(Clone, Copy)]
pub struct ScaledRows<'a> {
    pub entries: &'a [(u32, f32)],
    pub src: &'a [f32],
    pub starts: &'a [usize],
    pub shift: usize,
}

/// `dst (+)= sum over (r, g) of g * rows.src[rows.starts[r] + rows.shift..][..dst.len()]`: in
/// stripes of 96, 64, 32 and 16 values (the widest that fit, each one pass over the entries
/// with its sums in registers), then one by one.
pub fn weighted_sum(rows: ScaledRows<'_>, dst: &mut [f32], accumulate: bool) {
    let stripes = if pstrain_core::fast_paths::enabled() {
        &FAST
    } else {
        &PORTABLE
    };
    weighted_sum_with(stripes, rows, dst, accumulate);
}

/// The stripe sums of widths 96, 64, 32 and 16, in that order.
type Stripes = [fn(ScaledRows<'_>, &mut [f32], bool) -> usize; 4];

/// Compiled for several instruction sets, picked at run time.
const FAST: Stripes = [stripe_96, stripe_64, stripe_32, stripe_16];
/// The target's baseline build of the same code.
const PORTABLE: Stripes = [
    stripe_96_portable,
    stripe_64_portable,
    stripe_32_portable,
    stripe_16_portable,
];

fn weighted_sum_with(stripes: &Stripes, rows: ScaledRows<'_>, dst: &mut [f32], accumulate: bool) {
    let width = dst.len();
    let mut at = 0;
    while at < width {
        let stripe = ScaledRows {
            shift: rows.shift + at,
            ..rows
        };
        let d = &mut dst[at..];
        at += match width - at {
            96.. => stripes[0](stripe, d, accumulate),
            64.. => stripes[1](stripe, d, accumulate),
            32.. => stripes[2](stripe, d, accumulate),
            16.. => stripes[3](stripe, d, accumulate),
            rest => {
                sum_into(stripe, &mut d[..rest], accumulate);
                rest
            }
        };
    }
}

/// One function per stripe width, each compiled for several instruction sets; returns the
/// width.
macro_rules! stripe_fn {
    ($name:ident, $portable:ident, $n:literal) => {
        #[multiversion(targets("x86_64+avx512f+avx512vl", "x86_64+avx2+fma", "aarch64+neon"))]
        fn $name<'a>(rows: ScaledRows<'a>, dst: &mut [f32], accumulate: bool) -> usize {
            stripe::<$n>(rows, dst, accumulate)
        }

        fn $portable(rows: ScaledRows<'_>, dst: &mut [f32], accumulate: bool) -> usize {
            stripe::<$n>(rows, dst, accumulate)
        }
    };
}

stripe_fn!(stripe_96, stripe_96_portable, 96);
stripe_fn!(stripe_64, stripe_64_portable, 64);
stripe_fn!(stripe_32, stripe_32_portable, 32);
stripe_fn!(stripe_16, stripe_16_portable, 16);

/// One stripe of `N` values, its sums in a fixed-size array (registers, once inlined).
#[inline(always)]
fn stripe<const N: usize>(rows: ScaledRows<'_>, dst: &mut [f32], accumulate: bool) -> usize {
    let mut acc = [0.0f32; N];
    if accumulate {
        acc.copy_from_slice(&dst[..N]);
    }
    sum_into(rows, &mut acc, true);
    dst[..N].copy_from_slice(&acc);
    N
}

/// The sum over `acc.len()` values; inlined into each stripe width's instruction-set
/// versions, where a fixed-size `acc` lives in registers.
#[inline(always)]
fn sum_into(rows: ScaledRows<'_>, acc: &mut [f32], accumulate: bool) {
    if !accumulate {
        acc.fill(0.0);
    }
    for &(r, g) in rows.entries {
        let row = &rows.src[rows.starts[r as usize] + rows.shift..][..acc.len()];
        for (a, &x) in acc.iter_mut().zip(row) {
            *a += g * x;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use pstrain_core::Rng;

    #[test]
    fn non_zeros_by_row_and_by_column() {
        // 3 rows of 4: the non-zero values, NaN included (it is not zero).
        let m = [
            0.0,
            1.0,
            0.0,
            2.0,
            0.0,
            0.0,
            0.0,
            0.0,
            f32::NAN,
            3.0,
            0.0,
            4.0,
        ];
        let mut nz = NonZeros::default();
        assert_eq!(nz.collect(&m, 4), 5.0 / 12.0);
        assert_eq!(nz.rows(), 3);
        assert_eq!(nz.row(0), &[(1, 1.0), (3, 2.0)]);
        assert!(nz.row(1).is_empty());
        assert_eq!(nz.row(2).len(), 3);
        let mut by = ByColumn::default();
        by.regroup(&nz, 4);
        assert_eq!(by.column(0).len(), 1);
        assert!(by.column(0)[0].1.is_nan());
        assert_eq!(by.column(1), &[(0, 1.0), (2, 3.0)]);
        assert!(by.column(2).is_empty());
        assert_eq!(by.column(3), &[(0, 2.0), (2, 4.0)]);
    }

    #[test]
    fn weighted_sums_equal_the_definition_at_every_width_on_every_path() {
        let mut rng = Rng::new(3);
        let src: Vec<f32> = (0..400).map(|_| rng.uniform(-1.0, 1.0)).collect();
        let starts = [0, 7, 100, 150, 33];
        let entries = [(1u32, 0.5f32), (3, -2.0), (0, 1.25), (4, 3.0)];
        // Widths that use each stripe, alone and together, and the one-by-one tail.
        for width in [0, 1, 15, 16, 17, 32, 48, 63, 64, 65, 96, 112, 129, 200] {
            let shift = 11;
            let want: Vec<f32> = (0..width)
                .map(|j| {
                    entries
                        .iter()
                        .map(|&(r, g)| g * src[starts[r as usize] + shift + j])
                        .sum()
                })
                .collect();
            let rows = ScaledRows {
                entries: &entries,
                src: &src,
                starts: &starts,
                shift,
            };
            let none = ScaledRows {
                entries: &[],
                ..rows
            };
            let mut by_path = Vec::new();
            for stripes in [&FAST, &PORTABLE] {
                let mut got = vec![f32::NAN; width];
                weighted_sum_with(stripes, rows, &mut got, false);
                for (g, w) in got.iter().zip(&want) {
                    assert!((g - w).abs() < 1e-5, "width {width}: {g} vs {w}");
                }
                by_path.push(got.iter().map(|v| v.to_bits()).collect::<Vec<_>>());
                // Accumulating adds the same again; no entries leave the sum as it is.
                weighted_sum_with(stripes, rows, &mut got, true);
                weighted_sum_with(stripes, none, &mut got, true);
                for (g, w) in got.iter().zip(&want) {
                    assert!(
                        (g - 2.0 * w).abs() < 1e-5,
                        "width {width}: {g} vs {}",
                        2.0 * w
                    );
                }
                weighted_sum_with(stripes, none, &mut got, false);
                assert!(got.iter().all(|&v| v == 0.0));
            }
            // The same multiplies and adds in the same order: the same bits on either path.
            assert_eq!(by_path[0], by_path[1], "width {width}");
        }
    }
}
