#!/usr/bin/env python3
"""PyTorch workers through pstrain beside a Ray + PyTorch parameter server, in one sitting.

The same model (the PyTorch MNIST example's network, examples/torch_mnist.py), the same data
split (every 2nd image per worker, reshuffled per epoch), the same optimizer on the server
(Adam, lr 1e-3), batch 64, 2 workers, one process each with one torch thread, sync and async:

- pstrain: a Rust shard serving the module (`pstrain.Server.from_module`), two worker
  processes running `pstrain.torch.train_worker` (pull into the module's parameters, push its
  gradients, over pstrain's TCP);
- Ray + PyTorch: a `ParameterServer` actor holding the module and its optimizer and two
  `DataWorker` actors, written the way Ray's parameter-server example writes them (weights
  and gradients through Ray's object store, the driver's loop applying them).

Both are timed by the same rule: samples/s over the run after its first 10 updates; the
weights are snapshotted every `--snapshot-every` updates (a copy, not an evaluation) and the
snapshots are scored on the 10k test set after the run, so evaluation costs neither side any
time; time to 98.5% is the first snapshot from which every later one is at 98.5% or more.
Also measured: one torch worker's compute-only samples/s (forward, backward, zero_grad on
real batches), for "2 workers through pstrain against twice one worker's compute", and two
such compute-only workers running at once (what the machine gives two workers with no
parameter server: on 2 cores the shard's CPU then comes out of the workers' time); both
before and after the runs, and their means used (the machine's speed drifts). In sync, the
barrier's own cost is measured apart from the server path's: from each worker's compute time
per step, the rate a free server path would give (every step as long as its slower worker's
compute), and pstrain's samples/s over it.

    python3 bench/torch_workers.py --data-dir ../shared/data/mnist --out bench/results.json

Writes its figures under "torch_workers" in the --out JSON (other keys are kept). Needs torch,
ray and the pstrain package. Not part of CI: a benchmark (about 15 minutes on 2 cores).
"""

import argparse
import importlib.util
import json
import multiprocessing as mp
import os
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
EXAMPLE = HERE.parent / "examples" / "torch_mnist.py"
TARGET = 0.985
WORKERS = 2


