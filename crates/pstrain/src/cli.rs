//! The command line: argument parsing and the glue from flags to the engine; errors become
//! `anyhow` here. In the library so that other front ends (the Python package) take the very
//! same flags.

use crate::bench::{run_bench, BenchConfig};
use crate::cluster::RemoteView;
use crate::cluster::{train_tcp, ClusterConfig};
use crate::download::{download_mnist, FileStatus, DEFAULT_MIRRORS};
use crate::metrics::{EvalRecord, MetricsWriter, ProgressRecord, Summary};
use crate::monitor::Monitor;
use crate::worker::WorkerReport;
use crate::{train, Observer, Schedule, TrainConfig};
use anyhow::{bail, Context, Result};
use clap::{Args, Parser, Subcommand, ValueEnum};
use indicatif::{ProgressBar, ProgressStyle};
use pstrain_compute::mnist::{self, Mnist};
use pstrain_compute::ModelKind;
use pstrain_compute::ModelOptions;
use pstrain_core::{Aggregate, Mode, OptimizerConfig};
use pstrain_net::{ClientConfig, Heartbeat, Role, ShardConfig, ShardServer, TcpClient};
use std::fs::File;
use std::io::{BufWriter, IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// The data folder used when neither --data-dir nor PSTRAIN_DATA_DIR names one.
const DEFAULT_DATA_DIR: &str = "data/mnist";

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
    /// Serve one parameter shard over TCP.
    Server(ServerArgs),
    /// Train as one worker against TCP servers.
    Worker(WorkerArgs),
    /// Test accuracy of the newest checkpoint in a folder.
    Eval(EvalArgs),
    /// Write the newest checkpoint as one safetensors file with the model's tensor names.
    Export(ExportArgs),
}

#[derive(Args, Debug)]
struct DataArgs {
    /// Folder with the IDX files [default: ./data/mnist, downloaded there if missing]
    #[arg(long, env = "PSTRAIN_DATA_DIR")]
    data_dir: Option<PathBuf>,
    /// Mirror base URLs to download from, tried in order (repeat or comma-separate)
    #[arg(long = "mirror", env = "PSTRAIN_MNIST_MIRRORS", value_delimiter = ',')]
    mirrors: Vec<String>,
}

#[derive(Copy, Clone, Debug, PartialEq, Eq, ValueEnum)]
enum ModeArg {
    Sync,
    Async,
}

#[derive(Copy, Clone, Debug, PartialEq, Eq, ValueEnum)]
enum OptimizerArg {
    Sgd,
    Momentum,
    Adam,
}

#[derive(Copy, Clone, Debug, PartialEq, Eq, ValueEnum)]
enum AggregateArg {
    /// Average over the step's samples (one worker with the combined batch)
    Mean,
    /// Sum of the workers' gradients (the original Ray example's rule)
    Sum,
}

#[derive(Copy, Clone, Debug, PartialEq, Eq, ValueEnum)]
enum ScheduleArg {
    /// The same rate throughout
    Constant,
    /// Cosine decay to zero over the planned updates
    Cosine,
}

#[derive(Copy, Clone, Debug, PartialEq, Eq, ValueEnum)]
enum ModelArg {
    Cnn,
    Convnet,
}

impl From<ModelArg> for ModelKind {
    fn from(m: ModelArg) -> Self {
        match m {
            ModelArg::Cnn => ModelKind::Cnn,
            ModelArg::Convnet => ModelKind::Convnet,
        }
    }
}

/// The flags that define a run; `train`, `server` and `worker` share them, and every
/// process of one run must be given the same values.
#[derive(Args, Debug)]
struct RunArgs {
    /// sync: one averaged update per step from every worker; async: apply on arrival
    #[arg(long, value_enum, default_value = "async")]
    mode: ModeArg,
    #[arg(long, default_value_t = 2)]
    workers: usize,
    #[arg(long, value_enum, default_value = "cnn")]
    model: ModelArg,
    /// Passes over the training set
    #[arg(long, default_value_t = 5)]
    epochs: usize,
    /// Stop after this many server updates (overrides --epochs)
    #[arg(long)]
    iterations: Option<u64>,
    /// Samples per worker per step
    #[arg(long, default_value_t = 64)]
    batch_size: usize,
    #[arg(long, value_enum, default_value = "adam")]
    optimizer: OptimizerArg,
    /// Learning rate [default: 0.001 for adam, 0.01 for sgd and momentum]
    #[arg(long)]
    lr: Option<f32>,
    /// Learning-rate schedule over the planned updates
    #[arg(long, value_enum, default_value = "cosine")]
    lr_schedule: ScheduleArg,
    /// Momentum factor for --optimizer momentum
    #[arg(long, default_value_t = 0.9)]
    momentum: f32,
    /// L2 weight decay
    #[arg(long, default_value_t = 0.0)]
    weight_decay: f32,
    /// Async: drop gradients computed from weights more than this many updates old (0: no bound)
    #[arg(long, default_value_t = 32)]
    max_staleness: u64,
    /// Sync: each step aggregates the first workers-b gradients and drops the late ones
    #[arg(long, default_value_t = 0)]
    backup_workers: usize,
    /// Sync: how a step combines its gradients
    #[arg(long, value_enum, default_value = "mean")]
    aggregate: AggregateArg,
    #[arg(long, default_value_t = 42)]
    seed: u64,
}

