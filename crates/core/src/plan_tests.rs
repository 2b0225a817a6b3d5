use super::*;

#[test]
fn planning_counts_updates_by_mode() {
    let sync = RunPlan {
        mode: Mode::Sync { backup_workers: 0 },
        workers: 2,
        batch_size: 64,
        epochs: 3,
        ..RunPlan::default()
    };
    // 60,000 / 2 workers / 64 = 468.75 -> 469 steps each.
    assert_eq!(sync.steps_per_epoch(), 469);
    assert_eq!(sync.planned_updates(), 3 * 469);
    assert_eq!(sync.samples_per_update(), 128);
    let asynchronous = RunPlan {
        mode: Mode::Async {
            max_staleness: None,
        },
        ..sync.clone()
    };
    assert_eq!(asynchronous.planned_updates(), 3 * 469 * 2);
    let fixed = RunPlan {
        iterations: Some(10),
        ..sync.clone()
    };
    assert_eq!(fixed.planned_updates(), 10);
    assert_eq!(fixed.server_config().max_updates, Some(10));
    // Buffered: every gradient of the epochs, 4 per update (2 x 469 x 3 / 4, rounded
    // down over the whole run, not per epoch).
    let buffered = RunPlan {
        mode: Mode::Buffered {
            k: 4,
            max_staleness: None,
        },
        ..sync.clone()
    };
    assert_eq!(buffered.planned_updates(), 2 * 469 * 3 / 4);
    assert_eq!(buffered.samples_per_update(), 4 * 64);
}

#[test]
fn differences_name_each_field() {
    let a = RunPlan::default();
    let b = RunPlan {
        seed: 7,
        workers: 3,
        ..a.clone()
    };
    let fields: Vec<_> = a.differences(&b).into_iter().map(|d| d.0).collect();
    assert_eq!(fields, vec!["workers", "seed"]);
    assert!(a.differences(&a).is_empty());
    assert!(RunPlan {
        epochs: 0,
        ..a.clone()
    }
    .validate()
    .is_err());
    assert!(a.validate().is_ok());
}

#[test]
fn auto_replays_pulls_in_sync_runs_only() {
    let sync = RunPlan {
        mode: Mode::Sync { backup_workers: 0 },
        auto_codecs: true,
        ..RunPlan::default()
    };
    assert!(sync.auto_replays() && sync.allows_pull(PullCodec::Replay));
    assert!(sync.keeps_update_log(), "its shards log updates to replay");
    for mode in [
        Mode::Async {
            max_staleness: None,
        },
        Mode::Ssp { max_lead: 2 },
        Mode::Buffered {
            k: 2,
            max_staleness: None,
        },
    ] {
        let other = RunPlan {
            mode,
            ..sync.clone()
        };
        assert!(!other.auto_replays(), "{mode:?}");
        assert!(!other.allows_pull(PullCodec::Replay) && !other.keeps_update_log());
    }
    let fixed = RunPlan {
        auto_codecs: false,
        ..sync.clone()
    };
    assert!(!fixed.auto_replays() && !fixed.allows_pull(PullCodec::Replay));
    // Every replayed rung pushes with a codec the shards take from `auto` workers.
    for rung in crate::compression::REPLAY_LADDER {
        assert!(sync.allows_push(rung.push) && sync.allows_pull(rung.pull));
    }
}

/// A plan names no more workers than the wire carries: a shard refuses to serve one past
/// it, rather than starting and then refusing every worker's handshake.
#[test]
fn a_plan_past_the_wires_worker_bound_is_invalid() {
    let at = RunPlan {
        workers: MAX_WORKERS,
        train_samples: 100_000,
        ..RunPlan::default()
    };
    assert!(at.validate().is_ok());
    let past = RunPlan {
        workers: MAX_WORKERS + 1,
        ..at
    };
    let err = past.validate().unwrap_err().to_string();
    assert!(err.contains("workers") && err.contains("65536"), "{err}");
}

/// Every worker needs a sample of its own: a plan of more workers than training samples is
/// refused (a worker with an empty shard divided by zero picking its batch).
#[test]
fn a_plan_of_more_workers_than_samples_is_invalid() {
    let fits = RunPlan {
        workers: 10,
        train_samples: 10,
        ..RunPlan::default()
    };
    assert!(fits.validate().is_ok());
    let past = RunPlan {
        workers: 16,
        ..fits
    };
    let err = past.validate().unwrap_err().to_string();
    assert!(err.contains("16 for 10 samples"), "{err}");
}

#[test]
fn a_record_names_what_a_later_plan_changed() {
    let saved = RunPlan::default();
    let record = saved.record();
    assert_eq!(saved.differences_from_record(&record), Some(vec![]));
    assert_eq!(saved.changes_since(&record), None);
    let later = RunPlan {
        workers: 3,
        optimizer: OptimizerConfig::adam(0.02),
        ..saved.clone()
    };
    assert_eq!(
        later.changes_since(&record).as_deref(),
        Some(
            "workers 2 -> 3; optimizer adam (lr 0.001, betas 0.9/0.999, eps 1e-8, weight decay \
             0) -> adam (lr 0.02, betas 0.9/0.999, eps 1e-8, weight decay 0)"
        )
    );
    // A field the record lacks (a file of an older version) is not compared; a text that is
    // no record (the older free-form description) compares nothing.
    let without_workers: String = record
        .lines()
        .filter(|l| !l.starts_with("workers="))
        .map(|l| format!("{l}\n"))
        .collect();
    let fields: Vec<_> = later
        .differences_from_record(&without_workers)
        .unwrap()
        .into_iter()
        .map(|d| d.0)
        .collect();
    assert_eq!(fields, vec!["optimizer"]);
    assert_eq!(later.differences_from_record(&format!("{saved:?}")), None);
    assert_eq!(later.differences_from_record(""), None);
}

#[test]
fn every_field_is_compared_the_clip_included() {
    let a = RunPlan::default();
    let b = RunPlan {
        clip: Some(crate::GradientClip {
            max_norm: 5.0,
            refuse: true,
        }),
        ..a.clone()
    };
    assert_eq!(
        a.differences(&b),
        vec![(
            "max_grad_norm",
            "none".to_string(),
            "5 (refuse)".to_string()
        )]
    );
}

#[test]
fn an_optimizer_reads_as_people_write_its_numbers() {
    assert_eq!(
        OptimizerConfig::adam(1e30).to_string(),
        "adam (lr 1e30, betas 0.9/0.999, eps 1e-8, weight decay 0)"
    );
    let sgd = OptimizerConfig::Sgd {
        lr: 0.05,
        momentum: 0.9,
        weight_decay: 5e-5,
        nesterov: false,
    };
    assert_eq!(
        sgd.to_string(),
        "momentum (lr 0.05, momentum 0.9, weight decay 5e-5)"
    );
}
