//! `pstrain bench-fleet`: what one shard costs per device. For each fleet size it starts a
//! `pstrain server` process (async or sync, the given model) and that many workers as threads of this
//! process, each with its own connection and rank, pulling and pushing as fast as they can for
//! a few seconds. Measured on the shard's process: CPU seconds per applied gradient, resident
//! memory before anyone connects, with every worker connected and idle, and after the run;
//! on the workers: pull and push latency percentiles; from the shard's worker records: how
//! evenly the workers' gradients were applied (no one starved); in sync, how long each step
//! waited for its last gradient (the longest wait at the gate of that step's workers).

use crate::flags::token::TOKEN_ENV;
use crate::launch::process::{read_address, Ending, Proc};
use crate::launch::shard::DEFAULT_TRAIN_SAMPLES;
use crate::report::usage::{cpu_seconds, rss_mb};
use crate::run::TrainError;
use pstrain_core::{ParameterClient, PushMeta};
use pstrain_net::{describe, ClientConfig, NetError, Role, RunToken, Served, TcpClient};
use serde::Serialize;
use std::path::PathBuf;
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

/// `pstrain bench-fleet`'s flags.
#[derive(clap::Args, Debug)]
pub struct FleetArgs {
    /// Fleet sizes, comma-separated
    #[arg(long, value_delimiter = ',', default_value = "1,8,32,128,512")]
    pub workers: Vec<usize>,
    /// The layout every push and pull carries: convnet (1,960 values: the shard's cost per
    /// message) or cnn (1.2M values: with the model's update)
    #[arg(long, default_value = "convnet")]
    pub model: String,
    /// The shard's mode: async (every gradient applied as it comes) or sync (each step
    /// waits for every worker's gradient)
    #[arg(long, default_value = "async", value_parser = ["async", "sync"])]
    pub mode: String,
    /// Seconds of pulling and pushing per fleet size
    #[arg(long, default_value_t = 3.0)]
    pub seconds: f64,
    /// Where to write the JSON report
    #[arg(long, default_value = "bench-fleet.json")]
    pub out: PathBuf,
    /// Also write the report as a markdown table here
    #[arg(long)]
    pub md: Option<PathBuf>,
}

/// Runs `pstrain bench-fleet` and writes its report.
pub fn run_fleet_cmd(args: &FleetArgs) -> anyhow::Result<()> {
    use anyhow::Context;
    let most = pstrain_core::plan::MAX_WORKERS;
    if args.workers.iter().any(|&n| n == 0 || n > most)
        || !(args.seconds > 0.0 && args.seconds < 3600.0)
    {
        anyhow::bail!("--workers must all be in 1..={most} and --seconds in (0, 3600)");
    }
    // Said here, not by the shard process this starts.
    args.model
        .parse::<pstrain_compute::ModelSpec>()
        .map_err(|e| anyhow::anyhow!("--model: {e}"))?;
    let cfg = FleetConfig {
        exe: std::env::current_exe().context("cannot find the pstrain executable")?,
        worker_counts: args.workers.clone(),
        model: args.model.clone(),
        sync: args.mode == "sync",
        seconds: args.seconds,
    };
    let points = run_fleet_bench(&cfg, &mut |l| pstrain_observe::out_line!("{l}"))?;
    std::fs::write(&args.out, serde_json::to_string_pretty(&points)? + "\n")
        .with_context(|| format!("cannot write {}", args.out.display()))?;
    pstrain_observe::out_line!("wrote {}", args.out.display());
    if let Some(md) = &args.md {
        std::fs::write(md, markdown(&points))
            .with_context(|| format!("cannot write {}", md.display()))?;
        pstrain_observe::out_line!("wrote {}", md.display());
    }
    Ok(())
}

/// One point as a row of the markdown table.
fn markdown_row(p: &FleetPoint) -> String {
    format!(
        "| {} | {} | {} | {:.0} | {:.3} | {:.2} / {:.2} | {:.2} / {:.2} | {:.1} / {:.1} / {:.1} | \
         {:.0} | {:.2} / {:.2} | {} |\n",
        p.workers,
        p.model,
        p.mode,
        p.updates_per_s,
        p.shard_cpu_ms_per_gradient,
        p.pull_p50_ms,
        p.pull_p99_ms,
        p.push_p50_ms,
        p.push_p99_ms,
        p.shard_rss_empty_mb,
        p.shard_rss_idle_mb,
        p.shard_rss_end_mb,
        p.shard_kib_per_idle_worker,
        p.applied_min_over_mean,
        p.applied_max_over_mean,
        match (p.step_wait_p50_ms, p.step_wait_p99_ms) {
            (Some(a), Some(b)) => format!("{a:.2} / {b:.2}"),
            _ => "-".into(),
        }
    )
}

