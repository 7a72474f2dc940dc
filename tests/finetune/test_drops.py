"""finetune.engine.drops.SharedDropout: dropout masks drawn for the global batch, each rank keeping its rows."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from finetune.engine.drops import SharedDropout


def _forward(drops: SharedDropout, module: nn.Module, x: torch.Tensor, step: int = 1) -> torch.Tensor:
    with drops.at(step):
        return module(x)


class Functional(nn.Module):
    """Dropout as timm's models call it before their classifier, then a second one: two calls a step."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.dropout(F.dropout(x, 0.25, self.training), 0.5, self.training)


@pytest.mark.parametrize("module", [nn.Dropout(0.3), Functional()], ids=["nn.Dropout", "functional"])
def test_each_rank_gets_its_rows_of_the_one_process_masks(module):
    # The ranks split each global batch strided (rank r holds rows r, r + world, ...): their outputs, put back
    # together, are the one-process output, for any number of processes.
    x = torch.randn(12, 5, 3)
    one = _forward(SharedDropout(seed=7), module, x, step=3)
    assert (one == 0).any() and (one != 0).any()
    for world in (2, 3, 4):
        parts = [_forward(SharedDropout(seed=7, rank=r, world=world), module, x[r::world], step=3)
                 for r in range(world)]
        together = torch.empty_like(one)
        for r, part in enumerate(parts):
            together[r::world] = part
        assert torch.equal(together, one), world


def test_masks_follow_seed_step_and_call_and_repeat_exactly():
    x = torch.ones(64, 32)
    drop = nn.Dropout(0.5)
    a = _forward(SharedDropout(seed=1), drop, x, step=1)
    assert torch.equal(a, _forward(SharedDropout(seed=1), drop, x, step=1))      # a resumed epoch: the same masks
    assert not torch.equal(a, _forward(SharedDropout(seed=1), drop, x, step=2))
    assert not torch.equal(a, _forward(SharedDropout(seed=2), drop, x, step=1))
    two = _forward(SharedDropout(seed=1), nn.Sequential(nn.Dropout(0.5), nn.Dropout(0.5)), x, step=1)
    assert set(a.unique().tolist()) == {0.0, 2.0} and set(two.unique().tolist()) == {0.0, 4.0}


def test_values_and_gradients_are_dropouts():
    x = torch.full((200, 50), 3.0, requires_grad=True)
    out = _forward(SharedDropout(seed=0), nn.Dropout(0.2), x)
    kept = out != 0
    assert torch.equal(out[kept], torch.full_like(out[kept], 3.0 / 0.8))
    assert 0.7 < kept.double().mean().item() < 0.9                 # 10,000 draws at 0.8: far from either bound
    out.sum().backward()
    assert torch.equal(x.grad, kept.double().float() / 0.8)
    y = torch.ones(8, 4)
    same = _forward(SharedDropout(seed=0), nn.Dropout(0.5, inplace=True), y)
    assert same is y and set(y.unique().tolist()) <= {0.0, 2.0}


def test_outside_training_and_outside_the_step_nothing_changes():
    x = torch.randn(6, 4)
    drop = nn.Dropout(0.5).eval()
    assert _forward(SharedDropout(seed=0), drop, x) is x                    # eval mode: the input itself
    assert _forward(SharedDropout(seed=0), nn.Dropout(0.0), x) is x
    plain = F.dropout
    with pytest.raises(RuntimeError, match="boom"):
        with SharedDropout(seed=0).at(1):
            raise RuntimeError("boom")
    assert F.dropout is plain                                             # torch's own again, after an error too
    with pytest.raises(ValueError, match="between 0 and 1"), SharedDropout(seed=0).at(1):
        F.dropout(x, 1.5, True)


@pytest.mark.parametrize("inplace", [False, True])
def test_a_half_precision_kept_value_is_scaled_in_float_and_rounded_once(inplace):
    # Under bf16 autocast the scale 1/(1-p) was rounded to bf16 first (1/0.9 -> 1.109375): each kept value biased
    # by up to 0.2% (torch's CUDA kernel scales in float). Now the product is computed in float and rounded once.
    x = torch.linspace(0.5, 4.0, 400).to(torch.bfloat16).reshape(20, 20)
    want = (x.float() * (1 / 0.9)).to(torch.bfloat16)
    got = _forward(SharedDropout(seed=0), nn.Dropout(0.1, inplace=inplace), x.clone())
    kept = got != 0
    assert got.dtype == torch.bfloat16 and kept.any()
    assert torch.equal(got[kept], want[kept])
