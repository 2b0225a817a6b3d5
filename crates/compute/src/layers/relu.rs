//! Rectified linear unit.

use super::{Backward, Layer, Pass, Reads, Shape};

pub struct Relu {
    shape: Shape,
}

impl Relu {
    pub fn new(shape: Shape) -> Self {
        Relu { shape }
    }
}

impl Layer for Relu {
    fn input_shape(&self) -> Shape {
        self.shape
    }

    fn output_shape(&self) -> Shape {
        self.shape
    }

    fn forward(&mut self, _: &[f32], x: &[f32], y: &mut [f32], pass: &mut Pass<'_>) {
        let n = self.shape.len() * pass.batch;
        for (o, &i) in y[..n].iter_mut().zip(&x[..n]) {
            *o = i.max(0.0);
        }
    }

    fn reads(&self) -> Reads {
        Reads::OUTPUT
    }

    fn elementwise(&self) -> bool {
        true
    }

    fn forward_in_place(&mut self, _: &[f32], xy: &mut [f32], pass: &mut Pass<'_>) {
        let n = self.shape.len() * pass.batch;
        for v in &mut xy[..n] {
            *v = v.max(0.0);
        }
    }

    fn backward(&mut self, _: &[f32], io: Backward<'_>, _: &mut [f32], pass: &mut Pass<'_>) {
        let Backward { y, dy, dx, .. } = io;
        let n = self.shape.len() * pass.batch;
        if let Some(dx) = dx {
            for ((d, &g), &o) in dx[..n].iter_mut().zip(&dy[..n]).zip(&y[..n]) {
                *d = if o > 0.0 { g } else { 0.0 };
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::layers::gradcheck;

    #[test]
    fn gradients_match_finite_differences() {
        gradcheck::check(&mut Relu::new(Shape::new(3, 4, 4)), 2, 3);
    }
}
