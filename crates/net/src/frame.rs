//! The frame: a 16-byte header (magic, protocol version, message kind, payload length, all
//! little-endian) and a payload of at most a limit the receiver chooses from the layout.

use thiserror::Error;

/// "PSTR" on the wire.
pub const MAGIC: u32 = u32::from_le_bytes(*b"PSTR");
/// Bumped on any incompatible change; peers with different versions refuse each other.
pub const PROTOCOL_VERSION: u16 = 13;
pub const HEADER_LEN: usize = 16;

#[derive(Debug, Error, PartialEq, Eq)]
pub enum FrameError {
    #[error("bad magic {0:#010x}: not a pstrain peer{hint}", hint = stranger_hint(*.0))]
    BadMagic(u32),
    #[error("protocol version {theirs}, this build speaks {ours}")]
    Version { ours: u16, theirs: u16 },
    #[error("payload of {len} bytes exceeds the {limit}-byte limit")]
    TooLarge { len: u64, limit: u64 },
}

/// What a peer whose first bytes are not pstrain's most likely is (a port mixed up with
/// another service's is the usual cause), or nothing.
fn stranger_hint(magic: u32) -> &'static str {
    let bytes = magic.to_le_bytes();
    match &bytes {
        b"HTTP" => {
            " (it answered in HTTP: a web server, such as a shard's metrics page, not its port)"
        }
        b"GET " | b"POST" | b"HEAD" | b"PUT " | b"OPTI" => {
            " (it sent an HTTP request: a browser or scraper; a shard's live page and /metrics \
             are on its --metrics-addr)"
        }
        b"SSH-" => " (an SSH server)",
        [0x16, 0x03, ..] => {
            " (it speaks TLS: give every process of the run --tls-cert/--tls-key or --tls-ca \
             alike, or none of them)"
        }
        _ => "",
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    pub kind: u16,
    pub len: u64,
}

impl Header {
    pub fn encode(&self) -> [u8; HEADER_LEN] {
        let mut out = [0u8; HEADER_LEN];
        out[0..4].copy_from_slice(&MAGIC.to_le_bytes());
        out[4..6].copy_from_slice(&PROTOCOL_VERSION.to_le_bytes());
        out[6..8].copy_from_slice(&self.kind.to_le_bytes());
        out[8..16].copy_from_slice(&self.len.to_le_bytes());
        out
    }

    /// Checks magic, version and size before any payload byte is read or allocated.
    pub fn decode(bytes: &[u8; HEADER_LEN], limit: u64) -> Result<Header, FrameError> {
        let magic = u32::from_le_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]);
        if magic != MAGIC {
            return Err(FrameError::BadMagic(magic));
        }
        let version = u16::from_le_bytes([bytes[4], bytes[5]]);
        if version != PROTOCOL_VERSION {
            return Err(FrameError::Version {
                ours: PROTOCOL_VERSION,
                theirs: version,
            });
        }
        let kind = u16::from_le_bytes([bytes[6], bytes[7]]);
        let mut len = [0u8; 8];
        len.copy_from_slice(&bytes[8..16]);
        let len = u64::from_le_bytes(len);
        if len > limit {
            return Err(FrameError::TooLarge { len, limit });
        }
        Ok(Header { kind, len })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_rejections() {
        let h = Header { kind: 3, len: 42 };
        let bytes = h.encode();
        assert_eq!(Header::decode(&bytes, 100), Ok(h));
        assert_eq!(
            Header::decode(&bytes, 41),
            Err(FrameError::TooLarge { len: 42, limit: 41 })
        );
        let mut bad = bytes;
        bad[0] ^= 1;
        assert!(matches!(
            Header::decode(&bad, 100),
            Err(FrameError::BadMagic(_))
        ));
        let mut old = bytes;
        old[4..6].copy_from_slice(&(PROTOCOL_VERSION - 1).to_le_bytes());
        assert_eq!(
            Header::decode(&old, 100),
            Err(FrameError::Version {
                ours: PROTOCOL_VERSION,
                theirs: PROTOCOL_VERSION - 1
            })
        );
    }
}

#[cfg(test)]
mod stranger_tests {
    use super::*;

    fn first_bytes(bytes: &[u8; 4]) -> String {
        let mut header = [0u8; HEADER_LEN];
        header[..4].copy_from_slice(bytes);
        Header::decode(&header, 1).unwrap_err().to_string()
    }

    #[test]
    fn a_stranger_is_named_by_its_first_bytes_where_they_say_what_it_is() {
        assert!(first_bytes(b"HTTP").contains("answered in HTTP"));
        assert!(first_bytes(b"GET ").contains("--metrics-addr"));
        assert!(first_bytes(&[0x16, 0x03, 0x01, 0x02]).contains("speaks TLS"));
        assert!(first_bytes(b"SSH-").contains("SSH server"));
        assert_eq!(
            first_bytes(b"abcd"),
            "bad magic 0x64636261: not a pstrain peer"
        );
    }
}
