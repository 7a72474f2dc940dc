"""Image folders: scan + validate (layout, classes, usable files, the split); the parts live in ``files``
(walking, checks), ``imageset`` (ImageSet, ScanReport) and ``splits`` (hold-out, split files).

The scan happens before any model is loaded, so fatal problems (no images, fewer than 2 classes,
train/val class sets that cannot be matched) fail in seconds with one clear ``DataError``. Files that
cannot be used are listed (``bad_files``) and skipped; images that only fail at full decode are caught
per image in ``ImageDataset`` (``__getitem__`` returns None, ``collate_skip_none`` drops it).

In memory every path is usable as is (``root`` joined with the relative path); on disk (scan.json,
split.json, bad_files.txt) paths are relative to the data root, with ``/`` separators.
"""
from __future__ import annotations

import os
import re
from itertools import product
from pathlib import Path
from typing import Iterable, Iterator, Sequence

from finetune.data.files import (IMAGE_EXTENSIONS, case_twin, check_files, class_key, collect_classes, is_ignored,
                                  is_dir, list_classes, refuse_zoo_output, UNLISTED_FOLDER)
from finetune.data.imageset import ImageSet, ScanReport, name_list, relative_path
from finetune.data.splits import apply_split_file, stratified_split, write_bad_files, write_scan
from finetune.core.errors import ConfigError, DataError
from finetune.core.io import broken_link, printable_name

__all__ = ["IMAGE_EXTENSIONS", "ImageSet", "ScanReport", "scan_folder", "split_folder", "held_out_folder", "write_scan",
           "write_bad_files", "VAL_NAMES", "split_named_folders", "hidden_note"]

VAL_NAMES = ("val", "valid", "validation")
IMBALANCE_WARN = 3.0        # warn when the largest class has more than this many times the smallest
IMBALANCE_ADVICE = "; consider --class-weights auto or --sampler balanced"    # (the commands drop it: scan_lines)


def split_folder(root: str | os.PathLike, names: Sequence[str], subdirs: Iterable[str] | None = None) -> str | None:
    """The sub-folder of ``root`` named like the first of ``names`` found (e.g. VAL_NAMES), in any case (the
    exact name first): its path, or None. ``subdirs``: root's sub-folders when the caller has listed them."""
    subdirs = sorted(list_classes(os.fspath(root)) if subdirs is None else subdirs)
    for name in names:
        found = name if name in subdirs else next((d for d in subdirs if d.lower() == name), None)
        if found is not None:
            return os.path.join(os.fspath(root), found)
    return None


def _detect_layout(root: str) -> tuple[str, str | None, str | None]:
    """-> (train folder, val folder or None, test folder or None).

    The split folders are matched in any case (``Train/`` ``Val/`` from Windows or macOS: read as two
    classes "Train" and "Val" they trained a classifier of the split); a folder of split folders alone,
    without ``train/``, is a DataError rather than a flat folder whose classes are "val" and "test".
    """
    subdirs = set(list_classes(root))
    train, val, test = (split_folder(root, names, subdirs) for names in (("train",), VAL_NAMES, ("test",)))
    lowered = {d.lower() for d in subdirs}
    if train is not None and (val is not None or lowered <= {"train", "test"}):
        return train, val, test
    if train is None and lowered and lowered <= {*VAL_NAMES, "test"}:
        found = name_list(f"{d}/" for d in sorted(subdirs))
        hidden: list[tuple[str, int]] = []      # (`DIR/.train/`: named, not "no train/"; walked only here)
        list_classes(root, hidden)
        hid = f" ({hidden_note(hidden, root)})" if hidden else ""
        raise DataError(f"{printable_name(root)} holds {found} but no train/ folder{hid}: put the training images "
                        "in DIR/train/<class>/, or use DIR/<class>/ folders (split automatically)")
    _refuse_split_among_classes(root, sorted(subdirs))
    return root, None, None


# the words of a folder name that read as a split (``Training/``, ``test_set/``, Intel's ``seg_train/``,
# ``TestImages/``, ``trainset/``), and the split each reads as
_SPLIT_WORDS = {**dict.fromkeys(("train", "training", "trn"), "train"),
                **dict.fromkeys(("val", "valid", "validation", "dev"), "val"),
                **dict.fromkeys(("test", "testing", "eval", "evaluation", "holdout"), "test")}
