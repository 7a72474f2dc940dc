"""Grid search: value parsing, stratified folds, ranking, diverged trials, resume, best-config replay."""
from __future__ import annotations

import json
import math
import types

import pytest

from finetune.core.config import FinetuneConfig, read_config_file
from finetune.core.errors import ConfigError, DataError, DivergedError
from finetune.tools.sweep import SweepSpace, kfold_splits, parse_choices, parse_values, sweep, trial_config


# ---- parsing -----------------------------------------------------------------------------------------
def test_log_range_and_lists():
    vals = parse_values("1e-4:1e-2:5")
    assert vals == pytest.approx([1e-4, 10 ** -3.5, 1e-3, 10 ** -2.5, 1e-2]) and vals[-1] == 1e-2
    assert parse_values("1e-3") == [1e-3]
    assert parse_values("0,1e-5,1e-4", "wd", allow_zero=True) == [0.0, 1e-5, 1e-4]
    assert parse_values("1e-3,1e-3") == [1e-3]  # duplicates dropped


@pytest.mark.parametrize("spec,match", [("1e-4:1e-2", "START:END:COUNT"), ("0:1e-2:3", "positive ends"),
                                         ("1e-4:1e-2:x", "whole number"), ("abc", "not a number"),
                                         ("0,1e-3", "not allowed"), ("", "no values"),
                                         # QA: 1e11 values hung building the list, before any output
                                         ("1e-4:1e-2:0", "COUNT must be 1 to 100"),
                                         ("1e-4:1e-2:100000000000", "COUNT must be 1 to 100")])
def test_bad_value_specs(spec, match):
    with pytest.raises(ConfigError, match=match):
        parse_values(spec)


def test_choices():
    assert parse_choices("head, 1,2", "freeze") == ["head", "1", "2"]
    with pytest.raises(ConfigError, match="lion not known"):
        parse_choices("adam,lion", "optimizer", ("adam", "sgd"))


def test_space_enumerates_every_combination():
    space = SweepSpace([1e-3, 1e-2], [0.0], ["head", "1"], ["adam", "sgd"])
    trials = space.trials()
    assert len(trials) == len(space) == 8
    assert trials[0] == {"lr": 1e-3, "weight_decay": 0.0, "freeze": "head", "optimizer": "adam"}
    assert trials[1]["lr"] == 1e-2  # LR varies fastest


# ---- folds -------------------------------------------------------------------------------------------
def _set(n_per_class, classes=("a", "b", "c"), prefix="x"):
    from finetune.data import ImageSet

    return ImageSet(items=[(f"{prefix}/{c}/{i}.png", ci) for ci, c in enumerate(classes) for i in range(n_per_class)],
                    classes=list(classes))


def test_kfold_is_stratified_disjoint_and_seeded():
    train, val = _set(6), _set(2, prefix="v")
    splits = kfold_splits(train, val, 4, seed=1)
    assert len(splits) == 4
    all_items = set(train.items) | set(val.items)
    vals = [set(v.items) for _, v in splits]
    assert set().union(*vals) == all_items and sum(len(v) for v in vals) == len(all_items)
    for tr, va in splits:
        assert set(tr.items) | set(va.items) == all_items and not set(tr.items) & set(va.items)
        assert va.class_counts() == [2, 2, 2]
    assert [v.items for _, v in kfold_splits(train, val, 4, seed=1)] == [v.items for _, v in splits]
    assert [v.items for _, v in kfold_splits(train, val, 4, seed=2)] != [v.items for _, v in splits]
    with pytest.raises(DataError, match=r"fewer images than --folds 9 \(a, b, c\): use --folds 8"):
        kfold_splits(train, val, 9)
    with pytest.raises(ConfigError):
        kfold_splits(train, val, 1)


