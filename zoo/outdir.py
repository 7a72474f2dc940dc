"""Output folders: which folder a command may write into, and one process at a time in each.

The one rule, for every command with ``--out`` (``zoo finetune``, ``export``, ``eval``, ``lr-find``,
``sweep``):

- an absent or empty folder becomes the output folder;
- a folder that command wrote earlier is refused unless the user says what to do with it: ``--resume``
  (finetune, sweep: continue it) or ``--overwrite`` (start over: only the files that command writes are
  removed, anything else in the folder is left alone);
- anything else that is not empty (a folder of the user's, the output of another command) is refused;

every refusal is one line naming the folder and the options, raised before anything is written.

A folder is recognised by the marker file ``.zoo-run.json`` written first (``{"kind": ...}``), so a run
whose checkpoints were deleted is still a run; a folder without the marker is not zoo's.

While a command works in its folder, the folder is locked: ``.zoo.lock`` holds the holder's pid, host and
command line, created atomically (``O_CREAT | O_EXCL``). A second process is refused at once with who
holds it; a lock left by a dead process on this host is taken over with a note. Under torchrun only
rank 0 (``RANK``) checks, locks and writes.
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

from finetune.core.io import atomic_write_text, is_temp_of
from zoo.errors import UsageError, ZooError
from zoo.process import launcher_rank

__all__ = ["MARKER", "LOCK", "Kind", "KINDS", "RunLockedError", "folder_kind", "check_out", "claim_out",
           "RunLock", "is_main_process", "still_training", "lock_holder"]

MARKER = ".zoo-run.json"
LOCK = ".zoo.lock"
STAGING = ".zoo-staging"    # a staged command's unfinished output (see Kind.staged): says nothing of the folder
_OWN = (MARKER, LOCK, STAGING)
_LOG = "log.txt"   # a command that failed early leaves only its log: nothing worth keeping
# A lock file younger than this whose content cannot be read yet is being written by its creator.
_FRESH_LOCK_S = 10.0


@dataclass(frozen=True)
class Kind:
    """What one command writes into its output folder."""

    name: str                  # "finetune"
    what: str                  # "a `zoo finetune` run": how messages name it
    files: tuple[str, ...]     # every file/folder the command writes there: --overwrite removes these
    resumable: bool = False
    # the command writes into a staging folder and publishes the whole at the end (zoo.bundle.export):
    # --overwrite's removal happens then, so an interrupted command leaves the earlier output whole
    staged: bool = False
    folder: str = "output folder"   # "run folder", "bundle folder": how messages name the folder itself


KINDS: dict[str, Kind] = {k.name: k for k in (
    Kind("finetune", "a `zoo finetune` run",
         ("config.yaml", "scan.json", "split.json", "bad_files.txt", "manifest.json", "metrics.csv", "curves.png",
          "checkpoints", "summary.json", "model.json", "export", "lr_find.png", "lr_find.csv", "tensorboard",
          "log.txt", "report.html", "exclude.txt", "confusion.csv"), resumable=True, folder="run folder"),
    Kind("export", "a `zoo export` bundle", ("model.safetensors", "config.json", "model.onnx", "README.md"),
         staged=True, folder="bundle folder"),
    Kind("eval", "a `zoo eval` report",
         ("metrics.json", "per_class.csv", "confusion.csv", "confusion.png", "wrong.csv"), folder="report folder"),
    Kind("lr-find", "a `zoo lr-find` result",
         ("scan.json", "split.json", "bad_files.txt", "config.yaml", "lr_find.png", "lr_find.csv", "lr_find.json",
          "log.txt"), folder="lr-find folder"),
    Kind("doctor", "a `zoo doctor` report",
         ("findings.csv", "bad_files.txt", "label_ranking.csv", "report.html", "doctor.json"), folder="report folder"),
    Kind("sweep", "a `zoo sweep`",
         ("results.jsonl", "results.csv", "sweep.png", "sweep.json", "best_config.yaml", "trials", "log.txt"),
         resumable=True, folder="sweep folder"),
)}


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


def is_main_process() -> bool:
    """False on the ranks other than 0 under torchrun (they neither lock nor write)."""
    return launcher_rank() == 0


def _entries(path: Path) -> list[str]:
    """The folder's entries other than the marker and the lock (both say nothing about content)."""
    try:
        # a temp file of the marker is what a command killed while writing it leaves: no content either
        return [n for n in os.listdir(path) if n not in _OWN and not is_temp_of(n, MARKER)]
    except FileNotFoundError:
        return []


