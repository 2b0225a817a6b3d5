//! `pstrain worker`: one worker process against TCP shards. It asks the shards for the run
//! plan and adopts it, so `--servers`, `--rank` and `--data-dir` make a complete command;
//! run flags it is also given must agree with the plan, or it is refused before it joins.

use crate::data::{load_own_shard, train_shape};
use crate::flags::parse_flags;
use crate::flags::seconds;
use crate::flags::worker::WorkerArgs;
use crate::launch::shard::CUSTOM_MODEL;
use crate::run::worker::{run_worker, WorkerData, WorkerReport};
use crate::run::TrainConfig;
use anyhow::{bail, Context, Result};
use pstrain_compute::ModelOptions;
use pstrain_core::Layout;
use pstrain_net::{ClientConfig, Heartbeat, Role, RunToken, TcpClient, TlsClient, ANY_RANK};
use std::sync::atomic::AtomicBool;
use std::time::Duration;

/// The shards' plan as this worker's run: refused if its own run flags contradict it (each
/// flag named with both values) or if it cannot train the plan's model.
fn adopt(args: &WorkerArgs, plan: pstrain_core::RunPlan) -> Result<TrainConfig> {
    let contradictions = args.run.contradictions(&plan)?;
    if !contradictions.is_empty() {
        let list: Vec<String> = contradictions
            .iter()
            .map(|(flag, given, plan)| {
                format!("{flag}: given {given}, the shards' plan has {plan}")
            })
            .collect();
        bail!(
            "this worker's flags contradict the shards' run plan ({}); leave them out to adopt it",
            list.join("; ")
        );
    }
    if plan.model == CUSTOM_MODEL {
        bail!(
            "the shards serve a model of their own (a Python `pstrain.Server`): its workers are \
             Python clients (`pstrain.Client`, `pstrain.torch`), not `pstrain worker`"
        );
    }
    let cfg = args.device.configure(TrainConfig {
        plan,
        threads: args.threads(),
        ..TrainConfig::default()
    });
    cfg.validate()
        .context("the shards serve a model this worker cannot train")?;
    Ok(cfg)
}

/// Runs one worker as `pstrain worker ARGV...` would, until its work is done or `stop` is set.
pub fn run_worker_from(
    argv: &[String],
    token: Option<RunToken>,
    stop: &AtomicBool,
) -> Result<WorkerReport> {
    let args = parse_flags::<WorkerArgs>("worker", argv)?;
    let token = match token {
        Some(t) => Some(t),
        None => args.token.token()?,
    };
    worker(&args, token, stop)
}

/// What a worker process knows once the shards described their run: the plan as its own
/// run, the shards' layout, and how to reach them.
pub(crate) struct Joining {
    pub cfg: TrainConfig,
    layout: Layout,
    connect_timeout: Duration,
    token: Option<RunToken>,
    tls: Option<TlsClient>,
}

/// Asks the shards for the run, adopts it (refused if it contradicts this worker's flags,
/// its model is not this build's, or the data set does not fit).
pub(crate) fn prepare(args: &WorkerArgs, token: Option<RunToken>) -> Result<Joining> {
    let connect_timeout = seconds("--connect-timeout", args.connect_timeout as f64)?;
    let io = Duration::from_secs(30);
    let tls = args
        .tls_ca
        .as_deref()
        .map(TlsClient::from_ca_file)
        .transpose()?;
    let served = pstrain_net::describe(
        &args.servers,
        io,
        connect_timeout,
        token.as_ref(),
        tls.as_ref(),
    )
    .with_context(|| format!("cannot ask {} for the run plan", args.servers.join(",")))?;
    let cfg = adopt(args, served.plan)?;
    if cfg.model()?.build(ModelOptions::default()).layout() != &served.layout {
        bail!(
            "the shards' layout is not this build's `{}` model",
            cfg.plan.model
        );
    }
    let (count, shape) = train_shape(&args.data)?;
    cfg.check_data(count)
        .context("the data set does not fit the run (--train-samples)")?;
    cfg.check_data_shape(shape)
        .context("the data set does not fit the run's model")?;
    // The batch size is the shards' word: one this machine cannot hold is refused here.
    cfg.check_memory(args.count.max(1) as usize)?;
    Ok(Joining {
        cfg,
        layout: served.layout,
        connect_timeout,
        token,
        tls,
    })
}

impl Joining {
    /// A model of the run for one worker, computing on `threads` threads.
    pub fn model(&self, threads: usize) -> Result<Box<dyn pstrain_compute::Model>> {
        Ok(self.cfg.model()?.build(ModelOptions {
            dropout: true,
            threads,
        }))
    }

    /// Connects worker `rank` (or `ANY_RANK`) to every shard and starts its heartbeats.
    pub fn join(&self, args: &WorkerArgs, rank: usize) -> Result<(TcpClient, Option<Heartbeat>)> {
        let mut client_cfg = ClientConfig::new(
            args.servers.clone(),
            Role::Worker,
            rank,
            self.cfg.plan.clone(),
            self.layout.clone(),
        );
        client_cfg.connect_timeout = self.connect_timeout;
        client_cfg.token = self.token.clone();
        client_cfg.tls = self.tls.clone();
        client_cfg.lanes = !args.no_lanes;
        let who = if rank == ANY_RANK {
            "a worker (any free rank)".to_string()
        } else {
            format!("worker {rank}")
        };
        let client = TcpClient::connect(&client_cfg)
            .with_context(|| format!("{who} cannot join {}", args.servers.join(",")))?;
        // Alive-signal from its own thread, so a busy worker is not taken for a frozen one.
        let heartbeat = match args.heartbeat_secs {
            0.0 => None,
            s => Some(Heartbeat::start(
                client.config(),
                seconds("--heartbeat-secs", s)?,
            )?),
        };
        Ok((client, heartbeat))
    }
}

pub fn worker(
    args: &WorkerArgs,
    token: Option<RunToken>,
    stop: &AtomicBool,
) -> Result<WorkerReport> {
    let joining = prepare(args, token)?;
    let mut model = joining.model(args.threads())?;
    let (mut client, _heartbeat) = joining.join(args, args.rank)?;
    let rank = client.rank();
    if args.rank == ANY_RANK {
        pstrain_observe::log_line!("joined as worker {rank}");
    }
    let cfg = &joining.cfg;
    // Only this rank's shard is loaded, so the rank must be known first; a sync step
    // meanwhile waits for this worker as for any slow one.
    let (shard, total) = load_own_shard(&args.data, cfg.plan.workers, rank, cfg.plan.seed)?;
    cfg.check_data(total)
        .context("the data set changed under the worker (--train-samples)")?;
    let wcfg = cfg.worker_config(rank);
    let data = WorkerData::OwnShard {
        samples: &shard,
        of: total,
    };
    Ok(run_worker(&mut client, model.as_mut(), data, &wcfg, stop)?)
}
