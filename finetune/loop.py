"""The training loop: ``fit`` = head surgery + freeze decision + (head phase) + finetune phase, with
early stopping, AMP, checkpoints every epoch, exact resume, a NaN guard, progress and a run folder.

Plain functions with explicit arguments (``train_one_epoch``, ``evaluate``, ``fit``), as in torchvision's
reference training script. Library code: it raises, never prints; messages go through ``log``.

Reproducibility: everything random in epoch ``e`` (data order, augmentation, dropout) is seeded from
``(config.seed, e)`` at the start of the epoch, so a run resumed from the checkpoint of epoch ``e - 1``
replays epoch ``e`` exactly as an uninterrupted run would (bit for bit on CPU with ``workers=0``).
"""
from __future__ import annotations

import contextlib
import csv
import hashlib
import importlib
import io
import json
import math
import os
import platform
import random
import signal
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import numpy as np
import torch
from torch import nn

from finetune import distributed as ddp
from finetune.checkpoint import (BEST, LAST, cpu_state_dict, load_checkpoint, load_weights, rng_state,
                                 save_checkpoint, save_weights, set_rng_state)
from finetune.config import FinetuneConfig, save_config
from finetune.errors import CheckpointError, ConfigError, DivergedError, Interrupted
from finetune.io import atomic_write_text
from finetune.metrics import EarlyStopping, per_class_accuracy

__all__ = ["FitResult", "fit", "train_one_epoch", "evaluate", "pick_device", "make_train_loader",
           "set_loader_epoch", "device_steps", "epoch_seed", "HISTORY_KEYS", "HEAD_WARMUP_CAP"]

HISTORY_KEYS = ("epoch", "phase", "train_loss", "train_acc", "val_loss", "val_acc", "lr", "seconds",
                "images_per_s")
HEAD_WARMUP_CAP = 10          # head_epochs=-1: the head trains until its val loss stops improving, at most this
CHECKPOINT_FORMAT = 1
# Options that may differ between a run and its resumption: they change speed or output, not the maths
# of the epochs still to run (epochs and patience may be raised to train longer). device, gpu_normalize
# and decode move the augmentation draws (workers' torch generator, DeviceAugment, DeviceTransform):
# changed on resume, the remaining epochs get other draws from the same distributions.
RESUME_FREE = {"device", "workers", "quiet", "compile", "tensorboard", "epochs", "patience", "min_delta",
               "amp", "channels_last", "gpu_normalize", "decode"}

Log = Callable[[str], None]


@dataclass
class FitResult:
    """What ``fit`` returns. ``model`` holds the best epoch's weights (unwrapped, on the training device)."""

    model: nn.Module
    history: list[dict]
    best_epoch: int
    stopped_early: bool
    run_dir: Path | None
    decision: Any                       # finetune.policy.FreezeDecision
    metrics: dict = field(default_factory=dict)   # val metrics of the returned weights: loss, acc, per_class, confusion


# ------------------------------------------------------------------------------------------- device
def pick_device(name: str = "auto", info: ddp.DistInfo | None = None) -> torch.device:
    """``config.device`` -> torch.device: "auto" prefers CUDA, then Apple MPS, then CPU.

    Under torchrun a bare "cuda" means this process's GPU (cuda:LOCAL_RANK).

    Raises:
        ConfigError: the requested device is not available here.
    """
    info = info or ddp.DistInfo()
    name = (name or "auto").strip().lower()
    mps = getattr(torch.backends, "mps", None)
    has_mps = mps is not None and mps.is_available()
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", info.local_rank if info.enabled else torch.cuda.current_device())
        return torch.device("mps") if has_mps and not info.enabled else torch.device("cpu")
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise ConfigError(f"invalid device={name!r}: use auto, cpu, cuda, cuda:N or mps") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"device={name} but no CUDA device is visible; use --device cpu or auto")
        index = dev.index if dev.index is not None else (info.local_rank if info.enabled else 0)
        if index >= torch.cuda.device_count():
            raise ConfigError(f"device={name}: only {torch.cuda.device_count()} CUDA device(s); use cuda:0..")
        return torch.device("cuda", index)
    if dev.type == "mps" and not has_mps:
        raise ConfigError("device=mps but Apple MPS is not available; use --device cpu or auto")
    if dev.type not in ("cpu", "cuda", "mps"):
        raise ConfigError(f"invalid device={name!r}: use auto, cpu, cuda, cuda:N or mps")
    return dev


def _amp_setup(device: torch.device, config: FinetuneConfig) -> tuple[torch.dtype | None, Any]:
    """(autocast dtype or None, GradScaler or None): bf16 where supported, else fp16 with a scaler."""
    if device.type != "cuda" or not config.amp:
        return None, None
    if torch.cuda.is_bf16_supported():
        return torch.bfloat16, None
    return torch.float16, torch.amp.GradScaler("cuda")


