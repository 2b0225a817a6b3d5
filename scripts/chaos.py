#!/usr/bin/env python3
"""A chaos run: 2 shards and 3 workers over TCP on this machine, one random process killed
with SIGKILL every few seconds and restarted a moment later (as an operator or Ray would),
until the run finishes. Reports the faults survived, the updates each shard fault lost
(a restarted shard resumes from the newest checkpoint it had written, so at most one
interval plus the updates made while the next one was being written), the time the run took against the same run with
no faults, and the final test accuracy.

    cargo build --release
    python3 scripts/chaos.py --mode sync --data-dir ../shared/data/mnist
    python3 scripts/chaos.py --mode async --data-dir ../shared/data/mnist

Only the standard library. Exits non-zero if the run fails, a restarted shard resumed from
an older checkpoint than the newest it had written, a fault lost more than two checkpoint
intervals, or the accuracy is under --threshold.
"""

import argparse
import json
import os
import random
import re
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def version_of(metrics_port):
    """The shard's model version from its /metrics, or None if it does not answer."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=2) as r:
            text = r.read().decode()
    except OSError:
        return None
    m = re.search(r'^pstrain_model_version\{shard="\d+"\} (\S+)$', text, re.M)
    return int(float(m.group(1))) if m else None


class Run:
    def __init__(self, args, with_faults):
        self.args = args
        self.with_faults = with_faults
        self.tmp = tempfile.TemporaryDirectory()
        self.ckpt = Path(self.tmp.name) / "ckpt"
        self.logs = Path(self.tmp.name)
        self.ports = [free_port() for _ in range(2)]
        self.metrics = [free_port() for _ in range(2)]
        self.env = dict(os.environ, PSTRAIN_TOKEN=subprocess.check_output(
            [args.pstrain, "token"], text=True).strip())
        self.shards = [None, None]
        self.workers = [None] * args.workers
        self.restarts = {"shard": 0, "worker": 0}
        self.lost = []
        # Restarts that resumed from an older checkpoint than the newest on disk at the kill.
        self.went_back = []

    def plan(self):
        a = self.args
        return ["--model", "convnet", "--mode", a.mode, "--workers", str(a.workers),
                "--iterations", str(a.iterations), "--batch-size", "64", "--optimizer", "sgd",
                "--lr", "0.05", "--lr-schedule", "constant"]

    def start_shard(self, i):
        log = open(self.logs / f"shard{i}.log", "a")
        cmd = [self.args.pstrain, "server", "--listen", f"127.0.0.1:{self.ports[i]}",
               "--shard", str(i), "--shards", "2", "--checkpoint-dir", str(self.ckpt),
               "--checkpoint-every", str(self.args.checkpoint_every),
               "--metrics-addr", f"127.0.0.1:{self.metrics[i]}",
               "--heartbeat-timeout", "3"] + self.plan()
        self.shards[i] = subprocess.Popen(cmd, env=self.env, stdout=subprocess.DEVNULL,
                                          stderr=log)

    def start_worker(self, r):
        log = open(self.logs / f"worker{r}.log", "a")
        servers = ",".join(f"127.0.0.1:{p}" for p in self.ports)
        cmd = [self.args.pstrain, "worker", "--servers", servers, "--rank", str(r),
               "--data-dir", self.args.data_dir, "--connect-timeout", "60"]
        self.workers[r] = subprocess.Popen(cmd, env=self.env, stdout=subprocess.DEVNULL,
                                           stderr=log)

    def newest_on_disk(self, i):
        """The newest checkpoint shard i has finished writing (files appear by rename)."""
        names = self.ckpt.glob(f"shard-{i}-of-*/ckpt-*.safetensors")
        versions = [int(m.group(1)) for n in names if (m := re.match(r"ckpt-(\d+)\.", n.name))]
        return max(versions, default=0)

    def restore_lines(self, i):
        text = (self.logs / f"shard{i}.log").read_text(errors="replace")
        return [l for l in text.splitlines() if re.search(r"restored .* \(version \d+\)", l)]

    def restored_versions(self, i):
        return [int(re.search(r"\(version (\d+)\)", l).group(1)) for l in self.restore_lines(i)]

    def fresh_starts(self, i):
        text = (self.logs / f"shard{i}.log").read_text(errors="replace")
        return text.count("no checkpoint yet")

    def kill_one(self, rng):
        kind = rng.choice(["shard", "worker", "worker"])
        if kind == "shard":
            i = rng.randrange(2)
            before = version_of(self.metrics[i])
            if before is None or self.shards[i].poll() is not None:
                return None
            restored_before = len(self.restored_versions(i))
            fresh_before = self.fresh_starts(i)
            on_disk = self.newest_on_disk(i)
            self.shards[i].kill()
            self.shards[i].wait()
            time.sleep(self.args.restart_after)
            self.start_shard(i)
            # The restarted shard logs the version it restored (or that it found none).
            deadline = time.time() + 30
            while time.time() < deadline and self.shards[i].poll() is None:
                if (len(self.restored_versions(i)) > restored_before
                        or self.fresh_starts(i) > fresh_before):
                    break
                time.sleep(0.05)
            restored = self.restored_versions(i)
            after = restored[-1] if len(restored) > restored_before else 0
            self.lost.append(before - after)
            # In async mode a shard resumes from its own newest file; in sync and SSP from
            # the run's newest complete point, which may be older than its own.
            lines = self.restore_lines(i)
            own_file = len(lines) > restored_before and "this shard's newest file" in lines[-1]
            if own_file and after < on_disk:
                self.went_back.append(f"shard {i} restored {after} with {on_disk} on disk")
            self.restarts["shard"] += 1
            return f"shard {i} at version {before}: restored {after}, lost {before - after}"
        r = rng.randrange(self.args.workers)
        if self.workers[r].poll() is not None:
            return None
        self.workers[r].kill()
        self.workers[r].wait()
        time.sleep(self.args.restart_after)
        self.start_worker(r)
        self.restarts["worker"] += 1
        return f"worker {r}"

    def go(self):
        started = time.time()
        for i in range(2):
            self.start_shard(i)
        for r in range(self.args.workers):
            self.start_worker(r)
        rng = random.Random(self.args.seed)
        faults = []
        next_fault = time.time() + self.args.every
        while any(s.poll() is None for s in self.shards):
            if time.time() - started > self.args.timeout:
                self.stop()
                tails = "\n".join(
                    f"--- {log.name}\n" + log.read_text(errors="replace")[-1500:]
                    for log in sorted(self.logs.glob("*.log")))
                sys.exit(f"the run did not finish within {self.args.timeout} s\n{tails}")
            if self.with_faults and time.time() >= next_fault:
                what = self.kill_one(rng)
                if what:
                    faults.append((round(time.time() - started, 1), what))
                    print(f"  fault {len(faults)} at {faults[-1][0]} s: {what}", flush=True)
                next_fault = time.time() + self.args.every * rng.uniform(0.5, 1.5)
            failed = [i for i, sh in enumerate(self.shards) if sh.poll() not in (None, 0)]
            if failed:
                self.stop()
                sys.exit(f"shard {failed[0]} failed; its log: "
                         f"{(self.logs / f'shard{failed[0]}.log').read_text()[-2000:]}")
            # A worker that finished its work exits 0; one that failed is restarted.
            for r, w in enumerate(self.workers):
                if w.poll() not in (None, 0):
                    self.start_worker(r)
            time.sleep(0.1)
        wall = time.time() - started
        codes = [s.returncode for s in self.shards]
        self.stop()
        if any(codes):
            sys.exit(f"a shard failed: exit codes {codes}; logs in {self.logs}")
        out = subprocess.run([self.args.pstrain, "eval", "--checkpoint", str(self.ckpt),
                              "--data-dir", self.args.data_dir], capture_output=True, text=True)
        if out.returncode != 0:
            sys.exit(f"eval failed: {out.stderr}")
        acc = float(re.search(r"test accuracy ([\d.]+)%", out.stdout).group(1)) / 100
        versions = re.search(r"version \[([\d, ]+)\]", out.stdout).group(1)
        return {"wall_s": round(wall, 1), "faults": len(faults), "fault_log": faults,
                "shard_faults": self.restarts["shard"], "worker_faults": self.restarts["worker"],
                "updates_lost": self.lost, "went_back": self.went_back, "accuracy": acc,
                "versions": versions}

    def stop(self):
        for p in self.shards + self.workers:
            if p and p.poll() is None:
                p.kill()
                p.wait()


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--mode", choices=["sync", "async"], default="sync")
    p.add_argument("--workers", type=int, default=3)
    p.add_argument("--iterations", type=int, default=None,
                   help="update budget [default: 30000 sync, 150000 async]")
    p.add_argument("--every", type=float, default=4.0, help="mean seconds between faults")
    p.add_argument("--restart-after", type=float, default=0.5)
    p.add_argument("--checkpoint-every", type=int, default=500)
    p.add_argument("--min-faults", type=int, default=10)
    p.add_argument("--threshold", type=float, default=0.85)
    p.add_argument("--timeout", type=float, default=900)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--data-dir", default=str(ROOT.parent / "shared/data/mnist"))
    p.add_argument("--pstrain", default=str(ROOT / "target/release/pstrain"))
    p.add_argument("--no-baseline", action="store_true", help="skip the run without faults")
    args = p.parse_args()
    if args.iterations is None:
        args.iterations = 30000 if args.mode == "sync" else 150000
    print(f"chaos: {args.mode}, 2 shards, {args.workers} workers, {args.iterations} updates, "
          f"a fault every ~{args.every} s, checkpoints every {args.checkpoint_every} updates",
          flush=True)
    baseline = None if args.no_baseline else Run(args, with_faults=False).go()
    if baseline:
        print(f"without faults: {baseline['wall_s']} s, accuracy {baseline['accuracy']:.4f}")
    result = Run(args, with_faults=True).go()
    result["mode"] = args.mode
    result["baseline_wall_s"] = baseline["wall_s"] if baseline else None
    print(json.dumps(result))
    problems = []
    if result["faults"] < args.min_faults:
        problems.append(f"only {result['faults']} faults (the run was too short)")
    problems += result["went_back"]
    # A kill loses what was applied since the newest finished checkpoint: up to one interval,
    # plus the updates applied while the next snapshot was still being written.
    if any(l > 2 * args.checkpoint_every for l in result["updates_lost"]):
        problems.append(f"a shard fault lost more than {2 * args.checkpoint_every} updates")
    if result["accuracy"] < args.threshold:
        problems.append(f"accuracy {result['accuracy']} under {args.threshold}")
    if problems:
        sys.exit("; ".join(problems))
    print(f"survived {result['faults']} faults ({result['shard_faults']} shards, "
          f"{result['worker_faults']} workers); updates lost per shard fault: "
          f"{result['updates_lost']}; {result['wall_s']} s"
          + (f" against {baseline['wall_s']} s without faults" if baseline else "")
          + f"; test accuracy {result['accuracy']:.4f}")


if __name__ == "__main__":
    main()
