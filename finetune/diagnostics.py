"""The lecture's monitoring habits: train/val curves, loss-trend advice, the LR range test, the
overfit-a-tiny-subset sanity check, and an optional TensorBoard logger.

``write_curves`` and ``advise`` are pure (no torch) and cheap: the loop calls them after every epoch.
``lr_find`` and ``overfit_check`` set the model up exactly as ``fit`` would (``recipe.prepare_model`` +
``optim.build_optimizer``) but work on a deep copy, so the caller's model is never changed.
"""
from __future__ import annotations

import copy
import csv
import io
import math
import random
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator, Sequence

from finetune.errors import ConfigError, DivergedError, FinetuneError
from finetune.io import atomic_write, atomic_write_text

if TYPE_CHECKING:  # torch is imported lazily: advise/write_curves must stay light
    import torch
    from finetune.config import FinetuneConfig
    from finetune.data import ImageSet

__all__ = [
    "AdviceThresholds", "ADVICE_THRESHOLDS", "advise", "write_curves", "TensorBoardLogger",
    "LRFindResult", "lr_find", "suggest_valley", "suggest_steepest", "smooth_losses", "lr_schedule",
    "write_lr_plot", "OverfitResult", "overfit_check", "disable_dropout", "preserved_rng", "resolve_device",
    "class_counts",
]


# ----------------------------------------------------------------------------------------------------
# helpers shared by the curve plot and the advice rules
# ----------------------------------------------------------------------------------------------------
def _num(value: Any) -> float:
    """A history cell as a float; missing, None, non-numeric or infinite values become NaN."""
    try:
        x = float(value)
    except (TypeError, ValueError):
        return math.nan
    return x if math.isfinite(x) else math.nan


def _column(history: Sequence[dict], key: str) -> list[float]:
    return [_num(row.get(key)) for row in history]


def _as_fraction(values: list[float]) -> list[float]:
    # Accuracies are fractions by contract; tolerate percentages (a history written by hand or by an
    # older tool) rather than giving silly advice about a 95.0 "accuracy".
    finite = [v for v in values if not math.isnan(v)]
    if finite and max(finite) > 1.0 + 1e-9:
        return [v / 100.0 for v in values]
    return values


def _finite(values: Sequence[float]) -> list[float]:
    return [v for v in values if not math.isnan(v)]


# ----------------------------------------------------------------------------------------------------
# advice
# ----------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class AdviceThresholds:
    """When ``advise`` speaks up. Accuracies are fractions (0-1); losses are per-sample means."""

    min_epochs: int = 3              # trend rules need this many epochs; fewer -> only the explosion rule
    explode_factor: float = 3.0      # train loss above 3x its best so far (or NaN/inf) = exploding
    min_rel_drop: float = 0.05       # train loss must fall at least 5% below its first value ...
    converged_acc: float = 0.95      # ... unless the model already fits the training set this well
    overfit_acc_gap: float = 0.15    # train acc - val acc at least this much = a large gap ...
    overfit_gap_growth: float = 0.05  # ... that grew by at least this since its smallest value
    val_loss_rise: float = 0.10      # or: val loss 10% above its minimum while train loss kept falling
    underfit_gap: float = 0.05       # |train acc - val acc| below this = no gap ...
    underfit_acc: float = 0.60       # ... and train acc below this = too small or too frozen


