//! When to checkpoint a shard and how to come back: the policy (every N updates and/or every
//! T), the newest-valid-checkpoint restore, and the "changed since the last save" rule.

use crate::checkpoint::{Checkpoint, CheckpointDir, ShardIdentity, StoreError};
use pstrain_core::{CoreState, RestoreError, ServerCore};
use std::path::PathBuf;
use std::time::{Duration, Instant};

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
    last_time: Instant,
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
            last_time: Instant::now(),
        }
    }

    pub fn policy(&self) -> &CheckpointPolicy {
        &self.policy
    }

    /// Loads the newest valid checkpoint of this shard into `core`.
    pub fn restore_into(&mut self, core: &mut ServerCore) -> Result<Restored, ResumeError> {
        let (found, skipped) = self.dir.load_newest(&self.identity);
        let Some((path, ckpt)) = found else {
            return Err(ResumeError::NothingValid {
                dir: self.dir.path().to_owned(),
                skipped,
            });
        };
        core.restore(&ckpt.state)
            .map_err(|source| ResumeError::Restore {
                path: path.clone(),
                source,
            })?;
        self.last_version = ckpt.state.version;
        self.last_time = Instant::now();
        Ok(Restored {
            path,
            version: ckpt.state.version,
            skipped,
        })
    }

    /// Whether a save is due for a shard now at `version`.
    pub fn due(&self, version: u64) -> bool {
        version > self.last_version
            && (self
                .policy
                .every_updates
                .is_some_and(|n| version >= self.last_version + n)
                || self
                    .policy
                    .every
                    .is_some_and(|d| self.last_time.elapsed() >= d))
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
        self.last_time = Instant::now();
        Ok(Some(path))
    }
}
