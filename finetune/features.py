"""Head-only fast path: run the frozen backbone once, train the head on its cached features.

When every parameter outside the head is frozen, the backbone computes the same features every
epoch (it runs in eval mode: BatchNorm uses its stored statistics, dropout and drop-path are off),
so re-running it is pure waste. Here the features before the head are computed once per view:

* view 0, the un-augmented (evaluation-transform) view: the default, and always used for validation;
* with ``config.aug_views = K > 0``, K augmented views per training image (a bank); each epoch draws
  one of them per image.

and the head is trained on them with the same loss, optimizer, scheduler, early stopping
(:class:`finetune.metrics.EarlyStopping`) and batch order as the slow path. Features are kept in memory
or in a :class:`FeatureCache` (memory-mapped safetensors under ``cache_dir``), keyed by the data (paths,
labels, sizes, mtimes), the backbone weights (hash of its state_dict) and the preprocessing (data_config,
transform, augmentation options).

Matching the slow path, the contract with ``finetune.loop`` (docs/internals.md): during a head-only
phase the slow path also keeps the whole model in eval mode and puts only the head in train mode, so
dropout applied before the classifier (timm's ``drop_rate``) and stochastic depth are off in both paths;
an MLP head's own BatchNorm and Dropout train normally in both.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import struct
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import torch
from torch import nn

from finetune.errors import FinetuneError
from finetune.metrics import EarlyStopping

__all__ = [
    "FeatureBank",
    "FeatureCache",
    "extract_features",
    "fit_head_on_features",
    "feature_cache_key",
    "backbone_digest",
    "data_digest",
]

CACHE_FORMAT = "zoo-features-1"
_HISTORY_KEYS = ("epoch", "phase", "train_loss", "train_acc", "val_loss", "val_acc", "lr", "seconds",
                 "images_per_s")
# Feature banks bigger than this stay on the host and are gathered per batch on an accelerator.
_DEVICE_RESIDENT_BYTES = 4 << 30


# --------------------------------------------------------------------------------------------------
# Feature banks and their cache


@dataclass
class FeatureBank:
    """Features of one split: ``features[v, i]`` is view ``v`` of item ``i`` (flattened).

    ``labels[i]`` is -1 for an item whose image could not be decoded (its feature rows are zeros);
    such items are dropped exactly where the slow path's collate drops them.
    ``feature_shape`` is the per-image shape the head expects (``(D,)`` for a Linear head).
    """

    features: torch.Tensor          # (V, N, prod(feature_shape)) float32
    labels: torch.Tensor            # (N,) int64
    feature_shape: tuple[int, ...]

    @property
    def views(self) -> int:
        return int(self.features.shape[0])

    @property
    def valid(self) -> torch.Tensor:
        return self.labels >= 0

    def __len__(self) -> int:
        return int(self.labels.shape[0])


def _digest_arrays(arrays: Sequence[np.ndarray]) -> str:
    h = hashlib.sha256()
    for a in arrays:
        h.update(memoryview(np.ascontiguousarray(a)).cast("B"))
    return h.hexdigest()


class FeatureCache:
    """Feature banks stored as ``<root>/<key>.safetensors``, memory-mapped on load.

    Each file carries in its safetensors metadata the cache key, the format version, the feature shape
    and a sha256 of the tensor bytes. Files are written atomically (temp file + fsync + rename); a file
    that is truncated, unparsable, of another key or whose checksum does not match is deleted and
    reported as a miss, so it is recomputed rather than trusted. ``root=None`` keeps banks in memory
    for the life of this object only.
    """

    def __init__(self, root: str | Path | None = None, log: Callable[[str], None] | None = None) -> None:
        self.root = Path(root) if root is not None else None
        self._memory: dict[str, FeatureBank] = {}
        self._log = log

    def path(self, key: str) -> Path | None:
        return self.root / f"{key}.safetensors" if self.root is not None else None

    def _say(self, msg: str) -> None:
        if self._log is not None:
            self._log(msg)

    def save(self, key: str, bank: FeatureBank) -> None:
        """Store ``bank`` under ``key`` (atomically when on disk)."""
        if self.root is None:
            self._memory[key] = bank
            return
        from safetensors.numpy import save_file

        from finetune.io import atomic_write

        feats = np.ascontiguousarray(bank.features.detach().cpu().float().numpy())
        labels = np.ascontiguousarray(bank.labels.detach().cpu().to(torch.int64).numpy())
        meta = {"format": CACHE_FORMAT, "key": key, "feature_shape": json.dumps(list(bank.feature_shape)),
                "sha256": _digest_arrays([feats, labels])}
        atomic_write(self.path(key), lambda tmp: save_file({"features": feats, "labels": labels}, tmp,
                                                           metadata=meta))

    def load(self, key: str) -> FeatureBank | None:
        """The bank stored under ``key``, or None when absent or damaged (a damaged file is removed)."""
        if self.root is None:
            return self._memory.get(key)
        path = self.path(key)
        if not path.exists():
            return None
        try:
            return self._read(path, key)
        except (OSError, ValueError, KeyError, TypeError, struct.error) as e:
            self._say(f"feature cache {path.name} is damaged ({e}); recomputing it")
            with contextlib.suppress(OSError):
                path.unlink()
            return None

    @staticmethod
    def _read(path: Path, key: str) -> FeatureBank:
        size = path.stat().st_size
        with open(path, "rb") as fh:
            head = fh.read(8)
            if len(head) < 8:
                raise ValueError("file shorter than its header")
            (n,) = struct.unpack("<Q", head)
            if n > size - 8:
                raise ValueError("header length beyond end of file")
            header = json.loads(fh.read(n).decode("utf-8"))
        meta = header.pop("__metadata__", None) or {}
        if meta.get("format") != CACHE_FORMAT or meta.get("key") != key:
            raise ValueError("format or key mismatch")
        dtypes = {"F32": np.float32, "I64": np.int64}
        arrays: dict[str, np.ndarray] = {}
        end = 0
        for name in ("features", "labels"):
            info = header[name]
            dtype = np.dtype(dtypes[info["dtype"]])
            shape = tuple(int(s) for s in info["shape"])
            begin, stop = (int(v) for v in info["data_offsets"])
            if stop - begin != dtype.itemsize * math.prod(shape):
                raise ValueError(f"{name}: shape does not match its byte range")
            end = max(end, stop)
            if 8 + n + stop > size:
                raise ValueError("truncated")
            # mode "c" (copy-on-write) maps the file without reading it and gives torch a writable view.
            arrays[name] = np.memmap(path, dtype=dtype, mode="c", offset=8 + n + begin, shape=shape)
        if 8 + n + end != size:
            raise ValueError("file size does not match its header")
        if _digest_arrays([arrays["features"], arrays["labels"]]) != meta.get("sha256"):
            raise ValueError("checksum mismatch")
        feats, labels = arrays["features"], arrays["labels"]
        if feats.ndim != 3 or labels.shape != (feats.shape[1],):
            raise ValueError("inconsistent shapes")
        return FeatureBank(torch.from_numpy(feats), torch.from_numpy(labels),
                           tuple(json.loads(meta["feature_shape"])))

    def get_or_compute(self, key: str, compute: Callable[[], FeatureBank]) -> tuple[FeatureBank, bool]:
        """``(bank, hit)``: the cached bank, or ``compute()`` stored under ``key``."""
        bank = self.load(key)
        if bank is not None:
            return bank, True
        bank = compute()
        self.save(key, bank)
        return bank, False


# --------------------------------------------------------------------------------------------------
# Cache keys


def _strip(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


def backbone_digest(model: nn.Module, head: str) -> str:
    """sha256 of the model's class and of every state_dict entry outside ``head`` (names, dtypes,
    shapes, values; BatchNorm running statistics included): the features depend on exactly these."""
    h = hashlib.sha256(type(model).__qualname__.encode())
    for name, t in model.state_dict().items():
        if _strip(name, head) or not isinstance(t, torch.Tensor):
            continue
        t = t.detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}".encode())
        if t.numel():
            h.update(memoryview(t.reshape(-1).view(torch.uint8).numpy()))
    return h.hexdigest()


def data_digest(items: Sequence[tuple[str, int]]) -> str:
    """sha256 over (path, label, size, mtime_ns) of every item, in order; a missing file hashes as such."""
    h = hashlib.sha256()
    for path, label in items:
        try:
            st = os.stat(path)
            stamp = f"{st.st_size}|{st.st_mtime_ns}"
        except OSError:
            stamp = "missing"
        # surrogateescape: file names that are not UTF-8 (decoded by os with surrogate escapes) hash too
        h.update(f"{os.path.abspath(path)}|{int(label)}|{stamp}\n".encode("utf-8", "surrogateescape"))
    return h.hexdigest()


def feature_cache_key(*, split: str, items: Sequence[tuple[str, int]], backbone: str, data_config: dict,
                      transform: Any, extra: dict | None = None) -> str:
    """The cache key of one split's bank: data x backbone weights x preprocessing (+ ``extra``)."""
    parts = {
        "format": CACHE_FORMAT,
        "split": split,
        "data": data_digest(items),
        "backbone": backbone,
        "data_config": json.dumps(data_config, sort_keys=True, default=str),
        # torchvision transforms' repr lists every parameter (sizes, interpolation, mean/std, p...).
        "transform": repr(transform),
        "extra": json.dumps(extra or {}, sort_keys=True, default=str),
    }
    blob = json.dumps(parts, sort_keys=True).encode()
    return f"{split}-{hashlib.sha256(blob).hexdigest()[:32]}"


