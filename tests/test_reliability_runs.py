"""Reliability (issue 15): run folders never lose data.

An output folder (``--out`` of finetune, export, eval, lr-find, sweep) is used only when it is new or
empty, or holds that command's earlier output and the user said --resume / --overwrite; anything else is
refused before a byte is written. One process at a time works in a run folder (``.zoo.lock``). A closed
pipe never stops training (``RUN/log.txt`` keeps every line) and ends read-only commands quietly.
Class names are printed escaped, and drawn in confusion.png with a font that has them or escaped.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

from tests.conftest import forbid_model_builds, make_image_folder, register_tiny
from tests.test_reliability_crash import HOLD_ENV, SLOW_EPOCH_ENV, Proc

ROOT = Path(__file__).resolve().parents[1]
TRAIN = ["--epochs", "2", "--batch-size", "8", "--workers", "0", "--device", "cpu", "--freeze", "head",
         "--head-epochs", "0", "--no-fast-head", "--seed", "1"]


def invoke(*args):
    from click.testing import CliRunner

    from zoo.cli import cli

    return CliRunner().invoke(cli, [str(a) for a in args])


def error_line(res) -> str:
    lines = [ln for ln in res.output.strip().splitlines() if ln.startswith("zoo: error:")]
    assert len(lines) == 1 and "Traceback" not in res.output, res.output
    return lines[0]


def snapshot(folder: Path) -> dict[str, bytes]:
    """Every file under ``folder`` (hidden ones too) with its bytes."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture
def tiny(tmp_path, monkeypatch) -> str:
    return register_tiny(tmp_path, monkeypatch)


@pytest.fixture
def data(tmp_path) -> Path:
    return make_image_folder(tmp_path / "data", classes=("a", "b"), per_class=6)


@pytest.fixture
def user_folder(tmp_path) -> Path:
    """The issue's case: a folder of the user's with files named like a run's."""
    folder = tmp_path / "mine"
    (folder / "export").mkdir(parents=True)
    (folder / "metrics.csv").write_text("my,numbers\n1,2\n")
    (folder / "summary.json").write_text('{"mine": true}\n')
    (folder / "export" / "README.md").write_text("my notes\n")
    (folder / "config.json").write_text("{}\n")
    return folder


# ------------------------------------------------------------------------------------------ --out rule
def _command(name: str, tiny: str, data: Path, run: Path, out: Path) -> list:
    return {
        "finetune": ["finetune", tiny, "--data", data, "--out", out, *TRAIN],
        "export": ["export", run, "--out", out],
        "eval": ["eval", run / "export", "--data", data, "--out", out, "--device", "cpu"],
        "lr-find": ["lr-find", tiny, "--data", data, "--out", out, "--steps", "5", "--workers", "0",
                    "--device", "cpu"],
        "sweep": ["sweep", tiny, "--data", data, "--out", out, "--lr", "1e-3", "--epochs", "1",
                  "--workers", "0", "--device", "cpu"],
        "doctor": ["doctor", data, "--model", tiny, "--out", out, "--workers", "0", "--device", "cpu"],
    }[name]


@pytest.mark.parametrize("command", ["finetune", "export", "eval", "lr-find", "sweep", "doctor"])
def test_a_users_folder_is_refused_byte_identical(command, tiny, data, tmp_path, user_folder, monkeypatch):
    """A non-empty folder zoo did not write: refused with one line (exit 2) naming it and the options,
    before any model is built; every file byte-identical, nothing added (no marker, no lock)."""
    forbid_model_builds(monkeypatch, "work started before the output folder was checked")
    (tmp_path / "run").mkdir()      # export's RUN_DIR exists: the --out check is what refuses
    before = snapshot(user_folder)
    for extra in ([], ["--overwrite"]):     # --overwrite replaces only a folder zoo wrote
        res = invoke(*_command(command, tiny, data, tmp_path / "run", user_folder), *extra)
        assert res.exit_code == 2, res.output
        line = error_line(res)
        assert str(user_folder) in line and "not empty" in line and "--out" in line, line
        assert snapshot(user_folder) == before


