"""``ordered_map``: a function over items on a few threads, the results in input order, a bounded number ahead;
``one_thread``: torch's own threads set to one for a block."""
from __future__ import annotations

import contextlib
import itertools
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Iterable, Iterator, TypeVar

T = TypeVar("T")
R = TypeVar("R")


def ordered_map(fn: Callable[[T], R], items: Iterable[T], threads: int, ahead: int, name: str) -> Iterator[R]:
    """``fn(item)`` for each item, in order: here, one after another, with ``threads`` <= 0; else on that many
    threads, with at most ``ahead`` calls queued or running, the one consumed next included (results are held until
    consumed: a bound on memory). An exception ``fn`` raises is raised at its item. Closing the generator (an error
    or a Ctrl-C in the consumer) drops the calls not started and waits only for those running. Used by zoo predict's
    decoding threads, zoo doctor's file pass and the scan's file checks."""
    if threads <= 0:
        yield from map(fn, items)
        return
    pool = ThreadPoolExecutor(threads, thread_name_prefix=name)
    todo = iter(items)
    queued: deque = deque()
    try:
        queued.extend(pool.submit(fn, item) for item in itertools.islice(todo, max(1, ahead)))
        while queued:
            done = queued.popleft()
            for item in itertools.islice(todo, 1):
                queued.append(pool.submit(fn, item))
            yield done.result()
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


@contextlib.contextmanager
def one_thread(on: bool = True) -> Iterator[None]:
    """torch's intra-op threads set to one for the block (``on``; restored after), for the small convex solves on
    features (the cached head's L-BFGS path, the mirror test, the doctor's label probe). Two reasons, both measured
    (docs/benchmarks.md, "The head's solve on one thread"): such a solve is thousands of tiny ops, where one thread
    is as fast as a team that mostly waits; and its result no longer depends on how many threads the process has, so
    the same features give the same head on any machine of the same kind and under torchrun (one thread a process)
    as in one process (before, its float sums were split by the thread count: another head in the 5th digit, and at
    a near tie another C)."""
    import torch     # lazy: ordered_map's users (the scan's file checks) need no torch

    threads = torch.get_num_threads()
    if on:
        torch.set_num_threads(1)
    try:
        yield
    finally:
        if on:
            torch.set_num_threads(threads)
