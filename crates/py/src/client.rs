//! `RawClient`: a connection to every shard of a run that adopts the servers' plan and
//! layout; flat float32 numpy arrays in and out (`pstrain.Client` adds the names).

use crate::{err, lock, seconds};
use numpy::ndarray::ArrayView1;
use numpy::{PyArray1, PyArrayMethods, PyReadonlyArray1};
use pstrain_core::{Layout, PushMeta, PushOutcome};
use pstrain_net::lane::Lane;
use pstrain_net::{ClientConfig, Heartbeat, Role, TcpClient};
use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;
use pyo3::types::{PyDict, PyList};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

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

/// A lane's push and pull areas as numpy arrays.
type LaneArrays<'py> = (Bound<'py, PyArray1<f32>>, Bound<'py, PyArray1<f32>>);

/// The memory of a lane that numpy arrays are views of (their base object).
#[pyclass(frozen, module = "pstrain._pstrain")]
pub(crate) struct LaneMemory {
    lane: Arc<Lane>,
}

/// A connection to every shard of a run, adopting the servers' layout, worker count and mode.
/// Flat float32 arrays in and out; `pstrain.Client` wraps this with named tensors.
#[pyclass(frozen, module = "pstrain._pstrain")]
pub(crate) struct RawClient {
    client: Mutex<TcpClient>,
    layout: Layout,
    workers: usize,
    mode: &'static str,
    role: Role,
    /// Stopped by `leave`: a shard does not wait on the heartbeats of a worker that left.
    heartbeat: Mutex<Option<Heartbeat>>,
    /// Set by `leave`: a client that left does not slip back into the run by a later call.
    left: AtomicBool,
    /// The address of the array the last pull wrote wholly (`pull(update=True)` must be given
    /// it back: what the shards send is relative to what it holds).
    filled: Mutex<Option<usize>>,
}

