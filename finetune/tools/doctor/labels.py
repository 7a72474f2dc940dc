"""Likely wrong labels: an out-of-fold linear probe on the features, its L2 strength chosen by its held-out loss,
and confident learning's flags (Northcutt, Jiang and Chuang, "Confident Learning: Estimating Uncertainty in Dataset
Labels", JAIR 2021): images pruned both by class and by the estimated noise rate of each pair of classes (their
"C+NR"). Measured in docs/doctor.md."""
from __future__ import annotations

import math

import numpy as np
import torch

from finetune.core.threads import one_thread
from finetune.core.optim import lbfgs_minimise
from finetune.core.progress import progress_bar

MIN_PROBE_IMAGES = 5   # images a class needs for the out-of-fold probe to judge its labels
# L2 strengths of the probe, strongest first (each fit starts from the last): the one with the lowest held-out loss
# on the given labels is used, chosen on another fold than the one it scores (fold_strengths). A weak L2 lets the
# probe learn the wrong labels of its training folds, and it then believes them in the fold it scores (medium
# digits, 10% of labels flipped: F1 of the flags 0.71 at 1e-3, 0.78-0.86 at the 0.03-0.1 this loss picks; on clean
# labels it picks 1e-3-1e-2).
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


def _strength_path(x: torch.Tensor, y: torch.Tensor, train: torch.Tensor, held: dict[int, torch.Tensor],
                   n_classes: int, iters: int
                   ) -> tuple[dict[int, dict[float, float]], dict[float, tuple[torch.Tensor, torch.Tensor]]]:
    """The probe fitted on the rows ``train`` down L2_PATH, strongest first, each fit warm-started from the last:
    per strength, the cross-entropy of each held set (``held[k]``: fold k's rows, on their given labels) and the
    fit. It stops once every held loss has risen L2_PATH_PATIENCE strengths past its lowest (the loss falls, then
    rises, as the penalty weakens)."""
    losses: dict[int, dict[float, float]] = {k: {} for k in held}
    fits: dict[float, tuple[torch.Tensor, torch.Tensor]] = {}
    fit = None
    worse = dict.fromkeys(held, 0)
    x_fit, y_fit = x[train], y[train]
    x_held = {k: (x[rows], y[rows]) for k, rows in held.items()}
    for l2 in L2_PATH:
        fit = fits[l2] = _fit_probe(x_fit, y_fit, n_classes, l2, iters, start=fit)
        for k, (xk, yk) in x_held.items():
            best = min(losses[k].values(), default=math.inf)
            losses[k][l2] = float(torch.nn.functional.cross_entropy(xk @ fit[0] + fit[1], yk))
            worse[k] = 0 if losses[k][l2] < best else worse[k] + 1
        if min(worse.values()) >= L2_PATH_PATIENCE:
            break
    return losses, fits


def _best(losses: dict[float, float]) -> float:
    """The strength of the lowest loss (the stronger of a tie)."""
    return min(losses, key=lambda l2: (losses[l2], -l2))


def fold_strengths(losses: dict[int, dict[float, float]], sizes: dict[int, int], folds: list[int]
                   ) -> dict[int, float]:
    """The L2 strength each fold is scored at, from the held-out losses of two folds (``losses[k]``: fold k's,
    ``sizes[k]`` its images) under probes that saw neither. A fold's own labels never choose its strength: the
    first held fold is scored at the second's choice and the second at the first's; every other fold at the
    choice of both together (their mean loss per image)."""
    first, second = list(losses)
    both = {l2: (losses[first][l2] * sizes[first] + losses[second][l2] * sizes[second])
            for l2 in losses[first] if l2 in losses[second]}
    return {k: _best(losses[second] if k == first else losses[first] if k == second else both) for k in folds}


