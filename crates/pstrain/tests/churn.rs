//! Devices that come and go (`train --transport tcp --churn`): workers are killed at random
//! with no goodbye and started again with their rank half a second later, many times over a
//! run.
//! Sync, SSP, async and buffered runs all reach their update budget and the convnet's
//! threshold, and the summary says how many left and came back.

mod common;

use pstrain::launch::churn::{Churn, LateJoin};
use pstrain::launch::cluster::{train_tcp, ClusterConfig};
use pstrain::Quiet;
use pstrain_core::{Aggregate, Mode, OptimizerConfig, ScheduleKind};
use std::path::PathBuf;
use std::sync::atomic::AtomicBool;
use std::time::Duration;

const WORKERS: usize = 6;
const UPDATES: u64 = 3000;
/// Async updates wait for no one: 3,000 of them took 1.4 s on a fast machine, too short for
/// the five departures asserted (departures follow the clock, not the updates); 12,000 took
/// 4.2 s there, with 12 departures (SSP's 3,000 took 5.0 s with 13, buffered's 3.2 s with 9).
const ASYNC_UPDATES: u64 = 12_000;

fn churned(mode: Mode, updates: u64) {
    let _guard = common::one_at_a_time();
    // The original Ray example's convnet and rate; a lockstep step sums its gradients as
    // that example's sync server did.
    let mut cfg = common::convnet_as_original(mode, updates);
    cfg.plan.workers = WORKERS;
    let mut cluster =
        ClusterConfig::local(PathBuf::from(common::pstrain_bin()), 1, common::mnist_dir());
    // Each worker leaves about every 2 s and is away for half a second: with 6 workers,
    // about three departures a second.
    cluster.churn = Some(Churn {
        leave_per_minute: 30.0,
        away: Duration::from_millis(500),
        seed: 11,
    });
    let data = common::mnist();
    let outcome = common::within(Duration::from_secs(240), move || {
        train_tcp(&cfg, &cluster, data, &mut Quiet, &AtomicBool::new(false))
    })
    .unwrap();
    let s = outcome.summary;
    println!("{}", s.render());
    let churn = s.churn.expect("the summary counts the churn");
    assert!(churn.left >= 5, "{mode}: {churn:?}");
    // Everyone who left came back, but those still away when the run ended.
    assert!(
        churn.came_back + WORKERS as u64 >= churn.left,
        "{mode}: {churn:?}"
    );
    assert_eq!(s.updates, updates, "{mode}: the run reached its budget");
    assert!(s.test_accuracy >= 0.85, "{mode}: {}", s.test_accuracy);
}

#[test]
fn sync_steps_go_on_while_workers_come_and_go() {
    churned(Mode::Sync { backup_workers: 0 }, UPDATES);
}

#[test]
fn ssp_goes_on_while_workers_come_and_go() {
    churned(Mode::Ssp { max_lead: 2 }, UPDATES);
}

#[test]
fn async_goes_on_while_workers_come_and_go() {
    churned(
        Mode::Async {
            max_staleness: Some(32),
        },
        ASYNC_UPDATES,
    );
}

#[test]
fn buffered_goes_on_while_workers_come_and_go() {
    churned(
        Mode::Buffered {
            k: 3,
            max_staleness: Some(32),
        },
        UPDATES,
    );
}

