//! Reaching the shards: TCP connects with backoff, the handshake, taking a rank (shard 0
//! assigns an `ANY_RANK` worker's rank, the others are joined with it), and `describe`.

use super::link::ShardLink;
use super::{ClientConfig, ANY_RANK};
use crate::auth::{
    random_bytes, Nonce, RunToken, DESCRIBE_LABEL, NONCE_LEN, NO_PROOF, SHARD_LABEL,
};
use crate::connection::Connection;
use crate::error::NetError;
use crate::lane::{Lane, LANE_NONCE_LEN};
use crate::message::{Description, Hello, Reply, Request, Role, DESCRIBE_LIMIT, REPLY_LIMIT};
use crate::tls::TlsClient;
use futures_util::future::try_join_all;
use pstrain_core::{shard_ranges, Layout, RunPlan};
use pstrain_core::{AutoCodec, PullCodec, PushEncoder, Replayer};
use std::ops::Range;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::net::TcpStream;

/// What a set of shards serves, in their own words: the run plan and the model layout, for
/// clients that adopt them (workers started with only addresses, the Python client).
#[derive(Debug, Clone, PartialEq)]
pub struct Served {
    pub layout: Layout,
    pub plan: RunPlan,
}

/// Asks every shard what it serves, and checks that they agree and sit in the given order.
pub fn describe(
    servers: &[String],
    io_timeout: Duration,
    connect_timeout: Duration,
    token: Option<&RunToken>,
    tls: Option<&TlsClient>,
) -> Result<Served, NetError> {
    if servers.is_empty() {
        return Err(NetError::Config("no server addresses given".into()));
    }
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let replies = rt.block_on(try_join_all(servers.iter().enumerate().map(
        |(i, addr)| async move {
            let asked = async {
                let mut conn = dial(i, addr, io_timeout, connect_timeout, tls).await?;
                let proof = match authenticate(&mut conn, token, addr, io_timeout).await? {
                    Some((t, mine, theirs)) => t.prove(DESCRIBE_LABEL, &mine, &theirs, &[]),
                    None => NO_PROOF,
                };
                conn.send_request(&Request::Describe { proof }, 0, &[])
                    .await?;
                let me = match conn.read_reply(io_timeout, DESCRIBE_LIMIT, 0).await? {
                    Reply::Described(d) => d,
                    other => {
                        return Err(NetError::Unexpected {
                            got: other.kind(),
                            expected: "description",
                        })
                    }
                };
                conn.shutdown().await;
                Ok(me)
            };
            let me = asked
                .await
                .map_err(|e| silent(i, addr, io_timeout, tls.is_some(), e))?;
            served_by(i, servers.len(), addr, me)
        },
    )))?;
    let first = replies[0].clone();
    if let Some((i, _)) = replies.iter().enumerate().find(|(_, r)| **r != first) {
        return Err(NetError::Handshake(format!(
            "shards 0 and {i} serve different runs (plan or layout)"
        )));
    }
    Ok(first)
}

fn served_by(i: usize, n: usize, addr: &str, me: Description) -> Result<Served, NetError> {
    if (me.shard as usize, me.shards as usize) != (i, n) {
        return Err(NetError::Handshake(format!(
            "{addr} is shard {} of {}, but was given as shard {i} of {n}",
            me.shard, me.shards
        )));
    }
    let layout = me
        .layout()
        .map_err(|e| NetError::Handshake(format!("{addr} serves a bad layout: {e}")))?;
    Ok(Served {
        layout,
        plan: me.plan,
    })
}

/// With a token: sends this side's nonce and checks the shard's proof; returns the token and
/// both nonces for this side's own proof.
async fn authenticate<'t>(
    conn: &mut Connection,
    token: Option<&'t RunToken>,
    addr: &str,
    io: Duration,
) -> Result<Option<(&'t RunToken, Nonce, Nonce)>, NetError> {
    let Some(token) = token else {
        return Ok(None);
    };
    let mine = random_bytes::<NONCE_LEN>()?;
    conn.send_request(&Request::Auth { nonce: mine }, 0, &[])
        .await?;
    match conn.read_reply(io, REPLY_LIMIT, 0).await {
        Ok(Reply::Challenge { nonce, proof }) => {
            if token.verify(SHARD_LABEL, &mine, &nonce, &[], &proof) {
                Ok(Some((token, mine, nonce)))
            } else {
                Err(NetError::Unauthorized(format!(
                    "{addr} does not hold this run's token"
                )))
            }
        }
        Ok(other) => Err(NetError::Unexpected {
            got: other.kind(),
            expected: "challenge",
        }),
        Err(NetError::Remote(f)) => Err(NetError::Unauthorized(format!("{addr}: {f}"))),
        Err(e) => Err(e),
    }
}

