//! 2-D convolution, stride 1, no padding, as im2col + GEMM per sample (the backward pass from
//! only the non-zero output gradients when most are zero: `sparse_grad`).

use super::sparse_grad::{self, ByColumn, NonZeros, ScaledRows};
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
            // Narrow kernel rows (a first layer's 3x1) are left to the GEMMs.
            let run = self.kernel * self.input.c;
            if run >= 16 && sparse.nonzeros.collect(dyb, plane) <= sparse_grad::MAX_DENSITY {
                if !sparse_seen {
                    sparse.set_weight(self, weight);
                }
                self.sparse_sample(xb, dxb, sparse, sparse_seen);
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

    /// One sample's backward from its non-zero output gradients (in `s.nonzeros`), in the
    /// channels-last order where one kernel row over all input channels is one run of values
    /// (`SparseScratch`): `dw_last (+)=` its weight gradient, `dxb =` its input gradient.
    fn sparse_sample(
        &self,
        xb: &[f32],
        dxb: Option<&mut [f32]>,
        s: &mut SparseScratch,
        accumulate: bool,
    ) {
        let (k, c_in, patch) = (self.kernel, self.input.c, self.patch_len());
        let run = k * c_in;
        let row_step = self.input.w * c_in;
        to_channels_last(xb, c_in, &mut s.x_last);
        // A channel's weight gradient, kernel row by kernel row: its non-zero positions'
        // receptive fields (each row of one a run in `x_last`), scaled and summed.
        for c in 0..self.out_channels {
            for ky in 0..k {
                let fields = ScaledRows {
                    entries: s.nonzeros.row(c),
                    src: &s.x_last,
                    starts: &s.field_starts,
                    shift: ky * row_step,
                };
                let dst = &mut s.dw_last[c * patch + ky * run..][..run];
                sparse_grad::weighted_sum(fields, dst, accumulate);
            }
        }
        let Some(dxb) = dxb else { return };
        // A position's input gradient: its non-zero channels' weights, scaled, summed and
        // added onto its receptive field (which overlaps its neighbours').
        s.by_column.regroup(&s.nonzeros, self.plane());
        s.dx_last.fill(0.0);
        for (p, &field) in s.field_starts.iter().enumerate() {
            let entries = s.by_column.column(p);
            if entries.is_empty() {
                continue;
            }
            for ky in 0..k {
                let at = field + ky * row_step;
                let weights = ScaledRows {
                    entries,
                    src: &s.w_last,
                    starts: &s.weight_starts,
                    shift: ky * run,
                };
                sparse_grad::weighted_sum(weights, &mut s.dx_last[at..at + run], true);
            }
        }
        from_channels_last(&s.dx_last, c_in, dxb);
    }
}

/// `out[i * c + ci] = x[ci * (x.len() / c) + i]`: channels-first to channels-last. Position
/// by position, so the writes run straight on and the reads are `c` sequential streams.
fn to_channels_last(x: &[f32], c: usize, out: &mut [f32]) {
    let plane = x.len() / c;
    for (i, dst) in out.chunks_exact_mut(c).take(plane).enumerate() {
        for (ci, d) in dst.iter_mut().enumerate() {
            *d = x[ci * plane + i];
        }
    }
}

/// The inverse of `to_channels_last`, position by position likewise (reads straight on,
/// writes in `c` sequential streams).
fn from_channels_last(x: &[f32], c: usize, out: &mut [f32]) {
    let plane = x.len() / c;
    for (i, src) in x.chunks_exact(c).take(plane).enumerate() {
        for (ci, &v) in src.iter().enumerate() {
            out[ci * plane + i] = v;
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

/// What the sparse backward pass keeps between samples. Receptive fields and weights are
/// held channels-last (value order: kernel row, kernel column, input channel), so that one
/// kernel row over all input channels is one run of `kernel * in_channels` values, in the
/// input and in each weight row alike.
struct SparseScratch {
    /// The sample's non-zero output gradients, by channel.
    nonzeros: NonZeros,
    /// The same by output position.
    by_column: ByColumn,
    /// The sample's input, channels last.
    x_last: Vec<f32>,
    /// Its input gradient, channels last.
    dx_last: Vec<f32>,
    /// The weights, channels last.
    w_last: Vec<f32>,
    /// The batch's weight gradient from the sparse samples, channels last.
    dw_last: Vec<f32>,
    /// Where each output position's receptive field starts in `x_last`.
    field_starts: Vec<usize>,
    /// Where each output channel's weights start in `w_last`.
    weight_starts: Vec<usize>,
}

impl SparseScratch {
    fn new(geo: &Geometry) -> Self {
        let (out, c_in, patch) = (geo.output(), geo.input.c, geo.patch_len());
        SparseScratch {
            nonzeros: NonZeros::default(),
            by_column: ByColumn::default(),
            x_last: vec![0.0; geo.input.len()],
            dx_last: vec![0.0; geo.input.len()],
            w_last: vec![0.0; geo.out_channels * patch],
            dw_last: vec![0.0; geo.out_channels * patch],
            field_starts: (0..out.h * out.w)
                .map(|p| ((p / out.w) * geo.input.w + p % out.w) * c_in)
                .collect(),
            weight_starts: (0..geo.out_channels).map(|c| c * patch).collect(),
        }
    }

    /// Where weight value `j` (PyTorch's order: input channel, kernel row, kernel column) sits
    /// channels last.
    fn last_index(geo: &Geometry, j: usize) -> usize {
        let (k, c_in) = (geo.kernel, geo.input.c);
        let (ci, kk) = (j / (k * k), j % (k * k));
        kk * c_in + ci
    }

    fn set_weight(&mut self, geo: &Geometry, weight: &[f32]) {
        let patch = geo.patch_len();
        for (src, dst) in weight
            .chunks_exact(patch)
            .zip(self.w_last.chunks_exact_mut(patch))
        {
            for (j, &v) in src.iter().enumerate() {
                dst[Self::last_index(geo, j)] = v;
            }
        }
    }

    /// `dweight (+)= dw_last`, back in PyTorch's order.
    fn add_weight_grad(&self, geo: &Geometry, dweight: &mut [f32], accumulate: bool) {
        let patch = geo.patch_len();
        for (src, dst) in self
            .dw_last
            .chunks_exact(patch)
            .zip(dweight.chunks_exact_mut(patch))
        {
            for (j, d) in dst.iter_mut().enumerate() {
                let v = src[Self::last_index(geo, j)];
                *d = if accumulate { *d + v } else { v };
            }
        }
    }
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
                sparse: SparseScratch::new(&geo),
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
        // Kernel rows over all input channels of 20 values (wide enough for the sparse path:
        // a 16-wide stripe and a tail), 15 (left to the GEMMs) and 72 (64 + a tail); output
        // gradients three quarters zero, as behind a 2x2 max-pool, or all dense.
        let cases = [
            (Shape::new(5, 9, 8), 5, 4),
            (Shape::new(3, 9, 10), 2, 5),
            (Shape::new(24, 8, 9), 3, 3),
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
            // Each sample's share of non-zero gradients: both sparse, both dense, and mixed
            // batches (the sparse and the GEMM weight gradients summed).
            for keep_every in [[4, 4], [1, 1], [4, 1], [1, 4]] {
                let dy: Vec<f32> = (0..batch * out.len())
                    .map(|i| {
                        let v = rng.uniform(-1.0, 1.0);
                        if (i * 7 + i / 3) % keep_every[i / out.len()] == 0 {
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
