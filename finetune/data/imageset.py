"""Labelled image lists: ``ImageSet`` (paths + labels) and ``ScanReport`` (what ``scan_folder`` found).

In memory every path is usable as is (``root`` joined with the relative path); on disk (scan.json,
split.json, bad_files.txt) paths are relative to the data root, with ``/`` separators.
"""
from __future__ import annotations

import hashlib
import math
import os
from dataclasses import dataclass, field, replace
from typing import Any, Iterable

from finetune.core.io import printable_name


# ----------------------------------------------------------------------------------------- results
@dataclass
class ImageSet:
    """Labelled images: ``items`` are (path, label index into ``classes``)."""

    items: list[tuple[str, int]]
    classes: list[str]

    def __len__(self) -> int:
        return len(self.items)

    def class_counts(self) -> list[int]:
        """Images per class, in ``classes`` order (zeros included)."""
        counts = [0] * len(self.classes)
        for _, label in self.items:
            counts[label] += 1
        return counts

    @property
    def targets(self) -> list[int]:
        return [label for _, label in self.items]


@dataclass
class ScanReport:
    """What ``scan_folder`` found. ``layout``: "split" (train/val[/test] folders) or "flat" (split made here)."""

    root: str
    layout: str
    classes: list[str]
    train: ImageSet
    val: ImageSet
    test: ImageSet | None
    bad_files: list[tuple[str, str]] = field(default_factory=list)   # (path, reason), skipped
    warnings: list[str] = field(default_factory=list)
    seed: int = 0
    val_split: float | None = None      # the fraction used for a flat layout (None for "split")
    # the folders read, relative to root ("." for root itself): train, val (None: carved from train), test
    folders: dict[str, str | None] = field(default_factory=dict)

    def sets(self) -> dict[str, ImageSet]:
        out = {"train": self.train, "val": self.val}
        if self.test is not None:
            out["test"] = self.test
        return out

    def counts(self) -> dict[str, dict[str, int]]:
        """``{split: {class: n_images}}`` for train, val (and test), every class listed."""
        return {name: dict(zip(self.classes, s.class_counts())) for name, s in self.sets().items()}

    def imbalance(self) -> float:
        """Largest / smallest training-class count (inf when a class has no training image)."""
        counts = self.train.class_counts()
        if not counts:
            return 1.0
        return math.inf if min(counts) == 0 else max(counts) / min(counts)

    def fingerprint(self) -> str:
        """sha256 of the (split, relative path, class) list: changes when any file or label changes."""
        h = hashlib.sha256()
        for line in sorted(_split_lines(self)):
            h.update(line.encode("utf-8", "surrogatepass") + b"\n")
        return h.hexdigest()

    def relpath(self, path: str) -> str:
        return relative_path(path, self.root)

    def moved_to(self, root: str) -> ScanReport:
        """This report for the same folder reached at ``root`` (as another machine mounts it: torchrun on several
        nodes, where rank 0 scanned), every path under the old root re-rooted; itself where ``root`` is its own."""
        root = os.path.abspath(root)
        if root == self.root:
            return self

        def move(path: str) -> str:
            rel = self.relpath(path)
            return path if rel == path else os.path.join(root, *rel.split("/"))

        def moved(s: ImageSet | None) -> ImageSet | None:
            return None if s is None else ImageSet([(move(p), label) for p, label in s.items], s.classes)

        return replace(self, root=root, train=moved(self.train), val=moved(self.val), test=moved(self.test),
                       bad_files=[(move(p), why) for p, why in self.bad_files])

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable summary (paths relative to ``root``)."""
        # Printable names: scan.json is a report, and must encode as UTF-8 even for non-UTF-8 file names.
        ratio = self.imbalance()
        return {
            "root": printable_name(self.root),
            "layout": self.layout,
            "classes": [printable_name(c) for c in self.classes],
            "counts": {k: {printable_name(c): n for c, n in v.items()} for k, v in self.counts().items()},
            "images": {name: len(s) for name, s in self.sets().items()},
            "imbalance": None if math.isinf(ratio) else round(ratio, 3),
            "seed": self.seed,
            "val_split": self.val_split,
            "folders": {k: None if v is None else printable_name(v) for k, v in self.folders.items()},
            "bad_files": [{"path": printable_name(self.relpath(p)), "reason": r} for p, r in self.bad_files],
            "warnings": list(self.warnings),
            "fingerprint": self.fingerprint(),
        }


def _split_lines(report: ScanReport) -> Iterable[str]:
    for name, s in report.sets().items():
        for path, label in s.items:
            yield f"{name}\t{report.relpath(path)}\t{s.classes[label]}"


def name_list(items: Iterable[str], limit: int = 5) -> str:
    """``a, b, c, d, e and 7 more``: the first ``limit`` names (printable), then how many others."""
    items = [printable_name(i) for i in items]
    more = f" and {len(items) - limit} more" if len(items) > limit else ""
    return ", ".join(items[:limit]) + more


def relative_path(path: str, root: str) -> str:
    try:
        rel = os.path.relpath(path, root)
    except ValueError:          # another drive on Windows
        return path
    return path if rel.startswith("..") else rel.replace(os.sep, "/")
