//! Property tests of the IDX reader and the gzip layer in front of it: random bytes and
//! mutations of valid (and gzipped) IDX files give `Ok` or `Err`, never a panic, and no
//! allocation beyond a bound (the gzip layer's own limit for compressed input).

#[path = "../../../test-support/peak_alloc.rs"]
mod peak_alloc;

use peak_alloc::{mutate, Peak};
use proptest::prelude::*;
use pstrain_compute::idx::{encode_idx, gunzip_if_gzipped, parse_idx};
use pstrain_compute::idx_reader::IdxReader;
use std::io::Write;
use std::path::Path;

#[global_allocator]
static ALLOCATOR: Peak = Peak;

const IMAGES: u32 = 0x0803;
const LABELS: u32 = 0x0801;

fn valid_images() -> Vec<u8> {
    encode_idx(&[3, 4, 4], &(0..48).collect::<Vec<u8>>())
}

fn gzipped(bytes: &[u8]) -> Vec<u8> {
    let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    e.write_all(bytes).unwrap();
    e.finish().unwrap()
}

fn read_everything(input: &[u8]) {
    let path = Path::new("fuzz");
    for magic in [IMAGES, LABELS] {
        let _ = peak_alloc::bounded("idx", input, 4096, 16, |b| {
            parse_idx(b, path, magic, "fuzz")
        });
    }
    // Decompression may legitimately grow the input (up to the reader's limit): bound it by
    // what deflate can expand to, about 1032x.
    if let Ok(plain) = peak_alloc::bounded("gunzip", input, 1 << 16, 2064, |b| {
        gunzip_if_gzipped(b, path).map(|c| c.into_owned())
    }) {
        for magic in [IMAGES, LABELS] {
            let _ = parse_idx(&plain, path, magic, "fuzz");
        }
    }
}

/// The streaming reader on the same bytes, from a file: `Ok` or `Err`, never a panic, and
/// memory bounded by what the file holds (not by what its header claims).
fn stream_everything(input: &[u8], file: &Path) {
    std::fs::write(file, input).unwrap();
    for magic in [IMAGES, LABELS] {
        let _ = peak_alloc::bounded("stream", input, 1 << 17, 2064, |_| {
            IdxReader::open(file, magic, "fuzz").and_then(|r| r.read_all())
        });
        let _ = peak_alloc::bounded("stream picked", input, 1 << 17, 2064, |_| {
            IdxReader::open(file, magic, "fuzz").and_then(|r| r.read_picked(16, &[0, 2]))
        });
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 2_000, failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn the_streaming_reader_never_panics(
        gzip in any::<bool>(),
        edits in proptest::collection::vec((any::<usize>(), any::<u8>()), 0..6),
        cut in proptest::option::of(any::<usize>()),
    ) {
        let mut bytes = valid_images();
        if gzip {
            bytes = gzipped(&bytes);
        }
        let bytes = mutate(&bytes, &edits, cut, &[]);
        let dir = std::env::temp_dir().join(format!("pstrain-fuzz-idx-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        stream_everything(&bytes, &dir.join("f.idx"));
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 20_000, failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn random_bytes_never_panic(input in proptest::collection::vec(any::<u8>(), 0..400)) {
        read_everything(&input);
    }

    #[test]
    fn mutated_idx_files_never_panic(
        gzip in any::<bool>(),
        edits in proptest::collection::vec((any::<usize>(), any::<u8>()), 0..6),
        cut in proptest::option::of(any::<usize>()),
        tail in proptest::collection::vec(any::<u8>(), 0..16),
    ) {
        let base = if gzip { gzipped(&valid_images()) } else { valid_images() };
        read_everything(&mutate(&base, &edits, cut, &tail));
    }
}

#[test]
fn the_valid_files_parse() {
    let path = Path::new("valid");
    assert!(parse_idx(&valid_images(), path, IMAGES, "images").is_ok());
    let packed = gzipped(&valid_images());
    let plain = gunzip_if_gzipped(&packed, path).unwrap();
    assert!(parse_idx(&plain, path, IMAGES, "images").is_ok());
}
