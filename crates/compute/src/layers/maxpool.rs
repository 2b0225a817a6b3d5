//! Max pooling with a square window and stride equal to the window (PyTorch's default),
//! dropping the ragged edge as PyTorch's floor mode does.

use super::{Backward, Layer, Pass, Reads, Shape};

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

impl MaxPool2d {
    /// Any window.
    fn forward_any(&mut self, x: &[f32], y: &mut [f32], batch: usize) {
        let (inp, out, k) = (self.input, self.output_shape(), self.window);
        let mut o = 0;
        for b in 0..batch {
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

    /// The 2x2 window (the cnn's): two input rows at a time, with no index arithmetic per
    /// element. Same results as the general loop (the first maximum wins).
    fn forward_2x2(&mut self, x: &[f32], y: &mut [f32], batch: usize) {
        let (inp, out) = (self.input, self.output_shape());
        let mut o = 0;
        for xb in x[..batch * inp.len()].chunks_exact(inp.len()) {
            for c in 0..inp.c {
                for oy in 0..out.h {
                    let top_at = (c * inp.h + 2 * oy) * inp.w;
                    let (top, bottom) = xb[top_at..top_at + 2 * inp.w].split_at(inp.w);
                    let ys = &mut y[o..o + out.w];
                    let at = &mut self.argmax[o..o + out.w];
                    let windows = top.chunks_exact(2).zip(bottom.chunks_exact(2));
                    for (ox, ((t, d), (yo, ao))) in windows.zip(ys.iter_mut().zip(at)).enumerate() {
                        let left = top_at + 2 * ox;
                        let (mut best, mut best_at) = (t[0], left);
                        if t[1] > best {
                            (best, best_at) = (t[1], left + 1);
                        }
                        if d[0] > best {
                            (best, best_at) = (d[0], left + inp.w);
                        }
                        if d[1] > best {
                            (best, best_at) = (d[1], left + inp.w + 1);
                        }
                        *yo = best;
                        *ao = best_at as u32;
                    }
                    o += out.w;
                }
            }
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
        self.argmax
            .resize(self.output_shape().len() * pass.batch, 0);
        if self.window == 2 {
            self.forward_2x2(x, y, pass.batch);
        } else {
            self.forward_any(x, y, pass.batch);
        }
    }

    fn reads(&self) -> Reads {
        Reads::NOTHING
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

    #[test]
    fn the_2x2_path_matches_the_general_one_with_ties_and_ragged_edges() {
        let shape = Shape::new(3, 7, 9);
        let batch = 2;
        let mut rng = Rng::new(4);
        // Few distinct values: many ties, where the first maximum must win.
        let x: Vec<f32> = (0..batch * shape.len())
            .map(|_| (rng.next_f32() * 4.0).floor() - 2.0)
            .collect();
        let out = MaxPool2d::new(shape, 2).output_shape().len() * batch;
        let run = |general: bool| {
            let mut pool = MaxPool2d::new(shape, 2);
            pool.argmax.resize(out, 0);
            let mut y = vec![0.0; out];
            if general {
                pool.forward_any(&x, &mut y, batch);
            } else {
                pool.forward_2x2(&x, &mut y, batch);
            }
            (y, pool.argmax)
        };
        assert_eq!(run(true), run(false));
    }
}
