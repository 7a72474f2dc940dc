"""The ``zoo`` command line. The only place that prints or exits.

The group and its error handling live in ``zoo.cli.app``; each command lives in a module named after it
(``zoo X`` in ``zoo/cli/X.py``; ``list_cmd``, ``import_cmd``, ``eval_cmd`` and ``lr_find`` where the name is a
builtin, a keyword or has a dash), imported here in the order ``zoo --help`` lists them. ``options``,
``shared`` and ``console`` are what commands share.
None of them imports torch at module level, so ``zoo --help``, ``zoo list`` and ``zoo info`` start fast.
Errors from the library (ZooError, FinetuneError) become one line on stderr and an exit code (1 failure,
2 usage); ZOO_DEBUG=1 shows the traceback instead.
"""
from __future__ import annotations

import sys

from zoo import process
from zoo.cli.app import cli
from zoo.cli import (list_cmd, info, pull, lock, import_cmd, cache, finetune, lr_find, sweep,  # noqa: F401,E402
                     export, predict, eval_cmd, demo, doctor, report, push, serve)           # (register commands)

__all__ = ["main", "cli"]


def main() -> None:
    """The ``zoo`` console script and ``python -m zoo``: the command, then a quick exit (the collector frozen;
    under torchrun, deaf to its stop once the command is over). The interpreter's own teardown still runs: an
    ``os._exit`` after the atexit handlers saved 0.2-0.3 s but lost ``python -m cProfile -m zoo``'s profile and would
    end a notebook that calls ``main()`` (docs/benchmarks.md, "The small job's fixed costs")."""
    try:
        cli(prog_name="zoo")
    finally:
        process.skip_final_collection()
        process.deaf_to_torchrun_stop()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
