"""Logistic regression on MNIST, written in numpy, trained through pstrain's parameter server.

The model (``w``: 784x10, ``b``: 10) is served by a ``pstrain.Server`` in this process, or by
servers you started elsewhere (``--servers``); each worker is a thread with its own
``pstrain.Client`` that pulls the weights, computes a softmax-regression gradient on its
shard of the training set with numpy, and pushes it. Only numpy and pstrain are needed.

    python examples/numpy_logreg.py --data-dir ../shared/data/mnist
    python examples/numpy_logreg.py --data-dir DIR --mode async --workers 3
"""

from __future__ import annotations

import argparse
import gzip
import os
import threading
import time

import numpy as np

import pstrain


def read_idx(path: str) -> np.ndarray:
    """An IDX file (gzipped or not) as a numpy array, checking its header against its size."""
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rb") as f:
        data = f.read()
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] != 0x08:
        raise ValueError(f"{path}: not an unsigned-byte IDX file")
    ndim = data[3]
    dims = [int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    start = 4 + 4 * ndim
    if len(data) - start != int(np.prod(dims)):
        raise ValueError(f"{path}: header promises {dims}, file has {len(data) - start} bytes")
    return np.frombuffer(data, dtype=np.uint8, offset=start).reshape(dims)


def load_mnist(data_dir: str):
    def pair(images: str, labels: str):
        x = read_idx(os.path.join(data_dir, images)).reshape(-1, 784).astype(np.float32) / 255.0
        y = read_idx(os.path.join(data_dir, labels)).astype(np.int64)
        if len(x) != len(y):
            raise ValueError(f"{images}: {len(x)} images but {len(y)} labels")
        return x, y

    return (
        pair("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
        pair("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
    )


def gradient(w: np.ndarray, b: np.ndarray, x: np.ndarray, y: np.ndarray):
    """Mean cross-entropy loss of softmax(x @ w + b) and its gradient."""
    logits = x @ w + b
    logits -= logits.max(axis=1, keepdims=True)
    p = np.exp(logits)
    p /= p.sum(axis=1, keepdims=True)
    loss = float(-np.log(p[np.arange(len(y)), y] + 1e-12).mean())
    p[np.arange(len(y)), y] -= 1.0
    p /= len(y)
    return {"w": x.T @ p, "b": p.sum(axis=0)}, loss


def accuracy(w: np.ndarray, b: np.ndarray, x: np.ndarray, y: np.ndarray) -> float:
    return float(((x @ w + b).argmax(axis=1) == y).mean())


def worker(servers, rank: int, workers: int, x, y, steps: int, batch: int, seed: int) -> None:
    rng = np.random.default_rng(seed + rank)
    mine = np.arange(rank, len(x), workers)  # this worker's shard of the data
    with pstrain.Client(servers, rank=rank) as client:
        grads, views = client.flat_zeros()
        for _ in range(steps):
            params = client.pull()
            if client.done:
                break
            idx = rng.choice(mine, size=batch, replace=False)
            g, loss = gradient(params["w"], params["b"], x[idx], y[idx])
            views["w"][...] = g["w"]
            views["b"][...] = g["b"]
            # The flat buffer goes out from its own memory, no copy.
            if client.push(grads, samples=batch, loss=loss)["outcome"] == "done":
                break


def train(
    data_dir: str,
    workers: int = 2,
    mode: str = "sync",
    steps: int = 300,
    batch: int = 100,
    lr: float = 0.5,
    servers=None,
    seed: int = 0,
) -> dict:
    (x, y), (xt, yt) = load_mnist(data_dir)
    server = None
    if servers is None:
        params = {"w": np.zeros((784, 10), np.float32), "b": np.zeros(10, np.float32)}
        server = pstrain.Server(params, workers=workers, mode=mode, optimizer="sgd", lr=lr,
                                lr_schedule="constant")
        servers = [server.address]
    # The observer holds the servers open until the final weights are read.
    observer = pstrain.Client(servers, role="observer")
    started = time.time()
    errors = []

    def run(rank: int) -> None:
        try:
            worker(servers, rank, workers, x, y, steps, batch, seed)
        except Exception as e:  # a failed worker fails the run, below
            errors.append(e)

    threads = [threading.Thread(target=run, args=(r,)) for r in range(workers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    final = observer.pull(wait=False)
    observer.leave()
    result = {
        "test_accuracy": accuracy(final["w"], final["b"], xt, yt),
        "wall_time_s": time.time() - started,
        "mode": mode,
        "workers": workers,
    }
    if server is not None:
        result["server"] = server.wait(timeout=30)
    return result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-dir", default=os.environ.get("PSTRAIN_DATA_DIR", "data/mnist"))
    p.add_argument("--servers", help="join these shards (comma-separated) instead of serving here")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--mode", choices=["sync", "async"], default="sync")
    p.add_argument("--steps", type=int, default=300, help="steps per worker")
    p.add_argument("--batch-size", type=int, default=100)
    p.add_argument("--lr", type=float, default=0.5)
    a = p.parse_args()
    servers = a.servers.split(",") if a.servers else None
    r = train(a.data_dir, a.workers, a.mode, a.steps, a.batch_size, a.lr, servers)
    print(
        f"logistic regression, {r['mode']}, {r['workers']} workers: "
        f"test accuracy {100 * r['test_accuracy']:.2f}% in {r['wall_time_s']:.1f} s"
    )


if __name__ == "__main__":
    main()
