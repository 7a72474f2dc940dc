"""Seeded fuzz of `zoo finetune`'s option combinations on tiny data (timm's test_resnet at 32 px, CPU).

Each run draws a random combination of the training options (edge values included: 0, 1, tiny batches, one
epoch, --patience 0, --warmup-epochs past --epochs, --val-split extremes, --lr auto, --overfit-batches, a
--config YAML holding some of them, --resume after a SIGINT, a few under torchrun) and checks the contract:
exit 0 with a bundle that `zoo eval` scores at the run's own final val accuracy, or a one-line refusal
(exit 1/2, no traceback); never a traceback, a NaN metric, or a resumed run whose metrics differ from the
uninterrupted one. One JSON line per run goes to WORK/results.jsonl; a summary of exits by kind at the end.

A share of the runs (--file-share, default 0: helper-132's draws as they were) is a `--config` file run of
zoo finetune, lr-find, sweep (tiny grids) or doctor instead: each option drawn, run-level keys too (model, data,
out, pretrained, export, exclude, fc_dropout, the command's own), goes in the file, on the line, or in both (then
with another value: the typed one must win, checked in what the run recorded: config.yaml, lr_find.json,
sweep.json, doctor.json, the folder it wrote); some file values are hostile (wrong types, null, lists, a file or a
missing folder for a path, `~`, relative paths: these runs start in WORK).

    python scripts/fuzz_options.py --seed 0 --runs 40 --work /tmp/fuzz            # runs 0..39 of seed 0
    python scripts/fuzz_options.py --seed 0 --start 40 --runs 40 --work /tmp/fuzz --wrap "flock L nice -n 10"
    python scripts/fuzz_options.py --seed 0 --only 17 --work /tmp/fuzz --keep      # rerun one, keep its folders
    python scripts/fuzz_options.py --seed 1 --runs 60 --file-share 1 --work /tmp/fuzz      # config-file runs only

A run's options depend only on (seed, index) and this file's tables, so a failure is reproduced by --only INDEX
(the results.jsonl line also holds the whole command).
"""
from __future__ import annotations

import argparse
import collections
import csv
import json
import math
import os
import random
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CHOICES = {
    "--sampler": ["random", "balanced"], "--class-weights": ["none", "auto"],
    "--augment": ["standard", "trivial", "none"],
    "--head": ["linear", "mlp"], "--mlp-activation": ["relu", "leaky_relu", "elu", "tanh"],
    "--freeze": ["auto", "head", "none", "0", "1", "2", "5", "9"], "--bn": ["eval", "train"],
    "--optimizer": ["adam", "sgd", "adamw", "rmsprop", "adagrad", "adadelta"],
    "--schedule": ["step", "exp", "inv", "cosine", "plateau", "none"], "--monitor": ["val_loss", "val_acc"],
    "--head-solver": ["lbfgs", "gradient"],
}
VALUES = {
    "--batch-size": [1, 2, 3, 4, 8, 32, 1000], "--micro-batch": [0, 1, 2, 3, 5], "--val-split": [0.01, 0.2, 0.5, 0.99],
    "--crop-scale-min": [0.01, 0.5, 1], "--hflip": [-1, 0, 1, 0.5], "--brightness": [0, 0.2, 10],
    "--contrast": [0, 10], "--mlp-hidden": [1, 7, 64], "--mlp-dropout": [0, 0.5, 0.99],
    "--small-per-class": [0, 1000], "--small-total": [0, 5], "--large-per-class": [0, 1],
    "--medium-stages": [0, 1, 9], "--head-epochs": [-1, 0, 1, 3], "--lr": ["auto", 1e-5, 1e-3, 0.1, 10],
    "--backbone-lr-mult": [0, 0.1, 1, 3], "--momentum": [0, 0.9, 0.999], "--weight-decay": [0, 1e-4, 1],
    "--warmup-epochs": [-1, 0, 0.5, 5], "--step-size": [1, 3], "--gamma": [0.01, 0.5, 0.999, 1, 5],
    "--epochs": [0, 1, 2, 3], "--patience": [0, 1, 5], "--min-delta": [0, 0.5], "--seed": [0, 1, 2**63 - 1],
    "--aug-views": [0, 1, 3], "--img-size": [0, 16, 48], "--label-smoothing": [0, 0.1, 0.99],
    "--mixup": [0, 0.2, 1], "--cutmix": [0, 0.5], "--ema": [-1, 0, 0.5, 0.999], "--layer-decay": [0.01, 0.7, 1],
    "--overfit-batches": [0, 0, 0, 1, 2],
}
FLAGS = ["--nesterov", "--no-fast-head", "--no-head-guard", "--strict", "--no-channels-last", "--no-export"]
# A config-file run's own keys per command (file spelling), beside the config options the command takes
OWN = {
    "finetune": {"model": ["tiny32"], "data": ["flat", "split"], "pretrained": [True, False],
                 "export": [True, False], "exclude": ["exclude.txt"], "fc_dropout": [0.3, 0]},
    "lr-find": {"model": ["tiny32"], "data": ["flat", "split"], "pretrained": [True, False], "start_lr": [1e-6, 1e-4],
                "end_lr": [1, 10], "steps": [5, 8], "method": ["valley", "steepest"], "smooth": [0, 0.5],
                "diverge_factor": [2, 100]},
    "sweep": {"model": ["tiny32"], "data": ["flat", "split"], "pretrained": [True, False],
              "lr": ["0.01", "0.001,0.1", "1e-3:1e-1:2"], "weight_decay": ["0", "0,1e-4"],
              "freeze": ["head", "none", "head,1"], "optimizer": ["adam", "sgd,adam"], "epochs": [1, 2],
              "folds": [0, 2], "keep_runs": [True]},
    "doctor": {"data": ["flat", "split"], "model": ["tiny32"], "near": [0.9, 0.99], "near_pixels": [0.9, 0.99],
               "folds": [2, 5], "outlier_z": [1, 5], "min_side": [8, 64], "max_aspect": [2, 3], "seed": [0, 3],
               "val_split": [0.2, 0.5], "batch_size": [1, 4, 32]},
}
POSITIONAL = {"finetune": "model", "lr-find": "model", "sweep": "model", "doctor": "data"}
HOSTILE = [None, [1, 2], {"a": 1}, "abc", True, "", "~", "~/zoo-fuzz-missing", 1e400]
HOSTILE_PATH = ["registry.yaml", "missing/folder", "~", "~/zoo-fuzz-missing", "flat/cat/cat_000.png", 7]
PATHS = ("data", "out", "exclude")