def test_run_folder_rules_resume_overwrite_and_other_commands(tiny, data, tmp_path):
    """An earlier run: refused without --resume/--overwrite (also with its checkpoints deleted); another
    command's --out there is refused; --overwrite replaces only the run's files; export/eval/lr-find
    refuse their own earlier output unless --overwrite."""
    run = tmp_path / "run"
    res = invoke("finetune", tiny, "--data", data, "--out", run, *TRAIN)
    assert res.exit_code == 0, res.output
    (run / "my-notes.txt").write_text("keep me\n")
    import shutil

    shutil.rmtree(run / "checkpoints")                  # still a run folder: marker and model.json remain
    before = snapshot(run)
    res = invoke("finetune", tiny, "--data", data, "--out", run, *TRAIN)
    assert res.exit_code == 2
    line = error_line(res)
    assert f"{run} already holds a `zoo finetune` run" in line
    assert f"zoo finetune --resume {run}" in line and "--overwrite" in line and "another --out" in line
    assert snapshot(run) == before
    for cmd in ("eval", "lr-find", "sweep"):            # another command's output folder
        res = invoke(*_command(cmd, tiny, data, run, run))
        assert res.exit_code == 2 and "holds a `zoo finetune` run" in error_line(res), res.output
        assert snapshot(run) == before

    # --resume without last.pt: says what is missing (not "the run never finished an epoch")
    res = invoke("finetune", "--resume", run, "--workers", "0")
    assert res.exit_code == 1
    line = error_line(res)
    assert "checkpoints/last.pt is missing" in line and "2 finished epoch(s)" in line and "--overwrite" in line
    assert "never finished" not in line
    assert f"start the run over with `zoo finetune {tiny} --data {data} --out {run} --overwrite --config " \
           f"{run / 'config.yaml'}`" in line      # (helper-118: was MODEL --data DIR, its options unsaid)

    from tests.zoo.test_cli_export_predict_eval import pasted

    res = pasted(line, "start the run over with")      # as printed: the run's model, data and options (TRAIN's)
    assert res.exit_code == 0, res.output
    assert (run / "my-notes.txt").read_text() == "keep me\n"          # not a file a run writes
    assert (run / "checkpoints" / "last.pt").is_file() and (run / "export" / "model.safetensors").is_file()
    log = (run / "log.txt").read_text(encoding="utf-8")
    assert log.count("$ zoo finetune") == 1                           # the old run's log went with it

    for cmd in ("export", "eval"):
        out = tmp_path / f"{cmd}-out"
        assert invoke(*_command(cmd, tiny, data, run, out)).exit_code == 0
        first = snapshot(out)
        res = invoke(*_command(cmd, tiny, data, run, out))
        assert res.exit_code == 2 and f"{out} already holds" in error_line(res) and "--overwrite" in res.output
        assert snapshot(out) == first
        res = invoke(*_command(cmd, tiny, data, run, out), "--overwrite")
        assert res.exit_code == 0, res.output
    res = invoke("export", run)                      # RUN/export is the run's own bundle: replaced
    assert res.exit_code == 0, res.output


def test_a_command_that_fails_early_leaves_no_folder(tiny, data, tmp_path, monkeypatch):
    """Offline with uncached weights: the folder claimed for the run (with its log) is removed again,
    so the same command works once the network is back."""
    monkeypatch.setenv("ZOO_OFFLINE", "1")
    out = tmp_path / "deep" / "run"
    res = invoke("finetune", "resnet18", "--data", data, "--out", out, *TRAIN)
    assert res.exit_code == 1 and "offline" in error_line(res).lower()
    assert not (tmp_path / "deep").exists()


@pytest.mark.parametrize("where", ["link", "below_link"])
def test_an_out_that_is_a_dangling_symlink_is_one_line_naming_the_link(tiny, data, tmp_path, monkeypatch, where):
    """QA (helper-64): `--out LINK` (or `--out LINK/sub`), LINK a symbolic link to a folder that does not exist
    (a disk not mounted, a folder moved), ended every command with `File exists (LINK); set ZOO_DEBUG=1 for
    details`, exit 1 (finetune after its scan). Refused now with the link and its target named, exit 2,
    before any model is built; nothing is created where the link points."""
    from zoo.errors import UsageError
    from zoo.outdir import KINDS, claim_out

    link = tmp_path / "runs"
    link.symlink_to(tmp_path / "unmounted" / "runs")
    out = link if where == "link" else link / "sub"
    forbid_model_builds(monkeypatch, "a model was built before --out was checked")
    res = invoke("finetune", tiny, "--data", data, "--out", out, *TRAIN)
    line = error_line(res)
    assert res.exit_code == 2 and f"{link} is a symbolic link to {tmp_path / 'unmounted' / 'runs'}" in line, line
    assert "which does not exist" in line and "choose another --out" in line, line
    for kind in KINDS:
        with pytest.raises(UsageError, match="is a symbolic link to"), claim_out(out, kind):
            pass
    assert not (tmp_path / "unmounted").exists() and link.is_symlink()


@pytest.mark.parametrize("where", ["last", "middle"])
def test_an_out_with_a_name_too_long_for_the_file_system_is_one_line(tiny, data, tmp_path, where):
    """QA (helper-64): `--out` with a name over the file system's 255 bytes (a pasted sentence, a URL) ended
    with `File name too long (PATH); set ZOO_DEBUG=1 for details`, exit 1 (finetune after its scan). Refused
    now in one line naming the limit, exit 2, before anything is written."""
    long = "x" * 300
    out = tmp_path / long if where == "last" else tmp_path / long / "run"
    res = invoke("finetune", tiny, "--data", data, "--out", out, *TRAIN)
    line = error_line(res)
    assert res.exit_code == 2 and line.endswith(f"the name {'x' * 24}... is 300 bytes long, more than the 255 a "
                                                "name may have on this file system; choose a shorter --out"), line
    assert sorted(os.listdir(tmp_path)) == sorted(p.name for p in (data, tmp_path / "registry.yaml",
                                                                    tmp_path / "tiny32.safetensors"))


@pytest.mark.parametrize("limit", [-1, 0, 20])
def test_the_name_length_check_measures_only_new_names_and_only_against_a_stated_limit(tmp_path, monkeypatch, limit):
    """Review (h67) of the check above: a file system that states no name limit (``pathconf`` gives -1:
    POSIX's "no limit") refused every --out ("the name ... is 3 bytes long, more than the -1 a name may
    have"), and the names of folders that exist already were measured against the limit of the deepest of
    them (a long folder name on ext4 above an ecryptfs mount of 143 bytes): they exist, so they fit. Only the
    names still to be created are measured, against a limit the file system states."""
    from zoo import outdir
    from zoo.errors import UsageError

    existing = tmp_path / ("y" * 40)
    existing.mkdir()
    monkeypatch.setattr(outdir.os, "pathconf", lambda *_a: limit)
    with outdir.claim_out(existing / "run", "finetune") as mode:
        assert mode == "new"
    if limit > 0:       # a new name over a stated limit is still refused, before anything is created
        with pytest.raises(UsageError, match="is 25 bytes long, more than the 20"), \
                outdir.claim_out(existing / ("z" * 25) / "run", "finetune"):
            pass
        assert os.listdir(existing) == []


