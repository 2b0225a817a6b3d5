#!/usr/bin/env python3
"""PyTorch workers behind rate-limited links: what their pulls and pushes cost, per codec.

The PyTorch MNIST example's network (examples/torch_mnist.py), 2 torch worker processes (one
torch thread each, batch 64), a `pstrain.Server.from_module` shard (Adam, lr 1e-3), a fixed
number of updates. On `loopback` everything runs in this machine's namespace over TCP (no
shared-memory lanes, as across hosts); on a rate (`100mbit`, `10mbit`) the shard runs in a
network namespace of its own and each worker in another, joined by veth pairs with a
token-bucket filter each way (`scripts/edge_net.sh`; needs root). Each row: wall time of
the workers (first pull to last push), samples/s, test accuracy of the shard's weights at the
end (10k images), bytes pulled and pushed per update per worker (the shard's counters), and
the codecs the workers used last. A codec item ending in `@overlap` (async runs) has the
workers compute while their link pushes and pulls (`train_worker(overlap=True)`).

    sudo python3 bench/torch_edge.py --data-dir ../shared/data/mnist \
        --links loopback,10mbit --codecs fp32/fp32,auto --updates 300 --out torch-edge.json

`--updates-at LINK:CODECS=N` gives a row fewer updates (fp32 at 10 Mbit/s moves 9.6 MB a
step: about 8 s). Not part of CI: a benchmark. Needs torch and the pstrain package.
"""

import argparse
import json
import os
import re
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
EDGE_NET = REPO / "scripts" / "edge_net.sh"
PREFIX = "pstte"
WORKERS = 2
PORT = 7791


