//! `pstrain train --transport tcp`: the same run as separate local processes, S server shards
//! and N workers on 127.0.0.1, supervised from this process (`Supervisor`), with injected
//! faults (`Fault`) for the recovery tests.

use crate::flags::server::server_argv;
use crate::flags::token::TOKEN_ENV;
use crate::flags::worker::worker_argv;
use crate::launch::churn::ChurnTrace;
pub use crate::launch::cluster_config::{ClusterConfig, Relay, WORKER_RESTARTS};
pub use crate::launch::fault::Fault;
use crate::launch::process::{read_address, Proc};
use crate::launch::supervisor::{parse_report, Supervisor};
use crate::report::usage::UsageTracker;
use crate::report::Observer;
use crate::run::{TrainConfig, TrainError, TrainOutcome};
use pstrain_compute::mnist::Mnist;
use pstrain_net::RunToken;
use std::io::Read;
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

const TICK: Duration = Duration::from_millis(200);
/// How often, within a tick, the launcher looks for workers that exited.
const EXIT_POLL: Duration = Duration::from_millis(10);
/// How long a shard may take to exit once the run is over.
const SERVER_GRACE: Duration = Duration::from_secs(30);

/// A worker process and the thread collecting its stdout (its JSON report).
pub(super) struct WorkerProc {
    pub(super) proc: Proc,
    output: JoinHandle<String>,
    /// Killed by a fault (no report expected), or frozen (killed at the end).
    pub(super) killed: bool,
    frozen: bool,
}

/// The processes of one local run.
pub(super) struct LocalCluster<'a> {
    cluster: &'a ClusterConfig,
    token: RunToken,
    shard_args: Vec<String>,
    worker_args: Vec<String>,
    /// Shard 0's `--metrics-addr`.
    metrics_addr: Option<String>,
    shards: Vec<Proc>,
    addresses: Vec<String>,
    pub(super) workers: Vec<WorkerProc>,
    /// Per rank, how many times its worker was started again after failing.
    restarts: Vec<usize>,
    /// Memory and CPU time of the run's processes, sampled every tick and as a worker exits.
    usage: UsageTracker,
    /// Workers leaving and coming back (`--churn`).
    pub(super) churn: Option<ChurnTrace>,
}

impl<'a> LocalCluster<'a> {
    /// Samples the memory and CPU time of every shard and worker process running now.
    fn sample_usage(&mut self) {
        for (i, s) in self.shards.iter().enumerate() {
            self.usage.sample(&format!("shard {i}"), s.child.id());
        }
        for (rank, w) in self.workers.iter().enumerate() {
            self.usage
                .sample(&format!("worker {rank}"), w.proc.child.id());
        }
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
            metrics_addr: cfg.metrics_addr.clone(),
            shards: Vec::new(),
            addresses: Vec::new(),
            workers: Vec::new(),
            restarts: Vec::new(),
            churn: cluster.churn.map(|c| ChurnTrace::new(c, Instant::now())),
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
        // Shard 0 serves the run's /metrics and live page.
        if let (0, Some(addr)) = (shard, &self.metrics_addr) {
            cmd.args(["--metrics-addr", addr]);
        }
        let mut proc = Proc::spawn(name.clone(), &mut cmd)?;
        let stdout = proc
            .child
            .stdout
            .take()
            .ok_or_else(|| TrainError::Launch(format!("{name}: no stdout")))?;
        let addr = read_address(&name, stdout)?;
        Ok((proc, addr))
    }

    /// Starts a worker with `rank`, or with `--rank auto` (a replacement) for `None`.
    pub(super) fn launch_worker(&self, rank: Option<usize>) -> Result<WorkerProc, TrainError> {
        let mut cmd = match self.cluster.worker_wrapper.split_first() {
            Some((program, prefix)) => {
                let mut c = Command::new(program);
                c.args(prefix).arg(&self.cluster.exe);
                c
            }
            None => Command::new(&self.cluster.exe),
        };
        let dial: Vec<String> = match &self.cluster.relay {
            Some(relay) => self.addresses.iter().map(|a| relay(a)).collect(),
            None => self.addresses.clone(),
        };
        let rank_arg = rank.map_or("auto".to_string(), |r| r.to_string());
        cmd.env(TOKEN_ENV, self.token.to_hex())
            .arg("worker")
            .args(["--servers", &dial.join(",")])
            .args(["--rank", &rank_arg])
            .args(&self.worker_args);
        let mut proc = Proc::spawn(format!("worker {rank_arg}"), &mut cmd)?;
        let mut out = proc.child.stdout.take();
        let output = std::thread::spawn(move || {
            let mut text = String::new();
            if let Some(o) = out.as_mut() {
                let _ = o.read_to_string(&mut text);
            }
            text
        });
        Ok(WorkerProc {
            proc,
            output,
            killed: false,
            frozen: false,
        })
    }

