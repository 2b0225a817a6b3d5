//! `pstrain train --transport tcp`: the same run as separate local processes, S server shards
//! and N workers on 127.0.0.1, supervised from this process (`Supervisor`), with injected
//! faults (`Fault`) for the recovery tests.

use crate::flags::server::server_argv;
use crate::flags::token::TOKEN_ENV;
use crate::flags::worker::worker_argv;
use crate::launch::churn::ChurnTrace;
pub use crate::launch::cluster_config::{ClusterConfig, Relay, WORKER_RESTARTS};
pub use crate::launch::fault::Fault;
use crate::launch::process::{read_address, Ending, Proc};
use crate::launch::supervisor::Supervisor;
use crate::launch::worker_procs::WorkerProc;
use crate::report::usage::UsageTracker;
use crate::report::Observer;
use crate::run::{TrainConfig, TrainError, TrainOutcome};
use pstrain_compute::mnist::Mnist;
use pstrain_net::RunToken;
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

const TICK: Duration = Duration::from_millis(200);
/// How often, within a tick, the launcher looks for workers that exited.
const EXIT_POLL: Duration = Duration::from_millis(10);
/// How long a shard may take to exit once the run is over.
const SERVER_GRACE: Duration = Duration::from_secs(30);

/// The processes of one local run.
pub(super) struct LocalCluster<'a> {
    pub(super) cluster: &'a ClusterConfig,
    pub(super) token: RunToken,
    shard_args: Vec<String>,
    pub(super) worker_args: Vec<String>,
    /// Compute threads of each worker.
    pub(super) threads: usize,
    /// Shard 0's `--metrics-addr`.
    metrics_addr: Option<String>,
    shards: Vec<Proc>,
    pub(super) addresses: Vec<String>,
    pub(super) workers: Vec<WorkerProc>,
    /// Per rank, whether it is away: churned away inside a process of light workers, or a
    /// late joiner not joined yet.
    pub(super) away: Vec<bool>,
    /// Per worker process, how many times it was started again after failing.
    pub(super) restarts: Vec<usize>,
    /// Memory and CPU time of the run's processes, sampled every tick and as a worker exits.
    pub(super) usage: UsageTracker,
    /// Workers leaving and coming back (`--churn`).
    pub(super) churn: Option<ChurnTrace>,
}

impl<'a> LocalCluster<'a> {
    /// Samples the memory and CPU time of every shard and worker process running now.
    fn sample_usage(&mut self) {
        for (i, s) in self.shards.iter().enumerate() {
            self.usage.sample(&format!("shard {i}"), s.child.id());
        }
        self.sample_worker_usage();
    }

    fn start_shards(cfg: &TrainConfig, cluster: &'a ClusterConfig) -> Result<Self, TrainError> {
        let mut shard_cfg = cfg.clone();
        shard_cfg.checkpoint = cluster.checkpoint.clone();
        let token = match &cluster.token {
            Some(t) => t.clone(),
            None => RunToken::generate().map_err(pstrain_net::NetError::from)?,
        };
        let mut local = LocalCluster {
            cluster,
            token,
            shard_args: server_argv(&shard_cfg, cluster.shards),
            worker_args: worker_argv(cfg, Some(&cluster.data_dir)),
            threads: cfg.threads.max(1),
            metrics_addr: cfg.metrics_addr.clone(),
            shards: Vec::new(),
            addresses: Vec::new(),
            workers: Vec::new(),
            away: Vec::new(),
            restarts: Vec::new(),
            churn: None,
            usage: UsageTracker::default(),
        };
        for shard in 0..cluster.shards {
            let (proc, addr) = local.launch_shard(shard, &format!("{}:0", cluster.listen_host))?;
            local.shards.push(proc);
            local.addresses.push(addr);
        }
        Ok(local)
    }

    fn launch_shard(&self, shard: usize, listen: &str) -> Result<(Proc, String), TrainError> {
        let name = format!("shard {shard}");
        let mut cmd = Command::new(&self.cluster.exe);
        cmd.env(TOKEN_ENV, self.token.to_hex())
            .arg("server")
            .args(["--listen", listen])
            .args(["--shard", &shard.to_string()])
            .args(&self.shard_args);
        if let Some(t) = self.cluster.heartbeat_timeout {
            cmd.args(["--heartbeat-timeout", &t.as_secs_f64().to_string()]);
        }
        // A token made for this launch dies with it: checkpoints sealed with it could not be
        // resumed (`--resume` launches with a new one). A token of the user's seals them.
        if self.cluster.token.is_none() && self.cluster.checkpoint.is_some() {
            cmd.arg("--unsealed");
        }
        // Shard 0 serves the run's /metrics and live page.
        if let (0, Some(addr)) = (shard, &self.metrics_addr) {
            cmd.args(["--metrics-addr", addr]);
        }
        let mut proc = Proc::spawn(name.clone(), &mut cmd, false, Ending::Stop)?;
        let stdout = proc
            .child
            .stdout
            .take()
            .ok_or_else(|| TrainError::Launch(format!("{name}: no stdout")))?;
        let addr = read_address(&name, stdout)?;
        Ok((proc, addr))
    }