_ORDER = ("train", "val", "test")


def _split_word(name: str) -> str | None:
    """The split a folder name reads as: that of its first word naming one (words: letters between other
    characters and CamelCase humps; ``trainset`` is ``train``), else None. A guess the layout must confirm."""
    for word in (w.lower() for w in re.findall(r"[A-Z]+(?![a-z])|[A-Z]?[a-z]+", name)):
        word = word[:-3] if word.endswith("set") and word[:-3] in _SPLIT_WORDS else word
        if word in _SPLIT_WORDS:
            return _SPLIT_WORDS[word]
    return None


def _refuse_split_among_classes(root: str, subdirs: list[str]) -> None:
    """DataError when folders of the flat layout ``root`` read as splits, not classes (:func:`_splits_read`; audit:
    each trained as a class of cats and dogs)."""
    layout = "lay the folders out as DIR/train/<class>/ and DIR/val/<class>/ (DIR/test/<class>/ optional)"
    for (split, where, names), other in _splits_read(root, subdirs):
        if other is None:
            keys = {class_key(d).casefold(): d for d in subdirs if not _split_word(d)}
            raise DataError(f"{printable_name(root)} holds class folders {name_list(keys.values())} and "
                            f"{printable_name(where)}/, whose folders {name_list(names)} are classes too, so it "
                            f"looks like {split} images, not a class: {layout}, or move it out of DIR")
        split_e, where_e, names_e = other
        shared = {class_key(n).casefold() for n in names_e}
        same = name_list(sorted(n for n in names if class_key(n).casefold() in shared))
        raise DataError(f"{printable_name(root)} holds {printable_name(where)}/ and {printable_name(where_e)}/, "
                        f"whose folders {same} are the same classes, so they look like {split} and {split_e} "
                        f"images, not two classes: {layout}, or give {printable_name(os.path.join(root, where))} "
                        f"alone as the data folder (a folder of classes: its validation images are held out)")


_Level = tuple[str, str, list[str]]     # (split, folder, its folders)


def _splits_read(root: str, subdirs: list[str]) -> Iterator[tuple[_Level, _Level | None]]:
    """The folders of ``root`` that read as splits, not classes, and why: ``(folder, None)`` for one named as a
    split (``test/``, ``Testing/``, ``test_set/``) that holds a folder named as a class beside it (``DIR/test/cat/``
    beside ``DIR/cat/``); ``(folder, other)`` for two named as different splits that hold folders of one name
    (``Training/cat/`` and ``Testing/cat/``, a ``Testing/`` of one class too; also below a lone folder, as Kaggle's
    ``training_set/training_set/cat/``; a lone folder of one name on both sides is no class). Names match in any
    case. A class so named whose folders are no classes stays a class, as do two whose shared
    folders a class not so named holds too (``train/front/`` and ``test_tube/front/`` beside ``car/front/``:
    views, sessions, ``images/`` and ``masks/`` of every class). The training scan refuses a flat layout for any;
    ``zoo eval`` reads its held-out folder by them (:func:`held_out_folder`)."""
    splits = {d: _split_word(d) for d in subdirs}
    levels = {d: _class_levels(root, d) for d, split in splits.items() if split}
    keys = {class_key(d).casefold() for d, split in splits.items() if not split}
    for d, chain in levels.items():
        hit = next(((where, names) for where, names in chain if any(class_key(n).casefold() in keys for n in names)),
                   None)
        if hit:
            yield (splits[d], *hit), None
    inside: set[str] | None = None      # the folders the other classes hold (read only when needed)
    for d, e in ((d, e) for d in levels for e in levels if _ORDER.index(splits[d]) < _ORDER.index(splits[e])):
        found = None    # any level of one with any of the other (a Testing/ of one class beside Training/'s; a
        for (where, names), (where_e, names_e) in product(levels[d], levels[e]):    # test_set/test_set/), the deepest
            if len(names) == 1 == len(names_e):     # a lone folder on both sides is looked through (Kaggle's, images/)
                continue
            shared = {class_key(n).casefold() for n in names} & {class_key(n).casefold() for n in names_e}
            if shared and inside is None:
                inside = {class_key(n).casefold() for k in subdirs if not splits[k] for _, ns in _class_levels(root, k)
                          for n in ns}
            if shared and not shared & (inside or set()):
                found = (splits[d], where, names), (splits[e], where_e, names_e)
        if found:
            yield found


