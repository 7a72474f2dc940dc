"""``sweep``: every trial of the grid as a short ``fit``, recorded as it finishes, ranked at the end."""
from __future__ import annotations

import functools
import json
import math
import os
import statistics
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from finetune.core.config import OPTIMIZERS, FinetuneConfig, save_config
from finetune.data import ImageSet
from finetune.core.errors import ConfigError, DivergedError
from finetune.tools.features import FeatureCache
from finetune.core.io import json_safe, printable_name, write_json
from finetune.core.metrics import metric_text
from finetune.core.policy import parse_freeze
from finetune.tools.sweep.results import (SweepResult, TrialResult, _append_jsonl, _rank, _read_jsonl,
                                     _write_csv, write_sweep_plot)
from finetune.tools.sweep.space import SWEPT_FIELDS, SweepSpace, kfold_splits, trial_config, trial_id
from finetune.tools.train import fit


# ----------------------------------------------------------------------------------------------------
# the sweep
# ----------------------------------------------------------------------------------------------------
def _fit_metrics(result: Any) -> tuple[float, float, int | None, int, bool]:
    """(val_loss, val_acc, best_epoch, epochs run, solved) of a FitResult, from its best-epoch history row;
    solved: that epoch is a head solved by L-BFGS (its row names the solver), which used no learning rate."""
    history = list(getattr(result, "history", []) or [])
    best_epoch = getattr(result, "best_epoch", None)
    row = next((r for r in history if r.get("epoch") == best_epoch), None)
    metrics = dict(getattr(result, "metrics", {}) or {})
    loss = metrics.get("val_loss", row.get("val_loss") if row else math.nan)
    acc = metrics.get("val_acc", row.get("val_acc") if row else math.nan)
    return (math.nan if loss is None else float(loss), math.nan if acc is None else float(acc),
            best_epoch, len(history), bool(row and row.get("solver")))


def _fixed_options(config: FinetuneConfig, folds: int, n_train: int, n_val: int,
                   identity: dict[str, Any] | None) -> dict[str, Any]:
    fixed = {k: v for k, v in config.to_dict().items() if k not in SWEPT_FIELDS and k != "quiet"}
    return {"config": fixed, "folds": folds, "n_train": n_train, "n_val": n_val,
            **({"identity": identity} if identity is not None else {})}


