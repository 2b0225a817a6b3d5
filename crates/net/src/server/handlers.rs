//! What a shard does for each request once the peer is known: pull (behind the consistency
//! gate), push (with shard 0's coordinated-step answer), stats and goodbye.

use super::shared::{Lease, Shared};
use crate::connection::Connection;
use crate::error::NetError;
use crate::lane::Lane;
use crate::message::{
    ErrorCode, Failure, Pulled, PushHead, PushReply, Reply, StatsReply, StepMembers,
};
use pstrain_core::{
    Departure, LinkUse, PullAsk, PullCodec, PullDecision, PullReplica, PullReply, PushCodec,
    PushError, PushMeta, PushOutcome, Seat,
};
use std::sync::Arc;

/// What a pull asks: its slice if newer than `newer_than`, after the gate when `wait`, in
/// `codec`; a whole fp32 slice through `lane` when given.
pub(super) struct PullAsked<'l> {
    pub newer_than: Option<u64>,
    pub wait: bool,
    pub codec: PullCodec,
    pub lane: Option<&'l Lane>,
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
    let decided = async {
        loop {
            rx.borrow_and_update();
            if let Some(answer) = decide_pull(shared, rank, ask, arrived, lane) {
                return answer;
            }
            if rx.changed().await.is_err() {
                // The shard is going away: its next answer does not wait.
                ask.wait = false;
            }
        }
    };
    let (reply, body) = tokio::time::timeout(shared.cfg.idle_timeout, decided)
        .await
        .map_err(|_| NetError::Timeout("at the consistency gate"))?;
    let mut pulled = Pulled::from(reply);
    let worker = rank.is_some();
    let sent = match body {
        PullBody::InLane(values) => {
            pulled.in_lane = true;
            conn.send_reply(&Reply::Pulled(pulled), 0, &[]).await?;
            replica.forget();
            4 * values as u64
        }
        PullBody::Nothing | PullBody::Copy(_) => {
            let tensor: &[f32] = match &body {
                PullBody::Copy(w) => w.as_slice(),
                _ => &[],
            };
            pulled.delta = worker
                && !tensor.is_empty()
                && newer_than.is_some_and(|v| replica.can_send_delta(codec, v));
            send_pulled(conn, pulled, tensor, codec, worker, (replica, wire)).await?
        }
    };
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

