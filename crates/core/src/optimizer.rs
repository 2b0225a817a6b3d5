//! Server-side optimizers with PyTorch's update rules, applied in place to a flat slice.
//!
//! Every rule is element-wise, so a shard that owns a sub-range of the parameters runs the same
//! optimizer on its slice and the union of shards behaves like one server.

use crate::error::{ConfigError, RestoreError};

#[derive(Debug, Clone, Copy, PartialEq)]
pub enum OptimizerConfig {
    /// `torch.optim.SGD`: optional momentum (dampening 0), optional Nesterov, L2 weight decay.
    Sgd {
        lr: f32,
        momentum: f32,
        weight_decay: f32,
        nesterov: bool,
    },
    /// `torch.optim.Adam` with bias correction and L2 weight decay.
    Adam {
        lr: f32,
        beta1: f32,
        beta2: f32,
        eps: f32,
        weight_decay: f32,
    },
}

impl OptimizerConfig {
    pub fn sgd(lr: f32) -> Self {
        OptimizerConfig::Sgd {
            lr,
            momentum: 0.0,
            weight_decay: 0.0,
            nesterov: false,
        }
    }

    pub fn momentum(lr: f32, momentum: f32) -> Self {
        OptimizerConfig::Sgd {
            lr,
            momentum,
            weight_decay: 0.0,
            nesterov: false,
        }
    }

    pub fn adam(lr: f32) -> Self {
        OptimizerConfig::Adam {
            lr,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.0,
        }
    }

    /// The same optimizer with L2 weight decay `weight_decay`.
    pub fn with_weight_decay(self, weight_decay: f32) -> Self {
        match self {
            OptimizerConfig::Sgd {
                lr,
                momentum,
                nesterov,
                ..
            } => OptimizerConfig::Sgd {
                lr,
                momentum,
                weight_decay,
                nesterov,
            },
            OptimizerConfig::Adam {
                lr,
                beta1,
                beta2,
                eps,
                ..
            } => OptimizerConfig::Adam {
                lr,
                beta1,
                beta2,
                eps,
                weight_decay,
            },
        }
    }

    /// The same optimizer at learning rate `lr`.
    pub fn with_lr(self, lr: f32) -> Self {
        match self {
            OptimizerConfig::Sgd {
                momentum,
                weight_decay,
                nesterov,
                ..
            } => OptimizerConfig::Sgd {
                lr,
                momentum,
                weight_decay,
                nesterov,
            },
            OptimizerConfig::Adam {
                beta1,
                beta2,
                eps,
                weight_decay,
                ..
            } => OptimizerConfig::Adam {
                lr,
                beta1,
                beta2,
                eps,
                weight_decay,
            },
        }
    }

    pub fn lr(&self) -> f32 {
        match *self {
            OptimizerConfig::Sgd { lr, .. } | OptimizerConfig::Adam { lr, .. } => lr,
        }
    }

    pub fn validate(&self) -> Result<(), ConfigError> {
        let finite_nonneg = |field: &'static str, v: f32| {
            if v.is_finite() && v >= 0.0 {
                Ok(())
            } else {
                Err(ConfigError::out_of_range(field, "finite and >= 0", v))
            }
        };
        let unit = |field: &'static str, v: f32| {
            if (0.0..1.0).contains(&v) {
                Ok(())
            } else {
                Err(ConfigError::out_of_range(field, "in [0, 1)", v))
            }
        };
        match *self {
            OptimizerConfig::Sgd {
                lr,
                momentum,
                weight_decay,
                nesterov,
            } => {
                if !(lr.is_finite() && lr > 0.0) {
                    return Err(ConfigError::out_of_range("lr", "finite and > 0", lr));
                }
                unit("momentum", momentum)?;
                finite_nonneg("weight_decay", weight_decay)?;
                if nesterov && momentum == 0.0 {
                    return Err(ConfigError::out_of_range(
                        "momentum",
                        "> 0 with Nesterov",
                        momentum,
                    ));
                }
                Ok(())
            }
            OptimizerConfig::Adam {
                lr,
                beta1,
                beta2,
                eps,
                weight_decay,
            } => {
                if !(lr.is_finite() && lr > 0.0) {
                    return Err(ConfigError::out_of_range("lr", "finite and > 0", lr));
                }
                unit("beta1", beta1)?;
                unit("beta2", beta2)?;
                if !(eps.is_finite() && eps > 0.0) {
                    return Err(ConfigError::out_of_range("eps", "finite and > 0", eps));
                }
                finite_nonneg("weight_decay", weight_decay)
            }
        }
    }
}

