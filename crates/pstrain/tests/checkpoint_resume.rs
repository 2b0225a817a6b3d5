//! Checkpoints: an interrupted sync run resumed from its checkpoint ends with the weights of
//! the uninterrupted run; a damaged newest checkpoint is reported and the previous one used;
//! `pstrain export` writes a file Python's safetensors opens with the model's names and shapes.

mod common;

use pstrain::report::records::ProgressRecord;
use pstrain::run::CheckpointPolicy;
use pstrain::{train, Observer, Quiet, RunPlan, TrainConfig};
use pstrain_compute::ModelKind;
use pstrain_core::Mode;
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};

/// Interrupts the run (as Ctrl-C does) once the server has made some updates.
struct StopAfter<'a> {
    stop: &'a AtomicBool,
    updates: u64,
}

impl Observer for StopAfter<'_> {
    fn progress(&mut self, r: &ProgressRecord) {
        if r.updates >= self.updates {
            self.stop.store(true, Ordering::Relaxed);
        }
    }
}

#[test]
fn resumed_sync_run_matches_the_uninterrupted_one() {
    let _guard = common::one_at_a_time();
    let data = common::mnist();
    let dir = tempfile::tempdir().unwrap();
    // The big model with dropout, Adam (moments + step) and a cosine schedule: everything a
    // resume has to get right.
    let cfg = TrainConfig {
        plan: RunPlan {
            mode: Mode::Sync { backup_workers: 0 },
            workers: 2,
            model: ModelKind::Cnn.name().into(),
            iterations: Some(120),
            batch_size: 16,
            ..RunPlan::default()
        },
        eval_every: Some(0),
        ..TrainConfig::default()
    };
    let whole = train(&cfg, data, &mut Quiet, &AtomicBool::new(false)).unwrap();
    assert_eq!(whole.summary.updates, 120);

    let policy = CheckpointPolicy {
        run_id: "test-run".into(),
        dir: dir.path().to_owned(),
        every_updates: Some(10),
        every: None,
        keep: 3,
        resume: false,
        key: None,
    };
    let first = TrainConfig {
        checkpoint: Some(policy.clone()),
        ..cfg.clone()
    };
    let stop = AtomicBool::new(false);
    let part = train(
        &first,
        data,
        &mut StopAfter {
            stop: &stop,
            // Early, in the middle of the first checkpoint interval: the final checkpoint is
            // then the stop's own (a worker that left before the server closed once made it
            // hold a sync step of one worker's gradient).
            updates: 5,
        },
        &stop,
    )
    .unwrap();
    let stopped_at = part.summary.updates;
    assert!(part.summary.stopped_early);
    assert!(
        stopped_at > 0 && stopped_at < 120,
        "interrupted at {stopped_at}"
    );

    let second = TrainConfig {
        checkpoint: Some(CheckpointPolicy {
            run_id: "test-run".into(),
            resume: true,
            key: None,
            ..policy
        }),
        ..cfg
    };
    let rest = train(&second, data, &mut Quiet, &AtomicBool::new(false)).unwrap();
    assert_eq!(rest.summary.updates, 120);
    let worst = rest
        .params
        .iter()
        .zip(&whole.params)
        .map(|(a, b)| (a - b).abs())
        .fold(0.0f32, f32::max);
    println!("interrupted at {stopped_at}; largest difference after resuming: {worst}");
    assert!(worst <= 1e-6, "resumed weights differ by up to {worst}");
}

