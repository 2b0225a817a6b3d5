//! What a shard answers: one variant per reply kind, each with one encoder and one decoder;
//! failures carry a typed code (a refused gradient's non-finite count travels as a number).

use super::failure::Failure;
use super::hello::{Description, HelloOk};
use super::kind;
use super::push::PushReply;
use super::request::fixed;
use crate::auth::{Nonce, Proof, NONCE_LEN, PROOF_LEN};
use crate::codec::{Reader, Writer};
use crate::error::NetError;
use pstrain_core::{
    PullReply, PushCodec, ShardCounters, WorkerStats, STALENESS_BOUNDS, WORKER_FIELDS,
};

/// The fixed part of a pull's answer; the slice follows when `updated`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Pulled {
    pub version: u64,
    pub updated: bool,
    pub done: bool,
    /// The slice that follows is a difference from what the worker holds (a delta pull
    /// codec), not the whole slice.
    pub delta: bool,
    /// The slice is in the connection's shared-memory lane, not in the frame.
    pub in_lane: bool,
    /// Speed-balanced sync: the worker's next batch size (0: the plan's).
    pub batch: u32,
    /// The sparsest push the worker's peers that pull by replay chose, if any does (what an
    /// `auto` worker pushes no denser than: `pstrain_core::ReplayingPeers`).
    pub peers_push: Option<PushCodec>,
}

/// The engine's answer as it travels (no batch size travels as 0).
impl From<PullReply> for Pulled {
    fn from(r: PullReply) -> Self {
        Pulled {
            version: r.version,
            updated: r.updated,
            done: r.done,
            delta: false,
            in_lane: false,
            batch: r.batch.unwrap_or(0),
            peers_push: None,
        }
    }
}

impl From<Pulled> for PullReply {
    fn from(p: Pulled) -> Self {
        PullReply {
            version: p.version,
            updated: p.updated,
            done: p.done,
            batch: (p.batch > 0).then_some(p.batch),
        }
    }
}

/// A shard's counters, quorum and whether the run is over, and what it saw of each worker.
#[derive(Debug, Clone, PartialEq)]
pub struct StatsReply {
    pub stats: ShardCounters,
    pub active_workers: u32,
    pub done: bool,
    pub workers: Vec<WorkerStats>,
}

/// Bytes one worker's record takes in a stats reply this build writes.
pub const WORKER_STATS_LEN: usize = 8 * (WORKER_FIELDS.len() + STALENESS_BOUNDS.len());

/// The most numbers a worker record may say it holds (a bound on what a reply can ask the
/// reader to skip per record, far above any real record).
const MAX_WORKER_NUMBERS: usize = 1024;

#[derive(Debug, Clone, PartialEq)]
pub enum Reply {
    /// The shard's nonce and its proof that it holds the run token.
    Challenge {
        nonce: Nonce,
        proof: Proof,
    },
    Described(Description),
    HelloOk(HelloOk),
    Pulled(Pulled),
    Pushed(PushReply),
    /// A shared-memory lane for this connection: the path the worker opens it by.
    LaneOffer {
        path: String,
    },
    /// The lane is in use from the next request on.
    LaneReady,
    Stats(StatsReply),
    GoodbyeOk,
    Error(Failure),
}

impl Reply {
    pub fn kind(&self) -> u16 {
        match self {
            Reply::Challenge { .. } => kind::CHALLENGE,
            Reply::Described(_) => kind::DESCRIBE_REPLY,
            Reply::HelloOk(_) => kind::HELLO_OK,
            Reply::Pulled(_) => kind::PULL_REPLY,
            Reply::Pushed(_) => kind::PUSH_REPLY,
            Reply::LaneOffer { .. } => kind::LANE_OFFER,
            Reply::LaneReady => kind::LANE_READY,
            Reply::Stats(_) => kind::STATS_REPLY,
            Reply::GoodbyeOk => kind::GOODBYE_OK,
            Reply::Error(_) => kind::ERROR,
        }
    }

    /// The fixed part (`workers` sizes a push reply's member mask).
    pub fn encode(&self, workers: usize) -> Vec<u8> {
        let mut w = Writer::default();
        match self {
            Reply::Challenge { nonce, proof } => return [&nonce[..], &proof[..]].concat(),
            Reply::Described(d) => return d.encode(),
            Reply::HelloOk(ok) => return ok.encode(),
            Reply::Pushed(p) => return p.encode(workers),
            Reply::Pulled(p) => {
                w.u64(p.version)
                    .u8(u8::from(p.updated)
                        | (u8::from(p.done) << 1)
                        | (u8::from(p.delta) << 2)
                        | (u8::from(p.in_lane) << 3)
                        | (u8::from(p.peers_push.is_some()) << 4))
                    .u32(p.batch)
                    .push_codec(p.peers_push.unwrap_or_default());
            }
            Reply::Stats(s) => encode_stats(&mut w, s),
            Reply::LaneOffer { path } => {
                w.str(path);
            }
            Reply::GoodbyeOk | Reply::LaneReady => {}
            Reply::Error(f) => f.encode(&mut w),
        }
        w.0
    }

