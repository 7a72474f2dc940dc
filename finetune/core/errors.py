"""Errors raised by the training engine. ``finetune`` never imports ``zoo``; the CLI maps these too."""
from __future__ import annotations

__all__ = ["FinetuneError", "ConfigError", "FreezeTooDeepError", "DataError",
           "DivergedError", "CheckpointError", "Interrupted"]


class FinetuneError(Exception):
    """Base class: a failure the user can act on. ``str(err)`` is the one line the CLI prints."""

    exit_code = 1


class ConfigError(FinetuneError):
    """An option or config file value is invalid."""

    exit_code = 2


class FreezeTooDeepError(ConfigError):
    """A freeze depth past the model's stages, known once the model is: ``where`` names the value as the user
    gave it (``--freeze 99``; the CLI says ``freeze 99 in FILE`` when a ``--config`` file gave it)."""

    def __init__(self, depth: int, n_stages: int, where: str | None = None) -> None:
        self.depth, self.n_stages = depth, n_stages
        super().__init__(f"{where or f'--freeze {depth}'}: this model has {n_stages} stages, so the most is "
                         f"{n_stages} (or use none to train everything)")


class DataError(FinetuneError):
    """The image folder cannot be trained on (no images, fewer than 2 classes, unmatched splits...)."""


class DivergedError(FinetuneError):
    """The loss became NaN/inf; the last good checkpoint is kept."""


class CheckpointError(FinetuneError):
    """A checkpoint could not be written or read (disk full, damaged file)."""


class Interrupted(FinetuneError):
    """SIGINT/SIGTERM: the run saved a checkpoint and stopped; the message says how to resume."""

    exit_code = 130
