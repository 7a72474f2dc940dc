"""finetune.tools.train.fit: freeze modes, phases, optimizers/schedules, early stopping, NaN guard, run folder."""
from __future__ import annotations

import csv
import json
import math
import os
import signal

import pytest
import torch
from torch import nn

from finetune.core.checkpoint import BEST, LAST, load_weights
from finetune.core.config import OPTIMIZERS, SCHEDULES, FinetuneConfig
from finetune.core.errors import ConfigError, DivergedError, Interrupted
from finetune.engine import evaluate
from finetune.tools.train import fit
from tests.conftest import make_image_folder

STAGES = (("stem",), ("block",))
DATA_CONFIG = {"input_size": (3, 32, 32), "interpolation": "bilinear", "crop_pct": 1.0, "crop_mode": "center",
               "mean": (0.5, 0.5, 0.5), "std": (0.5, 0.5, 0.5)}


class Tiny(nn.Module):
    """Two stages with BatchNorm and a Linear classifier ``fc``: enough to see every freeze mode."""

    def __init__(self, num_classes: int = 10, drop_rate: float = 0.0) -> None:
        super().__init__()
        self.drop_rate = drop_rate     # timm's dropout before the classifier, functional as timm's models call it
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, stride=2, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.block = nn.Sequential(nn.Conv2d(8, 16, 3, stride=2, padding=1), nn.BatchNorm2d(16), nn.ReLU())
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(16, num_classes)
        self.poison = False      # tests flip it to make the forward pass emit NaN

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = torch.nn.functional.dropout(self.pool(self.block(self.stem(x))).flatten(1), self.drop_rate,
                                               self.training)
        out = self.fc(features)
        return out * float("nan") if self.poison else out


def tiny_model(seed: int = 0, drop_rate: float = 0.0) -> Tiny:
    torch.manual_seed(seed)
    return Tiny(drop_rate=drop_rate)


def sets(root):
    """27 train / 9 val images (3 classes), from the shared fixture's folder layout."""
    from finetune.data import scan_folder

    report = scan_folder(make_image_folder(root, per_class=12), val_split=0.25, seed=0)
    return report.train, report.val


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return sets(tmp_path_factory.mktemp("loopdata") / "data")


def cfg(**kw) -> FinetuneConfig:
    base = dict(epochs=1, batch_size=9, workers=0, lr=1e-2, fast_head=False, head_epochs=0, quiet=True,
                device="cpu")
    base.update(kw)
    return FinetuneConfig(**base)


def run(data, config, **kw):
    train, val = data
    return fit(kw.pop("model", None) or tiny_model(), STAGES, DATA_CONFIG, train, val, config, head="fc", **kw)


def snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def changed(before, after, prefix: str) -> bool:
    keys = [k for k in after if k.startswith(prefix + ".") and after[k].is_floating_point()]
    assert keys, prefix
    return any(not torch.equal(before[k], after[k]) for k in keys)


@pytest.mark.parametrize("freeze,stem,block", [("head", False, False), ("auto", False, False),
                                               ("1", False, True), ("none", True, True)])
def test_every_freeze_mode_trains_what_it_says(data, freeze, stem, block):
    model = tiny_model()
    before = snapshot(model)
    result = run(data, cfg(freeze=freeze), model=model)
    after = snapshot(result.model)
    assert result.model is model
    assert after["fc.weight"].shape == (3, 16)            # the head was replaced for 3 classes
    assert changed(before, after, "stem.0") is stem
    assert changed(before, after, "block.0") is block
    # BatchNorm statistics stay the pretrained ones (bn="eval", the default), even in trained stages.
    for k in ("stem.1.running_mean", "stem.1.running_var", "block.1.running_mean", "block.1.running_var"):
        assert torch.equal(before[k], after[k]), k
    assert result.decision.trainable_stages == {"head": 0, "auto": 0, "1": 1, "none": 2}[freeze]
    assert result.decision.reason


def test_bn_train_updates_statistics(data):
    model = tiny_model()
    before = snapshot(model)
    after = snapshot(run(data, cfg(freeze="none", bn="train"), model=model).model)
    assert not torch.equal(before["block.1.running_mean"], after["block.1.running_mean"])


def test_head_phase_then_finetune(data):
    """head_epochs=1: epoch 1 trains the head alone, then the chosen stages are unfrozen."""
    model = tiny_model()
    before = snapshot(model)
    states = []
    result = run(data, cfg(freeze="none", head_epochs=1, epochs=2), model=model,
                 callbacks=[lambda row: states.append(snapshot(model))])
    assert [r["phase"] for r in result.history] == ["head", "finetune"]
    assert not changed(before, states[0], "stem.0") and changed(before, states[0], "fc")
    assert changed(states[0], states[1], "stem.0")


def test_head_warmup_until_val_loss_stops_improving(data):
    """head_epochs=-1 ends the head phase at the first epoch whose val loss does not improve (max 10)."""
    result = run(data, cfg(freeze="none", head_epochs=-1, epochs=6, lr=1e-5, patience=10))
    phases = [r["phase"] for r in result.history]
    n_head = phases.count("head")
    assert 1 <= n_head <= 5 and phases == ["head"] * n_head + ["finetune"] * (6 - n_head)
    head_losses = [r["val_loss"] for r in result.history[:n_head]]
    if n_head < 5:   # it stopped because the last head epoch did not improve on the one before
        assert head_losses[-1] >= head_losses[-2] - 1e-4


@pytest.mark.parametrize("optimizer", OPTIMIZERS)
def test_each_optimizer_runs_an_epoch(data, optimizer):
    lr = 1.0 if optimizer == "adadelta" else 1e-2
    model = tiny_model()
    before = snapshot(model)
    result = run(data, cfg(optimizer=optimizer, lr=lr, freeze="1"), model=model)
    assert len(result.history) == 1 and math.isfinite(result.history[0]["train_loss"])
    assert changed(before, snapshot(result.model), "block.0")


@pytest.mark.parametrize("schedule", SCHEDULES)
def test_each_schedule_runs(data, schedule):
    result = run(data, cfg(schedule=schedule, epochs=3, warmup_epochs=0.5, step_size=1, freeze="1"))
    lrs = [r["lr"] for r in result.history]   # each epoch's LR at its start
    assert len(lrs) == 3 and all(lr > 0 for lr in lrs)
    assert lrs[0] < 1e-2                  # linear warm-up
    if schedule in ("step", "exp", "inv", "cosine"):
        assert lrs[2] < 1e-2               # decayed after the warm-up


def test_early_stopping_restores_best_epoch(data, tmp_path):
    # A tiny LR on val_acc with patience 1: accuracy cannot improve for long, so the run stops early.
    result = run(data, cfg(freeze="none", lr=1e-5, epochs=8, patience=1, monitor="val_acc"),
                 run_dir=tmp_path / "run")
    assert result.stopped_early and len(result.history) < 8
    assert result.best_epoch == 1 and len(result.history) == 2
    best = load_weights(tmp_path / "run" / BEST)
    state = result.model.state_dict()
    assert all(torch.equal(best[k], state[k].cpu()) for k in best)
    last = torch.load(tmp_path / "run" / LAST, weights_only=True)
    assert last["epoch"] == 2
    assert any(not torch.equal(last["model"][k], state[k]) for k in state if state[k].is_floating_point())
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["best_epoch"] == 1 and summary["stopped_early"] is True


@pytest.mark.parametrize("patience", [0, 1, 2])
def test_early_stopping_never_stops_after_an_improving_epoch(patience):
    """QA: --patience 0 stopped after epoch 1, which had improved. ``patience`` epochs in a row without
    improvement stop the run (0: the first one does), an improving epoch never does."""
    from finetune.core.metrics import EarlyStopping

    stopper = EarlyStopping(patience=patience, min_delta=0.0)
    losses = [1.0, 0.9, 0.8, 0.85, 0.86, 0.87, 0.7]
    stops = [stopper.step(v, e) for e, v in enumerate(losses, 1)]
    assert stops[:3] == [False] * 3 and stops[6] is False           # improving epochs
    assert stops[3:6] == [k + 1 >= max(patience, 1) for k in range(3)]

