"""Reliability (issue 8): kill -9, Ctrl-C, SIGTERM and a full disk never lose a completed epoch.

``zoo finetune`` runs as a subprocess through this file (``python -m tests.test_reliability_crash drive
ARGS...`` = ``zoo ARGS...`` plus an optional test hook that pauses half-way through writing last.pt, so a
kill can land there). Determinism: CPU, ``--workers 0``, one thread; ``finetune.engine`` seeds each epoch
from (seed, epoch), so a resumed run must end with the same weights, bit for bit, as an uninterrupted one.
"""
from __future__ import annotations

import errno
import json
import os
import queue
import random
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from tests.test_reliability_data import register_tiny
from tests.conftest import forbid_model_builds, unwritable_parent
from tests.zoo.conftest import hub  # noqa: F401  (the loopback Hub fixture)

ROOT = Path(__file__).resolve().parents[1]
EPOCHS = 10
SLOW_CKPT_ENV = "ZOO_TEST_SLOW_CHECKPOINT"   # seconds the driver pauses half-way through writing last.pt
SLOW_EPOCH_ENV = "ZOO_TEST_SLOW_EPOCH"   # seconds the driver adds to each training epoch, so that a signal
                                         # sent after "epoch N" lands before the run is over on a fast machine
HOLD_ENV = "ZOO_TEST_HOLD_FILE"          # while this file exists, each training epoch waits at its end
TRAIN = ["--epochs", str(EPOCHS), "--batch-size", "4", "--workers", "0", "--device", "cpu", "--freeze", "2",
         "--head-epochs", "2", "--patience", "100", "--no-fast-head", "--seed", "3", "--no-export"]


