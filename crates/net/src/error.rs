//! Everything that can go wrong on a connection, each with what and where.

use crate::frame::FrameError;
use thiserror::Error;

#[derive(Debug, Error)]
pub enum NetError {
    #[error("{0}")]
    Io(#[from] std::io::Error),
    #[error("timed out {0}")]
    Timeout(&'static str),
    #[error("peer closed the connection {0}")]
    Closed(&'static str),
    #[error("bad frame: {0}")]
    Frame(#[from] FrameError),
    #[error("malformed {what}: {why}")]
    Malformed { what: &'static str, why: String },
    #[error("handshake refused: {0}")]
    Handshake(String),
    #[error("server error {code}: {message}")]
    Remote { code: u16, message: String },
    #[error("worker rank {0} is already connected")]
    RankBusy(usize),
    /// A worker asked for any free rank and every one is connected (one may free up soon:
    /// the caller retries as for `RankBusy`).
    #[error("all {0} worker ranks are taken")]
    NoFreeRank(usize),
    #[error("buffer has {got} values, the layout has {expected}")]
    Shape { expected: usize, got: usize },
    #[error("unexpected message kind {got:#x} (expected {expected})")]
    Unexpected { got: u16, expected: &'static str },
}

impl NetError {
    /// The connection itself failed (as opposed to the peer refusing something): worth a
    /// reconnect.
    pub fn is_transport(&self) -> bool {
        matches!(
            self,
            NetError::Io(_) | NetError::Closed(_) | NetError::Timeout(_)
        )
    }
}
