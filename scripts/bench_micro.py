"""What ``--micro-batch`` costs and saves: one training epoch of a timm network on synthetic images, each setting in
its own process (so that each one's peak memory is its own), rounds interleaved; BatchNorm in eval mode (zoo's
default with pretrained weights), malloc as zoo's CLI sets it, and on CUDA zoo's bf16 autocast and NHWC (an fp16
GPU would need a GradScaler: not done here).

    PYTHONPATH=$PWD .venv/bin/python scripts/bench_micro.py --model resnet18 --img-size 128 --batch-size 64 \
        --micro 0,32,16 --steps 6 --rounds 3

Prints, per setting: the median seconds per step (the first step of each process left out: allocation and
kernel selection), the peak memory of the process (CUDA: ``torch.cuda.max_memory_allocated``; CPU: the peak
resident set, ``ru_maxrss``, minus the resident set before the first step) and the ratios to ``--micro 0`` (one
pass). The weights after the epoch are compared with one pass's: max abs difference (float order only).
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def child(args: argparse.Namespace) -> None:
    # lazy: the parent process only starts children
    import timm
    import torch

    from finetune.core import distributed as ddp
    from finetune.engine.passes import take_step
    from finetune.engine.runtime import amp_policy
    from zoo import process

    process.keep_freed_memory()     # as zoo's CLI runs (malloc keeps what a step frees)
    torch.manual_seed(0)
    device = torch.device(args.device)
    model = timm.create_model(args.model, num_classes=10).to(device).train()
    for m in model.modules():       # zoo's default for pretrained weights: BatchNorm keeps its statistics
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            m.eval()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    loss_fn = torch.nn.CrossEntropyLoss()
    g = torch.Generator().manual_seed(1)
    x = torch.randn(args.batch_size, 3, args.img_size, args.img_size, generator=g).to(device)
    amp = amp_policy(device, True)     # zoo's default: bf16 autocast on a GPU that has it, NHWC there too
    if device.type == "cuda":
        model, x = model.to(memory_format=torch.channels_last), x.contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 10, (args.batch_size,), generator=g).to(device)
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    times = []
    for step in range(1, args.steps + 1):
        t0 = time.perf_counter()
        take_step(model, x, y, loss_fn, ddp.DistInfo(), step=step, amp=amp, drops=None, optimizer=optimizer,
                  scaler=None, micro=args.micro)
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    peak = (torch.cuda.max_memory_allocated(device) if device.type == "cuda"
            else (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) * 1024)
    weights = torch.cat([p.detach().flatten().double().cpu() for p in model.parameters()])
    torch.save(weights, args.weights_out)
    print(json.dumps({"step_s": statistics.median(times[1:]), "peak_bytes": peak}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="resnet18")
    ap.add_argument("--img-size", type=int, default=128)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--micro", default="0,32,16", help="comma-separated --micro-batch values (0: one pass)")
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--child-micro", type=int, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--weights-out", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child_micro is not None:
        args.micro = args.child_micro
        child(args)
        return
    with tempfile.TemporaryDirectory(prefix="bench_micro_") as tmp:      # each setting's weights, compared
        _rounds(args, [int(m) for m in args.micro.split(",")], Path(tmp))


def _rounds(args: argparse.Namespace, settings: list[int], out: Path) -> None:
    import torch     # lazy: the children import it for their own memory figures

    results: dict[int, list[dict]] = {m: [] for m in settings}
    for r in range(args.rounds):
        for m in settings[r % len(settings):] + settings[:r % len(settings)]:      # rotating order
            cmd = [sys.executable, __file__, "--model", args.model, "--img-size", str(args.img_size),
                   "--batch-size", str(args.batch_size), "--steps", str(args.steps), "--device", args.device,
                   "--child-micro", str(m), "--weights-out", str(out / f"{m}.pt")]
            done = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ, PYTHONPATH=str(ROOT)),
                                  check=True)
            results[m].append(json.loads(done.stdout.strip().splitlines()[-1]))
    one = torch.load(out / f"{settings[0]}.pt")
    print(f"{args.model}, {args.img_size} px, batch {args.batch_size}, {args.device}, {args.steps} steps a process, "
          f"{args.rounds} rounds (medians)")
    print("| --micro-batch | s / step | peak memory, MiB | time / one pass | memory / one pass | weights vs one pass |")
    print("|---|---|---|---|---|---|")
    ref_t = statistics.median(r["step_s"] for r in results[settings[0]])
    ref_m = statistics.median(r["peak_bytes"] for r in results[settings[0]])
    for m in settings:
        t = statistics.median(r["step_s"] for r in results[m])
        mem = statistics.median(r["peak_bytes"] for r in results[m])
        diff = float((torch.load(out / f"{m}.pt") - one).abs().max())
        print(f"| {m or 'one pass'} | {t:.3f} | {mem / 2**20:.0f} | {t / ref_t:.2f}x | {mem / ref_m:.2f}x | "
              f"{diff:.1e} |")


if __name__ == "__main__":
    main()
