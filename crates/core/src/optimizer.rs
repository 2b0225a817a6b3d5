//! A server optimizer bound to a slice: its state (momentum buffer or Adam's moments) and the
//! update, with PyTorch's rules. Every rule is element-wise, so a shard that owns a sub-range
//! of the parameters runs the same optimizer on its slice and the union of shards behaves
//! like one server.

use crate::error::RestoreError;
pub use crate::optimizer_config::{LrSchedule, OptimizerConfig};
use crate::splitter::{self, pieces, pieces_mut, Job, Splitter};
use crate::update_kernels::{self as kernels, UpdateRule};
use std::sync::Arc;

/// A gradient as the optimizer takes it: `values * scale`, the scale applied in the update's
/// own loop (a step's sum and its `1 / weight`: the mean costs no pass of its own).
#[derive(Debug, Clone, Copy)]
pub struct ScaledGrad<'a> {
    pub values: &'a [f32],
    pub scale: f32,
    /// Every value is a sparse codec's error-fed sum (`PushMeta::accumulated`): a non-zero
    /// value holds the steps since it last arrived, a zero did not arrive.
    pub accumulated: bool,
}

impl<'a> ScaledGrad<'a> {
    /// `values` as they are, each one step's gradient.
    pub fn whole(values: &'a [f32]) -> Self {
        ScaledGrad {
            values,
            scale: 1.0,
            accumulated: false,
        }
    }
}

/// An optimizer bound to a slice length, with its state (momentum buffer or Adam moments).
#[derive(Debug, Clone)]
pub struct Optimizer {
    config: OptimizerConfig,
    schedule: LrSchedule,
    /// Momentum buffer (SGD) or first moment (Adam); empty for plain SGD.
    first: Vec<f32>,
    /// Second moment (Adam only).
    second: Vec<f32>,
    step: u64,
    /// Where an update is computed before it is swapped in.
    spare_params: Vec<f32>,
    spare_first: Vec<f32>,
    spare_second: Vec<f32>,
    /// Adam under pushes of sparse sums: the update (`step + 1`) each value last arrived in,
    /// empty until the first such push (so dense runs pay nothing), and its spare. Not kept
    /// in checkpoints: a restore counts every gap from its step.
    arrivals: Vec<u32>,
    spare_arrivals: Vec<u32>,
    /// The last update that was not a push of sparse sums: every value arrived in it.
    dense_at: u64,
    /// Runs an update's loop in pieces at once, if the caller gave one.
    splitter: Option<Arc<dyn Splitter>>,
}

/// The longest gap Adam counts for a value of a sparse push, whatever `beta2` says (a gap's
/// update number and its count stay far inside `u32` and `i32`).
const MAX_GAP: u32 = 1 << 20;

/// A piece of an update's loop, boxed for the splitter.
fn job<'a>(f: impl FnOnce() + Send + 'a) -> Job<'a> {
    Box::new(f)
}

impl Optimizer {
    pub fn new(config: OptimizerConfig, len: usize) -> Self {
        Self::with_schedule(config, LrSchedule::Constant, len)
    }

    pub fn with_schedule(config: OptimizerConfig, schedule: LrSchedule, len: usize) -> Self {
        let (first, second) = match config {
            OptimizerConfig::Sgd { momentum, .. } if momentum > 0.0 => (vec![0.0; len], Vec::new()),
            OptimizerConfig::Sgd { .. } => (Vec::new(), Vec::new()),
            OptimizerConfig::Adam { .. } => (vec![0.0; len], vec![0.0; len]),
        };
        Optimizer {
            config,
            schedule,
            first,
            second,
            step: 0,
            spare_params: Vec::new(),
            spare_first: Vec::new(),
            spare_second: Vec::new(),
            arrivals: Vec::new(),
            spare_arrivals: Vec::new(),
            dense_at: 0,
            splitter: None,
        }
    }

    /// Runs each update's loop in the pieces `splitter` cuts it into (same bits as whole).
    pub fn set_splitter(&mut self, splitter: Option<Arc<dyn Splitter>>) {
        self.splitter = splitter;
    }

