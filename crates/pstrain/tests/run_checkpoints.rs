//! Run-consistent checkpoints over TCP: every shard of a run (sync, async) killed with SIGKILL
//! at the same moment and restarted restores the same manifest point, whatever each shard had
//! written last, and the weights there are those of an uninterrupted run stopped cleanly at
//! that version.

mod common;

use common::KillOnDrop as Proc;
use pstrain_store::{assemble, Manifest};
use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// Constant rate, so a run's weights at version V do not depend on its total budget.
const PLAN: [&str; 12] = [
    "--model",
    "convnet",
    "--workers",
    "2",
    "--batch-size",
    "64",
    "--optimizer",
    "sgd",
    "--lr",
    "0.05",
    "--lr-schedule",
    "constant",
];
const EVERY: u64 = 40;

/// `pstrain ARGS` of the run in `mode` (`PLAN` is added for every command but `worker`,
/// which takes the plan from the shards).
fn pstrain(args: &[&str], token: &str, mode: &str) -> Command {
    let mut c = Command::new(common::pstrain_bin());
    c.args(args);
    if args[0] != "worker" {
        c.args(PLAN).args(["--mode", mode]);
    }
    c.env("PSTRAIN_TOKEN", token)
        .env("PSTRAIN_DATA_DIR", common::mnist_dir());
    c
}

/// A shard of the run on a free port; its address and the process.
fn shard(
    dir: &Path,
    i: usize,
    token: &str,
    mode: &str,
) -> (Proc, String, BufReader<std::process::ChildStderr>) {
    shard_with(dir, i, token, 100_000, EVERY, mode)
}

/// A shard of `iterations` updates checkpointing every `every` into `dir`.
fn shard_with(
    dir: &Path,
    i: usize,
    token: &str,
    iterations: u64,
    every: u64,
    mode: &str,
) -> (Proc, String, BufReader<std::process::ChildStderr>) {
    let d = dir.to_str().unwrap();
    let (iterations, every) = (iterations.to_string(), every.to_string());
    let mut child = pstrain(
        &[
            "server",
            "--listen",
            "127.0.0.1:0",
            "--shard",
            &i.to_string(),
            "--shards",
            "2",
            "--iterations",
            &iterations,
            "--checkpoint-dir",
            d,
            "--checkpoint-every",
            &every,
            "--checkpoint-secs",
            "0",
            "--run-id",
            "kill-all",
        ],
        token,
        mode,
    )
    .stdout(Stdio::piped())
    .stderr(Stdio::piped())
    .spawn()
    .unwrap();
    let addr = common::listening_address(&mut child);
    let stderr = BufReader::new(child.stderr.take().unwrap());
    (Proc(child), addr, stderr)
}

/// The version a restarted shard says it restored.
fn restored_version(stderr: &mut BufReader<std::process::ChildStderr>) -> u64 {
    let mut text = String::new();
    for line in stderr.lines() {
        let line = line.unwrap();
        text.push_str(&line);
        text.push('\n');
        if let Some(rest) = line.split("(version ").nth(1) {
            if line.contains("restored") {
                assert!(line.contains("the run's newest complete point"), "{line}");
                return rest.split(')').next().unwrap().parse().unwrap();
            }
        }
    }
    panic!("the shard never said what it restored:\n{text}")
}

fn newest_file_version(dir: &Path, shard: usize) -> u64 {
    pstrain_store::CheckpointDir::for_shard(dir, shard, 2, 1)
        .list()
        .first()
        .map_or(0, |(v, _)| *v)
}

/// The run's two workers.
/// The key a run with `token` seals its files with.
fn file_key(token: &str) -> pstrain_store::FileKey {
    pstrain_net::RunToken::parse(token).unwrap().file_key()
}

fn workers(servers: &str, token: &str) -> Vec<Proc> {
    (0..2)
        .map(|r| {
            pstrain(
                &["worker", "--servers", servers, "--rank", &r.to_string()],
                token,
                "",
            )
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .map(Proc)
            .unwrap()
        })
        .collect()
}

#[test]
fn a_failing_disk_backs_off_and_fails_the_shard_at_the_end() {
    let _guard = common::one_at_a_time();
    let token = pstrain_net::RunToken::generate().unwrap().to_hex();
    let dir = tempfile::tempdir().unwrap();
    let (updates, every) = (3000, 5);
    let mut shards: Vec<_> = (0..2)
        .map(|i| shard_with(dir.path(), i, &token, updates, every, "sync"))
        .collect();
    // Once the shards serve (each checked its folder at the start), shard 0's folder is
    // replaced by a file of its name, before any worker: every save of shard 0 fails.
    let folder = dir.path().join("shard-0-of-2");
    std::fs::remove_dir_all(&folder).unwrap();
    std::fs::write(&folder, b"in the way").unwrap();
    let servers = format!("{},{}", shards[0].1, shards[1].1);
    let mut workers = workers(&servers, &token);
    for w in &mut workers {
        assert!(w.wait().unwrap().success());
    }
    let mut logs = Vec::new();
    for (s, _, err) in &mut shards {
        let mut text = String::new();
        std::io::Read::read_to_string(err, &mut text).unwrap();
        logs.push((s.wait().unwrap(), text));
    }
    let (status, log) = &logs[0];
    let attempts = log.matches("checkpoint failed (").count();
    println!("{} intervals, {attempts} attempts:\n{log}", updates / every);
    assert!(attempts >= 2, "no retry after the backoff: {log}");
    assert!(
        attempts <= 12,
        "a failing disk was retried at every interval ({attempts} of {})",
        updates / every
    );
    assert!(log.contains("next attempt in"), "{log}");
    assert!(
        !status.success(),
        "a shard whose final checkpoint failed exited 0"
    );
    assert!(log.contains("final checkpoint failed"), "{log}");
    assert!(logs[1].0.success(), "{}", logs[1].1);
}

