//! `ShardServer`: one parameter-server shard (`pstrain server` flags, or a model of the
//! caller's own), serving from threads of its own through `ShardHandle`.

use crate::{err, lock, PstrainError};
use numpy::{PyArrayMethods, PyUntypedArrayMethods};
use pstrain::facade::{log_shard_report, parse_flags, shard_setup, CustomModel, ServerArgs};
use pstrain_core::{Layout, ShardCounters};
use pstrain_net::server::ConnectionEvents;
use pstrain_net::ShardHandle;
use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;
use pyo3::types::PyDict;
use std::sync::Mutex;
use std::time::Duration;

/// A shard's counters at the end of its run (its final weights are not kept here).
#[derive(Clone, Copy)]
struct FinalCounts {
    stats: ShardCounters,
    events: ConnectionEvents,
}

fn report_dict<'py>(py: Python<'py>, r: &FinalCounts) -> PyResult<Bound<'py, PyDict>> {
    let d = PyDict::new(py);
    let s = &r.stats;
    d.set_item("version", s.version)?;
    d.set_item("gradients_applied", s.gradients_applied)?;
    d.set_item("samples_applied", s.samples_applied)?;
    d.set_item("dropped_stale", s.dropped_stale)?;
    d.set_item("rejected_nonfinite", s.rejected_nonfinite)?;
    d.set_item("rejected_other", s.rejected_other)?;
    d.set_item("clipped", s.clipped)?;
    d.set_item("rolled_back", s.rolled_back)?;
    d.set_item("connections", r.events.accepted)?;
    d.set_item("refused_handshakes", r.events.refused_handshakes)?;
    d.set_item("protocol_errors", r.events.protocol_errors)?;
    d.set_item("vanished_workers", r.events.vanished_workers)?;
    Ok(d)
}

/// A custom model from `{name: array}` (dict order is the layout's order).
fn custom_model(params: &Bound<'_, PyDict>) -> PyResult<CustomModel> {
    let mut shapes: Vec<(String, Vec<usize>)> = Vec::new();
    let mut initial = Vec::new();
    for (name, value) in params.iter() {
        let name: String = name.extract()?;
        let array = value
            .cast::<numpy::PyArrayDyn<f32>>()
            .map_err(|_| {
                PyValueError::new_err(format!("parameter `{name}` must be a float32 numpy array"))
            })?
            .readonly();
        let values = array.as_array();
        // Weights that are not finite would only ever bring gradients every shard refuses.
        if let Some((at, v)) = values.iter().enumerate().find(|(_, v)| !v.is_finite()) {
            return Err(PyValueError::new_err(format!(
                "parameter `{name}` holds {v} at flat index {at}: initial weights must be finite"
            )));
        }
        shapes.push((name, array.shape().to_vec()));
        initial.extend(values.iter().copied());
    }
    let layout = Layout::new(shapes.iter().map(|(n, s)| (n.clone(), &s[..])))
        .map_err(|e| PyValueError::new_err(format!("parameters: {e}")))?;
    Ok(CustomModel { layout, initial })
}

/// One parameter-server shard, bound and serving from threads of its own.
///
/// `argv` takes the flags of `pstrain server`; `params` (name -> float32 array) serves a
/// model of the caller's instead of `--model`'s.
#[pyclass(frozen, module = "pstrain._pstrain")]
pub(crate) struct ShardServer {
    handle: ShardHandle,
    report: Mutex<Option<FinalCounts>>,
}

#[pymethods]
impl ShardServer {
    #[new]
    #[pyo3(signature = (argv, params=None, token=None))]
    fn new(
        py: Python<'_>,
        argv: Vec<String>,
        params: Option<&Bound<'_, PyDict>>,
        token: Option<&str>,
    ) -> PyResult<Self> {
        let custom = params.map(custom_model).transpose()?;
        let token = crate::token(token)?;
        let args = parse_flags::<ServerArgs>("server", &argv).map_err(err)?;
        let setup = shard_setup(&args, custom, token).map_err(err)?;
        let handle = py.detach(|| setup.start()).map_err(err)?;
        Ok(ShardServer {
            handle,
            report: Mutex::new(None),
        })
    }

    /// The address the shard is bound to (`host:port`; port 0 in `--listen` picks one).
    #[getter]
    fn address(&self) -> String {
        self.handle.address().to_string()
    }

    #[getter]
    fn shard(&self) -> usize {
        self.handle.shard()
    }

    /// The port of `/metrics` and the live page (with `--metrics-addr`), else `None`.
    #[getter]
    fn metrics_port(&self) -> Option<u16> {
        self.handle.metrics_address().map(|a| a.port())
    }

    /// Waits until the run is over (every worker has left) or `stop()` was called, at most
    /// `timeout` seconds; returns the shard's final counters, or None on timeout.
    #[pyo3(signature = (timeout=None))]
    fn wait<'py>(
        &self,
        py: Python<'py>,
        timeout: Option<f64>,
    ) -> PyResult<Option<Bound<'py, PyDict>>> {
        if let Some(r) = lock(&self.report).as_ref() {
            return report_dict(py, r).map(Some);
        }
        let limit = match timeout {
            Some(t) if t.is_finite() && (0.0..1e9).contains(&t) => Some(Duration::from_secs_f64(t)),
            Some(_) => {
                return Err(PyValueError::new_err(
                    "timeout must be between 0 and 1e9 seconds",
                ))
            }
            None => None,
        };
        match py.detach(|| self.handle.wait(limit)) {
            Ok(None) => Ok(None),
            Ok(Some(report)) => {
                log_shard_report(self.handle.shard(), &report);
                let counts = FinalCounts {
                    stats: report.stats,
                    events: report.events,
                };
                *lock(&self.report) = Some(counts);
                report_dict(py, &counts).map(Some)
            }
            Err(e) => Err(PstrainError::new_err(e.to_string())),
        }
    }

    /// Stops serving (a final checkpoint is written if checkpoints are on); `wait()` returns.
    fn stop(&self) {
        self.handle.stop();
    }
}
