#!/usr/bin/env python
"""Refit the solved head on train + val? An offline measurement on the split folders of bench_peers.py.

zoo's head-only default (``finetune.tools.features.head.CachedHeadSteps._solve_path``) fits the linear head
by full-batch L-BFGS on the training images' pooled features (the evaluation view and its mirror) for each C
of ``SOLVER_C`` (L2 = 1 / (C x rows) on the mean cross-entropy, strongest first, each solve warm-started from
the last) and keeps the C with the best validation accuracy, then validation loss. Here, per split, with
the same extraction (``_extract``) and the same solver (``lbfgs_minimise``):

  a      zoo's head as it is: C picked on val, fitted on the training features (with mirrors)
  b      the same C, refitted on train + val features (the validation images with their mirrors too)
  c      C re-picked by k-fold cross-validation over train + val (an image and its mirror in one fold;
         folds stratified), then refitted on train + val as b

Each head scores the test split's evaluation view (what ``zoo eval`` reads) and, as ``zoo eval --tta``
does, the mean softmax of that view and its mirror. Per-image hits are saved, so the pooled exact
McNemar test of b against a (``finetune.core.metrics.paired_gain_p``) is over every test image of every split.

    ZOO_HOME=/tmp/zoo-peers PYTHONPATH=$PWD .venv/bin/python scripts/bench_peers.py --only zoo \\
        --seeds 0,1,2,3,4,5,6,7,8,9 --work /tmp/peers          # writes /tmp/peers/data-<seed>
    ZOO_HOME=/tmp/zoo-peers PYTHONPATH=$PWD .venv/bin/python scripts/bench_refit.py --work /tmp/peers \\
        --seeds 0,1,2,3,4,5,6,7,8,9 --out /tmp/refit.json
    # medium data (bench_peers.py --dataset digits --only zoo-head --seeds 0 --work /tmp/digits):
    ... scripts/bench_refit.py --work /tmp/digits --seeds 0 --img-size 128 --out /tmp/refit-digits.json
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from finetune.core.metrics import paired_gain_p  # noqa: E402
from finetune.core.optim import lbfgs_minimise  # noqa: E402
from finetune.data import ImageDataset, build_transform, scan_folder  # noqa: E402
from finetune.tools.features.extract import _extract  # noqa: E402
from finetune.tools.features.head import SOLVER_C, SOLVER_MAX_ITER  # noqa: E402

MODEL = "efficientnet_lite0"


def features(data: Path, img_size: int, nhwc: bool = True) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Per split: ``(views x N x D float32 features, N labels)``, view 0 the evaluation view, view 1 its mirror.
    ``nhwc``: channels_last, as zoo computes on the CPU (``finetune.engine.runtime.nhwc``); NCHW rounds otherwise,
    enough to change a pick of C or a test image (docs/peers.md, helper-103)."""
    from zoo.build import create_model
    from zoo.registry import get_entry

    entry = get_entry(MODEL)
    model = create_model(entry, pretrained=True)
    if nhwc:
        model = model.to(memory_format=torch.channels_last)
    data_config = entry.preprocessing.data_config()
    if img_size:     # as zoo's --img-size
        data_config = {**data_config, "input_size": (3, img_size, img_size)}
    tf = build_transform(data_config, False)
    report = scan_folder(data)
    out = {}
    for split in ("train", "val", "test"):
        bank = _extract(model, entry.classifier, ImageDataset(getattr(report, split), tf), 32,
                        torch.device("cpu"), mirror=True, channels_last=nhwc)
        ok = bank.valid
        out[split] = (bank.features[:, ok], bank.labels[ok])
    return out