# ---------------------------------------------------------------------------------------- data order
def epoch_seed(seed: int, epoch: int, rank: int = 0) -> int:
    """The seed of everything random in ``epoch`` (augmentation, dropout, worker seeds)."""
    return (int(seed) * 1_000_003 + int(epoch) * 7_919 + int(rank) * 104_729) % (2**63 - 1)


def make_train_loader(dataset, config: FinetuneConfig, *, device: str = "cpu",
                      info: ddp.DistInfo | None = None):
    """The training DataLoader of ``fit``; call :func:`set_loader_epoch` before each epoch.

    With ``sampler="random"`` the order is a ``DistributedSampler`` permutation seeded by
    ``config.seed + epoch`` in one process too (``num_replicas=1``): a one-process run takes exactly the
    batches that an N-process run splits between its ranks, and the order of epoch ``e`` depends on
    nothing but (seed, e). ``config.batch_size`` is the global batch (split across ranks).
    """
    from torch.utils.data import DataLoader, DistributedSampler

    from finetune.data import make_loader

    info = info or ddp.DistInfo()
    per_rank = ddp.per_rank_batch(int(config.batch_size), info)
    loader = make_loader(dataset, per_rank, train=True, workers=config.workers, device=device,
                         sampler=config.sampler, distributed=info.enabled, seed=config.seed)
    if config.sampler == "random" and not isinstance(loader.sampler, DistributedSampler):
        sampler = DistributedSampler(dataset, num_replicas=info.world_size, rank=info.rank, shuffle=True,
                                     seed=int(config.seed), drop_last=False)
        # Same settings as make_loader's (collate that drops undecodable images, workers, pinning).
        loader = DataLoader(dataset, batch_size=per_rank, sampler=sampler, num_workers=loader.num_workers,
                            collate_fn=loader.collate_fn, pin_memory=loader.pin_memory,
                            drop_last=loader.drop_last, persistent_workers=loader.persistent_workers,
                            generator=loader.generator)
    return loader


def device_steps(config: FinetuneConfig, data_config: dict, device: torch.device):
    """What of the preprocessing ``fit``'s workers path leaves to the training device:
    ``(output, normalize, train_normalize)``.

    On CUDA (``gpu_normalize``, the default) workers send uint8 batches, normalised on the GPU (same
    values; 4x fewer bytes to move, no float work in the workers), and the training flip and colour
    jitter run there too, on the whole batch (``DeviceAugment``, reseeded per epoch): the workers only
    decode, crop and resize. ``output`` is then "uint8", ``normalize`` a ``DeviceNormalize`` (evaluation)
    and ``train_normalize`` a ``DeviceAugment``. Elsewhere, or with ``--decode device`` (which does all of
    it in ``finetune.decode``), float batches ("float", None, None) or ("uint8", None, None): on a CPU
    the uint8 path measured within noise of the float one (docs/benchmarks.md), and feature-cache keys
    and behaviour stay as they were.
    """
    from finetune.data import DeviceAugment, DeviceNormalize

    if not (bool(getattr(config, "gpu_normalize", True)) and torch.device(device).type == "cuda"):
        return "float", None, None
    if getattr(config, "decode", "workers") == "device":
        return "uint8", None, None
    return "uint8", DeviceNormalize.from_data_config(data_config), DeviceAugment.from_config(data_config, config)


def set_loader_epoch(loader, seed: int, epoch: int, rank: int = 0) -> None:
    """Make the loader's order (and its workers' seeds) a function of (seed, epoch)."""
    sampler = getattr(loader, "sampler", None)
    if hasattr(sampler, "set_epoch"):
        sampler.set_epoch(int(epoch))
    if hasattr(loader, "set_epoch"):   # finetune.decode.DevicePrefetcher: its augmentation generator
        loader.set_epoch(int(epoch), epoch_seed(seed, epoch, rank))
    gen = getattr(loader, "generator", None)
    if gen is not None:          # worker seeds; the balanced sampler draws from it too
        gen.manual_seed(epoch_seed(seed, epoch, rank))


def _seed_epoch(seed: int, epoch: int, rank: int) -> None:
    # Augmentation with workers=0 and dropout draw from the global generators.
    s = epoch_seed(seed, epoch, rank)
    random.seed(s)
    np.random.seed(s % 2**32)
    torch.manual_seed(s)


# ------------------------------------------------------------------------------------- one epoch
def _to_device(x: torch.Tensor, y: torch.Tensor, device: torch.device, channels_last: bool, normalize=None):
    if normalize is not None:     # uint8 batch: copied as uint8, converted and normalised on the device
        return normalize(x, device, channels_last), y.to(device, non_blocking=True)
    x = x.to(device, non_blocking=True)
    if channels_last and x.dim() == 4:
        x = x.contiguous(memory_format=torch.channels_last)
    return x, y.to(device, non_blocking=True)


def diverged(epoch: int, step: int, lr: float) -> DivergedError:
    """The one message for a NaN/inf loss, on every training path."""
    return DivergedError(f"loss diverged at epoch {epoch} step {step}: lower the learning rate (was {lr:.3g})")


