//! `ServerCore` under each rule: sync barriers and backups, async staleness, the update
//! budget, state round trips, configuration checks, the staleness-aware rate. Its guards are
//! in `server_guard_tests.rs`.

use super::*;
use crate::config::{Aggregate, Mode};
use crate::optimizer::OptimizerConfig;

pub(super) fn meta(rank: usize, base_version: u64) -> PushMeta {
    PushMeta {
        rank,
        base_version,
        samples: 1,
        loss: 1.0,
        accumulated: false,
    }
}

pub(super) fn server(mode: Mode, workers: usize) -> ServerCore {
    let cfg = ServerConfig {
        mode,
        workers,
        optimizer: OptimizerConfig::sgd(1.0),
        ..Default::default()
    };
    ServerCore::new(cfg, vec![0.0; 2]).unwrap()
}

pub(super) const SYNC: Mode = Mode::Sync { backup_workers: 0 };

#[test]
fn a_completed_step_remembers_its_members() {
    let mut s = server(Mode::Sync { backup_workers: 1 }, 3);
    s.push(meta(2, 0), &[1.0, 1.0]).unwrap();
    assert_eq!(s.members_of(0), None, "step 0 is still open");
    s.push(meta(0, 0), &[1.0, 1.0]).unwrap();
    assert_eq!(s.members_of(0), Some(&[true, false, true][..]));
    // The straggler's gradient is dropped, and step 1 starts empty.
    assert!(matches!(
        s.push(meta(1, 0), &[1.0, 1.0]),
        Ok(PushOutcome::Dropped { .. })
    ));
    s.push(meta(1, 1), &[1.0, 1.0]).unwrap();
    s.push(meta(0, 1), &[1.0, 1.0]).unwrap();
    assert_eq!(s.members_of(1), Some(&[true, true, false][..]));
    assert_eq!(s.members_of(0), Some(&[true, false, true][..]));
}

#[test]
fn sync_waits_for_every_worker_then_applies_the_sample_weighted_mean() {
    let mut s = server(SYNC, 2);
    let m0 = PushMeta {
        samples: 1,
        ..meta(0, 0)
    };
    let m1 = PushMeta {
        samples: 3,
        ..meta(1, 0)
    };
    assert_eq!(
        s.push(m0, &[4.0, 0.0]),
        Ok(PushOutcome::Buffered { waiting_for: 1 })
    );
    assert_eq!(s.version(), 0);
    assert_eq!(s.params(), &[0.0, 0.0]);
    assert_eq!(
        s.push(m1, &[0.0, 4.0]),
        Ok(PushOutcome::Applied {
            version: 1,
            staleness: 0
        })
    );
    // mean = (1*[4,0] + 3*[0,4]) / 4 = [1, 3]; lr 1.
    assert_eq!(s.params(), &[-1.0, -3.0]);
}

#[test]
fn sync_sum_adds_the_workers_gradients() {
    let cfg = ServerConfig {
        mode: SYNC,
        workers: 2,
        optimizer: OptimizerConfig::sgd(1.0),
        aggregate: Aggregate::Sum,
        ..Default::default()
    };
    let mut s = ServerCore::new(cfg, vec![0.0; 2]).unwrap();
    let m1 = PushMeta {
        samples: 3,
        ..meta(1, 0)
    };
    s.push(meta(0, 0), &[4.0, 0.0]).unwrap();
    s.push(m1, &[0.0, 4.0]).unwrap();
    assert_eq!(s.params(), &[-4.0, -4.0]);
}

