//! Writing a shard's checkpoints and coming back from them: the policy's files (when to save
//! is `pstrain_core::CheckpointSchedule`'s call), the run's manifest after each file, the
//! restore of the newest complete point of the run (else this shard's newest valid file),
//! and the "changed since the last save" rule.

use crate::checkpoint::{Checkpoint, CheckpointHeader, ShardIdentity, StoreError, TensorShapes};
use crate::folder::CheckpointDir;
use crate::manifest::{self, Manifest};
use crate::seal::FileKey;
use pstrain_core::{RestoreError, RunPlan, ShardSnapshot};
use std::path::PathBuf;
use std::time::Duration;

#[derive(Debug, Clone, PartialEq)]
pub struct CheckpointPolicy {
    /// The run the checkpoints belong to: files and manifests of other runs are never
    /// restored, pruned or completed.
    pub run_id: String,
    /// The run's checkpoint folder; each shard writes `shard-I-of-S/` below it.
    pub dir: PathBuf,
    /// Save after this many updates since the last save.
    pub every_updates: Option<u64>,
    /// Save when this long has passed since the last save.
    pub every: Option<Duration>,
    /// Files kept per shard.
    pub keep: usize,
    /// Start from the newest valid checkpoint (an error for `train --resume` if none).
    pub resume: bool,
    /// With a run token: the key files and manifests are sealed with, and without whose
    /// seal none is restored (see `seal.rs`).
    pub key: Option<FileKey>,
}

/// What a restore found.
#[derive(Debug)]
pub struct Restored {
    pub path: PathBuf,
    pub version: u64,
    /// Whether the file came from a complete manifest (every shard restores the same point)
    /// or is this shard's own newest file (no complete point of the run was found).
    pub from_manifest: bool,
    /// Newer files that were passed over, and why.
    pub skipped: Vec<StoreError>,
    /// The restored file's description of the run that wrote it (`Checkpoint::config`).
    pub config: String,
}

#[derive(Debug)]
pub enum ResumeError {
    /// No intact checkpoint of this shard; the damaged ones are listed.
    NothingValid {
        dir: PathBuf,
        skipped: Vec<StoreError>,
    },
    /// Nothing of this shard's, but the run's files were written for other shard counts
    /// (each file holds one shard's slice, so they cannot be restored here).
    OtherShardCount {
        root: PathBuf,
        run: String,
        shards: usize,
        found: Vec<usize>,
    },
    Restore {
        path: PathBuf,
        source: RestoreError,
        /// The file's description of the run that wrote it (`Checkpoint::config`).
        config: String,
    },
}

impl std::fmt::Display for ResumeError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ResumeError::NothingValid { dir, skipped } => {
                write!(f, "no valid checkpoint in {}", dir.display())?;
                for s in skipped {
                    write!(f, "; {s}")?;
                }
                Ok(())
            }
            ResumeError::OtherShardCount {
                root,
                run,
                shards,
                found,
            } => {
                let found: Vec<String> = found.iter().map(|n| n.to_string()).collect();
                write!(
                    f,
                    "{} holds run {run}'s checkpoints for {} shards, and this run has {shards}: \
                     a file holds one shard's slice of the model, so resume with the shard \
                     count the run had",
                    root.display(),
                    found.join(" and ")
                )
            }
            ResumeError::Restore { path, source, .. } => {
                write!(f, "{}: {source}", path.display())
            }
        }
    }
}

impl std::error::Error for ResumeError {}

impl ResumeError {
    /// The error, with what `plan` changed from the checkpoint's run when the file was intact
    /// but could not be restored (the likely cause: another optimizer, say).
    pub fn explained_for(&self, plan: &RunPlan) -> String {
        let changes = match self {
            ResumeError::Restore { config, .. } => plan.changes_since(config),
            ResumeError::NothingValid { .. } | ResumeError::OtherShardCount { .. } => None,
        };
        match changes {
            Some(changes) => format!(
                "{self} (this run changed {changes} from the checkpoint's run: resume with the \
                 checkpoint's flags, or start a fresh run)"
            ),
            None => self.to_string(),
        }
    }
}

pub struct Saver {
    policy: CheckpointPolicy,
    dir: CheckpointDir,
    identity: ShardIdentity,
    model: String,
    config: String,
    layout: TensorShapes,
    last_version: u64,
    /// The files this saver wrote, oldest first: the only ones it prunes, so foreign,
    /// damaged or higher-numbered files in the folder can never make it delete its own.
    written: std::collections::VecDeque<PathBuf>,
    /// The manifests this saver wrote, oldest first: likewise the only ones it prunes.
    manifests: std::collections::VecDeque<PathBuf>,
}

impl Saver {
    /// A saver of `identity`'s files; `model`, `config` and `layout` (the whole model's
    /// tensors) are recorded in every file for tools.
    pub fn new(
        policy: &CheckpointPolicy,
        identity: ShardIdentity,
        model: &str,
        config: String,
        layout: TensorShapes,
    ) -> Self {
        Saver {
            dir: CheckpointDir::for_shard(
                &policy.dir,
                identity.shard,
                identity.shards,
                policy.keep,
            ),
            policy: policy.clone(),
            identity,
            model: model.into(),
            config,
            layout,
            last_version: 0,
            written: std::collections::VecDeque::new(),
            manifests: std::collections::VecDeque::new(),
        }
    }

    pub fn policy(&self) -> &CheckpointPolicy {
        &self.policy
    }

    /// Makes this shard's folder and checks that it takes files, so that a folder that cannot
    /// (a file in its place, no space for a name, read-only) fails the start, not the first
    /// save a minute into the run.
    pub fn check_folder(&self) -> Result<(), StoreError> {
        let dir = self.dir.path();
        crate::atomic::check_writable(dir).map_err(|source| StoreError::Io {
            path: dir.to_owned(),
            source,
        })
    }

