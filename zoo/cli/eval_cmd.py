"""``zoo eval``: accuracy, per-class metrics, confusion matrix and predictions on a labelled folder. A thin
command over zoo.evaluate; no torch at import."""
from __future__ import annotations

import json
from pathlib import Path

import click

from zoo.cli.app import cli
from zoo.cli.console import echo
from zoo.cli.options import Folder, IntRange
from finetune.core.confusion import FULL_MAX_CLASSES, SHOWN_CLASSES, lowest_first
from finetune.core.metrics import accuracy_text, probability_text
from finetune.core.io import printable
from zoo.text import cell_width, pad
from zoo.cli.predict import DEVICE_HELP, note_unmirrored_tta, tta_options, tta_scales_given, warn_skipped

__all__ = ["eval_cmd"]


_SEEN = {
    "train": "zoo: warning: {folder} is the folder this model was trained on: the accuracy below is its training "
             "accuracy, not what it does on new images; evaluate on images it never saw (e.g. a test/ folder)",
    "val": "zoo: note: {folder} holds the run's validation images, which chose the epoch kept: the accuracy is "
           "slightly optimistic; a test/ folder the run never saw gives an unbiased figure",
}


def _default_out(model: str) -> Path:
    # lazy: zoo --help loads no more than it needs
    from zoo.outdir import default_out

    p = Path(model)
    # Next to the bundle when MODEL is one; in the working directory for a registry model.
    return default_out(p.resolve().parent, f"eval-{p.resolve().name}") if p.is_dir() else default_out(".", "eval")


@cli.command("eval", short_help="Accuracy, per-class metrics and confusion matrix on a labelled folder.")
@click.argument("model")
@click.option("--data", "data", required=True, type=Folder(exists=True, path_type=Path),
              help="Class-folder layout (<class>/<image>); its test/ or val/ split is used when present.")
