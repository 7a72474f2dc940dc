"""finetune.core.recipe: the batch-of-one BatchNorm check (``check_batchnorm_batch``) and the image size check
(``check_input_size``)."""
from __future__ import annotations

import pytest
from torch import nn

from finetune.core.errors import ConfigError
from finetune.core.recipe import check_batchnorm_batch, check_input_size


class _HeadBlockNet(nn.Module):
    """A network whose head block holds a BatchNorm before the classifier (``head.1``), as LeViT's does."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 4, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.head = nn.Sequential(nn.BatchNorm1d(4), nn.Linear(4, 3))

    def forward(self, x):
        return self.head(self.body(x))


def test_a_synchronised_batchnorm_beside_the_classifier_is_not_refused():
    """Under torchrun with --sync-bn every BatchNorm layer but the classifier's own (``sync_batchnorm``'s
    exclude: the head's prefix) takes its statistics from the global batch, so one image a process is two
    values. The check skipped only the top-level children that do not hold the classifier: a layer beside it
    in its block (``head.0`` beside ``head.1``) was refused, though synchronised."""
    check_batchnorm_batch(_HeadBlockNet(), (3, 8, 8), 1, head="head.1", processes=2, synced=True)
    with pytest.raises(ConfigError, match=r"head\.0 gets one value per channel"):
        check_batchnorm_batch(_HeadBlockNet(), (3, 8, 8), 1, head="head.1", processes=2, synced=False)


def test_the_batch_a_training_batchnorm_sees_is_the_global_one_only_for_a_head_alone_on_cached_features():
    """helper-63: `--head mlp` under torchrun with a global --batch-size equal to the processes (one image each)
    was refused, though a head alone on cached features trains on the whole global batch on every rank
    (features.CachedHeadSteps over data.train_batches(..., processes=N)). policy.batchnorm_batch is the one
    place that says which batch a training BatchNorm gets."""
    from finetune.core.config import FinetuneConfig
    from finetune.core.policy import batchnorm_batch

    config = FinetuneConfig(batch_size=2, head="mlp")
    assert batchnorm_batch(config, 0, 1) == 2                   # the head alone, on cached features
    assert batchnorm_batch(config, 1, 1) == 1                   # layers train (after the head phase): per process
    assert batchnorm_batch(config.replace(epochs=1), 2, 1) == 1
    assert batchnorm_batch(config.replace(fast_head=False), 0, 1) == 1   # the head trains through the network
    assert batchnorm_batch(config.replace(mixup=0.2), 0, 1) == 1         # mixing: through the network too
    assert batchnorm_batch(config.replace(cutmix=1.0), 0, 1) == 1
    assert batchnorm_batch(FinetuneConfig(batch_size=1, head="mlp"), 0, 1) == 1   # one process, one image


class _Pooled(nn.Module):
    """AlexNet's shape in small: a convolution and a max-pool without padding, a second convolution, then an
    adaptive pool: below 8 px the second convolution has nothing left to slide over."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 4, 3), nn.MaxPool2d(2))
        self.block = nn.Sequential(nn.Conv2d(4, 4, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        return self.fc(self.block(self.stem(x)))


def test_an_image_size_too_small_for_the_network_names_the_smallest_it_takes():
    check_input_size(_Pooled(), (3, 8, 8))
    check_input_size(_Pooled(), (3, 600, 600))      # above the 512 px probe: not searched
    refused = r"^images of 7x7 px are too small for this network \(.+\): it takes 8x8 px; pass --img-size 8 or more"
    with pytest.raises(ConfigError, match=refused):
        check_input_size(_Pooled(), (3, 7, 7))


def test_a_run_at_an_image_size_too_small_for_the_network_is_a_config_error_not_a_traceback(tmp_path):
    """helper-136: `zoo finetune alexnet --img-size 32` (inception_v3 below 75 px, VGG and ConvNeXt below 32) ended
    in torch's RuntimeError 'Output size is too small' from the first forward (feature caching), a traceback;
    build_setup, which every tool calls, now refuses the size first and names the smallest that works."""
    from finetune.core.config import FinetuneConfig
    from finetune.tools.train import fit
    from tests.finetune.test_train import DATA_CONFIG, sets

    train, val = sets(tmp_path / "data")
    config = FinetuneConfig(epochs=1, batch_size=9, workers=0, quiet=True, device="cpu", freeze="none")
    with pytest.raises(ConfigError, match=r"pass --img-size 8 or more"):
        fit(_Pooled(), (("stem",), ("block",)), {**DATA_CONFIG, "input_size": (3, 7, 7)}, train, val, config,
            head="fc")


class _Rows(nn.Module):
    """A network that cuts each image row into pieces of 16 px (a window partition): it takes any height and a width
    that is a multiple of 16, so its sizes are not monotonic and a wide image passes where its square does not."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(3 * 16, 3)

    def forward(self, x):
        return self.fc(x.unflatten(-1, (-1, 16)).mean((2, 3)).transpose(1, 2).flatten(1))


def test_a_size_the_network_takes_is_not_refused_because_its_square_is_not():
    """helper-141: the check ran the square of the shorter side (8x8 for 8x16 images, a model's own non-square size):
    a network that takes 8x16 but not 8x8 was refused ('too small ... it takes 16x16 px'), a size that works."""
    check_input_size(_Rows(), (3, 8, 16))
    check_input_size(_Rows(), (3, 48, 48))


def test_a_size_a_network_that_wants_a_multiple_refuses_is_not_called_too_small():
    """helper-141: for a network that wants a multiple of 16, 20 px was 'too small ... it takes 512x512 px; pass
    --img-size 512 or more' (after the halving search: 513 fails too): the refusal now says it takes only some
    sizes, naming one that works."""
    with pytest.raises(ConfigError, match=r"^this network does not take images of 20x20 px \(.+\); it takes only some "
                                          r"sizes: --img-size \d+ is one") as refused:
        check_input_size(_Rows(), (3, 20, 20))
    works = int(str(refused.value).split("--img-size ")[1].split()[0])
    check_input_size(_Rows(), (3, works, works))


class _Scaled(_Pooled):
    """_Pooled with a data-dependent step (``.item()``: no meta kernel can run it)."""

    def forward(self, x):
        return super().forward(x / max(float(x.abs().max().item()), 1.0))


def test_a_network_the_meta_device_cannot_run_is_left_to_its_own_forward():
    """helper-141: the check never refuses what it cannot run: both probes fail, so 7 px (too small) passes here
    and the forward's own error remains; 8 px, which the network takes, passes."""
    check_input_size(_Scaled(), (3, 8, 8))
    check_input_size(_Scaled(), (3, 7, 7))
