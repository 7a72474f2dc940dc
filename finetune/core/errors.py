"""Errors raised by the training engine. ``finetune`` never imports ``zoo``; the CLI maps these too."""
from __future__ import annotations

import sys

__all__ = ["FinetuneError", "ConfigError", "FreezeTooDeepError", "DataError",
           "DivergedError", "CheckpointError", "Interrupted", "OutOfMemory", "is_out_of_memory", "memory_text"]


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


class OutOfMemory(FinetuneError):
    """The device ran out of memory in a step (a batch, an image size or a model too big for it): the message says
    what was tried, what is saved, and with what to start again or resume (a smaller ``--micro-batch``)."""


def is_out_of_memory(err: BaseException) -> bool:
    """Python's ``MemoryError`` or torch's ``OutOfMemoryError`` (CUDA's caching allocator; torch need not be imported
    to ask: nothing else raises it)."""
    torch = sys.modules.get("torch")
    return isinstance(err, MemoryError) or (torch is not None and isinstance(err, torch.OutOfMemoryError))


def memory_text(err: BaseException) -> str:
    """``err``'s first sentences: what torch tried to allocate and what the device holds (not its advice on the
    allocator's settings), on one line."""
    text = " ".join(str(err).split())
    if "Tried to allocate" in text:       # "CUDA out of memory. Tried to allocate X. GPU 0 has ... of which Y is free."
        text = ". ".join(text.split(". ")[:3]).rstrip(".")
    return text or type(err).__name__
