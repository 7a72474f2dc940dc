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


class Bench:
    """What every part shares: the device, the sizes, the images, the zoo config, and the rows measured."""

    def __init__(self, a: argparse.Namespace) -> None:
        from finetune.core.config import FinetuneConfig
        from finetune.data import ImageSet

        self.device = torch.device(a.device)
        if self.device.type == "cuda":
            self.device = torch.device("cuda", torch.cuda.current_device())
        self.cuda = self.device.type == "cuda"
        self.arch, self.batch, self.steps, self.repeats = (("test_resnet", 8, 3, 1) if a.tiny
                                                           else ("resnet50", 256, 30, 2))
        self.items, self.classes = items_of(training_folder(a))
        if a.tiny:
            self.items = self.items[:48]
        self.image_set = ImageSet(self.items, self.classes)
        self.config = FinetuneConfig(batch_size=self.batch, workers=0 if a.tiny else -1, epochs=4, freeze="none",
                                     head_epochs=0, warmup_epochs=0, ema=0)
        self.tiny = a.tiny
        self.epoch = 0
        self.res: dict = {"device": str(self.device), "arch": self.arch, "batch": self.batch,
                          "images": len(self.items), "rows": [], "host": host_cpu()}
        if self.cuda:
            self.res["gpu"] = torch.cuda.get_device_name(self.device)
        torch.backends.cudnn.benchmark = self.cuda

    def row(self, name: str, passes: Callable[[], Iterable[int]]) -> None:
        value = {"name": name, **rate(passes, self.device, self.repeats)}
        self.res["rows"].append(value)
        say(f"  {name}: {value['img_s']:,.0f} img/s {value['all']}")

    def next_epoch(self, loader) -> None:
        from finetune.data import set_loader_epoch

        self.epoch += 1
        set_loader_epoch(loader, 0, self.epoch)


def training_folder(a: argparse.Namespace) -> Path:
    """--data's train/ folder, or one generated like bench_gpu_e2e's big job (10,240 JPEGs of 500x375)."""
    if a.data is not None:
        return a.data / "train"
    import importlib.util

    spec = importlib.util.spec_from_file_location("scripts_bench_gpu", ROOT / "scripts" / "bench_gpu.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["scripts_bench_gpu"] = module
    spec.loader.exec_module(module)      # type: ignore[union-attr]
    folder = a.out / "data" / "train"
    if not folder.is_dir():
        n, size = (48, (100, 75)) if a.tiny else (10_240, (500, 375))
        module.write_jpegs(folder, n, 4 if a.tiny else 20, size)
    return folder


def step_rows(b: Bench) -> dict:
    """The bare step (the ceiling) and zoo's step on host uint8 batches; returns the model's data config."""
    import timm
    from timm.data import resolve_data_config

    from finetune.core.optim import build_optimizer, build_scheduler
    from finetune.data import device_steps
    from finetune.engine.runtime import amp_policy, build_loss
    from finetune.engine.steps import train_one_epoch

    say("== the step")
    dev, cuda = b.device, b.cuda
    torch.manual_seed(0)
    fmt = torch.channels_last if cuda else torch.contiguous_format
    model = timm.create_model(b.arch, num_classes=len(b.classes)).to(dev).to(memory_format=fmt).train()
    data_config = resolve_data_config({}, model=model)
    if b.tiny:
        data_config["input_size"] = (3, 32, 32)
    px = int(data_config["input_size"][-1])
    x = torch.randn(b.batch, 3, px, px, device=dev).contiguous(memory_format=fmt)
    y = torch.randint(0, len(b.classes), (b.batch,), device=dev)
    sgd = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)

    def bare() -> Iterable[int]:
        for _ in range(b.steps):
            with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=cuda):
                loss = torch.nn.functional.cross_entropy(model(x).float(), y)
            sgd.zero_grad(set_to_none=True)
            loss.backward()
            sgd.step()
            yield b.batch

    b.row("step ceiling: SGD, float batch on the device", bare)
    _, _, train_norm = device_steps(b.config, data_config, dev)
    raw = torch.randint(0, 256, (b.batch, 3, px, px), dtype=torch.uint8)
    raw = raw.pin_memory() if cuda else raw
    keys = torch.arange(b.batch, dtype=torch.int64) * 7919 + 1
    host = [((raw if train_norm is not None else raw.float()), y.cpu(), keys)] * b.steps
    for name in ("adam", "sgd"):
        cfg = b.config.replace(optimizer=name)
        opt = build_optimizer(cfg, model, "fc")
        sched = build_scheduler(cfg, opt, 10_000)

        def zoo_step(cfg=cfg, opt=opt, sched=sched) -> Iterable[int]:
            yield train_one_epoch(model, host, opt, sched, build_loss(cfg, None, dev), dev, amp=amp_policy(dev, True),
                                  channels_last=cuda, normalize=train_norm)["images"]

        b.row(f"zoo step (train_one_epoch, --optimizer {name}, uint8 batch augmented on the device)", zoo_step)
    return data_config


