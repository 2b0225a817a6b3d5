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
#[path = "update_kernels_tests.rs"]
mod tests;
