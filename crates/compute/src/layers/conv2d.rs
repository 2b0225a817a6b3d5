//! 2-D convolution, stride 1, no padding, as im2col + GEMM per sample (the weight gradient
//! from only the non-zero output gradients when most are zero: `sparse_grad`).

use super::sparse_grad::{self, ByColumn, NonZeros};
use super::{init_fan_in, Backward, Layer, Pass, Shape};
use crate::linalg::{matmul, MatRef};
use pstrain_core::Rng;

/// The convolution's shapes; everything here is pure arithmetic on borrowed buffers.
#[derive(Clone, Copy)]
struct Geometry {
    input: Shape,
    out_channels: usize,
    kernel: usize,
}

impl Geometry {
    fn output(&self) -> Shape {
        let k = self.kernel;
        Shape::new(
            self.out_channels,
            self.input.h - k + 1,
            self.input.w - k + 1,
        )
    }

    fn patch_len(&self) -> usize {
        self.input.c * self.kernel * self.kernel
    }

    fn plane(&self) -> usize {
        let out = self.output();
        out.h * out.w
    }

    /// One sample's im2col matrix: (in_channels * k * k) rows x (out_h * out_w) columns.
    fn im2col(&self, x: &[f32], cols: &mut [f32]) {
        let (k, out, plane) = (self.kernel, self.output(), self.plane());
        for ci in 0..self.input.c {
            let channel = &x[ci * self.input.h * self.input.w..];
            for ky in 0..k {
                for kx in 0..k {
                    let row = (ci * k + ky) * k + kx;
                    let dst = &mut cols[row * plane..(row + 1) * plane];
                    for oy in 0..out.h {
                        let src = &channel[(oy + ky) * self.input.w + kx..][..out.w];
                        dst[oy * out.w..(oy + 1) * out.w].copy_from_slice(src);
                    }
                }
            }
        }
    }

    /// Adds a receptive field's values (im2col's order: channel, kernel row, kernel column)
    /// into a sample's input gradient, the field of output position `p`.
    fn add_field(&self, p: usize, field: &[f32], dx: &mut [f32]) {
        match self.kernel {
            3 => self.add_field_k::<3>(p, field, dx),
            5 => self.add_field_k::<5>(p, field, dx),
            k => self.add_field_rows(k, p, field, dx),
        }
    }

    /// `add_field` for a k x k kernel known at compile time: fixed-size rows, no bounds checks
    /// inside them.
    fn add_field_k<const K: usize>(&self, p: usize, field: &[f32], dx: &mut [f32]) {
        let (h, w, out_w) = (self.input.h, self.input.w, self.output().w);
        let corner = (p / out_w) * w + p % out_w;
        for (ci, channel) in field.chunks_exact(K * K).enumerate() {
            for (ky, row) in channel.chunks_exact(K).enumerate() {
                let at = corner + ci * h * w + ky * w;
                let dst: &mut [f32; K] = (&mut dx[at..at + K])
                    .try_into()
                    .expect("a slice of K values");
                for (d, &v) in dst.iter_mut().zip(row) {
                    *d += v;
                }
            }
        }
    }

    fn add_field_rows(&self, k: usize, p: usize, field: &[f32], dx: &mut [f32]) {
        let (h, w, out_w) = (self.input.h, self.input.w, self.output().w);
        let corner = (p / out_w) * w + p % out_w;
        for (ci, channel) in field.chunks_exact(k * k).enumerate() {
            for (ky, row) in channel.chunks_exact(k).enumerate() {
                let at = corner + ci * h * w + ky * w;
                for (d, &v) in dx[at..at + k].iter_mut().zip(row) {
                    *d += v;
                }
            }
        }
    }

    /// The same matrix transposed: one row of in_channels * k * k values (an output
    /// position's receptive field) per output position.
    fn im2col_t(&self, x: &[f32], cols_t: &mut [f32]) {
        match self.kernel {
            3 => self.im2col_t_k::<3>(x, cols_t),
            5 => self.im2col_t_k::<5>(x, cols_t),
            _ => self.im2col_t_any(x, cols_t),
        }
    }

