"""``zoo eval``: a labelled folder through a model (``zoo.predict.predict_probs``), its metrics (accuracy,
top-5, per class, confusion) and reports (metrics.json, per_class.csv, confusion.csv, confusion.png, wrong.csv)."""
from __future__ import annotations

import functools
import io
import math
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch
from matplotlib import font_manager, rcParams
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ft2font import FT2Font

from finetune.core.confusion import confused_classes, confusion_csv_text, precision_recall
from finetune.core.io import atomic_write, atomic_write_text, csv_text, printable, printable_name, write_json
from finetune.data.files import IMAGE_EXTENSIONS, case_twin, class_key, image_files, list_classes, refuse_zoo_output
from finetune.data.scan import VAL_NAMES, held_out_folder, hidden_note, split_folder, split_named_folders
from zoo.errors import UsageError
from zoo.predict import DEFAULT_TTA_VIEWS, OnError, predict_probs

__all__ = ["EvalReport", "find_eval_images", "evaluate", "classification_metrics", "write_eval_reports",
           "seen_in_training"]


# ---------------------------------------------------------------------------------------------- eval


@dataclass
class EvalReport:
    """What ``zoo eval`` reports; ``to_dict`` is what metrics.json holds."""

    root: str
    split: str                                  # "test" | "val" (or "valid", "validation") | "." (the folder)
    labels: list[str]
    n_images: int
    accuracy: float
    top5: float | None                          # only when there are more than 5 classes
    per_class: dict[str, dict[str, float | int | None]]   # precision, recall, support
    confusion: list[list[int]]                  # rows: true class, columns: predicted
    wrong: list[dict[str, Any]]                 # most confidently wrong first
    skipped: list[tuple[str, str]] = field(default_factory=list)
    unreadable_folders: list[tuple[str, str]] = field(default_factory=list)   # (folder, reason): not listed
    ignored_folders: list[str] = field(default_factory=list)
    hidden_folders: list[tuple[str, int]] = field(default_factory=list)    # (folder, images): skipped, as training
    tta: bool = False
    tta_scales: list[int] | None = None
    tta_views: str | None = None                # "flip" | "ten" with TTA
    tta_mirror: bool | None = None              # with TTA: whether the mirrored views were among them
    weights_sha256: str | None = None           # of the bundle evaluated (`zoo push --test-metrics` checks it)
    # "train": the folder the model was trained on (with a carved-out val: validated on too); "val": the
    # folder that chose its epoch; None: neither, or the bundle does not say (see seen_in_training)
    seen_in_training: str | None = None

    def to_dict(self) -> dict[str, Any]:
        # File names that are not UTF-8 hold surrogates in memory; on disk and on stdout they read \xNN.
        name = printable_name
        return {"root": name(self.root), "split": self.split, "n_images": self.n_images, "accuracy": self.accuracy,
                "top5": self.top5, "per_class": self.per_class, "labels": self.labels,
                "tta": self.tta, "tta_scales": self.tta_scales, "tta_views": self.tta_views,
                "tta_mirror": self.tta_mirror,
                "weights_sha256": self.weights_sha256, "seen_in_training": self.seen_in_training,
                "skipped": [{"path": name(p), "reason": r} for p, r in self.skipped],
                "unreadable_folders": [{"path": name(p), "reason": r} for p, r in self.unreadable_folders],
                "ignored_folders": [name(f) for f in self.ignored_folders],
                "hidden_folders": [{"path": name(p), "images": n} for p, n in self.hidden_folders],
                "most_confidently_wrong": [{**w, "path": name(w["path"])} for w in self.wrong]}


