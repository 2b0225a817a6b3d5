//! Reading an IDX file as a stream: the header first (checked before any of the body is
//! decompressed), then the records one by one, keeping only those asked for. A worker that
//! trains on its own shard holds that shard and never the whole file, compressed or not.

use super::idx::MAX_DECOMPRESSED;
use crate::error::DataError;
use flate2::read::MultiGzDecoder;
use std::fs::File;
use std::io::{BufRead, BufReader, ErrorKind, Read};
use std::path::{Path, PathBuf};

/// The most one compressed byte can inflate to with deflate (about 1032x): what `read_all`
/// reserves at most per byte of a gzipped file before the bytes arrive.
const DEFLATE_RATIO: u64 = 1032;

/// How far past the body a stream is read for its end (and a gzip stream's checksum).
const TRAILING_LOOK: u64 = 1 << 20;

/// An open IDX file (plain or gzipped) whose header has been read and checked.
pub struct IdxReader {
    path: PathBuf,
    body: Box<dyn Read>,
    /// The most the body can hold, from the file's size (and deflate's ratio if gzipped).
    most: u64,
    /// The dimensions from the header.
    pub dims: Vec<usize>,
}

impl std::fmt::Debug for IdxReader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IdxReader")
            .field("path", &self.path)
            .field("dims", &self.dims)
            .finish()
    }
}

impl IdxReader {
    /// Opens `path` and reads its header: the magic must be `expected_magic` (`what` says
    /// what that is, for the error), and the body the dimensions promise at most the
    /// decompression limit. Refuses anything that is not a regular file.
    pub fn open(path: &Path, expected_magic: u32, what: &'static str) -> Result<Self, DataError> {
        let io = |source| DataError::Io {
            path: path.to_owned(),
            source,
        };
        let file = File::open(path).map_err(io)?;
        if !file.metadata().map_err(io)?.is_file() {
            return Err(DataError::BadHeader {
                path: path.to_owned(),
                reason: "not a regular file".into(),
            });
        }
        let file_len = file.metadata().map_err(io)?.len();
        let mut file = BufReader::new(file);
        let gzipped = file.fill_buf().map_err(io)?.starts_with(&[0x1f, 0x8b]);
        let most = if gzipped {
            file_len.saturating_mul(DEFLATE_RATIO)
        } else {
            file_len
        };
        let body: Box<dyn Read> = if gzipped {
            Box::new(MultiGzDecoder::new(file))
        } else {
            Box::new(file)
        };
        let mut reader = IdxReader {
            path: path.to_owned(),
            body,
            most,
            dims: Vec::new(),
        };
        reader.read_header(expected_magic, what)?;
        Ok(reader)
    }

    fn read_header(&mut self, expected_magic: u32, what: &'static str) -> Result<(), DataError> {
        let mut magic = [0u8; 4];
        let got = self.fill(&mut magic)?;
        if got < 4 {
            return Err(self.bad(format!("{got} bytes, shorter than the 4-byte magic")));
        }
        let found = u32::from_be_bytes(magic);
        if found != expected_magic {
            return Err(DataError::WrongMagic {
                path: self.path.clone(),
                expected: expected_magic,
                found,
                what,
            });
        }
        let ndims = usize::from(magic[3]);
        let mut raw = vec![0u8; 4 * ndims];
        let got = self.fill(&mut raw)?;
        if got < raw.len() {
            let header_len = 4 + raw.len();
            return Err(self.bad(format!(
                "header needs {header_len} bytes for {ndims} dimensions, file has {}",
                4 + got
            )));
        }
        self.dims = raw
            .chunks_exact(4)
            .map(|c| u32::from_be_bytes([c[0], c[1], c[2], c[3]]) as usize)
            .collect();
        let body = self.body_len()?;
        if body > MAX_DECOMPRESSED {
            let dims: Vec<String> = self.dims.iter().map(usize::to_string).collect();
            return Err(DataError::PromisesTooMuch {
                path: self.path.clone(),
                dims: dims.join(" x "),
                bytes: body,
                limit: MAX_DECOMPRESSED,
            });
        }
        Ok(())
    }

