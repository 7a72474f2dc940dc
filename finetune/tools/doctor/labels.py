"""Likely wrong labels: an out-of-fold linear probe on the features, its L2 strength chosen by its held-out loss,
and confident learning's flags (Northcutt, Jiang and Chuang, "Confident Learning: Estimating Uncertainty in Dataset
Labels", JAIR 2021): images pruned both by class and by the estimated noise rate of each pair of classes (their
"C+NR"). Measured in docs/doctor.md."""
from __future__ import annotations

import math

import numpy as np
import torch

from finetune.core.optim import lbfgs_minimise

MIN_PROBE_IMAGES = 5   # images a class needs for the out-of-fold probe to judge its labels
# L2 strengths of the probe, strongest first (each fit starts from the last): the one with the lowest held-out loss
# on the given labels is used. A weak L2 lets the probe learn the wrong labels of its training folds, and it then
# believes them in the fold it scores (medium digits, 10% of labels flipped: F1 of the flags 0.71 at 1e-3, 0.78-0.86
# at the 0.03-0.1 this loss picks; on clean labels it picks 1e-3-1e-2).
L2_PATH = (1.0, 0.3, 0.1, 0.03, 0.01, 3e-3, 1e-3)
L2_PATH_PATIENCE = 2   # strengths past the best whose held-out loss is higher before the path stops


