//! The `pstrain` command line: the subcommands, their dispatch, and the bodies of those that
//! are only command-line glue (train, download, bench, eval, export). The flags of `server`,
//! `worker` and the run plan live in library modules that other front ends share.

use crate::bench::compute::{run_bench, BenchConfig};
use crate::data::{download, load_data, DataArgs};
use crate::flags::server::ServerArgs;
use crate::flags::train::{announce, prepare_train, TrainArgs, TransportArg};
use crate::flags::worker::WorkerArgs;
use crate::launch::cluster::{train_tcp, ClusterConfig};
use crate::launch::light_workers::light_workers;
use crate::launch::remote_worker::worker;
use crate::launch::shard::run_server;
use crate::launch::stop_signal::stop_on_signal;
use crate::run::saved_model::{checkpoint_layout, load_checkpoint, load_checkpoint_model};
use crate::run::train;
use anyhow::{bail, Context, Result};
use clap::{Args, Parser, Subcommand};
use pstrain_compute::ModelKind;
use std::io::Write;
use std::path::PathBuf;

#[derive(Parser, Debug)]
#[command(
    name = "pstrain",
    version,
    about = "Parameter-server training of CNNs on MNIST"
)]
pub struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Train with an embedded parameter server and worker threads, all in this process.
    Train(TrainArgs),
    /// Download the four MNIST files and verify their checksums.
    Download(DownloadArgs),
    /// Measure compute and training throughput; writes JSON.
    Bench(BenchArgs),
    /// Measure the TCP transport: push/pull throughput and latency, and training over TCP.
    BenchNet(BenchNetArgs),
    /// Measure what one shard costs per worker, for fleets of 1 to 512 workers; writes JSON.
    BenchFleet(crate::bench::fleet::FleetArgs),
    /// Serve one parameter shard over TCP.
    Server(ServerArgs),
    /// Train as one worker against TCP servers (it adopts the shards' run plan).
    Worker(WorkerArgs),
    /// Test accuracy of the newest checkpoint in a folder.
    Eval(EvalArgs),
    /// Write the newest checkpoint as one safetensors file with the model's tensor names.
    Export(ExportArgs),
    /// Make a new random run token (for --token-file / PSTRAIN_TOKEN): printed, or written
    /// to a file only its owner can read (-o).
    Token(crate::flags::token::TokenOutArgs),
    /// Draw test accuracy and loss against time and samples from --metrics files (.png/.svg).
    Plot(crate::report::plot::PlotArgs),
}

#[derive(Args, Debug)]
struct BenchNetArgs {
    /// Where to write the JSON report
    #[arg(long, default_value = "bench-net.json")]
    out: PathBuf,
    /// Values of the synthetic layout
    #[arg(long, default_value_t = 100_000_000)]
    synthetic_values: usize,
    /// Shard counts to measure transfers over, comma-separated
    #[arg(long, value_delimiter = ',', default_value = "1,4")]
    shards: Vec<usize>,
    /// Shard counts of the TCP training comparison, comma-separated (1 is `pstrain train
    /// --transport tcp`'s default)
    #[arg(long, value_delimiter = ',', default_value = "1,2")]
    train_shards: Vec<usize>,
    /// Sync updates of each training comparison (async runs twice as many); 0 skips them
    #[arg(long, default_value_t = 300)]
    train_updates: u64,
    #[command(flatten)]
    data: DataArgs,
}

#[derive(Args, Debug)]
struct EvalArgs {
    /// Checkpoint folder (holding shard-I-of-S folders)
    #[arg(long)]
    checkpoint: PathBuf,
    #[command(flatten)]
    data: DataArgs,
    /// The run's token: with it, only files sealed by that run are read
    #[command(flatten)]
    token: crate::flags::token::TokenArgs,
}

#[derive(Args, Debug)]
struct ExportArgs {
    /// Checkpoint folder (holding shard-I-of-S folders)
    #[arg(long)]
    checkpoint: PathBuf,
    /// The safetensors file to write
    #[arg(long, default_value = "model.safetensors")]
    out: PathBuf,
    /// The run's token: with it, only files sealed by that run are read
    #[command(flatten)]
    token: crate::flags::token::TokenArgs,
}

#[derive(Args, Debug)]
struct DownloadArgs {
    #[command(flatten)]
    data: DataArgs,
}

