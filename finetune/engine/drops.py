"""Dropout masks that do not depend on the number of processes.

torch's dropout draws each mask from the process's generator over the batch it sees, so under torchrun each rank
drew its own masks over its share of the batch: a run on N processes trained with other masks than the same run in
one process, and the two drifted apart from the first finetune epoch (docs/peers.md, "One process or two").
:class:`SharedDropout` draws every mask for the whole global batch from a generator seeded by (epoch seed, step,
call), the same on every rank and in one process, and each rank keeps its own rows (the ranks split each global
batch strided, as the image augmentation's draws do: ``finetune.data.device.DeviceAugment``).

It stands in for ``torch.nn.functional.dropout`` during a training forward (:meth:`SharedDropout.at`): that is what
``nn.Dropout`` calls (torchvision's VGG, AlexNet and GoogLeNet classifiers, zoo's MLP head) and what timm's models
call before their classifier (``drop_rate``). Not covered, and still drawn per rank: channel dropout
(``dropout2d``), stochastic depth (timm's ``drop_path``, off unless a model is built with it), attention dropout
inside ``scaled_dot_product_attention`` and a model's module that took the function itself at import (``from
torch.nn.functional import dropout``: it keeps torch's). Not used under ``--compile`` (the compiled graph keeps
torch's own). Only the training loop's thread draws while it stands in (no other thread of a run calls dropout: the
device decoding, the checkpoint writes and a loader's pinning do not). A dropout over a tensor whose first dimension
is not the batch (a sequence-first transformer, ``nn.MultiheadAttention``'s weights, B x heads rows) still draws
independent masks, only not the one-process ones. Activation checkpointing (none here) would re-run the forward in
the backward pass, outside :meth:`SharedDropout.at`, with torch's masks: a wrong gradient; such a model must not use
this.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Iterator

import torch
import torch.nn.functional as F

from finetune.core import distributed as ddp
from finetune.core.seeding import drop_seed, epoch_seed

__all__ = ["SharedDropout", "epoch_drops"]


def epoch_drops(config: Any, epoch: int, info: ddp.DistInfo | None = None) -> SharedDropout | None:
    """The dropout masks of ``epoch`` of a run seeded with ``config.seed``, for this process's rows of each global
    batch (``info``; None: a process that sees whole global batches, as every rank of the cached-feature head
    does). None under ``--compile``, whose graph keeps torch's dropout."""
    if getattr(config, "compile", False):
        return None
    rank, world = (info.rank, info.world_size) if info is not None and info.enabled else (0, 1)
    return SharedDropout(epoch_seed(config.seed, epoch), rank, world)


class SharedDropout:
    """The masks of one epoch: ``seed`` (the epoch's, the same on every rank), this rank's place ``rank`` among
    ``world`` processes."""

    def __init__(self, seed: int, rank: int = 0, world: int = 1) -> None:
        self.seed, self.rank, self.world = int(seed), int(rank), int(world)
        self._step = 0
        self._calls = 0
        self._rows: tuple[int, int, int] | None = None

    @contextmanager
    def at(self, step: int, rows: tuple[int, int, int] | None = None) -> Iterator[None]:
        """Within: the training forward of ``step``, whose dropout calls draw this step's shared masks. ``rows``:
        ``(start, stop, n)``, a pass over rows start..stop of this process's batch of n (``--micro-batch``): the
        masks are drawn for the whole batch and the pass keeps its rows, as one pass would have them."""
        plain = F.dropout
        self._step, self._calls, self._rows = int(step), 0, rows
        F.dropout = self._dropout
        try:
            yield
        finally:
            F.dropout = plain

    def _dropout(self, input: torch.Tensor, p: float = 0.5, training: bool = True, inplace: bool = False
                 ) -> torch.Tensor:
        if not training or p == 0.0 or input.dim() == 0:
            return input
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"dropout probability has to be between 0 and 1, but got {p}")
        self._calls += 1
        generator = torch.Generator(device=input.device)
        generator.manual_seed(drop_seed(self.seed, self._step, self._calls))
        start, stop, n = self._rows if self._rows is not None else (0, input.shape[0], input.shape[0])
        if stop - start != input.shape[0]:      # not the batch's first dimension: this pass's own draws
            start, stop, n = 0, input.shape[0], input.shape[0]
        shape = (n * self.world, *input.shape[1:])
        keep = torch.rand(shape, generator=generator, device=input.device)[self.rank::self.world][start:stop] >= p
        # times a Python number: computed in float and rounded once in bf16/fp16 (a scale tensor in the input's
        # dtype rounded 1/(1-p) first: up to 0.2% off each kept value)
        scale = 1.0 / (1.0 - p) if p < 1.0 else 0.0
        return input.mul_(keep).mul_(scale) if inplace else input * keep * scale
