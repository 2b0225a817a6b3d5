//! pstrain over TCP: length-prefixed binary frames (`frame`), the messages they carry
//! (`protocol`), one peer's stream with deadlines (`connection`), the shard server
//! (`server`) and the worker-side client over all shards (`client`).
//!
//! Layered as mini-redis is: bytes -> frame -> request -> apply to a `ServerCore`.

pub mod client;
pub mod connection;
pub mod error;
pub mod frame;
pub mod protocol;
pub mod server;

pub use client::{describe, ClientConfig, Heartbeat, Served, TcpClient, ANY_RANK};
pub use error::NetError;
pub use protocol::Role;
pub use server::{ShardConfig, ShardServer};
