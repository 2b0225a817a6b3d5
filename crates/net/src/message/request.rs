//! What a peer asks of a shard: one variant per message kind, each with one encoder and one
//! decoder. A push's tensor follows its fixed part and is read straight into a buffer.

use super::hello::Hello;
use super::kind;
use super::push::PushHead;
use crate::auth::{Nonce, Proof};
use crate::codec::{Reader, Writer};
use crate::error::NetError;
use crate::lane::{LaneNonce, LANE_NONCE_LEN};
use pstrain_core::PullCodec;

#[derive(Debug, Clone, PartialEq)]
pub enum Request {
    /// The first message to a shard with a run token: the peer's nonce.
    Auth {
        nonce: Nonce,
    },
    /// "What do you serve?": allowed instead of a hello, for clients that adopt the plan;
    /// with a run token, proven like a hello.
    Describe {
        proof: Proof,
    },
    Hello(Hello),
    /// With `newer_than`, the shard sends its slice only if it is newer; with `wait`, it
    /// answers once the consistency gate opens (or the run ends).
    /// `codec` is how the slice should come (the plan's, or under `auto` the worker's pick).
    Pull {
        newer_than: Option<u64>,
        wait: bool,
        codec: PullCodec,
        /// Answer fp32 slices through this connection's shared-memory lane.
        lane: bool,
    },
    /// A worker on the shard's host asks for a shared-memory lane (`crate::lane`).
    Lane,
    /// The nonce read from the lane offered: proof that the worker mapped that memory.
    LaneConfirm {
        nonce: LaneNonce,
    },
    /// The fixed part; `4 * slice` bytes of `f32` follow in the same frame.
    Push(PushHead),
    Stats,
    /// A worker process's sign of life, on its own connection (no reply).
    Heartbeat,
    Goodbye,
}

impl Request {
    pub fn kind(&self) -> u16 {
        match self {
            Request::Auth { .. } => kind::AUTH,
            Request::Describe { .. } => kind::DESCRIBE,
            Request::Hello(_) => kind::HELLO,
            Request::Pull { .. } => kind::PULL,
            Request::Push(_) => kind::PUSH,
            Request::Lane => kind::LANE,
            Request::LaneConfirm { .. } => kind::LANE_CONFIRM,
            Request::Stats => kind::STATS,
            Request::Heartbeat => kind::HEARTBEAT,
            Request::Goodbye => kind::GOODBYE,
        }
    }

    /// The fixed part (`workers` sizes a push's member mask).
    pub fn encode(&self, workers: usize) -> Vec<u8> {
        match self {
            Request::Stats | Request::Heartbeat | Request::Goodbye | Request::Lane => Vec::new(),
            Request::LaneConfirm { nonce } => nonce.to_vec(),
            Request::Auth { nonce } => nonce.to_vec(),
            Request::Describe { proof } => proof.to_vec(),
            Request::Hello(h) => h.encode(),
            Request::Pull {
                newer_than,
                wait,
                codec,
                lane,
            } => {
                let mut w = Writer::default();
                w.opt_u64(*newer_than)
                    .bool(*wait)
                    .pull_codec(*codec)
                    .bool(*lane);
                w.0
            }
            Request::Push(head) => head.encode(workers),
        }
    }

    /// Decodes the fixed part of a frame of `kind` (for a push: the head only).
    pub fn decode(kind: u16, bytes: &[u8], workers: usize) -> Result<Request, NetError> {
        let empty = |request: Request| {
            Reader::new(bytes, "request").finish()?;
            Ok(request)
        };
        match kind {
            kind::AUTH => Ok(Request::Auth {
                nonce: fixed(bytes, "auth")?,
            }),
            kind::DESCRIBE => Ok(Request::Describe {
                proof: fixed(bytes, "describe")?,
            }),
            kind::STATS => empty(Request::Stats),
            kind::HEARTBEAT => empty(Request::Heartbeat),
            kind::GOODBYE => empty(Request::Goodbye),
            kind::LANE => empty(Request::Lane),
            kind::LANE_CONFIRM => Ok(Request::LaneConfirm {
                nonce: fixed::<LANE_NONCE_LEN>(bytes, "lane confirmation")?,
            }),
            kind::HELLO => Ok(Request::Hello(Hello::decode(bytes)?)),
            kind::PULL => {
                let mut r = Reader::new(bytes, "pull");
                let (newer_than, wait, codec) = (r.opt_u64()?, r.bool()?, r.pull_codec()?);
                let lane = r.bool()?;
                r.finish()?;
                Ok(Request::Pull {
                    newer_than,
                    wait,
                    codec,
                    lane,
                })
            }
            kind::PUSH => Ok(Request::Push(PushHead::decode(bytes, workers)?)),
            other => Err(NetError::Unexpected {
                got: other,
                expected: "a request",
            }),
        }
    }
}

/// A message that is exactly `N` bytes.
pub(crate) fn fixed<const N: usize>(bytes: &[u8], what: &'static str) -> Result<[u8; N], NetError> {
    bytes.try_into().map_err(|_| NetError::Malformed {
        what,
        why: format!("{} bytes, expected {N}", bytes.len()),
    })
}
