"""``finetune.core.signals``: SIGTERM and SIGINT as Ctrl-C, and a stop that arrives while an error is being handled."""
from __future__ import annotations

import os
import signal
import time

import pytest

from finetune.core import signals
from finetune.core.signals import sigterm_as_interrupt


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_stop_met_while_an_error_is_handled_is_put_off_until_the_handling_is_over(monkeypatch, signum):
    """helper-135: torchrun's SIGTERM (sent once another rank was killed) reached rank 0 while it handled the broken
    connection to that rank, and the KeyboardInterrupt raised there replaced the line that said what the run keeps
    ("zoo: interrupted"; "interrupted before training ... --overwrite" over a run with its checkpoints). The stop is
    put off while the exception is handled, and stops the process once the handling is over (a sweep that goes on
    to its next trial)."""
    monkeypatch.setattr(signals, "PUT_OFF_S", 0.05, raising=False)
    handled = False
    with pytest.raises(KeyboardInterrupt), sigterm_as_interrupt():
        try:
            raise RuntimeError("Connection reset by peer")
        except RuntimeError:
            os.kill(os.getpid(), signum)
            for _ in range(20):      # the stop arrived, and is put off again and again while this handles
                time.sleep(0.02)
            handled = True
        time.sleep(60)      # ended by the stop, once the handling is over
    assert handled, "the stop was raised inside the handling"
    assert signal.getsignal(signum) is not getattr(signals, "_stop", None)      # put back after the block


def test_a_handling_that_hangs_still_gives_way_to_the_stop(monkeypatch):
    """The lead, session 34: a stop is put off PUT_OFF_LIMIT_S at most. A handling that hangs (a collective waiting
    on a dead peer, a stuck file system) took every Ctrl-C as put off, again and again: only SIGKILL ended it."""
    monkeypatch.setattr(signals, "PUT_OFF_S", 0.05)
    monkeypatch.setattr(signals, "PUT_OFF_LIMIT_S", 0.3)
    t0 = time.monotonic()
    with pytest.raises(KeyboardInterrupt), sigterm_as_interrupt():
        try:
            raise RuntimeError("Connection reset by peer")
        except RuntimeError:
            os.kill(os.getpid(), signal.SIGINT)
            os.kill(os.getpid(), signal.SIGINT)      # the same stop twice: one timer sends it again
            time.sleep(60)      # a handling that never ends by itself
    assert time.monotonic() - t0 < 30


def test_a_stop_outside_an_error_is_ctrl_c_at_once():
    t0 = time.monotonic()
    with pytest.raises(KeyboardInterrupt), sigterm_as_interrupt():
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(60)
    assert time.monotonic() - t0 < 30
