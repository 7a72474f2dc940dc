"""Cached-feature head path: the same loop trains the same head as the ordinary path, a cache that is
keyed and never trusts a bad file, features shared between runs."""
from __future__ import annotations

import json
import math
import os
import re
from pathlib import Path

import pytest
import torch
from torch import nn

from finetune.core.config import FinetuneConfig
from finetune.data import ImageDataset, ImageSet, build_transform, make_loader
from finetune.core.errors import FinetuneError
from finetune.data import set_epoch_order, set_loader_epoch, train_batches
from finetune.tools.features import FeatureBank, FeatureCache, backbone_digest, extract_features, feature_cache_key
from finetune.tools.features.head import _Targets
from finetune.core.surgery import replace_head
from finetune.tools.train import fit
from tests.conftest import make_image_folder
from tests.finetune.test_train import DEVICES

DATA_CONFIG = {"input_size": (3, 32, 32), "interpolation": "bilinear", "crop_pct": 1.0,
               "mean": (0.485, 0.456, 0.406), "std": (0.229, 0.224, 0.225)}


class Tiny(nn.Module):
    """Conv-BN-ReLU-pool backbone, dropout before the classifier (off in eval mode), head ``fc``."""

    def __init__(self, num_classes: int = 3) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 8, 3, stride=2), nn.BatchNorm2d(8), nn.ReLU(),
                                      nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.drop = nn.Dropout(0.5)
        self.fc = nn.Linear(8, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.drop(self.features(x)))


def _sets(root: Path, bad: bool = False) -> tuple[ImageSet, ImageSet]:
    make_image_folder(root, layout="split", per_class=6, val_per_class=2)
    classes = ["cat", "dog", "fox"]

    def items(split: str) -> list[tuple[str, int]]:
        return [(str(p), ci) for ci, c in enumerate(classes) for p in sorted((root / split / c).glob("*.png"))]

    train = items("train")
    if bad:  # an undecodable image: both paths must drop it from its batch
        broken = root / "train" / "cat" / "broken.png"
        broken.write_bytes(b"not a png")
        train.insert(3, (str(broken), 0))
    return ImageSet(train, classes), ImageSet(items("val"), classes)


def _model(seed: int = 0, head: str = "linear") -> nn.Module:
    torch.manual_seed(seed)
    model = Tiny()
    for p in model.parameters():
        p.requires_grad_(False)
    replace_head(model, "fc", 3, kind=head, hidden=16, dropout=0.3)
    for p in model.fc.parameters():
        p.requires_grad_(True)
    return model


def _config(**kw) -> FinetuneConfig:
    # head_solver="gradient": these tests are about the epoch loop on cached features (lbfgs: below).
    # channels_last off: the tests compare the slow path (through the network) with the cached one, and the
    # last-bit differences between layouts reach the MLP head's bias before BatchNorm (a direction of zero
    # true gradient that Adam steps on its rounding noise), so they are compared in NCHW, as they always were.
    base = dict(batch_size=5, workers=0, epochs=4, patience=2, lr=0.05, seed=3, schedule="cosine",
                optimizer="adam", amp=False, head_solver="gradient", device="cpu", channels_last=False)
    base.update(kw)
    return FinetuneConfig(**base)


STAGES = [["features"]]


def _fit(model: nn.Module, train: ImageSet, val: ImageSet | None, config: FinetuneConfig, **kw):
    """fit, head only, on a model whose head is already replaced (the backbone frozen by fit)."""
    cache_dir = kw.pop("cache_dir", None)
    if cache_dir is not None:
        kw["feature_cache"] = FeatureCache(cache_dir, log=kw.get("log"))
    data_config = kw.pop("data_config", DATA_CONFIG)
    return fit(model, STAGES, data_config, train, val, config.replace(freeze=kw.pop("freeze", "head")), head="fc",
               reset_head=False, **kw)


@pytest.mark.parametrize("head,sampler", [("linear", "random"), ("mlp", "balanced")])
def test_fast_path_matches_slow_path(tmp_path, head, sampler):
    """The same loop with cached features or with the frozen model re-run on every batch: same history
    (val losses, LRs), same head weights, same best epoch."""
    train, val = _sets(tmp_path / "d", bad=True)
    config = _config(sampler=sampler, head=head, augment="none")
    slow_model, fast_model = _model(head=head), _model(head=head)
    slow = _fit(slow_model, train, val, config.replace(fast_head=False))
    logs: list[str] = []
    fast = _fit(fast_model, train, val, config, log=logs.append)
    assert any("(cached features)" in m for m in logs)
    assert [r["phase"] for r in fast.history] == ["head"] * len(slow.history)
    assert [r["epoch"] for r in fast.history] == list(range(1, len(slow.history) + 1))
    for row, ref in zip(fast.history, slow.history):
        assert row["val_loss"] == pytest.approx(ref["val_loss"], rel=1e-4, abs=1e-5)
        assert row["lr"] == ref["lr"]
        assert set(row) == {"epoch", "phase", "train_loss", "train_acc", "val_loss", "val_acc", "lr",
                            "seconds", "images_per_s", "data_wait"}
    assert fast.best_epoch == slow.best_epoch
    # the final metrics come from the features (no second backbone pass) and equal the network's
    assert fast.metrics["val_loss"] == pytest.approx(slow.metrics["val_loss"], rel=1e-4, abs=1e-5)
    assert fast.metrics["confusion"] == slow.metrics["confusion"]
    assert fast.metrics["per_class"] == slow.metrics["per_class"]
    for (name, a), b in zip(slow_model.fc.state_dict().items(), fast_model.fc.state_dict().values()):
        torch.testing.assert_close(a.float(), b.float(), rtol=1e-4, atol=1e-5, msg=name)
    # The backbone is untouched.
    torch.testing.assert_close(slow_model.features[0].weight, fast_model.features[0].weight)


def test_fast_path_matches_slow_path_after_a_batch_of_undecodable_images(tmp_path):
    """Review of the cached head's dropout (helper-93): the slow path's loader yields a batch whose every image
    failed to decode as None, which takes its step number (``train_one_epoch`` skips it); the cached head dropped it
    from its batches, so every later step of the epoch drew the shared dropout masks (``engine.drops``) of the step
    before it, and an MLP head trained with other masks than the slow path's. Here the first batch of epoch 1 is
    made of undecodable images only (found from the training order, a function of the seed)."""
    train, val = _sets(tmp_path / "d")
    config = _config(head="mlp", augment="none", sampler="random", batch_size=6, epochs=2)
    order = train_batches(_Targets(train), 6, sampler="random", seed=int(config.seed))
    set_epoch_order(order.sampler, int(config.seed), 1)
    first = [i for i, _seed in next(iter(order))]
    for i in first:
        Path(train.items[i][0]).write_bytes(b"not a png")
    slow_model, fast_model = _model(head="mlp"), _model(head="mlp")
    slow = _fit(slow_model, train, val, config.replace(fast_head=False))
    logs: list[str] = []
    fast = _fit(fast_model, train, val, config, log=logs.append)
    assert any("(cached features)" in m for m in logs)
    for row, ref in zip(fast.history, slow.history):
        assert row["val_loss"] == pytest.approx(ref["val_loss"], rel=1e-4, abs=1e-5)
    for (name, a), b in zip(slow_model.fc.state_dict().items(), fast_model.fc.state_dict().values()):
        torch.testing.assert_close(a.float(), b.float(), rtol=1e-4, atol=1e-5, msg=name)


