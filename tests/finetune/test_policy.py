"""Freeze decision from the dataset size, and the shared recipe set-up (prepare_model)."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from finetune.core.config import FinetuneConfig
from finetune.core.errors import ConfigError, DataError
from finetune.core.policy import FreezeDecision, decide_freeze
from finetune.core.recipe import prepare_model

N_STAGES = 5


def test_small_by_per_class_matches_the_documented_sentence():
    d = decide_freeze(FinetuneConfig(), 156, 4, 39, N_STAGES)
    assert d == FreezeDecision(0, "head", "156 images, 4 classes, 39 per class: small (small below 50 a class or "
                                          "500 images, large from 1000 a class) -> training the head only; "
                                          "pass --freeze to override")


def test_small_by_total_even_with_many_per_class():
    d = decide_freeze(FinetuneConfig(), 400, 2, 200, N_STAGES)  # 200/class >= 50 but 400 < 500 in total
    assert d.trainable_stages == 0 and "small" in d.reason


def test_the_thresholds_are_where_unfreezing_started_to_win():
    """50 per class and 500 in total are medium (unfreezing two stages won 2.3 points on digits at 50 per
    class, docs/peers.md); one image fewer in the smallest class, or in total, is small."""
    assert decide_freeze(FinetuneConfig(), 500, 10, 50, N_STAGES).trainable_stages == 2
    assert decide_freeze(FinetuneConfig(), 499, 10, 49, N_STAGES).trainable_stages == 0
    assert decide_freeze(FinetuneConfig(), 499, 5, 60, N_STAGES).trainable_stages == 0


def test_medium_trains_the_last_medium_stages():
    d = decide_freeze(FinetuneConfig(), 3000, 10, 250, N_STAGES)
    assert (d.trainable_stages, d.label) == (2, "head + last 2 stages")
    assert d.reason == ("3000 images, 10 classes, at least 250 per class: medium (small below 50 a class or 500 "
                        "images, large from 1000 a class) -> training the head and the last 2 stages; pass --freeze "
                        "to override")
    # the bands come from the options that set them (helper-149: "300 per class: medium" said neither)
    assert "(small below 20 a class or 100 images, large from 400 a class)" in decide_freeze(
        FinetuneConfig(small_per_class=20, small_total=100, large_per_class=400), 3000, 10, 250, N_STAGES).reason
    assert decide_freeze(FinetuneConfig(medium_stages=9), 3000, 10, 250, N_STAGES).trainable_stages == N_STAGES


def test_large_trains_everything():
    d = decide_freeze(FinetuneConfig(), 20000, 10, 2000, N_STAGES)
    assert (d.trainable_stages, d.label) == (N_STAGES, "none")
    assert ": large (" in d.reason and "-> training every layer" in d.reason


@pytest.mark.parametrize("freeze, k, label", [("head", 0, "head"), ("none", 5, "none"), ("3", 3, "head + last 3 stages"),
                                              ("0", 0, "head"), ("5", 5, "none")])
def test_requested_modes_ignore_the_dataset_size(freeze, k, label):
    d = decide_freeze(FinetuneConfig(freeze=freeze), 20, 2, 10, N_STAGES)
    assert (d.trainable_stages, d.label) == (k, label)
    assert d.reason.startswith(f"--freeze {freeze} requested: ")


def test_k_beyond_the_stage_count_says_the_maximum():
    with pytest.raises(ConfigError, match="the most is 5"):
        decide_freeze(FinetuneConfig(freeze="6"), 20, 2, 10, N_STAGES)


class Tiny(nn.Module):
    """Two conv stages with BatchNorm and an FC-1000 head: a stand-in for a pretrained backbone."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU())
        self.block = nn.Sequential(nn.Conv2d(4, 8, 3), nn.BatchNorm2d(8), nn.ReLU())
        self.fc = nn.Linear(8, 1000)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.block(self.stem(x)).mean((2, 3)))


STAGES = [["stem"], ["block"]]


def names(model: nn.Module, prefixes: tuple[str, ...]) -> set[str]:
    return {n for n, _ in model.named_parameters() if n.split(".")[0] in prefixes}


