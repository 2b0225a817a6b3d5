//! A run from Python: `run_worker` (one `pstrain worker`) and `RemoteRun`, the supervisor a
//! launcher that places the processes itself (the Ray driver) drives.

use crate::{err, lock};
use pstrain::facade::run_worker_from;
use pstrain::facade::supervisor;
use pyo3::prelude::*;
use std::sync::atomic::AtomicBool;
use std::sync::Mutex;

/// Runs one worker with the flags of `pstrain worker` until its work is done; returns its
/// report as JSON (the same line `pstrain worker` prints).
#[pyfunction]
#[pyo3(signature = (argv, token=None))]
pub(crate) fn run_worker(
    py: Python<'_>,
    argv: Vec<String>,
    token: Option<&str>,
) -> PyResult<String> {
    let stop = AtomicBool::new(false);
    let token = crate::token(token)?;
    let report = py
        .detach(|| run_worker_from(&argv, token, &stop))
        .map_err(err)?;
    serde_json::to_string(&report).map_err(err)
}

/// A `pstrain train` run whose processes a launcher places (the Ray driver): gives the flags
/// for shards and workers, supervises the shards, evaluates, prints progress and the summary.
#[pyclass(module = "pstrain._pstrain")]
pub(crate) struct RemoteRun {
    inner: Mutex<supervisor::RemoteRun>,
}

#[pymethods]
impl RemoteRun {
    #[new]
    fn new(py: Python<'_>, argv: Vec<String>) -> PyResult<Self> {
        let inner = py
            .detach(|| supervisor::RemoteRun::new(&argv))
            .map_err(err)?;
        Ok(RemoteRun {
            inner: Mutex::new(inner),
        })
    }

    #[getter]
    fn workers(&self) -> usize {
        lock(&self.inner).workers()
    }

    #[getter]
    fn shards(&self) -> usize {
        lock(&self.inner).shards()
    }

    /// Compute threads per worker.
    #[getter]
    fn threads(&self) -> usize {
        lock(&self.inner).threads()
    }

    /// The run's token (hex) for the shards and workers the launcher starts: hand it to them
    /// in memory, never on a command line or in a log.
    #[getter]
    fn token(&self) -> String {
        lock(&self.inner).token_hex()
    }

    /// Whether the shards write checkpoints (so a restarted shard can resume).
    #[getter]
    fn checkpointing(&self) -> bool {
        lock(&self.inner).checkpointing()
    }

    /// Flags for each shard's server (the whole run plan); add `--listen` and `--shard`.
    fn server_args(&self) -> Vec<String> {
        lock(&self.inner).server_args()
    }

    /// Flags for each worker (the plan comes from the shards); add `--servers` and `--rank`.
    fn worker_args(&self) -> Vec<String> {
        lock(&self.inner).worker_args()
    }

    /// Joins the shards as an observer (addresses in shard order); the clock starts here.
    fn connect(&self, py: Python<'_>, servers: Vec<String>) -> PyResult<()> {
        py.detach(|| lock(&self.inner).connect(servers))
            .map_err(err)
    }

    /// One progress sample, and a test-set evaluation when one is due.
    fn tick(&self, py: Python<'_>) -> PyResult<()> {
        py.detach(|| lock(&self.inner).tick()).map_err(err)
    }

    /// The final evaluation; prints the summary and returns it as JSON. `reports` are the
    /// workers' JSON reports; `stopped` says the run was cut short.
    #[pyo3(signature = (reports, stopped=false))]
    fn finish(&self, py: Python<'_>, reports: Vec<String>, stopped: bool) -> PyResult<String> {
        let summary = py
            .detach(|| lock(&self.inner).finish(&reports, stopped))
            .map_err(err)?;
        serde_json::to_string(&summary).map_err(err)
    }
}
