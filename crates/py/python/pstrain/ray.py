"""``python -m pstrain.ray``: run ``pstrain train`` on a Ray cluster.

Ray places and starts the processes; pstrain does the training. The driver reserves one
placement-group bundle per server shard and per worker (``--placement``), starts a Ray actor
in each that hosts pstrain's Rust shard or worker (the GIL released), learns each shard's
bound address from its actor (every shard binds port 0: no fixed ports), connects to the
shards as an observer to stream progress and test-set evaluations to the job log, and tears
everything down at the end. Tensors travel Rust-to-Rust over pstrain's TCP protocol, never
through Ray's object store.

Every flag that is not listed under "Ray" below is a ``pstrain train`` flag, with the same
meaning and defaults (``--mode``, ``--workers``, ``--shards``, ``--model``, ``--epochs``,
``--data-dir``, ...). The data folder must exist on every node (or leave ``--data-dir`` out:
each process then downloads MNIST into ``./data/mnist`` of its working directory).

    ray job submit --working-dir . -- python -m pstrain.ray --placement spread \\
        --shards 2 --workers 2 --mode sync --data-dir /data/mnist
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import uuid
from typing import List, Optional, Sequence

import ray
from ray.experimental import internal_kv
from ray.util.placement_group import placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from . import _pstrain

#: ``--placement`` choices and the Ray strategies they stand for.
STRATEGIES = {
    # As few nodes as possible (everything on one node if it fits): the fastest network.
    "pack": "PACK",
    # Over as many nodes as possible, several per node allowed when nodes run out.
    "spread": "SPREAD",
    # Every shard and worker on a node of its own; fails if the cluster has too few nodes.
    "strict-spread": "STRICT_SPREAD",
}


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m pstrain.ray",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        add_help=False,
    )
    g = p.add_argument_group("Ray")
    g.add_argument("--address", help="Ray cluster to join (default: the job's cluster, "
                   "RAY_ADDRESS, or a new local one)")
    g.add_argument("--placement", choices=sorted(STRATEGIES), default="pack",
                   help="how shards and workers are spread over nodes (default: pack)")
    g.add_argument("--cpus-per-worker", type=float, default=None,
                   help="CPUs reserved per worker (default: its --threads)")
    g.add_argument("--cpus-per-shard", type=float, default=1.0,
                   help="CPUs reserved per server shard (default: 1)")
    g.add_argument("--placement-timeout", type=float, default=120.0,
                   help="seconds to wait for the cluster to grant the placement group")
    g.add_argument("--max-restarts", type=int, default=3,
                   help="times Ray restarts an actor that died (default: 3): a worker rejoins "
                        "with its rank and pulls the latest weights; a shard is restarted only "
                        "when the run writes checkpoints (--checkpoint-dir on storage every "
                        "node sees), on its old port, from its newest checkpoint")
    return p


def parse_args(argv: Sequence[str]):
    """The Ray flags, and everything else (the `pstrain train` flags)."""
    return _parser().parse_known_args(list(argv))


def _node_id() -> str:
    return ray.get_runtime_context().get_node_id()


@ray.remote
class ShardActor:
    """Hosts one Rust server shard; it serves from threads of its own.

    When the run writes checkpoints, Ray restarts a shard whose process died: the new one
    binds the port the first one got (kept in Ray's key-value store under `port_key`, so the
    workers find it where they left it), restores its newest checkpoint, and the workers
    reconnect with backoff."""

    def __init__(self, argv: List[str], port_key: str, token: str,
                 params: Optional[dict] = None) -> None:
        known = internal_kv._internal_kv_get(port_key)
        listen = f"0.0.0.0:{int(known)}" if known else "0.0.0.0:0"
        # The token comes in the actor's arguments (Ray's own channel), never on a command
        # line or in a log; the shard refuses every peer that cannot prove it holds it.
        # `params` ({name: float32 array}) serves a model of the caller's (pstrain.ray_torch).
        self.server = _pstrain.ShardServer(argv + ["--listen", listen], params, token)
        if known is None:
            port = self.server.address.rsplit(":", 1)[1]
            internal_kv._internal_kv_put(port_key, port.encode())

    def where(self) -> dict:
        host, port = self.server.address.rsplit(":", 1)
        if host in ("0.0.0.0", "[::]", "::"):
            host = ray.util.get_node_ip_address()
        where = {"address": f"{host}:{port}", "node": _node_id(), "pid": os.getpid()}
        if self.server.metrics_port is not None:
            # /metrics and the live page (`--metrics-addr`; off loopback they need the token).
            where["metrics_url"] = f"http://{host}:{self.server.metrics_port}/"
        return where

    def wait(self, timeout: float) -> Optional[dict]:
        return self.server.wait(timeout)

    def stop(self) -> None:
        self.server.stop()


@ray.remote
class WorkerActor:
    """Hosts one Rust worker: it loads its data and trains until the run is done. If its
    process dies, Ray restarts it and retries ``run``: the worker rejoins with its rank."""

    def where(self) -> dict:
        return {"node": _node_id(), "pid": os.getpid()}

    def run(self, argv: List[str], token: str) -> str:
        return _pstrain.run_worker(argv, token)


class Placement:
    """One placement-group bundle per shard (first) and per worker, each shard's port key in
    Ray's key-value store, and the actors started in the bundles; ``close`` tears it all
    down. Shared by the drivers of pstrain's own workers and of PyTorch ones."""

    def __init__(self, shards: int, cpus_per_shard: float, workers: int,
                 cpus_per_worker: float, placement: str) -> None:
        self.shards, self.workers = shards, workers
        self.cpus_per_shard, self.cpus_per_worker = cpus_per_shard, cpus_per_worker
        self.placement = placement
        self.bundles = [{"CPU": cpus_per_shard}] * shards + [{"CPU": cpus_per_worker}] * workers
        self.pg = placement_group(self.bundles, strategy=STRATEGIES[placement])
        self.port_keys = [f"pstrain-{uuid.uuid4().hex}-shard-{i}" for i in range(shards)]
        self.actors: list = []

    def wait_granted(self, timeout: float) -> None:
        ready, _ = ray.wait([self.pg.ready()], timeout=timeout)
        if not ready:
            raise RuntimeError(
                f"the cluster did not grant {len(self.bundles)} bundles ({self.shards} shards x "
                f"{self.cpus_per_shard} CPU, {self.workers} workers x {self.cpus_per_worker} "
                f"CPU) with --placement {self.placement} within {timeout:.0f} s; "
                f"cluster resources: {ray.cluster_resources()}"
            )

    def start(self, actor_class, index: int, cpus: float, restarts: int, *args):
        """An actor in bundle ``index`` (restarted by Ray up to ``restarts`` times)."""
        actor = actor_class.options(
            num_cpus=cpus,
            max_restarts=restarts,
            max_task_retries=restarts,
            scheduling_strategy=PlacementGroupSchedulingStrategy(
                placement_group=self.pg, placement_group_bundle_index=index
            ),
        ).remote(*args)
        self.actors.append(actor)
        return actor

    def close(self) -> None:
        for a in self.actors:
            ray.kill(a)
        remove_placement_group(self.pg)
        for key in self.port_keys:
            internal_kv._internal_kv_del(key)


