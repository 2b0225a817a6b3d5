//! The worker processes of a local run: one per worker, or one per block of ranks ("light
//! workers", `--workers-per-process`); started, watched, restarted when they fail, and read
//! for their reports at the end.

use super::cluster::LocalCluster;
use crate::flags::token::TOKEN_ENV;
use crate::launch::churn::{Churn, ChurnTrace};
use crate::launch::process::{Ending, Proc};
use crate::run::compute_gate::device_cores;
use crate::run::error::EXIT_NOT_RESTARTABLE;
use crate::run::worker::parse_reports;
use crate::run::TrainError;
use std::io::{Read, Write};
use std::ops::Range;
use std::process::{ChildStdin, Command};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// A worker process (one or several ranks) and the thread collecting its stdout (a JSON
/// report per rank).
pub(super) struct WorkerProc {
    pub(super) proc: Proc,
    /// The ranks it runs (one, or a block of light workers).
    pub(super) ranks: Range<usize>,
    output: JoinHandle<String>,
    /// Where a process of light workers takes the churn's `leave R` / `back R`.
    control: Option<ChildStdin>,
    /// Killed by a fault (no report expected), or frozen (killed at the end).
    pub(super) killed: bool,
    pub(super) frozen: bool,
}

impl WorkerProc {
    /// The name its usage is filed under.
    fn usage_name(&self) -> String {
        match self.ranks.len() {
            1 => format!("worker {}", self.ranks.start),
            _ => format!("workers {}-{}", self.ranks.start, self.ranks.end - 1),
        }
    }

    /// Tells a process of light workers that worker `rank` leaves (`away`) or comes back.
    pub(super) fn send(&mut self, rank: usize, away: bool) -> Result<(), TrainError> {
        let verb = if away { "leave" } else { "back" };
        let sent = match self.control.as_mut() {
            Some(pipe) => writeln!(pipe, "{verb} {rank}").and_then(|()| pipe.flush()),
            None => Ok(()),
        };
        sent.map_err(|e| TrainError::Launch(format!("{}: {e}", self.proc.name)))
    }
}

