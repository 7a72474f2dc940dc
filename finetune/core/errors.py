"""Errors raised by the training engine. ``finetune`` never imports ``zoo``; the CLI maps these too."""
from __future__ import annotations

import re
import sys

__all__ = ["FinetuneError", "ConfigError", "FreezeTooDeepError", "BatchNormBatchError", "DataError",
           "DivergedError", "CheckpointError", "Interrupted", "OutOfMemory", "is_out_of_memory", "stops_run",
           "memory_text"]


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


class BatchNormBatchError(ConfigError):
    """A batch, or pass (``--micro-batch``), that leaves a BatchNorm layer which trains one value per channel
    (``recipe.check_batchnorm_batch``): ``way`` the option that keeps that layer from training (``--bn eval``,
    ``--head linear``)."""

    def __init__(self, message: str, way: str) -> None:
        super().__init__(message)
        self.way = way


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


# CUDA's own allocations outside torch's caching allocator, on a device it filled: the cuBLAS handle and workspace a
# first matmul creates, a stream, cuDNN's workspace: a RuntimeError, not torch's OutOfMemoryError. Its first line
# (what memory_text shows) starts with CUDA's error or names the library's status; an error that quotes one further
# on (a DataLoader worker's re-raised traceback, a message about another error) keeps its traceback. Apple MPS's
# allocator raises a plain RuntimeError too: "MPS backend out of memory (MPS allocated: ...). Tried to allocate ..."
_DEVICE_ALLOC_FAILED = re.compile(r"CUDA error: out of memory\b|MPS backend out of memory\b"
                                  r"|.*\b(CUBLAS|CUDNN)_STATUS_ALLOC_FAILED\b")


def is_out_of_memory(err: BaseException) -> bool:
    """Python's ``MemoryError``, torch's ``OutOfMemoryError`` (CUDA's caching allocator; torch need not be imported
    to ask: nothing else raises it) or CUDA's own allocation or MPS's failing (a RuntimeError naming it)."""
    torch = sys.modules.get("torch")
    return (isinstance(err, MemoryError) or (torch is not None and isinstance(err, torch.OutOfMemoryError))
            or (isinstance(err, RuntimeError) and _DEVICE_ALLOC_FAILED.match(str(err).strip()) is not None))


def stops_run(err: BaseException) -> bool:
    """What stops a run with a line saying what is saved and how to go on (``RunFolder.stopped``): Ctrl-C or
    SIGTERM, the device out of memory (:func:`is_out_of_memory`)."""
    return isinstance(err, KeyboardInterrupt) or is_out_of_memory(err)


def memory_text(err: BaseException) -> str:
    """``err``'s first sentences: what torch tried to allocate and what the device holds (not its advice on the
    allocator's settings), on one line."""
    text = str(err).strip()
    # (CUDA's error text: its first line; the next ones are torch's advice on launch blocking and DSA)
    text = " ".join((text if "Tried to allocate" in text else text.split("\n")[0]).split())
    if "Tried to allocate" in text:       # "CUDA out of memory. Tried to allocate X. GPU 0 has ... of which Y is free."
        kept = [s for s in text.split(". ") if not s.startswith("Use PYTORCH_")]     # (MPS's advice: its watermark)
        text = ". ".join(kept[:3]).rstrip(".")
    return text or type(err).__name__
