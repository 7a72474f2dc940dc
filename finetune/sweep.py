"""Grid search in log space over learning rate, weight decay, freeze depth and optimizer, each trial a
short finetune through ``finetune.train.fit``; optional stratified k-fold cross-validation.

Results go to ``out_dir``: ``results.jsonl`` (one line per finished trial, appended as it finishes: the
resume log), ``results.csv`` (all trials, sorted by the validation metric), ``sweep.png`` (metric vs LR
per freeze depth), ``best_config.yaml`` (the best trial's FinetuneConfig, for ``zoo finetune --config``)
and ``sweep.json`` (the grid and the fixed options, checked on ``resume``).
"""
from __future__ import annotations

import csv
import io
import itertools
import json
import math
import os
import random
import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from finetune.config import OPTIMIZERS, FinetuneConfig, save_config
from finetune.data import ImageSet
from finetune.errors import ConfigError, DataError, DivergedError
from finetune.features import FeatureCache
from finetune.io import atomic_write_text
from finetune.monitor import new_figure, save_png
from finetune.policy import parse_freeze
from finetune.train import fit

__all__ = ["parse_values", "parse_choices", "SweepSpace", "TrialResult", "SweepResult", "kfold_splits",
           "trial_config", "sweep", "SWEPT_FIELDS"]

SWEPT_FIELDS = ("lr", "weight_decay", "freeze", "optimizer")


