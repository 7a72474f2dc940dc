"""The lecture's monitoring habits that run after every epoch: train/val curves (curves.png), the
loss-trend advice, and an optional TensorBoard logger. Pure and cheap: no torch at import."""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import FuncFormatter, LogLocator, MaxNLocator, NullFormatter, PercentFormatter

from finetune.core.errors import ConfigError
from finetune.core.io import atomic_write
from finetune.core.metrics import accuracy_text, as_fraction

__all__ = ["AdviceThresholds", "ADVICE_THRESHOLDS", "advise", "data_advice", "waited", "write_curves",
           "TensorBoardLogger", "new_figure", "save_png", "finite"]


def _num(value: Any) -> float:
    """A history cell as a float; missing, None, non-numeric or infinite values become NaN."""
    try:
        x = float(value)
    except (TypeError, ValueError):
        return math.nan
    return x if math.isfinite(x) else math.nan


def _column(history: Sequence[dict], key: str) -> list[float]:
    return [_num(row.get(key)) for row in history]


def finite(values: Sequence[float]) -> list[float]:
    return [v for v in values if not math.isnan(v)]


# ----------------------------------------------------------------------------------------------------
# advice
# ----------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class AdviceThresholds:
    """When ``advise`` speaks up. Accuracies are fractions (0-1); losses are per-sample means."""

    min_epochs: int = 3              # trend rules need this many epochs; fewer -> only the explosion rule
    explode_factor: float = 3.0      # train loss above 3x its best so far and above its first (or NaN/inf) = exploding
    min_rel_drop: float = 0.05       # train loss must fall at least 5% below its first value ...
    converged_acc: float = 0.95      # ... unless the model already fits the training set this well
    overfit_acc_gap: float = 0.15    # train acc - val acc at least this much = a large gap ...
    overfit_gap_growth: float = 0.05  # ... that grew by at least this since its smallest value
    val_loss_rise: float = 0.10      # or: val loss 10% above its minimum while train loss kept falling ...
    val_loss_rise_epochs: int = 2    # ... in each of the last 2 epochs (one epoch's blip at a val loss of 0.04
                                     # is one image's confidence: medium digits, 0.0414 -> 0.0458 at the end)
    underfit_gap: float = 0.05       # |train acc - val acc| below this = no gap ...
    underfit_acc: float = 0.60       # ... and train acc below this = too small or too frozen
    fitted_loss: float = 0.01        # a loss below this (mean confidence ~99%) is a fitted model's noise,
                                     # neither exploding nor overfitting (0.000111 -> 0.00135 at 100% val acc)
    # The loader's speed (metrics.csv's data_wait: the share of a training pass spent getting its batches):
    say_data_wait: float = 0.1       # an epoch's line gives the share from here up;
    advise_data_wait: float = 0.3    # from here up, on an accelerator, in an epoch of ...
    advise_min_seconds: float = 20.0  # ... this many seconds or more (shorter: mostly the first batches'), the run
                                      # says once what to change (data_advice)


ADVICE_THRESHOLDS = AdviceThresholds()


def waited(row: dict, thresholds: AdviceThresholds = ADVICE_THRESHOLDS) -> str:
    """`` (38% of it spent getting data)`` for an epoch's line (``row["data_wait"]``: waiting for the workers,
    or loading in the loop itself where there are none), or "" below ``thresholds.say_data_wait``."""
    wait = _num(row.get("data_wait"))
    return f" ({wait:.0%} of it spent getting data)" if wait >= thresholds.say_data_wait else ""


def data_advice(row: dict, device_type: str, decode: str, thresholds: AdviceThresholds = ADVICE_THRESHOLDS
                ) -> list[str]:
    """What to change when an accelerator's training loop waited for its batches ``advise_data_wait`` of an epoch
    or more. None on a CPU: there loading and training share the cores (up to 4 cores the loop loads the images
    itself, no worker measured faster: docs/benchmarks.md, "Worker processes"), so the wait is work, not idling."""
    t = thresholds
    wait = _num(row.get("data_wait"))
    if device_type == "cpu" or not (wait >= t.advise_data_wait and _num(row.get("seconds")) >= t.advise_min_seconds):
        return []
    if decode == "device":       # the workers only read files: one thread decodes (nvJPEG) and crops
        what = ("the thread that decodes the JPEGs on the GPU is slower than the training; compare with "
                "--decode workers")
    elif device_type == "cuda":
        what = "the workers decode JPEGs slower than the GPU trains; try --decode device (decoded on the GPU)"
    else:
        what = "the workers prepare images slower than the device trains; --workers sets how many there are"
    return [f"the training loop waited for data {wait:.0%} of the epoch: {what}"]


