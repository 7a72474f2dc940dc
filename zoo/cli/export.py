"""``zoo export``: a finetuned run folder as a portable bundle. A thin command over zoo.bundle; no torch at import."""
from __future__ import annotations

import os
from pathlib import Path

import click

from finetune.core.io import shell_command
from zoo.cli.app import cli
from zoo.cli.console import echo
from zoo.cli.options import Folder

__all__ = ["export_cmd"]


@cli.command("export", short_help="Write a finetuned run as a portable bundle.")
@click.argument("run_dir", type=Folder(path_type=Path, what="run folder"))
@click.option("--out", "out", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Bundle folder to write.  [default: RUN_DIR/export]")
@click.option("--format", "formats", type=click.Choice(["safetensors", "onnx"]), multiple=True,
              default=("safetensors",), show_default=True,
              help="Also write model.onnx (checked against PyTorch with onnxruntime). Repeatable.")
@click.option("--overwrite", is_flag=True, default=False,
              help="--out holds an earlier bundle: replace it (only the bundle's files).")
def export_cmd(run_dir: Path, out: Path | None, formats: tuple[str, ...], overwrite: bool) -> None:
    """Export RUN_DIR (a `zoo finetune` run folder) as model.safetensors + config.json + README.md.

    The safetensors header carries architecture, classes, preprocessing, source weights and validation
    metrics; config.json has timm's layout, so `timm.create_model("local-dir:BUNDLE", pretrained=True)`
    rebuilds a linear-head model without zoo.

    --out must be new or empty (or an earlier bundle, with --overwrite); RUN_DIR/export, the run's own
    bundle, is replaced.

    \b
    Examples:
      zoo export runs/resnet50-20250101-120000 --out my-classifier
      zoo export runs/resnet50-20250101-120000 --format onnx
    """
    # lazy: not loaded at CLI start (keeps zoo --help fast)
    from zoo.bundle import export_run
    from zoo.outdir import KINDS, claim_out, resume_command, still_training

    formats = tuple(dict.fromkeys(("safetensors", *formats)))
    if not run_dir.is_dir():    # export_run's own message, before a RUN_DIR/export could be created
        export_run(run_dir, out, formats=formats)
    if still_training(run_dir):      # its best epoch so far is what gets exported
        echo(f"note: {run_dir} is still training; this exports its best epoch so far (the run exports "
             "its final best itself when it ends)", err=True)
    elif (run_dir / "metrics.csv").is_file() and not (run_dir / "summary.json").is_file():    # QA (helper-137)
        echo(f"note: {run_dir} did not finish (no summary.json: stopped or killed before its end); this exports "
             f"its best epoch so far, and the bundle's card records no metrics; `{resume_command(run_dir)}` trains "
             "the rest", err=True)
    target = out if out is not None else run_dir / "export"
    # RUN_DIR/export is the run's own bundle: re-exporting (e.g. --format onnx) replaces it, named or not.
    own = target.resolve() == (run_dir / "export").resolve()
    with claim_out(target, "export", overwrite=overwrite or own):
        path = export_run(run_dir, target, formats=formats, note=lambda line: echo(line, err=True))
    # the bundle's files only: the user's own beside them (notes, a report) were listed as exported (QA)
    files = sorted(p.name for p in path.iterdir() if p.is_file() and p.name in KINDS["export"].files)
    echo(f"exported {run_dir} -> {path} ({', '.join(files)})")
    # as lr-find and sweep end: what to run, its path absolute (pasted from another folder too)
    echo("next: " + shell_command("zoo", "predict", Path(os.path.abspath(path)), "IMAGE"))
