//! Inverted dropout: in training each element is zeroed with probability p and the rest are
//! scaled by 1/(1-p); in evaluation it is the identity.

use super::{Backward, Layer, Pass, Reads, Shape};
use pstrain_core::rng::splitmix64_at;

pub struct Dropout {
    shape: Shape,
    p: f32,
    /// The factor each element was multiplied by in the last training forward pass.
    mask: Vec<f32>,
}

impl Dropout {
    pub fn new(shape: Shape, p: f32) -> Self {
        assert!((0.0..1.0).contains(&p));
        Dropout {
            shape,
            p,
            mask: Vec::new(),
        }
    }
}

impl Layer for Dropout {
    fn input_shape(&self) -> Shape {
        self.shape
    }

    fn output_shape(&self) -> Shape {
        self.shape
    }

    fn forward(&mut self, _: &[f32], x: &[f32], y: &mut [f32], pass: &mut Pass<'_>) {
        let n = self.shape.len() * pass.batch;
        if !pass.train || self.p == 0.0 {
            y[..n].copy_from_slice(&x[..n]);
            self.mask.clear();
            return;
        }
        let scale = 1.0 / (1.0 - self.p);
        // Dropped when an element's 32-bit uniform is below p * 2^32.
        let threshold = (f64::from(self.p) * 4_294_967_296.0) as u64;
        let per = self.shape.len();
        self.mask.resize(n, 0.0);
        for (s, ((ys, xs), ms)) in y[..n]
            .chunks_exact_mut(per)
            .zip(x[..n].chunks_exact(per))
            .zip(self.mask.chunks_exact_mut(per))
            .enumerate()
        {
            // The sample's SplitMix64 stream, indexed by element (each value computed on its
            // own, so the loop vectorises).
            let key = pass.rng.fork(pass.first_sample + s as u64).next_u64();
            for (j, ((o, &i), m)) in ys.iter_mut().zip(xs).zip(ms.iter_mut()).enumerate() {
                let u = splitmix64_at(key, j as u64) >> 32;
                *m = if u < threshold { 0.0 } else { scale };
                *o = i * *m;
            }
        }
    }

    fn reads(&self) -> Reads {
        Reads::NOTHING
    }

    fn backward(&mut self, _: &[f32], io: Backward<'_>, _: &mut [f32], pass: &mut Pass<'_>) {
        let Backward { dy, dx, .. } = io;
        let n = self.shape.len() * pass.batch;
        let Some(dx) = dx else { return };
        if self.mask.is_empty() {
            dx[..n].copy_from_slice(&dy[..n]);
        } else {
            for ((d, &g), &m) in dx[..n].iter_mut().zip(&dy[..n]).zip(&self.mask) {
                *d = g * m;
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
        gradcheck::check(&mut Dropout::new(Shape::new(2, 3, 3), 0.4), 2, 6);
    }

    #[test]
    fn drops_about_p_and_keeps_the_mean() {
        let n = 100_000;
        let mut d = Dropout::new(Shape::new(n, 1, 1), 0.25);
        let x = vec![1.0; n];
        let mut y = vec![0.0; n];
        let mut rng = Rng::new(1);
        let mut pass = Pass {
            batch: 1,
            train: true,
            rng: &mut rng,
            first_sample: 0,
        };
        d.forward(&[], &x, &mut y, &mut pass);
        let zeros = y.iter().filter(|&&v| v == 0.0).count() as f32 / n as f32;
        let mean = y.iter().sum::<f32>() / n as f32;
        assert!((zeros - 0.25).abs() < 0.01, "{zeros}");
        assert!((mean - 1.0).abs() < 0.02, "{mean}");
        pass.train = false;
        d.forward(&[], &x, &mut y, &mut pass);
        assert!(y.iter().all(|&v| v == 1.0));
    }
}