def test_an_out_beginning_with_a_quoted_tilde_is_refused_not_made_a_folder_named_tilde(tiny, data, tmp_path,
                                                                                       monkeypatch):
    """QA (h72): `--out "~/runs/a"` (quoted, or `OUT="~/runs"` in a script: the shell expands neither) made a
    folder named `~` in the current folder, which `rm -rf ~`, the obvious way to remove it, turns into the
    removal of the home folder. Refused in one line with the path meant, for every command with --out; a `~`
    folder made before is used as it is."""
    from zoo.errors import UsageError
    from zoo.outdir import KINDS, claim_out

    monkeypatch.chdir(tmp_path)
    res = invoke("finetune", tiny, "--data", data, "--out", "~/runs/a", *TRAIN)
    line = error_line(res)
    assert res.exit_code == 2 and line.endswith(
        "--out ~/runs/a begins with ~, which the shell expands only when it is not quoted, so zoo would make a "
        f"folder named ~ here: write {Path('~/runs/a').expanduser()} (or leave the ~ unquoted)"), line
    for kind in KINDS:
        with pytest.raises(UsageError, match="begins with ~"), claim_out(Path("~") / "b", kind):
            pass
    for command in (("lock", "--out", "~/zoo.lock"), ("demo", "--out", "~/demo")):
        res = invoke(*command)
        assert res.exit_code == 2 and "begins with ~, which the shell expands only" in error_line(res), res.output
    assert not (tmp_path / "~").exists()
    (tmp_path / "~").mkdir()
    with claim_out(Path("~") / "b", "export") as mode:
        assert mode == "new"


def test_a_tilde_name_no_shell_expands_is_taken_as_the_folder_name(tmp_path, monkeypatch):
    """Review (h77): `--out ./~draft` (pathlib drops the ./) and `--out ~draft` (no user draft: the shell leaves
    it as typed, quoted or not) were refused as a quoted ~, telling the user to write the full path of the very
    folder they named. Only a ~ or ~user that a shell expands is refused."""
    from zoo.errors import UsageError
    from zoo.outdir import claim_out, refuse_unexpanded_home

    monkeypatch.chdir(tmp_path)
    name = "~zoo-no-such-user-h77"
    assert os.path.expanduser(name) == name
    for out in (Path("./" + name), Path(name) / "run", Path("a/~/b")):
        refuse_unexpanded_home(out)
    with claim_out(Path(name) / "run", "eval") as mode:
        assert mode == "new"
    for out in (Path("~"), Path("~/x"), Path("~root/x")):
        if os.path.expanduser(out.parts[0]) != out.parts[0]:      # (a user root: most systems)
            with pytest.raises(UsageError, match="which the shell expands only when it is not quoted"):
                refuse_unexpanded_home(out)


def test_a_folder_to_read_beginning_with_a_quoted_tilde_names_the_folder_meant(tiny, data, tmp_path, monkeypatch):
    """Dataset-shapes audit (helper-120): `--data "~/photos"` (quoted: the shell expands no ~) was "data folder
    CWD/~/photos does not exist" (eval, doctor: click's "Directory '~/photos' does not exist"; predict: "no such
    image or folder"), where --out names the folder meant. Every folder to read (zoo.cli.options.Folder) and
    predict's images now name it too; a folder named ~ that is here is read as it is."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    shutil.copytree(data, tmp_path / "home" / "photos")
    meant = tmp_path / "home" / "photos"
    for command in (("finetune", tiny, "--data", "~/photos", *TRAIN), ("doctor", "~/photos"),
                    ("eval", tiny, "--data", "~/photos")):
        res = invoke(*command)
        assert res.exit_code == 2, res.output
        assert f"~/photos begins with ~, which the shell expands only when it is not quoted: give {meant}" in res.output
    res = invoke("predict", tiny, "~/photos")
    assert res.exit_code == 2 and error_line(res).endswith(
        f"no such image or folder: ~/photos (the ~ is expanded by the shell only when it is not quoted: give {meant})")
    shutil.copytree(data, tmp_path / "~" / "photos")         # a folder named ~ made before: read as it is
    res = invoke("doctor", "~/photos", "--model", tiny, "--device", "cpu")
    assert "begins with ~" not in res.output


def test_an_archive_or_a_file_given_for_a_folder_says_what_to_give(tiny, data, tmp_path):
    """Dataset-shapes audit (helper-120): `--data photos.zip` (the download, not yet extracted) was click's
    "Directory 'photos.zip' is a file.", which names no way on; any file given for a folder likewise."""
    archive = tmp_path / "photos.tar.gz"
    archive.write_bytes(b"\x1f\x8b" + b"\x00" * 30)
    for command in (("finetune", tiny, "--data", archive, *TRAIN), ("doctor", archive),
                    ("eval", tiny, "--data", archive)):
        res = invoke(*command)
        assert res.exit_code == 2 and (f"{archive} is a .tar.gz archive, not a folder: extract it, then give the image "
                                       "folder it holds") in res.output, res.output
    res = invoke("export", data / "a" / "a_000.png")
    assert res.exit_code == 2 and "a_000.png is a file, not a folder: give the run folder" in res.output, res.output


def test_overwrite_keeps_the_users_files_inside_the_runs_export_and_checkpoints_folders(tmp_path):
    """QA (helper-64): `zoo finetune --out RUN --overwrite` removed RUN/export and RUN/checkpoints whole, with
    the user's files in them (notes beside the bundle, a `zoo eval --out RUN/export/holdout` report), though
    --overwrite promises to remove only what the command writes. Now only zoo's files go from those two
    folders (and the temp files of writes cut short); a folder left with nothing of the user's goes too,
    and the new run's own export is still written into RUN/export."""
    from zoo.outdir import MARKER, claim_out

    def run_folder(root: Path, users: bool) -> Path:
        (root / "export").mkdir(parents=True)
        (root / "checkpoints").mkdir()
        (root / MARKER).write_text('{"kind": "finetune"}')
        (root / "export" / MARKER).write_text('{"kind": "export"}')
        for name in ("model.safetensors", "config.json", "README.md", "model.onnx"):
            (root / "export" / name).write_text("old bundle")
        for name in ("last.pt", "best.safetensors", "head.safetensors", ".last.pt.abcd1234.tmp"):
            (root / "checkpoints" / name).write_text("old run")
        (root / "metrics.csv").write_text("old")
        if users:
            (root / "export" / "holdout").mkdir()
            (root / "export" / "holdout" / "metrics.json").write_text('{"accuracy": 0.9}')
            (root / "export" / "notes.md").write_text("mine")
            (root / "checkpoints" / "mine.txt").write_text("mine")
        return root

    users, bare = run_folder(tmp_path / "users", True), run_folder(tmp_path / "bare", False)
    for root in (users, bare):
        with claim_out(root, "finetune", overwrite=True) as mode:
            assert mode == "overwrite"
    assert sorted(os.listdir(users / "export")) == [MARKER, "holdout", "notes.md"]
    assert (users / "export" / "holdout" / "metrics.json").read_text() == '{"accuracy": 0.9}'
    assert os.listdir(users / "checkpoints") == ["mine.txt"] and not (users / "metrics.csv").exists()
    assert not (bare / "export").exists() and not (bare / "checkpoints").exists()   # nothing of the user's there


