"""The train/val split: the seeded stratified hold-out of a flat folder, and split files (split.json)
that keep a run's split when files are added, removed or relabelled."""
from __future__ import annotations

import hashlib
import json
import os
from collections import Counter
from pathlib import Path
from typing import Any, Iterable

from finetune.data.files import class_key, listed_names, name_key, path_key
from finetune.data.imageset import ImageSet, ScanReport, relative_path
from finetune.core.errors import DataError
from finetune.core.io import atomic_write_text, printable, printable_name, read_json_object, write_json

SPLIT_FILE_VERSION = 1


def _hash_key(seed: int, rel: str) -> str:
    """The seeded hash that orders a file for the split, of its :func:`name_key`: a folder copied through
    macOS (names decomposed) splits as the original does."""
    return hashlib.sha256(f"{seed}:{name_key(rel)}".encode("utf-8", "surrogatepass")).hexdigest()


def stratified_split(files: dict[str, list[str]], val_split: float, seed: int, root: str
                      ) -> tuple[dict[str, list[str]], dict[str, list[str]]]:
    """Per class, hold out round(n * val_split) files (at least 1 when n >= 2, never all).

    Files are ordered by a seeded hash of their relative path, so the split does not depend on listing
    order and adding a file moves few others. A class of a single image keeps it for training: the scan's
    validation check names such classes (one line, however many: its note here said the same a line before).
    """
    train: dict[str, list[str]] = {}
    val: dict[str, list[str]] = {}
    for cls, paths in files.items():
        order = sorted(paths, key=lambda p: _hash_key(seed, relative_path(p, root)))
        n = len(order)
        n_val = min(max(round(n * val_split), 1 if n >= 2 else 0), n - 1) if n else 0
        val[cls], train[cls] = sorted(order[:n_val]), sorted(order[n_val:])
    return train, val


# ---------------------------------------------------------------------------------- split files
def _split_payload(report: ScanReport) -> dict[str, Any]:
    def rows(s: ImageSet | None) -> list[list[str]] | None:
        return None if s is None else [[report.relpath(p), s.classes[label]] for p, label in s.items]

    return {"version": SPLIT_FILE_VERSION, "layout": report.layout, "seed": report.seed,
            "val_split": report.val_split, "classes": report.classes,
            "train": rows(report.train), "val": rows(report.val), "test": rows(report.test)}


def _without_class(rel: str, folders: Iterable[str]) -> str:
    """A relative path without its class folder, the one right below the split folder it is in (``folders``:
    the scanned train/val folders, "." for the root): ``cat/x.jpg`` -> ``x.jpg``, ``train/cat/x.jpg`` ->
    ``train/x.jpg``. A path in none of them is returned as it is."""
    parts = rel.split("/")
    for folder in sorted(folders, key=len, reverse=True):
        above = [] if folder in (".", "") else folder.replace(os.sep, "/").split("/")
        if parts[:len(above)] == above and len(parts) > len(above) + 1:
            return "/".join(above + parts[len(above) + 1:])
    return rel


def _file_keys(rels: Iterable[str]) -> dict[str, str]:
    """Relative path -> the key a split file matches it by: its :func:`path_key` (a file renamed into the other
    Unicode form, or in a class folder that lost whitespace at an end, is the same file), or the path itself for
    files whose key another file has too (``café.jpg`` composed and decomposed side by side, as Linux allows: two
    images, neither dropped)."""
    rels = list(rels)
    count = Counter(path_key(r) for r in rels)
    return {r: path_key(r) if count[path_key(r)] == 1 else r for r in rels}


def _validation_gone(report: ScanReport, path: Path, saved: dict[str, Any]) -> DataError:
    """The refusal of a resume whose recorded validation images are all gone: a new split would validate on
    images the run has trained on."""
    first = printable_name(next(iter(saved["val"]))[0])
    return DataError(f"none of the {len(saved['val'])} validation images recorded in {path.name} is in "
                     f"{printable_name(report.root)} any more (e.g. {first}): moved or deleted since the run began? "
                     "Put them back to continue the run (a new split would validate on images it has trained on)")


def _without_val_folder(report: ScanReport, path: Path, saved: dict[str, Any]) -> int:
    """A split-layout run resumed on its folder with val/ gone (train/ alone reads as flat): a seeded split of
    train/ would validate on images the run trained on, so it is refused, unless the run recorded no validation
    images (its --exclude listed them all): then train/ stays training, as it trained. Returns 0."""
    if saved["val"]:
        raise _validation_gone(report, path, saved)
    items = sorted(report.train.items + report.val.items, key=lambda item: (item[1], item[0]))
    report.train, report.val = ImageSet(items, list(report.classes)), ImageSet([], list(report.classes))
    return 0


