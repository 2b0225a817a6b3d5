//! A push's fixed part (its tensor follows as raw `f32`) and the shard's typed verdict.
//!
//! In coordinated mode (sync with backup workers over several shards) shard 0 decides each
//! step's members; its verdict carries the step and members, and the worker's pushes to the
//! other shards carry them in turn. Elsewhere the step is absent and the mask all zero.

use crate::codec::{Reader, Writer};
use crate::error::NetError;
use pstrain_core::{PushCodec, PushOutcome};

/// "Not a coordinated step."
const NO_STEP: u64 = u64::MAX;

/// Bytes of a member bitmask for `workers` workers.
pub fn mask_len(workers: usize) -> usize {
    workers.div_ceil(8)
}

fn encode_mask(w: &mut Writer, members: &[bool], workers: usize) {
    let mut out = vec![0u8; mask_len(workers)];
    for (i, _) in members.iter().enumerate().filter(|(_, &m)| m) {
        if let Some(b) = out.get_mut(i / 8) {
            *b |= 1 << (i % 8);
        }
    }
    w.0.extend_from_slice(&out);
}

fn decode_mask(r: &mut Reader<'_>, workers: usize) -> Result<Vec<bool>, NetError> {
    let bytes = r.take(mask_len(workers))?;
    Ok((0..workers)
        .map(|i| bytes[i / 8] & (1 << (i % 8)) != 0)
        .collect())
}

/// A coordinated step: its number and, one flag per worker, its members.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StepMembers {
    pub step: u64,
    pub members: Vec<bool>,
}

fn encode_step(w: &mut Writer, step: Option<&StepMembers>, workers: usize) {
    match step {
        Some(s) => {
            w.u64(s.step);
            encode_mask(w, &s.members, workers);
        }
        None => {
            w.u64(NO_STEP);
            encode_mask(w, &[], workers);
        }
    }
}

fn decode_step(r: &mut Reader<'_>, workers: usize) -> Result<Option<StepMembers>, NetError> {
    let step = r.u64()?;
    let members = decode_mask(r, workers)?;
    Ok((step != NO_STEP).then_some(StepMembers { step, members }))
}

/// A push's fixed part: base version, samples, loss, the seconds the worker took to receive
/// its latest pull from this shard (first byte to last; 0 if none since its last push), the
/// codec of the values that follow, whether they are in the connection's shared-memory lane
/// instead (then none follow), the push the worker's own link chose if it sent another,
/// then the coordinated step if any.
#[derive(Debug, Clone, PartialEq)]
pub struct PushHead {
    pub base_version: u64,
    pub samples: u32,
    pub loss: f32,
    pub pull_s: f32,
    pub codec: PushCodec,
    /// The fp32 values are in the lane (`crate::lane`), not in the frame.
    pub lane: bool,
    /// Under `auto`, when `codec` is not what the worker's own link chose (its replaying
    /// peers bound it sparser, or it is putting off its choice of ladder: `AutoCodec`): its
    /// own choice, which is what binds its peers in turn (`pstrain_core::ReplayingPeers`).
    pub own: Option<PushCodec>,
    pub step: Option<StepMembers>,
}

impl PushHead {
    /// Its encoded size in a run of `workers` workers.
    pub fn len(workers: usize) -> usize {
        36 + mask_len(workers)
    }

    pub fn encode(&self, workers: usize) -> Vec<u8> {
        let mut w = Writer::default();
        w.u64(self.base_version)
            .u32(self.samples)
            .f32(self.loss)
            .f32(self.pull_s)
            .push_codec(self.codec)
            .bool(self.lane)
            .bool(self.own.is_some())
            .push_codec(self.own.unwrap_or_default());
        encode_step(&mut w, self.step.as_ref(), workers);
        w.0
    }

    pub fn decode(bytes: &[u8], workers: usize) -> Result<Self, NetError> {
        let mut r = Reader::new(bytes, "push");
        let (base_version, samples, loss) = (r.u64()?, r.u32()?, r.f32()?);
        let (pull_s, codec, lane) = (r.f32()?, r.push_codec()?, r.bool()?);
        let (bound, own) = (r.bool()?, r.push_codec()?);
        let step = decode_step(&mut r, workers)?;
        r.finish()?;
        Ok(PushHead {
            base_version,
            samples,
            loss,
            pull_s,
            codec,
            lane,
            own: bound.then_some(own),
            step,
        })
    }
}

/// What the shard did with a push.
#[derive(Debug, Clone, PartialEq)]
pub struct PushReply {
    pub outcome: PushOutcome,
    /// Shard 0 in coordinated mode: the step the gradient went into, and its members.
    pub step: Option<StepMembers>,
    /// Seconds the push took to arrive, first byte to last (the worker's uplink as the shard
    /// saw it; what `auto` chooses codecs by).
    pub arrive_s: f32,
}

impl PushReply {
    pub fn plain(outcome: PushOutcome) -> Self {
        PushReply {
            outcome,
            step: None,
            arrive_s: 0.0,
        }
    }

    pub fn encode(&self, workers: usize) -> Vec<u8> {
        let mut w = Writer::default();
        match self.outcome {
            PushOutcome::Applied { version, staleness } => w.u8(0).u64(version).u64(staleness),
            PushOutcome::Buffered { waiting_for } => w.u8(1).u64(waiting_for as u64).u64(0),
            PushOutcome::Dropped { staleness } => w.u8(2).u64(0).u64(staleness),
            PushOutcome::Done => w.u8(3).u64(0).u64(0),
        };
        encode_step(&mut w, self.step.as_ref(), workers);
        w.f32(self.arrive_s);
        w.0
    }

    pub fn decode(bytes: &[u8], workers: usize) -> Result<Self, NetError> {
        let mut r = Reader::new(bytes, "push reply");
        let (code, a, b) = (r.u8()?, r.u64()?, r.u64()?);
        let outcome = match code {
            0 => PushOutcome::Applied {
                version: a,
                staleness: b,
            },
            1 => PushOutcome::Buffered {
                waiting_for: usize::try_from(a).unwrap_or(usize::MAX),
            },
            2 => PushOutcome::Dropped { staleness: b },
            3 => PushOutcome::Done,
            other => return Err(r.malformed(format!("unknown outcome {other}")).into()),
        };
        let step = decode_step(&mut r, workers)?;
        let arrive_s = r.f32()?;
        r.finish()?;
        Ok(PushReply {
            outcome,
            step,
            arrive_s,
        })
    }
}
