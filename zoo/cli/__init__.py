"""The ``zoo`` command line. The only place that prints or exits.

Each command group lives in its own module (catalogue, cache, train, bundle, demo); none of them imports
torch at module level, so ``zoo --help``, ``zoo list`` and ``zoo info`` start fast. Errors from the
library (ZooError, FinetuneError) become one line on stderr and an exit code (1 failure, 2 usage);
ZOO_DEBUG=1 shows the traceback instead.
"""
from __future__ import annotations

import errno
import os
import sys

import click

from zoo import __version__
from zoo.errors import ZooError
from finetune.errors import FinetuneError

__all__ = ["main", "cli"]


class ZooGroup(click.Group):
    """Maps library errors to one line + exit code; keeps commands in the order they were added."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return list(self.commands)

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except (ZooError, FinetuneError) as err:
            if os.environ.get("ZOO_DEBUG") == "1":
                raise
            click.echo(f"zoo: error: {err}", err=True)
            ctx.exit(getattr(err, "exit_code", 1))
        except KeyboardInterrupt:
            if os.environ.get("ZOO_DEBUG") == "1":
                raise
            click.echo("zoo: interrupted", err=True)
            ctx.exit(130)
        except OSError as err:
            if os.environ.get("ZOO_DEBUG") == "1":
                raise
            where = f" ({err.filename})" if getattr(err, "filename", None) else ""
            if err.errno == errno.ENOSPC:
                click.echo(f"zoo: error: no space left on device while writing{where}: free some disk space "
                           "or write elsewhere (--out, ZOO_HOME)", err=True)
                ctx.exit(1)
            click.echo(f"zoo: error: {err.strerror or err}{where}; set ZOO_DEBUG=1 for details", err=True)
            ctx.exit(1)


@click.group(cls=ZooGroup, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, "--version", prog_name="zoo")
@click.option("--registry", "registry", type=click.Path(dir_okay=False), envvar="ZOO_REGISTRY",
              help="Extra registry YAML with your own entries (same schema); also ZOO_REGISTRY.")
@click.pass_context
def cli(ctx: click.Context, registry: str | None) -> None:
    """A zoo of pretrained vision models, and the lecture's finetuning recipe as one command.

    \b
    Examples:
      zoo list                               # the curated models, cached or not
      zoo pull resnet50                      # download + verify + cache as safetensors
      zoo finetune resnet50 --data ./photos  # train a classifier on your image folders
      zoo predict runs/resnet50-*/export cat.jpg
      zoo demo                               # the whole journey offline, on an embedded dataset

    Shell completion: eval "$(_ZOO_COMPLETE=bash_source zoo)"  (zsh: zsh_source, fish: fish_source)
    """
    ctx.ensure_object(dict)
    if registry:
        os.environ["ZOO_REGISTRY"] = registry


def _register() -> None:
    # Each module adds its commands to ``cli``; a module not written yet is simply absent.
    import importlib

    for name in ("catalogue", "cache", "train", "diagnose", "bundle", "demo", "doctor", "report"):
        try:
            importlib.import_module(f"zoo.cli.{name}")
        except ModuleNotFoundError as e:
            if e.name != f"zoo.cli.{name}":
                raise


_register()


def main() -> None:
    cli(prog_name="zoo")


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