# ----------------------------------------------------------------------------------------------------
# the grid
# ----------------------------------------------------------------------------------------------------
def _float(text: str, name: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise ConfigError(f"--{name}: {text!r} is not a number; use e.g. 1e-4:1e-2:5 or 1e-4,1e-3") from None


def parse_values(spec: str | float | Sequence[float], name: str = "lr", allow_zero: bool = False) -> list[float]:
    """``"1e-4:1e-2:5"`` -> 5 log-spaced values from 1e-4 to 1e-2; ``"0,1e-4,1e-3"`` -> that list.

    Args:
        spec: the option text (a number or a list of numbers is accepted as is).
        name: the option name, for error messages.
        allow_zero: 0 may appear in a comma list (weight decay); never in a log range.
    Raises:
        ConfigError: malformed spec, non-positive range ends, zero/negative values where not allowed.
    """
    if isinstance(spec, (int, float)):
        values = [float(spec)]
    elif not isinstance(spec, str):
        values = [float(v) for v in spec]
    elif ":" in spec:
        parts = spec.split(":")
        if len(parts) != 3:
            raise ConfigError(f"--{name} {spec!r}: a range is START:END:COUNT, e.g. 1e-4:1e-2:5")
        start, end = _float(parts[0], name), _float(parts[1], name)
        try:
            count = int(parts[2])
        except ValueError:
            raise ConfigError(f"--{name} {spec!r}: COUNT must be a whole number, e.g. 1e-4:1e-2:5") from None
        if start <= 0 or end <= 0:
            raise ConfigError(f"--{name} {spec!r}: a log-spaced range needs positive ends; "
                              "list 0 explicitly, e.g. 0,1e-5,1e-4")
        if count < 1:
            raise ConfigError(f"--{name} {spec!r}: COUNT must be at least 1")
        if count == 1:
            values = [start]
        else:
            ratio = end / start
            values = [start * ratio ** (i / (count - 1)) for i in range(count)]
            values[-1] = end  # exact end point, not end * (1 +- 1 ulp)
    else:
        values = [_float(p.strip(), name) for p in spec.split(",") if p.strip()]
    if not values:
        raise ConfigError(f"--{name}: no values given; use e.g. 1e-4:1e-2:5 or 1e-4,1e-3")
    for v in values:
        if v < 0 or (v == 0 and not allow_zero) or not math.isfinite(v):
            raise ConfigError(f"--{name}: {v:g} is not allowed; values must be positive"
                              + (" (or 0)" if allow_zero else ""))
    return _unique(values)


def parse_choices(spec: str | Sequence[str], name: str, allowed: Sequence[str] | None = None) -> list[str]:
    """``"head,1,2"`` -> ["head", "1", "2"]; checks each against ``allowed`` when given."""
    items = spec.split(",") if isinstance(spec, str) else list(spec)
    values = [str(v).strip().lower() for v in items if str(v).strip()]
    if not values:
        raise ConfigError(f"--{name}: no values given")
    if allowed is not None:
        bad = [v for v in values if v not in allowed]
        if bad:
            raise ConfigError(f"--{name}: {', '.join(bad)} not known; choose from {', '.join(allowed)}")
    return _unique(values)


def _unique(values: list) -> list:
    seen: list = []
    for v in values:
        if v not in seen:
            seen.append(v)
    return seen


@dataclass
class SweepSpace:
    """The grid: every combination is one trial."""

    lrs: list[float]
    weight_decays: list[float]
    freezes: list[str]
    optimizers: list[str]

    def trials(self) -> list[dict[str, Any]]:
        """All combinations; LR varies fastest so that a partial sweep covers whole LR curves first."""
        return [{"lr": lr, "weight_decay": wd, "freeze": fr, "optimizer": opt}
                for fr, opt, wd, lr in itertools.product(self.freezes, self.optimizers, self.weight_decays,
                                                         self.lrs)]

    def __len__(self) -> int:
        return len(self.lrs) * len(self.weight_decays) * len(self.freezes) * len(self.optimizers)


def trial_id(params: dict[str, Any]) -> str:
    """A stable name for a trial (the resume key and the per-trial folder name)."""
    return (f"lr{params['lr']:.4g}_wd{params['weight_decay']:.4g}_freeze-{params['freeze']}"
            f"_{params['optimizer']}")


def trial_config(config: FinetuneConfig, params: dict[str, Any]) -> FinetuneConfig:
    """The base config with one trial's swept values (what ``best_config.yaml`` holds for the best)."""
    return config.replace(**{k: params[k] for k in SWEPT_FIELDS})


# ----------------------------------------------------------------------------------------------------
# folds
# ----------------------------------------------------------------------------------------------------
def kfold_splits(train_set: ImageSet, val_set: ImageSet | None, k: int, seed: int = 0
                 ) -> list[tuple[ImageSet, ImageSet]]:
    """Stratified k folds over train + val: each class is shuffled (seeded) and dealt round-robin, so
    every fold holds ~1/k of each class. Returns ``[(train_k, val_k), ...]``.

    Raises:
        ConfigError: k < 2. DataError: a class has fewer than k images (it could not be in every fold).
    """
    if int(k) < 2:
        raise ConfigError(f"--folds {k}: cross-validation needs at least 2 folds")
    classes = list(train_set.classes)
    items = list(train_set.items) + (list(val_set.items) if val_set is not None else [])
    by_class: dict[int, list[tuple[str, int]]] = {}
    for path, label in sorted(set(items)):  # sorted: the folds do not depend on the scan order
        by_class.setdefault(label, []).append((path, label))
    small = [(classes[c], len(v)) for c, v in by_class.items() if len(v) < k]
    if small:
        name, n = small[0]
        raise DataError(f"class {name!r} has {n} image(s), fewer than --folds {k}; use fewer folds")
    rng = random.Random(seed)
    folds: list[list[tuple[str, int]]] = [[] for _ in range(k)]
    offset = 0
    for label in sorted(by_class):
        members = by_class[label]
        rng.shuffle(members)
        for i, item in enumerate(members):
            folds[(offset + i) % k].append(item)
        offset += len(members)  # continue the deal where the last class stopped: balanced fold sizes
    splits = []
    for i in range(k):
        train = [it for j, f in enumerate(folds) if j != i for it in f]
        splits.append((ImageSet(items=train, classes=classes), ImageSet(items=list(folds[i]), classes=classes)))
    return splits


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
    skipped: int = 0                    # trials found finished in results.jsonl (resume)

    def table(self) -> list[dict[str, Any]]:
        """Rows for printing/CSV: rank, the swept values, the metric (+- std), status."""
        rows = []
        for rank, t in enumerate(self.trials, 1):
            rows.append({"rank": rank if t.status == "ok" else "-", **t.params, self.metric: t.metric,
                         f"{self.metric}_std": t.metric_std, "val_loss": t.val_loss, "val_acc": t.val_acc,
                         "best_epoch": t.best_epoch, "epochs": t.epochs_run, "seconds": round(t.seconds, 1),
                         "status": t.status, "id": t.id})
        return rows


def _json_safe(value: Any) -> Any:
    # JSON has no NaN: write null (read back as NaN).
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_json_safe(v) for v in value]
    return value


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
        fh.write(json.dumps(_json_safe(record)) + "\n")
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
    title = "sweep"
    if result.best is not None:
        p = result.best.params
        title = (f"best {result.metric} {result.best.metric:.4g}: lr {p['lr']:.2g}, wd {p['weight_decay']:.2g}, "
                 f"freeze {p['freeze']}, {p['optimizer']}")
    ax.set_title(title, fontsize=9)
    ax.grid(True, which="both", alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8)
    fig.tight_layout()
    save_png(fig, path)


