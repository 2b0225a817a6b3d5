//! What vouches for a file's contents: a CRC-32 always (against damage), and with a run
//! token an HMAC-SHA256 under a key derived from it (against whoever can write the folder:
//! without the token they cannot make a file, or a manifest, that a shard of the run accepts).

use hmac::{Hmac, Mac};
use sha2::Sha256;

/// The key a run's files are sealed with, derived from its token (`RunToken::file_key`).
#[derive(Clone, PartialEq, Eq)]
pub struct FileKey([u8; 32]);

impl std::fmt::Debug for FileKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the key itself: policies get printed.
        f.write_str("FileKey(..)")
    }
}

impl FileKey {
    /// A key from 32 secret bytes (the caller derives them from the run's token).
    pub fn new(bytes: [u8; 32]) -> Self {
        FileKey(bytes)
    }

    fn mac(&self) -> Hmac<Sha256> {
        <Hmac<Sha256> as Mac>::new_from_slice(&self.0)
            .unwrap_or_else(|_| unreachable!("HMAC accepts every key length"))
    }
}

/// A CRC-32 and, with a key, an HMAC over the same bytes, fed once.
pub(crate) struct Digest {
    crc: crc32fast::Hasher,
    mac: Option<Hmac<Sha256>>,
}

/// What a `Digest` computed: the CRC-32 and the seal (with a key), both as hex.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Sums {
    pub crc: String,
    pub seal: Option<String>,
}

impl Digest {
    pub fn new(key: Option<&FileKey>) -> Self {
        Digest {
            crc: crc32fast::Hasher::new(),
            mac: key.map(FileKey::mac),
        }
    }

    pub fn update(&mut self, bytes: &[u8]) {
        self.crc.update(bytes);
        if let Some(mac) = &mut self.mac {
            mac.update(bytes);
        }
    }

    /// `values` as little-endian bytes, without a copy where the machine is little-endian.
    pub fn update_f32(&mut self, values: &[f32]) {
        if cfg!(target_endian = "little") {
            self.update(bytemuck::cast_slice(values));
        } else {
            for v in values {
                self.update(&v.to_le_bytes());
            }
        }
    }

    pub fn finish(self) -> Sums {
        Sums {
            crc: format!("{:08x}", self.crc.finalize()),
            seal: self.mac.map(|m| hex(&m.finalize().into_bytes())),
        }
    }
}

/// Whether `stored` is the seal `key` gives `bytes`' digest, compared in constant time.
pub(crate) fn seal_matches(expected: &str, stored: Option<&str>) -> bool {
    let Some(stored) = stored else {
        return false;
    };
    let (a, b) = (expected.as_bytes(), stored.as_bytes());
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_seal_needs_the_key_and_the_same_bytes() {
        let sums = |key: Option<&FileKey>, bytes: &[u8]| {
            let mut d = Digest::new(key);
            d.update(bytes);
            d.finish()
        };
        let (k1, k2) = (FileKey::new([1; 32]), FileKey::new([2; 32]));
        let a = sums(Some(&k1), b"weights");
        assert_eq!(a.crc, sums(None, b"weights").crc);
        assert_eq!(sums(None, b"weights").seal, None);
        let seal = a.seal.clone().unwrap();
        assert_eq!(seal.len(), 64);
        assert!(seal_matches(&seal, Some(&seal)));
        assert!(!seal_matches(&seal, None));
        assert!(!seal_matches(
            &seal,
            sums(Some(&k2), b"weights").seal.as_deref()
        ));
        assert!(!seal_matches(
            &seal,
            sums(Some(&k1), b"weightz").seal.as_deref()
        ));
        assert!(!seal_matches(&seal, Some(&seal[..63])));
        assert!(!format!("{k1:?}").contains('1'), "Debug hides the key");
    }

    #[test]
    fn floats_digest_as_their_little_endian_bytes() {
        let values = [1.5f32, -0.0, f32::MAX];
        let mut a = Digest::new(Some(&FileKey::new([3; 32])));
        a.update_f32(&values);
        let mut b = Digest::new(Some(&FileKey::new([3; 32])));
        for v in values {
            b.update(&v.to_le_bytes());
        }
        assert_eq!(a.finish(), b.finish());
    }
}
