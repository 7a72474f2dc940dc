"""``zoo finetune --resume RUN``: continue a run from ``checkpoints/last.pt`` with its own config.yaml, split and
model.json (no download: the checkpoint holds the whole model); what to say when there is nothing to resume.
The new-run path and what both share (the exclusions, the model build, the end of a run) are
``zoo.jobs.finetune``'s.
"""
from __future__ import annotations

import contextlib
import csv
import json
from pathlib import Path
from typing import Any, Callable

from finetune.core import distributed as ddp
from finetune.core.checkpoint import load_checkpoint
from finetune.core.config import FinetuneConfig, load_resume_config
from finetune.core.errors import (BatchNormBatchError, CheckpointError, Interrupted, OutOfMemory, is_out_of_memory,
                                  memory_text)
from finetune.data import scan_outdated, write_scan
from finetune.tools.doctor import read_exclude_file
from finetune.tools.train import fit
from finetune.core.io import new_run_command, resume_command, shell_command, write_json
from finetune.core.rerun import recorded_run, start_over_command
from finetune.engine import idle_gpus_note, resolve_device
from finetune.engine.passes import largest_pass, smaller_pass
from finetune.engine.runfolder import RunFolder
from zoo.build import has_fc_dropout
from zoo.bundle import is_final_export
from zoo.errors import UsageError
from zoo.jobs.finetune import (EXCLUDE_TXT, MODEL_JSON, RunOutcome, _apply_exclude, _finish, build_for_training,
                               check_batch_early, feature_cache, scan_on_main, scan_warnings)
from zoo.outdir import MARKER, claim_out, folder_kind, sweep_trial
from zoo.resolve import get_entry
from zoo.hub import resolve_entry

__all__ = ["resume_finetune"]

Log = Callable[[str], None]


def _missing_checkpoint(run_dir: Path) -> str | None:
    """What ``--resume`` lacks when checkpoints/last.pt is gone (None when it is there)."""
    last = run_dir / "checkpoints" / "last.pt"
    if last.is_file():
        return None
    epochs = 0
    try:
        with open(run_dir / "metrics.csv", encoding="utf-8", newline="") as fh:
            epochs = sum(1 for _ in csv.DictReader(fh))
    except (OSError, ValueError):
        pass
    best = (run_dir / "checkpoints" / "best.safetensors").is_file()
    done = (f"metrics.csv records {epochs} finished epoch(s)" if epochs
            else "no epoch is recorded in metrics.csv")
    export = shell_command("zoo", "export", run_dir)
    keep = f"; its best epoch is still in checkpoints/best.safetensors ({export})" if best else ""
    return (f"cannot resume {run_dir}: {last} is missing ({done}) and only it holds the optimizer and "
            f"schedule state to continue from{keep}; start the run over with `{start_over_command(run_dir)}` or "
            "choose another --out")


def _finished(run_dir: Path) -> int | None:
    """The last epoch of the run in ``run_dir`` when it had finished (None while it has epochs to go, or while the
    end of its training is not written: last.pt says finished after the last epoch, before the head guard and
    summary.json; a resume then trains nothing and writes them, then the bundle and the page)."""
    ckpt = load_checkpoint(run_dir / "checkpoints" / "last.pt", mmap=True)
    if not ckpt.get("finished") or not (run_dir / "summary.json").is_file():
        return None
    return int(ckpt.get("epoch") or 0)


def _finished_line(run_dir: Path, epoch: int) -> str:
    export = shell_command("zoo", "export", run_dir)
    has = (run_dir / "export" / "model.safetensors").is_file()
    bundle = f"its bundle is {run_dir / 'export'} (`{export}` writes it again)" if has else \
        f"it has no bundle yet (`{export}` writes it)"
    return (f"{run_dir} finished after epoch {epoch}: resuming it trains nothing and leaves its files as they are; "
            f"{bundle}. Start a new run to train longer or on other data")


def _unwritten_end(run_dir: Path, export: bool) -> list[str]:
    """What the end of a finished run (after summary.json: the bundle, then report.html) left unwritten, for the
    resume to write: nothing while report.html, written last, is newer than summary.json (the end ran to its
    last write; a --no-export run has no bundle); else the page, after the bundle unless RUN/export holds the
    run's final export whole (``is_final_export``: a kill in the export leaves none, an earlier one, or a
    staging copy) or the resume is given --no-export."""
    try:
        if (run_dir / "report.html").stat().st_mtime >= (run_dir / "summary.json").stat().st_mtime:
            return []      # (a page drawn by `zoo report` before the run ended is older than summary.json)
    except FileNotFoundError:
        pass
    return (["bundle"] if export and not is_final_export(run_dir) else []) + ["report.html"]


