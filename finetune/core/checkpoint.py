"""Checkpoints of a run: ``checkpoints/last.pt`` (everything needed to resume) and
``checkpoints/best.safetensors`` (the best weights only).

``last.pt`` holds only tensors, numbers, strings, lists and dicts, so it loads with
``torch.load(weights_only=True)``: no pickled code runs when a checkpoint is read. Both files are written
atomically (temp file + fsync + rename), so a kill -9 at any moment leaves the previous version intact.
A run hands them to :class:`BackgroundWrites`, so that training goes on while they reach the disk.
"""
from __future__ import annotations

import hashlib
import os
import threading
from pathlib import Path
from typing import Any, Callable

import torch
from safetensors.torch import load, load_file, save, save_file

from finetune.core.errors import CheckpointError
from finetune.core.io import atomic_write, read_safetensors_header, shell_command, write_file
from finetune.core.rerun import start_over_command

__all__ = ["LAST", "BEST", "save_checkpoint", "load_checkpoint", "CpuStateCache",
           "save_weights", "load_weights", "read_tensors", "write_tensors", "weights_damage", "tensors_sha256",
           "state_sha256", "cpu_state_dict", "cpu_copy", "BackgroundWrites"]

LAST = Path("checkpoints") / "last.pt"
BEST = Path("checkpoints") / "best.safetensors"
HEAD_BEST = Path("checkpoints") / "head.safetensors"    # the head phase's best weights (the head guard's)
# The weights files record the sha256 of their tensors (names, dtypes, shapes, bytes): safetensors has no
# checksum, and a flipped bit on disk would otherwise be resumed from, or exported into a bundle whose own
# sha256 then vouches for it (as the feature cache does for its banks).
DIGEST_KEY = "zoo_tensors_sha256"
# last.pt records the sha256 of everything else it holds (state_sha256) under this key, computed on the writer
# thread while the next epoch trains: on the 2-core CPU 0.06-0.07 s for EfficientNet-Lite0 with Adam state
# (41 MB; its torch.save + fsync 0.11 s), 0.26-0.44 s for ResNet-50's (283 MB; 0.77 s), against CPU epochs of
# minutes (docs/reliability.md). torch.load checks no CRC: without it a flipped bit resumed silently.
# Checkpoints from before it are read unchecked.
STATE_DIGEST_KEY = "zoo_sha256"