# ----------------------------------------------------------------------------------------------------
# the sweep
# ----------------------------------------------------------------------------------------------------
def _fit_metrics(result: Any) -> tuple[float, float, int | None, int]:
    """(val_loss, val_acc, best_epoch, epochs run) of a FitResult, from its best-epoch history row."""
    history = list(getattr(result, "history", []) or [])
    best_epoch = getattr(result, "best_epoch", None)
    row = next((r for r in history if r.get("epoch") == best_epoch), None)
    metrics = dict(getattr(result, "metrics", {}) or {})
    loss = metrics.get("val_loss", row.get("val_loss") if row else math.nan)
    acc = metrics.get("val_acc", row.get("val_acc") if row else math.nan)
    return (math.nan if loss is None else float(loss), math.nan if acc is None else float(acc),
            best_epoch, len(history))


def _fixed_options(config: FinetuneConfig, folds: int, n_train: int, n_val: int) -> dict[str, Any]:
    fixed = {k: v for k, v in config.to_dict().items() if k not in SWEPT_FIELDS and k != "quiet"}
    return {"config": fixed, "folds": folds, "n_train": n_train, "n_val": n_val}


def sweep(model_factory: Callable[[], Any], stages: Sequence[Sequence[str]], data_config: dict,
          train_set: ImageSet, val_set: ImageSet, config: FinetuneConfig, *, head: str, out_dir: str | Path,
          lrs: Sequence[float], weight_decays: Sequence[float] | None = None,
          freezes: Sequence[str] | None = None, optimizers: Sequence[str] | None = None, folds: int = 0,
          resume: bool = False, keep_runs: bool = False, log: Callable[[str], None] | None = None,
          fit_fn: Callable[..., Any] | None = None) -> SweepResult:
    """Run every combination of the swept values as a short ``fit`` and rank them.

    Each trial starts from a fresh ``model_factory()`` (torch is seeded with ``config.seed`` just before
    the call, so a factory with random layers builds the same model every time) and runs
    ``fit(model, stages, data_config, train, val, trial_config, head=head)``; ``config.epochs`` sets the
    trial length and ``config.monitor`` the ranking metric. With ``folds`` >= 2 every trial runs on each
    of :func:`kfold_splits` (train + val pooled) and reports the mean and std.

    Args:
        lrs, weight_decays, freezes, optimizers: the grid; None keeps the config's value.
        out_dir: results folder (see the module docstring).
        resume: skip trials already in ``out_dir/results.jsonl`` (the fixed options must match).
        keep_runs: give each trial a run folder (``out_dir/trials/<id>[/fold-k]``) with its curves and
            checkpoints; off by default (faster, smaller).
        log: called with one line per finished trial.
        fit_fn: the training function (default ``finetune.train.fit``); it is given
            ``feature_cache=``, one :class:`finetune.features.FeatureCache` for the whole sweep, so the
            backbone features of a head-only trial are computed once and shared by every trial.
    Returns:
        SweepResult, best first; ``best_config.yaml`` holds ``trial_config(config, best.params)``.
    Raises:
        ConfigError: empty grid, bad values, an existing sweep in ``out_dir`` without ``resume``, or a
            resume whose fixed options differ. Trials that diverge are recorded, not raised.
    """
    if fit_fn is None:
        fit_fn = fit
    features = FeatureCache(None)   # shared by the trials: same (model, data, view) -> computed once
    space = SweepSpace(
        lrs=[float(v) for v in lrs],
        weight_decays=[float(v) for v in (weight_decays if weight_decays is not None else [config.weight_decay])],
        freezes=[str(v) for v in (freezes if freezes is not None else [config.freeze])],
        optimizers=[str(v) for v in (optimizers if optimizers is not None else [config.optimizer])])
    if not len(space):
        raise ConfigError("the sweep grid is empty; give at least one value per option")
    for fr in space.freezes:
        parse_freeze(fr, len(stages))  # a bad depth fails now, not in trial 7
    bad_opt = [o for o in space.optimizers if o not in OPTIMIZERS]
    if bad_opt:
        raise ConfigError(f"--optimizer: {', '.join(bad_opt)} not known; choose from {', '.join(OPTIMIZERS)}")
    for params in space.trials():
        trial_config(config, params)  # FinetuneConfig validates each value (lr > 0 ...)
    metric = config.monitor
    folds = int(folds or 0)
    splits = kfold_splits(train_set, val_set, folds, config.seed) if folds >= 2 else [(train_set, val_set)]

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    jsonl, spec_path = out / "results.jsonl", out / "sweep.json"
    fixed = _fixed_options(config, folds, len(train_set), len(val_set) if val_set is not None else 0)
    spec = {"fixed": fixed, "grid": asdict(space), "metric": metric}
    done: dict[str, TrialResult] = {}
    if jsonl.exists() and jsonl.stat().st_size > 0:
        if not resume:
            raise ConfigError(f"{out} already holds a sweep; pass --resume to continue it or choose another --out")
        previous = json.loads(spec_path.read_text(encoding="utf-8")) if spec_path.exists() else {}
        if _json_safe(previous.get("fixed")) != json.loads(json.dumps(_json_safe(fixed))):
            raise ConfigError(f"{out}: the sweep there used other fixed options (epochs, folds, data...); "
                              "resume with the same options or choose another --out")
        done = _read_jsonl(jsonl)
    atomic_write_text(spec_path, json.dumps(_json_safe(spec), indent=2) + "\n")

    trials = space.trials()
    results: list[TrialResult] = []
    skipped = 0
    for n, params in enumerate(trials, 1):
        tid = trial_id(params)
        if tid in done:
            results.append(done[tid])
            skipped += 1
            continue
        cfg = trial_config(config, params).replace(quiet=True)
        t0 = time.perf_counter()
        fold_metrics: list[float] = []
        losses: list[float] = []
        accs: list[float] = []
        best_epoch, epochs_run, status, message = None, 0, "ok", ""
        for k, (tr, va) in enumerate(splits):
            torch.manual_seed(config.seed)
            model = model_factory()
            run_dir = None
            if keep_runs:
                run_dir = out / "trials" / tid / (f"fold-{k}" if len(splits) > 1 else "")
            try:
                res = fit_fn(model, stages, data_config, tr, va, cfg, head=head, run_dir=run_dir,
                             feature_cache=features)
            except DivergedError as err:
                status, message = "diverged", str(err)
                break
            finally:
                del model
            loss, acc, best_epoch, epochs_run = _fit_metrics(res)
            losses.append(loss)
            accs.append(acc)
            fold_metrics.append(acc if metric == "val_acc" else loss)
        if status == "ok":
            mean = statistics.fmean(fold_metrics)
            std = statistics.stdev(fold_metrics) if len(fold_metrics) > 1 else 0.0
            trial = TrialResult(tid, params, "ok", mean, std, statistics.fmean(losses), statistics.fmean(accs),
                                fold_metrics, best_epoch if len(splits) == 1 else None, epochs_run,
                                time.perf_counter() - t0)
        else:
            trial = TrialResult(tid, params, status, math.nan, math.nan, fold_metrics=fold_metrics,
                                seconds=time.perf_counter() - t0, message=message)
        _append_jsonl(jsonl, trial.to_dict())
        results.append(trial)
        if log is not None:
            what = (f"{metric} {trial.metric:.4g}" + (f" +- {trial.metric_std:.2g}" if len(splits) > 1 else "")
                    if trial.status == "ok" else f"diverged ({message})")
            log(f"trial {n}/{len(trials)} lr {params['lr']:.2e} wd {params['weight_decay']:.2g} "
                f"freeze {params['freeze']} {params['optimizer']}: {what} ({trial.seconds:.1f} s)")
        # Partial results stay readable while the sweep runs.
        _write_csv(SweepResult(_rank(results, metric), metric, None, None, out, folds), out / "results.csv")

    if log is not None and (features.computed or features.hits):
        log(f"features: {features.computed} bank(s) computed once, reused {features.hits} time(s) by later trials")
    ranked = _rank(results, metric)
    best = ranked[0] if ranked and ranked[0].status == "ok" else None
    best_config = trial_config(config, best.params) if best is not None else None
    result = SweepResult(ranked, metric, best, best_config, out, folds, skipped)
    _write_csv(result, out / "results.csv")
    if best_config is not None:
        save_config(best_config, out / "best_config.yaml")
    write_sweep_plot(result, out / "sweep.png")
    return result
