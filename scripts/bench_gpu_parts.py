#!/usr/bin/env python
"""Where the steady training rate goes on a GPU (issue 23): each part of a `zoo finetune` epoch of the
big job alone, in one process, as images/s, so that the slowest part names what holds the whole:

* the step: the bare ResNet-50 step on a float batch already on the device (SGD: the step ceiling of
  scripts/bench_gpu_e2e.py), then zoo's own step (``train_one_epoch``: zoo's default optimizer, its loss and
  metrics, the uint8 batch copied from pinned memory, flipped, jittered and normalised on the device);
* the loaders alone, no model (a pass after the first, as a later epoch reads): ``--decode workers``
  (zoo's training loader, the batches moved to the device and augmented there) and the workers' batches
  alone; ``--decode device`` (workers read the files, nvJPEG decodes, the batch is cropped on the GPU) at
  several worker shares (``finetune.data.decode.WORKER_SHARE``: the share of JPEGs the workers decode
  themselves, so both decoders work);
* nvJPEG alone (batches of 256 files already in memory) and the batched crop (``geometry.resample``).

    python3 scripts/bench_gpu_parts.py --data /tmp/zoo-e2e-work/big --out /tmp/parts   # on the GPU machine
    python3 scripts/bench_gpu_parts.py --device cpu --tiny --out /tmp/parts             # smoke test

Writes table.md and results.json in --out. scripts/gpu_checks.sh --parts runs it after the main checks.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Callable, Iterable

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

SHARES = (0.0, 0.25, 0.5)


def say(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def items_of(split: Path) -> tuple[list[tuple[str, int]], list[str]]:
    classes = sorted(p.name for p in split.iterdir() if p.is_dir())
    items = [(str(f), k) for k, c in enumerate(classes) for f in sorted((split / c).iterdir())]
    return items, classes


def host_cpu() -> dict:
    """The host's CPU: model, logical CPUs this process may use, cores and hyper-threads (from /proc/cpuinfo)."""
    import os

    info: dict = {"usable_cpus": len(os.sched_getaffinity(0))}
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return info
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key = key.strip()
        if key in ("model name", "siblings", "cpu cores") and key not in info:
            info[key] = value.strip()
    return info