def advise(history: Sequence[dict], thresholds: AdviceThresholds = ADVICE_THRESHOLDS) -> list[str]:
    """What the lecture would say about a run's curves; an empty list when the run looks healthy.

    Args:
        history: rows with ``train_loss``, ``train_acc``, ``val_loss``, ``val_acc`` (missing/NaN ok).
        thresholds: the rule thresholds (see ``AdviceThresholds``).
    Returns:
        One line per finding, each ending in what to try. With fewer than ``min_epochs`` rows only an
        exploding loss is reported.
    """
    t = thresholds
    rows = list(history)
    if not rows:
        return []
    raw_train_loss = [row.get("train_loss") for row in rows]

    # 1. Exploding loss: NaN/inf, or far above its best. Reported alone: the other curves are moot.
    nonfinite = any(v is not None and math.isnan(_num(v)) and _is_number(v) for v in raw_train_loss)
    if nonfinite:
        return ["training loss became NaN/inf: the learning rate is too high, lower it "
                "(try 1/10, or run `zoo lr-find`)"]
    # Within the last row's phase only: the head phase on cached features sees un-augmented inputs, the
    # finetune phase augmented (with --mixup/--cutmix: mixed) images, so its first epochs sit well above
    # the head's loss without anything going wrong.
    phase_rows = [r for r in rows if r.get("phase") == rows[-1].get("phase")]
    phase_tl = finite(_column(phase_rows, "train_loss"))
    if len(phase_tl) >= 2:
        best_before_last = min(phase_tl[:-1])
        last = phase_tl[-1]
        # ... and above where training started: 8e-07 -> 0.39 (a head that fits its data perfectly, then a
        # normal epoch) is a ratio of 5e5 but no explosion.
        if (best_before_last > 0 and last > t.explode_factor * best_before_last and last > phase_tl[0]
                and last > t.fitted_loss):
            return [f"training loss is exploding ({best_before_last:.3g} -> {last:.3g}): the learning rate "
                    "is too high, lower it (try 1/10, or run `zoo lr-find`)"]
    # The trend rules judge the last phase alone, for the same reason: a finetune phase's loss on
    # augmented images does not continue the head phase's curve on clean cached features (comparing
    # across them read as "not going down" at every unfreezing run's third epoch).
    rows, train_loss, finite_tl = phase_rows, _column(phase_rows, "train_loss"), phase_tl
    if len(rows) < t.min_epochs or len(finite_tl) < t.min_epochs:
        return []

    advice: list[str] = []
    train_acc = as_fraction(_column(rows, "train_acc"))
    val_acc = as_fraction(_column(rows, "val_acc"))
    val_loss = _column(rows, "val_loss")
    last_train_acc = _last(train_acc)

    # 2. Training loss not going down (and the training set is not already fitted).
    first, last = finite_tl[0], finite_tl[-1]
    stalled = last > first * (1.0 - t.min_rel_drop) and not (
        not math.isnan(last_train_acc) and last_train_acc >= t.converged_acc)
    if stalled:
        advice.append(f"training loss is not going down ({first:.3g} -> {last:.3g} over {len(finite_tl)} "
                      "epochs): try a higher learning rate (or unfreeze more stages)")

    # 3. Overfitting: a large train/val accuracy gap that keeps growing, or val loss rising while the
    #    train loss keeps falling.
    overfit = _overfitting(rows, train_loss, val_loss, train_acc, val_acc, t)
    if overfit:
        advice.append(overfit)

    # 4. Underfitting: no gap and low accuracy. A stalled loss is an LR problem first (rule 2).
    last_val_acc = _last(val_acc)
    if (not stalled and not math.isnan(last_train_acc) and not math.isnan(last_val_acc)
            and abs(last_train_acc - last_val_acc) < t.underfit_gap and last_train_acc < t.underfit_acc):
        advice.append(f"underfitting: train acc {accuracy_text(last_train_acc)} ~ val acc "
                      f"{accuracy_text(last_val_acc)}: "
                      "the model may be too small or too frozen: unfreeze more stages (or a bigger model)")
    return advice


