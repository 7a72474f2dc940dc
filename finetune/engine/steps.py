"""The batch kernel: one training epoch over any source of ``(x, y)`` batches, and an evaluation pass.
Every path trains through these two (``fit``'s loop, the cached-feature head, the LR range test, the
overfit check); plain functions with explicit arguments, as in torchvision's reference training script.
"""
from __future__ import annotations

import math
import time
from typing import Callable, Iterable, Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from finetune.core import distributed as ddp
from finetune.core.devices import copies_async, sum_dtype
from finetune.engine.drops import SharedDropout
from finetune.engine.mixing import BatchMix
from finetune.data.loaders import Share
from finetune.engine.passes import (FULL, Pads, as_before, diverged, loss_parts, pass_bounds, stand_in_step, stepped,
                                    take_step, train_forward)
from finetune.engine.runtime import AmpPolicy, to_device
from finetune.core.metrics import accuracy_text, per_class_accuracy
from finetune.core.progress import LogLines

__all__ = ["train_one_epoch", "evaluate", "warm_up"]

# Training steps between two looks at the loss from the host: each look waits for the GPU to finish the
# step, which then idles while the next step's kernels are queued. A non-finite loss is remembered on the
# device (its first step) and reported at the next look, or at the end of the epoch.
CHECK_EVERY = 16
# Seconds between two refreshes of a visible progress bar's running loss/accuracy: each refresh is a host
# look (as above), so it is not done every step; tqdm itself redraws at most 10 times a second.
POSTFIX_EVERY_S = 1.0


def train_one_epoch(model: nn.Module, batches: Iterable, optimizer: torch.optim.Optimizer | None, scheduler,
                    loss_fn: nn.Module, device: torch.device, *, amp: AmpPolicy | None = None, scaler=None,
                    progress=None, epoch: int = 0, channels_last: bool = False, only_train: nn.Module | None = None,
                    info: ddp.DistInfo | None = None, normalize: Callable | None = None, mix: BatchMix | None = None,
                    ema=None, after_step: Callable[[int, torch.Tensor], bool | None] | None = None,
                    raise_diverged: bool = True, blank: Callable[[], tuple] | None = None,
                    share: Share | None = None, drops: SharedDropout | None = None, micro: int = 0) -> dict:
    """One pass over ``batches``, the one training loop of every path: ``fit``'s epochs (a DataLoader), the
    cached-feature head (features), the LR range test (an ``after_step`` hook), the overfit check (fixed
    batches). The scheduler (and the weight average ``ema``) is stepped after every optimizer step.

    Args:
        batches: ``(x, y)`` batches (None: a batch whose every image failed to decode, skipped); a third
            item, the images' sample keys, seeds each image's device augmentation (``normalize``).
        optimizer: None = nothing trains: forward passes in training mode only (a frozen control).
        amp, scaler: the mixed-precision policy (``runtime.amp_policy``; None = full precision), its GradScaler.
        progress: a tqdm bar to advance (optional). epoch: for the divergence message.
        only_train: when given, the model stays in eval mode and only this module trains (the head
            phase: frozen backbone without dropout/drop-path, as the cached-feature path computes it).
        info: the DDP position; metrics are summed over ranks.
        normalize: for a loader of uint8 batches (``build_transform(..., output="uint8")``), a
            ``finetune.data.DeviceNormalize`` that converts them on ``device``; None for float batches.
        mix: mixup/CutMix (``engine.mixing.BatchMix``, reseeded per epoch by the caller): each batch is
            mixed on the device, the loss takes its soft targets, accuracy counts the dominant label.
        ema: a ``finetune.core.ema.ModelEma`` of ``model`` (``--ema``), updated after each step; None = off.
        after_step: called with ``(step, loss)`` (detached) after each step (the LR range test sets the
            next LR); a true return ends the epoch there.
        raise_diverged: False: a NaN/inf loss raises nothing, the caller reads it in the losses and metrics.
        blank: under DDP, ``() -> (x, y)`` on ``device``: the stand-in for a batch whose every image failed
            (:func:`passes.stand_in_step`); needed where ``batches`` can yield None on several processes.
        share: this rank's part of the epoch (``data.loaders.Share``): its padding copies add nothing (:func:`_pads`).
        drops: dropout masks drawn for the global batch (``engine.drops.SharedDropout``); None: torch's own.
        micro: the most images one forward pass takes (``--micro-batch``): a bigger batch is stepped in several
            passes whose gradients add up (``passes.take_step``); 0: one pass.
    Returns:
        ``{"loss", "acc", "images", "seconds", "images_per_s", "data_wait"}`` over all ranks (:func:`_waiting`;
        with ``mix``: the loss on the mixed targets, the accuracy against each mixed image's dominant label).
    Raises:
        DivergedError: the loss became NaN/inf (on any rank); nothing of this epoch is saved.
    """
    info = info or ddp.DistInfo()
    model.train(only_train is None)
    if only_train is not None:
        only_train.train()
    loss_sum = torch.zeros((), dtype=sum_dtype(device), device=device)     # float64, but on MPS (core.devices)
    correct = torch.zeros((), dtype=torch.int64, device=device)
    bad_step = torch.zeros((), dtype=torch.int64, device=device)     # first step with a non-finite loss
    seen = 0
    waited = [0.0]                   # seconds the loop waited for its batches (the loader's, not the device's)
    t0 = time.perf_counter()
    shown = -math.inf               # when the bar's running figures were last refreshed
    lrs: dict[int, float] = {}       # the LR of each step since the last look, for the message
    for step, batch in enumerate(_waiting(batches, waited), 1):
        if raise_diverged and step % CHECK_EVERY == 0:
            _check(bad_step, lrs, epoch, optimizer, info)
        lrs[step] = _lr(scheduler, optimizer)
        if batch is None:        # every image of the batch failed to decode (already logged by the dataset)
            if info.enabled:     # the other ranks' step waits for this one's gradients: it takes part, weighing 0
                stand_in_step(model, blank, loss_fn, amp, optimizer, scheduler, scaler, ema, info, micro=micro)
            continue
        x, y = to_device(*batch[:2], device, channels_last, normalize, *batch[2:3])
        mixed = mix(x, y, step) if mix is not None else None     # soft targets, each image's dominant label
        x, target, y = (mixed.x, mixed.target, mixed.y) if mixed is not None else (x, y, y)
        left, pads = _pads(share, seen, step)
        loss, out = take_step(model, x, target, loss_fn, info, step=step, amp=amp, drops=drops, optimizer=optimizer,
                              scaler=scaler, micro=micro, pads=pads)
        bad_step = torch.where((bad_step == 0) & ~torch.isfinite(loss.detach()), step, bad_step)
        if optimizer is not None:
            stepped(model, scheduler, ema)
        seen += _tally(loss_sum, correct, loss, out, y, left, pads and pads.images / info.world_size)
        if progress is not None:
            now = time.perf_counter()
            look = now - shown >= POSTFIX_EVERY_S
            shown = now if look else shown
            _advance(progress, loss_sum, correct, seen, seen * info.world_size / max(now - t0, 1e-9), look)
        if after_step is not None and after_step(step, loss.detach()):
            break
    if raise_diverged:
        _check(bad_step, lrs, epoch, optimizer, info)
    return _train_totals(loss_sum, correct, seen, t0, waited[0], info)