def _class_levels(root: str, folder: str) -> list[tuple[str, list[str]]]:
    """[(``folder``, its folders)], and of the folder below it while it holds one folder alone (at most 2 down)."""
    chain = [(folder, _subfolders(os.path.join(root, folder)))]
    while len(chain) < 3 and len(chain[-1][1]) == 1:
        below = f"{chain[-1][0]}/{chain[-1][1][0]}"
        chain.append((below, _subfolders(os.path.join(root, below))))
    return chain


def split_named_folders(root: str | os.PathLike) -> list[tuple[str, str, list[str]]]:
    """``(split, folder, its folders)`` of each folder of ``root`` whose name reads as a split (``Testing/``,
    ``test_set/test_set/``: the folder below a lone one, as the refusal above reads it), held-out splits first
    (test, val, then train): where a folder of such folders keeps its classes."""
    root_s = os.fspath(root)
    named = [(_split_word(d), d) for d in _subfolders(root_s)]
    return sorted(((split, *_class_levels(root_s, d)[-1]) for split, d in named if split),
                  key=lambda t: -_ORDER.index(t[0]))


def held_out_folder(root: str | os.PathLike) -> str | None:
    """The folder of ``root`` that scores a trained model, read as the scan reads ``root``: test/, else val/, of
    a split layout or of held-out folders alone (a hold-out set); a folder named as a test split in the scan's
    other words that the scan reads as a split (``Testing/``, ``test_set/test_set/`` holding the classes that
    ``train/`` or ``Training/`` holds: :func:`_splits_read`) comes before val/. None for a folder of classes,
    where a class named like a split (``valid/`` next to ``invalid/``, ``test_tube/``) is a class, as it was in
    training; beside train/ + val/, a folder so named that holds none of their classes (an ``eval/`` of reports)
    is not read, and val/ is scored."""
    root_s = os.fspath(root)
    try:
        train, val, test = _detect_layout(root_s)
    except DataError:           # val/ or test/ without train/, or Training/ + Testing/: a hold-out set
        train = val = test = None
    if train == root_s:
        return None
    if train is not None:
        return test or _read_as(root_s, "test") or val
    return split_folder(root_s, ("test",)) or _read_as(root_s, "test") or split_folder(root_s, VAL_NAMES) or \
        _read_as(root_s, "val")


def _read_as(root_s: str, split: str) -> str | None:
    """The first folder of ``root_s`` by name that the scan reads as ``split`` by its words (:func:`_splits_read`)."""
    found = sorted(where for level, other in _splits_read(root_s, sorted(list_classes(root_s)))
                   for named, where, _ in (level, other or level) if named == split)
    return os.path.join(root_s, found[0]) if found else None


def _image_set(by_class: dict[str, list[str]], classes: list[str]) -> ImageSet:
    index = {c: i for i, c in enumerate(classes)}
    return ImageSet([(p, index[c]) for c in classes for p in by_class.get(c, [])], list(classes))


