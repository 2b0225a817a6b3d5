//! Runs of several processes: one shard (`pstrain server`), one worker (`pstrain worker`) or
//! several light ones in a process,
//! the local launcher of `train --transport tcp` with its injected faults, and the supervisor
//! that follows a multi-process run whoever placed it (the local launcher or Ray).

pub mod churn;
pub mod cluster;
pub(crate) mod cluster_config;
pub mod fault;
pub mod light_workers;
pub mod process;
pub mod remote_worker;
pub mod shard;
pub mod stop_signal;
pub mod supervisor;
mod worker_procs;
