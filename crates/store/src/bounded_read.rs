//! Reading a small file a user or a folder names, up to a bound: a path that turns out to be
//! `/dev/zero`, a device, or a file far larger than its kind ever is gets a clear error
//! instead of a read that fills memory.

use std::io::Read;
use std::path::Path;

/// The bytes of `path` (links followed, as a user naming a file expects), refusing with
/// `InvalidData` a file longer than `most` bytes: it reads one byte past the bound, never
/// the whole of what it refuses.
pub fn read_at_most(path: &Path, most: u64) -> std::io::Result<Vec<u8>> {
    let mut bytes = Vec::new();
    std::fs::File::open(path)?
        .take(most.saturating_add(1))
        .read_to_end(&mut bytes)?;
    if bytes.len() as u64 > most {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("longer than {most} bytes, more than a file of this kind holds"),
        ));
    }
    Ok(bytes)
}

/// `read_at_most` as UTF-8 text.
pub fn read_text_at_most(path: &Path, most: u64) -> std::io::Result<String> {
    String::from_utf8(read_at_most(path, most)?).map_err(|_| {
        std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            "not UTF-8 text".to_string(),
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_file_within_the_bound_is_read_whole() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        std::fs::write(&path, b"12345").unwrap();
        assert_eq!(read_at_most(&path, 5).unwrap(), b"12345");
        assert_eq!(read_text_at_most(&path, 10).unwrap(), "12345");
    }

    #[test]
    fn a_longer_file_or_an_endless_device_is_refused_not_read_whole() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        std::fs::write(&path, b"123456").unwrap();
        let err = read_at_most(&path, 5).unwrap_err();
        assert_eq!(err.kind(), std::io::ErrorKind::InvalidData);
        assert!(err.to_string().contains("longer than 5 bytes"), "{err}");
        // An endless source: refused after reading a bound's worth, not run until memory ends.
        let err = read_at_most(Path::new("/dev/zero"), 1 << 20).unwrap_err();
        assert_eq!(err.kind(), std::io::ErrorKind::InvalidData);
    }

    #[test]
    fn text_that_is_not_utf8_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        std::fs::write(&path, [0xff, 0xfe]).unwrap();
        assert!(read_text_at_most(&path, 10)
            .unwrap_err()
            .to_string()
            .contains("not UTF-8"));
    }
}
