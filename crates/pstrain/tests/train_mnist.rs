//! Training claims on real MNIST, asserted on the full 10,000-image test set.

mod common;

use common::{cnn_one_epoch, convnet_as_original};

use pstrain::{train, Quiet, TrainConfig};
use pstrain_compute::mnist::{Mnist, Split};
use pstrain_compute::DataShape;
use pstrain_core::Mode;
use std::sync::atomic::AtomicBool;

fn run(cfg: TrainConfig) -> pstrain::report::records::Summary {
    let _guard = common::one_at_a_time();
    let outcome = train(&cfg, common::mnist(), &mut Quiet, &AtomicBool::new(false)).unwrap();
    let s = outcome.summary;
    println!("{}", s.render());
    assert_eq!(s.test_samples, 10_000);
    s
}

const SYNC: Mode = Mode::Sync { backup_workers: 0 };
const ASYNC: Mode = Mode::Async {
    max_staleness: Some(32),
};

#[test]
fn cnn_sync_two_workers_one_epoch_reaches_98_5() {
    let s = run(cnn_one_epoch(SYNC));
    assert!(s.samples >= 60_000 && s.samples < 61_000, "{}", s.samples);
    assert_eq!(s.staleness_max, 0);
    assert!(s.test_accuracy >= 0.985, "{}", s.test_accuracy);
}

/// Async's one epoch ends just above sync's: 98.63-98.69% in five runs on a quiet machine and
/// 98.49% in one CI run (2026-12-04; the arrival order of the two workers' gradients differs
/// from run to run), so the bar is 98.4%, below that spread.
#[test]
fn cnn_async_two_workers_one_epoch_reaches_98_4() {
    let s = run(cnn_one_epoch(ASYNC));
    assert!(s.samples >= 60_000 && s.samples < 61_000, "{}", s.samples);
    assert!(
        s.staleness_mean > 0.0,
        "two async workers see stale weights"
    );
    assert!(s.test_accuracy >= 0.984, "{}", s.test_accuracy);
}

/// FedBuff: 4 workers, every 4 arriving gradients (from whoever sent them) one update of
/// their 64 samples' mean; nobody waits.
/// Overlapped workers (each pushes and pulls while computing its next gradient, one round
/// staler) reach async's threshold in two epochs (in one they end near it, 98.4-98.8% in four
/// runs: the staler gradients cost a little accuracy per update).
#[test]
fn cnn_async_overlapped_two_workers_two_epochs_reaches_98_5() {
    let mut cfg = TrainConfig {
        overlap: true,
        ..cnn_one_epoch(ASYNC)
    };
    cfg.plan.epochs = 2;
    let s = run(cfg);
    assert!(s.samples >= 120_000 && s.samples < 121_000, "{}", s.samples);
    // Each gradient arrives after the worker's own previous one and the other's: 2 or more
    // (without overlap about 1).
    assert!(s.staleness_mean > 1.5, "{}", s.staleness_mean);
    assert!(s.test_accuracy >= 0.985, "{}", s.test_accuracy);
}

#[test]
fn cnn_buffered_four_workers_one_epoch_reaches_98() {
    let mut cfg = cnn_one_epoch(Mode::Buffered {
        k: 4,
        max_staleness: Some(32),
    });
    cfg.plan.workers = 4;
    cfg.plan.optimizer = pstrain_core::OptimizerConfig::adam(2e-3);
    let s = run(cfg);
    assert!(s.samples >= 60_000 && s.samples < 61_000, "{}", s.samples);
    // About a quarter of the updates async would make: 4 gradients each.
    assert!(s.updates <= 60_000 / 64 + 1, "{}", s.updates);
    assert!(s.test_accuracy >= 0.98, "{}", s.test_accuracy);
}

#[test]
fn convnet_sync_200_iterations_reaches_85() {
    let s = run(convnet_as_original(SYNC, 200));
    assert_eq!(s.updates, 200);
    assert!(s.test_accuracy >= 0.85, "{}", s.test_accuracy);
}

#[test]
fn convnet_async_200_iterations_per_worker_reaches_85() {
    let s = run(convnet_as_original(ASYNC, 400));
    assert_eq!(s.updates, 400);
    assert!(s.test_accuracy >= 0.85, "{}", s.test_accuracy);
}

