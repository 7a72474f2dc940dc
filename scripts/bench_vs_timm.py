#!/usr/bin/env python
"""The full-network path against timm's own train.py, whole process, in one interleaved run (issue 16).

On one few-shot split of the Tux Paint photo stamps (scripts/bench_peers.py writes them: 9 classes,
5 training + 2 validation images per class), from the same EfficientNet-Lite0 ImageNet weights
(bench_peers.export_weights: zoo's imported tensors as a safetensors file for train.py's
--pretrained-path), each round runs, in a rotating order, timm's train.py and one `zoo finetune` per
zoo checkout given (--zoo NAME=ROOT: e.g. the code before a change and after it, each run in ROOT
with PYTHONPATH=ROOT). Wall time is the whole process, start to exit (imports, scan, model build, training,
validation, checkpoints, zoo's export and report.html), measured from this script; the CPU seconds
(user + system of the process and its DataLoader workers) are given too: on a shared machine they move
far less with the load than the wall time does.

Rows (--rows):
  equal     equal work. Both tools: the same 45 training images at the model's 224 px, 3 epochs, a
            validation pass over the same 18 images after each epoch, every layer training from the
            first step. Batch 15, so that 45 = 3 x 15 and both take exactly 3 optimizer steps per epoch
            over all 45 images (at batch 16 timm drops the last partial batch, 13 images, and takes 2
            steps; zoo's rule keeps a partial batch unless it is 1 image or <= 5%, and takes 3). zoo:
            `--freeze none --head-epochs 0` (no head warm-up phase: 3 epochs of the whole network).
  defaults  the issue's command lines: `zoo finetune --freeze none --epochs 3 --batch-size 16` (its default
            head warm-up: epoch 1 trains the head on cached backbone features, a forward pass over
            train + val, then 2 epochs of the whole network at 3 steps each) against train.py
            `--epochs 3 --batch-size 16` (3 epochs of 2 steps). Not equal work: zoo runs 1 forward pass
            and 2 training epochs over 45 images, timm 3 training epochs over 32.
zoo's feature cache (ZOO_HOME/features) is emptied before each zoo run, so a warm-up pays for its
features every round, as a first run on new data does. Both tools keep their own outputs: timm its
checkpoints and summary.csv, zoo its run folder, checkpoints, bundle (export/) and report.html.

    ZOO_HOME=/tmp/zh PYTHONPATH=$PWD .venv/bin/python scripts/bench_vs_timm.py --work /tmp/peers/w \\
        --timm-train /tmp/timm_train.py --zoo before=/tmp/zoo-before --zoo after=$PWD --report /tmp/vs.md
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ROWS = {
    "equal": {"batch": 15, "zoo": ["--freeze", "none", "--head-epochs", "0"]},
    "defaults": {"batch": 16, "zoo": ["--freeze", "none"]},
}


def _bench_peers():
    """scripts/bench_peers.py as a module: its weights export, timm command and test-accuracy helpers."""
    spec = importlib.util.spec_from_file_location("bench_peers", ROOT / "scripts" / "bench_peers.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


bp = _bench_peers()


def load() -> str:
    one, five, fifteen = os.getloadavg()
    return f"{one:.2f} {five:.2f} {fifteen:.2f}"


CPU_S: list[float] = []     # CPU seconds (user + system, the process and its loader workers) of each timed()


def _children_cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def timed(cmd: list[str], log: Path, env: dict | None = None, cwd: Path | None = None) -> float:
    """Wall seconds of ``cmd`` (process start to exit); its CPU seconds go to CPU_S. Exits when it fails."""
    cpu = _children_cpu()
    started = time.monotonic()
    with log.open("w") as fh:
        rc = subprocess.run(cmd, stdout=fh, stderr=subprocess.STDOUT, env=env, cwd=cwd).returncode
    seconds = time.monotonic() - started
    CPU_S.append(_children_cpu() - cpu)
    if rc != 0:
        sys.exit(f"`{' '.join(cmd)}` failed (exit {rc}); see {log}")
    return seconds


def zoo_env(root: Path) -> dict:
    return {**os.environ, "PYTHONPATH": str(root)}


def zoo_timed(root: Path, cmd: list[str], log: Path) -> float:
    """timed() for a command of the zoo checkout ``root``. It runs in ``root``: `python -m zoo` puts the
    working directory first on sys.path, ahead of PYTHONPATH, so from another checkout's folder it would
    run that checkout's code (until 2026-12-01 every --zoo NAME ran the code of the caller's folder)."""
    return timed(cmd, log, zoo_env(root), cwd=root)


def zoo_accuracy(root: Path, run: Path, data: Path) -> float:
    """`zoo eval` of the run's bundle on data/test (the checkout's own code)."""
    out = run / "eval"
    zoo_timed(root, bp.zoo_cmd("eval", str(run / "export"), "--data", str(data), "--out", str(out), "--device", "cpu",
                               *(["--overwrite"] if out.exists() else [])), run.with_suffix(".eval.log"))
    return json.loads((out / "metrics.json").read_text())["accuracy"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", required=True, help="folder holding data-N splits (bench_peers.py --work)")
    ap.add_argument("--split", type=int, default=0, help="which data-N")
    ap.add_argument("--timm-train", required=True, help="a copy of timm's train.py")
    ap.add_argument("--zoo", action="append", default=[], metavar="NAME=ROOT",
                    help="a zoo checkout to time (repeatable; default: after=this checkout)")
    ap.add_argument("--rows", default="equal", help=f"comma-separated, of {', '.join(ROWS)}")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--accuracy", action="store_true",
                    help="test accuracy of each tool's last-round model (zoo eval / timm's eval transform)")
    ap.add_argument("--report", help="also write the markdown table here (rewritten after every round)")
    args = ap.parse_args()
    if "ZOO_HOME" not in os.environ:
        sys.exit("set ZOO_HOME to your copy of a zoo home that has efficientnet_lite0 imported")
    zoos = {}
    for z in args.zoo or [f"after={ROOT}"]:
        name, sep, root = z.partition("=")
        if not sep or not (Path(root) / "zoo" / "__init__.py").is_file():
            sys.exit(f"--zoo {z!r}: write NAME=ROOT with ROOT a zoo checkout")
        zoos[name] = Path(root).resolve()
    rows = [r.strip() for r in args.rows.split(",") if r.strip()]
    if set(rows) - set(ROWS):
        sys.exit(f"--rows: choose from {', '.join(ROWS)}")
    work = Path(args.work).resolve()     # absolute: the zoo runs start in their checkout's folder
    data = work / f"data-{args.split}"
    if not (data / "train").is_dir():
        sys.exit(f"{data} has no train/ folder: write the splits with scripts/bench_peers.py --work {work}")
    n_classes = sum(1 for p in (data / "train").iterdir() if p.is_dir())
    weights = work / "efficientnet_lite0.safetensors"
    if not weights.is_file():
        sys.path.insert(0, str(ROOT))
        bp.export_weights(weights)
    features = Path(os.environ["ZOO_HOME"]) / "features"
    bench = work / "vs-timm"
    bench.mkdir(exist_ok=True)

    tools = ["timm", *zoos]
    times: dict[tuple[str, str], list[float]] = {(r, t): [] for r in rows for t in tools}
    cpu: dict[tuple[str, str], list[float]] = {(r, t): [] for r in rows for t in tools}
    loads: list[str] = [load()]
    accuracy: dict[tuple[str, str], float] = {}
    jobs = [(r, t) for r in rows for t in tools]
    for rnd in range(args.rounds):
        order = jobs[rnd % len(jobs):] + jobs[:rnd % len(jobs)]      # rotate: no tool always runs first
        for row, tool in order:
            batch = ROWS[row]["batch"]
            out = bench / f"{row}-{tool}"
            if tool == "timm":
                shutil.rmtree(out, ignore_errors=True)        # train.py would make run-1, run-2, ...
                cmd = bp.timm_command(Path(args.timm_train), data, weights, n_classes, args.epochs, 0, out, batch)
                s = timed(cmd, out.with_suffix(".log"))
            else:
                shutil.rmtree(features, ignore_errors=True)   # a warm-up computes its features every round
                cmd = bp.zoo_cmd("finetune", bp.MODEL, "--data", str(data), "--out", str(out), "--seed", "0",
                                 "--quiet", "--device", "cpu", "--epochs", str(args.epochs), "--batch-size",
                                 str(batch), *ROWS[row]["zoo"], *(["--overwrite"] if out.exists() else []))
                s = zoo_timed(zoos[tool], cmd, out.with_suffix(".log"))
            times[(row, tool)].append(s)
            cpu[(row, tool)].append(CPU_S[-1])
            print(f"round {rnd + 1} {row:8s} {tool:8s} {s:6.1f} s  cpu {CPU_S[-1]:6.1f} s  (load {load()})",
                  flush=True)
        loads.append(load())
        if args.accuracy and rnd == args.rounds - 1:
            for row, tool in jobs:
                out = bench / f"{row}-{tool}"
                accuracy[(row, tool)] = (bp.timm_test_accuracy(out / "run" / "model_best.pth.tar", data / "test",
                                                               n_classes) if tool == "timm"
                                         else zoo_accuracy(zoos[tool], out, data))
        lines = report(args, rows, tools, zoos, times, cpu, loads, accuracy)
        if args.report:
            Path(args.report).write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def report(args, rows, tools, zoos, times, cpu, loads, accuracy) -> list[str]:
    n = len(times[(rows[0], tools[0])])
    lines = [f"Run {time.strftime('%Y-%m-%d %H:%M')} on {platform.machine()}, {os.cpu_count()} cores, Python "
             f"{platform.python_version()}: `scripts/bench_vs_timm.py --rows {','.join(rows)} --rounds {n} "
             f"--epochs {args.epochs}` on data-{args.split}; zoo checkouts: "
             + ", ".join(f"{k} = `{v}`" for k, v in zoos.items())
             + f". Load average (1/5/15 min) at the start and after each round: {'; '.join(loads)}.", "",
             "| row | tool | " + " | ".join(f"round {i + 1}" for i in range(n))
             + " | median s | median of per-round ratio to timm | median CPU s (ratio) |"
             + (" test acc |" if accuracy else ""),
             "|---" * (n + 5 + bool(accuracy)) + "|"]
    for row in rows:
        base = times[(row, "timm")]
        for tool in tools:
            ts = times[(row, tool)]
            ratio = "1.00" if tool == "timm" else f"{statistics.median(t / b for t, b in zip(ts, base)):.2f}"
            cs, cb = cpu[(row, tool)], cpu[(row, "timm")]
            cpu_cell = f"{statistics.median(cs):.1f} ({statistics.median(c / b for c, b in zip(cs, cb)):.2f})"
            acc = f" {accuracy[(row, tool)]:.3f} |" if (row, tool) in accuracy else (" - |" if accuracy else "")
            lines.append(f"| {row} | {tool} | " + " | ".join(f"{t:.1f}" for t in ts)
                         + f" | **{statistics.median(ts):.1f}** | {ratio} | {cpu_cell} |" + acc)
    return lines


if __name__ == "__main__":
    main()
