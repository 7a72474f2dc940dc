"""The two HTML pages: ``DOCTOR/report.html`` (what ``finetune.tools.doctor`` found) and ``RUN/report.html``
(a run folder drawn as one page). Both are single self-contained files (finetune.tools.htmlpage): inline CSS
and SVG, thumbnails as data: URIs, no script and no external URL; every user string is escaped.

The run page reads only what the run folder holds (scan.json, summary.json, confusion.csv, config.yaml,
metrics.csv); the most confidently wrong validation images need the model's predictions, which the caller
passes in (``zoo.jobs.report`` computes them with the exported bundle).

Many classes: up to ``FULL_MAX_CLASSES`` (finetune.core.confusion) the page shows every class's counts, its
precision/recall and the whole confusion matrix. Above it, a table per class or a C x C matrix would be
unreadable and huge (2,000 classes: 4 million cells, 88 MB), so the page shows the ``TOP_ROWS`` classes with
the fewest training images, the ``TOP_ROWS`` worst classes (lowest recall, then F1) and the ``TOP_ROWS`` most
confused (true, predicted) pairs, each with how many more there are, and points to scan.json and
confusion.csv for the rest: at 2,000 classes some 15 KB plus the thumbnails, drawn in half a second.
"""
from __future__ import annotations

import csv
import json
import math
import statistics
from pathlib import Path
from typing import Any, Sequence

from finetune.tools.htmlpage import esc, heatmap, line_chart, page, section, table, thumbnail_uri
from finetune.core.config import short_repr
from finetune.core.confusion import FULL_MAX_CLASSES, most_confused, precision_recall, read_confusion_csv
from finetune.core.io import atomic_write_text, load_yaml, read_json_object, read_user_text
from finetune.core.metrics import accuracy_text, as_fraction, probability_text

__all__ = ["doctor_html", "run_report_html", "write_run_report", "read_history", "TOP_ROWS"]

_PER_KIND = 24     # findings of each kind the doctor page shows with thumbnails
TOP_ROWS = 20      # rows of each per-class list above FULL_MAX_CLASSES classes (the rest: scan.json, confusion.csv)

_FINDING_TITLES = {
    "leak": "Leaks: the same image in two splits", "cross_class_duplicate": "Copies filed under two classes",
    "duplicate": "Duplicates within a class", "wrong_label": "Likely wrong labels",
    "outlier": "Outliers: far from every class", "unreadable": "Unreadable files", "tiny": "Tiny images",
    "aspect": "Extreme aspect ratios", "small_class": "Small classes", "scan_warning": "Scan warnings",
}
_WITH_IMAGES = ("leak", "cross_class_duplicate", "duplicate", "wrong_label", "outlier")


def _figure(path: Path, caption: str, size: int = 160) -> str:
    uri = thumbnail_uri(str(path), size)
    img = f"<img src=\"{uri}\" alt=\"{esc(path.name)}\" loading=\"lazy\">" if uri else "<p>(unreadable)</p>"
    return f"<figure>{img}<figcaption>{caption}</figcaption></figure>"


def _probe_strength(l2: float, fold_l2: Sequence[float]) -> str:
    """The summary's " (L2 x)": the probe's strength, or the range its folds were scored at when they differ
    (labels.fold_strengths: folds 0 and 1 at each other's choice); no probe ran: nothing."""
    used = sorted({v for v in fold_l2 if math.isfinite(v)})
    if len(used) > 1:
        return f" (L2 {used[0]:.3g}-{used[-1]:.3g} by fold)"
    return f" (L2 {l2:.3g})" if math.isfinite(l2) else ""


