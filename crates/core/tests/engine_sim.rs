//! A deterministic simulation of shards and workers, in the style of raft-rs's harness: no
//! sockets and no threads, a fake clock, and a seeded scheduler that decides which worker acts
//! next. Workers pull, push, wait at the consistency gate, die, freeze, rejoin and get
//! replaced; with a network, pushes travel as messages the scheduler delivers in any order
//! (across workers and shards) or loses with their connection, and the worker reconnects as
//! `TcpClient` does. The assertions read the shards' own state, and every push checks that its
//! base version is the version of the weights it was computed from.

use pstrain_core::{
    Departure, EngineConfig, FanOut, Mode, OptimizerConfig, PullAsk, PullDecision, PushMeta,
    PushOutcome, PushRoute, RankRequest, Rng, Seat, ServerConfig, ShardEngine,
};
use std::time::Duration;

const TICK: Duration = Duration::from_millis(100);
const HEARTBEAT_TIMEOUT: Duration = Duration::from_secs(2);

#[derive(Debug, Clone, Copy, PartialEq)]
enum Life {
    Alive,
    /// Stopped without a word: no pushes, no heartbeats (a hung host).
    Frozen,
    /// Its process died: the connection broke (the transport reports that at once).
    Dead,
}

struct SimWorker {
    seat: Option<Seat>,
    /// The client's side of the protocol, as `TcpClient` keeps it: each slice's version,
    /// pending steps, the push order.
    fan: FanOut,
    /// Its pull after a push, per shard: the asks not yet answered and when they were made
    /// (it waits at those gates).
    asks: Vec<Option<(PullAsk, Duration)>>,
    life: Life,
    pushes: u64,
    /// The version of each shard's slice its buffer really holds (what a pull last brought).
    weights: Vec<u64>,
    /// Its push in flight: each shard's answer, once delivered (`None`: still on the wire).
    replies: Vec<Option<PushOutcome>>,
    /// Shards its push in flight still has to answer.
    awaiting: usize,
    /// Its push waits for shard 0's step (coordinated sync) while the others act.
    at_shard_zero: bool,
}

/// A push's slice on its way to one shard.
struct InFlight {
    slot: usize,
    shard: usize,
    meta: PushMeta,
    grad: [f32; 4],
    /// Coordinated sync: shard 0's step and its members.
    tag: Option<(u64, Vec<bool>)>,
}

struct Sim {
    shards: Vec<ShardEngine>,
    workers: Vec<SimWorker>,
    now: Duration,
    rng: Rng,
    /// Relative speed: worker i acts with probability weight[i] / sum when picked.
    weight: Vec<usize>,
    mode: Mode,
    rank_grads: bool,
    /// Pushes travel as messages (delivered in the order the scheduler picks) when `Some`:
    /// this many in a thousand are lost, and their worker's connections with them.
    lossy_per_mille: Option<usize>,
    wire: Vec<InFlight>,
    /// Messages delivered before an older one still on the wire, and messages lost.
    reordered: u64,
    lost: u64,
}

fn engine_config(mode: Mode, workers: usize, shard: usize, shards: usize) -> EngineConfig {
    EngineConfig {
        shard,
        shards,
        server: ServerConfig {
            mode,
            workers,
            optimizer: OptimizerConfig::sgd(1.0),
            ..Default::default()
        },
        heartbeat_timeout: HEARTBEAT_TIMEOUT,
        checkpoint_every_updates: None,
        checkpoint_every: None,
    }
}

impl Sim {
    fn new(mode: Mode, workers: usize, shards: usize, seed: u64) -> Sim {
        let shards = (0..shards)
            .map(|s| {
                ShardEngine::new(
                    engine_config(mode, workers, s, shards),
                    vec![0.0; 4],
                    Duration::ZERO,
                )
                .unwrap()
            })
            .collect::<Vec<_>>();
        let n = shards.len();
        let mut sim = Sim {
            shards,
            workers: Vec::new(),
            now: Duration::ZERO,
            rng: Rng::new(seed),
            weight: vec![1; workers],
            mode,
            rank_grads: false,
            lossy_per_mille: None,
            wire: Vec::new(),
            reordered: 0,
            lost: 0,
        };
        for rank in 0..workers {
            sim.workers.push(SimWorker {
                seat: None,
                fan: FanOut::new(mode, &vec![0; n]),
                asks: vec![None; n],
                life: Life::Alive,
                pushes: 0,
                weights: vec![0; n],
                replies: vec![None; n],
                awaiting: 0,
                at_shard_zero: false,
            });
            sim.join(rank, RankRequest::Exact(rank));
        }
        sim
    }

