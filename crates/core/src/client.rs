//! How a worker talks to the parameter server, whatever carries the bytes: the ps-lite
//! style pull / push / leave. The transport is injected: in-process threads or TCP.

use crate::error::PushError;
use crate::server::{PushMeta, PushOutcome};
use thiserror::Error;

/// What a pull returned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PullReply {
    /// The server version of the weights now in the caller's buffer.
    pub version: u64,
    /// False when the server had nothing newer than asked for and the buffer is unchanged.
    pub updated: bool,
    /// The run is over (update budget reached or server shutting down).
    pub done: bool,
    /// Speed-balanced sync: the batch size this worker is to use for its next step.
    pub batch: Option<u32>,
}

#[derive(Debug, Error)]
pub enum ClientError {
    #[error("server refused the gradient: {0}")]
    Refused(#[from] PushError),
    #[error("buffer has {got} values, the model layout has {expected}")]
    Shape { expected: usize, got: usize },
    #[error("server unavailable: {0}")]
    Unavailable(String),
    #[error("protocol error: {0}")]
    Protocol(String),
}

pub trait ParameterClient: Send {
    /// Copies the server's weights into `params`. With `newer_than = Some(v)` it copies only
    /// weights newer than version `v`; with `wait` it blocks until there are some (the sync
    /// barrier) or the run is done.
    fn pull(
        &mut self,
        params: &mut [f32],
        newer_than: Option<u64>,
        wait: bool,
    ) -> Result<PullReply, ClientError>;

    /// Offers a gradient computed from `meta.base_version`.
    fn push(&mut self, meta: PushMeta, grad: &[f32]) -> Result<PushOutcome, ClientError>;

    /// Says goodbye: this worker will push no more, so sync steps stop waiting for it.
    fn leave(&mut self) -> Result<(), ClientError>;

    /// A worker that pushes and pulls while it computes (`--overlap`) says how long its last
    /// step computed: a client cannot tell it from the gap between its pull and its push,
    /// which run beside the compute, and a round then costs the longer of the two, not their
    /// sum (what `auto` weighs its codecs by). Clients that pick nothing by it ignore it.
    fn computed_beside(&mut self, _seconds: f64) {}
}