    fn apply(&mut self, fault: Fault) -> Result<(), TrainError> {
        match fault {
            Fault::KillWorker {
                rank,
                restart_after,
                ..
            } if rank < self.workers.len() => {
                self.workers[rank].proc.kill();
                self.workers[rank].killed = true;
                if let Some(pause) = restart_after {
                    std::thread::sleep(pause);
                    self.workers[rank] = self.launch_worker(Some(rank))?;
                }
            }
            Fault::CrashWorker { rank, .. } if rank < self.workers.len() => {
                // Unannounced: the launcher finds a failed worker, as after a real crash.
                self.workers[rank].proc.kill();
            }
            Fault::ReplaceWorker { rank, after, .. } if rank < self.workers.len() => {
                self.workers[rank].proc.kill();
                std::thread::sleep(after);
                // Its slot is the vacated rank's: the report must say it took that rank.
                self.workers[rank] = self.launch_worker(None)?;
            }
            Fault::FreezeWorker { rank, .. } if rank < self.workers.len() => {
                let pid = self.workers[rank].proc.child.id().to_string();
                let stopped = Command::new("kill")
                    .args(["-STOP", &pid])
                    .status()
                    .is_ok_and(|s| s.success());
                if !stopped {
                    return Err(TrainError::Launch(format!("cannot stop worker {rank}")));
                }
                self.workers[rank].frozen = true;
                self.workers[rank].killed = true;
            }
            Fault::KillShard {
                shard, down_for, ..
            } if shard < self.shards.len() => {
                self.shards[shard].kill();
                std::thread::sleep(down_for);
                let (proc, _) = self.launch_shard(shard, &self.addresses[shard].clone())?;
                self.shards[shard] = proc;
            }
            _ => {}
        }
        Ok(())
    }

    /// Workers still running. One that failed (not killed by a fault, the run not stopped)
    /// is started again with its rank, up to `worker_restarts` times; then it is an error.
    fn running(&mut self, stopped: bool) -> Result<usize, TrainError> {
        let (mut running, mut failed, mut finished) = (0, Vec::new(), false);
        for (rank, w) in self
            .workers
            .iter_mut()
            .enumerate()
            .filter(|(_, w)| !w.frozen)
        {
            let pid = w.proc.child.id();
            if crate::report::usage::exited(pid) {
                // Its final figures, readable until it is reaped below.
                self.usage.sample(&format!("worker {rank}"), pid);
            }
            match w.proc.child.try_wait() {
                Ok(None) => running += 1,
                Ok(Some(status)) if status.success() => finished = true,
                Ok(Some(_)) if stopped || w.killed => {}
                Ok(Some(status)) => failed.push((rank, status)),
                Err(e) => return Err(TrainError::Launch(format!("{}: {e}", w.proc.name))),
            }
        }
        for (rank, status) in failed {
            self.restarts.resize(self.workers.len(), 0);
            let name = &self.workers[rank].proc.name;
            if self.restarts[rank] >= self.cluster.worker_restarts {
                return Err(TrainError::Launch(format!(
                    "{name} exited with {status} (started again {} times)",
                    self.restarts[rank]
                )));
            }
            self.restarts[rank] += 1;
            eprintln!(
                "{name} exited with {status}; starting it again ({} of {})",
                self.restarts[rank], self.cluster.worker_restarts
            );
            self.workers[rank] = self.launch_worker(Some(rank))?;
            running += 1;
        }
        // A worker that finished means the run is over: whoever churned away stays away;
        // until then they are due back, so the run is not over without them.
        let churn = self.churn.as_mut().filter(|_| !stopped);
        Ok(running + churn.map_or(0, |c| if finished { c.end() } else { c.pending() }))
    }

    /// Kills frozen workers and reads every report; returns the gradients they say went
    /// unapplied. A worker started for rank r must have run as rank r.
    fn collect_reports(&mut self, stopped: bool) -> Result<u64, TrainError> {
        let mut unapplied = 0;
        for (rank, w) in std::mem::take(&mut self.workers).into_iter().enumerate() {
            let mut w = w;
            if w.frozen {
                // A frozen worker never ends by itself (and holds its output pipe open).
                w.proc.kill();
            }
            let text = w.output.join().unwrap_or_default();
            match parse_report(&text) {
                Some(r) if r.rank != rank => {
                    return Err(TrainError::Launch(format!(
                        "the worker started for rank {rank} ran as rank {}",
                        r.rank
                    )))
                }
                Some(r) => unapplied += r.not_applied,
                None if stopped || w.killed => {}
                None => {
                    return Err(TrainError::Launch(format!(
                        "worker {rank} printed no report"
                    )))
                }
            }
        }
        Ok(unapplied)
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
    if cluster.shards == 0 {
        return Err(TrainError::Launch("at least one shard is needed".into()));
    }
    let mut local = LocalCluster::start_shards(cfg, cluster)?;
    let mut supervisor =
        Supervisor::connect(cfg, local.addresses.clone(), Some(local.token.clone()))?;
    for rank in 0..cfg.plan.workers {
        let worker = local.launch_worker(Some(rank))?;
        local.workers.push(worker);
    }
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
