"""One process at a time in a folder: ``FOLDER/.zoo.lock`` holds the holder's pid, host and command line,
created atomically (``O_CREAT | O_EXCL``). A second process is refused at once with who holds it; a lock
left by a dead process on this host (and pid namespace: ``finetune.core.tempfiles``), or by any process of an
earlier boot of it (a crash, a power cut), is taken over with a note. ``zoo.outdir`` claims output folders with
it; ``zoo export``, ``zoo report``, bundle loading and ``zoo push`` ask who holds one."""
from __future__ import annotations

import contextlib
import json
import os
import socket
import sys
import time
from pathlib import Path
from typing import Callable

from finetune.core.io import printable_name
from finetune.core.tempfiles import boot_tag, host_tag, process_running, process_start
from zoo.errors import ZooError

__all__ = ["LOCK", "RunLock", "RunLockedError", "lock_holder", "still_training"]

LOCK = ".zoo.lock"
# A lock file younger than this whose content cannot be read yet is being written by its creator.
_FRESH_LOCK_S = 10.0


class RunLockedError(ZooError):
    """Another live process works in the folder (exit 1: wait for it, or use another folder)."""


def lock_holder(path: str | os.PathLike) -> str | None:
    """Who holds the folder ``path``'s lock right now, in words ("P is in use by pid N on HOST (...)"), or None
    when no live process does."""
    try:
        RunLock(path).check()
    except RunLockedError as busy:
        return str(busy).split("; ")[0]
    return None


def still_training(run: str | os.PathLike) -> bool:
    """Whether a live process holds RUN's lock (a run still training: zoo export and zoo report say so)."""
    return lock_holder(run) is not None



def _command_line() -> str:
    # an argument that is not UTF-8 (a path named in Latin-1) holds surrogates, which no UTF-8 file takes: as \xNN
    return printable_name(" ".join(["zoo", *sys.argv[1:]]) if sys.argv else "zoo")


def _booted_since(holder: dict) -> bool:
    """Whether the lock record ``holder``, of a host of this name, was made before this machine last started (its
    boot differs from this one's: no process of it still runs)."""
    boot, now = holder.get("boot"), boot_tag()
    return isinstance(boot, str) and now is not None and boot != now


class RunLock:
    """``FOLDER/.zoo.lock``: pid + host + command of the one process working in FOLDER.

    ``acquire`` creates the file with ``O_CREAT | O_EXCL`` (atomic: of two processes exactly one
    succeeds); ``release`` removes it if it is still ours.
    """

    def __init__(self, folder: str | os.PathLike, command: str | None = None):
        self.path = Path(folder) / LOCK
        self.command = command or _command_line()
        self.held = False
        self._content = ""

    def _read(self) -> dict | None:
        try:
            return json.loads(self.path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return {}
        except (OSError, ValueError):
            return None

    def _create(self) -> bool:
        # (tag: the pid namespace the pid belongs to, finetune.core.tempfiles.host_tag; the host name is for people;
        # start: the process's, so that a later process given the same pid is not taken for the holder; boot: the
        # machine's boot, so that a lock left by a crash or power cut is known as stale after the restart)
        payload = {"pid": os.getpid(), "host": socket.gethostname(), "tag": host_tag(), "boot": boot_tag(),
                   "start": process_start(), "command": self.command, "started": time.strftime("%Y-%m-%d %H:%M:%S")}
        self._content = json.dumps(payload, ensure_ascii=False) + "\n"
        try:
            fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            return False
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as fh:
                fh.write(self._content)
        except BaseException:
            self.path.unlink(missing_ok=True)     # a full disk, a file-size limit: no empty lock claiming the folder
            raise
        self.held = True
        return True

    def _take_over(self, seen: str) -> bool:
        """Move the stale lock aside, if it is still the one we read; then create ours."""
        aside = self.path.with_name(f"{LOCK}.stale.{os.getpid()}")
        try:
            os.replace(self.path, aside)
        except FileNotFoundError:
            return self._create()
        try:
            moved = aside.read_text(encoding="utf-8")
        except OSError:
            moved = seen
        if moved != seen:   # another process took it over in between: put its fresh lock back
            with contextlib.suppress(OSError):
                os.link(aside, self.path)
            aside.unlink(missing_ok=True)
            return False
        aside.unlink(missing_ok=True)
        return self._create()

    def check(self) -> None:
        """Raise RunLockedError when a live process holds the lock (reads only; a stale lock passes)."""
        try:
            seen = self.path.read_text(encoding="utf-8")
        except OSError:
            return
        self._refuse_if_held(seen)

    def _refuse_if_held(self, seen: str) -> tuple[dict, int] | None:
        """The holder (record, pid) of a stale lock, None while it is still being written; raises
        RunLockedError when the holder is alive, or on another host (whose pids cannot be checked)."""
        try:
            holder = json.loads(seen)
            pid, host = int(holder["pid"]), str(holder.get("host", ""))
        except (ValueError, KeyError, TypeError):
            try:
                age = time.time() - self.path.stat().st_mtime
            except FileNotFoundError:
                return None
            if age < _FRESH_LOCK_S:      # its creator is writing it right now
                raise RunLockedError(f"{self.path.parent} is being claimed by another process; "
                                     "wait for it to finish or choose another folder") from None
            return {}, -1
        if host == socket.gethostname() and _booted_since(holder):
            return holder, pid       # (its holder ran before this machine restarted: a crash, a power cut)
        # another host's pid, or another pid namespace's of this host (containers sharing its name): not ours to check
        if host != socket.gethostname() or holder.get("tag", host_tag()) != host_tag():
            where = host if host != socket.gethostname() else f"{host} (another container or pid namespace)"
            raise RunLockedError(
                f"{self.path.parent} is in use by pid {pid} on {where} ({holder.get('command', '?')}); "
                f"wait for it to finish, or delete {self.path} if that process is gone")
        start = holder.get("start")
        if pid != os.getpid() and process_running(pid, start if isinstance(start, str) else None):
            raise RunLockedError(
                f"{self.path.parent} is in use by pid {pid} on {host} ({holder.get('command', '?')}, "
                f"since {holder.get('started', '?')}); wait for it to finish or choose another folder")
        return holder, pid

    def acquire(self, note: Callable[[str], None] | None = None) -> "RunLock":
        """Take the lock or raise RunLockedError naming the holder. ``note`` hears about a stale take-over."""
        for _ in range(5):
            if self._create():
                return self
            try:
                seen = self.path.read_text(encoding="utf-8")
            except FileNotFoundError:
                continue
            except OSError:
                seen = ""
            stale = self._refuse_if_held(seen)
            if stale is None:
                continue
            holder, pid = stale
            if self._take_over(seen):
                if note is not None and pid != os.getpid():
                    what = f"pid {pid} ({holder.get('command', '?')})" if pid > 0 else "an unreadable lock"
                    note(f"note: took over the lock of {self.path.parent} left by {what}, which is no "
                         "longer running")
                return self
        raise RunLockedError(f"{self.path.parent} is being claimed by another process; try again")

    def release(self) -> None:
        """Remove the lock file if it is still ours."""
        if not self.held:
            return
        self.held = False
        try:
            if self.path.read_text(encoding="utf-8") == self._content:
                self.path.unlink()
        except OSError:
            pass

