"""The doctor's checks, each on arrays: file facts and pixel fingerprints, exact and near duplicates (leaks
across splits), outliers, tiny / extreme-aspect images."""
from __future__ import annotations

import math
from contextlib import closing
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import torch
from PIL import Image

from finetune.core.host import usable_cpus
from finetune.core.io import sha256_file
from finetune.core.threads import ordered_map
from finetune.data import load_image, pil_warnings
from finetune.data.files import CHECK_THREADS
from finetune.data.images import named_stream, open_image, special_file
from finetune.tools.doctor.findings import SPLIT_ORDER, DoctorOptions, Finding


# ------------------------------------------------------------------------------------------ files
THUMB_SIDE = 16    # pixel fingerprint: luma at 16x16, the two chroma channels at 8x8 (see pixel_fingerprint)
THUMB_VALUES = THUMB_SIDE ** 2 + 2 * (THUMB_SIDE // 2) ** 2


def pixel_fingerprint(path: str) -> np.ndarray | None:
    """The image (EXIF-upright, transparency on white, as training sees it) shrunk to 16x16 pixels in
    JPEG's colour space (YCbCr): luma at 16x16, each chroma channel averaged over 2x2 cells (8x8, as JPEG
    subsamples it) and weighted 2, so that per area it counts as much as luma; each channel mean-centred,
    the whole L2-normalised (384 values). None when it cannot be decoded or is flat.

    Re-encoding and resizing barely move it (JPEG q60 / 70 % resized copies of the stamps photos: cosine
    >= 0.99 but for a few) while different photos stay below 0.93 (docs/doctor.md): the net for near
    copies that the pretrained features, which JPEG artefacts move more (cosine down to 0.79), let
    through. Colour counts: the same shapes in red and in blue, which the former 16x16 grey levels called
    identical (cosine 1), have cosine 0.70-0.80: not copies (colour classes: ripeness, product colours). A
    grey image has no chroma: its fingerprint is its luma, as before.
    """
    try:
        # A big JPEG is decoded at a reduced scale, but to no less than 8 pixels per thumbnail cell: at 4 (64 px)
        # libjpeg's scaled decode moved the JPEG q60 copy of a 161x131 photo to cosine 0.976-0.98 (missed).
        im = load_image(path, THUMB_SIDE * 8, checked=True).convert("YCbCr").resize((THUMB_SIDE, THUMB_SIDE), Image.BOX)
    except Exception:  # noqa: BLE001 - an undecodable image has no fingerprint; the scan reports it
        return None
    ycc = np.asarray(im, dtype=np.float32)
    half = THUMB_SIDE // 2
    chroma = ycc[..., 1:].reshape(half, 2, half, 2, 2).mean(axis=(1, 3)) * 2.0
    parts = (ycc[..., 0].ravel(), chroma[..., 0].ravel(), chroma[..., 1].ravel())
    v = np.concatenate([c - c.mean() for c in parts])
    n = float(np.linalg.norm(v))
    return v / n if n > 1e-6 else None      # a flat image matches everything: no fingerprint


_QUARTER_TURNS = (5, 6, 7, 8)     # EXIF orientations that show the picture turned by 90 degrees


def _shown_size(im: Image.Image) -> tuple[int, int]:
    """(width, height) of an opened image as it is seen and trained on (load_image applies the EXIF rotation),
    from the header: EXIF (or an XMP packet, whose orientation Pillow applies too) is parsed only when the header
    holds it (PNG's getexif would decode the pixels)."""
    w, h = (int(v) for v in im.size)
    try:
        turned = ("exif" in im.info or "xmp" in im.info) and im.getexif().get(0x0112) in _QUARTER_TURNS
    except Exception:  # noqa: BLE001 - a damaged EXIF block costs the rotation, not the size
        turned = False
    return (h, w) if turned else (w, h)


_BOMB = object()       # _facts_of: the header says between 1x and 2x PIL's pixel limit (its size is read after)
_FACTS_RUN = 16        # files per thread task (check_files takes 64): a Ctrl-C waits for at most 16 per thread
FILE_THREADS = CHECK_THREADS    # at most, as the scan's file checks (finetune.data.files.check_files)
FEW_CPUS = 4           # up to this many cores, no threads (resolve_workers' CPU rule; docs/benchmarks.md)


def file_facts(paths: Sequence[str], progress: Callable[[int], None] | None = None, threads: int | None = None
               ) -> tuple[list[str], list[tuple[int, int] | None], np.ndarray, np.ndarray]:
    """Per path: sha256 of the bytes, (width, height) from the header or None, the pixel fingerprint
    (rows of an (N, THUMB_VALUES) array, zeros when missing) and whether it exists. Read only.

    ``threads``: files read at once (None: :func:`file_threads`), in runs, the results in input order and the same
    to the bit as on one thread; ``progress(1)`` is called per file on the calling thread, in order."""
    hashes: list[str] = []
    sizes: list[tuple[int, int] | None] = []
    thumbs = np.zeros((len(paths), THUMB_VALUES), dtype=np.float32)
    has = np.zeros(len(paths), dtype=bool)
    threads = file_threads(paths) if threads is None else int(threads)
    bombs = []
    # pil_warnings (catch_warnings) is not thread-safe: entered once here, around the threads (zoo.predict._prepared);
    # each file's own (load_image's) sets the same filters, so every interleaving reads under them.
    with pil_warnings(), closing(_facts_in_order(paths, threads)) as facts:   # closed (its threads joined) first
        for k, (digest, size, fp) in enumerate(facts):
            hashes.append(digest)
            sizes.append(size)
            if size is _BOMB:
                bombs.append(k)
            if fp is not None:
                thumbs[k], has[k] = fp, True
            if progress is not None:
                progress(1)
    for k in bombs:                # the threads are done: the header is read under "ignore" for its size
        sizes[k] = _header_size(paths[k])
    return hashes, sizes, thumbs, has


def file_threads(paths: Sequence[str]) -> int:
    """Threads for :func:`file_facts`: ``FILE_THREADS``, no more than the cores, where the files are two runs or
    more and the machine has more than ``FEW_CPUS`` cores (on the 2 cores here threads gave no gain that held from
    one sitting to the next; docs/benchmarks.md); none where a stream is among the files (zoo.predict's rule,
    ``named_stream``: a Ctrl-C would wait for its writer)."""
    cpus = usable_cpus()
    if cpus <= FEW_CPUS or len(paths) < 2 * _FACTS_RUN or any(named_stream(p) for p in paths):
        return 0
    return min(FILE_THREADS, cpus)


def _facts_in_order(paths: Sequence[str], threads: int) -> Iterator[tuple[str, Any, np.ndarray | None]]:
    """:func:`_facts_of` of each path in order, on ``threads`` threads (0: here), in runs of ``_FACTS_RUN`` files, up
    to two runs per thread ahead (a run's results are held until consumed: all at once doubled the fingerprints'
    memory). A Ctrl-C or an error in the consumer drops the runs not started and waits only for those being read."""
    if threads <= 0:
        yield from map(_facts_of, paths)
        return
    runs = (paths[start:start + _FACTS_RUN] for start in range(0, len(paths), _FACTS_RUN))
    with closing(ordered_map(_facts_run, runs, threads, 2 * threads, "zoo-doctor-files")) as done:
        for run in done:
            yield from run


def _facts_run(paths: Sequence[str]) -> list[tuple[str, Any, np.ndarray | None]]:
    return [_facts_of(p) for p in paths]


def _facts_of(path: str) -> tuple[str, Any, np.ndarray | None]:
    """(sha256 or "" when unreadable, shown size or None or ``_BOMB``, fingerprint or None) of one file, under
    ``pil_warnings()`` entered by the caller. A pipe, socket or device is not opened, as load_image refuses it: a
    pipe's open waits for a writer (the serial pass hung on one), and a thread left in it would outlive a Ctrl-C."""
    if special_file(path) is not None:
        return "", None, None
    try:
        digest = sha256_file(path)
    except OSError:
        digest = ""
    try:
        with open_image(path) as im:
            size = _shown_size(im)   # header only: no decode
    except Image.DecompressionBombWarning:   # load_image refuses it (no fingerprint); its size is read later
        return digest, _BOMB, None
    except Exception:  # noqa: BLE001 - any decoder failure: the size is unknown, the scan reports it
        return digest, None, None
    return digest, size, pixel_fingerprint(path)


def _header_size(path: str) -> tuple[int, int] | None:
    try:
        with pil_warnings(bombs="ignore"), open_image(path) as im:
            return _shown_size(im)
    except Exception:  # noqa: BLE001 - as in _facts_of
        return None


def l2_normalise(x: np.ndarray) -> np.ndarray:
    norm = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.maximum(norm, 1e-12)


# ------------------------------------------------------------------------------------- duplicates
NEAR_PER_KIND = 5      # near copies listed per image and kind (leak, duplicate, cross-class duplicate)


def _near_pairs(z: np.ndarray, threshold: float, order: np.ndarray, split: np.ndarray, label: np.ndarray,
                block: int = 1024) -> list[tuple[int, int, float]]:
    """Pairs (i < j) with cosine similarity >= threshold, each found from the image of the two that is dropped
    (the later in ``order``, the keep order), at most ``NEAR_PER_KIND`` per image and kind (the most similar copies in
    another split, in its class, in another class of its split: ``split`` and ``label`` are codes per row), in
    blocks so memory stays O(block x N). Every pair was listed: a class of 1,000 near-identical video frames is
    half a million pairs, 10,000 frames would not fit in memory (QA).

    The vectors are distinct (identical ones are grouped before): a threshold of 1.0 (or more) finds nothing,
    as a float cosine of two vectors that differ lands on 1.0 or just under it depending on the BLAS. Below
    1.0 the cosine is computed in float64, so that rounding moves it by ~1e-15, not ~1e-7.
    """
    out: list[tuple[int, int, float]] = []
    if threshold >= 1.0 or len(z) < 2:
        return out
    zt = torch.from_numpy(np.ascontiguousarray(z, dtype=np.float32)).double()
    order_t, split_t, label_t = (torch.as_tensor(np.asarray(a, dtype=np.int64)) for a in (order, split, label))
    for start in range(0, zt.shape[0], block):
        rows = slice(start, start + block)
        sim = zt[rows] @ zt.T
        found = (sim >= threshold) & (order_t[None, :] < order_t[rows, None])     # partners kept before the row
        if not bool(found.any()):
            continue
        same_split, same_label = split_t[None, :] == split_t[rows, None], label_t[None, :] == label_t[rows, None]
        for mask in (found & ~same_split, found & same_split & same_label, found & same_split & ~same_label):
            hit = torch.nonzero(mask.any(dim=1)).flatten()
            if not len(hit):
                continue
            best, cols = sim[hit].masked_fill(~mask[hit], -math.inf).topk(min(NEAR_PER_KIND, zt.shape[0]), dim=1)
            for r, values, partners in zip(hit.tolist(), best.tolist(), cols.tolist()):
                out += [(min(start + r, c), max(start + r, c), v) for v, c in zip(values, partners) if v > -math.inf]
    return out


NEAR_FLOOR = 0.95          # the auto feature threshold's lowest value (photos: docs/doctor.md)
_REFERENCE_QUERIES = 2000  # images whose nearest other-class neighbour sets the auto threshold (a seeded sample)


def copy_threshold(z: np.ndarray, ok: np.ndarray, labels: Sequence[str], seed: int = 0) -> tuple[float, float]:
    """The auto feature threshold for near copies, and the reference ``p`` it rests on.

    Images of different classes are not copies of each other (but for a few mislabelled ones). For each
    image (a seeded sample of at most 2,000), take its most similar image of another class; ``p`` is the
    95th percentile of those cosines (the top 5% may be such copies). A copy must be closer to identical
    than that: the threshold is max(NEAR_FLOOR, p + (1 - p) / 2). On photos p is far lower (0.53-0.59
    measured), so NEAR_FLOOR stands; on upscaled handwritten digits p is 0.952 and the threshold 0.976,
    above the 0.95-0.968 of distinct digits that were reported as 140 leaks (docs/doctor.md). ``p`` is NaN
    with fewer than two classes."""
    rows = np.flatnonzero(ok)
    lab = np.asarray(labels, dtype=object)[rows]
    if len(set(lab.tolist())) < 2:
        return NEAR_FLOOR, math.nan
    queries = rows if len(rows) <= _REFERENCE_QUERIES else np.sort(
        np.random.default_rng(seed).choice(rows, _REFERENCE_QUERIES, replace=False))
    everyone = torch.from_numpy(np.ascontiguousarray(z[rows], dtype=np.float32)).double()
    index = {int(r): k for k, r in enumerate(rows)}
    codes = {c: k for k, c in enumerate(sorted(set(lab.tolist())))}
    cls = torch.tensor([codes[c] for c in lab.tolist()])
    best = []
    for start in range(0, len(queries), 512):
        q = torch.tensor([index[int(r)] for r in queries[start:start + 512]])
        sim = everyone[q] @ everyone.T
        sim[cls[q][:, None] == cls[None, :]] = -math.inf         # same class (the image itself too)
        best.append(sim.max(dim=1).values)
    p = float(np.quantile(torch.cat(best).numpy(), 0.95))
    return max(NEAR_FLOOR, p + (1.0 - p) / 2.0), p


def _star(pairs: dict, group: list[int], kept, splits: Sequence[str], labels: Sequence[str], sim: float,
          exact: bool) -> list[tuple[int, int]]:
    """Pair each image of ``group`` (copies of one another) in another split than the one kept overall
    (``kept``: the sort key) with it, a leak; in the kept one's split, each with the one kept in its class, and
    those with the one kept overall. Add the pairs ``pairs`` lacks and return them. A group of n copies is n - 1
    rows, one per copy to drop, each a duplicate, a cross-class duplicate or a leak as a pair of them would be:
    every pair was n(n-1)/2 rows (3,000 copies of a placeholder image: 4.5 million findings, a 466 MB
    findings.csv and 3 GB of memory) (QA). Every copy in another split is a leak (review: paired within its
    split, 16,000 training copies of a validation image were one leak and 15,999 duplicates)."""
    added: list[tuple[int, int]] = []

    def link(members: list[int]) -> int:
        centre = min(members, key=kept)
        for m in members:
            key = (min(m, centre), max(m, centre))
            if m != centre and key not in pairs:
                pairs[key] = (sim, exact)
                added.append(key)
        return centre

    home = splits[min(group, key=kept)]
    by_label: dict[str, list[int]] = {}
    for m in group:
        if splits[m] == home:
            by_label.setdefault(labels[m], []).append(m)
    centre = link([link(members) for members in by_label.values()])
    link([centre] + [m for m in group if splits[m] != home])
    return added


def _add_near_pairs(pairs: dict, vectors, mask, threshold: float, kept, splits: Sequence[str],
                    labels: Sequence[str]) -> list[tuple[int, int]]:
    """Pairs of rows of ``vectors`` (those ``mask`` keeps; all if None) at cosine >= ``threshold`` that
    ``pairs`` lacks, added as near copies; returns the added keys. Rows with identical vectors are one group
    (:func:`_star`), compared with the others through the one it keeps; a near copy found for it is one for
    every row of its group: each in another split than the copy kept of the two is that leak too (helper-63:
    of two training images with the same features near a validation image, one was the leak and the other
    only its duplicate, as it happened to sort)."""
    added: list[tuple[int, int]] = []
    if vectors is None or not len(vectors):
        return added
    rows = np.flatnonzero(mask) if mask is not None else np.arange(len(vectors))
    same: dict[bytes, list[int]] = {}
    for r in rows:
        same.setdefault(np.ascontiguousarray(vectors[r], dtype=np.float32).tobytes(), []).append(int(r))
    reps, groups = [], {}
    for group in same.values():
        added += _star(pairs, group, kept, splits, labels, 1.0, False)
        reps.append(min(group, key=kept))
        groups[reps[-1]] = group
    reps = np.asarray(sorted(reps), dtype=np.int64)
    position = np.empty(len(reps), dtype=np.int64)
    position[sorted(range(len(reps)), key=lambda k: kept(int(reps[k])))] = np.arange(len(reps))
    codes = [np.unique(np.asarray([str(v[r]) for r in reps], dtype=object), return_inverse=True)[1]
             for v in (splits, labels)]
    for i, j, sim in _near_pairs(vectors[reps], threshold, position, *codes):
        keep, drop = sorted((int(reps[i]), int(reps[j])), key=kept)
        ties = [m for m in groups[drop] if m != drop and splits[m] != splits[keep]]   # linear in the group
        for m in [drop, *ties]:
            key = (min(m, keep), max(m, keep))
            if key not in pairs:
                pairs[key] = (min(sim, 1.0), False)
                added.append(key)
    return added


def find_duplicates(paths: Sequence[str], splits: Sequence[str], labels: Sequence[str], hashes: Sequence[str],
                    z: np.ndarray | None, ok: np.ndarray | None, threshold: float,
                    thumbs: np.ndarray | None = None, has_thumb: np.ndarray | None = None,
                    pixel_threshold: float = 0.99) -> list[Finding]:
    """Exact (same sha256) and near copies, one row per pair: near, cosine >= ``threshold`` on the
    L2-normalised features ``z``, or >= ``pixel_threshold`` on the pixel fingerprints ``thumbs``. Identical
    copies (the same bytes, features or fingerprint) are one row per copy, against the one kept; an image with
    many near copies lists the ``NEAR_PER_KIND`` most similar of each kind. Either way the images a row drops
    (``path``) are those a row per pair would drop.

    Args:
        paths, splits, labels: per image (relative path, split name, class name).
        hashes: sha256 per image ("" when unreadable: never matched).
        z: L2-normalised features (N, D) or None; ok: rows of ``z`` that are valid.
        thumbs, has_thumb: :func:`pixel_fingerprint` rows and which exist (None: not used).
    """
    rank = {s: i for i, s in enumerate(SPLIT_ORDER)}

    def kept(k: int) -> tuple:      # of two copies, the held-out one is kept (a leak), else the first by path
        return -rank.get(splits[k], 9), paths[k]

    pairs: dict[tuple[int, int], tuple[float, bool]] = {}
    by_hash: dict[str, list[int]] = {}
    for i, h in enumerate(hashes):
        if h:
            by_hash.setdefault(h, []).append(i)
    for group in by_hash.values():
        _star(pairs, group, kept, splits, labels, 1.0, True)
    _add_near_pairs(pairs, z, ok, threshold, kept, splits, labels)
    pixel = set(_add_near_pairs(pairs, thumbs, has_thumb, pixel_threshold, kept, splits, labels))
    findings = []
    for (i, j), (sim, exact) in sorted(pairs.items()):
        # the training-side copy first (leaks), else sorted order: the second copy is the one to drop
        a, b = sorted((i, j), key=lambda k: (rank.get(splits[k], 9), paths[k]))
        how = ("exact copy (same bytes)" if exact else f"near copy (16x16 pixels cosine {sim:.4f})"
               if (i, j) in pixel else f"near copy (feature cosine {sim:.3f})")
        if splits[a] != splits[b]:
            kind, keep, drop = "leak", b, a
            detail = f"{how}: {splits[a]} image also in {splits[b]}" + (
                f", filed under {labels[a]!s} and {labels[b]!s}" if labels[a] != labels[b] else "")
        else:
            keep, drop = a, b
            kind = "duplicate" if labels[a] == labels[b] else "cross_class_duplicate"
            detail = how if kind == "duplicate" else f"{how} filed under {labels[a]!s} and {labels[b]!s}"
        findings.append(Finding(paths[drop], kind, round(sim, 4), paths[keep], splits[drop], labels[drop], detail))
    return findings


# ---------------------------------------------------------------------------------------- outliers
def find_outliers(z: np.ndarray, y: np.ndarray, n_classes: int, z_max: float) -> tuple[np.ndarray, np.ndarray]:
    """(robust z-score, flagged) of the distance to the nearest class centroid (cosine distance)."""
    cents = np.stack([z[y == c].mean(0) if np.any(y == c) else np.zeros(z.shape[1]) for c in range(n_classes)])
    dist = 1.0 - (z @ l2_normalise(cents).T).max(1)
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