# --------------------------------------------------------------------------------------------- locks
def test_a_lock_that_could_not_be_written_is_not_left_claiming_the_folder(tmp_path, monkeypatch):
    """Chaos QA (ulimit -f 0; a full disk): `.zoo.lock` was created but its content not written, and the
    failed command left it empty, so the next command, run at once, was refused for 10 s with `RUN is being
    claimed by another process; wait for it to finish` though no process was."""
    import errno

    import zoo.outdir as outdir

    real = os.fdopen

    class Full:
        def __init__(self, fd, *a, **k):
            self.fh = real(fd, *a, **k)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.fh.close()

        def write(self, _text):
            raise OSError(errno.EFBIG, "File too large")

    folder = tmp_path / "run"
    folder.mkdir()
    with monkeypatch.context() as m:
        m.setattr(outdir.os, "fdopen", Full)
        with pytest.raises(OSError, match="File too large"):
            outdir.RunLock(folder).acquire()
    assert not (folder / outdir.LOCK).exists()
    lock = outdir.RunLock(folder).acquire()      # at once, no "being claimed"
    assert lock.held
    lock.release()
    # and a command that created its --out (two levels) leaves no empty folder behind when the lock failed so
    new = tmp_path / "runs" / "new"
    with monkeypatch.context() as m:
        m.setattr(outdir.os, "fdopen", Full)
        with pytest.raises(OSError, match="File too large"), outdir.claim_out(new, "finetune"):
            pass
    assert not (tmp_path / "runs").exists()


def test_lock_refuses_a_live_holder_and_takes_over_a_dead_ones(tmp_path):
    from zoo.errors import ZooError
    from zoo.outdir import LOCK, RunLock

    folder = tmp_path / "run"
    folder.mkdir()
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        import socket

        (folder / LOCK).write_text(json.dumps({"pid": sleeper.pid, "host": socket.gethostname(),
                                               "command": "zoo finetune x", "started": "then"}))
        with pytest.raises(ZooError, match=f"in use by pid {sleeper.pid} on .*zoo finetune x"):
            RunLock(folder).acquire()
        assert json.loads((folder / LOCK).read_text())["pid"] == sleeper.pid     # untouched
    finally:
        sleeper.kill()
        sleeper.wait()
    notes: list[str] = []
    lock = RunLock(folder, "zoo finetune y").acquire(notes.append)         # the holder is dead now
    assert len(notes) == 1 and f"pid {sleeper.pid}" in notes[0] and "no longer running" in notes[0]
    assert json.loads((folder / LOCK).read_text())["pid"] == os.getpid()
    lock.release()
    assert not (folder / LOCK).exists()

    (folder / LOCK).write_text(json.dumps({"pid": 1, "host": "another-host", "command": "zoo sweep"}))
    with pytest.raises(ZooError, match="another-host.*delete"):            # cannot check a pid elsewhere
        RunLock(folder).acquire()


def test_two_runs_into_one_folder_one_is_refused_at_once(tiny, data, tmp_path):
    """Two `zoo finetune --out RUN` at once: the second is refused within seconds naming the holder;
    the first finishes and its bundle is intact."""
    run = tmp_path / "run"
    args = ["finetune", tiny, "--data", data, "--out", run, *TRAIN[:1], "4", *TRAIN[2:]]
    hold = tmp_path / "hold"
    hold.touch()                             # the first run waits after each epoch until this is gone
    first = Proc(args, env={HOLD_ENV: str(hold)})
    assert first.wait_for("epoch 1/4", timeout=120) is not None, first.output()
    holder = json.loads((run / ".zoo.lock").read_text())
    assert holder["pid"] == first.p.pid and "finetune" in holder["command"]
    second = Proc(args)
    assert second.finish(timeout=60) == 1, second.output()      # refused, without waiting for the first
    errors = [ln for ln in second.lines if ln.startswith("zoo: error:")]
    assert len(errors) == 1 and f"in use by pid {first.p.pid}" in errors[0], second.output()
    assert first.p.poll() is None            # the refusal came while the first was still training
    hold.unlink()
    assert first.finish(timeout=180) == 0, first.output()
    assert not (run / ".zoo.lock").exists()
    assert (run / "export" / "model.safetensors").is_file()
    summary = json.loads((run / "summary.json").read_text())
    assert summary["epochs_run"] == 4
    # the refused run left no trace in the log either
    assert (run / "log.txt").read_text(encoding="utf-8").count("$ zoo finetune") == 1


