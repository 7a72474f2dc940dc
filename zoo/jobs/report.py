"""``zoo report RUN`` behind the command: the run's confidently wrong validation images, then the page.

The page itself is ``finetune.tools.pages``; the predictions come from the run's bundle (RUN/export, or a
temporary export of checkpoints/best.safetensors when the run was made with --no-export), evaluated on
the validation images split.json lists.
"""
from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any, Callable

from finetune.core.errors import DataError
from finetune.core.io import printable
from finetune.tools.htmlpage import GENERATOR
from finetune.tools.pages import write_run_report
from zoo.bundle import export_run, load_bundle
from zoo.errors import BundleError, UsageError
from zoo.outdir import KINDS, MARKER, folder_kind, still_training
from zoo.predict import predict_probs

__all__ = ["confident_mistakes", "rank_mistakes", "make_report"]

Log = Callable[[str], None]


def confident_mistakes(run_dir: str | Path, *, top: int = 12, device: str = "cpu",
                       progress: bool = False) -> list[dict[str, Any]]:
    """The ``top`` validation images predicted wrong with the highest probability, worst first.

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
    with tempfile.TemporaryDirectory(prefix="zoo-report-") as tmp:
        where = run / "export" if (run / "export" / "model.safetensors").is_file() else export_run(run, tmp)
        bundle = load_bundle(where, device=device)
        kept, probs = predict_probs(bundle.model, [p for p, _ in val], bundle.data_config, progress=progress,
                                    on_error=lambda _item, _why: None)
    return rank_mistakes([val[i] for i in kept], bundle.labels, probs, top=top)


def rank_mistakes(images: list[tuple[Any, str]], labels: list[str], probs, *, top: int = 12) -> list[dict[str, Any]]:
    """The ``top`` of ``images`` ((path, true class name), one row of ``probs`` [n, C] each) predicted wrong
    with the highest probability, worst first: dicts ``path``, ``true``, ``predicted``, ``prob``."""
    out = []
    for (path, true), p in zip(images, probs):
        pred = int(p.argmax())
        if labels[pred] != true:
            out.append({"path": str(path), "true": true, "predicted": labels[pred], "prob": float(p[pred])})
    out.sort(key=lambda m: -m["prob"])
    return out[:top]


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
    [n, C] under the run's best weights), when the caller has them (``zoo finetune`` keeps those of its last
    evaluation); otherwise the bundle predicts the validation images again.

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
        else:
            mistakes = confident_mistakes(run, top=top, device=device, progress=progress)
    except (BundleError, DataError) as e:
        if log is not None:
            log(f"report: no thumbnails of wrong predictions ({e})")
        mistakes, why_none = [], str(e)
    return write_run_report(run, mistakes, why_none=why_none, training=still_training(run))
