//! `pstrain worker --count K`: K workers in one process ("light workers", to run a fleet on
//! one machine). The run is asked for once and their shards loaded in one pass over the
//! files; each worker still has its own rank, shard, model, connections and heartbeat, and
//! they take turns on the cores (`ComputeGate`). With `--stdin-control` the launcher's churn
//! reaches them: `leave R` makes worker R drop its connections with no goodbye (a device that
//! lost its network), `back R` makes it rejoin with its rank.

use crate::data::load_own_shards;
use crate::flags::worker::WorkerArgs;
use crate::launch::cluster_config::WORKER_RESTARTS;
use crate::launch::remote_worker::{prepare, Joining};
use crate::report::usage::peak_rss_mb;
use crate::run::compute_gate::{ComputeGate, GatedModel};
use crate::run::device_speed::DeviceSpeed;
use crate::run::worker::{train_until, WorkerData, WorkerReport};
use anyhow::{bail, Context, Result};
use pstrain_compute::mnist::Split;
use pstrain_core::client::ParameterClient;
use pstrain_net::{RunToken, ANY_RANK};
use std::io::BufRead;
use std::ops::Range;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, PoisonError};
use std::time::Duration;

/// How often a worker that is away looks whether the run stopped meanwhile.
const AWAY_POLL: Duration = Duration::from_millis(100);

/// Runs `args.count` workers from `args.rank` until their work is done or `stop` is set;
/// one report per worker, in rank order.
pub fn light_workers(
    args: &WorkerArgs,
    token: Option<RunToken>,
    stop: &AtomicBool,
) -> Result<Vec<WorkerReport>> {
    if args.rank == ANY_RANK {
        bail!("--count runs a block of ranks from --rank: give the first, not `auto`");
    }
    let joining = prepare(args, token)?;
    let plan = &joining.cfg.plan;
    let ranks = args.rank..args.rank + args.count as usize;
    if ranks.end > plan.workers {
        bail!(
            "--rank {} --count {} goes past the run's {} workers",
            args.rank,
            args.count,
            plan.workers
        );
    }
    let (shards, total) = load_own_shards(&args.data, plan.workers, ranks.clone(), plan.seed)?;
    joining
        .cfg
        .check_data(total)
        .context("the data set changed under the workers (--train-samples)")?;
    let gate = ComputeGate::new(args.compute_slots());
    let control = Arc::new(Control::new(ranks.clone()));
    // Late joiners (and workers away when this process was started again) start away,
    // until the launcher calls them.
    args.start_away.iter().for_each(|&r| control.set(r, true));
    if args.stdin_control {
        let control = control.clone();
        std::thread::spawn(move || control.follow(std::io::stdin().lock()));
    }
    let group = Group {
        args,
        joining: &joining,
        gate,
        control: &control,
        stop,
        total,
    };
    let reports = std::thread::scope(|s| {
        let handles: Vec<_> = (ranks.clone().zip(&shards))
            .map(|(rank, shard)| {
                let group = &group;
                s.spawn(move || group.run(rank, shard))
            })
            .collect();
        let joined: Vec<Result<WorkerReport>> = handles
            .into_iter()
            .map(|h| {
                h.join()
                    .unwrap_or_else(|_| bail!("a worker thread panicked"))
            })
            .collect();
        joined
    });
    if let Some(mb) = peak_rss_mb(None) {
        pstrain_observe::log_line!(
            "{} workers in one process: peak resident {mb:.1} MB, {:.2} MB per worker",
            args.count,
            mb / f64::from(args.count)
        );
    }
    reports.into_iter().collect()
}

/// What the workers of one process share.
struct Group<'a> {
    args: &'a WorkerArgs,
    joining: &'a Joining,
    gate: Arc<ComputeGate>,
    control: &'a Control,
    stop: &'a AtomicBool,
    /// The training set's size (the shards are this process's part of it).
    total: usize,
}

impl Group<'_> {
    /// Worker `rank`: joins, trains, and when the churn takes it away drops its connections,
    /// waits to be called back and joins again with its rank. A failure (a shard restarting,
    /// an eviction) costs a rejoin, up to `WORKER_RESTARTS` times.
    fn run(&self, rank: usize, shard: &Split) -> Result<WorkerReport> {
        let mut wcfg = self.joining.cfg.worker_config(rank);
        // A slow device's extra time is taken outside the compute gate, not in the loop.
        let speed = std::mem::replace(&mut wcfg.speed, DeviceSpeed::FULL);
        let inner = self.joining.model(self.args.threads())?;
        let mut model = GatedModel::new(inner, self.gate.clone(), speed);
        let data = WorkerData::OwnShard {
            samples: shard,
            of: self.total,
        };
        let stopped = || self.stop.load(Ordering::Relaxed);
        let mut report = WorkerReport::of(rank);
        let mut failures = 0;
        loop {
            if self.control.is_away(rank) {
                // Away (or not joined yet): nothing of this worker reaches the shards.
                self.control.wait_back(rank, self.stop);
            }
            let (mut client, heartbeat) = self.joining.join(self.args, rank)?;
            let until = || stopped() || self.control.is_away(rank);
            match train_until(&mut client, &mut model, data, &wcfg, &until) {
                Ok(part) => report.absorb(&part),
                Err(e) if failures < WORKER_RESTARTS && !stopped() => {
                    failures += 1;
                    pstrain_observe::log_line!(
                        "{e}; joining again ({failures} of {WORKER_RESTARTS})"
                    );
                    continue;
                }
                Err(e) => {
                    let _ = client.leave();
                    return Err(e.into());
                }
            }
            if self.control.is_away(rank) && !stopped() {
                // No goodbye: the shards find the connections gone.
                drop(heartbeat);
                drop(client);
                continue;
            }
            if !stopped() {
                // This worker's run is over, so is everyone's: nobody away need come back.
                self.control.end();
            }
            client.leave()?;
            return Ok(report);
        }
    }
}

