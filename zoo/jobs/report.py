"""``zoo report RUN`` behind the command: the run's confidently wrong validation images, then the page.

The page itself is ``finetune.tools.pages``; the predictions come from RUN/val_predictions.json, which the run
writes at its end (each validation image's predicted class and probability under its best weights), while it is
the current weights' and the images split.json lists; otherwise from the run's bundle (RUN/export, or a
temporary export of checkpoints/best.safetensors when the run was made with --no-export), evaluated on
those validation images again.
"""
from __future__ import annotations

import json
import math
import tempfile
from pathlib import Path
from typing import Any, Callable

from finetune.core.errors import DataError
from finetune.core.checkpoint import DIGEST_KEY
from finetune.core.io import SafetensorsHeaderError, printable, read_json_object, read_safetensors_header, write_json
from finetune.tools.htmlpage import GENERATOR
from finetune.tools.pages import write_run_report
from zoo.bundle import export_run, load_bundle
from zoo.errors import BundleError, UsageError
from zoo.outdir import KINDS, MARKER, folder_kind, still_training
from zoo.predict import predict_probs

__all__ = ["confident_mistakes", "rank_mistakes", "make_report", "VAL_PREDICTIONS", "save_val_predictions"]

Log = Callable[[str], None]
# What the page needs of the run's last evaluation, kept in the run folder (zoo.outdir lists it): each validation
# image's most probable class and its probability, not the [n, C] table (thousands of classes x images)
VAL_PREDICTIONS = "val_predictions.json"
_FORMAT = 1


def confident_mistakes(run_dir: str | Path, *, top: int = 12, device: str = "cpu",
                       progress: bool = False) -> list[dict[str, Any]]:
    """The ``top`` validation images predicted wrong with the highest probability, worst first: from
    RUN/val_predictions.json while it is current (``_saved_predictions``), else predicted again by the bundle.

    Returns:
        dicts ``path`` (absolute), ``true``, ``predicted``, ``prob``; [] when the run has no val split.
    Raises:
        BundleError: no usable weights in the run folder.
        DataError: split.json lists validation images and none of them is where the run read it.
    """
    run = Path(run_dir)
    try:
        split = json.loads((run / "split.json").read_text(encoding="utf-8"))
        root = Path(json.loads((run / "scan.json").read_text(encoding="utf-8"))["root"])
        listed = split.get("val") or []
        val = [(root / rel, cls) for rel, cls in listed if (root / rel).is_file()]
    except (OSError, ValueError, KeyError, TypeError, AttributeError):   # damaged: the page goes without thumbnails
        return []
    if not val:
        if listed:      # QA (helper-137): the page said "None" of a run that got images wrong
            raise DataError(f"none of the run's {len(listed)} validation images is in {printable(root)}, where it "
                            "trained (the data folder was moved or deleted); put it back there and run zoo report "
                            "RUN again")
        return []
    saved = _saved_predictions(run, val, len(listed))
    if saved is not None:
        return _rank(val, *saved, top=top)
    with tempfile.TemporaryDirectory(prefix="zoo-report-") as tmp:
        where = run / "export" if (run / "export" / "model.safetensors").is_file() else export_run(run, tmp)
        bundle = load_bundle(where, device=device)
        kept, probs = predict_probs(bundle.model, [p for p, _ in val], bundle.data_config, progress=progress,
                                    on_error=lambda _item, _why: None)
    return rank_mistakes([val[i] for i in kept], bundle.labels, probs, top=top)


def rank_mistakes(images: list[tuple[Any, str]], labels: list[str], probs, *, top: int = 12) -> list[dict[str, Any]]:
    """The ``top`` of ``images`` ((path, true class name), one row of ``probs`` [n, C] each) predicted wrong
    with the highest probability, worst first: dicts ``path``, ``true``, ``predicted``, ``prob``."""
    return _rank(images, labels, *_top1(probs), top=top)


