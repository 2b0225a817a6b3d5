//! Checkpoints of one server shard: weights, optimizer state, version and counters in a
//! safetensors file whose metadata carries the run's identity and a CRC-32 of the contents.
//! A folder keeps the newest K; loading falls back past damaged files to the newest good one.

use crate::atomic::write_atomically;
use crate::safetensors::{self, FormatError, TensorRef};
use pstrain_core::{CoreState, ServerStats};
use std::collections::BTreeMap;
use std::ops::Range;
use std::path::{Path, PathBuf};
use thiserror::Error;

const FORMAT: &str = "pstrain-shard-checkpoint/1";
const CRC_KEY: &str = "pstrain.crc32";
const PARAMS: &str = "params";
const OPTIMIZER_PREFIX: &str = "optimizer.";

#[derive(Debug, Error)]
pub enum StoreError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: not a readable safetensors file: {source}")]
    Format { path: PathBuf, source: FormatError },
    #[error("{path}: checksum mismatch (stored {stored}, computed {computed}): damaged file")]
    Checksum {
        path: PathBuf,
        stored: String,
        computed: String,
    },
    #[error("{path}: {why}")]
    Invalid { path: PathBuf, why: String },
    #[error("{path}: belongs to another run ({why})")]
    Mismatch { path: PathBuf, why: String },
}

/// Who a checkpoint belongs to: a restart must find the same shard of the same model.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ShardIdentity {
    pub shard: usize,
    pub shards: usize,
    pub range: Range<usize>,
    pub fingerprint: u64,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Checkpoint {
    pub identity: ShardIdentity,
    pub state: CoreState,
    /// The model's name (`cnn`, `convnet`), so tools can rebuild its layout.
    pub model: String,
    /// Free-form description of the run's configuration, for people and tools.
    pub config: String,
}

fn crc_of(metadata: &BTreeMap<String, String>, tensors: &[(&str, &[usize], &[f32])]) -> String {
    let mut h = crc32fast::Hasher::new();
    for (k, v) in metadata.iter().filter(|(k, _)| k.as_str() != CRC_KEY) {
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
        for v in *data {
            h.update(&v.to_le_bytes());
        }
    }
    format!("{:08x}", h.finalize())
}

