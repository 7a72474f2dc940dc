"""``zoo sweep``: a grid search in log space as a command, each trial a short finetune. Every finetune option is
accepted (defaults < ``--config`` YAML < flags typed). No torch at import."""
from __future__ import annotations

import copy
from pathlib import Path
from typing import Any, Callable

import click

from finetune.core.config import OPTIMIZERS, FinetuneConfig
from finetune.core.errors import Interrupted
from finetune.core.metrics import metric_text
from finetune.core.policy import default_epochs
from finetune.core.io import new_run_command
from finetune.core.rerun import kept_run_epochs, model_flags
from zoo.cli.app import cli
from zoo.cli.console import echo
from zoo.cli.options import IntRange, RangedOption, config_options, read_of_the_file, resolve_config
from zoo.errors import UsageError
from zoo.cli.shared import NOT_HERE, claimed_out, common_options, overwrite_option, scan_and_build

__all__ = ["sweep_cmd"]


SWEEP_DEFAULT_EPOCHS = 5     # a trial is a short finetune: enough to rank, not to converge


# ----------------------------------------------------------------------------------------------------
# zoo sweep
# ----------------------------------------------------------------------------------------------------
@cli.command("sweep", short_help="Grid search (log-spaced LR / weight decay, freeze depth, optimizer).")
@common_options
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
@click.option("--epochs", "epochs", type=IntRange(min=1), default=None, cls=RangedOption,
              default_text=f"the --config file's, else {SWEEP_DEFAULT_EPOCHS}", help="Epochs per trial.")
@click.option("--folds", type=IntRange(min=0), default=0, show_default=True,
              help="K-fold cross-validation over train+val (stratified, seeded); 0 = the single split.")
@click.option("--resume", is_flag=True,
              help="Continue the sweep in --out: finished trials are skipped; new --lr/--weight-decay/--freeze/"
                   "--optimizer values extend it, ranked with the earlier trials (other options must match).")