class _Keys(_Targets):
    def __getitem__(self, key):      # a loader over it yields the (index, epoch seed) keys themselves
        return key


@pytest.mark.parametrize("workers,sampler", [(0, "random"), (1, "random"), (0, "balanced"), (1, "balanced")])
def test_batch_order_is_the_loaders(tmp_path, workers, sampler):
    """The cached head iterates the training order (data.train_batches) without a DataLoader: the batches a
    loader yields are exactly those, with any worker count, in every epoch (this fails loudly if a
    DataLoader ever batches its sampler differently)."""
    items = [(f"img{i}.png", i % 3) for i in range(23)]
    image_set = ImageSet(items, ["a", "b", "c"])
    real = make_loader(_Keys(image_set), 4, train=True, workers=workers, sampler=sampler, seed=5)
    order = train_batches(_Targets(image_set), 4, sampler=sampler, seed=5)
    orders = []
    for epoch in (1, 2, 3):
        set_loader_epoch(real, 5, epoch)
        seen = [list(zip(*(k.tolist() for k in b))) for b in real]
        set_epoch_order(order.sampler, 5, epoch)
        assert seen == [list(b) for b in order]
        orders.append(seen)
    assert orders[0] != orders[1]
    assert len(order) == len(real)
    set_epoch_order(order.sampler, 5, 2)     # a function of (seed, epoch) alone: epoch 2 again
    assert [list(b) for b in order] == orders[1]


def test_extract_features_restores_head_and_modes(tmp_path):
    train, _ = _sets(tmp_path / "d")
    model = _model()
    model.train()
    head_before = model.fc
    ds = ImageDataset(train, build_transform(DATA_CONFIG, False))
    feats, labels = extract_features(model, "fc", ds, batch_size=7)
    assert feats.shape == (len(train.items), 8)
    assert labels.tolist() == [y for _, y in train.items]
    assert model.fc is head_before and model.training and model.drop.training
    model.eval()
    with torch.no_grad():
        x = torch.stack([ds[i][0] for i in range(3)])
        torch.testing.assert_close(model.features(x), feats[:3], rtol=1e-4, atol=1e-5)


def test_fixed_shape_extraction_pads_the_last_batch_and_keeps_the_features(tmp_path):
    """On CUDA the feature pass feeds every batch at one shape (the last padded with zeros): the real
    rows' features are those of the unpadded pass, the mirror view too (forced here on the CPU)."""
    from finetune.tools.features.extract import _extract

    train, _ = _sets(tmp_path / "d")
    model = _model()
    ds = ImageDataset(train, build_transform(DATA_CONFIG, False))
    assert len(ds) % 7, "the last batch must be partial"
    shapes = []
    hook = model.features.register_forward_hook(lambda m, i, o: shapes.append(tuple(i[0].shape)))
    padded = _extract(model, "fc", ds, 7, torch.device("cpu"), mirror=True, fixed_shape=True)
    assert {s[0] for s in shapes} == {7}              # one batch size, the head check included
    hook.remove()
    plain = _extract(model, "fc", ds, 7, torch.device("cpu"), mirror=True, fixed_shape=False)
    torch.testing.assert_close(padded.features, plain.features, rtol=1e-5, atol=1e-6)
    assert torch.equal(padded.labels, plain.labels)


class _Scaled(Tiny):
    def forward(self, x):  # an op after the head: logits are not head(features)
        return super().forward(x) * 3.0


def test_model_with_ops_after_head_is_refused(tmp_path):
    train, val = _sets(tmp_path / "d")
    model = _Scaled()
    for p in model.features.parameters():
        p.requires_grad_(False)
    with pytest.raises(FinetuneError, match="fast_head off"):
        _fit(model, train, val, _config(epochs=1))


def test_weights_that_give_nan_features_are_called_damaged_not_a_model_of_another_shape(tmp_path):
    """A backbone whose weights give NaN (a diverged checkpoint imported, a negative BatchNorm variance) was
    refused as a model whose output is not its head's ('run with fast_head off'), which it is not."""
    train, val = _sets(tmp_path / "d")
    model = _model()
    with torch.no_grad():
        next(model.features.parameters()).fill_(float("nan"))
    with pytest.raises(FinetuneError, match="features are NaN or infinite on the first images: its weights are damaged"):
        _fit(model, train, val, _config(epochs=1))
    # under float16 autocast (a GPU without bfloat16) the range may be the cause: --no-amp comes first
    from finetune.engine.runtime import AmpPolicy
    from finetune.tools.features.extract import _check_head_is_last

    f = torch.full((2, 4), float("inf"))
    with pytest.raises(FinetuneError, match="under float16 mixed precision .*: run with --no-amp"):
        _check_head_is_last(model, "fc", model.fc, torch.zeros(2, 3, 8, 8), f, AmpPolicy("cuda", torch.float16))


def test_trainable_backbone_is_refused(tmp_path):
    from finetune.engine import build_setup
    from finetune.tools.features import CachedHeadSteps

    train, val = _sets(tmp_path / "d")
    setup = build_setup(Tiny(), STAGES, DATA_CONFIG, train, val, _config(epochs=1, freeze="none"), head="fc")
    with pytest.raises(FinetuneError, match="frozen backbone"):
        CachedHeadSteps(setup).begin_phase("head")


def _files(cache_dir: Path) -> set[str]:
    return {p.name for p in cache_dir.glob("*.safetensors")}


def test_cache_hit_and_invalidation(tmp_path):
    train, val = _sets(tmp_path / "d")
    cache_dir = tmp_path / "cache"
    config = _config(epochs=1)
    logs: list[str] = []
    _fit(_model(), train, val, config, cache_dir=cache_dir, log=logs.append)
    first = _files(cache_dir)
    assert len(first) == 2 and not any("loaded from cache" in m for m in logs)
    logs.clear()
    _fit(_model(), train, val, config, cache_dir=cache_dir, log=logs.append)
    assert sum("loaded from cache" in m for m in logs) == 2 and _files(cache_dir) == first

    # Another head does not matter (it is not part of the features) ...
    _fit(_model(), train, val, config.replace(head="mlp", mlp_hidden=4),
                         cache_dir=cache_dir)
    assert _files(cache_dir) == first
    # ... but backbone weights, preprocessing and the data each do.
    other = _model()
    with torch.no_grad():
        other.features[1].running_mean += 0.1
    _fit(other, train, val, config, cache_dir=cache_dir)
    after_weights = _files(cache_dir)
    assert len(after_weights) == 4
    _fit(_model(), train, val, config, data_config=dict(DATA_CONFIG, mean=(0.5, 0.5, 0.5)),
                         cache_dir=cache_dir)
    after_prep = _files(cache_dir)
    assert len(after_prep) == 6
    path = train.items[0][0]
    st = os.stat(path)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    _fit(_model(), train, val, config, cache_dir=cache_dir)
    assert len(_files(cache_dir) - after_prep) == 1  # only the train bank is rebuilt