def setup(work: Path) -> dict:
    """A registry with the tiny model, a flat folder (3 classes x 8) and a train/val folder (4 x 6+3)."""
    sys.path.insert(0, str(ROOT))
    from tests.conftest import make_image_folder, tiny_entry, tiny_weights, write_registry  # lazy: test helpers

    work.mkdir(parents=True, exist_ok=True)
    weights = work / "tiny32.safetensors"
    if not weights.exists():
        weights.write_bytes(tiny_weights())
        source = {"kind": "file", "path": str(weights), "sha256": None, "sha256_note": "fuzz"}
        write_registry(work / "registry.yaml", [tiny_entry("tiny32", source)])
        make_image_folder(work / "flat", per_class=8)
        make_image_folder(work / "split", classes=("a", "b", "c", "d"), per_class=6, layout="split", val_per_class=3)
    (work / "exclude.txt").write_text("cat/cat_000.png\n")      # (a config-file run's exclude: one flat image)
    (work / "fakehome").mkdir(exist_ok=True)                       # (a `~` that some code expands stays in WORK)
    env = dict(os.environ, ZOO_HOME=str(work / "home"), ZOO_REGISTRY=str(work / "registry.yaml"),
               HOME=str(work / "fakehome"),
               OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONPATH=str(ROOT), TQDM_DISABLE="1")
    env.pop("ZOO_DEBUG", None)
    return env