ADVICE_THRESHOLDS = AdviceThresholds()


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
    train_loss = _column(rows, "train_loss")
    raw_train_loss = [row.get("train_loss") for row in rows]

    # 1. Exploding loss: NaN/inf, or far above its best. Reported alone: the other curves are moot.
    nonfinite = any(v is not None and math.isnan(_num(v)) and _is_number(v) for v in raw_train_loss)
    finite_tl = _finite(train_loss)
    if nonfinite:
        return ["training loss became NaN/inf: the learning rate is too high, lower it "
                "(try 1/10, or run `zoo lr-find`)"]
    if len(finite_tl) >= 2:
        best_before_last = min(finite_tl[:-1])
        last = finite_tl[-1]
        if best_before_last > 0 and last > t.explode_factor * best_before_last:
            return [f"training loss is exploding ({best_before_last:.3g} -> {last:.3g}): the learning rate "
                    "is too high, lower it (try 1/10, or run `zoo lr-find`)"]
    if len(rows) < t.min_epochs or len(finite_tl) < t.min_epochs:
        return []

    advice: list[str] = []
    train_acc = _as_fraction(_column(rows, "train_acc"))
    val_acc = _as_fraction(_column(rows, "val_acc"))
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
    gaps = [a - b for a, b in zip(train_acc, val_acc) if not (math.isnan(a) or math.isnan(b))]
    acc_overfit = (len(gaps) >= t.min_epochs and gaps[-1] >= t.overfit_acc_gap
                   and gaps[-1] - min(gaps[:-1]) >= t.overfit_gap_growth)
    loss_overfit = False
    pairs = [(tl, vl) for tl, vl in zip(train_loss, val_loss) if not (math.isnan(tl) or math.isnan(vl))]
    if len(pairs) >= t.min_epochs:
        vls = [vl for _, vl in pairs]
        i_min = min(range(len(vls)), key=vls.__getitem__)
        tl_at_min, tl_last = pairs[i_min][0], pairs[-1][0]
        loss_overfit = (i_min < len(vls) - 1 and vls[-1] > vls[i_min] * (1.0 + t.val_loss_rise)
                        and tl_last < tl_at_min)
    if acc_overfit or loss_overfit:
        what = (f"train/val accuracy gap {gaps[-1]:.0%} and growing" if acc_overfit
                else f"val loss rising ({min(v for _, v in pairs):.3g} -> {pairs[-1][1]:.3g}) "
                     "while train loss falls")
        # With only the head training there are no stages to re-freeze (and the cached-feature path sees
        # un-augmented inputs): the remedies are regularisation and data.
        head_only = all(row.get("phase") == "head" for row in rows)
        remedy = ("more weight decay, early stopping, more training images (or --aug-views)" if head_only
                  else "more augmentation, fewer unfrozen stages, more weight decay, early stopping")
        advice.append(f"overfitting: {what}: use {remedy}")

    # 4. Underfitting: no gap and low accuracy. A stalled loss is an LR problem first (rule 2).
    last_val_acc = _last(val_acc)
    if (not stalled and not math.isnan(last_train_acc) and not math.isnan(last_val_acc)
            and abs(last_train_acc - last_val_acc) < t.underfit_gap and last_train_acc < t.underfit_acc):
        advice.append(f"underfitting: train acc {last_train_acc:.0%} ~ val acc {last_val_acc:.0%}: "
                      "the model may be too small or too frozen: unfreeze more stages (or a bigger model)")
    return advice


def _is_number(value: Any) -> bool:
    try:
        float(value)
    except (TypeError, ValueError):
        return False
    return True


def _last(values: Sequence[float]) -> float:
    finite = _finite(values)
    return finite[-1] if finite else math.nan


# ----------------------------------------------------------------------------------------------------
# curves.png
# ----------------------------------------------------------------------------------------------------
def _new_figure(width: float, height: float):
    # A bare Figure + Agg canvas: no pyplot global state (safe from threads, no figure leak) and faster.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=100)
    FigureCanvasAgg(fig)
    return fig


