"""What ``zoo lr-find`` and ``zoo sweep`` share: their common options (the config they resolve, defaults <
``--config`` YAML < flags typed), the data scan and model build before any work. No torch at import."""
from __future__ import annotations

from pathlib import Path
from typing import Callable

import click

from finetune.core.config import FinetuneConfig
from zoo.cli.console import echo
from zoo.cli.options import fc_dropout_option
from zoo.hub import resolve_early, resolve_entry
from zoo.text import printable

# Options of `zoo finetune` that mean nothing for these commands (they run in one process: --sync-bn, which
# acts only under torchrun, would be accepted and ignored).
NOT_HERE = ("overfit_batches", "tensorboard", "sync_bn")

def sayer(quiet: bool) -> Callable[[str], None]:
    def say(msg: str) -> None:
        if not quiet:
            echo(printable(msg), err=True)
    return say

def scan_and_build(model: str, data: str, config: FinetuneConfig, pretrained: bool, say: Callable[[str], None],
             fc_dropout: float | None = None):
    """Resolve the model's name (a mistyped one: before the scan), scan the data (an uncached ``hf-hub:`` name is
    fetched after it: nothing is downloaded for unusable data), then build the model, as `zoo finetune` scans
    and builds (one process: lr-find and sweep refuse torchrun)."""
    # lazy: zoo --help must not import torch
    from finetune.core.distributed import DistInfo
    from zoo.jobs.finetune import build_for_training, scan_lines, scan_on_main

    entry = resolve_early(model)
    report = scan_on_main(data, config, DistInfo())
    for line in scan_lines(report, config):
        say(line)
    entry = entry or resolve_entry(model)
    return entry, report, build_for_training(entry, pretrained, config.seed, fc_dropout)

overwrite_option = click.option("--overwrite", is_flag=True, default=False,
                          help="--out holds an earlier result of this command: start over (only its files).")

def resolve_out(out: str | None, model: str, kind: str) -> Path:
    # lazy: zoo --help must not import torch
    from zoo.jobs.finetune import default_run_dir

    return Path(out) if out else default_run_dir(f"{model}-{kind}")

COMMON_OPTIONS = [
    click.argument("model"),
    click.option("--data", "data", type=click.Path(file_okay=False, exists=True), required=True,
                 help="Image folder: DIR/<class>/* or DIR/{train,val}/<class>/*."),
    click.option("--config", "config_path", type=click.Path(dir_okay=False, exists=True), default=None,
                 help="YAML file with finetune options (as `zoo finetune --config`); flags override it."),
    click.option("--pretrained/--no-pretrained", "pretrained", default=True, show_default=True,
                 help="Start from the zoo's pretrained weights; --no-pretrained: random init (tests, baselines)."),
    fc_dropout_option,
]

def common_options(func: Callable) -> Callable:
    for deco in reversed(COMMON_OPTIONS):
        func = deco(func)
    return func
