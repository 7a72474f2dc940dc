"""``zoo finetune``: every FinetuneConfig option as a flag, ``--config`` YAML underneath, ``--resume``.

No torch at import (``zoo --help`` stays fast): the work happens in ``zoo.jobs.finetune``, imported inside the
command. Precedence: defaults < ``--config file.yaml`` < flags the user actually typed.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import click

from finetune.core.confusion import CONFUSION_CSV, FULL_MAX_CLASSES, SHOWN_CLASSES, lowest_first
from finetune.core.io import printable, printable_name, shell_command
from zoo.cli import console
from zoo.cli.app import cli
from zoo.cli.options import (Folder, config_file_option, config_options, fc_dropout_option, given_options,
                             naming_the_file, read_of_the_file, resolve_config)
from zoo.cli.console import echo
from zoo.cli.shared import sayer
from zoo.outdir import is_main_process
from finetune.core.metrics import accuracy_text

__all__ = ["finetune_cmd"]


def _parse_lr(text: str) -> tuple[float | None, bool]:
    """(lr, auto): "auto" or a number (its range is checked by FinetuneConfig.validate)."""
    if str(text).strip().lower() == "auto":
        return None, True
    try:
        lr = float(text)
    except ValueError:
        raise click.BadParameter(f"{text!r} is neither a number nor 'auto' (e.g. --lr 1e-3)", param_hint="--lr")
    return lr, False


@cli.command("finetune", short_help="Finetune a zoo model on a folder of labelled images.")
@click.argument("model", required=False)
@click.option("--data", "data", type=Folder(), default=None,
              help="Image folder: DIR/<class>/* or DIR/{train,val}/<class>/*.")
@config_file_option("YAML file with any of the options below, the run's too (model, data, out, pretrained, export, "
                    "exclude, fc_dropout; not resume, overwrite or config: type them); keys are the option names with "
                    "underscores; paths are relative to the current directory; another zoo command's keys (one "
                    "recipe for all) are skipped with a note. MODEL and flags typed override it.")
@click.option("--out", "out", type=click.Path(file_okay=False), default=None,
              help="Run folder.  [default: runs/<model>-<YYYYmmdd-HHMMSS>]")
@click.option("--resume", "resume", type=Folder(exists=True, what="run folder"), default=None,
              help="Continue the interrupted run in this folder (its config.yaml, split and model are reused; a MODEL "
                   "given must be the run's).")
@click.option("--overwrite", "overwrite", is_flag=True, default=False,
              help="--out holds an earlier run: start it over (only the files a run writes are replaced).")
@click.option("--pretrained/--no-pretrained", "pretrained", default=True, show_default=True,
              help="Start from the zoo's pretrained weights; --no-pretrained: random init (baselines, tests).")
@click.option("--export/--no-export", "export", default=None, show_default="export; a resume: as last given to the run",
              help="Write a bundle to RUN/export at the end (see `zoo predict`); given to a resume, also what its "
                   "later resumes do.")
@click.option("--exclude", "exclude", type=click.Path(dir_okay=False, exists=True), default=None,
              help="Leave out the files listed here: a findings.csv of `zoo doctor` or one path per line "
                   "(recorded in RUN/exclude.txt).")
@fc_dropout_option
@config_options()
@click.pass_context
def finetune_cmd(ctx: click.Context, model: str | None, data: str | None, config_path: str | None,
                 out: str | None, resume: str | None, overwrite: bool, pretrained: bool, export: bool | None,
                 exclude: str | None, fc_dropout: float | None,
                 **values: Any) -> None:
    """Finetune MODEL on the labelled images in --data, following the lecture's recipe.

    The data is checked first (nothing is downloaded if it cannot be trained on); the freeze depth is
    chosen from the dataset size (and printed with its reason); the head trains first, then the chosen
    stages; early stopping keeps the best epoch. Everything lands in a run folder: config.yaml,
    scan.json, split.json, manifest.json, metrics.csv, curves.png, checkpoints/, summary.json, export/.

    --out must be new or empty; a folder holding an earlier run needs --resume (continue) or --overwrite
    (start over). One process at a time works in a run folder (RUN/.zoo.lock). Everything printed is
    also in RUN/log.txt; a closed pipe (`| head`) does not stop the run.

    Multi-GPU: torchrun --nproc-per-node N -m zoo finetune ...  (--batch-size is the global batch).

    \b
    Examples:
      zoo finetune resnet50 --data ./photos
      zoo finetune resnet50 --data ./photos --freeze 2 --lr 3e-4 --epochs 20
      zoo finetune efficientnet_b0 --data ./photos --lr auto --class-weights auto
      zoo finetune --config recipe.yaml --seed 1      # model, data, out... in the file too; flags win
      zoo finetune resnet50 --data ./photos --overfit-batches 2     # sanity check only
      zoo finetune resnet50 --data ./photos --exclude doctor-photos/findings.csv
      zoo finetune --resume runs/resnet50-20250101-120000            # after Ctrl-C or a crash
      torchrun --nproc-per-node 4 -m zoo finetune resnet50 --data ./photos --batch-size 256
      zoo finetune vgg16 --data ./photos --batch-size 256 --micro-batch 64   # more than GPU memory holds
    """
    # lazy: zoo --help must not import torch
    from zoo.jobs import finetune as job
    from zoo.jobs.resume import resume_finetune

    main = is_main_process()     # torchrun sets RANK: only rank 0 prints
    console.keep_going()     # a closed stdout/stderr must not stop training; log.txt has every line

    log = sayer(quiet=not main)

    def log_file(run_dir) -> None:
        console.log_to(run_dir / "log.txt")

    given = given_options(ctx, values)
    lr_auto = False
    if "lr" in given or not resume:
        lr_value, lr_auto = _parse_lr(values["lr"])
        if "lr" in given:
            if lr_auto:
                given.pop("lr")
            else:
                given["lr"] = lr_value

    if resume:
        _refuse_with_resume(lr_auto, config_path, fc_dropout, overwrite, exclude)
        if out is not None and os.path.realpath(out) != os.path.realpath(resume):   # (it went on in RUN, unsaid)
            raise click.UsageError(f"--out {out} cannot be combined with --resume: the run continues in its own "
                                   f"folder {resume}; drop --out")
        outcome = resume_finetune(resume, given, data_dir=data, model=model, export=export, log=log,
                                  on_run_dir=log_file)
    else:
        if not model:
            raise click.UsageError("MODEL is required (e.g. `zoo finetune resnet50 --data DIR`, or model: in the "
                                   "--config file); `zoo list` shows the zoo")
        if not data:
            raise click.UsageError("--data DIR (or data: in --config) is required: a folder of class sub-folders")
        config, raw, notes = resolve_config(ctx, config_path, values, pretrained, given=given)
        for note in notes:
            log(note)
        with naming_the_file(ctx, config_path, raw), read_of_the_file(ctx, config_path, "exclude", "exclude"):
            outcome = job.run_finetune(model, data, config, out=out, pretrained=pretrained, lr_auto=lr_auto,
                                        export=export is not False, fc_dropout=fc_dropout, overwrite=overwrite, log=log,
                                        on_run_dir=log_file, exclude=exclude)

    if not main or (outcome.result is None and outcome.overfit is None):   # (a finished run resumed: said so)
        if main and outcome.export_dir is not None:      # (the bundle its end had left unwritten)
            echo(_bundle_line(outcome.export_dir))
        return
    if outcome.overfit is not None:
        echo(outcome.overfit.verdict)
        ctx.exit(0 if outcome.overfit.passed else 1)
    _report(outcome)


def _refuse_with_resume(lr_auto: bool, config_path: str | None, fc_dropout: float | None, overwrite: bool,
                        exclude: str | None) -> None:
    """UsageError for the options a resumed run cannot take (it keeps its own config, model and data)."""
    if lr_auto:
        raise click.UsageError("--lr auto cannot be combined with --resume: the run keeps its learning rate")
    if config_path:
        raise click.UsageError("--config cannot be combined with --resume: the run's own config.yaml is used")
    if fc_dropout is not None:
        raise click.UsageError("--fc-dropout cannot be combined with --resume: the run keeps its model")
    if overwrite:
        raise click.UsageError("--overwrite cannot be combined with --resume: continue the run or start it over")
    if exclude:
        raise click.UsageError("--exclude cannot be combined with --resume: the run keeps its exclude.txt")


def _report(outcome) -> None:
    """The end-of-run lines on stdout: best epoch, metrics, per-class accuracy, advice, where things are."""
    result = outcome.result
    m = result.metrics or {}
    how = "stopped early" if result.stopped_early else f"{len(result.history)} epochs"
    if m:
        echo(f"best epoch {result.best_epoch} ({how}): val acc {accuracy_text(m.get('val_acc'))}, "
             f"val loss {m.get('val_loss', float('nan')):.4f}")
        per_class = m.get("per_class") or {}
        if per_class:
            echo(_per_class_line(per_class, outcome.run_dir))
    else:
        echo(f"finished ({how}); no validation images, so the last epoch is kept")
    # lazy: zoo --help must not import matplotlib
    from finetune.core.monitor import advise

    for line in advise(result.history):
        echo(f"advice: {line}")
    # the folders absolute, as every next: line names them: pasted from another folder, a relative one named nothing
    bundle, run = (None if p is None else Path(os.path.abspath(p)) for p in (outcome.export_dir, outcome.run_dir))
    if bundle is not None:   # (the run folder was printed before training started)
        echo(_bundle_line(bundle))
    scan = outcome.scan
    if scan is not None and scan.test:   # (audit: a test/ split was counted, and nothing said how to score it)
        images = (f"{len(scan.test)} {printable_name(scan.folders.get('test') or 'test')}/ images, held out from "
                  "training and from the choice of epoch")
        if bundle is not None:
            echo(f"test: {shell_command('zoo', 'eval', bundle, '--data', scan.root)}  (its {images})")
        elif run is not None:   # (--no-export: it said nothing of them; zoo eval needs a bundle)
            echo(f"test: {shell_command('zoo', 'export', run)} && "
                 f"{shell_command('zoo', 'eval', run / 'export', '--data', scan.root)}  (zoo eval "
                 f"scores a bundle, which this run did not write: the export writes it; its {images})")


def _bundle_line(bundle) -> str:
    bundle = Path(os.path.abspath(bundle))
    return f"bundle: {bundle}  ({shell_command('zoo', 'predict', bundle, 'IMAGE')})"


def _per_class_line(per_class: dict[str, float | None], run_dir) -> str:
    """``per-class accuracy: a 90.00%, b 75.00%, ...`` in class order; above FULL_MAX_CLASSES classes the
    SHOWN_CLASSES lowest only, then how many more (those tied with the last shown counted), their mean (balanced
    accuracy) and where every class is."""
    def cell(name: str) -> str:
        v = per_class[name]
        return f"{printable(name)} {accuracy_text(v)}"

    if len(per_class) <= FULL_MAX_CLASSES:
        return "per-class accuracy: " + ", ".join(cell(c) for c in per_class)
    scored = [c for c in lowest_first(per_class) if per_class[c] is not None and per_class[c] == per_class[c]]
    worst = scored[:SHOWN_CLASSES]      # (a class without validation images is no "lowest": counted apart)
    unscored = len(per_class) - len(scored)
    # (1,000 classes x 4 validation images: 25 at 0.00%, the 10 shown picked among them by name)
    tied = sum(1 for c in scored[len(worst):] if per_class[c] == per_class[worst[-1]]) if worst else 0
    none = f"{tied} of them also at {accuracy_text(per_class[worst[-1]])}; " if tied else ""
    none += f"{unscored} without validation images; " if unscored else ""
    mean = f"mean over classes {accuracy_text(sum(per_class[c] for c in scored) / len(scored))}; " if scored else ""
    where = f"{run_dir / 'report.html'} and {run_dir / CONFUSION_CSV}" if run_dir is not None else "report.html"
    return (f"per-class accuracy, the {len(worst)} lowest of {len(per_class)}: {', '.join(cell(c) for c in worst)}"
            f" ... and {len(per_class) - len(worst)} more ({none}{mean}every class: {where})")
