"""SIGTERM taken as Ctrl-C: the one signal policy of a finetune run and of the ``zoo`` command line.

A scheduler ending a job (SLURM, Kubernetes, torchrun stopping the other ranks) sends SIGTERM, whose
default ends the process without a word and without its ``finally`` blocks. Raised as KeyboardInterrupt
instead, it takes the path Ctrl-C takes: the run keeps its checkpoint and says how to resume; a command
between two steps (a sweep between trials, an export) says what it saved. No torch here.
"""
from __future__ import annotations

import contextlib
import signal
import threading
from typing import Iterator

__all__ = ["sigterm_as_interrupt"]


@contextlib.contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """Inside the block SIGTERM and SIGINT raise KeyboardInterrupt in the main thread; the handlers before
    it are put back after it. (Elsewhere than the main thread, where handlers cannot be set: nothing.)

    SIGINT is set explicitly too: a process started in the background by a non-interactive shell
    inherits SIGINT ignored, and `kill -INT` must still save and stop the run.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, frame):
        raise KeyboardInterrupt

    previous_term = signal.signal(signal.SIGTERM, handler)
    previous_int = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous_term)
        signal.signal(signal.SIGINT, previous_int)
