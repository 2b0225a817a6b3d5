//! Tests of the flags <-> plan conversion: every field round-trips, defaults, refusals and
//! contradictions named by flag.
use super::*;
use clap::Parser;

#[derive(Parser)]
struct Wrapper {
    #[command(flatten)]
    run: RunArgs,
}

fn parse(argv: &[String]) -> RunArgs {
    Wrapper::try_parse_from(std::iter::once("x".to_string()).chain(argv.iter().cloned()))
        .unwrap()
        .run
}

fn round_trip(plan: &RunPlan) -> RunPlan {
    parse(&plan_argv(plan))
        .overlay(&RunPlan::default())
        .unwrap()
}

#[test]
fn every_field_survives_flags_and_back() {
    // Every field away from its default, in each shape the flags can express.
    let plans = [
        RunPlan {
            model: "convnet".into(),
            mode: Mode::Sync { backup_workers: 1 },
            workers: 3,
            batch_size: 16,
            epochs: 7,
            iterations: Some(123),
            optimizer: OptimizerConfig::momentum(0.037, 0.85).with_weight_decay(0.0005),
            schedule: ScheduleKind::Constant,
            aggregate: Aggregate::Sum,
            seed: 99,
            train_samples: 1234,
            clip: Some(GradientClip {
                max_norm: 3.5,
                refuse: true,
            }),
            staleness_aware_lr: false,
            balance_batches: true,
            push_codec: pstrain_core::PushCodec::TopK { per_mille: 7 },
            pull_codec: pstrain_core::PullCodec::Bf16,
            auto_codecs: false,
        },
        RunPlan {
            auto_codecs: true,
            ..RunPlan::default()
        },
        RunPlan {
            mode: Mode::Buffered {
                k: 7,
                max_staleness: None,
            },
            staleness_aware_lr: true,
            ..RunPlan::default()
        },
        RunPlan {
            mode: Mode::Ssp { max_lead: 4 },
            staleness_aware_lr: true,
            push_codec: pstrain_core::PushCodec::Int8,
            pull_codec: pstrain_core::PullCodec::DeltaTopK { per_mille: 25 },
            ..RunPlan::default()
        },
        RunPlan {
            mode: Mode::Async {
                max_staleness: None,
            },
            optimizer: OptimizerConfig::sgd(0.3),
            ..RunPlan::default()
        },
        RunPlan {
            mode: Mode::Async {
                max_staleness: Some(5),
            },
            optimizer: OptimizerConfig::adam(0.002).with_weight_decay(0.01),
            ..RunPlan::default()
        },
        RunPlan::default(),
    ];
    for plan in &plans {
        assert_eq!(&round_trip(plan), plan);
    }
}

#[test]
fn no_flags_is_the_default_plan_and_lr_follows_the_optimizer() {
    let none = RunArgs::default();
    assert_eq!(
        none.overlay(&RunPlan::default()).unwrap(),
        RunPlan::default()
    );
    let sgd = RunArgs {
        optimizer: Some(OptimizerArg::Sgd),
        ..RunArgs::default()
    };
    assert_eq!(
        sgd.overlay(&RunPlan::default()).unwrap().optimizer,
        OptimizerConfig::sgd(0.01)
    );
    let bad = RunArgs {
        backup_workers: Some(1),
        ..RunArgs::default()
    };
    assert_eq!(
        bad.overlay(&RunPlan::default()),
        Err(FlagError::BackupsInAsync)
    );
    let lead_in_async = RunArgs {
        max_lead: Some(2),
        ..RunArgs::default()
    };
    assert!(lead_in_async.overlay(&RunPlan::default()).is_err());
    let staleness_in_ssp = RunArgs {
        mode: Some(ModeArg::Ssp),
        max_staleness: Some(2),
        ..RunArgs::default()
    };
    assert!(staleness_in_ssp.overlay(&RunPlan::default()).is_err());
    let ssp = RunArgs {
        mode: Some(ModeArg::Ssp),
        ..RunArgs::default()
    };
    assert_eq!(
        ssp.overlay(&RunPlan::default()).unwrap().mode,
        Mode::Ssp { max_lead: 3 }
    );
    let buffered = RunArgs {
        mode: Some(ModeArg::Buffered),
        ..RunArgs::default()
    };
    assert_eq!(
        buffered.overlay(&RunPlan::default()).unwrap().mode,
        Mode::Buffered {
            k: 10,
            max_staleness: Some(32)
        }
    );
    let buffer_in_async = RunArgs {
        buffer: Some(4),
        ..RunArgs::default()
    };
    assert!(buffer_in_async.overlay(&RunPlan::default()).is_err());
    let empty_buffer = RunArgs {
        mode: Some(ModeArg::Buffered),
        buffer: Some(0),
        ..RunArgs::default()
    };
    assert!(empty_buffer.overlay(&RunPlan::default()).is_err());
}