#[derive(Args, Debug)]
struct CheckpointArgs {
    /// Write checkpoints (weights, optimizer state, version) under this folder
    #[arg(long)]
    checkpoint_dir: Option<PathBuf>,
    /// Checkpoint every N server updates
    #[arg(long)]
    checkpoint_every: Option<u64>,
    /// Checkpoint every S seconds [default: 60 when --checkpoint-dir is given]
    #[arg(long)]
    checkpoint_secs: Option<f64>,
    /// Checkpoints kept per shard
    #[arg(long, default_value_t = 3)]
    keep_checkpoints: usize,
}

impl CheckpointArgs {
    fn policy(&self, dir: Option<&Path>, resume: bool) -> Option<crate::train::CheckpointPolicy> {
        let dir = dir.or(self.checkpoint_dir.as_deref())?;
        let every_secs = match (self.checkpoint_every, self.checkpoint_secs) {
            (None, None) => Some(60.0),
            (_, secs) => secs,
        };
        Some(crate::train::CheckpointPolicy {
            dir: dir.to_owned(),
            every_updates: self.checkpoint_every,
            every: every_secs
                .filter(|s| s.is_finite() && *s > 0.0)
                .map(Duration::from_secs_f64),
            keep: self.keep_checkpoints.max(1),
            resume,
        })
    }
}

#[derive(Copy, Clone, Debug, PartialEq, Eq, ValueEnum)]
enum TransportArg {
    /// Server and workers as threads of this process
    Inproc,
    /// Server shards and workers as separate local processes talking TCP on 127.0.0.1
    Tcp,
}

#[derive(Args, Debug)]
struct TrainArgs {
    #[command(flatten)]
    run: RunArgs,
    /// inproc: threads in this process; tcp: local processes over TCP
    #[arg(long, value_enum, default_value = "inproc")]
    transport: TransportArg,
    /// Server shards (with --transport tcp)
    #[arg(long, default_value_t = 1)]
    shards: usize,
    /// Evaluate on the test set every N server updates [default: once per epoch; 0: at the end]
    #[arg(long)]
    eval_every: Option<u64>,
    /// Compute threads per worker
    #[arg(long, default_value_t = 1)]
    threads: usize,
    /// Write progress, evaluations and the summary as JSON lines to this file
    #[arg(long)]
    metrics: Option<PathBuf>,
    /// Continue from the newest valid checkpoint in this folder (and keep checkpointing there)
    #[arg(long)]
    resume: Option<PathBuf>,
    #[command(flatten)]
    checkpoints: CheckpointArgs,
    #[command(flatten)]
    data: DataArgs,
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
    /// Shards of the TCP training comparison
    #[arg(long, default_value_t = 2)]
    train_shards: usize,
    #[command(flatten)]
    data: DataArgs,
}

#[derive(Args, Debug)]
struct ServerArgs {
    /// Address to listen on (port 0 picks a free port; the bound address is printed)
    #[arg(long, default_value = "127.0.0.1:7000")]
    listen: String,
    /// This shard's index, 0-based
    #[arg(long, default_value_t = 0)]
    shard: usize,
    /// Number of shards the parameters are split over
    #[arg(long, default_value_t = 1)]
    shards: usize,
    /// Training-set size, to plan the learning-rate schedule over the run's updates
    #[arg(long, default_value_t = 60_000)]
    train_samples: usize,
    /// Seconds a read or write may take once a frame is under way
    #[arg(long, default_value_t = 30)]
    io_timeout: u64,
    /// Seconds a peer may stay silent between requests before it is declared gone (a worker
    /// then leaves the quorum)
    #[arg(long, default_value_t = 120)]
    idle_timeout: u64,
    /// Seconds without a heartbeat after which a worker leaves the quorum
    #[arg(long, default_value_t = 10.0)]
    heartbeat_timeout: f64,
    /// Keep serving after every worker has left
    #[arg(long)]
    keep_running: bool,
    #[command(flatten)]
    checkpoints: CheckpointArgs,
    #[command(flatten)]
    run: RunArgs,
}

