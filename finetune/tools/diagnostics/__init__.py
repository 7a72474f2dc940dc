"""The lecture's diagnostics, tools on the engine: the LR range test and the overfit-a-tiny-subset check.
Both build the very setup ``fit`` trains (``finetune.engine.build_setup``), on a copy of the model.
(The per-epoch curves and advice are ``finetune.core.monitor``: the training loop itself writes them.)"""
from __future__ import annotations

from finetune.tools.diagnostics.lrfind import (LRFindResult, lr_find, lr_schedule, suggest_edge, suggest_steepest,
                                         suggest_valley, write_lr_plot)
from finetune.tools.diagnostics.overfit import OverfitResult, disable_dropout, fixed_batch_count, overfit_check

__all__ = ["LRFindResult", "lr_find", "lr_schedule", "suggest_edge", "suggest_steepest", "suggest_valley",
           "write_lr_plot", "OverfitResult", "overfit_check", "disable_dropout",
           "fixed_batch_count"]
