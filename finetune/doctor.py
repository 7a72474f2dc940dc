"""Look at the data before trusting it: leaks, duplicates, likely wrong labels, outliers, odd files.

Everything here works on a :class:`finetune.data.ScanReport` and the pooled backbone features of its
images (the features the head sees, from the cached-feature path: :class:`finetune.features.FeatureCache`
keyed exactly as ``fit_head_on_features`` keys its evaluation-transform banks, so a second doctor run, or
a head-only finetune given the same cache folder, reuses them). Nothing here prints or writes into the
user's folder; :func:`write_findings_csv` writes where it is told.

Findings, most serious first (``FINDING_ORDER``):

* ``leak``: the same image (same bytes, features with cosine similarity >= ``near_threshold``, or
  16x16 grey pixel fingerprints with cosine >= ``pixel_threshold``: re-encoded / resized copies) in two
  splits. ``path`` is the copy on the training side (train before val before test: the one
  ``zoo finetune --exclude`` can drop), ``other`` the copy in the later split.
* ``cross_class_duplicate`` / ``duplicate``: the same image twice in one split, in two classes / one class.
  ``path`` is the second copy (sorted order), ``other`` the first.
* ``wrong_label``: out-of-fold predictions of a linear probe (softmax regression, full-batch L-BFGS,
  ``folds`` stratified folds, seeded) over every labelled image; as in confident learning an image is
  flagged when another class ``j`` gets ``p_j >= t_j``, ``t_j`` being the mean out-of-fold probability
  of class ``j`` over the images labelled ``j`` (its self-confidence). Score: ``p_j - p_given``;
  ``other``: the suggested class.
* ``outlier``: far from every class centroid: robust z-score of ``1 - max_c cos(f, centroid_c)`` above
  ``outlier_z`` (median / MAD over the folder).
* ``tiny`` (shorter side < ``min_side`` px), ``aspect`` (long / short side > ``max_aspect``),
  ``small_class`` (fewer training images than ``small_class_ratio`` x the median class),
  ``unreadable`` and ``scan_warning`` (what the scan already reported).
"""
from __future__ import annotations

import csv
import hashlib
import io
import math
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import numpy as np
import torch
from PIL import Image

from finetune.data import ImageDataset, ImageSet, build_transform, load_image
from finetune.features import FeatureBank, FeatureCache, backbone_digest, extract_features, feature_cache_key
from finetune.io import atomic_write_text, printable_name

__all__ = [
    "DoctorOptions", "Finding", "DoctorResult", "FINDING_ORDER", "CSV_COLUMNS", "EXCLUDE_KINDS",
    "file_facts", "pixel_fingerprint", "folder_features", "find_duplicates", "label_issues", "find_outliers", "file_findings",
    "run_doctor", "write_findings_csv", "read_exclude_file", "exclude_items",
]

FINDING_ORDER = ("leak", "cross_class_duplicate", "duplicate", "wrong_label", "outlier", "unreadable",
                 "tiny", "aspect", "small_class", "scan_warning")
CSV_COLUMNS = ("path", "finding", "score", "other", "split", "label", "detail")
# What ``--exclude findings.csv`` drops: the rows that are about one bad file. Tiny images and extreme
# aspect ratios are reported but kept (they may be fine for the task); edit the CSV to drop them too.
EXCLUDE_KINDS = ("leak", "cross_class_duplicate", "duplicate", "wrong_label", "outlier", "unreadable")
SPLIT_ORDER = ("train", "val", "test")
Log = Callable[[str], None]