/// A fleet on one machine: 256 light workers (two processes of 128, each worker with its own
/// rank, connections and heartbeat) with a fifth of them leaving each 10 s and back 1 s
/// later, told so by the launcher over the process's stdin, and 32 joining late.
fn fleet_churned(mode: Mode, updates: u64, schedule: ScheduleKind) {
    const FLEET: usize = 256;
    let _guard = common::one_at_a_time();
    let mut cfg = common::convnet_as_original(mode, updates);
    cfg.plan.workers = FLEET;
    cfg.plan.batch_size = 16;
    // 256 gradients summed would be 256 times a step: a fleet averages them.
    cfg.plan.aggregate = Aggregate::Mean;
    cfg.plan.optimizer = OptimizerConfig::adam(0.002);
    cfg.plan.schedule = schedule;
    let mut cluster =
        ClusterConfig::local(PathBuf::from(common::pstrain_bin()), 1, common::mnist_dir());
    cluster.workers_per_process = FLEET / 2;
    // Departures follow the clock, so a run that goes faster sees fewer: at a tenth each
    // 10 s, a CI run saw 17 (under the 20 asserted below) where others saw 25; at a fifth,
    // 37-38 in 8 s runs here, 20 in anything over about 4 s.
    cluster.churn = Some(Churn {
        leave_per_minute: 1.2,
        away: Duration::from_secs(1),
        seed: 5,
    });
    // And the last 32 join 3 s into the run.
    cluster.late = Some(LateJoin {
        workers: 32,
        after: Duration::from_secs(3),
    });
    let data = common::mnist();
    let outcome = common::within(Duration::from_secs(400), move || {
        train_tcp(&cfg, &cluster, data, &mut Quiet, &AtomicBool::new(false))
    })
    .unwrap();
    let s = outcome.summary;
    println!("{}", s.render());
    let churn = s.churn.expect("the summary counts the churn");
    assert!(churn.left >= 20, "{mode}: {churn:?}");
    assert_eq!(churn.joined_late, 32, "{mode}");
    assert!(
        churn.came_back + FLEET as u64 >= churn.left,
        "{mode}: {churn:?}"
    );
    assert_eq!(s.updates, updates, "{mode}: the run reached its budget");
    assert_eq!(s.per_worker.len(), FLEET);
    // Every worker took part: none was starved by the others in its process.
    let idle: Vec<_> = (s.per_worker.iter())
        .filter(|w| w.steps_per_s <= 0.0)
        .map(|w| w.rank)
        .collect();
    assert!(
        idle.is_empty(),
        "{mode}: workers that never sent a gradient: {idle:?}"
    );
    let memory = s.processes.iter().find(|p| p.process == "workers 0-127");
    assert!(memory.is_some(), "{:?}", s.processes);
    assert!(s.test_accuracy >= 0.85, "{mode}: {}", s.test_accuracy);
}

#[test]
fn a_fleet_of_256_light_workers_keeps_syncing_through_churn() {
    fleet_churned(
        Mode::Sync { backup_workers: 0 },
        150,
        ScheduleKind::Constant,
    );
}

#[test]
fn a_fleet_of_256_light_workers_keeps_buffering_through_churn() {
    fleet_churned(
        Mode::Buffered {
            k: 16,
            max_staleness: Some(64),
        },
        3000,
        // Decayed to the end, as pstrain's runs are by default: at a constant rate the
        // weights a buffered fleet ends on depend on which stale gradients came last
        // (81.9-95.1% over six runs, one under the threshold in CI); decayed, 94.5-95.1%
        // over eight. (Sync's 150 updates learn faster at the constant rate: 91.0% against
        // 88.5%, deterministic.)
        ScheduleKind::Cosine,
    );
}

#[test]
fn light_workers_need_a_first_rank_and_fit_the_run() {
    let out = std::process::Command::new(common::pstrain_bin())
        .args([
            "worker",
            "--servers",
            "127.0.0.1:1",
            "--rank",
            "auto",
            "--count",
            "2",
        ])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("first"), "{err}");
}

#[test]
fn workers_alone_in_their_process_can_join_late() {
    let _guard = common::one_at_a_time();
    let mut cfg = common::convnet_as_original(Mode::Sync { backup_workers: 0 }, 600);
    cfg.plan.workers = 4;
    let mut cluster =
        ClusterConfig::local(PathBuf::from(common::pstrain_bin()), 1, common::mnist_dir());
    cluster.late = Some(LateJoin {
        workers: 1,
        after: Duration::from_secs(2),
    });
    let data = common::mnist();
    let outcome = common::within(Duration::from_secs(120), move || {
        train_tcp(&cfg, &cluster, data, &mut Quiet, &AtomicBool::new(false))
    })
    .unwrap();
    let s = outcome.summary;
    println!("{}", s.render());
    let churn = s.churn.expect("the summary counts who joined late");
    assert_eq!((churn.joined_late, churn.left), (1, 0));
    assert_eq!(s.updates, 600);
    // The late worker took part once it joined.
    assert!(s.per_worker[3].steps_per_s > 0.0, "{:?}", s.per_worker[3]);
    assert!(s.test_accuracy >= 0.85, "{}", s.test_accuracy);
}
