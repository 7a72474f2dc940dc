"""``zoo lr-find`` and ``zoo sweep``: the lecture's monitoring habits as commands.

No torch at import (``zoo --help`` stays fast): finetune.diagnostics / finetune.sweep and the model
builder are imported inside the commands. The model is set up exactly as ``zoo finetune`` would set it
up, so every finetune option is accepted here too (defaults < ``--config`` YAML < flags typed).
"""
from __future__ import annotations

import copy
import json
import math
from pathlib import Path
from typing import Any, Callable

import click

from finetune.config import OPTIMIZERS, FinetuneConfig, load_config, save_config
from finetune.errors import ConfigError
from finetune.io import atomic_write_text, load_yaml
from zoo import build as zbuild
from zoo.cli import console
from zoo.cli.app import cli
from zoo.cli.console import echo
from zoo.cli.options import bn_default, config_options, fc_dropout_option, given_options
from zoo.errors import UsageError
from zoo.resolve import get_entry
from zoo.text import printable

__all__ = ["lr_find_cmd", "sweep_cmd"]

SWEEP_DEFAULT_EPOCHS = 5     # a trial is a short finetune: enough to rank, not to converge
# Options of `zoo finetune` that mean nothing for these commands.
_NOT_HERE = ("overfit_batches", "tensorboard")


def _resolve_config(ctx: click.Context, config_path: str | None, values: dict[str, Any], pretrained: bool,
                    extra: dict[str, Any] | None = None) -> tuple[FinetuneConfig, dict[str, Any]]:
    """defaults < YAML < flags the user typed. Returns the config and the YAML's raw mapping."""
    given = given_options(ctx, values)
    raw: dict[str, Any] = {}
    base = FinetuneConfig()
    if config_path:
        base = load_config(config_path)  # validates, with the file name in any error
        raw = load_yaml(Path(config_path).read_text(encoding="utf-8")) or {}
    given = bn_default(given, base, pretrained)   # --no-pretrained: BatchNorm trains unless --bn says
    merged = {**base.to_dict(), **(extra or {}), **given}
    return FinetuneConfig.from_dict(merged, source="command line"), raw


def _say(quiet: bool) -> Callable[[str], None]:
    def say(msg: str) -> None:
        if not quiet:
            echo(printable(msg), err=True)
    return say


def _prepare(model: str, data: str, config: FinetuneConfig, pretrained: bool, say: Callable[[str], None],
             fc_dropout: float | None = None):
    """Scan the data first (nothing is downloaded for unusable data), then resolve and build the model."""
    # lazy: zoo --help must not import torch
    import torch

    from finetune.data import scan_folder
    from zoo.runs import scan_lines

    entry = get_entry(model)
    report = scan_folder(data, val_split=config.val_split, seed=config.seed, strict=config.strict)
    for line in scan_lines(report):
        say(line)
    torch.manual_seed(int(config.seed))  # a --no-pretrained baseline is the same network every time
    net = (zbuild.create_model(entry, pretrained=True, fc_dropout=fc_dropout) if pretrained
           else zbuild.build_architecture(entry, fc_dropout=fc_dropout))
    return entry, report, net


_OVERWRITE = click.option("--overwrite", is_flag=True, default=False,
                          help="--out holds an earlier result of this command: start over (only its files).")


def _out_dir(out: str | None, model: str, kind: str) -> Path:
    # lazy: zoo --help must not import torch
    from zoo.runs import default_run_dir

    return Path(out) if out else default_run_dir(f"{model}-{kind}")


_COMMON = [
    click.argument("model"),
    click.option("--data", "data", type=click.Path(file_okay=False, exists=True), required=True,
                 help="Image folder: DIR/<class>/* or DIR/{train,val}/<class>/*."),
    click.option("--config", "config_path", type=click.Path(dir_okay=False, exists=True), default=None,
                 help="YAML file with finetune options (as `zoo finetune --config`); flags override it."),
    click.option("--pretrained/--no-pretrained", "pretrained", default=True, show_default=True,
                 help="Start from the zoo's pretrained weights; --no-pretrained: random init (tests, baselines)."),
    fc_dropout_option,
]


def _common(func: Callable) -> Callable:
    for deco in reversed(_COMMON):
        func = deco(func)
    return func