def cpu_state_dict(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """A detached CPU copy of the module's state (parameters and buffers), safe to keep or serialise."""
    return {k: v.detach().to("cpu", copy=True).contiguous() for k, v in module.state_dict().items()}


def cpu_copy(value: Any) -> Any:
    """``value`` (dicts, lists, tuples, tensors, plain values) with every tensor copied to the CPU: a
    snapshot that training can no longer change in place (an optimizer's ``state_dict()`` holds its live
    tensors)."""
    if isinstance(value, torch.Tensor):
        return value.detach().to("cpu", copy=True)
    if isinstance(value, dict):
        return {k: cpu_copy(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(cpu_copy(v) for v in value)
    return value


class BackgroundWrites:
    """Runs writes on one background thread, in the order they were submitted, so that training goes on
    while an epoch's checkpoint reaches the disk: torch.save, safetensors and fsync release the GIL (the
    training thread kept 0.89-0.95x of its pace during a 300 MB save on the 2-core CPU; on a GPU such a
    save is a tenth of a ResNet-50 epoch: docs/benchmarks.md, "Checkpoints in the background").

    Each write gets values nothing changes any more (:func:`cpu_copy`). :meth:`wait` returns when every
    write submitted so far is on disk and raises the first one's error (CheckpointError: disk full...).
    The thread is not a daemon: a process that ends with writes pending finishes them first."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._queue: list[Callable[[], None]] = []
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None

    def submit(self, write: Callable[[], None]) -> None:
        with self._lock:
            self._queue.append(write)
            self._running()

    def _running(self) -> threading.Thread | None:
        """The writing thread, started when there is work (the lock held: ``_drain`` takes the lock before
        it looks at the queue, and a thread an interrupt left unstarted is started here)."""
        if self._thread is None and self._queue:
            self._thread = threading.Thread(target=self._drain, name="zoo-checkpoint-writes")
        if self._thread is not None and self._thread.ident is None:
            self._thread.start()
        return self._thread

    def _drain(self) -> None:
        while True:
            with self._lock:
                if not self._queue:
                    self._thread = None
                    return
                write = self._queue.pop(0)
            try:
                write()
            except BaseException as err:        # kept for wait(), in the caller's thread
                with self._lock:
                    self._error = self._error or err

    def wait(self) -> None:
        """Block until every submitted write is done; raise the first failed write's error (once)."""
        while True:
            with self._lock:
                thread = self._running()
            if thread is None:
                break
            thread.join()
        with self._lock:
            err, self._error = self._error, None
        if err is not None:
            raise err


class CpuStateCache:
    """Detached CPU copies of a module's state, made incrementally: a parameter that is the same object,
    on the same storage, with the same in-place version counter as at the last call is not copied again
    (a frozen backbone is copied once per run, not once per epoch). Buffers are always copied: BatchNorm
    updates its running statistics without bumping their version counter, and they are small.
    Returned tensors may be shared between calls: treat them as read-only."""

    def __init__(self, module: torch.nn.Module) -> None:
        self.module = module
        self._params: dict[str, tuple[torch.Tensor, int, int, torch.Tensor]] = {}

    def __call__(self) -> dict[str, torch.Tensor]:
        params = {id(p) for p in self.module.parameters()}
        out: dict[str, torch.Tensor] = {}
        for name, t in self.module.state_dict(keep_vars=True).items():
            if id(t) not in params:
                out[name] = t.detach().to("cpu", copy=True).contiguous()
                continue
            hit = self._params.get(name)
            if hit is not None and hit[0] is t and hit[1] == t._version and hit[2] == t.data_ptr():
                out[name] = hit[3]
                continue
            copy = t.detach().to("cpu", copy=True).contiguous()
            self._params[name] = (t, t._version, t.data_ptr(), copy)
            out[name] = copy
        return out


def _hash_tensor(h: Any, label: str, t: torch.Tensor) -> None:
    """Feed ``h`` one tensor as both digests take it: ``label``, dtype and shape, then its bytes."""
    t = t.detach().cpu().contiguous()
    h.update(f"{label}|{t.dtype}|{tuple(t.shape)}\n".encode())
    if t.numel():
        h.update(memoryview(t.reshape(-1).view(torch.uint8).numpy()))   # (hashlib releases the GIL)


def state_sha256(state: Any) -> str:
    """The sha256 of a checkpoint's contents: every value in order, where it sits (keys, list positions),
    tensors by dtype, shape and bytes, other leaves by ``repr`` (as they load back: ints, floats, strings)."""
    h = hashlib.sha256()

    def walk(value: Any, where: str) -> None:
        if isinstance(value, torch.Tensor):
            _hash_tensor(h, where, value)
        elif isinstance(value, dict):
            h.update(f"{where}|dict|{len(value)}\n".encode())
            for k, v in value.items():
                walk(v, f"{where}/{k!r}")
        elif isinstance(value, (list, tuple)):
            h.update(f"{where}|{type(value).__name__}|{len(value)}\n".encode())
            for i, v in enumerate(value):
                walk(v, f"{where}/{i}")
        else:
            h.update(f"{where}|{value!r}\n".encode())

    walk(state, "")
    return h.hexdigest()


def save_checkpoint(path: str | Path, state: dict[str, Any]) -> None:
    """Write ``state`` to ``path`` atomically, with the sha256 of its contents (:func:`state_sha256`, checked
    by :func:`load_checkpoint`). Raises CheckpointError (e.g. disk full) naming the path."""
    path = Path(path)
    state = {**state, STATE_DIGEST_KEY: state_sha256(state)}
    try:
        # through a Python file: torch.save on a path reports a full disk as RuntimeError, not OSError
        atomic_write(path, lambda tmp: write_file(tmp, lambda fh: torch.save(state, fh)))
    except OSError as e:
        raise CheckpointError(f"cannot write checkpoint {path}: {e.strerror or e}; free some disk space "
                              "or choose another --out") from None


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu", *,
                    mmap: bool = False) -> dict[str, Any]:
    """Read a checkpoint written by :func:`save_checkpoint` with ``weights_only=True``, its contents checked
    against the sha256 it recorded (a checkpoint from before it recorded one: unchecked). ``mmap``: its
    tensors mapped, not read, and not checked: to look at its small fields (read and checked where the path
    is not UTF-8).

    Raises:
        CheckpointError: none at ``path``, not a zoo checkpoint, or damaged (says what to do)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"no checkpoint at {path}: there is nothing to resume from, start it again "
                              "without --resume")
    run = path.parent.parent if path.parent.name == "checkpoints" else path.parent

    def what_now() -> str:      # (read from the run's records only when a line says it)
        # "without --resume" (as it said for a truncated file) is refused: the folder holds a run (QA)
        return (f"export its best epoch (checked on its own) with `{shell_command('zoo', 'export', run)}`, or start "
                f"the run over with `{start_over_command(run)}`")
    mmap = mmap and _utf8(path) is not None     # torch maps only a UTF-8 path; it reads any other one whole
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
    except Exception as e:  # torch raises several types for damaged or foreign files
        raise CheckpointError(f"checkpoint {path} is damaged or not a zoo checkpoint ({type(e).__name__}), so "
                              f"the run cannot go on from it; {what_now()}") from None
    recorded = ckpt.pop(STATE_DIGEST_KEY, None) if isinstance(ckpt, dict) else None
    if recorded is not None and not mmap and recorded != state_sha256(ckpt):
        raise CheckpointError(f"checkpoint {path} is damaged: what it holds does not match the sha256 recorded "
                              f"when it was written, so the run cannot go on from it; {what_now()}")
    return ckpt


def tensors_sha256(tensors: dict[str, torch.Tensor], salt: str = "") -> str:
    """The sha256 of named tensors (names, dtypes, shapes and bytes, in name order), after ``salt``: what a
    weights file records (:data:`DIGEST_KEY`) and what keys the feature cache to a backbone's weights."""
    h = hashlib.sha256(salt.encode())
    for name in sorted(tensors):
        _hash_tensor(h, name, tensors[name])
    return h.hexdigest()


def _utf8(path: str | os.PathLike) -> str | None:
    """``path`` as the str safetensors can open, or None: safetensors opens only UTF-8 paths, while a folder
    named in another encoding (a Latin-1 byte, which Python gives as a surrogate escape) is any OS's to accept."""
    name = os.fspath(path)
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        return None
    return name


def read_tensors(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Every tensor of the safetensors file ``path``, on the CPU: memory-mapped, or read whole through Python's
    open() where the path is not UTF-8 (what every weights file zoo reads goes through).

    Raises:
        OSError: the file cannot be read; SafetensorError: it is no safetensors file.
    """
    name = _utf8(path)
    if name is not None:
        return load_file(name, device="cpu")
    with open(path, "rb") as fh:
        return load(fh.read())


def write_tensors(path: str | os.PathLike, tensors: dict[str, torch.Tensor],
                  metadata: dict[str, str] | None = None) -> None:
    """``safetensors.torch.save_file``, also to a path that is not UTF-8 (through Python's open()); not atomic:
    hand it to :func:`~finetune.core.io.atomic_write` as the writer of its temp file."""
    name = _utf8(path)
    if name is not None:
        save_file(tensors, name, metadata=metadata)
        return
    data = save(tensors, metadata=metadata)
    write_file(path, lambda fh: fh.write(data))


def weights_damage(path: str | Path, tensors: dict[str, torch.Tensor]) -> str | None:
    """Why the ``tensors`` read from the weights file ``path`` are not what :func:`save_weights` wrote (their
    sha256 differs from the one it recorded), or None (they are; or a file written before zoo recorded it)."""
    recorded = (read_safetensors_header(path).get("__metadata__") or {}).get(DIGEST_KEY)
    if recorded is None or recorded == tensors_sha256(tensors):
        return None
    return f"the tensors of {path} do not match the sha256 recorded when it was written (a damaged file)"


def save_weights(path: str | Path, module: torch.nn.Module | dict[str, torch.Tensor],
                 metadata: dict[str, str] | None = None) -> None:
    """Write the module's state (or a CPU state dict) as safetensors, atomically, with its tensors' sha256."""
    tensors = cpu_state_dict(module) if isinstance(module, torch.nn.Module) else module
    path = Path(path)
    metadata = {**(metadata or {}), DIGEST_KEY: tensors_sha256(tensors)}
    try:
        atomic_write(path, lambda tmp: write_tensors(tmp, tensors, metadata))
    except OSError as e:
        raise CheckpointError(f"cannot write {path}: {e.strerror or e}; free some disk space "
                              "or choose another --out") from None


def load_weights(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a safetensors file written by :func:`save_weights` (CPU tensors)."""
    try:
        state = read_tensors(path)
        damage = weights_damage(path, state)
    except Exception as e:  # safetensors raises its own error type for damaged files
        raise CheckpointError(f"cannot read weights {path} ({type(e).__name__}); the run folder is "
                              "damaged, start the run again") from None
    if damage:
        raise CheckpointError(f"{damage}; the run folder is damaged, start the run again")
    return state
