"""Whether a dataset has a handedness: can the backbone's features tell an image from its horizontal
mirror, given the image's class? ``--hflip`` auto asks it of the cached head's two training views (each
image and its mirror, already computed) before the head is trained.

For photos of things that face either way (birds, flowers, faces) the answer is no: a mirrored photo is
another plausible photo of its class, and flipping is the augmentation every peer uses. For digits, letters
and fixed scenes it is yes: a mirrored "3" is a shape no test image has, and a run that flips spends its
capacity on it (medium digits: 1.7 points of test accuracy lost, docs/peers.md). Classes that are each
other's mirror (left/right arrows) answer yes too: given the class, the orientation is known.

The test is a multinomial logistic regression over 2K labels, (class, plain | mirrored), on standardised
features, cross-validated on two folds of images (an image's two views in the same fold); an image scores 1
when its class's plain label beats its mirrored one on the plain view, and the reverse on the mirror (half
per view, ties half). Measured (EfficientNet-Lite0 features, docs/peers.md): real photos 0.50-0.53 (the
stamps, scikit-image's LFW faces), digits 0.74, letters in 14 fonts 0.65, crops of fixed scenes 0.72.
A dataset is handed when the one-sided 95% lower bound of its mean score is above ``HANDED``.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch

from finetune.core.devices import sum_dtype
from finetune.core.optim import lbfgs_minimise
from finetune.core.progress import progress_bar

__all__ = ["HANDED", "MIN_PER_CLASS", "MAX_IMAGES", "Handedness", "handedness"]

# The mean score above which (its lower bound, that is) the mirror is another kind of image.
HANDED = 0.6
# Below this many training images per class the test is not made (few-shot runs keep the flip).
MIN_PER_CLASS = 10
# At most this many images enter the test (a seeded subset beyond it: the bound's width is then ~0.02).
MAX_IMAGES = 4000
_C = 1.0            # scikit-learn's C of the regression: L2 = 1 / (C x rows) on the mean loss
_Z = 1.6449         # one-sided 95%


@dataclass(frozen=True)
class Handedness:
    """The test's outcome: ``score`` the mean per-image score (0.5 = chance), ``low`` its one-sided 95%
    lower bound, ``images`` how many entered, ``handed`` whether ``low`` > ``HANDED``."""

    score: float
    low: float
    images: int
    handed: bool

    def to_dict(self) -> dict:
        return {**asdict(self), "threshold": HANDED}


def handedness(plain: torch.Tensor, mirrored: torch.Tensor, labels: torch.Tensor, n_classes: int,
               seed: int = 0, quiet: bool = True) -> Handedness:
    """The handedness test on one split's features: ``plain[i]`` and ``mirrored[i]`` are image ``i``'s
    feature rows (N, D) and its mirror's, ``labels`` its class (N,). Deterministic for a seed; consumes none of
    torch's global RNG. Not ``quiet``: a bar over the two fits (seconds each at a few thousand images)."""
    n = int(labels.shape[0])
    g = torch.Generator().manual_seed(int(seed))
    if n > MAX_IMAGES:
        keep = torch.randperm(n, generator=g)[:MAX_IMAGES].sort().values.to(labels.device)
        plain, mirrored, labels, n = plain[keep], mirrored[keep], labels[keep], MAX_IMAGES
    fold = (torch.randperm(n, generator=g) % 2).to(labels.device)
    scores = torch.zeros(n, dtype=sum_dtype(labels.device), device=labels.device)    # float64, but on MPS
    for f in progress_bar(desc="mirror test: L-BFGS fit per fold", unit="fold", quiet=quiet, iterable=(0, 1)):
        train, test = fold != f, fold == f
        if not bool(train.any()) or not bool(test.any()):
            continue
        scores[test] = _fold_scores(plain[train].float(), mirrored[train].float(), labels[train],
                                    plain[test].float(), mirrored[test].float(), labels[test], n_classes)
    score = float(scores.mean())
    spread = float(scores.std()) if n > 1 else math.inf
    low = score - _Z * spread / math.sqrt(max(n, 1))
    return Handedness(score=score, low=low, images=n, handed=low > HANDED)


def _fold_scores(p_tr, m_tr, y_tr, p_te, m_te, y_te, k: int) -> torch.Tensor:
    """Fit the 2K-way regression on one fold, score the other's images (see the module docstring)."""
    x = torch.cat([p_tr, m_tr])
    y = torch.cat([y_tr, y_tr + k])
    mu, sd = x.mean(0), x.std(0).clamp_min(1e-6)
    x = (x - mu) / sd
    w = torch.zeros(x.shape[1], 2 * k, device=x.device, requires_grad=True)
    b = torch.zeros(2 * k, device=x.device, requires_grad=True)
    l2 = 1.0 / (_C * x.shape[0])
    lbfgs_minimise([w, b], lambda: torch.nn.functional.cross_entropy(x @ w + b, y) + 0.5 * l2 * w.pow(2).sum(), 500,
                   rows=int(x.shape[0]))
    rows = torch.arange(y_te.shape[0], device=y_te.device)
    per_view = []
    with torch.no_grad():
        for view, own, other in ((p_te, y_te, y_te + k), (m_te, y_te + k, y_te)):
            z = ((view - mu) / sd) @ w + b
            mine, theirs = z[rows, own], z[rows, other]
            wide = sum_dtype(z.device)
            per_view.append((mine > theirs).to(wide) + 0.5 * (mine == theirs).to(wide))
    return (per_view[0] + per_view[1]) / 2