def _log(record: dict) -> None:
    # One write of the line and its newline: print() writes them separately, and Ray's log
    # thread may print an actor's line between the two (seen: a summary line with a shard's
    # closing report glued to its end).
    sys.stdout.write(json.dumps(record) + "\n")
    sys.stdout.flush()


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if "-h" in args or "--help" in args:
        _parser().print_help()
        print("\n`pstrain train` flags (all accepted here):\n")
        print(_pstrain.help("train"))
        return 0
    opts, train_argv = parse_args(args)
    # Parses the training flags and loads the data first: a typo fails before Ray starts.
    run = _pstrain.RemoteRun(list(train_argv))
    cpus_worker = opts.cpus_per_worker if opts.cpus_per_worker is not None else float(run.threads)

    started = time.time()
    ray.init(address=opts.address, log_to_driver=True)
    place = Placement(run.shards, opts.cpus_per_shard, run.workers, cpus_worker,
                      opts.placement)
    try:
        place.wait_granted(opts.placement_timeout)
        # Without checkpoints a restarted shard would start from the initial weights.
        shard_restarts = opts.max_restarts if run.checkpointing else 0
        shards = [
            place.start(ShardActor, i, opts.cpus_per_shard, shard_restarts,
                        run.server_args() + ["--shard", str(i)], place.port_keys[i], run.token)
            for i in range(run.shards)
        ]
        # Rendezvous through Ray: each shard reports the address it bound.
        shard_places = ray.get([s.where.remote() for s in shards])
        servers = [p["address"] for p in shard_places]
        workers = [
            place.start(WorkerActor, run.shards + r, cpus_worker, opts.max_restarts)
            for r in range(run.workers)
        ]
        worker_places = ray.get([w.where.remote() for w in workers])
        startup = time.time() - started
        nodes = {p["node"] for p in shard_places + worker_places}
        _log({
            "event": "placement",
            "placement": opts.placement,
            "startup_s": round(startup, 3),
            "nodes": len(nodes),
            "shards": [{"shard": i, **p} for i, p in enumerate(shard_places)],
            "workers": [{"rank": r, **p} for r, p in enumerate(worker_places)],
        })

        run.connect(servers)
        worker_argv = run.worker_args() + ["--servers", ",".join(servers)]
        pending = {
            w.run.remote(worker_argv + ["--rank", str(r)], run.token): r
            for r, w in enumerate(workers)
        }
        reports = [""] * run.workers
        while pending:
            done, _ = ray.wait(list(pending), num_returns=1, timeout=0.2)
            for ref in done:
                rank = pending.pop(ref)
                try:
                    reports[rank] = ray.get(ref)
                except Exception as e:
                    raise RuntimeError(f"worker {rank} failed: {e}") from e
            run.tick()
        sys.stdout.flush()
        summary = json.loads(run.finish(reports))
        shard_stats = ray.get([s.wait.remote(30.0) for s in shards])
        # An actor restarted by Ray runs in a new process.
        final_pids = [p["pid"] for p in ray.get([w.where.remote() for w in workers])]
        shard_pids = [p["pid"] for p in ray.get([s.where.remote() for s in shards])]
        _log({
            "event": "ray_summary",
            "test_accuracy": summary["test_accuracy"],
            "wall_time_s": round(time.time() - started, 3),
            "startup_s": round(startup, 3),
            "training_s": summary["wall_time_s"],
            "nodes": len(nodes),
            "worker_pids": final_pids,
            "shard_pids": shard_pids,
            "workers": [json.loads(r.strip().splitlines()[-1]) for r in reports],
            "shards": shard_stats,
            "per_worker": summary["per_worker"],
        })
        return 0
    finally:
        place.close()

if __name__ == "__main__":
    sys.exit(main())