def _fit_probe(x: torch.Tensor, y: torch.Tensor, n_classes: int, l2: float, iters: int,
               start: tuple[torch.Tensor, torch.Tensor] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax regression by full-batch L-BFGS (strong Wolfe) from ``start`` (else zeros): returns (W, b)."""
    w = (start[0].clone() if start else torch.zeros((x.shape[1], n_classes), dtype=x.dtype)).requires_grad_(True)
    b = (start[1].clone() if start else torch.zeros((n_classes,), dtype=x.dtype)).requires_grad_(True)
    lbfgs_minimise([w, b], lambda: torch.nn.functional.cross_entropy(x @ w + b, y) + l2 * (w * w).sum(), iters,
                   rows=int(x.shape[0]), tolerance_grad=1e-6, tolerance_change=1e-9)
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


def _choose_l2(x: torch.Tensor, y: torch.Tensor, held: torch.Tensor, n_classes: int, iters: int
               ) -> tuple[float, tuple[torch.Tensor, torch.Tensor]]:
    """The strength of L2_PATH whose probe, fitted without the rows ``held``, has the lowest cross-entropy on them
    (the given labels), and that fit. Strongest first, each fit warm-started from the last; it stops
    L2_PATH_PATIENCE strengths after the best (the loss falls, then rises, as the penalty weakens)."""
    best: tuple[float, float, tuple[torch.Tensor, torch.Tensor]] | None = None
    fit = None
    worse = 0
    for l2 in L2_PATH:
        fit = _fit_probe(x[~held], y[~held], n_classes, l2, iters, start=fit)
        loss = float(torch.nn.functional.cross_entropy(x[held] @ fit[0] + fit[1], y[held]))
        if best is None or loss < best[0]:
            best, worse = (loss, l2, fit), 0
        else:
            worse += 1
            if worse >= L2_PATH_PATIENCE:
                break
    assert best is not None
    return best[1], best[2]


def out_of_fold_probs(z: np.ndarray, y: np.ndarray, n_classes: int, *, folds: int, seed: int, l2: float | None,
                      iters: int) -> tuple[np.ndarray, float]:
    """(N, C) class probabilities of each image from a probe that did not see it, and the L2 strength used
    (``l2`` None: chosen on the first fold by :func:`_choose_l2`)."""
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
        chosen = None
        for k in range(folds):
            test = torch.from_numpy(fold == k)
            if not bool(test.any()) or bool(test.all()):
                continue
            if l2 is None:
                l2, fit = _choose_l2(x, yt, test, n_classes, iters)
            else:
                fit = _fit_probe(x[~test], yt[~test], n_classes, l2, iters)
            chosen = l2
            probs[test] = torch.softmax(x[test] @ fit[0] + fit[1], dim=1)
    finally:
        torch.set_num_threads(threads)
    return probs.numpy().astype(np.float64), (math.nan if chosen is None else float(chosen))


def confident_flags(p: np.ndarray, y: np.ndarray, judged: np.ndarray, thresholds: np.ndarray) -> np.ndarray:
    """Confident learning's label issues from out-of-fold probabilities: the paper's "C+NR", an image flagged both
    by class and by noise rate, and a class that may be suggested more probable than its label.

    The confident joint counts the judged images labelled i whose most probable class among those at or over
    their threshold is j; calibrated, each row sums to its class's images and the whole to all of them: an
    estimate ``Q[i, j]`` of how many images labelled i are j. By class: the ``n_i - Q[i, i]`` images labelled i
    least probably i. By noise rate: for each j != i, the ``Q[i, j]`` images labelled i with the largest margin
    ``p_j - p_i``. (On medium digits with 10% of labels flipped: F1 0.835 against 0.805 for the joint's
    off-diagonal pruned by noise rate, and 0.711 for the old rule, any other class at or over its threshold, at
    the old fixed L2; docs/doctor.md.)

    Args:
        p: (N, C) probabilities; y: (N,) given labels; judged: (N,) bool, the images that may be flagged and are
            counted; thresholds: (C,) per-class confidence thresholds (inf: a class never counted as a guess).
    Returns:
        (N,) bool.
    """
    n, c = p.shape
    confident = p >= thresholds[None, :]
    guess = np.where(confident, p, -1.0).argmax(1)
    counted = judged & confident.any(1)
    joint = np.zeros((c, c))
    np.add.at(joint, (y[counted], guess[counted]), 1.0)
    labelled = np.bincount(y[judged], minlength=c).astype(np.float64)
    rows = joint.sum(1)
    calibrated = np.divide(joint, rows[:, None], out=np.zeros_like(joint), where=rows[:, None] > 0) * labelled[:, None]
    if calibrated.sum() <= 0:
        return np.zeros(n, dtype=bool)
    estimate = np.rint(calibrated * (labelled.sum() / calibrated.sum())).astype(np.int64)
    by_class = np.zeros(n, dtype=bool)
    by_rate = np.zeros(n, dtype=bool)
    for i in np.flatnonzero(rows > 0):
        members = np.flatnonzero(judged & (y == i))
        if len(members) <= 1:
            continue
        wrong = len(members) - max(int(estimate[i, i]), 1)     # at least one image of a class is kept
        if wrong > 0:
            by_class[members[np.argsort(p[members, i], kind="stable")[:wrong]]] = True
        for j in np.flatnonzero(estimate[i]):
            if j != i:
                margin = p[members, j] - p[members, i]
                by_rate[members[np.argsort(-margin, kind="stable")[:estimate[i, j]]]] = True
    rival = np.where(np.isfinite(thresholds)[None, :], p, -1.0).max(1)    # the most probable class ever suggested
    return by_class & by_rate & (rival > p[np.arange(n), y])


def label_issues(z: np.ndarray, y: np.ndarray, n_classes: int, *, folds: int = 5, seed: int = 0,
                 l2: float | None = None, iters: int = 200) -> dict[str, np.ndarray | float]:
    """Out-of-fold class probabilities of a linear probe and confident learning's label issues.

    Args:
        z: features (N, D), L2-normalised; y: given labels (N,) in [0, n_classes); l2: the probe's L2 strength
            (None: chosen from L2_PATH by the held-out loss).
    Returns:
        ``probs`` (N, C) out-of-fold, ``suggested`` (N,) the most probable other class (of MIN_PROBE_IMAGES
        images or more), ``score`` (N,) ``p_suggested - p_given``, ``flagged`` (N,) bool (:func:`confident_flags`),
        ``thresholds`` (C,) (each class's mean self-confidence), ``l2`` the strength used.
    """
    y = np.asarray(y)
    p, used = out_of_fold_probs(z, y, n_classes, folds=folds, seed=seed, l2=l2, iters=iters)
    n = len(y)
    # A class of one image is never in the probe that scores it: its "self-confidence" is a guess near 0, and as
    # a threshold it made most images of the other classes wrong labels of it (40 one-image classes beside 3 of
    # 30: 62 of the 90 flagged, and the 40 themselves). Such a class is suggested for no image, nor its image
    # flagged (QA).
    counts = np.bincount(y, minlength=n_classes)
    thresholds = np.array([p[y == c, c].mean() if counts[c] >= MIN_PROBE_IMAGES else math.inf
                           for c in range(n_classes)])
    flagged = confident_flags(p, y, counts[y] >= MIN_PROBE_IMAGES, thresholds)
    others = p.copy()
    others[np.arange(n), y] = -1.0
    others[:, counts < MIN_PROBE_IMAGES] = -1.0
    suggested = others.argmax(1)
    score = p[np.arange(n), suggested] - p[np.arange(n), y]
    return {"probs": p, "suggested": suggested, "score": score, "flagged": flagged, "thresholds": thresholds,
            "l2": used}
