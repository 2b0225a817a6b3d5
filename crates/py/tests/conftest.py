"""Shared fixtures: where MNIST is (PSTRAIN_DATA_DIR, else the workspace's ../shared/data/mnist)."""

import os
import pathlib

import pytest

REPO = pathlib.Path(__file__).resolve().parents[3]


def mnist_dir() -> pathlib.Path:
    d = pathlib.Path(os.environ.get("PSTRAIN_DATA_DIR", REPO.parent / "shared" / "data" / "mnist"))
    return d.resolve()


@pytest.fixture(scope="session")
def data_dir() -> pathlib.Path:
    d = mnist_dir()
    if not (d / "train-images-idx3-ubyte.gz").exists():
        # Under CI a missing data set is a failure, not a skip.
        if os.environ.get("CI"):
            pytest.fail(f"MNIST not found in {d} (set PSTRAIN_DATA_DIR)")
        pytest.skip(f"MNIST not found in {d} (set PSTRAIN_DATA_DIR)")
    return d