#[derive(Args, Debug)]
struct WorkerArgs {
    /// Shard addresses in shard order, comma-separated
    #[arg(long, value_delimiter = ',', required = true)]
    servers: Vec<String>,
    /// This worker's rank, 0-based, or `auto`: take a free rank (a dead worker's first), as a
    /// replacement for a worker that died
    #[arg(long, value_parser = parse_rank)]
    rank: usize,
    /// Compute threads
    #[arg(long, default_value_t = 1)]
    threads: usize,
    /// Seconds to keep retrying the connection while servers start
    #[arg(long, default_value_t = 60)]
    connect_timeout: u64,
    /// Seconds between heartbeats to every shard (0: none)
    #[arg(long, default_value_t = 1.0)]
    heartbeat_secs: f64,
    #[command(flatten)]
    run: RunArgs,
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
}

#[derive(Args, Debug)]
struct ExportArgs {
    /// Checkpoint folder (holding shard-I-of-S folders)
    #[arg(long)]
    checkpoint: PathBuf,
    /// The safetensors file to write
    #[arg(long, default_value = "model.safetensors")]
    out: PathBuf,
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
    /// Server updates per training measurement (times the workers in async mode)
    #[arg(long, default_value_t = 150)]
    train_updates: u64,
    #[arg(long, default_value_t = 64)]
    batch_size: usize,
    #[command(flatten)]
    data: DataArgs,
}

pub fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Train(args) => run_train(args),
        Command::Download(args) => {
            let dir = data_dir(&args.data);
            download(&dir, &args.data.mirrors)
        }
        Command::Bench(args) => run_bench_cmd(args),
        Command::BenchNet(args) => run_bench_net(args),
        Command::Server(args) => run_server(args),
        Command::Worker(args) => run_worker_cmd(args),
        Command::Eval(args) => run_eval(args),
        Command::Export(args) => run_export(args),
    }
}

/// The help text of one subcommand (`pstrain NAME --help`), for front ends that take its flags.
pub fn help(name: &str) -> Option<String> {
    use clap::CommandFactory;
    let mut cmd = Cli::command();
    let sub = cmd.find_subcommand_mut(name)?;
    Some(sub.render_help().to_string())
}

/// Parses one subcommand's flags as if `pstrain NAME ARGV...` had been typed; the error
/// carries clap's message (with usage).
fn parse_command(name: &str, argv: &[String]) -> Result<Command> {
    let words = ["pstrain", name]
        .into_iter()
        .map(String::from)
        .chain(argv.iter().cloned());
    Cli::try_parse_from(words)
        .map(|cli| cli.command)
        .map_err(|e| anyhow::anyhow!("{}", e.render()))
}

fn data_dir(args: &DataArgs) -> PathBuf {
    args.data_dir
        .clone()
        .unwrap_or_else(|| PathBuf::from(DEFAULT_DATA_DIR))
}

fn download(dir: &Path, mirrors: &[String]) -> Result<()> {
    let mirrors: Vec<String> = if mirrors.is_empty() {
        DEFAULT_MIRRORS.iter().map(|m| m.to_string()).collect()
    } else {
        mirrors.to_vec()
    };
    let progress = std::io::stderr().is_terminal();
    for status in download_mnist(dir, &mirrors, progress)? {
        match status {
            FileStatus::Present(p) => eprintln!("present, checksum ok: {}", p.display()),
            FileStatus::Downloaded { path, mirror } => {
                eprintln!(
                    "downloaded, checksum ok: {} (from {mirror})",
                    path.display()
                )
            }
        }
    }
    Ok(())
}

