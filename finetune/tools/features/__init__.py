"""The cached-feature head path, a tool on the engine: the frozen backbone runs once per view, the head
trains on its features (``CachedHeadSteps``, the head phase of ``fit``'s loop, of the LR range test and
of every sweep trial); banks are cached in memory or on disk (``FeatureCache``)."""
from __future__ import annotations

from finetune.tools.features.banks import agreed_load, mirrored
from finetune.tools.features.cache import (CACHE_FORMAT, FeatureBank, FeatureCache, backbone_digest, data_digest,
                                     feature_cache_key)
from finetune.tools.features.extract import extract_features
from finetune.tools.features.head import CachedHeadSteps

__all__ = ["FeatureBank", "FeatureCache", "CACHE_FORMAT", "extract_features", "feature_cache_key",
           "backbone_digest", "data_digest", "CachedHeadSteps", "agreed_load", "mirrored"]
