#!/usr/bin/env python
"""Per-core cost of a DataLoader worker's job on 500x375 JPEGs: PIL vs tensor (torchvision) pipelines.

What one worker does per image in `zoo finetune` (PIL decode, then v2 transforms on the PIL image, then
PILToTensor) against the same steps on a uint8 tensor (`torchvision.io.decode_jpeg` on the CPU, v2
transforms on tensors). One thread, synthetic photo-like JPEGs (quality 90), medians of repeats; all
variants run interleaved in one process, so compare them as ratios.

    .venv/bin/python scripts/bench_decode.py [--images 40] [--repeats 5] [--loader-workers N]

``--loader-workers N`` adds whole DataLoaders (N workers, batch 64, no model): the images/s the host
delivers with zoo's float (CPU) and uint8 (CUDA) pipelines, the latter with flip + jitter left to the GPU.
"""
from __future__ import annotations

import argparse
import io
import statistics
import time

import numpy as np
import torch
from PIL import Image
from torchvision.io import ImageReadMode, decode_jpeg
from torchvision.transforms import v2 as T


COLOUR_ON_DEVICE = "zoo ImageDataset, train, uint8 output, flip + jitter left to the GPU (CUDA default)"


def photos(n: int, seed: int = 0, size: tuple[int, int] = (500, 375)) -> list[bytes]:
    """``n`` photo-like JPEGs (q90) of ``size`` (width, height): smooth colour fields with noise."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        small = (rng.random((24, 32, 3)) * 255).astype(np.uint8)
        im = Image.fromarray(small).resize(size, Image.BICUBIC)
        arr = np.asarray(im).astype(np.int16) + rng.integers(-20, 20, (size[1], size[0], 3))
        buf = io.BytesIO()
        Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8)).save(buf, "JPEG", quality=90)
        out.append(buf.getvalue())
    return out


def pil_decode(data: bytes) -> Image.Image:
    with Image.open(io.BytesIO(data)) as im:
        im.load()
        return im.convert("RGB")


def tensor_decode(data: bytes) -> torch.Tensor:
    return decode_jpeg(torch.frombuffer(bytearray(data), dtype=torch.uint8), mode=ImageReadMode.RGB)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=40)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--loader-workers", type=int, default=0,
                    help="also time whole DataLoaders (no model) with this many workers, e.g. cores - 1")
    ap.add_argument("--loader-images", type=int, default=256)
    a = ap.parse_args()
    torch.set_num_threads(1)
    data = photos(a.images)
    jitter = dict(brightness=0.2, contrast=0.2)            # zoo finetune's defaults
    train = [T.RandomResizedCrop(224, scale=(0.35, 1.0), antialias=True), T.RandomHorizontalFlip()]
    evals = [T.Resize(256, antialias=True), T.CenterCrop(224)]
    variants = {
        "decode only: PIL": pil_decode,
        "decode only: decode_jpeg": tensor_decode,
        "train (crop, flip, jitter): PIL": lambda d, t=T.Compose(train + [T.ColorJitter(**jitter), T.PILToTensor()]): t(pil_decode(d)),
        "train (crop, flip, jitter): tensor": lambda d, t=T.Compose(train + [T.ColorJitter(**jitter)]): t(tensor_decode(d)),
        "train (crop, flip), jitter left to the GPU: tensor": lambda d, t=T.Compose(train): t(tensor_decode(d)),
        "eval (resize, centre crop): PIL": lambda d, t=T.Compose(evals + [T.PILToTensor()]): t(pil_decode(d)),
        "eval (resize, centre crop): tensor": lambda d, t=T.Compose(evals): t(tensor_decode(d)),
    }
    # zoo's own datasets on the same files: the float path (CPU runs: PIL) and the uint8 path (CUDA
    # runs: decode_jpeg + tensor transforms, normalised on the GPU), defaults of zoo finetune.
    import sys
    import tempfile
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from finetune.core.config import FinetuneConfig
    from finetune.data import ImageDataset, ImageSet, build_transform

    folder = Path(tempfile.mkdtemp(prefix="zoo-bench-decode-"))
    for i, d in enumerate(data):
        (folder / f"{i}.jpg").write_bytes(d)
    image_set = ImageSet([(str(folder / f"{i}.jpg"), 0) for i in range(len(data))], ["x"])
    dc = {"input_size": (3, 224, 224), "interpolation": "bilinear", "crop_pct": 0.875, "mean": (0.5,) * 3,
          "std": (0.5,) * 3}
    index = {d: i for i, d in enumerate(data)}
    for output in ("float", "uint8"):
        for train in (True, False):
            ds = ImageDataset(image_set, build_transform(dc, train, FinetuneConfig(), output=output))
            variants[f"zoo ImageDataset, {'train' if train else 'eval'}, {output} output"] = \
                lambda d, ds=ds: ds[index[d]]
    # what `zoo finetune` on CUDA runs in its workers since flip + jitter moved to the GPU (DeviceAugment)
    ds = ImageDataset(image_set, build_transform(dc, True, FinetuneConfig(), output="uint8", colour_on_device=True))
    variants[COLOUR_ON_DEVICE] = lambda d, ds=ds: ds[index[d]]
    rates: dict[str, list[float]] = {k: [] for k in variants}
    for _ in range(a.repeats):
        for name, fn in variants.items():
            t0 = time.perf_counter()
            for d in data:
                fn(d)
            rates[name].append(len(data) / (time.perf_counter() - t0))
    med = {k: statistics.median(v) for k, v in rates.items()}
    print("| worker job, one core, 500x375 JPEG | images/s |\n|---|---|")
    for k, v in med.items():
        print(f"| {k} | {v:.0f} |")
    print(f"\ntrain tensor / PIL: {med['train (crop, flip, jitter): tensor'] / med['train (crop, flip, jitter): PIL']:.2f}x; "
          f"without jitter in the worker: {med['train (crop, flip), jitter left to the GPU: tensor'] / med['train (crop, flip, jitter): PIL']:.2f}x; "
          f"eval: {med['eval (resize, centre crop): tensor'] / med['eval (resize, centre crop): PIL']:.2f}x")
    if a.loader_workers > 0:
        loaders(a, dc, folder, data)
    print(f"zoo ImageDataset uint8 / float: train "
          f"{med['zoo ImageDataset, train, uint8 output'] / med['zoo ImageDataset, train, float output']:.2f}x, eval "
          f"{med['zoo ImageDataset, eval, uint8 output'] / med['zoo ImageDataset, eval, float output']:.2f}x; "
          f"train with flip + jitter on the device / float: "
          f"{med[COLOUR_ON_DEVICE] / med['zoo ImageDataset, train, float output']:.2f}x "
          f"(/ uint8 with them in the worker: {med[COLOUR_ON_DEVICE] / med['zoo ImageDataset, train, uint8 output']:.2f}x)")


def loaders(a, dc: dict, folder, data: list[bytes]) -> None:
    """Images/s whole DataLoaders deliver (workers, collate, IPC; no model, nothing on a device): what the
    host can feed a GPU with ``a.loader_workers`` workers. Batch 64, train transforms, zoo's defaults."""
    from finetune.core.config import FinetuneConfig
    from finetune.data import ImageDataset, ImageSet, build_transform, make_loader

    torch.set_num_threads(1)
    n = a.loader_images
    image_set = ImageSet([(str(folder / f"{i % len(data)}.jpg"), 0) for i in range(n)], ["x"])
    cfg = FinetuneConfig()
    kinds = {
        "float": dict(output="float"),
        "uint8": dict(output="uint8"),
        "uint8, flip + jitter left to the GPU": dict(output="uint8", colour_on_device=True),
    }
    notes = {"float": " (PIL; CPU runs)", "uint8": " (tensor ops, flip + jitter in the workers)",
             "uint8, flip + jitter left to the GPU": " (CUDA default)"}
    built = {k: make_loader(ImageDataset(image_set, build_transform(dc, True, cfg, **kw)), 64, train=True,
                            workers=a.loader_workers, seed=0) for k, kw in kinds.items()}
    rates: dict[str, list[float]] = {k: [] for k in kinds}
    for r in range(a.repeats + 1):                  # the first pass starts the workers: not timed
        for k, loader in built.items():
            t0 = time.perf_counter()
            count = sum(len(b[1]) for b in loader if b is not None)
            if r:
                rates[k].append(count / (time.perf_counter() - t0))
    print(f"\n| DataLoader, {a.loader_workers} workers, batch 64, no model | images/s |\n|---|---|")
    med = {k: statistics.median(v) for k, v in rates.items()}
    for k, v in med.items():
        print(f"| {k}{notes[k]} | {v:.0f} |")
    print("loader ratios: " + ", ".join(f"{k} / float {v / med['float']:.2f}x" for k, v in med.items() if k != "float"))


if __name__ == "__main__":
    main()
