//! A run's checkpoint manifest: the file of every shard that together make one consistent
//! point of the run (run id, version, each file's checksum and seal), itself sealed in a run
//! with a token (see `seal.rs`). It is written last and
//! atomically, by whichever shard finds the set complete after writing its own file, so a
//! crash of any or all shards at any moment leaves only complete points behind.
//!
//! `ROOT/manifest-VERSION.RUN.json` names `ROOT/shard-I-of-S/ckpt-VERSION.RUN.safetensors`
//! for every I. Every shard snapshots at the same versions (update-count checkpoints are taken at
//! multiples of the interval), so in sync mode a point is one step of the whole model and in
//! async mode one round: each shard's state after the same number of its own updates.

use crate::atomic::write_atomically;
use crate::checkpoint::{CheckpointHeader, ShardIdentity, StoreError};
use crate::folder::CheckpointDir;
use crate::seal::{seal_matches, Digest, FileKey};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

const FORMAT: &str = "pstrain-run-manifest/1";
/// A manifest file larger than this is not read (a real one is well under 1 KiB per shard).
const MAX_MANIFEST_BYTES: u64 = 4 << 20;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Manifest {
    pub format: String,
    pub run_id: String,
    pub version: u64,
    pub shards: usize,
    pub model: String,
    /// The layout fingerprint, hex.
    pub fingerprint: String,
    /// The run's plan as the shards recorded it.
    pub config: String,
    /// One entry per shard, in shard order.
    pub files: Vec<ManifestEntry>,
    /// With a run token: the seal over the manifest as written without this field.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub seal: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ManifestEntry {
    pub shard: usize,
    /// Relative to the checkpoint root.
    pub file: String,
    pub range_start: usize,
    pub range_end: usize,
    pub crc32: String,
    /// The file's seal, with a run token.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub seal: Option<String>,
}

impl Manifest {
    /// `ROOT/manifest-VERSION.RUN.json`.
    pub fn path(root: &Path, run_id: &str, version: u64) -> PathBuf {
        root.join(format!("manifest-{version:012}.{run_id}.json"))
    }

    /// The manifests under `root`, newest version first.
    pub fn list(root: &Path) -> Vec<(u64, PathBuf)> {
        let Ok(entries) = std::fs::read_dir(root) else {
            return Vec::new();
        };
        let mut found: Vec<(u64, PathBuf)> = entries
            .flatten()
            .filter_map(|e| {
                let name = e.file_name().to_string_lossy().into_owned();
                let v = crate::folder::parse_versioned(&name, "manifest-", ".json")?;
                Some((v, e.path()))
            })
            .collect();
        found.sort_by_key(|f| std::cmp::Reverse(f.0));
        found
    }

    /// Reads a manifest, which must carry `key`'s seal if one is given.
    pub fn read(path: &Path, key: Option<&FileKey>) -> Result<Self, StoreError> {
        let invalid = |why: String| StoreError::Invalid {
            path: path.to_owned(),
            why,
        };
        let io = |source| StoreError::Io {
            path: path.to_owned(),
            source,
        };
        let bytes = crate::read_at_most(path, MAX_MANIFEST_BYTES).map_err(io)?;
        let m: Manifest =
            serde_json::from_slice(&bytes).map_err(|e| invalid(format!("not a manifest: {e}")))?;
        if m.format != FORMAT {
            return Err(invalid(format!(
                "format `{}`, expected `{FORMAT}`",
                m.format
            )));
        }
        let in_order = m.files.iter().enumerate().all(|(i, f)| f.shard == i);
        if m.files.len() != m.shards || !in_order {
            return Err(invalid(format!(
                "{} shards but entries for {:?}",
                m.shards,
                m.files.iter().map(|f| f.shard).collect::<Vec<_>>()
            )));
        }
        if m.files.iter().any(|f| !is_plain_relative(&f.file)) {
            return Err(invalid("a file name leaves the checkpoint folder".into()));
        }
        if let Some(expected) = m.seal_with(key) {
            if !seal_matches(&expected, m.seal.as_deref()) {
                return Err(StoreError::Unsealed {
                    path: path.to_owned(),
                });
            }
        }
        Ok(m)
    }