/// The engine's decision on a pull now: `None` while it waits at the gate, else the answer
/// and, when it is `updated`, the shard's weights: written into the worker's `lane` (under
/// the lock: one copy, no shared copy to make first), or a copy the pulls of that version
/// share, sent outside the lock.
fn decide_pull(
    shared: &Shared,
    rank: Option<usize>,
    ask: PullAsk,
    arrived: std::time::Duration,
    lane: Option<&Lane>,
) -> Option<(PullReply, PullBody)> {
    let mut guard = shared.lock();
    let state = &mut *guard;
    let PullDecision::Answer(mut reply) = state.engine.pull(rank, ask, arrived, shared.now())
    else {
        return None;
    };
    if !reply.updated {
        return Some((reply, PullBody::Nothing));
    }
    let params = state.engine.params();
    if let Some(lane) = lane {
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

/// Reads a push (its head; then, once the receive budget has room, the slice straight into
/// a lent buffer or through the codec), offers it to the engine, hands a due snapshot to the
/// checkpoint writer, and answers.
pub(super) async fn push(
    shared: &Shared,
    conn: &mut Connection,
    len: u64,
    rank: usize,
    lane: Option<&Lane>,
) -> Result<(), NetError> {
    let arrived = std::time::Instant::now();
    let workers = shared.cfg.plan.workers;
    let (head, body) = read_push_head(shared, conn, len).await?;
    let mut lease = shared.lease_for_push().await;
    // The worker's time sending starts where the shard starts reading its values.
    let started = std::time::Instant::now();
    let bytes = if head.lane {
        let lane = lane.ok_or_else(super::session::no_lane)?;
        if head.codec != PushCodec::Fp32 || body != 0 {
            let why = format!("a lane push of {body} bytes in {}", head.codec);
            return Err(not_a_push(why));
        }
        // Copied out before anything looks at it: the worker cannot change what is checked.
        lease.buf.resize(shared.range.len(), 0.0);
        lane.read(false, &mut lease.buf);
        // Counted as the same push over TCP would be: its head and its values.
        len + 4 * shared.range.len() as u64
    } else {
        read_push_values(shared, conn, head.codec, body, &mut lease).await?;
        len
    };
    let (buf, codec) = (&mut lease.buf, head.codec);
    let meta = PushMeta {
        rank,
        base_version: head.base_version,
        samples: head.samples,
        loss: head.loss,
    };
    // From its header's arrival to its last byte: the worker's time sending.
    let link = LinkUse {
        push_bytes: bytes,
        push_s: started.elapsed().as_secs_f64(),
        pull_s: f64::from(head.pull_s),
        push_codec: Some(codec),
        ..Default::default()
    };
    let report = {
        let now = shared.now();
        let mut state = shared.lock();
        state.engine.link_used(rank, link);
        let tag = head.step.as_ref().map(|s| (s.step, &s.members[..]));
        let report = state.engine.push(meta, buf, tag, now);
        if report.changed {
            shared.publish(&state);
        }
        report
    };
    // The buffer goes back before any wait: a coordinated reply may wait for the step.
    drop(lease);
    if let (Some(state), Some(tx)) = (report.snapshot, &shared.snapshots) {
        // Waits while the writer is busy with the previous snapshot and one more is queued.
        let _ = tx.send(state).await;
    }
    let arrive_s = link.push_s as f32;
    let reply = match (report.outcome, report.admitted_step) {
        (Ok(_), Some(step)) => Reply::Pushed(PushReply {
            arrive_s,
            ..coordinated_reply(shared, step).await
        }),
        (Ok(outcome), None) => Reply::Pushed(PushReply {
            arrive_s,
            ..PushReply::plain(outcome)
        }),
        (Err(e), _) => refusal(&e),
    };
    conn.send_reply(&reply, workers, &[]).await?;
    if let Some(l) = &shared.latencies {
        l.push(arrived.elapsed().as_secs_f64(), bytes);
    }
    Ok(())
}

/// Reads the head of a push of `len` bytes, and gives it with the length of the values that
/// follow it. The head's codec must be one the run allows.
async fn read_push_head(
    shared: &Shared,
    conn: &mut Connection,
    len: u64,
) -> Result<(PushHead, u64), NetError> {
    let head_len = PushHead::len(shared.cfg.plan.workers);
    let body = len
        .checked_sub(head_len as u64)
        .ok_or_else(|| not_a_push(format!("payload of {len} bytes is shorter than its head")))?;
    let head = PushHead::decode(&conn.read_bytes(head_len).await?, shared.cfg.plan.workers)?;
    let codec = head.codec;
    if !shared.cfg.plan.allows_push(codec) {
        let plan = shared.cfg.plan.codecs_name();
        return Err(not_a_push(format!(
            "push codec {codec} is not this run's ({plan})"
        )));
    }
    Ok((head, body))
}

fn not_a_push(why: String) -> NetError {
    NetError::Malformed { what: "push", why }
}

/// Reads a push's `body` bytes of values in `codec` into the lease's `buf` (straight, or
/// through its `wire` and the codec).
async fn read_push_values(
    shared: &Shared,
    conn: &mut Connection,
    codec: PushCodec,
    body: u64,
    lease: &mut Lease<'_>,
) -> Result<(), NetError> {
    let (buf, wire) = (&mut lease.buf, &mut lease.wire);
    // The frame limit already bounds `body` by this shard's size.
    if codec == PushCodec::Fp32 {
        if !body.is_multiple_of(4) {
            return Err(not_a_push(format!("{body} bytes of fp32 values")));
        }
        buf.resize((body / 4) as usize, 0.0);
        conn.read_f32s(buf).await
    } else {
        // Decoded into the slice's full length, every count and index checked before any
        // value reaches the engine (which then checks the values as for any push).
        wire.resize(body as usize, 0);
        conn.read_into(wire).await?;
        buf.resize(shared.range.len(), 0.0);
        codec
            .decode(wire, buf)
            .map_err(|e| not_a_push(e.to_string()))
    }
}

/// A refused push as the worker hears of it: typed where its loop acts on the reason.
fn refusal(e: &PushError) -> Reply {
    let code = match *e {
        PushError::NonFinite { count } => ErrorCode::NonFinite {
            count: count as u64,
        },
        PushError::TooLarge { largest } => ErrorCode::TooLarge { largest },
        PushError::NonFiniteResult => ErrorCode::RolledBack,
        _ => ErrorCode::Refused,
    };
    Reply::Error(Failure::new(code, e.to_string()))
}

/// Shard 0 in coordinated mode: the other shards need step `step`'s members, known once it
/// is complete, so the answer waits for that (the worker would wait before its next pull).
async fn coordinated_reply(shared: &Shared, step: u64) -> PushReply {
    let mut rx = shared.version.subscribe();
    loop {
        let (version, done) = *rx.borrow_and_update();
        if version > step || done || rx.changed().await.is_err() {
            break;
        }
    }
    let state = shared.lock();
    match state.engine.step_members(step) {
        Some(members) => PushReply {
            outcome: PushOutcome::Applied {
                version: step + 1,
                staleness: 0,
            },
            step: Some(StepMembers {
                step,
                members: members.to_vec(),
            }),
            arrive_s: 0.0,
        },
        None if state.engine.is_done() => PushReply::plain(PushOutcome::Done),
        None => PushReply::plain(PushOutcome::Dropped { staleness: 0 }),
    }
}

pub(super) async fn stats(shared: &Shared, conn: &mut Connection) -> Result<(), NetError> {
    let stats = {
        let state = shared.lock();
        StatsReply {
            stats: state.engine.stats(),
            active_workers: state.engine.active_workers() as u32,
            done: state.engine.is_done(),
            workers: state.engine.worker_stats(),
        }
    };
    conn.send_reply(&Reply::Stats(stats), 0, &[]).await
}

/// A worker's goodbye frees its rank and takes it out of the quorum.
pub(super) async fn goodbye(
    shared: &Shared,
    conn: &mut Connection,
    seat: Option<Seat>,
) -> Result<(), NetError> {
    if let Some(seat) = seat {
        let mut state = shared.lock();
        state.engine.leave(seat, Departure::Goodbye);
        shared.publish(&state);
    }
    conn.send_reply(&Reply::GoodbyeOk, 0, &[]).await
}