@click.option("--keep-runs", is_flag=True, help="Keep each trial's run folder (curves, checkpoints) under OUT/trials.")
@overwrite_option
@config_options(skip=("lr", "weight_decay", "freeze", "optimizer", "epochs") + NOT_HERE)
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
      zoo sweep resnet50 --data ./photos --optimizer adam,sgd --folds 3 --epochs 4 --out sw1
      zoo sweep resnet50 --data ./photos --optimizer adam,sgd --folds 3 --epochs 4 --out sw1 --resume
                                                    # after Ctrl-C: the same options, finished trials skipped
      zoo sweep resnet50 --data ./photos --optimizer adam,sgd --folds 3 --epochs 4 --out sw1 --resume --lr 3e-2
                                                    # extend the grid: ranked with the trials already there
      zoo finetune resnet50 --data ./photos --config sw1/best_config.yaml --epochs 0    # 0: auto
    """
    # lazy: zoo --help must not import torch, nor load these modules
    from finetune.tools.sweep import check_folds, parse_choices, parse_values

    if resume and not out:
        raise UsageError("--resume needs --out: the folder of the sweep to continue")
    with read_of_the_file(ctx, config_path, "folds", "folds"):
        check_folds(folds)      # before the scan and the model build, as the grid's values
    with read_of_the_file(ctx, config_path, "lr_spec", "lr"):
        lrs = parse_values(lr_spec, "lr")
    with read_of_the_file(ctx, config_path, "wd_spec", "weight_decay"):
        wds = parse_values(wd_spec, "weight-decay", allow_zero=True) if wd_spec is not None else None
    freezes = parse_choices(freeze_spec, "freeze") if freeze_spec is not None else None
    with read_of_the_file(ctx, config_path, "optimizer_spec", "optimizer"):
        optimizers = parse_choices(optimizer_spec, "optimizer", OPTIMIZERS) if optimizer_spec is not None else None
    config, raw, notes = resolve_config(ctx, config_path, values, pretrained)
    # (the file's epochs as the config read it: `epochs: 1_0` is 10)
    config = config.replace(epochs=epochs if epochs is not None else config.epochs if "epochs" in raw
                            else SWEEP_DEFAULT_EPOCHS)
    with claimed_out(ctx, "sweep", config, config_path, raw, notes, model, data, out, resume=resume,
                     overwrite=overwrite) as (out_dir, say):
        _sweep_into(ctx, out_dir, model, data, config, pretrained, fc_dropout, lrs, wds, freezes, optimizers, folds,
                    resume, keep_runs, say)


def _fit_afresh(*args: Any, run_dir: Path | None = None, **kwargs: Any) -> Any:
    """``fit``, into a trial's run folder (--keep-runs) cleared of what an interrupted attempt left there (its
    last.pt refused the trial on --resume: "already holds a run"), by the rule --overwrite goes by."""
    # lazy: zoo --help must not import torch
    from finetune.tools.train import fit
    from zoo.outdir import clear_trial_run

    if run_dir is not None and run_dir.is_dir():    # (a trial runs only when results.jsonl does not hold it)
        clear_trial_run(run_dir)
    return fit(*args, run_dir=run_dir, **kwargs)


def _sweep_into(ctx: click.Context, out_dir: Path, model: str, data: str, config: FinetuneConfig, pretrained: bool,
                fc_dropout: float | None, lrs, wds, freezes, optimizers, folds: int, resume: bool, keep_runs: bool,
                say: Callable[[str], None]) -> None:
    # lazy: zoo --help must not import torch
    from finetune.tools.sweep import finished_trials, sweep
    from zoo.jobs.finetune import feature_cache, run_data_config

    entry, report, net = scan_and_build(model, data, config, pretrained, say, fc_dropout)
    net.cpu()

    def factory():
        # A fresh copy of the same starting weights for every trial (no re-reading from disk).
        return copy.deepcopy(net)

    trials = len(lrs) * len(wds or [0]) * len(freezes or [0]) * len(optimizers or [0])
    n = trials * max(1, folds)
    say(f"sweep: {n} training run(s) of {_length(config)} into {out_dir}")
    # L-BFGS picks its own L2 on the validation split and takes no optimizer steps: these axes change nothing
    idle = [flag for flag, values in (("--lr", lrs), ("--optimizer", optimizers), ("--weight-decay", wds))
            if values is not None and len(values) > 1]
    counts, n_stages = report.train.class_counts(), len(entry.stages)
    head_only = bool(idle) and _lr_unused_everywhere(config, freezes, counts, n_stages)
    if head_only:
        say(_head_only_note(idle))
    try:
        result = sweep(factory, entry.stages, run_data_config(entry, config), report.train, report.val, config,
                       head=entry.classifier, out_dir=out_dir, lrs=lrs, weight_decays=wds, freezes=freezes,
                       optimizers=optimizers, folds=folds, resume=resume, keep_runs=keep_runs, log=say,
                       feature_cache=feature_cache(say), fit_fn=_fit_afresh,
                       identity={"model": entry.name, "pretrained": bool(pretrained), "fc_dropout": fc_dropout,
                                 "data": report.fingerprint()}, data_dir=report.root)
    except (Interrupted, KeyboardInterrupt):
        # (a trial's own message would say its epochs were not saved: the sweep saves whole trials)
        done = finished_trials(out_dir, config, n_stages, lrs, wds, freezes, optimizers)
        raise Interrupted(f"interrupted: {done} of {trials} trial(s) are saved in "
                          f"{out_dir / 'results.jsonl'}; continue with the same command and --resume "
                          f"(--out {out_dir})") from None
    if result.skipped:
        say(f"resumed: {result.skipped} finished trial(s) taken from {out_dir / 'results.jsonl'}")
    if result.earlier:
        # a resume with another grid extends the sweep (same fixed options, checked): its trials stay ranked
        say(f"resumed: {result.earlier} earlier trial(s) outside this grid kept from {out_dir / 'results.jsonl'}; "
            f"the table, best config and plot rank all {len(result.trials)}")
    ok = [t for t in result.trials if t.status == "ok"]
    varied = [flag for flag, key in (("--lr", "lr"), ("--optimizer", "optimizer"), ("--weight-decay", "weight_decay"))
              if len({t.params[key] for t in ok}) > 1]
    if not head_only and varied and all(t.solved_head for t in ok):
        if _lr_unused_everywhere(config, sorted({t.params["freeze"] for t in ok}), counts, n_stages):
            say(_head_only_note(varied))      # (a grid extended on resume: the trials of both train the head only)
        else:    # found after the fact: with layers to train, the head epoch solved by L-BFGS was the best of each
            say("note: every trial kept its head epoch, solved by L-BFGS, which uses no learning rate, optimizer or "
                f"weight decay: the {', '.join(varied)} values rank by nothing; sweep more --epochs so that training "
                "the layers can beat the solved head, or --head-epochs 0 to rank the finetuning alone")
    for line in _table(result):
        echo(line)
    if result.best is None:
        echo("no trial finished: every one diverged; try lower learning rates (see `zoo lr-find`)")
        ctx.exit(1)
    echo(f"best config: {out_dir / 'best_config.yaml'}  plot: {out_dir / 'sweep.png'}  "
         f"table: {out_dir / 'results.csv'}")
    # the trials' model: random weights, another FC dropout (rerun.model_flags, as every such line says them)
    flags = model_flags(pretrained, fc_dropout)
    # (io.new_run_command: quoted, its paths absolute)
    echo("next: " + new_run_command("--config", Path(out_dir) / "best_config.yaml",
                                    "--epochs", kept_run_epochs(config.epochs), *flags, model=model, data=report.root))


def _length(config: FinetuneConfig) -> str:
    """The trials' epochs for the sweep's first line: epochs 0 (auto, from a --config file) is each trial's
    ``policy.default_epochs`` (QA: "of 0 epoch(s)"), which adds a head warm-up trained by gradient (``--head mlp``)
    to the layers' (helper-101: the line said 8 where such trials ran up to 17)."""
    if config.epochs:
        return f"{config.epochs} epoch(s)"
    return (f"auto epochs ({default_epochs(config, 1)} when layers train, {default_epochs(config, 0)} "
            "for the head only)")