def _overfitting(rows: list[dict], train_loss: list[float], val_loss: list[float], train_acc: list[float],
                 val_acc: list[float], t: AdviceThresholds) -> str | None:
    """Rule 3 of ``advise``: a large train/val accuracy gap that keeps growing, or val loss risen (for the
    last ``val_loss_rise_epochs`` epochs) while the train loss keeps falling; the line to report, or None."""
    gaps = [a - b for a, b in zip(train_acc, val_acc) if not (math.isnan(a) or math.isnan(b))]
    acc_overfit = (len(gaps) >= t.min_epochs and gaps[-1] >= t.overfit_acc_gap
                   and gaps[-1] - min(gaps[:-1]) >= t.overfit_gap_growth)
    loss_overfit = False
    pairs = [(tl, vl) for tl, vl in zip(train_loss, val_loss) if not (math.isnan(tl) or math.isnan(vl))]
    if len(pairs) >= t.min_epochs:
        vls = [vl for _, vl in pairs]
        i_min = min(range(len(vls)), key=vls.__getitem__)
        tl_at_min, tl_last = pairs[i_min][0], pairs[-1][0]
        k = max(1, int(t.val_loss_rise_epochs))
        loss_overfit = (i_min < len(vls) - k and all(v > vls[i_min] * (1.0 + t.val_loss_rise) for v in vls[-k:])
                        and tl_last < tl_at_min and vls[-1] > t.fitted_loss)
    if acc_overfit or loss_overfit:
        what = (f"train/val accuracy gap {accuracy_text(gaps[-1])} and growing" if acc_overfit
                else f"val loss rising ({min(v for _, v in pairs):.3g} -> {pairs[-1][1]:.3g}) "
                     "while train loss falls")
        # With only the head training there are no stages to re-freeze (and the cached-feature path sees
        # un-augmented inputs): the remedies are regularisation and data.
        head_only = all(row.get("phase") == "head" for row in rows)
        remedy = ("more weight decay, early stopping, more training images (or --aug-views)" if head_only
                  else "more augmentation, fewer unfrozen stages, more weight decay, early stopping")
        return f"overfitting: {what}: use {remedy}"
    return None


def _is_number(value: Any) -> bool:
    try:
        float(value)
    except (TypeError, ValueError):
        return False
    return True


def _last(values: Sequence[float]) -> float:
    ok = finite(values)
    return ok[-1] if ok else math.nan


# ----------------------------------------------------------------------------------------------------
# curves.png
# ----------------------------------------------------------------------------------------------------
def new_figure(width: float, height: float):
    # A bare Figure + Agg canvas: no pyplot global state (safe from threads, no figure leak) and faster.
    fig = Figure(figsize=(width, height), dpi=100)
    FigureCanvasAgg(fig)
    return fig


def save_png(fig, path: str | Path) -> None:
    def write(tmp: str) -> None:
        fig.savefig(tmp, format="png")  # explicit format: the temp file's suffix is .tmp
    atomic_write(path, write)


