//! The pure core of pstrain: parameter layouts, key-range sharding, server optimizers, the
//! consistency rules, membership, checkpoint timing and the run plan, with no IO, no threads
//! and no clocks.
//!
//! Everything here is deterministic and driven by its caller, so the same logic serves the
//! in-process engine, the TCP server and the simulated-network tests (`tests/engine_sim.rs`).

pub mod admission;
pub mod balance;
pub mod checkpoint_schedule;
pub mod client;
pub mod compression;
pub mod config;
pub mod consistency;
pub mod engine;
pub mod error;
pub mod fan_out;
pub mod fast_paths;
pub mod gradient_scan;
pub mod layout;
pub mod membership;
pub mod optimizer;
pub mod optimizer_config;
pub mod plan;
pub mod plan_fields;
pub mod replay;
pub mod rng;
pub mod server;
pub mod shard;
pub mod shard_state;
pub mod splitter;
pub mod update_kernels;
pub mod update_log;
pub mod worker_field;
pub mod worker_stats;

pub use checkpoint_schedule::CheckpointSchedule;
pub use client::{ClientError, ParameterClient, PullReply};
pub use compression::{
    AutoCodec, CodecError, CodecPair, PullCodec, PullReplica, PushCodec, PushEncoder,
    ReplayingPeers, Rung, AUTO_LADDER, REPLAY_LADDER,
};
pub use config::{Aggregate, GradientClip, Mode, ServerConfig, MAX_LEAD_LIMIT};
pub use engine::{EngineConfig, PullDecision, PushReport, ShardEngine};
pub use error::{ConfigError, LayoutError, PushError, RestoreError};
pub use fan_out::{FanOut, PullAsk, PushRoute};
pub use layout::{Layout, TensorSpec};
pub use membership::{Departure, JoinError, Membership, Presence, RankRequest, Seat};
pub use optimizer::{LrSchedule, Optimizer, OptimizerConfig, ScaledGrad};
pub use plan::{RunPlan, ScheduleKind};
pub use plan_fields::PlanDifference;
pub use replay::{ReplayError, Replayer};
pub use rng::Rng;
pub use server::{PushMeta, PushOutcome, ServerCore, ShardCounters, ShardSnapshot};
pub use shard::shard_ranges;
pub use splitter::{Job, Splitter};
pub use update_log::WireRef;
pub use worker_field::{Bytes, Exported, Merge, Number, WorkerField};
pub use worker_stats::{LinkUse, WorkerStats, MAX_REPORTED_S, STALENESS_BOUNDS, WORKER_FIELDS};
