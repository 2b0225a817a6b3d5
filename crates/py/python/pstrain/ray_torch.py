"""Train any PyTorch module on a Ray cluster with pstrain: Rust server shards, PyTorch workers.

Placed exactly as ``python -m pstrain.ray`` places pstrain's own processes: one
placement-group bundle per shard and per worker (``placement``), shards in Ray actors hosting
pstrain's Rust shard (serving the module's parameters, see ``pstrain.torch``), workers in Ray
actors running ``pstrain.torch.train_worker``; Ray restarts a worker that dies (it rejoins
with its rank and pulls the latest weights) and a shard when the run writes checkpoints. The
run's token is made here and handed to the actors in memory. Gradients and weights travel
Rust-to-Rust over pstrain's TCP protocol, never through Ray's object store.

From a script (``ray job submit --working-dir . -- python my_script.py``)::

    from pstrain.ray_torch import train_module
    summary = train_module(build_model, batches, loss, evaluate=evaluate,
                           workers=2, mode="sync", epochs=1, optimizer="adam", lr=1e-3,
                           train_samples=60000, batch_size=64)

Or from the command line, naming a file that defines ``build_model()``,
``batches(rank, workers, epoch)``, ``loss(output, target)`` and optionally ``evaluate(model)``
(and ``TRAIN_SAMPLES``); every other flag is a ``pstrain server`` flag::

    ray job submit --working-dir . -- python -m pstrain.ray_torch my_model.py \\
        --workers 2 --mode async --epochs 1 --batch-size 64

Progress goes to the job log as JSON lines (``{"event": "progress", ...}``), then a
``{"event": "ray_summary", ...}`` line with the test accuracy ``evaluate`` gave.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys
import time
import uuid
from typing import Callable, Dict, List, Optional, Sequence

import ray

from . import Client, _flags, _pstrain
from .ray import STRATEGIES, Placement, ShardActor, _log, _node_id


@ray.remote
class TorchWorkerActor:
    """Hosts one PyTorch worker (``pstrain.torch.train_worker``). If its process dies, Ray
    restarts it and retries ``run``: the worker rejoins with its rank."""

    def where(self) -> dict:
        return {"node": _node_id(), "pid": os.getpid()}

    def run(self, servers: List[str], rank: int, token: str, build_model, batches, loss,
            threads: int, max_epochs: Optional[int]) -> dict:
        from .torch import train_worker

        return train_worker(servers, build_model, batches, loss, rank=rank, token=token,
                            threads=threads, max_epochs=max_epochs)


def _evaluate_now(servers: List[str], token: str, build_model, evaluate,
                  recalibrate: Optional[Callable] = None) -> Optional[float]:
    """The servers' current weights in a fresh module, scored by ``evaluate``; its batch-norm
    statistics first recomputed under those weights over ``recalibrate()``'s batches (a
    fresh module's are as built)."""
    if evaluate is None:
        return None
    from .torch import ModuleWorker, recompute_buffers

    model = build_model()
    with Client(servers, role="observer", token=token) as observer:
        ModuleWorker(observer, model).pull(wait=False)
    if recalibrate is not None:
        recompute_buffers(model, recalibrate(), RECALIBRATION_BATCHES)
    return float(evaluate(model))


# Batches of rank 0's first epoch that recompute a module's batch-norm statistics before it
# is evaluated (`pstrain.torch.recompute_buffers`).
RECALIBRATION_BATCHES = 50


