#!/usr/bin/env python3
"""The fleet accuracy table: many light workers training on one shard, per mode, with and
without churn: the time to a target accuracy and the accuracy reached.

Each run is `pstrain train --transport tcp --workers W` (more than 32 workers run as light
workers, one process per core) with the mode's flags, `--eval-every E` (the launcher
evaluates the 10k test set while the workers go on) and, for a churned run, `--churn F
--churn-away S`. From the run's metrics file: the time of the first evaluation at the target
that every later one held, and the accuracy at the end; from its summary: wall time, updates,
how many workers left and came back, each worker process's peak memory.

    python3 scripts/fleet_accuracy.py --data-dir ../shared/data/mnist --workers 256 \\
        --model cnn --modes sync,ssp,buffered,async --churn 0.2,0 \\
        --out docs/fleet-accuracy.json --md docs/fleet-accuracy.table.md

A mode is a name from MODES (its flags below); `--extra` adds flags to every run. Not part of
CI: it is a measurement.
"""

import argparse
import json
import subprocess
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

# Each mode's flags for a fleet: a worker's batch is small, gradients are averaged, and the
# bounds fit hundreds of workers (a worker's gradient is about as many gradients old as there
# are workers computing ahead of it).
MODES = {
    "sync": ["--mode", "sync", "--lr", "0.002"],
    "ssp": ["--mode", "ssp", "--max-lead", "2", "--lr", "0.002"],
    # A buffer of a quarter of the fleet: a gradient is about 4 updates old.
    "buffered": ["--mode", "buffered", "--buffer", "64", "--max-staleness", "0",
                 "--lr", "0.002"],
    # Every gradient its own update, about as many updates old as there are workers: each
    # is scaled by 1 / staleness.
    "async": ["--mode", "async", "--max-staleness", "0", "--staleness-aware-lr",
              "--lr", "0.002"],
}


def held_time(evals, target):
    """Seconds to the first evaluation at `target` that every later one held, or None."""
    for i, e in enumerate(evals):
        if all(later["test_accuracy"] >= target for later in evals[i:]):
            return e["time_s"]
    return None


def mode_flags(mode, lr):
    """The mode's flags from MODES, its learning rate replaced by `lr` if given."""
    flags = list(MODES[mode])
    if lr is not None:
        flags[flags.index("--lr") + 1] = lr
    return flags


def run_one(exe, data, workers, model, batch, mode, lr, updates, every, churn, away, extra,
            timeout):
    with tempfile.TemporaryDirectory() as tmp:
        metrics = Path(tmp) / "metrics.jsonl"
        cmd = [exe, "train", "--transport", "tcp", "--data-dir", data,
               "--workers", str(workers), "--model", model, "--batch-size", str(batch),
               "--iterations", str(updates), "--eval-every", str(every),
               "--metrics", str(metrics), *mode_flags(mode, lr), *extra]
        if churn > 0:
            cmd += ["--churn", str(churn), "--churn-away", str(away)]
        started = time.time()
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
        took = time.time() - started
        if proc.returncode != 0:
            return {"workers": workers, "model": model, "mode": mode, "churn": churn,
                    "failed": proc.stderr.strip().splitlines()[-3:], "seconds": took}
        records = [json.loads(line) for line in metrics.read_text().splitlines()]
    evals = [r for r in records if r.get("event") == "eval"]
    summary = next(r for r in records if r.get("event") == "summary")
    row = {"workers": workers, "model": model, "batch": batch, "mode": mode,
           "flags": mode_flags(mode, lr) + extra, "updates": summary["updates"], "churn": churn,
           "churn_away_s": away if churn > 0 else None,
           "wall_s": round(summary["wall_time_s"], 1),
           "final_accuracy": round(100 * summary["test_accuracy"], 2),
           "churn_counts": summary.get("churn"),
           "processes": summary.get("processes", []),
           "evals": [(round(e["time_s"], 1), e["updates"], e["test_accuracy"]) for e in evals]}
    for target in (0.97, 0.98):
        t = held_time(evals, target)
        row[f"time_to_{round(target * 100)}_s"] = None if t is None else round(t, 1)
    return row


