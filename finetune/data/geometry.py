"""Crops and resizes of a whole batch at once, for ``--decode device``.

Each image's crop + resize is two resampling matrices, one per axis, with the weights of torch's
antialiased interpolation (``F.resized_crop(..., antialias=True)``, PIL's filters: triangle for bilinear,
Keys a=-0.5 for bicubic, support scaled when shrinking) or nearest; the batch is then resampled with two
batched matrix products, a run of images at a time (mixed sizes zero-padded to the run's largest): a
few kernels per run where the per-image resize took several per image, and one small copy per image of
a mixed run. Pixels are PIL's (``zoo predict``/``zoo eval`` and the CPU workers resize with PIL): one axis
resampled, clamped and rounded to levels (half up), then the other, in PIL's order (:func:`rows_first`), but
for one-level rounding ties (PIL's weights are fixed-point); tested.

A :class:`Plan` says what one image becomes: rows ``[top, top + height)`` resized to ``resized_h`` rows, of
which ``[offset_y, offset_y + out_h)`` are kept (a centre crop after the resize; rows outside the resized
image are zero, as torchvision's centre crop pads), and the same for columns.
"""
from __future__ import annotations

import math
from typing import NamedTuple, Sequence

import PIL
import torch

from finetune.core.devices import copies_async
from finetune.data.transforms import EVAL_MAX_ASPECT, LimitAspect

__all__ = ["Plan", "crop_plan", "eval_plan", "resample", "rows_first"]

# Bytes of float32 pixels resampled in one product: bounds the device memory a batch of large images takes.
CHUNK_BYTES = 256 * 2**20
# Pillow 13 (python-pillow/Pillow#9549) resamples the rows first when the height shrinks by more than twice as many
# pixels as the width does; earlier Pillows always resample the columns first.
PIL_ROWS_FIRST = int(PIL.__version__.split(".")[0]) >= 13


class Plan(NamedTuple):
    top: int
    height: int
    resized_h: int
    offset_y: int
    left: int
    width: int
    resized_w: int
    offset_x: int


def crop_plan(top: int, left: int, height: int, width: int, size: tuple[int, int]) -> Plan:
    """``F.resized_crop(im, top, left, height, width, size)``: the box resized to ``size`` (h, w)."""
    return Plan(top, height, size[0], 0, left, width, size[1], 0)


def eval_plan(height: int, width: int, size: tuple[int, int], crop_pct: float) -> Plan:
    """The evaluation view of ``finetune.data.transforms.build_transform`` (its ``fixed()`` steps): square
    targets: the long side limited to 2x the short (``LimitAspect``), the short side resized to
    ``floor(size / crop_pct)``, centre crop; others: resized to the scaled box, centre crop."""
    h, w = size
    scale = (math.floor(h / crop_pct), math.floor(w / crop_pct))
    top, left = 0, 0
    if h == w:
        top, left, height, width = LimitAspect(EVAL_MAX_ASPECT).box(height, width)
        # torchvision's Resize(int): the short side to the size, the long side scaled and truncated
        short, long = (width, height) if width <= height else (height, width)
        new_short, new_long = scale[0], int(scale[0] * long / short)
        rw, rh = (new_short, new_long) if width <= height else (new_long, new_short)
    else:
        rh, rw = scale
    return Plan(top, height, rh, int(round((rh - h) / 2.0)), left, width, rw, int(round((rw - w) / 2.0)))


def rows_first(plan: Plan) -> bool:
    """Whether PIL resizes ``plan``'s box rows first (``PIL_ROWS_FIRST``); else columns first."""
    shrink_h, shrink_w = plan.height - plan.resized_h, plan.width - plan.resized_w
    return PIL_ROWS_FIRST and shrink_h > 0 and shrink_h > 2 * shrink_w


def _filter(mode: str):
    if mode == "bilinear":
        return 2, lambda x: (1.0 - x.abs()).clamp_(min=0.0)
    if mode == "bicubic":                   # Keys' cubic, a = -0.5 (PIL; torch's antialiased bicubic)
        a = -0.5

        def cubic(x: torch.Tensor) -> torch.Tensor:
            x = x.abs()
            near = ((a + 2) * x - (a + 3)) * x * x + 1
            far = (((x - 5) * x + 8) * x - 4) * a
            return torch.where(x < 1, near, torch.where(x < 2, far, torch.zeros_like(x)))
        return 4, cubic
    raise ValueError(f"no antialiased filter for {mode!r}")


