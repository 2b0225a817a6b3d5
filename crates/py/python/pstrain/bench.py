"""``python -m pstrain.bench``: the Python client's push/pull throughput, written as JSON.

Serves a synthetic float32 model of ``--values`` values from this process (``pstrain.Server``
over ``--shards`` shards, async SGD), then times ``--rounds`` rounds of push + pull through
``pstrain.Client`` with a flat gradient (sent from its own memory), the same pulling into one
reused array, and with a dict of named arrays (gathered into one buffer first), beside a numpy
copy of the same bytes. Compare with
``pstrain bench-net``, which times the same transfers from Rust.
"""

from __future__ import annotations

import argparse
import json
import platform
import time

import numpy as np

import pstrain


def _rate(nbytes: int, seconds: float) -> float:
    return nbytes / seconds / 1e9


def measure(values: int, shards: int, rounds: int) -> dict:
    # Two tensors, so that the dict path has something to gather.
    half = values // 2
    params = {"a": np.zeros(half, np.float32), "b": np.zeros(values - half, np.float32)}
    servers = [
        pstrain.Server(params, workers=1, mode="async", optimizer="sgd", lr=1e-9,
                       lr_schedule="constant", shard=i, shards=shards)
        for i in range(shards)
    ]
    try:
        client = pstrain.Client([s.address for s in servers])
        flat, views = client.flat_zeros()
        flat[:] = 1e-3
        client.pull()  # warm up connections and buffers
        client.push(flat, samples=1)

        started = time.perf_counter()
        for _ in range(rounds):
            client.push(flat, samples=1)
            client.pull()
        flat_s = (time.perf_counter() - started) / rounds

        started = time.perf_counter()
        for _ in range(rounds):
            client.push(views, samples=1)
            client.pull()
        dict_s = (time.perf_counter() - started) / rounds

        # Pulling into one reused array: no allocation (and no page faults) per round.
        weights, _ = client.flat_zeros()
        started = time.perf_counter()
        for _ in range(rounds):
            client.push(flat, samples=1)
            client.pull(out=weights)
        reuse_s = (time.perf_counter() - started) / rounds

        copy_target = np.empty_like(flat)
        started = time.perf_counter()
        for _ in range(rounds):
            np.copyto(copy_target, flat)
        copy_s = (time.perf_counter() - started) / rounds
        client.leave()
    finally:
        for s in servers:
            s.stop()
            s.wait()
    moved = 2 * 4 * values  # one push and one pull of every value
    return {
        "values": values,
        "shards": shards,
        "rounds": rounds,
        "flat_round_trip_ms": flat_s * 1e3,
        "flat_gb_per_s": _rate(moved, flat_s),
        "reused_round_trip_ms": reuse_s * 1e3,
        "reused_gb_per_s": _rate(moved, reuse_s),
        "dict_round_trip_ms": dict_s * 1e3,
        "dict_gb_per_s": _rate(moved, dict_s),
        "numpy_copy_gb_per_s": _rate(4 * values, copy_s),
    }


def main() -> None:
    p = argparse.ArgumentParser(prog="python -m pstrain.bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--values", type=int, default=25_000_000, help="model size (float32 values)")
    p.add_argument("--shards", default="1,4", help="shard counts to measure, comma-separated")
    p.add_argument("--rounds", type=int, default=10)
    p.add_argument("--out", default="bench-py.json")
    a = p.parse_args()
    results = []
    for shards in (int(x) for x in a.shards.split(",")):
        r = measure(a.values, shards, a.rounds)
        print(
            f"{r['values']:,} values over {shards} shard(s): push+pull flat "
            f"{r['flat_gb_per_s']:.2f} GB/s ({r['flat_round_trip_ms']:.1f} ms), into a reused "
            f"array {r['reused_gb_per_s']:.2f} GB/s ({r['reused_round_trip_ms']:.1f} ms), dict "
            f"{r['dict_gb_per_s']:.2f} GB/s ({r['dict_round_trip_ms']:.1f} ms); numpy copy "
            f"{r['numpy_copy_gb_per_s']:.1f} GB/s",
            flush=True,
        )
        results.append(r)
    report = {"machine": platform.machine(), "python": platform.python_version(),
              "results": results}
    with open(a.out, "w") as f:
        json.dump(report, f, indent=2)
        f.write("\n")
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
