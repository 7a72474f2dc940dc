"""The doctor's vocabulary: its options (thresholds), one finding (a row of findings.csv), the result;
findings.csv and the exclude list that ``zoo finetune --exclude`` reads."""
from __future__ import annotations

import csv
import io
import math
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, NamedTuple, Sequence

from finetune.core.io import atomic_write_text, csv_text, printable, printable_name, read_user_text
from finetune.data.files import listed_names, path_key

FINDING_ORDER = ("leak", "cross_class_duplicate", "duplicate", "wrong_label", "outlier", "unreadable",
                 "tiny", "aspect", "small_class", "scan_warning")
CSV_COLUMNS = ("path", "finding", "score", "other", "split", "label", "detail")
# What ``--exclude findings.csv`` drops: the rows that are about one bad file. Tiny images and extreme
# aspect ratios are reported but kept (they may be fine for the task); edit the CSV to drop them too.
EXCLUDE_KINDS = ("leak", "cross_class_duplicate", "duplicate", "wrong_label", "outlier", "unreadable")
SPLIT_ORDER = ("train", "val", "test")
Log = Callable[[str], None]


@dataclass(frozen=True)
class DoctorOptions:
    """Thresholds of the checks (the defaults are the ones measured in docs/doctor.md)."""

    # cosine similarity of L2-normalised pooled features from which two images are a near copy; None (auto):
    # NEAR_FLOOR, raised where images of different classes are that alike (checks.copy_threshold)
    near_threshold: float | None = None
    pixel_threshold: float = 0.99   # or cosine similarity of the 16x16 colour pixel fingerprints
    # (1.0 for either: identical vectors, compared bit for bit rather than by a float cosine)
    folds: int = 5                  # out-of-fold probe folds (wrong labels)
    seed: int = 0                   # fold assignment
    probe_l2: float | None = None   # L2 penalty of the linear probe; None: chosen by its held-out loss (labels.py)
    probe_iters: int = 100          # L-BFGS iterations per fold
    outlier_z: float = 5.0          # robust z-score of the distance to the nearest class centroid
    min_side: int = 64              # px; shorter side below this: "tiny"
    max_aspect: float = 3.0         # long / short side above this: "aspect"
    small_class_ratio: float = 0.2  # training images below this fraction of the median class: "small_class"

    def validate(self) -> "DoctorOptions":
        """Raise ValueError naming the first option outside its range (nan and inf are outside every one);
        returns self."""
        # each test is written so that nan fails it (every comparison with nan is false)
        for name, ok, allowed in (
                ("near_threshold", self.near_threshold is None or 0.0 < self.near_threshold <= 1.0,
                 "in (0, 1], e.g. 0.95"),
                ("pixel_threshold", 0.0 < self.pixel_threshold <= 1.0, "in (0, 1], e.g. 0.99"),
                ("folds", self.folds >= 2, "at least 2, e.g. 5"),
                ("probe_l2", self.probe_l2 is None or 0.0 <= self.probe_l2 < math.inf, "finite and >= 0"),
                ("outlier_z", 0.0 < self.outlier_z < math.inf, "finite and > 0, e.g. 5"),
                ("min_side", self.min_side >= 0, ">= 0"),
                ("max_aspect", 1.0 <= self.max_aspect < math.inf, "finite and >= 1, e.g. 3")):
            if not ok:
                raise ValueError(f"{name}={getattr(self, name)} must be {allowed}")
        return self


@dataclass
class Finding:
    """One row of findings.csv. ``path`` relative to the data root (``""`` for folder-wide findings)."""

    path: str
    finding: str
    score: float
    other: str = ""
    split: str = ""
    label: str = ""
    detail: str = ""


@dataclass
class DoctorResult:
    """What :func:`run_doctor` found: ``findings`` sorted (FINDING_ORDER, then score, highest first)."""

    root: str
    classes: list[str]
    counts: dict[str, dict[str, int]]
    findings: list[Finding]
    options: DoctorOptions
    images: int
    # every labelled image, most suspicious first: (relative path, given class, suggested class, score)
    label_ranking: list[tuple[str, str, str, float]] = field(default_factory=list)
    probe_accuracy: float = math.nan      # out-of-fold accuracy of the linear probe
    probe_l2: float = math.nan            # its L2 strength (chosen by its held-out loss unless options set it)
    # each fold's strength (labels.fold_strengths: folds 0 and 1 may differ from the rest); empty: no probe ran
    probe_fold_l2: list[float] = field(default_factory=list)
    seconds: dict[str, float] = field(default_factory=dict)
    feature_cache_hits: int = 0
    near_used: float = math.nan           # the feature threshold the duplicate check used (see near_threshold)

    def by_kind(self) -> dict[str, int]:
        """Number of findings of each kind, in FINDING_ORDER (kinds with none included)."""
        out = {k: 0 for k in FINDING_ORDER}
        for f in self.findings:
            out[f.finding] = out.get(f.finding, 0) + 1
        return out


