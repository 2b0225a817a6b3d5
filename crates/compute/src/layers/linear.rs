//! Fully connected layer `y = x W^T + b`, with W stored (out, in) as in PyTorch.

use super::{init_fan_in, Backward, Layer, Pass, Shape};
use crate::dot_product::matmul_nt;
use crate::linalg::{matmul, MatRef};
use pstrain_core::Rng;

pub struct Linear {
    input: Shape,
    out_features: usize,
}

impl Linear {
    /// Any input shape is flattened per sample in (c, h, w) order, as `torch.flatten(x, 1)`.
    pub fn new(input: Shape, out_features: usize) -> Self {
        Linear {
            input,
            out_features,
        }
    }
}

impl Layer for Linear {
    fn param_shapes(&self) -> Vec<(&'static str, Vec<usize>)> {
        vec![
            ("weight", vec![self.out_features, self.input.len()]),
            ("bias", vec![self.out_features]),
        ]
    }

    fn input_shape(&self) -> Shape {
        self.input
    }

    fn output_shape(&self) -> Shape {
        Shape::new(self.out_features, 1, 1)
    }

    fn init(&self, params: &mut [f32], rng: &mut Rng) {
        init_fan_in(params, self.input.len(), rng);
    }

    fn forward(&mut self, params: &[f32], x: &[f32], y: &mut [f32], pass: &mut Pass<'_>) {
        let (n_in, n_out, batch) = (self.input.len(), self.out_features, pass.batch);
        let (weight, bias) = params.split_at(n_out * n_in);
        for row in y[..batch * n_out].chunks_exact_mut(n_out) {
            row.copy_from_slice(bias);
        }
        // Y += X [batch x in] * W^T: rows of X against rows of W, without the copy of W the
        // GEMM kernels would make (`dot_product`, with AVX-512), else as a GEMM.
        let x = &x[..batch * n_in];
        if matmul_nt(y, x, weight, batch, n_out, n_in, true).is_none() {
            matmul(
                y,
                MatRef::new(x, batch, n_in),
                MatRef::new(weight, n_out, n_in).t(),
                true,
            );
        }
    }

    fn backward(
        &mut self,
        params: &[f32],
        io: Backward<'_>,
        grads: &mut [f32],
        pass: &mut Pass<'_>,
    ) {
        let Backward { x, dy, dx, .. } = io;
        let (n_in, n_out, batch) = (self.input.len(), self.out_features, pass.batch);
        let (dweight, dbias) = grads.split_at_mut(n_out * n_in);
        let dy = MatRef::new(&dy[..batch * n_out], batch, n_out);
        // dW = dY^T [out x batch] * X [batch x in]
        matmul(
            dweight,
            dy.t(),
            MatRef::new(&x[..batch * n_in], batch, n_in),
            false,
        );
        dbias.fill(0.0);
        for row in dy.data.chunks_exact(n_out) {
            for (db, &g) in dbias.iter_mut().zip(row) {
                *db += g;
            }
        }
        if let Some(dx) = dx {
            // dX = dY [batch x out] * W [out x in]
            matmul(
                dx,
                dy,
                MatRef::new(&params[..n_out * n_in], n_out, n_in),
                false,
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::layers::gradcheck;

    #[test]
    fn gradients_match_finite_differences() {
        gradcheck::check(&mut Linear::new(Shape::new(2, 2, 3), 4), 3, 7);
    }
}
