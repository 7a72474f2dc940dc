#!/usr/bin/env python
"""How well does `zoo doctor` find wrong labels? Flip a share of a real folder's labels, then score the flags.

The features are the doctor's own (the pretrained model's pooled features through the feature cache, so a
folder the doctor has seen costs no forward pass); the flips are made on the labels only, so one extraction
serves every rate and seed. For each rate and seed, a seeded share of the images gets another class (uniform
over the others), ``finetune.tools.doctor.labels.label_issues`` runs at each L2 setting (``auto``: chosen by
the held-out loss, the default; a number: fixed), and the flags are scored against the flips: precision,
recall, F1, how many were flagged, and the probe's time (one thread for small probes, as the doctor runs it).
At rate 0 every flag is a false alarm, or a real label error of the folder.

    ZOO_HOME=... PYTHONPATH=$PWD .venv/bin/python scripts/bench_label_issues.py --data DIR \\
        --model efficientnet_lite0 --rates 0,0.05,0.1,0.2 --seeds 5 --l2 auto,0.001

Measured in docs/doctor.md ("Label issues, session 26").
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def flip_labels(y: np.ndarray, n_classes: int, rate: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(noisy labels, flipped mask): each image flipped with probability ``rate`` to a uniformly drawn other class."""
    rng = np.random.default_rng(seed)
    flipped = rng.random(len(y)) < rate
    noisy = y.copy()
    noisy[flipped] = (noisy[flipped] + rng.integers(1, n_classes, int(flipped.sum()))) % n_classes
    return noisy, flipped


def flag_table(z: np.ndarray, y: np.ndarray, n_classes: int, rates: list[float], seeds: int,
               settings: list[float | None]) -> list[dict]:
    """One row per (rate, L2 setting): means over ``seeds`` flip draws (one draw at rate 0)."""
    from finetune.tools.doctor.labels import label_issues

    rows = []
    for rate in rates:
        for l2 in settings:
            scores, times, chosen = [], [], []
            for seed in range(seeds if rate > 0 else 1):
                noisy, flipped = flip_labels(y, n_classes, rate, seed)
                t0 = time.perf_counter()
                out = label_issues(z, noisy, n_classes, l2=l2, iters=100)    # the doctor's probe_iters
                times.append(time.perf_counter() - t0)
                flagged = out["flagged"]
                hit = int((flagged & flipped).sum())
                precision = hit / max(int(flagged.sum()), 1)
                recall = hit / max(int(flipped.sum()), 1)
                f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
                scores.append((precision, recall, f1, int(flagged.sum()), int(flipped.sum())))
                chosen.append(out["l2"])
            mean = np.mean(np.array(scores, dtype=np.float64), axis=0)
            rows.append({"rate": rate, "l2": "auto" if l2 is None else f"{l2:g}", "precision": mean[0],
                         "recall": mean[1], "f1": mean[2], "flagged": mean[3], "flips": mean[4],
                         "seconds": statistics.median(times), "chosen": sorted({f"{c:g}" for c in chosen})})
    return rows


def markdown(rows: list[dict], title: str) -> str:
    lines = [f"| {title}: flipped | L2 | precision | recall | F1 | flagged (flips) | probe s (median) | L2 used |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['rate']:.0%} | {r['l2']} | {r['precision']:.3f} | {r['recall']:.3f} | {r['f1']:.3f} | "
                     f"{r['flagged']:.1f} ({r['flips']:.1f}) | {r['seconds']:.1f} | {', '.join(r['chosen'])} |")
    return "\n".join(lines)


def folder_features_of(data: Path, model: str) -> tuple[np.ndarray, np.ndarray, int]:
    """The doctor's L2-normalised features of every readable image of ``data``, their labels, the class count."""
    from finetune.core.config import FinetuneConfig
    from finetune.data import scan_folder
    from finetune.tools.doctor.checks import l2_normalise
    from finetune.tools.doctor.findings import SPLIT_ORDER
    from finetune.tools.doctor.run import folder_features
    from zoo.build import create_model
    from zoo.cache import features_dir
    from zoo.hub import resolve_entry
    from zoo.jobs.finetune import run_data_config

    config = FinetuneConfig()
    report = scan_folder(data, val_split=config.val_split, seed=config.seed, strict=False)
    entry = resolve_entry(model)
    net = create_model(entry, pretrained=True)
    feats, valid, _ = folder_features(report, net, entry.classifier, run_data_config(entry, config), config,
                                      cache_dir=features_dir())
    sets = report.sets()
    order = [s for s in SPLIT_ORDER if s in feats]
    z = np.concatenate([feats[s] for s in order])
    y = np.array([label for s in order for _, label in sets[s].items], dtype=np.int64)
    ok = np.concatenate([valid[s] for s in order])
    return l2_normalise(z[ok]), y[ok], len(report.classes)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", required=True, type=Path, help="an image folder (class folders, or train/val/test)")
    ap.add_argument("--model", default="efficientnet_lite0", help="a cached registry or timm: model")
    ap.add_argument("--rates", default="0,0.05,0.1,0.2", help="shares of labels to flip, comma-separated")
    ap.add_argument("--seeds", type=int, default=5, help="flip draws per rate above 0")
    ap.add_argument("--l2", default="auto,0.001", help="probe L2 settings: auto (the default) or numbers")
    args = ap.parse_args()
    z, y, n_classes = folder_features_of(args.data, args.model)
    settings = [None if s == "auto" else float(s) for s in args.l2.split(",")]
    rows = flag_table(z, y, n_classes, [float(r) for r in args.rates.split(",")], args.seeds, settings)
    print(markdown(rows, f"{args.data.name} ({len(y)} images, {n_classes} classes)"))


if __name__ == "__main__":
    main()
