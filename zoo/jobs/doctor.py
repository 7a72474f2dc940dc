"""``zoo doctor`` behind the command: pick and build the model, run ``finetune.tools.doctor``, write DOCTOR/.

The analysis is ``finetune.tools.doctor.run_doctor``; here the zoo side resolves the model (default: the
smallest cached pretrained model, so the command works offline), keeps the feature banks in the zoo
cache (``ZOO_HOME/features``) and writes findings.csv, label_ranking.csv, report.html, doctor.json (and
bad_files.txt when the scan skipped files) into the output folder, which must lie outside the data folder
(the user's images are only ever read).
"""
from __future__ import annotations

import csv
import dataclasses
import io
from pathlib import Path
from typing import Any, Callable

from finetune.core.config import FinetuneConfig
from finetune.data import scan_folder, write_bad_files
from finetune.tools.doctor import run_doctor, write_findings_csv
from finetune.engine import resolve_device
from finetune.core.io import atomic_write_text, json_safe, printable_name, write_json
from finetune.tools.pages import doctor_html
from zoo.build import create_model
from zoo.cache import cached_models, features_dir, read_manifest, scan_memo
from zoo.errors import UsageError
from zoo.jobs.finetune import run_data_config
from zoo.outdir import check_outside, claim_out
from zoo.resolve import get_entry
from zoo.hub import resolve_early, resolve_entry

__all__ = ["default_model", "run", "check_out_dir"]

Log = Callable[[str], None]


def default_model() -> str:
    """The cached pretrained model with the fewest parameters.

    Registry names and ``timm:<arch>`` references are candidates (a ``timm:`` model in the cache was pulled
    or imported as any registry model is, and resolves offline); ``hf-hub:`` ones are not: those are mostly
    finetunes (``zoo list --mine`` lists them as the user's), whose features may have learnt this very
    folder's labels and would hide its wrong ones from the probe. ``--model hf-hub:...`` still uses one.

    Raises:
        UsageError: no candidate is cached.
    """
    best: tuple[int, str] | None = None
    hub: list[str] = []
    for info in cached_models():
        name = info.get("name")
        if not name or info.get("damaged"):
            continue
        if str(name).startswith("hf-hub:"):
            hub.append(str(name))
            continue
        try:
            params = get_entry(name).params
        except Exception:  # noqa: BLE001 - a cached model no registry (or timm) knows now is not a candidate
            continue
        key = (params if params is not None else 1 << 62, name)
        best = key if best is None or key < best else best
    if best is None:
        mine = f" (hf-hub: models such as {hub[0]} are not picked by default; name one with --model)" if hub else ""
        raise UsageError("no pretrained model is cached: `zoo pull efficientnet_lite0` (or any model from "
                         f"`zoo list`), or pass --model NAME{mine}")
    return best[1]


def check_out_dir(out: Path, data: Path, given: bool = True) -> None:
    """Refuse an output folder inside the data folder: doctor never writes among the user's images."""
    check_outside(out, data, "doctor never writes there", given)


def run(data: str | Path, *, model: str | None = None, out: str | Path | None = None, options: Any = None,
        config: Any = None, log: Log | None = None, progress: Any = None,
        overwrite: bool = False) -> tuple[Any, Path]:
    """Scan ``data``, compute features with ``model``, run every check, write the DOCTOR folder.

    The folder follows the output-folder rules of every command (``zoo.outdir``): a new or empty one, or
    an earlier doctor report there with ``overwrite`` (always for the default ``./doctor-<DIR name>``);
    anything else is refused before any work.

    Returns:
        (finetune.tools.doctor.DoctorResult, the output folder).
    Raises:
        DataError (from the scan), UsageError (no model / bad --out), and the model-loading errors.
    """
    say = log or (lambda _m: None)
    data = Path(data)
    config = config or FinetuneConfig()
    default_out = out is None
    out = Path(out) if out is not None else Path.cwd() / f"doctor-{data.resolve().name}"
    check_out_dir(out, data, given=not default_out)
    with claim_out(out, "doctor", overwrite=overwrite or default_out, note=say):
        return _run(data, model, out, options, config, say, progress)


def _run(data: Path, model: str | None, out: Path, options: Any, config: Any, say: Log,
         progress: Any) -> tuple[Any, Path]:
    name = model or default_model()
    entry = resolve_early(name)      # a mistyped --model: before the scan (an uncached hf-hub: after it)
    report = scan_folder(data, val_split=config.val_split, seed=config.seed, strict=False, memo=scan_memo(data))
    entry = entry or resolve_entry(name)
    say(f"doctor: {data} ({sum(len(s) for s in report.sets().values())} images, {len(report.classes)} classes), "
        f"features from {entry.name}")
    net = create_model(entry, pretrained=True)
    device = resolve_device(config.device)
    try:
        source = (read_manifest(entry.name) or {}).get("source")
    except Exception:  # noqa: BLE001 - the manifest only adds provenance to doctor.json
        source = None
    result = run_doctor(report, net, entry.classifier, run_data_config(entry, config), config,
                        options=options, cache_dir=features_dir(), device=str(device), log=say,
                        progress=progress)
    write_findings_csv(result.findings, out / "findings.csv")
    if report.bad_files:                # the scan's warning points there, as in a run folder
        write_bad_files(report, out)
    # every labelled image ranked by the probe (most suspicious first), beyond the flagged few
    rows = ["path,label,suggested,score\n"] + [",".join(_csv_cell(v) for v in (p, g, s, f"{sc:.4f}")) + "\n"
                                                for p, g, s, sc in result.label_ranking]
    atomic_write_text(out / "label_ranking.csv", "".join(rows))
    atomic_write_text(out / "report.html", doctor_html(result, title=f"zoo doctor: {data.name}"))
    meta = {"data": str(data), "model": entry.name, "source": source, "images": result.images,
            "classes": result.classes, "images_per_class": result.counts, "counts": result.by_kind(),
            "probe_accuracy": result.probe_accuracy, "probe_l2": result.probe_l2,
            "probe_fold_l2": result.probe_fold_l2,
            "options": dataclasses.asdict(result.options), "near_used": result.near_used,
            "seconds": result.seconds, "feature_cache_hits": result.feature_cache_hits}
    write_json(out / "doctor.json", json_safe(meta), indent=2, default=str)
    return result, out


def _csv_cell(value: str) -> str:
    buf = io.StringIO()
    csv.writer(buf, lineterminator="").writerow([printable_name(value)])   # names that are not UTF-8: \xNN
    return buf.getvalue()
