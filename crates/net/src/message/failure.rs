//! Why a shard refused a request or closed a connection: a typed code (a refused gradient's
//! non-finite count travels as a number) and a message for people.

use crate::codec::{Malformed, Reader, Writer};

/// Why a shard refused a request or closed a connection.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum ErrorCode {
    /// Malformed, oversized or unexpected frame: the connection is closed.
    BadFrame,
    /// The handshake was refused (plan, layout, shard or rank).
    Handshake,
    /// The gradient was refused by the shard's rules; the connection stays.
    Refused,
    /// The gradient held `count` NaN or infinite values; the connection stays.
    NonFinite { count: u64 },
    /// The gradient held a value of `largest`, beyond what a shard takes; the connection stays.
    TooLarge { largest: f32 },
    /// The update would have made the weights or optimizer state non-finite: rolled back.
    RolledBack,
    /// The rank is still held (an old connection not yet noticed gone): retry shortly.
    RankBusy,
    /// The peer did not prove it holds the run token (or the shard has none and it sent one).
    Unauthorized,
    /// The worker was evicted (missed heartbeats): it may connect again and rejoin.
    Evicted,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Failure {
    pub code: ErrorCode,
    pub message: String,
}

impl Failure {
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        Failure {
            code,
            message: message.into(),
        }
    }

    pub(super) fn encode(&self, w: &mut Writer) {
        let (tag, count) = match self.code {
            ErrorCode::BadFrame => (1, 0),
            ErrorCode::Handshake => (2, 0),
            ErrorCode::Refused => (3, 0),
            ErrorCode::NonFinite { count } => (5, count),
            ErrorCode::RankBusy => (6, 0),
            ErrorCode::Unauthorized => (7, 0),
            ErrorCode::TooLarge { largest } => (8, u64::from(largest.to_bits())),
            ErrorCode::RolledBack => (9, 0),
            ErrorCode::Evicted => (10, 0),
        };
        w.u16(tag).u64(count).str(&self.message);
    }

    pub(super) fn decode(r: &mut Reader<'_>) -> Result<Self, Malformed> {
        let (tag, count) = (r.u16()?, r.u64()?);
        let code = match tag {
            1 => ErrorCode::BadFrame,
            2 => ErrorCode::Handshake,
            3 => ErrorCode::Refused,
            5 => ErrorCode::NonFinite { count },
            6 => ErrorCode::RankBusy,
            7 => ErrorCode::Unauthorized,
            8 => ErrorCode::TooLarge {
                largest: f32::from_bits(count as u32),
            },
            9 => ErrorCode::RolledBack,
            10 => ErrorCode::Evicted,
            other => return Err(r.malformed(format!("error code {other}"))),
        };
        Ok(Failure {
            code,
            message: r.str()?,
        })
    }
}

impl std::fmt::Display for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}
