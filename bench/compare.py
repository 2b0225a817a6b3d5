#!/usr/bin/env python3
"""pstrain beside PyTorch and a Ray + PyTorch parameter server, in one sitting.

Measures on this machine, one after the other:
  - compute: forward + backward samples/s at batch 64, the `cnn` (the PyTorch MNIST
    example's network) and the `convnet` (Ray's parameter-server example's), on 1 and 2
    threads, PyTorch against `pstrain bench`;
  - training overhead and memory: `pstrain bench`'s 2-worker training against twice its
    one-thread compute, and the default run's peak resident memory per process;
  - time to 99% test accuracy (reached and kept at every later evaluation), with evaluation
    time excluded and included: the default `pstrain train` in sync and async mode against
    a Ray + PyTorch parameter server written the way Ray's example writes it (2 worker
    actors, one server actor, in-memory tensor batches) with the PyTorch MNIST example's
    recipe (Adadelta lr 1.0, StepLR 0.7 per epoch, batch 128).
Prints the ratios and writes them, with the CPU model, as JSON. With --torch-workers it then
runs bench/torch_workers.py (PyTorch workers through pstrain beside a Ray + PyTorch parameter
server, the same model and data) and adds its figures under "torch_workers".

Needs (install them in a scratch virtualenv; nothing is installed here):
    pip install torch numpy "ray[default]"
and iperf3 on the PATH for the raw TCP stream (else that ratio is left out).
Run from the repository after `cargo build --release`:
    python3 bench/compare.py --data-dir ../shared/data/mnist --out bench/results.json
Not part of CI: it is a benchmark, and takes about 20 minutes on a 2-core machine.
"""

import argparse
import gzip
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
TARGET = 0.99


def load_mnist(data_dir):
    import numpy as np

    def read(stem):
        for name in (stem + ".gz", stem):
            p = Path(data_dir) / name
            if p.exists():
                raw = p.read_bytes()
                return gzip.decompress(raw) if name.endswith(".gz") else raw
        raise SystemExit(f"{stem} not found in {data_dir}")

    def images(stem):
        raw = read(stem)
        n = int.from_bytes(raw[4:8], "big")
        x = np.frombuffer(raw, dtype=np.uint8, offset=16).reshape(n, 1, 28, 28)
        return ((x.astype(np.float32) / 255.0) - 0.1307) / 0.3081

    def labels(stem):
        return np.frombuffer(read(stem), dtype=np.uint8, offset=8).astype(np.int64)

    return (images("train-images-idx3-ubyte"), labels("train-labels-idx1-ubyte"),
            images("t10k-images-idx3-ubyte"), labels("t10k-labels-idx1-ubyte"))


def torch_model(name):
    import torch.nn as nn
    import torch.nn.functional as F

    class Cnn(nn.Module):  # the PyTorch MNIST example's network
        def __init__(self):
            super().__init__()
            self.conv1, self.conv2 = nn.Conv2d(1, 32, 3, 1), nn.Conv2d(32, 64, 3, 1)
            self.dropout1, self.dropout2 = nn.Dropout(0.25), nn.Dropout(0.5)
            self.fc1, self.fc2 = nn.Linear(9216, 128), nn.Linear(128, 10)

        def forward(self, x):
            x = F.max_pool2d(F.relu(self.conv2(F.relu(self.conv1(x)))), 2)
            x = self.dropout2(F.relu(self.fc1(self.dropout1(x).flatten(1))))
            return F.log_softmax(self.fc2(x), dim=1)

    class Convnet(nn.Module):  # Ray's parameter-server example's network
        def __init__(self):
            super().__init__()
            self.conv1, self.fc = nn.Conv2d(1, 3, kernel_size=3), nn.Linear(192, 10)

        def forward(self, x):
            x = F.relu(F.max_pool2d(self.conv1(x), 3))
            return F.log_softmax(self.fc(x.view(-1, 192)), dim=1)

    return {"cnn": Cnn, "convnet": Convnet}[name]()


def torch_compute(model_name, threads, seconds, batch=64):
    """Forward + backward samples/s on random inputs (PyTorch's dense kernels take the same
    time on any values; `pstrain bench` uses real MNIST images, since its convolution's
    backward skips zero gradients)."""
    import torch
    import torch.nn.functional as F
    torch.set_num_threads(threads)
    model = torch_model(model_name)
    x, y = torch.randn(batch, 1, 28, 28), torch.randint(0, 10, (batch,))
    for _ in range(5):
        model.zero_grad()
        F.nll_loss(model(x), y).backward()
    done, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        model.zero_grad()
        F.nll_loss(model(x), y).backward()
        done += batch
    return done / (time.perf_counter() - start)


