//! Writing a shard's checkpoints and coming back from them: the policy's files (when to save
//! is `pstrain_core::CheckpointSchedule`'s call), the newest-valid-checkpoint restore, and
//! the "changed since the last save" rule.

use crate::checkpoint::{Checkpoint, ShardIdentity, StoreError};
use crate::folder::CheckpointDir;
use pstrain_core::{CoreState, RestoreError};
use std::path::PathBuf;
use std::time::Duration;

#[derive(Debug, Clone, PartialEq)]
pub struct CheckpointPolicy {
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
}

/// What a restore found.
#[derive(Debug)]
pub struct Restored {
    pub path: PathBuf,
    pub version: u64,
    /// Newer files that were passed over, and why.
    pub skipped: Vec<StoreError>,
}

#[derive(Debug)]
pub enum ResumeError {
    /// No intact checkpoint of this shard; the damaged ones are listed.
    NothingValid {
        dir: PathBuf,
        skipped: Vec<StoreError>,
    },
    Restore {
        path: PathBuf,
        source: RestoreError,
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
            ResumeError::Restore { path, source } => write!(f, "{}: {source}", path.display()),
        }
    }
}

impl std::error::Error for ResumeError {}

pub struct Saver {
    policy: CheckpointPolicy,
    dir: CheckpointDir,
    identity: ShardIdentity,
    model: String,
    config: String,
    last_version: u64,
    /// The files this saver wrote, oldest first: the only ones it prunes, so foreign,
    /// damaged or higher-numbered files in the folder can never make it delete its own.
    written: std::collections::VecDeque<PathBuf>,
}

impl Saver {
    pub fn new(
        policy: &CheckpointPolicy,
        identity: ShardIdentity,
        model: &str,
        config: String,
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
            last_version: 0,
            written: std::collections::VecDeque::new(),
        }
    }

    pub fn policy(&self) -> &CheckpointPolicy {
        &self.policy
    }

    /// Hands the newest valid checkpoint of this shard to `restore` (which puts it into the
    /// shard's engine or core).
    pub fn restore_into(
        &mut self,
        restore: impl FnOnce(&CoreState) -> Result<(), RestoreError>,
    ) -> Result<Restored, ResumeError> {
        let (found, skipped) = self.dir.load_newest(&self.identity);
        let Some((path, ckpt)) = found else {
            return Err(ResumeError::NothingValid {
                dir: self.dir.path().to_owned(),
                skipped,
            });
        };
        restore(&ckpt.state).map_err(|source| ResumeError::Restore {
            path: path.clone(),
            source,
        })?;
        self.last_version = ckpt.state.version;
        Ok(Restored {
            path,
            version: ckpt.state.version,
            skipped,
        })
    }

    /// Saves `state` unless nothing changed since the last save; returns the file written.
    pub fn save(&mut self, state: &CoreState) -> Result<Option<PathBuf>, StoreError> {
        if state.version <= self.last_version && self.last_version > 0 {
            return Ok(None);
        }
        let path = self.dir.save(&Checkpoint {
            identity: self.identity.clone(),
            state: state.clone(),
            model: self.model.clone(),
            config: self.config.clone(),
        })?;
        self.last_version = state.version;
        self.written.retain(|p| p != &path);
        self.written.push_back(path.clone());
        while self.written.len() > self.dir.keep() {
            if let Some(old) = self.written.pop_front() {
                let _ = std::fs::remove_file(old);
            }
        }
        Ok(Some(path))
    }
}
