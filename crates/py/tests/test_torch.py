"""Your own PyTorch module on pstrain (`pstrain.torch`, `pstrain.ray_torch`): the module's
parameters are views into the worker's flat buffers (pull writes into them, push sends the
gradients backward() accumulated there), a module that does not match the servers is refused
by name and shape, NaN gradients raise; the PyTorch MNIST example trains through a Ray job on
a two-node cluster in sync and async mode, and its export loads with `strict=True`.

Needs torch: a machine without it skips this file (CI installs it)."""

import importlib.util
import itertools
import json
import math
import os
import re
import shutil
import sys

import numpy as np
import pytest

if not os.environ.get("CI"):  # CI installs torch: there a missing torch is a failure
    pytest.importorskip("torch", reason="PyTorch is not installed: the torch-worker tests "
                        "need `pip install torch`")

import torch
import torch.nn as nn
import torch.nn.functional as F

import pstrain
from pstrain.torch import ModuleWorker, load_export, parameters_of

from conftest import REPO, events, run

EXAMPLE = REPO / "examples" / "torch_mnist.py"
EXE = os.environ.get("PSTRAIN_BIN", str(REPO / "target" / "release" / "pstrain"))


def need_exe():
    """Skips the calling test where the `pstrain` binary is not built."""
    if not os.path.exists(EXE):
        pytest.skip(f"{EXE} not built (cargo build --release)")


def exported(ckpt, tmp_path):
    """`pstrain export` of the run whose checkpoints are in `ckpt`: the file's path."""
    need_exe()
    out = tmp_path / "model.safetensors"
    run([EXE, "export", "--checkpoint", str(ckpt), "--out", str(out)])
    return str(out)


def load_example(data_dir, net="cnn"):
    spec = importlib.util.spec_from_file_location("torch_mnist_example", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.DATA_DIR, module.NET = str(data_dir), net
    return module


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.fc1 = nn.Linear(4, 3)
        self.fc2 = nn.Linear(3, 2)

    def forward(self, x):
        return self.fc2(torch.relu(self.fc1(x)))


def tiny_server(**flags):
    return pstrain.Server.from_module(Tiny(), workers=1, mode="async", optimizer="sgd", lr=0.5,
                                      lr_schedule="constant", keep_running=True, **flags)


def test_parameters_are_views_pull_fills_them_and_push_sends_the_grads():
    model = Tiny()
    served = parameters_of(model)
    assert list(served) == ["fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias"]
    with tiny_server() as server, pstrain.Client([server.address]) as client:
        worker = ModuleWorker(client, Tiny())
        module = worker.module
        worker.pull()
        base = worker.params.ctypes.data
        for (name, p), offset in zip(module.named_parameters(), [0, 12, 15, 21]):
            # Each parameter lives in the flat buffer, at its place in the layout.
            assert p.data_ptr() == base + 4 * offset, name
            assert np.array_equal(p.detach().numpy(), served[name])
        x = torch.randn(8, 4)
        worker.zero_grad()
        F.mse_loss(module(x), torch.zeros(8, 2)).backward()
        expected = {n: p.grad.clone() for n, p in module.named_parameters()}
        assert not np.all(worker.grads == 0), "backward() wrote into the flat gradient buffer"
        assert worker.push(8)["outcome"] == "applied"
        worker.pull()
        for name, p in module.named_parameters():
            # SGD lr 0.5 on the server: w - 0.5 g, read back into the same memory.
            want = torch.from_numpy(served[name]) - 0.5 * expected[name]
            assert torch.allclose(p.detach(), want, atol=1e-6), name
        assert module.fc1.weight.data_ptr() == base

        # Training code that sets grads to None (PyTorch's default zero_grad) still works: the
        # new .grad is copied in and the view bound again.
        module.zero_grad(set_to_none=True)
        F.mse_loss(module(x), torch.zeros(8, 2)).backward()
        replaced = {n: p.grad.clone() for n, p in module.named_parameters()}
        before = {n: p.detach().clone() for n, p in module.named_parameters()}
        worker.push(8)
        worker.pull()
        for name, p in module.named_parameters():
            assert torch.allclose(p.detach(), before[name] - 0.5 * replaced[name], atol=1e-6)

        # A NaN gradient is refused like any other push; the weights do not move.
        worker.zero_grad()
        module.fc2.bias.grad[0] = float("nan")
        with pytest.raises(pstrain.PstrainError, match="(?i)nan|finite"):
            worker.push(8)
        after = {n: p.detach().clone() for n, p in module.named_parameters()}
        worker.pull()
        for name, p in module.named_parameters():
            assert torch.equal(p.detach(), after[name])
        server.stop()
    assert server.wait(10)["rejected_nonfinite"] == 1


def test_on_the_shards_host_the_flat_buffers_are_the_lane_and_train_as_over_tcp():
    def train(lanes):
        with tiny_server() as server, pstrain.Client([server.address], lanes=lanes) as client:
            worker = ModuleWorker(client, Tiny())
            arrays = client.lane_arrays()
            torch.manual_seed(1)
            for _ in range(4):
                worker.pull()
                worker.zero_grad()
                x = torch.randn(8, 4)
                F.mse_loss(worker.module(x), torch.zeros(8, 2)).backward()
                assert worker.push(8)["outcome"] == "applied"
            worker.pull()
            weights = worker.params.copy()
            server.stop()
            return arrays, worker, weights

    (arrays, worker, with_lane), (none, _, over_tcp) = train(True), train(False)
    assert none is None, "lanes=False: no lane, the worker keeps buffers of its own"
    np.testing.assert_array_equal(with_lane, over_tcp)
    if sys.platform == "linux":
        grads, params = arrays
        # The worker's buffers are the lane's push and pull areas: no copy on this side.
        assert np.shares_memory(worker.params, params) and np.shares_memory(worker.grads, grads)
        assert worker.module.fc1.weight.data_ptr() == params.ctypes.data
        # The arrays keep the memory mapped after the client and the shard are gone.
        np.testing.assert_array_equal(params, with_lane)


@pytest.mark.parametrize("change,message", [
    (lambda m: setattr(m, "fc2", nn.Linear(3, 5)), "`fc2.weight` has shape [5, 3] in the module, [2, 3]"),
    (lambda m: setattr(m, "fc3", nn.Linear(2, 2)), "`fc3.weight` is not on the servers"),
    (lambda m: delattr(m, "fc2"), "`fc2.weight` is missing from the module"),
])
def test_a_module_that_does_not_match_the_servers_is_refused_by_name_and_shape(change, message):
    with tiny_server() as server, pstrain.Client([server.address]) as client:
        other = Tiny()
        change(other)
        with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("]", r"\]")):
            ModuleWorker(client, other)
        assert client.stats()[0]["gradients_applied"] == 0
        server.stop()


