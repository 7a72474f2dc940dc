"""The temp files of atomic writes (``finetune.core.io.atomic_write``): their names, and whether the process that
made one may still be writing it, so that a later command removes a write cut short (kill -9 before the rename)
and never the temp of a write still going on (its rename would fail, its file lost).

A temp of ``NAME`` is ``.NAME.<pid>-<start>@<tag>.<8 random>.tmp``:

- ``pid``: the writer's process id; ``start``: when that process started (Linux: /proc/PID/stat's start time, clock
  ticks since boot, base 36; left out where unknown), so that a pid taken since by another process (pids wrap)
  reads as another process, the writer gone;
- ``tag``: 8 hex of a hash of where that pid means something: the boot and the pid namespace on Linux (boot_id,
  and /proc/self/ns/pid's inode: containers that share a host name have pid namespaces of their own), the host
  name elsewhere.

Earlier versions wrote ``<pid>@<6 hex of the host name's hash>`` (which pid namespace is not known) and, before
that, no writer: both are still temps, of a writer that cannot be checked here.
"""
from __future__ import annotations

import contextlib
import hashlib
import os
import re
import socket
import tempfile
import time

__all__ = ["TEMP_SUFFIX", "temp_prefix", "is_temp", "is_temp_of", "temp_target", "writer_running", "host_tag",
           "boot_tag", "pid_alive", "process_start", "process_running", "folder_now"]

TEMP_SUFFIX = ".tmp"
_BOOT_ID = "/proc/sys/kernel/random/boot_id"
# .NAME[.WRITER].RANDOM.tmp; WRITER of an earlier version: pid@6 hex (its host name's)
_TEMP = re.compile(r"\.(?P<name>.+?)(?:\.(?P<writer>\d+(?:-[0-9a-z]+)?@[0-9a-f]{6}(?:[0-9a-f]{2})?))?"
                   r"\.[a-z0-9_]{8}" + re.escape(TEMP_SUFFIX))
_WRITER = re.compile(r"(\d+)(?:-([0-9a-z]+))?@([0-9a-f]{8})")


def host_tag() -> str:
    """8 hex naming the pid namespace this process's pids belong to (see the module's docstring)."""
    try:
        where = f"{_boot_id()}:{os.stat('/proc/self/ns/pid').st_ino}"
    except (OSError, ValueError):
        where = "host:" + socket.gethostname()
    return _hex8(where)


def boot_tag() -> str | None:
    """8 hex naming this boot of this machine (Linux's boot_id), or None where not known: a process recorded with
    another boot's tag, on a host of this name, ran before the machine restarted, and has ended (a run lock left by a
    crash or a power cut; :func:`host_tag` alone cannot tell that from a live pid namespace beside this one)."""
    try:
        return _hex8(_boot_id())
    except (OSError, ValueError):
        return None


def _boot_id() -> str:
    with open(_BOOT_ID, encoding="ascii") as fh:
        return fh.read().strip()


def _hex8(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8", "surrogateescape")).hexdigest()[:8]


def _base36(n: int) -> str:
    digits = ""
    while True:
        n, d = divmod(n, 36)
        digits = "0123456789abcdefghijklmnopqrstuvwxyz"[d] + digits
        if not n:
            return digits


def _proc_stat(pid: int | str) -> tuple[str, int] | None:
    """(state, start time in clock ticks since boot) of process ``pid`` (``"self"``), or None where /proc does not
    say: not Linux, hidden (hidepid), or a /proc of another pid namespace than this process's (its numbers are not
    ours: ``unshare --pid`` without --mount-proc)."""
    try:
        if pid != "self" and os.readlink("/proc/self") != str(os.getpid()):
            return None
        with open(f"/proc/{pid}/stat", "rb") as fh:
            fields = fh.read().rsplit(b")", 1)[1].split()     # (the command name, in brackets, may hold anything)
        return fields[0].decode("ascii", "replace"), int(fields[19])
    except (OSError, IndexError, ValueError):
        return None


def process_start() -> str | None:
    """When this process started, as temp names and run locks record it (base 36 clock ticks since boot); None
    where /proc does not say."""
    stat = _proc_stat("self")
    return _base36(stat[1]) if stat is not None else None


def temp_prefix(name: str) -> str:
    """The start of the name of this process's temp file for the file ``name`` (mkstemp adds the random part)."""
    start = process_start()
    return f".{name}.{os.getpid()}{'' if start is None else '-' + start}@{host_tag()}."


def folder_now(folder: str | os.PathLike, name: str) -> float:
    """Now on the clock of the file system holding ``folder``: the mtime of a temp of ``name`` made there just now
    (and removed), which a file server stamps by its own clock, so that the age of a file there (its mtime) is not
    off by the skew between this host and the server. This host's clock where no file can be made there (a folder
    that cannot be written: never raises).
    """
    try:
        fd, probe = tempfile.mkstemp(prefix=temp_prefix(name), suffix=TEMP_SUFFIX, dir=folder)
    except OSError:
        return time.time()
    try:
        return os.fstat(fd).st_mtime
    except OSError:
        return time.time()
    finally:
        os.close(fd)
        with contextlib.suppress(OSError):
            os.unlink(probe)


def is_temp_of(entry: str, name: str) -> bool:
    """Whether the folder entry ``entry`` is a temp file of :func:`atomic_write` for the file ``name``: what a
    process killed (kill -9) half-way through writing ``name`` leaves next to it."""
    return entry.startswith(f".{name}.") and entry.endswith(TEMP_SUFFIX)


def is_temp(entry: str) -> bool:
    """Whether the folder entry ``entry`` is a temp file of :func:`atomic_write`, for any file (mkstemp's
    ``.<name>.<8 random characters>.tmp``)."""
    return _TEMP.fullmatch(entry) is not None


def temp_target(entry: str) -> str | None:
    """The name of the file whose temp ``entry`` is (in the same folder), or None when ``entry`` is no temp."""
    found = _TEMP.fullmatch(entry)
    return found.group("name") if found else None


def pid_alive(pid: int) -> bool:
    """Whether process ``pid`` runs on this host (on Windows: assumed)."""
    if os.name == "nt":      # os.kill(pid, 0) would terminate the process there: assume it is alive
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:      # alive, owned by another user
        return True
    except OSError:
        return False
    return True


def writer_running(entry: str) -> bool | None:
    """Whether the process that made the temp file ``entry`` still runs: True, False (it is gone: the temp is a write
    cut short), or None when that cannot be told here (a writer of another host or pid namespace on a shared file
    system, an earlier version's name). A pid that runs now but started after the writer did is another process."""
    found = _TEMP.fullmatch(entry)
    writer = _WRITER.fullmatch(found.group("writer") or "") if found else None
    if writer is None or writer.group(3) != host_tag() or os.name == "nt":     # (no pid check there: pid_alive)
        return None
    return process_running(int(writer.group(1)), writer.group(2))


def process_running(pid: int, start: str | None) -> bool:
    """Whether process ``pid`` (of this host and pid namespace) runs and is the one that started at ``start``
    (:func:`process_start`'s; None: whichever): one started at another time has taken the pid of one gone."""
    if not pid_alive(pid):
        return False
    now = _proc_stat(pid)
    if now is None or start is None:
        return True          # (cannot be told apart from the one meant: taken as it)
    return now[0] not in ("Z", "X") and _base36(now[1]) == start    # (a zombie writes nothing more)