def _weights(start: torch.Tensor, length: torch.Tensor, resized: torch.Tensor, offset: torch.Tensor,
             out: int, size: int, mode: str) -> torch.Tensor:
    """(G, out, size) float32: row j of image g mixes the source pixels that output pixel ``offset + j`` of
    the resize of ``[start, start + length)`` to ``resized`` pixels takes, with torch's weights (its
    ``_compute_indices_min_size_weights_aa`` / nearest index, in float32 as torch computes them)."""
    device = start.device
    g = start.view(-1, 1, 1).to(torch.float32)
    n = length.view(-1, 1, 1).to(torch.float32)
    j = (torch.arange(out, device=device, dtype=torch.float32).view(1, -1, 1) + offset.view(-1, 1, 1))
    s = torch.arange(size, device=device, dtype=torch.float32).view(1, 1, -1) - g    # index in the box
    inside = (j >= 0) & (j < resized.view(-1, 1, 1)) & (s >= 0) & (s < n)
    scale = n / resized.view(-1, 1, 1).to(torch.float32)
    if mode == "nearest":
        src = torch.minimum(torch.floor(j * scale), n - 1)
        return ((s == src) & inside).to(torch.float32)
    taps, fn = _filter(mode)
    support = torch.where(scale >= 1.0, taps * 0.5 * scale, torch.full_like(scale, taps * 0.5))
    invscale = torch.where(scale >= 1.0, 1.0 / scale, torch.ones_like(scale))
    center = scale * (j + 0.5)
    lo = torch.clamp(torch.trunc(center - support + 0.5), min=0.0)
    hi = torch.minimum(torch.trunc(center + support + 0.5), n)
    w = fn((s - center + 0.5) * invscale) * (inside & (s >= lo) & (s < hi))
    total = w.sum(-1, keepdim=True)
    return w / torch.where(total == 0, torch.ones_like(total), total)


def resample(images: Sequence[torch.Tensor], plans: Sequence[Plan], size: tuple[int, int],
             mode: str = "bilinear") -> torch.Tensor:
    """uint8 images (3, H_i, W_i) on one device and a :class:`Plan` each -> a uint8 batch (N, 3, *size).

    ``mode``: bilinear or bicubic (antialiased, as PIL's resize: one axis, clamped and rounded to levels,
    then the other, in PIL's order, :func:`rows_first`; the PIL path's pixels, that ``zoo predict`` and
    ``zoo eval`` see, but for one-level rounding ties) or nearest. The images go through in runs (by axis
    order, then size; each run's float pixels and weights within ``CHUNK_BYTES``): a run of one size is
    stacked, one of mixed sizes is zero-padded to its largest (a plan's box lies inside its own image, so
    the padding gets weight 0), and each run is resampled by two batched products. The products follow
    torch's float32 matmul precision: with TF32 allowed, a pixel in a few dozen lands one level away.
    """
    if len(images) != len(plans):
        raise ValueError(f"{len(images)} images but {len(plans)} plans")
    out_h, out_w = size
    n = len(images)
    device = images[0].device if images else torch.device("cpu")
    out = torch.empty((n, 3, out_h, out_w), dtype=torch.uint8, device=device)
    if n == 0:
        return out
    shapes = [tuple(int(v) for v in im.shape[-2:]) for im in images]
    first = [rows_first(p) for p in plans]
    order = sorted(range(n), key=lambda i: (first[i], shapes[i]))
    p = torch.tensor([plans[i] for i in order], dtype=torch.int64).to(device, non_blocking=copies_async(device))
    where = torch.tensor(order, dtype=torch.int64).to(device, non_blocking=copies_async(device))
    start = 0
    while start < n:
        stop, tall, wide = start, 0, 0
        while stop < n:
            h, w = max(tall, shapes[order[stop]][0]), max(wide, shapes[order[stop]][1])
            if stop > start and (4 * (stop + 1 - start) * (3 * h * w + out_h * h + out_w * w) > CHUNK_BYTES
                                 or first[order[stop]] != first[order[start]]):
                break
            tall, wide, stop = h, w, stop + 1
        run = order[start:stop]
        if all(shapes[i] == (tall, wide) for i in run):
            x = torch.stack([images[i] for i in run])
        else:
            x = torch.zeros((len(run), 3, tall, wide), dtype=torch.uint8, device=device)
            for j, i in enumerate(run):
                x[j, :, :shapes[i][0], :shapes[i][1]] = images[i]
        x = x.to(torch.float32)                                                            # (G, 3, H, W)
        q = p[start:stop]
        wy = _weights(q[:, 0], q[:, 1], q[:, 2], q[:, 3], out_h, tall, mode).unsqueeze(1)   # (G, 1, out_h, H)
        wx = _weights(q[:, 4], q[:, 5], q[:, 6], q[:, 7], out_w, wide, mode).transpose(1, 2).unsqueeze(1)
        # PIL's (zoo predict and eval): one axis rounded to levels, then the other; one rounding at the end let
        # bicubic's overshoot through, 6-7 levels from PIL's on photos (docs/benchmarks.md, "Device decode")
        if first[run[0]]:
            y = (wy @ x).clamp_(0, 255).add_(0.5).floor_() @ wx
        else:
            y = wy @ (x @ wx).clamp_(0, 255).add_(0.5).floor_()
        out.index_copy_(0, where[start:stop], y.clamp_(0, 255).add_(0.5).floor_().to(torch.uint8))
        start = stop
    return out