/// The points as a markdown table.
pub fn markdown(points: &[FleetPoint]) -> String {
    let mut t = String::from(
        "| workers | model | mode | updates/s | shard CPU per gradient (ms) | pull p50 / p99 (ms) | \
         push p50 / p99 (ms) | shard RSS empty / idle / end (MB) | KiB per idle worker | \
         applied min / max over mean | sync step's wait for its last gradient p50 / p99 (ms) \
         |\n|---|---|---|---|---|---|---|---|---|---|---|\n",
    );
    for p in points {
        t.push_str(&markdown_row(p));
    }
    t
}

#[derive(Debug, Clone)]
pub struct FleetConfig {
    /// The `pstrain` executable (for the shard).
    pub exe: PathBuf,
    pub worker_counts: Vec<usize>,
    /// `cnn` or `convnet`: the layout every push and pull carries.
    pub model: String,
    /// A sync shard (workers wait at its gate each step) instead of an async one.
    pub sync: bool,
    /// Seconds of pulling and pushing per fleet size.
    pub seconds: f64,
}

/// One fleet size.
#[derive(Debug, Clone, Serialize)]
pub struct FleetPoint {
    pub workers: usize,
    pub model: String,
    pub mode: &'static str,
    pub seconds: f64,
    pub gradients_applied: u64,
    pub updates_per_s: f64,
    /// The shard process's CPU (user + system) over the run, per applied gradient.
    pub shard_cpu_ms_per_gradient: f64,
    pub pull_p50_ms: f64,
    pub pull_p99_ms: f64,
    pub push_p50_ms: f64,
    pub push_p99_ms: f64,
    /// The shard's resident memory before any worker connected, with all connected and
    /// idle, and at the end.
    pub shard_rss_empty_mb: f64,
    pub shard_rss_idle_mb: f64,
    pub shard_rss_end_mb: f64,
    /// (idle - empty) / workers.
    pub shard_kib_per_idle_worker: f64,
    /// The fewest and most gradients applied of one worker, over the mean.
    pub applied_min_over_mean: f64,
    pub applied_max_over_mean: f64,
    /// Sync: per step, the longest any of its workers waited at the gate (from its push to
    /// the step's weights), over the steps.
    pub step_wait_p50_ms: Option<f64>,
    pub step_wait_p99_ms: Option<f64>,
}

fn percentile(sorted: &[f64], q: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    sorted[((sorted.len() - 1) as f64 * q).round() as usize]
}

fn launch_error(e: NetError) -> TrainError {
    TrainError::Launch(e.to_string())
}

/// Every fleet size of `cfg`, one after another.
pub fn run_fleet_bench(
    cfg: &FleetConfig,
    log: &mut dyn FnMut(&str),
) -> Result<Vec<FleetPoint>, TrainError> {
    let mut points = Vec::new();
    log(markdown(&[]).trim_end());
    for &workers in &cfg.worker_counts {
        let p = fleet_point(cfg, workers)?;
        log(markdown_row(&p).trim_end());
        points.push(p);
    }
    Ok(points)
}

