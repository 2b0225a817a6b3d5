//! One parameter-server shard as `pstrain server` flags define it: the flags, the shard's
//! configuration and initial weights (a built-in model's, or a caller's own), and serving it
//! until the run ends or a signal arrives.

use crate::flags::run_id;
use crate::flags::seconds;
use crate::flags::server::ServerArgs;
use crate::run::TrainConfig;
use anyhow::{bail, Context, Result};
use pstrain_core::{Layout, RunPlan};
use pstrain_net::{RunToken, ShardConfig, ShardHandle, ShardReport, TlsServer};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

/// The training-set size a shard plans for unless told (MNIST's).
pub(crate) const DEFAULT_TRAIN_SAMPLES: usize = 60_000;
/// The model name of a plan whose layout a caller gave (`pstrain.Server`'s arrays).
pub const CUSTOM_MODEL: &str = "custom";

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

/// The shard `pstrain server` serves for `args`, with `custom` weights in place of
/// `--model`'s if given, and the run's token given by the caller (else from the flags or the
/// environment).
pub fn shard_setup(
    args: &ServerArgs,
    custom: Option<CustomModel>,
    token: Option<RunToken>,
) -> Result<ShardSetup> {
    let token = match token {
        Some(t) => Some(t),
        None => args.token.token()?,
    };
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
                model: CUSTOM_MODEL.into(),
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
    config.receive_budget = args.receive_budget.saturating_mul(1 << 20);
    config.lane_budget = args.lane_budget.saturating_mul(1 << 20);
    let given = args.checkpoints.run_id.as_deref();
    config.checkpoint = args.checkpoints.policy(None, true, |_| {
        run_id::for_server(given, token.as_ref(), &config.plan, args.shards)
    })?;
    let derived = given.is_none() && !args.fresh;
    if let Some(policy) = config.checkpoint.as_ref().filter(|_| derived) {
        run_id::refuse_unrelated_folder(&policy.dir, &policy.run_id, &config.plan, args.shards)?;
    }
    config.token = token;
    config.metrics_addr = args.metrics_addr.clone();
    config.fresh = args.fresh;
    config.seal_checkpoints = !args.unsealed;
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
    pstrain_observe::log_line!(
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
    // Each worker's link, as this shard saw it (what `scripts/edge_links.py` reads).
    for (rank, w) in report.workers.iter().enumerate() {
        if w.applied + w.not_applied == 0 && w.pull_bytes.0 == 0 {
            continue;
        }
        pstrain_observe::log_line!(
            "[shard {shard}] worker {rank}: {} gradients applied, {} bytes up in {:.1} s, \
             {} bytes down in {:.1} s, codecs {}",
            w.applied,
            w.push_bytes.0,
            w.push_link_s,
            w.pull_bytes.0,
            w.pull_link_s,
            w.codecs
        );
    }
}

/// `pstrain server`: serves until the run is over or `stop` is set (SIGINT/SIGTERM), then
/// writes its final checkpoint.
pub fn run_server(args: &ServerArgs, stop: &AtomicBool) -> Result<()> {
    let setup = shard_setup(args, None, None)?;
    let shard = setup.config.shard;
    let handle = setup.start()?;
    // The launcher (and people) read the bound address from this line.
    pstrain_observe::out_line!("listening on {}", handle.address());
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
