//! What a shard does for each request once the peer is known, besides pulls (`pull.rs`):
//! push (with shard 0's coordinated-step answer), stats and goodbye.

use super::shared::{Lease, Shared};
use crate::connection::Connection;
use crate::error::NetError;
use crate::lane::Lane;
use crate::message::{ErrorCode, Failure, PushHead, PushReply, Reply, StatsReply, StepMembers};
use pstrain_core::{
    Departure, LinkUse, PushCodec, PushError, PushMeta, PushOutcome, Seat, WireRef,
};

/// Reads a push (its head; then, once the receive budget has room, the slice straight into
/// a lent buffer or through the codec), offers it to the engine, hands a due snapshot to the
/// checkpoint writer, and answers. Under an update log: the fingerprint of the push's bytes,
/// which a replay pull on this connection leaves out (not for a lane's push).
pub(super) async fn push(
    shared: &Shared,
    conn: &mut Connection,
    len: u64,
    rank: usize,
    lane: Option<&Lane>,
) -> Result<Option<u64>, NetError> {
    let arrived = std::time::Instant::now();
    let workers = shared.cfg.plan.workers;
    let (head, body) = read_push_head(shared, conn, len).await?;
    let mut lease = shared.lease_for_push().await;
    // The worker's time sending starts where the shard starts reading its values.
    let started = std::time::Instant::now();
    let bytes = if head.lane {
        let (values, threads) = (shared.range.len(), shared.threads.as_deref());
        let sizes = (len, body);
        super::lanes::read_push(threads, lane, head.codec, sizes, &mut lease.buf, values)?
    } else {
        read_push_values(shared, conn, head.codec, body, &mut lease).await?;
        len
    };
    let codec = head.codec;
    let meta = PushMeta {
        rank,
        base_version: head.base_version,
        samples: head.samples,
        loss: head.loss,
        accumulated: codec.accumulates(),
    };
    // From its header's arrival to its last byte: the worker's time sending.
    let link = LinkUse {
        push_bytes: bytes,
        push_s: started.elapsed().as_secs_f64(),
        pull_s: f64::from(head.pull_s),
        push_codec: Some(codec),
        ..Default::default()
    };
    let (buf, wire) = (&lease.buf, &mut lease.wire);
    let logs = shared.cfg.plan.keeps_update_log();
    let (wire, pushed) = logged_wire(logs, (codec, head.lane), buf, wire);
    let report = {
        let now = shared.now();
        let mut state = shared.lock();
        state.engine.link_used(rank, link);
        // What the worker's own link chose (a peer's word moves only its peers' choice of
        // push, within `auto`'s ladder).
        state.replaying.pushed(rank, head.own.unwrap_or(codec));
        let tag = head.step.as_ref().map(|s| (s.step, &s.members[..]));
        let report = state.engine.push_decoded(meta, buf, wire, tag, now);
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
    Ok(pushed)
}

/// The bytes a push's values were decoded from, for the shard's update log if it keeps one:
/// the codec's, as read into `wire`; fp32 values (or any pushed through a lane, decoded
/// there) as their little-endian bytes, written into `wire`. With it, the fingerprint a
/// replay pull on this connection leaves out (not a lane's push: the worker keeps no bytes).
fn logged_wire<'w>(
    logs: bool,
    (codec, lane): (PushCodec, bool),
    values: &[f32],
    wire: &'w mut Vec<u8>,
) -> (Option<WireRef<'w>>, Option<u64>) {
    if !logs {
        return (None, None);
    }
    let codec = if lane || codec == PushCodec::Fp32 {
        wire.clear();
        wire.extend(values.iter().flat_map(|v| v.to_le_bytes()));
        PushCodec::Fp32
    } else {
        codec
    };
    let logged = WireRef::new(codec, wire);
    (Some(logged), (!lane).then_some(logged.fingerprint))
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
        if state.engine.holds(seat) {
            state.replaying.left(seat.rank);
        }
        state.engine.leave(seat, Departure::Goodbye);
        shared.publish(&state);
    }
    conn.send_reply(&Reply::GoodbyeOk, 0, &[]).await
}
