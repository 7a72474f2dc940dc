"""``zoo import``: put a local weights file into the cache under a name. No torch at import."""
from __future__ import annotations

import click

from zoo import cache as zcache
from zoo.cli.app import cli
from zoo.cli.console import echo
from zoo.errors import ZooError
from zoo.text import human_size

__all__ = ["import_cmd"]


@cli.command("import", short_help="Register a local .safetensors or .pth as a model's weights.")
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

    try:
        before = zcache.read_manifest(name) if zcache.is_cached(name) else None
    except ZooError:        # a damaged manifest: importing is how it gets repaired
        before = None
    before = before if isinstance(before, dict) else {}
    path = import_weights(name, file, sha256=sha256)
    manifest = zcache.read_manifest(name) or {}
    echo(f"{name}: imported, {human_size(path.stat().st_size)}: {path}")
    old = before.get("sha256_download")
    if old and old != manifest.get("sha256_download"):    # other weights than the ones runs were made from
        # (a pulled file's manifest says tofu: false where the registry pinned it; an import's says "verified")
        trust = ("verified: " + str(before["verified"]) if before.get("verified") else
                 "verified against the registry pin" if before.get("tofu") is False else "trusted on first use")
        echo(f"note: this replaced the cached weights of {name} (sha256 {str(old)[:12]}..., {trust}, "
             f"from {before.get('source') or 'unknown'})", err=True)
    if manifest.get("verified"):
        echo(f"  verified: sha256 {manifest.get('sha256_download')} matches the {manifest['verified']}")
    else:
        echo(f"  sha256 of {file}: {manifest.get('sha256_download')} (trusted on first use: no pin to "
             "check it against; pass --sha256)")
