//! `pstrain train --transport tcp`: the same run as separate local processes, S server shards
//! and N workers on 127.0.0.1, with this process as the monitor (an observer client).

use crate::metrics::Summary;
use crate::monitor::{Monitor, ServerView};
use crate::train::{CheckpointPolicy, Observer, Schedule, TrainConfig, TrainError, TrainOutcome};
use crate::worker::WorkerReport;
use pstrain_compute::mnist::Mnist;
use pstrain_core::{Aggregate, Mode, OptimizerConfig, ServerStats};
use pstrain_net::{ClientConfig, Role, TcpClient};
use std::io::{BufRead, BufReader, Read};
use std::path::PathBuf;
use std::process::{Child, ChildStdout, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::sync::Arc;
use std::time::{Duration, Instant};

const TICK: Duration = Duration::from_millis(200);
/// How long a shard may take to print its address, and to exit once the run is over.
const SERVER_GRACE: Duration = Duration::from_secs(30);

/// A failure injected into a local cluster, for testing recovery with real processes.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Fault {
    /// `kill -9` worker `rank` once the servers reach `at_update` updates; with
    /// `restart_after`, start a new process with the same rank that long after (it pulls the
    /// latest weights and rejoins).
    KillWorker {
        rank: usize,
        at_update: u64,
        restart_after: Option<Duration>,
    },
    /// `kill -9` shard `shard` at `at_update`, and start it again on the same address after
    /// `down_for` (it reloads its newest checkpoint).
    KillShard {
        shard: usize,
        at_update: u64,
        down_for: Duration,
    },
    /// `kill -STOP` worker `rank` at `at_update`: alive but silent, as a hung host is. It is
    /// killed when the run ends.
    FreezeWorker { rank: usize, at_update: u64 },
    /// `kill -9` worker `rank` at `at_update` and start a replacement with `--rank auto`
    /// `after` later: it must take the vacated rank.
    ReplaceWorker {
        rank: usize,
        at_update: u64,
        after: Duration,
    },
}

/// Maps a shard's bound address to the address workers dial.
pub type Relay = Arc<dyn Fn(&str) -> String + Send + Sync>;

#[derive(Clone)]
pub struct ClusterConfig {
    /// The `pstrain` executable to launch.
    pub exe: PathBuf,
    pub shards: usize,
    /// The data folder the workers load (the monitor gets the data set from the caller).
    pub data_dir: PathBuf,
    /// The host the shards listen on, each on a free port.
    pub listen_host: String,
    /// Prepended to each worker's command line (e.g. `ip netns exec NAME`).
    pub worker_wrapper: Vec<String>,
    /// Where workers should dial a shard, if not its own address (a proxy, a NAT).
    pub relay: Option<Relay>,
    /// Shard checkpoints (restored when a shard restarts).
    pub checkpoint: Option<CheckpointPolicy>,
    /// Failures to inject, in order of `at_update`.
    pub faults: Vec<Fault>,
    /// The shards' `--heartbeat-timeout`, if not their default.
    pub heartbeat_timeout: Option<Duration>,
}

impl ClusterConfig {
    /// Everything on 127.0.0.1, workers dialing the shards directly.
    pub fn local(exe: PathBuf, shards: usize, data_dir: PathBuf) -> Self {
        ClusterConfig {
            exe,
            shards,
            data_dir,
            listen_host: "127.0.0.1".into(),
            worker_wrapper: Vec::new(),
            relay: None,
            checkpoint: None,
            faults: Vec::new(),
            heartbeat_timeout: None,
        }
    }
}

/// The `pstrain server` flags for every shard of `cfg`'s run over `shards` shards and a
/// training set of `train_len` samples; the launcher adds `--listen` and `--shard`.
pub fn server_args(
    cfg: &TrainConfig,
    shards: usize,
    train_len: usize,
    checkpoint: Option<&CheckpointPolicy>,
) -> Vec<String> {
    let mut a = run_args(cfg);
    a.extend([
        "--shards".into(),
        shards.to_string(),
        "--train-samples".into(),
        train_len.to_string(),
    ]);
    if let Some(p) = checkpoint {
        a.extend(checkpoint_args(p));
    }
    a
}

/// The `pstrain worker` flags for every worker of `cfg`'s run; the launcher adds `--servers`
/// and `--rank`.
pub fn worker_args(cfg: &TrainConfig, data_dir: Option<&std::path::Path>) -> Vec<String> {
    let mut a = run_args(cfg);
    a.extend(["--threads".into(), cfg.threads.to_string()]);
    if let Some(dir) = data_dir {
        a.extend(["--data-dir".into(), dir.display().to_string()]);
    }
    a
}

