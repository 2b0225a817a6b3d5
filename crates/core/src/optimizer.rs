//! A server optimizer bound to a slice: its state (momentum buffer or Adam's moments) and the
//! update, with PyTorch's rules. Every rule is element-wise, so a shard that owns a sub-range
//! of the parameters runs the same optimizer on its slice and the union of shards behaves
//! like one server.

use crate::error::RestoreError;
pub use crate::optimizer_config::{LrSchedule, OptimizerConfig};
use crate::splitter::{self, pieces, pieces_mut, Job, Splitter};
use crate::update_kernels::{self as kernels, UpdateRule};
use crate::update_log::Source;
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
    /// What the values were made of, for the shard's update log (replay pulls).
    pub source: Source<'a>,
}

impl<'a> ScaledGrad<'a> {
    /// `values` as they are, each one step's gradient.
    pub fn whole(values: &'a [f32]) -> Self {
        ScaledGrad {
            values,
            scale: 1.0,
            accumulated: false,
            source: Source::Unknown,
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

    /// The most bytes `write_state` writes for a slice of `len` values.
    pub fn max_state_len(len: usize) -> usize {
        8 + 8 + 1 + 12 * len
    }

    /// Appends its whole state to `out` (a replay pull's whole form): the step, the last
    /// dense update, a flag byte (moments sent; arrivals sent), each moment unless all are
    /// zero (a fresh optimizer's: a run's first pulls carry no state), and the arrivals if
    /// kept; `read_state` takes it back.
    pub fn write_state(&self, out: &mut Vec<u8>) {
        let zero = |v: &[f32]| v.iter().all(|x| x.to_bits() == 0);
        let moments = !(zero(&self.first) && zero(&self.second));
        out.extend_from_slice(&self.step.to_le_bytes());
        out.extend_from_slice(&self.dense_at.to_le_bytes());
        out.push(u8::from(moments) | (u8::from(!self.arrivals.is_empty()) << 1));
        if moments {
            out.extend(self.first.iter().flat_map(|v| v.to_le_bytes()));
            out.extend(self.second.iter().flat_map(|v| v.to_le_bytes()));
        }
        out.extend(self.arrivals.iter().flat_map(|v| v.to_le_bytes()));
    }

    /// Takes back what `write_state` wrote for an optimizer of the same kind and length,
    /// checking its length, its moments' finiteness and its counts; on an error it is left
    /// as it was.
    pub fn read_state(&mut self, bytes: &[u8]) -> Result<(), RestoreError> {
        let len = self.first.len().max(self.second.len());
        let head = 8 + 8 + 1;
        let wrong = |got: usize| RestoreError::Length {
            what: "optimizer state".into(),
            expected: head + 4 * (self.first.len() + self.second.len()),
            got,
        };
        if bytes.len() < head {
            return Err(wrong(bytes.len()));
        }
        let word = |at: usize| {
            let mut w = [0u8; 8];
            w.copy_from_slice(&bytes[at..at + 8]);
            u64::from_le_bytes(w)
        };
        let (step, dense_at, flags) = (word(0), word(8), bytes[16]);
        let arrivals = match flags >> 1 {
            0 => 0,
            1 if len > 0 && !self.second.is_empty() => len,
            _ => return Err(wrong(bytes.len())),
        };
        let moments = self.first.len() + self.second.len();
        let sent = if flags & 1 != 0 { moments } else { 0 };
        if bytes.len() != head + 4 * (sent + arrivals) || dense_at > step {
            return Err(wrong(bytes.len()));
        }
        let words = bytes[head..]
            .chunks_exact(4)
            .map(|b| [b[0], b[1], b[2], b[3]]);
        let mut floats: Vec<f32> = words.clone().take(sent).map(f32::from_le_bytes).collect();
        if floats.iter().any(|v| !v.is_finite()) {
            return Err(RestoreError::NonFinite("optimizer moments".into()));
        }
        floats.resize(moments, 0.0);
        let gaps: Vec<u32> = words.skip(sent).map(u32::from_le_bytes).collect();
        if gaps.iter().any(|&g| u64::from(g) > step) {
            return Err(RestoreError::NonFinite("arrivals after the step".into()));
        }
        let (first, second) = floats.split_at(self.first.len());
        self.first.copy_from_slice(first);
        self.second.copy_from_slice(second);
        self.arrivals = gaps;
        self.step = step;
        self.dense_at = dense_at;
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
        let (arrivals, spare_arrivals) = if gaps {
            self.spare_arrivals.resize(params.len(), 0);
            (&self.arrivals[..], &mut self.spare_arrivals[..])
        } else {
            // Plain Adam reads and writes no arrivals; the spare keeps its length.
            (&[][..], &mut [][..])
        };
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
        let history = pieces(arrivals, piece).zip(pieces_mut(spare_arrivals, piece));
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
#[path = "optimizer_tests.rs"]
mod tests;
