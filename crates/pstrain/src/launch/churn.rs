//! Devices that come and go (`train --transport tcp --churn`): a seeded trace of departures
//! and returns for the local launcher. Every live worker leaves at a given rate (killed with
//! no goodbye, as a phone that loses its network is), stays away for a while, and comes back
//! as a new process with its rank (joining whatever step the others are in). The decisions
//! here are pure (a clock and the live ranks in, ranks out); `cluster.rs` kills and starts
//! the processes.

use super::cluster::LocalCluster;
use crate::run::TrainError;
use pstrain_core::Rng;
use serde::Serialize;
use std::ops::Range;
use std::time::{Duration, Instant};

/// The churn of a run.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Churn {
    /// The fraction of the live workers that leaves per minute (0.2: a fifth of them).
    pub leave_per_minute: f64,
    /// How long a worker that left stays away before it comes back with its rank.
    pub away: Duration,
    pub seed: u64,
}

/// What the churn did over a run, for the summary.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct ChurnCounts {
    pub left: u64,
    pub came_back: u64,
    /// Workers that started late (`--late-workers`) and joined.
    #[serde(default)]
    pub joined_late: u64,
}

/// Workers that join a run late: the last `workers` ranks, `after` its start.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LateJoin {
    pub workers: usize,
    pub after: Duration,
}

/// What to do now: ranks to kill, ranks to start again.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct ChurnStep {
    pub leave: Vec<usize>,
    pub start: Vec<usize>,
}

/// The churn as it unfolds.
#[derive(Debug)]
pub struct ChurnTrace {
    churn: Churn,
    rng: Rng,
    /// Ranks away, with when they come back and whether they have not joined yet.
    away: Vec<(usize, Instant, bool)>,
    last_tick: Instant,
    /// The run is ending: nobody leaves or comes back any more.
    ended: bool,
    pub counts: ChurnCounts,
}

impl ChurnTrace {
    pub fn new(churn: Churn, start: Instant) -> Self {
        ChurnTrace {
            churn,
            rng: Rng::new(churn.seed ^ 0xc4a5_7e11),
            away: Vec::new(),
            last_tick: start,
            ended: false,
            counts: ChurnCounts::default(),
        }
    }

    /// The last `late.workers` of `workers` ranks start away and join `late.after` from
    /// `start`; returns their ranks.
    pub fn join_late(&mut self, late: LateJoin, workers: usize, start: Instant) -> Range<usize> {
        let ranks = workers.saturating_sub(late.workers)..workers;
        self.away
            .extend(ranks.clone().map(|r| (r, start + late.after, true)));
        ranks
    }

    /// Workers not running now but due back (the run is not over while any is).
    pub fn pending(&self) -> usize {
        if self.ended {
            return 0;
        }
        self.away.len()
    }

    /// The run is ending (a worker finished): whoever is away stays away. Returns 0 (no
    /// worker pending any more).
    pub fn end(&mut self) -> usize {
        self.ended = true;
        self.away.clear();
        0
    }

    /// At `now`, with `live` the ranks running: who leaves and who comes back.
    pub fn tick(&mut self, now: Instant, live: &[usize]) -> ChurnStep {
        let mut step = ChurnStep::default();
        if self.ended {
            return step;
        }
        let dt = now.saturating_duration_since(self.last_tick).as_secs_f64();
        self.last_tick = now;
        // Each live worker leaves with probability rate * dt over this tick.
        let p = (self.churn.leave_per_minute * dt / 60.0).clamp(0.0, 1.0);
        for &rank in live {
            if f64::from(self.rng.next_f32()) < p {
                step.leave.push(rank);
                self.away.push((rank, now + self.churn.away, false));
                self.counts.left += 1;
            }
        }
        let (back, still): (Vec<_>, Vec<_>) = self.away.iter().partition(|(_, at, _)| now >= *at);
        self.away = still;
        for (rank, _, late) in back {
            step.start.push(rank);
            match late {
                true => self.counts.joined_late += 1,
                false => self.counts.came_back += 1,
            }
        }
        step
    }
}

