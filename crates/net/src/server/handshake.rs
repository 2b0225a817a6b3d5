//! A connection's first exchange: an optional DESCRIBE (for clients that adopt the shard's
//! plan and layout), then the peer's HELLO, checked against this shard's place, plan and
//! layout; a worker takes its rank from the engine's membership.

use super::shared::Shared;
use crate::auth::{
    random_bytes, Nonce, Proof, DESCRIBE_LABEL, HELLO_LABEL, NONCE_LEN, SHARD_LABEL,
};
use crate::connection::Connection;
use crate::error::NetError;
use crate::message::{kind, Description, Hello, HelloOk, Reply, Request, Role, WIRE_ANY_RANK};
use pstrain_core::{RankRequest, Seat};

/// Who is on the other end, once the handshake is done.
#[derive(Debug, Clone, Copy)]
pub(super) struct Peer {
    pub role: Role,
    /// A worker's rank, or the rank a heartbeat connection speaks for.
    pub rank: usize,
    /// A worker's hold on its rank.
    pub seat: Option<Seat>,
    pub said_goodbye: bool,
}

/// The largest frame a peer may send before it has proven the token: the AUTH frame (its
/// nonce). Until the proof, a stranger costs this shard no more than a header and this.
const FIRST_FRAME_LIMIT: u64 = NONCE_LEN as u64;

/// Unproven DESCRIBE or HELLO frames larger than this wait for one of `LARGE_HELLOS` permits
/// (a hello carries the layout: a model of many tensors needs more), so strangers who pass
/// the challenge cannot make every connection hold a megabyte.
pub(super) const SMALL_HELLO: u64 = 16 << 10;
pub(super) const LARGE_HELLOS: usize = 4;

/// Reads the peer's hello: with a run token, after the challenge-response that proves both
/// ends hold it; a DESCRIBE (proven the same way) may come first. `None` if the peer left.
/// With a token, the first frame must be AUTH and no larger, and anything wrong before the
/// proof is refused as unauthorized, in words of this shard's own: nothing the peer sent
/// reaches the log.
pub(super) async fn read_hello(
    shared: &Shared,
    conn: &mut Connection,
) -> Result<Option<Hello>, NetError> {
    let unproven = shared.cfg.token.is_some();
    let outcome = read_hello_frames(shared, conn).await;
    match outcome {
        Err(e) if unproven && !e.is_transport() && !matches!(e, NetError::Unauthorized(_)) => {
            Err(NetError::Unauthorized(
                "malformed or unexpected handshake before the peer proved the run's token".into(),
            ))
        }
        other => other,
    }
}

async fn read_hello_frames(
    shared: &Shared,
    conn: &mut Connection,
) -> Result<Option<Hello>, NetError> {
    let cfg = &shared.cfg;
    let mut nonces: Option<(Nonce, Nonce)> = None;
    let mut described = false;
    loop {
        // Only the header is read here; its payload is read below, within the limits.
        let Some(header) = conn.read_header(cfg.io_timeout, shared.hello_limit).await? else {
            return Ok(None);
        };
        if cfg.token.is_some() && nonces.is_none() {
            if header.kind != kind::AUTH {
                return Err(NetError::Unauthorized(
                    "this shard requires the run's token (--token-file FILE or PSTRAIN_TOKEN)"
                        .into(),
                ));
            }
            if header.len > FIRST_FRAME_LIMIT {
                return Err(NetError::Unauthorized(
                    "an AUTH frame of the wrong size".into(),
                ));
            }
        }
        if ![kind::AUTH, kind::DESCRIBE, kind::HELLO].contains(&header.kind) {
            return Err(NetError::Unexpected {
                got: header.kind,
                expected: "hello",
            });
        }
        let _large = if cfg.token.is_some() && header.len > SMALL_HELLO {
            Some(
                shared
                    .large_hellos
                    .acquire()
                    .await
                    .map_err(|_| NetError::Handshake("the shard is stopping".into()))?,
            )
        } else {
            None
        };
        let bytes = conn.read_bytes(header.len as usize).await?;
        if header.kind == kind::HELLO {
            // The proof covers the hello's raw bytes: checked before any of them is decoded.
            let (body, proof) = Hello::split_proof(&bytes)?;
            authorize(shared, nonces, HELLO_LABEL, body, &proof)?;
            return Ok(Some(Hello::decode(&bytes)?));
        }
        match Request::decode(header.kind, &bytes, cfg.plan.workers)? {
            Request::Auth { nonce } if nonces.is_none() => {
                let token = cfg.token.as_ref().ok_or_else(|| {
                    NetError::Unauthorized(
                        "this shard runs without a run token; connect without one".into(),
                    )
                })?;
                let mine = random_bytes::<NONCE_LEN>()?;
                let proof = token.prove(SHARD_LABEL, &nonce, &mine, &[]);
                let challenge = Reply::Challenge { nonce: mine, proof };
                conn.send_reply(&challenge, 0, &[]).await?;
                nonces = Some((nonce, mine));
            }
            Request::Describe { proof } if !described => {
                authorize(shared, nonces, DESCRIBE_LABEL, &[], &proof)?;
                described = true;
                let me = Description::new(cfg.shard, cfg.shards, &cfg.plan, &cfg.layout);
                conn.send_reply(&Reply::Described(me), 0, &[]).await?;
            }
            _ => {
                return Err(NetError::Unexpected {
                    got: header.kind,
                    expected: "hello",
                })
            }
        }
    }
}

