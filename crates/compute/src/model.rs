//! The `Model` trait every compute engine implements, and the models pstrain ships.

use crate::error::ComputeError;
use pstrain_core::{Layout, Rng};

/// Loss and accuracy of one training step.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct StepStats {
    /// Mean loss over the batch.
    pub loss: f32,
    pub correct: usize,
    pub samples: usize,
}

/// Loss and accuracy over a whole evaluation set.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct EvalStats {
    pub loss: f64,
    pub correct: usize,
    pub samples: usize,
}

impl EvalStats {
    pub fn accuracy(&self) -> f64 {
        if self.samples == 0 {
            0.0
        } else {
            self.correct as f64 / self.samples as f64
        }
    }
}

/// A differentiable model working on flat buffers laid out by `layout()`.
///
/// Parameters and gradients live outside the model, in the buffers the parameter server moves,
/// so a step costs no copies; the model owns only its scratch activations.
pub trait Model: Send {
    fn layout(&self) -> &Layout;
    /// Values per input sample (784 for 28x28 images).
    fn input_len(&self) -> usize;
    fn classes(&self) -> usize;
    /// Values a training step keeps per sample of its batch, at the least (its activations):
    /// what a batch size costs in memory, checked before a run allocates it.
    fn values_per_sample(&self) -> usize;
    /// Fills `params` with a fresh initialisation.
    fn init_params(&self, params: &mut [f32], rng: &mut Rng);
    /// Forward and backward on one batch; writes the gradient of the mean loss into `grads`.
    fn train_step(
        &mut self,
        params: &[f32],
        images: &[f32],
        labels: &[u8],
        grads: &mut [f32],
        rng: &mut Rng,
    ) -> Result<StepStats, ComputeError>;
    /// Loss and accuracy in evaluation mode (no dropout), over any number of samples.
    fn evaluate(
        &mut self,
        params: &[f32],
        images: &[f32],
        labels: &[u8],
    ) -> Result<EvalStats, ComputeError>;
}

/// Options that change how a model computes, not what it is.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ModelOptions {
    /// False turns dropout into the identity in training too (for reference checks).
    pub dropout: bool,
    pub threads: usize,
}

impl Default for ModelOptions {
    fn default() -> Self {
        ModelOptions {
            dropout: true,
            threads: 1,
        }
    }
}
