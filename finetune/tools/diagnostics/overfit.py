"""The lecture's first sanity check: overfit a tiny subset. If the pipeline cannot memorise a few
fixed batches, something is broken (labels, LR, frozen layers), whatever the data."""
from __future__ import annotations

import contextlib
import math
import random
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch
from torch import nn

from finetune.core.config import FinetuneConfig
from finetune.data import ImageDataset, ImageSet, build_transform, make_loader
from finetune.engine import build_setup, caller_state_kept, to_device, train_one_epoch
from finetune.core.errors import ConfigError, FinetuneError
from finetune.core.metrics import accuracy_text

__all__ = ["OverfitResult", "overfit_check", "disable_dropout", "fixed_batch_count"]


@dataclass
class OverfitResult:
    """Whether the pipeline can memorise a few fixed batches (the lecture's first sanity check).

    Attributes:
        passed: the fixed batches are overfit at the end: the last pass's loss is at most ``target_loss``, or
            its accuracy reached ``target_acc`` (every image right, by default) while the loss fell from the
            first pass. Either shows that labels, gradients and the trainable layers work, which is all the
            check is for; a loss still above ``target_loss`` at 100% accuracy only says that ``max_steps``
            ended before the logits grew confident. (The fall rules out a model that learns nothing and gets
            a batch of one or two images right by chance.)
        final_loss, final_acc: over the fixed batches, in the last pass (measured while training).
        steps: optimizer steps taken.
        verdict: one line saying what the result means and what to check.
        losses: mean loss of each pass over the batches.
    """

    passed: bool
    final_loss: float
    final_acc: float
    steps: int
    verdict: str
    losses: list[float] = field(default_factory=list)
    decision: Any = None


def disable_dropout(model) -> int:
    """Set every dropout / drop-path probability to 0 (BatchNorm untouched). Returns how many changed."""
    changed = 0
    for m in model.modules():
        if isinstance(m, nn.modules.dropout._DropoutNd) and m.p:
            m.p, changed = 0.0, changed + 1
        for attr in ("drop_prob", "drop_rate"):  # timm: DropPath.drop_prob, model.drop_rate (head dropout)
            if isinstance(getattr(m, attr, None), float) and getattr(m, attr):
                setattr(m, attr, 0.0)
                changed += 1
    return changed


def overfit_check(model, stages: Sequence[Sequence[str]], data_config: dict, train_set: ImageSet,
                  config: FinetuneConfig, *, head: str, batches: int = 2, max_steps: int = 300,
                  target_acc: float = 1.0, target_loss: float = 0.05, freeze_all: bool = False,
                  shuffle_labels: bool = False, reset_head: bool = True,
                  log: Callable[[str], None] | None = None) -> OverfitResult:
    """Train on ``batches`` fixed batches until they are memorised, or ``max_steps`` optimizer steps.

    Augmentation, weight decay and dropout are off (the model stays in train mode with every dropout
    p=0; BatchNorm follows the recipe's ``config.bn``); the freeze decision, head and optimizer are
    those of ``fit``, on a deep copy of ``model`` (the caller's model is not changed).

    Args:
        batches: N, the number of fixed batches of ``config.batch_size`` images (drawn with config.seed);
            fewer when the training set holds fewer (20 images at batch size 32 make one batch).
        max_steps: give up after this many optimizer steps.
        target_acc, target_loss: the pass criterion, over one full pass of the batches (see
            ``OverfitResult.passed``); training goes on until both are met, or ``max_steps``.
        freeze_all: freeze every layer *and the head* (nothing trains): a control that must fail, and a
            way to see the loss of the untrained model.
        shuffle_labels: draw random labels at every step: a control that must fail (nothing to learn).
        log: called with a progress line after some passes.
    Returns:
        OverfitResult; ``verdict`` is "pipeline can learn: N batches overfit to 100% in S steps" (with
        "accuracy" and the loss in brackets when it is still above ``target_loss``) or "cannot even overfit N
        batches (acc A, loss L): check labels, LR, frozen layers", N the batches that exist.
    """
    if int(batches) < 1 or int(max_steps) < 1:
        raise ConfigError(f"overfit check: batches={batches}, max_steps={max_steps}: both must be at least 1")
    # Regularisation off: the point is to see that the pipeline *can* fit, nothing must fight it.
    cfg = config.replace(augment="none", weight_decay=0.0, mlp_dropout=0.0, label_smoothing=0.0, mixup=0.0,
                         cutmix=0.0)
    with caller_state_kept(), \
            contextlib.closing(build_setup(model, stages, data_config, train_set, None, cfg, head=head,
                                           reset_head=reset_head, copy_model=True, distributed=False)) as setup:
        work, decision, device = setup.model, setup.decision, setup.device
        if log is not None and "lr" in setup.chosen:     # the lr the run would choose (config.lr 0: auto)
            log(setup.chosen["lr"])
        disable_dropout(work)
        if freeze_all:
            for p in work.parameters():
                p.requires_grad_(False)
        trainable = any(p.requires_grad for p in work.parameters())
        optimizer = setup.optimizer() if trainable else None
        scaler = setup.amp.make_scaler()

        fixed = _fixed_batches(setup, train_set, int(batches))
        n_batches = len(fixed)     # what the data gives: N asked of a set smaller than N batches gives fewer
        labels = _random_labels(len(train_set.classes), cfg.seed, device) if shuffle_labels else None

        steps, passes, losses = 0, 0, []
        acc = loss_mean = math.nan
        while steps < max_steps or passes == 0:
            # one pass = one epoch of the batch kernel over the fixed batches; a NaN/inf loss ends the check
            source = fixed if labels is None else ((x, labels(y)) for x, y in fixed)
            out = train_one_epoch(work, source, optimizer, None, setup.loss_fn, device, amp=setup.amp,
                                  scaler=scaler, raise_diverged=False, micro=int(cfg.micro_batch))
            steps += n_batches if optimizer is not None else 0
            passes += 1
            acc, loss_mean = out["acc"], out["loss"]
            losses.append(loss_mean)
            if log is not None and (passes <= 3 or passes % 10 == 0):   # a readable trace, not one line a pass
                log(f"overfit pass {passes}: {steps} steps, loss {loss_mean:.4f}, acc {accuracy_text(acc)}")
            if not math.isfinite(loss_mean):
                break
            if acc >= target_acc and loss_mean <= target_loss:
                break
            if optimizer is None:  # nothing can change: one pass tells everything
                break
        del setup, work, optimizer

    passed, verdict = _verdict(losses, acc, steps, n_batches, target_acc, target_loss, trainable)
    return OverfitResult(passed, loss_mean, acc, steps, verdict, losses, decision)


