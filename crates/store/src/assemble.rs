//! A whole model assembled from its shards' checkpoints: the newest complete point a run's
//! manifests name, else every shard's newest good file.

use crate::checkpoint::{Checkpoint, StoreError};
use crate::folder::CheckpointDir;
use crate::manifest::{verified_points, Manifest};
use crate::seal::FileKey;
use std::path::Path;

/// A whole model put back together from the newest good checkpoint of every shard.
#[derive(Debug)]
pub struct Assembled {
    pub model: String,
    pub fingerprint: u64,
    pub params: Vec<f32>,
    /// Each shard's version (they can differ in async mode).
    pub versions: Vec<u64>,
    /// The model's tensors as the files record them (empty for files that do not).
    pub layout: crate::checkpoint::TensorShapes,
    /// The run and the manifest version the files came from; `None` when no complete point
    /// was found and each shard's newest file was taken.
    pub manifest: Option<(String, u64)>,
    pub problems: Vec<StoreError>,
}

/// The model of the newest complete point of any run under `root` (see `manifest.rs`), else
/// of the newest good file of every shard of one shard count; with `key`, only files and
/// manifests sealed with it count.
pub fn assemble(root: &Path, key: Option<&FileKey>) -> Result<Assembled, StoreError> {
    let (mut problems, mut unjoinable) = (Vec::new(), Vec::new());
    let mut found = None;
    for m in verified_points(root, None, key, &mut problems) {
        match assemble_point(root, &m, key) {
            Ok(a) => {
                found = Some(a);
                break;
            }
            Err(e) => unjoinable.push(e),
        }
    }
    problems.append(&mut unjoinable);
    if let Some(mut a) = found {
        a.problems = problems;
        return Ok(a);
    }
    let mut a = assemble_newest(root, key)?;
    problems.append(&mut a.problems);
    a.problems = problems;
    Ok(a)
}

/// The files `m` names, read whole and joined.
fn assemble_point(
    root: &Path,
    m: &Manifest,
    key: Option<&FileKey>,
) -> Result<Assembled, StoreError> {
    let mut parts = Vec::with_capacity(m.files.len());
    for entry in &m.files {
        let path = root.join(&entry.file);
        let c = Checkpoint::read(&path, key)?;
        if c.identity.run_id != m.run_id || c.state.version != m.version {
            return Err(StoreError::Mismatch {
                path,
                why: format!("not the file manifest {} names", m.version),
            });
        }
        parts.push(c);
    }
    let mut a = join(root, parts)?;
    a.manifest = Some((m.run_id.clone(), m.version));
    Ok(a)
}

/// Reads `root/shard-I-of-S/` for every I of one S and joins the shards' newest weights.
fn assemble_newest(root: &Path, key: Option<&FileKey>) -> Result<Assembled, StoreError> {
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
        let (found, mut p) = dir.load_newest_where(key, |c| {
            c.identity.shard == shard && c.identity.shards == shards
        });
        let Some((_, c)) = found else {
            let why: Vec<String> = p.iter().take(3).map(|e| e.to_string()).collect();
            return Err(invalid(match why.is_empty() {
                true => format!("no valid checkpoint for shard {shard} of {shards}"),
                false => format!(
                    "no valid checkpoint for shard {shard} of {shards}: {}",
                    why.join("; ")
                ),
            }));
        };
        problems.append(&mut p);
        parts.push(c);
    }
    let mut a = join(root, parts)?;
    a.problems = problems;
    Ok(a)
}

/// One model from its shards' checkpoints, in shard order.
fn join(root: &Path, parts: Vec<Checkpoint>) -> Result<Assembled, StoreError> {
    let invalid = |why: String| StoreError::Invalid {
        path: root.to_owned(),
        why,
    };
    let Some(first) = parts.first() else {
        return Err(invalid("no shards".into()));
    };
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
        layout: first.layout.clone(),
        manifest: None,
        problems: Vec::new(),
    })
}
