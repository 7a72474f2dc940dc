#!/usr/bin/env python
"""Images/s of `zoo predict` / `zoo eval`'s decoding (zoo.predict._prepared) by thread count, alone and with a model.

On a GPU machine predict and eval decode on as many threads as the training loaders have workers
(``finetune.data.loaders.resolve_workers``: every core but one on CUDA); on a CPU of up to 4 cores, none. This
measures what threads give where it can: decoding alone (the eval transform of a 224-px model, photo-like JPEGs of
500x375, as the GPU benchmarks use), and ``predict_probs`` with a model on the CPU. All variants run interleaved
in one process; compare them as ratios, medians of the rounds.

    .venv/bin/python scripts/bench_predict.py [--images 256] [--rounds 5] [--threads 0,1,2] [--model timm:resnet18]
    python3 scripts/bench_predict.py --images 1024 --rounds 3 --threads 0,4,8,15 --device cuda   # scripts/gpu_checks.sh --parts
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from scripts.bench_decode import photos  # noqa: E402
import zoo.predict as predict  # noqa: E402

DATA_CONFIG = {"input_size": (3, 224, 224), "interpolation": "bicubic", "crop_pct": 0.875, "crop_mode": "center",
               "mean": (0.485, 0.456, 0.406), "std": (0.229, 0.224, 0.225)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=256)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--threads", default="0,1,2")
    ap.add_argument("--model", default="timm:resnet18", help="timm:<arch> (random weights) for the predict rows")
    ap.add_argument("--device", default="cpu", help="where the predict rows' model runs (cuda on the GPU machine)")
    args = ap.parse_args()
    counts = [int(t) for t in args.threads.split(",")]
    import timm

    model = timm.create_model(args.model.removeprefix("timm:"), pretrained=False).eval().to(args.device)
    with tempfile.TemporaryDirectory() as tmp:
        paths = []
        for i, data in enumerate(photos(args.images)):
            p = Path(tmp) / f"{i:05d}.jpg"
            p.write_bytes(data)
            paths.append(p)
        transform = predict.eval_transform(DATA_CONFIG)
        rows: dict[str, list[float]] = {}
        for _ in range(args.rounds):
            for t in counts:
                t0 = time.perf_counter()
                n = sum(1 for _ in predict._prepared(paths, lambda p: transform(predict._load(p, None)), t, 32))
                rows.setdefault(f"decode only, {t} thread(s)", []).append(n / (time.perf_counter() - t0))
                t0 = time.perf_counter()
                kept, _ = predict.predict_probs(model, paths, DATA_CONFIG, batch_size=32, threads=t)
                rows.setdefault(f"predict_probs {args.model} on {args.device}, {t} thread(s)", []).append(
                    len(kept) / (time.perf_counter() - t0))
    print(f"torch threads {torch.get_num_threads()}, {args.images} JPEGs of 500x375, {args.rounds} rounds\n")
    print("| what | images/s (median) | / 0 threads |\n|---|---|---|")
    for name, values in rows.items():
        base = statistics.median(rows[name.rsplit(",", 1)[0] + ", 0 thread(s)"])
        print(f"| {name} | {statistics.median(values):.0f} | {statistics.median(values) / base:.2f}x |")


if __name__ == "__main__":
    main()
