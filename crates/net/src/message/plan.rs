//! The run plan on the wire: every field, in a fixed order.

use crate::codec::{Reader, Writer};
use crate::error::NetError;
pub use pstrain_core::plan::MAX_WORKERS;
use pstrain_core::{
    Aggregate, GradientClip, Mode, OptimizerConfig, PullCodec, PushCodec, RunPlan, ScheduleKind,
};

pub fn encode_plan(w: &mut Writer, p: &RunPlan) {
    let (mode_tag, mode_param) = p.mode.to_wire();
    w.str(&p.model)
        .u8(mode_tag)
        .u64(mode_param)
        .u64(p.workers as u64)
        .u64(p.batch_size as u64)
        .u64(p.epochs as u64)
        .opt_u64(p.iterations);
    match p.optimizer {
        OptimizerConfig::Sgd {
            lr,
            momentum,
            weight_decay,
            nesterov,
        } => {
            w.u8(1)
                .f32(lr)
                .f32(momentum)
                .f32(weight_decay)
                .bool(nesterov);
        }
        OptimizerConfig::Adam {
            lr,
            beta1,
            beta2,
            eps,
            weight_decay,
        } => {
            w.u8(2)
                .f32(lr)
                .f32(beta1)
                .f32(beta2)
                .f32(eps)
                .f32(weight_decay);
        }
    }
    w.u8(match p.schedule {
        ScheduleKind::Constant => 1,
        ScheduleKind::Cosine => 2,
    })
    .u8(match p.aggregate {
        Aggregate::Mean => 1,
        Aggregate::Sum => 2,
    })
    .u64(p.seed)
    .u64(p.train_samples as u64);
    match p.clip {
        Some(c) => w.u8(1).f32(c.max_norm).bool(c.refuse),
        None => w.u8(0).f32(0.0).bool(false),
    };
    w.bool(p.staleness_aware_lr).bool(p.balance_batches);
    // Tag 0 both ways: `auto`.
    let (push, pull) = if p.auto_codecs {
        ((0, 0), (0, 0))
    } else {
        (p.push_codec.to_tag(), p.pull_codec.to_tag())
    };
    w.u8(push.0)
        .u32(u32::from(push.1))
        .u8(pull.0)
        .u32(u32::from(pull.1));
}

pub fn decode_plan(r: &mut Reader<'_>) -> Result<RunPlan, NetError> {
    let model = r.str()?;
    let (tag, param) = (r.u8()?, r.u64()?);
    let mode = Mode::from_wire(tag, param).ok_or_else(|| r.malformed(format!("mode {tag}")))?;
    let (workers, batch_size, epochs) = (r.usize()?, r.usize()?, r.usize()?);
    if workers == 0 || workers > MAX_WORKERS {
        // Peers size per-worker tables from this: bound it before anyone allocates.
        return Err(r
            .malformed(format!("{workers} workers (1..={MAX_WORKERS})"))
            .into());
    }
    let iterations = r.opt_u64()?;
    let optimizer = match r.u8()? {
        1 => OptimizerConfig::Sgd {
            lr: r.f32()?,
            momentum: r.f32()?,
            weight_decay: r.f32()?,
            nesterov: r.bool()?,
        },
        2 => OptimizerConfig::Adam {
            lr: r.f32()?,
            beta1: r.f32()?,
            beta2: r.f32()?,
            eps: r.f32()?,
            weight_decay: r.f32()?,
        },
        other => return Err(r.malformed(format!("optimizer {other}")).into()),
    };
    let schedule = match r.u8()? {
        1 => ScheduleKind::Constant,
        2 => ScheduleKind::Cosine,
        other => return Err(r.malformed(format!("schedule {other}")).into()),
    };
    let aggregate = match r.u8()? {
        1 => Aggregate::Mean,
        2 => Aggregate::Sum,
        other => return Err(r.malformed(format!("aggregate {other}")).into()),
    };
    let (seed, train_samples) = (r.u64()?, r.usize()?);
    let (has_clip, max_norm, refuse) = (r.bool()?, r.f32()?, r.bool()?);
    let (staleness_aware_lr, balance_batches) = (r.bool()?, r.bool()?);
    let (push_codec, pull_codec, auto_codecs) = decode_codecs(r)?;
    Ok(RunPlan {
        model,
        mode,
        workers,
        batch_size,
        epochs,
        iterations,
        optimizer,
        schedule,
        aggregate,
        seed,
        train_samples,
        clip: has_clip.then_some(GradientClip { max_norm, refuse }),
        staleness_aware_lr,
        balance_batches,
        push_codec,
        pull_codec,
        auto_codecs,
    })
}

/// The plan's push and pull codecs, each a tag and a parameter (tag 0 both ways: `auto`).
fn decode_codecs(r: &mut Reader<'_>) -> Result<(PushCodec, PullCodec, bool), NetError> {
    let (push_tag, push_param) = (r.u8()?, r.u32()?);
    let (pull_tag, pull_param) = (r.u8()?, r.u32()?);
    if (push_tag, push_param, pull_tag, pull_param) == (0, 0, 0, 0) {
        return Ok((PushCodec::Fp32, PullCodec::Fp32, true));
    }
    let push = u16::try_from(push_param)
        .ok()
        .and_then(|p| PushCodec::from_tag(push_tag, p))
        .ok_or_else(|| r.malformed(format!("push codec {push_tag}:{push_param}")))?;
    let pull = u16::try_from(pull_param)
        .ok()
        .and_then(|p| PullCodec::from_tag(pull_tag, p))
        .ok_or_else(|| r.malformed(format!("pull codec {pull_tag}:{pull_param}")))?;
    Ok((push, pull, false))
}
