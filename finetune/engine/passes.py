"""One optimizer step: the training forward pass, the loss of this process's share of the global batch, the
backward pass and the update, in one pass or, for a batch too big for the device's memory, in several
(``--micro-batch``). Every training path takes its steps here (``steps.train_one_epoch``).

A step in several passes is the one-pass step in other float order: each pass's loss is its part of the
batch's (its sum over the batch's divisor: the images, or their class weights), the gradients add up over the
passes before the update, and under DDP only the last pass's backward all-reduces them (``no_sync``). What is
drawn per image (augmentation, mixup, dropout masks: ``SharedDropout.at``'s rows) is drawn for the whole batch,
as in one pass. What differs: a BatchNorm layer that trains (``--bn train``, an MLP head's) normalises each pass
over its own images, as each rank does under torchrun.
"""
from __future__ import annotations

import contextlib
from typing import Callable, Iterator, NamedTuple

import torch
from torch import nn

from finetune.core import distributed as ddp
from finetune.core.errors import ConfigError, DivergedError
from finetune.engine.runtime import AmpPolicy
from finetune.engine.drops import SharedDropout

__all__ = ["take_step", "pass_bounds", "largest_pass", "smaller_pass", "optimizer_step", "stepped", "stand_in_step",
           "as_before", "train_forward", "diverged", "loss_parts", "batch_loss", "loss_scale", "Pads", "FULL"]

FULL = AmpPolicy("cpu", None)     # full precision: no autocast


