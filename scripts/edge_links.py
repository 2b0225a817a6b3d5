#!/usr/bin/env python3
"""The edge-links table: the cnn trained by two workers over real rate-limited links, for each
codec pair, against the same run on loopback.

Each run: `pstrain server` in one network namespace, two `pstrain worker`s in namespaces of
their own, each behind its own link (`scripts/edge_net.sh`: veth + tbf both ways), or all on
127.0.0.1 for `loopback` (TCP: the workers run with `--no-lanes`); `--iterations U` async updates; the shard checkpoints every E
updates, and after the run every checkpoint is scored on the 10k test set (`pstrain eval`),
so evaluation costs the run no time. Reported per run: wall time from the workers' start to
the shard's last update, updates/s, the accuracy at the end, bytes per update each way and each
worker's share of the wall time on its link (as the shard counted them: its closing report), the
codecs each worker used last (`auto` picks its own), and the times to 98%, 98.5% and 99% where a
checkpoint reached it and every later one held it. A codec pair is PUSH/PULL or `auto`, with
`@overlap` added for workers that push and pull while computing (`pstrain worker --overlap`,
which looks one round ahead), or `@lookahead=K` for overlapped workers computing K rounds
ahead (`--overlap --lookahead K`; K = 0 computes on the pulled weights), `:until=F` after
either for overlapped workers that turn to exact rounds after a share F of the updates
(`--overlap-until F`), e.g. `auto@lookahead=1:until=0.7`; a link is a rate for every worker
(`100mbit`) or one per worker (`100mbit+10mbit`).

`--repeat N` runs the whole sweep N times, round after round (so a drift of the machine
touches every row alike), and adds a summary: per row, the median of its time to 98.5% over
loopback fp32's in the same round, the update from which it held 98.5% (accuracy per update,
apart from updates a second), and its accuracy at the end against that round's fp32.
Async runs differ by the order in which the workers' gradients arrive; one round is one draw.

    sudo python3 scripts/edge_links.py --data-dir ../shared/data/mnist \\
        --links loopback,100mbit,20mbit --codecs fp32/fp32,bf16/bf16,int8/bf16,topk:10/bf16 \\
        --updates 300 --out docs/edge-links.json --md docs/edge-links.md

Needs root (network namespaces). Not part of CI: it is a measurement.
"""

import argparse
import json
import os
import re
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
NET = REPO / "scripts" / "edge_net.sh"
TARGETS = (98.0, 98.5, 99.0)


WORKER_LINE = re.compile(r"\[shard 0\] worker (\d+): (\d+) gradients applied, (\d+) bytes up in "
                         r"([0-9.]+) s, (\d+) bytes down in ([0-9.]+) s, codecs (.+)$")


def worker_links(stderr: str) -> list:
    """Each worker's link as shard 0 reported it when the run ended."""
    out = []
    for line in stderr.splitlines():
        m = WORKER_LINE.search(line)
        if m:
            out.append({"rank": int(m.group(1)), "applied": int(m.group(2)),
                        "up_bytes": int(m.group(3)), "up_s": float(m.group(4)),
                        "down_bytes": int(m.group(5)), "down_s": float(m.group(6)),
                        "codecs": m.group(7).strip()})
    return out


def evaluate(exe: str, data: str, ckpt_file: Path) -> float:
    with tempfile.TemporaryDirectory() as tmp:
        shard = Path(tmp) / "shard-0-of-1"
        shard.mkdir()
        shutil.copy(ckpt_file, shard / ckpt_file.name)
        out = subprocess.run([exe, "eval", "--checkpoint", tmp, "--data-dir", data],
                             capture_output=True, text=True, check=True,
                             env={k: v for k, v in os.environ.items() if k != "PSTRAIN_TOKEN"})
    m = re.search(r"test accuracy ([0-9.]+)%", out.stdout)
    if not m:
        raise RuntimeError(f"no accuracy in {out.stdout!r} {out.stderr!r}")
    return float(m.group(1))