def sweep(model_factory: Callable[[], Any], stages: Sequence[Sequence[str]], data_config: dict,
          train_set: ImageSet, val_set: ImageSet, config: FinetuneConfig, *, head: str, out_dir: str | Path,
          lrs: Sequence[float], weight_decays: Sequence[float] | None = None,
          freezes: Sequence[str] | None = None, optimizers: Sequence[str] | None = None, folds: int = 0,
          resume: bool = False, keep_runs: bool = False, log: Callable[[str], None] | None = None,
          fit_fn: Callable[..., Any] | None = None, feature_cache: FeatureCache | None = None,
          identity: dict[str, Any] | None = None, data_dir: str | Path | None = None) -> SweepResult:
    """Run every combination of the swept values as a short ``fit`` and rank them.

    Each trial starts from a fresh ``model_factory()`` (torch is seeded with ``config.seed`` just before
    the call, so a factory with random layers builds the same model every time) and runs
    ``fit(model, stages, data_config, train, val, trial_config, head=head)``; ``config.epochs`` sets the
    trial length and ``config.monitor`` the ranking metric. With ``folds`` >= 2 every trial runs on each
    of :func:`kfold_splits` (train + val pooled) and reports the mean and std.

    Args:
        lrs, weight_decays, freezes, optimizers: the grid; None keeps the config's value.
        out_dir: results folder (see the module docstring).
        resume: skip trials already in ``out_dir/results.jsonl`` (the fixed options and ``identity`` must
            match). Recorded trials outside this grid (an earlier grid, extended now) are ranked with it: every
            trial in ``out_dir`` ran with the same fixed options and identity (each resume checks them), so the
            table, best config and plot cover them all (``SweepResult.earlier`` counts them). A sweep recorded
            without an identity (before it was recorded) resumes, but its trials outside this grid are not
            ranked: nothing says they trained the same model on the same data.
        keep_runs: give each trial a run folder (``out_dir/trials/<id>[/fold-k]``) with its curves and
            checkpoints; off by default (faster, smaller).
        log: called with one line per finished trial.
        fit_fn: the training function (default ``finetune.tools.train.fit``); it is given
            ``feature_cache=``, one :class:`finetune.tools.features.FeatureCache` for the whole sweep, so the
            backbone features of a head-only trial are computed once and shared by every trial.
        feature_cache: where those features are kept (default: in memory; on disk, later runs share them).
        identity: what the trials train beyond the config (the CLI's: the model, its starting weights, the
            data's fingerprint), recorded in sweep.json and checked on resume; ``data_dir``, the data folder, is
            recorded there too (absolute: the lines naming the best trial's new run give it), not checked.
    Returns:
        SweepResult, best first; ``best_config.yaml`` holds ``trial_config(config, best.params)``.
    Raises:
        ConfigError: empty grid, bad values, an existing sweep in ``out_dir`` without ``resume``, or a
            resume whose fixed options differ. Trials that diverge are recorded, not raised.
    """
    if fit_fn is None:
        fit_fn = fit
    features = feature_cache if feature_cache is not None else FeatureCache(None)   # shared by the trials
    space = _grid(config, len(stages), lrs, weight_decays, freezes, optimizers)
    metric = config.monitor
    folds = int(folds or 0)
    splits = kfold_splits(train_set, val_set, folds, config.seed) if folds else [(train_set, val_set)]   # 1: refused

    out = Path(out_dir)
    jsonl = out / "results.jsonl"
    fixed = _fixed_options(config, folds, len(train_set), len(val_set) if val_set is not None else 0, identity)
    done, identified = _start(out, jsonl, {"fixed": fixed, "grid": asdict(space), "metric": metric}, resume, data_dir)

    fit_one = functools.partial(_fit_split, seed=config.seed, model_factory=model_factory, fit_fn=fit_fn,
                                stages=stages, data_config=data_config, head=head, features=features,
                                trials_dir=out / "trials" if keep_runs else None, n_splits=len(splits))

    trials = space.trials()
    # A resume with another grid extends the sweep: the trials of the earlier grids stay in the ranking.
    ids = {trial_id(p) for p in trials}
    results: list[TrialResult] = [t for tid, t in done.items() if tid not in ids] if identified else []
    earlier = len(results)
    skipped = 0
    for n, params in enumerate(trials, 1):
        tid = trial_id(params)
        if tid in done:
            results.append(done[tid])
            skipped += 1
            continue
        trial = _run_trial(tid, params, config, splits, metric, fit_one)
        _append_jsonl(jsonl, trial.to_dict())
        results.append(trial)
        if log is not None:
            log(_trial_line(trial, f"{n}/{len(trials)}", metric, len(splits)))
        # Partial results stay readable while the sweep runs.
        _write_csv(SweepResult(_rank(results, metric), metric, None, None, out, folds), out / "results.csv")

    if log is not None and (features.computed or features.hits):
        log(_features_line(features))
    return _write_results(results, config, out, folds, skipped, earlier)


def _trial_line(trial: TrialResult, position: str, metric: str, n_splits: int) -> str:
    """The line a finished trial logs: its values, its metric (mean +- std over folds) or its divergence."""
    params = trial.params
    what = (f"{metric} {metric_text(metric, trial.metric)}"
            + (f" +- {metric_text(metric, trial.metric_std, '.2g')}" if n_splits > 1 else "")
            if trial.status == "ok" else f"diverged ({trial.message})")
    return (f"trial {position} lr {params['lr']:.2e} wd {params['weight_decay']:.2g} freeze {params['freeze']} "
            f"{params['optimizer']}: {what} ({trial.seconds:.1f} s)")