impl Checkpoint {
    pub fn write(&self, path: &Path) -> Result<(), StoreError> {
        let s = &self.state;
        let id = &self.identity;
        let mut meta: BTreeMap<String, String> = [
            ("format", FORMAT.to_string()),
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
        meta.insert(CRC_KEY.into(), crc_of(&meta, &for_crc));
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

    pub fn read(path: &Path) -> Result<Self, StoreError> {
        let bytes = std::fs::read(path).map_err(|source| StoreError::Io {
            path: path.to_owned(),
            source,
        })?;
        let st = safetensors::parse(&bytes).map_err(|source| StoreError::Format {
            path: path.to_owned(),
            source,
        })?;
        check_crc(path, &st)?;
        let meta = Meta {
            path,
            map: &st.metadata,
        };
        if meta.get("format")? != FORMAT {
            return Err(meta.invalid(format!(
                "format `{}`, expected `{FORMAT}`",
                meta.get("format")?
            )));
        }
        let fingerprint = u64::from_str_radix(meta.get("layout_fingerprint")?, 16)
            .map_err(|_| meta.invalid("bad layout_fingerprint".into()))?;
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
            .collect();
        let identity = ShardIdentity {
            shard: meta.index("shard")?,
            shards: meta.index("shards")?,
            range: meta.index("range_start")?..meta.index("range_end")?,
            fingerprint,
        };
        if identity.range.len() != params.len() {
            return Err(meta.invalid(format!(
                "range {:?} but {} parameters",
                identity.range,
                params.len()
            )));
        }
        Ok(Checkpoint {
            identity,
            state: CoreState {
                params,
                optimizer,
                optimizer_step: meta.num("optimizer_step")?,
                version: meta.num("version")?,
                stats: ServerStats {
                    version: meta.num("version")?,
                    gradients_applied: meta.num("gradients_applied")?,
                    samples_applied: meta.num("samples_applied")?,
                    ..Default::default()
                },
            },
            model: meta.get("model")?.clone(),
            config: meta.get("config")?.clone(),
        })
    }
}

/// The CRC-32 over everything must match the one stored in the metadata.
fn check_crc(path: &Path, st: &safetensors::SafeTensors) -> Result<(), StoreError> {
    let for_crc: Vec<(&str, &[usize], &[f32])> = st
        .tensors
        .iter()
        .map(|t| (t.name.as_str(), &t.shape[..], &t.data[..]))
        .collect();
    let computed = crc_of(&st.metadata, &for_crc);
    let stored = st.metadata.get(CRC_KEY).cloned().unwrap_or_default();
    if stored != computed {
        return Err(StoreError::Checksum {
            path: path.to_owned(),
            stored,
            computed,
        });
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

    fn index(&self, key: &str) -> Result<usize, StoreError> {
        usize::try_from(self.num(key)?)
            .map_err(|_| self.invalid(format!("metadata `{key}` is too large")))
    }
}

/// One shard's checkpoint folder: `ROOT/shard-I-of-S/ckpt-VERSION.safetensors`.
#[derive(Debug, Clone)]
pub struct CheckpointDir {
    dir: PathBuf,
    keep: usize,
}

impl CheckpointDir {
    pub fn for_shard(root: &Path, shard: usize, shards: usize, keep: usize) -> Self {
        CheckpointDir {
            dir: root.join(format!("shard-{shard}-of-{shards}")),
            keep: keep.max(1),
        }
    }

    pub fn path(&self) -> &Path {
        &self.dir
    }

    /// Checkpoint files, newest version first.
    pub fn list(&self) -> Vec<(u64, PathBuf)> {
        let Ok(entries) = std::fs::read_dir(&self.dir) else {
            return Vec::new();
        };
        let mut found: Vec<(u64, PathBuf)> = entries
            .flatten()
            .filter_map(|e| {
                let name = e.file_name().to_string_lossy().into_owned();
                let v = name
                    .strip_prefix("ckpt-")?
                    .strip_suffix(".safetensors")?
                    .parse()
                    .ok()?;
                Some((v, e.path()))
            })
            .collect();
        found.sort_by_key(|f| std::cmp::Reverse(f.0));
        found
    }

    /// Writes `ckpt` and removes all but the newest `keep` files.
    pub fn save(&self, ckpt: &Checkpoint) -> Result<PathBuf, StoreError> {
        std::fs::create_dir_all(&self.dir).map_err(|source| StoreError::Io {
            path: self.dir.clone(),
            source,
        })?;
        let path = self
            .dir
            .join(format!("ckpt-{:012}.safetensors", ckpt.state.version));
        ckpt.write(&path)?;
        for (_, old) in self.list().into_iter().skip(self.keep) {
            let _ = std::fs::remove_file(old);
        }
        Ok(path)
    }

    /// The newest checkpoint that reads back intact and belongs to `identity`; every file
    /// passed over is reported in the returned list of problems.
    pub fn load_newest(
        &self,
        identity: &ShardIdentity,
    ) -> (Option<(PathBuf, Checkpoint)>, Vec<StoreError>) {
        self.load_newest_where(|c| &c.identity == identity)
    }

    /// The newest intact checkpoint accepted by `accept`.
    pub fn load_newest_where(
        &self,
        accept: impl Fn(&Checkpoint) -> bool,
    ) -> (Option<(PathBuf, Checkpoint)>, Vec<StoreError>) {
        let mut problems = Vec::new();
        for (_, path) in self.list() {
            match Checkpoint::read(&path) {
                Ok(c) if accept(&c) => return (Some((path, c)), problems),
                Ok(c) => problems.push(StoreError::Mismatch {
                    path: path.clone(),
                    why: format!("saved for {:?}", c.identity),
                }),
                Err(e) => problems.push(e),
            }
        }
        (None, problems)
    }
}

/// A whole model put back together from the newest good checkpoint of every shard.
#[derive(Debug)]
pub struct Assembled {
    pub model: String,
    pub fingerprint: u64,
    pub params: Vec<f32>,
    /// Each shard's version (they can differ in async mode).
    pub versions: Vec<u64>,
    pub problems: Vec<StoreError>,
}

/// Reads `root/shard-I-of-S/` for every I of one S and joins the shards' weights.
pub fn assemble(root: &Path) -> Result<Assembled, StoreError> {
    let invalid = |why: String| StoreError::Invalid {
        path: root.to_owned(),
        why,
    };
    let entries = std::fs::read_dir(root).map_err(|source| StoreError::Io {
        path: root.to_owned(),
        source,
    })?;
    let mut counts: Vec<usize> = entries
        .flatten()
        .filter_map(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            let (_, s) = name.strip_prefix("shard-")?.split_once("-of-")?;
            s.parse().ok()
        })
        .collect();
    counts.sort_unstable();
    counts.dedup();
    let shards = match counts[..] {
        [s] if s > 0 => s,
        [] => return Err(invalid("no shard-I-of-S checkpoint folders".into())),
        _ => {
            return Err(invalid(format!(
                "checkpoints of several shard counts: {counts:?}"
            )))
        }
    };
    let mut parts = Vec::new();
    let mut problems = Vec::new();
    for shard in 0..shards {
        let dir = CheckpointDir::for_shard(root, shard, shards, 1);
        let (found, mut p) =
            dir.load_newest_where(|c| c.identity.shard == shard && c.identity.shards == shards);
        problems.append(&mut p);
        let (_, c) = found
            .ok_or_else(|| invalid(format!("no valid checkpoint for shard {shard} of {shards}")))?;
        parts.push(c);
    }
    let first = &parts[0];
    if parts
        .iter()
        .any(|c| c.identity.fingerprint != first.identity.fingerprint || c.model != first.model)
    {
        return Err(invalid("shards belong to different models".into()));
    }
    let mut params = Vec::new();
    for c in &parts {
        if c.identity.range.start != params.len() {
            return Err(invalid(format!(
                "shard {} does not start where the previous ended",
                c.identity.shard
            )));
        }
        params.extend_from_slice(&c.state.params);
    }
    Ok(Assembled {
        model: first.model.clone(),
        fingerprint: first.identity.fingerprint,
        params,
        versions: parts.iter().map(|c| c.state.version).collect(),
        problems,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ckpt(version: u64) -> Checkpoint {
        Checkpoint {
            identity: ShardIdentity {
                shard: 1,
                shards: 2,
                range: 10..14,
                fingerprint: 0xabc,
            },
            state: CoreState {
                params: vec![1.0, 2.0, 3.0, version as f32],
                optimizer: vec![
                    ("exp_avg".into(), vec![0.1; 4]),
                    ("exp_avg_sq".into(), vec![0.2; 4]),
                ],
                optimizer_step: version,
                version,
                stats: ServerStats {
                    version,
                    gradients_applied: 2 * version,
                    samples_applied: 64 * version,
                    ..Default::default()
                },
            },
            model: "convnet".into(),
            config: "{\"mode\":\"sync\"}".into(),
        }
    }

    #[test]
    fn keeps_the_newest_and_falls_back_past_damage() {
        let root = tempfile::tempdir().unwrap();
        let dir = CheckpointDir::for_shard(root.path(), 1, 2, 2);
        for v in [5, 10, 15] {
            dir.save(&ckpt(v)).unwrap();
        }
        let versions: Vec<u64> = dir.list().iter().map(|(v, _)| *v).collect();
        assert_eq!(versions, vec![15, 10], "only the newest two are kept");
        let id = ckpt(0).identity;
        let (found, problems) = dir.load_newest(&id);
        assert_eq!(found.unwrap().1, ckpt(15));
        assert!(problems.is_empty());

        // Flip one byte of the newest file's data: the checksum catches it, 10 is used.
        let newest = dir.list()[0].1.clone();
        let mut bytes = std::fs::read(&newest).unwrap();
        let n = bytes.len();
        bytes[n - 3] ^= 0x40;
        std::fs::write(&newest, &bytes).unwrap();
        let (found, problems) = dir.load_newest(&id);
        assert_eq!(found.unwrap().1.state.version, 10);
        assert!(
            matches!(problems[0], StoreError::Checksum { .. }),
            "{:?}",
            problems
        );

        // Truncate it instead: a format error, same fallback.
        std::fs::write(&newest, &bytes[..n / 2]).unwrap();
        let (found, problems) = dir.load_newest(&id);
        assert_eq!(found.unwrap().1.state.version, 10);
        assert!(
            matches!(problems[0], StoreError::Format { .. }),
            "{:?}",
            problems
        );

        // Another shard's identity matches nothing.
        let other = ShardIdentity { shard: 0, ..id };
        let (found, problems) = dir.load_newest(&other);
        assert!(found.is_none());
        assert!(problems
            .iter()
            .any(|p| matches!(p, StoreError::Mismatch { .. })));
    }
}
