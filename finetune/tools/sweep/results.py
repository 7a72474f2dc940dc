"""Sweep results: one record per trial, the resume log (results.jsonl), the ranking (results.csv), sweep.png."""
from __future__ import annotations

import csv
import io
import json
import math
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from matplotlib.ticker import PercentFormatter

from finetune.core.config import FinetuneConfig
from finetune.core.io import atomic_write_text, json_safe
from finetune.core.metrics import metric_text
from finetune.core.monitor import new_figure, save_png
from finetune.tools.sweep.space import _unique


# ----------------------------------------------------------------------------------------------------
# results
# ----------------------------------------------------------------------------------------------------
@dataclass
class TrialResult:
    """One grid point: its status and validation metrics (mean and std over folds when cross-validating)."""

    id: str
    params: dict[str, Any]
    status: str                         # "ok" | "diverged"
    metric: float                       # the monitored validation metric (mean over folds); NaN if diverged
    metric_std: float = 0.0
    val_loss: float = math.nan
    val_acc: float = math.nan
    fold_metrics: list[float] = field(default_factory=list)
    best_epoch: int | None = None
    epochs_run: int = 0
    seconds: float = 0.0
    message: str = ""
    # the kept epoch (of every fold) is a head solved by L-BFGS: no LR, optimizer or weight decay shaped it
    solved_head: bool = False

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "TrialResult":
        data = dict(data)
        for key in ("metric", "metric_std", "val_loss", "val_acc"):
            data[key] = math.nan if data.get(key) is None else float(data[key])
        data["fold_metrics"] = [math.nan if v is None else float(v) for v in data.get("fold_metrics", [])]
        return cls(**data)


@dataclass
class SweepResult:
    """All trials, best first (diverged ones last), and the best configuration."""

    trials: list[TrialResult]
    metric: str
    best: TrialResult | None
    best_config: FinetuneConfig | None
    out_dir: Path
    folds: int
    skipped: int = 0                    # trials of this grid found finished in results.jsonl (resume)
    earlier: int = 0                    # trials in results.jsonl outside this grid, ranked with it (resume)

    def table(self) -> list[dict[str, Any]]:
        """Rows for printing/CSV: rank, the swept values, the metric (+- std), status."""
        rows = []
        for rank, t in enumerate(self.trials, 1):
            rows.append({"rank": rank if t.status == "ok" else "-", **t.params, self.metric: t.metric,
                         f"{self.metric}_std": t.metric_std, "val_loss": t.val_loss, "val_acc": t.val_acc,
                         "best_epoch": t.best_epoch, "epochs": t.epochs_run, "seconds": round(t.seconds, 1),
                         "status": t.status, "id": t.id})
        return rows


def _rank(trials: list[TrialResult], metric: str) -> list[TrialResult]:
    # Accuracy: higher first, ties (frequent on small val sets) broken by the lower val loss;
    # loss: lower first, ties broken by the higher accuracy.
    def key(t: TrialResult) -> tuple[float, float]:
        if metric == "val_acc":
            return (-t.metric, t.val_loss if not math.isnan(t.val_loss) else math.inf)
        return (t.metric, -t.val_acc if not math.isnan(t.val_acc) else math.inf)

    ok = sorted((t for t in trials if t.status == "ok" and not math.isnan(t.metric)), key=key)
    rest = [t for t in trials if t not in ok]
    return ok + rest


def _write_csv(result: SweepResult, path: Path) -> None:
    rows = result.table()
    buf = io.StringIO()
    if rows:
        w = csv.DictWriter(buf, fieldnames=list(rows[0]), lineterminator="\n")
        w.writeheader()
        for r in rows:
            w.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in r.items()})
    atomic_write_text(path, buf.getvalue())