@dataclass(frozen=True)
class DoctorOptions:
    """Thresholds of the checks (the defaults are the ones measured in docs/doctor.md)."""

    near_threshold: float = 0.95    # cosine similarity of L2-normalised pooled features: a near copy
    pixel_threshold: float = 0.99   # or cosine similarity of the 16x16 grey pixel fingerprints
    # (1.0 for either: identical vectors, compared bit for bit rather than by a float cosine)
    folds: int = 5                  # out-of-fold probe folds (wrong labels)
    seed: int = 0                   # fold assignment
    probe_l2: float = 1e-3          # L2 penalty of the linear probe (on the mean squared weight)
    probe_iters: int = 100          # L-BFGS iterations per fold
    outlier_z: float = 5.0          # robust z-score of the distance to the nearest class centroid
    min_side: int = 64              # px; shorter side below this: "tiny"
    max_aspect: float = 3.0         # long / short side above this: "aspect"
    small_class_ratio: float = 0.2  # training images below this fraction of the median class: "small_class"

    def validate(self) -> "DoctorOptions":
        """Raise ValueError on an option outside its range; returns self."""
        if not 0.0 < self.near_threshold <= 1.0 or not 0.0 < self.pixel_threshold <= 1.0:
            raise ValueError(f"near_threshold={self.near_threshold} and pixel_threshold={self.pixel_threshold} "
                             "must be in (0, 1], e.g. 0.95 and 0.99")
        if self.folds < 2:
            raise ValueError(f"folds={self.folds} must be at least 2, e.g. 5")
        if self.probe_l2 < 0 or self.outlier_z <= 0 or self.min_side < 0 or self.max_aspect < 1:
            raise ValueError("probe_l2 >= 0, outlier_z > 0, min_side >= 0 and max_aspect >= 1 are required")
        return self


@dataclass
class Finding:
    """One row of findings.csv. ``path`` relative to the data root (``""`` for folder-wide findings)."""

    path: str
    finding: str
    score: float
    other: str = ""
    split: str = ""
    label: str = ""
    detail: str = ""


@dataclass
class DoctorResult:
    """What :func:`run_doctor` found: ``findings`` sorted (FINDING_ORDER, then score, highest first)."""

    root: str
    classes: list[str]
    counts: dict[str, dict[str, int]]
    findings: list[Finding]
    options: DoctorOptions
    images: int
    # every labelled image, most suspicious first: (relative path, given class, suggested class, score)
    label_ranking: list[tuple[str, str, str, float]] = field(default_factory=list)
    probe_accuracy: float = math.nan      # out-of-fold accuracy of the linear probe
    seconds: dict[str, float] = field(default_factory=dict)
    feature_cache_hits: int = 0

    def by_kind(self) -> dict[str, int]:
        """Number of findings of each kind, in FINDING_ORDER (kinds with none included)."""
        out = {k: 0 for k in FINDING_ORDER}
        for f in self.findings:
            out[f.finding] = out.get(f.finding, 0) + 1
        return out


# ------------------------------------------------------------------------------------------ files
THUMB_SIDE = 16    # pixel fingerprint: the image as 16x16 grey levels (see pixel_fingerprint)


def pixel_fingerprint(path: str) -> np.ndarray | None:
    """The image (EXIF-upright, transparency on white, as training sees it) shrunk to 16x16 grey levels,
    mean-centred and L2-normalised; None when it cannot be decoded.

    Re-encoding and resizing barely move it (cosine >= 0.996 for JPEG q60 / 70 % resized copies of the
    stamps photos) while different photos stay below 0.93 (docs/doctor.md): the net for near copies that
    the pretrained features, which JPEG artefacts move more (cosine down to 0.79), let through.
    """
    try:
        im = load_image(path, min_size=THUMB_SIDE * 4).convert("L").resize((THUMB_SIDE, THUMB_SIDE), Image.BOX)
    except Exception:  # noqa: BLE001 - an undecodable image has no fingerprint; the scan reports it
        return None
    v = np.asarray(im, dtype=np.float32).ravel()
    v = v - v.mean()
    n = float(np.linalg.norm(v))
    return v / n if n > 1e-6 else None      # a flat image matches everything: no fingerprint


def file_facts(paths: Sequence[str], progress: Callable[[int], None] | None = None
               ) -> tuple[list[str], list[tuple[int, int] | None], np.ndarray, np.ndarray]:
    """Per path: sha256 of the bytes, (width, height) from the header or None, the pixel fingerprint
    (rows of an (N, 256) array, zeros when missing) and whether it exists. Read only."""
    hashes, sizes = [], []
    thumbs = np.zeros((len(paths), THUMB_SIDE * THUMB_SIDE), dtype=np.float32)
    has = np.zeros(len(paths), dtype=bool)
    for k, p in enumerate(paths):
        h = hashlib.sha256()
        try:
            with open(p, "rb") as fh:
                for block in iter(lambda: fh.read(1 << 20), b""):
                    h.update(block)
            hashes.append(h.hexdigest())
        except OSError:
            hashes.append("")
        try:
            with Image.open(p) as im:
                sizes.append(tuple(int(v) for v in im.size))   # header only: no decode
        except Exception:  # noqa: BLE001 - any decoder failure: the size is unknown, the scan reports it
            sizes.append(None)
        fp = pixel_fingerprint(p) if sizes[-1] is not None else None
        if fp is not None:
            thumbs[k], has[k] = fp, True
        if progress is not None:
            progress(1)
    return hashes, sizes, thumbs, has