def test_a_stale_lock_of_a_killed_run_is_taken_over_on_resume(tiny, data, tmp_path):
    import signal

    run = tmp_path / "run"
    args = ["finetune", tiny, "--data", data, "--out", run, *TRAIN[:1], "3", *TRAIN[2:], "--no-export"]
    proc = Proc(args, env={SLOW_EPOCH_ENV: "0.5"})
    assert proc.wait_for("epoch 1/3", timeout=120) is not None, proc.output()
    proc.p.send_signal(signal.SIGKILL)
    proc.finish()
    assert json.loads((run / ".zoo.lock").read_text())["pid"] == proc.p.pid       # left behind
    res = invoke("finetune", "--resume", run, "--workers", "0", "--no-export")
    assert res.exit_code == 0, res.output
    assert f"took over the lock of {run} left by pid {proc.p.pid}" in res.stderr
    assert not (run / ".zoo.lock").exists()


def test_resuming_a_finished_run_takes_over_the_lock_of_one_killed_while_it_wrote_its_bundle(tiny, data, tmp_path):
    """A run killed (kill -9) while it wrote its bundle or page, after training: `--resume` said the run had
    finished, but left the dead process's RUN/.zoo.lock for good (`zoo export RUN` locks RUN/export, `zoo
    report` nothing), to be met by the next command (fuzz of helper-98). Now the resume takes it over and
    releases it; the run's own files stay byte-identical."""
    import socket

    run = tmp_path / "run"
    res = invoke("finetune", tiny, "--data", data, "--out", run, *TRAIN, "--no-export")
    assert res.exit_code == 0, res.output
    before = {p: p.read_bytes() for p in run.rglob("*") if p.is_file() and p.name != "log.txt"}
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (run / ".zoo.lock").write_text(json.dumps({"pid": dead.pid, "host": socket.gethostname(),
                                               "command": "zoo finetune ...", "started": "then"}))
    res = invoke("finetune", "--resume", run)
    assert res.exit_code == 0, res.output
    assert f"took over the lock of {run} left by pid {dead.pid}" in res.stderr
    assert f"{run} finished after epoch" in res.stderr
    assert not (run / ".zoo.lock").exists()
    assert {p: p.read_bytes() for p in run.rglob("*") if p.is_file() and p.name != "log.txt"} == before


