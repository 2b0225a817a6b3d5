//! Round trips of the argv builders: what a launcher writes for a shard or a worker parses
//! back, through the very flags `pstrain server` and `pstrain worker` take, into the run it
//! was written from.

use super::device::DeviceArgs;
use super::parse_flags;
use super::server::{server_argv, ServerArgs};
use super::train::TrainArgs;
use super::worker::{worker_argv, WorkerArgs};
use crate::run::device_speed::DeviceSpeed;
use crate::run::{CheckpointPolicy, TrainConfig, DEFAULT_LOOKAHEAD};
use pstrain_core::{Mode, OptimizerConfig, RunPlan};
use std::path::{Path, PathBuf};
use std::time::Duration;

fn plan() -> RunPlan {
    RunPlan {
        model: "convnet".into(),
        mode: Mode::Ssp { max_lead: 3 },
        workers: 5,
        batch_size: 24,
        iterations: Some(777),
        optimizer: OptimizerConfig::momentum(0.02, 0.8),
        seed: 41,
        train_samples: 1000,
        ..RunPlan::default()
    }
}

fn policy(every: Option<Duration>, every_updates: Option<u64>) -> CheckpointPolicy {
    CheckpointPolicy {
        run_id: "run-7f3a".into(),
        dir: PathBuf::from("/tmp/some where/ckpt"),
        every_updates,
        every,
        keep: 4,
        resume: true,
        key: None,
    }
}

/// The shard a launcher starts: its flags after `--listen` and `--shard`, parsed.
fn shard_args(cfg: &TrainConfig, shards: usize) -> ServerArgs {
    let mut argv: Vec<String> = ["--listen", "127.0.0.1:0", "--shard", "1"]
        .map(String::from)
        .to_vec();
    argv.extend(server_argv(cfg, shards));
    parse_flags::<ServerArgs>("server", &argv).unwrap()
}

#[test]
fn a_launched_shard_runs_the_plan_it_was_given() {
    let cfg = TrainConfig {
        plan: plan(),
        ..TrainConfig::default()
    };
    let args = shard_args(&cfg, 3);
    assert_eq!(args.shards, 3);
    assert_eq!(args.run.overlay(&RunPlan::default()).unwrap(), cfg.plan);
    assert_eq!(
        args.checkpoints
            .policy(None, true, |_| unreachable!())
            .unwrap(),
        None
    );
}

#[test]
fn a_launched_shard_checkpoints_as_the_run_says() {
    for (every, every_updates) in [
        (Some(Duration::from_millis(2500)), None),
        (None, Some(50)),
        (Some(Duration::from_secs(7)), Some(9)),
    ] {
        let cfg = TrainConfig {
            plan: plan(),
            checkpoint: Some(policy(every, every_updates)),
            ..TrainConfig::default()
        };
        let args = shard_args(&cfg, 2);
        let given = args.checkpoints.run_id.clone().unwrap();
        let parsed = args.checkpoints.policy(None, true, |_| Ok(given)).unwrap();
        assert_eq!(
            parsed, cfg.checkpoint,
            "every {every:?}, every_updates {every_updates:?}"
        );
    }
}

#[test]
fn a_launched_worker_keeps_its_own_settings() {
    let cfg = TrainConfig {
        plan: plan(),
        threads: 3,
        slowdown: vec![(1, 2.5), (4, 10.0)],
        speed_spread: Some(8.0),
        speed_period: Some(30.0),
        overlap: true,
        lookahead: 1.5,
        ..TrainConfig::default()
    };
    let dir = Path::new("/data/m nist");
    let mut argv: Vec<String> = ["--servers", "a:1,b:2", "--rank", "1"]
        .map(String::from)
        .to_vec();
    argv.extend(worker_argv(&cfg, Some(dir)));
    let args = parse_flags::<WorkerArgs>("worker", &argv).unwrap();
    assert_eq!(args.threads(), cfg.threads);
    assert_eq!(args.device.slowdown, cfg.slowdown);
    assert_eq!(args.device.speed_spread, cfg.speed_spread);
    assert!(args.device.overlap);
    assert_eq!(args.device.lookahead, Some(cfg.lookahead));
    assert_eq!(args.device.speed_period, cfg.speed_period);
    assert_eq!(args.data.data_dir.as_deref(), Some(dir));
    assert_eq!(args.servers, ["a:1", "b:2"]);
    // The plan is not the worker's to be told: it comes from the shards.
    assert_eq!(
        args.run.overlay(&RunPlan::default()).unwrap(),
        RunPlan::default()
    );
}