def example(data_dir):
    spec = importlib.util.spec_from_file_location("torch_mnist_bench", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.DATA_DIR = str(data_dir)
    return module


def batch_stream(ex, rank, epochs):
    for epoch in range(epochs):
        yield from ex.batches(rank, WORKERS, epoch)


def compute_only(data_dir, seconds):
    """One worker's forward + backward + zero_grad samples/s on real batches, one thread."""
    import torch
    torch.set_num_threads(1)
    ex = example(data_dir)
    model = ex.build_model()
    stream = batch_stream(ex, 0, 100)
    for _ in range(5):
        x, y = next(stream)
        model.zero_grad()
        ex.loss(model(x), y).backward()
    done, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        x, y = next(stream)
        model.zero_grad()
        ex.loss(model(x), y).backward()
        done += len(y)
    return done / (time.perf_counter() - start)


def _compute_only_into(data_dir, seconds, out):
    out.put(compute_only(data_dir, seconds))


def compute_two_at_once(data_dir, seconds):
    """Two compute-only workers in two processes at the same time: what 2 torch workers can
    do on this machine with no parameter server at all (cores, caches and memory shared)."""
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    procs = [ctx.Process(target=_compute_only_into, args=(str(data_dir), seconds, out))
             for _ in range(WORKERS)]
    for p in procs:
        p.start()
    rates = [out.get() for _ in procs]
    for p in procs:
        p.join()
    return sum(rates)


def _pstrain_worker(address, rank, data_dir, epochs, token, out, overlap=False,
                    step_times=False):
    from pstrain.torch import train_worker
    ex = example(data_dir)
    out.put(train_worker([address], ex.build_model, ex.batches, ex.loss, rank=rank,
                         token=token, threads=1, max_epochs=epochs, overlap=overlap,
                         step_times=step_times))


def free_path_ceiling(reports, batch):
    """Sync's ceiling with a server path that cost nothing: step i ends when the slower
    worker's compute of step i does, so `samples / sum(max over workers)` (after the first
    10 steps, as `steady_rate`). Also each worker's mean compute a step and the mean of the
    slowest: what the barrier itself takes, apart from the parameter server's path."""
    times = [r.pop("step_compute_s") for r in reports]
    steps = min(len(t) for t in times)
    if steps <= 10:
        return None
    slowest = [max(t[i] for t in times) for i in range(10, steps)]
    return {"samples_per_s": round(batch * len(times) * len(slowest) / sum(slowest), 1),
            "mean_compute_per_step_s": round(
                sum(sum(t[10:steps]) for t in times) / (len(times) * len(slowest)), 5),
            "mean_slowest_per_step_s": round(sum(slowest) / len(slowest), 5)}


def time_to_target(snapshots, scores):
    for i in range(len(scores)):
        if all(s >= TARGET for s in scores[i:]):
            return snapshots[i]["t"]
    return None


def steady_rate(trace):
    """Samples/s from the first point past 10 updates to the last."""
    start = next((p for p in trace if p["updates"] >= 10), None)
    end = trace[-1]
    if start is None or end["t"] <= start["t"]:
        return None
    return (end["samples"] - start["samples"]) / (end["t"] - start["t"])


def pstrain_run(data_dir, mode, epochs, snapshot_every, lanes=True, overlap=False):
    import numpy as np
    import pstrain
    ex = example(data_dir)
    token = pstrain.new_token()
    server = pstrain.Server.from_module(
        ex.build_model(), workers=WORKERS, mode=mode, optimizer="adam", lr=1e-3,
        lr_schedule="constant", batch_size=ex.BATCH, train_samples=ex.TRAIN_SAMPLES,
        epochs=epochs, keep_running=True, token=token,
        # 0: no shared-memory lanes, every tensor over loopback TCP (for comparison).
        lane_budget=None if lanes else 0)
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    procs = [ctx.Process(target=_pstrain_worker,
                         args=(server.address, r, str(data_dir), epochs, token, out,
                               overlap and mode != "sync", mode == "sync"))
             for r in range(WORKERS)]
    for p in procs:
        p.start()
    observer = pstrain.Client([server.address], role="observer", token=token)
    buf = np.zeros(observer.size, np.float32)
    trace, snapshots, next_snap = [], [], 0
    t0 = None
    while any(p.is_alive() for p in procs):
        s = observer.stats()[0]
        now = time.perf_counter()
        if t0 is None and s["version"] > 0:
            t0 = now
        if t0 is not None:
            trace.append({"t": now - t0, "updates": s["version"], "samples": s["samples_applied"]})
            if s["version"] >= next_snap:
                observer.pull_flat(False, buf)
                snapshots.append({"t": now - t0, "updates": s["version"], "flat": buf.copy()})
                next_snap = s["version"] + snapshot_every
        time.sleep(0.05)
    reports = [out.get() for _ in procs]
    for p in procs:
        p.join()
    observer.pull_flat(False, buf)
    s = observer.stats()[0]
    trace.append({"t": time.perf_counter() - t0, "updates": s["version"],
                  "samples": s["samples_applied"]})
    snapshots.append({"t": trace[-1]["t"], "updates": s["version"], "flat": buf.copy()})
    observer.leave()
    server.stop()
    server.wait(10)
    import torch
    model = ex.build_model()  # scoring: each snapshot loaded into a module, after the run
    scores = []
    for snap in snapshots:
        offset = 0
        with torch.no_grad():
            for _, p in model.named_parameters():
                n = p.numel()
                p.copy_(torch.from_numpy(snap["flat"][offset:offset + n]).view(p.shape))
                offset += n
        scores.append(ex.evaluate(model))
    # Sync workers report each step's compute time (folded into the ceiling, not stored).
    ceiling = free_path_ceiling(reports, ex.BATCH) if mode == "sync" else None
    result = summarize("pstrain", mode, trace, snapshots, scores, reports)
    if ceiling:
        result["free_path_ceiling"] = ceiling
        print(f"  sync with a free server path (the slower worker's compute each step): "
              f"{ceiling['samples_per_s']} samples/s", flush=True)
    return result


def summarize(system, mode, trace, snapshots, scores, reports=None):
    rate = steady_rate(trace)
    result = {
        "system": system, "mode": mode, "samples_per_s": round(rate, 1) if rate else None,
        "time_to_98_5_s": time_to_target(snapshots, scores),
        "final_accuracy": scores[-1], "updates": trace[-1]["updates"],
        "wall_s": round(trace[-1]["t"], 2),
        "snapshots": [{"t": round(s["t"], 2), "updates": s["updates"], "acc": a}
                      for s, a in zip(snapshots, scores)],
    }
    if reports:
        result["workers"] = reports
    print(f"{system} {mode}: {result['samples_per_s']} samples/s, 98.5% at "
          f"{result['time_to_98_5_s']} s, final {result['final_accuracy']:.4f}", flush=True)
    return result


def ray_run(data_dir, mode, epochs, snapshot_every):
    """Ray's parameter-server example, with this model, data and optimizer."""
    import numpy as np
    import ray
    import torch

    ex = example(data_dir)
    ray.init(num_cpus=WORKERS, include_dashboard=False, ignore_reinit_error=True,
             log_to_driver=False)

    @ray.remote(num_cpus=0)
    class ParameterServer:
        def __init__(self):
            torch.set_num_threads(1)
            self.model = ex.build_model()
            self.opt = torch.optim.Adam(self.model.parameters(), lr=1e-3)

        def apply_gradients(self, *grads):
            summed = [np.sum(g, axis=0) / len(grads) for g in zip(*grads)]
            self.opt.zero_grad()
            for p, g in zip(self.model.parameters(), summed):
                p.grad = torch.from_numpy(g)
            self.opt.step()
            return self.get_weights()

        def get_weights(self):
            return {k: v.clone() for k, v in self.model.state_dict().items()}

    @ray.remote(num_cpus=1)
    class DataWorker:
        def __init__(self, rank):
            torch.set_num_threads(1)
            self.model = ex.build_model()
            self.stream = batch_stream(ex, rank, epochs)
            self.done = False

        def compute_gradients(self, weights):
            self.model.load_state_dict(weights)
            try:
                x, y = next(self.stream)
            except StopIteration:
                return None
            self.model.zero_grad()
            ex.loss(self.model(x), y).backward()
            return [p.grad.numpy() for p in self.model.parameters()]

    ps = ParameterServer.remote()
    workers = [DataWorker.remote(r) for r in range(WORKERS)]
    weights = ray.get(ps.get_weights.remote())
    # Warm-up: each worker loads its data before the clock starts (as pstrain's do before
    # their first push).
    ray.get([w.compute_gradients.remote(weights) for w in workers])
    trace, snapshots = [], []
    updates = samples = 0
    t0 = time.perf_counter()

    def note():
        now = time.perf_counter() - t0
        trace.append({"t": now, "updates": updates, "samples": samples})
        if not snapshots or updates - snapshots[-1]["updates"] >= snapshot_every:
            snapshots.append({"t": now, "updates": updates, "weights": weights})

    if mode == "sync":
        while True:
            grads = ray.get([w.compute_gradients.remote(weights) for w in workers])
            if any(g is None for g in grads):
                break
            weights = ray.get(ps.apply_gradients.remote(*grads))
            updates += 1
            samples += ex.BATCH * len(grads)
            note()
    else:
        inflight = {w.compute_gradients.remote(weights): w for w in workers}
        while inflight:
            [ready], _ = ray.wait(list(inflight))
            w = inflight.pop(ready)
            grad = ray.get(ready)
            if grad is None:
                continue
            weights = ray.get(ps.apply_gradients.remote(grad))
            updates += 1
            samples += ex.BATCH
            note()
            inflight[w.compute_gradients.remote(weights)] = w
    snapshots.append({"t": trace[-1]["t"], "updates": updates, "weights": weights})
    ray.shutdown()
    model = ex.build_model()
    scores = []
    for snap in snapshots:
        model.load_state_dict(snap["weights"])
        scores.append(ex.evaluate(model))
    return summarize("ray_pytorch", mode, trace, snapshots, scores)


def main():
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-dir", default="data/mnist")
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--modes", default="sync,async")
    p.add_argument("--snapshot-every", type=int, default=50)
    p.add_argument("--seconds", type=float, default=20.0, help="compute-only measurement")
    p.add_argument("--out", default=str(HERE / "results.json"))
    p.add_argument("--no-lanes", action="store_true",
                   help="pstrain's workers over loopback TCP, not shared memory")
    p.add_argument("--overlap", action="store_true",
                   help="pstrain's async workers compute while their link pushes and pulls "
                        "(train_worker(overlap=True))")
    p.add_argument("--key", default="torch_workers", help="the key of the --out JSON")
    a = p.parse_args()
    data_dir = Path(a.data_dir).resolve()
    import torch
    # The machine's speed drifts by several per cent within minutes: the compute-only
    # baselines are measured before and after the runs and their means taken.
    before = (compute_only(data_dir, a.seconds), compute_two_at_once(data_dir, a.seconds))
    print(f"before the runs: one torch worker, compute only, 1 thread: {before[0]:.0f} "
          f"samples/s; two at once: {before[1]:.0f}", flush=True)
    runs = []
    for mode in a.modes.split(","):
        runs.append(pstrain_run(data_dir, mode, a.epochs, a.snapshot_every, not a.no_lanes,
                                a.overlap))
        runs.append(ray_run(data_dir, mode, a.epochs, a.snapshot_every))
    after = (compute_only(data_dir, a.seconds), compute_two_at_once(data_dir, a.seconds))
    print(f"after the runs: one torch worker, compute only: {after[0]:.0f} samples/s; two at "
          f"once: {after[1]:.0f}", flush=True)
    one, both = (before[0] + after[0]) / 2, (before[1] + after[1]) / 2
    ratios = {"one_worker_compute_samples_per_s": round(one, 1),
              "one_worker_compute_before_and_after": [round(before[0], 1), round(after[0], 1)],
              "two_workers_at_once_compute_samples_per_s": round(both, 1),
              "two_at_once_before_and_after": [round(before[1], 1), round(after[1], 1)],
              "two_at_once_over_2x_one_worker_compute": round(both / (2 * one), 3)}
    for mode in a.modes.split(","):
        ours = next(r for r in runs if r["system"] == "pstrain" and r["mode"] == mode)
        theirs = next(r for r in runs if r["system"] == "ray_pytorch" and r["mode"] == mode)
        if ours["samples_per_s"] and theirs["samples_per_s"]:
            ratios[f"{mode}_samples_per_s_pstrain_over_ray"] = round(
                ours["samples_per_s"] / theirs["samples_per_s"], 3)
        if ours["samples_per_s"]:
            ratios[f"{mode}_pstrain_2_workers_over_2x_one_worker_compute"] = round(
                ours["samples_per_s"] / (2 * one), 3)
            ratios[f"{mode}_pstrain_2_workers_over_two_at_once_compute"] = round(
                ours["samples_per_s"] / both, 3)
        if ours.get("free_path_ceiling") and ours["samples_per_s"]:
            ratios[f"{mode}_pstrain_over_free_path_ceiling"] = round(
                ours["samples_per_s"] / ours["free_path_ceiling"]["samples_per_s"], 3)
        if ours["time_to_98_5_s"] and theirs["time_to_98_5_s"]:
            ratios[f"{mode}_time_to_98_5_ray_over_pstrain"] = round(
                theirs["time_to_98_5_s"] / ours["time_to_98_5_s"], 3)
    result = {"date": time.strftime("%Y-%m-%d"), "torch": torch.__version__,
              "cores": os.cpu_count(), "epochs": a.epochs, "lanes": not a.no_lanes,
              "overlap": a.overlap,
              "ratios": ratios, "runs": runs}
    out = Path(a.out)
    merged = json.loads(out.read_text()) if out.exists() else {}
    merged[a.key] = result
    out.write_text(json.dumps(merged, indent=1) + "\n")
    print(json.dumps(ratios, indent=1))
    print(f"wrote {out} ({a.key})")


if __name__ == "__main__":
    sys.exit(main())
