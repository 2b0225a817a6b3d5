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
