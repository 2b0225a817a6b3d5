//! One server shard's checkpoint file: weights, optimizer state, version and counters in a
//! safetensors file whose metadata carries the run's identity, a CRC-32 of the contents and,
//! in a run with a token, their seal (see `seal.rs`). (The folder of them is `folder.rs`.)

use crate::atomic::write_atomically;
use crate::regular_file::open_regular;
use crate::safetensors::{self, TensorRef};
use crate::seal::{seal_matches, Digest, FileKey, Sums};
use pstrain_core::{ShardCounters, ShardSnapshot};
use std::collections::BTreeMap;
use std::ops::Range;
use std::path::Path;

const FORMAT: &str = "pstrain-shard-checkpoint/1";
const CRC_KEY: &str = "pstrain.crc32";
const SEAL_KEY: &str = "pstrain.seal";
const PARAMS: &str = "params";
const OPTIMIZER_PREFIX: &str = "optimizer.";

pub use crate::error::StoreError;

/// Who a checkpoint belongs to: a restart must find the same shard of the same model in the
/// same run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ShardIdentity {
    /// The run the file was written by: another run's files are never restored.
    pub run_id: String,
    pub shard: usize,
    pub shards: usize,
    pub range: Range<usize>,
    pub fingerprint: u64,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Checkpoint {
    pub identity: ShardIdentity,
    pub state: ShardSnapshot,
    /// The model's name (`cnn`, `convnet`), so tools can rebuild its layout.
    pub model: String,
    /// Free-form description of the run's configuration, for people and tools.
    pub config: String,
    /// The whole model's tensors (names and shapes, in layout order), so a tool can export a
    /// model it has no code for (empty when unknown).
    pub layout: TensorShapes,
}

/// Tensor names and shapes, in layout order.
pub type TensorShapes = Vec<(String, Vec<usize>)>;

/// The CRC-32 and (with a key) the seal over the metadata (but the sums themselves) and
/// every tensor's name, shape and values.
fn sums_of(
    metadata: &BTreeMap<String, String>,
    tensors: &[(&str, &[usize], &[f32])],
    key: Option<&FileKey>,
) -> Sums {
    let mut h = Digest::new(key);
    let covered = metadata
        .iter()
        .filter(|(k, _)| k.as_str() != CRC_KEY && k.as_str() != SEAL_KEY);
    for (k, v) in covered {
        h.update(k.as_bytes());
        h.update(&[0]);
        h.update(v.as_bytes());
        h.update(&[0]);
    }
    for (name, shape, data) in tensors {
        h.update(name.as_bytes());
        for d in *shape {
            h.update(&(*d as u64).to_le_bytes());
        }
        h.update_f32(data);
    }
    h.finish()
}

