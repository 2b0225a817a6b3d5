//! A model as a chain of layers over a flat parameter buffer, ending in log-softmax + NLL.

use crate::error::ComputeError;
use crate::layers::{loss::log_softmax_nll, Backward, Layer, Pass, Shape};
use crate::model::{EvalStats, Model, StepStats};
use pstrain_core::{Layout, Rng};
use std::ops::Range;

/// Samples per forward pass in `evaluate`: activations for more cost memory (the cnn's are
/// about half a megabyte per sample) and gain nothing (convolutions go sample by sample).
const EVAL_CHUNK: usize = 64;

pub struct Sequential {
    layers: Vec<Box<dyn Layer>>,
    /// Each layer's slice of the flat parameter buffer.
    ranges: Vec<Range<usize>>,
    layout: Layout,
    input: Shape,
    classes: usize,
    /// acts[i] is layer i's input; acts[last] the logits.
    acts: Vec<Vec<f32>>,
    /// Gradient buffers; two are enough, swapped as backward walks down the chain.
    delta: [Vec<f32>; 2],
}

impl Sequential {
    /// `layers` as (name, layer); parameters are named `name.weight`, `name.bias`, ...
    /// Panics if consecutive shapes disagree: models are built by code, not from input.
    pub fn new(input: Shape, layers: Vec<(&str, Box<dyn Layer>)>) -> Self {
        let mut specs: Vec<(String, Vec<usize>)> = Vec::new();
        let mut ranges = Vec::new();
        let mut offset = 0;
        let mut shape = input;
        for (name, layer) in &layers {
            assert_eq!(layer.input_shape(), shape, "layer {name}: input shape");
            shape = layer.output_shape();
            let start = offset;
            for (pname, pshape) in layer.param_shapes() {
                offset += pshape.iter().product::<usize>();
                specs.push((format!("{name}.{pname}"), pshape));
            }
            ranges.push(start..offset);
        }
        let classes = shape.len();
        let layout = Layout::new(specs.iter().map(|(n, s)| (n.clone(), &s[..])))
            .expect("model code declares a valid layout");
        Sequential {
            layers: layers.into_iter().map(|(_, l)| l).collect(),
            ranges,
            layout,
            input,
            classes,
            acts: Vec::new(),
            delta: [Vec::new(), Vec::new()],
        }
    }

    /// A non-empty batch of whole images with labels of this model's classes.
    pub(crate) fn check_inputs(&self, images: &[f32], labels: &[u8]) -> Result<(), ComputeError> {
        if labels.is_empty() {
            return Err(ComputeError::EmptyBatch);
        }
        let expected = labels.len() * self.input.len();
        if images.len() != expected {
            return Err(ComputeError::Shape {
                what: "images",
                expected,
                got: images.len(),
            });
        }
        if let Some((index, &label)) = labels
            .iter()
            .enumerate()
            .find(|(_, &l)| usize::from(l) >= self.classes)
        {
            return Err(ComputeError::Label {
                index,
                label,
                classes: self.classes,
            });
        }
        Ok(())
    }

    fn check_buffer(&self, what: &'static str, got: usize) -> Result<(), ComputeError> {
        if got == self.layout.len() {
            Ok(())
        } else {
            Err(ComputeError::Shape {
                what,
                expected: self.layout.len(),
                got,
            })
        }
    }

    /// Runs the chain on `images` (samples `first_sample..` of the step's batch); the logits
    /// end up in the last activation buffer. Each layer draws from its own fork of `rng`.
    fn forward(
        &mut self,
        params: &[f32],
        images: &[f32],
        batch: usize,
        train: bool,
        step: (&Rng, u64),
    ) {
        let n = self.layers.len();
        self.acts.resize_with(n + 1, Vec::new);
        self.acts[0].clear();
        self.acts[0].extend_from_slice(images);
        let (rng, first_sample) = step;
        for i in 0..n {
            let mut layer_rng = rng.fork(i as u64);
            let mut pass = Pass {
                batch,
                train,
                rng: &mut layer_rng,
                first_sample,
            };
            let out_len = self.layers[i].output_shape().len() * batch;
            let (before, after) = self.acts.split_at_mut(i + 1);
            let y = &mut after[0];
            y.resize(out_len, 0.0);
            self.layers[i].forward(&params[self.ranges[i].clone()], &before[i], y, &mut pass);
        }
    }

