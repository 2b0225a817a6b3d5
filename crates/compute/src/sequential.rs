//! A model as a chain of layers over a flat parameter buffer, ending in log-softmax + NLL.

use crate::buffer_plan::BufferPlan;
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
    /// Which buffer holds each activation (`slot[i]`: layer i's input; the last, the logits).
    /// An elementwise layer whose input nobody reads afterwards writes over it.
    plan: BufferPlan,
    /// The activation buffers.
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
        let layers: Vec<Box<dyn Layer>> = layers.into_iter().map(|(_, l)| l).collect();
        let plan = BufferPlan::new(&layers);
        Sequential {
            acts: vec![Vec::new(); plan.buffers()],
            plan,
            layers,
            ranges,
            layout,
            input,
            classes,
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
        let slot = &self.plan.slot;
        self.acts[slot[0]].clear();
        self.acts[slot[0]].extend_from_slice(images);
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
            let params = &params[self.ranges[i].clone()];
            let (from, to) = (slot[i], slot[i + 1]);
            if from == to {
                let xy = &mut self.acts[to];
                self.layers[i].forward_in_place(params, &mut xy[..out_len], &mut pass);
                continue;
            }
            // Two distinct buffers: borrow both (the later-numbered is always `to`).
            let (before, after) = self.acts.split_at_mut(to);
            let y = &mut after[0];
            y.resize(out_len, 0.0);
            self.layers[i].forward(params, &before[from], y, &mut pass);
        }
    }

    /// The logits of the last forward pass.
    fn logits(&self) -> &[f32] {
        &self.acts[self.plan.slot[self.layers.len()]]
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
        // Gradient buffers borrow activation buffers that no backward reads, and give them back
        // at the end (their contents are scratch either way).
        let lend = self.plan.lend;
        for (g, b) in lend.iter().enumerate() {
            if let Some(b) = *b {
                std::mem::swap(&mut self.delta[g], &mut self.acts[b]);
            }
        }
        let [d_out, d_in] = &mut self.delta;
        d_out.resize(self.classes * batch, 0.0);
        let logits = &self.acts[self.plan.slot[n]];
        let (loss, correct) = log_softmax_nll(logits, labels, self.classes, Some((d_out, whole)));
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
            let reads = self.layers[i].reads();
            let io = Backward {
                x: if reads.x {
                    &self.acts[self.plan.slot[i]]
                } else {
                    &[]
                },
                y: if reads.y {
                    &self.acts[self.plan.slot[i + 1]]
                } else {
                    &[]
                },
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
        // Back to where they started: an even number of swaps of the two leaves them there.
        if n % 2 == 1 {
            self.delta.swap(0, 1);
        }
        for (g, b) in lend.iter().enumerate() {
            if let Some(b) = *b {
                std::mem::swap(&mut self.delta[g], &mut self.acts[b]);
            }
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

    fn values_per_sample(&self) -> usize {
        self.plan.sizes.iter().skip(1).sum()
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
            let (loss, correct) = log_softmax_nll(self.logits(), labs, self.classes, None);
            stats.loss += f64::from(loss) * labs.len() as f64;
            stats.correct += correct;
            stats.samples += labs.len();
        }
        stats.loss /= stats.samples as f64;
        Ok(stats)
    }
}

#[cfg(test)]
mod tests {
    use crate::model::ModelOptions;
    use crate::models;
    use crate::models::ModelKind;
    use pstrain_core::Rng;

    /// The cnn's plan: the ReLUs write over their inputs (no backward reads a conv's
    /// output or a pool's), and conv2's output, which no backward reads, is lent to the
    /// gradient buffer that receives the pool's input gradient, its largest.
    #[test]
    fn the_cnn_keeps_only_what_backward_reads() {
        let cnn = models::cnn(ModelOptions {
            dropout: true,
            threads: 1,
        });
        let slot = &cnn.plan.slot;
        // Layers: conv1 relu1 conv2 pool relu2 dropout1 fc1 relu3 dropout2 fc2.
        assert_eq!(slot[2], slot[1], "relu1 in place");
        assert_eq!(slot[5], slot[4], "relu2 in place");
        assert_ne!(
            slot[6], slot[5],
            "dropout1 after a ReLU, which reads its output"
        );
        assert_eq!(
            slot[8], slot[7],
            "relu3 in place (fc1 reads its input only)"
        );
        assert_eq!(cnn.plan.buffers(), 8);
        assert!(cnn.plan.lend.contains(&Some(slot[3])), "{:?}", cnn.plan);
    }

    /// Lent buffers come back and in-place layers recompute from fresh inputs: the same step
    /// twice, with an evaluation between, gives the same bits.
    #[test]
    fn steps_repeat_exactly_with_buffers_reused() {
        for kind in ModelKind::ALL {
            let mut model = kind.build(ModelOptions {
                dropout: true,
                threads: 1,
            });
            let mut rng = Rng::new(5);
            let mut params = vec![0.0; model.layout().len()];
            model.init_params(&mut params, &mut rng);
            let images: Vec<f32> = (0..8 * model.input_len())
                .map(|_| rng.uniform(0.0, 1.0))
                .collect();
            let labels: Vec<u8> = (0..8).map(|i| (i * 3 % 10) as u8).collect();
            let run = |model: &mut Box<dyn crate::Model>| {
                let mut grads = vec![f32::NAN; params.len()];
                let stats = model
                    .train_step(&params, &images, &labels, &mut grads, &mut Rng::new(9))
                    .unwrap();
                (
                    stats.loss.to_bits(),
                    grads.iter().map(|g| g.to_bits()).collect::<Vec<_>>(),
                )
            };
            let first = run(&mut model);
            let eval = model
                .evaluate(&params, &images[..3 * 784], &labels[..3])
                .unwrap();
            assert!(eval.loss.is_finite());
            assert_eq!(run(&mut model), first, "{kind}");
        }
    }
}
