//! A pull, from the consistency gate to the bytes sent: the engine decides when and what,
//! and the slice goes out whole in fp32 or bf16, as a difference from what the worker holds,
//! or through the worker's shared-memory lane.

use super::shared::{Shared, State};
use crate::connection::Connection;
use crate::error::NetError;
use crate::lane::Lane;
use crate::message::{Pulled, Reply};
use pstrain_core::{LinkUse, PullAsk, PullCodec, PullDecision, PullReplica, PullReply, PushCodec};
use std::sync::Arc;

/// What a pull asks: its slice if newer than `newer_than`, after the gate when `wait`, in
/// `codec`; a whole fp32 slice through `lane` when given.
pub(super) struct PullAsked<'l> {
    pub newer_than: Option<u64>,
    pub wait: bool,
    pub codec: PullCodec,
    pub lane: Option<&'l Lane>,
    /// The fingerprint of the worker's last push on this connection (replay leaves it out).
    pub yours: Option<u64>,
}

/// Sends this shard's slice if newer than `newer_than`; with `wait`, first waits until the
/// engine's gate opens for `rank` (or the run ends). Under a delta pull codec a worker that
/// holds `newer_than` from this connection (`replica`) is sent the difference; `wire` holds
/// whatever is encoded. A codec the run does not allow is refused by name.
pub(super) async fn pull(
    shared: &Shared,
    conn: &mut Connection,
    rank: Option<usize>,
    asked: PullAsked<'_>,
    (replica, wire): (&mut PullReplica, &mut Vec<u8>),
) -> Result<(), NetError> {
    let PullAsked {
        newer_than,
        wait,
        codec,
        lane,
        yours,
    } = asked;
    if !shared.cfg.plan.allows_pull(codec) {
        return Err(NetError::Malformed {
            what: "pull",
            why: format!(
                "pull codec {codec} is not this run's ({})",
                shared.cfg.plan.codecs_name()
            ),
        });
    }
    if lane.is_some() && codec != PullCodec::Fp32 {
        return Err(NetError::Malformed {
            what: "pull",
            why: format!("a lane carries fp32 pulls, not {codec}"),
        });
    }
    let arrived = shared.now();
    let started = std::time::Instant::now();
    // The engine decides; this only waits for the shard to change between its answers. A
    // healthy worker waits for the others, whose own deadlines (idle, heartbeat) move the step
    // on; still, no wait outlasts the idle deadline (a far-future version would).
    let mut ask = PullAsk { newer_than, wait };
    let mut rx = shared.version.subscribe();
    // A replay pull's body is made under the shard's lock, from what this connection sent.
    let replays = codec == PullCodec::Replay;
    let held = replica.replayed().filter(|_| rank.is_some());
    let decided = async {
        loop {
            rx.borrow_and_update();
            let replay = replays.then_some(((held, yours), &mut *wire));
            if let Some(answer) = decide_pull(shared, rank, ask, arrived, (lane, replay)) {
                return answer;
            }
            if rx.changed().await.is_err() {
                // The shard is going away: its next answer does not wait.
                ask.wait = false;
            }
        }
    };
    let (reply, body, peers_push) = tokio::time::timeout(shared.cfg.idle_timeout, decided)
        .await
        .map_err(|_| NetError::Timeout("at the consistency gate"))?;
    let worker = rank.is_some();
    let pulled = Pulled {
        peers_push,
        ..Pulled::from(reply)
    };
    let pulled = (pulled, body, newer_than);
    let sent = answer_pull(conn, pulled, codec, worker, (replica, wire)).await?;
    if let Some(l) = &shared.latencies {
        l.pull(started.elapsed().as_secs_f64(), sent);
    }
    if let Some(rank) = rank {
        let link = LinkUse {
            pull_bytes: sent,
            pull_codec: Some(codec),
            ..Default::default()
        };
        shared.lock().engine.link_used(rank, link);
    }
    Ok(())
}

/// What a pull's answer carries after its head.
enum PullBody {
    /// Not updated: nothing.
    Nothing,
    /// The weights to send, a copy the pulls of one version share.
    Copy(Arc<Vec<f32>>),
    /// This many values, already written into the worker's lane.
    InLane(usize),
    /// A replay pull's body, already in the connection's wire buffer.
    Replay,
}

/// Sends a pull's answer (`pulled`, what follows it, and the version the worker holds): its
/// head alone when the slice is in the lane, else through `send_pulled`. Returns the
/// tensor's bytes.
async fn answer_pull(
    conn: &mut Connection,
    (mut pulled, body, newer_than): (Pulled, PullBody, Option<u64>),
    codec: PullCodec,
    worker: bool,
    (replica, wire): (&mut PullReplica, &mut Vec<u8>),
) -> Result<u64, NetError> {
    let tensor: &[f32] = match &body {
        PullBody::InLane(values) => {
            pulled.in_lane = true;
            conn.send_reply(&Reply::Pulled(pulled), 0, &[]).await?;
            replica.forget();
            return Ok(4 * *values as u64);
        }
        PullBody::Replay => {
            pulled.delta = true;
            let head = Reply::Pulled(pulled);
            conn.write_frame_bytes(head.kind(), &head.encode(0), wire)
                .await?;
            replica.sent_replay(pulled.version);
            return Ok(wire.len() as u64);
        }
        PullBody::Copy(w) => w.as_slice(),
        PullBody::Nothing => &[],
    };
    pulled.delta = worker
        && !tensor.is_empty()
        && newer_than.is_some_and(|v| replica.can_send_delta(codec, v));
    send_pulled(conn, pulled, tensor, codec, worker, (replica, wire)).await
}

