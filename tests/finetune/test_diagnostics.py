"""Diagnostics: curves, advice, TensorBoard, LR range test, overfit check."""
from __future__ import annotations

import math
import sys
import types

import pytest

from finetune.core.monitor import (ADVICE_THRESHOLDS, AdviceThresholds, TensorBoardLogger, advise, data_advice, waited,
                                   write_curves)
from finetune.core.errors import ConfigError


def _rows(train_loss, val_loss, train_acc, val_acc, lr=1e-3, phases=None):
    phases = phases or ["finetune"] * len(train_loss)
    return [{"epoch": i + 1, "phase": phases[i], "train_loss": tl, "val_loss": vl, "train_acc": ta,
             "val_acc": va, "lr": lr * (0.8 ** i), "seconds": 1.0, "images_per_s": 100.0}
            for i, (tl, vl, ta, va) in enumerate(zip(train_loss, val_loss, train_acc, val_acc))]


HEALTHY = _rows([1.0, 0.7, 0.5, 0.4, 0.35], [1.0, 0.75, 0.58, 0.5, 0.47],
                [0.5, 0.7, 0.82, 0.88, 0.9], [0.5, 0.68, 0.78, 0.83, 0.85])


# ---- advice ------------------------------------------------------------------------------------------
def test_an_epoch_that_waited_for_data_says_so_and_what_to_change():
    """metrics.csv's data_wait: the epoch's line names it from 10%, the advice from 30% in an epoch of 20 s or
    more on an accelerator (per --decode); a row without it (a solved head, a run resumed from before it
    existed) says nothing."""
    assert waited({"data_wait": 0.38}) == " (38% of it spent getting data)"
    assert waited({"data_wait": 0.05}) == waited({}) == waited({"data_wait": float("nan")}) == ""
    assert data_advice({"data_wait": 0.2, "seconds": 60}, "cuda", "workers") == data_advice({}, "cuda", "workers") == []
    assert data_advice({"data_wait": 0.45, "seconds": 5}, "cuda", "workers") == []    # a short epoch: moot
    [gpu] = data_advice({"data_wait": 0.45, "seconds": 60}, "cuda", "workers")
    assert gpu.startswith("the training loop waited for data 45% of the epoch") and "--decode device" in gpu
    [device] = data_advice({"data_wait": 0.45, "seconds": 60}, "cuda", "device")    # one thread decodes there
    assert "--decode workers" in device
    [mps] = data_advice({"data_wait": 0.45, "seconds": 60}, "mps", "workers")     # no nvJPEG there
    assert "--decode" not in mps and "--workers" in mps
    assert data_advice({"data_wait": 0.45, "seconds": 60}, "cpu", "workers") == []   # the cores load or train


def test_healthy_run_gets_no_advice():
    assert advise(HEALTHY) == []


def test_short_history_is_silent_unless_exploding():
    assert advise(HEALTHY[:2]) == []
    assert advise([]) == []
    flat = _rows([1.1, 1.1], [1.1, 1.1], [0.3, 0.3], [0.3, 0.3])
    assert advise(flat) == []
    exploding = _rows([1.0, 9.0], [1.0, 9.5], [0.4, 0.3], [0.4, 0.3])
    (msg,) = advise(exploding)
    assert "exploding" in msg and "lower it" in msg


def test_a_tiny_loss_rising_below_its_start_is_not_exploding():
    """8e-07 -> 0.388 (a ratio of 5e5) with val acc 1.0: a perfectly fitted head, then an ordinary epoch.
    Exploding means far above the best *and* above where training started."""
    rows = _rows([1.2, 8.05e-07, 0.388], [0.9, 0.01, 0.02], [0.6, 1.0, 1.0], [0.7, 1.0, 1.0])
    assert not any("exploding" in m for m in advise(rows))
    rows = _rows([1.2, 0.3, 4.0], [0.9, 0.3, 4.5], [0.6, 0.9, 0.2], [0.7, 0.9, 0.2])
    assert any("exploding" in m for m in advise(rows))