def find_eval_images(root: str | os.PathLike, labels: Sequence[str], aliases: Sequence[str] | None = None,
                     unlisted: list[tuple[str, str]] | None = None, others: list[tuple[str, str]] | None = None,
                     hidden: list[tuple[str, int]] | None = None) -> tuple[str, list[tuple[str, int]], list[str]]:
    """Images of a class-folder layout, labelled by the bundle's class order.

    ``root/test/<class>/`` is used when present, else a folder named as a test split that the training scan
    reads as one (``Testing/``, ``test_set/test_set/`` holding train's classes), else ``root/val/<class>/`` (or
    ``valid``, ``validation``; in any case), else ``root/<class>/``: the folder is read as the training scan reads it
    (``finetune.data.scan.held_out_folder``), so a class named ``valid`` or ``test`` stays a class.
    Class folders are matched to the bundle's labels by name, or by ``aliases`` (one per label, e.g.
    ImageNet synsets "n02123045" for a pretrained model whose labels are "tabby, tabby cat"). Folders in them
    that cannot be listed go to ``unlisted`` (folder, reason), their files not named as images to ``others``
    (path, reason: a HEIC photo, a file without an extension; the training scan lists them as unusable), hidden
    folders holding images (``.NET/``, ``cat/.edits/``: skipped, as the training scan skips them) to ``hidden``
    (folder, images; :func:`finetune.data.scan.hidden_note` says so).

    Returns:
        (split used, [(path, label index)], folders that are not one of the labels)
    Raises:
        UsageError: no such folder, no class folder matching a label, or no images; DataError: a folder a zoo
            command wrote (a run, bundle or report).
    """
    root = Path(root)
    unlisted = unlisted if unlisted is not None else []
    hidden = hidden if hidden is not None else []
    if not root.is_dir():
        raise UsageError(f"--data {root}: no such folder; give a folder of class sub-folders (or with val/ or test/)")
    refuse_zoo_output(str(root), "to evaluate on: pass --data the held-out images' folder, one sub-folder per class")
    found = held_out_folder(root)       # in any case, and only where the training scan sees a split
    split, base = (os.path.relpath(found, root), Path(found)) if found else (".", root)
    index = {str(name): i for i, name in enumerate(aliases or ())}
    index.update({name: i for i, name in enumerate(labels)})
    index.update({class_key(name): i for name, i in list(index.items()) if class_key(name) not in index})
    items: list[tuple[str, int]] = []
    ignored: list[str] = []
    if found:       # (a split layout's top: `DIR/.test/` beside val/ was skipped without a word; training names it)
        list_classes(str(root), hidden)
    folders = [base / name for name in list_classes(str(base), hidden)]     # as the training scan lists them
    for d in folders:
        label = _label_of(d.name, index)
        if label is None:
            ignored.append(d.name)
            continue
        items.extend((p, label) for p in image_files(str(d), unlisted, others, hidden))
    hid = f" ({hidden_note(hidden, str(root))})" if hidden else ""     # (the refusals below: all images hidden)
    if not folders and found:       # an empty test/ (made for later) beside val/: "found: none" said nothing (QA)
        val = split_folder(root, VAL_NAMES) if split.lower() == "test" else None
        raise UsageError(f"--data {root}: {base} holds no class folders, and zoo eval scores {split}/ where there "
                         f"is one: put the held-out images in {base}/<class>/"
                         + (f", or give --data {val} to score the validation images" if val else ""))
    if len(ignored) == len(folders):
        shown = folder_names(ignored[:5], labels) or "none"
        if split == "." and split_folder(root, ("train",)):     # a split folder whose held-out part is missing
            raise UsageError(f"--data {root} has train/ but no test/ or val/ to evaluate on; put held-out images "
                             f"in {root / 'test'}/<class>/, or give --data {root / 'train'} to score the training "
                             "images (optimistic: the model has seen them)")
        for split_name, where, names in split_named_folders(base):    # a download's Training/ + Testing/ (review)
            if any(_label_of(n, index) is not None for n in names):
                seen = " (optimistic: the model has seen them)" if split_name == "train" else ""
                raise UsageError(f"--data {base}: its folders {shown} are no classes of the model, but {where}/ holds "
                                 f"them: give --data {base / where} to score its {split_name} images{seen}")
        raise UsageError(f"--data {base}: no class folder matches the model's labels (found: {shown}; "
                         f"labels: {', '.join(list(labels)[:5])}...){hid}; lay it out as <class>/<image>")
    if not items and unlisted:      # (it said "hold no images" of folders it could not read: review)
        raise UsageError(f"--data {base}: {len(unlisted)} folder(s) in it cannot be read, e.g. {unlisted[0][0]} "
                         f"({unlisted[0][1].split(':')[0]}), and no other holds an image: make them readable to "
                         "evaluate their images")
    if not items:
        raise UsageError(f"--data {base}: the class folders hold no images ({', '.join(IMAGE_EXTENSIONS)}){hid}")
    return split, items, ignored