def train_module(
    build_model: Callable,
    batches: Callable,
    loss: Callable,
    *,
    evaluate: Optional[Callable] = None,
    workers: int = 2,
    shards: int = 1,
    mode: str = "async",
    placement: str = "pack",
    threads: int = 1,
    cpus_per_worker: Optional[float] = None,
    cpus_per_shard: float = 1.0,
    max_restarts: int = 3,
    placement_timeout: float = 120.0,
    progress_every: float = 2.0,
    eval_every: Optional[float] = None,
    token: Optional[str] = None,
    address: Optional[str] = None,
    extra_args: Sequence[str] = (),
    **server_flags: object,
) -> dict:
    """Trains ``build_model()`` on the cluster; returns the summary (also logged).

    ``batches(rank, workers, epoch)`` yields a worker's ``(inputs, targets)`` for one epoch;
    ``loss(output, target)`` is the loss to minimise; ``evaluate(model)`` (optional) returns
    the test accuracy of a module holding the weights, at the end and every ``eval_every``
    seconds (its batch-norm statistics, which stay each worker's own, first recomputed under
    those weights over rank 0's first batches: ``pstrain.torch.recompute_buffers``). Every other keyword is a ``pstrain server`` flag (``optimizer``, ``lr``,
    ``lr_schedule``, ``epochs``, ``iterations``, ``batch_size``, ``train_samples``,
    ``checkpoint_dir``, ``checkpoint_every``, ``metrics_addr``, ...): with ``iterations`` the
    run ends when the shards have made that many updates, else when every worker has made
    ``epochs`` passes over its batches (as pstrain's own workers do; default 5).
    """
    from .torch import parameters_of

    if placement not in STRATEGIES:
        raise ValueError(f"placement must be one of {sorted(STRATEGIES)}, not {placement!r}")
    # The shards keep serving after the workers are done, so the final weights can be read
    # and evaluated; the driver stops them then (their final checkpoint is written at stop).
    server_argv = (["--mode", mode, "--workers", str(workers), "--shards", str(shards),
                    "--keep-running"] + _flags(server_flags, "train_module") + list(extra_args))
    started = time.time()
    params = parameters_of(build_model())
    token = token or _pstrain.new_token()
    checkpointing = server_flags.get("checkpoint_dir") is not None
    epochs = server_flags.get("epochs")
    max_epochs = None if server_flags.get("iterations") else int(epochs or 5)  # type: ignore
    cpus_worker = float(threads) if cpus_per_worker is None else cpus_per_worker
    if not ray.is_initialized():
        ray.init(address=address, log_to_driver=True)
    place = Placement(shards, cpus_per_shard, workers, cpus_worker, placement)
    try:
        place.wait_granted(placement_timeout)
        params_ref = ray.put(params)
        shard_actors = [
            place.start(ShardActor, i, cpus_per_shard, max_restarts if checkpointing else 0,
                        server_argv + ["--shard", str(i)], place.port_keys[i], token,
                        params_ref)
            for i in range(shards)
        ]
        shard_places = ray.get([s.where.remote() for s in shard_actors])
        servers = [p["address"] for p in shard_places]
        worker_actors = [
            place.start(TorchWorkerActor, shards + r, cpus_worker, max_restarts)
            for r in range(workers)
        ]
        worker_places = ray.get([w.where.remote() for w in worker_actors])
        startup = time.time() - started
        nodes = {p["node"] for p in shard_places + worker_places}
        _log({
            "event": "placement", "placement": placement, "startup_s": round(startup, 3),
            "nodes": len(nodes), "model": {n: list(v.shape) for n, v in params.items()},
            "shards": [{"shard": i, **p} for i, p in enumerate(shard_places)],
            "workers": [{"rank": r, **p} for r, p in enumerate(worker_places)],
        })

        def recalibrate():
            return batches(0, workers, 0)

        training_started = time.time()
        pending = {
            w.run.remote(servers, r, token, build_model, batches, loss, threads, max_epochs): r
            for r, w in enumerate(worker_actors)
        }
        reports: List[Optional[dict]] = [None] * workers
        evaluations: List[Dict[str, float]] = []
        eval_s = 0.0
        next_progress = time.time() + progress_every
        next_eval = time.time() + eval_every if eval_every else None
        with Client(servers, role="observer", token=token) as observer:
            while pending:
                done, _ = ray.wait(list(pending), num_returns=1, timeout=0.2)
                for ref in done:
                    rank = pending.pop(ref)
                    try:
                        reports[rank] = ray.get(ref)
                    except Exception as e:
                        raise RuntimeError(f"worker {rank} failed: {e}") from e
                now = time.time()
                if now >= next_progress and pending:
                    stats = observer.stats()
                    _log({"event": "progress", "time_s": round(now - training_started, 3),
                          "version": max(s["version"] for s in stats),
                          "gradients_applied": sum(s["gradients_applied"] for s in stats)})
                    next_progress = now + progress_every
                if next_eval is not None and now >= next_eval and pending:
                    t = time.time()
                    acc = _evaluate_now(servers, token, build_model, evaluate, recalibrate)
                    spent = time.time() - t
                    evaluations.append({"time_s": round(t - training_started - eval_s, 3),
                                        "test_accuracy": acc, "eval_s": round(spent, 3)})
                    _log({"event": "eval", **evaluations[-1]})
                    eval_s += spent
                    next_eval = time.time() + eval_every
        training = time.time() - training_started - eval_s
        accuracy = _evaluate_now(servers, token, build_model, evaluate, recalibrate)
        ray.get([s.stop.remote() for s in shard_actors])
        shard_stats = ray.get([s.wait.remote(30.0) for s in shard_actors])
        worker_pids = [p["pid"] for p in ray.get([w.where.remote() for w in worker_actors])]
        shard_pids = [p["pid"] for p in ray.get([s.where.remote() for s in shard_actors])]
        samples = sum(r["samples"] for r in reports if r)
        summary = {
            "event": "ray_summary",
            "test_accuracy": accuracy,
            "wall_time_s": round(time.time() - started, 3),
            "startup_s": round(startup, 3),
            "training_s": round(training, 3),
            "samples_per_s": round(samples / training, 1) if training > 0 else None,
            "nodes": len(nodes),
            "worker_pids": worker_pids,
            "shard_pids": shard_pids,
            "workers": reports,
            "shards": shard_stats,
            "evaluations": evaluations,
        }
        _log(summary)
        return summary
    finally:
        place.close()