#[test]
fn sync_refuses_duplicates_and_counts_late_gradients_toward_the_current_step() {
    let mut s = server(SYNC, 2);
    s.push(meta(0, 0), &[1.0, 1.0]).unwrap();
    assert_eq!(
        s.push(meta(0, 0), &[1.0, 1.0]),
        Err(PushError::DuplicatePush {
            rank: 0,
            version: 0
        })
    );
    s.push(meta(1, 0), &[1.0, 1.0]).unwrap();
    // Rank 1 pushes again from version 0 (say it rejoined and pulled before the step ended):
    // without backup workers it is part of step 1, not dropped.
    assert_eq!(
        s.push(meta(1, 0), &[3.0, 3.0]),
        Ok(PushOutcome::Buffered { waiting_for: 1 })
    );
    assert!(matches!(
        s.push(meta(0, 1), &[1.0, 1.0]),
        Ok(PushOutcome::Applied { version: 2, .. })
    ));
    assert_eq!(s.params(), &[-3.0, -3.0]);
    assert_eq!(s.stats().dropped_stale, 0);
    assert_eq!(s.stats().staleness_max, 1);
}

#[test]
fn sync_backup_workers_complete_a_step_without_the_slowest() {
    let mut s = server(Mode::Sync { backup_workers: 1 }, 3);
    s.push(meta(2, 0), &[1.0, 1.0]).unwrap();
    assert!(matches!(
        s.push(meta(0, 0), &[1.0, 1.0]),
        Ok(PushOutcome::Applied { version: 1, .. })
    ));
    assert_eq!(
        s.push(meta(1, 0), &[9.0, 9.0]),
        Ok(PushOutcome::Dropped { staleness: 1 })
    );
    assert_eq!(s.params(), &[-1.0, -1.0]);
}

#[test]
fn a_leaving_worker_releases_the_barrier() {
    let mut s = server(SYNC, 2);
    s.push(meta(0, 0), &[2.0, 2.0]).unwrap();
    assert_eq!(s.leave(1), Some(1));
    assert_eq!(s.params(), &[-2.0, -2.0]);
    // The remaining worker now steps alone.
    assert!(matches!(
        s.push(meta(0, 1), &[1.0, 1.0]),
        Ok(PushOutcome::Applied { version: 2, .. })
    ));
    assert_eq!(
        s.push(meta(1, 2), &[1.0, 1.0]),
        Err(PushError::NotInQuorum { rank: 1 })
    );
    s.rejoin(1);
    assert!(matches!(
        s.push(meta(1, 2), &[1.0, 1.0]),
        Ok(PushOutcome::Buffered { .. })
    ));
}

#[test]
fn a_gradient_pushed_before_a_reconnect_is_not_counted_twice() {
    // Rank 0's gradient is in step 0 when its connection fails; it comes back, pulls the
    // same version and pushes again: the step waits for it, and takes its first gradient.
    let mut s = server(SYNC, 2);
    s.push(meta(0, 0), &[2.0, 2.0]).unwrap();
    assert_eq!(s.leave(0), None);
    s.rejoin(0);
    assert_eq!(
        s.push(meta(0, 0), &[8.0, 8.0]),
        Ok(PushOutcome::Buffered { waiting_for: 1 })
    );
    assert_eq!(s.stats().gradients_applied, 1);
    assert!(matches!(
        s.push(meta(1, 0), &[4.0, 4.0]),
        Ok(PushOutcome::Applied { version: 1, .. })
    ));
    // The mean of 2 and 4, not of 2, 8 and 4.
    assert_eq!(s.params(), &[-3.0, -3.0]);
    // Within one connection a second push is still refused.
    s.push(meta(0, 1), &[1.0, 1.0]).unwrap();
    assert!(matches!(
        s.push(meta(0, 1), &[1.0, 1.0]),
        Err(PushError::DuplicatePush { .. })
    ));
}