    /// Worker slot `slot` (a new process) joins every shard, then pulls every slice, as the
    /// worker loop starts.
    fn join(&mut self, slot: usize, request: RankRequest) -> usize {
        let rank = self.connect(slot, request);
        let w = &mut self.workers[slot];
        for s in 0..w.asks.len() {
            w.asks[s] = Some((w.fan.pull_ask(s, None, false), self.now));
        }
        rank
    }

    /// Worker slot `slot`'s client connects to every shard (shard 0 first: it assigns `Any`
    /// ranks) and starts its protocol state afresh.
    fn connect(&mut self, slot: usize, request: RankRequest) -> usize {
        let now = self.now;
        let seat = self.shards[0]
            .join(request, now)
            .expect("shard 0 takes the worker");
        for shard in &mut self.shards[1..] {
            let other = shard
                .join(RankRequest::Exact(seat.rank), now)
                .expect("joins the others");
            assert_eq!(other.rank, seat.rank);
        }
        let w = &mut self.workers[slot];
        w.seat = Some(seat);
        w.life = Life::Alive;
        let versions: Vec<u64> = self.shards.iter().map(|s| s.version()).collect();
        w.fan = FanOut::new(self.mode, &versions);
        w.replies.fill(None);
        w.awaiting = 0;
        w.asks.fill(None);
        seat.rank
    }

    fn rank_of(&self, slot: usize) -> usize {
        self.workers[slot].seat.expect("joined").rank
    }

    /// One scheduler step: time passes, live workers beat, shards evict the silent, and one
    /// worker (picked by weight) acts.
    fn step(&mut self) {
        self.tick();
        if !self.wire.is_empty() && self.rng.below(2) == 0 {
            self.deliver_any();
            return;
        }
        let total: usize = self.weight.iter().sum();
        let mut pick = self.rng.below(total);
        let slot = self
            .weight
            .iter()
            .position(|&w| {
                let hit = pick < w;
                pick = pick.saturating_sub(w);
                hit
            })
            .unwrap_or(0);
        if self.workers[slot].life == Life::Alive {
            self.act(slot);
        }
    }

    /// Time passes, live workers beat, shards evict the silent.
    fn tick(&mut self) {
        self.now += TICK;
        for w in &self.workers {
            if let (Life::Alive, Some(seat)) = (w.life, w.seat) {
                for shard in &mut self.shards {
                    shard.heartbeat(seat.rank, self.now);
                }
            }
        }
        for shard in &mut self.shards {
            shard.evict_silent(self.now);
        }
    }

    /// The worker's next move: wait at the gates its pull waits at, or for its push's
    /// answers, or compute, push (a gradient of ones) and pull, as the worker loop does over
    /// `FanOut`.
    fn act(&mut self, slot: usize) {
        let seat = self.workers[slot].seat.expect("joined");
        if self.workers[slot].asks.iter().any(Option::is_some) {
            self.answer_pulls(slot);
            return;
        }
        if self.workers[slot].awaiting > 0 || self.workers[slot].at_shard_zero {
            return;
        }
        self.workers[slot].pushes += 1;
        let meta = |base| PushMeta {
            rank: seat.rank,
            base_version: base,
            samples: 1,
            loss: 0.5,
            accumulated: false,
        };
        // Distinct per rank when a test must tell which gradients made up a step.
        let value = if self.rank_grads {
            1.0 + seat.rank as f32
        } else {
            1.0
        };
        let grad = [value; 4];
        let w = &self.workers[slot];
        let route = w.fan.route();
        let bases: Vec<u64> = (0..self.shards.len())
            .map(|s| w.fan.base_version(s))
            .collect();
        assert_eq!(
            bases, w.weights,
            "{}, rank {}: a push's base versions are those of the weights it holds",
            self.mode, seat.rank
        );
        let mut step = None;
        if route == PushRoute::ShardZeroFirst {
            let first = self.shards[0].push(meta(bases[0]), &grad, None, self.now);
            self.answered(slot, 0, first.outcome.clone());
            // The followers get the slice once shard 0's step is complete (the simulated
            // worker waits for that while the others act, as the real one waits for shard 0's
            // reply); a gradient shard 0 dropped as late never reaches them.
            if let Some(s) = first.admitted_step {
                self.workers[slot].at_shard_zero = true;
                self.complete_step(slot, s);
                self.workers[slot].at_shard_zero = false;
                step = Some(s);
            }
        }
        let members = step.and_then(|s| self.shards[0].step_members(s).map(<[bool]>::to_vec));
        let followers = match (route, &members) {
            (PushRoute::Together, _) => 0..self.shards.len(),
            (PushRoute::ShardZeroFirst, Some(_)) => 1..self.shards.len(),
            (PushRoute::ShardZeroFirst, None) => 1..1,
        };
        if followers.is_empty() {
            // Shard 0 dropped it as late: nothing goes to the others.
            self.pushed(slot);
            return;
        }
        self.workers[slot].awaiting = followers.len();
        for shard in followers {
            let message = InFlight {
                slot,
                shard,
                meta: meta(bases[shard]),
                grad,
                tag: step.zip(members.clone()),
            };
            if self.lossy_per_mille.is_some() {
                self.wire.push(message);
            } else {
                self.deliver(message);
            }
        }
    }

