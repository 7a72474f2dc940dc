"""``zoo finetune --workers 1`` with worker processes started as macOS and Windows start them (spawn), and as Python
3.14 does on Linux (forkserver, its server preloaded by zoo): the same numbers as with fork; ``zoo doctor
--workers 1`` the same findings under spawn. (``zoo predict`` and ``zoo eval`` decode on threads: no worker process
to spawn.)"""
from __future__ import annotations

import csv
import os
import subprocess
import sys

import pytest

from tests.conftest import make_image_folder, register_tiny

# the start method set first, as a Mac's Python has it; then the command line as the console script runs it
SCRIPT = ("import sys, multiprocessing; multiprocessing.set_start_method(sys.argv[1]); "
          "from zoo.cli import cli; cli(sys.argv[2:], prog_name='zoo')")
KEPT = ("epoch", "phase", "train_loss", "train_acc", "val_loss", "val_acc", "lr")


def zoo_under(method: str, home, *args) -> subprocess.CompletedProcess:
    env = {**os.environ, "ZOO_HOME": str(home)}       # a home each: the feature pass runs under each method
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    return subprocess.run([sys.executable, "-c", SCRIPT, method, *map(str, args)], cwd=root, env=env,
                          capture_output=True, text=True, timeout=600)


def metrics(run) -> list[list[str]]:
    with open(run / "metrics.csv", newline="") as fh:
        return [[row[k] for k in KEPT] for row in csv.DictReader(fh)]


@pytest.mark.slow
@pytest.mark.parametrize("freeze", ["head", "none"])
def test_zoo_finetune_with_spawned_or_forkserver_workers_trains_what_fork_trains(tmp_path, monkeypatch, freeze):
    """Head only (cached features: the feature pass's loader) and --freeze none (the training and validation
    loaders): every number of metrics.csv is the same under spawn and forkserver as under fork (the workers'
    seeds come with the loader, whoever forks the worker). About 40 s each here."""
    tiny = register_tiny(tmp_path, monkeypatch)
    data = make_image_folder(tmp_path / "data", per_class=12)
    runs = {}
    for method in ("fork", "spawn", "forkserver"):
        runs[method] = tmp_path / f"run-{method}"
        done = zoo_under(method, tmp_path / f"home-{method}", "finetune", tiny, "--data", data, "--out",
                         runs[method], "--freeze", freeze, "--epochs", "2", "--batch-size", "8", "--workers", "1",
                         "--device", "cpu", "--quiet", "--no-export")
        assert done.returncode == 0, done.stderr[-3000:]
    assert metrics(runs["spawn"]) == metrics(runs["fork"]) == metrics(runs["forkserver"])
    assert len(metrics(runs["fork"])) == (1 if freeze == "head" else 2)


@pytest.mark.slow
def test_zoo_doctor_with_a_spawned_worker_finds_what_fork_finds(tmp_path, monkeypatch):
    """The doctor's feature pass (``--workers 1``) under spawn: the same findings.csv and doctor.json (its
    timings aside) as under fork. About 25 s here."""
    import json

    tiny = register_tiny(tmp_path, monkeypatch)
    data = make_image_folder(tmp_path / "data", per_class=12)
    outs = {}
    for method in ("fork", "spawn"):
        outs[method] = tmp_path / f"doctor-{method}"
        done = zoo_under(method, tmp_path / f"home-{method}", "doctor", data, "--model", tiny, "--out", outs[method],
                         "--workers", "1", "--device", "cpu", "--quiet")
        assert done.returncode == 0, done.stderr[-3000:]
    assert (outs["spawn"] / "findings.csv").read_text() == (outs["fork"] / "findings.csv").read_text()
    found = {m: json.loads((outs[m] / "doctor.json").read_text()) for m in outs}
    for report in found.values():
        report.pop("seconds", None)
    assert found["spawn"] == found["fork"]


def session_processes(sid: int) -> list[str]:
    out = subprocess.run(["ps", "-eo", "pid,sid,args"], capture_output=True, text=True).stdout.splitlines()[1:]
    return [line for line in out if line.split()[1] == str(sid)]


@pytest.mark.slow
def test_ctrl_c_in_a_run_with_forkserver_workers_leaves_no_process(tmp_path, monkeypatch):
    """Ctrl-C (SIGINT to the process group, as a terminal sends it) while two forkserver workers run: exit 130,
    and nothing of the run's session is left (the server, its workers, the resource tracker). About 30 s here."""
    import signal
    import time

    tiny = register_tiny(tmp_path, monkeypatch)
    data = make_image_folder(tmp_path / "data", per_class=12)
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    args = ["finetune", tiny, "--data", data, "--out", tmp_path / "run", "--freeze", "none", "--epochs", "500",
            "--batch-size", "4", "--workers", "2", "--device", "cpu", "--quiet", "--no-export"]
    proc = subprocess.Popen([sys.executable, "-c", SCRIPT, "forkserver", *map(str, args)], cwd=root,
                            env={**os.environ, "ZOO_HOME": str(tmp_path / "home")}, start_new_session=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 300
        while sum("forkserver" in line for line in session_processes(proc.pid)) < 3:   # the server, 2 workers
            assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()[0][-3000:]
            time.sleep(0.2)
        os.killpg(proc.pid, signal.SIGINT)
        out = proc.communicate(timeout=120)[0]
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 130, out[-3000:]
    deadline = time.monotonic() + 10
    while session_processes(proc.pid) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert session_processes(proc.pid) == []
