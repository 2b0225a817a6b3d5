//! Devices that come and go (`train --transport tcp --churn`): workers are killed at random
//! with no goodbye and started again with their rank half a second later, many times over a
//! run.
//! Sync, SSP, async and buffered runs all reach their update budget and the convnet's
//! threshold, and the summary says how many left and came back.

mod common;

use pstrain::launch::churn::Churn;
use pstrain::launch::cluster::{train_tcp, ClusterConfig};
use pstrain::Quiet;
use pstrain_core::Mode;
use std::path::PathBuf;
use std::sync::atomic::AtomicBool;
use std::time::Duration;

const WORKERS: usize = 6;
const UPDATES: u64 = 3000;

fn churned(mode: Mode) {
    let _guard = common::one_at_a_time();
    // The original Ray example's convnet and rate; a lockstep step sums its gradients as
    // that example's sync server did.
    let mut cfg = common::convnet_as_original(mode, UPDATES);
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
    assert_eq!(s.updates, UPDATES, "{mode}: the run reached its budget");
    assert!(s.test_accuracy >= 0.85, "{mode}: {}", s.test_accuracy);
}

#[test]
fn sync_steps_go_on_while_workers_come_and_go() {
    churned(Mode::Sync { backup_workers: 0 });
}

#[test]
fn ssp_goes_on_while_workers_come_and_go() {
    churned(Mode::Ssp { max_lead: 2 });
}

#[test]
fn async_goes_on_while_workers_come_and_go() {
    churned(Mode::Async {
        max_staleness: Some(32),
    });
}

#[test]
fn buffered_goes_on_while_workers_come_and_go() {
    churned(Mode::Buffered {
        k: 3,
        max_staleness: Some(32),
    });
}