/// Which of a process's workers are away (`leave R` / `back R` from the launcher).
struct Control {
    ranks: Range<usize>,
    away: Vec<AtomicBool>,
    /// The run is over: workers away stay away.
    ended: AtomicBool,
    lock: Mutex<()>,
    changed: Condvar,
}

impl Control {
    fn new(ranks: Range<usize>) -> Self {
        Control {
            away: ranks.clone().map(|_| AtomicBool::new(false)).collect(),
            ranks,
            ended: AtomicBool::new(false),
            lock: Mutex::new(()),
            changed: Condvar::new(),
        }
    }

    fn is_away(&self, rank: usize) -> bool {
        (rank.checked_sub(self.ranks.start))
            .and_then(|i| self.away.get(i))
            .is_some_and(|a| a.load(Ordering::Relaxed))
    }

    fn set(&self, rank: usize, away: bool) {
        let flag = (rank.checked_sub(self.ranks.start)).and_then(|i| self.away.get(i));
        if let Some(flag) = flag {
            let _held = self.lock.lock().unwrap_or_else(PoisonError::into_inner);
            flag.store(away, Ordering::Relaxed);
            self.changed.notify_all();
        }
    }

    fn end(&self) {
        let _held = self.lock.lock().unwrap_or_else(PoisonError::into_inner);
        self.ended.store(true, Ordering::Relaxed);
        self.changed.notify_all();
    }

    /// Waits until `rank` is called back (or the run ended, or `stop` is set).
    fn wait_back(&self, rank: usize, stop: &AtomicBool) {
        let mut held = self.lock.lock().unwrap_or_else(PoisonError::into_inner);
        while self.is_away(rank)
            && !self.ended.load(Ordering::Relaxed)
            && !stop.load(Ordering::Relaxed)
        {
            held = match self.changed.wait_timeout(held, AWAY_POLL) {
                Ok((h, _)) => h,
                Err(poisoned) => poisoned.into_inner().0,
            };
        }
    }

    /// Applies the launcher's lines until its pipe closes; then nobody is kept away.
    fn follow(&self, input: impl BufRead) {
        for line in input.lines() {
            let Ok(line) = line else { break };
            match parse_control(&line) {
                Some((away, rank)) => self.set(rank, away),
                None => pstrain_observe::log_line!(
                    "ignoring control line {line:?} (want `leave R` or `back R`)"
                ),
            }
        }
        self.ranks.clone().for_each(|r| self.set(r, false));
    }
}

/// `leave R` -> (true, R), `back R` -> (false, R).
fn parse_control(line: &str) -> Option<(bool, usize)> {
    let (verb, rank) = line.trim().split_once(' ')?;
    let away = match verb {
        "leave" => true,
        "back" => false,
        _ => return None,
    };
    Some((away, rank.trim().parse().ok()?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn control_lines_move_only_their_own_ranks_and_a_closed_pipe_calls_everyone_back() {
        assert_eq!(parse_control("leave 12"), Some((true, 12)));
        assert_eq!(parse_control(" back 3 \n"), Some((false, 3)));
        assert_eq!(parse_control("leave"), None);
        assert_eq!(parse_control("jump 3"), None);
        assert_eq!(parse_control("leave -1"), None);
        let control = Control::new(4..8);
        control.set(5, true);
        control.set(9, true);
        control.set(3, true);
        assert!(control.is_away(5));
        assert!(!control.is_away(9) && !control.is_away(3) && !control.is_away(4));
        control.follow("leave 6\nnonsense\nback 5\n".as_bytes());
        // The input ended: nobody is kept away, 6 included.
        assert!((4..8).all(|r| !control.is_away(r)));
    }

    #[test]
    fn a_worker_away_waits_until_called_back_or_the_run_ends() {
        let control = Control::new(0..2);
        let stop = AtomicBool::new(false);
        control.set(0, true);
        control.set(1, true);
        std::thread::scope(|s| {
            let back = s.spawn(|| control.wait_back(0, &stop));
            let ended = s.spawn(|| control.wait_back(1, &stop));
            std::thread::sleep(Duration::from_millis(50));
            assert!(!back.is_finished() && !ended.is_finished());
            control.set(0, false);
            back.join().unwrap();
            assert!(!ended.is_finished());
            control.end();
            ended.join().unwrap();
        });
    }
}
