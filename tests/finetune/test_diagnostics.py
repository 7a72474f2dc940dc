"""Diagnostics: curves, advice, TensorBoard, LR range test, overfit check."""
from __future__ import annotations

import math
import sys
import time
import types

import pytest

from finetune.diagnostics import ADVICE_THRESHOLDS, AdviceThresholds, TensorBoardLogger, advise, write_curves
from finetune.errors import ConfigError


def _rows(train_loss, val_loss, train_acc, val_acc, lr=1e-3, phases=None):
    phases = phases or ["finetune"] * len(train_loss)
    return [{"epoch": i + 1, "phase": phases[i], "train_loss": tl, "val_loss": vl, "train_acc": ta,
             "val_acc": va, "lr": lr * (0.8 ** i), "seconds": 1.0, "images_per_s": 100.0}
            for i, (tl, vl, ta, va) in enumerate(zip(train_loss, val_loss, train_acc, val_acc))]


HEALTHY = _rows([1.0, 0.7, 0.5, 0.4, 0.35], [1.0, 0.75, 0.58, 0.5, 0.47],
                [0.5, 0.7, 0.82, 0.88, 0.9], [0.5, 0.68, 0.78, 0.83, 0.85])


# ---- advice ------------------------------------------------------------------------------------------
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


def test_write_curves_is_fast_and_robust(tmp_path):
    out = tmp_path / "curves.png"
    write_curves(HEALTHY[:1], out, best_epoch=1)  # warm-up: matplotlib's first import is slow
    _png_ok(out)
    nan_rows = _rows([1.0, float("nan"), float("inf")], [None, 1.0, float("nan")], [0.5, None, 0.6],
                     [0.4, 0.5, float("nan")])
    t0 = time.perf_counter()
    write_curves(nan_rows, out)
    assert time.perf_counter() - t0 < 0.5
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