    pub fn config(&self) -> &OptimizerConfig {
        &self.config
    }

    /// Number of updates applied so far.
    pub fn step(&self) -> u64 {
        self.step
    }

    /// The optimizer's state buffers by name, for checkpoints.
    pub fn state(&self) -> Vec<(&'static str, &[f32])> {
        let mut out = Vec::new();
        match self.config {
            OptimizerConfig::Sgd { .. } if !self.first.is_empty() => {
                out.push(("momentum_buffer", &self.first[..]))
            }
            OptimizerConfig::Sgd { .. } => {}
            OptimizerConfig::Adam { .. } => {
                out.push(("exp_avg", &self.first[..]));
                out.push(("exp_avg_sq", &self.second[..]));
            }
        }
        out
    }

    /// Puts back state saved by `state()` and the step count, checking names and lengths.
    pub fn restore(&mut self, saved: &[(String, Vec<f32>)], step: u64) -> Result<(), RestoreError> {
        let names: Vec<&'static str> = self.state().iter().map(|(n, _)| *n).collect();
        if let Some((extra, _)) = saved.iter().find(|(n, _)| !names.contains(&n.as_str())) {
            return Err(RestoreError::Unexpected(extra.clone()));
        }
        for name in names {
            let (_, values) = saved
                .iter()
                .find(|(n, _)| n == name)
                .ok_or_else(|| RestoreError::Missing(name.into()))?;
            let target = match name {
                "exp_avg_sq" => &mut self.second,
                _ => &mut self.first,
            };
            if values.len() != target.len() {
                return Err(RestoreError::Length {
                    what: format!("optimizer state `{name}`"),
                    expected: target.len(),
                    got: values.len(),
                });
            }
            target.copy_from_slice(values);
        }
        self.step = step;
        self.arrivals.clear();
        self.dense_at = step;
        Ok(())
    }

    /// This update's rule, its learning rate times `factor`; Adam counts each value's gap if
    /// the gradient is a push of sparse sums (`accumulated`).
    fn rule(&self, factor: f32, accumulated: bool) -> UpdateRule {
        match self.config {
            OptimizerConfig::Sgd {
                lr, weight_decay, ..
            } if self.first.is_empty() => UpdateRule::Sgd {
                lr: lr * factor,
                weight_decay,
            },
            OptimizerConfig::Sgd {
                lr,
                momentum,
                weight_decay,
                nesterov,
            } => UpdateRule::Momentum {
                lr: lr * factor,
                momentum,
                weight_decay,
                nesterov,
            },
            OptimizerConfig::Adam {
                lr,
                beta1,
                beta2,
                eps,
                weight_decay,
            } => {
                let t = self.step + 1;
                let step = kernels::AdamStep {
                    beta1,
                    beta2,
                    eps,
                    weight_decay,
                    step_size: lr * factor / (1.0 - beta1.powi(t as i32)),
                    bias2_sqrt: (1.0 - beta2.powi(t as i32)).sqrt(),
                };
                if !accumulated {
                    return UpdateRule::Adam(step);
                }
                // Gaps beyond Adam's memory, `1 / (1 - beta2)` updates, are counted as it.
                let memory = (1.0 / (1.0 - f64::from(beta2))).clamp(1.0, f64::from(MAX_GAP));
                let longest = (t - self.dense_at).min(memory as u64) as u32;
                UpdateRule::AdamGaps(
                    step,
                    kernels::Gaps {
                        now: t as u32,
                        longest: longest.max(1),
                    },
                )
            }
        }
    }

    /// `params -= update(grad)` unless the new weights or state would not all be finite:
    /// then nothing changes (weights, state, step) and it returns false. The update is
    /// computed into spare buffers and swapped in, so refusing it costs no copy and no second
    /// pass (the price: one spare copy of weights and state in memory).
    pub fn apply(&mut self, params: &mut Vec<f32>, grad: &[f32]) -> bool {
        self.apply_scaled(params, ScaledGrad::whole(grad), 1.0)
    }