@pytest.mark.parametrize("gone", ["folder", "val", "val kept"])
def test_images_gone_since_the_scan_stop_the_run_and_it_resumes_once_they_are_back(tmp_path, monkeypatch, gone):
    """QA: the data folder moved (or its validation images deleted) after epoch 1: the run went on with NaN
    losses, advised a lower learning rate and exited 0. An epoch that loads no image of a split now stops
    the run before it is recorded, saying what happened; the run resumes once the images are back.
    Validation's batches kept in memory after epoch 1 (``finetune.data.replay``, "val kept") are not read
    again: that run finishes on the images it read, with the numbers of an undisturbed run."""
    import finetune.data.replay as replay
    from finetune.core.errors import DataError

    if gone == "val":
        monkeypatch.setattr(replay, "BUDGET_BYTES", 0)       # validation's images read every epoch
    root = tmp_path / "data"
    train, val = sets(root)
    moved = tmp_path / "moved"

    def take_away(row):
        if row["epoch"] == 1:
            if gone == "folder":
                root.rename(moved)
            else:
                for path, _ in val.items:
                    os.rename(path, path + ".away")

    if gone == "val kept":
        result = run((train, val), cfg(epochs=3, freeze="none"), run_dir=tmp_path / "run", callbacks=[take_away])
        undisturbed = run(sets(tmp_path / "data2"), cfg(epochs=3, freeze="none"), run_dir=tmp_path / "run2")
        assert [r["val_loss"] for r in result.history] == [r["val_loss"] for r in undisturbed.history]
        return
    with pytest.raises(DataError) as err:
        run((train, val), cfg(epochs=3, freeze="none"), run_dir=tmp_path / "run", callbacks=[take_away])
    split = "training" if gone == "folder" else "validation"
    assert str(err.value).startswith(f"no {split} image could be loaded (e.g. ")
    assert ") in epoch 2: has the data folder moved or changed since the scan? Put it back" in str(err.value)
    assert "missing: moved or deleted since the scan" in str(err.value)
    assert f"zoo finetune --resume {tmp_path / 'run'}" in str(err.value)
    assert torch.load(tmp_path / "run" / LAST, weights_only=True)["epoch"] == 1
    if gone == "folder":
        moved.rename(root)
    else:
        for path, _ in val.items:
            os.rename(path + ".away", path)
    again = run((train, val), cfg(epochs=3, freeze="none"), run_dir=tmp_path / "run", resume=True)
    assert len(again.history) == 3 and all(math.isfinite(r["val_loss"]) for r in again.history)

@pytest.mark.parametrize("fast_head", [False, True])
def test_a_class_whose_every_training_image_fails_stops_the_run(tmp_path, fast_head):
    """QA (torchrun audit): every training image of one class damaged after the scan: the run trained on
    without it (a head that never sees the class) and only warned at the end, under torchrun of rank 0's
    share alone. The first epoch that has met them all now stops the run, saying which class, before it is
    recorded, as when a whole split is gone; through the network and on cached features alike."""
    from finetune.core.errors import DataError

    train, val = sets(tmp_path / "data")
    dog = train.classes.index("dog")
    for path, label in train.items:
        if label == dog:
            with open(path, "wb") as fh:
                fh.write(b"not an image")
    config = cfg(epochs=2, freeze="head" if fast_head else "none", fast_head=fast_head)
    with pytest.raises(DataError) as err:
        run((train, val), config, run_dir=tmp_path / "run")
    message = str(err.value)
    n = train.class_counts()[dog]
    assert message.startswith(f"no training image of class 'dog' could be loaded (all {n} failed, e.g. "), message
    assert "is not a readable image" in message and ") in epoch 1: has the data folder moved or changed" in message
    assert torch.load(tmp_path / "run" / LAST, weights_only=True)["epoch"] == 0


def test_a_python_api_run_folder_says_how_to_continue_it(data, tmp_path):
    """QA: fit() into a folder holding a run advised `zoo finetune --resume`, which then refused the folder
    as "no model.json/config.yaml" (config.yaml was there). Each now names the way that works."""
    from click.testing import CliRunner
    from zoo.cli import cli

    out = tmp_path / "run"
    run(data, cfg(), run_dir=out)
    with pytest.raises(ConfigError, match=r"already holds a run: continue it with resume=True"):
        run(data, cfg(), run_dir=out)
    res = CliRunner().invoke(cli, ["finetune", "--resume", str(out)])
    assert res.exit_code == 2 and "written by the Python API" in res.output and "resume=True" in res.output

def test_nan_loss_stops_with_diverged_error_and_keeps_last_good_checkpoint(data, tmp_path):
    model = tiny_model()

    def poison(row):
        model.poison = True      # epoch 2's first forward pass emits NaN

    with pytest.raises(DivergedError, match=r"^loss diverged at epoch 2 step 1: lower the learning rate \(was "):
        run(data, cfg(epochs=3, freeze="1"), model=model, run_dir=tmp_path / "run", callbacks=[poison])
    last = torch.load(tmp_path / "run" / LAST, weights_only=True)
    assert last["epoch"] == 1 and len(last["history"]) == 1
    assert all(torch.isfinite(v).all() for v in last["model"].values() if v.is_floating_point())


def test_a_nan_loss_is_reported_at_its_own_step_without_a_host_sync_per_step():
    """The loss is looked at from the host every CHECK_EVERY steps (no GPU stall per step); a NaN in
    between is still reported with its own step and that step's LR, and stops the epoch."""
    from finetune.engine.steps import CHECK_EVERY, train_one_epoch

    model = nn.Linear(4, 2)
    calls = []

    class Poisoned(nn.Module):
        def forward(self, x):
            calls.append(1)
            out = model(x)
            return out * float("nan") if len(calls) == 3 else out

    batches = [(torch.randn(2, 4), torch.tensor([0, 1])) for _ in range(CHECK_EVERY + 5)]
    opt = torch.optim.SGD(model.parameters(), lr=0.5)

    class Sched:
        def current_lr(self):
            return opt.param_groups[0]["lr"]

        def step_batch(self):
            opt.param_groups[0]["lr"] *= 0.5

    with pytest.raises(DivergedError, match=r"epoch 7 step 3: .*\(was 0\.125\)"):
        train_one_epoch(Poisoned(), batches, opt, Sched(), nn.CrossEntropyLoss(), torch.device("cpu"), epoch=7)
    assert len(calls) == CHECK_EVERY - 1       # stopped at the first look, not at the end of the epoch


def test_data_wait_is_the_share_of_the_epoch_spent_waiting_for_batches():
    """train_one_epoch's data_wait (metrics.csv, the epoch line): a loader slower than the steps waits most of
    the epoch, steps slower than the loader hardly; measured by the host clock around next() alone."""
    import time

    from finetune.engine.steps import train_one_epoch

    model = nn.Linear(4, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)

    def slow_loader():
        for _ in range(4):
            time.sleep(0.05)
            yield torch.randn(2, 4), torch.tensor([0, 1])

    class SlowStep(nn.Module):
        def forward(self, x):
            time.sleep(0.05)
            return model(x)

    waiting = train_one_epoch(model, slow_loader(), opt, None, nn.CrossEntropyLoss(), torch.device("cpu"))
    stepping = train_one_epoch(SlowStep(), [(torch.randn(2, 4), torch.tensor([0, 1]))] * 4, opt, None,
                               nn.CrossEntropyLoss(), torch.device("cpu"))
    assert waiting["data_wait"] > 0.6 and stepping["data_wait"] < 0.2
    assert waiting["images"] == stepping["images"] == 8


@pytest.mark.parametrize("opt_kwargs", [{"lr": 1e300}, {"lr": 1e-3, "weight_decay": 1e300}])
def test_a_learning_rate_or_weight_decay_past_float32_is_a_divergence_not_a_traceback(opt_kwargs):
    """QA: --lr 1e308 (or --weight-decay / --backbone-lr-mult 1e300) made torch's update raise
    'value cannot be converted to type float without overflow' before any loss could turn NaN: a traceback."""
    from finetune.engine.steps import train_one_epoch

    model = nn.Linear(4, 2)
    batches = [(torch.randn(2, 4), torch.tensor([0, 1]))]
    opt = torch.optim.Adam(model.parameters(), **opt_kwargs)
    with pytest.raises(DivergedError, match=r"^the optimizer step overflowed .*: lower the learning rate"):
        train_one_epoch(model, batches, opt, None, nn.CrossEntropyLoss(), torch.device("cpu"), epoch=1)


