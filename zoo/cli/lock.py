"""``zoo lock``: pin models' Hub commits and sha256 in a lock file. No torch at import."""
from __future__ import annotations

import click

from zoo.cli.app import cli
from zoo.cli.console import echo
from zoo.lock import lock_text, write_lock

__all__ = ["lock_cmd"]


@cli.command("lock", short_help="Write a lock file pinning the cached models' sources and digests.")
@click.argument("names", nargs=-1, metavar="[NAME...]")
@click.option("--out", "out", type=click.Path(dir_okay=False, allow_dash=True), default="zoo.lock", show_default=True,
              help="The lock file to write (-: print it on stdout).")
def lock_cmd(names: tuple[str, ...], out: str) -> None:
    """Pin what was pulled: for each cached model (or each NAME), the exact source (the Hub commit a branch
    resolved to, the file name or URL) and the sha256 of the file as downloaded. `zoo pull --locked FILE`
    on another machine then fetches exactly those bytes, or refuses.

    \b
    Examples:
      zoo pull resnet50 vgg16 && zoo lock --out zoo.lock
      zoo pull --locked zoo.lock       # elsewhere: the same commits, byte for byte
      zoo lock --out - | less          # print it instead
    """
    to_stdout = out == "-"     # the lock on stdout, what was locked on stderr (as `zoo lock --out - > f`)
    data = write_lock(None if to_stdout else out, names or None)
    for name, item in sorted(data["models"].items()):
        src = item["source"]
        where = f"{src['repo']}@{src['revision']}/{src['filename']}" if src["kind"] == "hf" else \
            (src.get("url") or src.get("path"))
        echo(f"{name}: {where}  sha256 {item['sha256']}", err=to_stdout)
    echo(f"locked {len(data['models'])} model(s) in {'stdout' if to_stdout else out}", err=to_stdout)
    if to_stdout:
        echo(lock_text(data).rstrip("\n"))