def _verdict(losses: list[float], acc: float, steps: int, n_batches: int, target_acc: float, target_loss: float,
             trainable: bool) -> tuple[bool, str]:
    """(passed, the verdict line) of a check whose passes gave ``losses``, the last one accuracy ``acc``.

    Every image right while the loss fell is a fit, even with the loss above ``target_loss`` when max_steps
    ends (QA: "acc 100%, loss 0.381: check labels" sent a user to look for a bug that was not there)."""
    loss_mean = losses[-1] if losses else math.nan
    fell = math.isfinite(loss_mean) and len(losses) > 1 and loss_mean < losses[0]
    passed = loss_mean <= target_loss or (acc >= target_acc and fell)
    what = _batches(n_batches)
    if passed and acc >= target_acc and loss_mean <= target_loss:
        return passed, f"pipeline can learn: {what} overfit to {accuracy_text(acc)} in {steps} steps"
    if passed and acc >= target_acc:
        return passed, (f"pipeline can learn: {what} overfit to {accuracy_text(acc)} accuracy in {steps} steps (loss "
                        f"{losses[0]:.3g} -> {loss_mean:.3g}, still above {target_loss:g}: more steps or a higher LR "
                        "take it lower)")
    if passed:
        return passed, (f"pipeline can learn: {what} overfit to loss {loss_mean:.3g} in {steps} steps "
                        f"(acc {accuracy_text(acc)})")
    verdict = (f"cannot even overfit {what} (acc {accuracy_text(acc)}, loss {loss_mean:.3g}): check labels, LR, "
               "frozen layers")
    return passed, verdict + ("" if trainable else " (nothing is trainable: every layer and the head are frozen)")


def fixed_batch_count(n_images: int, batch_size: int, batches: int) -> int:
    """How many fixed batches :func:`overfit_check` trains on: ``batches`` asked, fewer when ``n_images`` do not
    fill them (20 images at batch size 32 make one batch, whatever is asked)."""
    return min(int(batches), math.ceil(int(n_images) / max(1, int(batch_size))))


def _batches(n: int) -> str:
    return f"{n} batch{'es' if n != 1 else ''}"


def _fixed_batches(setup, train_set: ImageSet, n: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """N batches of ``config.batch_size`` training images (drawn with ``config.seed``), on the device: the same
    images, unaugmented, every pass."""
    cfg, device = setup.config, setup.device
    items = list(train_set.items)
    random.Random(cfg.seed).shuffle(items)
    subset = type(train_set)(items=items[: n * cfg.batch_size], classes=train_set.classes)
    # the evaluation view as the workers path makes it, also under --decode device (whose datasets hand over
    # encoded files for a DevicePrefetcher): the batches are made once here and kept
    output, normalize = setup.features_io
    dataset = ImageDataset(subset, build_transform(setup.data_config, False, cfg, output=output))
    loader = make_loader(dataset, cfg.batch_size, train=False, workers=0, device=device.type)
    fixed = [to_device(x, y, device, setup.channels_last, normalize) for x, y in filter(None, loader)]
    if not fixed:
        raise FinetuneError("overfit check: no readable training image; check the image folder")
    return fixed


def _random_labels(n_classes: int, seed: int, device: torch.device) -> Callable[[torch.Tensor], torch.Tensor]:
    """For ``shuffle_labels``: new random labels, shaped as the given ones, at every step (seeded)."""
    gen = torch.Generator(device="cpu").manual_seed(seed)
    return lambda y: torch.randint(0, n_classes, y.shape, generator=gen).to(device)