def _load_script(path: str):
    """The user's file as a module whose functions Ray ships by value to the workers."""
    name = "pstrain_job_" + uuid.uuid4().hex[:8]
    if not os.path.isfile(path):
        what = "a folder, not a Python file" if os.path.isdir(path) else "no such file"
        raise SystemExit(f"cannot load {path}: {what} (looked from {os.getcwd()})")
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise SystemExit(f"cannot load {path}: not a Python file")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    ray.cloudpickle.register_pickle_by_value(module)
    missing = [f for f in ("build_model", "batches", "loss") if not hasattr(module, f)]
    if missing:
        raise SystemExit(f"{path} does not define {', '.join(missing)}")
    return module


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m pstrain.ray_torch", description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("script", help="a Python file defining build_model, batches, loss "
                   "(and optionally evaluate, TRAIN_SAMPLES)")
    p.add_argument("--address", help="Ray cluster to join (default: the job's cluster)")
    p.add_argument("--placement", choices=sorted(STRATEGIES), default="pack")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--shards", type=int, default=1)
    p.add_argument("--mode", default="async")
    p.add_argument("--threads", type=int, default=1, help="torch threads per worker")
    p.add_argument("--max-restarts", type=int, default=3)
    p.add_argument("--eval-every", type=float, default=None, help="seconds between evaluations")
    p.add_argument("--epochs", type=int, default=None, help="passes over each worker's batches")
    p.add_argument("--iterations", type=int, default=None, help="server updates to make")
    opts, rest = p.parse_known_args(list(sys.argv[1:] if argv is None else argv))
    module = _load_script(opts.script)
    if getattr(module, "TRAIN_SAMPLES", None) and "--train-samples" not in rest:
        rest += ["--train-samples", str(module.TRAIN_SAMPLES)]
    summary = train_module(
        module.build_model, module.batches, module.loss,
        evaluate=getattr(module, "evaluate", None), workers=opts.workers, shards=opts.shards,
        mode=opts.mode, placement=opts.placement, threads=opts.threads,
        max_restarts=opts.max_restarts, eval_every=opts.eval_every, address=opts.address,
        epochs=opts.epochs, iterations=opts.iterations, extra_args=rest,
    )
    return 0 if summary else 1


if __name__ == "__main__":
    sys.exit(main())