def _pads(share: Share | None, seen: int, step: int) -> tuple[int | None, Pads | None]:
    """How many more of this rank's images count (None: all) and, in the step whose global batch holds the copies
    padding the ranks' shares (``share.padded``), its :class:`passes.Pads`."""
    left = None if share is None else share.counted - seen
    return left, (Pads(left, share.images) if share is not None and step == share.padded else None)


def _tally(loss_sum: torch.Tensor, correct: torch.Tensor, loss: torch.Tensor, out: torch.Tensor, y: torch.Tensor,
           left: int | None, images: float | None) -> int:
    """Add a training batch to the epoch's metrics (in place, on the device: no host sync); returns the images
    counted. ``left``: how many more of this rank's images count (None: all). Under torchrun the last images
    of some ranks are copies of the first ones that pad every rank's share to one length (``DistributedSampler``'s
    padding): they train, adding nothing to the loss, and the metrics count each image of the set once, as
    validation's unpadded shards do. ``loss`` is the batch's mean, weighing for its images; in the step holding
    copies, this rank's part of the global batch's mean (``passes.batch_loss``), weighing for ``images``: the
    global batch's own images over the ranks (the ranks' parts add up to its mean, class-weighted too). An image
    that failed to decode earlier on the rank moves the cut by one (a batch says which rows it lost only as a
    count)."""
    n = int(y.shape[0])
    k = n if left is None else max(0, min(n, left))
    loss_sum += loss.detach().to(loss_sum.dtype) * (n if images is None else images)
    correct += (out.detach()[:k].argmax(1) == y[:k]).sum()
    return k