fn pstrain(args: &[&str]) -> (bool, String, String) {
    let out = Command::new(common::pstrain_bin())
        .args(args)
        .env("PSTRAIN_DATA_DIR", common::mnist_dir())
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

const CONVNET: [&str; 7] = [
    "train",
    "--model",
    "convnet",
    "--mode",
    "sync",
    "--optimizer",
    "momentum",
];

#[test]
fn damaged_newest_checkpoint_falls_back_to_the_previous() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().to_str().unwrap();
    let run = |extra: &[&str]| {
        let mut args = CONVNET.to_vec();
        args.extend_from_slice(extra);
        pstrain(&args)
    };
    let (ok, _, err) = run(&["--iterations", "20", "--checkpoint-dir", d]);
    assert!(ok, "{err}");
    let (ok, _, err) = run(&["--iterations", "40", "--resume", d]);
    assert!(ok, "{err}");
    assert!(err.contains("version 20"), "{err}");
    let newest = checkpoint_file(dir.path(), 40);
    let mut bytes = std::fs::read(&newest).unwrap();
    let n = bytes.len();
    bytes[n - 5] ^= 0x10;
    std::fs::write(&newest, &bytes).unwrap();

    let (ok, out, err) = run(&["--iterations", "60", "--resume", d]);
    assert!(ok, "{err}");
    assert!(err.contains("checksum mismatch"), "{err}");
    assert!(err.contains("ckpt-000000000020"), "{err}");
    assert!(out.contains("updates        60"), "{out}");

    // A truncated file is caught too, and resuming from nothing is a clear error.
    std::fs::write(&newest, &bytes[..n / 3]).unwrap();
    let empty = tempfile::tempdir().unwrap();
    let (ok, _, err) = run(&[
        "--iterations",
        "10",
        "--resume",
        empty.path().to_str().unwrap(),
    ]);
    assert!(!ok);
    assert!(err.contains("no checkpoint to resume"), "{err}");
    assert!(!err.contains("panicked"), "{err}");
}

/// A resume with other flags says what it changed from the checkpoint's run, in process and
/// over TCP; one whose optimizer state cannot carry over is refused naming the change.
#[test]
fn a_resume_says_what_it_changed_from_the_checkpoints_run() {
    for transport in ["inproc", "tcp"] {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path().to_str().unwrap();
        let run_with = |optimizer: &str, extra: &[&str]| {
            let mut args = CONVNET[..5].to_vec();
            args.extend_from_slice(&["--optimizer", optimizer, "--transport", transport]);
            args.extend_from_slice(extra);
            pstrain(&args)
        };
        let run = |extra: &[&str]| run_with("momentum", extra);
        let (ok, _, err) = run(&["--iterations", "20", "--checkpoint-dir", d]);
        assert!(ok, "{err}");
        let (ok, _, err) = run(&["--iterations", "30", "--resume", d]);
        assert!(ok, "{transport}: {err}");
        assert!(
            err.contains("changed from the checkpoint's run: iterations 20 -> 30\n"),
            "{err}"
        );
        let (ok, out, err) = run(&["--iterations", "40", "--lr", "0.02", "--resume", d]);
        assert!(ok, "{transport}: {err}");
        assert!(
            err.contains(
                "changed from the checkpoint's run: iterations 30 -> 40; optimizer momentum \
                 (lr 0.01, momentum 0.9, weight decay 0) -> momentum (lr 0.02, momentum 0.9, \
                 weight decay 0)"
            ),
            "{transport}: {err}"
        );
        assert!(out.contains("updates        40"), "{out}");
        let (ok, _, err) = run_with("adam", &["--iterations", "50", "--resume", d]);
        assert!(!ok, "{transport}: a momentum checkpoint resumed under Adam");
        assert!(err.contains("is not used by this optimizer"), "{err}");
        assert!(
            err.contains("optimizer momentum (lr 0.02, momentum 0.9, weight decay 0) -> adam"),
            "{transport}: {err}"
        );
        assert!(!err.contains("panicked"), "{err}");
    }
}

/// A run's files hold one shard's slice each: a resume with another shard count is refused
/// saying so (it once started every shard from the initial weights, under the run's id).
#[test]
fn a_resume_with_another_shard_count_is_refused_not_restarted() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().to_str().unwrap();
    let run = |extra: &[&str]| {
        let mut args = CONVNET.to_vec();
        args.extend_from_slice(&["--iterations", "20", "--checkpoint-every", "10"]);
        args.extend_from_slice(extra);
        pstrain(&args)
    };
    let (ok, _, err) = run(&["--transport", "tcp", "--shards", "2", "--checkpoint-dir", d]);
    assert!(ok, "{err}");
    for (extra, has, advice) in [
        (
            &["--transport", "tcp", "--shards", "3"][..],
            3,
            "resume with the shard count",
        ),
        (&[][..], 1, "(--transport tcp --shards 2)"),
    ] {
        let mut args = extra.to_vec();
        args.extend_from_slice(&["--resume", d]);
        let (ok, _, err) = run(&args);
        assert!(!ok, "resumed a 2-shard run with {has} shards: {err}");
        assert!(
            err.contains(&format!("checkpoints for 2 shards, and this run has {has}")),
            "{err}"
        );
        assert!(err.contains(advice), "{err}");
        assert!(!err.contains("panicked"), "{err}");
        assert!(!dir.path().join(format!("shard-0-of-{has}")).exists());
    }
}