def example(data_dir):
    import importlib.util
    spec = importlib.util.spec_from_file_location("torch_mnist_edge", REPO / "examples" /
                                                  "torch_mnist.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.DATA_DIR = str(data_dir)
    return module


def serve(a):
    """The shard: serves the module until the run's updates are made, then scores its
    weights and prints one JSON line (accuracy, each rank's bytes, the codecs)."""
    import pstrain
    import torch
    from pstrain.torch import ModuleWorker
    torch.set_num_threads(1)
    ex = example(a.data_dir)
    push, _, pull = a.codecs.partition("/")
    codecs = {"push_codec": "auto"} if a.codecs == "auto" else {"push_codec": push,
                                                                "pull_codec": pull}
    server = pstrain.Server.from_module(
        ex.build_model(), listen=f"0.0.0.0:{PORT}", token=a.token, workers=WORKERS,
        mode=a.mode, optimizer="adam", lr=1e-3, lr_schedule="constant", batch_size=ex.BATCH,
        iterations=a.updates, keep_running=True, metrics_addr="127.0.0.1:0", **codecs)
    print("ready", flush=True)
    observer = pstrain.Client(["127.0.0.1:%d" % PORT], role="observer", token=a.token,
                              lanes=False)
    while observer.stats()[0]["version"] < a.updates:
        time.sleep(0.2)
    # The workers leave once told the run is done; their counters are final then.
    while observer.stats()[0]["active_workers"] > 0:
        time.sleep(0.2)
    metrics = urllib.request.urlopen(f"http://127.0.0.1:{server.metrics_port}/metrics",
                                     timeout=10).read().decode()
    model = ex.build_model()
    ModuleWorker(observer, model).pull(wait=False)
    accuracy = ex.evaluate(model)
    counters = {}
    for key in ("pull_bytes", "push_bytes"):
        pattern = rf'^pstrain_worker_{key}_total\{{shard="0",rank="(\d+)"\}} (\S+)$'
        found = {int(r): float(v) for r, v in re.findall(pattern, metrics, re.M)}
        counters[key] = [found.get(r, 0.0) for r in range(WORKERS)]
    server.stop()
    stats = server.wait(10)
    print(json.dumps({"accuracy": accuracy, "version": stats["version"], **counters,
                      "whole_bytes": 4 * observer.size}), flush=True)


def work(a):
    """One worker: trains until the shard says done, prints its report as JSON."""
    from pstrain.torch import train_worker
    ex = example(a.data_dir)
    report = train_worker([a.address], ex.build_model, ex.batches, ex.loss, rank=a.rank,
                          token=a.token, threads=1, lanes=False, overlap=a.overlap)
    print(json.dumps(report), flush=True)


def netns(ns, argv):
    return argv if ns is None else ["ip", "netns", "exec", ns] + argv


def one_run(a, link, item, updates, token):
    codecs, _, how = item.partition("@")
    me = [sys.executable, str(Path(__file__).resolve()), "--data-dir", str(a.data_dir),
          "--mode", a.mode, "--token", token]
    overlap = ["--overlap"] if how == "overlap" else []
    spaced = link != "loopback"
    if spaced:
        subprocess.run(["bash", str(EDGE_NET), "down", PREFIX], check=True)
        subprocess.run(["bash", str(EDGE_NET), "up", PREFIX] + [link] * WORKERS, check=True,
                       stdout=subprocess.DEVNULL)
    try:
        server = subprocess.Popen(
            netns(f"{PREFIX}-ps" if spaced else None,
                  me + ["--role", "server", "--codecs", codecs, "--updates", str(updates)]),
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        assert server.stdout.readline().strip() == "ready"
        workers = []
        for rank in range(WORKERS):
            address = f"10.77.{rank}.1:{PORT}" if spaced else f"127.0.0.1:{PORT}"
            workers.append(subprocess.Popen(
                netns(f"{PREFIX}-w{rank}" if spaced else None,
                      me + ["--role", "worker", "--address", address, "--rank", str(rank)]
                      + overlap),
                stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True))
        reports = [json.loads(w.communicate()[0].strip().splitlines()[-1]) for w in workers]
        out, err = server.communicate(timeout=600)
        shard = json.loads(out.strip().splitlines()[-1])
    finally:
        if spaced:
            subprocess.run(["bash", str(EDGE_NET), "down", PREFIX], check=True)
    used = re.findall(r"worker (\d+): .* codecs (.+)$", err, re.M)
    wall = max(r["wall_s"] for r in reports)
    samples = sum(r["samples"] for r in reports)
    return {
        "link": link, "codecs": codecs, "overlap": bool(overlap), "mode": a.mode,
        "updates": shard["version"],
        "wall_s": round(wall, 2), "samples_per_s": round(samples / wall, 1),
        "accuracy": shard["accuracy"],
        "pull_mb_per_update": [round(b / 1e6 / shard["version"], 4) for b in shard["pull_bytes"]],
        "push_mb_per_update": [round(b / 1e6 / shard["version"], 4) for b in shard["push_bytes"]],
        "whole_mb": shard["whole_bytes"] / 1e6,
        "codecs_at_the_end": [c for _, c in sorted(used)],
        "workers": reports,
    }


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data-dir", default=str(REPO.parent / "shared" / "data" / "mnist"))
    p.add_argument("--links", default="loopback,10mbit")
    p.add_argument("--codecs", default="fp32/fp32,auto")
    p.add_argument("--mode", default="sync", choices=["sync", "async"])
    p.add_argument("--updates", type=int, default=300)
    p.add_argument("--updates-at", action="append", default=[],
                   help="LINK:CODECS=N: that row's updates")
    p.add_argument("--out", help="a JSON file the rows are appended to")
    # Internal: the processes this script starts.
    p.add_argument("--role", choices=["server", "worker"])
    p.add_argument("--token")
    p.add_argument("--address")
    p.add_argument("--rank", type=int, default=0)
    p.add_argument("--overlap", action="store_true")
    a = p.parse_args()
    if a.role == "server":
        return serve(a)
    if a.role == "worker":
        return work(a)
    import pstrain
    token = pstrain.new_token()
    special = {}
    for item in a.updates_at:
        key, _, n = item.rpartition("=")
        special[key] = int(n)
    rows = []
    for link in a.links.split(","):
        for codecs in a.codecs.split(","):
            updates = special.get(f"{link}:{codecs}", a.updates)
            row = one_run(a, link, codecs, updates, token)
            rows.append(row)
            print(f"{link} {codecs} {a.mode}: {row['updates']} updates in {row['wall_s']} s, "
                  f"{row['samples_per_s']} samples/s, {row['accuracy']:.2%}, pull MB/update "
                  f"{row['pull_mb_per_update']}, push MB/update {row['push_mb_per_update']}, "
                  f"{row['codecs_at_the_end']}", flush=True)
    if a.out:
        old = json.loads(Path(a.out).read_text()) if os.path.exists(a.out) else []
        Path(a.out).write_text(json.dumps(old + rows, indent=1) + "\n")


if __name__ == "__main__":
    main()
