//! Damaged data files give a clear error naming the file and the problem, from the library
//! and from the CLI, and never a panic; any valid IDX set trains, of MNIST's shape or another
//! (the models sized from its images and labels), and a worker whose data does not fit the
//! shards' model is refused with the model that would.

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
        // A developer's environment: the error is still the user's, with no stack.
        .env("RUST_BACKTRACE", "1")
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(!stderr.contains("panicked"), "{stderr}");
    assert!(!stderr.contains("backtrace"), "{stderr}");
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

/// Replaces `file` of the set in `dir` with a label file of `labels`.
fn write_labels(dir: &Path, file: &str, labels: &[u8]) {
    std::fs::write(dir.join(file), encode_idx(&[labels.len() as u32], labels)).unwrap();
}

#[test]
fn label_out_of_range() {
    let dir = fresh_set();
    let mut labels = vec![1u8; 20];
    labels[7] = 10;
    write_labels(dir.path(), "t10k-labels-idx1-ubyte", &labels);
    expect_error(
        dir.path(),
        "t10k-labels-idx1-ubyte",
        &["label 10", "index 7"],
    );
}

#[test]
fn training_and_test_images_of_different_sizes() {
    let dir = fresh_set();
    std::fs::write(
        dir.path().join("train-images-idx3-ubyte"),
        encode_idx(&[50, 32, 32], &[0; 50 * 1024]),
    )
    .unwrap();
    expect_error(dir.path(), "train-images-idx3-ubyte", &["32x32", "28x28"]);
}

#[test]
fn images_no_model_takes() {
    let dir = fresh_set();
    std::fs::write(
        dir.path().join("t10k-images-idx3-ubyte"),
        encode_idx(&[20, 4, 28], &[0; 20 * 4 * 28]),
    )
    .unwrap();
    expect_error(dir.path(), "t10k-images-idx3-ubyte", &["4x28", "6 to 256"]);
}

#[test]
fn training_labels_that_skip_a_class() {
    let dir = fresh_set();
    // One flipped byte: a label of 200 among 0..10 would otherwise mean a 201-class model.
    let mut labels: Vec<u8> = (0..50).map(|i| (i % 10) as u8).collect();
    labels[33] = 200;
    write_labels(dir.path(), "train-labels-idx1-ubyte", &labels);
    expect_error(
        dir.path(),
        "train-labels-idx1-ubyte",
        &["label 200", "index 33", "class 10"],
    );
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
fn a_name_that_is_no_regular_file_is_called_what_it_is() {
    // A folder, or a device that reads without end, under a data file's name: refused as not
    // a regular file (not "missing", and never read).
    let dir = fresh_set();
    let path = dir.path().join("train-images-idx3-ubyte");
    std::fs::remove_file(&path).unwrap();
    std::os::unix::fs::symlink("/dev/zero", &path).unwrap();
    expect_error(
        dir.path(),
        "train-images-idx3-ubyte",
        &["not a regular file"],
    );
    std::fs::remove_file(&path).unwrap();
    std::fs::create_dir(&path).unwrap();
    expect_error(
        dir.path(),
        "train-images-idx3-ubyte",
        &["not a regular file"],
    );
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

/// A flag that is wrong whatever the data is refused before the data is read: an empty
/// folder (which `train` would otherwise try to download into) is not touched.
#[test]
fn flags_wrong_whatever_the_data_are_refused_before_it_is_read() {
    let dir = tempfile::tempdir().unwrap();
    let out = Command::new(common::pstrain_bin())
        .args(["train", "--momentum", "0.5", "--data-dir"])
        .arg(dir.path())
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        stderr.contains("--momentum applies to --optimizer momentum only"),
        "{stderr}"
    );
    assert!(
        !stderr.contains("download") && !stderr.contains("missing"),
        "{stderr}"
    );
    assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);

    // A negative number is a flag's value, refused by the check that says why (clap alone
    // took `-0.1` for an unknown flag `-0`), for `train` and for `server`.
    let data = dir.path().to_str().unwrap();
    for (args, said) in [
        (
            &["train", "--data-dir", data, "--lr", "-0.1"][..],
            "lr must be finite and > 0, got -0.1",
        ),
        (
            &["train", "--data-dir", data, "--weight-decay", "-1"],
            "weight_decay must be finite and >= 0, got -1",
        ),
        (
            &["server", "--workers", "1", "--lr", "-2"],
            "lr must be finite and > 0, got -2",
        ),
    ] {
        let out = Command::new(common::pstrain_bin())
            .args(args)
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success());
        assert!(stderr.contains(said), "{args:?}: {stderr}");
    }
    assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
}

