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

While a command works in its folder, the folder is locked (``zoo.runlock``: ``.zoo.lock``, one process at a
time). Under torchrun only rank 0 (``RANK``) checks, locks and writes.
"""
from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

from finetune.core.io import (OUTPUT_MARKER, broken_link, read_json_object, resume_command, unexpanded_home,
                              shell_command, write_json)
from finetune.core.rerun import best_trial_command
from finetune.core.tempfiles import folder_now, is_temp, is_temp_of, temp_target, writer_running
from zoo.errors import UsageError
from zoo.process import launcher_rank
from zoo.runlock import LOCK, RunLock, RunLockedError, lock_holder, still_training

__all__ = ["MARKER", "LOCK", "Kind", "KINDS", "RunLockedError", "folder_kind", "sweep_trial", "check_out", "claim_out",
           "default_out", "clear_trial_run", "RunLock", "is_main_process", "still_training", "lock_holder",
           "refuse_unexpanded_home", "UNLOCKED_TEMP_S"]

MARKER = OUTPUT_MARKER
STAGING = ".zoo-staging"    # a staged command's unfinished output (see Kind.staged): says nothing of the folder
_OWN = (MARKER, LOCK, STAGING)
_LOG = "log.txt"   # a command that failed early leaves only its log: nothing worth keeping
# A temp of a file written without the lock (`_UNLOCKED`) whose writer cannot be checked here (another host's or pid
# namespace's; an earlier version's name) is a write cut short once its last write is older than this (on the file
# system's clock): `zoo report` writes its page in seconds; an hour leaves room for a slow disk or a stopped writer.
UNLOCKED_TEMP_S = 3600.0
_UNLOCKED = ("report.html",)    # `zoo report` writes it into a run folder without taking the lock


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
          "checkpoints", "summary.json", "model.json", "export", "lr_find.png", "lr_find.csv", "tensorboard", "log.txt",
          "report.html", "exclude.txt", "confusion.csv", "val_predictions.json"), resumable=True, folder="run folder"),
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


def is_main_process() -> bool:
    """False on the ranks other than 0 under torchrun (they neither lock nor write)."""
    return launcher_rank() == 0


def default_out(parent: str | os.PathLike, stem: str) -> Path:
    """The default output folder of every command: ``parent/<stem>-<YYYYmmdd-HHMMSS>``, with a numeric suffix
    (``-2``, ``-3``, ...) when that folder exists, so that two commands started in the same second each get
    their own (the second neither refused nor writing over the first)."""
    base = Path(parent) / f"{stem}-{time.strftime('%Y%m%d-%H%M%S')}"
    path, i = base, 1
    while path.exists() or path.is_symlink():
        i += 1
        path = base.with_name(f"{base.name}-{i}")
    return path


def _entries(path: Path) -> list[str]:
    """The folder's entries other than the marker and the lock (both say nothing about content)."""
    try:
        # a temp file of the marker is what a command killed while writing it leaves: no content either (nor one of
        # the lock: folder_now's probe of the folder's clock, left by a process killed in between)
        return [n for n in os.listdir(path) if n not in _OWN and not is_temp_of(n, MARKER) and not is_temp_of(n, LOCK)]
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
    kind = read_json_object(path / MARKER).get("kind")
    if isinstance(kind, str) and kind in KINDS:
        return kind
    if (not (path / MARKER).exists() and "doctor.json" in entries
            and set(entries) <= set(KINDS["doctor"].files)):
        return "doctor"     # a report of a zoo doctor from before doctor wrote the marker
    return "other"


