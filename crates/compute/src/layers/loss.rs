//! Log-softmax followed by the negative log-likelihood, fused: the mean loss over the batch
//! and its gradient with respect to the logits.

/// Returns (mean loss, correct predictions) and writes dLoss/dlogits into `dlogits`'s buffer,
/// for the loss averaged over its `usize` samples: this batch's size, or the whole batch's
/// when this is one part of it (the parts' gradients then add up to the whole one's).
pub fn log_softmax_nll(
    logits: &[f32],
    labels: &[u8],
    classes: usize,
    dlogits: Option<(&mut [f32], usize)>,
) -> (f32, usize) {
    let batch = labels.len();
    let mut total = 0.0f64;
    let mut correct = 0;
    let mut dlogits = dlogits;
    for (b, &label) in labels.iter().enumerate() {
        let row = &logits[b * classes..(b + 1) * classes];
        let (mut best, mut max) = (0, row[0]);
        for (i, &v) in row.iter().enumerate() {
            if v > max {
                max = v;
                best = i;
            }
        }
        correct += usize::from(best == usize::from(label));
        let sum_exp: f32 = row.iter().map(|&v| (v - max).exp()).sum();
        let log_z = max + sum_exp.ln();
        total += f64::from(log_z - row[usize::from(label)]);
        if let Some((d, mean_over)) = dlogits.as_mut() {
            let d = &mut d[b * classes..(b + 1) * classes];
            let inv_batch = 1.0 / *mean_over as f32;
            for (i, (g, &v)) in d.iter_mut().zip(row).enumerate() {
                let p = (v - log_z).exp();
                *g = (p - f32::from(u8::from(i == usize::from(label)))) * inv_batch;
            }
        }
    }
    ((total / batch as f64) as f32, correct)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loss_and_gradient_match_finite_differences() {
        let logits = vec![0.3, -1.2, 2.0, 0.1, 0.5, 0.5, -0.3, 1.7];
        let labels = [2u8, 0];
        let mut d = vec![0.0; 8];
        let (loss, correct) = log_softmax_nll(&logits, &labels, 4, Some((&mut d, 2)));
        assert_eq!(correct, 1);
        // Row 0: log(sum exp) - 2.0
        let z0: f32 = [0.3f32, -1.2, 2.0, 0.1].iter().map(|v| v.exp()).sum();
        let z1: f32 = [0.5f32, 0.5, -0.3, 1.7].iter().map(|v| v.exp()).sum();
        let expected = ((z0.ln() - 2.0) + (z1.ln() - 0.5)) / 2.0;
        assert!((loss - expected).abs() < 1e-6);
        for i in 0..8 {
            let mut p = logits.clone();
            p[i] += 1e-3;
            let (lp, _) = log_softmax_nll(&p, &labels, 4, None);
            p[i] -= 2e-3;
            let (lm, _) = log_softmax_nll(&p, &labels, 4, None);
            assert!(((lp - lm) / 2e-3 - d[i]).abs() < 1e-3);
        }
    }

    #[test]
    fn huge_logits_stay_finite() {
        let (loss, _) = log_softmax_nll(&[1e30, -1e30, 0.0], &[1], 3, None);
        assert!(loss.is_finite() && loss > 1e29);
        let (loss, _) = log_softmax_nll(&[100.0, 99.0, 0.0], &[0], 3, None);
        assert!(loss.is_finite() && loss > 0.0);
    }
}