    /// Hands the checkpoint to continue from to `restore` (which puts it into the shard's
    /// engine or core). With `from_point` (the run, or part of it, is restarting: see
    /// `beacon.rs`) that is this shard's file of the newest complete point of the run, and its
    /// own files newer than that point are removed: they belong to a future the run has
    /// abandoned and must not complete a later manifest. Otherwise, or when the run has no
    /// complete point, it is this shard's own newest valid file.
    pub fn restore_into(
        &mut self,
        from_point: bool,
        restore: impl FnOnce(&ShardSnapshot) -> Result<(), RestoreError>,
    ) -> Result<Restored, ResumeError> {
        let root = self.policy.dir.clone();
        let key = self.policy.key.as_ref();
        let (mut skipped, mut unreadable) = (Vec::new(), Vec::new());
        let mut chosen = None;
        let metadata = crate::checkpoint::metadata_bound(&self.layout);
        // Only when restoring a point: listing and verifying manifests reads files.
        let points = from_point
            .then(|| manifest::verified_points(&root, Some(&self.identity), key, &mut skipped))
            .into_iter()
            .flatten();
        for m in points {
            let Some(entry) = m.entry_for(&self.identity) else {
                continue; // verified_points gives this run's points only
            };
            let path = root.join(&entry.file);
            match Checkpoint::read_for(&path, &self.identity, metadata, key) {
                Ok(c) if c.identity == self.identity && c.state.version == m.version => {
                    chosen = Some((path, c, true));
                    break;
                }
                Ok(c) => unreadable.push(StoreError::Mismatch {
                    path,
                    why: format!(
                        "{}; version {} where the manifest says {}",
                        crate::folder::unlike(&c, &self.identity),
                        c.state.version,
                        m.version
                    ),
                }),
                Err(e) => unreadable.push(e),
            }
        }
        skipped.append(&mut unreadable);
        if chosen.is_none() {
            let (found, mut problems) = self.dir.load_newest(&self.identity, metadata, key);
            skipped.append(&mut problems);
            chosen = found.map(|(p, c)| (p, c, false));
        }
        let Some((path, ckpt, from_manifest)) = chosen else {
            return Err(self.nothing_to_restore(root, skipped));
        };
        if let Err(source) = restore(&ckpt.state) {
            return Err(ResumeError::Restore {
                path,
                source,
                config: ckpt.config,
            });
        }
        let version = ckpt.state.version;
        self.last_version = version;
        for (v, newer) in self.dir.list().into_iter().filter(|_| from_manifest) {
            let ours = CheckpointHeader::read(&newer).is_ok_and(|h| h.identity == self.identity);
            if v > version && ours {
                let _ = std::fs::remove_file(newer);
            }
        }
        Ok(Restored {
            path,
            version,
            from_manifest,
            skipped,
            config: ckpt.config,
        })
    }

    /// Why nothing of this shard's could be restored: the run's files are there for other
    /// shard counts only, or none is valid.
    fn nothing_to_restore(&self, root: PathBuf, skipped: Vec<StoreError>) -> ResumeError {
        let run = &self.identity.run_id;
        let mut found = manifest::shard_counts_of_run(&root, run);
        found.retain(|&n| n != self.identity.shards);
        if found.is_empty() {
            return ResumeError::NothingValid {
                dir: self.dir.path().to_owned(),
                skipped,
            };
        }
        ResumeError::OtherShardCount {
            root,
            run: run.clone(),
            shards: self.identity.shards,
            found,
        }
    }

    /// Saves `state` unless nothing changed since the last save; returns the file written.
    pub fn save(&mut self, state: &ShardSnapshot) -> Result<Option<PathBuf>, StoreError> {
        if state.version <= self.last_version && self.last_version > 0 {
            return Ok(None);
        }
        let key = self.policy.key.as_ref();
        let checkpoint = Checkpoint {
            identity: self.identity.clone(),
            state: state.clone(),
            model: self.model.clone(),
            config: self.config.clone(),
            layout: self.layout.clone(),
        };
        let path = self.dir.save(&checkpoint, key)?;
        self.last_version = state.version;
        self.written.retain(|p| p != &path);
        self.written.push_back(path.clone());
        let root = &self.policy.dir;
        if let Some(manifest) = Manifest::complete(root, &self.identity, state.version, key)? {
            self.manifests.retain(|p| p != &manifest);
            self.manifests.push_back(manifest);
            while self.manifests.len() > self.dir.keep() {
                if let Some(old) = self.manifests.pop_front() {
                    let _ = std::fs::remove_file(old);
                }
            }
        }
        self.prune();
        Ok(Some(path))
    }

    /// Removes this writer's oldest files beyond `keep`, except the one the run's newest
    /// complete point needs (a slower shard may not have completed a newer one yet).
    fn prune(&mut self) {
        if self.written.len() <= self.dir.keep() {
            return;
        }
        let key = self.policy.key.as_ref();
        let (point, _) = manifest::newest_for(&self.policy.dir, &self.identity, key);
        let pinned = point
            .as_ref()
            .and_then(|m| m.entry_for(&self.identity))
            .map(|e| self.policy.dir.join(&e.file));
        let mut kept = std::collections::VecDeque::new();
        // The file just written (the last) is never a candidate.
        while self.written.len() + kept.len() > self.dir.keep() && self.written.len() > 1 {
            let Some(old) = self.written.pop_front() else {
                break;
            };
            if Some(&old) == pinned.as_ref() {
                kept.push_back(old);
            } else {
                let _ = std::fs::remove_file(old);
            }
        }
        for p in kept.into_iter().rev() {
            self.written.push_front(p);
        }
    }
}
