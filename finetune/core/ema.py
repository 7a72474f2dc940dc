"""An exponential moving average (EMA) of a model's weights, updated after every optimizer step.

As timm's ``ModelEmaV3``: the average is a separate copy of the network, its parameters move towards
the trained ones after each step, its buffers (BatchNorm running statistics) are copied, not averaged.

Where the average starts matters. After a head phase it starts from the solved head, the best weights
the run has so far, and the decay is the one asked for from the first step (``--ema -1``, the default
there, spans about one epoch). When the head is untrained (``--head-epochs 0``) the start is worth
forgetting, so the decay warms up: after ``t`` updates it is ``min(decay, (1 + t) / (10 + t))``
(TensorFlow's ``ExponentialMovingAverage(num_updates=t)`` rule): the first update takes 90% of the new
weights, after 20 steps the average spans roughly the last ten.
"""
from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn

__all__ = ["ModelEma", "ema_decay"]


def ema_decay(decay: float, updates: int, warmup: bool = True) -> float:
    """The decay of update number ``updates + 1`` (``updates`` = updates made before it); ``warmup``
    False: ``decay`` from the first update."""
    if not warmup:
        return float(decay)
    return min(float(decay), (1.0 + updates) / (10.0 + updates))


class ModelEma:
    """The averaged copy of ``model``: ``update(model)`` after each optimizer step, ``module`` to evaluate.

    Only parameters that require grad are averaged (frozen ones equal the copy's by construction: the
    freeze set is fixed while one EMA lives); every buffer is copied from the trained model. ``warmup``:
    the decay warms up (see the module's docstring); False when ``model`` starts from a solved head.
    """

    def __init__(self, model: nn.Module, decay: float, warmup: bool = True) -> None:
        self.decay = float(decay)
        self.warmup = bool(warmup)
        self.updates = 0
        self.module = copy.deepcopy(_unwrap(model))
        self.module.eval()
        for p in self.module.parameters():
            p.requires_grad_(False)

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        d = ema_decay(self.decay, self.updates, self.warmup)
        self.updates += 1
        src = _unwrap(model)
        trained = [(e, p) for e, p in zip(self.module.parameters(), src.parameters()) if p.requires_grad]
        if trained:
            ema_p, new_p = zip(*trained)
            torch._foreach_lerp_(list(ema_p), [p.detach() for p in new_p], 1.0 - d)
        buffers = list(self.module.buffers())
        if buffers:       # one foreach copy, not a kernel per BatchNorm buffer (159 in a ResNet-50)
            torch._foreach_copy_(buffers, list(src.buffers()))

    def state_dict(self) -> dict[str, Any]:
        return {"updates": self.updates, "decay": self.decay, "model": self.module.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.updates = int(state["updates"])
        self.module.load_state_dict(state["model"])


def _unwrap(model: nn.Module) -> nn.Module:
    # torch.compile and DDP wrap the network; the average is of the network itself
    model = getattr(model, "_orig_mod", model)
    if isinstance(model, nn.parallel.DistributedDataParallel):
        model = model.module
    return getattr(model, "_orig_mod", model)
