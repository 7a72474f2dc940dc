"""What this process may use of the machine it runs on: its cores and the memory still available, as the
operating system, a container (its cgroup's CPU quota and memory limit) and torchrun's processes beside it
allow. No torch here: ``zoo.process`` reads it before torch is imported.

A container's limits are not what ``os.cpu_count()``, the CPU affinity or /proc/meminfo tell: a Kubernetes pod
given 8 CPUs on a 128-core node sees 128 cores (its quota is CPU time, not cores), and /proc/meminfo tells the
node's memory. So both read the cgroup of this process (``/proc/self/cgroup``, v2 or v1) and of each cgroup
above it, and take the tightest.
"""
from __future__ import annotations

import math
import multiprocessing
import os

__all__ = ["affinity_cpus", "usable_cpus", "process_cpus", "launcher_count", "cpu_quota", "memory_available",
           "worker_context"]

CGROUP_ROOT = "/sys/fs/cgroup"
PROC_CGROUP = "/proc/self/cgroup"


def usable_cpus() -> int:
    """The cores this process may keep busy: its CPU affinity (a cpuset, taskset, a launcher's binding), at most
    its cgroup's CPU quota rounded up (a container's ``--cpus``, a pod's CPU limit), else the machine's count."""
    cpus, quota = affinity_cpus(), cpu_quota()
    return max(1, min(cpus, math.ceil(quota)) if quota is not None else cpus)


