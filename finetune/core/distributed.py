"""torchrun / DistributedDataParallel helpers.

``torchrun --nproc-per-node N -m zoo finetune ...`` starts N processes with RANK / WORLD_SIZE / LOCAL_RANK
(and MASTER_ADDR / MASTER_PORT) in the environment; :func:`setup` reads them and joins the process group
(nccl on CUDA, gloo otherwise). A plain ``python`` run sees no WORLD_SIZE and gets a one-process
:class:`DistInfo` whose collectives are no-ops, so the loop has a single code path.

Batch size convention: ``config.batch_size`` is the *global* batch, split evenly across ranks, so a run on
N processes takes the same optimisation steps as a one-process run (equal up to float noise when the
training set size is a multiple of N; otherwise DistributedSampler pads with a few repeated images).
"""
from __future__ import annotations

import contextlib
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path
from datetime import timedelta
from typing import Any, Callable

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

from finetune.core import lastwords
from finetune.core.checkpoint import LAST
from finetune.core.io import resume_command
from finetune.core.errors import ConfigError, FinetuneError
from finetune.core.host import launcher_count

__all__ = ["DistInfo", "setup", "per_rank_batch", "all_reduce_sum",
           "all_reduce_max", "all_true", "broadcast_object", "gather_objects", "broadcast_module", "gather_strided",
           "barrier", "leave", "wrap_model", "cleanup", "entered_on_main", "computed_on_main", "raise_if_peer_lost"]


# gather_strided moves at most this much per collective: under NCCL the rows travel through every rank's GPU,
# and a feature bank gathered whole (1M images x 2 views x 2,048 floats: 16 GB, received by NCCL into one flat
# buffer, then copied into the ranks' parts) needs twice that on each GPU, where one process keeps the bank on the
# host (read from the code, not met: no multi-GPU machine was at hand)
GATHER_BYTES = 256 << 20
# how long the other ranks wait for rank 0 in computed_on_main: a first scan of millions of files on network
# storage can take an hour; a rank 0 that died is noticed sooner (torchrun ends the job)
PATIENCE = timedelta(hours=24)