    /// Delivers one message on the wire, picked by the scheduler (so messages arrive in any
    /// order across workers and shards), or loses it.
    fn deliver_any(&mut self) {
        let pick = self.rng.below(self.wire.len());
        // The wire is in send order: anything but the oldest overtakes another message.
        self.reordered += u64::from(pick > 0);
        let message = self.wire.remove(pick);
        let lost = self
            .lossy_per_mille
            .is_some_and(|p| self.rng.below(1000) < p);
        if lost {
            self.lost += 1;
            if self.rng.below(2) == 0 {
                // The shard took it; the connection failed before its answer came back.
                let tag = message
                    .tag
                    .as_ref()
                    .map(|(step, members)| (*step, &members[..]));
                let shard = &mut self.shards[message.shard];
                let _ = shard.push(message.meta, &message.grad, tag, self.now);
            }
            self.reconnect(message.slot);
        } else {
            self.deliver(message);
        }
    }

    /// The message reaches its shard; its answer reaches the worker.
    fn deliver(&mut self, m: InFlight) {
        let tag = m.tag.as_ref().map(|(step, members)| (*step, &members[..]));
        let report = self.shards[m.shard].push(m.meta, &m.grad, tag, self.now);
        self.answered(m.slot, m.shard, report.outcome);
        let w = &mut self.workers[m.slot];
        w.awaiting -= 1;
        if w.awaiting == 0 {
            self.pushed(m.slot);
        }
    }

    fn answered(
        &mut self,
        slot: usize,
        shard: usize,
        outcome: Result<PushOutcome, pstrain_core::PushError>,
    ) {
        match outcome {
            Ok(o) => self.workers[slot].replies[shard] = Some(o),
            Err(e) => panic!("worker slot {slot} refused by shard {shard}: {e}"),
        }
    }

    /// Every shard of its push answered: its pull, newer than what it holds, waiting where
    /// its push is pending.
    fn pushed(&mut self, slot: usize) {
        let waits = self.mode.pull_waits();
        let now = self.now;
        let w = &mut self.workers[slot];
        for s in 0..w.replies.len() {
            if let Some(outcome) = w.replies[s].take() {
                w.fan.pushed(s, &outcome);
            }
        }
        let held = w.fan.version();
        for s in 0..w.asks.len() {
            w.asks[s] = Some((w.fan.pull_ask(s, Some(held), waits), now));
        }
        self.answer_pulls(slot);
    }

    /// A message was lost with its connection: every shard sees the worker go and its other
    /// messages are lost too; as `TcpClient` does, it reconnects with its rank, its push
    /// counts as dropped, and the worker loop goes on to its usual pull after a push (it
    /// still holds its old weights: `FanOut` must make that pull bring the slices whole).
    fn reconnect(&mut self, slot: usize) {
        let seat = self.workers[slot].seat.expect("joined");
        for shard in &mut self.shards {
            shard.leave(seat, Departure::Vanished);
        }
        self.wire.retain(|m| m.slot != slot);
        if self.workers[slot].life == Life::Alive {
            self.connect(slot, RankRequest::Exact(seat.rank));
            self.pushed(slot);
        }
    }

