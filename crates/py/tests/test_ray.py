"""A real two-node Ray cluster on this machine (a head and a second `ray start --address`
node), with `python -m pstrain.ray` submitted by `ray job submit`: the job succeeds, the convnet
reaches the in-process test's threshold, and `--placement spread` puts actors on both nodes."""

import json
import os
import pathlib
import signal
import subprocess
import sys
import threading
import time
import uuid

import pytest

import pstrain

from conftest import REPO, events, run

# The same run as the in-process and TCP convnet tests (tests/common: convnet_as_original).
CONVNET = [
    "--model", "convnet", "--optimizer", "sgd", "--lr", "0.01", "--lr-schedule", "constant",
    "--batch-size", "128", "--iterations", "400", "--mode", "async", "--workers", "2",
]
CONVNET_THRESHOLD = 0.85


def submit(cluster, args, timeout=600):
    job = f"pstrain-test-{uuid.uuid4().hex[:8]}"
    cmd = [cluster["ray"], "job", "submit", "--address", cluster["url"], "--submission-id", job,
           "--working-dir", str(cluster["workdir"]), "--", sys.executable, "-m", "pstrain.ray",
           *args]
    p, elapsed = run(cmd, timeout=timeout, check=False, env=cluster["env"])
    status, _ = run([cluster["ray"], "job", "status", "--address", cluster["url"], job],
                    check=False, env=cluster["env"])
    return p, elapsed, status.stdout + status.stderr


def test_ray_job_trains_convnet_spread_over_two_nodes(cluster, data_dir):
    # Worker 1 is made 3x slower (--slowdown reaches the worker actors through the driver).
    p, elapsed, status = submit(cluster, ["--placement", "spread", "--shards", "2", *CONVNET,
                                          "--slowdown", "1=3", "--metrics-addr", "0.0.0.0:0",
                                          "--data-dir", str(data_dir)])
    out = p.stdout + p.stderr
    assert p.returncode == 0, out
    assert "succeeded" in status.lower(), status
    [placement] = events(out, "placement")
    [summary] = events(out, "ray_summary")
    nodes = {a["node"] for a in placement["shards"] + placement["workers"]}
    print(f"\nplacement: {json.dumps(placement)}\nsummary: {json.dumps(summary)}")
    print(f"ray job submit wall time: {elapsed:.1f} s (driver: {summary['wall_time_s']:.1f} s, "
          f"of which actors up in {summary['startup_s']:.1f} s, training "
          f"{summary['training_s']:.1f} s)")
    assert len(nodes) == 2, placement
    assert summary["nodes"] == 2
    assert summary["test_accuracy"] >= CONVNET_THRESHOLD, summary
    # Two shards, each found through its actor; the run stops at --iterations.
    assert len(placement["shards"]) == 2
    assert len({s["address"] for s in placement["shards"]}) == 2
    # Each shard served /metrics and its live page; the job log names where.
    assert all(s.get("metrics_url", "").startswith("http://") for s in placement["shards"]), placement
    assert max(s["version"] for s in summary["shards"]) == 400
    fast, slow = summary["per_worker"]
    per_gradient = [w["compute_s"] / max(1, w["gradients_applied"] + w["not_applied"])
                    for w in (fast, slow)]
    assert per_gradient[1] > 2 * per_gradient[0], summary["per_worker"]

    # The same work without Ray, for the record (not asserted: a timing).
    exe = pathlib.Path(os.environ.get("PSTRAIN_BIN", REPO / "target" / "release" / "pstrain"))
    if exe.exists():
        plain, plain_s = run([str(exe), "train", "--transport", "tcp", "--shards", "2",
                              *CONVNET, "--data-dir", str(data_dir)])
        print(f"pstrain train --transport tcp, same flags: {plain_s:.1f} s\n{plain.stdout[-400:]}")


def test_strict_spread_that_cannot_fit_fails_with_a_clear_error(cluster, data_dir):
    # Three actors on two nodes cannot each have a node of their own.
    p, _, status = submit(cluster, ["--placement", "strict-spread", "--placement-timeout", "5",
                                    *CONVNET, "--data-dir", str(data_dir)])
    out = p.stdout + p.stderr
    assert "failed" in status.lower(), status
    assert "did not grant 3 bundles" in out, out


