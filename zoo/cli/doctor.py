"""``zoo doctor``: leaks, duplicates, likely wrong labels and odd files in an image folder.

No torch at import (``zoo --help`` stays fast); the work is in ``zoo.jobs.doctor`` / ``finetune.tools.doctor``.
"""
from __future__ import annotations

import click
from click.core import ParameterSource

from finetune.core.config import OPTIONS, FinetuneConfig
from finetune.core.io import printable, shell_command
from finetune.core.progress import progress_bar
from zoo.cli.app import cli
from zoo.cli.console import echo
from zoo.cli.shared import sayer
from zoo.cli.options import (FiniteFloatRange, Folder, IntRange, RangedOption, config_file_option, file_notes,
                             naming_the_file)

__all__ = ["doctor_cmd"]

_TOP = 5   # findings of each kind shown on the console


def _bar(quiet: bool):
    def make(desc: str, total: int):
        return progress_bar(total, desc, unit="img", quiet=quiet)
    return make


@cli.command("doctor", short_help="Find leaks, duplicates, likely wrong labels and outliers in an image folder.")
@click.argument("folder", required=False, type=Folder(exists=True), metavar="[DIR]")
@click.option("--data", "data", type=Folder(exists=True), default=None,
              help="Image folder: DIR/<class>/* or DIR/{train,val[,test]}/<class>/* (only read); "
                   "or give it as DIR.")
@click.option("--model", "model", default=None,
              help="Model whose pretrained features are compared.  [default: the smallest cached model]")
@click.option("--out", "out", type=click.Path(file_okay=False), default=None,
              help="Where findings.csv, report.html and doctor.json go (outside --data).  "
                   "[default: ./doctor-<DIR name>]")
@click.option("--overwrite", "overwrite", is_flag=True,
              help="Replace an earlier doctor report in --out (the default folder is always replaced).")
@click.option("--near", "near", type=FiniteFloatRange(0.0, 1.0, min_open=True), default=None, cls=RangedOption,
              default_text="auto: 0.95, raised where images of different classes are that alike to the features, "
                           "as digits or text are",
              help="Near-duplicate threshold: cosine similarity of the L2-normalised pooled features; 1 means "
                   "identical features, compared exactly.")
@click.option("--near-pixels", "near_pixels", type=FiniteFloatRange(0.0, 1.0, min_open=True), default=0.99,
              show_default=True, help="Near-duplicate threshold on 16x16 colour pixel fingerprints (re-encoded or "
                                      "resized copies; another colour is another image); 1 means identical "
                                      "fingerprints, compared exactly.")
@click.option("--folds", "folds", type=IntRange(2, 50), default=5, show_default=True,
              help="Out-of-fold folds of the linear probe that flags likely wrong labels.")
@click.option("--outlier-z", "outlier_z", type=FiniteFloatRange(0.0, min_open=True), default=5.0, show_default=True,
              help="Outlier: robust z-score of the distance to the nearest class centroid above this.")
@click.option("--min-side", "min_side", type=IntRange(0), default=64, show_default=True,
              help="Tiny image: shorter side under this many pixels.")
@click.option("--max-aspect", "max_aspect", type=FiniteFloatRange(1.0), default=3.0, show_default=True,
              help="Extreme aspect ratio: long side / short side above this.")
# --seed and --val-split are checked by FinetuneConfig, as those of `zoo finetune` (their ranges are its)
@click.option("--seed", "seed", type=int, default=0, show_default=True, cls=RangedOption,
              allowed=OPTIONS["seed"].range_text(),
              help="Seed of the probe folds and of the train/val split of a flat folder (as `zoo finetune`).")
@click.option("--val-split", "val_split", type=float, default=0.2, show_default=True, cls=RangedOption,
              allowed=OPTIONS["val_split"].range_text(),
              help="Validation fraction of a flat folder (as `zoo finetune`, so the splits checked are its splits).")
@click.option("--device", "device", default="auto", show_default=True, help="auto, cpu, cuda, cuda:N or mps.")
@click.option("--batch-size", "batch_size", type=IntRange(1), default=64, show_default=True,
              help="Images per forward pass of the feature extraction.")
@click.option("--workers", "workers", type=int, default=-1, show_default=True,
              help="DataLoader workers for the extraction; -1 = auto, 0 = in the main process.")