# ----------------------------------------------------------------------------------------------------
# zoo lr-find
# ----------------------------------------------------------------------------------------------------
@cli.command("lr-find", short_help="LR range test: loss vs an exponentially growing learning rate.")
@_common
@click.option("--out", "out", type=click.Path(file_okay=False), default=None,
              help="Output folder.  [default: runs/<model>-lrfind-<YYYYmmdd-HHMMSS>]")
@click.option("--start-lr", type=click.FloatRange(min=0, min_open=True), default=1e-7, show_default=True,
              help="First learning rate of the sweep (head LR; pretrained layers get x backbone-lr-mult).")
@click.option("--end-lr", type=click.FloatRange(min=0, min_open=True), default=10.0, show_default=True,
              help="Last learning rate of the sweep.")
@click.option("--steps", type=click.IntRange(min=5), default=100, show_default=True,
              help="Training steps (batches); the LR grows exponentially from start to end over them.")
@click.option("--method", type=click.Choice(["valley", "steepest"]), default="valley", show_default=True,
              help="Suggestion rule: valley (fastai's, robust) or steepest descent of the smoothed loss.")
@click.option("--smooth", type=click.FloatRange(0.0, 1.0, max_open=True), default=0.98, show_default=True,
              help="Exponential moving average factor of the plotted loss (bias-corrected).")
@click.option("--diverge-factor", type=click.FloatRange(min=1.0, min_open=True), default=4.0, show_default=True,
              help="Stop once the smoothed loss exceeds this x its best.")
@_OVERWRITE
@config_options(skip=("lr",) + _NOT_HERE)
@click.pass_context
def lr_find_cmd(ctx: click.Context, model: str, data: str, config_path: str | None, pretrained: bool,
                fc_dropout: float | None, out: str | None, start_lr: float, end_lr: float, steps: int, method: str,
                smooth: float, diverge_factor: float, overwrite: bool, **values: Any) -> None:
    """Run the LR range test for MODEL on --data and suggest a learning rate.

    The model is set up exactly as `zoo finetune` with the same options would set it up (new head,
    freeze depth, BatchNorm policy, optimizer and its backbone LR multiplier); the LR grows exponentially
    over --steps batches while the training loss is recorded. The smoothed loss is plotted against the
    LR (lr_find.png), the data written to lr_find.csv, and the suggested LR printed with the rule that
    gave it. Nothing is trained for real: the model is thrown away afterwards.

    \b
    Examples:
      zoo lr-find resnet50 --data ./photos
      zoo lr-find resnet50 --data ./photos --freeze 2 --optimizer sgd --method steepest
      zoo lr-find efficientnet_b0 --data ./photos --start-lr 1e-6 --end-lr 1 --steps 200 --out lrtest
      zoo finetune resnet50 --data ./photos --lr auto      # the same test, then training at its LR
    """
    # lazy: not loaded at CLI start (keeps zoo --help fast)
    from zoo.outdir import claim_out

    if not start_lr < end_lr:
        raise ConfigError(f"--start-lr {start_lr:g} must be below --end-lr {end_lr:g}")
    config, _ = _resolve_config(ctx, config_path, values, pretrained)
    say = _say(config.quiet)
    console.keep_going()
    out_dir = _out_dir(out, model, "lrfind")
    with claim_out(out_dir, "lr-find", overwrite=overwrite, note=say):   # before any download
        console.log_to(out_dir / "log.txt")
        _lr_find_into(out_dir, model, data, config, pretrained, fc_dropout, start_lr, end_lr, steps, smooth,
                      diverge_factor, method, say)