def optimizer_step(loss: torch.Tensor, optimizer: torch.optim.Optimizer, scaler=None) -> None:
    """Backward and step, through the GradScaler when fp16 autocast uses one."""
    optimizer.zero_grad(set_to_none=True)
    if scaler is not None:
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
    else:
        loss.backward()
        optimizer.step()


def train_one_epoch(model: nn.Module, loader, optimizer: torch.optim.Optimizer, scheduler, loss_fn: nn.Module,
                    device: torch.device, *, amp: torch.dtype | None = None, scaler=None, progress=None,
                    epoch: int = 0, channels_last: bool = False, only_train: nn.Module | None = None,
                    info: ddp.DistInfo | None = None, normalize: Callable | None = None) -> dict:
    """One pass over ``loader``; the scheduler is stepped after every optimizer step.

    Args:
        amp: autocast dtype (bf16/fp16) or None for full precision.
        scaler: a GradScaler with fp16.
        progress: a tqdm bar to advance (optional).
        epoch: for the divergence message.
        only_train: when given, the model stays in eval mode and only this module trains (the head
            phase: frozen backbone without dropout/drop-path, as the cached-feature path computes it).
        info: the DDP position; metrics are summed over ranks.
        normalize: for a loader of uint8 batches (``build_transform(..., output="uint8")``), a
            ``finetune.data.DeviceNormalize`` that converts them on ``device``; None for float batches.
    Returns:
        ``{"loss", "acc", "images", "seconds", "images_per_s"}`` over all ranks.
    Raises:
        DivergedError: the loss became NaN/inf (on any rank); nothing of this epoch is saved.
    """
    info = info or ddp.DistInfo()
    if only_train is None:
        model.train()
    else:
        model.eval()
        only_train.train()
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    correct = torch.zeros((), dtype=torch.int64, device=device)
    seen = 0
    t0 = time.perf_counter()
    show = progress is not None and not getattr(progress, "disable", False)
    for step, batch in enumerate(loader, 1):
        if batch is None:        # every image of the batch failed to decode (already logged by the dataset)
            continue
        x, y = _to_device(batch[0], batch[1], device, channels_last, normalize)
        with torch.autocast(device.type, dtype=amp or torch.float32, enabled=amp is not None):
            out = model(x)
        loss = loss_fn(out.float(), y)
        if not ddp.all_true(bool(torch.isfinite(loss)), device, info):
            lr = scheduler.current_lr() if scheduler is not None else optimizer.param_groups[0]["lr"]
            raise diverged(epoch, step, lr)
        optimizer_step(loss, optimizer, scaler)
        if scheduler is not None:
            scheduler.step_batch()
        n = int(y.shape[0])
        loss_sum += loss.detach().double() * n
        correct += (out.detach().argmax(1) == y).sum()
        seen += n
        if show:
            dt = max(time.perf_counter() - t0, 1e-9)
            progress.set_postfix(loss=f"{loss_sum.item() / seen:.4f}", acc=f"{correct.item() / seen:.3f}",
                                 img_s=f"{seen * info.world_size / dt:.0f}", refresh=False)
        if progress is not None:
            progress.update(1)
    totals = torch.stack([loss_sum, correct.double(), torch.tensor(float(seen), dtype=torch.float64,
                                                                    device=device)])
    ddp.all_reduce_sum(totals, info)
    loss_total, correct_total, images = totals.tolist()
    seconds = time.perf_counter() - t0
    images = int(images)
    return {"loss": loss_total / images if images else math.nan,
            "acc": correct_total / images if images else math.nan,
            "images": images, "seconds": seconds, "images_per_s": images / max(seconds, 1e-9)}


@torch.no_grad()
def evaluate(model: nn.Module, loader, loss_fn: nn.Module, device: torch.device, classes: Sequence[str], *,
             amp: torch.dtype | None = None, channels_last: bool = False,
             info: ddp.DistInfo | None = None, normalize: Callable | None = None) -> dict:
    """Loss, accuracy, per-class accuracy and the confusion matrix (rows: true class, columns: predicted).

    Under DDP each rank passes its own shard of the validation set; the sums are reduced over ranks.
    ``normalize``: as in :func:`train_one_epoch` (uint8 batches normalised on the device).
    """
    info = info or ddp.DistInfo()
    model.eval()
    c = len(classes)
    confusion = torch.zeros(c * c, dtype=torch.int64, device=device)
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    for batch in loader:
        if batch is None:
            continue
        x, y = _to_device(batch[0], batch[1], device, channels_last, normalize)
        with torch.autocast(device.type, dtype=amp or torch.float32, enabled=amp is not None):
            out = model(x)
        loss_sum += loss_fn(out.float(), y).double() * int(y.shape[0])
        confusion += torch.bincount(y * c + out.argmax(1), minlength=c * c)
    ddp.all_reduce_sum(confusion, info)
    ddp.all_reduce_sum(loss_sum, info)
    conf = confusion.view(c, c).cpu()
    total = int(conf.sum())
    right = conf.diag().tolist()
    per_class = per_class_accuracy(right, conf.sum(1).tolist(), list(classes))
    return {"loss": float(loss_sum) / total if total else math.nan,
            "acc": sum(right) / total if total else math.nan,
            "per_class": per_class, "confusion": conf.tolist(), "images": total}


