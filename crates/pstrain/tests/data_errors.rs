//! Damaged data files give a clear error naming the file and the problem, from the library
//! and from the CLI, and never a panic; any valid 28x28, 10-class IDX set trains.

mod common;

use pstrain_compute::idx::encode_idx;
use pstrain_compute::mnist::load_dir;
use std::io::Write;
use std::path::Path;
use std::process::Command;

fn cli_error(dir: &Path) -> String {
    let out = Command::new(common::pstrain_bin())
        .args([
            "train",
            "--model",
            "convnet",
            "--iterations",
            "2",
            "--data-dir",
        ])
        .arg(dir)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(!stderr.contains("panicked"), "{stderr}");
    stderr
}

fn expect_error(dir: &Path, file: &str, words: &[&str]) {
    let err = load_dir(dir).unwrap_err().to_string();
    assert!(err.contains(file), "error should name {file}: {err}");
    for w in words {
        assert!(err.contains(w), "error should say `{w}`: {err}");
    }
    let cli = cli_error(dir);
    assert!(
        cli.contains(file) && words.iter().all(|w| cli.contains(w)),
        "{cli}"
    );
}

fn fresh_set() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    common::write_synthetic_set(dir.path(), 50, 20);
    dir
}

#[test]
fn truncated_images() {
    let dir = fresh_set();
    let path = dir.path().join("train-images-idx3-ubyte");
    let bytes = std::fs::read(&path).unwrap();
    std::fs::write(&path, &bytes[..bytes.len() - 100]).unwrap();
    expect_error(dir.path(), "train-images-idx3-ubyte", &["truncated"]);
}

#[test]
fn wrong_magic() {
    let dir = fresh_set();
    let path = dir.path().join("t10k-labels-idx1-ubyte");
    // An image file where labels belong.
    std::fs::write(&path, encode_idx(&[20, 28, 28], &[0; 20 * 784])).unwrap();
    expect_error(
        dir.path(),
        "t10k-labels-idx1-ubyte",
        &["magic", "2049", "2051"],
    );
}

#[test]
fn mismatched_counts() {
    let dir = fresh_set();
    std::fs::write(
        dir.path().join("train-labels-idx1-ubyte"),
        encode_idx(&[49], &[1; 49]),
    )
    .unwrap();
    expect_error(
        dir.path(),
        "train-labels-idx1-ubyte",
        &["50 images", "49 labels"],
    );
}

#[test]
fn label_out_of_range() {
    let dir = fresh_set();
    let mut labels = vec![1u8; 20];
    labels[7] = 10;
    std::fs::write(
        dir.path().join("t10k-labels-idx1-ubyte"),
        encode_idx(&[20], &labels),
    )
    .unwrap();
    expect_error(
        dir.path(),
        "t10k-labels-idx1-ubyte",
        &["label 10", "index 7"],
    );
}

#[test]
fn wrong_image_size() {
    let dir = fresh_set();
    std::fs::write(
        dir.path().join("train-images-idx3-ubyte"),
        encode_idx(&[50, 32, 32], &[0; 50 * 1024]),
    )
    .unwrap();
    expect_error(dir.path(), "train-images-idx3-ubyte", &["32x32", "28x28"]);
}

#[test]
fn corrupt_and_truncated_gzip() {
    let dir = fresh_set();
    let path = dir.path().join("train-images-idx3-ubyte");
    let raw = std::fs::read(&path).unwrap();
    std::fs::remove_file(&path).unwrap();
    let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    enc.write_all(&raw).unwrap();
    let gz = enc.finish().unwrap();
    let gz_path = dir.path().join("train-images-idx3-ubyte.gz");

    std::fs::write(&gz_path, &gz).unwrap();
    assert_eq!(
        load_dir(dir.path()).unwrap().train.len(),
        50,
        "valid gzip loads"
    );

    std::fs::write(&gz_path, &gz[..gz.len() / 2]).unwrap();
    expect_error(dir.path(), "train-images-idx3-ubyte.gz", &["gzip"]);

    let mut flipped = gz.clone();
    let mid = flipped.len() / 2;
    flipped[mid] ^= 0xff;
    flipped[mid + 1] ^= 0xff;
    std::fs::write(&gz_path, &flipped).unwrap();
    expect_error(dir.path(), "train-images-idx3-ubyte.gz", &["gzip"]);
}

#[test]
fn missing_files_say_what_to_put_where() {
    let dir = tempfile::tempdir().unwrap();
    expect_error(
        dir.path(),
        "t10k-labels-idx1-ubyte",
        &["missing", "train-images-idx3-ubyte", "pstrain download"],
    );
}

#[test]
fn another_idx_data_set_loads_and_trains() {
    let dir = tempfile::tempdir().unwrap();
    common::write_synthetic_set(dir.path(), 600, 100);
    let out = Command::new(common::pstrain_bin())
        .args([
            "train",
            "--model",
            "convnet",
            "--optimizer",
            "sgd",
            "--lr",
            "0.05",
            "--epochs",
            "3",
            "--batch-size",
            "20",
            "--data-dir",
        ])
        .arg(dir.path())
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("on 100 test images"), "{stdout}");
    let acc: f64 = stdout
        .lines()
        .find_map(|l| l.strip_prefix("test accuracy"))
        .and_then(|rest| rest.trim().split('%').next())
        .and_then(|v| v.parse().ok())
        .expect("summary has an accuracy");
    assert!(acc >= 90.0, "squares are easy to tell apart: {acc}");
}
