//! `WorkerArgs`: `pstrain worker`'s flags, and the ones a launcher gives every worker of a run.

use crate::data::DataArgs;
use crate::flags::plan::RunArgs;
use crate::flags::token::TokenArgs;
use crate::flags::train::{parse_slowdown, slowdown_argv};
use crate::run::TrainConfig;
use clap::Args;
use pstrain_net::ANY_RANK;
use std::path::Path;

#[derive(Args, Debug, Clone)]
pub struct WorkerArgs {
    /// Shard addresses in shard order, comma-separated
    #[arg(long, value_delimiter = ',', required = true)]
    pub servers: Vec<String>,
    /// This worker's rank, 0-based, or `auto`: take a free rank (a dead worker's first), as a
    /// replacement for a worker that died
    #[arg(long, value_parser = parse_rank)]
    pub rank: usize,
    /// Compute threads [default: this device's cores]
    #[arg(long, default_value_t = device_cores(), hide_default_value = true)]
    pub threads: usize,
    /// Seconds to keep retrying the connection while servers start
    #[arg(long, default_value_t = 60)]
    pub connect_timeout: u64,
    /// Seconds between heartbeats to every shard (a shard evicts a worker whose heartbeats
    /// stop for its --heartbeat-timeout)
    #[arg(long, default_value_t = 1.0)]
    pub heartbeat_secs: f64,
    #[command(flatten)]
    pub token: TokenArgs,
    /// Talk TLS to the shards, trusting certificates signed by this CA (PEM)
    #[arg(long)]
    pub tls_ca: Option<std::path::PathBuf>,
    /// Make this worker FACTOR times slower if it runs as RANK (it waits FACTOR-1 times its
    /// compute time after each gradient); repeatable, so one list serves every worker
    #[arg(long, value_name = "RANK=FACTOR", value_parser = parse_slowdown)]
    pub slowdown: Vec<(usize, f64)>,
    /// Run flags are optional: the worker runs the shards' plan. Any given must agree with it.
    #[command(flatten)]
    pub run: RunArgs,
    #[command(flatten)]
    pub data: DataArgs,
}

/// The cores this process may use (a board's worker computes on all of them by default).
fn device_cores() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

/// A rank, or `auto` (`ANY_RANK`).
fn parse_rank(s: &str) -> Result<usize, String> {
    if s == "auto" {
        return Ok(ANY_RANK);
    }
    match s.parse::<usize>() {
        Ok(r) if r != ANY_RANK => Ok(r),
        _ => Err(format!("`{s}` is not a rank (a number from 0, or `auto`)")),
    }
}

/// The `pstrain worker` flags for every worker of `cfg`'s run: only what is the worker's own
/// business (the plan comes from the shards); the launcher adds `--servers` and `--rank`.
pub fn worker_argv(cfg: &TrainConfig, data_dir: Option<&Path>) -> Vec<String> {
    let mut a = vec!["--threads".to_string(), cfg.threads.to_string()];
    if let Some(dir) = data_dir {
        a.extend(["--data-dir".into(), dir.display().to_string()]);
    }
    a.extend(slowdown_argv(&cfg.slowdown));
    a
}