/// Real MNIST as another data set: padded to 32x32 (LeNet's input) with its labels counted
/// from 1 (as EMNIST's letters are), so 11 classes, the first with no sample.
fn mnist_padded_counted_from_one() -> Mnist {
    let pad = |split: &Split| {
        let shape = DataShape {
            rows: 32,
            cols: 32,
            classes: split.shape.classes + 1,
        };
        let mut pixels = vec![0u8; split.len() * shape.pixels()];
        for (image, padded) in split
            .pixels
            .chunks_exact(28 * 28)
            .zip(pixels.chunks_exact_mut(32 * 32))
        {
            for (row, out) in image
                .chunks_exact(28)
                .zip(padded[2 * 32..].chunks_exact_mut(32))
            {
                out[2..30].copy_from_slice(row);
            }
        }
        let labels = split.labels.iter().map(|&l| l + 1).collect();
        Split::from_pixels(shape, &pixels, labels)
    };
    let data = common::mnist();
    Mnist {
        train: pad(&data.train),
        test: pad(&data.test),
    }
}

#[test]
fn convnet_sized_for_padded_mnist_counted_from_one_reaches_85() {
    let data = mnist_padded_counted_from_one();
    let mut cfg = convnet_as_original(SYNC, 200);
    // The model named without a shape is refused on these images, and sized by the data.
    let for_mnist = train(&cfg, &data, &mut Quiet, &AtomicBool::new(false));
    assert!(
        for_mnist.is_err_and(|e| e.to_string().contains("`--model convnet:32x32:11`")),
        "a model for 28x28 images must not take 32x32 ones"
    );
    cfg.adopt_data_shape(data.shape()).unwrap();
    assert_eq!(cfg.plan.model, "convnet:32x32:11");
    let _guard = common::one_at_a_time();
    let s = train(&cfg, &data, &mut Quiet, &AtomicBool::new(false))
        .unwrap()
        .summary;
    println!("{}", s.render());
    assert_eq!((s.test_samples, s.updates), (10_000, 200));
    assert!(s.test_accuracy >= 0.85, "{}", s.test_accuracy);
}

#[test]
fn cli_defaults_reach_99() {
    let _guard = common::one_at_a_time();
    let dir = tempfile::tempdir().unwrap();
    let metrics = dir.path().join("m.jsonl");
    let out = std::process::Command::new(common::pstrain_bin())
        .args(["train", "--metrics"])
        .arg(&metrics)
        .env("PSTRAIN_DATA_DIR", common::mnist_dir())
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    println!("{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success());
    assert!(stdout.contains("test accuracy"));
    let text = std::fs::read_to_string(&metrics).unwrap();
    let records: Vec<serde_json::Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let summary = records.last().unwrap();
    assert_eq!(summary["event"], "summary");
    assert_eq!(summary["model"], "cnn");
    assert_eq!(summary["mode"], "async");
    assert_eq!(summary["workers"], 2);
    assert_eq!(summary["test_samples"], 10_000);
    let acc = summary["test_accuracy"].as_f64().unwrap();
    assert!(acc >= 0.99, "default run reached {acc}");
    // One evaluation per epoch plus the final one, and progress samples in between.
    let evals = records.iter().filter(|r| r["event"] == "eval").count();
    assert!(evals >= 3, "{evals} evaluations");
    assert!(records.iter().any(|r| r["event"] == "progress"));
}

#[test]
fn metrics_into_a_pipe_or_a_full_device() {
    let _guard = common::one_at_a_time();
    let train = |metrics: &str| {
        std::process::Command::new(common::pstrain_bin())
            .args(["train", "--iterations", "30", "--metrics", metrics])
            .env("PSTRAIN_DATA_DIR", common::mnist_dir())
            .output()
            .unwrap()
    };
    // `/dev/stdout` as the file, stdout a pipe (as `output()` makes it): the records come down
    // the pipe beside the log (before, opening the file read the pipe and waited forever).
    let out = train("/dev/stdout");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let summary = stdout
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .find(|r| r["event"] == "summary")
        .unwrap_or_else(|| panic!("no summary record in {stdout}"));
    assert_eq!(summary["updates"], 30);
    // A device that refuses every write: said when it happens, the run still trains to its
    // end, and ends with the error.
    let out = train("/dev/full");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(stdout.contains("test accuracy"), "{stdout}");
    assert!(
        stderr.contains("writing the metrics file failed (No space left on device")
            && stderr.contains("training goes on without it"),
        "{stderr}"
    );
    assert!(
        stderr.contains("training finished but writing the metrics file failed"),
        "{stderr}"
    );
}
