"""One process at a time in a folder: ``FOLDER/.zoo.lock`` holds the holder's pid, host and command line,
created atomically (``O_CREAT | O_EXCL``). A second process is refused at once with who holds it; a lock
left by a dead process on this host (and pid namespace: ``finetune.core.tempfiles``), or by any process of an
earlier boot of it (a crash, a power cut), is taken over with a note. ``zoo.outdir`` claims output folders with
it; ``zoo export``, ``zoo report``, bundle loading and ``zoo push`` ask who holds one.

A holder whose pid cannot be checked here (another host on a shared folder; another pid namespace of this host: a
container restarted, whose earlier self left the lock) is told apart by a heartbeat: while the lock is held, a
daemon thread touches the file every ``HEARTBEAT_S`` (the record says ``"beat_s"``), and a lock silent for
``silent_bound`` (10 minutes at least), timed on the folder's own clock, is taken over as a gone holder's. A lock
without ``beat_s`` (an earlier version's) is still refused. A holder stopped that long (SIGSTOP, a laptop asleep)
counts as gone: woken, it finds at its next beat that the lock is another's and says so on stderr, once."""
from __future__ import annotations

import contextlib
import errno
import json
import os
import socket
import stat
import sys
import threading
import time
from pathlib import Path
from typing import Callable

from finetune.core.io import printable_name
from finetune.core.tempfiles import boot_tag, folder_now, host_tag, process_running, process_start
from zoo.errors import ZooError

__all__ = ["LOCK", "HEARTBEAT_S", "RunLock", "RunLockedError", "lock_holder", "silent_bound", "still_training"]

LOCK = ".zoo.lock"
# A lock file younger than this whose content cannot be read yet is being written by its creator.
_FRESH_LOCK_S = 10.0
# How often a holder touches its lock. Silent for SILENT_S, or SILENT_BEATS of its own beats when that is longer, a
# lock whose holder cannot be checked is a gone holder's: room for a file server's attribute caching (a minute), a
# busy disk, a process paused a few minutes; a run killed in another container waits that long for its resume.
HEARTBEAT_S = 30.0
SILENT_S = 600.0
SILENT_BEATS = 4


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



def silent_bound(beat_s: object) -> float | None:
    """How long a lock recording ``beat_s`` (its holder's beat) may go untouched before its holder counts as gone;
    None for a lock that does not beat (an earlier version's, a damaged value)."""
    if isinstance(beat_s, bool) or not isinstance(beat_s, (int, float)) or not 0 < beat_s < float("inf"):
        return None
    return max(SILENT_S, SILENT_BEATS * float(beat_s))


def _minutes(seconds: float) -> str:
    return f"{seconds / 3600:.1f} hours" if seconds >= 5400 else f"{seconds / 60:.0f} minutes"


def _command_line() -> str:
    # an argument that is not UTF-8 (a path named in Latin-1) holds surrogates, which no UTF-8 file takes: as \xNN
    return printable_name(" ".join(["zoo", *sys.argv[1:]]) if sys.argv else "zoo")


def _booted_since(holder: dict) -> bool:
    """Whether the lock record ``holder``, of a host of this name, was made before this machine last started (its
    boot differs from this one's: no process of it still runs)."""
    boot, now = holder.get("boot"), boot_tag()
    return isinstance(boot, str) and now is not None and boot != now


def _text(path: Path) -> str:
    """The lock file's text; bytes that are not UTF-8 (a file written over by hand or by another program) as U+FFFD,
    so that it reads as another's or unreadable lock rather than raising UnicodeDecodeError (a traceback)."""
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))     # (a FIFO put there: no wait for a writer)
    with os.fdopen(fd, "rb") as fh:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise IsADirectoryError(errno.EISDIR, "not a lock file", str(path))    # (a folder, a FIFO: an OSError)
        return fh.read().decode("utf-8", "replace")


def _say_lost(path: Path, every: float, removed: bool) -> None:
    """The one line a holder prints when it finds its lock another's (or removed): a thread has no caller to raise
    to, and --quiet must not hide that two processes may now write in one folder."""
    if removed:
        what = f"{path} was removed while this process worked in {path.parent}: another process may now write in it"
    else:
        what = (f"{path.parent} was taken over by another process while this one was silent for more than "
                f"{_minutes(silent_bound(every) or SILENT_S)} (stopped, suspended?): both may now write in it")
    with contextlib.suppress(OSError, ValueError, AttributeError):   # (stderr closed, a broken pipe: said nowhere)
        print(f"zoo: warning: {what}; stop this one unless that one is gone", file=sys.stderr, flush=True)


