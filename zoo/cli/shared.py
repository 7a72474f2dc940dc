"""What ``zoo lr-find`` and ``zoo sweep`` share: their common options (the config they resolve, defaults <
``--config`` YAML < flags typed), the output folder they claim, the data scan and model build before any work.
No torch at import."""
from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator

import click

from finetune.core.config import FinetuneConfig
from zoo.cli import console
from zoo.cli.console import echo
from zoo.cli.options import Folder, config_file_option, fc_dropout_option, naming_the_file
from zoo.hub import resolve_early, resolve_entry
from finetune.core.io import printable

# Options of `zoo finetune` that mean nothing for these commands (they run in one process: --sync-bn, which
# acts only under torchrun, would be accepted and ignored).
NOT_HERE = ("overfit_batches", "tensorboard", "sync_bn")

def sayer(quiet: bool) -> Callable[[str], None]:
    """The one progress logger of the commands (finetune, doctor, lr-find, sweep): each message on stderr as one
    visible line (``printable``: a class name with a newline stays one line), nothing with ``quiet``."""
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

@contextmanager
def claimed_out(ctx: click.Context, command: str, config: FinetuneConfig, config_path: str | None,
                raw: dict[str, Any], notes: list[str], model: str, data: str, out: str | None, *,
                resume: bool = False, overwrite: bool = False) -> Iterator[tuple[Path, Callable[[str], None]]]:
    """Start ``command`` (``lr-find``, ``sweep``) in its output folder: print the config's notes, check the folder
    (outside the data: ``zoo.outdir.check_outside``), the device, then claim the folder before any
    download and log into it. Yields the folder and the command's ``say``; an error from the options of the
    ``--config`` file names that file."""
    # lazy: zoo --help must not import torch
    from finetune.engine import check_machine
    from zoo.jobs.finetune import default_run_dir
    from zoo.outdir import check_outside, claim_out

    say = sayer(config.quiet)
    for note in notes:
        say(note)
    console.keep_going()
    out_dir = Path(out) if out else default_run_dir(f"{model}-{command.replace('-', '')}")
    check_outside(out_dir, data, given=out is not None)
    check_machine(config)          # a mistyped --device: before the folder is made
    with claim_out(out_dir, command, resume=resume, overwrite=overwrite, note=say), \
            naming_the_file(ctx, config_path, raw):
        console.log_to(out_dir / "log.txt")
        yield out_dir, say

COMMON_OPTIONS = [
    click.argument("model"),
    click.option("--data", "data", type=Folder(exists=True), required=True,
                 help="Image folder: DIR/<class>/* or DIR/{train,val}/<class>/*."),
    config_file_option("YAML file with any of the options below, MODEL too (as `zoo finetune --config`: keys are "
                       "the option names with underscores; not overwrite, resume or config: type them); its paths "
                       "are relative to the current directory, as a flag's; another zoo command's keys (one recipe "
                       "for all) are skipped with a note. MODEL and flags given here override it."),
    click.option("--pretrained/--no-pretrained", "pretrained", default=True, show_default=True,
                 help="Start from the zoo's pretrained weights; --no-pretrained: random init (tests, baselines)."),
    fc_dropout_option,
]

def common_options(func: Callable) -> Callable:
    for deco in reversed(COMMON_OPTIONS):
        func = deco(func)
    return func
