//! The portable kernels, the paths a machine without AVX-512 takes (every ARM board, older
//! x86), run on this machine by switching the fast paths off (`fast_paths::force_portable`):
//! against the JAX reference, and against the fast paths on the same input. The switch is
//! process-wide, so everything that flips it is one test.

mod common;

use pstrain_compute::ModelKind;
use pstrain_core::fast_paths;

/// Largest difference between two gradients, relative to the larger's largest magnitude.
fn relative_gap(a: &[f32], b: &[f32]) -> f64 {
    let scale = a
        .iter()
        .chain(b)
        .map(|v| f64::from(v.abs()))
        .fold(0.0, f64::max)
        .max(1e-30);
    let gap = a
        .iter()
        .zip(b)
        .map(|(x, y)| (f64::from(*x) - f64::from(*y)).abs())
        .fold(0.0, f64::max);
    gap / scale
}

#[test]
fn portable_paths_match_the_reference_and_the_fast_paths() {
    // A batch of 64 as training has it, labels in every class.
    let labels: Vec<u8> = (0..64u8).map(|i| i % 10).collect();
    let images = common::images_for(labels.len());
    for kind in ModelKind::ALL {
        for threads in [1, 2] {
            fast_paths::force_portable(false);
            let (_, fast_loss, fast) = common::gradient(kind, threads, &images, &labels);
            fast_paths::force_portable(true);
            assert!(!fast_paths::enabled());
            common::check(kind, threads);
            let (_, loss, portable) = common::gradient(kind, threads, &images, &labels);
            assert!(
                (loss - fast_loss).abs() <= 1e-6 * fast_loss.abs().max(1.0),
                "{kind}, {threads} threads: loss {loss} portable vs {fast_loss} fast"
            );
            // The GEMM and the dot-product kernel sum in different orders: close, not equal.
            let gap = relative_gap(&fast, &portable);
            assert!(
                gap < 1e-4,
                "{kind}, {threads} threads: gradients differ by {gap:e} of their scale"
            );
        }
    }
    // On the portable path too, the thread count moves a gradient by rounding only (the
    // parts' sums are added in another order: within 1e-5 of its scale, as `replicated`
    // promises).
    for kind in ModelKind::ALL {
        let (_, _, one) = common::gradient(kind, 1, &images, &labels);
        for threads in [2, 3] {
            let (_, _, more) = common::gradient(kind, threads, &images, &labels);
            let gap = relative_gap(&one, &more);
            assert!(
                gap <= 1e-5,
                "{kind}: portable, 1 vs {threads} threads: {gap:e}"
            );
        }
    }
    fast_paths::force_portable(false);
}