def _label_of(folder: str, index: dict[str, int]) -> int | None:
    """The label a class folder's name is (``index``: names and aliases to labels), else None: named as finetune
    names a class whose folder name is not UTF-8; café composed or decomposed is one name."""
    name = printable_name(folder)
    return index[name] if name in index else index.get(class_key(name))


def folder_names(folders: Sequence[str], labels: Sequence[str]) -> str:
    """``A (the model's a, in another case), d``: class folders that are none of ``labels``, each named in another
    case than a label with it (:func:`~finetune.data.files.case_twin`; audit: its images were left out, its
    twin scored on none, and nothing said why)."""
    return ", ".join(printable(f) + (f" (the model's {printable(t)}, in another case)"
                                     if (t := case_twin(f, labels)) is not None else "") for f in folders)


def seen_in_training(folder: str | os.PathLike, data_folders: Mapping[str, Any] | None) -> str | None:
    """Whether ``folder`` (the one evaluated) is one the model learnt from, by the bundle's ``data_folders``
    (zoo.bundle.export: the run's absolute train and val folders): "train", "val" or None. By folder, not by
    file: the same folder moved or copied elsewhere is not recognised."""
    if not isinstance(data_folders, Mapping):
        return None
    here = os.path.realpath(folder)
    for kind in ("train", "val"):
        where = data_folders.get(kind)
        if isinstance(where, str) and os.path.realpath(where) == here:
            return kind
    return None


def classification_metrics(probs: np.ndarray, targets: np.ndarray, labels: Sequence[str]) -> dict[str, Any]:
    """Accuracy, top-5 (when C > 5), per-class precision/recall/support, confusion matrix. Pure numpy."""
    n_classes = len(labels)
    pred = probs.argmax(axis=1)
    cm = np.zeros((n_classes, n_classes), dtype=np.int64)
    np.add.at(cm, (targets, pred), 1)
    acc = float((pred == targets).mean()) if len(targets) else 0.0
    top5 = None
    if n_classes > 5:
        best5 = np.argsort(-probs, axis=1)[:, :5]
        top5 = float((best5 == targets[:, None]).any(axis=1).mean())
    confusion = cm.tolist()
    per_class: dict[str, dict[str, float | int | None]] = {
        name: {"precision": None if math.isnan(p) else p, "recall": None if math.isnan(r) else r, "support": support}
        for name, p, r, _f1, support in precision_recall(labels, confusion)}
    return {"accuracy": acc, "top5": top5, "per_class": per_class, "confusion": confusion}


