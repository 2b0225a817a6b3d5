//! What the entropy stage leaves of a codec's bytes, as one worker sees its own pushes and
//! pulls. `auto` prices a rung's bytes by it: a coded payload's size depends on the run's
//! data (how many of a difference's digits are zero, how the kept indices cluster), which
//! no table written beforehand can know.

use super::{PullCodec, PushCodec};

/// How much of the window each new payload replaces.
const WEIGHT: f64 = 0.25;

/// Moving means of a payload's bytes over its codec's size before coding, per kind of
/// codec: top-k pushes, top-k differences, ternary differences. `None` until one is seen,
/// when a rung is priced at its size before coding (which bounds the size after).
#[derive(Debug, Clone, Copy, Default)]
pub(super) struct CodedShare {
    top_k_push: Option<f64>,
    top_k_pull: Option<f64>,
    ternary_pull: Option<f64>,
}

impl CodedShare {
    /// A push of `values` values in `codec` took `bytes`.
    pub fn pushed(&mut self, codec: PushCodec, bytes: u64, values: usize) {
        if let PushCodec::TopK { .. } = codec {
            add(&mut self.top_k_push, bytes, codec.typical_len(values));
        }
    }

    /// A difference of `values` values in `codec` took `bytes`.
    pub fn pulled(&mut self, codec: PullCodec, bytes: u64, values: usize) {
        let typical = codec.typical_delta_len(values);
        match codec {
            PullCodec::DeltaTopK { .. } => add(&mut self.top_k_pull, bytes, typical),
            PullCodec::DeltaTernary => add(&mut self.ternary_pull, bytes, typical),
            _ => {}
        }
    }

    /// The expected bytes of a push of `values` values in `codec`.
    pub fn push_len(&self, codec: PushCodec, values: usize) -> f64 {
        let share = match codec {
            PushCodec::TopK { .. } => self.top_k_push,
            _ => None,
        };
        codec.typical_len(values) as f64 * share.unwrap_or(1.0)
    }

    /// The expected bytes of a difference of `values` values in `codec`.
    pub fn delta_len(&self, codec: PullCodec, values: usize) -> f64 {
        let share = match codec {
            PullCodec::DeltaTopK { .. } => self.top_k_pull,
            PullCodec::DeltaTernary => self.ternary_pull,
            _ => None,
        };
        codec.typical_delta_len(values) as f64 * share.unwrap_or(1.0)
    }
}

/// Takes `bytes` over `typical` into the mean (a share kept within 1/100 and 2: a payload's
/// size is its own encoder's or was checked against its codec's largest).
fn add(mean: &mut Option<f64>, bytes: u64, typical: usize) {
    if typical == 0 {
        return;
    }
    let share = (bytes as f64 / typical as f64).clamp(0.01, 2.0);
    *mean = Some(match *mean {
        None => share,
        Some(m) => m + WEIGHT * (share - m),
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    const N: usize = 1_000_000;

    #[test]
    fn each_kind_is_priced_by_what_its_own_payloads_took() {
        let mut coded = CodedShare::default();
        let ternary = PullCodec::DeltaTernary;
        let full = ternary.typical_delta_len(N) as f64;
        assert_eq!(
            coded.delta_len(ternary, N),
            full,
            "unseen: the size before coding"
        );
        coded.pulled(ternary, (0.3 * full) as u64, N);
        assert!((coded.delta_len(ternary, N) / full - 0.3).abs() < 1e-3);
        coded.pulled(ternary, (0.7 * full) as u64, N);
        // A moving mean: a quarter of the way to the new share.
        assert!((coded.delta_len(ternary, N) / full - 0.4).abs() < 1e-3);
        let top = PullCodec::DeltaTopK { per_mille: 20 };
        assert_eq!(coded.delta_len(top, N), top.typical_delta_len(N) as f64);
        // Top-k pushes share one mean whatever their fraction; dense pushes are not coded.
        let push = PushCodec::TopK { per_mille: 100 };
        coded.pushed(push, push.typical_len(N) as u64 / 2, N);
        let sparser = PushCodec::TopK { per_mille: 10 };
        let ratio = coded.push_len(sparser, N) / sparser.typical_len(N) as f64;
        assert!((ratio - 0.5).abs() < 1e-3);
        coded.pushed(PushCodec::Int8, 1, N);
        assert_eq!(
            coded.push_len(PushCodec::Int8, N),
            PushCodec::Int8.typical_len(N) as f64
        );
    }
}