def take_step(model: nn.Module, x: torch.Tensor, target: torch.Tensor, loss_fn: nn.Module, info: ddp.DistInfo, *,
              step: int, amp: AmpPolicy | None, drops: SharedDropout | None, optimizer, scaler,
              micro: int = 0, pads: Pads | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The forward pass of training step ``step`` on ``x`` and, given an ``optimizer`` (None: a frozen control,
    forward only), its backward and update; in passes of ``micro`` images when the batch holds more (0: one
    pass). ``pads``: the step's global batch holds padding copies (:class:`Pads`; None: it holds none). Returns
    the batch's loss (the mean, or :func:`batch_loss`'s scaled sum) and logits (with grad in one pass; detached
    from several)."""
    n = int(x.shape[0])
    if not micro or n <= micro:
        out = train_forward(model, x, amp, drops.at(step) if drops is not None else contextlib.nullcontext())
        loss = batch_loss(loss_fn, out.float(), target, info, pads=pads)
        if optimizer is not None:
            optimizer_step(loss, optimizer, scaler)
        return loss, out
    rows = n if pads is None else max(0, min(n, pads.rows))
    scale = loss_scale(_batch_weight(loss_fn, target[:rows]), loss_fn, info, pads)
    if optimizer is not None:
        optimizer.zero_grad(set_to_none=True)
    loss, outs = torch.zeros((), device=x.device), []
    with _update_refused(optimizer) if optimizer is not None else contextlib.nullcontext():
        for start, stop in pass_bounds(n, micro):
            # DDP all-reduces the gradients in the last pass's backward, once they add up to the step's
            sync = model.no_sync() if stop < n and hasattr(model, "no_sync") else contextlib.nullcontext()
            masks = drops.at(step, rows=(start, stop, n)) if drops is not None else contextlib.nullcontext()
            with sync, (contextlib.nullcontext() if optimizer is not None else torch.no_grad()):
                out = train_forward(model, x[start:stop], amp, masks)
                part = loss_parts(loss_fn, out.float(), target[start:stop], rows - start)[0] * scale
                if optimizer is not None:
                    _backward(part, scaler)
            loss += part.detach()
            outs.append(out.detach())
        if optimizer is not None:
            _update(optimizer, scaler)
    return loss, torch.cat(outs)


def pass_bounds(n: int, micro: int) -> list[tuple[int, int]]:
    """The rows ``(start, stop)`` of each forward pass of a batch of ``n`` images in passes of at most ``micro``
    (0: one pass): as few passes as fit, as even as can be (9 in passes of 8: 4 + 5, not 8 + 1). A pass of one
    image leaves a training BatchNorm layer one value per channel (torch refuses it mid-run); even passes give
    none from ``micro`` 3 up (``policy.batchnorm_batch``), and alike statistics to each pass."""
    k = -(-n // micro) if micro and n > micro else 1
    cuts = [n * i // k for i in range(k + 1)]
    return list(zip(cuts[:-1], cuts[1:]))


def largest_pass(n: int, micro: int) -> int:
    """The most images one pass of a batch of ``n`` takes in passes of at most ``micro`` (:func:`pass_bounds`)."""
    return max(b - a for a, b in pass_bounds(n, micro))


def smaller_pass(per_pass: int, refused: Callable[[int], str | None]) -> tuple[int | None, str | None]:
    """The ``--micro-batch`` to name after a forward pass of ``per_pass`` images ran out of memory, as
    ``(micro, None)``: half as many images or, where the run refuses that (``refused(micro)``: not None, the
    option that lifts the refusal; a BatchNorm layer that trains refuses passes of 1 or 2 images where one image
    leaves it one value per channel, ``recipe.check_batchnorm_batch``), the fewest above it that the run takes (a
    pass of 4 or 5: 3, not 2, which the resume would refuse). ``(None, way)`` where it takes no fewer than
    ``per_pass`` (a pass of 1 image; of 2 or 3 that such a layer needs, ``way`` the option that stops it
    training, e.g. ``--bn eval``): passes cannot shrink, only a new run helps (a smaller ``--img-size``, a smaller
    model, or ``way``)."""
    way = None
    for micro in range(max(1, per_pass // 2), per_pass):
        way = refused(micro)
        if way is None:
            return micro, None
    return None, way


def _batch_weight(loss_fn: nn.Module, target: torch.Tensor) -> torch.Tensor:
    """What ``loss_fn``'s mean over ``target`` divides by (:func:`loss_parts`' weight)."""
    weight = getattr(loss_fn, "weight", None)
    if weight is not None and not target.is_floating_point():
        return weight[target].sum()
    return torch.full((), float(target.shape[0]), device=target.device)


def diverged(epoch: int, step: int | None, lr: float, val_loss: float | None = None) -> DivergedError:
    """The one message for a NaN/inf loss, on every training path; ``step`` None: the epoch's validation loss
    (``val_loss``) is the non-finite one: its last update blew the weights up, after its loss was taken."""
    where = f"at epoch {epoch} step {step}" if step is not None else (
        f"after epoch {epoch} (its validation loss is {val_loss})")
    return DivergedError(f"loss diverged {where}: lower the learning rate (was {lr:.3g})")


def optimizer_step(loss: torch.Tensor, optimizer: torch.optim.Optimizer, scaler=None) -> None:
    """Backward and step, through the GradScaler when fp16 autocast uses one.

    Raises:
        DivergedError: the learning rate or weight decay does not fit the parameters' float type (e.g.
            ``--lr 1e300``): torch's update refuses it before any NaN could show in the loss.
    """
    optimizer.zero_grad(set_to_none=True)
    with _update_refused(optimizer):
        _backward(loss, scaler)
        _update(optimizer, scaler)


def _backward(loss: torch.Tensor, scaler) -> None:
    (scaler.scale(loss) if scaler is not None else loss).backward()


def _update(optimizer: torch.optim.Optimizer, scaler) -> None:
    if scaler is not None:
        scaler.step(optimizer)
        scaler.update()
    else:
        optimizer.step()


@contextlib.contextmanager
def _update_refused(optimizer: torch.optim.Optimizer) -> Iterator[None]:
    """:func:`optimizer_step`'s DivergedError for an update torch refuses (a learning rate that overflows)."""
    try:
        yield
    except RuntimeError as e:
        if "without overflow" not in str(e):
            raise
        groups = optimizer.param_groups
        lr = max(float(g.get("lr", 0.0)) for g in groups)
        wd = max(float(g.get("weight_decay", 0.0)) for g in groups)
        raise DivergedError(f"the optimizer step overflowed (learning rate up to {lr:.3g}, weight decay up to "
                            f"{wd:.3g}): lower the learning rate, --backbone-lr-mult or --weight-decay") from None