# --------------------------------------------------------------------------------------- features
def folder_features(report: Any, model: Any, head: str, data_config: dict, config: Any, *,
                    cache_dir: str | Path | None = None, device: str = "cpu", log: Log | None = None
                    ) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray], int]:
    """Pooled features of every split, through the feature cache.

    The key is the one ``finetune.features.fit_head_on_features`` uses for its un-augmented banks
    (split name, items, backbone digest, data_config, evaluation transform, numerics), so the banks
    are shared with a head-only finetune that uses the same ``cache_dir`` (on the CPU; on CUDA fit
    feeds uint8 batches normalised on the GPU, whose transform, and so key, differ).

    Returns:
        ``(features, valid, hits)``: per split a float32 (N, D) array (zeros where an image failed to
        decode) and a bool (N,) mask, and how many splits came from the cache.
    """
    dev = torch.device(device)
    model = model.to(dev)
    amp = bool(getattr(config, "amp", False)) and dev.type == "cuda"
    channels_last = bool(getattr(config, "channels_last", False)) and dev.type == "cuda"
    numerics = {"amp": amp, "device": dev.type, "channels_last": channels_last, "views": 0, "seed": None}
    transform = build_transform(data_config, False, config)
    cache = FeatureCache(cache_dir, log=log)
    weights = backbone_digest(model, head)
    feats: dict[str, np.ndarray] = {}
    valid: dict[str, np.ndarray] = {}
    hits = 0
    for split, image_set in report.sets().items():
        if not len(image_set):
            continue
        key = feature_cache_key(split=split, items=image_set.items, backbone=weights, data_config=data_config,
                                transform=transform, extra=numerics)

        def compute(image_set=image_set) -> FeatureBank:
            # The dataset's "label" is the item's index, so the rows that decoded are known.
            indexed = ImageSet([(p, i) for i, (p, _) in enumerate(image_set.items)], list(image_set.classes))
            f, idx = extract_features(model, head, ImageDataset(indexed, transform), int(config.batch_size),
                                      dev, workers=int(getattr(config, "workers", 0)), amp=amp,
                                      channels_last=channels_last)
            n = len(image_set.items)
            flat = f.reshape(f.shape[0], -1).float()
            out = torch.zeros((1, n, flat.shape[1]), dtype=torch.float32)
            labels = torch.full((n,), -1, dtype=torch.int64)
            out[0, idx] = flat
            labels[idx] = torch.tensor([image_set.items[i][1] for i in idx.tolist()], dtype=torch.int64)
            return FeatureBank(out, labels, tuple(f.shape[1:]))

        bank, hit = cache.get_or_compute(key, compute)
        hits += int(hit)
        feats[split] = np.asarray(bank.features[0], dtype=np.float32)
        valid[split] = np.asarray(bank.labels >= 0)
    return feats, valid, hits


def _normalise(x: np.ndarray) -> np.ndarray:
    norm = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.maximum(norm, 1e-12)


# ------------------------------------------------------------------------------------- duplicates
def _near_pairs(z: np.ndarray, threshold: float, block: int = 2048) -> list[tuple[int, int, float]]:
    """Pairs (i < j) with cosine similarity >= threshold, in blocks so memory stays O(block x N).

    A threshold of 1.0 (or more) means identical vectors, compared bit for bit: a float cosine of two
    vectors that differ lands on 1.0 or just under it depending on the BLAS, so at 1.0 it would decide by
    rounding. Below 1.0 the cosine is computed in float64, so that rounding moves it by ~1e-15, not ~1e-7.
    """
    z = np.ascontiguousarray(z, dtype=np.float32)
    out: list[tuple[int, int, float]] = []
    if threshold >= 1.0:
        seen: dict[bytes, int] = {}
        groups: dict[int, list[int]] = {}
        for i, row in enumerate(z):
            first = seen.setdefault(row.tobytes(), i)
            groups.setdefault(first, []).append(i)
        for members in groups.values():
            out.extend((a, b, 1.0) for k, a in enumerate(members) for b in members[k + 1:])
        return sorted(out)
    zt = torch.from_numpy(z).double()
    for start in range(0, zt.shape[0], block):
        sim = zt[start:start + block] @ zt.T
        rows, cols = torch.nonzero(sim >= threshold, as_tuple=True)
        for r, c in zip(rows.tolist(), cols.tolist()):
            i = start + r
            if c > i:
                out.append((i, c, float(sim[r, c])))
    return out