/// `pstrain train` of the convnet (SGD, 3 epochs of batch 20) on the set in `dir`: its
/// stdout and stderr, and the summary's test accuracy in per cent.
fn train_convnet_on(dir: &Path) -> (String, String, f64) {
    let out = Command::new(common::pstrain_bin())
        .args([
            "train",
            "--model",
            "convnet",
            "--optimizer",
            "sgd",
            "--lr",
            "0.05",
        ])
        .args(["--epochs", "3", "--batch-size", "20", "--data-dir"])
        .arg(dir)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(out.status.success(), "{stdout}{stderr}");
    let accuracy = stdout
        .lines()
        .find_map(|l| l.strip_prefix("test accuracy"))
        .and_then(|rest| rest.trim().split('%').next())
        .and_then(|v| v.parse().ok())
        .expect("summary has an accuracy");
    (stdout, stderr, accuracy)
}

#[test]
fn another_idx_data_set_loads_and_trains() {
    let dir = tempfile::tempdir().unwrap();
    common::write_synthetic_set(dir.path(), 600, 100);
    let (stdout, _, acc) = train_convnet_on(dir.path());
    assert!(stdout.contains("on 100 test images"), "{stdout}");
    assert!(acc >= 90.0, "squares are easy to tell apart: {acc}");
}

#[test]
fn a_set_of_other_images_and_classes_trains_a_model_sized_for_it() {
    let dir = tempfile::tempdir().unwrap();
    common::write_synthetic_shaped(dir.path(), (720, 120), (20, 24), 12);
    let (stdout, stderr, acc) = train_convnet_on(dir.path());
    assert!(stderr.contains("(20x24, 12 classes)"), "{stderr}");
    // conv 3x3 leaves 18x22, the 3x3 pooling 6x7: fc 12 x 126 + 12, the conv 27 + 3.
    assert!(
        stdout.contains("training convnet:20x24:12 (1554 parameters)"),
        "{stdout}"
    );
    assert!(stdout.contains("on 120 test images"), "{stdout}");
    assert!(
        acc >= 90.0,
        "blocks in a grid are easy to tell apart: {acc}"
    );
}

#[test]
fn a_worker_whose_data_does_not_fit_the_shards_model_is_refused_with_the_one_that_would() {
    let _guard = common::one_at_a_time();
    let dir = tempfile::tempdir().unwrap();
    common::write_synthetic_shaped(dir.path(), (240, 40), (20, 24), 12);
    let worker = |addr: &str| {
        Command::new(common::pstrain_bin())
            .args(["worker", "--servers", addr, "--rank", "0", "--data-dir"])
            .arg(dir.path())
            .output()
            .unwrap()
    };
    let plan = [
        "--workers",
        "1",
        "--train-samples",
        "240",
        "--iterations",
        "30",
    ];
    let mnist_shard =
        common::shard(&[&["--model", "convnet", "--keep-running"], &plan[..]].concat());
    let out = worker(&mnist_shard.addr);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
    assert!(
        stderr.contains("images are 20x24") && stderr.contains("`--model convnet:20x24:12`"),
        "{stderr}"
    );
    // Fewer classes than the model's fit (a worker's files may lack the last ones); more not.
    let few = common::shard(
        &[
            &["--model", "convnet:20x24:11", "--keep-running"],
            &plan[..],
        ]
        .concat(),
    );
    let stderr = String::from_utf8_lossy(&worker(&few.addr).stderr).into_owned();
    assert!(
        stderr.contains("labels go up to 11") && stderr.contains("`--model convnet:20x24:12`"),
        "{stderr}"
    );
    let fits = common::shard(&[&["--model", "convnet:20x24:16"], &plan[..]].concat());
    let report = common::worker_report(&worker(&fits.addr));
    assert_eq!(report.steps, 30, "{report:?}");
}

/// An error reported to a stderr nobody reads any more (`pstrain train 2>&1 | head -0`, a
/// closed log pipe) still ends the process with the error's status, not a panic's 101.
#[test]
fn an_error_with_nobody_reading_stderr_exits_as_an_error() {
    let dir = tempfile::tempdir().unwrap();
    let (reader, writer) = std::io::pipe().unwrap();
    drop(reader);
    let status = Command::new(common::pstrain_bin())
        .args(["train", "--iterations", "2", "--data-dir"])
        .arg(dir.path().join("absent"))
        .stderr(writer)
        .status()
        .unwrap();
    assert_eq!(status.code(), Some(1), "{status}");
}

/// `--data-dir` naming a file says so, not that the four files are missing from it (and to
/// download them there).
#[test]
fn a_data_dir_that_is_a_file_is_named_as_one() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("train-images-idx3-ubyte.gz");
    std::fs::write(&file, b"not a folder").unwrap();
    let err = load_dir(&file).unwrap_err().to_string();
    assert!(err.contains("is a file, not a folder"), "{err}");
    let cli = cli_error(&file);
    assert!(cli.contains("is a file, not a folder"), "{cli}");
    assert!(!cli.contains("download"), "{cli}");
}
