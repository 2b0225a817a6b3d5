//! `pstrain worker`: one worker process against TCP shards. It asks the shards for the run
//! plan and adopts it, so `--servers`, `--rank` and `--data-dir` make a complete command;
//! run flags it is also given must agree with the plan, or it is refused before it joins.

use crate::data::{load_own_shard, train_count, DataArgs};
use crate::flags::parse_flags;
use crate::plan_flags::RunArgs;
use crate::shard_setup::seconds;
use crate::token::TokenArgs;
use crate::train::TrainConfig;
use crate::worker::{run_worker, WorkerData, WorkerReport};
use anyhow::{bail, Context, Result};
use clap::Args;
use pstrain_compute::ModelOptions;
use pstrain_net::{ClientConfig, Heartbeat, Role, RunToken, TcpClient, TlsClient, ANY_RANK};
use std::sync::atomic::AtomicBool;
use std::time::Duration;

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
    #[arg(long, value_name = "RANK=FACTOR", value_parser = crate::train_flags::parse_slowdown)]
    pub slowdown: Vec<(usize, f64)>,
    /// Run flags are optional: the worker runs the shards' plan. Any given must agree with it.
    #[command(flatten)]
    pub run: RunArgs,
    #[command(flatten)]
    pub data: DataArgs,
}

/// A rank, or `auto` (`ANY_RANK`).
/// The cores this process may use (a board's worker computes on all of them by default).
fn device_cores() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

fn parse_rank(s: &str) -> Result<usize, String> {
    if s == "auto" {
        return Ok(ANY_RANK);
    }
    match s.parse::<usize>() {
        Ok(r) if r != ANY_RANK => Ok(r),
        _ => Err(format!("`{s}` is not a rank (a number from 0, or `auto`)")),
    }
}

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
    let cfg = TrainConfig {
        plan,
        threads: args.threads,
        slowdown: args.slowdown.clone(),
        ..TrainConfig::default()
    };
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

pub fn worker(
    args: &WorkerArgs,
    token: Option<RunToken>,
    stop: &AtomicBool,
) -> Result<WorkerReport> {
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
    let mut model = cfg.model()?.build(ModelOptions {
        dropout: true,
        threads: args.threads,
    });
    if model.layout() != &served.layout {
        bail!(
            "the shards' layout is not this build's `{}` model",
            cfg.plan.model
        );
    }
    cfg.check_data(train_count(&args.data)?)
        .context("the data set does not fit the run (--train-samples)")?;
    let mut client_cfg = ClientConfig::new(
        args.servers.clone(),
        Role::Worker,
        args.rank,
        cfg.plan.clone(),
        served.layout,
    );
    client_cfg.connect_timeout = connect_timeout;
    client_cfg.token = token;
    client_cfg.tls = tls;
    let who = if args.rank == ANY_RANK {
        "a worker (any free rank)".to_string()
    } else {
        format!("worker {}", args.rank)
    };
    let mut client = TcpClient::connect(&client_cfg)
        .with_context(|| format!("{who} cannot join {}", args.servers.join(",")))?;
    let rank = client.rank();
    if args.rank == ANY_RANK {
        eprintln!("joined as worker {rank}");
    }
    // Alive-signal from its own thread, so a busy worker is not taken for a frozen one.
    let _heartbeat = match args.heartbeat_secs {
        0.0 => None,
        s => Some(Heartbeat::start(
            client.config(),
            seconds("--heartbeat-secs", s)?,
        )?),
    };
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
