//! A shard's checkpoint files: restore at start, a writer fed snapshots taken inside the
//! updates that reach the interval (file IO off the reactor), and the final save.

use super::shared::Shared;
use super::ShardConfig;
use crate::error::NetError;
use pstrain_core::{CoreState, ShardEngine};
use pstrain_store::{ResumeError, Saver, ShardIdentity};
use std::ops::Range;
use std::time::Duration;
use tokio::sync::mpsc;

/// The shard's saver, after restoring its newest valid checkpoint into `engine`. A folder
/// whose checkpoints this shard cannot use (damaged, another run's, or refused on restore)
/// is an error unless `cfg.fresh`: a restarted shard must not quietly reset the model.
pub(super) fn restore(
    cfg: &ShardConfig,
    range: &Range<usize>,
    engine: &mut ShardEngine,
) -> Result<Option<Saver>, NetError> {
    let Some(policy) = cfg.checkpoint.as_ref() else {
        return Ok(None);
    };
    let log = |msg: String| eprintln!("[shard {}] {msg}", cfg.shard);
    let identity = ShardIdentity {
        shard: cfg.shard,
        shards: cfg.shards,
        range: range.clone(),
        fingerprint: cfg.layout.fingerprint(),
    };
    let mut saver = Saver::new(policy, identity, &cfg.plan.model, format!("{:?}", cfg.plan));
    match saver.restore_into(|state| engine.restore(state, Duration::ZERO)) {
        Ok(r) => {
            for s in &r.skipped {
                log(format!("skipping checkpoint: {s}"));
            }
            log(format!(
                "restored {} (version {})",
                r.path.display(),
                r.version
            ));
        }
        Err(ResumeError::NothingValid { skipped, .. }) if skipped.is_empty() => {
            log("no checkpoint yet; starting from the initial weights".into());
        }
        Err(e) if cfg.fresh => log(format!(
            "cannot restore ({e}); --fresh: starting from the initial weights"
        )),
        Err(e) => {
            return Err(NetError::Restore(format!(
                "shard {} cannot use the checkpoints in {}: {e}. Move them aside, or start \
                 with --fresh to begin from the initial weights",
                cfg.shard,
                policy.dir.display()
            )))
        }
    }
    Ok(Some(saver))
}

/// The next snapshot handed over by a push; never ready without a queue.
pub(super) async fn next(queue: &mut Option<mpsc::Receiver<CoreState>>) -> Option<CoreState> {
    match queue {
        Some(q) => q.recv().await,
        None => std::future::pending().await,
    }
}

/// Writes `state` with file IO off the reactor; the saver comes back with the result.
pub(super) async fn write(shared: &Shared, saver: &mut Option<Saver>, state: CoreState) {
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
                Err(e) => shared.log(&format!("checkpoint failed: {e}")),
                Ok(Some(_)) => {
                    let now = std::time::Instant::now();
                    shared.lock().last_checkpoint = Some((now, now - started));
                }
                Ok(None) => {}
            }
            *saver = Some(s);
        }
        Err(e) => shared.log(&format!("checkpoint task failed: {e}")),
    }
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