@pytest.mark.parametrize("counts, prefixes, size", [
    ([20, 30], ("fc",), "small"),
    ([600, 700], ("block", "fc"), "medium"),          # medium_stages=1 below
    ([1000, 1200], ("stem", "block", "fc"), "large"),
])
def test_prepare_model_auto_sizes(counts, prefixes, size):
    model = Tiny()
    config = FinetuneConfig(medium_stages=1)
    d = prepare_model(model, STAGES, "fc", 2, counts, config)
    assert size in d.reason
    assert {n for n, p in model.named_parameters() if p.requires_grad} == names(model, prefixes)
    assert model.fc.out_features == 2
    model.train()
    assert not model.stem[1].training  # BatchNorm statistics frozen by default


def test_prepare_model_mlp_head_and_summary():
    model = Tiny()
    d = prepare_model(model, STAGES, "fc", 3, [5, 5, 5], FinetuneConfig(head="mlp", mlp_hidden=4, freeze="head"))
    assert d.trainable_stages == 0
    head = {id(p) for p in model.fc.parameters()} - {id(model.fc.fc1.bias)}     # (MLPHead.FIXED)
    assert {id(p) for p in model.parameters() if p.requires_grad} == head
    model.train()
    assert model.fc.bn.training
    assert sum(isinstance(m, nn.modules.batchnorm._BatchNorm) and not m.training for m in model.modules()) == 2


def test_prepare_model_without_images_is_a_data_error():
    with pytest.raises(DataError):
        prepare_model(Tiny(), STAGES, "fc", 2, [0, 0], FinetuneConfig())


def test_default_bn_follows_the_weights():
    from finetune.core.policy import default_bn

    assert default_bn(True) == "eval" and default_bn(False) == "train"


def test_auto_epochs_follow_what_trains():
    """--epochs 0 (the default): a short schedule that ends when layers are finetuned, more epochs for a
    head alone (they run on cached features); a number given is kept."""
    from finetune.core.policy import AUTO_EPOCHS_FINETUNE, AUTO_EPOCHS_HEAD, default_epochs

    auto = FinetuneConfig()
    assert auto.epochs == 0
    assert default_epochs(auto, 0) == AUTO_EPOCHS_HEAD == 30
    assert default_epochs(auto, 2) == default_epochs(auto, N_STAGES) == AUTO_EPOCHS_FINETUNE == 8
    assert default_epochs(FinetuneConfig(epochs=7), 0) == default_epochs(FinetuneConfig(epochs=7), 2) == 7


@pytest.mark.parametrize("options, epochs", [
    ({}, 8),                                          # the linear head, solved in one epoch: 1 + 7
    ({"head": "mlp"}, 17),                            # trained by gradient: up to 10 head epochs + 7
    ({"head": "mlp", "head_epochs": 3}, 10),
    ({"head_solver": "gradient"}, 17),
    ({"fast_head": False}, 17),                       # the warm-up through the network, by gradient
    ({"head": "mlp", "head_epochs": 0}, 8),           # no warm-up
    ({"head": "mlp", "epochs": 5}, 5),                # a number given is kept
])
def test_auto_epochs_leave_the_finetune_phase_its_epochs_after_a_head_trained_by_gradient(options, epochs):
    """Measured (docs/peers.md, session 28): with --head mlp, auto epochs (8) let the head warm-up on cached features
    take 7 epochs (its val loss kept improving), and the finetune phase got one, all LR warm-up: test 95.7% on medium
    digits where 7 finetune epochs gave 98.2%. A warm-up that trains by gradient gets its epochs on top."""
    from finetune.core.policy import default_epochs
    from finetune.engine import plan_phases

    config = FinetuneConfig(**options)
    assert default_epochs(config, 2) == epochs
    phases, cap = plan_phases(2, config.replace(epochs=epochs))
    if epochs > 8:      # a warm-up by gradient, at its cap: the finetune phase keeps its 7
        assert phases == ["head", "finetune"] and epochs - cap == 7


