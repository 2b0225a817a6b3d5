//! One parameter-server shard as `pstrain server` flags define it: the flags, the shard's
//! configuration and initial weights (a built-in model's, or a caller's own), and serving it
//! until the run ends or a signal arrives.

use crate::flags::parse_flags;
use crate::plan_flags::RunArgs;
use crate::run_id;
use crate::token::TokenArgs;
use crate::train::{CheckpointPolicy, TrainConfig};
use anyhow::{bail, Context, Result};
use clap::Args;
use pstrain_core::{Layout, RunPlan};
use pstrain_net::{RunToken, ShardConfig, ShardHandle, ShardReport, TlsServer};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

/// The training-set size a shard plans for unless told (MNIST's).
const DEFAULT_TRAIN_SAMPLES: usize = 60_000;

#[derive(Args, Debug, Clone)]
pub struct CheckpointArgs {
    /// Write checkpoints (weights, optimizer state, version) under this folder
    #[arg(long)]
    pub checkpoint_dir: Option<PathBuf>,
    /// Checkpoint every N server updates
    #[arg(long)]
    pub checkpoint_every: Option<u64>,
    /// Checkpoint every S seconds [default: 60 when --checkpoint-dir is given]
    #[arg(long)]
    pub checkpoint_secs: Option<f64>,
    /// Checkpoints kept per shard
    #[arg(long, default_value_t = 3)]
    pub keep_checkpoints: usize,
    /// The run the checkpoints belong to (other runs' files are refused) [default: train: a
    /// new id, or the resumed run's; server: derived from the run's token and plan]
    #[arg(long)]
    pub run_id: Option<String>,
}

impl CheckpointArgs {
    /// The policy for checkpoints under `dir` (else `--checkpoint-dir`), if any, for the run
    /// `run_id` names given the folder.
    pub fn policy(
        &self,
        dir: Option<&Path>,
        resume: bool,
        run_id: impl FnOnce(&Path) -> Result<String>,
    ) -> Result<Option<CheckpointPolicy>> {
        let Some(dir) = dir.or(self.checkpoint_dir.as_deref()) else {
            return Ok(None);
        };
        let every_secs = match (self.checkpoint_every, self.checkpoint_secs) {
            (None, None) => Some(60.0),
            (_, secs) => secs,
        };
        // 0 turns the time-based schedule off.
        let every = match every_secs {
            Some(0.0) | None => None,
            Some(s) => Some(seconds("--checkpoint-secs", s)?),
        };
        Ok(Some(CheckpointPolicy {
            run_id: run_id(dir)?,
            dir: dir.to_owned(),
            every_updates: self.checkpoint_every,
            every,
            keep: self.keep_checkpoints.max(1),
            resume,
            // A shard with a run token seals with the token's key (see `pstrain_net`).
            key: None,
        }))
    }
}

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
    #[arg(long)]
    pub fresh: bool,
    /// Serve Prometheus `/metrics` and a live page at `/` on HOST:PORT (off loopback, the run
    /// token is required: `Authorization: Bearer HEX` or `?token=HEX`) [default: off]
    #[arg(long, value_name = "HOST:PORT")]
    pub metrics_addr: Option<String>,
    #[command(flatten)]
    pub run: RunArgs,
}

/// Weights of a model that is not built in (the Python API's own models): the layout and the
/// values every shard starts from.
pub struct CustomModel {
    pub layout: Layout,
    pub initial: Vec<f32>,
}

/// One shard, ready to start.
pub struct ShardSetup {
    pub listen: String,
    pub config: ShardConfig,
    pub initial: Vec<f32>,
    pub io_threads: usize,
}

impl ShardSetup {
    /// Binds and serves on a runtime of its own.
    pub fn start(self) -> Result<ShardHandle> {
        let listen = self.listen;
        ShardHandle::start(&listen, self.config, &self.initial, self.io_threads)
            .with_context(|| format!("cannot serve on {listen}"))
    }
}

/// The shard that `pstrain server ARGV...` would serve, with `custom` weights in place of
/// `--model`'s if given, and the run's token given by the caller (else from the flags or the
/// environment).
pub fn shard_setup_with_token(
    argv: &[String],
    custom: Option<CustomModel>,
    token: Option<RunToken>,
) -> Result<ShardSetup> {
    let args = parse_flags::<ServerArgs>("server", argv)?;
    let token = match token {
        Some(t) => Some(t),
        None => args.token.token()?,
    };
    server_setup_with_token(&args, custom, token)
}