def _append_jsonl(path: Path, record: dict[str, Any]) -> None:
    # One flushed + fsynced line per finished trial: an interruption loses at most the running trial.
    with open(path, "a", encoding="utf-8") as fh:
        fh.write(json.dumps(json_safe(record)) + "\n")
        fh.flush()
        os.fsync(fh.fileno())


def _read_jsonl(path: Path) -> dict[str, TrialResult]:
    done: dict[str, TrialResult] = {}
    if not path.exists():
        return done
    for line in path.read_text(encoding="utf-8").splitlines():
        if not line.strip():
            continue
        try:
            t = TrialResult.from_dict(json.loads(line))
        except (ValueError, TypeError, KeyError):
            continue  # a line cut by a crash mid-write: that trial simply runs again
        done[t.id] = t
    return done


def _freeze_label(freeze: str) -> str:
    if freeze == "head":
        return "head only"
    if freeze == "none":
        return "everything trains"
    if freeze.isdigit():
        return f"head + last {freeze} stage{'s' if freeze != '1' else ''}"
    return f"freeze {freeze}"


def write_sweep_plot(result: SweepResult, path: Path) -> None:
    """Metric vs LR (log axis), one line per freeze depth (best over the other swept values at each LR,
    error bars = std over folds), every trial as a faint dot, diverged trials as crosses."""
    fig = new_figure(6.4, 4.4)
    ax = fig.add_subplot(1, 1, 1)
    ok = [t for t in result.trials if t.status == "ok" and not math.isnan(t.metric)]
    better = max if result.metric == "val_acc" else min
    # Shallow to deep, whatever the ranking: head, 1, 2, ..., none, auto (stable colours across sweeps).
    order = {"head": -1, "none": 10_000, "auto": 10_001}
    freezes = sorted(_unique([t.params["freeze"] for t in result.trials]),
                     key=lambda f: order.get(f, int(f) if f.isdigit() else 10_002))
    colours = ["tab:blue", "tab:orange", "tab:green", "tab:red", "tab:purple", "tab:brown"]
    for i, fr in enumerate(freezes):
        colour = colours[i % len(colours)]
        mine = [t for t in ok if t.params["freeze"] == fr]
        if not mine:
            continue
        ax.scatter([t.params["lr"] for t in mine], [t.metric for t in mine], s=14, color=colour, alpha=0.35)
        lrs = sorted({t.params["lr"] for t in mine})
        best = [better((t for t in mine if t.params["lr"] == lr), key=lambda t: t.metric) for lr in lrs]
        ax.errorbar(lrs, [t.metric for t in best], yerr=[t.metric_std for t in best], color=colour,
                    marker="o", capsize=3, linewidth=1.6, label=_freeze_label(fr))
    diverged = [t for t in result.trials if t.status != "ok"]
    if diverged:
        y = ax.get_ylim()[0] if ok else 0.0
        ax.scatter([t.params["lr"] for t in diverged], [y] * len(diverged), marker="x", color="k",
                   label="diverged")
    if result.best is not None:
        ax.scatter([result.best.params["lr"]], [result.best.metric], s=160, facecolors="none",
                   edgecolors="tab:red", linewidths=2, label="best", zorder=5)
    ax.set_xscale("log")
    ax.set_xlabel("learning rate (head)")
    ax.set_ylabel(result.metric + (f" (mean of {result.folds} folds)" if result.folds > 1 else ""))
    if result.metric == "val_acc":      # fractions read in percent, as the title and every printed accuracy
        ax.yaxis.set_major_formatter(PercentFormatter(xmax=1))
    title = "sweep"
    if result.best is not None:
        p = result.best.params
        title = (f"best {result.metric} {metric_text(result.metric, result.best.metric)}: lr {p['lr']:.2g}, "
                 f"wd {p['weight_decay']:.2g}, freeze {p['freeze']}, {p['optimizer']}")
    ax.set_title(title, fontsize=9)
    ax.grid(True, which="both", alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8)
    fig.tight_layout()
    save_png(fig, path)


