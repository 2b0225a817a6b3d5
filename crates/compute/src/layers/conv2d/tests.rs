//! The convolution against its definition: forward, and backward on the GEMM and sparse paths.

use super::*;
use crate::layers::gradcheck;

#[test]
fn gradients_match_finite_differences() {
    gradcheck::check(&mut Conv2d::new(Shape::new(2, 5, 6), 3, 3), 2, 1);
    gradcheck::check(&mut Conv2d::new(Shape::new(1, 4, 4), 2, 2), 3, 2);
}

/// Backward by the definition, for one sample: dW[co][ci][ky][kx] = sum over positions of
/// dy[co][p] * x[ci][p + (ky, kx)], dx[ci][q] = sum of dy[co][p] * W[co][ci][q - p].
fn direct_backward(
    input: Shape,
    co_n: usize,
    k: usize,
    weight: &[f32],
    x: &[f32],
    dy: &[f32],
) -> (Vec<f32>, Vec<f32>) {
    let (oh, ow) = (input.h - k + 1, input.w - k + 1);
    let mut dw = vec![0.0f32; co_n * input.c * k * k];
    let mut dx = vec![0.0f32; input.len()];
    for co in 0..co_n {
        for oy in 0..oh {
            for ox in 0..ow {
                let g = dy[(co * oh + oy) * ow + ox];
                for ci in 0..input.c {
                    for ky in 0..k {
                        for kx in 0..k {
                            let w_at = ((co * input.c + ci) * k + ky) * k + kx;
                            let x_at = (ci * input.h + oy + ky) * input.w + ox + kx;
                            dw[w_at] += g * x[x_at];
                            dx[x_at] += g * weight[w_at];
                        }
                    }
                }
            }
        }
    }
    (dw, dx)
}

#[test]
fn mostly_zero_output_gradients_take_the_sparse_path_and_match_the_definition() {
    // Kernel rows over all input channels of 20 values (wide enough for the sparse path:
    // a 16-wide stripe and a tail), 15 (left to the GEMMs) and 72 (64 + a tail); output
    // gradients three quarters zero, as behind a 2x2 max-pool, or all dense.
    let cases = [
        (Shape::new(5, 9, 8), 5, 4),
        (Shape::new(3, 9, 10), 2, 5),
        (Shape::new(24, 8, 9), 3, 3),
    ];
    for &(input, co_n, k) in &cases {
        let mut conv = Conv2d::new(input, co_n, k);
        let mut rng = Rng::new(11);
        let n_params = co_n * input.c * k * k + co_n;
        let mut params = vec![0.0; n_params];
        conv.init(&mut params, &mut rng);
        let batch = 2;
        let x: Vec<f32> = (0..batch * input.len())
            .map(|_| rng.uniform(-1.0, 1.0))
            .collect();
        let out = conv.output_shape();
        // Each sample's share of non-zero gradients: both sparse, both dense, and mixed
        // batches (the sparse and the GEMM weight gradients summed).
        for keep_every in [[4, 4], [1, 1], [4, 1], [1, 4]] {
            let dy: Vec<f32> = (0..batch * out.len())
                .map(|i| {
                    let v = rng.uniform(-1.0, 1.0);
                    if (i * 7 + i / 3) % keep_every[i / out.len()] == 0 {
                        v
                    } else {
                        0.0
                    }
                })
                .collect();
            let y = vec![0.0; batch * out.len()];
            let mut dx = vec![f32::NAN; batch * input.len()];
            let mut grads = vec![f32::NAN; n_params];
            let mut pass = Pass {
                batch,
                train: true,
                rng: &mut rng,
                first_sample: 0,
            };
            let io = Backward {
                x: &x,
                y: &y,
                dy: &dy,
                dx: Some(&mut dx),
            };
            conv.backward(&params, io, &mut grads, &mut pass);
            let weight = &params[..co_n * input.c * k * k];
            let mut want_dw = vec![0.0f32; weight.len()];
            for b in 0..batch {
                let (dw, dxb) = direct_backward(
                    input,
                    co_n,
                    k,
                    weight,
                    &x[b * input.len()..(b + 1) * input.len()],
                    &dy[b * out.len()..(b + 1) * out.len()],
                );
                want_dw.iter_mut().zip(&dw).for_each(|(w, d)| *w += d);
                for (got, want) in dx[b * input.len()..].iter().zip(&dxb) {
                    assert!((got - want).abs() < 1e-4, "dx {got} vs {want}");
                }
            }
            for (got, want) in grads.iter().zip(&want_dw) {
                assert!((got - want).abs() < 1e-4, "dW {got} vs {want}");
            }
            let want_db: Vec<f32> = (0..co_n)
                .map(|co| {
                    (0..batch)
                        .map(|b| {
                            dy[(b * co_n + co) * out.h * out.w..][..out.h * out.w]
                                .iter()
                                .sum::<f32>()
                        })
                        .sum()
                })
                .collect();
            for (got, want) in grads[weight.len()..].iter().zip(&want_db) {
                assert!((got - want).abs() < 1e-4, "db {got} vs {want}");
            }
        }
    }
}

#[test]
fn forward_matches_direct_convolution() {
    let input = Shape::new(2, 4, 5);
    let mut conv = Conv2d::new(input, 3, 3);
    let mut rng = Rng::new(5);
    let mut params = vec![0.0; 3 * 2 * 9 + 3];
    conv.init(&mut params, &mut rng);
    let x: Vec<f32> = (0..2 * input.len())
        .map(|_| rng.uniform(-1.0, 1.0))
        .collect();
    let out = conv.output_shape();
    let mut y = vec![0.0; 2 * out.len()];
    let mut pass = Pass {
        batch: 2,
        train: false,
        rng: &mut rng,
        first_sample: 0,
    };
    conv.forward(&params, &x, &mut y, &mut pass);
    for b in 0..2 {
        for co in 0..3 {
            for oy in 0..out.h {
                for ox in 0..out.w {
                    let mut acc = params[54 + co];
                    for ci in 0..2 {
                        for ky in 0..3 {
                            for kx in 0..3 {
                                acc += params[((co * 2 + ci) * 3 + ky) * 3 + kx]
                                    * x[b * input.len() + (ci * 4 + oy + ky) * 5 + ox + kx];
                            }
                        }
                    }
                    let got = y[b * out.len() + (co * out.h + oy) * out.w + ox];
                    assert!((got - acc).abs() < 1e-5, "{got} vs {acc}");
                }
            }
        }
    }
}