def _top1(probs) -> tuple[list[int | None], list[float | None]]:
    """Each row's most probable class (the first of a tie) and its probability; None and None for a row of NaN
    (an image the run could not read: ``finetune.engine.FitResult.val_probs``). ``probs`` [n, C], a torch tensor or
    a numpy array: one argmax over the table (6x the row-by-row loop at 50,000 x 1,000: 0.1-0.16 s; docs/benchmarks.md,
    "One argmax for the report's top-1"), a row of NaN's landing on a NaN as the row's own argmax did."""
    if len(probs) == 0:
        return [], []
    index = probs.argmax(1)
    preds, prob = index.tolist(), probs[range(len(index)), index].tolist()
    return [None if math.isnan(x) else i for i, x in zip(preds, prob)], [None if math.isnan(x) else x for x in prob]


def _rank(images: list[tuple[Any, str]], labels: list[str], preds: list[int | None], prob: list[float | None], *,
          top: int) -> list[dict[str, Any]]:
    out = []
    for (path, true), pred, p in zip(images, preds, prob):
        if pred is not None and labels[pred] != true:       # (None: not predicted, the image was unreadable)
            out.append({"path": str(path), "true": true, "predicted": labels[pred], "prob": p})
    out.sort(key=lambda m: -m["prob"])
    return out[:top]


def _weights_id(run: Path) -> dict[str, Any]:
    """What identifies the weights `zoo report` would predict with, from what the run records (headers only, no
    hashing): the digest checkpoints/best.safetensors carries, and RUN/export's recorded weights_sha256 (None
    without a bundle). {} when best.safetensors records none (the saved predictions are then never used)."""
    try:
        best = (read_safetensors_header(run / "checkpoints" / "best.safetensors").get("__metadata__") or {}).get(
            DIGEST_KEY)
    except (OSError, SafetensorsHeaderError, AttributeError):     # missing or damaged: the bundle says why
        return {}
    export = (read_json_object(run / "export" / "config.json").get("zoo") or {}).get("weights_sha256") \
        if (run / "export" / "model.safetensors").is_file() else None
    return {"best": best, "export": export} if best else {}


def save_val_predictions(run_dir: str | Path, images: list[tuple[Any, str]], labels: list[str], probs) -> None:
    """RUN/val_predictions.json (atomic): the most probable class and its probability of each of ``images``
    ((path, true class name), in the order of split.json's val) under the run's current weights, which it names;
    null and null for an image the run could not read (a row of NaN in ``probs``), which has no thumbnail.

    Raises:
        OSError: it could not be written.
    """
    run = Path(run_dir)
    weights = _weights_id(run)
    if not weights:
        return
    preds, prob = _top1(probs)
    write_json(run / VAL_PREDICTIONS, {"format": _FORMAT, "weights": weights, "classes": list(labels),
                                       "images": [[str(p), c] for p, c in images], "predicted": preds, "prob": prob})


def _saved_predictions(run: Path, val: list[tuple[Path, str]], listed: int) -> tuple[list[str], list[int | None],
                                                                                      list[float | None]] | None:
    """(classes, predicted, prob) of RUN/val_predictions.json when they are of the weights `zoo report` would
    load and of ``val``, the ``listed`` validation images all where the run read them, in the same order; None
    otherwise (no file, damaged, other weights, images moved): the caller predicts them again."""
    saved = read_json_object(run / VAL_PREDICTIONS)
    if not saved or saved.get("format") != _FORMAT or len(val) != listed:
        return None
    try:
        classes, preds, prob = saved["classes"], saved["predicted"], saved["prob"]
        same = (saved["images"] == [[str(p), c] for p, c in val] and len(preds) == len(prob) == len(val)
                and all(i is None or isinstance(i, int) and 0 <= i < len(classes) for i in preds)
                and all((i is None) == (x is None) and (x is None or isinstance(x, float)) for i, x in zip(preds, prob))
                and all(isinstance(c, str) for c in classes))
    except (KeyError, TypeError):
        return None
    if not same or saved.get("weights") != _weights_id(run):
        return None
    return classes, preds, prob


