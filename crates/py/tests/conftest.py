"""Shared fixtures: where MNIST is (PSTRAIN_DATA_DIR, else the workspace's ../shared/data/mnist),
and a real two-node Ray cluster on this machine (a head and a second `ray start --address`
node), started once for every test module that uses it."""

import json
import os
import pathlib
import shutil
import socket
import subprocess
import time
import urllib.request

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


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(cmd, timeout=300, check=True, **kw):
    started = time.time()
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, **kw)
    elapsed = time.time() - started
    if check and p.returncode != 0:
        raise AssertionError(
            f"{' '.join(map(str, cmd))} exited {p.returncode}\n{p.stdout}\n{p.stderr}"
        )
    return p, elapsed


@pytest.fixture(scope="session")
def cluster(tmp_path_factory):
    ray = shutil.which("ray")
    if ray is None:
        if os.environ.get("CI"):
            pytest.fail("the `ray` command is not installed")
        pytest.skip("the `ray` command is not installed")
    port, dashboard = free_port(), free_port()
    # A fresh HOME: Ray 2.60 refuses a cluster's RPCs (InvalidAuthToken) when a token left by
    # an earlier Ray session sits in ~/.ray/auth_token.
    env = dict(os.environ, RAY_USAGE_STATS_ENABLED="0",
               HOME=str(tmp_path_factory.mktemp("home")))
    common = ["--node-ip-address", "127.0.0.1", "--num-cpus", "2",
              "--object-store-memory", str(256 * 2**20), "--disable-usage-stats"]
    _, head_s = run([ray, "start", "--head", "--port", str(port), "--include-dashboard", "true",
                     "--dashboard-host", "127.0.0.1", "--dashboard-port", str(dashboard)]
                    + common, env=env)
    try:
        _, node_s = run([ray, "start", "--address", f"127.0.0.1:{port}"] + common, env=env)
        # The job server answers once the dashboard is up; both nodes must be registered.
        url = f"http://127.0.0.1:{dashboard}"
        deadline = time.time() + 60
        while True:
            try:
                urllib.request.urlopen(url + "/api/version", timeout=2).read()
                status, _ = run([ray, "status", "--address", f"127.0.0.1:{port}"], check=False,
                                env=env)
                if status.stdout.count("node_") >= 2:
                    break
            except OSError:
                pass
            if time.time() > deadline:
                raise AssertionError("the two-node Ray cluster did not come up in 60 s")
            time.sleep(0.5)
        startup = time.time()
        print(f"\nray start --head: {head_s:.1f} s; second node: {node_s:.1f} s")
        yield {"ray": ray, "url": url, "env": env, "head_s": head_s, "node_s": node_s,
               "workdir": tmp_path_factory.mktemp("job"), "ready_at": startup}
    finally:
        run([ray, "stop", "--force"], check=False, env=env)


def events(output: str, name: str):
    """The job's `{"event": name, ...}` records. A record is read up to its closing brace:
    a line another process wrote into the same log may follow it on the same line."""
    found = []
    for line in output.splitlines():
        line = line.strip()
        if line.startswith("{") and f'"event": "{name}"' in line:
            record, _ = json.JSONDecoder().raw_decode(line)
            found.append(record)
    return found