# --------------------------------------------------------------------------------------------------
# Extraction


@contextlib.contextmanager
def _features_mode(model: nn.Module, head: str) -> Iterator[nn.Module]:
    """Swap the head for nn.Identity and put the model in eval mode; restore both afterwards.

    Each module's own training flag is restored (not just the root's), so a BatchNorm kept in eval by
    ``set_bn_eval`` under ``model.train()`` stays that way.
    """
    head_module = model.get_submodule(head)
    parent_name, _, attr = head.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    modes = [(m, m.training) for m in model.modules()]
    setattr(parent, attr, nn.Identity())
    model.eval()
    try:
        yield head_module
    finally:
        setattr(parent, attr, head_module)
        for m, training in modes:
            m.training = training


def _autocast(device: torch.device, amp: bool) -> contextlib.AbstractContextManager:
    if amp and device.type == "cuda":
        dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.autocast("cuda", dtype=dtype)
    return contextlib.nullcontext()


class _Indexed(torch.utils.data.Dataset):
    """Wraps a dataset to return ``(index, image, label)`` (or ``(index, None)`` for a bad image)."""

    def __init__(self, dataset: torch.utils.data.Dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, i: int):
        return i, self.dataset[i]


def _collate_indexed(batch):
    good = [(i, s) for i, s in batch if s is not None]
    if not good:
        return None
    idx = torch.tensor([i for i, _ in good], dtype=torch.int64)
    x = torch.stack([s[0] for _, s in good])
    y = torch.tensor([int(s[1]) for _, s in good], dtype=torch.int64)
    return idx, x, y


