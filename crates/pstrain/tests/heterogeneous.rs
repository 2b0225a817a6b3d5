//! Heterogeneous workers on real MNIST: with one worker made 4x slower (`--slowdown`), every
//! consistency mode reaches its accuracy threshold within a time bound, and the shards' own
//! per-worker record shows what each mode promises (SSP's bound on the lead, balanced batch
//! sizes, the slow worker's staleness in async).

mod common;

use pstrain::launch::cluster::{train_tcp, ClusterConfig};
use pstrain::report::records::Summary;
use pstrain::{train, Quiet, RunPlan, TrainConfig};
use pstrain_compute::ModelKind;
use pstrain_core::{Mode, OptimizerConfig};
use std::path::PathBuf;
use std::sync::atomic::AtomicBool;
use std::time::Duration;

/// Samples every run trains on: 0.4 epoch.
const BUDGET: u64 = 24_000;
const SLOW: usize = 2;

/// The cnn, 3 workers of batch 32, worker 2 four times slower, for `BUDGET` samples.
fn heterogeneous(mode: Mode, tune: impl FnOnce(&mut RunPlan)) -> TrainConfig {
    let lr = if mode.lockstep() { 2e-3 } else { 1e-3 };
    let mut plan = RunPlan {
        mode,
        workers: 3,
        model: ModelKind::Cnn.name().into(),
        batch_size: 32,
        optimizer: OptimizerConfig::adam(lr),
        ..RunPlan::default()
    };
    tune(&mut plan);
    plan.iterations = Some(BUDGET / plan.samples_per_update());
    TrainConfig {
        plan,
        eval_every: Some(0),
        slowdown: vec![(SLOW, 4.0)],
        ..TrainConfig::default()
    }
}

/// Runs in process, failing if the run takes longer than `bound` (a stall, not a speed
/// claim: the bound is several times what the run needs).
fn run_bounded(cfg: TrainConfig, bound: Duration) -> Summary {
    let _guard = common::one_at_a_time();
    let outcome = common::within(bound, move || {
        train(&cfg, common::mnist(), &mut Quiet, &AtomicBool::new(false))
    })
    .unwrap();
    println!("{}", outcome.summary.render());
    outcome.summary
}

const BOUND: Duration = Duration::from_secs(300);
const THRESHOLD: f64 = 0.95;

fn reaches_threshold(name: &str, s: &Summary) {
    assert!(
        s.test_accuracy >= THRESHOLD,
        "{name}: {:.4} < {THRESHOLD}",
        s.test_accuracy
    );
    assert_eq!(s.per_worker.len(), 3);
}

#[test]
fn sync_modes_reach_the_threshold_with_a_4x_slow_worker() {
    let sync = run_bounded(
        heterogeneous(Mode::Sync { backup_workers: 0 }, |_| {}),
        BOUND,
    );
    reaches_threshold("sync", &sync);
    // Everyone waits for the slow worker: the fast ones spend most of the run waiting.
    let fast_wait = sync.per_worker[0].numbers.wait_s;
    assert!(fast_wait > sync.per_worker[SLOW].numbers.wait_s, "{sync:?}");

    let backup = run_bounded(
        heterogeneous(Mode::Sync { backup_workers: 1 }, |_| {}),
        BOUND,
    );
    reaches_threshold("sync with a backup worker", &backup);
    assert!(
        backup.per_worker[SLOW].numbers.not_applied > backup.per_worker[SLOW].numbers.applied,
        "the slow worker's gradients are mostly the late ones dropped"
    );

    let balanced = run_bounded(
        heterogeneous(Mode::Sync { backup_workers: 0 }, |p| {
            p.balance_batches = true
        }),
        BOUND,
    );
    reaches_threshold("balanced sync", &balanced);
    let batches: Vec<u32> = balanced
        .per_worker
        .iter()
        .map(|w| w.numbers.batch)
        .collect();
    assert_eq!(
        batches.iter().sum::<u32>(),
        96,
        "the last step's sizes: {batches:?}"
    );
    for fast in [0, 1] {
        assert!(
            batches[fast] >= 2 * batches[SLOW],
            "the slow worker gets a smaller share: {batches:?}"
        );
    }
    assert!(
        balanced.wall_time_s < sync.wall_time_s,
        "balanced {} s, plain sync {} s",
        balanced.wall_time_s,
        sync.wall_time_s
    );
}