    /// The seal `key` gives this manifest: over its JSON without the seal field.
    fn seal_with(&self, key: Option<&FileKey>) -> Option<String> {
        let unsealed = Manifest {
            seal: None,
            ..self.clone()
        };
        let mut digest = Digest::new(Some(key?));
        digest.update(&serde_json::to_vec(&unsealed).unwrap_or_default());
        digest.finish().seal
    }

    /// This shard's entry, if the manifest is for `identity`'s run, model and shard count.
    pub fn entry_for(&self, identity: &ShardIdentity) -> Option<&ManifestEntry> {
        let ours = self.run_id == identity.run_id
            && self.shards == identity.shards
            && self.fingerprint == format!("{:016x}", identity.fingerprint);
        self.files
            .get(identity.shard)
            .filter(|e| ours && (e.range_start..e.range_end) == identity.range)
    }

    /// Every shard's file is there with the header the manifest recorded (same run, version
    /// and checksum): the test every shard applies alike, so all restore the same point.
    pub fn verify(&self, root: &Path) -> Result<(), StoreError> {
        for entry in &self.files {
            let path = root.join(&entry.file);
            let h = CheckpointHeader::read(&path)?;
            if h.identity.run_id != self.run_id
                || h.identity.shard != entry.shard
                || h.version != self.version
                || h.crc32 != entry.crc32
                || h.seal != entry.seal
            {
                return Err(StoreError::Mismatch {
                    path,
                    why: format!(
                        "manifest of version {} expects checksum {}, the file is version {} \
                         with {}",
                        self.version, entry.crc32, h.version, h.crc32
                    ),
                });
            }
        }
        Ok(())
    }

    /// Writes the manifest for `version` of `identity`'s run if every shard's file for that
    /// version is there and belongs to the run; returns its path if it did. Pruning is the
    /// writer's (`Saver`): it removes only manifests it wrote itself, so manifests someone
    /// else put in the folder can never push the run's own out.
    /// With `key`, every file must claim a seal, and the manifest is sealed.
    pub fn complete(
        root: &Path,
        identity: &ShardIdentity,
        version: u64,
        key: Option<&FileKey>,
    ) -> Result<Option<PathBuf>, StoreError> {
        let mut files = Vec::with_capacity(identity.shards);
        let mut first: Option<CheckpointHeader> = None;
        for shard in 0..identity.shards {
            let dir = CheckpointDir::for_shard(root, shard, identity.shards, 1);
            let Ok(h) = CheckpointHeader::read(&dir.file(&identity.run_id, version)) else {
                return Ok(None);
            };
            let id = &h.identity;
            if id.run_id != identity.run_id
                || id.shard != shard
                || id.shards != identity.shards
                || id.fingerprint != identity.fingerprint
                || h.version != version
                || (key.is_some() && h.seal.is_none())
            {
                return Ok(None);
            }
            files.push(ManifestEntry {
                shard,
                file: format!(
                    "shard-{shard}-of-{}/{}",
                    identity.shards,
                    CheckpointDir::file_name(&identity.run_id, version)
                ),
                range_start: id.range.start,
                range_end: id.range.end,
                crc32: h.crc32.clone(),
                seal: h.seal.clone(),
            });
            first.get_or_insert(h);
        }
        let Some(first) = first else {
            return Ok(None);
        };
        let mut manifest = Manifest {
            format: FORMAT.into(),
            run_id: identity.run_id.clone(),
            version,
            shards: identity.shards,
            model: first.model,
            fingerprint: format!("{:016x}", identity.fingerprint),
            config: first.config,
            files,
            seal: None,
        };
        manifest.seal = manifest.seal_with(key);
        let path = Manifest::path(root, &identity.run_id, version);
        let text = serde_json::to_vec_pretty(&manifest).map_err(|e| StoreError::Invalid {
            path: path.clone(),
            why: e.to_string(),
        })?;
        write_atomically(&path, |f| std::io::Write::write_all(f, &text)).map_err(|source| {
            StoreError::Io {
                path: path.clone(),
                source,
            }
        })?;
        Ok(Some(path))
    }
}

