//! The run plan as named, readable fields: one list behind the handshake's mismatch check,
//! the live page, and the record a checkpoint keeps of its run (so a resumed run can say what
//! it changed).

use crate::config::{Aggregate, GradientClip};
use crate::optimizer::OptimizerConfig;
use crate::plan::RunPlan;
use std::fmt;

/// One field where two plans differ: its name, the first plan's value, the second's.
pub type PlanDifference = (&'static str, String, String);

impl fmt::Display for OptimizerConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            OptimizerConfig::Sgd {
                lr,
                momentum,
                weight_decay,
                nesterov,
            } => {
                let name = match (momentum > 0.0, nesterov) {
                    (false, _) => "sgd",
                    (true, false) => "momentum",
                    (true, true) => "nesterov momentum",
                };
                write!(f, "{name} (lr {}", Short(lr))?;
                if momentum > 0.0 {
                    write!(f, ", momentum {momentum}")?;
                }
                write!(f, ", weight decay {})", Short(weight_decay))
            }
            OptimizerConfig::Adam {
                lr,
                beta1,
                beta2,
                eps,
                weight_decay,
            } => write!(
                f,
                "adam (lr {}, betas {beta1}/{beta2}, eps {eps:e}, weight decay {})",
                Short(lr),
                Short(weight_decay)
            ),
        }
    }
}

/// A number as people write it: `0.001`, but `1e-7` and `1e30` rather than their digits.
struct Short(f32);

impl fmt::Display for Short {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let x = self.0.abs();
        match x != 0.0 && !(1e-4..1e6).contains(&x) {
            true => write!(f, "{:e}", self.0),
            false => write!(f, "{}", self.0),
        }
    }
}

fn clip_text(clip: Option<GradientClip>) -> String {
    match clip {
        None => "none".into(),
        Some(GradientClip { max_norm, refuse }) => {
            format!("{max_norm} ({})", if refuse { "refuse" } else { "clip" })
        }
    }
}

impl RunPlan {
    /// Every field of the plan with a readable value, in a fixed order.
    pub fn fields(&self) -> Vec<(&'static str, String)> {
        let aggregate = match self.aggregate {
            Aggregate::Mean => "mean",
            Aggregate::Sum => "sum",
        };
        vec![
            ("model", self.model.clone()),
            ("mode", self.mode.to_string()),
            ("workers", self.workers.to_string()),
            ("batch_size", self.batch_size.to_string()),
            ("epochs", self.epochs.to_string()),
            (
                "iterations",
                self.iterations
                    .map_or_else(|| "none".into(), |i| i.to_string()),
            ),
            ("optimizer", self.optimizer.to_string()),
            ("lr_schedule", self.schedule.name().into()),
            ("aggregate", aggregate.into()),
            ("seed", self.seed.to_string()),
            ("train_samples", self.train_samples.to_string()),
            ("max_grad_norm", clip_text(self.clip)),
            ("staleness_aware_lr", self.staleness_aware_lr.to_string()),
            ("balance_batches", self.balance_batches.to_string()),
            ("push_codec", self.push_codec.to_string()),
            ("pull_codec", self.pull_codec.to_string()),
            ("auto_codecs", self.auto_codecs.to_string()),
        ]
    }

    /// The fields where `other` differs from this plan: (field, this value, other value).
    pub fn differences(&self, other: &RunPlan) -> Vec<PlanDifference> {
        self.fields()
            .into_iter()
            .zip(other.fields())
            .filter(|((_, a), (_, b))| a != b)
            .map(|((field, a), (_, b))| (field, a, b))
            .collect()
    }

    /// The plan as `field=value` lines: what a checkpoint records of the run that wrote it.
    pub fn record(&self) -> String {
        self.fields()
            .into_iter()
            .map(|(field, value)| format!("{field}={value}\n"))
            .collect()
    }

    /// The fields where this plan differs from a `record()`ed one: (field, recorded value,
    /// this value). `None` when `record` is not such a record (a file of an older version);
    /// fields the record lacks are not compared.
    pub fn differences_from_record(&self, record: &str) -> Option<Vec<PlanDifference>> {
        let recorded: Vec<(&str, &str)> = record
            .lines()
            .map(|line| line.split_once('='))
            .collect::<Option<_>>()?;
        if recorded.is_empty() {
            return None;
        }
        let value_of = |field: &str| recorded.iter().find(|(f, _)| *f == field).map(|r| r.1);
        Some(
            self.fields()
                .into_iter()
                .filter_map(|(field, ours)| {
                    let theirs = value_of(field)?;
                    (theirs != ours).then(|| (field, theirs.to_string(), ours))
                })
                .collect(),
        )
    }

    /// What this plan changes from a `record()`ed one (`field was -> now; ...`), if it changes
    /// anything and the record is one.
    pub fn changes_since(&self, record: &str) -> Option<String> {
        let changes = self.differences_from_record(record)?;
        let parts: Vec<String> = changes
            .iter()
            .map(|(field, was, now)| format!("{field} {was} -> {now}"))
            .collect();
        (!parts.is_empty()).then(|| parts.join("; "))
    }
}
