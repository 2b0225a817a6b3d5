"""pstrain: parameter-server training, from Python.

The server shards and workers are pstrain's Rust ones, run inside this process with the GIL
released; tensors move Rust-to-Rust over pstrain's TCP protocol.

- ``Client(servers)``: pull weights and push gradients as named numpy arrays, for workers
  written in Python (numpy, PyTorch, JAX) against pstrain's servers.
- ``Server(params, ...)``: serve a model of your own (a dict of float32 arrays) from this process;
  ``Server.from_module(module, ...)`` serves a PyTorch module's parameters.
- ``pstrain.torch``: a PyTorch module as a worker (pull into its parameters, push its
  ``.grad``s, no per-tensor copies); imported only when you use it.
- ``python -m pstrain.ray``: run ``pstrain train`` on a Ray cluster (see ``pstrain.ray``);
  ``pstrain.ray_torch``: the same for any PyTorch module.
"""

from __future__ import annotations

import collections.abc
import math
import re
from typing import Dict, Iterable, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np

from ._pstrain import PstrainError, RawClient, RemoteRun, ShardServer, new_token, run_worker
from ._pstrain import help as _command_help

__all__ = [
    "Client",
    "Server",
    "PstrainError",
    "ShardServer",
    "RemoteRun",
    "RawClient",
    "run_worker",
    "new_token",
]


def _addresses(servers: Union[str, Sequence[str]]) -> List[str]:
    if isinstance(servers, str):
        servers = servers.split(",")
    out = [s.strip() for s in servers if s.strip()]
    if not out:
        raise ValueError("no server addresses given")
    return out