    /// Lets the others act until shard 0's step `step` is complete.
    fn complete_step(&mut self, slot: usize, step: u64) {
        let mut turns = 0;
        while self.shards[0].step_members(step).is_none() {
            turns += 1;
            // A stalled step fails the test instead of hanging it.
            assert!(
                turns < 100_000,
                "{}: shard 0's step {step} never completes (slot {slot} waits for it)",
                self.mode
            );
            self.now += TICK;
            if !self.wire.is_empty() && self.rng.below(2) == 0 {
                self.deliver_any();
                continue;
            }
            let other = (slot + 1 + self.rng.below(self.workers.len() - 1)) % self.workers.len();
            if self.workers[other].life == Life::Alive && other != slot {
                self.act(other);
            }
        }
    }

    /// The shards answer the worker's open pull asks that their gates let through (each
    /// shard's engine decides, as it does for the TCP and in-process transports).
    fn answer_pulls(&mut self, slot: usize) {
        let rank = self.workers[slot].seat.map(|s| s.rank);
        let w = &mut self.workers[slot];
        for (s, shard) in self.shards.iter_mut().enumerate() {
            let Some((ask, arrived)) = w.asks[s] else {
                continue;
            };
            let PullDecision::Answer(reply) = shard.pull(rank, ask, arrived, self.now) else {
                continue;
            };
            if reply.updated {
                w.weights[s] = reply.version;
            }
            if FanOut::ask_again(w.fan.needs_whole(s), &reply) {
                // As `TcpClient` does: the slice is needed whatever its version.
                w.asks[s] = Some((PullAsk::WHOLE, self.now));
                continue;
            }
            w.fan.pulled(s, &reply);
            w.asks[s] = None;
        }
    }

    fn run(&mut self, steps: usize) {
        for _ in 0..steps {
            self.step();
        }
    }

    /// Delivers everything still on the wire, with no worker acting.
    fn drain(&mut self) {
        let lossy = self.lossy_per_mille.replace(0);
        while !self.wire.is_empty() {
            self.deliver_any();
        }
        self.lossy_per_mille = lossy;
    }

    fn kill(&mut self, slot: usize) {
        let seat = self.workers[slot].seat.take().expect("joined");
        self.workers[slot].life = Life::Dead;
        self.wire.retain(|m| m.slot != slot);
        for shard in &mut self.shards {
            shard.leave(seat, Departure::Vanished);
        }
    }
}

const SYNC: Mode = Mode::Sync { backup_workers: 0 };

#[test]
fn sync_applies_one_mean_update_per_step_from_every_worker() {
    for seed in 0..5 {
        let mut sim = Sim::new(SYNC, 3, 1, seed);
        sim.run(600);
        let shard = &sim.shards[0];
        let v = shard.version();
        assert!(v > 50, "seed {seed}: only {v} steps");
        // Every step averaged three gradients of ones: SGD lr 1 moved each weight by 1.
        assert_eq!(shard.params(), &[-(v as f32); 4][..]);
        let stats = shard.stats();
        assert_eq!(
            stats.staleness_max, 0,
            "everyone computes from the newest weights"
        );
        // Each worker pushed once per completed step (and maybe once into the open one).
        for w in &sim.workers {
            assert!(
                w.pushes == v || w.pushes == v + 1,
                "{} pushes in {v} steps",
                w.pushes
            );
        }
        assert!(stats.gradients_applied >= 3 * v);
    }
}

#[test]
fn async_applies_every_gradient_on_arrival() {
    let mut sim = Sim::new(
        Mode::Async {
            max_staleness: None,
        },
        3,
        1,
        9,
    );
    sim.weight = vec![4, 1, 1];
    sim.run(500);
    let shard = &sim.shards[0];
    let pushes: u64 = sim.workers.iter().map(|w| w.pushes).sum();
    assert_eq!(shard.version(), pushes);
    assert_eq!(shard.params(), &[-(pushes as f32); 4][..]);
    // Nobody waits: the fast worker pushed about four times as often as the others.
    assert!(sim.workers[0].pushes > 3 * sim.workers[1].pushes);
    assert!(shard.stats().staleness_max > 0);
}