# -------------------------------------------------------------------------------------- csv, exclude
def write_findings_csv(findings: Iterable[Finding], path: str | Path) -> None:
    """findings.csv: CSV_COLUMNS, one row per finding, UTF-8 (atomic)."""
    rows = ([printable_name(str(d[c])) if isinstance(d[c], str) else d[c] for c in CSV_COLUMNS]
            for d in map(asdict, findings))
    atomic_write_text(path, csv_text([CSV_COLUMNS, *rows]))


def read_exclude_file(path: str | Path, kinds: Sequence[str] = EXCLUDE_KINDS) -> list[str]:
    """Paths listed in ``path``: a findings.csv (its ``path`` column, rows of ``kinds`` only) or a
    plain list (one path per line, ``#`` comments). Paths are returned as written (relative to the data
    folder, or absolute).

    Raises:
        ValueError: the file cannot be read or holds no path.
    """
    try:
        text = read_user_text(path)
    except UnicodeDecodeError:
        raise ValueError(f"cannot read the exclude file {path}: it is not UTF-8 text (nor UTF-16/32 with a "
                         "byte-order mark); save it as UTF-8") from None
    except OSError as e:
        raise ValueError(f"cannot read the exclude file {path}: {e}") from None
    lines = text.splitlines()
    out: list[str] = []
    if lines and lines[0].strip().split(",")[:2] == ["path", "finding"]:
        for row in csv.DictReader(io.StringIO(text)):
            if row.get("path") and row.get("finding") in kinds:
                out.append(row["path"])
    else:
        out = [ln.strip() for ln in lines if ln.strip() and not ln.lstrip().startswith("#")]
    return list(dict.fromkeys(out))


def exclude_list_text(paths: Iterable[str]) -> str:
    """A plain exclude list of ``paths`` (a run's exclude.txt), one a line, as :func:`read_exclude_file` reads it
    back: a newline or tab in a name written escaped (``\\n``, as printed), and a path beginning with ``#`` (a
    class folder ``#cats``, as scraped datasets name them) written ``./#cats/...``: read as a comment, its image
    trained again when the run was resumed (review)."""
    lines = [printable(p) for p in paths]
    return "".join(f"./{ln}\n" if ln.lstrip().startswith("#") else f"{ln}\n" for ln in lines)


class Excluded(NamedTuple):
    """What :func:`exclude_items` left out."""

    removed: int                # images removed from train and val
    unmatched: list[str]        # listed paths that are no train/val image and no folder of any
    folders: dict[str, int]     # listed folders (relative) -> the images under them removed


def exclude_items(report: Any, paths: Sequence[str]) -> Excluded:
    """Drop ``paths`` (relative to the report's root, or absolute) from its train and val sets in place. A
    listed folder drops every image under it: the doctor's row for a folder it could not read (``unreadable``,
    "folder cannot be read") excludes that folder's images once it is readable, as the row of an unreadable
    image excludes the image once it is fixed; a folder in a plain list is read the same way (as .gitignore or
    ``rsync --exclude`` read one).

    Returns:
        (images removed, the listed paths that matched no train/val image or folder, listed folders -> images).
    """
    # Compared as printable names: findings.csv and exclude.txt write a name that is not UTF-8 as \xNN (exclude.txt
    # a newline or tab in a name as \n, \t: one path a line; findings.csv keeps them, quoted). A listed
    # path no image has exactly matches by path_key (the folder renamed into the other Unicode form since, as a
    # resumed run's exclude.txt finds it after a copy through macOS, or trimmed of whitespace at an end), never
    # the twin of an image listed exactly.
    wanted = {printable_name(os.path.normpath(p if os.path.isabs(p) else os.path.join(report.root, p))) for p in paths}
    exact = {p: printable_name(os.path.normpath(p)) for s in (report.train, report.val) for p, _ in s.items}
    hits = listed_names(wanted, exact.values())     # a name listed exactly, or as printed (\n for a newline)
    norms = {p: printable(n) for p, n in exact.items()}
    by_key = {path_key(printable(w)): w for w in wanted - set(hits.values())}
    seen: set[str] = set()
    folders: dict[str, int] = {}
    removed = 0
    for s in (report.train, report.val):
        keep = []
        for p, y in s.items:
            listed = hits.get(exact[p]) or by_key.get(path_key(norms[p]))
            folder = _listed_folder(norms[p], by_key) if listed is None and by_key else None
            if folder is not None:
                folders[folder] = folders.get(folder, 0) + 1
            if (listed or folder) is not None:
                seen.add(listed or folder)
                removed += 1
            else:
                keep.append((p, y))
        s.items[:] = keep
    unmatched = sorted(report.relpath(p) for p in wanted - seen)
    return Excluded(removed, unmatched, {report.relpath(f): n for f, n in sorted(folders.items())})


def _listed_folder(path: str, by_key: dict[str, str]) -> str | None:
    """The listed folder (a value of ``by_key``, keyed by ``path_key``) that holds ``path``, nearest first."""
    folder, parent = path, os.path.dirname(path)
    while parent != folder:
        folder, parent = parent, os.path.dirname(parent)
        if path_key(folder) in by_key:
            return by_key[path_key(folder)]
    return None