# --------------------------------------------------------------------------------------- run folder
def _optional(module: str, attr: str):
    """``module.attr`` when that module exists (modules written by other parts may be absent)."""
    try:
        mod = importlib.import_module(module)
    except ModuleNotFoundError as e:
        if e.name == module:
            return None
        raise
    return getattr(mod, attr, None)


def _versions() -> dict[str, str | None]:
    from importlib import metadata

    out: dict[str, str | None] = {"python": platform.python_version()}
    for dist_name in ("zoo-finetune", "torch", "torchvision", "timm", "numpy", "pillow", "safetensors"):
        try:
            out[dist_name] = metadata.version(dist_name)
        except metadata.PackageNotFoundError:
            out[dist_name] = None
    return out


def _files_hash(train_set, val_set) -> str:
    h = hashlib.sha256()
    for split, s in (("train", train_set), ("val", val_set)):
        for path, label in sorted(s.items):
            h.update(f"{split}\t{path}\t{s.classes[label]}\n".encode("utf-8", "surrogatepass"))
    return h.hexdigest()


def _write_manifest(run_dir: Path, config: FinetuneConfig, train_set, val_set, device: torch.device,
                    info: ddp.DistInfo, resume: bool) -> None:
    path = run_dir / "manifest.json"
    entry = {"time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "command": list(sys.argv)}
    if resume and path.is_file():
        try:
            manifest = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            manifest = {}
        manifest.setdefault("resumed", []).append(entry)
    else:
        manifest = {"created": entry["time"], "command": entry["command"], "seed": config.seed,
                    "files_sha256": _files_hash(train_set, val_set),
                    "images": {"train": len(train_set.items), "val": len(val_set.items)},
                    "classes": list(train_set.classes), "versions": _versions(),
                    "device": str(device), "world_size": info.world_size}
    atomic_write_text(path, json.dumps(manifest, indent=2) + "\n")


def _write_metrics_csv(path: Path, history: list[dict]) -> None:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(HISTORY_KEYS), extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for row in history:
        writer.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in row.items()})
    atomic_write_text(path, buf.getvalue())


def _json_safe(value: Any) -> Any:
    """NaN/inf -> None so that summary.json is strict JSON."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value


@contextlib.contextmanager
def _sigterm_as_interrupt():
    """SIGTERM (e.g. a scheduler ending the job) and SIGINT take the same path as Ctrl-C.

    SIGINT is set explicitly too: a process started in the background by a non-interactive shell
    inherits SIGINT ignored, and `kill -INT` must still save and stop the run.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, frame):
        raise KeyboardInterrupt

    previous_term = signal.signal(signal.SIGTERM, handler)
    previous_int = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous_term)
        signal.signal(signal.SIGINT, previous_int)


# ---------------------------------------------------------------------------------------------- fit
def _phases(trainable_stages: int, config: FinetuneConfig) -> tuple[list[str], int]:
    """The phases to run and the head warm-up cap (epochs) when a head phase precedes finetuning.

    ``config.epochs`` caps the whole run; a warm-up leaves at least one epoch for finetuning.
    """
    if trainable_stages == 0:
        return ["head"], int(config.epochs)
    if config.head_epochs == 0 or config.epochs < 2:
        return ["finetune"], 0
    cap = HEAD_WARMUP_CAP if config.head_epochs < 0 else int(config.head_epochs)
    return ["head", "finetune"], min(cap, int(config.epochs) - 1)


def _check_resume_config(saved: dict, config: FinetuneConfig) -> None:
    current = config.to_dict()
    differ = sorted(k for k, v in saved.items() if k in current and k not in RESUME_FREE and current[k] != v)
    if differ:
        raise ConfigError(f"cannot resume with changed option(s) {', '.join(differ)}: drop them (the run's "
                          "config.yaml is used) or start a new run")


