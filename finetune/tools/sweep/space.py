"""The sweep's grid: values parsed from the command line, the trials, each trial's config, k-fold splits."""
from __future__ import annotations

import itertools
import math
import random
from dataclasses import dataclass
from typing import Any, Sequence

from finetune.core.config import FinetuneConfig
from finetune.data import ImageSet
from finetune.data.imageset import name_list
from finetune.core.errors import ConfigError, DataError
from finetune.core.io import printable_name

SWEPT_FIELDS = ("lr", "weight_decay", "freeze", "optimizer")


# ----------------------------------------------------------------------------------------------------
# the grid
# ----------------------------------------------------------------------------------------------------
def _float(text: str, name: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise ConfigError(f"--{name}: {text!r} is not a number; use e.g. 1e-4:1e-2:5 or 1e-4,1e-3") from None


MAX_COUNT = 100     # values of one START:END:COUNT range


def parse_values(spec: str | float | Sequence[float], name: str = "lr", allow_zero: bool = False) -> list[float]:
    """``"1e-4:1e-2:5"`` -> 5 log-spaced values from 1e-4 to 1e-2; ``"0,1e-4,1e-3"`` -> that list.

    Args:
        spec: the option text (a number or a list of numbers is accepted as is).
        name: the option name, for error messages.
        allow_zero: 0 may appear in a comma list (weight decay); never in a log range.
    Raises:
        ConfigError: malformed spec, non-positive range ends, zero/negative values where not allowed.
    """
    if isinstance(spec, (int, float)):
        values = [float(spec)]
    elif not isinstance(spec, str):
        values = [float(v) for v in spec]
    elif ":" in spec:
        parts = spec.split(":")
        if len(parts) != 3:
            raise ConfigError(f"--{name} {spec!r}: a range is START:END:COUNT, e.g. 1e-4:1e-2:5")
        start, end = _float(parts[0], name), _float(parts[1], name)
        try:
            count = int(parts[2])
        except ValueError:
            raise ConfigError(f"--{name} {spec!r}: COUNT must be a whole number, e.g. 1e-4:1e-2:5") from None
        if start <= 0 or end <= 0:
            raise ConfigError(f"--{name} {spec!r}: a log-spaced range needs positive ends; "
                              "list 0 explicitly, e.g. 0,1e-5,1e-4")
        if not 1 <= count <= MAX_COUNT:    # a typo of 1e11 values hung building the list, before any output
            raise ConfigError(f"--{name} {spec!r}: COUNT must be 1 to {MAX_COUNT} (each value is one more "
                              "training run per combination)")
        if count == 1:
            values = [start]
        else:
            ratio = end / start
            values = [start * ratio ** (i / (count - 1)) for i in range(count)]
            values[-1] = end  # exact end point, not end * (1 +- 1 ulp)
    else:
        values = [_float(p.strip(), name) for p in spec.split(",") if p.strip()]
    if not values:
        raise ConfigError(f"--{name}: no values given; use e.g. 1e-4:1e-2:5 or 1e-4,1e-3")
    for v in values:
        if v < 0 or (v == 0 and not allow_zero) or not math.isfinite(v):
            raise ConfigError(f"--{name}: {v:g} is not allowed; values must be positive"
                              + (" (or 0)" if allow_zero else ""))
    return _unique(values)


def parse_choices(spec: str | Sequence[str], name: str, allowed: Sequence[str] | None = None) -> list[str]:
    """``"head,1,2"`` -> ["head", "1", "2"]; checks each against ``allowed`` when given."""
    items = spec.split(",") if isinstance(spec, str) else list(spec)
    values = [str(v).strip().lower() for v in items if str(v).strip()]
    if not values:
        raise ConfigError(f"--{name}: no values given")
    if allowed is not None:
        bad = [v for v in values if v not in allowed]
        if bad:
            raise ConfigError(f"--{name}: {', '.join(bad)} not known; choose from {', '.join(allowed)}")
    return _unique(values)


def _unique(values: list) -> list:
    seen: list = []
    for v in values:
        if v not in seen:
            seen.append(v)
    return seen


@dataclass
class SweepSpace:
    """The grid: every combination is one trial."""

    lrs: list[float]
    weight_decays: list[float]
    freezes: list[str]
    optimizers: list[str]

    def trials(self) -> list[dict[str, Any]]:
        """All combinations; LR varies fastest so that a partial sweep covers whole LR curves first."""
        return [{"lr": lr, "weight_decay": wd, "freeze": fr, "optimizer": opt}
                for fr, opt, wd, lr in itertools.product(self.freezes, self.optimizers, self.weight_decays,
                                                         self.lrs)]

    def __len__(self) -> int:
        return len(self.lrs) * len(self.weight_decays) * len(self.freezes) * len(self.optimizers)


def trial_id(params: dict[str, Any]) -> str:
    """A stable name for a trial (the resume key and the per-trial folder name)."""
    return (f"lr{params['lr']:.4g}_wd{params['weight_decay']:.4g}_freeze-{params['freeze']}"
            f"_{params['optimizer']}")


def trial_config(config: FinetuneConfig, params: dict[str, Any]) -> FinetuneConfig:
    """The base config with one trial's swept values (what ``best_config.yaml`` holds for the best)."""
    return config.replace(**{k: params[k] for k in SWEPT_FIELDS})


# ----------------------------------------------------------------------------------------------------
# folds
# ----------------------------------------------------------------------------------------------------
def check_folds(k: int, single: bool = True) -> None:
    """ConfigError unless ``k`` is 2 or more folds, or 0 (the single train/val split) where ``single``: what
    ``zoo sweep`` checks of --folds before it reads the data, and :func:`kfold_splits` before it deals them."""
    if int(k) < 2 and not (single and int(k) == 0):
        raise ConfigError(f"--folds {k}: cross-validation needs at least 2 folds (0: the single train/val split)")


def kfold_splits(train_set: ImageSet, val_set: ImageSet | None, k: int, seed: int = 0
                 ) -> list[tuple[ImageSet, ImageSet]]:
    """Stratified k folds over train + val: each class is shuffled (seeded) and dealt round-robin, so
    every fold holds ~1/k of each class. Returns ``[(train_k, val_k), ...]``.

    Raises:
        ConfigError: k < 2. DataError: a class has fewer than k images (it could not be in every fold).
    """
    check_folds(k, single=False)
    classes = list(train_set.classes)
    items = list(train_set.items) + (list(val_set.items) if val_set is not None else [])
    by_class: dict[int, list[tuple[str, int]]] = {}
    for path, label in sorted(set(items)):  # sorted: the folds do not depend on the scan order
        by_class.setdefault(label, []).append((path, label))
    small = sorted((c, len(v)) for c, v in by_class.items() if len(v) < k)
    if small:
        # every such class in one line (a long tail of 1-2 image classes was refused one class at a time)
        fewest = min(n for _, n in small)
        fix = (f"use --folds {fewest}, the fewest images a class has" if fewest >= 2 else
               "a class of 1 image cannot be cross-validated: add images to it, or leave --folds out (the single "
               "train/val split)")
        what = (f"class '{printable_name(classes[small[0][0]])}' has {small[0][1]} image(s), fewer than --folds {k}"
                if len(small) == 1 else f"{len(small)} classes have fewer images than --folds {k} "
                f"({name_list(classes[c] for c, _ in small)})")
        raise DataError(f"{what}: {fix}")
    rng = random.Random(seed)
    folds: list[list[tuple[str, int]]] = [[] for _ in range(k)]
    offset = 0
    for label in sorted(by_class):
        members = by_class[label]
        rng.shuffle(members)
        for i, item in enumerate(members):
            folds[(offset + i) % k].append(item)
        offset += len(members)  # continue the deal where the last class stopped: balanced fold sizes
    splits = []
    for i in range(k):
        train = [it for j, f in enumerate(folds) if j != i for it in f]
        splits.append((ImageSet(items=train, classes=classes), ImageSet(items=list(folds[i]), classes=classes)))
    return splits


