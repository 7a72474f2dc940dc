"""``ordered_map``: a function over items on a few threads, the results in input order, a bounded number ahead."""
from __future__ import annotations

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
