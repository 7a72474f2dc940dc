"""``zoo export``, ``zoo predict``, ``zoo eval``: thin click commands over zoo.bundle and zoo.predict.

No torch at import time: the library modules are imported inside the commands.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import click

from zoo.cli.app import cli
from zoo.cli.console import echo
from zoo.errors import UsageError
from zoo.text import printable

# zoo.predict.TTA_VIEWS / DEFAULT_TTA_VIEWS (that module imports torch; tests/zoo/test_predict.py checks these agree)
TTA_VIEWS = ("flip", "ten")
DEFAULT_TTA_VIEWS = "flip"

__all__ = ["export_cmd", "predict_cmd", "eval_cmd"]

_DEVICE_HELP = "Where to run: auto (CUDA when available), cpu, cuda, cuda:N, mps."


def _warn(item: object, reason: str) -> None:
    echo(printable(f"zoo: warning: skipped {item}: {reason}"), err=True)


@cli.command("export", short_help="Write a finetuned run as a portable bundle.")
@click.argument("run_dir", type=click.Path(file_okay=False, path_type=Path))
@click.option("--out", "out", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Bundle folder to write.  [default: RUN_DIR/export]")
@click.option("--format", "formats", type=click.Choice(["safetensors", "onnx"]), multiple=True,
              default=("safetensors",), show_default=True,
              help="Also write model.onnx (checked against PyTorch with onnxruntime). Repeatable.")
@click.option("--overwrite", is_flag=True, default=False,
              help="--out holds an earlier bundle: replace it (only the bundle's files).")
def export_cmd(run_dir: Path, out: Path | None, formats: tuple[str, ...], overwrite: bool) -> None:
    """Export RUN_DIR (a `zoo finetune` run folder) as model.safetensors + config.json + README.md.

    The safetensors header carries architecture, classes, preprocessing, source weights and validation
    metrics; config.json has timm's layout, so `timm.create_model("local-dir:BUNDLE", pretrained=True)`
    rebuilds a linear-head model without zoo.

    --out must be new or empty (or an earlier bundle, with --overwrite); RUN_DIR/export, the run's own
    bundle, is replaced.

    \b
    Examples:
      zoo export runs/resnet50-20250101-120000 --out my-classifier
      zoo export runs/resnet50-20250101-120000 --format onnx
    """
    # lazy: not loaded at CLI start (keeps zoo --help fast)
    from zoo.bundle import export_run
    from zoo.outdir import claim_out

    formats = tuple(dict.fromkeys(("safetensors", *formats)))
    if not run_dir.is_dir():    # export_run's own message, before a RUN_DIR/export could be created
        export_run(run_dir, out, formats=formats)
    target = out if out is not None else run_dir / "export"
    # RUN_DIR/export is the run's own bundle: re-exporting (e.g. --format onnx) replaces it.
    with claim_out(target, "export", overwrite=overwrite or out is None):
        path = export_run(run_dir, target, formats=formats)
    files = sorted(p.name for p in path.iterdir() if p.is_file() and not p.name.startswith("."))
    echo(f"exported {run_dir} -> {path} ({', '.join(files)})")


@cli.command("predict", short_help="Classify images with a bundle or a pretrained model.")
@click.argument("model")
@click.argument("images", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("--topk", type=click.IntRange(min=1), default=5, show_default=True, help="Classes shown per image.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON document instead of text.")
@click.option("--tta", is_flag=True, help="Test-time augmentation: average the softmax over several views of "
              "each image (--tta-views).")
@click.option("--tta-views", type=click.Choice(TTA_VIEWS), default=DEFAULT_TTA_VIEWS, show_default=True,
              help="With --tta: flip = the centre view and its mirror; ten = four corners + centre and their "
                   "mirrors (ten-crop).")
@click.option("--tta-scales", default=None, metavar="S1,S2,...",
              help="With --tta: resize the shorter side to each size and ten-crop each (implies --tta-views "
                   "ten; e.g. 224,256,288).")
@click.option("--batch-size", type=click.IntRange(min=1), default=32, show_default=True, help="Images per batch.")
@click.option("--device", default="auto", show_default=True, help=_DEVICE_HELP)
def predict_cmd(model: str, images: tuple[Path, ...], topk: int, as_json: bool, tta: bool, tta_views: str,
                tta_scales: str | None, batch_size: int, device: str) -> None:
    """Top-k classes for each image (files or folders) from MODEL.

    MODEL is a bundle folder (from `zoo export`) or a registry name: a pretrained ImageNet model with
    ImageNet class names, to try before any finetuning. Unreadable images are skipped with a warning.

    \b
    Examples:
      zoo predict runs/resnet50-*/export cat.jpg dog.jpg
      zoo predict my-classifier ./photos --tta --json > predictions.json
      zoo predict efficientnet_lite0 chelsea.png --topk 3
    """
    # lazy: zoo --help must not import torch, nor load these modules
    from finetune.engine import resolve_device
    from zoo.bundle import load_model
    from zoo.predict import expand_images, parse_scales, predict_probs, topk as top

    scales = parse_scales(tta_scales)
    if scales and not tta:
        raise UsageError("--tta-scales needs --tta")
    paths, any_dir = expand_images(images)
    if not paths:
        raise UsageError(f"no images found in {', '.join(str(i) for i in images)}")
    bundle = load_model(model, device=resolve_device(device))
    kept, probs = predict_probs(bundle.model, paths, bundle.data_config, tta=tta, tta_scales=scales,
                                tta_views=tta_views, batch_size=batch_size, progress=any_dir, on_error=_warn)
    if not kept:
        raise UsageError(f"none of the {len(paths)} images could be read")
    results = top(probs, bundle.labels, topk)
    if as_json:
        doc = [{"image": str(paths[i]), "predictions": [{"label": lab, "prob": round(p, 6)} for lab, p in res]}
               for i, res in zip(kept, results)]
        echo(json.dumps(doc, indent=2, ensure_ascii=False))
        return
    for i, res in zip(kept, results):
        echo(printable(paths[i]))
        for lab, p in res:
            echo(f"  {p * 100:6.2f}%  {printable(lab)}")


def _default_out(model: str) -> Path:
    stamp = time.strftime("%Y%m%d-%H%M%S")
    p = Path(model)
    # Next to the bundle when MODEL is one; in the working directory for a registry model.
    return (p.resolve().parent / f"eval-{p.resolve().name}-{stamp}") if p.is_dir() else Path(f"eval-{stamp}")


@cli.command("eval", short_help="Accuracy, per-class metrics and confusion matrix on a labelled folder.")
@click.argument("model")
@click.option("--data", "data", required=True, type=click.Path(file_okay=False, exists=True, path_type=Path),
              help="Class-folder layout (<class>/<image>); its test/ or val/ split is used when present.")
@click.option("--out", "out", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Report folder.  [default: eval-<bundle>-<time> next to the bundle, or ./eval-<time>]")
@click.option("--tta", is_flag=True, help="Test-time augmentation: average the softmax over several views of "
              "each image (--tta-views).")
@click.option("--tta-views", type=click.Choice(TTA_VIEWS), default=DEFAULT_TTA_VIEWS, show_default=True,
              help="With --tta: flip = the centre view and its mirror; ten = four corners + centre and their "
                   "mirrors (ten-crop).")
@click.option("--tta-scales", default=None, metavar="S1,S2,...",
              help="With --tta: resize the shorter side to each size and ten-crop each (implies --tta-views "
                   "ten; e.g. 224,256,288).")
@click.option("--worst", type=click.IntRange(min=0), default=10, show_default=True,
              help="How many of the most confidently wrong images to list.")
@click.option("--batch-size", type=click.IntRange(min=1), default=32, show_default=True, help="Images per batch.")
@click.option("--device", default="auto", show_default=True, help=_DEVICE_HELP)
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
      zoo eval my-classifier --data ./holdout --tta --out reports/
      zoo eval my-classifier --data ./holdout --tta --tta-scales 224,256,288   # ten-crop at 3 sizes
    """
    # lazy: zoo --help must not import torch, nor load these modules
    from finetune.engine import resolve_device
    from zoo.bundle import load_model
    from zoo.evaluate import evaluate, write_eval_reports
    from zoo.outdir import claim_out
    from zoo.predict import parse_scales

    scales = parse_scales(tta_scales)
    if scales and not tta:
        raise UsageError("--tta-scales needs --tta")
    out = out or _default_out(model)
    with claim_out(out, "eval", overwrite=overwrite):     # refused before the model is loaded
        bundle = load_model(model, device=resolve_device(device))
        report = evaluate(bundle.model, bundle.labels, bundle.data_config, data, tta=tta, tta_scales=scales,
                          tta_views=tta_views, batch_size=batch_size, progress=True, worst=max(worst, 20),
                          on_error=_warn,
                          aliases=bundle.metadata.get("label_ids"))
        paths = write_eval_reports(report, out)
    if as_json:
        echo(json.dumps(report.to_dict(), indent=2, ensure_ascii=False))
        return
    where = "the folder itself" if report.split == "." else f"its {report.split}/ split"
    echo(f"evaluated {report.n_images} images from {data} ({where})"
         + (f" with TTA ({report.tta_views})" if report.tta else ""))
    if report.ignored_folders:
        echo("ignored folders that are not classes of the model: "
             + ", ".join(printable(f) for f in report.ignored_folders[:10]))
    echo(f"accuracy: {report.accuracy * 100:.2f}%")
    if report.top5 is not None:
        echo(f"top-5:    {report.top5 * 100:.2f}%")
    names = {c: printable(c) for c in report.per_class}
    width = max(8, *(len(n) for n in names.values()))
    echo(f"{'class':<{width}}  precision  recall  support")
    for name, v in report.per_class.items():
        prec = "-" if v["precision"] is None else f"{v['precision'] * 100:.1f}%"
        rec = "-" if v["recall"] is None else f"{v['recall'] * 100:.1f}%"
        echo(f"{names[name]:<{width}}  {prec:>9}  {rec:>6}  {v['support']:>7}")
    if report.wrong and worst:
        echo("most confidently wrong:")
        for w in report.wrong[:worst]:
            echo(f"  {w['confidence'] * 100:5.1f}% {printable(w['predicted'])} (true: {printable(w['true'])})  "
                 f"{printable(w['path'])}")
    if report.skipped:
        echo(f"skipped {len(report.skipped)} unreadable image(s)")
    echo(f"reports: {paths['metrics.json'].parent}")
