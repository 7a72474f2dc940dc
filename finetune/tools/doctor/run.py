"""``run_doctor``: every check on a scanned folder, over the pooled backbone features from the feature cache."""
from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from finetune.core.metrics import probability_text
from finetune.data import ImageDataset, ImageSet, build_transform
from finetune.engine.runtime import nhwc
from finetune.tools.doctor.checks import (NEAR_FLOOR, copy_threshold, l2_normalise, file_facts, file_findings,
                                          find_duplicates, find_outliers)
from finetune.tools.doctor.labels import MIN_PROBE_IMAGES, label_issues
from finetune.tools.doctor.findings import FINDING_ORDER, SPLIT_ORDER, DoctorOptions, DoctorResult, Finding, Log
from finetune.core.distributed import DistInfo
from finetune.tools.features import (FeatureBank, FeatureCache, agreed_load, backbone_digest, extract_features,
                                     feature_cache_key, mirrored)


# --------------------------------------------------------------------------------------- features
def folder_features(report: Any, model: Any, head: str, data_config: dict, config: Any, *,
                    cache_dir: str | Path | None = None, device: str = "cpu", log: Log | None = None,
                    quiet: bool = True) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray], int]:
    """Pooled features of every split, through the feature cache.

    The key is the one ``finetune.tools.features.CachedHeadSteps`` uses for its un-augmented banks
    (split name, items, backbone digest, data_config, evaluation transform, numerics, the layout of
    ``finetune.engine.runtime.nhwc``), so the banks are shared with a finetune's head phase on cached
    features that uses the same ``cache_dir`` (on the CPU, head-only or not; on CUDA fit feeds uint8
    batches normalised on the GPU, whose transform, and so key, differ); without a bank of that key, the plain
    view of the run's mirrored training bank (its default) is taken (``agreed_load``).

    Not ``quiet``: a progress bar per split computed (off a terminal a line a minute; the doctor's longest pass).

    Returns:
        ``(features, valid, hits)``: per split a float32 (N, D) array (zeros where an image failed to
        decode) and a bool (N,) mask, and how many splits came from the cache.
    """
    dev = torch.device(device)
    model = model.to(dev)
    amp = bool(getattr(config, "amp", False)) and dev.type == "cuda"
    channels_last = nhwc(dev, bool(getattr(config, "channels_last", False)), trains=False)   # fit's layout
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
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
        key, mirrored_key = (feature_cache_key(split=split, items=image_set.items, backbone=weights,
                                               data_config=data_config, transform=transform, extra=extra)
                             for extra in (numerics, mirrored(numerics)))

        def compute(image_set=image_set) -> FeatureBank:
            # The dataset's "label" is the item's index, so the rows that decoded are known.
            indexed = ImageSet([(p, i) for i, (p, _) in enumerate(image_set.items)], list(image_set.classes))
            f, idx = extract_features(model, head, ImageDataset(indexed, transform), int(config.batch_size),
                                      dev, workers=int(getattr(config, "workers", 0)), amp=amp,
                                      channels_last=channels_last, desc=f"features {split}", quiet=quiet)
            n = len(image_set.items)
            flat = f.reshape(f.shape[0], -1).float()
            out = torch.zeros((1, n, flat.shape[1]), dtype=torch.float32)
            labels = torch.full((n,), -1, dtype=torch.int64)
            out[0, idx] = flat
            labels[idx] = torch.tensor([image_set.items[i][1] for i in idx.tolist()], dtype=torch.int64)
            return FeatureBank(out, labels, tuple(f.shape[1:]))

        def load(key=key, mirrored_key=mirrored_key) -> FeatureBank | None:
            # no bank of this key: the plain view of a default run's training bank (mirrored), not stored again
            return agreed_load(cache, key, DistInfo(), view_of=mirrored_key)

        bank, hit = cache.get_or_compute(key, compute, load)
        hits += int(hit)
        feats[split] = np.asarray(bank.features[0], dtype=np.float32)
        valid[split] = np.asarray(bank.labels >= 0)
    return feats, valid, hits


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
    paths_abs = [p for split in SPLIT_ORDER if split in sets for p, _ in sets[split].items]
    splits = [split for split in SPLIT_ORDER if split in sets for _ in sets[split].items]
    label_idx = [int(y) for split in SPLIT_ORDER if split in sets for _, y in sets[split].items]
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
    quiet = progress is None or bool(getattr(config, "quiet", False))     # bars as the file pass's: with progress
    if features is None:
        if model is None:
            raise ValueError("run_doctor needs a model (or precomputed features)")
        features, valid, hits = folder_features(report, model, head, data_config, config, cache_dir=cache_dir,
                                                device=device, log=log, quiet=quiet)
    else:
        valid = {s: np.ones(len(f), dtype=bool) for s, f in features.items()}
    seconds["features"] = time.perf_counter() - t0
    blocks = [features[s] for s in SPLIT_ORDER if s in sets and len(sets[s])]
    z = l2_normalise(np.concatenate(blocks).astype(np.float32)) if blocks else np.zeros((0, 1), np.float32)
    ok = np.concatenate([valid[s] for s in SPLIT_ORDER if s in sets and len(sets[s])]) if blocks else \
        np.zeros(0, bool)

    t0 = time.perf_counter()
    near = options.near_threshold
    if near is None:
        near, reference = copy_threshold(z, ok, labels, seed=options.seed)
        if near > NEAR_FLOOR:
            say(f"near copies by features: cosine >= {near:.3f}, not {NEAR_FLOOR:g}: images of different classes "
                f"are this alike here (95th percentile of each image's most similar other-class image: "
                f"{reference:.3f}); copies by bytes and by pixels are found as always")
    findings = find_duplicates(rel, splits, labels, hashes, z, ok, near, thumbs, has_thumb,
                               options.pixel_threshold)
    seconds["duplicates"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    found, ranking, probe_acc, probe_l2, fold_l2 = _probe_findings(
        z, ok, np.asarray(label_idx, dtype=np.int64), rel, splits, labels, classes, options, say, quiet)
    findings += found
    seconds["probe"] = time.perf_counter() - t0

    findings += file_findings(rel, splits, labels, sizes, options)
    findings += _scan_findings(report, classes, options)
    kind_rank = {k: i for i, k in enumerate(FINDING_ORDER)}
    findings.sort(key=lambda f: (kind_rank.get(f.finding, 99), -f.score if f.finding != "tiny" else f.score,
                                 f.path))
    return DoctorResult(root=str(report.root), classes=classes, counts=report.counts(), findings=findings,
                        options=options, images=n, label_ranking=ranking, probe_accuracy=probe_acc,
                        probe_l2=probe_l2, probe_fold_l2=fold_l2,
                        seconds=seconds, feature_cache_hits=hits, near_used=near)


def _probe_findings(z: np.ndarray, ok: np.ndarray, y: np.ndarray, rel: list[str], splits: list[str],
                    labels: list[str], classes: list[str], options: DoctorOptions, say: Log, quiet: bool = True
                    ) -> tuple[list[Finding], list[tuple[str, str, str, float]], float, float, list[float]]:
    """Wrong labels (out-of-fold probe) and outliers over the images whose features are valid (``ok``).

    Returns:
        (findings, every image ranked by the probe's suspicion, the probe's out-of-fold accuracy, its L2 (the
        last fold's), each fold's L2).
    """
    findings: list[Finding] = []
    rows = np.flatnonzero(ok)
    ranking: list[tuple[str, str, str, float]] = []
    probe_acc = probe_l2 = math.nan
    fold_l2: list[float] = []
    present = np.unique(y[rows]) if len(rows) else np.zeros(0, np.int64)
    if len(present) >= 2 and len(rows) >= 2 * options.folds:
        li = label_issues(z[rows], y[rows], len(classes), folds=options.folds, seed=options.seed,
                          l2=options.probe_l2, iters=options.probe_iters, quiet=quiet)
        probe_acc = float((li["probs"].argmax(1) == y[rows]).mean())
        probe_l2, fold_l2 = float(li["l2"]), [float(v) for v in li["fold_l2"]]
        order = np.argsort(-li["score"], kind="stable")
        for k in order:
            i = int(rows[k])
            ranking.append((rel[i], labels[i], classes[int(li["suggested"][k])], float(li["score"][k])))
            if li["flagged"][k]:
                p_sug = li["probs"][k, li["suggested"][k]]
                findings.append(Finding(rel[i], "wrong_label", round(float(li["score"][k]), 4),
                                        classes[int(li["suggested"][k])], splits[i], labels[i],
                                        f"labelled {labels[i]}, probe says {classes[int(li['suggested'][k])]} "
                                        f"({probability_text(p_sug)} vs {probability_text(li['probs'][k, y[i]])})"))
        _say_unjudged(y[rows], classes, say)
        _say_many_flagged(int(li["flagged"].sum()), len(rows), probe_acc, say)
        rz, out = find_outliers(z[rows], y[rows], len(classes), options.outlier_z)
        for k in np.flatnonzero(out):
            i = int(rows[k])
            findings.append(Finding(rel[i], "outlier", round(float(rz[k]), 3), "", splits[i], labels[i],
                                    f"far from every class centroid (robust z {rz[k]:.1f})"))
    else:
        say("doctor: fewer than two classes or too few images for the label and outlier checks")
    return findings, ranking, probe_acc, probe_l2, fold_l2


def _say_unjudged(y: np.ndarray, classes: list[str], say: Log) -> None:
    """Name the classes ``label_issues`` leaves unjudged (fewer than MIN_PROBE_IMAGES images): without this line
    a folder of 4 images per class had no wrong_label finding and no word that its labels went unchecked."""
    counts = np.bincount(y, minlength=len(classes))
    few = [classes[c] for c in np.flatnonzero((counts > 0) & (counts < MIN_PROBE_IMAGES))]
    if few:
        shown = ", ".join(few[:5]) + (f", ... ({len(few) - 5} more)" if len(few) > 5 else "")
        say(f"doctor: the labels of {len(few)} class{'es' if len(few) > 1 else ''} of fewer than {MIN_PROBE_IMAGES} "
            f"images are not checked ({shown}): the probe that would judge an image of such a class learns too "
            "little of it; add images to check them")


# A share of the judged images above which the wrong_label rows read as classes the features cannot tell apart
FLAGGED_SHARE_NOTE = 0.1


def _say_many_flagged(flagged: int, judged: int, accuracy: float, say: Log) -> None:
    """Say so when the probe calls more than FLAGGED_SHARE_NOTE of the judged images wrong labels: a weak probe's
    thresholds (each class's mean self-confidence) are low, and it flags whole classes that the features cannot
    tell apart (helper-83: 3,961 of 25,000 images at 100 classes, every image at 1,000 classes of 10 images), and
    ``--exclude findings.csv`` drops every one of them."""
    if judged and flagged > FLAGGED_SHARE_NOTE * judged:
        say(f"doctor: the probe calls {flagged:,} of {judged:,} images ({flagged / judged:.0%}) wrong labels at "
            f"out-of-fold accuracy {accuracy:.0%}: more likely classes the features cannot tell apart than label "
            "errors; look at the suggested classes in findings.csv first, since --exclude findings.csv drops every "
            "wrong_label row")


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