class RunLock:
    """``FOLDER/.zoo.lock``: pid + host + command of the one process working in FOLDER.

    ``acquire`` creates the file with ``O_CREAT | O_EXCL`` (atomic: of two processes exactly one
    succeeds); ``release`` removes it if it is still ours.
    """

    def __init__(self, folder: str | os.PathLike, command: str | None = None):
        self.path = Path(folder) / LOCK
        self.command = command or _command_line()
        self.held = False
        self.lost = False           # the heartbeat found the lock another's (this process was silent too long)
        self._content = ""
        self._stop = threading.Event()
        self._beater: threading.Thread | None = None
        self._beat_s = HEARTBEAT_S

    def _read(self) -> dict | None:
        try:
            return json.loads(_text(self.path))
        except FileNotFoundError:
            return {}
        except (OSError, ValueError):
            return None

    def _create(self) -> bool:
        # (tag: the pid namespace the pid belongs to, finetune.core.tempfiles.host_tag; the host name is for people;
        # start: the process's, so that a later process given the same pid is not taken for the holder; boot: the
        # machine's boot, so that a lock left by a crash or power cut is known as stale after the restart)
        self._beat_s = HEARTBEAT_S
        payload = {"pid": os.getpid(), "host": socket.gethostname(), "tag": host_tag(), "boot": boot_tag(),
                   "start": process_start(), "command": self.command, "started": time.strftime("%Y-%m-%d %H:%M:%S"),
                   "beat_s": self._beat_s}
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
            moved = _text(aside)
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
            seen = _text(self.path)
        except OSError:
            return
        self._refuse_if_held(seen)

    def _refuse_if_held(self, seen: str) -> tuple[dict, int] | None:
        """The holder (record, pid) of a stale lock, None while it is still being written; raises
        RunLockedError when the holder is alive, or on another host (whose pids cannot be checked)."""
        try:
            holder = json.loads(seen)
            pid, host = int(holder["pid"]), str(holder.get("host", ""))
            if not 0 < pid < 2 ** 31:       # (no process's: os.kill would raise OverflowError on it)
                raise ValueError(pid)
        except (ValueError, KeyError, TypeError, OverflowError):
            try:
                found = self.path.stat()
            except FileNotFoundError:
                return None
            if stat.S_ISDIR(found.st_mode):     # (moved aside, it could not be removed as a stale lock is)
                raise RunLockedError(f"{self.path} is a folder, not the lock file zoo writes: remove it, or choose "
                                     "another folder") from None
            age = time.time() - found.st_mtime
            if age < _FRESH_LOCK_S:      # its creator is writing it right now
                raise RunLockedError(f"{self.path.parent} is being claimed by another process; "
                                     "wait for it to finish or choose another folder") from None
            return {}, -1
        if host == socket.gethostname() and _booted_since(holder):
            return holder, pid       # (its holder ran before this machine restarted: a crash, a power cut)
        # another host's pid, or another pid namespace's of this host (containers sharing its name): not ours to check
        if host != socket.gethostname() or holder.get("tag", host_tag()) != host_tag():
            silent = self._silent_for(holder)
            if silent is not None:
                return {**holder, "silent_s": silent}, pid
            where = host if host != socket.gethostname() else f"{host} (another container or pid namespace)"
            bound = silent_bound(holder.get("beat_s"))
            later = (f" (a gone process's lock is taken over once silent for {_minutes(bound)})"
                     if bound is not None else "")
            raise RunLockedError(
                f"{self.path.parent} is in use by pid {pid} on {where} ({holder.get('command', '?')}); "
                f"wait for it to finish, or delete {self.path} if that process is gone{later}")
        start = holder.get("start")
        if pid != os.getpid() and process_running(pid, start if isinstance(start, str) else None):
            raise RunLockedError(
                f"{self.path.parent} is in use by pid {pid} on {host} ({holder.get('command', '?')}, "
                f"since {holder.get('started', '?')}); wait for it to finish or choose another folder")
        return holder, pid

    def _silent_for(self, holder: dict) -> float | None:
        """How long the lock has gone untouched, when that is longer than its holder's heartbeat allows (it is gone);
        None while it beats, or when it does not beat (an earlier version's: its holder cannot be told gone)."""
        bound = silent_bound(holder.get("beat_s"))
        if bound is None:
            return None
        try:
            silent = folder_now(self.path.parent, LOCK) - self.path.stat().st_mtime
        except OSError:
            return None
        return silent if silent > bound else None

    def acquire(self, note: Callable[[str], None] | None = None) -> "RunLock":
        """Take the lock or raise RunLockedError naming the holder. ``note`` hears about a stale take-over."""
        for _ in range(5):
            if self._create():
                self._start_beat()
                return self
            try:
                seen = _text(self.path)
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
                    note(self._taken_over(holder, pid))
                self._start_beat()
                return self
        raise RunLockedError(f"{self.path.parent} is being claimed by another process; try again")

    def _taken_over(self, holder: dict, pid: int) -> str:
        if pid <= 0:
            return (f"note: took over the lock of {self.path.parent}, which was unreadable (damaged, or cut short "
                    "while written): its writer is taken as gone")
        if "silent_s" in holder:
            return (f"note: took over the lock of {self.path.parent} left by pid {pid} on {holder.get('host', '?')} "
                    f"({holder.get('command', '?')}), silent for {_minutes(holder['silent_s'])}: its heartbeat "
                    "stopped, so that process is taken as gone")
        return (f"note: took over the lock of {self.path.parent} left by pid {pid} ({holder.get('command', '?')}), "
                "which is no longer running")

    def _start_beat(self) -> None:
        """Touch the lock every HEARTBEAT_S while it is held (a daemon thread: it never keeps the process alive)."""
        self._stop = threading.Event()
        self._beater = threading.Thread(target=self._beat, args=(self._stop, self._content, self._beat_s),
                                        name="zoo-lock-heartbeat", daemon=True)
        self._beater.start()

    def _beat(self, stop: threading.Event, content: str, every: float) -> None:
        while not stop.wait(every):
            try:
                now = _text(self.path)
            except FileNotFoundError:
                now = None
            except OSError:
                continue        # (a network file system's hiccup: the next beat tries again)
            if now != content:
                if not stop.is_set():
                    self.lost = True
                    _say_lost(self.path, every, removed=now is None)
                return
            with contextlib.suppress(OSError):
                os.utime(self.path)     # (no times: a file server stamps it by its own clock)

    def release(self) -> None:
        """Remove the lock file if it is still ours."""
        if not self.held:
            return
        self.held = False
        self._stop.set()
        if self._beater is not None and self._beater is not threading.current_thread():
            self._beater.join(timeout=5.0)      # (at most one touch of the file under way)
        try:
            if _text(self.path) == self._content:
                self.path.unlink()
        except OSError:
            pass

