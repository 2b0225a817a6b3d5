//! Runs of several processes: one shard (`pstrain server`), one worker (`pstrain worker`),
//! the local launcher of `train --transport tcp` with its injected faults, and the supervisor
//! that follows a multi-process run whoever placed it (the local launcher or Ray).

pub mod churn;
pub mod cluster;
mod cluster_config;
pub mod fault;
pub mod process;
pub mod remote_worker;
pub mod shard;
pub mod supervisor;
