//! A step's gradients combined into one update: the sample-weighted mean, or the sum. The one
//! place a step is summed, for sync steps and for a follower's coordinated steps alike.

use crate::config::Aggregate;

#[derive(Debug, Clone)]
pub struct StepSum {
    /// Each gradient times its weight (samples for `Mean`, 1 for `Sum`).
    accum: Vec<f32>,
    /// The weights' total; the mean is `accum / weight`.
    weight: f64,
    aggregate: Aggregate,
}

impl StepSum {
    pub fn new(len: usize, aggregate: Aggregate) -> Self {
        StepSum {
            accum: vec![0.0; len],
            weight: 0.0,
            aggregate,
        }
    }

    pub fn add(&mut self, samples: u32, grad: &[f32]) {
        self.add_scaled(samples, 1.0, grad);
    }

    /// Adds `scale * grad` with the weight of `samples` (a damped gradient counts for its
    /// samples in the mean, so damping shrinks the update rather than re-weighting it away).
    pub fn add_scaled(&mut self, samples: u32, scale: f32, grad: &[f32]) {
        let weight = match self.aggregate {
            Aggregate::Mean => samples as f32,
            Aggregate::Sum => 1.0,
        };
        let factor = weight * scale;
        for (a, &g) in self.accum.iter_mut().zip(grad) {
            *a += factor * g;
        }
        self.weight += f64::from(weight);
    }

    /// The step's update, or `None` if no gradient was added; the sum is then ready to be
    /// `clear`ed for the next step.
    pub fn combined(&mut self) -> Option<&[f32]> {
        if self.weight <= 0.0 {
            return None;
        }
        if let Aggregate::Mean = self.aggregate {
            let scale = (1.0 / self.weight) as f32;
            if scale != 1.0 {
                for a in &mut self.accum {
                    *a *= scale;
                }
            }
        }
        self.weight = 0.0;
        Some(&self.accum)
    }

    pub fn clear(&mut self) {
        self.accum.fill(0.0);
        self.weight = 0.0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mean_weights_by_samples_and_sum_adds() {
        let mut mean = StepSum::new(2, Aggregate::Mean);
        mean.add(1, &[4.0, 0.0]);
        mean.add(3, &[0.0, 4.0]);
        assert_eq!(mean.combined(), Some(&[1.0, 3.0][..]));
        mean.clear();
        assert_eq!(mean.combined(), None);
        let mut sum = StepSum::new(2, Aggregate::Sum);
        sum.add(1, &[4.0, 0.0]);
        sum.add(3, &[0.0, 4.0]);
        assert_eq!(sum.combined(), Some(&[4.0, 4.0][..]));
    }
}