def affinity_cpus() -> int:
    """The cores this process may run on (its CPU affinity; else the machine's count), whatever its CPU quota."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def process_cpus() -> int:
    """This process's share of :func:`usable_cpus`: under torchrun the machine's cores are divided between its
    processes (LOCAL_WORLD_SIZE), unless the launcher has already narrowed each process's affinity to its share
    (torchrun's ``--numa-binding``, Slurm's ``--cpu-bind``): this process may then run on fewer cores than its
    parent, the launcher, and its affinity is its share. A CPU quota is its cgroup's, which the processes share
    either way (a pod's limit): each gets its part of it."""
    local = launcher_count("LOCAL_WORLD_SIZE")
    if local > 1 and _narrower_than_parent():
        quota = cpu_quota()
        return max(1, min(affinity_cpus(), math.ceil(quota) // local) if quota is not None else affinity_cpus())
    return max(1, usable_cpus() // local)


def launcher_count(name: str) -> int:
    """A process count a launcher sets, read from the environment variable ``name`` (torchrun's WORLD_SIZE, the
    job's processes, and LOCAL_WORLD_SIZE, this machine's): a whole number of 1 or more; 1, one process, when it is
    unset, empty, below 1 or not a whole number. A launcher always writes a whole number, so anything else was not
    set by one (a shell's leftover): the run is a plain one-process run, as every reader of the count agrees."""
    try:
        return max(1, int(os.environ.get(name) or 1))
    except ValueError:
        return 1


def worker_context() -> multiprocessing.context.BaseContext:
    """The multiprocessing context that the package's worker processes (DataLoader workers) and tqdm's lock are
    made in: the start method the program chose (``multiprocessing.set_start_method``), else the platform's default
    (spawn on macOS and Windows, fork on Linux, forkserver there from Python 3.14), taken without choosing it for
    the process. Asking multiprocessing for its default context (what a DataLoader and tqdm's first bar do) fixes
    the start method: a library call then made the caller's own ``set_start_method("spawn")`` fail with "context
    has already been set".
    Under forkserver the server this process starts preloads what a worker needs (:data:`FORKSERVER_PRELOAD`)."""
    method = multiprocessing.get_start_method(allow_none=True) or multiprocessing.get_all_start_methods()[0]
    if method == "forkserver":
        _preload_forkserver()
    return multiprocessing.get_context(method)


# What a DataLoader worker unpickles and runs (torch's worker loop, the package's datasets, transforms and
# collate function, PIL), imported once in the forkserver so that each worker it forks has them: without them a
# worker imports torch and torchvision itself before its first batch, as a spawned one does (3-6 s here;
# docs/benchmarks.md, "Workers under forkserver"). Importing torch does not initialise CUDA. "__main__" is the
# server's own default, kept first.
FORKSERVER_PRELOAD = ("__main__", "torch", "PIL.Image", "finetune.data")


def _preload_forkserver() -> None:
    """Have the forkserver preload FORKSERVER_PRELOAD when this process starts it (Python 3.14's default start
    method on Linux; a per-process server, started by the first worker it forks). One the program has already
    started, or whose preload it has set (``multiprocessing.set_forkserver_preload``), is left as it is."""
    from multiprocessing import forkserver  # lazy: Linux/macOS only, and only where forkserver is the method

    server = getattr(forkserver, "_forkserver", None)
    if server is None or getattr(server, "_forkserver_pid", None) is not None:
        return
    if getattr(server, "_preload_modules", None) == ["__main__"]:
        server.set_forkserver_preload(list(FORKSERVER_PRELOAD))


def _narrower_than_parent() -> bool:
    try:
        return os.sched_getaffinity(0) < os.sched_getaffinity(os.getppid())
    except (AttributeError, OSError):
        return False


def cpu_quota() -> float | None:
    """The CPUs this process's cgroups allow in CPU time (quota / period; 2.5 for a container run with
    ``--cpus 2.5``), the tightest of its cgroup and those above it; None where there is no quota or no cgroup."""
    quotas = []
    for folder in _cgroup_folders("cpu"):
        pair = _read_words(os.path.join(folder, "cpu.max"))                  # v2: "max 100000", "250000 100000"
        if pair is None:
            quota, period = (_read_words(os.path.join(folder, name)) for name in ("cpu.cfs_quota_us",
                                                                                  "cpu.cfs_period_us"))
            pair = quota + period if quota and period else None              # v1: -1 for none
        if pair is not None and len(pair) == 2 and pair[0] not in ("max", "-1"):
            try:
                quotas.append(int(pair[0]) / int(pair[1]))
            except (ValueError, ZeroDivisionError):
                continue
    quotas = [q for q in quotas if q > 0]
    return min(quotas) if quotas else None


def memory_available() -> int | None:
    """The host memory available to new allocations, bytes: Linux's MemAvailable, and at most what this process's
    memory cgroups (a container's limit) leave; None when neither is known."""
    known = [n for n in (_meminfo("/proc/meminfo", "MemAvailable:", 1024), _cgroup_room()) if n is not None]
    return min(known) if known else None


# A memory cgroup's limit and use files (v2, then v1) with the reclaimable page cache in its memory.stat
_MEMORY_FILES = (("memory.max", "memory.current", "inactive_file"),
                 ("memory.limit_in_bytes", "memory.usage_in_bytes", "total_inactive_file"))


def _cgroup_room() -> int | None:
    """What the tightest memory cgroup's limit leaves (limit - use + its inactive page cache), or None: no limit."""
    rooms = []
    for folder in _cgroup_folders("memory"):
        for limit_file, usage_file, cache_key in _MEMORY_FILES:
            words, usage = _read_words(os.path.join(folder, limit_file)), _read_words(os.path.join(folder, usage_file))
            if not words or not usage:
                continue
            try:
                limit, used = (int(words[0]) if words[0] != "max" else None), int(usage[0])
            except ValueError:
                continue
            if limit is not None and limit < 1 << 60:                        # (v1's "no limit" is a huge number)
                cache = _meminfo(os.path.join(folder, "memory.stat"), cache_key + " ", 1) or 0
                rooms.append(max(0, limit - used + cache))
            break
    return min(rooms) if rooms else None


def _cgroup_folders(controller: str) -> list[str]:
    """The folders of this process's cgroup for ``controller`` and of each cgroup above it, the process's first,
    that exist under CGROUP_ROOT (v2's one hierarchy, mounted there or at ``unified``; v1's controller
    hierarchy). Inside a cgroup namespace (most containers) the process's cgroup is the mount's root."""
    try:
        with open(PROC_CGROUP, encoding="utf-8") as fh:
            lines = fh.read().splitlines()
    except OSError:
        return []
    found: list[str] = []
    for line in lines:
        _, controllers, path = (line.split(":", 2) + ["", ""])[:3]
        if controllers == "":
            mounts = [CGROUP_ROOT, os.path.join(CGROUP_ROOT, "unified")]
        elif controller in controllers.split(","):
            mounts = [os.path.join(CGROUP_ROOT, name) for name in (controller, controllers)]
        else:
            continue
        for mount in dict.fromkeys(mounts):
            parts = [p for p in path.strip().split("/") if p and p != ".."]
            for depth in range(len(parts), -1, -1):
                folder = os.path.join(mount, *parts[:depth])
                if os.path.isdir(folder) and folder not in found:
                    found.append(folder)
    return found


def _read_words(path: str) -> list[str] | None:
    try:
        with open(path, encoding="ascii") as fh:
            return fh.read().split() or None
    except (OSError, UnicodeDecodeError):
        return None


def _meminfo(path: str, key: str, unit: int) -> int | None:
    """The number after ``key`` on its line of ``path`` (/proc/meminfo, a cgroup's memory.stat) x ``unit``."""
    try:
        with open(path, encoding="ascii") as fh:
            for line in fh:
                if line.startswith(key):
                    return int(line.split()[1]) * unit
    except (OSError, ValueError, IndexError):
        pass
    return None