impl LocalCluster<'_> {
    /// Takes away the workers the churn picks now and brings back those due (with their
    /// ranks); nothing once the run is stopped. A worker alone in its process is killed and
    /// started again; a light worker is told to drop its connections and later to rejoin.
    pub(super) fn churn_tick(&mut self, stopped: bool) -> Result<(), TrainError> {
        let Some(trace) = self.churn.as_mut().filter(|_| !stopped) else {
            return Ok(());
        };
        let mut live = Vec::new();
        for w in self.workers.iter_mut() {
            if !w.killed && matches!(w.proc.child.try_wait(), Ok(None)) {
                live.extend(w.ranks.clone().filter(|&r| !self.away[r]));
            }
        }
        let step = trace.tick(Instant::now(), &live);
        for (ranks, away) in [(step.leave, true), (step.start, false)] {
            for rank in ranks {
                let Some(i) = self.process_of(rank) else {
                    // A late joiner that has no process yet.
                    if !away {
                        self.away[rank] = false;
                        let proc = self.launch_worker(Some(rank), 1)?;
                        self.workers.push(proc);
                    }
                    continue;
                };
                if self.workers[i].ranks.len() > 1 {
                    self.away[rank] = away;
                    self.workers[i].send(rank, away)?;
                } else if away {
                    // No goodbye: the shards find the connection gone, as with a device
                    // that lost its network.
                    self.workers[i].proc.kill();
                    self.workers[i].killed = true;
                } else {
                    self.workers[i] = self.launch_worker(Some(rank), 1)?;
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn churn(rate: f64) -> Churn {
        Churn {
            leave_per_minute: rate,
            away: Duration::from_secs(2),
            seed: 7,
        }
    }

    /// Runs the trace for `seconds` in 200 ms ticks over `workers` workers, keeping the set
    /// of live ranks as the launcher would.
    fn run(c: Churn, workers: usize, seconds: u64) -> (ChurnTrace, Vec<bool>) {
        let start = Instant::now();
        let mut trace = ChurnTrace::new(c, start);
        let mut live = vec![true; workers];
        for tick in 1..=seconds * 5 {
            let now = start + Duration::from_millis(200 * tick);
            let ranks: Vec<usize> = (0..workers).filter(|&r| live[r]).collect();
            let step = trace.tick(now, &ranks);
            for r in step.leave {
                assert!(live[r], "only a live worker leaves");
                live[r] = false;
            }
            for r in step.start {
                assert!(!live[r], "only an absent worker comes back");
                live[r] = true;
            }
        }
        (trace, live)
    }

    #[test]
    fn a_fifth_leaving_each_minute_is_about_a_fifth_and_all_come_back() {
        let (trace, live) = run(churn(0.2), 1000, 300);
        // 1,000 workers, 5 minutes, 20% a minute: about 1,000 departures.
        let left = trace.counts.left;
        assert!((800..1200).contains(&left), "{left}");
        // Everyone who left more than 2 s before the end is back.
        let away = trace.pending() as u64;
        assert_eq!(trace.counts.came_back + away, left);
        assert!(away < 30, "{away}");
        assert_eq!(live.iter().filter(|l| !**l).count() as u64, away);
    }

    #[test]
    fn late_joiners_start_away_and_join_once_at_their_time() {
        let start = Instant::now();
        let mut trace = ChurnTrace::new(churn(0.0), start);
        let late = LateJoin {
            workers: 3,
            after: Duration::from_secs(10),
        };
        assert_eq!(trace.join_late(late, 8, start), 5..8);
        assert_eq!(trace.pending(), 3);
        let live: Vec<usize> = (0..5).collect();
        assert_eq!(
            trace.tick(start + Duration::from_secs(9), &live),
            ChurnStep::default()
        );
        let step = trace.tick(start + Duration::from_secs(10), &live);
        assert_eq!(step.start, vec![5, 6, 7]);
        assert_eq!((trace.counts.joined_late, trace.counts.came_back), (3, 0));
        assert_eq!(trace.pending(), 0);
    }

    #[test]
    fn the_same_seed_makes_the_same_trace_and_an_ended_run_has_none() {
        let (a, live_a) = run(churn(1.0), 50, 60);
        let (b, live_b) = run(churn(1.0), 50, 60);
        assert_eq!((a.counts, live_a), (b.counts, live_b));
        assert!(a.counts.left > 20, "{:?}", a.counts);
        let mut trace = a;
        trace.end();
        assert_eq!(trace.pending(), 0);
        let later = Instant::now() + Duration::from_secs(3600);
        assert_eq!(trace.tick(later, &[0, 1, 2]), ChurnStep::default());
    }
}