#[test]
fn a_speed_spread_gives_every_rank_its_own_seeded_speed_and_slowdown_overrides_it() {
    let cfg = TrainConfig {
        plan: plan(),
        slowdown: vec![(3, 2.0)],
        speed_spread: Some(16.0),
        ..TrainConfig::default()
    };
    let speeds: Vec<f64> = (0..200).map(|r| cfg.slowdown_of(r)).collect();
    assert!(
        speeds.iter().all(|f| (1.0..=16.0).contains(f)),
        "{speeds:?}"
    );
    assert_eq!(speeds[3], 2.0);
    // Log-uniform from 1 to 16: about half the devices are slower than 4x.
    let slow = speeds.iter().filter(|f| **f > 4.0).count();
    assert!((70..130).contains(&slow), "{slow} of 200");
    assert_eq!(
        speeds,
        (0..200).map(|r| cfg.slowdown_of(r)).collect::<Vec<_>>()
    );
    let reseeded = TrainConfig {
        plan: RunPlan {
            seed: cfg.plan.seed + 1,
            ..cfg.plan.clone()
        },
        ..cfg.clone()
    };
    assert_ne!(speeds[0], reseeded.slowdown_of(0));
    // With a period, the drawn ranks' speeds vary; a rank given --slowdown keeps its own.
    let varying = TrainConfig {
        speed_period: Some(5.0),
        ..cfg.clone()
    };
    assert!(matches!(
        varying.speed_of(0),
        DeviceSpeed::Varying { rank: 0, .. }
    ));
    assert_eq!(varying.speed_of(3), DeviceSpeed::Fixed(2.0));
    assert_eq!(cfg.speed_of(0), DeviceSpeed::Fixed(speeds[0]));
    for bad in [
        TrainConfig {
            speed_spread: Some(0.5),
            ..cfg.clone()
        },
        TrainConfig {
            speed_period: Some(0.0),
            ..varying.clone()
        },
        TrainConfig {
            speed_spread: None,
            ..varying
        },
    ] {
        assert!(bad.validate().is_err(), "{bad:?}");
    }
}

#[test]
fn overlap_is_for_modes_whose_pulls_do_not_wait() {
    let with = |mode: Mode| TrainConfig {
        plan: RunPlan { mode, ..plan() },
        overlap: true,
        ..TrainConfig::default()
    };
    for mode in [Mode::Sync { backup_workers: 0 }, Mode::Ssp { max_lead: 3 }] {
        let err = with(mode).validate().unwrap_err().to_string();
        assert!(err.contains("overlap"), "{err}");
    }
    for mode in [
        Mode::Async {
            max_staleness: None,
        },
        Mode::Buffered {
            k: 2,
            max_staleness: None,
        },
    ] {
        with(mode).validate().unwrap();
        assert!(with(mode).worker_config(0).overlap);
    }
}