def evaluate(model: torch.nn.Module, labels: Sequence[str], data_config: dict, data_dir: str | os.PathLike, *,
             tta: bool = False, tta_scales: Sequence[int] | None = None, tta_views: str = DEFAULT_TTA_VIEWS,
             batch_size: int = 32, progress: bool = False, worst: int = 20, on_error: OnError | None = None,
             aliases: Sequence[str] | None = None, data_folders: Mapping[str, Any] | None = None,
             mirror: bool = True) -> EvalReport:
    """Evaluate a classifier on a class-folder layout (see ``find_eval_images``, also for ``aliases``).

    The probabilities come from :func:`predict_probs` (with TTA: averaged over the views), and every
    metric from them. Unreadable images are skipped (and listed in the report), folders that cannot be
    listed too (``unreadable_folders``); ``on_error`` hears about each one. ``data_folders`` (a bundle's
    metadata) sets ``seen_in_training``; ``mirror=False`` leaves TTA's mirrored views out (``Bundle.tta_mirror``).
    """
    unlisted: list[tuple[str, str]] = []
    others: list[tuple[str, str]] = []
    hidden: list[tuple[str, int]] = []
    split, items, ignored = find_eval_images(data_dir, labels, aliases, unlisted, others, hidden)
    skipped: list[tuple[str, str]] = []

    def note(item: Any, reason: str) -> None:
        skipped.append((str(item), reason))
        if on_error is not None:
            on_error(item, reason)

    for path, reason in others:         # not in the accuracy, as the training scan leaves them out: said (QA)
        note(path, reason)

    for folder, reason in unlisted:     # a chmod 000 folder: its images are not in the accuracy, and it says so
        if on_error is not None:        # (a folder, not one skipped image: report.unreadable_folders)
            on_error(folder, reason)

    kept, probs = predict_probs(model, [p for p, _ in items], data_config, tta=tta, tta_scales=tta_scales,
                                tta_views=tta_views, batch_size=batch_size, progress=progress, on_error=note,
                                mirror=mirror)
    if not kept:
        raise UsageError(f"--data {data_dir}: none of the {len(items)} images could be read")
    if probs.shape[1] != len(labels):
        raise UsageError(f"the model has {probs.shape[1]} outputs but {len(labels)} labels; re-export the bundle")
    p = probs.numpy()
    targets = np.array([items[i][1] for i in kept], dtype=np.int64)
    m = classification_metrics(p, targets, labels)
    pred = p.argmax(axis=1)
    wrong_rows = [(float(p[j, pred[j]]), j) for j in range(len(kept)) if pred[j] != targets[j]]
    wrong_rows.sort(key=lambda r: -r[0])
    wrong = [{"path": items[kept[j]][0], "true": labels[targets[j]], "predicted": labels[pred[j]],
              "confidence": conf, "p_true": float(p[j, targets[j]])} for conf, j in wrong_rows[:worst]]
    return EvalReport(root=str(data_dir), split=split, labels=list(labels), n_images=len(kept),
                      accuracy=m["accuracy"], top5=m["top5"], per_class=m["per_class"], confusion=m["confusion"],
                      wrong=wrong, skipped=skipped, unreadable_folders=unlisted, ignored_folders=ignored,
                      hidden_folders=hidden,
                      tta=bool(tta or tta_scales),
                      tta_scales=list(tta_scales) if tta_scales else None,
                      tta_views=("ten" if tta_scales else tta_views) if (tta or tta_scales) else None,
                      tta_mirror=bool(mirror) if (tta or tta_scales) else None,
                      seen_in_training=seen_in_training(Path(data_dir) / split, data_folders))


_GLYPH_WARNING = r"Glyph .* missing from (current )?font"
_TICK_CHARS = 40       # confusion.png tick labels: a longer class name is cut (the csv files hold it whole)
_TICK_CLASSES = 40     # confusion.png names its classes up to this many; above, it draws the most-confused ones


@functools.lru_cache(maxsize=None)
def _charmap(path: str) -> frozenset[int]:
    try:
        return frozenset(FT2Font(path).get_charmap())
    except Exception:       # a font file matplotlib lists but cannot open: no glyphs from it
        return frozenset()


@functools.lru_cache(maxsize=None)
def _font_for(codepoint: int) -> str | None:
    """The family name of an installed font that draws ``codepoint`` (None: no font has it)."""
    for font in font_manager.fontManager.ttflist:
        # Last Resort draws a box for every code point: the placeholder this function exists to avoid.
        if "last resort" not in font.name.lower() and codepoint in _charmap(font.fname):
            return font.name
    return None