@click.option("--out", "out", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Report folder.  [default: eval-<bundle>-<time> next to the bundle, or ./eval-<time>]")
@tta_options
@click.option("--worst", type=IntRange(min=0), default=10, show_default=True,
              help="How many of the most confidently wrong images to list.")
@click.option("--batch-size", type=IntRange(min=1), default=32, show_default=True, help="Images per batch.")
@click.option("--device", default="auto", show_default=True, help=DEVICE_HELP)
@click.option("--json", "as_json", is_flag=True, help="Print metrics.json instead of the text summary.")
@click.option("--overwrite", is_flag=True, default=False,
              help="--out holds an earlier report: replace it (only the report's files).")
def eval_cmd(model: str, data: Path, out: Path | None, tta: bool, tta_views: str, tta_scales: str | None,
             worst: int, batch_size: int, device: str, as_json: bool, overwrite: bool) -> None:
    """Evaluate MODEL (bundle folder or registry name) on the labelled images in --data.

    Writes metrics.json, per_class.csv, confusion.csv, confusion.png and wrong.csv (the most
    confidently wrong images) to --out.

    \b
    Examples:
      zoo eval my-classifier --data ./photos            # uses ./photos/test or ./photos/val if present
                                                        # (and warns when they are what the model learnt from)
      zoo eval my-classifier --data ./holdout --tta --out reports/
      zoo eval my-classifier --data ./holdout --tta --tta-scales 224,256,288   # ten-crop at 3 sizes
    """
    # lazy: zoo --help must not import torch, nor load these modules
    from finetune.engine import resolve_device
    from zoo.bundle import load_model
    from finetune.data.scan import hidden_note
    from zoo.evaluate import evaluate, folder_names, write_eval_reports
    from zoo.outdir import check_outside, claim_out

    scales = tta_scales_given(tta, tta_scales)
    given = out is not None
    out = out or _default_out(model)
    check_outside(out, data, given=given)
    with claim_out(out, "eval", overwrite=overwrite):     # refused before the model is loaded
        bundle = load_model(model, device=resolve_device(device))
        note_unmirrored_tta(tta, tta_views, scales, bundle.tta_mirror)
        report = evaluate(bundle.model, bundle.labels, bundle.data_config, data, tta=tta, tta_scales=scales,
                          tta_views=tta_views, batch_size=batch_size, progress=True, worst=max(worst, 20),
                          on_error=warn_skipped,
                          aliases=bundle.metadata.get("label_ids"), data_folders=bundle.metadata.get("data_folders"),
                          mirror=bundle.tta_mirror)
        report.weights_sha256 = bundle.metadata.get("weights_sha256")
        paths = write_eval_reports(report, out)
    if report.seen_in_training:
        echo(printable(_SEEN[report.seen_in_training].format(folder=Path(data) / report.split)), err=True)
    if report.hidden_folders:       # (the training scan's warning: eval skipped them without a word)
        echo(f"zoo: warning: {hidden_note(report.hidden_folders, str(data))}", err=True)
    if as_json:
        echo(json.dumps(report.to_dict(), indent=2))    # ASCII: echo escapes what is not printable, JSON stays valid
        return
    where = "the folder itself" if report.split == "." else f"its {report.split}/ split"
    echo(f"evaluated {report.n_images} images from {data} ({where})"
         + (f" with TTA ({report.tta_views}{'' if report.tta_mirror else ', no mirrored views'})"
            if report.tta else ""))
    if report.ignored_folders:
        echo("ignored folders that are not classes of the model: "
             + folder_names(report.ignored_folders[:10], report.labels))
    echo(f"accuracy: {accuracy_text(report.accuracy)}")
    if report.top5 is not None:
        echo(f"top-5:    {accuracy_text(report.top5)}")
    shown = list(report.per_class)
    if len(shown) > FULL_MAX_CLASSES:      # (QA: a line per class at 2,000 classes) the lowest recall first
        shown = lowest_first({c: v["recall"] for c, v in report.per_class.items()})[:SHOWN_CLASSES]
        echo(f"the {len(shown)} classes of lowest recall (all {len(report.per_class)}: per_class.csv):")
    for line in class_table(report.per_class, shown):
        echo(line)
    if len(shown) < len(report.per_class):
        echo(f"... and {len(report.per_class) - len(shown)} more classes")
    if report.wrong and worst:
        echo("most confidently wrong:")
        for w in report.wrong[:worst]:
            echo(f"  {probability_text(w['confidence']):>7} {printable(w['predicted'])} "
                 f"(true: {printable(w['true'])})  {printable(w['path'])}")
    for line in skipped_lines(report.skipped, report.unreadable_folders):
        echo(printable(line))
    echo(f"reports: {paths['metrics.json'].parent}")


def skipped_lines(skipped: list[tuple[str, str]], folders: list[tuple[str, str]]) -> list[str]:
    """The summary's lines for the images eval skipped and the folders it could not list (each is also a
    warning line as it is met): a folder is no skipped image, and its images are not counted at all."""
    from finetune.data.files import NOT_IMAGE_TYPE  # lazy: finetune.data imports torch (zoo --help must not)

    # (a file whose name is no image's is no unreadable image: the training scan's words for both)
    files = any(r.startswith(NOT_IMAGE_TYPE) for _, r in skipped)
    lines = [f"skipped {len(skipped)} unreadable {'or non-image file' if files else 'image'}(s)"] if skipped else []
    if folders:
        lines.append(f"could not read {len(folders)} folder(s), e.g. {folders[0][0]}: their images are not in the "
                     "accuracy; make them readable and evaluate again")
    return lines


def class_table(per_class: dict[str, dict], shown: list[str]) -> list[str]:
    """The per-class lines of ``zoo eval``: class, precision, recall, support, in columns that line up in a
    terminal whatever the class names hold (wide CJK characters, combining accents: :func:`zoo.text.cell_width`)."""
    names = {c: printable(c) for c in shown}
    width = max(8, *(cell_width(n) for n in names.values()))
    lines = [f"{'class':<{width}}  precision   recall  support"]
    for name in shown:
        v = per_class[name]
        prec, rec = accuracy_text(v["precision"]), accuracy_text(v["recall"])
        lines.append(f"{pad(names[name], width)}  {prec:>9}  {rec:>7}  {v['support']:>7}")
    return lines