def test_a_batchnorm_training_on_one_image_is_a_config_error_not_a_traceback():
    """QA: --head mlp --batch-size 1 (and --bn train / --no-pretrained where the last maps are 1x1) ended in
    torch's ValueError 'Expected more than 1 value per channel when training', a traceback."""
    from finetune.engine.steps import train_one_epoch

    model = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.Linear(8, 2))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(ConfigError, match=r"^a BatchNorm layer cannot train on a batch of 1 image .*--batch-size 2 "):
        train_one_epoch(model, [(torch.randn(1, 4), torch.tensor([0]))], opt, None, nn.CrossEntropyLoss(),
                        torch.device("cpu"))
    out = train_one_epoch(model, [(torch.randn(2, 4), torch.tensor([0, 1]))], opt, None, nn.CrossEntropyLoss(),
                          torch.device("cpu"))
    assert out["images"] == 2


def test_one_progress_bar_on_stderr_cleared_when_done_and_silent_when_quiet_or_not_a_terminal(monkeypatch):
    """finetune.core.progress.progress_bar is every bar's (helper-90: an epoch's, feature extraction's, the
    head's solves', zoo predict's, zoo doctor's and a download's were six tqdm calls, two without the terminal's
    width or an explicit stderr): on stderr, cleared when it closes, following the terminal's width; silent with
    quiet, and wherever stderr is not a terminal."""
    import io
    import sys

    from finetune.core.progress import progress_bar
    from zoo.cli.doctor import _bar

    class Terminal(io.StringIO):
        def isatty(self):
            return True

    assert progress_bar(3, "x", unit="img", quiet=True).disable     # quiet: nothing, on a terminal or not
    monkeypatch.delenv("TQDM_DISABLE", raising=False)      # (tests/conftest.py sets it; a terminal honours it)
    term = Terminal()
    monkeypatch.setattr(sys, "stderr", term)
    assert progress_bar(3, "x", unit="img", quiet=True).disable
    assert _bar(True)("files", 3).disable
    with progress_bar(3, "epoch 1/1 head", unit="batch") as bar:
        assert not bar.disable and not bar.leave and bar.dynamic_ncols and bar.unit == "batch"
        bar.update(3)
    assert "epoch 1/1 head" in term.getvalue()
    assert list(progress_bar(unit="C", quiet=True, iterable=[0.1, 1.0])) == [0.1, 1.0]


@pytest.mark.parametrize("value, off", [("1", True), ("0", True), ("false", True), ("", False)])
@pytest.mark.parametrize("terminal", [True, False])
def test_tqdm_disable_turns_the_bar_and_the_lines_off_as_tqdm_reads_it(monkeypatch, value, off, terminal):
    """helper-101: TQDM_DISABLE=1 left zoo's bar on a terminal (progress_bar passes disable=, which overrides the
    value tqdm's envwrap reads), and off a terminal TQDM_DISABLE=0 or false kept the log lines where tqdm reads any
    non-empty value as bool(str), True: tqdm's own bars (a download's) went quiet and zoo's lines did not."""
    import io
    import sys

    from finetune.core import progress

    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    monkeypatch.setattr(sys, "stderr", Terminal() if terminal else io.StringIO())
    monkeypatch.setenv("TQDM_DISABLE", value)
    from tqdm.utils import envwrap   # how tqdm reads it (once, when tqdm is imported): into disable=False's type

    def tqdm_init(disable=False):
        return disable

    assert bool(envwrap("tqdm")(tqdm_init)()) is off
    bar = progress.progress_bar(3, "x", unit="img")
    # (off: a silent LogLines, tqdm(disable=True) left tqdm's monitor thread running: helper-126)
    assert bool(bar.disable) is off and isinstance(bar, progress.LogLines) is (off or not terminal)
    bar.close()


def test_off_a_terminal_a_pass_writes_a_plain_line_a_minute_and_nothing_before(monkeypatch):
    """helper-99: in a pipe or a log file (a scheduler's job) a long pass said nothing until it ended (bars are
    terminal-only). Off a terminal the bar is a LogLines: no carriage return, no line for a pass shorter than
    LOG_EVERY_S, then one plain line per LOG_EVERY_S with what is done, the time and the caller's figures; a
    stream that fails (a closed pipe) ends the lines, not the pass."""
    import io
    import sys

    from finetune.core import progress

    log = io.StringIO()                      # no isatty(): a log file
    monkeypatch.setattr(sys, "stderr", log)
    monkeypatch.delenv("TQDM_DISABLE", raising=False)      # (tests/conftest.py sets it for the suite)
    now = [0.0]
    bar = progress.progress_bar(400, "epoch 3/10 finetune", unit="batch")
    assert isinstance(bar, progress.LogLines) and not bar.disable
    bar._clock = lambda: now[0]
    bar._start = bar._last = 0.0
    bar.figures = lambda: {"loss": "0.4123", "acc": "91.20%", "img/s": "2345"}
    for step in range(400):
        now[0] = step * 0.5                  # 200 s for the pass
        bar.update(1)
    bar.close()
    lines = log.getvalue().splitlines()
    assert lines == ["epoch 3/10 finetune: 121/400 batch (30%) in 1m00s; loss 0.4123, acc 91.20%, img/s 2345",
                     "epoch 3/10 finetune: 241/400 batch (60%) in 2m00s; loss 0.4123, acc 91.20%, img/s 2345",
                     "epoch 3/10 finetune: 361/400 batch (90%) in 3m00s; loss 0.4123, acc 91.20%, img/s 2345"]
    assert "\r" not in log.getvalue()

    monkeypatch.setenv("TQDM_DISABLE", "1")   # tqdm's own switch turns the lines off too
    assert progress.progress_bar(3, "x", unit="img").disable
    monkeypatch.delenv("TQDM_DISABLE")

    short = io.StringIO()                    # a pass under a minute: nothing at all
    monkeypatch.setattr(sys, "stderr", short)
    assert list(progress.progress_bar(unit="C", iterable=[0.1, 1.0])) == [0.1, 1.0]
    with progress.progress_bar(3, "predicting", unit="img") as quick:
        quick.update(3)
    assert short.getvalue() == ""

    now[0] = 0.0
    download = progress.LogLines(3 * 2 ** 20, "weights.safetensors", unit="B", scaled=True, clock=lambda: now[0])
    now[0] = 61.0
    download.update(2 ** 20 + 2 ** 19)
    assert short.getvalue() == "weights.safetensors: 1.5 MiB/3.0 MiB (50%) in 1m01s\n"

    class Closed(io.StringIO):
        def write(self, text):
            raise BrokenPipeError(32, "Broken pipe")

    monkeypatch.setattr(sys, "stderr", Closed())
    now[0] = 0.0
    gone = progress.LogLines(10, "x", unit="img", clock=lambda: now[0])
    now[0] = 200.0
    gone.update(1)                           # the write fails: no error, no more lines
    now[0] = 400.0
    gone.update(1)
    assert gone.n == 2 and not gone._open


def test_off_a_terminal_the_training_loop_looks_at_the_host_once_per_log_line(monkeypatch):
    """The running loss/accuracy a log line shows is a host look (a GPU sync): off a terminal the loop takes
    it only when a line is written (LogLines.figures), not every second as a visible bar does."""
    import io
    import sys

    from finetune.core import progress
    from finetune.engine import steps

    now = [0.0]

    def clock():
        now[0] += 1.0                        # each read of the clock a second later
        return now[0]

    monkeypatch.setattr(sys, "stderr", io.StringIO())
    looks = []
    item = torch.Tensor.item
    monkeypatch.setattr(torch.Tensor, "item", lambda t: looks.append(1) or item(t))
    bar = progress.LogLines(130, "epoch 1/1 finetune", unit="batch", clock=clock)     # a clock read a step
    model = nn.Linear(4, 2)
    batches = [(torch.randn(2, 4), torch.tensor([0, 1])) for _ in range(130)]
    steps.train_one_epoch(model, batches, torch.optim.SGD(model.parameters(), lr=0.1), None,
                          nn.CrossEntropyLoss(), torch.device("cpu"), progress=bar)
    lines = sys.stderr.getvalue().splitlines()
    assert len(lines) == 2 and all("; loss " in line and "img/s " in line for line in lines)
    assert len(looks) == 2 * len(lines)            # loss and accuracy, per line only


