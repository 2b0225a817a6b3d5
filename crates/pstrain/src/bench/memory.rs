//! `pstrain bench`'s memory section: the default run of each model (in one process, and over
//! TCP with a shard and workers in processes of their own) run by this binary as a child, each
//! process's peak resident memory (and CPU time) read from the run's summary. A child,
//! because a process's peak only grows: the bench's own would include everything it
//! measured before.

use crate::report::usage::ProcessUsage;
use pstrain_compute::ModelKind;
use serde::Serialize;
use std::path::Path;
use std::process::Command;

#[derive(Debug, Clone, Serialize)]
pub struct MemoryRun {
    pub model: &'static str,
    /// `in-process` or `tcp`.
    pub transport: &'static str,
    pub updates: u64,
    pub processes: Vec<ProcessUsage>,
    /// All processes together.
    pub total_mb: f64,
}

/// Runs `pstrain train` with the default plan and each of `models` for `updates` updates
/// both ways.
pub fn measure(
    exe: &Path,
    data_dir: &Path,
    updates: u64,
    models: &[ModelKind],
) -> Result<Vec<MemoryRun>, std::io::Error> {
    let mut runs = Vec::new();
    for model in models {
        for transport in ["in-process", "tcp"] {
            runs.push(measure_one(exe, data_dir, updates, *model, transport)?);
        }
    }
    Ok(runs)
}

fn measure_one(
    exe: &Path,
    data_dir: &Path,
    updates: u64,
    model: ModelKind,
    transport: &'static str,
) -> Result<MemoryRun, std::io::Error> {
    let dir = tempfile_dir()?;
    let metrics = dir.join("run.jsonl");
    let mut cmd = Command::new(exe);
    cmd.args([
        "train",
        "--model",
        model.name(),
        "--iterations",
        &updates.to_string(),
        "--eval-every",
        "0",
    ])
    .arg("--metrics")
    .arg(&metrics)
    .arg("--data-dir")
    .arg(data_dir);
    if transport == "tcp" {
        cmd.args(["--transport", "tcp"]);
    }
    let out = cmd.output()?;
    let summary = std::fs::read_to_string(&metrics).ok().and_then(|text| {
        text.lines()
            .rev()
            .find_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
    });
    let _ = std::fs::remove_dir_all(&dir);
    let processes: Vec<ProcessUsage> = summary
        .and_then(|s| serde_json::from_value(s.get("processes")?.clone()).ok())
        .unwrap_or_default();
    if !out.status.success() || processes.is_empty() {
        return Err(std::io::Error::other(format!(
            "the {} {transport} run reported no memory: {}",
            model.name(),
            String::from_utf8_lossy(&out.stderr)
        )));
    }
    Ok(MemoryRun {
        model: model.name(),
        transport,
        updates,
        total_mb: processes.iter().map(|p| p.peak_rss_mb).sum(),
        processes,
    })
}

/// A fresh folder for one run's metrics file.
fn tempfile_dir() -> std::io::Result<std::path::PathBuf> {
    let dir = std::env::temp_dir().join(format!(
        "pstrain-bench-memory-{}-{}",
        std::process::id(),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos())
    ));
    std::fs::create_dir_all(&dir)?;
    Ok(dir)
}