def _save_png(fig, path: str | Path) -> None:
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
    fig = _new_figure(6.4, 7.2)
    ax_loss, ax_acc, ax_lr = fig.subplots(3, 1, sharex=True, gridspec_kw={"height_ratios": [3, 3, 1.6]})
    style = {"marker": "o", "markersize": 3, "linewidth": 1.5}

    for ax, key, label in ((ax_loss, "loss", "loss"), (ax_acc, "acc", "accuracy")):
        tr, va = _column(rows, f"train_{key}"), _column(rows, f"val_{key}")
        if key == "acc":
            tr, va = _as_fraction(tr), _as_fraction(va)
        ax.plot(epochs, tr, color="tab:blue", label=f"train {label}", **style)
        ax.plot(epochs, va, color="tab:orange", label=f"val {label}", **style)
        ax.set_ylabel(label)
        ax.grid(True, alpha=0.3)
    if _finite(_as_fraction(_column(rows, "train_acc")) + _as_fraction(_column(rows, "val_acc"))):
        ax_acc.set_ylim(-0.02, 1.02)

    lrs = _column(rows, "lr")
    ax_lr.plot(epochs, lrs, color="tab:green", label="learning rate", **style)
    from matplotlib.ticker import FuncFormatter, LogLocator, MaxNLocator, NullFormatter

    positive = [v for v in lrs if v == v and v > 0]
    if positive:
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
                      f"val loss {_num(last.get('val_loss')):.4g}  val acc {_num(last.get('val_acc')):.3g}",
                      fontsize=9)
    # Fixed margins instead of tight_layout(): this runs every epoch and tight_layout doubles the cost.
    fig.subplots_adjust(left=0.13, right=0.97, top=0.95, bottom=0.07, hspace=0.1)
    _save_png(fig, path)


# ----------------------------------------------------------------------------------------------------
# TensorBoard
# ----------------------------------------------------------------------------------------------------
class TensorBoardLogger:
    """Scalars of each history row to TensorBoard (``tensorboard --logdir RUN_DIR/tensorboard``).

    Raises:
        ConfigError: tensorboard is not installed (``pip install zoo-finetune[tensorboard]``).
    """

    TAGS = {"train_loss": "loss/train", "val_loss": "loss/val", "train_acc": "acc/train",
            "val_acc": "acc/val", "lr": "lr", "images_per_s": "speed/images_per_s", "seconds": "speed/seconds"}

    def __init__(self, run_dir: str | Path, subdir: str = "tensorboard") -> None:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise ConfigError("--tensorboard needs the tensorboard package: "
                              "pip install zoo-finetune[tensorboard]") from None
        self.log_dir = Path(run_dir) / subdir
        self.writer = SummaryWriter(log_dir=str(self.log_dir))

    def log_epoch(self, row: dict) -> None:
        """Log the numeric fields of one history row at step ``row['epoch']``."""
        step = int(_num(row.get("epoch", 0)) if not math.isnan(_num(row.get("epoch", 0))) else 0)
        for key, tag in self.TAGS.items():
            value = _num(row.get(key))
            if not math.isnan(value):
                self.writer.add_scalar(tag, value, step)
        self.writer.flush()

    def log_scalar(self, tag: str, value: float, step: int) -> None:
        self.writer.add_scalar(tag, float(value), step)

    def close(self) -> None:
        self.writer.close()

    def __enter__(self) -> "TensorBoardLogger":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# ----------------------------------------------------------------------------------------------------
# shared set-up for the LR range test and the overfit check
# ----------------------------------------------------------------------------------------------------
@contextmanager
def preserved_rng() -> Iterator[None]:
    """Restore Python, NumPy and torch (CPU + CUDA) RNG states on exit: a diagnostic run before ``fit``
    must not change which random numbers ``fit`` draws."""
    import torch

    py_state = random.getstate()
    try:
        import numpy as np
        np_state = np.random.get_state()
    except ImportError:  # numpy is a dependency, but the restore must not depend on it
        np, np_state = None, None
    torch_state = torch.get_rng_state()
    cuda_states = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
    try:
        yield
    finally:
        random.setstate(py_state)
        if np is not None:
            np.random.set_state(np_state)
        torch.set_rng_state(torch_state)
        if cuda_states is not None:
            torch.cuda.set_rng_state_all(cuda_states)


def resolve_device(name: str) -> "torch.device":
    """``config.device`` -> a torch.device, exactly as ``fit`` resolves it (``loop.pick_device``)."""
    from finetune.loop import pick_device

    return pick_device(name)


def class_counts(image_set: "ImageSet") -> list[int]:
    """Training images per class index."""
    counts = [0] * len(image_set.classes)
    for _, label in image_set.items:
        counts[label] += 1
    return counts


