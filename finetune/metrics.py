"""Pure metric helpers shared by the slow loop and the cached-feature fast path."""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

__all__ = ["EarlyStopping", "per_class_accuracy"]


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
        if self.mode == "max" and self.best == math.inf:
            self.best = -math.inf

    def improved(self, value: float) -> bool:
        if self.mode == "min":
            return value < self.best - self.min_delta
        return value > self.best + self.min_delta

    def step(self, value: float, epoch: int) -> bool:
        """Record ``value`` for ``epoch``; return True when training should stop."""
        if self.improved(value):
            self.best, self.best_epoch, self.bad_epochs = float(value), epoch, 0
        else:
            self.bad_epochs += 1
        return self.bad_epochs >= self.patience

    def state_dict(self) -> dict[str, Any]:
        return {"best": self.best, "best_epoch": self.best_epoch, "bad_epochs": self.bad_epochs}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.best, self.best_epoch, self.bad_epochs = state["best"], state["best_epoch"], state["bad_epochs"]


def per_class_accuracy(correct: list[int], total: list[int], classes: list[str]) -> dict[str, float | None]:
    """Accuracy per class name (None for a class with no samples)."""
    return {c: (correct[i] / total[i] if total[i] else None) for i, c in enumerate(classes)}