/// Runs 2 shards and 2 workers in `mode`, kills every shard at the same moment (at the
/// worst moment: shard 1 had not put its newest file in place) and restarts them; checks
/// that both restored the same point, the one before. Returns the folder, the point and the
/// token.
fn kill_every_shard_at_once(mode: &str) -> (tempfile::TempDir, u64, String) {
    let token = pstrain_net::RunToken::generate().unwrap().to_hex();
    let dir = tempfile::tempdir().unwrap();
    let mut shards: Vec<_> = (0..2).map(|i| shard(dir.path(), i, &token, mode)).collect();
    let servers = format!("{},{}", shards[0].1, shards[1].1);
    let mut workers = workers(&servers, &token);
    // Run until several points are complete, then kill every shard at the same moment.
    let started = Instant::now();
    while Manifest::list(dir.path()).first().map_or(0, |(v, _)| *v) < 4 * EVERY {
        assert!(started.elapsed() < Duration::from_secs(180), "no progress");
        std::thread::sleep(Duration::from_millis(20));
    }
    for (s, _, _) in &mut shards {
        s.kill().unwrap();
    }
    for (s, _, _) in &mut shards {
        s.wait().unwrap();
    }
    for w in &mut workers {
        let _ = w.kill();
        let _ = w.wait();
    }
    let last_written = [
        newest_file_version(dir.path(), 0),
        newest_file_version(dir.path(), 1),
    ];
    let (newest, manifest) = Manifest::list(dir.path())[0].clone();
    println!("killed with files up to {last_written:?}; newest complete point {newest}");
    assert!(newest % EVERY == 0 && newest >= 4 * EVERY);
    // Make it the worst moment: shard 1 died before its file of that point was in place
    // (so the point was never completed), while shard 0's file of it is on disk. A shard
    // may already have written a later point's file (it ran ahead of the other before the
    // kill): those go, so that the kill falls exactly at that moment.
    for shard in 0..2 {
        let files = pstrain_store::CheckpointDir::for_shard(dir.path(), shard, 2, 1).list();
        for (_, path) in files.iter().filter(|(v, _)| *v > newest) {
            std::fs::remove_file(path).unwrap();
        }
    }
    let shard1 = pstrain_store::CheckpointDir::for_shard(dir.path(), 1, 2, 1);
    std::fs::remove_file(shard1.file("kill-all", newest)).unwrap();
    std::fs::remove_file(manifest).unwrap();
    assert_eq!(newest_file_version(dir.path(), 0), newest);
    let point = newest - EVERY;

    let mut restarted: Vec<_> = (0..2).map(|i| shard(dir.path(), i, &token, mode)).collect();
    let versions: Vec<u64> = restarted
        .iter_mut()
        .map(|(_, _, err)| restored_version(err))
        .collect();
    for (s, _, _) in &mut restarted {
        let _ = s.kill();
        let _ = s.wait();
    }
    assert_eq!(
        versions,
        vec![point, point],
        "the shards restored different points"
    );
    assert_eq!(
        newest_file_version(dir.path(), 0),
        point,
        "shard 0's file of the abandoned point is gone"
    );
    let resumed = assemble(dir.path(), Some(&file_key(&token))).unwrap();
    assert_eq!(resumed.manifest, Some(("kill-all".to_string(), point)));
    (dir, point, token)
}

#[test]
fn an_async_run_killed_at_once_restores_one_round() {
    let _guard = common::one_at_a_time();
    kill_every_shard_at_once("async");
}

#[test]
fn every_shard_killed_at_once_restores_the_same_point() {
    let _guard = common::one_at_a_time();
    let (dir, point, token) = kill_every_shard_at_once("sync");
    let resumed = assemble(dir.path(), Some(&file_key(&token))).unwrap();

    // The same run stopped cleanly at that version (its final checkpoint).
    let clean = tempfile::tempdir().unwrap();
    let out = pstrain(
        &[
            "train",
            "--transport",
            "tcp",
            "--shards",
            "2",
            "--iterations",
            &point.to_string(),
            "--eval-every",
            "0",
            "--checkpoint-dir",
            clean.path().to_str().unwrap(),
            "--checkpoint-secs",
            "0",
        ],
        &token,
        "sync",
    )
    .output()
    .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let reference = assemble(clean.path(), Some(&file_key(&token))).unwrap();
    assert_eq!(reference.versions, vec![point, point]);
    let worst = resumed
        .params
        .iter()
        .zip(&reference.params)
        .map(|(a, b)| (a - b).abs())
        .fold(0.0f32, f32::max);
    println!("largest difference from the clean run at version {point}: {worst}");
    assert!(worst <= 1e-6, "resumed weights differ by up to {worst}");
}