def solve_path(x: torch.Tensor, y: torch.Tensor, n_classes: int, cs) -> list[tuple[float, torch.Tensor, torch.Tensor]]:
    """zoo's path: for each C in ``cs`` (strongest first, each warm-started from the last), full-batch L-BFGS of the
    mean cross-entropy + L2 / 2 |W|^2, L2 = 1 / (C x rows), in float32 from zero as the head's solve. Returns
    ``(C, W, b)`` per C."""
    n, d = x.shape
    w = torch.zeros(n_classes, d, requires_grad=True)
    b = torch.zeros(n_classes, requires_grad=True)
    path = []
    for c in cs:
        l2 = 1.0 / (c * n)

        def objective(l2: float = l2) -> torch.Tensor:
            return F.cross_entropy(F.linear(x, w, b), y) + 0.5 * l2 * w.pow(2).sum()

        lbfgs_minimise([w, b], objective, SOLVER_MAX_ITER, rows=n)
        path.append((c, w.detach().clone(), b.detach().clone()))
    return path


def val_key(w: torch.Tensor, b: torch.Tensor, xv: torch.Tensor, yv: torch.Tensor) -> tuple[float, float]:
    """zoo's choice among the path's heads: validation accuracy, then validation loss (greater is better)."""
    logits = F.linear(xv, w, b).double()
    return float((logits.argmax(1) == yv).double().mean()), -float(F.cross_entropy(logits, yv))


