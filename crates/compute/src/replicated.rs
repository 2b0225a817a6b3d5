//! Several threads for one model: one single-threaded replica of the model per thread, each
//! running the whole forward and backward pass on a contiguous part of the batch, and the
//! parts' gradients summed. Splitting the batch (not each layer's work) leaves the threads
//! independent for the whole step: no hand-off per layer, and the layers that do not split
//! well (pooling, ReLU, dropout, the small convolution) run in parallel too.

use crate::error::ComputeError;
use crate::model::{EvalStats, Model, StepStats};
use crate::sequential::Sequential;
use pstrain_core::{Layout, Rng};
use rayon::prelude::*;
use std::ops::Range;

/// Parameters summed per task when the replicas' gradients are added up.
const SUM_CHUNK: usize = 1 << 16;

pub struct Replicated {
    threads: usize,
    /// Makes one more replica (the same single-threaded model each time).
    build: Box<dyn Fn() -> Sequential + Send>,
    /// Made when first needed: a batch of n samples uses min(n, threads) of them, so a
    /// large thread count costs nothing until batches are that large.
    replicas: Vec<Sequential>,
    /// Gradient buffers of replicas 1.. (replica 0 writes into the caller's).
    grads: Vec<Vec<f32>>,
}

impl Replicated {
    /// Up to `threads` replicas made by `build`.
    pub fn new(threads: usize, build: impl Fn() -> Sequential + Send + 'static) -> Self {
        Replicated {
            threads: threads.max(1),
            replicas: vec![build()],
            build: Box::new(build),
            grads: Vec::new(),
        }
    }

    /// Parts of `n` samples, one per replica used: contiguous, sizes differing by at most
    /// one. Makes the replicas and gradient buffers they need.
    fn parts(&mut self, n: usize) -> Vec<Range<usize>> {
        let k = self.threads.min(n).max(1);
        while self.replicas.len() < k {
            self.replicas.push((self.build)());
        }
        let len = self.replicas[0].layout().len();
        while self.grads.len() < k - 1 {
            self.grads.push(vec![0.0; len]);
        }
        (0..k).map(|i| i * n / k..(i + 1) * n / k).collect()
    }
}

impl Model for Replicated {
    fn layout(&self) -> &Layout {
        self.replicas[0].layout()
    }

    fn input_len(&self) -> usize {
        self.replicas[0].input_len()
    }

    fn classes(&self) -> usize {
        self.replicas[0].classes()
    }

    fn values_per_sample(&self) -> usize {
        // The replicas split a batch: together they hold what one would.
        self.replicas[0].values_per_sample()
    }

    fn init_params(&self, params: &mut [f32], rng: &mut Rng) {
        self.replicas[0].init_params(params, rng);
    }

    fn train_step(
        &mut self,
        params: &[f32],
        images: &[f32],
        labels: &[u8],
        grads: &mut [f32],
        rng: &mut Rng,
    ) -> Result<StepStats, ComputeError> {
        self.replicas[0].check_inputs(images, labels)?;
        let (n, per) = (labels.len(), self.input_len());
        let parts = self.parts(n);
        let step = Rng::new(rng.next_u64());
        let mut targets: Vec<&mut [f32]> = Vec::with_capacity(parts.len());
        targets.push(grads);
        targets.extend(self.grads.iter_mut().map(|g| &mut g[..]));
        // The calling thread computes the first part itself while pool threads take the
        // others: one wake-up per extra part, none for the caller (a small model's step is
        // a few hundred microseconds, where every hand-off shows).
        let mut results: Vec<Option<Result<StepStats, ComputeError>>> =
            (0..parts.len()).map(|_| None).collect();
        {
            let step = &step;
            let run = move |replica: &mut Sequential,
                            target: &mut [f32],
                            part: &Range<usize>,
                            slot: &mut Option<_>| {
                *slot = Some(replica.train_part(
                    params,
                    &images[part.start * per..part.end * per],
                    &labels[part.clone()],
                    target,
                    (step, part.start as u64),
                    n,
                ));
            };
            let mut jobs = self
                .replicas
                .iter_mut()
                .zip(targets.iter_mut())
                .zip(parts.iter().zip(results.iter_mut()));
            let first = jobs.next();
            rayon::in_place_scope(|scope| {
                for ((replica, target), (part, slot)) in jobs {
                    scope.spawn(move |_| run(replica, target, part, slot));
                }
                if let Some(((replica, target), (part, slot))) = first {
                    run(replica, target, part, slot);
                }
            });
        }
        let total = combine(results.into_iter().flatten(), n)?;
        let [grads, others @ ..] = &mut targets[..] else {
            unreachable!("at least one part")
        };
        sum_into(grads, &others[..parts.len() - 1]);
        Ok(total)
    }

    fn evaluate(
        &mut self,
        params: &[f32],
        images: &[f32],
        labels: &[u8],
    ) -> Result<EvalStats, ComputeError> {
        self.replicas[0].check_inputs(images, labels)?;
        let (n, per) = (labels.len(), self.input_len());
        let parts = self.parts(n);
        let results: Vec<Result<EvalStats, ComputeError>> = self
            .replicas
            .par_iter_mut()
            .zip(parts.par_iter())
            .map(|(replica, part)| {
                replica.evaluate(
                    params,
                    &images[part.start * per..part.end * per],
                    &labels[part.clone()],
                )
            })
            .collect();
        let mut total = EvalStats {
            loss: 0.0,
            correct: 0,
            samples: 0,
        };
        for r in results {
            let s = r?;
            total.loss += s.loss * s.samples as f64;
            total.correct += s.correct;
            total.samples += s.samples;
        }
        total.loss /= n as f64;
        Ok(total)
    }
}

