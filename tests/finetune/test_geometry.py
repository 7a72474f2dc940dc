"""finetune.data.geometry: a batch's crops and resizes in a few batched products, pixel for pixel as
the PIL path's (``zoo predict``, ``zoo eval``, the CPU workers), but for one-level rounding differences;
nearest as torchvision's tensor path."""
from __future__ import annotations

import random

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.transforms import InterpolationMode
from torchvision.transforms.v2 import functional as F

from finetune.data import build_transform
from finetune.data.geometry import PIL_ROWS_FIRST, crop_plan, eval_plan, resample, rows_first


def _photo(h: int, w: int, seed: int) -> torch.Tensor:
    """Smooth gradients plus noise: the resize's overshoot and its rounding ties both show."""
    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.linspace(0, 1, h), torch.linspace(0, 1, w), indexing="ij")
    base = torch.stack([yy * 200, xx * 180, (yy + xx) * 90]) + torch.rand(3, h, w, generator=g) * 60
    return base.clamp(0, 255).to(torch.uint8)


def _reference(im: torch.Tensor, mode: str, view) -> torch.Tensor:
    """``view`` (a function of an image) of ``im`` as the PIL path makes it; nearest: as torchvision's tensor
    path (PIL's nearest picks other pixels: docs/benchmarks.md, "Device decode")."""
    if mode == "nearest":
        return view(im)
    return torch.from_numpy(np.array(view(Image.fromarray(im.permute(1, 2, 0).numpy())))).permute(2, 0, 1)


def _agree_with_pil(a: torch.Tensor, b: torch.Tensor) -> None:
    # PIL's fixed-point weights tip other ties than float32 products: measured up to 1.3% of the values one
    # level apart (bilinear enlarging; bicubic 0.05%), never two; rounding once at the end (no longer) put
    # bicubic's overshoot 6+ levels away and 3-8% of the values one level away
    assert a.shape == b.shape and a.dtype == b.dtype == torch.uint8
    d = (a.int() - b.int()).abs()
    assert int(d.max()) <= 2 and int((d > 0).sum()) <= d.numel() // 20 and int((d > 1).sum()) <= d.numel() // 1000


