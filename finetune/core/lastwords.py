"""The last words of a torchrun job's processes: each leaves the one line of the error it ends on in the store of
torchrun's agent (:func:`leave_word`), and rank 0 reads the others' where the job ends around it, to name the process
that ended and why: where it meets that end in a collective (``distributed.raise_if_peer_lost``), or where it is
stopped by a signal (:func:`peers_own_errors`: torchrun's agent stops the job once a process has ended, often before
the collective with it broke, always so under NCCL). The store outlives a killed process, and every machine of the job
reaches it; the run folder is on rank 0's machine.
"""
from __future__ import annotations

import contextlib
import os
import time
from datetime import timedelta

import torch.distributed as dist

from finetune.core.host import launcher_count

__all__ = ["WORDS_WAIT_S", "STOP_WORDS_WAIT_S", "leave_word", "last_words", "own_errors", "names_a_way_on",
           "peers_own_errors"]

# how long rank 0, having met another process's end in a collective, waits for the others' last words (leave_word):
# a process that ends on its own error leaves its word within milliseconds of leaving the group; one killed leaves
# none, and the job's end waits this long for it (torchrun's stop, put off meanwhile: finetune.core.signals)
WORDS_WAIT_S = 3.0
# the same, rank 0 stopped by a signal (peers_own_errors), its run saved: a process leaves its word before it exits,
# so before the agent's stop, and a user's Ctrl-C leaves none (its line waits this long); far inside the wait of
# torchrun's agent between its SIGTERM and its SIGKILL (30 s, --shutdown-timeout: torch 2.14's
# torch/distributed/elastic/multiprocessing/api.py), which checks its processes every 0.1 s (--monitor-interval)
STOP_WORDS_WAIT_S = 0.5


def leave_word(text: str) -> None:
    """Under torchrun, this process's last word, read by rank 0 (:func:`last_words`): the one line of the error it
    ends on ("": it ends on another process's end, no reason of its own). The first word stays. Elsewhere, or where
    the store cannot be reached: nothing."""
    store = _job_store()
    if store is None:
        return
    with contextlib.suppress(Exception):     # (a store gone with its agent: the job is over)
        key = _word_key(int(os.environ.get("RANK", "0")))
        if not store.check([key]):      # (only this process writes its key)
            store.set(key, text[:500])


def peers_own_errors(world_size: int) -> tuple[str, bool] | None:
    """Rank 0's line, once it was stopped by a signal and its run is saved, that names the other ranks of a job of
    ``world_size`` processes that ended on their own errors, with their words, looked for ``STOP_WORDS_WAIT_S`` at
    most, and whether those words name the way on (:func:`names_a_way_on`: then rank 0's own line names none);
    None where none did (a user's Ctrl-C, a rank killed) or there is no store (not under torchrun)."""
    words = last_words(0, world_size, STOP_WORDS_WAIT_S) or {}
    line = own_errors(words)
    return None if line is None else (line, names_a_way_on(words))


def own_errors(words: dict[int, str]) -> str | None:
    """The line naming the ranks whose ``words`` are their own errors (not ""), with them; None where none is."""
    own = {r: word for r, word in sorted(words.items()) if word}
    if len(own) == 1:
        (r, word), = own.items()
        return f"rank {r} of this torchrun job stopped on its own error: {word}"
    if not own:
        return None
    said = "; ".join(f"rank {r}: {word}" for r, word in own.items())
    return f"ranks {', '.join(map(str, own))} of this torchrun job stopped on their own errors ({said})"


def names_a_way_on(words: dict[int, str]) -> bool:
    """Whether every own error among ``words`` (not "") names a command (`...`, out of memory: the resume in smaller
    passes): that says how to go on, in place of the command of the line that says them (one way on, not two)."""
    own = [word for word in words.values() if word]
    return bool(own) and all("`" in word for word in own)


def last_words(rank: int, world_size: int, wait_s: float) -> dict[int, str] | None:
    """The words of the ranks other than ``rank`` (:func:`leave_word`), waited for until each has left one, ``wait_s``
    at most (polled: the store's own wait logs a warning each time it times out); None where there is no store to
    read, or it failed."""
    store, words = _job_store(), {}
    others = [r for r in range(world_size) if r != rank]
    deadline = time.monotonic() + wait_s
    if store is None:
        return None
    try:
        while True:
            for r in others:
                if r not in words and store.check([_word_key(r)]):
                    words[r] = store.get(_word_key(r)).decode("utf-8", "replace")
            if len(words) == len(others) or time.monotonic() >= deadline:
                return words
            time.sleep(0.05)
    except Exception:  # noqa: BLE001 - the store gone with its agent: no words to tell
        return None


def _job_store() -> dist.Store | None:
    """A connection to the store of torchrun's agent (MASTER_ADDR:MASTER_PORT, TORCHELASTIC_USE_AGENT_STORE), or
    None: not under torchrun's agent (or a job of one process), or not reached."""
    env = os.environ
    if env.get("TORCHELASTIC_USE_AGENT_STORE") != "True" or launcher_count("WORLD_SIZE") <= 1:
        return None
    try:
        return dist.TCPStore(env["MASTER_ADDR"], int(env["MASTER_PORT"]), is_master=False,
                             timeout=timedelta(seconds=2), wait_for_workers=False)
    except Exception:  # noqa: BLE001 - no store, no words: the line without them
        return None


def _word_key(rank: int) -> str:
    """``rank``'s word in this attempt of the job (a restarted job, ``--max-restarts``, keeps the agent's store)."""
    return f"zoo/last-word/{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}/{rank}"