@torch.no_grad()
def _extract(model: nn.Module, head: str, dataset: torch.utils.data.Dataset, batch_size: int,
             device: torch.device, *, workers: int = 0, amp: bool = False, channels_last: bool = False,
             seed: int | None = None, desc: str | None = None, quiet: bool = True,
             normalize=None) -> FeatureBank:
    """One pass of ``model`` without its head over ``dataset``: a single-view bank (bad images -> -1).

    With ``desc`` and not ``quiet``, a progress bar on stderr (tqdm: silent when stderr is no terminal).
    ``normalize``: a ``finetune.data.DeviceNormalize`` when the dataset yields uint8 images.
    """
    import sys

    from tqdm.auto import tqdm

    from finetune.data import resolve_workers

    n = len(dataset)  # type: ignore[arg-type]
    workers = resolve_workers(int(workers), device.type)
    gen = torch.Generator().manual_seed(seed) if seed is not None else None
    loader = torch.utils.data.DataLoader(
        _Indexed(dataset), batch_size=batch_size, shuffle=False, num_workers=workers,
        collate_fn=_collate_indexed, pin_memory=device.type == "cuda", generator=gen,
        persistent_workers=False, prefetch_factor=4 if workers else None)
    feats: torch.Tensor | None = None
    labels = torch.full((n,), -1, dtype=torch.int64)
    shape: tuple[int, ...] = ()
    checked = False
    bar = tqdm(total=len(dataset), desc=desc, unit="img", leave=False, file=sys.stderr, dynamic_ncols=True,
               disable=True if (quiet or desc is None) else None)
    with _features_mode(model, head) as head_module, _autocast(device, amp), bar:
        for batch in loader:
            if batch is None:
                continue
            bar.update(int(batch[0].shape[0]))
            idx, x, y = batch
            if normalize is not None:    # uint8 batch: converted and normalised on the device
                x = normalize(x, device, channels_last)
            else:
                x = x.to(device, non_blocking=True)
                if channels_last and x.dim() == 4:
                    x = x.contiguous(memory_format=torch.channels_last)
            f = model(x)
            if not checked:
                shape = tuple(f.shape[1:])
                _check_head_is_last(model, head, head_module, x[:2], f[:2])
                feats = torch.zeros((1, n, math.prod(shape)), dtype=torch.float32)
                checked = True
            feats[0, idx] = f.reshape(f.shape[0], -1).float().cpu()
            labels[idx] = y
    if feats is None:
        raise FinetuneError("no image of this split could be decoded; check the data folder")
    return FeatureBank(feats, labels, shape)