#[test]
fn lookahead_is_a_few_rounds_of_an_overlapped_worker() {
    let async_plan = RunPlan {
        mode: Mode::Async {
            max_staleness: None,
        },
        ..plan()
    };
    let with = |overlap: bool, lookahead: f32| TrainConfig {
        plan: async_plan.clone(),
        overlap,
        lookahead,
        ..TrainConfig::default()
    };
    with(true, 1.0).validate().unwrap();
    assert_eq!(with(true, 1.0).worker_config(1).lookahead, 1.0);
    with(true, 0.0).validate().unwrap();
    // Without overlap nothing looks ahead, whatever the setting.
    with(false, 1.0).validate().unwrap();
    for (overlap, lookahead) in [(true, -1.0), (true, 5.0), (true, f32::NAN)] {
        let err = with(overlap, lookahead).validate().unwrap_err().to_string();
        assert!(err.contains("lookahead"), "{err}");
    }
    // Overlapped workers look one round ahead unless told otherwise; --lookahead alone is
    // refused, since it would do nothing.
    let flags = |argv: &[&str]| {
        let argv: Vec<String> = argv.iter().map(|a| a.to_string()).collect();
        parse_flags::<WorkerArgs>("worker", &argv)
    };
    let default = flags(&["--servers", "a:1", "--rank", "0", "--overlap"]).unwrap();
    let cfg = default.device.configure(TrainConfig::default());
    assert_eq!((cfg.overlap, cfg.lookahead), (true, DEFAULT_LOOKAHEAD));
    let off = flags(&[
        "--servers",
        "a:1",
        "--rank",
        "0",
        "--overlap",
        "--lookahead",
        "0",
    ])
    .unwrap();
    assert_eq!(off.device.configure(TrainConfig::default()).lookahead, 0.0);
    let err = flags(&["--servers", "a:1", "--rank", "0", "--lookahead", "1"])
        .unwrap_err()
        .to_string();
    assert!(err.contains("--overlap"), "{err}");
}

#[test]
fn overlap_until_is_a_share_of_the_planned_updates_then_exact_rounds() {
    let async_plan = RunPlan {
        mode: Mode::Async {
            max_staleness: None,
        },
        iterations: Some(3000),
        ..plan()
    };
    let with = |overlap: bool, until: f64| TrainConfig {
        plan: async_plan.clone(),
        overlap,
        overlap_until: until,
        ..TrainConfig::default()
    };
    // Overlapped to the end unless told otherwise; 0.7 of 3,000 updates: exact from 2,100.
    assert_eq!(TrainConfig::default().overlap_until, 1.0);
    assert_eq!(with(true, 1.0).worker_config(0).exact_from, None);
    with(true, 0.7).validate().unwrap();
    assert_eq!(with(true, 0.7).worker_config(1).exact_from, Some(2100));
    assert_eq!(with(false, 0.7).worker_config(1).exact_from, None);
    for until in [0.0, -0.5, 1.5, f64::NAN, f64::INFINITY] {
        let err = with(true, until).validate().unwrap_err().to_string();
        assert!(err.contains("overlap_until"), "{until}: {err}");
    }
    let argv = |v: &[&str]| v.iter().map(|a| a.to_string()).collect::<Vec<_>>();
    let base = ["--servers", "a:1", "--rank", "0", "--overlap"];
    let given = parse_flags::<WorkerArgs>(
        "worker",
        &argv(&[&base[..], &["--overlap-until", "0.8"]].concat()),
    )
    .unwrap();
    let cfg = given.device.configure(with(true, 1.0));
    assert_eq!(cfg.overlap_until, 0.8);
    // Passed on to the worker processes a launcher starts, and only when it differs.
    let passed = DeviceArgs::argv(&cfg);
    assert!(
        passed.windows(2).any(|w| w == ["--overlap-until", "0.8"]),
        "{passed:?}"
    );
    assert!(!DeviceArgs::argv(&with(true, 1.0)).contains(&"--overlap-until".to_string()));
    let err = parse_flags::<WorkerArgs>(
        "worker",
        &argv(&["--servers", "a:1", "--rank", "0", "--overlap-until", "0.5"]),
    )
    .unwrap_err()
    .to_string();
    assert!(err.contains("--overlap"), "{err}");
}

