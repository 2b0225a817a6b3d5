//! A connection's shared-memory lane on the shard's side: offered to a worker that asks (on
//! the shard's host, seat held, within the shard's lane budget), in use once the worker has
//! echoed the nonce it read from it, and given back to the budget when the connection ends.

use super::shared::Shared;
use crate::connection::Connection;
use crate::error::NetError;
use crate::lane::{lane_len, Lane, LaneNonce};
use crate::message::{ErrorCode, Failure, Reply};
use pstrain_core::splitter;
use pstrain_core::{Job, PushCodec, Splitter};
use std::sync::atomic::Ordering;

/// A lane and the budget bytes it holds.
pub(super) struct HeldLane<'a> {
    shared: &'a Shared,
    bytes: u64,
    pub lane: Lane,
}

impl Drop for HeldLane<'_> {
    fn drop(&mut self) {
        self.shared
            .lane_bytes
            .fetch_sub(self.bytes, Ordering::Relaxed);
    }
}

/// This connection's lane: none, offered (waiting for the nonce), or in use.
#[derive(Default)]
pub(super) enum LaneState<'a> {
    #[default]
    None,
    Offered(HeldLane<'a>, LaneNonce),
    Ready(HeldLane<'a>),
}

impl<'a> LaneState<'a> {
    /// The lane in use, if any.
    pub fn ready(&self) -> Option<&Lane> {
        match self {
            LaneState::Ready(held) => Some(&held.lane),
            _ => None,
        }
    }

    /// The lane a request names (`named`): this connection's, which must be in use.
    pub fn named(&self, named: bool) -> Result<Option<&Lane>, NetError> {
        match (named, self.ready()) {
            (false, _) => Ok(None),
            (true, Some(lane)) => Ok(Some(lane)),
            (true, None) => Err(no_lane()),
        }
    }

    /// A worker asks for a lane: offered if the budget has room and the system can make
    /// one; otherwise a refusal the worker takes as "stay on TCP" (the connection goes on).
    pub async fn ask(&mut self, shared: &'a Shared, conn: &mut Connection) -> Result<(), NetError> {
        // A second ask replaces the first lane (its bytes go back first).
        *self = LaneState::None;
        let values = shared.range.len();
        let bytes = lane_len(values);
        let budget = shared.cfg.lane_budget;
        let taken = shared
            .lane_bytes
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |held| {
                held.checked_add(bytes).filter(|&total| total <= budget)
            });
        if values == 0 || taken.is_err() {
            let why = format!(
                "no shared-memory lane: the shard's lane budget ({budget} bytes) is in use or off"
            );
            return refuse(conn, why).await;
        }
        match Lane::create(values) {
            Ok((lane, path, nonce)) => {
                let held = HeldLane {
                    shared,
                    bytes,
                    lane,
                };
                *self = LaneState::Offered(held, nonce);
                conn.send_reply(&Reply::LaneOffer { path }, 0, &[]).await
            }
            Err(e) => {
                shared.lane_bytes.fetch_sub(bytes, Ordering::Relaxed);
                refuse(conn, format!("no shared-memory lane: {e}")).await
            }
        }
    }

    /// The worker's echo of the nonce: the lane is in use if it matches; if not (the worker
    /// mapped other memory, or never opened it), the lane is dropped and the link stays on
    /// TCP.
    pub async fn confirm(
        &mut self,
        conn: &mut Connection,
        echoed: LaneNonce,
    ) -> Result<(), NetError> {
        match std::mem::take(self) {
            LaneState::Offered(held, nonce) if nonce == echoed => {
                *self = LaneState::Ready(held);
                conn.send_reply(&Reply::LaneReady, 0, &[]).await
            }
            LaneState::Offered(..) => refuse(conn, "the lane's nonce does not match".into()).await,
            _ => refuse(conn, "no lane was offered on this connection".into()).await,
        }
    }
}

async fn refuse(conn: &mut Connection, why: String) -> Result<(), NetError> {
    let failure = Failure::new(ErrorCode::Refused, why);
    conn.send_reply(&Reply::Error(failure), 0, &[]).await
}

/// A pull or push through a lane on a connection that has none.
fn no_lane() -> NetError {
    NetError::Malformed {
        what: "request",
        why: "it names a shared-memory lane, and this connection has none".into(),
    }
}

/// Reads a push whose fp32 values are in `lane` (its frame carries `body` bytes after the
/// head: there must be none) into `buf`, copied out before anything looks at them, so the
/// worker cannot change what is checked (in the pieces `threads` cut it into). Returns the
/// bytes counted for it: its frame's `len` and the values, as the same push over TCP.
pub(super) fn read_push(
    threads: Option<&dyn Splitter>,
    lane: Option<&Lane>,
    codec: PushCodec,
    (len, body): (u64, u64),
    buf: &mut Vec<f32>,
    values: usize,
) -> Result<u64, NetError> {
    let lane = lane.ok_or_else(no_lane)?;
    if codec != PushCodec::Fp32 || body != 0 {
        return Err(NetError::Malformed {
            what: "push",
            why: format!("a lane push of {body} bytes in {codec}"),
        });
    }
    buf.resize(values, 0.0);
    let piece = splitter::piece_len(threads, values);
    let jobs = buf
        .chunks_mut(piece)
        .enumerate()
        .map(|(i, out)| Box::new(move || lane.read_at(false, i * piece, out)) as Job<'_>)
        .collect();
    splitter::run(threads, jobs);
    Ok(len + 4 * values as u64)
}