class Client:
    """A worker (or observer) connected to every shard of a pstrain run.

    The client adopts what the servers serve: tensor names and shapes, the number of
    workers and the mode. ``pull()`` returns ``{name: array}`` views into one new flat float32
    array that the weights were read into straight from the sockets; ``push(grads)`` takes the
    same names and shapes (a flat float32 array from ``flat_zeros()``/``flatten()`` is sent
    from its own memory, with no copy).

    In sync mode a pull after a push waits until the step's update is applied. ``token`` is
    the run's token (hex, as ``pstrain token`` prints; default: ``$PSTRAIN_TOKEN``): the
    client and every shard prove to each other that they hold it. A worker sends heartbeats
    every ``heartbeat`` seconds from a thread of its own; a shard evicts a worker whose
    heartbeats stop. ``tls_ca`` (a PEM file) makes it talk TLS to shards whose certificates
    that CA signed (shards: ``Server(..., tls_cert=..., tls_key=...)``). A worker on a
    shard's host moves its tensors through shared memory the shard offers (a lane) unless
    ``lanes=False``.

    >>> c = Client(["10.0.0.1:7000", "10.0.0.2:7000"], rank=0)   # doctest: +SKIP
    >>> w = c.pull()                                              # doctest: +SKIP
    >>> c.push({"w": grad_w, "b": grad_b}, samples=64)            # doctest: +SKIP
    """

    def __init__(
        self,
        servers: Union[str, Sequence[str]],
        rank: Optional[int] = 0,
        role: str = "worker",
        *,
        connect_timeout: float = 60.0,
        io_timeout: float = 30.0,
        heartbeat: float = 1.0,
        token: Optional[str] = None,
        tls_ca: Optional[str] = None,
        lanes: bool = True,
    ) -> None:
        self._raw = RawClient(
            _addresses(servers),
            rank,
            role,
            connect_timeout,
            io_timeout,
            heartbeat,
            token,
            tls_ca,
            lanes,
        )
        self.layout: Dict[str, Tuple[int, ...]] = {
            name: tuple(shape) for name, shape in self._raw.layout
        }
        self._slices: Dict[str, Tuple[int, int]] = {}
        offset = 0
        for name, shape in self.layout.items():
            n = int(math.prod(shape))
            self._slices[name] = (offset, offset + n)
            offset += n
        self.size = offset
        self.done = False

    @property
    def rank(self) -> int:
        """This worker's rank (assigned by the servers when ``rank=None`` was given: a
        replacement takes the rank of a worker that died first, else a free one)."""
        return self._raw.rank

    @property
    def workers(self) -> int:
        return self._raw.workers

    @property
    def mode(self) -> str:
        return self._raw.mode

    @property
    def version(self) -> int:
        """The server version of the weights last pulled (what the next push is based on)."""
        return self._raw.version

    def unflatten(self, flat: np.ndarray) -> Dict[str, np.ndarray]:
        """Named views (no copies) into a flat array in the layout's order."""
        if flat.shape != (self.size,):
            raise ValueError(f"flat array has shape {flat.shape}, expected ({self.size},)")
        return {
            name: flat[a:b].reshape(self.layout[name]) for name, (a, b) in self._slices.items()
        }

    def flatten(self, tensors: Mapping[str, np.ndarray]) -> np.ndarray:
        """One flat float32 array from named tensors, checking names and shapes."""
        missing = [n for n in self.layout if n not in tensors]
        extra = [n for n in tensors if n not in self.layout]
        if missing or extra:
            raise ValueError(
                f"tensor names do not match the servers' model: missing {missing}, unknown {extra}"
            )
        flat = np.empty(self.size, dtype=np.float32)
        for name, (a, b) in self._slices.items():
            t = np.asarray(tensors[name])
            if t.shape != self.layout[name]:
                raise ValueError(
                    f"`{name}` has shape {t.shape}, the servers' model has {self.layout[name]}"
                )
            flat[a:b] = t.reshape(-1)
        return flat

    def flat_zeros(self) -> Tuple[np.ndarray, Dict[str, np.ndarray]]:
        """A zeroed flat float32 buffer and named views into it: write gradients into the
        views, then ``push(flat)`` sends the buffer without a copy."""
        flat = np.zeros(self.size, dtype=np.float32)
        return flat, self.unflatten(flat)

    def pull(self, wait: bool = True, out: Optional[np.ndarray] = None) -> Dict[str, np.ndarray]:
        """The current weights as named arrays (views into one flat array: a new one, or
        ``out``, a flat float32 array from ``flat_zeros()`` reused with no allocation). Sets
        ``done`` when the run is over."""
        return self.unflatten(self.pull_flat(wait, out))

    @property
    def lanes_in_use(self) -> int:
        """How many shards this client reaches through shared memory instead of TCP."""
        return self._raw.lanes_in_use

    def lane_arrays(self) -> Optional[Tuple[np.ndarray, np.ndarray]]:
        """With one shard reached through shared memory: ``(grads, params)``, flat float32
        arrays that are the lane's push and pull areas. Computing in them saves this worker's
        copies: ``push(grads, ...)`` and ``pull_flat(out=params)`` then copy nothing. ``None``
        otherwise (several shards, another host, ``lanes=False``)."""
        return self._raw.lane_arrays()

    def pull_flat(
        self, wait: bool = True, out: Optional[np.ndarray] = None, update: bool = False
    ) -> np.ndarray:
        """The current weights as one flat float32 array (a new one, or ``out``). With
        ``update=True``, ``out`` must be the array the last pull filled and unchanged since:
        the servers then send only what changed, in the run's pull codec (differences of
        ``--pull-codec delta-*``, replayed updates of ``replay``, or ``auto``'s choice for
        this worker's link; nothing when nothing changed), so a worker on a slow link pulls a
        fraction of the model. Without it every value comes as fp32 (in a run of replayed
        pulls, with the optimizer's state as well). A different array raises ``ValueError``;
        values changed in ``out`` between pulls stay changed."""
        if out is not None:
            _check_out(out)
        flat, _version, done = self._raw.pull(wait, out, update)
        self.done = done
        return flat

    def push(
        self,
        grads: Union[Mapping[str, np.ndarray], np.ndarray],
        samples: int,
        loss: float = float("nan"),
        base_version: Optional[int] = None,
    ) -> dict:
        """Sends a gradient computed from the last pulled weights (or from those of version
        ``base_version``, for a worker that pulled again while it computed), averaged over
        ``samples`` samples (its weight in a sync step). Returns the server's verdict:
        ``{"outcome": "applied" | "buffered" | "dropped" | "done", ...}``. A gradient with
        NaN or Inf values is refused with ``PstrainError``."""
        if isinstance(grads, collections.abc.Mapping):
            flat = self.flatten(grads)
        else:
            # One flat gradient: an array, or anything numpy reads as one (a list, a CPU
            # tensor), as float32 values in the servers' layout order.
            flat = grads
            if not (isinstance(flat, np.ndarray) and flat.dtype == np.float32
                    and flat.ndim == 1 and flat.flags.c_contiguous):
                flat = np.ascontiguousarray(flat, dtype=np.float32).reshape(-1)
        result = self._raw.push(flat, int(samples), float(loss), base_version)
        if result.get("outcome") == "done":
            self.done = True
        return result

    def stats(self) -> List[dict]:
        """Each shard's counters, in shard order."""
        return self._raw.stats()

    def leave(self) -> None:
        """Leaves the run, so that no sync step waits for this worker."""
        self._raw.leave()

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc) -> None:
        self.leave()


