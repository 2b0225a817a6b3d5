//! Checkpoints: an interrupted sync run resumed from its checkpoint ends with the weights of
//! the uninterrupted run; a damaged newest checkpoint is reported and the previous one used;
//! `pstrain export` writes a file Python's safetensors opens with the model's names and shapes.

mod common;

use pstrain::metrics::ProgressRecord;
use pstrain::train::CheckpointPolicy;
use pstrain::{train, Observer, Quiet, RunPlan, TrainConfig};
use pstrain_compute::ModelKind;
use pstrain_core::Mode;
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};

/// Interrupts the run (as Ctrl-C does) once the server has made some updates.
struct StopAfter<'a> {
    stop: &'a AtomicBool,
    updates: u64,
}

impl Observer for StopAfter<'_> {
    fn progress(&mut self, r: &ProgressRecord) {
        if r.updates >= self.updates {
            self.stop.store(true, Ordering::Relaxed);
        }
    }
}

#[test]
fn resumed_sync_run_matches_the_uninterrupted_one() {
    let _guard = common::one_at_a_time();
    let data = common::mnist();
    let dir = tempfile::tempdir().unwrap();
    // The big model with dropout, Adam (moments + step) and a cosine schedule: everything a
    // resume has to get right.
    let cfg = TrainConfig {
        plan: RunPlan {
            mode: Mode::Sync { backup_workers: 0 },
            workers: 2,
            model: ModelKind::Cnn.name().into(),
            iterations: Some(120),
            batch_size: 16,
            ..RunPlan::default()
        },
        eval_every: Some(0),
        ..TrainConfig::default()
    };
    let whole = train(&cfg, data, &mut Quiet, &AtomicBool::new(false)).unwrap();
    assert_eq!(whole.summary.updates, 120);

    let policy = CheckpointPolicy {
        dir: dir.path().to_owned(),
        every_updates: Some(10),
        every: None,
        keep: 3,
        resume: false,
    };
    let first = TrainConfig {
        checkpoint: Some(policy.clone()),
        ..cfg.clone()
    };
    let stop = AtomicBool::new(false);
    let part = train(
        &first,
        data,
        &mut StopAfter {
            stop: &stop,
            updates: 1,
        },
        &stop,
    )
    .unwrap();
    let stopped_at = part.summary.updates;
    assert!(part.summary.stopped_early);
    assert!(
        stopped_at > 0 && stopped_at < 120,
        "interrupted at {stopped_at}"
    );

    let second = TrainConfig {
        checkpoint: Some(CheckpointPolicy {
            resume: true,
            ..policy
        }),
        ..cfg
    };
    let rest = train(&second, data, &mut Quiet, &AtomicBool::new(false)).unwrap();
    assert_eq!(rest.summary.updates, 120);
    let worst = rest
        .params
        .iter()
        .zip(&whole.params)
        .map(|(a, b)| (a - b).abs())
        .fold(0.0f32, f32::max);
    println!("interrupted at {stopped_at}; largest difference after resuming: {worst}");
    assert!(worst <= 1e-6, "resumed weights differ by up to {worst}");
}

fn pstrain(args: &[&str]) -> (bool, String, String) {
    let out = Command::new(common::pstrain_bin())
        .args(args)
        .env("PSTRAIN_DATA_DIR", common::mnist_dir())
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

const CONVNET: [&str; 7] = [
    "train",
    "--model",
    "convnet",
    "--mode",
    "sync",
    "--optimizer",
    "momentum",
];

#[test]
fn damaged_newest_checkpoint_falls_back_to_the_previous() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().to_str().unwrap();
    let run = |extra: &[&str]| {
        let mut args = CONVNET.to_vec();
        args.extend_from_slice(extra);
        pstrain(&args)
    };
    let (ok, _, err) = run(&["--iterations", "20", "--checkpoint-dir", d]);
    assert!(ok, "{err}");
    let (ok, _, err) = run(&["--iterations", "40", "--resume", d]);
    assert!(ok, "{err}");
    assert!(err.contains("version 20"), "{err}");
    let newest = dir
        .path()
        .join("shard-0-of-1/ckpt-000000000040.safetensors");
    let mut bytes = std::fs::read(&newest).unwrap();
    let n = bytes.len();
    bytes[n - 5] ^= 0x10;
    std::fs::write(&newest, &bytes).unwrap();

    let (ok, out, err) = run(&["--iterations", "60", "--resume", d]);
    assert!(ok, "{err}");
    assert!(err.contains("checksum mismatch"), "{err}");
    assert!(err.contains("ckpt-000000000020"), "{err}");
    assert!(out.contains("updates        60"), "{out}");

    // A truncated file is caught too, and resuming from nothing is a clear error.
    std::fs::write(&newest, &bytes[..n / 3]).unwrap();
    let empty = tempfile::tempdir().unwrap();
    let (ok, _, err) = run(&[
        "--iterations",
        "10",
        "--resume",
        empty.path().to_str().unwrap(),
    ]);
    assert!(!ok);
    assert!(err.contains("no valid checkpoint"), "{err}");
    assert!(!err.contains("panicked"), "{err}");
}

#[test]
fn export_opens_in_python_safetensors() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().to_str().unwrap();
    let mut args = CONVNET.to_vec();
    args.extend_from_slice(&["--iterations", "30", "--checkpoint-dir", d]);
    let (ok, _, err) = pstrain(&args);
    assert!(ok, "{err}");
    let (ok, out, err) = pstrain(&["eval", "--checkpoint", d]);
    assert!(ok, "{err}");
    assert!(out.contains("test accuracy"), "{out}");
    let file = dir.path().join("model.safetensors");
    let (ok, _, err) = pstrain(&["export", "--checkpoint", d, "--out", file.to_str().unwrap()]);
    assert!(ok, "{err}");

    let script = "import sys\n\
from safetensors.numpy import load_file\n\
t = load_file(sys.argv[1])\n\
for k in sorted(t): print(k, list(t[k].shape), t[k].dtype)\n";
    let py = Command::new("python3")
        .args(["-c", script])
        .arg(&file)
        .output();
    let out = match py {
        Ok(o) if o.status.success() => String::from_utf8_lossy(&o.stdout).into_owned(),
        other => {
            let why = format!("{other:?}");
            if std::env::var_os("CI").is_some() {
                panic!("CI installs Python's safetensors; it failed: {why}");
            }
            println!("SKIPPED the Python check (pip install safetensors numpy): {why}");
            return;
        }
    };
    assert_eq!(
        out.lines().collect::<Vec<_>>(),
        [
            "conv1.bias [3] float32",
            "conv1.weight [3, 1, 3, 3] float32",
            "fc.bias [10] float32",
            "fc.weight [10, 192] float32"
        ]
    );
}
