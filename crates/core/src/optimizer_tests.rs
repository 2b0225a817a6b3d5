//! The optimizers against hand computation and PyTorch's formulas, restores, and Adam counting the gaps of top-k's sums (from the last dense update or restore).

use super::*;

fn close(a: f32, b: f32) -> bool {
    (a - b).abs() <= 1e-6 * (1.0 + b.abs())
}

#[test]
fn plain_sgd_steps_against_the_gradient() {
    let mut opt = Optimizer::new(OptimizerConfig::sgd(0.1), 2);
    let mut p = vec![1.0, -2.0];
    assert!(opt.apply(&mut p, &[0.5, -1.0]));
    assert_eq!(p, [0.95, -1.9]);
    assert!(opt.state().is_empty());
}

#[test]
fn momentum_matches_hand_computation() {
    // buf1 = g1 = 1; p = 1 - 0.1 = 0.9. buf2 = 0.9 * 1 + 2 = 2.9; p = 0.9 - 0.29 = 0.61.
    let mut opt = Optimizer::new(OptimizerConfig::momentum(0.1, 0.9), 1);
    let mut p = vec![1.0];
    assert!(opt.apply(&mut p, &[1.0]));
    assert!(close(p[0], 0.9));
    assert!(opt.apply(&mut p, &[2.0]));
    assert!(close(p[0], 0.61), "{}", p[0]);
    assert_eq!(opt.state()[0].1, &[2.9]);
}

#[test]
fn weight_decay_adds_l2_gradient() {
    let cfg = OptimizerConfig::Sgd {
        lr: 0.5,
        momentum: 0.0,
        weight_decay: 0.1,
        nesterov: false,
    };
    let mut opt = Optimizer::new(cfg, 1);
    let mut p = vec![2.0];
    assert!(opt.apply(&mut p, &[0.0]));
    assert!(close(p[0], 2.0 - 0.5 * 0.2));
}

#[test]
fn adam_first_step_moves_by_lr_times_sign() {
    let mut opt = Optimizer::new(OptimizerConfig::adam(0.01), 3);
    let mut p = vec![0.0, 1.0, 5.0];
    assert!(opt.apply(&mut p, &[3.0, -0.2, 1e-3]));
    // After bias correction m_hat / sqrt(v_hat) = sign(g) (up to eps).
    assert!(close(p[0], -0.01));
    assert!(close(p[1], 1.01));
    assert!((p[2] - 4.99).abs() < 1e-4);
    assert_eq!(opt.step(), 1);
}

#[test]
fn adam_second_step_matches_reference_formula() {
    let (b1, b2, lr, eps) = (0.9f64, 0.999f64, 0.001f64, 1e-8f64);
    let grads = [0.3f64, -0.7];
    let (mut m, mut v, mut p) = (0.0f64, 0.0f64, 0.5f64);
    for (t, g) in grads.iter().enumerate() {
        let t = (t + 1) as i32;
        m = b1 * m + (1.0 - b1) * g;
        v = b2 * v + (1.0 - b2) * g * g;
        p -= lr * (m / (1.0 - b1.powi(t))) / ((v / (1.0 - b2.powi(t))).sqrt() + eps);
    }
    let mut opt = Optimizer::new(OptimizerConfig::adam(0.001), 1);
    let mut q = vec![0.5f32];
    for g in grads {
        assert!(opt.apply(&mut q, &[g as f32]));
    }
    assert!((f64::from(q[0]) - p).abs() < 1e-6, "{} vs {p}", q[0]);
}

#[test]
fn an_update_that_overflows_changes_nothing() {
    let mut opt = Optimizer::new(OptimizerConfig::momentum(3e38, 0.5), 2);
    let mut p = vec![1.0, 2.0];
    assert!(!opt.apply(&mut p, &[1e15, 0.0]));
    assert_eq!(p, [1.0, 2.0]);
    assert_eq!(opt.step(), 0);
    assert_eq!(opt.state()[0].1, &[0.0, 0.0]);
}

#[test]
fn restored_state_continues_identically() {
    let grads = [[0.3f32, -0.2], [0.1, 0.4], [-0.5, 0.2], [0.05, 0.05]];
    let mut a = Optimizer::new(OptimizerConfig::adam(0.01), 2);
    let mut pa = vec![1.0f32, 2.0];
    for g in &grads[..2] {
        assert!(a.apply(&mut pa, g));
    }
    let saved: Vec<(String, Vec<f32>)> = a
        .state()
        .iter()
        .map(|(n, v)| (n.to_string(), v.to_vec()))
        .collect();
    let mut b = Optimizer::new(OptimizerConfig::adam(0.01), 2);
    b.restore(&saved, a.step()).unwrap();
    let mut pb = pa.clone();
    for g in &grads[2..] {
        assert!(a.apply(&mut pa, g));
        assert!(b.apply(&mut pb, g));
    }
    assert_eq!(pa, pb);
    let mut c = Optimizer::new(OptimizerConfig::momentum(0.1, 0.9), 2);
    assert!(matches!(
        c.restore(&saved, 2),
        Err(RestoreError::Unexpected(_))
    ));
    let mut d = Optimizer::new(OptimizerConfig::adam(0.01), 3);
    assert!(matches!(
        d.restore(&saved, 2),
        Err(RestoreError::Length { .. })
    ));
}

