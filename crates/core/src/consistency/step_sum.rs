//! A step's gradients combined into one update: the sample-weighted mean, or the sum. The one
//! place a step is summed, for sync steps and for a follower's coordinated steps alike.

use crate::config::Aggregate;
use crate::optimizer::ScaledGrad;
use crate::splitter::{self, Splitter};

#[derive(Debug, Clone)]
pub struct StepSum {
    /// Each gradient times its weight (samples for `Mean`, 1 for `Sum`); stale values when
    /// `empty` (the first gradient of a step overwrites them, so clearing costs no pass).
    accum: Vec<f32>,
    /// No gradient was added since the last `clear`.
    empty: bool,
    /// The weights' total; the mean is `accum / weight`.
    weight: f64,
    aggregate: Aggregate,
}

impl StepSum {
    pub fn new(len: usize, aggregate: Aggregate) -> Self {
        StepSum {
            accum: vec![0.0; len],
            empty: true,
            weight: 0.0,
            aggregate,
        }
    }

    pub fn add(&mut self, samples: u32, grad: &[f32], splitter: Option<&dyn Splitter>) {
        self.add_scaled(samples, 1.0, grad, splitter);
    }

    /// Adds `scale * grad` with the weight of `samples` (a damped gradient counts for its
    /// samples in the mean, so damping shrinks the update rather than re-weighting it away),
    /// in the pieces `splitter` cuts the slice into.
    pub fn add_scaled(
        &mut self,
        samples: u32,
        scale: f32,
        grad: &[f32],
        splitter: Option<&dyn Splitter>,
    ) {
        let weight = match self.aggregate {
            Aggregate::Mean => samples as f32,
            Aggregate::Sum => 1.0,
        };
        let factor = weight * scale;
        if std::mem::replace(&mut self.empty, false) {
            splitter::zip_pieces(splitter, &mut self.accum, grad, |accum, grad| {
                for (a, &g) in accum.iter_mut().zip(grad) {
                    *a = factor * g;
                }
            });
        } else {
            splitter::zip_pieces(splitter, &mut self.accum, grad, |accum, grad| {
                for (a, &g) in accum.iter_mut().zip(grad) {
                    *a += factor * g;
                }
            });
        }
        self.weight += f64::from(weight);
    }

    /// The step's update (the sum and the scale that makes it the mean, applied in the
    /// optimizer's own loop), or `None` if nothing with weight was added; the sum is then
    /// ready to be `clear`ed for the next step.
    pub fn combined(&mut self) -> Option<ScaledGrad<'_>> {
        // Empty implies no weight; weight can also stay 0 after adds (gradients of 0 samples).
        if self.weight <= 0.0 {
            return None;
        }
        let scale = match self.aggregate {
            Aggregate::Mean => (1.0 / self.weight) as f32,
            Aggregate::Sum => 1.0,
        };
        self.weight = 0.0;
        Some(ScaledGrad {
            values: &self.accum,
            scale,
        })
    }

    pub fn clear(&mut self) {
        self.empty = true;
        self.weight = 0.0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mean_weights_by_samples_and_sum_adds() {
        let mut mean = StepSum::new(2, Aggregate::Mean);
        let mean_of = |s: &mut StepSum| {
            s.combined()
                .map(|u| u.values.iter().map(|v| v * u.scale).collect::<Vec<f32>>())
        };
        mean.add(1, &[4.0, 0.0], None);
        mean.add(3, &[0.0, 4.0], None);
        assert_eq!(mean_of(&mut mean), Some(vec![1.0, 3.0]));
        mean.clear();
        assert_eq!(mean_of(&mut mean), None);
        // After a clear the next step starts from nothing: the old sum is not in it.
        mean.add(2, &[1.0, -1.0], None);
        assert_eq!(mean_of(&mut mean), Some(vec![1.0, -1.0]));
        mean.clear();
        let mut sum = StepSum::new(2, Aggregate::Sum);
        sum.add(1, &[4.0, 0.0], None);
        sum.add(3, &[0.0, 4.0], None);
        assert_eq!(mean_of(&mut sum), Some(vec![4.0, 4.0]));
    }
}