@dataclass(frozen=True)
class DistInfo:
    """Where this process sits in the job. ``enabled`` is False for an ordinary single-process run."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    enabled: bool = False

    @property
    def is_main(self) -> bool:
        """Only rank 0 writes files and reports progress."""
        return self.rank == 0

    @property
    def is_node_main(self) -> bool:
        """The first process on its machine: it fills that machine's caches (ZOO_HOME is per machine; a cache
        shared between machines is safe too, as each file is written to a temporary name and renamed)."""
        return self.local_rank == 0


def setup(device: str) -> DistInfo:
    """Join the process group described by torchrun's environment variables (idempotent; in an NCCL group the
    caller joined, this process is pinned to cuda:LOCAL_RANK too).

    Args:
        device: ``config.device``; "cuda", "cuda:N", or "auto" with a GPU visible: nccl, pinning this
            process to cuda:LOCAL_RANK; anything else gloo (MPS runs one process).
    Returns:
        This process's DistInfo (a disabled one outside torchrun).
    Raises:
        ConfigError: "cuda" with no GPU for this process (none visible, or more processes on the machine
            than GPUs): torch's own error is a traceback per rank.
    """
    world = launcher_count("WORLD_SIZE")
    if world <= 1:
        return DistInfo()
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if not dist.is_initialized():
        device = (device or "auto").strip().lower()
        cuda = device.startswith("cuda") or (device == "auto" and torch.cuda.is_available())
        backend = "nccl" if cuda else "gloo"
        if cuda:
            _check_gpu_for(local_rank)
            torch.cuda.set_device(local_rank)
        dist.init_process_group(backend=backend, init_method="env://")
    elif dist.get_backend() == "nccl" and torch.cuda.current_device() != local_rank:
        # a group the caller joined (``fit`` in a script of theirs) without pinning the GPU: NCCL's object
        # collectives and ``gather_strided`` take the current device, cuda:0 on every rank (NCCL: "Duplicate GPU")
        _check_gpu_for(local_rank)
        torch.cuda.set_device(local_rank)
    return DistInfo(rank=dist.get_rank(), world_size=dist.get_world_size(), local_rank=local_rank, enabled=True)


def _check_gpu_for(local_rank: int) -> None:
    """Raise ConfigError unless this machine shows a GPU for local rank ``local_rank`` (each process trains
    on cuda:LOCAL_RANK)."""
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if count == 0:
        raise ConfigError("device=cuda under torchrun, but no CUDA device is visible here; use --device cpu "
                          "(or auto)")
    if local_rank >= count:
        raise ConfigError(f"torchrun started local rank {local_rank}, but this machine shows {count} CUDA "
                          f"device(s) and each process trains on its own GPU: use --nproc-per-node {count} or "
                          "fewer (or check CUDA_VISIBLE_DEVICES)")


def per_rank_batch(batch_size: int, info: DistInfo) -> int:
    """Split the global batch across ranks; refuses sizes that do not divide evenly."""
    if batch_size % info.world_size:
        lo = batch_size - batch_size % info.world_size
        raise ConfigError(f"batch_size={batch_size} is the global batch and must divide by the "
                          f"{info.world_size} processes: use {lo or info.world_size} or {lo + info.world_size}")
    return batch_size // info.world_size


def all_reduce_sum(tensor: torch.Tensor, info: DistInfo) -> torch.Tensor:
    """Sum ``tensor`` over ranks in place (no-op in a single process); returns it."""
    if info.enabled:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def all_reduce_max(tensor: torch.Tensor, info: DistInfo) -> torch.Tensor:
    """Maximum of ``tensor`` over ranks in place (no-op in a single process); returns it."""
    if info.enabled:
        dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return tensor


def all_true(flag: bool, device: torch.device, info: DistInfo) -> bool:
    """True only when ``flag`` holds on every rank, so that all ranks take the same branch."""
    if not info.enabled:
        return flag
    t = torch.tensor([1 if flag else 0], device=device, dtype=torch.int32)
    dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return bool(t.item())


def broadcast_object(obj: Any, info: DistInfo) -> Any:
    """Rank 0's ``obj`` on every rank (e.g. the run folder name chosen from rank 0's clock)."""
    if not info.enabled:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


@contextlib.contextmanager
def entered_on_main(cm, info: DistInfo):
    """Enter ``cm``, a check only rank 0 makes (e.g. claiming the run folder: the others' ``cm`` lets them
    through), and share its outcome: when rank 0 is refused, every rank raises its error. The others would
    otherwise wait for rank 0 in the next collective until its exit broke the connection (a traceback each).

    Raises:
        rank 0's error, on rank 0 as raised, on the others as a FinetuneError with its message and exit code.
    """
    with contextlib.ExitStack() as stack:
        failed: Exception | None = None
        try:
            value = stack.enter_context(cm)
        except Exception as e:  # noqa: BLE001 - re-raised below, after every rank has heard of it
            failed = e
        _share_outcome(failed, info)
        yield value


def computed_on_main(fn: Callable[[], Any], info: DistInfo) -> Any:
    """``fn()`` run on rank 0 alone, its value on every rank: one look at something the ranks must agree on
    (the data folder's scan: a file added while N ranks each scanned would give them different datasets).
    In one process, ``fn()``.

    The others wait in a gloo group of its own, for up to ``PATIENCE``: the default group's timeout (NCCL's 10
    minutes) would end them during a long first scan. The value travels through the host (a report of a
    million images is some 70 MB), never a GPU.

    Raises:
        ``fn``'s error, on rank 0 as raised, on the others as a FinetuneError with its message and exit code
        (an interrupt of rank 0 included: exit code 130).
    """
    if not info.enabled:
        return fn()
    patient = dist.new_group(backend="gloo", timeout=PATIENCE)       # every rank, before rank 0 starts
    try:
        box: list[Any] = [None]
        if info.is_main:
            try:
                box = [("value", fn())]
            except BaseException as e:   # an interrupt too: the others hear of it, not of a broken connection
                code = getattr(e, "exit_code", 130 if isinstance(e, KeyboardInterrupt) else 1)
                dist.broadcast_object_list([("error", str(e) or "rank 0 was interrupted", code)], src=0, group=patient)
                raise
        dist.broadcast_object_list(box, src=0, group=patient)
    finally:
        dist.destroy_process_group(patient)
    if box[0][0] == "error":
        raise _told(*box[0][1:])
    return box[0][1]


def _share_outcome(failed: Exception | None, info: DistInfo) -> None:
    """Rank 0's error (``failed``, None on the others and where it succeeded) raised on every rank."""
    mine = (str(failed), getattr(failed, "exit_code", 1)) if failed is not None and info.is_main else None
    told = broadcast_object(mine, info) if info.enabled else None
    if failed is not None:
        raise failed
    if told is not None:
        raise _told(*told)


