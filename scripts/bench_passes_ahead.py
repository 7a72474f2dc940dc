#!/usr/bin/env python
"""Passes started ahead (``finetune.engine.epoch_steps.LoaderSteps``) against passes started on time, on a
loader whose consumer does not use the host's cores (a GPU step, stood in for by a sleep), so that what is
measured is only when the loader's workers have nothing to do: during validation (the training workers)
and during training (the validation workers), and at an epoch's start (the consumer). A third order,
"kept", is LoaderSteps' own since session 22: passes ahead, and validation's batches kept after its first
pass (``finetune.data.replay``), its loader's workers stopped then.

    .venv/bin/python scripts/bench_passes_ahead.py --data /tmp/mid --workers 2 --rounds 3

The folder: train/ and val/ class folders of JPEGs (e.g. the GPU big-job folder's images, 500x375). Both
orders read the same batches; the script prints each round's seconds for 3 epochs and the median ratios.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", required=True)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--train-step", type=float, default=0.05, help="seconds the consumer spends per train batch")
    p.add_argument("--val-step", type=float, default=0.02, help="seconds the consumer spends per val batch")
    a = p.parse_args()

    from finetune.data import ImageDataset, build_transform, close_loader, make_loader, scan_folder, set_loader_epoch
    from finetune.data.replay import KeptPass

    dc = {"input_size": (3, 224, 224), "interpolation": "bilinear", "crop_pct": 0.875, "mean": (0.5,) * 3,
          "std": (0.5,) * 3}
    report = scan_folder(a.data)

    def loaders():
        train = make_loader(ImageDataset(report.train, build_transform(dc, True, output="uint8", colour_on_device=True)),
                            a.batch_size, train=True, workers=a.workers, device="cpu")
        val = make_loader(ImageDataset(report.val, build_transform(dc, False, output="uint8")), a.batch_size,
                          train=False, workers=a.workers, device="cpu")
        return train, val

    def consume(batches, step: float) -> int:
        n = 0
        for x, *_ in batches:     # (x, y, sample keys) from the training loader
            time.sleep(step)
            n += len(x)
        return n

    def on_time(train, val) -> float:
        t0 = time.perf_counter()
        for epoch in range(1, a.epochs + 1):
            set_loader_epoch(train, 0, epoch)
            consume(iter(train), a.train_step)
            consume(iter(val), a.val_step)
        return time.perf_counter() - t0

    def ahead(train, val, keep: KeptPass | None = None) -> float:       # LoaderSteps' order
        t0 = time.perf_counter()
        set_loader_epoch(train, 0, 1)
        nxt = iter(train)
        for epoch in range(1, a.epochs + 1):
            held = keep.get(val) if keep is not None else None
            batches = nxt
            vb = held if held is not None else (keep.record(val, iter(val)) if keep is not None else iter(val))
            consume(batches, a.train_step)
            if epoch < a.epochs:
                set_loader_epoch(train, 0, epoch + 1)
                nxt = iter(train)
            consume(vb, a.val_step)
            if held is None and keep is not None and keep.get(val) is not None:
                close_loader(val)
        return time.perf_counter() - t0

    def kept(train, val) -> float:
        return ahead(train, val, KeptPass())

    orders = [("on time", on_time), ("ahead", ahead), ("kept", kept)]
    rows = []
    for r in range(a.rounds):
        for name, fn in orders[r % 3:] + orders[:r % 3]:
            train, val = loaders()
            try:
                seconds = fn(train, val)
            finally:
                close_loader(train)
                close_loader(val)
            rows.append((r, name, seconds))
            print(f"round {r + 1}: {name}: {seconds:.2f} s for {a.epochs} epochs", flush=True)
    def ratio(num: str, den: str) -> float:
        return statistics.median(next(s for rr, n, s in rows if rr == r and n == num)
                                 / next(s for rr, n, s in rows if rr == r and n == den) for r in range(a.rounds))

    print(f"ahead / on time, median of {a.rounds} rounds: {ratio('ahead', 'on time'):.3f}")
    print(f"kept / ahead, median of {a.rounds} rounds: {ratio('kept', 'ahead'):.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
