"""The modern regularisers of issue 16: label smoothing, TrivialAugment, mixup/CutMix (tiny model, 32 px)."""
from __future__ import annotations

import json
import math

import pytest
import torch

from finetune.core.config import FinetuneConfig
from finetune.data import DeviceAugment, ImageDataset, build_transform
from finetune.engine import build_loss, build_setup, evaluate
from finetune.engine.mixing import BatchMix, build_mix, partner
from finetune.core.errors import ConfigError, Interrupted
from finetune.core.seeding import epoch_seed
from tests.finetune.test_train import DATA_CONFIG, STAGES, cfg, run, sets, tiny_model
from tests.finetune.test_resume import _stop_after, equal_states


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return sets(tmp_path_factory.mktemp("modern") / "data")


# ------------------------------------------------------------------------------ options
@pytest.mark.parametrize("field,value,allowed", [("label_smoothing", 1.0, "0 <= x < 1"),
                                                 ("label_smoothing", -0.1, "0 <= x < 1"),
                                                 ("mixup", -1.0, "x >= 0"), ("cutmix", -0.5, "x >= 0"),
                                                 ("augment", "autoaugment", "standard, trivial, none"),
                                                 # QA: 100000 took the machine's memory (killed by the OOM killer)
                                                 ("img_size", 100000, "16 <= x <= 2048 or 0"),
                                                 # QA: a traceback (can't allocate 38 TB) / "has the data folder
                                                 # moved?" for every image / hours of feature passes
                                                 ("mlp_hidden", 10**11, "1 <= x <= 65536"),
                                                 ("brightness", 1e300, "0 <= x <= 10"),
                                                 ("contrast", 1e300, "0 <= x <= 10"),
                                                 ("aug_views", 10**9, "0 <= x <= 100")])
def test_ranges_come_from_options(field, value, allowed):
    flag = "--" + field.replace("_", "-")
    with pytest.raises(ConfigError, match=rf"invalid {field}=.*\({flag}\): .*{allowed}"):
        FinetuneConfig(**{field: value})


def test_augment_is_a_mode():
    assert FinetuneConfig().augment == "standard"
    with pytest.raises(ConfigError, match=r"invalid augment=.*choose one of standard, trivial, none"):
        FinetuneConfig.from_dict({"augment": "false"})
    with pytest.raises(ConfigError, match=r"augment=False should be standard, trivial or none"):     # (session 36:
        FinetuneConfig.from_dict({"augment": False})       # a bool is no text option's value, said as _coerce says it)
    with pytest.raises(ConfigError, match="--decode workers"):
        FinetuneConfig(augment="trivial", decode="device")


# ------------------------------------------------------------------------------ label smoothing
def test_label_smoothing_is_torch_cross_entropy_and_evaluation_stays_plain():
    torch.manual_seed(0)
    logits, y = torch.randn(6, 4), torch.tensor([0, 1, 2, 3, 1, 0])
    config = FinetuneConfig(label_smoothing=0.1)
    train = build_loss(config, None, torch.device("cpu"))
    plain = build_loss(config, None, torch.device("cpu"), train=False)
    expected = torch.nn.CrossEntropyLoss(label_smoothing=0.1)(logits, y)
    assert torch.equal(train(logits, y), expected)
    assert torch.equal(plain(logits, y), torch.nn.functional.cross_entropy(logits, y))
    # by hand: (1 - F) * NLL + F * mean over classes of -log p
    logp = logits.log_softmax(1)
    manual = (0.9 * -logp.gather(1, y[:, None]).squeeze(1) + 0.1 * -logp.mean(1)).mean()
    assert torch.allclose(train(logits, y), manual, atol=1e-6)
    weighted = build_loss(config.replace(class_weights="auto"), [1.0, 2.0, 0.5, 1.5], torch.device("cpu"))
    w = torch.tensor([1.0, 2.0, 0.5, 1.5])
    assert torch.equal(weighted(logits, y), torch.nn.CrossEntropyLoss(weight=w, label_smoothing=0.1)(logits, y))


