"""Your own PyTorch module on pstrain's servers.

- ``parameters_of(module)``: the module's parameters as pstrain serves them: names and shapes
  as ``named_parameters()`` gives them, in that order, with their current values.
- ``Server.from_module(module, ...)`` (in ``pstrain``): a shard serving that module.
- ``ModuleWorker(client, module)``: the module's parameters and gradients become views into two
  flat float32 buffers; ``pull()`` reads the servers' weights straight into the parameters
  (from the sockets, or from shared memory when the shard is on this host; no per-tensor
  copy) and ``push()`` sends the gradients ``backward()`` accumulated there.
- ``train_worker(...)``: a whole worker: pull, forward, backward, push, until the run is done.

Only parameters travel. Buffers that are not parameters (BatchNorm's running mean and
variance, counters) stay **local** to each worker: every worker keeps the statistics of the
batches it saw, the servers never hold them, and ``pstrain export`` writes parameters only. A
module with such buffers therefore loads an export with ``load_state_dict(..., strict=False)``
(``load_export`` below does that and says which keys it left as they were); a module without
buffers (the MNIST example's network) loads it with ``strict=True``.

The module must be on the CPU in float32 (pstrain's wire format); a module whose parameters
do not match the servers' layout is refused by name and shape before anything is sent, and a
gradient holding NaN or Inf raises ``PstrainError`` like any other push.
"""

from __future__ import annotations

import functools
import math
import time
from typing import Callable, Dict, Iterable, List, Optional, Tuple

import numpy as np

try:
    import torch
except ImportError as e:  # pragma: no cover - depends on the machine
    raise ImportError(
        "pstrain.torch needs PyTorch (`pip install torch`); pstrain itself does not"
    ) from e

from . import Client

__all__ = ["parameters_of", "ModuleWorker", "train_worker", "load_export", "evaluate"]


def _named(module: "torch.nn.Module") -> List[Tuple[str, "torch.nn.Parameter"]]:
    named = list(module.named_parameters())
    if not named:
        raise ValueError("the module has no parameters")
    for name, p in named:
        if isinstance(p, torch.nn.parameter.UninitializedParameter):
            raise ValueError(
                f"parameter `{name}` is not initialised yet (a lazy module): run one batch "
                "through the module before serving it or making it a worker"
            )
        if p.dtype != torch.float32 or p.device.type != "cpu":
            raise ValueError(
                f"parameter `{name}` is {p.dtype} on {p.device}: pstrain serves float32 "
                "parameters on the CPU (call module.float().cpu() first)"
            )
    return named


def parameters_of(module: "torch.nn.Module") -> Dict[str, np.ndarray]:
    """``{name: float32 array}`` of the module's parameters, in ``named_parameters()`` order
    (the servers' layout order), copied from their current values."""
    return {
        name: p.detach().numpy().astype(np.float32, copy=True) for name, p in _named(module)
    }


def _check_layout(client: Client, named: List[Tuple[str, "torch.nn.Parameter"]]) -> None:
    theirs = [(name, tuple(shape)) for name, shape in client.layout.items()]
    ours = [(name, tuple(p.shape)) for name, p in named]
    if ours == theirs:
        return
    their_names = dict(theirs)
    our_names = dict(ours)
    problems = [f"`{n}` is not on the servers" for n in our_names if n not in their_names]
    problems += [f"`{n}` is missing from the module" for n in their_names if n not in our_names]
    problems += [
        f"`{n}` has shape {list(s)} in the module, {list(their_names[n])} on the servers"
        for n, s in ours
        if n in their_names and their_names[n] != s
    ]
    if not problems:
        problems = [f"the order differs: module {[n for n, _ in ours]}, servers "
                    f"{[n for n, _ in theirs]}"]
    raise ValueError("the module's parameters do not match the servers' model: "
                     + "; ".join(problems[:8]))


