"""``zoo finetune``: every FinetuneConfig option as a flag, ``--config`` YAML underneath, ``--resume``.

No torch at import (``zoo --help`` stays fast): the work happens in ``zoo.runs``, imported inside the
command. Precedence: defaults < ``--config file.yaml`` < flags the user actually typed.
"""
from __future__ import annotations

import dataclasses
import math
import os
from typing import Any

import click
from click.core import ParameterSource

from finetune.config import ACTIVATIONS, HEADS, MONITORS, OPTIMIZERS, SCHEDULES, FinetuneConfig
from zoo.cli import cli

__all__ = ["finetune_cmd", "OPTION_HELP"]

# One help line per FinetuneConfig field (a test checks that every field has a flag).
OPTION_HELP: dict[str, str] = {
    "val_split": "Fraction of each class held out for validation when DIR has no train/val folders.",
    "strict": "Unreadable images are an error instead of being skipped with a warning.",
    "batch_size": "Global batch size (split across processes under torchrun).",
    "workers": "DataLoader worker processes; -1 = auto (on CUDA all CPUs but one, shared by torchrun's local processes; else min(8, CPUs - 1)), 0 = load in the main process.",
    "class_weights": "auto: weight the loss by inverse class frequency (imbalanced data).",
    "sampler": "balanced: oversample rare classes in each epoch.",
    "augment": "Training augmentation (random crop-and-scale, flip, brightness/contrast).",
    "crop_scale_min": "Smallest area fraction of the random crop.",
    "hflip": "Horizontal flip probability (0 disables).",
    "brightness": "Brightness jitter strength (0 disables).",
    "contrast": "Contrast jitter strength (0 disables).",
    "head": "New classifier: linear (FC-C, Xavier init) or a small MLP.",
    "mlp_hidden": "MLP head: hidden units.",
    "mlp_dropout": "MLP head: dropout probability.",
    "mlp_activation": "MLP head: activation.",
    "freeze": "What trains: auto (from the dataset size), head, none (everything) or K (the last K stages).",
    "small_per_class": "auto freeze: fewer images per class than this -> head only.",
    "small_total": "auto freeze: this many images in total or fewer -> head only.",
    "large_per_class": "auto freeze: at least this many per class -> everything unfrozen.",
    "medium_stages": "auto freeze: stages unfrozen for a medium-sized dataset.",
    "head_epochs": "Head-only epochs before unfreezing; -1 = until its val loss stops improving (max 10); 0 = off.",
    "bn": "BatchNorm statistics: eval keeps the pretrained ones frozen; train updates them.",
    "optimizer": "Optimizer.",
    "lr": "Head learning rate, or 'auto' to run the LR range test first.",
    "backbone_lr_mult": "Pretrained layers train at lr x this.",
    "momentum": "Momentum (sgd, rmsprop).",
    "nesterov": "Nesterov momentum (sgd).",
    "weight_decay": "L2 weight decay (not on biases and norm parameters).",
    "schedule": "Learning-rate schedule (stepped per batch; plateau per epoch).",
    "warmup_epochs": "Linear LR warm-up, in epochs (fractions allowed).",
    "step_size": "step/exp schedules: decay every N epochs.",
    "gamma": "Decay factor of the step/exp/inv/plateau schedules.",
    "epochs": "Maximum epochs in total (early stopping usually ends sooner).",
    "patience": "Early stopping: epochs without improvement before stopping.",
    "min_delta": "Early stopping: smallest change that counts as an improvement.",
    "monitor": "Metric for early stopping and the best checkpoint.",
    "seed": "Seed of the split, the initialisation and the data order.",
    "device": "auto (CUDA, then Apple MPS, then CPU), cpu, cuda, cuda:N or mps.",
    "amp": "Mixed precision on CUDA (bf16 where supported, else fp16 with loss scaling).",
    "channels_last": "channels_last memory format on CUDA.",
    "compile": "torch.compile the model (slower start, faster epochs).",
    "gpu_normalize": "On CUDA: workers decode, crop and send uint8 batches; the GPU flips, jitters and normalises them.",
    "decode": "Where images are decoded: workers (PIL, in DataLoader processes) or device (JPEGs decoded, "
              "cropped and flipped on the GPU with nvJPEG; workers only read files): for hosts whose cores "
              "cannot keep the GPU fed.",
    "fast_head": "Head-only training on cached backbone features (much faster; same result).",
    "aug_views": "Fast head path: augmented views cached per image (0 = un-augmented only).",
    "overfit_batches": "Sanity check instead of training: try to overfit N fixed batches, then exit.",
    "tensorboard": "Also log to RUN/tensorboard (needs the tensorboard package).",
    "quiet": "No progress bars or per-epoch lines.",
}
_CHOICES: dict[str, tuple[str, ...]] = {
    "optimizer": OPTIMIZERS, "schedule": SCHEDULES, "head": HEADS, "mlp_activation": ACTIVATIONS,
    "monitor": MONITORS, "bn": ("eval", "train"), "class_weights": ("none", "auto"),
    "sampler": ("random", "balanced"), "decode": ("workers", "device"),
}
_CLICK_TYPES = {int: click.INT, float: click.FLOAT, str: click.STRING}