def test_fit_reports_plain_validation_loss_with_smoothing(data):
    """The loop path: the training loss is smoothed, the validation loss (early stopping, best epoch) is
    plain cross-entropy of the same logits."""
    result = run(data, cfg(freeze="none", epochs=2, label_smoothing=0.2))
    _, val = data
    setup = build_setup(result.model, STAGES, DATA_CONFIG, val, val, cfg(freeze="none"), head="fc", reset_head=False)
    plain = evaluate(setup.model, setup.val_loader, torch.nn.CrossEntropyLoss(), setup.device, setup.classes)
    assert math.isclose(result.metrics["val_loss"], plain["loss"], rel_tol=1e-5)


def test_cached_head_solves_the_smoothed_problem_and_picks_on_plain_loss(data):
    """L-BFGS on cached features minimises the smoothed loss (its gradient vanishes at the solution; the
    unsmoothed optimum differs) while C is judged, and the run reported, on plain validation loss."""
    runs = {ls: run(data, cfg(freeze="head", fast_head=True, epochs=3, label_smoothing=ls), model=tiny_model())
            for ls in (0.0, 0.3)}
    smooth, hard = runs[0.3], runs[0.0]
    assert len(smooth.history) == 1                  # one converged solve
    assert not torch.allclose(smooth.model.fc.weight, hard.model.fc.weight, atol=1e-3)
    # the smoothed solution keeps smaller logits: the smoothed target caps the true-class probability
    assert smooth.model.fc.weight.norm() < hard.model.fc.weight.norm()
    _, val = data
    setup = build_setup(smooth.model, STAGES, DATA_CONFIG, val, val, cfg(freeze="head"), head="fc", reset_head=False)
    plain = evaluate(setup.model, setup.val_loader, torch.nn.CrossEntropyLoss(), setup.device, setup.classes)
    assert math.isclose(smooth.metrics["val_loss"], plain["loss"], rel_tol=1e-4)


# ------------------------------------------------------------------------------ TrivialAugment
def _names(transform) -> list[str]:
    return [type(t).__name__ for t in transform.pipeline.transforms]


@pytest.mark.parametrize("output", ["float", "uint8"])
def test_trivial_augment_replaces_the_jitter_and_is_seeded_per_sample(data, output):
    train, _ = data
    tf = build_transform(DATA_CONFIG, True, FinetuneConfig(augment="trivial"), output=output)
    names = _names(tf)
    assert "TrivialAugmentWide" in names and "ColorJitter" not in names and "RandomResizedCrop" in names
    assert names.index("TrivialAugmentWide") > names.index("RandomResizedCrop")   # on the cropped image
    assert "TrivialAugmentWide" not in _names(build_transform(DATA_CONFIG, False, FinetuneConfig(augment="trivial"),
                                                              output=output))
    ds = ImageDataset(train, tf)
    a = [ds[(i, 7)][0] for i in range(8)]
    b = [ds[(i, 7)][0] for i in range(8)]
    c = [ds[(i, 8)][0] for i in range(8)]
    assert all(torch.equal(x, y) for x, y in zip(a, b))            # same (epoch seed, index): same draws
    assert not all(torch.equal(x, y) for x, y in zip(a, c))        # another epoch: other draws


def test_trivial_augment_stays_in_the_workers_on_the_device_path():
    """uint8 + colour on the device (the CUDA path): the workers crop and TrivialAugment, the device only
    flips (no jitter on top of TrivialAugment) and normalises."""
    config = FinetuneConfig(augment="trivial")
    names = _names(build_transform(DATA_CONFIG, True, config, output="uint8", colour_on_device=True))
    assert "TrivialAugmentWide" in names and "RandomHorizontalFlip" not in names
    dev = DeviceAugment.from_config(DATA_CONFIG, config)
    assert dev.hflip == 0.5 and dev.brightness == 0 and dev.contrast == 0
    assert DeviceAugment.from_config(DATA_CONFIG, FinetuneConfig()).brightness == FinetuneConfig().brightness