/// `pstrain eval` of a folder holding two runs' files names the run it evaluates.
#[test]
fn eval_of_a_folder_of_two_runs_names_the_one_it_took() {
    let dirs = [tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap()];
    for (dir, updates) in dirs.iter().zip(["20", "30"]) {
        let mut args = CONVNET.to_vec();
        args.extend_from_slice(&["--iterations", updates, "--checkpoint-dir"]);
        args.push(dir.path().to_str().unwrap());
        let (ok, _, err) = pstrain(&args);
        assert!(ok, "{err}");
    }
    let newer = checkpoint_file(dirs[1].path(), 30);
    let into = dirs[0]
        .path()
        .join("shard-0-of-1")
        .join(newer.file_name().unwrap());
    std::fs::copy(&newer, into).unwrap();
    for m in std::fs::read_dir(dirs[1].path()).unwrap().flatten() {
        if m.file_name().to_string_lossy().starts_with("manifest-") {
            std::fs::copy(m.path(), dirs[0].path().join(m.file_name())).unwrap();
        }
    }
    let d = dirs[0].path().to_str().unwrap();
    let (ok, out, err) = pstrain(&["eval", "--checkpoint", d]);
    assert!(ok, "{err}");
    let run = run_of(&newer);
    assert!(
        err.contains(&format!(
            "holds checkpoints of 2 runs; this is run {run} at version 30"
        )),
        "{err}"
    );
    assert!(out.contains("at version [30]"), "{out}");
    // One run's folder: no note.
    let (ok, _, err) = pstrain(&["eval", "--checkpoint", dirs[1].path().to_str().unwrap()]);
    assert!(ok && !err.contains("runs; this is"), "{err}");
}

/// A resumed run given the first run's `--metrics` file goes on after its records (it once
/// started the file over), its times after theirs, and the file still plots.
#[test]
fn a_resumed_run_continues_its_metrics_file() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().join("ckpt");
    let metrics = dir.path().join("m.jsonl");
    let run = |extra: &[&str]| {
        let mut args = CONVNET.to_vec();
        args.extend_from_slice(&["--eval-every", "0", "--metrics", metrics.to_str().unwrap()]);
        args.extend_from_slice(extra);
        pstrain(&args)
    };
    let (ok, _, err) = run(&[
        "--iterations",
        "20",
        "--checkpoint-dir",
        d.to_str().unwrap(),
    ]);
    assert!(ok, "{err}");
    let (ok, _, err) = run(&["--iterations", "40", "--resume", d.to_str().unwrap()]);
    assert!(ok, "{err}");
    let text = std::fs::read_to_string(&metrics).unwrap();
    let records: Vec<serde_json::Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let of = |event: &str| -> Vec<&serde_json::Value> {
        records.iter().filter(|r| r["event"] == event).collect()
    };
    let evals: Vec<u64> = of("eval")
        .iter()
        .map(|r| r["updates"].as_u64().unwrap())
        .collect();
    assert_eq!(evals, [20, 40], "{text}");
    assert_eq!(of("resumed").len(), 1, "{text}");
    assert_eq!(of("summary").len(), 2, "{text}");
    let times: Vec<f64> = records
        .iter()
        .filter_map(|r| r["time_s"].as_f64())
        .collect();
    assert!(
        times.windows(2).all(|w| w[0] <= w[1]),
        "times go back: {times:?}"
    );
    let png = dir.path().join("m.png");
    let (ok, _, err) = pstrain(&[
        "plot",
        metrics.to_str().unwrap(),
        "-o",
        png.to_str().unwrap(),
    ]);
    assert!(ok && png.exists(), "{err}");
}

/// A checkpoint folder that cannot take files (a file in its place) fails the start, in
/// process and over TCP, instead of the first save a minute into the run.
#[test]
fn a_checkpoint_folder_that_cannot_take_files_fails_the_start() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("not-a-folder");
    std::fs::write(&file, b"x").unwrap();
    for transport in ["inproc", "tcp"] {
        let mut args = CONVNET.to_vec();
        args.extend_from_slice(&["--transport", transport, "--iterations", "1000000"]);
        args.extend_from_slice(&["--checkpoint-dir", file.to_str().unwrap()]);
        let (ok, out, err) = pstrain(&args);
        assert!(!ok, "{transport}: {out}");
        assert!(err.contains("Not a directory"), "{transport}: {err}");
        assert!(
            !out.contains("eval:") && !err.contains("eval:"),
            "{transport} trained: {out}"
        );
        assert!(!err.contains("panicked"), "{err}");
    }
}

