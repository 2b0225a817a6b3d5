//! A step's gradients combined into one update: the sample-weighted mean, or the sum. The one
//! place a step is summed, for sync steps and for a follower's coordinated steps alike.

use crate::config::Aggregate;
use crate::optimizer::ScaledGrad;
use crate::splitter::{self, Splitter};
use crate::update_log::{Contribution, Source};

#[derive(Debug, Clone)]
pub struct StepSum {
    /// Each gradient times its weight (samples for `Mean`, 1 for `Sum`); stale values when
    /// `empty` (the first gradient of a step overwrites them, so clearing costs no pass).
    accum: Vec<f32>,
    /// No gradient was added since the last `clear`.
    empty: bool,
    /// The weights' total; the mean is `accum / weight`.
    weight: f64,
    /// Every gradient added since the last `clear` was a sparse codec's error-fed sum.
    accumulated: bool,
    aggregate: Aggregate,
    /// The pushes added since the last `clear`, in order, for the shard's update log; kept
    /// only while every one of them said what it was made of (`Source::Push`).
    contributions: Vec<Contribution>,
    described: bool,
}

impl StepSum {
    pub fn new(len: usize, aggregate: Aggregate) -> Self {
        StepSum {
            accum: vec![0.0; len],
            empty: true,
            weight: 0.0,
            accumulated: false,
            aggregate,
            contributions: Vec::new(),
            described: true,
        }
    }

    /// Adds `grad.scale * grad.values` with the weight of `samples` (a damped gradient counts
    /// for its samples in the mean, so damping shrinks the update rather than re-weighting it
    /// away), in the pieces `splitter` cuts the slice into.
    pub fn add(&mut self, samples: u32, grad: ScaledGrad<'_>, splitter: Option<&dyn Splitter>) {
        let weight = match self.aggregate {
            Aggregate::Mean => samples as f32,
            Aggregate::Sum => 1.0,
        };
        let factor = weight * grad.scale;
        // The step is a sum of sparse sums only if every gradient in it is one.
        self.accumulated = grad.accumulated && (self.empty || self.accumulated);
        self.describe(samples, &grad);
        let grad = grad.values;
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
        let source = if self.described && !self.contributions.is_empty() {
            Source::Sum(&self.contributions)
        } else {
            Source::Unknown
        };
        Some(ScaledGrad {
            values: &self.accum,
            scale,
            accumulated: self.accumulated,
            source,
        })
    }

    pub fn clear(&mut self) {
        self.empty = true;
        self.weight = 0.0;
        self.contributions.clear();
        self.described = true;
    }

    /// Keeps what `grad` was made of, while the step's every push says so.
    fn describe(&mut self, samples: u32, grad: &ScaledGrad<'_>) {
        match grad.source {
            Source::Push { wire, clip } if self.described => {
                let part = Contribution::new(wire, clip, samples, grad.scale, grad.accumulated);
                self.contributions.push(part);
            }
            _ => {
                self.described = false;
                self.contributions.clear();
            }
        }
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
        let whole = ScaledGrad::whole;
        mean.add(1, whole(&[4.0, 0.0]), None);
        mean.add(3, whole(&[0.0, 4.0]), None);
        assert_eq!(mean_of(&mut mean), Some(vec![1.0, 3.0]));
        mean.clear();
        assert_eq!(mean_of(&mut mean), None);
        // After a clear the next step starts from nothing: the old sum is not in it.
        mean.add(2, whole(&[1.0, -1.0]), None);
        assert_eq!(mean_of(&mut mean), Some(vec![1.0, -1.0]));
        mean.clear();
        let mut sum = StepSum::new(2, Aggregate::Sum);
        sum.add(1, whole(&[4.0, 0.0]), None);
        sum.add(3, whole(&[0.0, 4.0]), None);
        assert_eq!(mean_of(&mut sum), Some(vec![4.0, 4.0]));
    }

    /// A step is a sum of sparse sums (for Adam's gaps) only if every gradient in it is one;
    /// a clear starts the next step's kind afresh.
    #[test]
    fn a_step_is_accumulated_only_if_every_gradient_is() {
        let sparse = |values| ScaledGrad {
            values,
            scale: 1.0,
            accumulated: true,
            source: Source::Unknown,
        };
        let mut sum = StepSum::new(2, Aggregate::Mean);
        let kind = |s: &mut StepSum| s.combined().map(|u| u.accumulated);
        sum.add(1, sparse(&[1.0, 0.0]), None);
        sum.add(1, sparse(&[0.0, 1.0]), None);
        assert_eq!(kind(&mut sum), Some(true));
        sum.clear();
        sum.add(1, sparse(&[1.0, 0.0]), None);
        sum.add(1, ScaledGrad::whole(&[1.0, 1.0]), None);
        assert_eq!(kind(&mut sum), Some(false));
        sum.clear();
        sum.add(1, ScaledGrad::whole(&[1.0, 1.0]), None);
        sum.add(1, sparse(&[0.0, 1.0]), None);
        assert_eq!(kind(&mut sum), Some(false));
        sum.clear();
        sum.add(1, sparse(&[0.0, 1.0]), None);
        assert_eq!(kind(&mut sum), Some(true));
    }
}