/// Loads the data set; the default folder is filled by a download first when files are
/// missing, as torchvision does, so that a fresh machine needs no extra step.
fn load_data(args: &DataArgs) -> Result<Mnist> {
    let dir = data_dir(args);
    if args.data_dir.is_none() && !mnist::missing_files(&dir).is_empty() {
        eprintln!("MNIST not found in {}; downloading", dir.display());
        download(&dir, &args.mirrors)?;
    }
    let started = Instant::now();
    let data = mnist::load_dir(&dir)?;
    eprintln!(
        "loaded {} training and {} test images from {} in {:.1} s",
        data.train.len(),
        data.test.len(),
        dir.display(),
        started.elapsed().as_secs_f64()
    );
    Ok(data)
}

fn train_config(args: &RunArgs, eval_every: Option<u64>, threads: usize) -> Result<TrainConfig> {
    let lr = args.lr.unwrap_or(match args.optimizer {
        OptimizerArg::Adam => 1e-3,
        OptimizerArg::Sgd | OptimizerArg::Momentum => 0.01,
    });
    let optimizer = match args.optimizer {
        OptimizerArg::Sgd => OptimizerConfig::Sgd {
            lr,
            momentum: 0.0,
            weight_decay: args.weight_decay,
            nesterov: false,
        },
        OptimizerArg::Momentum => OptimizerConfig::Sgd {
            lr,
            momentum: args.momentum,
            weight_decay: args.weight_decay,
            nesterov: false,
        },
        OptimizerArg::Adam => OptimizerConfig::Adam {
            lr,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: args.weight_decay,
        },
    };
    let mode = match args.mode {
        ModeArg::Sync => Mode::Sync {
            backup_workers: args.backup_workers,
        },
        ModeArg::Async => {
            if args.backup_workers > 0 {
                bail!("--backup-workers applies to --mode sync only");
            }
            Mode::Async {
                max_staleness: (args.max_staleness > 0).then_some(args.max_staleness),
            }
        }
    };
    let cfg = TrainConfig {
        mode,
        workers: args.workers,
        model: args.model.into(),
        epochs: args.epochs,
        iterations: args.iterations,
        batch_size: args.batch_size,
        optimizer,
        schedule: match args.lr_schedule {
            ScheduleArg::Constant => Schedule::Constant,
            ScheduleArg::Cosine => Schedule::Cosine,
        },
        aggregate: match args.aggregate {
            AggregateArg::Mean => Aggregate::Mean,
            AggregateArg::Sum => Aggregate::Sum,
        },
        seed: args.seed,
        eval_every,
        threads,
        checkpoint: None,
    };
    cfg.validate().context("invalid training flags")?;
    Ok(cfg)
}

/// Shows progress as a bar on a terminal and as plain log lines elsewhere, and mirrors every
/// record into the metrics file.
struct Reporter {
    bar: Option<ProgressBar>,
    metrics: Option<MetricsWriter<BufWriter<File>>>,
    metrics_error: Option<std::io::Error>,
    last_line: Instant,
    last_accuracy: Option<f64>,
    total_samples: u64,
}

impl Reporter {
    fn new(total_samples: u64, metrics: Option<&Path>) -> Result<Self> {
        let bar = std::io::stdout().is_terminal().then(|| {
            let bar = ProgressBar::new(total_samples);
            if let Ok(style) = ProgressStyle::with_template(
                "[{elapsed_precise}] {bar:30.cyan/blue} {percent:>3}% {msg}",
            ) {
                bar.set_style(style.progress_chars("##-"));
            }
            bar
        });
        let metrics = metrics
            .map(|p| {
                File::create(p)
                    .with_context(|| format!("cannot create metrics file {}", p.display()))
                    .map(|f| MetricsWriter::new(BufWriter::new(f)))
            })
            .transpose()?;
        Ok(Reporter {
            bar,
            metrics,
            metrics_error: None,
            last_line: Instant::now(),
            last_accuracy: None,
            total_samples,
        })
    }

    fn record<T: serde::Serialize>(&mut self, record: &T) {
        if let Some(m) = &mut self.metrics {
            if let Err(e) = m.write(record) {
                // Keep training; report the metrics failure once at the end.
                self.metrics_error.get_or_insert(e);
                self.metrics = None;
            }
        }
    }

    fn line(&self, r: &ProgressRecord) -> String {
        let secs = r.time_s.max(1e-9);
        format!(
            "epoch {:.2} | {} updates ({:.1}/s) | {:.0} samples/s | loss {} | test acc {}",
            r.epoch,
            r.updates,
            r.updates as f64 / secs,
            r.samples as f64 / secs,
            r.loss.map_or("-".into(), |l| format!("{l:.4}")),
            self.last_accuracy
                .map_or("-".into(), |a| format!("{:.2}%", a * 100.0)),
        )
    }
}