def _loss_fn(config: "FinetuneConfig", train_set: "ImageSet", device: "torch.device"):
    import torch
    from finetune.data import class_weights

    weight = None
    if config.class_weights == "auto":  # inverse class frequency, the same weights fit uses
        weight = torch.tensor(class_weights(train_set), dtype=torch.float32, device=device)
    return torch.nn.CrossEntropyLoss(weight=weight)


def _autocast(config: "FinetuneConfig", device: "torch.device"):
    import torch

    # bf16 only: it needs no gradient scaler, which keeps these short diagnostic loops simple.
    enabled = bool(config.amp) and device.type == "cuda" and torch.cuda.is_bf16_supported()
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=enabled)


def _prepared_copy(model, stages, head, train_set, config, reset_head: bool):
    """A deep copy of ``model`` set up exactly as ``fit`` would set it up, on the config's device."""
    from finetune.recipe import prepare_model

    device = resolve_device(config.device)
    work = copy.deepcopy(model)
    counts = class_counts(train_set)
    decision = prepare_model(work, stages, head, len(train_set.classes), counts, config, reset_head=reset_head)
    work.to(device)
    if device.type == "cuda" and config.channels_last:
        import torch
        work.to(memory_format=torch.channels_last)
    return work, decision, counts, device


def _to_device(x, y, device, config):
    import torch

    x = x.to(device, non_blocking=True)
    if device.type == "cuda" and config.channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    return x, y.to(device, non_blocking=True)


# ----------------------------------------------------------------------------------------------------
# LR range test
# ----------------------------------------------------------------------------------------------------
@dataclass
class LRFindResult:
    """The LR range test's curve and suggestion (head LR; pretrained layers get x backbone_lr_mult).

    Attributes:
        lrs, losses, smoothed: per step, the head LR, the raw batch loss and its bias-corrected EMA.
        suggestion: the suggested head LR, from ``method``.
        method: "valley" (fastai's rule, the default) or "steepest" (steepest descent of the smoothed loss).
        valley, steepest: what each rule suggests (None when the curve is too short to tell).
        stopped_early: the smoothed loss exceeded diverge_factor x its best, or became NaN/inf.
    """

    lrs: list[float]
    losses: list[float]
    smoothed: list[float]
    suggestion: float
    method: str
    valley: float | None
    steepest: float | None
    stopped_early: bool
    decision: Any = None          # the FreezeDecision applied during the test (same as fit's)

    def describe(self) -> str:
        """One line for the printout: the suggestion, which rule gave it, and the other rule's answer."""
        other = "steepest" if self.method == "valley" else "valley"
        other_lr = self.steepest if self.method == "valley" else self.valley
        tail = f"; {other}: {other_lr:.2e}" if other_lr is not None else ""
        stop = f", stopped early at {self.lrs[-1]:.2e} (loss diverged)" if self.stopped_early else ""
        return (f"suggested lr {self.suggestion:.2e} ({self.method} rule{tail}); "
                f"swept {self.lrs[0]:.1e} -> {self.lrs[-1]:.1e} in {len(self.lrs)} steps{stop}")


def lr_schedule(start_lr: float, end_lr: float, steps: int) -> list[float]:
    """``steps`` LRs growing exponentially from ``start_lr`` to ``end_lr`` (both included)."""
    if steps == 1:
        return [float(start_lr)]
    ratio = end_lr / start_lr
    return [float(start_lr * ratio ** (i / (steps - 1))) for i in range(steps)]


def smooth_losses(losses: Sequence[float], beta: float = 0.98) -> list[float]:
    """Exponential moving average with bias correction (so early values are not pulled towards 0)."""
    avg, out = 0.0, []
    for i, loss in enumerate(losses):
        avg = beta * avg + (1.0 - beta) * loss
        out.append(avg / (1.0 - beta ** (i + 1)))
    return out


