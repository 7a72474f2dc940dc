"""Process-wide settings, made once at the CLI's entry point (``zoo.cli.app.ZooGroup``) and said in a
run's log; the library (``finetune``, ``zoo``'s Python API) never changes them behind a caller's back.

The garbage collector runs its young collections less often (:func:`fewer_collections`), and at exit its
last passes are skipped (:func:`skip_final_collection`).

torch's threads: inside a container whose CPU quota is below the cores it sees (a pod's CPU limit on a big
node), one thread per core would share the quota's time and stall each other (:func:`threads_within_quota`).

glibc's malloc: large blocks are kept mapped between training steps instead of being returned to the
kernel and faulted in again page by page on the next step (docs/benchmarks.md, "Memory the training
step frees"), which is what jemalloc or tcmalloc would do, without preloading a library. No torch here:
``zoo --help`` stays fast.
"""
from __future__ import annotations

import ctypes
import functools
import gc
import os
import signal
import sys
import threading

from finetune.core.host import affinity_cpus, cpu_quota, launcher_count, usable_cpus

__all__ = ["keep_freed_memory", "threads_within_quota", "describe", "fewer_collections", "skip_final_collection",
           "launcher_rank", "under_torchrun", "deaf_to_torchrun_stop"]

_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4      # glibc <malloc.h>


def launcher_rank() -> int:
    """This process's rank as a launcher set it (RANK: torchrun, also SLURM or Kubeflow set-ups); 0 when
    unset or not a number. Only rank 0 prints, locks and writes a run folder."""
    try:
        return int(os.environ.get("RANK", "0") or 0)
    except ValueError:
        return 0


def under_torchrun() -> bool:
    """Started by torchrun (its TORCHELASTIC_RUN_ID) with other processes beside this one: torchrun stops
    them all once one has exited, which the CLI's one-line errors rely on (zoo.cli.app)."""
    return bool(os.environ.get("TORCHELASTIC_RUN_ID")) and launcher_count("WORLD_SIZE") > 1


@functools.cache      # once per process
def keep_freed_memory() -> bool:
    """Make glibc's malloc serve large blocks from the heap and never trim it (M_MMAP_MAX=0,
    M_TRIM_THRESHOLD=2 GiB), so the memory a training step frees is there for the next one.

    Left as it is when the process already chose (GLIBC_TUNABLES with malloc settings, a MALLOC_*
    variable, an LD_PRELOAD allocator), when ZOO_MALLOC=system, and off glibc. Returns whether it set it.
    """
    env = os.environ
    if (env.get("ZOO_MALLOC", "").strip().lower() == "system" or "malloc" in env.get("GLIBC_TUNABLES", "")
            or any(k.startswith("MALLOC_") for k in env) or env.get("LD_PRELOAD", "").strip()):
        return False
    try:
        libc = ctypes.CDLL(None)
        return bool(libc.gnu_get_libc_version) and bool(libc.mallopt(_M_MMAP_MAX, 0)) and bool(
            libc.mallopt(_M_TRIM_THRESHOLD, 2**31 - 1))
    except (OSError, AttributeError, TypeError):   # not glibc (macOS, musl, Windows): nothing to tune
        return False


@functools.cache      # once per process
def threads_within_quota() -> int | None:
    """Where this process's cgroup allows fewer CPUs (its quota, rounded up) than the cores it may run on, torch
    would start a thread per core, each given a share of the quota's time, and wait at every parallel region for
    the one the kernel throttled: set OMP_NUM_THREADS to the quota's CPUs, as ``docker run --cpus N`` users are
    told to do by hand. Left as it is when the process already chose (OMP_NUM_THREADS set: torchrun sets 1 for
    several processes), and once torch is imported (its thread pool read the variable). Returns the count set."""
    if cpu_quota() is None or "OMP_NUM_THREADS" in os.environ or "torch" in sys.modules:
        return None
    cpus = usable_cpus()     # (the quota rounded up, and at most the affinity's cores: the one rule)
    if cpus >= affinity_cpus():
        return None
    os.environ["OMP_NUM_THREADS"] = str(cpus)
    return cpus


# Objects allocated between two young collections (Python's default: 700). Importing torch, torchvision and
# timm makes millions of long-lived objects, and the default thresholds run a full collection over them
# again and again while they load: `import zoo.jobs.finetune, timm` 2.8 s -> 2.2 s with this
# (docs/benchmarks.md, "The garbage collector").
GC_YOUNG_THRESHOLD = 50_000


def fewer_collections() -> None:
    """Raise the garbage collector's young threshold to GC_YOUNG_THRESHOLD (never lower it): garbage in
    reference cycles waits a little longer, everything else is freed as before."""
    young, mid, old = gc.get_threshold()
    if 0 < young < GC_YOUNG_THRESHOLD:
        gc.set_threshold(GC_YOUNG_THRESHOLD, max(mid, 20), max(old, 100))


def skip_final_collection() -> None:
    """Called as the process is about to exit: move every object to the garbage collector's permanent
    generation (``gc.freeze``), so that the interpreter's finalization does not walk again the millions of
    objects that torch, torchvision and timm created (0.75 s per process here: docs/benchmarks.md,
    "Process exit"). atexit handlers (weakref finalizers, logging, multiprocessing) and the teardown of
    modules run as before; only cyclic garbage is left to the operating system."""
    gc.freeze()


def deaf_to_torchrun_stop() -> None:
    """Called as the process is about to exit, the command over: under torchrun, SIGTERM is ignored from here on,
    and the process exits with the command's code. torchrun's SIGTERM, sent once another rank had ended, reached
    rank 0 after its line, as it exited (SIGTERM's default handler back): torchrun's summary said -15 where a stop
    that came sooner left 1 (helper-145). An exit that hangs still ends: torchrun sends SIGKILL after its wait."""
    if under_torchrun() and threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, signal.SIG_IGN)


def describe() -> str | None:
    """The lines a run's log gets about what this process set that a user should know of, one a setting (None
    when nothing was set): the thread count, where it is fewer than the cores the run sees. Not
    :func:`keep_freed_memory`, set on every glibc run alike: a line at every start that needed no action
    (helper-149); docs/guide/performance.md says what it does and that ``ZOO_MALLOC=system`` turns it off."""
    notes = []
    if threads_within_quota.cache_info().currsize and threads_within_quota():
        notes.append(f"threads: {threads_within_quota()}, the CPUs this container's quota allows (fewer than the "
                     f"cores it sees; OMP_NUM_THREADS sets another count)")
    return "\n".join(notes) or None