/// Sends a pull's answer with `tensor` (empty: not updated) in `codec`: the difference from
/// what this connection's worker holds (`pulled.delta`), bf16, or the whole slice in fp32;
/// the replica follows what the worker then holds. Returns the tensor's bytes as sent.
async fn send_pulled(
    conn: &mut Connection,
    pulled: Pulled,
    tensor: &[f32],
    codec: PullCodec,
    worker: bool,
    (replica, wire): (&mut PullReplica, &mut Vec<u8>),
) -> Result<u64, NetError> {
    let head = Reply::Pulled(pulled);
    if pulled.delta {
        replica.encode_delta(codec, pulled.version, tensor, wire);
    } else if codec == PullCodec::Bf16 && !tensor.is_empty() {
        codec.encode(tensor, wire);
        replica.forget();
    } else {
        // fp32, or a whole slice under a delta codec (or nothing: not updated).
        conn.send_reply(&head, 0, tensor).await?;
        if !tensor.is_empty() {
            // The replica is kept only for a worker that takes differences (under `auto`
            // one on fp32 holds no slice here; its first delta ask is answered whole).
            if worker && codec.is_delta() {
                replica.sent_whole(pulled.version, tensor);
            } else {
                replica.forget();
            }
        }
        return Ok(4 * tensor.len() as u64);
    }
    conn.write_frame_bytes(head.kind(), &head.encode(0), wire)
        .await?;
    Ok(wire.len() as u64)
}

/// A replay pull's (version the connection sent, fingerprint of the worker's last push) and
/// where its body goes.
type Replay<'w> = ((Option<u64>, Option<u64>), &'w mut Vec<u8>);

/// The engine's decision on a pull now: `None` while it waits at the gate, else the answer,
/// the sparsest push of the worker's replaying peers (`ReplayingPeers`) and, when it is
/// `updated`, the shard's weights: written into the worker's `lane` (under the lock: one
/// copy, no shared copy to make first), or a copy the pulls of that version share, sent
/// outside the lock.
fn decide_pull(
    shared: &Shared,
    rank: Option<usize>,
    ask: PullAsk,
    arrived: std::time::Duration,
    (lane, replay): (Option<&Lane>, Option<Replay<'_>>),
) -> Option<(PullReply, PullBody, Option<PushCodec>)> {
    let mut guard = shared.lock();
    let state = &mut *guard;
    if let Some(rank) = rank {
        state.replaying.pulled(rank, replay.is_some());
    }
    let PullDecision::Answer(reply) = state.engine.pull(rank, ask, arrived, shared.now()) else {
        return None;
    };
    // Only a run that allows replayed pulls has replaying peers: no scan of the ranks on
    // every other run's pulls.
    let values = shared.range.len();
    let peers = (rank.filter(|_| shared.cfg.plan.allows_pull(PullCodec::Replay)))
        .and_then(|r| state.replaying.sparsest_push(r, values));
    decide_body(state, (ask, reply), (lane, replay)).map(|(r, b)| (r, b, peers))
}

/// `decide_pull`'s body of an answer `reply` to `ask`.
fn decide_body(
    state: &mut State,
    (ask, mut reply): (PullAsk, PullReply),
    (lane, replay): (Option<&Lane>, Option<Replay<'_>>),
) -> Option<(PullReply, PullBody)> {
    if !reply.updated {
        return Some((reply, PullBody::Nothing));
    }
    if let Some(((held, yours), wire)) = replay {
        // The updates since the version this connection sent, when the worker says it holds
        // it and the log still has them; else the whole slice with the optimizer's state.
        let core = state.engine.core();
        let from = held.filter(|&h| ask.newer_than == Some(h));
        if !from.is_some_and(|h| core.updates_since(h, yours, wire)) {
            core.write_whole(wire);
        }
        return Some((reply, PullBody::Replay));
    }
    let params = state.engine.params();
    if let Some(lane) = lane {
        // Whole, on this thread: the workers resume computing as their pulls are answered,
        // so another thread would wait for a core (measured slower split in two).
        lane.write(true, params);
        return Some((reply, PullBody::InLane(params.len())));
    }
    match state
        .pull_copies
        .for_pull(reply.version, params, ask.newer_than)
    {
        Some((version, weights)) => {
            reply.version = version;
            Some((reply, PullBody::Copy(weights)))
        }
        None => {
            // Every copy the budget allows is being sent, none newer than the worker's.
            reply.version = ask.newer_than.unwrap_or(reply.version);
            reply.updated = false;
            Some((reply, PullBody::Nothing))
        }
    }
}