def _window(n: int) -> tuple[int, int]:
    # Like fastai: ignore the first 10% (the EMA still settles) and the last points (the divergence).
    if n < 10:
        return 0, n
    start, end = n // 10, n - min(5, max(1, n // 10))
    return (start, end) if end - start >= 3 else (0, n)


def suggest_valley(lrs: Sequence[float], smoothed: Sequence[float]) -> int | None:
    """fastai's valley rule: the longest strictly decreasing run of the smoothed loss (as a longest
    decreasing subsequence), and a point ~1/2 of the way down it. Returns an index into ``lrs``."""
    lo, hi = _window(len(smoothed))
    ys = list(smoothed[lo:hi])
    n = len(ys)
    if n < 2:
        return None
    lds = [1] * n
    max_start = max_end = 0
    for i in range(1, n):
        for j in range(i):
            if ys[i] < ys[j] and lds[i] < lds[j] + 1:
                lds[i] = lds[j] + 1
        if lds[max_end] < lds[i]:
            max_end = i
            max_start = max(0, max_end - lds[max_end])
    sections = (max_end - max_start) / 3
    return lo + min(n - 1, max_start + int(sections) + int(sections / 2))


def suggest_steepest(lrs: Sequence[float], smoothed: Sequence[float]) -> int | None:
    """Where the smoothed loss falls fastest per decade of LR (most negative d loss / d log10 lr)."""
    lo, hi = _window(len(smoothed))
    if hi - lo < 2:
        return None
    xs = [math.log10(v) for v in lrs[lo:hi]]
    ys = list(smoothed[lo:hi])
    best, best_i = math.inf, None
    for i in range(len(ys)):  # central differences inside, one-sided at the ends (numpy.gradient)
        a, b = max(0, i - 1), min(len(ys) - 1, i + 1)
        slope = (ys[b] - ys[a]) / (xs[b] - xs[a])
        if slope < best:
            best, best_i = slope, i
    return None if best_i is None else lo + best_i


def write_lr_plot(result: LRFindResult, path: str | Path) -> None:
    """Smoothed (and raw, faint) loss against LR on a log axis, both suggestions marked (PNG, atomic)."""
    fig = _new_figure(6.4, 4.4)
    ax = fig.add_subplot(1, 1, 1)
    ax.plot(result.lrs, result.losses, color="tab:blue", alpha=0.25, linewidth=0.8, label="batch loss")
    ax.plot(result.lrs, result.smoothed, color="tab:blue", linewidth=1.8, label="smoothed loss (EMA)")
    ax.set_xscale("log")
    for rule, lr, colour, marker in (("valley", result.valley, "tab:red", "o"),
                                     ("steepest", result.steepest, "tab:green", "s")):
        if lr is None:
            continue
        i = result.lrs.index(lr)
        chosen = rule == result.method
        ax.plot([lr], [result.smoothed[i]], marker=marker, markersize=10 if chosen else 7, color=colour,
                linestyle="none", label=f"{rule}: {lr:.2e}" + (" (suggested)" if chosen else ""))
        if chosen:
            ax.axvline(lr, color=colour, linestyle="--", linewidth=1)
    # Keep the interesting part readable: clip the divergence tail above (it would squash the curve),
    # never the minimum below.
    lo, hi = _window(len(result.smoothed))
    core = _finite(result.smoothed[lo:hi]) or _finite(result.smoothed)
    if core:
        top, bottom = max(core), min(_finite(result.smoothed))
        pad = 0.1 * (top - bottom) or 0.1 * abs(top) or 0.1
        ax.set_ylim(bottom - pad, top + 3 * pad)
    ax.set_xlabel("learning rate (head; pretrained layers x backbone_lr_mult)")
    ax.set_ylabel("training loss")
    ax.set_title(f"LR range test: suggested {result.suggestion:.2e} ({result.method} rule)", fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    _save_png(fig, path)


def _write_lr_csv(result: LRFindResult, path: str | Path) -> None:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["step", "lr", "loss", "smoothed"])
    for i, (lr, loss, sm) in enumerate(zip(result.lrs, result.losses, result.smoothed)):
        w.writerow([i, f"{lr:.8g}", f"{loss:.6g}", f"{sm:.6g}"])
    atomic_write_text(path, buf.getvalue())