def _tiny_setup(root, config: FinetuneConfig, logs: list[str] | None = None):
    """build_setup of a one-stage conv net on the 3-class image folder ``root`` (16 px), on the CPU."""
    from finetune.data import ImageSet
    from finetune.engine import build_setup

    classes = ["cat", "dog", "fox"]
    items = [(str(p), ci) for ci, c in enumerate(classes) for p in sorted((root / c).glob("*.png"))]
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3))
    dc = {"input_size": (3, 16, 16), "interpolation": "bilinear", "crop_pct": 1.0, "mean": (0.5,) * 3,
          "std": (0.5,) * 3}
    setup = build_setup(model, [["0"]], dc, ImageSet(items, classes), None, config.replace(device="cpu", workers=0),
                        head="3", copy_model=True, distributed=False)
    (logs if logs is not None else []).extend([*setup.chosen.values(), *setup.notes])   # (as the run says them)
    return setup


def test_the_setup_holds_the_resolved_epochs(tmp_path):
    """build_setup resolves auto epochs once, from the freeze decision, and says so; the run folder's
    config.yaml and the checkpoints then record the number."""
    from tests.conftest import make_image_folder

    root = make_image_folder(tmp_path / "d", per_class=3)
    for freeze, want in (("head", 30), ("none", 8)):
        logs: list[str] = []
        s = _tiny_setup(root, FinetuneConfig(freeze=freeze), logs)
        assert s.config.epochs == want
        assert f"epochs: at most {want} (auto for" in " ".join(logs)
    assert _tiny_setup(root, FinetuneConfig(epochs=4)).config.epochs == 4


def test_the_setup_holds_the_resolved_lr_and_says_it_where_it_trains_something(tmp_path):
    """--lr 0 (the default, auto): 1e-2 when layers are finetuned from a head solved first with frozen BatchNorm
    statistics (the pretrained layers at x --backbone-lr-mult), else 1e-3 (an MLP head warmed up by gradient at 1e-2
    lost 4.5 points on digits); a head solved by L-BFGS alone uses none and nothing is said of it. config.yaml and
    the checkpoints record the number; an lr given is kept and not announced. An optimizer whose LR means another
    thing has its own pair (``AUTO_LR_BY_OPTIMIZER``): RMSprop diverged at 1e-2, Adagrad's steps shrink, Adadelta's
    LR is a multiplier (1.0)."""
    from finetune.core.policy import AUTO_LR_BY_OPTIMIZER, AUTO_LR_FINETUNE, AUTO_LR_OTHER, default_lr
    from tests.conftest import make_image_folder

    assert (AUTO_LR_FINETUNE, AUTO_LR_OTHER) == (1e-2, 1e-3)
    assert AUTO_LR_BY_OPTIMIZER == {"rmsprop": (1e-3, 1e-4), "adagrad": (1e-2, 1e-2), "adadelta": (1.0, 1.0)}
    root = make_image_folder(tmp_path / "d", per_class=3)
    for config, want, line in (
            (FinetuneConfig(freeze="none"), 1e-2, "lr: 0.01, pretrained layers at 0.001 (auto for freeze"),
            (FinetuneConfig(freeze="none", backbone_lr_mult=0.5), 1e-2, "lr: 0.01, pretrained layers at 0.005 (auto"),
            (FinetuneConfig(freeze="head", head_solver="gradient"), 1e-3, "lr: 0.001 (auto for freeze head"),
            (FinetuneConfig(freeze="none", head="mlp"), 1e-3, "lr: 0.001, pretrained layers at 0.0001 (auto"),
            (FinetuneConfig(freeze="none", bn="train"), 1e-3, "lr: 0.001, pretrained layers at 0.0001 (auto"),
            (FinetuneConfig(freeze="none", head_epochs=0), 1e-3, "lr: 0.001, pretrained layers at 0.0001 (auto"),
            (FinetuneConfig(freeze="none", epochs=1), 1e-3, "lr: 0.001, pretrained layers at 0.0001 (auto"),
            (FinetuneConfig(freeze="head"), 1e-3, None),
            (FinetuneConfig(freeze="none", lr=3e-4), 3e-4, None),
            (FinetuneConfig(freeze="none", optimizer="sgd"), 1e-2, "lr: 0.01, pretrained layers at 0.001 (auto"),
            (FinetuneConfig(freeze="none", optimizer="rmsprop"), 1e-3, "lr: 0.001, pretrained layers at 0.0001 (auto"),
            (FinetuneConfig(freeze="none", optimizer="adadelta"), 1.0, "lr: 1, pretrained layers at 0.1 (auto for"),
            (FinetuneConfig(freeze="head", head_solver="gradient", optimizer="adadelta"), 1.0, "lr: 1 (auto for"),
            (FinetuneConfig(freeze="none", head="mlp", optimizer="rmsprop"), 1e-4, "lr: 0.0001, pretrained layers at"),
            (FinetuneConfig(freeze="none", head="mlp", optimizer="adagrad"), 1e-2, "lr: 0.01, pretrained layers at"),
            (FinetuneConfig(freeze="none", optimizer="adadelta", lr=0.5), 0.5, None)):
        logs: list[str] = []
        s = _tiny_setup(root, config, logs)
        assert s.config.lr == want == default_lr(config.replace(epochs=s.config.epochs), s.decision.trainable_stages)
        said = [text for text in logs if text.startswith("lr:")]
        assert said == ([] if line is None else [said[0]]) and (line is None or said[0].startswith(line)), logs