def loader_rows(b: Bench, data_config: dict) -> None:
    """The workers' loader (all workers, half of them, with its device work) and the device path's
    prefetcher at each worker share: a pass after the first, no model."""
    from finetune.data import ImageDataset, build_transform, close_loader, device_steps, make_loader
    from finetune.data.decode import DevicePrefetcher, DeviceTransform, EncodedImageDataset
    from finetune.engine.runtime import to_device

    say("== the loaders alone (a pass after the first)")
    dev = b.device
    output, _, train_norm = device_steps(b.config, data_config, dev)
    ds = ImageDataset(b.image_set, build_transform(data_config, True, b.config, output=output,
                                                    colour_on_device=train_norm is not None))

    def workers_pass(loader, to_dev: bool) -> Callable[[], Iterable[int]]:
        def run() -> Iterable[int]:
            b.next_epoch(loader)
            for batch in loader:
                if batch is not None:
                    if to_dev:
                        to_device(*batch[:2], dev, b.cuda, train_norm, *batch[2:3])
                    yield int(batch[1].shape[0])
        return run

    loader = make_loader(ds, b.batch, train=True, workers=b.config.workers, device=dev.type, seed=0)
    full = loader.num_workers
    b.row(f"--decode workers: the loader alone ({full} workers)", workers_pass(loader, False))
    b.row("--decode workers: the loader, batches moved and augmented on the device", workers_pass(loader, True))
    close_loader(loader)
    if full >= 4:        # how the workers scale: half of them (hyper-threads, memory bandwidth, the main process)
        loader = make_loader(ds, b.batch, train=True, workers=full // 2, device=dev.type, seed=0)
        b.row(f"--decode workers: the loader alone ({loader.num_workers} workers)", workers_pass(loader, False))
        close_loader(loader)
    dconfig = b.config.replace(decode="device")
    for share in SHARES:
        min_size = build_transform(data_config, False, dconfig).min_size
        eds = EncodedImageDataset(b.image_set, min_size, worker_share=share)
        dl = make_loader(eds, b.batch, train=True, workers=b.config.workers, device=dev.type, seed=0)
        pre = DevicePrefetcher(dl, DeviceTransform(data_config, True, dconfig), dev, channels_last=b.cuda)

        def device_pass(dl=dl, pre=pre) -> Iterable[int]:
            b.next_epoch(dl)
            for batch in pre:
                if batch is not None:
                    yield int(batch[1].shape[0])

        b.row(f"--decode device, worker share {share:g}: the prefetcher alone", device_pass)
        pre.close()


def decoder_rows(b: Bench, data_config: dict) -> None:
    """nvJPEG on batches of files in memory, one CPU core's decode_jpeg, the batched crop."""
    from torchvision.io import ImageReadMode, decode_jpeg

    from finetune.data.decode import DeviceTransform
    from finetune.data.geometry import resample

    say("== nvJPEG and the batched crop alone")
    dev = b.device
    files = [torch.frombuffer(bytearray(Path(f).read_bytes()), dtype=torch.uint8) for f, _ in b.items[:b.batch]]

    def batches_of_files() -> Iterable[int]:
        for _ in range(b.steps // 3 or 1):
            decode_jpeg(files, mode=ImageReadMode.RGB, device=dev)
            yield len(files)

    def one_core() -> Iterable[int]:
        for f in files[:64]:
            decode_jpeg(f, mode=ImageReadMode.RGB)
            yield 1

    b.row(f"decode_jpeg on {dev.type}, batches of {len(files)} files in memory", batches_of_files)
    b.row("decode_jpeg on one CPU core (libjpeg-turbo)", one_core)
    images = decode_jpeg(files, mode=ImageReadMode.RGB, device=dev)
    transform = DeviceTransform(data_config, True, b.config.replace(decode="device"))
    plans = [transform._plan(im) for im in images]
    size = tuple(int(v) for v in data_config["input_size"][-2:])

    def crop() -> Iterable[int]:
        for _ in range(b.steps // 3 or 1):
            resample(images, plans, size, transform.mode)
            yield len(images)

    b.row("geometry.resample: the batch's crops and resizes", crop)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, help="a folder with train/ and val/ class folders (default: generated)")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--device", default="cuda")
    p.add_argument("--tiny", action="store_true", help="tiny sizes: a smoke test of every part on the CPU")
    a = p.parse_args()
    a.out.mkdir(parents=True, exist_ok=True)
    b = Bench(a)
    data_config = step_rows(b)
    loader_rows(b, data_config)
    decoder_rows(b, data_config)
    res = b.res
    say(f"host: {res['host']}")
    what = f"{res.get('gpu', b.device.type)}, {b.arch}, batch {b.batch}, {len(b.items)} JPEGs"
    lines = [f"| part ({what}) | images/s |", "|---|---|"]
    lines += [f"| {r['name']} | {r['img_s']:,.0f} |" for r in res["rows"]]
    table = "\n".join(lines) + "\n"
    (a.out / "table.md").write_text(table, encoding="utf-8")
    (a.out / "results.json").write_text(json.dumps(res, indent=1), encoding="utf-8")
    print(table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