/// A `pstrain server` for a fleet of `workers`, with its address and what it serves.
fn start_shard(
    cfg: &FleetConfig,
    workers: usize,
    token: &RunToken,
) -> Result<(Proc, Vec<String>, Served), TrainError> {
    let mut cmd = Command::new(&cfg.exe);
    cmd.args(["server", "--listen", "127.0.0.1:0"])
        .args(match cfg.sync {
            true => ["--mode", "sync"].as_slice(),
            false => ["--mode", "async", "--max-staleness", "0"].as_slice(),
        })
        .args(["--iterations", "1000000000000"])
        .args(["--workers", &workers.to_string(), "--model", &cfg.model])
        // A fleet's clients carry no data, but a plan needs a sample for every worker.
        .args([
            "--train-samples",
            &workers.max(DEFAULT_TRAIN_SAMPLES).to_string(),
        ])
        .args([
            "--optimizer",
            "sgd",
            "--lr",
            "1e-9",
            "--heartbeat-timeout",
            "3600",
        ])
        .env(TOKEN_ENV, token.to_hex());
    let mut shard = Proc::spawn("the fleet's shard".into(), &mut cmd, false, Ending::Stop)?;
    let stdout = shard.child.stdout.take().ok_or_else(no_stdout)?;
    let servers = vec![read_address("the fleet's shard", stdout)?];
    let served = describe(&servers, IO, IO, Some(token), None).map_err(launch_error)?;
    Ok((shard, servers, served))
}

/// Deadlines of the fleet's clients: a large fleet on two cores is slow to answer.
const IO: Duration = Duration::from_secs(120);

fn fleet_point(cfg: &FleetConfig, workers: usize) -> Result<FleetPoint, TrainError> {
    let token = RunToken::generate().map_err(|e| TrainError::Launch(e.to_string()))?;
    let (mut shard, servers, served) = start_shard(cfg, workers, &token)?;
    let pid = shard.child.id();
    let client_cfg = |role, rank| {
        let (plan, layout) = (served.plan.clone(), served.layout.clone());
        let mut c = ClientConfig::new(servers.clone(), role, rank, plan, layout);
        (c.io_timeout, c.connect_timeout, c.token) = (IO, IO, Some(token.clone()));
        c
    };
    let mut observer = TcpClient::connect(&client_cfg(Role::Observer, 0)).map_err(launch_error)?;
    let empty = rss_mb(Some(pid)).unwrap_or(0.0);
    // Every worker connects and pulls once, then all wait; the shard is measured idle; then
    // all run until told to stop.
    let (ready, go) = (
        Arc::new(Barrier::new(workers + 1)),
        Arc::new(Barrier::new(workers + 1)),
    );
    let stop = Arc::new(AtomicBool::new(false));
    let sync = cfg.sync;
    let threads: Vec<_> = (0..workers)
        .map(|rank| {
            let c = client_cfg(Role::Worker, rank);
            let (ready, go, stop) = (ready.clone(), go.clone(), stop.clone());
            std::thread::spawn(move || worker(&c, &ready, &go, &stop, sync))
        })
        .collect();
    ready.wait();
    let idle = rss_mb(Some(pid)).unwrap_or(0.0);
    let cpu_before = cpu_seconds(Some(pid)).unwrap_or((0.0, 0.0));
    let before = observer.stats().map_err(launch_error)?;
    let started = Instant::now();
    go.wait();
    std::thread::sleep(Duration::from_secs_f64(cfg.seconds));
    stop.store(true, Ordering::Relaxed);
    let (mut pulls, mut pushes) = (Vec::new(), Vec::new());
    for t in threads {
        let joined = t.join();
        let (p, q) = joined.map_err(|_| TrainError::Launch("a fleet worker panicked".into()))??;
        pulls.extend(p);
        pushes.extend(q);
    }
    let wall = started.elapsed().as_secs_f64();
    let cpu_after = cpu_seconds(Some(pid)).unwrap_or((0.0, 0.0));
    let after = observer.stats().map_err(launch_error)?;
    let end = rss_mb(Some(pid)).unwrap_or(0.0);
    shard.kill();
    let applied: Vec<f64> = (after[0].workers.iter().zip(&before[0].workers))
        .map(|(a, b)| a.applied.saturating_sub(b.applied) as f64)
        .collect();
    let cpu = (cpu_after.0 + cpu_after.1) - (cpu_before.0 + cpu_before.1);
    let memory = (empty, idle, end);
    Ok(summarize(cfg, wall, cpu, &applied, (pulls, pushes), memory))
}