def _check_head_is_last(model: nn.Module, head: str, head_module: nn.Module, x: torch.Tensor,
                        f: torch.Tensor) -> None:
    """The fast path computes logits as ``head(features)``: verify that on two images, so a model that
    transforms the head's output (or feeds it anything but the pooled features) fails loudly instead
    of training the wrong function."""
    parent_name, _, attr = head.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    was = head_module.training
    head_module.eval()
    setattr(parent, attr, head_module)
    try:
        full = model(x).float()
        fast = _logits(head_module, f).float()
    except Exception as e:  # noqa: BLE001 - any failure here means the head does not take these features
        fast, full, err = None, None, e
    else:
        err = None
    finally:
        setattr(parent, attr, nn.Identity())
        head_module.train(was)
    if err is None and fast.shape == full.shape:
        scale = float(full.abs().max()) + 1e-6
        if float((fast - full).abs().max()) <= 1e-3 + 5e-2 * scale:
            return
    why = f" ({type(err).__name__}: {err})" if err is not None else ""
    raise FinetuneError(f"the fast head path needs the model's output to be {head!r}(pooled features), and "
                        f"it is not for this model{why}; run with fast_head off")


def _logits(head_module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    out = head_module(x)
    # A 1x1-conv classifier yields (B, C, 1, 1); the models that use one flatten it right after.
    return out.flatten(1) if out.dim() > 2 else out


def extract_features(model: nn.Module, head: str, dataset: torch.utils.data.Dataset, batch_size: int = 64,
                     device: str | torch.device = "cpu", *, workers: int = 0, amp: bool = False,
                     channels_last: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """The features the head sees, for every decodable item of ``dataset``.

    The head is swapped for ``nn.Identity`` and the model run once in eval mode under ``no_grad``
    (modes and the head are restored afterwards).

    Args:
        model: the full network; ``head`` names its classifier module ("fc", "head.fc", "classifier").
        dataset: yields ``(image tensor, label)``, or None for an undecodable image (dropped).
        batch_size, device, workers: of the extraction pass (``workers`` -1 = min(8, cpus - 1)).
        amp: autocast (bf16 where supported) on CUDA; channels_last: NHWC inputs on CUDA.

    Returns:
        ``(features, labels)``: float32 ``(N_ok, *feature_shape)`` and int64 ``(N_ok,)``, dataset order.

    Raises:
        FinetuneError: no image could be decoded, or the model's output is not ``head(features)``.
    """
    bank = _extract(model, head, dataset, batch_size, torch.device(device), workers=workers, amp=amp,
                    channels_last=channels_last)
    ok = bank.valid
    return bank.features[0, ok].reshape(-1, *bank.feature_shape), bank.labels[ok]


# --------------------------------------------------------------------------------------------------
# Training the head on features


class _Targets(torch.utils.data.Dataset):
    """Stands in for the slow path's train dataset when building its loader: same length and
    ``targets`` (the balanced sampler's weights), no images."""

    def __init__(self, image_set: Any) -> None:
        self.image_set = image_set
        self.targets = [int(y) for _, y in image_set.items]

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, i: int):
        return i, self.targets[i]


class _BatchOrder:
    """The index batches the slow path's training loader yields in each epoch, without iterating it.

    The loader is ``finetune.loop.make_train_loader`` reseeded by ``set_loader_epoch`` before every
    epoch, as ``fit`` does. A DataLoader also draws one seed for its workers from ``loader.generator``
    when an iterator is created (once for persistent workers, every epoch otherwise) before its sampler
    draws from the same generator (the balanced sampler does). Replaying those draws reproduces the slow
    path's batches exactly, without starting worker processes for a dataset that has no images to decode
    (tests compare with the real loader for 0 and 1 workers, random and balanced samplers).
    """

    def __init__(self, loader: torch.utils.data.DataLoader, seed: int) -> None:
        self.loader = loader
        self.seed = seed
        self._started = False

    def __len__(self) -> int:
        return len(self.loader.batch_sampler)  # type: ignore[arg-type]

    def epoch(self, epoch: int) -> Iterator[list[int]]:
        from finetune.loop import set_loader_epoch

        set_loader_epoch(self.loader, self.seed, epoch)
        persistent = self.loader.num_workers > 0 and self.loader.persistent_workers
        if not (self._started and persistent):
            torch.empty((), dtype=torch.int64).random_(generator=self.loader.generator)
        self._started = True
        return iter(self.loader.batch_sampler)  # type: ignore[arg-type]


def _seed_epoch(seed: int, epoch: int) -> None:
    """Seed the global generators as ``fit`` does before each epoch: the MLP head's dropout then draws
    the same masks in both paths."""
    import random

    from finetune.loop import epoch_seed

    s = epoch_seed(seed, epoch)
    random.seed(s)
    np.random.seed(s % 2**32)
    torch.manual_seed(s)


def _default_loss(config: Any, train_set: Any) -> nn.Module:
    """CrossEntropyLoss, weighted by ``finetune.data.class_weights`` for class_weights=auto."""
    if getattr(config, "class_weights", "none") != "auto":
        return nn.CrossEntropyLoss()
    from finetune.data import class_weights

    return nn.CrossEntropyLoss(weight=torch.tensor(class_weights(train_set), dtype=torch.float32))


def _bank_to(bank: FeatureBank, device: torch.device) -> torch.Tensor:
    feats = bank.features
    if device.type != "cpu" and feats.numel() * 4 <= _DEVICE_RESIDENT_BYTES:
        return feats.to(device)
    return feats


def fit_head_on_features(model: nn.Module, head: str, train_set: Any, val_set: Any, data_config: dict,
                         config: Any, *, cache_dir: str | Path | None = None,
                         device: str | torch.device = "cpu", log: Callable[[str], None] | None = None,
                         epoch_callback: Callable[[dict], Any] | None = None,
                         loss_fn: nn.Module | None = None, epochs: int | None = None,
                         monitor: str | None = None, patience: int | None = None,
                         failures_out: list[tuple[str, str]] | None = None,
                         ) -> tuple[list[dict], dict[str, torch.Tensor]]:
    """Train ``model``'s head on cached backbone features (the backbone must be frozen).

    Equivalent to the slow head-only loop (whole model in eval mode, head in train mode, the model run
    on every batch): same inputs (the evaluation transform, or with ``config.aug_views = K`` one of K
    cached augmented views per image per epoch), same loss, optimizer (``build_optimizer``), scheduler
    (``build_scheduler``, stepped per batch and per epoch), batch order (``finetune.loop.make_train_loader``
    reseeded per epoch), global seeding per epoch,
    and early stopping (:class:`EarlyStopping` on ``config.monitor``).

    Args:
        model: the network after ``prepare_model`` (new head, backbone frozen), on any device.
        head: module name of the classifier.
        train_set, val_set: ``finetune.data.ImageSet``; val_set may be None or empty (then no early
            stopping, val metrics NaN, best_state = last epoch).
        data_config: timm-style preprocessing (input_size, interpolation, crop_pct, mean, std).
        config: FinetuneConfig (batch_size, workers, sampler, seed, epochs, patience, min_delta, monitor,
            optimizer/schedule options, amp, channels_last, aug_views and the augmentation options).
        cache_dir: where feature banks are cached across runs; None keeps them in memory only.
        device: where the extraction and the head training run.
        log: receives one-line progress messages (cache hits, extraction speed).
        epoch_callback: called with each history row after its epoch (checkpointing, progress).
        loss_fn: the slow path's loss (default: cross-entropy, class-weighted for class_weights=auto).
        epochs: run this many epochs instead of ``config.epochs`` (a head warm-up phase).
        monitor, patience: early stopping on this metric with this patience instead of ``config.monitor``
            and ``config.patience`` (a warm-up stops on val_loss with patience 1); patience 0 runs every
            epoch. The scheduler's plateau metric stays ``config.monitor``, as in the slow path.

    Returns:
        ``(history, best_state)``: one row per epoch (epoch from 1, phase "head", train_loss, train_acc,
        val_loss, val_acc, lr, seconds, images_per_s; epoch 1's seconds include feature extraction)
        and a CPU copy of the head's parameters and buffers at the best epoch, keyed by full model name
        (``model.load_state_dict(best_state, strict=False)``). The model's head holds the last epoch.

    Raises:
        FinetuneError: a parameter outside the head is trainable, or the model is not ``head(features)``.
        DivergedError: the loss became NaN/inf.
    """
    from finetune.data import DeviceNormalize, ImageDataset, build_transform
    from finetune.loop import diverged, make_train_loader, optimizer_step
    from finetune.optim import build_optimizer, build_scheduler

    say = log or (lambda _msg: None)
    dev = torch.device(device)
    if epochs is not None:
        config = config.replace(epochs=int(epochs))
    trainable = [n for n, p in model.named_parameters() if p.requires_grad and not _strip(n, head)]
    if trainable:
        raise FinetuneError(f"the fast head path needs a frozen backbone, but {trainable[0]} is trainable; "
                            "freeze the backbone or run with fast_head off")
    model.to(dev)
    head_module = model.get_submodule(head)
    amp = bool(getattr(config, "amp", False)) and dev.type == "cuda"
    channels_last = bool(getattr(config, "channels_last", False)) and dev.type == "cuda"
    workers = int(getattr(config, "workers", -1))
    views = int(getattr(config, "aug_views", 0) or 0)
    seed = int(config.seed)

    t_start = time.perf_counter()
    cache = FeatureCache(cache_dir, log=say)
    weights = backbone_digest(model, head)
    numerics = {"amp": amp, "device": dev.type, "channels_last": channels_last}
    # As fit: on CUDA uint8 images from the workers, normalised on the GPU (the uint8 transform's repr
    # differs, so such features get their own cache key).
    gpu_norm = bool(getattr(config, "gpu_normalize", True)) and dev.type == "cuda"
    output = "uint8" if gpu_norm else "float"
    normalize = DeviceNormalize.from_data_config(data_config) if gpu_norm else None
    eval_tf = build_transform(data_config, False, config, output=output)

    def bank_for(split: str, image_set: Any, transform: Any, n_views: int) -> FeatureBank:
        extra = dict(numerics, views=n_views, seed=seed if n_views else None)
        key = feature_cache_key(split=split, items=image_set.items, backbone=weights, data_config=data_config,
                                transform=transform, extra=extra)

        def compute() -> FeatureBank:
            t0 = time.perf_counter()
            ds = ImageDataset(image_set, transform)
            parts = []
            for v in range(max(1, n_views)):
                # Augmented views are drawn reproducibly: the transforms use torch's RNG, seeded per view
                # (workers get seeds from the loader generator). The global RNG is forked and restored so
                # that extraction consumes none of it: the head's dropout then sees the slow path's draws.
                with torch.random.fork_rng(devices=[]):
                    torch.manual_seed(seed * 1_000_003 + v)
                    parts.append(_extract(model, head, ds, config.batch_size, dev, workers=workers, amp=amp,
                                          channels_last=channels_last, seed=seed * 1_000_003 + v,
                                          desc=f"features {split}" + (f" view {v + 1}" if n_views > 1 else ""),
                                          quiet=bool(getattr(config, "quiet", False)), normalize=normalize))
            bank = FeatureBank(torch.cat([p.features for p in parts]), parts[0].labels, parts[0].feature_shape)
            failed = ds.failures()
            if failures_out is not None:   # the caller lists them in the run folder (bad_files.txt)
                failures_out.extend(failed)
            if failed:   # passed the scan, failed to decode: dropped per image, said once
                names = ", ".join(os.fsencode(os.path.basename(p)).decode("utf-8", "backslashreplace")
                                  for p, _ in failed[:3])
                more = f" and {len(failed) - 3} more" if len(failed) > 3 else ""
                say(f"warning: {len(failed)} {split} image(s) failed to decode and were skipped: {names}{more}")
            dt = time.perf_counter() - t0
            n = len(image_set.items) * max(1, n_views)
            say(f"features: {split} {len(image_set.items)} images x {max(1, n_views)} view(s) computed in "
                f"{dt:.1f}s ({n / max(dt, 1e-9):.0f} img/s)")
            return bank

        bank, hit = cache.get_or_compute(key, compute)
        if hit:
            say(f"features: {split} loaded from cache ({bank.views} view(s), {len(bank)} images)")
        return bank

    train_tf = build_transform(data_config, True, config, output=output) if views > 0 else eval_tf
    train_bank = bank_for("train", train_set, train_tf, views)
    val_bank = bank_for("val", val_set, eval_tf, 0) if val_set is not None and len(val_set.items) else None
    if val_bank is not None and val_bank.feature_shape != train_bank.feature_shape:
        raise FinetuneError("train and val features differ in shape; clear the feature cache and retry")

    train_feats = _bank_to(train_bank, dev)
    val_feats = _bank_to(val_bank, dev)[0] if val_bank is not None else None
    val_labels = val_bank.labels[val_bank.valid] if val_bank is not None else None
    val_rows = val_bank.valid.nonzero().squeeze(1) if val_bank is not None else None
    shape = train_bank.feature_shape

    # The slow path's own loader, so the sampler, seed, drop_last and generator draws are the same.
    order = _BatchOrder(make_train_loader(_Targets(train_set), config, device=dev.type), seed)
    bank_labels = train_bank.labels.tolist()
    if loss_fn is None:
        loss_fn = _default_loss(config, train_set)
    loss_fn = loss_fn.to(dev)
    optimizer = build_optimizer(config, model, head)
    scheduler = build_scheduler(config, optimizer, max(1, len(order)))
    scaler = None
    if amp and not torch.cuda.is_bf16_supported():
        scaler = torch.amp.GradScaler("cuda")
    stop_on = monitor or config.monitor
    patience = int(config.patience if patience is None else patience)
    # patience 0 = no early stopping, but the best epoch (the state returned) is still tracked.
    stopper = EarlyStopping(patience=max(1, patience), min_delta=float(config.min_delta),
                            mode="max" if stop_on == "val_acc" else "min")
    history: list[dict] = []
    best_state = _head_state(model, head)
    n_views = train_bank.views
    prep_seconds = time.perf_counter() - t_start

    for epoch in range(1, int(config.epochs) + 1):
        t0 = time.perf_counter()
        _seed_epoch(seed, epoch)
        head_module.train()
        if n_views > 1:
            g = torch.Generator().manual_seed(seed * 7919 + epoch)
            view_of = torch.randint(n_views, (len(train_bank),), generator=g).to(train_feats.device)
        total_loss, correct, seen = 0.0, 0, 0
        for step, batch in enumerate(order.epoch(epoch), 1):
            # Undecodable images are dropped from their batch, as collate_skip_none does.
            keep = [i for i in batch if bank_labels[i] >= 0]
            if not keep:
                continue
            idx = torch.tensor(keep, dtype=torch.int64)
            y = train_bank.labels[idx]
            idx = idx.to(train_feats.device)
            x = train_feats[view_of[idx], idx] if n_views > 1 else train_feats[0, idx]
            x = x.to(dev, non_blocking=True).reshape(-1, *shape)
            y = y.to(dev, non_blocking=True)
            with _autocast(dev, amp):
                logits = _logits(head_module, x)
            loss = loss_fn(logits.float(), y)
            if not torch.isfinite(loss):
                raise diverged(epoch, step, scheduler.current_lr())
            optimizer_step(loss, optimizer, scaler)
            scheduler.step_batch()
            bs = int(y.shape[0])
            total_loss += float(loss.detach()) * bs
            correct += int((logits.detach().argmax(1) == y).sum())
            seen += bs
        lr = scheduler.current_lr()
        val_loss, val_acc = (math.nan, math.nan)
        if val_feats is not None:
            val_loss, val_acc = _evaluate(head_module, val_feats, val_rows, val_labels, shape, loss_fn,
                                          config.batch_size, dev, amp)
        have_metric = val_feats is not None
        metric = val_acc if config.monitor == "val_acc" else val_loss
        scheduler.step_epoch(metric if have_metric else None)
        stop = False
        if have_metric:
            watched = val_acc if stop_on == "val_acc" else val_loss
            improved = stopper.improved(watched)
            stop = stopper.step(watched, epoch) and patience > 0
            if improved:
                best_state = _head_state(model, head)
        else:
            best_state = _head_state(model, head)
        seconds = time.perf_counter() - t0 + (prep_seconds if epoch == 1 else 0.0)
        row = {"epoch": epoch, "phase": "head", "train_loss": total_loss / max(1, seen),
               "train_acc": correct / max(1, seen), "val_loss": val_loss, "val_acc": val_acc, "lr": lr,
               "seconds": seconds, "images_per_s": seen / max(seconds, 1e-9)}
        history.append(row)
        if epoch_callback is not None:
            epoch_callback(row)
        if stop:
            say(f"head: early stop after epoch {epoch} (best epoch {stopper.best_epoch})")
            break
    return history, best_state


def _head_state(model: nn.Module, head: str) -> dict[str, torch.Tensor]:
    prefix = head + "."
    return {prefix + k: v.detach().cpu().clone() for k, v in model.get_submodule(head).state_dict().items()}


@torch.no_grad()
def _evaluate(head_module: nn.Module, feats: torch.Tensor, rows: torch.Tensor, labels: torch.Tensor,
              shape: tuple[int, ...], loss_fn: nn.Module, batch_size: int, dev: torch.device,
              amp: bool) -> tuple[float, float]:
    """Mean loss and accuracy of the head over the validation features (eval mode, restored after)."""
    was = head_module.training
    head_module.eval()
    total, correct = 0.0, 0
    try:
        for start in range(0, int(rows.shape[0]), batch_size):
            r = rows[start:start + batch_size]
            x = feats[r.to(feats.device)].to(dev, non_blocking=True).reshape(-1, *shape)
            y = labels[start:start + batch_size].to(dev)
            with _autocast(dev, amp):
                logits = _logits(head_module, x)
            total += float(loss_fn(logits.float(), y)) * int(y.shape[0])
            correct += int((logits.argmax(1) == y).sum())
    finally:
        head_module.train(was)
    n = max(1, int(rows.shape[0]))
    return total / n, correct / n
