"""``progress_bar``: the one progress bar of the package and the CLI (an epoch's batches, feature extraction, the
head's solves, the mirror test's fits, zoo predict's images, zoo doctor's passes and label probe, a download)."""
from __future__ import annotations

import sys
from typing import Any, Iterable

__all__ = ["progress_bar"]


def progress_bar(total: int | None = None, desc: str | None = None, *, unit: str, quiet: bool = False,
                 iterable: Iterable | None = None, **extra: Any) -> Any:
    """A tqdm bar on stderr, cleared when it closes (``leave=False``), as wide as the terminal is at each redraw;
    none with ``quiet``, and none wherever stderr is not a terminal (a pipe, a log file, a scheduler's job).
    ``iterable``: the bar wraps it (``for x in progress_bar(iterable=xs, ...)``). ``extra``: tqdm's own options
    (``unit_scale``, ``unit_divisor``)."""
    # lazy: zoo --help imports the commands that use it; tqdm is imported on the first bar
    from tqdm.auto import tqdm

    return tqdm(iterable, total=total, desc=desc, unit=unit, leave=False, file=sys.stderr, dynamic_ncols=True,
                disable=True if quiet else None, **extra)