#[test]
fn a_frozen_sync_worker_is_evicted_then_rejoins() {
    let mut sim = Sim::new(SYNC, 3, 1, 3);
    sim.run(200);
    sim.workers[2].life = Life::Frozen;
    let frozen_at = sim.shards[0].version();
    // Until its heartbeat deadline passes the step cannot complete.
    let deadline_ticks = (HEARTBEAT_TIMEOUT.as_millis() / TICK.as_millis()) as usize;
    sim.run(deadline_ticks - 2);
    assert!(sim.shards[0].version() <= frozen_at + 1);
    sim.run(300);
    assert_eq!(sim.shards[0].active_workers(), 2, "evicted from the quorum");
    let after_eviction = sim.shards[0].version();
    assert!(after_eviction > frozen_at + 20, "the other two went on");
    // The frozen worker wakes: its rank was freed by the eviction, so it rejoins.
    let rank = sim.join(2, RankRequest::Exact(2));
    assert_eq!(rank, 2);
    assert_eq!(sim.shards[0].active_workers(), 3);
    sim.run(300);
    assert!(sim.shards[0].version() > after_eviction + 20);
    let v = sim.shards[0].version() as f32;
    assert_eq!(
        sim.shards[0].params(),
        &[-v; 4][..],
        "every step one mean update"
    );
}

#[test]
fn a_replacement_with_any_rank_takes_the_dead_workers_rank() {
    let mut sim = Sim::new(SYNC, 3, 2, 5);
    sim.run(150);
    sim.kill(1);
    sim.run(100);
    assert_eq!(sim.shards[0].active_workers(), 2);
    let before = sim.shards[0].version();
    let rank = sim.join(1, RankRequest::Any);
    assert_eq!(rank, 1, "the vacated rank");
    assert_eq!(sim.rank_of(1), 1);
    sim.run(300);
    assert!(sim.shards[0].version() > before + 20);
    // Both shards took every step together.
    assert_eq!(sim.shards[0].version(), sim.shards[1].version());
    assert_eq!(sim.shards[0].params(), sim.shards[1].params());
    // A second replacement finds no free rank.
    assert!(sim.shards[0].join(RankRequest::Any, sim.now).is_err());
}

#[test]
fn coordinated_steps_keep_the_shards_identical_with_a_slow_worker_and_a_death() {
    let mode = Mode::Sync { backup_workers: 1 };
    for seed in 0..4 {
        let mut sim = Sim::new(mode, 3, 2, 100 + seed);
        sim.weight = vec![3, 3, 1];
        sim.rank_grads = true;
        sim.run(400);
        sim.kill(0);
        sim.run(400);
        let (a, b) = (&sim.shards[0], &sim.shards[1]);
        assert!(a.version() > 40, "seed {seed}: {} steps", a.version());
        // Every member pushes its follower slice as soon as shard 0's step is complete, so
        // between scheduler steps the follower has applied exactly shard 0's steps.
        assert_eq!(a.version(), b.version(), "seed {seed}");
        assert_eq!(a.params(), b.params(), "seed {seed}");
        assert!(
            a.stats().dropped_stale > 0,
            "the slow worker's gradients were dropped"
        );
    }
}

#[test]
fn ssp_bounds_the_lead_across_shards_and_goes_on_without_a_dead_worker() {
    for max_lead in [0, 1, 3] {
        let mut sim = Sim::new(Mode::Ssp { max_lead }, 3, 2, 40 + max_lead);
        sim.weight = vec![4, 4, 1];
        sim.run(600);
        let before_kill = sim.shards[0].version();
        assert!(before_kill > 20, "lead {max_lead}: {before_kill} steps");
        for (s, shard) in sim.shards.iter().enumerate() {
            for (rank, w) in shard.worker_stats().iter().enumerate() {
                assert!(
                    w.max_lead <= max_lead && w.staleness_max <= max_lead,
                    "lead {max_lead}, shard {s}, rank {rank}: {w:?}"
                );
            }
        }
        // The fast workers never got more than the bound (plus the step in flight) ahead.
        let slow = sim.workers[2].pushes;
        for w in &sim.workers[..2] {
            assert!(w.pushes <= slow + max_lead + 1, "{} vs {slow}", w.pushes);
        }
        if max_lead > 0 {
            let leads: Vec<u64> = sim.shards[0]
                .worker_stats()
                .iter()
                .map(|w| w.max_lead)
                .collect();
            assert_eq!(
                leads[0].max(leads[1]),
                max_lead,
                "the fast ones used the bound"
            );
        }
        // Every step is one mean update of every worker's gradient of ones.
        let v = sim.shards[0].version();
        assert_eq!(sim.shards[0].params(), &[-(v as f32); 4][..]);
        // The slow worker dies: the others are not held up.
        sim.kill(2);
        sim.run(300);
        let after = sim.shards[0].version();
        assert!(after > before_kill + 50, "lead {max_lead}: {after}");
        assert_eq!(after, sim.shards[1].version(), "shards in step");
        assert_eq!(sim.shards[0].params(), sim.shards[1].params());
    }
}

