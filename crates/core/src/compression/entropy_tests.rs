use super::*;
use crate::rng::Rng;

/// `len` bytes, each 0 with probability `zero`, else uniform over `1..=spread`.
fn skewed(len: usize, zero: f32, spread: u8, seed: u64) -> Vec<u8> {
    let mut rng = Rng::new(seed);
    (0..len)
        .map(|_| {
            if rng.next_f32() < zero {
                0
            } else {
                1 + (rng.next_u64() % u64::from(spread)) as u8
            }
        })
        .collect()
}

fn round_trip(bytes: &[u8]) -> Vec<u8> {
    let mut wire = vec![7u8; 3]; // a section follows whatever came before it
    encode_section(bytes, &mut wire);
    wire.extend_from_slice(&[9, 9]); // and whatever comes after it
    let mut out = vec![1, 2, 3];
    let used = decode_section(&wire[3..], bytes.len(), &mut out, "test").unwrap();
    assert_eq!(
        used,
        wire.len() - 5,
        "the section ends where it was written"
    );
    assert_eq!(out, bytes);
    wire[3..wire.len() - 2].to_vec()
}

#[test]
fn sections_come_back_byte_for_byte() {
    round_trip(&[]);
    round_trip(&[0]);
    round_trip(&[255; 10_000]);
    for (zero, spread) in [(0.0, 255), (0.5, 3), (0.9, 242), (0.99, 1), (0.999, 100)] {
        round_trip(&skewed(100_000, zero, spread, 3));
    }
    let every: Vec<u8> = (0..=255).cycle().take(70_000).collect();
    round_trip(&every);
}

#[test]
fn skewed_bytes_shrink_to_near_their_entropy_and_uniform_ones_are_stored() {
    // 90% zeros, the rest spread over 242 symbols: H = H(0.1) + 0.1 * log2(242) = 1.26 bits.
    let bytes = skewed(200_000, 0.9, 242, 5);
    let wire = round_trip(&bytes);
    let bits = 8.0 * wire.len() as f64 / bytes.len() as f64;
    assert!(bits > 1.2 && bits < 1.35, "{bits} bits a byte");
    // One symbol: the table and a state.
    assert!(round_trip(&[4u8; 100_000]).len() < 300);
    // Uniform bytes do not shrink: stored, one mode byte and the length over.
    let uniform = skewed(50_000, 0.0, 255, 9);
    assert_eq!(round_trip(&uniform).len(), max_section_len(uniform.len()));
}

/// The encoder's step written with a division, as rANS is defined.
fn plain_put(x: u32, start: u32, freq: u32) -> u32 {
    ((x / freq) << PROB_BITS) + (x % freq) + start
}

#[test]
fn the_reciprocal_step_is_the_division_step() {
    let mut rng = Rng::new(11);
    for freq in (1..=PROB_SCALE).step_by(7).chain([1, 2, 3, PROB_SCALE]) {
        let start = (PROB_SCALE - freq).min(rng.next_u64() as u32 % PROB_SCALE);
        let s = EncodeSymbol::new(start, freq);
        for _ in 0..200 {
            // Any state below the symbol's bound (the encoder sheds bytes down to it).
            let x = (rng.next_u64() % u64::from(s.x_max)) as u32;
            let q = ((u64::from(x) * u64::from(s.rcp_freq)) >> 32) as u32 >> s.rcp_shift;
            let fast = x
                .wrapping_add(s.bias)
                .wrapping_add(q.wrapping_mul(s.cmpl_freq));
            assert_eq!(fast, plain_put(x, start, freq), "freq {freq} x {x}");
        }
    }
}

#[test]
fn frequencies_sum_to_the_scale_and_keep_every_symbol() {
    for bytes in [
        skewed(1_000, 0.5, 255, 1),
        skewed(300, 0.0, 255, 2),
        (0..=255).collect::<Vec<u8>>(),
        vec![0; 5],
    ] {
        let freqs = normalized_frequencies(&bytes);
        assert_eq!(freqs.iter().sum::<u32>(), PROB_SCALE);
        for b in &bytes {
            assert!(freqs[usize::from(*b)] > 0);
        }
    }
}

#[test]
fn a_length_above_the_bound_is_refused() {
    let mut wire = Vec::new();
    encode_section(&skewed(1_000, 0.9, 3, 1), &mut wire);
    let mut out = Vec::new();
    assert!(decode_section(&wire, 999, &mut out, "test").is_err());
    assert!(decode_section(&wire, 1_000, &mut out, "test").is_ok());
}

#[test]
fn damaged_sections_are_refused_without_panicking() {
    let bytes = skewed(5_000, 0.8, 20, 4);
    let mut wire = Vec::new();
    encode_section(&bytes, &mut wire);
    let mut out = Vec::new();
    for cut in 0..wire.len() {
        assert!(
            decode_section(&wire[..cut], bytes.len(), &mut out, "test").is_err(),
            "cut at {cut}"
        );
    }
    // Any byte changed: refused, or (where the change lands in the stream and happens to
    // decode) a section of the right length; never a panic or an overlong output.
    let mut rng = Rng::new(8);
    for _ in 0..3_000 {
        let mut damaged = wire.clone();
        let at = rng.next_u64() as usize % damaged.len();
        damaged[at] ^= 1 + (rng.next_u64() % 255) as u8;
        if let Ok(used) = decode_section(&damaged, bytes.len(), &mut out, "test") {
            assert!(used <= damaged.len() && out.len() <= bytes.len());
        }
    }
    // A bad mode, a table that does not sum, a state out of range.
    let mut bad_mode = wire.clone();
    bad_mode[varint_len(bytes.len() as u64)] = 2;
    assert!(decode_section(&bad_mode, bytes.len(), &mut out, "test").is_err());
    let mut header = Vec::new();
    write_varint(10, &mut header);
    header.push(CODED);
    write_varint(4, &mut header);
    for _ in 0..256 {
        write_varint(64, &mut header); // 256 * 64 = the scale
    }
    let mut good_table = header.clone();
    good_table.extend_from_slice(&(STATE_LOW - 1).to_be_bytes());
    assert!(decode_section(&good_table, 10, &mut out, "test").is_err());
    let mut short_table = header.clone();
    *short_table.last_mut().unwrap() = 63;
    short_table.extend_from_slice(&STATE_LOW.to_be_bytes());
    assert!(decode_section(&short_table, 10, &mut out, "test").is_err());
}