def time_to_target(evals):
    """First evaluation from which every later one is >= TARGET: (excluded, included)."""
    for i, e in enumerate(evals):
        if all(later["acc"] >= TARGET for later in evals[i:]):
            before = sum(x["eval_s"] for x in evals[:i])
            return e["t"] - before, e["t"] + e["eval_s"]
    return None, None


def pstrain_time_to_target(exe, data_dir, mode):
    with tempfile.TemporaryDirectory() as tmp:
        metrics = Path(tmp) / "run.jsonl"
        subprocess.run([exe, "train", "--mode", mode, "--metrics", str(metrics),
                        "--data-dir", data_dir], check=True, stdout=subprocess.DEVNULL)
        records = [json.loads(line) for line in metrics.read_text().splitlines()]
    evals = [{"t": r["time_s"], "eval_s": r["eval_s"], "acc": r["test_accuracy"]}
             for r in records if r.get("event") == "eval"]
    excl, incl = time_to_target(evals)
    summary = next(r for r in records if r.get("event") == "summary")
    return {"mode": mode, "time_to_99_excl_eval_s": excl, "time_to_99_incl_eval_s": incl,
            "final_accuracy": summary["test_accuracy"], "wall_s": summary["wall_time_s"],
            "evaluations": evals}


def ray_time_to_target(data_dir, mode, workers=2, batch=128, eval_every=100, limit_s=900):
    """A Ray + PyTorch parameter server after Ray's example, with the PyTorch example's
    recipe; evaluations are timed and reported apart."""
    import numpy as np
    import ray
    import torch
    import torch.nn.functional as F

    xtr, ytr, xte, yte = load_mnist(data_dir)
    ray.init(num_cpus=workers, include_dashboard=False, ignore_reinit_error=True,
             log_to_driver=False)
    steps_per_epoch = len(ytr) // batch

    @ray.remote(num_cpus=0)
    class ParameterServer:
        def __init__(self):
            torch.set_num_threads(1)
            torch.manual_seed(1)
            self.model = torch_model("cnn")
            self.opt = torch.optim.Adadelta(self.model.parameters(), lr=1.0)
            self.sched = torch.optim.lr_scheduler.StepLR(self.opt, step_size=1, gamma=0.7)
            self.applied = 0

        def apply_gradients(self, *grads):
            summed = [np.sum(g, axis=0) / len(grads) for g in zip(*grads)]
            self.opt.zero_grad()
            for p, g in zip(self.model.parameters(), summed):
                p.grad = torch.from_numpy(g)
            self.opt.step()
            self.applied += len(grads)
            if self.applied >= steps_per_epoch:  # one epoch of samples: StepLR
                self.applied -= steps_per_epoch
                self.sched.step()
            return self.get_weights()

        def get_weights(self):
            return {k: v.clone() for k, v in self.model.state_dict().items()}

    @ray.remote(num_cpus=1)
    class DataWorker:
        def __init__(self, rank, x, y):
            torch.set_num_threads(1)
            self.model = torch_model("cnn")
            self.x, self.y = torch.from_numpy(x.copy()), torch.from_numpy(y.copy())
            self.g = torch.Generator().manual_seed(rank)

        def compute_gradients(self, weights):
            self.model.load_state_dict(weights)
            idx = torch.randint(0, len(self.y), (batch,), generator=self.g)
            self.model.zero_grad()
            F.nll_loss(self.model(self.x[idx]), self.y[idx]).backward()
            return [p.grad.numpy() for p in self.model.parameters()]

    evaluator = torch_model("cnn")
    xte_t, yte_t = torch.from_numpy(xte), torch.from_numpy(yte)

    def evaluate(weights):
        evaluator.load_state_dict(weights)
        evaluator.eval()
        with torch.no_grad():
            correct = sum(int((evaluator(xte_t[i:i + 1000]).argmax(1) == yte_t[i:i + 1000])
                              .sum()) for i in range(0, len(yte_t), 1000))
        return correct / len(yte_t)

    ps = ParameterServer.remote()
    # Each worker's shard goes through the object store once, at start (in-memory batches).
    ws = [DataWorker.remote(r, ray.put(xtr[r::workers]), ray.put(ytr[r::workers]))
          for r in range(workers)]
    weights = ray.get(ps.get_weights.remote())
    evals, start, eval_total = [], time.perf_counter(), 0.0
    updates, inflight = 0, {}
    if mode == "async":
        inflight = {w.compute_gradients.remote(weights): w for w in ws}
    while time.perf_counter() - start < limit_s:
        if mode == "sync":
            grads = [w.compute_gradients.remote(weights) for w in ws]
            weights = ray.get(ps.apply_gradients.remote(*grads))
            updates += 1
        else:
            [ready], _ = ray.wait(list(inflight))
            w = inflight.pop(ready)
            weights = ray.get(ps.apply_gradients.remote(ray.get(ready)))
            inflight[w.compute_gradients.remote(weights)] = w
            updates += 1
        if updates % eval_every == 0:
            t = time.perf_counter() - start
            began = time.perf_counter()
            acc = evaluate(weights)
            spent = time.perf_counter() - began
            eval_total += spent
            evals.append({"t": t, "eval_s": spent, "acc": acc, "updates": updates})
            # Stop once 99% has held for three evaluations in a row.
            if len(evals) >= 3 and all(e["acc"] >= TARGET for e in evals[-3:]):
                break
    ray.shutdown()
    excl, incl = time_to_target(evals)
    return {"mode": mode, "time_to_99_excl_eval_s": excl, "time_to_99_incl_eval_s": incl,
            "final_accuracy": evals[-1]["acc"] if evals else None, "evaluations": evals}