impl Checkpoint {
    /// Writes the file atomically, sealed with `key` if there is one.
    pub fn write(&self, path: &Path, key: Option<&FileKey>) -> Result<(), StoreError> {
        let s = &self.state;
        let id = &self.identity;
        let mut meta: BTreeMap<String, String> = [
            ("format", FORMAT.to_string()),
            ("run_id", id.run_id.clone()),
            ("version", s.version.to_string()),
            ("optimizer_step", s.optimizer_step.to_string()),
            ("shard", id.shard.to_string()),
            ("shards", id.shards.to_string()),
            ("range_start", id.range.start.to_string()),
            ("range_end", id.range.end.to_string()),
            ("layout_fingerprint", format!("{:016x}", id.fingerprint)),
            ("gradients_applied", s.stats.gradients_applied.to_string()),
            ("samples_applied", s.stats.samples_applied.to_string()),
            ("model", self.model.clone()),
            ("config", self.config.clone()),
            ("layout", layout_json(&self.layout)),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect();
        let names: Vec<String> = s
            .optimizer
            .iter()
            .map(|(n, _)| format!("{OPTIMIZER_PREFIX}{n}"))
            .collect();
        let mut tensors: Vec<(&str, Vec<usize>, &[f32])> =
            vec![(PARAMS, vec![s.params.len()], &s.params)];
        for (name, (_, values)) in names.iter().zip(&s.optimizer) {
            tensors.push((name, vec![values.len()], values));
        }
        let for_crc: Vec<(&str, &[usize], &[f32])> =
            tensors.iter().map(|(n, sh, d)| (*n, &sh[..], *d)).collect();
        let sums = sums_of(&meta, &for_crc, key);
        meta.insert(CRC_KEY.into(), sums.crc);
        if let Some(seal) = sums.seal {
            meta.insert(SEAL_KEY.into(), seal);
        }
        let refs: Vec<TensorRef<'_>> = tensors
            .iter()
            .map(|(name, shape, data)| TensorRef {
                name,
                shape: shape.clone(),
                data,
            })
            .collect();
        write_atomically(path, |f| {
            let mut w = std::io::BufWriter::new(f);
            safetensors::write(&mut w, &refs, &meta)?;
            std::io::Write::flush(&mut w)
        })
        .map_err(|source| StoreError::Io {
            path: path.to_owned(),
            source,
        })
    }

    /// Reads a checkpoint file: a regular file (no link, FIFO or device) of at most
    /// `DEFAULT_MAX_BYTES`, sealed with `key` if one is given.
    pub fn read(path: &Path, key: Option<&FileKey>) -> Result<Self, StoreError> {
        Self::read_bounded(path, DEFAULT_MAX_BYTES, key)
    }

    /// Reads `identity`'s checkpoint file, no larger than one of its slice can be with
    /// `metadata` bytes of names and records (`metadata_bound`).
    pub fn read_for(
        path: &Path,
        identity: &ShardIdentity,
        metadata: u64,
        key: Option<&FileKey>,
    ) -> Result<Self, StoreError> {
        Self::read_bounded(path, max_bytes_for(identity, metadata), key)
    }

    /// Reads a checkpoint file of at most `max` bytes.
    pub(crate) fn read_bounded(
        path: &Path,
        max: u64,
        key: Option<&FileKey>,
    ) -> Result<Self, StoreError> {
        let mut file = open_regular(path, max)?;
        let mut bytes = Vec::new();
        std::io::Read::read_to_end(&mut std::io::Read::take(&mut file, max), &mut bytes).map_err(
            |source| StoreError::Io {
                path: path.to_owned(),
                source,
            },
        )?;
        Self::from_bytes(&bytes, path, key)
    }

    /// Parses a checkpoint file's bytes, which must carry `key`'s seal if one is given;
    /// `path` only names the source in errors.
    pub fn from_bytes(
        bytes: &[u8],
        path: &Path,
        key: Option<&FileKey>,
    ) -> Result<Self, StoreError> {
        let st = safetensors::parse(bytes).map_err(|source| StoreError::Format {
            path: path.to_owned(),
            source,
        })?;
        check_sums(path, &st, key)?;
        let meta = Meta {
            path,
            map: &st.metadata,
        };
        let identity = meta.identity()?;
        let params = st
            .get(PARAMS)
            .ok_or_else(|| meta.invalid("no `params` tensor".into()))?
            .data
            .clone();
        let optimizer = st
            .tensors
            .iter()
            .filter_map(|t| {
                t.name
                    .strip_prefix(OPTIMIZER_PREFIX)
                    .map(|n| (n.to_string(), t.data.clone()))
            })
            .collect::<Vec<(String, Vec<f32>)>>();
        // Intact but unusable (the CRC matches the values, not their sense): refused here so
        // that a restore falls back past it to an older good file.
        let finite = |v: &[f32]| v.iter().all(|x| x.is_finite());
        if !finite(&params) {
            return Err(meta.invalid("the parameters hold NaN or infinite values".into()));
        }
        if let Some((name, _)) = optimizer.iter().find(|(_, v)| !finite(v)) {
            return Err(meta.invalid(format!(
                "optimizer state `{name}` holds NaN or infinite values"
            )));
        }
        if identity.range.len() != params.len() {
            return Err(meta.invalid(format!(
                "range {:?} but {} parameters",
                identity.range,
                params.len()
            )));
        }
        Ok(Checkpoint {
            identity,
            state: ShardSnapshot {
                params,
                optimizer,
                optimizer_step: meta.num("optimizer_step")?,
                version: meta.num("version")?,
                stats: ShardCounters {
                    version: meta.num("version")?,
                    gradients_applied: meta.num("gradients_applied")?,
                    samples_applied: meta.num("samples_applied")?,
                    ..Default::default()
                },
            },
            model: meta.get("model")?.clone(),
            config: meta.get("config")?.clone(),
            layout: meta.layout()?,
        })
    }
}

fn layout_json(layout: &TensorShapes) -> String {
    serde_json::to_string(layout).unwrap_or_else(|_| "[]".into())
}

/// What a checkpoint file's header says about it, read without its data (so a manifest can
/// be made without reading every shard's weights; the data is checked when restored).
#[derive(Debug, Clone, PartialEq)]
pub struct CheckpointHeader {
    pub identity: ShardIdentity,
    pub version: u64,
    /// The CRC-32 the file claims for its contents.
    pub crc32: String,
    /// The seal the file claims (checked when its data is read with the key).
    pub seal: Option<String>,
    pub model: String,
    pub config: String,
}

impl CheckpointHeader {
    pub fn read(path: &Path) -> Result<Self, StoreError> {
        let io = |source| StoreError::Io {
            path: path.to_owned(),
            source,
        };
        let mut file = open_regular(path, DEFAULT_MAX_BYTES)?;
        let map = safetensors::read_metadata(&mut file).map_err(io)?;
        let meta = Meta { path, map: &map };
        Ok(CheckpointHeader {
            identity: meta.identity()?,
            version: meta.num("version")?,
            crc32: meta.get(CRC_KEY)?.clone(),
            seal: map.get(SEAL_KEY).cloned(),
            model: meta.get("model")?.clone(),
            config: meta.get("config")?.clone(),
        })
    }
}

/// The largest checkpoint file read without a layout to bound it.
pub const DEFAULT_MAX_BYTES: u64 = 1 << 36;

/// The most a checkpoint of `identity`'s slice can take: its parameters and at most two
/// optimizer tensors as large (Adam's moments), `metadata` bytes for the model's names and
/// shapes (`metadata_bound`), plus a megabyte for the rest of the metadata.
pub fn max_bytes_for(identity: &ShardIdentity, metadata: u64) -> u64 {
    let values = identity.range.len() as u64;
    values
        .saturating_mul(4 * 3)
        .saturating_add(1 << 20)
        .saturating_add(metadata)
}

/// The most the record of `layout` (every tensor's name and shape) takes in a file's
/// metadata: a model of many tensors, or of long names, writes more than the fixed megabyte
/// (its JSON is escaped once more inside the header, each byte into at most six).
pub fn metadata_bound(layout: &TensorShapes) -> u64 {
    6 * layout_json(layout).len() as u64
}

/// The CRC-32 over everything must match the one stored in the metadata, and with a key so
/// must the seal.
fn check_sums(
    path: &Path,
    st: &safetensors::SafeTensors,
    key: Option<&FileKey>,
) -> Result<(), StoreError> {
    let for_sums: Vec<(&str, &[usize], &[f32])> = st
        .tensors
        .iter()
        .map(|t| (t.name.as_str(), &t.shape[..], &t.data[..]))
        .collect();
    let computed = sums_of(&st.metadata, &for_sums, key);
    let stored = st.metadata.get(CRC_KEY).cloned().unwrap_or_default();
    if stored != computed.crc {
        return Err(StoreError::Checksum {
            path: path.to_owned(),
            stored,
            computed: computed.crc,
        });
    }
    if let Some(seal) = computed.seal {
        if !seal_matches(&seal, st.metadata.get(SEAL_KEY).map(String::as_str)) {
            return Err(StoreError::Unsealed {
                path: path.to_owned(),
            });
        }
    }
    Ok(())
}

/// A checkpoint's metadata, with errors that name the file.
struct Meta<'a> {
    path: &'a Path,
    map: &'a BTreeMap<String, String>,
}

