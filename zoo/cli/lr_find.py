"""``zoo lr-find``: the LR range test as a command. The model is set up exactly as ``zoo finetune`` would set it
up, so every finetune option is accepted here too. No torch at import."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import click

from finetune.core.config import FinetuneConfig, save_config
from finetune.core.errors import ConfigError
from finetune.core.io import new_run_command, write_json
from finetune.core.policy import lr_unused
from finetune.core.rerun import model_flags
from zoo.cli.app import cli
from zoo.cli.console import echo
from zoo.cli.options import FiniteFloatRange, IntRange, config_options, resolve_config
from zoo.cli.shared import NOT_HERE, claimed_out, common_options, overwrite_option, scan_and_build

__all__ = ["lr_find_cmd"]


# ----------------------------------------------------------------------------------------------------
# zoo lr-find
# ----------------------------------------------------------------------------------------------------
# What schedules, stops, averages or judges whole epochs: a range test runs --steps batches at growing LRs and
# keeps nothing (QA: these were listed, accepted and silently ignored). --head-epochs and --head-solver are taken:
# where layers train, the test starts from the head the run's head phase trains (diagnostics.lr_find).
NOT_IN_A_RANGE_TEST = ("epochs", "patience", "min_delta", "monitor", "schedule", "step_size", "gamma", "warmup_epochs",
                       "ema", "head_guard")


@cli.command("lr-find", short_help="LR range test: loss vs an exponentially growing learning rate.")
@common_options
@click.option("--out", "out", type=click.Path(file_okay=False), default=None,
              help="Output folder.  [default: runs/<model>-lrfind-<YYYYmmdd-HHMMSS>]")
@click.option("--start-lr", type=FiniteFloatRange(min=0, min_open=True), default=1e-7, show_default=True,
              help="First learning rate of the sweep (head LR; pretrained layers get x backbone-lr-mult).")
@click.option("--end-lr", type=FiniteFloatRange(min=0, min_open=True), default=10.0, show_default=True,
              help="Last learning rate of the sweep.")
@click.option("--steps", type=IntRange(min=5, max=10000), default=100, show_default=True,
              help="Training steps (batches); the LR grows exponentially from start to end over them. At most 10000 "
                   "(a mistyped 1e20 ran for ever).")
@click.option("--method", type=click.Choice(["auto", "valley", "steepest", "edge", "policy"]), default="auto",
              show_default=True,
              help="Suggestion rule: valley (fastai's), steepest descent of the smoothed loss, edge (1/10 of where "
                   "the loss diverged) or policy (zoo finetune's default LR for this setup, lowered to 2x where the "
                   "loss diverged if that is below it); auto: policy where layers train from the head solved first "
                   "(the default: the test has no warm-up or weight average, and read too low there), edge from "
                   "another trained head, else valley.")
@click.option("--smooth", type=FiniteFloatRange(0.0, 1.0, max_open=True), default=0.98, show_default=True,
              help="Exponential moving average factor of the plotted loss (bias-corrected).")
@click.option("--diverge-factor", type=FiniteFloatRange(min=1.0, min_open=True), default=4.0, show_default=True,
              help="Stop once the smoothed loss exceeds this x its best.")
@overwrite_option
@config_options(skip=("lr",) + NOT_IN_A_RANGE_TEST + NOT_HERE)
@click.pass_context
def lr_find_cmd(ctx: click.Context, model: str, data: str, config_path: str | None, pretrained: bool,
                fc_dropout: float | None, out: str | None, start_lr: float, end_lr: float, steps: int, method: str,
                smooth: float, diverge_factor: float, overwrite: bool, **values: Any) -> None:
    """Run the LR range test for MODEL on --data and suggest a learning rate.

    The model is set up exactly as `zoo finetune` with the same options would set it up (new head,
    freeze depth, BatchNorm policy, optimizer and its backbone LR multiplier); where layers train, the run's
    head phase runs first (the head solved on cached features), as finetuning starts from it. The LR grows
    exponentially over --steps batches while the training loss is recorded. The smoothed loss is plotted against the
    LR (lr_find.png), the data written to lr_find.csv, and the suggested LR printed with the rule that
    gave it. Nothing is trained for real: the model is thrown away afterwards.

    \b
    Examples:
      zoo lr-find resnet50 --data ./photos
      zoo lr-find resnet50 --data ./photos --freeze 2 --optimizer sgd
      zoo lr-find resnet50 --data ./photos --freeze head --method steepest
      zoo lr-find efficientnet_b0 --data ./photos --start-lr 1e-6 --end-lr 1 --steps 200 --out lrtest
      zoo finetune resnet50 --data ./photos --lr auto      # the same test, then training at its LR
    """
    # lazy: not loaded at CLI start (keeps zoo --help fast)
    if not start_lr < end_lr:
        raise ConfigError(f"--start-lr {start_lr:g} must be below --end-lr {end_lr:g}")
    config, raw, notes = resolve_config(ctx, config_path, values, pretrained)
    with claimed_out(ctx, "lr-find", config, config_path, raw, notes, model, data, out,
                     overwrite=overwrite) as (out_dir, say):
        _lr_find_into(out_dir, model, data, config, pretrained, fc_dropout, start_lr, end_lr, steps, smooth,
                      diverge_factor, method, say)


def _lr_find_into(out_dir: Path, model: str, data: str, config: FinetuneConfig, pretrained: bool,
                  fc_dropout: float | None, start_lr: float, end_lr: float, steps: int, smooth: float,
                  diverge_factor: float, method: str, say: Callable[[str], None]) -> None:
    # lazy: zoo --help must not import torch
    from finetune.data import write_scan
    from finetune.tools.diagnostics import lr_find
    from zoo.jobs.finetune import feature_cache, run_data_config

    entry, report, net = scan_and_build(model, data, config, pretrained, say, fc_dropout)
    write_scan(report, out_dir)
    save_config(config, out_dir / "config.yaml")
    result = lr_find(net, entry.stages, run_data_config(entry, config), report.train, config,
                     head=entry.classifier, val_set=report.val, start_lr=start_lr, end_lr=end_lr, steps=steps,
                     smooth=smooth, diverge_factor=diverge_factor, method=method, out_png=out_dir / "lr_find.png",
                     out_csv=out_dir / "lr_find.csv", log=say, feature_cache=feature_cache(say))
    summary = {"model": entry.name, "suggestion": result.suggestion, "method": result.method,
               "valley": result.valley, "steepest": result.steepest, "edge": result.edge, "policy": result.policy,
               "stopped_early": result.stopped_early,
               "steps_run": len(result.lrs), "start_lr": start_lr, "end_lr": end_lr,
               "from_trained_head": result.from_trained_head,
               "backbone_lr_mult": config.backbone_lr_mult,
               "freeze": result.decision.to_dict() if result.decision is not None else None}
    write_json(out_dir / "lr_find.json", summary, indent=2)
    if result.decision is not None:
        echo(f"freeze: {result.decision.label} ({result.decision.reason})")
    echo(result.describe())
    echo(f"plot: {out_dir / 'lr_find.png'}  data: {out_dir / 'lr_find.csv'}")
    # The model and options the test ran with (config.yaml: defaults < --config < flags): without them the
    # command printed trained another setup (freeze depth, optimizer, backbone LR multiplier) than the one probed.
    flags = model_flags(pretrained, fc_dropout)
    solver = []
    if result.decision is not None and lr_unused(config, result.decision.trainable_stages):
        echo("note: zoo finetune's default head-only run solves the head by L-BFGS and uses no learning rate; "
             "this one applies with --head-solver gradient (or when layers train: --freeze)")
        solver = ["--head-solver", "gradient"]
    # (io.new_run_command: quoted, its paths absolute)
    echo("next: " + new_run_command("--config", Path(out_dir) / "config.yaml",
                                    "--lr", f"{result.suggestion:.2g}", *solver, *flags, model=model, data=report.root))