def fit(model: nn.Module, stages: Sequence[Sequence[str]], data_config: dict, train_set, val_set,
        config: FinetuneConfig, *, head: str, run_dir: str | Path | None = None, resume: bool = False,
        log: Log | None = None, callbacks: Iterable[Callable[[dict], Any]] = (),
        reset_head: bool = True) -> FitResult:
    """Finetune ``model`` on ``train_set`` following the recipe; see the module docstring.

    Args:
        model: a pretrained network (modified in place: new head, freezing, BatchNorm policy).
        stages: module-name prefixes per stage, input -> output, classifier excluded.
        data_config: timm-style preprocessing (input_size, interpolation, crop_pct, mean, std).
        train_set, val_set: ``finetune.data.ImageSet`` with the same ``classes``.
        config: every option (FinetuneConfig).
        head: module name of the classifier.
        run_dir: the run folder (config.yaml, manifest.json, metrics.csv, curves.png, checkpoints/,
            summary.json); None trains without writing anything (and cannot be resumed).
        resume: continue from ``run_dir/checkpoints/last.pt``.
        log: receives one-line messages (the CLI passes a stderr printer); only called on rank 0.
        callbacks: each is called with the history row after its epoch has been checkpointed; raising
            KeyboardInterrupt there stops the run like Ctrl-C.
        reset_head: False when the model's head was already replaced for these classes.
    Returns:
        FitResult with the best epoch's weights restored into ``model``.
    Raises:
        ConfigError, DataError: bad options or data. DivergedError: NaN/inf loss (the last good
        checkpoint is kept). Interrupted: Ctrl-C/SIGTERM (the message says how to resume).
        CheckpointError: a checkpoint cannot be written or read.
    """
    from finetune.data import ImageDataset, build_transform, class_weights, make_loader
    from finetune.optim import build_optimizer, build_scheduler
    from finetune.recipe import prepare_model
    from finetune.surgery import apply_freeze

    run_dir = Path(run_dir) if run_dir is not None else None
    if resume and run_dir is None:
        raise ConfigError("resume needs the run folder: pass run_dir")
    if list(train_set.classes) != list(val_set.classes):
        raise ConfigError("train and val sets have different class lists; build both from one scan")
    classes = list(train_set.classes)

    info = ddp.setup(ddp.device_type(config.device))
    device = pick_device(config.device, info)
    main = info.is_main
    quiet_log: Log = log if (log is not None and main) else (lambda _msg: None)
    say = quiet_log
    epoch_say = (lambda _msg: None) if config.quiet else say
    writes = main and run_dir is not None

    ckpt = None
    if resume:
        ckpt = load_checkpoint(run_dir / LAST)
        if ckpt.get("format") != CHECKPOINT_FORMAT:
            raise CheckpointError(f"{run_dir / LAST} was written by another version; start a new run")
        if list(ckpt["classes"]) != classes:
            raise CheckpointError(f"the classes of {run_dir} ({', '.join(ckpt['classes'])}) differ from the "
                                  "data's; resume with the same data folder")
        _check_resume_config(ckpt["config"], config)
    elif writes and (run_dir / LAST).exists():
        raise ConfigError(f"{run_dir} already holds a run: continue it with `zoo finetune --resume "
                          f"{run_dir}` or choose another --out")

    # --- model: head, freeze decision, BatchNorm policy (seeded: the new head's init is reproducible)
    torch.manual_seed(int(config.seed))
    random.seed(int(config.seed))
    np.random.seed(int(config.seed) % 2**32)
    counts = train_set.class_counts() if hasattr(train_set, "class_counts") else \
        [sum(1 for _, y in train_set.items if y == i) for i in range(len(classes))]
    decision = prepare_model(model, stages, head, len(classes), counts, config, reset_head=reset_head)
    raw = model
    if ckpt is not None:
        raw.load_state_dict(ckpt["model"])
    raw.to(device)
    channels_last = bool(config.channels_last) and device.type == "cuda"
    if channels_last:
        raw.to(memory_format=torch.channels_last)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    amp, scaler = _amp_setup(device, config)
    head_module = raw.get_submodule(head)
    say(f"freeze: {decision.label} ({decision.reason})")

    phases, warm_cap = _phases(decision.trainable_stages, config)
    head_only = decision.trainable_stages == 0

    # --- data
    weight = None
    if config.class_weights == "auto":
        weight = torch.tensor(class_weights(train_set), dtype=torch.float32, device=device)
    loss_fn = nn.CrossEntropyLoss(weight=weight)
    on_device = getattr(config, "decode", "workers") == "device"
    output, normalize, train_normalize = device_steps(config, data_config, device)
    if on_device:   # workers read the files; JPEGs are decoded and augmented on the device (finetune.decode)
        from finetune.decode import EncodedImageDataset
        min_size = build_transform(data_config, False, config).min_size
        train_ds = EncodedImageDataset(train_set, min_size)
        val_ds = EncodedImageDataset(val_set, min_size)
    else:
        train_ds = ImageDataset(train_set, build_transform(data_config, True, config, output=output,
                                                           colour_on_device=train_normalize is not None))
        val_ds = ImageDataset(val_set, build_transform(data_config, False, config, output=output))
    fast_failures: list[tuple[str, str]] = []   # decode failures met by the cached-feature path
    train_loader = make_train_loader(train_ds, config, device=device.type, info=info)
    if info.enabled:
        # Contiguous-free strided shards without padding: every validation image is counted exactly once.
        val_ds = torch.utils.data.Subset(val_ds, list(range(info.rank, len(val_ds), info.world_size)))
    val_loader = make_loader(val_ds, ddp.per_rank_batch(int(config.batch_size), info), train=False,
                             workers=config.workers, device=device.type)
    if on_device:
        from finetune.decode import DevicePrefetcher, DeviceTransform
        if device.type != "cuda":
            say(f"warning: --decode device on {device.type} decodes in one thread of the main process; "
                "it is meant for CUDA (nvJPEG): the workers path is usually faster here")
        train_loader = DevicePrefetcher(train_loader, DeviceTransform(data_config, True, config), device,
                                        channels_last=channels_last)
        val_loader = DevicePrefetcher(val_loader, DeviceTransform(data_config, False, config), device,
                                      channels_last=channels_last)
    steps_per_epoch = max(1, len(train_loader))
    has_val = len(val_set.items) > 0

    # --- bookkeeping state (all of it goes into every checkpoint)
    mode = "max" if config.monitor == "val_acc" else "min"
    stopper = EarlyStopping(patience=int(config.patience), min_delta=float(config.min_delta), mode=mode)
    head_stop = EarlyStopping(patience=1, min_delta=float(config.min_delta), mode="min")
    history: list[dict] = []
    epoch, pi, phase_start, stopped_early = 0, 0, None, False
    best_state: dict[str, torch.Tensor] | None = None
    if ckpt is not None:
        epoch, pi, phase_start = int(ckpt["epoch"]), int(ckpt["phase_index"]), ckpt["phase_start"]
        stopped_early = bool(ckpt["stopped_early"])
        stopper.load_state_dict(ckpt["early_stop"])
        head_stop.load_state_dict(ckpt["head_stop"])
        history = list(ckpt["history"])
        if scaler is not None and ckpt.get("scaler"):
            scaler.load_state_dict(ckpt["scaler"])
        if (run_dir / BEST).is_file():
            best_state = load_weights(run_dir / BEST)
        say(f"resuming {run_dir} after epoch {epoch}")

    tb = None
    if writes:
        run_dir.mkdir(parents=True, exist_ok=True)
        if not resume:
            save_config(config, run_dir / "config.yaml")
        _write_manifest(run_dir, config, train_set, val_set, device, info, resume)
        if config.tensorboard:
            tb_cls = _optional("finetune.diagnostics", "TensorBoardLogger")
            if tb_cls is None:
                raise ConfigError("--tensorboard needs finetune.diagnostics.TensorBoardLogger; update zoo-finetune")
            tb = tb_cls(run_dir)
    write_curves = _optional("finetune.diagnostics", "write_curves") if writes else None
    advise = _optional("finetune.diagnostics", "advise")
    advised: set[str] = set()   # advice already printed during this run (each rule once)

    optimizer = scheduler = None
    net: nn.Module = raw

    def checkpoint(next_pi: int, start: int | None) -> None:
        """last.pt after an epoch (or before the first): ``next_pi``/``start`` say where to go on."""
        if not writes:
            return
        running = next_pi < len(phases) and start is not None and optimizer is not None
        save_checkpoint(run_dir / LAST, {
            "format": CHECKPOINT_FORMAT, "epoch": epoch, "phase_index": next_pi, "phase_start": start,
            "phases": list(phases), "finished": next_pi >= len(phases), "stopped_early": stopped_early,
            "model": cpu_state_dict(raw),
            "optimizer": optimizer.state_dict() if running else None,
            "scheduler": scheduler.state_dict() if running else None,
            "scaler": scaler.state_dict() if scaler is not None else None,
            "early_stop": stopper.state_dict(), "head_stop": head_stop.state_dict(),
            "rng": rng_state(), "history": history, "config": config.to_dict(), "classes": classes,
            "decision": decision.to_dict() if hasattr(decision, "to_dict") else dict(vars(decision)),
        })

    def record(row: dict, metric_value: float) -> None:
        """Book-keeping after an epoch's evaluation: best weights, metrics.csv, curves, TensorBoard."""
        nonlocal best_state
        history.append(row)
        improved = has_val and stopper.improved(metric_value)
        if not has_val or improved:
            best_state = cpu_state_dict(raw)
            if writes:
                save_weights(run_dir / BEST, raw, {"epoch": str(row["epoch"]), "monitor": config.monitor,
                                                   "value": repr(metric_value)})
        if writes:
            _write_metrics_csv(run_dir / "metrics.csv", history)
            if write_curves is not None:
                best = row["epoch"] if (not has_val or improved) else stopper.best_epoch
                write_curves(history, run_dir / "curves.png", best_epoch=best if best > 0 else None)
            if tb is not None:
                tb.log_epoch(row)
        epoch_say(f"epoch {row['epoch']}/{config.epochs} {row['phase']}: train loss {row['train_loss']:.4f} "
                  f"acc {row['train_acc']:.3f} | val loss {row['val_loss']:.4f} acc {row['val_acc']:.3f} | "
                  f"lr {row['lr']:.3g} | {row['images_per_s']:.0f} img/s")
        if advise is not None:   # the lecture's reading of the curves, as soon as a rule fires
            for line in advise(history):
                rule = " ".join(line.split()[:3])
                if rule not in advised:
                    advised.add(rule)
                    say(f"advice (after epoch {row['epoch']}): {line}")

    t_run = time.perf_counter()
    try:
        with _sigterm_as_interrupt():
            if ckpt is None:
                checkpoint(0, None)      # an interruption during epoch 1 can resume too
            else:
                set_rng_state(ckpt["rng"])
            while pi < len(phases):
                phase = phases[pi]
                warmup = phase == "head" and not head_only
                trainable = 0 if phase == "head" else decision.trainable_stages
                apply_freeze(raw, stages, head, trainable)
                phase_config = config
                if warmup:   # the head warm-up trains at the plain head LR; the schedule belongs to finetuning
                    phase_config = config.replace(schedule="none", warmup_epochs=0.0)
                continuing = phase_start is not None
                if not continuing:
                    phase_start = epoch
                if phase == "finetune":
                    # the remaining epochs form the finetune schedule (cosine ends at the last one)
                    phase_config = config.replace(epochs=max(1, int(config.epochs) - phase_start))
                    if not continuing:
                        stopper.bad_epochs = 0      # unfreezing gets the full patience
                optimizer = build_optimizer(phase_config, raw, head)
                scheduler = build_scheduler(phase_config, optimizer, steps_per_epoch)
                if continuing and ckpt is not None and ckpt.get("optimizer") is not None:
                    optimizer.load_state_dict(ckpt["optimizer"])
                    scheduler.load_state_dict(ckpt["scheduler"])
                ckpt = None      # only the first phase after a resume continues from it
                net = ddp.wrap_model(raw, device, info)
                if config.compile:
                    net = torch.compile(net)
                eval_net = torch.compile(raw) if config.compile else raw

                # Head only (the whole backbone frozen): its features are computed once and the head
                # trains on them (finetune.features), with the same loss, order and early stopping.
                fast = (head_only and config.fast_head and not continuing and not info.enabled
                        and _optional("finetune.features", "fit_head_on_features"))
                if fast:
                    rows, head_best = fast(raw, head, train_set, val_set, data_config, config, device=device,
                                           log=say, loss_fn=loss_fn, epochs=int(config.epochs),
                                           failures_out=fast_failures)
                    for r in rows:
                        epoch += 1
                        row = {k: r.get(k) for k in HISTORY_KEYS} | {"epoch": epoch, "phase": "head"}
                        metric = row["val_acc"] if config.monitor == "val_acc" else row["val_loss"]
                        if has_val:
                            stopper.step(metric, epoch)
                        history.append(row)
                        epoch_say(f"epoch {epoch}/{config.epochs} head (cached features): train loss "
                                  f"{row['train_loss']:.4f} acc {row['train_acc']:.3f} | val loss "
                                  f"{row['val_loss']:.4f} acc {row['val_acc']:.3f} | lr {row['lr']:.3g}")
                    raw.load_state_dict(head_best, strict=False)   # the head of the best epoch
                    best_state = cpu_state_dict(raw)
                    if writes:
                        save_weights(run_dir / BEST, raw, {"epoch": str(stopper.best_epoch),
                                                           "monitor": config.monitor})
                        _write_metrics_csv(run_dir / "metrics.csv", history)
                        if write_curves is not None:
                            write_curves(history, run_dir / "curves.png",
                                         best_epoch=stopper.best_epoch if stopper.best_epoch > 0 else None)
                        if tb is not None:
                            for row in history[-len(rows):]:
                                tb.log_epoch(row)
                    stopped_early = len(rows) < int(config.epochs)
                    pi += 1
                    phase_start = None
                    checkpoint(pi, None)
                    for row in history[-len(rows):]:
                        for cb in callbacks:
                            cb(row)
                    continue

                phase_done = False
                while not phase_done:
                    epoch += 1
                    _seed_epoch(config.seed, epoch, info.rank)
                    set_loader_epoch(train_loader, config.seed, epoch, info.rank)
                    if train_normalize is not None:
                        train_normalize.reseed(epoch_seed(config.seed, epoch, info.rank))
                    lr = scheduler.current_lr()
                    bar = _progress(len(train_loader), f"epoch {epoch}/{config.epochs} {phase}",
                                    disable=config.quiet or not main)
                    t0 = time.perf_counter()
                    try:
                        tr = train_one_epoch(net, train_loader, optimizer, scheduler, loss_fn, device, amp=amp,
                                             scaler=scaler, progress=bar, epoch=epoch,
                                             channels_last=channels_last,
                                             only_train=head_module if phase == "head" else None, info=info,
                                             normalize=train_normalize)
                    finally:
                        if bar is not None:
                            bar.close()
                    va = evaluate(eval_net, val_loader, loss_fn, device, classes, amp=amp,
                                  channels_last=channels_last, info=info, normalize=normalize) if has_val else \
                        {"loss": math.nan, "acc": math.nan}
                    metric = va["acc"] if config.monitor == "val_acc" else va["loss"]
                    scheduler.step_epoch(metric if has_val else None)
                    row = {"epoch": epoch, "phase": phase, "train_loss": tr["loss"], "train_acc": tr["acc"],
                           "val_loss": va["loss"], "val_acc": va["acc"], "lr": lr,
                           "seconds": time.perf_counter() - t0, "images_per_s": tr["images_per_s"]}
                    record(row, metric)
                    stop = stopper.step(metric, epoch) if has_val else False
                    if warmup:
                        head_improving = not head_stop.step(va["loss"], epoch) if has_val else True
                        phase_done = (epoch - phase_start >= warm_cap
                                      or (config.head_epochs < 0 and not head_improving))
                    else:
                        stopped_early = stop and epoch < int(config.epochs)
                        phase_done = stop or epoch >= int(config.epochs)
                    if phase_done:
                        checkpoint(pi + 1, None)
                    else:
                        checkpoint(pi, phase_start)
                    for cb in callbacks:
                        cb(row)
                pi += 1
                phase_start = None
    except KeyboardInterrupt:
        if run_dir is None:
            raise Interrupted(f"interrupted in epoch {epoch}; nothing was saved: pass a run folder to be "
                              "able to resume") from None
        raise Interrupted(f"interrupted: epochs up to {_saved_epoch(run_dir, epoch)} are saved in {run_dir}; "
                          f"continue with `zoo finetune --resume {run_dir}`") from None
    except DivergedError:
        if tb is not None:
            tb.close()
        raise
    if tb is not None:
        tb.close()
    _record_decode_failures((train_ds, val_ds), run_dir if writes else None, say, extra=fast_failures)

    # --- the best weights, their full metrics, the summary
    if best_state is not None:
        raw.load_state_dict(best_state)
    best_epoch = stopper.best_epoch if has_val else (history[-1]["epoch"] if history else 0)
    metrics = evaluate(raw, val_loader, loss_fn, device, classes, amp=amp, channels_last=channels_last,
                       info=info, normalize=normalize) if has_val else {}
    metrics = {("val_" + k if k in ("loss", "acc") else k): v for k, v in metrics.items()}
    if writes:
        summary = {
            "best_epoch": best_epoch, "monitor": config.monitor,
            "best_value": stopper.best if has_val else None,
            "metrics": metrics, "epochs_run": epoch, "max_epochs": int(config.epochs),
            "stopped_early": stopped_early, "phases": phases,
            "freeze": decision.to_dict() if hasattr(decision, "to_dict") else dict(vars(decision)),
            "advice": advise(history) if advise is not None else [],
            "device": str(device), "world_size": info.world_size,
            "seconds": round(time.perf_counter() - t_run, 3), "classes": classes,
        }
        atomic_write_text(run_dir / "summary.json", json.dumps(_json_safe(summary), indent=2) + "\n")
    ddp.barrier(info)
    return FitResult(model=raw, history=history, best_epoch=best_epoch, stopped_early=stopped_early,
                     run_dir=run_dir, decision=decision, metrics=metrics)