#[test]
fn an_ssp_worker_that_reconnects_starts_at_the_next_step() {
    let mut s = server(Mode::Ssp { max_lead: 2 }, 2);
    // Rank 0 runs two steps ahead, then its connection fails.
    s.push(meta(0, 0), &[1.0, 1.0]).unwrap();
    s.push(meta(0, 0), &[1.0, 1.0]).unwrap();
    assert_eq!(s.leave(0), None);
    s.rejoin(0);
    // It is one step ahead, not two: the gate lets it through at once.
    assert!(s.pull_ready(Some(0), Some(0)));
    // Its next push falls on step 1, which holds its earlier gradient: dropped, never added
    // a second time. The one after is its first for step 2.
    assert_eq!(
        s.push(meta(0, 0), &[5.0, 5.0]),
        Ok(PushOutcome::Dropped { staleness: 1 })
    );
    assert!(matches!(
        s.push(meta(0, 0), &[1.0, 1.0]),
        Ok(PushOutcome::Buffered { .. })
    ));
    assert!(!s.pull_ready(Some(0), Some(0)), "as far ahead as it may be");
    // Step 0 does not wait for the rejoined rank: rank 1 completes it, with rank 0's first
    // gradient in it; step 1 waits for rank 1 again.
    assert!(matches!(
        s.push(meta(1, 0), &[3.0, 3.0]),
        Ok(PushOutcome::Applied { version: 1, .. })
    ));
    assert_eq!(s.params(), &[-2.0, -2.0]);
    assert_eq!(s.version(), 1);
}

#[test]
fn a_worker_that_joins_during_a_sync_step_is_waited_for_from_the_next() {
    let mut s = server(SYNC, 3);
    s.push(meta(0, 0), &[1.0, 1.0]).unwrap();
    assert_eq!(s.leave(2), None);
    s.rejoin(2);
    // Step 0 waits for ranks 0 and 1 only; rank 2's gradient counts if it comes in time.
    assert_eq!(
        s.push(meta(2, 0), &[4.0, 4.0]),
        Ok(PushOutcome::Buffered { waiting_for: 1 })
    );
    assert!(
        !s.pull_ready(Some(2), Some(0)),
        "it waits for the step it pushed to"
    );
    assert!(matches!(
        s.push(meta(1, 0), &[1.0, 1.0]),
        Ok(PushOutcome::Applied { version: 1, .. })
    ));
    assert_eq!(s.params(), &[-2.0, -2.0]);
    // From step 1 on it is waited for like the others.
    s.push(meta(0, 1), &[1.0, 1.0]).unwrap();
    assert_eq!(
        s.push(meta(1, 1), &[1.0, 1.0]),
        Ok(PushOutcome::Buffered { waiting_for: 1 })
    );
}

#[test]
fn async_applies_on_arrival_and_records_staleness() {
    let mut s = server(
        Mode::Async {
            max_staleness: Some(1),
        },
        2,
    );
    assert_eq!(
        s.push(meta(0, 0), &[1.0, 0.0]),
        Ok(PushOutcome::Applied {
            version: 1,
            staleness: 0
        })
    );
    assert_eq!(
        s.push(meta(1, 0), &[1.0, 0.0]),
        Ok(PushOutcome::Applied {
            version: 2,
            staleness: 1
        })
    );
    assert_eq!(
        s.push(meta(1, 0), &[1.0, 0.0]),
        Ok(PushOutcome::Dropped { staleness: 2 })
    );
    let st = s.stats();
    assert_eq!((st.gradients_applied, st.staleness_max), (2, 1));
    assert_eq!(st.staleness_mean(), 0.5);
    assert_eq!(s.params(), &[-2.0, 0.0]);
}

#[test]
fn stops_at_the_update_budget() {
    let cfg = ServerConfig {
        mode: Mode::Async {
            max_staleness: None,
        },
        workers: 1,
        optimizer: OptimizerConfig::sgd(1.0),
        max_updates: Some(2),
        ..Default::default()
    };
    let mut s = ServerCore::new(cfg, vec![0.0]).unwrap();
    s.push(meta(0, 0), &[1.0]).unwrap();
    s.push(meta(0, 1), &[1.0]).unwrap();
    assert!(s.is_done());
    assert_eq!(s.push(meta(0, 2), &[1.0]), Ok(PushOutcome::Done));
    assert_eq!(s.params(), &[-2.0]);
}