def _agree(a: torch.Tensor, b: torch.Tensor) -> None:
    assert a.shape == b.shape and a.dtype == b.dtype == torch.uint8
    d = (a.int() - b.int()).abs()
    # One level at most, on a few pixels: which pixels' rounding ties tip is the CPU's kernels' to decide
    # (the reference's resize and the products, in float32). AVX2/AVX-512 kernels tip 0-4 of 13824 in the
    # batch test over 30 draws, torch's generic ones (ATEN_CPU_CAPABILITY=default: another CPU) 1-22; a
    # wrong plan moves pixels by tens of levels, a wrong rounding about half of them by one.
    assert int(d.max()) <= 1 and int((d > 0).sum()) <= max(1, d.numel() // 200)


@pytest.mark.parametrize("mode", ["bilinear", "bicubic", "nearest"])
def test_a_batch_of_random_crops_matches_torchvisions_resized_crop_per_image(mode):
    rng = random.Random(mode)
    images, plans, want = [], [], []
    for k in range(24):
        H, W = (40, 30) if k % 3 else (rng.randint(3, 90), rng.randint(3, 90))   # a shared size, and others
        im = _photo(H, W, k)
        h, w = rng.randint(1, H), rng.randint(1, W)
        top, left = rng.randint(0, H - h), rng.randint(0, W - w)
        size = (16, 12)                 # shrinking and enlarging crops, both axes
        images.append(im)
        plans.append(crop_plan(top, left, h, w, size))
        want.append(_reference(im, mode, lambda x: F.resized_crop(
            x, top, left, h, w, list(size), interpolation=InterpolationMode(mode), antialias=True)))
    got = resample(images, plans, (16, 12), mode)
    _agree_with_pil(got, torch.stack(want))


@pytest.mark.parametrize("mode", ["bilinear", "bicubic", "nearest"])
def test_the_eval_plan_is_build_transforms_evaluation_view(mode):
    """eval_plan mirrors build_transform's fixed() steps (limit the aspect, resize, centre crop) for square
    and non-square targets, strips and any crop_pct."""
    rng = random.Random(1)
    for k in range(30):
        H, W = rng.randint(4, 160), rng.randint(4, 160)
        if k % 5 == 0:
            W = H * rng.randint(3, 6)          # a strip: the aspect limit crops it first
        im = _photo(H, W, k)
        size = (24, 24) if k % 3 else (20, 14)
        crop_pct = rng.choice([0.5, 0.875, 0.95, 1.0])
        cfg = {"input_size": (3, *size), "mean": (0.5,) * 3, "std": (0.5,) * 3, "interpolation": mode,
               "crop_pct": crop_pct}
        if mode == "nearest":
            want = build_transform(cfg, False, output="uint8")(im)
        else:       # zoo predict's transform: PIL's resize, normalised with mean = std = 0.5
            want = (build_transform(cfg, False)(Image.fromarray(im.permute(1, 2, 0).numpy())) * 127.5 + 127.5)
        got = resample([im], [eval_plan(H, W, size, crop_pct)], size, mode)[0]
        _agree_with_pil(got, want.round().to(torch.uint8))


def test_images_of_one_size_go_through_in_chunks_in_their_own_places(monkeypatch):
    """Sizes are grouped and each group resampled in chunks (bounded memory); every image lands at its
    own position, the same as one at a time."""
    import finetune.data.geometry as geometry

    images = [_photo(*((30, 20) if k % 2 else (18, 26)), seed=k) for k in range(9)]
    plans = [crop_plan(k % 3, 1, 15, 14, (8, 8)) for k in range(9)]
    alone = torch.cat([resample([im], [p], (8, 8)) for im, p in zip(images, plans)])
    monkeypatch.setattr(geometry, "CHUNK_BYTES", 12 * 30 * 20 * 2)       # two images of 30x20 per product
    _agree(resample(images, plans, (8, 8)), alone)      # products of other shapes: BLAS may round apart
    assert resample([], [], (8, 8)).shape == (0, 3, 8, 8)
    with pytest.raises(ValueError, match="2 images but 1 plans"):
        resample(images[:2], plans[:1], (8, 8))


@pytest.mark.gpu
def test_resampling_on_cuda_matches_the_cpu():
    """The products on CUDA (cuBLAS, fp32) give the CPU's pixels but for rounding ties; mixed sizes."""
    if not torch.cuda.is_available():
        pytest.skip("no CUDA")
    rng = random.Random(3)
    images = [_photo(*((375, 500) if k % 2 else (rng.randint(200, 400), rng.randint(200, 400))), seed=k)
              for k in range(40)]
    plans = []
    for im in images:
        H, W = im.shape[-2:]
        h, w = rng.randint(H // 3, H), rng.randint(W // 3, W)
        plans.append(crop_plan(rng.randint(0, H - h), rng.randint(0, W - w), h, w, (224, 224)))
    for mode in ("bilinear", "bicubic"):
        cpu = resample(images, plans, (224, 224), mode)
        cuda = resample([im.cuda() for im in images], plans, (224, 224), mode)
        _agree(cuda.cpu(), cpu)


def test_the_axis_resampled_first_is_pils():
    """Pillow 13 resamples rows first when the height shrinks by more than twice the pixels the width does
    (python-pillow/Pillow#9549; checked against it: 398 random resizes); earlier Pillows columns first."""
    def plan(h, rh, w, rw):
        return crop_plan(0, 0, h, w, (rh, rw))
    assert rows_first(plan(100, 79, 100, 90)) == PIL_ROWS_FIRST     # 21 > 2 * 10
    assert not rows_first(plan(100, 80, 100, 90))                    # 20: not more than twice
    assert rows_first(plan(256, 224, 170, 224)) == PIL_ROWS_FIRST    # rows shrink, columns grow
    assert not rows_first(plan(170, 224, 256, 224)) and not rows_first(plan(80, 224, 100, 224))