/// How the learning rate changes over the run, as a factor on the configured rate.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub enum LrSchedule {
    #[default]
    Constant,
    /// Half a cosine from 1 down to 0 over `total_updates` (then stays at 0): the final
    /// weights average out the noise of the last steps, which is worth tenths of a percent.
    Cosine { total_updates: u64 },
    /// Multiply by `gamma` every `every` updates (PyTorch's StepLR).
    Step { every: u64, gamma: f32 },
}

impl LrSchedule {
    /// The factor for the update numbered `step` (0 for the first).
    pub fn factor(&self, step: u64) -> f32 {
        match *self {
            LrSchedule::Constant => 1.0,
            LrSchedule::Cosine { total_updates } => {
                let t = step.min(total_updates) as f64 / total_updates.max(1) as f64;
                (0.5 * (1.0 + (std::f64::consts::PI * t).cos())) as f32
            }
            LrSchedule::Step { every, gamma } => gamma.powi((step / every.max(1)) as i32),
        }
    }

    pub fn validate(&self) -> Result<(), ConfigError> {
        match *self {
            LrSchedule::Constant => Ok(()),
            LrSchedule::Cosine { total_updates } if total_updates > 0 => Ok(()),
            LrSchedule::Cosine { total_updates } => Err(ConfigError::out_of_range(
                "cosine total_updates",
                ">= 1",
                total_updates,
            )),
            LrSchedule::Step { every, gamma } => {
                if every == 0 {
                    Err(ConfigError::out_of_range("step every", ">= 1", every))
                } else if !(gamma > 0.0 && gamma <= 1.0) {
                    Err(ConfigError::out_of_range("step gamma", "in (0, 1]", gamma))
                } else {
                    Ok(())
                }
            }
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
    /// Where a checked update is computed before it is swapped in.
    spare_first: Vec<f32>,
    spare_second: Vec<f32>,
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
            spare_first: Vec::new(),
            spare_second: Vec::new(),
        }
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
        Ok(())
    }

