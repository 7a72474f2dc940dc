"""Parameter groups, every optimizer, every schedule's LR curve and scheduler state round-trips."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from finetune.core.config import OPTIMIZERS, FinetuneConfig
from finetune.core.errors import ConfigError
from finetune.core.optim import build_optimizer, build_scheduler, lr_factor, param_groups, set_base_lr


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(4, 8), nn.LayerNorm(8), nn.ReLU())
        self.frozen = nn.Linear(4, 4)
        self.fc = nn.Linear(8, 3)
        self.frozen.requires_grad_(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.body(x)) + self.frozen(x).sum(1, keepdim=True)


def by_id(groups: list[dict]) -> dict[int, dict]:
    return {id(p): g for g in groups for p in g["params"]}


def test_param_groups_split_head_backbone_and_decay():
    net = Net()
    groups = param_groups(net, "fc", lr=1e-2, backbone_lr_mult=0.1, weight_decay=5e-4)
    owner = by_id(groups)
    assert id(net.frozen.weight) not in owner and id(net.frozen.bias) not in owner
    assert len(owner) == 6
    assert owner[id(net.fc.weight)]["name"] == "head" and owner[id(net.fc.weight)]["lr"] == 1e-2
    assert owner[id(net.body[0].weight)]["name"] == "backbone"
    assert owner[id(net.body[0].weight)]["lr"] == pytest.approx(1e-3)  # 0.1 x head
    assert owner[id(net.body[0].weight)]["weight_decay"] == 5e-4
    for p in (net.fc.bias, net.body[0].bias, net.body[1].weight, net.body[1].bias):
        assert owner[id(p)]["weight_decay"] == 0.0
    assert all(g["base_lr"] == g["lr"] for g in groups)


def test_nothing_trainable_is_a_config_error():
    net = Net().requires_grad_(False)
    with pytest.raises(ConfigError, match="trainable"):
        param_groups(net, "fc", 1e-3)


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_each_optimizer_takes_a_step(name):
    torch.manual_seed(0)
    net = Net()
    config = FinetuneConfig(optimizer=name, lr=0.1 if name != "adadelta" else 1.0, nesterov=name == "sgd")
    opt = build_optimizer(config, net, "fc")
    assert {g["name"] for g in opt.param_groups} == {"head", "backbone"}
    before = net.fc.weight.detach().clone(), net.body[0].weight.detach().clone()
    nn.functional.cross_entropy(net(torch.randn(8, 4)), torch.randint(0, 3, (8,))).backward()
    opt.step()
    assert not torch.equal(net.fc.weight, before[0]) and not torch.equal(net.body[0].weight, before[1])
    backbone = [g["lr"] for g in opt.param_groups if g["name"] == "backbone"]
    assert backbone and all(lr == pytest.approx(config.lr * 0.1) for lr in backbone)


def test_sgd_nesterov_without_momentum_is_rejected():
    """QA: refused only when the optimizer was built, after the run folder was written: the config.yaml it
    held refused every --resume, and the corrected command found the folder taken (--overwrite needed)."""
    with pytest.raises(ConfigError, match=r"invalid nesterov=True \(--nesterov\): Nesterov momentum needs --momentum"):
        FinetuneConfig(optimizer="sgd", nesterov=True, momentum=0.0)
    FinetuneConfig(optimizer="adam", nesterov=True, momentum=0.0)      # not used by adam: nothing to refuse


def curve(schedule: str, epochs: int = 6, spe: int = 4, metric=None, **kw) -> list[float]:
    """Head LR used at each optimizer step."""
    config = FinetuneConfig(schedule=schedule, epochs=epochs, lr=1.0, **{"warmup_epochs": 0.0, **kw})
    opt = build_optimizer(config, Net(), "fc")
    sched = build_scheduler(config, opt, spe)
    lrs = []
    for epoch in range(epochs):
        for _ in range(spe):
            lrs.append(sched.current_lr())
            opt.step()
            sched.step_batch()
        sched.step_epoch(metric(epoch) if metric else 1.0)
    return lrs


def test_warmup_rises_linearly_then_hands_over():
    lrs = curve("none", warmup_epochs=1.0)
    assert lrs[:4] == pytest.approx([0.2, 0.4, 0.6, 0.8])
    assert lrs[4:] == pytest.approx([1.0] * 20)
    half = curve("cosine", warmup_epochs=0.5)  # fractional warm-up: 2 steps at 4 steps per epoch
    assert half[:2] == pytest.approx([1 / 3, 2 / 3]) and half[2] == pytest.approx(1.0)


def test_step_drops_by_gamma_every_step_size_epochs():
    lrs = curve("step", step_size=2, gamma=0.1)
    assert lrs[0:8] == pytest.approx([1.0] * 8)
    assert lrs[8:16] == pytest.approx([0.1] * 8)
    assert lrs[16:24] == pytest.approx([0.01] * 8)


def test_cosine_decreases_to_near_zero():
    lrs = curve("cosine")
    assert lrs[0] == 1.0 and all(a >= b for a, b in zip(lrs, lrs[1:]))
    assert lrs[12] == pytest.approx(0.5) and lrs[-1] < 0.01


def test_exp_and_inv_decay_smoothly():
    exp = curve("exp", step_size=2, gamma=0.1)
    assert exp[8] == pytest.approx(0.1) and exp[1] < exp[0] and all(a > b for a, b in zip(exp, exp[1:]))
    inv = curve("inv", gamma=0.5)
    assert inv[4] == pytest.approx(1 / 1.5) and inv[8] == pytest.approx(1 / 2.0)  # (1 + gamma * epoch) ** -1


def test_plateau_reduces_on_a_flat_metric_and_not_while_improving():
    flat = curve("plateau", patience=4, gamma=0.5, metric=lambda e: 1.0)  # plateau patience = 2 epochs
    assert flat[:16] == pytest.approx([1.0] * 16) and flat[16:] == pytest.approx([0.5] * 8)
    improving = curve("plateau", patience=4, gamma=0.5, metric=lambda e: 1.0 - 0.1 * e)
    assert improving == pytest.approx([1.0] * 24)
    with_warmup = curve("plateau", warmup_epochs=1.0, patience=4, gamma=0.5, metric=lambda e: 1.0)
    assert with_warmup[:4] == pytest.approx([0.2, 0.4, 0.6, 0.8]) and with_warmup[4] == 1.0
    no_val = curve("plateau", patience=2, gamma=0.5, metric=lambda e: None if e % 2 else float("nan"))
    assert no_val == pytest.approx([1.0] * 24)  # without a metric the LR is left alone


def test_lr_factor_rejects_unknown_schedule():
    with pytest.raises(ConfigError, match="schedule"):
        lr_factor("linear", 0, 4, 6)


@pytest.mark.parametrize("schedule", ["cosine", "plateau"])
def test_scheduler_state_dict_round_trips(schedule):
    config = FinetuneConfig(schedule=schedule, epochs=6, lr=1.0, warmup_epochs=0.5, patience=2, gamma=0.5)

    def make():
        opt = build_optimizer(config, Net(), "fc")
        return opt, build_scheduler(config, opt, 4)

    opt, sched = make()
    for epoch in range(3):
        for _ in range(4):
            opt.step()
            sched.step_batch()
        sched.step_epoch(1.0)
    state = sched.state_dict()
    opt2, sched2 = make()
    sched2.load_state_dict(state)
    assert sched2.current_lr() == sched.current_lr()
    for s, o in ((sched, opt), (sched2, opt2)):
        for _ in range(4):
            o.step()
            s.step_batch()
        s.step_epoch(1.0)
    assert [g["lr"] for g in opt2.param_groups] == pytest.approx([g["lr"] for g in opt.param_groups])
    with pytest.raises(ConfigError, match="schedule"):
        build_scheduler(config.replace(schedule="step"), make()[0], 4).load_state_dict(state)


@pytest.mark.parametrize("schedule", ["cosine", "step"])
def test_a_resume_on_other_steps_per_epoch_keeps_the_epochs_done(schedule):
    """QA (session 19): a run saved after 2 epochs of 5 steps (34 images at batch 8, one process) and resumed on
    2 processes, whose loaders drop the last 2 images (4 steps), went on from step 10 of a 4-step epoch: 2.5
    epochs into the schedule, its last epochs at 0.8x and 0.6x their LR. The position is the epochs done."""
    config = FinetuneConfig(schedule=schedule, epochs=4, lr=1.0, warmup_epochs=1.0, step_size=3, gamma=0.5)

    def run(spe, epochs, state=None):
        opt = build_optimizer(config, Net(), "fc")
        sched = build_scheduler(config, opt, spe)
        if state is not None:
            sched.load_state_dict(state)
        lrs = []
        for _ in range(epochs):
            lrs.append(sched.lrs())
            for _ in range(spe):
                opt.step()
                sched.step_batch()
            sched.step_epoch(1.0)
        return lrs, sched.state_dict()

    (_, saved), (four, _) = run(5, 2), run(4, 4)
    resumed, _ = run(4, 2, saved)
    assert resumed == four[2:]
    assert run(5, 2, run(5, 2)[1])[0] == run(5, 4)[0][2:]     # the same steps: unchanged


def test_set_base_lr_moves_all_groups_together():
    opt = build_optimizer(FinetuneConfig(lr=1e-3), Net(), "fc")
    set_base_lr(opt, 0.5)
    assert {g["name"]: g["lr"] for g in opt.param_groups} == {"head": 0.5, "backbone": pytest.approx(0.05)}
    sched = build_scheduler(FinetuneConfig(schedule="none", warmup_epochs=0.0), opt, 4)
    assert sched.current_lr() == 0.5


class Staged(nn.Module):
    """Three stages, a parameter no stage lists (``scale``) and the head ``fc``."""

    def __init__(self) -> None:
        super().__init__()
        self.s0, self.s1, self.s2 = nn.Linear(4, 4), nn.Linear(4, 4), nn.Linear(4, 4)
        self.scale = nn.Parameter(torch.ones(4, 4))
        self.fc = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.s2(self.s1(self.s0(x @ self.scale))))


STAGED = (("s0",), ("s1",), ("s2",))


def test_layer_decay_gives_each_stage_its_lr():
    net = Staged()
    config = FinetuneConfig(lr=1.0, backbone_lr_mult=0.1, layer_decay=0.5, weight_decay=1e-4)
    opt = build_optimizer(config, net, "fc", STAGED)
    owner = by_id(opt.param_groups)
    want = {net.fc: 1.0, net.s2: 0.1 * 0.5, net.s1: 0.1 * 0.25, net.s0: 0.1 * 0.125}
    for module, lr in want.items():
        for p in module.parameters():
            assert owner[id(p)]["lr"] == pytest.approx(lr)
    assert owner[id(net.scale)]["lr"] == pytest.approx(0.1 * 0.125)   # unlisted: counted with the first stage
    assert owner[id(net.s1.weight)]["stage"] == 1 and owner[id(net.s1.bias)]["weight_decay"] == 0.0
    assert owner[id(net.s1.weight)]["weight_decay"] == 1e-4
    # the LR finder / sweeps move every group together: the ratios stay
    set_base_lr(opt, 2.0)
    assert owner[id(net.s0.weight)]["lr"] == pytest.approx(2.0 * 0.1 * 0.125)
    # a scheduler scales every group by one factor
    sched = build_scheduler(FinetuneConfig(schedule="cosine", epochs=2, warmup_epochs=0.0), opt, steps_per_epoch=2)
    opt.step()
    sched.step_batch()
    ratio = owner[id(net.s0.weight)]["lr"] / owner[id(net.fc.weight)]["lr"]
    assert ratio == pytest.approx(0.1 * 0.125)


def test_layer_decay_skips_frozen_stages_and_off_is_one_backbone_lr():
    from finetune.core.surgery import apply_freeze

    net = Staged()
    apply_freeze(net, STAGED, "fc", 2)                 # s0 (and the unlisted scale) frozen
    groups = param_groups(net, "fc", 1.0, 0.1, 0.0, STAGED, layer_decay=0.5)
    assert sorted({g.get("stage") for g in groups if g["name"] == "backbone"}) == [1, 2]
    assert id(net.s0.weight) not in by_id(groups) and id(net.scale) not in by_id(groups)
    off = param_groups(net, "fc", 1.0, 0.1, 0.0, STAGED, layer_decay=1.0)
    assert all(g["lr"] == pytest.approx(0.1) for g in off if g["name"] == "backbone")
    assert all("stage" not in g for g in off)
    with pytest.raises(ConfigError, match="stage list"):
        param_groups(net, "fc", 1.0, 0.1, 0.0, None, layer_decay=0.5)


def test_a_cosine_schedule_refuses_unresolved_auto_epochs():
    """epochs=0 (auto) is resolved by build_setup; a cosine schedule built from it directly says so."""
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
    with pytest.raises(ConfigError, match="epochs=0 \\(auto\\) is resolved by"):
        build_scheduler(FinetuneConfig(schedule="cosine"), opt, 4)


def test_a_schedule_refuses_an_unresolved_auto_warmup():
    """warmup_epochs=-1 (auto) is resolved by build_setup; a schedule built from it directly says so."""
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
    with pytest.raises(ConfigError, match="warm-up is still auto"):
        build_scheduler(FinetuneConfig(schedule="none"), opt, 4)


def test_lbfgs_iterations_shrink_with_the_size_of_the_solve_and_never_below_the_floor():
    """Every solve our measured jobs make (the 63-image job, medium digits, MNIST at 300 a class, the
    handedness test of 10 classes) keeps its max_iter; beyond LBFGS_FULL_SIZE (rows x parameters) the
    iterations fall in proportion, down to LBFGS_MIN_ITER: 20,000 images x 2 views of 100 classes gets the floor."""
    from finetune.core.optim import LBFGS_FULL_SIZE, LBFGS_MIN_ITER, lbfgs_iterations

    for rows, params in [(90, 1281 * 9), (2000, 1281 * 10), (6000, 1281 * 10), (4000, 1281 * 20)]:
        assert lbfgs_iterations(500, rows, params) == 500
    assert lbfgs_iterations(500, 1, LBFGS_FULL_SIZE) == 500
    assert lbfgs_iterations(500, 2, LBFGS_FULL_SIZE) == 250
    assert lbfgs_iterations(500, 40_000, 1281 * 100) == LBFGS_MIN_ITER
    assert lbfgs_iterations(20, 40_000, 1281 * 100) == 20          # a caller's smaller max_iter stands
    sizes = [10 ** k for k in range(3, 14)]
    its = [lbfgs_iterations(500, s, 1) for s in sizes]
    assert its == sorted(its, reverse=True) and min(its) == LBFGS_MIN_ITER


def test_lbfgs_minimise_stops_at_the_iterations_its_size_allows(monkeypatch):
    """The cap is in the one solver (head solve, handedness test, doctor's probe alike): a problem made 'large'
    by a smaller LBFGS_FULL_SIZE evaluates its objective a bounded number of times and stops short of the optimum
    that the same problem reaches uncapped (where its tolerances, not the cap, end it)."""
    from finetune.core import optim
    from finetune.core.optim import lbfgs_minimise

    g = torch.Generator().manual_seed(0)
    x = torch.randn(200, 8, generator=g) * torch.logspace(-2, 1, 8)       # ill-conditioned, as features are
    y = torch.randint(0, 3, (200,), generator=g)

    def solve() -> tuple[torch.Tensor, int]:
        w = torch.zeros(8, 3, requires_grad=True)
        calls = [0]

        def objective() -> torch.Tensor:
            calls[0] += 1
            return torch.nn.functional.cross_entropy(x @ w, y) + 1e-6 * w.pow(2).sum()

        lbfgs_minimise([w], objective, 500, rows=200)
        return w.detach(), calls[0]

    full, calls = solve()
    assert calls > 10                       # it iterated, converging (tolerances, not the cap, ended it)
    monkeypatch.setattr(optim, "LBFGS_MIN_ITER", 3)
    monkeypatch.setattr(optim, "LBFGS_FULL_SIZE", 1)       # 200 x 24: the floor, 3 iterations
    capped, capped_calls = solve()
    assert capped_calls <= 3 * 5 // 4 + 1 < calls           # LBFGS: max_eval = max_iter x 1.25
    assert not torch.equal(capped, full)