class ModuleWorker:
    """Binds a module's parameters and gradients to one flat buffer each.

    After ``ModuleWorker(client, module)``, ``param.data`` of every parameter is a view into
    ``self.params`` and ``param.grad`` a view into ``self.grads`` (flat float32 numpy arrays in
    the servers' layout). ``backward()`` accumulates into the views in place, ``push()`` sends
    ``self.grads`` as it is and ``pull()`` reads the servers' weights into ``self.params``.
    If training code replaces a ``.grad`` (``zero_grad(set_to_none=True)`` followed by a
    backward makes a new tensor), ``push`` copies that one in and binds the view again.
    """

    def __init__(self, client: Client, module: "torch.nn.Module", in_lane: bool = True) -> None:
        self.client = client
        self.module = module
        self._named = _named(module)
        _check_layout(client, self._named)
        # On the shard's host the buffers are the shared-memory lane itself, so pulls and
        # pushes copy nothing on this side (unless `in_lane=False`: a worker that computes
        # while its last gradient is pushed needs buffers the lane does not write);
        # elsewhere, buffers of our own.
        lane = client.lane_arrays() if in_lane else None
        if lane is not None:
            self.grads, self.params = lane
        else:
            self.params = np.zeros(client.size, dtype=np.float32)
            self.grads = np.zeros(client.size, dtype=np.float32)
        self._params_t = torch.from_numpy(self.params)
        self._grads_t = torch.from_numpy(self.grads)
        self._views: List[Tuple["torch.nn.Parameter", "torch.Tensor", "torch.Tensor"]] = []
        offset = 0
        for _, p in self._named:
            n = p.numel()
            data = self._params_t[offset:offset + n].view(p.shape)
            grad = self._grads_t[offset:offset + n].view(p.shape)
            data.copy_(p.detach())
            self._views.append((p, data, grad))
            offset += n
        self._bind()

    def _bind(self) -> None:
        with torch.no_grad():
            for p, data, grad in self._views:
                if p.data.data_ptr() != data.data_ptr():
                    p.data = data
                if p.grad is None or p.grad.data_ptr() != grad.data_ptr():
                    if p.grad is not None:
                        grad.copy_(p.grad)
                    else:
                        grad.zero_()
                    p.grad = grad

    @property
    def version(self) -> int:
        return self.client.version

    def pull(self, wait: bool = True, whole: bool = False) -> int:
        """Reads the current weights into the module's parameters; returns their version.

        The servers send what changed since the last pull, in the run's pull codec (the
        differences or replayed updates a slow link needs; ``pstrain server --pull-codec``,
        ``--push-codec auto``), so the parameters must hold what the last pull wrote: the
        servers' optimizer moves them, not the training code. After changing them here (say
        ``load_state_dict``), pull with ``whole=True``."""
        self._bind()
        self.client.pull_flat(wait, self.params, update=not whole)
        return self.client.version

    def zero_grad(self) -> None:
        self._bind()
        self.grads.fill(0.0)

    def copy_grads_into(self, out: np.ndarray) -> None:
        """Copies the accumulated gradients into ``out`` (a gradient to send while the next
        one accumulates here)."""
        self._bind()
        np.copyto(out, self.grads)

    def push(self, samples: int, loss: float = float("nan")) -> dict:
        """Sends the accumulated gradients (averaged over ``samples`` samples)."""
        self._bind()
        return self.client.push(self.grads, samples, loss)