def folder_kind(path: str | os.PathLike) -> str:
    """``"absent"``, ``"empty"``, a :data:`KINDS` name, or ``"other"`` (not empty, not written by zoo).

    A folder holding only the marker (and a lock, and its log) is "empty": a command that stopped before
    writing anything left nothing worth keeping.
    """
    path = Path(path)
    if not path.exists():
        return "absent"
    if not path.is_dir():
        return "other"
    entries = _entries(path)
    if not entries:
        return "empty"
    if entries == [_LOG] and (path / MARKER).is_file():
        return "empty"      # a command killed (kill -9) before writing anything but its log
    try:
        kind = json.loads((path / MARKER).read_text(encoding="utf-8")).get("kind")
        if kind in KINDS:
            return kind
    except (OSError, ValueError, AttributeError):
        pass
    if (not (path / MARKER).exists() and "doctor.json" in entries
            and set(entries) <= set(KINDS["doctor"].files)):
        return "doctor"     # a report of a zoo doctor from before doctor wrote the marker
    return "other"


def _resume_hint(kind: Kind, path: Path) -> str:
    if kind.name == "finetune":
        return f"continue it with `zoo finetune --resume {path}`, "
    if kind.resumable:
        return "continue it with --resume, "
    return ""


def check_out(path: str | os.PathLike, kind: str, *, resume: bool = False, overwrite: bool = False,
              option: str = "--out") -> str:
    """Decide, without writing anything, whether the command ``kind`` may use ``path``.

    Returns:
        "new" (absent or empty), "resume" or "overwrite".
    Raises:
        UsageError: the folder is refused; the message names it and the options.
    """
    spec, path = KINDS[kind], Path(path)
    if resume and overwrite:
        raise UsageError("--resume and --overwrite exclude each other: continue the run or start it over")
    found = folder_kind(path)
    if path.exists() and not path.is_dir():
        raise UsageError(f"{path} is a file, not a folder; choose another {option}")
    if found in ("absent", "empty"):
        if resume:
            raise UsageError(f"{path} holds no {spec.what[2:]} to resume; start one without --resume")
        return "new"
    if found == kind:
        if resume:
            return "resume"
        if overwrite:
            return "overwrite"
        raise UsageError(f"{path} already holds {spec.what}: {_resume_hint(spec, path)}"
                         f"start it over with --overwrite, or choose another {option}")
    if found in KINDS:
        raise UsageError(f"{path} holds {KINDS[found].what}, not {spec.what}; choose another {option} "
                         "(nothing was written)")
    if resume and kind == "finetune":
        if (path / "model.json").is_file() and (path / "config.yaml").is_file():   # (a copy made with `cp -r RUN/*`)
            raise UsageError(f"{path} holds a run's model.json and config.yaml but not its marker {MARKER} (a copy "
                             "that left out hidden files?); if a `zoo finetune` run wrote it, put the marker back "
                             f"with `echo '{{\"kind\": \"finetune\"}}' > {path / MARKER}` and resume again")
        raise UsageError(f"{path} is not a run folder of `zoo finetune` (no model.json/config.yaml); "
                         "pass the folder a run wrote, e.g. runs/<model>-<time>")
    raise UsageError(f"{path} is not empty and holds no zoo output: choose a new or empty folder with {option} "
                     "(nothing was written; --overwrite only replaces a folder zoo wrote)")


def check_writable(path: str | os.PathLike, option: str = "--out", folder: str = "output folder") -> None:
    """Raise UsageError when ``path`` cannot be created or written (checked without creating it); the message
    names it as ``folder`` ("run folder", "bundle folder": the command's :attr:`Kind.folder`)."""
    path = Path(path)
    parent = path
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
        why = "is not a folder" if parent.exists() and not parent.is_dir() else "is not writable"
        raise UsageError(f"cannot write the {folder} {path}: {parent} {why}; choose another {option}")


def check_outside(path: str | os.PathLike, data: str | os.PathLike, why: str, given: bool = True) -> None:
    """Raise UsageError when ``path`` is the data folder ``data`` or inside it (``why``: what goes wrong there);
    ``given=False``: ``path`` is the command's default, not a ``--out`` the user typed (e.g. run from inside
    the data folder)."""
    o, d = os.path.realpath(path), os.path.realpath(data)
    if o == d or o.startswith(d.rstrip(os.sep) + os.sep):
        if not given:
            raise UsageError(f"the default output folder {path} is inside the data folder {data}; {why}: pass "
                             "--out with a folder outside it")
        raise UsageError(f"--out {path} is inside the data folder {data}; {why}: choose another --out")