impl Observer for Reporter {
    fn progress(&mut self, r: &ProgressRecord) {
        let line = self.line(r);
        match &self.bar {
            Some(bar) => {
                bar.set_position(r.samples.min(self.total_samples));
                bar.set_message(line);
            }
            None if self.last_line.elapsed() >= Duration::from_secs(5) => {
                println!("{line}");
                self.last_line = Instant::now();
            }
            None => {}
        }
        self.record(r);
    }

    fn note(&mut self, message: &str) {
        match &self.bar {
            Some(bar) => bar.println(message),
            None => eprintln!("{message}"),
        }
    }

    fn eval(&mut self, r: &EvalRecord) {
        self.last_accuracy = Some(r.test_accuracy);
        let line = format!(
            "eval: {} updates, epoch {:.2}: test accuracy {:.2}%, test loss {:.4}",
            r.updates,
            r.epoch,
            r.test_accuracy * 100.0,
            r.test_loss
        );
        match &self.bar {
            Some(bar) => bar.println(line),
            None => println!("{line}"),
        }
        self.record(r);
    }
}

/// A flag set by Ctrl-C or SIGTERM, for a clean stop (final checkpoint, summary).
fn stop_on_signal() -> Arc<AtomicBool> {
    let stop = Arc::new(AtomicBool::new(false));
    let flag = Arc::clone(&stop);
    if let Err(e) = ctrlc::set_handler(move || flag.store(true, Ordering::Relaxed)) {
        eprintln!("warning: cannot install the Ctrl-C handler: {e}");
    }
    stop
}

fn announce(cfg: &TrainConfig) {
    println!(
        "training {} ({} parameters), {} mode, {} workers, batch {}, {:?}",
        cfg.model,
        cfg.model.build(Default::default()).layout().len(),
        cfg.mode.name(),
        cfg.workers,
        cfg.batch_size,
        cfg.optimizer
    );
}

/// A `pstrain train` run whose shards and workers another launcher starts (the Ray driver):
/// it gives the flags for them, watches the shards as an observer, evaluates and reports
/// exactly as `--transport tcp` does for local processes.
pub struct RemoteRun {
    cfg: TrainConfig,
    args: TrainArgs,
    data: Mnist,
    reporter: Reporter,
    watch: Option<(Monitor, RemoteView)>,
}

impl RemoteRun {
    /// Checks the `pstrain train` flags in `argv` and loads the data set (the test set is
    /// evaluated here, the training set's size plans the schedule).
    pub fn new(argv: &[String]) -> Result<Self> {
        let args = match parse_command("train", argv)? {
            Command::Train(args) => args,
            _ => bail!("not a train command line"),
        };
        if args.transport != TransportArg::Inproc {
            bail!("--transport does not apply here: the launcher places the processes");
        }
        if args.shards == 0 {
            bail!("--shards must be at least 1");
        }
        let (cfg, data, reporter) = prepare_train(&args)?;
        announce(&cfg);
        Ok(RemoteRun {
            cfg,
            args,
            data,
            reporter,
            watch: None,
        })
    }

    pub fn workers(&self) -> usize {
        self.cfg.workers
    }

    pub fn shards(&self) -> usize {
        self.args.shards
    }

    /// Compute threads per worker.
    pub fn threads(&self) -> usize {
        self.cfg.threads
    }

    /// Whether the shards write checkpoints (so a restarted shard can resume).
    pub fn checkpointing(&self) -> bool {
        self.cfg.checkpoint.is_some()
    }

    /// Flags for every shard's `pstrain server`; the launcher adds `--listen` and `--shard`.
    pub fn server_args(&self) -> Vec<String> {
        crate::cluster::server_args(
            &self.cfg,
            self.args.shards,
            self.data.train.len(),
            self.cfg.checkpoint.as_ref(),
        )
    }

    /// Flags for every `pstrain worker`; the launcher adds `--servers` and `--rank`.
    pub fn worker_args(&self) -> Vec<String> {
        crate::cluster::worker_args(&self.cfg, self.args.data.data_dir.as_deref())
    }

    /// Joins the shards (in shard order) as an observer; the clock starts here.
    pub fn connect(&mut self, servers: Vec<String>) -> Result<()> {
        if servers.len() != self.args.shards {
            bail!(
                "{} shard addresses given for --shards {}",
                servers.len(),
                self.args.shards
            );
        }
        let view = RemoteView::connect(&self.cfg, servers)?;
        let monitor = Monitor::new(&self.cfg, self.data.train.len(), Instant::now());
        self.watch = Some((monitor, view));
        Ok(())
    }

