//! Little-endian field encoding for message bodies: a `Writer` that appends and a `Reader`
//! that refuses to read past the end or to leave bytes over.

use pstrain_core::{PullCodec, PushCodec};

/// Bytes that do not decode as the message they were read as: which message, and why.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("malformed {what}: {why}")]
pub struct Malformed {
    pub what: &'static str,
    pub why: String,
}

/// Appends little-endian fields.
#[derive(Default)]
pub struct Writer(pub Vec<u8>);

impl Writer {
    pub fn u8(&mut self, v: u8) -> &mut Self {
        self.0.push(v);
        self
    }
    pub fn u16(&mut self, v: u16) -> &mut Self {
        self.0.extend_from_slice(&v.to_le_bytes());
        self
    }
    pub fn u32(&mut self, v: u32) -> &mut Self {
        self.0.extend_from_slice(&v.to_le_bytes());
        self
    }
    pub fn u64(&mut self, v: u64) -> &mut Self {
        self.0.extend_from_slice(&v.to_le_bytes());
        self
    }
    pub fn f32(&mut self, v: f32) -> &mut Self {
        self.u32(v.to_bits())
    }
    pub fn str(&mut self, s: &str) -> &mut Self {
        self.u32(s.len() as u32);
        self.0.extend_from_slice(s.as_bytes());
        self
    }
}

/// Reads little-endian fields, refusing to read past the end.
pub struct Reader<'a> {
    bytes: &'a [u8],
    what: &'static str,
}

impl<'a> Reader<'a> {
    pub fn new(bytes: &'a [u8], what: &'static str) -> Self {
        Reader { bytes, what }
    }

    pub fn take(&mut self, n: usize) -> Result<&'a [u8], Malformed> {
        if self.bytes.len() < n {
            return Err(Malformed {
                what: self.what,
                why: format!("needs {n} more bytes, has {}", self.bytes.len()),
            });
        }
        let (head, rest) = self.bytes.split_at(n);
        self.bytes = rest;
        Ok(head)
    }
    pub fn u8(&mut self) -> Result<u8, Malformed> {
        Ok(self.take(1)?[0])
    }
    pub fn u16(&mut self) -> Result<u16, Malformed> {
        let b = self.take(2)?;
        Ok(u16::from_le_bytes([b[0], b[1]]))
    }
    pub fn u32(&mut self) -> Result<u32, Malformed> {
        let b = self.take(4)?;
        Ok(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    }
    pub fn u64(&mut self) -> Result<u64, Malformed> {
        let mut a = [0u8; 8];
        a.copy_from_slice(self.take(8)?);
        Ok(u64::from_le_bytes(a))
    }
    pub fn f32(&mut self) -> Result<f32, Malformed> {
        Ok(f32::from_bits(self.u32()?))
    }
    pub fn str(&mut self) -> Result<String, Malformed> {
        let n = self.u32()? as usize;
        let what = self.what;
        String::from_utf8(self.take(n)?.to_vec()).map_err(|_| Malformed {
            what,
            why: "string is not UTF-8".into(),
        })
    }
    /// Fails if bytes are left over: every message has an exact size.
    /// Bytes not yet read.
    pub fn remaining(&self) -> usize {
        self.bytes.len()
    }

    pub fn finish(&self) -> Result<(), Malformed> {
        if self.bytes.is_empty() {
            Ok(())
        } else {
            Err(Malformed {
                what: self.what,
                why: format!("{} trailing bytes", self.bytes.len()),
            })
        }
    }
}

impl Writer {
    pub fn bool(&mut self, v: bool) -> &mut Self {
        self.u8(u8::from(v))
    }
    /// `None` as u64::MAX.
    pub fn opt_u64(&mut self, v: Option<u64>) -> &mut Self {
        self.u64(v.unwrap_or(u64::MAX))
    }
    /// A push codec as its tag and parameter.
    pub fn push_codec(&mut self, c: PushCodec) -> &mut Self {
        let (tag, param) = c.to_tag();
        self.u8(tag).u16(param)
    }
    /// A pull codec as its tag and parameter.
    pub fn pull_codec(&mut self, c: PullCodec) -> &mut Self {
        let (tag, param) = c.to_tag();
        self.u8(tag).u16(param)
    }
}

impl Reader<'_> {
    pub fn bool(&mut self) -> Result<bool, Malformed> {
        match self.u8()? {
            0 => Ok(false),
            1 => Ok(true),
            other => Err(self.malformed(format!("{other} is not a boolean"))),
        }
    }
    pub fn opt_u64(&mut self) -> Result<Option<u64>, Malformed> {
        Ok(Some(self.u64()?).filter(|&v| v != u64::MAX))
    }
    /// A count or size that must fit this machine's `usize`.
    pub fn usize(&mut self) -> Result<usize, Malformed> {
        let v = self.u64()?;
        usize::try_from(v).map_err(|_| self.malformed(format!("{v} does not fit")))
    }
    pub fn push_codec(&mut self) -> Result<PushCodec, Malformed> {
        let (tag, param) = (self.u8()?, self.u16()?);
        PushCodec::from_tag(tag, param)
            .ok_or_else(|| self.malformed(format!("push codec {tag}:{param}")))
    }
    pub fn pull_codec(&mut self) -> Result<PullCodec, Malformed> {
        let (tag, param) = (self.u8()?, self.u16()?);
        PullCodec::from_tag(tag, param)
            .ok_or_else(|| self.malformed(format!("pull codec {tag}:{param}")))
    }
    pub fn malformed(&self, why: String) -> Malformed {
        Malformed {
            what: self.what,
            why,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fields_are_little_endian_and_reads_stop_at_the_end() {
        let mut w = Writer::default();
        w.u16(0x0102).u32(7).opt_u64(None).bool(true).str("ab");
        assert_eq!(
            w.0,
            [
                0x02, 0x01, 7, 0, 0, 0, 255, 255, 255, 255, 255, 255, 255, 255, 1, 2, 0, 0, 0,
                b'a', b'b'
            ]
        );
        let mut r = Reader::new(&w.0, "test");
        assert_eq!(r.u16().unwrap(), 0x0102);
        assert_eq!(r.u32().unwrap(), 7);
        assert_eq!(r.opt_u64().unwrap(), None);
        assert!(r.bool().unwrap());
        assert_eq!(r.str().unwrap(), "ab");
        r.finish().unwrap();
        assert!(r.u8().is_err());
        assert!(Reader::new(&[2], "test").bool().is_err());
        assert!(Reader::new(&[1, 0], "test").finish().is_err());
    }
}
