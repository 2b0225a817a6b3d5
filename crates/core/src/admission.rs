//! The admission gate: every check a gradient passes before a consistency rule sees it, run
//! once, in one place, for every rule. A rule receives only `Checked` gradients (finite,
//! bounded, clipped, from a rank it takes, for a step it takes), so "only finite, bounded
//! gradients reach the model" does not depend on each rule remembering the checks.

use crate::config::ServerConfig;
use crate::error::PushError;
use crate::gradient_scan;
use crate::optimizer::ScaledGrad;
use crate::shard_state::{PushMeta, ShardState};
use crate::splitter;
use crate::update_log::{Source, WireRef};

/// The largest gradient value a shard takes (larger ones are refused, counted as non-finite).
/// Under it every optimizer's state and the weights stay finite (a sync step's weighted sum
/// too), so one push cannot make them infinite, or freeze Adam by making its second moment so.
pub const MAX_GRADIENT: f32 = 1e15;

/// In coordinated mode: the step shard 0 admitted a gradient into, and that step's members.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct StepTag<'a> {
    pub step: u64,
    pub members: &'a [bool],
}

/// One gradient offered to a shard, before the admission gate.
#[derive(Debug, Clone, Copy)]
pub struct Gradient<'a> {
    pub meta: PushMeta,
    pub values: &'a [f32],
    /// The bytes `values` were decoded from, when the shard keeps an update log.
    pub wire: Option<WireRef<'a>>,
    /// Set on pushes to a follower shard in coordinated mode.
    pub tag: Option<StepTag<'a>>,
}

/// Whose steps a rule applies: what the admission gate checks a gradient's step against.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StepSource {
    /// The rule decides its own steps: a gradient carries no step tag; with `quorum`, its
    /// rank must be in the quorum.
    Own { quorum: bool },
    /// The rule applies shard 0's steps: every gradient carries a tag whose members name it.
    ShardZero,
}

/// A gradient that passed the gate: what a consistency rule works with.
#[derive(Debug, Clone, Copy)]
pub struct Checked<'a> {
    pub meta: PushMeta,
    /// Finite, every value at most `MAX_GRADIENT`, scaled to the norm bound if it had one.
    pub values: &'a [f32],
    /// The bytes the unclipped values were decoded from (when the shard keeps an update
    /// log), and the factor the gate clipped them by.
    pub wire: Option<WireRef<'a>>,
    pub clip: Option<f32>,
    /// Present exactly when the rule follows shard 0's steps; its members name `meta.rank`
    /// and have one flag per worker.
    pub tag: Option<StepTag<'a>>,
}

/// Who sent a gradient the gate refused for its values, for the rules whose steps wait on
/// ranks (so that a bad gradient cannot stall a barrier).
#[derive(Debug, Clone, Copy)]
pub struct Refused<'a> {
    pub meta: PushMeta,
    pub tag: Option<StepTag<'a>>,
}

/// What the gate made of an offered gradient.
#[derive(Debug)]
pub enum Verdict<'a> {
    /// Hand it to the rule.
    Admitted(Checked<'a>),
    /// The run is over: nothing more is taken (not an error).
    RunOver,
    /// Refused for what it claims to be (rank, length, version, step): it belongs to no step
    /// and no rule hears of it.
    Misaddressed(PushError),
    /// Refused for its values (empty, not finite, too large, over the norm bound): the rule
    /// hears of it through `Consistency::refused`.
    BadValues(PushError, Refused<'a>),
}

/// The gate's one buffer: a clipped gradient's copy (used only with a norm bound).
#[derive(Debug, Default)]
pub struct Gate {
    clipped: Vec<f32>,
}

impl Gate {
    /// Runs every check on `grad`, in order: addressing (rank, length, base version, the run
    /// not over), step ownership (`source`), then values (samples, finite, bounded, norm).
    /// Refusals are counted in `state`.
    pub fn admit<'a>(
        &'a mut self,
        config: &ServerConfig,
        state: &mut ShardState,
        active: &[bool],
        source: StepSource,
        mut grad: Gradient<'a>,
    ) -> Verdict<'a> {
        if let Some(cap) = config.max_samples {
            grad.meta.samples = grad.meta.samples.min(cap);
        }
        if let Err(e) = addressed(config, state, active, source, &grad) {
            state.count_refusal();
            return Verdict::Misaddressed(e);
        }
        if config.max_updates.is_some_and(|max| state.version() >= max) {
            return Verdict::RunOver;
        }
        let refused = Refused {
            meta: grad.meta,
            tag: grad.tag,
        };
        if let Err(e) = sound_values(state, &grad) {
            return Verdict::BadValues(e, refused);
        }
        let Some(clip) = config.clip else {
            return Verdict::Admitted(checked(grad, grad.values, None));
        };
        let norm = gradient_scan::norm(grad.values);
        if norm <= clip.max_norm {
            return Verdict::Admitted(checked(grad, grad.values, None));
        }
        if clip.refuse {
            state.count_refusal();
            let e = PushError::NormTooLarge {
                norm,
                max: clip.max_norm,
            };
            return Verdict::BadValues(e, refused);
        }
        let scale = clip.max_norm / norm;
        self.clipped.clear();
        self.clipped.extend(grad.values.iter().map(|&g| g * scale));
        state.count_clipped();
        Verdict::Admitted(checked(grad, &self.clipped, Some(scale)))
    }
}

