//! A run larger than the machine (a batch size or a number of workers it cannot hold) is
//! refused before anything allocates, with the numbers and the flag to lower, and never
//! aborts the process on a failed allocation; a shard's plan names no more workers than the
//! wire carries; a worker told a batch it cannot hold leaves the shard serving the others.

mod common;

use std::path::Path;
use std::process::{Command, Output};
use std::time::Duration;

fn train(dir: &Path, flags: &[&str]) -> Output {
    Command::new(common::pstrain_bin())
        .args(["train", "--iterations", "2", "--data-dir"])
        .arg(dir)
        .args(flags)
        .output()
        .unwrap()
}

/// Exited with an error of its own (status 1), not killed by an abort, and said `words`.
fn refused(out: &Output, words: &[&str]) -> String {
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
    assert!(!stderr.contains("memory allocation"), "{stderr}");
    for w in words {
        assert!(stderr.contains(w), "should say `{w}`: {stderr}");
    }
    stderr
}

#[test]
fn a_batch_or_workers_past_the_memory_are_refused_before_allocating() {
    let dir = tempfile::tempdir().unwrap();
    common::write_synthetic_set(dir.path(), 50, 20);
    let out = train(dir.path(), &["--batch-size", "100000000"]);
    refused(
        &out,
        &[
            "not enough memory",
            "at a batch of 100000000",
            "--batch-size",
        ],
    );
    // Over TCP too (every worker process runs on this machine).
    let out = train(
        dir.path(),
        &["--batch-size", "100000000", "--transport", "tcp"],
    );
    refused(&out, &["not enough memory"]);
    // Workers past the memory (on MNIST: a set of 50 has room for 50 workers only).
    let out = train(&common::mnist_dir(), &["--workers", "60000"]);
    refused(&out, &["not enough memory", "60000 workers"]);
    let out = train(dir.path(), &["--workers", "51"]);
    refused(
        &out,
        &[
            "every worker needs a sample of its own",
            "51 for 50 samples",
        ],
    );
    // The benchmark's runs too.
    let out = Command::new(common::pstrain_bin())
        .args(["bench", "--batch-size", "100000000", "--seconds", "1"])
        .arg("--data-dir")
        .arg(dir.path())
        .output()
        .unwrap();
    refused(&out, &["not enough memory"]);
    // The transport benchmark's synthetic layout, and its shard counts, before any data.
    let bench_net = |flags: &[&str]| {
        Command::new(common::pstrain_bin())
            .arg("bench-net")
            .args(flags)
            .arg("--data-dir")
            .arg(dir.path().join("absent"))
            .output()
            .unwrap()
    };
    let out = bench_net(&["--synthetic-values", "10000000000000"]);
    refused(&out, &["not enough memory", "10000000000000 values"]);
    let out = bench_net(&["--shards", "1,0"]);
    refused(&out, &["--shards must be shard counts of at least 1"]);
    // Past the wire's bound, the plan itself is refused.
    let out = train(dir.path(), &["--workers", "65537"]);
    refused(&out, &["workers must be at most 65536"]);
}

#[test]
fn a_worker_told_a_batch_it_cannot_hold_is_refused_and_the_shard_serves_on() {
    let _guard = common::one_at_a_time();
    let dir = tempfile::tempdir().unwrap();
    common::write_synthetic_set(dir.path(), 200, 20);
    let worker = |addr: &str, rank: &str| {
        Command::new(common::pstrain_bin())
            .args(["worker", "--servers", addr, "--rank", rank, "--data-dir"])
            .arg(dir.path())
            .output()
            .unwrap()
    };
    let plan = ["--workers", "1", "--train-samples", "200", "--iterations"];
    let huge = common::shard(&[&plan[..], &["20", "--batch-size", "100000000"]].concat());
    let out = worker(&huge.addr, "0");
    refused(
        &out,
        &["not enough memory", "1 worker at a batch of 100000000"],
    );
    // The shard is still there for a worker that fits; a plan this machine holds runs.
    let fits = common::shard(&[&plan[..], &["20", "--batch-size", "8"]].concat());
    let stats = common::worker_report(&worker(&fits.addr, "0"));
    assert_eq!(stats.steps, 20, "{stats:?}");
    let second = Duration::from_secs(1);
    let served = pstrain_net::describe(
        std::slice::from_ref(&huge.addr),
        10 * second,
        10 * second,
        None,
        None,
    )
    .expect("the refused worker's shard still answers");
    assert_eq!(served.plan.batch_size, 100_000_000);
}

/// A batch larger than a worker's share of a small set trains (each batch repeats samples)
/// and says so; a batch that fits says nothing.
#[test]
fn a_batch_past_a_workers_share_trains_and_says_it_repeats_samples() {
    let dir = tempfile::tempdir().unwrap();
    common::write_synthetic_set(dir.path(), 50, 20);
    let note = "a batch of 64 is more than a worker's 25 training samples";
    let out = train(dir.path(), &["--model", "convnet", "--batch-size", "64"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(stderr.contains(note), "{stderr}");
    let out = train(dir.path(), &["--model", "convnet", "--batch-size", "25"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(!stderr.contains("training samples: each"), "{stderr}");
}