/// The command-line flags that reproduce `cfg`'s run in a `server` or `worker` process.
fn run_args(cfg: &TrainConfig) -> Vec<String> {
    let mut a: Vec<String> = Vec::new();
    let mut flag = |name: &str, value: String| {
        a.push(format!("--{name}"));
        a.push(value);
    };
    match cfg.mode {
        Mode::Sync { backup_workers } => {
            flag("mode", "sync".into());
            flag("backup-workers", backup_workers.to_string());
        }
        Mode::Async { max_staleness } => {
            flag("mode", "async".into());
            flag("max-staleness", max_staleness.unwrap_or(0).to_string());
        }
    }
    flag("workers", cfg.workers.to_string());
    flag("model", cfg.model.name().into());
    flag("epochs", cfg.epochs.to_string());
    if let Some(n) = cfg.iterations {
        flag("iterations", n.to_string());
    }
    flag("batch-size", cfg.batch_size.to_string());
    match cfg.optimizer {
        OptimizerConfig::Sgd {
            lr,
            momentum,
            weight_decay,
            ..
        } => {
            if momentum > 0.0 {
                flag("optimizer", "momentum".into());
                flag("momentum", momentum.to_string());
            } else {
                flag("optimizer", "sgd".into());
            }
            flag("lr", lr.to_string());
            flag("weight-decay", weight_decay.to_string());
        }
        OptimizerConfig::Adam {
            lr, weight_decay, ..
        } => {
            flag("optimizer", "adam".into());
            flag("lr", lr.to_string());
            flag("weight-decay", weight_decay.to_string());
        }
    }
    flag(
        "lr-schedule",
        match cfg.schedule {
            Schedule::Constant => "constant",
            Schedule::Cosine => "cosine",
        }
        .into(),
    );
    flag(
        "aggregate",
        match cfg.aggregate {
            Aggregate::Mean => "mean",
            Aggregate::Sum => "sum",
        }
        .into(),
    );
    flag("seed", cfg.seed.to_string());
    a
}

/// A child process that is killed if it is still running when this guard drops.
struct Proc {
    name: String,
    child: Child,
}

impl Drop for Proc {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

fn spawn(name: String, cmd: &mut Command) -> Result<Proc, TrainError> {
    let child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .map_err(|e| TrainError::Cluster(format!("cannot start {name}: {e}")))?;
    Ok(Proc { name, child })
}

/// Reads the "listening on ADDR" line a shard prints once bound.
fn read_address(name: &str, stdout: ChildStdout) -> Result<String, TrainError> {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let mut reader = BufReader::new(stdout);
        let mut line = String::new();
        let _ = tx.send(reader.read_line(&mut line).map(|_| line));
        // Keep draining so the shard never blocks on a full pipe.
        let _ = std::io::copy(&mut reader, &mut std::io::sink());
    });
    let line = rx
        .recv_timeout(SERVER_GRACE)
        .map_err(|_| TrainError::Cluster(format!("{name} did not report its address")))?
        .map_err(|e| TrainError::Cluster(format!("{name}: {e}")))?;
    line.trim()
        .strip_prefix("listening on ")
        .map(str::to_string)
        .ok_or_else(|| TrainError::Cluster(format!("{name} failed to start (said {line:?})")))
}

/// The `pstrain server` flags that make a shard checkpoint (and restore) as `policy` says.
fn checkpoint_args(policy: &CheckpointPolicy) -> Vec<String> {
    let mut a = vec![
        "--checkpoint-dir".to_string(),
        policy.dir.display().to_string(),
        "--keep-checkpoints".into(),
        policy.keep.to_string(),
    ];
    if let Some(n) = policy.every_updates {
        a.extend(["--checkpoint-every".into(), n.to_string()]);
    }
    if let Some(d) = policy.every {
        a.extend(["--checkpoint-secs".into(), d.as_secs_f64().to_string()]);
    }
    a
}

/// The monitor's window on the shards: an observer connection to each.
pub struct RemoteView {
    client: TcpClient,
    buf: Vec<f32>,
}

impl RemoteView {
    /// Joins every shard of `cfg`'s run as an observer.
    pub fn connect(cfg: &TrainConfig, servers: Vec<String>) -> Result<Self, TrainError> {
        let layout = cfg.model.build(Default::default()).layout().clone();
        let observer_cfg =
            ClientConfig::new(servers, Role::Observer, 0, cfg.workers, cfg.mode, layout);
        Ok(RemoteView {
            client: TcpClient::connect(&observer_cfg)?,
            buf: vec![0.0; observer_cfg.layout.len()],
        })
    }
}

/// A worker's JSON report: the last line of its output that parses as one.
pub fn parse_report(text: &str) -> Option<WorkerReport> {
    text.lines()
        .rev()
        .find_map(|l| serde_json::from_str::<WorkerReport>(l).ok())
}