    /// `params -= update(grad)` unless the new weights or state would not all be finite:
    /// then nothing changes (weights, state, step) and it returns false. The update is
    /// computed into spare buffers (`spare` for the weights) and swapped in, so refusing it
    /// costs no copy and no second pass.
    pub fn apply_checked(
        &mut self,
        params: &mut Vec<f32>,
        spare: &mut Vec<f32>,
        grad: &[f32],
    ) -> bool {
        assert_eq!(
            params.len(),
            grad.len(),
            "optimizer: slices differ in length"
        );
        spare.resize(params.len(), 0.0);
        self.spare_first.resize(self.first.len(), 0.0);
        self.spare_second.resize(self.second.len(), 0.0);
        let factor = self.schedule.factor(self.step);
        let ok = match self.config {
            OptimizerConfig::Sgd {
                lr,
                momentum,
                weight_decay,
                nesterov,
            } => {
                let lr = lr * factor;
                let mut ok = true;
                if self.first.is_empty() {
                    for ((out, &p), &g) in spare.iter_mut().zip(params.iter()).zip(grad) {
                        *out = p - lr * (g + weight_decay * p);
                        ok &= out.is_finite();
                    }
                } else {
                    let old = params.iter().zip(grad).zip(&self.first);
                    let new = spare.iter_mut().zip(&mut self.spare_first);
                    for (((&p, &g), &b), (out, buf)) in old.zip(new) {
                        let g = g + weight_decay * p;
                        *buf = momentum * b + g;
                        let d = if nesterov { g + momentum * *buf } else { *buf };
                        *out = p - lr * d;
                        ok &= out.is_finite() & buf.is_finite();
                    }
                }
                ok
            }
            OptimizerConfig::Adam {
                lr,
                beta1,
                beta2,
                eps,
                weight_decay,
            } => {
                let t = (self.step + 1) as i32;
                let bias1 = 1.0 - beta1.powi(t);
                let bias2_sqrt = (1.0 - beta2.powi(t)).sqrt();
                let step_size = lr * factor / bias1;
                let mut ok = true;
                let old = params
                    .iter()
                    .zip(grad)
                    .zip(self.first.iter().zip(&self.second));
                let new = spare
                    .iter_mut()
                    .zip(self.spare_first.iter_mut().zip(&mut self.spare_second));
                for (((&p, &g), (&m, &v)), (out, (m2, v2))) in old.zip(new) {
                    let g = g + weight_decay * p;
                    *m2 = beta1 * m + (1.0 - beta1) * g;
                    *v2 = beta2 * v + (1.0 - beta2) * g * g;
                    let denom = v2.sqrt() / bias2_sqrt + eps;
                    *out = p - step_size * *m2 / denom;
                    ok &= out.is_finite() & m2.is_finite() & v2.is_finite();
                }
                ok
            }
        };
        if ok {
            std::mem::swap(params, spare);
            std::mem::swap(&mut self.first, &mut self.spare_first);
            std::mem::swap(&mut self.second, &mut self.spare_second);
            self.step += 1;
        }
        ok
    }

    /// `params -= update(grad)`. Both slices must have the optimizer's length.
    pub fn apply(&mut self, params: &mut [f32], grad: &[f32]) {
        assert_eq!(
            params.len(),
            grad.len(),
            "optimizer: slices differ in length"
        );
        let factor = self.schedule.factor(self.step);
        self.step += 1;
        match self.config {
            OptimizerConfig::Sgd {
                lr,
                momentum,
                weight_decay,
                nesterov,
            } => {
                let lr = lr * factor;
                if self.first.is_empty() {
                    for (p, &g) in params.iter_mut().zip(grad) {
                        *p -= lr * (g + weight_decay * *p);
                    }
                } else {
                    assert_eq!(self.first.len(), params.len());
                    // PyTorch starts the buffer at the first gradient; momentum * 0 + g is that.
                    for ((p, &g), buf) in params.iter_mut().zip(grad).zip(&mut self.first) {
                        let g = g + weight_decay * *p;
                        *buf = momentum * *buf + g;
                        let d = if nesterov { g + momentum * *buf } else { *buf };
                        *p -= lr * d;
                    }
                }
            }
            OptimizerConfig::Adam {
                lr,
                beta1,
                beta2,
                eps,
                weight_decay,
            } => {
                assert_eq!(self.first.len(), params.len());
                let t = self.step as i32;
                let bias1 = 1.0 - beta1.powi(t);
                let bias2_sqrt = (1.0 - beta2.powi(t)).sqrt();
                let step_size = lr * factor / bias1;
                for (((p, &g), m), v) in params
                    .iter_mut()
                    .zip(grad)
                    .zip(&mut self.first)
                    .zip(&mut self.second)
                {
                    let g = g + weight_decay * *p;
                    *m = beta1 * *m + (1.0 - beta1) * g;
                    *v = beta2 * *v + (1.0 - beta2) * g * g;
                    let denom = v.sqrt() / bias2_sqrt + eps;
                    *p -= step_size * *m / denom;
                }
            }
        }
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
        let mut p = [1.0, -2.0];
        opt.apply(&mut p, &[0.5, -1.0]);
        assert_eq!(p, [0.95, -1.9]);
        assert!(opt.state().is_empty());
    }