/// One step's numbers from its parts' (the loss weighted by each part's samples).
fn combine(
    parts: impl Iterator<Item = Result<StepStats, ComputeError>>,
    n: usize,
) -> Result<StepStats, ComputeError> {
    let mut total = StepStats {
        loss: 0.0,
        correct: 0,
        samples: 0,
    };
    let mut loss_sum = 0.0f64;
    for r in parts {
        let s = r?;
        loss_sum += f64::from(s.loss) * s.samples as f64;
        total.correct += s.correct;
        total.samples += s.samples;
    }
    total.loss = (loss_sum / n as f64) as f32;
    Ok(total)
}

/// Adds every one of `others` into `grads`, chunk by chunk on the pool.
fn sum_into(grads: &mut [f32], others: &[&mut [f32]]) {
    let add_chunk = |(c, chunk): (usize, &mut [f32])| {
        let span = c * SUM_CHUNK..c * SUM_CHUNK + chunk.len();
        for other in others {
            for (g, &o) in chunk.iter_mut().zip(&other[span.clone()]) {
                *g += o;
            }
        }
    };
    // One chunk is summed here: handing it to the pool would cost more than the adds.
    if grads.len() <= SUM_CHUNK {
        grads.chunks_mut(SUM_CHUNK).enumerate().for_each(add_chunk);
    } else {
        grads
            .par_chunks_mut(SUM_CHUNK)
            .enumerate()
            .for_each(add_chunk);
    }
}

#[cfg(test)]
mod tests {
    use crate::model::{Model, ModelOptions};
    use crate::models::ModelKind;
    use pstrain_core::Rng;

    /// A training step and an evaluation with `threads` replicas.
    fn step(kind: ModelKind, threads: usize, batch: usize) -> (f32, usize, Vec<f32>, f64) {
        let mut model = kind.build(ModelOptions {
            dropout: true,
            threads,
        });
        let mut rng = Rng::new(3);
        let mut params = vec![0.0; model.layout().len()];
        model.init_params(&mut params, &mut rng);
        let images: Vec<f32> = (0..batch * model.input_len())
            .map(|_| rng.uniform(0.0, 1.0))
            .collect();
        let labels: Vec<u8> = (0..batch).map(|i| (i * 7 % 10) as u8).collect();
        let mut grads = vec![f32::NAN; params.len()];
        let stats = model
            .train_step(&params, &images, &labels, &mut grads, &mut Rng::new(11))
            .unwrap();
        let eval = model.evaluate(&params, &images, &labels).unwrap();
        assert_eq!(eval.samples, batch);
        (stats.loss, stats.correct, grads, eval.loss)
    }

    #[test]
    fn replicas_compute_the_one_thread_step_with_the_same_dropout_masks() {
        for (kind, batch) in [(ModelKind::Cnn, 5), (ModelKind::Convnet, 9)] {
            let (loss, correct, grads, eval) = step(kind, 1, batch);
            for threads in [2, 3, 7] {
                let (l, c, g, e) = step(kind, threads, batch);
                assert!(
                    (l - loss).abs() <= 1e-5 * loss.abs(),
                    "{kind} x{threads}: loss"
                );
                assert!(
                    (e - eval).abs() <= 1e-6 * eval.abs(),
                    "{kind} x{threads}: eval"
                );
                assert_eq!(c, correct);
                let scale = grads.iter().fold(0.0f32, |m, x| m.max(x.abs()));
                let worst = g
                    .iter()
                    .zip(&grads)
                    .map(|(a, b)| (a - b).abs())
                    .fold(0.0f32, f32::max);
                // Same masks: a different mask would move gradients by a sizeable fraction.
                assert!(
                    worst <= 1e-5 * scale,
                    "{kind} x{threads}: {worst} of {scale}"
                );
            }
        }
    }

    #[test]
    fn makes_only_the_replicas_a_batch_uses() {
        let mut model = super::Replicated::new(1000, || {
            crate::models::convnet(ModelOptions {
                dropout: true,
                threads: 1,
            })
        });
        let mut params = vec![0.0; model.layout().len()];
        model.init_params(&mut params, &mut Rng::new(1));
        let mut grads = params.clone();
        let images = vec![0.5; 3 * 784];
        model
            .train_step(&params, &images, &[1, 2, 3], &mut grads, &mut Rng::new(2))
            .unwrap();
        assert_eq!((model.replicas.len(), model.grads.len()), (3, 2));
    }

    #[test]
    fn refuses_bad_batches_like_one_thread() {
        let mut model = ModelKind::Convnet.build(ModelOptions {
            dropout: true,
            threads: 2,
        });
        let mut grads = vec![0.0; model.layout().len()];
        let params = grads.clone();
        let mut rng = Rng::new(1);
        assert!(model
            .train_step(&params, &[], &[], &mut grads, &mut rng)
            .is_err());
        assert!(model
            .train_step(&params, &[0.0; 700], &[1], &mut grads, &mut rng)
            .is_err());
        assert!(model
            .train_step(&params, &[0.0; 784 * 2], &[1, 10], &mut grads, &mut rng)
            .is_err());
        assert!(model
            .train_step(&params[1..], &[0.0; 784], &[1], &mut grads, &mut rng)
            .is_err());
    }
}