def train_worker(
    servers,
    build_model: Callable[[], "torch.nn.Module"],
    batches: Callable[[int, int, int], Iterable[Tuple["torch.Tensor", "torch.Tensor"]]],
    loss_fn: Callable[["torch.Tensor", "torch.Tensor"], "torch.Tensor"],
    *,
    rank: Optional[int] = 0,
    token: Optional[str] = None,
    threads: int = 1,
    max_epochs: Optional[int] = None,
    connect_timeout: float = 60.0,
    tls_ca: Optional[str] = None,
    lanes: bool = True,
    overlap: bool = False,
    lookahead: float = 1.0,
    step_times: bool = False,
) -> dict:
    """One worker: pulls, runs ``loss_fn(model(x), y).backward()`` on its next batch, pushes,
    until the servers say the run is done (or ``max_epochs`` passes over its batches).

    ``batches(rank, workers, epoch)`` yields this rank's ``(inputs, targets)`` for one epoch.
    Pulls bring what changed in the run's pull codec (``ModuleWorker.pull``); ``lanes=False``
    keeps a worker on the shard's host on TCP. ``overlap=True`` (async and buffered runs, as
    ``pstrain worker --overlap``) pushes each gradient and pulls on a thread of its own while
    the next one is computed, on the last pulled weights moved ``lookahead`` rounds further
    along their last round's move (0: as pulled). Returns a report: rank, steps, samples,
    seconds computing and on the servers' path (with overlap: waiting for it); with
    ``step_times=True`` also ``step_compute_s``, each step's seconds computing (in sync, step
    i of every worker is the run's step i: the slowest of them is what the barrier waits for).
    """
    torch.set_num_threads(max(1, int(threads)))
    client = Client(servers, rank, token=token, connect_timeout=connect_timeout, tls_ca=tls_ca,
                    lanes=lanes)
    if overlap and client.mode not in ("async", "buffered"):
        client.leave()
        raise ValueError(f"overlap=True needs an async or buffered run; this one is "
                         f"{client.mode}")
    model = build_model()
    model.train()
    worker = ModuleWorker(client, model, in_lane=not overlap)
    tally = _Tally(step_times)
    started = time.perf_counter()
    try:
        loop = functools.partial(_overlapped, lookahead=lookahead) if overlap else _in_turn
        loop(worker, model, lambda epoch: batches(client.rank, client.workers, epoch), loss_fn,
             max_epochs, tally)
    finally:
        client.leave()
    wall = time.perf_counter() - started
    tail = tally.losses[-50:]
    report = {
        "rank": client.rank,
        "steps": tally.steps,
        "samples": tally.samples,
        "epochs": tally.epochs,
        "compute_s": round(tally.compute_s, 3),
        "server_path_s": round(tally.path_s, 3),
        "wall_s": round(wall, 3),
        "samples_per_s": round(tally.samples / wall, 1) if wall > 0 else None,
        "final_loss": (sum(tail) / len(tail)) if tail else math.nan,
    }
    if tally.step_s is not None:
        report["step_compute_s"] = [round(t, 5) for t in tally.step_s]
    return report


class _Tally:
    """What a worker loop did: steps, samples, epochs, seconds computing and on the path."""

    def __init__(self, step_times: bool = False) -> None:
        self.steps = self.samples = self.epochs = 0
        self.compute_s = self.path_s = 0.0
        self.losses: List[float] = []
        self.step_s: Optional[List[float]] = [] if step_times else None
        self._t = 0.0

    def start(self) -> None:
        self._t = time.perf_counter()

    def computed(self, samples: int, loss: float) -> None:
        seconds = time.perf_counter() - self._t
        self.compute_s += seconds
        if self.step_s is not None:
            self.step_s.append(seconds)
        self.steps += 1
        self.samples += samples
        self.losses.append(loss)

    def on_path(self) -> None:
        self.path_s += time.perf_counter() - self._t


def _step(worker: ModuleWorker, model, loss_fn, inputs, targets, tally: _Tally) -> float:
    """Forward and backward on one batch into the worker's gradient buffer; the loss."""
    tally.start()
    worker.zero_grad()
    loss = loss_fn(model(inputs), targets)
    loss.backward()
    value = float(loss.detach())
    tally.computed(len(targets), value)
    return value


def _nonempty(batches: Iterable, epoch: int) -> Iterable:
    """``batches`` as they come; ``ValueError`` if an epoch brings none (the loop would spin
    without ever pushing, and the run would never end)."""
    empty = True
    for batch in batches:
        empty = False
        yield batch
    if empty:
        raise ValueError(f"batches(rank, workers, epoch) yielded no batch for epoch {epoch}: "
                         "each worker needs at least one batch per epoch")


