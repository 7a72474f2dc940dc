"""finetune: a training engine for any nn.Module (the lecture's transfer-learning recipe).

Knows nothing of the zoo registry; ``zoo`` hands it a model, its stage list and data config.
Layers, one folder each (imports run downward only): ``tools`` (``train.fit``, ``features``, ``diagnostics``,
``sweep``, ``doctor``, ``pages``) -> ``engine`` -> ``data`` -> ``core`` (config, errors, io, seeding, policy, ...).
"""
from __future__ import annotations

import importlib

__all__ = ["fit", "FinetuneConfig", "FinetuneError"]

_LAZY = {
    "fit": "finetune.tools.train",
    "FinetuneConfig": "finetune.core.config",
    "FinetuneError": "finetune.core.errors",
}


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'finetune' has no attribute {name!r}")