def run_one(exe, data, link, push, pull, mode, updates, every, workers=2, overlap=False,
            lookahead=None, until=None):
    prefix = f"el{os.getpid() % 1000}"
    work = Path(tempfile.mkdtemp())
    token = work / "run.token"
    subprocess.run([exe, "token", "-o", str(token)], check=True)
    ckpt = work / "ckpt"
    server_cmd = [exe, "server", "--listen", "0.0.0.0:7400" if link != "loopback" else
                  "127.0.0.1:7400", "--workers", str(workers), "--model", "cnn", "--mode", mode,
                  "--iterations", str(updates), "--push-codec", push, "--pull-codec", pull,
                  "--checkpoint-dir", str(ckpt), "--checkpoint-every", str(every),
                  "--checkpoint-secs", "0", "--keep-checkpoints", "100000",
                  "--token-file", str(token)]
    if link != "loopback":
        rates = link.split("+") if "+" in link else [link] * workers
        subprocess.run(["bash", str(NET), "down", prefix], check=False)
        subprocess.run(["bash", str(NET), "up", prefix, *rates], check=True,
                       stdout=subprocess.DEVNULL)
        server_cmd = ["ip", "netns", "exec", f"{prefix}-ps"] + server_cmd
    procs = []
    try:
        server_log = open(work / "server.log", "w")
        server = subprocess.Popen(server_cmd, stdout=subprocess.PIPE, stderr=server_log,
                                  text=True)
        procs.append(server)
        line = server.stdout.readline()
        if "listening on" not in line:
            raise RuntimeError(f"the shard said {line!r}")
        started = time.time()
        for rank in range(workers):
            address = "127.0.0.1:7400" if link == "loopback" else f"10.77.{rank}.1:7400"
            # `loopback` is a TCP link, as in every sitting since the first; on one host pstrain
            # would otherwise move the tensors through shared memory (lanes).
            cmd = [exe, "worker", "--servers", address, "--rank", str(rank), "--threads", "1",
                   "--data-dir", data, "--token-file", str(token), "--no-lanes"]
            if overlap:
                cmd += ["--overlap", "--lookahead", str(lookahead)]
            if overlap and until is not None:
                cmd += ["--overlap-until", str(until)]
            if link != "loopback":
                cmd = ["ip", "netns", "exec", f"{prefix}-w{rank}"] + cmd
            procs.append(subprocess.Popen(cmd, stdout=subprocess.DEVNULL,
                                          stderr=subprocess.DEVNULL))
        for p in procs[1:]:
            if p.wait() != 0:
                raise RuntimeError(f"a worker failed ({link}, {push}/{pull})")
        server.wait(timeout=60)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
        if link != "loopback":
            subprocess.run(["bash", str(NET), "down", prefix], check=False)
    server_log.close()
    links = worker_links((work / "server.log").read_text())
    files = sorted((ckpt / "shard-0-of-1").glob("ckpt-*.safetensors"))
    points = []
    for f in files:
        version = int(f.name.split("-")[1].split(".")[0])
        points.append({"updates": version, "t": round(f.stat().st_mtime - started, 2),
                       "accuracy": evaluate(exe, data, f)})
    shutil.rmtree(work, ignore_errors=True)
    wall = max(p["t"] for p in points)
    for w in links:
        w["link_share"] = round((w["up_s"] + w["down_s"]) / wall, 3)
    reached = {target: held_from(points, target, "t") for target in TARGETS}
    return {
        "link": link, "push": push, "pull": pull, "overlap": overlap, "lookahead": lookahead,
        "overlap_until": until,
        "mode": mode,
        "updates": updates,
        "wall_s": wall, "updates_per_s": round(updates / wall, 2),
        "final_accuracy": points[-1]["accuracy"], "time_to_98_s": reached[98.0],
        "time_to_98_5_s": reached[98.5], "time_to_99_s": reached[99.0],
        "push_bytes_per_update": round(sum(w["up_bytes"] for w in links) / updates),
        "pull_bytes_per_update": round(sum(w["down_bytes"] for w in links) / updates),
        "workers": links, "points": points,
    }