def _told(message: str, exit_code: int) -> FinetuneError:
    """Rank 0's error as another rank raises it: its message and exit code."""
    err = FinetuneError(message)
    err.exit_code = exit_code
    return err


def raise_if_peer_lost(err: BaseException, info: DistInfo, run_dir: str | os.PathLike | None) -> None:
    """Under torchrun, ``err`` met in a collective because another process of the job is gone (killed, out of
    memory, stopped by its own error or a full disk) raised again as one line that says what ``run_dir`` keeps
    (the checkpoint of its last finished epoch, or of its start: ``--resume``, on any number of processes).
    The backend's error (gloo's "Connection reset by peer", NCCL's ``DistBackendError``) was a traceback that
    named neither; its first sentence is kept. Rank 0 names the process that ended, from the others' last words
    (``lastwords``): the one that ended on its own error, with that error's line (which, naming a command of
    its own, replaces what ``run_dir`` keeps), else the one process that left no word (killed). Any other error:
    nothing. Each rank raises it; rank 0 alone says it (``zoo.cli.app``).

    Raises:
        FinetuneError: ``err`` was a collective that lost its peer.
    """
    text = str(err)
    if not info.enabled or not isinstance(err, RuntimeError) or not (
            isinstance(err, dist.DistError) or "gloo/transport" in text):
        return
    first = text.split("] ", 1)[-1].split(". ")[0].strip()     # gloo: "[.../pair.cc:545] Read error ...: ..."
    reason = first.splitlines()[0][:200] if first else type(err).__name__
    if run_dir is not None and (Path(run_dir) / LAST).is_file():
        then = f"{run_dir} keeps its last checkpoint: continue with `{resume_command(run_dir)}`"
    else:
        then = "no epoch was saved: start the run again"
    if _TIMED_OUT.search(text):      # (gloo's "Timed out waiting 1800000ms for recv", NCCL's watchdog): alive
        raise FinetuneError(f"another process of this torchrun job did not reach the same step within the process "
                            f"group's timeout ({reason}): it is stuck or far slower than this one, and its own lines "
                            f"may say why; {then}") from None
    lastwords.leave_word("")       # (this process ends on another's end: no reason of its own)
    words = lastwords.last_words(info.rank, info.world_size, lastwords.WORDS_WAIT_S) if info.is_main else None
    silent = [r for r in range(info.world_size) if r != info.rank and r not in (words or {})]
    if own := lastwords.own_errors(words or {}):      # (a word that names a command, `...`, says how to go on)
        go_on = "" if lastwords.names_a_way_on(words or {}) else f"; {then}"
        raise FinetuneError(own + go_on) from None
    if words is not None and len(silent) == 1:
        raise FinetuneError(f"rank {silent[0]} of this torchrun job stopped without a word (killed, by the "
                            f"out-of-memory killer or a signal, or a crash: torchrun's summary gives its exit code), "
                            f"and the connection to it broke ({reason}); {then}") from None
    raise FinetuneError(f"another process of this torchrun job stopped, and the connection to it broke "
                        f"({reason}); torchrun's summary names its rank and exit code, and its own lines say why; "
                        f"{then}") from None


# (not "timeout": NCCL's errors of every kind describe their work with "Timeout(ms)=600000")
_TIMED_OUT = re.compile(r"timed out|timing out", re.IGNORECASE)