#[test]
fn ssp_keeps_its_bound_and_reaches_the_threshold_with_a_4x_slow_worker() {
    for max_lead in [1, 4] {
        let s = run_bounded(heterogeneous(Mode::Ssp { max_lead }, |_| {}), BOUND);
        reaches_threshold("ssp", &s);
        for w in &s.per_worker {
            assert!(w.numbers.max_lead <= max_lead, "{w:?}");
            assert!(w.numbers.staleness_max <= max_lead, "{w:?}");
        }
        // The fast workers used the room the bound gives them.
        assert_eq!(
            s.per_worker[0]
                .numbers
                .max_lead
                .max(s.per_worker[1].numbers.max_lead),
            max_lead
        );
        assert_eq!(s.updates, BUDGET / 96);
    }
}

#[test]
fn async_modes_reach_the_threshold_with_a_4x_slow_worker() {
    let unbounded = Mode::Async {
        max_staleness: None,
    };
    for aware in [false, true] {
        let s = run_bounded(
            heterogeneous(unbounded, |p| p.staleness_aware_lr = aware),
            BOUND,
        );
        reaches_threshold("async", &s);
        // The slow worker's gradients are the stale ones, and it pushes less often.
        let (fast, slow) = (&s.per_worker[0], &s.per_worker[SLOW]);
        assert!(slow.staleness_mean > fast.staleness_mean, "{s:?}");
        assert!(slow.numbers.applied < fast.numbers.applied, "{s:?}");
        assert!(
            slow.numbers.wait_s < 1.0 && fast.numbers.wait_s < 1.0,
            "nobody waits in async"
        );
    }
}

#[test]
fn ssp_over_tcp_shards_with_a_slow_worker_process() {
    // Two shards, three `pstrain worker` processes, worker 2 slowed down by its own flag.
    let mut cfg = heterogeneous(Mode::Ssp { max_lead: 2 }, |_| {});
    cfg.plan.iterations = Some(60);
    let cluster =
        ClusterConfig::local(PathBuf::from(common::pstrain_bin()), 2, common::mnist_dir());
    let _guard = common::one_at_a_time();
    let out = train_tcp(
        &cfg,
        &cluster,
        common::mnist(),
        &mut Quiet,
        &AtomicBool::new(false),
    )
    .unwrap();
    let s = out.summary;
    println!("{}", s.render());
    assert_eq!(s.updates, 60);
    for w in &s.per_worker {
        assert!(
            w.numbers.max_lead <= 2 && w.numbers.staleness_max <= 2,
            "{w:?}"
        );
    }
    let (fast, slow) = (&s.per_worker[0], &s.per_worker[SLOW]);
    assert!(
        slow.numbers.compute_s > 2.0 * fast.numbers.compute_s,
        "the slowed-down process took longer per gradient: {s:?}"
    );
    assert!(fast.numbers.wait_s > slow.numbers.wait_s, "{s:?}");
}

/// Devices whose speeds change as the run goes (each draws a factor from 1 to 4 anew every
/// 0.3 s): async still reaches the threshold, and every worker keeps contributing.
#[test]
fn async_reaches_the_threshold_with_device_speeds_that_change() {
    let mut cfg = heterogeneous(
        Mode::Async {
            max_staleness: None,
        },
        |_| {},
    );
    cfg.slowdown.clear();
    cfg.speed_spread = Some(4.0);
    cfg.speed_period = Some(0.3);
    let s = run_bounded(cfg, BOUND);
    reaches_threshold("async, varying speeds", &s);
    let applied: Vec<u64> = s.per_worker.iter().map(|w| w.numbers.applied).collect();
    assert!(applied.iter().all(|&a| a > 0), "{applied:?}");
}

/// Devices replayed from a recorded speed trace (`--speed-trace`): rank 2 replays a device
/// six times slower than this machine after its first 0.2 s, rank 0 and 1 full-speed ones.
/// Async reaches the threshold and the traced-slow device contributes, less than the others.
#[test]
fn async_reaches_the_threshold_with_device_speeds_from_a_trace() {
    let trace = pstrain::run::speed_trace::SpeedTrace::parse(
        "device,from_s,factor\n0,0,1\n1,0,1\n2,0,1\n2,0.2,6\n",
    )
    .unwrap();
    let mut cfg = heterogeneous(
        Mode::Async {
            max_staleness: None,
        },
        |_| {},
    );
    cfg.slowdown.clear();
    cfg.speed_trace = Some((PathBuf::from("trace.csv"), std::sync::Arc::new(trace)));
    let s = run_bounded(cfg, BOUND);
    reaches_threshold("async, traced speeds", &s);
    let applied: Vec<u64> = s.per_worker.iter().map(|w| w.numbers.applied).collect();
    assert!(applied[SLOW] > 0, "{applied:?}");
    assert!(
        applied[SLOW] * 2 < applied[0] && applied[SLOW] * 2 < applied[1],
        "{applied:?}"
    );
}
