#!/usr/bin/env python
"""Seconds of `zoo doctor`'s file pass (finetune.tools.doctor.checks.file_facts: sha256, header size, pixel
fingerprint) by thread count, on small PNGs and on photo-like JPEGs of 500x375.

The variants run interleaved in one process, each round reading every file once (a warm page cache after the
first); compare them as ratios of the medians. Each variant's results are checked equal to the serial pass's.

    .venv/bin/python scripts/bench_doctor_files.py [--pngs DIR] [--jpegs 600] [--rounds 3] [--threads 0,2,8] \
        [--before REV]     # also the file_facts of git revision REV (one thread), as "before"
"""
from __future__ import annotations

import argparse
import subprocess
import types
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from scripts.bench_decode import photos  # noqa: E402
from finetune.tools.doctor.checks import file_facts  # noqa: E402


def same(a, b) -> bool:
    return a[0] == b[0] and a[1] == b[1] and np.array_equal(a[2], b[2]) and np.array_equal(a[3], b[3])


def facts_at(rev: str):
    """file_facts as finetune/tools/doctor/checks.py was at git revision ``rev``."""
    source = subprocess.run(["git", "show", f"{rev}:finetune/tools/doctor/checks.py"], cwd=ROOT, check=True,
                            capture_output=True, text=True, timeout=60).stdout
    module = types.ModuleType("checks_before")
    exec(compile(source, f"{rev}:checks.py", "exec"), module.__dict__)
    return module.file_facts


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pngs", help="a folder of images (e.g. /tmp/s25/gen.py ROOT 30 100 32: 3,000 PNGs of 32 px)")
    ap.add_argument("--jpegs", type=int, default=600, help="photo-like JPEGs of each --jpeg-sizes to write (0: none)")
    ap.add_argument("--jpeg-sizes", default="500x375", help="WxH,... of the JPEGs")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", default="0,2,8")
    ap.add_argument("--before", help="a git revision whose file_facts runs too, as the first variant")
    args = ap.parse_args()
    variants = {f"{t}": (lambda paths, t=int(t): file_facts(paths, threads=t)) for t in args.threads.split(",")}
    if args.before:
        variants = {f"before ({args.before})": facts_at(args.before), **variants}
    first = next(iter(variants))
    with tempfile.TemporaryDirectory() as tmp:
        sets: dict[str, list[str]] = {}
        if args.pngs:
            sets["PNGs"] = sorted(str(p) for p in Path(args.pngs).rglob("*") if p.is_file())
        for wh in args.jpeg_sizes.split(",") if args.jpegs else []:
            w, h = (int(v) for v in wh.split("x"))
            name = f"JPEGs {w}x{h}"
            sets[name] = []
            for i, data in enumerate(photos(args.jpegs, size=(w, h))):
                sets[name].append(str(Path(tmp) / f"{wh}_{i:05d}.jpg"))
                Path(sets[name][-1]).write_bytes(data)
        sizes = {name: statistics.median(Path(p).stat().st_size for p in paths) / 1024 for name, paths in sets.items()}
        seconds: dict[tuple[str, str], list[float]] = {}
        for name, paths in sets.items():
            serial = file_facts(paths, threads=0)     # warms the page cache
            for _ in range(args.rounds):
                for t, run in variants.items():
                    t0 = time.perf_counter()
                    got = run(paths)
                    seconds.setdefault((name, t), []).append(time.perf_counter() - t0)
                    assert same(got, serial), f"{t} differs from the serial pass on {name}"
    print(f"{args.rounds} interleaved rounds; every variant's results equal to the serial pass's")
    for name, kb in sizes.items():
        print(f"{name}: {kb:.1f} KB per file (median)")
    print()
    print("| files | threads | seconds, median (min-max) | files/s | speed-up |\n|---|---|---|---|---|")
    for (name, t), values in seconds.items():
        med, base = statistics.median(values), statistics.median(seconds[(name, first)])
        n = len(sets[name])
        print(f"| {n:,} {name} | {t} | {med:.2f} ({min(values):.2f}-{max(values):.2f}) | {n / med:.0f} | "
              f"{base / med:.2f}x |")


if __name__ == "__main__":
    main()
