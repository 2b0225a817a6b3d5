//! `WorkerArgs`: `pstrain worker`'s flags, and the ones a launcher gives every worker of a run.

use crate::data::DataArgs;
use crate::flags::device::DeviceArgs;
use crate::flags::plan::RunArgs;
use crate::flags::token::TokenArgs;
use crate::run::compute_gate::device_cores;
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
    /// Run COUNT workers in this process, ranks --rank to --rank + COUNT - 1 ("light
    /// workers": one load of their shards, each its own connection and heartbeat, computing
    /// a few at a time on the device's cores) to emulate a fleet on one machine
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=4096))]
    pub count: u32,
    /// Compute threads of each worker [default: this device's cores; 1 with --count]
    #[arg(long)]
    pub threads: Option<usize>,
    /// With --count: how many of the workers compute at once [default: cores / --threads]
    #[arg(long)]
    pub compute_slots: Option<usize>,
    /// Read `leave RANK` / `back RANK` lines on stdin: the launcher's churn for light workers
    /// (the worker drops its connections without a goodbye, then rejoins with its rank)
    #[arg(long, hide = true)]
    pub stdin_control: bool,
    /// With --stdin-control: these ranks start away (late joiners, or away when the
    /// process was started again) until `back R`
    #[arg(long, hide = true, value_delimiter = ',')]
    pub start_away: Vec<usize>,
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
    /// Keep tensors on TCP even to a shard on this host (by default such a worker moves its
    /// fp32 tensors through shared memory the shard offers)
    #[arg(long)]
    pub no_lanes: bool,
    #[command(flatten)]
    pub device: DeviceArgs,
    /// Run flags are optional: the worker runs the shards' plan. Any given must agree with it.
    #[command(flatten)]
    pub run: RunArgs,
    #[command(flatten)]
    pub data: DataArgs,
}

impl WorkerArgs {
    /// Compute threads per worker: as given, else all cores for a lone worker and one for
    /// each of several (they take turns on the cores instead).
    pub fn threads(&self) -> usize {
        self.threads
            .unwrap_or(if self.count > 1 { 1 } else { device_cores() })
    }

    /// Light workers computing at once: as given, else as many as the cores hold.
    pub fn compute_slots(&self) -> usize {
        self.compute_slots
            .unwrap_or(device_cores() / self.threads().max(1))
            .max(1)
    }
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
    a.extend(DeviceArgs::argv(cfg));
    a
}
