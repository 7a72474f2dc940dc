"""Image folders: scan + validate, split files, ImageSet / ScanReport.

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
import json
import math
import os
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

from PIL import Image, UnidentifiedImageError

from finetune.errors import ConfigError, DataError
from finetune.io import atomic_write_text, printable_name

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
            "root": printable_name(self.root),
            "layout": self.layout,
            "classes": [printable_name(c) for c in self.classes],
            "counts": {k: {printable_name(c): n for c, n in v.items()} for k, v in self.counts().items()},
            "images": {name: len(s) for name, s in self.sets().items()},
            "imbalance": None if math.isinf(ratio) else round(ratio, 3),
            "seed": self.seed,
            "val_split": self.val_split,
            "bad_files": [{"path": printable_name(self.relpath(p)), "reason": r} for p, r in self.bad_files],
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
        jpeg_problem = _jpeg_structure(path, size)
        if jpeg_problem:
            return jpeg_problem
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


# JPEG markers without a length field: TEM and RST0-7 (SOI and EOI are handled on their own).
_JPEG_STANDALONE = {0x01, *range(0xD0, 0xD8)}


def _jpeg_structure(path: str, size: int) -> str | None:
    """For a file that starts like a JPEG (SOI), why its headers cannot lead to image data, else None.

    Walks the marker segments up to the first scan (SOS) without decoding anything. Pillow's own header
    parser changed between versions in what it accepts (a file cut inside its Huffman tables: refused by
    Pillow 12, opened by 13), so this check, not Pillow's, decides whether such a file is kept.
    """
    with open(path, "rb") as fh:
        if fh.read(2) != b"\xff\xd8":
            return None                     # not a JPEG: Pillow's checks decide
        pos = 2
        while True:
            fh.seek(pos)
            head = fh.read(4)
            if len(head) < 2 or head[0] != 0xFF:
                return "damaged JPEG (its headers break off before any image data)"
            marker = head[1]
            if marker == 0xFF:              # fill byte before a marker
                pos += 1
            elif marker in _JPEG_STANDALONE:
                pos += 2
            elif marker == 0xD9:
                return "damaged JPEG (it ends before any image data)"
            elif len(head) < 4 or int.from_bytes(head[2:4], "big") < 2:
                return "damaged JPEG (its headers break off before any image data)"
            else:
                pos += 2 + int.from_bytes(head[2:4], "big")
                if marker == 0xDA:          # start of scan: image data follows its header
                    return None if pos < size else "damaged JPEG (no image data after its headers)"
                if pos >= size:
                    return "damaged JPEG (its headers break off before any image data)"


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
            notes.append(f"class '{printable_name(cls)}' has only 1 image: none held out for validation")
    return train, val, notes


def _image_set(by_class: dict[str, list[str]], classes: list[str]) -> ImageSet:
    index = {c: i for i, c in enumerate(classes)}
    return ImageSet([(p, index[c]) for c in classes for p in by_class.get(c, [])], list(classes))


def _names(items: Iterable[str], limit: int = 5) -> str:
    items = [printable_name(i) for i in items]
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
        raise DataError(f"data folder {printable_name(root_s)} does not exist or is not a folder; "
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
        raise DataError(f"no images found in {printable_name(root_s)}{found}; expected DIR/<class>/*.jpg or "
                        f"DIR/train/<class>/ + DIR/val/<class>/ ({', '.join(IMAGE_EXTENSIONS)})")
    if bad and strict:
        raise DataError(f"{len(bad)} unreadable files, e.g. {printable_name(_rel(bad[0][0], root_s))} "
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
                            f"{printable_name(_rel(train_dir, root_s) if train_dir != root_s else root_s)}; "
                            f"add train/<class>/ images or remove them from {name}/")
    if len(classes) < 2:
        what = f"only 1 class ({printable_name(classes[0])})" if classes else "no class folders with images"
        hint = f"; {len(stray)} files directly in the folder were ignored" if stray else ""
        raise DataError(f"found {what} in {printable_name(root_s)}{hint}; a classifier needs at least 2 class "
                        "folders, e.g. DIR/cat/*.jpg and DIR/dog/*.jpg")
    if empty:
        warn.append(f"empty class folder(s) {_names(empty)} left out (no usable images)")
    if stray:
        warn.append(f"{len(stray)} files directly in {printable_name(root_s)} ignored "
                    "(images must be in DIR/<class>/)")
    if loops:
        warn.append(f"skipped {len(loops)} symbolic-link loop(s), e.g. {printable_name(_rel(loops[0], root_s))}")
    if bad:
        warn.append(f"skipped {len(bad)} unreadable or non-image files, e.g. "
                    f"{printable_name(_rel(bad[0][0], root_s))} ({bad[0][1]}); all are listed in bad_files.txt")

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
        raise DataError(f"no validation images in {printable_name(root_s)}: add DIR/val/<class>/ images, or use "
                        "DIR/<class>/ folders with at least 2 images per class so a split can be made")
    missing = [c for c, n in zip(report.classes, report.val.class_counts()) if n == 0]
    if missing:
        warn.append(f"class(es) {_names(missing)} have no validation images; their accuracy cannot be "
                    "measured (add val/<class>/ images)")
    ratio = report.imbalance()
    if ratio > IMBALANCE_WARN:
        counts = report.counts()["train"]
        big, small = max(counts, key=counts.get), min(counts, key=counts.get)
        warn.append(f"classes are imbalanced ({ratio:.1f}x: '{printable_name(big)}' has {counts[big]} training "
                    f"images, '{printable_name(small)}' {counts[small]}); consider --class-weights auto or "
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
    lines = [f"{printable_name(report.relpath(p))}\t{r}\n" for p, r in report.bad_files]
    atomic_write_text(run_dir / "bad_files.txt", "".join(lines))


