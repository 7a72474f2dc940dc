"""Every seed of the package in one place: the run seed, the seed of an epoch, the generators' states (a
checkpoint keeps them) and a guard that keeps a diagnostic run from moving the caller's random streams.

Reproducibility rule: everything random in epoch ``e`` (data order, augmentation, dropout, worker seeds)
is seeded from ``epoch_seed(seed, e, rank)`` at the start of the epoch, so a run resumed from the
checkpoint of epoch ``e - 1`` replays epoch ``e`` exactly as an uninterrupted run would.
"""
from __future__ import annotations

import random
from contextlib import contextmanager
from typing import Any, Iterator

import numpy as np
import torch

__all__ = ["epoch_seed", "seed_everything", "seed_host", "preserved_rng", "rng_state", "set_rng_state",
           "sample_seed", "repeat_seed", "view_seed", "view_pick_seed", "drop_seed"]


def epoch_seed(seed: int, epoch: int, rank: int = 0) -> int:
    """The seed of everything random in ``epoch`` (augmentation, dropout, worker seeds)."""
    return (int(seed) * 1_000_003 + int(epoch) * 7_919 + int(rank) * 104_729) % (2**63 - 1)


def sample_seed(seed: int, index: int) -> int:
    """The seed of one sample's augmentation draws within an epoch seeded with ``seed``: what a sample
    draws depends on (epoch seed, index) only, not on which worker loads it or what it loaded before."""
    return (int(seed) * 6_364_136_223_846_793_005 + int(index) * 1_442_695_040_888_963_407 + 1) % (2**63 - 1)


def repeat_seed(seed: int, repeat: int) -> int:
    """The seed that stands for ``seed`` (an epoch's) at the ``repeat``-th extra draw of one image within the
    epoch: ``--sampler balanced`` draws rare images several times, and each draw gets its own crop, flip and
    jitter. Repeat 0 (every image's first draw, and every draw of the random sampler) is ``seed`` itself."""
    if int(repeat) == 0:
        return int(seed)
    return (int(seed) * 2_862_933_555_777_941_757 + int(repeat) * 3_037_000_493 + 7) % (2**63 - 1)


def view_seed(seed: int, view: int) -> int:
    """The seed of augmented view ``view`` of the cached features (the fast head path, ``--aug-views``)."""
    return (int(seed) * 1_000_003 + int(view)) % (2**63 - 1)


def view_pick_seed(seed: int, epoch: int) -> int:
    """The seed of which cached view each image shows in ``epoch`` (the fast head path, ``--aug-views``)."""
    return (int(seed) * 7_919 + int(epoch)) % (2**63 - 1)


def drop_seed(seed: int, step: int, call: int) -> int:
    """The seed of the dropout masks of the ``call``-th dropout of training step ``step`` in an epoch seeded with
    ``seed`` (``finetune.engine.drops.SharedDropout``): the same on every rank."""
    return (int(seed) * 2_654_435_761 + int(step) * 40_503 + int(call) * 9_973 + 11) % (2**63 - 1)


def seed_everything(seed: int) -> None:
    """Seed Python's, NumPy's and torch's global generators (torch seeds every CUDA device too)."""
    s = int(seed)
    random.seed(s)
    np.random.seed(s % 2**32)
    torch.manual_seed(s)


def seed_host(seed: int) -> None:
    """Seed Python's and torch's CPU generators only: what loading and augmenting an image draws from.
    Unlike ``torch.manual_seed`` it leaves the CUDA generators (the GPU's dropout) alone, and it costs
    microseconds: wherever CUDA is not initialised (every DataLoader worker, any CPU run),
    ``torch.manual_seed`` queues a lazy CUDA seeding with a formatted stack trace, 0.3-1.6 ms per call,
    once per image when each sample is seeded (docs/benchmarks.md, "Seeding each sample")."""
    torch.default_generator.manual_seed(int(seed))
    random.seed(int(seed))


def rng_state() -> dict[str, Any]:
    """Python, numpy, torch and CUDA generator states as weights_only-safe values (a checkpoint keeps them; CUDA's
    only where CUDA is initialised: reading them would start it)."""
    version, internal, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state: dict[str, Any] = {
        "python": {"version": version, "internal": list(internal), "gauss": gauss},
        # numpy's key array is stored as a tensor: weights_only refuses numpy arrays.
        "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Inverse of :func:`rng_state` (CUDA states only restored when the device count matches)."""
    py = state["python"]
    random.setstate((py["version"], tuple(py["internal"]), py["gauss"]))
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    torch.set_rng_state(state["torch"])
    cuda = state.get("cuda")
    if cuda and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda)


@contextmanager
def preserved_rng() -> Iterator[None]:
    """Restore Python, NumPy and torch (CPU + CUDA) RNG states on exit (:func:`rng_state`): a diagnostic run before
    ``fit`` must not change which random numbers ``fit`` draws, nor ``fit`` those of the program that calls it.

    CUDA's generators are read only where CUDA is initialised: reading them initialises it, which a CPU run on a
    GPU machine need not pay for, and which raises in a process forked after its parent used CUDA ("Cannot
    re-initialize CUDA in forked subprocess"). Where it is not, they are seeded on exit with the caller's torch
    seed, as torch would seed them when CUDA starts: the run's own seeding had replaced that pending seed
    (``torch.manual_seed`` queues its CUDA part until CUDA is initialised)."""
    state = rng_state()
    try:
        yield
    finally:
        set_rng_state(state)
        if "cuda" not in state and torch.cuda.is_available():
            torch.cuda.manual_seed_all(torch.initial_seed())     # (the caller's: restored with its CPU state)