def rate(passes: Callable[[], Iterable[int]], device: torch.device, repeats: int) -> dict:
    """images/s of each call of ``passes`` (an iterable of batch sizes, consumed); the first call is a
    warm-up (workers start, kernels load), the median of the others is the figure."""
    rates = []
    for k in range(repeats + 1):
        sync(device)
        t0 = time.perf_counter()
        n = sum(passes())
        sync(device)
        if k:
            rates.append(n / (time.perf_counter() - t0))
    return {"img_s": statistics.median(rates), "all": [round(r) for r in rates]}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, help="a folder with train/ and val/ class folders (default: generated)")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--device", default="cuda")
    p.add_argument("--tiny", action="store_true", help="tiny sizes: a smoke test of every part on the CPU")
    a = p.parse_args()
    a.out.mkdir(parents=True, exist_ok=True)
    device = torch.device(a.device)
    if device.type == "cuda":
        device = torch.device("cuda", torch.cuda.current_device())
    arch, batch, steps, repeats = ("test_resnet", 8, 3, 1) if a.tiny else ("resnet50", 256, 30, 2)
    data = a.data
    if data is None:
        import importlib.util

        spec = importlib.util.spec_from_file_location("scripts_bench_gpu", ROOT / "scripts" / "bench_gpu.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules["scripts_bench_gpu"] = module
        spec.loader.exec_module(module)      # type: ignore[union-attr]
        data = a.out / "data"
        if not (data / "train").is_dir():
            n, size = (48, (100, 75)) if a.tiny else (10_240, (500, 375))
            module.write_jpegs(data / "train", n, 4 if a.tiny else 20, size)
    items, classes = items_of(data / "train")
    if a.tiny:
        items = items[:48]

    import timm
    from timm.data import resolve_data_config

    from finetune.core.config import FinetuneConfig
    from finetune.core.optim import build_optimizer, build_scheduler
    from finetune.data import (ImageDataset, ImageSet, build_transform, close_loader, device_steps, make_loader,
                               set_loader_epoch)
    from finetune.data.decode import DevicePrefetcher, DeviceTransform, EncodedImageDataset
    from finetune.data.geometry import resample
    from finetune.engine.runtime import amp_policy, build_loss, to_device
    from finetune.engine.steps import train_one_epoch

    cuda = device.type == "cuda"
    res: dict = {"device": str(device), "arch": arch, "batch": batch, "images": len(items), "rows": [],
                 "host": host_cpu()}
    if cuda:
        res["gpu"] = torch.cuda.get_device_name(device)
    torch.backends.cudnn.benchmark = cuda

    def row(name: str, value: dict) -> None:
        value = {"name": name, **value}
        res["rows"].append(value)
        say(f"  {name}: {value.get('img_s', 0):,.0f} img/s {value.get('all', '')}")

    torch.manual_seed(0)
    model = timm.create_model(arch, num_classes=len(classes)).to(device)
    fmt = torch.channels_last if cuda else torch.contiguous_format
    model = model.to(memory_format=fmt).train()
    data_config = resolve_data_config({}, model=model)
    if a.tiny:
        data_config["input_size"] = (3, 32, 32)
    px = int(data_config["input_size"][-1])
    config = FinetuneConfig(batch_size=batch, workers=0 if a.tiny else -1, epochs=4, freeze="none",
                            head_epochs=0, warmup_epochs=0, ema=0)
    image_set = ImageSet(items, classes)

    # -- the step
    say("== the step")
    x = torch.randn(batch, 3, px, px, device=device).contiguous(memory_format=fmt)
    y = torch.randint(0, len(classes), (batch,), device=device)
    sgd = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)

    def bare() -> Iterable[int]:
        for _ in range(steps):
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cuda):
                loss = torch.nn.functional.cross_entropy(model(x).float(), y)
            sgd.zero_grad(set_to_none=True)
            loss.backward()
            sgd.step()
            yield batch

    row("step ceiling: SGD, float batch on the device", rate(bare, device, repeats))
    output, _, train_norm = device_steps(config, data_config, device)
    pin = cuda and torch.cuda.is_available()
    raw = torch.randint(0, 256, (batch, 3, px, px), dtype=torch.uint8)
    raw = raw.pin_memory() if pin else raw
    keys = torch.arange(batch, dtype=torch.int64) * 7919 + 1
    amp = amp_policy(device, True)
    loss_fn = build_loss(config, None, device)
    for opt_name in ("adam", "sgd"):
        cfg = config.replace(optimizer=opt_name)
        opt = build_optimizer(cfg, model, "fc")
        sched = build_scheduler(cfg, opt, 10_000)
        host = [((raw if train_norm is not None else raw.float()), y.cpu(), keys)] * steps

        def zoo_step() -> Iterable[int]:
            out = train_one_epoch(model, host, opt, sched, loss_fn, device, amp=amp, channels_last=cuda,
                                  normalize=train_norm)
            yield out["images"]

        row(f"zoo step (train_one_epoch, --optimizer {opt_name}, uint8 batch augmented on the device)",
            rate(zoo_step, device, repeats))

    # -- the loaders alone
    say("== the loaders alone (a pass after the first)")
    ds = ImageDataset(image_set, build_transform(data_config, True, config, output=output,
                                                  colour_on_device=train_norm is not None))
    loader = make_loader(ds, batch, train=True, workers=config.workers, device=device.type, seed=0)
    epoch = [0]

    def workers_pass(to_dev: bool) -> Callable[[], Iterable[int]]:
        def run() -> Iterable[int]:
            epoch[0] += 1
            set_loader_epoch(loader, 0, epoch[0])
            for b in loader:
                if b is None:
                    continue
                if to_dev:
                    to_device(*b[:2], device, cuda, train_norm, *b[2:3])
                yield int(b[1].shape[0])
        return run

    row(f"--decode workers: the loader alone ({loader.num_workers} workers)", rate(workers_pass(False), device,
                                                                                   repeats))
    row("--decode workers: the loader, batches moved and augmented on the device", rate(workers_pass(True), device,
                                                                                       repeats))
    full = loader.num_workers
    close_loader(loader)
    if full >= 4:        # how the workers scale: half of them (hyper-threads, memory bandwidth, the main process)
        loader = make_loader(ds, batch, train=True, workers=full // 2, device=device.type, seed=0)
        row(f"--decode workers: the loader alone ({loader.num_workers} workers)", rate(workers_pass(False), device,
                                                                                       repeats))
        close_loader(loader)
    dconfig = config.replace(decode="device")
    for share in SHARES:
        eds = EncodedImageDataset(image_set, build_transform(data_config, False, dconfig).min_size, worker_share=share)
        dl = make_loader(eds, batch, train=True, workers=config.workers, device=device.type, seed=0)
        pre = DevicePrefetcher(dl, DeviceTransform(data_config, True, dconfig), device, channels_last=cuda)

        def device_pass(dl=dl, pre=pre) -> Iterable[int]:
            epoch[0] += 1
            set_loader_epoch(dl, 0, epoch[0])
            for b in pre:
                if b is not None:
                    yield int(b[1].shape[0])

        row(f"--decode device, worker share {share:g}: the prefetcher alone", rate(device_pass, device, repeats))
        pre.close()

    # -- the decoder and the crop alone
    say("== nvJPEG and the batched crop alone")
    from torchvision.io import ImageReadMode, decode_jpeg

    files = [torch.frombuffer(bytearray(Path(f).read_bytes()), dtype=torch.uint8) for f, _ in items[:batch]]

    def nvjpeg() -> Iterable[int]:
        for _ in range(steps // 3 or 1):
            decode_jpeg(files, mode=ImageReadMode.RGB, device=device)
            yield len(files)

    row(f"decode_jpeg on {device.type}, batches of {len(files)} files in memory", rate(nvjpeg, device, repeats))

    def cpu_decode() -> Iterable[int]:
        for f in files[:64]:
            decode_jpeg(f, mode=ImageReadMode.RGB)
            yield 1

    row("decode_jpeg on one CPU core (libjpeg-turbo)", rate(cpu_decode, device, repeats))
    images = decode_jpeg(files, mode=ImageReadMode.RGB, device=device)
    transform = DeviceTransform(data_config, True, dconfig)
    plans = [transform._plan(im) for im in images]

    def crop() -> Iterable[int]:
        for _ in range(steps // 3 or 1):
            resample(images, plans, (px, px), transform.mode)
            yield len(images)

    row("geometry.resample: the batch's crops and resizes", rate(crop, device, repeats))

    say(f"host: {res['host']}")
    lines = [f"| part ({res.get('gpu', device.type)}, {arch}, batch {batch}, {len(items)} JPEGs) | images/s |",
             "|---|---|"]
    lines += [f"| {r['name']} | {r['img_s']:,.0f} |" for r in res["rows"]]
    table = "\n".join(lines) + "\n"
    (a.out / "table.md").write_text(table, encoding="utf-8")
    (a.out / "results.json").write_text(json.dumps(res, indent=1), encoding="utf-8")
    print(table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