def _add_near_pairs(pairs: dict, vectors, mask, threshold: float) -> list[tuple[int, int]]:
    """Pairs of rows of ``vectors`` (those ``mask`` keeps; all if None) at cosine >= ``threshold`` that
    ``pairs`` lacks, added as near copies; returns the added keys."""
    added = []
    if vectors is None or not len(vectors):
        return added
    rows = np.flatnonzero(mask) if mask is not None else np.arange(len(vectors))
    for i, j, sim in _near_pairs(vectors[rows], threshold):
        key = (int(rows[i]), int(rows[j]))
        if key not in pairs:
            pairs[key] = (min(sim, 1.0), False)
            added.append(key)
    return added


def find_duplicates(paths: Sequence[str], splits: Sequence[str], labels: Sequence[str], hashes: Sequence[str],
                    z: np.ndarray | None, ok: np.ndarray | None, threshold: float,
                    thumbs: np.ndarray | None = None, has_thumb: np.ndarray | None = None,
                    pixel_threshold: float = 0.99) -> list[Finding]:
    """Exact (same sha256) and near copies, one row per pair. Near: cosine >= ``threshold`` on the
    L2-normalised features ``z``, or >= ``pixel_threshold`` on the pixel fingerprints ``thumbs``.

    Args:
        paths, splits, labels: per image (relative path, split name, class name).
        hashes: sha256 per image ("" when unreadable: never matched).
        z: L2-normalised features (N, D) or None; ok: rows of ``z`` that are valid.
        thumbs, has_thumb: :func:`pixel_fingerprint` rows and which exist (None: not used).
    """
    rank = {s: i for i, s in enumerate(SPLIT_ORDER)}
    pairs: dict[tuple[int, int], tuple[float, bool]] = {}
    by_hash: dict[str, list[int]] = {}
    for i, h in enumerate(hashes):
        if h:
            by_hash.setdefault(h, []).append(i)
    for group in by_hash.values():
        for a in range(len(group)):
            for b in range(a + 1, len(group)):
                pairs[(group[a], group[b])] = (1.0, True)
    _add_near_pairs(pairs, z, ok, threshold)
    pixel = set(_add_near_pairs(pairs, thumbs, has_thumb, pixel_threshold))
    findings = []
    for (i, j), (sim, exact) in pairs.items():
        # the training-side copy first (leaks), else sorted order: the second copy is the one to drop
        a, b = sorted((i, j), key=lambda k: (rank.get(splits[k], 9), paths[k]))
        how = ("exact copy (same bytes)" if exact else f"near copy (16x16 pixels cosine {sim:.4f})"
               if (i, j) in pixel else f"near copy (feature cosine {sim:.3f})")
        if splits[a] != splits[b]:
            kind, keep, drop = "leak", b, a
            detail = f"{how}: {splits[a]} image also in {splits[b]}"
        else:
            keep, drop = a, b
            kind = "duplicate" if labels[a] == labels[b] else "cross_class_duplicate"
            detail = how if kind == "duplicate" else f"{how} filed under {labels[a]!s} and {labels[b]!s}"
        findings.append(Finding(paths[drop], kind, round(sim, 4), paths[keep], splits[drop], labels[drop], detail))
    return findings


# ---------------------------------------------------------------------------------- wrong labels
def _fit_probe(x, y, n_classes: int, l2: float, iters: int):
    """Softmax regression by full-batch L-BFGS (strong Wolfe): returns (W, b) as torch tensors."""
    w = torch.zeros((x.shape[1], n_classes), dtype=x.dtype, requires_grad=True)
    b = torch.zeros((n_classes,), dtype=x.dtype, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], lr=1.0, max_iter=iters, history_size=20, line_search_fn="strong_wolfe",
                            tolerance_grad=1e-6, tolerance_change=1e-9)

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(x @ w + b, y) + l2 * (w * w).sum()
        loss.backward()
        return loss

    opt.step(closure)
    return w.detach(), b.detach()


