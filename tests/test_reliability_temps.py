"""Reliability: the temp files of atomic writes (``finetune.core.tempfiles``) that a resume's or an --overwrite's
claim of a folder removes (``zoo.outdir._remove_temps``). The rule: a temp a live writer is still writing is never
removed (that loses its file), a dead writer's temp of a file the command writes is. Live writers here are real
processes blocked half-way through ``atomic_write``; dead ones are such processes killed (kill -9) there."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# A writer blocked inside atomic_write's write (after writing its temp) until a line comes on its stdin: prints
# the temp's name first. argv: the file, then optionally an mtime to give the temp (a write begun long ago, a slow
# disk), then optionally a command whose output folder (the file's) it claims first, as that command does.
_WRITER = """
import contextlib, os, sys
from finetune.core.io import atomic_write
from zoo.outdir import claim_out
target, then, kind = (sys.argv[1:] + ["", ""])[:3]
def write(tmp):
    with open(tmp, "w") as fh:
        fh.write("written")
    if then:
        os.utime(tmp, (float(then), float(then)))
    print(os.path.basename(tmp), flush=True)
    sys.stdin.readline()
with claim_out(os.path.dirname(target), kind) if kind else contextlib.nullcontext():
    atomic_write(target, write)
"""


class Writer:
    """A process writing ``target`` through atomic_write, blocked half-way (its temp on disk) until ``finish``."""

    def __init__(self, target: Path, then: float | None = None, kind: str = "", prefix: tuple[str, ...] = ()):
        env = dict(os.environ, PYTHONPATH=str(ROOT))
        self.target = target
        self.proc = subprocess.Popen([*prefix, sys.executable, "-c", _WRITER, str(target), str(then or ""), kind],
                                     cwd=ROOT, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        self.temp = target.parent / self.proc.stdout.readline().strip()
        assert self.temp.name and self.temp.exists(), self.proc.communicate(timeout=60)

    def finish(self) -> int:
        """Let the write go on (its rename) and return its exit status."""
        self.proc.communicate("\n", timeout=60)
        return self.proc.returncode

    def kill(self) -> Path:
        """kill -9 half-way: its temp is a write cut short."""
        self.proc.kill()
        self.proc.communicate(timeout=60)
        return self.temp


def _run_folder(tmp_path: Path) -> Path:
    from zoo.outdir import MARKER

    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    (run / MARKER).write_text(json.dumps({"kind": "finetune"}))
    (run / "metrics.csv").write_text("epoch\n")
    return run


def _claim(run: Path, mode: str, kind: str = "finetune") -> None:
    from zoo.outdir import claim_out

    with claim_out(run, kind, resume=mode == "resume", overwrite=mode == "overwrite") as got:
        assert got == mode


@pytest.mark.parametrize("mode", ["resume", "overwrite"])
def test_a_live_writers_temp_stays_whatever_its_age(tmp_path, mode):
    """Review (helper-108): a report.html temp older than UNLOCKED_TEMP_S went whoever wrote it, also a `zoo report`
    on this host still writing it (stopped with Ctrl-Z, a slow network disk): its rename then failed and the page was
    lost. A temp whose writer (the pid in its name, on this host and pid namespace) still runs now stays, whatever
    its age; the writer's rename goes through."""
    run = _run_folder(tmp_path)
    days_ago = time.time() - 2 * 24 * 3600
    writer = Writer(run / "report.html", then=days_ago)
    try:
        _claim(run, mode)
        assert writer.temp.exists()
    finally:
        assert writer.finish() == 0
    assert (run / "report.html").read_text() == "written"


