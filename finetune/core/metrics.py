"""Pure metric helpers shared by the slow loop and the cached-feature fast path."""
from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, field
from typing import Any, Sequence

__all__ = ["EarlyStopping", "per_class_accuracy", "paired_gain_p", "accuracy_text", "metric_text", "as_fraction",
           "PROB_DECIMALS", "probability_value", "probability_text"]

# the decimals of a probability in a JSON answer (`zoo predict --json`, `zoo serve`): float32's 7 digits, less noise
PROB_DECIMALS = 6


@dataclass
class EarlyStopping:
    """Stop when ``monitor`` has not improved by ``min_delta`` for ``patience`` epochs.

    ``mode`` is "min" for losses and "max" for accuracies. State is a plain dict so that it can be
    checkpointed and restored exactly (``state_dict`` / ``load_state_dict``).
    """

    patience: int = 5
    min_delta: float = 1e-4
    mode: str = "min"
    best: float = field(default=math.inf)
    best_epoch: int = -1
    bad_epochs: int = 0

    def __post_init__(self) -> None:
        if self.best == math.inf:
            self.best = self._nothing_yet()

    def _nothing_yet(self) -> float:
        """The best before any epoch: what every value improves on in this ``mode``."""
        return math.inf if self.mode == "min" else -math.inf

    def improved(self, value: float) -> bool:
        if self.mode == "min":
            return value < self.best - self.min_delta
        return value > self.best + self.min_delta

    def step(self, value: float, epoch: int) -> bool:
        """Record ``value`` for ``epoch``; return True when training should stop: after ``patience`` epochs
        in a row without improvement, and never after one that improved (``patience`` 0: stop at the
        first epoch that does not improve, as Keras' EarlyStopping)."""
        if self.improved(value):
            self.best, self.best_epoch, self.bad_epochs = float(value), epoch, 0
        else:
            self.bad_epochs += 1
        return self.bad_epochs > 0 and self.bad_epochs >= self.patience

    def restart(self, forget_best: bool = False) -> None:
        """Full patience again; with ``forget_best`` the best so far no longer counts either (a new phase whose
        metric cannot be compared with the earlier epochs')."""
        self.bad_epochs = 0
        if forget_best:
            self.best, self.best_epoch = self._nothing_yet(), -1

    def state_dict(self) -> dict[str, Any]:
        return {"best": self.best, "best_epoch": self.best_epoch, "bad_epochs": self.bad_epochs}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.best, self.best_epoch, self.bad_epochs = state["best"], state["best_epoch"], state["bad_epochs"]


def accuracy_text(value: float | None) -> str:
    """An accuracy (a fraction in [0, 1]) as every printed line shows it: ``0.9864`` -> ``98.64%`` (percent,
    two decimals, as ``zoo eval`` and timm's train.py print Acc@1); ``-`` for None or NaN. The one form of the
    screen, log.txt, report.html and the sweep plot; data files (metrics.csv, results.csv, JSON) keep the
    fraction, so nothing that reads them changes. Anything but a finite number (a numpy scalar is one) is ``-``
    too: a damaged summary.json's ``"0.9"``, ``true`` or ``Infinity`` is no accuracy (report.html said ``-``)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
        return "-"
    return f"{float(value) * 100:.2f}%"


def probability_value(p: float) -> float:
    """A class probability as the JSON answers give it (``zoo predict --json``, ``zoo serve``): ``PROB_DECIMALS``."""
    return round(float(p), PROB_DECIMALS)


def probability_text(p: float | None) -> str:
    """A class probability as every human-facing place shows it (``zoo predict``'s lines, ``zoo eval``'s most
    confidently wrong, report.html, doctor's wrong-label findings; serve's page runs the same rule in its script):
    percent with two decimals, as :func:`accuracy_text`, of the value the JSON answers carry
    (:func:`probability_value`, so the page that reads one shows the same digits): ``0.999932`` -> ``99.99%``.
    Never ``100.00%`` nor ``0.00%``: a softmax is neither 1 nor 0, though float32 rounds it there past a margin
    of ~17 in the logits; what would round to them is ``>99.99%`` (``0.99996``, and 1.0 itself) and ``<0.01%``.
    ``-`` for None, NaN or anything outside [0, 1] (docs/guide/export-predict.md, "How a probability is shown")."""
    if isinstance(p, bool) or not isinstance(p, numbers.Real) or not 0.0 <= float(p) <= 1.0:
        return "-"
    n = round(probability_value(p) * 10000)     # hundredths of a percent (half to even, as serve's script rounds)
    if n >= 10000:
        return ">99.99%"
    if n <= 0:
        return "<0.01%"
    return f"{n // 100}.{n % 100:02d}%"


def as_fraction(values: Sequence[float | None]) -> list[float | None]:
    """A history's accuracy column as fractions, the contract: one whose numbers exceed 1 was written in percent
    (by hand or by an older tool) and is divided by 100, so curves.png, report.html and the advice read it alike
    (not a 95.0 "accuracy", nor an axis to 9500%). None and NaN cells stay as they are."""
    finite = [v for v in values if v is not None and math.isfinite(v)]
    if finite and max(finite) > 1.0 + 1e-9:
        return [None if v is None else v / 100.0 for v in values]
    return list(values)


def metric_text(metric: str, value: float | None, loss_format: str = ".4g") -> str:
    """A monitored metric as printed: an accuracy (``val_acc``, ``train_acc``) by :func:`accuracy_text`, a loss
    in ``loss_format``; ``-`` for None or NaN."""
    if metric.endswith("acc"):
        return accuracy_text(value)
    return "-" if value is None or math.isnan(value) else format(value, loss_format)


def per_class_accuracy(correct: list[int], total: list[int], classes: list[str]) -> dict[str, float | None]:
    """Accuracy per class name (None for a class with no samples)."""
    return {c: (correct[i] / total[i] if total[i] else None) for i, c in enumerate(classes)}


def paired_gain_p(gains: int, losses: int) -> float:
    """One-sided exact McNemar test of a new model against an old one on the same images.

    ``gains``: images the new model gets right and the old one wrong; ``losses``: the reverse. Returns
    the probability of at least ``gains`` of the ``gains + losses`` discordant images going the new
    model's way if both were equally good (each discordant image a fair coin); 1.0 when none differ.
    Exact (integers): each coefficient from the one before, C(n, k + 1) = C(n, k) (n - k) / (k + 1), since a
    math.comb per term costs a power of n more: 16,000 discordant images (a 90,000-image validation split)
    took 13 s that way, 0.03 s this way (docs/benchmarks.md, "Scale audit, helper-82").
    """
    gains = int(gains)
    n = gains + int(losses)
    if n == 0:
        return 1.0
    total, term = 0, math.comb(n, gains)
    for k in range(gains, n + 1):
        total += term
        term = term * (n - k) // (k + 1)
    return total / 2 ** n