/// A run launched over TCP without a token of the user's (the launcher makes one for the
/// launch) resumes with `--resume` too: its checkpoints are not sealed with that token, which
/// the next launch does not have. With a token of the user's they are sealed, and resume.
#[test]
fn a_tcp_launch_resumes_with_or_without_a_token_of_the_users() {
    let token = tempfile::tempdir().unwrap();
    let token_file = token.path().join("run.token");
    let (ok, _, err) = pstrain(&["token", "-o", token_file.to_str().unwrap()]);
    assert!(ok, "{err}");
    for with_token in [false, true] {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path().to_str().unwrap();
        let run = |extra: &[&str]| {
            let mut args = CONVNET.to_vec();
            args.extend_from_slice(&["--transport", "tcp"]);
            if with_token {
                args.extend_from_slice(&["--token-file", token_file.to_str().unwrap()]);
            }
            args.extend_from_slice(extra);
            pstrain(&args)
        };
        let (ok, _, err) = run(&["--iterations", "20", "--checkpoint-dir", d]);
        assert!(ok, "{err}");
        let (ok, out, err) = run(&["--iterations", "40", "--resume", d]);
        assert!(ok, "token {with_token}: {err}");
        assert!(
            err.contains("restored") && err.contains("version 20"),
            "{err}"
        );
        assert!(out.contains("updates        40"), "{out}");
    }
}

/// A run in one process given the run's token seals its checkpoints as TCP shards do: `pstrain
/// eval --token-file` reads them (it refused them, unsealed, with only `no valid checkpoint`),
/// another token is refused saying why, and a token file that is not there fails the start
/// (it was ignored without a word).
#[test]
fn a_run_in_one_process_seals_its_checkpoints_with_the_runs_token() {
    let tokens = tempfile::tempdir().unwrap();
    let (ours, theirs) = (tokens.path().join("ours"), tokens.path().join("theirs"));
    for t in [&ours, &theirs] {
        let (ok, _, err) = pstrain(&["token", "-o", t.to_str().unwrap()]);
        assert!(ok, "{err}");
    }
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().to_str().unwrap();
    let mut args = CONVNET.to_vec();
    args.extend_from_slice(&["--iterations", "20", "--checkpoint-dir", d]);
    args.extend_from_slice(&["--token-file", ours.to_str().unwrap()]);
    let (ok, _, err) = pstrain(&args);
    assert!(ok, "{err}");
    let (ok, out, err) = pstrain(&[
        "eval",
        "--checkpoint",
        d,
        "--token-file",
        ours.to_str().unwrap(),
    ]);
    assert!(ok && out.contains("at version [20]"), "{out}{err}");
    let (ok, _, err) = pstrain(&[
        "eval",
        "--checkpoint",
        d,
        "--token-file",
        theirs.to_str().unwrap(),
    ]);
    assert!(
        !ok && err.contains("not sealed with this run's key"),
        "{err}"
    );
    let (ok, _, err) = pstrain(&[
        "train",
        "--iterations",
        "5",
        "--token-file",
        "/nonexistent/token",
    ]);
    assert!(!ok && err.contains("cannot read the token file"), "{err}");
}

