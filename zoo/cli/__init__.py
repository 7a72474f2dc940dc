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
    """The ``zoo`` console script and ``python -m zoo``: the command, then a quick exit (``process.exit_now``: the
    command's exit code, without the interpreter's teardown). An error that escaped the command (a bug: Python
    prints its traceback) leaves as Python leaves, less the final collection."""
    try:
        cli(prog_name="zoo")
    except SystemExit as done:      # (click ends every command with one, 0 included)
        process.exit_now(done.code)
    finally:
        process.skip_final_collection()
        process.deaf_to_torchrun_stop()
    process.exit_now(0)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
