"""The handedness test behind ``--hflip`` auto (finetune.tools.features.handedness)."""
from __future__ import annotations

import torch

from finetune.tools.features import handedness as hd


def _noise(n: int, d: int = 8, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, d, generator=torch.Generator().manual_seed(seed))


def test_identical_views_are_not_handed():
    """Mirror-symmetric images: the two views have the same features, every comparison ties (half a point)."""
    x = _noise(60)
    y = torch.arange(60) % 3
    out = hd.handedness(x, x.clone(), y, 3)
    assert out.score == 0.5 and not out.handed and out.images == 60


def test_an_orientation_the_features_carry_is_handed():
    """Digits, text: the mirror shifts the features the same way in every class."""
    x = _noise(60)
    y = torch.arange(60) % 3
    m = x.clone()
    m[:, 0] += 6.0
    out = hd.handedness(x, m, y, 3)
    assert out.score == 1.0 and out.low > hd.HANDED and out.handed
    assert out.to_dict() == {"score": 1.0, "low": out.low, "images": 60, "handed": True, "threshold": hd.HANDED}


def test_classes_that_are_each_others_mirror_are_handed():
    """Left/right arrows: the set of mirrored images is the set of images, so only the class tells the
    orientation; the 2K-way regression is conditioned on it."""
    n = 60
    y = torch.arange(n) % 2
    left, right = torch.zeros(8), torch.zeros(8)
    left[0], right[1] = 5.0, 5.0
    noise = 0.1 * _noise(n)
    plain = torch.where((y == 0)[:, None], left, right) + noise
    mirrored = torch.where((y == 0)[:, None], right, left) + noise
    out = hd.handedness(plain, mirrored, y, 2)
    assert out.score == 1.0 and out.handed


def test_unrelated_noise_stays_below_the_threshold():
    """Views whose differences carry no orientation (independent noise) stay near chance."""
    y = torch.arange(400) % 4
    out = hd.handedness(_noise(400, seed=1), _noise(400, seed=2), y, 4)
    assert out.low < hd.HANDED and not out.handed


def test_large_splits_are_subsampled_and_the_global_rng_is_untouched(monkeypatch):
    monkeypatch.setattr(hd, "MAX_IMAGES", 50)
    x = _noise(120)
    m = x.clone()
    m[:, 0] += 6.0
    y = torch.arange(120) % 3
    before = torch.get_rng_state()
    first = hd.handedness(x, m, y, 3, seed=4)
    assert torch.equal(before, torch.get_rng_state())
    assert first.images == 50 and first.handed
    assert hd.handedness(x, m, y, 3, seed=4) == first
