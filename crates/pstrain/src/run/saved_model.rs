//! A run's model read back from its checkpoint folder (every shard's slice joined, the
//! layout checked against the model it names or the one its files record): what `pstrain
//! eval` and `pstrain export` start from.

use anyhow::{bail, Context, Result};
use pstrain_compute::ModelSpec;
use pstrain_core::Layout;
use std::path::Path;

/// The weights joined from every shard of a checkpoint folder (with the run's token, from
/// files sealed with its key only).
pub fn load_checkpoint(
    dir: &Path,
    token: &crate::flags::token::TokenArgs,
) -> Result<pstrain_store::Assembled> {
    let key = token.token()?.map(|t| t.file_key());
    let assembled = pstrain_store::assemble(dir, key.as_ref())?;
    for p in &assembled.problems {
        pstrain_observe::log_line!("skipping checkpoint: {p}");
    }
    let runs = pstrain_store::runs_in(dir);
    if runs.len() > 1 {
        let which = match &assembled.manifest {
            Some((run, version)) => {
                format!("run {run} at version {version}, the newest complete point")
            }
            None => format!(
                "each shard's newest file (versions {:?}): no run has a complete point",
                assembled.versions
            ),
        };
        pstrain_observe::log_line!(
            "note: {} holds checkpoints of {} runs; this is {which}",
            dir.display(),
            runs.len()
        );
    }
    Ok(assembled)
}

/// The built-in model a checkpoint folder holds, with its weights.
pub fn load_checkpoint_model(
    dir: &Path,
    token: &crate::flags::token::TokenArgs,
) -> Result<(ModelSpec, pstrain_store::Assembled)> {
    let assembled = load_checkpoint(dir, token)?;
    if assembled.model == crate::launch::shard::CUSTOM_MODEL {
        let names: Vec<&str> = assembled.layout.iter().map(|(n, _)| n.as_str()).collect();
        bail!(
            "{} holds a model of your own, served from Python ({} tensors: {}{}): `pstrain \
             eval` runs the built-in models only. `pstrain export --checkpoint {} --out \
             model.safetensors` writes its weights for your framework (PyTorch: \
             pstrain.torch.load_export)",
            dir.display(),
            names.len(),
            names[..names.len().min(4)].join(", "),
            if names.len() > 4 { ", ..." } else { "" },
            dir.display()
        );
    }
    let kind: ModelSpec = assembled
        .model
        .parse()
        .map_err(|e: String| anyhow::anyhow!("{}: {e}", dir.display()))?;
    checkpoint_layout(dir, &assembled)?;
    Ok((kind, assembled))
}

/// The layout of the model a checkpoint folder holds: a built-in model's, else the one the
/// files record (a model served from Python, e.g. a PyTorch module's parameters).
pub fn checkpoint_layout(dir: &Path, assembled: &pstrain_store::Assembled) -> Result<Layout> {
    let layout = match assembled.model.parse::<ModelSpec>() {
        Ok(kind) => kind.build(Default::default()).layout().clone(),
        Err(_) if !assembled.layout.is_empty() => {
            let shapes = assembled.layout.iter().map(|(n, s)| (n.clone(), &s[..]));
            Layout::new(shapes)
                .with_context(|| format!("{}: the recorded layout", dir.display()))?
        }
        Err(e) => bail!(
            "{}: {e}, and the files record no layout (written by an older pstrain)",
            dir.display()
        ),
    };
    check_layout(dir, &layout, assembled)?;
    Ok(layout)
}

fn check_layout(dir: &Path, layout: &Layout, assembled: &pstrain_store::Assembled) -> Result<()> {
    if layout.fingerprint() != assembled.fingerprint || layout.len() != assembled.params.len() {
        bail!(
            "{}: the checkpoint's layout does not match the model `{}`",
            dir.display(),
            assembled.model
        );
    }
    Ok(())
}
