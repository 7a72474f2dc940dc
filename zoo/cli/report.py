"""``zoo report RUN``: a run folder drawn as one self-contained HTML page (RUN/report.html)."""
from __future__ import annotations

import click

from zoo.cli.app import cli
from zoo.cli.console import echo
from zoo.cli.options import Folder, IntRange

__all__ = ["report_cmd"]


@cli.command("report", short_help="Draw a run folder as one HTML page (RUN/report.html).")
@click.argument("run", type=Folder(exists=True, what="run folder"))
@click.option("--top", "top", type=IntRange(0), default=12, show_default=True,
              help="Most confidently wrong validation images shown as thumbnails (0: none, no model loaded).")
@click.option("--device", "device", default="cpu", show_default=True,
              help="Where the validation images are predicted when the run's val_predictions.json is not "
                   "current (auto, cpu, cuda, cuda:N, mps).")
def report_cmd(run: str, top: int, device: str) -> None:
    """Write RUN/report.html: data summary, freeze decision and reason, config, curves and LR, per-class
    precision/recall, confusion matrix, the most confidently wrong validation images, the advice.

    One file (images embedded, no script, no network), readable on a phone and printable.
    `zoo finetune` writes it at the end of every run; this command redraws it.

    \b
    Examples:
      zoo report runs/resnet50-20250101-120000
      zoo report runs/resnet50-20250101-120000 --top 0
    """
    # lazy: zoo --help must not import torch
    from finetune.engine import resolve_device
    from zoo.jobs.report import make_report
    from zoo.outdir import still_training

    if still_training(run):      # as zoo export says it: the page shows the epochs done so far
        echo(f"note: {run} is still training; this page shows its epochs so far (the run redraws it when it "
             "ends)", err=True)
    if top > 0:     # a device that is not here: one line, as zoo predict says it (--top 0 loads no model)
        device = str(resolve_device(device))
    path = make_report(run, top=top, device=device, log=lambda m: echo(m, err=True), progress=True)
    echo(f"report: {path}")
