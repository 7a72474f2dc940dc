"""The shared set-up of the lecture's recipe: fit, the LR finder, the overfit check and the sweep all
call :func:`prepare_model`, so the model they train is prepared identically everywhere."""
from __future__ import annotations

from typing import Any, Sequence

from torch import nn

from finetune.core.errors import ConfigError, DataError
from finetune.core.policy import FreezeDecision, decide_freeze
from finetune.core.surgery import apply_freeze, bn_frozen_layers, replace_head, set_bn_eval

__all__ = ["prepare_model", "trainable_summary"]


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


def trainable_summary(model: nn.Module) -> dict[str, int]:
    """Parameter counts for the printout.

    Returns:
        ``{"trainable", "frozen", "total"}`` (scalars), ``{"trainable_tensors", "frozen_tensors"}`` and
        ``"bn_frozen_layers"`` (BatchNorm layers keeping their pretrained statistics).
    """
    trainable = frozen = t_tensors = f_tensors = 0
    for p in model.parameters():
        if p.requires_grad:
            trainable += p.numel()
            t_tensors += 1
        else:
            frozen += p.numel()
            f_tensors += 1
    return {"trainable": trainable, "frozen": frozen, "total": trainable + frozen,
            "trainable_tensors": t_tensors, "frozen_tensors": f_tensors,
            "bn_frozen_layers": bn_frozen_layers(model)}