def _record_decode_failures(datasets, run_dir: Path | None, say: Log,
                            extra: list[tuple[str, str]] = ()) -> None:
    """Images that passed the scan but failed to decode while training (each was caught on its own and
    dropped from its batch; ``extra``: those the cached-feature path met): one warning, and appended to
    ``bad_files.txt`` (absolute paths)."""
    failed: dict[str, str] = dict(extra)
    for ds in datasets:
        failures = getattr(getattr(ds, "dataset", ds), "failures", None)   # a DDP Subset wraps the dataset
        for path, reason in (failures() if failures is not None else []):
            failed.setdefault(path, reason)
    if not failed:
        return
    def printable(p: str) -> str:
        return os.fsencode(p).decode("utf-8", "backslashreplace")
    names = ", ".join(printable(os.path.basename(p)) for p in list(failed)[:3])
    more = f" and {len(failed) - 3} more" if len(failed) > 3 else ""
    say(f"warning: {len(failed)} image(s) failed to decode during training and were skipped: {names}{more}"
        + (" (see bad_files.txt)" if run_dir is not None else ""))
    if run_dir is not None:
        path = run_dir / "bad_files.txt"
        try:
            old = path.read_text(encoding="utf-8")
        except OSError:
            old = ""
        new = [f"{printable(p)}\t{r} (failed to decode during training)\n" for p, r in failed.items()
               if printable(p) + "\t" not in old]
        atomic_write_text(path, old + "".join(new))


def _saved_epoch(run_dir: Path, fallback: int) -> int:
    """The epoch recorded in last.pt (what a resume continues after)."""
    try:
        return int(torch.load(run_dir / LAST, map_location="cpu", weights_only=True)["epoch"])
    except Exception:  # an unreadable checkpoint: say the epoch before the interrupted one
        return max(0, fallback - 1)


def _progress(total: int, desc: str, disable: bool):
    """One tqdm bar per epoch on stderr (quiet when stderr is not a terminal, or with quiet=True)."""
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return None
    return tqdm(total=total, desc=desc, leave=False, disable=True if disable else None, file=sys.stderr,
                dynamic_ncols=True, unit="batch")
