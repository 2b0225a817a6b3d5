//! The optimizers' element-wise loops, compiled for several instruction sets and picked at
//! run time (the default x86-64 target has only 4-wide SSE2, and Adam's square root and
//! division made its update on the cnn's 1.2M values about 2 ms: a few per cent of every
//! step, spent while the engine's lock is held).
//!
//! Each loop takes its gradient as `(values, scale)` and multiplies each value by the scale
//! first (a step's `1 / weight`: the mean costs no pass of its own), writes the new values
//! beside the old ones and returns whether all of them are finite; the caller swaps them in
//! only then. The same IEEE operations run in the same
//! order at every width, and Rust never fuses a multiply and an add on its own, so every
//! version gives the same bits, the portable one (`portable::*`, taken when
//! `fast_paths::enabled()` says so) included.

use multiversion::multiversion;

/// Adam's constants for one update (PyTorch's formula).
#[derive(Debug, Clone, Copy)]
pub struct AdamStep {
    pub beta1: f32,
    pub beta2: f32,
    pub eps: f32,
    pub weight_decay: f32,
    /// `lr / (1 - beta1^t)`, the schedule's factor included.
    pub step_size: f32,
    /// `sqrt(1 - beta2^t)`.
    pub bias2_sqrt: f32,
}

/// Where a push of sparse sums (`ScaledGrad::accumulated`) is in a value's history: the
/// update being made and the longest gap counted (the updates since the last dense one, at
/// most `1 / (1 - beta2)`, Adam's memory).
#[derive(Debug, Clone, Copy)]
pub struct Gaps {
    pub now: u32,
    pub longest: u32,
}

/// Each value's last arrival before this update and after it (`adam_gaps`).
pub type Arrivals<'a> = (&'a [u32], &'a mut [u32]);

/// A rule's old state over a piece: (first, second) moments, and the arrivals.
pub(crate) type OldState<'a> = ((&'a [f32], &'a [f32]), Arrivals<'a>);

/// `out = p - lr * (g * s + wd * p)` (`s`: the gradient's scale).
#[inline(always)]
fn sgd_body(
    params: &[f32],
    (grad, grad_scale): (&[f32], f32),
    out: &mut [f32],
    lr: f32,
    weight_decay: f32,
) -> bool {
    let mut ok = true;
    for ((out, &p), &g) in out.iter_mut().zip(params).zip(grad) {
        let g = g * grad_scale;
        *out = p - lr * (g + weight_decay * p);
        ok &= out.is_finite();
    }
    ok
}

/// SGD with a momentum buffer `(old, new)` (PyTorch's dampening-free form).
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn sgd_momentum_body(
    params: &[f32],
    (grad, grad_scale): (&[f32], f32),
    buffer: (&[f32], &mut [f32]),
    out: &mut [f32],
    lr: f32,
    momentum: f32,
    weight_decay: f32,
    nesterov: bool,
) -> bool {
    let mut ok = true;
    let old = params.iter().zip(grad).zip(buffer.0);
    let new = out.iter_mut().zip(buffer.1.iter_mut());
    for (((&p, &g), &b), (out, buf)) in old.zip(new) {
        let g = g * grad_scale + weight_decay * p;
        *buf = momentum * b + g;
        let d = if nesterov { g + momentum * *buf } else { *buf };
        *out = p - lr * d;
        ok &= out.is_finite() & buf.is_finite();
    }
    ok
}

/// Adam with moments `(old m, old v)` written to `(new m, new v)`.
#[inline(always)]
fn adam_body(
    params: &[f32],
    (grad, grad_scale): (&[f32], f32),
    moments: (&[f32], &[f32]),
    out: (&mut [f32], &mut [f32], &mut [f32]),
    c: AdamStep,
) -> bool {
    let mut ok = true;
    let old = params.iter().zip(grad).zip(moments.0.iter().zip(moments.1));
    let new = out.0.iter_mut().zip(out.1.iter_mut().zip(out.2.iter_mut()));
    for (((&p, &g), (&m, &v)), (out, (m2, v2))) in old.zip(new) {
        let g = g * grad_scale + c.weight_decay * p;
        *m2 = c.beta1 * m + (1.0 - c.beta1) * g;
        *v2 = c.beta2 * v + (1.0 - c.beta2) * g * g;
        let denom = v2.sqrt() / c.bias2_sqrt + c.eps;
        *out = p - c.step_size * *m2 / denom;
        ok &= out.is_finite() & m2.is_finite() & v2.is_finite();
    }
    ok
}

/// Adam for a push of sparse sums: a value that arrived (not zero) holds the gradients of
/// the updates since it last did (`arrivals`, old and new), so its square enters the second
/// moment divided by that gap; without it a value sent every `gap` updates as their sum
/// would move about `1 / sqrt(gap)` as far as the same gradients sent one by one. The first
/// moment takes the sum as it is (it is linear). A value that did not arrive updates as in
/// `adam_body` with a zero gradient, to the same bits.
#[inline(always)]
fn adam_gaps_body(
    params: &[f32],
    (grad, grad_scale): (&[f32], f32),
    moments: (&[f32], &[f32]),
    arrivals: (&[u32], &mut [u32]),
    out: (&mut [f32], &mut [f32], &mut [f32]),
    (c, gaps): (AdamStep, Gaps),
) -> bool {
    let mut ok = true;
    let old = params.iter().zip(grad).zip(moments.0.iter().zip(moments.1));
    let new = out.0.iter_mut().zip(out.1.iter_mut().zip(out.2.iter_mut()));
    let history = arrivals.0.iter().zip(arrivals.1.iter_mut());
    for ((((&p, &g), (&m, &v)), (out, (m2, v2))), (&last, arrived_at)) in old.zip(new).zip(history)
    {
        let arrived = g != 0.0;
        // At most `longest`, which fits an i32: a conversion every vector width has.
        let since = gaps.now.wrapping_sub(last).min(gaps.longest).max(1) as i32 as f32;
        let gap = if arrived { since } else { 1.0 };
        *arrived_at = if arrived { gaps.now } else { last };
        let g = g * grad_scale + c.weight_decay * p;
        *m2 = c.beta1 * m + (1.0 - c.beta1) * g;
        *v2 = c.beta2 * v + (1.0 - c.beta2) * g * g / gap;
        let denom = v2.sqrt() / c.bias2_sqrt + c.eps;
        *out = p - c.step_size * *m2 / denom;
        ok &= out.is_finite() & m2.is_finite() & v2.is_finite();
    }
    ok
}

