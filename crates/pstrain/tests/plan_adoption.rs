//! The shards own the run plan: a `pstrain worker` given only the shards' addresses, its rank
//! and its data runs the shards' plan and stops when it ends; one whose run flags contradict
//! the plan is refused with the flag and both values.

mod common;

use common::shard;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

/// Runs `pstrain worker` with `flags`, failing the test if it takes longer than `bound`.
fn worker(flags: &[&str], bound: Duration) -> Output {
    let mut child = Command::new(common::pstrain_bin())
        .arg("worker")
        .args(flags)
        .arg("--data-dir")
        .arg(common::mnist_dir())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let started = Instant::now();
    while child.try_wait().unwrap().is_none() {
        if started.elapsed() > bound {
            let _ = child.kill();
            panic!("the worker did not stop within {bound:?}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    child.wait_with_output().unwrap()
}

#[test]
fn a_worker_with_only_addresses_rank_and_data_runs_the_shards_plan_and_stops() {
    let _guard = common::one_at_a_time();
    let s = shard(&[
        "--model",
        "convnet",
        "--mode",
        "async",
        "--workers",
        "1",
        "--iterations",
        "300",
        "--optimizer",
        "sgd",
        "--lr-schedule",
        "constant",
        "--batch-size",
        "128",
    ]);
    let out = worker(
        &["--servers", &s.addr, "--rank", "0"],
        Duration::from_secs(60),
    );
    let report = common::worker_report(&out);
    // One async worker: every push is one update, and the run ends at the plan's 300.
    assert_eq!(report.steps, 300, "{report:?}");
    assert_eq!(report.samples, 300 * 128);
    // The shard saw its only worker leave and ended by itself.
    let mut shard = s;
    let started = Instant::now();
    while shard.child.try_wait().unwrap().is_none() {
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "the shard kept running"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn a_worker_whose_flags_contradict_the_plan_is_refused() {
    let _guard = common::one_at_a_time();
    // The case: the shard plans 5 epochs (the default), the worker says 300 updates.
    let s = shard(&[
        "--model",
        "convnet",
        "--mode",
        "async",
        "--workers",
        "1",
        "--keep-running",
    ]);
    let bound = Duration::from_secs(30);
    let out = worker(
        &["--servers", &s.addr, "--rank", "0", "--iterations", "300"],
        bound,
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        stderr.contains("--iterations: given 300, the shards' plan has none"),
        "{stderr}"
    );
    let out = worker(
        &["--servers", &s.addr, "--rank", "0", "--mode", "sync"],
        bound,
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(stderr.contains("--mode"), "{stderr}");
    assert!(stderr.contains("given sync"), "{stderr}");
    assert!(stderr.contains("plan has async"), "{stderr}");
}

#[test]
fn absurd_numbers_get_errors_not_panics() {
    for flags in [
        &[
            "server",
            "--listen",
            "127.0.0.1:0",
            "--heartbeat-timeout",
            "1e300",
        ][..],
        &[
            "server",
            "--listen",
            "127.0.0.1:0",
            "--checkpoint-dir",
            "/tmp/x",
            "--checkpoint-secs",
            "1e300",
        ],
        &[
            "server",
            "--listen",
            "127.0.0.1:0",
            "--epochs",
            "18446744073709551615",
            "--batch-size",
            "0",
        ],
        &[
            "worker",
            "--servers",
            "127.0.0.1:1",
            "--rank",
            "0",
            "--connect-timeout",
            "18446744073709551615",
        ],
    ] {
        let out = Command::new(common::pstrain_bin())
            .args(flags)
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{flags:?}");
        assert!(!stderr.contains("panicked"), "{flags:?}: {stderr}");
        assert!(stderr.contains("Error"), "{flags:?}: {stderr}");
    }
}