def plot_labels(labels: Sequence[str]) -> tuple[list[str], list[str]]:
    """Labels a matplotlib figure can draw, and the font families to draw them with.

    Control characters are escaped (``finetune.core.io.printable``); a character the default font lacks is
    drawn with the first installed font that has it (a CJK font, if there is one); a character no
    installed font has is written as its escape (``\\u732b``) instead of an empty box.
    """
    default = font_manager.findfont(font_manager.FontProperties(family=rcParams["font.family"]))
    have = _charmap(default)
    families = [font_manager.FontProperties(fname=default).get_name()]
    out = []
    for label in labels:
        text = []
        for ch in printable(label):
            if ord(ch) in have or ch.isspace():
                text.append(ch)
                continue
            family = _font_for(ord(ch))
            if family is None:
                text.append(ch.encode("unicode_escape").decode("ascii"))
                continue
            if family not in families:
                families.append(family)
            text.append(ch)
        out.append("".join(text))
    return out, families


def _confusion_png(confusion: list[list[int]], labels: Sequence[str], path: Path) -> None:
    # Figure + Agg canvas directly: no pyplot state, no global backend switch, safe in threads.
    cm = np.asarray(confusion)
    n, title = len(labels), "confusion matrix"
    keep = confused_classes(confusion, _TICK_CLASSES) if n > _TICK_CLASSES else []
    if keep:    # (many-classes audit: 1,000 classes drew a diagonal line, each mistake a pale pixel) fastai's view
        cm, labels = cm[np.ix_(keep, keep)], [labels[i] for i in keep]
        title = f"confusion among the most-confused pairs' {len(keep)} of {n} classes (all: confusion.csv)"
        n = len(keep)
    side = min(24.0, max(4.0, 0.45 * n + 2.5))
    fig = Figure(figsize=(side, side))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    im = ax.imshow(cm, cmap="Blues")
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
    if n <= _TICK_CLASSES:
        names, families = plot_labels([x if len(x) <= _TICK_CHARS else x[:_TICK_CHARS - 3] + "..."
                                       for x in map(str, labels)])
        # parse_math off: a class `$5 to $10` is text, not math (audit: `$\frac$` was a ParseSyntaxException)
        ax.set_xticks(range(n), names, rotation=90, fontsize=8, fontfamily=families, parse_math=False)
        ax.set_yticks(range(n), names, fontsize=8, fontfamily=families, parse_math=False)
    if n <= 20:
        thresh = cm.max() / 2 if cm.size else 0
        for i in range(n):
            for j in range(n):
                ax.text(j, i, str(cm[i, j]), ha="center", va="center", fontsize=8,
                        color="white" if cm[i, j] > thresh else "black")
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title)
    with warnings.catch_warnings():
        # plot_labels leaves no glyph missing; this only keeps an odd font's quirk off the console
        warnings.filterwarnings("ignore", message=_GLYPH_WARNING, category=UserWarning)
        # a figure too small for its labels is drawn as it is: matplotlib's note named its own file and line
        warnings.filterwarnings("ignore", message="Tight layout not applied", category=UserWarning)
        fig.tight_layout()
        atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=100))


def write_eval_reports(report: EvalReport, out_dir: str | os.PathLike) -> dict[str, Path]:
    """metrics.json, per_class.csv, confusion.csv, confusion.png, wrong.csv (atomic writes)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {name: out / name for name in
             ("metrics.json", "per_class.csv", "confusion.csv", "confusion.png", "wrong.csv")}
    doc = report.to_dict()
    write_json(paths["metrics.json"], doc, indent=2, ensure_ascii=False)
    atomic_write_text(paths["per_class.csv"], csv_text(
        [("class", "precision", "recall", "support")]
        + [(c, v["precision"], v["recall"], v["support"]) for c, v in report.per_class.items()]))
    atomic_write_text(paths["confusion.csv"], confusion_csv_text(report.labels, report.confusion))
    _confusion_png(report.confusion, report.labels, paths["confusion.png"])
    atomic_write_text(paths["wrong.csv"], csv_text(
        [("path", "true", "predicted", "confidence", "p_true")]
        + [(w["path"], w["true"], w["predicted"], f"{w['confidence']:.6f}", f"{w['p_true']:.6f}")
           for w in doc["most_confidently_wrong"]]))
    return paths