def doctor_html(result: Any, *, title: str | None = None) -> str:
    """The doctor page: counts, then each kind of finding (the first ``_PER_KIND`` with thumbnails)."""
    root = Path(result.root)
    counts = result.by_kind()
    cards = "".join(f"<div class=\"card\"><b class=\"{'bad' if n else 'ok'}\">{n}</b>{esc(k.replace('_', ' '))}</div>"
                    for k, n in counts.items())
    strength = _probe_strength(result.probe_l2, result.probe_fold_l2)
    body = [section("Summary", f"<div class=\"cards\">{cards}</div>"
                    f"<p>{result.images} images, {len(result.classes)} classes; linear-probe out-of-fold accuracy "
                    f"{accuracy_text(result.probe_accuracy)}{strength}; near-duplicate threshold "
                    f"cosine {result.near_used:.3g}.</p>"),
            section("Images per class", _counts_table(result.classes, result.counts, "doctor.json"))]
    by_kind: dict[str, list] = {}
    for f in result.findings:
        by_kind.setdefault(f.finding, []).append(f)
    for kind, items in by_kind.items():
        shown = items[:_PER_KIND]
        rows = table(["path", "score", "other / suggested", "split", "class", "detail"],
                     [[f.path, float(f.score), f.other, f.split, f.label, f.detail] for f in shown])
        more = f"<p>{len(items) - len(shown)} more in findings.csv.</p>" if len(items) > len(shown) else ""
        figs = ""
        if kind in _WITH_IMAGES:
            cells = []
            for f in shown[:12]:
                cap = f"<span class=\"path\">{esc(f.path)}</span><br>{esc(f.detail)}"
                cells.append(_figure(root / f.path, cap))
                if kind in ("leak", "duplicate", "cross_class_duplicate") and f.other:
                    cells.append(_figure(root / f.other, f"<span class=\"path\">{esc(f.other)}</span><br>its copy"))
            figs = f"<div class=\"grid\">{''.join(cells)}</div>"
        body.append(section(f"{_FINDING_TITLES.get(kind, kind)} ({len(items)})", figs + rows + more))
    if not result.findings:
        body.append(section("Findings", "<p class=\"ok\">Nothing found.</p>"))
    secs = ", ".join(f"{k} {v:.1f} s" for k, v in result.seconds.items())
    body.append(f"<p class=\"sub\">Time: {esc(secs)}.</p>")
    return page(title or "zoo doctor", f"{result.root}", "".join(body))


# ------------------------------------------------------------------------------------ run report
def read_history(path: Path) -> list[dict[str, Any]]:
    """metrics.csv rows with numbers as floats (empty / unparsable cells: NaN)."""
    rows = []
    with open(path, newline="", encoding="utf-8") as fh:
        for row in csv.DictReader(fh):
            out: dict[str, Any] = {}
            for k, v in row.items():
                try:
                    out[k] = float(v) if k != "phase" else v
                except (TypeError, ValueError):
                    out[k] = math.nan
            rows.append(out)
    return rows


