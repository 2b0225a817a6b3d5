//! `CheckpointArgs`: where and how often a process checkpoints, and the flags that reproduce
//! a checkpoint policy for a launched shard.

use crate::flags::seconds;
use crate::run::CheckpointPolicy;
use anyhow::{bail, Result};
use clap::Args;
use std::path::{Path, PathBuf};

/// Checkpoints kept per shard when `--keep-checkpoints` is not given.
const DEFAULT_KEEP: usize = 3;

#[derive(Args, Debug, Clone)]
pub struct CheckpointArgs {
    /// Write checkpoints (weights, optimizer state, version) under this folder
    #[arg(long)]
    pub checkpoint_dir: Option<PathBuf>,
    /// Checkpoint every N server updates
    #[arg(long)]
    pub checkpoint_every: Option<u64>,
    /// Checkpoint every S seconds [default: 60 when --checkpoint-dir is given]
    #[arg(long)]
    pub checkpoint_secs: Option<f64>,
    /// Checkpoints kept per shard [default: 3]
    #[arg(long)]
    pub keep_checkpoints: Option<usize>,
    /// The run the checkpoints belong to (other runs' files are refused) [default: train: a
    /// new id, or the resumed run's; server: derived from the run's token and plan]
    #[arg(long)]
    pub run_id: Option<String>,
}

impl CheckpointArgs {
    /// The policy for checkpoints under `dir` (else `--checkpoint-dir`), if any, for the run
    /// `run_id` names given the folder.
    pub fn policy(
        &self,
        dir: Option<&Path>,
        resume: bool,
        run_id: impl FnOnce(&Path) -> Result<String>,
    ) -> Result<Option<CheckpointPolicy>> {
        if let (Some(resumed), Some(other)) = (dir, self.checkpoint_dir.as_deref()) {
            let same = |p: &Path| std::fs::canonicalize(p).unwrap_or_else(|_| p.to_owned());
            if same(resumed) != same(other) {
                bail!(
                    "--resume {} keeps checkpointing in that folder; --checkpoint-dir {} would \
                     be ignored: give one of them (to continue in another folder, copy the \
                     first there and resume that)",
                    resumed.display(),
                    other.display()
                );
            }
        }
        let Some(dir) = dir.or(self.checkpoint_dir.as_deref()) else {
            // Said, and nowhere to act: refused rather than ignored.
            if let Some(flag) = self.given_without_a_folder() {
                bail!("{flag} needs --checkpoint-dir (the folder checkpoints go to)");
            }
            return Ok(None);
        };
        let every_secs = match (self.checkpoint_every, self.checkpoint_secs) {
            (None, None) => Some(60.0),
            (_, secs) => secs,
        };
        // 0 turns the time-based schedule off.
        let every = match every_secs {
            Some(0.0) | None => None,
            Some(s) => Some(seconds("--checkpoint-secs", s)?),
        };
        Ok(Some(CheckpointPolicy {
            run_id: run_id(dir)?,
            dir: dir.to_owned(),
            every_updates: self.checkpoint_every,
            every,
            keep: self.keep_checkpoints.unwrap_or(DEFAULT_KEEP).max(1),
            resume,
            // A shard with a run token seals with the token's key (see `pstrain_net`).
            key: None,
        }))
    }

    /// The first flag given that only means something with a checkpoint folder.
    fn given_without_a_folder(&self) -> Option<&'static str> {
        [
            ("--checkpoint-every", self.checkpoint_every.is_some()),
            ("--checkpoint-secs", self.checkpoint_secs.is_some()),
            ("--keep-checkpoints", self.keep_checkpoints.is_some()),
            ("--run-id", self.run_id.is_some()),
        ]
        .into_iter()
        .find_map(|(flag, given)| given.then_some(flag))
    }
}

/// The `pstrain server` flags that make a shard checkpoint (and restore) as `policy` says.
pub fn checkpoint_argv(policy: &CheckpointPolicy) -> Vec<String> {
    let mut a = vec![
        "--run-id".to_string(),
        policy.run_id.clone(),
        "--checkpoint-dir".to_string(),
        policy.dir.display().to_string(),
        "--keep-checkpoints".into(),
        policy.keep.to_string(),
    ];
    if let Some(n) = policy.every_updates {
        a.extend(["--checkpoint-every".into(), n.to_string()]);
    }
    // 0 turns the time-based schedule off (the server's default would be 60 s).
    let secs = policy.every.map_or(0.0, |d| d.as_secs_f64());
    a.extend(["--checkpoint-secs".into(), secs.to_string()]);
    a
}
