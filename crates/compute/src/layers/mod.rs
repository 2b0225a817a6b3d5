//! The layer interface and the layers the models are built from.
//!
//! A layer works on a batch in NCHW order, reads its parameters from and writes its gradients
//! to its own slice of the model's flat buffers, and keeps whatever it needs between forward
//! and backward (pooling indices, dropout masks) in its own scratch space.

pub mod conv2d;
pub mod dropout;
pub mod linear;
pub mod loss;
pub mod maxpool;
pub mod relu;
mod sparse_grad;

pub use conv2d::Conv2d;
pub use dropout::Dropout;
pub use linear::Linear;
pub use maxpool::MaxPool2d;
pub use relu::Relu;

use pstrain_core::Rng;

/// Per-sample activation shape (channels, height, width); a flat vector is (n, 1, 1).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Shape {
    pub c: usize,
    pub h: usize,
    pub w: usize,
}

impl Shape {
    pub const fn new(c: usize, h: usize, w: usize) -> Self {
        Shape { c, h, w }
    }

    pub const fn len(&self) -> usize {
        self.c * self.h * self.w
    }

    pub const fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// What a forward or backward pass needs besides the tensors.
pub struct Pass<'a> {
    pub batch: usize,
    pub train: bool,
    /// This layer's stream for the step; a layer drawing per sample forks it by the sample's
    /// index in the whole batch (`first_sample` + its index here), so that the draws do not
    /// depend on how the batch was split across threads.
    pub rng: &'a mut Rng,
    pub first_sample: u64,
}

/// The tensors of a backward pass: the forward input and output, the output's gradient, and
/// where to write the input's gradient (`None` when nobody needs it).
pub struct Backward<'a> {
    pub x: &'a [f32],
    pub y: &'a [f32],
    pub dy: &'a [f32],
    pub dx: Option<&'a mut [f32]>,
}

/// What a layer's `backward` reads of its forward pass (a chain keeps only that).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Reads {
    /// The forward input `Backward::x`.
    pub x: bool,
    /// The forward output `Backward::y`.
    pub y: bool,
}

impl Reads {
    /// Only its input (convolutions, fully connected layers: the default).
    pub const INPUT: Reads = Reads { x: true, y: false };
    /// Only its output (ReLU).
    pub const OUTPUT: Reads = Reads { x: false, y: true };
    /// Neither: what it needs it kept itself (max-pool's argmax, dropout's mask).
    pub const NOTHING: Reads = Reads { x: false, y: false };
}

pub trait Layer: Send {
    /// Parameter tensors relative to this layer, in the order they sit in its slice (none by
    /// default).
    fn param_shapes(&self) -> Vec<(&'static str, Vec<usize>)> {
        Vec::new()
    }
    fn input_shape(&self) -> Shape;
    fn output_shape(&self) -> Shape;
    /// PyTorch's default initialisation for this layer (nothing to do without parameters).
    fn init(&self, _params: &mut [f32], _rng: &mut Rng) {}
    /// `y = f(x)` for `pass.batch` samples.
    fn forward(&mut self, params: &[f32], x: &[f32], y: &mut [f32], pass: &mut Pass<'_>);
    /// What `backward` reads of the forward pass (`Backward::x`, `Backward::y`); a chain may
    /// reuse a buffer that no backward reads. Declaring less than it reads is a bug the
    /// layer tests catch (`gradcheck` passes only what is declared).
    fn reads(&self) -> Reads {
        Reads::INPUT
    }
    /// Whether `forward_in_place` may write the output over the input (same shape, element
    /// by element), so that a chain gives input and output one buffer.
    fn elementwise(&self) -> bool {
        false
    }
    /// `forward` with `xy` holding the input and receiving the output.
    fn forward_in_place(&mut self, params: &[f32], xy: &mut [f32], pass: &mut Pass<'_>) {
        let x = xy.to_vec();
        self.forward(params, &x, xy, pass);
    }
    /// Writes (does not accumulate) this layer's parameter gradients into `grads`, and the
    /// input gradient into `io.dx` when asked for (the first layer is not).
    fn backward(
        &mut self,
        params: &[f32],
        io: Backward<'_>,
        grads: &mut [f32],
        pass: &mut Pass<'_>,
    );
}

/// PyTorch's default for conv and linear layers: kaiming_uniform(a = sqrt(5)) for the weight
/// and U(-1/sqrt(fan_in), 1/sqrt(fan_in)) for the bias, which is the same bound for both.
pub(crate) fn init_fan_in(params: &mut [f32], fan_in: usize, rng: &mut Rng) {
    let bound = 1.0 / (fan_in as f32).sqrt();
    for p in params {
        *p = rng.uniform(-bound, bound);
    }
}

#[cfg(test)]
pub(crate) mod gradcheck {
    //! Central finite differences in f64 around the f32 layers, for the per-layer tests.
    use super::*;