def run_report_html(run_dir: str | Path, mistakes: Sequence[dict[str, Any]] = (),
                    excluded: Sequence[str] = (), why_none: str = "", training: bool = False) -> str:
    """The run page from the files in ``run_dir``.

    Args:
        mistakes: the most confidently wrong validation images, worst first: dicts with ``path``
            (absolute), ``true``, ``predicted``, ``prob``.
        excluded: paths left out of the run (``zoo finetune --exclude``).
        why_none: why ``mistakes`` could not be computed (the page says it instead of "None").
        training: a live process still trains the run (its lock is held): an unfinished page says so, not to resume.
    """
    run = Path(run_dir)
    scan, summary = read_json_object(run / "scan.json"), read_json_object(run / "summary.json")
    model = read_json_object(run / "model.json")
    body = []

    # --- result first: what a reader looks for
    metrics = summary.get("metrics") or {}
    cards = [("best epoch", summary.get("best_epoch", "-")),
             ("val acc", accuracy_text(metrics.get("val_acc"))),
             ("val loss", f"{metrics['val_loss']:.4f}" if isinstance(metrics.get("val_loss"), float) else "-"),
             ("epochs run", summary.get("epochs_run", "-")),
             ("seconds", f"{summary['seconds']:.0f}" if isinstance(summary.get("seconds"), (int, float)) else "-")]
    # QA (helper-137): a run killed mid-way (no summary.json) showed "-" cards and "the curves look healthy";
    # (helper-138) one still training was told to resume, which its lock refuses
    unfinished = "" if summary else "<p class=\"bad\">Not finished: " + (
        "the run is still training (it draws this page again when it ends)." if training else
        "the run stopped before its end (no summary.json); <code>zoo finetune --resume RUN</code> continues it."
    ) + " The page shows the epochs metrics.csv holds; the result and the advice come at the end.</p>"
    body.append(section("Result", unfinished + "<div class=\"cards\">" + "".join(
        f"<div class=\"card\"><b>{esc(v)}</b>{esc(k)}</div>" for k, v in cards) + "</div>"))

    advice = summary.get("advice") or []
    body.append(section("Advice", "<ul class=\"advice\">" + "".join(f"<li>{esc(a)}</li>" for a in advice) + "</ul>"
                        if advice else "<p>Not given yet: it comes at the end of the run.</p>" if not summary
                        else "<p class=\"ok\">No advice fired: the curves look healthy.</p>"))

    # --- data
    if scan:
        body.append(_data_section(scan, excluded))

    # --- freeze decision
    freeze = summary.get("freeze") or {}
    if freeze:
        body.append(section("Freeze decision", f"<p><b>{esc(freeze.get('label', ''))}</b> "
                            f"({esc(freeze.get('trainable_stages', ''))} trainable stage(s)): "
                            f"{esc(freeze.get('reason', ''))}</p>"))

    # --- curves
    if (run / "metrics.csv").is_file():
        body.append(_curves_section(run, summary))

    # --- per class
    matrix = _confusion(run, summary, summary.get("classes") or model.get("classes") or [])
    if matrix is not None:
        body.append(_per_class_section(*matrix))

    # --- mistakes
    if mistakes:
        figs = "".join(_figure(Path(m["path"]), f"<b>{esc(m['predicted'])}</b> ({esc(probability_text(m['prob']))}), "
                               f"true {esc(m['true'])}<br><span class=\"path\">{esc(Path(m['path']).name)}</span>")
                       for m in mistakes)
        body.append(section("Most confidently wrong validation images", f"<div class=\"grid\">{figs}</div>"))
    elif why_none:
        body.append(section("Most confidently wrong validation images", f"<p>Not drawn: {esc(why_none)}</p>"))
    elif matrix is not None:
        body.append(section("Most confidently wrong validation images", "<p>None (or not computed).</p>"))

    # --- config
    if (run / "config.yaml").is_file():
        body.append(_config_section(run / "config.yaml", summary))
    sub = f"{model.get('model', '')} ({model.get('builder', '')}) - {run}"
    return page(f"Run report: {model.get('model') or run.name}", sub, "".join(body))


def _confusion(run: Path, summary: dict[str, Any], classes: Sequence[str]) -> tuple[list[str], list] | None:
    """(classes, validation confusion matrix): summary.json's own, else the CSV it names (summary.json leaves
    the matrix out above FULL_MAX_CLASSES classes); None when the run has neither (no validation split)."""
    conf = (summary.get("metrics") or {}).get("confusion")
    if conf and classes:
        return list(classes), conf
    name = summary.get("confusion_csv")
    if not isinstance(name, str) or not (run / Path(name).name).is_file():   # a file of the run folder only
        return None
    try:
        return read_confusion_csv(run / Path(name).name)
    except (OSError, ValueError):       # a damaged CSV costs the section, never the page
        return None


