//! One connection, from handshake to close: reads each request, hands it to its handler, and
//! on the way out says why (when the socket still works) and lets go of a worker's rank.

use super::handlers;
use super::handshake::{self, Peer};
use super::lanes::LaneState;
use super::shared::Shared;
use crate::connection::Connection;
use crate::error::NetError;
use crate::message::{kind, PushHead, Reply, Request, Role};
use pstrain_core::{Departure, PullReplica};
use std::net::IpAddr;
use std::sync::Arc;
use tokio::net::TcpStream;

/// Serves one connection from `ip` (already counted in by `Shared::admit`).
pub(super) async fn handle(shared: Arc<Shared>, stream: TcpStream, ip: IpAddr) {
    let Some(mut conn) = open(&shared, stream).await else {
        let mut state = shared.lock();
        state.events.protocol_errors += 1;
        shared.release(&mut state, ip, false);
        shared.check_finished(&state);
        return;
    };
    let mut peer = None;
    let result = serve(&shared, &mut conn, &mut peer, ip).await;
    if let Err(e) = &result {
        // Best effort: tell the peer why, unless the socket itself is what failed.
        if !e.is_transport() {
            let _ = conn.send_reply(&Reply::Error(e.failure()), 0, &[]).await;
        }
        let mut state = shared.lock();
        match e {
            NetError::Unauthorized(why) => shared.log_unauthorized(&mut state, ip, why),
            NetError::Handshake(_) | NetError::Join(_) | NetError::Evicted(_) => {
                state.events.refused_handshakes += 1;
                let line = format!("closing connection from {}: {e}", conn.peer());
                shared.log_refusal(&mut state, &line);
            }
            _ => {
                state.events.protocol_errors += 1;
                let line = format!("closing connection from {}: {e}", conn.peer());
                shared.log_refusal(&mut state, &line);
            }
        }
    }
    conn.shutdown().await;
    let mut state = shared.lock();
    shared.release(&mut state, ip, peer.is_some());
    if peer.as_ref().is_some_and(|p| p.role == Role::Heartbeat) {
        state.heartbeat_links -= 1;
    }
    // A worker that vanished without a goodbye leaves the quorum; one that was evicted or
    // replaced no longer speaks for its rank, so nothing changes.
    if let Some(Peer {
        seat: Some(seat),
        said_goodbye: false,
        ..
    }) = peer
    {
        if state.engine.holds(seat) {
            state.events.vanished_workers += 1;
            shared.log(&format!(
                "worker {} disconnected without a goodbye; it leaves the quorum",
                seat.rank
            ));
            state.replaying.left(seat.rank);
            state.engine.leave(seat, Departure::Vanished);
            shared.publish(&state);
        }
    }
    shared.check_finished(&state);
}

/// The connection, after the TLS handshake when the shard serves TLS (under the handshake
/// deadline); `None` if that failed.
async fn open(shared: &Shared, stream: TcpStream) -> Option<Connection> {
    let cfg = &shared.cfg;
    let Some(tls) = &cfg.tls else {
        return Some(Connection::new(stream, cfg.io_timeout));
    };
    let _ = stream.set_nodelay(true);
    let peer = stream
        .peer_addr()
        .map_or_else(|_| "unknown peer".into(), |a| a.to_string());
    match tokio::time::timeout(cfg.handshake_timeout, tls.accept(stream)).await {
        Ok(Ok(tls_stream)) => Some(Connection::over(tls_stream, peer, cfg.io_timeout)),
        Ok(Err(e)) => {
            let line = format!("TLS handshake with {peer} failed: {e}");
            shared.log_refusal(&mut shared.lock(), &line);
            None
        }
        Err(_) => None,
    }
}

