//! How `train --transport tcp` lays out its local processes: the executable, shards, data,
//! addresses, checkpoints, injected faults, churn and restarts.

use crate::launch::churn::{Churn, LateJoin};
pub use crate::launch::fault::Fault;
use crate::run::CheckpointPolicy;
use pstrain_net::RunToken;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

/// Maps a shard's bound address to the address workers dial.
pub type Relay = Arc<dyn Fn(&str) -> String + Send + Sync>;

#[derive(Clone)]
pub struct ClusterConfig {
    /// The `pstrain` executable to launch.
    pub exe: PathBuf,
    pub shards: usize,
    /// The data folder the workers load (the supervisor gets the data set from the caller).
    pub data_dir: PathBuf,
    /// The host the shards listen on, each on a free port.
    pub listen_host: String,
    /// Prepended to each worker's command line (e.g. `ip netns exec NAME`).
    pub worker_wrapper: Vec<String>,
    /// Where workers should dial a shard, if not its own address (a proxy, a NAT).
    pub relay: Option<Relay>,
    /// Shard checkpoints (restored when a shard restarts).
    pub checkpoint: Option<CheckpointPolicy>,
    /// Failures to inject, in order of `at_update`.
    pub faults: Vec<Fault>,
    /// The shards' `--heartbeat-timeout`, if not their default.
    pub heartbeat_timeout: Option<Duration>,
    /// The run's token; `None` makes a fresh one for the run. Children get it in their
    /// environment, never on their command line.
    pub token: Option<RunToken>,
    /// Times a worker process that failed is started again with its rank (it rejoins and
    /// pulls the latest weights) before its failure ends the run.
    pub worker_restarts: usize,
    /// Workers leaving and coming back at random (`--churn`).
    pub churn: Option<Churn>,
    /// Workers per worker process: 1, or a block of light workers in each
    /// (`--workers-per-process`).
    pub workers_per_process: usize,
    /// Workers that join the run late (`--late-workers`).
    pub late: Option<LateJoin>,
}

/// `ClusterConfig::worker_restarts` unless told otherwise.
pub const WORKER_RESTARTS: usize = 3;

impl ClusterConfig {
    /// Everything on 127.0.0.1, workers dialing the shards directly.
    pub fn local(exe: PathBuf, shards: usize, data_dir: PathBuf) -> Self {
        ClusterConfig {
            exe,
            shards,
            data_dir,
            listen_host: "127.0.0.1".into(),
            worker_wrapper: Vec::new(),
            relay: None,
            checkpoint: None,
            faults: Vec::new(),
            heartbeat_timeout: None,
            token: None,
            worker_restarts: WORKER_RESTARTS,
            churn: None,
            workers_per_process: 1,
            late: None,
        }
    }

    /// `local` for this program, reading the data from `data_dir` (which must exist).
    pub fn this_program(shards: usize, data_dir: &Path) -> std::io::Result<Self> {
        let exe = std::env::current_exe()?;
        Ok(Self::local(exe, shards, std::fs::canonicalize(data_dir)?))
    }
}