    /// `apply` of `grad.values * grad.scale`, with the learning rate multiplied by `lr_scale`
    /// (for this update only).
    pub fn apply_scaled(
        &mut self,
        params: &mut Vec<f32>,
        grad: ScaledGrad<'_>,
        lr_scale: f32,
    ) -> bool {
        let rule = self.rule(self.schedule.factor(self.step) * lr_scale, grad.accumulated);
        let gaps = matches!(rule, UpdateRule::AdamGaps(..));
        if gaps && self.arrivals.len() != params.len() {
            // Never arrived: the gap counts from the last dense update (or the start).
            self.arrivals = vec![0; params.len()];
        }
        let arrivals = if gaps { &self.arrivals[..] } else { &[] };
        self.spare_arrivals.resize(arrivals.len(), 0);
        let spare = &mut self.spare_params;
        let grad = (grad.values, grad.scale);
        assert_eq!(
            params.len(),
            grad.0.len(),
            "optimizer: slices differ in length"
        );
        spare.resize(params.len(), 0.0);
        self.spare_first.resize(self.first.len(), 0.0);
        self.spare_second.resize(self.second.len(), 0.0);
        let splitter = self.splitter.as_deref();
        let piece = splitter::piece_len(splitter, params.len());
        let mut oks = vec![true; params.len().div_ceil(piece)];
        let (values, scale) = grad;
        let old = params.chunks(piece).zip(values.chunks(piece));
        let moments = pieces(&self.first, piece).zip(pieces(&self.second, piece));
        let history = pieces(arrivals, piece).zip(pieces_mut(&mut self.spare_arrivals, piece));
        let new = spare.chunks_mut(piece).zip(
            pieces_mut(&mut self.spare_first, piece).zip(pieces_mut(&mut self.spare_second, piece)),
        );
        let jobs: Vec<Job<'_>> = old
            .zip(moments.zip(history))
            .zip(new)
            .zip(oks.iter_mut())
            .map(|((((p, g), state), out), ok)| {
                job(move || *ok = rule.run((p, (g, scale)), state, out))
            })
            .collect();
        splitter::run(splitter, jobs);
        let ok = oks.iter().all(|&ok| ok);
        if ok {
            std::mem::swap(params, spare);
            std::mem::swap(&mut self.first, &mut self.spare_first);
            std::mem::swap(&mut self.second, &mut self.spare_second);
            self.step += 1;
            if gaps {
                std::mem::swap(&mut self.arrivals, &mut self.spare_arrivals);
            } else {
                self.dense_at = self.step;
            }
        }
        ok
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn close(a: f32, b: f32) -> bool {
        (a - b).abs() <= 1e-6 * (1.0 + b.abs())
    }

    #[test]
    fn plain_sgd_steps_against_the_gradient() {
        let mut opt = Optimizer::new(OptimizerConfig::sgd(0.1), 2);
        let mut p = vec![1.0, -2.0];
        assert!(opt.apply(&mut p, &[0.5, -1.0]));
        assert_eq!(p, [0.95, -1.9]);
        assert!(opt.state().is_empty());
    }

    #[test]
    fn momentum_matches_hand_computation() {
        // buf1 = g1 = 1; p = 1 - 0.1 = 0.9. buf2 = 0.9 * 1 + 2 = 2.9; p = 0.9 - 0.29 = 0.61.
        let mut opt = Optimizer::new(OptimizerConfig::momentum(0.1, 0.9), 1);
        let mut p = vec![1.0];
        assert!(opt.apply(&mut p, &[1.0]));
        assert!(close(p[0], 0.9));
        assert!(opt.apply(&mut p, &[2.0]));
        assert!(close(p[0], 0.61), "{}", p[0]);
        assert_eq!(opt.state()[0].1, &[2.9]);
    }

    #[test]
    fn weight_decay_adds_l2_gradient() {
        let cfg = OptimizerConfig::Sgd {
            lr: 0.5,
            momentum: 0.0,
            weight_decay: 0.1,
            nesterov: false,
        };
        let mut opt = Optimizer::new(cfg, 1);
        let mut p = vec![2.0];
        assert!(opt.apply(&mut p, &[0.0]));
        assert!(close(p[0], 2.0 - 0.5 * 0.2));
    }

    #[test]
    fn adam_first_step_moves_by_lr_times_sign() {
        let mut opt = Optimizer::new(OptimizerConfig::adam(0.01), 3);
        let mut p = vec![0.0, 1.0, 5.0];
        assert!(opt.apply(&mut p, &[3.0, -0.2, 1e-3]));
        // After bias correction m_hat / sqrt(v_hat) = sign(g) (up to eps).
        assert!(close(p[0], -0.01));
        assert!(close(p[1], 1.01));
        assert!((p[2] - 4.99).abs() < 1e-4);
        assert_eq!(opt.step(), 1);
    }

    #[test]
    fn adam_second_step_matches_reference_formula() {
        let (b1, b2, lr, eps) = (0.9f64, 0.999f64, 0.001f64, 1e-8f64);
        let grads = [0.3f64, -0.7];
        let (mut m, mut v, mut p) = (0.0f64, 0.0f64, 0.5f64);
        for (t, g) in grads.iter().enumerate() {
            let t = (t + 1) as i32;
            m = b1 * m + (1.0 - b1) * g;
            v = b2 * v + (1.0 - b2) * g * g;
            p -= lr * (m / (1.0 - b1.powi(t))) / ((v / (1.0 - b2.powi(t))).sqrt() + eps);
        }
        let mut opt = Optimizer::new(OptimizerConfig::adam(0.001), 1);
        let mut q = vec![0.5f32];
        for g in grads {
            assert!(opt.apply(&mut q, &[g as f32]));
        }
        assert!((f64::from(q[0]) - p).abs() < 1e-6, "{} vs {p}", q[0]);
    }

    #[test]
    fn an_update_that_overflows_changes_nothing() {
        let mut opt = Optimizer::new(OptimizerConfig::momentum(3e38, 0.5), 2);
        let mut p = vec![1.0, 2.0];
        assert!(!opt.apply(&mut p, &[1e15, 0.0]));
        assert_eq!(p, [1.0, 2.0]);
        assert_eq!(opt.step(), 0);
        assert_eq!(opt.state()[0].1, &[0.0, 0.0]);
    }

    #[test]
    fn restored_state_continues_identically() {
        let grads = [[0.3f32, -0.2], [0.1, 0.4], [-0.5, 0.2], [0.05, 0.05]];
        let mut a = Optimizer::new(OptimizerConfig::adam(0.01), 2);
        let mut pa = vec![1.0f32, 2.0];
        for g in &grads[..2] {
            assert!(a.apply(&mut pa, g));
        }
        let saved: Vec<(String, Vec<f32>)> = a
            .state()
            .iter()
            .map(|(n, v)| (n.to_string(), v.to_vec()))
            .collect();
        let mut b = Optimizer::new(OptimizerConfig::adam(0.01), 2);
        b.restore(&saved, a.step()).unwrap();
        let mut pb = pa.clone();
        for g in &grads[2..] {
            assert!(a.apply(&mut pa, g));
            assert!(b.apply(&mut pb, g));
        }
        assert_eq!(pa, pb);
        let mut c = Optimizer::new(OptimizerConfig::momentum(0.1, 0.9), 2);
        assert!(matches!(
            c.restore(&saved, 2),
            Err(RestoreError::Unexpected(_))
        ));
        let mut d = Optimizer::new(OptimizerConfig::adam(0.01), 3);
        assert!(matches!(
            d.restore(&saved, 2),
            Err(RestoreError::Length { .. })
        ));
    }

    fn sparse(values: &[f32]) -> ScaledGrad<'_> {
        ScaledGrad {
            values,
            scale: 1.0,
            accumulated: true,
        }
    }

