//! What a server optimizer is: SGD (momentum, Nesterov, weight decay) or Adam with PyTorch's
//! hyper-parameters, and the learning-rate schedule over the run; both validated.

use crate::error::ConfigError;

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

    /// The same optimizer with L2 weight decay `decay`.
    pub fn with_weight_decay(mut self, decay: f32) -> Self {
        match &mut self {
            OptimizerConfig::Sgd { weight_decay, .. }
            | OptimizerConfig::Adam { weight_decay, .. } => *weight_decay = decay,
        }
        self
    }

    /// The same optimizer at learning rate `rate`.
    pub fn with_lr(mut self, rate: f32) -> Self {
        match &mut self {
            OptimizerConfig::Sgd { lr, .. } | OptimizerConfig::Adam { lr, .. } => *lr = rate,
        }
        self
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
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn schedules_scale_the_rate() {
        let cos = LrSchedule::Cosine { total_updates: 4 };
        let f: Vec<f32> = (0..6).map(|t| cos.factor(t)).collect();
        assert!((f[0] - 1.0).abs() < 1e-6 && (f[2] - 0.5).abs() < 1e-6);
        assert!(f[4].abs() < 1e-6 && f[5].abs() < 1e-6);
        assert!(LrSchedule::Cosine { total_updates: 0 }.validate().is_err());
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

    #[test]
    fn with_lr_and_weight_decay_change_only_that() {
        let a = OptimizerConfig::adam(0.1)
            .with_lr(0.2)
            .with_weight_decay(0.3);
        assert_eq!(
            a,
            OptimizerConfig::Adam {
                lr: 0.2,
                beta1: 0.9,
                beta2: 0.999,
                eps: 1e-8,
                weight_decay: 0.3,
            }
        );
        let m = OptimizerConfig::momentum(0.1, 0.8).with_lr(0.5);
        assert_eq!(m, OptimizerConfig::momentum(0.5, 0.8));
    }
}