def scan_folder(root: str | Path, val_split: float = 0.2, seed: int = 0, strict: bool = False,
                split_file: str | Path | None = None, class_names: Sequence[str] = (),
                memo: str | Path | None = None, left_out: Sequence[str] = ()) -> ScanReport:
    """Scan and validate an image folder; make (or reuse) the train/val split.

    Accepts ``root/train/<class>/*`` + ``root/val/<class>/*`` (+ optional ``root/test/<class>/*``), or
    ``root/<class>/*`` (then a stratified, seeded ``val_split`` is held out per class).

    Args:
        root: the data folder.
        val_split: fraction of each class held out for validation (flat layout only).
        seed: seeds the split.
        strict: unreadable files are a DataError instead of being skipped with a warning.
        split_file: a split.json written by ``write_scan``; when it exists its split is reused (one recording no
            validation images, its run's --exclude having listed them all, too: a warning, no refusal).
        class_names: the names a run trained on (a resume): a class folder whose name reads as one of them
            (:func:`~finetune.data.files.class_key`: renamed into the other Unicode form since) is named so.
        memo: a file that remembers each file's check (``files.check_files``): files unchanged since an
            earlier scan are not opened again.
        left_out: paths (relative to ``root``) the run left out (its --exclude): not in ``split_file``, and
            not files added since it was written.

    Returns:
        ScanReport (absolute paths; warnings for skipped files, empty classes, imbalance...).

    Raises:
        DataError: no images, fewer than 2 classes, a val/test class missing from train, a damaged
            split file, or (strict) any unreadable file.
    """
    root_s = os.path.abspath(os.fspath(root))
    if not os.path.isdir(root_s):
        link = broken_link(root_s)      # (QA: a link that loops "does not exist")
        raise DataError(f"data folder {printable_name(link or root_s + ' does not exist or is not a folder')}; "
                        "pass --data DIR with one sub-folder per class")
    # (QA: its eval reports trained as classes)
    refuse_zoo_output(root_s, "to learn from: pass --data the image folder, with one sub-folder per class")
    train_dir, val_dir, test_dir = _detect_layout(root_s)
    layout = "split" if val_dir else "flat"
    if layout == "flat" and not 0.0 < val_split < 1.0:
        raise ConfigError(f"invalid val_split={val_split!r}: use a fraction between 0 and 1, e.g. 0.2")
    warn: list[str] = []
    hidden: list[tuple[str, int]] = []
    if train_dir != root_s:     # (its hidden folders too: `DIR/.train/` beside train/ was skipped without a word)
        used = {os.path.basename(d) for d in (train_dir, val_dir, test_dir) if d}
        others = [d for d in list_classes(root_s, hidden) if d not in used]
        if others:
            warn.append(f"ignored folder(s) {name_list(others)} next to train/ (only train/, val/, test/ are read)")
    loops: list[str] = []
    stray: list[str] = []
    for folder in (root_s,) if train_dir == root_s else (root_s, train_dir, val_dir, test_dir):
        if folder:   # files outside any class folder (in a split layout, also those in DIR and train/ val/ test/)
            with os.scandir(folder) as entries:
                stray += sorted(relative_path(e.path, root_s) for e in entries
                                if not is_ignored(e.name) and not is_dir(e))
    dirs = {"train": train_dir, "val": val_dir, "test": test_dir}
    good, bad = _usable_files(root_s, dirs, loops, stray, strict, class_names, memo, hidden)
    classes = _classes(root_s, train_dir, good, stray, loops, bad, warn, hidden)

    train_files = {c: good["train"][c] for c in classes}
    if layout == "split":
        val_files = {c: good["val"].get(c, []) for c in classes}
        report_split = None
    else:
        train_files, val_files = stratified_split(train_files, val_split, seed, root_s)
        report_split = val_split
    test_set = _image_set({c: good["test"].get(c, []) for c in classes}, classes) if test_dir else None

    folders = {k: None if d is None else os.path.relpath(d, root_s) for k, d in dirs.items()}
    report = ScanReport(root_s, layout, classes, _image_set(train_files, classes),
                        _image_set(val_files, classes), test_set, sorted(bad), warn, seed, report_split, folders)
    recorded = None
    if split_file is not None and os.path.isfile(split_file):
        recorded = apply_split_file(report, Path(split_file), left_out)
    if len(report.val) == 0 and recorded == 0:      # its run trained without validation: kept, not refused
        warn.append(f"split file {os.path.basename(split_file)} records no validation images (its run left every one "
                    "out, e.g. by --exclude): the split is kept, so none are validated on")
        return report
    _check_validation(report, root_s, warn)
    return report