/// The bound on what one push of a token holder can do, for every mode: it moves a shard by
/// at most one version, so it cannot end a run that had more than one update left. (A
/// follower shard applies shard 0's steps as workers relay them, so a hostile worker's made-up
/// step at the next version is applied like any other, and an honest push completing the
/// step before it then moves the follower two steps; what holds there is that every step
/// costs a push: the version never passes the pushes received, and a step past the version
/// waits until two ranks have pushed that far.) A seeded adversary sends every kind of push
/// an admitted worker can send (any base version, any sample count, and to a follower any
/// step within its window with any member list), interleaved with honest ones.
#[test]
fn no_single_push_moves_a_shard_more_than_one_step_in_any_mode() {
    let modes = [
        (Mode::Sync { backup_workers: 0 }, 0, 1),
        (Mode::Sync { backup_workers: 1 }, 0, 2),
        // A follower: shard 1 of 2 with backup workers applies shard 0's steps.
        (Mode::Sync { backup_workers: 1 }, 1, 2),
        (
            Mode::Async {
                max_staleness: None,
            },
            0,
            1,
        ),
        (Mode::Ssp { max_lead: 3 }, 0, 1),
    ];
    let workers = 4;
    let budget = 1_000;
    for (mode, shard, shards) in modes {
        let mut cfg = engine_config(mode, workers, shard, shards);
        cfg.server.max_updates = Some(budget);
        let mut engine = ShardEngine::new(cfg, vec![0.0; 8], Duration::ZERO).unwrap();
        let seats: Vec<Seat> = (0..workers)
            .map(|r| engine.join(RankRequest::Exact(r), Duration::ZERO).unwrap())
            .collect();
        let mut rng = Rng::new(7);
        let follower = shard > 0;
        for push in 0..20_000u64 {
            let before = engine.version();
            if engine.is_done() {
                break;
            }
            let rank = rng.below(workers);
            let hostile = rank == 0;
            let base = if hostile {
                rng.below(before as usize + 1) as u64
            } else {
                before
            };
            let meta = PushMeta {
                rank,
                base_version: base,
                samples: if hostile {
                    rng.below(1 << 20) as u32
                } else {
                    8
                },
                loss: 0.5,
                accumulated: false,
            };
            let grad: Vec<f32> = (0..8).map(|_| rng.uniform(-1.0, 1.0)).collect();
            // The attack: a member list naming only the sender, so the step is complete at
            // once.
            let members: Vec<bool> = if hostile {
                (0..workers).map(|r| r == 0).collect()
            } else {
                (0..workers).map(|r| r != 0).collect()
            };
            let step = if hostile {
                before + rng.below(budget as usize * 2) as u64
            } else {
                before
            };
            let tag = (follower && members[rank]).then_some((step, &members[..]));
            let _ = engine.push(meta, &grad, tag, Duration::ZERO);
            let after = engine.version();
            assert!(
                after <= before + 1 || (follower && !hostile),
                "{mode:?} shard {shard}: push {push} by rank {rank} moved {before} -> {after}"
            );
            assert!(
                after <= push + 1,
                "{mode:?} shard {shard}: {after} after {push} pushes"
            );
        }
        // Honest work went on meanwhile (the bound is not met by a shard that never moves).
        assert!(
            engine.version() >= 100,
            "{mode:?} shard {shard}: only {} updates",
            engine.version()
        );
        let _ = seats;
    }
}