# --------------------------------------------------------------------------------------------- pipes
def _zoo(args: list, lines: int, merge: bool = True, timeout: float = 240) -> tuple[int, str, list[str]]:
    """``zoo ARGS 2>&1 | head -LINES`` (merge) or ``zoo ARGS | head -LINES``: read LINES lines, close the
    pipe. Returns the exit code, what stderr said (when not merged) and the lines read."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    env.pop("ZOO_DEBUG", None)
    p = subprocess.Popen([sys.executable, "-m", "zoo", *map(str, args)], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                         stderr=subprocess.STDOUT if merge else subprocess.PIPE, text=True, errors="replace")
    got = [p.stdout.readline() for _ in range(lines)]
    p.stdout.close()
    err = "" if merge else p.stderr.read()
    rc = p.wait(timeout)
    return rc, err, got


def test_closed_pipes_never_stop_training_and_end_read_only_commands_quietly(tiny, data, tmp_path):
    """`zoo finetune ... 2>&1 | head -3` trains to the end, exports, exits 0, and log.txt holds every line;
    `zoo eval/list/info/cache ls ... | head -1` exit 0 without a word on stderr."""
    run = tmp_path / "run"
    rc, _, got = _zoo(["finetune", tiny, "--data", data, "--out", run, *TRAIN], lines=3)
    assert rc == 0 and got[0].startswith("data: ")
    assert (run / "export" / "model.safetensors").is_file() and (run / "summary.json").is_file()
    log = (run / "log.txt").read_text(encoding="utf-8").splitlines()
    assert log[0].startswith("$ zoo finetune tiny32 --data")
    assert log[1] == got[0].rstrip("\n")                                  # the lines printed before the folder
    for needle in ("freeze: ", "epoch 2/2", "best epoch", "run folder: ", "bundle: "):
        assert any(ln.startswith(needle) for ln in log), needle

    for args in (["eval", run / "export", "--data", data, "--out", tmp_path / "ev", "--device", "cpu"],
                 ["list"], ["info", tiny], ["cache", "ls"]):
        rc, err, got = _zoo(args, lines=1, merge=False)
        # (eval's data is the run's own training folder: it says so, and nothing else)
        said = [ln for ln in err.splitlines() if "is the folder this model was trained on" not in ln]
        assert rc == 0 and not said and (args[0] != "eval" or err), (args, rc, err)


@pytest.mark.slow
def test_closed_stdout_alone_and_predict(tiny, data, tmp_path):
    """`zoo finetune ... | head -0` (stdout closed before its first line, stderr still read): trains to
    the end, exit 0, nothing on stderr about the pipe; `zoo predict ... | head -1` exits 0 quietly."""
    run = tmp_path / "run"
    rc, err, _ = _zoo(["finetune", tiny, "--data", data, "--out", run, *TRAIN], lines=0, merge=False)
    assert rc == 0 and "Traceback" not in err and "error" not in err, err
    assert "best epoch" in (run / "log.txt").read_text(encoding="utf-8")
    image = next((data / "a").iterdir())
    rc, err, _ = _zoo(["predict", run / "export", image, image, "--device", "cpu"], lines=1, merge=False)
    assert rc == 0 and err.strip() == "", (rc, err)


# ---------------------------------------------------------------------------------- printable names
def test_class_names_with_control_characters_are_printed_escaped(tiny, tmp_path):
    """A newline or an escape sequence in a class folder name: every table row stays one line, the
    terminal never receives a control character; confusion.png is written with no glyph warning."""
    classes = ("new\nline", "esc\x1b[2J", "猫")
    data = make_image_folder(tmp_path / "data", classes=classes, per_class=4, layout="split", val_per_class=2)
    run = tmp_path / "run"
    res = invoke("finetune", tiny, "--data", data, "--out", run, *TRAIN)
    assert res.exit_code == 0, res.output
    for text in (res.stdout, res.stderr):
        assert "\x1b" not in text
    assert r"  new\nline: train 4, val 2" in res.stderr
    per_class = [ln for ln in res.stdout.splitlines() if ln.startswith("per-class accuracy:")]
    assert len(per_class) == 1 and r"new\nline" in per_class[0] and r"esc\x1b[2J" in per_class[0]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        res = invoke("eval", run / "export", "--data", data, "--out", tmp_path / "ev", "--device", "cpu")
    assert res.exit_code == 0, res.output
    assert not [w for w in caught if "Glyph" in str(w.message)]
    assert "\x1b" not in res.output and r"new\nline" in res.stdout
    rows = [ln for ln in res.stdout.splitlines() if ln.startswith(("new", "esc", "猫"))]
    assert len(rows) == 3, res.stdout
    assert (tmp_path / "ev" / "confusion.png").stat().st_size > 0


def test_plot_labels_fall_back_to_a_font_with_the_glyph_or_escape():
    from matplotlib import font_manager

    from zoo.evaluate import _charmap, plot_labels

    names, families = plot_labels(["cat", "a\nb", "\u24b6", "\U0010fffd"])
    assert names[0] == "cat" and names[1] == r"a\nb"
    assert names[3] == r"\U0010fffd"                    # no font has it: its escape, not an empty box
    owner = [f for f in font_manager.fontManager.ttflist if 0x24B6 in _charmap(f.fname)
             and "last resort" not in f.name.lower()]
    if owner:                                           # Ⓐ: not in DejaVu Sans, in STIX (shipped by matplotlib)
        assert names[2] == "\u24b6" and len(families) == 2 and families[1] == owner[0].name
    else:
        assert names[2] == r"\u24b6"


def test_a_folder_left_by_a_run_killed_before_writing_anything_counts_as_empty(tmp_path):
    """kill -9 during the download: marker, log and a dead process's lock remain; the next run uses the
    folder (with a note about the lock) instead of calling it an earlier run."""
    from zoo.outdir import LOCK, MARKER, claim_out, folder_kind

    folder = tmp_path / "run"
    folder.mkdir()
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    import socket

    (folder / MARKER).write_text('{"kind": "finetune"}')
    (folder / "log.txt").write_text("$ zoo finetune ...\n")
    (folder / LOCK).write_text(json.dumps({"pid": dead.pid, "host": socket.gethostname(), "command": "zoo x"}))
    assert folder_kind(folder) == "empty"
    notes: list[str] = []
    with claim_out(folder, "finetune", note=notes.append) as mode:
        assert mode == "new" and not (folder / "log.txt").exists()
        (folder / "model.json").write_text("{}")
    assert len(notes) == 1 and f"pid {dead.pid}" in notes[0]
    assert folder_kind(folder) == "finetune" and not (folder / LOCK).exists()


def test_a_folder_left_by_a_run_killed_while_writing_its_marker_counts_as_empty(tmp_path):
    """kill -9 half-way through the marker's atomic write: a dead process's lock and the marker's temp file
    remain. Chaos QA: every command refused the folder (`is not empty and holds no zoo output`, also with
    --overwrite; --resume: `not a run folder`), and only deleting zoo's own debris by hand helped."""
    from zoo.outdir import LOCK, MARKER, claim_out, folder_kind

    folder = tmp_path / "run"
    folder.mkdir()
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    import socket

    temp = folder / f".{MARKER}.ita_x_o1.tmp"
    temp.write_text('{"kind": "fine')
    (folder / LOCK).write_text(json.dumps({"pid": dead.pid, "host": socket.gethostname(), "command": "zoo x"}))
    assert folder_kind(folder) == "empty"
    with claim_out(folder, "finetune", note=lambda _m: None) as mode:
        assert mode == "new" and not temp.exists()     # the half marker goes once the folder is taken
        (folder / "model.json").write_text("{}")
    assert folder_kind(folder) == "finetune" and sorted(os.listdir(folder)) == [MARKER, "model.json"]


