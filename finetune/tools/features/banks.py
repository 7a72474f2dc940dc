"""A split's bank from its parts: the ranks' shards gathered under torchrun, a cached bank every rank agrees on
(a plain bank: also the plain view of its mirrored bank), a plain bank joined with its mirror view, a bank on the
device (``CachedHeadSteps``' helpers; ``zoo doctor``'s cache lookup)."""
from __future__ import annotations

import torch

from finetune.core import distributed as ddp
from finetune.core.errors import FinetuneError
from finetune.tools.features.cache import FeatureBank, FeatureCache

# Feature banks bigger than this stay on the host and are gathered per batch on an accelerator.
_DEVICE_RESIDENT_BYTES = 4 << 30


def _gather_bank(parts: list[FeatureBank | None], n: int, info: ddp.DistInfo) -> FeatureBank:
    """One split's bank from this process's parts (one per view; None: no image of the shard decoded):
    under torchrun, the ranks' strided shards gathered in item order, on every rank."""
    views = [p for p in parts if p is not None]
    if not info.enabled:
        return FeatureBank(torch.cat([p.features for p in views]), views[0].labels, views[0].feature_shape)
    shape = next((sh for sh in ddp.gather_objects(views[0].feature_shape if views else None, info)
                  if sh is not None), None)
    if shape is None:
        raise FinetuneError("no image of this split could be decoded; check the data folder")
    mine = len(range(info.rank, n, info.world_size))
    feats = torch.cat([p.features for p in views]).transpose(0, 1).contiguous() if views else None
    labels = views[0].labels if views else torch.full((mine,), -1, dtype=torch.int64)
    all_feats = ddp.gather_strided(feats, n, info).transpose(0, 1).contiguous()
    return FeatureBank(all_feats, ddp.gather_strided(labels, n, info), tuple(shape))


def mirrored(extra: dict) -> dict:
    """The cache key's ``extra`` of the two-view bank (view 0 plain, view 1 the mirror) whose plain view is the
    single-view bank keyed with ``extra`` (``feature_cache_key``: the same split, data, weights, transform)."""
    return {**extra, "mirror": True}


def agreed_load(cache: FeatureCache, key: str, info: ddp.DistInfo, *, view_of: str | None = None
                ) -> FeatureBank | None:
    """The bank cached under ``key``, or None. Under torchrun every rank answers the same: the bank only where
    every rank holds one of the same sha256 (machines that cached theirs apart, on other runs, GPUs or precisions,
    hold banks that differ in their last bits, and each rank judges the head on its own, early stopping too).

    ``view_of``: the key (``mirrored``) of the two-view bank whose view 0 this plain bank is, taken (under the same
    rule) where ``key`` is not cached: a default run's training bank holds ``zoo doctor``'s features, forwarded
    as doctor forwards them but in the run's batches (their last bits may differ, as the shared val bank's may;
    docs/benchmarks.md, "The plain bank from a cached mirrored one": the same bits there)."""
    bank = _agreed(cache, key, info)
    if bank is None and view_of is not None:
        both = _agreed(cache, view_of, info)
        if both is not None and both.views == 2:
            bank = FeatureBank(both.features[:1], both.labels, both.feature_shape, plain_of_mirrored=True)
    return bank


def _agreed(cache: FeatureCache, key: str, info: ddp.DistInfo) -> FeatureBank | None:
    bank = cache.load(key)
    if not info.enabled:
        return bank
    digests = ddp.gather_objects(None if bank is None else bank.digest, info)
    return bank if digests[0] is not None and all(d == digests[0] for d in digests) else None


def join_mirror(plain: FeatureBank, mirrored: FeatureBank) -> FeatureBank:
    """The two-view bank ``_extract(..., mirror=True)`` gives (view 0 plain, view 1 the mirror) from a cached
    plain bank and a pass of the mirror alone over the same images (an image either pass failed to decode: -1)."""
    if plain.features.shape[1:] != mirrored.features.shape[1:] or plain.feature_shape != mirrored.feature_shape:
        raise FinetuneError("the cached plain features and the mirror's differ in shape; clear the feature cache")
    both = (plain.labels >= 0) & (mirrored.labels >= 0)
    feats = torch.cat([plain.features[:1], mirrored.features[:1]])
    feats[:, ~both] = 0.0
    return FeatureBank(feats, torch.where(both, plain.labels, -1), plain.feature_shape)


def _bank_to(bank: FeatureBank, device: torch.device) -> torch.Tensor:
    feats = bank.features
    if device.type != "cpu" and feats.numel() * 4 <= _DEVICE_RESIDENT_BYTES:
        return feats.to(device)
    return feats