def _usable_files(root_s: str, dirs: dict[str, str | None], loops: list[str], stray: list[str], strict: bool,
                  class_names: Sequence[str] = (), memo: str | Path | None = None,
                  hidden: list[tuple[str, int]] | None = None
                  ) -> tuple[dict[str, dict[str, list[str]]], list[tuple[str, str]]]:
    """-> ({split: {class: usable files}}, [(unusable file, reason)]) for the train/val/test folders found;
    hidden folders holding images -> ``hidden`` (path, images).

    Raises DataError when no file is usable, or (strict) when any file is not.
    """
    unlisted: list[tuple[str, str]] = []      # listed with the bad files: their images are left out
    raw = {name: collect_classes(d, loops, unlisted, hidden) for name, d in dirs.items() if d}
    # val/café read as train/café whatever its Unicode form; a resumed run's café as it trained on it
    named = {class_key(c): c for c in [*raw["train"], *class_names]}
    raw = {name: dict(sorted(((named.get(class_key(c), c), ps) for c, ps in split.items()), key=lambda kv: kv[0]))
           for name, split in raw.items()}
    all_files = [p for split in raw.values() for paths in split.values() for p in paths]
    reasons = dict(zip(all_files, check_files(all_files, memo)))
    bad = [(p, r) for p, r in reasons.items() if r is not None] + unlisted
    good = {name: {c: [p for p in ps if reasons[p] is None] for c, ps in split.items()}
            for name, split in raw.items()}

    n_good = sum(len(ps) for split in good.values() for ps in split.values())
    if n_good == 0:
        # (audit: "(6 unreadable files)" of a folder of a phone's HEIC photos said neither which nor why)
        found = f" ({len(bad)} files cannot be used, e.g. {_first_reason(bad, root_s)})" if bad else ""
        if stray:   # the commonest mistake: images straight in DIR, no class folders
            found += f" ({len(stray)} files directly in the folder are not in class folders)"
        if hidden:
            found += f" ({hidden_note(hidden, root_s)})"
        raise DataError(f"no images found in {printable_name(root_s)}{found}; expected DIR/<class>/*.jpg or "
                        f"DIR/train/<class>/ + DIR/val/<class>/ ({', '.join(IMAGE_EXTENSIONS)})")
    if bad and strict:
        raise DataError(f"{len(bad)} unreadable files, e.g. {printable_name(relative_path(bad[0][0], root_s))} "
                        f"({bad[0][1]}); fix or remove them, or drop --strict to skip them")
    return good, bad


def _classes(root_s: str, train_dir: str, good: dict[str, dict[str, list[str]]], stray: list[str],
             loops: list[str], bad: list[tuple[str, str]], warn: list[str],
             hidden: Sequence[tuple[str, int]] = ()) -> list[str]:
    """The classes: the training folders that hold at least one usable image; what was skipped -> ``warn``
    (``hidden``: the hidden folders holding images, :func:`hidden_note`).

    Raises DataError for a val/test class without training images, or fewer than 2 classes.
    """
    empty = [c for c, ps in good["train"].items() if not ps]
    classes = [c for c, ps in good["train"].items() if ps]
    for name in ("val", "test"):
        if name not in good:
            continue
        orphans = [c for c, ps in good[name].items() if ps and c not in classes]
        if orphans:
            train_name = printable_name(relative_path(train_dir, root_s) if train_dir != root_s else root_s)
            twins = [(o, t) for o in orphans if (t := case_twin(o, classes)) is not None]
            case = (f" ({name}/{printable_name(twins[0][0])} is {train_name}/{printable_name(twins[0][1])} in another "
                    f"case{f', and {len(twins) - 1} more' if len(twins) > 1 else ''}: class names are case-sensitive; "
                    "rename one to match)" if twins else "")
            raise DataError(f"class(es) {name_list(orphans)} in {name}/ have no training images in {train_name}"
                            f"{case}; add train/<class>/ images or remove them from {name}/")
    if len(classes) < 2:
        what = f"only 1 class ({printable_name(classes[0])})" if classes else "no class folders with images"
        hint = f"; {len(stray)} files directly in the folder were ignored" if stray else ""
        if empty:       # (audit: a class folder of HEIC photos was not named: "needs at least 2 class folders")
            inside = [(p, r) for p, r in bad if relative_path(p, train_dir).split("/")[0] in empty]
            hint += (f"; class folder(s) {name_list(empty)} hold no usable images"
                     + (f" ({len(inside)} file{'s' * (len(inside) > 1)} skipped, e.g. {_first_reason(inside, root_s)})"
                        if inside else ""))
        inner = _subfolders(os.path.join(train_dir, classes[0])) if classes else []
        if len(inner) >= 2:     # a zip's top folder (photos.zip -> DIR/photos/<class>/): one level too high
            top = printable_name(os.path.join(train_dir, classes[0]))
            hint += (f"; its folders {name_list(inner)} look like the classes: " + (
                f"pass {top} as the data folder" if train_dir == root_s else    # (audit: DIR/train/photos/<class>/)
                f"move them up into {printable_name(train_dir)}/ (and those of the other split folders alike)"))
        if hidden:      # (DIR/.NET/ beside DIR/java/: "only 1 class (java)")
            hint += f"; {hidden_note(hidden, root_s)}"
        raise DataError(f"found {what} in {printable_name(root_s)}{hint}; a classifier needs at least 2 class "
                        "folders, e.g. DIR/cat/*.jpg and DIR/dog/*.jpg")
    if hidden:
        warn.append(hidden_note(hidden, root_s))
    if empty:
        warn.append(f"empty class folder(s) {name_list(empty)} left out (no usable images)")
    if stray and train_dir == root_s:
        warn.append(f"{len(stray)} files directly in {printable_name(root_s)} ignored "
                    "(images must be in DIR/<class>/)")
    elif stray:
        warn.append(f"{len(stray)} files outside the class folders ignored, e.g. {printable_name(stray[0])} "
                    "(images must be in DIR/train/<class>/, DIR/val/<class>/ or DIR/test/<class>/)")
    if loops:
        warn.append(f"skipped {len(loops)} symbolic-link loop(s), e.g. "
                    f"{printable_name(relative_path(loops[0], root_s))}")
    unlisted = [p for p, r in bad if r.startswith(UNLISTED_FOLDER)]
    if unlisted:
        warn.append(f"cannot read {len(unlisted)} folder(s), e.g. {printable_name(relative_path(unlisted[0], root_s))}"
                    " (no permission?): the images in them are left out; make them readable (chmod) to use them")
    files = [(p, r) for p, r in bad if not r.startswith(UNLISTED_FOLDER)]     # (a folder is said above, once)
    if files:
        warn.append(f"skipped {len(files)} unreadable or non-image files, e.g. "
                    f"{printable_name(relative_path(files[0][0], root_s))} ({files[0][1]}); all are listed in "
                    "bad_files.txt")
    return classes