def test_auto_departure_after_a_solved_head_only():
    """--warmup-epochs -1 and --ema -1 (the defaults): a one-epoch LR warm-up and an average over about one
    epoch when the finetune phase starts from a head phase; nothing for a head-only run, a run without a
    head phase (--head-epochs 0) or one with no room for it; values given are kept as they are."""
    from finetune.core.policy import AUTO_WARMUP_EPOCHS, default_departure, head_first

    auto = FinetuneConfig(epochs=8)
    assert auto.warmup_epochs == -1 and auto.ema == -1 and AUTO_WARMUP_EPOCHS == 1
    assert head_first(auto, 2) and not head_first(auto, 0)
    assert default_departure(auto, 2, 32) == (1.0, 1 - 1 / 32)
    assert default_departure(auto, N_STAGES, 4) == (1.0, 0.75)
    assert default_departure(auto, 2, 1) == (1.0, 0.0)              # one step per epoch: nothing to average
    assert default_departure(auto, 0, 32) == (0.0, 0.0)             # head only
    assert default_departure(auto.replace(head_epochs=0), 2, 32) == (0.0, 0.0)
    assert default_departure(FinetuneConfig(epochs=1), 2, 32) == (0.0, 0.0)   # no room for a head phase
    assert default_departure(auto.replace(warmup_epochs=0.0, ema=0.0), 2, 32) == (0.0, 0.0)
    assert default_departure(auto.replace(warmup_epochs=2.5, ema=0.99), 0, 32) == (2.5, 0.99)


def test_the_setup_holds_the_resolved_departure(tmp_path):
    """build_setup resolves the auto warm-up and EMA once (steps per epoch from its loader) and says so on
    a run that finetunes after the head; a head-only run resolves both to 0 without a word."""
    from tests.conftest import make_image_folder

    root = make_image_folder(tmp_path / "d", per_class=4)
    for freeze, want, said in (("head", (0.0, 0.0), False), ("none", (1.0, 0.75), True)):
        logs: list[str] = []
        s = _tiny_setup(root, FinetuneConfig(freeze=freeze, batch_size=3), logs)
        assert s.steps_per_epoch == 4
        assert (s.config.warmup_epochs, s.config.ema) == want
        assert any(line.startswith("finetune: leaving the solved head gently: the LR warms up over 1 epoch "
                                   "and the weights are averaged over about 1 epoch (EMA decay 0.75)")
                   for line in logs) == said


def test_an_mlp_head_uses_the_learning_rate_even_with_the_lbfgs_solver():
    """QA: L-BFGS solves a linear head only; an MLP head trains by gradient at --lr, so `--lr auto`,
    `zoo lr-find` and `zoo sweep` must not say that its learning rate is unused."""
    from finetune.core.policy import lr_unused

    assert lr_unused(FinetuneConfig(), 0)
    assert not lr_unused(FinetuneConfig(head="mlp"), 0)
    assert not lr_unused(FinetuneConfig(head_solver="gradient"), 0)
    assert not lr_unused(FinetuneConfig(mixup=0.2), 0) and not lr_unused(FinetuneConfig(), 1)
