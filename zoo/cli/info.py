"""``zoo info NAME``: everything known about one model. Never imports torch (ad-hoc ``timm:`` refs do)."""
from __future__ import annotations

import json

import click

from zoo.build import VGG_FC_DROPOUT, has_fc_dropout
from zoo.cache import is_cached
from zoo.cli.app import cli
from zoo.registry import ModelEntry
from zoo.hub import resolve_entry
from zoo.cli.console import echo
from zoo.cli.list_cmd import format_params

__all__ = ["info_cmd"]


def _info_text(entry: ModelEntry, cached: bool) -> str:
    p = entry.preprocessing
    lines = [
        f"{entry.name}: {entry.description}" if entry.description else entry.name,
        f"  family       {entry.family}",
        f"  builder      {entry.builder}",
        f"  params       {format_params(entry.params)}" + (f" ({entry.params:,})" if entry.params else ""),
        "  top-1        " + ("-" if entry.top1 is None else f"{entry.top1:g}%")     # as given: 75.1%, not 75.100%
        + (f"  [{entry.top1_source}]" if entry.top1_source else ""),
        f"  licence      {entry.license}",
        f"  paper        {entry.paper or '-'}" + (f" ({entry.year})" if entry.year else ""),
        f"  classes      {entry.num_classes}",
        f"  cached       {'yes' if cached else 'no'}",
        f"  registry     {entry.origin_file}",
        "preprocessing",
        f"  input size   {'x'.join(str(v) for v in p.input_size)}",
        f"  resize/crop  {p.interpolation}, crop_pct {p.crop_pct:g}",
        f"  mean / std   {', '.join(f'{v:g}' for v in p.mean)} / {', '.join(f'{v:g}' for v in p.std)}",
        f"  from         {p.origin}",
        f"stages ({len(entry.stages)}, input -> output; finetune unfreezes the last k)",
    ]
    for i, stage in enumerate(entry.stages):
        lines.append(f"  {i}  {', '.join(stage)}")
    lines.append(f"  classifier  {entry.classifier}")
    if has_fc_dropout(entry):
        lines.append(f"head layers  pre_logits.fc1, pre_logits.fc2: VGG's two FC-4096 layers (held by timm as 7x7 and "
                     f"1x1 convolutions), then {entry.classifier}, the classifier finetune replaces; while the "
                     f"FC-4096 layers train they get the original's dropout {VGG_FC_DROPOUT} (--fc-dropout 0 "
                     "turns it off)")
    lines.append(f"sources ({len(entry.sources)}, tried in order)")
    for s in entry.sources:
        lines.append(f"  - {s.id()}  [{s.format}" + (f", key map {s.key_map}" if s.key_map else "") + "]")
        if s.sha256:
            lines.append(f"    sha256 {s.sha256}")
        else:
            pre = f"prefix {s.sha256_prefix}; " if s.sha256_prefix else ""
            lines.append(f"    sha256 {pre}none pinned: {s.sha256_note}")
        if s.revision_note:
            lines.append(f"    revision: {s.revision_note}")
    return "\n".join(lines)


@cli.command("info", short_help="Everything known about one model.")
@click.argument("name")
@click.option("--json", "as_json", is_flag=True, default=False, show_default=True,
              help="Print the entry as JSON.")
def info_cmd(name: str, as_json: bool) -> None:
    """Show one model: builder, parameters, top-1 and its source, licence, paper, preprocessing, the
    stages finetuning freezes by, the classifier, and every weight source with its digest.

    NAME is a zoo name (zoo list), timm:<arch>[.<tag>] or hf-hub:<org>/<repo> (those two build the
    network on the meta device to find its stages, so they import torch; an hf-hub: repo's config.json is
    downloaded once, into the Hugging Face cache).

    \b
    Examples:
      zoo info resnet50
      zoo info vgg16_bn --json
      zoo info timm:resnet18.a1_in1k
      zoo info hf-hub:timm/convnext_tiny.fb_in22k_ft_in1k
    """
    entry = resolve_entry(name)
    cached = is_cached(entry.name)
    if as_json:
        data = entry.to_dict()
        data["cached"] = cached
        echo(json.dumps(data, indent=2))
        return
    echo(_info_text(entry, cached))
