"""``zoo list``: the catalogue as a table or JSON, or your own models (``--mine``). Never imports torch."""
from __future__ import annotations

import fnmatch
import json

import click

from zoo.cache import cached_models, is_cached
from zoo.cli.app import cli
from zoo.registry import ModelEntry, list_families, list_models
from zoo.cli.console import echo
from finetune.core.io import printable
from zoo.text import cell_width, pad

__all__ = ["list_cmd"]


def format_params(n: int | None) -> str:
    if n is None:
        return "-"
    return f"{n / 1e6:.1f}M" if n >= 1e6 else f"{n / 1e3:.0f}K"


def _row(entry: ModelEntry, cached: bool) -> dict:
    size = entry.preprocessing.input_size
    return {"name": entry.name, "family": entry.family, "params": entry.params, "top1": entry.top1,
            "input_size": list(size), "license": entry.license, "cached": cached}


def _table(rows: list[dict]) -> str:
    header = ("NAME", "FAMILY", "PARAMS", "TOP-1", "INPUT", "LICENCE", "CACHED")
    cells = [(r["name"], r["family"], format_params(r["params"]),
              "-" if r["top1"] is None else f"{r['top1']:.1f}",
              f"{r['input_size'][1]}" if r["input_size"][1] == r["input_size"][2]
              else f"{r['input_size'][1]}x{r['input_size'][2]}",
              r["license"], "yes" if r["cached"] else "-") for r in rows]
    widths = [max(len(str(c[i])) for c in [header] + cells) for i in range(len(header))]
    right = {2, 3, 4}  # numbers line up on the right
    lines = []
    for c in [header] + cells:
        lines.append("  ".join(str(v).rjust(w) if i in right else str(v).ljust(w)
                               for i, (v, w) in enumerate(zip(c, widths))).rstrip())
    return "\n".join(lines)


@cli.command("list", short_help="List the models of the zoo.")
@click.argument("pattern", required=False)
@click.option("--family", "family", default=None, metavar="FAMILY",
              help="Only this family (resnet, vgg, ...; wildcards allowed).")
@click.option("--cached", "cached_only", is_flag=True, default=False, show_default=True,
              help="Only models whose weights are in the cache (ZOO_HOME).")
@click.option("--json", "as_json", is_flag=True, default=False, show_default=True,
              help="Print a JSON list instead of a table.")
@click.option("--mine", is_flag=True, default=False, show_default=True,
              help="Your models instead: finetuned bundles under the current folder (runs/*/export...), what "
                   "`zoo push` published from here, and hf-hub: models in the cache.")
def list_cmd(pattern: str | None, family: str | None, cached_only: bool, as_json: bool, mine: bool) -> None:
    """List the curated models (and your ZOO_REGISTRY entries): name, family, parameters, ImageNet top-1,
    input size, licence, and whether the weights are cached.

    PATTERN filters names: a word matches anywhere in the name, or use wildcards (resnet*, *_bn).
    Any timm architecture also works elsewhere as timm:<arch>, without an entry.

    \b
    Examples:
      zoo list                   # everything
      zoo list resnet            # names containing "resnet"
      zoo list 'vgg1?_bn'        # wildcards
      zoo list --family vgg      # one family
      zoo list --cached --json   # what is downloaded, machine-readable
      zoo list --mine            # your finetuned bundles and pushed models
    """
    if mine:
        return _list_mine(pattern, as_json)
    entries = list_models(pattern, family=family)
    if family and not entries and not pattern:
        raise click.UsageError(f"no family '{family}'; families: {', '.join(list_families())}")
    rows = [_row(e, is_cached(e.name)) for e in entries]
    if cached_only:
        rows = [r for r in rows if r["cached"]]
    if as_json:
        echo(json.dumps(rows, indent=2))
        return
    if not rows:
        what = "cached " if cached_only else ""
        echo(f"no {what}models match; `zoo list` shows them all" +
             ("; `zoo pull NAME` caches one" if cached_only else ""), err=True)
        return
    echo(_table(rows))


def _list_mine(pattern: str | None, as_json: bool) -> None:
    # lazy: not loaded at CLI start (keeps zoo --help fast)
    from zoo.push import local_bundles, pushed_models

    rows = [{"kind": "local", "name": b["path"], "architecture": b["architecture"], "classes": b["num_classes"],
             "detail": f"from {b['model']}" if b.get("model") else ""} for b in local_bundles(".")]
    rows += [{"kind": "pushed", "name": f"hf-hub:{p['repo']}", "architecture": None, "classes": None,
              "detail": f"{p['revision']}@{str(p['commit'])[:12]} from {p.get('bundle', '?')}"}
             for p in pushed_models()]
    pushed = {r["name"] for r in rows}
    rows += [{"kind": "hub-cache", "name": m["name"], "architecture": None, "classes": None, "detail": "cached"}
             for m in cached_models() if str(m.get("name", "")).startswith("hf-hub:") and m["name"] not in pushed]
    if pattern:
        pat = pattern if any(c in pattern for c in "*?[") else f"*{pattern}*"
        rows = [r for r in rows if fnmatch.fnmatch(r["name"], pat)]
    if as_json:
        echo(json.dumps(rows, indent=2))
        return
    if not rows:
        echo("no models of yours here: `zoo finetune` writes runs/<name>/export, `zoo push` publishes one",
             err=True)
        return
    header = ("KIND", "NAME", "ARCH", "CLASSES", "DETAIL")
    cells = [(r["kind"], printable(r["name"]), r["architecture"] or "-",
              "-" if r["classes"] is None else str(r["classes"]), printable(r["detail"])) for r in rows]
    widths = [max(cell_width(str(c[i])) for c in [header] + cells) for i in range(len(header))]
    for c in [header] + cells:
        echo("  ".join(pad(str(v), w) for v, w in zip(c, widths)).rstrip())