def test_cache_key_parts():
    items = [("/nonexistent/a.png", 0)]
    base = dict(split="train", items=items, backbone="w", data_config=DATA_CONFIG, transform="T")
    key = feature_cache_key(**base)
    assert key == feature_cache_key(**base)
    for change in ({"items": [("/nonexistent/a.png", 1)]}, {"backbone": "w2"}, {"transform": "T2"},
                   {"data_config": dict(DATA_CONFIG, crop_pct=0.9)}, {"extra": {"views": 2}}):
        assert feature_cache_key(**{**base, **change}) != key
    # helper-109: a decoding fix (finetune.data.images.DECODE_REVISION) gives some files other pixels: their
    # features cached by an earlier version are not used (a run would train on the old pixels, predict on the new)
    import finetune.tools.features.cache as cache

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(cache, "DECODE_REVISION", cache.DECODE_REVISION + 1)
        assert feature_cache_key(**base) != key
    m = _model()
    d = backbone_digest(m, "fc")
    with torch.no_grad():
        m.fc.weight.add_(1.0)
    assert backbone_digest(m, "fc") == d
    with torch.no_grad():
        m.features[0].weight.add_(1e-3)
    assert backbone_digest(m, "fc") != d


def _bank() -> FeatureBank:
    g = torch.Generator().manual_seed(0)
    return FeatureBank(torch.randn(2, 5, 4, generator=g), torch.tensor([0, 1, -1, 2, 1]), (4,))


@pytest.mark.parametrize("damage", ["flip", "truncate", "header", "empty"])
def test_corrupt_cache_file_is_rebuilt_not_trusted(tmp_path, damage):
    logs: list[str] = []
    cache = FeatureCache(tmp_path, log=logs.append)
    bank = _bank()
    cache.save("k", bank)
    loaded = cache.load("k")
    torch.testing.assert_close(loaded.features, bank.features)
    assert loaded.labels.tolist() == bank.labels.tolist() and loaded.feature_shape == (4,)
    path = cache.path("k")
    data = bytearray(path.read_bytes())
    if damage == "flip":
        data[-20] ^= 0xFF           # inside the feature bytes: only the checksum can tell
    elif damage == "truncate":
        data = data[:-16]
    elif damage == "header":
        data[10:20] = b"\x00" * 10
    else:
        data = bytearray()
    path.write_bytes(bytes(data))
    assert cache.load("k") is None
    assert not path.exists() and any("damaged" in m for m in logs)
    rebuilt, hit = cache.get_or_compute("k", _bank)
    assert not hit and cache.load("k") is not None


def test_cache_file_of_another_key_is_not_used(tmp_path):
    cache = FeatureCache(tmp_path)
    cache.save("a", _bank())
    os.replace(cache.path("a"), cache.path("b"))
    assert cache.load("b") is None


def test_corrupt_cache_through_fit(tmp_path):
    train, val = _sets(tmp_path / "d")
    cache_dir = tmp_path / "cache"
    config = _config(epochs=2)
    h1 = _fit(_model(), train, val, config, cache_dir=cache_dir)
    for p in cache_dir.glob("train-*.safetensors"):
        data = bytearray(p.read_bytes())
        data[-8] ^= 0x55
        p.write_bytes(bytes(data))
    logs: list[str] = []
    h2 = _fit(_model(), train, val, config, cache_dir=cache_dir,
                                 log=logs.append)
    assert any("damaged" in m for m in logs)
    assert [r["val_loss"] for r in h2.history] == pytest.approx([r["val_loss"] for r in h1.history], rel=1e-6)


def test_augmented_views_are_a_reproducible_bank(tmp_path):
    train, val = _sets(tmp_path / "d")
    config = _config(epochs=2, aug_views=2, crop_scale_min=0.5)
    cache_dir = tmp_path / "cache"
    history = _fit(_model(), train, val, config, cache_dir=cache_dir).history
    assert len(history) == 2 and all(math.isfinite(r["train_loss"]) for r in history)
    (train_file,) = cache_dir.glob("train-*.safetensors")
    bank = FeatureCache(cache_dir).load(train_file.stem)
    assert bank.views == 2
    assert not torch.allclose(bank.features[0], bank.features[1])  # the two views differ
    # Recomputed from scratch (another cache), the bank is identical: views are seeded.
    other = tmp_path / "cache2"
    _fit(_model(), train, val, config, cache_dir=other)
    again = FeatureCache(other).load(train_file.stem)
    torch.testing.assert_close(again.features, bank.features)


def test_augmented_views_do_not_depend_on_the_workers(tmp_path):
    """QA: the augmented views were one random stream over the images each process loaded, so --workers 2
    (or a rank's shard under torchrun: tests/finetune/test_distributed.py) drew other views of every image
    and solved another head (2 processes: val acc 0.525 against 0.35 in one). Each image's view is now seeded
    by (view seed, its index in the split), as the training loader's draws are."""
    from finetune.core.seeding import view_seed

    train, val = _sets(tmp_path / "d")
    config = _config(epochs=1, aug_views=2, crop_scale_min=0.5)
    banks = []
    for workers in (0, 2):
        cache_dir = tmp_path / f"cache{workers}"
        _fit(_model(), train, val, config.replace(workers=workers), cache_dir=cache_dir)
        (train_file,) = cache_dir.glob("train-*.safetensors")
        banks.append(FeatureCache(cache_dir).load(train_file.stem))
    torch.testing.assert_close(banks[1].features, banks[0].features)
    # view 1 of image 4 is the training transform's draw for (its index, the view's seed), whoever loads it
    x, _ = ImageDataset(train, build_transform(DATA_CONFIG, True, config))[(4, view_seed(config.seed, 1))]
    alone = extract_features(_model(), "fc", [(x, 0)], batch_size=1)[0]
    torch.testing.assert_close(banks[0].features[1, 4], alone.reshape(-1))