def test_a_marker_whose_kind_is_not_a_name_counts_as_not_zoos(tmp_path):
    """helper-73: a hand-edited marker whose "kind" is a list or an object (not a name) ended folder_kind, so
    every command given that folder, in a traceback (TypeError: unhashable type); it is a folder zoo did not
    write, as a marker that is not JSON is."""
    from zoo.outdir import MARKER, folder_kind

    folder = tmp_path / "run"
    folder.mkdir()
    (folder / "notes.txt").write_text("x")
    for kind in ([], {"a": 1}, "finetune-ish", None):
        (folder / MARKER).write_text(json.dumps({"kind": kind}))
        assert folder_kind(folder) == "other"
    (folder / MARKER).write_text(json.dumps({"kind": "finetune"}))
    assert folder_kind(folder) == "finetune"


def test_a_resume_over_a_manifest_that_holds_no_object_starts_a_new_one(tmp_path):
    """helper-73: a run's manifest.json holding JSON that is not an object (``[]``, ``null``) ended the resume
    in a traceback (AttributeError: 'list' object has no attribute 'setdefault'); a damaged or missing one
    was already replaced by a new manifest with the resume recorded, and so is this."""
    import torch

    from finetune.core.config import FinetuneConfig
    from finetune.engine.runfolder import RunFolder

    run = tmp_path / "run"
    run.mkdir()
    for held in ("[]", "null", "{not json"):
        (run / "manifest.json").write_text(held)
        RunFolder(run).start(FinetuneConfig(), None, None, torch.device("cpu"), None, resume=True)
        manifest = json.loads((run / "manifest.json").read_text())
        assert list(manifest) == ["resumed"] and len(manifest["resumed"]) == 1


def test_a_resume_over_a_manifest_whose_resumed_is_not_a_list_records_the_resume(tmp_path):
    """Review of helper-73's read_json_object fold (helper-75): a manifest.json that is an object but whose
    ``"resumed"`` is not a list (``null``, text, an object: hand-edited or damaged) still ended the resume in a
    traceback (AttributeError: 'NoneType' object has no attribute 'append'); the resumes are recorded anew, the
    rest of the manifest kept."""
    import torch

    from finetune.core.config import FinetuneConfig
    from finetune.engine.runfolder import RunFolder

    run = tmp_path / "run"
    run.mkdir()
    for held in (None, "x", {"a": 1}, 3):
        (run / "manifest.json").write_text(json.dumps({"seed": 7, "resumed": held}))
        RunFolder(run).start(FinetuneConfig(), None, None, torch.device("cpu"), None, resume=True)
        manifest = json.loads((run / "manifest.json").read_text())
        assert manifest["seed"] == 7 and len(manifest["resumed"]) == 1, held
    RunFolder(run).start(FinetuneConfig(), None, None, torch.device("cpu"), None, resume=True)
    assert len(json.loads((run / "manifest.json").read_text())["resumed"]) == 2      # a list is appended to


def test_a_resume_removes_the_temp_files_of_writes_cut_short(tmp_path):
    """QA (helper-53): a run killed (kill -9) while writing curves.png or last.pt left .curves.png.<random>.tmp
    (or a gigabyte .last.pt.<random>.tmp) that no resume removed. Claiming the folder to resume removes them,
    in the run folder and checkpoints/; its files, a user's file and the bundle folder are left alone. (helper-108: a
    sweep's trial folder is one named as sweeps name them; a folder of the user's in trials/ is left alone.)"""
    import json

    from zoo.outdir import MARKER, claim_out

    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    (run / "export").mkdir()
    (run / MARKER).write_text(json.dumps({"kind": "finetune"}))
    keep = ["metrics.csv", "notes.tmp", ".hidden.tmp", ".backup.ABCDEFGH.tmp", "checkpoints/last.pt",
            "export/.model.safetensors.a1b2c3d4.tmp", ".report.html.zz11yy22.tmp"]
    stale = [".curves.png.k3j_9xz1.tmp", "checkpoints/.last.pt.q8w7e6r5.tmp"]
    for name in keep + stale:
        (run / name).write_text("x")
    with claim_out(run, "finetune", resume=True) as mode:
        assert mode == "resume"
    assert all((run / n).exists() for n in keep) and not any((run / n).exists() for n in stale)
    from finetune.tools.sweep.space import trial_id

    sweep = tmp_path / "sweep"      # --keep-runs: each trial's checkpoints
    trial = sweep / "trials" / trial_id({"lr": 0.5, "weight_decay": 0.1, "freeze": "head", "optimizer": "sgd"})
    (trial / "fold-1" / "checkpoints").mkdir(parents=True)
    (sweep / MARKER).write_text(json.dumps({"kind": "sweep"}))
    temp = trial / "fold-1" / "checkpoints" / ".last.pt.ab12cd34.tmp"
    temp.write_text("x")
    with claim_out(sweep, "sweep", resume=True):
        pass
    assert not temp.exists()