def sweep_trial(path: str | os.PathLike) -> str | None:
    """What to say of ``path`` when it is a trial folder of a `zoo sweep` (``OUT/trials/<id>``, or its
    ``fold-K``, kept by --keep-runs), which holds no model.json: zoo can neither export nor continue it, and
    `zoo predict`, `zoo export` and `zoo finetune --resume` say so (QA: predict said to export it, and export
    to re-run it). None for any other folder."""
    path = Path(path)
    for trials in (path.parent, path.parent.parent):
        if trials.name == "trials" and folder_kind(trials.parent) == "sweep" and not (path / "model.json").exists():
            best = best_trial_command(trials.parent)      # (sweep.json's model and data folder)
            return (f"{path} is a trial of the zoo sweep in {trials.parent} (kept by --keep-runs), which zoo does "
                    f"not export or continue: train its options as a run (`{best}` trains the best trial's) and "
                    "use that run's bundle")
    return None


def _resume_hint(kind: Kind, path: Path) -> str:
    if kind.name == "finetune":
        return f"continue it with `{resume_command(path)}`, "
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
            put_back = shell_command("echo", json.dumps({"kind": "finetune"})) + " > " + shell_command(path / MARKER)
            raise UsageError(f"{path} holds a run's model.json and config.yaml but not its marker {MARKER} (a copy "
                             "that left out hidden files?); if a `zoo finetune` run wrote it, put the marker back "
                             f"with `{put_back}` and resume again")
        raise UsageError(f"{path} is not a run folder of `zoo finetune` (no model.json/config.yaml); "
                         "pass the folder a run wrote, e.g. runs/<model>-<time>")
    raise UsageError(f"{path} is not empty and holds no zoo output: choose a new or empty folder with {option} "
                     "(nothing was written; --overwrite only replaces a folder zoo wrote)")


def check_writable(path: str | os.PathLike, option: str = "--out", folder: str = "output folder") -> None:
    """Raise UsageError when ``path`` cannot be created or written (checked without creating it); the message
    names it as ``folder`` ("run folder", "bundle folder": the command's :attr:`Kind.folder`)."""
    path = Path(path)
    parent = path
    link = broken_link(path)        # mkdir said "File exists" (QA); nothing is created where it leads
    if link is not None:
        raise UsageError(f"cannot write the {folder} {path}: {link}; create that folder, or choose another {option}")
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
        why = "is not a folder" if parent.exists() and not parent.is_dir() else "is not writable"
        # a run to continue is not chosen again: it is made writable, or copied where it can be written (QA)
        fix = ("make it writable, or copy the run folder where it can be written and resume the copy"
               if option == "--resume" else f"choose another {option}")
        raise UsageError(f"cannot write the {folder} {path}: {parent} {why}; {fix}")


def refuse_unexpanded_home(path: Path, option: str = "--out") -> None:
    """UsageError when ``path`` begins with a ``~`` the shell left as it is (quoted: ``--out "~/runs/a"``, or
    ``OUT="~/runs"`` in a script): a folder named ``~`` was made in the current folder, and ``rm -rf ~``, the
    obvious way to remove it again, removes the home folder (QA). Such a folder made before is used as it is.
    Every ``--out`` (``zoo lock``'s and ``zoo demo``'s too) is checked by it. A ``~name`` no shell expands (no
    user ``name``: ``--out ./~draft``, ``~draft`` unquoted) is the folder name it reads, and taken (review)."""
    home = unexpanded_home(path)
    if home is not None:
        instead = f"write {home} (or leave the ~ unquoted)"
        raise UsageError(f"{option} {path} begins with {path.parts[0]}, which the shell expands only when it is not "
                         f"quoted, so zoo would make a folder named {path.parts[0]} here: {instead}")


