"""``zoo push``: publish a bundle as a Hub model repo plain timm loads. A thin command over zoo.push."""
from __future__ import annotations

from pathlib import Path

import click

from finetune.core.io import shell_command
from zoo.cli.app import cli
from zoo.cli.console import echo
from zoo.cli.options import Folder

__all__ = ["push_cmd"]


@cli.command("push", short_help="Publish a bundle to a Hugging Face Hub repo (timm-loadable).")
@click.argument("path", metavar="RUN_OR_BUNDLE", type=Folder(exists=True, path_type=Path, what="run or bundle folder"))
@click.option("--repo", required=True, metavar="OWNER/NAME", help="Hub model repo; created when missing.")
@click.option("--private", is_flag=True, default=False, show_default=True,
              help="Create the repo private (an existing repo keeps its visibility).")
@click.option("--revision", default=None, metavar="BRANCH",
              help="Commit to this branch (created from main when missing) instead of main.  [default: main]")
@click.option("--message", "-m", default=None, help="Commit message.  [default: zoo push: ARCH finetuned on N classes]")
@click.option("--overwrite", is_flag=True, default=False, show_default=True,
              help="The branch already holds another model: replace it.")
@click.option("--test-metrics", "test_metrics", type=click.Path(exists=True, path_type=Path), default=None,
              metavar="REPORT", help="A `zoo eval` report (folder or metrics.json): its accuracy goes into the "
                                     "model card and model-index as the test metric.")
@click.option("--dry-run", is_flag=True, default=False, show_default=True,
              help="Build the files and print the model card; upload nothing.")
def push_cmd(path: Path, repo: str, private: bool, revision: str | None, message: str | None, overwrite: bool,
             test_metrics: Path | None, dry_run: bool) -> None:
    """Upload RUN_OR_BUNDLE (a `zoo finetune` run folder or a `zoo export` bundle) to --repo as ONE commit:
    model.safetensors, timm's config.json (labels, preprocessing) and a model card README.md.

    Anyone can then load a linear-head timm model with
    `timm.create_model("hf-hub:OWNER/NAME", pretrained=True)` or `zoo predict hf-hub:OWNER/NAME img.jpg`;
    an MLP head or a torchvision model, which timm cannot build, as a folder of its two files (the push
    and the card give the download). HF_TOKEN (or `hf auth login`) and HF_ENDPOINT are honoured.
    No local path is published: sources are named by registry name, hub id or file name + sha256.
    A repo holding another model is refused unless --revision or --overwrite; a failed upload leaves
    the repo as it was.

    \b
    Examples:
      zoo push runs/photos-r50 --repo me/photos-r50
      zoo push my-classifier --repo me/photos-r50 --revision v2 --test-metrics reports/holdout
      zoo push my-classifier --repo me/photos-r50 --dry-run
    """
    if dry_run:
        # lazy: zoo --help must not import huggingface_hub (slow)
        from zoo.push import plan_push

        plan = plan_push(path, repo, test_metrics, revision)
        echo(plan.card)
        echo(f"would upload to {repo}: " + ", ".join(f"{n} ({len(d):,} bytes)" for n, d in plan.files.items()),
             err=True)
        return
    # lazy: zoo --help must not import huggingface_hub (slow)
    from huggingface_hub.utils import logging as hf_logging

    from zoo.modelcard import download_command
    from zoo.push import push

    hf_logging.set_verbosity_error()     # its "no files modified" warning: this command says it in its own words
    result = push(path, repo, private=private, revision=revision, message=message, overwrite=overwrite,
                  test_metrics=test_metrics)
    if result.unchanged:
        echo(f"{repo}@{result.revision} already holds these files (commit {result.commit[:12]}); nothing to push")
        return
    echo(f"pushed {', '.join(result.files)} to {repo}@{result.revision} (commit {result.commit[:12]})")
    predict, rev = shell_command("zoo", "predict", f"hf-hub:{repo}", "IMAGE"), result.revision
    # QA (helper-137): the timm line was printed for models plain timm cannot rebuild, as the card says
    timm = "" if result.timm_refusal else f'timm.create_model("hf-hub:{repo}{"" if rev == "main" else "@" + rev}", ' \
                                           'pretrained=True)'
    if not timm:        # the folder, from any branch (QA, helper-138: a branch's was a ZOO_REGISTRY entry, no MLP head)
        echo(f"load it: {download_command(repo, 'DIR', rev)}, then zoo predict DIR IMAGE")
    elif rev == "main":
        echo(f"load it: {timm}  or  {predict}")
    else:     # hf-hub:REPO is the main branch, another model or none
        echo(f"load it: {timm}; zoo reads the main branch of hf-hub:{repo}: for {rev!r} add an entry with "
             f"`revision: {rev}` to your ZOO_REGISTRY file")
    if result.timm_refusal:
        echo(f"note: plain timm cannot rebuild this model ({result.timm_refusal}), nor zoo from an hf-hub: name; "
             "its card says how to load it")
    if result.not_recorded:
        echo(f"note: the push is not recorded in ZOO_HOME/pushed.json: {result.not_recorded}; `zoo list --mine` "
             "will not show it (set ZOO_HOME to a writable folder)", err=True)
