"""Errors raised by the training engine. ``finetune`` never imports ``zoo``; the CLI maps these too."""
from __future__ import annotations

__all__ = ["FinetuneError", "ConfigError", "DataError", "DivergedError", "CheckpointError", "Interrupted"]


class FinetuneError(Exception):
    """Base class: a failure the user can act on. ``str(err)`` is the one line the CLI prints."""

    exit_code = 1


class ConfigError(FinetuneError):
    """An option or config file value is invalid."""

    exit_code = 2


class DataError(FinetuneError):
    """The image folder cannot be trained on (no images, fewer than 2 classes, unmatched splits...)."""


class DivergedError(FinetuneError):
    """The loss became NaN/inf; the last good checkpoint is kept."""


class CheckpointError(FinetuneError):
    """A checkpoint could not be written or read (disk full, damaged file)."""


class Interrupted(FinetuneError):
    """SIGINT/SIGTERM: the run saved a checkpoint and stopped; the message says how to resume."""

    exit_code = 130
