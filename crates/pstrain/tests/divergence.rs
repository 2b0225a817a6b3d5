//! A run whose weights diverge (a learning rate far too large) ends with an error that says
//! so, in one process and over TCP, instead of computing gradients the shards refuse until
//! its budget runs out and then reporting a test accuracy as if it had trained; a supervisor
//! does not start such a worker again.

mod common;

use std::process::{Command, Output};
use std::time::Duration;

fn train(flags: &[&str]) -> Output {
    let _guard = common::one_at_a_time();
    let mut cmd = Command::new(common::pstrain_bin());
    cmd.args(["train", "--model", "convnet", "--lr", "1e30", "--data-dir"])
        .arg(common::mnist_dir())
        .args(flags);
    common::within(Duration::from_secs(120), move || cmd.output().unwrap())
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[test]
fn a_diverged_run_in_one_process_ends_with_an_error_saying_so() {
    for mode in ["async", "sync"] {
        let out = train(&["--mode", mode]);
        let err = stderr(&out);
        assert_eq!(out.status.code(), Some(3), "{mode}: {err}");
        assert!(
            err.contains("training diverged: its last 20 gradients"),
            "{mode}: {err}"
        );
        assert!(err.contains("Lower --lr"), "{mode}: {err}");
        assert!(
            !err.contains("test accuracy"),
            "{mode}: no summary of a run that did not train: {err}"
        );
    }
}

#[test]
fn a_diverged_worker_process_is_not_started_again() {
    let out = train(&["--transport", "tcp"]);
    let err = stderr(&out);
    assert!(!out.status.success(), "{err}");
    assert!(err.contains("training diverged"), "{err}");
    assert!(err.contains("cannot mend"), "{err}");
    assert!(!err.contains("; starting it again ("), "{err}");
}