def _lr_find_into(out_dir: Path, model: str, data: str, config: FinetuneConfig, pretrained: bool,
                  fc_dropout: float | None, start_lr: float, end_lr: float, steps: int, smooth: float,
                  diverge_factor: float, method: str, say: Callable[[str], None]) -> None:
    # lazy: zoo --help must not import torch
    from finetune.data import write_scan
    from finetune.diagnostics import lr_find
    from zoo.runs import run_data_config

    entry, report, net = _prepare(model, data, config, pretrained, say, fc_dropout)
    write_scan(report, out_dir)
    save_config(config, out_dir / "config.yaml")
    result = lr_find(net, entry.stages, run_data_config(entry, config), report.train, config,
                     head=entry.classifier, start_lr=start_lr, end_lr=end_lr, steps=steps, smooth=smooth,
                     diverge_factor=diverge_factor, method=method, out_png=out_dir / "lr_find.png",
                     out_csv=out_dir / "lr_find.csv", log=say)
    summary = {"model": entry.name, "suggestion": result.suggestion, "method": result.method,
               "valley": result.valley, "steepest": result.steepest, "stopped_early": result.stopped_early,
               "steps_run": len(result.lrs), "start_lr": start_lr, "end_lr": end_lr,
               "backbone_lr_mult": config.backbone_lr_mult,
               "freeze": result.decision.to_dict() if result.decision is not None else None}
    atomic_write_text(out_dir / "lr_find.json", json.dumps(summary, indent=2) + "\n")
    if result.decision is not None:
        echo(f"freeze: {result.decision.label} ({result.decision.reason})")
    echo(result.describe())
    echo(f"plot: {out_dir / 'lr_find.png'}  data: {out_dir / 'lr_find.csv'}")
    random_init = "" if pretrained else " --no-pretrained"
    echo(f"next: zoo finetune {model} --data {data} --lr {result.suggestion:.2g}{random_init}")


# ----------------------------------------------------------------------------------------------------
# zoo sweep
# ----------------------------------------------------------------------------------------------------
@cli.command("sweep", short_help="Grid search (log-spaced LR / weight decay, freeze depth, optimizer).")
@_common
@click.option("--out", "out", type=click.Path(file_okay=False), default=None,
              help="Sweep folder.  [default: runs/<model>-sweep-<YYYYmmdd-HHMMSS>]")
@click.option("--lr", "lr_spec", default="1e-4:1e-2:3", show_default=True, metavar="START:END:N|A,B,..",
              help="Head learning rates: N log-spaced values from START to END, or a comma list.")
@click.option("--weight-decay", "wd_spec", default=None, metavar="START:END:N|A,B,..",
              help="Weight decays, same syntax (0 allowed in a list).  [default: the config's, 1e-4]")
@click.option("--freeze", "freeze_spec", default=None, metavar="F1,F2,..",
              help="Freeze depths to try: head, none, auto or K (train the last K stages).  "
                   "[default: the config's, auto]")
@click.option("--optimizer", "optimizer_spec", default=None, metavar="O1,O2,..",
              help=f"Optimizers to try ({', '.join(OPTIMIZERS)}).  [default: the config's, adam]")
@click.option("--epochs", "epochs", type=click.IntRange(min=1), default=None,
              help=f"Epochs per trial.  [default: the --config file's, else {SWEEP_DEFAULT_EPOCHS}]")
@click.option("--folds", type=click.IntRange(min=0), default=0, show_default=True,
              help="K-fold cross-validation over train+val (stratified, seeded); 0 = the single split.")
@click.option("--resume", is_flag=True, help="Continue the interrupted sweep in --out (finished trials are skipped).")
@click.option("--keep-runs", is_flag=True, help="Keep each trial's run folder (curves, checkpoints) under OUT/trials.")
@_OVERWRITE
@config_options(skip=("lr", "weight_decay", "freeze", "optimizer", "epochs") + _NOT_HERE)
@click.pass_context
def sweep_cmd(ctx: click.Context, model: str, data: str, config_path: str | None, pretrained: bool,
              fc_dropout: float | None, out: str | None, lr_spec: str, wd_spec: str | None, freeze_spec: str | None,
              optimizer_spec: str | None, epochs: int | None, folds: int, resume: bool, keep_runs: bool,
              overwrite: bool, **values: Any) -> None:
    """Grid-search MODEL on --data: every combination is a short finetune, ranked by the val metric.

    Learning rates and weight decays are tried in log space; each trial starts from the same pretrained
    weights, trains --epochs on the same split (or on each of --folds stratified folds: mean +- std) and
    is ranked by --monitor. Diverging trials are recorded, not fatal. Results: OUT/results.csv (ranked),
    OUT/sweep.png (metric vs LR per freeze depth), OUT/best_config.yaml for `zoo finetune --config`.

    \b
    Examples:
      zoo sweep resnet50 --data ./photos --lr 1e-4:1e-2:5
      zoo sweep resnet50 --data ./photos --lr 1e-4:1e-2:3 --weight-decay 0,1e-4 --freeze head,1,2
      zoo sweep resnet50 --data ./photos --optimizer adam,sgd --folds 3 --epochs 4
      zoo sweep resnet50 --data ./photos --out sw1 --resume          # after Ctrl-C
      zoo finetune resnet50 --data ./photos --config sw1/best_config.yaml --epochs 30
    """
    # lazy: zoo --help must not import torch, nor load these modules
    from finetune.sweep import parse_choices, parse_values
    from zoo.outdir import claim_out

    if resume and not out:
        raise UsageError("--resume needs --out: the folder of the sweep to continue")
    lrs = parse_values(lr_spec, "lr")
    wds = parse_values(wd_spec, "weight-decay", allow_zero=True) if wd_spec is not None else None
    freezes = parse_choices(freeze_spec, "freeze") if freeze_spec is not None else None
    optimizers = parse_choices(optimizer_spec, "optimizer", OPTIMIZERS) if optimizer_spec is not None else None
    config, raw = _resolve_config(ctx, config_path, values, pretrained)
    config = config.replace(epochs=epochs if epochs is not None else int(raw.get("epochs", SWEEP_DEFAULT_EPOCHS)))
    say = _say(config.quiet)
    console.keep_going()
    out_dir = _out_dir(out, model, "sweep")
    with claim_out(out_dir, "sweep", resume=resume, overwrite=overwrite, note=say):   # before any download
        console.log_to(out_dir / "log.txt")
        _sweep_into(ctx, out_dir, model, data, config, pretrained, fc_dropout, lrs, wds, freezes, optimizers, folds,
                    resume, keep_runs, say)


