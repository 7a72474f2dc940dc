"""``zoo pull``, ``zoo import`` and ``zoo cache ls|rm|verify|path``. No torch at import (``zoo --help``)."""
from __future__ import annotations

import json

import click

from zoo import cache as zcache
from zoo.cli.app import cli
from zoo.cli.console import echo
from zoo.errors import ZooError
from zoo.lock import pull_locked, write_lock
from zoo.resolve import get_entry
from zoo.sources import fetch_hub_config, pull

__all__ = ["pull_cmd", "lock_cmd", "import_cmd", "cache_group"]


def human_size(n: int) -> str:
    """1536 -> '1.5 KiB'."""
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{n} B"  # pragma: no cover


@cli.command("pull")
@click.argument("names", nargs=-1, metavar="NAME...")
@click.option("--force", is_flag=True, help="Download again even when the model is cached.")
@click.option("--locked", "locked", type=click.Path(dir_okay=False), default=None, metavar="LOCKFILE",
              help="Fetch exactly what this lock file (`zoo lock`) pins: its Hub commits, and refuse any file "
                   "whose sha256 differs (nothing is installed then). NAMEs: a subset; default all.")
@click.option("--quiet", "-q", is_flag=True, help="No progress bar.")
@click.pass_context
def pull_cmd(ctx: click.Context, names: tuple[str, ...], force: bool, locked: str | None, quiet: bool) -> None:
    """Download, verify and cache the weights of one or more models (as safetensors).

    A cached model is not downloaded again (no network request at all) unless --force. Offline
    (ZOO_OFFLINE=1 or HF_HUB_OFFLINE=1) an uncached model fails at once and says how to get it.

    \b
    Examples:
      zoo pull resnet50
      zoo pull resnet50 efficientnet_b0 --quiet
      zoo pull resnet50 --force        # re-download and re-verify
      zoo pull hf-hub:me/photos-r50    # a model `zoo push` published (sha256 from its config.json)
      zoo lock --out zoo.lock          # pin what is cached here ...
      zoo pull --locked zoo.lock       # ... and fetch exactly that on another machine
    """
    if locked is not None:
        if force:
            raise click.UsageError("--force cannot be combined with --locked: a locked pull re-downloads "
                                   "whatever does not match the lock")
        pull_locked(locked, names or None, progress=not quiet,
                    say=lambda name, what: echo(f"{name}: {what}"))
        return
    if not names:
        raise click.UsageError("give at least one NAME (`zoo list` shows them), or --locked LOCKFILE")
    for n in names:   # a Hub repo's config.json says what it is (architecture, classes, pinned sha256)
        if n.strip().startswith("hf-hub:") and not zcache.is_cached(n.strip()):
            fetch_hub_config(n.strip()[len("hf-hub:"):])
    entries = [get_entry(n) for n in names]  # unknown names fail (exit 2) before anything is downloaded
    failed = 0
    for entry in entries:
        was_cached = zcache.is_cached(entry.name)
        try:
            path = pull(entry, force=force, progress=not quiet)
        except ZooError as err:
            if len(entries) == 1:
                raise
            echo(f"zoo: error: {err}", err=True)
            failed += 1
            continue
        size = human_size(path.stat().st_size)
        if was_cached and not force:
            echo(f"{entry.name}: already cached, {size}: {path}")
            continue
        echo(f"{entry.name}: pulled and verified, {size}: {path}")
        manifest = zcache.read_manifest(entry.name) or {}
        resolved = manifest.get("revision")
        if resolved and f"@{resolved}/" not in str(manifest.get("source", "")):
            echo(f"  Hub revision resolved to commit {resolved}: pin it as `revision:` in your registry")
        if manifest.get("tofu"):
            echo(f"  sha256 {manifest.get('sha256_download')} (no pinned digest: trusted on first use; "
                 "check it against the publisher's and pin it in your registry)")
    if failed:
        ctx.exit(1)