#[derive(Args, Debug)]
struct BenchArgs {
    /// Where to write the JSON report
    #[arg(long, default_value = "bench.json")]
    out: PathBuf,
    /// Seconds per compute-only measurement
    #[arg(long, default_value_t = 3.0)]
    seconds: f64,
    /// Server updates per training measurement (times the workers in async mode; 0: skip)
    #[arg(long, default_value_t = 150)]
    train_updates: u64,
    #[arg(long, default_value_t = 64)]
    batch_size: usize,
    /// Models to measure, comma-separated
    #[arg(long, value_delimiter = ',', default_value = "cnn,convnet")]
    models: Vec<ModelKind>,
    /// Compute threads of the compute-only points, comma-separated
    #[arg(long, value_delimiter = ',', default_value = "1,2")]
    threads: Vec<usize>,
    /// Updates of the default run whose processes' peak memory is measured (0: skip)
    #[arg(long, default_value_t = 300)]
    memory_updates: u64,
    #[command(flatten)]
    data: DataArgs,
}

pub fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Train(args) => run_train(args),
        Command::Download(args) => download(&args.data.dir(), &args.data.mirrors),
        Command::Bench(args) => run_bench_cmd(args),
        Command::BenchNet(args) => run_bench_net(args),
        Command::BenchFleet(args) => crate::bench::fleet::run_fleet_cmd(&args),
        Command::Server(args) => run_server(&args, &stop_on_signal()),
        Command::Worker(args) => {
            let (token, stop) = (args.token.token()?, stop_on_signal());
            let reports = if args.count > 1 {
                light_workers(&args, token, &stop)?
            } else {
                vec![worker(&args, token, &stop)?]
            };
            // One JSON line per worker on stdout: the launcher of a local cluster reads them.
            for report in reports {
                pstrain_observe::out_line!("{}", serde_json::to_string(&report)?);
            }
            Ok(())
        }
        Command::Eval(args) => run_eval(args),
        Command::Plot(args) => crate::report::plot::run(&args),
        Command::Export(args) => run_export(args),
        Command::Token(args) => crate::flags::token::make_token(&args),
    }
}

/// The `pstrain` command line, each subcommand's value flags taking negative numbers
/// (`negative_values`).
pub fn command() -> clap::Command {
    use clap::CommandFactory;
    Cli::command().mut_subcommands(crate::flags::negative_values)
}

/// The help text of one subcommand (`pstrain NAME --help`), for front ends that take its flags.
pub fn help(name: &str) -> Option<String> {
    use clap::CommandFactory;
    let mut cmd = Cli::command();
    let sub = cmd.find_subcommand_mut(name)?;
    Some(sub.render_help().to_string())
}

fn run_train(args: TrainArgs) -> Result<()> {
    let (mut cfg, data, mut reporter) = prepare_train(&args)?;
    // Ctrl-C ends the run cleanly: workers stop, the weights reached are evaluated.
    let stop = stop_on_signal();
    announce(&cfg)?;
    let churn = args.churn(cfg.plan.seed)?;
    let workers_per_process = args.workers_per_process(cfg.plan.workers)?;
    let late = args.late(cfg.plan.workers)?;
    let token = args.token.token()?;
    let outcome = match args.transport {
        TransportArg::Inproc => {
            if args.shards != 1 {
                bail!("--shards applies to --transport tcp");
            }
            // As a TCP run's shards do: with the run's token, checkpoints are sealed with its
            // key and only sealed ones are restored (`pstrain eval --token-file` reads them).
            if let (Some(token), Some(policy)) = (&token, cfg.checkpoint.as_mut()) {
                policy.key = Some(token.file_key());
            }
            train(&cfg, &data, &mut reporter, &stop)?
        }
        TransportArg::Tcp => {
            let mut cluster = ClusterConfig::this_program(args.shards, &args.data.dir())
                .context("cannot find the pstrain executable or the data folder")?;
            // The shards checkpoint, and restore what they find, themselves.
            cluster.checkpoint = cfg.checkpoint.clone();
            cluster.token = token;
            cluster.worker_restarts = args.worker_restarts;
            cluster.churn = churn;
            cluster.workers_per_process = workers_per_process;
            cluster.late = late;
            train_tcp(&cfg, &cluster, &data, &mut reporter, &stop)?
        }
    };
    if let Some(bar) = &reporter.bar {
        bar.finish_and_clear();
    }
    reporter.record(&outcome.summary);
    pstrain_observe::out_line!("{}", outcome.summary.render());
    reporter.close()
}