def _folds(y: np.ndarray, k: int, seed: int) -> np.ndarray:
    """Fold index per sample: each class dealt round-robin after a seeded shuffle (stratified)."""
    rng = np.random.default_rng(seed)
    fold = np.zeros(len(y), dtype=np.int64)
    offset = 0
    for c in np.unique(y):
        idx = np.flatnonzero(y == c)
        rng.shuffle(idx)
        fold[idx] = (np.arange(len(idx)) + offset) % k
        offset += len(idx)   # small classes do not all start in fold 0
    return fold


def label_issues(z: np.ndarray, y: np.ndarray, n_classes: int, *, folds: int = 5, seed: int = 0,
                 l2: float = 1e-3, iters: int = 200) -> dict[str, np.ndarray]:
    """Out-of-fold class probabilities of a linear probe and the confident-learning flags.

    Args:
        z: features (N, D), L2-normalised; y: given labels (N,) in [0, n_classes).
    Returns:
        ``probs`` (N, C) out-of-fold, ``suggested`` (N,) the most probable other class,
        ``score`` (N,) ``p_suggested - p_given``, ``flagged`` (N,) bool: ``p_j >= t_j`` for some other
        class ``j`` (``t_j``: mean self-confidence of class ``j``), ``thresholds`` (C,).
    """
    x = torch.from_numpy(np.ascontiguousarray(z, dtype=np.float32))
    # Centred and scaled so one l2 value suits any feature width (the probe sees unit-variance inputs).
    x = x - x.mean(0, keepdim=True)
    x = x / x.pow(2).sum(1).mean().sqrt().clamp_min(1e-12) * math.sqrt(x.shape[1])
    yt = torch.from_numpy(np.asarray(y, dtype=np.int64))
    probs = torch.zeros((len(y), n_classes), dtype=torch.float32)
    fold = _folds(np.asarray(y), folds, seed)
    threads = torch.get_num_threads()
    # A small probe is thousands of tiny ops: one thread beats a team that mostly waits
    # (docs/benchmarks.md, "The doctor's label probe runs on one thread").
    small = x.numel() * n_classes < 20_000_000
    if small:
        torch.set_num_threads(1)
    try:
        for k in range(folds):
            test = torch.from_numpy(fold == k)
            if not bool(test.any()) or bool(test.all()):
                continue
            w, b = _fit_probe(x[~test], yt[~test], n_classes, l2, iters)
            probs[test] = torch.softmax(x[test] @ w + b, dim=1)
    finally:
        torch.set_num_threads(threads)
    p = probs.numpy().astype(np.float64)
    n = len(y)
    given = p[np.arange(n), y]
    thresholds = np.array([p[y == c, c].mean() if np.any(y == c) else 1.0 for c in range(n_classes)])
    others = p.copy()
    others[np.arange(n), y] = -1.0
    suggested = others.argmax(1)
    flagged = np.any(others >= thresholds[None, :], axis=1)
    # Among the classes over their threshold, the most probable is the suggestion (argmax otherwise).
    over = np.where(others >= thresholds[None, :], others, -1.0)
    suggested = np.where(flagged, over.argmax(1), suggested)
    score = p[np.arange(n), suggested] - given
    return {"probs": p, "suggested": suggested, "score": score, "flagged": flagged, "thresholds": thresholds}


# ---------------------------------------------------------------------------------------- outliers
def find_outliers(z: np.ndarray, y: np.ndarray, n_classes: int, z_max: float) -> tuple[np.ndarray, np.ndarray]:
    """(robust z-score, flagged) of the distance to the nearest class centroid (cosine distance)."""
    cents = np.stack([z[y == c].mean(0) if np.any(y == c) else np.zeros(z.shape[1]) for c in range(n_classes)])
    dist = 1.0 - (z @ _normalise(cents).T).max(1)
    med = np.median(dist)
    mad = np.median(np.abs(dist - med)) * 1.4826
    rz = (dist - med) / max(mad, 1e-9)
    return rz, rz > z_max