    #[test]
    fn momentum_matches_hand_computation() {
        // buf1 = g1 = 1; p = 1 - 0.1 = 0.9. buf2 = 0.9 * 1 + 2 = 2.9; p = 0.9 - 0.29 = 0.61.
        let mut opt = Optimizer::new(OptimizerConfig::momentum(0.1, 0.9), 1);
        let mut p = [1.0];
        opt.apply(&mut p, &[1.0]);
        assert!(close(p[0], 0.9));
        opt.apply(&mut p, &[2.0]);
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
        let mut p = [2.0];
        opt.apply(&mut p, &[0.0]);
        assert!(close(p[0], 2.0 - 0.5 * 0.2));
    }

    #[test]
    fn adam_first_step_moves_by_lr_times_sign() {
        let mut opt = Optimizer::new(OptimizerConfig::adam(0.01), 3);
        let mut p = [0.0, 1.0, 5.0];
        opt.apply(&mut p, &[3.0, -0.2, 1e-3]);
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
        let mut q = [0.5f32];
        for g in grads {
            opt.apply(&mut q, &[g as f32]);
        }
        assert!((f64::from(q[0]) - p).abs() < 1e-6, "{} vs {p}", q[0]);
    }

    #[test]
    fn schedules_scale_the_rate() {
        let cos = LrSchedule::Cosine { total_updates: 4 };
        let f: Vec<f32> = (0..6).map(|t| cos.factor(t)).collect();
        assert!((f[0] - 1.0).abs() < 1e-6 && (f[2] - 0.5).abs() < 1e-6);
        assert!(f[4].abs() < 1e-6 && f[5].abs() < 1e-6);
        let step = LrSchedule::Step {
            every: 2,
            gamma: 0.5,
        };
        assert_eq!(
            [step.factor(0), step.factor(1), step.factor(2)],
            [1.0, 1.0, 0.5]
        );
        let mut opt = Optimizer::with_schedule(OptimizerConfig::sgd(1.0), step, 1);
        let mut p = [0.0];
        for _ in 0..3 {
            opt.apply(&mut p, &[1.0]);
        }
        assert_eq!(p, [-2.5]);
        assert!(LrSchedule::Cosine { total_updates: 0 }.validate().is_err());
    }

    #[test]
    fn restored_state_continues_identically() {
        let grads = [[0.3f32, -0.2], [0.1, 0.4], [-0.5, 0.2], [0.05, 0.05]];
        let mut a = Optimizer::new(OptimizerConfig::adam(0.01), 2);
        let mut pa = [1.0f32, 2.0];
        for g in &grads[..2] {
            a.apply(&mut pa, g);
        }
        let saved: Vec<(String, Vec<f32>)> = a
            .state()
            .iter()
            .map(|(n, v)| (n.to_string(), v.to_vec()))
            .collect();
        let mut b = Optimizer::new(OptimizerConfig::adam(0.01), 2);
        b.restore(&saved, a.step()).unwrap();
        let mut pb = pa;
        for g in &grads[2..] {
            a.apply(&mut pa, g);
            b.apply(&mut pb, g);
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

    #[test]
    fn validate_rejects_nonsense() {
        assert!(OptimizerConfig::sgd(0.0).validate().is_err());
        assert!(OptimizerConfig::sgd(f32::NAN).validate().is_err());
        assert!(OptimizerConfig::momentum(0.1, 1.0).validate().is_err());
        assert!(OptimizerConfig::adam(1e-3).validate().is_ok());
        let bad = OptimizerConfig::Adam {
            lr: 1e-3,
            beta1: 0.9,
            beta2: 1.5,
            eps: 1e-8,
            weight_decay: 0.0,
        };
        assert!(bad.validate().is_err());
    }
}
