"""Mixup and CutMix on training batches (timm's ``Mixup`` in its "batch" mode): one lambda per batch,
soft targets mixed by the same lambda, each image paired with its :func:`partner`, the image half a batch away.

Label smoothing is not applied here: the mixed targets are class probabilities, and the training loss
(``runtime.build_loss``: torch cross-entropy with ``label_smoothing=F``) smooths probability targets as
``t (1 - F) + F / C``, which is exactly timm's ``mixup_target(..., smoothing=F)`` followed by its
``SoftTargetCrossEntropy`` (tested).

Reproducibility: every draw comes from a private ``random.Random`` seeded per (epoch seed, step) by
:meth:`BatchMix.reseed` + the step number, so a batch's lambda and box depend on nothing else (not on
the global streams that dropout uses, not on earlier epochs, not on the rank): a resumed run mixes as an
uninterrupted one, and every rank of a torchrun job draws what one process draws.

The pairs, across processes: under torchrun the ranks split each global batch of B strided (rank r of N holds
global positions r, r + N, ...; ``data.loaders.train_batches``) and each rank mixes its own b = B / N images.
Pairing image i with i + B/2 (mod B) keeps every pair on one rank whenever b is even: global r + kN pairs with
r + (k + b/2) N, the rank's own image k + b/2 (mod b), which is what the rank's ``partner`` picks. So 1 and N
processes mix the same pairs (timm's reversed batch paired each rank within its shard: other pairs than one
process's). An odd b (an odd batch in one process, a rank's odd share of a last partial batch) still pairs as a
permutation (i with i - b//2 mod b: every image mixed with exactly one other, each the partner of one, no image
with itself once b >= 2), but under torchrun the one-process partner of an image then lies on another rank:
those steps mix other pairs than one process (``engine.setup`` notes an odd per-process batch).
"""
from __future__ import annotations

import math
import random
from dataclasses import dataclass
from typing import Any

import torch

from finetune.core.seeding import sample_seed

__all__ = ["BatchMix", "MixedBatch", "build_mix", "partner"]

SWITCH_PROB = 0.5    # both alphas > 0: the chance a batch uses CutMix instead of mixup (timm's default)


@dataclass
class MixedBatch:
    """``x``: the mixed images; ``target``: (N, C) class probabilities; ``y``: each sample's dominant label
    (the larger share: what train accuracy is measured against); ``lam``: the share of the original image;
    ``kind``: "mixup" | "cutmix"."""

    x: torch.Tensor
    target: torch.Tensor
    y: torch.Tensor
    lam: float
    kind: str


class BatchMix:
    """Mixup (``mixup`` alpha) and/or CutMix (``cutmix`` alpha) for ``num_classes`` classes.

    Call :meth:`reseed` with the epoch seed before each epoch, then ``mix(x, y, step)`` per batch
    (``step`` counts from 1 within the epoch).
    """

    def __init__(self, mixup: float, cutmix: float, num_classes: int, seed: int = 0) -> None:
        if mixup < 0 or cutmix < 0 or not (mixup > 0 or cutmix > 0):
            raise ValueError(f"BatchMix needs alphas >= 0, one of them > 0 (got mixup={mixup}, cutmix={cutmix})")
        self.mixup, self.cutmix, self.num_classes = float(mixup), float(cutmix), int(num_classes)
        self.seed = int(seed)

    def reseed(self, seed: int) -> None:
        self.seed = int(seed)

    def draw(self, step: int) -> tuple[str, float, random.Random]:
        """The kind and lambda of batch ``step`` (and the generator, for CutMix's box)."""
        rng = random.Random(f"zoo.BatchMix:{sample_seed(self.seed, step)}")
        use_cutmix = self.cutmix > 0 and (self.mixup <= 0 or rng.random() < SWITCH_PROB)
        alpha = self.cutmix if use_cutmix else self.mixup
        return ("cutmix" if use_cutmix else "mixup"), rng.betavariate(alpha, alpha), rng

    def __call__(self, x: torch.Tensor, y: torch.Tensor, step: int) -> MixedBatch:
        kind, lam, rng = self.draw(step)
        x, other = x.clone(), partner(x)
        if kind == "cutmix":
            h, w = int(x.shape[-2]), int(x.shape[-1])
            top, bottom, left, right = cutmix_box(h, w, lam, rng)
            x[..., top:bottom, left:right] = other[..., top:bottom, left:right]
            lam = 1.0 - (bottom - top) * (right - left) / float(h * w)     # timm's correct_lam
        else:
            x.mul_(lam).add_(other, alpha=1.0 - lam)
        one_hot = torch.nn.functional.one_hot(y, self.num_classes).to(torch.float32)
        target = one_hot * lam + partner(one_hot) * (1.0 - lam)
        dominant = y if lam >= 0.5 else partner(y)
        return MixedBatch(x=x, target=target, y=dominant, lam=float(lam), kind=kind)

    def __repr__(self) -> str:
        return f"BatchMix(mixup={self.mixup}, cutmix={self.cutmix}, num_classes={self.num_classes})"


def partner(batch: torch.Tensor) -> torch.Tensor:
    """Each row's mixing partner, row for row: the batch rolled by half its length (row i takes row
    i - n//2 mod n, which is i + n/2 for an even n: pairs). The images, their one-hot targets and labels all
    take their partner from here; see the module's docstring for why half a batch (the same pairs on any number
    of processes) and what an odd batch does."""
    return batch.roll(int(batch.shape[0]) // 2, 0)


def cutmix_box(h: int, w: int, lam: float, rng: random.Random) -> tuple[int, int, int, int]:
    """timm's ``rand_bbox``: a box of sides ``sqrt(1 - lam)`` x (h, w) centred uniformly, clipped to the
    image; returns (top, bottom, left, right)."""
    ratio = math.sqrt(1.0 - lam)
    ch, cw = int(h * ratio), int(w * ratio)
    cy, cx = rng.randrange(h), rng.randrange(w)
    top, bottom = max(0, cy - ch // 2), min(h, cy + ch // 2)
    left, right = max(0, cx - cw // 2), min(w, cx + cw // 2)
    return top, bottom, left, right


def build_mix(config: Any, num_classes: int) -> BatchMix | None:
    """The batch mixer ``config`` asks for (``mixup``/``cutmix`` alphas), or None when both are 0."""
    mixup, cutmix = float(getattr(config, "mixup", 0.0)), float(getattr(config, "cutmix", 0.0))
    if mixup <= 0 and cutmix <= 0:
        return None
    return BatchMix(mixup, cutmix, num_classes, seed=int(getattr(config, "seed", 0)))