/// The point from what was measured: the run's seconds, the shard's CPU seconds, each
/// worker's applied gradients, the latencies, and the shard's memory (empty, idle, end).
fn summarize(
    cfg: &FleetConfig,
    wall: f64,
    cpu: f64,
    applied: &[f64],
    (pulls, mut pushes): Latencies,
    (empty, idle, end): (f64, f64, f64),
) -> FleetPoint {
    let workers = applied.len();
    let total: f64 = applied.iter().sum();
    let mean = total / workers.max(1) as f64;
    let step_waits = cfg.sync.then(|| step_waits(&pulls));
    let mut pulls: Vec<f64> = pulls.into_iter().map(|(_, s)| s).collect();
    pulls.sort_by(f64::total_cmp);
    pushes.sort_by(f64::total_cmp);
    let ms = |v: f64| v * 1e3;
    let ratio =
        |f: fn(f64, f64) -> f64, init: f64| applied.iter().copied().fold(init, f) / mean.max(1e-9);
    FleetPoint {
        workers,
        model: cfg.model.clone(),
        mode: if cfg.sync { "sync" } else { "async" },
        seconds: wall,
        gradients_applied: total as u64,
        updates_per_s: total / wall.max(1e-9),
        shard_cpu_ms_per_gradient: ms(cpu / total.max(1.0)),
        pull_p50_ms: ms(percentile(&pulls, 0.5)),
        pull_p99_ms: ms(percentile(&pulls, 0.99)),
        push_p50_ms: ms(percentile(&pushes, 0.5)),
        push_p99_ms: ms(percentile(&pushes, 0.99)),
        shard_rss_empty_mb: empty,
        shard_rss_idle_mb: idle,
        shard_rss_end_mb: end,
        shard_kib_per_idle_worker: (idle - empty).max(0.0) * 1e6 / 1024.0 / workers.max(1) as f64,
        applied_min_over_mean: ratio(f64::min, f64::INFINITY),
        applied_max_over_mean: ratio(f64::max, 0.0),
        step_wait_p50_ms: step_waits.as_ref().map(|w| ms(percentile(w, 0.5))),
        step_wait_p99_ms: step_waits.as_ref().map(|w| ms(percentile(w, 0.99))),
    }
}

/// Each step's longest wait at the gate (pulls by the version they were answered with),
/// sorted.
fn step_waits(pulls: &[(u64, f64)]) -> Vec<f64> {
    let mut longest = std::collections::BTreeMap::new();
    for &(version, secs) in pulls {
        let w = longest.entry(version).or_insert(0.0f64);
        *w = w.max(secs);
    }
    let mut waits: Vec<f64> = longest.into_values().collect();
    waits.sort_by(f64::total_cmp);
    waits
}

fn no_stdout() -> TrainError {
    TrainError::Launch("the fleet's shard has no stdout".into())
}

/// Each pull's (version answered, seconds) and each push's seconds.
type Latencies = (Vec<(u64, f64)>, Vec<f64>);

/// One worker of the fleet: connects, pulls, waits for the start, then pulls and pushes
/// until `stop` (in sync, each pull waits at the gate for the step's last gradient).
fn worker(
    cfg: &ClientConfig,
    ready: &Barrier,
    go: &Barrier,
    stop: &AtomicBool,
    sync: bool,
) -> Result<Latencies, TrainError> {
    let connected = TcpClient::connect(cfg).map_err(launch_error);
    let mut params = vec![0.0f32; cfg.layout.len()];
    let first = connected.and_then(|mut c| {
        let v = c
            .pull(&mut params, None, false)
            .map_err(client_error)?
            .version;
        Ok((c, v))
    });
    // The barriers are passed whatever happened, so that a failure is reported, not hung.
    ready.wait();
    go.wait();
    let (mut client, mut version) = first?;
    let grad = vec![1e-3f32; params.len()];
    let (mut pulls, mut pushes) = (Vec::new(), Vec::new());
    while !stop.load(Ordering::Relaxed) {
        let t = Instant::now();
        let meta = PushMeta {
            rank: cfg.rank,
            base_version: version,
            samples: 1,
            loss: 0.0,
            accumulated: false,
        };
        client.push(meta, &grad).map_err(client_error)?;
        pushes.push(t.elapsed().as_secs_f64());
        let t = Instant::now();
        version = client
            .pull(&mut params, Some(version), sync)
            .map_err(client_error)?
            .version;
        pulls.push((version, t.elapsed().as_secs_f64()));
    }
    let _ = client.leave();
    Ok((pulls, pushes))
}

fn client_error(e: pstrain_core::ClientError) -> TrainError {
    TrainError::Launch(e.to_string())
}
