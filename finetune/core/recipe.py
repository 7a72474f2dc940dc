"""The shared set-up of the lecture's recipe: fit, the LR finder, the overfit check and the sweep all
call :func:`prepare_model`, so the model they train is prepared identically everywhere."""
from __future__ import annotations

from typing import Any, Sequence

import torch
from torch import nn
from torch.func import functional_call
from torch.nn.modules.batchnorm import _BatchNorm

from finetune.core.errors import BatchNormBatchError, ConfigError, DataError
from finetune.core.policy import FreezeDecision, decide_freeze
from finetune.core.surgery import apply_freeze, belongs_to, replace_head, set_bn_eval

__all__ = ["prepare_model", "check_batchnorm_batch", "lone_value_batchnorm", "check_input_size"]


def prepare_model(model: nn.Module, stages: Sequence[Sequence[str]], head: str, num_classes: int,
                  class_counts: Sequence[int], config: Any, *, reset_head: bool = True) -> FreezeDecision:
    """Replace the head, decide and apply the freeze depth, and apply the BatchNorm policy.

    Args:
        model: the pretrained network, modified in place.
        stages: module-name prefixes per stage, input -> output, classifier excluded.
        head: module name of the classifier.
        num_classes: C.
        class_counts: training images per class (drives the "auto" freeze decision).
        config: a FinetuneConfig (head, mlp_*, freeze and its thresholds, bn).
        reset_head: False when the head was already replaced (e.g. a second call on the same model),
            so its trained weights are kept.

    Returns:
        The FreezeDecision, whose reason the caller prints.

    Raises:
        ConfigError: bad head name, head options, freeze value or stage list.
        DataError: no training images.
    """
    if not isinstance(model, nn.Module):
        raise ConfigError(f"model must be a torch.nn.Module, not a {type(model).__name__}")
    _check_names(stages, head)
    counts = [int(c) for c in class_counts]
    if not counts or sum(counts) == 0:
        raise DataError("no training images to decide the freeze depth from; check the image folder")
    if not reset_head:
        _check_kept_head(model, head, num_classes)
    else:
        replace_head(model, head, num_classes, kind=config.head, hidden=config.mlp_hidden,
                     dropout=config.mlp_dropout, activation=config.mlp_activation)
    decision = decide_freeze(config, sum(counts), len(counts), min(counts), len(stages))
    apply_freeze(model, stages, head, decision.trainable_stages)
    # The head's BatchNorm (MLP) is new: it has no pretrained statistics to keep, so it always trains.
    set_bn_eval(model, config.bn, exclude=(head,))
    return decision


def _check_names(stages: Any, head: Any) -> None:
    """``stages`` is a list of lists of module names and ``head`` a module name: anything else (None, a flat
    list of names, module objects) is a ConfigError that says so, not a TypeError or a confusing lookup."""
    if not isinstance(head, str):
        raise ConfigError(f"head must be the classifier's module name (a str such as 'fc' or 'head.fc'), "
                          f"not a {type(head).__name__}; model.named_modules() lists the names")
    ok = isinstance(stages, (list, tuple)) and all(
        isinstance(st, (list, tuple)) and all(isinstance(n, str) for n in st) for st in stages)
    if not ok:
        raise ConfigError("stages must be a list of stages, each a list of module names (str), input to output, "
                          "e.g. [['conv1', 'bn1'], ['layer1'], ['layer2']]; model.named_modules() lists the names")


def _check_kept_head(model: nn.Module, head: str, num_classes: int) -> None:
    """``reset_head=False`` keeps the head: it must already give one output per class."""
    try:
        out = getattr(model.get_submodule(head), "out_features", None)
    except AttributeError:
        raise ConfigError(f"the model has no module named {head!r}; pass the classifier's module name") from None
    if isinstance(out, int) and out != int(num_classes):
        raise ConfigError(f"reset_head=False keeps the head {head!r}, which has {out} outputs, but the data has "
                          f"{num_classes} classes; pass reset_head=True to give it a new head for these classes")


class _Found(Exception):
    """Stops the meta forward at the first BatchNorm layer given one value per channel."""


def lone_value_batchnorm(model: nn.Module, input_size: Sequence[int], batch: int,
                         skip: Sequence[str] = ()) -> str | None:
    """The first BatchNorm layer that, in the modes ``model.train()`` gives (``prepare_model``'s freeze and
    BatchNorm policy), a batch of ``batch`` images of ``input_size`` (C, H, W) would give one value per
    channel, which torch refuses mid-run ("Expected more than 1 value per channel when training"): its name,
    or None. The forward runs on the meta device (the parameters and buffers stand in as meta tensors): no
    memory, no arithmetic, the model unchanged. ``skip``: module-name prefixes not to look at. A model
    that cannot run on the meta device is None too (the training step's own refusal remains)."""
    found: list[str] = []

    def look(name: str):
        def hook(module: nn.Module, args: tuple) -> None:
            x = args[0]
            if module.training and x.dim() >= 2 and x.shape[1] and x.numel() // x.shape[1] == 1:
                found.append(name)
                raise _Found
        return hook

    handles = [m.register_forward_pre_hook(look(n)) for n, m in model.named_modules()
               if isinstance(m, _BatchNorm) and not any(belongs_to(n, p) for p in skip if p)]
    try:
        _meta_forward(model, input_size, batch, train=True)
    except _Found:
        pass
    except Exception:   # noqa: BLE001 (an op without a meta kernel, a data-dependent shape: cannot tell here)
        return None
    finally:
        for h in handles:
            h.remove()
    return found[0] if found else None


