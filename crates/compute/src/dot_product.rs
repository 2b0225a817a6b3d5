//! `dst (+)= A * B^T` for row-major A and B, as dot products of their rows (AVX-512).
//!
//! A fully connected layer's forward pass is this product (inputs times the transposed
//! weight rows). Both operands run along k, which the `gemm` crate's kernels cannot read
//! directly: it copied the cnn's whole 4.7 MB fc1 weight into its packed layout on every step
//! (6.8% of the one-thread step in a perf profile). Here 4 rows of A meet 4 rows of B in 16
//! register sums, k in blocks that stay in cache, with no copy.
//!
//! Only with AVX-512 (`available()`); elsewhere, or with `fast_paths` switched off, callers
//! keep the GEMM. Every dot product is
//! summed in the same order (one 16-lane sum over each k block, reduced, then the values past
//! the last whole 16, block after block), whichever block of rows it falls in: a row of the
//! result has the same bits however the rows are split between threads.

/// Rows of A and of B per register block (16 sums).
#[cfg(target_arch = "x86_64")]
const ROWS: usize = 4;
/// k values per block: 4 rows of B (16 KiB) stay in L1 while all of A's rows pass.
const K_BLOCK: usize = 1024;

/// Whether this CPU runs `matmul_nt` (and fast paths are not switched off).
pub fn available() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("avx512f") && pstrain_core::fast_paths::enabled()
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// `dst[i * n + j] (+)= dot(a[i], b[j])` for an `m x k` A and an `n x k` B, both row-major;
/// `None` (and nothing written) where the CPU lacks AVX-512.
///
/// Panics if a slice is shorter than its shape: shapes come from model code.
pub fn matmul_nt(
    dst: &mut [f32],
    a: &[f32],
    b: &[f32],
    m: usize,
    n: usize,
    k: usize,
    accumulate: bool,
) -> Option<()> {
    assert!(a.len() >= m * k && b.len() >= n * k && dst.len() >= m * n);
    if !available() {
        return None;
    }
    if !accumulate {
        dst[..m * n].fill(0.0);
    }
    let mut k0 = 0;
    while k0 < k {
        let kb = K_BLOCK.min(k - k0);
        #[cfg(target_arch = "x86_64")]
        // SAFETY: `available()` found AVX-512 on this CPU.
        unsafe {
            avx512::block(dst, a, b, (m, n, k), k0, kb)
        };
        k0 += kb;
    }
    Some(())
}

#[cfg(target_arch = "x86_64")]
mod avx512 {
    use super::ROWS;
    use std::arch::x86_64::*;

    const LANES: usize = 16;

    /// Adds the dot products over `k0..k0 + kb` to every element of dst.
    #[target_feature(enable = "avx512f")]
    pub(super) fn block(
        dst: &mut [f32],
        a: &[f32],
        b: &[f32],
        (m, n, k): (usize, usize, usize),
        k0: usize,
        kb: usize,
    ) {
        let mut j = 0;
        while j < n {
            let jn = ROWS.min(n - j);
            let mut i = 0;
            while i < m {
                let im = ROWS.min(m - i);
                if im == ROWS && jn == ROWS {
                    let a_rows = [0, 1, 2, 3].map(|r| &a[(i + r) * k + k0..][..kb]);
                    let b_rows = [0, 1, 2, 3].map(|c| &b[(j + c) * k + k0..][..kb]);
                    let sums = dots_4x4(a_rows, b_rows);
                    for (r, sums) in sums.iter().enumerate() {
                        for (c, &s) in sums.iter().enumerate() {
                            dst[(i + r) * n + j + c] += s;
                        }
                    }
                } else {
                    for r in i..i + im {
                        for c in j..j + jn {
                            dst[r * n + c] += dot(&a[r * k + k0..][..kb], &b[c * k + k0..][..kb]);
                        }
                    }
                }
                i += im;
            }
            j += jn;
        }
    }

    /// 16 dot products at once; each equals `dot` of its two rows, bit for bit.
    #[target_feature(enable = "avx512f")]
    fn dots_4x4(a: [&[f32]; ROWS], b: [&[f32]; ROWS]) -> [[f32; ROWS]; ROWS] {
        let len = a.iter().chain(&b).map(|r| r.len()).min().unwrap_or(0);
        let chunks = len / LANES;
        let mut acc = [[_mm512_setzero_ps(); ROWS]; ROWS];
        for ch in 0..chunks {
            let at = ch * LANES;
            let mut av = [_mm512_setzero_ps(); ROWS];
            let mut bv = [_mm512_setzero_ps(); ROWS];
            for r in 0..ROWS {
                // SAFETY: `at + LANES <= len`, within every row.
                unsafe {
                    av[r] = _mm512_loadu_ps(a[r][at..at + LANES].as_ptr());
                    bv[r] = _mm512_loadu_ps(b[r][at..at + LANES].as_ptr());
                }
            }
            for r in 0..ROWS {
                for c in 0..ROWS {
                    acc[r][c] = _mm512_fmadd_ps(av[r], bv[c], acc[r][c]);
                }
            }
        }
        let tail = chunks * LANES;
        let mut out = [[0.0; ROWS]; ROWS];
        for r in 0..ROWS {
            for c in 0..ROWS {
                out[r][c] = finish(acc[r][c], &a[r][tail..len], &b[c][tail..len]);
            }
        }
        out
    }