def _sweep_into(ctx: click.Context, out_dir: Path, model: str, data: str, config: FinetuneConfig, pretrained: bool,
                fc_dropout: float | None, lrs, wds, freezes, optimizers, folds: int, resume: bool, keep_runs: bool,
                say: Callable[[str], None]) -> None:
    # lazy: zoo --help must not import torch
    from finetune.sweep import sweep
    from zoo.runs import run_data_config

    entry, report, net = _prepare(model, data, config, pretrained, say, fc_dropout)
    net.cpu()

    def factory():
        # A fresh copy of the same starting weights for every trial (no re-reading from disk).
        return copy.deepcopy(net)

    n = (len(lrs) * len(wds or [0]) * len(freezes or [0]) * len(optimizers or [0])) * max(1, folds)
    say(f"sweep: {n} training run(s) of {config.epochs} epoch(s) into {out_dir}")
    result = sweep(factory, entry.stages, run_data_config(entry, config), report.train, report.val, config,
                   head=entry.classifier, out_dir=out_dir, lrs=lrs, weight_decays=wds, freezes=freezes,
                   optimizers=optimizers, folds=folds, resume=resume, keep_runs=keep_runs, log=say)
    if result.skipped:
        say(f"resumed: {result.skipped} finished trial(s) taken from {out_dir / 'results.jsonl'}")
    for line in _table(result):
        echo(line)
    if result.best is None:
        echo("no trial finished: every one diverged; try lower learning rates (see `zoo lr-find`)")
        ctx.exit(1)
    echo(f"best config: {out_dir / 'best_config.yaml'}  plot: {out_dir / 'sweep.png'}  "
         f"table: {out_dir / 'results.csv'}")
    random_init = "" if pretrained else " --no-pretrained"   # the sweep's trials started from random weights
    echo(f"next: zoo finetune {model} --data {data} --config {out_dir / 'best_config.yaml'} "
         f"--epochs {max(30, config.epochs)}{random_init}")


def _table(result) -> list[str]:
    """The ranked trials as aligned text."""
    metric = result.metric
    head = ["rank", "lr", "weight_decay", "freeze", "optimizer", metric, "status"]
    rows = []
    for r in result.table():
        value = r[metric]
        cell = "-" if isinstance(value, float) and math.isnan(value) else f"{value:.4f}"
        if result.folds > 1 and cell != "-":
            cell += f" +- {r[metric + '_std']:.4f}"
        rows.append([str(r["rank"]), f"{r['lr']:.2e}", f"{r['weight_decay']:.2g}", str(r["freeze"]),
                     str(r["optimizer"]), cell, str(r["status"])])
    widths = [max(len(h), *(len(row[i]) for row in rows)) if rows else len(h) for i, h in enumerate(head)]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    return [fmt.format(*head).rstrip()] + [fmt.format(*row).rstrip() for row in rows]