impl<'a> Checked<'a> {
    /// The values times `scale` as the optimizer takes them, of the kind the push said.
    pub fn scaled(&self, scale: f32) -> ScaledGrad<'a> {
        let source = match self.wire {
            Some(wire) => Source::Push {
                wire,
                clip: self.clip,
            },
            None => Source::Unknown,
        };
        ScaledGrad {
            values: self.values,
            scale,
            accumulated: self.meta.accumulated,
            source,
        }
    }
}

fn checked<'a>(grad: Gradient<'a>, values: &'a [f32], clip: Option<f32>) -> Checked<'a> {
    Checked {
        meta: grad.meta,
        values,
        wire: grad.wire,
        clip,
        tag: grad.tag,
    }
}

/// What the gradient claims to be: a known rank, the shard's length, weights that exist,
/// and a step the rule takes from this rank.
fn addressed(
    config: &ServerConfig,
    state: &ShardState,
    active: &[bool],
    source: StepSource,
    grad: &Gradient<'_>,
) -> Result<(), PushError> {
    let (rank, workers) = (grad.meta.rank, config.workers);
    if rank >= workers {
        return Err(PushError::UnknownWorker { rank, workers });
    }
    if grad.values.len() != state.len() {
        return Err(PushError::WrongLength {
            expected: state.len(),
            got: grad.values.len(),
        });
    }
    if grad.meta.base_version > state.version() {
        return Err(PushError::FromTheFuture {
            base: grad.meta.base_version,
            current: state.version(),
        });
    }
    match (source, grad.tag) {
        (StepSource::Own { .. }, Some(_)) => Err(PushError::UnexpectedStep),
        (StepSource::Own { quorum: true }, None) if !active[rank] => {
            Err(PushError::NotInQuorum { rank })
        }
        (StepSource::Own { .. }, None) => Ok(()),
        (StepSource::ShardZero, None) => Err(PushError::NotAMember { rank, step: None }),
        (StepSource::ShardZero, Some(tag)) if tag.members.len() != workers => {
            Err(PushError::WrongMembers {
                expected: workers,
                got: tag.members.len(),
            })
        }
        (StepSource::ShardZero, Some(tag)) if !tag.members[rank] => Err(PushError::NotAMember {
            rank,
            step: Some(tag.step),
        }),
        (StepSource::ShardZero, Some(_)) => Ok(()),
    }
}

/// A batch of at least one sample, every value finite and at most `MAX_GRADIENT`.
fn sound_values(state: &mut ShardState, grad: &Gradient<'_>) -> Result<(), PushError> {
    if grad.meta.samples == 0 {
        state.count_refusal();
        return Err(PushError::EmptyBatch);
    }
    let largest_bits = splitter::map_pieces(
        state.splitter(),
        grad.values,
        gradient_scan::largest_magnitude_bits,
    )
    .into_iter()
    .max()
    .unwrap_or(0);
    if largest_bits >= f32::INFINITY.to_bits() {
        state.count_nonfinite();
        let count = gradient_scan::count_non_finite(grad.values);
        return Err(PushError::NonFinite { count });
    }
    let largest = f32::from_bits(largest_bits);
    if largest > MAX_GRADIENT {
        state.count_nonfinite();
        return Err(PushError::TooLarge { largest });
    }
    Ok(())
}