def rows(feats: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Every view of every image as a row (the solve's layout)."""
    return feats.reshape(-1, feats.shape[-1]), labels.repeat(feats.shape[0])


def cv_pick(xall: torch.Tensor, yall: torch.Tensor, n_classes: int, k: int, seed: int) -> float:
    """C by stratified k-fold CV over images (an image's views stay in one fold): mean fold accuracy, then mean
    fold loss; each fold solves zoo's path over every C."""
    g = torch.Generator().manual_seed(seed)
    fold = torch.empty(len(yall), dtype=torch.int64)
    for cls in range(n_classes):
        idx = (yall == cls).nonzero().squeeze(1)
        idx = idx[torch.randperm(len(idx), generator=g)]
        fold[idx] = torch.arange(len(idx)) % k
    scores = {c: (0.0, 0.0) for c in SOLVER_C}
    for f in range(k):
        tr, va = fold != f, fold == f
        for c, w, b in solve_path(*rows(xall[:, tr], yall[tr]), n_classes, SOLVER_C):
            a, nl = val_key(w, b, xall[0, va], yall[va])
            scores[c] = (scores[c][0] + a / k, scores[c][1] + nl / k)
    return max(SOLVER_C, key=lambda c: scores[c])


def test_hits(w, b, xt: torch.Tensor, yt: torch.Tensor) -> tuple[list[bool], list[bool]]:
    """Per test image: right on the evaluation view; right on the mean softmax of the view and its mirror."""
    plain = F.linear(xt[0], w, b)
    tta = (plain.softmax(1) + F.linear(xt[1], w, b).softmax(1)) / 2
    return (plain.argmax(1) == yt).tolist(), (tta.argmax(1) == yt).tolist()


def run_split(data: Path, img_size: int, folds: int, seed: int, nhwc: bool = True) -> dict:
    t0 = time.monotonic()
    f = features(data, img_size, nhwc)
    t_feat = time.monotonic() - t0
    (xtr, ytr), (xva, yva), (xte, yte) = f["train"], f["val"], f["test"]
    k = int(max(ytr.max(), yva.max())) + 1
    path = solve_path(*rows(xtr, ytr), k, SOLVER_C)
    best = max(range(len(path)), key=lambda i: (val_key(path[i][1], path[i][2], xva[0], yva), -i))
    c_a, wa, ba = path[best]        # the first of equal keys, as zoo's strict comparison keeps
    xall, yall = torch.cat([xtr, xva], 1), torch.cat([ytr, yva])
    x, y = rows(xall, yall)
    _, wb, bb = solve_path(x, y, k, [c for c in SOLVER_C if c <= c_a])[-1]   # zoo's path up to that C
    out = {"data": str(data), "C_a": c_a, "features_s": round(t_feat, 1), "n_test": len(yte)}
    for name, (w, b) in {"a": (wa, ba), "b": (wb, bb)}.items():
        out[name], out[name + "_tta"] = test_hits(w, b, xte, yte)
    if folds:
        c_c = cv_pick(xall, yall, k, folds, seed)
        _, wc, bc = solve_path(x, y, k, [c for c in SOLVER_C if c <= c_c])[-1]
        out["C_c"] = c_c
        out["c"], out["c_tta"] = test_hits(wc, bc, xte, yte)
    out["solve_s"] = round(time.monotonic() - t0 - t_feat, 1)
    return out


def acc(hits: list[bool]) -> float:
    return sum(hits) / len(hits)


def summary(results: list[dict]) -> list[str]:
    names = [n for n in ("a", "a_tta", "b", "b_tta", "c", "c_tta") if n in results[0]]
    lines = ["| head | " + " | ".join(f"split {r['seed']}" for r in results) + " | mean |",
             "|---" * (len(results) + 2) + "|"]
    for n in names:
        accs = [acc(r[n]) for r in results]
        lines.append(f"| {n} | " + " | ".join(f"{a:.3f}" for a in accs) + f" | **{sum(accs) / len(accs):.4f}** |")
    lines.append("| C (a) | " + " | ".join(f"{r['C_a']:g}" for r in results) + " | |")
    if "C_c" in results[0]:
        lines.append("| C (c) | " + " | ".join(f"{r['C_c']:g}" for r in results) + " | |")
    lines.append("")
    for new, old in (("b", "a"), ("c", "a"), ("b_tta", "b"), ("a_tta", "a"), ("b_tta", "a")):
        if new not in results[0]:
            continue
        d = [acc(r[new]) - acc(r[old]) for r in results]
        gains = sum(n and not o for r in results for n, o in zip(r[new], r[old]))
        losses = sum(o and not n for r in results for n, o in zip(r[new], r[old]))
        won, lost = sum(x > 1e-9 for x in d), sum(x < -1e-9 for x in d)
        lines.append(f"{new} vs {old}: splits won/lost/tied {won}/{lost}/{len(d) - won - lost} (one-sided sign test "
                     f"p = {paired_gain_p(won, lost):.2g}); mean {100 * sum(d) / len(d):+.2f} pts; pooled test images "
                     f"right only with {new} / only with {old}: {gains}/{losses}, one-sided exact McNemar p = "
                     f"{paired_gain_p(gains, losses):.2g}")
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", required=True, help="bench_peers.py's --work folder (holds data-<seed>/)")
    ap.add_argument("--seeds", default="0", help="comma-separated split seeds")
    ap.add_argument("--img-size", type=int, default=0, help="as bench_peers.py's (digits: 128)")
    ap.add_argument("--folds", type=int, default=7, help="k of c's cross-validation (0: skip c)")
    ap.add_argument("--nchw", action="store_true", help="extract in NCHW (zoo on the CPU: NHWC)")
    ap.add_argument("--out", help="write the per-image results here (JSON)")
    ap.add_argument("--summary", metavar="JSON", help="print the tables of an earlier --out file, nothing run")
    args = ap.parse_args()
    if args.summary:
        print("\n".join(summary(json.loads(Path(args.summary).read_text()))))
        return
    results = []
    for seed in (int(s) for s in args.seeds.split(",")):
        r = run_split(Path(args.work) / f"data-{seed}", args.img_size, args.folds, seed, not args.nchw)
        r["seed"] = seed
        results.append(r)
        print(f"split {seed}: C {r['C_a']:g}" + (f" / cv {r['C_c']:g}" if "C_c" in r else "") + ", "
              + ", ".join(f"{n} {acc(r[n]):.3f}" for n in ("a", "a_tta", "b", "b_tta", "c", "c_tta") if n in r)
              + f" (features {r['features_s']} s, solves {r['solve_s']} s)", flush=True)
        if args.out:
            Path(args.out).write_text(json.dumps(results))
    print("\n".join(summary(results)))


if __name__ == "__main__":
    main()