def _check_name_lengths(path: Path, option: str, folder: str) -> None:
    """UsageError when a name in ``path`` is longer than its file system takes (QA: `File name too long (PATH);
    set ZOO_DEBUG=1 for details`, from the first look at the folder). Checked before anything else touches it."""
    parts = Path(os.path.abspath(path)).parts
    base, new = Path(parts[0]), ()
    # the deepest existing folder: its file system's limit (isdir never raises)
    for i, part in enumerate(parts[1:], 1):
        if not os.path.isdir(base / part):
            new = parts[i:]     # only these are created: the existing names fit (measured against another
            break               # file system's limit, a long name above an ecryptfs mount was refused)
        base = base / part
    try:
        limit = int(os.pathconf(base, "PC_NAME_MAX"))
    except (OSError, ValueError):
        limit = 255
    if not new or limit <= 0:       # -1: the file system states no limit (it refused every --out)
        return
    longest = max(new, key=lambda p: len(os.fsencode(p)))
    if len(os.fsencode(longest)) > limit:
        raise UsageError(f"cannot write the {folder} {path}: the name {longest[:24]}... is {len(os.fsencode(longest))} "
                         f"bytes long, more than the {limit} a name may have on this file system; choose a shorter "
                         f"{option}")


# Why an output folder may not lie in the data: the scan skips a folder zoo wrote
# (finetune.data.files.is_zoo_output), so the images in it would drop out of the data, and the outputs would clutter
# the user's folder (before the skip: a later scan trained the run's curves.png as a class of its own)
IN_THE_DATA = "zoo's files would sit among the images, and every scan skips a folder zoo writes into"


def check_outside(path: str | os.PathLike, data: str | os.PathLike, why: str = IN_THE_DATA,
                  given: bool = True) -> None:
    """Raise UsageError when ``path`` is the data folder ``data`` or inside it (``why``: what goes wrong there);
    ``given=False``: ``path`` is the command's default, not a ``--out`` the user typed (e.g. run from inside
    the data folder)."""
    o, d = os.path.realpath(path), os.path.realpath(data)
    if o == d or o.startswith(d.rstrip(os.sep) + os.sep):
        if not given:
            raise UsageError(f"the default output folder {path} is inside the data folder {data}; {why}: pass "
                             "--out with a folder outside it")
        raise UsageError(f"--out {path} is inside the data folder {data}; {why}: choose another --out")


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


# What --overwrite may delete inside a command's sub-folders, the one place that decides it: a rule maps an
# entry's name to False (the user's: kept), None (zoo's: removed whole) or the rule of a folder zoo writes into,
# where only zoo's entries go, and the folder with them when nothing of the user's is left. The user's notes or
# a `zoo eval` report put in RUN/export went with the whole folder (QA), and so did anything in a sweep's trials/.
# Temp files of writes cut short are zoo's everywhere. A sub-folder without a rule (tensorboard) goes whole.
_Rule = Callable[[str], "_Rule | bool | None"]
_TRIAL = re.compile(r"lr.+_wd.+_freeze-.+_.+")  # finetune.tools.sweep.space.trial_id's names (a test checks)
_FOLD = re.compile(r"fold-\d+")                  # a trial's fold under --folds


def _own(names: tuple[str, ...], inside: dict[str, _Rule] | None = None) -> _Rule:
    """The rule of a folder where zoo writes ``names`` (the folders in ``inside`` by their own rule)."""
    return lambda n: (inside or {}).get(n) if n in names else None if is_temp(n) else False


_CHECKPOINTS = _own(("last.pt", "best.safetensors", "head.safetensors"))
_EXPORT = _own((*KINDS["export"].files, LOCK, STAGING))     # (its marker stays while the user's files do)
_RUN = _own(KINDS["finetune"].files, {"export": _EXPORT, "checkpoints": _CHECKPOINTS})   # a trial's run folder
_INSIDE: dict[str, _Rule] = {
    "export": _EXPORT, "checkpoints": _CHECKPOINTS,
    "trials": lambda n: (lambda m: _RUN if _FOLD.fullmatch(m) else _RUN(m)) if _TRIAL.fullmatch(n) else False,
}


def _remove_temps(path: Path, kind: Kind) -> None:
    """Remove the temp files of writes cut short (killed before the rename) of the files ``kind`` writes, where it
    writes them (the rules above: the folder, checkpoints/, trials/<id>[/fold-K]); not another command's (`zoo eval
    --out RUN/eval`, `zoo export`'s RUN/export), the user's, nor one a live writer may be writing (``_cut_short``)."""
    now = folder_now(path, LOCK)     # the file system's clock (a server's may not be this host's)
    _remove_temps_in(path, _own((*kind.files, MARKER), {n: r for n, r in _INSIDE.items() if n in kind.files}), now)