/// Connects to every shard. A worker asking for `ANY_RANK` gets its rank from shard 0 first
/// and then joins the others with it; `cfg.rank` is updated to the rank in use.
pub(super) async fn connect_all(cfg: &mut ClientConfig) -> Result<Vec<ShardLink>, NetError> {
    let mut ranges = shard_ranges(cfg.layout.len(), cfg.servers.len()).into_iter();
    let mut shards = Vec::with_capacity(cfg.servers.len());
    if cfg.role == Role::Worker && cfg.rank == ANY_RANK {
        let (addr, range) = (&cfg.servers[0], ranges.next().unwrap_or_default());
        let (first, rank) = connect_shard(cfg, 0, addr, range).await?;
        cfg.rank = rank;
        shards.push(first);
    }
    let skip = shards.len();
    let cfg = &*cfg;
    let rest = try_join_all(
        cfg.servers
            .iter()
            .enumerate()
            .skip(skip)
            .zip(ranges)
            .map(|((i, addr), range)| connect_shard(cfg, i, addr, range)),
    )
    .await?;
    shards.extend(rest.into_iter().map(|(shard, _)| shard));
    Ok(shards)
}

/// Connects and shakes hands, retrying with backoff while the shard is not up yet or still
/// holds this rank's previous connection. Returns the link and the rank it took the worker as.
pub(super) async fn connect_shard(
    cfg: &ClientConfig,
    shard: usize,
    addr: &str,
    range: Range<usize>,
) -> Result<(ShardLink, usize), NetError> {
    let started = Instant::now();
    let mut backoff = Duration::from_millis(50);
    loop {
        match try_connect_shard(cfg, shard, addr, range.clone()).await {
            // The rank's old connection is not gone yet, or the shard died or restarted in
            // the middle of the handshake: both pass.
            Err(e)
                if (e.is_transport() || e.is_busy())
                    && started.elapsed() + backoff < cfg.connect_timeout =>
            {
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(1));
            }
            Err(e) => return Err(silent(shard, addr, cfg.io_timeout, cfg.tls.is_some(), e)),
            ok => return ok,
        }
    }
}

/// A handshake that timed out or was cut, said with where and what it may mean: a port that
/// accepts connections and never answers is most often not a pstrain shard at all, and one
/// that closes each plain connection at once most often serves TLS.
fn silent(shard: usize, addr: &str, io: Duration, tls: bool, e: NetError) -> NetError {
    match e {
        NetError::Timeout(_) => NetError::NoAnswer(format!(
            "shard {shard} at {addr} accepted the connection but did not answer the handshake \
             in {:.0} s: is that address a pstrain shard (not its metrics page or another \
             service)?",
            io.as_secs_f64()
        )),
        NetError::Closed(_) if !tls => NetError::NoAnswer(format!(
            "shard {shard} at {addr} closed the connection before answering the handshake: a \
             shard serving TLS (--tls-cert) does so to a worker without --tls-ca; otherwise \
             its log says why"
        )),
        other => other,
    }
}

/// A failed TLS handshake, with the likeliest cause when the shard answered in plain frames.
fn tls_failed(shard: usize, addr: &str, e: std::io::Error) -> NetError {
    let text = e.to_string();
    let hint = match text.contains("InvalidContentType") {
        true => " (the shard answered without TLS: if the run's shards have no --tls-cert, drop --tls-ca)",
        false => "",
    };
    NetError::Handshake(format!("TLS with shard {shard} at {addr}: {text}{hint}"))
}

/// Opens a TCP connection to a shard (TLS over it with `tls`), retrying with backoff until
/// `connect_timeout` while the shard is not up.
pub(super) async fn dial(
    shard: usize,
    addr: &str,
    io_timeout: Duration,
    connect_timeout: Duration,
    tls: Option<&TlsClient>,
) -> Result<Connection, NetError> {
    let started = Instant::now();
    let mut backoff = Duration::from_millis(50);
    loop {
        match tokio::time::timeout(io_timeout, TcpStream::connect(addr)).await {
            Ok(Ok(s)) => {
                let Some(tls) = tls else {
                    return Ok(Connection::new(s, io_timeout));
                };
                let _ = s.set_nodelay(true);
                let same_host = crate::connection::same_host(&s);
                let secure = tokio::time::timeout(io_timeout, tls.connect(addr, s))
                    .await
                    .map_err(|_| NetError::Timeout("in the TLS handshake"))?
                    .map_err(|e| tls_failed(shard, addr, e))?;
                let conn = Connection::over(secure, addr.to_string(), io_timeout);
                return Ok(conn.on_same_host(same_host));
            }
            // No wait makes an address of the wrong form (no port, a port past 65535) right:
            // say so now rather than after the connect timeout. A name that does not resolve
            // yet is still retried (a cluster's DNS can come up after its workers).
            Ok(Err(e)) if e.kind() == std::io::ErrorKind::InvalidInput => {
                return Err(NetError::Config(format!(
                    "shard {shard}'s address `{addr}` is not HOST:PORT ({e})"
                )));
            }
            result => {
                if started.elapsed() + backoff > connect_timeout {
                    let why = match result {
                        Ok(Err(e)) => e.to_string(),
                        _ => "connect timed out".into(),
                    };
                    return Err(NetError::Handshake(format!(
                        "cannot reach shard {shard} at {addr} after {:.0} s: {why}",
                        started.elapsed().as_secs_f64()
                    )));
                }
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(2));
            }
        }
    }
}

