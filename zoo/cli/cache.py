"""``zoo cache ls|rm|verify|path``: the weights cache (ZOO_HOME). No torch at import (``zoo --help``)."""
from __future__ import annotations

import json

import click

from zoo import cache as zcache
from zoo.cli.app import cli
from zoo.cli.console import echo
from zoo.errors import UsageError, ZooError
from zoo.resolve import get_entry
from zoo.text import human_size

__all__ = ["cache_group"]


@cli.group("cache", short_help="Inspect and manage the weights cache (ZOO_HOME).")
def cache_group() -> None:
    """Inspect and manage the weights cache (ZOO_HOME, default ~/.cache/zoo).

    \b
    Examples:
      zoo cache ls
      zoo cache verify
      zoo cache rm resnet50
      zoo cache path
    """


@cache_group.command("ls")
@click.option("--json", "as_json", is_flag=True, help="One JSON list (manifests + path + bytes) for scripts.")
def cache_ls(as_json: bool) -> None:
    """List cached models with their size, source and digest.

    \b
    Examples:
      zoo cache ls
      zoo cache ls --json
    """
    models = zcache.cached_models()
    if as_json:
        echo(json.dumps(models, indent=2))
        return
    if not models:
        home = zcache.zoo_home()
        if home.exists() and not home.is_dir():      # (QA: "nothing cached", where pull says what is wrong)
            raise UsageError(f"ZOO_HOME={home} is a file, not a folder: point ZOO_HOME at a folder")
        echo(f"nothing cached under {home}; `zoo pull NAME` fetches a model")
        return
    names = [_listed_name(m) for m in models]
    width = max(len(n) for n in names)
    total = 0
    for m, name in zip(models, names):
        total += m["bytes"]
        tofu = "  (tofu)" if m.get("tofu") else ""
        echo(f"{name:<{width}}  {human_size(m['bytes']):>10}  "
             f"{str(m.get('sha256', ''))[:12]}  {m.get('source', '?')}{tofu}")
    echo(f"{len(models)} model(s), {human_size(total)} in {zcache.zoo_home()}")


def _listed_name(model: dict) -> str:
    """The name `zoo cache rm` takes: the model's, or its folder's where the two differ (a copied folder, whose
    manifest names the model it was copied from: QA), with the manifest's in brackets."""
    name, folder = str(model.get("name", "?")), str(model.get("folder", ""))
    try:
        same = not folder or zcache.dir_name(name) == folder
    except ZooError:
        same = False
    return name if same else f"{folder} (manifest: {name})"


@cache_group.command("rm")
@click.argument("names", nargs=-1, required=True, metavar="NAME...")
def cache_rm(names: tuple[str, ...]) -> None:
    """Delete the cached weights of one or more models.

    \b
    Examples:
      zoo cache rm resnet50
    """
    for name in dict.fromkeys(names):     # a name given twice is removed once
        _check_name(name)
        size = sum(p.stat().st_size for p in zcache.weights_dir(name).glob("*") if p.is_file()) \
            if zcache.weights_dir(name).is_dir() else 0
        folder = zcache.remove(name)
        echo(f"removed {name} ({human_size(size)}): {folder}")


@cache_group.command("verify", short_help="Re-hash every cached file against its manifest.")
@click.pass_context
def cache_verify(ctx: click.Context) -> None:
    """Re-hash every cached file against its manifest; exit 1 when one does not match.

    \b
    Examples:
      zoo cache verify
    """
    problems = zcache.verify()
    for line in problems:
        echo(f"zoo: error: {line}", err=True)
    if problems:
        ctx.exit(1)
    echo(f"{len(zcache.cached_models())} cached model(s) verified: every sha256 matches its manifest")


@cache_group.command("path")
@click.argument("name", required=False)
def cache_path(name: str | None) -> None:
    """Print the cache root, or the folder of one model's weights.

    \b
    Examples:
      zoo cache path
      du -sh "$(zoo cache path)"
    """
    if name:
        _check_name(name)
    echo(str(zcache.weights_dir(name) if name else zcache.zoo_home()))


def _check_name(name: str) -> None:
    """A name that is neither cached nor known fails with close matches (a typo is not "not cached")."""
    if not zcache.weights_dir(name).exists():
        get_entry(name)   # raises UnknownModelError listing the close matches
