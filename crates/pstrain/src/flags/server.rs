//! `ServerArgs`: `pstrain server`'s flags, and the ones a launcher gives every shard of a run.

use crate::flags::checkpoint::{checkpoint_argv, CheckpointArgs};
use crate::flags::plan::{plan_argv, RunArgs};
use crate::flags::token::TokenArgs;
use crate::run::TrainConfig;
use clap::Args;
use std::path::PathBuf;

#[derive(Args, Debug, Clone)]
pub struct ServerArgs {
    /// Address to listen on (port 0 picks a free port; the bound address is printed)
    #[arg(long, default_value = "127.0.0.1:7000")]
    pub listen: String,
    /// This shard's index, 0-based
    #[arg(long, default_value_t = 0)]
    pub shard: usize,
    /// Number of shards the parameters are split over
    #[arg(long, default_value_t = 1)]
    pub shards: usize,
    /// Seconds a read or write may take once a frame is under way
    #[arg(long, default_value_t = 30)]
    pub io_timeout: u64,
    /// Seconds a peer may stay silent between requests before it is declared gone (a worker
    /// then leaves the quorum)
    #[arg(long, default_value_t = 120)]
    pub idle_timeout: u64,
    /// Seconds without a heartbeat after which a worker leaves the quorum
    #[arg(long, default_value_t = 10.0)]
    pub heartbeat_timeout: f64,
    /// Keep serving after every worker has left
    #[arg(long)]
    pub keep_running: bool,
    /// Threads serving this shard's connections. Updates run one at a time under the
    /// engine's lock whatever the count; more threads only read several workers' pushes at
    /// once, and on a host whose cores also train, one measured faster
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u16).range(1..=256))]
    pub io_threads: u16,
    /// MiB the pushes being received at once may hold (their bytes and decoded values);
    /// a push past it waits, unread, until earlier ones are applied. One push always fits
    #[arg(long, default_value_t = 256, value_name = "MIB")]
    pub receive_budget: usize,
    /// MiB of shared memory for workers on this host, whose fp32 tensors then cross it
    /// instead of TCP (two copies of the shard's slice per worker); 0 keeps every worker on
    /// TCP. Past it, more workers stay on TCP
    #[arg(long, default_value_t = 1024, value_name = "MIB")]
    pub lane_budget: u64,
    #[command(flatten)]
    pub checkpoints: CheckpointArgs,
    #[command(flatten)]
    pub token: TokenArgs,
    /// Serve over TLS with this certificate chain (PEM; give --tls-key too)
    #[arg(long, requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,
    /// The private key of --tls-cert (PEM)
    #[arg(long, requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
    /// Start from the initial weights even if --checkpoint-dir holds checkpoints this shard
    /// cannot use (damaged, another run's); without it the shard refuses to start
    #[arg(long, requires = "checkpoint_dir")]
    pub fresh: bool,
    /// Do not seal checkpoints with the run token's key: for a token made for one launch
    /// (the local launcher's), whose checkpoints a later `--resume` must still read
    #[arg(long, requires = "checkpoint_dir")]
    pub unsealed: bool,
    /// Serve Prometheus `/metrics` and a live page at `/` on HOST:PORT (off loopback, the run
    /// token is required: `Authorization: Bearer HEX` or `?token=HEX`) [default: off]
    #[arg(long, value_name = "HOST:PORT")]
    pub metrics_addr: Option<String>,
    #[command(flatten)]
    pub run: RunArgs,
}

/// The `pstrain server` flags for every shard of `cfg`'s run over `shards` shards: the whole
/// plan and the checkpoint policy; the launcher adds `--listen` and `--shard`.
pub fn server_argv(cfg: &TrainConfig, shards: usize) -> Vec<String> {
    let mut a = plan_argv(&cfg.plan);
    a.extend(["--shards".into(), shards.to_string()]);
    if let Some(p) = &cfg.checkpoint {
        a.extend(checkpoint_argv(p));
    }
    a
}