/// Seconds from a flag, refusing what `Duration` cannot hold.
pub fn seconds(flag: &str, s: f64) -> Result<Duration> {
    if s.is_finite() && s > 0.0 && s < 1e9 {
        Ok(Duration::from_secs_f64(s))
    } else {
        bail!("{flag} must be a positive number of seconds below 1e9, not {s}")
    }
}

pub fn server_setup(args: &ServerArgs, custom: Option<CustomModel>) -> Result<ShardSetup> {
    server_setup_with_token(args, custom, args.token.token()?)
}

fn server_setup_with_token(
    args: &ServerArgs,
    custom: Option<CustomModel>,
    token: Option<RunToken>,
) -> Result<ShardSetup> {
    if args.shard >= args.shards {
        bail!(
            "--shard {} is out of range for --shards {}",
            args.shard,
            args.shards
        );
    }
    let base = RunPlan {
        train_samples: DEFAULT_TRAIN_SAMPLES,
        ..RunPlan::default()
    };
    let (plan, layout, initial) = match custom {
        Some(c) => {
            if args.run.model.is_some() {
                bail!("--model does not apply to a server of the caller's own model");
            }
            if c.layout.is_empty() {
                bail!("the model has no parameters");
            }
            if c.initial.len() != c.layout.len() {
                bail!(
                    "initial values: {} given for a layout of {}",
                    c.initial.len(),
                    c.layout.len()
                );
            }
            let base = RunPlan {
                model: "custom".into(),
                ..base
            };
            (args.run.overlay(&base)?, c.layout, c.initial)
        }
        None => {
            let cfg = TrainConfig {
                plan: args.run.overlay(&base)?,
                ..TrainConfig::default()
            };
            let layout = cfg.model()?.build(Default::default()).layout().clone();
            let initial = cfg.initial_params()?;
            (cfg.plan, layout, initial)
        }
    };
    let mut config = ShardConfig::new(args.shard, args.shards, layout, plan);
    config.io_timeout = seconds("--io-timeout", args.io_timeout as f64)?;
    config.idle_timeout = seconds("--idle-timeout", args.idle_timeout as f64)?;
    config.heartbeat_timeout = seconds("--heartbeat-timeout", args.heartbeat_timeout)?;
    config.exit_when_finished = !args.keep_running;
    let given = args.checkpoints.run_id.as_deref();
    config.checkpoint = args.checkpoints.policy(None, true, |_| {
        run_id::for_server(given, token.as_ref(), &config.plan, args.shards)
    })?;
    config.token = token;
    config.metrics_addr = args.metrics_addr.clone();
    config.fresh = args.fresh;
    if let (Some(cert), Some(key)) = (&args.tls_cert, &args.tls_key) {
        config.tls = Some(TlsServer::from_pem_files(cert, key)?);
    }
    Ok(ShardSetup {
        listen: args.listen.clone(),
        config,
        initial,
        io_threads: usize::from(args.io_threads),
    })
}

/// Prints what a shard did over the run, to stderr.
pub fn log_shard_report(shard: usize, report: &ShardReport) {
    let s = report.stats;
    eprintln!(
        "[shard {shard}] done: version {}, {} gradients applied, {} dropped stale, {} non-finite, \
         {} other refusals; {} connections, {} refused handshakes, {} protocol errors, \
         {} workers vanished",
        s.version,
        s.gradients_applied,
        s.dropped_stale,
        s.rejected_nonfinite,
        s.rejected_other,
        report.events.accepted,
        report.events.refused_handshakes,
        report.events.protocol_errors,
        report.events.vanished_workers
    );
}

/// `pstrain server`: serves until the run is over or `stop` is set (SIGINT/SIGTERM), then
/// writes its final checkpoint.
pub fn run_server(args: &ServerArgs, stop: &AtomicBool) -> Result<()> {
    let setup = server_setup(args, None)?;
    let shard = setup.config.shard;
    let handle = setup.start()?;
    // The launcher (and people) read the bound address from this line.
    println!("listening on {}", handle.address());
    use std::io::Write;
    std::io::stdout().flush()?;
    let report = loop {
        if stop.load(Ordering::Relaxed) {
            handle.stop();
        }
        if let Some(report) = handle.wait(Some(Duration::from_millis(100)))? {
            break report;
        }
    };
    log_shard_report(shard, &report);
    if let Some(e) = &report.final_checkpoint_error {
        anyhow::bail!("shard {shard}: the final checkpoint could not be written: {e}");
    }
    Ok(())
}
