"""SIGTERM taken as Ctrl-C: the one signal policy of a finetune run and of the ``zoo`` command line.

A scheduler ending a job (SLURM, Kubernetes, torchrun stopping the other ranks) sends SIGTERM, whose
default ends the process without a word and without its ``finally`` blocks. Raised as KeyboardInterrupt
instead, it takes the path Ctrl-C takes: the run keeps its checkpoint and says how to resume; a command
between two steps (a sweep between trials, an export) says what it saved. No torch here.

A stop that arrives while the process handles an exception is put off until it does not (``PUT_OFF_S`` at a
time): the process is stopping already (a second Ctrl-C; torchrun's SIGINT after the terminal's) or ending with an
error whose one line says what is saved, and a KeyboardInterrupt raised there replaced that line (helper-135:
torchrun's SIGTERM, sent once another rank was killed, reached rank 0 while it handled the broken connection to
that rank: "zoo: interrupted", or "interrupted before training ... start it again with --overwrite" over a run
that kept its checkpoints). Put off, not dropped: where the handling goes on (a sweep's next trial) it stops then.
For ``PUT_OFF_LIMIT_S`` at most: a handling that hangs (a collective waiting on a dead peer, a stuck file system)
must still give way to Ctrl-C, as it did before (the lead, session 34).
"""
from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
import time
from typing import Iterator

__all__ = ["sigterm_as_interrupt"]

PUT_OFF_S = 0.5
PUT_OFF_LIMIT_S = 10.0
_put_off_since: dict[int, float] = {}      # signal -> when it was first put off (main thread only)
_resend: set[int] = set()      # the signals a timer will send again (one timer each, however many stops came)


@contextlib.contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """Inside the block SIGTERM and SIGINT raise KeyboardInterrupt in the main thread, outside the handling of
    an exception (inside it: once that is over, see the module's note); the handlers before it are put back after
    it. (Elsewhere than the main thread, where handlers cannot be set: nothing.)

    SIGINT is set explicitly too: a process started in the background by a non-interactive shell
    inherits SIGINT ignored, and `kill -INT` must still save and stop the run.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    previous_term = signal.signal(signal.SIGTERM, _stop)
    previous_int = signal.signal(signal.SIGINT, _stop)
    try:
        yield
    finally:
        _put_off_since.clear()
        signal.signal(signal.SIGTERM, previous_term)
        signal.signal(signal.SIGINT, previous_int)


def _stop(signum, frame) -> None:
    """SIGTERM's and SIGINT's handler inside :func:`sigterm_as_interrupt`."""
    now = time.monotonic()
    since = _put_off_since.setdefault(signum, now)
    # (sys.exc_info: the handled exception of the code this signal interrupted)
    if sys.exc_info()[1] is not None and now - since < PUT_OFF_LIMIT_S:
        if signum not in _resend:
            _resend.add(signum)
            timer = threading.Timer(PUT_OFF_S, _again, (signum,))
            timer.daemon = True
            timer.start()
        return
    _put_off_since.pop(signum, None)
    raise KeyboardInterrupt


def _again(signum: int) -> None:
    """The put-off stop ``signum`` sent again, while a :func:`sigterm_as_interrupt` block still takes it (after the
    outermost, the command has ended: nothing)."""
    _resend.discard(signum)
    if signal.getsignal(signum) is _stop:
        os.kill(os.getpid(), signum)
