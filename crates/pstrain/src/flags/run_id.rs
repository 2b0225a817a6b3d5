//! Which run a checkpoint folder's files belong to: a new id for each `pstrain train` run, the
//! resumed run's id with `--resume`, and for `pstrain server` an id every shard of a run (and
//! every restart of one) derives alike from the run's token and plan, unless `--run-id`
//! names it. Files of another run are never restored (see `pstrain_store::manifest`).

use anyhow::{bail, Result};
use pstrain_core::RunPlan;
use pstrain_net::RunToken;
use std::path::Path;

/// A run id must be a short plain name: it goes into file names, metadata and messages.
pub fn validate(id: &str) -> Result<()> {
    if !pstrain_store::is_plain_run_id(id) {
        bail!("run id `{id}`: use 1 to 64 letters, digits, `-`, `_` or `.`, not starting with `.`");
    }
    Ok(())
}

/// A new run's id: 16 random hex digits.
pub fn fresh() -> Result<String> {
    let bytes = pstrain_net::auth::random_bytes::<8>()?;
    Ok(bytes.iter().map(|b| format!("{b:02x}")).collect())
}

/// The run `pstrain train` writes checkpoints for in `dir`: `given`, else the run it resumes
/// (`resume`), else a new one. A new run refuses a folder holding another run's checkpoints:
/// it would mix with them, and a later `--resume` could not tell which run to continue.
pub fn for_train(dir: &Path, given: Option<&str>, resume: bool) -> Result<String> {
    let runs = pstrain_store::runs_in(dir);
    if let Some(id) = given {
        validate(id)?;
        if resume && !runs.iter().any(|(r, _)| r == id) {
            bail!("{} holds no checkpoint of run {id}", dir.display());
        }
        if resume {
            refuse_a_model_of_ones_own(dir, id)?;
        }
        return Ok(id.to_string());
    }
    if resume {
        return match &runs[..] {
            [] => bail!("{} holds no checkpoint to resume", dir.display()),
            [(only, _)] => refuse_a_model_of_ones_own(dir, only).map(|()| only.clone()),
            [(newest, v), ..] => bail!(
                "{} holds checkpoints of {} runs ({}); say which to resume with --run-id \
                 (the newest, at version {v}, is {newest})",
                dir.display(),
                runs.len(),
                runs.iter()
                    .map(|(r, _)| r.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        };
    }
    if let Some((other, v)) = runs.first() {
        bail!(
            "{} already holds checkpoints of run {other} (up to version {v}): continue it \
             with --resume {}, or give this run another folder",
            dir.display(),
            dir.display()
        );
    }
    fresh()
}

/// `pstrain train` trains the built-in models: a run of a model served from Python (its
/// layout a module's) is resumed where it ran, not here, where it would be refused file by
/// file as "another run's".
fn refuse_a_model_of_ones_own(dir: &Path, run: &str) -> Result<()> {
    let header = pstrain_store::newest_header_of_run(dir, run);
    if header.is_some_and(|h| h.model == crate::launch::shard::CUSTOM_MODEL) {
        bail!(
            "{} holds run {run} of a model of your own, served from Python: `pstrain train` \
             trains the built-in models. Resume it where it ran, with the same folder \
             (`pstrain.Server(..., checkpoint_dir=...)` or `Server.from_module`)",
            dir.display()
        );
    }
    Ok(())
}

/// A shard whose run id was derived (no `--run-id`) and whose folder holds checkpoints of
/// another run only: refused naming that run and what this plan changed from it, since a
/// changed flag derives another id and the shard would otherwise refuse the files without
/// saying how to continue them.
pub fn refuse_unrelated_folder(
    dir: &Path,
    ours: &str,
    plan: &RunPlan,
    shards: usize,
) -> Result<()> {
    let runs = pstrain_store::runs_in(dir);
    let Some((other, version)) = runs
        .first()
        .filter(|_| !runs.iter().any(|(r, _)| r == ours))
    else {
        return Ok(());
    };
    let header = pstrain_store::newest_header_of_run(dir, other);
    let record = header.as_ref().map_or("", |h| h.config.as_str());
    let mut why = Vec::new();
    if let Some(theirs) = header.as_ref().map(|h| h.identity.shards) {
        if theirs != shards {
            why.push(format!(
                "it has {shards} shards where that run had {theirs}"
            ));
        }
    }
    if let Some(changes) = plan.changes_since(record) {
        why.push(format!("its plan changed {changes} from that run's"));
    }
    let why = if why.is_empty() {
        "its token differs from that run's (files sealed with a token are restored under \
         that token only: --token-file)"
            .to_string()
    } else {
        why.join(", and ")
    };
    bail!(
        "{} holds checkpoints of run {other} (up to version {version}), not of this shard's \
         run {ours}: a shard's run id derives from its token, plan and shard count, and {why}. \
         To continue run {other} with these flags, add --run-id {other}; to start over, \
         --fresh or another folder",
        dir.display()
    )
}

/// The run a `pstrain server` shard belongs to: `given`, else derived from the token and the
/// plan (the same for every shard of the run and every restart of one).
pub fn for_server(
    given: Option<&str>,
    token: Option<&RunToken>,
    plan: &RunPlan,
    shards: usize,
) -> Result<String> {
    if let Some(id) = given {
        validate(id)?;
        return Ok(id.to_string());
    }
    let context = format!("{plan:?} over {shards} shards");
    Ok(match token {
        Some(t) => t.derive_id(context.as_bytes()),
        None => format!("plan-{:016x}", fnv1a(context.as_bytes())),
    })
}

fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, &b| {
        (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_plain_names() {
        assert!(validate("run-7_a.b").is_ok());
        for bad in ["", "a/b", "../x", ".hidden", "a b", &"x".repeat(65)] {
            assert!(validate(bad).is_err(), "{bad:?}");
        }
        let a = fresh().unwrap();
        assert_eq!(a.len(), 16);
        assert_ne!(a, fresh().unwrap());
    }

    #[test]
    fn a_server_derives_the_same_id_per_run_and_another_for_another() {
        let token = RunToken::generate().unwrap();
        let plan = RunPlan::default();
        let id = for_server(None, Some(&token), &plan, 2).unwrap();
        assert_eq!(id, for_server(None, Some(&token), &plan, 2).unwrap());
        assert!(!id.contains(&token.to_hex()[..8]));
        let other_token = RunToken::generate().unwrap();
        assert_ne!(id, for_server(None, Some(&other_token), &plan, 2).unwrap());
        let other_plan = RunPlan {
            workers: plan.workers + 1,
            ..plan.clone()
        };
        assert_ne!(id, for_server(None, Some(&token), &other_plan, 2).unwrap());
        assert_eq!(for_server(Some("r1"), None, &plan, 2).unwrap(), "r1");
    }
}