async fn serve(
    shared: &Shared,
    conn: &mut Connection,
    peer: &mut Option<Peer>,
    ip: IpAddr,
) -> Result<(), NetError> {
    let cfg = &shared.cfg;
    let Some(me) = shake_hands(shared, conn).await? else {
        return Ok(());
    };
    welcome(shared, conn, ip, &me);
    *peer = Some(me);
    let (workers, limit) = (cfg.plan.workers, frame_limit(shared));
    // Compressed pulls pass through here, reused for the connection's life.
    let mut wire = Vec::new();
    // What this worker holds of the slice, under a delta pull codec (for this connection).
    let seed = cfg.plan.seed ^ ((me.rank as u64) << 32) ^ shared.range.start as u64;
    let mut replica = PullReplica::new(cfg.plan.sends_deltas(), seed);
    // A worker on this host may move its fp32 slices through shared memory instead.
    let mut lane = LaneState::default();
    // The fingerprint of this worker's last push, which replay pulls leave out.
    let mut pushed = None;
    loop {
        let Some(header) = conn.read_header(cfg.idle_timeout, limit).await? else {
            return Ok(());
        };
        still_seated(shared, &me)?;
        if header.kind == kind::PUSH && me.role == Role::Worker {
            let lane = lane.ready();
            pushed = handlers::push(shared, conn, header.len, me.rank, lane).await?;
            continue;
        }
        // Read whole before any refusal: closing on unread bytes would reset the connection
        // and could lose the reply.
        let bytes = conn.read_bytes(header.len as usize).await?;
        only_workers_push(header.kind)?;
        match Request::decode(header.kind, &bytes, workers)? {
            Request::Pull {
                newer_than,
                wait,
                codec,
                lane: in_lane,
            } => {
                let (rank, state) = (me.seat.map(|s| s.rank), (&mut replica, &mut wire));
                let lane = lane.named(in_lane)?;
                let asked = super::pull::PullAsked {
                    newer_than,
                    wait,
                    codec,
                    lane,
                    yours: pushed,
                };
                super::pull::pull(shared, conn, rank, asked, state).await?;
            }
            Request::Stats => handlers::stats(shared, conn).await?,
            Request::Lane if me.seat.is_some() => lane.ask(shared, conn).await?,
            Request::LaneConfirm { nonce } if me.seat.is_some() => {
                lane.confirm(conn, nonce).await?
            }
            Request::Heartbeat if me.role == Role::Heartbeat => {
                let now = shared.now();
                shared.lock().engine.heartbeat(me.rank, now);
            }
            Request::Goodbye => {
                if let Some(p) = peer.as_mut() {
                    p.said_goodbye = true;
                }
                return handlers::goodbye(shared, conn, me.seat).await;
            }
            _ => {
                return Err(NetError::Unexpected {
                    got: header.kind,
                    expected: "pull, push, stats or goodbye",
                })
            }
        }
    }
}

/// A worker evicted (or replaced) since its last request no longer speaks for its rank.
fn still_seated(shared: &Shared, me: &Peer) -> Result<(), NetError> {
    match me.seat {
        Some(seat) if !shared.lock().engine.holds(seat) => Err(NetError::Evicted(me.rank)),
        _ => Ok(()),
    }
}

/// A push from a connection that is not a worker's (an observer's) is refused as such, not
/// as a malformed push.
fn only_workers_push(got: u16) -> Result<(), NetError> {
    if got == kind::PUSH {
        return Err(NetError::Unexpected {
            got,
            expected: "pull, stats or goodbye (only workers push)",
        });
    }
    Ok(())
}

/// The peer proved itself: it no longer counts as unproven, and a worker's address is kept.
fn welcome(shared: &Shared, conn: &Connection, ip: IpAddr, me: &Peer) {
    let mut state = shared.lock();
    shared.proven(&mut state, ip);
    if me.role == Role::Heartbeat {
        state.heartbeat_links += 1;
    }
    if let Some(seat) = me.seat {
        state
            .worker_addresses
            .insert(seat.rank, conn.peer().to_string());
    }
}

/// The whole handshake under one deadline (a stranger cannot park here): the peer, or `None`
/// when it only asked what the shard serves.
async fn shake_hands(shared: &Shared, conn: &mut Connection) -> Result<Option<Peer>, NetError> {
    let handshake = async {
        match handshake::read_hello(shared, conn).await? {
            Some(hello) => handshake::accept(shared, conn, &hello).await.map(Some),
            None => Ok(None),
        }
    };
    tokio::time::timeout(shared.cfg.handshake_timeout, handshake)
        .await
        .map_err(|_| NetError::Timeout("in the handshake"))?
}

/// The largest legitimate frame from a peer: a push of this shard's gradient in the largest
/// codec the run allows.
fn frame_limit(shared: &Shared) -> u64 {
    let slice = shared.range.len();
    let push_body = (4 * slice).max(shared.cfg.plan.largest_push(slice));
    (PushHead::len(shared.cfg.plan.workers) + push_body).max(64) as u64
}
