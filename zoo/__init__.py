"""zoo: a curated registry of pretrained vision models, their weights cache, and finetuned bundles.

The public API is imported lazily so that ``import zoo`` (and ``zoo list``) never imports torch.
"""
from __future__ import annotations

import importlib

__version__ = "0.1.0"

__all__ = [
    "list_models", "get_entry", "pull", "create_model", "load_bundle",
    "ZooError",
]

_LAZY = {
    "list_models": "zoo.registry",
    "get_entry": "zoo.resolve",
    "pull": "zoo.sources",
    "create_model": "zoo.build",
    "load_bundle": "zoo.bundle",
    "ZooError": "zoo.errors",
}


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'zoo' has no attribute {name!r}")
