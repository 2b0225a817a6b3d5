//! The run's token on disk: `pstrain token -o` makes a file only its owner can read and never
//! replaces an existing file or link; a token file others can read is used with a warning.

mod common;

use std::os::unix::fs::PermissionsExt;
use std::process::Command;

fn pstrain(args: &[&str]) -> std::process::Output {
    Command::new(common::pstrain_bin())
        .args(args)
        .output()
        .unwrap()
}

/// A worker given `token` as its token file, pointed at a port nobody serves.
fn worker_with_token(token: &std::path::Path) -> std::process::Output {
    let token = token.to_str().unwrap();
    pstrain(&[
        "worker",
        "--servers",
        "127.0.0.1:1",
        "--rank",
        "0",
        "--connect-timeout",
        "1",
        "--token-file",
        token,
    ])
}

#[test]
fn token_out_is_owner_only_and_never_overwrites() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("run.token");
    let p = path.to_str().unwrap();
    let out = pstrain(&["token", "-o", p]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600, "mode {mode:o}");
    let first = std::fs::read_to_string(&path).unwrap();
    assert_eq!(first.trim().len(), 64, "{first}");

    // An existing file is not replaced.
    let again = pstrain(&["token", "-o", p]);
    assert!(!again.status.success());
    assert_eq!(std::fs::read_to_string(&path).unwrap(), first);

    // Nor is a planted link followed to the file it names.
    let victim = dir.path().join("victim");
    std::fs::write(&victim, "keep me").unwrap();
    let link = dir.path().join("link.token");
    std::os::unix::fs::symlink(&victim, &link).unwrap();
    let planted = pstrain(&["token", "-o", link.to_str().unwrap()]);
    assert!(!planted.status.success());
    assert_eq!(std::fs::read_to_string(&victim).unwrap(), "keep me");
}

#[test]
fn a_token_printed_into_a_readable_file_or_read_from_one_is_warned_about() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("shared.token");
    let file = std::fs::File::create(&path).unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
    let out = Command::new(common::pstrain_bin())
        .arg("token")
        .stdout(file)
        .output()
        .unwrap();
    assert!(out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("warning") && stderr.contains("644"),
        "{stderr}"
    );

    // Using it warns too (the worker then fails to reach a shard: not what is tested).
    let used = worker_with_token(&path);
    let stderr = String::from_utf8_lossy(&used.stderr);
    assert!(
        stderr.contains("readable by others") && stderr.contains("chmod 600"),
        "{stderr}"
    );

    // An owner-only file is used silently.
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
    let quiet = worker_with_token(&path);
    assert!(!String::from_utf8_lossy(&quiet.stderr).contains("readable by others"));
}

#[test]
fn a_token_file_without_end_is_refused_unread() {
    // `/dev/zero` reads for ever: refused after a token file's bound, not read until memory
    // runs out.
    let out = worker_with_token(std::path::Path::new("/dev/zero"));
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("cannot read the token file /dev/zero: longer than 65536 bytes"),
        "{stderr}"
    );
}
