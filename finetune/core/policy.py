"""Freeze depth from the dataset size (pure logic, no torch): the lecture's transfer-learning table.

small data  -> train the new head only (the pretrained features are better than what few images teach)
medium data -> also finetune the last few stages
large data  -> finetune everything
The decision carries a one-sentence reason that the CLI prints, so the user knows how to override it.
The BatchNorm statistics default follows where the weights come from (:func:`default_bn`); the number of
epochs and the learning rate, what trains (:func:`default_epochs`, :func:`default_lr`); how the finetune phase
leaves a solved head (:func:`default_departure`).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from finetune.core.errors import ConfigError, FreezeTooDeepError

__all__ = ["FreezeDecision", "decide_freeze", "parse_freeze", "default_bn", "default_epochs", "lr_unused",
           "default_lr", "finetunes_solved_head", "AUTO_LR_OTHER", "AUTO_LR_FINETUNE", "AUTO_LR_BY_OPTIMIZER",
           "AUTO_EPOCHS_HEAD", "AUTO_EPOCHS_FINETUNE", "HEAD_WARMUP_CAP", "head_first", "default_departure",
           "AUTO_WARMUP_EPOCHS", "head_solved", "plan_phases", "mixes_images", "head_competes",
           "head_on_cached_features", "batchnorm_batch"]

# ``--epochs 0`` (auto). A run that finetunes layers gets a short cosine schedule that ends: on medium digits
# (100 per class) 8 epochs (the solved head + 7) tested as well as 30 with early stopping and as 10, in
# half the time of 30 (docs/peers.md, "Medium data, session 9"); fastai's fine_tune runs 1 + 5. A head
# alone trains on cached features (one L-BFGS solve by default; a gradient or MLP head needs its epochs,
# which cost little).
AUTO_EPOCHS_HEAD = 30
AUTO_EPOCHS_FINETUNE = 8
HEAD_WARMUP_CAP = 10          # head_epochs=-1: the head trains until its val loss stops improving, at most this
# ``--lr 0`` (auto). The default recipe where layers train (a linear head solved by L-BFGS first, BatchNorm
# statistics frozen) finetunes at AUTO_LR_FINETUNE, the pretrained layers at that x --backbone-lr-mult (1e-3): on
# medium digits and MNIST it tested better than 1e-3 on every split (docs/peers.md, "The default learning rate
# follows what trains"). Every other run keeps Adam's usual AUTO_LR_OTHER: an MLP head warmed up by gradient at 1e-2
# fell from 98.6% to 94.1% on digits (its BatchNorm's statistics wrecked: val acc 10% in the finetune phase); a
# head alone trained by gradient, --head-epochs 0 (a random head) and --bn train were not measured higher. Momentum
# SGD (--optimizer sgd) takes the same value: 1e-2 tested above 1e-3 and 3e-2 on MNIST (0.965 / 0.929 / 0.942) and
# above 1e-3 on digits (0.983 / 0.961; 3e-2 read 0.991 there), so no other value is better on both (docs/peers.md,
# "`--lr auto` keeps the default where the test cannot judge it").
AUTO_LR_FINETUNE = 1e-2
AUTO_LR_OTHER = 1e-3          # every other run (--head mlp, a head alone by gradient, --bn train, ...)
# The optimizers whose LR means something else get their own pair (finetune from a solved head, every other run),
# measured on medium digits and MNIST, 2 splits each (docs/peers.md, "Each optimizer's default learning rate"); AdamW
# keeps Adam's (MNIST at 1e-2: 98.0%, Adam 97.6%). RMSprop (with --momentum 0.9 its steps are about 10x Adam's at one
# LR) diverged at 1e-2 in the warm-up epoch on both (the head kept: 95.9% / 91.4%) and matched Adam at 1e-3 (99.1% /
# 97.6%); with an MLP head warmed up by gradient, 1e-3 wrecked the finetune phase (94.5% on digits) where 1e-4 reached
# 98.8%. Adagrad's steps shrink as it goes: 1e-2 (PyTorch's) beat 3e-3 on MNIST (95.3% / 94.1%; 1e-1 diverged on
# digits) and 1e-3 with an MLP head (99.2% / 96.4%). Adadelta sizes its own steps and takes the LR as a multiplier,
# 1.0 in PyTorch and its paper: at 1e-2 the weights barely moved (digits 96.0%, the solved head's 95.9%), at 1.0 they
# reached 98.9% / 96.2%, and with an MLP head 1.0 beat 0.1 (99.1% / 97.3%).
AUTO_LR_BY_OPTIMIZER = {"rmsprop": (1e-3, 1e-4), "adagrad": (1e-2, 1e-2), "adadelta": (1.0, 1.0)}

# ``--warmup-epochs -1`` and ``--ema -1`` (auto) when the finetune phase starts from a solved head: the LR
# rises over the first epoch and the weights are averaged over about one epoch (decay 1 - 1/steps per
# epoch). Adam's first steps at the full backbone LR throw a solved head far off (medium digits: val loss
# 0.146 -> 1.23 after 2 steps), and at that LR the weights wander (0.2-0.6) for the rest of the epoch.
# The warm-up removes the first, the average the second; neither alone does (docs/peers.md, "Medium
# data, session 11").
AUTO_WARMUP_EPOCHS = 1.0


@dataclass(frozen=True)
class FreezeDecision:
    """How many of the last stages train besides the head, and why.

    Attributes:
        trainable_stages: k in apply_freeze (0 = head only, n_stages = everything).
        label: short description of what trains, in --freeze's words: "head", "head + last 2 stages" or
            "none" (nothing frozen: "all" read as "freeze: all", and a model card said "freeze: all (none)").
        reason: one sentence for the printout, e.g.
            "156 images, 4 classes, 39 per class: small (small below 50 a class or 500 images, large from 1000 a
            class) -> training the head only; pass --freeze to override".
    """

    trainable_stages: int
    label: str
    reason: str

    def to_dict(self) -> dict[str, Any]:
        return {"trainable_stages": self.trainable_stages, "label": self.label, "reason": self.reason}


def _describe(k: int, n_stages: int) -> tuple[str, str]:
    """``(label, what)`` of training ``k`` of ``n_stages`` stages: ("head + last 2 stages", "training the
    head and the last 2 stages"); every stage is "none", as --freeze says it."""
    if k >= n_stages and n_stages > 0:
        return "none", "training every layer"
    if k == 0:
        return "head", "training the head only"
    stages = f"last {k} stage{'s' if k != 1 else ''}"
    return f"head + {stages}", f"training the head and the {stages}"


def parse_freeze(freeze: str | int, n_stages: int) -> int | None:
    """``"head"`` -> 0, ``"none"`` -> n_stages, ``"<k>"`` -> k, ``"auto"`` -> None.

    Raises:
        ConfigError: not one of those, or k larger than the number of stages (the message says the maximum).
    """
    value = str(freeze).strip().lower()
    if value == "auto":
        return None
    if value == "head":
        return 0
    if value == "none":
        return n_stages
    if value.isdigit():
        k = int(value)
        if k > n_stages:
            raise FreezeTooDeepError(k, n_stages)
        return k
    raise ConfigError(f"invalid freeze={freeze!r}: use auto, head, none or a number of stages (0-{n_stages})")


def decide_freeze(config: Any, n_images: int, n_classes: int, per_class_min: int, n_stages: int) -> FreezeDecision:
    """Choose how many stages to finetune.

    ``config.freeze == "auto"`` decides from the dataset size, using the smallest class (a model is only
    as well-trained as its rarest class):
    small  (per_class_min < config.small_per_class or n_images < config.small_total) -> head only;
    large  (per_class_min >= config.large_per_class) -> everything;
    medium (otherwise) -> the head and the last ``config.medium_stages`` stages.
    "head", "none" and "<k>" are used as requested.

    Args:
        config: a FinetuneConfig (freeze, small_per_class, small_total, large_per_class, medium_stages).
        n_images: training images.
        n_classes: number of classes.
        per_class_min: training images in the smallest class.
        n_stages: stages of the model (classifier excluded).

    Returns:
        The FreezeDecision with its reason.

    Raises:
        ConfigError: an invalid freeze value or k larger than n_stages.
    """
    k = parse_freeze(config.freeze, n_stages)
    if k is not None:
        label, what = _describe(k, n_stages)
        return FreezeDecision(k, label, f"--freeze {str(config.freeze).strip().lower()} requested: {what}")
    if n_classes > 0 and per_class_min * n_classes == n_images:
        per_class = f"{per_class_min} per class"
    else:
        per_class = f"at least {per_class_min} per class"
    sizes = f"{n_images} images, {n_classes} classes, {per_class}"
    if per_class_min < config.small_per_class or n_images < config.small_total:
        size, k = "small", 0
    elif per_class_min >= config.large_per_class:
        size, k = "large", n_stages
    else:
        size, k = "medium", max(0, min(int(config.medium_stages), n_stages))
    label, what = _describe(k, n_stages)
    # the bands, from the options that define them (a bare "medium" left the user to guess them: helper-149)
    bands = (f"small below {config.small_per_class} a class or {config.small_total} images, "
             f"large from {config.large_per_class} a class")
    return FreezeDecision(k, label, f"{sizes}: {size} ({bands}) -> {what}; pass --freeze to override")


def default_bn(pretrained: bool) -> str:
    """The BatchNorm statistics policy when the user did not choose one.

    ``"eval"`` for pretrained weights: keep the statistics they were trained with. ``"train"`` for a random
    init: its running statistics are the initial mean 0 / variance 1, which frozen make every BatchNorm
    an identity (random-init VGG16 and VGG16-BN trained alike, Inception v3's loss reached 1e10).
    """
    return "eval" if pretrained else "train"


def default_epochs(config: Any, trainable_stages: int) -> int:
    """``config.epochs``, or for 0 (auto) the policy's: ``AUTO_EPOCHS_HEAD`` when only the head trains
    (``trainable_stages`` 0), ``AUTO_EPOCHS_FINETUNE`` when layers are finetuned after a head solved in one epoch
    (or with no head phase). A head warm-up that trains by gradient (``--head mlp``, ``--head-solver gradient``,
    ``--no-fast-head``) gets its own epochs on top (``--head-epochs``, or at most ``HEAD_WARMUP_CAP``), so that the
    finetune phase keeps its ``AUTO_EPOCHS_FINETUNE - 1`` (at least): within 8 such a warm-up took 7 epochs on medium
    digits and left one, all LR warm-up, to finetune (test accuracy 95.7% against 98.2% with 7; docs/peers.md)."""
    if int(config.epochs) > 0:
        return int(config.epochs)
    if trainable_stages == 0:
        return AUTO_EPOCHS_HEAD
    warm_up = HEAD_WARMUP_CAP if int(config.head_epochs) < 0 else int(config.head_epochs)
    solved = head_solved(config, trainable_stages)
    return AUTO_EPOCHS_FINETUNE if (warm_up == 0 or solved) else AUTO_EPOCHS_FINETUNE - 1 + warm_up


def default_lr(config: Any, trainable_stages: int) -> float:
    """``config.lr``, or for 0 (auto) the policy's: ``AUTO_LR_FINETUNE`` when layers are finetuned from a head solved
    first (:func:`head_first`, :func:`head_solved`) with the BatchNorm statistics frozen (``bn`` eval), else
    ``AUTO_LR_OTHER``; an optimizer in ``AUTO_LR_BY_OPTIMIZER`` takes its own pair. ``config.epochs`` must be
    resolved (not 0: :func:`default_epochs`)."""
    if float(config.lr) > 0:
        return float(config.lr)
    finetune, other = AUTO_LR_BY_OPTIMIZER.get(str(config.optimizer), (AUTO_LR_FINETUNE, AUTO_LR_OTHER))
    return finetune if finetunes_solved_head(config, trainable_stages) else other


def finetunes_solved_head(config: Any, trainable_stages: int) -> bool:
    """Whether layers are finetuned from a linear head solved first by L-BFGS (:func:`head_first`,
    :func:`head_solved`) with the BatchNorm statistics frozen (``bn`` eval): the recipe ``AUTO_LR_FINETUNE`` was
    measured on, whose LR ``--lr auto`` keeps (the range test's policy rule)."""
    k = trainable_stages
    return head_first(config, k) and head_solved(config, k) and config.bn == "eval"


def head_first(config: Any, trainable_stages: int) -> bool:
    """Whether a head phase precedes the finetune phase: layers train (``trainable_stages`` > 0), the head
    phase is not turned off (``--head-epochs 0``) and the run has room for both (2+ epochs)."""
    return trainable_stages > 0 and int(config.head_epochs) != 0 and int(config.epochs) >= 2


def plan_phases(trainable_stages: int, config: Any) -> tuple[list[str], int]:
    """The phases a run trains (``["head"]``, ``["finetune"]`` or ``["head", "finetune"]``) and the head warm-up's
    cap in epochs when a head phase precedes finetuning. ``config.epochs`` caps the whole run; a warm-up leaves at
    least one epoch for finetuning."""
    if trainable_stages == 0:
        return ["head"], int(config.epochs)
    if not head_first(config, trainable_stages):
        return ["finetune"], 0
    cap = HEAD_WARMUP_CAP if int(config.head_epochs) < 0 else int(config.head_epochs)
    return ["head", "finetune"], min(cap, int(config.epochs) - 1)


def mixes_images(config: Any) -> bool:
    """Whether training batches are mixed (``--mixup`` / ``--cutmix`` above 0)."""
    return float(getattr(config, "mixup", 0) or 0) > 0 or float(getattr(config, "cutmix", 0) or 0) > 0


def head_competes(config: Any) -> bool:
    """Whether the head phase's epochs compete with the finetune phase's for the run's best epoch (early stopping's
    best and patience). Not where finetuning mixes images with the monitor on the validation loss: trained toward
    mixed labels, the network is less confident on the plain validation images than the head was, and so its loss
    is higher at a higher accuracy (CutMix on digits: val loss 0.160 at 99.3% against the solved head's 0.146 at
    95.3%, and the head was exported). There the finetune phase picks its best epoch among its own and the head
    guard (``engine.guard``) decides between the two on the same images."""
    return not (mixes_images(config) and config.monitor == "val_loss")


def head_on_cached_features(config: Any, trainable_stages: int) -> bool:
    """Whether a head phase trains on cached backbone features (``fast_head``). A head-only run
    (``trainable_stages`` 0) with mixup or CutMix trains through the network: those mix images, which cached
    features no longer are (as in timm and fastai, whatever is frozen). A warm-up head phase before
    unfreezing stays on the features; mixing starts with finetuning."""
    return bool(config.fast_head) and not (trainable_stages == 0 and mixes_images(config))


def batchnorm_batch(config: Any, trainable_stages: int, per_process: int) -> int:
    """The fewest images a training BatchNorm layer is given in one step of the run: the batch to check
    against a layer that one image would leave one value per channel (``recipe.check_batchnorm_batch``).

    A network layer trains in every run where ``trainable_stages`` > 0 (a finetune phase always follows the
    head's), and the head trains through the network without ``fast_head``: each process then passes its own
    ``per_process`` batch (in passes of at most ``--micro-batch``). A head alone on cached features is trained by
    every process on the whole global batch (``config.batch_size``: the features are gathered to every rank,
    ``data.train_batches(..., processes=...)``), so its MLP head's BatchNorm sees that.
    """
    if trainable_stages == 0 and head_on_cached_features(config, trainable_stages):
        return int(config.batch_size)
    micro = int(getattr(config, "micro_batch", 0))      # a step in passes: each pass normalises its own images
    if not micro or int(per_process) <= micro:
        return int(per_process)
    # even passes (``engine.passes.pass_bounds``) of at most 2 leave an odd batch (the last one, one that lost an
    # image to decoding) a pass of 1; from 3 up no pass is smaller than 2
    return 1 if micro <= 2 else micro


def head_solved(config: Any, trainable_stages: int) -> bool:
    """Whether the head phase is solved by L-BFGS: on cached features (``fast_head``, no mixup/CutMix for a head
    alone, which train through the network), ``head_solver`` lbfgs, which solves a linear head only (``--head
    mlp`` trains by gradient at the LR whatever the solver, ``CachedHeadSteps.solves``)."""
    return (head_on_cached_features(config, trainable_stages) and config.head_solver == "lbfgs"
            and config.head == "linear")


def lr_unused(config: Any, trainable_stages: int) -> bool:
    """Whether no learning rate trains anything in such a run: only the head trains (``trainable_stages``
    0), and it is solved (:func:`head_solved`)."""
    return trainable_stages == 0 and head_solved(config, trainable_stages)


def default_departure(config: Any, trainable_stages: int, steps_per_epoch: int) -> tuple[float, float]:
    """``(warmup_epochs, ema)`` with their -1 (auto) resolved: after a head phase (:func:`head_first`)
    ``AUTO_WARMUP_EPOCHS`` and an average over about one epoch, ``1 - 1/steps_per_epoch`` (off below 2
    steps per epoch: there is nothing to average); otherwise no warm-up and no average. Values the user
    gave are returned as they are. ``config.epochs`` must be resolved (not 0)."""
    after_head = head_first(config, trainable_stages)
    warmup = float(config.warmup_epochs)
    if warmup < 0:
        warmup = AUTO_WARMUP_EPOCHS if after_head else 0.0
    ema = float(config.ema)
    if ema < 0:
        ema = 1.0 - 1.0 / int(steps_per_epoch) if (after_head and int(steps_per_epoch) >= 2) else 0.0
    return warmup, ema
