//! One pass over a gradient for what the server checks before using it: its largest
//! magnitude (which also says whether every value is finite) and its squared norm.
//!
//! Both run in independent lanes: a plain `fold` with `f32::max` or a running `f64` sum is
//! one dependent chain the compiler cannot vectorise, and on a 100M-value push that scalar
//! pass cost about as much as receiving the bytes.

const LANES: usize = 16;
/// Clears an `f32`'s sign bit: what remains orders like the magnitude, with infinities
/// above every finite value and NaNs above those.
const MAGNITUDE: u32 = 0x7fff_ffff;

/// The largest magnitude's bits: `f32::from_bits` of it is the largest `|g|`, and it is at
/// least `f32::INFINITY.to_bits()` exactly when some value is not finite.
pub fn largest_magnitude_bits(values: &[f32]) -> u32 {
    let mut lanes = [0u32; LANES];
    let chunks = values.chunks_exact(LANES);
    let rest = chunks.remainder();
    for chunk in chunks {
        for (lane, v) in lanes.iter_mut().zip(chunk) {
            *lane = (*lane).max(v.to_bits() & MAGNITUDE);
        }
    }
    let tail = rest.iter().map(|v| v.to_bits() & MAGNITUDE);
    lanes.into_iter().chain(tail).max().unwrap_or(0)
}

/// The values that are not finite (a refusal says how many).
pub fn count_non_finite(values: &[f32]) -> usize {
    values.iter().filter(|v| !v.is_finite()).count()
}

/// The Euclidean norm, accumulated in `f64` lanes (NaN if any value is NaN).
pub fn norm(values: &[f32]) -> f32 {
    let mut lanes = [0f64; LANES];
    let chunks = values.chunks_exact(LANES);
    let rest = chunks.remainder();
    for chunk in chunks {
        for (lane, &v) in lanes.iter_mut().zip(chunk) {
            *lane += f64::from(v) * f64::from(v);
        }
    }
    let tail: f64 = rest.iter().map(|&v| f64::from(v) * f64::from(v)).sum();
    (lanes.iter().sum::<f64>() + tail).sqrt() as f32
}

#[cfg(test)]
mod tests {
    use super::*;

    fn values(n: usize) -> Vec<f32> {
        (0..n)
            .map(|i| ((i * 37 % 101) as f32 - 50.0) * 0.25)
            .collect()
    }

    #[test]
    fn largest_magnitude_matches_a_plain_fold_at_every_length() {
        for n in [0, 1, 15, 16, 17, 100, 1000] {
            let v = values(n);
            let plain = v.iter().fold(0.0f32, |m, g| m.max(g.abs()));
            assert_eq!(f32::from_bits(largest_magnitude_bits(&v)), plain, "n={n}");
            let sq: f64 = v.iter().map(|&g| f64::from(g) * f64::from(g)).sum();
            assert!((f64::from(norm(&v)) - sq.sqrt()).abs() <= 1e-6 * sq.sqrt().max(1.0));
        }
    }

    #[test]
    fn any_non_finite_value_anywhere_shows() {
        let infinity = f32::INFINITY.to_bits();
        for n in [1, 16, 33, 1000] {
            for at in [0, n / 2, n - 1] {
                for bad in [f32::NAN, -f32::NAN, f32::INFINITY, f32::NEG_INFINITY] {
                    let mut v = values(n);
                    v[at] = bad;
                    assert!(
                        largest_magnitude_bits(&v) >= infinity,
                        "n={n} at={at} {bad}"
                    );
                    assert_eq!(count_non_finite(&v), 1);
                }
            }
            let v = values(n);
            assert!(largest_magnitude_bits(&v) < infinity);
            assert_eq!(count_non_finite(&v), 0);
        }
        let mut v = values(40);
        v[3] = f32::NAN;
        assert!(norm(&v).is_nan());
    }
}
