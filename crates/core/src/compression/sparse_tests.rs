//! Tests of top-k: its selection against a full sort, its payloads' round trip, hostile
//! payloads refused.

use super::sampled_threshold::Sampler;
use super::*;
use crate::compression::hand_written;
use crate::rng::Rng;

/// The reference: every index sorted by magnitude, largest first, ties by index.
fn by_sorting(values: &[f32], k: usize) -> Vec<u32> {
    let mut idx: Vec<u32> = (0..values.len() as u32).collect();
    idx.sort_by(|&a, &b| {
        let key = |i: u32| magnitude_key(values[i as usize]);
        key(b).cmp(&key(a)).then(a.cmp(&b))
    });
    idx.truncate(k);
    idx.sort_unstable();
    idx
}

/// `n` values, one in `one_in` each of 0.25, -0.25 (ties at any threshold) and 0; NaN in
/// another where `nan(i)`; the rest spread over six decades.
fn awkward(rng: &mut Rng, n: usize, one_in: usize, nan: impl Fn(usize) -> bool) -> Vec<f32> {
    (0..n)
        .map(|i| match rng.below(one_in) {
            0 => 0.25,
            1 => -0.25,
            2 => 0.0,
            3 if nan(i) => f32::NAN,
            _ => rng.uniform(-1.0, 1.0) * 10f32.powi(rng.below(6) as i32 - 3),
        })
        .collect()
}

/// `idx` without the indices of zeros (never selected).
fn nonzero(values: &[f32], idx: Vec<u32>) -> Vec<u32> {
    idx.into_iter()
        .filter(|&i| values[i as usize] != 0.0)
        .collect()
}

/// `top` selects what a full sort does from `values` (in round `round`), and from halves of
/// them summed in the selection's own pass (error feedback's form), leaving the sums equal
/// to `values`.
fn selects_as_a_sort(top: &mut TopK, values: &[f32], k: usize, round: usize) {
    let want = nonzero(values, by_sorting(values, k));
    let case = format!("round {round}, k {k} of {}", values.len());
    top.select(values, k);
    assert_eq!(top.idx, want, "{case}");
    let (mut sum, add): (Vec<f32>, Vec<f32>) = values.iter().map(|&v| (v * 0.5, v * 0.5)).unzip();
    top.add_and_select(&mut sum, &add, k);
    assert_eq!(top.idx, want, "summed, {case}");
    let same = |a: f32, b: f32| a == b || (a.is_nan() && b.is_nan());
    assert!(sum.iter().zip(values).all(|(&s, &v)| same(s, v)), "{case}");
}

#[test]
fn selection_matches_a_full_sort_including_ties_and_nan() {
    let mut rng = Rng::new(11);
    let mut top = TopK::default();
    for round in 0..200 {
        let n = 1 + rng.below(3000);
        let values = awkward(&mut rng, n, 10, |_| round % 7 == 0);
        for k in [0, 1, n / 50, n / 3, n - 1, n] {
            selects_as_a_sort(&mut top, &values, k, round);
        }
    }
}

#[test]
fn payloads_round_trip_within_half_a_step_of_their_blocks_scale() {
    let mut rng = Rng::new(3);
    let n = 100_000;
    let values: Vec<f32> = (0..n)
        .map(|_| rng.uniform(-1.0, 1.0) * 10f32.powi(rng.below(4) as i32 - 2))
        .collect();
    let largest = values.iter().fold(0.0f32, |m, v| m.max(v.abs()));
    let mut top = TopK::default();
    for k in [1, 100, 5_000, 50_000] {
        top.select(&values, k);
        let mut wire = Vec::new();
        top.encode(&values, &mut wire);
        // Entropy coding makes it smaller than its size before, never larger.
        assert!(
            wire.len() <= typical_len(k, n) && wire.len() <= max_len(k),
            "k {k}"
        );
        let mut out = vec![9.0; n];
        decode(&wire, k, &mut out).unwrap();
        let mut sent = top.idx.iter().zip(&top.sent).peekable();
        for (i, (o, v)) in out.iter().zip(&values).enumerate() {
            match sent.next_if(|(j, _)| **j == i as u32) {
                Some((_, arrives)) => {
                    // What the encoder says arrives is what the decoder makes.
                    assert_eq!(o, arrives);
                    assert!((o - v).abs() <= largest / 254.0 * 1.001, "{v} -> {o}");
                }
                None => assert_eq!(*o, 0.0),
            }
        }
    }
    // Gaps past one byte (one value in 100,000) and the varint's longest form.
    for (i, len) in [
        (127u32, 1),
        (128, 2),
        (16_383, 2),
        (16_384, 3),
        (u32::MAX, 5),
    ] {
        let mut out = Vec::new();
        write_varint(i, &mut out);
        assert_eq!((out.len(), read_varint(&out)), (len, Some((i, len))));
    }
}