def test_computing_the_features_leaves_the_global_random_stream_alone(tmp_path):
    """QA (review of session 18): once augmented views were seeded per image, extraction ran without its seeded
    loader generator, and the DataLoader drew its workers' base seed from the global RNG: `zoo lr-find` (and
    --lr auto) on cached features with a dropout head probed other losses on a cache miss than on a hit."""
    from finetune.tools.diagnostics import lr_find

    train, _ = _sets(tmp_path / "d")
    cache = FeatureCache(tmp_path / "cache")
    runs = []
    for _ in ("miss", "hit"):
        torch.manual_seed(0)
        runs.append(lr_find(_model(head="mlp"), STAGES, DATA_CONFIG, train, _config(freeze="head", head="mlp"),
                            head="fc", start_lr=1e-4, end_lr=1.0, steps=6, reset_head=False,
                            feature_cache=cache).losses)
    assert len(list((tmp_path / "cache").glob("train-*.safetensors"))) == 1 and runs[0] == runs[1]


def test_two_phase_warmup_trains_the_head_on_cached_features(tmp_path):
    """freeze none: the head warm-up (until its val loss stops improving) runs on cached features, then
    the whole network trains; the warm-up rows equal those of the ordinary path."""
    train, val = _sets(tmp_path / "d")
    config = _config(epochs=8, patience=30, lr=5.0, schedule="none", augment="none", head_epochs=-1)
    logs: list[str] = []
    fast = _fit(_model(), train, val, config, freeze="none", log=logs.append)
    slow = _fit(_model(), train, val, config.replace(fast_head=False), freeze="none")
    phases = [r["phase"] for r in fast.history]
    n_head = phases.count("head")
    assert phases == ["head"] * n_head + ["finetune"] * (len(phases) - n_head) and 1 <= n_head < 7
    assert sum("head (cached features)" in m for m in logs) == n_head
    assert [r["phase"] for r in slow.history][:n_head] == ["head"] * n_head
    for a, b in zip(fast.history[:n_head], slow.history[:n_head]):
        assert a["val_loss"] == pytest.approx(b["val_loss"], rel=1e-4, abs=1e-5)


def test_without_validation_runs_every_epoch(tmp_path):
    train, _ = _sets(tmp_path / "d")
    model = _model()
    result = _fit(model, train, None, _config(epochs=3, patience=1))
    assert len(result.history) == 3 and all(math.isnan(r["val_loss"]) for r in result.history)
    assert result.best_epoch == 3


def test_features_shared_between_runs_are_computed_once(tmp_path):
    train, val = _sets(tmp_path / "d")
    cache = FeatureCache(None)
    for lr in (1e-3, 1e-2, 1e-1):
        _fit(_model(), train, val, _config(epochs=1, lr=lr), feature_cache=cache)
    assert (cache.computed, cache.hits) == (2, 4)      # train + val once, then reused by two runs


# ---- head_solver="lbfgs": the head solved to convergence ---------------------------------------------
@pytest.mark.parametrize("hflip", [0.5, 0.0])
def test_lbfgs_head_is_the_logistic_regression_optimum(tmp_path, hflip):
    """Without a validation split the L2 strength is --weight-decay: the solved head is the unique optimum of
    L2-regularised multinomial logistic regression, i.e. scikit-learn's LogisticRegression(C=1/(L2 N)), fitted
    on each training image and (when the training augmentation flips) its mirror; ``--hflip 0``: the images only."""
    from sklearn.linear_model import LogisticRegression

    from finetune.data import ImageTransform

    train, _ = _sets(tmp_path / "d")
    model = _model()
    wd = 1e-2
    logs: list[str] = []
    result = _fit(model, train, None, _config(epochs=5, head_solver="lbfgs", weight_decay=wd, hflip=hflip),
                  log=logs.append)
    assert [r["phase"] for r in result.history] == ["head"]          # one converged solve, not epochs
    views = 2 if hflip else 1
    line = next(m for m in logs if m.startswith("features: train"))
    # img/s counts images, as every other rate; the forward passes of their views apart (helper-99: it counted views)
    rate = r"\(\d+ img/s" + (r", \d+ views/s\)$" if views > 1 else r"\)$")
    assert f"x {views} view(s)" in line and re.search(rate, line), line
    eval_tf = build_transform(DATA_CONFIG, False)
    feats, labels = extract_features(model, "fc", ImageDataset(train, eval_tf))
    x, y = feats, labels
    if hflip:
        mirror = ImageTransform(lambda im: torch.flip(eval_tf(im), dims=(-1,)), eval_tf.min_size, False)
        flipped, _ = extract_features(model, "fc", ImageDataset(train, mirror))
        assert not torch.allclose(flipped, feats)
        x, y = torch.cat([feats, flipped]), torch.cat([labels, labels])
    ref = LogisticRegression(C=1.0 / (wd * len(y)), max_iter=5000, tol=1e-10).fit(x.numpy(), y.numpy())
    # softmax logits are defined up to a per-sample constant: compare centred logits
    ours = model.fc(feats).detach()
    theirs = torch.from_numpy(ref.decision_function(feats.numpy())).float()
    torch.testing.assert_close(ours - ours.mean(1, keepdim=True), theirs - theirs.mean(1, keepdim=True),
                               rtol=1e-3, atol=2e-3)


def test_lbfgs_picks_l2_on_validation_and_warm_up_starts_from_it(tmp_path):
    train, val = _sets(tmp_path / "d")
    logs: list[str] = []
    head_only = _fit(_model(), train, val, _config(head_solver="lbfgs"), log=logs.append)
    (line,) = [m for m in logs if m.startswith("head: L-BFGS")]
    assert "picked on the validation split" in line
    assert len(head_only.history) == 1 and head_only.best_epoch == 1
    logs.clear()
    two = _fit(_model(), train, val, _config(head_solver="lbfgs", epochs=3, head_epochs=-1), freeze="none",
               log=logs.append)
    assert [r["phase"] for r in two.history] == ["head", "finetune", "finetune"]
    assert two.history[0]["val_loss"] == pytest.approx(head_only.history[0]["val_loss"], rel=1e-5)


class _Halves(nn.Module):
    """Average-pooled pixels (spatial layout kept) through an identity 1x1 conv: a "left half bright" image
    and its mirror, a "right half bright" one, have mirrored features."""

    def __init__(self) -> None:
        super().__init__()
        conv = nn.Conv2d(3, 3, 1)
        with torch.no_grad():
            conv.weight.copy_(torch.eye(3).reshape(3, 3, 1, 1))
            conv.bias.zero_()
        self.features = nn.Sequential(conv, nn.AvgPool2d(8), nn.Flatten())
        self.fc = nn.Linear(48, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.features(x))


