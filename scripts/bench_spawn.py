"""A DataLoader worker's start under each start method: fork, forkserver (Python 3.14's default on Linux), spawn
(macOS's and Windows'). docs/benchmarks.md, "Worker processes" and "Workers under forkserver (helper-140)".

    python scripts/bench_spawn.py DATA_DIR [--rounds 3]                  # one loader, in this process
    python scripts/bench_spawn.py DATA_DIR --fresh [--rounds 3]          # zoo's loaders, a fresh process each
    python scripts/bench_spawn.py DATA_DIR --zoo finetune [--rounds 3]   # a whole tiny run (ZOO_REGISTRY: tiny32)

``--fresh`` and ``--zoo`` start a process per method and round, interleaved, with the start method set first (as
Python 3.14 sets forkserver on Linux). "forkserver-bare" is forkserver with the server started by the program
before zoo makes a loader (its default preload, ``__main__`` only): zoo leaves such a server alone, so each of
its workers imports torch and the package itself, as zoo's own server did before helper-140.
"""
from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import statistics
import subprocess
import sys
import tempfile
import time

import torch

from finetune.data import ImageDataset, scan_folder
from finetune.data.transforms import build_transform

DATA_CONFIG = {"input_size": (3, 32, 32), "interpolation": "bilinear", "crop_pct": 1.0, "crop_mode": "center",
               "mean": (0.5,) * 3, "std": (0.5,) * 3}
METHODS = ("fork", "forkserver", "forkserver-bare", "spawn")
# a child runs as `python -c`, as zoo's console script does without torch: a forkserver's default preload
# (``__main__``) then imports nothing of torch
CHILD = (f"import sys; sys.path.insert(0, {os.path.dirname(os.path.abspath(__file__))!r}); "
         "import bench_spawn; bench_spawn.main()")


def one_pass(dataset, workers: int, method: str | None) -> tuple[float, float]:
    """(seconds to the first batch, seconds for the whole pass, workers joined)."""
    context = multiprocessing.get_context(method) if workers else None
    loader = torch.utils.data.DataLoader(dataset, batch_size=8, num_workers=workers, multiprocessing_context=context)
    t = time.perf_counter()
    it = iter(loader)
    next(it)
    first = time.perf_counter() - t
    for _ in it:
        pass
    del it
    return first, time.perf_counter() - t


def zoo_loaders(data: str, workers: int) -> dict:
    """In this process (its start method already set): zoo's training loader with ``workers`` workers, the first
    batch, the first epoch and the second (persistent workers); then a second loader's first batch (the
    validation loader's start, with the forkserver already running)."""
    from finetune.data import close_loader, make_loader, set_loader_epoch

    dataset = ImageDataset(scan_folder(data, val_split=0.25, seed=0).train, build_transform(DATA_CONFIG, False))
    found = {}
    loader = make_loader(dataset, 8, train=True, workers=workers)
    for epoch in (0, 1):
        set_loader_epoch(loader, epoch, 2)
        t = time.perf_counter()
        it = iter(loader)
        next(it)
        if epoch == 0:
            found["first_batch"] = time.perf_counter() - t
        for _ in it:
            pass
        found[f"epoch{epoch + 1}"] = time.perf_counter() - t
    second = make_loader(dataset, 8, train=True, workers=workers)
    set_loader_epoch(second, 0, 1)
    t = time.perf_counter()
    next(iter(second))
    found["second_loader_first_batch"] = time.perf_counter() - t
    close_loader(second)
    close_loader(loader)
    return found


def start(method: str) -> None:
    """Set the start method as a program (or Python 3.14) does; "forkserver-bare": start the server too."""
    multiprocessing.set_start_method(method.split("-")[0])
    if method == "forkserver-bare":
        from multiprocessing import forkserver
        forkserver.ensure_running()


def child(method: str, data: str, zoo_args: list[str]) -> None:
    start(method)
    if zoo_args:
        from zoo.cli import cli
        t = time.perf_counter()
        try:
            cli(zoo_args, prog_name="zoo")
        finally:
            print(json.dumps({"whole": time.perf_counter() - t}))
    else:
        print(json.dumps(zoo_loaders(data, 2)))


def interleaved(args, rest: list[str]) -> None:
    results: dict[str, list[dict]] = {m: [] for m in args.methods}
    for r in range(args.rounds):
        for method in args.methods:
            with tempfile.TemporaryDirectory() as scratch:
                zoo_args = []
                if args.zoo:
                    zoo_args = [args.zoo, *([] if args.zoo == "doctor" else ["tiny32"]), args.data,
                                "--out", os.path.join(scratch, "out"), *rest]
                    if args.zoo == "finetune":
                        zoo_args[2:2] = ["--data"]
                env = {**os.environ, "ZOO_HOME": os.path.join(scratch, "home")}
                t = time.perf_counter()
                done = subprocess.run([sys.executable, "-c", CHILD, args.data, "--child", method, "--", *zoo_args],
                                      env=env, capture_output=True, text=True, timeout=900)
                if done.returncode != 0:
                    raise SystemExit(done.stderr[-3000:])
                found = json.loads(done.stdout.strip().splitlines()[-1])
                found["process"] = time.perf_counter() - t
                results[method].append(found)
                print(r, method, {k: round(v, 2) for k, v in found.items()}, flush=True)
    for method, rounds in results.items():
        print(method, {k: f"median {statistics.median(x[k] for x in rounds):.2f} "
                          f"({', '.join(f'{x[k]:.2f}' for x in rounds)})" for k in rounds[0]})


def main() -> None:
    argv = sys.argv[1:]
    rest = argv[argv.index("--") + 1:] if "--" in argv else []
    argv = argv[:argv.index("--")] if "--" in argv else argv
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("data")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--fresh", action="store_true", help="zoo's loaders, a fresh process per method and round")
    parser.add_argument("--zoo", choices=("finetune", "doctor"), help="time a whole command; its options after --")
    parser.add_argument("--methods", nargs="+", default=list(METHODS))
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        child(args.child, args.data, rest)
    elif args.fresh or args.zoo:
        interleaved(args, rest)
    else:
        dataset = ImageDataset(scan_folder(args.data, val_split=0.25, seed=0).train,
                               build_transform(DATA_CONFIG, False))
        for _ in range(args.rounds):
            for method in ("fork", "spawn"):
                first, whole = one_pass(dataset, 1, method)
                _, main_process = one_pass(dataset, 0, None)
                print(f"{method}: first batch {first:.2f} s, pass {whole:.2f} s; main process pass "
                      f"{main_process:.3f} s, {len(dataset)} images")


if __name__ == "__main__":
    main()