#[test]
fn contradictions_name_the_flag_and_both_values() {
    let plan = RunPlan {
        mode: Mode::Sync { backup_workers: 0 },
        ..RunPlan::default()
    };
    // Repeating the plan's values is fine.
    let same = parse(&plan_argv(&plan));
    assert!(same.contradictions(&plan).unwrap().is_empty());
    let other = RunArgs {
        iterations: Some(300),
        mode: Some(ModeArg::Async),
        ..RunArgs::default()
    };
    let found = other.contradictions(&plan).unwrap();
    let flags: Vec<&str> = found.iter().map(|c| c.0.as_str()).collect();
    assert_eq!(
        flags,
        [
            "--mode/--max-staleness/--max-lead/--backup-workers/--buffer",
            "--iterations"
        ]
    );
    assert_eq!(found[1].1, "300");
    assert_eq!(found[1].2, "none");
}

#[test]
fn auto_on_either_side_picks_both_and_half_auto_is_refused() {
    let auto = RunPlan {
        auto_codecs: true,
        ..RunPlan::default()
    };
    for argv in [
        &["--push-codec", "auto"][..],
        &["--pull-codec", "auto"],
        &["--push-codec", "auto", "--pull-codec", "auto"],
    ] {
        let plan = parse(&strings(argv)).overlay(&RunPlan::default()).unwrap();
        assert_eq!(plan, auto, "{argv:?}");
    }
    let half = parse(&strings(&["--push-codec", "auto", "--pull-codec", "bf16"]));
    assert_eq!(half.overlay(&RunPlan::default()), Err(FlagError::HalfAuto));
    // A fixed codec over an auto plan makes both fixed (the other fp32).
    let fixed = parse(&strings(&["--push-codec", "int8"]))
        .overlay(&auto)
        .unwrap();
    assert!(!fixed.auto_codecs);
    assert_eq!(fixed.push_codec, pstrain_core::PushCodec::Int8);
    assert_eq!(fixed.pull_codec, pstrain_core::PullCodec::Fp32);
    // A worker that says fixed codecs to an auto run is told which flag contradicts it.
    let found = parse(&strings(&["--push-codec", "int8"]))
        .contradictions(&auto)
        .unwrap();
    assert!(found.iter().any(|c| c.0.contains("auto")), "{found:?}");
}

fn strings(argv: &[&str]) -> Vec<String> {
    argv.iter().map(|s| s.to_string()).collect()
}

#[test]
fn flags_the_mode_optimizer_or_clipping_would_ignore_are_refused() {
    let refused = |argv: &[&str]| parse(&strings(argv)).overlay(&RunPlan::default());
    // A sync step has no staleness to bound.
    assert_eq!(
        refused(&["--mode", "sync", "--max-staleness", "5"])
            .unwrap_err()
            .to_string(),
        "--max-staleness applies to --mode async or buffered only"
    );
    // The default optimizer is Adam: a momentum there was dropped without a word.
    assert_eq!(
        refused(&["--momentum", "0.5"]).unwrap_err().to_string(),
        "--momentum applies to --optimizer momentum only (this run's optimizer is adam)"
    );
    assert!(matches!(
        refused(&["--optimizer", "sgd", "--momentum", "0.5"]),
        Err(FlagError::OnlyForOptimizer { used: "sgd", .. })
    ));
    let momentum = refused(&["--optimizer", "momentum", "--momentum", "0.5"]).unwrap();
    assert_eq!(momentum.optimizer, OptimizerConfig::momentum(0.01, 0.5));
    assert_eq!(
        refused(&["--grad-norm-action", "refuse"]),
        Err(FlagError::ActionWithoutNorm)
    );
    let clip = refused(&["--max-grad-norm", "5", "--grad-norm-action", "refuse"]).unwrap();
    assert_eq!(
        clip.clip,
        Some(GradientClip {
            max_norm: 5.0,
            refuse: true
        })
    );
}