@pytest.mark.parametrize("mode", ["resume", "overwrite"])
def test_the_temp_file_of_a_page_write_killed_goes_with_the_next_resume_or_overwrite(tmp_path, mode):
    """A kill -9 inside report.html's own write (atomic_write: a temp, then a rename) left its
    `.report.html.<random>.tmp` for good: the resume's claim left report.html's temp files alone, as `zoo report`
    writes without the lock (fuzz of helper-98, left), and `--overwrite` removed none at the top of the run folder
    (an earlier run's `.summary.json.<random>.tmp` too). Both remove them now: a page's whose writer (the pid in
    its name) is gone, or older than UNLOCKED_TEMP_S; one a live process may be writing now stays."""
    import time

    from finetune.core.tempfiles import host_tag
    from zoo.outdir import MARKER, UNLOCKED_TEMP_S, claim_out

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    (run / MARKER).write_text(json.dumps({"kind": "finetune"}))
    (run / "metrics.csv").write_text("epoch\n")
    here = host_tag()
    killed, old = run / f".report.html.{dead.pid}@{here}.ab12cd34.tmp", run / ".report.html.zz11yy22.tmp"
    writing, cut = run / f".report.html.{os.getpid()}@{here}.q8w7e6r5.tmp", run / ".summary.json.k3j_9xz1.tmp"
    # (helper-104) another host's writer, on a shared file system: its pid means nothing here, only its age counts
    elsewhere = run / f".report.html.{dead.pid}@{'0' * 8 if here != '0' * 8 else '1' * 8}.m1n2b3v4.tmp"
    for temp in (killed, old, writing, cut, elsewhere):
        temp.write_text("x")
    then = time.time() - UNLOCKED_TEMP_S - 3600      # (an earlier version's name, without the pid)
    os.utime(old, (then, then))
    with claim_out(run, "finetune", resume=mode == "resume", overwrite=mode == "overwrite") as got:
        assert got == mode
    assert not killed.exists() and not old.exists() and not cut.exists() and writing.exists() and elsewhere.exists()


def test_atomic_write_names_its_temp_file_with_its_pid(tmp_path):
    """(what the rule above reads) The temp file of a write cut short names the process that wrote it (more:
    tests/test_reliability_temps.py::test_writer_running_reads_every_temp_name)."""
    from finetune.core.io import atomic_write
    from finetune.core.tempfiles import is_temp, writer_running

    seen = []
    atomic_write(tmp_path / "report.html", lambda tmp: seen.append(os.path.basename(tmp)))
    assert is_temp(seen[0]) and seen[0].startswith(f".report.html.{os.getpid()}") and writer_running(seen[0])
    assert writer_running(".report.html.zz11yy22.tmp") is None
    other = "0" * 8 if seen[0].split("@")[1][:8] != "0" * 8 else "1" * 8       # another host's tag
    assert writer_running(f".report.html.{os.getpid()}@{other}.zz11yy22.tmp") is None


@pytest.mark.parametrize("kind", ["loop", "dangling"])
def test_a_data_folder_that_is_a_looping_or_dangling_link_is_named_as_one(tiny, tmp_path, monkeypatch, kind):
    """QA (helper-72, left): `--data loop` (`ln -s loop loop`) read `does not exist or is not a folder` (zoo
    finetune's scan) or click's `Directory 'loop' does not exist` (eval, doctor, lr-find, sweep); a link to a
    folder gone read the same. Every command now names the link for what it is (`finetune.core.io.broken_link`)
    with the way on, exit 2, before any model is built; the scan says it too (`scan_folder`, the library's)."""
    from finetune.core.errors import DataError
    from finetune.data import scan_folder

    link = tmp_path / kind
    link.symlink_to(link if kind == "loop" else tmp_path / "unmounted" / "photos")
    what = ("is a symbolic link that loops" if kind == "loop" else
            f"is a symbolic link to {tmp_path / 'unmounted' / 'photos'}, which does not exist")
    forbid_model_builds(monkeypatch, "a model was built before --data was checked")
    for args in (["finetune", tiny, "--data", link, "--out", tmp_path / "run"], ["eval", tiny, "--data", link],
                 ["doctor", link], ["doctor", "--data", link], ["lr-find", tiny, "--data", link],
                 ["sweep", tiny, "--data", link, "--lr", "0.1,0.2"]):
        res = invoke(*args)
        assert res.exit_code == 2 and f"{link} {what}" in res.output, (args, res.output)
        assert "point the link at the image folder, or give the folder itself" in res.output, (args, res.output)
        assert "does not exist." not in res.output and "Traceback" not in res.output, (args, res.output)
    with pytest.raises(DataError, match=f"{kind} {what.split(',')[0]}"):
        scan_folder(link)
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("kind", ["loop", "chain"])
def test_a_run_or_bundle_folder_that_is_a_looping_or_dangling_link_is_named_as_one(tmp_path, monkeypatch, kind):
    """Review (helper-80) of helper-79's --data fix: `zoo report loop`, `zoo export loop`, `zoo push loop`,
    `zoo finetune --resume loop` still read click's `Directory 'loop' does not exist`, and `zoo predict loop`
    (eval, serve: zoo.bundle.load_model) `unknown model 'loop'`; a chain a -> b -> (nothing) read "a is a
    symbolic link to b, which does not exist" of a b that `ls` lists. Each names the link, and the chain."""
    monkeypatch.chdir(tmp_path)
    if kind == "loop":
        os.symlink("loop", "loop")
        name, what = "loop", "loop is a symbolic link that loops"
    else:
        os.symlink("b", kind)                  # relative links, as `ln -s b chain` makes them
        os.symlink("gone", "b")
        name, what = kind, "chain is a symbolic link to b -> gone, which does not exist"
    make_image_folder(tmp_path / "d", ("cat", "dog"), per_class=1)
    image = next((tmp_path / "d" / "cat").iterdir())
    forbid_model_builds(monkeypatch, "a model was built before MODEL was checked")
    for args, folder in ((["report", name], "run folder"), (["export", name], "run folder"),
                         (["push", name, "--repo", "me/x"], "run or bundle folder"),
                         (["finetune", "--resume", name], "run folder"), (["predict", name, image], "bundle folder"),
                         (["eval", name, "--data", "d", "--out", "o"], "bundle folder")):
        res = invoke(*args)
        assert res.exit_code in (1, 2) and what in res.output, (args, res.output)
        assert f"point the link at the {folder}, or give the folder itself" in res.output, (args, res.output)
        assert "does not exist." not in res.output and "unknown model" not in res.output, (args, res.output)
