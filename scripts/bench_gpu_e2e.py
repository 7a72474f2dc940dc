#!/usr/bin/env python
"""Whole-process checks of `zoo finetune` where users run it, as one command (issue 23), printing one
markdown table for docs/benchmarks.md:

* exit: `torchrun --nproc-per-node 1 -m zoo finetune ...` (full network, 2 epochs): seconds from the
  job's last line of output to its exit;
* small job: the default run (head only on cached features) on 45 train + 18 val JPEGs, 9 classes,
  EfficientNet-Lite0 (the packaged ImageNet weights when ``--lite0-weights`` names them, else random init:
  the same work), whole process; its feature pass's images/s;
* big job: ResNet-50 from scratch, 224 px, batch 256, ``--freeze none --head-epochs 0 --epochs 4`` on
  10,240 train + 2,048 val JPEGs of about 500x375, whole process and training images/s per epoch, for
  each decode path (and, within the time budget, variants: cudnn autotuning off, ``--compile``); timm's
  own ``train.py`` on the same folder with its usual GPU flags (``--timm-train``: a copy of it, not part
  of this project: see docs/benchmarks.md); the step ceiling: the same training step on tensors already
  on the GPU.

    python3 scripts/bench_gpu_e2e.py --out /tmp/gpu --timm-train .peers/timm_train.py \
        --lite0-weights .peers/efficientnet-lite0-57934424.pth          # on the GPU machine (~5 min)
    python3 scripts/bench_gpu_e2e.py --device cpu --tiny --out /tmp/smoke    # every path, in a minute

No network: models are built by timm, JPEGs are generated. Each run's log lands in --out.
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import shutil
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def say(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def run_timed(cmd: list[str], log: Path, env: dict | None = None, timeout: float = 600) -> dict:
    """Run ``cmd`` (output to ``log``, and each line with its second since the start to ``log`` .times: the
    process's timeline, e.g. when the scan, the model and each epoch were done): exit code, whole-process
    seconds, seconds from the last line of output to the exit."""
    t0 = time.monotonic()
    proc = subprocess.Popen(cmd, cwd=ROOT, env={**os.environ, **(env or {})}, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    last = [t0]
    with open(log, "w", encoding="utf-8") as fh, open(log.with_suffix(".times"), "w", encoding="utf-8") as times:
        def read() -> None:
            for line in proc.stdout:      # type: ignore[union-attr]
                fh.write(line)
                last[0] = time.monotonic()
                times.write(f"{last[0] - t0:8.2f}  {line}")

        reader = threading.Thread(target=read, daemon=True)
        reader.start()
        try:
            code = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            code = -9
        end = time.monotonic()
        reader.join(timeout=5)
    say(f"  {' '.join(cmd[:6])} ... -> exit {code} in {end - t0:.1f}s (last line {end - last[0]:.1f}s before)")
    return {"code": code, "seconds": end - t0, "exit_lag": end - last[0], "log": log.name}


def zoo_cmd(*args: str, python_prelude: str | None = None) -> list[str]:
    if python_prelude:     # e.g. an internal policy changed for one measured variant
        return [sys.executable, "-c", f"{python_prelude}\nfrom zoo.cli import main\nmain()", *args]
    return [sys.executable, "-m", "zoo", *args]


# ------------------------------------------------------------------------------------------ data
def small_folder(root: Path, size: int) -> Path:
    """45 train + 18 val JPEGs, 9 classes (the issue's small job)."""
    from PIL import Image

    from tests.conftest import make_image

    if (root / "val").is_dir():
        return root
    classes = [f"class{k}" for k in range(9)]
    for split, n in (("train", 5), ("val", 2)):
        for k, cls in enumerate(classes):
            for i in range(n):
                png = make_image(root / split / cls / f"{i}.png", k, size=size, rng=__import__("random").Random(i))
                Image.open(png).convert("RGB").save(png.with_suffix(".jpg"), quality=90)
                png.unlink()
    return root


def big_folder(root: Path, train: int, val: int, classes: int, size: tuple[int, int]) -> Path:
    from scripts_bench_gpu import write_jpegs      # type: ignore[import-not-found]

    if not (root / "val").is_dir():
        write_jpegs(root / "train", train, classes, size)
        write_jpegs(root / "val", val, classes, size)
    return root


def _import_bench_gpu() -> None:
    """scripts/bench_gpu.py's JPEG writer, imported as a module (scripts/ is not a package)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("scripts_bench_gpu", ROOT / "scripts" / "bench_gpu.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["scripts_bench_gpu"] = module
    spec.loader.exec_module(module)      # type: ignore[union-attr]


def profile_run(data: Path, run: Path, out: Path, env: dict, common: list[str], tiny: bool) -> dict:
    """The big job's ``--decode workers`` run, 2 epochs, under cProfile: where epoch 1's time goes (a GPU's
    first-use costs show up in the first calls of torch.conv2d, the backward pass, decode_jpeg...).
    Writes profile.txt: the top 40 functions by own time, then by cumulative time, then the training loop's
    own functions (epochs, evaluation, the warm-up before epoch 1) whatever their rank."""
    import io
    import pstats

    arch, batch = ("test_resnet", 16) if tiny else ("resnet50", 256)
    prof = out / "profile.prof"
    cmd = [sys.executable, "-m", "cProfile", "-o", str(prof), "-m", "zoo", "finetune", f"timm:{arch}", "--data",
           str(data), "--out", str(run), "--freeze", "none", "--head-epochs", "0", "--epochs", "2", "--batch-size",
           str(batch), "--no-export", "--quiet", "--decode", "workers", *common]
    r = run_timed(cmd, out / "profile.log", env)
    if prof.is_file():
        buf = io.StringIO()
        stats = pstats.Stats(str(prof), stream=buf)
        stats.sort_stats("tottime").print_stats(40)
        stats.sort_stats("cumulative").print_stats(40)
        stats.print_stats(r"engine/(steps|epoch_steps)\.py.*\((train_one_epoch|evaluate|warm_up|train_epoch)\)")
        (out / "profile.txt").write_text(buf.getvalue(), encoding="utf-8")
    r.update(name="zoo, --decode workers, 2 epochs under cProfile (profile.txt)", epochs=zoo_epochs(run))
    return r


# ---------------------------------------------------------------------------------------- results
def zoo_epochs(run: Path) -> list[dict]:
    path = run / "metrics.csv"
    if not path.is_file():
        return []
    return [{k: float(v or "nan") for k, v in row.items() if k in ("epoch", "images_per_s", "seconds", "data_wait")}
            for row in csv.DictReader(path.open(encoding="utf-8"))]


def timm_epochs(log: Path) -> list[float]:
    """Training images/s per epoch from train.py's log: the epoch average on each epoch's last batch line
    ('Train: E [ n/n (100%)] ... (0.115s, 2226.49/s)')."""
    import re

    rates: dict[int, float] = {}
    for line in log.read_text(encoding="utf-8", errors="replace").splitlines():
        m = re.match(r"Train: (\d+) \[.*\(100%\)\].*\(\s*[\d.]+s,\s*([\d.]+)/s\)", line)
        if m:
            rates[int(m.group(1))] = float(m.group(2))
    return [rates[k] for k in sorted(rates)]


def step_ceiling(device: str, arch: str, batch: int, size: int, steps: int) -> float:
    """Images/s of the training step alone (bf16 autocast, channels_last on CUDA), data already there."""
    import timm
    import torch

    dev = torch.device(device)
    model = timm.create_model(arch, num_classes=20).to(dev)
    cuda = dev.type == "cuda"
    if cuda:
        model = model.to(memory_format=torch.channels_last)
        torch.backends.cudnn.benchmark = True
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    x = torch.randn(batch, 3, size, size, device=dev)
    if cuda:
        x = x.contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 20, (batch,), device=dev)

    def step() -> None:
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=cuda):
            loss = torch.nn.functional.cross_entropy(model(x).float(), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    for _ in range(5):
        step()
    if cuda:
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    if cuda:
        torch.cuda.synchronize()
    return batch * steps / (time.perf_counter() - t0)


# ------------------------------------------------------------------------------------------- main
def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, required=True, help="folder for the logs, results.json and table.md")
    p.add_argument("--work", type=Path, default=None, help="folder for the generated data and runs [OUT/work]")
    p.add_argument("--device", default="cuda")
    p.add_argument("--tiny", action="store_true", help="tiny sizes: a smoke test of every path")
    p.add_argument("--timm-train", type=Path, default=None, help="a copy of timm's train.py (optional)")
    p.add_argument("--lite0-weights", type=Path, default=None, help="efficientnet-lite0-57934424.pth (optional)")
    p.add_argument("--budget", type=float, default=330.0, help="seconds; optional variants are skipped past it")
    p.add_argument("--only", default="", help="comma list of sections: exit,small,big (default all); profile "
                                             "(never by default: the big job under cProfile, profile.txt)")
    a = p.parse_args()
    t_start = time.monotonic()
    out = a.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    work = (a.work or out / "work").resolve()
    for old in work.glob("*") if work.is_dir() else []:     # the big JPEG folder is kept for a rerun
        if old.name != "big":
            shutil.rmtree(old, ignore_errors=True) if old.is_dir() else old.unlink()
    work.mkdir(parents=True, exist_ok=True)
    only = set(filter(None, a.only.split(",")))
    cuda = a.device.startswith("cuda")
    env = {"PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1", "TQDM_DISABLE": "1", "HF_HUB_OFFLINE": "1",
           "ZOO_OFFLINE": "1"}
    res: dict = {"device": a.device, "tiny": a.tiny}
    if cuda:
        import torch
        res["gpu"] = torch.cuda.get_device_name(0)
        res["versions"] = {"torch": torch.__version__, "cuda": torch.version.cuda}
    common = ["--device", a.device, "--no-pretrained"] if not a.tiny else ["--device", a.device, "--no-pretrained",
                                                                           "--workers", "0"]

    if not only or "exit" in only:
        say("== exit: torchrun --nproc-per-node 1, full network, 2 epochs")
        data = small_folder(work / "small", 64 if a.tiny else 160)
        model = "timm:test_resnet" if a.tiny else "timm:resnet18"
        torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "1"]
        r = run_timed([*torchrun, "-m", "zoo", "finetune", model, "--data", str(data), "--out", str(work / "exit"),
                       "--freeze", "none", "--epochs", "2", *common], out / "exit.log",
                      {**env, "ZOO_HOME": str(work / "home-exit")})
        res["exit"] = r

    if not only or "small" in only:
        say("== small job: the default run, 45 + 18 JPEGs, 9 classes")
        data = small_folder(work / "small", 64 if a.tiny else 160)
        res["small"] = []
        for i in range(1 if a.tiny else 2):      # a fresh ZOO_HOME each: the features computed, not loaded
            home = work / f"home-small{i}"
            model, extra = ("timm:test_resnet", ["--no-pretrained"]) if a.tiny else ("efficientnet_lite0", [])
            if not a.tiny and a.lite0_weights is not None:
                subprocess.run(zoo_cmd("import", "efficientnet_lite0", str(a.lite0_weights)), cwd=ROOT,
                               env={**os.environ, **env, "ZOO_HOME": str(home)}, check=True, capture_output=True)
            elif not a.tiny:
                model, extra = "timm:efficientnet_lite0", ["--no-pretrained"]
            r = run_timed(zoo_cmd("finetune", model, "--data", str(data), "--out", str(work / f"small{i}"),
                                  "--device", a.device, *extra), out / f"small{i}.log",
                          {**env, "ZOO_HOME": str(home)})
            text = (out / f"small{i}.log").read_text(encoding="utf-8")
            r["features"] = [ln.strip() for ln in text.splitlines() if ln.startswith("features:")]
            r["model"] = model
            res["small"].append(r)

    if not only or "big" in only:
        _import_bench_gpu()
        n_train, n_val, classes, size = (64, 32, 4, (100, 75)) if a.tiny else (10_240, 2_048, 20, (500, 375))
        arch, batch, px, epochs = ("test_resnet", 16, 64, 2) if a.tiny else ("resnet50", 256, 224, 4)
        say(f"== big job: {arch} from scratch, {n_train} + {n_val} JPEGs, batch {batch}, {epochs} epochs")
        t0 = time.monotonic()
        data = big_folder(work / "big", n_train, n_val, classes, size)
        res["big_data_seconds"] = time.monotonic() - t0
        res["ceiling"] = step_ceiling(a.device, arch, batch, px, 3 if a.tiny else 30)
        say(f"  step ceiling {res['ceiling']:.0f} img/s")
        base = ["finetune", f"timm:{arch}", "--data", str(data), "--freeze", "none", "--head-epochs", "0",
                "--epochs", str(epochs), "--batch-size", str(batch), "--no-export", *common]   # (epoch lines: .times)
        autotune = "import finetune.engine.runtime as r; r.CUDNN_AUTOTUNE_MIN_STEPS = 0"
        no_warm_up = "import finetune.engine.runtime as r; r.warms_up = lambda device: False"
        fewer = max(1, len(os.sched_getaffinity(0)) - 3)
        share = "import finetune.data.decode as d; d.WORKER_SHARE = 0.5"
        read_val = "import finetune.data.replay as r; r.BUDGET_BYTES = 0"     # validation decoded every epoch
        variants = [("zoo, --decode workers", ["--decode", "workers"], None, True),
                    ("zoo, --decode device", ["--decode", "device"], None, True),
                    # both decoders at once: the workers decode half the JPEGs (scripts/bench_gpu_parts.py)
                    ("zoo, --decode device, workers decode half the JPEGs", ["--decode", "device"], share, True),
                    # what keeping validation's batches after epoch 1 gives (finetune.data.replay, session 22)
                    ("zoo, --decode workers, validation decoded every epoch", ["--decode", "workers"], read_val, False),
                    # epoch 1 against the later ones: what the blank batches before it (steps.warm_up) give
                    ("zoo, --decode device, no warm-up before epoch 1", ["--decode", "device"], no_warm_up, False),
                    ("zoo, --decode device, cudnn autotune forced on", ["--decode", "device"], autotune, False),
                    # the default gives workers every core but one; does the training thread lack a core?
                    (f"zoo, --decode workers --workers {fewer} (3 cores left to the main process's threads)",
                     ["--decode", "workers", "--workers", str(fewer)], None, False),
                    ("zoo, --decode device --compile", ["--decode", "device", "--compile"], None, False)]
        res["big"] = []
        for k, (name, flags, prelude, core) in enumerate(variants):
            if not core and (a.tiny or time.monotonic() - t_start > a.budget):
                say(f"  skipped (budget): {name}")
                continue
            run = work / f"big{k}"
            r = run_timed(zoo_cmd(*base, "--out", str(run), *flags, python_prelude=prelude), out / f"big{k}.log",
                          {**env, "ZOO_HOME": str(work / "home-big")})
            r.update(name=name, epochs=zoo_epochs(run))
            res["big"].append(r)
            if k == 1 and a.timm_train is not None and a.timm_train.is_file():
                say("  timm train.py")
                tdir = work / "timm"
                cmd = [sys.executable, str(a.timm_train.resolve()), "--data-dir", str(data), "--train-split", "train",
                       "--val-split", "val", "--model", arch, "--num-classes", str(classes), "--epochs",
                       str(epochs), "-b", str(batch), "--output", str(tdir), "--log-interval", "1000000",
                       "--sched", "cosine", "--warmup-epochs", "0", "--lr", "0.1"]
                if cuda:
                    cmd += ["-j", str(max(1, (os.cpu_count() or 2) - 1)), "--amp", "--amp-dtype", "bfloat16",
                            "--channels-last", "--pin-mem"]
                else:
                    cmd += ["-j", "0", "--device", a.device, "--img-size", str(px)]
                r = run_timed(cmd, out / "timm.log", env)
                r.update(name="timm train.py", epochs=timm_epochs(out / "timm.log"))
                res["timm"] = r

    if "profile" in only:
        _import_bench_gpu()
        n_train, n_val, classes, size = (64, 32, 4, (100, 75)) if a.tiny else (10_240, 2_048, 20, (500, 375))
        say("== profile: the big job's --decode workers run under cProfile, 2 epochs")
        data = big_folder(work / "big", n_train, n_val, classes, size)
        res["big"] = [profile_run(data, work / "profile", out, {**env, "ZOO_HOME": str(work / "home-big")}, common,
                                  a.tiny)]

    (out / "results.json").write_text(json.dumps(res, indent=1, default=str))
    table = markdown(res)
    (out / "table.md").write_text(table)
    print(table)
    return 0


def markdown(res: dict) -> str:
    caches = ", ".join(f"{k}={os.environ[k]}" for k in ("PYTHONPYCACHEPREFIX", "MPLCONFIGDIR") if os.environ.get(k))
    lines = [f"device: {res.get('gpu', res['device'])} {res.get('versions', '')}"
             + (f"; caches: {caches}" if caches else ""), "",
             "| check | result |", "|---|---|"]
    if "exit" in res:
        e = res["exit"]
        lines.append(f"| torchrun --nproc-per-node 1, full network, 2 epochs | exit {e['code']}, whole process "
                     f"{e['seconds']:.1f} s, **exit {e['exit_lag']:.1f} s after the last line** |")
    for i, s in enumerate(res.get("small", [])):
        feats = "; ".join(f.split(" computed in ")[-1] if " computed in " in f else f for f in s["features"])
        lines.append(f"| small job {i + 1} ({s['model']}, 45 + 18 JPEGs, default) | exit {s['code']}, "
                     f"**{s['seconds']:.1f} s** whole process; features {feats} |")
    ceiling = res.get("ceiling")
    if ceiling:
        lines.append(f"| step ceiling (same step, data on the device) | {ceiling:,.0f} img/s |")
    for b in res.get("big", []):
        rates = [e["images_per_s"] for e in b["epochs"]]
        steady = statistics.median(rates[1:]) if len(rates) > 1 else (rates[0] if rates else 0.0)
        first = rates[0] if rates else 0.0
        per = " / ".join(f"{r:,.0f}" for r in rates)
        ratio = f"; steady {steady / ceiling:.2f}x ceiling, epoch 1 {first / max(steady, 1e-9):.2f}x steady" \
            if ceiling and rates else ""
        waits = " / ".join(f"{e.get('data_wait', float('nan')):.0%}" for e in b["epochs"])
        lines.append(f"| {b['name']} | exit {b['code']}, **{b['seconds']:.1f} s** whole process; train img/s per "
                     f"epoch {per}{ratio}; waiting for data {waits} |")
    if "timm" in res:
        t = res["timm"]
        zoo = next((b for b in res.get("big", []) if b["code"] == 0), None)
        vs = ""
        if zoo is not None:
            best = min(b["seconds"] for b in res["big"] if b["code"] == 0)
            vs = f"; best zoo row / timm = {best / t['seconds']:.2f}x"
        per = " / ".join(f"{r:,.0f}" for r in t.get("epochs", []))
        lines.append(f"| timm train.py, same folder and epochs | exit {t['code']}, **{t['seconds']:.1f} s** whole "
                     f"process; train img/s per epoch {per or 'n/a'}{vs} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
