"""The confusion matrix at any number of classes: the file that holds it whole, and what is shown of it when
the classes are too many to show it whole.

``confusion.csv`` has one layout wherever it is written (``zoo eval``'s report folder, a run folder): a header
row ``true \\ predicted, <class>...`` then one row per true class, its counts per predicted class. Up to
:data:`FULL_MAX_CLASSES` classes a page and summary.json carry the matrix itself; above it (a 2,000-class
matrix is 4 million cells: an 88 MB HTML table, a 44 MB summary.json) they carry the most-confused pairs and
the worst classes (fastai's ``ClassificationInterpretation.most_confused`` is the same list) and point to
the CSV. Pure Python (lists of lists), no torch or numpy: the CLI imports it.
"""
from __future__ import annotations

import csv
import heapq
import math
from itertools import chain, compress
from pathlib import Path
from typing import Any, Mapping, Sequence

from finetune.core.io import csv_text, printable_name

__all__ = ["FULL_MAX_CLASSES", "SHOWN_CLASSES", "CONFUSION_CSV", "confusion_csv_text", "read_confusion_csv",
           "most_confused", "confused_classes", "lowest_first", "precision_recall"]

# Up to this many classes the matrix is shown and stored whole (2,500 cells: a page's table still reads,
# summary.json and a bundle's metadata stay a few KB); above it, the pairs and worst classes and the CSV.
FULL_MAX_CLASSES = 50
# Above it, the classes a console lists (the scan's fewest images, the lowest accuracies); the rest in files.
SHOWN_CLASSES = 10
CONFUSION_CSV = "confusion.csv"
_CORNER = "true \\ predicted"


def confusion_csv_text(labels: Sequence[str], matrix: Sequence[Sequence[int]]) -> str:
    """``confusion.csv``'s text: the header ``true \\ predicted, <labels>``, then ``<true label>, <counts>``
    per row (rows: true class, columns: predicted). Names that are not UTF-8 are written escaped (\\xNN)."""
    names = [printable_name(str(c)) for c in labels]
    # row by row (chain): 2,000 classes are 4 million cells, not to be held twice
    return csv_text(chain([(_CORNER, *names)], ((name, *map(int, row)) for name, row in zip(names, matrix))))


def read_confusion_csv(path: str | Path) -> tuple[list[str], list[list[int]]]:
    """(labels, matrix) from a ``confusion.csv``.

    Raises:
        OSError: the file cannot be read. ValueError: it is not a square matrix of counts in this layout.
    """
    with open(path, newline="", encoding="utf-8") as fh:
        rows = csv.reader(fh)
        header = next(rows, None)
        if not header or header[0] != _CORNER:
            raise ValueError(f"{path} is not a confusion.csv (its first cell is not {_CORNER!r})")
        labels, matrix = [], []
        for row in rows:
            labels.append(row[0])
            matrix.append(list(map(int, row[1:])))
    if labels != header[1:] or any(len(r) != len(labels) for r in matrix):
        raise ValueError(f"{path} is not a square confusion matrix with its classes in the same order")
    return labels, matrix


def most_confused(labels: Sequence[str], matrix: Sequence[Sequence[int]], top: int = 20
                  ) -> list[tuple[str, str, int, float]]:
    """The ``top`` off-diagonal cells with the most images: (true class, predicted class, images, share of
    the true class's images), most first (ties: in class order). Cells with no image are never listed."""
    # compress: the non-empty cells of a row picked in C (a 2,000-class matrix is 4 million mostly empty cells)
    cells = ((-row[j], i, j) for i, row in enumerate(matrix) for j in compress(range(len(row)), row) if j != i)
    return [(labels[i], labels[j], -neg, -neg / sum(matrix[i])) for neg, i, j in heapq.nsmallest(max(0, top), cells)]


def confused_classes(matrix: Sequence[Sequence[int]], limit: int) -> list[int]:
    """The indices of at most ``limit`` classes, those of the :func:`most_confused` pairs taken most first (both
    classes of a pair, or none where only one would fit), in class order: the part of a matrix too big to draw
    whole that a plot shows with names. Empty when no image was misclassified."""
    keep: set[int] = set()
    for i, j, _, _ in most_confused(range(len(matrix)), matrix, top=max(0, limit)):
        if len(keep | {i, j}) <= limit:
            keep |= {i, j}
    return sorted(keep)


def lowest_first(scores: Mapping[str, float | None]) -> list[str]:
    """The names of ``scores`` (e.g. per-class accuracy) lowest score first; None or NaN (nothing to score)
    last; ties keep their order."""
    def key(name: str) -> tuple[bool, float]:
        v = scores[name]
        missing = v is None or (isinstance(v, float) and math.isnan(v))
        return missing, 0.0 if missing else float(v)

    return sorted(scores, key=key)


def precision_recall(classes: Sequence[str], confusion: Sequence[Sequence[int]]) -> list[list[Any]]:
    """[class, precision, recall, f1, support] per class from a confusion matrix (rows: true), NaN where a class
    was never predicted (precision), has no images (recall) or either (F1): the run page's table and ``zoo eval``'s
    per_class (NaN as None) alike."""
    out = []
    column_sums = [sum(col) for col in zip(*confusion)]      # once: a column per class read row by row is C^2
    for i, name in enumerate(classes):
        tp = confusion[i][i]
        support = sum(confusion[i])
        predicted = column_sums[i]
        p = tp / predicted if predicted else math.nan
        r = tp / support if support else math.nan
        f1 = 2 * p * r / (p + r) if predicted and support and (p + r) else math.nan
        out.append([name, p, r, f1, int(support)])
    return out
