"""The loops of a torch worker (``pstrain.torch.train_worker``): pull, compute, push in turn,
or computing each gradient while a helper thread pushes the one before and pulls."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Iterable, List, Optional

import numpy as np
import torch

if TYPE_CHECKING:  # pragma: no cover
    from .torch import ModuleWorker


class Tally:
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


def _step(worker: "ModuleWorker", model, loss_fn, inputs, targets, tally: Tally) -> float:
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


def in_turn(worker, model, epoch_batches, loss_fn, max_epochs, tally) -> None:
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


def overlapped(worker, model, epoch_batches, loss_fn, max_epochs, tally, lookahead) -> None:
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

    def __init__(self, worker: "ModuleWorker", pulled: np.ndarray, rounds: float) -> None:
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