def _halves(root: Path, per_class: int = 10, val_per_class: int = 10, mirrored_classes: bool = True):
    """Two classes of 32-px images: the left or the right half bright (each class the other's mirror), or
    with ``mirrored_classes=False`` dark or bright (mirror-symmetric); a little seeded noise in each."""
    from PIL import Image

    g = torch.Generator().manual_seed(0)
    classes = ["left", "right"] if mirrored_classes else ["dark", "bright"]
    sets = {}
    for split, n in (("train", per_class), ("val", val_per_class)):
        items = []
        for ci, name in enumerate(classes):
            for i in range(n):
                img = torch.rand((32, 32, 3), generator=g) * 60
                if mirrored_classes:
                    img[:, :16] += 180 if ci == 0 else 0
                    img[:, 16:] += 180 if ci == 1 else 0
                else:
                    img += 180 * ci
                path = root / split / name / f"{i:03d}.png"
                path.parent.mkdir(parents=True, exist_ok=True)
                Image.fromarray(img.clamp(0, 255).to(torch.uint8).numpy()).save(path)
                items.append((str(path), ci))
        sets[split] = ImageSet(items, classes)
    return sets["train"], sets["val"]


@pytest.mark.parametrize("mirrored_classes", [True, False])
def test_the_head_drops_the_mirror_when_the_images_are_handed(tmp_path, monkeypatch, mirrored_classes):
    """--hflip auto in a run that trains layers: the handedness test on the two cached training views; when
    an image is told from its mirror given its class (here each class is the other's mirror), the head is
    solved on the images alone and the finetune phase trains without flips (summary.json says so).
    Mirror-symmetric classes keep the flip."""
    import json

    from finetune.engine.setup import Setup

    calls: list[str] = []
    real = Setup.train_without_flip
    monkeypatch.setattr(Setup, "train_without_flip", lambda self: (calls.append("off"), real(self))[1])
    train, val = _halves(tmp_path / "d", mirrored_classes=mirrored_classes)
    logs: list[str] = []
    result = fit(_Halves(), [["features"]], DATA_CONFIG, train, val,
                 _config(head_solver="lbfgs", epochs=2, freeze="none", lr=1e-3),
                 head="fc", run_dir=tmp_path / "run", log=logs.append)
    mirror = json.loads((tmp_path / "run" / "summary.json").read_text())["mirror"]
    head_row = result.history[0]
    assert head_row["phase"] == "head" and result.history[1]["phase"] == "finetune"
    assert mirror["images"] == 20 and mirror["threshold"] == 0.6
    (line,) = [m for m in logs if m.startswith("mirror: ")]
    if mirrored_classes:
        assert mirror["dropped"] is True and mirror["score"] == 1.0 and "handed" not in mirror
        assert calls == ["off"]
        assert head_row["val_acc"] == 1.0
        assert "trains without flips" in line
    else:
        assert mirror["dropped"] is False and mirror["low"] < 0.6 and calls == []
        assert line.endswith("flips kept")


def test_the_gradient_head_trains_on_the_plain_view_of_handed_images(tmp_path):
    """--head-solver gradient: a handed bank keeps only its plain view, so every epoch's batches are the
    images themselves, never their mirrors."""
    from finetune.core.surgery import apply_freeze
    from finetune.engine import build_setup
    from finetune.tools.features import CachedHeadSteps

    train, val = _halves(tmp_path / "d")
    setup = build_setup(_Halves(), [["features"]], DATA_CONFIG, train, val,
                        _config(head_solver="gradient", freeze="none", epochs=2), head="fc", distributed=False)
    apply_freeze(setup.model, setup.stages, setup.head, 0)      # the head phase, as the trainer sets it
    steps = CachedHeadSteps(setup)
    steps.begin_phase("head")
    assert steps.mirror["dropped"] is True and steps.train_bank.views == 2
    plain = steps.train_bank.features[0]
    for epoch in (1, 2):
        for x, _y in steps.batches(epoch):
            assert all(any(torch.equal(row, p) for p in plain) for row in x)


@pytest.mark.parametrize("quiet", [False, True])
def test_the_mirror_test_shows_a_bar_on_a_terminal_unless_quiet(tmp_path, monkeypatch, quiet):
    """Medium-size UX audit (helper-99): the mirror test (two L-BFGS fits of 2K classes on up to 4,000 images x 2
    views) ran between the features line and its verdict with nothing on the terminal: 8.4 s on 1,438 digits.
    It now has the head solve's kind of bar (terminal only, cleared when done), and none with --quiet."""
    import io
    import sys

    from finetune.core.surgery import apply_freeze
    from finetune.engine import build_setup
    from finetune.tools.features import CachedHeadSteps

    class Terminal(io.StringIO):
        def isatty(self):
            return True

    train, val = _halves(tmp_path / "d")
    setup = build_setup(_Halves(), [["features"]], DATA_CONFIG, train, val,
                        _config(head_solver="gradient", freeze="none", epochs=2, quiet=quiet), head="fc",
                        distributed=False)
    apply_freeze(setup.model, setup.stages, setup.head, 0)      # the head phase, as the trainer sets it
    monkeypatch.delenv("TQDM_DISABLE", raising=False)      # (tests/conftest.py sets it; a terminal honours it)
    term = Terminal()
    monkeypatch.setattr(sys, "stderr", term)
    steps = CachedHeadSteps(setup)
    steps.begin_phase("head")
    assert steps.mirror is not None                       # the test ran
    assert ("mirror test: L-BFGS fit per fold" in term.getvalue()) is not quiet


def test_a_repeated_image_shows_its_next_view(tmp_path):
    """--sampler balanced with --aug-views: an image drawn again in the same epoch shows the next cached view
    (the first draw keeps the epoch's pick), not the same features again."""
    from finetune.engine import build_setup
    from finetune.tools.features import CachedHeadSteps

    train, val = _sets(tmp_path / "d")
    config = _config(sampler="balanced", aug_views=2, crop_scale_min=0.5)
    setup = build_setup(_model(), STAGES, DATA_CONFIG, train, val, config.replace(freeze="head"), head="fc",
                        distributed=False)
    steps = CachedHeadSteps(setup)
    steps.begin_phase("head")
    feats = steps.train_feats
    n_views = int(feats.shape[0])
    assert n_views == 2
    set_epoch_order(steps.order.sampler, config.seed, 1)
    drawn = [i for batch in steps.order for i, _seed in batch]
    rows = torch.cat([x.reshape(x.shape[0], -1) for x, _y in steps.batches(1)])
    shown: dict[int, list[int]] = {}
    for i, row in zip(drawn, rows):
        shown.setdefault(i, []).append(next(v for v in range(n_views) if torch.equal(feats[v, i].reshape(-1), row)))
    repeated = {i: v for i, v in shown.items() if len(v) > 1}
    assert repeated                                # 18 draws with replacement out of 18 images
    assert all(v[k + 1] == (v[k] + 1) % n_views for v in repeated.values() for k in range(len(v) - 1))


