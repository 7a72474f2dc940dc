"""--ema: the weight average is the analytic EMA (with the warm-up rule), it is what the run validates and
keeps, and a resumed run continues it exactly."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from finetune.core.checkpoint import BEST, LAST, load_weights
from finetune.core.ema import ModelEma, ema_decay
from finetune.engine import evaluate
from finetune.core.errors import Interrupted
from tests.finetune.test_train import DATA_CONFIG, cfg, run, tiny_model
from tests.finetune.test_resume import data, equal_states, resume_cfg   # noqa: F401  (data: a fixture)


def test_decay_warms_up_to_the_given_decay():
    assert ema_decay(0.999, 0) == pytest.approx(0.1)           # the first update keeps 90% of the new weights
    assert ema_decay(0.999, 10) == pytest.approx(11 / 20)
    assert ema_decay(0.9, 1000) == 0.9                         # capped at the decay asked for
    assert ema_decay(0.999, 0, warmup=False) == 0.999          # from a solved head: no warm-up


@pytest.mark.parametrize("warmup", [True, False])
def test_ema_is_the_analytic_average_after_k_steps(warmup):
    """With the warm-up rule (an untrained start) and without it (a solved head: the decay from step 1)."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 2))
    net[0].requires_grad_(False)                               # a frozen layer: the average keeps it as is
    ema = ModelEma(net, 0.8, warmup=warmup)
    expected = {k: v.detach().clone() for k, v in net.named_parameters()}
    opt = torch.optim.SGD([p for p in net.parameters() if p.requires_grad], lr=0.05)
    net.train()
    for t in range(7):
        opt.zero_grad()
        net(torch.randn(5, 3)).pow(2).mean().backward()
        opt.step()
        ema.update(net)
        d = min(0.8, (1 + t) / (10 + t)) if warmup else 0.8
        for k, p in net.named_parameters():
            expected[k] = d * expected[k] + (1 - d) * p.detach()
    got = dict(ema.module.named_parameters())
    for k, p in net.named_parameters():
        assert torch.allclose(got[k], expected[k], atol=1e-6), k
        assert p.requires_grad is False or not torch.allclose(got[k], p)   # the average lags the weights
    assert torch.equal(got["0.weight"], net[0].weight)
    # BatchNorm buffers are copied, not averaged (as timm)
    assert torch.equal(ema.module[1].running_mean, net[1].running_mean)
    assert int(ema.module[1].num_batches_tracked) == 7
    assert ema.updates == 7


def _stop_after(k: int):
    def cb(row):
        if row["epoch"] == k:
            raise KeyboardInterrupt
    return cb


def test_fit_validates_and_keeps_the_average(data, tmp_path):
    """The epoch's val metrics are the average's; the best weights (what export takes) are the average."""
    out = tmp_path / "run"
    seen = {}

    def check(row):
        ckpt = torch.load(out / LAST, weights_only=True)
        seen[row["epoch"]] = row
        if row["epoch"] == 1:
            assert ckpt["ema"] is not None and ckpt["ema"]["updates"] == 3      # 27 images at batch 9
            assert equal_states(load_weights(out / BEST), ckpt["ema"]["model"])   # epoch 1 is the best so far
            assert not equal_states(ckpt["model"], ckpt["ema"]["model"])
            model = tiny_model()
            model.fc = nn.Linear(16, 3)
            model.load_state_dict(ckpt["ema"]["model"])
            val = evaluate(model, _val_loader(data), nn.CrossEntropyLoss(), torch.device("cpu"),
                           data[1].classes)
            assert val["loss"] == pytest.approx(row["val_loss"], rel=1e-5)

    run(data, cfg(epochs=2, freeze="none", ema=0.9, augment="none", patience=10), run_dir=out, callbacks=[check])
    assert set(seen) == {1, 2}


def _val_loader(data):
    from finetune.data import ImageDataset, build_transform, make_loader

    return make_loader(ImageDataset(data[1], build_transform(DATA_CONFIG, False)), 9, train=False, workers=0,
                       device="cpu")


def test_resume_with_ema_is_exact(data, tmp_path):
    config = resume_cfg(ema=0.95, epochs=3)
    full = run(data, config, run_dir=tmp_path / "full")
    with pytest.raises(Interrupted):
        run(data, config, run_dir=tmp_path / "cut", callbacks=[_stop_after(2)])   # inside the finetune phase
    assert torch.load(tmp_path / "cut" / LAST, weights_only=True)["ema"] is not None
    resumed = run(data, config, run_dir=tmp_path / "cut", resume=True, model=tiny_model(seed=123))
    assert [r["val_loss"] for r in resumed.history] == [r["val_loss"] for r in full.history]
    assert equal_states(resumed.model.state_dict(), full.model.state_dict())
    plain = run(data, config.replace(ema=0.0), run_dir=tmp_path / "plain")
    assert [r["val_loss"] for r in plain.history][1:] != [r["val_loss"] for r in full.history][1:]


def test_head_only_run_is_not_averaged(data, tmp_path):
    logs = []
    with_ema = run(data, cfg(epochs=2, freeze="head", ema=0.9), run_dir=tmp_path / "a", log=logs.append)
    without = run(data, cfg(epochs=2, freeze="head"), run_dir=tmp_path / "b")
    assert equal_states(with_ema.model.state_dict(), without.model.state_dict())
    assert any("--ema averages the weights of the finetune phase" in line for line in logs)


def test_a_default_run_averages_from_the_solved_head_without_warm_up(data, tmp_path, monkeypatch):
    """The defaults (--ema -1, --warmup-epochs -1) on a run that finetunes after a head phase: the average
    starts from the solved head with the decay 1 - 1/steps per epoch from its first step, the LR warms up
    over the first finetune epoch, and config.yaml records both. Without a head phase the decay of an
    average asked for warms up (the start is an untrained head)."""
    import yaml

    from finetune.engine import epoch_steps

    made: list[ModelEma] = []

    class Spy(ModelEma):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            made.append(self)

    monkeypatch.setattr(epoch_steps, "ModelEma", Spy)
    out = tmp_path / "run"
    run(data, cfg(freeze="none", head_epochs=1, epochs=3, ema=-1.0, warmup_epochs=-1.0), run_dir=out)
    assert [(e.decay, e.warmup) for e in made] == [(pytest.approx(2 / 3), False)]     # 27 images at batch 9
    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert saved["warmup_epochs"] == 1.0 and saved["ema"] == pytest.approx(2 / 3)
    made.clear()
    run(data, cfg(freeze="none", head_epochs=0, epochs=2, ema=0.9), run_dir=tmp_path / "cold")
    assert [(e.decay, e.warmup) for e in made] == [(0.9, True)]
