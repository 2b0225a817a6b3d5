//! `pstrain._pstrain`: the Rust server shard, worker and client inside a Python process.
//!
//! Every call that waits (serving, training, pulling, pushing) releases the GIL, so Ray's
//! actor machinery and other Python threads keep running. Tensors go straight between numpy
//! memory and the socket: a pull writes into the returned array, a push sends the caller's.

use numpy::{PyArray1, PyArrayMethods, PyReadonlyArray1, PyUntypedArrayMethods};
use pstrain::cli::{self, CustomModel};
use pstrain_core::ServerStats;
use pstrain_core::{Layout, PushMeta, PushOutcome};
use pstrain_net::server::{ConnectionEvents, ShardReport};
use pstrain_net::{ClientConfig, Heartbeat, Role, ShardServer as RustShardServer, TcpClient};
use pyo3::create_exception;
use pyo3::exceptions::{PyRuntimeError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::{PyDict, PyList};
use std::sync::atomic::AtomicBool;
use std::sync::Mutex;
use std::time::Duration;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

create_exception!(
    _pstrain,
    PstrainError,
    PyRuntimeError,
    "A pstrain operation failed (bad flags, unreachable or refusing servers, bad data)."
);

fn err(e: anyhow::Error) -> PyErr {
    PstrainError::new_err(format!("{e:#}"))
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // A panic inside a call cannot leave these values half-updated in a way that matters
    // more than refusing every later call would.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// A shard's counters at the end of its run (its final weights are not kept here).
#[derive(Clone, Copy)]
struct FinalCounts {
    stats: ServerStats,
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
        shapes.push((name, array.shape().to_vec()));
        initial.extend(array.as_array().iter().copied());
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
struct ShardServer {
    address: String,
    shard: usize,
    rt: tokio::runtime::Runtime,
    stop: Mutex<Option<oneshot::Sender<()>>>,
    task: Mutex<Option<JoinHandle<ShardReport>>>,
    report: Mutex<Option<FinalCounts>>,
}

#[pymethods]
impl ShardServer {
    #[new]
    #[pyo3(signature = (argv, params=None))]
    fn new(
        py: Python<'_>,
        argv: Vec<String>,
        params: Option<&Bound<'_, PyDict>>,
    ) -> PyResult<Self> {
        let custom = params.map(custom_model).transpose()?;
        let setup = cli::shard_setup(&argv, custom).map_err(err)?;
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("pstrain-shard")
            .enable_all()
            .build()?;
        let (stop_tx, stop_rx) = oneshot::channel::<()>();
        let listen = setup.listen.clone();
        let (address, task) = py
            .detach(|| {
                rt.block_on(async {
                    let server = RustShardServer::bind(&listen, setup.config, &setup.initial)
                        .await
                        .map_err(|e| anyhow::anyhow!("cannot serve on {listen}: {e}"))?;
                    let address = server.local_addr()?.to_string();
                    let task = tokio::spawn(server.run(async {
                        let _ = stop_rx.await;
                    }));
                    anyhow::Ok((address, task))
                })
            })
            .map_err(err)?;
        Ok(ShardServer {
            address,
            shard: setup.shard,
            rt,
            stop: Mutex::new(Some(stop_tx)),
            task: Mutex::new(Some(task)),
            report: Mutex::new(None),
        })
    }

    /// The address the shard is bound to (`host:port`; port 0 in `--listen` picks one).
    #[getter]
    fn address(&self) -> String {
        self.address.clone()
    }

    #[getter]
    fn shard(&self) -> usize {
        self.shard
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
        let Some(mut task) = lock(&self.task).take() else {
            return Err(PstrainError::new_err(
                "another thread is waiting on this shard",
            ));
        };
        let limit = match timeout {
            Some(t) if t.is_finite() && t >= 0.0 => Some(Duration::from_secs_f64(t)),
            Some(_) => return Err(PyValueError::new_err("timeout must be >= 0 seconds")),
            None => None,
        };
        let outcome = py.detach(|| {
            self.rt.block_on(async {
                match limit {
                    Some(d) => tokio::time::timeout(d, &mut task).await.ok(),
                    None => Some((&mut task).await),
                }
            })
        });
        match outcome {
            None => {
                *lock(&self.task) = Some(task);
                Ok(None)
            }
            Some(Ok(report)) => {
                cli::log_shard_report(self.shard, &report);
                let counts = FinalCounts {
                    stats: report.stats,
                    events: report.events,
                };
                *lock(&self.report) = Some(counts);
                let d = report_dict(py, &counts)?;
                Ok(Some(d))
            }
            Some(Err(e)) => Err(PstrainError::new_err(format!(
                "shard {} failed: {e}",
                self.shard
            ))),
        }
    }

    /// Stops serving (a final checkpoint is written if checkpoints are on); `wait()` returns.
    fn stop(&self) {
        if let Some(tx) = lock(&self.stop).take() {
            let _ = tx.send(());
        }
    }
}

/// Runs one worker with the flags of `pstrain worker` until its work is done; returns its
/// report as JSON (the same line `pstrain worker` prints).
#[pyfunction]
fn run_worker(py: Python<'_>, argv: Vec<String>) -> PyResult<String> {
    let stop = AtomicBool::new(false);
    let report = py
        .detach(|| cli::run_worker_from(&argv, &stop))
        .map_err(err)?;
    serde_json::to_string(&report).map_err(|e| PstrainError::new_err(e.to_string()))
}

/// A `pstrain train` run whose processes a launcher places (the Ray driver): gives the flags
/// for shards and workers, watches the shards, evaluates, prints progress and the summary.
#[pyclass(module = "pstrain._pstrain")]
struct RemoteRun {
    inner: Mutex<cli::RemoteRun>,
}

#[pymethods]
impl RemoteRun {
    #[new]
    fn new(py: Python<'_>, argv: Vec<String>) -> PyResult<Self> {
        let inner = py.detach(|| cli::RemoteRun::new(&argv)).map_err(err)?;
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

    /// Whether the shards write checkpoints (so a restarted shard can resume).
    #[getter]
    fn checkpointing(&self) -> bool {
        lock(&self.inner).checkpointing()
    }

    /// Flags for each shard's server; add `--listen` and `--shard`.
    fn server_args(&self) -> Vec<String> {
        lock(&self.inner).server_args()
    }

    /// Flags for each worker; add `--servers` and `--rank`.
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
        serde_json::to_string(&summary).map_err(|e| PstrainError::new_err(e.to_string()))
    }
}

fn outcome_dict<'py>(py: Python<'py>, o: PushOutcome) -> PyResult<Bound<'py, PyDict>> {
    let d = PyDict::new(py);
    match o {
        PushOutcome::Applied { version, staleness } => {
            d.set_item("outcome", "applied")?;
            d.set_item("version", version)?;
            d.set_item("staleness", staleness)?;
        }
        PushOutcome::Buffered { waiting_for } => {
            d.set_item("outcome", "buffered")?;
            d.set_item("waiting_for", waiting_for)?;
        }
        PushOutcome::Dropped { staleness } => {
            d.set_item("outcome", "dropped")?;
            d.set_item("staleness", staleness)?;
        }
        PushOutcome::Done => d.set_item("outcome", "done")?,
    }
    Ok(d)
}

/// A connection to every shard of a run, adopting the servers' layout, worker count and mode.
/// Flat float32 arrays in and out; `pstrain.Client` wraps this with named tensors.
#[pyclass(frozen, module = "pstrain._pstrain")]
struct RawClient {
    client: Mutex<TcpClient>,
    layout: Layout,
    workers: usize,
    sync: bool,
    _heartbeat: Option<Heartbeat>,
}

#[pymethods]
impl RawClient {
    #[new]
    #[pyo3(signature = (servers, rank=0, role="worker", connect_timeout=60.0, io_timeout=30.0, heartbeat=1.0))]
    fn new(
        py: Python<'_>,
        servers: Vec<String>,
        rank: Option<usize>,
        role: &str,
        connect_timeout: f64,
        io_timeout: f64,
        heartbeat: f64,
    ) -> PyResult<Self> {
        let role = match role {
            "worker" => Role::Worker,
            "observer" => Role::Observer,
            other => {
                return Err(PyValueError::new_err(format!(
                    "role must be \"worker\" or \"observer\", not {other:?}"
                )))
            }
        };
        let seconds = |name: &str, v: f64| {
            if v.is_finite() && v > 0.0 {
                Ok(Duration::from_secs_f64(v))
            } else {
                Err(PyValueError::new_err(format!(
                    "{name} must be a positive number of seconds"
                )))
            }
        };
        let (connect, io) = (
            seconds("connect_timeout", connect_timeout)?,
            seconds("io_timeout", io_timeout)?,
        );
        let (client, served) = py
            .detach(|| {
                let served = pstrain_net::describe(&servers, io, connect)?;
                let mut cfg = ClientConfig::new(
                    servers,
                    role,
                    rank.unwrap_or(pstrain_net::ANY_RANK),
                    served.workers,
                    served.mode(),
                    served.layout.clone(),
                );
                cfg.io_timeout = io;
                cfg.connect_timeout = connect;
                let client = TcpClient::connect(&cfg)?;
                Ok::<_, pstrain_net::NetError>((client, served))
            })
            .map_err(|e| PstrainError::new_err(e.to_string()))?;
        let heartbeat = if role == Role::Worker && heartbeat > 0.0 {
            let every = seconds("heartbeat", heartbeat)?;
            Some(
                // The client's configuration carries the rank the shards assigned.
                py.detach(|| Heartbeat::start(client.config(), every))
                    .map_err(|e| PstrainError::new_err(e.to_string()))?,
            )
        } else {
            None
        };
        Ok(RawClient {
            client: Mutex::new(client),
            layout: served.layout,
            workers: served.workers,
            sync: served.sync,
            _heartbeat: heartbeat,
        })
    }

    /// `[(name, shape), ...]` in the order of the flat buffer.
    #[getter]
    fn layout(&self) -> Vec<(String, Vec<usize>)> {
        self.layout
            .tensors()
            .iter()
            .map(|t| (t.name.clone(), t.shape.clone()))
            .collect()
    }

    /// The worker rank in use (assigned by the shards when None was given).
    #[getter]
    fn rank(&self) -> usize {
        lock(&self.client).rank()
    }

    #[getter]
    fn size(&self) -> usize {
        self.layout.len()
    }

    #[getter]
    fn workers(&self) -> usize {
        self.workers
    }

    #[getter]
    fn mode(&self) -> &'static str {
        if self.sync {
            "sync"
        } else {
            "async"
        }
    }

    /// The server version of the weights last pulled.
    #[getter]
    fn version(&self) -> u64 {
        lock(&self.client).version()
    }

    /// All weights as a flat float32 array, written straight from the sockets: a new array,
    /// or `out` (a C-contiguous float32 array of the model's size, reused with no allocation).
    /// In sync mode, after a push, waits (`wait=True`) until that step's update is applied.
    /// Returns `(array, version, done)`; `done` says the run is over.
    #[pyo3(signature = (wait=true, out=None))]
    fn pull<'py>(
        &self,
        py: Python<'py>,
        wait: bool,
        out: Option<Bound<'py, PyArray1<f32>>>,
    ) -> PyResult<(Bound<'py, PyArray1<f32>>, u64, bool)> {
        let array = match out {
            Some(a) => a,
            None => PyArray1::<f32>::zeros(py, self.layout.len(), false),
        };
        let mut guard = array
            .try_readwrite()
            .map_err(|_| PyValueError::new_err("`out` is borrowed elsewhere or not writable"))?;
        let buf = guard
            .as_slice_mut()
            .map_err(|_| PyValueError::new_err("`out` must be a C-contiguous float32 array"))?;
        if buf.len() != self.layout.len() {
            return Err(PyValueError::new_err(format!(
                "`out` has {} values, the model has {}",
                buf.len(),
                self.layout.len()
            )));
        }
        let reply = py
            .detach(|| {
                // Without `newer_than` every slice is sent, so `buf` is wholly written.
                lock(&self.client).pull_all(buf, None, wait)
            })
            .map_err(|e| PstrainError::new_err(e.to_string()))?;
        drop(guard);
        Ok((array, reply.version, reply.done))
    }

    /// Sends a flat float32 gradient (sent from the array's own memory) computed from the
    /// weights of the last pull, over `samples` samples with mean training loss `loss`.
    #[pyo3(signature = (grad, samples, loss=f32::NAN))]
    fn push<'py>(
        &self,
        py: Python<'py>,
        grad: PyReadonlyArray1<'py, f32>,
        samples: u32,
        loss: f32,
    ) -> PyResult<Bound<'py, PyDict>> {
        let slice = grad.as_slice().map_err(|_| {
            PyValueError::new_err("the gradient must be a C-contiguous float32 array")
        })?;
        if slice.len() != self.layout.len() {
            return Err(PyValueError::new_err(format!(
                "gradient has {} values, the model has {}",
                slice.len(),
                self.layout.len()
            )));
        }
        if samples == 0 {
            return Err(PyValueError::new_err("samples must be at least 1"));
        }
        let outcome = py
            .detach(|| {
                let mut client = lock(&self.client);
                let meta = PushMeta {
                    rank: client.rank(),
                    base_version: client.version(),
                    samples,
                    loss,
                };
                client.push_all(meta, slice)
            })
            .map_err(|e| PstrainError::new_err(e.to_string()))?;
        outcome_dict(py, outcome)
    }

    /// Each shard's counters: a list of dicts in shard order.
    fn stats<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyList>> {
        let shards = py
            .detach(|| lock(&self.client).stats())
            .map_err(|e| PstrainError::new_err(e.to_string()))?;
        let list = PyList::empty(py);
        for s in shards {
            let d = PyDict::new(py);
            d.set_item("version", s.stats.version)?;
            d.set_item("gradients_applied", s.stats.gradients_applied)?;
            d.set_item("samples_applied", s.stats.samples_applied)?;
            d.set_item("dropped_stale", s.stats.dropped_stale)?;
            d.set_item("rejected_nonfinite", s.stats.rejected_nonfinite)?;
            d.set_item("active_workers", s.active_workers)?;
            d.set_item("done", s.done)?;
            list.append(d)?;
        }
        Ok(list)
    }

    /// Leaves the run (a sync step no longer waits for this worker). Idempotent.
    fn leave(&self, py: Python<'_>) -> PyResult<()> {
        py.detach(|| lock(&self.client).goodbye())
            .map_err(|e| PstrainError::new_err(e.to_string()))
    }
}

/// The help text of a `pstrain` subcommand (`train`, `server`, `worker`): the flags the
/// Python front ends take.
#[pyfunction]
fn help(command: &str) -> PyResult<String> {
    cli::help(command)
        .ok_or_else(|| PyValueError::new_err(format!("no pstrain subcommand `{command}`")))
}

#[pymodule]
fn _pstrain(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add("PstrainError", m.py().get_type::<PstrainError>())?;
    m.add_class::<ShardServer>()?;
    m.add_class::<RemoteRun>()?;
    m.add_class::<RawClient>()?;
    m.add_function(wrap_pyfunction!(run_worker, m)?)?;
    m.add_function(wrap_pyfunction!(help, m)?)?;
    Ok(())
}