def test_a_solved_head_takes_the_class_weights_of_the_balanced_sampler(tmp_path):
    """QA (session 19): --sampler balanced feeds epochs of batches, and the default head phase is one L-BFGS solve
    over all the features, which no sampler feeds: a head-only run asked to balance its classes solved the
    plain loss. The solve now takes the class weights the sampler amounts to over an epoch (inverse class
    frequency, as --class-weights auto), and another head comes out of it."""
    from finetune.data import class_weights
    from finetune.engine import build_setup

    train, val = _sets(tmp_path / "d")
    train = ImageSet([it for it in train.items if it[1] != 0 or "000" in it[0] or "001" in it[0]], train.classes)
    assert train.class_counts() == [2, 6, 6]

    def setup(**kw):
        return build_setup(_model(), STAGES, DATA_CONFIG, train, val, _config(freeze="head", **kw), head="fc",
                           distributed=False)

    loss = setup(sampler="balanced").full_batch_loss(torch.device("cpu"))
    assert loss.weight.tolist() == pytest.approx(class_weights(train)) and class_weights(train)[0] > 1
    assert setup().full_batch_loss(torch.device("cpu")).weight is None
    assert setup(sampler="balanced", class_weights="auto").full_batch_loss(torch.device("cpu")).weight is not None
    heads = []
    for sampler in ("random", "balanced"):
        model = _model()
        _fit(model, train, val, _config(head_solver="lbfgs", epochs=1, sampler=sampler))
        heads.append(model.fc.weight.detach().clone())
    assert not torch.equal(heads[0], heads[1])


def test_a_solved_head_reports_the_loss_it_solved_under_the_balanced_sampler(tmp_path):
    """QA (session 19): under --sampler balanced the L-BFGS solve minimises the class-weighted loss, but the
    epoch's train loss was the plain one of the solved head (the loss of a balanced epoch's batches weighs the
    classes alike: the finetune phase's rows and the gradient head's did, the solved head's row did not)."""
    from finetune.engine import build_setup
    from finetune.tools.features import CachedHeadSteps

    train, _val = _sets(tmp_path / "d")
    train = ImageSet([it for it in train.items if it[1] != 0 or "000" in it[0] or "001" in it[0]], train.classes)
    # no validation split: one solve at L2 = --weight-decay, strong enough that the classes' losses differ
    setup = build_setup(_model(), STAGES, DATA_CONFIG, train, None,
                        _config(head_solver="lbfgs", freeze="head", sampler="balanced", weight_decay=0.5),
                        head="fc", distributed=False)
    steps = CachedHeadSteps(setup)
    steps.begin_phase("head")
    out = steps.train_epoch(1, "head", None, None, None)
    feats, ok = steps.train_feats, steps.train_bank.valid
    x = feats[:, ok].reshape(-1, feats.shape[-1]).float()
    y = steps.train_bank.labels[ok].repeat(int(feats.shape[0]))
    with torch.no_grad():
        logits = setup.head_module(x)
        weighted = float(setup.full_batch_loss(torch.device("cpu"))(logits, y))
        plain = float(nn.functional.cross_entropy(logits, y))
    assert out["loss"] == pytest.approx(weighted, rel=1e-5)
    assert abs(weighted - plain) > 2e-3 * plain       # (about 1% apart here: not the plain loss)


def test_an_explicit_hflip_few_images_or_a_head_only_run_skip_the_mirror_test(tmp_path):
    """The mirror is judged only for --hflip auto, with >= 10 training images per class, in a run that trains
    layers after the head."""
    import json

    train, val = _halves(tmp_path / "d")
    layers = dict(head_solver="lbfgs", epochs=2, freeze="none", lr=1e-3)
    fit(_Halves(), [["features"]], DATA_CONFIG, train, val, _config(hflip=0.5, **layers),
        head="fc", run_dir=tmp_path / "given")
    few = ImageSet(train.items[:9] + train.items[10:19], train.classes)
    fit(_Halves(), [["features"]], DATA_CONFIG, few, val, _config(**layers), head="fc", run_dir=tmp_path / "few")
    fit(_Halves(), [["features"]], DATA_CONFIG, train, val, _config(head_solver="lbfgs"), head="fc",
        run_dir=tmp_path / "head")
    for run in ("given", "few", "head"):
        assert json.loads((tmp_path / run / "summary.json").read_text())["mirror"] is None


def test_training_without_flip_rebuilds_the_training_pipeline(tmp_path):
    """Setup.train_without_flip: the new training transform has no flip; the options stay as given."""
    from finetune.engine import build_setup

    train, val = _sets(tmp_path / "d")
    setup = build_setup(Tiny(), STAGES, DATA_CONFIG, train, val, _config(freeze="none"), head="fc",
                        distributed=False)
    flips = lambda: [t for t in setup.train_loader.dataset.transform.pipeline.transforms  # noqa: E731
                     if type(t).__name__ == "RandomHorizontalFlip"]
    assert flips() and flips()[0].p == 0.5
    setup.train_without_flip()
    assert flips() == [] and setup.config.hflip == -1.0
    assert len(setup.datasets) == 3     # the first training dataset's decode failures still count


def test_a_run_resumed_after_the_head_phase_still_trains_without_flip(tmp_path, monkeypatch):
    """The mirror decision is in the checkpoint: a run interrupted after its head phase, resumed, trains the
    finetune phase unflipped and ends with the uninterrupted run's weights."""
    from finetune.core.errors import Interrupted
    from finetune.engine.setup import Setup

    calls: list[str] = []
    real = Setup.train_without_flip
    monkeypatch.setattr(Setup, "train_without_flip", lambda self: (calls.append("off"), real(self))[1])
    train, val = _halves(tmp_path / "d")
    config = _config(head_solver="lbfgs", epochs=3, freeze="none", lr=1e-3, patience=10)
    ref = fit(_Halves(), [["features"]], DATA_CONFIG, train, val, config, head="fc", run_dir=tmp_path / "ref")

    def stop_after_head(row):
        if row["epoch"] == 1:
            raise KeyboardInterrupt

    with pytest.raises(Interrupted):
        fit(_Halves(), [["features"]], DATA_CONFIG, train, val, config, head="fc", run_dir=tmp_path / "cut",
            callbacks=[stop_after_head])
    assert calls == ["off"]
    resumed = fit(_Halves(), [["features"]], DATA_CONFIG, train, val, config, head="fc", run_dir=tmp_path / "cut",
                  resume=True)
    assert calls == ["off", "off"]
    a, b = resumed.model.state_dict(), ref.model.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_the_report_says_what_the_mirror_test_decided():
    """report.html's curves section carries one line on the mirror test, when the run made one."""
    from finetune.tools.pages import _mirror_note

    assert _mirror_note({}) == "" and _mirror_note({"mirror": None}) == ""
    base = {"score": 0.74, "low": 0.72, "images": 1000, "threshold": 0.6}
    dropped = _mirror_note({"mirror": {"dropped": True, **base}})
    assert "74% of the time" in dropped and "bound 72%" in dropped and "without flips" in dropped
    kept = _mirror_note({"mirror": {"dropped": False, **base, "score": 0.5, "low": 0.47}})
    assert "flips kept" in kept and "50%" in kept

