"""scripts/bench_passes_ahead.py on a tiny folder: every order reads the training loader's batches to the end."""
from __future__ import annotations

import sys

from tests.conftest import load_script, make_image_folder


def test_bench_passes_ahead_reads_the_keyed_training_batches(tmp_path, monkeypatch, capsys):
    # the training batches carry each image's sample key as a third item (flip and jitter left to the
    # device): the consumer took them as (x, y) and stopped at the first batch (QA)
    data = make_image_folder(tmp_path / "data", per_class=4, val_per_class=2, layout="split")
    monkeypatch.setattr(sys, "argv", ["bench_passes_ahead.py", "--data", str(data), "--workers", "0",
                                      "--batch-size", "4", "--epochs", "2", "--rounds", "1",
                                      "--train-step", "0", "--val-step", "0"])
    assert load_script("bench_passes_ahead").main() == 0
    out = capsys.readouterr().out
    assert "round 1: ahead:" in out and "round 1: on time:" in out and "round 1: kept:" in out
    assert "ahead / on time, median of 1 rounds" in out and "kept / ahead, median of 1 rounds" in out