def _write_results(results: list[TrialResult], config: FinetuneConfig, out: Path, folds: int, skipped: int,
                   earlier: int) -> SweepResult:
    """Rank the trials; write results.csv, best_config.yaml (the best trial's config) and sweep.png."""
    ranked = _rank(results, config.monitor)
    best = ranked[0] if ranked and ranked[0].status == "ok" else None
    best_config = trial_config(config, best.params) if best is not None else None
    result = SweepResult(ranked, config.monitor, best, best_config, out, folds, skipped, earlier)
    _write_csv(result, out / "results.csv")
    if best_config is not None:
        save_config(best_config, out / "best_config.yaml")
    write_sweep_plot(result, out / "sweep.png")
    return result


def _features_line(features: FeatureCache) -> str:
    """How the trials got their backbone features: computed here and reused by the later trials, or loaded
    from a cache an earlier run filled (a resumed sweep, or a disk cache: nothing computed, nothing "reused
    by later trials")."""
    earlier = features.earlier_hits
    later = features.hits - earlier
    parts = []
    if features.computed:
        parts.append(f"{features.computed} bank(s) computed once, reused {later} time(s) by later trials")
    if earlier:
        parts.append(f"{earlier} bank load(s) from the feature cache, computed by an earlier run"
                     + ("" if features.computed else "; none computed"))
    return "features: " + "; ".join(parts)


def finished_trials(out_dir: str | Path, config: FinetuneConfig, n_stages: int, lrs: Sequence[float],
                    weight_decays: Sequence[float] | None = None, freezes: Sequence[str] | None = None,
                    optimizers: Sequence[str] | None = None) -> int:
    """How many trials of this grid (``sweep``'s arguments) ``out_dir/results.jsonl`` holds: what a resume of an
    interrupted sweep skips (an extended sweep's earlier trials there are not among them)."""
    ids = {trial_id(p) for p in _grid(config, n_stages, lrs, weight_decays, freezes, optimizers).trials()}
    try:
        return len(ids & set(_read_jsonl(Path(out_dir) / "results.jsonl")))
    except OSError:
        return 0


def _grid(config: FinetuneConfig, n_stages: int, lrs: Sequence[float], weight_decays: Sequence[float] | None,
          freezes: Sequence[str] | None, optimizers: Sequence[str] | None) -> SweepSpace:
    """The swept values (None: the config's value), each checked before any trial runs."""
    space = SweepSpace(
        lrs=[float(v) for v in lrs],
        weight_decays=[float(v) for v in (weight_decays if weight_decays is not None else [config.weight_decay])],
        freezes=[str(v) for v in (freezes if freezes is not None else [config.freeze])],
        optimizers=[str(v) for v in (optimizers if optimizers is not None else [config.optimizer])])
    if not len(space):
        raise ConfigError("the sweep grid is empty; give at least one value per option")
    for fr in space.freezes:
        parse_freeze(fr, n_stages)  # a bad depth fails now, not in trial 7
    bad_opt = [o for o in space.optimizers if o not in OPTIMIZERS]
    if bad_opt:
        raise ConfigError(f"--optimizer: {', '.join(bad_opt)} not known; choose from {', '.join(OPTIMIZERS)}")
    for params in space.trials():
        trial_config(config, params)  # FinetuneConfig validates each value (lr > 0 ...)
    return space


def _start(out: Path, jsonl: Path, spec: dict[str, Any], resume: bool,
           data_dir: str | Path | None = None) -> tuple[dict[str, TrialResult], bool]:
    """Make ``out`` and write ``out/sweep.json`` (with ``data_dir``'s absolute path, which no resume checks: the
    same data may be reached at another path, the fingerprint is the check); the trials already in ``jsonl`` when
    resuming, and whether they are known to share this sweep's identity (a sweep recorded before identities
    were: not known). ConfigError: an existing sweep without ``resume``, or one whose fixed options or identity
    differ."""
    out.mkdir(parents=True, exist_ok=True)
    if data_dir is not None:
        spec = {**spec, "data_dir": printable_name(os.path.abspath(data_dir))}
    spec_path = out / "sweep.json"
    done: dict[str, TrialResult] = {}
    identified = True
    if jsonl.exists() and jsonl.stat().st_size > 0:
        if not resume:
            raise ConfigError(f"{out} already holds a sweep; pass --resume to continue it or choose another --out")
        previous = json.loads(spec_path.read_text(encoding="utf-8")) if spec_path.exists() else {}
        fixed = json.loads(json.dumps(json_safe(spec["fixed"])))
        recorded = _with_later_defaults(json_safe(previous.get("fixed")), fixed)
        if isinstance(recorded, dict) and "identity" in fixed and "identity" not in recorded:
            recorded, identified = {**recorded, "identity": fixed["identity"]}, False
        if recorded != fixed:
            raise ConfigError(f"{out}: the sweep there used other fixed options (model, epochs, folds, data...); "
                              "resume with the same options or choose another --out")
        done = _read_jsonl(jsonl)
    if not identified:      # its earlier trials stay unidentified: the record must not vouch for them later
        spec = {**spec, "fixed": {k: v for k, v in spec["fixed"].items() if k != "identity"}}
    write_json(spec_path, json_safe(spec), indent=2)
    return done, identified


