"""An evaluation pass's batches, kept after its first full pass and served again (:class:`KeptPass`).

A validation set's batches are the same every epoch: the evaluation transform draws nothing, and the loader
keeps the dataset's order. Decoding them again each epoch costs the workers' (or nvJPEG's) time that the
training pass, started ahead while validation runs, needs: on the GPU machines of docs/benchmarks.md the
workers path is decode-bound, and a 10,240 + 2,048 image run spent a sixth of its decoding on validation.
So the first full pass keeps each batch as the loader delivered it (where it lives: host batches in host
memory, a ``--decode device`` pass's on the device), within a memory budget (:func:`budget`), and later
passes read them from memory. A pass that stops early, or outgrows the budget, keeps nothing; a loader
whose pass outgrew the budget is not recorded again. Nor is a pass that lost an image (it failed to load)
kept: the next pass reads the files and is recorded instead, so that an image that failed once (a file being
copied, a network filesystem's hiccup) is counted again when it loads, not left out of every later epoch.
"""
from __future__ import annotations

from typing import Iterable, Iterator

import torch

from finetune.core.host import launcher_count, memory_available

__all__ = ["KeptPass", "budget", "BUDGET_BYTES"]

BUDGET_BYTES = 2 << 30     # at most this much memory holds one kept pass


class KeptPass:
    """The batches of one full pass over an evaluation loader (``record``), served again (``get``) while the
    same loader object is in use (a new loader, e.g. another phase's, starts over)."""

    def __init__(self) -> None:
        self._loader: object | None = None
        self._batches: list | None = None
        self._refused: list = []       # loaders whose pass outgrew the budget: not recorded again

    def get(self, loader) -> list | None:
        """The kept batches of ``loader``'s pass, or None (not recorded yet, or not kept)."""
        return self._batches if self._batches is not None and self._loader is loader else None

    def record(self, loader, batches: Iterable) -> Iterator:
        """Yield ``batches`` (a pass over ``loader``) unchanged; once they are exhausted, keep them for
        :meth:`get` if they fit :func:`budget` (measured where the first batch lives) and hold every image of
        ``loader.dataset`` (when it has one)."""
        if any(r is loader for r in self._refused):
            yield from batches
            return
        kept: list | None = []
        size, limit, rows = 0, None, 0
        for batch in batches:
            if kept is not None:
                if batch is not None:
                    limit = budget(batch[0].device) if limit is None else limit
                    size += sum(t.nbytes for t in batch if isinstance(t, torch.Tensor))
                    rows += len(batch[1])
                if limit is not None and size > limit:
                    kept = None
                    self._refused.append(loader)
                else:
                    kept.append(_own(batch))
            yield batch
        if kept is not None and rows < _images(loader):      # an image failed to load: recorded again next time
            kept = None
        if kept is not None:       # (a pass left early never gets here: a generator closed midway)
            self._loader, self._batches = loader, kept

    def clear(self) -> None:
        """Let the kept batches go (their memory: the end of a run)."""
        self._loader = self._batches = None


def _images(loader) -> int:
    """The images a full pass over ``loader`` gives when none fails: its dataset's length (0 if unknown)."""
    try:
        return len(getattr(loader, "dataset", ()))
    except TypeError:
        return 0


def _own(batch):
    """``batch`` holding none of a worker's shared memory: each kept tensor would hold its segment (and, under
    torch's file-descriptor sharing, an open file) for the run."""
    if batch is None:
        return None
    return tuple(t.clone() if isinstance(t, torch.Tensor) and t.device.type == "cpu" and t.is_shared() else t
                 for t in batch)


def budget(device: torch.device) -> int:
    """Bytes a kept pass may take on ``device``: :data:`BUDGET_BYTES`, and at most an eighth of the
    accelerator memory free (its caching allocator's blocks beyond the process's peak use count as free) or a
    quarter of the host memory available (Linux's MemAvailable, within a container's memory limit; elsewhere an
    eighth of the budget, the amount being unknown), shared by torchrun's processes on the machine
    (LOCAL_WORLD_SIZE), which each keep their own shard."""
    if device.type == "cuda":
        # free: what no process holds, and what this one's allocator holds beyond its peak so far (the
        # training's: blocks it reserved for an epoch's peak are not free for keeping, the next epoch needs them)
        free, _ = torch.cuda.mem_get_info(device)
        peak = max(torch.cuda.max_memory_allocated(device), torch.cuda.memory_allocated(device))
        free += max(0, torch.cuda.memory_reserved(device) - peak)
        return min(BUDGET_BYTES, free // 8)
    if device.type != "cpu":
        return 0      # (MPS and others: their free memory is not known here)
    available = memory_available()
    local = launcher_count("LOCAL_WORLD_SIZE")
    return (min(BUDGET_BYTES, available // 4) if available is not None else BUDGET_BYTES // 8) // local