impl LocalCluster<'_> {
    /// The process running `rank`.
    pub(super) fn process_of(&self, rank: usize) -> Option<usize> {
        self.workers.iter().position(|w| w.ranks.contains(&rank))
    }

    /// Starts every worker: one process per rank, or per block of `per_process` ranks.
    pub(super) fn launch_workers(&mut self, workers: usize) -> Result<(), TrainError> {
        let per = self.cluster.workers_per_process.max(1);
        self.away = vec![false; workers];
        // The churn and the late joiners share one trace of who is away until when.
        let (churn, late, now) = (self.cluster.churn, self.cluster.late, Instant::now());
        if churn.is_some() || late.is_some() {
            let no_churn = Churn {
                leave_per_minute: 0.0,
                away: Duration::ZERO,
                seed: 0,
            };
            self.churn = Some(ChurnTrace::new(churn.unwrap_or(no_churn), now));
        }
        let late = match (late, self.churn.as_mut()) {
            (Some(l), Some(trace)) => trace.join_late(l, workers, now),
            _ => workers..workers,
        };
        late.clone().for_each(|r| self.away[r] = true);
        for first in (0..workers).step_by(per) {
            let count = per.min(workers - first);
            if count == 1 && late.contains(&first) {
                continue; // Started when the trace says it joins.
            }
            let proc = self.launch_worker(Some(first), count)?;
            self.workers.push(proc);
        }
        Ok(())
    }

    /// Starts `count` workers from rank `first` (one process), or with `--rank auto` (a
    /// replacement) for `None`.
    pub(super) fn launch_worker(
        &self,
        first: Option<usize>,
        count: usize,
    ) -> Result<WorkerProc, TrainError> {
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
        let rank_arg = first.map_or("auto".to_string(), |r| r.to_string());
        cmd.env(TOKEN_ENV, self.token.to_hex())
            .arg("worker")
            .args(["--servers", &dial.join(",")])
            .args(["--rank", &rank_arg])
            .args(&self.worker_args);
        let light = count > 1;
        if light {
            // The processes share the machine's cores between them.
            let processes = self.away.len().div_ceil(count).max(1);
            let slots = (device_cores() / (processes * self.threads)).max(1);
            cmd.args(["--count", &count.to_string(), "--stdin-control"])
                .args(["--compute-slots", &slots.to_string()]);
            let first = first.unwrap_or(0);
            let away: Vec<String> = (first..first + count)
                .filter(|&r| self.away.get(r).is_some_and(|a| *a))
                .map(|r| r.to_string())
                .collect();
            if !away.is_empty() {
                cmd.args(["--start-away", &away.join(",")]);
            }
        }
        let name = match light {
            true => format!("workers {rank_arg}+{count}"),
            false => format!("worker {rank_arg}"),
        };
        let mut proc = Proc::spawn(name, &mut cmd, light, Ending::Kill)?;
        let control = proc.child.stdin.take();
        let mut out = proc.child.stdout.take();
        let output = std::thread::spawn(move || {
            let mut text = String::new();
            if let Some(o) = out.as_mut() {
                let _ = o.read_to_string(&mut text);
            }
            text
        });
        let first = first.unwrap_or(0);
        Ok(WorkerProc {
            proc,
            ranks: first..first + count,
            output,
            control,
            killed: false,
            frozen: false,
        })
    }

    /// Starts process `i` again with its ranks.
    pub(super) fn relaunch(&mut self, i: usize) -> Result<(), TrainError> {
        // Those away stay away in the new process (`--start-away`) until called back.
        let ranks = self.workers[i].ranks.clone();
        self.workers[i] = self.launch_worker(Some(ranks.start), ranks.len())?;
        Ok(())
    }

    /// Samples the memory and CPU time of the worker processes running now.
    pub(super) fn sample_worker_usage(&mut self) {
        for w in &self.workers {
            self.usage.sample(&w.usage_name(), w.proc.child.id());
        }
    }

    /// Processes still running. One that failed (not killed by a fault, the run not stopped)
    /// is started again with its ranks, up to `worker_restarts` times; then it is an error.
    pub(super) fn running(&mut self, stopped: bool) -> Result<usize, TrainError> {
        let (mut running, mut failed, mut finished) = (0, Vec::new(), false);
        for (i, w) in self
            .workers
            .iter_mut()
            .enumerate()
            .filter(|(_, w)| !w.frozen)
        {
            let pid = w.proc.child.id();
            if crate::report::usage::exited(pid) {
                // Its final figures, readable until it is reaped below.
                self.usage.sample(&w.usage_name(), pid);
            }
            match w.proc.child.try_wait() {
                Ok(None) => running += 1,
                Ok(Some(status)) if status.success() => finished = true,
                Ok(Some(_)) if stopped || w.killed => {}
                Ok(Some(status)) if status.code() == Some(EXIT_NOT_RESTARTABLE.into()) => {
                    return Err(TrainError::Launch(format!(
                        "{} ended the run with an error that starting it again cannot mend \
                         (above)",
                        w.proc.name
                    )));
                }
                Ok(Some(status)) => failed.push((i, status)),
                Err(e) => return Err(TrainError::Launch(format!("{}: {e}", w.proc.name))),
            }
        }
        for (i, status) in failed {
            self.restarts.resize(self.workers.len(), 0);
            let name = self.workers[i].proc.name.clone();
            if self.restarts[i] >= self.cluster.worker_restarts {
                return Err(TrainError::Launch(format!(
                    "{name} exited with {status} (started again {} times)",
                    self.restarts[i]
                )));
            }
            self.restarts[i] += 1;
            pstrain_observe::log_line!(
                "{name} exited with {status}; starting it again ({} of {})",
                self.restarts[i],
                self.cluster.worker_restarts
            );
            self.relaunch(i)?;
            running += 1;
        }
        // A worker that finished means the run is over: whoever churned away stays away;
        // until then they are due back, so the run is not over without them.
        let pending = match self.churn.as_mut().filter(|_| !stopped) {
            Some(c) if finished => {
                c.end();
                0
            }
            Some(c) => c.pending(),
            None => 0,
        };
        if finished {
            self.call_everyone_back();
        }
        Ok(running + pending)
    }

    /// The run is over: light workers still away rejoin, find it over and report.
    fn call_everyone_back(&mut self) {
        for rank in 0..self.away.len() {
            if std::mem::take(&mut self.away[rank]) {
                if let Some(i) = self.process_of(rank) {
                    // A process that exited meanwhile has nobody left to call back.
                    let _ = self.workers[i].send(rank, false);
                }
            }
        }
    }

    /// Kills frozen workers and reads every report; returns the gradients they say went
    /// unapplied. A process started for ranks r.. must have run as those ranks.
    pub(super) fn collect_reports(&mut self, stopped: bool) -> Result<u64, TrainError> {
        let mut unapplied = 0;
        for mut w in std::mem::take(&mut self.workers) {
            if w.frozen {
                // A frozen worker never ends by itself (and holds its output pipe open).
                w.proc.kill();
            }
            drop(w.control.take());
            let text = w.output.join().unwrap_or_default();
            let reports = parse_reports(&text);
            for rank in w.ranks.clone() {
                match reports.iter().find(|r| r.rank == rank) {
                    Some(r) => unapplied += r.not_applied,
                    None if stopped || w.killed => {}
                    None if reports.len() == 1 && w.ranks.len() == 1 => {
                        return Err(TrainError::Launch(format!(
                            "the worker started for rank {rank} ran as rank {}",
                            reports[0].rank
                        )))
                    }
                    None => {
                        return Err(TrainError::Launch(format!(
                            "worker {rank} printed no report"
                        )))
                    }
                }
            }
        }
        Ok(unapplied)
    }
}