/// Gradients the workers say went unapplied, from their JSON reports; `None` if a report is
/// unreadable.
pub fn not_applied<'a>(reports: impl IntoIterator<Item = &'a str>) -> Option<u64> {
    reports
        .into_iter()
        .map(|text| parse_report(text).map(|r| r.not_applied))
        .sum()
}

impl ServerView for RemoteView {
    fn stats(&mut self) -> Result<ServerStats, TrainError> {
        let shards = self.client.stats()?;
        // Every gradient goes to every shard: shard 0 counts updates and samples for all;
        // refusals can differ by shard (a NaN may sit in one slice), so take the largest.
        let mut stats = shards.first().map(|s| s.stats).unwrap_or_default();
        for s in &shards[1..] {
            stats.version = stats.version.min(s.stats.version);
            stats.dropped_stale = stats.dropped_stale.max(s.stats.dropped_stale);
            stats.rejected_nonfinite = stats.rejected_nonfinite.max(s.stats.rejected_nonfinite);
            stats.rejected_other = stats.rejected_other.max(s.stats.rejected_other);
        }
        Ok(stats)
    }

    fn snapshot(&mut self) -> Result<(ServerStats, Vec<f32>), TrainError> {
        self.client.pull_all(&mut self.buf, None, false)?;
        let stats = self.stats()?;
        Ok((stats, self.buf.clone()))
    }
}

