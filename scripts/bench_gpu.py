#!/usr/bin/env python
"""GPU benchmarks: ResNet-50 at 224 px, full finetune in bf16 with channels_last, on one GPU.

    python scripts/bench_gpu.py --out gpu.md          # the real run (under 5 minutes on one H100)
    python scripts/bench_gpu.py --device cpu --tiny   # smoke test of every code path on a CPU

No network is needed: the model is randomly initialised (timm ``resnet50``) and the JPEGs are generated
locally. Prints a JSON object and a markdown table; ``--out X.md`` writes the table to X.md and the JSON
to X.json. Measured (images/s, medians of repeats):

* the bare loop (synthetic tensors on the GPU; bf16 autocast, channels_last), also with a per-step host
  sync, fp32/TF32, without cudnn.benchmark and (``--compile``) under torch.compile;
* ``finetune.engine.train_one_epoch`` on the same tensors (our step);
* end to end from JPEG files: PIL decode + train transform in DataLoader workers (``make_loader``), for
  two worker counts; the same with uint8 batches normalised on the GPU; ``zoo finetune``'s own loader
  (``make_train_loader`` + ``finetune.data.device_steps``: uint8 batches, flip/jitter and normalisation on the
  GPU) with ``gpu_normalize`` on and off and with zoo's default jitter; and
  ``torchvision.io.decode_jpeg(device="cuda")`` with the crop/flip/normalise on the GPU;
* head-only: ``finetune.tools.train.fit`` (head only, cached features) for 20 epochs vs one no-grad forward pass (the floor) vs a plain
  loop re-running the backbone each epoch.
References: NVIDIA's PyTorch ResNet-50 ~2,470 img/s AMP on one A100; MLPerf ~7,000 img/s per H100 with
DALI. Target: >= 3,000 img/s end to end on one H100.
"""
from __future__ import annotations

import argparse
import copy
import datetime as _dt
import json
import multiprocessing as mp
import os
import statistics
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any, Callable, Iterable

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("TQDM_DISABLE", "1")