# ------------------------------------------------------------------------------ mixup / CutMix
def test_mixup_blends_inputs_and_targets_with_the_drawn_lambda():
    torch.manual_seed(0)
    x, y = torch.randn(5, 3, 8, 8), torch.tensor([0, 1, 2, 1, 0])
    before = x.clone()
    mix = BatchMix(mixup=0.4, cutmix=0.0, num_classes=3)
    mix.reseed(11)
    out = mix(x, y, step=3)
    kind, lam, _ = mix.draw(3)
    assert out.kind == kind == "mixup" and out.lam == lam and 0 < lam < 1
    partners = [3, 4, 0, 1, 2]                                      # half a batch away (5: i - 2 mod 5)
    assert torch.allclose(out.x, lam * x + (1 - lam) * x[partners], atol=1e-6)
    one_hot = torch.nn.functional.one_hot(y, 3).float()
    assert torch.allclose(out.target, lam * one_hot + (1 - lam) * one_hot[partners])
    assert torch.equal(out.y, y if lam >= 0.5 else y[partners])     # train accuracy: the dominant label
    again = mix(x, y, step=3)
    assert torch.equal(again.x, out.x) and again.lam == out.lam     # seeded per (epoch seed, step)
    assert mix(x, y, step=4).lam != lam
    mix.reseed(12)
    assert mix(x, y, step=3).lam != lam
    assert torch.equal(x, before)                                   # the input batch is not modified in place


def test_every_rank_mixes_each_step_with_the_one_process_kind_lambda_and_box(monkeypatch):
    """Under torchrun each rank's mixer draws each step's kind, lambda and CutMix box as one process does (they
    were seeded with the rank: another lambda on every rank); the pairs are each rank's own images."""
    from types import SimpleNamespace

    import finetune.engine.setup as setup_module
    from finetune.core.distributed import DistInfo

    monkeypatch.setattr(setup_module, "set_loader_epoch", lambda *args: None)
    draws = []
    ranks = (DistInfo(), DistInfo(rank=0, world_size=2, enabled=True), DistInfo(rank=1, world_size=2, enabled=True))
    for info in ranks:
        mix = BatchMix(mixup=0.4, cutmix=1.0, num_classes=3)
        fake = SimpleNamespace(config=FinetuneConfig(seed=3), info=info, train_loader=None, train_normalize=None,
                               mix=mix)
        setup_module.Setup.seed_train_loader(fake, 5)
        draws.append([(mix.draw(step)[:2], mix(torch.ones(4, 3, 8, 8), torch.tensor([0, 1, 2, 1]), step).x)
                      for step in range(1, 9)])
    for rank_draws in draws[1:]:
        for (kind_lam, x), (one_kind_lam, one_x) in zip(rank_draws, draws[0]):
            assert kind_lam == one_kind_lam and torch.equal(x, one_x)