def _trained_in_val(report: ScanReport, path: Path, trained: Iterable[str], left_out: Iterable[str] = ()) -> None:
    """A flat run's folder reorganised into train/ + val/ since (the folders are the split now, and a split file
    of ``cat/x.jpg`` rows cannot overrule them): DataError when val/ holds an image the run trained on
    (``trained``: split file keys), whose validation would flatter early stopping and the guard, or when train/
    or val/ holds one the run left out (``left_out``: its exclude.txt rows, which name no file there any more:
    review, the images left out were trained on)."""
    trained = set(trained)
    excluded = {path_key(os.path.normpath(p)) for p in left_out}

    def key(p: str) -> str:     # val/cat/x.jpg -> cat/x.jpg, as the flat run recorded it
        return path_key(report.relpath(p).split("/", 1)[-1])

    leaked = [p for p, _ in report.val.items if key(p) in trained]
    keys = {p: key(p) for s in (report.train, report.val) for p, _ in s.items}
    listed = listed_names(excluded, keys.values())      # exactly, or as exclude.txt prints it (\n for a newline)
    back = [p for p, k in keys.items() if k in listed]
    if not leaked and not back:
        return
    train, val = (printable_name(report.folders.get(k) or k) for k in ("train", "val"))
    why = [f"{val}/ holds {len(leaked)} image(s) the run trained on (e.g. {printable_name(report.relpath(leaked[0]))}"
           "), which would flatter its validation"] if leaked else []
    if back:
        held = sorted({report.relpath(p).split("/", 1)[0] for p in back})
        why.append(f"{'/ and '.join(held)}/ {'holds' if len(held) == 1 else 'hold'} {len(back)} image(s) the run "
                   f"left out (its exclude.txt, e.g. {printable_name(report.relpath(back[0]))}), which it would "
                   "train or validate on")
    raise DataError(f"{printable_name(report.root)} was reorganised into {train}/ and {val}/ since the run began "
                    f"({path.name} records a folder of classes), and {'; and '.join(why)}: put the folder back as "
                    "it was to continue the run, or start a new run on it")