def _drawn_by_zoo(page: Path) -> bool:
    """Whether ``page`` is a page zoo drew (its generator tag near the top): another tool's page beside its
    metrics.csv is not replaced (QA), zoo's own is redrawn, in a run folder without zoo's marker too (a run
    from before the marker, a copy that left out hidden files)."""
    try:
        with open(page, "rb") as fh:
            return GENERATOR.encode() in fh.read(4096)
    except OSError:
        return False


def make_report(run_dir: str | Path, *, top: int = 12, device: str = "cpu", log: Log | None = None,
                progress: bool = False,
                val_predictions: tuple[list[tuple[Any, str]], list[str], Any] | None = None) -> Path:
    """Write RUN/report.html; returns its path.

    ``val_predictions``: (validation images as (path, true class name), the class names, their probabilities
    [n, C] under the run's best weights, a row of NaN for an image the run could not read), when the caller has
    them (``zoo finetune`` keeps those of its last evaluation): they are also saved as RUN/val_predictions.json
    for a later ``zoo report``; otherwise they come from that file, or the bundle predicts the validation images
    again (:func:`confident_mistakes`).

    Raises:
        UsageError: ``run_dir`` is not a run folder, or its report.html is not zoo's (a folder without zoo's
            marker: another tool's metrics.csv and page).
    """
    run = Path(run_dir)
    bundle = (run / "model.safetensors").is_file() and (run / "config.json").is_file()    # (copied: no marker)
    kind = "export" if bundle else folder_kind(run)
    if kind in KINDS and kind != "finetune" and not (run / "summary.json").is_file():   # QA (helper-137)
        where = {"export": (f"`zoo report {run.parent}` draws the run it was exported from"
                            if (run.parent / "summary.json").is_file() else "give the run folder it was exported from"),
                 "doctor": f"its page is {run / 'report.html'}",
                 "sweep": f"its table is {run / 'results.csv'} and its plot {run / 'sweep.png'}"}.get(kind, "")
        raise UsageError(f"{run} is {KINDS[kind].what} ({KINDS[kind].folder}), not a run folder of `zoo finetune`"
                         f"{'; ' + where if where else ''}; nothing was written")
    if not (run / "summary.json").is_file() and not (run / "metrics.csv").is_file():
        raise UsageError(f"{run} is not a finished run folder of `zoo finetune` (no summary.json or metrics.csv); "
                         "pass the folder a run wrote, e.g. runs/<model>-<time>")
    if (run / "report.html").exists() and folder_kind(run) != "finetune" and not _drawn_by_zoo(run / "report.html"):
        raise UsageError(f"{run} is not a run folder zoo wrote (no {MARKER}) and its report.html is not zoo's to "
                         "replace; pass the folder a `zoo finetune` run wrote (a copy that left out the hidden "
                         f"{MARKER}: copy it too, or move report.html away); nothing was written")
    why_none = ""
    try:
        if top <= 0:
            mistakes = []
        elif val_predictions is not None:
            images, classes, probs = val_predictions
            mistakes = rank_mistakes(images, classes, probs, top=top)
            try:        # (the run's end: `zoo report RUN` reads them instead of predicting val again)
                save_val_predictions(run, images, classes, probs)
            except OSError as e:
                if log is not None:
                    log(f"report: {VAL_PREDICTIONS} not written ({e}); `zoo report` will predict val again")
        else:
            mistakes = confident_mistakes(run, top=top, device=device, progress=progress)
    except (BundleError, DataError) as e:
        if log is not None:
            log(f"report: no thumbnails of wrong predictions ({e})")
        mistakes, why_none = [], str(e)
    return write_run_report(run, mistakes, why_none=why_none, training=still_training(run))