def _per_class_section(classes: list[str], conf: Sequence[Sequence[int]]) -> str:
    """Precision/recall per class and the confusion matrix; above FULL_MAX_CLASSES classes the TOP_ROWS worst
    classes (lowest recall, then F1; the larger class first) and most confused pairs instead."""
    title, header = "Per class (validation, best weights)", ["class", "precision", "recall", "F1", "support"]
    rows = precision_recall(classes, conf)
    if len(classes) <= FULL_MAX_CLASSES:
        return section(title, table(header, _as_percent(rows)) + "<h3>Confusion matrix</h3>" + heatmap(classes, conf))

    def badness(row: list[Any]) -> tuple:
        _, _, recall, f1, support = row
        return math.isnan(recall), 0.0 if math.isnan(recall) else recall, 0.0 if math.isnan(f1) else f1, -support

    worst = sorted(rows, key=badness)[:TOP_ROWS]
    pairs = most_confused(classes, conf, TOP_ROWS)
    wrong = sum(sum(r) for r in conf) - sum(conf[i][i] for i in range(len(conf)))
    cells = sum(len(r) - r.count(0) - (r[i] != 0) for i, r in enumerate(conf))    # off-diagonal, not empty
    csv_note = (f"<p>{len(classes)} classes: too many for a readable confusion matrix; the full matrix (rows: true "
                "class, columns: predicted) is in <span class=\"path\">confusion.csv</span> in the run folder.</p>")
    return section(title, csv_note + f"<h3>The {len(worst)} worst classes</h3><p class=\"sub\">Lowest recall "
                   "first, then lowest F1.</p>" + table(header, _as_percent(worst))
                   + _more(len(classes) - len(worst), "classes")
                   + f"<h3>Most confused pairs</h3><p class=\"sub\">{wrong} misclassified validation image(s); "
                   "the cells of the matrix with the most images.</p>"
                   + table(["true class", "predicted as", "images", "share of the true class"],
                           [[t, p, n, f"{share:.0%}"] for t, p, n, share in pairs])
                   + _more(cells - len(pairs), "pairs with at least one image"))


def _as_percent(rows: list[list[Any]]) -> list[list[Any]]:
    """precision_recall's rows as shown: precision, recall and F1 in percent (accuracy_text), as zoo eval prints."""
    return [[name, accuracy_text(p), accuracy_text(r), accuracy_text(f1), support] for name, p, r, f1, support in rows]


def _more(n: int, what: str) -> str:
    return f"<p>... and {n} more {what}.</p>" if n > 0 else ""


def _data_section(scan: dict[str, Any], excluded: Sequence[str]) -> str:
    """The data section: images per class and split (above FULL_MAX_CLASSES classes, the spread per split and
    the TOP_ROWS classes with the fewest training images), skipped and excluded files, the scan's warnings."""
    extra = [f"<p>Folder <span class=\"path\">{esc(scan.get('root', ''))}</span>, layout "
             f"{esc(scan.get('layout', ''))}, imbalance {esc(scan.get('imbalance'))}.</p>"]
    bad = scan.get("bad_files") or []
    if bad:
        extra.append(f"<p class=\"bad\">{len(bad)} unreadable file(s) skipped: "
                     + ", ".join(f"<span class=\"path\">{esc(b.get('path'))}</span>" for b in bad[:10]) + "</p>")
    extra += [f"<p class=\"bad\">warning: {esc(w)}</p>" for w in scan.get("warnings") or []]
    if excluded:
        extra.append(f"<p>{len(excluded)} file(s) excluded (exclude.txt): "
                     + ", ".join(f"<span class=\"path\">{esc(p)}</span>" for p in excluded[:10])
                     + (" ..." if len(excluded) > 10 else "") + "</p>")
    counts = _counts_table(scan.get("classes") or [], scan.get("counts") or {}, "scan.json in the run folder")
    return section("Data", "".join(extra) + counts)