def _with_later_defaults(fixed: Any, now: dict[str, Any]) -> Any:
    """A recorded sweep's fixed options, with those that ``now`` (this sweep's) has and it lacks, options added
    to FinetuneConfig since it was written, at their defaults (what that sweep trained with): it resumes unless
    one of them is set otherwise now."""
    if not isinstance(fixed, dict) or not isinstance(fixed.get("config"), dict):
        return fixed
    defaults = json.loads(json.dumps(json_safe(FinetuneConfig().to_dict())))
    later = {k: defaults[k] for k in now.get("config", {}) if k not in fixed["config"] and k in defaults}
    return {**fixed, "config": {**fixed["config"], **later}}


def _fit_split(tid: str, k: int, tr: ImageSet, va: ImageSet, cfg: FinetuneConfig, *, seed: int,
               model_factory: Callable[[], Any], fit_fn: Callable[..., Any], stages: Sequence[Sequence[str]],
               data_config: dict, head: str, features: FeatureCache, trials_dir: Path | None, n_splits: int) -> Any:
    """One trial on one split: a fresh model (torch seeded first), ``fit_fn``, the model released after."""
    torch.manual_seed(seed)
    model = model_factory()
    run_dir = None
    if trials_dir is not None:
        run_dir = trials_dir / tid / (f"fold-{k}" if n_splits > 1 else "")
    try:
        return fit_fn(model, stages, data_config, tr, va, cfg, head=head, run_dir=run_dir, feature_cache=features)
    finally:
        del model


def _run_trial(tid: str, params: dict[str, Any], config: FinetuneConfig, splits: list, metric: str,
               fit_one: Callable[..., Any]) -> TrialResult:
    """One grid point on every split: ``fit_one(tid, k, train, val, cfg)`` per split; a divergence ends it."""
    # the sweep's own --quiet: each trial's bars (``progress_bar``: cleared when done) show that a trial of minutes
    # is moving; its per-epoch lines stay off (fit is given no log)
    cfg = trial_config(config, params)
    t0 = time.perf_counter()
    fold_metrics: list[float] = []
    losses: list[float] = []
    accs: list[float] = []
    best_epoch, epochs_run, status, message = None, 0, "ok", ""
    solved = []
    for k, (tr, va) in enumerate(splits):
        try:
            res = fit_one(tid, k, tr, va, cfg)
        except DivergedError as err:
            status, message = "diverged", str(err)
            break
        loss, acc, best_epoch, epochs_run, solved_k = _fit_metrics(res)
        solved.append(solved_k)
        losses.append(loss)
        accs.append(acc)
        fold_metrics.append(acc if metric == "val_acc" else loss)
    if status == "ok":
        mean = statistics.fmean(fold_metrics)
        std = statistics.stdev(fold_metrics) if len(fold_metrics) > 1 else 0.0
        return TrialResult(tid, params, "ok", mean, std, statistics.fmean(losses), statistics.fmean(accs),
                           fold_metrics, best_epoch if len(splits) == 1 else None, epochs_run,
                           time.perf_counter() - t0, solved_head=all(solved))
    return TrialResult(tid, params, status, math.nan, math.nan, fold_metrics=fold_metrics,
                       seconds=time.perf_counter() - t0, message=message)