@pytest.mark.parametrize("n", [48, 52])
@pytest.mark.parametrize("world", [2, 4])
def test_the_partners_of_one_process_are_those_of_the_strided_shards_of_n(n, world):
    """Session 31: each image's partner was the batch reversed, so under torchrun a rank (global positions r,
    r + N, ... of each batch) paired within its shard: other pairs than one process. Half a batch away, every
    pair lies on one rank when each holds an even share: over the real sampler's batches of 8 (52 images: a
    last batch of 4, kept on 2 ranks, dropped on 4 as one process of such a run drops it), the ranks' pairs are
    one process's."""
    from finetune.data import set_epoch_order, train_batches

    class Sized:
        def __len__(self):
            return n

    def batches(ranks, rank):
        order = train_batches(Sized(), 8 // ranks, seed=5, world_size=ranks, rank=rank, processes=world)
        set_epoch_order(order.sampler, 5, 3)
        return [torch.tensor([i for i, _seed in b]) for b in order]

    def pairs(b):
        return dict(zip(b.tolist(), partner(b).tolist()))

    one, shares = batches(1, 0), [batches(world, r) for r in range(world)]
    assert {len(s) for s in shares} == {len(one)}
    for k, batch in enumerate(one):
        assert all(torch.equal(shares[r][k], batch[r::world]) for r in range(world))     # strided
        together = {}
        for r in range(world):
            together.update(pairs(shares[r][k]))
        mine = pairs(batch)
        assert together == mine and all(j != i and mine[j] == i for i, j in mine.items())      # pairs


def test_an_odd_batch_pairs_every_image_with_one_other():
    """An odd batch (one process, or a rank's odd share) cannot be split into pairs: half a batch away is then a
    cycle, still a permutation, every image mixed with one other (the reversed batch mixed its middle one with
    itself); a batch of one image is left as it is."""
    for n in range(1, 10):
        order = partner(torch.arange(n))
        assert sorted(order.tolist()) == list(range(n))
        assert n == 1 or not (order == torch.arange(n)).any()
        assert n % 2 or torch.equal(partner(order), torch.arange(n))     # an even batch: pairs


@pytest.mark.parametrize("world,batch,said", [(1, 5, None), (2, 8, None),
                                              (2, 10, "(here 5 of 10): --batch-size 8 or 12 trains"),
                                              (2, 2, "(here 1 of 2): --batch-size 4 trains")])
def test_an_odd_share_of_the_batch_under_torchrun_is_noted(world, batch, said):
    """The pairs of one process need an even share of the batch on every rank (engine.mixing): otherwise a line
    says so and which batch sizes would give them."""
    from types import SimpleNamespace

    from finetune.core.distributed import DistInfo
    from finetune.engine.setup import _mix_notes

    lines: list[str] = []
    setup = SimpleNamespace(config=cfg(mixup=0.2, batch_size=batch), head_only=False,
                            info=DistInfo(rank=0, world_size=world, enabled=world > 1))
    _mix_notes(setup, lines.append)
    assert len(lines) == (said is not None) and all(said in line for line in lines)


def test_cutmix_pastes_a_box_and_corrects_lambda_to_its_area():
    x, y = torch.zeros(4, 3, 16, 16), torch.tensor([0, 1, 2, 3])
    x += torch.arange(4.0).view(4, 1, 1, 1)            # image i is all i
    mix = BatchMix(mixup=0.0, cutmix=1.0, num_classes=4)
    for step in range(1, 20):
        out = mix(x, y, step)
        assert out.kind == "cutmix"
        pasted = (out.x[0, 0] == 2.0).float().mean().item()     # image 0 got pixels of image 2 (half a batch on)
        assert math.isclose(out.lam, 1.0 - pasted, abs_tol=1e-6)
        assert torch.allclose(out.target[0], torch.tensor([out.lam, 0, 1 - out.lam, 0]))
        assert torch.equal(out.y, y if out.lam >= 0.5 else y[[2, 3, 0, 1]])
    both = BatchMix(mixup=0.2, cutmix=1.0, num_classes=4)
    assert {both(x, y, s).kind for s in range(1, 40)} == {"mixup", "cutmix"}
    assert build_mix(FinetuneConfig(), 4) is None


def test_smoothed_soft_targets_equal_timms_mixup_loss():
    """Soft targets through the training loss with label smoothing = timm's mixup_target(smoothing) +
    SoftTargetCrossEntropy. timm pairs the batch reversed, zoo half a batch away: labels whose reversal is their
    half-batch roll (y[0] = y[2], y[3] = y[5]) give both the same pairs."""
    from timm.data.mixup import mixup_target
    from timm.loss import SoftTargetCrossEntropy

    torch.manual_seed(1)
    logits, y = torch.randn(6, 5), torch.tensor([0, 4, 0, 3, 1, 3])
    assert torch.equal(partner(y), y.flip(0))
    mix = BatchMix(mixup=0.3, cutmix=0.0, num_classes=5)
    out = mix(torch.randn(6, 3, 4, 4), y, step=1)
    ours = build_loss(FinetuneConfig(label_smoothing=0.1), None, torch.device("cpu"))(logits, out.target)
    theirs = SoftTargetCrossEntropy()(logits, mixup_target(y, 5, lam=out.lam, smoothing=0.1))
    assert torch.allclose(ours, theirs, atol=1e-6)


def test_mixup_run_trains_on_mixed_batches_and_resumes_exactly(data, tmp_path, monkeypatch):
    import finetune.engine.mixing as mixing

    calls = []
    original = mixing.BatchMix.__call__

    def counting(self, x, y, step):
        calls.append((self.seed, step))
        return original(self, x, y, step)

    monkeypatch.setattr(mixing.BatchMix, "__call__", counting)
    config = cfg(freeze="none", epochs=3, mixup=0.4, cutmix=1.0, augment="trivial", label_smoothing=0.1,
                 patience=10)
    full = run(data, config, run_dir=tmp_path / "full")
    assert calls and {s for s, _ in calls} == {epoch_seed(0, e) for e in (1, 2, 3)}
    saved = json.loads((tmp_path / "full" / "summary.json").read_text())
    assert saved["epochs_run"] == 3
    with pytest.raises(Interrupted):
        run(data, config, run_dir=tmp_path / "cut", callbacks=[_stop_after(2)])
    resumed = run(data, config, run_dir=tmp_path / "cut", resume=True, model=tiny_model(seed=123))
    assert [r["train_loss"] for r in resumed.history] == [r["train_loss"] for r in full.history]
    assert equal_states(resumed.model.state_dict(), full.model.state_dict())
    assert (tmp_path / "cut" / "config.yaml").read_text().count("mixup: 0.4") == 1


def test_head_only_with_mixup_trains_through_the_network(data):
    """Cached features cannot be mixed as images: a head-only run with mixup says so and takes the loader."""
    lines = []
    result = run(data, cfg(freeze="head", fast_head=True, epochs=2, mixup=0.2), log=lines.append)
    assert len(result.history) == 2                                  # epochs, not one L-BFGS solve
    assert any("trains through the network" in line for line in lines)
    assert not any(line.startswith("features:") for line in lines)
    warm_lines = []
    warm = run(data, cfg(freeze="none", fast_head=True, head_epochs=1, epochs=2, mixup=0.2), log=warm_lines.append)
    assert [r["phase"] for r in warm.history] == ["head", "finetune"]
    assert any(line.startswith("features:") for line in warm_lines)     # the warm-up stays on features


def test_lr_find_probes_mixed_batches_and_the_overfit_check_turns_mixing_off(data, monkeypatch):
    import finetune.engine.mixing as mixing
    from finetune.tools.diagnostics import lr_find, overfit_check

    calls = []
    original = mixing.BatchMix.__call__
    monkeypatch.setattr(mixing.BatchMix, "__call__",
                        lambda self, x, y, step: (calls.append(step), original(self, x, y, step))[1])
    train, _ = data
    result = lr_find(tiny_model(), STAGES, DATA_CONFIG, train, cfg(freeze="head", mixup=0.2), head="fc", steps=6)
    assert len(result.lrs) > 0 and calls          # head only + mixup: the network path, mixed batches
    import finetune.tools.diagnostics.overfit as overfit_module

    seen = []
    real_build = overfit_module.build_setup
    monkeypatch.setattr(overfit_module, "build_setup",
                        lambda *a, **kw: (seen.append(a[5]), real_build(*a, **kw))[1])
    overfit_check(tiny_model(), STAGES, DATA_CONFIG, train,
                  cfg(mixup=0.2, cutmix=1.0, label_smoothing=0.3, augment="trivial"), head="fc",
                  batches=1, max_steps=2)
    (used,) = seen          # nothing may fight the fit: no smoothing, no mixing, no augmentation
    assert (used.label_smoothing, used.mixup, used.cutmix, used.augment) == (0.0, 0.0, 0.0, "none")
