"""scripts/bench_label_issues.py on a tiny folder: the doctor's features, flipped labels, a row per rate and L2."""
from __future__ import annotations

import re
import sys

import numpy as np

from tests.conftest import load_script, make_image_folder, register_tiny


def test_flip_labels_moves_each_flipped_image_to_another_class():
    bench = load_script("bench_label_issues")
    y = np.repeat(np.arange(4), 50)
    noisy, flipped = bench.flip_labels(y, 4, 0.2, seed=0)
    assert flipped.any() and (noisy[flipped] != y[flipped]).all() and (noisy[~flipped] == y[~flipped]).all()
    again, same = bench.flip_labels(y, 4, 0.2, seed=0)
    assert (again == noisy).all() and (same == flipped).all()


def test_bench_label_issues_scores_the_doctor_flags_per_rate_and_l2(tmp_path, monkeypatch, capsys):
    model = register_tiny(tmp_path, monkeypatch)
    data = make_image_folder(tmp_path / "data", per_class=8, size=32)
    monkeypatch.setattr(sys, "argv", ["bench_label_issues.py", "--data", str(data), "--model", model,
                                      "--rates", "0,0.2", "--seeds", "1", "--l2", "auto,0.001"])
    load_script("bench_label_issues").main()
    out = capsys.readouterr().out
    share = r"[01]\.\d{3}"
    rows = re.findall(rf"^\| (\d+)% \| (auto|0\.001) \| {share} \| {share} \| {share} \| (\d+)\.0 \((\d+)\.0\)", out, re.M)
    assert [(r, l2) for r, l2, *_ in rows] == [("0", "auto"), ("0", "0.001"), ("20", "auto"), ("20", "0.001")]
    images = int(re.search(r"\((\d+) images, 3 classes\)", out).group(1))
    assert all(int(flagged) <= images for *_, flagged, _ in rows)
    assert [int(flips) for *_, flips in rows][:2] == [0, 0]