def test_a_visible_progress_bar_refreshes_its_figures_from_the_host_at_most_once_a_second(monkeypatch):
    """A visible bar's running loss/accuracy is a host look (a GPU sync): refreshed on the first step, then
    at most every POSTFIX_EVERY_S, never per step; the bar itself still advances every step."""
    from finetune.engine import steps

    now = [0.0]

    def clock():                     # each read of the clock: a quarter of a second later
        now[0] += 0.25
        return now[0]

    looks = []
    item = torch.Tensor.item
    monkeypatch.setattr(steps.time, "perf_counter", clock)
    monkeypatch.setattr(torch.Tensor, "item", lambda t: looks.append(1) or item(t))

    class Bar:
        disable = False

        def __init__(self):
            self.posts, self.n = [], 0

        def set_postfix(self, **figures):
            self.posts.append((self.n + 1, figures))

        def update(self, k):
            self.n += k

    model = nn.Linear(4, 2)
    batches = [(torch.randn(2, 4), torch.tensor([0, 1])) for _ in range(40)]
    bar = Bar()
    steps.train_one_epoch(model, batches, torch.optim.SGD(model.parameters(), lr=0.1), None,
                          nn.CrossEntropyLoss(), torch.device("cpu"), progress=bar)
    assert bar.n == 40
    # three clock reads a step (the bar's, and the two around next() that time the wait for data): 0.75 s a
    # step, so the figures are refreshed every second step
    assert [step for step, _ in bar.posts] == list(range(1, 41, 2))
    assert {"loss", "acc", "img/s"} <= set(bar.posts[0][1])
    assert len(looks) == 2 * len(bar.posts)


def test_evaluation_never_makes_the_host_wait_for_a_batch(monkeypatch):
    """The probabilities, hits and losses the guard and the report need go to the host without a wait
    (non-blocking copies), and the confusion counts without CUDA's bincount (it reads the labels' maximum
    from the host): no host look before the last batch; still one entry per batch, in loader order."""
    from finetune.engine.steps import evaluate

    events = []
    cpu, item, to, bincount = torch.Tensor.cpu, torch.Tensor.item, torch.Tensor.to, torch.bincount

    def spy_to(t, *a, **k):
        if not k.get("non_blocking") and (a[:1] == ("cpu",) or str(k.get("device")) == "cpu"):
            events.append("host")
        return to(t, *a, **k)

    monkeypatch.setattr(torch.Tensor, "cpu", lambda t, *a, **k: events.append("host") or cpu(t, *a, **k))
    monkeypatch.setattr(torch.Tensor, "item", lambda t: events.append("host") or item(t))
    monkeypatch.setattr(torch.Tensor, "to", spy_to)
    monkeypatch.setattr(torch, "bincount", lambda *a, **k: events.append("host") or bincount(*a, **k))
    torch.manual_seed(0)
    linear = nn.Linear(4, 3)

    class Net(nn.Module):
        def forward(self, x):
            events.append("forward")
            return linear(x)

    batches = [(torch.randn(n, 4), torch.tensor([0, 1, 2, 0][:n])) for n in (4, 2, 3)]
    probs, correct, losses = [], [], []
    bar = type("Bar", (), {"update": lambda self, n: events.append("bar")})()     # (its progress bar: helper-149)
    out = evaluate(Net(), batches, nn.CrossEntropyLoss(), torch.device("cpu"), ["a", "b", "c"],
                   probs=probs, correct=correct, losses=losses, progress=bar)
    last = max(i for i, e in enumerate(events) if e == "forward")
    assert "host" not in events[:last] and events.count("bar") == 3
    with torch.no_grad():
        want = [linear(x) for x, _ in batches]
    assert [p.shape[0] for p in probs] == [4, 2, 3] and all(p.device.type == "cpu" for p in probs)
    assert all(torch.allclose(p, w.softmax(1)) for p, w in zip(probs, want))
    assert [c.tolist() for c in correct] == [(w.argmax(1) == y).tolist() for w, (_, y) in zip(want, batches)]
    assert sum(int(c.sum()) for c in correct) == round(out["acc"] * 9)
    assert torch.cat(losses).mean().item() == pytest.approx(out["loss"])


def test_the_validation_pass_has_the_training_pass_bar_advanced_without_a_host_look(data, monkeypatch):
    """helper-149: the validation pass after each epoch (7-8 s at medium size on 2 CPU cores, 31 s loaded) and the
    head guard's or final evaluation showed nothing. It gets the training pass's bar (progress_bar: a tqdm bar on a
    terminal, a line a minute off one), one update per batch and no figures (no host look per batch)."""
    from finetune.core import progress
    from finetune.engine import epoch_steps

    bars = []

    def recorded(*a, **k):
        bar = progress.LogLines(*a[:2], unit=k["unit"], quiet=k.get("quiet", False))
        bars.append(bar)
        return bar

    monkeypatch.setattr(epoch_steps, "progress_bar", recorded)
    run(data, cfg(epochs=2, quiet=False, batch_size=4))
    val = [b for b in bars if "validation" in b.desc]
    assert [b.desc for b in val] == ["epoch 1/2 validation", "epoch 2/2 validation"]
    assert all(b.total == 3 and b.n == 3 and b.figures is None and not b.disable for b in val)     # 9 images, 4 a batch


def test_the_freeze_decision_is_said_before_the_lines_that_depend_on_it(data):
    """helper-149: "epochs: at most 8 (auto for freeze ...)" and "leaving the solved head gently" came before the
    "freeze:" line that states the decision both follow from; the decision is said first now, once."""
    said = []
    run(data, cfg(epochs=0, freeze="1", head_epochs=-1, fast_head=True), log=said.append)
    first = [next(i for i, line in enumerate(said) if line.startswith(start))
             for start in ("freeze: head + last 1 stage (", "epochs: at most ", "finetune: leaving the solved head")]
    assert first == sorted(first) and sum(line.startswith("freeze: ") for line in said) == 1, said


def test_the_kernel_takes_any_batches_a_step_hook_and_leaves_divergence_to_the_caller():
    """The one loop of every tool: any (x, y) iterable; after_step sees each step's loss and may end the
    epoch (the LR range test); raise_diverged=False reports NaN in the metrics (the overfit check);
    optimizer=None only measures (the frozen control)."""
    from finetune.engine import train_one_epoch

    torch.manual_seed(0)
    model = nn.Linear(4, 2)
    batches = [(torch.randn(3, 4), torch.tensor([0, 1, 0])) for _ in range(6)]
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    seen = []
    out = train_one_epoch(model, iter(batches), opt, None, nn.CrossEntropyLoss(), torch.device("cpu"),
                          after_step=lambda step, loss: seen.append((step, float(loss))) or step == 4)
    assert [s for s, _ in seen] == [1, 2, 3, 4] and out["images"] == 12
    assert out["loss"] == pytest.approx(sum(v for _, v in seen) / 4)
    before = [p.clone() for p in model.parameters()]
    frozen = train_one_epoch(model, batches, None, None, nn.CrossEntropyLoss(), torch.device("cpu"))
    assert frozen["images"] == 18 and all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    poisoned = [(x * float("nan"), y) for x, y in batches]
    out = train_one_epoch(model, poisoned, opt, None, nn.CrossEntropyLoss(), torch.device("cpu"),
                          raise_diverged=False)
    assert math.isnan(out["loss"])
    with pytest.raises(DivergedError, match="epoch 0 step 1"):
        train_one_epoch(model, poisoned, opt, None, nn.CrossEntropyLoss(), torch.device("cpu"))


def test_huge_learning_rate_diverges(data):
    with pytest.raises(DivergedError, match="loss diverged at epoch 1 step"):
        run(data, cfg(optimizer="sgd", lr=1e30, freeze="none", epochs=2))


def test_the_reports_config_table_says_which_device_options_a_cpu_run_did_not_use(data, tmp_path):
    """helper-149: report.html's config table showed amp and gpu_normalize true on a CPU run, where neither acts
    (CUDA only). summary.json records what the run used (``in_effect``, from its setup), the table says it beside
    the asked value; channels_last, used on the CPU (NHWC), stays a plain true."""
    import re

    from finetune.tools.pages import run_report_html

    out = tmp_path / "run"
    run(data, cfg(epochs=1, freeze="1"), run_dir=out)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["in_effect"] == {"amp": False, "channels_last": True, "gpu_normalize": False}
    cells = dict(re.findall(r"<tr><td>(amp|channels_last|gpu_normalize|epochs)</td><td[^>]*>([^<]*)</td>",
                            run_report_html(out)))
    assert cells == {"amp": "true (no effect on cpu)", "channels_last": "true",
                     "gpu_normalize": "true (no effect on cpu)", "epochs": "1"}, cells


