//! A convolution's backward pass from only its non-zero output gradients (the sums in
//! `sparse_grad`), in channels-last order: one kernel row over all input channels is then
//! one contiguous run of values in the input and in each weight row.

use super::Geometry;
use crate::layers::sparse_grad::{self, ByColumn, NonZeros, ScaledRows};

/// What the sparse backward pass keeps between samples. Receptive fields and weights are
/// held channels-last (value order: kernel row, kernel column, input channel), so that one
/// kernel row over all input channels is one run of `kernel * in_channels` values, in the
/// input and in each weight row alike.
pub(super) struct SparseBackward {
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

impl SparseBackward {
    pub(super) fn new(geo: &Geometry) -> Self {
        let (out, c_in, patch) = (geo.output(), geo.input.c, geo.patch_len());
        SparseBackward {
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

    /// Whether a sample with output gradients `dyb` takes this path: at most
    /// `MAX_DENSITY` of them non-zero (collected for `sample`), and kernel rows over all
    /// input channels of 16 values or more (a first layer's 3 x 1 is left to the GEMMs).
    pub(super) fn takes(&mut self, geo: &Geometry, dyb: &[f32]) -> bool {
        geo.kernel * geo.input.c >= 16
            && self.nonzeros.collect(dyb, geo.plane()) <= sparse_grad::MAX_DENSITY
    }

    /// The batch's weights, channels last (before its first sparse sample).
    pub(super) fn set_weight(&mut self, geo: &Geometry, weight: &[f32]) {
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
    pub(super) fn add_weight_grad(&self, geo: &Geometry, dweight: &mut [f32], accumulate: bool) {
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

    /// One sample's backward from its non-zero output gradients (collected by `takes`):
    /// `dw_last (+)=` its weight gradient, `dxb =` its input gradient.
    pub(super) fn sample(
        &mut self,
        geo: &Geometry,
        xb: &[f32],
        dxb: Option<&mut [f32]>,
        accumulate: bool,
    ) {
        let (k, c_in, patch) = (geo.kernel, geo.input.c, geo.patch_len());
        let run = k * c_in;
        let row_step = geo.input.w * c_in;
        to_channels_last(xb, c_in, &mut self.x_last);
        // A channel's weight gradient, kernel row by kernel row: its non-zero positions'
        // receptive fields (each row of one a run in `x_last`), scaled and summed.
        for c in 0..geo.out_channels {
            for ky in 0..k {
                let fields = ScaledRows {
                    entries: self.nonzeros.row(c),
                    src: &self.x_last,
                    starts: &self.field_starts,
                    shift: ky * row_step,
                };
                let dst = &mut self.dw_last[c * patch + ky * run..][..run];
                sparse_grad::weighted_sum(fields, dst, accumulate);
            }
        }
        let Some(dxb) = dxb else { return };
        // A position's input gradient: its non-zero channels' weights, scaled, summed and
        // added onto its receptive field (which overlaps its neighbours').
        self.by_column.regroup(&self.nonzeros, geo.plane());
        self.dx_last.fill(0.0);
        for (p, &field) in self.field_starts.iter().enumerate() {
            let entries = self.by_column.column(p);
            if entries.is_empty() {
                continue;
            }
            for ky in 0..k {
                let at = field + ky * row_step;
                let weights = ScaledRows {
                    entries,
                    src: &self.w_last,
                    starts: &self.weight_starts,
                    shift: ky * run,
                };
                sparse_grad::weighted_sum(weights, &mut self.dx_last[at..at + run], true);
            }
        }
        from_channels_last(&self.dx_last, c_in, dxb);
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