    /// Forward and backward on part of a step's batch: samples `first_sample..` of a batch of
    /// `whole` samples. Writes this part's share of the gradient of the whole batch's mean
    /// loss (the parts' gradients add up to the whole one's); returns this part's mean loss.
    pub(crate) fn train_part(
        &mut self,
        params: &[f32],
        images: &[f32],
        labels: &[u8],
        grads: &mut [f32],
        step: (&Rng, u64),
        whole: usize,
    ) -> Result<StepStats, ComputeError> {
        self.check_buffer("parameters", params.len())?;
        self.check_buffer("gradients", grads.len())?;
        self.check_inputs(images, labels)?;
        let batch = labels.len();
        self.forward(params, images, batch, true, step);
        let n = self.layers.len();
        let [d_out, d_in] = &mut self.delta;
        d_out.resize(self.classes * batch, 0.0);
        let (loss, correct) =
            log_softmax_nll(&self.acts[n], labels, self.classes, Some((d_out, whole)));
        // Backward draws nothing (dropout reuses its forward mask).
        let mut unused = Rng::new(0);
        let mut pass = Pass {
            batch,
            train: true,
            rng: &mut unused,
            first_sample: step.1,
        };
        for i in (0..n).rev() {
            let dx = if i > 0 {
                d_in.resize(self.layers[i].input_shape().len() * batch, 0.0);
                Some(&mut d_in[..])
            } else {
                None
            };
            let io = Backward {
                x: &self.acts[i],
                y: &self.acts[i + 1],
                dy: d_out,
                dx,
            };
            self.layers[i].backward(
                &params[self.ranges[i].clone()],
                io,
                &mut grads[self.ranges[i].clone()],
                &mut pass,
            );
            std::mem::swap(d_out, d_in);
        }
        Ok(StepStats {
            loss,
            correct,
            samples: batch,
        })
    }
}

impl Model for Sequential {
    fn layout(&self) -> &Layout {
        &self.layout
    }

    fn input_len(&self) -> usize {
        self.input.len()
    }

    fn classes(&self) -> usize {
        self.classes
    }

    fn init_params(&self, params: &mut [f32], rng: &mut Rng) {
        for (layer, range) in self.layers.iter().zip(&self.ranges) {
            layer.init(&mut params[range.clone()], rng);
        }
    }

    fn train_step(
        &mut self,
        params: &[f32],
        images: &[f32],
        labels: &[u8],
        grads: &mut [f32],
        rng: &mut Rng,
    ) -> Result<StepStats, ComputeError> {
        let step = rng.next_u64();
        self.train_part(
            params,
            images,
            labels,
            grads,
            (&Rng::new(step), 0),
            labels.len(),
        )
    }

    fn evaluate(
        &mut self,
        params: &[f32],
        images: &[f32],
        labels: &[u8],
    ) -> Result<EvalStats, ComputeError> {
        self.check_buffer("parameters", params.len())?;
        self.check_inputs(images, labels)?;
        let rng = Rng::new(0); // unused: evaluation draws no randomness
        let mut stats = EvalStats {
            loss: 0.0,
            correct: 0,
            samples: 0,
        };
        let per = self.input.len();
        for (imgs, labs) in images
            .chunks(EVAL_CHUNK * per)
            .zip(labels.chunks(EVAL_CHUNK))
        {
            self.forward(params, imgs, labs.len(), false, (&rng, 0));
            let logits = &self.acts[self.layers.len()];
            let (loss, correct) = log_softmax_nll(logits, labs, self.classes, None);
            stats.loss += f64::from(loss) * labs.len() as f64;
            stats.correct += correct;
            stats.samples += labs.len();
        }
        stats.loss /= stats.samples as f64;
        Ok(stats)
    }
}