def test_a_fitted_model_s_tiny_losses_are_neither_exploding_nor_overfitting():
    """A run at 100% validation accuracy whose losses wobble around 1e-3 (seen on real crops: train
    0.000111 -> 0.00135, val 0.000535 -> 0.00361) gets no advice: those are a fitted model's noise."""
    rows = _rows([0.0009, 0.0003, 0.000111, 0.00135], [0.0009, 0.000535, 0.002, 0.00361],
                 [1.0, 1.0, 1.0, 1.0], [1.0, 1.0, 1.0, 1.0])
    assert advise(rows) == []
    bigger = _rows([0.09, 0.03, 0.0111, 0.135], [0.09, 0.0535, 0.2, 0.361], [1.0, 1.0, 1.0, 0.97],
                   [1.0, 1.0, 0.97, 0.95])          # the same wobble 100x larger: a real explosion
    assert any("exploding" in m for m in advise(bigger))


def test_exploding_compares_epochs_of_one_phase():
    """The head phase on cached (un-augmented) features ends far below the finetune phase's loss on
    augmented or mixed images: that jump is no explosion; a rise inside the finetune phase is."""
    phases = ["head", "finetune", "finetune"]
    rows = _rows([0.05, 0.9, 0.8], [0.3, 0.35, 0.33], [1.0, 0.7, 0.75], [0.9, 0.9, 0.9], phases=phases)
    assert not any("exploding" in m for m in advise(rows))
    rows = _rows([0.05, 0.9, 4.0], [0.3, 0.35, 4.5], [1.0, 0.7, 0.2], [0.9, 0.9, 0.2], phases=phases)
    assert any("exploding" in m for m in advise(rows))


def test_trend_rules_judge_the_last_phase_alone():
    """Issue 26: a solved head (train loss 0.011 on clean cached features), then finetune epochs on
    augmented images falling 0.94 -> 0.40: no "not going down" advice. A finetune phase that is flat
    over 3 epochs still gets it."""
    phases = ["head", "finetune", "finetune"]
    rows = _rows([0.011, 0.94, 0.40], [0.22, 0.45, 0.20], [1.0, 0.75, 0.88], [0.93, 0.85, 0.93], phases=phases)
    assert advise(rows) == []
    flat = _rows([0.011, 0.9, 0.9, 0.9], [0.22, 0.9, 0.9, 0.9], [1.0, 0.6, 0.6, 0.6], [0.93, 0.6, 0.6, 0.6],
                 phases=["head"] + ["finetune"] * 3)
    assert any("not going down" in m for m in advise(flat))


def test_nan_loss_is_exploding():
    rows = _rows([1.0, float("nan")], [1.0, float("nan")], [0.4, 0.3], [0.4, 0.3])
    (msg,) = advise(rows)
    assert "NaN" in msg and "lower it" in msg


def test_flat_training_loss_asks_for_a_higher_lr():
    rows = _rows([1.10, 1.09, 1.10, 1.09, 1.08], [1.1, 1.1, 1.1, 1.1, 1.1],
                 [0.34, 0.35, 0.33, 0.35, 0.36], [0.33, 0.33, 0.34, 0.33, 0.34])
    advice = advise(rows)
    assert len(advice) == 1 and "not going down" in advice[0] and "higher learning rate" in advice[0]


def test_growing_gap_is_overfitting():
    rows = _rows([1.0, 0.6, 0.3, 0.15, 0.05], [1.0, 0.8, 0.85, 0.95, 1.1],
                 [0.5, 0.75, 0.9, 0.97, 1.0], [0.5, 0.65, 0.66, 0.65, 0.64])
    advice = advise(rows)
    assert len(advice) == 1 and advice[0].startswith("overfitting")
    for hint in ("more augmentation", "fewer unfrozen stages", "more weight decay", "early stopping"):
        assert hint in advice[0]


def test_val_loss_rising_alone_is_overfitting():
    rows = _rows([1.0, 0.8, 0.6, 0.4], [0.9, 0.8, 0.95, 1.1], [0.5, 0.6, 0.7, 0.8], [0.55, 0.6, 0.62, 0.63])
    assert any(a.startswith("overfitting") for a in advise(rows))


def test_no_gap_low_accuracy_is_underfitting():
    rows = _rows([1.0, 0.9, 0.85, 0.83, 0.82], [1.0, 0.92, 0.87, 0.85, 0.84],
                 [0.35, 0.42, 0.45, 0.46, 0.46], [0.34, 0.41, 0.44, 0.45, 0.45])
    advice = advise(rows)
    assert len(advice) == 1 and "too small or too frozen" in advice[0] and "unfreeze more stages" in advice[0]