/// One kernel from its body: `$fast`, the body compiled once per instruction set and picked
/// at run time; `$portable`, the body as the target's baseline compiles it; and `$name`, the
/// entry that takes the fast one unless `fast_paths` says otherwise.
macro_rules! kernel {
    ($(#[$doc:meta])* $name:ident, $fast:ident, $portable:ident, $body:ident,
     ($($arg:ident: $ty:ty),* $(,)?)) => {
        $(#[$doc])*
        #[allow(clippy::too_many_arguments)]
        pub fn $name($($arg: $ty),*) -> bool {
            if crate::fast_paths::enabled() {
                $fast($($arg),*)
            } else {
                $portable($($arg),*)
            }
        }

        #[multiversion(targets("x86_64+avx512f+avx512vl", "x86_64+avx2+fma", "aarch64+neon"))]
        #[allow(clippy::too_many_arguments)]
        fn $fast($($arg: $ty),*) -> bool {
            $body($($arg),*)
        }

        /// The portable build of the same loop (what `fast_paths::force_portable` selects).
        #[allow(clippy::too_many_arguments)]
        pub fn $portable($($arg: $ty),*) -> bool {
            $body($($arg),*)
        }
    };
}

kernel!(
    /// `out = p - lr * (g * s + wd * p)`.
    sgd, sgd_fast, sgd_portable, sgd_body,
    (params: &[f32], grad: (&[f32], f32), out: &mut [f32], lr: f32, weight_decay: f32)
);

kernel!(
    /// SGD with a momentum buffer `(old, new)` (PyTorch's dampening-free form).
    sgd_momentum, sgd_momentum_fast, sgd_momentum_portable, sgd_momentum_body,
    (
        params: &[f32],
        grad: (&[f32], f32),
        buffer: (&[f32], &mut [f32]),
        out: &mut [f32],
        lr: f32,
        momentum: f32,
        weight_decay: f32,
        nesterov: bool,
    )
);

kernel!(
    /// Adam with moments `(old m, old v)` written to `(new m, new v)`.
    adam, adam_fast, adam_portable, adam_body,
    (
        params: &[f32],
        grad: (&[f32], f32),
        moments: (&[f32], &[f32]),
        out: (&mut [f32], &mut [f32], &mut [f32]),
        c: AdamStep,
    )
);

kernel!(
    /// Adam for a push of sparse sums, counting each value's gap since it last arrived.
    adam_gaps, adam_gaps_fast, adam_gaps_portable, adam_gaps_body,
    (
        params: &[f32],
        grad: (&[f32], f32),
        moments: (&[f32], &[f32]),
        arrivals: (&[u32], &mut [u32]),
        out: (&mut [f32], &mut [f32], &mut [f32]),
        c: (AdamStep, Gaps),
    )
);

/// One update's rule and its constants (the schedule's factor applied).
#[derive(Debug, Clone, Copy)]
pub(crate) enum UpdateRule {
    Sgd {
        lr: f32,
        weight_decay: f32,
    },
    Momentum {
        lr: f32,
        momentum: f32,
        weight_decay: f32,
        nesterov: bool,
    },
    Adam(AdamStep),
    /// Adam on a push of sparse sums (`adam_gaps`).
    AdamGaps(AdamStep, Gaps),
}

impl UpdateRule {
    /// The rule over one piece: old weights and gradient, old state (first, second, and the
    /// arrivals `AdamGaps` reads and writes), new weights and state; whether all of the new
    /// are finite.
    pub(crate) fn run(
        self,
        (params, grad): (&[f32], (&[f32], f32)),
        ((first, second), arrivals): OldState<'_>,
        (out, (new_first, new_second)): (&mut [f32], (&mut [f32], &mut [f32])),
    ) -> bool {
        match self {
            UpdateRule::Sgd { lr, weight_decay } => sgd(params, grad, out, lr, weight_decay),
            UpdateRule::Momentum {
                lr,
                momentum,
                weight_decay,
                nesterov,
            } => {
                let buffer = (first, new_first);
                sgd_momentum(
                    params,
                    grad,
                    buffer,
                    out,
                    lr,
                    momentum,
                    weight_decay,
                    nesterov,
                )
            }
            UpdateRule::Adam(step) => adam(
                params,
                grad,
                (first, second),
                (out, new_first, new_second),
                step,
            ),
            UpdateRule::AdamGaps(step, gaps) => adam_gaps(
                params,
                grad,
                (first, second),
                arrivals,
                (out, new_first, new_second),
                (step, gaps),
            ),
        }
    }
}

#[cfg(test)]
mod tests {
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
    type Momentum =
        fn(&[f32], Grad<'_>, (&[f32], &mut [f32]), &mut [f32], f32, f32, f32, bool) -> bool;
    type Adam = fn(
        &[f32],
        Grad<'_>,
        (&[f32], &[f32]),
        (&mut [f32], &mut [f32], &mut [f32]),
        AdamStep,
    ) -> bool;
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
}
