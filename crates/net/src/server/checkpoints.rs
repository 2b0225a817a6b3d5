//! A shard's checkpoint files: restore at start, a writer fed snapshots taken inside the
//! updates that reach the interval (file IO off the reactor), and the final save.

use super::shared::Shared;
use super::ShardConfig;
use crate::error::NetError;
use pstrain_core::{ShardEngine, ShardSnapshot};
use pstrain_store::{
    resume_from, Beacon, CheckpointDir, CheckpointPolicy, ResumeError, ResumeFrom, Saver,
    ShardIdentity,
};
use std::ops::Range;
use std::path::PathBuf;
use std::time::Duration;
use tokio::sync::mpsc;

/// How often a shard of a multi-shard run rewrites its beacon, and how long a restarting
/// shard watches its peers' (see `pstrain_store::beacon`).
const BEACON_EVERY: Duration = Duration::from_millis(250);
const BEACON_WATCH: Duration = Duration::from_millis(1200);

/// Whether this shard restores the run's newest complete point (sync, SSP: one step of the
/// model; async: one round, the same number of updates on every shard) rather than its own
/// newest file: only shards of a multi-shard run that have checkpoints, and only when their
/// peers are not all running on without them (then the whole run, or part of it, is
/// restarting and every shard must take one point; a shard restarting alone takes its own
/// newest file, losing the least).
pub(super) async fn restore_from_point(cfg: &ShardConfig) -> bool {
    let Some(policy) = cfg.checkpoint.as_ref() else {
        return false;
    };
    let first_start = CheckpointDir::for_shard(&policy.dir, cfg.shard, cfg.shards, 1)
        .list()
        .is_empty();
    if cfg.shards < 2 || first_start {
        return false;
    }
    let peers: Vec<PathBuf> = (0..cfg.shards)
        .filter(|&j| j != cfg.shard)
        .map(|j| Beacon::path(&policy.dir, &policy.run_id, j, cfg.shards))
        .collect();
    let read = || peers.iter().map(|p| Beacon::read(p)).collect::<Vec<_>>();
    let before = read();
    if before.iter().any(Option::is_none) {
        return true;
    }
    tokio::time::sleep(BEACON_WATCH).await;
    resume_from(&before, &read()) == ResumeFrom::RunPoint
}

/// This shard's beacon while it runs (multi-shard runs with checkpoints).
pub(super) struct Beaconing {
    path: PathBuf,
    beacon: Beacon,
    last: Option<std::time::Instant>,
}

impl Beaconing {
    pub(super) fn new(cfg: &ShardConfig, restored_point: Option<u64>) -> Option<Self> {
        let policy = cfg.checkpoint.as_ref().filter(|_| cfg.shards > 1)?;
        Some(Beaconing {
            path: Beacon::path(&policy.dir, &policy.run_id, cfg.shard, cfg.shards),
            beacon: Beacon {
                beat: 0,
                version: 0,
                restored_point,
                pid: std::process::id(),
            },
            last: None,
        })
    }

    /// Rewrites the beacon if it is due.
    pub(super) fn tick(&mut self, version: u64) {
        if self.last.is_some_and(|t| t.elapsed() < BEACON_EVERY) {
            return;
        }
        self.last = Some(std::time::Instant::now());
        self.beacon.beat += 1;
        self.beacon.version = version;
        // A beacon that cannot be written only makes a peer's restart take the run point.
        let _ = self.beacon.write(&self.path);
    }

    /// A shard that stops on its own leaves no beacon.
    pub(super) fn remove(self) {
        let _ = std::fs::remove_file(self.path);
    }
}