def test_thresholds_are_configurable_and_percentages_tolerated():
    rows = _rows([1.0, 0.9, 0.85, 0.83, 0.82], [1.0, 0.92, 0.87, 0.85, 0.84],
                 [35, 42, 45, 46, 46], [34, 41, 44, 45, 45])
    assert any("too frozen" in a for a in advise(rows))
    assert advise(rows, AdviceThresholds(underfit_acc=0.3)) == []
    assert ADVICE_THRESHOLDS.min_epochs == 3


# ---- curves ------------------------------------------------------------------------------------------
def _png_ok(path):
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000


def test_write_curves_full_history_with_phases(tmp_path):
    rows = _rows([1.2, 0.9, 0.8, 0.6, 0.5, 0.45], [1.1, 0.95, 0.85, 0.7, 0.72, 0.75],
                 [0.4, 0.6, 0.7, 0.8, 0.85, 0.9], [0.45, 0.6, 0.66, 0.75, 0.74, 0.74],
                 phases=["head", "head", "finetune", "finetune", "finetune", "finetune"])
    out = tmp_path / "run" / "curves.png"
    write_curves(rows, out, best_epoch=4)
    _png_ok(out)
    assert [p.name for p in out.parent.iterdir()] == ["curves.png"]  # no temp file left behind


def test_curves_accuracy_axis_reads_in_percent_and_the_loss_axis_as_it_was(tmp_path, monkeypatch):
    """Review (session 24): every printed accuracy is percent (accuracy_text, the panel's title too) but the
    accuracy panel's axis read 0.0 ... 1.0; it now reads 0% ... 100%, the data (metrics.csv) still fractions."""
    import finetune.core.monitor as monitor
    from matplotlib.ticker import PercentFormatter

    figs = []
    monkeypatch.setattr(monitor, "save_png", lambda fig, path: figs.append(fig))
    write_curves(HEALTHY, tmp_path / "curves.png")
    ax_loss, ax_acc, ax_lr = figs[0].axes
    acc = ax_acc.yaxis.get_major_formatter()
    assert isinstance(acc, PercentFormatter) and acc(0.5) == "50%" and acc(1.0) == "100%"
    assert not isinstance(ax_loss.yaxis.get_major_formatter(), PercentFormatter)
    assert "%" not in ax_loss.yaxis.get_major_formatter()(0.5)


def test_write_curves_is_robust(tmp_path):
    # (its speed, ~0.15 s a plot, is a benchmark figure, not a unit-test threshold: shared CI machines)
    import warnings

    out = tmp_path / "curves.png"
    one_lr = [{**HEALTHY[0], "lr": float("nan")}, {**HEALTHY[1], "lr": 9.999999999999999e-05}]
    with warnings.catch_warnings():     # a head epoch, then one at a warm-up's first LR: a singular LR axis warned
        warnings.simplefilter("error")
        write_curves(HEALTHY[:1], out, best_epoch=1)
        write_curves(one_lr, out, best_epoch=2)
    _png_ok(out)
    nan_rows = _rows([1.0, float("nan"), float("inf")], [None, 1.0, float("nan")], [0.5, None, 0.6],
                     [0.4, 0.5, float("nan")])
    write_curves(nan_rows, out)
    _png_ok(out)
    write_curves([{"epoch": 1, "train_loss": 1.0}], out)  # missing columns
    _png_ok(out)