def test_bad_training_flags_fail_before_ray_starts(cluster, data_dir):
    p, _, status = submit(cluster, ["--mode", "sideways", "--data-dir", str(data_dir)])
    out = p.stdout + p.stderr
    assert "failed" in status.lower(), status
    assert "invalid value 'sideways'" in out, out


# Long enough (20,000 async updates, about 15 s) that a kill lands mid-run even when the job
# log (where the actors' pids come from) arrives seconds late.
LONG_CONVNET = [a if a != "400" else "20000" for a in CONVNET]


def submit_and_kill(cluster, args, victim_of):
    """Submits a job and SIGKILLs the actor process `victim_of(placement)` once the shards
    are past update 1,000; returns the job's output, the victim's pid, the update it was
    killed at and the job's summary."""
    job = f"pstrain-test-{uuid.uuid4().hex[:8]}"
    # The operator's token for this run (the driver makes one when given none): the watcher
    # below needs it, and a peer without it is refused.
    token = pstrain.new_token()
    token_file = cluster["workdir"] / f"{job}.token"
    token_file.write_text(token)
    cmd = [cluster["ray"], "job", "submit", "--address", cluster["url"], "--submission-id", job,
           "--working-dir", str(cluster["workdir"]), "--", sys.executable, "-m", "pstrain.ray",
           "--placement", "spread", "--token-file", str(token_file), *args]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=cluster["env"])
    watchdog = threading.Timer(300, proc.kill)
    watchdog.start()
    lines, victim, killed_at = [], None, None
    try:
        for line in proc.stdout:
            lines.append(line)
            if victim is None and '"event": "placement"' in line:
                placement = json.loads(line[line.index("{"):])
                address = placement["shards"][0]["address"]
                # A stranger without the run's token gets nothing from the job's shard.
                with pytest.raises(pstrain.PstrainError, match="requires the run's token"):
                    pstrain.Client([address], role="observer", connect_timeout=2)
                # Watch the shard directly (the job log arrives late).
                watcher = pstrain.Client([address], role="observer", token=token)
                while (killed_at := watcher.stats()[0]["version"]) < 1000:
                    time.sleep(0.02)
                victim = victim_of(placement)
                os.kill(victim, signal.SIGKILL)
                watcher.leave()
        proc.wait()
    finally:
        watchdog.cancel()
    out = "".join(lines)
    assert proc.returncode == 0, out
    assert victim is not None, out
    [summary] = events(out, "ray_summary")
    print(f"\nkilled pid {victim} at update {killed_at}; summary: {json.dumps(summary)}")
    assert killed_at < 20000, "the run was over before the kill"
    assert summary["test_accuracy"] >= CONVNET_THRESHOLD, summary
    return out, victim, killed_at, summary


def test_a_killed_worker_actor_is_restarted_by_ray_and_rejoins(cluster, data_dir):
    _, victim, _, summary = submit_and_kill(
        cluster, [*LONG_CONVNET, "--data-dir", str(data_dir)],
        lambda placement: placement["workers"][1]["pid"])
    shard = summary["shards"][0]
    assert shard["vanished_workers"] >= 1, "the kill did not land mid-run"
    assert summary["worker_pids"][1] != victim, "worker 1 was not restarted"
    assert shard["version"] == 20000
    # The retried task of the restarted actor reported as rank 1.
    assert summary["workers"][1]["rank"] == 1, summary["workers"]


def test_a_killed_shard_actor_is_restarted_on_its_port_from_its_checkpoint(
        cluster, data_dir, tmp_path):
    ckpt = tmp_path / "checkpoints"
    out, victim, killed_at, summary = submit_and_kill(
        cluster, [*LONG_CONVNET, "--data-dir", str(data_dir), "--checkpoint-dir", str(ckpt),
                  "--checkpoint-every", "200"],
        lambda placement: placement["shards"][0]["pid"])
    assert summary["shard_pids"][0] != victim, "the shard was not restarted"
    # The new shard process restored a checkpoint taken before the kill and carried the run
    # to its end.
    restored = [line for line in out.splitlines() if "restored" in line and "version" in line]
    assert restored, out
    print(restored[-1])
    assert summary["shards"][0]["version"] == 20000


def test_driver_help_lists_the_ray_and_the_train_flags():
    p, _ = run([sys.executable, "-m", "pstrain.ray", "--help"], timeout=60)
    for flag in ("--placement", "--max-restarts", "--backup-workers", "--data-dir", "--shards"):
        assert flag in p.stdout, p.stdout
