#!/usr/bin/env python3
"""Measures pstrain's consistency modes with a slow worker and writes docs/consistency.md.

cnn on real MNIST, 3 workers of batch 32, worker 2 made 4x slower (--slowdown 2=4), the same
sample budget for every run; each run evaluates on the 10k test set every 0.1 epoch. For
each mode: time to the target accuracy, accuracy after the budget, staleness. Reference rows:
the same runs with no slow worker, and with only the two fast workers.

    cargo build --release
    python3 scripts/consistency_table.py --data-dir ../shared/data/mnist

Only the standard library; the numbers go into docs/consistency.md between the table
markers (the prose around them is kept), and every run's raw records into
docs/consistency-runs.json.
"""

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BEGIN, END = "<!-- table:begin -->", "<!-- table:end -->"

SLOW = ["--slowdown", "2=4"]
# (label, flags, slow worker?, workers)
RUNS = [
    ("sync", ["--mode", "sync"], True, 3),
    ("sync, 1 backup worker", ["--mode", "sync", "--backup-workers", "1"], True, 3),
    ("sync, speed-balanced batches", ["--mode", "sync", "--balance-batches"], True, 3),
    ("SSP, max lead 1", ["--mode", "ssp", "--max-lead", "1"], True, 3),
    ("SSP, max lead 4", ["--mode", "ssp", "--max-lead", "4"], True, 3),
    ("async", ["--mode", "async"], True, 3),
    ("async, staleness-aware lr", ["--mode", "async", "--staleness-aware-lr"], True, 3),
    # References.
    ("sync, no slow worker", ["--mode", "sync"], False, 3),
    ("async, no slow worker", ["--mode", "async"], False, 3),
    ("sync, only the 2 fast workers", ["--mode", "sync"], False, 2),
    ("async, only the 2 fast workers", ["--mode", "async"], False, 2),
]


def lockstep(flags):
    return "async" not in flags


def run_one(exe, data_dir, label, flags, slow, workers, args):
    batch = args.batch_size
    per_update = batch * workers if lockstep(flags) else batch
    eval_every = max(1, round(args.eval_samples / per_update))
    lr = args.lr_sync if lockstep(flags) else args.lr_async
    with tempfile.TemporaryDirectory() as tmp:
        metrics = Path(tmp) / "metrics.jsonl"
        cmd = [
            str(exe), "train", "--data-dir", str(data_dir), "--model", "cnn",
            "--workers", str(workers), "--batch-size", str(batch),
            "--epochs", str(args.epochs), "--lr", str(lr), "--seed", str(args.seed),
            "--eval-every", str(eval_every), "--metrics", str(metrics),
        ] + flags + (SLOW if slow else [])
        print(f"== {label}: {' '.join(cmd[1:])}", flush=True)
        started = time.monotonic()
        proc = subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        if proc.returncode != 0:
            sys.exit(f"{label} failed:\n{proc.stderr}")
        records = [json.loads(line) for line in metrics.read_text().splitlines() if line]
    evals = [r for r in records if r["event"] == "eval"]
    summary = next(r for r in records if r["event"] == "summary")
    reached = next((e for e in evals if e["test_accuracy"] >= args.target), None)
    result = {
        "label": label,
        "command": " ".join(["pstrain"] + cmd[1:]).replace(str(data_dir), "DATA"),
        "time_to_target_s": reached["time_s"] if reached else None,
        "samples_to_target": reached["samples"] if reached else None,
        "final_accuracy": summary["test_accuracy"],
        "wall_time_s": summary["wall_time_s"],
        "samples": summary["samples"],
        "updates": summary["updates"],
        "staleness_mean": summary["staleness_mean"],
        "staleness_max": summary["staleness_max"],
        "per_worker": summary["per_worker"],
        "evals": [(e["time_s"], e["samples"], e["test_accuracy"]) for e in evals],
        "elapsed_s": time.monotonic() - started,
    }
    print(f"   {fmt_row(result, args)}", flush=True)
    return result


def fmt_time(t):
    return "not reached" if t is None else f"{t:.0f}"


def fmt_row(r, args):
    slow = r["per_worker"][2] if len(r["per_worker"]) > 2 else None
    slow_cell = "-" if slow is None or "slow" in r["label"] or "fast" in r["label"] else (
        f"{slow['staleness_mean']:.1f} / {slow['staleness_max']}")
    return (f"| {r['label']} | {fmt_time(r['time_to_target_s'])} | "
            f"{r['final_accuracy'] * 100:.2f}% | {r['wall_time_s']:.0f} | "
            f"{r['samples'] / r['wall_time_s']:.0f} | "
            f"{r['staleness_mean']:.2f} / {r['staleness_max']} | {slow_cell} |")


def table(results, args):
    head = (f"| mode | time to {args.target * 100:.1f}% (s) | accuracy after "
            f"{args.epochs} epochs | wall time (s) | samples/s applied | staleness mean / max "
            f"| slow worker's staleness mean / max |\n|---|---|---|---|---|---|---|")
    return "\n".join([head] + [fmt_row(r, args) for r in results])


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--data-dir", default=str(ROOT.parent / "shared/data/mnist"))
    p.add_argument("--pstrain", default=str(ROOT / "target/release/pstrain"))
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr-sync", type=float, default=2e-3, help="sync and SSP (3 x 32 samples per update)")
    p.add_argument("--lr-async", type=float, default=1e-3)
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--target", type=float, default=0.985)
    p.add_argument("--eval-samples", type=int, default=6000, help="evaluate every this many samples")
    p.add_argument("--only", help="run only the rows whose label contains this")
    p.add_argument("--out", default=str(ROOT / "docs/consistency.md"))
    args = p.parse_args()
    exe = Path(args.pstrain)
    if not exe.exists():
        sys.exit(f"{exe} not found: run `cargo build --release` first")
    runs = [r for r in RUNS if not args.only or args.only in r[0]]
    results = [run_one(exe, Path(args.data_dir), *r, args) for r in runs]
    machine = (f"{platform.machine()}, {os.cpu_count()} cores, "
               f"{time.strftime('%Y-%m-%d', time.gmtime())}")
    body = "\n".join([
        BEGIN,
        f"Measured by `python3 scripts/consistency_table.py` on {machine}: cnn, "
        f"{args.epochs} epochs ({args.epochs * 60000} samples), batch {args.batch_size} per "
        f"worker, Adam lr {args.lr_sync} (sync, SSP) / {args.lr_async} (async) with the cosine "
        f"schedule, seed {args.seed}, worker 2 made 4x slower (`--slowdown 2=4`) except in the "
        f"reference rows; test accuracy on the 10k test set every {args.eval_samples} samples "
        f"(the evaluation's time is part of the run's).",
        "",
        table(results, args),
        END,
    ])
    out = Path(args.out)
    text = out.read_text() if out.exists() else f"# Consistency modes with a slow worker\n\n{BEGIN}\n{END}\n"
    if BEGIN in text and END in text:
        text = text[: text.index(BEGIN)] + body + text[text.index(END) + len(END):]
    else:
        text += "\n" + body + "\n"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    out.with_name("consistency-runs.json").write_text(json.dumps(results, indent=1) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