const MODES_ON_A_NETWORK: [Mode; 4] = [
    SYNC,
    Mode::Ssp { max_lead: 2 },
    Mode::Async {
        max_staleness: Some(4),
    },
    // Coordinated: shard 0 decides each step's members, the follower applies those.
    Mode::Sync { backup_workers: 1 },
];

#[test]
fn reordered_pushes_leave_every_shard_with_the_same_whole_steps() {
    for mode in MODES_ON_A_NETWORK {
        for seed in 0..4 {
            let mut sim = Sim::new(mode, 3, 2, 300 + seed);
            sim.lossy_per_mille = Some(0);
            sim.weight = vec![3, 2, 1];
            sim.run(1500);
            sim.drain();
            assert!(sim.reordered > 50, "{mode}: {} reordered", sim.reordered);
            let (a, b) = (&sim.shards[0], &sim.shards[1]);
            let v = a.version();
            assert!(v > 40, "{mode} seed {seed}: {v} updates");
            // Every update is a mean of gradients of ones (SGD, lr 1).
            for shard in [a, b] {
                let v = shard.version();
                assert_eq!(shard.params(), &[-(v as f32); 4][..], "{mode} seed {seed}");
            }
            if mode.lockstep() {
                // Once every message has arrived, both shards took the same steps.
                assert_eq!(b.version(), v, "{mode} seed {seed}");
            } else {
                // Each shard judges staleness by its own version when the slice arrives, so
                // the shards may drop different gradients; each applied or dropped every one.
                let pushes: u64 = sim.workers.iter().map(|w| w.pushes).sum();
                for shard in [a, b] {
                    assert_eq!(shard.version() + shard.stats().dropped_stale, pushes);
                }
            }
            if mode.lockstep() {
                let bound = match mode {
                    Mode::Ssp { max_lead } => max_lead,
                    _ => 0,
                };
                for w in a.worker_stats() {
                    assert!(w.staleness_max <= bound, "{mode}: {w:?}");
                }
            }
        }
    }
}

/// A lost message takes its worker's connections with it (before or after its shard took it);
/// the worker reconnects. Nobody waits for a slice that will not come: in coordinated sync the
/// follower applies a step without the gone member's slice, or skips a step none of whose
/// slices arrived (keeping shard 0's numbering); in SSP a reconnected worker starts after the
/// current step, so its clocks at the shards cannot drift apart into a wait at every gate;
/// a single sync shard does not wait for a worker that reconnected during a step; a gradient
/// pushed before a reconnect is never counted twice.
#[test]
fn lost_messages_cost_a_reconnect_never_a_stall_or_a_wrong_base_version() {
    for (workers, shards, lossy_per_mille) in [(3, 2, 40), (5, 3, 100), (4, 1, 100), (6, 2, 150)] {
        for mode in MODES_ON_A_NETWORK {
            for seed in 0..8 {
                let mut sim = Sim::new(mode, workers, shards, 400 + seed);
                sim.lossy_per_mille = Some(lossy_per_mille);
                sim.run(3000);
                sim.drain();
                let at = format!("{mode}, {workers} workers, {shards} shards, seed {seed}");
                assert!(sim.lost >= 5, "{at}: {} lost", sim.lost);
                check_after_losses(&sim, &at);
            }
        }
    }
}

/// Every push checked its base version against the weights it held (in `act`); here: nobody
/// stalled, each update is still a mean of gradients of ones, and only a follower skips steps.
fn check_after_losses(sim: &Sim, at: &str) {
    let coordinated = sim.mode.coordinated(sim.shards.len());
    for (s, shard) in sim.shards.iter().enumerate() {
        let v = shard.version();
        assert!(v > 50, "{at}, shard {s}: {v} updates");
        let updates = -shard.params()[0];
        assert_eq!(shard.params(), &[-updates; 4][..], "{at}, shard {s}");
        let skipped = v as f32 - updates;
        if coordinated && s > 0 {
            assert!(
                (0.0..=sim.lost as f32).contains(&skipped),
                "{at}: {skipped}"
            );
            let behind = sim.shards[0].version() - v;
            assert!(behind <= 1, "{at}: the follower is {behind} behind");
        } else if matches!(sim.mode, Mode::Ssp { .. }) {
            // A step whose every live rank reconnected during it waits for none of them; if
            // none had pushed to it, it passes with no update.
            assert!(
                (0.0..=sim.lost as f32).contains(&skipped),
                "{at}: {skipped}"
            );
        } else {
            assert_eq!(skipped, 0.0, "{at}, shard {s}");
        }
        assert_eq!(
            shard.active_workers(),
            sim.workers.len(),
            "{at}: all rejoined"
        );
    }
}

