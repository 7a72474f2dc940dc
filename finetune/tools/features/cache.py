"""Feature banks and their cache: the frozen backbone's features of one split, keyed by the data (paths,
labels, sizes, mtimes), the backbone weights (hash of its state_dict) and the preprocessing (data_config,
transform, augmentation options); kept in memory or as memory-mapped safetensors under a folder."""
import contextlib
import hashlib
import json
import math
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
from torch import nn

from finetune.core.checkpoint import tensors_sha256, write_tensors
from finetune.core.io import atomic_write, read_safetensors_header
from finetune.data.images import DECODE_REVISION


CACHE_FORMAT = "zoo-features-1"


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
    digest: str | None = None       # the sha256 of its bytes, checked, when read from a cache file
    plain_of_mirrored: bool = False     # view 0 of a cached mirrored bank (``banks.agreed_load``'s view_of)

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
        self.computed = 0      # banks computed by get_or_compute
        self.hits = 0          # banks get_or_compute found stored
        self.earlier_hits = 0  # ... of them, banks this object did not compute (an earlier run stored them)
        self._computed_keys: set[str] = set()
        self.write_error: str | None = None    # why the first bank could not be stored (then kept in memory)

    def path(self, key: str) -> Path | None:
        return self.root / f"{key}.safetensors" if self.root is not None else None

    def _say(self, msg: str) -> None:
        if self._log is not None:
            self._log(msg)

    def save(self, key: str, bank: FeatureBank) -> None:
        """Store ``bank`` under ``key`` (atomically when on disk). The cache only saves time: where the disk
        refuses it (a read-only ZOO_HOME, a full disk), the bank is kept in memory for this object's life and
        ``write_error`` says why; the run goes on."""
        if self.root is None:
            self._memory[key] = bank
            return
        feats = np.ascontiguousarray(bank.features.detach().cpu().float().numpy())
        labels = np.ascontiguousarray(bank.labels.detach().cpu().to(torch.int64).numpy())
        meta = {"format": CACHE_FORMAT, "key": key, "feature_shape": json.dumps(list(bank.feature_shape)),
                "sha256": _digest_arrays([feats, labels])}
        try:
            tensors = {"features": torch.from_numpy(feats), "labels": torch.from_numpy(labels)}
            atomic_write(self.path(key), lambda tmp: write_tensors(tmp, tensors, meta))
        except OSError as e:
            self._memory[key] = bank
            if self.write_error is None:
                self.write_error = f"{e.strerror or type(e).__name__} ({self.root})"
                self._say(f"warning: the feature cache cannot be written: {self.write_error}; the features serve "
                          "this run only (ZOO_HOME=DIR names a writable cache folder)")

    def load(self, key: str) -> FeatureBank | None:
        """The bank stored under ``key``, or None when absent or damaged (a damaged file is removed)."""
        if key in self._memory:
            return self._memory[key]
        if self.root is None:
            return None
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
        header = read_safetensors_header(path)     # a complete file, every byte range inside it
        meta = header.pop("__metadata__", None) or {}
        if meta.get("format") != CACHE_FORMAT or meta.get("key") != key:
            raise ValueError("format or key mismatch")
        # read_safetensors_header checked that the tensors end exactly at the end of the file
        data_start = path.stat().st_size - max((int(v["data_offsets"][1]) for v in header.values()), default=0)
        dtypes = {"F32": np.float32, "I64": np.int64}
        arrays: dict[str, np.ndarray] = {}
        for name in ("features", "labels"):
            info = header[name]
            dtype = np.dtype(dtypes[info["dtype"]])
            shape = tuple(int(s) for s in info["shape"])
            begin, stop = (int(v) for v in info["data_offsets"])
            if stop - begin != dtype.itemsize * math.prod(shape):
                raise ValueError(f"{name}: shape does not match its byte range")
            # mode "c" (copy-on-write) maps the file without reading it and gives torch a writable view.
            arrays[name] = np.memmap(path, dtype=dtype, mode="c", offset=data_start + begin, shape=shape)
        if _digest_arrays([arrays["features"], arrays["labels"]]) != meta.get("sha256"):
            raise ValueError("checksum mismatch")
        feats, labels = arrays["features"], arrays["labels"]
        if feats.ndim != 3 or labels.shape != (feats.shape[1],):
            raise ValueError("inconsistent shapes")
        return FeatureBank(torch.from_numpy(feats), torch.from_numpy(labels),
                           tuple(json.loads(meta["feature_shape"])), digest=meta["sha256"])

    def get_or_compute(self, key: str, compute: Callable[[], FeatureBank],
                       load: Callable[[], FeatureBank | None] | None = None) -> tuple[FeatureBank, bool]:
        """``(bank, hit)``: the cached bank (``load()``'s, default ``self.load(key)``; ``banks.agreed_load`` also
        finds a plain bank as its mirrored bank's view), or ``compute()`` stored under ``key``."""
        bank = self.load(key) if load is None else load()
        if bank is not None:
            self.hits += 1
            self.earlier_hits += key not in self._computed_keys
            return bank, True
        bank = compute()
        self.save(key, bank)
        self.computed += 1
        self._computed_keys.add(key)
        return bank, False


# --------------------------------------------------------------------------------------------------
# Cache keys


def _strip(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


def backbone_digest(model: nn.Module, head: str) -> str:
    """sha256 of the model's class and of every state_dict entry outside ``head`` (names, dtypes,
    shapes, values; BatchNorm running statistics included): the features depend on exactly these."""
    return tensors_sha256({name: t for name, t in model.state_dict().items()
                           if isinstance(t, torch.Tensor) and not _strip(name, head)}, salt=type(model).__qualname__)


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
        "decode": DECODE_REVISION,          # the pixels a file decodes to (a decoding fix changes them)
        # torchvision transforms' repr lists every parameter (sizes, interpolation, mean/std, p...).
        "transform": repr(transform),
        "extra": json.dumps(extra or {}, sort_keys=True, default=str),
    }
    blob = json.dumps(parts, sort_keys=True).encode()
    return f"{split}-{hashlib.sha256(blob).hexdigest()[:32]}"