#[test]
fn a_speed_trace_is_read_with_the_flags_replayed_by_every_rank_and_passed_to_workers() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("devices.csv");
    std::fs::write(&path, "device,from_s,factor\n0,0,1\n0,60,4\n1,0,3\n").unwrap();
    let path_arg = path.display().to_string();
    let owned = |v: &[&str]| v.iter().map(|a| a.to_string()).collect::<Vec<_>>();
    // A worker's flags with the trace, and `more`.
    let traced = |more: &[&str]| {
        let mut argv = owned(&[
            "--servers",
            "a:1",
            "--rank",
            "0",
            "--speed-trace",
            &path_arg,
        ]);
        argv.extend(owned(more));
        parse_flags::<WorkerArgs>("worker", &argv)
    };
    let args = traced(&["--slowdown", "4=7"]).unwrap();
    let cfg = args.device.configure(TrainConfig {
        plan: plan(),
        ..TrainConfig::default()
    });
    cfg.validate().unwrap();
    let factor = |rank, s| cfg.speed_of(rank).factor_at(Duration::from_secs(s));
    assert_eq!((factor(0, 10), factor(0, 61)), (1.0, 4.0));
    assert_eq!(factor(1, 61), 3.0);
    assert_eq!(factor(2, 61), 4.0, "rank 2 replays device 0 of 2");
    assert_eq!(cfg.speed_of(4), DeviceSpeed::Fixed(7.0), "--slowdown wins");
    // A launcher hands its workers the same file.
    let mut argv = owned(&["--servers", "a:1", "--rank", "2"]);
    argv.extend(worker_argv(&cfg, None));
    let relaunched = parse_flags::<WorkerArgs>("worker", &argv).unwrap();
    assert_eq!(relaunched.device.speed_trace, cfg.speed_trace);
    // A damaged trace is refused when the flags are read, by its line.
    std::fs::write(&path, "0,0,1\n0,60,0\n").unwrap();
    let err = traced(&[]).unwrap_err().to_string();
    assert!(err.contains("line 2: factor `0`"), "{err}");
    // And a trace with a spread is one speed source too many.
    let both = traced(&["--speed-spread", "4"]);
    assert!(both.is_err());
}

#[test]
fn checkpoint_flags_without_a_folder_are_refused() {
    let server = |extra: &[&str]| {
        let mut argv: Vec<String> = ["--listen", "127.0.0.1:0", "--shard", "0"]
            .map(String::from)
            .to_vec();
        argv.extend(extra.iter().map(|s| s.to_string()));
        parse_flags::<ServerArgs>("server", &argv)
    };
    for (flag, value) in [
        ("--checkpoint-every", "5"),
        ("--checkpoint-secs", "5"),
        ("--keep-checkpoints", "2"),
        ("--run-id", "abc"),
    ] {
        let args = server(&[flag, value]).unwrap();
        let refused = args
            .checkpoints
            .policy(None, true, |_| unreachable!())
            .unwrap_err()
            .to_string();
        assert!(refused.starts_with(flag), "{refused}");
        assert!(refused.contains("needs --checkpoint-dir"), "{refused}");
        // With a folder the same flag is taken.
        let args = server(&[flag, value, "--checkpoint-dir", "/tmp/x"]).unwrap();
        let policy = args.checkpoints.policy(None, true, |_| Ok("r".into()));
        assert!(policy.unwrap().is_some(), "{flag}");
    }
    // Clap's own rule: --fresh only with a folder.
    assert!(server(&["--fresh"]).is_err());
    assert!(server(&["--fresh", "--checkpoint-dir", "/tmp/x"]).is_ok());
}

#[test]
fn a_resume_beside_another_checkpoint_folder_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let (a, b) = (dir.path().join("a"), dir.path().join("b"));
    let args = |folder: &Path| {
        let argv = ["--checkpoint-dir".to_string(), folder.display().to_string()];
        parse_flags::<TrainArgs>("train", &argv).unwrap()
    };
    let refused = args(&b)
        .checkpoints
        .policy(Some(&a), true, |_| Ok("r".into()))
        .unwrap_err()
        .to_string();
    assert!(refused.contains("would be ignored"), "{refused}");
    // The same folder, named either way, is taken.
    std::fs::create_dir(&a).unwrap();
    let same = a.join("..").join("a");
    let policy = args(&same)
        .checkpoints
        .policy(Some(&a), true, |_| Ok("r".into()));
    assert_eq!(policy.unwrap().unwrap().dir, a);
}