def held_from(points, target, key):
    """`key` (`t` or `updates`) of the first checkpoint at `target` or more after which every
    later one is too, or None."""
    return next((p[key] for i, p in enumerate(points)
                 if all(q["accuracy"] >= target for q in points[i:])), None)


def markdown(runs):
    lines = ["| link | push / pull codec | mode | updates | wall (s) | updates/s | vs loopback "
             "fp32 | accuracy at the end | time to 98% / 98.5% / 99% (s) | push / pull MB per update | "
             "each worker's share of time on its link | codecs at the end |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    base = baselines(runs)
    for r in runs:
        b = base.get(baseline_key(r))
        slower = f"{r['wall_s'] / b['wall_s']:.2f}x" if b else ""
        shares = ", ".join(f"{w['link_share']:.0%}" for w in r.get("workers", []))
        codecs = "; ".join(w["codecs"] for w in r.get("workers", []))
        times = " / ".join("-" if r.get(k) is None else f"{r[k]:.1f}"
                           for k in ("time_to_98_s", "time_to_98_5_s", "time_to_99_s"))
        lines.append(
            f"| {r['link']} | {r['push']} / {r['pull']}"
            f"{how(r.get('overlap'), r.get('lookahead'), r.get('overlap_until'))}"
            f" | {r['mode']} | {r['updates']} | "
            f"{r['wall_s']:.1f} | {r['updates_per_s']} | {slower} | {r['final_accuracy']:.2f}% | "
            f"{times} | "
            f"{r['push_bytes_per_update'] / 1e6:.3f} / {r['pull_bytes_per_update'] / 1e6:.3f} | "
            f"{shares} | {codecs} |")
    return "\n".join(lines) + "\n"


def how(overlap, lookahead, until=None):
    """A row's label after its codecs: overlapped, how many rounds it looks ahead (runs from
    before `--lookahead` have none: they computed on the pulled weights), and the share of the
    updates it overlaps if it turns exact before the end (`--overlap-until`)."""
    if not overlap:
        return ""
    label = ", overlapped" if lookahead is None else f", overlapped, lookahead {lookahead:g}"
    return label if until is None else f"{label}, exact after {until:.0%}"


def median(values):
    values = sorted(v for v in values if v is not None)
    if not values:
        return None
    mid = len(values) // 2
    return values[mid] if len(values) % 2 else (values[mid - 1] + values[mid]) / 2


def baseline_key(r):
    """A run's loopback fp32 counterpart: same mode, updates and round."""
    return r["mode"], r["updates"], r.get("round", 0)


def baselines(runs):
    """The loopback fp32 runs (no overlap), by `baseline_key`."""
    return {baseline_key(r): r for r in runs
            if r["link"] == "loopback" and r["push"] == "fp32" and r["pull"] == "fp32"
            and not r.get("overlap")}


def summary(runs):
    """Per row over the rounds: time to 98.5% against loopback fp32's of the same round (and
    the median of those ratios), accuracy at the end against that fp32's (and the mean)."""
    rows = {}
    for r in runs:
        rows.setdefault((r["mode"], r["link"], r["push"], r["pull"], bool(r.get("overlap")),
                         r.get("lookahead"), r.get("overlap_until")), []).append(r)
    base = baselines(runs)
    lines = ["| link | push / pull codec | mode | rounds | time to 98.5% over loopback fp32's, "
             "each round | median | 98.5% held from update, each round | accuracy at the end, "
             "each round | end minus fp32's, mean |",
             "|---|---|---|---|---|---|---|---|---|"]
    for (mode, link, push, pull, overlap, lookahead, until), group in rows.items():
        ratios, diffs = [], []
        for r in group:
            b = base.get(baseline_key(r))
            if b and b["time_to_98_5_s"] and r["time_to_98_5_s"]:
                ratios.append(r["time_to_98_5_s"] / b["time_to_98_5_s"])
            else:
                ratios.append(None)
            diffs.append(r["final_accuracy"] - b["final_accuracy"] if b else None)
        shown = ", ".join("-" if x is None else f"{x:.2f}x" for x in ratios)
        ends = ", ".join(f"{r['final_accuracy']:.2f}%" for r in group)
        helds = ", ".join("-" if u is None else f"{u:,}"
                          for u in (held_from(r["points"], 98.5, "updates") for r in group))
        mid = median(ratios)
        known = [d for d in diffs if d is not None]
        mean_diff = sum(known) / len(known) if known else None
        lines.append(
            f"| {link} | {push} / {pull}{how(overlap, lookahead, until)} | {mode} | "
            f"{len(group)} | {shown} | {'-' if mid is None else f'{mid:.2f}x'} | "
            f"{helds} | {ends} | "
            f"{'-' if mean_diff is None else f'{mean_diff:+.2f}'} |")
    return "\n".join(lines) + "\n"


def main():
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--pstrain", default=str(REPO / "target" / "release" / "pstrain"))
    p.add_argument("--data-dir", default="data/mnist")
    p.add_argument("--links", default="loopback,100mbit,20mbit")
    p.add_argument("--codecs", default="fp32/fp32,bf16/bf16,int8/bf16,topk:10/bf16")
    p.add_argument("--modes", default="async")
    p.add_argument("--updates", type=int, default=300)
    p.add_argument("--every", type=int, default=50, help="updates between checkpoints")
    p.add_argument("--skip", default="", help="link:push/pull pairs to leave out, comma-separated")
    p.add_argument("--repeat", type=int, default=1, help="rounds of the whole sweep")
    p.add_argument("--out", default=str(REPO / "docs" / "edge-links.json"))
    p.add_argument("--md", default=str(REPO / "docs" / "edge-links.table.md"),
                   help="the table alone (docs/edge-links.md quotes it)")
    a = p.parse_args()
    data = str(Path(a.data_dir).resolve())
    skip = set(filter(None, a.skip.split(",")))
    runs = []
    for round_ in range(a.repeat):
        runs += sweep(a, data, skip, round_)
    Path(a.out).write_text(json.dumps({"date": time.strftime("%Y-%m-%d"), "runs": runs},
                                      indent=1) + "\n")
    table = markdown(runs) + ("\n" + summary(runs) if a.repeat > 1 else "")
    Path(a.md).write_text(table)
    print(table)


def worker_flags(pair):
    """`PUSH/PULL`, or `PUSH/PULL@` and `:`-separated overlapped workers' settings: `overlap`
    (looking pstrain's default one round ahead), `lookahead=K` (K rounds ahead; 0: on the
    pulled weights), `until=F` (exact rounds after a share F of the updates): the codecs,
    whether the workers overlap, the rounds they look ahead, and the share they overlap."""
    codecs, _, worker = pair.partition("@")
    if not worker:
        return codecs, False, None, None
    lookahead, until = 1.0, None
    for item in worker.split(":"):
        key, _, value = item.partition("=")
        try:
            if key == "lookahead" and value:
                lookahead = float(value)
            elif key == "until" and value:
                until = float(value)
            elif item != "overlap":
                raise ValueError(item)
        except ValueError:
            raise SystemExit(f"`{pair}`: after @ come overlap, lookahead=K or until=F, "
                             "separated by `:`")
    return codecs, True, lookahead, until


def sweep(a, data, skip, round_):
    runs = []
    for mode in a.modes.split(","):
        for link in a.links.split(","):
            for pair in a.codecs.split(","):
                if f"{link}:{pair}" in skip:
                    continue
                codecs, overlap, lookahead, until = worker_flags(pair)
                push, pull = codecs.split("/") if "/" in codecs else (codecs, codecs)
                r = run_one(a.pstrain, data, link, push, pull, mode, a.updates, a.every,
                            overlap=overlap, lookahead=lookahead, until=until)
                r["round"] = round_
                print(f"round {round_} {link} {pair} {mode}: {r['wall_s']:.1f} s, "
                      f"{r['updates_per_s']} updates/s, {r['final_accuracy']:.2f}%", flush=True)
                runs.append(r)
    return runs


if __name__ == "__main__":
    main()