def _remove_temps_in(folder: Path, rule: _Rule, now: float) -> None:
    for entry in os.listdir(folder):
        target, inner, here = temp_target(entry), rule(entry), folder / entry
        with contextlib.suppress(OSError):
            if target is not None and rule(target) is not False and _cut_short(here, target, now):
                os.unlink(here)
            elif callable(inner) and entry != "export" and here.is_dir() and not here.is_symlink():
                _remove_temps_in(here, inner, now)


def _cut_short(temp: Path, target: str, now: float) -> bool:
    """Whether ``temp``, of ``target``, is a write cut short: always when only the lock's holder (this process) writes
    ``target``; else when its writer is gone, or cannot be checked here and ``UNLOCKED_TEMP_S`` passed (``now``)."""
    if target not in _UNLOCKED:
        return True
    running = writer_running(temp.name)
    return not running if running is not None else now - os.stat(temp).st_mtime > UNLOCKED_TEMP_S


def _remove_outputs(path: Path, kind: Kind) -> None:
    """``--overwrite``: remove what the command writes there, nothing else; RunLockedError while another command
    works in one of its folders (`zoo export` in RUN/export: its lock and its write would go)."""
    for holder in filter(None, (lock_holder(path / n) for n in kind.files if (path / n / LOCK).is_file())):
        raise RunLockedError(f"{holder}; wait for it to finish, then start {path} over with --overwrite")
    for name in kind.files:
        _remove_own(path / name, _INSIDE.get(name))


def clear_trial_run(path: str | os.PathLike) -> None:
    """Remove what a sweep trial's run folder ``path`` (``OUT/trials/<id>[/fold-K]``) holds of zoo's, by the rule
    --overwrite goes by: a trial interrupted there is run again from the start on ``zoo sweep --resume``."""
    _remove_own(Path(path), _RUN)


def _remove_own(target: Path, rule: _Rule | None) -> None:
    """Remove ``target``, written by zoo: whole without a ``rule``, else only zoo's entries in it (by ``rule``),
    and the folder itself when nothing else is left in it but a marker."""
    if rule is None or not target.is_dir() or target.is_symlink():
        _remove(target)
        return
    for entry in os.listdir(target):
        inner = rule(entry)
        if inner is not False:
            _remove_own(target / entry, inner if callable(inner) else None)
    if set(os.listdir(target)) <= {MARKER}:     # nothing of the user's is left in it
        _remove(target)     # (else its marker stays: the new run's own export may replace it again)


def _remove(target: Path) -> None:
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
    refuse_unexpanded_home(path, option)
    _check_name_lengths(path, option, KINDS[kind].folder)
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
            _remove_temps(path, KINDS[kind])      # (the earlier command's, beside the files removed)
        elif mode == "new":     # left by an attempt that wrote nothing else: its log, a marker it was killed writing
            stale = [n for n in os.listdir(path) if is_temp_of(n, MARKER)]
            stale += [_LOG] if (path / MARKER).is_file() else []
            for name in stale:
                (path / name).unlink(missing_ok=True)
        else:                   # resumed: what a killed attempt was writing (a .last.pt.*.tmp can be gigabytes)
            _remove_temps(path, KINDS[kind])
        marker = path / MARKER
        if mode != "resume" or not marker.is_file():
            write_json(marker, {"kind": kind, "created": time.strftime("%Y-%m-%d %H:%M:%S"), "command": lock.command},
                       ensure_ascii=False)
        yield mode
    finally:
        lock.release()
        # (not once the lock was lost: the log and marker are then those of the process that took the folder over)
        if owned and not lock.lost and mode != "resume" and set(_entries(path)) <= {_LOG}:
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