def resume_finetune(run_dir: str | Path, overrides: dict[str, Any] | None = None, *, data_dir: str | Path | None = None,
                    model: str | None = None, export: bool | None = None, log: Log | None = None,
                    on_run_dir: Callable[[Path], None] | None = None) -> RunOutcome:
    """Continue the run in ``run_dir`` from ``checkpoints/last.pt`` with its own config.yaml and split.

    ``overrides`` may change only what does not alter the remaining epochs' maths (device, workers,
    quiet, epochs, patience, ...); fit refuses the rest. ``model``, when given, must name the run's own
    model (``_check_model``). No weights are downloaded: the checkpoint holds the whole model. ``export`` None:
    as model.json's ``export`` records (a --no-export run writes no bundle; runs from before it was recorded, a
    bundle); True or False (``--export``, ``--no-export``) is obeyed and recorded there before the resume trains or
    writes its end, so a later resume without the flag follows this latest choice (a finished run whose end is
    written keeps its files as they are).

    Raises:
        UsageError: ``run_dir`` is not a run folder; ``model`` names another model. CheckpointError: no or a
        damaged checkpoint. RunLockedError: another process works in ``run_dir``.
    """
    run_dir = Path(run_dir)
    info_path = run_dir / MODEL_JSON
    if (trial := sweep_trial(run_dir)) is not None:
        raise UsageError(trial)
    if not info_path.is_file() and (run_dir / "config.yaml").is_file() and (run_dir / "checkpoints").is_dir():
        raise UsageError(f"{run_dir} was written by the Python API (finetune's fit: no model.json, so zoo cannot "
                         "rebuild its model); continue it with fit(..., run_dir=..., resume=True)")
    # a run that stopped (killed) before its config.yaml: `--out` calls it a run (or an empty folder), say what it is
    started = info_path.is_file() or ((run_dir / MARKER).is_file() and folder_kind(run_dir) in ("finetune", "empty"))
    if started and not (run_dir / "config.yaml").is_file():
        raise CheckpointError(f"{run_dir} stopped before its training was set up (no config.yaml): there is "
                              f"nothing to resume; start it over with `{start_over_command(run_dir)}`")
    if not info_path.is_file() or not (run_dir / "config.yaml").is_file():
        raise UsageError(f"{run_dir} is not a run folder of `zoo finetune` (no model.json/config.yaml); "
                         "pass the folder a run wrote, e.g. runs/<model>-<time>")
    missing = _missing_checkpoint(run_dir)
    if missing:
        raise CheckpointError(missing)
    info_json = _read_info(info_path)
    recorded = info_json.get("export") is not False
    export = recorded if export is None else export
    if model is not None:
        _check_model(model, run_dir, info_json)
    data_dir = Path(data_dir) if data_dir is not None else _scanned_root(run_dir)
    # (a resume-free option out of bounds in config.yaml, e.g. an older version's workers: 1000, is replaced)
    config, notes = load_resume_config(run_dir / "config.yaml", overrides)
    # --micro-batch 0 given: the passes config.yaml records, as fit takes them (the lines below name those passes)
    config = RunFolder(run_dir).resume_passes(config)

    info = ddp.setup(config.device)
    say: Log = log if (log is not None and info.is_main) else (lambda _msg: None)
    for note in notes:
        say(note)
    try:
        with ddp.entered_on_main(claim_out(run_dir, "finetune", resume=True, option="--resume", note=say), info):
            # (under the claim: the lock and temp files of a run killed while it wrote its bundle or page go)
            done = _finished(run_dir)     # nothing to train: its record stays as written (no summary from other data)
            end = None if done is None else \
                ddp.broadcast_object(_unwritten_end(run_dir, export) if info.is_main else None, info)
            if done is not None and not end:
                say(_finished_line(run_dir, done))
                return RunOutcome(run_dir=run_dir)
            if info.is_main and on_run_dir is not None:
                on_run_dir(run_dir)
            if info.is_main and export != recorded:     # an explicit --export / --no-export: later resumes follow it
                write_json(info_path, {**info_json, "export": export}, indent=2, ensure_ascii=False)
            if done is not None:
                say(f"note: this run had finished (after epoch {done}), not its end: this resume trains nothing, "
                    f"and writes its {' and '.join(end)}")
                return _finish(RunOutcome(run_dir=run_dir), None, config, "bundle" in end, info, say)
            if idle := idle_gpus_note(resolve_device(config.device, info), info, config.device):
                say(idle)     # as a new run says it: one GPU of several, torchrun resumes on them all
            outcome = _train_resumed(run_dir, info_json, data_dir, config, export, info, say)
        ddp.leave(info)      # as in run_finetune (done by _finish after training)
        return outcome
    except KeyboardInterrupt:     # before fit's handler (the scan, the model build): the run is as it was
        raise Interrupted(f"interrupted before training went on: {run_dir} keeps its epochs as they were; continue "
                          f"with `{resume_command(run_dir)}`") from None
    except RuntimeError as e:     # as in run_finetune
        ddp.raise_if_peer_lost(e, info, run_dir)
        raise
    finally:
        ddp.cleanup(info)


