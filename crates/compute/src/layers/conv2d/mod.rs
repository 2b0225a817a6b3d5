//! 2-D convolution, stride 1, no padding, as im2col + GEMM per sample; the backward pass
//! from only the non-zero output gradients when most are zero (`sparse`).

mod sparse;

use super::{init_fan_in, Backward, Layer, Pass, Shape};
use crate::linalg::{matmul, MatRef};
use pstrain_core::Rng;
use sparse::SparseBackward;

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
        // Which of `dweight` (GEMM samples) and `sparse.dw_last` (sparse ones) hold a sum.
        let (mut dense_seen, mut sparse_seen) = (false, false);
        for (xb, (dyb, b)) in x
            .chunks_exact(in_len)
            .zip(dy.chunks_exact(out_len).zip(0..))
        {
            for (co, db) in dbias.iter_mut().enumerate() {
                *db += lane_sum(&dyb[co * plane..(co + 1) * plane]);
            }
            let dxb = dx
                .as_deref_mut()
                .map(|dx| &mut dx[b * in_len..(b + 1) * in_len]);
            // By dY_b's non-zero values alone when few are (behind a max-pool), else as GEMMs.
            if sparse.takes(self, dyb) {
                if !sparse_seen {
                    sparse.set_weight(self, weight);
                }
                sparse.sample(self, xb, dxb, sparse_seen);
                sparse_seen = true;
                continue;
            }
            self.im2col(xb, cols);
            // dW (+)= dY_b [C_out x plane] * cols^T [plane x patch]
            matmul(
                dweight,
                MatRef::new(dyb, self.out_channels, plane),
                MatRef::new(cols, patch, plane).t(),
                dense_seen,
            );
            dense_seen = true;
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
        if sparse_seen {
            sparse.add_weight_grad(self, dweight, dense_seen);
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
    /// One sample's im2col matrix, or its gradient (backward on the GEMM path).
    cols: Vec<f32>,
    /// The backward pass's scratch when output gradients are mostly zero.
    sparse: SparseBackward,
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
                sparse: SparseBackward::new(&geo),
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
mod tests;
