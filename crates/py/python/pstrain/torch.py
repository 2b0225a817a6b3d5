"""Your own PyTorch module on pstrain's servers.

- ``parameters_of(module)``: the module's trainable parameters as pstrain serves them: names
  and shapes as ``named_parameters()`` gives them, in that order, with their current values.
- ``Server.from_module(module, ...)`` (in ``pstrain``): a shard serving that module.
- ``ModuleWorker(client, module)``: the module's parameters and gradients become views into two
  flat float32 buffers; ``pull()`` reads the servers' weights straight into the parameters
  (from the sockets, or from shared memory when the shard is on this host; no per-tensor
  copy) and ``push()`` sends the gradients ``backward()`` accumulated there.
- ``train_worker(...)``: a whole worker: pull, forward, backward, push, until the run is done.

Only trainable parameters travel (``requires_grad``, as an optimizer given
``filter(lambda p: p.requires_grad, ...)`` sees them). Everything else stays **local** to each
worker, as the module built it:
- buffers that are not parameters (BatchNorm's running mean and variance, counters): every
  worker keeps the statistics of the batches it saw;
- frozen parameters (``requires_grad=False``, a fine-tuned model's backbone): the servers'
  optimizer never touches them (weight decay would move a served one though its gradient is
  zero), and they never cross the link. ``build_model`` must give every worker the same
  values (load them, or seed): ``train_worker`` builds the module twice and refuses one whose
  frozen parameters differ between the two.

Normalisation statistics kept local are not the servers' weights' statistics: a module
holding the servers' weights (an evaluation, an export loaded back) has its BatchNorm running
mean and variance as built, and evaluates worse for it. ``recompute_buffers(module,
batches)`` recomputes them from training batches under those weights (as
``torch.optim.swa_utils.update_bn`` does after weight averaging); ``pstrain.ray_torch``
does so before each evaluation.

``pstrain export`` writes the trainable parameters only. A module with buffers or frozen
parameters therefore loads an export with ``load_state_dict(..., strict=False)``
(``load_export`` below does that and says which keys it left as they were); a module with
neither (the MNIST example's network) loads it with ``strict=True``. Which parameters are
trainable is fixed when the servers start: unfreezing one later is a different layout.

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
from ._torch_loops import Tally, in_turn, overlapped

__all__ = ["parameters_of", "ModuleWorker", "train_worker", "load_export", "evaluate",
           "recompute_buffers"]


def _named(module: "torch.nn.Module") -> List[Tuple[str, "torch.nn.Parameter"]]:
    """The parameters the servers hold: the trainable ones, in ``named_parameters()`` order."""
    every = list(module.named_parameters())
    if not every:
        raise ValueError("the module has no parameters")
    named = [(name, p) for name, p in every if p.requires_grad]
    if not named:
        raise ValueError(f"every parameter of the module is frozen (requires_grad=False, "
                         f"{len(every)} of them): there is nothing to train")
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
    """``{name: float32 array}`` of the module's trainable parameters, in
    ``named_parameters()`` order (the servers' layout order), copied from their current
    values."""
    return {
        name: p.detach().numpy().astype(np.float32, copy=True) for name, p in _named(module)
    }


def _check_layout(client: Client, module: "torch.nn.Module",
                  named: List[Tuple[str, "torch.nn.Parameter"]]) -> None:
    theirs = [(name, tuple(shape)) for name, shape in client.layout.items()]
    ours = [(name, tuple(p.shape)) for name, p in named]
    if ours == theirs:
        return
    their_names = dict(theirs)
    our_names = dict(ours)
    frozen = {name for name, p in module.named_parameters() if not p.requires_grad}
    problems = [f"`{n}` is not on the servers" for n in our_names if n not in their_names]
    problems += [
        f"`{n}` is frozen in the module (requires_grad=False) but trained on the servers"
        if n in frozen else f"`{n}` is missing from the module"
        for n in their_names if n not in our_names
    ]
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
        _check_layout(client, module, self._named)
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
    try:
        model = build_model()
        _check_frozen_repeat(model, build_model)
    except BaseException:
        client.leave()
        raise
    model.train()
    worker = ModuleWorker(client, model, in_lane=not overlap)
    tally = Tally(step_times)
    started = time.perf_counter()
    try:
        loop = functools.partial(overlapped, lookahead=lookahead) if overlap else in_turn
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


def _check_frozen_repeat(model: "torch.nn.Module", build_model: Callable) -> None:
    """Frozen parameters stay each worker's own, so every worker must build the same:
    ``ValueError`` if a second ``build_model()`` gives other values (an unseeded
    initialisation), which would have each worker train against another frozen network."""
    frozen = [(name, p) for name, p in model.named_parameters() if not p.requires_grad]
    if not frozen:
        return
    again = dict(build_model().named_parameters())
    differ = [name for name, p in frozen
              if name not in again or not torch.equal(p.detach(), again[name].detach())]
    if differ:
        raise ValueError(
            f"build_model() gives other values of the frozen parameters each time it is called "
            f"({', '.join(f'`{n}`' for n in differ[:4])}): they are not served, so every worker "
            "must build the same ones; load them, or seed the initialisation "
            "(torch.manual_seed) inside build_model")


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


def recompute_buffers(module: "torch.nn.Module",
                      batches: Iterable[Tuple["torch.Tensor", "torch.Tensor"]],
                      max_batches: int = 50) -> int:
    """Recomputes the running statistics of the module's batch-norm layers as the plain
    average over up to ``max_batches`` of ``(inputs, targets)`` batches, forward only, under
    the module's current weights; returns the batches used (0, touching nothing, for a module
    without such layers). The module is left in the mode it was in."""
    norms = [m for m in module.modules()
             if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)
             and m.track_running_stats and m.running_mean is not None]
    if not norms or max_batches <= 0:
        return 0
    momenta = [m.momentum for m in norms]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # a cumulative average: every batch counts the same
    was_training = module.training
    module.train()
    used = 0
    try:
        with torch.no_grad():
            for inputs, _ in batches:
                module(inputs)
                used += 1
                if used >= max_batches:
                    break
    finally:
        for m, momentum in zip(norms, momenta):
            m.momentum = momentum
        module.train(was_training)
    return used


def load_export(module: "torch.nn.Module", path: str, strict: Optional[bool] = None) -> List[str]:
    """Loads a ``pstrain export`` file into ``module``: strictly when the module has neither
    buffers nor frozen parameters (or ``strict=True``), else the trainable parameters only;
    returns the keys left as they were. A parameter the module shares under several names
    (tied embeddings) is served, and exported, under its first name; it loads under all."""
    from safetensors.torch import load_file

    state = load_file(path)
    first_name: Dict[int, str] = {}
    for name, p in module.named_parameters(remove_duplicate=False):
        first = first_name.setdefault(id(p), name)
        if first != name and first in state and name not in state:
            state[name] = state[first]
    local = any(True for _ in module.buffers()) or any(
        not p.requires_grad for p in module.parameters())
    strict = (not local) if strict is None else strict
    result = module.load_state_dict(state, strict=strict)
    return list(getattr(result, "missing_keys", []))