def test_a_non_float32_module_is_refused():
    with pytest.raises(ValueError, match="float32"):
        parameters_of(Tiny().double())


def test_a_lazy_module_not_yet_run_is_refused_with_what_to_do():
    lazy = nn.Sequential(nn.LazyLinear(3))
    with pytest.raises(ValueError, match=r"`0.weight` is not initialised yet .*run one batch"):
        parameters_of(lazy)
    lazy(torch.zeros(2, 5))
    assert {n: a.shape for n, a in parameters_of(lazy).items()} == {"0.weight": (3, 5),
                                                                   "0.bias": (3,)}


def test_export_of_a_module_run_loads_with_strict_true(data_dir, tmp_path):
    """`Server.from_module` with checkpoints, 60 updates from the example's cnn, then
    `pstrain export`: the file loads into a fresh module with strict=True and holds exactly
    the weights the servers ended with."""
    need_exe()
    example = load_example(data_dir)
    ckpt = tmp_path / "ckpt"
    server = pstrain.Server.from_module(
        example.build_model(), workers=1, mode="async", optimizer="adam", lr=1e-3,
        iterations=60, batch_size=64, train_samples=60000, keep_running=True,
        checkpoint_dir=str(ckpt), checkpoint_secs=0)
    from pstrain.torch import train_worker
    report = train_worker([server.address], example.build_model, example.batches, example.loss)
    assert report["steps"] == 60, report
    final = example.build_model()
    with pstrain.Client([server.address], role="observer") as observer:
        ModuleWorker(observer, final).pull(wait=False)
    server.stop()
    assert server.wait(10)["version"] == 60
    loaded = example.build_model()
    assert load_export(loaded, exported(ckpt, tmp_path), strict=True) == []
    for (name, a), (_, b) in zip(loaded.state_dict().items(), final.state_dict().items()):
        assert torch.equal(a, b), name