def out_of_fold_probs(z: np.ndarray, y: np.ndarray, n_classes: int, *, folds: int, seed: int, l2: float | None,
                      iters: int, quiet: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """(N, C) class probabilities of each image from a probe that did not see it, and the L2 strength each fold
    was scored at (nan: a fold left empty). ``l2`` None: chosen by the held-out loss (:func:`fold_strengths`).
    Not ``quiet``: a bar over the fits, the strength path then each fold (29 s on 7,188 images, 2 CPU cores)."""
    x = torch.from_numpy(np.ascontiguousarray(z, dtype=np.float32))
    # Centred and scaled so one l2 value suits any feature width (the probe sees unit-variance inputs).
    x = x - x.mean(0, keepdim=True)
    x = x / x.pow(2).sum(1).mean().sqrt().clamp_min(1e-12) * math.sqrt(x.shape[1])
    yt = torch.from_numpy(np.asarray(y, dtype=np.int64))
    probs = torch.zeros((len(y), n_classes), dtype=torch.float32)
    fold = _folds(np.asarray(y), folds, seed)
    # a fold with no image, or all of them (fewer images than folds), has no probe to score it
    scored = [k for k in range(folds) if 0 < int((fold == k).sum()) < len(y)]
    used = np.full(folds, math.nan)
    # A small probe is thousands of tiny ops: one thread beats a team that mostly waits
    # (docs/benchmarks.md, "The doctor's label probe runs on one thread").
    small = x.numel() * n_classes < 20_000_000
    choose = l2 is None and bool(scored)
    bar = progress_bar(len(scored) + int(choose), "label probe: L-BFGS fits", unit="fit", quiet=quiet)
    with one_thread(small):
        try:
            strengths: dict[int, float] = {}
            starts: dict[int, dict[float, tuple[torch.Tensor, torch.Tensor]]] = {}
            if choose:
                held = {k: torch.from_numpy(fold == k) for k in scored[:2]}
                if len(scored) > 2:   # one path fitted without the two folds whose losses choose: nested for both
                    losses, fits = _strength_path(x, yt, ~(held[scored[0]] | held[scored[1]]), held, n_classes, iters)
                    starts = dict.fromkeys(scored, fits)
                else:                 # two folds: each path is fitted on the other fold, whose strength it chooses
                    runs = {k: _strength_path(x, yt, ~rows, {k: rows}, n_classes, iters) for k, rows in held.items()}
                    losses, starts = {k: run[0][k] for k, run in runs.items()}, {k: run[1] for k, run in runs.items()}
                strengths = fold_strengths(losses, {k: int(rows.sum()) for k, rows in held.items()}, scored)
                bar.update(1)
            for k in scored:
                test = torch.from_numpy(fold == k)
                used[k] = strengths.get(k, l2)
                # started from the path's fit at this strength, on most (or all) of this fold's training part
                fit = _fit_probe(x[~test], yt[~test], n_classes, float(used[k]), iters,
                                 start=starts.get(k, {}).get(used[k]))
                probs[test] = torch.softmax(x[test] @ fit[0] + fit[1], dim=1)
                bar.update(1)
        finally:
            bar.close()
    return probs.numpy().astype(np.float64), used


def calibrated_joint(p: np.ndarray, y: np.ndarray, judged: np.ndarray, thresholds: np.ndarray) -> np.ndarray:
    """Confident learning's calibrated confident joint (the paper's eq. 3 and its row totals): ``(C, C)`` integer
    counts, ``[i, j]`` an estimate of how many judged images labelled i are j.

    The confident joint counts the judged images labelled i whose most probable class among those at or over
    their threshold is j. Each row is scaled to the judged images labelled i, then rounded to whole images
    preserving that total (the largest remainders round up; ties to the lower class): per-cell rounding could
    leave a row one or more images off its class's count, and the prune by class (``n_i - Q[i, i]``) and by
    noise rate (``Q[i, j]``) then disagreed on how many of its images are wrong. A row of no confident image is
    all zeros (nothing is known of that class's errors).
    """
    c = p.shape[1]
    confident = p >= thresholds[None, :]
    guess = np.where(confident, p, -1.0).argmax(1)
    counted = judged & confident.any(1)
    joint = np.zeros((c, c))
    np.add.at(joint, (y[counted], guess[counted]), 1.0)
    labelled = np.bincount(y[judged], minlength=c)
    estimate = np.zeros((c, c), dtype=np.int64)
    for i in np.flatnonzero(joint.sum(1) > 0):
        share = joint[i] / joint[i].sum() * labelled[i]
        whole = np.floor(share)
        up = np.argsort(-(share - whole), kind="stable")[:max(int(labelled[i] - whole.sum()), 0)]
        whole[up] += 1
        estimate[i] = whole
    return estimate


def confident_flags(p: np.ndarray, y: np.ndarray, judged: np.ndarray, thresholds: np.ndarray) -> np.ndarray:
    """Confident learning's label issues from out-of-fold probabilities: the paper's "C+NR", an image flagged both
    by class and by noise rate, and a class that may be suggested more probable than its label.

    :func:`calibrated_joint` estimates ``Q[i, j]``, how many images labelled i are j (each row summing to the
    judged images labelled i, so that both prunes agree on their count). By class: the ``n_i - Q[i, i]`` images
    labelled i least probably i. By noise rate: for each j != i, the ``Q[i, j]`` images labelled i with the largest
    margin ``p_j - p_i``. (On medium digits with 10% of labels flipped: F1 0.835 against 0.805 for the joint's
    off-diagonal pruned by noise rate, and 0.711 for the old rule, any other class at or over its threshold, at
    the old fixed L2; docs/doctor.md.)

    Args:
        p: (N, C) probabilities; y: (N,) given labels; judged: (N,) bool, the images that may be flagged and are
            counted; thresholds: (C,) per-class confidence thresholds (inf: a class never counted as a guess).
    Returns:
        (N,) bool.
    """
    n = len(y)
    estimate = calibrated_joint(p, y, judged, thresholds)
    by_class = np.zeros(n, dtype=bool)
    by_rate = np.zeros(n, dtype=bool)
    for i in np.flatnonzero(estimate.sum(1) > 0):
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
                 l2: float | None = None, iters: int = 200, quiet: bool = True) -> dict[str, np.ndarray | float]:
    """Out-of-fold class probabilities of a linear probe and confident learning's label issues.

    Args:
        z: features (N, D), L2-normalised; y: given labels (N,) in [0, n_classes); l2: the probe's L2 strength
            (None: chosen from L2_PATH by the held-out loss). quiet: no progress bar (else a terminal's).
    Returns:
        ``probs`` (N, C) out-of-fold, ``suggested`` (N,) the most probable other class (of MIN_PROBE_IMAGES
        images or more), ``score`` (N,) ``p_suggested - p_given``, ``flagged`` (N,) bool (:func:`confident_flags`),
        ``thresholds`` (C,) (each class's mean self-confidence), ``l2`` the strength of the last fold (with 3 folds
        or more: of every fold but the two whose losses chose it; nan: no probe ran), ``fold_l2`` (folds,) each
        fold's.
    """
    y = np.asarray(y)
    p, used = out_of_fold_probs(z, y, n_classes, folds=folds, seed=seed, l2=l2, iters=iters, quiet=quiet)
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
            "l2": float(used[np.isfinite(used)][-1]) if np.isfinite(used).any() else math.nan, "fold_l2": used}