#[pymethods]
impl RawClient {
    #[new]
    #[pyo3(signature = (servers, rank=0, role="worker", connect_timeout=60.0, io_timeout=30.0, heartbeat=1.0, token=None, tls_ca=None, lanes=true))]
    #[allow(clippy::too_many_arguments)]
    fn new(
        py: Python<'_>,
        servers: Vec<String>,
        rank: Option<i64>,
        role: &str,
        connect_timeout: f64,
        io_timeout: f64,
        heartbeat: f64,
        token: Option<&str>,
        tls_ca: Option<std::path::PathBuf>,
        lanes: bool,
    ) -> PyResult<Self> {
        let rank = rank.map(rank_arg).transpose()?;
        let token = crate::token(token)?;
        let tls = tls_ca
            .as_deref()
            .map(pstrain_net::TlsClient::from_ca_file)
            .transpose()
            .map_err(err)?;
        let role = match role {
            "worker" => Role::Worker,
            "observer" => Role::Observer,
            other => {
                return Err(PyValueError::new_err(format!(
                    "role must be \"worker\" or \"observer\", not {other:?}"
                )))
            }
        };
        // Every argument checked before joining: a refusal after it would leave a rank held.
        let (connect, io, every) = (
            seconds("connect_timeout", connect_timeout)?,
            seconds("io_timeout", io_timeout)?,
            seconds("heartbeat", heartbeat)?,
        );
        let (client, served) = py
            .detach(|| {
                let served =
                    pstrain_net::describe(&servers, io, connect, token.as_ref(), tls.as_ref())?;
                let mut cfg = ClientConfig::new(
                    servers,
                    role,
                    rank.unwrap_or(pstrain_net::ANY_RANK),
                    served.plan.clone(),
                    served.layout.clone(),
                );
                cfg.io_timeout = io;
                cfg.connect_timeout = connect;
                cfg.token = token;
                cfg.tls = tls;
                cfg.lanes = lanes;
                let client = TcpClient::connect(&cfg)?;
                Ok::<_, pstrain_net::NetError>((client, served))
            })
            .map_err(err)?;
        // Heartbeats are required of workers: a shard evicts one whose heartbeats stop.
        let heartbeat = if role == Role::Worker {
            Some(
                // The client's configuration carries the rank the shards assigned.
                py.detach(|| Heartbeat::start(client.config(), every))
                    .map_err(err)?,
            )
        } else {
            None
        };
        Ok(RawClient {
            client: Mutex::new(client),
            layout: served.layout,
            workers: served.plan.workers,
            mode: served.plan.mode.name(),
            role,
            heartbeat: Mutex::new(heartbeat),
            left: AtomicBool::new(false),
            filled: Mutex::new(None),
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
        self.mode
    }

    /// How many shards this client reaches through shared memory (a lane) instead of TCP.
    #[getter]
    fn lanes_in_use(&self) -> usize {
        lock(&self.client).lanes_in_use()
    }

    /// With one shard reached through a lane: its push and pull areas as flat float32 arrays
    /// `(grads, params)` of the model's size, which keep the lane mapped while they live. A
    /// worker that computes in them pulls and pushes with no copy of its own (`pull(out=params)`
    /// and `push(grads)` find the lane's own memory and leave it); otherwise `None`.
    fn lane_arrays<'py>(slf: &Bound<'py, Self>) -> PyResult<Option<LaneArrays<'py>>> {
        let py = slf.py();
        let Some(lane) = lock(&slf.get().client).lane() else {
            return Ok(None);
        };
        if lane.values() != slf.get().layout.len() {
            return Ok(None);
        }
        let owner = Bound::new(py, LaneMemory { lane })?;
        let area = |pull: bool| -> PyResult<Bound<'py, PyArray1<f32>>> {
            let lane = &owner.get().lane;
            // SAFETY: the area holds `lane.values()` floats for as long as the lane is mapped,
            // and `owner` (the arrays' base object) keeps it mapped. The shard writes the pull
            // area only while this worker waits for a pull, and reads the push area only while
            // it waits for a push's answer.
            let view = unsafe {
                ArrayView1::from_shape_ptr(lane.values(), lane.area_ptr(pull).cast_const())
            };
            Ok(unsafe { PyArray1::borrow_from_array(&view, owner.clone().into_any()) })
        };
        Ok(Some((area(false)?, area(true)?)))
    }

    /// The server version of the weights last pulled.
    #[getter]
    fn version(&self) -> u64 {
        lock(&self.client).version()
    }

    /// All weights as a flat float32 array, written straight from the sockets: a new array,
    /// or `out` (a C-contiguous float32 array of the model's size, reused with no allocation).
    /// In sync mode, after a push, waits (`wait=True`) until that step's update is applied.
    /// With `update=True`, `out` must be the array the last pull filled, unchanged since: the
    /// shards then send only what changed, in the run's pull codec (differences, replayed
    /// updates; nothing if nothing changed), which is what a worker behind a slow link needs;
    /// without, every value is sent as fp32 (and the first `update` pull is whole too).
    /// Returns `(array, version, done)`; `done` says the run is over.
    #[pyo3(signature = (wait=true, out=None, update=false))]
    fn pull<'py>(
        &self,
        py: Python<'py>,
        wait: bool,
        out: Option<Bound<'py, PyArray1<f32>>>,
        update: bool,
    ) -> PyResult<(Bound<'py, PyArray1<f32>>, u64, bool)> {
        self.still_in()?;
        if update && out.is_none() {
            return Err(PyValueError::new_err(
                "update=True needs `out`: the array the last pull filled",
            ));
        }
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
        let address = buf.as_ptr() as usize;
        let reply = py
            .detach(|| {
                // `filled` is only taken under the client's lock, off the GIL.
                let mut client = lock(&self.client);
                let mut filled = lock(&self.filled);
                let holds_last = match *filled {
                    Some(last) if update && last != address => return Err(None),
                    last => update && last.is_some(),
                };
                // Until this pull has written `buf`, no array holds what the shards think.
                *filled = None;
                // Without `newer_than` every slice is sent, so `buf` is wholly written; with
                // it, a shard sends what changed since the version `buf` holds.
                let newer_than = holds_last.then(|| client.version());
                let reply = client.pull_all(buf, newer_than, wait).map_err(Some)?;
                *filled = Some(address);
                Ok(reply)
            })
            .map_err(|e: Option<pstrain_net::NetError>| match e {
                Some(e) => err(e),
                None => PyValueError::new_err(
                    "update=True needs `out` to be the array the last pull filled \
                     (what the shards send is relative to what it holds)",
                ),
            })?;
        drop(guard);
        Ok((array, reply.version, reply.done))
    }

    /// Sends a flat float32 gradient (sent from the array's own memory) computed from the
    /// weights of the last pull (or of version `base_version`, for a worker that pulled again
    /// while it computed: the shards count its staleness from there), over `samples` samples
    /// with mean training loss `loss`.
    #[pyo3(signature = (grad, samples, loss=f32::NAN, base_version=None))]
    fn push<'py>(
        &self,
        py: Python<'py>,
        grad: PyReadonlyArray1<'py, f32>,
        samples: i64,
        loss: f32,
        base_version: Option<u64>,
    ) -> PyResult<Bound<'py, PyDict>> {
        self.still_in()?;
        if self.role != Role::Worker {
            return Err(crate::PstrainError::new_err(
                "an observer does not push: connect with role=\"worker\" to send gradients",
            ));
        }
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
        let samples = u32::try_from(samples)
            .ok()
            .filter(|&n| n > 0)
            .ok_or_else(|| {
                PyValueError::new_err(format!(
                    "samples must be between 1 and {}, got {samples}",
                    u32::MAX
                ))
            })?;
        let outcome = py
            .detach(|| {
                let mut client = lock(&self.client);
                let meta = PushMeta {
                    rank: client.rank(),
                    // Never newer than what this client has pulled.
                    base_version: base_version
                        .map_or(client.version(), |v| v.min(client.version())),
                    samples,
                    loss,
                    accumulated: false,
                };
                client.push_all(meta, slice)
            })
            .map_err(err)?;
        outcome_dict(py, outcome)
    }

    /// Each shard's counters: a list of dicts in shard order.
    fn stats<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyList>> {
        self.still_in()?;
        let shards = py.detach(|| lock(&self.client).stats()).map_err(err)?;
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
        self.left.store(true, Ordering::Relaxed);
        py.detach(|| {
            let said = lock(&self.client).goodbye();
            // Dropping the heartbeats ends their thread and closes their connections.
            drop(lock(&self.heartbeat).take());
            said
        })
        .map_err(err)
    }
}

/// A rank given from Python: 0 or more.
fn rank_arg(rank: i64) -> PyResult<usize> {
    usize::try_from(rank).map_err(|_| {
        PyValueError::new_err(format!(
            "rank must be 0 or more (or None for any free rank), got {rank}"
        ))
    })
}

impl RawClient {
    /// Refuses a call after `leave`.
    fn still_in(&self) -> PyResult<()> {
        if self.left.load(Ordering::Relaxed) {
            return Err(crate::PstrainError::new_err(
                "this client has left the run (leave()); make a new Client to join it again",
            ));
        }
        Ok(())
    }
}