#[test]
fn export_opens_in_python_safetensors() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().to_str().unwrap();
    let mut args = CONVNET.to_vec();
    args.extend_from_slice(&["--iterations", "30", "--checkpoint-dir", d]);
    let (ok, _, err) = pstrain(&args);
    assert!(ok, "{err}");
    let (ok, out, err) = pstrain(&["eval", "--checkpoint", d]);
    assert!(ok, "{err}");
    assert!(out.contains("test accuracy"), "{out}");
    let file = dir.path().join("model.safetensors");
    let (ok, _, err) = pstrain(&["export", "--checkpoint", d, "--out", file.to_str().unwrap()]);
    assert!(ok, "{err}");
    // Into a pipe (`--out /dev/stdout`, stdout a pipe here): the same bytes come down it, the
    // note goes to stderr, and the name is written into, not replaced.
    let piped = Command::new(common::pstrain_bin())
        .args(["export", "--checkpoint", d, "--out", "/dev/stdout"])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&piped.stderr);
    assert!(piped.status.success(), "{stderr}");
    assert!(piped.stdout == std::fs::read(&file).unwrap(), "{stderr}");
    assert!(stderr.contains("wrote /dev/stdout"), "{stderr}");

    let script = "import sys\n\
from safetensors.numpy import load_file\n\
t = load_file(sys.argv[1])\n\
for k in sorted(t): print(k, list(t[k].shape), t[k].dtype)\n";
    let py = Command::new("python3")
        .args(["-c", script])
        .arg(&file)
        .output();
    let out = match py {
        Ok(o) if o.status.success() => String::from_utf8_lossy(&o.stdout).into_owned(),
        other => {
            let why = format!("{other:?}");
            if std::env::var_os("CI").is_some() {
                panic!("CI installs Python's safetensors; it failed: {why}");
            }
            println!("SKIPPED the Python check (pip install safetensors numpy): {why}");
            return;
        }
    };
    assert_eq!(
        out.lines().collect::<Vec<_>>(),
        [
            "conv1.bias [3] float32",
            "conv1.weight [3, 1, 3, 3] float32",
            "fc.bias [10] float32",
            "fc.weight [10, 192] float32"
        ]
    );
}

#[test]
fn a_shard_refuses_checkpoints_it_cannot_use_unless_told_fresh() {
    // A folder whose only checkpoint is damaged: a restarted shard must not quietly begin
    // again from the initial weights.
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().to_str().unwrap();
    let (ok, _, err) = pstrain(&[
        "train",
        "--model",
        "convnet",
        "--iterations",
        "20",
        "--checkpoint-dir",
        d,
    ]);
    assert!(ok, "{err}");
    let file = checkpoint_file(dir.path(), 20);
    let run_id = run_of(&file);
    let server = |extra: &[&str]| {
        let mut args = vec![
            "server",
            "--listen",
            "127.0.0.1:0",
            "--model",
            "convnet",
            "--workers",
            "1",
            "--checkpoint-dir",
            d,
        ];
        args.extend_from_slice(extra);
        Command::new(common::pstrain_bin())
            .args(&args)
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap()
    };
    // Files of another run only (this server's run id is derived from its token and plan):
    // refused naming that run, what this plan changed from it, and how to continue it.
    let refused = server(&[]).wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&refused.stderr);
    assert!(!refused.status.success(), "{err}");
    for part in [
        format!("holds checkpoints of run {run_id} (up to version 20)"),
        "its plan changed workers 2 -> 1; iterations 20 -> none".into(),
        format!("add --run-id {run_id}"),
        "--fresh".into(),
    ] {
        assert!(err.contains(&part), "{part}: {err}");
    }
    // The run's own file damaged.
    let mut bytes = std::fs::read(&file).unwrap();
    let n = bytes.len();
    bytes[n - 3] ^= 0x01;
    std::fs::write(&file, &bytes).unwrap();
    let refused = server(&["--run-id", &run_id]).wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&refused.stderr);
    assert!(!refused.status.success(), "{err}");
    assert!(
        err.contains("cannot use the checkpoints") && err.contains("--fresh"),
        "{err}"
    );
    assert!(err.contains("checksum mismatch"), "{err}");
    assert!(!err.contains("panicked"), "{err}");
    // With --fresh it starts (and says why); the damaged file is left where it was.
    let mut fresh = server(&["--run-id", &run_id, "--fresh"]);
    let mut line = String::new();
    std::io::BufRead::read_line(
        &mut std::io::BufReader::new(fresh.stdout.take().unwrap()),
        &mut line,
    )
    .unwrap();
    let _ = fresh.kill();
    let out = fresh.wait_with_output().unwrap();
    assert!(line.starts_with("listening on "), "{line}");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("--fresh: starting from the initial weights")
    );
    assert!(file.exists());
}

/// A 32 KiB tmpfs (needs the right to mount: root or CAP_SYS_ADMIN); `None` where that is
/// not allowed.
struct SmallDisk(tempfile::TempDir);

impl SmallDisk {
    fn mount() -> Option<SmallDisk> {
        let dir = tempfile::tempdir().ok()?;
        let ok = Command::new("mount")
            .args(["-t", "tmpfs", "-o", "size=32k", "tmpfs"])
            .arg(dir.path())
            .stderr(std::process::Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        ok.then_some(SmallDisk(dir))
    }
}

impl Drop for SmallDisk {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(self.0.path()).status();
    }
}

