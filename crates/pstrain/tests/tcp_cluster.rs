//! Separate processes over TCP on 127.0.0.1: 2 server shards and 2 workers reach the same
//! accuracy thresholds as the in-process runs, and sync mode gives the same weights.

mod common;

use pstrain::cluster::{train_tcp, ClusterConfig};
use pstrain::{train, Quiet, Schedule, TrainConfig, TrainOutcome};
use pstrain_compute::ModelKind;
use pstrain_core::{Aggregate, Mode, OptimizerConfig};
use std::path::PathBuf;
use std::sync::atomic::AtomicBool;

fn cluster(shards: usize) -> ClusterConfig {
    ClusterConfig {
        exe: PathBuf::from(common::pstrain_bin()),
        shards,
        data_dir: common::mnist_dir(),
    }
}

fn run_tcp(cfg: &TrainConfig, shards: usize) -> TrainOutcome {
    let _guard = common::one_at_a_time();
    let outcome = train_tcp(
        cfg,
        &cluster(shards),
        common::mnist(),
        &mut Quiet,
        &AtomicBool::new(false),
    )
    .unwrap();
    println!("{}", outcome.summary.render());
    assert_eq!(outcome.summary.test_samples, 10_000);
    outcome
}

const SYNC: Mode = Mode::Sync { backup_workers: 0 };
const ASYNC: Mode = Mode::Async {
    max_staleness: Some(32),
};

fn cnn_one_epoch(mode: Mode) -> TrainConfig {
    TrainConfig {
        mode,
        workers: 2,
        model: ModelKind::Cnn,
        epochs: 1,
        batch_size: 16,
        eval_every: Some(0),
        ..TrainConfig::default()
    }
}

fn convnet_as_original(mode: Mode, iterations: u64) -> TrainConfig {
    TrainConfig {
        mode,
        workers: 2,
        model: ModelKind::Convnet,
        iterations: Some(iterations),
        batch_size: 128,
        optimizer: OptimizerConfig::sgd(0.01),
        schedule: Schedule::Constant,
        aggregate: Aggregate::Sum,
        eval_every: Some(0),
        ..TrainConfig::default()
    }
}

#[test]
fn cnn_sync_two_shards_two_workers_reaches_98_5() {
    let s = run_tcp(&cnn_one_epoch(SYNC), 2).summary;
    assert!(s.test_accuracy >= 0.985, "{}", s.test_accuracy);
}

#[test]
fn cnn_async_two_shards_two_workers_reaches_98_5() {
    let s = run_tcp(&cnn_one_epoch(ASYNC), 2).summary;
    assert!(s.test_accuracy >= 0.985, "{}", s.test_accuracy);
}

#[test]
fn convnet_async_over_tcp_reaches_85() {
    let s = run_tcp(&convnet_as_original(ASYNC, 400), 2).summary;
    assert_eq!(s.updates, 400);
    assert!(s.test_accuracy >= 0.85, "{}", s.test_accuracy);
}

#[test]
fn sync_over_tcp_gives_the_in_process_weights() {
    for cfg in [convnet_as_original(SYNC, 200), {
        // A few steps of the big model with Adam and dropout: sharding splits fc1.weight.
        TrainConfig {
            iterations: Some(20),
            ..cnn_one_epoch(SYNC)
        }
    }] {
        let tcp = run_tcp(&cfg, 2);
        let local = {
            let _guard = common::one_at_a_time();
            train(&cfg, common::mnist(), &mut Quiet, &AtomicBool::new(false)).unwrap()
        };
        assert_eq!(tcp.summary.updates, local.summary.updates);
        let worst = tcp
            .params
            .iter()
            .zip(&local.params)
            .map(|(a, b)| (a - b).abs())
            .fold(0.0f32, f32::max);
        assert!(
            worst <= 1e-6,
            "{}: largest weight difference {worst}",
            cfg.model
        );
        assert!(local.summary.test_accuracy == tcp.summary.test_accuracy);
        if cfg.model == ModelKind::Convnet {
            assert!(
                tcp.summary.test_accuracy >= 0.85,
                "{}",
                tcp.summary.test_accuracy
            );
        }
    }
}
