//! A short chaos run through `scripts/chaos.py`: 2 shards and 3 workers over TCP, a random
//! process killed with SIGKILL every ~2 s and restarted, in sync mode. The script fails if the
//! run does not finish, a shard fault loses more updates than the checkpoint interval, or the
//! accuracy is under its threshold. (Async is not here yet: one async chaos run in a dozen
//! did not finish, which is being diagnosed; `scripts/chaos.py --mode async` runs it.)

mod common;

use std::process::Command;

fn chaos(mode: &str, iterations: &str) {
    let _guard = common::one_at_a_time();
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/../../scripts/chaos.py");
    let out = Command::new("python3")
        .arg(script)
        .args(["--mode", mode, "--iterations", iterations])
        .args([
            "--every",
            "2",
            "--min-faults",
            "4",
            "--no-baseline",
            "--timeout",
            "300",
        ])
        .arg("--pstrain")
        .arg(common::pstrain_bin())
        .arg("--data-dir")
        .arg(common::mnist_dir())
        .output()
        .expect("python3 runs");
    let stdout = String::from_utf8_lossy(&out.stdout);
    println!("{stdout}");
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("survived"), "{stdout}");
}

#[test]
fn sync_survives_repeated_kills_of_workers_and_shards() {
    chaos("sync", "10000");
}