def _config_options(func):
    """One click option per FinetuneConfig field; booleans as --x/--no-x pairs."""
    defaults = FinetuneConfig()
    for f in reversed(dataclasses.fields(FinetuneConfig)):
        flag = "--" + f.name.replace("_", "-")
        default = getattr(defaults, f.name)
        help_text = OPTION_HELP.get(f.name, f.name.replace("_", " ") + ".")
        if isinstance(default, bool):
            decl = f"{flag}/--no-{flag[2:]}"
            opt = click.option(decl, f.name, default=default, show_default=True, help=help_text)
        elif f.name == "lr":
            opt = click.option(flag, f.name, default=str(default), show_default=True, metavar="LR|auto",
                               help=help_text)
        elif f.name in _CHOICES:
            opt = click.option(flag, f.name, type=click.Choice(_CHOICES[f.name]), default=default,
                               show_default=True, help=help_text)
        else:
            opt = click.option(flag, f.name, type=_CLICK_TYPES[type(default)], default=default,
                               show_default=True, help=help_text)
        func = opt(func)
    return func


def _given(ctx: click.Context, values: dict[str, Any]) -> dict[str, Any]:
    """Only the config options the user actually set on the command line (or through the environment)."""
    names = {f.name for f in dataclasses.fields(FinetuneConfig)}
    given = {}
    for name, value in values.items():
        if name in names and ctx.get_parameter_source(name) in (ParameterSource.COMMANDLINE,
                                                                 ParameterSource.ENVIRONMENT):
            given[name] = value
    return given


def _parse_lr(text: str) -> tuple[float | None, bool]:
    """(lr, auto): "auto" or a positive number."""
    if str(text).strip().lower() == "auto":
        return None, True
    try:
        lr = float(text)
    except ValueError:
        raise click.BadParameter(f"{text!r} is neither a number nor 'auto' (e.g. --lr 1e-3)", param_hint="--lr")
    if not (lr > 0 and math.isfinite(lr)):
        raise click.BadParameter("must be a positive number, e.g. 1e-3", param_hint="--lr")
    return lr, False


def _is_main() -> bool:
    # torchrun sets RANK: only rank 0 prints.
    return int(os.environ.get("RANK", "0") or 0) == 0


@cli.command("finetune", short_help="Finetune a zoo model on a folder of labelled images.")
@click.argument("model", required=False)
@click.option("--data", "data", type=click.Path(file_okay=False), default=None,
              help="Image folder: DIR/<class>/* or DIR/{train,val}/<class>/*.")
@click.option("--config", "config_path", type=click.Path(dir_okay=False, exists=True), default=None,
              help="YAML file with any of the options below; flags given here override it.")
@click.option("--out", "out", type=click.Path(file_okay=False), default=None,
              help="Run folder.  [default: runs/<model>-<YYYYmmdd-HHMMSS>]")
@click.option("--resume", "resume", type=click.Path(file_okay=False, exists=True), default=None,
              help="Continue the interrupted run in this folder (its config.yaml and split are reused).")
@click.option("--pretrained/--no-pretrained", "pretrained", default=True, show_default=True,
              help="Start from the zoo's pretrained weights; --no-pretrained: random init (baselines, tests).")
@click.option("--export/--no-export", "export", default=True, show_default=True,
              help="Write a bundle to RUN/export at the end (see `zoo predict`).")
@click.option("--exclude", "exclude", type=click.Path(dir_okay=False, exists=True), default=None,
              help="Leave out the files listed here: a findings.csv of `zoo doctor` or one path per line "
                   "(recorded in RUN/exclude.txt).")