#[test]
fn state_round_trips_into_a_fresh_core() {
    let cfg = ServerConfig {
        mode: Mode::Async {
            max_staleness: None,
        },
        workers: 1,
        optimizer: OptimizerConfig::adam(0.1),
        ..Default::default()
    };
    let mut a = ServerCore::new(cfg.clone(), vec![0.0; 2]).unwrap();
    a.push(meta(0, 0), &[1.0, -1.0]).unwrap();
    let saved = a.state();
    let mut b = ServerCore::new(cfg.clone(), vec![9.0; 2]).unwrap();
    b.restore(&saved).unwrap();
    assert_eq!(b.state(), saved);
    a.push(meta(0, 1), &[0.5, 0.5]).unwrap();
    b.push(meta(0, 1), &[0.5, 0.5]).unwrap();
    assert_eq!(a.params(), b.params());
    let mut small = ServerCore::new(cfg, vec![0.0; 3]).unwrap();
    assert!(small.restore(&saved).is_err());
}

#[test]
fn config_validation() {
    let bad = ServerConfig {
        mode: Mode::Sync { backup_workers: 2 },
        workers: 2,
        ..Default::default()
    };
    assert!(bad.validate().is_err());
    assert!(ServerConfig {
        workers: 0,
        ..Default::default()
    }
    .validate()
    .is_err());
    assert!(ServerConfig::default().validate().is_ok());
    let refused = |mode, staleness_aware_lr, balance_batches| {
        ServerConfig {
            mode,
            staleness_aware_lr,
            balance_batches,
            ..Default::default()
        }
        .validate()
        .is_err()
    };
    let sync = Mode::Sync { backup_workers: 0 };
    let ssp = |max_lead| Mode::Ssp { max_lead };
    assert!(refused(ssp(65), false, false), "max lead is bounded");
    assert!(!refused(ssp(64), true, false));
    assert!(
        refused(sync, true, false),
        "no staleness-aware rate in sync"
    );
    assert!(
        refused(ssp(1), false, true),
        "balanced batches are for sync"
    );
    assert!(!refused(sync, false, true));
}

#[test]
fn staleness_aware_rate_is_lr_over_staleness() {
    // SGD with lr 0.5 and a gradient of 1: the step is lr / max(staleness, 1).
    let cfg = ServerConfig {
        mode: Mode::Async {
            max_staleness: None,
        },
        workers: 2,
        optimizer: OptimizerConfig::sgd(0.5),
        staleness_aware_lr: true,
        ..Default::default()
    };
    let mut s = ServerCore::new(cfg.clone(), vec![0.0]).unwrap();
    let mut expected = 0.0f32;
    for (base, staleness) in [(0, 0u64), (1, 0), (1, 1), (1, 2), (2, 2), (0, 5)] {
        let out = s.push(meta(0, base), &[1.0]).unwrap();
        assert_eq!(
            out,
            PushOutcome::Applied {
                version: s.version(),
                staleness
            }
        );
        expected -= 0.5 / staleness.max(1) as f32;
        assert_eq!(s.params(), &[expected], "staleness {staleness}");
    }
    // SSP: a step's rate is divided by its gradients' mean staleness.
    let cfg = ServerConfig {
        mode: Mode::Ssp { max_lead: 4 },
        ..cfg
    };
    let mut s = ServerCore::new(cfg, vec![0.0]).unwrap();
    for step in 0..3 {
        s.push(meta(0, 0), &[1.0]).unwrap();
        if step < 2 {
            s.push(meta(1, step), &[1.0]).unwrap();
        }
    }
    assert_eq!(
        s.params(),
        &[-1.0],
        "steps 0 and 1: mean staleness <= 1, full rate"
    );
    // Step 2: rank 0 from version 0 (staleness 2), rank 1 from version 0 (staleness 2).
    s.push(meta(1, 0), &[1.0]).unwrap();
    assert_eq!(s.params(), &[-1.25]);
}