impl Sim {
    /// One round of a fleet: time passes, live workers beat, shards evict the silent, and
    /// every live worker makes its next move once, in a shuffled order.
    fn fleet_round(&mut self) {
        self.tick();
        let mut order: Vec<usize> = (0..self.workers.len()).collect();
        for i in (1..order.len()).rev() {
            order.swap(i, self.rng.below(i + 1));
        }
        for slot in order {
            if self.workers[slot].life == Life::Alive {
                self.act(slot);
            }
        }
    }

    /// Churn: each live worker's process dies with probability `die` per mille, and each dead
    /// one is replaced (by a process that takes any free rank) with probability `back` per
    /// mille. Returns (died, came back).
    fn churn(&mut self, die: usize, back: usize) -> (usize, usize) {
        let (mut died, mut came_back) = (0, 0);
        for slot in 0..self.workers.len() {
            let roll = self.rng.below(1000);
            match self.workers[slot].life {
                Life::Alive if roll < die => {
                    self.kill(slot);
                    died += 1;
                }
                Life::Dead if roll < back => {
                    self.join(slot, RankRequest::Any);
                    came_back += 1;
                }
                _ => {}
            }
        }
        (died, came_back)
    }

    fn alive(&self) -> usize {
        self.workers
            .iter()
            .filter(|w| w.life == Life::Alive)
            .count()
    }
}

/// A fleet of 10,000 workers, a tenth of them joining late and 1% of the live ones dying every
/// round while 30% of the dead come back (on any free rank): every mode keeps going, the
/// shards count exactly the live workers, each update is still one mean of gradients of ones,
/// and SSP keeps its bound. SSP and async run over 2 shards; sync over one, which alone
/// decides its steps and so does not wait for a worker that joined during one (several
/// shards without backups wait for every active rank, which churn this fast never lets
/// finish: an open problem). Coordinated sync is left out: its simulated push waits for shard
/// 0's step by letting the others act one by one, too slow at this size.
#[test]
fn ten_thousand_workers_with_churn_keep_every_mode_going() {
    let modes = [
        SYNC,
        Mode::Ssp { max_lead: 2 },
        Mode::Async {
            max_staleness: Some(8),
        },
        // FedBuff: every 50 arriving gradients one update.
        Mode::Buffered {
            k: 50,
            max_staleness: Some(8),
        },
    ];
    for mode in modes {
        let shards = if matches!(mode, Mode::Sync { .. }) {
            1
        } else {
            2
        };
        let mut sim = Sim::new(mode, 10_000, shards, 77);
        for slot in (0..sim.workers.len()).step_by(10) {
            sim.kill(slot);
        }
        let (mut died, mut came_back) = (0, 0);
        let mut stalled_rounds = 0;
        for round in 0..30 {
            let before = sim.shards[0].version();
            sim.fleet_round();
            stalled_rounds = if sim.shards[0].version() > before {
                0
            } else {
                stalled_rounds + 1
            };
            assert!(
                stalled_rounds < 4,
                "{mode}: no update for 4 rounds at {round}"
            );
            let (d, b) = sim.churn(10, 300);
            (died, came_back) = (died + d, came_back + b);
            for shard in &sim.shards {
                assert_eq!(shard.active_workers(), sim.alive(), "{mode}, round {round}");
            }
        }
        assert!(
            died > 1000 && came_back > 1000,
            "{mode}: {died} died, {came_back} back"
        );
        for (s, shard) in sim.shards.iter().enumerate() {
            let v = shard.version();
            assert!(v >= 10, "{mode}, shard {s}: {v} updates");
            assert_eq!(shard.params(), &[-(v as f32); 4][..], "{mode}, shard {s}");
            if let Mode::Ssp { max_lead } = mode {
                assert!(shard
                    .worker_stats()
                    .iter()
                    .all(|w| w.staleness_max <= max_lead));
            }
        }
        if shards == 2 && mode.lockstep() {
            assert_eq!(sim.shards[0].version(), sim.shards[1].version(), "{mode}");
        }
    }
}
