//! Everything that can go wrong on a connection, each with what and where.

use crate::auth::TokenError;
use crate::frame::FrameError;
use crate::message::{ErrorCode, Failure};
use pstrain_core::JoinError;
use thiserror::Error;

#[derive(Debug, Error)]
pub enum NetError {
    #[error("{0}")]
    Io(#[from] std::io::Error),
    #[error("timed out {0}")]
    Timeout(&'static str),
    /// A peer took the connection and did not answer the handshake in time (a timeout, said
    /// with where and what it may mean).
    #[error("no answer: {0}")]
    NoAnswer(String),
    #[error("peer closed the connection {0}")]
    Closed(&'static str),
    #[error("bad frame: {0}")]
    Frame(#[from] FrameError),
    #[error("malformed {what}: {why}")]
    Malformed { what: &'static str, why: String },
    #[error("handshake refused: {0}")]
    Handshake(String),
    /// The shard or client was set up wrong (by its caller, not by a peer).
    #[error("invalid configuration: {0}")]
    Config(String),
    /// The metrics address could not be served.
    #[error("metrics: {0}")]
    Metrics(String),
    /// The peer did not prove it holds the run token.
    #[error("not authorized: {0}")]
    Unauthorized(String),
    #[error("{0}")]
    Token(#[from] TokenError),
    #[error("{0}")]
    Tls(#[from] crate::tls::TlsError),
    /// A shard asked to listen beyond loopback without a run token (protected mode).
    #[error(
        "refusing to serve on {0} without a run token: anyone who can reach this port could \
         read the model, push gradients or end the run. Make a token with `pstrain token > \
         run.token` and give every process of the run `--token-file run.token` (or set \
         PSTRAIN_TOKEN), or listen on 127.0.0.1"
    )]
    Unprotected(String),
    /// The shard's checkpoint folder holds files it cannot use (it does not silently reset).
    #[error("{0}")]
    Restore(String),
    /// A worker could not take the rank it asked for (held, out of range, none free).
    #[error("{0}")]
    Join(#[from] JoinError),
    /// The worker's rank was taken from it (its heartbeats stopped for a while): it may
    /// connect again and rejoin.
    #[error("worker {0} was evicted (missed heartbeats); reconnect to rejoin")]
    Evicted(usize),
    /// The peer answered with an error frame.
    #[error("server refused: {0}")]
    Remote(Failure),
    #[error("buffer has {got} values, the layout has {expected}")]
    Shape { expected: usize, got: usize },
    #[error("unexpected message kind {got:#x} (expected {expected})")]
    Unexpected { got: u16, expected: &'static str },
    /// A replay pull's updates did not lead to the shard's weights (or started from a
    /// version this worker does not hold): its copy is unknown, and a new connection is
    /// sent the whole slice with the optimizer's state.
    #[error("{0}; connecting again for the whole slice")]
    Resync(String),
}

impl NetError {
    /// The connection itself failed (as opposed to the peer refusing something): worth a
    /// reconnect.
    pub fn is_transport(&self) -> bool {
        matches!(
            self,
            NetError::Io(_) | NetError::Closed(_) | NetError::Timeout(_) | NetError::NoAnswer(_)
        )
    }

    /// Worth connecting again and carrying on: the connection failed, or the shard evicted
    /// this worker (a device that was slow or away for a while rejoins; it is not an error
    /// of the run).
    pub fn rejoins(&self) -> bool {
        self.is_transport()
            || matches!(self, NetError::Resync(_))
            || matches!(
                self,
                NetError::Remote(Failure {
                    code: ErrorCode::Evicted,
                    ..
                })
            )
    }

    /// The shard asked to retry shortly (the rank is still held by an old connection).
    pub fn is_busy(&self) -> bool {
        matches!(
            self,
            NetError::Remote(Failure {
                code: ErrorCode::RankBusy,
                ..
            })
        )
    }

    /// What the shard tells the peer before closing the connection over this error.
    pub fn failure(&self) -> Failure {
        let code = match self {
            NetError::Handshake(_) | NetError::Join(JoinError::OutOfRange { .. }) => {
                ErrorCode::Handshake
            }
            NetError::Join(_) => ErrorCode::RankBusy,
            NetError::Unauthorized(_) => ErrorCode::Unauthorized,
            NetError::Evicted(_) => ErrorCode::Evicted,
            _ => ErrorCode::BadFrame,
        };
        Failure::new(code, self.to_string())
    }
}

impl From<crate::codec::Malformed> for NetError {
    fn from(m: crate::codec::Malformed) -> Self {
        NetError::Malformed {
            what: m.what,
            why: m.why,
        }
    }
}