@_config_options
@click.pass_context
def finetune_cmd(ctx: click.Context, model: str | None, data: str | None, config_path: str | None,
                 out: str | None, resume: str | None, pretrained: bool, export: bool, exclude: str | None,
                 **values: Any) -> None:
    """Finetune MODEL on the labelled images in --data, following the lecture's recipe.

    The data is checked first (nothing is downloaded if it cannot be trained on); the freeze depth is
    chosen from the dataset size (and printed with its reason); the head trains first, then the chosen
    stages; early stopping keeps the best epoch. Everything lands in a run folder: config.yaml,
    scan.json, split.json, manifest.json, metrics.csv, curves.png, checkpoints/, summary.json, export/.

    Multi-GPU: torchrun --nproc-per-node N -m zoo finetune ...  (--batch-size is the global batch).

    \b
    Examples:
      zoo finetune resnet50 --data ./photos
      zoo finetune resnet50 --data ./photos --freeze 2 --lr 3e-4 --epochs 20
      zoo finetune efficientnet_b0 --data ./photos --lr auto --class-weights auto
      zoo finetune resnet50 --data ./photos --config recipe.yaml --seed 1
      zoo finetune resnet50 --data ./photos --overfit-batches 2     # sanity check only
      zoo finetune resnet50 --data ./photos --exclude doctor-photos/findings.csv
      zoo finetune --resume runs/resnet50-20250101-120000            # after Ctrl-C or a crash
      torchrun --nproc-per-node 4 -m zoo finetune resnet50 --data ./photos --batch-size 256
    """
    from zoo import runs

    main = _is_main()

    def log(msg: str) -> None:
        if main:
            click.echo(msg, err=True)

    given = _given(ctx, values)
    lr_auto = False
    if "lr" in given or not resume:
        lr_value, lr_auto = _parse_lr(values["lr"])
        if "lr" in given:
            if lr_auto:
                given.pop("lr")
            else:
                given["lr"] = lr_value

    if resume:
        if lr_auto:
            raise click.UsageError("--lr auto cannot be combined with --resume: the run keeps its learning rate")
        if config_path:
            raise click.UsageError("--config cannot be combined with --resume: the run's own config.yaml is used")
        if exclude:
            raise click.UsageError("--exclude cannot be combined with --resume: the run keeps its exclude.txt")
        outcome = runs.resume_finetune(resume, given, data_dir=data, export=export, log=log)
    else:
        if not model:
            raise click.UsageError("MODEL is required (e.g. `zoo finetune resnet50 --data DIR`); "
                                   "`zoo list` shows the zoo")
        if not data:
            raise click.UsageError("--data DIR is required: a folder of class sub-folders of images")
        base = runs.load_run_config(config_path)
        config = FinetuneConfig.from_dict({**base.to_dict(), **given}, source="command line")
        outcome = runs.run_finetune(model, data, config, out=out, pretrained=pretrained, lr_auto=lr_auto,
                                    export=export, log=log, exclude=exclude)

    if not main:
        return
    if outcome.overfit is not None:
        click.echo(outcome.overfit.verdict)
        ctx.exit(0 if outcome.overfit.passed else 1)
    _report(outcome)


def _report(outcome) -> None:
    """The end-of-run lines on stdout: best epoch, metrics, per-class accuracy, advice, where things are."""
    result = outcome.result
    m = result.metrics or {}
    how = "stopped early" if result.stopped_early else f"{len(result.history)} epochs"
    if m:
        click.echo(f"best epoch {result.best_epoch} ({how}): val acc {m.get('val_acc', float('nan')):.3f}, "
                   f"val loss {m.get('val_loss', float('nan')):.4f}")
        per_class = m.get("per_class") or {}
        if per_class:
            cells = ", ".join(f"{c} {'-' if v is None else f'{v:.2f}'}" for c, v in per_class.items())
            click.echo(f"per-class accuracy: {cells}")
    else:
        click.echo(f"finished ({how}); no validation images, so the last epoch is kept")
    try:
        from finetune.diagnostics import advise
    except ImportError:
        advise = None
    if advise is not None:
        for line in advise(result.history):
            click.echo(f"advice: {line}")
    click.echo(f"run folder: {outcome.run_dir}")
    if outcome.export_dir is not None:
        click.echo(f"bundle: {outcome.export_dir}  (zoo predict {outcome.export_dir} IMAGE)")
