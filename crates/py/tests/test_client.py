"""The Python client and server against real MNIST: the numpy example trains to >= 90%, and
bad input from Python gets a clear error while the server keeps serving."""

import importlib.util
import math
import os
import re
import sys
import time
import urllib.request

import numpy as np
import pytest

import pstrain
from conftest import REPO, run


def load_example():
    path = REPO / "examples" / "numpy_logreg.py"
    spec = importlib.util.spec_from_file_location("numpy_logreg", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("mode,workers", [("sync", 2), ("async", 3)])
def test_numpy_logistic_regression_reaches_90_percent(data_dir, mode, workers):
    example = load_example()
    result = example.train(str(data_dir), workers=workers, mode=mode, steps=300)
    print(f"\nlogistic regression {mode} x{workers}: {result}")
    assert result["test_accuracy"] >= 0.90
    server = result["server"]
    if mode == "sync":
        assert server["version"] == 300
    else:
        # Every push was either applied or dropped as too stale (bound 32).
        assert server["version"] + server["dropped_stale"] == 300 * workers
    assert result["server"]["rejected_nonfinite"] == 0


def small_params():
    return {"w": np.arange(6, dtype=np.float32).reshape(2, 3), "b": np.ones(3, np.float32)}


def test_client_adopts_layout_and_round_trips_values():
    with pstrain.Server(small_params(), workers=1, mode="async", optimizer="sgd", lr=0.5,
                        lr_schedule="constant") as server:
        client = pstrain.Client([server.address])
        assert client.layout == {"w": (2, 3), "b": (3,)}
        assert (client.workers, client.mode) == (1, "async")
        w = client.pull()
        np.testing.assert_array_equal(w["w"], small_params()["w"])
        np.testing.assert_array_equal(w["b"], np.ones(3))
        grads = {"w": np.ones((2, 3), np.float32), "b": np.zeros(3, np.float32)}
        assert client.push(grads, samples=4)["outcome"] == "applied"
        w = client.pull()
        np.testing.assert_allclose(w["w"], small_params()["w"] - 0.5)
        # A flat buffer goes out as it is.
        flat, views = client.flat_zeros()
        views["b"][...] = 2.0
        client.push(flat, samples=4)
        np.testing.assert_allclose(client.pull()["b"], 1.0 - 1.0)
        assert client.version == 2
        # Pulling into an array of one's own: no new allocation, same values.
        buf, _ = client.flat_zeros()
        w = client.pull(out=buf)
        assert np.shares_memory(w["w"], buf)
        np.testing.assert_allclose(w["w"], small_params()["w"] - 0.5)
        with pytest.raises(ValueError, match="values"):
            client.pull(out=np.zeros(3, np.float32))
        with pytest.raises(TypeError):
            client.pull(out=np.zeros(client.size, np.float64))
        client.leave()


def test_a_model_of_many_named_tensors_is_served_and_checkpointed(tmp_path):
    """A layout of 20,000 tensors with long names (an MoE's experts) describes in 1.7 MB:
    the handshake took 1 MiB at most (`payload of 1749018 bytes exceeds the 1048576-byte
    limit`), and a checkpoint recording the names was refused at the restore as larger than
    one of its layout could be."""
    params = {f"layers.{i // 64}.experts.{i % 64}.feed_forward.up_projection.weight":
              np.full(2, float(i), np.float32) for i in range(20_000)}
    ckpt = str(tmp_path / "ckpt")
    flags = dict(workers=1, mode="async", optimizer="sgd", lr=0.5, lr_schedule="constant",
                 iterations=2, run_id="many", checkpoint_dir=ckpt, checkpoint_secs=0)
    server = pstrain.Server(params, **flags)
    client = pstrain.Client([server.address])
    assert len(client.layout) == 20_000
    ones = {name: np.ones(2, np.float32) for name in params}
    assert client.push(ones, samples=1)["outcome"] == "applied"
    pulled = client.pull()
    np.testing.assert_allclose(pulled["layers.312.experts.31.feed_forward.up_projection.weight"],
                               19999.0 - 0.5)
    client.push(ones, samples=1)
    client.leave()
    assert server.wait(10)["version"] == 2
    again = pstrain.Server(params, keep_running=True, **flags)  # restores version 2
    with pstrain.Client([again.address], role="observer") as observer:
        assert observer.version == 2
        np.testing.assert_allclose(observer.pull(wait=False)["layers.0.experts.0.feed_forward"
                                                             ".up_projection.weight"], -1.0)
    again.stop()


def test_a_worker_on_the_shards_host_trains_through_a_lane_as_over_tcp():
    def train(lanes):
        with pstrain.Server(small_params(), workers=1, mode="async", optimizer="adam",
                            lr=0.1, lr_schedule="constant") as server:
            client = pstrain.Client([server.address], lanes=lanes)
            for i in range(5):
                w = client.pull()
                grads = {k: v * 0.5 - 0.1 * i for k, v in w.items()}
                assert client.push(grads, samples=2)["outcome"] == "applied"
            lanes_used = client.lanes_in_use
            w = client.pull()
            client.leave()
            return lanes_used, w

    (with_lane, a), (without, b) = train(True), train(False)
    # On Linux a worker on the shard's host gets a lane; the weights are the same bits.
    assert (with_lane, without) == ((1, 0) if sys.platform == "linux" else (0, 0))
    for name in a:
        np.testing.assert_array_equal(a[name], b[name])
    # An observer never gets one.
    with pstrain.Server(small_params(), workers=1, mode="async") as server:
        observer = pstrain.Client([server.address], role="observer")
        assert observer.lanes_in_use == 0


def pulled_bytes(server, clients):
    """Each rank's pull bytes as the shard counted them (after compression), from /metrics.
    The shard counts a pull's bytes once it has sent them, which can be after the client has
    read them: a request on each client's connection first (the shard answers it only after
    the pull before it is counted) makes the count whole."""
    for client in clients:
        client.stats()
    url = f"http://127.0.0.1:{server.metrics_port}/metrics"
    text = urllib.request.urlopen(url, timeout=10).read().decode()
    found = re.findall(r'^pstrain_worker_pull_bytes_total\{shard="0",rank="(\d+)"\} (\S+)$',
                       text, re.M)
    return {int(rank): float(value) for rank, value in found}


@pytest.mark.parametrize("mode", ["sync", "async"])
@pytest.mark.parametrize("pull_codec", ["replay", "delta-int8"])
def test_update_pulls_bring_what_changed_in_the_runs_pull_codec(mode, pull_codec):
    """A Python worker behind a link (TCP, no lane) pulls with ``update=True`` what a Rust
    worker pulls: replayed updates (the shard's weights bit for bit) or differences (within
    int8's rounding of them), a fraction of a whole fp32 pull's bytes; without ``update``
    every value comes as fp32."""
    n, steps, workers = 50_000, 12, 2
    params = {"w": np.random.default_rng(0).standard_normal(n).astype(np.float32)}
    with pstrain.Server(params, workers=workers, mode=mode, optimizer="adam", lr=0.01,
                        lr_schedule="constant", push_codec="topk:10", pull_codec=pull_codec,
                        metrics_addr="127.0.0.1:0") as server:
        clients = [pstrain.Client([server.address], rank, lanes=False) for rank in range(workers)]
        held = [c.pull_flat(update=True, out=np.empty(n, np.float32)) for c in clients]
        observer = pstrain.Client([server.address], role="observer", lanes=False)
        rng = np.random.default_rng(1)
        for _ in range(steps):
            # Each worker pushes, then pulls what changed (in sync the step closes at the
            # second push, so the pulls that wait for it are answered in turn).
            for c, w in zip(clients, held):
                c.push(w * 0.1 + rng.standard_normal(n).astype(np.float32), samples=8)
            for c, w in zip(clients, held):
                c.pull_flat(out=w, update=True)
            truth = observer.pull_flat(wait=False)
            for w in held:
                if pull_codec == "replay":
                    np.testing.assert_array_equal(w, truth)
                else:
                    # int8 differences: each pull leaves at most half a step of its scale,
                    # which the next one carries.
                    np.testing.assert_allclose(w, truth, atol=0.02)
            assert not np.array_equal(held[0], params["w"]), "the weights moved"
        update_bytes = pulled_bytes(server, clients)
        for rank in range(workers):
            # The first pull was whole (fp32; under replay with a fresh optimizer's state, a
            # head of a few bytes), each later one a fraction of it.
            after_first = update_bytes[rank] - 4 * n
            assert 0 < after_first < 0.3 * steps * 4 * n, (rank, after_first)
        # Without `update` every value comes (under replay with the optimizer's state).
        clients[0].pull_flat(wait=False)
        whole = pulled_bytes(server, clients)[0] - update_bytes[0]
        assert whole >= 4 * n
        # The array the last pull filled is the only one `update` takes.
        with pytest.raises(ValueError, match="the array the last pull filled"):
            clients[1].pull_flat(out=np.empty(n, np.float32), update=True)
        with pytest.raises(ValueError, match="needs `out`"):
            clients[1]._raw.pull(True, None, True)
        for c in clients:
            c.leave()


def test_a_push_names_the_version_its_gradient_was_computed_on():
    """A worker that pulled again while it computed names the version its gradient came
    from (`base_version`), and the shard counts the staleness from there; a version newer
    than the client has pulled counts as the one it has."""
    with pstrain.Server(small_params(), workers=1, mode="async", optimizer="sgd", lr=0.1,
                        lr_schedule="constant") as server:
        client = pstrain.Client([server.address], lanes=False)
        flat, _ = client.flat_zeros()
        client.pull_flat()
        first = client.version
        for behind in range(2):
            # Each push without a pull between is one update staler.
            assert client.push(flat, 1)["staleness"] == behind
        client.pull_flat()
        assert client.version == first + 2
        assert client.push(flat, 1, base_version=first)["staleness"] == 2
        assert client.push(flat, 1, base_version=10**9)["staleness"] == 1
        client.leave()


@pytest.mark.parametrize("lanes", [True, False])
def test_a_run_ends_when_its_worker_leaves_though_the_client_is_still_in_scope(lanes):
    """`leave()` stops the client's heartbeats: a shard waited on while the client object
    lives (the last pull saw the run done, then `leave()`) ends at once. Before, the
    heartbeat connection held it open for as long as the client lived."""
    server = pstrain.Server(small_params(), workers=1, mode="sync", optimizer="sgd", lr=0.1,
                            iterations=4, batch_size=8)
    client = pstrain.Client([server.address], rank=0, lanes=lanes, heartbeat=0.05)
    flat, _ = client.flat_zeros()
    client.pull()
    for _ in range(4):
        client.push(flat, 8)
        client.pull()
    assert client.done
    time.sleep(0.3)  # the heartbeat connection is up and beating
    client.leave()
    report = server.wait(10)
    assert report is not None, "the shard kept waiting with the client still in scope"
    assert report["version"] == 4


def test_bad_gradients_are_refused_and_the_server_keeps_serving():
    with pstrain.Server(small_params(), workers=2, mode="async", optimizer="sgd", lr=0.1) as server:
        bad = pstrain.Client([server.address], rank=0)
        good = pstrain.Client([server.address], rank=1)
        bad.pull()
        with pytest.raises(ValueError, match="missing"):
            bad.push({"w": np.zeros((2, 3), np.float32)}, samples=1)
        with pytest.raises(ValueError, match="shape"):
            bad.push({"w": np.zeros((3, 2), np.float32), "b": np.zeros(3, np.float32)}, samples=1)
        with pytest.raises(ValueError, match="values"):
            bad.push(np.zeros(5, np.float32), samples=1)
        # A list is one flat gradient like an array (of the wrong length here), not names.
        with pytest.raises(ValueError, match="gradient has 5 values, the model has 9"):
            bad.push([0.0] * 5, samples=1)
        # A pull into an array it cannot fill says what `out` must be.
        must = "`out` must be a flat, contiguous, writeable float32 array"
        for out in (np.zeros(9, np.float64), [0.0] * 9):
            with pytest.raises(TypeError, match=must):
                bad.pull_flat(out=out)
        for out in (np.zeros((3, 3), np.float32), np.zeros(18, np.float32)[::2]):
            with pytest.raises(ValueError, match=must):
                bad.pull_flat(out=out)
        nan = {"w": np.full((2, 3), np.nan, np.float32), "b": np.zeros(3, np.float32)}
        with pytest.raises(pstrain.PstrainError, match="non-finite"):
            bad.push(nan, samples=1)
        inf = {"w": np.zeros((2, 3), np.float32), "b": np.array([0, math.inf, 0], np.float32)}
        with pytest.raises(pstrain.PstrainError, match="non-finite"):
            bad.push(inf, samples=1)
        # The other worker (and the refused one) carry on; the weights were not touched.
        good.pull()
        zero = {"w": np.zeros((2, 3), np.float32), "b": np.zeros(3, np.float32)}
        assert good.push(zero, samples=1)["outcome"] == "applied"
        assert bad.push(zero, samples=1)["outcome"] in ("applied", "dropped")
        np.testing.assert_array_equal(good.pull()["w"], small_params()["w"])
        stats = good.stats()[0]
        assert stats["rejected_nonfinite"] == 2
        bad.leave()
        good.leave()


def test_clear_errors_for_bad_flags_addresses_and_params():
    with pytest.raises(pstrain.PstrainError, match="--mode"):
        pstrain.ShardServer(["--mode", "sideways"])
    with pytest.raises(ValueError, match="float32"):
        pstrain.ShardServer(["--listen", "127.0.0.1:0"], {"w": np.zeros(3, np.float64)})
    with pytest.raises(pstrain.PstrainError, match="no parameters"):
        pstrain.ShardServer(["--listen", "127.0.0.1:0"], {})
    with pytest.raises(pstrain.PstrainError, match="cannot reach"):
        pstrain.Client(["127.0.0.1:1"], connect_timeout=0.3)
    with pytest.raises(ValueError, match="role"):
        pstrain.Client(["127.0.0.1:1"], role="boss")
    with pytest.raises(ValueError, match=r"rank must be 0 or more .* got -1"):
        pstrain.Client(["127.0.0.1:1"], rank=-1)
    # Server's keywords are `pstrain server` flags: one that is none is refused as Python
    # refuses a keyword, and a negative value reaches its flag's own check (it was taken
    # for a flag: "unexpected argument '-1'").
    with pytest.raises(TypeError, match="unexpected keyword argument 'learning_rate'"):
        pstrain.Server(small_params(), learning_rate=0.1)
    with pytest.raises(pstrain.PstrainError, match="lr must be finite and > 0, got -1"):
        pstrain.Server(small_params(), lr=-1.0)
    with pytest.raises(pstrain.PstrainError, match="invalid value '-2' for '--max-staleness"):
        pstrain.Server(small_params(), max_staleness=-2)
    # A cause the error already quotes is said once (it was "... got 0: workers must be ...").
    with pytest.raises(pstrain.PstrainError) as said:
        pstrain.Server(small_params(), workers=0)
    assert str(said.value) == "invalid run plan: workers must be >= 1, got 0"
    # An address that cannot be one is refused at once, not retried for connect_timeout.
    with pytest.raises(pstrain.PstrainError, match="`nowhere` is not HOST:PORT"):
        pstrain.Client(["nowhere"], connect_timeout=600)
    nan = {"w": np.zeros((2, 3), np.float32), "b": np.array([0, np.nan, 0], np.float32)}
    with pytest.raises(ValueError, match="`b` holds NaN at flat index 1"):
        pstrain.Server(nan, workers=1)
    with pstrain.Server(small_params(), workers=1) as server:
        with pytest.raises(pstrain.PstrainError, match="out of range"):
            pstrain.Client([server.address], rank=5)
        with pytest.raises(ValueError, match="heartbeat must be a positive number"):
            pstrain.Client([server.address], rank=0, heartbeat=0)
        with pstrain.Client([server.address], rank=0) as client:
            flat, _ = client.flat_zeros()
            for samples in (0, -1, 2**40):
                with pytest.raises(ValueError, match=f"samples must be between 1 and .* {samples}"):
                    client.push(flat, samples)
            with pstrain.Client([server.address], role="observer") as observer:
                with pytest.raises(pstrain.PstrainError, match="an observer does not push"):
                    observer.push(flat, 1)
            client.leave()
            # A client that left does not slip back into the run (it rejoined before).
            for call in (client.pull, lambda: client.push(flat, 1), client.stats):
                with pytest.raises(pstrain.PstrainError, match="left the run"):
                    call()
            client.leave()  # idempotent
        assert server.wait(10)["gradients_applied"] == 0
        # Two shards named where there is one: refused before any tensor moves.
        with pytest.raises(pstrain.PstrainError, match="shard"):
            pstrain.Client([server.address, server.address], connect_timeout=1)


def test_a_pstrain_worker_against_a_python_model_is_told_what_trains_it():
    """`pstrain worker` cannot compute a model given as arrays: it says which clients can
    (it said the plan's model name `custom` was not cnn or convnet)."""
    exe = os.environ.get("PSTRAIN_BIN", str(REPO / "target" / "release" / "pstrain"))
    if not os.path.exists(exe):
        pytest.skip(f"{exe} not built (cargo build --release)")
    with pstrain.Server(small_params(), workers=1) as server:
        p, _ = run([exe, "worker", "--servers", server.address, "--rank", "0"], timeout=60,
                   check=False)
        assert p.returncode == 1, p.stderr
        assert "Python clients (`pstrain.Client`, `pstrain.torch`)" in p.stderr, p.stderr
        server.stop()


def test_two_shards_split_the_parameters():
    params = {"w": np.random.default_rng(0).standard_normal((50, 40)).astype(np.float32),
              "b": np.zeros(40, np.float32)}
    servers = [pstrain.Server(params, workers=1, mode="sync", optimizer="sgd", lr=1.0,
                              lr_schedule="constant", shard=i, shards=2)
               for i in range(2)]
    try:
        client = pstrain.Client([s.address for s in servers])
        w = client.pull()
        np.testing.assert_array_equal(w["w"], params["w"])
        grads = {"w": np.full((50, 40), 0.25, np.float32), "b": np.ones(40, np.float32)}
        client.push(grads, samples=8)
        w = client.pull()  # waits for the step on both shards
        np.testing.assert_allclose(w["w"], params["w"] - 0.25, rtol=1e-6)
        np.testing.assert_allclose(w["b"], -1.0)
        assert [s["version"] for s in client.stats()] == [1, 1]
        client.leave()
    finally:
        for s in servers:
            s.stop()
            s.wait()


def test_rank_none_takes_a_free_rank_vacated_ones_first():
    with pstrain.Server(small_params(), workers=3, mode="async") as server:
        a = pstrain.Client([server.address], rank=0)
        b = pstrain.Client([server.address], rank=None)
        assert b.rank == 1  # no rank vacated yet: the first one not taken
        c = pstrain.Client([server.address], rank=2)
        with pytest.raises(pstrain.PstrainError, match="taken"):
            pstrain.Client([server.address], rank=None, connect_timeout=1)
        a.leave()
        replacement = pstrain.Client([server.address], rank=None)
        assert replacement.rank == 0  # the rank its worker left
        for client in (b, c, replacement):
            client.leave()


def test_the_client_benchmark_runs_over_two_shards():
    from pstrain.bench import measure

    r = measure(values=10_000, shards=2, rounds=2)
    assert r["shards"] == 2 and r["values"] == 10_000
    for key in ("flat_gb_per_s", "reused_gb_per_s", "dict_gb_per_s", "numpy_copy_gb_per_s"):
        assert math.isfinite(r[key]) and r[key] > 0, r


def test_rank_none_prefers_a_dead_workers_rank_to_a_finished_ones():
    with pstrain.Server(small_params(), workers=2, mode="async") as server:
        finished = pstrain.Client([server.address], rank=0)
        dead = pstrain.Client([server.address], rank=1)
        dead._raw = None  # its connections close with no goodbye, as when a process dies
        del dead
        finished.leave()  # a clean goodbye: its worker is done
        # Both ranks are free once the shard has seen both go.
        observer = pstrain.Client([server.address], role="observer")
        deadline = time.time() + 5
        while observer.stats()[0]["active_workers"] > 0:
            assert time.time() < deadline, observer.stats()
            time.sleep(0.01)
        replacement = pstrain.Client([server.address], rank=None)
        assert replacement.rank == 1
        observer.leave()
        replacement.leave()


def test_a_run_token_keeps_strangers_out():
    token = pstrain.new_token()
    assert len(token) == 64
    with pstrain.Server(small_params(), workers=1, mode="async", optimizer="sgd",
                        lr_schedule="constant", token=token) as server:
        with pytest.raises(pstrain.PstrainError, match="requires the run's token"):
            pstrain.Client([server.address], connect_timeout=2)
        with pytest.raises(pstrain.PstrainError, match="does not hold this run's token"):
            pstrain.Client([server.address], connect_timeout=2, token=pstrain.new_token())
        with pytest.raises(ValueError, match="hex"):
            pstrain.Client([server.address], token="not a token")
        client = pstrain.Client([server.address], token=token)
        assert client.pull()["b"].tolist() == [1.0, 1.0, 1.0]
        client.leave()
    # Beyond loopback a shard without a token refuses to start (protected mode).
    with pytest.raises(pstrain.PstrainError, match="without a run token"):
        pstrain.Server(small_params(), listen="0.0.0.0:0")