fn sparse(values: &[f32]) -> ScaledGrad<'_> {
    ScaledGrad {
        values,
        scale: 1.0,
        accumulated: true,
        source: Default::default(),
    }
}

/// How far 400 updates move a weight whose gradient is a constant 1: sent every update,
/// or every tenth as the sum of ten (a top-k worker's error feedback), counted or not as
/// a sum. Adam moves a value sent every `gap` updates about `1 / sqrt(gap)` as far unless
/// its square is divided by the gap.
fn distance(every: usize, accumulated: bool) -> f32 {
    let mut opt = Optimizer::new(OptimizerConfig::adam(0.001), 1);
    let mut p = vec![0.0f32];
    for update in 1..=400 {
        let g = [if update % every == 0 {
            every as f32
        } else {
            0.0
        }];
        let grad = ScaledGrad {
            accumulated,
            ..sparse(&g)
        };
        assert!(opt.apply_scaled(&mut p, grad, 1.0));
    }
    -p[0]
}

#[test]
fn adam_counts_the_gap_of_a_value_sent_as_a_sum() {
    let dense = distance(1, false);
    let summed = distance(10, false);
    let counted = distance(10, true);
    assert!((summed / dense) < 0.4, "{summed} / {dense}");
    assert!((counted / dense - 1.0).abs() < 0.05, "{counted} / {dense}");
}

/// A dense update is an arrival of every value: a gap counts from it at most; and a
/// restore counts gaps from its step.
#[test]
fn gaps_count_from_the_last_dense_update_or_restore() {
    let second_moment = |opt: &Optimizer| opt.state()[1].1[0];
    let run = |dense_at: Option<usize>| {
        let mut opt = Optimizer::new(OptimizerConfig::adam(0.001), 1);
        let mut p = vec![0.0f32];
        for update in 1..10 {
            let grad = ScaledGrad {
                accumulated: Some(update) != dense_at,
                ..sparse(&[0.0])
            };
            assert!(opt.apply_scaled(&mut p, grad, 1.0));
        }
        // Update 10 brings a sum of 4.
        assert!(opt.apply_scaled(&mut p, sparse(&[4.0]), 1.0));
        opt
    };
    let v_of_sum = |gap: f32| 0.001 * 16.0 / gap;
    // Within f32's rounding of `1 - beta2`.
    let near = |v: f32, gap: f32| (v / v_of_sum(gap) - 1.0).abs() < 1e-4;
    // Nothing dense before: the gap is 10 updates.
    let from_start = run(None);
    assert!(near(second_moment(&from_start), 10.0));
    // Dense at update 6 (a gradient of 0 there: nothing else in the moment): gap 4.
    let after_dense = run(Some(6));
    assert!(near(second_moment(&after_dense), 4.0));
    // Restored at step 8: the next sum (update 9's, of 4) counts a gap of 1.
    let saved: Vec<(String, Vec<f32>)> = vec![
        ("exp_avg".into(), vec![0.0]),
        ("exp_avg_sq".into(), vec![0.0]),
    ];
    let mut restored = Optimizer::new(OptimizerConfig::adam(0.001), 1);
    restored.restore(&saved, 8).unwrap();
    assert!(restored.apply_scaled(&mut vec![0.0], sparse(&[4.0]), 1.0));
    assert!(near(second_moment(&restored), 1.0));
}

/// SGD and momentum take sparse sums as they are (their updates are linear in the sum).
#[test]
fn sgd_ignores_the_kind_of_push() {
    for config in [
        OptimizerConfig::sgd(0.1),
        OptimizerConfig::momentum(0.1, 0.9),
    ] {
        let (mut a, mut b) = (Optimizer::new(config, 2), Optimizer::new(config, 2));
        let (mut pa, mut pb) = (vec![1.0, 2.0], vec![1.0, 2.0]);
        for g in [[0.0, 3.0], [1.5, 0.0]] {
            assert!(a.apply_scaled(&mut pa, sparse(&g), 1.0));
            assert!(b.apply(&mut pb, &g));
        }
        assert_eq!(pa, pb);
    }
}
