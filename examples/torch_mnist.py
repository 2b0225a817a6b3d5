#!/usr/bin/env python3
"""A PyTorch model of your own, trained through pstrain on a Ray cluster.

The network is the PyTorch MNIST example's (``--net cnn``, the default) or the original Ray
parameter-server example's small convnet (``--net convnet``); the data is real MNIST read
from its IDX files. The model, the batches and the loss are plain PyTorch: pstrain's Rust
shards hold the weights and apply the optimizer, the workers are PyTorch in Ray actors.

    ray job submit --working-dir . -- python examples/torch_mnist.py \\
        --data-dir /data/mnist --mode sync --workers 2 --epochs 1

The same file works with the command-line form (it defines build_model, batches, loss,
evaluate and TRAIN_SAMPLES):

    PSTRAIN_DATA_DIR=/data/mnist ray job submit --working-dir . -- \\
        python -m pstrain.ray_torch examples/torch_mnist.py --mode async --epochs 1
"""

import argparse
import gzip
import os
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

NET = os.environ.get("PSTRAIN_EXAMPLE_NET", "cnn")
DATA_DIR = os.environ.get("PSTRAIN_DATA_DIR", "data/mnist")
BATCH = 64
TRAIN_SAMPLES = 60000


class Net(nn.Module):
    """The PyTorch MNIST example's network (pytorch/examples, mnist/main.py)."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 32, 3, 1)
        self.conv2 = nn.Conv2d(32, 64, 3, 1)
        self.dropout1 = nn.Dropout(0.25)
        self.dropout2 = nn.Dropout(0.5)
        self.fc1 = nn.Linear(9216, 128)
        self.fc2 = nn.Linear(128, 10)

    def forward(self, x):
        x = F.relu(self.conv1(x))
        x = F.relu(self.conv2(x))
        x = F.max_pool2d(x, 2)
        x = self.dropout1(x)
        x = torch.flatten(x, 1)
        x = F.relu(self.fc1(x))
        x = self.dropout2(x)
        return F.log_softmax(self.fc2(x), dim=1)


class ConvNet(nn.Module):
    """The original Ray parameter-server example's network."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 3, kernel_size=3)
        self.fc = nn.Linear(192, 10)

    def forward(self, x):
        x = F.relu(F.max_pool2d(self.conv1(x), 3))
        x = x.view(-1, 192)
        return F.log_softmax(self.fc(x), dim=1)


def _idx(stem):
    for name in (stem + ".gz", stem):
        path = Path(DATA_DIR) / name
        if path.exists():
            raw = path.read_bytes()
            return gzip.decompress(raw) if name.endswith(".gz") else raw
    raise FileNotFoundError(f"{stem}(.gz) not in {DATA_DIR}")


def _images(stem):
    raw = _idx(stem)
    n = int.from_bytes(raw[4:8], "big")
    x = np.frombuffer(raw, dtype=np.uint8, offset=16).reshape(n, 1, 28, 28)
    return torch.from_numpy(((x.astype(np.float32) / 255.0) - 0.1307) / 0.3081)


def _labels(stem):
    return torch.from_numpy(np.frombuffer(_idx(stem), dtype=np.uint8, offset=8).astype(np.int64))


def build_model():
    torch.manual_seed(1)  # every process builds the same initial weights
    return Net() if NET == "cnn" else ConvNet()


_TRAIN = {}


def batches(rank, workers, epoch):
    """This rank's share of the training set (every workers-th image), shuffled per epoch."""
    if (rank, workers) not in _TRAIN:
        _TRAIN[rank, workers] = (_images("train-images-idx3-ubyte")[rank::workers],
                                 _labels("train-labels-idx1-ubyte")[rank::workers])
    x, y = _TRAIN[rank, workers]
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(1000 * epoch + rank))
    for i in range(0, len(order) - BATCH + 1, BATCH):
        idx = order[i:i + BATCH]
        yield x[idx], y[idx]


def loss(output, target):
    return F.nll_loss(output, target)


def evaluate(model):
    x, y = _images("t10k-images-idx3-ubyte"), _labels("t10k-labels-idx1-ubyte")
    model.eval()
    with torch.no_grad():
        correct = sum(int((model(x[i:i + 1000]).argmax(1) == y[i:i + 1000]).sum())
                      for i in range(0, len(y), 1000))
    return correct / len(y)


def main():
    global NET, DATA_DIR
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--net", choices=["cnn", "convnet"], default=NET)
    p.add_argument("--data-dir", default=DATA_DIR)
    p.add_argument("--mode", default="async")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--iterations", type=int, default=None)
    p.add_argument("--optimizer", default="adam")
    p.add_argument("--lr", type=float, default=None)
    p.add_argument("--placement", default="pack")
    p.add_argument("--checkpoint-dir", default=None)
    p.add_argument("--eval-every", type=float, default=None)
    args = p.parse_args()
    NET, DATA_DIR = args.net, os.path.abspath(args.data_dir)

    from pstrain.ray_torch import train_module

    train_module(
        build_model, batches, loss, evaluate=evaluate, workers=args.workers, mode=args.mode,
        placement=args.placement, eval_every=args.eval_every, optimizer=args.optimizer,
        lr=args.lr, epochs=args.epochs, iterations=args.iterations, batch_size=BATCH,
        train_samples=TRAIN_SAMPLES, checkpoint_dir=args.checkpoint_dir,
    )


if __name__ == "__main__":
    main()