# ---- the sweep with a fake fit (fast): ranking, divergence, resume ----------------------------------
def _fake_fit(calls):
    def fit(model, stages, data_config, train, val, config, *, head, run_dir=None, feature_cache=None):
        calls.append((config.lr, config.weight_decay, config.freeze, config.optimizer))
        if config.lr >= 1.0:
            raise DivergedError("loss became NaN at epoch 1; lower the learning rate")
        acc = 1.0 - abs(math.log10(config.lr) + 3) / 10 - config.weight_decay  # best at lr=1e-3, wd=0
        row = {"epoch": 1, "val_loss": 1 - acc, "val_acc": acc}
        return types.SimpleNamespace(history=[row], best_epoch=1, metrics={"val_loss": 1 - acc, "val_acc": acc})
    return fit


STAGES = (("conv1", "bn1"), ("layer1",), ("layer2",), ("layer3",), ("layer4",))


def test_sweep_ranks_records_divergence_and_resumes(tmp_path):
    calls = []
    cfg = FinetuneConfig(epochs=2, monitor="val_acc")
    args = dict(head="fc", out_dir=tmp_path / "sw", lrs=[1e-4, 1e-3, 1.0], weight_decays=[0.0, 0.01],
                freezes=["head"], optimizers=["adam"], fit_fn=_fake_fit(calls))
    lines = []
    res = sweep(lambda: object(), STAGES, {}, _set(4), _set(2, prefix="v"), cfg, log=lines.append, **args)
    assert len(calls) == 6 and len(lines) == 6
    assert res.best.params == {"lr": 1e-3, "weight_decay": 0.0, "freeze": "head", "optimizer": "adam"}
    assert [t.status for t in res.trials] == ["ok"] * 4 + ["diverged"] * 2
    oks = [t.metric for t in res.trials if t.status == "ok"]
    assert oks == sorted(oks, reverse=True)
    assert "NaN" in res.trials[-1].message and "diverged" in lines[2]
    out = tmp_path / "sw"
    csv_lines = (out / "results.csv").read_text().splitlines()
    assert csv_lines[0].startswith("rank,lr,weight_decay,freeze,optimizer,val_acc") and len(csv_lines) == 7
    assert (out / "sweep.png").read_bytes()[:4] == b"\x89PNG"
    best = read_config_file(out / "best_config.yaml")[0]
    assert best == trial_config(cfg, res.best.params) and best.lr == 1e-3 and best.epochs == 2

    # an existing sweep is not overwritten; --resume skips the finished trials
    with pytest.raises(ConfigError, match="--resume"):
        sweep(lambda: object(), STAGES, {}, _set(4), _set(2, prefix="v"), cfg, **args)
    with open(out / "results.jsonl") as fh:
        kept = fh.readlines()[:3]
    (out / "results.jsonl").write_text("".join(kept) + '{"id": "cut mid-wri')  # an interrupted sweep
    calls.clear()
    res2 = sweep(lambda: object(), STAGES, {}, _set(4), _set(2, prefix="v"), cfg, resume=True, **args)
    assert res2.skipped == 3 and len(calls) == 3
    assert [t.id for t in res2.trials] == [t.id for t in res.trials]
    with pytest.raises(ConfigError, match="other fixed options"):
        sweep(lambda: object(), STAGES, {}, _set(4), _set(2, prefix="v"), cfg.replace(epochs=3), resume=True, **args)


def test_a_sweep_started_before_an_option_existed_resumes(tmp_path):
    """QA (session 19): sweep.json records every fixed option, and an option added since (--sync-bn) made a
    sweep begun before it differ from itself: --resume refused it. An option missing from the record had its
    default then; set otherwise now, the sweep is still another one."""
    import json

    calls = []
    cfg = FinetuneConfig(epochs=2, monitor="val_acc")
    args = dict(head="fc", out_dir=tmp_path / "sw", lrs=[1e-4, 1e-3], fit_fn=_fake_fit(calls))
    sweep(lambda: object(), STAGES, {}, _set(4), _set(2, prefix="v"), cfg, **args)
    spec_path = tmp_path / "sw" / "sweep.json"
    spec = json.loads(spec_path.read_text())
    del spec["fixed"]["config"]["sync_bn"]      # as an older zoo wrote it
    spec_path.write_text(json.dumps(spec))
    calls.clear()
    res = sweep(lambda: object(), STAGES, {}, _set(4), _set(2, prefix="v"), cfg, resume=True, **args)
    assert res.skipped == 2 and calls == []
    spec_path.write_text(json.dumps(spec))
    with pytest.raises(ConfigError, match="other fixed options"):
        sweep(lambda: object(), STAGES, {}, _set(4), _set(2, prefix="v"), cfg.replace(sync_bn=True), resume=True,
              **args)