# ---- tensorboard -------------------------------------------------------------------------------------
def test_tensorboard_missing_gives_install_hint(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # import -> ImportError
    with pytest.raises(ConfigError, match=r"pip install zoo-finetune\[tensorboard\]"):
        TensorBoardLogger(tmp_path)


def test_tensorboard_logs_scalars(monkeypatch, tmp_path):
    calls = []

    class FakeWriter:
        def __init__(self, log_dir):
            calls.append(("dir", log_dir))
        def add_scalar(self, tag, value, step):
            calls.append((tag, value, step))
        def flush(self):
            pass
        def close(self):
            calls.append(("closed",))

    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", types.SimpleNamespace(SummaryWriter=FakeWriter))
    with TensorBoardLogger(tmp_path) as tb:
        tb.log_epoch({**HEALTHY[1], "val_loss": float("nan")})
    assert ("dir", str(tmp_path / "tensorboard")) in calls
    assert ("loss/train", 0.7, 2) in calls and ("acc/val", 0.68, 2) in calls
    assert not any(c[0] == "loss/val" for c in calls)  # NaN skipped
    assert calls[-1] == ("closed",)


# ---- LR range test: pure parts -----------------------------------------------------------------------
from finetune.tools.diagnostics import lr_find, lr_schedule, overfit_check, suggest_steepest, suggest_valley
from finetune.tools.diagnostics.lrfind import POLICY_REACH
from finetune.core.seeding import preserved_rng


def test_lr_schedule_is_log_spaced_and_inclusive():
    lrs = lr_schedule(1e-6, 1.0, 7)
    assert lrs[0] == pytest.approx(1e-6) and lrs[-1] == pytest.approx(1.0)
    assert all(b / a == pytest.approx(10.0) for a, b in zip(lrs, lrs[1:]))


def test_suggestions_land_on_the_descent():
    # flat, then a steep fall between 1e-4 and 1e-2, then divergence
    lrs = lr_schedule(1e-7, 10.0, 80)
    loss = [2.0 if lr < 1e-4 else (2.0 - 0.8 * math.log10(lr / 1e-4) if lr < 1e-2 else 0.4 + 5 * (lr - 1e-2))
            for lr in lrs]
    v, s = suggest_valley(lrs, loss), suggest_steepest(lrs, loss)
    assert 1e-4 <= lrs[v] <= 1e-2 and 1e-4 <= lrs[s] <= 1e-2
    assert suggest_valley([1e-3], [1.0]) is None and suggest_steepest([1e-3], [1.0]) is None


# ---- LR range test and overfit check on a tiny model ------------------------------------------------
STAGES = (("conv1", "bn1"), ("layer1",), ("layer2",), ("layer3",), ("layer4",))
DATA_CONFIG = {"input_size": (3, 32, 32), "interpolation": "bilinear", "crop_pct": 1.0, "crop_mode": "center",
               "mean": (0.5, 0.5, 0.5), "std": (0.25, 0.25, 0.25)}


@pytest.fixture(scope="module")
def tiny_train_set(tmp_path_factory):
    from tests.conftest import make_image_folder
    from finetune.data import scan_folder

    root = make_image_folder(tmp_path_factory.mktemp("diag") / "data", per_class=8)
    return scan_folder(root, val_split=0.25, seed=0).train


def _tiny_model():
    import timm
    import torch

    torch.manual_seed(0)
    return timm.create_model("test_resnet", num_classes=10)


def _config(**kw):
    from finetune.core.config import FinetuneConfig

    base = dict(batch_size=8, workers=0, device="cpu", freeze="none", lr=1e-3)
    return FinetuneConfig(**{**base, **kw})


def test_lr_find_suggests_inside_range_and_restores_everything(tiny_train_set, tmp_path):
    import torch

    model = _tiny_model()
    model.train()
    model.layer1.requires_grad_(False)  # the caller's own flags must survive too
    before = {k: v.clone() for k, v in model.state_dict().items()}
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    modes = {n: m.training for n, m in model.named_modules()}
    with preserved_rng():
        expected_draw = torch.rand(3)
    res = lr_find(model, STAGES, DATA_CONFIG, tiny_train_set, _config(), head="fc", start_lr=1e-6, end_lr=1.0,
                  steps=40, out_png=tmp_path / "lr.png", out_csv=tmp_path / "lr.csv", method="valley")
    assert torch.equal(torch.rand(3), expected_draw)  # torch RNG restored
    after = model.state_dict()
    assert list(after) == list(before)
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    assert {n: m.training for n, m in model.named_modules()} == modes
    assert model.fc.out_features == 10  # the head replacement happened on a copy

    assert res.method == "valley" and res.suggestion in res.lrs
    assert 1e-6 <= res.suggestion <= 1.0
    assert res.valley is not None and res.steepest is not None
    assert len(res.lrs) == len(res.losses) == len(res.smoothed) <= 40
    # the smoothed loss is a bias-corrected EMA (beta 0.98): no pull towards 0 at the start
    l0, l1 = res.losses[:2]
    assert res.smoothed[:2] == pytest.approx([l0, (0.98 * 0.02 * l0 + 0.02 * l1) / (1 - 0.98 ** 2)], rel=1e-9)
    assert res.lrs == sorted(res.lrs)
    assert "valley rule" in res.describe()
    _png_ok(tmp_path / "lr.png")
    lines = (tmp_path / "lr.csv").read_text().splitlines()
    assert lines[0] == "step,lr,loss,smoothed" and len(lines) == len(res.lrs) + 1


def test_range_test_reads_no_divergence_before_its_loss_has_settled():
    """From a trained head (``--lr auto`` on a run that trains layers) the first batches' losses are small and
    noisy: on the tiny test folder 0.0066 then 0.36 at lr 1.8e-7, which the rule "smoothed loss above 4x its best"
    read as a divergence at step 2. The rule is judged once the EMA has settled (the first tenth of the steps, which
    the suggestions leave out too); a real divergence later still stops the test."""
    import torch

    from finetune.tools.diagnostics.lrfind import _RangeTest

    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    test = _RangeTest(opt, lr_schedule(1e-7, 1.0, 100), 0.98, 4.0, None)
    noisy = [0.0066, 0.36, 0.024, 0.26, 0.018, 0.004, 0.037, 0.36, 0.05, 0.03] + [0.1] * 20
    assert not any(test(i, torch.tensor(v)) for i, v in enumerate(noisy))
    assert len(test.lrs) == 30 and not test.stopped
    while not test(len(test.lrs), torch.tensor(5.0)):
        pass
    assert test.stopped and len(test.lrs) < 100


def test_from_a_trained_head_the_suggestion_is_the_policy_lr_unless_the_loss_diverged_far_below_it():
    """Sessions 37-39, medium digits and MNIST: from the run's trained head the curve is flat and noisy, then rises;
    the valley rule read a slow drift across the flat part (8.1e-5 on digits split 1: test 0.964), the edge rule
    (1/10 of where the test stopped on a divergence) 0.5e-3 to 1.9e-3 (0.989 / 0.952 against the policy's 1e-2: 0.995
    / 0.977), the test having no warm-up or weight average. "auto" takes the policy rule there: the run's policy LR,
    lowered to POLICY_REACH x where the loss diverged when that is below it; from a new head (a descent to read) it
    stays the valley rule; "edge" with no divergence has nothing to read and the valley rule answers, said as such."""
    from finetune.tools.diagnostics.lrfind import EDGE_MARGIN, POLICY_REACH, _suggest, suggest_edge

    lrs = lr_schedule(1e-7, 1e-1, 61)          # 10 steps a decade
    flat = [0.2 - 0.0005 * i for i in range(50)]       # a slow drift down: the valley rule's longest descent
    smoothed = flat + [0.2 + 0.1 * k for k in range(1, 12)]
    stop = 55        # the test stopped here, at 3.2e-2: the loss diverged
    lrs, smoothed = lrs[:stop + 1], smoothed[:stop + 1]
    e = suggest_edge(lrs, stopped=True)
    assert lrs[e] <= lrs[-1] / EDGE_MARGIN < lrs[e + 1]
    assert suggest_edge(lrs, stopped=False) is None
    chosen, used, valley, _steepest, edge = _suggest(lrs, smoothed, "auto", stopped=True, trained=True, policy=1e-2)
    assert (chosen, used, edge) == (1e-2, "policy", lrs[e]) and valley < edge / 10
    # diverged below half the policy's LR: lowered to twice where it diverged (exactly: no swept LR in between)
    low, low_smoothed = lrs[:31], smoothed[:31]          # stopped at 1e-4
    assert _suggest(low, low_smoothed, "auto", stopped=True, trained=True, policy=1e-2)[:2] == \
        (POLICY_REACH * low[-1], "policy")
    assert _suggest(lrs, smoothed, "auto", stopped=False, trained=True, policy=1e-2)[:2] == (1e-2, "policy")
    assert _suggest(lrs, smoothed, "edge", stopped=True, trained=True, policy=1e-2)[:2] == (lrs[e], "edge")
    assert _suggest(lrs, smoothed, "auto", stopped=True, trained=False, policy=1e-3)[:2] == (valley, "valley")
    assert _suggest(lrs, smoothed, "edge", stopped=False, trained=True)[:2] == (valley, "valley")


def test_a_rule_asked_for_by_name_that_reads_nothing_says_why_another_answered():
    """Session 39: `zoo lr-find --freeze head --method policy` printed "(valley rule; ...)" and nothing of the policy
    rule asked for: a head-only run finetunes no layers from a solved head, so it has no policy LR. Now the line says
    which rule was asked, that it read nothing, and why; as does the edge rule where the loss did not diverge."""
    from finetune.tools.diagnostics.lrfind import LRFindResult

    lrs = lr_schedule(1e-7, 1e-1, 61)
    for asked, policy, why in (("policy", None, "trains no layers from one"), ("edge", 1e-2, "did not diverge")):
        line = LRFindResult(lrs, [0.2] * 61, [0.2] * 61, lrs[30], "valley", lrs[30], None, False, policy=policy,
                            asked=asked).describe()
        assert line.startswith(f"suggested lr {lrs[30]:.2e} (valley rule, the {asked} rule reading nothing here: ")
        assert why in line, line
    answered = LRFindResult(lrs, [0.2] * 61, [0.2] * 61, 1e-2, "policy", None, None, False, policy=1e-2,
                            asked="policy").describe()
    assert "reading nothing" not in answered and "not lowered: the loss did not diverge" in answered


def test_lr_find_stops_early_on_divergence_and_steepest_rule(tiny_train_set):
    res = lr_find(_tiny_model(), STAGES, DATA_CONFIG, tiny_train_set, _config(optimizer="sgd"), head="fc",
                  start_lr=1e-3, end_lr=1e4, steps=30, method="steepest", diverge_factor=2)
    assert res.stopped_early and len(res.lrs) < 30
    assert res.method == "steepest" and res.lrs[0] <= res.suggestion <= res.lrs[-1]
    assert "stopped early" in res.describe()


def test_lr_find_past_what_float32_holds_stops_as_a_divergence(tiny_train_set):
    """QA (helper-64): `zoo lr-find --end-lr 1e300` ended with `the optimizer step overflowed (learning rate up
    to 5.62e+69 ...): lower the learning rate, --backbone-lr-mult or --weight-decay`, exit 1, its folder without
    a result: the step refused an LR the parameters' float type cannot hold. That is where the range test has
    diverged: it stops there (stopped early) and reads the curve of the steps before, as at a NaN loss."""
    res = lr_find(_tiny_model(), STAGES, DATA_CONFIG, tiny_train_set, _config(), head="fc", start_lr=1e-7,
                  end_lr=1e300, steps=5)      # the second step at 5.6e69
    assert res.stopped_early and 1 <= len(res.lrs) < 5 and max(res.lrs) < 3.4e38, res.lrs
    if res.method == "policy":     # from a trained head: the policy's LR, at most 2x where the loss diverged
        assert res.suggestion == min(res.policy, POLICY_REACH * res.lrs[-1]), res.describe()
    else:
        assert res.lrs[0] <= res.suggestion <= res.lrs[-1] or "guess" in res.describe()


def test_lr_find_says_nothing_of_the_runs_auto_epochs(tiny_train_set):
    """QA: under `zoo finetune --lr auto` with auto epochs the line "epochs: at most N (auto for ...)" came
    twice: from the range test's setup, then from the run's. The range test trains steps, not epochs."""
    said: list[str] = []
    lr_find(_tiny_model(), STAGES, DATA_CONFIG, tiny_train_set, _config(epochs=0), head="fc", steps=5,
            log=said.append)
    assert said and not any(m.startswith("epochs:") for m in said), said


def test_lr_find_says_where_it_is_after_its_first_step(tiny_train_set):
    """The judge's walk-through (helper-146): `zoo lr-find` on 3,000 digits at 224 px on a 2-core CPU printed its
    first progress line after 10 of 100 steps, 16 s after "probing the network": the first step has its line now."""
    said: list[str] = []
    lr_find(_tiny_model(), STAGES, DATA_CONFIG, tiny_train_set, _config(), head="fc", start_lr=1e-6, end_lr=1e-2,
            steps=20, log=said.append)
    progress = [m for m in said if m.startswith("lr-find ") and "/20:" in m]
    assert progress and progress[0].startswith("lr-find 1/20: lr "), said


def test_lr_find_rejects_bad_ranges(tiny_train_set):
    with pytest.raises(ConfigError, match="start_lr < end_lr"):
        lr_find(_tiny_model(), STAGES, DATA_CONFIG, tiny_train_set, _config(), head="fc", start_lr=1.0, end_lr=1e-3)
    with pytest.raises(ConfigError, match="auto, valley, steepest, edge or policy"):
        lr_find(_tiny_model(), STAGES, DATA_CONFIG, tiny_train_set, _config(), head="fc", method="magic")


def test_overfit_check_passes_on_learnable_batches(tiny_train_set):
    import torch

    model = _tiny_model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    lines = []
    res = overfit_check(model, STAGES, DATA_CONFIG, tiny_train_set, _config(lr=1e-2, mlp_dropout=0.5),
                        head="fc", batches=2, max_steps=200, log=lines.append)
    assert res.passed and res.final_acc == 1.0 and res.final_loss <= 0.05
    assert res.verdict == f"pipeline can learn: 2 batches overfit to 100.00% in {res.steps} steps"
    assert 0 < res.steps <= 200 and lines and res.losses[-1] == res.final_loss
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_overfit_check_under_decode_device(tiny_train_set, monkeypatch):
    """QA: --overfit-batches with --decode device unpacked the encoded files' batches (bytes, labels, indices)
    as (images, labels): a ValueError traceback. The fixed batches are the workers path's evaluation view,
    on CUDA uint8 normalised on the device (its device steps forced here on the CPU)."""
    import torch

    import finetune.engine.setup as engine_setup
    from finetune.data import DeviceAugment, DeviceNormalize

    normalised = []

    class Counting(DeviceNormalize):
        def __call__(self, x, *a, **k):
            normalised.append(x.dtype)
            return super().__call__(x, *a, **k)

    def cuda_steps(config, data_config, device):     # device_steps on CUDA (gpu_normalize on)
        if config.decode == "device":
            return "uint8", None, None
        return "uint8", Counting.from_data_config(data_config), DeviceAugment.from_config(data_config, config)

    for steps in (None, cuda_steps):
        if steps is not None:
            monkeypatch.setattr(engine_setup, "device_steps", steps)
        res = overfit_check(_tiny_model(), STAGES, DATA_CONFIG, tiny_train_set, _config(lr=1e-2, decode="device"),
                            head="fc", batches=2, max_steps=4)
        assert res.steps == 4 and math.isfinite(res.final_loss)
    assert normalised == [torch.uint8] * 2      # each fixed batch once, from uint8


def test_overfit_check_fails_on_random_labels(tiny_train_set):
    res = overfit_check(_tiny_model(), STAGES, DATA_CONFIG, tiny_train_set, _config(lr=1e-2), head="fc",
                        batches=2, max_steps=60, shuffle_labels=True)
    assert not res.passed and res.steps == 60
    assert res.verdict.startswith("cannot even overfit 2 batches (acc ")
    assert res.verdict.endswith("check labels, LR, frozen layers")


def test_overfit_check_fails_when_everything_is_frozen(tiny_train_set):
    res = overfit_check(_tiny_model(), STAGES, DATA_CONFIG, tiny_train_set, _config(lr=1e-2), head="fc",
                        batches=2, max_steps=60, freeze_all=True)
    assert not res.passed and res.steps == 0
    assert res.verdict.startswith("cannot even overfit 2 batches")
    assert "check labels, LR, frozen layers" in res.verdict and "nothing is trainable" in res.verdict


@pytest.mark.parametrize("acc, loss, passed", [(1.0, 0.381, True), (0.5, 0.9, False), (1.0, 1.2, False)])
def test_overfit_check_counts_the_batches_there_are_and_passes_at_full_accuracy(tiny_train_set, monkeypatch, acc,
                                                                               loss, passed):
    """QA: --overfit-batches 2 on 20 images at batch size 32 said "training on 2 fixed batch(es)" (one exists),
    reached acc 100% and then failed: "cannot even overfit 1 batch (acc 100%, loss 0.381): check labels". Every
    image right while the loss falls is a pass (the loss may still be above target_loss when max_steps ends); a
    model that stays wrong still fails. The passes are stubbed: their numbers are given, not landed on."""
    import finetune.tools.diagnostics.overfit as overfit_module

    passes = iter([{"acc": 0.5, "loss": 1.2}] + [{"acc": acc, "loss": loss}] * 10)
    monkeypatch.setattr(overfit_module, "train_one_epoch", lambda *a, **k: next(passes))
    n = len(tiny_train_set.items)
    assert n < 32 and overfit_module.fixed_batch_count(n, 32, 2) == 1 and overfit_module.fixed_batch_count(n, 8, 2) == 2
    res = overfit_check(_tiny_model(), STAGES, DATA_CONFIG, tiny_train_set, _config(batch_size=32), head="fc",
                        batches=2, max_steps=5)
    assert res.passed is passed and res.steps == 5
    if passed:
        assert res.verdict == ("pipeline can learn: 1 batch overfit to 100.00% accuracy in 5 steps (loss 1.2 -> 0.381, "
                               "still above 0.05: more steps or a higher LR take it lower)")
    else:       # wrong, or right by chance while the loss stayed put
        assert res.verdict == (f"cannot even overfit 1 batch (acc {acc * 100:.2f}%, loss {loss:.3g}): check labels, LR, "
                               "frozen layers")


def test_dropout_is_disabled_for_the_check():
    from torch import nn
    from finetune.tools.diagnostics import disable_dropout

    m = nn.Sequential(nn.Linear(4, 4), nn.Dropout(0.5), nn.Linear(4, 2))
    m.drop_rate = 0.3
    assert disable_dropout(m) == 2 and m[1].p == 0.0 and m.drop_rate == 0.0


def test_head_only_overfitting_does_not_suggest_freezing_more():
    rows = _rows([1.0, 0.6, 0.3, 0.15, 0.05], [1.0, 0.8, 0.85, 0.95, 1.1],
                 [0.5, 0.75, 0.9, 0.97, 1.0], [0.5, 0.65, 0.66, 0.65, 0.64])
    for row in rows:
        row["phase"] = "head"
    (msg,) = advise(rows)
    assert msg.startswith("overfitting") and "more weight decay" in msg
    assert "fewer unfrozen stages" not in msg          # nothing below the head is unfrozen


def test_one_epoch_blip_of_val_loss_is_not_overfitting():
    """The last epoch of a cosine run 10.6% above the best val loss (0.0414 -> 0.0458 on 300 images: one
    image's confidence) is noise; the same rise held for two epochs is a trend."""
    blip = _rows([0.3, 0.1, 0.05, 0.03, 0.02], [0.12, 0.07, 0.05, 0.0414, 0.0458],
                 [0.9, 0.97, 0.99, 1.0, 1.0], [0.95, 0.97, 0.98, 0.98, 0.98])
    assert not any(a.startswith("overfitting") for a in advise(blip))
    held = _rows([0.3, 0.1, 0.05, 0.03, 0.02, 0.015], [0.12, 0.07, 0.05, 0.0414, 0.0458, 0.047],
                 [0.9, 0.97, 0.99, 1.0, 1.0, 1.0], [0.95, 0.97, 0.98, 0.98, 0.98, 0.98])
    assert any(a.startswith("overfitting: val loss rising (0.0414 -> 0.047)") for a in advise(held))


def test_a_suggestion_from_too_few_points_says_it_is_a_guess():
    """QA (helper-53): --end-lr 1e30 --steps 5 diverged after 3 points and the test suggested an LR with no word
    that no rule could read the curve; the "min/10" fallback says so and what to change."""
    from finetune.tools.diagnostics import LRFindResult

    lrs, losses = [1e-7, 1e-2, 1e3], [2.0, 2.1, 9.0]
    guess = LRFindResult(lrs, losses, losses, 1e-8, "min/10", None, None, True).describe()
    assert guess.endswith("this is a guess (the lowest loss / 10): a narrower LR range or more steps read it "
                          "(zoo lr-find --end-lr, --steps)")
    read = LRFindResult(lrs, losses, losses, 1e-3, "valley", 1e-3, None, False).describe()
    assert "guess" not in read
