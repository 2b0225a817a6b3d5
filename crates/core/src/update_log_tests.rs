use super::*;

fn wire(bytes: &[u8]) -> Source<'_> {
    Source::Push {
        wire: WireRef::new(PushCodec::Fp32, bytes),
        clip: None,
    }
}

fn recorded(source: Source<'_>) -> Recorded<'_> {
    Recorded {
        source,
        scale: 1.0,
        accumulated: false,
        lr_scale: 1.0,
    }
}

#[test]
fn the_checksum_sees_one_bit_and_an_order() {
    let values: Vec<f32> = (0..37).map(|i| i as f32 * 0.25).collect();
    let base = checksum(&values);
    for at in [0, 8, 36] {
        let mut flipped = values.clone();
        flipped[at] = f32::from_bits(flipped[at].to_bits() ^ 1);
        assert_ne!(checksum(&flipped), base, "bit at {at}");
    }
    let mut swapped = values.clone();
    swapped.swap(1, 2);
    assert_ne!(checksum(&swapped), base);
    assert_ne!(checksum(&values[..36]), base);
    assert_eq!(checksum(&values), base);
}

/// The budget keeps the latest updates (the last one whatever its size); a version that
/// jumps, or an update it cannot describe, empties it; only a contiguous run to now encodes.
#[test]
fn the_log_keeps_its_budget_and_its_versions_contiguous() {
    let push = [0u8; 400];
    let mut log = UpdateLog::new(1000);
    let weights = [1.0f32; 4];
    for from in 0..5 {
        log.record(from, recorded(wire(&push)), &weights);
    }
    assert_eq!(log.len(), 2);
    let mut out = Vec::new();
    assert!(log.encode_since(3, 5, None, &mut out));
    assert_eq!(out[0], FORM_UPDATES);
    assert_eq!(u32::from_le_bytes([out[1], out[2], out[3], out[4]]), 2);
    assert!(
        log.encode_since(5, 5, None, &mut out),
        "nothing new: no updates"
    );
    assert!(!log.encode_since(2, 5, None, &mut out), "before the log");
    assert!(!log.encode_since(3, 6, None, &mut out), "not up to now");
    assert!(!log.encode_since(6, 5, None, &mut out), "from the future");
    let huge = [0u8; 5000];
    log.record(5, recorded(wire(&huge)), &weights);
    assert_eq!(log.len(), 1, "the latest, over the budget on its own");
    log.record_skip(9, &weights);
    assert!(
        !log.encode_since(5, 10, None, &mut out),
        "the version jumped"
    );
    assert!(log.encode_since(9, 10, None, &mut out));
    log.record(10, recorded(Source::Unknown), &weights);
    assert!(log.is_empty());
}