def test_sweep_rejects_bad_grid_before_training(tmp_path):
    calls = []
    with pytest.raises(ConfigError):
        sweep(lambda: object(), STAGES, {}, _set(4), _set(2), FinetuneConfig(), head="fc", out_dir=tmp_path,
              lrs=[1e-3], freezes=["9"], fit_fn=_fake_fit(calls))
    with pytest.raises(ConfigError, match="lion"):
        sweep(lambda: object(), STAGES, {}, _set(4), _set(2), FinetuneConfig(), head="fc", out_dir=tmp_path,
              lrs=[1e-3], optimizers=["lion"], fit_fn=_fake_fit(calls))
    with pytest.raises(ConfigError, match=r"--folds 1: cross-validation needs at least 2 folds \(0: the single"):
        sweep(lambda: object(), STAGES, {}, _set(4), _set(2), FinetuneConfig(), head="fc", out_dir=tmp_path,
              lrs=[1e-3], folds=1, fit_fn=_fake_fit(calls))     # QA: it ran the single split, unsaid
    assert calls == []


# ---- the real thing: a 2x2 grid with 2 folds on a tiny model, and its YAML replayed ------------------
def test_sweep_2x2_with_folds_and_best_config_reproduces(tmp_path):
    import timm
    import torch

    from finetune.data import scan_folder
    from finetune.tools.train import fit
    from tests.conftest import make_image_folder

    report = scan_folder(make_image_folder(tmp_path / "data", per_class=8), val_split=0.25, seed=0)
    cfg = FinetuneConfig(epochs=2, batch_size=8, workers=0, device="cpu", head_epochs=0, patience=5,
                         monitor="val_loss", seed=3)
    factory = lambda: timm.create_model("test_resnet", num_classes=5)  # noqa: E731
    res = sweep(factory, STAGES, _DATA_CONFIG, report.train, report.val, cfg, head="fc",
                out_dir=tmp_path / "sweep", lrs=parse_values("1e-3:1e-2:2"), freezes=["head", "1"], folds=2)
    assert len(res.trials) == 4 and all(t.status == "ok" for t in res.trials)
    assert all(len(t.fold_metrics) == 2 and t.metric == pytest.approx(sum(t.fold_metrics) / 2) for t in res.trials)
    assert [t.metric for t in res.trials] == sorted(t.metric for t in res.trials)
    assert len({round(t.metric, 6) for t in res.trials}) > 1  # the grid points really differ
    saved = [json.loads(l) for l in (tmp_path / "sweep" / "results.jsonl").read_text().splitlines()]
    assert len(saved) == 4

    best = read_config_file(tmp_path / "sweep" / "best_config.yaml")[0]
    assert (best.lr, best.freeze) == (res.best.params["lr"], res.best.params["freeze"])
    train0, val0 = kfold_splits(report.train, report.val, 2, best.seed)[0]
    torch.manual_seed(best.seed)
    again = fit(factory(), STAGES, _DATA_CONFIG, train0, val0, best, head="fc")
    assert again.metrics["val_loss"] == pytest.approx(res.best.fold_metrics[0], rel=1e-6)


_DATA_CONFIG = {"input_size": (3, 32, 32), "interpolation": "bilinear", "crop_pct": 1.0, "crop_mode": "center",
                "mean": (0.5, 0.5, 0.5), "std": (0.25, 0.25, 0.25)}


