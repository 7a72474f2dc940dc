"""scripts/bench_predict.py in a few images: every thread count decodes and predicts every image."""
from __future__ import annotations

import re
import sys

from tests.conftest import load_script


def test_bench_predict_times_each_thread_count_on_every_image(monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["bench_predict.py", "--images", "3", "--rounds", "1", "--threads", "0,2",
                                      "--model", "timm:test_resnet"])
    load_script("bench_predict").main()
    out = capsys.readouterr().out
    rows = re.findall(r"^\| (decode only|predict_probs timm:test_resnet on cpu), (\d) thread\(s\) \| \d+ \|", out, re.M)
    assert sorted(rows) == sorted([(w, t) for w in ("decode only", "predict_probs timm:test_resnet on cpu")
                                   for t in ("0", "2")])
