//! The safetensors format: an 8-byte little-endian header length, a JSON header naming each
//! tensor's dtype, shape and byte range (plus a `__metadata__` map of strings), then the data.
//! Only `F32` tensors are written and read here.

use serde_json::{json, Map, Value};
use std::collections::BTreeMap;
use std::io::Write;
use thiserror::Error;

/// A header larger than this is refused before it is read.
pub const MAX_HEADER: u64 = 100 << 20;

#[derive(Debug, Error, PartialEq, Eq)]
pub enum FormatError {
    #[error("file of {0} bytes is too short for a safetensors header")]
    TooShort(usize),
    #[error("header of {len} bytes does not fit ({why})")]
    HeaderSize { len: u64, why: &'static str },
    #[error("header is not valid JSON: {0}")]
    Json(String),
    #[error("tensor `{name}`: {why}")]
    Tensor { name: String, why: String },
    #[error("metadata: {0}")]
    Metadata(String),
}

pub struct TensorRef<'a> {
    pub name: &'a str,
    pub shape: Vec<usize>,
    pub data: &'a [f32],
}

#[derive(Debug, Clone, PartialEq)]
pub struct Tensor {
    pub name: String,
    pub shape: Vec<usize>,
    pub data: Vec<f32>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct SafeTensors {
    pub metadata: BTreeMap<String, String>,
    /// In file order.
    pub tensors: Vec<Tensor>,
}

impl SafeTensors {
    pub fn get(&self, name: &str) -> Option<&Tensor> {
        self.tensors.iter().find(|t| t.name == name)
    }
}

/// Writes the tensors back to back in the given order.
pub fn write<W: Write>(
    out: &mut W,
    tensors: &[TensorRef<'_>],
    metadata: &BTreeMap<String, String>,
) -> std::io::Result<()> {
    let mut header = Map::new();
    if !metadata.is_empty() {
        header.insert("__metadata__".into(), json!(metadata));
    }
    let mut offset = 0usize;
    for t in tensors {
        let bytes = std::mem::size_of_val(t.data);
        header.insert(
            t.name.to_string(),
            json!({"dtype": "F32", "shape": t.shape, "data_offsets": [offset, offset + bytes]}),
        );
        offset += bytes;
    }
    let mut text = serde_json::to_string(&Value::Object(header)).map_err(std::io::Error::other)?;
    // Pad so the data starts 8-byte aligned, as the reference implementation does.
    while (8 + text.len()) % 8 != 0 {
        text.push(' ');
    }
    out.write_all(&(text.len() as u64).to_le_bytes())?;
    out.write_all(text.as_bytes())?;
    for t in tensors {
        if cfg!(target_endian = "big") {
            for v in t.data {
                out.write_all(&v.to_le_bytes())?;
            }
        } else {
            out.write_all(bytemuck::cast_slice(t.data))?;
        }
    }
    Ok(())
}

/// Parses a whole file's bytes, checking every offset against the data actually present.
pub fn parse(bytes: &[u8]) -> Result<SafeTensors, FormatError> {
    let (header, data) = split_header(bytes)?;
    let mut metadata = BTreeMap::new();
    let mut tensors = Vec::new();
    for (name, entry) in header {
        if name == "__metadata__" {
            metadata = parse_metadata(entry)?;
        } else {
            tensors.push(parse_tensor(name, &entry, data)?);
        }
    }
    tensors.sort_by_key(|(begin, _)| *begin);
    Ok(SafeTensors {
        metadata,
        tensors: tensors.into_iter().map(|(_, t)| t).collect(),
    })
}

/// Only the `__metadata__` map of a file, reading its header and none of its data.
pub fn read_metadata(file: &mut impl std::io::Read) -> std::io::Result<BTreeMap<String, String>> {
    use std::io::Read;
    let invalid = |e: FormatError| std::io::Error::new(std::io::ErrorKind::InvalidData, e);
    let mut n = [0u8; 8];
    file.read_exact(&mut n)?;
    let len = u64::from_le_bytes(n);
    if len > MAX_HEADER {
        return Err(invalid(FormatError::HeaderSize {
            len,
            why: "over the limit",
        }));
    }
    let mut header = Vec::new();
    file.take(len).read_to_end(&mut header)?;
    if header.len() as u64 != len {
        return Err(invalid(FormatError::HeaderSize {
            len,
            why: "file is shorter",
        }));
    }
    let header: Value =
        serde_json::from_slice(&header).map_err(|e| invalid(FormatError::Json(e.to_string())))?;
    let Value::Object(mut map) = header else {
        return Err(invalid(FormatError::Json("header is not an object".into())));
    };
    match map.remove("__metadata__") {
        Some(m) => parse_metadata(m).map_err(invalid),
        None => Ok(BTreeMap::new()),
    }
}

/// The JSON header (checked for size before it is read) and the data bytes after it.
fn split_header(bytes: &[u8]) -> Result<(serde_json::Map<String, Value>, &[u8]), FormatError> {
    if bytes.len() < 8 {
        return Err(FormatError::TooShort(bytes.len()));
    }
    let mut n = [0u8; 8];
    n.copy_from_slice(&bytes[..8]);
    let len = u64::from_le_bytes(n);
    if len > MAX_HEADER {
        return Err(FormatError::HeaderSize {
            len,
            why: "over the limit",
        });
    }
    if 8 + len > bytes.len() as u64 {
        return Err(FormatError::HeaderSize {
            len,
            why: "file is shorter",
        });
    }
    let header: Value = serde_json::from_slice(&bytes[8..8 + len as usize])
        .map_err(|e| FormatError::Json(e.to_string()))?;
    let Value::Object(map) = header else {
        return Err(FormatError::Json("header is not an object".into()));
    };
    Ok((map, &bytes[8 + len as usize..]))
}

fn parse_metadata(entry: Value) -> Result<BTreeMap<String, String>, FormatError> {
    let Value::Object(m) = entry else {
        return Err(FormatError::Metadata("not an object".into()));
    };
    m.into_iter()
        .map(|(k, v)| match v {
            Value::String(v) => Ok((k, v)),
            _ => Err(FormatError::Metadata(format!(
                "value of `{k}` is not a string"
            ))),
        })
        .collect()
}

/// One tensor entry, with its values read from `data`; returns its first byte for ordering.
fn parse_tensor(name: String, entry: &Value, data: &[u8]) -> Result<(usize, Tensor), FormatError> {
    let bad = |why: String| FormatError::Tensor {
        name: name.clone(),
        why,
    };
    if entry["dtype"] != "F32" {
        return Err(bad(format!(
            "dtype {} (only F32 is supported)",
            entry["dtype"]
        )));
    }
    let shape: Vec<usize> = entry["shape"]
        .as_array()
        .ok_or_else(|| bad("no shape".into()))?
        .iter()
        .map(|d| d.as_u64().and_then(|d| usize::try_from(d).ok()))
        .collect::<Option<_>>()
        .ok_or_else(|| bad("shape is not a list of sizes".into()))?;
    let (begin, end) = entry["data_offsets"]
        .as_array()
        .filter(|o| o.len() == 2)
        .and_then(|o| {
            let at = |i: usize| o[i].as_u64().and_then(|v| usize::try_from(v).ok());
            Some((at(0)?, at(1)?))
        })
        .ok_or_else(|| bad("data_offsets is not [begin, end]".into()))?;
    let count = shape
        .iter()
        .try_fold(1usize, |a, &d| a.checked_mul(d))
        .ok_or_else(|| bad("shape overflows".into()))?;
    if begin > end || end > data.len() || end - begin != count.saturating_mul(4) {
        return Err(bad(format!(
            "byte range {begin}..{end} does not hold {count} f32 values in {} data bytes",
            data.len()
        )));
    }
    let values = data[begin..end]
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect();
    let tensor = Tensor {
        name,
        shape,
        data: values,
    };
    Ok((begin, tensor))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_damage() {
        let a = [1.0f32, -2.5, 3.25];
        let b = [0.5f32; 4];
        let meta: BTreeMap<String, String> = [("k".to_string(), "v".to_string())].into();
        let mut bytes = Vec::new();
        write(
            &mut bytes,
            &[
                TensorRef {
                    name: "a",
                    shape: vec![3],
                    data: &a,
                },
                TensorRef {
                    name: "b",
                    shape: vec![2, 2],
                    data: &b,
                },
            ],
            &meta,
        )
        .unwrap();
        let header_len = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
        assert_eq!((8 + header_len) % 8, 0);
        let st = parse(&bytes).unwrap();
        assert_eq!(st.metadata, meta);
        assert_eq!(st.get("a").unwrap().data, a.to_vec());
        assert_eq!(st.get("b").unwrap().shape, vec![2, 2]);
        assert!(parse(&bytes[..bytes.len() - 1]).is_err(), "truncated data");
        assert!(parse(&bytes[..20]).is_err(), "truncated header");
        let mut garbage = bytes.clone();
        garbage[10] = b'{';
        assert!(parse(&garbage).is_err());
        let mut huge = bytes.clone();
        huge[..8].copy_from_slice(&u64::MAX.to_le_bytes());
        assert!(parse(&huge).is_err());
    }
}