@pytest.mark.parametrize("metric", ["val_acc", "val_loss"])
def test_sweep_plot_reads_an_accuracy_in_percent_and_a_loss_as_it_was(tmp_path, monkeypatch, metric):
    """Review (session 24): the plot's title printed the best val_acc in percent (metric_text) over an axis of
    0.6 ... 0.9; a val_acc axis now reads in percent (results.csv keeps the fractions), a val_loss axis as it was."""
    import finetune.tools.sweep.results as results
    from matplotlib.ticker import PercentFormatter
    from finetune.tools.sweep import SweepResult, TrialResult

    trials = [TrialResult(id=f"t{i}", params={"lr": lr, "weight_decay": 0.0, "freeze": "head", "optimizer": "adam"},
                          status="ok", metric=m) for i, (lr, m) in enumerate([(1e-3, 0.9), (1e-2, 0.6)])]
    figs = []
    monkeypatch.setattr(results, "save_png", lambda fig, path: figs.append(fig))
    results.write_sweep_plot(SweepResult(trials, metric, trials[0], None, tmp_path, 1), tmp_path / "sweep.png")
    (ax,) = figs[0].axes
    formatter = ax.yaxis.get_major_formatter()
    assert isinstance(formatter, PercentFormatter) == (metric == "val_acc")
    if metric == "val_acc":
        label = formatter(0.75)     # its decimals follow the axis range: 75%, 75.0% ...
        assert label.endswith("%") and float(label[:-1]) == 75


def test_each_trial_keeps_the_sweeps_own_quiet_so_a_terminal_sees_its_progress_bars(tmp_path):
    """Medium-size UX audit (helper-99): every trial ran with quiet forced on, and quiet turns off the epoch and
    feature bars; on 1,797 digits a trial of 30 s (minutes at 224 px) left the terminal silent until its line.
    A trial now keeps the sweep's --quiet: its bars show on a terminal (cleared when done; never on a pipe)."""
    seen = []

    def fit(model, stages, data_config, train, val, config, *, head, run_dir=None, feature_cache=None):
        seen.append(config.quiet)
        row = {"epoch": 1, "val_loss": 0.5, "val_acc": 0.5}
        return types.SimpleNamespace(history=[row], best_epoch=1, metrics={"val_loss": 0.5, "val_acc": 0.5})

    for quiet in (False, True):
        seen.clear()
        sweep(lambda: object(), STAGES, {}, _set(4), _set(2, prefix="v"), FinetuneConfig(epochs=1, quiet=quiet),
              head="fc", out_dir=tmp_path / f"sw-{quiet}", lrs=[1e-4, 1e-3], fit_fn=fit)
        assert seen == [quiet, quiet]


def test_kfold_refusal_names_every_small_class_and_the_folds_that_fit():
    """Many-classes audit (helper-128): a long tail of 1-2 image classes was refused one class at a time (the
    first one named, the user fixed it and met the next); now one line counts them all, names the first 5 and
    says which --folds fits, or that none does."""
    from finetune.data import ImageSet

    sizes = [1 if c % 10 == 0 else 2 if c % 10 == 1 else 4 for c in range(200)]
    classes = [f"c{c:03d}" for c in range(200)]
    train = ImageSet(items=[(f"t/{c}/{i}.png", ci) for ci, c in enumerate(classes) for i in range(sizes[ci])],
                     classes=classes)
    with pytest.raises(DataError) as err:
        kfold_splits(train, None, 3)
    assert "40 classes have fewer images than --folds 3 (c000, c001, c010, c011, c020 and 35 more)" in str(err.value)
    assert "a class of 1 image cannot be cross-validated" in str(err.value)
    no_singles = ImageSet(items=[it for it in train.items if sizes[it[1]] > 1], classes=classes)
    with pytest.raises(DataError, match=r"20 classes have fewer images than --folds 3 \(c001, c011, c021, c031, "
                                        r"c041 and 15 more\): use --folds 2"):
        kfold_splits(no_singles, None, 3)