def _check_out(out: object) -> None:
    """An array a pull can fill in place: ``TypeError`` for another type or dtype,
    ``ValueError`` for another shape or memory."""
    need = "`out` must be a flat, contiguous, writeable float32 array (such as flat_zeros()'s)"
    if not isinstance(out, np.ndarray) or out.dtype != np.float32:
        what = f"{out.dtype} array" if isinstance(out, np.ndarray) else type(out).__name__
        raise TypeError(f"{need}, not a {what}")
    if out.ndim != 1 or not out.flags.c_contiguous or not out.flags.writeable:
        raise ValueError(f"{need}; this one has shape {out.shape}, "
                         f"contiguous={out.flags.c_contiguous}, writeable={out.flags.writeable}")


def _flags(values: Mapping[str, object], called: str) -> List[str]:
    """``pstrain server`` flags from keyword arguments of ``called``: ``lr_schedule="constant"``
    becomes ``--lr-schedule=constant``; ``True`` is a bare switch, ``False`` and ``None`` are
    left out. The value is joined with ``=`` so that a negative one (``lr=-1.0``) is read as
    the flag's value, and refused by the flag's own check, not taken for a flag of its own. A
    keyword that is no flag is refused as Python refuses a keyword no function takes (before
    anything binds a port or asks a cluster for room)."""
    known = set(re.findall(r"--([a-z0-9][a-z0-9-]*)", _command_help("server")))
    argv: List[str] = []
    for key, value in values.items():
        name = key.replace("_", "-")
        if name not in known:
            raise TypeError(f"{called}() got an unexpected keyword argument '{key}' "
                            "(every other keyword is a `pstrain server` flag: "
                            "`pstrain server --help` lists them)")
        if value is None or value is False:
            continue
        if value is True:
            argv.append(f"--{name}")
        elif isinstance(value, float):
            argv.append(f"--{name}={value!r}")
        else:
            argv.append(f"--{name}={value}")
    return argv


class Server:
    """A parameter-server shard for a model of your own, served from this process.

    ``params`` maps names to float32 arrays (their initial values; dict order is the flat
    layout's order). Every other keyword is a ``pstrain server`` flag with the same meaning
    and default (``mode``, ``workers``, ``optimizer``, ``lr``, ``lr_schedule``,
    ``iterations``, ``max_staleness``, ``backup_workers``, ``checkpoint_dir``, ...; see
    ``pstrain server --help``); ``extra_args`` passes raw flags; ``token`` is the run's token
    (default: ``$PSTRAIN_TOKEN``; required to listen beyond loopback). Workers adopt this
    shard's run plan. The run ends when every worker has left (or ``iterations`` updates are made);
    ``wait()`` then returns the shard's counters.
    """

    def __init__(
        self,
        params: Mapping[str, np.ndarray],
        *,
        listen: str = "127.0.0.1:0",
        shard: int = 0,
        shards: int = 1,
        extra_args: Iterable[str] = (),
        token: Optional[str] = None,
        **flags: object,
    ) -> None:
        # `asarray`, not `ascontiguousarray`: the latter makes a scalar (a 0-d parameter,
        # such as a learned temperature) 1-d, and the layout would then differ from the
        # module's.
        arrays = {name: np.asarray(v, dtype=np.float32, order="C") for name, v in params.items()}
        argv = ["--listen", listen, "--shard", str(shard), "--shards", str(shards)]
        argv += _flags(flags, "Server") + list(extra_args)
        self._shard = ShardServer(argv, arrays, token)

    @classmethod
    def from_module(cls, module, **kwargs: object) -> "Server":
        """A shard serving a PyTorch module's trainable parameters (``named_parameters()``
        with ``requires_grad``: names and shapes as PyTorch writes them, initial values from
        the module; see ``pstrain.torch`` for frozen ones and buffers); the other keywords
        are ``Server``'s. Needs torch (see ``pstrain.torch``)."""
        from .torch import parameters_of

        return cls(parameters_of(module), **kwargs)  # type: ignore[arg-type]

    @property
    def address(self) -> str:
        return self._shard.address

    @property
    def metrics_port(self) -> Optional[int]:
        """The port of ``/metrics`` and the live page (``metrics_addr="HOST:PORT"``), else
        ``None``."""
        return self._shard.metrics_port

    def wait(self, timeout: Optional[float] = None) -> Optional[dict]:
        return self._shard.wait(timeout)

    def stop(self) -> None:
        self._shard.stop()

    def __enter__(self) -> "Server":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()
        self.wait()