class WithScalar(nn.Module):
    """A 0-d parameter (a learned temperature, ReZero's alpha) beside a layer."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.fc = nn.Linear(4, 1)
        self.scale = nn.Parameter(torch.tensor(2.0))

    def forward(self, x):
        return self.fc(x) * self.scale


def test_a_module_with_a_scalar_parameter_is_served_with_its_shape_and_exports(tmp_path):
    """A 0-d parameter keeps its shape `()` on the servers (it was served as `[1]`, and the
    module that had built the server was then refused by it), trains, and an export loads
    back with strict=True."""
    ckpt = tmp_path / "ckpt"
    server = pstrain.Server.from_module(
        WithScalar(), workers=1, mode="sync", optimizer="sgd", lr=0.1, lr_schedule="constant",
        iterations=6, batch_size=8, checkpoint_dir=str(ckpt), checkpoint_secs=0)
    client = pstrain.Client([server.address])
    assert client.layout["scale"] == ()
    worker = ModuleWorker(client, WithScalar())
    module = worker.module
    worker.pull()
    torch.manual_seed(1)
    for _ in range(6):
        worker.zero_grad()
        F.mse_loss(module(torch.randn(8, 4)), torch.ones(8, 1)).backward()
        assert worker.push(8)["outcome"] == "applied"
        worker.pull()
    assert module.scale.shape == () and float(module.scale) != 2.0, "the scalar moved"
    client.leave()
    assert server.wait(10)["version"] == 6
    out = exported(ckpt, tmp_path)
    loaded = WithScalar()
    assert load_export(loaded, out, strict=True) == []
    for (name, a), (_, b) in zip(loaded.state_dict().items(), module.state_dict().items()):
        assert torch.equal(a, b), name


class FineTuned(Tiny):
    """A fine-tuned network: `fc1` (the "backbone") frozen, `fc2` trained."""

    def __init__(self):
        super().__init__()
        self.fc1.requires_grad_(False)


def test_frozen_parameters_stay_as_built_under_weight_decay_and_never_travel(tmp_path, data_dir):
    """Parameters with requires_grad=False are not served: the servers' optimizer cannot move
    them (Adam's weight decay moved a served frozen layer by 0.23 in 50 steps though its
    gradient was zero), they cross no link, a worker that froze another set is refused by
    name, and an export loads the trained ones beside them."""
    assert list(parameters_of(FineTuned())) == ["fc2.weight", "fc2.bias"]
    ckpt = tmp_path / "ckpt"
    server = pstrain.Server.from_module(
        FineTuned(), workers=1, mode="async", optimizer="adam", lr=0.05, weight_decay=0.1,
        iterations=30, batch_size=8, checkpoint_dir=str(ckpt), checkpoint_secs=0)
    client = pstrain.Client([server.address])
    assert list(client.layout) == ["fc2.weight", "fc2.bias"]
    unfrozen = Tiny()
    with pytest.raises(ValueError, match=r"`fc2.weight` is frozen in the module \(requires_grad"
                       r"=False\) but trained on the servers"):
        all_frozen = FineTuned()
        all_frozen.fc2.weight.requires_grad_(False)
        ModuleWorker(client, all_frozen)
    with pytest.raises(ValueError, match="`fc1.weight` is not on the servers"):
        ModuleWorker(client, unfrozen)
    worker = ModuleWorker(client, FineTuned())
    module = worker.module
    built = {n: p.detach().clone() for n, p in FineTuned().named_parameters()}
    worker.pull()
    torch.manual_seed(1)
    for _ in range(30):
        worker.zero_grad()
        F.mse_loss(module(torch.randn(8, 4)), torch.ones(8, 2)).backward()
        assert worker.push(8)["outcome"] == "applied"
        worker.pull()
    assert torch.equal(module.fc1.weight, built["fc1.weight"]), "the frozen layer stayed"
    assert torch.equal(module.fc1.bias, built["fc1.bias"])
    assert not torch.equal(module.fc2.weight, built["fc2.weight"]), "the trained one moved"
    client.leave()
    assert server.wait(10)["version"] == 30
    out = exported(ckpt, tmp_path)
    loaded = FineTuned()
    assert sorted(load_export(loaded, out)) == ["fc1.bias", "fc1.weight"]
    for (name, a), (_, b) in zip(loaded.state_dict().items(), module.state_dict().items()):
        assert torch.equal(a, b), name
    # The CLI's built-in-model commands say what such a folder is, and where it resumes.
    p, _ = run([EXE, "eval", "--checkpoint", str(ckpt)], check=False)
    assert p.returncode != 0 and "a model of your own, served from Python" in p.stderr, p.stderr
    assert "pstrain export --checkpoint" in p.stderr, p.stderr
    p, _ = run([EXE, "train", "--resume", str(ckpt), "--data-dir", str(data_dir)], check=False)
    assert p.returncode != 0 and "a model of your own, served from Python" in p.stderr, p.stderr


def test_a_build_model_whose_frozen_parameters_differ_each_call_is_refused():
    """Frozen parameters are each worker's own: a build_model that draws them afresh on each
    call (no seed) would have every worker train beside another frozen network."""
    from pstrain.torch import train_worker

    def unseeded():
        model = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))
        model[0].requires_grad_(False)
        return model

    with pstrain.Server.from_module(unseeded(), workers=1, mode="async",
                                    keep_running=True) as server:
        with pytest.raises(ValueError, match=r"other values of the frozen parameters .*"
                           r"`0.weight`, `0.bias`.*seed"):
            train_worker([server.address], unseeded, lambda r, w, e: iter(()), F.mse_loss)
        # The worker left on the way out: its rank is free again.
        with pstrain.Client([server.address], rank=0) as again:
            assert again.rank == 0
        server.stop()


class Tied(nn.Module):
    """Tied weights (a language model's input embedding and output layer): one parameter
    under two names."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.emb = nn.Embedding(10, 4)
        self.out = nn.Linear(4, 10, bias=False)
        self.out.weight = self.emb.weight

    def forward(self, x):
        return self.out(self.emb(x))


def test_tied_weights_are_served_once_train_as_in_pytorch_and_their_export_loads(tmp_path):
    """A parameter shared under two names is one tensor on the servers, trains as PyTorch's
    own SGD trains it (both uses' gradients), and an export (which names it once) loads into
    the module with strict=True (it was refused: the second name was missing)."""
    ckpt = tmp_path / "ckpt"
    assert list(parameters_of(Tied())) == ["emb.weight"]
    server = pstrain.Server.from_module(
        Tied(), workers=1, mode="async", optimizer="sgd", lr=0.5, lr_schedule="constant",
        iterations=10, batch_size=16, checkpoint_dir=str(ckpt), checkpoint_secs=0)
    client = pstrain.Client([server.address])
    worker = ModuleWorker(client, Tied())
    module = worker.module
    reference = Tied()
    sgd = torch.optim.SGD(reference.parameters(), lr=0.5)
    x = torch.randint(0, 10, (16,), generator=torch.Generator().manual_seed(1))
    worker.pull()
    for _ in range(10):
        worker.zero_grad()
        F.cross_entropy(module(x), x).backward()
        worker.push(16)
        worker.pull()
        sgd.zero_grad()
        F.cross_entropy(reference(x), x).backward()
        sgd.step()
    assert module.out.weight is module.emb.weight
    assert torch.allclose(module.emb.weight, reference.emb.weight, atol=1e-6)
    client.leave()
    assert server.wait(10)["version"] == 10
    out = exported(ckpt, tmp_path)
    loaded = Tied()
    assert load_export(loaded, out, strict=True) == []
    assert loaded.out.weight is loaded.emb.weight
    assert torch.equal(loaded.emb.weight, module.emb.weight)


def test_the_command_line_form_says_what_is_wrong_with_the_script(tmp_path):
    from pstrain.ray_torch import _load_script

    with pytest.raises(SystemExit, match="no such file"):
        _load_script(str(tmp_path / "missing.py"))
    with pytest.raises(SystemExit, match="a folder, not a Python file"):
        _load_script(str(tmp_path))
    partial = tmp_path / "partial.py"
    partial.write_text("def build_model():\n    return None\n")
    with pytest.raises(SystemExit, match="does not define batches, loss"):
        _load_script(str(partial))



def test_a_keyword_that_is_no_server_flag_is_refused_before_anything_starts():
    """A typo among the server's keywords (``learning_rate`` for ``lr``) is refused as Python
    refuses a keyword, before a Ray job asks the cluster for room or a shard binds a port."""
    import ray
    from pstrain.ray_torch import train_module

    ray_was_up = ray.is_initialized()
    with pytest.raises(TypeError, match="train_module.. got an unexpected keyword argument "
                                        "'learning_rate'"):
        train_module(nn.Linear, lambda *a: iter(()), F.cross_entropy, learning_rate=0.1)
    assert ray.is_initialized() == ray_was_up  # no ray.init for a typo
    with pytest.raises(TypeError, match="Server.. got an unexpected keyword argument 'lrs'"):
        pstrain.Server.from_module(nn.Linear(2, 2), lrs=0.1)

# --- the Ray job (the two-node cluster from conftest) ------------------------------------

CNN_THRESHOLD = 0.985
CONVNET_THRESHOLD = 0.85


def submit_torch_job(cluster, args, env_vars=None, timeout=900):
    workdir = cluster["workdir"]
    shutil.copy(EXAMPLE, workdir / "torch_mnist.py")
    runtime = ["--runtime-env-json", json.dumps({"env_vars": env_vars})] if env_vars else []
    cmd = [cluster["ray"], "job", "submit", "--address", cluster["url"], "--working-dir",
           str(workdir), *runtime, "--", sys.executable, *args]
    p, elapsed = run(cmd, timeout=timeout, check=False, env=cluster["env"])
    out = p.stdout + p.stderr
    assert p.returncode == 0, out
    [summary] = events(out, "ray_summary")
    [placement] = events(out, "placement")
    print(f"\n{' '.join(args)}: {elapsed:.1f} s; accuracy {summary['test_accuracy']}, "
          f"training {summary['training_s']} s, {summary['samples_per_s']} samples/s, "
          f"nodes {summary['nodes']}")
    return out, summary, placement


def test_pytorch_mnist_example_trains_sync_through_a_ray_job_and_exports(
        cluster, data_dir, tmp_path):
    ckpt = tmp_path / "ckpt"
    out, summary, placement = submit_torch_job(cluster, [
        "torch_mnist.py", "--data-dir", str(data_dir), "--mode", "sync", "--epochs", "2",
        "--placement", "spread", "--checkpoint-dir", str(ckpt)])
    assert summary["nodes"] == 2, placement
    assert summary["test_accuracy"] >= CNN_THRESHOLD, summary
    assert all(w["epochs"] == 2 for w in summary["workers"]), summary["workers"]
    # Sync: both workers pushed every step; the shard made one update per step.
    shard = summary["shards"][0]
    assert shard["gradients_applied"] == 2 * shard["version"], shard
    assert events(out, "progress"), "no progress lines in the job log"

    # The export of the run loads into the user's module with strict=True and scores what
    # the job reported.
    export = exported(ckpt, tmp_path)
    example = load_example(data_dir)
    model = example.Net()
    model.load_state_dict(
        __import__("safetensors.torch", fromlist=["load_file"]).load_file(export),
        strict=True)
    assert math.isclose(example.evaluate(model), summary["test_accuracy"], abs_tol=1e-9)


def test_pytorch_mnist_example_trains_async_from_the_command_line_form(cluster, data_dir):
    _, summary, _ = submit_torch_job(cluster, [
        "-m", "pstrain.ray_torch", "torch_mnist.py", "--mode", "async", "--epochs", "2",
        "--optimizer", "adam", "--lr", "0.001", "--batch-size", "64"],
        env_vars={"PSTRAIN_DATA_DIR": str(data_dir)})
    assert summary["test_accuracy"] >= CNN_THRESHOLD, summary
    shard = summary["shards"][0]
    # Async: every gradient applied on arrival, from both workers.
    assert shard["gradients_applied"] == shard["version"], shard
    assert all(w["steps"] > 0.3 * shard["version"] for w in summary["workers"]), summary


def test_the_ray_example_convnet_reaches_its_85_percent(cluster, data_dir):
    _, summary, _ = submit_torch_job(cluster, [
        "torch_mnist.py", "--data-dir", str(data_dir), "--net", "convnet", "--mode", "async",
        "--iterations", "1000", "--optimizer", "sgd", "--lr", "0.01"])
    assert summary["test_accuracy"] >= CONVNET_THRESHOLD, summary


def train_two(server, example, **kwargs):
    """Two `train_worker`s against `server` in threads of this process; their reports."""
    import threading

    from pstrain.torch import train_worker
    reports = [None, None]

    def work(rank):
        reports[rank] = train_worker([server.address], example.build_model, example.batches,
                                     example.loss, rank=rank, **kwargs)

    threads = [threading.Thread(target=work, args=(r,)) for r in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return reports


def test_module_workers_run_without_ray_too(data_dir):
    """`train_worker` against a `Server.from_module` in this process (threads): the path a
    user takes before a cluster exists; with `step_times=True`, each step's compute time."""
    example = load_example(data_dir, net="convnet")
    server = pstrain.Server.from_module(example.build_model(), workers=2, mode="sync",
                                        optimizer="sgd", lr=0.01, lr_schedule="constant",
                                        iterations=100, batch_size=64, keep_running=True)
    reports = train_two(server, example, step_times=True)
    server.stop()
    stats = server.wait(10)
    assert stats["version"] == 100 and stats["gradients_applied"] == 200, stats
    assert [r["steps"] for r in reports] == [100, 100], reports
    # `step_times=True`: one time per step, adding up to the report's seconds computing.
    for r in reports:
        times = r["step_compute_s"]
        assert len(times) == 100 and all(t > 0 for t in times), r
        assert abs(sum(times) - r["compute_s"]) < 0.01, (sum(times), r["compute_s"])


@pytest.mark.parametrize("overlap", [False, True])
def test_batches_that_bring_nothing_raise_instead_of_spinning(overlap):
    """An epoch without batches (a rank whose shard of the data is empty, a generator
    already spent) raises; the loop spun without pushing before, and the run never ended."""
    from pstrain.torch import train_worker

    with tiny_server() as server:
        with pytest.raises(ValueError, match="yielded no batch for epoch 0"):
            train_worker([server.address], Tiny, lambda rank, workers, epoch: iter(()),
                         F.mse_loss, overlap=overlap)
        # The worker left on the way out: its rank is free again.
        with pstrain.Client([server.address], rank=0) as again:
            assert again.rank == 0
        server.stop()


def test_module_workers_behind_a_link_pull_replayed_updates_and_train(data_dir):
    """Two torch workers over TCP (no lane, as on another host) in a run that pushes top-k
    and replays pulls (`--push-codec topk:10 --pull-codec replay`, what `auto` picks in sync
    on a slow link): each pull after the first brings the other worker's sparse push, not
    the model, and the run still trains (>= 97% on the 10k test set after 300 steps)."""
    import urllib.request

    example = load_example(data_dir)
    steps = 300
    server = pstrain.Server.from_module(example.build_model(), workers=2, mode="sync",
                                        optimizer="adam", lr=0.001, lr_schedule="constant",
                                        iterations=steps, batch_size=64, keep_running=True,
                                        push_codec="topk:10", pull_codec="replay",
                                        metrics_addr="127.0.0.1:0")
    reports = train_two(server, example, lanes=False)
    metrics = urllib.request.urlopen(f"http://127.0.0.1:{server.metrics_port}/metrics",
                                     timeout=10).read().decode()
    observer = pstrain.Client([server.address], role="observer", lanes=False)
    model = example.build_model()
    ModuleWorker(observer, model).pull(wait=False)
    server.stop()
    stats = server.wait(10)
    assert stats["version"] == steps, stats
    whole = 4 * observer.size
    accuracy = example.evaluate(model)
    pulled = {int(rank): float(v) for rank, v in re.findall(
        r'^pstrain_worker_pull_bytes_total\{shard="0",rank="(\d+)"\} (\S+)$', metrics, re.M)}
    print(f"\ntorch workers, topk:10 / replay over TCP: {accuracy:.2%}, pulled {pulled} bytes "
          f"({whole} a whole fp32 pull), {reports}")
    assert sorted(pulled) == [0, 1]
    for rank, total in pulled.items():
        # The first pull is the whole model; the other 300 bring about 1% of it each.
        assert total < whole + 0.05 * steps * whole, (rank, total)
    assert accuracy >= 0.97


def test_module_workers_overlap_their_link_with_compute_in_async_runs(data_dir):
    """`train_worker(overlap=True)`: each gradient is pushed (and the next weights pulled)
    on a helper thread while the next one is computed, its push naming the version it was
    computed on; two such workers train async to >= 97% in 600 updates (of 64 samples each:
    the samples of 300 sync steps of two). A sync run refuses overlap by name."""
    from pstrain.torch import train_worker

    example = load_example(data_dir)
    steps = 600
    server = pstrain.Server.from_module(example.build_model(), workers=2, mode="async",
                                        optimizer="adam", lr=0.001, lr_schedule="constant",
                                        iterations=steps, batch_size=64, keep_running=True)
    reports = train_two(server, example, overlap=True)
    observer = pstrain.Client([server.address], role="observer")
    model = example.build_model()
    ModuleWorker(observer, model).pull(wait=False)
    stats = observer.stats()[0]
    server.stop()
    server.wait(10)
    accuracy = example.evaluate(model)
    print(f"\ntorch workers, async, overlapped: {accuracy:.2%}, {reports}")
    assert stats["version"] >= steps, stats
    assert all(r["steps"] > 0 for r in reports), reports
    assert accuracy >= 0.97
    sync = pstrain.Server.from_module(example.build_model(), workers=1, mode="sync")
    with pytest.raises(ValueError, match="overlap=True needs an async or buffered run"):
        train_worker([sync.address], example.build_model, example.batches, example.loss,
                     overlap=True)
    sync.stop()


class BNNet(nn.Module):
    """A small convnet with batch norm: running statistics are buffers, each worker's own."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.c1, self.b1 = nn.Conv2d(1, 16, 3), nn.BatchNorm2d(16)
        self.c2, self.b2 = nn.Conv2d(16, 32, 3), nn.BatchNorm2d(32)
        self.fc = nn.Linear(32 * 5 * 5, 10)

    def forward(self, x):
        x = F.max_pool2d(F.relu(self.b1(self.c1(x))), 2)
        x = F.max_pool2d(F.relu(self.b2(self.c2(x))), 2)
        return F.log_softmax(self.fc(torch.flatten(x, 1)), 1)


def test_batch_norm_statistics_are_recomputed_under_the_servers_weights(data_dir):
    """A module holding the servers' weights has its batch-norm statistics as built (they
    stay each worker's own); `recompute_buffers` recomputes them as torch's `update_bn` does,
    and the Ray job's evaluation does so first: on real MNIST after 300 sync updates of two
    torch workers it scored 96.8% where the statistics as built scored 93.5%."""
    from torch.optim.swa_utils import update_bn

    from pstrain.ray_torch import _evaluate_now
    from pstrain.torch import recompute_buffers

    example = load_example(data_dir)
    example.build_model = BNNet
    server = pstrain.Server.from_module(BNNet(), workers=2, mode="sync", optimizer="adam",
                                        lr=1e-3, iterations=300, batch_size=64,
                                        train_samples=60000, keep_running=True)
    assert list(parameters_of(BNNet())) == ["c1.weight", "c1.bias", "b1.weight", "b1.bias",
                                            "c2.weight", "c2.bias", "b2.weight", "b2.bias",
                                            "fc.weight", "fc.bias"]
    train_two(server, example)

    def first_batches():
        return example.batches(0, 2, 0)

    as_built = _evaluate_now([server.address], None, BNNet, example.evaluate)
    recomputed = _evaluate_now([server.address], None, BNNet, example.evaluate, first_batches)
    ours, theirs = BNNet(), BNNet()
    with pstrain.Client([server.address], role="observer") as observer:
        ModuleWorker(observer, ours).pull(wait=False)
    server.stop()
    server.wait(10)
    theirs.load_state_dict(ours.state_dict())
    ours.eval()
    assert recompute_buffers(ours, first_batches(), 50) == 50
    assert not ours.training, "left in the mode it was in"
    update_bn(itertools.islice((x for x, _ in first_batches()), 50), theirs)
    for (name, a), (_, b) in zip(ours.state_dict().items(), theirs.state_dict().items()):
        assert torch.allclose(a.float(), b.float(), rtol=1e-5, atol=1e-6), name
    assert recomputed >= 0.95, (as_built, recomputed)
    assert recomputed > as_built + 0.01, (as_built, recomputed)
    assert recompute_buffers(Tiny(), first_batches()) == 0, "nothing to recompute"