def _other_pid_namespace() -> tuple[str, ...] | None:
    """A command prefix that runs its command in a new pid namespace (same host name) as a pid this one does not
    have (none runs here under it), or None where unprivileged namespaces are not allowed."""
    from finetune.core.tempfiles import pid_alive

    if shutil.which("unshare") is None or sys.platform != "linux":
        return None
    pid = next(p for p in range(30001, 32000) if not pid_alive(p + 1))
    # (sh forks the command as the pid after ns_last_pid)
    prefix = ("unshare", "--user", "--map-root-user", "--pid", "--fork", "--mount-proc", "sh", "-c",
              f'echo {pid} > /proc/sys/kernel/ns_last_pid && "$0" "$@"; exit $?')
    try:
        probe = subprocess.run([*prefix, sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                               text=True, timeout=60)
    except (OSError, subprocess.SubprocessError):
        return None
    return prefix if probe.returncode == 0 and probe.stdout.strip() == str(pid + 1) else None


def test_a_live_writer_in_another_pid_namespace_of_this_host_keeps_its_temp(tmp_path):
    """Review (helper-108): the writer's tag was the host name's, which containers sharing a host name (docker
    --uts=host, --network host) or one container's pid namespaces have alike: another namespace's pid read as this
    one's, and gone, so its live write was removed at once. The tag now names the boot and the pid namespace
    (Linux's boot_id and /proc/self/ns/pid), so such a writer cannot be checked here: its temp stays while young."""
    prefix = _other_pid_namespace()
    if prefix is None:
        pytest.skip("no unprivileged pid namespace here (unshare)")
    run = _run_folder(tmp_path)
    writer = Writer(run / "report.html", prefix=prefix)
    try:
        _claim(run, "resume")
        assert writer.temp.exists()
    finally:
        assert writer.finish() == 0
    assert (run / "report.html").read_text() == "written"


def test_the_lock_of_a_run_in_another_pid_namespace_of_this_host_is_not_taken_over(tmp_path):
    """Review (helper-108): the same confusion in the run lock: a `zoo finetune` in another pid namespace of the same
    host name held RUN, its pid does not run here, so a resume here took its lock over as stale and both wrote the
    run. The lock records the writer's tag too; another namespace's holder is refused like another host's."""
    from zoo.outdir import RunLockedError

    prefix = _other_pid_namespace()
    if prefix is None:
        pytest.skip("no unprivileged pid namespace here (unshare)")
    run = tmp_path / "run"
    writer = Writer(run / "metrics.csv", kind="finetune", prefix=prefix)      # (claims RUN: a run in there)
    try:
        with pytest.raises(RunLockedError, match="in use by pid"):
            _claim(run, "resume")
    finally:
        assert writer.finish() == 0


@pytest.mark.parametrize("mode", ["resume", "overwrite"])
def test_another_commands_write_inside_the_run_folder_is_left_to_that_command(tmp_path, mode):
    """Review (helper-108): a resume's claim removed every temp under the run folder but report.html's, also those of
    another command writing there (`zoo eval --out RUN/eval` while `zoo finetune --resume RUN` starts): the eval's
    rename failed. The claim now removes only temps of the files the command itself writes, in the places it writes
    them (its --overwrite rule: RUN's files, checkpoints/, a sweep's trials); RUN/eval's are left to that eval's own
    --overwrite, and a temp of a file of the user's stays."""
    run = _run_folder(tmp_path)
    own = [Writer(run / "curves.png").kill(), Writer(run / "checkpoints" / "last.pt").kill()]
    user = Writer(run / "notes.txt").kill()
    writer = Writer(run / "eval" / "per_class.csv", kind="eval")      # (claims RUN/eval, as zoo eval does)
    eval_killed = Writer(run / "eval" / "metrics.json").kill()
    try:
        _claim(run, mode)
        assert writer.temp.exists() and eval_killed.exists() and user.exists()
        assert not any(t.exists() for t in own)
    finally:
        assert writer.finish() == 0
    assert (run / "eval" / "per_class.csv").read_text() == "written"
    _claim(run / "eval", "overwrite", "eval")
    assert not eval_killed.exists() and user.exists()


def test_an_overwrite_waits_for_an_export_working_in_the_run_s_bundle_folder(tmp_path):
    """Review (helper-108): `zoo finetune --overwrite RUN` while `zoo export RUN` wrote RUN/export (allowed while a
    run trains; the export holds RUN/export's own lock) removed that folder's files, the export's lock and its
    write in progress with them: the export failed, and its lock no longer kept a second writer out. The overwrite
    is refused instead, naming the export, before anything is removed; once it is done the overwrite goes on."""
    from zoo.outdir import RunLockedError

    run = _run_folder(tmp_path)
    writer = Writer(run / "export" / "model.safetensors", kind="export")    # (claims RUN/export, as zoo export does)
    try:
        with pytest.raises(RunLockedError, match="export is in use by pid .*wait for it to finish.*--overwrite"):
            _claim(run, "overwrite")
        assert writer.temp.exists() and (run / "metrics.csv").exists()
    finally:
        assert writer.finish() == 0
    _claim(run, "overwrite")
    assert not (run / "export").exists() and not (run / "metrics.csv").exists()


def test_a_temp_whose_pid_now_names_another_process_is_a_write_cut_short(tmp_path):
    """Review (helper-108): a dead writer's pid taken by a process started since (pids wrap) made its temp look live
    for as long as that process ran. The temp's name carries its writer's start time (Linux: /proc/PID/stat), so a
    pid that started later is another process: its temp goes; the live writer's own stays."""
    from finetune.core.tempfiles import host_tag

    run = _run_folder(tmp_path)
    other = subprocess.Popen([sys.executable, "-c", "import sys; sys.stdin.read()"], stdin=subprocess.PIPE)
    try:
        reused = run / f".report.html.{other.pid}-1@{host_tag()}.ab12cd34.tmp"     # started 1 tick after boot
        reused.write_text("x")
        writer = Writer(run / "report.html")
        _claim(run, "resume")
        assert not reused.exists() and writer.temp.exists()
        assert writer.finish() == 0
    finally:
        other.communicate("", timeout=60)


def test_a_lock_whose_pid_now_names_another_process_is_taken_over(tmp_path):
    """Review (helper-108): the same in the run lock: a killed run's pid taken by a process started since kept its
    folder refused (`in use by pid N`) for as long as that process ran. The lock records its holder's start time
    too: a pid that started later is another process, and the lock is taken over as a dead holder's."""
    import socket

    from finetune.core.tempfiles import host_tag, process_start
    from zoo.outdir import LOCK, RunLock, RunLockedError

    if process_start() is None:
        pytest.skip("no process start times here (/proc)")
    run = _run_folder(tmp_path)
    other = subprocess.Popen([sys.executable, "-c", "import sys; sys.stdin.read()"], stdin=subprocess.PIPE)
    try:
        (run / LOCK).write_text(json.dumps({"pid": other.pid, "host": socket.gethostname(), "tag": host_tag(),
                                            "start": "1", "command": "zoo finetune x"}))
        notes: list[str] = []
        RunLock(run).acquire(notes.append).release()
        assert len(notes) == 1 and "no longer running" in notes[0]
        (run / LOCK).write_text(json.dumps({"pid": other.pid, "host": socket.gethostname(), "tag": host_tag(),
                                            "command": "zoo finetune x"}))     # (an earlier version's: no start)
        with pytest.raises(RunLockedError, match=f"in use by pid {other.pid}"):
            RunLock(run).acquire()
    finally:
        other.communicate("", timeout=60)


def test_a_temp_of_an_unknown_writer_is_aged_by_the_folder_s_clock_not_this_host_s(tmp_path, monkeypatch):
    """Review (helper-108): a temp whose writer cannot be checked here (another host's or pid namespace's, an earlier
    version's name) of a file written without the lock (report.html) goes once older than UNLOCKED_TEMP_S; the age
    was this host's clock minus the file server's mtime, so a clock ahead by more than that removed a fresh temp.
    The age is now read against the lock file the claim has just made there (the file system's own clock)."""
    from zoo.outdir import UNLOCKED_TEMP_S

    run = _run_folder(tmp_path)
    fresh, stale = run / ".report.html.zz11yy22.tmp", run / ".report.html.ab12cd34.tmp"
    for temp in (fresh, stale):
        temp.write_text("x")
    then = time.time() - UNLOCKED_TEMP_S - 600
    os.utime(stale, (then, then))
    ahead = time.time
    monkeypatch.setattr(time, "time", lambda: ahead() + 2 * UNLOCKED_TEMP_S)
    _claim(run, "resume")
    assert fresh.exists() and not stale.exists()


def test_the_tag_names_the_pid_namespace(tmp_path):
    """(what the rules above read) The same host name in another pid namespace gives another tag; the tag is
    short, and names stay within what a file system takes."""
    from finetune.core.tempfiles import host_tag

    prefix = _other_pid_namespace()
    if prefix is None:
        pytest.skip("no unprivileged pid namespace here (unshare)")
    code = "from finetune.core.tempfiles import host_tag; print(host_tag())"
    there = subprocess.run([*prefix, sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                           cwd=ROOT, env=dict(os.environ, PYTHONPATH=str(ROOT)))
    assert there.returncode == 0 and there.stdout.strip() != host_tag() and len(host_tag()) == 8


def test_writer_running_reads_every_temp_name(tmp_path, monkeypatch):
    """A temp of this process: running; of a pid gone: not; an earlier version's name, another tag: cannot be told.
    Where Linux does not say (no /proc), the tag is the host name's."""
    from finetune.core import tempfiles
    from finetune.core.io import atomic_write
    from finetune.core.tempfiles import host_tag, is_temp, temp_target, writer_running

    seen: list[str] = []
    atomic_write(tmp_path / "report.html", lambda tmp: seen.append(os.path.basename(tmp)))
    assert is_temp(seen[0]) and temp_target(seen[0]) == "report.html" and writer_running(seen[0]) is True
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    gone = seen[0].replace(f".{os.getpid()}-", f".{dead.pid}-")
    assert temp_target(gone) == "report.html" and writer_running(gone) is False
    other = "0" * 8 if host_tag() != "0" * 8 else "1" * 8
    for name in (".report.html.zz11yy22.tmp", f".last.pt.{os.getpid()}@{host_tag()[:6]}.zz11yy22.tmp",
                 f".last.pt.{dead.pid}-1@{other}.zz11yy22.tmp"):
        assert writer_running(name) is None, name
    assert temp_target(".last.pt.zz11yy22.tmp") == "last.pt" and temp_target("last.pt") is None
    monkeypatch.setattr(tempfiles, "_BOOT_ID", str(tmp_path / "absent"))
    assert len(host_tag()) == 8 and host_tag() != other


def test_a_lock_left_before_this_machine_restarted_is_taken_over(tmp_path):
    """Review (helper-110): the lock's tag names the boot and the pid namespace together, so a lock left by a run
    that a crash or a power cut ended (same host name, the boot before) read as another container's live run: the
    resume was refused ("in use by pid N on HOST (another container or pid namespace)") until the user deleted the
    lock by hand, where 036aea0 had taken it over as a dead pid's. The lock records the boot apart: a holder of an
    earlier boot of this host has ended, whatever its pid names now; another pid namespace of this boot is refused."""
    import socket

    from finetune.core.tempfiles import boot_tag, host_tag
    from zoo.outdir import LOCK, RunLock, RunLockedError

    if boot_tag() is None:
        pytest.skip("no boot id here (/proc/sys/kernel/random/boot_id)")
    other_tag = "0" * 8 if host_tag() != "0" * 8 else "1" * 8
    other_boot = "0" * 8 if boot_tag() != "0" * 8 else "1" * 8
    run = _run_folder(tmp_path)
    record = {"pid": os.getppid(), "host": socket.gethostname(), "tag": other_tag, "start": "1",
              "command": "zoo finetune x"}       # (a pid that runs now: after a restart it is another process)
    (run / LOCK).write_text(json.dumps({**record, "boot": other_boot}))
    notes: list[str] = []
    RunLock(run).acquire(notes.append).release()
    assert len(notes) == 1 and "no longer running" in notes[0]
    (run / LOCK).write_text(json.dumps({**record, "boot": boot_tag()}))          # this boot, another pid namespace
    with pytest.raises(RunLockedError, match="another container or pid namespace"):
        RunLock(run).acquire()