    /// Applies an injected failure. A worker fault hits the process running that rank
    /// (with light workers, the whole block).
    fn apply(&mut self, fault: Fault) -> Result<(), TrainError> {
        let process = match fault {
            Fault::KillWorker { rank, .. }
            | Fault::CrashWorker { rank, .. }
            | Fault::ReplaceWorker { rank, .. }
            | Fault::FreezeWorker { rank, .. } => self.process_of(rank),
            Fault::KillShard { .. } => None,
        };
        match fault {
            Fault::KillWorker { restart_after, .. } => {
                let Some(i) = process else { return Ok(()) };
                self.workers[i].proc.kill();
                self.workers[i].killed = true;
                if let Some(pause) = restart_after {
                    std::thread::sleep(pause);
                    self.relaunch(i)?;
                }
            }
            Fault::CrashWorker { .. } => {
                // Unannounced: the launcher finds a failed worker, as after a real crash.
                if let Some(i) = process {
                    self.workers[i].proc.kill();
                }
            }
            Fault::ReplaceWorker { rank, after, .. } => {
                let Some(i) = process else { return Ok(()) };
                if self.workers[i].ranks.len() > 1 {
                    return Err(TrainError::Launch(
                        "a replacement worker (--rank auto) needs one worker per process".into(),
                    ));
                }
                self.workers[i].proc.kill();
                std::thread::sleep(after);
                // Its slot is the vacated rank's: the report must say it took that rank.
                let mut replacement = self.launch_worker(None, 1)?;
                replacement.ranks = rank..rank + 1;
                self.workers[i] = replacement;
            }
            Fault::FreezeWorker { rank, .. } => {
                let Some(i) = process else { return Ok(()) };
                let pid = self.workers[i].proc.child.id().to_string();
                let stopped = Command::new("kill")
                    .args(["-STOP", &pid])
                    .status()
                    .is_ok_and(|s| s.success());
                if !stopped {
                    return Err(TrainError::Launch(format!("cannot stop worker {rank}")));
                }
                self.workers[i].frozen = true;
                self.workers[i].killed = true;
            }
            Fault::KillShard {
                shard, down_for, ..
            } => {
                let Some(proc) = self.shards.get_mut(shard) else {
                    return Ok(());
                };
                proc.kill();
                std::thread::sleep(down_for);
                let (proc, _) = self.launch_shard(shard, &self.addresses[shard].clone())?;
                self.shards[shard] = proc;
            }
        }
        Ok(())
    }

    /// Shards exit by themselves once every worker and the supervisor have left.
    fn wait_for_shards(&mut self) {
        let deadline = Instant::now() + SERVER_GRACE;
        for s in &mut self.shards {
            while matches!(s.child.try_wait(), Ok(None)) && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(20));
            }
        }
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
    cfg.check_data(data.train.len())?;
    // Every worker process runs on this machine.
    cfg.check_memory(cfg.plan.workers)?;
    if cluster.shards == 0 {
        return Err(TrainError::Launch("at least one shard is needed".into()));
    }
    let mut local = LocalCluster::start_shards(cfg, cluster)?;
    let mut supervisor =
        Supervisor::connect(cfg, local.addresses.clone(), Some(local.token.clone()))?;
    local.launch_workers(cfg.plan.workers)?;
    let mut faults = cluster.faults.clone();
    let mut stopped = false;
    loop {
        // A tick, cut short when the last worker exits: the run's wall time ends there, not
        // up to a tick later.
        let tick = Instant::now();
        while tick.elapsed() < TICK && !stop.load(Ordering::Relaxed) && local.running(stopped)? > 0
        {
            std::thread::sleep(EXIT_POLL);
        }
        if stop.load(Ordering::Relaxed) && !stopped {
            stopped = true;
            local.workers.iter_mut().for_each(|w| w.proc.kill());
        }
        if !faults.is_empty() {
            let version = supervisor.version()?;
            let (now, later) = faults.into_iter().partition(|f| version >= f.at_update());
            faults = later;
            for fault in now {
                local.apply(fault)?;
            }
        }
        local.sample_usage();
        local.churn_tick(stopped)?;
        let running = local.running(stopped)?;
        supervisor.tick(observer, &data.test)?;
        if running == 0 {
            break;
        }
    }
    let unapplied = local.collect_reports(stopped)?;
    let mut outcome = supervisor.finish(cfg, observer, &data.test, unapplied, stopped)?;
    local.sample_usage();
    local.usage.sample("launcher", std::process::id());
    local.wait_for_shards();
    outcome.summary.processes = std::mem::take(&mut local.usage).into_vec();
    outcome.summary.churn = local.churn.map(|c| c.counts);
    Ok(outcome)
}