    /// The body's length in bytes, as the dimensions promise it.
    pub fn body_len(&self) -> Result<u64, DataError> {
        self.dims
            .iter()
            .try_fold(1u64, |acc, &d| acc.checked_mul(d as u64))
            .ok_or_else(|| self.bad(format!("dimensions {:?} overflow", self.dims)))
    }

    /// Reads the whole body. What it reserves is bounded by what the file can hold, not by
    /// what its header claims.
    pub fn read_all(mut self) -> Result<Vec<u8>, DataError> {
        let len = self.body_len()?;
        let mut data = Vec::with_capacity(len.min(self.most) as usize);
        (&mut self.body)
            .take(len)
            .read_to_end(&mut data)
            .map_err(|source| DataError::Gzip {
                path: self.path.clone(),
                source,
            })?;
        self.finish(data.len() as u64)?;
        Ok(data)
    }

    /// Reads the body as records of `record` bytes and keeps those in `picked` (record
    /// indices, any order, each at most once), in `picked`'s order. Every record is still
    /// read, so a truncated or overlong file is refused as `read_all` refuses it.
    pub fn read_picked(mut self, record: usize, picked: &[usize]) -> Result<Vec<u8>, DataError> {
        let body = self.body_len()?;
        if body > self.most {
            return Err(self.bad(format!(
                "the header promises {body} data bytes, more than the file can hold"
            )));
        }
        let records = if record == 0 { 0 } else { body / record as u64 };
        if record == 0 || records * record as u64 != body {
            return Err(self.bad(format!("the body is not whole records of {record} bytes")));
        }
        // Where each wanted record goes, in file order.
        let mut order: Vec<(usize, usize)> = picked.iter().copied().zip(0..).collect();
        order.sort_unstable();
        if let Some(&(index, _)) = order.iter().find(|&&(i, _)| i as u64 >= records) {
            return Err(self.bad(format!("record {index} asked for, the file has {records}")));
        }
        if order.windows(2).any(|w| w[0].0 == w[1].0) {
            return Err(self.bad("a record asked for twice".into()));
        }
        let mut out = vec![0u8; picked.len() * record];
        let mut scratch = vec![0u8; record];
        let mut wanted = order.iter().peekable();
        let mut read = 0u64;
        for index in 0..records as usize {
            let slot = match wanted.peek() {
                Some(&&(i, slot)) if i == index => {
                    wanted.next();
                    &mut out[slot * record..(slot + 1) * record]
                }
                _ => &mut scratch[..],
            };
            let got = self.fill(slot)?;
            read += got as u64;
            if got < record {
                break;
            }
        }
        self.finish(read)?;
        Ok(out)
    }

    /// After `read` body bytes: the body must be complete and nothing may follow it. The
    /// stream is read to its end (up to `TRAILING_LOOK` bytes more), so that a damaged gzip
    /// stream is reported as such (its checksum comes last) rather than as trailing bytes.
    fn finish(&mut self, read: u64) -> Result<(), DataError> {
        let expected = self.body_len()?;
        let mut found = read;
        if read >= expected {
            let mut rest = vec![0u8; 64 << 10];
            while found - expected < TRAILING_LOOK {
                match self.fill(&mut rest)? {
                    0 => break,
                    n => found += n as u64,
                }
            }
        }
        if found == expected {
            return Ok(());
        }
        Err(DataError::wrong_size(&self.path, expected, found))
    }

    /// Fills `buf` as far as the stream goes; returns how many bytes were read.
    fn fill(&mut self, buf: &mut [u8]) -> Result<usize, DataError> {
        let mut at = 0;
        while at < buf.len() {
            match self.body.read(&mut buf[at..]) {
                Ok(0) => break,
                Ok(n) => at += n,
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(source) => {
                    return Err(DataError::Gzip {
                        path: self.path.clone(),
                        source,
                    })
                }
            }
        }
        Ok(at)
    }