impl Meta<'_> {
    fn invalid(&self, why: String) -> StoreError {
        StoreError::Invalid {
            path: self.path.to_owned(),
            why,
        }
    }

    fn get(&self, key: &str) -> Result<&String, StoreError> {
        self.map
            .get(key)
            .ok_or_else(|| self.invalid(format!("metadata `{key}` is missing")))
    }

    fn num(&self, key: &str) -> Result<u64, StoreError> {
        self.get(key)?
            .parse()
            .map_err(|_| self.invalid(format!("metadata `{key}` is not a number")))
    }

    /// The format check and the file's identity.
    fn identity(&self) -> Result<ShardIdentity, StoreError> {
        if self.get("format")? != FORMAT {
            return Err(self.invalid(format!(
                "format `{}`, expected `{FORMAT}`",
                self.get("format")?
            )));
        }
        let run_id = self.map.get("run_id").ok_or_else(|| {
            self.invalid("no run id (written by an older pstrain); not restorable".into())
        })?;
        let fingerprint = u64::from_str_radix(self.get("layout_fingerprint")?, 16)
            .map_err(|_| self.invalid("bad layout_fingerprint".into()))?;
        Ok(ShardIdentity {
            run_id: run_id.clone(),
            shard: self.index("shard")?,
            shards: self.index("shards")?,
            range: self.index("range_start")?..self.index("range_end")?,
            fingerprint,
        })
    }

    /// The `layout` entry (older files have none: empty).
    fn layout(&self) -> Result<TensorShapes, StoreError> {
        match self.map.get("layout") {
            None => Ok(Vec::new()),
            Some(text) => serde_json::from_str(text)
                .map_err(|e| self.invalid(format!("metadata `layout` is not a layout: {e}"))),
        }
    }

    fn index(&self, key: &str) -> Result<usize, StoreError> {
        usize::try_from(self.num(key)?)
            .map_err(|_| self.invalid(format!("metadata `{key}` is too large")))
    }
}
