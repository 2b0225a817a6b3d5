//! The optimizers' element-wise loops, compiled for several instruction sets and picked at
//! run time (the default x86-64 target has only 4-wide SSE2, and Adam's square root and
//! division made its update on the cnn's 1.2M values about 2 ms: a few per cent of every
//! step, spent while the engine's lock is held).
//!
//! Each loop writes the new values beside the old ones and returns whether all of them are
//! finite; the caller swaps them in only then. The same IEEE operations run in the same
//! order at every width, and Rust never fuses a multiply and an add on its own, so every
//! version gives the same bits.

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

/// `out = p - lr * (g + wd * p)`.
#[multiversion(targets("x86_64+avx512f+avx512vl", "x86_64+avx2+fma", "aarch64+neon"))]
pub fn sgd(params: &[f32], grad: &[f32], out: &mut [f32], lr: f32, weight_decay: f32) -> bool {
    let mut ok = true;
    for ((out, &p), &g) in out.iter_mut().zip(params).zip(grad) {
        *out = p - lr * (g + weight_decay * p);
        ok &= out.is_finite();
    }
    ok
}

/// SGD with a momentum buffer `(old, new)` (PyTorch's dampening-free form).
#[multiversion(targets("x86_64+avx512f+avx512vl", "x86_64+avx2+fma", "aarch64+neon"))]
#[allow(clippy::too_many_arguments)]
pub fn sgd_momentum(
    params: &[f32],
    grad: &[f32],
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
        let g = g + weight_decay * p;
        *buf = momentum * b + g;
        let d = if nesterov { g + momentum * *buf } else { *buf };
        *out = p - lr * d;
        ok &= out.is_finite() & buf.is_finite();
    }
    ok
}

/// Adam with moments `(old m, old v)` written to `(new m, new v)`.
#[multiversion(targets("x86_64+avx512f+avx512vl", "x86_64+avx2+fma", "aarch64+neon"))]
pub fn adam(
    params: &[f32],
    grad: &[f32],
    moments: (&[f32], &[f32]),
    out: (&mut [f32], &mut [f32], &mut [f32]),
    c: AdamStep,
) -> bool {
    let mut ok = true;
    let old = params.iter().zip(grad).zip(moments.0.iter().zip(moments.1));
    let new = out.0.iter_mut().zip(out.1.iter_mut().zip(out.2.iter_mut()));
    for (((&p, &g), (&m, &v)), (out, (m2, v2))) in old.zip(new) {
        let g = g + c.weight_decay * p;
        *m2 = c.beta1 * m + (1.0 - c.beta1) * g;
        *v2 = c.beta2 * v + (1.0 - c.beta2) * g * g;
        let denom = v2.sqrt() / c.bias2_sqrt + c.eps;
        *out = p - c.step_size * *m2 / denom;
        ok &= out.is_finite() & m2.is_finite() & v2.is_finite();
    }
    ok
}
