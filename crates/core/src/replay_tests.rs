use super::*;
use crate::optimizer::OptimizerConfig;

fn adam_after(updates: usize, sparse_from: usize) -> (Optimizer, Vec<f32>) {
    let mut opt = Optimizer::new(OptimizerConfig::adam(0.01), 5);
    let mut w = vec![0.5f32; 5];
    for u in 0..updates {
        let g = [
            u as f32,
            -1.0,
            0.0,
            0.25,
            if u % 3 == 0 { 2.0 } else { 0.0 },
        ];
        let grad = ScaledGrad {
            values: &g,
            scale: 0.5,
            accumulated: u >= sparse_from,
            source: Source::Unknown,
        };
        assert!(opt.apply_scaled(&mut w, grad, 1.0));
    }
    (opt, w)
}

/// The whole form carries every bit of the optimizer's state: an optimizer read from it
/// makes the next update's bits, with and without the arrivals of sparse sums.
#[test]
fn optimizer_state_round_trips_through_the_whole_form() {
    for (updates, sparse_from) in [(7, 0), (7, 4), (7, 100), (0, 100)] {
        let (mut opt, mut w) = adam_after(updates, sparse_from);
        let mut out = Vec::new();
        opt.write_state(&mut out);
        assert!(out.len() <= Optimizer::max_state_len(5));
        if updates == 0 {
            assert_eq!(out.len(), 17, "a fresh optimizer's moments are not sent");
        }
        // Read into an optimizer with a history of its own: all of it is replaced.
        let (mut copy, _) = adam_after(3, 0);
        copy.read_state(&out).expect("its own state");
        assert_eq!(copy.step(), opt.step());
        let mut w2 = w.clone();
        let g = [1.0, 0.0, 3.0, 0.0, 1.0];
        let grad = ScaledGrad {
            values: &g,
            scale: 1.0,
            accumulated: sparse_from < updates,
            source: Source::Unknown,
        };
        assert!(opt.apply_scaled(&mut w, grad, 1.0));
        assert!(copy.apply_scaled(&mut w2, grad, 1.0));
        assert_eq!(w, w2, "{updates} updates, sparse from {sparse_from}");
    }
}

/// A state of another length, with a moment that is not finite, or with an arrival after
/// its step is refused and changes nothing.
#[test]
fn a_damaged_optimizer_state_is_refused() {
    let (opt, _) = adam_after(3, 0);
    let mut good = Vec::new();
    opt.write_state(&mut good);
    let mut target = Optimizer::new(OptimizerConfig::adam(0.01), 5);
    let before = target
        .state()
        .iter()
        .map(|(_, v)| v.to_vec())
        .collect::<Vec<_>>();
    let mut nan = good.clone();
    nan[17..21].copy_from_slice(&f32::NAN.to_le_bytes());
    let mut late = good.clone();
    let at = good.len() - 4;
    late[at..].copy_from_slice(&1000u32.to_le_bytes());
    for bad in [&good[..good.len() - 1], &nan[..], &late[..], &good[..10]] {
        assert!(target.read_state(bad).is_err());
        let after = target
            .state()
            .iter()
            .map(|(_, v)| v.to_vec())
            .collect::<Vec<_>>();
        assert_eq!(after, before);
        assert_eq!(target.step(), 0);
    }
    let mut sgd = Optimizer::new(OptimizerConfig::sgd(0.1), 5);
    assert!(sgd.read_state(&good).is_err(), "plain SGD keeps no moments");
}