def test_the_head_is_solved_on_the_cpu_unless_the_problem_is_large():
    """L-BFGS's line search reads numbers on the host dozens of times per iteration: a GPU answers each
    slowly, so small solves (rows x features x classes up to SOLVE_ON_CPU_UP_TO) run on the CPU, large
    ones where the features are."""
    from finetune.tools.features.head import SOLVE_ON_CPU_UP_TO, solve_device

    cuda = torch.device("cuda", 0)
    assert solve_device(cuda, 90 * 1280 * 9) == torch.device("cpu")            # the 63-image job
    assert solve_device(cuda, 1000 * 1280 * 10) == torch.device("cpu")         # medium digits
    assert solve_device(cuda, SOLVE_ON_CPU_UP_TO + 1) == cuda
    assert solve_device(torch.device("cpu"), 10**12) == torch.device("cpu")


def test_the_small_solves_run_on_one_thread_whatever_the_process_has(tmp_path, monkeypatch):
    """The head's L-BFGS path (its validation and train loss too) and the mirror test run on one torch thread
    (``threads.one_thread``), then the process's threads are back: their float sums no longer depend on the
    thread count, so the same features give the same head in one process of 2 threads as under torchrun (1 a
    process). Measured on the medium digits' real features: 2 threads and 1 solved heads 3e-5 apart in val loss
    before (0.151562 / 0.151537), the same weights bit for bit now (docs/benchmarks.md, "The head's solve on one
    thread"); a tiny test's sums are too small to split, so this checks the threads each solve ran on."""
    import finetune.tools.features.handedness as handedness_module
    import finetune.tools.features.head as head_module

    seen: list[tuple[str, int]] = []
    for module, name in ((head_module, "head"), (handedness_module, "mirror")):
        real = module.lbfgs_minimise
        monkeypatch.setattr(module, "lbfgs_minimise", lambda *a, _real=real, _name=name, **kw: (
            seen.append((_name, torch.get_num_threads())), _real(*a, **kw))[1])
    train, val = _halves(tmp_path / "d")
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        fit(_Halves(), [["features"]], DATA_CONFIG, train, val, _config(head_solver="lbfgs", epochs=2, freeze="none",
                                                                         lr=1e-3), head="fc", run_dir=tmp_path / "run")
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(threads)
    assert {name for name, _ in seen} == {"head", "mirror"}
    assert all(n == 1 for _, n in seen), seen


@pytest.mark.parametrize("device", DEVICES)
def test_the_head_solved_where_the_features_are_is_the_cpu_solve(tmp_path, monkeypatch, device):
    """A large job's path, taken by a small one: SOLVE_ON_CPU_UP_TO 0 runs the L-BFGS solve on the training
    device, and _DEVICE_RESIDENT_BYTES 0 then keeps the feature banks on the host, gathered per batch. All
    three runs load the same banks from one cache, so they differ only in where the solve and the banks are:
    the same L2 strength is picked and the same head comes out. On the CPU that is bit for bit. On CUDA the
    sums are rounded in another order: features moved by ~1e-7 (relative, random) moved this head's weights
    by 0.1% of their largest and its validation probabilities by 3e-5 on the CPU (the weakest L2, C=1e4, is
    picked: the classes separate), so the bounds are 2% and 1e-3; a dropped bias, another split's labels or
    another C's weights are off by far more."""
    from finetune.tools.features import banks as banks_module, head as head_module

    solved_on: list[str] = []

    class Spy(torch.optim.LBFGS):
        def __init__(self, params, **kw):
            params = list(params)
            solved_on.append(params[0].device.type)
            super().__init__(params, **kw)

    monkeypatch.setattr(torch.optim, "LBFGS", Spy)
    train, val = _sets(tmp_path / "d")
    cache = FeatureCache(tmp_path / "cache")
    runs = {}
    for where, solve_up_to, resident in [("default", head_module.SOLVE_ON_CPU_UP_TO, 4 << 30), ("device", 0, 4 << 30),
                                         ("host banks", 0, 0)]:
        monkeypatch.setattr(head_module, "SOLVE_ON_CPU_UP_TO", solve_up_to)
        monkeypatch.setattr(banks_module, "_DEVICE_RESIDENT_BYTES", resident)
        solved_on.clear()
        model = _model()
        result = _fit(model, train, val, _config(head_solver="lbfgs", device=device), feature_cache=cache,
                      run_dir=tmp_path / where.replace(" ", "_"))
        assert solved_on == ["cpu" if where == "default" else device] * len(head_module.SOLVER_C), where
        summary = json.loads((tmp_path / where.replace(" ", "_") / "summary.json").read_text())
        picked = [p["C"] for p in summary["head_solver"] if p["chosen"]]
        runs[where] = (picked, model.fc.weight.detach().cpu(), model.fc.bias.detach().cpu(), result.val_probs)
        assert model.fc.weight.device.type == device and result.val_probs is not None
        assert math.isfinite(result.metrics["val_loss"])
    assert (cache.computed, cache.hits) == (2, 4)          # one bank per split, shared by the three runs
    picked, weight, bias, probs = runs["default"]
    for where in ("device", "host banks"):
        p, w, b, pr = runs[where]
        assert p == picked, where
        if device == "cpu":
            assert torch.equal(w, weight) and torch.equal(b, bias) and torch.equal(pr, probs), where
        else:
            scale = float(weight.abs().max())
            torch.testing.assert_close(w, weight, rtol=0, atol=2e-2 * scale, msg=where)
            torch.testing.assert_close(b, bias, rtol=0, atol=2e-2 * scale, msg=where)
            torch.testing.assert_close(pr, probs, rtol=0, atol=1e-3, msg=where)



def test_a_large_head_solve_is_capped_by_its_size(tmp_path, monkeypatch):
    """The head's solve tells the solver how many rows it fits (finetune.core.optim.lbfgs_iterations): a solve
    made 'large' here (LBFGS_FULL_SIZE 1) runs each C for LBFGS_MIN_ITER iterations, not SOLVER_MAX_ITER, and
    still picks a C on validation and finishes the run."""
    from finetune.core import optim
    from finetune.tools.features import head as head_module

    max_iters: list[int] = []

    class Spy(torch.optim.LBFGS):
        def __init__(self, params, **kw):
            max_iters.append(kw["max_iter"])
            super().__init__(params, **kw)

    monkeypatch.setattr(torch.optim, "LBFGS", Spy)
    train, val = _sets(tmp_path / "d")
    _fit(_model(), train, val, _config(head_solver="lbfgs"), run_dir=tmp_path / "full")
    assert max_iters == [head_module.SOLVER_MAX_ITER] * len(head_module.SOLVER_C)      # small: unchanged
    max_iters.clear()
    monkeypatch.setattr(optim, "LBFGS_FULL_SIZE", 1)
    monkeypatch.setattr(optim, "LBFGS_MIN_ITER", 4)
    _fit(_model(), train, val, _config(head_solver="lbfgs"), run_dir=tmp_path / "capped")
    assert max_iters == [4] * len(head_module.SOLVER_C)
    summary = json.loads((tmp_path / "capped" / "summary.json").read_text())
    assert sum(p["chosen"] for p in summary["head_solver"]) == 1


