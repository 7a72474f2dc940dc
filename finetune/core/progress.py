"""``progress_bar``: the one progress bar of the package and the CLI (an epoch's batches, feature extraction, the
head's solves, the mirror test's fits, zoo predict's images, zoo doctor's passes and label probe, a download).
On a terminal it is a tqdm bar; in a pipe or a log file (a scheduler's job, ``nohup``), a plain line a minute
(:class:`LogLines`), so that a log says where a long pass is without a bar's carriage returns. In a Jupyter notebook
(stderr is the kernel's stream: not a terminal, not a log either) it is the bar ``tqdm.auto`` gives there, as for
tqdm's and fastai's users: a widget with ipywidgets, else tqdm's text bar, which the notebook redraws in place."""
from __future__ import annotations

import os
import sys
import time
from typing import Any, Callable, Iterable, Iterator

from finetune.core.host import worker_context
from finetune.core.io import human_size

__all__ = ["progress_bar", "LogLines", "LOG_EVERY_S"]

LOG_EVERY_S = 60.0      # off a terminal: a pass's first line after this long, then one per this long


def progress_bar(total: int | None = None, desc: str | None = None, *, unit: str, quiet: bool = False,
                 iterable: Iterable | None = None, **extra: Any) -> Any:
    """A tqdm bar on stderr, cleared when it closes (``leave=False``), as wide as the terminal is at each redraw;
    none with ``quiet``. In a Jupyter notebook (stderr is the kernel's stream) the bar ``tqdm.auto`` makes there
    (docs/guide/python-api.md, "In a notebook"). Where stderr is not a terminal (a pipe, a log file, a scheduler's
    job): a
    :class:`LogLines` instead, which writes nothing for a pass shorter than ``LOG_EVERY_S`` (none with tqdm's own
    ``TQDM_DISABLE``, read as tqdm reads it: any value but the empty one, ``0`` and ``false`` included, turns
    the bars and the lines off).
    ``iterable``: the bar wraps it (``for x in progress_bar(iterable=xs, ...)``). ``extra``: tqdm's own options
    (``unit_scale``, ``unit_divisor``)."""
    # tqdm's envwrap gives TQDM_DISABLE the type of disable's default, bool(str); the disable= passed below would
    # override it (QA: TQDM_DISABLE=1 left the bar on a terminal), so it is read here for both
    off = quiet or bool(os.environ.get("TQDM_DISABLE", ""))
    if off or not (_terminal(sys.stderr) or _notebook(sys.stderr)):
        # (off: a silent LogLines, not tqdm(disable=True), which starts tqdm's monitor thread and leaves it running
        # after the bar has closed: a thread left behind in the caller's process by every quiet run)
        return LogLines(total, desc, unit=unit, iterable=iterable, scaled=unit == "B" and bool(extra.get("unit_scale")),
                        quiet=off)
    # lazy: zoo --help imports the commands that use it; tqdm is imported on the first bar
    from tqdm.auto import tqdm

    _tqdm_lock()
    return tqdm(iterable, total=total, desc=desc, unit=unit, leave=False, file=sys.stderr, dynamic_ncols=True,
                disable=False, **extra)    # (tqdm's None turns off a bar on any stream but a terminal: a notebook's)


def _notebook(stream) -> bool:
    """Whether ``stream`` is a Jupyter kernel's output stream (ipykernel's ``OutStream``): a notebook cell's output,
    which redraws a bar in place. A notebook's stderr sent to a file is no such stream (it gets the log lines)."""
    iostream = sys.modules.get("ipykernel.iostream")     # (never imported here: loaded only inside a kernel)
    kind = getattr(iostream, "OutStream", None)
    return isinstance(kind, type) and isinstance(stream, kind)


def _tqdm_lock() -> None:
    """Give tqdm its multiprocessing lock from :func:`finetune.core.host.worker_context` before its first bar: tqdm
    makes it from multiprocessing's default context, which fixes the process's start method, and a caller's own
    ``multiprocessing.set_start_method("spawn")`` after a ``fit`` then failed ("context has already been set")."""
    from tqdm.std import TqdmDefaultWriteLock    # lazy: with tqdm, on the first bar

    if hasattr(TqdmDefaultWriteLock, "mp_lock"):
        return
    try:
        TqdmDefaultWriteLock.mp_lock = worker_context().RLock()
    except (ImportError, OSError):      # as tqdm: no semaphores on this platform, the thread lock alone
        TqdmDefaultWriteLock.mp_lock = None


def _terminal(stream) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError, OSError):      # no such method, or a closed stream
        return False


class LogLines:
    """The part of tqdm's interface the callers use (``update``, ``close``, a context manager, iteration over
    ``iterable``), written as one plain line per ``LOG_EVERY_S`` on stderr, e.g.
    ``epoch 3/10 finetune: 120/400 batch (30%) in 1m05s; loss 0.4123, acc 91.20%, img/s 2345``.

    ``figures``: a callable giving the line's figures, called only when a line is written: the training loop's
    running loss and accuracy are a host look (a GPU sync), taken once a line rather than every second as a
    visible bar's. A stream that fails (a closed pipe) ends the lines, never the pass. ``quiet``: no line at all
    (``disable`` is then True, as on a disabled tqdm bar)."""

    def __init__(self, total: int | None, desc: str | None, *, unit: str, iterable: Iterable | None = None,
                 scaled: bool = False, clock=time.monotonic, quiet: bool = False) -> None:
        self.total, self.desc, self.unit, self.iterable, self.scaled = total, desc, unit, iterable, scaled
        self.n = 0
        self.figures: Callable[[], dict[str, Any]] | None = None
        self._clock = clock
        self._start = self._last = clock()
        self._open = not quiet
        self.disable = quiet

    def update(self, n: int = 1) -> None:
        self.n += n
        if self._open and (now := self._clock()) - self._last >= LOG_EVERY_S:
            self._last = now
            self._write(self.line())

    def line(self) -> str:
        """The line ``update`` writes."""
        unit = "" if self.scaled else f" {self.unit}"       # (a scaled amount carries its unit: 1.5 MiB)
        done = f"{self._amount(self.n)}{unit}"
        if self.total:
            done = f"{self._amount(self.n)}/{self._amount(self.total)}{unit} ({100 * self.n / self.total:.0f}%)"
        seconds = int(self._clock() - self._start)
        took = f"{seconds // 60}m{seconds % 60:02d}s" if seconds >= 60 else f"{seconds}s"
        figures = ", ".join(f"{k} {v}" for k, v in (self.figures() if self.figures is not None else {}).items())
        return f"{self.desc or 'progress'}: {done} in {took}" + (f"; {figures}" if figures else "")

    def _amount(self, n: int | float) -> str:
        if self.scaled:                 # a download's bytes (``unit_scale``, ``unit_divisor`` 1024)
            return human_size(int(n))
        return f"{n:,}" if isinstance(n, int) else f"{n:g}"

    def _write(self, text: str) -> None:
        try:
            sys.stderr.write(text + "\n")
            sys.stderr.flush()
        except (OSError, ValueError):      # a closed pipe or stream: the pass goes on without lines
            self._open = False

    def close(self) -> None:
        self._open = False

    def __iter__(self) -> Iterator:
        for item in self.iterable if self.iterable is not None else ():
            yield item
            self.update(1)

    def __enter__(self) -> "LogLines":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