def gather_objects(obj: Any, info: DistInfo) -> list[Any]:
    """Every rank's ``obj``, in rank order, on every rank (``[obj]`` in one process)."""
    if not info.enabled:
        return [obj]
    out: list[Any] = [None] * info.world_size
    dist.all_gather_object(out, obj)
    return out


def broadcast_module(module: torch.nn.Module, info: DistInfo, *, buffers_only: bool = False) -> None:
    """Rank 0's parameters and buffers of ``module`` (``buffers_only``: its buffers) copied into every rank's, in
    place."""
    if not info.enabled:
        return
    with torch.no_grad():
        for t in (module.buffers() if buffers_only else module.state_dict().values()):
            dist.broadcast(t, src=0)


def _comm_device() -> torch.device:
    """Where the process group's collectives take tensors: this rank's GPU for nccl, the CPU for gloo."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def gather_strided(rows: torch.Tensor | None, n: int, info: DistInfo) -> torch.Tensor:
    """Every rank's rows of a strided shard, assembled on every rank in item order.

    Rank ``r`` holds the rows of items ``r, r + W, r + 2W, ...`` of ``n`` items (``W`` ranks), stacked on
    dim 0; ``rows`` is None on a rank that has none to give (its rows come back as zeros, e.g. a shard
    whose every image failed to decode), as long as one rank has rows (they give the shape and dtype).
    Returns the ``n`` rows on the CPU.
    """
    if not info.enabled:
        if rows is None:
            raise ValueError("gather_strided: no rows")
        return rows
    world, rank = info.world_size, info.rank
    mine = len(range(rank, n, world))
    meta = gather_objects(None if rows is None else (tuple(rows.shape[1:]), str(rows.dtype)), info)
    known = next((m for m in meta if m is not None), None)
    if known is None:
        raise ValueError("gather_strided: no rank has rows")
    tail, dtype = known[0], getattr(torch, known[1].replace("torch.", ""))
    per = -(-n // world)
    dev = _comm_device()
    row_bytes = max(1, math.prod(tail) * torch.empty((), dtype=dtype).element_size())
    step = max(1, GATHER_BYTES // (row_bytes * world))     # rows of each rank per collective
    out = torch.empty((n, *tail), dtype=dtype)
    for start in range(0, per, step):
        k = min(step, per - start)
        padded = torch.zeros((k, *tail), dtype=dtype, device=dev)
        if rows is not None and mine > start:
            got = min(k, mine - start)
            padded[:got] = rows[start:start + got].to(dev)
        parts = [torch.empty_like(padded) for _ in range(world)]
        dist.all_gather(parts, padded)
        for r, part in enumerate(parts):
            theirs = len(range(r, n, world)) - start       # rank r's rows left from this block on
            if theirs > 0:
                out[r + start * world::world][:min(k, theirs)] = part[:min(k, theirs)].cpu()
    return out


def barrier(info: DistInfo) -> None:
    if info.enabled:
        dist.barrier()


def leave(info: DistInfo) -> None:
    """Every rank leaves the process group together: a barrier, then the group is gone (nothing when it is
    already). Called where the collectives are over and work that one rank does alone begins (rank 0's
    export and report): the others would wait for it in a collective, which NCCL's watchdog ends after its
    timeout (10 minutes), failing a finished job; having left, they exit and free their GPUs."""
    if info.enabled and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def wrap_model(model: torch.nn.Module, device: torch.device, info: DistInfo) -> torch.nn.Module:
    """DistributedDataParallel around ``model`` when distributed, else ``model`` itself.

    DDP broadcasts rank 0's parameters and buffers at construction, so every rank starts identical.
    """
    if not info.enabled:
        return model
    ids = [device.index] if device.type == "cuda" else None
    # Frozen parameters (requires_grad=False) are not registered for gradient reduction, so
    # find_unused_parameters is not needed. Buffers are broadcast from rank 0 each forward so that
    # BatchNorm statistics stay identical across ranks when bn="train".
    return DDP(model, device_ids=ids)


def cleanup(info: DistInfo) -> None:
    """Leave the process group (call once, at the very end of the job)."""
    if info.enabled and dist.is_initialized():
        dist.destroy_process_group()