    /// One progress sample, and an evaluation when one is due.
    pub fn tick(&mut self) -> Result<()> {
        let (monitor, view) = self.watch.as_mut().context("not connected to the shards")?;
        monitor.tick(view, &mut self.reporter, &self.data.test)?;
        Ok(())
    }

    /// The final evaluation and summary, printed and returned; `reports` are the workers'
    /// JSON reports, `stopped` says the run was cut short.
    pub fn finish(&mut self, reports: &[String], stopped: bool) -> Result<Summary> {
        let (monitor, mut view) = self.watch.take().context("not connected to the shards")?;
        let wall = monitor.start().elapsed();
        let (stats, record, _) = monitor.finish(&mut view, &mut self.reporter, &self.data.test)?;
        let unapplied = crate::cluster::not_applied(reports.iter().map(String::as_str))
            .context("a worker report is unreadable")?;
        let summary = Summary::new(&self.cfg, &stats, &record, wall, stopped, unapplied);
        self.reporter.record(&summary);
        println!("{}", summary.render());
        if let Some(e) = self.reporter.metrics_error.take() {
            bail!("training finished but writing the metrics file failed: {e}");
        }
        Ok(summary)
    }
}

/// The run's configuration, its data set and a reporter sized for its planned samples.
fn prepare_train(args: &TrainArgs) -> Result<(TrainConfig, Mnist, Reporter)> {
    let mut cfg = train_config(&args.run, args.eval_every, args.threads)?;
    cfg.checkpoint = args
        .checkpoints
        .policy(args.resume.as_deref(), args.resume.is_some());
    let data = load_data(&args.data)?;
    let per_update = if cfg.mode.is_sync() { cfg.workers } else { 1 } * cfg.batch_size;
    let total_samples = cfg.planned_updates(data.train.len()) * per_update as u64;
    let reporter = Reporter::new(total_samples, args.metrics.as_deref())?;
    Ok((cfg, data, reporter))
}

fn run_train(args: TrainArgs) -> Result<()> {
    let (cfg, data, mut reporter) = prepare_train(&args)?;
    // Ctrl-C ends the run cleanly: workers stop, the weights reached are evaluated.
    let stop = stop_on_signal();
    announce(&cfg);
    let outcome = match args.transport {
        TransportArg::Inproc => {
            if args.shards != 1 {
                bail!("--shards applies to --transport tcp");
            }
            train(&cfg, &data, &mut reporter, &stop)?
        }
        TransportArg::Tcp => {
            let mut cluster = ClusterConfig::local(
                std::env::current_exe().context("cannot find the pstrain executable")?,
                args.shards,
                std::fs::canonicalize(data_dir(&args.data))?,
            );
            // The shards checkpoint, and restore what they find, themselves.
            cluster.checkpoint = cfg.checkpoint.clone();
            train_tcp(&cfg, &cluster, &data, &mut reporter, &stop)?
        }
    };
    if let Some(bar) = &reporter.bar {
        bar.finish_and_clear();
    }
    reporter.record(&outcome.summary);
    println!("{}", outcome.summary.render());
    if let Some(e) = reporter.metrics_error {
        bail!("training finished but writing the metrics file failed: {e}");
    }
    Ok(())
}

fn run_bench_cmd(args: BenchArgs) -> Result<()> {
    let data = load_data(&args.data)?;
    let cfg = BenchConfig {
        batch_size: args.batch_size,
        seconds: args.seconds,
        train_updates: args.train_updates,
        ..BenchConfig::default()
    };
    let report = run_bench(&cfg, &data, &mut |line| println!("{line}"))?;
    let json = serde_json::to_string_pretty(&report)?;
    std::fs::write(&args.out, json + "\n")
        .with_context(|| format!("cannot write {}", args.out.display()))?;
    println!("wrote {}", args.out.display());
    Ok(())
}

/// Weights of a model that is not built in (the Python API's own models): the layout and the
/// values every shard starts from.
pub struct CustomModel {
    pub layout: pstrain_core::Layout,
    pub initial: Vec<f32>,
}

/// One shard as `pstrain server` flags define it, ready to bind.
pub struct ShardSetup {
    pub listen: String,
    pub shard: usize,
    pub config: ShardConfig,
    pub initial: Vec<f32>,
}