def write_curves(history: Sequence[dict], path: str | Path, best_epoch: int | None = None) -> None:
    """Write the train/val loss and accuracy curves with the LR schedule to ``path`` (PNG, atomic).

    Three panels share the epoch axis: loss (train vs val), accuracy (train vs val), learning rate
    (log scale). The head-only phase is shaded, the head -> finetune boundary drawn, and ``best_epoch``
    (the checkpoint early stopping keeps, a value of the ``epoch`` column) marked on every panel.
    Robust to a one-row history, missing columns and NaN/inf values (drawn as gaps).
    """
    rows = list(history)
    epochs = [_num(r.get("epoch", i + 1)) for i, r in enumerate(rows)]
    epochs = [e if not math.isnan(e) else float(i + 1) for i, e in enumerate(epochs)]
    fig = new_figure(6.4, 7.2)
    ax_loss, ax_acc, ax_lr = fig.subplots(3, 1, sharex=True, gridspec_kw={"height_ratios": [3, 3, 1.6]})
    style = {"marker": "o", "markersize": 3, "linewidth": 1.5}

    for ax, key, label in ((ax_loss, "loss", "loss"), (ax_acc, "acc", "accuracy")):
        tr, va = _column(rows, f"train_{key}"), _column(rows, f"val_{key}")
        if key == "acc":
            tr, va = as_fraction(tr), as_fraction(va)
        ax.plot(epochs, tr, color="tab:blue", label=f"train {label}", **style)
        ax.plot(epochs, va, color="tab:orange", label=f"val {label}", **style)
        ax.set_ylabel(label)
        ax.grid(True, alpha=0.3)
    if finite(as_fraction(_column(rows, "train_acc")) + as_fraction(_column(rows, "val_acc"))):
        ax_acc.set_ylim(-0.02, 1.02)
    ax_acc.yaxis.set_major_formatter(PercentFormatter(xmax=1))    # fractions read in percent, as printed

    lrs = _column(rows, "lr")
    ax_lr.plot(epochs, lrs, color="tab:green", label="learning rate", **style)
    positive = [v for v in lrs if v == v and v > 0]
    if positive:
        if min(positive) == max(positive):   # one LR (an epoch, a constant schedule): no zero-height log axis
            ax_lr.set_ylim(positive[0] / 3, positive[0] * 3)
        ax_lr.set_yscale("log")
        if max(positive) / min(positive) < 100:  # within two decades: label 1-2-5, not only powers of 10
            ax_lr.yaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
        # Plain "1e-04" labels: the default mathtext labels are the slowest part of the whole plot.
        ax_lr.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:.0e}"))
        ax_lr.yaxis.set_minor_formatter(NullFormatter())
    ax_lr.set_ylabel("lr")
    ax_lr.set_xlabel("epoch")
    ax_lr.xaxis.set_major_locator(MaxNLocator(integer=True))  # epochs are whole numbers
    ax_lr.grid(True, alpha=0.3)

    # Head-only phase shaded, boundary drawn where the backbone is unfrozen.
    phases = [str(r.get("phase", "")) for r in rows]
    head_x = [e for e, p in zip(epochs, phases) if p == "head"]
    boundary = next((epochs[i] - 0.5 for i in range(1, len(rows))
                     if phases[i - 1] == "head" and phases[i] != "head"), None)
    for ax in (ax_loss, ax_acc, ax_lr):
        if head_x:
            ax.axvspan(min(head_x) - 0.5, max(head_x) + 0.5, color="0.85", alpha=0.5, linewidth=0,
                       label="head-only phase" if ax is ax_loss else None)
        if boundary is not None:
            ax.axvline(boundary, color="0.3", linestyle=":", linewidth=1.2,
                       label="unfreeze (finetune starts)" if ax is ax_loss else None)
        if best_epoch is not None:
            ax.axvline(float(best_epoch), color="tab:red", linestyle="--", linewidth=1.2,
                       label=f"best epoch {best_epoch} (kept)" if ax is ax_loss else None)
    if best_epoch is not None and best_epoch in epochs:
        i = epochs.index(best_epoch)
        ax_loss.plot([epochs[i]], [_column(rows, "val_loss")[i]], marker="*", markersize=12,
                     color="tab:red", linestyle="none")
    if len(epochs) == 1:  # one point: give it some room instead of a degenerate axis
        ax_lr.set_xlim(epochs[0] - 1, epochs[0] + 1)
    ax_loss.legend(loc="upper right", fontsize=7)
    ax_acc.legend(loc="lower right", fontsize=7)
    last = rows[-1] if rows else {}
    ax_loss.set_title(f"epoch {last.get('epoch', '-')}  "
                      f"val loss {_num(last.get('val_loss')):.4g}  val acc {accuracy_text(_num(last.get('val_acc')))}",
                      fontsize=9)
    # Fixed margins instead of tight_layout(): this runs every epoch and tight_layout doubles the cost.
    fig.subplots_adjust(left=0.13, right=0.97, top=0.95, bottom=0.07, hspace=0.1)
    save_png(fig, path)


# ----------------------------------------------------------------------------------------------------
# TensorBoard
# ----------------------------------------------------------------------------------------------------
class TensorBoardLogger:
    """Scalars of each history row to TensorBoard (``tensorboard --logdir RUN_DIR/tensorboard``).

    Raises:
        ConfigError: tensorboard is not installed (``pip install zoo-finetune[tensorboard]``).
    """

    @staticmethod
    def writer_class():
        """torch's SummaryWriter; ConfigError where tensorboard is not installed (a run checks this
        before it writes anything: ``engine.runtime.check_machine``)."""
        try:
            # lazy: optional extra (pip install "zoo-finetune[tensorboard]"), checked here
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise ConfigError("--tensorboard needs the tensorboard package: "
                              "pip install zoo-finetune[tensorboard]") from None
        return SummaryWriter

    TAGS = {"train_loss": "loss/train", "val_loss": "loss/val", "train_acc": "acc/train",
            "val_acc": "acc/val", "lr": "lr", "images_per_s": "speed/images_per_s", "seconds": "speed/seconds",
            "data_wait": "speed/data_wait"}

    def __init__(self, run_dir: str | Path) -> None:
        SummaryWriter = self.writer_class()
        self.log_dir = Path(run_dir) / "tensorboard"
        self.writer = SummaryWriter(log_dir=str(self.log_dir))

    def log_epoch(self, row: dict) -> None:
        """Log the numeric fields of one history row at step ``row['epoch']``."""
        step = int(_num(row.get("epoch", 0)) if not math.isnan(_num(row.get("epoch", 0))) else 0)
        for key, tag in self.TAGS.items():
            value = _num(row.get(key))
            if not math.isnan(value):
                self.writer.add_scalar(tag, value, step)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()

    def __enter__(self) -> "TensorBoardLogger":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