def _meta_forward(model: nn.Module, input_size: Sequence[int], batch: int, *, train: bool) -> None:
    """``model`` run on ``batch`` images of ``input_size`` (C, H, W) on the meta device, in train or eval mode (the
    parameters and buffers stand in as meta tensors): no memory, no arithmetic, the model left as it was."""
    meta = {k: torch.empty_like(v, device="meta") for k, v in [*model.named_parameters(), *model.named_buffers()]}
    was = model.training
    try:
        model.train(train)
        with torch.no_grad():
            functional_call(model, meta, (torch.empty(int(batch), *input_size, device="meta"),))
    finally:
        model.train(was)


def _refusal(model: nn.Module, channels: int, height: int, width: int | None = None) -> str | None:
    """Why the network refuses a batch of ``height`` x ``width`` px images (square when no width) on the meta
    device (the error's first line), or None."""
    try:
        _meta_forward(model, (channels, height, height if width is None else width), 2, train=False)
    except Exception as err:   # noqa: BLE001 (a shape refusal, or an op without a meta kernel: the caller tells)
        return (str(err).strip().splitlines() or [type(err).__name__])[0][:200]
    return None


_LARGE = 512    # an image size every registry network takes: a failure below it that passes here is "too small"


def check_input_size(model: nn.Module, input_size: Sequence[int]) -> None:
    """Refuse, before any image is read, an image size too small for the network (``--img-size`` below what its
    strides and pooling leave room for: AlexNet 63 px, VGG and ConvNeXt 32, Inception v3 75; docs/benchmarks.md).
    torch refused it in the first forward, with a traceback ("Output size is too small"). One meta forward
    (``_meta_forward``) at the size itself; when it fails but a square of 512 px passes, the smallest square that
    passes is searched (halving the interval) and named, with torch's reason. A network whose sizes are not
    monotonic (one that wants a multiple of 32: the size one px above the found one fails too) is told so, with a
    size that works, not that the size is too small. A network that cannot run on the meta device passes here (its
    forward's own error remains).

    Raises:
        ConfigError: the size, and the smallest the network takes (or one it takes).
    """
    channels, height, width = (int(d) for d in input_size)
    low = min(height, width)
    why = _refusal(model, channels, height, width)
    if why is None or low >= _LARGE or _refusal(model, channels, _LARGE) is not None:
        return
    high = _LARGE               # invariant: `low` is refused, `high` passes
    while high - low > 1:
        mid = (low + high) // 2
        low, high = (low, mid) if _refusal(model, channels, mid) is None else (mid, high)
    if _refusal(model, channels, high + 1) is not None:     # not every size above `high`: not "too small"
        raise ConfigError(f"this network does not take images of {height}x{width} px ({why}); it takes only some "
                          f"sizes: --img-size {high} is one (or leave it out: the model's own size)")
    raise ConfigError(f"images of {height}x{width} px are too small for this network ({why}): it takes "
                      f"{high}x{high} px; pass --img-size {high} or more (or leave it out: the model's own size)")


def check_batchnorm_batch(model: nn.Module, input_size: Sequence[int], batch: int, *, head: str,
                          processes: int = 1, synced: bool = False, micro: int = 0) -> None:
    """Refuse, before any step, a per-process ``batch`` that leaves a BatchNorm layer which trains one value
    per channel (``lone_value_batchnorm``): a batch of one image through the MLP head's BatchNorm, or with
    ``--bn train`` through a layer whose maps are 1x1 at this image size. torch refused it only when that
    layer first trained (after the head phase). Two images give every channel two values: nothing to look at.

    Args:
        model: prepared by ``prepare_model`` (its freeze and BatchNorm policy applied).
        input_size: (C, H, W) of the training images.
        batch: the fewest images a training BatchNorm layer gets in one step (``policy.batchnorm_batch``: the
            images per process, or the global batch for a head alone on cached features);
            ``processes``: how many share the global batch.
        head: the classifier's module name; ``synced``: the other layers are SyncBatchNorm (``--sync-bn``
            under torchrun), whose statistics come from the whole global batch. ``micro``: ``--micro-batch``
            (1 or 2: a pass of 1 image, what to change then).
    Raises:
        BatchNormBatchError: saying which layer, and what to change (its ``way``: the option that stops it training).
    """
    if int(batch) > 1:
        return
    # synchronised: every BatchNorm layer outside the classifier (``surgery.sync_batchnorm``'s exclude)
    synced_layers = [n for n, m in model.named_modules()
                     if isinstance(m, _BatchNorm) and n and not belongs_to(n, head)] if synced else []
    name = lone_value_batchnorm(model, input_size, batch, skip=synced_layers)
    if name is None:
        return
    per = f"--batch-size {2 * processes} or more (2 per process)" if processes > 1 else "--batch-size 2 or more"
    per = "--micro-batch 3 or more (or 0: each batch in one pass)" if 0 < int(micro) <= 2 else per
    size = "x".join(str(int(d)) for d in input_size[1:])
    if belongs_to(name, head):
        why, way, other = f"the MLP head's {name} gets one value per channel", "--head linear", ""
    else:   # the network's own layers train under --bn train (the default with --no-pretrained)
        why, way, other = (f"{name} gets one value per channel at {size} px under --bn train", "--bn eval",
                           " to keep the pretrained statistics")
    raise BatchNormBatchError(f"a BatchNorm layer cannot train on a batch of 1 image ({why}): start again with "
                              f"{per}, or {way}{other}", way)
