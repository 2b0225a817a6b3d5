//! A real run over TLS with a run token, through the CLI as an operator would do it: a
//! `pstrain server` with a certificate, a `pstrain worker` that trusts its CA, and `pstrain
//! eval` of the shard's final checkpoint reaching the convnet threshold.

mod common;

use std::process::Command;
use std::time::{Duration, Instant};

#[test]
fn a_run_over_tls_reaches_its_threshold() {
    let _guard = common::one_at_a_time();
    let dir = tempfile::tempdir().unwrap();
    let certified = rcgen::generate_simple_self_signed(vec!["127.0.0.1".to_string()]).unwrap();
    let (cert, key, token) = (
        dir.path().join("shard.pem"),
        dir.path().join("shard.key"),
        dir.path().join("run.token"),
    );
    std::fs::write(&cert, certified.cert.pem()).unwrap();
    std::fs::write(&key, certified.key_pair.serialize_pem()).unwrap();
    let made = Command::new(common::pstrain_bin())
        .arg("token")
        .output()
        .unwrap();
    assert!(made.status.success());
    std::fs::write(&token, &made.stdout).unwrap();
    let ckpt = dir.path().join("ckpt");

    let path = |p: &std::path::Path| p.display().to_string();
    let mut shard = common::shard(&[
        "--model",
        "convnet",
        "--mode",
        "async",
        "--workers",
        "1",
        "--iterations",
        "600",
        "--optimizer",
        "sgd",
        "--lr",
        "0.01",
        "--lr-schedule",
        "constant",
        "--batch-size",
        "128",
        "--token-file",
        &path(&token),
        "--tls-cert",
        &path(&cert),
        "--tls-key",
        &path(&key),
        "--checkpoint-dir",
        &path(&ckpt),
        "--checkpoint-secs",
        "0",
    ]);
    let addr = shard.addr.clone();

    // A worker without the CA cannot join; one with it (and the token) trains to the end.
    let plain = Command::new(common::pstrain_bin())
        .args([
            "worker",
            "--servers",
            &addr,
            "--rank",
            "0",
            "--connect-timeout",
            "2",
        ])
        .args(["--token-file", &path(&token)])
        .arg("--data-dir")
        .arg(common::mnist_dir())
        .output()
        .unwrap();
    assert!(!plain.status.success());
    let worker = Command::new(common::pstrain_bin())
        .args(["worker", "--servers", &addr, "--rank", "0"])
        .args(["--token-file", &path(&token), "--tls-ca", &path(&cert)])
        .arg("--data-dir")
        .arg(common::mnist_dir())
        .output()
        .unwrap();
    let report = common::worker_report(&worker);
    assert_eq!(report.steps, 600);

    let started = Instant::now();
    while shard.child.try_wait().unwrap().is_none() {
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "the shard kept running"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let eval = Command::new(common::pstrain_bin())
        .args(["eval", "--checkpoint", &path(&ckpt)])
        .arg("--data-dir")
        .arg(common::mnist_dir())
        .output()
        .unwrap();
    let out = String::from_utf8_lossy(&eval.stdout);
    assert!(
        eval.status.success(),
        "{}",
        String::from_utf8_lossy(&eval.stderr)
    );
    let accuracy: f64 = out
        .split("test accuracy ")
        .nth(1)
        .and_then(|rest| rest.split('%').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no accuracy in {out:?}"));
    println!("over TLS: {out}");
    assert!(accuracy >= 85.0, "{accuracy}");
}

/// `pstrain worker --servers ADDR --rank 0 EXTRA...` against `addr`; its stderr.
fn worker_error(addr: &str, extra: &[&str]) -> String {
    let out = Command::new(common::pstrain_bin())
        .args([
            "worker",
            "--servers",
            addr,
            "--rank",
            "0",
            "--connect-timeout",
            "2",
        ])
        .arg("--data-dir")
        .arg(common::mnist_dir())
        .args(extra)
        .output()
        .unwrap();
    assert!(!out.status.success());
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// TLS on one side only is named as the likely cause, from either side, not left as "peer
/// closed the connection reading a frame header" or "received corrupt message".
#[test]
fn tls_on_one_side_only_says_so() {
    let dir = tempfile::tempdir().unwrap();
    let certified = rcgen::generate_simple_self_signed(vec!["127.0.0.1".to_string()]).unwrap();
    let (cert, key) = (dir.path().join("shard.pem"), dir.path().join("shard.key"));
    std::fs::write(&cert, certified.cert.pem()).unwrap();
    std::fs::write(&key, certified.key_pair.serialize_pem()).unwrap();
    let path = |p: &std::path::Path| p.display().to_string();
    let with_tls = common::shard(&[
        "--model",
        "convnet",
        "--workers",
        "1",
        "--tls-cert",
        &path(&cert),
        "--tls-key",
        &path(&key),
    ]);
    let plain = common::shard(&["--model", "convnet", "--workers", "1"]);

    let err = worker_error(&with_tls.addr, &[]);
    assert!(
        err.contains("closed the connection before answering the handshake")
            && err.contains("without --tls-ca"),
        "{err}"
    );
    let err = worker_error(&plain.addr, &["--tls-ca", &path(&cert)]);
    assert!(err.contains("the shard answered without TLS"), "{err}");
}