def _counts_table(classes: Sequence[str], counts: dict[str, dict[str, int]], where: str) -> str:
    """Images per class and split (``counts``: split -> class -> images) as a table; above FULL_MAX_CLASSES
    classes the spread per split and the TOP_ROWS classes with the fewest training images, the rest in ``where``."""
    rows = [[c] + [counts[s].get(c, 0) for s in counts] for c in classes]
    if len(rows) <= FULL_MAX_CLASSES:
        return table(["class", *counts], rows)
    spread = "; ".join(f"{esc(s)} {min(n)} to {max(n)} (median {statistics.median(n):g})"
                       for s, n in ((s, [r[k + 1] for r in rows]) for k, s in enumerate(counts)))
    shown = sorted(rows, key=lambda r: r[1:])[:TOP_ROWS]
    return (f"<p>{len(classes)} classes; images per class: {spread}. Below, the {len(shown)} with the fewest "
            f"training images; {esc(where)} has every class's counts.</p>"
            + table(["class", *counts], shown) + _more(len(classes) - len(shown), "classes"))


def _curves_section(run: Path, summary: dict[str, Any]) -> str:
    """The curves from metrics.csv (loss, accuracy, learning rate), or the head solve's when it was one step;
    a metrics.csv that cannot be read as CSV text is said to be so, as other damaged run files are left out."""
    try:
        hist = read_history(run / "metrics.csv")
    except (OSError, ValueError, csv.Error) as e:     # (UnicodeDecodeError is a ValueError)
        return section("Curves", f"<p>metrics.csv cannot be read ({esc(type(e).__name__)}): the curves are not "
                                 "shown; the run's summary.json and checkpoints are unaffected</p>")
    ep = [r.get("epoch", math.nan) for r in hist]
    best = [float(summary["best_epoch"])] if isinstance(summary.get("best_epoch"), (int, float)) else []
    # dotted line where the head phase ends (the unfreeze)
    for a, b in zip(hist, hist[1:]):
        if a.get("phase") != b.get("phase"):
            best.append((a["epoch"] + b["epoch"]) / 2)
    solver = summary.get("head_solver") or []
    if solver and len(hist) < 2:
        # a head solved in one step: its curves are one point each; what the run did is the solve
        c = [math.log10(p["C"]) for p in solver]
        chosen = [math.log10(p["C"]) for p in solver if p.get("chosen")]
        charts = [line_chart("validation loss against log10 C", c, {"val": [p["val_loss"] for p in solver]},
                             marks=chosen),
                  line_chart("validation accuracy against log10 C", c, {"val": [p["val_acc"] for p in solver]},
                             percent=True, marks=chosen)]
        return section("Head solve", "<p class=\"sub\">The head was solved on cached features by L-BFGS "
                       "for each L2 strength (1 / (C x images)), strongest first; dashed: the C kept "
                       "(best validation accuracy, then loss).</p>" + "".join(charts))
    charts = [line_chart("loss", ep, {"train": [r.get("train_loss") for r in hist],
                                       "val": [r.get("val_loss") for r in hist]}, marks=best),
              line_chart("accuracy", ep, {k: as_fraction([r.get(f"{k}_acc") for r in hist]) for k in ("train", "val")},
                         percent=True, marks=best),      # (a history in percent read as curves.png reads it)
              line_chart("learning rate (log)", ep, {"lr": [r.get("lr") for r in hist]}, log_y=True)]
    return section("Curves", "<p class=\"sub\">Dashed: best epoch and the end of the head phase.</p>"
                   + _mirror_note(summary) + "".join(charts))


def _mirror_note(summary: dict[str, Any]) -> str:
    """One line on the mirror test (``--hflip`` auto in a run that trains layers), when the run made it."""
    m = summary.get("mirror")
    if not isinstance(m, dict):
        return ""
    what = ("the images have a handedness: the run trained without flips" if m.get("dropped")
            else "no handedness: flips kept")
    return (f"<p class=\"sub\">Mirror test: the features tell a training image from its mirror, given its class, "
            f"{_pct(m.get('score'))} of the time (95% lower bound {_pct(m.get('low'))}, threshold "
            f"{_pct(m.get('threshold'))}, {m.get('images', '-')} images): {what}.</p>")