/// Runs `cfg` as local processes; `data` is the same data set the workers load.
pub fn train_tcp(
    cfg: &TrainConfig,
    cluster: &ClusterConfig,
    data: &Mnist,
    observer: &mut dyn Observer,
    stop: &AtomicBool,
) -> Result<TrainOutcome, TrainError> {
    cfg.validate()?;
    if cluster.shards == 0 {
        return Err(TrainError::Cluster("at least one shard is needed".into()));
    }
    let shard_args = server_args(
        cfg,
        cluster.shards,
        data.train.len(),
        cluster.checkpoint.as_ref(),
    );
    let worker_flags = worker_args(cfg, Some(&cluster.data_dir));
    let launch_shard = |shard: usize, listen: &str| -> Result<(Proc, String), TrainError> {
        let name = format!("shard {shard}");
        let mut cmd = Command::new(&cluster.exe);
        cmd.arg("server")
            .args(["--listen", listen])
            .args(["--shard", &shard.to_string()])
            .args(&shard_args);
        if let Some(t) = cluster.heartbeat_timeout {
            cmd.args(["--heartbeat-timeout", &t.as_secs_f64().to_string()]);
        }
        let mut proc = spawn(name.clone(), &mut cmd)?;
        let stdout = proc
            .child
            .stdout
            .take()
            .ok_or_else(|| TrainError::Cluster(format!("{name}: no stdout")))?;
        let addr = read_address(&name, stdout)?;
        Ok((proc, addr))
    };
    let mut servers = Vec::new();
    let mut addresses = Vec::new();
    for shard in 0..cluster.shards {
        let (proc, addr) = launch_shard(shard, &format!("{}:0", cluster.listen_host))?;
        servers.push(proc);
        addresses.push(addr);
    }

    let mut view = RemoteView::connect(cfg, addresses.clone())?;

    let dial: Vec<String> = match &cluster.relay {
        Some(relay) => addresses.iter().map(|a| relay(a)).collect(),
        None => addresses.clone(),
    };
    let mut monitor = Monitor::new(cfg, data.train.len(), Instant::now());
    // Each worker's stdout (its JSON report) is collected on a thread so no pipe fills up.
    // `None`: a replacement that asks the shards for any free rank.
    let launch_worker =
        |rank: Option<usize>| -> Result<(Proc, std::thread::JoinHandle<String>), TrainError> {
            let mut cmd = match cluster.worker_wrapper.split_first() {
                Some((program, prefix)) => {
                    let mut c = Command::new(program);
                    c.args(prefix).arg(&cluster.exe);
                    c
                }
                None => Command::new(&cluster.exe),
            };
            let rank_arg = rank.map_or("auto".to_string(), |r| r.to_string());
            cmd.arg("worker")
                .args(["--servers", &dial.join(",")])
                .args(["--rank", &rank_arg])
                .args(&worker_flags);
            let mut proc = spawn(format!("worker {rank_arg}"), &mut cmd)?;
            let mut out = proc.child.stdout.take();
            let reader = std::thread::spawn(move || {
                let mut text = String::new();
                if let Some(o) = out.as_mut() {
                    let _ = o.read_to_string(&mut text);
                }
                text
            });
            Ok((proc, reader))
        };
    let mut workers = Vec::new();
    let mut outputs = Vec::new();
    for rank in 0..cfg.workers {
        let (proc, reader) = launch_worker(Some(rank))?;
        workers.push(proc);
        outputs.push(reader);
    }

    let mut running = cfg.workers;
    let mut stopped = false;
    let mut faults = cluster.faults.clone();
    let mut killed = vec![false; cfg.workers];
    let mut frozen = vec![false; cfg.workers];
    while running > 0 {
        std::thread::sleep(TICK);
        if stop.load(Ordering::Relaxed) && !stopped {
            stopped = true;
            for w in &mut workers {
                let _ = w.child.kill();
            }
        }
        if !faults.is_empty() {
            let version = view.stats()?.version;
            let (now, later): (Vec<Fault>, Vec<Fault>) =
                faults.into_iter().partition(|f| match f {
                    Fault::KillWorker { at_update, .. }
                    | Fault::KillShard { at_update, .. }
                    | Fault::FreezeWorker { at_update, .. }
                    | Fault::ReplaceWorker { at_update, .. } => version >= *at_update,
                });
            faults = later;
            for fault in now {
                match fault {
                    Fault::KillWorker {
                        rank,
                        restart_after,
                        ..
                    } if rank < workers.len() => {
                        let _ = workers[rank].child.kill();
                        let _ = workers[rank].child.wait();
                        killed[rank] = true;
                        if let Some(pause) = restart_after {
                            std::thread::sleep(pause);
                            let (proc, reader) = launch_worker(Some(rank))?;
                            workers[rank] = proc;
                            outputs[rank] = reader;
                            killed[rank] = false;
                        }
                    }
                    Fault::KillWorker { .. } => {}
                    Fault::ReplaceWorker { rank, after, .. } if rank < workers.len() => {
                        let _ = workers[rank].child.kill();
                        let _ = workers[rank].child.wait();
                        std::thread::sleep(after);
                        // Its slot is the vacated rank's: the report must say it took that rank.
                        let (proc, reader) = launch_worker(None)?;
                        workers[rank] = proc;
                        outputs[rank] = reader;
                    }
                    Fault::ReplaceWorker { .. } => {}
                    Fault::FreezeWorker { rank, .. } if rank < workers.len() => {
                        let pid = workers[rank].child.id().to_string();
                        let stopped = Command::new("kill")
                            .args(["-STOP", &pid])
                            .status()
                            .is_ok_and(|s| s.success());
                        if !stopped {
                            return Err(TrainError::Cluster(format!("cannot stop worker {rank}")));
                        }
                        frozen[rank] = true;
                        killed[rank] = true;
                    }
                    Fault::FreezeWorker { .. } => {}
                    Fault::KillShard {
                        shard, down_for, ..
                    } if shard < servers.len() => {
                        let _ = servers[shard].child.kill();
                        let _ = servers[shard].child.wait();
                        std::thread::sleep(down_for);
                        let (proc, _) = launch_shard(shard, &addresses[shard])?;
                        servers[shard] = proc;
                    }
                    Fault::KillShard { .. } => {}
                }
            }
        }
        running = 0;
        for (rank, w) in workers.iter_mut().enumerate() {
            if frozen[rank] {
                continue;
            }
            match w.child.try_wait() {
                Ok(None) => running += 1,
                Ok(Some(status)) if status.success() || stopped || killed[rank] => {}
                Ok(Some(status)) => {
                    return Err(TrainError::Cluster(format!(
                        "{} exited with {status}",
                        w.name
                    )))
                }
                Err(e) => return Err(TrainError::Cluster(format!("{}: {e}", w.name))),
            }
        }
        monitor.tick(&mut view, observer, &data.test)?;
    }
    let wall = monitor.start().elapsed();
    let (stats, record, params) = monitor.finish(&mut view, observer, &data.test)?;
    drop(view);

    // A frozen worker never ends by itself (and holds its output pipe open).
    for (rank, w) in workers.iter_mut().enumerate() {
        if frozen[rank] {
            let _ = w.child.kill();
            let _ = w.child.wait();
        }
    }
    let mut unapplied = 0;
    for (rank, out) in outputs.into_iter().enumerate() {
        let text = out.join().unwrap_or_default();
        match parse_report(&text) {
            Some(r) if r.rank != rank => {
                return Err(TrainError::Cluster(format!(
                    "the worker started for rank {rank} ran as rank {}",
                    r.rank
                )))
            }
            Some(r) => unapplied += r.not_applied,
            None if stopped || killed[rank] => {}
            None => {
                return Err(TrainError::Cluster(format!(
                    "worker {rank} printed no report"
                )))
            }
        }
    }
    // Shards exit by themselves once every worker and the monitor have left.
    let deadline = Instant::now() + SERVER_GRACE;
    for s in &mut servers {
        while matches!(s.child.try_wait(), Ok(None)) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
    }
    Ok(TrainOutcome {
        summary: Summary::new(cfg, &stats, &record, wall, stopped, unapplied),
        params,
    })
}
