"""The ``zoo`` command line. The only place that prints or exits.

The group and its error handling live in ``zoo.cli.app``; each command group lives in its own module
(catalogue, cache, train, diagnose, bundle, demo, doctor, report, push, serve), imported here so that its commands are registered.
None of them imports torch at module level, so ``zoo --help``, ``zoo list`` and ``zoo info`` start fast.
Errors from the library (ZooError, FinetuneError) become one line on stderr and an exit code (1 failure,
2 usage); ZOO_DEBUG=1 shows the traceback instead.
"""
from __future__ import annotations

import sys

from zoo.cli.app import cli
from zoo.cli import catalogue, cache, train, diagnose, bundle, demo, doctor, report, push, serve  # noqa: F401,E402  (register commands)

__all__ = ["main", "cli"]


def main() -> None:
    cli(prog_name="zoo")


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
