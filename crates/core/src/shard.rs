//! Key-range sharding: which contiguous slice of the flat buffer each server shard owns.

use std::ops::Range;

/// Splits `len` elements into `shards` contiguous ranges whose sizes differ by at most one.
///
/// Balancing by element count (not by tensor) keeps shards even when one tensor dominates, as
/// `fc1.weight` does in the `cnn` model; a tensor may therefore straddle two shards. Returns an
/// empty list for zero shards; shards beyond `len` get empty ranges.
pub fn shard_ranges(len: usize, shards: usize) -> Vec<Range<usize>> {
    if shards == 0 {
        return Vec::new();
    }
    let base = len / shards;
    let extra = len % shards;
    let mut start = 0;
    (0..shards)
        .map(|i| {
            let size = base + usize::from(i < extra);
            let range = start..start + size;
            start += size;
            range
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges_cover_everything_once_and_are_balanced() {
        for len in [0usize, 1, 7, 1_199_882] {
            for shards in 1..=9 {
                let ranges = shard_ranges(len, shards);
                assert_eq!(ranges.len(), shards);
                assert_eq!(ranges[0].start, 0);
                assert_eq!(ranges.last().unwrap().end, len);
                for pair in ranges.windows(2) {
                    assert_eq!(pair[0].end, pair[1].start);
                }
                let sizes: Vec<usize> = ranges.iter().map(|r| r.len()).collect();
                let (min, max) = (sizes.iter().min().unwrap(), sizes.iter().max().unwrap());
                assert!(max - min <= 1, "{len} over {shards}: {sizes:?}");
            }
        }
        assert!(shard_ranges(10, 0).is_empty());
    }
}