    /// Loss L = sum(y * r) for a fixed random r, so dL/dy = r.
    fn loss(layer: &mut dyn Layer, params: &[f32], x: &[f32], r: &[f32], batch: usize) -> f64 {
        let mut y = vec![0.0; layer.output_shape().len() * batch];
        let mut rng = Rng::new(99);
        let mut pass = Pass {
            batch,
            train: true,
            rng: &mut rng,
            first_sample: 0,
        };
        layer.forward(params, x, &mut y, &mut pass);
        y.iter()
            .zip(r)
            .map(|(&a, &b)| f64::from(a) * f64::from(b))
            .sum()
    }

    /// One training pass forward and backward with upstream gradient `dy`: the output, the
    /// input gradient and the parameter gradients. Masks come from the same seed `loss` uses.
    pub fn forward_backward(
        layer: &mut dyn Layer,
        params: &[f32],
        x: &[f32],
        dy: &[f32],
        batch: usize,
    ) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
        let mut y = vec![0.0; layer.output_shape().len() * batch];
        let mut dx = vec![0.0; x.len()];
        let mut grads = vec![0.0; params.len()];
        let mut mask_rng = Rng::new(99);
        let mut pass = Pass {
            batch,
            train: true,
            rng: &mut mask_rng,
            first_sample: 0,
        };
        layer.forward(params, x, &mut y, &mut pass);
        if layer.elementwise() {
            // In place gives the same output and leaves the layer as `forward` did.
            let mut xy = x.to_vec();
            let mut again = Rng::new(99);
            let mut pass = Pass {
                batch,
                train: true,
                rng: &mut again,
                first_sample: 0,
            };
            layer.forward_in_place(params, &mut xy, &mut pass);
            let bits = |v: &[f32]| v.iter().map(|f| f.to_bits()).collect::<Vec<_>>();
            assert_eq!(bits(&xy), bits(&y), "forward_in_place differs from forward");
        }
        // Only what the layer declares it reads: an undeclared read indexes an empty slice.
        let reads = layer.reads();
        let io = Backward {
            x: if reads.x { x } else { &[] },
            y: if reads.y { &y } else { &[] },
            dy,
            dx: Some(&mut dx),
        };
        layer.backward(params, io, &mut grads, &mut pass);
        (y, dx, grads)
    }

    /// Checks analytic gradients of `layer` (params and input) against finite differences.
    /// Layers with randomness must draw the same mask for the same rng seed.
    pub fn check(layer: &mut dyn Layer, batch: usize, seed: u64) {
        let mut rng = Rng::new(seed);
        let n_params: usize = layer
            .param_shapes()
            .iter()
            .map(|(_, s)| s.iter().product::<usize>())
            .sum();
        let mut params = vec![0.0f32; n_params];
        layer.init(&mut params, &mut rng);
        let x: Vec<f32> = (0..layer.input_shape().len() * batch)
            .map(|_| rng.uniform(-1.0, 1.0))
            .collect();
        let r: Vec<f32> = (0..layer.output_shape().len() * batch)
            .map(|_| rng.uniform(-1.0, 1.0))
            .collect();

        let (_, dx, grads) = forward_backward(layer, &params, &x, &r, batch);

        // Points within eps of a kink (ReLU at 0, a max-pool tie) have no derivative there;
        // they show up as one-sided differences that disagree, and are skipped, but only a few
        // may be, so a wrong gradient cannot hide behind the rule.
        let eps = 1e-2f32;
        let base = loss(layer, &params, &x, &r, batch);
        let mut checked = 0usize;
        let mut skipped = 0usize;
        let mut compare = |analytic: f32, plus: f64, minus: f64, what: &str, i: usize| {
            let (fwd, bwd) = (
                (plus - base) / f64::from(eps),
                (base - minus) / f64::from(eps),
            );
            if (fwd - bwd).abs() > 1e-2 * (1.0 + fwd.abs()) {
                skipped += 1;
                return;
            }
            checked += 1;
            let numeric = (plus - minus) / (2.0 * f64::from(eps));
            let err = (numeric - f64::from(analytic)).abs() / (1.0 + numeric.abs());
            assert!(
                err < 2e-3,
                "{what}[{i}]: analytic {analytic}, numeric {numeric}"
            );
        };
        for i in 0..n_params {
            let mut p = params.clone();
            p[i] += eps;
            let plus = loss(layer, &p, &x, &r, batch);
            p[i] -= 2.0 * eps;
            let minus = loss(layer, &p, &x, &r, batch);
            compare(grads[i], plus, minus, "param", i);
        }
        for i in 0..x.len() {
            let mut xp = x.clone();
            xp[i] += eps;
            let plus = loss(layer, &params, &xp, &r, batch);
            xp[i] -= 2.0 * eps;
            let minus = loss(layer, &params, &xp, &r, batch);
            compare(dx[i], plus, minus, "input", i);
        }
        assert!(
            skipped * 20 <= checked + skipped,
            "{skipped} of {} points sat on kinks",
            checked + skipped
        );
    }
}