    /// `im2col_t` for a k x k kernel known at compile time: each kernel row is one fixed-size
    /// move (a variable-length one is a memcpy call per 3 values).
    fn im2col_t_k<const K: usize>(&self, x: &[f32], cols_t: &mut [f32]) {
        let (out, patch) = (self.output(), self.patch_len());
        let (h, w) = (self.input.h, self.input.w);
        for oy in 0..out.h {
            for ox in 0..out.w {
                let row = &mut cols_t[(oy * out.w + ox) * patch..][..patch];
                for ci in 0..self.input.c {
                    let corner = ci * h * w + oy * w + ox;
                    for ky in 0..K {
                        let src: &[f32; K] = x[corner + ky * w..][..K]
                            .try_into()
                            .expect("a slice of K values");
                        let at = (ci * K + ky) * K;
                        row[at..at + K].copy_from_slice(src);
                    }
                }
            }
        }
    }

    fn im2col_t_any(&self, x: &[f32], cols_t: &mut [f32]) {
        let (k, out, patch) = (self.kernel, self.output(), self.patch_len());
        let (h, w) = (self.input.h, self.input.w);
        for (p, row) in cols_t
            .chunks_exact_mut(patch)
            .take(out.h * out.w)
            .enumerate()
        {
            let (oy, ox) = (p / out.w, p % out.w);
            for (ci, field) in row.chunks_exact_mut(k * k).enumerate() {
                let corner = ci * h * w + oy * w + ox;
                for (ky, dst) in field.chunks_exact_mut(k).enumerate() {
                    dst.copy_from_slice(&x[corner + ky * w..][..k]);
                }
            }
        }
    }

    fn col2im_add(&self, cols: &[f32], dx: &mut [f32]) {
        let (k, out, plane) = (self.kernel, self.output(), self.plane());
        for ci in 0..self.input.c {
            let channel = &mut dx[ci * self.input.h * self.input.w..];
            for ky in 0..k {
                for kx in 0..k {
                    let row = (ci * k + ky) * k + kx;
                    let src = &cols[row * plane..(row + 1) * plane];
                    for oy in 0..out.h {
                        let dst = &mut channel[(oy + ky) * self.input.w + kx..][..out.w];
                        for (d, s) in dst.iter_mut().zip(&src[oy * out.w..(oy + 1) * out.w]) {
                            *d += s;
                        }
                    }
                }
            }
        }
    }

    /// Forward for a batch of whole samples.
    fn forward(&self, params: &[f32], x: &[f32], y: &mut [f32], cols: &mut [f32]) {
        let (in_len, out_len) = (self.input.len(), self.output().len());
        let (plane, patch) = (self.plane(), self.patch_len());
        let (weight, bias) = params.split_at(self.out_channels * patch);
        for (xb, yb) in x.chunks_exact(in_len).zip(y.chunks_exact_mut(out_len)) {
            self.im2col(xb, cols);
            for (co, &bv) in bias.iter().enumerate() {
                yb[co * plane..(co + 1) * plane].fill(bv);
            }
            matmul(
                yb,
                MatRef::new(weight, self.out_channels, patch),
                MatRef::new(cols, patch, plane),
                true,
            );
        }
    }