@cli.command("lock", short_help="Write a lock file pinning the cached models' sources and digests.")
@click.argument("names", nargs=-1, metavar="[NAME...]")
@click.option("--out", "out", type=click.Path(dir_okay=False), default="zoo.lock", show_default=True,
              help="The lock file to write.")
def lock_cmd(names: tuple[str, ...], out: str) -> None:
    """Pin what was pulled: for each cached model (or each NAME), the exact source (the Hub commit a branch
    resolved to, the file name or URL) and the sha256 of the file as downloaded. `zoo pull --locked FILE`
    on another machine then fetches exactly those bytes, or refuses.

    \b
    Examples:
      zoo pull resnet50 vgg16 && zoo lock --out zoo.lock
      zoo pull --locked zoo.lock       # elsewhere: the same commits, byte for byte
    """
    data = write_lock(out, names or None)
    for name, item in sorted(data["models"].items()):
        src = item["source"]
        where = f"{src['repo']}@{src['revision']}/{src['filename']}" if src["kind"] == "hf" else \
            (src.get("url") or src.get("path"))
        echo(f"{name}: {where}  sha256 {item['sha256']}")
    echo(f"locked {len(data['models'])} model(s) in {out}")


@cli.command("import")
@click.argument("name")
@click.argument("file", type=click.Path(exists=True, dir_okay=False))
@click.option("--sha256", "sha256", metavar="HEX",
              help="Refuse the file unless its sha256 is this digest: 64 hex digits, or a prefix of at least 8 "
                   "(as in torchvision file names; a prefix is a weaker check).")
def import_cmd(name: str, file: str, sha256: str | None) -> None:
    """Register a local .safetensors or .pth as a model's weights (for machines without network).

    Every tensor's name and shape is checked against the architecture; a .pth is read only with
    torch.load(weights_only=True) and converted to safetensors.

    \b
    Examples:
      zoo import resnet50 ./resnet50.safetensors
      zoo import alexnet ./alexnet-owt-7be5be79.pth --sha256 7be5be79
      zoo import vgg16 ./vgg16-397923af.pth          # torchvision VGG: FC layers converted to timm's
    """
    # lazy: zoo --help must not import torch
    from zoo.importer import import_weights

    path = import_weights(name, file, sha256=sha256)
    manifest = zcache.read_manifest(name) or {}
    echo(f"{name}: imported, {human_size(path.stat().st_size)}: {path}")
    if manifest.get("verified"):
        echo(f"  verified: sha256 {manifest.get('sha256_download')} matches the {manifest['verified']}")
    else:
        echo(f"  sha256 of {file}: {manifest.get('sha256_download')} (trusted on first use: no pin to "
             "check it against; pass --sha256)")


@cli.group("cache")
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
        echo(f"nothing cached under {zcache.zoo_home()}; `zoo pull NAME` fetches a model")
        return
    width = max(len(m.get("name", "")) for m in models)
    total = 0
    for m in models:
        total += m["bytes"]
        tofu = "  (tofu)" if m.get("tofu") else ""
        echo(f"{m.get('name', '?'):<{width}}  {human_size(m['bytes']):>10}  "
             f"{str(m.get('sha256', ''))[:12]}  {m.get('source', '?')}{tofu}")
    echo(f"{len(models)} model(s), {human_size(total)} in {zcache.zoo_home()}")


@cache_group.command("rm")
@click.argument("names", nargs=-1, required=True, metavar="NAME...")
def cache_rm(names: tuple[str, ...]) -> None:
    """Delete the cached weights of one or more models.

    \b
    Examples:
      zoo cache rm resnet50
    """
    for name in names:
        _check_name(name)
        size = sum(p.stat().st_size for p in zcache.weights_dir(name).glob("*") if p.is_file()) \
            if zcache.weights_dir(name).is_dir() else 0
        folder = zcache.remove(name)
        echo(f"removed {name} ({human_size(size)}): {folder}")


@cache_group.command("verify")
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