def draw(seed: int, index: int, file_share: float = 0.0) -> dict:
    """The options of run ``index``: a handful of random options, a mode (plain, config, resume, torchrun); or,
    for a ``file_share`` of the indices, a config-file run of some command (:func:`draw_file`)."""
    frng = random.Random(f"{seed}-{index}-file")
    if frng.random() < file_share:
        return draw_file(frng, index)
    rng = random.Random(f"{seed}-{index}")
    opts: dict[str, object] = {}
    names = list(CHOICES) + list(VALUES)
    for name in rng.sample(names, rng.randint(2, 9)):
        opts[name] = rng.choice(CHOICES.get(name) or VALUES[name])
    if "--freeze" not in opts and rng.random() < 0.6:      # auto is head-only on data this small
        opts["--freeze"] = rng.choice(["none", "1", "2"])
    for flag in FLAGS:
        if rng.random() < 0.12:
            opts[flag] = True
    if "--epochs" not in opts or opts["--epochs"] == 0:
        opts["--epochs"] = rng.choice([1, 2, 3])        # 0 = auto is 8-30 epochs: kept for a few runs only
        if rng.random() < 0.05:
            opts["--epochs"] = 0
    mode = rng.choices(["plain", "config", "resume", "torchrun"], [70, 15, 10, 5])[0]
    if mode == "resume":
        opts["--epochs"] = 4
        opts.pop("--overfit-batches", None)
        opts.pop("--no-export", None)
    return {"index": index, "data": rng.choice(["flat", "split"]), "opts": opts, "mode": mode,
            "config_keys": rng.sample(sorted(set(opts) - {"--no-export"}), len(opts) // 2) if mode == "config" else []}


def command_keys(command: str) -> set[str]:
    """The long options of `zoo COMMAND`, spelt as a --config file's keys."""
    sys.path.insert(0, str(ROOT))
    from zoo.cli import cli  # lazy: only a config-file run asks the command what it takes

    return {o[2:].replace("-", "_") for p in cli.commands[command].params for o in p.opts if o.startswith("--")}


def draw_file(rng: random.Random, index: int) -> dict:
    """A config-file run: the command, the file's mapping and the line's (keys in file spelling; a key in both
    holds another value in the file, which the typed one must beat)."""
    command = rng.choices(list(OWN), [40, 20, 20, 20])[0]
    pool = dict(OWN[command])
    if command != "doctor":
        takes = command_keys(command)
        others = {n[2:].replace("-", "_"): v for n, v in {**CHOICES, **VALUES}.items()}
        picked = rng.sample(sorted(k for k in others if k in takes and k not in pool), rng.randint(1, 6))
        pool.update({k: others[k] for k in picked})
    odds = {"model": 0.95, "data": 0.95, "fc_dropout": 0.1}      # (tiny32 is no VGG: an fc_dropout is refused)
    chosen = [k for k in pool if k not in OWN[command] or rng.random() < odds.get(k, 0.5)]
    small = {"finetune": ("epochs", [1, 2]), "lr-find": ("steps", [5, 8]), "sweep": ("epochs", [1, 2])}.get(command)
    if small and small[0] not in chosen:
        chosen.append(small[0])
        pool[small[0]] = small[1]
    pool.update(out=[f"run{index}"], device=["cpu"], workers=[0], quiet=[True])
    file, line = {}, {}
    for key in chosen + ["out", "device", "workers", "quiet"]:
        where = rng.choices(["file", "line", "both"], [45, 40, 15])[0]
        value = rng.choice(pool[key])
        if small and key == small[0] and not value:
            value = 1
        if where != "file":
            line[key] = value
        if where != "line":
            others = [v for v in pool[key] if v != value] or ([not value] if isinstance(value, bool) else [value])
            file[key] = rng.choice(others) if where == "both" else value
            if key == "out" and where == "both":
                file[key] = f"run{index}-file"
            if rng.random() < 0.08:
                file[key] = rng.choice(HOSTILE_PATH if key in PATHS else HOSTILE)
    return {"index": index, "mode": "file", "command": command, "file": file, "line": line}


def line_args(command: str, line: dict) -> list[str]:
    """The typed part of a config-file run: the positional (MODEL, doctor's DIR) first, then the flags."""
    pos = POSITIONAL[command]
    args = [command] + ([str(line[pos])] if pos in line else [])
    for key, value in line.items():
        flag = "--" + key.replace("_", "-")
        if key != pos:
            args += [flag] if value is True else ["--no-" + flag[2:]] if value is False else [flag, str(value)]
    return args


def argv_of(opts: dict) -> list[str]:
    out = []
    for k, v in opts.items():
        out += [k] if v is True else [k, str(v)]
    return out


def zoo(env: dict, wrap: list[str], args: list[str], timeout: float, torchrun: bool = False, cwd: Path = ROOT):
    if torchrun:
        head = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "-m", "zoo"]
    else:
        head = [sys.executable, "-m", "zoo"]
    try:
        p = subprocess.run(wrap + head + args, env=env, capture_output=True, text=True, timeout=timeout, cwd=cwd)
        return p.returncode, p.stdout, p.stderr
    except subprocess.TimeoutExpired as e:
        return "timeout", str(e.stdout or ""), str(e.stderr or "")


def interrupted_then_resumed(env, wrap, args, out: Path, timeout: float):
    """Start the run, SIGINT it once metrics.csv holds an epoch, then --resume it; the resume's (rc, out, err)."""
    p = subprocess.Popen(wrap + [sys.executable, "-m", "zoo"] + args, env=env, cwd=ROOT, start_new_session=True,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    t0, sent = time.time(), False
    while p.poll() is None and time.time() - t0 < timeout:
        metrics = out / "metrics.csv"
        if not sent and metrics.exists() and len(metrics.read_text().splitlines()) >= 2:
            os.killpg(p.pid, signal.SIGINT)      # the whole group: flock/nice pass it on like a terminal's Ctrl-C
            sent = True
        time.sleep(0.05)
    if p.poll() is None:
        os.killpg(p.pid, signal.SIGKILL)
    _, err = p.communicate()
    if not sent:
        return "not-interrupted", "", err
    if p.returncode == 0:
        return "finished-before-interrupt", "", err
    return zoo(env, wrap, ["finetune", "--resume", str(out), "--device", "cpu", "--workers", "0", "--quiet"], timeout)


def val_folder(run: Path, data: Path, dest: Path) -> Path:
    """The run's validation images as DIR/<class>/* (a split layout's val/ as it is)."""
    split = json.loads((run / "split.json").read_text())
    if split.get("layout") != "flat":
        return data
    for rel, cls in split["val"]:
        target = dest / cls / Path(rel).name
        target.parent.mkdir(parents=True, exist_ok=True)
        if not target.exists():
            target.symlink_to(data / rel)
    return dest


def metric_rows(run: Path) -> list[tuple]:
    with open(run / "metrics.csv") as f:
        return [(r["epoch"], r["phase"], r["train_loss"], r["val_loss"], r["val_acc"]) for r in csv.DictReader(f)]


def classify(rc, out: str, err: str, torchrun: bool = False) -> tuple[str, str]:
    text = out + err
    launcher = text.find("Traceback")
    if torchrun and launcher >= 0 and text.count("Traceback") == 1 and "ChildFailedError" in text[launcher:]:
        # torchrun's own summary of ranks that exited non-zero (its exit code 1): what the ranks printed is above it
        text, err, rc = text[:launcher], err[:max(0, err.find("Traceback"))], 1
    if rc == "timeout":
        return "timeout", ""
    if "Traceback" in text:
        return "traceback", text[text.index("Traceback"):][-1500:]
    if rc == 0:
        bad = [ln for ln in text.splitlines() if "nan" in ln.lower().split() or " nan" in ln.lower()
                                                          or "nan%" in ln.lower()]
        return ("nan-printed", "\n".join(bad[:3])) if bad else ("ok", "")
    if rc == 1 and "overfit pass" in text and "zoo: error" not in text:     # --overfit-batches' verdict: not passed
        return "overfit-not-passed", text.strip().splitlines()[-1]
    if rc in (1, 2):     # (click's own usage errors: `Usage: ...`, `Try ...`, then the one `Error: ...` line)
        errors = [ln for ln in text.splitlines() if ln.startswith("zoo: error")
                  or ln.startswith("Error: ") and text.startswith("Usage: ")]
        return ("refused", errors[0]) if len(errors) == 1 else ("refusal-not-one-line", err[-800:])
    return f"exit-{rc}", err[-800:]


def check_run(spec: dict, env: dict, wrap: list[str], work: Path, timeout: float) -> dict:
    idx, data = spec["index"], work / spec["data"]
    run = work / f"run{idx}"
    shutil.rmtree(run, ignore_errors=True)
    opts = dict(spec["opts"])
    base = ["finetune", "tiny32", "--data", str(data), "--out", str(run), "--device", "cpu", "--workers", "0"]
    if spec["config_keys"]:
        import yaml  # lazy: only the config mode writes YAML

        cfg = {k[2:].replace("-", "_"): (v if v is not True else True) for k, v in opts.items()
               if k in spec["config_keys"]}
        cfg = {(k[3:] if k.startswith("no_") else k): (False if k.startswith("no_") else v) for k, v in cfg.items()}
        (work / f"cfg{idx}.yaml").write_text(yaml.safe_dump(cfg))
        opts = {k: v for k, v in opts.items() if k not in spec["config_keys"]}
        base += ["--config", str(work / f"cfg{idx}.yaml")]
    args = base + argv_of(opts)
    result = {"index": idx, "mode": spec["mode"], "cmd": "zoo " + shlex.join(args)}
    t0 = time.time()
    rc, out, err = zoo(env, wrap, args, timeout, torchrun=spec["mode"] == "torchrun")
    kind, detail = classify(rc, out, err, torchrun=spec["mode"] == "torchrun")
    if kind == "ok" and "--overfit-batches" in opts and opts["--overfit-batches"]:
        kind = "ok-overfit"
    elif kind == "ok" and (run / "export").is_dir():
        kind, detail = check_bundle(run, data, env, wrap, work, timeout)
    if kind == "ok" and spec["mode"] == "resume":
        kind, detail = check_resume(run, args, env, wrap, timeout)
    result.update(rc=rc, kind=kind, detail=detail, seconds=round(time.time() - t0, 1))
    return result


def check_file_run(spec: dict, env: dict, wrap: list[str], work: Path, timeout: float) -> dict:
    """Run a config-file run in WORK (its relative paths are WORK's): the contract, then the typed values won."""
    import yaml  # lazy: only the config-file runs write YAML

    idx, command = spec["index"], spec["command"]
    cfg = work / f"cfg{idx}.yaml"
    cfg.write_text(yaml.safe_dump(spec["file"]))
    args = line_args(command, spec["line"]) + ["--config", str(cfg)]
    result = {"index": idx, "mode": "file", "command": command, "cmd": "zoo " + shlex.join(args),
              "file": cfg.read_text()}
    t0 = time.time()
    rc, out, err = zoo(env, wrap, args, timeout, cwd=work)
    kind, detail = classify(rc, out, err)
    given = {**spec["file"], **spec["line"]}
    run = work / str(given.get("out"))
    if kind == "ok":
        kind, detail = typed_wins(spec, run, work)
    if kind == "ok" and command == "finetune" and given.get("overfit_batches"):
        kind = "ok-overfit"
    elif kind == "ok" and command == "finetune" and (run / "export").is_dir():
        kind, detail = check_bundle(run, work / str(given["data"]), env, wrap, work, timeout)
    result.update(rc=rc, kind=kind, detail=detail, seconds=round(time.time() - t0, 1))
    return result


def recorded(command: str, run: Path) -> dict:
    """What the finished run wrote of its options (file spelling), from its config.yaml, model.json, lr_find.json,
    sweep.json or doctor.json."""
    import yaml  # lazy: as above

    def load(name: str) -> dict:
        return (yaml.safe_load((run / name).read_text()) or {}) if (run / name).is_file() else {}

    rec = load("config.yaml") if command in ("finetune", "lr-find") else {}
    if command == "finetune":
        m = load("model.json")
        rec.update(model=m.get("model"), pretrained=m.get("pretrained"), export=(run / "export").is_dir())
    elif command == "lr-find":
        rec.update({k: v for k, v in load("lr_find.json").items() if k in ("model", "start_lr", "end_lr", "method")})
    elif command == "sweep":
        fixed = load("sweep.json").get("fixed", {})
        rec = {**fixed.get("config", {}), "folds": fixed.get("folds"), **fixed.get("identity", {})}
        rec.pop("data", None)       # (a hash of the data)
    elif command == "doctor":
        doc = load("doctor.json")
        o = doc.get("options", {})
        rec = {k: o.get(k) for k in ("folds", "seed", "outlier_z", "min_side", "max_aspect")}
        rec.update(near=o.get("near_threshold"), near_pixels=o.get("pixel_threshold"), model=doc.get("model"))
    return {k: v for k, v in rec.items() if v is not None}


def same(a, b) -> bool:
    try:
        return math.isclose(float(a), float(b), rel_tol=1e-9)
    except (TypeError, ValueError):
        return str(a).lower() == str(b).lower()


def typed_wins(spec: dict, run: Path, work: Path) -> tuple[str, str]:
    """Each key given in the file and typed too: the run recorded the typed value, and wrote no file's --out."""
    grids = ("lr", "weight_decay", "freeze", "optimizer") if spec["command"] == "sweep" else ()   # (sweep.json's grid)
    both = {k: v for k, v in spec["line"].items() if k in spec["file"] and str(v).lower() != "auto" and k not in grids}
    if "out" in both and str(spec["file"]["out"]).startswith("run") and (work / spec["file"]["out"]).exists():
        return "file-won", f"out: typed {both['out']}, the file's {spec['file']['out']} was written"
    rec = recorded(spec["command"], run)
    for key, typed in both.items():
        if key in rec and key not in PATHS and not same(rec[key], typed):
            return "file-won", f"{key}: typed {typed!r}, the file {spec['file'][key]!r}, the run recorded {rec[key]!r}"
    return "ok", ""


def check_bundle(run, data, env, wrap, work, timeout) -> tuple[str, str]:
    summary = json.loads((run / "summary.json").read_text())
    acc = summary.get("metrics", {}).get("val_acc")
    if acc is None or (isinstance(acc, float) and math.isnan(acc)):
        return "nan-summary", str(summary.get("metrics"))[:300]
    vdir = val_folder(run, data, work / f"val{run.name}")
    rc, out, err = zoo(env, wrap, ["eval", str(run / "export"), "--data", str(vdir), "--device", "cpu",
                                   "--out", str(run.parent / f"eval{run.name}"), "--overwrite", "--json"], timeout)
    if rc != 0:
        return "eval-failed", (err or out)[-600:]
    got = json.loads(out)["accuracy"]
    n = summary["metrics"].get("images")
    if round(got * n) != round(acc * n):
        return "bundle-differs", f"summary val_acc {acc} vs zoo eval {got} on {n} images"
    return "ok", ""


def check_resume(run, args, env, wrap, timeout) -> tuple[str, str]:
    rows = metric_rows(run)
    run2 = run.with_name(run.name + "-int")
    shutil.rmtree(run2, ignore_errors=True)
    args2 = [str(run2) if a == str(run) else a for a in args]
    rc, out, err = interrupted_then_resumed(env, wrap, args2, run2, timeout)
    if isinstance(rc, str):
        return ("ok" if rc in ("not-interrupted", "finished-before-interrupt") else rc), rc
    kind, detail = classify(rc, out, err)
    if kind != "ok":
        return "resume-" + kind, detail
    if metric_rows(run2) != rows:
        return "resume-differs", f"{rows} vs {metric_rows(run2)}"[:800]
    return "ok", ""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--start", type=int, default=0)
    ap.add_argument("--runs", type=int, default=20)
    ap.add_argument("--only", type=int, default=None, help="rerun this one index")
    ap.add_argument("--work", type=Path, default=Path("/tmp/zoo-fuzz"))
    ap.add_argument("--wrap", default="", help='prefix of every command, e.g. "flock /tmp/heavy.lock nice -n 10"')
    ap.add_argument("--timeout", type=float, default=300)
    ap.add_argument("--keep", action="store_true", help="keep the run folders")
    ap.add_argument("--print", action="store_true", help="print the drawn commands only")
    ap.add_argument("--file-share", type=float, default=0.0, help="share of config-file runs (finetune, lr-find, "
                    "sweep, doctor); 0: helper-132's draws")
    a = ap.parse_args()
    env = setup(a.work)
    wrap = shlex.split(a.wrap)
    indices = [a.only] if a.only is not None else range(a.start, a.start + a.runs)
    kinds = collections.Counter()
    with open(a.work / "results.jsonl", "a") as log:
        for i in indices:
            spec = draw(a.seed, i, a.file_share)
            label = spec.get("command", "finetune") + ("-file" if spec["mode"] == "file" else "")
            if a.print:
                print(i, spec["mode"], spec.get("data"), shlex.join(argv_of(spec["opts"])) if "opts" in spec else spec)
                continue
            res = (check_file_run if spec["mode"] == "file" else check_run)(spec, env, wrap, a.work, a.timeout)
            kinds[f"{label}:{res['kind']}"] += 1
            log.write(json.dumps(res) + "\n")
            log.flush()
            print(f"{i:4d} {label:13s} {res['kind']:22s} {res['seconds']:6.1f}s {res['detail'][:160]!r}",
                  flush=True)
            if not a.keep:
                for p in a.work.glob(f"*run{i}*"):
                    shutil.rmtree(p, ignore_errors=True)
                shutil.rmtree(a.work / f"valrun{i}", ignore_errors=True)
    print("exits by kind:", dict(kinds))


if __name__ == "__main__":
    main()