    /// How far 400 updates move a weight whose gradient is a constant 1: sent every update,
    /// or every tenth as the sum of ten (a top-k worker's error feedback), counted or not as
    /// a sum. Adam moves a value sent every `gap` updates about `1 / sqrt(gap)` as far unless
    /// its square is divided by the gap.
    fn distance(every: usize, accumulated: bool) -> f32 {
        let mut opt = Optimizer::new(OptimizerConfig::adam(0.001), 1);
        let mut p = vec![0.0f32];
        for update in 1..=400 {
            let g = [if update % every == 0 {
                every as f32
            } else {
                0.0
            }];
            let grad = ScaledGrad {
                accumulated,
                ..sparse(&g)
            };
            assert!(opt.apply_scaled(&mut p, grad, 1.0));
        }
        -p[0]
    }

    #[test]
    fn adam_counts_the_gap_of_a_value_sent_as_a_sum() {
        let dense = distance(1, false);
        let summed = distance(10, false);
        let counted = distance(10, true);
        assert!((summed / dense) < 0.4, "{summed} / {dense}");
        assert!((counted / dense - 1.0).abs() < 0.05, "{counted} / {dense}");
    }

    /// A dense update is an arrival of every value: a gap counts from it at most; and a
    /// restore counts gaps from its step.
    #[test]
    fn gaps_count_from_the_last_dense_update_or_restore() {
        let second_moment = |opt: &Optimizer| opt.state()[1].1[0];
        let run = |dense_at: Option<usize>| {
            let mut opt = Optimizer::new(OptimizerConfig::adam(0.001), 1);
            let mut p = vec![0.0f32];
            for update in 1..10 {
                let grad = ScaledGrad {
                    accumulated: Some(update) != dense_at,
                    ..sparse(&[0.0])
                };
                assert!(opt.apply_scaled(&mut p, grad, 1.0));
            }
            // Update 10 brings a sum of 4.
            assert!(opt.apply_scaled(&mut p, sparse(&[4.0]), 1.0));
            opt
        };
        let v_of_sum = |gap: f32| 0.001 * 16.0 / gap;
        // Within f32's rounding of `1 - beta2`.
        let near = |v: f32, gap: f32| (v / v_of_sum(gap) - 1.0).abs() < 1e-4;
        // Nothing dense before: the gap is 10 updates.
        let from_start = run(None);
        assert!(near(second_moment(&from_start), 10.0));
        // Dense at update 6 (a gradient of 0 there: nothing else in the moment): gap 4.
        let after_dense = run(Some(6));
        assert!(near(second_moment(&after_dense), 4.0));
        // Restored at step 8: the next sum (update 9's, of 4) counts a gap of 1.
        let saved: Vec<(String, Vec<f32>)> = vec![
            ("exp_avg".into(), vec![0.0]),
            ("exp_avg_sq".into(), vec![0.0]),
        ];
        let mut restored = Optimizer::new(OptimizerConfig::adam(0.001), 1);
        restored.restore(&saved, 8).unwrap();
        assert!(restored.apply_scaled(&mut vec![0.0], sparse(&[4.0]), 1.0));
        assert!(near(second_moment(&restored), 1.0));
    }

    /// SGD and momentum take sparse sums as they are (their updates are linear in the sum).
    #[test]
    fn sgd_ignores_the_kind_of_push() {
        for config in [
            OptimizerConfig::sgd(0.1),
            OptimizerConfig::momentum(0.1, 0.9),
        ] {
            let (mut a, mut b) = (Optimizer::new(config, 2), Optimizer::new(config, 2));
            let (mut pa, mut pb) = (vec![1.0, 2.0], vec![1.0, 2.0]);
            for g in [[0.0, 3.0], [1.5, 0.0]] {
                assert!(a.apply_scaled(&mut pa, sparse(&g), 1.0));
                assert!(b.apply(&mut pb, &g));
            }
            assert_eq!(pa, pb);
        }
    }
}