def test_a_run_resumed_with_other_device_options_says_which_epochs_ran_without_them(data, tmp_path, monkeypatch):
    """Session 35's leftover (helper-153): summary.json's in_effect was the last process's alone, so a run begun on
    the CPU (amp unused) and resumed where amp acts showed `amp: true` in report.html's config table, as if every
    epoch had used it. manifest.json records each process's device options and the epoch it went on after;
    summary.json gets ``in_effect_by_epochs`` and the table says which epochs ran without the option. (The second
    device is faked: Setup.in_effect answers as CUDA would, amp and gpu_normalize in effect.)"""
    import re

    from finetune.engine.setup import Setup
    from finetune.tools.pages import run_report_html

    out, config = tmp_path / "run", cfg(epochs=4, freeze="1", head_epochs=0)
    stop = [lambda row: (_ for _ in ()).throw(KeyboardInterrupt()) if row["epoch"] == 2 else None]
    with pytest.raises(Interrupted):
        run(data, config, run_dir=out, callbacks=stop)
    cuda = {"amp": True, "channels_last": True, "gpu_normalize": True}
    monkeypatch.setattr(Setup, "in_effect", property(lambda self: cuda))
    run(data, config, run_dir=out, resume=True)
    summary = json.loads((out / "summary.json").read_text())
    cpu, asked = {"amp": False, "channels_last": True, "gpu_normalize": False}, dict.fromkeys(cuda, True)
    assert summary["in_effect"] == cuda and summary["in_effect_by_epochs"] == [
        {"epochs": [1, 2], "device": "cpu", "in_effect": cpu, "asked": asked},
        {"epochs": [3, 4], "device": "cpu", "in_effect": cuda, "asked": asked}]
    cells = dict(re.findall(r"<tr><td>(amp|channels_last|gpu_normalize)</td><td[^>]*>([^<]*)</td>",
                            run_report_html(out)))
    assert cells == {"amp": "true (no effect on cpu: epochs 1-2)", "channels_last": "true",
                     "gpu_normalize": "true (no effect on cpu: epochs 1-2)"}, cells


def test_the_config_table_says_which_epochs_a_resumes_own_device_flag_turned_an_option_on_or_off(data, tmp_path):
    """Review of session 36 (helper-157): a resume given --no-channels-last (config.yaml keeps true) showed
    `channels_last: true (no effect on cpu: epochs 3-4)`, as if the CPU ignored an option the resume had turned
    off; begun with it off and resumed with it on, the table said `false` of a run whose later epochs used it.
    manifest.json records what each process was set to; the table says the epochs that ran the other way."""
    import re

    from finetune.tools.pages import run_report_html

    def stop_at(epoch):
        return [lambda row: (_ for _ in ()).throw(KeyboardInterrupt()) if row["epoch"] == epoch else None]

    cells = {}
    for first in (True, False):
        out, config = tmp_path / f"run-{first}", cfg(epochs=4, freeze="1", head_epochs=0, channels_last=first)
        with pytest.raises(Interrupted):
            run(data, config, run_dir=out, callbacks=stop_at(2))
        run(data, config.replace(channels_last=not first), run_dir=out, resume=True)
        cells[first] = re.findall(r"<tr><td>channels_last</td><td[^>]*>([^<]*)</td>", run_report_html(out))
    assert cells == {True: ["true (off in epochs 3-4)"], False: ["false (on in epochs 3-4)"]}, cells


def test_the_epochs_of_each_device_come_from_the_processes_that_trained_them_last():
    """in_effect_by_epochs (helper-153): a resume trains again every epoch after the one it goes on after, so a
    process cut off before its first checkpoint counts for nothing; neighbours alike are one span; a manifest that
    does not say (older runs, a damaged file) gives None, as one device for every epoch does."""
    from finetune.engine.runfolder import in_effect_by_epochs

    cpu, cuda = {"amp": False}, {"amp": True}

    def manifest(*processes):
        (after, device, used), *resumed = processes
        return {"after_epoch": after, "device": device, "in_effect": used,
                "resumed": [{"after_epoch": a, "device": d, "in_effect": u} for a, d, u in resumed]}

    on_cpu = {"epochs": [1, 2], "device": "cpu", "in_effect": cpu}
    assert in_effect_by_epochs(manifest((0, "cpu", cpu), (2, "cuda:0", cuda)), 8) == [
        on_cpu, {"epochs": [3, 8], "device": "cuda:0", "in_effect": cuda}]
    # on CUDA after 2, cut off in epoch 3; on the CPU again after 2: the CPU trained every epoch
    assert in_effect_by_epochs(manifest((0, "cpu", cpu), (2, "cuda:0", cuda), (2, "cpu", cpu)), 8) is None
    assert in_effect_by_epochs(manifest((0, "cpu", cpu), (2, "cuda:0", cuda), (5, "cpu", cpu)), 8) == [
        on_cpu, {"epochs": [3, 5], "device": "cuda:0", "in_effect": cuda},
        {"epochs": [6, 8], "device": "cpu", "in_effect": cpu}]
    assert in_effect_by_epochs(manifest((0, "cpu", cpu), (3, "cpu", cpu), (8, "cuda:0", cuda)), 8) is None
    # helper-157: what each process was given (asked) tells a resume's --no-amp from the device's; a process that
    # did not record it (begun before it was) is alike in it to any
    given = manifest((0, "cpu", cpu), (2, "cpu", cpu))
    given["asked"], given["resumed"][0]["asked"] = {"amp": True}, {"amp": False}
    assert [(p["epochs"], p["asked"]) for p in in_effect_by_epochs(given, 8)] == [([1, 2], {"amp": True}),
                                                                                ([3, 8], {"amp": False})]
    del given["asked"]
    assert in_effect_by_epochs(given, 8) is None
    assert in_effect_by_epochs({"resumed": [{"after_epoch": 2, "device": "cpu", "in_effect": cpu}]}, 8) is None
    assert in_effect_by_epochs({"device": "cpu", "resumed": [{"after_epoch": 2, "in_effect": cuda}]}, 8) is None


def test_run_folder_has_every_file(data, tmp_path):
    out = tmp_path / "run"
    result = run(data, cfg(epochs=2, freeze="1", class_weights="auto"), run_dir=out)
    for name in ("config.yaml", "manifest.json", "metrics.csv", "curves.png", "summary.json",
                 "checkpoints/last.pt", "checkpoints/best.safetensors"):
        assert (out / name).is_file(), name
    rows = list(csv.DictReader((out / "metrics.csv").open()))
    assert [r["epoch"] for r in rows] == ["1", "2"]
    assert set(rows[0]) == {"epoch", "phase", "train_loss", "train_acc", "val_loss", "val_acc", "lr", "seconds",
                            "images_per_s", "data_wait"}
    assert all(0.0 <= float(r["data_wait"]) <= 1.0 for r in rows)
    manifest = json.loads((out / "manifest.json").read_text())
    assert len(manifest["files_sha256"]) == 64 and manifest["seed"] == 0 and manifest["versions"]["torch"]
    assert manifest["command"]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["best_epoch"] == result.best_epoch
    assert set(summary["metrics"]["per_class"]) == {"cat", "dog", "fox"}
    assert summary["freeze"]["reason"] and summary["stopped_early"] is False
    assert isinstance(summary["advice"], list)
    ckpt = torch.load(out / "checkpoints" / "last.pt", weights_only=True)   # no pickled code needed
    for key in ("model", "optimizer", "scheduler", "epoch", "early_stop", "rng", "history", "config"):
        assert key in ckpt, key
    assert ckpt["config"]["class_weights"] == "auto"
    assert "cuda" in ckpt["rng"] or not torch.cuda.is_available()


