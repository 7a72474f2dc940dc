"""scripts/bench_gpu_e2e.py (the GPU checks' whole-process table) in its CPU smoke mode: every section
runs, every run ends, the table has its rows (so the one GPU call a session gets does not fail on a typo)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_gpu_e2e_script_smoke_on_cpu(tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    proc = subprocess.run([sys.executable, "scripts/bench_gpu_e2e.py", "--device", "cpu", "--tiny", "--out",
                           str(tmp_path / "out")], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads((tmp_path / "out" / "results.json").read_text())
    assert res["exit"]["code"] == 0 and res["exit"]["exit_lag"] >= 0
    assert [s["code"] for s in res["small"]] == [0]
    assert [b["name"] for b in res["big"]] == ["zoo, --decode workers", "zoo, --decode device",
                                               "zoo, --decode device, workers decode half the JPEGs"]
    assert all(b["code"] == 0 and len(b["epochs"]) == 2 for b in res["big"])
    table = (tmp_path / "out" / "table.md").read_text()
    assert table.count("\n| ") >= 6 and "exit" in table and "step ceiling" in table


def test_gpu_e2e_profile_section_smoke_on_cpu(tmp_path):
    """The opt-in profile section (gpu_checks.sh --profile): the run ends and profile.txt names the functions."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    proc = subprocess.run([sys.executable, "scripts/bench_gpu_e2e.py", "--device", "cpu", "--tiny", "--only", "profile",
                           "--out", str(tmp_path / "out")], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads((tmp_path / "out" / "results.json").read_text())
    assert [b["code"] for b in res["big"]] == [0] and len(res["big"][0]["epochs"]) == 2
    text = (tmp_path / "out" / "profile.txt").read_text()
    assert "train_one_epoch" in text and "tottime" in text


def test_gpu_parts_script_smoke_on_cpu(tmp_path):
    """scripts/bench_gpu_parts.py (gpu_checks.sh --parts: each part of an epoch alone) in its CPU smoke mode."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    proc = subprocess.run([sys.executable, "scripts/bench_gpu_parts.py", "--device", "cpu", "--tiny", "--out",
                           str(tmp_path / "out")], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = json.loads((tmp_path / "out" / "results.json").read_text())["rows"]
    assert len(rows) == 11 and all(r["img_s"] > 0 for r in rows)
    assert sum("worker share" in r["name"] for r in rows) == 3
    assert (tmp_path / "out" / "table.md").read_text().count("\n| ") == 11