    fn bad(&self, reason: String) -> DataError {
        DataError::BadHeader {
            path: self.path.clone(),
            reason,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::idx::{encode_idx, IMAGES_MAGIC, LABELS_MAGIC};
    use flate2::write::GzEncoder;
    use std::io::Write;

    fn write(dir: &Path, name: &str, bytes: &[u8], gzip: bool) -> PathBuf {
        let path = dir.join(name);
        let bytes = if gzip {
            let mut enc = GzEncoder::new(Vec::new(), flate2::Compression::fast());
            enc.write_all(bytes).unwrap();
            enc.finish().unwrap()
        } else {
            bytes.to_vec()
        };
        std::fs::write(&path, bytes).unwrap();
        path
    }

    fn scratch(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("pstrain-idx-{name}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    #[test]
    fn picks_records_in_the_order_asked_plain_and_gzipped() {
        let dir = scratch("pick");
        // 5 records of 2x3 bytes: record r holds r*10 + 0..6.
        let data: Vec<u8> = (0..5u8)
            .flat_map(|r| (0..6).map(move |j| r * 10 + j))
            .collect();
        let bytes = encode_idx(&[5, 2, 3], &data);
        for gzip in [false, true] {
            let path = write(&dir, "a.idx", &bytes, gzip);
            let r = IdxReader::open(&path, IMAGES_MAGIC, "images").unwrap();
            assert_eq!(r.dims, vec![5, 2, 3]);
            let got = r.read_picked(6, &[3, 0, 4]).unwrap();
            let want: Vec<u8> = [3u8, 0, 4]
                .iter()
                .flat_map(|r| (0..6).map(move |j| r * 10 + j))
                .collect();
            assert_eq!(got, want, "gzip {gzip}");
            let all = IdxReader::open(&path, IMAGES_MAGIC, "images")
                .unwrap()
                .read_all()
                .unwrap();
            assert_eq!(all, data);
        }
        std::fs::remove_dir_all(dir).ok();
    }

    #[test]
    fn damaged_files_are_refused_by_name() {
        let dir = scratch("bad");
        let data = vec![7u8; 4 * 6];
        let bytes = encode_idx(&[4, 2, 3], &data);
        let cases: [(&str, Vec<u8>, &str); 5] = [
            ("truncated", bytes[..bytes.len() - 1].to_vec(), "truncated"),
            ("long", [&bytes[..], &[0]].concat(), "trailing"),
            ("short header", bytes[..10].to_vec(), "header needs"),
            ("tiny", bytes[..2].to_vec(), "shorter than"),
            (
                "huge dims",
                encode_idx(&[60_000, 65_536, 65_536], &[]),
                "limit",
            ),
        ];
        for gzip in [false, true] {
            for (what, b, says) in &cases {
                let path = write(&dir, "b.idx", b, gzip);
                let err = IdxReader::open(&path, IMAGES_MAGIC, "images")
                    .and_then(|r| r.read_picked(6, &[1, 2]))
                    .unwrap_err()
                    .to_string();
                assert!(err.contains(says), "{what} (gzip {gzip}): {err}");
                assert!(err.contains("b.idx"), "{what}: names the file: {err}");
            }
        }
        let path = write(&dir, "c.idx", &bytes, false);
        let err = IdxReader::open(&path, LABELS_MAGIC, "labels").unwrap_err();
        assert!(err.to_string().contains("expected magic"), "{err}");
        let err = IdxReader::open(&path, IMAGES_MAGIC, "images")
            .unwrap()
            .read_picked(6, &[4])
            .unwrap_err();
        assert!(err.to_string().contains("record 4"), "{err}");
        let err = IdxReader::open(&dir, IMAGES_MAGIC, "images").unwrap_err();
        assert!(err.to_string().contains("regular file"), "{err}");
        std::fs::remove_dir_all(dir).ok();
    }

    /// A gzip bomb's header promising more than the limit is refused before its body is
    /// inflated (the body here is never written: the header alone decides).
    #[test]
    fn an_oversized_body_is_refused_from_the_header() {
        let dir = scratch("bomb");
        let bytes = encode_idx(&[1 << 20, 64, 64], &[0; 16]);
        let path = write(&dir, "d.idx.gz", &bytes, true);
        let err = IdxReader::open(&path, IMAGES_MAGIC, "images").unwrap_err();
        assert!(matches!(err, DataError::PromisesTooMuch { .. }), "{err}");
        let said = err.to_string();
        assert!(
            said.contains("its header promises 1048576 x 64 x 64 (4294967296 bytes)"),
            "{said}"
        );
        std::fs::remove_dir_all(dir).ok();
    }
}
