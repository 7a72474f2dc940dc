"""``fit``: the recipe end to end on any ``nn.Module`` (the package's entry point, a tool on the engine).

One setup (``finetune.engine.build_setup``), one phase loop (``finetune.engine.Trainer``); the head
phase trains on cached backbone features when ``config.fast_head`` allows it (``finetune.tools.features``).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

from torch import nn

from finetune.core.config import FinetuneConfig
from finetune.engine import FitResult, RunFolder, Trainer, build_setup, caller_state_kept
from finetune.core.errors import ConfigError
from finetune.tools.features import CachedHeadSteps, FeatureCache

__all__ = ["fit", "FitResult"]

Log = Callable[[str], None]


def fit(model: nn.Module, stages: Sequence[Sequence[str]], data_config: dict, train_set, val_set,
        config: FinetuneConfig, *, head: str, run_dir: str | Path | None = None, resume: bool = False,
        log: Log | None = None, callbacks: Iterable[Callable[[dict], Any]] = (), reset_head: bool = True,
        feature_cache: FeatureCache | None = None) -> FitResult:
    """Finetune ``model`` on ``train_set`` following the recipe: new head, freeze decision, BatchNorm
    policy, an optional head phase, the finetune phase, early stopping, a checkpoint per epoch.

    A library call: the process's global random streams (Python, NumPy, torch), cudnn.benchmark, signal handlers,
    thread count and warnings filters are as the caller left them when it returns or raises, and its worker
    processes and threads have ended. Callable again in the same process, and from another thread.

    Args:
        model: a pretrained network (modified in place: new head, freezing, BatchNorm policy).
        stages: module-name prefixes per stage, input -> output, classifier excluded.
        data_config: timm-style preprocessing (input_size, interpolation, crop_pct, mean, std).
        train_set, val_set: ``finetune.data.ImageSet`` with the same ``classes``.
        config: every option (FinetuneConfig).
        head: module name of the classifier.
        run_dir: the run folder (config.yaml, manifest.json, metrics.csv, curves.png, checkpoints/,
            summary.json); None trains without writing anything (and cannot be resumed).
        resume: continue from ``run_dir/checkpoints/last.pt``; with ``config.micro_batch`` 0, in the passes
            run_dir/config.yaml records, a given one is recorded there (``RunFolder.resume_passes``).
        log: receives one-line messages (the CLI passes a stderr printer); only called on rank 0.
        callbacks: each is called with the history row after its epoch has been checkpointed; raising
            KeyboardInterrupt there stops the run like Ctrl-C.
        reset_head: False when the model's head was already replaced for these classes.
        feature_cache: where the head phase's backbone features are kept; share one between runs on
            the same model and data (a sweep, the LR range test before ``fit``) to compute them once.
    Returns:
        FitResult with the best epoch's weights restored into ``model``.
    Raises:
        ConfigError, DataError: bad options or data. DivergedError: NaN/inf loss (the last good
        checkpoint is kept). Interrupted: Ctrl-C/SIGTERM (the message says how to resume).
        CheckpointError: a checkpoint cannot be written or read.
    """
    if resume and run_dir is None:
        raise ConfigError("resume needs the run folder: pass run_dir")
    # the run seeds Python's, NumPy's and torch's global generators (the head's init, each epoch's dropout and
    # workers=0 draws) and sets cudnn.benchmark: the caller's are put back when it returns or raises
    with caller_state_kept():
        return _fit(model, stages, data_config, train_set, val_set, config, head=head, run_dir=run_dir,
                    resume=resume, log=log, callbacks=callbacks, reset_head=reset_head, feature_cache=feature_cache)


def _fit(model: nn.Module, stages: Sequence[Sequence[str]], data_config: dict, train_set, val_set,
         config: FinetuneConfig, *, head: str, run_dir: str | Path | None, resume: bool, log: Log | None,
         callbacks: Iterable[Callable[[dict], Any]], reset_head: bool, feature_cache: FeatureCache | None) -> FitResult:
    if resume:      # (before the set-up: its checks and the cached head's feature passes take these passes)
        config = RunFolder(run_dir).resume_passes(config)
    setup = build_setup(model, stages, data_config, train_set, val_set, config, head=head, reset_head=reset_head)
    main_log = log if setup.info.is_main else None
    head_steps = CachedHeadSteps(setup, feature_cache, log=main_log) if setup.cached_head else None
    trainer = Trainer(setup, RunFolder(run_dir, setup.info), resume=resume, log=log, callbacks=callbacks,
                      head_steps=head_steps)
    try:
        return trainer.run()
    finally:
        trainer.loader_steps.close()     # the kept validation batches go now, not when a gc finds the trainer
        setup.close()      # worker processes and prefetch threads end with the run, not at exit
