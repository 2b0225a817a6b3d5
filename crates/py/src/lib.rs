//! `pstrain._pstrain`: the Rust server shard, worker and client inside a Python process.
//!
//! Every call that waits (serving, training, pulling, pushing) releases the GIL, so Ray's
//! actor machinery and other Python threads keep running. Tensors go straight between numpy
//! memory and the socket: a pull writes into the returned array, a push sends the caller's.
//! The flags are the `pstrain` binary's, parsed by the same library modules.

mod client;
mod run;
mod shard;

use pyo3::create_exception;
use pyo3::exceptions::{PyRuntimeError, PyValueError};
use pyo3::prelude::*;
use std::sync::Mutex;

create_exception!(
    _pstrain,
    PstrainError,
    PyRuntimeError,
    "A pstrain operation failed (bad flags, unreachable or refusing servers, bad data)."
);

/// A failure as `PstrainError`: its causes on one line, each said once.
pub(crate) fn err(e: impl Into<anyhow::Error>) -> PyErr {
    PstrainError::new_err(pstrain::facade::one_line(&e.into()))
}

pub(crate) fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // A panic inside a call cannot leave these values half-updated in a way that matters
    // more than refusing every later call would.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// A positive number of seconds that `Duration` can hold.
pub(crate) fn seconds(name: &str, v: f64) -> PyResult<std::time::Duration> {
    pstrain::facade::seconds(name, v).map_err(|e| PyValueError::new_err(e.to_string()))
}

/// A run token from Python: the hex string given, else `PSTRAIN_TOKEN`, else none.
pub(crate) fn token(hex: Option<&str>) -> PyResult<Option<pstrain_net::RunToken>> {
    match hex {
        Some(h) => pstrain_net::RunToken::parse(h)
            .map(Some)
            .map_err(|e| PyValueError::new_err(e.to_string())),
        None => pstrain::facade::token_from_env().map_err(err),
    }
}

/// A new random run token (hex), as `pstrain token` prints.
#[pyfunction]
fn new_token() -> PyResult<String> {
    pstrain_net::RunToken::generate()
        .map(|t| t.to_hex())
        .map_err(err)
}

/// The help text of a `pstrain` subcommand (`train`, `server`, `worker`): the flags the
/// Python front ends take.
#[pyfunction]
fn help(command: &str) -> PyResult<String> {
    pstrain::facade::help(command)
        .ok_or_else(|| PyValueError::new_err(format!("no pstrain subcommand `{command}`")))
}

#[pymodule]
fn _pstrain(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add("PstrainError", m.py().get_type::<PstrainError>())?;
    m.add_class::<shard::ShardServer>()?;
    m.add_class::<run::RemoteRun>()?;
    m.add_class::<client::RawClient>()?;
    m.add_class::<client::LaneMemory>()?;
    m.add_function(wrap_pyfunction!(run::run_worker, m)?)?;
    m.add_function(wrap_pyfunction!(help, m)?)?;
    m.add_function(wrap_pyfunction!(new_token, m)?)?;
    Ok(())
}