/// The shard that `pstrain server ARGV...` would serve, with `custom` weights in place of
/// `--model`'s if given.
pub fn shard_setup(argv: &[String], custom: Option<CustomModel>) -> Result<ShardSetup> {
    match parse_command("server", argv)? {
        Command::Server(args) => server_setup(&args, custom),
        _ => bail!("not a server command line"),
    }
}

fn server_setup(args: &ServerArgs, custom: Option<CustomModel>) -> Result<ShardSetup> {
    let cfg = train_config(&args.run, Some(0), 1)?;
    if args.shard >= args.shards {
        bail!(
            "--shard {} is out of range for --shards {}",
            args.shard,
            args.shards
        );
    }
    let (layout, initial, model_name) = match custom {
        Some(c) => {
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
            (c.layout, c.initial, "custom".to_string())
        }
        None => (
            cfg.model.build(Default::default()).layout().clone(),
            cfg.initial_params(),
            cfg.model.name().to_string(),
        ),
    };
    let mut shard_cfg = ShardConfig::new(
        args.shard,
        args.shards,
        layout,
        cfg.server_config(args.train_samples),
    );
    shard_cfg.io_timeout = Duration::from_secs(args.io_timeout.max(1));
    shard_cfg.idle_timeout = Duration::from_secs(args.idle_timeout.max(1));
    shard_cfg.exit_when_finished = !args.keep_running;
    if !(args.heartbeat_timeout.is_finite() && args.heartbeat_timeout > 0.0) {
        bail!("--heartbeat-timeout must be a positive number of seconds");
    }
    shard_cfg.heartbeat_timeout = Duration::from_secs_f64(args.heartbeat_timeout);
    shard_cfg.checkpoint = args.checkpoints.policy(None, true);
    shard_cfg.model = model_name;
    shard_cfg.run_description = cfg.describe();
    Ok(ShardSetup {
        listen: args.listen.clone(),
        shard: args.shard,
        config: shard_cfg,
        initial,
    })
}

