//! The IDX format (LeCun's MNIST container): a 4-byte magic `0 0 type ndims`, `ndims`
//! big-endian u32 dimensions, then the row-major data. Files may be gzipped.

use crate::error::DataError;
use flate2::read::MultiGzDecoder;
use std::borrow::Cow;
use std::io::Read;
use std::path::{Path, PathBuf};

/// Unsigned-byte element type, the one MNIST-style data sets use.
pub const TYPE_U8: u8 = 0x08;
/// Magic of an image file: unsigned bytes, 3 dimensions (count, rows, cols).
pub const IMAGES_MAGIC: u32 = 0x0000_0803;
/// Magic of a label file: unsigned bytes, 1 dimension (count).
pub const LABELS_MAGIC: u32 = 0x0000_0801;
/// Upper bound on a decompressed file, so a hostile gzip cannot exhaust memory.
pub const MAX_DECOMPRESSED: u64 = 2 << 30;

/// A decoded IDX array of unsigned bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IdxArray {
    pub magic: u32,
    pub dims: Vec<usize>,
    pub data: Vec<u8>,
}

/// Decompresses `raw` if it starts with the gzip magic, else borrows it as it is; `path` only
/// names the source in errors.
pub fn gunzip_if_gzipped<'a>(raw: &'a [u8], path: &Path) -> Result<Cow<'a, [u8]>, DataError> {
    if !raw.starts_with(&[0x1f, 0x8b]) {
        return Ok(Cow::Borrowed(raw));
    }
    let mut out = Vec::new();
    MultiGzDecoder::new(raw)
        .take(MAX_DECOMPRESSED + 1)
        .read_to_end(&mut out)
        .map_err(|source| DataError::Gzip {
            path: path.to_owned(),
            source,
        })?;
    if out.len() as u64 > MAX_DECOMPRESSED {
        return Err(DataError::TooLarge {
            path: path.to_owned(),
            limit: MAX_DECOMPRESSED,
        });
    }
    Ok(Cow::Owned(out))
}

/// Parses IDX bytes; `path` only names the source in errors.
pub fn parse_idx(
    bytes: &[u8],
    path: &Path,
    expected_magic: u32,
    what: &'static str,
) -> Result<IdxArray, DataError> {
    let bad = |reason: String| DataError::BadHeader {
        path: PathBuf::from(path),
        reason,
    };
    if bytes.len() < 4 {
        return Err(bad(format!(
            "{} bytes, shorter than the 4-byte magic",
            bytes.len()
        )));
    }
    let magic = u32::from_be_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]);
    if magic != expected_magic {
        return Err(DataError::WrongMagic {
            path: path.to_owned(),
            expected: expected_magic,
            found: magic,
            what,
        });
    }
    let ndims = usize::from(bytes[3]);
    let header_len = 4 + 4 * ndims;
    if bytes.len() < header_len {
        return Err(bad(format!(
            "header needs {header_len} bytes for {ndims} dimensions, file has {}",
            bytes.len()
        )));
    }
    let dims: Vec<usize> = bytes[4..header_len]
        .chunks_exact(4)
        .map(|c| u32::from_be_bytes([c[0], c[1], c[2], c[3]]) as usize)
        .collect();
    let expected = dims
        .iter()
        .try_fold(1u64, |acc, &d| acc.checked_mul(d as u64))
        .ok_or_else(|| bad(format!("dimensions {dims:?} overflow")))?;
    let found = (bytes.len() - header_len) as u64;
    if found != expected {
        return Err(DataError::wrong_size(path, expected, found));
    }
    Ok(IdxArray {
        magic,
        dims,
        data: bytes[header_len..].to_vec(),
    })
}

/// Serialises an unsigned-byte IDX array (for tests and tools that write data sets).
pub fn encode_idx(dims: &[u32], data: &[u8]) -> Vec<u8> {
    let mut out = vec![0, 0, TYPE_U8, dims.len() as u8];
    for d in dims {
        out.extend_from_slice(&d.to_be_bytes());
    }
    out.extend_from_slice(data);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p() -> &'static Path {
        Path::new("x.idx")
    }

    #[test]
    fn round_trips_and_validates() {
        let bytes = encode_idx(&[2, 2, 3], &[1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12]);
        let arr = parse_idx(&bytes, p(), IMAGES_MAGIC, "images").unwrap();
        assert_eq!(arr.dims, vec![2, 2, 3]);
        assert_eq!(arr.data.len(), 12);

        let err = parse_idx(&bytes[..bytes.len() - 1], p(), IMAGES_MAGIC, "images").unwrap_err();
        assert!(err.to_string().contains("truncated"), "{err}");
        let mut long = bytes.clone();
        long.push(0);
        let err = parse_idx(&long, p(), IMAGES_MAGIC, "images").unwrap_err();
        assert!(err.to_string().contains("trailing"), "{err}");
        let err = parse_idx(&bytes, p(), LABELS_MAGIC, "labels").unwrap_err();
        assert!(
            matches!(err, DataError::WrongMagic { found: 2051, .. }),
            "{err}"
        );
        let err = parse_idx(&bytes[..6], p(), IMAGES_MAGIC, "images").unwrap_err();
        assert!(matches!(err, DataError::BadHeader { .. }), "{err}");
        let err = parse_idx(&[0, 0], p(), IMAGES_MAGIC, "images").unwrap_err();
        assert!(matches!(err, DataError::BadHeader { .. }), "{err}");
    }

    #[test]
    fn huge_dimensions_are_an_error_not_an_allocation() {
        let bytes = encode_idx(&[u32::MAX, u32::MAX, u32::MAX], &[]);
        let err = parse_idx(&bytes, p(), IMAGES_MAGIC, "images").unwrap_err();
        assert!(matches!(
            err,
            DataError::BadHeader { .. } | DataError::WrongSize { .. }
        ));
    }
}