/// With a run token, `proof` must be the token's HMAC over this connection's nonces.
fn authorize(
    shared: &Shared,
    nonces: Option<(Nonce, Nonce)>,
    label: &[u8],
    claims: &[u8],
    proof: &Proof,
) -> Result<(), NetError> {
    match (&shared.cfg.token, nonces) {
        (None, _) => Ok(()),
        (Some(_), None) => Err(NetError::Unauthorized(
            "this shard requires the run's token (--token-file FILE or PSTRAIN_TOKEN)".into(),
        )),
        (Some(token), Some((peer, mine))) => {
            if token.verify(label, &peer, &mine, claims, proof) {
                Ok(())
            } else {
                Err(NetError::Unauthorized("wrong run token".into()))
            }
        }
    }
}

/// Checks `hello` and, for a worker, takes its rank; answers with `HelloOk`.
pub(super) async fn accept(
    shared: &Shared,
    conn: &mut Connection,
    hello: &Hello,
) -> Result<Peer, NetError> {
    check(shared, hello)?;
    let workers = shared.cfg.plan.workers;
    let rank = hello.rank as usize;
    let mut peer = Peer {
        role: hello.role,
        rank,
        seat: None,
        said_goodbye: false,
    };
    let version = {
        let now = shared.now();
        let mut state = shared.lock();
        match hello.role {
            Role::Worker => {
                let request = if hello.rank == WIRE_ANY_RANK {
                    RankRequest::Any
                } else {
                    RankRequest::Exact(rank)
                };
                let seat = state.engine.join(request, now)?;
                peer.rank = seat.rank;
                peer.seat = Some(seat);
            }
            Role::Heartbeat if rank >= workers => {
                return Err(NetError::Handshake(format!(
                    "rank {rank} is out of range for {workers} workers"
                )))
            }
            Role::Heartbeat | Role::Observer => {}
        }
        state.engine.version()
    };
    let ok = HelloOk {
        start: shared.range.start as u64,
        end: shared.range.end as u64,
        version,
        rank: peer.rank as u32,
    };
    conn.send_reply(&Reply::HelloOk(ok), 0, &[]).await?;
    Ok(peer)
}

/// The peer must expect this shard, run this plan and hold this layout.
fn check(shared: &Shared, hello: &Hello) -> Result<(), NetError> {
    let cfg = &shared.cfg;
    let refuse = |why: String| Err(NetError::Handshake(why));
    let run = &hello.run;
    if (run.shard as usize, run.shards as usize) != (cfg.shard, cfg.shards) {
        return refuse(format!(
            "peer expects shard {} of {}, this is shard {} of {}",
            run.shard, run.shards, cfg.shard, cfg.shards
        ));
    }
    let differences = cfg.plan.differences(&run.plan);
    if !differences.is_empty() {
        let list: Vec<String> = differences
            .iter()
            .map(|(field, ours, theirs)| format!("{field}: server {ours}, peer {theirs}"))
            .collect();
        return refuse(format!("run plan mismatch ({})", list.join("; ")));
    }
    if run.fingerprint != cfg.layout.fingerprint() {
        return refuse(layout_mismatch(shared, hello));
    }
    let theirs = hello
        .layout()
        .map_err(|e| NetError::Handshake(format!("peer layout: {e}")))?;
    if theirs != cfg.layout {
        return refuse(layout_mismatch(shared, hello));
    }
    Ok(())
}

fn layout_mismatch(shared: &Shared, hello: &Hello) -> String {
    let ours = &shared.cfg.layout;
    let values: u64 = hello
        .run
        .tensors
        .iter()
        .map(|(_, s)| s.iter().fold(1u64, |a, &d| a.saturating_mul(d)))
        .fold(0u64, |a, n| a.saturating_add(n));
    format!(
        "model layout mismatch: peer has {} tensors / {} values (hash {:016x}), \
         server has {} tensors / {} values (hash {:016x})",
        hello.run.tensors.len(),
        values,
        hello.run.fingerprint,
        ours.tensors().len(),
        ours.len(),
        ours.fingerprint()
    )
}
