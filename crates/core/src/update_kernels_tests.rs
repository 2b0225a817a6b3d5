//! Every kernel's fast and portable builds give the same bits; a scale in the loop equals one applied first; `adam_gaps`'s division by a value's gap.

use super::*;

fn values(n: usize, seed: f32) -> Vec<f32> {
    (0..n)
        .map(|i| ((i as f32 + 1.0) * seed).sin() * 3.0)
        .collect()
}

fn bits(v: &[f32]) -> Vec<u32> {
    v.iter().map(|x| x.to_bits()).collect()
}

type Grad<'a> = (&'a [f32], f32);
type Sgd = fn(&[f32], Grad<'_>, &mut [f32], f32, f32) -> bool;
type Momentum = fn(&[f32], Grad<'_>, (&[f32], &mut [f32]), &mut [f32], f32, f32, f32, bool) -> bool;
type Adam =
    fn(&[f32], Grad<'_>, (&[f32], &[f32]), (&mut [f32], &mut [f32], &mut [f32]), AdamStep) -> bool;
type AdamGaps = fn(
    &[f32],
    Grad<'_>,
    (&[f32], &[f32]),
    Arrivals<'_>,
    (&mut [f32], &mut [f32], &mut [f32]),
    (AdamStep, Gaps),
) -> bool;
/// One build of every kernel.
type Kernels = (Sgd, Momentum, Adam, AdamGaps);

/// Parameters, gradient, first moment (or momentum buffer) and second moment, of `n`.
fn inputs(n: usize) -> [Vec<f32>; 4] {
    let v = values(n, 0.05).iter().map(|x| x * x).collect();
    [values(n, 0.37), values(n, 0.11), values(n, 0.23), v]
}

const ADAM: AdamStep = AdamStep {
    beta1: 0.9,
    beta2: 0.999,
    eps: 1e-8,
    weight_decay: 0.01,
    step_size: 1e-3,
    bias2_sqrt: 0.03,
};

/// The bits every kernel of `kernels` writes for `grad` on `inputs`.
fn outputs(kernels: Kernels, [p, _, b, v]: &[Vec<f32>; 4], grad: Grad<'_>) -> Vec<u32> {
    let n = p.len();
    let (mut out, mut buf, mut m2, mut v2) =
        (vec![0.0; n], vec![0.0; n], vec![0.0; n], vec![0.0; n]);
    let mut all = Vec::new();
    assert!((kernels.0)(p, grad, &mut out, 0.1, 0.01));
    all.extend(bits(&out));
    let momentum = (&b[..], &mut buf[..]);
    assert!((kernels.1)(
        p, grad, momentum, &mut out, 0.1, 0.9, 0.01, true
    ));
    all.extend(bits(&out).into_iter().chain(bits(&buf)));
    let outs = (&mut out[..], &mut m2[..], &mut v2[..]);
    assert!((kernels.2)(p, grad, (b, v), outs, ADAM));
    all.extend(bits(&out).into_iter().chain(bits(&m2)).chain(bits(&v2)));
    // Sparse sums: every third value did not arrive; the others arrived after gaps of
    // 1 to past the longest counted.
    let sparse: Vec<f32> = (grad.0.iter().enumerate())
        .map(|(i, &g)| if i % 3 == 0 { 0.0 } else { g })
        .collect();
    let last: Vec<u32> = (0..n as u32).map(|i| 90 - (i * 7) % 60).collect();
    let mut arrived = vec![0; n];
    let outs = (&mut out[..], &mut m2[..], &mut v2[..]);
    let history = (&last[..], &mut arrived[..]);
    let gaps = Gaps {
        now: 100,
        longest: 40,
    };
    let moments = (&b[..], &v[..]);
    assert!((kernels.3)(
        p,
        (&sparse, grad.1),
        moments,
        history,
        outs,
        (ADAM, gaps)
    ));
    all.extend(bits(&out).into_iter().chain(bits(&m2)).chain(bits(&v2)));
    all.extend(arrived);
    all
}

/// A value that did not arrive in a push of sparse sums updates to plain Adam's bits
/// with a zero gradient and keeps its arrival; one that arrived enters the second moment
/// divided by its gap (at most the longest) and is marked as arrived now.
#[test]
fn adam_gaps_divides_an_arrivals_square_by_its_gap() {
    let (p, m, v) = ([0.5f32; 4], [0.1f32; 4], [0.04f32; 4]);
    let grad = [0.0f32, 2.0, 2.0, 2.0];
    let last = [7u32, 99, 90, 3];
    let mut arrived = [0u32; 4];
    let (mut out, mut m2, mut v2) = ([0.0f32; 4], [0.0f32; 4], [0.0f32; 4]);
    let history = (&last[..], &mut arrived[..]);
    let gaps = Gaps {
        now: 100,
        longest: 40,
    };
    let c = AdamStep {
        weight_decay: 0.0,
        ..ADAM
    };
    assert!(adam_gaps(
        &p,
        (&grad, 1.0),
        (&m, &v),
        history,
        (&mut out, &mut m2, &mut v2),
        (c, gaps)
    ));
    assert_eq!(arrived, [7, 100, 100, 100]);
    let (mut plain_out, mut plain_m2, mut plain_v2) = ([0.0f32; 1], [0.0f32; 1], [0.0f32; 1]);
    let plain = (&mut plain_out[..], &mut plain_m2[..], &mut plain_v2[..]);
    assert!(adam(&p[..1], (&[0.0], 1.0), (&m[..1], &v[..1]), plain, c));
    assert_eq!(
        (out[0], m2[0], v2[0]),
        (plain_out[0], plain_m2[0], plain_v2[0])
    );
    // Gaps 1, 10, and 97 counted as the longest, 40.
    for (i, gap) in [(1, 1.0f32), (2, 10.0), (3, 40.0)] {
        let expected = 0.999 * 0.04 + 0.001 * 4.0 / gap;
        assert!(
            (v2[i] - expected).abs() < 1e-7,
            "value {i}: {} vs {expected}",
            v2[i]
        );
        assert!((m2[i] - 0.29).abs() < 1e-6, "value {i}: {}", m2[i]);
    }
}

/// The fast and the portable builds give the same bits (odd lengths: vector bodies and
/// scalar tails), for every kernel.
#[test]
fn fast_and_portable_builds_give_the_same_bits() {
    let fast: Kernels = (sgd_fast, sgd_momentum_fast, adam_fast, adam_gaps_fast);
    let portable: Kernels = (
        sgd_portable,
        sgd_momentum_portable,
        adam_portable,
        adam_gaps_portable,
    );
    for n in [1, 7, 16, 33, 1001] {
        let inputs = inputs(n);
        for scale in [1.0, 0.25, 1.0 / 3.0] {
            let grad = (&inputs[1][..], scale);
            assert_eq!(
                outputs(fast, &inputs, grad),
                outputs(portable, &inputs, grad),
                "length {n}, scale {scale}"
            );
        }
    }
}

/// A scale taken in the loop gives the bits of the gradient scaled beforehand (what a
/// step's mean did in a pass of its own), for every kernel.
#[test]
fn a_scale_in_the_loop_equals_the_gradient_scaled_first() {
    let kernels: Kernels = (sgd, sgd_momentum, adam, adam_gaps);
    let inputs = inputs(1001);
    let scale = 1.0f32 / 3.0;
    let scaled: Vec<f32> = inputs[1].iter().map(|x| x * scale).collect();
    assert_eq!(
        outputs(kernels, &inputs, (&inputs[1], scale)),
        outputs(kernels, &inputs, (&scaled, 1.0))
    );
}