import torch  # noqa: E402
from torch import nn  # noqa: E402

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def say(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


# ------------------------------------------------------------------------------------------ data
def _write_one(args: tuple[str, int, int, int]) -> None:
    """One JPEG of ImageNet-like size and entropy: smooth random colour fields plus noise and edges."""
    import numpy as np
    from PIL import Image, ImageDraw

    path, w, h, seed = args
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, size=(rng.integers(4, 12), rng.integers(4, 12), 3), dtype=np.uint8)
    im = Image.fromarray(small).resize((w, h), Image.BICUBIC)
    a = np.asarray(im).astype(np.int16) + rng.integers(-20, 21, size=(h, w, 3), dtype=np.int16)
    im = Image.fromarray(a.clip(0, 255).astype(np.uint8))
    d = ImageDraw.Draw(im)
    for _ in range(6):
        x0, y0 = int(rng.integers(0, w)), int(rng.integers(0, h))
        d.rectangle([x0, y0, x0 + int(rng.integers(10, w // 2)), y0 + int(rng.integers(10, h // 2))],
                    outline=tuple(int(v) for v in rng.integers(0, 256, 3)), width=3)
    im.save(path, quality=90)


def write_jpegs(root: Path, n: int, classes: int, size: tuple[int, int]) -> list[tuple[str, int]]:
    """``n`` JPEGs of about ``size`` (w, h) pixels under root/c<k>/, written in parallel."""
    import random

    rng = random.Random(0)
    jobs, items = [], []
    for i in range(n):
        w = int(size[0] * rng.uniform(0.8, 1.2))
        h = int(size[1] * rng.uniform(0.8, 1.2))
        path = root / f"c{i % classes}" / f"img_{i:05d}.jpg"
        path.parent.mkdir(parents=True, exist_ok=True)
        jobs.append((str(path), w, h, i))
        items.append((str(path), i % classes))
    with mp.get_context("fork").Pool(max(1, cores())) as pool:
        pool.map(_write_one, jobs, chunksize=32)
    return items


class FileBytes(torch.utils.data.Dataset):
    """(encoded JPEG bytes, label): workers only read files; decoding is on the GPU. Plain ``bytes`` go
    through the worker queue pickled: one shared-memory tensor per image would need one file descriptor
    each (torch's default sharing strategy) and runs out of them."""

    def __init__(self, items: list[tuple[str, int]]) -> None:
        self.items = items

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int):
        path, y = self.items[i]
        with open(path, "rb") as fh:
            return fh.read(), y


def collate_bytes(batch):
    return [b for b, _ in batch], torch.tensor([y for _, y in batch], dtype=torch.int64)


class GpuDecode:
    """Batches of JPEG bytes -> decoded on the device (nvjpeg) -> random resized crop + flip (per image)
    -> normalised bf16-ready float batch in channels_last."""

    def __init__(self, device: torch.device, size: int, scale: tuple[float, float] = (0.08, 1.0)) -> None:
        self.device, self.size, self.scale = device, size, scale
        self.mean = torch.tensor(MEAN, device=device).view(1, 3, 1, 1) * 255
        self.std = torch.tensor(STD, device=device).view(1, 3, 1, 1) * 255
        self.gen = torch.Generator().manual_seed(0)

    def __call__(self, data: list[torch.Tensor], labels: torch.Tensor):
        import torch.nn.functional as F
        from torchvision.io import ImageReadMode, decode_jpeg
        from torchvision.transforms import v2 as T

        encoded = [torch.frombuffer(bytearray(b), dtype=torch.uint8) for b in data]
        if self.device.type == "cuda":
            # nvJPEG's hardware decoder writes its output before work queued on the stream has run: a
            # block the allocator just recycled gets overwritten under a running kernel (NaN losses in
            # the first runs of this variant; pytorch/vision#9606). Drain the stream first.
            torch.cuda.current_stream(self.device).synchronize()
        imgs = decode_jpeg(encoded, mode=ImageReadMode.RGB, device=self.device)
        out = torch.empty((len(imgs), 3, self.size, self.size), device=self.device, dtype=torch.float32)
        flips = torch.rand(len(imgs), generator=self.gen) < 0.5
        for i, im in enumerate(imgs):
            top, left, h, w = T.RandomResizedCrop.get_params(im, scale=list(self.scale), ratio=[3 / 4, 4 / 3])
            crop = im[:, top:top + h, left:left + w].unsqueeze(0).float()
            r = F.interpolate(crop, size=(self.size, self.size), mode="bilinear", antialias=True,
                              align_corners=False)
            out[i] = r[0].flip(-1) if flips[i] else r[0]
        x = ((out - self.mean) / self.std).contiguous(memory_format=torch.channels_last)
        return x, labels.to(self.device, non_blocking=True)


class UInt8Transform:
    """Decode + random resized crop + flip in the worker, kept as uint8 (4x fewer bytes through the
    worker queue and the PCIe link than float32); normalised on the device."""

    def __init__(self, size: int) -> None:
        from torchvision.transforms import v2 as T

        self.pipeline = T.Compose([T.RandomResizedCrop(size, scale=(0.08, 1.0), antialias=True),
                                   T.RandomHorizontalFlip(), T.PILToTensor()])
        self.min_size = size

    def __call__(self, im):
        return self.pipeline(im)


class NormaliseOnDevice:
    def __init__(self, loader, device: torch.device) -> None:
        self.loader, self.device = loader, device
        self.mean = torch.tensor(MEAN, device=device).view(1, 3, 1, 1) * 255
        self.std = torch.tensor(STD, device=device).view(1, 3, 1, 1) * 255

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self):
        for batch in self.loader:
            if batch is None:
                continue
            x, y = batch
            x = x.to(self.device, non_blocking=True).float()
            x = ((x - self.mean) / self.std).contiguous(memory_format=torch.channels_last)
            yield x, y.to(self.device, non_blocking=True)


class MapLoader:
    def __init__(self, loader, fn: Callable) -> None:
        self.loader, self.fn = loader, fn

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self):
        for data, labels in self.loader:
            yield self.fn(data, labels)