def apply_split_file(report: ScanReport, path: Path, left_out: Iterable[str] = ()) -> int | None:
    """Reuse a saved split: unchanged files keep their side; added files are assigned by the seed. Files in
    ``left_out`` (relative paths the run excluded: not in the split file) are not called added (QA: every
    resume of a run with --exclude warned of them as added files), nor split by the seed: they go to train, to be
    left out again (hashed, one could stand in val for a class that has none). Returns how many validation images
    the file records (0: its run had none, e.g. its --exclude listed every one), or None when the folder's own
    split is used (the file was made for a flat layout, and val/ holds no image it trained: :func:`_trained_in_val`;
    a split layout's val/ gone: :func:`_without_val_folder`).

    A file is matched by its relative path's :func:`path_key` (:func:`_file_keys`): folders and files renamed
    into the other Unicode form (copied through macOS), or class folders that lost whitespace at an end, keep
    their side and class."""
    try:
        saved = json.loads(path.read_text(encoding="utf-8"))
        keys = _file_keys(rel for name in ("train", "val") for rel, _ in saved[name])
        old = {name: {keys[rel]: cls for rel, cls in saved[name]} for name in ("train", "val")}
        old_seed, old_split = int(saved["seed"]), saved.get("val_split")
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise DataError(f"split file {path} is damaged ({type(e).__name__}); delete it to make a new split") from None
    where = f"split file {path.name}"
    if saved.get("layout") == "split" and report.layout == "flat":
        return _without_val_folder(report, path, saved)
    if saved.get("layout") == "flat" and report.layout == "split":
        _trained_in_val(report, path, old["train"], left_out)
    if saved.get("layout") != report.layout:
        report.warnings.append(f"{where} was made for a {saved.get('layout')} layout but the folder is now "
                               f"{report.layout}; using the folder's split")
        return None
    keys = _file_keys(report.relpath(p) for s in (report.train, report.val) for p, _ in s.items)
    paths = {keys[report.relpath(p)]: p for s in (report.train, report.val) for p, _ in s.items}
    current = {keys[report.relpath(p)]: report.classes[label]
               for s in (report.train, report.val) for p, label in s.items}
    before = {**old["train"], **old["val"]}
    # (exclude.txt: a newline in a name written as \n, a path beginning with # as ./#...)
    outside = set(listed_names(_file_keys(os.path.normpath(p) for p in left_out).values(), current))
    added = sorted(set(current) - set(before) - outside)
    removed = sorted(set(before) - set(current))
    # A class is its folder, so a file moved to another class has a new path: a removed and an added file with
    # the same path but for their class folder (each the only one of that name) count as that move. By name:
    # a file deleted and another of the same name added under another class count as a move too.
    folders = [path_key(f) for k, f in report.folders.items() if k in ("train", "val") and f]
    gone_keys = Counter(_without_class(r, folders) for r in removed)
    new_keys = Counter(_without_class(a, folders) for a in added)
    gone = {k: r for r in removed if gone_keys[k := _without_class(r, folders)] == 1}
    moves = {a: gone[k] for a in added if (k := _without_class(a, folders)) in gone and new_keys[k] == 1
             and class_key(current[a]) != class_key(before[gone[k]])}
    relabelled = sorted(moves)
    added = [a for a in added if a not in moves]
    removed = sorted(set(removed) - set(moves.values()))
    if added or removed or relabelled:
        report.warnings.append(
            f"files changed since {where} was written: {len(added)} added, {len(removed)} removed or now "
            f"unreadable, {len(relabelled)} moved to another class (a file name gone from one class and new in "
            "another); the unchanged files keep their split"
            + (" and new ones are split by the seed" if report.layout == "flat" and (added or relabelled) else ""))
    if report.layout == "split":
        return len(old["val"])   # the folders define the split; the file only told us what changed
    if old_seed != report.seed or (old_split is not None and abs(float(old_split) - (report.val_split or 0)) > 1e-9):
        report.warnings.append(f"reusing the split in {path.name} (val_split={old_split}, seed={old_seed}); "
                               "delete it for a new split with the current options")
        report.seed, report.val_split = old_seed, old_split
    frac = float(old_split if old_split is not None else 0.2)
    index = {c: i for i, c in enumerate(report.classes)}
    train, val = [], []
    for rel, cls in sorted(current.items(), key=lambda kv: (index[kv[1]], kv[0])):
        p = paths[rel]
        if rel in old["val"] and rel not in relabelled:
            side = val
        elif rel in outside or (rel in old["train"] and rel not in relabelled):
            side = train    # (one the run left out: where its --exclude takes it out again)
        else:   # new file: a seeded hash decides, holding out about ``frac`` of them
            side = val if int(_hash_key(report.seed, report.relpath(p))[:8], 16) / 0xFFFFFFFF < frac else train
        side.append((p, index[cls]))
    if old["val"] and not val:      # it said "use DIR/<class>/ folders with at least 2 images per class" (QA)
        raise _validation_gone(report, path, saved)
    report.train = ImageSet(train, list(report.classes))
    report.val = ImageSet(val, list(report.classes))
    return len(old["val"])


def write_scan(report: ScanReport, run_dir: str | Path, scan_only: bool = False) -> None:
    """Write ``scan.json``, ``split.json`` and ``bad_files.txt`` (one ``path<TAB>reason`` per line);
    ``scan_only``: ``scan.json`` alone (a resume writing a deleted one again keeps the run's split)."""
    run_dir = Path(run_dir)
    write_json(run_dir / "scan.json", report.to_dict(), indent=2)
    if scan_only:
        return
    # ensure_ascii keeps non-UTF-8 names (surrogate escapes) round-trippable through json.loads.
    write_json(run_dir / "split.json", _split_payload(report))
    write_bad_files(report, run_dir)


def scan_outdated(report: ScanReport, run_dir: str | Path) -> bool:
    """Whether ``run_dir/scan.json`` is missing, unreadable or names another data folder than ``report`` (a
    resume given ``--data`` after the data moved): the export (``zoo eval``'s trained-on-it warning), the report
    and the next resume read the folder from it."""
    return read_json_object(Path(run_dir) / "scan.json").get("root") != printable_name(report.root)


def write_bad_files(report: ScanReport, out_dir: str | Path) -> None:
    """``bad_files.txt``: the files the scan skipped, one ``path<TAB>reason`` per line (the scan's
    warning points there); a tab or newline in a name is written escaped (``\\t``, ``\\n``), as printed."""
    lines = [f"{printable(report.relpath(p))}\t{printable(r)}\n" for p, r in report.bad_files]
    atomic_write_text(Path(out_dir) / "bad_files.txt", "".join(lines))