def file_findings(paths: Sequence[str], splits: Sequence[str], labels: Sequence[str],
                  sizes: Sequence[tuple[int, int] | None], options: DoctorOptions) -> list[Finding]:
    """Tiny images and extreme aspect ratios, from the header sizes."""
    out = []
    for p, s, c, size in zip(paths, splits, labels, sizes):
        if size is None:
            continue
        w, h = size
        short, long_ = min(w, h), max(w, h)
        if short < options.min_side:
            out.append(Finding(p, "tiny", float(short), "", s, c, f"{w}x{h} px, under {options.min_side} px"))
        if short > 0 and long_ / short > options.max_aspect:
            out.append(Finding(p, "aspect", round(long_ / short, 3), "", s, c,
                               f"{w}x{h} px, aspect {long_ / short:.1f} > {options.max_aspect:g}"))
    return out


# ------------------------------------------------------------------------------------------ doctor
def run_doctor(report: Any, model: Any = None, head: str | None = None, data_config: dict | None = None,
               config: Any = None, *, options: DoctorOptions | None = None, cache_dir: str | Path | None = None,
               device: str = "cpu", log: Log | None = None, progress: Callable[[str, int], Any] | None = None,
               features: dict[str, np.ndarray] | None = None) -> DoctorResult:
    """Every check on a scanned folder. Reads the images, writes nothing but the feature cache.

    Args:
        report: ``finetune.data.scan_folder(root)``.
        model, head, data_config, config: the pretrained network (its classifier module name), its
            preprocessing and a FinetuneConfig (batch_size, workers); model None: ``features`` given.
        options: thresholds (:class:`DoctorOptions`).
        cache_dir: feature cache folder (None: in memory, recomputed next time).
        progress: ``progress(desc, total)`` returns a tqdm-like bar (``update``, ``close``) or None.
        features: per split (N, D) features instead of running ``model`` (tests, precomputed banks).
    Raises:
        ValueError: an option out of range. FinetuneError: from the feature extraction.
    """
    options = (options or DoctorOptions()).validate()
    say = log or (lambda _m: None)
    seconds: dict[str, float] = {}
    classes = list(report.classes)
    sets = report.sets()
    paths_abs, splits, label_idx = [], [], []
    for split in SPLIT_ORDER:
        if split in sets:
            for p, y in sets[split].items:
                paths_abs.append(p)
                splits.append(split)
                label_idx.append(int(y))
    rel = [report.relpath(p) for p in paths_abs]
    labels = [classes[i] for i in label_idx]
    n = len(paths_abs)

    t0 = time.perf_counter()
    bar = progress("hashing files", n) if progress is not None else None
    hashes, sizes, thumbs, has_thumb = file_facts(paths_abs, (lambda k: bar.update(k)) if bar is not None else None)
    if bar is not None:
        bar.close()
    seconds["files"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    hits = 0
    if features is None:
        if model is None:
            raise ValueError("run_doctor needs a model (or precomputed features)")
        features, valid, hits = folder_features(report, model, head, data_config, config, cache_dir=cache_dir,
                                                device=device, log=log)
    else:
        valid = {s: np.ones(len(f), dtype=bool) for s, f in features.items()}
    seconds["features"] = time.perf_counter() - t0
    blocks = [features[s] for s in SPLIT_ORDER if s in sets and len(sets[s])]
    z = _normalise(np.concatenate(blocks).astype(np.float32)) if blocks else np.zeros((0, 1), np.float32)
    ok = np.concatenate([valid[s] for s in SPLIT_ORDER if s in sets and len(sets[s])]) if blocks else \
        np.zeros(0, bool)

    t0 = time.perf_counter()
    findings = find_duplicates(rel, splits, labels, hashes, z, ok, options.near_threshold, thumbs, has_thumb,
                               options.pixel_threshold)
    seconds["duplicates"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    y = np.asarray(label_idx, dtype=np.int64)
    rows = np.flatnonzero(ok)
    ranking: list[tuple[str, str, str, float]] = []
    probe_acc = math.nan
    present = np.unique(y[rows]) if len(rows) else np.zeros(0, np.int64)
    if len(present) >= 2 and len(rows) >= 2 * options.folds:
        li = label_issues(z[rows], y[rows], len(classes), folds=options.folds, seed=options.seed,
                          l2=options.probe_l2, iters=options.probe_iters)
        probe_acc = float((li["probs"].argmax(1) == y[rows]).mean())
        order = np.argsort(-li["score"], kind="stable")
        for k in order:
            i = int(rows[k])
            ranking.append((rel[i], labels[i], classes[int(li["suggested"][k])], float(li["score"][k])))
            if li["flagged"][k]:
                p_sug = li["probs"][k, li["suggested"][k]]
                findings.append(Finding(rel[i], "wrong_label", round(float(li["score"][k]), 4),
                                        classes[int(li["suggested"][k])], splits[i], labels[i],
                                        f"labelled {labels[i]}, probe says {classes[int(li['suggested'][k])]} "
                                        f"(p={p_sug:.2f} vs {li['probs'][k, y[i]]:.2f})"))
        rz, out = find_outliers(z[rows], y[rows], len(classes), options.outlier_z)
        for k in np.flatnonzero(out):
            i = int(rows[k])
            findings.append(Finding(rel[i], "outlier", round(float(rz[k]), 3), "", splits[i], labels[i],
                                    f"far from every class centroid (robust z {rz[k]:.1f})"))
    else:
        say("doctor: fewer than two classes or too few images for the label and outlier checks")
    seconds["probe"] = time.perf_counter() - t0

    findings += file_findings(rel, splits, labels, sizes, options)
    findings += _scan_findings(report, classes, options)
    kind_rank = {k: i for i, k in enumerate(FINDING_ORDER)}
    findings.sort(key=lambda f: (kind_rank.get(f.finding, 99), -f.score if f.finding != "tiny" else f.score,
                                 f.path))
    return DoctorResult(root=str(report.root), classes=classes, counts=report.counts(), findings=findings,
                        options=options, images=n, label_ranking=ranking, probe_accuracy=probe_acc,
                        seconds=seconds, feature_cache_hits=hits)


def _scan_findings(report: Any, classes: list[str], options: DoctorOptions) -> list[Finding]:
    out = [Finding(report.relpath(p), "unreadable", 1.0, "", "", "", reason) for p, reason in report.bad_files]
    counts = report.train.class_counts()
    nonzero = [c for c in counts if c > 0]
    median = float(np.median(nonzero)) if nonzero else 0.0
    for name, c in zip(classes, counts):
        if median and c < options.small_class_ratio * median:
            out.append(Finding(name, "small_class", round(c / median, 3), "", "train", name,
                               f"{c} training images, the median class has {median:g}"))
    out += [Finding("", "scan_warning", 0.0, "", "", "", w) for w in report.warnings]
    return out


# -------------------------------------------------------------------------------------- csv, exclude
def write_findings_csv(findings: Iterable[Finding], path: str | Path) -> None:
    """findings.csv: CSV_COLUMNS, one row per finding, UTF-8 (atomic)."""
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(CSV_COLUMNS)
    for f in findings:
        d = asdict(f)
        w.writerow([printable_name(str(d[c])) if isinstance(d[c], str) else d[c] for c in CSV_COLUMNS])
    atomic_write_text(path, buf.getvalue())


def read_exclude_file(path: str | Path, kinds: Sequence[str] = EXCLUDE_KINDS) -> list[str]:
    """Paths listed in ``path``: a findings.csv (its ``path`` column, rows of ``kinds`` only) or a
    plain list (one path per line, ``#`` comments). Paths are returned as written (relative to the data
    folder, or absolute).

    Raises:
        ValueError: the file cannot be read or holds no path.
    """
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise ValueError(f"cannot read the exclude file {path}: {e}") from None
    lines = text.splitlines()
    out: list[str] = []
    if lines and lines[0].strip().split(",")[:2] == ["path", "finding"]:
        for row in csv.DictReader(io.StringIO(text)):
            if row.get("path") and row.get("finding") in kinds:
                out.append(row["path"])
    else:
        out = [ln.strip() for ln in lines if ln.strip() and not ln.lstrip().startswith("#")]
    return list(dict.fromkeys(out))


def exclude_items(report: Any, paths: Sequence[str]) -> tuple[int, list[str]]:
    """Drop ``paths`` (relative to the report's root, or absolute) from its train and val sets in place.

    Returns:
        (number of images removed, the listed paths that matched no train/val image).
    """
    wanted = {os.path.normpath(p if os.path.isabs(p) else os.path.join(report.root, p)) for p in paths}
    seen: set[str] = set()
    removed = 0
    for s in (report.train, report.val):
        keep = []
        for p, y in s.items:
            norm = os.path.normpath(p)
            if norm in wanted:
                seen.add(norm)
                removed += 1
            else:
                keep.append((p, y))
        s.items[:] = keep
    unmatched = sorted(report.relpath(p) for p in wanted - seen)
    return removed, unmatched