# ------------------------------------------------------------------------------------------ steps
def make_model(arch: str, device: torch.device, classes: int = 1000) -> nn.Module:
    import timm

    torch.manual_seed(0)
    model = timm.create_model(arch, num_classes=classes, pretrained=False)
    return model.to(device).to(memory_format=torch.channels_last).train()


def synthetic(device: torch.device, batch: int, size: int, classes: int, n: int = 4):
    g = torch.Generator(device="cpu").manual_seed(0)
    out = []
    for _ in range(n):
        x = torch.randn(batch, 3, size, size, generator=g).to(device).contiguous(memory_format=torch.channels_last)
        out.append((x, torch.randint(0, classes, (batch,), generator=g).to(device)))
    return out


def bare_loop(model, batches: Iterable, opt, amp: torch.dtype | None, host_sync: bool = False) -> int:
    loss_fn = nn.CrossEntropyLoss()
    n = 0
    dev = next(model.parameters()).device
    for x, y in batches:
        with torch.autocast(dev.type, dtype=amp or torch.float32, enabled=amp is not None):
            out = model(x)
        loss = loss_fn(out.float(), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if host_sync:
            bool(torch.isfinite(loss))
        n += int(y.shape[0])
    return n


def timed(fn: Callable[[], int], device: torch.device, repeats: int) -> tuple[float, list[float]]:
    """Median images/s over ``repeats`` calls of ``fn`` (which returns the images it processed)."""
    rates = []
    for _ in range(repeats):
        sync(device)
        t0 = time.perf_counter()
        n = fn()
        sync(device)
        rates.append(n / (time.perf_counter() - t0))
    return statistics.median(rates), rates


def bench_steps(a, device: torch.device) -> dict[str, Any]:
    from finetune.core.config import FinetuneConfig
    from finetune.engine import amp_policy, train_one_epoch
    from finetune.core.optim import build_optimizer, build_scheduler

    amp = torch.bfloat16 if a.amp else None     # the bare loop's own autocast dtype
    policy = amp_policy(device, a.amp)           # what train_one_epoch gets (zoo's one AMP policy)
    data = synthetic(device, a.batch, a.size, 1000)
    epoch = data * max(1, a.steps // len(data))
    res: dict[str, Any] = {}

    def sgd(m):
        return torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-5)

    variants: dict[str, Callable[[], Callable[[], int]]] = {}

    def bare(host_sync=False, dtype=amp, bench=True):
        def setup():
            torch.backends.cudnn.benchmark = bench
            m = make_model(a.arch, device)
            opt = sgd(m)
            bare_loop(m, data[:2], opt, dtype)  # warm-up (cudnn autotune, allocator)
            return lambda: bare_loop(m, epoch, opt, dtype, host_sync)
        return setup

    def ours():
        torch.backends.cudnn.benchmark = True
        m = make_model(a.arch, device)
        config = FinetuneConfig(optimizer="sgd", lr=0.1, momentum=0.9, weight_decay=5e-5, backbone_lr_mult=1.0,
                                schedule="cosine", amp=a.amp, epochs=10)
        opt = build_optimizer(config, m, "fc")
        sched = build_scheduler(config, opt, 10_000)
        loss_fn = nn.CrossEntropyLoss()
        train_one_epoch(m, data[:2], opt, sched, loss_fn, device, amp=policy, channels_last=True)
        return lambda: train_one_epoch(m, epoch, opt, sched, loss_fn, device, amp=policy,
                                       channels_last=True)["images"]

    variants["bare loop"] = bare()
    variants["finetune.engine.train_one_epoch"] = ours
    variants["bare loop + per-step host sync"] = bare(host_sync=True)
    variants["bare loop, fp32/TF32 (no autocast)"] = bare(dtype=None)
    variants["bare loop, cudnn.benchmark off"] = bare(bench=False)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    for name, setup in variants.items():
        try:
            fn = setup()
            ips, runs = timed(fn, device, a.repeats)
            res[name] = {"images_per_s": ips, "runs": runs}
            say(f"step  {name:55s} {ips:9.1f} img/s")
        except Exception as e:  # noqa: BLE001 - e.g. out of memory for one variant
            res[name] = {"error": f"{type(e).__name__}: {e}"}
            say(f"step  {name}: {res[name]['error']}")
        finally:
            if device.type == "cuda":
                torch.cuda.empty_cache()
    torch.backends.cudnn.benchmark = True
    return res


def bench_compile(a, device: torch.device) -> dict[str, Any]:
    amp = torch.bfloat16 if a.amp else None
    data = synthetic(device, a.batch, a.size, 1000)
    epoch = data * max(1, a.steps // len(data))
    m = make_model(a.arch, device)
    opt = torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9)
    cm = torch.compile(m)
    t0 = time.perf_counter()
    bare_loop(cm, data[:2], opt, amp)
    sync(device)
    compile_s = time.perf_counter() - t0
    ips, runs = timed(lambda: bare_loop(cm, epoch, opt, amp), device, a.repeats)
    say(f"step  bare loop under torch.compile: {ips:.1f} img/s (compile + first steps {compile_s:.0f} s)")
    return {"images_per_s": ips, "runs": runs, "compile_seconds": compile_s}


# ------------------------------------------------------------------------------------------ end to end
def bench_e2e(a, device: torch.device, items: list[tuple[str, int]]) -> dict[str, Any]:
    from finetune.core.config import FinetuneConfig
    from finetune.data import ImageDataset, ImageSet, build_transform, make_loader
    from finetune.data import device_steps, set_loader_epoch
    from finetune.engine import amp_policy, train_one_epoch
    from finetune.core.optim import build_optimizer, build_scheduler

    amp = amp_policy(device, a.amp)
    classes = sorted({f"c{y}" for _, y in items})
    image_set = ImageSet(items, classes)
    data_config = {"input_size": (3, a.size, a.size), "interpolation": "bilinear", "crop_pct": 0.875,
                   "mean": MEAN, "std": STD}
    config = FinetuneConfig(optimizer="sgd", lr=0.01,  # random labels on random init: 0.1 diverged in the nvjpeg variant
                            momentum=0.9, weight_decay=5e-5, backbone_lr_mult=1.0,
                            schedule="none", amp=a.amp, batch_size=a.batch, crop_scale_min=0.08,
                            brightness=0.0, contrast=0.0)
    torch.backends.cudnn.benchmark = True
    model = make_model(a.arch, device, len(classes))
    opt = build_optimizer(config, model, "fc")
    sched = build_scheduler(config, opt, 10_000)
    loss_fn = nn.CrossEntropyLoss()
    train_one_epoch(model, synthetic(device, a.batch, a.size, len(classes), 2), opt, sched, loss_fn, device,
                    amp=amp, channels_last=True)

    def run(loader, normalize=None) -> float:
        # Epoch 1 warms up (worker start, cudnn, nvjpeg); epochs 2.. are timed.
        train_one_epoch(model, loader, opt, sched, loss_fn, device, amp=amp, channels_last=True,
                        normalize=normalize)
        rates = []
        for e in range(a.e2e_epochs):
            set_loader_epoch(loader, 0, e + 2)   # fit's per-epoch reseeding (a no-op for plain loaders)
            sync(device)
            t0 = time.perf_counter()
            r = train_one_epoch(model, loader, opt, sched, loss_fn, device, amp=amp, channels_last=True,
                                normalize=normalize)
            sync(device)
            rates.append(r["images"] / (time.perf_counter() - t0))
        return statistics.median(rates)

    res: dict[str, Any] = {"images": len(items), "workers_tried": a.workers}

    def measure(name: str, build: Callable, normalize=None) -> None:
        """res[name] = images/s of the loader that build() makes (its workers end with it), or the error."""
        try:
            res[name] = run(build(), normalize)
        except Exception as e:  # noqa: BLE001
            res[name] = f"error: {type(e).__name__}: {e}"
        say(f"e2e   {name:60s} {res[name]}")

    ds = ImageDataset(image_set, build_transform(data_config, True, config))
    for w in a.workers:
        measure(f"PIL decode + float transform in {w} workers (make_loader)",
                lambda w=w: make_loader(ds, a.batch, train=True, workers=w, device=str(device), seed=0))
    w = max(a.workers)
    measure(f"PIL decode, uint8 batches in {w} workers, normalise on device",
            lambda: NormaliseOnDevice(make_loader(ImageDataset(image_set, UInt8Transform(a.size)), a.batch,
                                                  train=True, workers=w, device=str(device), seed=0), device))
    def make_train_loader(dataset, cfg, device):   # fit's training loader (engine.build_setup's)
        return make_loader(dataset, cfg.batch_size, train=True, workers=cfg.workers, device=device,
                           sampler=cfg.sampler, seed=cfg.seed)

    # What `zoo finetune` itself runs: fit's loader (make_loader(train=True)) on the transform it builds and the
    # device steps it picks (data.device_steps: on CUDA uint8 batches, flip/jitter + normalisation on the
    # GPU), the same with gpu_normalize off, and with zoo's default colour jitter (0.2/0.2: the rows
    # above have none, as in runs 1-3).
    for label, cfg_w in (("uint8 batches, flip on the GPU", config.replace(workers=w)),
                         ("float batches, gpu_normalize off", config.replace(workers=w, gpu_normalize=False)),
                         ("uint8 batches, default jitter 0.2/0.2 + flip on the GPU",
                          config.replace(workers=w, brightness=0.2, contrast=0.2))):
        output, _, train_norm = device_steps(cfg_w, data_config, device)
        measure(f"zoo finetune loader (make_train_loader, {label}) in {w} workers",
                lambda cfg_w=cfg_w, output=output: make_train_loader(
                    ImageDataset(image_set, build_transform(data_config, True, cfg_w, output=output,
                                                            colour_on_device=train_norm is not None)), cfg_w,
                    device=device.type),
                train_norm)
    # `zoo finetune --decode device`: workers read files, JPEGs decoded + augmented on the device in a
    # prefetch thread on its own stream (finetune.data.decode).
    from finetune.data.decode import DevicePrefetcher, DeviceTransform, EncodedImageDataset

    cfg_d = config.replace(workers=w, decode="device")
    measure(f"zoo finetune loader, --decode device ({w} workers read files)",
            lambda: DevicePrefetcher(make_train_loader(EncodedImageDataset(image_set, build_transform(
                data_config, False, cfg_d).min_size), cfg_d, device=device.type),
                DeviceTransform(data_config, True, cfg_d), device, channels_last=True))
    measure(f"torchvision.io.decode_jpeg on {device.type} ({w} workers read files)",
            lambda: MapLoader(torch.utils.data.DataLoader(
                FileBytes(items), batch_size=a.batch, shuffle=True, num_workers=w, collate_fn=collate_bytes,
                drop_last=True, persistent_workers=w > 0, prefetch_factor=4 if w else None),
                GpuDecode(device, a.size)))
    return res


# ------------------------------------------------------------------------------------------ head-only
def bench_head(a, device: torch.device, items: list[tuple[str, int]]) -> dict[str, Any]:
    from finetune.core.config import FinetuneConfig
    from finetune.data import ImageDataset, ImageSet, build_transform, make_loader
    from finetune.core.surgery import replace_head
    from finetune.tools.train import fit

    classes = sorted({f"c{y}" for _, y in items})
    n_val = len(items) // 5
    train, val = ImageSet(items[n_val:], classes), ImageSet(items[:n_val], classes)
    data_config = {"input_size": (3, a.size, a.size), "interpolation": "bilinear", "crop_pct": 0.875,
                   "mean": MEAN, "std": STD}
    config = FinetuneConfig(epochs=a.head_epochs, patience=10_000, batch_size=a.batch, lr=1e-3,
                            schedule="none", amp=a.amp, workers=max(a.workers), augment="none",
                            head_solver="gradient")   # the same Adam epochs as the plain loop
    model = make_model(a.arch, device, 1000)
    replace_head(model, "fc", len(classes))
    model.to(device)
    for n, p in model.named_parameters():
        p.requires_grad_(n.startswith("fc."))
    amp = torch.bfloat16 if a.amp else None
    tf = build_transform(data_config, False, config)

    def floor() -> float:
        model.eval()
        t0 = time.perf_counter()
        with torch.no_grad(), torch.autocast(device.type, dtype=amp or torch.float32, enabled=amp is not None):
            for s in (train, val):
                for batch in make_loader(ImageDataset(s, tf), a.batch, train=False, workers=max(a.workers),
                                         device=str(device)):
                    x = batch[0].to(device, non_blocking=True).contiguous(memory_format=torch.channels_last)
                    model(x)
        sync(device)
        return time.perf_counter() - t0

    floor()  # warm-up
    floor_s = statistics.median(floor() for _ in range(a.repeats))
    say(f"head  floor (one no-grad pass over {len(items)} images): {floor_s:.2f} s")
    fast_runs = []
    for _ in range(a.repeats):
        m = copy.deepcopy(model)
        sync(device)
        t0 = time.perf_counter()
        fit(m, [[n] for n, _ in m.named_children() if n != "fc"], data_config, train, val,
            config.replace(freeze="head", quiet=True, device=str(device)), head="fc", reset_head=False)
        sync(device)
        fast_runs.append(time.perf_counter() - t0)
    fast_s = statistics.median(fast_runs)
    say(f"head  fit, head only on cached features, {a.head_epochs} epochs: {fast_s:.2f} s")

    # The plain loop: the frozen backbone re-run on every batch of every epoch (+ validation).
    m = copy.deepcopy(model)
    opt = torch.optim.Adam(m.fc.parameters(), lr=1e-3)
    loss_fn = nn.CrossEntropyLoss()
    tl = make_loader(ImageDataset(train, tf), a.batch, train=True, workers=max(a.workers), device=str(device))
    vl = make_loader(ImageDataset(val, tf), a.batch, train=False, workers=max(a.workers), device=str(device))
    epochs = a.head_epochs if a.plain_epochs <= 0 else min(a.plain_epochs, a.head_epochs)
    sync(device)
    t0 = time.perf_counter()
    for _ in range(epochs):
        m.eval()
        m.fc.train()
        for x, y in tl:
            x = x.to(device, non_blocking=True).contiguous(memory_format=torch.channels_last)
            with torch.autocast(device.type, dtype=amp or torch.float32, enabled=amp is not None):
                out = m(x)
            loss = loss_fn(out.float(), y.to(device))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        m.eval()
        with torch.no_grad(), torch.autocast(device.type, dtype=amp or torch.float32, enabled=amp is not None):
            for x, _ in vl:
                m(x.to(device, non_blocking=True).contiguous(memory_format=torch.channels_last))
    sync(device)
    plain_s = (time.perf_counter() - t0) * a.head_epochs / epochs
    note = "" if epochs == a.head_epochs else f" (measured {epochs} epochs, scaled to {a.head_epochs})"
    say(f"head  plain loop: {plain_s:.2f} s{note}")
    return {"train_images": len(train.items), "val_images": len(val.items), "epochs": a.head_epochs,
            "floor_s": floor_s, "fast_s": fast_s, "fast_runs": fast_runs, "plain_s": plain_s,
            "plain_note": note.strip(), "ratio_fast_over_floor": fast_s / floor_s,
            "ratio_plain_over_fast": plain_s / fast_s}


# ------------------------------------------------------------------------------------------ report
def markdown(res: dict[str, Any]) -> str:
    m = res["machine"]
    lines = ["## GPU (measured by `scripts/bench_gpu.py`)", "",
             f"{m['gpu']}; {m['cores']} CPU cores ({m['cpu']}); torch {m['torch']}, torchvision "
             f"{m['torchvision']}, timm {m['timm']}, CUDA {m['cuda']}, cuDNN {m['cudnn']}; {m['date']}.",
             f"Model {res['config']['arch']} (random init) at {res['config']['size']} px, batch "
             f"{res['config']['batch']}, {'bf16 autocast' if res['config']['amp'] else 'fp32'}, channels_last, "
             "SGD momentum. Medians of repeats.", "",
             "| measurement | images/s |", "|---|---|"]
    for name, v in res.get("steps", {}).items():
        lines.append(f"| {name} | {v.get('images_per_s', float('nan')):.0f} |" if "images_per_s" in v
                     else f"| {name} | {v.get('error')} |")
    c = res.get("compile")
    if c:
        lines.append(f"| bare loop under torch.compile (compile {c['compile_seconds']:.0f} s) | "
                     f"{c['images_per_s']:.0f} |")
    for name, v in res.get("e2e", {}).items():
        if name in ("images", "workers_tried"):
            continue
        lines.append(f"| end to end: {name} | {v:.0f} |" if isinstance(v, float) else f"| end to end: {name} | {v} |")
    r = res.get("ratios", {})
    lines += ["", *[f"- {k}: **{v:.3f}**" if isinstance(v, float) else f"- {k}: {v}" for k, v in r.items()]]
    h = res.get("head")
    if h:
        lines += ["", f"Head-only ({h['train_images']} train + {h['val_images']} val JPEGs, {h['epochs']} epochs): "
                  f"floor {h['floor_s']:.2f} s, `fit` head-only (cached) {h['fast_s']:.2f} s, plain loop "
                  f"{h['plain_s']:.2f} s {h['plain_note']}; fast/floor **{h['ratio_fast_over_floor']:.2f}** "
                  f"(target <= 1.5), plain/fast **{h['ratio_plain_over_fast']:.1f}x** (target >= 5)."]
    if res.get("errors"):
        lines += ["", "Failed sections: " + "; ".join(f"{k}: {v}" for k, v in res["errors"].items())]
    lines += ["", "References: NVIDIA's PyTorch ResNet-50 ~2,470 img/s AMP on one A100; MLPerf ~7,000 img/s per "
              "H100 with DALI. Target: >= 3,000 img/s end to end on one H100."]
    return "\n".join(lines) + "\n"


def machine(device: torch.device) -> dict[str, Any]:
    import timm
    import torchvision

    from scripts.bench import cpu_name

    cpu = cpu_name()
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else "no GPU (CPU smoke run)"
    return {"gpu": gpu, "cpu": cpu, "cores": cores(), "torch": torch.__version__,
            "torchvision": torchvision.__version__, "timm": timm.__version__,
            "cuda": torch.version.cuda, "cudnn": torch.backends.cudnn.version() if torch.cuda.is_available() else None,
            "date": _dt.datetime.now().astimezone().isoformat(timespec="seconds")}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, help="write the markdown here (and the JSON beside it, .json)")
    p.add_argument("--device", default="cuda")
    p.add_argument("--tiny", action="store_true", help="tiny sizes: a smoke test of every code path")
    p.add_argument("--arch", default="resnet50")
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--steps", type=int, default=40, help="optimizer steps per timed step measurement")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--images", type=int, default=12_288, help="JPEGs generated for the end-to-end runs")
    p.add_argument("--head-images", type=int, default=5_000, help="JPEGs used by the head-only benchmark")
    p.add_argument("--e2e-epochs", type=int, default=2, help="timed epochs per end-to-end variant")
    p.add_argument("--head-epochs", type=int, default=20)
    p.add_argument("--plain-epochs", type=int, default=0, help="cap the plain head loop (scaled up); 0 = all")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--no-amp", dest="amp", action="store_false")
    p.add_argument("--only", default="", help="comma list of sections to run (steps,e2e,head,compile); default all")
    p.add_argument("--budget", type=float, default=270.0, help="seconds; optional sections are skipped past it")
    a = p.parse_args()
    if a.tiny:
        a.arch, a.batch, a.size, a.steps, a.repeats = "resnet18", 8, 64, 2, 1
        a.images, a.head_images, a.e2e_epochs, a.head_epochs, a.plain_epochs = 48, 32, 1, 3, 1
        a.compile = False
    device = torch.device(a.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print(json.dumps({"error": "no CUDA device; use --device cpu --tiny for a smoke run"}))
        return 1
    n = cores()
    a.workers = sorted({min(8, max(1, n - 1)), max(1, n - 1)})
    a.amp = a.amp and (device.type == "cuda")
    t_all = time.perf_counter()
    res: dict[str, Any] = {"machine": machine(device), "errors": {},
                           "config": {k: (v if isinstance(v, (int, float, str, bool, list)) else str(v))
                                      for k, v in vars(a).items()}}
    with tempfile.TemporaryDirectory(prefix="zoo-bench-gpu-") as tmp_s:
        tmp = Path(tmp_s)
        t0 = time.perf_counter()
        items = write_jpegs(tmp / "jpegs", a.images, 10, (500, 375))
        res["jpeg_generation_s"] = time.perf_counter() - t0
        say(f"wrote {len(items)} JPEGs in {res['jpeg_generation_s']:.1f} s")
        sections: list[tuple[str, Callable[[], Any], bool]] = [
            ("steps", lambda: bench_steps(a, device), False),
            ("e2e", lambda: bench_e2e(a, device, items), False),
            ("head", lambda: bench_head(a, device, items[:a.head_images]), False),
            ("compile", lambda: bench_compile(a, device), True),
        ]
        for name, fn, optional in sections:
            if (name == "compile" and not a.compile) or (a.only and name not in a.only.split(",")):
                continue
            if optional and time.perf_counter() - t_all > a.budget:
                res["errors"][name] = f"skipped: past the {a.budget:.0f} s budget"
                continue
            try:
                res[name] = fn()
            except Exception as e:  # noqa: BLE001 - one failed section must not lose the others
                traceback.print_exc()
                res["errors"][name] = f"{type(e).__name__}: {e}"
            if device.type == "cuda":
                torch.cuda.empty_cache()
    steps = res.get("steps", {})
    bare = steps.get("bare loop", {}).get("images_per_s")
    ours = steps.get("finetune.engine.train_one_epoch", {}).get("images_per_s")
    ratios: dict[str, Any] = {}
    if bare and ours:
        ratios["train_one_epoch / bare loop (target >= 0.9)"] = ours / bare
    e2e = {k: v for k, v in res.get("e2e", {}).items() if isinstance(v, float)}
    if e2e and ours:
        best = max(e2e, key=e2e.get)
        ratios["best end to end / our step on synthetic tensors"] = e2e[best] / ours
        ratios["best end to end variant"] = f"{best}: {e2e[best]:.0f} img/s (target >= 3,000 on one H100)"
    res["ratios"] = ratios
    res["total_s"] = time.perf_counter() - t_all
    md = markdown(res)
    print(json.dumps(res, indent=2, default=str))
    print(md)
    if a.out:
        a.out.write_text(md)
        a.out.with_suffix(".json").write_text(json.dumps(res, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
