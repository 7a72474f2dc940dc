"""How one phase's epochs are computed: the :class:`EpochSteps` protocol the trainer drives, and
:class:`LoaderSteps`, the ordinary path (batches of images from the setup's loaders through the network).
The cached-feature head (``finetune.tools.features.CachedHeadSteps``) is the other implementation."""
from __future__ import annotations

import math
import sys
from typing import Protocol

import torch
from torch import nn
from tqdm.auto import tqdm

from finetune.core import distributed as ddp
from finetune.core.ema import ModelEma
from finetune.engine.setup import Setup
from finetune.engine.steps import evaluate, train_one_epoch

__all__ = ["EpochSteps", "LoaderSteps"]


class EpochSteps(Protocol):
    """How one phase's epochs are computed. ``train_epoch`` returns ``{"loss", "acc", "images_per_s"}``
    (and ``"phase_done": True`` when the phase needs no more epochs), ``evaluate`` ``{"loss", "acc"}``
    (full metrics with ``full=True``)."""

    label: str

    def begin_phase(self, phase: str) -> None: ...

    def train_epoch(self, epoch: int, phase: str, optimizer, scheduler, scaler) -> dict: ...

    def evaluate(self, full: bool = False) -> dict: ...

    def failures(self) -> dict[str, str]: ...     # images that failed to decode: path -> reason


class LoaderSteps:
    """The ordinary path: batches of images from the setup's loaders through the whole network.

    With ``--ema`` the finetune phase keeps a weight average (``self.ema``, started from the weights the
    phase begins with) and validates it instead of the trained weights: the epoch's val metrics, early
    stopping and the best checkpoint (hence the exported bundle) are the average's."""

    label = ""

    def __init__(self, setup: Setup) -> None:
        self.s = setup
        self.net: nn.Module = setup.model
        self.eval_net: nn.Module = setup.model
        self.ema: ModelEma | None = None
        self.val_probs: torch.Tensor | None = None     # of the last evaluation (see FitResult.val_probs)
        self.val_correct: torch.Tensor | None = None   # of the last evaluation: hits on this rank's images
        self.val_losses: torch.Tensor | None = None    # ... and their cross-entropy (float64)

    def begin_phase(self, phase: str) -> None:
        s = self.s
        self.net = ddp.wrap_model(s.model, s.device, s.info)     # DDP sees this phase's trainable set
        self.ema = (ModelEma(s.model, s.config.ema, warmup=not s.head_first)
                    if (phase == "finetune" and s.config.ema > 0) else None)
        self.eval_net = s.model if self.ema is None else self.ema.module
        if s.config.compile:
            self.net, self.eval_net = torch.compile(self.net), torch.compile(self.eval_net)

    def train_epoch(self, epoch: int, phase: str, optimizer, scheduler, scaler) -> dict:
        s = self.s
        s.seed_train_loader(epoch)
        bar = _progress(len(s.train_loader), f"epoch {epoch}/{s.config.epochs} {phase}",
                        disable=s.config.quiet or not s.info.is_main)
        try:
            return train_one_epoch(self.net, s.train_loader, optimizer, scheduler, s.loss_fn, s.device, amp=s.amp,
                                   scaler=scaler, progress=bar, epoch=epoch, channels_last=s.channels_last,
                                   only_train=s.head_module if phase == "head" else None, info=s.info,
                                   normalize=s.train_normalize, mix=s.mix, ema=self.ema)
        finally:
            if bar is not None:
                bar.close()

    def evaluate(self, full: bool = False) -> dict:
        s = self.s
        self.val_probs = self.val_correct = self.val_losses = None
        if not s.has_val:
            return {"loss": math.nan, "acc": math.nan}
        probs: list | None = [] if s.info.world_size == 1 else None     # a rank sees only its shard
        correct: list = []
        losses: list = []
        out = evaluate(s.model if full else self.eval_net, s.val_loader, s.eval_loss_fn, s.device, s.classes,
                       amp=s.amp, channels_last=s.channels_last, info=s.info, normalize=s.normalize, probs=probs,
                       correct=correct, losses=losses)
        self.val_correct = torch.cat(correct) if correct else torch.zeros(0, dtype=torch.bool)
        self.val_losses = torch.cat(losses) if losses else torch.zeros(0, dtype=torch.float64)
        if probs and sum(len(p) for p in probs) == len(s.val_set):     # no image dropped: rows = val_set items
            self.val_probs = torch.cat(probs)
        return out

    def failures(self) -> dict[str, str]:
        return self.s.failures()


def _progress(total: int, desc: str, disable: bool):
    """One tqdm bar per epoch on stderr (quiet when stderr is not a terminal, or with quiet=True)."""
    return tqdm(total=total, desc=desc, leave=False, disable=True if disable else None, file=sys.stderr,
                dynamic_ncols=True, unit="batch")
