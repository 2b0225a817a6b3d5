//! Max pooling with a square window and stride equal to the window (PyTorch's default),
//! dropping the ragged edge as PyTorch's floor mode does.

use super::{Backward, Layer, Pass, Shape};

pub struct MaxPool2d {
    input: Shape,
    window: usize,
    /// For every output element, the index within its sample of the input that won.
    argmax: Vec<u32>,
}

impl MaxPool2d {
    pub fn new(input: Shape, window: usize) -> Self {
        assert!(window >= 1 && window <= input.h && window <= input.w);
        assert!(input.len() <= u32::MAX as usize);
        MaxPool2d {
            input,
            window,
            argmax: Vec::new(),
        }
    }
}

impl Layer for MaxPool2d {
    fn input_shape(&self) -> Shape {
        self.input
    }

    fn output_shape(&self) -> Shape {
        Shape::new(
            self.input.c,
            self.input.h / self.window,
            self.input.w / self.window,
        )
    }

    fn forward(&mut self, _: &[f32], x: &[f32], y: &mut [f32], pass: &mut Pass<'_>) {
        let (inp, out, k) = (self.input, self.output_shape(), self.window);
        self.argmax.resize(out.len() * pass.batch, 0);
        let mut o = 0;
        for b in 0..pass.batch {
            let xb = &x[b * inp.len()..(b + 1) * inp.len()];
            for c in 0..inp.c {
                for oy in 0..out.h {
                    for ox in 0..out.w {
                        let mut best_at = (c * inp.h + oy * k) * inp.w + ox * k;
                        let mut best = xb[best_at];
                        for ky in 0..k {
                            let row = (c * inp.h + oy * k + ky) * inp.w + ox * k;
                            for (kx, &v) in xb[row..row + k].iter().enumerate() {
                                // Strictly greater: the first maximum wins, as in PyTorch.
                                if v > best {
                                    best = v;
                                    best_at = row + kx;
                                }
                            }
                        }
                        y[o] = best;
                        self.argmax[o] = best_at as u32;
                        o += 1;
                    }
                }
            }
        }
    }

    fn backward(&mut self, _: &[f32], io: Backward<'_>, _: &mut [f32], pass: &mut Pass<'_>) {
        let Backward { dy, dx, .. } = io;
        let Some(dx) = dx else { return };
        let (in_len, out_len) = (self.input.len(), self.output_shape().len());
        dx[..in_len * pass.batch].fill(0.0);
        for b in 0..pass.batch {
            let dxb = &mut dx[b * in_len..(b + 1) * in_len];
            let range = b * out_len..(b + 1) * out_len;
            for (&g, &at) in dy[range.clone()].iter().zip(&self.argmax[range]) {
                dxb[at as usize] += g;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::layers::gradcheck;
    use pstrain_core::Rng;

    #[test]
    fn gradients_match_finite_differences() {
        // 7x8 with window 3 also exercises the dropped ragged edge.
        gradcheck::check(&mut MaxPool2d::new(Shape::new(2, 7, 8), 3), 2, 4);
        gradcheck::check(&mut MaxPool2d::new(Shape::new(3, 4, 4), 2), 2, 5);
    }

    #[test]
    fn picks_window_maxima() {
        let mut pool = MaxPool2d::new(Shape::new(1, 4, 4), 2);
        let x: Vec<f32> = (0..16).map(|i| ((i * 7) % 16) as f32).collect();
        let mut y = vec![0.0; 4];
        let mut rng = Rng::new(0);
        let mut pass = Pass {
            batch: 1,
            train: false,
            rng: &mut rng,
            first_sample: 0,
        };
        pool.forward(&[], &x, &mut y, &mut pass);
        // x rows: [0 7 14 5] [12 3 10 1] [8 15 6 13] [4 11 2 9]
        assert_eq!(y, vec![12.0, 14.0, 15.0, 13.0]);
    }
}
