//! `ServerCore`'s guards: what a shard refuses or bounds (non-finite and huge gradients,
//! malformed pushes, claimed samples, the norm bound) and the rollback of an update that
//! would make the state non-finite.

use super::tests::{meta, server, SYNC};
use super::*;
use crate::config::{Mode, ServerConfig};
use crate::error::PushError;
use crate::optimizer::OptimizerConfig;
use crate::shard_state::PushOutcome;

#[test]
fn nonfinite_gradients_are_counted_never_applied_and_do_not_stall_sync() {
    let mut s = server(SYNC, 2);
    assert_eq!(
        s.push(meta(0, 0), &[f32::NAN, f32::INFINITY]),
        Err(PushError::NonFinite { count: 2 })
    );
    assert!(matches!(
        s.push(meta(1, 0), &[1.0, 1.0]),
        Ok(PushOutcome::Applied { version: 1, .. })
    ));
    assert_eq!(s.params(), &[-1.0, -1.0]);
    assert_eq!(s.stats().rejected_nonfinite, 1);

    let mut a = server(
        Mode::Async {
            max_staleness: None,
        },
        1,
    );
    assert!(a.push(meta(0, 0), &[1.0, f32::NEG_INFINITY]).is_err());
    assert_eq!(a.params(), &[0.0, 0.0]);
    assert_eq!(a.version(), 0);
}

#[test]
fn bad_pushes_are_refused_without_changing_state() {
    let mut s = server(
        Mode::Async {
            max_staleness: None,
        },
        2,
    );
    assert_eq!(
        s.push(meta(5, 0), &[1.0, 1.0]),
        Err(PushError::UnknownWorker {
            rank: 5,
            workers: 2
        })
    );
    assert_eq!(
        s.push(meta(0, 0), &[1.0]),
        Err(PushError::WrongLength {
            expected: 2,
            got: 1
        })
    );
    assert_eq!(
        s.push(meta(0, 3), &[1.0, 1.0]),
        Err(PushError::FromTheFuture {
            base: 3,
            current: 0
        })
    );
    let empty = PushMeta {
        samples: 0,
        ..meta(0, 0)
    };
    assert_eq!(s.push(empty, &[1.0, 1.0]), Err(PushError::EmptyBatch));
    assert_eq!((s.version(), s.params()), (0, &[0.0f32, 0.0][..]));
    assert_eq!(s.stats().rejected_other, 4);
}

#[test]
fn a_push_cannot_claim_more_samples_than_a_batch() {
    let cfg = ServerConfig {
        mode: Mode::Sync { backup_workers: 0 },
        workers: 2,
        optimizer: OptimizerConfig::sgd(1.0),
        max_samples: Some(64),
        ..Default::default()
    };
    let mut s = ServerCore::new(cfg, vec![0.0; 2]).unwrap();
    let greedy = PushMeta {
        samples: u32::MAX,
        ..meta(0, 0)
    };
    let honest = PushMeta {
        samples: 64,
        ..meta(1, 0)
    };
    s.push(greedy, &[1.0, 1.0]).unwrap();
    s.push(honest, &[0.0, 0.0]).unwrap();
    // Both count 64 samples: the mean is half of the greedy gradient, not all of it.
    assert_eq!(s.params(), &[-0.5, -0.5]);
    assert_eq!(s.stats().samples_applied, 128);
}

#[test]
fn a_huge_finite_gradient_is_refused_and_adam_stays_alive() {
    let cfg = ServerConfig {
        mode: Mode::Async {
            max_staleness: None,
        },
        workers: 1,
        optimizer: OptimizerConfig::adam(0.1),
        ..Default::default()
    };
    let mut s = ServerCore::new(cfg, vec![0.0; 2]).unwrap();
    assert!(matches!(
        s.push(meta(0, 0), &[1e30, 1.0]),
        Err(PushError::TooLarge { .. })
    ));
    assert_eq!((s.version(), s.params()), (0, &[0.0f32, 0.0][..]));
    assert_eq!(s.stats().rejected_nonfinite, 1);
    // Ordinary pushes still move the weights (Adam's moments stayed finite).
    s.push(meta(0, 0), &[1.0, -1.0]).unwrap();
    assert!(s.params()[0] < 0.0 && s.params()[1] > 0.0);
    let saved = s.state();
    assert!(saved
        .optimizer
        .iter()
        .all(|(_, v)| v.iter().all(|x| x.is_finite())));
    // A checkpoint holding non-finite values is refused on restore.
    let mut poisoned = saved.clone();
    poisoned.optimizer[0].1[0] = f32::INFINITY;
    assert!(matches!(
        s.restore(&poisoned),
        Err(RestoreError::NonFinite(_))
    ));
    assert_eq!(s.state(), saved, "a refused restore changes nothing");
}