def test_metrics_include_per_class_accuracy(data):
    result = run(data, cfg(freeze="1"))
    m = result.metrics
    assert set(m["per_class"]) == {"cat", "dog", "fox"}
    assert sum(map(sum, m["confusion"])) == 9
    assert m["val_acc"] == pytest.approx(sum(m["confusion"][i][i] for i in range(3)) / 9)


def test_final_metrics_reuse_the_best_epochs_evaluation(data, monkeypatch):
    """The end of a run passes the val set through the network no more: the best epoch's evaluation is
    the same numbers as a fresh one over the returned weights (metrics and val probabilities)."""
    from finetune.data import ImageDataset, build_transform, make_loader
    from finetune.engine import epoch_steps

    calls = []
    real = epoch_steps.evaluate
    monkeypatch.setattr(epoch_steps, "evaluate", lambda *a, **k: calls.append(1) or real(*a, **k))
    _, val = data
    result = run(data, cfg(freeze="none", epochs=3, lr=1e-3))
    assert len(calls) == 3           # one evaluation per epoch, none at the end
    loader = make_loader(ImageDataset(val, build_transform(DATA_CONFIG, False)), 9, train=False, workers=0)
    probs = []
    fresh = evaluate(result.model, loader, nn.CrossEntropyLoss(), torch.device("cpu"), val.classes, probs=probs)
    m = result.metrics
    assert (m["val_loss"], m["val_acc"], m["per_class"], m["confusion"]) == (
        fresh["loss"], fresh["acc"], fresh["per_class"], fresh["confusion"])
    assert result.val_probs.shape == (9, 3) and torch.equal(result.val_probs, torch.cat(probs))


def test_evaluate_counts_every_image(data):
    from finetune.data import ImageDataset, build_transform, make_loader

    _, val = data
    model = tiny_model()
    model.fc = nn.Linear(16, 3)
    loader = make_loader(ImageDataset(val, build_transform(DATA_CONFIG, False)), 4, train=False, workers=0)
    out = evaluate(model, loader, nn.CrossEntropyLoss(), torch.device("cpu"), val.classes)
    assert out["images"] == 9 and 0.0 <= out["acc"] <= 1.0 and math.isfinite(out["loss"])


def test_balanced_sampler_and_mlp_head(data):
    result = run(data, cfg(sampler="balanced", head="mlp", mlp_hidden=8, freeze="head"))
    assert len(result.history) == 1 and result.model.fc.fc2.out_features == 3


@pytest.mark.parametrize("solver,rows", [("gradient", 2), ("lbfgs", 1)])
def test_fast_head_path_when_backbone_frozen(data, tmp_path, solver, rows):
    """Cached features: epochs of the optimizer, or one converged L-BFGS solve (a phase of one row)."""
    result = run(data, cfg(freeze="head", fast_head=True, epochs=2, head_solver=solver), run_dir=tmp_path / "run")
    assert [r["phase"] for r in result.history] == ["head"] * rows
    best = load_weights(tmp_path / "run" / BEST)
    assert all(torch.equal(best[k], v.cpu()) for k, v in result.model.state_dict().items())


def test_run_folder_is_not_overwritten(data, tmp_path):
    run(data, cfg(freeze="head"), run_dir=tmp_path / "run")
    with pytest.raises(ConfigError, match="--resume"):
        run(data, cfg(freeze="head"), run_dir=tmp_path / "run")


def test_sigterm_saves_and_says_how_to_resume(data, tmp_path):
    def term(row):
        os.kill(os.getpid(), signal.SIGTERM)

    with pytest.raises(Interrupted, match=r"zoo finetune --resume .*run"):
        run(data, cfg(epochs=3, freeze="1"), run_dir=tmp_path / "run", callbacks=[term])
    assert torch.load(tmp_path / "run" / LAST, weights_only=True)["epoch"] == 1
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL   # handler restored


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-CUDA message")
def test_cuda_requested_without_cuda(data):
    with pytest.raises(ConfigError, match="no CUDA device"):
        run(data, cfg(device="cuda"))