@click.option("--quiet", "quiet", is_flag=True, help="No progress bars.")
@config_file_option("YAML file with any of the options below (data for DIR; not overwrite or config: type them); "
                    "keys are the option names with underscores; its paths are relative to the current directory, "
                    "as a flag's; another zoo command's keys (one recipe for all) are skipped with a note. DIR and "
                    "flags given here override it.", finetune=False)
@click.pass_context
def doctor_cmd(ctx: click.Context, folder: str | None, data: str | None, model: str | None, out: str | None,
               overwrite: bool, near: float | None,
               near_pixels: float, folds: int, outlier_z: float,
               min_side: int, max_aspect: float, seed: int, val_split: float, device: str, batch_size: int,
               workers: int, quiet: bool, config_path: str | None) -> None:
    """Look at the data before trusting it: what would inflate or hurt the accuracy of a finetune.

    Checks, leaks first: the same image (same bytes, or near copies by pretrained features) in two
    splits; copies within a class and across classes; likely wrong labels (out-of-fold linear probe on
    the features, confident-learning thresholds), with the suggested class; outliers far from every
    class; tiny images, extreme aspect ratios, small classes; unreadable files. The features are cached
    (ZOO_HOME/features): a second run takes seconds. The data folder is never modified.

    \b
    Examples:
      zoo doctor --data ./photos
      zoo doctor --data ./photos --model resnet50 --near 0.97 --out ./photos-doctor
      zoo doctor --config recipe.yaml       # data, model, seed, val_split ... from the file
      zoo finetune resnet50 --data ./photos --exclude ./photos-doctor/findings.csv
    """
    if folder is not None and ctx.get_parameter_source("data") is ParameterSource.DEFAULT_MAP:
        data = None     # DIR typed overrides the --config file's data:, as a flag would
    if folder is not None and data is not None and folder != data:
        raise click.UsageError(f"two data folders given ({folder} and --data {data}): give one")
    data = data or folder
    if data is None:
        raise click.UsageError("the data folder is required: zoo doctor --data DIR (or zoo doctor DIR)")
    # lazy: zoo --help must not import torch
    from finetune.tools.doctor import DoctorOptions
    from zoo.jobs import doctor

    log = sayer(quiet)
    for note in file_notes(ctx):
        log(note)
    try:
        options = DoctorOptions(near_threshold=near, pixel_threshold=near_pixels, folds=folds, seed=seed,
                                outlier_z=outlier_z, min_side=min_side, max_aspect=max_aspect).validate()
    except ValueError as e:
        raise click.UsageError(str(e))
    config = FinetuneConfig(seed=seed, val_split=val_split, device=device, batch_size=batch_size,
                            workers=workers, quiet=quiet)
    with naming_the_file(ctx, config_path, {}):
        result, folder = doctor.run(data, model=model, out=out, options=options, config=config, log=log,
                                    progress=_bar(quiet), overwrite=overwrite)
    counts = result.by_kind()
    echo(f"{result.images} images, {len(result.classes)} classes: "
               + ", ".join(f"{n} {k.replace('_', ' ')}" for k, n in counts.items() if n) if result.findings
               else f"{result.images} images, {len(result.classes)} classes: nothing found")
    shown: dict[str, int] = {}
    for f in result.findings:
        if shown.get(f.finding, 0) >= _TOP:
            continue
        shown[f.finding] = shown.get(f.finding, 0) + 1
        other = f" -> {f.other}" if f.other else ""
        where = f.path or "(folder)"
        # class and file names are in all three fields: a newline in one must not start a line of its own
        echo(printable(f"  {f.finding:22s} {where}{other}  [{f.score:g}] {f.detail}"))
    for kind, n in counts.items():
        if n > shown.get(kind, 0) and shown.get(kind, 0):
            echo(f"  ... {n - shown[kind]} more {kind.replace('_', ' ')}")
    echo(f"findings: {folder / 'findings.csv'}")
    echo(f"report:   {folder / 'report.html'}")
    if counts.get("leak"):
        drop = shell_command("zoo", "finetune", "MODEL", "--data", data, "--exclude", folder / "findings.csv")
        echo(f"leaks inflate every test figure: drop them with `{drop}`, or fix the folders")
