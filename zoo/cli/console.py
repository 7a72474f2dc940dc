"""Every line the CLI prints goes through :func:`echo`: a closed pipe, and the run's ``log.txt``.

A reader that goes away (``zoo eval ... | head``, ``zoo finetune ... 2>&1 | head -3``) makes the next
write fail with EPIPE (Python ignores SIGPIPE, so it is an exception, not a signal). From then on
nothing is written to that stream: its file descriptor is pointed at /dev/null, so tqdm, warnings and
the interpreter's final flush do not fail either. What happens next depends on the command:

- read-only commands (``list``, ``info``, ``eval``, ``predict``, ``cache ls``, ...) stop quietly with
  exit 0, as ``git log | head`` does (:class:`OutputClosed` is caught by ``ZooGroup``);
- commands that train (``finetune``, ``sweep``, ``lr-find``, ``demo``) call :func:`keep_going` and carry
  on; what the terminal would have shown still goes to ``RUN/log.txt`` (:func:`log_to`), which holds
  every line printed for the run, from the command line on.

Sessions nest (``zoo demo`` runs other commands in-process): each ``ZooGroup.invoke`` opens one.
"""
from __future__ import annotations

import contextlib
import errno
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Iterator

import click

from finetune.core.io import printable

__all__ = ["echo", "keep_going", "log_to", "session", "OutputClosed", "is_broken_pipe", "pipe_closed"]


class OutputClosed(Exception):
    """The reader of stdout/stderr went away during a read-only command: end quietly (exit 0)."""


@dataclass
class _Session:
    args: list[str]
    keep_going: bool = False
    lines: list[str] = field(default_factory=list)      # what was printed, for a log file opened later
    logs: list[IO[str]] = field(default_factory=list)


_sessions: list[_Session] = []
_closed: set[str] = set()       # "out" / "err": streams whose reader went away (process-wide)


def is_broken_pipe(err: BaseException) -> bool:
    """EPIPE from a write: the reading end of the pipe was closed."""
    return isinstance(err, BrokenPipeError) or (isinstance(err, OSError) and err.errno == errno.EPIPE)


@contextlib.contextmanager
def session(args: list[str]) -> Iterator[None]:
    """One command invocation: its printed lines, its log files, its closed-pipe policy."""
    if not _sessions:
        _closed.clear()
    _sessions.append(_Session(list(args)))
    try:
        yield
    finally:
        done = _sessions.pop()
        for fh in done.logs:
            with contextlib.suppress(OSError):
                fh.close()


def keep_going() -> None:
    """This command trains: a closed stdout/stderr must not stop it (the lines go to log.txt only)."""
    if _sessions:
        _sessions[-1].keep_going = True


def _silence(name: str) -> None:
    """Point the stream's file descriptor at /dev/null: later writers (tqdm, warnings, exit flush) succeed."""
    _closed.add(name)
    stream = sys.stdout if name == "out" else sys.stderr
    try:
        fd = stream.fileno()
    except (AttributeError, OSError, ValueError):   # CliRunner's in-memory streams
        return
    with contextlib.suppress(OSError):
        null = os.open(os.devnull, os.O_WRONLY)
        os.dup2(null, fd)
        os.close(null)


def _to_logs(message: str) -> None:
    for s in _sessions:
        s.lines.append(message)
        for fh in list(s.logs):
            try:
                fh.write(message + "\n")
                fh.flush()
            except OSError:         # a full disk must not stop training either; the checkpoint says so
                s.logs.remove(fh)


def echo(message: object = "", err: bool = False, **style) -> None:
    """``click.echo`` (``click.secho`` with style keywords) that survives a closed pipe and feeds log.txt.

    Raises:
        OutputClosed: the stream is closed and the command is read-only.
    """
    # Control characters never reach the terminal (a class name "a\x1b[2J" must not clear it); each
    # line is escaped on its own so that intended line breaks stay. Names are escaped where inserted.
    text = "\n".join(printable(line) for line in ("" if message is None else str(message)).split("\n"))
    _to_logs(text)
    name = "err" if err else "out"
    keep = bool(_sessions) and _sessions[-1].keep_going
    if name not in _closed:
        try:
            if style:
                click.secho(text, err=err, **style)
            else:
                click.echo(text, err=err)
            return
        except OSError as e:
            if not is_broken_pipe(e):
                raise
            _silence(name)
    if not keep:
        raise OutputClosed(name)


def pipe_closed() -> None:
    """A write outside :func:`echo` met EPIPE: silence both streams whose reader may be gone."""
    for name, stream in (("out", sys.stdout), ("err", sys.stderr)):
        try:
            stream.flush()
        except OSError:
            _silence(name)
        except ValueError:
            pass


def log_to(path: str | os.PathLike) -> None:
    """Append every line of this session to ``path`` (``RUN/log.txt``): the command line, what was
    already printed, and everything printed from now on."""
    if not _sessions:
        return
    path = Path(path)
    s = _sessions[-1]
    try:
        fh = open(path, "a", encoding="utf-8", errors="backslashreplace")
        fh.write("$ " + " ".join(["zoo", *s.args]) + "\n")
        fh.writelines(line + "\n" for line in s.lines)
        fh.flush()
    except OSError:
        return
    s.logs.append(fh)
