//! The messages: kind codes, the typed `Request`s a peer sends and the `Reply`s a shard
//! answers, each with one encoder and one decoder. Tensor payloads follow the fixed parts as
//! raw little-endian `f32` and are moved by `connection`.

mod failure;
mod hello;
mod plan;
mod push;
mod reply;
mod request;

pub use failure::{ErrorCode, Failure};
pub use hello::{
    cut, layout_of, wire_tensors, Description, Hello, HelloOk, Role, WireTensors, WIRE_ANY_RANK,
};
pub use plan::{decode_plan, encode_plan, MAX_WORKERS};
pub use push::{mask_len, PushHead, PushReply, StepMembers};
pub use reply::{Pulled, Reply, StatsReply, PULLED_LEN, WORKER_STATS_LEN};
pub use request::Request;

use pstrain_core::{Layout, RunPlan};

pub mod kind {
    pub const HELLO: u16 = 0x01;
    pub const PULL: u16 = 0x02;
    pub const PUSH: u16 = 0x03;
    pub const STATS: u16 = 0x04;
    pub const GOODBYE: u16 = 0x05;
    pub const HEARTBEAT: u16 = 0x06;
    pub const DESCRIBE: u16 = 0x07;
    pub const AUTH: u16 = 0x08;
    pub const LANE: u16 = 0x09;
    pub const LANE_CONFIRM: u16 = 0x0a;
    pub const HELLO_OK: u16 = 0x81;
    pub const PULL_REPLY: u16 = 0x82;
    pub const PUSH_REPLY: u16 = 0x83;
    pub const STATS_REPLY: u16 = 0x84;
    pub const GOODBYE_OK: u16 = 0x85;
    pub const DESCRIBE_REPLY: u16 = 0x87;
    pub const CHALLENGE: u16 = 0x88;
    pub const LANE_OFFER: u16 = 0x89;
    pub const LANE_READY: u16 = 0x8a;
    pub const ERROR: u16 = 0xff;
}

/// The smallest limit on a handshake (names and shapes of every tensor): a shard takes a
/// hello up to its own layout's description and some more when that is larger
/// (`hello_limit`), so a model of many tensors can be served.
pub const HELLO_LIMIT: u64 = 1 << 20;
/// The largest description of a run a client reads from a shard it asked (the client chose
/// to connect there; a layout of some hundred thousand tensors fits).
pub const DESCRIBE_LIMIT: u64 = 64 << 20;

/// The largest hello a shard serving `layout` takes: what a worker's hello for that layout
/// is, with room for its proof and the plan, and never under `HELLO_LIMIT`.
pub fn hello_limit(shard: usize, shards: usize, plan: &RunPlan, layout: &Layout) -> u64 {
    let own = Hello::new(Role::Worker, 0, shard, shards, plan, layout)
        .encode()
        .len() as u64;
    HELLO_LIMIT.max(own + (64 << 10))
}
/// The largest fixed-size reply (stats, push verdicts, errors).
pub const REPLY_LIMIT: u64 = 1 << 16;

#[cfg(test)]
mod tests;