def _pct(v: Any) -> str:
    return f"{v:.0%}" if isinstance(v, (int, float)) else "-"


def _unused_note(option: str, value: bool, summary: dict[str, Any]) -> str:
    """`` (no effect on cpu)`` where the run did not use ``option``, set to ``value`` in config.yaml (summary.json's
    ``in_effect``), or, for a run whose epochs ran with other device options (``in_effect_by_epochs``: begun on the
    CPU, resumed on CUDA, or a resume given --no-amp), the epochs that differ from ``value``: `` (no effect on
    cpu: epochs 1-2)``, `` (off in epochs 3-4)``; else nothing."""
    parts = summary.get("in_effect_by_epochs")
    if not (isinstance(parts, list) and all(isinstance(p, dict) and isinstance(p.get("in_effect"), dict)
                                            and isinstance(p.get("epochs"), list) and len(p["epochs"]) == 2
                                            for p in parts)):
        used = summary.get("in_effect") if isinstance(summary.get("in_effect"), dict) else {}
        return f" (no effect on {summary.get('device') or 'this device'})" if value and used.get(option) is False \
            else ""
    # the epochs whose process was set the other way (a resume's --no-amp, or config.yaml edited since) and ran so
    given = [p for p in parts if isinstance(p.get("asked"), dict) and p["asked"].get(option) is (not value)
             and p["in_effect"].get(option) is (not value)]
    off = [p for p in parts if value and p["in_effect"].get(option) is False and p not in given]
    notes = [f"{'off' if value else 'on'} in {', '.join(map(_epochs, given))}"] * bool(given)
    if off and len(off) == len(parts):
        notes.append(f"no effect on {', '.join(dict.fromkeys(str(p.get('device')) for p in off))}")
    elif off:
        notes.append("no effect on " + "; ".join(f"{p.get('device')}: {_epochs(p)}" for p in off))
    return f" ({'; '.join(notes)})" if notes else ""


def _epochs(part: dict[str, Any]) -> str:
    a, b = part["epochs"]
    return f"epoch {a}" if a == b else f"epochs {a}-{b}"


def _config_section(cfg_path: Path, summary: dict[str, Any]) -> str:
    """config.yaml as a table (its raw text when it cannot be parsed). An option the run asked for and did not use
    on its device (summary.json's ``in_effect``: amp on a CPU, helper-149), or that a resume turned on or off, says
    so beside its value (:func:`_unused_note`)."""
    try:
        cfg = load_yaml(read_user_text(cfg_path)) or {}
    except Exception:  # noqa: BLE001 - a damaged config still gets its raw text shown
        cfg = None
    if isinstance(cfg, dict):     # (a nested value, e.g. of YAML aliases nine deep, cut short: QA)
        inner = table(["option", "value"], [[k, (v if isinstance(v, str) else json.dumps(v)
                                                 if v is None or isinstance(v, (int, float)) else short_repr(v))
                                             + (_unused_note(k, v, summary) if isinstance(v, bool) else "")]
                                            for k, v in cfg.items()])
    else:
        text = cfg_path.read_text(encoding="utf-8", errors="replace")
        inner = "<pre>" + "\n".join(esc(line) for line in text.splitlines()) + "</pre>"
    return section("Config", inner)


def write_run_report(run_dir: str | Path, mistakes: Sequence[dict[str, Any]] = (), why_none: str = "",
                     training: bool = False) -> Path:
    """Write ``run_dir/report.html`` (atomic); returns its path. ``why_none``, ``training``: as
    ``run_report_html``'s."""
    run = Path(run_dir)
    excluded_file = run / "exclude.txt"
    excluded = (excluded_file.read_text(encoding="utf-8", errors="replace").splitlines()     # shown, not used
                if excluded_file.is_file() else [])
    out = run / "report.html"
    atomic_write_text(out, run_report_html(run, mistakes, excluded, why_none, training))
    return out