def _head_only_note(flags: list[str]) -> str:
    return ("note: every trial trains the head only, solved by L-BFGS on cached features: the learning rate, "
            f"optimizer and weight decay train nothing there, so the {', '.join(flags)} values rank by nothing; "
            "add --head-solver gradient to compare them, or sweep --freeze to train layers")


def _lr_unused_everywhere(config: FinetuneConfig, freezes, class_counts: list[int], n_stages: int) -> bool:
    """Whether no trial of the grid uses a learning rate (``policy.lr_unused`` for each freeze depth)."""
    from finetune.core.policy import decide_freeze, lr_unused    # lazy: as the rest of the sweep's work

    counts = [int(c) for c in class_counts]
    for freeze in freezes or [config.freeze]:
        trial = config.replace(freeze=freeze)
        depth = decide_freeze(trial, sum(counts), len(counts), min(counts), n_stages).trainable_stages
        if not lr_unused(trial, depth):
            return False
    return True


def _table(result) -> list[str]:
    """The ranked trials as aligned text."""
    metric = result.metric
    head = ["rank", "lr", "weight_decay", "freeze", "optimizer", metric, "status"]
    rows = []
    for r in result.table():
        cell = metric_text(metric, r[metric], ".4f")
        if result.folds > 1 and cell != "-":
            cell += f" +- {metric_text(metric, r[metric + '_std'], '.4f')}"
        rows.append([str(r["rank"]), f"{r['lr']:.2e}", f"{r['weight_decay']:.2g}", str(r["freeze"]),
                     str(r["optimizer"]), cell, str(r["status"])])
    widths = [max(len(h), *(len(row[i]) for row in rows)) if rows else len(h) for i, h in enumerate(head)]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    return [fmt.format(*head).rstrip()] + [fmt.format(*row).rstrip() for row in rows]