#[test]
fn a_full_disk_is_a_clear_error_and_a_non_zero_exit() {
    let Some(disk) = SmallDisk::mount() else {
        eprintln!("cannot mount a tmpfs here (not root): the full-disk test was skipped");
        return;
    };
    let d = disk.0.path().to_str().unwrap();
    // Fill the disk, then train with checkpoints there: the cnn's checkpoint (14 MB) cannot
    // be written.
    let _ = std::fs::write(disk.0.path().join("filler"), vec![0u8; 30 << 10]);
    let (ok, _, err) = pstrain(&[
        "train",
        "--model",
        "cnn",
        "--iterations",
        "3",
        "--checkpoint-dir",
        d,
    ]);
    assert!(
        !ok,
        "a run whose checkpoint could not be written must fail: {err}"
    );
    assert!(
        err.contains("No space left on device") || err.contains("space"),
        "{err}"
    );
    assert!(!err.contains("panicked"), "{err}");
    // Nothing half-written is left behind as a checkpoint.
    let (ok, _, err) = pstrain(&["eval", "--checkpoint", d]);
    assert!(!ok && err.contains("no valid checkpoint"), "{err}");
}

#[test]
fn foreign_higher_numbered_files_do_not_make_a_run_delete_its_checkpoints() {
    // Three junk files with higher version numbers than the run will reach: pruning by
    // number alone deleted every new checkpoint right after writing it.
    let dir = tempfile::tempdir().unwrap();
    let shard_dir = dir.path().join("shard-0-of-1");
    std::fs::create_dir_all(&shard_dir).unwrap();
    for v in [7, 8, 9] {
        let junk: Vec<u8> = (0..4096u32).map(|i| (i * 31 + v) as u8).collect();
        std::fs::write(
            shard_dir.join(format!("ckpt-99999999999{v}.safetensors")),
            junk,
        )
        .unwrap();
    }
    let d = dir.path().to_str().unwrap();
    let (ok, _, err) = pstrain(&[
        "train",
        "--model",
        "convnet",
        "--iterations",
        "600",
        "--checkpoint-dir",
        d,
        "--checkpoint-every",
        "100",
    ]);
    assert!(ok, "{err}");
    let own: Vec<String> = std::fs::read_dir(&shard_dir)
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with("ckpt-0"))
        .collect();
    assert!(
        own.iter().any(|n| n.starts_with("ckpt-000000000600.")),
        "{own:?}"
    );
    let (ok, out, err) = pstrain(&["eval", "--checkpoint", d]);
    assert!(ok, "{err}");
    assert!(out.contains("at version [600]"), "{out}{err}");
    // The foreign files were left alone.
    assert_eq!(
        std::fs::read_dir(&shard_dir).unwrap().count(),
        own.len() + 3
    );
    // A new run refuses the folder (it holds a run now); --resume continues that run.
    let more = ["train", "--model", "convnet", "--iterations", "700"];
    let (ok, _, err) = pstrain(&[&more[..], &["--checkpoint-dir", d]].concat());
    assert!(!ok, "a second run mixed into the first one's folder");
    assert!(
        err.contains("already holds checkpoints of run") && err.contains("--resume"),
        "{err}"
    );
    let (ok, _, err) = pstrain(&[&more[..], &["--resume", d]].concat());
    assert!(ok && err.contains("version 600"), "{err}");
}

/// The checkpoint file of shard 0 of 1 at `version` (its name ends in the run's id).
fn checkpoint_file(root: &std::path::Path, version: u64) -> std::path::PathBuf {
    let dir = root.join("shard-0-of-1");
    let prefix = format!("ckpt-{version:012}.");
    std::fs::read_dir(&dir)
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .find(|p| {
            p.file_name()
                .unwrap()
                .to_string_lossy()
                .starts_with(&prefix)
        })
        .unwrap_or_else(|| panic!("no checkpoint of version {version} in {}", dir.display()))
}

/// The run id in a checkpoint file's name (`ckpt-VERSION.RUN.safetensors`).
fn run_of(file: &std::path::Path) -> String {
    let name = file.file_name().unwrap().to_string_lossy().into_owned();
    let middle = name.strip_suffix(".safetensors").unwrap();
    middle.split_once('.').unwrap().1.to_string()
}