#[test]
fn hostile_payloads_are_refused() {
    let mut out = vec![0.0; 10];
    // Values in blocks of 64 behind a scale of 0.5, each 2 steps: 1.0.
    let with =
        |count: u32, gaps: &[u8], values: usize| hand_written::top_k(count, gaps, values, 0.5, 2);
    assert!(decode(&with(2, &[1, 1], 2), 2, &mut out).is_ok());
    assert_eq!((out[1], out[3], out[2]), (1.0, 1.0, 0.0));
    // More values than the codec sends: refused even when the slice has room.
    assert!(matches!(
        decode(&with(2, &[1, 1], 2), 1, &mut out),
        Err(CodecError::Count { count: 2, most: 1 })
    ));
    let beyond = with(2, &[8, 1], 2);
    assert!(matches!(
        decode(&beyond, 10, &mut out),
        Err(CodecError::Index { index: 10, .. })
    ));
    let too_many = with(11, &[0; 11], 11);
    assert!(matches!(
        decode(&too_many, 20, &mut out),
        Err(CodecError::Count { .. })
    ));
    // A gap whose varint is cut short, one past a u32, gaps left over, values short of the
    // count, bytes after the values.
    let cut = with(1, &[0x80], 1);
    assert!(matches!(
        decode(&cut, 10, &mut out),
        Err(CodecError::Varint { .. })
    ));
    let huge = with(1, &[0xff, 0xff, 0xff, 0xff, 0x10], 1);
    assert!(matches!(
        decode(&huge, 1, &mut vec![0.0; 1 << 20]),
        Err(CodecError::Varint { .. })
    ));
    let extra = with(1, &[0, 0], 1);
    assert!(matches!(
        decode(&extra, 10, &mut out),
        Err(CodecError::Section { .. })
    ));
    assert!(decode(&with(2, &[0, 0], 1), 10, &mut out).is_err());
    let trailing = [with(1, &[0], 1), vec![0]].concat();
    assert!(decode(&trailing, 10, &mut out).is_err());
    assert!(decode(&[1, 0], 10, &mut out).is_err());
    assert!(decode(&with(2, &[0], 2), 10, &mut out).is_err());
    // More than 64 values: the second block's scale is read in its place.
    let mut out = vec![0.0; 200];
    let many = with(70, &[0; 70], 70);
    decode(&many, 70, &mut out).unwrap();
    assert!(out[..70].iter().all(|&v| v == 1.0) && out[70..].iter().all(|&v| v == 0.0));
}

/// Large slices take their candidates above a threshold guessed from a sample: the same
/// indices as a full sort, for sparse and dense selections, ties, zeros and NaN.
#[test]
fn large_slices_select_through_a_sample_as_a_full_sort_does() {
    use super::sampled_threshold::MIN_LEN;
    let mut rng = Rng::new(29);
    let mut top = TopK::default();
    let n = MIN_LEN + 1_000;
    for round in 0..3 {
        let values = awkward(&mut rng, n, 50, |i| round == 2 && i % 1000 == 0);
        for k in [n / 200, n / 100, n / 10, 3 * n / 10, n / 2] {
            // The sampled path is the one taken (up to 3 in 10: a half is selected whole).
            let guess = Sampler::default().threshold(n, k, |i| magnitude_key(values[i]));
            assert_eq!(guess.is_some(), k < n / 2, "k {k}");
            if let Some(t) = guess {
                let reach = values.iter().filter(|&&v| magnitude_key(v) >= t).count();
                assert!(reach >= k && reach < k + k / 2 + 2_000, "k {k}: {reach}");
            }
            selects_as_a_sort(&mut top, &values, k, round);
        }
    }
}

/// A guess that fewer than `k` values reach (here every sampled position holds one of a few
/// large values) falls back to the whole slice, with the sums already made.
#[test]
fn a_sample_that_misses_falls_back_to_the_whole_slice() {
    use super::sampled_threshold::MIN_LEN;
    use std::cell::RefCell;
    let n = MIN_LEN + 1_000;
    let k = n / 20;
    // A fresh selection samples the positions a fresh sampler does.
    let sampled = RefCell::new(Vec::new());
    Sampler::default().threshold(n, k, |i| {
        sampled.borrow_mut().push(i);
        1
    });
    let mut rng = Rng::new(5);
    let mut values: Vec<f32> = (0..n).map(|_| rng.uniform(-1.0, 1.0)).collect();
    for &i in sampled.borrow().iter() {
        values[i] = 5.0;
    }
    let large = values.iter().filter(|&&v| v == 5.0).count();
    assert!(large < k, "{large} sampled positions, k {k}");
    let want = by_sorting(&values, k);
    let (mut sum, add): (Vec<f32>, Vec<f32>) = values.iter().map(|&v| (v, 0.0)).unzip();
    let mut top = TopK::default();
    top.add_and_select(&mut sum, &add, k);
    assert_eq!(top.idx, want);
    let mut top = TopK::default();
    top.select(&values, k);
    assert_eq!(top.idx, want);
}
