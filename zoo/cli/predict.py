"""``zoo predict``: top-k classes for images, from a bundle or a zoo model (optionally with test-time
augmentation). A thin command over zoo.predict; no torch at import."""
from __future__ import annotations

import json
import re

import click
from click.core import ParameterSource

from zoo.cli.app import cli
from zoo.cli.console import echo
from zoo.cli.options import IntRange
from finetune.core.io import UNLISTED_FOLDER, printable, printable_name
from finetune.core.metrics import probability_text, probability_value
from zoo.errors import UsageError

__all__ = ["predict_cmd", "tta_options", "tta_scales_given", "note_unmirrored_tta"]


# zoo.predict.TTA_VIEWS / DEFAULT_TTA_VIEWS (that module imports torch; tests/zoo/test_predict.py checks these agree);
# zoo eval uses them and DEVICE_HELP too
TTA_VIEWS = ("flip", "ten")
DEFAULT_TTA_VIEWS = "flip"


DEVICE_HELP = "Where to run: auto (CUDA, then Apple MPS, then CPU), cpu, cuda, cuda:N, mps."


def tta_options(func):
    """``--tta``, ``--tta-views`` and ``--tta-scales``: the same three options on zoo predict and zoo eval."""
    func = click.option("--tta-scales", default=None, metavar="S1,S2,...",
                        help="With --tta: resize the shorter side to each size and ten-crop each (implies "
                             "--tta-views ten; e.g. 224,256,288; at most 8 sizes of at most 2048).")(func)
    func = click.option("--tta-views", type=click.Choice(TTA_VIEWS), default=DEFAULT_TTA_VIEWS, show_default=True,
                        help="With --tta: flip = the centre view and its mirror; ten = four corners + centre and "
                             "their mirrors (ten-crop). A model trained without mirrored images (--hflip 0, "
                             "--augment none) gets no mirrored view.")(func)
    return click.option("--tta", is_flag=True, help="Test-time augmentation: average the softmax over several "
                        "views of each image (--tta-views).")(func)


def tta_scales_given(tta: bool, tta_scales: str | None) -> tuple[int, ...] | None:
    """``--tta-scales`` as sizes, after refusing ``--tta-views`` or ``--tta-scales`` typed without ``--tta``
    (they would be ignored without a word)."""
    # lazy: zoo.predict imports torch
    from zoo.predict import parse_scales

    scales = parse_scales(tta_scales)
    source = click.get_current_context().get_parameter_source("tta_views")
    for flag, given in (("--tta-views", source in (ParameterSource.COMMANDLINE, ParameterSource.ENVIRONMENT)),
                        ("--tta-scales", bool(scales))):
        if given and not tta:
            raise UsageError(f"{flag} needs --tta")
    return scales


def note_unmirrored_tta(tta: bool, views: str, scales: tuple[int, ...] | None, mirror: bool) -> None:
    """With TTA on a model that never saw a mirrored image (its mirror may be another class: a digit, a
    letter), say that the mirrored views are left out and what TTA then averages."""
    if not (tta or scales) or mirror:
        return
    what = ("five crops per scale" if scales else "the five crops" if views == "ten"
            else "the plain view alone, as without --tta (--tta-views ten averages five crops)")
    echo("note: this model was trained without mirrored images (--hflip 0, --augment none, or the run found "
         f"the images handed), so TTA leaves the mirrored views out: {what}", err=True)


def warn_skipped(item: object, reason: str) -> None:
    """One warning line for an image that predict or eval skipped; a reason that names the image already
    (the readers' "X is not a readable image; ...", "cannot decode X: ...") is not prefixed with its name a
    second time. Named means as the readers name a file, not anywhere in the text: a short name ("e", "image")
    is in many a reason that names no file ("OSError: image file is truncated")."""
    name = str(item)
    named = any(re.search(rf"(?:^|\s){re.escape(n)}(?: is | has |: | \(|$)", reason)
                for n in {name, printable_name(name)})
    said = reason if named else f"{name}: {reason}"
    what = "folder" if reason.startswith(UNLISTED_FOLDER) else "image"   # (a folder walk_files cannot list)
    echo(printable(f"zoo: warning: {what} skipped: {said}"), err=True)