def _in_turn(worker, model, epoch_batches, loss_fn, max_epochs, tally) -> None:
    """Pull, compute, push, in turn."""
    client = worker.client
    tally.start()
    worker.pull()
    tally.on_path()
    while not client.done and (max_epochs is None or tally.epochs < max_epochs):
        for inputs, targets in _nonempty(epoch_batches(tally.epochs), tally.epochs):
            value = _step(worker, model, loss_fn, inputs, targets, tally)
            tally.start()
            outcome = worker.push(len(targets), value)
            if client.done or outcome.get("outcome") == "done":
                tally.on_path()
                return
            worker.pull()
            tally.on_path()
            if client.done:
                return
        tally.epochs += 1


def _overlapped(worker, model, epoch_batches, loss_fn, max_epochs, tally, lookahead) -> None:
    """Compute each gradient while a helper thread pushes the one before and pulls (into a
    buffer of its own, placed into the module between steps)."""
    from concurrent.futures import ThreadPoolExecutor

    client = worker.client
    pulled = np.empty_like(worker.params)
    outgoing = np.empty_like(worker.grads)
    place = _Lookahead(worker, pulled, lookahead)
    tally.start()
    client.pull_flat(out=pulled, update=True)
    place(client.version)
    tally.on_path()

    def exchange(samples: int, loss: float, base: int) -> bool:
        outcome = client.push(outgoing, samples, loss, base_version=base)
        if client.done or outcome.get("outcome") == "done":
            return False
        client.pull_flat(out=pulled, update=True)
        return not client.done

    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="pstrain-link") as link:
        in_flight = None
        while max_epochs is None or tally.epochs < max_epochs:
            for inputs, targets in _nonempty(epoch_batches(tally.epochs), tally.epochs):
                computed_on = place.version
                value = _step(worker, model, loss_fn, inputs, targets, tally)
                tally.start()
                if in_flight is not None:
                    if not in_flight.result():
                        tally.on_path()
                        return
                    place(client.version)
                worker.copy_grads_into(outgoing)
                in_flight = link.submit(exchange, len(targets), value, computed_on)
                tally.on_path()
            tally.epochs += 1
        if in_flight is not None:
            in_flight.result()


class _Lookahead:
    """Places the pulled weights into the module's parameters: as pulled, or moved
    ``rounds`` rounds further along the last round's move (where they will be when the
    gradient computed on them arrives: weight prediction, as ``pstrain worker --lookahead``)."""

    def __init__(self, worker: ModuleWorker, pulled: np.ndarray, rounds: float) -> None:
        self.params = worker._params_t
        self.pulled = torch.from_numpy(pulled)
        self.rounds = float(rounds)
        self.last: Optional["torch.Tensor"] = None
        self.version = -1

    def __call__(self, version: int) -> None:
        if version == self.version:
            return  # nothing newer came: the parameters hold it already
        with torch.no_grad():
            if self.rounds > 0 and self.last is not None and version > self.version:
                torch.lerp(self.last, self.pulled, 1.0 + self.rounds, out=self.params)
                self.last.copy_(self.pulled)
            else:
                self.params.copy_(self.pulled)
                if self.rounds > 0:
                    self.last = self.pulled.clone()
        self.version = version


def evaluate(model: "torch.nn.Module", batches: Iterable[Tuple["torch.Tensor", "torch.Tensor"]]
             ) -> float:
    """Top-1 accuracy of a classifier over ``(inputs, targets)`` batches."""
    model.eval()
    correct = total = 0
    with torch.no_grad():
        for x, y in batches:
            correct += int((model(x).argmax(1) == y).sum())
            total += len(y)
    return correct / max(1, total)


def load_export(module: "torch.nn.Module", path: str, strict: Optional[bool] = None) -> List[str]:
    """Loads a ``pstrain export`` file into ``module``: strictly when the module has no
    buffers (or ``strict=True``), else parameters only; returns the keys left as they were."""
    from safetensors.torch import load_file

    state = load_file(path)
    has_buffers = any(True for _ in module.buffers())
    strict = (not has_buffers) if strict is None else strict
    result = module.load_state_dict(state, strict=strict)
    return list(getattr(result, "missing_keys", []))