    /// Backward: writes the weight and bias gradients into `dparams` and, if asked, the
    /// input gradient.
    fn backward(
        &self,
        params: &[f32],
        x: &[f32],
        dy: &[f32],
        mut dx: Option<&mut [f32]>,
        dparams: &mut [f32],
        scratch: &mut Scratch,
    ) {
        let Scratch { cols, sparse } = scratch;
        let (in_len, out_len) = (self.input.len(), self.output().len());
        let (plane, patch) = (self.plane(), self.patch_len());
        let weight = &params[..self.out_channels * patch];
        let (dweight, dbias) = dparams.split_at_mut(self.out_channels * patch);
        dbias.fill(0.0);
        for (b, (xb, dyb)) in x
            .chunks_exact(in_len)
            .zip(dy.chunks_exact(out_len))
            .enumerate()
        {
            for (co, db) in dbias.iter_mut().enumerate() {
                *db += lane_sum(&dyb[co * plane..(co + 1) * plane]);
            }
            // dW (+)= dY_b [C_out x plane] * cols^T [plane x patch] and dcols = W^T * dY_b:
            // by dY_b's non-zero values alone when few are (behind a max-pool), else as GEMMs.
            // Narrow patches (a first layer's 3x3x1) are left to the GEMMs.
            let dxb = dx
                .as_deref_mut()
                .map(|dx| &mut dx[b * in_len..(b + 1) * in_len]);
            if patch >= 16 && sparse.nonzeros.collect(dyb, plane) <= sparse_grad::MAX_DENSITY {
                self.im2col_t(xb, cols);
                sparse_grad::weight_grad(&sparse.nonzeros, cols, patch, dweight, b > 0);
                if let Some(dxb) = dxb {
                    sparse.by_column.regroup(&sparse.nonzeros, plane);
                    dxb.fill(0.0);
                    sparse_grad::input_grad(
                        &sparse.by_column,
                        weight,
                        patch,
                        &mut sparse.field,
                        |p, field| self.add_field(p, field, dxb),
                    );
                }
                continue;
            }
            self.im2col(xb, cols);
            matmul(
                dweight,
                MatRef::new(dyb, self.out_channels, plane),
                MatRef::new(cols, patch, plane).t(),
                b > 0,
            );
            if let Some(dxb) = dxb {
                // dcols = W^T [patch x C_out] * dY_b [C_out x plane], then scatter-add.
                matmul(
                    cols,
                    MatRef::new(weight, self.out_channels, patch).t(),
                    MatRef::new(dyb, self.out_channels, plane),
                    false,
                );
                dxb.fill(0.0);
                self.col2im_add(cols, dxb);
            }
        }
    }
}

/// The sum of `v` in 16 independent lanes: a plain `sum()` is one dependent chain of adds
/// (the compiler may not reorder float additions); with it, the convolution's backward pass
/// outside GEMM went from 6.4% to 3.4% of the cnn step in a perf profile.
fn lane_sum(v: &[f32]) -> f32 {
    const LANES: usize = 16;
    let mut acc = [0.0f32; LANES];
    let chunks = v.chunks_exact(LANES);
    let tail: f32 = chunks.remainder().iter().sum();
    for c in chunks {
        for (a, &x) in acc.iter_mut().zip(c) {
            *a += x;
        }
    }
    acc.iter().sum::<f32>() + tail
}

pub struct Conv2d {
    geo: Geometry,
    scratch: Scratch,
}

/// What the passes keep between samples.
struct Scratch {
    /// One sample's im2col matrix (forward), its transpose, or its gradient (backward).
    cols: Vec<f32>,
    /// The backward pass's scratch when output gradients are mostly zero.
    sparse: SparseScratch,
}

/// What the sparse backward pass keeps between samples.
struct SparseScratch {
    /// The sample's non-zero output gradients, by channel.
    nonzeros: NonZeros,
    /// The same by output position.
    by_column: ByColumn,
    /// One receptive field's input gradient.
    field: Vec<f32>,
}

impl Conv2d {
    /// Panics if the kernel does not fit the input: layer shapes are fixed by model code.
    pub fn new(input: Shape, out_channels: usize, kernel: usize) -> Self {
        assert!(kernel >= 1 && kernel <= input.h && kernel <= input.w);
        let geo = Geometry {
            input,
            out_channels,
            kernel,
        };
        Conv2d {
            scratch: Scratch {
                cols: vec![0.0; geo.patch_len() * geo.plane()],
                sparse: SparseScratch {
                    nonzeros: NonZeros::default(),
                    by_column: ByColumn::default(),
                    field: vec![0.0; geo.patch_len()],
                },
            },
            geo,
        }
    }
}