def hidden_note(hidden: Sequence[tuple[str, int]], root_s: str) -> str:
    """What the scan says of the hidden folders holding images it skipped (audit: a class folder ``.NET/`` was left
    out without a word, where torchvision's ImageFolder trains it as a class): which, how many images, the fix."""
    named = name_list(f"{relative_path(p, root_s)} ({n} image{'s' * (n > 1)})" for p, n in sorted(hidden))
    return (f"skipped hidden folder(s) {named}: a name beginning with '.' is skipped, as hidden files are; to use "
            "its images, rename it without the leading dot")


def _first_reason(bad: list[tuple[str, str]], root_s: str) -> str:
    """``REL (reason)`` of the first of the unusable files ``bad`` by path (relative to ``root_s``)."""
    path, reason = min(bad)
    return f"{printable_name(relative_path(path, root_s))} ({reason})"


def _subfolders(folder: str) -> list[str]:
    try:
        return list_classes(folder)
    except DataError:       # a class named by a folder name that is not UTF-8: its printable name is no path
        return []


def _check_validation(report: ScanReport, root_s: str, warn: list[str]) -> None:
    """DataError without validation images; warnings for classes without any and for imbalance."""
    if len(report.val) == 0:
        counts = report.train.class_counts()
        if report.layout == "flat" and counts and max(counts) == 1:     # (QA: a doctor run on one said only
            # "no validation images"); the folder the classes are in: DIR, or DIR/train/ without a val/ beside it
            classes_in = os.path.normpath(os.path.join(root_s, report.folders.get("train") or "."))
            raise DataError(
                f"each of the {len(counts)} class folders in {printable_name(classes_in)} holds a single image, so "
                "none can be held out for validation: add images, 2 or more per class, or DIR/val/<class>/ images "
                "to validate on")
        raise DataError(f"no validation images in {printable_name(root_s)}: add DIR/val/<class>/ images, or use "
                        "DIR/<class>/ folders with at least 2 images per class so a split can be made")
    missing = [c for c, n in zip(report.classes, report.val.class_counts()) if n == 0]
    if missing:
        fix = ("add val/<class>/ images" if report.layout == "split" else
               "a class folder needs 2 or more images for one to be held out")
        warn.append(f"class(es) {name_list(missing)} have no validation images; their accuracy cannot be "
                    f"measured ({fix})")
    ratio = report.imbalance()
    if ratio > IMBALANCE_WARN:
        counts = report.counts()["train"]
        big, small = max(counts, key=counts.get), min(counts, key=counts.get)
        warn.append(f"classes are imbalanced ({ratio:.1f}x: '{printable_name(big)}' has {counts[big]} training "
                    f"images, '{printable_name(small)}' {counts[small]}){IMBALANCE_ADVICE}")