    /// Decodes the fixed part of a frame of `kind` (for a pull reply: the head only).
    pub fn decode(kind: u16, bytes: &[u8], workers: usize) -> Result<Reply, NetError> {
        let mut r = Reader::new(bytes, "reply");
        let reply = match kind {
            kind::CHALLENGE => {
                let both: [u8; NONCE_LEN + PROOF_LEN] = fixed(bytes, "challenge")?;
                let (mut nonce, mut proof) = ([0; NONCE_LEN], [0; PROOF_LEN]);
                nonce.copy_from_slice(&both[..NONCE_LEN]);
                proof.copy_from_slice(&both[NONCE_LEN..]);
                return Ok(Reply::Challenge { nonce, proof });
            }
            kind::DESCRIBE_REPLY => return Ok(Reply::Described(Description::decode(bytes)?)),
            kind::HELLO_OK => return Ok(Reply::HelloOk(HelloOk::decode(bytes)?)),
            kind::PUSH_REPLY => return Ok(Reply::Pushed(PushReply::decode(bytes, workers)?)),
            kind::PULL_REPLY => {
                let (version, flags) = (r.u64()?, r.u8()?);
                if flags > 31 {
                    return Err(r.malformed(format!("pull flags {flags:#x}")).into());
                }
                let (batch, peers_push) = (r.u32()?, r.push_codec()?);
                Reply::Pulled(Pulled {
                    version,
                    updated: flags & 1 != 0,
                    done: flags & 2 != 0,
                    delta: flags & 4 != 0,
                    in_lane: flags & 8 != 0,
                    batch,
                    peers_push: (flags & 16 != 0).then_some(peers_push),
                })
            }
            kind::STATS_REPLY => Reply::Stats(decode_stats(&mut r)?),
            kind::GOODBYE_OK => Reply::GoodbyeOk,
            kind::LANE_OFFER => Reply::LaneOffer { path: r.str()? },
            kind::LANE_READY => Reply::LaneReady,
            kind::ERROR => Reply::Error(Failure::decode(&mut r)?),
            other => {
                return Err(NetError::Unexpected {
                    got: other,
                    expected: "a reply",
                })
            }
        };
        r.finish()?;
        Ok(reply)
    }
}

/// Size of a pull reply's fixed part.
pub const PULLED_LEN: usize = 16;

fn encode_stats(w: &mut Writer, st: &StatsReply) {
    let s = &st.stats;
    w.u64(s.version)
        .u64(s.gradients_applied)
        .u64(s.samples_applied)
        .u64(s.dropped_stale)
        .u64(s.rejected_nonfinite)
        .u64(s.rejected_other)
        .u64(s.clipped)
        .u64(s.rolled_back)
        .u64(s.staleness_sum)
        .u64(s.staleness_max)
        .f32(s.loss_ema.unwrap_or(f32::NAN))
        .u32(st.active_workers)
        .bool(st.done)
        .u32(st.workers.len() as u32)
        // The record says its own shape, so a number added to `WorkerStats` needs no edit here.
        .u16(WORKER_FIELDS.len() as u16)
        .u16(STALENESS_BOUNDS.len() as u16);
    for ws in &st.workers {
        for field in WORKER_FIELDS {
            w.u64((field.get)(ws).to_raw());
        }
        for &n in &ws.staleness_hist {
            w.u64(n);
        }
    }
}

/// One worker's record of `numbers` values then `buckets` histogram counts: numbers this build
/// does not know are skipped, numbers the sender did not have stay zero.
fn decode_worker_stats(
    r: &mut Reader<'_>,
    numbers: usize,
    buckets: usize,
) -> Result<WorkerStats, NetError> {
    let mut ws = WorkerStats::default();
    for i in 0..numbers {
        let raw = r.u64()?;
        if let Some(field) = WORKER_FIELDS.get(i) {
            (field.set)(&mut ws, raw);
        }
    }
    for i in 0..buckets {
        let n = r.u64()?;
        if let Some(slot) = ws.staleness_hist.get_mut(i) {
            *slot = n;
        }
    }
    Ok(ws)
}

fn decode_stats(r: &mut Reader<'_>) -> Result<StatsReply, NetError> {
    let stats = ShardCounters {
        version: r.u64()?,
        gradients_applied: r.u64()?,
        samples_applied: r.u64()?,
        dropped_stale: r.u64()?,
        rejected_nonfinite: r.u64()?,
        rejected_other: r.u64()?,
        clipped: r.u64()?,
        rolled_back: r.u64()?,
        staleness_sum: r.u64()?,
        staleness_max: r.u64()?,
        loss_ema: Some(r.f32()?).filter(|l| !l.is_nan()),
    };
    let (active_workers, done, count) = (r.u32()?, r.bool()?, r.u32()? as usize);
    let (numbers, buckets) = (usize::from(r.u16()?), usize::from(r.u16()?));
    let record_len = 8 * (numbers + buckets);
    if record_len == 0 || numbers + buckets > MAX_WORKER_NUMBERS {
        return Err(r
            .malformed(format!(
                "worker records of {numbers} numbers and {buckets} buckets"
            ))
            .into());
    }
    // Bounded by the frame, which the reader bounds: no allocation beyond what arrived.
    let mut workers = Vec::with_capacity(count.min(r.remaining() / record_len));
    for _ in 0..count {
        workers.push(decode_worker_stats(r, numbers, buckets)?);
    }
    Ok(StatsReply {
        stats,
        active_workers,
        done,
        workers,
    })
}
