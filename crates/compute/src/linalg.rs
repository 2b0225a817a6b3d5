//! Strided matrix views and a safe front to the `gemm` crate's kernels (which pick AVX-512,
//! AVX2 or scalar code at run time).

/// A read-only strided matrix over a slice: element (i, j) is `data[i * rs + j * cs]`.
#[derive(Clone, Copy)]
pub struct MatRef<'a> {
    pub data: &'a [f32],
    pub rows: usize,
    pub cols: usize,
    pub rs: usize,
    pub cs: usize,
}

impl<'a> MatRef<'a> {
    /// A row-major `rows x cols` matrix.
    pub fn new(data: &'a [f32], rows: usize, cols: usize) -> Self {
        MatRef {
            data,
            rows,
            cols,
            rs: cols,
            cs: 1,
        }
    }

    /// The transpose, as a view (no copy).
    pub fn t(self) -> Self {
        MatRef {
            data: self.data,
            rows: self.cols,
            cols: self.rows,
            rs: self.cs,
            cs: self.rs,
        }
    }

    fn fits(&self) -> bool {
        self.rows == 0
            || self.cols == 0
            || (self.rows - 1) * self.rs + (self.cols - 1) * self.cs < self.data.len()
    }
}

/// `dst (rows x cols, row-major) = a * b`, or `+= a * b` when `accumulate`.
///
/// Panics if a view reaches outside its slice: shapes are fixed by the model, never by input.
pub fn matmul(dst: &mut [f32], a: MatRef<'_>, b: MatRef<'_>, accumulate: bool) {
    let (m, k, n) = (a.rows, a.cols, b.cols);
    assert_eq!(b.rows, k, "matmul: inner dimensions differ");
    assert!(dst.len() >= m * n, "matmul: destination too small");
    assert!(a.fits() && b.fits(), "matmul: view outside its slice");
    if m == 0 || n == 0 {
        return;
    }
    if k == 0 {
        if !accumulate {
            dst[..m * n].fill(0.0);
        }
        return;
    }
    // SAFETY: the asserts above keep every index the kernel touches inside the three slices
    // (dst is row-major m x n; a and b were checked by `fits`), `dst` is a unique borrow that
    // cannot alias `a` or `b`, and strides fit in isize because they index real slices.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst.as_mut_ptr(),
            1,
            n as isize,
            accumulate,
            a.data.as_ptr(),
            a.cs as isize,
            a.rs as isize,
            b.data.as_ptr(),
            b.cs as isize,
            b.rs as isize,
            1.0,
            1.0,
            false,
            false,
            false,
            // One thread per product: several threads split the batch instead
            // (`Replicated`).
            gemm::Parallelism::None,
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn naive(a: MatRef<'_>, b: MatRef<'_>) -> Vec<f32> {
        let mut out = vec![0.0; a.rows * b.cols];
        for i in 0..a.rows {
            for j in 0..b.cols {
                for p in 0..a.cols {
                    out[i * b.cols + j] +=
                        a.data[i * a.rs + p * a.cs] * b.data[p * b.rs + j * b.cs];
                }
            }
        }
        out
    }

    #[test]
    fn matches_naive_product_with_transposes_and_accumulation() {
        let a: Vec<f32> = (0..35).map(|i| (i as f32 * 0.37).sin()).collect();
        let b: Vec<f32> = (0..63).map(|i| (i as f32 * 0.11).cos()).collect();
        let a = MatRef::new(&a, 5, 7);
        let bt = MatRef::new(&b, 9, 7).t(); // 7 x 9
        let expected = naive(a, bt);
        let mut dst = vec![0.0; 45];
        matmul(&mut dst, a, bt, false);
        for (x, y) in dst.iter().zip(&expected) {
            assert!((x - y).abs() < 1e-5);
        }
        matmul(&mut dst, a, bt, true);
        for (x, y) in dst.iter().zip(&expected) {
            assert!((x - 2.0 * y).abs() < 1e-5);
        }
    }
}