def test_a_mirrored_bank_computes_only_the_mirror_when_the_plain_view_is_cached(tmp_path, monkeypatch):
    """helper-151: `zoo doctor` (or a --hflip 0 run) then a default run on the same folder shared the val bank only:
    the mirrored training bank has its own key, so the run forwarded the plain view again (108 s of a 903 s medium
    run, docs/peers.md). The cached plain bank is now joined with a pass of the mirror alone; the head solved on
    it picks the C and gives the predictions of a run that computed both views."""
    import finetune.tools.features.banks as banks_module
    import finetune.tools.features.head as head_module

    train, val = _sets(tmp_path / "d")
    passes: list[tuple] = []
    real = head_module._extract

    def extract(model, head, dataset, batch_size, device, **kw):
        if "train" in (kw.get("desc") or ""):
            passes.append((len(kw["keys"]), 1 + bool(kw.get("mirror"))))     # images, views forwarded
        return real(model, head, dataset, batch_size, device, **kw)

    monkeypatch.setattr(head_module, "_extract", extract)
    config = _config(head_solver="lbfgs", epochs=1, augment="standard", hflip=0.5)
    runs = {}
    for name, cache, hflip in (("plain", "shared", 0.0), ("reused", "shared", 0.5), ("both", "fresh", 0.5)):
        said: list[str] = []
        result = _fit(_model(), train, val, config.replace(hflip=hflip), cache_dir=tmp_path / cache, log=said.append)
        runs[name] = (result, [m for m in said if m.startswith(("features: train", "head: L-BFGS"))])
    assert passes == [(18, 1), (18, 1), (18, 2)]      # the reusing run forwarded the 18 images once: the mirror
    assert "x 1 view(s) computed" in runs["reused"][1][0] and "plain view's from the cache" in runs["reused"][1][0]
    picked = [re.search(r"C=\S+ .* val acc \S+", runs[r][1][1]).group(0) for r in ("reused", "both")]
    assert picked[0] == picked[1]        # the same C picked, for the same val accuracy
    tf = build_transform(DATA_CONFIG, False, config)
    x = torch.stack([ImageDataset(val, tf)[i][0] for i in range(len(val))])
    with torch.no_grad():
        preds = [runs[r][0].model.eval()(x).argmax(1).tolist() for r in ("reused", "both")]
    assert preds[0] == preds[1]


def test_a_plain_bank_is_the_view_0_of_its_mirrored_bank_unless_that_is_damaged_or_foreign(tmp_path):
    """helper-154: ``agreed_load(view_of=)`` takes a plain bank from its mirrored bank (zoo doctor, a --hflip 0 run
    after a default run) only where the mirrored bank reads as its own: a damaged file (removed, as any), a file of
    another key or a bank without two views is no plain bank."""
    from finetune.core.distributed import DistInfo
    from finetune.tools.features import agreed_load

    logs: list[str] = []
    cache = FeatureCache(tmp_path, log=logs.append)
    bank = _bank()
    cache.save("m", bank)
    plain = agreed_load(cache, "p", DistInfo(), view_of="m")
    assert plain.views == 1 and torch.equal(plain.features[0], bank.features[0])
    assert plain.labels.tolist() == bank.labels.tolist() and plain.feature_shape == (4,)
    assert agreed_load(cache, "p", DistInfo()) is None and cache.path("p").exists() is False
    cache.save("p", FeatureBank(bank.features[1:], bank.labels, (4,)))     # its own bank first
    assert torch.equal(agreed_load(cache, "p", DistInfo(), view_of="m").features[0], bank.features[1])
    cache.path("p").unlink()
    cache.save("one", FeatureBank(bank.features[:1], bank.labels, (4,)))
    os.replace(cache.path("one"), cache.path("q"))                          # another key's file
    cache.save("single", FeatureBank(bank.features[:1], bank.labels, (4,)))  # a bank of one view
    assert agreed_load(cache, "p", DistInfo(), view_of="q") is None
    assert agreed_load(cache, "p", DistInfo(), view_of="single") is None
    data = bytearray(cache.path("m").read_bytes())
    data[-20] ^= 0xFF
    cache.path("m").write_bytes(bytes(data))
    assert agreed_load(cache, "p", DistInfo(), view_of="m") is None
    assert not cache.path("m").exists() and any("damaged" in m for m in logs)


def test_a_plain_run_after_a_default_run_takes_the_plain_view_of_its_mirrored_bank(tmp_path, monkeypatch):
    """helper-154: a --hflip 0 run after a default run (its training bank mirrored) forwarded the training images
    again; it takes view 0 of the mirrored bank now, and picks the C and gives the predictions of a run that
    computed its plain bank. helper-158: its line said the ordinary `loaded from cache (1 view(s), 18 images)`, as if
    a plain bank were cached; it says where the bank came from now (a bank of its own key: as before)."""
    import finetune.tools.features.head as head_module

    train, val = _sets(tmp_path / "d")
    passes: list[int] = []
    real = head_module._extract

    def extract(model, head, dataset, batch_size, device, **kw):
        if "train" in (kw.get("desc") or ""):
            passes.append(1 + bool(kw.get("mirror")))     # views forwarded
        return real(model, head, dataset, batch_size, device, **kw)

    monkeypatch.setattr(head_module, "_extract", extract)
    config = _config(head_solver="lbfgs", epochs=1, augment="standard")
    runs = {}
    for name, cache, hflip in (("default", "shared", 0.5), ("reused", "shared", 0.0), ("plain", "fresh", 0.0),
                               ("again", "fresh", 0.0)):
        said: list[str] = []
        result = _fit(_model(), train, val, config.replace(hflip=hflip), cache_dir=tmp_path / cache, log=said.append)
        runs[name] = (result, [m for m in said if m.startswith(("features: train", "head: L-BFGS"))])
    assert passes == [2, 1]           # the reusing run forwarded nothing
    assert runs["reused"][1][0] == ("features: train loaded from cache (1 view(s), 18 images, the plain view of the "
                                    "mirrored bank)")
    assert runs["again"][1][0] == "features: train loaded from cache (1 view(s), 18 images)"
    picked = [re.search(r"C=\S+ .* val acc \S+", runs[r][1][1]).group(0) for r in ("reused", "plain")]
    assert picked[0] == picked[1]
    tf = build_transform(DATA_CONFIG, False, config)
    x = torch.stack([ImageDataset(val, tf)[i][0] for i in range(len(val))])
    with torch.no_grad():
        preds = [runs[r][0].model.eval()(x).argmax(1).tolist() for r in ("reused", "plain")]
    assert preds[0] == preds[1]