/// One connection attempt and handshake.
pub(super) async fn try_connect_shard(
    cfg: &ClientConfig,
    shard: usize,
    addr: &str,
    range: Range<usize>,
) -> Result<(ShardLink, usize), NetError> {
    let mut conn = dial(
        shard,
        addr,
        cfg.io_timeout,
        cfg.connect_timeout,
        cfg.tls.as_ref(),
    )
    .await?;
    let n = cfg.servers.len();
    let mut hello = Hello::new(cfg.role, cfg.rank, shard, n, &cfg.plan, &cfg.layout);
    if let Some((t, mine, theirs)) =
        authenticate(&mut conn, cfg.token.as_ref(), addr, cfg.io_timeout).await?
    {
        hello = hello.proven(t, &mine, &theirs);
    }
    conn.send_request(&Request::Hello(hello), 0, &[]).await?;
    let ok = match conn.read_reply(cfg.io_timeout, REPLY_LIMIT, 0).await {
        Ok(Reply::HelloOk(ok)) => ok,
        Ok(other) => {
            return Err(NetError::Unexpected {
                got: other.kind(),
                expected: "hello reply",
            })
        }
        Err(NetError::Remote(f)) if !NetError::Remote(f.clone()).is_busy() => {
            return Err(NetError::Handshake(format!("shard {shard} at {addr}: {f}")))
        }
        Err(e) => return Err(e),
    };
    if (ok.start as usize, ok.end as usize) != (range.start, range.end) {
        return Err(NetError::Handshake(format!(
            "shard {shard} at {addr} owns {}..{}, expected {range:?}",
            ok.start, ok.end
        )));
    }
    if cfg.role == Role::Worker && cfg.rank != ANY_RANK && ok.rank as usize != cfg.rank {
        return Err(NetError::Handshake(format!(
            "shard {shard} at {addr} took this worker as rank {}, not {}",
            ok.rank, cfg.rank
        )));
    }
    // Each link keeps its own error feedback and rounding stream (seeded per rank and shard,
    // so two workers' stochastic roundings are independent).
    let seed = cfg.plan.seed ^ ((ok.rank as u64) << 32) ^ shard as u64;
    let lane = if cfg.role == Role::Worker && cfg.lanes && conn.same_host() {
        open_lane(&mut conn, range.len(), cfg.io_timeout)
            .await?
            .map(Arc::new)
    } else {
        None
    };
    let range_len = range.len();
    let (auto, pull_codec) = first_codecs(&cfg.plan, lane.is_some());
    let link = ShardLink {
        lane,
        conn,
        range,
        joined_version: ok.version,
        pull_codec,
        encoder: PushEncoder::new(cfg.plan.push_codec, seed),
        wire: Vec::new(),
        delta: Vec::new(),
        pull_s: 0.0,
        auto,
        replayer: (pull_codec == PullCodec::Replay)
            .then(|| Replayer::new(&cfg.plan.server_config(), range_len)),
    };
    Ok((link, ok.rank as usize))
}

/// A new link's `auto` (if the run picks codecs per link) and the codec of its first pull:
/// the plan's, or under `auto` its first rung's (a sync run's worker replays its pulls
/// until its link is measured, unless a shared-memory `lane` makes fp32 pulls free).
fn first_codecs(plan: &RunPlan, lane: bool) -> (Option<AutoCodec>, PullCodec) {
    let auto = plan.auto_codecs.then(|| {
        if plan.auto_replays() && !lane {
            AutoCodec::replaying(plan.workers)
        } else {
            AutoCodec::new()
        }
    });
    let pull = auto.as_ref().map_or(plan.pull_codec, |a| a.rung().pull);
    (auto, pull)
}

/// Asks the shard (on this host) for a shared-memory lane and maps it; `None` when the shard
/// declines or the memory cannot be opened here (the link then stays on TCP).
async fn open_lane(
    conn: &mut Connection,
    values: usize,
    io_timeout: Duration,
) -> Result<Option<Lane>, NetError> {
    conn.send_request(&Request::Lane, 0, &[]).await?;
    let path = match conn.read_reply(io_timeout, REPLY_LIMIT, 0).await {
        Ok(Reply::LaneOffer { path }) => path,
        Err(NetError::Remote(_)) => return Ok(None),
        Ok(other) => {
            return Err(NetError::Unexpected {
                got: other.kind(),
                expected: "lane offer",
            })
        }
        Err(e) => return Err(e),
    };
    // A lane that cannot be opened is still answered (with no nonce), so the shard lets go
    // of it at once.
    let (lane, nonce) = match Lane::open(&path, values) {
        Ok((lane, nonce)) => (Some(lane), nonce),
        Err(_) => (None, [0; LANE_NONCE_LEN]),
    };
    conn.send_request(&Request::LaneConfirm { nonce }, 0, &[])
        .await?;
    match conn.read_reply(io_timeout, REPLY_LIMIT, 0).await {
        Ok(Reply::LaneReady) => Ok(lane),
        Err(NetError::Remote(_)) => Ok(None),
        Ok(other) => Err(NetError::Unexpected {
            got: other.kind(),
            expected: "lane ready",
        }),
        Err(e) => Err(e),
    }
}