def _waiting(batches: Iterable, waited: list[float]) -> Iterator:
    """``batches``, adding to ``waited[0]`` the seconds the loop spent getting them: ``iter()`` (a loader's
    workers starting, unless its pass started ahead) and each ``next()``, the last one's too. The host runs
    ahead of an accelerator, so this is the loader falling behind the steps, not the steps' own time (two clock
    reads a step, no device sync); with no worker it is the loading itself."""
    t = time.perf_counter()
    it = iter(batches)
    while True:
        try:
            batch = next(it)
        except StopIteration:
            waited[0] += time.perf_counter() - t
            return
        waited[0] += time.perf_counter() - t
        yield batch
        t = time.perf_counter()


def _check(bad_step: torch.Tensor, lrs: dict[int, float], epoch: int, optimizer, info: ddp.DistInfo) -> None:
    """Raise if any rank met a non-finite loss (one host sync, one collective); ``lrs``: each step's LR
    since the last look (cleared)."""
    first = int(ddp.all_reduce_max(bad_step.clone(), info))
    if first:
        raise diverged(epoch, first, lrs.get(first, _lr(None, optimizer)))
    lrs.clear()


def _advance(progress, loss_sum: torch.Tensor, correct: torch.Tensor, seen: int, images_per_s: float,
             look: bool) -> None:
    """One step on the bar; the running loss/accuracy/speed only on a visible bar and when ``look`` (each refresh
    is a host sync: at most every ``POSTFIX_EVERY_S``), or off a terminal when a log line is written (one a
    minute: ``LogLines.figures``)."""
    def figures() -> dict[str, str]:
        return {"loss": f"{loss_sum.item() / seen:.4f}", "acc": accuracy_text(correct.item() / seen),
                "img/s": f"{images_per_s:.0f}"}

    if isinstance(progress, LogLines):
        progress.figures = figures
    elif look and not getattr(progress, "disable", False):
        progress.set_postfix(refresh=False, **figures())
    progress.update(1)


def _lr(scheduler, optimizer) -> float:
    if scheduler is not None:
        return scheduler.current_lr()
    return optimizer.param_groups[0]["lr"] if optimizer is not None else math.nan


def _train_totals(loss_sum: torch.Tensor, correct: torch.Tensor, seen: int, t0: float, waited: float,
                  info: ddp.DistInfo) -> dict:
    """The epoch's metrics, summed over ranks; its seconds since ``t0`` (the device's queued steps done);
    ``data_wait``: the share of them the loop waited for data (``waited`` seconds, the mean over ranks)."""
    totals = torch.cat([torch.stack([loss_sum, correct.to(loss_sum.dtype)]),
                        torch.tensor([float(seen), waited], dtype=loss_sum.dtype, device=loss_sum.device)])
    ddp.all_reduce_sum(totals, info)
    loss_total, correct_total, images, wait = totals.tolist()
    seconds = time.perf_counter() - t0
    images = int(images)
    return {"loss": loss_total / images if images else math.nan,
            "acc": correct_total / images if images else math.nan,
            "images": images, "seconds": seconds, "images_per_s": images / max(seconds, 1e-9),
            "data_wait": min(1.0, wait / info.world_size / max(seconds, 1e-9))}