def iperf3_gb_per_s(seconds=5):
    """One TCP stream over loopback, as iperf3 measures it (GB/s), or None without iperf3."""
    try:
        server = subprocess.Popen(["iperf3", "-s", "-1", "-p", "5299"],
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    except FileNotFoundError:
        return None
    try:
        time.sleep(0.5)
        r = subprocess.run(["iperf3", "-c", "127.0.0.1", "-p", "5299", "-t", str(seconds), "-J"],
                           check=True, capture_output=True, text=True)
        return json.loads(r.stdout)["end"]["sum_received"]["bits_per_second"] / 8e9
    finally:
        server.wait(timeout=30)


def network(pstrain, data_dir, one_thread_cnn):
    """`pstrain bench-net` (push+pull of a 100M-value model, TCP training against the same
    run in-process) beside one iperf3 stream, one after the other."""
    raw = iperf3_gb_per_s()
    print(f"iperf3, one stream over loopback: {raw} GB/s", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        report = Path(tmp) / "net.json"
        subprocess.run([pstrain, "bench-net", "--shards", "1", "--out", str(report),
                        "--data-dir", data_dir], check=True)
        net = json.loads(report.read_text())
    return {"iperf3_gb_per_s": raw, "bench_net": net,
            "ratios": network_ratios(net, raw, one_thread_cnn)}


def network_ratios(net, raw, one_thread_cnn):
    # The bulk transfer (the largest layout, one shard, no token, no TLS) is what one iperf3
    # stream compares with; the 4.8 MB cnn is reported too (its round trip is latency-bound).
    plain = sorted((t for t in net["transfer"]
                    if t["shards"] == 1 and not t["token"] and not t["tls"]),
                   key=lambda t: t["values"])
    ratios = {}
    if plain and raw:
        ratios["push_pull_1_shard_largest_model_over_iperf3"] = ratio(
            plain[-1]["push_pull_gb_per_s"], raw)
        ratios["push_pull_1_shard_cnn_over_iperf3"] = ratio(plain[0]["push_pull_gb_per_s"], raw)
    for t in net["training"]:
        run = f"{t['model']}_{t['mode']}_tcp_{t['shards']}_shard"
        ratios[f"{run}_over_inproc"] = round(t["tcp_fraction_of_inproc"], 3)
        # The target: 2-worker training over TCP against twice the one-thread compute
        # `pstrain bench` measured in this sitting.
        ratios[f"{run}_vs_2x_one_thread"] = ratio(t["tcp_samples_per_s"], 2 * one_thread_cnn)
        # Where the cores went: the shards' CPU time (user + system) as a share of all the
        # machine's core-seconds over the run, and the workers' system (socket) time.
        procs, cores = t.get("tcp_processes", []), os.cpu_count() or 1
        core_s = t.get("tcp_wall_s", 0) * cores

        def cpu(prefix, fields=("cpu_user_s", "cpu_system_s")):
            return sum(p.get(f) or 0 for p in procs if p["process"].startswith(prefix)
                       for f in fields)
        if core_s and cpu("shard"):
            ratios[f"{run}_shards_cpu_share"] = round(cpu("shard") / core_s, 3)
            ratios[f"{run}_workers_system_cpu_share"] = round(
                cpu("worker", ("cpu_system_s",)) / core_s, 3)
    return ratios


def ratio(a, b):
    return round(a / b, 3) if a and b else None


def main():
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--pstrain", default=str(HERE.parent / "target/release/pstrain"))
    p.add_argument("--data-dir", default="data/mnist")
    p.add_argument("--seconds", type=float, default=5.0, help="per compute measurement")
    p.add_argument("--skip-time-to-accuracy", action="store_true")
    p.add_argument("--torch-workers", action="store_true",
                   help="also run bench/torch_workers.py (PyTorch workers through pstrain "
                        "beside a Ray + PyTorch PS; written under torch_workers in --out)")
    p.add_argument("--skip-network", action="store_true",
                   help="no push+pull against iperf3, no TCP training")
    p.add_argument("--modes", default="sync,async", help="modes for time to 99%%")
    p.add_argument("--out", default=str(HERE / "results.json"))
    p.add_argument("--torch-compute", nargs=3, metavar=("MODEL", "THREADS", "SECONDS"),
                   help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.torch_compute:  # one measurement in a process of its own (thread settings)
        m, t, s = a.torch_compute
        print(torch_compute(m, int(t), float(s)))
        return
    import torch
    cpu = platform.processor() or ""
    try:
        cpu = next(l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo")
                   if l.startswith("model name"))
    except (OSError, StopIteration):
        pass
    out = {"cpu": cpu, "cores": os.cpu_count(), "torch": torch.__version__,
           "date": time.strftime("%Y-%m-%d"), "compute": [], "ratios": {}}

    torch_sps = {}
    for model in ("cnn", "convnet"):
        for threads in (1, 2):
            r = subprocess.run([sys.executable, __file__, "--torch-compute", model,
                                str(threads), str(a.seconds)], check=True,
                               capture_output=True, text=True)
            torch_sps[(model, threads)] = float(r.stdout.strip().splitlines()[-1])
            print(f"pytorch {model} threads={threads}: {torch_sps[(model, threads)]:.0f}",
                  flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        bench_json = Path(tmp) / "bench.json"
        subprocess.run([a.pstrain, "bench", "--seconds", str(a.seconds), "--out",
                        str(bench_json), "--data-dir", a.data_dir], check=True)
        bench = json.loads(bench_json.read_text())
    out["pstrain_bench"] = bench
    for c in bench["compute"]:
        theirs = torch_sps[(c["model"], c["threads"])]
        out["compute"].append({"model": c["model"], "threads": c["threads"],
                               "pstrain": c["samples_per_s"], "pytorch": theirs,
                               "ratio": ratio(c["samples_per_s"], theirs)})
    for t in bench["training"]:
        if t["workers"] == 2:
            out["ratios"][f"{t['model']}_{t['mode']}_2_workers_vs_2x_one_thread"] = round(
                t["fraction_of_compute"], 3)
    out["memory"] = bench.get("memory", [])

    if not a.skip_network:
        one_thread = next(c["samples_per_s"] for c in bench["compute"]
                          if c["model"] == "cnn" and c["threads"] == 1)
        net = network(a.pstrain, a.data_dir, one_thread)
        out["network"] = net
        out["ratios"].update(net["ratios"])

    if not a.skip_time_to_accuracy:
        out["time_to_99"] = {"pstrain": [], "ray_pytorch": []}
        for mode in a.modes.split(","):
            r = pstrain_time_to_target(a.pstrain, a.data_dir, mode)
            print(f"pstrain {mode}: 99% at {r['time_to_99_excl_eval_s']} s "
                  f"(evaluation excluded)", flush=True)
            out["time_to_99"]["pstrain"].append(r)
            r = ray_time_to_target(a.data_dir, mode)
            print(f"ray+pytorch {mode}: 99% at {r['time_to_99_excl_eval_s']} s "
                  f"(evaluation excluded)", flush=True)
            out["time_to_99"]["ray_pytorch"].append(r)
        for ours, theirs in zip(out["time_to_99"]["pstrain"], out["time_to_99"]["ray_pytorch"]):
            out["ratios"][f"time_to_99_{ours['mode']}_pstrain_over_ray"] = ratio(
                ours["time_to_99_excl_eval_s"], theirs["time_to_99_excl_eval_s"])

    print("\n| measurement | pstrain | reference | ratio |\n|---|---|---|---|")
    for c in out["compute"]:
        print(f"| {c['model']} compute, {c['threads']} thread(s), batch 64 (samples/s) | "
              f"{c['pstrain']:,.0f} | {c['pytorch']:,.0f} (PyTorch) | {c['ratio']}x |")
    for k, v in out["ratios"].items():
        print(f"| {k} | | | {v} |")
    for m in out["memory"]:
        print(f"| peak memory, default run, {m.get('model', 'cnn')} {m['transport']} (MB) | {m['total_mb']:.0f} | | |")
    Path(a.out).write_text(json.dumps(out, indent=1) + "\n")
    print(f"wrote {a.out}")
    if a.torch_workers:
        subprocess.run([sys.executable, str(HERE / "torch_workers.py"), "--data-dir",
                        a.data_dir, "--out", a.out], check=True)


if __name__ == "__main__":
    main()