# ---------------------------------------------------------------------------------------------- lock
def _command_line() -> str:
    return " ".join(["zoo", *sys.argv[1:]]) if sys.argv else "zoo"


def _pid_alive(pid: int) -> bool:
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
        payload = {"pid": os.getpid(), "host": socket.gethostname(), "command": self.command,
                   "started": time.strftime("%Y-%m-%d %H:%M:%S")}
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
        if host != socket.gethostname():
            raise RunLockedError(
                f"{self.path.parent} is in use by pid {pid} on {host} ({holder.get('command', '?')}); "
                f"wait for it to finish, or delete {self.path} if that process is gone")
        if pid != os.getpid() and _pid_alive(pid):
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


# --------------------------------------------------------------------------------------------- claim
_WAIT_POLL_S = 0.5


def _wait_unlocked(path: Path, wait: float, note: Callable[[str], None] | None) -> None:
    """Return once no live process holds ``path``'s lock; RunLockedError after ``wait`` seconds."""
    deadline = time.monotonic() + wait
    said = False
    while (holder := lock_holder(path)) is not None:
        if time.monotonic() >= deadline:
            RunLock(path).check()       # RunLockedError, with what to do (or the holder has just gone)
            return
        if note is not None and not said:
            note(f"note: {holder}; waiting for it to finish")
            said = True
        time.sleep(_WAIT_POLL_S)


def _remove_outputs(path: Path, kind: Kind) -> None:
    """``--overwrite``: remove what the command writes there, nothing else."""
    for name in kind.files:
        target = path / name
        if target.is_dir() and not target.is_symlink():
            shutil.rmtree(target)
        elif target.exists() or target.is_symlink():
            target.unlink()


@contextlib.contextmanager
def claim_out(path: str | os.PathLike, kind: str, *, resume: bool = False, overwrite: bool = False,
              option: str = "--out", note: Callable[[str], None] | None = None,
              command: str | None = None, wait: float = 0.0) -> Iterator[str]:
    """Check, create, lock and mark ``path`` for the command ``kind``; yields the mode (see check_out).

    ``wait``: seconds to wait (saying so through ``note``) while a live process holds the folder, before
    RunLockedError; 0 refuses at once.

    Under the lock the folder is checked again (another process may have written it in between), then
    ``--overwrite`` removes the command's old files. On exit the lock is released, and a folder this
    call created that still holds nothing but its log is removed again (a command that failed early leaves
    no trace). Ranks other than 0 under torchrun neither check nor write: they yield "new" at once.

    Raises:
        UsageError: the folder is refused (nothing written). RunLockedError: another process uses it.
    """
    path = Path(path)
    if not is_main_process():
        yield "new"
        return
    _wait_unlocked(path, wait, note)    # a live holder is named first: "in use by pid ..." says more than "not empty"
    mode = check_out(path, kind, resume=resume, overwrite=overwrite, option=option)
    check_writable(path, option, KINDS[kind].folder)
    top = path      # the outermost folder this call creates (path itself when its parent exists)
    while not top.parent.exists() and top.parent != top.parent.parent:
        top = top.parent
    created = not path.exists()
    path.mkdir(parents=True, exist_ok=True)
    lock = RunLock(path, command)
    owned = False
    try:
        lock.acquire(note)
        owned = True
        mode = check_out(path, kind, resume=resume, overwrite=overwrite, option=option)
        if mode == "overwrite" and not KINDS[kind].staged:
            _remove_outputs(path, KINDS[kind])
        elif mode == "new":     # left by an attempt that wrote nothing else: its log, a marker it was killed writing
            stale = [n for n in os.listdir(path) if is_temp_of(n, MARKER)]
            stale += [_LOG] if (path / MARKER).is_file() else []
            for name in stale:
                (path / name).unlink(missing_ok=True)
        marker = path / MARKER
        if mode != "resume" or not marker.is_file():
            atomic_write_text(marker, json.dumps({"kind": kind, "created": time.strftime("%Y-%m-%d %H:%M:%S"),
                                                  "command": lock.command}, ensure_ascii=False) + "\n")
        yield mode
    finally:
        lock.release()
        if owned and mode != "resume" and set(_entries(path)) <= {_LOG}:
            with contextlib.suppress(OSError):
                (path / _LOG).unlink(missing_ok=True)
                (path / MARKER).unlink(missing_ok=True)
        folder = path     # the folders this call created, left empty (the lock could not be written too): removed
        with contextlib.suppress(OSError):      # (rmdir removes only an empty folder)
            while created:
                folder.rmdir()
                if folder == top:
                    break
                folder = folder.parent