    /// One dot product in the order `dots_4x4` sums each of its sixteen.
    #[target_feature(enable = "avx512f")]
    fn dot(a: &[f32], b: &[f32]) -> f32 {
        let len = a.len().min(b.len());
        let chunks = len / LANES;
        let mut acc = _mm512_setzero_ps();
        for ch in 0..chunks {
            let at = ch * LANES;
            // SAFETY: `at + LANES <= len`, within both slices.
            let (x, y) = unsafe {
                (
                    _mm512_loadu_ps(a[at..at + LANES].as_ptr()),
                    _mm512_loadu_ps(b[at..at + LANES].as_ptr()),
                )
            };
            acc = _mm512_fmadd_ps(x, y, acc);
        }
        let tail = chunks * LANES;
        finish(acc, &a[tail..len], &b[tail..len])
    }

    /// The lanes reduced, then the values past the last whole 16.
    #[target_feature(enable = "avx512f")]
    fn finish(lanes: __m512, a_tail: &[f32], b_tail: &[f32]) -> f32 {
        let mut sum = _mm512_reduce_add_ps(lanes);
        for (x, y) in a_tail.iter().zip(b_tail) {
            sum += x * y;
        }
        sum
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn values(len: usize, seed: f32) -> Vec<f32> {
        (0..len).map(|i| (i as f32 * seed).sin()).collect()
    }

    #[test]
    fn equals_the_definition_for_ragged_shapes() {
        if !available() {
            eprintln!("no AVX-512 here: matmul_nt is not used on this CPU");
            assert!(matmul_nt(&mut [0.0], &[1.0], &[1.0], 1, 1, 1, false).is_none());
            return;
        }
        // Rows not a multiple of the block, k with a tail and across several k blocks.
        let shapes = [
            (1, 1, 1),
            (5, 7, 3),
            (4, 4, 16),
            (9, 6, 37),
            (6, 9, 2 * K_BLOCK + 21),
        ];
        for &(m, n, k) in &shapes {
            let (a, b) = (values(m * k, 0.37), values(n * k, 0.11));
            let mut dst = vec![f32::NAN; m * n];
            matmul_nt(&mut dst, &a, &b, m, n, k, false).unwrap();
            let mut want = vec![0.0f64; m * n];
            for i in 0..m {
                for j in 0..n {
                    want[i * n + j] = (0..k)
                        .map(|p| f64::from(a[i * k + p]) * f64::from(b[j * k + p]))
                        .sum();
                }
            }
            for (got, want) in dst.iter().zip(&want) {
                let got = f64::from(*got);
                assert!(
                    (got - want).abs() < 1e-4 * (1.0 + want.abs()),
                    "{m}x{n}x{k}: {got} vs {want}"
                );
            }
            // Accumulating adds the same again.
            matmul_nt(&mut dst, &a, &b, m, n, k, true).unwrap();
            for (got, want) in dst.iter().zip(&want) {
                let got = f64::from(*got);
                assert!(
                    (got - 2.0 * want).abs() < 1e-4 * (1.0 + want.abs()),
                    "{got} vs 2 x {want}"
                );
            }
        }
    }

    #[test]
    fn a_row_has_the_same_bits_in_any_block() {
        if !available() {
            return;
        }
        // Row 8 of A is in the ragged rest of the first product and in a whole 4x4 block of
        // the second (A from row 1 on), rows 1-7 move between blocks: same bits throughout.
        let (m, n, k) = (9, 8, K_BLOCK + 45);
        let (a, b) = (values(m * k, 0.53), values(n * k, 0.29));
        let mut whole = vec![0.0; m * n];
        matmul_nt(&mut whole, &a, &b, m, n, k, false).unwrap();
        let mut shifted = vec![0.0; (m - 1) * n];
        matmul_nt(&mut shifted, &a[k..], &b, m - 1, n, k, false).unwrap();
        assert_eq!(whole[n..], shifted[..]);
    }
}