def _cycle(loader) -> Iterator:
    while True:  # a new pass reshuffles; a loader that yields nothing must not spin forever
        empty = True
        for batch in loader:
            if batch is None:  # every image of this batch failed to decode (collate_skip_none)
                continue
            empty = False
            yield batch
        if empty:
            raise FinetuneError("the training loader yielded no batch; check the image folder")


def lr_find(model, stages: Sequence[Sequence[str]], data_config: dict, train_set: "ImageSet",
            config: "FinetuneConfig", *, head: str, start_lr: float = 1e-7, end_lr: float = 10.0,
            steps: int = 100, smooth: float = 0.98, diverge_factor: float = 4.0, method: str = "valley",
            out_png: str | Path | None = None, out_csv: str | Path | None = None, reset_head: bool = True,
            log: Callable[[str], None] | None = None) -> LRFindResult:
    """The LR range test: train for ``steps`` batches while the LR grows exponentially.

    The model is prepared exactly as ``fit`` prepares it (``recipe.prepare_model``: new head, freeze
    decision, BatchNorm policy; ``optim.build_optimizer``: head at LR, pretrained layers at
    LR x backbone_lr_mult) but on a deep copy, inside ``preserved_rng``: the caller's model, its
    state_dict, ``requires_grad`` flags and modes, and every RNG are exactly as before.

    Args:
        start_lr, end_lr, steps: the swept head LRs (log-spaced).
        smooth: EMA factor for the loss (bias-corrected).
        diverge_factor: stop once the smoothed loss exceeds this x its best.
        method: which rule gives ``suggestion``: "valley" (default) or "steepest".
        out_png, out_csv: where to write the plot and the data (atomic).
        reset_head: passed to prepare_model (False when the head was already replaced).
        log: called with a progress line every 10% of the steps.
    Raises:
        ConfigError: invalid range/options. DivergedError: the loss is NaN/inf at ``start_lr`` already.
    """
    import torch
    from finetune.data import ImageDataset, build_transform, make_loader
    from finetune.optim import build_optimizer, set_base_lr

    if not (0 < start_lr < end_lr):
        raise ConfigError(f"lr range {start_lr:g} -> {end_lr:g}: need 0 < start_lr < end_lr, e.g. 1e-7 -> 10")
    if int(steps) < 5:
        raise ConfigError(f"steps={steps}: the range test needs at least 5 steps (100 is typical)")
    if not 0.0 <= smooth < 1.0:
        raise ConfigError(f"smooth={smooth}: use an EMA factor in [0, 1), e.g. 0.98")
    if not diverge_factor > 1.0:
        raise ConfigError(f"diverge_factor={diverge_factor}: must be > 1, e.g. 4")
    if method not in ("valley", "steepest"):
        raise ConfigError(f"method={method!r}: choose valley or steepest")

    with preserved_rng():
        torch.manual_seed(config.seed)
        random.seed(config.seed)
        work, decision, counts, device = _prepared_copy(model, stages, head, train_set, config, reset_head)
        optimizer = build_optimizer(config, work, head)
        loss_fn = _loss_fn(config, train_set, device)
        loader = make_loader(ImageDataset(train_set, build_transform(data_config, train=True, config=config)),
                             config.batch_size, train=True, workers=config.workers, device=str(device),
                             sampler=config.sampler, seed=config.seed)
        batches = _cycle(loader)
        lrs_all = lr_schedule(start_lr, end_lr, int(steps))
        lrs, losses, smoothed = [], [], []
        avg, best, stopped = 0.0, math.inf, False
        work.train()
        for i, lr in enumerate(lrs_all):
            x, y = _to_device(*next(batches), device, config)
            set_base_lr(optimizer, lr)
            optimizer.zero_grad(set_to_none=True)
            with _autocast(config, device):
                out = work(x)
            loss = loss_fn(out.float(), y)
            value = float(loss.detach())
            if not math.isfinite(value):
                if not lrs:
                    raise DivergedError(f"the loss is {value} at lr {lr:.1e} already; lower --start-lr "
                                        "or check the data")
                stopped = True
                break
            loss.backward()
            optimizer.step()
            avg = smooth * avg + (1.0 - smooth) * value
            sm = avg / (1.0 - smooth ** (len(lrs) + 1))
            lrs.append(lr)
            losses.append(value)
            smoothed.append(sm)
            if log is not None and (i + 1) % max(1, steps // 10) == 0:
                log(f"lr-find {i + 1}/{steps}: lr {lr:.2e} loss {value:.4f} (smoothed {sm:.4f})")
            if i > 0 and sm > diverge_factor * best:
                stopped = True
                break
            best = min(best, sm)
        del work, optimizer  # free accelerator memory before plotting

    v, s = suggest_valley(lrs, smoothed), suggest_steepest(lrs, smoothed)
    valley = lrs[v] if v is not None else None
    steepest = lrs[s] if s is not None else None
    chosen = valley if method == "valley" else steepest
    used = method
    if chosen is None:  # too few points for the requested rule: fall back, and say so
        chosen, used = (steepest, "steepest") if steepest is not None else (valley, "valley")
    if chosen is None:
        chosen, used = lrs[min(range(len(smoothed)), key=smoothed.__getitem__)] / 10.0, "min/10"
    result = LRFindResult(lrs, losses, smoothed, float(chosen), used, valley, steepest, stopped, decision)
    if out_csv is not None:
        _write_lr_csv(result, out_csv)
    if out_png is not None:
        write_lr_plot(result, out_png)
    return result


# ----------------------------------------------------------------------------------------------------
# overfit a tiny subset
# ----------------------------------------------------------------------------------------------------
@dataclass
class OverfitResult:
    """Whether the pipeline can memorise a few fixed batches (the lecture's first sanity check).

    Attributes:
        passed: training accuracy reached ``target_acc`` and the loss fell to ``target_loss``.
        final_loss, final_acc: over the fixed batches, in the last pass (measured while training).
        steps: optimizer steps taken.
        verdict: one line saying what the result means and what to check.
        losses: mean loss of each pass over the batches.
    """

    passed: bool
    final_loss: float
    final_acc: float
    steps: int
    verdict: str
    losses: list[float] = field(default_factory=list)
    decision: Any = None


def disable_dropout(model) -> int:
    """Set every dropout / drop-path probability to 0 (BatchNorm untouched). Returns how many changed."""
    from torch import nn

    changed = 0
    for m in model.modules():
        if isinstance(m, nn.modules.dropout._DropoutNd) and m.p:
            m.p, changed = 0.0, changed + 1
        for attr in ("drop_prob", "drop_rate"):  # timm: DropPath.drop_prob, model.drop_rate (head dropout)
            if isinstance(getattr(m, attr, None), float) and getattr(m, attr):
                setattr(m, attr, 0.0)
                changed += 1
    return changed


def overfit_check(model, stages: Sequence[Sequence[str]], data_config: dict, train_set: "ImageSet",
                  config: "FinetuneConfig", *, head: str, batches: int = 2, max_steps: int = 300,
                  target_acc: float = 1.0, target_loss: float = 0.05, freeze_all: bool = False,
                  shuffle_labels: bool = False, reset_head: bool = True,
                  log: Callable[[str], None] | None = None) -> OverfitResult:
    """Train on ``batches`` fixed batches until they are memorised, or ``max_steps`` optimizer steps.

    Augmentation, weight decay and dropout are off (the model stays in train mode with every dropout
    p=0; BatchNorm follows the recipe's ``config.bn``); the freeze decision, head and optimizer are
    those of ``fit``, on a deep copy of ``model`` (the caller's model is not changed).

    Args:
        batches: N, the number of fixed batches of ``config.batch_size`` images (drawn with config.seed).
        max_steps: give up after this many optimizer steps.
        target_acc, target_loss: the pass criterion, over one full pass of the N batches.
        freeze_all: freeze every layer *and the head* (nothing trains): a control that must fail, and a
            way to see the loss of the untrained model.
        shuffle_labels: draw random labels at every step: a control that must fail (nothing to learn).
        log: called with a progress line after each pass.
    Returns:
        OverfitResult; ``verdict`` is "pipeline can learn: N batches overfit to 100% in S steps" or
        "cannot even overfit N batches (acc A, loss L): check labels, LR, frozen layers".
    """
    import torch
    from finetune.data import ImageDataset, build_transform, make_loader
    from finetune.optim import build_optimizer

    if int(batches) < 1 or int(max_steps) < 1:
        raise ConfigError(f"overfit check: batches={batches}, max_steps={max_steps}: both must be at least 1")
    # Regularisation off: the point is to see that the pipeline *can* fit, nothing must fight it.
    cfg = config.replace(augment=False, weight_decay=0.0, mlp_dropout=0.0)
    with preserved_rng():
        torch.manual_seed(cfg.seed)
        work, decision, counts, device = _prepared_copy(model, stages, head, train_set, cfg, reset_head)
        disable_dropout(work)
        if freeze_all:
            for p in work.parameters():
                p.requires_grad_(False)
        trainable = any(p.requires_grad for p in work.parameters())
        optimizer = build_optimizer(cfg, work, head) if trainable else None
        loss_fn = _loss_fn(cfg, train_set, device)

        # N fixed batches, drawn once (seeded) and kept in memory: the same images every pass.
        items = list(train_set.items)
        random.Random(cfg.seed).shuffle(items)
        subset = type(train_set)(items=items[: int(batches) * cfg.batch_size], classes=train_set.classes)
        loader = make_loader(ImageDataset(subset, build_transform(data_config, train=False, config=cfg)),
                             cfg.batch_size, train=False, workers=0, device=str(device), seed=cfg.seed)
        fixed = [_to_device(x, y, device, cfg) for x, y in filter(None, loader)]
        if not fixed:
            raise FinetuneError("overfit check: no readable training image; check the image folder")
        n_batches, n_classes = len(fixed), len(train_set.classes)
        gen = torch.Generator(device="cpu").manual_seed(cfg.seed)

        steps, passes, losses = 0, 0, []
        acc = loss_mean = math.nan
        passed = False
        work.train()
        while steps < max_steps or passes == 0:
            correct = total = 0
            loss_sum = 0.0
            for x, y in fixed:
                if shuffle_labels:
                    y = torch.randint(0, n_classes, y.shape, generator=gen).to(device)
                with _autocast(cfg, device):
                    out = work(x)
                loss = loss_fn(out.float(), y)
                if optimizer is not None:
                    optimizer.zero_grad(set_to_none=True)
                    loss.backward()
                    optimizer.step()
                    steps += 1
                loss_sum += float(loss.detach()) * len(y)
                correct += int((out.detach().argmax(1) == y).sum())
                total += len(y)
            passes += 1
            acc, loss_mean = correct / total, loss_sum / total
            losses.append(loss_mean)
            if log is not None and (passes <= 3 or passes % 10 == 0):   # a readable trace, not one line a pass
                log(f"overfit pass {passes}: {steps} steps, loss {loss_mean:.4f}, acc {acc:.1%}")
            if not math.isfinite(loss_mean):
                break
            if acc >= target_acc and loss_mean <= target_loss:
                passed = True
                break
            if optimizer is None:  # nothing can change: one pass tells everything
                break
        del work, optimizer

    what = f"{n_batches} batch{'es' if n_batches != 1 else ''}"
    if passed:
        verdict = f"pipeline can learn: {what} overfit to {acc:.0%} in {steps} steps"
    else:
        verdict = (f"cannot even overfit {what} (acc {acc:.0%}, loss {loss_mean:.3g}): "
                   "check labels, LR, frozen layers")
        if not trainable:
            verdict += " (nothing is trainable: every layer and the head are frozen)"
    return OverfitResult(passed, loss_mean, acc, steps, verdict, losses, decision)
