"""Grid search in log space over learning rate, weight decay, freeze depth and optimizer, each trial a
short finetune through ``finetune.tools.train.fit``; optional stratified k-fold cross-validation.

Results go to ``out_dir``: ``results.jsonl`` (one line per finished trial, appended as it finishes: the
resume log), ``results.csv`` (all trials, sorted by the validation metric), ``sweep.png`` (metric vs LR
per freeze depth), ``best_config.yaml`` (the best trial's FinetuneConfig, for ``zoo finetune --config``)
and ``sweep.json`` (the last grid and the fixed options, checked on ``resume``; the data folder's path). A resume
may change the grid (extend it); the fixed options must stay, so every trial of ``results.jsonl`` is ranked in the
others.

The parts: ``space`` (the grid, trial configs, k-fold splits), ``results`` (trial records, results.jsonl /
results.csv, the plot) and ``run`` (:func:`sweep`).
"""
from __future__ import annotations

from finetune.tools.sweep.results import SweepResult, TrialResult
from finetune.tools.sweep.run import finished_trials, sweep
from finetune.tools.sweep.space import (SWEPT_FIELDS, SweepSpace, check_folds, kfold_splits, parse_choices,
                                         parse_values, trial_config)

__all__ = ["finished_trials", "parse_values", "parse_choices", "SweepSpace", "TrialResult", "SweepResult",
           "kfold_splits", "check_folds", "trial_config", "sweep", "SWEPT_FIELDS"]