fn run_bench_cmd(args: BenchArgs) -> Result<()> {
    let data = load_data(&args.data)?;
    let models = args.models.clone();
    let cfg = BenchConfig {
        batch_size: args.batch_size,
        seconds: args.seconds,
        train_updates: args.train_updates,
        models: args.models,
        threads: args.threads,
        ..BenchConfig::default()
    };
    let mut report = run_bench(&cfg, &data, &mut |line| {
        pstrain_observe::out_line!("{line}")
    })?;
    if args.memory_updates > 0 {
        let exe = std::env::current_exe().context("cannot find this program")?;
        let dir = args.data.dir();
        report.memory = crate::bench::memory::measure(&exe, &dir, args.memory_updates, &models)?;
        for run in &report.memory {
            let parts: Vec<String> = run
                .processes
                .iter()
                .map(|p| format!("{} {:.0} MB", p.process, p.peak_rss_mb))
                .collect();
            pstrain_observe::out_line!(
                "memory, default run, {} {}: {} (total {:.0} MB)",
                run.model,
                run.transport,
                parts.join(", "),
                run.total_mb
            );
        }
    }
    let json = serde_json::to_string_pretty(&report)?;
    std::fs::write(&args.out, json + "\n")
        .with_context(|| format!("cannot write {}", args.out.display()))?;
    pstrain_observe::out_line!("wrote {}", args.out.display());
    Ok(())
}

fn run_bench_net(args: BenchNetArgs) -> Result<()> {
    let cfg = crate::bench::net_config::NetBenchConfig {
        shard_counts: args.shards,
        train_shard_counts: args.train_shards,
        synthetic_values: args.synthetic_values,
        train_updates: args.train_updates,
    };
    // Before the data: a missing folder is downloaded.
    cfg.validate()?;
    // MNIST only for the training comparisons.
    let training = (cfg.train_updates > 0)
        .then(|| -> Result<_> {
            let data = load_data(&args.data)?;
            let cluster = ClusterConfig::this_program(1, &args.data.dir())
                .context("cannot find the pstrain executable or the data folder")?;
            Ok((cluster, data))
        })
        .transpose()?;
    let report = crate::bench::net::run_net_bench(&cfg, training.as_ref(), &mut |l| {
        pstrain_observe::out_line!("{l}")
    })?;
    std::fs::write(&args.out, serde_json::to_string_pretty(&report)? + "\n")
        .with_context(|| format!("cannot write {}", args.out.display()))?;
    pstrain_observe::out_line!("wrote {}", args.out.display());
    Ok(())
}

fn run_eval(args: EvalArgs) -> Result<()> {
    let (kind, assembled) = load_checkpoint_model(&args.checkpoint, &args.token)?;
    let data = load_data(&args.data)?;
    kind.fits(data.shape())
        .map_err(|e| anyhow::anyhow!("{}: {e}", args.data.dir().display()))?;
    let mut model = kind.build(Default::default());
    let e = data.test.evaluate(model.as_mut(), &assembled.params)?;
    pstrain_observe::out_line!(
        "{kind} at version {:?}: test accuracy {:.2}% ({} of {}), test loss {:.4}",
        assembled.versions,
        e.accuracy() * 100.0,
        e.correct,
        e.samples,
        e.loss
    );
    Ok(())
}

fn run_export(args: ExportArgs) -> Result<()> {
    let assembled = load_checkpoint(&args.checkpoint, &args.token)?;
    let layout = checkpoint_layout(&args.checkpoint, &assembled)?;
    let kind = &assembled.model;
    let tensors: Vec<pstrain_store::safetensors::TensorRef<'_>> = layout
        .tensors()
        .iter()
        .map(|t| pstrain_store::safetensors::TensorRef {
            name: &t.name,
            shape: t.shape.clone(),
            data: &assembled.params[t.range()],
        })
        .collect();
    let metadata = [
        ("format".to_string(), "pt".to_string()),
        ("pstrain.model".to_string(), kind.to_string()),
        (
            "pstrain.versions".to_string(),
            format!("{:?}", assembled.versions),
        ),
    ]
    .into();
    let write = |f: &mut std::fs::File| {
        let mut w = std::io::BufWriter::new(f);
        pstrain_store::safetensors::write(&mut w, &tensors, &metadata)?;
        w.flush()
    };
    // A device or a pipe (`-o /dev/stdout`) is written in place: a new file renamed over it
    // would replace the name (`/dev/stdout` itself, for root) instead of writing into it.
    let stream = std::fs::metadata(&args.out).is_ok_and(|m| !m.is_file() && !m.is_dir());
    let done = format!(
        "wrote {} ({kind}, {} tensors, {} values)",
        args.out.display(),
        tensors.len(),
        assembled.params.len()
    );
    if stream {
        std::fs::OpenOptions::new()
            .write(true)
            .open(&args.out)
            .and_then(|mut f| write(&mut f))
            .with_context(|| format!("cannot write {}", args.out.display()))?;
        // Not on stdout, which may be the stream written.
        pstrain_observe::log_line!("{done}");
    } else {
        pstrain_store::atomic::write_atomically(&args.out, write)
            .with_context(|| format!("cannot write {}", args.out.display()))?;
        pstrain_observe::out_line!("{done}");
    }
    Ok(())
}