def markdown(runs):
    lines = ["| workers | model | mode | churn (per min, away s) | updates | wall (s) | "
             "time to 97% / 98% (s) | accuracy at the end | left / came back | "
             "peak MB per worker |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in runs:
        churn = "none" if r["churn"] == 0 else f"{r['churn']:.0%}, {r.get('churn_away_s')}"
        if "failed" in r:
            lines.append(f"| {r['workers']} | {r['model']} | {r['mode']} | {churn} | failed: "
                         f"{' '.join(r['failed'])} |")
            continue
        times = " / ".join("-" if r[k] is None else f"{r[k]:.1f}"
                           for k in ("time_to_97_s", "time_to_98_s"))
        counts = r.get("churn_counts") or {}
        moved = f"{counts.get('left', 0)} / {counts.get('came_back', 0)}" if counts else "-"
        workers_mb = sum(p["peak_rss_mb"] for p in r["processes"]
                         if p["process"].startswith("worker"))
        lines.append(
            f"| {r['workers']} | {r['model']} | {r['mode']} | {churn} | {r['updates']} | "
            f"{r['wall_s']:.1f} | {times} | {r['final_accuracy']:.2f}% | {moved} | "
            f"{workers_mb / r['workers']:.2f} |")
    return "\n".join(lines) + "\n"


def main():
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--pstrain", default=str(REPO / "target" / "release" / "pstrain"))
    p.add_argument("--data-dir", default="data/mnist")
    p.add_argument("--workers", default="64,256")
    p.add_argument("--model", default="cnn")
    p.add_argument("--batch", type=int, default=8, help="each worker's batch")
    p.add_argument("--modes", default="sync,ssp,buffered,async")
    p.add_argument("--churn", default="0,0.2", help="fractions leaving per minute")
    p.add_argument("--churn-away", type=float, default=5.0)
    p.add_argument("--updates", default="sync=130,ssp=160,buffered=520,async=33000",
                   help="update budget per mode")
    p.add_argument("--every", default="sync=5,ssp=5,buffered=20,async=1280",
                   help="updates between evaluations per mode")
    p.add_argument("--lr", default="", help="learning rates replacing MODES', e.g. async=0.008")
    p.add_argument("--max-lead", type=int, default=2, help="SSP's bound on a worker's lead")
    p.add_argument("--extra", default="", help="flags added to every run, space-separated")
    p.add_argument("--timeout", type=float, default=1800)
    p.add_argument("--out", default=str(REPO / "docs" / "fleet-accuracy.json"))
    p.add_argument("--md", default=str(REPO / "docs" / "fleet-accuracy.table.md"))
    a = p.parse_args()
    MODES["ssp"][MODES["ssp"].index("--max-lead") + 1] = str(a.max_lead)
    data = str(Path(a.data_dir).resolve())
    budget = dict(kv.split("=") for kv in a.updates.split(","))
    every = dict(kv.split("=") for kv in a.every.split(","))
    rates = dict(kv.split("=") for kv in a.lr.split(",") if kv)
    runs = []
    for workers in map(int, a.workers.split(",")):
        for mode in a.modes.split(","):
            for churn in map(float, a.churn.split(",")):
                r = run_one(a.pstrain, data, workers, a.model, a.batch, mode,
                            rates.get(mode), int(budget[mode]), int(every[mode]), churn, a.churn_away,
                            a.extra.split(), a.timeout)
                print(json.dumps({k: v for k, v in r.items() if k != "evals"}), flush=True)
                runs.append(r)
                Path(a.out).write_text(json.dumps(
                    {"date": time.strftime("%Y-%m-%d"), "runs": runs}, indent=1) + "\n")
                Path(a.md).write_text(markdown(runs))
    print(markdown(runs))


if __name__ == "__main__":
    main()
