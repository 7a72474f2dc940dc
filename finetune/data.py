"""Image folders: scan + validate, split, decode, transforms from the model's data config, loaders.

The scan happens before any model is loaded, so fatal problems (no images, fewer than 2 classes,
train/val class sets that cannot be matched) fail in seconds with one clear ``DataError``. Files that
cannot be used are listed (``bad_files``) and skipped; images that only fail at full decode are caught
per image in ``ImageDataset`` (``__getitem__`` returns None, ``collate_skip_none`` drops it).

In memory every path is usable as is (``root`` joined with the relative path); on disk (scan.json,
split.json, bad_files.txt) paths are relative to the data root, with ``/`` separators.
"""
from __future__ import annotations

import errno
import hashlib
import io
import json
import math
import os
import random
import tempfile
import warnings
import weakref
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import torch
from PIL import Image, ImageOps, UnidentifiedImageError
from torch.utils.data import Dataset

from finetune.errors import ConfigError, DataError
from finetune.io import atomic_write_text

__all__ = [
    "IMAGE_EXTENSIONS",
    "ImageSet",
    "ScanReport",
    "scan_folder",
    "write_scan",
    "load_image",
    "load_image_tensor",
    "read_image_bytes",
    "to_uint8_tensor",
    "device_decodable",
    "build_transform",
    "ImageTransform",
    "DeviceNormalize",
    "DeviceAugment",
    "to_device_batch",
    "ImageDataset",
    "collate_skip_none",
    "make_loader",
    "class_weights",
    "resolve_workers",
]

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")
# Debris from archivers, file managers and NAS boxes; names starting with "." are ignored as well.
IGNORED_NAMES = frozenset({"__MACOSX", "Thumbs.db", "desktop.ini", "@eaDir", "__pycache__"})
VAL_NAMES = ("val", "valid", "validation")
IMBALANCE_WARN = 3.0        # warn when the largest class has more than this many times the smallest
SPLIT_FILE_VERSION = 1
_JPEG_TAIL = 64 * 1024      # bytes searched for the JPEG end marker (some cameras append data after it)


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
        return _rel(path, self.root)

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable summary (paths relative to ``root``)."""
        # Printable names: scan.json is a report, and must encode as UTF-8 even for non-UTF-8 file names.
        ratio = self.imbalance()
        return {
            "root": _printable(self.root),
            "layout": self.layout,
            "classes": [_printable(c) for c in self.classes],
            "counts": {k: {_printable(c): n for c, n in v.items()} for k, v in self.counts().items()},
            "images": {name: len(s) for name, s in self.sets().items()},
            "imbalance": None if math.isinf(ratio) else round(ratio, 3),
            "seed": self.seed,
            "val_split": self.val_split,
            "bad_files": [{"path": _printable(self.relpath(p)), "reason": r} for p, r in self.bad_files],
            "warnings": list(self.warnings),
            "fingerprint": self.fingerprint(),
        }


def _split_lines(report: ScanReport) -> Iterable[str]:
    for name, s in report.sets().items():
        for path, label in s.items:
            yield f"{name}\t{report.relpath(path)}\t{s.classes[label]}"


def _rel(path: str, root: str) -> str:
    try:
        rel = os.path.relpath(path, root)
    except ValueError:          # another drive on Windows
        return path
    return path if rel.startswith("..") else rel.replace(os.sep, "/")


def _printable(text: str) -> str:
    """Non-UTF-8 file names arrive as surrogate escapes; show their bytes instead of failing to encode."""
    return text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


# -------------------------------------------------------------------------------------- scanning
def _ignored(name: str) -> bool:
    return name.startswith(".") or name in IGNORED_NAMES


def _walk_images(top: str, loops: list[str]) -> list[str]:
    """Every non-ignored file below ``top`` (symlinks followed), sorted; symlink loops are skipped.

    Anything that is not a directory counts as a file, so broken and looping file links are reported
    as bad files rather than silently vanishing.
    """
    out: list[str] = []
    visited: set[tuple[int, int]] = set()

    def walk(d: str, real: str) -> None:
        try:
            st = os.stat(d)
        except OSError:
            return
        key = (st.st_dev, st.st_ino)
        if key in visited:       # reached twice through links: count its files once
            return
        visited.add(key)
        try:
            entries = sorted(os.scandir(d), key=lambda e: e.name)
        except OSError:
            return
        for e in entries:
            if _ignored(e.name):
                continue
            try:
                is_dir = e.is_dir()          # follows symlinks; False for broken or looping links
            except OSError:
                is_dir = False
            if not is_dir:
                out.append(e.path)
                continue
            sub_real = os.path.realpath(e.path)
            # A link to this folder or one of its ancestors would walk forever (or pull in other classes).
            if e.is_symlink() and (sub_real == real or real.startswith(sub_real.rstrip(os.sep) + os.sep)):
                loops.append(e.path)
                continue
            walk(e.path, sub_real)

    walk(top, os.path.realpath(top))
    return sorted(out)


def _check_file(path: str) -> str | None:
    """Cheap validity check of one file; returns why it cannot be used, or None when it looks fine."""
    ext = os.path.splitext(path)[1].lower()
    if os.path.islink(path) and not os.path.exists(path):
        return "broken or looping symbolic link"
    if ext not in IMAGE_EXTENSIONS:
        return f"not an image file type ({ext or 'no extension'})"
    try:
        size = os.path.getsize(path)
        if size == 0:
            return "empty file (0 bytes)"
        with Image.open(path) as im:
            w, h = im.size
            fmt = im.format
            if w < 1 or h < 1:
                return f"invalid image size {w}x{h}"
            limit = Image.MAX_IMAGE_PIXELS
            # PIL only warns between 1x and 2x its limit; both are rejected here.
            if limit and w * h > limit:
                return f"too many pixels ({w}x{h}, over the decompression-bomb limit of {limit})"
            im.verify()   # PNG: chunk CRCs to the end of file; others: header sanity
        if fmt == "JPEG" and not _jpeg_has_end(path, size):
            # Truncated JPEGs pass the header checks; only a decode proves them (done for suspects only).
            with Image.open(path) as im:
                im.load()
    except Image.DecompressionBombError as e:
        return f"too many pixels, over the decompression-bomb limit ({e})"
    except UnidentifiedImageError:
        return "not a readable image (unrecognised or damaged format)"
    except OSError as e:
        if e.errno == errno.ELOOP:
            return "broken or looping symbolic link"
        return f"cannot read: {e.strerror or e}"
    except Exception as e:  # PIL raises SyntaxError/ValueError/struct.error on malformed headers
        return f"damaged image ({type(e).__name__}: {e})"
    return None


def _jpeg_has_end(path: str, size: int) -> bool:
    with open(path, "rb") as fh:
        fh.seek(max(0, size - _JPEG_TAIL))
        return b"\xff\xd9" in fh.read()


def _list_classes(folder: str) -> list[str]:
    try:
        entries = os.scandir(folder)
    except OSError as e:
        raise DataError(f"cannot list {folder}: {e.strerror}; check the path and its permissions") from None
    with entries:
        return sorted(e.name for e in entries if not _ignored(e.name) and _is_dir(e))


def _is_dir(entry: os.DirEntry) -> bool:
    try:
        return entry.is_dir()
    except OSError:
        return False


def _collect(folder: str, loops: list[str]) -> dict[str, list[str]]:
    """class name -> files (not yet checked) for ``folder/<class>/**``."""
    return {c: _walk_images(os.path.join(folder, c), loops) for c in _list_classes(folder)}


def _check_all(files: Sequence[str]) -> list[str | None]:
    # The filter is set once here, not per file: catch_warnings is process-global and not thread-safe.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)   # _check_file reports these
        if len(files) < 64:
            return [_check_file(f) for f in files]
        # Header reads are I/O bound (network drives especially); threads overlap the waits.
        with ThreadPoolExecutor(max_workers=8) as pool:
            return list(pool.map(_check_file, files, chunksize=32))


def _detect_layout(root: str) -> tuple[str, str | None, str | None]:
    """-> (train folder, val folder or None, test folder or None)."""
    subdirs = set(_list_classes(root))
    val = next((os.path.join(root, v) for v in VAL_NAMES if v in subdirs), None)
    test = os.path.join(root, "test") if "test" in subdirs else None
    if "train" in subdirs and (val is not None or subdirs <= {"train", "test"}):
        return os.path.join(root, "train"), val, test
    return root, None, None


def _hash_key(seed: int, rel: str) -> str:
    return hashlib.sha256(f"{seed}:{rel}".encode("utf-8", "surrogatepass")).hexdigest()


def _stratified_split(files: dict[str, list[str]], val_split: float, seed: int, root: str
                      ) -> tuple[dict[str, list[str]], dict[str, list[str]], list[str]]:
    """Per class, hold out round(n * val_split) files (at least 1 when n >= 2, never all).

    Files are ordered by a seeded hash of their relative path, so the split does not depend on listing
    order and adding a file moves few others.
    """
    train: dict[str, list[str]] = {}
    val: dict[str, list[str]] = {}
    notes: list[str] = []
    for cls, paths in files.items():
        order = sorted(paths, key=lambda p: _hash_key(seed, _rel(p, root)))
        n = len(order)
        n_val = min(max(round(n * val_split), 1 if n >= 2 else 0), n - 1) if n else 0
        val[cls], train[cls] = sorted(order[:n_val]), sorted(order[n_val:])
        if n == 1:
            notes.append(f"class '{_printable(cls)}' has only 1 image: none held out for validation")
    return train, val, notes


def _image_set(by_class: dict[str, list[str]], classes: list[str]) -> ImageSet:
    index = {c: i for i, c in enumerate(classes)}
    return ImageSet([(p, index[c]) for c in classes for p in by_class.get(c, [])], list(classes))


def _names(items: Iterable[str], limit: int = 5) -> str:
    items = [_printable(i) for i in items]
    more = f" and {len(items) - limit} more" if len(items) > limit else ""
    return ", ".join(items[:limit]) + more


def scan_folder(root: str | Path, val_split: float = 0.2, seed: int = 0, strict: bool = False,
                split_file: str | Path | None = None) -> ScanReport:
    """Scan and validate an image folder; make (or reuse) the train/val split.

    Accepts ``root/train/<class>/*`` + ``root/val/<class>/*`` (+ optional ``root/test/<class>/*``), or
    ``root/<class>/*`` (then a stratified, seeded ``val_split`` is held out per class).

    Args:
        root: the data folder.
        val_split: fraction of each class held out for validation (flat layout only).
        seed: seeds the split.
        strict: unreadable files are a DataError instead of being skipped with a warning.
        split_file: a split.json written by ``write_scan``; when it exists its split is reused.

    Returns:
        ScanReport (absolute paths; warnings for skipped files, empty classes, imbalance...).

    Raises:
        DataError: no images, fewer than 2 classes, a val/test class missing from train, a damaged
            split file, or (strict) any unreadable file.
    """
    root_s = os.path.abspath(os.fspath(root))
    if not os.path.isdir(root_s):
        raise DataError(f"data folder {_printable(root_s)} does not exist or is not a folder; "
                        "pass --data DIR with one sub-folder per class")
    train_dir, val_dir, test_dir = _detect_layout(root_s)
    layout = "split" if val_dir else "flat"
    if layout == "flat" and not 0.0 < val_split < 1.0:
        raise ConfigError(f"invalid val_split={val_split!r}: use a fraction between 0 and 1, e.g. 0.2")
    warn: list[str] = []
    if train_dir != root_s:
        used = {os.path.basename(d) for d in (train_dir, val_dir, test_dir) if d}
        others = [d for d in _list_classes(root_s) if d not in used]
        if others:
            warn.append(f"ignored folder(s) {_names(others)} next to train/ (only train/, val/, test/ are read)")
    loops: list[str] = []
    stray: list[str] = []
    if train_dir == root_s:
        with os.scandir(root_s) as entries:
            stray = [e.name for e in entries if not _ignored(e.name) and not _is_dir(e)]

    raw = {"train": _collect(train_dir, loops)}
    if val_dir:
        raw["val"] = _collect(val_dir, loops)
    if test_dir:
        raw["test"] = _collect(test_dir, loops)

    all_files = [p for split in raw.values() for paths in split.values() for p in paths]
    reasons = dict(zip(all_files, _check_all(all_files)))
    bad = [(p, r) for p, r in reasons.items() if r is not None]
    good = {name: {c: [p for p in ps if reasons[p] is None] for c, ps in split.items()}
            for name, split in raw.items()}

    n_good = sum(len(ps) for split in good.values() for ps in split.values())
    if n_good == 0:
        found = f" ({len(bad)} unreadable files)" if bad else ""
        if stray:   # the commonest mistake: images straight in DIR, no class folders
            found += f" ({len(stray)} files directly in the folder are not in class folders)"
        raise DataError(f"no images found in {_printable(root_s)}{found}; expected DIR/<class>/*.jpg or "
                        f"DIR/train/<class>/ + DIR/val/<class>/ ({', '.join(IMAGE_EXTENSIONS)})")
    if bad and strict:
        raise DataError(f"{len(bad)} unreadable files, e.g. {_printable(_rel(bad[0][0], root_s))} "
                        f"({bad[0][1]}); fix or remove them, or drop --strict to skip them")

    # Classes are the training folders that hold at least one usable image.
    empty = [c for c, ps in good["train"].items() if not ps]
    classes = [c for c, ps in good["train"].items() if ps]
    for name in ("val", "test"):
        if name not in good:
            continue
        orphans = [c for c, ps in good[name].items() if ps and c not in classes]
        if orphans:
            raise DataError(f"class(es) {_names(orphans)} in {name}/ have no training images in "
                            f"{_printable(_rel(train_dir, root_s) if train_dir != root_s else root_s)}; "
                            f"add train/<class>/ images or remove them from {name}/")
    if len(classes) < 2:
        what = f"only 1 class ({_printable(classes[0])})" if classes else "no class folders with images"
        hint = f"; {len(stray)} files directly in the folder were ignored" if stray else ""
        raise DataError(f"found {what} in {_printable(root_s)}{hint}; a classifier needs at least 2 class "
                        "folders, e.g. DIR/cat/*.jpg and DIR/dog/*.jpg")
    if empty:
        warn.append(f"empty class folder(s) {_names(empty)} left out (no usable images)")
    if stray:
        warn.append(f"{len(stray)} files directly in {_printable(root_s)} ignored "
                    "(images must be in DIR/<class>/)")
    if loops:
        warn.append(f"skipped {len(loops)} symbolic-link loop(s), e.g. {_printable(_rel(loops[0], root_s))}")
    if bad:
        warn.append(f"skipped {len(bad)} unreadable or non-image files, e.g. "
                    f"{_printable(_rel(bad[0][0], root_s))} ({bad[0][1]}); all are listed in bad_files.txt")

    train_files = {c: good["train"][c] for c in classes}
    if layout == "split":
        val_files = {c: good["val"].get(c, []) for c in classes}
        report_split = None
    else:
        train_files, val_files, notes = _stratified_split(train_files, val_split, seed, root_s)
        warn.extend(notes)
        report_split = val_split
    test_set = _image_set({c: good["test"].get(c, []) for c in classes}, classes) if test_dir else None

    report = ScanReport(root_s, layout, classes, _image_set(train_files, classes),
                        _image_set(val_files, classes), test_set, sorted(bad), warn, seed, report_split)
    if split_file is not None and os.path.isfile(split_file):
        _apply_split_file(report, Path(split_file))

    if len(report.val) == 0:
        raise DataError(f"no validation images in {_printable(root_s)}: add DIR/val/<class>/ images, or use "
                        "DIR/<class>/ folders with at least 2 images per class so a split can be made")
    missing = [c for c, n in zip(report.classes, report.val.class_counts()) if n == 0]
    if missing:
        warn.append(f"class(es) {_names(missing)} have no validation images; their accuracy cannot be "
                    "measured (add val/<class>/ images)")
    ratio = report.imbalance()
    if ratio > IMBALANCE_WARN:
        counts = report.counts()["train"]
        big, small = max(counts, key=counts.get), min(counts, key=counts.get)
        warn.append(f"classes are imbalanced ({ratio:.1f}x: '{_printable(big)}' has {counts[big]} training "
                    f"images, '{_printable(small)}' {counts[small]}); consider --class-weights auto or "
                    "--sampler balanced")
    return report


# ---------------------------------------------------------------------------------- split files
def _split_payload(report: ScanReport) -> dict[str, Any]:
    def rows(s: ImageSet | None) -> list[list[str]] | None:
        return None if s is None else [[report.relpath(p), s.classes[label]] for p, label in s.items]

    return {"version": SPLIT_FILE_VERSION, "layout": report.layout, "seed": report.seed,
            "val_split": report.val_split, "classes": report.classes,
            "train": rows(report.train), "val": rows(report.val), "test": rows(report.test)}


def _apply_split_file(report: ScanReport, path: Path) -> None:
    """Reuse a saved split: unchanged files keep their side; added files are assigned by the seed."""
    try:
        saved = json.loads(path.read_text(encoding="utf-8"))
        old = {name: {rel: cls for rel, cls in saved[name]} for name in ("train", "val")}
        old_seed, old_split = int(saved["seed"]), saved.get("val_split")
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise DataError(f"split file {path} is damaged ({type(e).__name__}); delete it to make a new split") from None
    root, where = report.root, f"split file {path.name}"
    if saved.get("layout") != report.layout:
        report.warnings.append(f"{where} was made for a {saved.get('layout')} layout but the folder is now "
                               f"{report.layout}; using the folder's split")
        return
    current = {report.relpath(p): report.classes[label]
               for s in (report.train, report.val) for p, label in s.items}
    before = {**old["train"], **old["val"]}
    added = sorted(set(current) - set(before))
    removed = sorted(set(before) - set(current))
    relabelled = sorted(r for r in set(current) & set(before) if current[r] != before[r])
    if added or removed or relabelled:
        report.warnings.append(
            f"files changed since {where} was written: {len(added)} added, {len(removed)} removed or now "
            f"unreadable, {len(relabelled)} moved to another class; the unchanged files keep their split"
            + (" and new ones are split by the seed" if report.layout == "flat" and added else ""))
    if report.layout == "split":
        return   # the folders define the split; the file only told us what changed
    if old_seed != report.seed or (old_split is not None and abs(float(old_split) - (report.val_split or 0)) > 1e-9):
        report.warnings.append(f"reusing the split in {path.name} (val_split={old_split}, seed={old_seed}); "
                               "delete it for a new split with the current options")
        report.seed, report.val_split = old_seed, old_split
    frac = float(old_split if old_split is not None else 0.2)
    index = {c: i for i, c in enumerate(report.classes)}
    train, val = [], []
    for rel, cls in sorted(current.items(), key=lambda kv: (index[kv[1]], kv[0])):
        p = os.path.join(root, rel)
        if rel in old["val"] and rel not in relabelled:
            side = val
        elif rel in old["train"] and rel not in relabelled:
            side = train
        else:   # new file: a seeded hash decides, holding out about ``frac`` of them
            side = val if int(_hash_key(report.seed, rel)[:8], 16) / 0xFFFFFFFF < frac else train
        side.append((p, index[cls]))
    report.train = ImageSet(train, list(report.classes))
    report.val = ImageSet(val, list(report.classes))


def write_scan(report: ScanReport, run_dir: str | Path) -> None:
    """Write ``scan.json``, ``split.json`` and ``bad_files.txt`` (one ``path<TAB>reason`` per line)."""
    run_dir = Path(run_dir)
    atomic_write_text(run_dir / "scan.json", json.dumps(report.to_dict(), indent=2) + "\n")
    # ensure_ascii keeps non-UTF-8 names (surrogate escapes) round-trippable through json.loads.
    atomic_write_text(run_dir / "split.json", json.dumps(_split_payload(report)) + "\n")
    lines = [f"{_printable(report.relpath(p))}\t{r}\n" for p, r in report.bad_files]
    atomic_write_text(run_dir / "bad_files.txt", "".join(lines))


# -------------------------------------------------------------------------------------- decoding
def _to_rgb(im: Image.Image) -> Image.Image:
    """Any PIL mode -> 8-bit RGB: transparency composited on white, 16/32-bit scaled (not clipped)."""
    import numpy as np

    mode = im.mode
    if mode == "RGB":
        return im
    if mode.startswith("I;16") or mode in ("I", "F"):
        a = np.asarray(im).astype(np.float64)
        if mode.startswith("I;16"):
            a = a / 257.0                          # 65535 -> 255 exactly
        elif mode == "F" and a.size and a.max() <= 1.0 and a.min() >= 0.0:
            a = a * 255.0
        elif a.size and (a.max() > 255 or a.min() < 0):
            hi = 65535.0 if a.min() >= 0 and a.max() <= 65535 else a.max()
            lo = 0.0 if hi == 65535.0 else a.min()
            a = (a - lo) * (255.0 / max(hi - lo, 1e-12))
        return Image.fromarray(np.clip(np.rint(a), 0, 255).astype(np.uint8), "L").convert("RGB")
    if mode == "P" and "transparency" in im.info:
        im = im.convert("RGBA")
    elif mode == "P":
        return im.convert("RGB")
    if mode in ("LA", "La", "PA", "RGBa"):
        im = im.convert("RGBA")
    if im.mode == "RGBA":
        background = Image.new("RGB", im.size, (255, 255, 255))
        background.paste(im, mask=im.getchannel("A"))
        return background
    return im.convert("RGB")                       # L, 1, CMYK, YCbCr, LAB, HSV


def load_image(path: str | Path, min_size: int | None = None) -> Image.Image:
    """Decode an image file to an upright 8-bit RGB PIL image (first frame of animations).

    Args:
        path: the image file.
        min_size: big JPEGs are decoded at a reduced scale (PIL ``draft``) while both sides stay at
            least this large; None decodes at full size.

    Raises:
        DataError: the file cannot be read or decoded, or exceeds PIL's decompression-bomb limit.
    """
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as im:
                if getattr(im, "n_frames", 1) > 1:
                    im.seek(0)
                if min_size and im.format == "JPEG":
                    im.draft("RGB", (int(min_size), int(min_size)))
                im.load()
                try:
                    upright = ImageOps.exif_transpose(im)    # a new image: safe after the file closes
                except Exception:   # malformed EXIF: the pixels are fine, use them as stored
                    upright = None
                return _to_rgb(upright if upright is not None else im.copy())
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise DataError(f"{_printable(str(path))} has too many pixels (over PIL's decompression-bomb limit); "
                        "resize or remove it") from None
    except UnidentifiedImageError:
        raise DataError(f"{_printable(str(path))} is not a readable image; fix or remove it") from None
    except OSError as e:
        raise DataError(f"cannot decode {_printable(str(path))}: {e}; fix or remove the file") from None
    except Exception as e:  # malformed files raise SyntaxError / ValueError / struct.error inside PIL
        raise DataError(f"cannot decode {_printable(str(path))} ({type(e).__name__}: {e}); "
                        "fix or remove the file") from None


_SOI = b"\xff\xd8\xff"
_ORIENTATION = 0x0112


def device_decodable(data: bytes, min_size: int | None = None) -> bool:
    """True for a JPEG that ``torchvision.io.decode_jpeg`` turns into the same upright RGB image as
    ``load_image``: baseline (progressive JPEGs take nvJPEG's slow host path), RGB or greyscale (not
    CMYK/YCCK), no EXIF rotation, within PIL's decompression-bomb limit, and, given ``min_size``, not so
    large that ``load_image`` would decode it at a reduced scale (PIL ``draft``: cheaper than a full-size
    decode)."""
    if not data.startswith(_SOI):
        return False
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as im:     # header only: no pixel is decoded here
                if im.format != "JPEG" or im.mode not in ("RGB", "L") or im.info.get("progressive"):
                    return False
                if min_size and min(im.size) >= 2 * int(min_size):
                    return False
                return int(im.getexif().get(_ORIENTATION, 1) or 1) == 1
    except Exception:        # unreadable header, bomb, odd EXIF: load_image decides (and reports)
        return False


def read_image_bytes(path: str | Path) -> bytes:
    """The file's bytes. Raises DataError (one line, what to do) when it cannot be read."""
    try:
        return Path(path).read_bytes()
    except OSError as e:
        raise DataError(f"cannot read {_printable(str(path))}: {e.strerror or e}; fix or remove the file") from None


def to_uint8_tensor(im: Image.Image) -> torch.Tensor:
    """An RGB PIL image -> a writable uint8 tensor (3, H, W)."""
    import numpy as np

    rgb = im if im.mode == "RGB" else im.convert("RGB")
    return torch.from_numpy(np.array(rgb, dtype=np.uint8)).permute(2, 0, 1).contiguous()


def load_image_tensor(path: str | Path, min_size: int | None = None) -> torch.Tensor:
    """``load_image`` as a uint8 tensor (3, H, W): plain JPEGs (:func:`device_decodable`) are decoded by
    ``torchvision.io.decode_jpeg`` (libjpeg-turbo, 1.2x PIL's decode here), everything else by
    ``load_image``. Raises DataError like ``load_image``."""
    data = read_image_bytes(path)
    if device_decodable(data, min_size):
        from torchvision.io import ImageReadMode, decode_jpeg
        try:
            return decode_jpeg(torch.frombuffer(bytearray(data), dtype=torch.uint8), mode=ImageReadMode.RGB)
        except RuntimeError:
            pass                  # let PIL decide: it reads some files libjpeg's strict mode rejects
    return to_uint8_tensor(load_image(path, min_size))


# ------------------------------------------------------------------------------------ transforms
_INTERPOLATIONS = ("nearest", "bilinear", "bicubic", "box", "hamming", "lanczos")


class _LimitAspect:
    """Centre-crop the long side to at most ``ratio`` x the short side before an eval resize.

    The eval centre crop keeps only the middle of the image anyway, so this changes nothing visible for
    ordinary photos but stops a 20000x10 strip from being resized into a gigantic intermediate.
    """

    def __init__(self, ratio: float = 2.0) -> None:
        self.ratio = ratio

    def __call__(self, im):
        tensor = isinstance(im, torch.Tensor)
        h, w = tuple(im.shape[-2:]) if tensor else (im.size[1], im.size[0])
        short = min(w, h)
        limit = max(1, int(math.ceil(short * self.ratio)))
        if max(w, h) <= limit:
            return im
        if w > h:
            left = (w - limit) // 2
            return im[..., :, left:left + limit] if tensor else im.crop((left, 0, left + limit, h))
        top = (h - limit) // 2
        return im[..., top:top + limit, :] if tensor else im.crop((0, top, w, top + limit))

    def __repr__(self) -> str:
        return f"{type(self).__name__}(ratio={self.ratio})"


class ImageTransform:
    """A transform pipeline plus ``min_size``: the smallest side a decoded image needs (for ``draft``).

    ``output``: "float" (normalised float32) or "uint8" (0-255 pixels; ``mean``/``std`` are then applied
    on the device by :class:`DeviceNormalize`). ``tensor_input``: the pipeline works on uint8 tensors
    (``ImageDataset`` then decodes with :func:`load_image_tensor`); PIL images are accepted either way.
    """

    def __init__(self, pipeline: Callable, min_size: int, train: bool, *, output: str = "float",
                 mean: tuple = (), std: tuple = (), tensor_input: bool = False) -> None:
        self.pipeline = pipeline
        self.min_size = min_size
        self.train = train
        self.output = output
        self.mean = tuple(mean)
        self.std = tuple(std)
        self.tensor_input = tensor_input

    def __call__(self, im: Image.Image):
        return self.pipeline(im)

    def __repr__(self) -> str:
        # The float repr is unchanged (it is part of feature-cache keys); uint8 says so and names mean/std.
        extra = f"output=uint8, mean={self.mean}, std={self.std}, " if self.output == "uint8" else ""
        return f"ImageTransform(train={self.train}, min_size={self.min_size}, {extra}{self.pipeline!r})"


def _parse_data_config(data_config: dict) -> tuple[tuple[int, int], str, float, tuple, tuple]:
    try:
        size = tuple(int(x) for x in data_config["input_size"])[-2:]
        mean = tuple(float(x) for x in data_config["mean"])
        std = tuple(float(x) for x in data_config["std"])
    except (KeyError, TypeError, ValueError) as e:
        raise ConfigError(f"data config needs input_size, mean and std (problem: {e}); "
                          "check the model's preprocessing entry") from None
    interp = str(data_config.get("interpolation") or "bilinear").lower()
    if interp == "random":       # timm's train-time random choice; a fixed one keeps runs reproducible
        interp = "bilinear"
    if interp not in _INTERPOLATIONS:
        raise ConfigError(f"data config interpolation {interp!r} is unknown; use one of {', '.join(_INTERPOLATIONS)}")
    crop_pct = float(data_config.get("crop_pct") or 0.875)
    if len(size) != 2 or min(size) < 1 or len(mean) != 3 or len(std) != 3 or min(std) <= 0 or not 0 < crop_pct <= 1:
        raise ConfigError(f"data config is invalid (input_size={data_config.get('input_size')}, mean={mean}, "
                          f"std={std}, crop_pct={crop_pct}); check the model's preprocessing entry")
    return (size[0], size[1]), interp, crop_pct, mean, std


def build_transform(data_config: dict, train: bool, config: Any | None = None, *,
                    output: str = "float", colour_on_device: bool = False) -> ImageTransform:
    """PIL image -> normalised float tensor (3, H, W) following the model's timm-style data config.

    Evaluation: resize to ``size / crop_pct`` (shorter side) + centre crop, as timm does. Training (with
    ``config.augment``): RandomResizedCrop(scale=(crop_scale_min, 1)), horizontal flip (``hflip``),
    brightness/contrast jitter; a 0 switches one off (``crop_scale_min=1`` switches the random crop off).

    ``output="uint8"`` stops before the float conversion: the same steps and random draws, a uint8 tensor
    (3, H, W) out (4x fewer bytes through worker queues and to the GPU); :class:`DeviceNormalize` /
    :func:`to_device_batch` then apply ``x / 255``, mean and std on the device with the same float32
    operations, so the model sees the same values.

    ``colour_on_device`` (uint8 output only) leaves the flip and the brightness/contrast jitter out of
    the pipeline: :class:`DeviceAugment` applies them to the whole batch on the device (``fit`` does so
    on CUDA), and the workers only decode, crop and resize.

    Raises:
        ConfigError: the data config lacks input_size/mean/std, names an unknown interpolation,
            ``output`` is not "float" or "uint8", or ``colour_on_device`` is asked of float output.
    """
    from torchvision.transforms import InterpolationMode
    from torchvision.transforms import v2 as T

    if output not in ("float", "uint8"):
        raise ConfigError(f"invalid transform output={output!r}: use float or uint8")
    if colour_on_device and output != "uint8":
        raise ConfigError("colour_on_device needs output='uint8' (the device normalises what it augments)")
    if config is None:
        from finetune.config import FinetuneConfig
        config = FinetuneConfig()
    (h, w), interp, crop_pct, mean, std = _parse_data_config(data_config)
    mode = InterpolationMode(interp)
    scale = (math.floor(h / crop_pct), math.floor(w / crop_pct))

    def fixed() -> list:
        # Square targets resize the shorter side (aspect kept); others resize to the exact scaled box.
        if h == w:
            return [_LimitAspect(2.0), T.Resize(scale[0], interpolation=mode, antialias=True),
                    T.CenterCrop((h, w))]
        return [T.Resize(scale, interpolation=mode, antialias=True), T.CenterCrop((h, w))]

    # uint8 output (the CUDA path) works on uint8 tensors from the start: torch's resize and jitter
    # kernels are 1.3x (train) / 2.1x (eval) PIL's per worker core (scripts/bench_decode.py), and the
    # dataset decodes plain JPEGs straight into a tensor (load_image_tensor). PIL inputs still work.
    # torch has no box/hamming resize: those stay on PIL images.
    tensor_input = output == "uint8" and interp not in ("box", "hamming")
    steps: list = [T.PILToTensor()] if tensor_input else []
    augment = train and bool(getattr(config, "augment", True))
    if augment and float(config.crop_scale_min) < 1.0:
        steps.append(T.RandomResizedCrop((h, w), scale=(float(config.crop_scale_min), 1.0), interpolation=mode,
                                         antialias=True))
    else:
        steps.extend(fixed())
    colour = augment and not colour_on_device
    if colour and float(config.hflip) > 0:
        steps.append(T.RandomHorizontalFlip(float(config.hflip)))
    if colour and (float(config.brightness) > 0 or float(config.contrast) > 0):
        steps.append(T.ColorJitter(brightness=float(config.brightness) or None,
                                   contrast=float(config.contrast) or None))
    if not tensor_input:
        steps.append(T.PILToTensor())
    if output == "float":
        steps += [T.ToDtype(torch.float32, scale=True), T.Normalize(mean, std)]
    return ImageTransform(T.Compose(steps), min_size=max(scale), train=train, output=output, mean=mean, std=std,
                          tensor_input=tensor_input)


class DeviceNormalize:
    """uint8 batches (N, 3, H, W) from ``build_transform(..., output="uint8")`` -> normalised float32 on
    the device: ``(x / 255 - mean) / std``, the float pipeline's own operations (``ToDtype`` multiplies
    by 1/255, ``Normalize`` subtracts then divides), so results match it to float rounding (bit for bit
    on CPU). The batch travels as uint8 (pinned memory makes the copy asynchronous).
    """

    def __init__(self, mean: Sequence[float], std: Sequence[float]) -> None:
        if len(mean) != 3 or len(std) != 3 or min(std) <= 0:
            raise ConfigError(f"DeviceNormalize needs 3 means and 3 positive stds (got {mean}, {std})")
        self.mean = tuple(float(m) for m in mean)
        self.std = tuple(float(s) for s in std)
        self._cache: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}

    @classmethod
    def from_data_config(cls, data_config: dict) -> "DeviceNormalize":
        _, _, _, mean, std = _parse_data_config(data_config)
        return cls(mean, std)

    def _stats(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        # Made once per device: a fresh host tensor per step would mean a small synchronous copy each time.
        if device not in self._cache:
            self._cache[device] = (torch.tensor(self.mean, dtype=torch.float32).view(1, 3, 1, 1).to(device),
                                   torch.tensor(self.std, dtype=torch.float32).view(1, 3, 1, 1).to(device))
        return self._cache[device]

    def __call__(self, x: torch.Tensor, device: torch.device | str, channels_last: bool = False) -> torch.Tensor:
        if x.dtype != torch.uint8:
            raise TypeError(f"DeviceNormalize expects a uint8 batch, got {x.dtype}; build the dataset's "
                            "transform with output='uint8'")
        device = torch.device(device)
        if device.type == "cuda" and device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        x = self.augment(x.to(device, non_blocking=True))
        if channels_last and x.dim() == 4:
            x = x.contiguous(memory_format=torch.channels_last)   # on uint8: 4x less to move than float
        mean, std = self._stats(device)
        return x.to(torch.float32).mul_(1.0 / 255).sub_(mean).div_(std)   # elementwise: keeps the layout

    def augment(self, x: torch.Tensor) -> torch.Tensor:
        """The uint8 batch on the device before normalisation: as is here (see :class:`DeviceAugment`)."""
        return x

    def __repr__(self) -> str:
        return f"DeviceNormalize(mean={self.mean}, std={self.std})"


class DeviceAugment(DeviceNormalize):
    """:class:`DeviceNormalize` preceded by the training flip and brightness/contrast jitter, run on the
    whole uint8 batch on the device instead of image by image in the workers.

    Same operations and parameters as ``build_transform``'s ``RandomHorizontalFlip(hflip)`` +
    ``ColorJitter(brightness, contrast)`` (factors uniform in [max(0, 1 - s), 1 + s], the two in random
    order; torchvision's uint8 arithmetic: blend in float, clamp, truncate; the same pixels but for a
    rare one-level rounding difference in the contrast blend, see :meth:`apply`; tested), drawn
    per image on the host from a private ``random.Random``: ``reseed`` it per epoch and a resumed run
    repeats the draws. Pair it with ``build_transform(..., output="uint8", colour_on_device=True)``,
    whose workers then only decode, crop and resize (about 1.5x the images per worker core on 500x375 JPEGs,
    scripts/bench_decode.py).
    """

    def __init__(self, mean: Sequence[float], std: Sequence[float], *, hflip: float = 0.0,
                 brightness: float = 0.0, contrast: float = 0.0, seed: int = 0,
                 rng: random.Random | None = None) -> None:
        super().__init__(mean, std)
        if not (0.0 <= hflip <= 1.0 and brightness >= 0.0 and contrast >= 0.0):   # FinetuneConfig checks fit's
            raise ConfigError(f"invalid device augmentation (hflip={hflip}, brightness={brightness}, "
                              f"contrast={contrast}): hflip is a probability, the strengths are >= 0")
        self.hflip, self.brightness, self.contrast = float(hflip), float(brightness), float(contrast)
        self.rng = rng if rng is not None else random.Random(int(seed))

    @classmethod
    def from_config(cls, data_config: dict, config: Any, train: bool = True) -> "DeviceAugment":
        """The flip/jitter ``build_transform(data_config, train, config)`` would apply (none for eval or
        ``augment=False``), seeded with ``config.seed``."""
        _, _, _, mean, std = _parse_data_config(data_config)
        on = train and bool(getattr(config, "augment", True))
        return cls(mean, std, hflip=float(config.hflip) if on else 0.0,
                   brightness=float(config.brightness) if on else 0.0,
                   contrast=float(config.contrast) if on else 0.0, seed=int(getattr(config, "seed", 0)))

    @property
    def active(self) -> bool:
        return self.hflip > 0 or self.brightness > 0 or self.contrast > 0

    def reseed(self, seed: int) -> None:
        # tagged: fit seeds Python's global ``random`` with the same epoch seed; this stream stays apart
        self.rng.seed(f"zoo.DeviceAugment:{int(seed)}")

    def draw(self, n: int) -> tuple[list[bool], list[list[tuple[str, float]]]]:
        """Per image: flip or not, and ColorJitter's brightness/contrast factors in its random order."""
        flips, ops = [], []
        for _ in range(n):
            flips.append(self.hflip > 0 and self.rng.random() < self.hflip)
            steps = []
            if self.brightness > 0 or self.contrast > 0:
                order = [0, 1] if self.rng.random() < 0.5 else [1, 0]
                b = self.rng.uniform(max(0.0, 1 - self.brightness), 1 + self.brightness) if self.brightness > 0 else None
                c = self.rng.uniform(max(0.0, 1 - self.contrast), 1 + self.contrast) if self.contrast > 0 else None
                steps = [("b", b) if k == 0 else ("c", c) for k in order if (b if k == 0 else c) is not None]
            ops.append(steps)
        return flips, ops

    @staticmethod
    def apply(x: torch.Tensor, flips: list[bool], ops: list[list[tuple[str, float]]]) -> torch.Tensor:
        """Flip + brightness/contrast on a uint8 batch (N, 3, H, W), each image with its own factors and
        order, with torchvision's uint8 arithmetic (its grey chain, ``1 - factor`` in double). One
        difference: torchvision's contrast blend adds ``(1 - f) * mean`` in one fused multiply-add, here
        in two roundings, so a rare pixel lands one level away. The per-image parameters reach the
        device as one small tensor (pinned, asynchronous on CUDA): no host sync per batch."""
        n = x.shape[0]
        steps = max((len(o) for o in ops), default=0)
        if not any(flips) and steps == 0:
            return x
        # columns: flip, then per step (is contrast, factor, 1 - factor); steps past an image's own
        # list are brightness 1 (a no-op)
        rows = [[float(f)] + [v for k in range(steps) for v in
                              ((float(o[k][0] == "c"), float(o[k][1]), 1.0 - float(o[k][1])) if k < len(o)
                               else (0.0, 1.0, 0.0))]
                for f, o in zip(flips, ops)]
        params = torch.tensor(rows, dtype=torch.float32)
        if x.device.type == "cuda":
            params = params.pin_memory()
        params = params.to(x.device, non_blocking=True).view(n, -1, 1, 1, 1)
        if any(flips):
            x = torch.where(params[:, 0].bool(), x.flip(-1), x)
        for step in range(steps):
            contrast, factor, rest = (params[:, 1 + 3 * step + k] for k in range(3))
            other = torch.zeros((), device=x.device)
            if any(step < len(o) and o[step][0] == "c" for o in ops):
                r, g, b = x.unbind(dim=1)          # torchvision's _rgb_to_grayscale_image, then floor
                grey = r.mul(0.2989).add_(g, alpha=0.587).add_(b, alpha=0.114).floor_().mean(dim=(-2, -1))
                other = torch.where(contrast.bool(), grey.view(n, 1, 1, 1), other)
            # brightness blends with black, contrast with the image's mean grey; factor 1 leaves it as is
            x = x.mul(factor).add_(other * rest).clamp_(0, 255).to(torch.uint8)
        return x

    def augment(self, x: torch.Tensor) -> torch.Tensor:
        if not self.active or x.dim() != 4 or x.shape[0] == 0:
            return x
        flips, ops = self.draw(x.shape[0])
        return self.apply(x, flips, ops)

    def __repr__(self) -> str:
        return (f"DeviceAugment(hflip={self.hflip}, brightness={self.brightness}, contrast={self.contrast}, "
                f"mean={self.mean}, std={self.std})")


def to_device_batch(x: torch.Tensor, device: torch.device | str, mean: Sequence[float], std: Sequence[float],
                    channels_last: bool = False) -> torch.Tensor:
    """A uint8 image batch -> normalised float32 on ``device`` (see :class:`DeviceNormalize`).

    Raises:
        TypeError: ``x`` is not uint8.
    """
    return DeviceNormalize(mean, std)(x, device, channels_last)


# -------------------------------------------------------------------------------- dataset/loader
class ImageDataset(Dataset):
    """``ImageDataset(image_set, transform)[i] -> (tensor, label)``, or None when image i fails to decode.

    Failures are recorded as ``index<TAB>reason`` lines in ``failure_log`` (a temp file unless given;
    appends from worker processes are safe), and ``failures()`` lists them as (path, reason).
    """

    def __init__(self, image_set: ImageSet, transform: Callable | None = None,
                 failure_log: str | Path | None = None) -> None:
        self.image_set = image_set
        self.transform = transform
        self.min_size = getattr(transform, "min_size", None)
        if failure_log is None:
            fd, failure_log = tempfile.mkstemp(prefix="zoo-decode-failures-", suffix=".tsv")
            os.close(fd)
            # Only the creating process removes it: workers get pickled copies without this finalizer.
            weakref.finalize(self, _unlink_quietly, failure_log)
        self.failure_log = str(failure_log)

    @property
    def classes(self) -> list[str]:
        return self.image_set.classes

    @property
    def targets(self) -> list[int]:
        return self.image_set.targets

    def __len__(self) -> int:
        return len(self.image_set.items)

    def __getitem__(self, index: int):
        path, label = self.image_set.items[index]
        try:
            if getattr(self.transform, "tensor_input", False):    # a tensor pipeline: decode to a tensor
                im = load_image_tensor(path, self.min_size)
            else:
                im = load_image(path, self.min_size)
            return (self.transform(im) if self.transform is not None else im), label
        except Exception as e:   # one bad image must not kill the batch or the worker
            reason = str(e) if isinstance(e, DataError) else f"{type(e).__name__}: {e}"
            line = f"{index}\t{_printable(reason)}".replace("\n", " ") + "\n"
            with open(self.failure_log, "a", encoding="utf-8") as fh:
                fh.write(line)
            return None

    def failures(self) -> list[tuple[str, str]]:
        """(path, reason) for every image that failed to decode so far, in dataset order."""
        seen: dict[int, str] = {}
        try:
            with open(self.failure_log, encoding="utf-8") as fh:
                for line in fh:
                    idx, _, reason = line.rstrip("\n").partition("\t")
                    if idx.isdigit():
                        seen.setdefault(int(idx), reason)
        except FileNotFoundError:
            pass
        return [(self.image_set.items[i][0], r) for i, r in sorted(seen.items()) if i < len(self)]


def _unlink_quietly(path: str) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass


def collate_skip_none(batch: list):
    """Default collate without the samples that failed to decode; None when the whole batch failed."""
    from torch.utils.data import default_collate

    batch = [b for b in batch if b is not None]
    return default_collate(batch) if batch else None


def resolve_workers(workers: int, device: str = "cpu") -> int:
    """The DataLoader worker count; a number >= 0 is used as given (0 = load in the main process).

    -1 (auto): on CUDA every usable core but one, shared between the processes of this node under
    torchrun (decoding is the bottleneck of a fed GPU: 8 -> 15 workers measured 1,415 -> 1,998 img/s on
    an H200 host, docs/benchmarks.md); elsewhere min(8, usable CPUs - 1), since on a CPU the workers
    compete with the training itself for the same cores.
    """
    if workers >= 0:
        return workers
    try:
        cpus = len(os.sched_getaffinity(0))   # respects container/cgroup CPU pinning
    except AttributeError:
        cpus = os.cpu_count() or 1
    if str(device).startswith("cuda"):
        local = max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1") or 1))
        return max(0, cpus // local - 1)
    return max(0, min(8, cpus - 1))


def class_weights(image_set: ImageSet) -> list[float]:
    """Inverse class frequency, normalised to mean 1 over classes with images (0 for empty classes)."""
    counts = image_set.class_counts()
    inv = [1.0 / c if c else 0.0 for c in counts]
    present = [v for v in inv if v]
    if not present:
        raise DataError("cannot compute class weights: the training set is empty; check the data folder")
    mean = sum(present) / len(present)
    return [v / mean for v in inv]


def make_loader(dataset, batch_size: int, *, train: bool, workers: int = -1, device: str = "cpu",
                sampler: str = "random", distributed: bool = False, seed: int = 0):
    """A seeded DataLoader that drops undecodable samples (``collate_skip_none``, or the dataset's own
    ``collate_fn`` attribute when it has one).

    Train loaders shuffle (``sampler="random"``) or oversample rare classes (``"balanced"``:
    WeightedRandomSampler, inverse class frequency, needs ``dataset.targets``) and drop a last partial
    batch (a batch of 1 breaks BatchNorm in train mode). With ``distributed`` a DistributedSampler is used:
    call ``loader.sampler.set_epoch(epoch)`` each epoch. Workers persist across epochs; memory is pinned
    for CUDA. A batch whose every image failed comes out as None: skip it.

    Raises:
        ConfigError: unknown sampler, or ``balanced`` with ``distributed``.
    """
    from torch.utils.data import DataLoader, DistributedSampler, WeightedRandomSampler

    if sampler not in ("random", "balanced"):
        raise ConfigError(f"invalid sampler={sampler!r}: choose one of random, balanced")
    n_workers = resolve_workers(int(workers), device)
    generator = torch.Generator().manual_seed(int(seed))
    chosen = None
    shuffle = False
    if distributed:
        if sampler == "balanced":
            raise ConfigError("--sampler balanced is not supported with distributed training; "
                              "use --class-weights auto instead")
        chosen = DistributedSampler(dataset, shuffle=train, seed=int(seed), drop_last=False)
    elif train and sampler == "balanced":
        targets = getattr(dataset, "targets", None)
        if targets is None:
            raise ConfigError("--sampler balanced needs a dataset with class labels (targets)")
        counts: dict[int, int] = {}
        for t in targets:
            counts[int(t)] = counts.get(int(t), 0) + 1
        weights = torch.tensor([1.0 / counts[int(t)] for t in targets], dtype=torch.double)
        chosen = WeightedRandomSampler(weights, num_samples=len(targets), replacement=True, generator=generator)
    else:
        shuffle = train
    pin = str(device).startswith("cuda") and torch.cuda.is_available()
    base = getattr(dataset, "dataset", dataset)            # a DDP Subset wraps the dataset
    return DataLoader(
        dataset,
        batch_size=int(batch_size),
        shuffle=shuffle,
        sampler=chosen,
        num_workers=n_workers,
        collate_fn=getattr(base, "collate_fn", collate_skip_none),
        pin_memory=pin,
        drop_last=bool(train and len(dataset) > batch_size),
        persistent_workers=n_workers > 0,
        generator=generator,
    )