/// The points on which every shard's file verifies, newest first, of `identity`'s run (of
/// every run when `None`). Lazy: a point's files are verified only when it is reached, so a
/// caller taking the first good one verifies no more. Points passed over go to `problems`
/// (other runs' points are neither verified nor reported).
pub fn verified_points<'a>(
    root: &'a Path,
    identity: Option<&'a ShardIdentity>,
    key: Option<&'a FileKey>,
    problems: &'a mut Vec<StoreError>,
) -> impl Iterator<Item = Manifest> + 'a {
    Manifest::list(root)
        .into_iter()
        .filter_map(move |(named, path)| {
            let checked = Manifest::read(&path, key).and_then(|m| {
                if identity.is_some_and(|id| m.entry_for(id).is_none()) {
                    return Ok(None);
                }
                if m.version != named {
                    // A copy of another point's manifest under a later name (a replay).
                    return Err(StoreError::Invalid {
                        path: path.clone(),
                        why: format!("named for version {named}, holds version {}", m.version),
                    });
                }
                m.verify(root).map(|()| Some(m))
            });
            checked.unwrap_or_else(|e| {
                problems.push(e);
                None
            })
        })
}

/// The newest point of `identity`'s run on which every shard's file verifies.
pub fn newest_for(
    root: &Path,
    identity: &ShardIdentity,
    key: Option<&FileKey>,
) -> (Option<Manifest>, Vec<StoreError>) {
    let mut problems = Vec::new();
    let found = verified_points(root, Some(identity), key, &mut problems).next();
    (found, problems)
}

/// `shard-I-of-S/ckpt-V.RUN.safetensors`: no absolute paths, no `..`.
fn is_plain_relative(file: &str) -> bool {
    let p = Path::new(file);
    !file.is_empty()
        && p.components()
            .all(|c| matches!(c, std::path::Component::Normal(_)))
}

/// The runs whose checkpoints are under `root`, with the newest version seen of each (from
/// manifests and from every shard folder's file headers), newest first.
pub fn runs_in(root: &Path) -> Vec<(String, u64)> {
    let mut runs: std::collections::BTreeMap<String, u64> = Default::default();
    let mut note = |run: &str, v: u64| {
        let e = runs.entry(run.to_string()).or_insert(v);
        *e = (*e).max(v);
    };
    for (_, path) in Manifest::list(root) {
        // Listing only: nothing here is restored, so no key is needed to name the runs.
        if let Ok(m) = Manifest::read(&path, None) {
            note(&m.run_id, m.version);
        }
    }
    for h in shard_file_headers(root) {
        note(&h.identity.run_id, h.version);
    }
    let mut found: Vec<(String, u64)> = runs.into_iter().collect();
    found.sort_by_key(|(_, v)| std::cmp::Reverse(*v));
    found
}

/// The header of the newest checkpoint file of `run` under `root` (what it records of the
/// run's configuration and its shard count), for messages: read unverified, never restored
/// from.
pub fn newest_header_of_run(root: &Path, run: &str) -> Option<CheckpointHeader> {
    shard_file_headers(root)
        .filter(|h| h.identity.run_id == run)
        .max_by_key(|h| h.version)
}

/// The shard counts `run`'s checkpoint files under `root` were written for, smallest first.
pub fn shard_counts_of_run(root: &Path, run: &str) -> Vec<usize> {
    let counts: std::collections::BTreeSet<usize> = shard_file_headers(root)
        .filter(|h| h.identity.run_id == run)
        .map(|h| h.identity.shards)
        .collect();
    counts.into_iter().collect()
}

/// The headers of the checkpoint files in every shard folder under `root` that can be read.
fn shard_file_headers(root: &Path) -> impl Iterator<Item = CheckpointHeader> {
    let shard_dirs = std::fs::read_dir(root).into_iter().flatten().flatten();
    shard_dirs
        .filter(|e| e.file_name().to_string_lossy().starts_with("shard-"))
        .flat_map(|dir| {
            std::fs::read_dir(dir.path())
                .into_iter()
                .flatten()
                .flatten()
        })
        .filter_map(|file| CheckpointHeader::read(&file.path()).ok())
}