impl Layer for Conv2d {
    fn param_shapes(&self) -> Vec<(&'static str, Vec<usize>)> {
        let (g, k) = (self.geo, self.geo.kernel);
        vec![
            ("weight", vec![g.out_channels, g.input.c, k, k]),
            ("bias", vec![g.out_channels]),
        ]
    }

    fn input_shape(&self) -> Shape {
        self.geo.input
    }

    fn output_shape(&self) -> Shape {
        self.geo.output()
    }

    fn init(&self, params: &mut [f32], rng: &mut Rng) {
        init_fan_in(params, self.geo.patch_len(), rng);
    }

    fn forward(&mut self, params: &[f32], x: &[f32], y: &mut [f32], pass: &mut Pass<'_>) {
        let geo = self.geo;
        let (in_len, out_len) = (geo.input.len(), geo.output().len());
        geo.forward(
            params,
            &x[..pass.batch * in_len],
            &mut y[..pass.batch * out_len],
            &mut self.scratch.cols,
        );
    }

    fn backward(
        &mut self,
        params: &[f32],
        io: Backward<'_>,
        grads: &mut [f32],
        pass: &mut Pass<'_>,
    ) {
        let Backward { x, dy, dx, .. } = io;
        let geo = self.geo;
        let (in_len, out_len) = (geo.input.len(), geo.output().len());
        geo.backward(
            params,
            &x[..pass.batch * in_len],
            &dy[..pass.batch * out_len],
            dx.map(|d| &mut d[..pass.batch * in_len]),
            grads,
            &mut self.scratch,
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::layers::gradcheck;

    #[test]
    fn gradients_match_finite_differences() {
        gradcheck::check(&mut Conv2d::new(Shape::new(2, 5, 6), 3, 3), 2, 1);
        gradcheck::check(&mut Conv2d::new(Shape::new(1, 4, 4), 2, 2), 3, 2);
    }

    /// Backward by the definition, for one sample: dW[co][ci][ky][kx] = sum over positions of
    /// dy[co][p] * x[ci][p + (ky, kx)], dx[ci][q] = sum of dy[co][p] * W[co][ci][q - p].
    fn direct_backward(
        input: Shape,
        co_n: usize,
        k: usize,
        weight: &[f32],
        x: &[f32],
        dy: &[f32],
    ) -> (Vec<f32>, Vec<f32>) {
        let (oh, ow) = (input.h - k + 1, input.w - k + 1);
        let mut dw = vec![0.0f32; co_n * input.c * k * k];
        let mut dx = vec![0.0f32; input.len()];
        for co in 0..co_n {
            for oy in 0..oh {
                for ox in 0..ow {
                    let g = dy[(co * oh + oy) * ow + ox];
                    for ci in 0..input.c {
                        for ky in 0..k {
                            for kx in 0..k {
                                let w_at = ((co * input.c + ci) * k + ky) * k + kx;
                                let x_at = (ci * input.h + oy + ky) * input.w + ox + kx;
                                dw[w_at] += g * x[x_at];
                                dx[x_at] += g * weight[w_at];
                            }
                        }
                    }
                }
            }
        }
        (dw, dx)
    }

    #[test]
    fn mostly_zero_output_gradients_take_the_sparse_path_and_match_the_definition() {
        // A 3x3 kernel over 4 channels (a 36-value receptive field, wide enough for the sparse
        // path), a 5x5 one over 3 (75 values: wide and narrow stripes and a tail) and a 4x4
        // one (no compile-time kernel size); output gradients three quarters zero, as behind
        // a 2x2 max-pool, then all dense.
        let cases = [
            (Shape::new(4, 9, 8), 5, 3),
            (Shape::new(3, 9, 10), 2, 5),
            (Shape::new(2, 8, 9), 3, 4),
        ];
        for &(input, co_n, k) in &cases {
            let mut conv = Conv2d::new(input, co_n, k);
            let mut rng = Rng::new(11);
            let n_params = co_n * input.c * k * k + co_n;
            let mut params = vec![0.0; n_params];
            conv.init(&mut params, &mut rng);
            let batch = 2;
            let x: Vec<f32> = (0..batch * input.len())
                .map(|_| rng.uniform(-1.0, 1.0))
                .collect();
            let out = conv.output_shape();
            for keep_every in [4, 1] {
                let dy: Vec<f32> = (0..batch * out.len())
                    .map(|i| {
                        let v = rng.uniform(-1.0, 1.0);
                        if (i * 7 + i / 3) % keep_every == 0 {
                            v
                        } else {
                            0.0
                        }
                    })
                    .collect();
                let y = vec![0.0; batch * out.len()];
                let mut dx = vec![f32::NAN; batch * input.len()];
                let mut grads = vec![f32::NAN; n_params];
                let mut pass = Pass {
                    batch,
                    train: true,
                    rng: &mut rng,
                    first_sample: 0,
                };
                let io = Backward {
                    x: &x,
                    y: &y,
                    dy: &dy,
                    dx: Some(&mut dx),
                };
                conv.backward(&params, io, &mut grads, &mut pass);
                let weight = &params[..co_n * input.c * k * k];
                let mut want_dw = vec![0.0f32; weight.len()];
                for b in 0..batch {
                    let (dw, dxb) = direct_backward(
                        input,
                        co_n,
                        k,
                        weight,
                        &x[b * input.len()..(b + 1) * input.len()],
                        &dy[b * out.len()..(b + 1) * out.len()],
                    );
                    want_dw.iter_mut().zip(&dw).for_each(|(w, d)| *w += d);
                    for (got, want) in dx[b * input.len()..].iter().zip(&dxb) {
                        assert!((got - want).abs() < 1e-4, "dx {got} vs {want}");
                    }
                }
                for (got, want) in grads.iter().zip(&want_dw) {
                    assert!((got - want).abs() < 1e-4, "dW {got} vs {want}");
                }
                let want_db: Vec<f32> = (0..co_n)
                    .map(|co| {
                        (0..batch)
                            .map(|b| {
                                dy[(b * co_n + co) * out.h * out.w..][..out.h * out.w]
                                    .iter()
                                    .sum::<f32>()
                            })
                            .sum()
                    })
                    .collect();
                for (got, want) in grads[weight.len()..].iter().zip(&want_db) {
                    assert!((got - want).abs() < 1e-4, "db {got} vs {want}");
                }
            }
        }
    }

    #[test]
    fn forward_matches_direct_convolution() {
        let input = Shape::new(2, 4, 5);
        let mut conv = Conv2d::new(input, 3, 3);
        let mut rng = Rng::new(5);
        let mut params = vec![0.0; 3 * 2 * 9 + 3];
        conv.init(&mut params, &mut rng);
        let x: Vec<f32> = (0..2 * input.len())
            .map(|_| rng.uniform(-1.0, 1.0))
            .collect();
        let out = conv.output_shape();
        let mut y = vec![0.0; 2 * out.len()];
        let mut pass = Pass {
            batch: 2,
            train: false,
            rng: &mut rng,
            first_sample: 0,
        };
        conv.forward(&params, &x, &mut y, &mut pass);
        for b in 0..2 {
            for co in 0..3 {
                for oy in 0..out.h {
                    for ox in 0..out.w {
                        let mut acc = params[54 + co];
                        for ci in 0..2 {
                            for ky in 0..3 {
                                for kx in 0..3 {
                                    acc += params[((co * 2 + ci) * 3 + ky) * 3 + kx]
                                        * x[b * input.len() + (ci * 4 + oy + ky) * 5 + ox + kx];
                                }
                            }
                        }
                        let got = y[b * out.len() + (co * out.h + oy) * out.w + ox];
                        assert!((got - acc).abs() < 1e-5, "{got} vs {acc}");
                    }
                }
            }
        }
    }
}
