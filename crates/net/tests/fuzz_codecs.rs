//! Property tests of the codec decoders a compressed push or pull reaches after its frame was
//! read: random bytes and mutations of valid encodings, for every push codec, every pull
//! codec and every pull difference, must give `Ok` or `Err`, never a panic, allocate nothing
//! beyond a bound set by the slice (an entropy-coded section decodes to at most what the
//! layout's values need, behind a table of fixed size), and a refused difference must leave
//! the worker's weights as they were.

use proptest::prelude::*;
use pstrain_core::{PullCodec, PullReplica, PushCodec, PushEncoder};
#[path = "../../../test-support/peak_alloc.rs"]
mod peak_alloc;

use peak_alloc::{mutate, Peak};

#[global_allocator]
static ALLOCATOR: Peak = Peak;

const PUSH_CODECS: [PushCodec; 4] = [
    PushCodec::Fp32,
    PushCodec::Bf16,
    PushCodec::Int8,
    PushCodec::TopK { per_mille: 30 },
];
const PULL_CODECS: [PullCodec; 5] = [
    PullCodec::Fp32,
    PullCodec::Bf16,
    PullCodec::DeltaInt8,
    PullCodec::DeltaTopK { per_mille: 30 },
    PullCodec::DeltaTernary,
];

/// The largest allocation a decoder may make for a slice of `n` values: an entropy-coded
/// section's table (16 KiB: a 4-byte step per slot of 4,096), or its bytes (top-k's gaps: at
/// most 5 bytes a value).
fn allocation_bound(n: usize) -> usize {
    (1 << 14) + 5 * n + 64
}

/// Feeds `input` to every decoder for a slice of `n` values.
fn decode_everything(input: &[u8], n: usize) {
    let mut out = vec![0.0f32; n];
    let most = allocation_bound(n);
    let mut held = vec![1.5f32; n];
    let mut scratch = Vec::with_capacity(n);
    for codec in PUSH_CODECS {
        let _ = peak_alloc::bounded("push", input, most, 0, |b| codec.decode(b, &mut out));
    }
    for codec in PULL_CODECS {
        let _ = peak_alloc::bounded("pull", input, most, 0, |b| codec.decode(b, &mut out));
        if codec.is_delta() {
            let applied = peak_alloc::bounded("delta", input, most, 0, |b| {
                codec.apply_delta(b, &mut held, &mut scratch)
            });
            if applied.is_err() {
                assert!(
                    held.iter().all(|&h| h == 1.5),
                    "{codec}: a refused delta applied"
                );
            }
            held.fill(1.5);
        }
    }
}

/// Valid encodings of a slice of `n` values: every push codec's, and every delta's.
fn valid_encodings(n: usize) -> Vec<Vec<u8>> {
    let values: Vec<f32> = (0..n).map(|i| (i as f32 * 0.37).sin()).collect();
    let mut all = Vec::new();
    for codec in PUSH_CODECS {
        let mut bytes = Vec::new();
        PushEncoder::new(codec, 1).encode(&values, &mut bytes);
        all.push(bytes);
    }
    for codec in PULL_CODECS.into_iter().filter(PullCodec::is_delta) {
        let mut replica = PullReplica::new(true, 2);
        replica.sent_whole(0, &vec![0.0; n]);
        let mut bytes = Vec::new();
        replica.encode_delta(codec, 1, &values, &mut bytes);
        all.push(bytes);
    }
    all
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 5_000, failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn random_bytes_never_panic(
        input in proptest::collection::vec(any::<u8>(), 0..1200),
        n in 1usize..600,
    ) {
        decode_everything(&input, n);
    }

    #[test]
    fn mutated_encodings_never_panic(
        which in 0usize..7,
        n in 1usize..600,
        edits in proptest::collection::vec((any::<usize>(), any::<u8>()), 0..8),
        cut in proptest::option::of(any::<usize>()),
        tail in proptest::collection::vec(any::<u8>(), 0..16),
    ) {
        let encodings = valid_encodings(n);
        let base = &encodings[which % encodings.len()];
        decode_everything(&mutate(base, &edits, cut, &tail), n);
    }
}

#[test]
fn valid_encodings_still_decode() {
    // The mutations start from encodings the decoders accept.
    let n = 300;
    let encodings = valid_encodings(n);
    let mut out = vec![0.0; n];
    for (codec, bytes) in PUSH_CODECS.iter().zip(&encodings) {
        assert!(codec.decode(bytes, &mut out).is_ok(), "{codec}");
    }
    let deltas = PULL_CODECS.into_iter().filter(PullCodec::is_delta);
    for (codec, bytes) in deltas.zip(&encodings[PUSH_CODECS.len()..]) {
        let (mut held, mut scratch) = (vec![0.0; n], Vec::new());
        assert!(
            codec.apply_delta(bytes, &mut held, &mut scratch).is_ok(),
            "{codec}"
        );
    }
}