def test_fit_wires_device_augment_for_training_only(data, monkeypatch, tmp_path):
    """fit with the CUDA device steps (forced here on the CPU: they run anywhere): every training batch
    goes through DeviceAugment, reseeded at the start of each epoch from (seed, epoch); validation
    and the final evaluation are only normalised; a resumed run repeats the uninterrupted one."""
    import finetune.engine.setup as engine_setup
    from finetune.data import DeviceAugment, DeviceNormalize
    from finetune.core.seeding import epoch_seed

    calls = {"reseed": [], "augmented": 0}

    class Counting(DeviceAugment):
        def reseed(self, seed, rank=0, world_size=1):
            calls["reseed"].append(seed)
            super().reseed(seed, rank, world_size)

        def augment(self, x, draws=None):
            calls["augmented"] += 1
            return super().augment(x, draws)

    def cuda_steps(config, data_config, device):
        return "uint8", DeviceNormalize.from_data_config(data_config), Counting.from_config(data_config, config)

    monkeypatch.setattr(engine_setup, "device_steps", cuda_steps)
    config = cfg(epochs=2, freeze="none", hflip=0.5, brightness=0.4, contrast=0.4)
    result = run(data, config, run_dir=tmp_path / "full")
    train, _ = data
    assert calls["reseed"] == [epoch_seed(config.seed, e, 0) for e in (1, 2)]
    assert calls["augmented"] == 2 * (len(train.items) // config.batch_size)    # training batches only
    with pytest.raises(Interrupted):
        run(data, config, run_dir=tmp_path / "cut", callbacks=[lambda row: (_ for _ in ()).throw(KeyboardInterrupt())])
    again = run(data, config, run_dir=tmp_path / "cut", resume=True)
    assert [r["train_loss"] for r in again.history] == [r["train_loss"] for r in result.history]
    assert all(torch.equal(a, b) for a, b in zip(snapshot(again.model).values(), snapshot(result.model).values()))


needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def devices(slow_on_cpu: bool = False) -> list:
    """A check's device parameter: the CPU case runs in the default suite (``slow_on_cpu``: in ``-m slow``),
    the CUDA case in the GPU session's ``pytest -m gpu`` (scripts/gpu_checks.sh), skipped without a GPU."""
    return [pytest.param("cpu", id="cpu", marks=[pytest.mark.slow] if slow_on_cpu else []),
            pytest.param("cuda", id="cuda", marks=[pytest.mark.gpu, needs_cuda])]


DEVICES = devices()


@pytest.mark.parametrize("device", DEVICES)
def test_head_only_on_cached_features_is_nchw_on_cuda_only(data, device):
    """NHWC pays cuDNN's first-use set-up: on CUDA only runs that train the network convert the model; on the
    CPU, where oneDNN's NHWC kernels are the faster ones forward and backward, a head-only run's feature pass
    is NHWC too (``runtime.nhwc``); --no-channels-last keeps it NCHW."""
    from finetune.engine import build_setup

    train, val = data
    head = build_setup(tiny_model(), STAGES, DATA_CONFIG, train, val, cfg(device=device, freeze="head",
                                                                       fast_head=True), head="fc")
    net = build_setup(tiny_model(), STAGES, DATA_CONFIG, train, val, cfg(device=device, freeze="none"), head="fc")
    off = build_setup(tiny_model(), STAGES, DATA_CONFIG, train, val, cfg(device=device, freeze="none",
                                                                      channels_last=False), head="fc")
    nhwc = torch.channels_last
    assert head.channels_last is (device == "cpu")
    assert head.model.stem[0].weight.is_contiguous(memory_format=nhwc if device == "cpu" else torch.contiguous_format)
    assert net.channels_last and net.model.stem[0].weight.is_contiguous(memory_format=nhwc)
    assert not off.channels_last and off.model.stem[0].weight.is_contiguous()
    for setup in (head, net, off):
        setup.close()


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("bf16", [True, False])
def test_cuda_amp_channels_last(data, tmp_path, monkeypatch, bf16):
    """CUDA: autocast in bf16 where supported, else fp16 with a GradScaler (checkpointed); channels_last."""
    from finetune.engine import runtime

    if not bf16:      # as on a V100/T4
        monkeypatch.setattr(runtime, "bf16_native", lambda device: False)
    elif not runtime.bf16_native(torch.device("cuda")):
        pytest.skip("no bf16 on this GPU")
    out = tmp_path / "run"
    result = run(data, cfg(device="cuda", freeze="none", epochs=2), run_dir=out)
    assert next(result.model.parameters()).is_cuda
    assert result.model.stem[0].weight.is_contiguous(memory_format=torch.channels_last)
    assert all(math.isfinite(r["train_loss"]) for r in result.history)
    ckpt = torch.load(out / LAST, weights_only=True)
    assert (ckpt["scaler"] is not None) is (not bf16)
    assert "cuda" in ckpt["rng"]
    resumed_dir = tmp_path / "again"
    with pytest.raises(Interrupted):
        run(data, cfg(device="cuda", freeze="none", epochs=2), run_dir=resumed_dir,
            callbacks=[lambda row: (_ for _ in ()).throw(KeyboardInterrupt())])
    again = run(data, cfg(device="cuda", freeze="none", epochs=2), run_dir=resumed_dir, resume=True)
    assert len(again.history) == 2
    # a smoke check only (cuDNN's kernels may differ in the last bits, and on this tiny model a wrong
    # augmentation seed moves the loss by under 1%): exactness is test_fit_wires_device_augment_... on CPU
    assert again.history[1]["train_loss"] == pytest.approx(result.history[1]["train_loss"], rel=2e-2)


def test_advice_is_printed_during_the_run(data):
    """A stalled loss (LR ~ 0) is called out after the epoch where the rule fires, not only at the end."""
    lines: list[str] = []
    result = run(data, cfg(epochs=4, lr=1e-12, freeze="none", schedule="none"), log=lines.append)
    advice = [i for i, line in enumerate(lines) if line.startswith("advice (after epoch")]
    assert advice, lines
    assert "not going down" in lines[advice[0]] and len(advice) == 1       # each rule once
    assert len(result.history) == 4


def test_paired_gain_p_is_the_exact_one_sided_mcnemar_test():
    from itertools import product

    from finetune.core.metrics import paired_gain_p

    for gains, losses in [(0, 0), (1, 0), (2, 0), (4, 0), (5, 0), (6, 1), (3, 3), (0, 4), (12, 3)]:
        n = gains + losses
        # every way the n discordant images could have gone, each as likely under "equally good"
        at_least = sum(1 for ways in product((0, 1), repeat=n) if sum(ways) >= gains)
        assert paired_gain_p(gains, losses) == pytest.approx(at_least / 2 ** n if n else 1.0)
    assert paired_gain_p(4, 0) > 0.05 > paired_gain_p(5, 0)      # 5 clean wins is the fewest that count


def test_paired_gain_p_at_thousands_of_discordant_images_is_one_binomial_not_one_per_term(monkeypatch):
    """A math.comb per term of the tail cost a power of n more (16,000 discordant images: 13 s); the p is
    the same exact value, its terms each made from the one before."""
    import math

    from finetune.core import metrics

    gains, losses = 2_100, 1_900
    want = sum(math.comb(4_000, k) for k in range(gains, 4_001)) / 2 ** 4_000
    calls = []
    real = math.comb
    monkeypatch.setattr(metrics.math, "comb", lambda *a: calls.append(a) or real(*a))
    assert metrics.paired_gain_p(gains, losses) == want
    assert len(calls) == 1


def test_accuracy_text_is_the_one_printed_form_of_an_accuracy():
    """QA: finetune printed 0.980 where eval printed 98.64%; both now go through accuracy_text."""
    import numpy as np

    from finetune.core.metrics import accuracy_text, metric_text

    assert accuracy_text(0.98641) == "98.64%" and accuracy_text(1) == "100.00%" and accuracy_text(0.0) == "0.00%"
    assert accuracy_text(np.float32(0.5)) == "50.00%" and accuracy_text(None) == accuracy_text(math.nan) == "-"
    assert metric_text("val_acc", 0.25) == "25.00%" and metric_text("val_loss", 0.123456) == "0.1235"
    assert metric_text("val_loss", 0.123456, ".4f") == "0.1235" and metric_text("val_loss", math.nan) == "-"


def test_probability_text_is_the_one_shown_form_of_a_probability():
    """Session 35's walk-through (helper-153): one image's top probability read 100.0% (zoo eval), 99.99% (zoo
    predict), (1.00) (report.html) and 0.999932 (serve). Every human-facing place shows probability_text: percent,
    two decimals, of the JSON answers' 6 decimals; never 100.00% or 0.00% for a softmax, which is neither."""
    import numpy as np

    from finetune.core.metrics import probability_text, probability_value

    shown = {0.999932: "99.99%", 0.99996: ">99.99%", 0.9999996: ">99.99%", 1.0: ">99.99%", 0.5: "50.00%",
             0.98641: "98.64%", 0.00004: "<0.01%", 0.0: "<0.01%", 0.00006: "0.01%", np.float32(0.25): "25.00%",
             0.1234551: "12.35%", 0.1234449: "12.34%", None: "-", math.nan: "-", 1.5: "-", -0.1: "-"}
    assert {p: probability_text(p) for p in shown} == shown and probability_text(True) == "-"
    assert probability_value(0.99993246793747) == 0.999932 and probability_text(0.99993246793747) == "99.99%"


def test_accuracy_text_of_what_is_no_number_is_a_dash():
    """A damaged summary.json (a string, a boolean, Infinity where an accuracy was) showed "90.00%", "100.00%"
    and "inf%" in report.html's val acc card and the model card; it showed "-" before accuracy_text."""
    import math

    from finetune.core.metrics import accuracy_text

    assert [accuracy_text(v) for v in ("0.9", True, False, math.inf, -math.inf, [0.5])] == ["-"] * 6


@pytest.mark.parametrize("alpha,kept", [(0.0, "head"), (1.01, "finetune")])
def test_head_guard_keeps_the_head_unless_finetuning_is_significantly_better(data, tmp_path, monkeypatch,
                                                                              alpha, kept):
    """After a head phase, the finetuned weights (best on val loss) replace the head's only if a paired test
    on the validation images says so: alpha 0 never, alpha > 1 always. When the head is kept it is
    the run's best everywhere: the returned model, best.safetensors, summary.json, the metrics."""
    from finetune.engine import guard as guard_module

    monkeypatch.setattr(guard_module, "ALPHA", alpha)
    out = tmp_path / "run"
    states = []
    model = tiny_model()
    result = run(data, cfg(freeze="none", head_epochs=1, epochs=4, lr=1e-2, patience=10, ema=0.0), model=model,
                 run_dir=out, callbacks=[lambda row: states.append(snapshot(model))])   # ema 0: kept = trained
    summary = json.loads((out / "summary.json").read_text())
    guard = summary["head_guard"]
    assert guard is not None, "a finetune epoch should beat the head epoch on val loss here"
    assert guard["head_epoch"] == 1 and guard["finetune_epoch"] > 1 and guard["kept"] == kept
    assert guard["gains"] >= 0 and guard["losses"] >= 0 and 0 < guard["p_loss"] <= 1
    assert (out / "checkpoints" / "head.safetensors").is_file()
    best = load_weights(out / BEST)
    want = states[0] if kept == "head" else states[guard["finetune_epoch"] - 1]
    assert all(torch.equal(best[k], want[k]) for k in best)
    assert all(torch.equal(v.cpu(), want[k]) for k, v in result.model.state_dict().items())
    assert result.best_epoch == summary["best_epoch"] == (1 if kept == "head" else guard["finetune_epoch"])
    if kept == "head":
        assert summary["best_value"] == pytest.approx(result.history[0]["val_loss"], rel=1e-4)
        assert result.metrics["val_loss"] == pytest.approx(result.history[0]["val_loss"], rel=1e-4)


@pytest.mark.parametrize("mixing,monitor,competes", [({}, "val_loss", True), ({"mixup": 0.2}, "val_loss", False),
                                                     ({"cutmix": 1.0}, "val_loss", False),
                                                     ({"cutmix": 1.0}, "val_acc", True)])
def test_where_finetuning_mixes_images_the_heads_val_loss_does_not_compete(data, tmp_path, mixing, monitor, competes):
    """Trained toward mixed labels, the network is less confident on plain validation images than the solved head:
    CutMix on digits exported the head (val loss 0.146, 95.3%) over epoch 6 (0.160, 99.3%), and stopped early.
    There the finetune phase's best is its own and the guard judges it against the head. min_delta 100: no epoch
    improves on an earlier finite one, so the first epoch that counts is the best, deterministically."""
    from finetune.core.policy import head_competes

    config = cfg(freeze="none", head_epochs=1, epochs=4, patience=1, min_delta=100.0, monitor=monitor, **mixing)
    assert head_competes(config) is competes
    result = run(data, config, run_dir=tmp_path / "run")
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    phases = [row["phase"] for row in result.history]
    if competes:    # the head's epoch stays the best; one finetune epoch without improvement stops the run
        assert (phases, summary["head_guard"], summary["stopped_early"]) == (["head", "finetune"], None, True)
    else:           # the first finetune epoch is the phase's best, the next stops it, the guard decides
        assert (phases, summary["stopped_early"]) == (["head", "finetune", "finetune"], True)
        assert (summary["head_guard"]["head_epoch"], summary["head_guard"]["finetune_epoch"]) == (1, 2)
        assert result.best_epoch == (1 if summary["head_guard"]["kept"] == "head" else 2)


def test_early_stopping_restarted_keeps_or_forgets_its_best():
    from finetune.core.metrics import EarlyStopping

    for mode, worse in (("min", 9.0), ("max", -9.0)):
        stop = EarlyStopping(patience=2, min_delta=0.0, mode=mode)
        stop.step(1.0, 1), stop.step(worse, 2)
        stop.restart()
        assert (stop.best, stop.best_epoch, stop.bad_epochs) == (1.0, 1, 0)
        stop.restart(forget_best=True)
        assert (stop.best_epoch, stop.bad_epochs, stop.improved(worse)) == (-1, 0, True)


def test_no_head_guard_and_runs_without_a_head_phase_skip_it(data, tmp_path):
    off = run(data, cfg(freeze="none", head_epochs=1, epochs=3, head_guard=False), run_dir=tmp_path / "a")
    assert json.loads((tmp_path / "a" / "summary.json").read_text())["head_guard"] is None
    assert not (tmp_path / "a" / "checkpoints" / "head.safetensors").exists()
    assert off.best_epoch >= 1
    run(data, cfg(freeze="none", head_epochs=0, epochs=2), run_dir=tmp_path / "b")
    assert json.loads((tmp_path / "b" / "summary.json").read_text())["head_guard"] is None


@pytest.mark.parametrize("epochs, head_epochs, room", [(1, 3, 0), (3, 5, 2)])
def test_head_epochs_beyond_what_epochs_leaves_are_said(data, epochs, head_epochs, room):
    """QA: --head-epochs 3 --epochs 1 ran no head phase, and --head-epochs 5 --epochs 3 two head epochs, unsaid."""
    lines: list[str] = []
    run(data, cfg(epochs=epochs, head_epochs=head_epochs, freeze="none", patience=10), log=lines.append)
    (note,) = [ln for ln in lines if "(--head-epochs)" in ln]
    assert f"--epochs {epochs} leaves room for {room} of the {head_epochs} head epoch(s)" in note
    lines.clear()
    run(data, cfg(epochs=3, head_epochs=2, freeze="none"), log=lines.append)    # room for both: nothing said
    assert not [ln for ln in lines if "(--head-epochs)" in ln]


def test_a_warm_up_epochs_line_says_where_its_lr_went(data, tmp_path):
    """helper-99: the epoch line gives the LR of the epoch's first step, so the finetune phase's warm-up epoch read
    `lr 3.12e-05` while it rose to 1e-3. It now says `lr 3.12e-05 -> 0.001 (warm-up)`; the other epochs, and
    metrics.csv's lr column (the first step's, as before), are unchanged."""
    lines: list[str] = []
    run(data, cfg(epochs=3, head_epochs=1, freeze="none", patience=10, lr=1e-3, warmup_epochs=-1, quiet=False),
        run_dir=tmp_path / "r", log=lines.append)
    epochs = [ln for ln in lines if ln.startswith("epoch ")]
    assert len(epochs) == 3 and "(warm-up)" not in epochs[0] and "(warm-up)" not in epochs[2]
    assert " -> 0.001 (warm-up) | " in epochs[1], epochs[1]
    with open(tmp_path / "r" / "metrics.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert "lr_to" not in rows[0] and float(rows[1]["lr"]) < 1e-3


def test_summary_names_the_phase_of_the_weights_kept(data, tmp_path):
    """QA: a bundle's card said its weights were the finetune phase's moving average (--ema) where the epoch
    kept was the head phase's; summary.json now names the phase of best_epoch (metrics.csv's row)."""
    run(data, cfg(epochs=3, freeze="none", fast_head=True, head_epochs=-1), run_dir=tmp_path / "r")
    summary = json.loads((tmp_path / "r" / "summary.json").read_text())
    with open(tmp_path / "r" / "metrics.csv", newline="") as fh:
        phase = {int(row["epoch"]): row["phase"] for row in csv.DictReader(fh)}
    assert set(phase.values()) == {"head", "finetune"}
    assert summary["best_phase"] == phase[summary["best_epoch"]]


def test_a_validation_image_that_failed_in_the_first_pass_counts_again_once_it_loads(tmp_path):
    """Validation's batches are kept after its first full pass (``finetune.data.replay``); a first pass that
    lost an image (here moved away during epoch 1, back after it) was kept all the same, and that image was
    left out of every later epoch, of the head guard's and of the final evaluation (whose per-image
    probabilities then went missing). Such a pass is not kept: epoch 2 reads the files again, with the
    numbers of an undisturbed run."""
    train, val = sets(tmp_path / "data")
    path = val.items[0][0]
    os.rename(path, path + ".away")

    def back(row: dict) -> None:
        if row["epoch"] == 1:
            os.rename(path + ".away", path)

    result = run((train, val), cfg(epochs=2, freeze="none"), callbacks=[back])
    undisturbed = run(sets(tmp_path / "data2"), cfg(epochs=2, freeze="none"))
    assert result.history[0]["val_loss"] != undisturbed.history[0]["val_loss"]      # epoch 1 lacked it
    assert result.history[1]["val_loss"] == undisturbed.history[1]["val_loss"]
    assert result.val_probs is not None and len(result.val_probs) == len(val.items)


def test_a_run_begun_before_the_mlp_heads_fixed_bias_resumes_as_it_began(data, tmp_path, monkeypatch):
    """helper-100: since MLPHead.FIXED (98edbe1) fc1.bias is out of the optimizer, and the resume of a --head mlp
    run begun before it, interrupted mid-phase, ended in torch's ValueError ("loaded state dict contains a parameter
    group that doesn't match the size of optimizer's group"): its optimizer state holds the bias. Each checkpoint
    now records the parameters its head holds fixed, and a run goes on under its own rule (an older one trains
    fc1.bias to its end): its resume is exact; a new run's bias stays zero through a resume."""
    from finetune.core.checkpoint import load_checkpoint, save_checkpoint
    from finetune.core.surgery import MLPHead

    config = cfg(epochs=3, freeze="none", head="mlp", mlp_hidden=8, optimizer="adam")
    stop = [lambda row: (_ for _ in ()).throw(KeyboardInterrupt()) if row["epoch"] == 1 else None]
    with monkeypatch.context() as old:
        old.setattr(MLPHead, "FIXED", ())       # the code before 98edbe1
        whole = run(data, config, run_dir=tmp_path / "whole")
        with pytest.raises(Interrupted):
            run(data, config, run_dir=tmp_path / "old", callbacks=stop)
    ckpt = load_checkpoint(tmp_path / "old" / LAST)
    assert ckpt.pop("head_fixed", []) == [] and ckpt["optimizer"] is not None
    save_checkpoint(tmp_path / "old" / LAST, ckpt)      # as that version wrote it: no key
    resumed = run(data, config, run_dir=tmp_path / "old", resume=True)
    assert all(torch.equal(a, b) for a, b in zip(snapshot(resumed.model).values(), snapshot(whole.model).values()))
    assert torch.count_nonzero(resumed.model.fc.fc1.bias) > 0
    with pytest.raises(Interrupted):
        run(data, config, run_dir=tmp_path / "new", callbacks=stop)
    assert load_checkpoint(tmp_path / "new" / LAST)["head_fixed"] == ["fc1.bias"]
    again = run(data, config, run_dir=tmp_path / "new", resume=True)
    assert torch.count_nonzero(again.model.fc.fc1.bias) == 0 and not again.model.fc.fc1.bias.requires_grad
