//! A launcher killed outright (SIGKILL: no `Drop` runs) takes its run with it: its workers
//! end at once, its shard stops as on Ctrl-C and writes its final checkpoint, and nothing goes
//! on training as an orphan (or writing the folder a `--resume` is about to read).
#![cfg(target_os = "linux")]

mod common;

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// The processes whose parent is `pid` (from /proc), with their command lines.
fn children_of(pid: u32) -> Vec<(u32, String)> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(child) = entry.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{child}/stat")) else {
            continue;
        };
        // Fields after the command's closing parenthesis: state, then the parent's pid.
        let after = &stat[stat.rfind(')').map_or(0, |i| i + 1)..];
        let parent = after.split_whitespace().nth(1).and_then(|p| p.parse().ok());
        if parent == Some(pid) {
            let cmdline = std::fs::read(format!("/proc/{child}/cmdline")).unwrap_or_default();
            found.push((child, String::from_utf8_lossy(&cmdline).replace('\0', " ")));
        }
    }
    found
}

/// Whether `pid` has ended (gone, or a zombie waiting to be reaped).
fn ended(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Err(_) => true,
        Ok(stat) => stat[stat.rfind(')').map_or(0, |i| i + 1)..]
            .split_whitespace()
            .next()
            .is_some_and(|state| state == "Z"),
    }
}

#[test]
fn a_launcher_killed_outright_takes_its_shard_and_workers_with_it() {
    let dir = tempfile::tempdir().unwrap();
    let mut launcher = Command::new(common::pstrain_bin())
        .args(["train", "--transport", "tcp", "--model", "convnet"])
        .args(["--epochs", "50", "--checkpoint-dir"])
        .arg(dir.path())
        .env("PSTRAIN_DATA_DIR", common::mnist_dir())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    // The shard and both workers running (and training: the shard has served a while).
    let started = Instant::now();
    let mut children = children_of(launcher.id());
    while children.len() < 3 && started.elapsed() < Duration::from_secs(60) {
        std::thread::sleep(Duration::from_millis(200));
        children = children_of(launcher.id());
    }
    assert_eq!(children.len(), 3, "{children:?}");
    std::thread::sleep(Duration::from_secs(2));
    launcher.kill().unwrap();
    launcher.wait().unwrap();
    let killed = Instant::now();
    while !children.iter().all(|(pid, _)| ended(*pid)) && killed.elapsed() < Duration::from_secs(20)
    {
        std::thread::sleep(Duration::from_millis(100));
    }
    let left: Vec<_> = children.iter().filter(|(pid, _)| !ended(*pid)).collect();
    assert!(
        left.is_empty(),
        "still running after their launcher died: {left:?}"
    );
    // The shard stopped cleanly: its final checkpoint is there.
    let shard_files = std::fs::read_dir(dir.path().join("shard-0-of-1"))
        .map(|d| d.count())
        .unwrap_or(0);
    assert!(shard_files >= 1, "the shard wrote no final checkpoint");
}