def _read_info(path: Path) -> dict[str, Any]:
    """The run's model.json (``path``), checked by :func:`_check_info`."""
    try:
        info_json = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise UsageError(f"{path.parent}: model.json is unreadable ({e}); start a new run") from None
    _check_info(info_json, path)
    return info_json


def _check_info(info_json: Any, path: Path) -> None:
    """model.json holds what the resume reads, of the types `zoo finetune` writes: a hand-edited file (a list,
    a field removed or of another type) is one line, not an AttributeError or KeyError traceback (QA).

    Raises:
        UsageError: the first field that does not fit, and what to do.
    """
    def stages_ok(v: Any) -> bool:
        return isinstance(v, list) and all(isinstance(s, list) and all(isinstance(n, str) for n in s) for s in v)

    checks = {"model": lambda v: isinstance(v, str) and bool(v), "stages": stages_ok,
              "classifier": lambda v: isinstance(v, str), "data_config": lambda v: isinstance(v, dict),
              "builder_kwargs": lambda v: v is None or isinstance(v, dict), "export": lambda v: isinstance(v, bool)}
    problem = None if isinstance(info_json, dict) else \
        f"{path} holds {json.dumps(info_json)[:40]}, not the JSON object `zoo finetune` writes"
    for key, ok in checks.items() if problem is None else ():
        if key not in info_json and key not in ("builder_kwargs", "export"):   # (runs from before it was recorded)
            problem = f"{path} lacks {key!r}, which `zoo finetune` writes"
        elif key in info_json and not ok(info_json[key]):
            problem = f"{path}: {key} is {json.dumps(info_json[key])[:40]}, not what `zoo finetune` writes"
        if problem:
            break
    if problem:
        raise UsageError(f"{problem} (was the file edited?); restore it to continue the run, or start the run "
                         f"over with `{start_over_command(path.parent)}`")


def _check_model(model: str, run_dir: Path, info_json: dict) -> None:
    """Refuse a ``model`` that does not name the model the run in ``run_dir`` trains (its model.json's).

    The checkpoint decides what a resumed run trains: another model named with ``--resume`` was silently
    ignored (QA), while a changed option is refused. Names are compared as resolved entries, so the run's
    own name in another case (``ResNet50``) or with spaces passes; a name that resolves to nothing (an
    unknown model, an hf-hub: repo not cached) is not the run's either.

    Raises:
        UsageError: ``model`` names another model, or model.json names none.
    """
    trained = info_json.get("model")
    if not isinstance(trained, str) or not trained:
        raise UsageError(f"{run_dir}: model.json names no model (edited or damaged); start a new run")
    if model.strip() == trained:        # the name model.json records: nothing to resolve (no timm import)
        return
    try:
        named = get_entry(model).name
    except UsageError:                  # unknown, or a malformed reference: not the run's model
        named = None
    if named != trained:
        resume = resume_command(run_dir)
        new = new_run_command(model=model, data=recorded_run(run_dir).data)     # (on the run's data)
        raise UsageError(f"cannot resume {run_dir} with model {model}: the run trains {trained}; drop the model "
                         f"argument (`{resume}`) or name {trained}; another model needs a new run (`{new}`)")