@torch.no_grad()
def evaluate(model: nn.Module, batches: Iterable, loss_fn: nn.Module, device: torch.device, classes: Sequence[str], *,
             amp: AmpPolicy | None = None, channels_last: bool = False,
             info: ddp.DistInfo | None = None, normalize: Callable | None = None,
             probs: list | None = None, correct: list | None = None, losses: list | None = None,
             micro: int = 0, progress=None) -> dict:
    """Loss, accuracy, per-class accuracy and the confusion matrix (rows: true class, columns: predicted)
    over ``batches`` (a validation loader, or the cached head's validation features).

    Under DDP each rank passes its own shard of the validation set; the sums are reduced over ranks. The loss
    is the mean over the whole set (weighted by class with ``--class-weights auto``: :func:`loss_parts`), the
    same however the set is split into batches or ranks.
    ``normalize``: as in :func:`train_one_epoch` (uint8 batches normalised on the device).
    ``probs``: a list that receives each batch's softmax probabilities (CPU float tensors, loader order).
    ``correct``: a list that receives each batch's per-image hits (CPU bool tensors, this rank's images).
    ``losses``: a list that receives each batch's per-image cross-entropy (CPU float64, this rank's images).
    ``micro``: the most images one forward pass takes (``--micro-batch``; 0: a batch in one pass).
    ``progress``: a bar (``core.progress.progress_bar``) advanced a batch at a time, without figures: a running
    loss or accuracy would be a host look per refresh, and the pass would wait for the device.
    """
    info = info or ddp.DistInfo()
    model.eval()
    c = len(classes)
    confusion = torch.zeros(c * c, dtype=torch.int64, device=device)
    wide = sum_dtype(device)      # float64, but on MPS (core.devices)
    loss_sum = torch.zeros((), dtype=wide, device=device)
    loss_weight = torch.zeros((), dtype=wide, device=device)     # (loss_parts: images, or class weight)
    # Nothing here makes the host wait for a batch: per-image outputs go to the host asynchronously (pinned
    # memory, read after the pass's last copy below) and the confusion counts by index_add_ (CUDA's
    # bincount looks at the labels' maximum from the host).
    kept: list[tuple[list, torch.Tensor]] = []
    for batch in batches:
        if batch is None:
            continue
        x, y = to_device(*batch[:2], device, channels_last, normalize, *batch[2:3])
        with (amp or FULL).autocast():
            bounds = pass_bounds(int(x.shape[0]), micro)
            out = model(x) if len(bounds) == 1 else torch.cat([model(x[a:b]) for a, b in bounds])
        part, weight = loss_parts(loss_fn, out.float(), y)
        loss_sum += part.to(wide)
        loss_weight += weight.to(wide)
        pred = out.argmax(1)
        confusion.index_add_(0, y * c + pred, torch.ones_like(y))
        if probs is not None:
            kept.append((probs, _to_host(out.float().softmax(1))))
        if correct is not None:
            kept.append((correct, _to_host(pred == y)))
        if losses is not None:
            kept.append((losses, _to_host(F.cross_entropy(out.float(), y, reduction="none"))))
        if progress is not None:
            progress.update(1)
    ddp.all_reduce_sum(confusion, info)
    ddp.all_reduce_sum(loss_sum, info)
    ddp.all_reduce_sum(loss_weight, info)
    conf = confusion.view(c, c).cpu()       # waits for the pass, its copies to the host included
    for into, values in kept:     # (the losses widened on the host: the device may have no float64)
        into.append(values.double() if into is losses else values)
    total = int(conf.sum())
    right = conf.diag().tolist()
    per_class = per_class_accuracy(right, conf.sum(1).tolist(), list(classes))
    return {"loss": float(loss_sum) / float(loss_weight) if total and float(loss_weight) else math.nan,
            "acc": sum(right) / total if total else math.nan,
            "per_class": per_class, "confusion": conf.tolist(), "images": total}


def _to_host(t: torch.Tensor) -> torch.Tensor:
    """A copy on the CPU that the host does not wait for from CUDA (pinned): read it only after a later blocking
    copy on the same stream. From MPS a blocking copy (``core.devices.copies_async``)."""
    return t.to("cpu", non_blocking=copies_async(t.device))


def warm_up(model: nn.Module, train_shape: tuple[int, ...] | None, eval_shape: tuple[int, ...] | None,
            loss_fn: nn.Module, device: torch.device, *, amp: AmpPolicy | None = None, channels_last: bool = False,
            only_train: nn.Module | None = None) -> None:
    """One training forward and backward of a blank batch of ``train_shape`` (as :func:`train_one_epoch`
    runs it: same modes, precision and memory format) and one evaluation forward of ``eval_shape``, so that
    the device's first-use costs (kernel loading, cuDNN's choice or autotuning of each convolution) are
    paid before the first epoch, while the loader's workers decode its first batches. Either shape may be None
    (that pass not run): ``LoaderSteps`` warms the two up one at a time, to know which ran out of memory.

    Nothing of the run changes: no optimizer step; the gradients, the buffers (BatchNorm statistics), the
    modules' modes and the random generators (dropout) are as before.

    Raises:
        ConfigError: as :func:`train_one_epoch`'s forward (a BatchNorm training on one image, a forward with
            auxiliary outputs): on CUDA the warm-up meets them first."""
    params = list(model.parameters())
    grads = [p.grad for p in params]
    modes = [(m, m.training) for m in model.modules()]
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    for p in params:     # the backward below must not add into the gradients kept (autograd adds in place)
        p.grad = None
    try:
        with as_before(model, device):
            model.train(only_train is None)
            if only_train is not None:
                only_train.train()
            if train_shape is not None:
                x = torch.zeros(train_shape, device=device).contiguous(memory_format=fmt)
                with torch.enable_grad():
                    out = train_forward(model, x, amp)      # the epoch's forward: its ConfigErrors come here first
                    loss = loss_fn(out.float(), torch.zeros(train_shape[0], dtype=torch.int64, device=device))
                    if loss.requires_grad:
                        loss.backward()
            if eval_shape is not None:
                model.eval()
                with torch.no_grad(), (amp or FULL).autocast():
                    model(torch.zeros(eval_shape, device=device).contiguous(memory_format=fmt))
    finally:
        for p, g in zip(params, grads):
            p.grad = g
        for m, training in modes:
            m.training = training
