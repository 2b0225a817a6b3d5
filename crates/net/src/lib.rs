//! pstrain over TCP, layered as mini-redis is: bytes -> `frame` -> `message` (typed requests
//! and replies) -> the shard `server`'s handlers, which apply them to a `ShardEngine`; and
//! the worker-side `client` over all shards.

pub mod auth;
pub mod client;
pub mod codec;
pub mod connection;
pub mod error;
pub mod frame;
pub mod lane;
pub mod message;
pub mod server;
pub mod tls;

pub use auth::RunToken;
pub use client::{describe, ClientConfig, Heartbeat, Served, TcpClient, ANY_RANK};
pub use error::NetError;
pub use message::Role;
pub use server::{ShardConfig, ShardHandle, ShardReport, ShardServer};
pub use tls::{TlsClient, TlsError, TlsServer};