def _scanned_root(run_dir: Path) -> Path:
    """The data folder a run trained on, from its scan.json (only it names it).

    Raises:
        UsageError: scan.json missing or damaged: the checkpoint is intact, and ``--data`` resumes the run."""
    scan_json = run_dir / "scan.json"
    try:
        scan = json.loads(scan_json.read_text(encoding="utf-8"))
        root = scan.get("root") if isinstance(scan, dict) else None
        problem = None if isinstance(root, str) and root else "names no data folder"
    except FileNotFoundError:
        problem = "is missing"
    except (OSError, ValueError) as e:
        problem = f"is unreadable ({e})"
    if problem:
        resume = resume_command(run_dir, "--data", "DIR")
        raise UsageError(f"{scan_json} {problem}, and only it records the data folder the run trained on; its "
                         f"checkpoint is intact: continue with `{resume}`, DIR that "
                         "folder (the run's split.json and classes are kept, and scan.json written again)")
    return Path(root)


def _trained_classes(info_json: dict) -> list[str]:
    """The class names in model.json (the checkpoint's, written with it); none from a hand-edited file."""
    classes = info_json.get("classes")
    return classes if isinstance(classes, list) and all(isinstance(c, str) for c in classes) else []


def _train_resumed(run_dir: Path, info_json: dict, data_dir: Path, config: FinetuneConfig, export: bool, info,
                   say: Log) -> RunOutcome:
    # class_names: class folders renamed into the other Unicode form since keep the names the run trained on
    excluded = run_dir / EXCLUDE_TXT      # the files the run left out stay out
    left_out: list[str] = []
    if excluded.is_file():
        with contextlib.suppress(ValueError):       # a damaged file: _apply_exclude below says so
            left_out = read_exclude_file(excluded)
    report = scan_on_main(data_dir, config, info, split_file=run_dir / "split.json",
                          class_names=_trained_classes(info_json), left_out=left_out)
    for w in scan_warnings(report, config):
        say(f"warning: {w}")
    if excluded.is_file():
        _apply_exclude(report, excluded, say)
    if info.is_main and scan_outdated(report, run_dir) and \
            list(load_checkpoint(run_dir / "checkpoints" / "last.pt", mmap=True)["classes"]) == report.classes:
        write_scan(report, run_dir, scan_only=True)    # deleted, or the data moved (--data): written again
    entry = resolve_entry(info_json["model"])
    # Weights come from the checkpoint: the architecture alone is enough (no download, works offline),
    # with the run's own FC dropout (runs from before model.json recorded it had none).
    kwargs = info_json.get("builder_kwargs")
    fc_dropout = (kwargs or {}).get("drop_rate", 0.0) if has_fc_dropout(entry) else None
    model = build_for_training(entry, False, config.seed, fc_dropout)
    try:
        result = fit(model, info_json["stages"], info_json["data_config"], report.train, report.val, config,
                     head=info_json["classifier"], run_dir=run_dir, resume=True, log=say,
                     feature_cache=feature_cache(say))
    except (MemoryError, RuntimeError) as e:   # fit's set-up (its steps say theirs): --batch-size may not change here
        if not is_out_of_memory(e):
            raise
        # passes smaller than the one that ran out, as RunFolder.stopped names them (the largest of the batch's)
        per_pass = largest_pass(ddp.per_rank_batch(int(config.batch_size), info), int(config.micro_batch))
        smaller, way = smaller_pass(per_pass, lambda micro: _refused(entry, report.train, config, info, micro,
                                                                     fc_dropout))
        if smaller is None:
            raise OutOfMemory(f"out of memory before training went on ({memory_text(e)}): "
                              f"{RunFolder(run_dir, info).start_over(per_pass, way)}") from None
        again = resume_command(run_dir, "--micro-batch", str(smaller))
        raise OutOfMemory(f"out of memory before training went on ({memory_text(e)}): {run_dir} keeps its epochs as "
                          f"they were; continue in passes of fewer images with `{again}`") from None
    return _finish(RunOutcome(run_dir=run_dir, result=result, scan=report), report.val, config, export, info, say)


def _refused(entry, train_set, config: FinetuneConfig, info, micro: int, fc_dropout: float | None) -> str | None:
    """Whether the run refuses ``--micro-batch micro`` (``check_batch_early``, on the meta device: no memory of the
    device that ran out): the option that lifts the refusal, or None (``setup.refused_passes``, for a run set up)."""
    try:
        check_batch_early(entry, train_set, config.replace(micro_batch=int(micro)), info, fc_dropout)
    except BatchNormBatchError as e:
        return e.way
    return None
