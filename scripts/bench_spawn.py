"""A DataLoader worker's start: first batch and whole pass with one worker, forked and spawned (macOS's and
Windows' start method), against the main process. docs/benchmarks.md, "Worker processes".

    python scripts/bench_spawn.py DATA_DIR [--rounds 2]
"""
from __future__ import annotations

import argparse
import multiprocessing
import time

import torch

from finetune.data import ImageDataset, scan_folder
from finetune.data.transforms import build_transform

DATA_CONFIG = {"input_size": (3, 32, 32), "interpolation": "bilinear", "crop_pct": 1.0, "crop_mode": "center",
               "mean": (0.5,) * 3, "std": (0.5,) * 3}


def one_pass(dataset, workers: int, method: str | None) -> tuple[float, float]:
    """(seconds to the first batch, seconds for the whole pass, workers joined)."""
    context = multiprocessing.get_context(method) if workers else None
    loader = torch.utils.data.DataLoader(dataset, batch_size=8, num_workers=workers, multiprocessing_context=context)
    t = time.perf_counter()
    it = iter(loader)
    next(it)
    first = time.perf_counter() - t
    for _ in it:
        pass
    del it
    return first, time.perf_counter() - t


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("data")
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    dataset = ImageDataset(scan_folder(args.data, val_split=0.25, seed=0).train, build_transform(DATA_CONFIG, False))
    for _ in range(args.rounds):
        for method in ("fork", "spawn"):
            first, whole = one_pass(dataset, 1, method)
            _, main_process = one_pass(dataset, 0, None)
            print(f"{method}: first batch {first:.2f} s, pass {whole:.2f} s; main process pass {main_process:.3f} s, "
                  f"{len(dataset)} images")


if __name__ == "__main__":
    main()
