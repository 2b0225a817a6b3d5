//! The pure core of pstrain: parameter layouts, key-range sharding, server optimizers and the
//! sync / async / bounded-staleness rules, with no IO, no threads and no clocks.
//!
//! Everything here is deterministic and driven by its caller, so the same logic serves the
//! in-process engine, the TCP server and the simulated-network tests.

pub mod client;
pub mod config;
pub mod error;
pub mod follower;
pub mod layout;
pub mod optimizer;
pub mod rng;
pub mod server;
pub mod shard;

pub use client::{ClientError, ParameterClient, PullReply};
pub use config::{Aggregate, Mode, ServerConfig};
pub use error::{ConfigError, LayoutError, PushError, RestoreError};
pub use follower::StepFollower;
pub use layout::{Layout, TensorSpec};
pub use optimizer::{LrSchedule, Optimizer, OptimizerConfig};
pub use rng::Rng;
pub use server::{CoreState, PushMeta, PushOutcome, ServerCore, ServerStats};
pub use shard::shard_ranges;