#[test]
fn gradients_over_the_norm_bound_are_clipped_or_refused_and_counted() {
    let cfg = |refuse| ServerConfig {
        mode: Mode::Async {
            max_staleness: None,
        },
        workers: 1,
        optimizer: OptimizerConfig::sgd(1.0),
        clip: Some(crate::config::GradientClip {
            max_norm: 1.0,
            refuse,
        }),
        ..Default::default()
    };
    let mut clip = ServerCore::new(cfg(false), vec![0.0; 2]).unwrap();
    clip.push(meta(0, 0), &[3.0, 4.0]).unwrap();
    // Norm 5 scaled to 1: (0.6, 0.8).
    assert_eq!(clip.params(), &[-0.6, -0.8]);
    clip.push(meta(0, 1), &[0.3, 0.4]).unwrap();
    let want = [-0.9f32, -1.2];
    assert!(clip
        .params()
        .iter()
        .zip(want)
        .all(|(a, b)| (a - b).abs() < 1e-6));
    assert_eq!(clip.stats().clipped, 1);
    let mut refuse = ServerCore::new(cfg(true), vec![0.0; 2]).unwrap();
    assert!(matches!(
        refuse.push(meta(0, 0), &[3.0, 4.0]),
        Err(PushError::NormTooLarge { .. })
    ));
    assert_eq!((refuse.version(), refuse.stats().rejected_other), (0, 1));
}

#[test]
fn an_update_that_would_make_the_state_non_finite_is_rolled_back() {
    // A rate so large that a bounded gradient still overflows the weights.
    let cfg = |mode| ServerConfig {
        mode,
        workers: 1,
        optimizer: OptimizerConfig::momentum(3e38, 0.5),
        ..Default::default()
    };
    for mode in [
        Mode::Async {
            max_staleness: None,
        },
        Mode::Sync { backup_workers: 0 },
        Mode::Ssp { max_lead: 2 },
        Mode::Buffered {
            k: 1,
            max_staleness: None,
        },
    ] {
        let mut s = ServerCore::new(cfg(mode), vec![1.0, 2.0]).unwrap();
        let before = s.state();
        let out = s.push(meta(0, 0), &[1e15, 0.0]);
        assert_eq!(s.params(), &[1.0, 2.0], "{mode:?}: weights unchanged");
        assert_eq!(
            s.state().optimizer,
            before.optimizer,
            "{mode:?}: state unchanged"
        );
        assert_eq!(s.stats().rolled_back, 1, "{mode:?}");
        match mode {
            Mode::Async { .. } => assert_eq!(out, Err(PushError::NonFiniteResult)),
            // The step ends (nobody waits) without moving the weights.
            Mode::Sync { .. } | Mode::Ssp { .. } | Mode::Buffered { .. } => {
                assert!(matches!(out, Ok(PushOutcome::Applied { .. })))
            }
        }
        assert!(s.params().iter().all(|p| p.is_finite()));
    }
}

/// Every rule whose steps wait on ranks hears of a gradient the gate refused (for any value
/// check: empty, non-finite, too large, over a refusing norm bound), so the step completes
/// with the others' gradients; none of those values reach the weights.
#[test]
fn a_gradient_refused_at_the_gate_never_stalls_a_step_in_any_mode() {
    let modes = [
        Mode::Sync { backup_workers: 0 },
        Mode::Ssp { max_lead: 0 },
        Mode::Ssp { max_lead: 2 },
        Mode::Async {
            max_staleness: None,
        },
    ];
    let bad: [(&str, u32, [f32; 2]); 4] = [
        ("empty batch", 0, [1.0, 1.0]),
        ("NaN", 1, [f32::NAN, 1.0]),
        ("too large", 1, [1e16, 1.0]),
        ("norm over the bound", 1, [30.0, 40.0]),
    ];
    for mode in modes {
        for (what, samples, values) in bad {
            let cfg = ServerConfig {
                mode,
                workers: 2,
                optimizer: OptimizerConfig::sgd(1.0),
                clip: Some(crate::config::GradientClip {
                    max_norm: 10.0,
                    refuse: true,
                }),
                ..Default::default()
            };
            let mut s = ServerCore::new(cfg, vec![0.0; 2]).unwrap();
            let refused = PushMeta {
                samples,
                ..meta(0, 0)
            };
            assert!(s.push(refused, &values).is_err(), "{mode:?} {what}");
            let out = s.push(meta(1, 0), &[2.0, 2.0]);
            assert!(
                matches!(out, Ok(PushOutcome::Applied { version: 1, .. })),
                "{mode:?} {what}: the good gradient completes the step, got {out:?}"
            );
            assert_eq!(s.params(), &[-2.0, -2.0], "{mode:?} {what}");
        }
    }
}