@cli.command("predict", short_help="Classify images with a bundle or a pretrained model.")
@click.argument("model")
@click.argument("images", nargs=-1, required=True, type=click.Path())   # (str: Path("") would be ".")
@click.option("--topk", type=IntRange(min=1), default=5, show_default=True, help="Classes shown per image.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON document instead of text.")
@tta_options
@click.option("--batch-size", type=IntRange(min=1), default=32, show_default=True, help="Images per batch.")
@click.option("--device", default="auto", show_default=True, help=DEVICE_HELP)
def predict_cmd(model: str, images: tuple[str, ...], topk: int, as_json: bool, tta: bool, tta_views: str,
                tta_scales: str | None, batch_size: int, device: str) -> None:
    """Top-k classes for each image (files or folders; - reads one image from stdin) from MODEL.
    A quoted pattern ('photos/**/*.jpg', 'photos/*') is expanded to the images it matches, folders walked.

    MODEL is a bundle folder (from `zoo export`) or a registry name: a pretrained ImageNet model with
    ImageNet class names, to try before any finetuning. Unreadable images are skipped with a warning.

    \b
    Examples:
      zoo predict runs/resnet50-*/export cat.jpg dog.jpg
      zoo predict my-classifier ./photos --tta --json > predictions.json
      zoo predict efficientnet_lite0 chelsea.png --topk 3
      curl -s https://example.com/cat.jpg | zoo predict my-classifier -
    """
    # lazy: zoo --help must not import torch, nor load these modules
    from finetune.engine import resolve_device
    from zoo.bundle import load_model
    from finetune.data.scan import hidden_note
    from zoo.predict import expand_images, predict_probs, topk as top
    from tqdm.auto import tqdm

    scales = tta_scales_given(tta, tta_scales)
    unlisted: list[tuple[str, str]] = []
    others: list[tuple[str, str]] = []      # files of the folders not named as images (a phone's HEIC photos)
    hidden: list[tuple[str, int]] = []     # hidden folders holding images: skipped, as the training scan skips them
    paths, any_dir = expand_images(images, unlisted, others, hidden)
    for folder, reason in unlisted:     # (a chmod 000 folder: its images were left out without a word, QA)
        warn_skipped(folder, reason)
    first, why = others[0] if others else ("", "")
    hid = hidden_note(hidden, ".") if hidden else ""      # (the training scan's and zoo eval's words)
    if not paths:
        raise UsageError(f"no images found in {', '.join(str(i) for i in images)}"
                         + (f": its {len(others)} file(s) are not named as images zoo reads, e.g. {first} ({why}); "
                            "convert them to JPEG or PNG" if others else "") + (f" ({hid})" if hid else ""))
    if hid:
        echo(f"zoo: warning: {hid}", err=True)
    if others:                          # as the training scan says them (QA: left out without a word)
        echo(printable(f"zoo: warning: left out {len(others)} file(s) not named as images zoo reads, e.g. {first} "
                       f"({why})"), err=True)
    bundle = load_model(model, device=resolve_device(device))
    note_unmirrored_tta(tta, tta_views, scales, bundle.tta_mirror)
    reasons: list[str] = []     # of the skipped images, in input order

    def skipped(item: object, reason: str) -> None:
        reasons.append(reason)
        warn_skipped(item, reason)

    def printed(indices: list[int], probs) -> None:     # text: each batch as soon as it is predicted
        with tqdm.external_write_mode():                 # above a folder's progress bar, not through it
            for i, res in zip(indices, top(probs, bundle.labels, topk)):
                echo(printable(paths[i]))
                for lab, p in res:
                    echo(f"  {probability_text(p):>7}  {printable(lab)}")

    kept, probs = predict_probs(bundle.model, paths, bundle.data_config, tta=tta, tta_scales=scales,
                                tta_views=tta_views, batch_size=batch_size, progress=any_dir, on_error=skipped,
                                mirror=bundle.tta_mirror, on_batch=None if as_json else printed)
    if not kept:
        raise UsageError(f"none of the {len(paths)} images could be read")
    if as_json:
        results = top(probs, bundle.labels, topk)
        # every image given, in order: a skipped one with no predictions and the reason (a script reading the
        # document sees what was not classified, not only stderr)
        found = {i: [{"label": lab, "prob": probability_value(p)} for lab, p in res] for i, res in zip(kept, results)}
        errors = iter(reasons)
        doc = [{"image": printable_name(str(path)),       # a name that is not UTF-8: \xNN, as in every zoo file
                "predictions": found[i]} if i in found else
               {"image": printable_name(str(path)), "predictions": [], "error": printable(next(errors, "unreadable"))}
               for i, path in enumerate(paths)]
        echo(json.dumps(doc, indent=2))    # ASCII: echo escapes what is not printable, the JSON stays valid