def loss_parts(loss_fn: nn.Module, out: torch.Tensor, target: torch.Tensor,
               rows: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``loss_fn``'s batch mean as (sum, weight): the weight is what torch divides by, the sum of the
    targets' class weights for a class-weighted cross-entropy on class indices (``--class-weights auto``:
    label smoothing divides by it too), else the number of images. Means over several batches or ranks are
    then ``sum(sums) / sum(weights)``, whatever the batching. ``rows``: only the first ``rows`` count (None: all);
    the others (padding copies, :class:`Pads`) add nothing, and with none counted the sum is a zero that still
    leads back through ``out`` (the backward reaches every parameter, as DDP's all-reduce needs)."""
    n = int(out.shape[0])
    if rows is not None and rows < n:
        if rows <= 0:
            return out[:0].sum(), out.new_zeros(())
        out, target = out[:rows], target[:rows]
    mean = loss_fn(out, target)
    weight = getattr(loss_fn, "weight", None)
    if weight is not None and not target.is_floating_point():
        total = weight[target].sum()
    else:
        total = out.new_full((), float(target.shape[0]))    # (a fill on the device: no copy the host waits for)
    return mean * total, total


class Pads(NamedTuple):
    """A training step whose global batch holds the copies that pad the ranks' shares to one length under
    torchrun (the sampler's: ``data.loaders.EpochSeededSampler.pads``): ``rows``, how many of this rank's
    batch, from its first, are the set's own images (the copies are always a batch's last rows); ``images``,
    the set's own images of the global batch, all ranks together. The copies still run forward and backward
    (every rank takes the same steps, shapes and all-reduces) but add nothing to the loss."""
    rows: int
    images: int


def batch_loss(loss_fn: nn.Module, out: torch.Tensor, target: torch.Tensor, info: ddp.DistInfo, *,
               pads: Pads | None = None) -> torch.Tensor:
    """The training loss of this rank's part of the global batch, scaled so that DDP's average of the ranks'
    gradients is the gradient of one process's loss on the whole batch: this rank's sum over its images
    times ``world_size`` over the global batch's images, or their class weight (:func:`loss_scale`). A plain
    mean needs nothing when no rank's batch holds padding copies (``pads`` None): the shards are the same size
    and their images all count. ``pads``: they are not, or not all count; with ``pads.rows`` 0 (a stand-in
    step, :func:`stand_in_step`) the loss is a zero that still reaches every parameter."""
    if pads is None and not _shared_weight(loss_fn, info):
        return loss_fn(out, target)
    total, weight = loss_parts(loss_fn, out, target, None if pads is None else pads.rows)
    return total * loss_scale(weight, loss_fn, info, pads)


def loss_scale(weight: torch.Tensor, loss_fn: nn.Module, info: ddp.DistInfo, pads: Pads | None):
    """What this rank's loss sum (over the rows that count, of weight ``weight``) is multiplied by: ``world_size``
    over the global batch's weight, so that DDP's average of the ranks' gradients is one process's gradient of
    the mean over the global batch's own images. A class-weighted cross-entropy divides by the batch's weight,
    which differs between shards: each rank all-reduces its weight (one scalar all-reduce per step, only then;
    on CUDA it queues like the gradients' and the host does not wait). Whether it runs depends on the loss
    alone, never on the batch: a stand-in's class targets and the other ranks' mixed (probability) ones take it
    alike (QA: --mixup with --class-weights auto, the stand-in rank alone all-reduced and gloo aborted the job);
    for probability targets torch divides by the images, so the shared weight is the images then. Otherwise the
    global batch's images are known to every rank without a collective: ``pads.images`` where padding copies
    leave some out, else this rank's ``weight`` times ``world_size`` (the shards are the same size)."""
    if _shared_weight(loss_fn, info):
        shared = weight.detach().clone()
        ddp.all_reduce_sum(shared, info)
        return info.world_size / shared.clamp_min(torch.finfo(shared.dtype).tiny)
    if pads is not None:
        return info.world_size / max(1, int(pads.images))
    return 1.0 / weight


def _shared_weight(loss_fn: nn.Module, info: ddp.DistInfo) -> bool:
    """The global batch's weight is all-reduced (:func:`loss_scale`): a class-weighted loss under DDP."""
    return info.enabled and getattr(loss_fn, "weight", None) is not None


def stepped(model: nn.Module, scheduler, ema) -> None:
    """After an optimizer step: the scheduler's per-step LR, the weight average."""
    if scheduler is not None:
        scheduler.step_batch()
    if ema is not None:
        ema.update(model)


def stand_in_step(model: nn.Module, blank: Callable[[], tuple] | None, loss_fn: nn.Module, amp: AmpPolicy | None,
                  optimizer, scheduler, scaler, ema, info: ddp.DistInfo, micro: int = 0) -> None:
    """A training step for a rank of a DDP job that has no image in it (each failed to decode, after the
    scan). The other ranks' backward waits in DDP's gradient all-reduce for this rank's, so it runs the
    step too, on ``blank()`` with its loss weighed 0: its gradient is zero and the others' is averaged over
    all ranks, as ``DistributedDataParallel.join`` does for a rank out of inputs; the optimizer, the LR
    schedule and the weight average take the step every rank takes. Nothing else of the batch remains:
    the BatchNorm statistics and the random generators (dropout) are as before, and the epoch's metrics do
    not count it. Only this rare path pays for it: a normal step is unchanged (no extra collective; with class
    weights both take :func:`batch_loss`'s one). ``micro``: the passes' size; one pass of it stands in for them
    (the others' last pass all-reduces as this one does)."""
    if blank is None:
        raise RuntimeError("train_one_epoch: a batch whose every image failed needs `blank` under DDP")
    x, y = blank()
    x, y = (x[:micro], y[:micro]) if micro else (x, y)
    with as_before(model, x.device):
        loss = batch_loss(loss_fn, train_forward(model, x, amp).float(), y, info, pads=Pads(0, 0))
        if optimizer is not None:
            optimizer_step(loss, optimizer, scaler)
    if optimizer is not None:
        stepped(model, scheduler, ema)


@contextlib.contextmanager
def as_before(model: nn.Module, device: torch.device):
    """Run a forward/backward pass that must leave no trace: the model's buffers (BatchNorm statistics) and
    the random generators (torch's CPU one, ``device``'s CUDA one) are restored afterwards."""
    buffers = [(b, b.detach().clone()) for b in model.buffers()]
    forked = ([device.index if device.index is not None else torch.cuda.current_device()]
              if device.type == "cuda" else [])
    try:
        with torch.random.fork_rng(devices=forked):
            yield
    finally:
        with torch.no_grad():
            for b, saved in buffers:
                b.copy_(saved)


def train_forward(model: nn.Module, x: torch.Tensor, amp: AmpPolicy | None,
             masks: contextlib.AbstractContextManager = contextlib.nullcontext()) -> torch.Tensor:
    """The training forward pass (its dropout drawn within ``masks``: ``SharedDropout.at``). A BatchNorm layer
    that trains given one value per channel (a batch of one image: the MLP head's at any size, the network's with
    --bn train where its last maps are 1x1) made torch raise a ValueError, a traceback; it is a ConfigError saying
    what to change (set-up refuses it before the first step, ``finetune.core.recipe.check_batchnorm_batch``; this
    stays for a model it could not look into)."""
    try:
        with (amp or FULL).autocast(), masks:
            out = model(x)
    except ValueError as e:
        if "Expected more than 1 value per channel" not in str(e):
            raise
        raise ConfigError(f"a BatchNorm layer cannot train on a batch of {x.shape[0]} image (the MLP head's, or the "
                          "network's with --bn train or --no-pretrained): start again with --batch-size 2 or more "
                          "per process") from None
    if not isinstance(out, torch.Tensor):    # torchvision's GoogLeNet/Inception v3 with aux_logits in train mode
        raise ConfigError(f"the model's forward returned a {type(out).__name__} in training mode, not one tensor of "
                          "logits: build it without auxiliary outputs (torchvision: aux_logits=False)")
    return out