/// The shard's saver, after restoring its newest valid checkpoint (or, `from_point`, the
/// run's newest complete point) into `engine`, and the point restored if it was one. A
/// folder whose checkpoints this shard cannot use (damaged, another run's, or refused on
/// restore) is an error unless `cfg.fresh`: a restarted shard must not quietly reset the
/// model.
pub(super) fn restore(
    cfg: &ShardConfig,
    range: &Range<usize>,
    engine: &mut ShardEngine,
    from_point: bool,
) -> Result<(Option<Saver>, Option<u64>), NetError> {
    let Some(policy) = cfg.checkpoint.as_ref() else {
        return Ok((None, None));
    };
    let mut restored_point = None;
    let log = |msg: String| pstrain_observe::log_line!("[shard {}] {msg}", cfg.shard);
    let identity = ShardIdentity {
        run_id: policy.run_id.clone(),
        shard: cfg.shard,
        shards: cfg.shards,
        range: range.clone(),
        fingerprint: cfg.layout.fingerprint(),
    };
    // With a run token, files and manifests are sealed with its key, and only sealed ones
    // are restored: whoever can write the folder but lacks the token cannot choose them.
    let policy = &CheckpointPolicy {
        key: (policy.key.clone()).or_else(|| {
            let token = cfg.token.as_ref().filter(|_| cfg.seal_checkpoints);
            token.map(|t| t.file_key())
        }),
        ..policy.clone()
    };
    let mut saver = Saver::new(
        policy,
        identity,
        &cfg.plan.model,
        cfg.plan.record(),
        cfg.layout.shapes(),
    );
    match saver.restore_into(from_point, |state| engine.restore(state, Duration::ZERO)) {
        Ok(r) => {
            restored_point = r.from_manifest.then_some(r.version);
            for s in &r.skipped {
                log(format!("skipping checkpoint: {s}"));
            }
            let point = if r.from_manifest {
                "the run's newest complete point"
            } else {
                "this shard's newest file"
            };
            log(format!(
                "restored {} (version {}), {point}",
                r.path.display(),
                r.version
            ));
            if let Some(changes) = cfg.plan.changes_since(&r.config) {
                log(format!("changed from the checkpoint's run: {changes}"));
            }
        }
        Err(ResumeError::NothingValid { skipped, .. }) if skipped.is_empty() => {
            log("no checkpoint yet; starting from the initial weights".into());
        }
        Err(e) if cfg.fresh => log(format!(
            "cannot restore ({e}); --fresh: starting from the initial weights"
        )),
        Err(e) => {
            return Err(NetError::Restore(format!(
                "shard {} cannot use the checkpoints in {}: {}. Move them aside, or start \
                 with --fresh to begin from the initial weights",
                cfg.shard,
                policy.dir.display(),
                e.explained_for(&cfg.plan)
            )))
        }
    }
    // After the restore, whose refusals leave nothing behind (not even an empty folder).
    saver.check_folder().map_err(|e| {
        NetError::Restore(format!("shard {} cannot write checkpoints: {e}", cfg.shard))
    })?;
    Ok((Some(saver), restored_point))
}

/// The next snapshot handed over by a push; never ready without a queue.
pub(super) async fn next(
    queue: &mut Option<mpsc::Receiver<ShardSnapshot>>,
) -> Option<ShardSnapshot> {
    match queue {
        Some(q) => q.recv().await,
        None => std::future::pending().await,
    }
}

/// Writes `state` with file IO off the reactor; the saver comes back with the result.
pub(super) async fn write(shared: &Shared, saver: &mut Option<Saver>, state: ShardSnapshot) {
    let Some(mut s) = saver.take() else {
        return;
    };
    let started = std::time::Instant::now();
    let joined = tokio::task::spawn_blocking(move || {
        let result = s.save(&state);
        (s, result)
    })
    .await;
    match joined {
        Ok((s, result)) => {
            match result {
                Err(e) => failed(shared, &e.to_string()),
                Ok(Some(_)) => {
                    let now = std::time::Instant::now();
                    let mut state = shared.lock();
                    state.last_checkpoint = Some((now, now - started));
                    state.failures_in_a_row = 0;
                    state.checkpoint_error = None;
                }
                Ok(None) => {}
            }
            *saver = Some(s);
        }
        Err(e) => shared.log(&format!("checkpoint task failed: {e}")),
    }
}

/// Longest wait between two attempts after failed saves.
const MAX_BACKOFF: Duration = Duration::from_secs(60);

/// A save failed: count it, say so, and take no snapshot for 1, 2, 4 ... 60 s (a full or
/// broken disk is not retried in a loop, and no state is copied for a save that would fail).
fn failed(shared: &Shared, error: &str) {
    let mut state = shared.lock();
    state.checkpoint_failures += 1;
    state.failures_in_a_row = state.failures_in_a_row.saturating_add(1);
    state.checkpoint_error = Some(error.to_string());
    let doubling = 1u64 << (state.failures_in_a_row - 1).min(6);
    let wait = Duration::from_secs(doubling).min(MAX_BACKOFF);
    let until = shared.now() + wait;
    state.engine.hold_checkpoints(until);
    let in_a_row = state.failures_in_a_row;
    drop(state);
    shared.log(&format!(
        "checkpoint failed ({in_a_row} in a row): {error}; next attempt in {} s",
        wait.as_secs()
    ));
}

/// The checkpoint written when the shard stops; the error if it could not be written (the
/// process then exits non-zero: the run's end is not safely on disk).
pub(super) fn final_save(
    shared: &Shared,
    saver: Option<Saver>,
    engine: &ShardEngine,
) -> Option<String> {
    let mut saver = saver?;
    match saver.save(&engine.state()) {
        Ok(Some(path)) => {
            shared.log(&format!("checkpoint {}", path.display()));
            None
        }
        Ok(None) => None,
        Err(e) => {
            shared.log(&format!("final checkpoint failed: {e}"));
            Some(e.to_string())
        }
    }
}