/// Prints what a shard did over the run, to stderr.
pub fn log_shard_report(shard: usize, report: &pstrain_net::server::ShardReport) {
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

fn run_server(args: ServerArgs) -> Result<()> {
    let setup = server_setup(&args, None)?;
    let rt = tokio::runtime::Runtime::new()?;
    let report = rt.block_on(async {
        let server = ShardServer::bind(&setup.listen, setup.config, &setup.initial)
            .await
            .with_context(|| format!("cannot serve on {}", setup.listen))?;
        // The launcher (and people) read the bound address from this line.
        println!("listening on {}", server.local_addr()?);
        std::io::stdout().flush()?;
        // SIGINT or SIGTERM: stop serving, write a final checkpoint, exit.
        let stop = async {
            #[cfg(unix)]
            {
                use tokio::signal::unix::{signal, SignalKind};
                match signal(SignalKind::terminate()) {
                    Ok(mut term) => {
                        tokio::select! {
                            _ = tokio::signal::ctrl_c() => {}
                            _ = term.recv() => {}
                        }
                    }
                    Err(_) => {
                        let _ = tokio::signal::ctrl_c().await;
                    }
                }
            }
            #[cfg(not(unix))]
            {
                let _ = tokio::signal::ctrl_c().await;
            }
        };
        anyhow::Ok(server.run(stop).await)
    })?;
    log_shard_report(setup.shard, &report);
    Ok(())
}

/// Runs one worker as `pstrain worker ARGV...` would, until its work is done or `stop` is set.
pub fn run_worker_from(argv: &[String], stop: &AtomicBool) -> Result<WorkerReport> {
    match parse_command("worker", argv)? {
        Command::Worker(args) => worker(&args, stop),
        _ => bail!("not a worker command line"),
    }
}

/// A rank, or `auto` (`ANY_RANK`).
fn parse_rank(s: &str) -> Result<usize, String> {
    if s == "auto" {
        return Ok(pstrain_net::ANY_RANK);
    }
    match s.parse::<usize>() {
        Ok(r) if r != pstrain_net::ANY_RANK => Ok(r),
        _ => Err(format!("`{s}` is not a rank (a number from 0, or `auto`)")),
    }
}

fn worker(args: &WorkerArgs, stop: &AtomicBool) -> Result<WorkerReport> {
    let cfg = train_config(&args.run, Some(0), args.threads)?;
    let data = load_data(&args.data)?;
    let mut model = cfg.model.build(ModelOptions {
        dropout: true,
        threads: args.threads,
    });
    let mut client_cfg = ClientConfig::new(
        args.servers.clone(),
        Role::Worker,
        args.rank,
        cfg.workers,
        cfg.mode,
        model.layout().clone(),
    );
    client_cfg.connect_timeout = Duration::from_secs(args.connect_timeout);
    let who = if args.rank == pstrain_net::ANY_RANK {
        "a worker (any free rank)".to_string()
    } else {
        format!("worker {}", args.rank)
    };
    let mut client = TcpClient::connect(&client_cfg)
        .with_context(|| format!("{who} cannot join {}", args.servers.join(",")))?;
    let rank = client.rank();
    if args.rank == pstrain_net::ANY_RANK {
        eprintln!("joined as worker {rank}");
    }
    // Alive-signal from its own thread, so a busy worker is not taken for a frozen one.
    let _heartbeat = if args.heartbeat_secs > 0.0 && args.heartbeat_secs.is_finite() {
        Some(Heartbeat::start(
            client.config(),
            Duration::from_secs_f64(args.heartbeat_secs),
        )?)
    } else {
        None
    };
    Ok(crate::worker::run_worker(
        &mut client,
        model.as_mut(),
        &data.train,
        &cfg.worker_config(rank),
        stop,
    )?)
}

fn run_worker_cmd(args: WorkerArgs) -> Result<()> {
    let stop = stop_on_signal();
    let report = worker(&args, &stop)?;
    // One JSON line on stdout: the launcher of a local cluster collects these.
    println!("{}", serde_json::to_string(&report)?);
    Ok(())
}

fn run_bench_net(args: BenchNetArgs) -> Result<()> {
    let data = load_data(&args.data)?;
    let cluster = ClusterConfig::local(
        std::env::current_exe().context("cannot find the pstrain executable")?,
        args.train_shards,
        std::fs::canonicalize(data_dir(&args.data))?,
    );
    let cfg = crate::netbench::NetBenchConfig {
        shard_counts: args.shards,
        synthetic_values: args.synthetic_values,
        ..Default::default()
    };
    let report = crate::netbench::run_net_bench(&cfg, &cluster, &data, &mut |l| println!("{l}"))?;
    std::fs::write(&args.out, serde_json::to_string_pretty(&report)? + "\n")
        .with_context(|| format!("cannot write {}", args.out.display()))?;
    println!("wrote {}", args.out.display());
    Ok(())
}

/// The model named in a checkpoint folder, with its weights joined from every shard.
fn load_checkpoint_model(dir: &Path) -> Result<(ModelKind, pstrain_store::Assembled)> {
    let assembled = pstrain_store::assemble(dir)?;
    for p in &assembled.problems {
        eprintln!("skipping checkpoint: {p}");
    }
    let kind: ModelKind = assembled
        .model
        .parse()
        .map_err(|e: String| anyhow::anyhow!("{}: {e}", dir.display()))?;
    let layout = kind.build(Default::default()).layout().clone();
    if layout.fingerprint() != assembled.fingerprint || layout.len() != assembled.params.len() {
        bail!(
            "{}: the checkpoint's layout does not match this build's `{kind}` model",
            dir.display()
        );
    }
    Ok((kind, assembled))
}

fn run_eval(args: EvalArgs) -> Result<()> {
    let (kind, assembled) = load_checkpoint_model(&args.checkpoint)?;
    let data = load_data(&args.data)?;
    let mut model = kind.build(Default::default());
    let e = model.evaluate(&assembled.params, &data.test.images, &data.test.labels)?;
    println!(
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
    let (kind, assembled) = load_checkpoint_model(&args.checkpoint)?;
    let layout = kind.build(Default::default()).layout().clone();
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
        ("pstrain.model".to_string(), kind.name().to_string()),
        (
            "pstrain.versions".to_string(),
            format!("{:?}", assembled.versions),
        ),
    ]
    .into();
    pstrain_store::atomic::write_atomically(&args.out, |f| {
        let mut w = std::io::BufWriter::new(f);
        pstrain_store::safetensors::write(&mut w, &tensors, &metadata)?;
        w.flush()
    })
    .with_context(|| format!("cannot write {}", args.out.display()))?;
    println!(
        "wrote {} ({kind}, {} tensors, {} values)",
        args.out.display(),
        tensors.len(),
        assembled.params.len()
    );
    Ok(())
}