# ----------------------------------------------------------------------------------------- the driver
def _slow_checkpoint_writes(seconds: float) -> None:
    """Make every write of last.pt stop half-way for ``seconds`` (the temp file exists, half written)."""
    import finetune.core.checkpoint as ckpt

    real = ckpt.atomic_write

    def slow(path, write):
        def half_then_rest(tmp):
            write(tmp)
            data = Path(tmp).read_bytes()
            Path(tmp).write_bytes(data[: len(data) // 2])
            print(f"CHECKPOINT-HALF {tmp}", file=sys.stderr, flush=True)
            time.sleep(seconds)
            Path(tmp).write_bytes(data)
        real(path, half_then_rest if Path(path).name == "last.pt" else write)

    ckpt.atomic_write = slow


def _slow_epochs(seconds: float = 0.0, hold: str | None = None) -> None:
    """Make each training epoch last ``seconds`` longer (after its steps, before its checkpoint), and
    each epoch after the first wait to start while the file ``hold`` exists (the first epoch's line is
    out by then): a test decides when the run may go on, whatever the machine's speed."""
    import finetune.engine.epoch_steps as loop

    real = loop.train_one_epoch
    calls = [0]

    def slow(*args, **kwargs):
        calls[0] += 1
        while hold and calls[0] > 1 and Path(hold).exists():
            time.sleep(0.05)
        out = real(*args, **kwargs)
        time.sleep(seconds)
        return out

    loop.train_one_epoch = slow


def drive(argv: list[str]) -> None:
    """``zoo ARGV`` (the real CLI entry point), one thread, with the optional slow-checkpoint hook."""
    import torch

    from zoo.cli import cli

    torch.set_num_threads(1)
    if os.environ.get(SLOW_CKPT_ENV):
        _slow_checkpoint_writes(float(os.environ[SLOW_CKPT_ENV]))
    if os.environ.get(SLOW_EPOCH_ENV) or os.environ.get(HOLD_ENV):
        _slow_epochs(float(os.environ.get(SLOW_EPOCH_ENV) or 0.0), os.environ.get(HOLD_ENV))
    cli.main(args=argv, prog_name="zoo")


def finetune_args(model: str, data: Path, run: Path, *extra: str) -> list[str]:
    return ["finetune", model, "--data", str(data), "--out", str(run), *TRAIN, *extra]


def invoke(args: list[str]):
    """The CLI in this process (one thread, like the subprocesses)."""
    import torch
    from click.testing import CliRunner

    from zoo.cli import cli

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return CliRunner().invoke(cli, [str(a) for a in args])
    finally:
        torch.set_num_threads(threads)


# ------------------------------------------------------------------------------------------ helpers
class Proc:
    """The driver as a subprocess whose stderr lines are readable while it runs."""

    def __init__(self, args: list[str], env: dict | None = None):
        cmd = [sys.executable, "-m", "tests.test_reliability_crash", "drive", *map(str, args)]
        full_env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", **(env or {}))
        full_env.pop("ZOO_DEBUG", None)
        self.p = subprocess.Popen(cmd, cwd=ROOT, env=full_env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                  text=True, errors="replace")
        self.lines: list[str] = []
        self.q: queue.Queue = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.p.stdout:
            self.lines.append(line.rstrip("\n"))
            self.q.put(line)
        self.q.put(None)

    def wait_for(self, needle: str, timeout: float = 60) -> str | None:
        """Block until a line containing ``needle`` arrives; None when the process ended first."""
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            try:
                line = self.q.get(timeout=0.05)
            except queue.Empty:
                continue
            if line is None:
                return None
            if needle in line:
                return line
        raise AssertionError(f"no {needle!r} within {timeout}s; output:\n" + "\n".join(self.lines))

    def finish(self, timeout: float = 120) -> int:
        rc = self.p.wait(timeout)
        time.sleep(0.05)
        return rc

    def output(self) -> str:
        return "\n".join(self.lines)


def saved_epoch(run: Path) -> int:
    import torch

    return int(torch.load(run / "checkpoints" / "last.pt", weights_only=True, map_location="cpu")["epoch"])


def final_state(run: Path) -> tuple[dict, dict, list]:
    import csv

    import torch
    from safetensors.torch import load_file

    last = torch.load(run / "checkpoints" / "last.pt", weights_only=True, map_location="cpu")
    best = load_file(str(run / "checkpoints" / "best.safetensors"))
    with open(run / "metrics.csv", encoding="utf-8") as fh:
        rows = [{k: v for k, v in r.items() if k not in ("seconds", "images_per_s", "data_wait")}
                for r in csv.DictReader(fh)]
    return last["model"], best, rows


def assert_same_tensors(a: dict, b: dict) -> None:
    import torch

    assert a.keys() == b.keys()
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert not different, f"{len(different)} tensors differ, e.g. {different[:3]}"


@pytest.fixture
def data(tmp_path) -> Path:
    from tests.conftest import make_image_folder

    return make_image_folder(tmp_path / "data", classes=("a", "b"), per_class=8, size=32)


@pytest.fixture
def tiny(tmp_path, monkeypatch) -> str:
    return register_tiny(tmp_path, monkeypatch)


# ------------------------------------------------------------------------------------------ the tests
def test_kills_and_signals_then_resume_equals_uninterrupted_run(data, tiny, tmp_path):
    """kill -9 at a seeded random moment, kill -9 half-way through writing last.pt, then SIGTERM and
    SIGINT: each time the run resumes from its last completed epoch, and the end result equals an
    uninterrupted run bit for bit (weights, best weights, every metric)."""
    rng = random.Random(8)
    ref_run, run = tmp_path / "ref", tmp_path / "run"

    # 1: SIGKILL at a random moment of an epoch (or of its checkpoint).
    first = Proc(finetune_args(tiny, data, run), env={SLOW_EPOCH_ENV: "0.2"})
    assert first.wait_for(f"epoch 1/{EPOCHS}") is not None, first.output()
    time.sleep(rng.uniform(0.0, 0.15))
    first.p.send_signal(signal.SIGKILL)
    assert first.finish() == -signal.SIGKILL
    done = saved_epoch(run)                  # loads with weights_only: never a half-written last.pt
    assert done >= 0                         # the kill may land before epoch 1 was saved: then epoch 0 is

    # 2: SIGKILL while last.pt is being written: the temp file is half there, last.pt is the previous one.
    second = Proc(["finetune", "--resume", run, "--no-export"], env={SLOW_CKPT_ENV: "5"})
    assert second.wait_for(f"resuming {run} after epoch {done}") is not None, second.output()
    assert second.wait_for("CHECKPOINT-HALF") is not None, second.output()
    second.p.send_signal(signal.SIGKILL)
    assert second.finish() == -signal.SIGKILL
    assert list((run / "checkpoints").glob(".last.pt.*.tmp")), "the kill was meant to land during the write"
    assert saved_epoch(run) == done          # the epoch being saved is lost, the one before is not

    # 3-4: SIGTERM and SIGINT save and exit 130 with the resume command, no traceback.
    for sig in (signal.SIGTERM, signal.SIGINT):
        proc = Proc(["finetune", "--resume", run, "--no-export"], env={SLOW_EPOCH_ENV: "0.5"})
        assert proc.wait_for(f"epoch {saved_epoch(run) + 1}/{EPOCHS}") is not None, proc.output()
        time.sleep(rng.uniform(0.0, 0.1))
        proc.p.send_signal(sig)
        assert proc.finish() == 130, proc.output()
        out = proc.output()
        assert "Traceback" not in out
        errors = [ln for ln in out.splitlines() if ln.startswith("zoo: error:")]
        assert len(errors) == 1 and f"zoo finetune --resume {run}" in errors[0], out
        saved = saved_epoch(run)      # (QA: "epochs up to 0 are saved" before the first one had ended)
        assert (f"epochs up to {saved} are saved" if saved else "before the first epoch ended") in errors[0]
    assert saved_epoch(run) < EPOCHS

    # 5: the last resume (in this process: no interpreter start-up) completes the run; so does a reference
    # run that was never interrupted.
    res = invoke(["finetune", "--resume", run, "--no-export"])
    assert res.exit_code == 0, res.output
    res = invoke(finetune_args(tiny, data, ref_run))
    assert res.exit_code == 0, res.output
    assert (run / "summary.json").is_file()

    ref_last, ref_best, ref_rows = final_state(ref_run)
    got_last, got_best, got_rows = final_state(run)
    assert got_rows == ref_rows and len(ref_rows) == EPOCHS
    assert_same_tensors(got_last, ref_last)
    assert_same_tensors(got_best, ref_best)


def test_resume_of_a_run_killed_before_its_first_checkpoint_says_start_again(tmp_path):
    from finetune.core.checkpoint import load_checkpoint
    from finetune.core.errors import CheckpointError

    with pytest.raises(CheckpointError, match="start it again without --resume"):
        load_checkpoint(tmp_path / "run" / "checkpoints" / "last.pt")


def test_ctrl_c_between_the_last_checkpoint_and_summary_json_is_finished_by_the_resume(data, tiny, tmp_path,
                                                                                       monkeypatch):
    """last.pt says "finished" once the last epoch is saved; the head guard and summary.json come after it.
    Ctrl-C (or a kill) there left a run that `--resume` called finished ("resuming it trains nothing ... it
    has no bundle yet"): no summary.json, no bundle, no report.html, the head guard never run, and the Ctrl-C
    said `zoo: interrupted` alone (fuzz of helper-98). Now the line says how to continue, and the resume
    trains nothing but writes the end: the same files as a run never interrupted."""
    import finetune.engine.runfolder as runfolder
    from safetensors.torch import load_file

    args = ["--epochs", "2", "--batch-size", "4", "--workers", "0", "--device", "cpu", "--seed", "3"]
    ref, run = tmp_path / "ref", tmp_path / "run"
    assert invoke(["finetune", tiny, "--data", data, "--out", ref, *args]).exit_code == 0
    real = runfolder.RunFolder.summary

    def ctrl_c(self, summary):
        raise KeyboardInterrupt
    monkeypatch.setattr(runfolder.RunFolder, "summary", ctrl_c)
    res = invoke(["finetune", tiny, "--data", data, "--out", run, *args])
    assert res.exit_code == 130 and "Traceback" not in res.output, res.output
    error = res.output.strip().splitlines()[-1]
    assert error.startswith("zoo: error: interrupted: epochs up to") and f"zoo finetune --resume {run}" in error
    assert not (run / "summary.json").exists() and not (run / "export").exists()

    monkeypatch.setattr(runfolder.RunFolder, "summary", real)
    res = invoke(["finetune", "--resume", run])
    assert res.exit_code == 0, res.output
    assert "finished after epoch" not in res.output and "--epochs" not in res.output      # (not given)
    assert "note: the training of this run had finished (after epoch 1), not its end" in res.output
    for name in ("summary.json", "report.html", "export/model.safetensors"):
        assert (run / name).is_file(), name
    want, got = (json.loads((r / "summary.json").read_text()) for r in (ref, run))
    assert {k: got[k] for k in ("best_epoch", "epochs_run", "phases", "head_guard")} == \
        {k: want[k] for k in ("best_epoch", "epochs_run", "phases", "head_guard")}
    assert_same_tensors(load_file(str(run / "checkpoints" / "best.safetensors")),
                        load_file(str(ref / "checkpoints" / "best.safetensors")))
    assert_same_tensors(load_file(str(run / "export" / "model.safetensors")),
                        load_file(str(ref / "export" / "model.safetensors")))
    # resumed again, the run is finished now: its files stay as they are
    res = invoke(["finetune", "--resume", run])
    assert res.exit_code == 0 and "finished after epoch" in res.output, res.output


@pytest.mark.parametrize("writer", ["this", "earlier"])
def test_a_run_stopped_after_the_head_guard_kept_the_head_resumes_to_the_same_verdict(tiny, tmp_path, monkeypatch,
                                                                                      writer):
    """The head guard puts the head's weights into best.safetensors (the finetuned best's are gone), then
    summary.json is written. Stopped in between, the resume judged again best.safetensors (the head) against
    the head, found no difference, kept "the finetuned weights" and wrote a summary naming the finetune epoch
    over the head's weights (fuzz of helper-98). Now the verdict travels in best.safetensors' metadata.
    Stand-ins: every epoch improves (so the finetuned best is another epoch than the head's), and the
    judge finds the head significantly better whenever the two evaluations differ (the data rarely says so;
    on equal evaluations it is the real judge).
    writer "earlier" (helper-100): best.safetensors as a version before the verdict's key wrote it (its metadata
    says "monitor": "head guard" alone); its resume judged the head against itself again, as above: now the
    head stays, the test's figures not recorded (summary.json's head_guard says so)."""
    from dataclasses import replace

    import torch
    from safetensors.torch import load_file

    import finetune.core.metrics as metrics
    import finetune.engine.guard as guard
    import finetune.engine.runfolder as runfolder
    from tests.conftest import make_image_folder

    data = make_image_folder(tmp_path / "data", classes=("a", "b"), per_class=25, size=32)
    args = ["--epochs", "3", "--batch-size", "8", "--workers", "0", "--device", "cpu", "--seed", "3", "--freeze",
            "none", "--head-epochs", "1", "--val-split", "0.4", "--no-export"]     # 10 val images a class: the
    real_judge = guard.judge                                                        # head must prove itself

    def head_better(a, b, **kw):
        verdict = real_judge(a, b, **kw)
        same = a.losses is not None and b.losses is not None and torch.equal(a.losses, b.losses)
        return verdict if verdict is None or same else replace(verdict, kept="finetune")
    monkeypatch.setattr(guard, "judge", head_better)
    monkeypatch.setattr(metrics.EarlyStopping, "improved", lambda self, value: True)
    ref, run = tmp_path / "ref", tmp_path / "run"
    assert invoke(["finetune", tiny, "--data", data, "--out", ref, *args]).exit_code == 0
    want = json.loads((ref / "summary.json").read_text())
    assert want["head_guard"]["kept"] == "head" and want["best_epoch"] == 1

    real = runfolder.RunFolder.summary

    def ctrl_c(self, summary):
        raise KeyboardInterrupt
    monkeypatch.setattr(runfolder.RunFolder, "summary", ctrl_c)
    assert invoke(["finetune", tiny, "--data", data, "--out", run, *args]).exit_code == 130
    monkeypatch.setattr(runfolder.RunFolder, "summary", real)
    best = run / "checkpoints" / "best.safetensors"
    if writer == "earlier":
        from finetune.core.checkpoint import DIGEST_KEY, save_weights
        from finetune.core.io import read_safetensors_header

        meta = read_safetensors_header(best)["__metadata__"]
        assert meta["monitor"] == "head guard"
        save_weights(best, load_file(str(best)), {k: v for k, v in meta.items() if k not in (guard.VERDICT_KEY,
                                                                                              DIGEST_KEY)})
    res = invoke(["finetune", "--resume", run])
    assert res.exit_code == 0, res.output
    assert "head guard: the head of epoch 1 is kept, as decided before the interruption" in res.output
    got = json.loads((run / "summary.json").read_text())
    if writer == "earlier":     # (its value evaluated again, through the network: equal up to float rounding)
        assert got["head_guard"].pop("value") == got["best_value"] == pytest.approx(want["best_value"], rel=1e-4)
        want["head_guard"] = {"kept": "head", "head_epoch": 1, "recorded": False}
    assert (got["best_epoch"], got["head_guard"]) == (want["best_epoch"], want["head_guard"])
    assert_same_tensors(load_file(str(run / "checkpoints" / "best.safetensors")),
                        load_file(str(ref / "checkpoints" / "best.safetensors")))


# ------------------------------------------------------------------------------------- a full disk
def _enospc_after_half(monkeypatch, module, only: str | None = None, skip: int = 0) -> dict:
    """``module.atomic_write`` writes half the bytes, then the disk is full (OSError ENOSPC).

    ``only``: just for files of that name; ``skip``: that many writes succeed first. Returns a dict with
    the temp files tried and the bytes the final file held when the disk filled up.
    """
    import finetune.core.io

    real = finetune.core.io.atomic_write
    seen = {"temps": [], "before": None, "calls": 0}

    def full(path, write):
        if only and Path(path).name != only:
            return real(path, write)
        seen["calls"] += 1
        if seen["calls"] <= skip:
            return real(path, write)

        def half(tmp):
            seen["temps"].append(tmp)
            seen["before"] = Path(path).read_bytes() if Path(path).exists() else None
            write(tmp)
            data = Path(tmp).read_bytes()
            Path(tmp).write_bytes(data[: len(data) // 2])
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(path, half)

    monkeypatch.setattr(module, "atomic_write", full)
    return seen


def test_disk_full_while_checkpointing_keeps_previous_checkpoint(data, tiny, tmp_path, monkeypatch):
    import finetune.core.checkpoint

    run = tmp_path / "run"
    # last.pt writes: before epoch 1, after epoch 1, after epoch 2 <- the disk is full here
    seen = _enospc_after_half(monkeypatch, finetune.core.checkpoint, only="last.pt", skip=2)
    res = invoke(finetune_args(tiny, data, run, "--epochs", "3"))
    assert res.exit_code == 1, res.output
    assert "Traceback" not in res.output
    error, = [ln for ln in res.output.strip().splitlines() if ln.startswith("zoo: error:")]
    assert "No space left on device" in error and str(run / "checkpoints" / "last.pt") in error
    assert "free some disk space" in error and "--out" in error
    assert seen["temps"] and not any(Path(t).exists() for t in seen["temps"])   # no partial file anywhere
    assert not list((run / "checkpoints").glob(".*.tmp"))
    assert (run / "checkpoints" / "last.pt").read_bytes() == seen["before"]     # the previous one intact
    assert saved_epoch(run) == 1


def test_disk_full_while_exporting_leaves_no_partial_bundle(tmp_path, monkeypatch):
    import zoo.bundle.export
    from tests.zoo.test_bundle import make_run

    run, _ = make_run(tmp_path)
    out = tmp_path / "bundle"
    seen = _enospc_after_half(monkeypatch, zoo.bundle.export)
    from click.testing import CliRunner

    from zoo.cli import cli

    res = CliRunner().invoke(cli, ["export", str(run), "--out", str(out)])
    assert res.exit_code == 1, res.output
    assert "Traceback" not in res.output
    error, = [ln for ln in res.output.strip().splitlines() if ln.startswith("zoo: error:")]
    assert "no space left on device" in error.lower() and str(out) in error
    assert seen["temps"] and not any(Path(t).exists() for t in seen["temps"])
    assert not (out / "model.safetensors").exists()


def _file_size_limit(limit: int):
    def set_limit() -> None:
        import resource

        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    return set_limit


def test_real_writers_on_a_full_disk_say_so_in_one_line(data, tiny, tmp_path):
    """The two tests above raise the OSError themselves; the real writers do not: torch.save turns a failed
    write into RuntimeError("unexpected pos ..."), safetensors into SafetensorError("... (os error 27)").
    A file-size limit makes them fail for real, root-proof (Python ignores SIGXFSZ, so a write past the
    limit fails with EFBIG, as one on a full disk fails with ENOSPC)."""
    done = tmp_path / "done"
    assert invoke(finetune_args(tiny, data, done, "--epochs", "1")).exit_code == 0   # weights cached too
    limit = 300_000                       # the run's JSON and YAML files fit; a checkpoint (~1.5 MB) does not
    assert (done / "checkpoints" / "last.pt").stat().st_size > limit
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env.pop("ZOO_DEBUG", None)
    run, bundle = tmp_path / "run", tmp_path / "bundle"
    for args, target in ((finetune_args(tiny, data, run, "--epochs", "1"), run / "checkpoints" / "last.pt"),
                         (["export", str(done), "--out", str(bundle)], bundle / "model.safetensors")):
        res = subprocess.run([sys.executable, "-m", "zoo", *args], cwd=ROOT, env=env, capture_output=True,
                             text=True, errors="replace", timeout=300, preexec_fn=_file_size_limit(limit))
        assert res.returncode == 1, res.stderr
        assert "Traceback" not in res.stderr, res.stderr
        error, = [ln for ln in res.stderr.splitlines() if ln.startswith("zoo: error:")]
        assert str(target) in error and "File too large" in error, error
        assert not target.exists() and not list(target.parent.glob(".*.tmp"))    # nothing half written


# --------------------------------------------------------------------------- unwritable destinations
def test_unwritable_zoo_home_is_one_clear_line_before_any_work(tmp_path, monkeypatch, hub):
    """ZOO_HOME below a regular file (NotADirectory): chmod 0o555 does not stop root, which runs these
    tests, so the honest root-proof way to get an unwritable cache is a path that cannot be a folder."""
    from click.testing import CliRunner

    from tests.zoo.conftest import entry_dict, tensor_bytes, write_registry
    from zoo.cli import cli

    data = tensor_bytes()
    import hashlib

    commit = hub.add_hf("timm/tiny.rel", "model.safetensors", data)
    write_registry(tmp_path / "reg.yaml", [entry_dict("tiny-rel", [{
        "kind": "hf", "repo": "timm/tiny.rel", "revision": commit, "filename": "model.safetensors",
        "sha256": hashlib.sha256(data).hexdigest()}])])
    monkeypatch.setenv("ZOO_REGISTRY", str(tmp_path / "reg.yaml"))
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    monkeypatch.setenv("ZOO_HOME", str(blocker / "zoo"))
    res = CliRunner().invoke(cli, ["pull", "tiny-rel", "--quiet"])
    assert res.exit_code == 1 and "Traceback" not in res.output
    line, = res.output.strip().splitlines()
    assert line.startswith("zoo: error: cannot create") and "set ZOO_HOME to a writable folder" in line
    assert hub.count("/resolve/", "GET") == 0                      # refused before downloading anything


@pytest.mark.parametrize("how", ["under_a_file", "no_write_permission"])
def test_unwritable_output_folder_is_one_clear_line_before_any_work(data, tiny, tmp_path, monkeypatch, how):
    """--out below a regular file, or in a folder without write permission. Tests run as root, where
    chmod 0o555 does not stop writes, so the permission case makes os.access answer as it would for an
    ordinary user on a read-only folder (the check zoo.jobs.finetune does before building anything)."""
    forbid_model_builds(monkeypatch, "a model was built before the output folder was checked")
    parent = unwritable_parent(tmp_path, monkeypatch, how)
    res = invoke(finetune_args(tiny, data, parent / "run"))
    assert res.exit_code == 2 and "Traceback" not in res.output, res.output
    error, = [ln for ln in res.output.strip().splitlines() if ln.startswith("zoo: error:")]
    assert f"cannot write the run folder {parent / 'run'}" in error and "choose another --out" in error
    assert not (parent / "run").exists() if how != "under_a_file" else True


if __name__ == "__main__":
    if sys.argv[1:2] == ["drive"]:
        drive(sys.argv[2:])
